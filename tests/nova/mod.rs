//! Shared by `tests/eviction.rs` and `tests/checksums.rs`: a Nova-shaped scratch tree
//! (`<tmp>/instances/_base` mounted, `<tmp>/instances/locks`, a bind mount of the covered files
//! at `<tmp>/covered` made before the overlay, `<tmp>/elsewhere` outside the instances
//! directory), readers of the status tree, and test data. Background processes are
//! `common::Proc`s.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{self, run, splitmix64, wait_until, BindMount, Mount, Scratch};

/// Cache file names as Nova makes them (40 hex characters: originals).
pub const H1: &str = "0d5e6b61602d758984b3bf038267614d6016eb2a";
pub const H2: &str = "a94a8fe5ccb19ba61c4c0873d391e987982fbbd3";
pub const H3: &str = "356a192b7913b04c54577c3e5ed8aa2de7e1bc17";
pub const H4: &str = "da4b9237bacccdf19c0760cab7aec4a8359010b0";
pub const INSTANCE: &str = "7d9a4a3e-0000-4000-8000-00000000002a";
/// A long time: files of kinds with this threshold never go by age during a test.
pub const LONG: &str = "3600";

// ---------------------------------------------------------------------------------------------
// Harness

/// `<tmp>/instances/_base` with its bind mount; drop order: bind mount, then the scratch tree.
pub struct Nova {
    pub covered: BindMount,
    pub s: Scratch,
    pub instances: PathBuf,
    pub dir: PathBuf,
}

impl Nova {
    pub fn new() -> Self {
        let s = Scratch::new();
        let instances = s.path("instances");
        let dir = instances.join("_base");
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(instances.join("locks")).unwrap();
        fs::create_dir_all(s.path("elsewhere")).unwrap();
        let covered = BindMount::new(&dir, &s.path("covered"));
        Nova { covered, s, instances, dir }
    }

    /// Mounts over `_base` with thresholds `(original, resized, partial)` and extra flags.
    pub fn mount(&self, ages: (&str, &str, &str), extra: &[&str]) -> Mount {
        let mut args = vec![
            "--original-min-age",
            ages.0,
            "--resized-min-age",
            ages.1,
            "--partial-min-age",
            ages.2,
        ];
        args.extend_from_slice(extra);
        Mount::new(&self.dir, &args)
    }

    /// A file as seen through the mount.
    pub fn at(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The same file in the covered directory (the real file).
    pub fn real(&self, name: &str) -> PathBuf {
        self.covered.target.join(name)
    }

    pub fn elsewhere(&self, rel: &str) -> PathBuf {
        self.s.path("elsewhere").join(rel)
    }

    pub fn lock_file(&self, name: &str) -> PathBuf {
        self.instances.join("locks").join(format!("nova-{name}"))
    }

    /// `DIR/.imagecache/images/NAME`, or `None` when it cannot be read (no such file).
    pub fn status(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.dir.join(".imagecache/images").join(name)).ok()
    }

    /// One `key: value` of `images/NAME`; panics (with the text) when the file or key is missing.
    pub fn field(&self, name: &str, key: &str) -> String {
        let text = self
            .status(name)
            .unwrap_or_else(|| panic!("no status file for {name}; events:\n{}", self.events()));
        field(&text, key).unwrap_or_else(|| panic!("no `{key}:` in images/{name}:\n{text}"))
    }

    pub fn events(&self) -> String {
        fs::read_to_string(self.dir.join(".imagecache/events")).unwrap_or_default()
    }

    /// Whether `events` has a line whose text after the timestamp starts with `prefix`.
    pub fn has_event(&self, prefix: &str) -> bool {
        event_lines(&self.events(), prefix) > 0
    }

    /// Whether the real file is gone from the covered directory.
    pub fn gone_from_covered(&self, name: &str) -> bool {
        errno(fs::symlink_metadata(self.real(name))) == Some(libc::ENOENT)
    }

    /// Waits until `name` is evicted (gone from the covered directory); returns when.
    pub fn wait_evicted(&self, name: &str, timeout: Duration) -> Instant {
        wait_until(timeout, &format!("{name} to be evicted"), || {
            self.gone_from_covered(name).then(Instant::now)
        });
        Instant::now()
    }

    /// Checks, over `for_how_long`, that `name` never leaves the mount or the covered
    /// directory; `why` names what keeps it.
    pub fn stays(&self, m: &Mount, name: &str, for_how_long: Duration, why: &str) {
        let end = Instant::now() + for_how_long;
        while Instant::now() < end {
            assert!(
                !self.gone_from_covered(name) && self.real(name).is_file(),
                "{name} was evicted although {why}\nevents:\n{}\ndaemon log:\n{}",
                self.events(),
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(self.at(name).is_file(), "{name} is not visible through the mount ({why})");
    }

    /// After an eviction: `stat` through the mount says `ENOENT` at once (the kernel's dentry
    /// cache was invalidated; its TTL alone would keep the name for a minute), the status file
    /// is gone and so is the real file.
    pub fn assert_fully_evicted(&self, name: &str) {
        let path = self.at(name);
        // The daemon unlinks the real file first, then drops its entry and notifies the
        // kernel: allow those steps 200 ms.
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            let stat = errno(fs::metadata(&path));
            let status = self.status(name);
            if stat == Some(libc::ENOENT) && status.is_none() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is evicted (gone from the covered directory) but 200 ms later stat \
                 through the mount gives {} (the kernel's cached entry was not invalidated?) \
                 and images/{name} is {}",
                describe(stat),
                status.map(|t| format!("still there:\n{t}")).unwrap_or_else(|| "gone".into())
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(errno(File::open(&path)), Some(libc::ENOENT), "open of evicted {name}");
        assert!(self.gone_from_covered(name), "{name} still exists in the covered directory");
        let listed = fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .any(|n| n == name);
        assert!(!listed, "readdir of the mount still lists the evicted {name}");
    }
}

pub fn field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(": ").map(str::to_string))
}

/// How many event lines (timestamp stripped) start with `prefix`.
pub fn event_lines(events: &str, prefix: &str) -> usize {
    events
        .lines()
        .filter(|l| l.split_once(' ').is_some_and(|(_, rest)| rest.starts_with(prefix)))
        .count()
}

pub fn errno<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().map(|e| e.raw_os_error().unwrap_or(-1))
}

pub fn describe(e: Option<i32>) -> String {
    match e {
        None => "success".into(),
        Some(n) => format!("{}", std::io::Error::from_raw_os_error(n)),
    }
}

/// `imagecachefs ARGS...`: (exit code, stdout, stderr).
pub fn icfs(args: &[&str], dir: &Path, name: &str) -> (i32, String, String) {
    run(Command::new(common::bin()).args(args).arg(dir).arg(name))
}

/// `len` pseudo-random bytes (a multiple of 8) from `seed`.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = vec![0u8; len];
    for w in out.chunks_exact_mut(8) {
        w.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    out
}

/// Writes `bytes` to `path` (through the mount) the way Glance's download does: create,
/// chunked writes, fsync, close.
pub fn write_file(path: &Path, bytes: &[u8]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {path:?}: {e}"));
    for chunk in bytes.chunks(256 * 1024) {
        f.write_all(chunk).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
    }
    f.sync_all().unwrap_or_else(|e| panic!("fsync {path:?}: {e}"));
}
