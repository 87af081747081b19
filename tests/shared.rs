//! `--shared` on a real mount. OFD locks work on the local scratch filesystem, so one daemon
//! over `<tmp>/instances/_base` with `--storage shared --shared` stands for one host, and
//! this test process, taking OFD locks on the covered lock files through the bind mount made
//! before the overlay, stands for "another host". (Two hosts over a real cluster filesystem
//! are the end-to-end tests' business.) Every wait has a deadline, every loop a bound.

mod common;
mod nova;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::{bin, run, wait_until};
use nova::*;

/// The quarantine the daemons here run with, seconds.
const QUARANTINE: u64 = 3;

const LOCK_DIR: &str = ".imagecachefs.locks";

/// This host's name for its state file in the tests that set it.
const NODE: &str = "test-node-a";

fn shared_mount(n: &Nova) -> common::Mount {
    n.mount(
        ("1", "1", "1"),
        &[
            "--storage",
            "shared",
            "--shared",
            "--shared-quarantine",
            &QUARANTINE.to_string(),
            "--node-name",
            NODE,
        ],
    )
}

/// `name`'s lock file, in the covered directory.
fn lock_path(n: &Nova, name: &str) -> PathBuf {
    n.covered.target.join(LOCK_DIR).join(name)
}

fn flock(kind: i32) -> libc::flock {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_len = 1;
    fl
}

/// "Another host": a shared OFD lock on byte 0 of `path`, held while the file stays open.
fn hold_shared(path: &Path) -> File {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .unwrap();
    let fl = flock(libc::F_RDLCK);
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    assert_eq!(rc, 0, "OFD shared lock on {path:?}: {}", std::io::Error::last_os_error());
    f
}

/// The lock type someone else holds on byte 0 of `path` (`F_UNLCK`: none; `None`: no file).
fn lock_held(path: &Path) -> Option<i32> {
    let f = File::open(path).ok()?;
    let mut fl = flock(libc::F_WRLCK);
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(rc, 0, "F_OFD_GETLK on {path:?}: {}", std::io::Error::last_os_error());
    Some(fl.l_type as i32)
}

fn metric(n: &Nova, line_prefix: &str) -> u64 {
    let text = fs::read_to_string(n.dir.join(".imagecache/metrics")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_prefix} in metrics:\n{text}"))
}

/// Another host's shared lock keeps a file past its deadline; once it is released, the file
/// goes only after the quarantine, and its lock file with it. A file nobody locks goes after
/// the quarantine too, never before.
#[test]
fn another_hosts_lock_keeps_a_file_until_released_and_quarantined() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(4096, 1));
    write_file(&n.at(H2), &pseudo_random(4096, 2));
    let other = hold_shared(&lock_path(&n, H1));
    let mounted = Instant::now();
    let m = shared_mount(&n);
    let q = Duration::from_secs(QUARANTINE);

    // H2: nobody holds it, yet it waits out the quarantine.
    let gone = n.wait_evicted(H2, q * 10);
    assert!(
        gone.duration_since(mounted) >= q,
        "{H2} was evicted {:?} after the mount, inside the {q:?} quarantine\n{}",
        gone.duration_since(mounted),
        m.log_text()
    );
    assert!(lock_held(&lock_path(&n, H2)).is_none(), "its lock file went with it");

    // H1: held by "another host".
    wait_until(Duration::from_secs(10), "other_node_holds: yes", || {
        (n.field(H1, "other_node_holds") == "yes").then_some(())
    });
    assert_eq!(n.field(H1, "quarantine_ends"), "-");
    assert!(n.field(H1, "storage").starts_with("shared "), "{}", n.status(H1).unwrap());
    n.stays(&m, H1, q * 2, "another host holds its lock");
    wait_until(Duration::from_secs(10), "a cross-host refusal counted", || {
        (metric(&n, "imagecachefs_shared_refusals_total{reason=\"other_host\"}") > 0).then_some(())
    });
    assert!(n.has_event("eviction-refused"), "{}", n.events());

    drop(other);
    let released = Instant::now();
    let gone = n.wait_evicted(H1, q * 10);
    assert!(
        gone.duration_since(released) >= q,
        "{H1} was evicted {:?} after the other host released it, inside the quarantine\n{}",
        gone.duration_since(released),
        m.log_text()
    );
    n.assert_fully_evicted(H1);
    assert!(lock_held(&lock_path(&n, H1)).is_none(), "its lock file went with it");
    // The state file is this host's own.
    wait_until(Duration::from_secs(10), "this host's state file", || {
        n.real(&format!(".imagecachefs.state.{NODE}")).is_file().then_some(())
    });
    let own: Vec<String> = fs::read_dir(&n.covered.target)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".imagecachefs.state"))
        .collect();
    assert!(!own.iter().any(|n| n == ".imagecachefs.state"), "{own:?}");
}

