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

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use log::{error, warn};

use crate::backing::{self, DirEntry, SetTime, Stat};
use crate::cache::{self, Cache, VFile};
use crate::error::{Error, Result};
use crate::journal::{self, Journal, OpenRec, Tables};
use crate::passthrough::Passthrough;
use crate::sync::{Mutex, RwLock};

/// The node id of the mount's root, fixed by the FUSE protocol.
pub const ROOT: u64 = 1;

/// The status tree's name in the root.
pub const STATUS_DIR: &str = ".imagecache";

/// Node ids of the status tree: the top bit set; `images/NAME` is `IMAGE_BIT` plus the
/// file's node id.
const VIRTUAL: u64 = 1 << 63;
const IMAGE_BIT: u64 = 1 << 62;
pub const V_DIR: u64 = VIRTUAL | 1;
pub const V_IMAGES: u64 = VIRTUAL | 2;
const V_FILES: [(&str, u64, VFile); 7] = [
    ("status", VIRTUAL | 3, VFile::Status),
    ("status.json", VIRTUAL | 4, VFile::StatusJson),
    ("metrics", VIRTUAL | 5, VFile::Metrics),
    ("events", VIRTUAL | 6, VFile::Events),
    ("config", VIRTUAL | 7, VFile::Config),
    ("control", VIRTUAL | 8, VFile::Control),
    ("server", VIRTUAL | 9, VFile::Server),
];

/// Node ids below this are the files' inode numbers; a file whose inode number is this or
/// higher (GlusterFS's are the low 64 bits of a random UUID, overlayfs `xino` uses the top
/// bits) gets an id from `MAPPED` up, below `IMAGE_BIT`, kept for the connection's life.
const MAPPED: u64 = 1 << 61;

/// The node ids of inode numbers from `MAPPED` up, both ways.
#[derive(Debug, Default)]
struct InoMap {
    to_id: HashMap<u64, u64>,
    to_ino: HashMap<u64, u64>,
    next: u64,
}

pub fn is_virtual(id: u64) -> bool {
    id & VIRTUAL != 0
}

/// What a status-tree node id stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VNode {
    Dir,
    Images,
    File(VFile),
}

fn vnode(id: u64) -> Option<VNode> {
    match id {
        V_DIR => Some(VNode::Dir),
        V_IMAGES => Some(VNode::Images),
        _ if id & (VIRTUAL | IMAGE_BIT) == VIRTUAL | IMAGE_BIT => {
            Some(VNode::File(VFile::Image(id & !(VIRTUAL | IMAGE_BIT))))
        }
        _ => V_FILES.iter().find(|f| f.1 == id).map(|f| VNode::File(f.2)),
    }
}

/// Who made a request (the header's thread id and fs credentials).
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The request's `unique` (kept with what it opens, for a resent copy of it).
    pub unique: u64,
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
    /// The covered file's inode number (the id itself unless mapped, see `MAPPED`).
    pub ino: u64,
    fd: OwnedFd,
    file_type: u32,
    state: Mutex<NodeState>,
}

