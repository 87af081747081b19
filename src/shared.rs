//! Eviction coordinated with the other hosts that share the cache directory (`--shared`),
//! through the cluster filesystem's own lock manager.
//!
//! Every cache file `NAME` has a lock file `.imagecachefs.locks/NAME` on the same filesystem
//! (a hidden directory of the cache directory, reached through the directory fd opened
//! before the mount, never Nova's `locks/`). Open file description (OFD) locks on its byte 0:
//! - a host holds a **shared** lock while the file has any reference on that host: an open
//!   handle, a holder from before the mount, or an instance disk naming it as backing file;
//! - a host evicts only under a non-blocking **exclusive** lock, held across the rename and
//!   unlink; `EAGAIN`/`EACCES` means another host uses the file, any other error "unknown":
//!   the file stays;
//! - a file is evicted only once it has been seen free of locks (every sweep, and at the
//!   eviction) for the quarantine, counted from the first free sighting or from the lock
//!   file's mtime, which each host sets to now when it takes its shared lock and when its
//!   last reference goes: a host that lost its lock in a partition (or with a server killed
//!   and replaced) is not undercut the moment its lease lapses;
//! - the age threshold counts from the last use on any host (that mtime).
//!
//! Lock calls can block for as long as the filesystem wants (a CephFS non-blocking lock was
//! measured to take 30 s): they all run on one thread of their own, the keeper, fed by a
//! queue. The state lock is never held across one, and nothing waits for the keeper without
//! a bound: the bookkeeping only says which files want a shared lock; the first open of a
//! file on this host waits [`ENSURE_TIMEOUT`] at most for its lock (then goes ahead
//! unprotected), an eviction [`GATE_TIMEOUT`] for its exclusive one (then counts it as
//! "unknown"). Lock descriptors are `O_CLOEXEC` and never serve data.
//!
//! The protocol ([`Protocol`]) runs over a [`LockBackend`]: [`OfdLocks`] on the real
//! filesystem, a fake one in the tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use log::{error, info, warn};

use crate::backing;
use crate::cache::Cache;
use crate::sync::Mutex;

/// The hidden directory of lock files in the cache directory.
pub const LOCK_DIR: &str = ".imagecachefs.locks";

/// The lock file probed at start: that OFD locks work on the filesystem.
const PROBE: &str = ".imagecachefs.probe";

/// How long an eviction waits for the keeper's answer before it counts as "unknown".
pub const GATE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the first open of a file on this host waits for its shared lock, at most; past
/// it the open goes ahead unprotected (a VM must start) and the lock is retried.
pub const ENSURE_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a shared lock refused as busy (another host's eviction holds the exclusive
/// lock for its rename and unlink) is tried again while an open waits.
const BUSY_RETRY: Duration = Duration::from_millis(20);

/// How often the shared locks are matched to the references again while the instance disks
/// have not been read (at start, or while they cannot be).
const RESYNC: Duration = Duration::from_secs(1);

/// A non-blocking lock attempt that did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Try {
    Taken,
    /// Someone else holds a conflicting lock (`EAGAIN`/`EACCES`).
    Busy,
}

/// The lock operations on lock files, by cache file name. Every call may block (network
/// filesystem): only the keeper thread calls them.
pub trait LockBackend: Send {
    /// Takes the shared lock on `name`'s lock file (created if missing), non-blocking.
    fn share(&mut self, name: &OsStr) -> io::Result<Try>;
    /// Drops the shared lock on `name`; `used`: first sets the lock file's mtime to now (the
    /// last use, for every host).
    fn unshare(&mut self, name: &OsStr, used: bool) -> io::Result<()>;
    /// Checks and re-asserts a held shared lock: an error means it is lost (NFSv4 `EIO`
    /// after a lease expired, CephFS `EIO` once fenced, GlusterFS `EBADFD` with strict locks).
    fn check(&mut self, name: &OsStr) -> io::Result<()>;
    /// Takes the exclusive lock on `name`'s lock file, non-blocking, on a descriptor of its
    /// own, checking that the lock file is still linked.
    fn exclusive(&mut self, name: &OsStr) -> io::Result<Try>;
    /// Drops the exclusive lock; `remove`: unlinks the lock file first (the file is gone).
    fn unexclusive(&mut self, name: &OsStr, remove: bool) -> io::Result<()>;
    /// Whether a lock on `name`'s lock file is held through another open file description
    /// (`F_OFD_GETLK` with `F_WRLCK`): another host's shared lock, or an evictor's.
    fn held_elsewhere(&mut self, name: &OsStr) -> io::Result<bool>;
    /// The lock file's mtime (the last release on any host); `None`: no lock file yet.
    fn last_release(&mut self, name: &OsStr) -> io::Result<Option<SystemTime>>;
}

/// What [`Keeper::ensure`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ensured {
    /// This host held the shared lock already (the caller checks the file is still there).
    Held,
    /// This host took the shared lock now: another host may have evicted the file just
    /// before, and a client of the shared storage may still show it from its own cache (the
    /// caller asks the storage itself).
    Taken,
    /// Another host held the exclusive lock all along: it is evicting the file.
    Busy,
    /// The lock call failed: the open goes ahead unprotected (logged, retried).
    Failed,
}

/// What the cross-host check says about evicting a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// The exclusive lock is held: evict, then [`Protocol::finish`].
    Go { last_release: Option<SystemTime> },
    /// This host holds its shared lock on the file (a reference here).
    HeldHere,
    /// Another host holds a lock on it.
    OtherHost,
    /// Free of locks, but not for long enough yet.
    Quarantine { until: SystemTime },
    /// A lock call failed or did not answer in time: nobody knows; the file stays.
    Unknown(String),
}

/// What a sweep saw of one file, for status files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// Another host (or an evictor) holds a lock on it; `None`: the test failed.
    pub other_holds: Option<bool>,
    /// When its quarantine ends (it was seen free since then minus the quarantine).
    pub quarantine_ends: Option<SystemTime>,
    /// The lock file's mtime.
    pub last_release: Option<SystemTime>,
}

/// The protocol's bookkeeping on one host, over a lock backend. Takes `now`; no clock.
pub struct Protocol<B: LockBackend> {
    backend: B,
    quarantine: Duration,
    /// Names this host holds its shared lock on.
    held: BTreeSet<OsString>,
    /// Names that want a shared lock this host could not take (an evictor elsewhere held
    /// the exclusive lock, or the lock call failed): tried again at every sync.
    unprotected: BTreeSet<OsString>,
    /// When each file was first seen free of locks, since its last lock sighting.
    free_since: HashMap<OsString, SystemTime>,
    /// Names whose last shared-lock attempt found another host's exclusive lock (an
    /// eviction under way there).
    busy: BTreeSet<OsString>,
    /// Lock calls that failed (a metric).
    pub errors: u64,
}

fn quarantine_end(since: SystemTime, q: Duration) -> SystemTime {
    since.checked_add(q).unwrap_or(since)
}

impl<B: LockBackend> Protocol<B> {
    pub fn new(backend: B, quarantine: Duration) -> Self {
        Protocol {
            backend,
            quarantine,
            held: BTreeSet::new(),
            unprotected: BTreeSet::new(),
            free_since: HashMap::new(),
            busy: BTreeSet::new(),
            errors: 0,
        }
    }

