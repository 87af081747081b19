//! The overlay core: pass-through semantics over the covered directory, with no FUSE types
//! beyond plain data. `fuse.rs` unpacks requests, calls these methods and replies.
//!
//! Invariants kept here:
//! - A node id is the covered file's inode number (the root is `1`); a node holds an `O_PATH`
//!   fd on its inode while the kernel holds lookups on it, so the number cannot be recycled.
//! - Lookup counts: +1 for every entry handed to the kernel (lookup, create, mkdir, mknod,
//!   symlink, link, readdirplus), −n on forget; a node leaves the table at 0.
//! - Every regular-file open gets its own handle (`fh`), unique across daemon lifetimes.
//!   All opens of one inode use the same I/O mode: one passthrough backing id, opened by the
//!   first open under the node's lock and closed when the last handle is released; or, where
//!   the kernel refused passthrough, daemon I/O for every open until the last one closes.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use log::{error, warn};

use crate::backing::{self, DirEntry, SetTime, Stat};
use crate::error::{Error, Result};
use crate::passthrough::Passthrough;
use crate::sync::{Mutex, RwLock};

/// The node id of the mount's root, fixed by the FUSE protocol.
pub const ROOT: u64 = 1;

/// Who made a request (the header's thread id and fs credentials).
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Io {
    /// No open handle.
    #[default]
    Idle,
    /// Data goes through the kernel to the covered file registered under this backing id.
    Passthrough(u32),
    /// The kernel refused passthrough: the daemon serves reads and writes.
    Daemon,
}

#[derive(Debug, Default)]
struct NodeState {
    nlookup: u64,
    opens: u32,
    io: Io,
    warned: bool,
}

#[derive(Debug)]
pub struct Node {
    pub id: u64,
    fd: OwnedFd,
    file_type: u32,
    state: Mutex<NodeState>,
}

impl Node {
    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An open regular file.
#[derive(Debug)]
struct Handle {
    node: Arc<Node>,
    file: File,
}

/// An open directory: a listing taken at offset 0 and served from there.
#[derive(Debug)]
struct DirHandle {
    node: Arc<Node>,
    file: File,
    entries: Mutex<Vec<DirEntry>>,
}

/// The answer to an open or create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    /// The passthrough backing id to reply with; `None` means daemon I/O.
    pub backing: Option<u32>,
}

/// Attribute changes of a `setattr`; `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// The answer to `getxattr`/`listxattr`: the size asked for, or the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Xattr {
    Size(u32),
    Data(Vec<u8>),
}

pub struct OverlayFs {
    root: Arc<Node>,
    dev: u64,
    nodes: RwLock<HashMap<u64, Arc<Node>>>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    dirs: RwLock<HashMap<u64, Arc<DirHandle>>>,
    fh_prefix: u64,
    next_fh: AtomicU64,
    passthrough: OnceLock<Passthrough>,
    /// Names in the root directory that are never shown or touched (imagecachefs's own).
    reserved: Vec<OsString>,
    owner: (u32, u32),
    fallbacks: AtomicU64,
}

impl OverlayFs {
    /// Serves the directory behind `root_fd` (an `O_PATH` fd opened before mounting).
    /// `start_secs` (e.g. the start time) prefixes file handles so that they differ between
    /// daemon lifetimes.
    pub fn new(root_fd: OwnedFd, reserved: Vec<OsString>, start_secs: u64) -> Result<Self> {
        let st = backing::stat(root_fd.as_fd())?;
        let root = Arc::new(Node {
            id: ROOT,
            fd: root_fd,
            file_type: libc::S_IFDIR,
            state: Mutex::new(NodeState { nlookup: 1, ..Default::default() }),
        });
        let nodes = HashMap::from([(ROOT, root.clone())]);
        Ok(OverlayFs {
            root,
            dev: st.dev,
            nodes: RwLock::new(nodes),
            handles: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            fh_prefix: (start_secs & 0xff_ffff) << 40,
            next_fh: AtomicU64::new(1),
            passthrough: OnceLock::new(),
            reserved,
            owner: unsafe { (libc::geteuid(), libc::getegid()) },
            fallbacks: AtomicU64::new(0),
        })
    }

    /// Turns on kernel passthrough for opens from now on (called once, at FUSE init).
    pub fn enable_passthrough(&self, p: Passthrough) {
        let _ = self.passthrough.set(p);
    }

    pub fn passthrough_enabled(&self) -> bool {
        self.passthrough.get().is_some()
    }

    /// How many times an inode's opens fell back to daemon I/O.
    pub fn passthrough_fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Open handles (files and directories) right now.
    pub fn open_handles(&self) -> usize {
        self.handles.read().len() + self.dirs.read().len()
    }

