//! The FUSE adapter: the only module that sees fuser's request and reply types. It unpacks
//! each request, calls the core (`fs::OverlayFs`), replies, and logs failures at the level
//! the error asks for.

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use log::{debug, info, log, warn};

use crate::backing::{SetTime, Stat};
use crate::error::Error;
use crate::fs::{is_virtual, Caller, Opened, OverlayFs, SetAttr, Xattr};
use crate::journal::{Init, Outcome};
use crate::passthrough::Passthrough;

/// Entry and attribute TTL. Every change to the covered directory goes through the mount,
/// so the kernel may keep what it learnt; long enough that Nova's and libvirt's `stat` storms
/// stay in the kernel.
pub const TTL: Duration = Duration::from_secs(60);

/// The TTL on shared storage: other hosts create and delete cache files behind the mount,
/// and Nova here checks that a base exists before it spawns on it, so a deleted file must not
/// look present for long. Costs a `LOOKUP`/`GETATTR` round trip to the daemon (one `fstatat`
/// on the shared filesystem, which its own client caches for its `actimeo`) for each `stat`
/// more than a second after the last.
pub const SHARED_TTL: Duration = Duration::from_secs(1);

const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
const ECRYPTFS_SUPER_MAGIC: i64 = 0xf15f;

pub struct FuseAdapter {
    core: Arc<OverlayFs>,
    /// A duplicate of the `/dev/fuse` fd for the passthrough ioctls; taken at init.
    dev: Option<OwnedFd>,
    /// `statfs` type of the covered filesystem, which decides the stacking depth.
    covered_fs_type: i64,
    /// Entry and attribute TTL of covered files: [`TTL`], or [`SHARED_TTL`] on shared storage.
    ttl: Duration,
}

/// Bit 63 of `unique`: the kernel resends a request a dead server read but never answered.
const RESENT: u64 = 1 << 63;

impl FuseAdapter {
    /// `dev: None` serves every read and write through the daemon (`--no-passthrough`).
    pub fn new(core: Arc<OverlayFs>, dev: Option<OwnedFd>, covered_fs_type: i64) -> Self {
        let ttl = if core.cache().policy.shared.is_some() { SHARED_TTL } else { TTL };
        FuseAdapter { core, dev, covered_fs_type, ttl }
    }

    /// For a server taking over a live connection: `init` is not called again (the core
    /// was set up from the journal).
    pub fn resumed(core: Arc<OverlayFs>, covered_fs_type: i64) -> Self {
        FuseAdapter::new(core, None, covered_fs_type)
    }

    /// For a resent request, the result its first execution recorded.
    fn first_result(&self, req: &Request) -> Option<Outcome> {
        let u = req.unique().0;
        if u & RESENT == 0 {
            return None;
        }
        let first = self.core.journal()?.outcome(u & !RESENT);
        info!("resent request {:#x}: first result {first:?}", u & !RESENT);
        first
    }

    /// Records what a request that changes something got, before the reply says it.
    fn record(&self, req: &Request, outcome: Outcome) {
        if let Some(j) = self.core.journal() {
            j.done(req.unique().0 & !RESENT, outcome);
        }
    }

    /// A mkdir/mknod/symlink/link: replies with the entry, recorded for a resend. `again`
    /// tells, for a resent request that finds its name taken (its first execution may have
    /// made it just before that server died), the entry that first execution made.
    fn entry_op(
        &self,
        req: &Request,
        op: &str,
        reply: ReplyEntry,
        run: impl FnOnce() -> Result<Stat, Error>,
        again: impl FnOnce() -> Option<Stat>,
    ) {
        let result = match self.first_result(req) {
            Some(Outcome::Entry(id)) => self.core.getattr(id),
            Some(Outcome::Err(n)) => return reply.error(Errno::from_i32(n)),
            _ => match run() {
                Err(e) if req.unique().0 & RESENT != 0 && e.errno() == libc::EEXIST => {
                    again().ok_or(e)
                }
                r => r,
            },
        };
        match result {
            Ok(st) => {
                self.record(req, Outcome::Entry(st.ino));
                reply.entry(&self.ttl, &attr(&st), Generation(0))
            }
            Err(e) => {
                self.record(req, Outcome::Err(e.errno()));
                reply.error(fail(op, e))
            }
        }
    }

