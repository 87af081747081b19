//! Real QEMU tools through a real mount: what Nova, libvirt and QEMU do to `_base` must work
//! unchanged over imagecachefs (PRODUCT.md, "Pass-through is faithful").
//!
//! Each test mounts over its own scratch `_base`, drives `qemu-img`, `qemu-io`, `qemu-nbd` or
//! `qemu-storage-daemon` against files inside the mount, checks the results against a source
//! image made outside the mount, and finally stops the daemon (exit 0, no mount left behind).
//! Every background process is owned by a [`Proc`], which ends it on drop, panics included.

mod common;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    convert_to_raw, overlay, run, run_ok, splitmix64, tool, BindMount, Mount, Proc, Scratch,
};

const MIB: u64 = 1 << 20;
const SRC_SIZE: u64 = 64 * MIB;
/// Data regions `(offset, length)` of the source image; everything else is a hole. The last
/// region ends at EOF and two regions touch (merged into one extent by SEEK_DATA/SEEK_HOLE).
const DATA_REGIONS: &[(u64, u64)] = &[
    (0, 4 * MIB),
    (9 * MIB, 3 * MIB),
    (12 * MIB, MIB),
    (30 * MIB, MIB),
    (47 * MIB, 5 * MIB),
    (63 * MIB, MIB),
];
/// A cache file name as Nova makes it: the SHA-1 of the Glance image id.
const HASH: &str = "0d5e6b61602d758984b3bf038267614d6016eb2a";

/// A source image made outside the mount: a sparse raw file with pseudo-random data in
/// [`DATA_REGIONS`], and the same content converted to qcow2 (what Glance would serve).
struct SourceImage {
    raw: PathBuf,
    qcow2: PathBuf,
    bytes: Vec<u8>,
}

impl SourceImage {
    fn create(dir: &Path) -> Self {
        fs::create_dir_all(dir).unwrap();
        let mut bytes = vec![0u8; SRC_SIZE as usize];
        let mut state = 0x1234_5678_9abc_def0u64;
        for &(off, len) in DATA_REGIONS {
            for word in bytes[off as usize..(off + len) as usize].chunks_exact_mut(8) {
                word.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
            }
        }
        let raw = dir.join("src.raw");
        let f = File::create(&raw).unwrap();
        f.set_len(SRC_SIZE).unwrap();
        for &(off, len) in DATA_REGIONS {
            f.write_all_at(&bytes[off as usize..(off + len) as usize], off).unwrap();
        }
        f.sync_all().unwrap();
        let qcow2 = dir.join("src.qcow2");
        run_ok(
            tool("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow2),
        );
        SourceImage { raw, qcow2, bytes }
    }
}

/// Reads `path` and compares it byte for byte with `expected`, naming the first difference.
fn assert_same_bytes(path: &Path, expected: &[u8]) {
    let mut got = Vec::with_capacity(expected.len());
    File::open(path)
        .unwrap_or_else(|e| panic!("open {path:?}: {e}"))
        .read_to_end(&mut got)
        .unwrap_or_else(|e| panic!("read {path:?}: {e}"));
    assert_eq!(got.len(), expected.len(), "{path:?} has the wrong length");
    if let Some(at) = got.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{path:?} differs from the source at byte {at} (MiB {}): got {:#04x}, expected {:#04x}",
            at as u64 / MIB,
            got[at],
            expected[at]
        );
    }
}

/// The value of a top-level key of `qemu-img info --output=json` (pretty-printed, 4-space
/// indent; nested objects such as the `file` child are indented deeper and ignored).
fn info_field(json: &str, key: &str) -> Option<String> {
    let prefix = format!("    \"{key}\": ");
    json.lines().find_map(|l| {
        let v = l.strip_prefix(&prefix)?;
        Some(v.trim_end_matches(',').trim_matches('"').to_string())
    })
}

fn img_info(path: &Path) -> String {
    run_ok(tool("qemu-img").args(["info", "--force-share", "--output=json"]).arg(path))
}

