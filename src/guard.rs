//! What Nova still needs, read from outside the mount: backing files and Nova's own locks.
//!
//! Owns two questions the eviction path asks before it removes a cache file: which cache files
//! do instance disks name as their qcow2 backing file ([`backing_names`]: a stopped VM holds no
//! open file but still needs its base), and is Nova's external lock on the file free
//! ([`try_nova_lock`], the same POSIX `lockf` that oslo.concurrency/fasteners take on
//! `<instances>/locks/nova-<name>`). Invariants: nothing here lists, stats or opens anything
//! inside the cache directory (its path is the mount; the daemon would wait on itself); a disk
//! Nova records as other than qcow2 is never read (its first sector is its guest's); a read
//! error that could hide a reference is returned, never skipped; lock files and the `locks`
//! directory are created with the owner Nova needs to open them, and are never deleted; this
//! process holds at most one [`NovaLock`] per lock file (POSIX record locks are per process).

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

const QCOW_MAGIC: &[u8; 4] = b"QFI\xfb";
/// The longest header read: qcow2 version 3 (version 2: 72 bytes, qcow version 1: 48).
const HEADER_MAX: usize = 104;
/// QEMU refuses a longer backing file name ("Backing file name too long").
const BACKING_NAME_MAX: u32 = 1023;
/// Entries of the instances directory that are never instance directories.
const NOT_INSTANCES: [&[u8]; 2] = [b"locks", b"snapshots"];
/// Tries at a lock file whose name is unlinked or recreated while we open and lock it.
const LOCK_ATTEMPTS: usize = 3;
/// Nova's record of the format of each disk of an instance, in the instance directory.
const DISK_INFO: &str = "disk.info";
/// A larger `disk.info` is not Nova's (it holds one short line per disk).
const DISK_INFO_MAX: u64 = 1 << 20;
/// QEMU refuses a backing file name that starts past the first cluster, and clusters are at
/// most 2 MiB (`cluster_bits` 21).
const BACKING_OFFSET_MAX: u64 = 2 << 20;
/// Distinct (path, reason) pairs [`report_once`] remembers; past that it logs at debug only.
const REPORTED_MAX: usize = 1024;

/// The backing-file name recorded in a qcow2 header (version 2 or 3): magic "QFI\xfb", big-endian
/// backing_file_offset (u64 at byte 8) and backing_file_size (u32 at byte 16); read at most a few
/// KiB; Ok(None) for a qcow2 without backing file, for a raw/other file, or a file shorter than the header.
///
/// Reads from the start of `file` whatever its position. The original qcow (version 1) keeps
/// the two fields at the same offsets and is read too. The name ends at its first NUL, as in
/// QEMU. `InvalidData` for a header QEMU would refuse to open (another version, a name longer
/// than 1023 bytes or starting past 2 MiB) and for a name lying past the end of the file (a
/// disk being written): whatever the header says, only reading the file can give another error.
pub fn qcow2_backing_file(file: &mut (impl Read + Seek)) -> io::Result<Option<OsString>> {
    file.seek(SeekFrom::Start(0))?;
    let mut header = [0u8; HEADER_MAX];
    let len = read_up_to(file, &mut header)?;
    if len < 8 || &header[..4] != QCOW_MAGIC {
        return Ok(None);
    }
    let header_len = match be_u32(&header[4..8]) {
        1 => 48,
        2 => 72,
        3 => 104,
        version => return Err(invalid_data(format!("qcow2 version {version} is not supported"))),
    };
    if len < header_len {
        return Ok(None);
    }
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&header[8..16]);
    let offset = u64::from_be_bytes(offset);
    let size = be_u32(&header[16..20]);
    if offset == 0 || size == 0 {
        return Ok(None);
    }
    if size > BACKING_NAME_MAX {
        return Err(invalid_data(format!("qcow2 backing file name of {size} bytes")));
    }
    if offset > BACKING_OFFSET_MAX {
        return Err(invalid_data(format!("qcow2 backing file name at offset {offset}")));
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut name = vec![0u8; size as usize];
    if read_up_to(file, &mut name)? < name.len() {
        return Err(invalid_data("qcow2 backing file name lies past the end of the file".into()));
    }
    if let Some(nul) = name.iter().position(|&b| b == 0) {
        name.truncate(nul);
    }
    Ok((!name.is_empty()).then(|| OsString::from_vec(name)))
}

/// Names of cache files that instance disks under `instances_dir` use as backing files:
/// for every directory entry of instances_dir (skip `_base`, `locks`, `snapshots` and non-directories),
/// every regular file in it whose name starts with "disk" (disk, disk.local, disk.eph0, disk.swap,
/// disk.rescue, disk.config, ...), read its qcow2 backing file name; if that path's parent directory
/// is `cache_dir` (compare the final component of the parent with cache_dir's file name AND, when the
/// backing name is absolute, the full parent path with cache_dir; also accept a relative name
/// resolved against the instance dir), return its last component.
///
/// Skipped entries of `instances_dir`: also any named like the cache directory or starting with
/// `_base` (`subdirectory_name = _base_$my_ip`), so the mount is never read. The parent matches
/// when it equals `cache_dir` lexically or, failing that, when the parent of each resolves
/// (`realpath`, never through the mount) to the same directory: a symlinked `instances_path` and
/// relative names like `../_base/<hash>` match. A `file:` prefix (QEMU's protocol) is ignored.
///
/// Which disks are read: an instance directory's `disk.info` (Nova's JSON map of each disk's
/// path to its format, written by the libvirt driver's image backend) decides. A disk it lists
/// as `qcow2` is read; a disk it lists as anything else (`raw`, `ploop`, ...) is never opened:
/// with raw disks the guest owns the first sector, and a header it forged must neither protect
/// a base nor stop the scan. Entries match disks by file name (a `<uuid>_resize` directory
/// keeps the `<uuid>/disk` paths); a name listed twice is read if either entry says `qcow2`.
/// A disk `disk.info` does not list, and every disk of an instance whose `disk.info` is missing,
/// unreadable or malformed (logged once), is read as before Nova recorded formats.
///
/// Errors: an unreadable `instances_dir` is an `Err`. Disks and instance directories that vanish
/// are logged at debug and skipped. A disk whose header is not one QEMU would open
/// (`InvalidData`, `UnexpectedEof`: a disk being written, which Nova does under the
/// `nova-<name>` lock eviction takes, or bytes a guest wrote) is logged once per disk and
/// reason and skipped: it names nothing, and the other disks still count. Any other error on a
/// single disk or instance directory (`EACCES`, `EIO`, ...) is an `Err` too, with its errno,
/// after a `warn` naming the path: skipping that disk could let its base be evicted.
pub fn backing_names(instances_dir: &Path, cache_dir: &Path) -> io::Result<BTreeSet<OsString>> {
    let mut cache =
        CacheDir { path: cache_dir, name: cache_dir.file_name(), canonical_parent: None };
    let mut names = BTreeSet::new();
    for entry in fs::read_dir(instances_dir)? {
        let entry = entry?;
        if !cache.may_be_instance(&entry.file_name()) {
            continue;
        }
        let dir = entry.path();
        match fs::metadata(&dir) {
            Ok(meta) if meta.is_dir() => scan_instance(&dir, &mut cache, &mut names)?,
            Ok(_) => {}
            Err(e) if vanished(&e) => log::debug!("backing scan: {} vanished: {e}", dir.display()),
            Err(e) => return Err(fatal(&dir, e)),
        }
    }
    Ok(names)
}

