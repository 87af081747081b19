//! Pass-through fidelity through a real mount. Every operation Nova, libvirt and QEMU do in
//! `_base` runs once on a plain directory and once through `imagecachefs` mounted over a
//! scratch directory (both on the same ext4), and must give the same results and the same
//! errno. Each comparison records a transcript of `label => result` lines per root and
//! compares the transcripts, so a failure names the first operation that differs.
//! `ICFS_SHOW_TRANSCRIPTS=1 cargo test --test overlay_ops -- --nocapture` prints them all.
//!
//! Also: data written through the mount is what the covered directory holds (and the
//! reverse), `stat` shows the covered file's identity, and a stopped daemon keeps serving the
//! handles that are still open.

mod common;

use common::{is_fuse, statfs_type, BindMount, Mount, Scratch};
use std::ffi::{CStr, CString};
use std::fmt::{self, Debug, Display};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Thin syscall layer: results are `Result<T, Errno>` so that errno values compare and print.

#[derive(Clone, Copy, PartialEq, Eq)]
struct Errno(i32);

impl Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EIO => "EIO",
            libc::ENXIO => "ENXIO",
            libc::E2BIG => "E2BIG",
            libc::EBADF => "EBADF",
            libc::EAGAIN => "EAGAIN",
            libc::EACCES => "EACCES",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::EXDEV => "EXDEV",
            libc::ENOTDIR => "ENOTDIR",
            libc::EISDIR => "EISDIR",
            libc::EINVAL => "EINVAL",
            libc::EFBIG => "EFBIG",
            libc::ENOSPC => "ENOSPC",
            libc::ESPIPE => "ESPIPE",
            libc::EROFS => "EROFS",
            libc::EMLINK => "EMLINK",
            libc::ERANGE => "ERANGE",
            libc::ENAMETOOLONG => "ENAMETOOLONG",
            libc::ENOSYS => "ENOSYS",
            libc::ENOTEMPTY => "ENOTEMPTY",
            libc::ELOOP => "ELOOP",
            libc::ENODATA => "ENODATA",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::ENOTCONN => "ENOTCONN",
            libc::ETXTBSY => "ETXTBSY",
            libc::EOVERFLOW => "EOVERFLOW",
            _ => return write!(f, "errno {}", self.0),
        };
        f.write_str(name)
    }
}

type Res<T> = Result<T, Errno>;

fn errno() -> Errno {
    Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

fn cvt(rc: libc::c_int) -> Res<i32> {
    if rc == -1 {
        Err(errno())
    } else {
        Ok(rc)
    }
}

fn cvt_len(rc: isize) -> Res<usize> {
    if rc < 0 {
        Err(errno())
    } else {
        Ok(rc as usize)
    }
}

fn cvt_off(rc: i64) -> Res<i64> {
    if rc < 0 {
        Err(errno())
    } else {
        Ok(rc)
    }
}

fn io_err(e: std::io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

fn cp(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn cs(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn open(p: &Path, flags: i32, mode: u32) -> Res<OwnedFd> {
    let fd = unsafe { libc::open(cp(p).as_ptr(), flags | libc::O_CLOEXEC, mode) };
    cvt(fd).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn openat(dir: &OwnedFd, name: &str, flags: i32, mode: u32) -> Res<OwnedFd> {
    let fd =
        unsafe { libc::openat(dir.as_raw_fd(), cs(name).as_ptr(), flags | libc::O_CLOEXEC, mode) };
    cvt(fd).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn opendir(p: &Path) -> Res<OwnedFd> {
    open(p, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

fn raw_stat(p: &Path) -> Res<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::stat(cp(p).as_ptr(), &mut st) })?;
    Ok(st)
}

fn raw_lstat(p: &Path) -> Res<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::lstat(cp(p).as_ptr(), &mut st) })?;
    Ok(st)
}

fn raw_fstat(fd: &OwnedFd) -> Res<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

fn raw_fstatat(dir: &OwnedFd, name: &str, flags: i32) -> Res<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstatat(dir.as_raw_fd(), cs(name).as_ptr(), &mut st, flags) })?;
    Ok(st)
}

/// The comparable part of a `stat`: no inode numbers, no times.
#[derive(Clone, PartialEq, Eq)]
struct Meta {
    mode: u32,
    size: i64,
    nlink: u64,
    uid: u32,
    gid: u32,
    rdev: u64,
}

impl Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mode={:o} size={} nlink={} uid={} gid={} rdev={:#x}",
            self.mode, self.size, self.nlink, self.uid, self.gid, self.rdev
        )
    }
}

fn meta(st: &libc::stat) -> Meta {
    Meta {
        mode: st.st_mode,
        size: st.st_size,
        nlink: st.st_nlink,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
    }
}

fn stat(p: &Path) -> Res<Meta> {
    raw_stat(p).map(|s| meta(&s))
}

fn lstat(p: &Path) -> Res<Meta> {
    raw_lstat(p).map(|s| meta(&s))
}

fn fstat(fd: &OwnedFd) -> Res<Meta> {
    raw_fstat(fd).map(|s| meta(&s))
}

fn write(fd: &OwnedFd, data: &[u8]) -> Res<usize> {
    cvt_len(unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) })
}

fn read(fd: &OwnedFd, len: usize) -> Res<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = cvt_len(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len) })?;
    buf.truncate(n);
    Ok(buf)
}

fn pwrite(fd: &OwnedFd, data: &[u8], off: i64) -> Res<usize> {
    cvt_len(unsafe { libc::pwrite(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), off) })
}

fn pread(fd: &OwnedFd, len: usize, off: i64) -> Res<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = cvt_len(unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len, off) })?;
    buf.truncate(n);
    Ok(buf)
}

fn write_all(fd: &OwnedFd, mut data: &[u8]) -> Res<()> {
    while !data.is_empty() {
        let n = write(fd, data)?;
        data = &data[n..];
    }
    Ok(())
}

fn read_fd_all(fd: &OwnedFd) -> Res<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let chunk = pread(fd, 1 << 20, out.len() as i64)?;
        if chunk.is_empty() {
            return Ok(out);
        }
        out.extend_from_slice(&chunk);
    }
}

/// Writes a whole file (create or truncate, mode 0644).
fn put(p: &Path, data: &[u8]) -> Res<()> {
    let fd = open(p, libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o644)?;
    write_all(&fd, data)
}

fn get(p: &Path) -> Res<Vec<u8>> {
    read_fd_all(&open(p, libc::O_RDONLY, 0)?)
}

/// A short text for transcripts: the content itself when small, else its length and digest.
fn digest(data: &[u8]) -> String {
    if data.len() <= 32 {
        return match std::str::from_utf8(data) {
            Ok(s) => format!("{s:?}"),
            Err(_) => format!("{data:02x?}"),
        };
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    format!("{} bytes fnv {h:016x}", data.len())
}

fn get_d(p: &Path) -> Res<String> {
    get(p).map(|d| digest(&d))
}

fn mkdir(p: &Path, mode: u32) -> Res<()> {
    cvt(unsafe { libc::mkdir(cp(p).as_ptr(), mode) }).map(drop)
}

fn rmdir(p: &Path) -> Res<()> {
    cvt(unsafe { libc::rmdir(cp(p).as_ptr()) }).map(drop)
}

fn unlink(p: &Path) -> Res<()> {
    cvt(unsafe { libc::unlink(cp(p).as_ptr()) }).map(drop)
}

fn rename(a: &Path, b: &Path) -> Res<()> {
    cvt(unsafe { libc::rename(cp(a).as_ptr(), cp(b).as_ptr()) }).map(drop)
}

fn rename2(a: &Path, b: &Path, flags: u32) -> Res<()> {
    cvt(unsafe {
        libc::renameat2(libc::AT_FDCWD, cp(a).as_ptr(), libc::AT_FDCWD, cp(b).as_ptr(), flags)
    })
    .map(drop)
}

fn link(a: &Path, b: &Path) -> Res<()> {
    cvt(unsafe { libc::link(cp(a).as_ptr(), cp(b).as_ptr()) }).map(drop)
}

fn symlink(target: &str, p: &Path) -> Res<()> {
    cvt(unsafe { libc::symlink(cs(target).as_ptr(), cp(p).as_ptr()) }).map(drop)
}

fn readlink(p: &Path, bufsize: usize) -> Res<String> {
    let mut buf = vec![0u8; bufsize];
    let n = cvt_len(unsafe { libc::readlink(cp(p).as_ptr(), buf.as_mut_ptr().cast(), bufsize) })?;
    buf.truncate(n);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn truncate(p: &Path, len: i64) -> Res<()> {
    cvt(unsafe { libc::truncate(cp(p).as_ptr(), len) }).map(drop)
}

fn ftruncate(fd: &OwnedFd, len: i64) -> Res<()> {
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

fn chmod(p: &Path, mode: u32) -> Res<()> {
    cvt(unsafe { libc::chmod(cp(p).as_ptr(), mode) }).map(drop)
}

fn chown(p: &Path, uid: u32, gid: u32) -> Res<()> {
    cvt(unsafe { libc::chown(cp(p).as_ptr(), uid, gid) }).map(drop)
}

fn lchown(p: &Path, uid: u32, gid: u32) -> Res<()> {
    cvt(unsafe { libc::lchown(cp(p).as_ptr(), uid, gid) }).map(drop)
}

fn lseek(fd: &OwnedFd, off: i64, whence: i32) -> Res<i64> {
    cvt_off(unsafe { libc::lseek(fd.as_raw_fd(), off, whence) })
}

fn fallocate(fd: &OwnedFd, mode: i32, off: i64, len: i64) -> Res<()> {
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, len) }).map(drop)
}

fn access(p: &Path, mode: i32) -> Res<()> {
    cvt(unsafe { libc::access(cp(p).as_ptr(), mode) }).map(drop)
}

fn utimens(p: &Path, times: [(i64, i64); 2], flags: i32) -> Res<()> {
    let ts = times.map(|(s, ns)| libc::timespec { tv_sec: s, tv_nsec: ns });
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, cp(p).as_ptr(), ts.as_ptr(), flags) }).map(drop)
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> Res<()> {
    cvt(unsafe {
        libc::setxattr(cp(p).as_ptr(), cs(name).as_ptr(), value.as_ptr().cast(), value.len(), flags)
    })
    .map(drop)
}

fn getxattr(p: &Path, name: &str, size: usize) -> Res<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let n = cvt_len(unsafe {
        libc::getxattr(cp(p).as_ptr(), cs(name).as_ptr(), buf.as_mut_ptr().cast(), size)
    })?;
    buf.truncate(n);
    Ok(buf)
}

fn getxattr_len(p: &Path, name: &str) -> Res<usize> {
    cvt_len(unsafe { libc::getxattr(cp(p).as_ptr(), cs(name).as_ptr(), std::ptr::null_mut(), 0) })
}

fn listxattr(p: &Path, size: usize) -> Res<Vec<String>> {
    let mut buf = vec![0u8; size];
    let n = cvt_len(unsafe { libc::listxattr(cp(p).as_ptr(), buf.as_mut_ptr().cast(), size) })?;
    let mut names: Vec<String> = buf[..n]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn removexattr(p: &Path, name: &str) -> Res<()> {
    cvt(unsafe { libc::removexattr(cp(p).as_ptr(), cs(name).as_ptr()) }).map(drop)
}

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Directory entries via `getdents64` with a caller-chosen buffer size (small buffers force
/// many READDIR requests and exercise the offsets): sorted `(name, d_type)`.
fn list_dir(p: &Path, bufsize: usize) -> Res<Vec<(String, u8)>> {
    Ok(list_dir_ino(p, bufsize)?.into_iter().map(|(n, t, _)| (n, t)).collect())
}

fn getdents(fd: &OwnedFd, bufsize: usize, out: &mut Vec<(String, u8, u64)>) -> Res<usize> {
    let mut buf = vec![0u8; bufsize];
    let n =
        unsafe { libc::syscall(libc::SYS_getdents64, fd.as_raw_fd(), buf.as_mut_ptr(), bufsize) };
    if n < 0 {
        return Err(errno());
    }
    let n = n as usize;
    let mut off = 0;
    while off < n {
        let ino = u64::from_ne_bytes(buf[off..off + 8].try_into().unwrap());
        let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
        let dtype = buf[off + 18];
        let name = CStr::from_bytes_until_nul(&buf[off + 19..off + reclen]).unwrap();
        out.push((name.to_string_lossy().into_owned(), dtype, ino));
        off += reclen;
    }
    Ok(n)
}

fn list_dir_ino(p: &Path, bufsize: usize) -> Res<Vec<(String, u8, u64)>> {
    let fd = opendir(p)?;
    let mut out = Vec::new();
    while getdents(&fd, bufsize, &mut out)? > 0 {}
    out.sort();
    Ok(out)
}

/// A recursive picture of a tree: path, type and content (or link target), sorted.
fn tree(p: &Path) -> Res<Vec<String>> {
    fn walk(base: &Path, rel: &Path, out: &mut Vec<String>) -> Res<()> {
        let dir = base.join(rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map_err(io_err)?
            .map(|e| e.map(|e| e.file_name()).map_err(io_err))
            .collect::<Res<_>>()?;
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let full = base.join(&r);
            let m = lstat(&full)?;
            let what = match m.mode & libc::S_IFMT {
                libc::S_IFREG => format!("file {:o} {}", m.mode & 0o7777, get_d(&full)?),
                libc::S_IFDIR => format!("dir {:o}", m.mode & 0o7777),
                libc::S_IFLNK => format!("link -> {}", readlink(&full, 4096)?),
                t => format!("type {t:o}"),
            };
            out.push(format!("{}: {what}", r.display()));
            if m.mode & libc::S_IFMT == libc::S_IFDIR {
                walk(base, &r, out)?;
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(p, Path::new(""), &mut out)?;
    Ok(out)
}

/// Changes the credentials of one fresh thread only (raw syscalls, not glibc's process-wide
/// wrappers) and runs `f` there: requests reach the daemon with that uid/gid.
fn as_user<T: Send>(uid: u32, gid: u32, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            unsafe {
                assert_eq!(libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<u32>()), 0);
                assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
            }
            f()
        })
        .join()
        .unwrap()
    })
}

