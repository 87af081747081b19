//! The covered directory: every syscall on the files under the mount goes through here.
//!
//! The cache directory is opened (`O_PATH|O_DIRECTORY`) before the overlay is mounted on top
//! of it; from then on its path names the mount, so covered files are reached only relative
//! to file descriptors: `*at()` calls on a directory's `O_PATH` fd, and re-opens through the
//! `/proc/self/fd/N` magic link (which jumps straight to the covered inode, never through the
//! mount). Nothing here rebuilds a path string from names, so depth and name length behave
//! exactly as on the covered filesystem.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt};
use std::time::SystemTime;

/// File status of a covered file, as `fstatat` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blocks: u64,
    pub blksize: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

impl Stat {
    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == libc::S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.file_type() == libc::S_IFREG
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        SystemTime::UNIX_EPOCH + std::time::Duration::new(sec as u64, nsec as u32)
    } else {
        SystemTime::UNIX_EPOCH - std::time::Duration::from_secs(sec.unsigned_abs())
            + std::time::Duration::from_nanos(nsec as u64)
    }
}

impl From<libc::stat> for Stat {
    fn from(s: libc::stat) -> Self {
        Stat {
            dev: s.st_dev,
            ino: s.st_ino,
            mode: s.st_mode,
            nlink: s.st_nlink,
            uid: s.st_uid,
            gid: s.st_gid,
            rdev: s.st_rdev,
            size: s.st_size as u64,
            blocks: s.st_blocks as u64,
            blksize: s.st_blksize as u64,
            atime: time(s.st_atime, s.st_atime_nsec),
            mtime: time(s.st_mtime, s.st_mtime_nsec),
            ctime: time(s.st_ctime, s.st_ctime_nsec),
        }
    }
}

/// A time to set with `utimensat`.
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    Now,
    At(SystemTime),
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cvt_size(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

pub fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

const EMPTY: &CStr = c"";

/// `/proc/self/fd/N`: re-opening it reaches the covered inode behind `fd`.
fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    cvt(fd).map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the cache directory itself, before the overlay covers it.
pub fn open_dir_path(path: &CStr) -> io::Result<OwnedFd> {
    owned(unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) })
}

/// An `O_PATH` handle on `name` in `dir`, not following a final symlink.
pub fn open_path_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    owned(unsafe {
        libc::openat(dir.as_raw_fd(), c.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
    })
}

/// An `O_PATH` handle on the inode behind any fd.
pub fn path_fd_of(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let p = proc_path(fd);
    owned(unsafe { libc::open(p.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) })
}

pub fn stat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    cvt(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st.into())
}

/// Opens the inode behind an `O_PATH` fd for I/O with the given `open(2)` flags.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<File> {
    let p = proc_path(fd);
    owned(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) }).map(File::from)
}

/// Creates (or, without `O_EXCL`, opens) `name` in `dir`.
pub fn create_at(dir: BorrowedFd<'_>, name: &OsStr, flags: i32, mode: u32) -> io::Result<File> {
    let c = cstr(name)?;
    owned(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode as libc::c_uint,
        )
    })
    .map(File::from)
}

/// Opens the existing `name` in `dir` (never creating it, never following a final symlink).
pub fn open_at(dir: BorrowedFd<'_>, name: &OsStr, flags: i32) -> io::Result<File> {
    let c = cstr(name)?;
    let flags = (flags & !(libc::O_CREAT | libc::O_EXCL)) | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    owned(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) }).map(File::from)
}

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) }).map(drop)
}

pub fn mknod_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(name)?;
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t, rdev) }).map(drop)
}

pub fn symlink_at(dir: BorrowedFd<'_>, name: &OsStr, target: &OsStr) -> io::Result<()> {
    let c = cstr(name)?;
    let t = cstr(target)?;
    cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) }).map(drop)
}

/// Hard-links the inode behind `fd` as `name` in `dir`.
pub fn link_at(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let c = cstr(name)?;
    cvt(unsafe {
        libc::linkat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    })
    .map(drop)
}

