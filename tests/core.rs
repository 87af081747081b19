//! The cache service without a kernel mount: `Cache` over a plain temporary directory, a
//! manual clock, a fake (empty) /proc, and `evict::run_once` / `checksums::run_once` called
//! directly instead of sleeping. Thresholds per kind, pins, guards, Nova's lock,
//! `--no-evict`, disk-pressure order and the state file's survival across restarts.

mod common;

use std::ffi::{CString, OsStr};
use std::fs;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use imagecachefs::cache::{Cache, Settings};
use imagecachefs::clock::{from_unix_secs, ManualClock};
use imagecachefs::config::MinFree;
use imagecachefs::procfs::ProcRoot;
use imagecachefs::state::{Policy, RefEffect};
use imagecachefs::{checksums, evict};

use common::{require_tool, Proc, LOCKER};

const ORIG: &str = "0d5e6b61602d758984b3bf038267614d6016eb2a";
const RESIZED: &str = "0d5e6b61602d758984b3bf038267614d6016eb2a_10";
const PART: &str = "1111111111111111111111111111111111111111.part";
const SWAP: &str = "swap_512";

struct World {
    tmp: tempfile::TempDir,
    clock: Arc<ManualClock>,
    start: SystemTime,
}

impl World {
    fn new(files: &[&str]) -> Self {
        let tmp = tempfile::Builder::new().prefix("icfs-core").tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("instances/_base")).unwrap();
        fs::create_dir_all(tmp.path().join("proc")).unwrap();
        let start = from_unix_secs(1_800_000_000);
        let w = World { tmp, clock: ManualClock::new(start), start };
        for f in files {
            w.write(f, f.as_bytes());
        }
        w
    }

    fn base(&self) -> PathBuf {
        self.tmp.path().join("instances/_base")
    }

    fn instances(&self) -> PathBuf {
        self.tmp.path().join("instances")
    }

    /// Writes a file with its mtime at the world's start.
    fn write(&self, name: &str, data: &[u8]) {
        let p = self.base().join(name);
        fs::write(&p, data).unwrap();
        let f = fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(self.start).unwrap();
    }

    fn open(&self, policy: Policy, min_free: Option<MinFree>) -> Arc<Cache> {
        let c = CString::new(self.base().as_os_str().as_bytes()).unwrap();
        let fd =
            unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        assert!(fd >= 0);
        let settings = Settings {
            cache_dir: self.base(),
            instances_dir: self.instances(),
            min_free,
            pressure_min_age: 600,
            verify_interval: 86_400,
            verify_rate_mib: 0,
            own_dev: None,
        };
        Cache::open(
            unsafe { OwnedFd::from_raw_fd(fd) },
            policy,
            self.clock.clone(),
            ProcRoot(self.tmp.path().join("proc")),
            settings,
            Vec::new(),
        )
        .unwrap()
    }

    fn exists(&self, name: &str) -> bool {
        self.base().join(name).exists()
    }

    fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }
}

fn policy() -> Policy {
    Policy {
        original_min_age: 1_000,
        resized_min_age: 100,
        partial_min_age: 50,
        ..Policy::default()
    }
}

fn ino(c: &Cache, name: &str) -> u64 {
    c.ino_of(OsStr::new(name)).unwrap_or_else(|| panic!("{name} unknown"))
}

fn events(c: &Cache) -> String {
    String::from_utf8(c.render(imagecachefs::cache::VFile::Events)).unwrap()
}

#[test]
fn thresholds_per_kind() {
    let w = World::new(&[ORIG, RESIZED, PART, SWAP]);
    let c = w.open(policy(), None);
    assert_eq!(evict::run_once(&c), 0);
    w.advance(49);
    assert_eq!(evict::run_once(&c), 0, "nothing is due before 50 s");
    w.advance(1);
    assert_eq!(evict::run_once(&c), 1);
    assert!(!w.exists(PART), "the stale .part goes at 50 s");
    w.advance(50);
    evict::run_once(&c);
    assert!(!w.exists(RESIZED), "resized goes at 100 s");
    assert!(w.exists(ORIG) && w.exists(SWAP));
    w.advance(899);
    evict::run_once(&c);
    assert!(w.exists(ORIG) && w.exists(SWAP), "originals and swap stay until 1000 s");
    w.advance(1);
    assert_eq!(evict::run_once(&c), 2);
    assert!(!w.exists(ORIG) && !w.exists(SWAP));
    let ev = events(&c);
    for n in [ORIG, RESIZED, PART, SWAP] {
        assert!(ev.contains(&format!("evicted {n} reason idle")), "{ev}");
    }
}

