//! The instance disks' backing-file names (`guard::backing_names`), read on a thread of their
//! own. The instances directory may sit on a filesystem that hangs (a dead NFS server, a
//! stopped FUSE daemon): no FUSE worker and no holder of a lock ever reads it itself. An
//! eviction asks for a read begun after it took Nova's lock and waits a bounded time for it
//! (no answer: the file stays); a status file shows the last names read and asks for a fresh
//! read when they are old, waiting a moment at most. While the thread is stuck in a read,
//! evictions are refused and status files show the names read before.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sync::{Condvar, Mutex};

/// One read of every instance disk: its sequence number, when it ended, and the names (or
/// why they could not all be read).
#[derive(Clone, Debug)]
pub struct Read {
    pub seq: u64,
    pub at: Instant,
    pub names: Result<Arc<BTreeSet<OsString>>, String>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Reads asked for, and finished (`done` reached `asked`: the thread is idle).
    asked: u64,
    done: u64,
    /// When the read under way (if any) was asked for.
    since: Option<Instant>,
    last: Option<Read>,
    closed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    inner: Mutex<Inner>,
    changed: Condvar,
}

/// The reader thread's handle; dropping it ends the thread (after a read under way).
#[derive(Debug)]
pub struct Disks {
    shared: Arc<Shared>,
}

impl Disks {
    /// Starts the thread that reads the disks under `instances` for names in `cache_dir`.
    pub fn spawn(instances: PathBuf, cache_dir: PathBuf) -> Self {
        // A failure is logged when it starts or changes, not at every read.
        let last = std::sync::Mutex::new(String::new());
        Self::spawn_with(move || {
            let read = crate::guard::backing_names(&instances, &cache_dir);
            let now = read.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            if *last != now {
                match &read {
                    Err(e) => {
                        log::warn!("reading instance disks under {}: {e}", instances.display())
                    }
                    Ok(_) => {
                        log::info!("instance disks under {} readable again", instances.display())
                    }
                }
                *last = now;
            }
            read
        })
    }

    /// The same with any reading function (tests give one that hangs).
    pub fn spawn_with(
        read: impl Fn() -> std::io::Result<BTreeSet<OsString>> + Send + 'static,
    ) -> Self {
        let shared = Arc::new(Shared::default());
        let me = shared.clone();
        std::thread::Builder::new()
            .name("disks".into())
            .spawn(move || loop {
                let seq = {
                    let mut g = me.inner.lock();
                    while !g.closed && g.asked == g.done {
                        me.changed.wait(&mut g);
                    }
                    if g.closed {
                        return;
                    }
                    g.asked
                };
                let names = read().map(Arc::new).map_err(|e| e.to_string());
                let mut g = me.inner.lock();
                g.done = seq;
                g.last = Some(Read { seq, at: Instant::now(), names });
                me.changed.notify_all();
            })
            .expect("spawn the instance disk reader");
        Disks { shared }
    }

    /// Asks for a read; returns the sequence number it will have.
    fn ask(&self, g: &mut Inner) -> u64 {
        if g.asked == g.done {
            g.asked += 1;
            g.since = Some(Instant::now());
            self.shared.changed.notify_all();
        }
        g.asked
    }

    /// Names from a read begun after this call, waited for at most `timeout`.
    pub fn fresh(&self, timeout: Duration) -> Result<Arc<BTreeSet<OsString>>, String> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.inner.lock();
        // A read under way began before this call: the one after it is needed.
        let want = if g.asked == g.done { self.ask(&mut g) } else { g.asked + 1 };
        while g.done < want {
            if g.asked == g.done {
                self.ask(&mut g);
            }
            if self.shared.changed.wait_until(&mut g, deadline).timed_out() && g.done < want {
                return Err(format!(
                    "the instance disks did not answer within {} s (a hung filesystem?)",
                    timeout.as_secs()
                ));
            }
        }
        g.last.as_ref().map(|r| r.names.clone()).unwrap_or_else(|| Err("no read".into()))
    }

    /// The last read, or a new one if it is older than `max_age` (waiting at most `wait` for
    /// it; past that the older read, or `None` if there never was one).
    pub fn recent(&self, max_age: Duration, wait: Duration) -> Option<Read> {
        let mut g = self.shared.inner.lock();
        if g.last.as_ref().is_some_and(|r| r.at.elapsed() < max_age) {
            return g.last.clone();
        }
        let want = self.ask(&mut g);
        // A read asked for earlier has had its wait already: a filesystem that hangs costs
        // each status file nothing more, not `wait` again and again.
        let now = Instant::now();
        let deadline = match (g.since, now.checked_sub(wait)) {
            (Some(asked), Some(floor)) => asked.max(floor) + wait,
            _ => now + wait,
        };
        while g.done < want {
            if self.shared.changed.wait_until(&mut g, deadline).timed_out() {
                break;
            }
        }
        g.last.clone()
    }

    /// The names of the last read, if it succeeded (no read is asked for).
    pub fn last_names(&self) -> Option<Arc<BTreeSet<OsString>>> {
        self.shared.inner.lock().last.as_ref().and_then(|r| r.names.clone().ok())
    }

    /// The sequence number of the last read (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.shared.inner.lock().last.as_ref().map_or(0, |r| r.seq)
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        self.shared.inner.lock().closed = true;
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_come_after_the_ask_and_a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let instances = dir.path().join("instances");
        std::fs::create_dir_all(instances.join("_base")).unwrap();
        let disks = Disks::spawn(instances.clone(), instances.join("_base"));
        assert_eq!(disks.last_seq(), 0);
        let names = disks.fresh(Duration::from_secs(10)).expect("an empty instances directory");
        assert!(names.is_empty());
        let first = disks.last_seq();
        disks.fresh(Duration::from_secs(10)).unwrap();
        assert!(disks.last_seq() > first, "each eviction gets a read of its own");
        let recent = disks.recent(Duration::from_secs(60), Duration::ZERO).unwrap();
        assert_eq!(recent.seq, disks.last_seq(), "a recent read is reused");
        std::fs::remove_dir_all(&instances).unwrap();
        assert!(disks.fresh(Duration::from_secs(10)).is_err(), "unreadable: unknown, not empty");
    }

    #[test]
    fn a_hung_read_costs_status_files_one_wait_in_all() {
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let blocked = std::sync::Mutex::new(blocked);
        let disks = Disks::spawn_with(move || {
            let _ = blocked.lock().unwrap().recv();
            Ok(BTreeSet::new())
        });
        let started = Instant::now();
        for _ in 0..20 {
            assert!(disks.recent(Duration::ZERO, Duration::from_millis(200)).is_none());
        }
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        release.send(()).unwrap();
    }

    #[test]
    fn a_read_that_does_not_answer_times_out() {
        // A read that blocks until released, as one on a hung filesystem would.
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let blocked = std::sync::Mutex::new(blocked);
        let disks = Disks::spawn_with(move || {
            let _ = blocked.lock().unwrap().recv();
            Ok(BTreeSet::from([OsString::from("base")]))
        });
        let started = Instant::now();
        let got = disks.fresh(Duration::from_millis(300));
        assert!(got.is_err(), "{got:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(disks.recent(Duration::ZERO, Duration::from_millis(50)).is_none());
        release.send(()).unwrap();
        let read =
            disks.recent(Duration::from_secs(60), Duration::from_secs(10)).expect("answered");
        assert!(read.names.unwrap().contains(&OsString::from("base")));
        drop(release);
    }
}
