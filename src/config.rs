//! Plain configuration values, built by `cli.rs` (the only module that knows clap).

use std::path::PathBuf;

use crate::state::Policy;

/// The largest age, interval or quarantine accepted (flag, `nova.conf`, fstab option): ten
/// years of seconds. Larger values mean "never" in practice and only invite overflow.
pub const MAX_SECS: u64 = 10 * 365 * 86_400;

/// The largest `--verify-rate`, MiB/s (1 TiB/s: far above any disk; 0 is unlimited).
pub const MAX_RATE_MIB: u64 = 1 << 20;

/// The largest `--min-free` size in bytes: below 2^63 (what `statfs` sizes can express).
pub const MAX_MIN_FREE_BYTES: u64 = i64::MAX as u64;

/// The default `--shared-quarantine`, seconds: well above an NFSv4 lease (90 s on Linux) and
/// CephFS's session autoclose (300 s), so a host that lost its locks in a short partition is
/// not undercut the moment they lapse.
pub const SHARED_QUARANTINE: u64 = 900;

/// `--threads` range.
pub const THREADS: std::ops::RangeInclusive<u64> = 1..=64;

/// A whole number in `range`, for flags and options; the error is one line naming the range.
pub fn parse_bounded(s: &str, range: std::ops::RangeInclusive<u64>) -> Result<u64, String> {
    let (lo, hi) = (*range.start(), *range.end());
    let t = s.trim();
    let n =
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) { t.parse().ok() } else { None };
    match n {
        Some(n) if range.contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a whole number from {lo} to {hi}")),
    }
}

/// `--node-name`: 1 to 64 of `[A-Za-z0-9._-]`, not `tmp` (the name of the state file's
/// temporary twin without a node).
pub fn parse_node_name(s: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && s != "tmp";
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a node name (1 to 64 letters, digits, '.', '-' or '_')"))
    }
}

/// Seconds: 0 to [`MAX_SECS`].
pub fn parse_secs(s: &str) -> Result<u64, String> {
    parse_bounded(s, 0..=MAX_SECS)
}

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
            return if (0.0..100.0).contains(&v) {
                // `-0` is 0 (adding 0.0 turns the negative zero into the positive one).
                Ok(MinFree::Percent(v + 0.0))
            } else {
                Err(format!("{s:?} is not a percentage from 0 up to (not including) 100"))
            };
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
        match n.checked_mul(mult) {
            Some(b) if b <= MAX_MIN_FREE_BYTES => Ok(MinFree::Bytes(b)),
            _ => Err(format!("{s:?} is more than the largest size, {MAX_MIN_FREE_BYTES} bytes")),
        }
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
    /// Only check the configuration and print it; mount nothing (`mount --check`).
    pub check: bool,
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
    /// `--shared-quarantine`, seconds (used with `--shared`, i.e. `policy.coordinated`).
    pub shared_quarantine: u64,
    /// `--node-name`: this host's name for its state file on shared storage.
    pub node_name: Option<String>,
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
            ("storage".into(), if p.shared.is_some() { "shared" } else { "local" }.into()),
            ("shared".into(), if p.coordinated { "on" } else { "off" }.into()),
            ("shared_quarantine".into(), self.shared_quarantine.to_string()),
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
        let Ok(MinFree::Percent(zero)) = MinFree::parse("-0%") else { panic!("-0% is 0%") };
        assert!(zero.is_sign_positive(), "shown as 0%, not -0%");
        assert_eq!(MinFree::parse("15%"), Ok(MinFree::Percent(15.0)));
        for bad in ["", "G", "12X", "-1", "100%", "200%", "-5%", "nan%", "inf%", "abc%", "8388608T"]
        {
            assert!(MinFree::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            MinFree::parse(&MAX_MIN_FREE_BYTES.to_string()),
            Ok(MinFree::Bytes(MAX_MIN_FREE_BYTES))
        );
        assert!(MinFree::parse(&(MAX_MIN_FREE_BYTES + 1).to_string()).is_err());
        assert_eq!(MinFree::Percent(10.0).bytes(1000), 100);
    }

    #[test]
    fn bounded_numbers_name_their_range() {
        assert_eq!(parse_secs("0"), Ok(0));
        assert_eq!(parse_secs(&MAX_SECS.to_string()), Ok(MAX_SECS));
        for bad in [
            "",
            "-5",
            "+5",
            "1e3",
            "x",
            "315360001",
            "18446744073709551615",
            "99999999999999999999",
        ] {
            let e = parse_secs(bad).unwrap_err();
            assert!(e.contains("from 0 to 315360000") && !e.contains('\n'), "{bad}: {e}");
        }
        assert_eq!(parse_bounded("64", THREADS), Ok(64));
        assert!(parse_bounded("0", THREADS).is_err());
    }
}