    /// Nodes the kernel holds lookups on (the root included).
    pub fn known_nodes(&self) -> usize {
        self.nodes.read().len()
    }

    fn node(&self, id: u64) -> Result<Arc<Node>> {
        self.nodes.read().get(&id).cloned().ok_or(Error::UnknownNode(id))
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.handles.read().get(&fh).cloned().ok_or(Error::BadHandle(fh))
    }

    fn dir_handle(&self, fh: u64) -> Result<Arc<DirHandle>> {
        self.dirs.read().get(&fh).cloned().ok_or(Error::BadHandle(fh))
    }

    fn new_fh(&self) -> u64 {
        self.fh_prefix | self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    fn is_reserved(&self, parent: u64, name: &OsStr) -> bool {
        parent == ROOT && self.reserved.iter().any(|r| r == name)
    }

    /// A single path component that is not reserved.
    fn check_name(&self, parent: u64, name: &OsStr) -> Result<()> {
        let b = name.as_bytes();
        if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
            return Err(Error::InvalidName);
        }
        if self.is_reserved(parent, name) {
            return Err(Error::Reserved);
        }
        Ok(())
    }

    /// Hands a node to the kernel: adds it to the table or bumps its lookup count.
    fn remember(&self, fd: OwnedFd, st: Stat) -> Result<Stat> {
        if st.dev != self.dev || st.ino == ROOT {
            // Another filesystem mounted below the cache directory (or an inode number the
            // protocol reserves): node ids are inode numbers of one filesystem.
            warn!("refusing inode {} on device {:#x}: not on the cache filesystem", st.ino, st.dev);
            return Err(Error::NotSupported);
        }
        let mut nodes = self.nodes.write();
        let node = nodes.entry(st.ino).or_insert_with(|| {
            Arc::new(Node {
                id: st.ino,
                fd,
                file_type: st.file_type(),
                state: Mutex::new(NodeState::default()),
            })
        });
        node.state.lock().nlookup += 1;
        Ok(st)
    }

    fn lookup_in(&self, parent: &Node, name: &OsStr) -> Result<Stat> {
        let fd = backing::open_path_at(parent.fd(), name)?;
        let st = backing::stat(fd.as_fd())?;
        self.remember(fd, st)
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Stat> {
        self.check_name(parent, name)?;
        let p = self.node(parent)?;
        self.lookup_in(&p, name)
    }

    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT {
            return;
        }
        let mut nodes = self.nodes.write();
        let Some(node) = nodes.get(&id) else { return };
        let gone = {
            let mut st = node.state.lock();
            st.nlookup = st.nlookup.saturating_sub(n);
            st.nlookup == 0
        };
        if gone {
            nodes.remove(&id);
        }
    }

    pub fn getattr(&self, id: u64) -> Result<Stat> {
        Ok(backing::stat(self.node(id)?.fd())?)
    }

    pub fn setattr(&self, id: u64, fh: Option<u64>, set: SetAttr) -> Result<Stat> {
        let node = self.node(id)?;
        if let Some(size) = set.size {
            match fh.and_then(|fh| self.handle(fh).ok()) {
                Some(h) => backing::ftruncate(&h.file, size)?,
                None => backing::truncate(node.fd(), size)?,
            }
        }
        if set.uid.is_some() || set.gid.is_some() {
            backing::chown(node.fd(), set.uid, set.gid)?;
        }
        if let Some(mode) = set.mode {
            backing::chmod(node.fd(), mode & 0o7777)?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            backing::set_times(node.fd(), set.atime, set.mtime)?;
        }
        Ok(backing::stat(node.fd())?)
    }

    pub fn readlink(&self, id: u64) -> Result<Vec<u8>> {
        Ok(backing::readlink(self.node(id)?.fd())?)
    }

    /// New entries belong to the caller (the daemon creates them as root); a set-group-id
    /// directory keeps its own group, as the covered filesystem already arranged.
    fn give_to_caller(&self, fd: BorrowedFd<'_>, parent: &Node, caller: Caller) -> Result<()> {
        if (caller.uid, caller.gid) == self.owner {
            return Ok(());
        }
        let sgid = backing::stat(parent.fd())?.mode & libc::S_ISGID != 0;
        let gid = if sgid { None } else { Some(caller.gid) };
        Ok(backing::chown(fd, Some(caller.uid), gid)?)
    }

