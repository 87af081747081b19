//! The command line: clap lives here and nowhere else.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};

use crate::config::{
    parse_bounded, parse_secs, MinFree, MountConfig, StorageChoice, MAX_RATE_MIB, THREADS,
};
use crate::state::Policy;

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
    /// Replace the running server and its supervisor with the binary now on disk (an
    /// upgrade), without unmounting: open files, references and holders carry over.
    Restart {
        /// The mounted cache directory.
        dir: PathBuf,
    },
    /// Print the journal formats this binary can take over (used by `restart`).
    #[command(hide = true)]
    JournalFormats,
    /// Print the status table (or JSON) of a mounted cache.
    Status {
        /// The mounted cache directory.
        dir: PathBuf,
        /// JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Keep NAME from being evicted (root only; persists across restarts).
    Pin(Target),
    /// Undo `pin`.
    Unpin(Target),
    /// Re-verify NAME's SHA-1 now.
    Verify(Target),
    /// Evict NAME now; refused if it is in use, being written, pinned or referenced.
    Evict(Target),
}

#[derive(Args, Debug)]
pub struct Target {
    /// The mounted cache directory.
    pub dir: PathBuf,
    /// A cache file's name (no `/`).
    pub name: std::ffi::OsString,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// The cache directory, e.g. /var/lib/nova/instances/_base.
    pub dir: PathBuf,

    /// Return once the mount is live and leave the daemon running.
    #[arg(long, help_heading = "Process")]
    pub background: bool,

    /// Check the configuration (flags, nova.conf, instances directory) and exit: prints the
    /// effective settings, mounts nothing.
    #[arg(long, help_heading = "Process")]
    pub check: bool,

    /// FUSE worker threads, 1 to 64 (only metadata reaches the daemon; data is the kernel's).
    #[arg(long, value_name = "N", default_value_t = 2, help_heading = "Process",
          value_parser = parse_threads, allow_negative_numbers = true)]
    pub threads: u64,

    /// Append the log to FILE instead of standard error.
    #[arg(long, value_name = "FILE", help_heading = "Process")]
    pub log_file: Option<PathBuf>,

    /// Serve every read and write through the daemon instead of kernel passthrough (several
    /// times slower; for troubleshooting, or where passthrough cannot work).
    #[arg(long, help_heading = "Process")]
    pub no_passthrough: bool,

    /// Idle age after which originals, ephemeral and swap files go (default 86400).
    #[arg(long, value_name = "SECS", help_heading = "Eviction", value_parser = parse_secs,
          allow_negative_numbers = true)]
    pub original_min_age: Option<u64>,

    /// Idle age after which resized and unrecognised files go (default 3600).
    #[arg(long, value_name = "SECS", help_heading = "Eviction", value_parser = parse_secs,
          allow_negative_numbers = true)]
    pub resized_min_age: Option<u64>,

    /// Idle age after which stale .part/.converted files with no writer go (default 3600).
    #[arg(long, value_name = "SECS", help_heading = "Eviction", value_parser = parse_secs,
          allow_negative_numbers = true)]
    pub partial_min_age: Option<u64>,

    /// Never evict by age (corrupt files still go once unused).
    #[arg(long, help_heading = "Eviction")]
    pub no_evict: bool,

    /// Read the settings above from nova.conf ([image_cache] and legacy names); flags win.
    #[arg(long, value_name = "FILE", help_heading = "Eviction")]
    pub nova_conf: Option<PathBuf>,

    /// Where instance directories live, for the backing-file guard [default: DIR's parent].
    #[arg(long, value_name = "DIR", help_heading = "Eviction")]
    pub instances_dir: Option<PathBuf>,

    /// Keep at least this much free on the cache filesystem by evicting least recently used
    /// unreferenced files first (e.g. 20G or 10%).
    #[arg(long, value_name = "SIZE|PCT", value_parser = MinFree::parse, help_heading = "Eviction",
          allow_hyphen_values = true)]
    pub min_free: Option<MinFree>,

    /// Under disk pressure, never evict a file idle for less than this.
    #[arg(long, value_name = "SECS", default_value_t = 600, help_heading = "Eviction",
          value_parser = parse_secs, allow_negative_numbers = true)]
    pub pressure_min_age: u64,

    /// Re-verify each file's SHA-1 this often [default: 86400, or nova.conf's
    /// checksum_interval_seconds].
    #[arg(long, value_name = "SECS", help_heading = "Checksums", value_parser = parse_secs,
          allow_negative_numbers = true)]
    pub verify_interval: Option<u64>,

    /// Read rate limit of the checksum thread, up to 1048576 (0: unlimited).
    #[arg(long, value_name = "MiB/s", default_value_t = 64, help_heading = "Checksums",
          value_parser = parse_rate, allow_negative_numbers = true)]
    pub verify_rate: u64,

    /// Whether other hosts share the cache directory [default: detected from the filesystem
    /// type: NFS, CephFS, GlusterFS, GPFS, Lustre, OCFS2, GFS2, CIFS, 9p, virtiofs and FUSE
    /// filesystems are shared]. On shared storage nothing is evicted.
    #[arg(long, value_name = "KIND", value_enum, help_heading = "Eviction")]
    pub storage: Option<Storage>,
}