    /// An unlink/rmdir/rename: recorded for a resend; a resent one whose first execution
    /// may have happened (`done` says so from the errno) succeeds.
    fn empty_op(
        &self,
        req: &Request,
        op: &str,
        reply: ReplyEmpty,
        run: impl FnOnce() -> Result<(), Error>,
        done: impl FnOnce(i32) -> bool,
    ) {
        let result = match self.first_result(req) {
            Some(Outcome::Ok) => Ok(()),
            Some(Outcome::Err(n)) => return reply.error(Errno::from_i32(n)),
            _ => match run() {
                Err(e) if req.unique().0 & RESENT != 0 && done(e.errno()) => Ok(()),
                r => r,
            },
        };
        match result {
            Ok(()) => {
                self.record(req, Outcome::Ok);
                reply.ok()
            }
            Err(e) => {
                self.record(req, Outcome::Err(e.errno()));
                reply.error(fail(op, e))
            }
        }
    }

    /// A resent open or create whose first execution opened a handle: that handle.
    fn reopened(&self, req: &Request) -> Option<(Opened, u64)> {
        let u = req.unique().0;
        if u & RESENT == 0 {
            return None;
        }
        let (fh, rec) = self.core.journal()?.opened_by(u & !RESENT)?;
        let backing = (rec.backing != 0).then_some(rec.backing);
        Some((Opened { fh, backing, direct_io: false }, rec.ino))
    }

    /// A directory handle of an earlier server of this connection is taken over here.
    fn adopt_dir(&self, ino: INodeNo, fh: FileHandle) {
        if !self.core.has_dir_handle(fh.0) {
            if let Err(e) = self.core.adopt_dir(ino.0, fh.0) {
                debug!("directory handle {:#x} of node {}: {e}", fh.0, ino.0);
            }
        }
    }
}