    /// Finishes a mkdir/mknod/symlink: ownership, then the entry for the kernel.
    fn created(&self, parent: &Node, name: &OsStr, caller: Caller) -> Result<Stat> {
        let fd = backing::open_path_at(parent.fd(), name)?;
        self.give_to_caller(fd.as_fd(), parent, caller)?;
        let st = backing::stat(fd.as_fd())?;
        self.remember(fd, st)
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u64,
        c: Caller,
    ) -> Result<Stat> {
        self.check_name(parent, name)?;
        let p = self.node(parent)?;
        backing::mknod_at(p.fd(), name, mode, rdev)?;
        self.created(&p, name, c)
    }

    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, c: Caller) -> Result<Stat> {
        self.check_name(parent, name)?;
        let p = self.node(parent)?;
        backing::mkdir_at(p.fd(), name, mode)?;
        self.created(&p, name, c)
    }

    pub fn symlink(&self, parent: u64, name: &OsStr, target: &OsStr, c: Caller) -> Result<Stat> {
        self.check_name(parent, name)?;
        let p = self.node(parent)?;
        backing::symlink_at(p.fd(), name, target)?;
        self.created(&p, name, c)
    }

    pub fn link(&self, id: u64, newparent: u64, newname: &OsStr) -> Result<Stat> {
        self.check_name(newparent, newname)?;
        let node = self.node(id)?;
        let p = self.node(newparent)?;
        backing::link_at(node.fd(), p.fd(), newname)?;
        self.lookup_in(&p, newname)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.check_name(parent, name)?;
        Ok(backing::unlink_at(self.node(parent)?.fd(), name, false)?)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.check_name(parent, name)?;
        Ok(backing::unlink_at(self.node(parent)?.fd(), name, true)?)
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        self.check_name(parent, name)?;
        self.check_name(newparent, newname)?;
        let p = self.node(parent)?;
        let np = self.node(newparent)?;
        Ok(backing::rename_at(p.fd(), name, np.fd(), newname, flags)?)
    }

    /// Flags for the daemon's own fd on a covered file: the access mode and sync flags of the
    /// caller's open, without the ones the kernel already handled (create, truncate) or that
    /// only matter on the data path the kernel serves (direct I/O, append).
    fn data_flags(flags: i32) -> i32 {
        flags
            & !(libc::O_CREAT
                | libc::O_EXCL
                | libc::O_NOCTTY
                | libc::O_TRUNC
                | libc::O_DIRECT
                | libc::O_APPEND
                | libc::O_NOFOLLOW)
    }

    pub fn open(&self, id: u64, flags: i32, _caller: Caller) -> Result<Opened> {
        let node = self.node(id)?;
        let file = backing::reopen(node.fd(), Self::data_flags(flags))?;
        Ok(self.attach(node, file))
    }

    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Stat, Opened)> {
        self.check_name(parent, name)?;
        let p = self.node(parent)?;
        let keep = libc::O_EXCL | libc::O_TRUNC;
        let file =
            backing::create_at(p.fd(), name, Self::data_flags(flags) | (flags & keep), mode)?;
        self.give_to_caller(file.as_fd(), &p, caller)?;
        let fd = backing::path_fd_of(file.as_fd())?;
        let st = self.remember(fd, backing::stat(file.as_fd())?)?;
        let node = self.node(st.ino)?;
        Ok((st, self.attach(node, file)))
    }

    /// Registers a new handle; the first open of an inode chooses its I/O mode.
    fn attach(&self, node: Arc<Node>, file: File) -> Opened {
        let backing = if node.file_type == libc::S_IFREG { self.start_io(&node) } else { None };
        let fh = self.new_fh();
        self.handles.write().insert(fh, Arc::new(Handle { node, file }));
        Opened { fh, backing }
    }

    fn start_io(&self, node: &Node) -> Option<u32> {
        let mut st = node.state.lock();
        st.opens += 1;
        match st.io {
            Io::Passthrough(id) => return Some(id),
            Io::Daemon => return None,
            Io::Idle => {}
        }
        let Some(pt) = self.passthrough.get() else {
            st.io = Io::Daemon;
            return None;
        };
        match pt.open(node.fd()) {
            Ok(id) => {
                st.io = Io::Passthrough(id);
                Some(id)
            }
            Err(e) => {
                st.io = Io::Daemon;
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                if !st.warned {
                    st.warned = true;
                    warn!(
                        "kernel refused passthrough for inode {} ({e}): serving its data \
                         through the daemon, which is several times slower",
                        node.id
                    );
                }
                None
            }
        }
    }

    /// Drops a handle; the last one of an inode closes its backing id.
    pub fn release(&self, fh: u64) -> Result<()> {
        let h = self.handles.write().remove(&fh).ok_or(Error::BadHandle(fh))?;
        if h.node.file_type == libc::S_IFREG {
            let mut st = h.node.state.lock();
            st.opens = st.opens.saturating_sub(1);
            if st.opens == 0 {
                if let Io::Passthrough(id) = st.io {
                    if let Some(Err(e)) = self.passthrough.get().map(|p| p.close(id)) {
                        error!("closing backing id {id} of inode {}: {e}", h.node.id);
                    }
                }
                st.io = Io::Idle;
            }
        }
        Ok(())
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        Ok(backing::pread(&self.handle(fh)?.file, offset, size as usize)?)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        Ok(backing::pwrite(&self.handle(fh)?.file, offset, data)? as u32)
    }

    pub fn flush(&self, fh: u64) -> Result<()> {
        self.handle(fh).map(drop)
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        Ok(backing::fsync(&self.handle(fh)?.file, datasync)?)
    }

    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        Ok(backing::fallocate(&self.handle(fh)?.file, mode, offset, len)?)
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        Ok(backing::lseek(&self.handle(fh)?.file, offset, whence)?)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        flags: u32,
    ) -> Result<u32> {
        let a = self.handle(fh_in)?;
        let b = self.handle(fh_out)?;
        let n = backing::copy_file_range(&a.file, off_in, &b.file, off_out, len, flags)?;
        Ok(n.min(u32::MAX as usize) as u32)
    }

    pub fn opendir(&self, id: u64) -> Result<u64> {
        let node = self.node(id)?;
        let file = backing::reopen(node.fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        let fh = self.new_fh();
        let dh = DirHandle { node, file, entries: Mutex::new(Vec::new()) };
        self.dirs.write().insert(fh, Arc::new(dh));
        Ok(fh)
    }

    /// Entries from `offset` on (offset `i` is the i-th entry; `.` and `..` come first).
    /// Offset 0 takes a fresh listing.
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Vec<DirEntry>> {
        let dh = self.dir_handle(fh)?;
        let mut entries = dh.entries.lock();
        if offset == 0 {
            let mut list = vec![
                DirEntry { name: ".".into(), ino: dh.node.id, kind: libc::S_IFDIR },
                DirEntry { name: "..".into(), ino: dh.node.id, kind: libc::S_IFDIR },
            ];
            let id = dh.node.id;
            list.extend(
                backing::read_dir(dh.file.as_fd())?
                    .into_iter()
                    .filter(|e| !self.is_reserved(id, &e.name)),
            );
            *entries = list;
        }
        Ok(entries.iter().skip(offset as usize).cloned().collect())
    }

    /// The directory's own attributes and a lookup of one of its entries (for readdirplus).
    pub fn dir_stat(&self, fh: u64) -> Result<Stat> {
        Ok(backing::stat(self.dir_handle(fh)?.node.fd())?)
    }

    pub fn readdir_lookup(&self, fh: u64, name: &OsStr) -> Result<Stat> {
        let dh = self.dir_handle(fh)?;
        self.check_name(dh.node.id, name)?;
        self.lookup_in(&dh.node, name)
    }

    pub fn releasedir(&self, fh: u64) -> Result<()> {
        self.dirs.write().remove(&fh).map(drop).ok_or(Error::BadHandle(fh))
    }

    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> Result<()> {
        Ok(backing::fsync(&self.dir_handle(fh)?.file, datasync)?)
    }

    pub fn statfs(&self) -> Result<libc::statvfs> {
        Ok(backing::statvfs(self.root.fd())?)
    }

    pub fn access(&self, id: u64, mask: i32) -> Result<()> {
        Ok(backing::access(self.node(id)?.fd(), mask)?)
    }

    pub fn getxattr(&self, id: u64, name: &OsStr, size: u32) -> Result<Xattr> {
        let node = self.node(id)?;
        xattr_reply(size, |buf| backing::getxattr(node.fd(), name, buf))
    }

    pub fn listxattr(&self, id: u64, size: u32) -> Result<Xattr> {
        let node = self.node(id)?;
        xattr_reply(size, |buf| backing::listxattr(node.fd(), buf))
    }

    pub fn setxattr(&self, id: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        Ok(backing::setxattr(self.node(id)?.fd(), name, value, flags)?)
    }

    pub fn removexattr(&self, id: u64, name: &OsStr) -> Result<()> {
        Ok(backing::removexattr(self.node(id)?.fd(), name)?)
    }
}

fn xattr_reply(size: u32, call: impl Fn(&mut [u8]) -> std::io::Result<usize>) -> Result<Xattr> {
    if size == 0 {
        return Ok(Xattr::Size(call(&mut [])? as u32));
    }
    let mut buf = vec![0u8; size as usize];
    let n = call(&mut buf)?;
    buf.truncate(n);
    Ok(Xattr::Data(buf))
}
