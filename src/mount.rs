//! Mounting over the cache directory itself, detaching, and recognising our own mounts.
//!
//! The directory is opened before the mount so that the daemon can still reach the covered
//! files. The kernel mount is made here with `mount(2)` (not by fuser), so the daemon owns
//! the `/dev/fuse` fd and the unmount policy: a stop is always a lazy detach by the daemon
//! or the `unmount` command, never an unmount-by-path when the session ends (by then another
//! imagecachefs may be mounted at the same path).

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::backing;

/// The filesystem type shown in `/proc/mounts`: `fuse.imagecachefs`.
pub const FSTYPE: &str = "fuse.imagecachefs";
pub const SOURCE: &str = "imagecachefs";

/// A refusal or failure, as one line for the operator.
#[derive(Debug)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn refuse<T>(msg: String) -> Result<T, Refusal> {
    Err(Refusal(msg))
}

/// The absolute path of `dir` without touching `dir` itself (it may be a dead mount):
/// the parent is canonicalised and the last component kept. A symlink stays a symlink: the
/// cache directory keeps the name Nova and instance disks use for it.
pub fn absolute(dir: &Path) -> io::Result<PathBuf> {
    let abs =
        if dir.is_absolute() { dir.to_path_buf() } else { std::env::current_dir()?.join(dir) };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(parent.canonicalize()?.join(name)),
        _ => Ok(abs), // "/"
    }
}

/// Where a mount over `dir` lands, and the mount table names it: `dir` itself, or where it
/// leads if it is a symlink (a symlink is never a mount point; `mount(2)` follows it).
pub fn mount_point(dir: &Path) -> PathBuf {
    // A mount point is no symlink; and looking at it would ask its daemon.
    if top_mount(dir).is_some() {
        return dir.to_path_buf();
    }
    let is_link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
    match is_link.then(|| dir.canonicalize()) {
        Some(Ok(target)) => target,
        _ => dir.to_path_buf(),
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// The mount id (what `/proc/<pid>/fdinfo/<fd>` calls `mnt_id`).
    pub id: u64,
    pub mount_point: PathBuf,
    pub dev: (u32, u32),
    pub fstype: String,
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let (maj, min) = f.get(2)?.split_once(':')?;
            Some(MountInfo {
                id: f.first()?.parse().ok()?,
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                dev: (maj.parse().ok()?, min.parse().ok()?),
                fstype: right.split(' ').next()?.to_string(),
            })
        })
        .collect()
}

/// The topmost mount at exactly `dir` (the last one listed), if any.
/// (`dir` as the mount table names it: see [`mount_point`].)
pub fn top_mount(dir: &Path) -> Option<MountInfo> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text).into_iter().rfind(|m| m.mount_point == dir)
}

/// What is at `dir` now.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// No imagecachefs mount on top.
    Plain,
    /// A working imagecachefs mount.
    Live,
    /// An imagecachefs mount whose daemon is gone (`ENOTCONN`).
    Stale,
}

pub fn probe(dir: &Path) -> Found {
    match top_mount(&mount_point(dir)) {
        Some(m) if m.fstype == FSTYPE => {
            // statfs always reaches the daemon (stat may be answered from the kernel's cache).
            let c = CString::new(dir.as_os_str().as_bytes()).expect("a path has no NUL");
            let mut s: libc::statfs = unsafe { std::mem::zeroed() };
            let dead = unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0
                && io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN);
            if dead {
                Found::Stale
            } else {
                Found::Live
            }
        }
        _ => Found::Plain,
    }
}

/// The cache directory, opened before the mount, and the kernel connection.
pub struct Prepared {
    pub dir: PathBuf,
    pub dir_fd: OwnedFd,
    pub dev: OwnedFd,
    /// The SELinux `context=` mount option, if any.
    pub context: Option<String>,
}