/// A page-aligned buffer for `O_DIRECT`.
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn as_slice(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

// ---------------------------------------------------------------------------------------------
// The comparison harness.

/// The results of one run of a scenario, one `label => result` line per operation.
#[derive(Default)]
struct Log(Vec<String>);

impl Log {
    /// Records a result.
    fn rec<T: Debug>(&mut self, label: impl Display, v: T) {
        self.0.push(format!("{label} => {v:?}"));
    }

    /// Records a result and hands it back (to bind it, or to stop the scenario with `?`).
    fn ok<T: Debug>(&mut self, label: impl Display, v: Res<T>) -> Res<T> {
        self.0.push(format!("{label} => {v:?}"));
        v
    }

    /// Records only success or errno of an open (fd numbers differ between runs) and hands
    /// the fd back.
    fn fd(&mut self, label: impl Display, v: Res<OwnedFd>) -> Res<OwnedFd> {
        self.0.push(format!("{label} => {:?}", v.as_ref().map(|_| ())));
        v
    }

    /// Records only success or errno of an open that is closed at once.
    fn open(&mut self, label: impl Display, v: Res<OwnedFd>) {
        self.0.push(format!("{label} => {:?}", v.map(drop)));
    }
}

/// A scratch directory with `imagecachefs` mounted over `scratch.base`, and a plain directory
/// on the same file system to compare with.
struct Env {
    // Field order is drop order: the daemon stops before the scratch tree is removed.
    mount: Mount,
    bind: Option<BindMount>,
    plain: PathBuf,
    scratch: Scratch,
}

impl Env {
    fn new() -> Self {
        Self::build(false)
    }

    /// Also bind-mounts the covered directory (before the overlay), for `covered()`.
    fn with_covered() -> Self {
        Self::build(true)
    }

    fn build(with_bind: bool) -> Self {
        Self::build_with(with_bind, &[])
    }

    /// The daemon serves every read and write itself (the path taken where the kernel refuses
    /// passthrough); checked in the `config` status file.
    fn without_passthrough() -> Self {
        let env = Self::build_with(false, &["--no-passthrough"]);
        let config = std::fs::read_to_string(env.scratch.base.join(".imagecache/config")).unwrap();
        assert!(config.contains("passthrough: off"), "{config}");
        env
    }

    fn build_with(with_bind: bool, args: &[&str]) -> Self {
        let scratch = Scratch::new();
        let plain = scratch.path("plain");
        std::fs::create_dir(&plain).unwrap();
        let bind = with_bind.then(|| BindMount::new(&scratch.base, &scratch.path("bind")));
        let mount = Mount::new(&scratch.base, args);
        Env { mount, bind, plain, scratch }
    }

    /// Where `p` (under either root) is on disk: through the bind mount for a path in the
    /// mount, `p` itself for a path in the plain directory.
    fn covered(&self, p: &Path) -> PathBuf {
        match (p.strip_prefix(&self.scratch.base), &self.bind) {
            (Ok(rel), Some(b)) => b.target.join(rel),
            (Ok(_), None) => panic!("Env::covered needs Env::with_covered()"),
            (Err(_), _) => p.to_path_buf(),
        }
    }

    /// Opens the scratch root to every user (the as-user tests walk through it).
    fn open_to_all(&self) {
        chmod(self.scratch.tmp.path(), 0o755).unwrap();
    }

    fn log_tail(&self) -> String {
        let log = self.mount.log_text();
        let start = log.len().saturating_sub(3000);
        let start = (start..log.len()).find(|i| log.is_char_boundary(*i)).unwrap_or(0);
        log[start..].to_string()
    }

    /// Runs `f` on the plain directory, then through the mount; the transcripts (and the final
    /// results) must be identical.
    fn same<T: Debug>(&self, what: &str, f: impl Fn(&Path, &mut Log) -> T) {
        let run = |root: &Path| {
            let mut log = Log::default();
            let r = f(root, &mut log);
            log.0.push(format!("result => {r:?}"));
            log.0
        };
        let want = run(&self.plain);
        let got = run(&self.scratch.base);
        if std::env::var_os("ICFS_SHOW_TRANSCRIPTS").is_some() {
            eprintln!("=== {what} (plain | mount)\n{}", want.join("\n"));
        }
        if want == got {
            return;
        }
        let mut msg = format!("{what}: the mount differs from the plain directory\n");
        for i in 0..want.len().max(got.len()) {
            let w = want.get(i).map(String::as_str).unwrap_or("<missing>");
            let g = got.get(i).map(String::as_str).unwrap_or("<missing>");
            if w == g {
                msg += &format!("    {w}\n");
            } else {
                msg += &format!("  - plain: {w}\n  + mount: {g}\n");
            }
        }
        msg += &format!("--- daemon log (tail) ---\n{}", self.log_tail());
        panic!("{msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// Lookups, creates, opens.

#[test]
fn lookup_and_stat_of_existing_and_missing_names() {
    let env = Env::new();
    env.same("lookup/stat", |r, t| -> Res<()> {
        t.ok("put f", put(&r.join("f"), b"hello"))?;
        t.ok("mkdir d", mkdir(&r.join("d"), 0o755))?;
        t.ok("symlink l -> f", symlink("f", &r.join("l")))?;
        t.ok("symlink dangling", symlink("nowhere", &r.join("dangling")))?;
        for name in ["f", "d", "l", "dangling", "missing", "f/x", "d/missing", "missing/x", "d/"] {
            t.rec(format!("stat {name}"), stat(&r.join(name)));
            t.rec(format!("lstat {name}"), lstat(&r.join(name)));
        }
        // A name looked up while missing, then created through the mount, must be found.
        t.rec("stat late (missing)", stat(&r.join("late")));
        t.ok("put late", put(&r.join("late"), b"x"))?;
        t.rec("stat late (created)", stat(&r.join("late")));
        t.rec("get late", get_d(&r.join("late")));
        t.open("open f O_DIRECTORY", open(&r.join("f"), libc::O_RDONLY | libc::O_DIRECTORY, 0));
        t.open("open d O_WRONLY", open(&r.join("d"), libc::O_WRONLY, 0));
        t.open("open d O_RDONLY", open(&r.join("d"), libc::O_RDONLY, 0));
        t.open("open missing", open(&r.join("missing"), libc::O_RDONLY, 0));
        t.open("open l O_NOFOLLOW", open(&r.join("l"), libc::O_RDONLY | libc::O_NOFOLLOW, 0));
        let fd = t.fd("open l", open(&r.join("l"), libc::O_RDONLY, 0))?;
        t.rec("fstat via l", fstat(&fd));
        t.rec("read via l", read(&fd, 100).map(|d| digest(&d)));
        Ok(())
    });
}

#[test]
fn create_exclusive_twice_is_eexist() {
    let env = Env::new();
    env.same("O_CREAT|O_EXCL", |r, t| -> Res<()> {
        let excl = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
        let fd = t.fd("create x", open(&r.join("x"), excl, 0o640))?;
        t.rec("fstat new", fstat(&fd));
        t.rec("write", write(&fd, b"first"));
        drop(fd);
        t.open("create x again", open(&r.join("x"), excl, 0o640));
        t.rec("content kept", get_d(&r.join("x")));
        t.ok("mkdir d", mkdir(&r.join("d"), 0o755))?;
        t.open("create over dir", open(&r.join("d"), excl, 0o640));
        t.ok("symlink dangling", symlink("target", &r.join("s")))?;
        t.open("create over dangling symlink", open(&r.join("s"), excl, 0o640));
        t.rec("target not created", lstat(&r.join("target")));
        t.open("create in missing dir", open(&r.join("nodir/x"), excl, 0o640));
        t.open("create under a file", open(&r.join("x/y"), excl, 0o640));
        // Without O_EXCL an existing file is opened as it is.
        let fd =
            t.fd("O_CREAT existing", open(&r.join("x"), libc::O_CREAT | libc::O_RDWR, 0o600))?;
        t.rec("fstat existing", fstat(&fd));
        t.rec("read existing", read(&fd, 100).map(|d| digest(&d)));
        let rw_excl = libc::O_CREAT | libc::O_EXCL | libc::O_RDWR;
        let fd = t.fd("create mode 0", open(&r.join("zero"), rw_excl, 0))?;
        t.rec("write to mode-0 file via creating fd", write(&fd, b"ok"));
        t.rec("stat mode-0 file", stat(&r.join("zero")));
        Ok(())
    });
}

#[test]
fn open_o_direct_with_aligned_buffers() {
    open_o_direct_with_aligned_buffers_in(Env::new(), true);
}

/// Without passthrough the daemon does the I/O: it never sees the caller's buffer address,
/// so only a misaligned buffer is not refused; offsets and lengths are.
#[test]
fn open_o_direct_with_aligned_buffers_without_passthrough() {
    open_o_direct_with_aligned_buffers_in(Env::without_passthrough(), false);
}

fn open_o_direct_with_aligned_buffers_in(env: Env, buffer_alignment_checked: bool) {
    env.same("O_DIRECT", |r, t| -> Res<()> {
        let p = r.join("direct.raw");
        let flags = libc::O_CREAT | libc::O_RDWR | libc::O_DIRECT;
        let fd = t.fd("open O_DIRECT", open(&p, flags, 0o644))?;
        let fl = t.ok("F_GETFL", cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) }));
        t.rec("O_DIRECT kept", fl.map(|f| f & libc::O_DIRECT != 0));
        let mut buf = Aligned::new(64 << 10);
        buf.as_mut().copy_from_slice(&pattern(64 << 10, 1));
        t.rec("pwrite 64K @0", pwrite(&fd, buf.as_slice(), 0));
        buf.as_mut().copy_from_slice(&pattern(64 << 10, 2));
        t.rec("pwrite 64K @128K", pwrite(&fd, buf.as_slice(), 128 << 10));
        t.rec("fstat", fstat(&fd));
        let mut rb = Aligned::new(64 << 10);
        let n = cvt_len(unsafe {
            libc::pread(fd.as_raw_fd(), rb.as_mut().as_mut_ptr().cast(), 64 << 10, 128 << 10)
        });
        t.rec("pread 64K @128K", n);
        t.rec("read back", digest(rb.as_slice()));
        t.rec("matches written", rb.as_slice() == pattern(64 << 10, 2).as_slice());
        let n = cvt_len(unsafe {
            libc::pread(fd.as_raw_fd(), rb.as_mut().as_mut_ptr().cast(), 4096, 192 << 10)
        });
        t.rec("pread at EOF", n);
        // Misaligned buffer and offset are refused by the covered file system.
        if buffer_alignment_checked {
            let n = cvt_len(unsafe {
                libc::pread(fd.as_raw_fd(), rb.as_mut().as_mut_ptr().add(1).cast(), 4096, 0)
            });
            t.rec("pread misaligned buffer", n);
        }
        t.rec("pread misaligned length", pread(&fd, 100, 0).map(|d| d.len()));
        t.rec("pwrite misaligned offset", pwrite(&fd, &buf.as_slice()[..4096], 1));
        drop(fd);
        let whole = get(&p)?;
        t.rec("buffered read of the whole file", digest(&whole));
        t.rec("hole in the middle is zero", whole[64 << 10..128 << 10].iter().all(|b| *b == 0));
        Ok(())
    });
}

#[test]
fn open_o_trunc_and_o_append() {
    open_o_trunc_and_o_append_in(Env::new());
}

#[test]
fn open_o_trunc_and_o_append_without_passthrough() {
    open_o_trunc_and_o_append_in(Env::without_passthrough());
}

fn open_o_trunc_and_o_append_in(env: Env) {
    env.same("O_TRUNC/O_APPEND", |r, t| -> Res<()> {
        let p = r.join("f");
        t.ok("put", put(&p, b"hello world"))?;
        let fd = t.fd("open O_TRUNC", open(&p, libc::O_WRONLY | libc::O_TRUNC, 0))?;
        t.rec("fstat after O_TRUNC", fstat(&fd));
        t.rec("stat after O_TRUNC", stat(&p));
        t.rec("write", write(&fd, b"abc"));
        drop(fd);
        t.rec("content", get_d(&p));
        let fd = t.fd("open O_APPEND", open(&p, libc::O_WRONLY | libc::O_APPEND, 0))?;
        t.rec("append 1", write(&fd, b"1"));
        t.rec("seek 0", lseek(&fd, 0, libc::SEEK_SET));
        t.rec("append 2 after seek", write(&fd, b"2"));
        t.rec("pwrite @0 appends on Linux", pwrite(&fd, b"3", 0));
        t.rec("offset", lseek(&fd, 0, libc::SEEK_CUR));
        let fd2 = t.fd("second O_APPEND fd", open(&p, libc::O_WRONLY | libc::O_APPEND, 0))?;
        t.rec("append via fd2", write(&fd2, b"xy"));
        t.rec("append via fd1", write(&fd, b"z"));
        t.rec("content", get_d(&p));
        // O_TRUNC with O_RDONLY still truncates on Linux.
        let fd = t.fd("open O_RDONLY|O_TRUNC", open(&p, libc::O_RDONLY | libc::O_TRUNC, 0))?;
        t.rec("fstat", fstat(&fd));
        t.rec("stat", stat(&p));
        t.open("O_TRUNC on a dir", open(r, libc::O_RDWR | libc::O_TRUNC, 0));
        Ok(())
    });
}

#[test]
fn read_write_pread_pwrite() {
    read_write_pread_pwrite_in(Env::new());
}

#[test]
fn read_write_pread_pwrite_without_passthrough() {
    read_write_pread_pwrite_in(Env::without_passthrough());
}

fn read_write_pread_pwrite_in(env: Env) {
    env.same("read/write", |r, t| -> Res<()> {
        let p = r.join("data");
        let fd = t.fd("create", open(&p, libc::O_CREAT | libc::O_RDWR, 0o644))?;
        let data = pattern(1 << 20, 3);
        for (i, chunk) in data.chunks(300_000).enumerate() {
            t.rec(format!("write chunk {i}"), write(&fd, chunk));
        }
        t.rec("offset", lseek(&fd, 0, libc::SEEK_CUR));
        t.rec("pread 4096 @1000", pread(&fd, 4096, 1000).map(|d| digest(&d)));
        t.rec("pwrite @5M", pwrite(&fd, b"tail", 5 << 20));
        t.rec("fstat", fstat(&fd));
        t.rec("SEEK_END", lseek(&fd, 0, libc::SEEK_END));
        t.rec("read at EOF", read(&fd, 10).map(|d| d.len()));
        t.rec("pread past EOF", pread(&fd, 10, 6 << 20).map(|d| d.len()));
        t.rec("pread across EOF", pread(&fd, 10, (5 << 20) + 2).map(|d| digest(&d)));
        t.rec("SEEK_SET -1", lseek(&fd, -1, libc::SEEK_SET));
        t.rec("SEEK_SET 10", lseek(&fd, 10, libc::SEEK_SET));
        t.rec("read 5 @10", read(&fd, 5).map(|d| digest(&d)));
        t.rec("overwrite @10", write(&fd, b"XXXX"));
        t.rec("pread over the seam", pread(&fd, 12, 8).map(|d| digest(&d)));
        drop(fd);
        t.rec("whole file", get_d(&p));
        let ro = t.fd("open O_RDONLY", open(&p, libc::O_RDONLY, 0))?;
        t.rec("write to O_RDONLY", write(&ro, b"x"));
        let wo = t.fd("open O_WRONLY", open(&p, libc::O_WRONLY, 0))?;
        t.rec("read from O_WRONLY", read(&wo, 4));
        let d = t.fd("open dir", opendir(r))?;
        t.rec("read from a dir", read(&d, 4));
        // Two fds on one file see each other's writes at once.
        t.rec("pwrite via wo", pwrite(&wo, b"shared", 100));
        t.rec("pread via ro", pread(&ro, 6, 100).map(|d| digest(&d)));
        Ok(())
    });
}

#[test]
fn mmap_shared_read_and_write() {
    mmap_shared_read_and_write_in(Env::new());
}

#[test]
fn mmap_shared_read_and_write_without_passthrough() {
    mmap_shared_read_and_write_in(Env::without_passthrough());
}

fn mmap_shared_read_and_write_in(env: Env) {
    env.same("mmap", |r, t| -> Res<()> {
        let p = r.join("m");
        t.ok("put", put(&p, &pattern(64 << 10, 4)))?;
        let fd = t.fd("open rw", open(&p, libc::O_RDWR, 0))?;
        let len = 64 << 10;
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        let ok = map != libc::MAP_FAILED;
        t.ok("mmap shared rw", if ok { Ok(()) } else { Err(errno()) })?;
        let mem = unsafe { std::slice::from_raw_parts_mut(map.cast::<u8>(), len) };
        t.rec("mapped content", digest(mem));
        mem[100..105].copy_from_slice(b"MMAP!");
        t.rec("msync", cvt(unsafe { libc::msync(map, len, libc::MS_SYNC) }));
        t.rec("munmap", cvt(unsafe { libc::munmap(map, len) }));
        t.rec("pread sees the store", pread(&fd, 5, 100).map(|d| digest(&d)));
        drop(fd);
        t.rec("file", get_d(&p));
        let ro = t.fd("open ro", open(&p, libc::O_RDONLY, 0))?;
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_WRITE,
                libc::MAP_SHARED,
                ro.as_raw_fd(),
                0,
            )
        };
        let res = if map == libc::MAP_FAILED {
            Err(errno())
        } else {
            unsafe { libc::munmap(map, len) };
            Ok(())
        };
        t.rec("writable shared map of an O_RDONLY fd", res);
        Ok(())
    });
}

