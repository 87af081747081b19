//! Attempts to break `--shared` on a real mount (issue 13): hand-made damage to the lock
//! directory, server restarts while holding a shared lock. As in `tests/shared.rs`, one
//! daemon over `<tmp>/instances/_base` with `--storage shared --shared` stands for one host,
//! and this test process, taking OFD locks on the covered lock files through the bind mount
//! made before the overlay, stands for "another host". Every wait has a deadline.

mod common;
mod nova;

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::wait_until;
use nova::*;

/// The quarantine the daemons here run with, seconds.
const QUARANTINE: u64 = 3;

const LOCK_DIR: &str = ".imagecachefs.locks";

fn shared_mount(n: &Nova) -> common::Mount {
    n.mount(
        (LONG, LONG, LONG),
        &["--storage", "shared", "--shared", "--shared-quarantine", &QUARANTINE.to_string()],
    )
}

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

/// The lock type someone else holds on byte 0 of `path` (`F_UNLCK`: none; `None`: no file).
fn lock_held(path: &Path) -> Option<i32> {
    let f = File::open(path).ok()?;
    let mut fl = flock(libc::F_WRLCK);
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(rc, 0, "F_OFD_GETLK on {path:?}: {}", std::io::Error::last_os_error());
    Some(fl.l_type as i32)
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {path:?}: {}", std::io::Error::last_os_error());
}

/// A FIFO where a lock file belongs (made by hand, or by a broken tool on another host) must
/// not stall the lock keeper: the sweep opening it for reading would wait for a writer for
/// ever, and from then on no lock is taken or tested on this host — every first open waits
/// the full 2 s and goes ahead unprotected, and other hosts may evict what it uses.
#[test]
fn a_fifo_in_place_of_a_lock_file_does_not_stall_the_keeper() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(4096, 1));
    write_file(&n.at(H2), &pseudo_random(4096, 2));
    fs::DirBuilder::new().mode(0o700).create(n.covered.target.join(LOCK_DIR)).unwrap();
    mkfifo(&lock_path(&n, H2));
    let m = shared_mount(&n);

    // A whole sweep ran: H1's status knows whether another host holds it.
    wait_until(Duration::from_secs(15), "a sweep past the FIFO", || {
        (n.field(H1, "other_node_holds") == "no").then_some(())
    });
    let t = Instant::now();
    let reader = File::open(n.at(H1)).unwrap();
    let took = t.elapsed();
    assert_eq!(
        lock_held(&lock_path(&n, H1)),
        Some(libc::F_RDLCK),
        "the open was answered without its shared lock (took {took:?})\n{}",
        m.log_text()
    );
    drop(reader);
    // The FIFO is left alone, and so is the file it stands for.
    let meta = fs::symlink_metadata(lock_path(&n, H2)).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()));
    assert!(n.real(H2).is_file());
    drop(m);
}

/// The lock directory removed by hand (`rm -rf`) while a file is used here: the host must
/// take its shared lock again in a lock directory another host can see. Before, it kept
/// working in the removed directory, could create no lock file there, and another host
/// (which makes the directory again) saw no lock at all: after the quarantine it evicts a
/// file this host's VMs use.
#[test]
fn a_removed_lock_directory_is_made_again_and_the_lock_retaken() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(4096, 1));
    let m = shared_mount(&n);
    let reader = File::open(n.at(H1)).unwrap();
    assert_eq!(lock_held(&lock_path(&n, H1)), Some(libc::F_RDLCK));

    fs::remove_dir_all(n.covered.target.join(LOCK_DIR)).unwrap();
    // Within a sweep or two (a tenth of the quarantine, 1 s at least), well inside the
    // quarantine another host would have to wait out.
    let deadline = Duration::from_secs(QUARANTINE * 3);
    let t = Instant::now();
    while t.elapsed() < deadline && lock_held(&lock_path(&n, H1)) != Some(libc::F_RDLCK) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        lock_held(&lock_path(&n, H1)),
        Some(libc::F_RDLCK),
        "no shared lock on {H1} {deadline:?} after its lock directory was removed\n{}",
        m.log_text()
    );
    drop(reader);
    drop(m);
}

/// The server SIGKILLed while a file is open through the mount (its shared lock goes with
/// the dead process): the new server takes the lock again, well inside the quarantine that
/// another host would have to wait out before it could evict the file.
#[test]
fn a_restarted_server_retakes_the_shared_lock_inside_the_quarantine() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(4096, 1));
    let m = shared_mount(&n);
    let reader = File::open(n.at(H1)).unwrap();
    assert_eq!(lock_held(&lock_path(&n, H1)), Some(libc::F_RDLCK));
    let killed = Instant::now();
    m.kill_server();
    let q = Duration::from_secs(QUARANTINE);
    let mut unlocked_seen = false;
    while killed.elapsed() < q * 3 && lock_held(&lock_path(&n, H1)) != Some(libc::F_RDLCK) {
        unlocked_seen = true;
        std::thread::sleep(Duration::from_millis(20));
    }
    let gap = killed.elapsed();
    assert_eq!(
        lock_held(&lock_path(&n, H1)),
        Some(libc::F_RDLCK),
        "the new server never took the lock again\n{}",
        m.log_text()
    );
    assert!(gap < q, "unlocked for {gap:?} (seen unlocked: {unlocked_seen}), quarantine {q:?}");
    // The file stays (thresholds are long) and is still readable through the held handle.
    let mut buf = [0u8; 16];
    let r = std::os::unix::fs::FileExt::read_at(&reader, &mut buf, 0).unwrap();
    assert_eq!(r, 16);
    drop(reader);
    drop(m);
}

