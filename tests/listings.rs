//! Directory listings (docs/DESIGN.md, "Directory listings"): the kernel keeps the listing
//! of a covered directory and serves repeated listings itself, so every change must drop
//! that cache. Through a real mount: a listing shows at once every change made through the
//! mount (compared with a plain directory, also on a handle kept open and rewound) and every
//! eviction by the daemon, even of a name the kernel holds no entry for; a file made behind
//! the mount (through a bind mount of the covered directory made before the overlay) is
//! listed within one attribute TTL. Without a kernel: the core's answers to opendir and to
//! a handle whose first read is past offset 0.

mod common;
mod nova;

use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_until, Scratch};
use imagecachefs::cache::{Cache, Settings};
use imagecachefs::clock::{from_unix_secs, ManualClock};
use imagecachefs::fs::{dir_cookie, OverlayFs, ROOT, STATUS_DIR, V_DIR, V_IMAGES};
use imagecachefs::procfs::ProcRoot;
use imagecachefs::state::Policy;
use nova::{Nova, LONG};

// ---------------------------------------------------------------------------------------------
// Listing helpers

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn open_dir(p: &Path) -> OwnedFd {
    let fd = unsafe { libc::open(cpath(p).as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    assert!(fd >= 0, "opendir {p:?}: {}", std::io::Error::last_os_error());
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Reads an open directory to its end with `getdents64` (a 4 KiB buffer, as `readdir(3)`
/// would with a small one): `(name, d_type)` in the order given, `.` and `..` left out.
fn read_to_end(fd: &OwnedFd) -> Vec<(String, u8)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    for _ in 0..1_000_000 {
        let n = unsafe {
            libc::syscall(libc::SYS_getdents64, fd.as_raw_fd(), buf.as_mut_ptr(), buf.len())
        };
        assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
        if n == 0 {
            return out;
        }
        let mut off = 0;
        while off < n as usize {
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let name = CStr::from_bytes_until_nul(&buf[off + 19..off + reclen]).unwrap();
            let name = name.to_string_lossy().into_owned();
            if name != "." && name != ".." {
                out.push((name, buf[off + 18]));
            }
            off += reclen;
        }
    }
    panic!("getdents64 never reached the end of the directory");
}

/// The listing of `p` in the order the filesystem gives it.
fn listing(p: &Path) -> Vec<(String, u8)> {
    read_to_end(&open_dir(p))
}

/// The listing of `p`, sorted, without the status tree (which only the mount's root has).
fn names(p: &Path) -> Vec<(String, u8)> {
    let mut v: Vec<_> = listing(p).into_iter().filter(|(n, _)| n != STATUS_DIR).collect();
    v.sort();
    v
}

fn listed(p: &Path, name: &str) -> bool {
    listing(p).iter().any(|(n, _)| n == name)
}

fn check(rc: libc::c_int, what: &str) {
    assert!(rc == 0, "{what}: {}", std::io::Error::last_os_error());
}

// ---------------------------------------------------------------------------------------------
// Through a real mount

/// Every change a listing can show, made through the mount, in its root and in a
/// subdirectory: after each, a fresh listing, a listing through a handle opened before the
/// change and rewound, and a listing of the subdirectory are what the same steps give on a
/// plain directory. The mount's listings are cached by the kernel between the steps (each
/// listing is repeated before the next change).
#[test]
fn a_listing_shows_at_once_every_change_made_through_the_mount() {
    let s = Scratch::new();
    let plain = s.path("plain");
    fs::create_dir(&plain).unwrap();
    let m = common::Mount::new(&s.base, &[]);

    type Step = (&'static str, fn(&Path));
    let steps: [Step; 13] = [
        ("create a", |r| fs::write(r.join("a"), b"a").unwrap()),
        ("write to a (no new name)", |r| fs::write(r.join("a"), b"more").unwrap()),
        ("mkdir d", |r| fs::create_dir(r.join("d")).unwrap()),
        ("create d/x", |r| fs::write(r.join("d/x"), b"x").unwrap()),
        ("rename a to b", |r| fs::rename(r.join("a"), r.join("b")).unwrap()),
        ("rename c over b", |r| {
            fs::write(r.join("c"), b"c").unwrap();
            fs::rename(r.join("c"), r.join("b")).unwrap()
        }),
        ("link b to l", |r| fs::hard_link(r.join("b"), r.join("l")).unwrap()),
        ("symlink s", |r| std::os::unix::fs::symlink("b", r.join("s")).unwrap()),
        ("mkfifo f", |r| {
            check(unsafe { libc::mkfifo(cpath(&r.join("f")).as_ptr(), 0o644) }, "mkfifo")
        }),
        ("exchange l and d", |r| {
            let (a, b) = (cpath(&r.join("l")), cpath(&r.join("d")));
            let rc = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    a.as_ptr(),
                    libc::AT_FDCWD,
                    b.as_ptr(),
                    libc::RENAME_EXCHANGE,
                )
            };
            check(rc, "renameat2 RENAME_EXCHANGE")
        }),
        ("move l/x up to y", |r| fs::rename(r.join("l/x"), r.join("y")).unwrap()),
        ("unlink b, y, s and f", |r| {
            for n in ["b", "y", "s", "f"] {
                fs::remove_file(r.join(n)).unwrap();
            }
        }),
        ("rmdir l", |r| fs::remove_dir(r.join("l")).unwrap()),
    ];

    // One transcript per root: the listings after every step.
    let run = |root: &Path| -> Vec<String> {
        let held = open_dir(root);
        read_to_end(&held);
        let mut out = Vec::new();
        for (what, step) in &steps {
            // Listed (and so cached) before the change, twice.
            names(root);
            names(root);
            step(root);
            let sub = ["d", "l"].iter().map(|d| root.join(d)).find(|d| d.is_dir());
            check(unsafe { libc::lseek(held.as_raw_fd(), 0, libc::SEEK_SET) } as i32, "rewind");
            let mut rewound: Vec<_> =
                read_to_end(&held).into_iter().filter(|(n, _)| n != STATUS_DIR).collect();
            rewound.sort();
            out.push(format!(
                "{what}: listing {:?}; rewound handle {rewound:?}; subdirectory {:?}",
                names(root),
                sub.map(|d| names(&d))
            ));
        }
        out
    };
    let want = run(&plain);
    let got = run(&s.base);
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g, w, "the mount's listing differs from the plain directory's (left: mount)");
    }
    assert_eq!(got.len(), want.len());
    assert!(listed(&s.base, STATUS_DIR), "the status tree is gone from the root's listing");
    drop(m);
}

