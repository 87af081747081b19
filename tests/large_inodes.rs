//! Covered filesystems whose inode numbers use the top bits (GlusterFS: the low 64 bits of a
//! random UUID; overlayfs with `xino`: the layer in the high bits). Node ids with those bits
//! are the status tree's, so such files get node ids of their own (DESIGN.md, "Node ids are
//! inode numbers"): they must be served, counted, listed and shown like any other, and keep
//! their ids across a server restart. An overlayfs with `xino=on` over a tmpfs lower layer
//! gives the lower files inode numbers with the top bit set.

mod common;

use std::ffi::CString;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use common::{wait_until, Mount, Scratch};

fn mount(src: &str, target: &Path, fstype: &str, data: &str) {
    let s = CString::new(src).unwrap();
    let t = CString::new(target.as_os_str().as_bytes()).unwrap();
    let f = CString::new(fstype).unwrap();
    let d = CString::new(data).unwrap();
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, d.as_ptr().cast()) };
    assert_eq!(rc, 0, "mount {fstype} on {target:?}: {}", std::io::Error::last_os_error());
}

/// Detaches on drop (the overlay first, then its lower tmpfs).
struct Mounted(Vec<std::path::PathBuf>);

impl Drop for Mounted {
    fn drop(&mut self) {
        for p in &self.0 {
            common::detach(p);
        }
    }
}

fn image(dir: &Path, name: &str) -> String {
    fs::read_to_string(dir.join(".imagecache/images").join(name)).unwrap_or_default()
}

#[test]
fn files_whose_inode_numbers_use_the_top_bits_are_served_and_counted() {
    let s = Scratch::new();
    let root = s.path("xino");
    let (lower, upper, work, merged) =
        (root.join("lower"), root.join("upper"), root.join("work"), root.join("_base"));
    for d in [&lower, &upper, &work, &merged] {
        fs::create_dir_all(d).unwrap();
    }
    let mut guard = Mounted(Vec::new());
    mount("tmpfs", &lower, "tmpfs", "size=16m");
    guard.0.insert(0, lower.clone());
    const BASE: &str = "0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a";
    fs::write(lower.join(BASE), vec![0x5a; 65536]).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},xino=on",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount("overlay", &merged, "overlay", &opts);
    guard.0.insert(0, merged.clone());
    let covered_ino = fs::metadata(merged.join(BASE)).unwrap().ino();
    assert!(covered_ino >= 1 << 62, "xino gave inode {covered_ino:#x}: not a large one");

    let m = Mount::new(&merged, &[]);
    let path = merged.join(BASE);
    let st = fs::metadata(&path).unwrap_or_else(|e| panic!("stat {BASE}: {e}\n{}", m.log_text()));
    assert!(st.ino() < 1 << 62, "the node id {:#x} is out of the status tree's range", st.ino());
    assert_eq!(fs::read(&path).unwrap(), vec![0x5a; 65536]);
    let listed: Vec<u64> = fs::read_dir(&merged)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().as_bytes() == BASE.as_bytes())
        .map(|e| e.ino())
        .collect();
    assert_eq!(listed, [st.ino()], "the listing gives the same number as stat");
    assert!(image(&merged, BASE).contains("refs: 0\n"), "{}", image(&merged, BASE));

    // Held through the mount: counted; the count and the file survive a server restart, and
    // the node id stays the same.
    let mut held = File::open(&path).unwrap();
    wait_until(Duration::from_secs(10), "refs: 1", || {
        image(&merged, BASE).contains("refs: 1\n").then_some(())
    });
    m.kill_server();
    assert_eq!(fs::metadata(&path).unwrap().ino(), st.ino(), "the node id changed");
    assert!(image(&merged, BASE).contains("refs: 1\n"), "{}", image(&merged, BASE));
    let mut buf = Vec::new();
    held.read_to_end(&mut buf).unwrap();
    assert_eq!(buf, vec![0x5a; 65536]);
    drop(held);
    wait_until(Duration::from_secs(10), "refs back to 0", || {
        image(&merged, BASE).contains("refs: 0\n").then_some(())
    });
    // A new file (upper layer, a small inode number) works beside it.
    fs::write(merged.join("new"), b"x").unwrap();
    assert_eq!(fs::read(merged.join("new")).unwrap(), b"x");
    drop(m);
    drop(guard);
}