/// Nova's external lock on one cache file, `<instances_dir>/locks/nova-<name>`; released on drop
/// (`F_ULOCK`, then close). The lock file stays.
///
/// POSIX record locks belong to the process, not to the descriptor: a second `lockf` on the same
/// file from this process would succeed although the first is held, and closing ANY descriptor of
/// that file in this process silently releases the lock. So a process-wide registry of held lock
/// files makes [`try_nova_lock`] answer `Busy` for a file this process already holds, and nothing
/// else in the daemon may open files under `locks/`.
#[derive(Debug)]
pub struct NovaLock {
    file: Option<File>,
    /// The lock file, under the canonical path of `locks` (the registry key).
    path: PathBuf,
}

impl NovaLock {
    /// The lock file held.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for NovaLock {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            // SAFETY: `file` is an open descriptor owned here.
            unsafe { libc::lockf(file.as_raw_fd(), libc::F_ULOCK, 0) };
            // Closed before the registry slot is freed: a close after another thread has locked
            // the same file again would release that thread's lock too.
            drop(file);
        }
        held().remove(&self.path);
    }
}

/// The outcome of [`try_nova_lock`].
#[derive(Debug)]
pub enum LockResult {
    /// The lock is ours until the [`NovaLock`] is dropped.
    Taken(NovaLock),
    /// Another process (Nova creating, copying from or removing the file) holds it.
    Busy,
    /// This process holds it already (another eviction of the same file is under way).
    HeldHere,
}

/// Nova's external lock for a cache file: `<instances_dir>/locks/nova-<name>`, taken with
/// POSIX lockf(F_TLOCK) (non-blocking), exactly as Nova's lock helper does; held until drop
/// (F_ULOCK + close). The lock file is created if missing (mode 0644) but NEVER deleted.
///
/// The file is opened as fasteners opens it (`O_WRONLY|O_APPEND`, plus `O_NOFOLLOW|O_NONBLOCK`
/// so a planted symlink or FIFO fails instead of misleading or hanging the daemon). A missing
/// `locks` directory is created (0755, owned like `instances_dir`) and a missing lock file is
/// created owned like `locks`, so Nova's user can still open both. If the name is unlinked or
/// replaced while it is being locked, the lock would not exclude Nova, so it is retried.
/// `InvalidInput` for an empty name or one containing `/` or NUL.
pub fn try_nova_lock(instances_dir: &Path, name: &OsStr) -> io::Result<LockResult> {
    if name.is_empty() || name.as_bytes().iter().any(|&b| b == b'/' || b == 0) {
        let message = format!("not a cache file name: {name:?}");
        return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
    }
    let locks = LocksDir::ensure(instances_dir)?;
    let mut file_name = OsString::from("nova-");
    file_name.push(name);
    let path = locks.path.join(file_name);
    if !held().insert(path.clone()) {
        return Ok(LockResult::HeldHere);
    }
    match lock_file(&path, &locks) {
        Ok(Some(file)) => Ok(LockResult::Taken(NovaLock { file: Some(file), path })),
        other => {
            held().remove(&path);
            other.map(|_| LockResult::Busy)
        }
    }
}

/// The cache directory as backing names are compared with it.
struct CacheDir<'a> {
    path: &'a Path,
    name: Option<&'a OsStr>,
    /// `realpath` of the cache directory's parent, computed on first need.
    canonical_parent: Option<Option<PathBuf>>,
}

impl CacheDir<'_> {
    fn may_be_instance(&self, entry: &OsStr) -> bool {
        let bytes = entry.as_bytes();
        !(bytes.starts_with(b"_base") || NOT_INSTANCES.contains(&bytes) || Some(entry) == self.name)
    }

    /// The cache file a backing name found in a disk of `instance_dir` refers to, if any.
    fn file_named(&mut self, instance_dir: &Path, backing: &OsStr) -> Option<OsString> {
        let backing = backing.as_bytes();
        let backing = OsStr::from_bytes(backing.strip_prefix(b"file:").unwrap_or(backing));
        // `join` keeps an absolute name as it is; QEMU resolves a relative one against the
        // directory of the image that names it.
        let resolved = instance_dir.join(backing);
        let parent = resolved.parent()?;
        if parent.file_name()? != self.name? {
            return None;
        }
        let file = resolved.file_name()?;
        (parent == self.path || self.same_dir_as_parent(parent)).then(|| file.to_owned())
    }

    /// Whether `dir`'s parent and the cache directory's parent are the same directory.
    fn same_dir_as_parent(&mut self, dir: &Path) -> bool {
        let Some(grandparent) = parent_dir(dir) else { return false };
        if grandparent.starts_with(self.path) {
            return false; // resolving it would go through the mount
        }
        let path = self.path;
        let ours =
            self.canonical_parent.get_or_insert_with(|| parent_dir(path).and_then(canonical));
        ours.as_ref().is_some_and(|ours| canonical(grandparent).is_some_and(|g| g == *ours))
    }
}