/// Many files, so that the kernel's first request of a listing (a READDIRPLUS of 4 KiB)
/// cannot reach the last one: the kernel holds no entry for it.
const MANY: usize = 300;

fn original(i: usize) -> String {
    format!("{:040x}", (i as u128 + 1) * 0x9e37_79b9_7f4a_7c15)
}

/// Writes one control command; the write returns once the daemon carried it out.
fn control(n: &Nova, line: &str) {
    fs::write(n.dir.join(".imagecache/control"), line)
        .unwrap_or_else(|e| panic!("control {line:?}: {e}\nevents:\n{}", n.events()));
}

/// An eviction by the daemon leaves the listing at once: first of a file the kernel knows
/// only from a cached listing (no entry, so no entry to invalidate), then of one it has an
/// entry for. No `stat` of the first name through the mount happens before its check.
#[test]
fn an_evicted_file_leaves_the_cached_listing_at_once() {
    let n = Nova::new();
    for i in 0..MANY {
        fs::write(n.real(&original(i)), b"").unwrap();
    }
    let m = n.mount((LONG, LONG, LONG), &[]);
    let first = listing(&n.dir);
    let files: Vec<&str> = first
        .iter()
        .filter(|(name, t)| *t == libc::DT_REG && name.len() == 40)
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(files.len(), MANY, "{first:?}");
    let (no_entry, with_entry) = (files[MANY - 1], files[0]);
    // Served from the kernel's cache now.
    assert_eq!(listing(&n.dir), first);

    for (victim, stat_first) in [(no_entry, false), (with_entry, true)] {
        if stat_first {
            assert!(n.at(victim).is_file(), "{victim} through the mount");
        }
        assert!(listed(&n.dir, victim));
        control(&n, &format!("evict {victim}\n"));
        n.wait_evicted(victim, Duration::from_secs(5));
        // The notification is sent by the daemon's notifier thread: allow it 500 ms.
        wait_until(
            Duration::from_millis(500),
            &format!("the listing to drop the evicted {victim} (entry known: {stat_first})"),
            || (!listed(&n.dir, victim)).then_some(()),
        );
    }
    let mut covered = names(&n.covered.target);
    covered.retain(|(name, _)| !name.starts_with(".imagecachefs"));
    assert_eq!(names(&n.dir), covered, "the mount lists what the covered directory holds");
    assert!(n.has_event(&format!("evicted {no_entry}")), "{}", n.events());
    drop(m);
}