pub fn unlink_at(dir: BorrowedFd<'_>, name: &OsStr, rmdir: bool) -> io::Result<()> {
    let c = cstr(name)?;
    let flags = if rmdir { libc::AT_REMOVEDIR } else { 0 };
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }).map(drop)
}

pub fn rename_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    newdir: BorrowedFd<'_>,
    newname: &OsStr,
    flags: u32,
) -> io::Result<()> {
    let a = cstr(name)?;
    let b = cstr(newname)?;
    cvt(unsafe {
        libc::renameat2(dir.as_raw_fd(), a.as_ptr(), newdir.as_raw_fd(), b.as_ptr(), flags)
    })
    .map(drop)
}

/// Renames `name` to `newname` in `dir` unless `newname` exists (`EEXIST`). Where the
/// filesystem has no `RENAME_NOREPLACE` (NFS, FUSE filesystems such as GlusterFS answer
/// `EINVAL`), a hard link under the new name (which fails if it exists) then the removal of
/// the old one do the same without ever replacing a file.
pub fn rename_noreplace(dir: BorrowedFd<'_>, name: &OsStr, newname: &OsStr) -> io::Result<()> {
    match rename_at(dir, name, dir, newname, libc::RENAME_NOREPLACE) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let (a, b) = (cstr(name)?, cstr(newname)?);
            cvt(unsafe {
                libc::linkat(dir.as_raw_fd(), a.as_ptr(), dir.as_raw_fd(), b.as_ptr(), 0)
            })?;
            unlink_at(dir, name, false)
        }
        r => r,
    }
}

pub fn readlink(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = cvt_size(unsafe {
        libc::readlinkat(fd.as_raw_fd(), EMPTY.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub fn chmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let p = proc_path(fd);
    cvt(unsafe { libc::chmod(p.as_ptr(), mode as libc::mode_t) }).map(drop)
}

/// Changes owner and/or group (`None` leaves it); works on symlinks too.
pub fn chown(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    cvt(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            uid.unwrap_or(u32::MAX),
            gid.unwrap_or(u32::MAX),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn truncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let p = proc_path(fd);
    cvt(unsafe { libc::truncate(p.as_ptr(), size as libc::off_t) }).map(drop)
}

pub fn ftruncate(file: &File, size: u64) -> io::Result<()> {
    file.set_len(size)
}

fn timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        Some(SetTime::Now) => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
        Some(SetTime::At(t)) => match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => {
                libc::timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as i64 }
            }
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = -(d.subsec_nanos() as i64);
                if nsec < 0 {
                    sec -= 1;
                    nsec += 1_000_000_000;
                }
                libc::timespec { tv_sec: sec, tv_nsec: nsec }
            }
        },
    }
}

/// Sets access and/or modification time (`None` leaves it: `UTIME_OMIT`).
pub fn set_times(
    fd: BorrowedFd<'_>,
    atime: Option<SetTime>,
    mtime: Option<SetTime>,
) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    cvt(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            ts.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn access(fd: BorrowedFd<'_>, mask: i32) -> io::Result<()> {
    let p = proc_path(fd);
    cvt(unsafe { libc::faccessat(libc::AT_FDCWD, p.as_ptr(), mask, libc::AT_EACCESS) }).map(drop)
}

/// One directory entry of a covered directory.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: OsString,
    pub ino: u64,
    /// `S_IFMT` bits of the entry, or 0 when the filesystem does not say.
    pub kind: u32,
}

/// Lists a covered directory (without `.` and `..`).
pub fn read_dir(fd: BorrowedFd<'_>) -> io::Result<Vec<DirEntry>> {
    let p = proc_path(fd);
    let mut out = Vec::new();
    for e in std::fs::read_dir(OsStr::from_bytes(p.as_bytes()))? {
        let e = e?;
        let ft = e.file_type()?;
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            libc::S_IFDIR
        } else if ft.is_file() {
            libc::S_IFREG
        } else if ft.is_symlink() {
            libc::S_IFLNK
        } else if ft.is_fifo() {
            libc::S_IFIFO
        } else if ft.is_socket() {
            libc::S_IFSOCK
        } else if ft.is_char_device() {
            libc::S_IFCHR
        } else if ft.is_block_device() {
            libc::S_IFBLK
        } else {
            0
        };
        out.push(DirEntry { name: e.file_name(), ino: e.ino(), kind });
    }
    Ok(out)
}