/// One extent of `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    start: u64,
    length: u64,
    data: bool,
    zero: bool,
}

fn parse_map(json: &str) -> Vec<Extent> {
    fn field<'a>(obj: &'a str, key: &str) -> &'a str {
        let pat = format!("\"{key}\": ");
        let at =
            obj.find(&pat).unwrap_or_else(|| panic!("no {key} in map entry {obj}")) + pat.len();
        obj[at..].split([',', '}']).next().unwrap().trim()
    }
    let extents: Vec<Extent> = json
        .split('{')
        .skip(1)
        .map(|obj| Extent {
            start: field(obj, "start").parse().unwrap(),
            length: field(obj, "length").parse().unwrap(),
            data: field(obj, "data") == "true",
            zero: field(obj, "zero") == "true",
        })
        .collect();
    assert!(!extents.is_empty(), "empty qemu-img map output: {json}");
    extents
}

/// `DATA_REGIONS` with touching regions merged, as SEEK_DATA/SEEK_HOLE report them.
fn merged_data_regions() -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(off, len) in DATA_REGIONS {
        match out.last_mut() {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// Data extents of `path` found with `lseek(SEEK_DATA)`/`lseek(SEEK_HOLE)` directly.
fn seek_data_extents(path: &Path) -> Vec<(u64, u64)> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    let size = f.metadata().unwrap().len() as i64;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while pos < size {
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::ENXIO), "SEEK_DATA {pos} on {path:?}: {e}");
            break;
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(
            hole > data,
            "SEEK_HOLE {data} on {path:?} returned {hole}: {}",
            std::io::Error::last_os_error()
        );
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    out
}

/// Stops the daemon: it must exit 0 and leave no mount behind.
fn unmount_clean(m: Mount) {
    let dir = m.dir.clone();
    let log = m.log.clone();
    let st = m.stop();
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(st.success(), "imagecachefs exited with {st} after SIGTERM; log:\n{text}");
    assert!(!common::is_fuse(&dir), "{dir:?} is still a FUSE mount after the daemon exited");
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    let dir_s = dir.to_str().unwrap();
    assert!(
        !mounts.lines().any(|l| l.split(' ').nth(1) == Some(dir_s)),
        "a mount is left at {dir:?}:\n{mounts}"
    );
}

/// Runs `qemu-io` with `args` on `target`; every command must succeed (pattern checks too).
fn qemu_io_ok(args: &[&str], target: &Path) -> String {
    let (code, out, err) = run(tool("qemu-io").args(args).arg(target));
    assert!(
        code == 0 && !out.contains("verification failed") && !err.contains("verification failed"),
        "qemu-io {args:?} {target:?} failed ({code}):\nstdout: {out}\nstderr: {err}"
    );
    out
}

/// Nova's download of an original (reference §2.3), every step inside the mount: fetch into
/// `<hash>.part` (plain writes, fsync), `qemu-img info --force-share`, `qemu-img convert -t none`
/// (O_DIRECT target) to `<hash>.converted`, unlink the `.part`, rename to `<hash>`.
#[test]
fn nova_download_flow_converts_and_renames_inside_the_mount() {
    let s = Scratch::new();
    let src = SourceImage::create(&s.path("src"));
    let m = Mount::new(&s.base, &[]);
    let part = s.base.join(format!("{HASH}.part"));
    let converted = s.base.join(format!("{HASH}.converted"));
    let fin = s.base.join(HASH);

    // Glance download: open(O_WRONLY|O_CREAT|O_TRUNC), write chunks, flush, fsync, close.
    {
        let mut from = File::open(&src.qcow2).unwrap();
        let mut to = File::create(&part).unwrap_or_else(|e| panic!("create {part:?}: {e}"));
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n]).unwrap_or_else(|e| panic!("write {part:?}: {e}"));
        }
        to.flush().unwrap();
        to.sync_all().unwrap_or_else(|e| panic!("fsync {part:?}: {e}"));
    }
    let info = img_info(&part);
    assert_eq!(info_field(&info, "format").as_deref(), Some("qcow2"), "{info}");
    assert_eq!(info_field(&info, "backing-filename"), None, "{info}");

    convert_to_raw(&part, &converted);
    fs::remove_file(&part).unwrap();
    let info = img_info(&converted);
    assert_eq!(info_field(&info, "format").as_deref(), Some("raw"), "{info}");
    fs::rename(&converted, &fin).unwrap();
    assert!(!converted.exists() && !part.exists(), "temporary files left after the rename");

    let info = img_info(&fin);
    assert_eq!(info_field(&info, "format").as_deref(), Some("raw"), "{info}");
    assert_eq!(info_field(&info, "virtual-size"), Some(SRC_SIZE.to_string()), "{info}");
    let out = run_ok(
        tool("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&src.qcow2).arg(&fin),
    );
    assert!(out.contains("Images are identical"), "{out}");
    assert_same_bytes(&fin, &src.bytes);

    unmount_clean(m);
    // The data landed in the covered file itself.
    assert_same_bytes(&s.base.join(HASH), &src.bytes);
}