/// A file made behind the mount is listed within one attribute TTL: a listing from offset 0
/// re-reads the directory's attributes once they expired (`FUSE_AUTO_INVAL_DATA`) and drops
/// the cached listing on the new mtime. Polled through a handle opened before and rewound,
/// which walks no path (a path walk would re-read them anyway, for the permission check).
/// Right after the change the kernel still serves its cached listing: that is the cache at
/// work, within the documented bound. Takes about one TTL.
#[test]
fn a_file_made_behind_the_mount_is_listed_within_one_attribute_ttl() {
    let ttl = imagecachefs::fuse::TTL;
    let n = Nova::new();
    let m = n.mount((LONG, LONG, LONG), &[]);
    fs::write(n.at("through"), b"1").unwrap();
    let held = open_dir(&n.dir);
    let rewound = || {
        check(unsafe { libc::lseek(held.as_raw_fd(), 0, libc::SEEK_SET) } as i32, "rewind");
        read_to_end(&held)
    };
    let before = rewound();
    assert!(before.iter().any(|(name, _)| name == "through"), "{before:?}");
    fs::write(n.real("behind"), b"2").unwrap();
    let made = Instant::now();
    assert_eq!(
        rewound(),
        before,
        "a repeated listing was not served from the kernel's cache (FOPEN_CACHE_DIR)"
    );
    wait_until(
        ttl + Duration::from_secs(10),
        "the file made behind the mount to be listed",
        || rewound().iter().any(|(name, _)| name == "behind").then_some(()),
    );
    let after = made.elapsed();
    assert!(after <= ttl + Duration::from_secs(5), "listed only {after:?} after it was made");
    assert!(listed(&n.dir, "behind"), "a new handle does not list it");
    assert_eq!(fs::read(n.at("behind")).unwrap(), b"2");
    // Closed before the daemon stops: it would keep serving an open handle.
    drop(held);
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// The core, without a kernel

struct Core {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    fs: OverlayFs,
}

fn o_path(p: &Path) -> OwnedFd {
    let fd = unsafe {
        libc::open(cpath(p).as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
    };
    assert!(fd >= 0, "open {p:?}: {}", std::io::Error::last_os_error());
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// An `OverlayFs` over `instances/_base` holding `files` and a subdirectory `sub`.
fn core(files: &[&str]) -> Core {
    let tmp = tempfile::Builder::new().prefix("icfs-test-listings").tempdir().unwrap();
    let base = tmp.path().join("instances/_base");
    fs::create_dir_all(base.join("sub")).unwrap();
    fs::create_dir_all(tmp.path().join("proc")).unwrap();
    for f in files {
        fs::write(base.join(f), f.as_bytes()).unwrap();
    }
    let settings = Settings {
        cache_dir: base.clone(),
        instances_dir: tmp.path().join("instances"),
        min_free: None,
        pressure_min_age: 600,
        verify_interval: 86_400,
        verify_rate_mib: 0,
        own_dev: None,
    };
    let start = from_unix_secs(1_800_000_000);
    let cache: Arc<Cache> = Cache::open(
        o_path(&base),
        Policy::default(),
        ManualClock::new(start),
        ProcRoot(tmp.path().join("proc")),
        settings,
        Vec::new(),
    )
    .unwrap();
    let fs = OverlayFs::new(o_path(&base), cache, 1_800_000_000, 1).unwrap();
    Core { _tmp: tmp, base, fs }
}

fn entry_names(fs: &OverlayFs, fh: u64, offset: u64) -> Vec<String> {
    let entries = fs.readdir(fh, offset).unwrap();
    entries.iter().map(|e| e.name.to_string_lossy().into_owned()).collect()
}

/// The kernel may start a handle's reads past offset 0 (its cached listing dropped in the
/// middle of a read, or a `seekdir` to another handle's position): the handle lists the
/// directory then, rather than answering "end of directory".
#[test]
fn a_handle_first_read_past_offset_0_lists_the_directory() {
    let c = core(&["a", "b", "c", "d", "e"]);
    let whole = c.fs.opendir(ROOT).unwrap();
    let all = entry_names(&c.fs, whole.fh, 0);
    assert!(all.len() > 6, "{all:?}");
    // The offset after the i-th entry is that entry's cookie.
    let after = |i: usize| dir_cookie(OsStr::new(&all[i - 1]));
    for i in [1, 3, all.len() - 1] {
        let late = c.fs.opendir(ROOT).unwrap();
        assert_eq!(entry_names(&c.fs, late.fh, after(i)), all[i..], "{i}");
        c.fs.releasedir(late.fh).unwrap();
    }
    // A handle serves the listing it took until it is read from offset 0 again.
    fs::write(c.base.join("f"), b"f").unwrap();
    assert_eq!(entry_names(&c.fs, whole.fh, after(2)), all[2..]);
    assert!(entry_names(&c.fs, whole.fh, 0).contains(&"f".to_string()));
    c.fs.releasedir(whole.fh).unwrap();
}

/// Covered directories (the root and below) may be cached by the kernel; the status tree's
/// directories, whose listings follow the cache's state, may not.
#[test]
fn only_covered_directories_may_be_cached_by_the_kernel() {
    let c = core(&["a"]);
    let sub = c.fs.lookup(ROOT, OsStr::new("sub")).unwrap().ino;
    for (what, id, cached) in [
        ("root", ROOT, true),
        ("sub", sub, true),
        ("status", V_DIR, false),
        ("images", V_IMAGES, false),
    ] {
        let d = c.fs.opendir(id).unwrap();
        assert_eq!(d.cache, cached, "{what}");
        assert!(!entry_names(&c.fs, d.fh, 0).is_empty(), "{what}");
        c.fs.releasedir(d.fh).unwrap();
    }
}