    pub fn held(&self) -> &BTreeSet<OsString> {
        &self.held
    }

    /// Names that want a shared lock this host does not hold.
    pub fn unprotected(&self) -> &BTreeSet<OsString> {
        &self.unprotected
    }

    /// Whether the last attempt at `name`'s shared lock found another host's eviction.
    pub fn is_busy(&self, name: &OsStr) -> bool {
        self.busy.contains(name)
    }

    pub fn backend(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Makes the shared locks held match `want`: takes the new ones, drops (and stamps the
    /// last use of) the ones no longer wanted.
    pub fn sync(&mut self, want: &BTreeSet<OsString>) {
        let gone: Vec<OsString> = self.held.difference(want).cloned().collect();
        for name in gone {
            self.held.remove(&name);
            if let Err(e) = self.backend.unshare(&name, true) {
                self.errors += 1;
                warn!("releasing the shared lock on {}: {e}", shown(&name));
            }
        }
        self.unprotected.retain(|n| want.contains(n));
        self.busy.retain(|n| want.contains(n));
        let new: Vec<OsString> = want.difference(&self.held).cloned().collect();
        for name in new {
            self.take_shared(&name);
        }
    }

    /// Takes the shared lock on `name`, or marks it unprotected (logged once).
    fn take_shared(&mut self, name: &OsStr) {
        // Used here: whatever another host does, its quarantine starts again.
        self.free_since.remove(name);
        match self.backend.share(name) {
            Ok(Try::Taken) => {
                self.busy.remove(name);
                self.held.insert(name.to_owned());
                if self.unprotected.remove(name) {
                    info!("{}: shared lock taken; protected again", shown(name));
                }
            }
            Ok(Try::Busy) => {
                self.busy.insert(name.to_owned());
                // Another host holds the exclusive lock: it is evicting the file this very
                // moment. An open waiting for this lock tries again until the eviction is
                // over, and then finds the file gone; otherwise retried at the next sync.
                if self.unprotected.insert(name.to_owned()) {
                    warn!(
                        "{}: another host holds the exclusive lock (evicting it?); retrying the \
                         shared lock",
                        shown(name)
                    );
                }
            }
            Err(e) => {
                self.errors += 1;
                self.busy.remove(name);
                if self.unprotected.insert(name.to_owned()) {
                    error!(
                        "{}: cannot take the shared lock ({e}): other hosts may evict it while \
                         it is used here; retrying",
                        shown(name)
                    );
                }
            }
        }
    }

    /// Checks every held shared lock; a lost one is re-taken at once (or left unprotected,
    /// and retried at the next sync).
    pub fn heal(&mut self) {
        let held: Vec<OsString> = self.held.iter().cloned().collect();
        for name in held {
            if let Err(e) = self.backend.check(&name) {
                self.errors += 1;
                error!(
                    "{}: the shared lock was lost ({e}); taking it again (if another host \
                     evicted the file meanwhile, the VMs using it here will fail)",
                    shown(&name)
                );
                self.held.remove(&name);
                let _ = self.backend.unshare(&name, false);
                self.take_shared(&name);
            }
        }
    }

    /// Looks at `names` (every cache file known here): a lock seen, or a use here, resets a
    /// file's quarantine; a file seen free starts one. A failed test changes neither.
    pub fn sweep(&mut self, names: &[OsString], now: SystemTime) -> BTreeMap<OsString, Seen> {
        let mut out = BTreeMap::new();
        for name in names {
            let mut seen = Seen::default();
            if self.held.contains(name) {
                // Used here: no quarantine runs; another host may hold it as well.
                self.free_since.remove(name);
                seen.other_holds = self.backend.held_elsewhere(name).ok();
            } else {
                match self.backend.held_elsewhere(name) {
                    Ok(true) => {
                        self.free_since.remove(name);
                        seen.other_holds = Some(true);
                    }
                    Ok(false) => {
                        seen.other_holds = Some(false);
                        self.free_since.entry(name.clone()).or_insert(now);
                    }
                    Err(e) => {
                        self.errors += 1;
                        log::debug!("testing the lock of {}: {e}", shown(name));
                    }
                }
            }
            if let Ok(m) = self.backend.last_release(name) {
                seen.last_release = m;
                self.note_release(name, m);
            }
            seen.quarantine_ends =
                self.free_since.get(name).map(|&s| quarantine_end(s, self.quarantine));
            out.insert(name.clone(), seen);
        }
        self.free_since.retain(|n, _| out.contains_key(n));
        out
    }

    /// A release on any host after a file's first free sighting restarts its quarantine
    /// from that release.
    fn note_release(&mut self, name: &OsStr, last_release: Option<SystemTime>) {
        if let (Some(since), Some(m)) = (self.free_since.get_mut(name), last_release) {
            if m > *since {
                *since = m;
            }
        }
    }

    /// The cross-host check before an eviction. On [`Gate::Go`] the exclusive lock is held
    /// until [`Protocol::finish`].
    pub fn gate(&mut self, name: &OsStr, now: SystemTime) -> Gate {
        if self.held.contains(name) {
            return Gate::HeldHere;
        }
        match self.backend.exclusive(name) {
            Ok(Try::Busy) => {
                self.free_since.remove(name);
                Gate::OtherHost
            }
            Err(e) => {
                self.errors += 1;
                Gate::Unknown(format!("exclusive lock: {e}"))
            }
            Ok(Try::Taken) => {
                let last_release = match self.backend.last_release(name) {
                    Ok(m) => m,
                    Err(e) => {
                        self.errors += 1;
                        self.release_exclusive(name, false);
                        return Gate::Unknown(format!("lock file: {e}"));
                    }
                };
                self.free_since.entry(name.to_owned()).or_insert(now);
                self.note_release(name, last_release);
                let until = quarantine_end(self.free_since[name], self.quarantine);
                if now < until {
                    self.release_exclusive(name, false);
                    return Gate::Quarantine { until };
                }
                Gate::Go { last_release }
            }
        }
    }

    /// Ends an eviction's exclusive lock; `removed`: the file is gone, and so goes its lock
    /// file. Harmless when no exclusive lock is held.
    pub fn finish(&mut self, name: &OsStr, removed: bool) {
        if removed {
            self.free_since.remove(name);
        }
        self.release_exclusive(name, removed);
    }

    fn release_exclusive(&mut self, name: &OsStr, remove: bool) {
        if let Err(e) = self.backend.unexclusive(name, remove) {
            self.errors += 1;
            warn!("releasing the exclusive lock on {}: {e}", shown(name));
        }
    }
}

fn shown(name: &OsStr) -> String {
    crate::text::escape(name.as_encoded_bytes())
}

// ---------------------------------------------------------------------------------------
// The real backend: OFD locks on lock files in the covered directory.

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn flock(kind: libc::c_short) -> libc::flock {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 1;
    fl
}

/// `F_OFD_SETLK` on byte 0 (`F_RDLCK`, `F_WRLCK` or `F_UNLCK`), non-blocking.
fn ofd_set(fd: BorrowedFd<'_>, kind: libc::c_short) -> io::Result<Try> {
    let fl = flock(kind);
    match cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) }) {
        Ok(_) => Ok(Try::Taken),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => Ok(Try::Busy),
        Err(e) => Err(e),
    }
}