/// A regular file put where the lock directory belongs while mounted: no host can lock
/// anything, so nothing is evicted (whatever its age), and opens still work (unprotected,
/// logged). (At start, the same damage refuses `--shared` with one line.)
#[test]
fn a_file_in_place_of_the_lock_directory_keeps_everything() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(4096, 1));
    write_file(&n.at(H2), &pseudo_random(4096, 2));
    // Thresholds of 1 s: both would go once the quarantine (counted from the mount) ends.
    let m = n.mount(
        ("1", "1", "1"),
        &["--storage", "shared", "--shared", "--shared-quarantine", &QUARANTINE.to_string()],
    );
    fs::remove_dir_all(n.covered.target.join(LOCK_DIR)).unwrap();
    fs::write(n.covered.target.join(LOCK_DIR), b"not a directory").unwrap();
    let reader = File::open(n.at(H1));
    assert!(reader.is_ok(), "{reader:?}\n{}", m.log_text());
    drop(reader);
    n.stays(&m, H2, Duration::from_secs(QUARANTINE * 3), "no lock can be taken");
    assert!(n.real(H1).is_file(), "{}", m.log_text());
    assert!(n.covered.target.join(LOCK_DIR).is_file(), "left as it was");
    drop(m);
}

/// A file used here and renamed behind the mount (by another host): this host must hold its
/// lock under the new name, or another host finds the new name unlocked and, after the
/// quarantine, evicts a file this host's VMs use.
#[test]
fn a_file_renamed_behind_the_mount_keeps_its_lock_under_the_new_name() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(4096, 1));
    let m = shared_mount(&n);
    let reader = File::open(n.at(H1)).unwrap();
    assert_eq!(lock_held(&lock_path(&n, H1)), Some(libc::F_RDLCK));
    fs::rename(n.real(H1), n.real(H2)).unwrap();
    let deadline = Duration::from_secs(QUARANTINE * 3);
    let t = Instant::now();
    while t.elapsed() < deadline && lock_held(&lock_path(&n, H2)) != Some(libc::F_RDLCK) {
        // Nova on this host looks at the directory now and then.
        let _ = fs::read_dir(&n.dir).map(|d| d.count());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        lock_held(&lock_path(&n, H2)),
        Some(libc::F_RDLCK),
        "{H1} renamed to {H2} behind the mount while open: no shared lock under the new name \
         after {deadline:?}\n{}",
        m.log_text()
    );
    drop(reader);
    drop(m);
}

/// A lock directory that other users can write to (made by hand beforehand, mode 777): any
/// local user could remove, replace or hold its lock files. `--shared` is refused with one
/// line naming it, and nothing is changed.
#[test]
fn a_lock_directory_writable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(4096, 1));
    let dir = n.covered.target.join(LOCK_DIR);
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
    let (code, _, err) = common::run_timeout(
        std::process::Command::new(common::bin()).arg("mount").arg(&n.dir).args([
            "--storage",
            "shared",
            "--shared",
        ]),
        Duration::from_secs(20),
    );
    assert_ne!(code, 0, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(LOCK_DIR) && err.contains("writable by other users"), "{err}");
    assert!(!common::is_fuse(&n.dir), "nothing is mounted");
    let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o777, "left as it was");
}

/// A cache file with a name of 250 bytes, the longest Nova can lock (its lock file is
/// `locks/nova-NAME`; past 250 bytes that name is too long, and the file is kept for good as
/// Nova's lock cannot be taken): its cluster lock file has the same name, it is locked while
/// open, and evicted with its lock file once idle past the quarantine.
#[test]
fn a_250_byte_name_is_locked_and_evicted_with_its_lock_file() {
    // A legacy resized copy's name (`<sha1>_<anything>`), stretched to 250 bytes.
    let name = format!("{H1}_{}", "m".repeat(250 - 41));
    assert_eq!(name.len(), 250);
    let n = Nova::new();
    write_file(&n.at(&name), &pseudo_random(4096, 1));
    let m = n.mount(
        ("1", "1", "1"),
        &["--storage", "shared", "--shared", "--shared-quarantine", &QUARANTINE.to_string()],
    );
    let reader = File::open(n.at(&name)).unwrap();
    assert_eq!(lock_held(&lock_path(&n, &name)), Some(libc::F_RDLCK), "{}", m.log_text());
    n.stays(&m, &name, Duration::from_secs(QUARANTINE + 1), "it is open");
    drop(reader);
    let deadline = Duration::from_secs(QUARANTINE * 10);
    let t = Instant::now();
    while t.elapsed() < deadline && !n.gone_from_covered(&name) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        n.gone_from_covered(&name),
        "not evicted within {deadline:?}\nstatus:\n{}\nevents:\n{}\n{}",
        n.status(&name).unwrap_or_default(),
        n.events(),
        m.log_text()
    );
    assert!(lock_held(&lock_path(&n, &name)).is_none(), "its lock file went with it");
    drop(m);
}

