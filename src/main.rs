use clap::Parser;

use imagecachefs::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Mount(args) => imagecachefs::run::mount_command(args.into_config(), cli.verbose),
        Command::Unmount { dir } => imagecachefs::run::unmount_command(&dir, cli.verbose),
    };
    std::process::exit(code);
}