#[test]
fn references_pins_and_no_evict_keep_files() {
    let w = World::new(&[RESIZED, SWAP]);
    let c = w.open(policy(), None);
    let s = ino(&c, SWAP);
    assert!(c.control(imagecachefs::cache::Command::Pin(SWAP.into())).is_ok());
    let r = ino(&c, RESIZED);
    assert!(c.opened(r, 7, 1, false));
    w.advance(10_000);
    evict::run_once(&c);
    assert!(w.exists(RESIZED), "an open file is never evicted");
    assert_eq!(c.released(7, None), RefEffect::Unreferenced { ino: r });
    evict::run_once(&c);
    assert!(w.exists(RESIZED), "its age restarts at the release");
    w.advance(100);
    evict::run_once(&c);
    assert!(!w.exists(RESIZED), "gone 100 s after its release");

    c.schedule(s);
    evict::run_once(&c);
    assert!(w.exists(SWAP), "a pinned file is never evicted");
    assert!(c.control(imagecachefs::cache::Command::Unpin(SWAP.into())).is_ok());
    evict::run_once(&c);
    assert!(!w.exists(SWAP), "after unpin it goes");

    let w = World::new(&[RESIZED]);
    let c = w.open(Policy { evict: false, ..policy() }, None);
    w.advance(100_000);
    c.schedule(ino(&c, RESIZED));
    evict::run_once(&c);
    assert!(w.exists(RESIZED), "--no-evict keeps everything");
}

#[test]
fn an_opening_race_wins_or_sees_the_file_gone() {
    let w = World::new(&[RESIZED]);
    let c = w.open(policy(), None);
    let r = ino(&c, RESIZED);
    w.advance(100);
    evict::run_once(&c);
    assert!(!w.exists(RESIZED));
    assert!(!c.opened(r, 9, 1, false) || c.ino_of(OsStr::new(RESIZED)).is_none());
    assert_eq!(
        c.released(9, None),
        RefEffect::None,
        "a late release of an unknown handle changes nothing"
    );
}

#[test]
fn instance_disks_and_nova_lock_guard_files() {
    require_tool("qemu-img");
    let w = World::new(&[ORIG, RESIZED]);
    let inst = w.instances().join("3f2a7d0c-0000-4000-8000-000000000001");
    fs::create_dir_all(&inst).unwrap();
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(w.base().join(ORIG))
        .arg(inst.join("disk"))
        .arg("1M")
        .status()
        .unwrap();
    assert!(st.success());
    let c = w.open(policy(), None);
    w.advance(10_000);
    evict::run_once(&c);
    assert!(w.exists(ORIG), "a stopped instance's base stays");
    assert!(!w.exists(RESIZED));
    assert!(events(&c).contains(&format!("eviction-refused {ORIG} named as a backing file")));
    let status =
        String::from_utf8(c.render(imagecachefs::cache::VFile::Image(ino(&c, ORIG)))).unwrap();
    assert!(status.contains("state: referenced") && status.contains("evicts_at: -"), "{status}");

    // The instance is deleted: at the next look the base goes.
    fs::remove_dir_all(&inst).unwrap();
    w.advance(600);
    evict::run_once(&c);
    assert!(!w.exists(ORIG));
    assert!(w.instances().join("locks").join(format!("nova-{ORIG}")).exists(), "lock file kept");
}

#[test]
fn a_held_nova_lock_defers_eviction() {
    let w = World::new(&[RESIZED]);
    let c = w.open(policy(), None);
    let locks = w.instances().join("locks");
    fs::create_dir_all(&locks).unwrap();
    let lock = locks.join(format!("nova-{RESIZED}"));
    let mut holder = Proc::python(LOCKER, &[&lock]);
    holder.wait_line("locked");
    w.advance(100);
    evict::run_once(&c);
    let still = w.exists(RESIZED);
    holder.kill();
    assert!(still, "not evicted while Nova holds its lock");
    assert!(events(&c).contains("locked by nova"));
    w.advance(1);
    evict::run_once(&c);
    assert!(!w.exists(RESIZED), "evicted once the lock is free");
    assert!(lock.exists(), "Nova's lock file is never deleted");
}