/// `--storage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Storage {
    /// Only this host uses the cache directory: evict as configured.
    Local,
    /// Other hosts may use the files: evict nothing.
    Shared,
}

fn parse_threads(s: &str) -> Result<u64, String> {
    parse_bounded(s, THREADS)
}

fn parse_rate(s: &str) -> Result<u64, String> {
    parse_bounded(s, 0..=MAX_RATE_MIB)
}

impl MountArgs {
    /// Resolves the options: a flag wins over nova.conf, which wins over Nova's defaults.
    pub fn into_config(mut self) -> Result<MountConfig, String> {
        // The daemon works from `/`: every path it keeps is made absolute here.
        for p in
            [&mut self.nova_conf, &mut self.log_file, &mut self.instances_dir].into_iter().flatten()
        {
            *p = std::path::absolute(&*p).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        let nova = match &self.nova_conf {
            Some(path) => crate::novaconf::load(path).map_err(|e| e.to_string())?,
            None => Default::default(),
        };
        // An instances directory that does not exist would leave the backing-file guard
        // unable to read any disk, and so age eviction silently off: refuse it now.
        let instances_dir = match (self.instances_dir, nova.instances_path) {
            (Some(flag), _) => Some((flag, "--instances-dir".to_owned())),
            (None, Some(conf)) => Some((
                PathBuf::from(conf),
                format!(
                    "instances_path in {}",
                    self.nova_conf.as_deref().unwrap_or(Path::new("nova.conf")).display()
                ),
            )),
            (None, None) => None,
        };
        if let Some((dir, from)) = &instances_dir {
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(format!("{} ({from}) is not a directory", dir.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(format!("{} ({from}) does not exist", dir.display()))
                }
                Err(e) => return Err(format!("{} ({from}): {e}", dir.display())),
            }
        }
        let d = Policy::default();
        let policy = Policy {
            original_min_age: self
                .original_min_age
                .or(nova.original_min_age)
                .unwrap_or(d.original_min_age),
            resized_min_age: self
                .resized_min_age
                .or(nova.resized_min_age)
                .unwrap_or(d.resized_min_age),
            partial_min_age: self.partial_min_age.unwrap_or(d.partial_min_age),
            // Not nova.conf's remove_unused_base_images: operators set it to False so that
            // Nova's own scanner stops deleting, which must not switch off ours.
            evict: !self.no_evict,
            // Decided at mount, once the filesystem is known.
            shared: None,
        };
        Ok(MountConfig {
            dir: self.dir,
            background: self.background,
            threads: self.threads as usize,
            check: self.check,
            passthrough: !self.no_passthrough,
            log_file: self.log_file,
            policy,
            instances_dir: instances_dir.map(|(dir, _)| dir),
            min_free: self.min_free,
            pressure_min_age: self.pressure_min_age,
            verify_interval: self.verify_interval.or(nova.checksum_interval).unwrap_or(86_400),
            storage: match self.storage {
                None => StorageChoice::Detect,
                Some(Storage::Local) => StorageChoice::Local,
                Some(Storage::Shared) => StorageChoice::Shared,
            },
            nova_subdirectory: nova.subdirectory_name,
            nova_scanner_on: self.nova_conf.is_some()
                && nova.remove_unused_base_images != Some(false),
            verify_rate_mib: self.verify_rate,
            nova_conf: self.nova_conf,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_defaults() {
        let cli = Cli::try_parse_from(["imagecachefs", "mount", "/x"]).unwrap();
        let Command::Mount(m) = cli.command else { panic!("not mount") };
        let c = m.into_config().unwrap();
        assert_eq!(c.dir, PathBuf::from("/x"));
        assert!(!c.background);
        assert_eq!(c.threads, 2);
        assert_eq!(c.policy, Policy::default());
        assert_eq!(c.verify_rate_mib, 64);
    }

    #[test]
    fn flags_set_the_policy() {
        let cli = Cli::try_parse_from([
            "imagecachefs",
            "mount",
            "/x",
            "--original-min-age",
            "5",
            "--resized-min-age",
            "6",
            "--partial-min-age",
            "7",
            "--no-evict",
            "--min-free",
            "10%",
        ])
        .unwrap();
        let Command::Mount(m) = cli.command else { panic!("not mount") };
        let c = m.into_config().unwrap();
        assert_eq!((c.policy.original_min_age, c.policy.resized_min_age), (5, 6));
        assert_eq!(c.policy.partial_min_age, 7);
        assert!(!c.policy.evict);
        assert_eq!(c.min_free, Some(MinFree::Percent(10.0)));
    }

    fn parse_error(args: &[&str]) -> String {
        let mut all = vec!["imagecachefs", "mount", "/x"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect_err("refused").render().to_string()
    }

    #[test]
    fn every_number_is_bounded_where_it_is_parsed() {
        use crate::config::MAX_SECS;
        let max = MAX_SECS.to_string();
        for flag in [
            "--original-min-age",
            "--resized-min-age",
            "--partial-min-age",
            "--pressure-min-age",
            "--verify-interval",
        ] {
            for bad in ["18446744073709551615", "9223372036854775807", "315360001", "-5"] {
                let e = parse_error(&[flag, bad]);
                assert!(
                    e.contains("is not a whole number from 0 to 315360000"),
                    "{flag} {bad}: {e}"
                );
                assert!(!e.contains("-- -5"), "{flag} {bad}: no clap tip: {e}");
            }
            let ok = Cli::try_parse_from(["imagecachefs", "mount", "/x", flag, &max]);
            assert!(ok.is_ok(), "{flag} {max} is accepted");
        }
        assert!(parse_error(&["--verify-rate", "1048577"]).contains("from 0 to 1048576"));
        assert!(parse_error(&["--threads", "65"]).contains("from 1 to 64"));
        assert!(parse_error(&["--threads", "-1"]).contains("from 1 to 64"));
        assert!(parse_error(&["--min-free", "-5%"]).contains("from 0 up to (not including) 100"));
        assert!(parse_error(&["--min-free", "200%"]).contains("from 0 up to (not including) 100"));
        assert!(parse_error(&["--min-free", "-5"]).contains("is not a size"));
    }

    #[test]
    fn a_missing_instances_dir_is_refused() {
        let cli = Cli::try_parse_from([
            "imagecachefs",
            "mount",
            "/x",
            "--instances-dir",
            "/nonexistent-icfs-instances",
        ])
        .unwrap();
        let Command::Mount(m) = cli.command else { panic!("not mount") };
        let e = m.into_config().unwrap_err();
        assert_eq!(e, "/nonexistent-icfs-instances (--instances-dir) does not exist");
    }

    #[test]
    fn bad_thread_count_is_a_usage_error() {
        assert!(Cli::try_parse_from(["imagecachefs", "mount", "/x", "--threads", "0"]).is_err());
    }
}