/// Checks `dir` and opens everything the mount needs; refuses with one line.
pub fn prepare(dir: &Path) -> Result<Prepared, Refusal> {
    let shown = dir.display();
    let abs = match absolute(dir) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return refuse(format!("{shown} does not exist"))
        }
        Err(e) => return refuse(format!("{shown}: {e}")),
    };
    match probe(&abs) {
        Found::Live => return refuse(format!("{shown} is already an imagecachefs mount")),
        Found::Stale => {
            return refuse(format!(
                "{shown} is a stale imagecachefs mount (its daemon is gone): run \
                 `imagecachefs unmount {shown}` first"
            ))
        }
        Found::Plain => {}
    }
    match std::fs::metadata(&abs) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return refuse(format!("{shown} is not a directory")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return refuse(format!("{shown} does not exist"))
        }
        Err(e) => return refuse(format!("{shown}: {e}")),
    }
    let dev = match OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(f) => OwnedFd::from(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return refuse(
                "/dev/fuse is missing: load the fuse kernel module (modprobe fuse)".into(),
            )
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return refuse(format!("opening /dev/fuse is not permitted ({e}): run as root"))
        }
        Err(e) => return refuse(format!("/dev/fuse: {e}")),
    };
    let c = CString::new(abs.as_os_str().as_bytes()).map_err(|_| Refusal("bad path".into()))?;
    let dir_fd = backing::open_dir_path(&c).map_err(|e| Refusal(format!("{shown}: {e}")))?;
    // Another daemon may have mounted since the probe: then the directory opened is its
    // mount's root, which must be neither scanned nor covered.
    // The root of another daemon's mount at this very path (opened after it mounted); a
    // directory inside an imagecachefs mount is a cache on a FUSE filesystem like any other.
    let at = mount_point(&abs);
    if mount_of(dir_fd.as_fd()).is_some_and(|m| m.fstype == FSTYPE && m.mount_point == at) {
        return refuse(format!("{shown} is already an imagecachefs mount"));
    }
    Ok(Prepared { dir: abs, dir_fd, dev, context: None })
}

/// The mount the descriptor `fd` is on, from the kernel's mount table (None if unreadable).
fn mount_of(fd: std::os::fd::BorrowedFd<'_>) -> Option<MountInfo> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    let id = crate::procfs::parse_fdinfo(&info).mnt?;
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&table).into_iter().find(|m| m.id == id)
}

/// How long a mount waits for another mount of the same directory that is under way.
const MOUNT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Takes an exclusive `flock` on the covered directory `dir_fd` (an `O_PATH` handle: a
/// descriptor of its own is opened on it, `.` crossing no mount) and checks that nothing was
/// mounted over it since it was opened. Two daemons started for one directory at once (the
/// unit and `mount -a`) both found it plain in [`prepare`] and both mounted: the lower daemon
/// never saw the opens made through the upper one and could evict images in use. Held until
/// the mount is made (the returned descriptor); waits at most [`MOUNT_LOCK_WAIT`]. Reads only
/// the covered directory and the kernel's mount table, never a FUSE mount.
fn lock_uncovered(p: &Prepared) -> Result<OwnedFd, Refusal> {
    use std::os::fd::AsRawFd;
    let shown = p.dir.display();
    let dot = CString::new(".").expect("no NUL");
    let fd = unsafe {
        libc::openat(
            p.dir_fd.as_raw_fd(),
            dot.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return refuse(format!("{shown}: {}", io::Error::last_os_error()));
    }
    // SAFETY: a descriptor just opened, owned by nothing else.
    let lock: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let deadline = std::time::Instant::now() + MOUNT_LOCK_WAIT;
    while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return refuse(format!("{shown}: locking it for the mount: {e}"));
        }
        if std::time::Instant::now() >= deadline {
            return refuse(format!(
                "{shown} stayed locked by another process for {} s (another imagecachefs \
                 mounting it?); nothing mounted",
                MOUNT_LOCK_WAIT.as_secs()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", lock.as_raw_fd()))
        .map_err(|e| Refusal(format!("{shown}: {e}")))?;
    let ours = crate::procfs::parse_fdinfo(&info).mnt;
    let table = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Refusal(format!("/proc/self/mountinfo: {e}")))?;
    let table = parse_mountinfo(&table);
    let under = table.iter().find(|m| Some(m.id) == ours);
    let at = mount_point(&p.dir);
    let top = table.iter().rfind(|m| m.mount_point == at);
    // The directory is another daemon's mount if it is the root of an imagecachefs mount at
    // this path, or one sits on top of it; a directory inside an imagecachefs mount (a cache
    // on a FUSE filesystem) is not.
    let is_root_of = |m: &&MountInfo| m.fstype == FSTYPE && m.mount_point == at;
    if under.is_some_and(|m| is_root_of(&m)) || top.is_some_and(|m| m.fstype == FSTYPE) {
        return refuse(format!("{shown} is already an imagecachefs mount"));
    }
    if let Some(top) = top.filter(|m| Some(m.id) != ours) {
        return refuse(format!(
            "{shown}: a {} filesystem was mounted over it meanwhile; nothing mounted",
            top.fstype
        ));
    }
    Ok(lock)
}

/// Mounts the FUSE connection over the directory itself.
pub fn mount(p: &Prepared) -> Result<(), Refusal> {
    use std::os::fd::AsRawFd;
    // Released (closed) once the mount is made or refused.
    let _lock = lock_uncovered(p)?;
    let target = CString::new(p.dir.as_os_str().as_bytes()).expect("checked in prepare");
    let mut data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
        p.dev.as_fd().as_raw_fd()
    );
    if let Some(context) = &p.context {
        // Quoted: an MLS range has commas (`s0:c1,c2`); the parser keeps out quotes.
        data.push_str(&format!(",context=\"{context}\""));
    }
    let data = CString::new(data).map_err(|_| Refusal("a NUL in the mount options".into()))?;
    let source = CString::new(SOURCE).expect("no NUL");
    let fstype = CString::new(FSTYPE).expect("no NUL");
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NODEV | libc::MS_NOSUID,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EPERM) => refuse(format!(
            "mounting {} is not permitted: imagecachefs must run as root (CAP_SYS_ADMIN)",
            p.dir.display()
        )),
        _ => refuse(format!("mounting {}: {e}", p.dir.display())),
    }
}