/// What this host uses, it holds a shared lock on, which another host sees: an open handle
/// through the mount, and a stopped instance's disk naming the file as its backing file. The
/// last release stamps the lock file's mtime (the last use, for every host). The lock
/// directory is hidden from the mount like the daemon's other files.
#[test]
fn what_this_host_uses_it_holds_a_shared_lock_on() {
    common::require_tool("qemu-img");
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(4096, 1));
    write_file(&n.at(H3), &pseudo_random(65536, 3));
    // A stopped instance whose disk has H3 as backing file.
    common::overlay(&n.instances.join(INSTANCE).join("disk"), &n.at(H3));
    let m = n.mount(
        (LONG, LONG, LONG),
        &["--storage", "shared", "--shared", "--shared-quarantine", &QUARANTINE.to_string()],
    );

    wait_until(Duration::from_secs(15), "the stopped instance's base locked", || {
        (lock_held(&lock_path(&n, H3)) == Some(libc::F_RDLCK)).then_some(())
    });
    let reader = File::open(n.at(H1)).unwrap();
    // Taken before the open was answered.
    assert_eq!(lock_held(&lock_path(&n, H1)), Some(libc::F_RDLCK), "{}", m.log_text());
    assert_eq!(n.field(H1, "state"), "in-use");
    // This host's own lock is not another host's; a second holder is.
    wait_until(Duration::from_secs(10), "other_node_holds: no", || {
        (n.field(H1, "other_node_holds") == "no").then_some(())
    });
    let other = hold_shared(&lock_path(&n, H1));
    wait_until(Duration::from_secs(10), "other_node_holds: yes", || {
        (n.field(H1, "other_node_holds") == "yes").then_some(())
    });
    drop(other);
    let before_close = SystemTime::now() - Duration::from_secs(1);
    drop(reader);
    wait_until(Duration::from_secs(10), "the lock released at the last close", || {
        (lock_held(&lock_path(&n, H1)) == Some(libc::F_UNLCK)).then_some(())
    });
    let mtime = fs::metadata(lock_path(&n, H1)).unwrap().modified().unwrap();
    assert!(mtime >= before_close, "the release stamps the last use: {mtime:?}");
    assert_eq!(lock_held(&lock_path(&n, H3)), Some(libc::F_RDLCK), "still referenced");

    // Hidden: not listed, not found, not creatable through the mount.
    let listed: Vec<String> = fs::read_dir(&n.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!listed.iter().any(|l| l.starts_with(".imagecachefs")), "{listed:?}");
    assert_eq!(errno(fs::metadata(n.dir.join(LOCK_DIR))), Some(libc::ENOENT));
    drop(m);
}