pub fn statvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut s) })?;
    Ok(s)
}

pub fn statfs_type(fd: BorrowedFd<'_>) -> io::Result<i64> {
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::fstatfs(fd.as_raw_fd(), &mut s) })?;
    Ok(s.f_type as i64)
}

/// Extended attribute calls go through the magic link (followed to the covered inode).
/// With an empty `buf` they return the size the value (or name list) needs.
pub fn getxattr(fd: BorrowedFd<'_>, name: &OsStr, buf: &mut [u8]) -> io::Result<usize> {
    let p = proc_path(fd);
    let n = cstr(name)?;
    cvt_size(unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn setxattr(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
    let p = proc_path(fd);
    let n = cstr(name)?;
    cvt(unsafe {
        libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags)
    })
    .map(drop)
}

pub fn listxattr(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let p = proc_path(fd);
    cvt_size(unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
}

pub fn removexattr(fd: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let p = proc_path(fd);
    let n = cstr(name)?;
    cvt(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }).map(drop)
}

// Operations on an open covered file.

/// A zeroed buffer aligned for `O_DIRECT` (4 KiB covers every logical block size in use).
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Aligned { ptr, layout, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points at `layout.size() >= len` initialised bytes owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// `pread`/`pwrite` on an `O_DIRECT` fd go through an aligned buffer: the request's data sits
/// at an arbitrary address in the daemon, while offsets and lengths are the caller's, so the
/// covered filesystem refuses exactly the misaligned requests it would refuse the caller.
pub fn pread_direct(file: &File, offset: u64, size: usize) -> io::Result<Vec<u8>> {
    let mut buf = Aligned::new(size);
    let n = file.read_at(buf.as_mut(), offset)?;
    Ok(buf.as_mut()[..n].to_vec())
}

pub fn pwrite_direct(file: &File, offset: u64, data: &[u8]) -> io::Result<usize> {
    let mut buf = Aligned::new(data.len());
    buf.as_mut().copy_from_slice(data);
    file.write_at(buf.as_mut(), offset)
}

pub fn pread(file: &File, offset: u64, size: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let mut done = 0;
    while done < size {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(done);
    Ok(buf)
}

pub fn pwrite(file: &File, offset: u64, data: &[u8]) -> io::Result<usize> {
    file.write_all_at(data, offset)?;
    Ok(data.len())
}

pub fn fsync(file: &File, datasync: bool) -> io::Result<()> {
    let fd = file.as_fd().as_raw_fd();
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    })
    .map(drop)
}

pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    cvt(unsafe {
        libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t)
    })
    .map(drop)
}

pub fn lseek(file: &File, offset: i64, whence: i32) -> io::Result<i64> {
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn copy_file_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
    flags: u32,
) -> io::Result<usize> {
    let mut a = src_off as libc::loff_t;
    let mut b = dst_off as libc::loff_t;
    cvt_size(unsafe {
        libc::copy_file_range(src.as_raw_fd(), &mut a, dst.as_raw_fd(), &mut b, len as usize, flags)
    })
}

/// Reads a small file in `dir`; `None` if it does not exist.
pub fn read_file_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let c = cstr(name)?;
    let fd = match owned(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    }) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    File::from(fd).read_to_end(&mut out)?;
    Ok(Some(out))
}

/// Replaces `name` in `dir` atomically: write `tmp`, fsync, rename over `name`.
pub fn replace_file_at(
    dir: BorrowedFd<'_>,
    tmp: &OsStr,
    name: &OsStr,
    data: &[u8],
) -> io::Result<()> {
    use std::io::Write;
    let mut f = create_at(dir, tmp, libc::O_WRONLY | libc::O_TRUNC, 0o600)?;
    f.write_all(data)?;
    f.sync_data()?;
    rename_at(dir, tmp, dir, name, 0)?;
    // The rename itself reaches the disk with the directory.
    fsync(&reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY)?, false)
}