/// A pin on this host is a use every other host must see: the file's shared lock is held
/// while it is pinned (no handle open), taken again by a server that replaced a killed one,
/// and dropped at the unpin.
#[test]
fn a_pin_holds_the_shared_lock_across_a_server_restart() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(4096, 1));
    let m = shared_mount(&n);
    let (code, out, err) = icfs(&["pin"], &n.dir, H1);
    assert_eq!(code, 0, "{out}{err}");
    let lock = lock_path(&n, H1);
    wait_until(Duration::from_secs(10), "the pinned file's lock", || {
        (lock_held(&lock) == Some(libc::F_RDLCK)).then_some(())
    });
    m.kill_server();
    wait_until(Duration::from_secs(QUARANTINE), "the pinned file's lock after a restart", || {
        (lock_held(&lock) == Some(libc::F_RDLCK)).then_some(())
    });
    let (code, out, err) = icfs(&["unpin"], &n.dir, H1);
    assert_eq!(code, 0, "{out}{err}");
    wait_until(Duration::from_secs(10), "the lock dropped at the unpin", || {
        (lock_held(&lock) == Some(libc::F_UNLCK)).then_some(())
    });
    drop(m);
}

/// A stopped instance's disk naming a base is a use this host must keep announcing after its
/// server is killed and replaced: the new server reads the instance disks again and takes the
/// lock back inside the quarantine.
#[test]
fn a_stopped_instances_base_is_locked_again_after_a_server_restart() {
    common::require_tool("qemu-img");
    let n = Nova::new();
    write_file(&n.at(H3), &pseudo_random(65536, 3));
    common::overlay(&n.instances.join(INSTANCE).join("disk"), &n.at(H3));
    let m = n.mount(
        (LONG, "1", LONG),
        &["--storage", "shared", "--shared", "--shared-quarantine", &QUARANTINE.to_string()],
    );
    let lock = lock_path(&n, H3);
    wait_until(Duration::from_secs(15), "the stopped instance's base locked", || {
        (lock_held(&lock) == Some(libc::F_RDLCK)).then_some(())
    });
    let killed = Instant::now();
    m.kill_server();
    wait_until(Duration::from_secs(QUARANTINE * 3), "its lock after a restart", || {
        (lock_held(&lock) == Some(libc::F_RDLCK)).then_some(())
    });
    let gap = killed.elapsed();
    assert!(
        gap < Duration::from_secs(QUARANTINE),
        "the base was unlocked for {gap:?}, longer than the quarantine\n{}",
        m.log_text()
    );
    drop(m);
}

/// A lock file removed, or replaced by another file renamed onto it, by hand while this
/// host holds its shared lock: the lock on the old inode protects nothing any more, and the
/// host takes it again on the file now under the name within a look or two (1 s apart
/// here), well inside the quarantine another host would wait out.
#[test]
fn a_lock_file_removed_or_replaced_by_hand_is_locked_again() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(4096, 1));
    let m = shared_mount(&n);
    let reader = File::open(n.at(H1)).unwrap();
    let lock = lock_path(&n, H1);
    assert_eq!(lock_held(&lock), Some(libc::F_RDLCK));
    for how in ["removed", "replaced"] {
        if how == "removed" {
            fs::remove_file(&lock).unwrap();
        } else {
            let other = n.covered.target.join(LOCK_DIR).join("replacement");
            fs::write(&other, b"").unwrap();
            fs::rename(&other, &lock).unwrap();
        }
        wait_until(
            Duration::from_secs(QUARANTINE),
            &format!("the lock file {how}: locked"),
            || (lock_held(&lock) == Some(libc::F_RDLCK)).then_some(()),
        );
    }
    drop(reader);
    drop(m);
}

/// `--shared-quarantine 0` would leave the gap while a server is replaced (its shared locks
/// die with it and are taken again within milliseconds) to another host's evictor: refused
/// in one line, nothing mounted.
#[test]
fn a_zero_quarantine_with_shared_is_refused() {
    let n = Nova::new();
    let (code, _, err) = common::run_timeout(
        std::process::Command::new(common::bin()).arg("mount").arg(&n.dir).args([
            "--storage",
            "shared",
            "--shared",
            "--shared-quarantine",
            "0",
        ]),
        Duration::from_secs(30),
    );
    assert_ne!(code, 0, "mounted with a zero quarantine");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--shared-quarantine 0"), "{err}");
    assert!(!common::is_fuse(&n.dir), "mounted anyway");
}