/// `F_OFD_GETLK` for a write lock on byte 0: whether any other open file description holds
/// a lock there.
fn ofd_test(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short);
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) })?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn linked(file: &File) -> io::Result<()> {
    if backing::stat(file.as_fd())?.nlink == 0 {
        return Err(io::Error::new(io::ErrorKind::NotFound, "lock file removed meanwhile"));
    }
    Ok(())
}

/// OFD locks on `.imagecachefs.locks/NAME`, one descriptor per held lock.
pub struct OfdLocks {
    /// The covered root, to find the lock directory again if it is removed or replaced.
    root: OwnedFd,
    dir: OwnedFd,
    shared: HashMap<OsString, File>,
    exclusive: HashMap<OsString, File>,
}

impl OfdLocks {
    /// Opens (creating it if needed) the lock directory under the covered root `root`.
    pub fn open(root: BorrowedFd<'_>) -> io::Result<Self> {
        Ok(OfdLocks {
            root: root.try_clone_to_owned()?,
            dir: lock_dir(root)?,
            shared: HashMap::new(),
            exclusive: HashMap::new(),
        })
    }

    /// The lock directory, opened again (made again if missing) when the one held was
    /// removed or replaced by hand: otherwise this host would lock files in a directory no
    /// other host sees, and they would evict what it uses.
    fn dir(&mut self) -> io::Result<BorrowedFd<'_>> {
        let held = backing::stat(self.dir.as_fd())?;
        let current = match backing::open_path_at(self.root.as_fd(), OsStr::new(LOCK_DIR)) {
            Ok(fd) => Some(backing::stat(fd.as_fd())?),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        if current.is_none_or(|c| (c.dev, c.ino) != (held.dev, held.ino)) {
            warn!("{LOCK_DIR} was removed or replaced: using the one in the cache directory now");
            self.dir = lock_dir(self.root.as_fd())?;
        }
        Ok(self.dir.as_fd())
    }

    /// Opens `name`'s lock file, creating it with the epoch as mtime: its mtime is the last
    /// release on any host, and a creation is no use. Never blocks on something other than
    /// a regular file (a FIFO put there by hand): that is an error.
    fn open_lock(&mut self, name: &OsStr) -> io::Result<File> {
        let dir = self.dir()?;
        // A lock file unlinked by another host's eviction between our create and our open
        // is created again (twice at most).
        for _ in 0..3 {
            match backing::create_at(dir, name, libc::O_RDWR | libc::O_EXCL, 0o600) {
                Ok(f) => {
                    let epoch = Some(backing::SetTime::At(SystemTime::UNIX_EPOCH));
                    backing::set_times(f.as_fd(), None, epoch)?;
                    return Ok(f);
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
            match backing::open_at(dir, name, libc::O_RDWR | libc::O_NONBLOCK) {
                Ok(f) => return regular(f),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(io::ErrorKind::NotFound, "lock file removed again and again"))
    }

    /// Opens `name`'s lock file and takes `kind` on it; a lock file unlinked by another
    /// host's eviction between the open and the lock is opened again (twice at most).
    fn lock(&mut self, name: &OsStr, kind: libc::c_short) -> io::Result<(Try, Option<File>)> {
        for _ in 0..3 {
            let file = self.open_lock(name)?;
            match ofd_set(file.as_fd(), kind)? {
                Try::Busy => return Ok((Try::Busy, None)),
                Try::Taken => {}
            }
            if backing::stat(file.as_fd())?.nlink > 0 {
                return Ok((Try::Taken, Some(file)));
            }
        }
        Err(io::Error::new(io::ErrorKind::NotFound, "lock file removed again and again"))
    }
}

/// `file` if it is a regular file; a lock file of any other type was not made by us.
fn regular(file: File) -> io::Result<File> {
    if backing::stat(file.as_fd())?.is_file() {
        Ok(file)
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidData, "lock file is not a regular file"))
    }
}

/// The lock directory under `root`, created if missing (mode 0700), refused if it is not a
/// directory.
fn lock_dir(root: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    match backing::mkdir_at(root, OsStr::new(LOCK_DIR), 0o700) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e),
    }
    let dir = backing::open_path_at(root, OsStr::new(LOCK_DIR))?;
    let st = backing::stat(dir.as_fd())?;
    if !st.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{LOCK_DIR} is not a directory"),
        ));
    }
    // Anyone who can write there can remove, replace or hold lock files: make every open
    // on every host fail, or protect nothing. (Its owner is not checked: root squashed on
    // NFS makes it nobody's.)
    if st.mode & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{LOCK_DIR} is writable by other users (mode {:o}): chmod 700 it",
                st.mode & 0o7777
            ),
        ));
    }
    Ok(dir)
}

impl OfdLocks {
    /// Unlinks `name`'s lock file if it is still `file` (the lock directory may have been
    /// replaced since the lock was taken: never remove another lock file of that name).
    fn remove_lock_file(&mut self, name: &OsStr, file: &File) -> io::Result<()> {
        let ours = backing::stat(file.as_fd())?;
        let dir = self.dir()?;
        let there = backing::stat(backing::open_path_at(dir, name)?.as_fd())?;
        if (there.dev, there.ino) != (ours.dev, ours.ino) {
            return Ok(());
        }
        backing::unlink_at(dir, name, false)
    }
}

impl LockBackend for OfdLocks {
    fn share(&mut self, name: &OsStr) -> io::Result<Try> {
        if self.shared.contains_key(name) {
            return Ok(Try::Taken);
        }
        let (t, file) = self.lock(name, libc::F_RDLCK as libc::c_short)?;
        if let Some(f) = file {
            // A use starts now, for every host: one that saw the file free before (and
            // never saw this lock) counts its quarantine again from here, so losing this
            // lock before its next look (this server killed and replaced) is covered.
            if let Err(e) = backing::set_times(f.as_fd(), None, Some(backing::SetTime::Now)) {
                warn!("{}: stamping the lock file's mtime: {e}", shown(name));
            }
            self.shared.insert(name.to_owned(), f);
        }
        Ok(t)
    }

    fn unshare(&mut self, name: &OsStr, used: bool) -> io::Result<()> {
        let Some(file) = self.shared.remove(name) else { return Ok(()) };
        let stamped = if used {
            backing::set_times(file.as_fd(), None, Some(backing::SetTime::Now))
        } else {
            Ok(())
        };
        let unlocked = ofd_set(file.as_fd(), libc::F_UNLCK as libc::c_short).map(drop);
        drop(file);
        stamped.and(unlocked)
    }