/// `--shared` where no other host can share the directory (local storage, not overridden)
/// is refused with one line, and nothing is mounted.
#[test]
fn shared_on_local_storage_is_refused() {
    let n = Nova::new();
    let (code, _, err) =
        run(Command::new(bin()).arg("mount").arg(&n.dir).args(["--check", "--shared"]));
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--shared") && err.contains("local storage"), "{err}");
    let (code, _, err) = common::run_timeout(
        Command::new(bin()).arg("mount").arg(&n.dir).arg("--shared"),
        Duration::from_secs(20),
    );
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("local storage"), "{err}");
    assert!(!common::is_fuse(&n.dir), "nothing is mounted");
    assert!(!n.covered.target.join(LOCK_DIR).exists(), "nothing is created");
}

/// The `/etc/fstab` helper turns `shared` and `shared_quarantine=SECS` into the flags.
#[test]
fn the_fstab_helper_takes_the_shared_options() {
    let n = Nova::new();
    let helper =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-scripts/mount.fuse.imagecachefs");
    let dir = n.dir.to_str().unwrap();
    let (code, _, err) = common::run_timeout(
        Command::new(&helper)
            .args([dir, dir, "-f", "-o", "shared,shared_quarantine=60"])
            .env("IMAGECACHEFS_BIN", bin()),
        Duration::from_secs(10),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(" --shared --shared-quarantine 60"), "{err}");
    let (code, _, err) = common::run_timeout(
        Command::new(&helper)
            .args([dir, dir, "-f", "-o", "shared=yes"])
            .env("IMAGECACHEFS_BIN", bin()),
        Duration::from_secs(10),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("option shared takes no value"), "{err}");
    assert!(!common::is_fuse(&n.dir));
}

// ---------------------------------------------------------------------------------------------
// The evictor over an injected lock backend (no mount: `Cache` over a plain directory, a
// manual clock, `evict::run_once` called directly).

mod core {
    use std::ffi::{CString, OsStr};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use imagecachefs::cache::{Cache, Settings, VFile};
    use imagecachefs::clock::{from_unix_secs, ManualClock};
    use imagecachefs::evict;
    use imagecachefs::procfs::ProcRoot;
    use imagecachefs::shared::fake::Cluster;
    use imagecachefs::state::Policy;

    use crate::common::wait_until;
    use crate::nova::H1;

    const Q: u64 = 900;
    /// How long an eviction waits for the lock keeper here.
    const TIMEOUT: Duration = Duration::from_millis(300);

    struct World {
        tmp: tempfile::TempDir,
        clock: Arc<ManualClock>,
        cache: Arc<Cache>,
        cluster: Cluster,
    }

    impl World {
        /// One cache file, idle since the start; this host is the cluster's host 0.
        fn new() -> Self {
            let tmp = tempfile::Builder::new().prefix("icfs-test-shared").tempdir().unwrap();
            let base = tmp.path().join("instances/_base");
            std::fs::create_dir_all(&base).unwrap();
            std::fs::create_dir_all(tmp.path().join("proc")).unwrap();
            let start = from_unix_secs(1_800_000_000);
            std::fs::write(base.join(H1), b"base image").unwrap();
            let f = std::fs::File::options().write(true).open(base.join(H1)).unwrap();
            f.set_modified(start).unwrap();
            let clock = ManualClock::new(start);
            let c = CString::new(base.as_os_str().as_bytes()).unwrap();
            let fd = unsafe {
                libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            };
            assert!(fd >= 0);
            let policy = Policy {
                original_min_age: 10,
                shared: Some("test".into()),
                coordinated: true,
                ..Policy::default()
            };
            let settings = Settings {
                cache_dir: base.clone(),
                instances_dir: tmp.path().join("instances"),
                min_free: None,
                pressure_min_age: 600,
                verify_interval: 86_400,
                verify_rate_mib: 0,
                own_dev: None,
            };
            let cache = Cache::open(
                unsafe { OwnedFd::from_raw_fd(fd) },
                policy,
                clock.clone(),
                ProcRoot(tmp.path().join("proc")),
                settings,
                Vec::new(),
            )
            .unwrap();
            let mut cluster = Cluster::new(start);
            let backend = cluster.backend();
            imagecachefs::shared::start_with(&cache, Duration::from_secs(Q), backend, TIMEOUT)
                .unwrap();
            World { tmp, clock, cache, cluster }
        }