fn caller(req: &Request) -> Caller {
    Caller { pid: req.pid(), uid: req.uid(), gid: req.gid(), unique: req.unique().0 }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn attr(st: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(st.ino),
        size: st.size,
        blocks: st.blocks,
        atime: st.atime,
        mtime: st.mtime,
        ctime: st.ctime,
        crtime: SystemTime::UNIX_EPOCH,
        kind: file_type(st.mode),
        perm: (st.mode & 0o7777) as u16,
        nlink: st.nlink as u32,
        uid: st.uid,
        gid: st.gid,
        rdev: st.rdev as u32,
        blksize: st.blksize as u32,
        flags: 0,
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

impl FuseAdapter {
    /// Status-tree nodes change on every read: the kernel must not cache them.
    fn ttl(&self, st: &Stat) -> &Duration {
        const NONE: Duration = Duration::ZERO;
        if is_virtual(st.ino) {
            &NONE
        } else {
            &self.ttl
        }
    }
}

/// Logs a failed request at the error's level and returns its errno.
fn fail(op: &str, e: Error) -> Errno {
    log!(e.log_level(), "{op}: {e}");
    Errno::from_i32(e.errno())
}

/// Open flags of a regular file: nothing is buffered in the daemon (passthrough data goes
/// to the covered file, daemon I/O is synchronous), so `close` need not send a FLUSH.
/// Status files are read with direct I/O: their size is not known before they are rendered.
fn fopen_flags(o: &Opened) -> FopenFlags {
    if o.direct_io {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::FOPEN_NOFLUSH
    }
}

fn opened_reply(reply: ReplyOpen, o: Opened) {
    match o.backing {
        Some(id) => {
            // The id stays owned by the core (closed at the last release), so the wrapper
            // must not close it when it goes out of scope.
            let b = unsafe { reply.wrap_backing(id) };
            reply.opened_passthrough(FileHandle(o.fh), fopen_flags(&o), &b);
            let _ = b.into_raw();
        }
        None => reply.opened(FileHandle(o.fh), fopen_flags(&o)),
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        for flag in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            // Set-id bits are dropped by the daemon (fs::kill_privs), so the kernel may mark
            // inodes as having no security attributes instead of asking before every write.
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            // A listing starting at offset 0 re-reads the directory's attributes once they
            // expired, so a directory changed behind the mount drops its cached listing
            // (`opendir`) within one TTL. Passthrough files keep no pages in the mount.
            InitFlags::FUSE_AUTO_INVAL_DATA,
        ] {
            if let Err(missing) = config.add_capabilities(flag) {
                debug!("kernel lacks {missing:?}");
            }
        }
        // The kernel enforces POSIX ACLs (read through getxattr, as the covered filesystem
        // stores them) and leaves the umask of new files to the daemon (fs::with_caller_umask):
        // the covered filesystem skips it under a default ACL, as it would for the caller.
        match config.add_capabilities(InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK) {
            Ok(()) => debug!("POSIX ACLs enforced by the kernel"),
            Err(missing) => warn!(
                "kernel lacks {missing:?}: POSIX ACLs of the covered files are not enforced \
                 through the mount (only their modes are)"
            ),
        }
        // Backing files on a stacked filesystem need depth 2; otherwise keep 1 so that this
        // mount itself may still sit under an overlayfs.
        let depth = match self.covered_fs_type {
            OVERLAYFS_SUPER_MAGIC | FUSE_SUPER_MAGIC | ECRYPTFS_SUPER_MAGIC => 2,
            _ => 1,
        };
        let granted = self.dev.is_some()
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(depth).is_ok();
        if let Some(j) = self.core.journal() {
            // Before the reply: a server taking over serves the connection this settles.
            let v = config.kernel_abi();
            j.init(Init {
                major: v.0,
                minor: v.1,
                kernel_flags: config.capabilities().bits(),
                passthrough: granted,
            });
        }
        match (granted, self.dev.take()) {
            (true, Some(dev)) => {
                self.core.enable_passthrough(Passthrough::new(dev));
                info!("kernel passthrough enabled (stack depth {depth})");
            }
            (_, None) => warn!("passthrough off (--no-passthrough): the daemon serves all data"),
            _ => warn!(
                "kernel FUSE passthrough is not available (needs Linux >= 6.9 with \
                 CONFIG_FUSE_PASSTHROUGH): every read and write goes through the daemon, \
                 several times slower than the covered filesystem"
            ),
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.core.lookup(parent.0, name) {
            Ok(st) => reply.entry(self.ttl(&st), &attr(&st), Generation(0)),
            Err(e) => reply.error(fail("lookup", e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.core.getattr(ino.0) {
            Ok(st) => reply.attr(self.ttl(&st), &attr(&st)),
            Err(e) => reply.error(fail("getattr", e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr { mode, uid, gid, size, atime: set_time(atime), mtime: set_time(mtime) };
        let result = match self.first_result(req) {
            Some(Outcome::Err(n)) => return reply.error(Errno::from_i32(n)),
            Some(_) => self.core.getattr(ino.0),
            None => self.core.setattr(ino.0, fh.map(|f| f.0), set, caller(req)),
        };
        match result {
            Ok(st) => {
                self.record(req, Outcome::Ok);
                reply.attr(self.ttl(&st), &attr(&st))
            }
            Err(e) => {
                self.record(req, Outcome::Err(e.errno()));
                reply.error(fail("setattr", e))
            }
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.core.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(fail("readlink", e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.entry_op(
            req,
            "mknod",
            reply,
            || self.core.mknod(parent.0, name, mode, umask, rdev as u64, caller(req)),
            || {
                let st = self.core.lookup(parent.0, name).ok()?;
                (st.mode & libc::S_IFMT == mode & libc::S_IFMT).then_some(st)
            },
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.entry_op(
            req,
            "mkdir",
            reply,
            || self.core.mkdir(parent.0, name, mode, umask, caller(req)),
            || {
                self.core
                    .lookup(parent.0, name)
                    .ok()
                    .filter(|st| st.mode & libc::S_IFMT == libc::S_IFDIR)
            },
        )
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty_op(
            req,
            "unlink",
            reply,
            || self.core.unlink(parent.0, name),
            |errno| errno == libc::ENOENT,
        )
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty_op(
            req,
            "rmdir",
            reply,
            || self.core.rmdir(parent.0, name),
            |errno| errno == libc::ENOENT,
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.entry_op(
            req,
            "symlink",
            reply,
            || self.core.symlink(parent.0, link_name, target.as_os_str(), caller(req)),
            || {
                let st = self.core.lookup(parent.0, link_name).ok()?;
                let same =
                    self.core.readlink(st.ino).ok()? == target.as_os_str().as_encoded_bytes();
                same.then_some(st)
            },
        )
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.empty_op(
            req,
            "rename",
            reply,
            || self.core.rename(parent.0, name, newparent.0, newname, flags.bits()),
            // The old name is gone and the new one is there: the first execution did it.
            |errno| errno == libc::ENOENT && self.core.lookup_peek(newparent.0, newname),
        )
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry_op(
            req,
            "link",
            reply,
            || self.core.link(ino.0, newparent.0, newname),
            || self.core.lookup(newparent.0, newname).ok().filter(|st| st.ino == ino.0),
        )
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if let Some((o, _)) = self.reopened(req) {
            return opened_reply(reply, o);
        }
        match self.core.open(ino.0, flags.0, caller(req)) {
            Ok(o) => opened_reply(reply, o),
            Err(e) => reply.error(fail("open", e)),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut result = self.core.read(fh.0, offset, size);
        if matches!(result, Err(Error::BadHandle(_))) && is_virtual(ino.0) {
            // Opened from an earlier server of this connection.
            result = self
                .core
                .adopt_status(ino.0, fh.0, caller(req))
                .and_then(|()| self.core.read(fh.0, offset, size));
        }
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(fail("read", e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let resent = req.unique().0 & RESENT != 0;
        let result = match self.first_result(req) {
            Some(Outcome::Written(n)) => Ok(n),
            Some(Outcome::Err(n)) => return reply.error(Errno::from_i32(n)),
            // The server that read it was ended by this very command (its supervisor replaces
            // it at once): done, and never a second restart.
            _ if resent && is_virtual(ino.0) && data.trim_ascii_end() == b"restart" => {
                Ok(data.len() as u32)
            }
            _ => {
                let mut r = self.core.write(fh.0, offset, data);
                if matches!(r, Err(Error::BadHandle(_))) && is_virtual(ino.0) {
                    r = self
                        .core
                        .adopt_status(ino.0, fh.0, caller(req))
                        .and_then(|()| self.core.write(fh.0, offset, data));
                }
                match r {
                    // A command whose first execution removed its file (evict) before that
                    // server died: done.
                    Err(e) if resent && is_virtual(ino.0) && e.errno() == libc::ENOENT => {
                        Ok(data.len() as u32)
                    }
                    r => r,
                }
            }
        };
        match result {
            Ok(n) => {
                self.record(req, Outcome::Written(n));
                reply.written(n)
            }
            Err(e) => {
                self.record(req, Outcome::Err(e.errno()));
                reply.error(fail("write", e))
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        match self.core.flush(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("flush", e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.core.release(fh.0) {
            // Released already (a resent release), or never known: nothing is held.
            Ok(()) | Err(Error::BadHandle(_)) => reply.ok(),
            Err(e) => reply.error(fail("release", e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.core.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("fsync", e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.core.opendir(ino.0) {
            // The kernel serves repeated listings from its cache of this one, and keeps that
            // cache across opens: it drops it itself when the directory changes through the
            // mount or shows a new mtime, and `KernelNotifier` drops it after evictions.
            Ok(d) if d.cache => reply.opened(
                FileHandle(d.fh),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Ok(d) => reply.opened(FileHandle(d.fh), FopenFlags::empty()),
            Err(e) => reply.error(fail("opendir", e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.adopt_dir(ino, fh);
        let entries = match self.core.readdir(fh.0, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(fail("readdir", e)),
        };
        for e in &entries {
            let next = crate::fs::dir_cookie(&e.name);
            if reply.add(INodeNo(e.ino), next, file_type(e.kind), &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.adopt_dir(ino, fh);
        let (entries, dir) = match self.core.readdir(fh.0, offset).and_then(|e| {
            let d = self.core.dir_stat(fh.0)?;
            Ok((e, d))
        }) {
            Ok(v) => v,
            Err(e) => return reply.error(fail("readdirplus", e)),
        };
        for e in &entries {
            let next = crate::fs::dir_cookie(&e.name);
            let dots = e.name == "." || e.name == "..";
            // `.` and `..` are not lookups: the kernel skips them and counts nothing.
            let st = if dots {
                dir
            } else {
                match self.core.readdir_lookup(fh.0, &e.name) {
                    Ok(st) => st,
                    // Gone since the listing (or refused): leave it out.
                    Err(_) => continue,
                }
            };
            if reply.add(INodeNo(st.ino), next, &e.name, self.ttl(&st), &attr(&st), Generation(0)) {
                if !dots && !is_virtual(st.ino) {
                    self.core.forget(st.ino, 1);
                }
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        match self.core.releasedir(fh.0) {
            Ok(()) | Err(Error::BadHandle(_)) => reply.ok(),
            Err(e) => reply.error(fail("releasedir", e)),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.core.fsyncdir(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("fsyncdir", e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.core.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(fail("statfs", e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match self.core.setxattr(ino.0, name, value, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("setxattr", e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.core.getxattr(ino.0, name, size) {
            Ok(Xattr::Size(n)) => reply.size(n),
            Ok(Xattr::Data(d)) => reply.data(&d),
            Err(e) => reply.error(fail("getxattr", e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.core.listxattr(ino.0, size) {
            Ok(Xattr::Size(n)) => reply.size(n),
            Ok(Xattr::Data(d)) => reply.data(&d),
            Err(e) => reply.error(fail("listxattr", e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.core.removexattr(ino.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("removexattr", e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.core.access(ino.0, mask.bits()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("access", e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let resent = req.unique().0 & RESENT != 0;
        let result = match self.reopened(req) {
            Some((o, ino)) => self.core.getattr(ino).map(|st| (st, o)),
            // Its first execution may have made the file just before that server died.
            None if resent && flags & libc::O_EXCL != 0 => {
                // A file it made is still empty (its caller has waited since): a name taken
                // by a file with data is someone else's, never truncated or handed out.
                let flags = flags & !(libc::O_EXCL | libc::O_TRUNC);
                match self.core.create(parent.0, name, mode, umask, flags, caller(req)) {
                    Ok((st, o)) if st.size > 0 => {
                        let _ = self.core.release(o.fh);
                        Err(Error::Io(io::Error::from_raw_os_error(libc::EEXIST)))
                    }
                    r => r,
                }
            }
            None => self.core.create(parent.0, name, mode, umask, flags, caller(req)),
        };
        match result {
            Ok((st, o)) => match o.backing {
                Some(id) => {
                    let b = unsafe { reply.wrap_backing(id) };
                    reply.created_passthrough(
                        &self.ttl,
                        &attr(&st),
                        Generation(0),
                        FileHandle(o.fh),
                        fopen_flags(&o),
                        &b,
                    );
                    let _ = b.into_raw();
                }
                None => reply.created(
                    &self.ttl,
                    &attr(&st),
                    Generation(0),
                    FileHandle(o.fh),
                    fopen_flags(&o),
                ),
            },
            Err(e) => reply.error(fail("create", e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.core.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail("fallocate", e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.core.lseek(fh.0, offset, whence) {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(fail("lseek", e)),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        // qemu probes block-device and XFS ioctls on image files; a regular file on the
        // covered filesystem has none of them either.
        debug!("ioctl {cmd:#x}: not a device");
        reply.error(Errno::ENOTTY);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self.core.copy_file_range(
            fh_in.0,
            offset_in,
            fh_out.0,
            offset_out,
            len,
            flags.bits() as u32,
        ) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(fail("copy_file_range", e)),
        }
    }
}

/// Kernel cache invalidation after the daemon itself removed a name (eviction): the name's
/// entry and the cache directory's cached listing.
/// Sends the kernel its cache invalidations from a thread of its own. A notification waits
/// for the directory's lock in the kernel, which a lookup may hold while it waits for a free
/// FUSE worker: so no worker, and no thread a worker waits on, ever sends one or waits for
/// one to be sent.
pub struct KernelNotifier(std::sync::Mutex<std::sync::mpsc::Sender<(u64, std::ffi::OsString)>>);

impl KernelNotifier {
    pub fn spawn(notifier: fuser::Notifier) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<(u64, std::ffi::OsString)>();
        std::thread::Builder::new()
            .name("notify".into())
            .spawn(move || {
                let root = INodeNo(crate::fs::ROOT);
                for (ino, name) in rx {
                    if let Err(e) = notifier.delete(root, INodeNo(ino), &name) {
                        debug!("notify delete {name:?}: {e}; invalidating the entry instead");
                        if let Err(e) = notifier.inval_entry(root, &name) {
                            debug!("notify inval_entry {name:?}: {e}");
                        }
                    }
                    // The root's cached listing: the kernel drops it with the entry only if
                    // the name has a dentry, which a listing alone does not make. Dropping
                    // the root's pages (and attributes) drops the listing in any case.
                    if let Err(e) = notifier.inval_inode(root, 0, 0) {
                        debug!("notify inval_inode of the cache directory: {e}");
                    }
                }
            })
            .expect("spawn notifier thread");
        KernelNotifier(std::sync::Mutex::new(tx))
    }
}

impl crate::evict::Invalidate for KernelNotifier {
    fn deleted(&self, ino: u64, name: &OsStr) {
        let _ = self.0.lock().map(|tx| tx.send((ino, name.to_os_string())));
    }
}
