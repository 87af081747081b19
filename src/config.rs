//! Plain configuration values, built by `cli.rs` (the only module that knows clap).

use std::path::PathBuf;

/// Options of `imagecachefs mount`.
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// The cache directory: both what is served and where it is mounted.
    pub dir: PathBuf,
    /// Return once the mount is live, leaving the daemon running.
    pub background: bool,
    /// FUSE worker threads.
    pub threads: usize,
    /// Append the log here instead of standard error.
    pub log_file: Option<PathBuf>,
}