        fn exists(&self) -> bool {
            self.tmp.path().join("instances/_base").join(H1).exists()
        }

        fn advance(&self, secs: u64) {
            self.clock.advance(Duration::from_secs(secs));
        }

        /// Schedules the file now and runs one eviction step.
        fn try_now(&self) -> usize {
            self.cache.schedule(self.cache.ino_of(OsStr::new(H1)).unwrap());
            evict::run_once(&self.cache)
        }

        fn last_refusal(&self) -> String {
            let ev = String::from_utf8(self.cache.render(VFile::Events)).unwrap();
            ev.lines().rfind(|l| l.contains("eviction-refused")).unwrap_or_default().to_string()
        }

        fn metric(&self, prefix: &str) -> u64 {
            let text = String::from_utf8(self.cache.render(VFile::Metrics)).unwrap();
            text.lines().find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok()).unwrap()
        }
    }

    /// The first sighting starts the quarantine; every lock error, a stall past the timeout
    /// and an error right after the exclusive lock keep the file (and leave no lock behind);
    /// another host's lock keeps it and starts the quarantine again; then it goes.
    #[test]
    fn the_evictor_never_deletes_on_a_lock_error() {
        let w = World::new();
        w.advance(20);
        assert_eq!(w.try_now(), 0);
        assert!(w.exists());
        assert!(w.last_refusal().contains("free of locks for less than"), "{}", w.last_refusal());
        w.advance(Q);
        let faults = w.cluster.faults[0].clone();
        for e in [libc::ENOLCK, libc::EIO, libc::ESTALE, libc::EINTR] {
            faults.lock().exclusive = Some(e);
            assert_eq!(w.try_now(), 0, "errno {e}");
            assert!(w.exists(), "evicted on errno {e}");
            assert!(w.last_refusal().contains("could not be checked"), "{}", w.last_refusal());
        }
        faults.lock().exclusive = None;
        faults.lock().stat = Some(libc::EIO);
        assert_eq!(w.try_now(), 0);
        assert!(w.exists() && !w.cluster.exclusive_held(H1), "EIO after the exclusive lock");
        faults.lock().stat = None;
        // A lock call that hangs past the timeout: unknown; the late lock is released.
        faults.lock().stall = Some(TIMEOUT * 3);
        let asked = Instant::now();
        assert_eq!(w.try_now(), 0);
        assert!(asked.elapsed() < TIMEOUT * 3, "the evictor waits no longer than its timeout");
        assert!(w.exists());
        faults.lock().stall = None;
        assert!(w.metric("imagecachefs_shared_refusals_total{reason=\"unknown\"}") >= 6);

        // Another host holds it: refused (once the stalled call has ended), and its
        // quarantine starts again from here.
        let mut other = w.cluster.host_with(Duration::from_secs(Q));
        other.sync(&[H1.into()].into());
        wait_until(Duration::from_secs(10), "a refusal for the other host's lock", || {
            (w.try_now() == 0 && w.last_refusal().contains("another host uses it")).then_some(())
        });
        assert!(w.exists() && !w.cluster.exclusive_held(H1), "no exclusive lock left behind");
        other.sync(&Default::default());
        w.advance(1);
        assert_eq!(w.try_now(), 0, "free again, but only just");
        w.advance(Q);
        assert_eq!(w.try_now(), 1, "free for the whole quarantine:\n{}", w.last_refusal());
        assert!(!w.exists());
        wait_until(Duration::from_secs(10), "its lock file removed and unlocked", || {
            let gone = !w.cluster.table.lock().files.contains_key(OsStr::new(H1));
            (gone && !w.cluster.exclusive_held(H1)).then_some(())
        });
    }

    /// A shared lock that cannot be taken does not fail the open (a VM must start): it is an
    /// alarm (`imagecachefs_shared_unprotected_files`), and the next open takes it.
    #[test]
    fn a_lock_that_cannot_be_taken_is_an_alarm_not_a_failed_open() {
        let w = World::new();
        let ino = w.cache.ino_of(OsStr::new(H1)).unwrap();
        let me = std::process::id();
        let faults = w.cluster.faults[0].clone();
        faults.lock().share = Some(libc::ENOLCK);
        assert!(w.cache.opened(ino, 1, me, false), "the open goes ahead");
        wait_until(Duration::from_secs(10), "the alarm", || {
            (w.metric("imagecachefs_shared_unprotected_files") == 1).then_some(())
        });
        assert!(w.metric("imagecachefs_shared_lock_errors_total") > 0);
        faults.lock().share = None;
        assert!(w.cache.opened(ino, 2, me, false));
        wait_until(Duration::from_secs(10), "the alarm over", || {
            (w.metric("imagecachefs_shared_unprotected_files") == 0).then_some(())
        });
        w.cache.released(1, None);
        w.cache.released(2, None);
    }

    /// The first open of a file waits for this host's shared lock; one that finds another
    /// host evicting the file (its exclusive lock) waits for the eviction to end and then
    /// misses the file (`ENOENT`, a cache miss), never opens a file about to be deleted.
    #[test]
    fn an_open_takes_its_lock_first_and_misses_a_file_another_host_evicted() {
        let w = World::new();
        let ino = w.cache.ino_of(OsStr::new(H1)).unwrap();
        let me = std::process::id();
        assert!(w.cache.opened(ino, 1, me, false));
        let held_here = |w: &World| {
            w.cluster
                .table
                .lock()
                .locks
                .get(OsStr::new(H1))
                .is_some_and(|l| l.contains(&(0, false)))
        };
        assert!(held_here(&w), "held when the open is answered");
        w.cache.released(1, None);
        wait_until(Duration::from_secs(10), "the lock released", || (!held_here(&w)).then_some(()));

        // Another host, free of locks for its quarantine, takes the exclusive lock.
        let mut other = w.cluster.host_with(Duration::from_secs(Q));
        let t0 = from_unix_secs(1_900_000_000);
        other.sweep(&[H1.into()], t0);
        let go = other.gate(OsStr::new(H1), t0 + Duration::from_secs(Q));
        assert!(matches!(go, imagecachefs::shared::Gate::Go { .. }), "{go:?}");
        let faults = w.cluster.faults[0].clone();
        let before = faults.lock().shares;
        let path = w.tmp.path().join("instances/_base").join(H1);
        let evictor = std::thread::spawn(move || {
            // Once this host's open is waiting for its lock: delete, drop the lock.
            wait_until(Duration::from_secs(10), "the open waiting", || {
                (faults.lock().shares > before + 1).then_some(())
            });
            std::fs::remove_file(&path).unwrap();
            other.finish(OsStr::new(H1), true);
        });
        assert!(!w.cache.opened(ino, 2, me, false), "opened a file another host evicted");
        evictor.join().unwrap();
        assert!(!w.exists());
        let text = String::from_utf8(w.cache.render(VFile::Image(ino))).unwrap();
        assert!(text.contains("\nrefs: 0\n"), "no reference kept:\n{text}");
    }
}