fn scan_instance(
    dir: &Path,
    cache: &mut CacheDir<'_>,
    names: &mut BTreeSet<OsString>,
) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if vanished(&e) => {
            log::debug!("backing scan: {} vanished: {e}", dir.display());
            return Ok(());
        }
        Err(e) => return Err(fatal(dir, e)),
    };
    let recorded = disk_formats(dir);
    for entry in entries {
        let entry = entry.map_err(|e| fatal(dir, e))?;
        let file_name = entry.file_name();
        if !file_name.as_bytes().starts_with(b"disk") || file_name == DISK_INFO {
            continue;
        }
        let path = entry.path();
        if recorded.get(&file_name) == Some(&Format::Other) {
            log::trace!("backing scan: {} is not qcow2 (disk.info)", path.display());
            continue;
        }
        match disk_backing_file(&path) {
            Ok(Some(backing)) => names.extend(cache.file_named(dir, &backing)),
            Ok(None) => {}
            Err(e) if vanished(&e) => log::debug!("backing scan: skipping {}: {e}", path.display()),
            Err(e) if unparsable(&e) => report_once(
                &path,
                &e.to_string(),
                "ignoring its header (a disk being written, or bytes its guest wrote)",
            ),
            Err(e) => return Err(fatal(&path, e)),
        }
    }
    Ok(())
}

/// A disk's format as `disk.info` records it: the only distinction the scan needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Qcow2,
    Other,
}

/// The formats `<dir>/disk.info` records, by the disks' file names; empty when it is missing,
/// unreadable or malformed (the last two logged once), so that every disk is read.
fn disk_formats(dir: &Path) -> HashMap<OsString, Format> {
    let path = dir.join(DISK_INFO);
    match read_disk_info(&path) {
        Ok(formats) => formats,
        Err(e) if e.kind() == io::ErrorKind::NotFound => HashMap::new(),
        Err(e) => {
            report_once(&path, &e.to_string(), "reading every disk of this instance");
            HashMap::new()
        }
    }
}

fn read_disk_info(path: &Path) -> io::Result<HashMap<OsString, Format>> {
    let flags = libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW;
    let file = fs::OpenOptions::new().read(true).custom_flags(flags).open(path)?;
    if !file.metadata()?.is_file() {
        return Err(invalid_data("not a regular file".into()));
    }
    let mut text = Vec::new();
    file.take(DISK_INFO_MAX + 1).read_to_end(&mut text)?;
    if text.len() as u64 > DISK_INFO_MAX {
        return Err(invalid_data(format!("longer than {DISK_INFO_MAX} bytes")));
    }
    parse_disk_info(&text)
}

/// Nova's `disk.info`: one JSON object mapping each disk's path to its format; an empty file is
/// an empty map, as for Nova. An entry whose format is not a string counts as not listed.
fn parse_disk_info(text: &[u8]) -> io::Result<HashMap<OsString, Format>> {
    if text.iter().all(u8::is_ascii_whitespace) {
        return Ok(HashMap::new());
    }
    let map: HashMap<String, serde_json::Value> = serde_json::from_slice(text)
        .map_err(|e| invalid_data(format!("not a JSON object of disk formats: {e}")))?;
    let mut formats = HashMap::new();
    for (disk, format) in map {
        let Some(format) = format.as_str() else { continue };
        let Some(name) = Path::new(&disk).file_name() else { continue };
        let format = if format == "qcow2" { Format::Qcow2 } else { Format::Other };
        let slot = formats.entry(name.to_owned()).or_insert(format);
        if format == Format::Qcow2 {
            *slot = Format::Qcow2;
        }
    }
    Ok(formats)
}

/// The backing name in the header of one instance file; `None` unless it is a regular file.
fn disk_backing_file(path: &Path) -> io::Result<Option<OsString>> {
    if !fs::metadata(path)?.is_file() {
        return Ok(None);
    }
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Ok(None); // replaced between the two looks
    }
    qcow2_backing_file(&mut file)
}

/// The `locks` directory under its canonical path, with the owner new lock files get.
struct LocksDir {
    path: PathBuf,
    uid: u32,
    gid: u32,
}

impl LocksDir {
    fn ensure(instances_dir: &Path) -> io::Result<LocksDir> {
        let locks = instances_dir.join("locks");
        match fs::DirBuilder::new().mode(0o755).create(&locks) {
            Ok(()) => {
                let owner = fs::metadata(instances_dir)?;
                let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
                let dir = fs::OpenOptions::new().read(true).custom_flags(flags).open(&locks)?;
                give_away(dir.as_fd(), &locks, owner.uid(), owner.gid(), 0o755)?;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let path = fs::canonicalize(&locks)?;
        let meta = fs::metadata(&path)?;
        if !meta.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        Ok(LocksDir { path, uid: meta.uid(), gid: meta.gid() })
    }
}

/// Opens and locks `path`; `None` when another process holds the lock.
fn lock_file(path: &Path, locks: &LocksDir) -> io::Result<Option<File>> {
    for _ in 0..LOCK_ATTEMPTS {
        let Some(file) = open_lock_file(path, locks)? else { continue };
        // SAFETY: `file` is an open descriptor.
        if unsafe { libc::lockf(file.as_raw_fd(), libc::F_TLOCK, 0) } != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EACCES | libc::EAGAIN) => Ok(None),
                _ => Err(e),
            };
        }
        let locked = file.metadata()?;
        match fs::symlink_metadata(path) {
            Ok(now) if (now.dev(), now.ino()) == (locked.dev(), locked.ino()) => {
                return Ok(Some(file))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        log::debug!("lock file {} was replaced while being locked; retrying", path.display());
    }
    Ok(None)
}

/// Opens the lock file as fasteners does, creating it for Nova's user if missing; `None` when
/// it disappeared between the create and the open attempts.
fn open_lock_file(path: &Path, locks: &LocksDir) -> io::Result<Option<File>> {
    let mut options = fs::OpenOptions::new();
    options.append(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY);
    let file = match options.clone().create_new(true).mode(0o644).open(path) {
        Ok(file) => {
            give_away(file.as_fd(), path, locks.uid, locks.gid, 0o644)?;
            file
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match options.open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        },
        Err(e) => return Err(e),
    };
    if !file.metadata()?.is_file() {
        let message = format!("{} is not a regular file", path.display());
        return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
    }
    Ok(Some(file))
}

/// Sets the mode of a file this daemon created, and as root hands it to the owner Nova runs as.
fn give_away(fd: BorrowedFd<'_>, path: &Path, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscalls on an open descriptor.
    if unsafe { libc::geteuid() } == 0 && unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) } != 0 {
        let e = io::Error::last_os_error();
        log::warn!(
            "cannot give {} to uid {uid} gid {gid}, Nova may fail to open it: {e}",
            path.display()
        );
    }
    // SAFETY: as above.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lock files this process holds (see [`NovaLock`]).