/// An instance disk outside `_base` with the cache file as raw backing file, read with
/// `cache=none` (O_DIRECT on the whole chain) and with the default cache.
#[test]
fn qcow2_overlay_outside_reads_its_base_through_the_mount() {
    let s = Scratch::new();
    let m = Mount::new(&s.base, &[]);
    let base = s.base.join(HASH);
    run_ok(tool("qemu-img").args(["create", "-f", "raw"]).arg(&base).arg("16M"));
    // Patterns written into the base through the mount, with O_DIRECT and through the cache.
    qemu_io_ok(
        &["-f", "raw", "-n", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 4M 1M"],
        &base,
    );
    qemu_io_ok(&["-f", "raw", "-c", "write -P 0x5a 15M 1M"], &base);

    let disk = s.path("instances/6c1e0c1a-4b5e-4c57-9a43-1d1a0b5e9f10/disk");
    overlay(&disk, &base);
    let info = img_info(&disk);
    assert_eq!(
        info_field(&info, "backing-filename"),
        Some(base.to_str().unwrap().to_string()),
        "{info}"
    );
    assert_eq!(info_field(&info, "virtual-size"), Some((16 * MIB).to_string()), "{info}");

    let reads = [
        "read -P 0xab 0 1M",
        "read -P 0 1M 3M",
        "read -P 0xcd 4M 1M",
        "read -P 0 5M 10M",
        "read -P 0x5a 15M 1M",
        "read -P 0xab 4097 513",
    ];
    for cache in [&["-n"][..], &[][..]] {
        let mut args = vec!["-f", "qcow2", "-r"];
        args.extend_from_slice(cache);
        for r in reads {
            args.extend_from_slice(&["-c", r]);
        }
        qemu_io_ok(&args, &disk);

        let mut bad = vec!["-f", "qcow2", "-r"];
        bad.extend_from_slice(cache);
        bad.extend_from_slice(&["-c", "read -P 0xcd 0 1M"]);
        let (code, out, err) = run(tool("qemu-io").args(&bad).arg(&disk));
        assert!(
            code != 0
                && (out.contains("Pattern verification failed")
                    || err.contains("Pattern verification failed")),
            "qemu-io {bad:?} must fail its pattern check ({code}):\nstdout: {out}\nstderr: {err}"
        );
    }

    // Guest writes land in the overlay; the base stays as it was.
    qemu_io_ok(&["-f", "qcow2", "-n", "-c", "write -P 0xee 0 64k"], &disk);
    qemu_io_ok(
        &["-f", "qcow2", "-r", "-n", "-c", "read -P 0xee 0 64k", "-c", "read -P 0xab 64k 960k"],
        &disk,
    );
    qemu_io_ok(&["-f", "raw", "-r", "-c", "read -P 0xab 0 1M"], &base);

    unmount_clean(m);
}

/// Long-running holders keep the chain open while the disk is compared byte for byte with the
/// source: `qemu-nbd --persistent` on one instance disk (`cache=none`: the base is opened with
/// O_DIRECT) and `qemu-storage-daemon` on a second instance disk with the same base (default
/// cache: a buffered open of the same inode at the same time), as two VMs sharing one image.
/// While both hold the base, Nova's own short opens (`qemu-img create -b`, `qemu-img info`, a
/// plain read) work too. Then the holders stop cleanly.
#[test]
fn nbd_holders_keep_the_chain_open_while_the_disk_is_compared() {
    let s = Scratch::new();
    let src = SourceImage::create(&s.path("src"));
    let m = Mount::new(&s.base, &[]);
    let base = s.base.join(HASH);
    convert_to_raw(&src.qcow2, &base);
    let disk1 = s.path("instances/one/disk");
    let disk2 = s.path("instances/two/disk");
    overlay(&disk1, &base);

    let sock1 = s.path("nbd.sock");
    let mut nbd = Proc::spawn_logged(
        tool("qemu-nbd")
            .args([
                "--read-only",
                "--persistent",
                "--shared=4",
                "--cache=none",
                "-f",
                "qcow2",
                "-k",
            ])
            .arg(&sock1)
            .arg(&disk1),
        s.path("qemu-nbd.log"),
    );
    nbd.wait_for_socket(&sock1);
    nbd.wait_open(&base, Duration::from_secs(5));
    let uri1 = format!("nbd+unix:///?socket={}", sock1.display());

    // Nova spawns a second instance from the same base while the first one runs.
    overlay(&disk2, &base);
    let sock2 = s.path("qsd.sock");
    let mut qsd = Proc::spawn_logged(
        tool("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=qcow2,node-name=disk0,read-only=on,file.driver=file,file.filename={}",
                disk2.display()
            ))
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", sock2.display()))
            .args(["--export", "type=nbd,id=exp0,node-name=disk0,name=disk0"]),
        s.path("qsd.log"),
    );
    qsd.wait_for_socket(&sock2);
    assert!(qsd.has_open(&base), "qemu-storage-daemon does not hold {base:?} open");
    let uri2 = format!("nbd+unix:///disk0?socket={}", sock2.display());

    let out = run_ok(
        tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src.raw).arg(&uri1),
    );
    assert!(out.contains("Images are identical"), "{out}");
    let copy = s.path("copy.raw");
    run_ok(tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri2).arg(&copy));
    assert_same_bytes(&copy, &src.bytes);

    // Short opens of the held base: a plain read, and qemu-img info without --force-share
    // (the holders only read, so the shared "write" lock is granted).
    assert_same_bytes(&base, &src.bytes);
    let info = run_ok(tool("qemu-img").args(["info", "--output=json"]).arg(&base));
    assert_eq!(info_field(&info, "virtual-size"), Some(SRC_SIZE.to_string()), "{info}");

    // One holder goes away; the other still holds the base and still reads it correctly.
    qsd.stop();
    nbd.assert_alive();
    assert!(nbd.has_open(&base), "qemu-nbd no longer holds {base:?}");
    let out = run_ok(
        tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src.raw).arg(&uri1),
    );
    assert!(out.contains("Images are identical"), "{out}");
    qemu_io_ok(
        &["-f", "raw", "-r", "-c", "read -P 0 4M 5M", "-c", "read -P 0 52M 11M"],
        Path::new(&uri1),
    );

    nbd.stop();
    // Nothing happened to the base while it was held.
    assert_same_bytes(&base, &src.bytes);
    unmount_clean(m);
}