/// On shared storage a file another host already hashed (its state file records the same
/// inode, size and mtime) takes that host's SHA-1 and verdict instead of being read again;
/// nothing else of that host's record (its pin) is taken.
#[test]
fn a_checksum_another_host_recorded_is_taken_for_the_same_content() {
    use std::os::unix::fs::MetadataExt;
    let n = Nova::new();
    let data = pseudo_random(65536, 7);
    write_file(&n.at(H1), &data);
    let meta = fs::metadata(n.real(H1)).unwrap();
    let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
    let sha1 = {
        let (code, out, err) = run(Command::new("sha1sum").arg(n.real(H1)));
        assert_eq!(code, 0, "sha1sum: {err}");
        out.split_whitespace().next().unwrap().to_string()
    };
    let hex_name: String = H1.bytes().map(|b| format!("{b:02x}")).collect();
    // Verified by the other host at 1800000000 (2027-01-15T08:00:00Z), and pinned there.
    let record = format!(
        "imagecachefs-state 2\n{hex_name}\t1700000000\t1\t{sha1}\t1700000000\tok\t1800000000\t{}\t{}\t{mtime_ns}\n",
        meta.ino(),
        meta.len()
    );
    fs::write(n.real(".imagecachefs.state.otherhost"), record).unwrap();
    let _m = n.mount((LONG, LONG, LONG), &["--storage", "shared"]);
    assert_eq!(n.field(H1, "sha1"), sha1);
    assert_eq!(n.field(H1, "verified"), "ok 2027-01-15T08:00:00Z", "taken, not hashed again");
    assert_eq!(n.field(H1, "state"), "idle", "the other host's pin is its own");
}

