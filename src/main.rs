use clap::Parser;

use imagecachefs::cli::{Cli, Command};
use imagecachefs::run;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => std::process::exit(usage_error(e)),
    };
    let v = cli.verbose;
    let code = match cli.command {
        Command::Mount(args) => match run::init_logging(v, args.log_file.as_deref())
            .map_err(|r| r.to_string())
            .and_then(|()| args.into_config())
        {
            Ok(cfg) if cfg.check => run::check_command(&cfg),
            Ok(cfg) => run::mount_command(cfg, v),
            Err(e) => {
                eprintln!("imagecachefs: {e}");
                1
            }
        },
        Command::Unmount { dir } => run::unmount_command(&dir, v),
        Command::Restart { dir } => run::restart_command(&dir),
        Command::JournalFormats => {
            let f: Vec<String> = imagecachefs::journal::READS.iter().map(u32::to_string).collect();
            println!("{}", f.join(" "));
            0
        }
        Command::Status { dir, json } => run::status_command(&dir, json),
        Command::Pin(t) => run::control_command(&t.dir, "pin", &t.name),
        Command::Unpin(t) => run::control_command(&t.dir, "unpin", &t.name),
        Command::Verify(t) => run::control_command(&t.dir, "verify", &t.name),
        Command::Evict(t) => run::control_command(&t.dir, "evict", &t.name),
    };
    std::process::exit(code);
}

/// Help and version go out as clap writes them; a usage error is one line on standard error
/// (clap's first line, without its tips and usage block), exit code 2.
fn usage_error(e: clap::Error) -> i32 {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    // The first paragraph, joined: "required arguments were not provided:" names them on the
    // lines that follow.
    let text = e.render().to_string();
    let first: Vec<&str> =
        text.lines().map(str::trim).take_while(|l| !l.is_empty()).collect::<Vec<_>>();
    let line = first.join(" ");
    eprintln!("imagecachefs: {} (see --help)", line.strip_prefix("error: ").unwrap_or(&line));
    2
}