#[test]
fn fsync_and_fdatasync() {
    fsync_and_fdatasync_in(Env::new());
}

#[test]
fn fsync_and_fdatasync_without_passthrough() {
    fsync_and_fdatasync_in(Env::without_passthrough());
}

fn fsync_and_fdatasync_in(env: Env) {
    env.same("fsync", |r, t| -> Res<()> {
        let p = r.join("f");
        let fd = t.fd("create", open(&p, libc::O_CREAT | libc::O_WRONLY, 0o644))?;
        t.rec("write", write(&fd, &pattern(100_000, 5)));
        t.rec("fsync", cvt(unsafe { libc::fsync(fd.as_raw_fd()) }));
        t.rec("fdatasync", cvt(unsafe { libc::fdatasync(fd.as_raw_fd()) }));
        let ro = t.fd("open ro", open(&p, libc::O_RDONLY, 0))?;
        t.rec("fsync ro", cvt(unsafe { libc::fsync(ro.as_raw_fd()) }));
        t.rec("fdatasync ro", cvt(unsafe { libc::fdatasync(ro.as_raw_fd()) }));
        let d = t.fd("open dir", opendir(r))?;
        t.rec("fsync dir", cvt(unsafe { libc::fsync(d.as_raw_fd()) }));
        let dsync = open(&p, libc::O_WRONLY | libc::O_DSYNC | libc::O_SYNC, 0);
        let dsync = t.fd("open O_SYNC", dsync)?;
        t.rec("write O_SYNC", pwrite(&dsync, b"sync", 10));
        t.rec(
            "sync_file_range",
            cvt(unsafe {
                libc::sync_file_range(fd.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
            }),
        );
        drop(fd);
        t.rec("content", get_d(&p));
        Ok(())
    });
}

#[test]
fn ftruncate_and_truncate() {
    ftruncate_and_truncate_in(Env::new());
}

#[test]
fn ftruncate_and_truncate_without_passthrough() {
    ftruncate_and_truncate_in(Env::without_passthrough());
}

fn ftruncate_and_truncate_in(env: Env) {
    env.same("truncate", |r, t| -> Res<()> {
        let p = r.join("f");
        t.ok("put", put(&p, &pattern(100, 6)))?;
        let reader = t.fd("open reader", open(&p, libc::O_RDONLY, 0))?;
        t.rec("read before", pread(&reader, 200, 0).map(|d| d.len()));
        t.rec("truncate grow", truncate(&p, 10_000));
        t.rec("stat", stat(&p));
        t.rec("content", get_d(&p));
        t.rec("reader sees growth", pread(&reader, 20_000, 0).map(|d| digest(&d)));
        t.rec("truncate shrink", truncate(&p, 3));
        t.rec("reader sees shrink", pread(&reader, 200, 0).map(|d| digest(&d)));
        t.rec("fstat reader", fstat(&reader));
        let fd = t.fd("open rw", open(&p, libc::O_RDWR, 0))?;
        t.rec("ftruncate 0", ftruncate(&fd, 0));
        t.rec("fstat", fstat(&fd));
        t.rec("ftruncate 1G (sparse)", ftruncate(&fd, 1 << 30));
        t.rec("stat", stat(&p));
        t.rec("blocks of sparse file", raw_stat(&p).map(|s| s.st_blocks));
        t.rec("ftruncate -1", ftruncate(&fd, -1));
        t.rec("ftruncate O_RDONLY", ftruncate(&reader, 0));
        t.rec("truncate missing", truncate(&r.join("missing"), 0));
        t.rec("truncate dir", truncate(r, 0));
        t.rec("truncate -1", truncate(&p, -1));
        t.ok("symlink", symlink("f", &r.join("l")))?;
        t.rec("truncate via symlink", truncate(&r.join("l"), 7));
        t.rec("stat", stat(&p));
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Attributes.

#[test]
fn chmod_and_fchmod() {
    let env = Env::new();
    env.same("chmod", |r, t| -> Res<()> {
        let p = r.join("f");
        t.ok("put", put(&p, b"x"))?;
        for mode in [0o600, 0o755, 0o4755, 0o2755, 0o1644, 0o000, 0o7777] {
            t.rec(format!("chmod {mode:o}"), chmod(&p, mode));
            t.rec("stat", stat(&p));
        }
        t.ok("mkdir", mkdir(&r.join("d"), 0o755))?;
        t.rec("chmod dir 1777", chmod(&r.join("d"), 0o1777));
        t.rec("stat dir", stat(&r.join("d")));
        let fd = t.fd("open", open(&p, libc::O_RDONLY, 0))?;
        t.rec("fchmod 640", cvt(unsafe { libc::fchmod(fd.as_raw_fd(), 0o640) }));
        t.rec("fstat", fstat(&fd));
        t.ok("symlink", symlink("f", &r.join("l")))?;
        t.rec("chmod via symlink", chmod(&r.join("l"), 0o604));
        t.rec("stat target", stat(&p));
        t.rec("lstat link", lstat(&r.join("l")));
        t.rec("chmod missing", chmod(&r.join("missing"), 0o644));
        Ok(())
    });
}

#[test]
fn chown_to_another_uid_and_gid() {
    let env = Env::new();
    env.same("chown", |r, t| -> Res<()> {
        let p = r.join("f");
        t.ok("put", put(&p, b"x"))?;
        t.rec("chown 1234:5678", chown(&p, 1234, 5678));
        t.rec("stat", stat(&p));
        t.rec("chown -1:42", chown(&p, u32::MAX, 42));
        t.rec("stat", stat(&p));
        t.rec("chown 77:-1", chown(&p, 77, u32::MAX));
        t.rec("stat", stat(&p));
        // chown clears set-id bits of a regular file, even for root.
        t.rec("chmod 6755", chmod(&p, 0o6755));
        t.rec("chown 1:1", chown(&p, 1, 1));
        t.rec("stat (set-id cleared)", stat(&p));
        let fd = t.fd("open", open(&p, libc::O_RDONLY, 0))?;
        t.rec("fchown 0:0", cvt(unsafe { libc::fchown(fd.as_raw_fd(), 0, 0) }));
        t.rec("fstat", fstat(&fd));
        t.ok("symlink", symlink("f", &r.join("l")))?;
        t.rec("lchown link 9:9", lchown(&r.join("l"), 9, 9));
        t.rec("lstat link", lstat(&r.join("l")));
        t.rec("stat target", stat(&p));
        t.rec("chown via link 3:4", chown(&r.join("l"), 3, 4));
        t.rec("stat target", stat(&p));
        t.ok("mkdir", mkdir(&r.join("d"), 0o2775))?;
        t.rec("chown dir 1000:1000", chown(&r.join("d"), 1000, 1000));
        t.rec("stat dir (sgid kept)", stat(&r.join("d")));
        t.rec("chown missing", chown(&r.join("missing"), 1, 1));
        Ok(())
    });
}

fn times_of(p: &Path, follow: bool) -> Res<[(i64, i64); 2]> {
    let s = if follow { raw_stat(p)? } else { raw_lstat(p)? };
    Ok([(s.st_atime, s.st_atime_nsec), (s.st_mtime, s.st_mtime_nsec)])
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Whether a timestamp is "now" (within a second of the interval around the call).
fn is_recent(ts: (i64, i64), before: i64, after: i64) -> bool {
    ts.0 >= before - 1 && ts.0 <= after + 1
}

#[test]
fn utimensat_explicit_now_and_omit() {
    let env = Env::new();
    env.same("utimensat", |r, t| -> Res<()> {
        let p = r.join("f");
        t.ok("put", put(&p, b"x"))?;
        let a = (1_000_000_000, 123_456_789);
        let m = (1_100_000_000, 987_654_321);
        t.rec("set atime+mtime", utimens(&p, [a, m], 0));
        t.rec("times", times_of(&p, true));
        t.rec("omit atime", utimens(&p, [(0, libc::UTIME_OMIT), (1_200_000_000, 5)], 0));
        t.rec("times", times_of(&p, true));
        t.rec("omit mtime", utimens(&p, [(1_300_000_000, 0), (0, libc::UTIME_OMIT)], 0));
        t.rec("times", times_of(&p, true));
        t.rec("omit both", utimens(&p, [(0, libc::UTIME_OMIT), (0, libc::UTIME_OMIT)], 0));
        t.rec("times", times_of(&p, true));
        let before = now();
        t.rec(
            "now atime, omit mtime",
            utimens(&p, [(0, libc::UTIME_NOW), (0, libc::UTIME_OMIT)], 0),
        );
        let after = now();
        let ts = times_of(&p, true)?;
        t.rec("atime is now", is_recent(ts[0], before, after));
        t.rec("mtime kept", ts[1]);
        let before = now();
        t.rec("now both", utimens(&p, [(0, libc::UTIME_NOW), (0, libc::UTIME_NOW)], 0));
        let after = now();
        let ts = times_of(&p, true)?;
        t.rec("both now", (is_recent(ts[0], before, after), is_recent(ts[1], before, after)));
        t.rec("back to the past", utimens(&p, [a, m], 0));
        // NULL times: both now (what `touch` does).
        let before = now();
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, cp(&p).as_ptr(), std::ptr::null(), 0) };
        t.rec("utimensat NULL", cvt(rc));
        let ts = times_of(&p, true)?;
        t.rec("NULL sets now", (is_recent(ts[0], before, now()), is_recent(ts[1], before, now())));
        let fd = t.fd("open", open(&p, libc::O_RDONLY, 0))?;
        let ts =
            [libc::timespec { tv_sec: 5, tv_nsec: 6 }, libc::timespec { tv_sec: 7, tv_nsec: 8 }];
        t.rec("futimens", cvt(unsafe { libc::futimens(fd.as_raw_fd(), ts.as_ptr()) }));
        t.rec("times", times_of(&p, true));
        t.ok("symlink", symlink("f", &r.join("l")))?;
        t.rec(
            "lutimens link",
            utimens(&r.join("l"), [(11, 0), (12, 0)], libc::AT_SYMLINK_NOFOLLOW),
        );
        t.rec("link times", times_of(&r.join("l"), false));
        t.rec("target times unchanged", times_of(&p, true));
        t.rec("utimens missing", utimens(&r.join("missing"), [a, m], 0));
        t.rec("invalid nsec", utimens(&p, [(1, 2_000_000_000), m], 0));
        t.ok("mkdir", mkdir(&r.join("d"), 0o755))?;
        t.rec("utimens dir", utimens(&r.join("d"), [a, m], 0));
        t.rec("dir times", times_of(&r.join("d"), true));
        // A write moves mtime forward to now.
        let before = now();
        t.rec("put again", put(&p, b"yy"));
        let ts = times_of(&p, true)?;
        t.rec("mtime after write is now", is_recent(ts[1], before, now()));
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Directories.

#[test]
fn readdir_names_and_d_type() {
    let env = Env::new();
    env.same("readdir", |r, t| -> Res<()> {
        let d = r.join("d");
        t.ok("mkdir", mkdir(&d, 0o755))?;
        t.rec("empty dir", list_dir(&d, 4096));
        t.ok("file", put(&d.join("file"), b"x"))?;
        t.ok("subdir", mkdir(&d.join("sub"), 0o700))?;
        t.ok("symlink", symlink("file", &d.join("link")))?;
        t.ok("fifo", cvt(unsafe { libc::mkfifo(cp(&d.join("fifo")).as_ptr(), 0o644) }))?;
        let sock =
            cvt(unsafe { libc::mknod(cp(&d.join("sock")).as_ptr(), libc::S_IFSOCK | 0o644, 0) });
        t.ok("socket", sock)?;
        let dev = libc::makedev(1, 3);
        let chr =
            cvt(unsafe { libc::mknod(cp(&d.join("chr")).as_ptr(), libc::S_IFCHR | 0o600, dev) });
        t.ok("char dev", chr)?;
        t.rec("entries", list_dir(&d, 4096));
        t.rec("entries, 100-byte buffer", list_dir(&d, 100));
        t.rec("entries via std", {
            let mut v: Vec<_> = std::fs::read_dir(&d)
                .map_err(io_err)?
                .map(|e| {
                    let e = e.unwrap();
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        format!("{:?}", e.file_type().unwrap()),
                    )
                })
                .collect();
            v.sort();
            v
        });
        t.rec("unlink file", unlink(&d.join("file")));
        t.rec("entries after unlink", list_dir(&d, 4096));
        t.rec("opendir a file", opendir(&d.join("fifo")).map(drop));
        t.rec("opendir missing", opendir(&d.join("missing")).map(drop));
        t.rec("getdents on a file", {
            put(&d.join("file2"), b"y")?;
            let fd = open(&d.join("file2"), libc::O_RDONLY, 0)?;
            getdents(&fd, 4096, &mut Vec::new())
        });
        Ok(())
    });
}

#[test]
fn readdir_of_2000_entries_like_ls() {
    common::require_tool("ls");
    let env = Env::new();
    env.same("2000 entries", |r, t| -> Res<()> {
        let d = r.join("big");
        t.ok("mkdir", mkdir(&d, 0o755))?;
        for i in 0..2000u32 {
            let name = match i % 4 {
                0 => format!("{:040x}", u128::from(i) * 0x9e37_79b9_7f4a_7c15),
                1 => format!("{:040x}_10", u128::from(i) * 0x9e37_79b9_7f4a_7c15),
                2 => format!("ephemeral_{i}_40d1d2c"),
                _ => format!("swap_{i}"),
            };
            let res = put(&d.join(&name), &i.to_le_bytes());
            if res.is_err() {
                t.ok(format!("put {name}"), res)?;
            }
        }
        let all = list_dir(&d, 32 << 10)?;
        t.rec("count", all.len());
        t.rec("all names", digest(format!("{all:?}").as_bytes()));
        let small = list_dir(&d, 512)?;
        t.rec("512-byte buffer gives the same listing", small == all);
        let mut dedup = small.clone();
        dedup.dedup();
        t.rec("no duplicates", dedup.len() == small.len());
        // Rewind half-way through and read everything again.
        let fd = opendir(&d)?;
        let mut first = Vec::new();
        getdents(&fd, 4096, &mut first)?;
        t.rec("rewind", lseek(&fd, 0, libc::SEEK_SET));
        let mut again = Vec::new();
        while getdents(&fd, 4096, &mut again)? > 0 {}
        again.sort();
        t.rec(
            "after rewind",
            again.iter().map(|(n, ty, _)| (n.clone(), *ty)).eq(all.iter().cloned()),
        );
        let out = Command::new("ls")
            .args(["-lAn", "--time-style=+X", "big"])
            .current_dir(r)
            .output()
            .map_err(io_err)?;
        t.rec("ls status", out.status.code());
        t.rec("ls stderr", String::from_utf8_lossy(&out.stderr).into_owned());
        t.rec("ls lines", out.stdout.split(|b| *b == b'\n').count());
        t.rec("ls -lAn output", digest(&out.stdout));
        let first_lines: Vec<_> =
            String::from_utf8_lossy(&out.stdout).lines().take(4).map(String::from).collect();
        t.rec("ls head", first_lines);
        Ok(())
    });
}

#[test]
fn mkdir_and_rmdir() {
    let env = Env::new();
    env.same("mkdir/rmdir", |r, t| -> Res<()> {
        let d = r.join("d");
        t.rec("mkdir 0750", mkdir(&d, 0o750));
        t.rec("stat", stat(&d));
        t.rec("mkdir again", mkdir(&d, 0o755));
        t.rec("mkdir over file", {
            put(&r.join("f"), b"x")?;
            mkdir(&r.join("f"), 0o755)
        });
        t.rec("mkdir in missing", mkdir(&r.join("no/d"), 0o755));
        t.rec("mkdir under file", mkdir(&r.join("f/d"), 0o755));
        t.rec("mkdir sub", mkdir(&d.join("sub"), 0o755));
        t.rec("parent nlink", stat(&d));
        t.rec("rmdir non-empty", rmdir(&d));
        t.rec("put in sub", put(&d.join("sub/x"), b"x"));
        t.rec("rmdir non-empty sub", rmdir(&d.join("sub")));
        t.rec("unlink x", unlink(&d.join("sub/x")));
        t.rec("rmdir sub", rmdir(&d.join("sub")));
        t.rec("parent nlink", stat(&d));
        t.rec("rmdir missing", rmdir(&r.join("missing")));
        t.rec("rmdir file", rmdir(&r.join("f")));
        t.rec("rmdir dot", rmdir(&d.join(".")));
        t.ok("symlink to dir", symlink("d", &r.join("ld")))?;
        t.rec("rmdir symlink", rmdir(&r.join("ld")));
        t.rec("rmdir", rmdir(&d));
        t.rec("stat gone", stat(&d));
        t.rec("mkdir mode 7777", mkdir(&d, 0o7777));
        t.rec("stat", stat(&d));
        Ok(())
    });
}

#[test]
fn unlink_files_links_and_open_files() {
    let env = Env::new();
    env.same("unlink", |r, t| -> Res<()> {
        let p = r.join("f");
        t.ok("put", put(&p, b"contents"))?;
        t.ok("symlink", symlink("f", &r.join("l")))?;
        t.rec("unlink symlink", unlink(&r.join("l")));
        t.rec("target stays", stat(&p));
        let fd = t.fd("open", open(&p, libc::O_RDWR, 0))?;
        t.rec("unlink open file", unlink(&p));
        t.rec("stat gone", stat(&p));
        t.rec("fstat open fd", fstat(&fd));
        t.rec("read via open fd", pread(&fd, 100, 0).map(|d| digest(&d)));
        t.rec("write via open fd", pwrite(&fd, b"more", 8));
        t.rec("read again", pread(&fd, 100, 0).map(|d| digest(&d)));
        t.rec("new file at same name", put(&p, b"new"));
        t.rec("new content", get_d(&p));
        t.rec("old fd still old", pread(&fd, 100, 0).map(|d| digest(&d)));
        t.rec("unlink missing", unlink(&r.join("missing")));
        t.ok("mkdir", mkdir(&r.join("d"), 0o755))?;
        t.rec("unlink dir", unlink(&r.join("d")));
        let dfd = opendir(r)?;
        let rc = unsafe { libc::unlinkat(dfd.as_raw_fd(), cs("f").as_ptr(), libc::AT_REMOVEDIR) };
        t.rec("unlinkat AT_REMOVEDIR on file", cvt(rc));
        let rc = unsafe { libc::unlinkat(dfd.as_raw_fd(), cs("d").as_ptr(), libc::AT_REMOVEDIR) };
        t.rec("unlinkat AT_REMOVEDIR on dir", cvt(rc));
        t.rec("unlink under file", unlink(&r.join("f/x")));
        Ok(())
    });
}

#[test]
fn rename_over_existing_noreplace_and_exchange() {
    let env = Env::new();
    env.same("rename", |r, t| -> Res<()> {
        let w = r.join("w");
        t.ok("mkdir w", mkdir(&w, 0o755))?;
        for (n, c) in [("a", "A"), ("b", "B"), ("c", "C")] {
            t.ok(format!("put {n}"), put(&w.join(n), c.as_bytes()))?;
        }
        t.ok("mkdir d1", mkdir(&w.join("d1"), 0o755))?;
        t.ok("put d1/in", put(&w.join("d1/in"), b"IN"))?;
        t.ok("mkdir d2", mkdir(&w.join("d2"), 0o755))?;
        t.ok("mkdir d3", mkdir(&w.join("d3"), 0o700))?;
        t.rec("rename a -> a2", rename(&w.join("a"), &w.join("a2")));
        t.rec("stat a", stat(&w.join("a")));
        t.rec("get a2", get_d(&w.join("a2")));
        let old_b = t.fd("open b", open(&w.join("b"), libc::O_RDONLY, 0))?;
        t.rec("rename a2 over b", rename(&w.join("a2"), &w.join("b")));
        t.rec("get b", get_d(&w.join("b")));
        t.rec("old b fd reads old data", read(&old_b, 10).map(|d| digest(&d)));
        t.rec("old b fd nlink", fstat(&old_b).map(|m| m.nlink));
        t.rec("NOREPLACE c -> b", rename2(&w.join("c"), &w.join("b"), libc::RENAME_NOREPLACE));
        t.rec("c still there", get_d(&w.join("c")));
        t.rec("NOREPLACE c -> new", rename2(&w.join("c"), &w.join("c2"), libc::RENAME_NOREPLACE));
        t.rec("EXCHANGE c2 <-> b", rename2(&w.join("c2"), &w.join("b"), libc::RENAME_EXCHANGE));
        t.rec("b", get_d(&w.join("b")));
        t.rec("c2", get_d(&w.join("c2")));
        t.rec(
            "EXCHANGE with missing",
            rename2(&w.join("b"), &w.join("nope"), libc::RENAME_EXCHANGE),
        );
        t.rec("EXCHANGE file <-> dir", rename2(&w.join("b"), &w.join("d1"), libc::RENAME_EXCHANGE));
        t.rec("d1 now file", get_d(&w.join("d1")));
        t.rec("b now dir", get_d(&w.join("b/in")));
        t.rec("EXCHANGE back", rename2(&w.join("b"), &w.join("d1"), libc::RENAME_EXCHANGE));
        t.rec(
            "NOREPLACE|EXCHANGE",
            rename2(&w.join("b"), &w.join("c2"), libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE),
        );
        t.rec("empty dir over empty dir", rename(&w.join("d2"), &w.join("d3")));
        t.rec("d3 mode", stat(&w.join("d3")));
        t.rec("dir over non-empty dir", rename(&w.join("d3"), &w.join("d1")));
        t.rec("file over dir", rename(&w.join("b"), &w.join("d3")));
        t.rec("dir over file", rename(&w.join("d3"), &w.join("b")));
        t.rec("dir into itself", rename(&w.join("d1"), &w.join("d1/sub")));
        t.rec("missing source", rename(&w.join("missing"), &w.join("x")));
        t.rec("missing target dir", rename(&w.join("b"), &w.join("nodir/x")));
        t.rec("same name", rename(&w.join("b"), &w.join("b")));
        t.ok("link b -> hl", link(&w.join("b"), &w.join("hl")))?;
        t.rec("rename between hard links", rename(&w.join("b"), &w.join("hl")));
        t.rec("both names stay", (stat(&w.join("b")), stat(&w.join("hl"))));
        t.rec("into subdir", rename(&w.join("hl"), &w.join("d1/hl")));
        t.rec("dir across dirs", rename(&w.join("d3"), &w.join("d1/d3")));
        t.rec("d1 nlink", stat(&w.join("d1")));
        t.rec("out of subdir", rename(&w.join("d1/in"), &w.join("in")));
        t.ok("symlink", symlink("b", &w.join("sl")))?;
        t.rec("rename symlink", rename(&w.join("sl"), &w.join("sl2")));
        t.rec("readlink", readlink(&w.join("sl2"), 4096));
        // Nova's pattern: download to .part, rename over the final name.
        t.ok("put .part", put(&w.join("img.part"), &pattern(300_000, 7)))?;
        t.ok("put img", put(&w.join("img"), b"old"))?;
        let img_fd = t.fd("open img", open(&w.join("img"), libc::O_RDONLY, 0))?;
        t.rec(".part over img", rename(&w.join("img.part"), &w.join("img")));
        t.rec("img", get_d(&w.join("img")));
        t.rec("stat img", stat(&w.join("img")));
        t.rec("held fd still old", read(&img_fd, 10).map(|d| digest(&d)));
        t.rec("tree", tree(&w));
        Ok(())
    });
}

#[test]
fn link_symlink_and_readlink() {
    let env = Env::new();
    env.same("link/symlink", |r, t| -> Res<()> {
        let f = r.join("f");
        t.ok("put", put(&f, b"data"))?;
        t.rec("link f g", link(&f, &r.join("g")));
        t.rec("stat f", stat(&f));
        t.rec("stat g", stat(&r.join("g")));
        t.rec("write via g", put(&r.join("g"), b"via g"));
        t.rec("read via f", get_d(&f));
        t.rec("link again", link(&f, &r.join("g")));
        t.rec("link missing", link(&r.join("missing"), &r.join("x")));
        t.ok("mkdir", mkdir(&r.join("d"), 0o755))?;
        t.rec("link dir", link(&r.join("d"), &r.join("dl")));
        t.rec("link into subdir", link(&f, &r.join("d/f3")));
        t.rec("nlink 3", stat(&f));
        t.rec("unlink f", unlink(&f));
        t.rec("g nlink", stat(&r.join("g")));
        t.rec("g content", get_d(&r.join("g")));
        t.rec("symlink", symlink("target-text", &r.join("s")));
        t.rec("readlink", readlink(&r.join("s"), 4096));
        t.rec("readlink 4-byte buffer", readlink(&r.join("s"), 4));
        t.rec("lstat", lstat(&r.join("s")));
        t.rec("stat dangling", stat(&r.join("s")));
        t.rec("symlink over existing", symlink("x", &r.join("s")));
        t.rec("readlink regular", readlink(&r.join("g"), 4096));
        t.rec("readlink missing", readlink(&r.join("missing"), 4096));
        t.rec("symlink to g", symlink("g", &r.join("sg")));
        t.rec("stat via symlink", stat(&r.join("sg")));
        t.rec("read via symlink", get_d(&r.join("sg")));
        t.rec("absolute target", symlink("/etc/hostname-nonexistent", &r.join("abs")));
        t.rec("readlink abs", readlink(&r.join("abs"), 4096));
        t.rec("loop a", symlink("lb", &r.join("la")));
        t.rec("loop b", symlink("la", &r.join("lb")));
        t.rec("stat loop", stat(&r.join("la")));
        t.rec("symlink in subdir", symlink("../g", &r.join("d/up")));
        t.rec("read ../g", get_d(&r.join("d/up")));
        let long = "t".repeat(4095);
        t.rec("4095-byte target", symlink(&long, &r.join("long")));
        t.rec("readlink long", readlink(&r.join("long"), 8192).map(|s| s.len()));
        t.rec("4096-byte target", symlink(&"t".repeat(4096), &r.join("toolong")));
        t.rec("link a symlink", link(&r.join("s"), &r.join("s2")));
        t.rec("lstat hard-linked symlink", lstat(&r.join("s2")));
        Ok(())
    });
}

#[test]
fn mknod_and_mkfifo() {
    let env = Env::new();
    env.same("mknod/mkfifo", |r, t| -> Res<()> {
        let mk = |name: &str, mode: u32, dev: u64| {
            cvt(unsafe { libc::mknod(cp(&r.join(name)).as_ptr(), mode, dev) }).map(drop)
        };
        t.rec("mkfifo", cvt(unsafe { libc::mkfifo(cp(&r.join("fifo")).as_ptr(), 0o640) }));
        t.rec("stat fifo", stat(&r.join("fifo")));
        t.rec("mkfifo again", cvt(unsafe { libc::mkfifo(cp(&r.join("fifo")).as_ptr(), 0o640) }));
        t.rec("mknod fifo", mk("nfifo", libc::S_IFIFO | 0o600, 0));
        t.rec("stat", stat(&r.join("nfifo")));
        t.rec("mknod chr 1:3", mk("null", libc::S_IFCHR | 0o666, libc::makedev(1, 3)));
        t.rec("stat chr", stat(&r.join("null")));
        t.rec("mknod blk 7:0", mk("loop", libc::S_IFBLK | 0o660, libc::makedev(7, 0)));
        t.rec("stat blk", stat(&r.join("loop")));
        t.rec("mknod sock", mk("sock", libc::S_IFSOCK | 0o755, 0));
        t.rec("stat sock", stat(&r.join("sock")));
        t.rec("mknod reg", mk("reg", libc::S_IFREG | 0o600, 0));
        t.rec("stat reg", stat(&r.join("reg")));
        t.rec("read reg", get_d(&r.join("reg")));
        t.rec("mknod type 0 (regular)", mk("reg0", 0o644, 0));
        t.rec("stat reg0", stat(&r.join("reg0")));
        t.rec("mknod dir", mk("dir", libc::S_IFDIR | 0o755, 0));
        t.rec("mknod over existing", mk("reg", libc::S_IFIFO | 0o600, 0));
        t.rec("mknod in missing dir", mk("no/fifo", libc::S_IFIFO | 0o600, 0));
        // The FIFO works as a FIFO.
        let rd =
            t.fd("open fifo read", open(&r.join("fifo"), libc::O_RDONLY | libc::O_NONBLOCK, 0))?;
        let wr =
            t.fd("open fifo write", open(&r.join("fifo"), libc::O_WRONLY | libc::O_NONBLOCK, 0))?;
        t.rec("write fifo", write(&wr, b"ping"));
        t.rec("read fifo", read(&rd, 10).map(|d| digest(&d)));
        t.rec("read empty fifo", read(&rd, 10).map(|d| digest(&d)));
        t.rec("fifo size", stat(&r.join("fifo")).map(|m| m.size));
        Ok(())
    });
}

#[test]
fn statfs_reports_the_covered_file_system() {
    let env = Env::new();
    let sfs = |p: &Path| -> libc::statfs {
        let mut s: libc::statfs = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::statfs(cp(p).as_ptr(), &mut s) },
            0,
            "statfs {p:?}: {:?}",
            errno()
        );
        s
    };
    let fsfs = |p: &Path| -> Res<libc::statfs> {
        let fd = open(p, libc::O_RDONLY, 0)?;
        let mut s: libc::statfs = unsafe { std::mem::zeroed() };
        cvt(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut s) })?;
        Ok(s)
    };
    put(&env.plain.join("f"), b"x").unwrap();
    put(&env.scratch.base.join("f"), b"x").unwrap();
    let want = sfs(&env.plain);
    for got in [sfs(&env.scratch.base), fsfs(&env.scratch.base.join("f")).unwrap()] {
        let key = |s: &libc::statfs| (s.f_bsize, s.f_frsize, s.f_blocks, s.f_files, s.f_namelen);
        assert_eq!(key(&got), key(&want), "statfs (bsize, frsize, blocks, files, namelen)");
        // Free counts move with the other tests writing; they must be close.
        let close = |a: u64, b: u64| a.abs_diff(b) <= b / 50 + 1024;
        assert!(close(got.f_bfree, want.f_bfree), "f_bfree {} vs {}", got.f_bfree, want.f_bfree);
        assert!(
            close(got.f_bavail, want.f_bavail),
            "f_bavail {} vs {}",
            got.f_bavail,
            want.f_bavail
        );
        assert!(close(got.f_ffree, want.f_ffree), "f_ffree {} vs {}", got.f_ffree, want.f_ffree);
    }
    assert!(is_fuse(&env.scratch.base), "statfs of the mount should be FUSE's");
}

// ---------------------------------------------------------------------------------------------
// Sparse files and ranges.

/// The data segments of a file as `SEEK_DATA`/`SEEK_HOLE` report them.
fn data_map(fd: &OwnedFd) -> Res<Vec<(i64, i64)>> {
    let mut map = Vec::new();
    let mut off = 0;
    loop {
        let data = match lseek(fd, off, libc::SEEK_DATA) {
            Err(Errno(libc::ENXIO)) => return Ok(map),
            r => r?,
        };
        let hole = lseek(fd, data, libc::SEEK_HOLE)?;
        map.push((data, hole));
        off = hole;
    }
}

#[test]
fn fallocate_default_keep_size_punch_hole_zero_range() {
    let env = Env::with_covered();
    env.same("fallocate", |r, t| -> Res<()> {
        let p = r.join("f");
        let fd = t.fd("create", open(&p, libc::O_CREAT | libc::O_RDWR, 0o644))?;
        // st_blocks also counts extent-tree blocks, which depend on where the blocks landed
        // on disk: compare it with the covered file, and the logical layout with plain.
        let state = |t: &mut Log, label: &str| -> Res<i64> {
            let seen = raw_fstat(&fd)?;
            let disk = raw_stat(&env.covered(&p))?;
            t.rec(format!("{label}: size"), seen.st_size);
            t.rec(
                format!("{label}: st_blocks as on disk"),
                (seen.st_blocks == disk.st_blocks, seen.st_blocks > 0),
            );
            t.rec(format!("{label}: data map"), data_map(&fd));
            Ok(seen.st_blocks)
        };
        let b0 = state(t, "empty")?;
        t.rec("default 1M", fallocate(&fd, 0, 0, 1 << 20));
        let b1 = state(t, "after default")?;
        t.rec("allocated at least 1M", b1 - b0 >= 2048);
        t.rec("stat", stat(&p));
        t.rec("KEEP_SIZE +1M", fallocate(&fd, libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20));
        let b2 = state(t, "after KEEP_SIZE")?;
        t.rec("allocated at least 1M more", b2 - b1 >= 2048);
        t.rec("write 2M of 0xAA", pwrite(&fd, &vec![0xAA; 2 << 20], 0));
        t.rec("fsync", cvt(unsafe { libc::fsync(fd.as_raw_fd()) }));
        let b3 = state(t, "after write")?;
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        t.rec("PUNCH_HOLE 64K+128K", fallocate(&fd, punch, 64 << 10, 128 << 10));
        let b4 = state(t, "after PUNCH_HOLE")?;
        t.rec("freed at least 128K - 4K", b3 - b4 >= 256 - 8);
        t.rec(
            "hole reads zero",
            pread(&fd, 128 << 10, 64 << 10).map(|d| d.iter().all(|b| *b == 0)),
        );
        t.rec("edges intact", (pread(&fd, 1, (64 << 10) - 1), pread(&fd, 1, 192 << 10)));
        t.rec("PUNCH_HOLE without KEEP_SIZE", fallocate(&fd, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096));
        t.rec(
            "ZERO_RANGE 512K+64K",
            fallocate(&fd, libc::FALLOC_FL_ZERO_RANGE, 512 << 10, 64 << 10),
        );
        t.rec(
            "range reads zero",
            pread(&fd, 64 << 10, 512 << 10).map(|d| d.iter().all(|b| *b == 0)),
        );
        state(t, "after ZERO_RANGE")?;
        t.rec("ZERO_RANGE past EOF", fallocate(&fd, libc::FALLOC_FL_ZERO_RANGE, 2 << 20, 4096));
        state(t, "after ZERO_RANGE past EOF")?;
        let zk = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        t.rec("ZERO_RANGE|KEEP_SIZE past EOF", fallocate(&fd, zk, 4 << 20, 4096));
        state(t, "after ZERO_RANGE|KEEP_SIZE")?;
        t.rec("stat", stat(&p));
        t.rec("whole file", read_fd_all(&fd).map(|d| digest(&d)));
        t.rec("negative length", fallocate(&fd, 0, 0, -1));
        let ro = t.fd("open ro", open(&p, libc::O_RDONLY, 0))?;
        t.rec("fallocate on O_RDONLY", fallocate(&ro, 0, 0, 4096));
        let d = t.fd("open dir", opendir(r))?;
        t.rec("fallocate on dir", fallocate(&d, 0, 0, 4096));
        let rc = unsafe { libc::posix_fallocate(fd.as_raw_fd(), 8 << 20, 4096) };
        t.rec("posix_fallocate", rc);
        state(t, "after posix_fallocate")?;
        Ok(())
    });
}

#[test]
fn lseek_data_and_hole_on_a_sparse_file() {
    lseek_data_and_hole_on_a_sparse_file_in(Env::new());
}

#[test]
fn lseek_data_and_hole_on_a_sparse_file_without_passthrough() {
    lseek_data_and_hole_on_a_sparse_file_in(Env::without_passthrough());
}

fn lseek_data_and_hole_on_a_sparse_file_in(env: Env) {
    env.same("SEEK_DATA/SEEK_HOLE", |r, t| -> Res<()> {
        let p = r.join("sparse.raw");
        let fd = t.fd("create", open(&p, libc::O_CREAT | libc::O_RDWR, 0o644))?;
        const M: i64 = 1 << 20;
        t.rec("data @0", pwrite(&fd, &[1u8; 4096], 0));
        t.rec("data @1M", pwrite(&fd, &[2u8; 8192], M));
        t.rec("size 4M", ftruncate(&fd, 4 * M));
        let probe = |t: &mut Log, fd: &OwnedFd| {
            for off in [0, 100, 4096, M - 1, M, M + 8191, M + 8192, 2 * M, 4 * M - 1, 4 * M, 5 * M]
            {
                t.rec(format!("SEEK_DATA {off}"), lseek(fd, off, libc::SEEK_DATA));
                t.rec(format!("SEEK_HOLE {off}"), lseek(fd, off, libc::SEEK_HOLE));
            }
        };
        probe(t, &fd);
        t.rec("fsync", cvt(unsafe { libc::fsync(fd.as_raw_fd()) }));
        probe(t, &fd);
        // A fresh fd (as qemu-img map would open it) sees the same layout.
        let ro = t.fd("open ro", open(&p, libc::O_RDONLY, 0))?;
        probe(t, &ro);
        t.rec("SEEK_DATA negative", lseek(&ro, -1, libc::SEEK_DATA));
        t.rec("SEEK_END", lseek(&ro, 0, libc::SEEK_END));
        t.rec("SEEK_END -10", lseek(&ro, -10, libc::SEEK_END));
        t.rec("SEEK_CUR +5", lseek(&ro, 5, libc::SEEK_CUR));
        t.rec("bad whence", lseek(&ro, 0, 99));
        // A file that is all data has one hole: at its end.
        t.rec("put full", put(&r.join("full"), &pattern(100_000, 8)));
        let full = t.fd("open full", open(&r.join("full"), libc::O_RDONLY, 0))?;
        t.rec("full SEEK_HOLE 0", lseek(&full, 0, libc::SEEK_HOLE));
        t.rec("full SEEK_DATA 0", lseek(&full, 0, libc::SEEK_DATA));
        t.rec("empty", put(&r.join("empty"), b""));
        let empty = t.fd("open empty", open(&r.join("empty"), libc::O_RDONLY, 0))?;
        t.rec("empty SEEK_DATA 0", lseek(&empty, 0, libc::SEEK_DATA));
        t.rec("empty SEEK_HOLE 0", lseek(&empty, 0, libc::SEEK_HOLE));
        Ok(())
    });
}

fn cfr(
    src: &OwnedFd,
    soff: Option<i64>,
    dst: &OwnedFd,
    doff: Option<i64>,
    len: usize,
) -> Res<usize> {
    let mut so = soff.unwrap_or(0);
    let mut d_o = doff.unwrap_or(0);
    let sp = if soff.is_some() { &mut so as *mut i64 } else { std::ptr::null_mut() };
    let dp = if doff.is_some() { &mut d_o as *mut i64 } else { std::ptr::null_mut() };
    cvt_len(unsafe { libc::copy_file_range(src.as_raw_fd(), sp, dst.as_raw_fd(), dp, len, 0) })
}

#[test]
fn copy_file_range_between_files() {
    copy_file_range_between_files_in(Env::new());
}

#[test]
fn copy_file_range_between_files_without_passthrough() {
    copy_file_range_between_files_in(Env::without_passthrough());
}

fn copy_file_range_between_files_in(env: Env) {
    env.same("copy_file_range", |r, t| -> Res<()> {
        t.ok("put src", put(&r.join("src"), &pattern(300 << 10, 9)))?;
        let src = t.fd("open src", open(&r.join("src"), libc::O_RDONLY, 0))?;
        let dst = t.fd("create dst", open(&r.join("dst"), libc::O_CREAT | libc::O_RDWR, 0o644))?;
        t.rec("copy 200K src@1000 -> dst@5000", cfr(&src, Some(1000), &dst, Some(5000), 200 << 10));
        t.rec("dst size", fstat(&dst).map(|m| m.size));
        t.rec("dst content", read_fd_all(&dst).map(|d| digest(&d)));
        t.rec("copy across src EOF", cfr(&src, Some((300 << 10) - 100), &dst, Some(0), 4096));
        t.rec("copy from past EOF", cfr(&src, Some(1 << 20), &dst, Some(0), 4096));
        t.rec("copy using file offsets", cfr(&src, None, &dst, None, 10_000));
        t.rec("src offset moved", lseek(&src, 0, libc::SEEK_CUR));
        t.rec("dst offset moved", lseek(&dst, 0, libc::SEEK_CUR));
        t.rec("dst content", read_fd_all(&dst).map(|d| digest(&d)));
        t.rec("overlapping range in one file", cfr(&dst, Some(0), &dst, Some(100), 1000));
        t.rec("non-overlapping in one file", cfr(&dst, Some(0), &dst, Some(100_000), 1000));
        let wo = t.fd("open src O_WRONLY", open(&r.join("src"), libc::O_WRONLY, 0))?;
        t.rec("from O_WRONLY", cfr(&wo, Some(0), &dst, Some(0), 10));
        t.rec("to O_RDONLY", cfr(&dst, Some(0), &src, Some(0), 10));
        let app =
            t.fd("open O_APPEND", open(&r.join("dst"), libc::O_WRONLY | libc::O_APPEND, 0))?;
        t.rec("to O_APPEND", cfr(&src, Some(0), &app, Some(0), 10));
        let d = t.fd("open dir", opendir(r))?;
        t.rec("from dir", cfr(&d, Some(0), &dst, Some(0), 10));
        t.rec("big copy to new file", {
            let big = open(&r.join("big"), libc::O_CREAT | libc::O_RDWR, 0o644)?;
            let mut done = 0;
            loop {
                let n = cfr(&src, Some(done as i64), &big, Some(done as i64), 1 << 20)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            (done, read_fd_all(&big).map(|d| digest(&d)))
        });
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Xattrs, permissions, locks.

#[test]
fn user_and_trusted_xattrs() {
    let env = Env::new();
    env.same("xattrs", |r, t| -> Res<()> {
        let f = r.join("f");
        t.ok("put", put(&f, b"x"))?;
        t.rec("list empty", listxattr(&f, 4096));
        t.rec("get missing", getxattr(&f, "user.missing", 100));
        t.rec("remove missing", removexattr(&f, "user.missing"));
        t.rec("set user.a", setxattr(&f, "user.a", b"1", 0));
        t.rec("set user.b", setxattr(&f, "user.b", b"two", 0));
        t.rec("set empty value", setxattr(&f, "user.empty", b"", 0));
        t.rec("get user.a", getxattr(&f, "user.a", 100));
        t.rec("get user.b", getxattr(&f, "user.b", 100));
        t.rec("get empty value", getxattr(&f, "user.empty", 100));
        t.rec("size of user.b", getxattr_len(&f, "user.b"));
        t.rec("get into a small buffer", getxattr(&f, "user.b", 1));
        t.rec("list", listxattr(&f, 4096));
        t.rec(
            "list size",
            cvt_len(unsafe { libc::listxattr(cp(&f).as_ptr(), std::ptr::null_mut(), 0) }),
        );
        t.rec("list into a small buffer", listxattr(&f, 3));
        t.rec("XATTR_CREATE existing", setxattr(&f, "user.a", b"x", libc::XATTR_CREATE));
        t.rec("XATTR_REPLACE missing", setxattr(&f, "user.new", b"x", libc::XATTR_REPLACE));
        t.rec("XATTR_REPLACE existing", setxattr(&f, "user.a", b"one", libc::XATTR_REPLACE));
        t.rec("get user.a", getxattr(&f, "user.a", 100));
        t.rec("3000-byte value", setxattr(&f, "user.big", &pattern(3000, 10), 0));
        t.rec("get big", getxattr(&f, "user.big", 65536).map(|v| digest(&v)));
        t.rec(
            "10 KiB value (over ext4's limit)",
            setxattr(&f, "user.mid", &pattern(10 << 10, 11), 0),
        );
        t.rec("100 KiB value", setxattr(&f, "user.huge", &pattern(100 << 10, 11), 0));
        t.rec("255-byte name", setxattr(&f, &format!("user.{}", "n".repeat(250)), b"v", 0));
        t.rec("256-byte name", setxattr(&f, &format!("user.{}", "n".repeat(251)), b"v", 0));
        t.rec("unknown namespace", setxattr(&f, "bogus.x", b"v", 0));
        t.rec("remove user.b", removexattr(&f, "user.b"));
        t.rec("get removed", getxattr(&f, "user.b", 100));
        t.rec("list", listxattr(&f, 65536));
        // libvirt's remember-owner labels (root only).
        t.rec("set trusted", setxattr(&f, "trusted.libvirt.security.dac", b"+0:+0", 0));
        t.rec("set trusted ref", setxattr(&f, "trusted.libvirt.security.ref_dac", b"1", 0));
        t.rec("get trusted", getxattr(&f, "trusted.libvirt.security.dac", 100));
        t.rec("list", listxattr(&f, 65536));
        t.rec("remove trusted", removexattr(&f, "trusted.libvirt.security.ref_dac"));
        let fd = t.fd("open", open(&f, libc::O_RDONLY, 0))?;
        let rc = unsafe {
            libc::fsetxattr(fd.as_raw_fd(), cs("user.fd").as_ptr(), b"F".as_ptr().cast(), 1, 0)
        };
        t.rec("fsetxattr", cvt(rc));
        let mut buf = [0u8; 16];
        let n = unsafe {
            libc::fgetxattr(fd.as_raw_fd(), cs("user.fd").as_ptr(), buf.as_mut_ptr().cast(), 16)
        };
        t.rec("fgetxattr", cvt_len(n).map(|n| buf[..n].to_vec()));
        t.ok("mkdir", mkdir(&r.join("d"), 0o755))?;
        t.rec("dir set", setxattr(&r.join("d"), "user.dir", b"D", 0));
        t.rec("dir get", getxattr(&r.join("d"), "user.dir", 10));
        t.rec("dir list", listxattr(&r.join("d"), 4096));
        t.ok("symlink", symlink("f", &r.join("l")))?;
        let rc = unsafe {
            libc::lsetxattr(
                cp(&r.join("l")).as_ptr(),
                cs("user.l").as_ptr(),
                b"L".as_ptr().cast(),
                1,
                0,
            )
        };
        t.rec("lsetxattr user.* on symlink", cvt(rc));
        t.rec("getxattr via symlink follows", getxattr(&r.join("l"), "user.a", 10));
        t.rec("missing file", getxattr(&r.join("missing"), "user.a", 10));
        t.rec("xattrs survive rename", {
            rename(&f, &r.join("f2"))?;
            listxattr(&r.join("f2"), 65536)
        });
        Ok(())
    });
}

#[test]
fn access_as_root() {
    let env = Env::new();
    env.same("access", |r, t| -> Res<()> {
        let f = r.join("f");
        t.ok("put", put(&f, b"x"))?;
        for mode in [0o000, 0o644, 0o100, 0o010, 0o001, 0o755] {
            t.rec(format!("chmod {mode:o}"), chmod(&f, mode));
            for (name, m) in [
                ("F_OK", libc::F_OK),
                ("R_OK", libc::R_OK),
                ("W_OK", libc::W_OK),
                ("X_OK", libc::X_OK),
            ] {
                t.rec(format!("  {name}"), access(&f, m));
            }
        }
        t.rec("missing", access(&r.join("missing"), libc::F_OK));
        t.rec("under a file", access(&r.join("f/x"), libc::F_OK));
        t.rec("dir X_OK", access(r, libc::X_OK));
        let rc = unsafe {
            libc::faccessat(libc::AT_FDCWD, cp(&f).as_ptr(), libc::R_OK, libc::AT_EACCESS)
        };
        t.rec("faccessat AT_EACCESS", cvt(rc));
        t.ok("dangling symlink", symlink("nowhere", &r.join("dl")))?;
        t.rec("access dangling", access(&r.join("dl"), libc::F_OK));
        let rc = unsafe {
            libc::faccessat(
                libc::AT_FDCWD,
                cp(&r.join("dl")).as_ptr(),
                libc::F_OK,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        t.rec("faccessat NOFOLLOW dangling", cvt(rc));
        Ok(())
    });
}

#[test]
fn permissions_of_an_unprivileged_user() {
    let env = Env::new();
    env.open_to_all();
    const NOBODY: u32 = 65534;
    env.same("as nobody", |r, t| -> Res<()> {
        t.ok("mkdir w", mkdir(&r.join("w"), 0o755))?;
        let w = r.join("w");
        t.ok(
            "mkdir pub 777",
            mkdir(&w.join("pub"), 0o777).and_then(|_| chmod(&w.join("pub"), 0o777)),
        )?;
        t.ok("mkdir priv 700", mkdir(&w.join("priv"), 0o700))?;
        t.ok(
            "mkdir sticky",
            mkdir(&w.join("tmp"), 0o777).and_then(|_| chmod(&w.join("tmp"), 0o1777)),
        )?;
        t.ok("put ro 644", put(&w.join("ro"), b"ro"))?;
        t.ok(
            "put secret 600",
            put(&w.join("secret"), b"s").and_then(|_| chmod(&w.join("secret"), 0o600)),
        )?;
        t.ok(
            "put mine",
            put(&w.join("mine"), b"m").and_then(|_| chown(&w.join("mine"), NOBODY, NOBODY)),
        )?;
        t.ok(
            "put tmp/rootfile 666",
            put(&w.join("tmp/rootfile"), b"r").and_then(|_| chmod(&w.join("tmp/rootfile"), 0o666)),
        )?;
        t.ok("put priv/x", put(&w.join("priv/x"), b"x"))?;
        t.ok("user xattr on secret", setxattr(&w.join("secret"), "user.k", b"v", 0))?;
        let lines = as_user(NOBODY, NOBODY, || {
            let mut t = Log::default();
            t.rec("access ro R_OK", access(&w.join("ro"), libc::R_OK));
            t.rec("access ro W_OK", access(&w.join("ro"), libc::W_OK));
            t.rec("access secret R_OK", access(&w.join("secret"), libc::R_OK));
            t.rec("open ro", open(&w.join("ro"), libc::O_RDONLY, 0).map(drop));
            t.rec("open ro for write", open(&w.join("ro"), libc::O_WRONLY, 0).map(drop));
            t.rec("open secret", open(&w.join("secret"), libc::O_RDONLY, 0).map(drop));
            t.rec("O_TRUNC ro", open(&w.join("ro"), libc::O_WRONLY | libc::O_TRUNC, 0).map(drop));
            t.rec("stat priv/x", stat(&w.join("priv/x")));
            t.rec("list priv", list_dir(&w.join("priv"), 4096));
            t.rec("create in w (0755 root)", put(&w.join("new"), b"n"));
            t.rec("create in pub", put(&w.join("pub/new"), b"n"));
            t.rec("stat pub/new", stat(&w.join("pub/new")));
            t.rec("mkdir in pub", mkdir(&w.join("pub/d"), 0o755));
            t.rec("stat pub/d", stat(&w.join("pub/d")));
            t.rec("chmod ro", chmod(&w.join("ro"), 0o666));
            t.rec("chmod mine", chmod(&w.join("mine"), 0o600));
            t.rec("stat mine", stat(&w.join("mine")));
            t.rec("chown mine to root", chown(&w.join("mine"), 0, 0));
            t.rec("chown mine to self", chown(&w.join("mine"), NOBODY, NOBODY));
            t.rec("chgrp mine to 0", chown(&w.join("mine"), u32::MAX, 0));
            t.rec("truncate ro", truncate(&w.join("ro"), 0));
            t.rec("unlink ro", unlink(&w.join("ro")));
            t.rec("unlink sticky rootfile", unlink(&w.join("tmp/rootfile")));
            t.rec("rename sticky rootfile", rename(&w.join("tmp/rootfile"), &w.join("tmp/x")));
            t.rec("write sticky rootfile (0666)", put(&w.join("tmp/rootfile"), b"by nobody"));
            t.rec(
                "utimens NOW on 0666 file",
                utimens(&w.join("tmp/rootfile"), [(0, libc::UTIME_NOW); 2], 0),
            );
            t.rec(
                "utimens explicit on 0666 file",
                utimens(&w.join("tmp/rootfile"), [(1, 0), (2, 0)], 0),
            );
            t.rec("utimens NOW on ro", utimens(&w.join("ro"), [(0, libc::UTIME_NOW); 2], 0));
            t.rec("utimens explicit on mine", utimens(&w.join("mine"), [(1, 0), (2, 0)], 0));
            t.rec("setxattr user.* on ro", setxattr(&w.join("ro"), "user.k", b"v", 0));
            t.rec("getxattr on secret", getxattr(&w.join("secret"), "user.k", 10));
            t.rec("setxattr trusted.* on mine", setxattr(&w.join("mine"), "trusted.k", b"v", 0));
            t.rec("hard link to ro (protected_hardlinks)", link(&w.join("ro"), &w.join("pub/hl")));
            t.rec("hard link to mine", link(&w.join("mine"), &w.join("pub/hl2")));
            t.rec(
                "mknod fifo in pub",
                cvt(unsafe { libc::mkfifo(cp(&w.join("pub/fifo")).as_ptr(), 0o600) }),
            );
            t.rec(
                "mknod chr in pub",
                cvt(unsafe {
                    libc::mknod(
                        cp(&w.join("pub/chr")).as_ptr(),
                        libc::S_IFCHR | 0o600,
                        libc::makedev(1, 3),
                    )
                }),
            );
            t.rec("rmdir priv", rmdir(&w.join("priv")));
            t.rec("xattr-free listing", list_dir(&w, 4096).map(|v| v.len()));
            t.0
        });
        t.0.extend(lines);
        t.rec("owner of rootfile after nobody wrote", stat(&w.join("tmp/rootfile")));
        t.rec("tree", tree(&w));
        Ok(())
    });
}

fn lock(fd: &OwnedFd, cmd: i32, ty: i32, start: i64, len: i64) -> Res<(i16, i64, i64, i32)> {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), cmd, &mut fl) })?;
    Ok((fl.l_type, fl.l_start, fl.l_len, fl.l_pid))
}

/// In a forked child, tries a POSIX write lock on an inherited fd; returns the child's errno
/// (0 on success), and whether F_GETLK named the parent as the holder.
fn child_posix_lock(fd: RawFd, start: i64, len: i64) -> (i32, bool) {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    let mut probe = fl;
    let parent = unsafe { libc::getpid() };
    // Only async-signal-safe calls between fork and _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            let rc = libc::fcntl(fd, libc::F_SETLK, &fl);
            let code = if rc == 0 { 0 } else { *libc::__errno_location() };
            let got = libc::fcntl(fd, libc::F_GETLK, &mut probe);
            let named = got == 0 && probe.l_type == libc::F_WRLCK as i16 && probe.l_pid == parent;
            libc::_exit((code & 0x3f) | if named { 0x40 } else { 0 });
        }
    }
    assert!(pid > 0, "fork: {:?}", errno());
    let mut status = 0;
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status));
    let code = libc::WEXITSTATUS(status);
    (code & 0x3f, code & 0x40 != 0)
}