#[test]
fn pressure_evicts_least_recently_used_first_down_to_a_floor() {
    let names = ["aaaa", "bbbb", "cccc"];
    let w = World::new(&names);
    // A target no filesystem meets: every unguarded file past the floor goes, oldest first.
    let c = w.open(Policy { evict: false, ..policy() }, Some(MinFree::Percent(99.99)));
    w.advance(700);
    let b = ino(&c, "bbbb");
    assert!(c.opened(b, 1, 1, false));
    c.released(1, None); // bbbb used at 700 s: under the 600 s floor now
    w.advance(100);
    let a = ino(&c, "aaaa");
    assert!(c.opened(a, 2, 1, false)); // aaaa in use
    evict::relieve_pressure(&c);
    assert!(w.exists("aaaa"), "in use");
    assert!(w.exists("bbbb"), "used 100 s ago, under the pressure floor");
    assert!(!w.exists("cccc"), "idle 800 s, least recently used");
    assert!(events(&c).contains("evicted cccc reason pressure"));
}

/// Under `--min-free`, free space is looked at again `PRESSURE_CHECK` after each pass, even if
/// nothing happens in the cache (instance disks grow elsewhere on the filesystem).
#[test]
fn free_space_is_checked_on_a_timer_under_min_free() {
    let w = World::new(&["aaaa"]);
    let c = w.open(Policy { evict: false, ..policy() }, Some(MinFree::Percent(99.99)));
    evict::run_once(&c);
    let later = w.start + evict::PRESSURE_CHECK;
    assert!(c.take_due(later).contains(&0), "a free-space check is queued");
    let quiet = World::new(&["aaaa"]);
    let c = quiet.open(Policy { evict: false, ..policy() }, None);
    evict::run_once(&c);
    assert!(!c.take_due(later).contains(&0), "no timer without --min-free");
}

#[test]
fn state_survives_a_restart() {
    let w = World::new(&[ORIG, SWAP]);
    let c = w.open(policy(), None);
    assert_eq!(checksums::run_once(&c), 2, "birth checksums of both files");
    assert!(c.control(imagecachefs::cache::Command::Pin(ORIG.into())).is_ok());
    w.advance(30);
    let s = ino(&c, SWAP);
    assert!(c.opened(s, 3, 1, false));
    c.released(3, None);
    let before = String::from_utf8(c.render(imagecachefs::cache::VFile::StatusJson)).unwrap();
    // A daemon writes its state when it stops (rendering a status file no longer does).
    c.persist();
    drop(c);
    let c = w.open(policy(), None);
    let after = String::from_utf8(c.render(imagecachefs::cache::VFile::StatusJson)).unwrap();
    let strip = |s: &str| s.split_once("\"images\"").unwrap().1.to_string();
    assert_eq!(strip(&before), strip(&after), "last use, pin and checksums after a restart");
    assert!(after.contains("\"state\":\"pinned\""));
}

#[test]
fn corruption_is_found_and_the_file_goes_once_unused() {
    let w = World::new(&[RESIZED]);
    let c = w.open(Policy { evict: false, ..policy() }, None);
    assert_eq!(checksums::run_once(&c), 1);
    let r = ino(&c, RESIZED);
    assert!(c.opened(r, 5, 1, false));
    // Flip a byte underneath as bit rot would: same inode, size and mtime (a write that
    // moves the mtime is a change, not corruption).
    let p = w.base().join(RESIZED);
    let mtime = fs::metadata(&p).unwrap().modified().unwrap();
    let mut data = fs::read(&p).unwrap();
    data[0] ^= 0xff;
    let mut f = fs::File::options().write(true).open(&p).unwrap();
    std::io::Write::write_all(&mut f, &data).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    c.request_verify(r);
    assert_eq!(checksums::run_once(&c), 1);
    let img = String::from_utf8(c.render(imagecachefs::cache::VFile::Image(r))).unwrap();
    assert!(img.contains("state: corrupt") && img.contains("verified: mismatch"), "{img}");
    evict::run_once(&c);
    assert!(w.exists(RESIZED), "in use: stays, flagged");
    c.released(5, None);
    evict::run_once(&c);
    assert!(!w.exists(RESIZED), "goes once nothing uses it, even with --no-evict");
    assert!(
        events(&c).contains("evicted 0d5e6b61602d758984b3bf038267614d6016eb2a_10 reason corrupt")
    );
}

