//! Directory listings (docs/DESIGN.md, "Directory listings"). Without a kernel: a handle
//! whose first read is past offset 0.

mod common;

use std::ffi::CString;
use std::fs;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imagecachefs::cache::{Cache, Settings};
use imagecachefs::clock::{from_unix_secs, ManualClock};
use imagecachefs::fs::{OverlayFs, ROOT};
use imagecachefs::procfs::ProcRoot;
use imagecachefs::state::Policy;

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
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
    let fs = OverlayFs::new(o_path(&base), cache, 1_800_000_000).unwrap();
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
    let all = entry_names(&c.fs, whole, 0);
    assert!(all.len() > 6, "{all:?}");
    for offset in [1, 3, all.len() as u64 - 1] {
        let late = c.fs.opendir(ROOT).unwrap();
        assert_eq!(entry_names(&c.fs, late, offset), all[offset as usize..], "{offset}");
        c.fs.releasedir(late).unwrap();
    }
    // A handle serves the listing it took until it is read from offset 0 again.
    fs::write(c.base.join("f"), b"f").unwrap();
    assert_eq!(entry_names(&c.fs, whole, 2), all[2..]);
    assert!(entry_names(&c.fs, whole, 0).contains(&"f".to_string()));
    c.fs.releasedir(whole).unwrap();
}