    fn check(&mut self, name: &OsStr) -> io::Result<()> {
        let Some(file) = self.shared.get(name) else {
            return Err(io::Error::new(io::ErrorKind::NotFound, "not held"));
        };
        // A read through the lock's descriptor reaches the server and fails once the lock
        // is lost (NFSv4, CephFS, GlusterFS with strict locks); setting the lock again takes
        // it back where it went silently (GlusterFS without them).
        backing::pread(file, 0, 1)?;
        linked(file)?;
        match ofd_set(file.as_fd(), libc::F_RDLCK as libc::c_short)? {
            Try::Taken => Ok(()),
            Try::Busy => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "another host holds the exclusive lock",
            )),
        }
    }

    fn exclusive(&mut self, name: &OsStr) -> io::Result<Try> {
        let (t, file) = self.lock(name, libc::F_WRLCK as libc::c_short)?;
        if let Some(f) = file {
            self.exclusive.insert(name.to_owned(), f);
        }
        Ok(t)
    }

    fn unexclusive(&mut self, name: &OsStr, remove: bool) -> io::Result<()> {
        let Some(file) = self.exclusive.remove(name) else { return Ok(()) };
        // Unlinked while still locked: a host that opens the old lock file meanwhile finds
        // it unlinked once it has its lock, and opens the new one.
        let removed = if remove { self.remove_lock_file(name, &file) } else { Ok(()) };
        let unlocked = ofd_set(file.as_fd(), libc::F_UNLCK as libc::c_short).map(drop);
        drop(file);
        removed.and(unlocked)
    }

    fn held_elsewhere(&mut self, name: &OsStr) -> io::Result<bool> {
        // Through the description holding this host's lock, which never conflicts with it.
        if let Some(file) = self.shared.get(name) {
            return ofd_test(file.as_fd());
        }
        let dir = self.dir()?;
        let file = match backing::open_at(dir, name, libc::O_RDONLY | libc::O_NONBLOCK) {
            Ok(f) => regular(f)?,
            // No lock file: nobody has ever locked it.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
            Err(e) => return Err(e),
        };
        ofd_test(file.as_fd())
    }

    fn last_release(&mut self, name: &OsStr) -> io::Result<Option<SystemTime>> {
        match backing::open_path_at(self.dir()?, name) {
            Ok(fd) => Ok(Some(backing::stat(fd.as_fd())?.mtime)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Start-up checks.

/// Why the lock manager of a mount is local to this host (`--shared` would coordinate
/// nothing), from its filesystem type and its mount options: NFS mounted `nolock`, or with
/// `local_lock=` other than `none`.
pub fn local_only_locks(fstype: &str, options: &str) -> Option<String> {
    if !fstype.starts_with("nfs") {
        return None;
    }
    for opt in options.split(',') {
        if opt == "nolock" {
            return Some("it is mounted with nolock: its locks are local to this host".into());
        }
        if let Some(v) = opt.strip_prefix("local_lock=") {
            if v != "none" {
                return Some(format!(
                    "it is mounted with local_lock={v}: its locks are local to this host"
                ));
            }
        }
    }
    None
}

/// The per-mount and per-superblock options (joined with `,`) of the mount `fd` is on.
fn mount_options(fd: BorrowedFd<'_>) -> Option<String> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    let id = crate::procfs::parse_fdinfo(&info).mnt?;
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    table.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        let f: Vec<&str> = left.split(' ').collect();
        if f.first()?.parse::<u64>().ok()? != id {
            return None;
        }
        let super_opts = right.split(' ').nth(2).unwrap_or("");
        Some(format!("{},{super_opts}", f.get(5).unwrap_or(&"")))
    })
}

/// Checks, before the mount, that `--shared` can work on the covered root `root` of the
/// filesystem `fstype`, on storage detected (or told) as `shared`: the storage is shared,
/// its lock manager is not local only ([`check_options`]), and OFD locks work there (a probe
/// file in the lock directory). Returns the refusal, one line.
pub fn check(
    dir: &std::path::Path,
    shared: Option<&str>,
    fstype: &str,
    root: BorrowedFd<'_>,
) -> Result<(), String> {
    check_options(dir, shared, fstype, root)?;
    probe(root).map_err(|e| {
        format!(
            "--shared: {} ({}): OFD locks do not work there ({e}): hosts cannot coordinate",
            dir.display(),
            shared.unwrap_or_default()
        )
    })
}

/// The part of [`check`] that changes nothing: the storage is shared and its lock manager
/// is not local only (`mount --check`).
pub fn check_options(
    dir: &std::path::Path,
    shared: Option<&str>,
    fstype: &str,
    root: BorrowedFd<'_>,
) -> Result<(), String> {
    let Some(kind) = shared else {
        return Err(format!(
            "--shared: {} is on local storage ({}): no other host shares it (add --storage \
             shared if it is shared all the same)",
            dir.display(),
            if fstype.is_empty() { "unknown type" } else { fstype }
        ));
    };
    if let Some(why) = mount_options(root).and_then(|o| local_only_locks(fstype, &o)) {
        return Err(format!("--shared: {} ({kind}): {why}", dir.display()));
    }
    Ok(())
}

/// Takes and drops a shared and an exclusive OFD lock on a probe file of the lock directory.
fn probe(root: BorrowedFd<'_>) -> io::Result<()> {
    let dir = lock_dir(root)?;
    let file = backing::create_at(dir.as_fd(), OsStr::new(PROBE), libc::O_RDWR, 0o600)?;
    // Busy is fine: another host probing or starting at the same moment.
    ofd_set(file.as_fd(), libc::F_RDLCK as libc::c_short)?;
    ofd_set(file.as_fd(), libc::F_UNLCK as libc::c_short)?;
    ofd_test(file.as_fd())?;
    Ok(())
}

/// `--node-name`, once set at start.
static NODE_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets this host's name (`--node-name`) before the cache is opened; `None` keeps the
/// default.
pub fn set_node_name(name: Option<String>) {
    if let Some(n) = name {
        let _ = NODE_NAME.set(n);
    }
}

/// The node's name for its own files on shared storage: `--node-name`, else
/// `/etc/machine-id`, else the hostname; only `[A-Za-z0-9._-]` kept.
pub fn node_name() -> String {
    if let Some(n) = NODE_NAME.get() {
        return n.clone();
    }
    let id = std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().into())
        })
        .unwrap_or_default();
    let clean: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    if clean.is_empty() || clean == "tmp" {
        "unknown-node".into()
    } else {
        clean
    }
}

// ---------------------------------------------------------------------------------------
// The keeper thread.

enum Job {
    /// The set of files used here may have changed.
    Sync,
    Gate {
        name: OsString,
        now: SystemTime,
        reply: Sender<Gate>,
    },
    Finish {
        name: OsString,
        removed: bool,
    },
    /// An open waits: take the shared lock on `name` now (retrying while another host's
    /// eviction holds the exclusive lock, until `until`) and say whether it is held.
    Ensure {
        name: OsString,
        until: Instant,
        reply: Sender<Ensured>,
    },
}

/// The handle other threads have on the keeper: a queue in, and what its last sweep saw.
pub struct Keeper {
    jobs: Mutex<Sender<Job>>,
    /// A sync is queued and not yet taken: at most one waits in the queue.
    sync_queued: std::sync::atomic::AtomicBool,
    seen: Mutex<BTreeMap<OsString, Seen>>,
    /// Whether a sweep has run (before it, other hosts' locks are unknown).
    swept: std::sync::atomic::AtomicBool,
    errors: std::sync::atomic::AtomicU64,
    quarantine: Duration,
    /// How long an eviction waits for an answer ([`GATE_TIMEOUT`]).
    timeout: Duration,
    /// The names this host holds its shared lock on, as of the keeper's last change.
    held: Mutex<BTreeSet<OsString>>,
    /// How many files used here have no shared lock (could not be taken).
    unprotected: std::sync::atomic::AtomicU64,
}