#[test]
fn ofd_posix_and_flock_locks() {
    let env = Env::new();
    env.same("locks", |r, t| -> Res<()> {
        let p = r.join("disk.qcow2");
        t.ok("put", put(&p, &pattern(8192, 12)))?;
        let fd1 = t.fd("open fd1", open(&p, libc::O_RDWR, 0))?;
        let fd2 = t.fd("open fd2", open(&p, libc::O_RDWR, 0))?;
        let (wr, rd, un) = (libc::F_WRLCK, libc::F_RDLCK, libc::F_UNLCK);
        let (set, get) = (libc::F_OFD_SETLK, libc::F_OFD_GETLK);
        t.rec("OFD fd1 write 100..200", lock(&fd1, set, wr, 100, 100));
        t.rec("OFD fd2 write 100..200", lock(&fd2, set, wr, 100, 100));
        t.rec("OFD fd2 read 150..160", lock(&fd2, set, rd, 150, 10));
        t.rec("OFD fd2 getlk", lock(&fd2, get, wr, 0, 1000));
        t.rec("OFD fd1 getlk (own lock)", lock(&fd1, get, wr, 0, 1000));
        t.rec("OFD fd2 write 200..300", lock(&fd2, set, wr, 200, 100));
        t.rec("OFD fd1 read 201 (conflict)", lock(&fd1, set, rd, 201, 1));
        t.rec("OFD both read 300..", (lock(&fd1, set, rd, 300, 10), lock(&fd2, set, rd, 300, 10)));
        t.rec("OFD fd2 write 300 (shared read held)", lock(&fd2, set, wr, 300, 10));
        t.rec("OFD fd1 unlock 100..200", lock(&fd1, set, un, 100, 100));
        t.rec("OFD fd2 write 100..200 now", lock(&fd2, set, wr, 100, 100));
        // A third open file description conflicts too; closing it drops nothing of fd2's.
        let fd3 = t.fd("open fd3", open(&p, libc::O_RDONLY, 0))?;
        t.rec("OFD fd3 read 150 (conflict)", lock(&fd3, set, rd, 150, 1));
        drop(fd3);
        t.rec("fd2 lock survives another close", lock(&fd1, get, rd, 150, 1));
        drop(fd2);
        t.rec("closing fd2 released its locks", lock(&fd1, set, wr, 0, 0));
        t.rec("OFD fd1 unlock all", lock(&fd1, set, un, 0, 0));
        // POSIX (process-owned) locks: a child process conflicts with the parent's lock.
        t.rec("POSIX parent write 0..10", lock(&fd1, libc::F_SETLK, wr, 0, 10));
        t.rec("POSIX getlk in owner", lock(&fd1, libc::F_GETLK, wr, 0, 10));
        t.rec(
            "POSIX child write 0..10 (errno, holder is parent)",
            child_posix_lock(fd1.as_raw_fd(), 0, 10),
        );
        t.rec("POSIX child write 10..20", child_posix_lock(fd1.as_raw_fd(), 10, 10));
        let fd4 = t.fd("open fd4", open(&p, libc::O_RDWR, 0))?;
        t.rec("OFD vs POSIX conflict", lock(&fd4, set, wr, 5, 1));
        t.rec("POSIX unlock", lock(&fd1, libc::F_SETLK, un, 0, 10));
        t.rec("OFD now", lock(&fd4, set, wr, 5, 1));
        t.rec("POSIX blocked by OFD", child_posix_lock(fd1.as_raw_fd(), 0, 10));
        // Released by hand, not only by the close: a process spawned meanwhile by another test
        // holds a copy of every descriptor until its exec, and an OFD lock lives as long as
        // any copy (the lockf below then met it now and then).
        let _ = lock(&fd4, set, un, 0, 0);
        drop(fd4);
        // flock(2) between two open file descriptions.
        let a = t.fd("open a", open(&p, libc::O_RDONLY, 0))?;
        let b = t.fd("open b", open(&p, libc::O_RDONLY, 0))?;
        let fl = |fd: &OwnedFd, op| cvt(unsafe { libc::flock(fd.as_raw_fd(), op) });
        t.rec("flock a EX", fl(&a, libc::LOCK_EX | libc::LOCK_NB));
        t.rec("flock b EX", fl(&b, libc::LOCK_EX | libc::LOCK_NB));
        t.rec("flock b SH", fl(&b, libc::LOCK_SH | libc::LOCK_NB));
        t.rec("flock a UN", fl(&a, libc::LOCK_UN));
        t.rec("flock b EX now", fl(&b, libc::LOCK_EX | libc::LOCK_NB));
        t.rec(
            "lockf via fd1 (no flock conflict)",
            cvt(unsafe { libc::lockf(fd1.as_raw_fd(), libc::F_TLOCK, 0) }),
        );
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Trees, names and paths.

#[test]
fn subdirectories_nested_operations() {
    let env = Env::new();
    env.same("subdirectories", |r, t| -> Res<()> {
        t.ok("mkdir a", mkdir(&r.join("a"), 0o755))?;
        t.ok("mkdir a/b", mkdir(&r.join("a/b"), 0o755))?;
        t.ok("mkdir a/b/c", mkdir(&r.join("a/b/c"), 0o755))?;
        t.rec("put a/b/c/f", put(&r.join("a/b/c/f"), &pattern(5000, 13)));
        t.rec("stat", stat(&r.join("a/b/c/f")));
        t.rec("stat via ..", stat(&r.join("a/b/c/../c/./f")));
        t.rec("nlink a", stat(&r.join("a")));
        let a = t.fd("open a", opendir(&r.join("a")))?;
        let c = t.fd("openat a b/c", openat(&a, "b/c", libc::O_RDONLY | libc::O_DIRECTORY, 0))?;
        t.rec("fstatat c f", raw_fstatat(&c, "f", 0).map(|s| meta(&s)));
        t.rec("fstatat c ..", raw_fstatat(&c, "..", 0).map(|s| meta(&s)));
        let rc = unsafe { libc::mkdirat(c.as_raw_fd(), cs("d").as_ptr(), 0o700) };
        t.rec("mkdirat c d", cvt(rc));
        let rc = unsafe {
            libc::renameat(c.as_raw_fd(), cs("f").as_ptr(), a.as_raw_fd(), cs("f").as_ptr())
        };
        t.rec("renameat c/f -> a/f", cvt(rc));
        let rc = unsafe {
            libc::linkat(a.as_raw_fd(), cs("f").as_ptr(), c.as_raw_fd(), cs("hl").as_ptr(), 0)
        };
        t.rec("linkat a/f -> c/hl", cvt(rc));
        let rc =
            unsafe { libc::symlinkat(cs("../../f").as_ptr(), c.as_raw_fd(), cs("up").as_ptr()) };
        t.rec("symlinkat c/up", cvt(rc));
        t.rec("read c/up", get_d(&r.join("a/b/c/up")));
        let fd = t.fd("openat c hl", openat(&c, "hl", libc::O_RDWR, 0))?;
        t.rec("write via hl", pwrite(&fd, b"HL", 0));
        t.rec("a/f sees it", get_d(&r.join("a/f")));
        t.rec("list a", list_dir(&r.join("a"), 4096));
        t.rec("list c", list_dir(&r.join("a/b/c"), 4096));
        t.rec("rename dir b -> a/b2", rename(&r.join("a/b"), &r.join("a/b2")));
        t.rec("old fd still works", raw_fstatat(&c, "hl", 0).map(|s| meta(&s)));
        t.rec("path via new name", get_d(&r.join("a/b2/c/hl")));
        t.rec("move subtree to top", rename(&r.join("a/b2/c"), &r.join("c")));
        t.rec("tree a", tree(&r.join("a")));
        t.rec("tree c", tree(&r.join("c")));
        t.rec("rmdir busy tree", rmdir(&r.join("c")));
        Ok(())
    });
}

#[test]
fn long_names_of_255_bytes() {
    let env = Env::new();
    env.same("long names", |r, t| -> Res<()> {
        let w = r.join("w");
        t.ok("mkdir", mkdir(&w, 0o755))?;
        let n255 = "x".repeat(255);
        let n256 = "x".repeat(256);
        let m255 = format!("{}{}", "m".repeat(250), "_sm.0");
        t.rec("create 255", put(&w.join(&n255), b"long"));
        t.rec("stat 255", stat(&w.join(&n255)));
        t.rec("read 255", get_d(&w.join(&n255)));
        t.rec("create 256", put(&w.join(&n256), b"too long"));
        t.rec("stat 256", stat(&w.join(&n256)));
        t.rec("mkdir 256", mkdir(&w.join(&n256), 0o755));
        t.rec("mkdir 255", mkdir(&w.join(format!("d{}", &n255[1..])), 0o755));
        t.rec("rename to 255", rename(&w.join(&n255), &w.join(&m255)));
        t.rec("rename to 256", rename(&w.join(&m255), &w.join(&n256)));
        t.rec("link to 256", link(&w.join(&m255), &w.join(&n256)));
        t.rec("link to 255", link(&w.join(&m255), &w.join(&n255)));
        t.rec("symlink named 256", symlink("x", &w.join(&n256)));
        t.rec("symlink named 255", symlink(&m255, &w.join(format!("s{}", &n255[1..]))));
        t.rec("read via 255 symlink", get_d(&w.join(format!("s{}", &n255[1..]))));
        t.rec("list", list_dir(&w, 1024));
        t.rec("unlink 255", unlink(&w.join(&n255)));
        t.rec("unlink 256", unlink(&w.join(&n256)));
        Ok(())
    });
}

#[test]
fn deep_path_beyond_path_max_via_openat() {
    let env = Env::new();
    env.same("deep path", |r, t| -> Res<()> {
        let name = "d".repeat(250);
        let levels = 20; // 20 * 251 bytes > PATH_MAX (4096)
        let root = t.fd("open root", opendir(r))?;
        let mut chain = vec![root];
        for i in 0..levels {
            let parent = chain.last().unwrap();
            let rc = unsafe { libc::mkdirat(parent.as_raw_fd(), cs(&name).as_ptr(), 0o755) };
            t.ok(format!("mkdirat level {i}"), cvt(rc))?;
            let fd = t.fd(
                format!("openat level {i}"),
                openat(parent, &name, libc::O_RDONLY | libc::O_DIRECTORY, 0),
            )?;
            chain.push(fd);
        }
        let bottom = chain.last().unwrap();
        let f = t.fd("create leaf", openat(bottom, "leaf", libc::O_CREAT | libc::O_RDWR, 0o644))?;
        t.rec("write leaf", write(&f, &pattern(10_000, 14)));
        t.rec("fstatat leaf", raw_fstatat(bottom, "leaf", 0).map(|s| meta(&s)));
        t.rec("fstatat ..", raw_fstatat(bottom, "..", 0).map(|s| meta(&s)));
        let mut full = r.to_path_buf();
        for _ in 0..levels {
            full.push(&name);
        }
        t.rec("path length > PATH_MAX", full.as_os_str().len() > libc::PATH_MAX as usize);
        t.rec("stat by full path", stat(&full.join("leaf")));
        t.rec(
            "renameat at the bottom",
            cvt(unsafe {
                libc::renameat(
                    bottom.as_raw_fd(),
                    cs("leaf").as_ptr(),
                    bottom.as_raw_fd(),
                    cs("leaf2").as_ptr(),
                )
            }),
        );
        drop(chain);
        // Walk down again from a fresh root fd and read the leaf back.
        let mut dir = opendir(r)?;
        for _ in 0..levels {
            dir = openat(&dir, &name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        }
        let f = t.fd("reopen leaf2", openat(&dir, "leaf2", libc::O_RDONLY, 0))?;
        t.rec("read leaf2", read_fd_all(&f).map(|d| digest(&d)));
        t.rec("list bottom", {
            let mut v = Vec::new();
            while getdents(&dir, 4096, &mut v)? > 0 {}
            v.sort();
            v.into_iter().map(|(n, ty, _)| (n, ty)).collect::<Vec<_>>()
        });
        let rc = unsafe { libc::unlinkat(dir.as_raw_fd(), cs("leaf2").as_ptr(), 0) };
        t.rec("unlinkat leaf2", cvt(rc));
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// The mount and the covered directory are the same files.

/// A mount over `scratch.base` with a bind mount of the covered directory made first.
/// Bound in this order, the locals drop mount first, then the bind mount, then the scratch
/// directory (removing it while mounted would walk through the mounts).
fn covered_env() -> (Scratch, BindMount, Mount) {
    let scratch = Scratch::new();
    let bind = BindMount::new(&scratch.base, &scratch.path("bind"));
    let mount = Mount::new(&scratch.base, &[]);
    assert!(!is_fuse(&bind.target), "the bind mount must show the covered directory");
    (scratch, bind, mount)
}

#[test]
fn written_through_the_mount_reads_back_through_the_covered_dir() {
    let (s, bind, mount) = covered_env();
    let data = pattern(3 << 20, 15);
    put(&s.base.join("img"), &data).unwrap();
    assert_eq!(stat(&bind.target.join("img")).unwrap().size, data.len() as i64);
    assert!(
        get(&bind.target.join("img")).unwrap() == data,
        "covered copy differs from what was written through the mount"
    );
    // Overwrite in place through an fd that stays open: the covered file follows at once.
    let fd = open(&s.base.join("img"), libc::O_RDWR, 0).unwrap();
    pwrite(&fd, b"PATCHED", 1 << 20).unwrap();
    assert_eq!(
        pread(&open(&bind.target.join("img"), libc::O_RDONLY, 0).unwrap(), 7, 1 << 20).unwrap(),
        b"PATCHED"
    );
    drop(fd);
    // A subdirectory and a rename done through the mount are in the covered tree.
    mkdir(&s.base.join("sub"), 0o755).unwrap();
    put(&s.base.join("sub/a.part"), b"part").unwrap();
    rename(&s.base.join("sub/a.part"), &s.base.join("sub/a")).unwrap();
    assert_eq!(get(&bind.target.join("sub/a")).unwrap(), b"part");
    assert_eq!(stat(&bind.target.join("sub/a.part")), Err(Errno(libc::ENOENT)));
    drop(mount);
}

#[test]
fn written_through_the_covered_dir_reads_back_through_the_mount() {
    let (s, bind, mount) = covered_env();
    let data = pattern(3 << 20, 16);
    put(&bind.target.join("img"), &data).unwrap();
    mkdir(&bind.target.join("sub"), 0o750).unwrap();
    put(&bind.target.join("sub/f"), b"below").unwrap();
    assert_eq!(
        stat(&s.base.join("img")).map(|m| m.size),
        Ok(data.len() as i64),
        "{}",
        mount.log_text()
    );
    assert!(
        get(&s.base.join("img")).unwrap() == data,
        "mount shows other data than the covered file"
    );
    assert_eq!(get(&s.base.join("sub/f")).unwrap(), b"below");
    assert_eq!(stat(&s.base.join("sub")).unwrap().mode, libc::S_IFDIR | 0o750);
    let names: Vec<_> =
        list_dir(&s.base.join("sub"), 4096).unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, [".", "..", "f"]);
    drop(mount);
}

#[test]
fn stat_shows_the_covered_files_identity() {
    let (s, bind, mount) = covered_env();
    let b = &bind.target;
    put(&b.join("plain"), &pattern(12345, 17)).unwrap();
    put(&b.join("owned"), b"o").unwrap();
    chown(&b.join("owned"), 1234, 5678).unwrap();
    chmod(&b.join("owned"), 0o640).unwrap();
    put(&b.join("linked"), b"l").unwrap();
    link(&b.join("linked"), &b.join("linked2")).unwrap();
    mkdir(&b.join("dir"), 0o711).unwrap();
    mkdir(&b.join("dir/sub"), 0o755).unwrap();
    symlink("plain", &b.join("sym")).unwrap();
    let fd = open(&b.join("sparse"), libc::O_CREAT | libc::O_WRONLY, 0o600).unwrap();
    ftruncate(&fd, 1 << 30).unwrap();
    drop(fd);
    put(&s.base.join("via_mount"), b"m").unwrap();
    let key = |st: &libc::stat| {
        (st.st_ino, st.st_size, st.st_mode, st.st_nlink, st.st_uid, st.st_gid, st.st_blocks)
    };
    for name in ["plain", "owned", "linked", "linked2", "dir", "dir/sub", "sparse", "via_mount"] {
        let covered = raw_stat(&b.join(name)).unwrap();
        let seen = raw_stat(&s.base.join(name))
            .unwrap_or_else(|e| panic!("stat {name} through the mount: {e:?}"));
        assert_eq!(
            key(&seen),
            key(&covered),
            "{name}: (ino, size, mode, nlink, uid, gid, blocks) through the mount vs covered"
        );
        let fd = open(&s.base.join(name), libc::O_RDONLY, 0).unwrap();
        assert_eq!(key(&raw_fstat(&fd).unwrap()), key(&covered), "{name}: fstat through the mount");
    }
    let covered = raw_lstat(&b.join("sym")).unwrap();
    let seen = raw_lstat(&s.base.join("sym")).unwrap();
    assert_eq!(key(&seen), key(&covered), "symlink: lstat through the mount vs covered");
    // readdir's d_ino is the covered inode number too (names only the mount has, such as
    // its status directory, are skipped).
    for dir in ["", "dir"] {
        for (name, _, ino) in list_dir_ino(&s.base.join(dir), 4096).unwrap() {
            if name == "." || name == ".." {
                continue;
            }
            if let Ok(covered) = raw_lstat(&b.join(dir).join(&name)) {
                assert_eq!(ino, covered.st_ino, "d_ino of {dir}/{name} through the mount");
            }
        }
    }
    drop(mount);
}

// ---------------------------------------------------------------------------------------------
// Shutdown with handles still open.

/// Stops the daemon with `stop` while a file is open, then checks that the path shows the
/// covered directory at once, the open fd keeps working (reads, writes, and requests that
/// reach the daemon), the daemon stays up until the fd is closed and then exits 0.
fn stop_with_open_file(stop: impl FnOnce(&Mount)) {
    let (s, bind, mount) = covered_env();
    let data = pattern(1 << 20, 18);
    put(&s.base.join("held"), &data).unwrap();
    let fd = open(&s.base.join("held"), libc::O_RDWR, 0).unwrap();
    stop(&mount);
    common::wait_until(Duration::from_secs(10), "the mount to be detached", || {
        (!is_fuse(&s.base)).then_some(())
    });
    assert_eq!(
        statfs_type(&s.base),
        statfs_type(&bind.target),
        "the path should show the covered dir"
    );
    assert_eq!(
        raw_stat(&s.base.join("held")).unwrap().st_ino,
        raw_stat(&bind.target.join("held")).unwrap().st_ino
    );
    assert!(mount.running(), "daemon exited while a file was still open:\n{}", mount.log_text());
    assert!(pread(&fd, 4096, 4096).unwrap() == data[4096..8192], "read after detach");
    pwrite(&fd, b"after-stop", 0).unwrap();
    assert_eq!(get(&bind.target.join("held")).unwrap()[..10], *b"after-stop");
    assert_eq!(fstat(&fd).map(|m| m.size), Ok(1 << 20), "fstat after detach");
    assert_eq!(
        lseek(&fd, 0, libc::SEEK_HOLE),
        Ok(1 << 20),
        "SEEK_HOLE after detach (a daemon request)"
    );
    assert_eq!(cvt(unsafe { libc::fsync(fd.as_raw_fd()) }), Ok(0), "fsync after detach");
    std::thread::sleep(Duration::from_millis(500));
    assert!(mount.running(), "daemon exited while a file was still open:\n{}", mount.log_text());
    // New opens reach the covered directory, not the daemon.
    put(&s.base.join("new_after_stop"), b"n").unwrap();
    assert_eq!(get(&bind.target.join("new_after_stop")).unwrap(), b"n");
    drop(fd);
    let log = s.base.with_file_name("_base.daemon.log");
    let status = mount.wait_exit(Duration::from_secs(15));
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let status =
        status.unwrap_or_else(|| panic!("daemon did not exit after the last close:\n{log}"));
    assert_eq!(status.code(), Some(0), "daemon exit status after the last close:\n{log}");
    assert!(common::mounts_at(&s.base).is_empty(), "a mount is left at {:?}", s.base);
}

#[test]
fn sigterm_keeps_serving_an_open_file_until_its_release() {
    stop_with_open_file(|m| m.signal_term());
}

#[test]
fn unmount_command_keeps_serving_an_open_file_until_its_release() {
    stop_with_open_file(|m| {
        let (code, out, err) = common::run(Command::new(common::bin()).arg("unmount").arg(&m.dir));
        assert_eq!(code, 0, "imagecachefs unmount: {out}{err}");
    });
}

/// The mount lets the kernel skip its per-write `security.capability` query, so dropping
/// set-id bits when an unprivileged user modifies a file is the daemon's job: the result
/// must be what the covered filesystem does.
#[test]
fn set_id_bits_drop_when_an_unprivileged_user_writes_or_truncates() {
    let env = Env::new();
    env.open_to_all();
    const NOBODY: u32 = 65534;
    env.same("set-id bits", |r, t| -> Res<()> {
        t.ok("mkdir w 777", mkdir(&r.join("w"), 0o777).and_then(|_| chmod(&r.join("w"), 0o777)))?;
        let w = r.join("w");
        for (name, mode) in [("suid", 0o4755), ("sgid", 0o2775), ("sgid-noexec", 0o2664)] {
            let p = w.join(name);
            t.ok("put", put(&p, b"data"))?;
            t.ok("chown nobody", chown(&p, NOBODY, NOBODY))?;
            t.ok("chmod", chmod(&p, mode))?;
        }
        let (wsuid, wsgid, wnoexec) = (w.join("suid"), w.join("sgid"), w.join("sgid-noexec"));
        let lines = as_user(NOBODY, NOBODY, || {
            let mut t = Log::default();
            let fd = open(&wsuid, libc::O_WRONLY | libc::O_APPEND, 0);
            t.rec("append to suid", fd.and_then(|fd| write_all(&fd, b"more")));
            t.rec("truncate sgid", truncate(&wsgid, 2));
            let fd = open(&wnoexec, libc::O_WRONLY | libc::O_APPEND, 0);
            t.rec("append to sgid-noexec", fd.and_then(|fd| write_all(&fd, b"more")));
            t.0
        });
        t.0.extend(lines);
        t.rec("suid after", stat(&wsuid));
        t.rec("sgid after", stat(&wsgid));
        t.rec("sgid-noexec after", stat(&wnoexec));
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// POSIX ACLs: enforced through the mount as the covered filesystem enforces them.

/// Runs `tool args...` in `dir` (as root, or as `nobody` through `setpriv`); records its exit
/// code, output and error with `root` spelled `ROOT`, so both runs compare.
fn acl_tool(root: &Path, dir: &Path, as_nobody: bool, tool: &str, args: &[&str]) -> String {
    let mut cmd = if as_nobody {
        let mut c = common::tool("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
        common::require_tool(tool);
        c.arg(tool);
        c
    } else {
        common::tool(tool)
    };
    cmd.args(args).current_dir(dir);
    let (code, out, err) = common::run(&mut cmd);
    let root = root.to_string_lossy();
    format!("{code} {:?} {:?}", out.replace(&*root, "ROOT"), err.replace(&*root, "ROOT"))
}

/// `getfacl` of names in `dir`: numeric ids, effective rights, no header.
fn getfacl(root: &Path, dir: &Path, names: &[&str]) -> String {
    let mut args = vec!["-n", "-e", "--omit-header"];
    args.extend_from_slice(names);
    acl_tool(root, dir, false, "getfacl", &args)
}

fn setfacl(root: &Path, dir: &Path, args: &[&str]) -> Res<()> {
    let out = acl_tool(root, dir, false, "setfacl", args);
    assert!(out.starts_with("0 "), "setfacl {args:?} in {dir:?}: {out}");
    Ok(())
}

/// A named-user entry denies `nobody` a file its mode lets everyone read, and grants it one
/// its mode keeps to the owner: through the mount exactly as on the plain directory.
#[test]
fn posix_acl_entries_decide_access_as_on_the_plain_directory() {
    let env = Env::new();
    env.open_to_all();
    env.same("ACL access", |r, t| -> Res<()> {
        t.ok("mkdir w 755", mkdir(&r.join("w"), 0o755))?;
        let w = r.join("w");
        t.ok(
            "put denied 644",
            put(&w.join("denied"), b"secret").and_then(|_| chmod(&w.join("denied"), 0o644)),
        )?;
        t.ok(
            "put granted 600",
            put(&w.join("granted"), b"shared").and_then(|_| chmod(&w.join("granted"), 0o600)),
        )?;
        t.ok(
            "put plain 600",
            put(&w.join("plain"), b"mine").and_then(|_| chmod(&w.join("plain"), 0o600)),
        )?;
        t.ok("setfacl u:nobody:---", setfacl(r, &w, &["-m", "u:nobody:---", "denied"]))?;
        t.ok("setfacl u:nobody:rw-", setfacl(r, &w, &["-m", "u:nobody:rw-", "granted"]))?;
        t.rec("getfacl", getfacl(r, &w, &["denied", "granted", "plain"]));
        t.rec("stat denied", stat(&w.join("denied")));
        t.rec("stat granted", stat(&w.join("granted")));
        t.rec("nobody reads denied", acl_tool(r, &w, true, "cat", &["denied"]));
        t.rec("nobody reads granted", acl_tool(r, &w, true, "cat", &["granted"]));
        t.rec("nobody reads plain", acl_tool(r, &w, true, "cat", &["plain"]));
        t.rec(
            "nobody appends to granted",
            acl_tool(r, &w, true, "sh", &["-c", "echo more >> granted && cat granted"]),
        );
        t.rec(
            "nobody appends to denied",
            acl_tool(r, &w, true, "sh", &["-c", "echo more >> denied"]),
        );
        t.rec("root reads denied", get(&w.join("denied")).map(|d| d.len()));
        // Removing the entry gives the mode back its say (and the kernel's cached ACL goes).
        t.ok("setfacl -x", setfacl(r, &w, &["-x", "u:nobody", "denied"]))?;
        t.rec("nobody reads denied after -x", acl_tool(r, &w, true, "cat", &["denied"]));
        t.ok("setfacl -b granted", setfacl(r, &w, &["-b", "granted"]))?;
        t.rec("nobody reads granted after -b", acl_tool(r, &w, true, "cat", &["granted"]));
        t.rec("getfacl after", getfacl(r, &w, &["denied", "granted"]));
        Ok(())
    });
}

/// A default ACL on a directory is inherited by what is created in it through the mount
/// (files, directories, fifos; by root and by `nobody`), and the creator's umask applies only
/// where there is no default ACL: modes and ACLs exactly as on the plain directory.
#[test]
fn default_acl_is_inherited_as_on_the_plain_directory() {
    let env = Env::new();
    env.open_to_all();
    env.same("default ACL", |r, t| -> Res<()> {
        t.ok("mkdir inherit", mkdir(&r.join("inherit"), 0o755))?;
        t.ok(
            "mkdir masked",
            mkdir(&r.join("masked"), 0o777).and_then(|_| chmod(&r.join("masked"), 0o777)),
        )?;
        let (inherit, masked) = (r.join("inherit"), r.join("masked"));
        t.ok(
            "setfacl default",
            setfacl(
                r,
                r,
                &["-m", "u:nobody:rwx", "-d", "-m", "u:nobody:rw-,g::r-x,o::---,m::rwx", "inherit"],
            ),
        )?;
        let make = "umask 077 && : > file && mkdir dir && mkfifo fifo && mkdir -m 0750 dir750";
        for dir in [&inherit, &masked] {
            t.rec("root creates (umask 077)", acl_tool(r, dir, false, "sh", &["-c", make]));
            t.rec(
                "nobody creates (umask 022)",
                acl_tool(
                    r,
                    dir,
                    true,
                    "sh",
                    &["-c", "umask 022 && : > by-nobody && mkdir nobody-dir"],
                ),
            );
            for name in ["file", "dir", "fifo", "dir750", "by-nobody", "nobody-dir"] {
                t.rec(format!("stat {name}"), stat(&dir.join(name)));
            }
            t.rec(
                "getfacl",
                getfacl(r, dir, &["file", "dir", "fifo", "dir750", "by-nobody", "nobody-dir"]),
            );
            t.rec(
                "file created deeper",
                acl_tool(r, dir, false, "sh", &["-c", "umask 027 && : > dir/deeper"]),
            );
            t.rec("stat dir/deeper", stat(&dir.join("dir/deeper")));
            t.rec("getfacl dir/deeper", getfacl(r, dir, &["dir/deeper"]));
        }
        Ok(())
    });
}