/// qemu's image locks (OFD locks on bytes 100+/200+) still work through the mount: while
/// `qemu-storage-daemon` has a qcow2 in the mount open for writing, a second writer and a
/// reader that wants no writers are refused with qemu's lock error; after the holder exits,
/// both succeed.
#[test]
fn qemu_image_locking_works_through_the_mount() {
    let s = Scratch::new();
    let m = Mount::new(&s.base, &[]);
    let y = s.base.join("ephemeral_1_0706d66");
    run_ok(tool("qemu-img").args(["create", "-f", "qcow2"]).arg(&y).arg("16M"));

    let sock = s.path("qsd.sock");
    let mut holder = Proc::spawn_logged(
        tool("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=file0,filename={},cache.direct=on", y.display()))
            .args(["--blockdev", "driver=qcow2,node-name=disk0,file=file0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", sock.display()))
            .args(["--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on"]),
        s.path("qsd.log"),
    );
    holder.wait_for_socket(&sock);
    assert!(holder.has_open(&y), "qemu-storage-daemon does not hold {y:?} open");
    // The holder is a live writer: write through its NBD export.
    let uri = format!("nbd+unix:///disk0?socket={}", sock.display());
    qemu_io_ok(&["-f", "raw", "-c", "write -P 0x77 0 64k"], Path::new(&uri));

    let (code, out, err) =
        run(tool("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x11 0 64k"]).arg(&y));
    assert!(
        code != 0 && err.contains("Failed to get \"write\" lock"),
        "a second writer must be refused with qemu's lock error ({code}):\nstdout: {out}\nstderr: {err}"
    );
    let (code, out, err) = run(tool("qemu-img").arg("info").arg(&y));
    assert!(
        code != 0 && err.contains("Failed to get shared \"write\" lock"),
        "qemu-img info without -U must be refused while a writer holds the image ({code}):\n\
         stdout: {out}\nstderr: {err}"
    );
    // What Nova runs (--force-share) takes no lock and works.
    let info = img_info(&y);
    assert_eq!(info_field(&info, "format").as_deref(), Some("qcow2"), "{info}");
    holder.assert_alive();

    holder.stop();
    qemu_io_ok(
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x77 0 64k",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "read -P 0x11 0 64k",
        ],
        &y,
    );
    run_ok(tool("qemu-img").arg("info").arg(&y));
    run_ok(tool("qemu-img").arg("check").arg(&y));
    unmount_clean(m);
}