impl Node {
    /// Node `id` for the covered file behind `fd` (`st`: its attributes).
    fn new(id: u64, fd: OwnedFd, st: &Stat) -> Arc<Node> {
        Arc::new(Node {
            id,
            ino: st.ino,
            fd,
            file_type: st.file_type(),
            state: Mutex::new(NodeState::default()),
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An open regular file. With passthrough the kernel reads and writes the covered file
/// itself, so the daemon opens its own fd only when an operation needs one (fsync,
/// fallocate, lseek, copy_file_range, daemon I/O).
#[derive(Debug)]
struct Handle {
    node: Arc<Node>,
    file: OnceLock<File>,
    /// `open(2)` flags for the daemon's fd (see `data_flags`).
    flags: i32,
    /// Opened for writing: its release may have changed the file's size.
    write: bool,
}

impl Handle {
    fn file(&self) -> Result<&File> {
        if let Some(f) = self.file.get() {
            return Ok(f);
        }
        let f = backing::reopen(self.node.fd(), self.flags)?;
        Ok(self.file.get_or_init(|| f))
    }
}

/// An open directory: a listing taken at offset 0 (or at the handle's first read, wherever
/// that starts) and served from there. `file` is `None` for the status tree's directories.
#[derive(Debug)]
struct DirHandle {
    id: u64,
    file: Option<File>,
    entries: Mutex<Option<Vec<DirEntry>>>,
}

/// An open status file: a snapshot rendered at open (shared with every other handle that
/// opened the same file in the same state, see `Cache::snapshot`), so a `cat` sees one
/// consistent state; or the control file, where each write carries whole commands.
#[derive(Debug)]
enum StatusHandle {
    Snapshot(Arc<cache::Snapshot>),
    /// The control file, with the unterminated end of a large write (see `write_control`).
    Control(Mutex<Vec<u8>>),
}

/// The longest control line taken (a verb and a name of at most 255 bytes fit many times).
pub const CONTROL_LINE_MAX: usize = 4096;
/// A write to `control` at least this long that does not end with a newline keeps its last
/// line for the next write (a block of a longer stream); a shorter one is complete.
pub const CONTROL_BLOCK: usize = 4096;
/// The largest write taken by `control`: well below the kernel's `max_write`, so a write is
/// never split into two requests in the middle of a line.
pub const CONTROL_WRITE_MAX: usize = 64 * 1024;
/// How much of a refused control line the log shows (escaped).
const LOGGED_MAX: usize = 80;

/// The answer to an open or create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    /// The passthrough backing id to reply with; `None` means daemon I/O.
    pub backing: Option<u32>,
    /// Reads and writes bypass the page cache (status files: their size is not known).
    pub direct_io: bool,
}

/// The answer to an opendir.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenedDir {
    pub fh: u64,
    /// The kernel may keep this directory's listing and serve later listings itself, until
    /// the directory changes (see `opendir`).
    pub cache: bool,
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

/// See `OverlayFs::keeper`.
pub type KeepFile = Box<dyn Fn(u64, Option<BorrowedFd<'_>>) + Send + Sync>;

pub struct OverlayFs {
    root: Arc<Node>,
    dev: u64,
    nodes: RwLock<HashMap<u64, Arc<Node>>>,
    inos: Mutex<InoMap>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    dirs: RwLock<HashMap<u64, Arc<DirHandle>>>,
    status: RwLock<HashMap<u64, Arc<StatusHandle>>>,
    fh_prefix: u64,
    next_fh: AtomicU64,
    passthrough: OnceLock<Passthrough>,
    /// Where node ids, lookups and open handles are recorded for the next server.
    journal: OnceLock<Arc<Journal>>,
    /// Hands the covered file of a node whose data the daemon serves to whoever keeps it
    /// for the next server while it is open (`Some(fd)`), and lets it go (`None`).
    keeper: OnceLock<KeepFile>,
    cache: Arc<Cache>,
    start: std::time::SystemTime,
    owner: (u32, u32),
}

impl OverlayFs {
    /// Serves the directory behind `root_fd` (an `O_PATH` fd opened before mounting).
    /// `start_secs` is the start time; `incarnation` (the server's number on its
    /// connection) prefixes file handles so that they differ between servers.
    pub fn new(
        root_fd: OwnedFd,
        cache: Arc<Cache>,
        start_secs: u64,
        incarnation: u32,
    ) -> Result<Self> {
        let st = backing::stat(root_fd.as_fd())?;
        let root = Arc::new(Node {
            id: ROOT,
            ino: st.ino,
            fd: root_fd,
            file_type: libc::S_IFDIR,
            state: Mutex::new(NodeState { nlookup: 1, ..Default::default() }),
        });
        let nodes = HashMap::from([(ROOT, root.clone())]);
        Ok(OverlayFs {
            root,
            dev: st.dev,
            nodes: RwLock::new(nodes),
            inos: Mutex::new(InoMap { next: MAPPED, ..Default::default() }),
            handles: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            status: RwLock::new(HashMap::new()),
            fh_prefix: (incarnation as u64 & 0xff_ffff) << 40,
            next_fh: AtomicU64::new(1),
            passthrough: OnceLock::new(),
            journal: OnceLock::new(),
            keeper: OnceLock::new(),
            cache,
            start: crate::clock::from_unix_secs(start_secs),
            owner: unsafe { (libc::geteuid(), libc::getegid()) },
        })
    }

    /// Turns on kernel passthrough for opens from now on (called once, at FUSE init).
    pub fn enable_passthrough(&self, p: Passthrough) {
        let _ = self.passthrough.set(p);
    }

    /// Records from now on what the kernel is told, for a server that takes over.
    pub fn set_journal(&self, j: Arc<Journal>) {
        let _ = self.journal.set(j);
    }

    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.get()
    }

    /// See `OverlayFs::keeper`.
    pub fn set_keeper(&self, k: KeepFile) {
        let _ = self.keeper.set(k);
    }

    /// The node id of the file with inode number `ino` (allocated, and journaled, the first
    /// time for a number from `MAPPED` up).
    fn id_of(&self, ino: u64) -> u64 {
        if ino < MAPPED {
            return ino;
        }
        let mut m = self.inos.lock();
        if let Some(id) = m.to_id.get(&ino) {
            return *id;
        }
        let id = m.next;
        m.next += 1;
        m.to_id.insert(ino, id);
        m.to_ino.insert(id, ino);
        if let Some(j) = self.journal.get() {
            j.mapped(id, ino);
        }
        id
    }

    /// The inode number behind node id `id` (the reverse of [`Self::id_of`]).
    fn ino_of(&self, id: u64) -> Option<u64> {
        if id < MAPPED {
            return Some(id);
        }
        self.inos.lock().to_ino.get(&id).copied()
    }

    /// A covered file's attributes as the kernel sees them: its node id as `st_ino`.
    fn shown(&self, st: Stat) -> Stat {
        Stat { ino: self.id_of(st.ino), ..st }
    }

    /// The attributes of a node as the cache knows the file: its inode number.
    fn real(&self, st: &Stat) -> Stat {
        Stat { ino: self.ino_of(st.ino).unwrap_or(st.ino), ..*st }
    }

    /// A status file of an image named by node id, as the cache names it (inode number).
    fn vfile(&self, f: VFile) -> VFile {
        match f {
            VFile::Image(id) => VFile::Image(self.ino_of(id).unwrap_or(u64::MAX)),
            f => f,
        }
    }

    /// Takes over what an earlier server of this connection handed to the kernel: its nodes
    /// (found again by file handle, or by name where the filesystem has none) with their
    /// lookup counts, and its open handles with their backing ids and references. Returns
    /// the node ids and handles that could not be found again.
    pub fn restore(&self, t: &Tables, kept: &HashMap<u64, OwnedFd>) -> (Vec<u64>, Vec<u64>) {
        {
            let mut m = self.inos.lock();
            for (&id, &ino) in &t.mapped {
                m.to_id.insert(ino, id);
                m.to_ino.insert(id, ino);
                m.next = m.next.max(id + 1);
            }
        }
        let mut lost_nodes = Vec::new();
        let mut order: Vec<(&u64, &journal::NodeRec)> = t.nodes.iter().collect();
        order.sort_by_key(|(_, n)| n.order());
        let mount_fd = backing::reopen(self.root.fd(), libc::O_RDONLY | libc::O_DIRECTORY).ok();
        for (&id, rec) in order {
            let found = self.find_again(mount_fd.as_ref().map(|f| f.as_fd()), rec).or_else(|| {
                // Removed while open (its data served by the daemon): kept for us.
                let fd = kept.get(&id)?.try_clone().ok()?;
                let st = backing::stat(fd.as_fd()).ok()?;
                (st.ino == rec.ino && st.dev == self.dev).then_some((fd, st))
            });
            let Some((fd, st)) = found else {
                lost_nodes.push(id);
                continue;
            };
            let mut nodes = self.nodes.write();
            let node = nodes.entry(id).or_insert_with(|| Node::new(id, fd, &st));
            node.state.lock().nlookup = rec.nlookup;
        }
        let mut renderings: HashMap<u64, Arc<cache::Snapshot>> = HashMap::new();
        for (&fh, sid) in &t.status {
            let Some(bytes) = t.snapshots.get(sid) else { continue };
            let snap =
                renderings.entry(*sid).or_insert_with(|| cache::Snapshot::restored(bytes.clone()));
            self.status.write().insert(fh, Arc::new(StatusHandle::Snapshot(snap.clone())));
        }
        let mut lost_handles = Vec::new();
        for (&fh, o) in &t.opens {
            let Ok(node) = self.node(o.ino) else {
                lost_handles.push(fh);
                continue;
            };
            if node.file_type == libc::S_IFREG {
                self.cache.opened(node.ino, fh, o.pid, o.write);
                let mut st = node.state.lock();
                st.opens += 1;
                st.io = if o.backing != 0 { Io::Passthrough(o.backing) } else { Io::Daemon };
            }
            let h = Handle { node, file: OnceLock::new(), flags: o.flags, write: o.write };
            self.handles.write().insert(fh, Arc::new(h));
        }
        (lost_nodes, lost_handles)
    }

    /// The file behind node `id` of an earlier server: by its file handle, else by name in
    /// its parent; only if it is still inode `id` of this filesystem.
    fn find_again(
        &self,
        mount_fd: Option<BorrowedFd<'_>>,
        rec: &journal::NodeRec,
    ) -> Option<(OwnedFd, Stat)> {
        let by_handle = || journal::open_handle(mount_fd?, &rec.handle).ok();
        let by_name = || {
            let parent = self.nodes.read().get(&rec.parent).cloned()?;
            backing::open_path_at(parent.fd(), OsStr::from_bytes(&rec.name)).ok()
        };
        for fd in [by_handle(), by_name()].into_iter().flatten() {
            if let Ok(st) = backing::stat(fd.as_fd()) {
                if st.ino == rec.ino && st.dev == self.dev {
                    return Some((fd, st));
                }
            }
        }
        None
    }

    pub fn passthrough_enabled(&self) -> bool {
        self.passthrough.get().is_some()
    }

    /// Open handles (files and directories) right now.
    pub fn open_handles(&self) -> usize {
        self.handles.read().len() + self.dirs.read().len() + self.status.read().len()
    }

    fn node(&self, id: u64) -> Result<Arc<Node>> {
        if is_virtual(id) {
            // Nothing but reading (and the control file) happens in the status tree.
            return Err(Error::AccessDenied);
        }
        self.nodes.read().get(&id).cloned().ok_or(Error::UnknownNode(id))
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
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
        parent == ROOT && (name == STATUS_DIR || cache::is_own_file(name))
    }

    /// A single path component that is not reserved.
    fn check_name(&self, parent: u64, name: &OsStr) -> Result<()> {
        let b = name.as_bytes();
        if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
            return Err(Error::InvalidName);
        }
        if parent == ROOT && name == STATUS_DIR {
            // The status tree is there and is not the caller's to change.
            return Err(Error::AccessDenied);
        }
        if self.is_reserved(parent, name) {
            return Err(Error::Reserved);
        }
        Ok(())
    }

    /// Hands a node to the kernel: adds it to the table or bumps its lookup count.
    fn remember(&self, fd: OwnedFd, st: Stat, parent: u64, name: &OsStr) -> Result<Stat> {
        if st.dev != self.dev || st.ino == ROOT {
            // Another filesystem mounted below the cache directory (or an inode number the
            // protocol reserves): node ids are inode numbers of one filesystem.
            warn!("refusing inode {} on device {:#x}: not on the cache filesystem", st.ino, st.dev);
            return Err(Error::NotSupported);
        }
        let id = self.id_of(st.ino);
        let journal = self.journal.get();
        // Found again by a later server through its file handle (taken outside the lock).
        let handle = match journal {
            Some(_) if !self.nodes.read().contains_key(&id) => journal::file_handle(fd.as_fd()),
            _ => Vec::new(),
        };
        let mut nodes = self.nodes.write();
        let node = nodes.entry(id).or_insert_with(|| {
            if let Some(j) = journal {
                j.node(id, st.ino, parent, name.as_bytes(), handle);
            }
            Node::new(id, fd, &st)
        });
        node.state.lock().nlookup += 1;
        if let Some(j) = journal {
            j.lookup(id, 1);
        }
        Ok(Stat { ino: id, ..st })
    }

    fn lookup_in(&self, parent: &Node, name: &OsStr) -> Result<Stat> {
        let fd = backing::open_path_at(parent.fd(), name)?;
        let st = backing::stat(fd.as_fd())?;
        self.remember(fd, st, parent.id, name)
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Stat> {
        if let Some(id) = self.virtual_child(parent, name)? {
            return Ok(self.virtual_stat(id));
        }
        self.check_name(parent, name)?;
        let p = self.node(parent)?;
        let st = self.lookup_in(&p, name)?;
        if parent == ROOT {
            self.cache.observe(name, &self.real(&st));
        }
        Ok(st)
    }

    /// The status-tree node `name` in `parent`, if `parent` is (or leads into) the tree.
    fn virtual_child(&self, parent: u64, name: &OsStr) -> Result<Option<u64>> {
        match (parent, vnode(parent)) {
            (ROOT, _) if name == STATUS_DIR => Ok(Some(V_DIR)),
            (_, Some(VNode::Dir)) if name == "images" => Ok(Some(V_IMAGES)),
            (_, Some(VNode::Dir)) => match V_FILES.iter().find(|f| name == f.0) {
                Some(f) => Ok(Some(f.1)),
                None => Err(Error::Reserved),
            },
            (_, Some(VNode::Images)) => match self.cache.ino_of(name) {
                Some(ino) => Ok(Some(VIRTUAL | IMAGE_BIT | self.id_of(ino))),
                None => Err(Error::Reserved),
            },
            (_, Some(VNode::File(_))) => {
                Err(Error::Io(std::io::Error::from_raw_os_error(libc::ENOTDIR)))
            }
            _ => Ok(None),
        }
    }

    /// Attributes of a status-tree node: read-only to all, `control` write-only for root,
    /// size and blocks 0 (the content is made at open).
    pub fn virtual_stat(&self, id: u64) -> Stat {
        let (mode, nlink) = match vnode(id) {
            Some(VNode::Dir | VNode::Images) => (libc::S_IFDIR | 0o555, 2),
            Some(VNode::File(VFile::Control)) => (libc::S_IFREG | 0o200, 1),
            _ => (libc::S_IFREG | 0o444, 1),
        };
        let t = match vnode(id) {
            Some(VNode::Dir | VNode::Images) | None => self.start,
            Some(VNode::File(_)) => self.cache.now(),
        };
        Stat {
            dev: 0,
            ino: id,
            mode,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            size: 0,
            blocks: 0,
            blksize: 4096,
            atime: t,
            mtime: t,
            ctime: t,
        }
    }

    pub fn forget(&self, id: u64, n: u64) {
        if id == ROOT || is_virtual(id) {
            return;
        }
        let mut nodes = self.nodes.write();
        let Some(node) = nodes.get(&id) else { return };
        if let Some(j) = self.journal.get() {
            j.forget(id, n);
        }
        let gone = {
            let mut st = node.state.lock();
            st.nlookup = st.nlookup.saturating_sub(n);
            st.nlookup == 0
        };
        if gone {
            let ino = node.ino;
            nodes.remove(&id);
            drop(nodes);
            self.cache.state.lock().forgotten(ino);
        }
    }

    pub fn getattr(&self, id: u64) -> Result<Stat> {
        if is_virtual(id) {
            return Ok(self.virtual_stat(id));
        }
        Ok(self.shown(backing::stat(self.node(id)?.fd())?))
    }

    pub fn setattr(&self, id: u64, fh: Option<u64>, set: SetAttr, caller: Caller) -> Result<Stat> {
        if vnode(id) == Some(VNode::File(VFile::Control))
            && set.mode.is_none()
            && set.uid.is_none()
            && set.gid.is_none()
        {
            // `echo CMD > control` truncates first: nothing to truncate.
            return Ok(self.virtual_stat(id));
        }
        let node = self.node(id)?;
        if set.size.is_some() {
            self.kill_privs(&node, caller)?;
        }
        let times = set.atime.is_some() || set.mtime.is_some();
        // A touch (or a truncate to the same size) keeps the checksum only if the file was
        // still as hashed just before it.
        let before = if (times || set.size.is_some()) && node.file_type == libc::S_IFREG {
            Some(backing::stat(node.fd())?)
        } else {
            None
        };
        if let Some(size) = set.size {
            match fh.and_then(|fh| self.handle(fh).ok()) {
                Some(h) => backing::ftruncate(h.file()?, size)?,
                None => backing::truncate(node.fd(), size)?,
            }
        }
        if set.uid.is_some() || set.gid.is_some() {
            backing::chown(node.fd(), set.uid, set.gid)?;
        }
        if let Some(mode) = set.mode {
            backing::chmod(node.fd(), mode & 0o7777)?;
        }
        if times {
            backing::set_times(node.fd(), set.atime, set.mtime)?;
        }
        let st = backing::stat(node.fd())?;
        match before {
            // Truncation changes the data: the checksum goes, and the file is hashed afresh.
            Some(before) if set.size.is_some() => self.cache.truncated(node.ino, &before, &st),
            // Nova touches a base file on every spawn: that is a use, not a write.
            Some(before) => self.cache.touched(node.ino, &before, &st),
            None => {}
        }
        Ok(self.shown(st))
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

    /// Finishes a mkdir/mknod/symlink: ownership, then the entry for the kernel (and, in the
    /// root, for the cache: a regular file made by `mknod` is a cache file like any other).
    fn created(&self, parent: &Node, name: &OsStr, caller: Caller) -> Result<Stat> {
        let fd = backing::open_path_at(parent.fd(), name)?;
        self.give_to_caller(fd.as_fd(), parent, caller)?;
        let st = backing::stat(fd.as_fd())?;
        let st = self.remember(fd, st, parent.id, name)?;
        if parent.id == ROOT {
            self.cache.observe(name, &self.real(&st));
        }
        Ok(st)
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u64,
        c: Caller,
    ) -> Result<Stat> {
        self.check_name(parent, name)?;
        let p = self.node(parent)?;
        with_caller_umask(mode, umask, |mode| backing::mknod_at(p.fd(), name, mode, rdev))?;
        self.created(&p, name, c)
    }

    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        c: Caller,
    ) -> Result<Stat> {
        self.check_name(parent, name)?;
        let p = self.node(parent)?;
        with_caller_umask(mode, umask, |mode| backing::mkdir_at(p.fd(), name, mode))?;
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
        let st = self.lookup_in(&p, newname)?;
        if newparent == ROOT {
            self.cache.observe(newname, &self.real(&st));
        }
        Ok(st)
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<()> {
        self.check_name(parent, name)?;
        backing::unlink_at(self.node(parent)?.fd(), name, false)?;
        if parent == ROOT {
            self.cache.unlinked(name);
        }
        Ok(())
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
        backing::rename_at(p.fd(), name, np.fd(), newname, flags)?;
        if parent == ROOT && newparent == ROOT {
            if flags & libc::RENAME_EXCHANGE != 0 {
                self.cache.exchanged(name, newname);
            } else {
                self.cache.renamed(name, newname);
            }
        }
        for (dir, n) in [(parent, name), (newparent, newname)] {
            if dir == ROOT {
                self.refresh_root_name(n);
            }
        }
        Ok(())
    }

    /// Tells the cache what `name` in the root is now (after a rename).
    fn refresh_root_name(&self, name: &OsStr) {
        let st =
            backing::open_path_at(self.root.fd(), name).and_then(|fd| backing::stat(fd.as_fd()));
        match st {
            Ok(st) if st.is_file() => self.cache.observe(name, &st),
            _ => self.cache.unlinked(name),
        }
    }

    /// Flags for the daemon's own fd on a covered file: the caller's access mode, sync and
    /// direct-I/O flags, without the ones the kernel already handled (create, truncate) and
    /// append (the kernel sends each write's offset).
    fn data_flags(flags: i32) -> i32 {
        flags
            & !(libc::O_CREAT
                | libc::O_EXCL
                | libc::O_NOCTTY
                | libc::O_TRUNC
                | libc::O_APPEND
                | libc::O_NOFOLLOW)
    }

    pub fn open(&self, id: u64, flags: i32, caller: Caller) -> Result<Opened> {
        if let Some(VNode::File(f)) = vnode(id) {
            return self.open_status(f, flags, caller);
        }
        let node = self.node(id)?;
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            self.kill_privs(&node, caller)?;
        }
        self.attach(node, None, flags, caller)
    }

    /// The mount negotiates `FUSE_HANDLE_KILLPRIV_V2` (so the kernel does not ask for
    /// `security.capability` before every write): dropping set-user-id, set-group-id (with
    /// group execute) and file capabilities when an unprivileged caller may modify a file is
    /// then ours. Passthrough writes reach the covered file with the daemon's credentials,
    /// which would keep them, so they are dropped when such a caller opens the file for
    /// writing or truncates it.
    fn kill_privs(&self, node: &Node, caller: Caller) -> Result<()> {
        if caller.uid == 0 || node.file_type != libc::S_IFREG {
            return Ok(());
        }
        let mode = backing::stat(node.fd())?.mode;
        let sgid_exec = libc::S_ISGID | libc::S_IXGRP;
        if mode & libc::S_ISUID != 0 || mode & sgid_exec == sgid_exec {
            backing::chmod(node.fd(), mode & 0o7777 & !(libc::S_ISUID | libc::S_ISGID))?;
        }
        match backing::removexattr(node.fd(), std::ffi::OsStr::new("security.capability")) {
            Err(e) if e.raw_os_error() != Some(libc::ENODATA) => {
                log::debug!("dropping file capabilities of inode {}: {e}", node.id)
            }
            _ => {}
        }
        Ok(())
    }

    fn open_status(&self, f: VFile, flags: i32, caller: Caller) -> Result<Opened> {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let control = f == VFile::Control;
        if write != control || (control && caller.uid != 0) {
            return Err(Error::AccessDenied);
        }
        let handle = if control {
            StatusHandle::Control(Mutex::new(Vec::new()))
        } else {
            let reader = if caller.uid == 0 { cache::Reader::Root } else { cache::Reader::Other };
            StatusHandle::Snapshot(
                self.cache.snapshot(self.vfile(f), reader).ok_or(Error::TooManySnapshots)?,
            )
        };
        let fh = self.new_fh();
        if let (Some(j), StatusHandle::Snapshot(snap)) = (self.journal.get(), &handle) {
            // A new server goes on with this very rendering for a reader half way through.
            j.status_opened(fh, snap.id(), snap.bytes());
        }
        self.status.write().insert(fh, Arc::new(handle));
        Ok(Opened { fh, backing: None, direct_io: true })
    }

    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Stat, Opened)> {
        self.check_name(parent, name)?;
        let p = self.node(parent)?;
        let file = self.create_or_open(&p, name, mode, umask, flags, caller)?;
        let fd = backing::path_fd_of(file.as_fd())?;
        let st = self.remember(fd, backing::stat(file.as_fd())?, parent, name)?;
        let node = self.node(st.ino)?;
        if parent == ROOT {
            self.cache.observe(name, &self.real(&st));
        }
        Ok((st, self.attach(node, Some(file), flags, caller)?))
    }

    /// The file a `create` names: made with `O_EXCL` (and given to the caller) whatever the
    /// caller asked, so that a file that appeared behind the mount since the kernel's lookup
    /// is never handed over as the caller's new file. Without `O_EXCL`, such a file is opened
    /// as an existing one, after the permission check the kernel would have made.
    fn create_or_open(
        &self,
        p: &Node,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<File> {
        let new_flags = Self::data_flags(flags) | libc::O_EXCL | (flags & libc::O_TRUNC);
        for _ in 0..3 {
            let made = with_caller_umask(mode, umask, |mode| {
                backing::create_at(p.fd(), name, new_flags, mode)
            });
            match made {
                Ok(file) => {
                    self.give_to_caller(file.as_fd(), p, caller)?;
                    return Ok(file);
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {}
                Err(e) => return Err(e.into()),
            }
            let open_flags = Self::data_flags(flags) | (flags & libc::O_TRUNC);
            match backing::open_at(p.fd(), name, open_flags) {
                Ok(file) => {
                    let st = backing::stat(file.as_fd())?;
                    if !may_open(&st, caller, flags, &self.cache.proc) {
                        return Err(Error::AccessDenied);
                    }
                    return Ok(file);
                }
                // Removed again meanwhile: try to create it once more.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Io(std::io::Error::from_raw_os_error(libc::EAGAIN)))
    }

    /// Registers a new handle (a reference, if the file is a cache file); the first open of
    /// an inode chooses its I/O mode.
    fn attach(
        &self,
        node: Arc<Node>,
        file: Option<File>,
        flags: i32,
        caller: Caller,
    ) -> Result<Opened> {
        let fh = self.new_fh();
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        let regular = node.file_type == libc::S_IFREG;
        if regular && !self.cache.opened(node.ino, fh, caller.pid, write) {
            // An eviction won the race for this file: it is gone.
            return Err(Error::Io(std::io::Error::from_raw_os_error(libc::ENOENT)));
        }
        let backing = if regular { self.start_io(&node) } else { None };
        if let Some(j) = self.journal.get() {
            let rec = OpenRec {
                ino: node.id,
                flags: Self::data_flags(flags),
                write,
                backing: backing.unwrap_or(0),
                pid: caller.pid,
                unique: caller.unique,
            };
            j.opened(fh, rec);
        }
        let h = Handle {
            node,
            file: file.map(OnceLock::from).unwrap_or_default(),
            flags: Self::data_flags(flags),
            write,
        };
        self.handles.write().insert(fh, Arc::new(h));
        Ok(Opened { fh, backing, direct_io: false })
    }

    /// Passes node's covered file to the keeper (`keep`) or lets it go.
    fn keep(&self, node: &Node, keep: bool) {
        if let Some(k) = self.keeper.get() {
            k(node.id, keep.then(|| node.fd()));
        }
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
            self.keep(node, true);
            return None;
        };
        match pt.open(node.fd()) {
            Ok(id) => {
                st.io = Io::Passthrough(id);
                Some(id)
            }
            Err(e) => {
                st.io = Io::Daemon;
                self.keep(node, true);
                self.cache.counters.lock().passthrough_fallbacks += 1;
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
        let status = self.status.write().remove(&fh);
        if let Some(s) = status {
            if let (Some(j), StatusHandle::Snapshot(_)) = (self.journal.get(), &*s) {
                j.released(fh);
            }
            // The end of a block-wise stream of commands runs when the file is closed for
            // good (its last descriptor: not at each `close` of a dup or a child's copy).
            if let StatusHandle::Control(pending) = &*s {
                let line = std::mem::take(&mut *pending.lock());
                if !line.iter().all(u8::is_ascii_whitespace) {
                    // Refusals are logged; a release has no caller left to tell.
                    let _ = self.control_line(&line);
                }
            }
            return Ok(());
        }
        let h = self.handles.write().remove(&fh).ok_or(Error::BadHandle(fh))?;
        // Recorded before the backing id may close: a later server must never reuse it.
        if let Some(j) = self.journal.get() {
            j.released(fh);
        }
        // Writes went through the kernel: the handle's own fd tells the size they left.
        let size = if h.write {
            backing::stat(h.node.fd()).ok().map(|st| (h.node.ino, st.size))
        } else {
            None
        };
        self.cache.released(fh, size);
        if h.node.file_type == libc::S_IFREG {
            let mut st = h.node.state.lock();
            st.opens = st.opens.saturating_sub(1);
            if st.opens == 0 {
                match st.io {
                    Io::Passthrough(id) => {
                        if let Some(Err(e)) = self.passthrough.get().map(|p| p.close(id)) {
                            error!("closing backing id {id} of inode {}: {e}", h.node.id);
                        }
                    }
                    Io::Daemon => self.keep(&h.node, false),
                    Io::Idle => {}
                }
                st.io = Io::Idle;
            }
        }
        Ok(())
    }

    fn status_handle(&self, fh: u64) -> Option<Arc<StatusHandle>> {
        self.status.read().get(&fh).cloned()
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        if let Some(s) = self.status_handle(fh) {
            let StatusHandle::Snapshot(snap) = &*s else { return Err(Error::AccessDenied) };
            let bytes = snap.bytes();
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
            let end = start.saturating_add(size as usize).min(bytes.len());
            return Ok(bytes[start..end].to_vec());
        }
        let h = self.handle(fh)?;
        if h.flags & libc::O_DIRECT != 0 {
            return Ok(backing::pread_direct(h.file()?, offset, size as usize)?);
        }
        Ok(backing::pread(h.file()?, offset, size as usize)?)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        if let Some(s) = self.status_handle(fh) {
            return self.write_control(&s, data);
        }
        let h = self.handle(fh)?;
        if h.flags & libc::O_DIRECT != 0 {
            return Ok(backing::pwrite_direct(h.file()?, offset, data)? as u32);
        }
        Ok(backing::pwrite(h.file()?, offset, data)? as u32)
    }

    /// Runs the commands of one write to `control`, in order. A small write carries whole
    /// lines: a last line without a newline is complete too (`printf 'pin X' > control` fails
    /// in the shell, not silently at close). A write of `CONTROL_BLOCK` bytes or more that
    /// does not end with a newline is a block of a longer stream (`dd`, a buffered writer):
    /// its last line is kept for the next write, or run when the file is released (its last
    /// descriptor closed; a refusal then is only logged) — never cut into a shorter name that
    /// may be another file. The first refused line fails the write with its errno,
    /// the lines after it are not run, and nothing is kept. A write over `CONTROL_WRITE_MAX`
    /// bytes or with a line over `CONTROL_LINE_MAX` bytes is refused whole (`EINVAL`), before
    /// any of it runs.
    fn write_control(&self, s: &StatusHandle, data: &[u8]) -> Result<u32> {
        let StatusHandle::Control(pending) = s else {
            return Err(Error::AccessDenied);
        };
        let mut pending = pending.lock();
        let mut all = std::mem::take(&mut *pending);
        all.extend_from_slice(data);
        let keep_tail = data.len() >= CONTROL_BLOCK && !data.ends_with(b"\n");
        let mut lines: Vec<&[u8]> = all.split(|&b| b == b'\n').collect();
        let longest = lines.iter().map(|l| l.len()).max().unwrap_or(0);
        let tail = if keep_tail { lines.pop() } else { None };
        if data.len() > CONTROL_WRITE_MAX || longest > CONTROL_LINE_MAX {
            warn!(
                "control: refused a write of {} bytes (lines of at most {CONTROL_LINE_MAX} \
                 bytes, writes of at most {CONTROL_WRITE_MAX}): {}",
                data.len(),
                crate::text::excerpt(data, LOGGED_MAX)
            );
            return Err(Error::Refused(libc::EINVAL));
        }
        for line in lines {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            self.control_line(line)?;
        }
        *pending = tail.map(<[u8]>::to_vec).unwrap_or_default();
        Ok(data.len() as u32)
    }

    fn control_line(&self, line: &[u8]) -> Result<()> {
        let result = cache::parse_command(line).and_then(|c| self.cache.control(c));
        result.map_err(|e| {
            warn!("control: {} refused: {e}", crate::text::excerpt(line, LOGGED_MAX));
            Error::Refused(e.errno())
        })
    }

    pub fn flush(&self, fh: u64) -> Result<()> {
        if self.status_handle(fh).is_some() {
            // A control line kept from a large write runs at release, not at each `close`:
            // a dup or a child's copy closing must not run half a command.
            return Ok(());
        }
        self.handle(fh).map(drop)
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        Ok(backing::fsync(self.handle(fh)?.file()?, datasync)?)
    }

    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        Ok(backing::fallocate(self.handle(fh)?.file()?, mode, offset, len)?)
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        Ok(backing::lseek(self.handle(fh)?.file()?, offset, whence)?)
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
        let n = backing::copy_file_range(a.file()?, off_in, b.file()?, off_out, len, flags)?;
        Ok(n.min(u32::MAX as usize) as u32)
    }

    /// Opens a directory. A covered directory's listing may be cached by the kernel: it
    /// drops the cache when the directory changes through the mount, when the daemon evicts
    /// a file (`KernelNotifier`), and when it sees a new mtime on the directory (re-read at
    /// most one attribute TTL later, for changes made behind the mount). The status tree's
    /// listings change with the cache's state, so they are never cached.
    pub fn opendir(&self, id: u64) -> Result<OpenedDir> {
        let file = match vnode(id) {
            Some(VNode::Dir | VNode::Images) => None,
            Some(VNode::File(_)) => {
                return Err(Error::Io(std::io::Error::from_raw_os_error(libc::ENOTDIR)))
            }
            None => {
                let node = self.node(id)?;
                Some(backing::reopen(node.fd(), libc::O_RDONLY | libc::O_DIRECTORY)?)
            }
        };
        let fh = self.new_fh();
        let cache = file.is_some();
        let dh = DirHandle { id, file, entries: Mutex::new(None) };
        self.dirs.write().insert(fh, Arc::new(dh));
        Ok(OpenedDir { fh, cache })
    }

    pub fn has_dir_handle(&self, fh: u64) -> bool {
        self.dirs.read().contains_key(&fh)
    }

    /// Whether `name` exists in directory `parent` (nothing is handed to the kernel).
    pub fn lookup_peek(&self, parent: u64, name: &OsStr) -> bool {
        self.node(parent).is_ok_and(|p| backing::open_path_at(p.fd(), name).is_ok())
    }

    /// A directory handle an earlier server of this connection opened (its listing is taken
    /// again at the next read): directory handles are not journaled.
    pub fn adopt_dir(&self, id: u64, fh: u64) -> Result<()> {
        let file = match vnode(id) {
            Some(VNode::Dir | VNode::Images) => None,
            Some(VNode::File(_)) => return Err(Error::BadHandle(fh)),
            None => Some(backing::reopen(self.node(id)?.fd(), libc::O_RDONLY | libc::O_DIRECTORY)?),
        };
        let dh = DirHandle { id, file, entries: Mutex::new(None) };
        self.dirs.write().entry(fh).or_insert_with(|| Arc::new(dh));
        Ok(())
    }

    /// A status file an earlier server of this connection opened: rendered again.
    pub fn adopt_status(&self, id: u64, fh: u64, caller: Caller) -> Result<()> {
        let Some(VNode::File(f)) = vnode(id) else { return Err(Error::BadHandle(fh)) };
        let handle = if f == VFile::Control {
            StatusHandle::Control(Mutex::new(Vec::new()))
        } else {
            let reader = if caller.uid == 0 { cache::Reader::Root } else { cache::Reader::Other };
            StatusHandle::Snapshot(
                self.cache.snapshot(self.vfile(f), reader).ok_or(Error::TooManySnapshots)?,
            )
        };
        self.status.write().entry(fh).or_insert_with(|| Arc::new(handle));
        Ok(())
    }

    /// The listing of a directory: `.`, `..`, then its entries, in the order of their
    /// [`dir_cookie`].
    fn list(&self, dh: &DirHandle) -> Result<Vec<DirEntry>> {
        let dot = |name: &str, ino| DirEntry { name: name.into(), ino, kind: libc::S_IFDIR };
        let mut list = vec![dot(".", dh.id), dot("..", dh.id)];
        let entry = |name: OsString, ino, kind| DirEntry { name, ino, kind };
        match (vnode(dh.id), &dh.file) {
            (Some(VNode::Dir), _) => {
                list.push(entry("images".into(), V_IMAGES, libc::S_IFDIR));
                list.extend(V_FILES.iter().map(|f| entry(f.0.into(), f.1, libc::S_IFREG)));
            }
            (Some(VNode::Images), _) => list.extend(
                self.cache
                    .names()
                    .into_iter()
                    .map(|(n, ino)| entry(n, VIRTUAL | IMAGE_BIT | self.id_of(ino), libc::S_IFREG)),
            ),
            (_, Some(file)) => {
                list.extend(
                    backing::read_dir(file.as_fd())?
                        .into_iter()
                        .filter(|e| !self.is_reserved(dh.id, &e.name))
                        .map(|e| DirEntry { ino: self.id_of(e.ino), ..e }),
                );
                if dh.id == ROOT {
                    list.push(entry(STATUS_DIR.into(), V_DIR, libc::S_IFDIR));
                }
            }
            _ => {}
        }
        list.sort_by_cached_key(|e| dir_cookie(&e.name));
        Ok(list)
    }

    /// Entries after `offset`: the [`dir_cookie`] of the last entry the caller read (0: from
    /// the start). Offset 0 takes a fresh listing, and so does the first read of a handle at
    /// any other offset: the kernel starts a handle there when the listing it cached is
    /// dropped in the middle of a read, after a `seekdir` to a position another handle
    /// returned, or when a server replaced the one that listed. A cookie names a place in
    /// any listing of the directory, so entries removed meanwhile shift nothing.
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Vec<DirEntry>> {
        let dh = self.dir_handle(fh)?;
        let mut entries = dh.entries.lock();
        let listing = match &mut *entries {
            Some(listing) if offset != 0 => listing,
            stale => stale.insert(self.list(&dh)?),
        };
        let from = listing.partition_point(|e| dir_cookie(&e.name) <= offset);
        Ok(listing[from..].to_vec())
    }

    /// The directory's own attributes and a lookup of one of its entries (for readdirplus).
    pub fn dir_stat(&self, fh: u64) -> Result<Stat> {
        self.getattr(self.dir_handle(fh)?.id)
    }

    pub fn readdir_lookup(&self, fh: u64, name: &OsStr) -> Result<Stat> {
        self.lookup(self.dir_handle(fh)?.id, name)
    }

    pub fn releasedir(&self, fh: u64) -> Result<()> {
        self.dirs.write().remove(&fh).map(drop).ok_or(Error::BadHandle(fh))
    }

    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> Result<()> {
        match &self.dir_handle(fh)?.file {
            Some(f) => Ok(backing::fsync(f, datasync)?),
            None => Ok(()),
        }
    }

    pub fn statfs(&self) -> Result<libc::statvfs> {
        Ok(backing::statvfs(self.root.fd())?)
    }

    pub fn access(&self, id: u64, mask: i32) -> Result<()> {
        if is_virtual(id) {
            let mode = self.virtual_stat(id).mode;
            let w = mask & libc::W_OK != 0 && mode & 0o200 == 0;
            let r = mask & libc::R_OK != 0 && mode & 0o444 == 0;
            return if w || r { Err(Error::AccessDenied) } else { Ok(()) };
        }
        Ok(backing::access(self.node(id)?.fd(), mask)?)
    }

    pub fn getxattr(&self, id: u64, name: &OsStr, size: u32) -> Result<Xattr> {
        if is_virtual(id) {
            return Err(Error::Io(std::io::Error::from_raw_os_error(libc::ENODATA)));
        }
        let node = self.node(id)?;
        xattr_reply(size, |buf| backing::getxattr(node.fd(), name, buf))
    }

    pub fn listxattr(&self, id: u64, size: u32) -> Result<Xattr> {
        if is_virtual(id) {
            return Ok(if size == 0 { Xattr::Size(0) } else { Xattr::Data(Vec::new()) });
        }
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

/// Whether `caller` may open an existing file with `flags`, by its mode bits (owner, group
/// with the caller's supplementary groups, others), as the kernel's `default_permissions`
/// checks it.
fn may_open(st: &Stat, caller: Caller, flags: i32, proc: &crate::procfs::ProcRoot) -> bool {
    if caller.uid == 0 {
        return true;
    }
    let mut want = 0;
    if flags & libc::O_ACCMODE != libc::O_WRONLY {
        want |= 4;
    }
    if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
        want |= 2;
    }
    let bits = if st.uid == caller.uid {
        st.mode >> 6
    } else if st.gid == caller.gid || proc.groups(caller.pid).contains(&st.gid) {
        st.mode >> 3
    } else {
        st.mode
    };
    bits & want == want
}

/// Runs `make` (a create, mkdir or mknod in the covered directory, given the mode to use) with
/// the caller's umask as this thread's, so that the covered filesystem applies it exactly
/// where it would for the caller: only when the parent directory has no default ACL. With
/// `FUSE_POSIX_ACL` and `FUSE_DONT_MASK` the kernel leaves the umask to the daemon; without
/// them the mode arrives masked already, and masking it again changes nothing.
///
/// A thread gets its own umask (and its own copy of cwd and root, which the daemon never uses
/// for the covered files) by `unshare(CLONE_FS)`, once; the process umask stays 0. Where that
/// fails, the mode is masked here, as before ACLs were enforced.
fn with_caller_umask<T>(mode: u32, umask: u32, make: impl FnOnce(u32) -> T) -> T {
    thread_local! {
        static OWN_UMASK: Cell<Option<bool>> = const { Cell::new(None) };
    }
    let own = OWN_UMASK.with(|own| {
        if let Some(own) = own.get() {
            return own;
        }
        // SAFETY: a plain syscall; it only detaches this thread's filesystem context.
        let unshared = unsafe { libc::unshare(libc::CLONE_FS) } == 0;
        if !unshared {
            let e = std::io::Error::last_os_error();
            warn!(
                "cannot give a worker thread its own umask ({e}): files it creates get the \
                 caller's umask even under a default ACL"
            );
        }
        own.set(Some(unshared));
        unshared
    });
    let umask = umask & 0o777;
    if !own {
        return make(mode & !umask);
    }
    // SAFETY: plain syscalls; the mask is this thread's alone after the unshare.
    let previous = unsafe { libc::umask(umask as libc::mode_t) };
    let made = make(mode);
    unsafe { libc::umask(previous) };
    made
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

/// The offset a listing gives for the place after the entry `name`: `.` is 1, `..` is 2, any
/// other name a 63-bit hash of it (FNV-1a) above those. Listings are in cookie order, so the
/// place after a name is the same in every listing of the directory — by this server or the
/// one that replaces it — whatever was added or removed elsewhere in it (as ext4's own
/// hash-ordered offsets). Two names with one cookie (one chance in 2^63 per pair) would
/// make a listing resumed between them skip the second.
pub fn dir_cookie(name: &OsStr) -> u64 {
    match name.as_bytes() {
        b"." => 1,
        b".." => 2,
        b => {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for &x in b {
                h = (h ^ x as u64).wrapping_mul(0x0100_0000_01b3);
            }
            (h >> 1).max(3)
        }
    }
}