/// `create` of a name that already exists in the covered directory (it appeared there after
/// the kernel's lookup said it was absent): the caller gets it only if its mode lets the
/// caller open it, never as a new file of its own (no change of owner), and `O_EXCL` gets
/// `EEXIST` as on the covered filesystem. The core is driven directly: no kernel could
/// reproduce the race reliably.
#[test]
fn create_of_a_name_that_exists_behind_the_mount_is_not_handed_over() {
    use imagecachefs::fs::{Caller, OverlayFs, ROOT};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let w = World::new(&[]);
    let c = w.open(policy(), None);
    let root = CString::new(w.base().as_os_str().as_bytes()).unwrap();
    let fd =
        unsafe { libc::open(root.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    assert!(fd >= 0);
    let core = OverlayFs::new(unsafe { OwnedFd::from_raw_fd(fd) }, c, 1, 1).unwrap();
    let secret = w.base().join("secret");
    fs::write(&secret, b"root's").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let nobody = Caller { pid: std::process::id(), uid: 65534, gid: 65534, unique: 0 };
    let name = OsStr::new("secret");
    let create = |flags: i32, who: Caller| {
        core.create(ROOT, name, 0o644, 0o022, flags | libc::O_CREAT, who).map(|(_, o)| o.fh)
    };
    let errno = |r: Result<u64, imagecachefs::error::Error>| r.err().map(|e| e.errno());
    assert_eq!(errno(create(libc::O_WRONLY, nobody)), Some(libc::EACCES));
    assert_eq!(errno(create(libc::O_WRONLY | libc::O_EXCL, nobody)), Some(libc::EEXIST));
    let meta = fs::metadata(&secret).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600), "the file was given away");
    assert_eq!(fs::read(&secret).unwrap(), b"root's");
    // A mode that lets the caller in: opened as it is, its owner kept.
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o666)).unwrap();
    let fh = create(libc::O_WRONLY | libc::O_APPEND, nobody).expect("may write it");
    core.release(fh).unwrap();
    assert_eq!(fs::metadata(&secret).unwrap().uid(), 0, "the file was given away");
    assert_eq!(fs::read(&secret).unwrap(), b"root's", "opened without truncating");
    // A new name is the caller's.
    let fh = core
        .create(ROOT, OsStr::new("mine"), 0o644, 0o022, libc::O_CREAT | libc::O_WRONLY, nobody)
        .expect("a new file")
        .1
        .fh;
    core.release(fh).unwrap();
    assert_eq!(fs::metadata(w.base().join("mine")).unwrap().uid(), 65534);
}

/// Status files for non-root readers are rendered at most once a second per file, whatever
/// changes meanwhile (any user may open them in a loop); root always gets the state of now.
#[test]
fn non_root_readers_get_a_rendering_at_most_once_a_second() {
    use imagecachefs::cache::{Reader, VFile};
    let w = World::new(&[ORIG]);
    let c = w.open(policy(), None);
    let first = c.snapshot(VFile::StatusJson, Reader::Other).unwrap();
    let o = ino(&c, ORIG);
    assert!(c.opened(o, 1, 1, false));
    c.released(1, None);
    let again = c.snapshot(VFile::StatusJson, Reader::Other).unwrap();
    assert!(Arc::ptr_eq(&first, &again), "a second rendering within the second");
    drop((first, again));
    let kept = c.snapshot(VFile::StatusJson, Reader::Other).unwrap();
    assert!(!kept.bytes().is_empty(), "kept while no handle holds it");
    let root = c.snapshot(VFile::StatusJson, Reader::Root).unwrap();
    assert!(!Arc::ptr_eq(&kept, &root));
    assert!(c.opened(o, 2, 1, false));
    let root2 = c.snapshot(VFile::StatusJson, Reader::Root).unwrap();
    assert!(!Arc::ptr_eq(&root, &root2), "root sees every change");
}