/// Lazily detaches the mount at `dir`: new path lookups reach the covered directory at once,
/// open files keep being served until their last close.
pub fn detach(dir: &Path) -> io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches the mount `id` at `dir`, and no other: the mount is pinned by a descriptor on its
/// root (checked to be that mount), and the detach names the descriptor, so a mount that
/// replaced it on top meanwhile, or lies under it, is never the one detached.
fn detach_exactly(dir: &Path, id: Option<u64>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fd = backing::open_dir_path(&c)?;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    if crate::procfs::parse_fdinfo(&info).mnt != id {
        return Ok(()); // not ours any more: detached by someone else
    }
    let by_fd = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
    if unsafe { libc::umount2(by_fd.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `imagecachefs unmount DIR`.
pub fn unmount(dir: &Path) -> Result<(), Refusal> {
    let shown = dir.display();
    let abs = absolute(dir).map_err(|e| Refusal(format!("{shown}: {e}")))?;
    let mp = mount_point(&abs);
    // Nothing here looks inside the mount itself (no stat, no statfs): its daemon may be
    // stopped or hung, which is when an unmount is needed most.
    let ours = |m: &MountInfo| m.fstype == FSTYPE;
    let Some(before) = top_mount(&mp).filter(ours).map(|m| m.id) else {
        return refuse(format!("{shown} is not an imagecachefs mount"));
    };
    let before = Some(before);
    // The daemon stops itself (writing its state a last time); if it does not answer in
    // time (dead, stopped, hung), the mount is detached from here — only if it is still the
    // same mount: another unmount may have detached it meanwhile, and what lies under it (a
    // bind mount of the directory, the filesystem itself) is not ours to detach.
    let wait = std::time::Duration::from_secs(10);
    let deadline = std::time::Instant::now() + wait;
    if ask_to_stop(&abs, wait) {
        while std::time::Instant::now() < deadline {
            if top_mount(&mp).map(|m| m.id) != before {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    if top_mount(&mp).filter(ours).map(|m| m.id) != before {
        return Ok(());
    }
    detach_exactly(&mp, before).map_err(|e| Refusal(format!("detaching {shown}: {e}")))
}

/// Writes `unmount` to the daemon's control file from a child process, and says whether it
/// was taken within `timeout`. A child, because the write may never return (the daemon busy
/// on a hung filesystem): a stuck child is left behind, never this command.
fn ask_to_stop(dir: &Path, timeout: std::time::Duration) -> bool {
    let Ok(control) = CString::new(dir.join(".imagecache/control").as_os_str().as_bytes()) else {
        return false;
    };
    const LINE: &[u8] = b"unmount\n";
    // SAFETY: the child makes only async-signal-safe calls (open, write, _exit) on memory
    // prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            let fd = libc::open(control.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            let ok =
                fd >= 0 && libc::write(fd, LINE.as_ptr().cast(), LINE.len()) == LINE.len() as isize;
            libc::_exit(if ok { 0 } else { 1 });
        }
    }
    if pid < 0 {
        return false;
    }
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut status = 0;
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
            return libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The mount type (mountinfo's `fstype`, empty if unknown) and `statfs` magic of the
/// filesystem `fd` (a directory opened before our mount covers it) lives on.
pub fn filesystem_of(fd: std::os::fd::BorrowedFd<'_>) -> (String, i64) {
    use std::os::fd::AsRawFd;
    let magic = backing::statfs_type(fd).unwrap_or(0);
    let fstype = (|| {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()));
        let id = crate::procfs::parse_fdinfo(&info.ok()?).mnt?;
        let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        parse_mountinfo(&text).into_iter().find(|m| m.id == id).map(|m| m.fstype)
    })();
    (fstype.unwrap_or_default(), magic)
}

/// Filesystem types whose files other hosts may see and change (network and cluster
/// filesystems; FUSE filesystems in general, except the local `fuseblk`).
const SHARED_TYPES: [&str; 14] = [
    "nfs",
    "nfs4",
    "ceph",
    "cifs",
    "smb3",
    "smbfs",
    "9p",
    "virtiofs",
    "gpfs",
    "lustre",
    "ocfs2",
    "gfs2",
    "glusterfs",
    "afs",
];
const SHARED_MAGICS: [i64; 9] = [
    0x6969,      // NFS
    0x00c3_6400, // Ceph
    0xff53_4d42, // CIFS
    0xfe53_4d42, // SMB2/3
    0x0102_1997, // 9p
    0x4750_4653, // GPFS
    0x0bd0_0bd0, // Lustre
    0x7461_636f, // OCFS2
    0x0116_1970, // GFS2
];
const FUSE_MAGIC: i64 = 0x6573_5546;

/// Whether a filesystem of this mount type and `statfs` magic may be shared between hosts:
/// `Some(type)` names it.
pub fn shared_kind(fstype: &str, magic: i64) -> Option<String> {
    let base = fstype.split('.').next().unwrap_or(fstype);
    let fuse_subtype = base == "fuse" && fstype != "fuseblk";
    if SHARED_TYPES.contains(&base) || SHARED_TYPES.contains(&fstype) || fuse_subtype {
        return Some(fstype.to_string());
    }
    if SHARED_MAGICS.contains(&magic) || (magic == FUSE_MAGIC && fstype != "fuseblk") {
        return Some(if fstype.is_empty() { format!("magic {magic:#x}") } else { fstype.into() });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let text = "36 35 98:0 /mnt1 /mnt/parent\\040dir rw,noatime master:1 - ext3 /dev/root rw\n\
                    40 36 0:52 / /var/lib/nova/instances/_base rw,nosuid,nodev shared:5 - fuse.imagecachefs imagecachefs rw,user_id=0\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/parent dir"));
        assert_eq!(m[0].fstype, "ext3");
        assert_eq!(m[1].dev, (0, 52));
        assert_eq!((m[0].id, m[1].id), (36, 40));
        assert_eq!(m[1].fstype, FSTYPE);
        assert_eq!(m[1].mount_point, PathBuf::from("/var/lib/nova/instances/_base"));
    }

    #[test]
    fn shared_storage_is_recognised_by_type_or_magic() {
        for t in ["nfs", "nfs4", "ceph", "fuse.glusterfs", "fuse.ceph-fuse", "gpfs", "lustre"] {
            assert_eq!(shared_kind(t, 0).as_deref(), Some(t), "{t}");
        }
        for t in ["ocfs2", "gfs2", "cifs", "smb3", "9p", "virtiofs", "fuse.sshfs", "fuse"] {
            assert!(shared_kind(t, 0).is_some(), "{t}");
        }
        assert!(shared_kind("", 0x6969).is_some(), "NFS by magic alone");
        assert!(shared_kind("", FUSE_MAGIC).is_some(), "FUSE by magic alone");
        for t in ["ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "fuseblk"] {
            let magic = if t == "fuseblk" { FUSE_MAGIC } else { 0xef53 };
            assert_eq!(shared_kind(t, magic), None, "{t}");
        }
    }
}
