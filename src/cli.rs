//! The command line: clap lives here and nowhere else.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::MountConfig;

#[derive(Parser, Debug)]
#[command(
    name = "imagecachefs",
    version,
    about = "FUSE overlay for OpenStack Nova's image cache: live references, status files, \
             checksums and lazy eviction, with the data path left to the kernel"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More log detail (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount imagecachefs over DIR (DIR is both the source and the mount point).
    Mount(MountArgs),
    /// Detach the imagecachefs mount at DIR; its daemon exits after the last open file closes.
    Unmount {
        /// The mounted cache directory.
        dir: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// The cache directory, e.g. /var/lib/nova/instances/_base.
    pub dir: PathBuf,

    /// Return once the mount is live and leave the daemon running.
    #[arg(long, help_heading = "Process")]
    pub background: bool,

    /// FUSE worker threads (only metadata reaches the daemon; data is the kernel's).
    #[arg(long, value_name = "N", default_value_t = 4, help_heading = "Process",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,

    /// Append the log to FILE instead of standard error.
    #[arg(long, value_name = "FILE", help_heading = "Process")]
    pub log_file: Option<PathBuf>,
}

impl MountArgs {
    pub fn into_config(self) -> MountConfig {
        MountConfig {
            dir: self.dir,
            background: self.background,
            threads: self.threads as usize,
            log_file: self.log_file,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_defaults() {
        let cli = Cli::try_parse_from(["imagecachefs", "mount", "/x"]).unwrap();
        let Command::Mount(m) = cli.command else { panic!("not mount") };
        let c = m.into_config();
        assert_eq!(c.dir, PathBuf::from("/x"));
        assert!(!c.background);
        assert_eq!(c.threads, 4);
    }

    #[test]
    fn bad_thread_count_is_a_usage_error() {
        assert!(Cli::try_parse_from(["imagecachefs", "mount", "/x", "--threads", "0"]).is_err());
    }
}