static HELD: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

fn held() -> MutexGuard<'static, BTreeSet<PathBuf>> {
    HELD.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The file or directory is gone (an instance being deleted, a disk replaced).
fn vanished(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

/// The header is not one QEMU would open: a disk being written, or bytes its guest wrote.
fn unparsable(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof)
}

/// (path, reason) pairs already logged by [`report_once`].
static REPORTED: Mutex<BTreeSet<(PathBuf, String)>> = Mutex::new(BTreeSet::new());

/// Logs a problem the scan works around, once per path and reason (at most [`REPORTED_MAX`]
/// pairs per process; then at debug): scans repeat, and a guest may rewrite what it owns.
fn report_once(path: &Path, reason: &str, action: &str) {
    let mut reported = REPORTED.lock().unwrap_or_else(PoisonError::into_inner);
    let key = (path.to_path_buf(), reason.to_owned());
    if reported.contains(&key) {
        return;
    }
    if reported.len() >= REPORTED_MAX {
        drop(reported);
        log::debug!("backing scan: {}: {reason}; {action}", path.display());
        return;
    }
    reported.insert(key);
    drop(reported);
    log::info!("backing scan: {}: {reason}; {action}", path.display());
}

/// An error that may hide a reference: reported with its path, returned with its errno.
fn fatal(path: &Path, e: io::Error) -> io::Error {
    log::warn!("backing scan: cannot read {}: {e}", path.display());
    e
}

/// The parent directory of `path`; `.` for a bare relative name.
fn parent_dir(path: &Path) -> Option<&Path> {
    path.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p })
}

fn canonical(path: &Path) -> Option<PathBuf> {
    fs::canonicalize(path)
        .inspect_err(|e| log::debug!("backing scan: cannot resolve {}: {e}", path.display()))
        .ok()
}

fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Cursor};
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::process::{Child, Command, Stdio};
    use std::sync::mpsc;
    use std::time::Duration;

    const HASH_A: &str = "0d5e6b61602d758984b3bf038267614d6016eb2a";
    const HASH_B: &str = "1111111111111111111111111111111111111111";
    const HASH_REL: &str = "2222222222222222222222222222222222222222";
    const HASH_OTHER: &str = "3333333333333333333333333333333333333333";
    const EPHEMERAL: &str = "ephemeral_1_0706d66";

    fn qemu_img(args: &[&OsStr]) {
        let out = Command::new("qemu-img").args(args).output().unwrap_or_else(|e| {
            panic!("qemu-img is required by these tests (Debian: apt-get install qemu-utils): {e}")
        });
        assert!(
            out.status.success(),
            "qemu-img {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A real qcow2 overlay of `disk` on `backing` (an absolute or relative name).
    fn overlay(disk: &Path, backing: &str) {
        let args = ["create", "-q", "-f", "qcow2", "-F", "raw", "-b", backing];
        let mut args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        args.extend([disk.as_os_str(), OsStr::new("1M")]);
        qemu_img(&args);
    }

    fn plain_qcow2(disk: &Path) {
        let args = ["create", "-q", "-f", "qcow2"].map(OsStr::new);
        qemu_img(&[&args[..], &[disk.as_os_str(), OsStr::new("1M")]].concat());
    }

    fn raw_file(path: &Path) {
        fs::write(path, vec![0u8; 64 * 1024]).unwrap();
    }

    fn backing_of(path: &Path) -> io::Result<Option<OsString>> {
        qcow2_backing_file(&mut File::open(path).unwrap())
    }

    fn names(list: &[&str]) -> BTreeSet<OsString> {
        list.iter().map(OsString::from).collect()
    }

    /// A hand-made qcow2 header of `version` naming `name` at offset 0x200.
    fn crafted(version: u32, name_size: u32, name: &[u8]) -> Cursor<Vec<u8>> {
        let mut image = vec![0u8; 0x200];
        image[..4].copy_from_slice(QCOW_MAGIC);
        image[4..8].copy_from_slice(&version.to_be_bytes());
        image[8..16].copy_from_slice(&0x200u64.to_be_bytes());
        image[16..20].copy_from_slice(&name_size.to_be_bytes());
        image.extend_from_slice(name);
        Cursor::new(image)
    }

    #[test]
    fn qcow2_v3_overlay_names_its_absolute_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join(HASH_A);
        raw_file(&base);
        let disk = dir.path().join("disk");
        overlay(&disk, base.to_str().unwrap());
        assert_eq!(backing_of(&disk).unwrap(), Some(base.into_os_string()));
    }

    #[test]
    fn qcow2_v2_overlay_names_its_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join(HASH_A);
        raw_file(&base);
        let disk = dir.path().join("disk");
        let args = ["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-F", "raw", "-b"];
        let mut args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        args.extend([base.as_os_str(), disk.as_os_str(), OsStr::new("1M")]);
        qemu_img(&args);
        let header = fs::read(&disk).unwrap();
        assert_eq!(be_u32(&header[4..8]), 2, "qemu-img did not write a version 2 header");
        assert_eq!(backing_of(&disk).unwrap(), Some(base.into_os_string()));
    }

    #[test]
    fn reads_from_the_start_whatever_the_position() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join(HASH_A);
        raw_file(&base);
        let disk = dir.path().join("disk");
        overlay(&disk, base.to_str().unwrap());
        let mut file = File::open(&disk).unwrap();
        file.seek(SeekFrom::End(0)).unwrap();
        assert_eq!(qcow2_backing_file(&mut file).unwrap(), Some(base.into_os_string()));
    }

    #[test]
    fn no_backing_file_raw_and_short_files_are_none() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.qcow2");
        plain_qcow2(&plain);
        assert_eq!(backing_of(&plain).unwrap(), None, "qcow2 without backing file");

        let raw = dir.path().join("raw");
        raw_file(&raw);
        assert_eq!(backing_of(&raw).unwrap(), None, "raw file");

        let empty = dir.path().join("empty");
        fs::write(&empty, b"").unwrap();
        assert_eq!(backing_of(&empty).unwrap(), None, "empty file");

        let text = dir.path().join("disk.info");
        fs::write(&text, br#"{"/var/lib/nova/instances/x/disk": "qcow2"}"#).unwrap();
        assert_eq!(backing_of(&text).unwrap(), None, "JSON disk.info");

        let base = dir.path().join(HASH_A);
        raw_file(&base);
        let short = dir.path().join("short");
        overlay(&short, base.to_str().unwrap());
        File::options().write(true).open(&short).unwrap().set_len(50).unwrap();
        assert_eq!(backing_of(&short).unwrap(), None, "qcow2 cut inside its header");
    }

    #[test]
    fn backing_name_past_the_end_is_invalid_data() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join(HASH_A);
        raw_file(&base);
        let disk = dir.path().join("disk");
        overlay(&disk, base.to_str().unwrap());
        // The header is whole, the name (at 0x210 as qemu-img writes it) is not there yet.
        File::options().write(true).open(&disk).unwrap().set_len(200).unwrap();
        let e = backing_of(&disk).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(unparsable(&e));
    }

    #[test]
    fn crafted_headers() {
        let name = b"/var/lib/nova/instances/_base/x\0garbage";
        let got = qcow2_backing_file(&mut crafted(3, name.len() as u32, name)).unwrap();
        assert_eq!(got, Some(OsString::from("/var/lib/nova/instances/_base/x")), "ends at NUL");
        let got = qcow2_backing_file(&mut crafted(1, 3, b"abc")).unwrap();
        assert_eq!(got, Some(OsString::from("abc")), "qcow version 1");
        assert_eq!(qcow2_backing_file(&mut crafted(2, 0, b"abc")).unwrap(), None, "size 0");
        let e = qcow2_backing_file(&mut crafted(4, 3, b"abc")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "version 4: {e}");
        let long = vec![b'a'; 1024];
        let e = qcow2_backing_file(&mut crafted(3, 1024, &long)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "1024-byte name: {e}");
        let mut short_v3 = crafted(3, 3, b"abc");
        short_v3.get_mut().truncate(100);
        assert_eq!(qcow2_backing_file(&mut short_v3).unwrap(), None, "v3 cut at 100 bytes");
    }

    /// `<tmp>/instances` with `_base`, `locks`, `snapshots`, instance directories and strays.
    struct Tree {
        _tmp: tempfile::TempDir,
        instances: PathBuf,
        base: PathBuf,
    }

    fn tree() -> Tree {
        let tmp = tempfile::tempdir().unwrap();
        let instances = tmp.path().join("instances");
        let base = instances.join("_base");
        fs::create_dir_all(&base).unwrap();
        for name in [HASH_A, HASH_B, HASH_REL, HASH_OTHER, EPHEMERAL, "ephemeral_2_40d1d2c"] {
            raw_file(&base.join(name));
        }
        let abs = |name: &str| base.join(name).into_os_string().into_string().unwrap();

        let one = instances.join("7d9a4a3e-0000-4000-8000-000000000001");
        fs::create_dir(&one).unwrap();
        overlay(&one.join("disk"), &abs(HASH_A));
        overlay(&one.join("disk.local"), &abs(EPHEMERAL));
        fs::write(one.join("disk.info"), b"{}").unwrap();
        fs::write(one.join("console.log"), b"boot\n").unwrap();
        // Not a disk by name: its backing file must not count.
        overlay(&one.join("kernel"), &abs(HASH_OTHER));

        let two = instances.join("7d9a4a3e-0000-4000-8000-000000000002_resize");
        fs::create_dir(&two).unwrap();
        overlay(&two.join("disk.eph0"), &abs("ephemeral_2_40d1d2c"));
        overlay(&two.join("disk.rel"), &format!("../_base/{HASH_REL}"));
        raw_file(&two.join("disk.config"));
        plain_qcow2(&two.join("disk.swap"));
        let cut = two.join("disk.partial");
        overlay(&cut, &abs(HASH_OTHER));
        File::options().write(true).open(&cut).unwrap().set_len(200).unwrap();
        fs::create_dir(two.join("disk.dir")).unwrap();

        // Same final component `_base`, another directory: not ours.
        let elsewhere = tmp.path().join("elsewhere").join("_base");
        fs::create_dir_all(&elsewhere).unwrap();
        raw_file(&elsewhere.join(HASH_OTHER));
        let three = instances.join("7d9a4a3e-0000-4000-8000-000000000003");
        fs::create_dir(&three).unwrap();
        overlay(&three.join("disk"), elsewhere.join(HASH_OTHER).to_str().unwrap());
        // A backing file next to the disk (relative, not in `_base`).
        raw_file(&three.join(HASH_OTHER));
        overlay(&three.join("disk.local"), HASH_OTHER);

        // Directories that are never instances, even with disks in them.
        for skipped in ["locks", "snapshots", "_base_10.0.0.1"] {
            fs::create_dir(instances.join(skipped)).unwrap();
            overlay(&instances.join(skipped).join("disk"), &abs(HASH_OTHER));
        }
        overlay(&base.join("disk"), &abs(HASH_OTHER));
        fs::write(instances.join("compute_nodes"), b"{\"host\": 1}").unwrap();
        overlay(&instances.join("disk"), &abs(HASH_OTHER));
        Tree { _tmp: tmp, instances, base }
    }

    #[test]
    fn backing_names_are_exactly_the_cache_files_instance_disks_name() {
        let t = tree();
        let got = backing_names(&t.instances, &t.base).unwrap();
        let want = [HASH_A, EPHEMERAL, "ephemeral_2_40d1d2c", HASH_REL];
        assert_eq!(got, names(&want));
        // Trailing slash and `.` components spell the same directory.
        let spelled = PathBuf::from(format!("{}/./_base/", t.instances.display()));
        assert_eq!(backing_names(&t.instances, &spelled).unwrap(), names(&want));
    }

    #[test]
    fn backing_names_match_through_a_symlinked_instances_path() {
        let t = tree();
        let link = t.instances.parent().unwrap().join("link");
        symlink(&t.instances, &link).unwrap();
        let uuid = t.instances.join("7d9a4a3e-0000-4000-8000-000000000004");
        fs::create_dir(&uuid).unwrap();
        overlay(&uuid.join("disk"), link.join("_base").join(HASH_B).to_str().unwrap());
        let want = [HASH_A, HASH_B, EPHEMERAL, "ephemeral_2_40d1d2c", HASH_REL];
        assert_eq!(backing_names(&t.instances, &t.base).unwrap(), names(&want));
        assert_eq!(backing_names(&link, &link.join("_base")).unwrap(), names(&want));
    }

    #[test]
    fn backing_names_never_scan_the_cache_dir_itself() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        fs::create_dir(&cache).unwrap();
        raw_file(&cache.join(HASH_A));
        raw_file(&cache.join(HASH_B));
        overlay(&cache.join("disk"), cache.join(HASH_A).to_str().unwrap());
        let uuid = tmp.path().join("7d9a4a3e-0000-4000-8000-000000000001");
        fs::create_dir(&uuid).unwrap();
        overlay(&uuid.join("disk"), cache.join(HASH_B).to_str().unwrap());
        assert_eq!(backing_names(tmp.path(), &cache).unwrap(), names(&[HASH_B]));
    }

    #[test]
    fn unreadable_instances_dir_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing");
        let e = backing_names(&missing, &missing.join("_base")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        let file = tmp.path().join("file");
        fs::write(&file, b"").unwrap();
        let e = backing_names(&file, &file.join("_base")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));
    }

    #[test]
    fn only_vanished_and_unparsable_disks_are_skipped() {
        for errno in [libc::ENOENT, libc::ENOTDIR] {
            assert!(vanished(&io::Error::from_raw_os_error(errno)));
        }
        assert!(unparsable(&invalid_data("x".into())));
        assert!(unparsable(&io::Error::from(io::ErrorKind::UnexpectedEof)));
        for errno in [libc::EACCES, libc::EIO, libc::ESTALE, libc::EPERM] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(!vanished(&e) && !unparsable(&e), "errno {errno} must not be skipped");
        }
    }

    #[test]
    fn a_disk_the_daemon_cannot_read_fails_the_scan() {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test needs root (to drop to another fsuid)"
        );
        let t = tree();
        for dir in [t.instances.parent().unwrap(), &t.instances] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let uuid = t.instances.join("7d9a4a3e-0000-4000-8000-000000000005");
        fs::create_dir(&uuid).unwrap();
        overlay(&uuid.join("disk"), t.base.join(HASH_B).to_str().unwrap());
        fs::set_permissions(uuid.join("disk"), fs::Permissions::from_mode(0o600)).unwrap();
        // fsuid is per thread: this thread alone reads as `nobody` (root's file capabilities
        // are dropped with it), as a daemon under NFS root_squash would.
        let (instances, base) = (t.instances.clone(), t.base.clone());
        let result = std::thread::spawn(move || {
            // SAFETY: plain syscalls changing this thread's filesystem ids only.
            unsafe { libc::setfsgid(65534) };
            unsafe { libc::setfsuid(65534) };
            backing_names(&instances, &base)
        })
        .join()
        .unwrap();
        assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EACCES));
        // Readable again, the same tree scans and counts that disk.
        let want = [HASH_A, HASH_B, EPHEMERAL, "ephemeral_2_40d1d2c", HASH_REL];
        assert_eq!(backing_names(&t.instances, &t.base).unwrap(), names(&want));
    }

    /// A raw disk whose first bytes a guest wrote: a qcow2 version 3 header naming `name` at
    /// `offset` (written there when it fits in the 64 KiB disk), then zeros.
    fn forged_raw_disk(path: &Path, offset: u64, name: &[u8]) {
        let mut disk = vec![0u8; 64 * 1024];
        disk[..4].copy_from_slice(QCOW_MAGIC);
        disk[4..8].copy_from_slice(&3u32.to_be_bytes());
        disk[8..16].copy_from_slice(&offset.to_be_bytes());
        disk[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        disk[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster_bits
        if let Some(end) = (offset as usize).checked_add(name.len()) {
            if end <= disk.len() {
                disk[offset as usize..end].copy_from_slice(name);
            }
        }
        fs::write(path, disk).unwrap();
    }

    /// Nova's `disk.info` in `dir`: the absolute path of each disk and its format, one line.
    fn disk_info(dir: &Path, disks: &[(&str, &str)]) {
        let entries: serde_json::Map<String, serde_json::Value> = disks
            .iter()
            .map(|(disk, format)| (dir.join(disk).display().to_string(), (*format).into()))
            .collect();
        let line = serde_json::Value::Object(entries).to_string();
        fs::write(dir.join(DISK_INFO), format!("{line}\n")).unwrap();
    }

    /// `<tmp>/instances/_base` holding HASH_A, HASH_B and HASH_REL.
    fn small_tree() -> Tree {
        let tmp = tempfile::tempdir().unwrap();
        let instances = tmp.path().join("instances");
        let base = instances.join("_base");
        fs::create_dir_all(&base).unwrap();
        for name in [HASH_A, HASH_B, HASH_REL] {
            raw_file(&base.join(name));
        }
        Tree { _tmp: tmp, instances, base }
    }

    fn instance(t: &Tree, n: u32) -> PathBuf {
        let dir = t.instances.join(format!("7d9a4a3e-0000-4000-8000-{n:012}"));
        fs::create_dir(&dir).unwrap();
        dir
    }

    fn abs(t: &Tree, name: &str) -> Vec<u8> {
        t.base.join(name).into_os_string().into_vec()
    }

    #[test]
    fn a_forged_header_in_a_disk_nova_calls_raw_names_nothing() {
        let t = small_tree();
        // use_cow_images = False: the guest wrote a qcow2 header naming a base into its disk.
        let raw = instance(&t, 1);
        forged_raw_disk(&raw.join("disk"), 0x200, &abs(&t, HASH_A));
        forged_raw_disk(&raw.join("disk.config"), 0x200, &abs(&t, HASH_REL));
        disk_info(&raw, &[("disk", "raw"), ("disk.config", "raw")]);
        // A real overlay that disk.info calls qcow2 keeps its base.
        let cow = instance(&t, 2);
        overlay(&cow.join("disk"), t.base.join(HASH_B).to_str().unwrap());
        disk_info(&cow, &[("disk", "qcow2")]);
        assert_eq!(backing_names(&t.instances, &t.base).unwrap(), names(&[HASH_B]));

        // Without Nova's record the header is all there is: its name counts.
        fs::remove_file(raw.join(DISK_INFO)).unwrap();
        let want = [HASH_A, HASH_B, HASH_REL];
        assert_eq!(backing_names(&t.instances, &t.base).unwrap(), names(&want));
    }

    #[test]
    fn a_header_with_a_bad_offset_does_not_stop_the_scan() {
        for offset in [u64::MAX, i64::MAX as u64 + 1, BACKING_OFFSET_MAX + 1] {
            let mut disk = crafted(3, 3, b"abc");
            disk.get_mut()[8..16].copy_from_slice(&offset.to_be_bytes());
            let e = qcow2_backing_file(&mut disk).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "offset {offset}: {e}");
        }
        let t = small_tree();
        // No disk.info: every disk is read, and the unreadable headers name nothing.
        let forged = instance(&t, 1);
        forged_raw_disk(&forged.join("disk"), u64::MAX, &abs(&t, HASH_A));
        forged_raw_disk(&forged.join("disk.local"), i64::MAX as u64 + 1, &abs(&t, HASH_A));
        forged_raw_disk(&forged.join("disk.eph0"), 64 * 1024 - 8, &abs(&t, HASH_A));
        fs::write(forged.join("disk.swap"), crafted(4, 3, b"abc").into_inner()).unwrap();
        let real = instance(&t, 2);
        overlay(&real.join("disk"), t.base.join(HASH_B).to_str().unwrap());
        assert_eq!(backing_names(&t.instances, &t.base).unwrap(), names(&[HASH_B]));
    }

    #[test]
    fn disk_info_entries_match_disks_by_file_name() {
        let t = small_tree();
        // A resize keeps the instance's disks, and their disk.info, in `<uuid>_resize`.
        let uuid = "7d9a4a3e-0000-4000-8000-000000000009";
        let resize = t.instances.join(format!("{uuid}_resize"));
        fs::create_dir(&resize).unwrap();
        overlay(&resize.join("disk"), t.base.join(HASH_B).to_str().unwrap());
        forged_raw_disk(&resize.join("disk.config"), 0x200, &abs(&t, HASH_A));
        let old = t.instances.join(uuid);
        let line = format!(
            "{{\"{}\": \"qcow2\", \"{}\": \"raw\"}}",
            old.join("disk").display(),
            old.join("disk.config").display()
        );
        fs::write(resize.join(DISK_INFO), line).unwrap();
        assert_eq!(backing_names(&t.instances, &t.base).unwrap(), names(&[HASH_B]));
        // A disk disk.info does not list is read.
        forged_raw_disk(&resize.join("disk.rescue"), 0x200, &abs(&t, HASH_REL));
        assert_eq!(backing_names(&t.instances, &t.base).unwrap(), names(&[HASH_B, HASH_REL]));
    }

    #[test]
    fn disk_info_parsing() {
        let parsed = |text: &str| parse_disk_info(text.as_bytes());
        let formats = parsed(
            "{\"/i/u/disk\": \"qcow2\", \"/i/u/disk.config\": \"raw\", \"/i/u/disk.p\": \"ploop\"}\n",
        )
        .unwrap();
        let want: HashMap<OsString, Format> =
            [("disk", Format::Qcow2), ("disk.config", Format::Other), ("disk.p", Format::Other)]
                .into_iter()
                .map(|(n, f)| (OsString::from(n), f))
                .collect();
        assert_eq!(formats, want);
        // Nova reads an empty file as no entries.
        assert_eq!(parsed("").unwrap(), HashMap::new());
        assert_eq!(parsed("\n").unwrap(), HashMap::new());
        // A format that is not a string leaves its disk unlisted.
        assert_eq!(
            parsed("{\"/i/u/disk\": null, \"/i/u/disk.local\": 2}").unwrap(),
            HashMap::new()
        );
        // Listed twice (two spellings of the instance directory): qcow2 wins, so it is read.
        let twice = parsed("{\"/a/u/disk\": \"raw\", \"/b/u/disk\": \"qcow2\"}").unwrap();
        assert_eq!(twice.get(OsStr::new("disk")), Some(&Format::Qcow2));
        for bad in
            ["{not json", "[\"/i/u/disk\", \"raw\"]", "\"raw\"", "{\"/i/u/disk\": \"raw\"} x"]
        {
            let e = parsed(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{bad:?}: {e}");
        }
    }

    #[test]
    fn malformed_disk_info_is_treated_as_absent() {
        let t = small_tree();
        let inst = instance(&t, 1);
        forged_raw_disk(&inst.join("disk"), 0x200, &abs(&t, HASH_A));
        overlay(&inst.join("disk.local"), t.base.join(HASH_B).to_str().unwrap());
        for bad in [&b"{\"disk\": \"raw\""[..], b"[]", &vec![b' '; DISK_INFO_MAX as usize + 1]] {
            fs::write(inst.join(DISK_INFO), bad).unwrap();
            let got = backing_names(&t.instances, &t.base).unwrap();
            assert_eq!(got, names(&[HASH_A, HASH_B]), "disk.info {:?}", &bad[..bad.len().min(20)]);
        }
        // A directory, or a symlink, where disk.info should be: not Nova's record either.
        fs::remove_file(inst.join(DISK_INFO)).unwrap();
        let elsewhere = t.instances.join("elsewhere.info");
        fs::write(&elsewhere, format!("{{\"{}\": \"raw\"}}", inst.join("disk").display())).unwrap();
        symlink(&elsewhere, inst.join(DISK_INFO)).unwrap();
        assert_eq!(backing_names(&t.instances, &t.base).unwrap(), names(&[HASH_A, HASH_B]));
        fs::remove_file(inst.join(DISK_INFO)).unwrap();
        fs::create_dir(inst.join(DISK_INFO)).unwrap();
        assert_eq!(backing_names(&t.instances, &t.base).unwrap(), names(&[HASH_A, HASH_B]));
    }

    #[test]
    fn an_unreadable_qcow2_disk_fails_the_scan_an_unreadable_raw_one_is_never_opened() {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test needs root (to drop to another fsuid)"
        );
        let t = small_tree();
        for dir in [t.instances.parent().unwrap(), &t.instances] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let raw = instance(&t, 1);
        forged_raw_disk(&raw.join("disk"), 0x200, &abs(&t, HASH_A));
        disk_info(&raw, &[("disk", "raw")]);
        let cow = instance(&t, 2);
        overlay(&cow.join("disk"), t.base.join(HASH_B).to_str().unwrap());
        disk_info(&cow, &[("disk", "qcow2")]);
        for disk in [raw.join("disk"), cow.join("disk")] {
            fs::set_permissions(disk, fs::Permissions::from_mode(0o600)).unwrap();
        }
        let scan_as_nobody = || {
            let (instances, base) = (t.instances.clone(), t.base.clone());
            std::thread::spawn(move || {
                // SAFETY: plain syscalls changing this thread's filesystem ids only.
                unsafe { libc::setfsgid(65534) };
                unsafe { libc::setfsuid(65534) };
                backing_names(&instances, &base)
            })
            .join()
            .unwrap()
        };
        let e = scan_as_nobody().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        // Once the qcow2 disk is readable the scan succeeds: the raw one was never opened.
        fs::set_permissions(cow.join("disk"), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(scan_as_nobody().unwrap(), names(&[HASH_B]));
    }

    const HOLD: &str = "import fcntl,sys,time\nf=open(sys.argv[1],'a')\nfcntl.lockf(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(30)";
    const PROBE: &str = "import errno,fcntl,sys\nf=open(sys.argv[1],'a')\ntry:\n    fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB)\nexcept OSError as e:\n    sys.exit(3 if e.errno in (errno.EACCES, errno.EAGAIN) else 4)";

    fn python3() -> Command {
        Command::new("python3")
    }

    fn spawn_python(command: &mut Command) -> Child {
        command.spawn().unwrap_or_else(|e| panic!("python3 is required by these tests: {e}"))
    }

    /// Another process holding `path` with fasteners' lock (`fcntl.lockf`), killed on drop.
    struct Holder(Child);

    impl Holder {
        fn lock(path: &Path) -> Holder {
            let mut command = python3();
            command.args(["-c", HOLD]).arg(path).stdout(Stdio::piped());
            let mut holder = Holder(spawn_python(&mut command));
            let stdout = holder.0.stdout.take().unwrap();
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
            let line = rx.recv_timeout(Duration::from_secs(20)).expect("holder never locked");
            assert_eq!(line.trim(), "locked", "holder failed to lock {}", path.display());
            holder
        }
    }

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Whether another process can take Nova's lock on `path` right now.
    fn nova_can_lock(path: &Path) -> bool {
        let mut command = python3();
        command.args(["-c", PROBE]).arg(path);
        let status = spawn_python(&mut command).wait().unwrap();
        match status.code() {
            Some(0) => true,
            Some(3) => false,
            other => panic!("lock probe of {} failed: {other:?}", path.display()),
        }
    }

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn busy_while_another_process_holds_it_taken_after() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("locks")).unwrap();
        let path = tmp.path().join("locks").join(format!("nova-{HASH_A}"));
        let holder = Holder::lock(&path);
        assert!(matches!(try_nova_lock(tmp.path(), name(HASH_A)).unwrap(), LockResult::Busy));
        drop(holder);
        let lock = match try_nova_lock(tmp.path(), name(HASH_A)).unwrap() {
            LockResult::Taken(lock) => lock,
            LockResult::Busy | LockResult::HeldHere => panic!("busy after the holder was killed"),
        };
        assert_eq!(lock.path(), fs::canonicalize(&path).unwrap());
        drop(lock);
        assert!(path.is_file(), "the lock file must survive the lock");
    }

    #[test]
    fn taken_lock_excludes_nova_and_drop_releases_it_without_deleting() {
        let tmp = tempfile::tempdir().unwrap();
        let LockResult::Taken(lock) = try_nova_lock(tmp.path(), name("swap_512")).unwrap() else {
            panic!("busy with no holder")
        };
        let path = tmp.path().join("locks/nova-swap_512");
        assert!(!nova_can_lock(&path), "Nova's lockf must see our lock");
        drop(lock);
        assert!(path.is_file(), "the lock file must survive the lock");
        assert!(nova_can_lock(&path), "dropping must release the lock");
    }

    #[test]
    fn second_lock_in_this_process_is_busy() {
        let tmp = tempfile::tempdir().unwrap();
        let LockResult::Taken(first) = try_nova_lock(tmp.path(), name(HASH_A)).unwrap() else {
            panic!("busy with no holder")
        };
        // Another spelling of the same directory is the same lock file.
        let spelled = tmp.path().join(".");
        assert!(matches!(try_nova_lock(&spelled, name(HASH_A)).unwrap(), LockResult::HeldHere));
        // The refused attempt opened nothing, so the first lock still excludes Nova.
        assert!(!nova_can_lock(&tmp.path().join("locks").join(format!("nova-{HASH_A}"))));
        assert!(matches!(try_nova_lock(tmp.path(), name(HASH_B)).unwrap(), LockResult::Taken(_)));
        drop(first);
        assert!(matches!(try_nova_lock(tmp.path(), name(HASH_A)).unwrap(), LockResult::Taken(_)));
    }

    #[test]
    fn created_lock_dir_and_file_belong_to_novas_user() {
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root (to chown)");
        let tmp = tempfile::tempdir().unwrap();
        let instances = tmp.path().join("instances");
        fs::create_dir(&instances).unwrap();
        std::os::unix::fs::chown(&instances, Some(4242), Some(4343)).unwrap();
        let LockResult::Taken(lock) = try_nova_lock(&instances, name(HASH_A)).unwrap() else {
            panic!("busy with no holder")
        };
        drop(lock);
        let locks = fs::metadata(instances.join("locks")).unwrap();
        assert_eq!(
            (locks.uid(), locks.gid(), locks.permissions().mode() & 0o7777),
            (4242, 4343, 0o755)
        );
        let file = fs::metadata(instances.join("locks").join(format!("nova-{HASH_A}"))).unwrap();
        assert_eq!(
            (file.uid(), file.gid(), file.permissions().mode() & 0o7777),
            (4242, 4343, 0o644)
        );
        // An existing lock file keeps its owner and mode.
        let other = instances.join("locks/nova-swap_512");
        fs::write(&other, b"").unwrap();
        fs::set_permissions(&other, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            try_nova_lock(&instances, name("swap_512")).unwrap(),
            LockResult::Taken(_)
        ));
        let meta = fs::metadata(&other).unwrap();
        assert_eq!((meta.uid(), meta.permissions().mode() & 0o7777), (0, 0o600));
    }

    #[test]
    fn planted_symlink_and_bad_names_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("locks")).unwrap();
        let target = tmp.path().join("target");
        symlink(&target, tmp.path().join("locks/nova-evil")).unwrap();
        let e = try_nova_lock(tmp.path(), name("evil")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{e}");
        assert!(!target.exists(), "nothing may be created through a symlink");
        for bad in ["", "a/b", "../x", "a\0b"] {
            let e = try_nova_lock(tmp.path(), name(bad)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        // A refused attempt leaves no registry entry behind.
        fs::remove_file(tmp.path().join("locks/nova-evil")).unwrap();
        assert!(matches!(try_nova_lock(tmp.path(), name("evil")).unwrap(), LockResult::Taken(_)));
    }
}