/// An open through the mount that meets "another host" evicting the file (its exclusive lock
/// on the lock file) waits for the eviction to end and then gets `ENOENT`: it never opens a
/// file that is being deleted.
#[test]
fn an_open_during_another_hosts_eviction_misses_the_file() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(4096, 1));
    let m = n.mount(
        (LONG, LONG, LONG),
        &["--storage", "shared", "--shared", "--shared-quarantine", &QUARANTINE.to_string()],
    );
    // The other host's eviction: its exclusive lock first.
    let lock = lock_path(&n, H1);
    let evicting = exclusive(&lock);
    let path = n.at(H1);
    let opener =
        std::thread::spawn(move || File::open(path).map(drop).map_err(|e| e.raw_os_error()));
    // The open is registered and waits for its lock.
    wait_until(Duration::from_secs(10), "the open waiting", || {
        (n.field(H1, "refs") == "1").then_some(())
    });
    // The other host deletes the file and its lock file, then lets go.
    fs::remove_file(n.real(H1)).unwrap();
    fs::remove_file(&lock).unwrap();
    drop(evicting);
    let opened = opener.join().unwrap();
    assert_eq!(opened, Err(Some(libc::ENOENT)), "{}", m.log_text());
}

/// An eviction on "another host" that holds its exclusive lock longer than an open waits
/// (a slow storage, a loaded host): the open is answered `ENOENT`, never handed a file that
/// host is deleting; once the lock is gone the file opens again.
#[test]
fn an_open_that_outwaits_another_hosts_eviction_lock_is_not_handed_the_file() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(4096, 2));
    let m = n.mount(
        (LONG, LONG, LONG),
        &["--storage", "shared", "--shared", "--shared-quarantine", &QUARANTINE.to_string()],
    );
    let lock = lock_path(&n, H1);
    let evicting = exclusive(&lock);
    // The file stays on disk the whole time: only the other host's lock says it is going.
    let opened = File::open(n.at(H1)).map(drop).map_err(|e| e.raw_os_error());
    assert_eq!(opened, Err(Some(libc::ENOENT)), "{}", m.log_text());
    assert!(m.log_text().contains("another host is evicting it"), "{}", m.log_text());
    assert_eq!(n.field(H1, "refs"), "0", "the refused open holds no reference");
    drop(evicting);
    wait_until(Duration::from_secs(10), "the file opening again", || File::open(n.at(H1)).ok());
}

/// "Another host"'s eviction lock: an exclusive OFD lock on `lock` (created if missing), held
/// until the file is dropped.
fn exclusive(lock: &std::path::Path) -> File {
    let f =
        OpenOptions::new().read(true).write(true).create(true).truncate(false).open(lock).unwrap();
    let fl = flock(libc::F_WRLCK);
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    assert_eq!(rc, 0, "exclusive lock: {}", std::io::Error::last_os_error());
    f
}