impl Keeper {
    fn new(jobs: Sender<Job>, quarantine: Duration, timeout: Duration) -> Self {
        Keeper {
            jobs: Mutex::new(jobs),
            sync_queued: Default::default(),
            seen: Mutex::new(BTreeMap::new()),
            swept: Default::default(),
            errors: Default::default(),
            quarantine,
            timeout,
            held: Mutex::new(BTreeSet::new()),
            unprotected: Default::default(),
        }
    }

    /// Before an open of `name` is answered (its reference registered already): makes sure
    /// this host holds the shared lock, waiting [`ENSURE_TIMEOUT`] at most. `None`: no
    /// answer in time.
    pub fn ensure(&self, name: &OsStr) -> Option<Ensured> {
        if self.held.lock().contains(name) {
            return Some(Ensured::Held);
        }
        let (tx, rx) = mpsc::channel();
        let until = Instant::now() + ENSURE_TIMEOUT;
        let job = Job::Ensure { name: name.to_owned(), until, reply: tx };
        self.jobs.lock().send(job).ok()?;
        rx.recv_timeout(ENSURE_TIMEOUT).ok()
    }

    /// Asks for the shared locks to follow the references (never waits).
    pub fn sync(&self) {
        if !self.sync_queued.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let _ = self.jobs.lock().send(Job::Sync);
        }
    }

    /// The cross-host check before evicting `name`, waited for [`GATE_TIMEOUT`] at most. On
    /// [`Gate::Go`] the caller must [`Keeper::finish`].
    pub fn gate(&self, name: &OsStr, now: SystemTime) -> Gate {
        let (tx, rx) = mpsc::channel();
        if self.jobs.lock().send(Job::Gate { name: name.to_owned(), now, reply: tx }).is_err() {
            return Gate::Unknown("the lock keeper is gone".into());
        }
        match rx.recv_timeout(self.timeout) {
            Ok(g) => g,
            Err(_) => {
                // If the answer comes late with the lock taken, this releases it: the keeper
                // takes jobs in order.
                self.finish(name, false);
                Gate::Unknown(format!("the lock call did not answer within {:?}", self.timeout))
            }
        }
    }

    /// Ends an eviction's exclusive lock (never waits).
    pub fn finish(&self, name: &OsStr, removed: bool) {
        let _ = self.jobs.lock().send(Job::Finish { name: name.to_owned(), removed });
    }

    /// What the last sweep saw of `name`.
    pub fn seen(&self, name: &OsStr) -> Option<Seen> {
        if !self.swept.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        Some(self.seen.lock().get(name).copied().unwrap_or_default())
    }

    /// Lock calls that failed since the start.
    pub fn errors(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Files used here whose shared lock could not be taken (other hosts may evict them).
    pub fn unprotected(&self) -> u64 {
        self.unprotected.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn quarantine(&self) -> Duration {
        self.quarantine
    }
}

/// The `--shared` lines of `images/NAME`: whether another host holds the file's lock, and
/// when its quarantine ends, as the keeper's last sweep saw them.
pub fn status_lines(keeper: &Keeper, name: &OsStr) -> String {
    let seen = keeper.seen(name);
    let holds = match seen.and_then(|s| s.other_holds) {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    };
    let ends = match seen {
        None => "unknown".into(),
        Some(s) => s.quarantine_ends.map_or("-".into(), crate::clock::rfc3339),
    };
    format!("other_node_holds: {holds}\nquarantine_ends: {ends}\n")
}

/// How often the keeper checks its locks and looks at the other hosts' (a tenth of the
/// quarantine, between 1 and 30 s): a lock held elsewhere for less than this between two
/// sweeps is caught by the lock file's mtime its release sets.
fn sweep_every(quarantine: Duration) -> Duration {
    (quarantine / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// Starts the keeper for `cache` with the quarantine `q` (seconds), if `--shared` is on,
/// and hands it to the cache. The lock directory was probed by [`check`].
pub fn start(cache: &Arc<Cache>, quarantine: Option<u64>) -> Result<(), String> {
    let Some(q) = quarantine else { return Ok(()) };
    let backend = OfdLocks::open(cache.root()).map_err(|e| format!("{LOCK_DIR}: {e}"))?;
    start_with(cache, Duration::from_secs(q), backend, GATE_TIMEOUT)?;
    info!(
        "--shared: eviction coordinated with the other hosts through {LOCK_DIR}/ (quarantine \
         {q} s)"
    );
    Ok(())
}

/// Starts the keeper over any lock backend (tests: [`fake`]), evictions waiting `timeout`
/// for its answers.
pub fn start_with<B: LockBackend + 'static>(
    cache: &Arc<Cache>,
    quarantine: Duration,
    backend: B,
    timeout: Duration,
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    let keeper = Arc::new(Keeper::new(tx, quarantine, timeout));
    cache.set_keeper(keeper.clone());
    let weak = Arc::downgrade(cache);
    let protocol = Protocol::new(backend, quarantine);
    std::thread::Builder::new()
        .name("locks".into())
        .spawn(move || run(protocol, rx, keeper, weak))
        .map_err(|e| format!("starting the lock keeper: {e}"))?;
    Ok(())
}

/// The names used on this host (open handles, holders from before the mount, pins, instance
/// disks' backing files as last read), given the locks `held` now. Memory only. While the
/// instance disks could not be read, the locks held stay held: a stopped VM's base keeps
/// its protection through a hung instances directory.
fn wanted(cache: &Cache, held: &BTreeSet<OsString>) -> BTreeSet<OsString> {
    let referenced = cache.referenced_if_known();
    let state = cache.state.lock();
    let mut want: BTreeSet<OsString> = state
        .images()
        .filter(|i| i.refs() > 0 || i.pinned)
        .filter_map(|i| i.name.clone())
        .chain(
            referenced
                .iter()
                .flat_map(|r| r.iter())
                .filter(|n| state.by_name(n).is_some())
                .cloned(),
        )
        .collect();
    if referenced.is_none() {
        want.extend(held.iter().filter(|n| state.by_name(n).is_some()).cloned());
    }
    want
}

fn run<B: LockBackend>(
    mut p: Protocol<B>,
    rx: Receiver<Job>,
    keeper: Arc<Keeper>,
    cache: Weak<Cache>,
) {
    let every = sweep_every(p.quarantine);
    let mut next = Instant::now();
    // While the instance disks are unknown, locks are kept as they were: looked at again
    // this often until a read comes in (memory only, unless something changed).
    let mut resync: Option<Instant> = None;
    loop {
        let wake = resync.map_or(next, |r| r.min(next));
        let job = match rx.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(j) => Some(j),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(cache) = cache.upgrade() else { return };
        if job.is_none() && resync.is_some_and(|r| r <= Instant::now()) {
            let want = wanted(&cache, p.held());
            p.sync(&want);
        }
        match job {
            Some(Job::Sync) => {
                keeper.sync_queued.store(false, std::sync::atomic::Ordering::Release);
                let want = wanted(&cache, p.held());
                p.sync(&want);
            }
            Some(Job::Gate { name, now, reply }) => {
                // The freshest picture of what is used here first: a reference just dropped
                // must not read as this host's lock.
                let want = wanted(&cache, p.held());
                p.sync(&want);
                let g = p.gate(&name, now);
                let taken = matches!(g, Gate::Go { .. });
                if reply.send(g).is_err() && taken {
                    p.finish(&name, false);
                }
            }
            Some(Job::Finish { name, removed }) => p.finish(&name, removed),
            Some(Job::Ensure { name, until, reply }) => {
                let want = wanted(&cache, p.held());
                p.sync(&want);
                // Busy: another host's eviction is between its checks and its unlink; it
                // takes milliseconds.
                while want.contains(&name)
                    && !p.held().contains(&name)
                    && p.unprotected().contains(&name)
                    && Instant::now() + BUSY_RETRY < until
                {
                    std::thread::sleep(BUSY_RETRY);
                    p.sync(&want);
                }
                *keeper.held.lock() = p.held().clone();
                let answer = if p.held().contains(&name) {
                    Ensured::Taken
                } else if p.is_busy(&name) {
                    Ensured::Busy
                } else {
                    Ensured::Failed
                };
                let _ = reply.send(answer);
            }
            None => {}
        }
        // Jobs arriving without a pause must not starve the sweep.
        if Instant::now() >= next {
            {
                // Ask for a fresh read of the instance disks for the next round (not waited
                // for: the disks may hang).
                cache.request_disks();
                let want = wanted(&cache, p.held());
                p.sync(&want);
                p.heal();
                let names: Vec<OsString> = cache.names().into_iter().map(|(n, _)| n).collect();
                let now = cache.now();
                let seen = p.sweep(&names, now);
                for (name, s) in &seen {
                    if let Some(m) = s.last_release {
                        cache.used_elsewhere(name, m);
                    }
                }
                *keeper.seen.lock() = seen;
                keeper.swept.store(true, std::sync::atomic::Ordering::Relaxed);
                next = Instant::now() + every;
            }
        }
        resync = (cache.referenced_if_known().is_none() && !p.held().is_empty())
            .then(|| Instant::now() + RESYNC);
        *keeper.held.lock() = p.held().clone();
        keeper.errors.store(p.errors, std::sync::atomic::Ordering::Relaxed);
        let unprotected = p.unprotected().len() as u64;
        keeper.unprotected.store(unprotected, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A lock table shared by fake hosts, with errors and stalls to inject: the lock manager of
/// a cluster filesystem, for tests of the protocol and of the evictor over it.
pub mod fake {
    use super::*;

    fn errno(e: i32) -> io::Error {
        io::Error::from_raw_os_error(e)
    }

    /// One cluster's lock table, shared by the fake hosts.
    pub struct Table {
        /// Per lock file: (host, exclusive) of each lock held.
        pub locks: HashMap<OsString, Vec<(usize, bool)>>,
        /// Lock files and their mtimes.
        pub files: HashMap<OsString, SystemTime>,
        /// The clock the fake filesystem stamps mtimes with.
        pub now: SystemTime,
    }

    /// Errors to inject into one host's calls (an errno, for every call of that kind).
    #[derive(Default)]
    pub struct Faults {
        pub share: Option<i32>,
        pub check: Option<i32>,
        pub exclusive: Option<i32>,
        /// `last_release` fails: an error right after the exclusive lock was taken.
        pub stat: Option<i32>,
        pub test: Option<i32>,
        /// The exclusive lock call stalls this long first (a filesystem that hangs).
        pub stall: Option<Duration>,
        /// Shared lock calls made (counted, not injected).
        pub shares: u64,
    }

    /// One host's view of the table.
    pub struct Fake {
        host: usize,
        table: Arc<Mutex<Table>>,
        faults: Arc<Mutex<Faults>>,
    }

    impl Fake {
        fn conflicts(&self, name: &OsStr, exclusive: bool) -> bool {
            let t = self.table.lock();
            t.locks
                .get(name)
                .is_some_and(|l| l.iter().any(|&(h, x)| h != self.host && (x || exclusive)))
        }
        fn take(&self, name: &OsStr, exclusive: bool) -> Try {
            if self.conflicts(name, exclusive) {
                return Try::Busy;
            }
            let mut t = self.table.lock();
            t.files.entry(name.to_owned()).or_insert(SystemTime::UNIX_EPOCH);
            let l = t.locks.entry(name.to_owned()).or_default();
            l.retain(|&(h, x)| !(h == self.host && x == exclusive));
            l.push((self.host, exclusive));
            Try::Taken
        }
        fn drop_lock(&self, name: &OsStr, exclusive: bool) {
            let mut t = self.table.lock();
            if let Some(l) = t.locks.get_mut(name) {
                l.retain(|&(h, x)| !(h == self.host && x == exclusive));
            }
        }
    }

    impl LockBackend for Fake {
        fn share(&mut self, name: &OsStr) -> io::Result<Try> {
            self.faults.lock().shares += 1;
            if let Some(e) = self.faults.lock().share {
                return Err(errno(e));
            }
            let taken = self.take(name, false);
            if taken == Try::Taken {
                let mut t = self.table.lock();
                let now = t.now;
                t.files.insert(name.to_owned(), now);
            }
            Ok(taken)
        }
        fn unshare(&mut self, name: &OsStr, used: bool) -> io::Result<()> {
            self.drop_lock(name, false);
            if used {
                let mut t = self.table.lock();
                let now = t.now;
                t.files.insert(name.to_owned(), now);
            }
            Ok(())
        }
        fn check(&mut self, name: &OsStr) -> io::Result<()> {
            if let Some(e) = self.faults.lock().check {
                return Err(errno(e));
            }
            let t = self.table.lock();
            let held = t.locks.get(name).is_some_and(|l| l.contains(&(self.host, false)));
            // What GlusterFS with strict locks says of a lock lost over a reconnect.
            if held {
                Ok(())
            } else {
                Err(errno(libc::EBADFD))
            }
        }
        fn exclusive(&mut self, name: &OsStr) -> io::Result<Try> {
            let stall = self.faults.lock().stall;
            if let Some(d) = stall {
                std::thread::sleep(d);
            }
            if let Some(e) = self.faults.lock().exclusive {
                return match e {
                    libc::EAGAIN | libc::EACCES => Ok(Try::Busy),
                    e => Err(errno(e)),
                };
            }
            Ok(self.take(name, true))
        }
        fn unexclusive(&mut self, name: &OsStr, remove: bool) -> io::Result<()> {
            if remove {
                self.table.lock().files.remove(name);
            }
            self.drop_lock(name, true);
            Ok(())
        }
        fn held_elsewhere(&mut self, name: &OsStr) -> io::Result<bool> {
            if let Some(e) = self.faults.lock().test {
                return Err(errno(e));
            }
            Ok(self.conflicts(name, true))
        }
        fn last_release(&mut self, name: &OsStr) -> io::Result<Option<SystemTime>> {
            if let Some(e) = self.faults.lock().stat {
                return Err(errno(e));
            }
            Ok(self.table.lock().files.get(name).copied())
        }
    }

    /// The cluster: its table, and each host's faults (by host number).
    pub struct Cluster {
        pub table: Arc<Mutex<Table>>,
        pub faults: Vec<Arc<Mutex<Faults>>>,
    }

    impl Cluster {
        /// A cluster whose filesystem clock starts at `now`.
        pub fn new(now: SystemTime) -> Self {
            Cluster {
                table: Arc::new(Mutex::new(Table {
                    now,
                    locks: HashMap::new(),
                    files: HashMap::new(),
                })),
                faults: vec![],
            }
        }
        /// A new host's backend.
        pub fn backend(&mut self) -> Fake {
            let faults = Arc::new(Mutex::new(Faults::default()));
            self.faults.push(faults.clone());
            let host = self.faults.len() - 1;
            Fake { host, table: self.table.clone(), faults }
        }
        /// A new host's protocol, with the quarantine `q`.
        pub fn host(&mut self, q: Duration) -> Protocol<Fake> {
            Protocol::new(self.backend(), q)
        }

        /// The same, through a shared reference (the table is behind its lock).
        pub fn host_with(&self, q: Duration) -> Protocol<Fake> {
            let host = self.faults.len() + 1000;
            let faults = Arc::new(Mutex::new(Faults::default()));
            Protocol::new(Fake { host, table: self.table.clone(), faults }, q)
        }
        /// Sets the filesystem's clock (the mtimes releases stamp).
        pub fn at(&self, now: SystemTime) {
            self.table.lock().now = now;
        }
        /// Whether anyone holds an exclusive lock on `name`.
        pub fn exclusive_held(&self, name: &str) -> bool {
            self.table.lock().locks.get(OsStr::new(name)).is_some_and(|l| l.iter().any(|l| l.1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::Cluster;
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn n(s: &str) -> OsString {
        OsString::from(s)
    }

    const Q: Duration = Duration::from_secs(900);

    fn set(names: &[&str]) -> BTreeSet<OsString> {
        names.iter().map(|s| n(s)).collect()
    }

    #[test]
    fn a_host_using_a_file_keeps_it_from_the_others_until_the_quarantine_passes() {
        let mut c = Cluster::new(t(0));
        let (mut a, mut b) = (c.host(Q), c.host(Q));
        a.sync(&set(&["x"]));
        assert_eq!(b.gate(OsStr::new("x"), t(10)), Gate::OtherHost);
        assert!(!c.exclusive_held("x"));
        // A's last reference goes at 100: the lock file's mtime says so.
        c.at(t(100));
        a.sync(&set(&[]));
        // Seen free at 200, but last used at 100: the quarantine counts from 200.
        assert_eq!(b.gate(OsStr::new("x"), t(200)), Gate::Quarantine { until: t(200) + Q });
        assert!(!c.exclusive_held("x"), "a refusal keeps no lock");
        let Gate::Go { last_release } = b.gate(OsStr::new("x"), t(200) + Q) else {
            panic!("free for the whole quarantine")
        };
        assert_eq!(last_release, Some(t(100)));
        assert!(c.exclusive_held("x"), "held across the unlink");
        // While B evicts, A cannot take its shared lock: it stays unprotected and retries.
        a.sync(&set(&["x"]));
        assert!(a.unprotected().contains(OsStr::new("x")));
        b.finish(OsStr::new("x"), true);
        assert!(!c.exclusive_held("x"));
        assert!(!c.table.lock().files.contains_key(OsStr::new("x")), "lock file removed");
    }

    #[test]
    fn a_lock_lost_before_another_hosts_next_look_still_restarts_its_quarantine() {
        let mut c = Cluster::new(t(0));
        let (mut a, mut b) = (c.host(Q), c.host(Q));
        let x = [n("x")];
        // B has seen the file free for longer than the quarantine.
        b.sweep(&x, t(0));
        // A opens it, and its server is killed before B looks again: the lock manager
        // drops the dead process's lock, and nothing was released (no stamp at release).
        c.at(t(0) + Q * 2);
        a.sync(&set(&["x"]));
        c.table.lock().locks.clear();
        // B's evictor comes in the gap before A's new server takes the lock again.
        let g = b.gate(OsStr::new("x"), t(1) + Q * 2);
        assert_eq!(g, Gate::Quarantine { until: t(0) + Q * 3 }, "{g:?}");
        assert!(!c.exclusive_held("x"));
    }

    #[test]
    fn this_hosts_own_lock_is_not_another_hosts() {
        let mut c = Cluster::new(t(0));
        let mut a = c.host(Q);
        a.sync(&set(&["x"]));
        assert_eq!(a.gate(OsStr::new("x"), t(0) + Q * 2), Gate::HeldHere);
    }

    #[test]
    fn a_lock_or_a_release_seen_during_the_quarantine_starts_it_again() {
        let mut c = Cluster::new(t(0));
        let (mut a, mut b) = (c.host(Q), c.host(Q));
        let x = [n("x")];
        assert_eq!(b.sweep(&x, t(0))[&x[0]].quarantine_ends, Some(t(0) + Q));
        // A uses it for a while: B's sweep sees the lock.
        c.at(t(10));
        a.sync(&set(&["x"]));
        let seen = b.sweep(&x, t(20));
        assert_eq!((seen[&x[0]].other_holds, seen[&x[0]].quarantine_ends), (Some(true), None));
        c.at(t(30));
        a.sync(&set(&[]));
        assert_eq!(b.sweep(&x, t(40))[&x[0]].quarantine_ends, Some(t(40) + Q));
        // A short use between two sweeps: only the release's mtime tells.
        c.at(t(50));
        a.sync(&set(&["x"]));
        a.sync(&set(&[]));
        assert_eq!(b.gate(OsStr::new("x"), t(40) + Q), Gate::Quarantine { until: t(50) + Q });
        assert!(matches!(b.gate(OsStr::new("x"), t(50) + Q), Gate::Go { .. }));
    }

    #[test]
    fn busy_means_another_host_every_other_error_means_unknown_and_nothing_goes() {
        for (e, want_other) in [
            (libc::EAGAIN, true),
            (libc::EACCES, true),
            (libc::ENOLCK, false),
            (libc::EIO, false),
            (libc::EINTR, false),
            (libc::ESTALE, false),
            (libc::ETIMEDOUT, false),
        ] {
            let mut c = Cluster::new(t(0));
            let mut b = c.host(Q);
            // Free long enough: only the error can stop it.
            b.sweep(&[n("x")], t(0));
            c.faults[0].lock().exclusive = Some(e);
            let g = b.gate(OsStr::new("x"), t(0) + Q * 2);
            if want_other {
                assert_eq!(g, Gate::OtherHost, "errno {e}");
                // A lock sighting: the quarantine starts again.
                c.faults[0].lock().exclusive = None;
                assert!(matches!(b.gate(OsStr::new("x"), t(0) + Q * 2), Gate::Quarantine { .. }));
            } else {
                assert!(matches!(g, Gate::Unknown(_)), "errno {e}: {g:?}");
                // An unknown neither starts nor ends a quarantine.
                c.faults[0].lock().exclusive = None;
                assert!(
                    matches!(b.gate(OsStr::new("x"), t(0) + Q * 2), Gate::Go { .. }),
                    "errno {e}"
                );
            }
        }
    }

    #[test]
    fn an_error_right_after_the_exclusive_lock_releases_it_and_keeps_the_file() {
        let mut c = Cluster::new(t(0));
        let mut b = c.host(Q);
        b.sweep(&[n("x")], t(0));
        c.faults[0].lock().stat = Some(libc::EIO);
        let g = b.gate(OsStr::new("x"), t(0) + Q * 2);
        assert!(matches!(&g, Gate::Unknown(w) if w.contains("lock file")), "{g:?}");
        assert!(!c.exclusive_held("x"), "the exclusive lock is not left behind");
        assert!(b.errors > 0);
    }

    #[test]
    fn a_failed_test_neither_starts_nor_ends_a_quarantine() {
        let mut c = Cluster::new(t(0));
        let mut b = c.host(Q);
        c.faults[0].lock().test = Some(libc::ENOLCK);
        let seen = b.sweep(&[n("x")], t(0));
        assert_eq!((seen[&n("x")].other_holds, seen[&n("x")].quarantine_ends), (None, None));
        c.faults[0].lock().test = None;
        b.sweep(&[n("x")], t(10));
        let epoch = Some(SystemTime::UNIX_EPOCH);
        assert_eq!(b.gate(OsStr::new("x"), t(10) + Q), Gate::Go { last_release: epoch });
    }

    #[test]
    fn a_lock_that_cannot_be_taken_leaves_the_file_unprotected_and_is_retried() {
        let mut c = Cluster::new(t(0));
        let mut a = c.host(Q);
        c.faults[0].lock().share = Some(libc::ENOLCK);
        a.sync(&set(&["x"]));
        assert!(a.unprotected().contains(OsStr::new("x")) && a.held().is_empty());
        c.faults[0].lock().share = None;
        a.sync(&set(&["x"]));
        assert!(a.unprotected().is_empty() && a.held().contains(OsStr::new("x")));
    }

    #[test]
    fn a_lock_lost_over_a_reconnect_is_taken_again_at_the_next_heal() {
        let mut c = Cluster::new(t(0));
        let (mut a, mut b) = (c.host(Q), c.host(Q));
        a.sync(&set(&["x"]));
        // GlusterFS without strict locks: the brick forgot A's lock, A's fd still works.
        c.table.lock().locks.clear();
        b.sweep(&[n("x")], t(0));
        a.heal();
        assert!(a.held().contains(OsStr::new("x")));
        assert_eq!(b.gate(OsStr::new("x"), t(0) + Q * 2), Gate::OtherHost);
        // NFSv4 after a lease expired: EIO through the lock's descriptor; taken again too.
        c.faults[0].lock().check = Some(libc::EIO);
        a.heal();
        c.faults[0].lock().check = None;
        assert!(a.held().contains(OsStr::new("x")));
        assert_eq!(b.gate(OsStr::new("x"), t(0) + Q * 3), Gate::OtherHost);
    }

    #[test]
    fn an_eviction_whose_answer_comes_too_late_counts_as_unknown_and_its_lock_is_released() {
        let (tx, rx) = mpsc::channel();
        let keeper = Keeper::new(tx, Q, Duration::from_millis(50));
        let started = Instant::now();
        // Nobody answers: the keeper is stuck in a lock call.
        let g = keeper.gate(OsStr::new("x"), t(0));
        assert!(matches!(&g, Gate::Unknown(w) if w.contains("did not answer")), "{g:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Queued behind it: the release of whatever the late answer took.
        assert!(matches!(rx.try_recv(), Ok(Job::Gate { .. })));
        assert!(matches!(rx.try_recv(), Ok(Job::Finish { removed: false, .. })));
    }

    #[test]
    fn each_host_has_its_own_reserved_state_file() {
        let node = node_name();
        assert!(!node.is_empty() && node != "tmp");
        assert!(node.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c)), "{node}");
        let shared = crate::state::Policy { shared: Some("nfs4".into()), ..Default::default() };
        let (file, tmp) = crate::cache::state_names(&shared);
        assert_eq!(file, OsString::from(format!(".imagecachefs.state.{node}")));
        assert_ne!(file, tmp);
        for n in [&file, &tmp] {
            assert!(crate::cache::is_own_file(n), "{n:?} is reserved");
        }
        let local = crate::cache::state_names(&Default::default());
        assert_eq!(local.0, OsString::from(crate::cache::STATE_FILE));
        assert!(crate::cache::is_own_file(OsStr::new(LOCK_DIR)));
    }

    #[test]
    fn local_only_lock_managers_are_recognised() {
        assert!(local_only_locks("nfs", "rw,relatime,vers=3,nolock,proto=tcp").is_some());
        assert!(local_only_locks("nfs4", "rw,vers=4.2,local_lock=flock").is_some());
        assert!(local_only_locks("nfs4", "rw,vers=4.2,local_lock=all").is_some());
        assert!(local_only_locks("nfs4", "rw,vers=4.2,local_lock=none").is_none());
        assert!(local_only_locks("nfs", "rw,vers=3,lock").is_none());
        assert!(local_only_locks("fuse.glusterfs", "rw,nolock").is_none(), "only NFS has it");
    }

    #[test]
    fn ofd_locks_of_two_descriptions_conflict_like_two_hosts() {
        let dir = tempfile::Builder::new().prefix("icfs-test-ofd").tempdir().unwrap();
        let root = backing::open_dir_path(
            &std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap(),
        )
        .unwrap();
        probe(root.as_fd()).unwrap();
        let (mut a, mut b) =
            (OfdLocks::open(root.as_fd()).unwrap(), OfdLocks::open(root.as_fd()).unwrap());
        let x = OsStr::new("x");
        assert!(!b.held_elsewhere(x).unwrap(), "no lock file yet");
        let z = OsStr::new("z");
        assert_eq!(b.exclusive(z).unwrap(), Try::Taken);
        let created = b.last_release(z).unwrap();
        assert_eq!(created, Some(SystemTime::UNIX_EPOCH), "a creation is no use");
        b.unexclusive(z, true).unwrap();
        let before = SystemTime::now() - Duration::from_secs(1);
        assert_eq!(a.share(x).unwrap(), Try::Taken);
        assert!(!a.held_elsewhere(x).unwrap(), "its own lock is nobody else's");
        let taken = b.last_release(x).unwrap().unwrap();
        assert!(taken >= before, "a shared lock taken is a use: {taken:?}");
        assert!(b.held_elsewhere(x).unwrap());
        assert!(!a.held_elsewhere(OsStr::new("y")).unwrap());
        assert_eq!(b.exclusive(x).unwrap(), Try::Busy);
        a.check(x).unwrap();
        a.unshare(x, true).unwrap();
        assert!(b.last_release(x).unwrap().is_some());
        assert_eq!(b.exclusive(x).unwrap(), Try::Taken);
        assert_eq!(a.share(x).unwrap(), Try::Busy, "an evictor holds it");
        b.unexclusive(x, true).unwrap();
        assert_eq!(b.last_release(x).unwrap(), None, "removed with the file");
    }
}
