//! Plain configuration values, built by `cli.rs` (the only module that knows clap).

use std::path::PathBuf;

use crate::state::Policy;

/// Free-space target of the disk-pressure eviction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MinFree {
    Bytes(u64),
    /// Percent of the filesystem's size.
    Percent(f64),
}

impl MinFree {
    /// Parses `10G`, `512M`, `1048576`, `15%`.
    pub fn parse(s: &str) -> Result<MinFree, String> {
        let bad =
            || format!("{s:?} is not a size (like 20G, 512M, 1048576) or a percentage (like 10%)");
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| bad())?;
            return if (0.0..100.0).contains(&v) { Ok(MinFree::Percent(v)) } else { Err(bad()) };
        }
        let (num, mult) = match s.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let m: u64 = match c.to_ascii_uppercase() {
                    'K' => 1 << 10,
                    'M' => 1 << 20,
                    'G' => 1 << 30,
                    'T' => 1 << 40,
                    _ => return Err(bad()),
                };
                (&s[..i], m)
            }
            _ => (s, 1),
        };
        let n: u64 = num.trim().parse().map_err(|_| bad())?;
        n.checked_mul(mult).map(MinFree::Bytes).ok_or_else(bad)
    }

    /// Bytes that must stay free on a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

/// Whether the cache directory is on storage other hosts share (`--storage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StorageChoice {
    /// Decided at mount from the filesystem type.
    #[default]
    Detect,
    /// Only this host uses the directory: evict as configured.
    Local,
    /// Other hosts may use the files: evict nothing.
    Shared,
}

/// Options of `imagecachefs mount`, resolved (flags over nova.conf over defaults).
#[derive(Clone, Debug)]
pub struct MountConfig {
    /// The cache directory: both what is served and where it is mounted.
    pub dir: PathBuf,
    /// Return once the mount is live, leaving the daemon running.
    pub background: bool,
    /// FUSE worker threads.
    pub threads: usize,
    /// Ask the kernel for passthrough (off: the daemon serves every read and write).
    pub passthrough: bool,
    /// Append the log here instead of standard error.
    pub log_file: Option<PathBuf>,
    /// Eviction thresholds.
    pub policy: Policy,
    /// Where instance directories are (default: the cache directory's parent).
    pub instances_dir: Option<PathBuf>,
    /// Disk-pressure target, if any.
    pub min_free: Option<MinFree>,
    /// Under pressure, never evict a file idle for less than this (seconds).
    pub pressure_min_age: u64,
    /// Re-verify each file's checksum this often (seconds).
    pub verify_interval: u64,
    /// Verifier read rate limit, MiB/s (0: unlimited).
    pub verify_rate_mib: u64,
    /// The nova.conf the settings were read from, if any.
    pub nova_conf: Option<PathBuf>,
    /// nova.conf's image cache subdirectory name, to check against the mounted directory.
    pub nova_subdirectory: Option<String>,
    /// nova.conf leaves Nova's own cache manager deleting files (`remove_unused_base_images`
    /// is not `False`).
    pub nova_scanner_on: bool,
    /// Local or shared storage, or detect it.
    pub storage: StorageChoice,
}

impl MountConfig {
    /// The effective configuration as `key: value` pairs (the `config` status file).
    pub fn pairs(&self) -> Vec<(String, String)> {
        let p = &self.policy;
        let opt =
            |o: &Option<PathBuf>| o.as_ref().map(|p| p.display().to_string()).unwrap_or("-".into());
        vec![
            ("cache_dir".into(), self.dir.display().to_string()),
            ("instances_dir".into(), opt(&self.instances_dir)),
            ("nova_conf".into(), opt(&self.nova_conf)),
            ("evict".into(), p.evict.to_string()),
            ("original_min_age".into(), p.original_min_age.to_string()),
            ("resized_min_age".into(), p.resized_min_age.to_string()),
            ("partial_min_age".into(), p.partial_min_age.to_string()),
            (
                "min_free".into(),
                match self.min_free {
                    None => "off".into(),
                    Some(MinFree::Bytes(b)) => b.to_string(),
                    Some(MinFree::Percent(v)) => format!("{v}%"),
                },
            ),
            ("pressure_min_age".into(), self.pressure_min_age.to_string()),
            ("verify_interval".into(), self.verify_interval.to_string()),
            ("verify_rate_mib".into(), self.verify_rate_mib.to_string()),
            ("threads".into(), self.threads.to_string()),
            (
                "storage".into(),
                match &p.shared {
                    Some(kind) => format!("shared ({kind}): nothing is evicted"),
                    None => "local".into(),
                },
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_free_parses_sizes_and_percentages() {
        assert_eq!(MinFree::parse("20G"), Ok(MinFree::Bytes(20 << 30)));
        assert_eq!(MinFree::parse("512m"), Ok(MinFree::Bytes(512 << 20)));
        assert_eq!(MinFree::parse("4096"), Ok(MinFree::Bytes(4096)));
        assert_eq!(MinFree::parse("15%"), Ok(MinFree::Percent(15.0)));
        for bad in ["", "G", "12X", "-1", "100%", "abc%"] {
            assert!(MinFree::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(MinFree::Percent(10.0).bytes(1000), 100);
    }
}
