use clap::Parser;

use imagecachefs::cli::{Cli, Command};
use imagecachefs::run;

fn main() {
    let cli = Cli::parse();
    let v = cli.verbose;
    let code = match cli.command {
        Command::Mount(args) => match run::init_logging(v, args.log_file.as_deref())
            .map_err(|r| r.to_string())
            .and_then(|()| args.into_config())
        {
            Ok(cfg) => run::mount_command(cfg, v),
            Err(e) => {
                eprintln!("imagecachefs: {e}");
                1
            }
        },
        Command::Unmount { dir } => run::unmount_command(&dir, v),
        Command::Status { dir, json } => run::status_command(&dir, json),
        Command::Pin(t) => run::control_command(&t.dir, "pin", &t.name),
        Command::Unpin(t) => run::control_command(&t.dir, "unpin", &t.name),
        Command::Verify(t) => run::control_command(&t.dir, "verify", &t.name),
        Command::Evict(t) => run::control_command(&t.dir, "evict", &t.name),
    };
    std::process::exit(code);
}