/// SEEK_DATA/SEEK_HOLE pass through: `qemu-img map` of a sparse cache file reports the same
/// extents through the mount as on the covered file (reached by a bind mount made before the
/// overlay), and those extents are the source's data regions, not "all data".
#[test]
fn qemu_img_map_sees_the_same_holes_as_the_covered_file() {
    let s = Scratch::new();
    let src = SourceImage::create(&s.path("src"));
    let covered_dir = s.path("covered");
    let _bind = BindMount::new(&s.base, &covered_dir);
    let m = Mount::new(&s.base, &[]);
    let x = s.base.join(HASH);
    let covered = covered_dir.join(HASH);
    convert_to_raw(&src.qcow2, &x);

    let map = |p: &Path| {
        parse_map(&run_ok(tool("qemu-img").args(["map", "--output=json", "-f", "raw"]).arg(p)))
    };
    let on_covered = map(&covered);
    let through = map(&x);
    // Sanity of the premise: the covered file is sparse exactly where the source is.
    let covered_data: Vec<(u64, u64)> =
        on_covered.iter().filter(|e| e.data).map(|e| (e.start, e.length)).collect();
    assert_eq!(covered_data, merged_data_regions(), "covered file map: {on_covered:?}");
    assert!(on_covered.iter().any(|e| e.zero && !e.data), "no hole in {on_covered:?}");

    assert_eq!(through, on_covered, "qemu-img map through the mount differs from the covered file");
    assert_eq!(
        seek_data_extents(&x),
        seek_data_extents(&covered),
        "SEEK_DATA/SEEK_HOLE through the mount differ from the covered file"
    );
    // Strict compare also checks allocation status extent by extent.
    let out = run_ok(
        tool("qemu-img").args(["compare", "-s", "-f", "raw", "-F", "raw"]).arg(&src.raw).arg(&x),
    );
    assert!(out.contains("Images are identical"), "{out}");

    unmount_clean(m);
}
