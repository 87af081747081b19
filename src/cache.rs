//! The cache service: the bookkeeping (`state`) behind one lock, with what it needs from the
//! outside world — a clock, /proc for holders, the instance disks for backing-file names,
//! and the persistent state file in the covered directory. `fs` calls it on every event that
//! matters (names appearing and going, opens, releases, touches) and for the status files.
//!
//! The lock is never held across a syscall on a large file. State-file writes happen on the
//! persister thread, at most once a second whatever causes them (control commands, which
//! only root can send, write before they answer); status files say whether what they show
//! is on disk yet. A status file is rendered once per state and shared by every handle that
//! opens it meanwhile, with a cap on what non-root readers can keep alive together.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Weak};
use std::time::SystemTime;
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::backing::{self, Stat};
use crate::checksums::next_check;
use crate::clock::Clock;
use crate::config::MinFree;
use crate::evict::Invalidate;
use crate::procfs::{Holder, Incomplete, ProcRoot, Wanted};
use crate::state::{CacheState, Policy, RefChange, RefEffect, Stamp, Verified};
pub use crate::status::Reader;
use crate::status::{self, Counters, Persisted, Space, View};
use crate::sync::{Condvar, Mutex};

/// Deadlines (eviction or checksum), earliest first, at most one per inode: however often a
/// file is rescheduled (every release does), the queue holds one entry for it, the earliest
/// asked for. The consumer re-checks the file when it is due and queues its next deadline.
#[derive(Debug, Default)]
pub struct Queue {
    by_time: BTreeSet<(SystemTime, u64)>,
    by_ino: HashMap<u64, SystemTime>,
}

impl Queue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `ino` at `at`, unless it is already queued at that time or earlier (a later
    /// time replaces nothing: waking early costs one re-check, waking late could lose a
    /// deadline). Returns true if `at` is now the earliest entry.
    pub fn push(&mut self, ino: u64, at: SystemTime) -> bool {
        match self.by_ino.get(&ino) {
            Some(&old) if old <= at => return false,
            Some(&old) => {
                self.by_time.remove(&(old, ino));
            }
            None => {}
        }
        self.by_ino.insert(ino, at);
        self.by_time.insert((at, ino));
        self.by_time.first() == Some(&(at, ino))
    }

    /// The earliest deadline.
    pub fn peek(&self) -> Option<SystemTime> {
        self.by_time.first().map(|&(t, _)| t)
    }

    /// Removes and returns every inode due at `now`, earliest first.
    pub fn take_due(&mut self, now: SystemTime) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(&(t, ino)) = self.by_time.first() {
            if t > now {
                break;
            }
            self.by_time.pop_first();
            self.by_ino.remove(&ino);
            out.push(ino);
        }
        out
    }

    /// Inodes queued.
    pub fn len(&self) -> usize {
        self.by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ino.is_empty()
    }
}

/// The state file in the covered directory, and its temporary twin.
pub const STATE_FILE: &str = ".imagecachefs.state";
pub const STATE_TMP: &str = ".imagecachefs.state.tmp";

/// The virtual files of `.imagecache/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VFile {
    Status,
    StatusJson,
    Metrics,
    Events,
    Config,
    Control,
    /// `server`: the serving process and its restarts.
    Server,
    /// `images/NAME`, by inode.
    Image(u64),
}

/// A control command, as written to `.imagecache/control`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Pin(OsString),
    Unpin(OsString),
    Verify(OsString),
    Evict(OsString),
    /// `unmount`: stop as on `SIGTERM` (write the state a last time, detach lazily), so that
    /// `imagecachefs unmount` loses nothing this daemon knew.
    Unmount,
    /// `restart`: the supervisor replaces this server and itself with the binary on disk.
    Restart,
}

/// The server process of a mount, as status files show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    pub pid: u32,
    pub started: SystemTime,
    /// Servers this mount had before this one.
    pub restarts: u64,
    pub last_restart: Option<LastRestart>,
}

/// How the previous server ended and how long its replacement took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastRestart {
    pub cause: String,
    pub at: SystemTime,
    pub duration: std::time::Duration,
}

struct Server {
    info: ServerInfo,
    restart: Box<dyn Fn() -> Result<(), String> + Send + Sync>,
}

/// Why a control command was refused (each maps to an errno the CLI explains).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// Not one of the commands, or a malformed line (`EINVAL`).
    BadCommand(String),
    /// A name with `/`, `..`, or empty (`EINVAL`).
    BadName,
    /// No cache file of that name (`ENOENT`).
    NoSuchFile,
    /// `evict` of a file that must stay (`EBUSY`), with the reason.
    Refused(&'static str),
    /// This daemon's mount was detached: it decides nothing any more (`EROFS`).
    Detached,
    /// `restart` could not be asked for (`EAGAIN`).
    Restart(String),
}

impl ControlError {
    pub fn errno(&self) -> i32 {
        match self {
            ControlError::BadCommand(_) | ControlError::BadName => libc::EINVAL,
            ControlError::NoSuchFile => libc::ENOENT,
            ControlError::Refused(_) => libc::EBUSY,
            ControlError::Detached => libc::EROFS,
            ControlError::Restart(_) => libc::EAGAIN,
        }
    }
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::BadCommand(verb) => write!(f, "unknown command {verb}"),
            ControlError::BadName => write!(f, "not a cache file name"),
            ControlError::NoSuchFile => write!(f, "no such cache file"),
            ControlError::Refused(why) => write!(f, "eviction refused: {why}"),
            ControlError::Detached => write!(f, "this daemon no longer owns the mount"),
            ControlError::Restart(why) => write!(f, "restart: {why}"),
        }
    }
}

/// Parses one control line. A refusal quotes at most the first 40 bytes of the verb,
/// escaped.
pub fn parse_command(line: &[u8]) -> Result<Command, ControlError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let bad = |verb: &[u8]| ControlError::BadCommand(crate::text::excerpt(verb, 40));
    if line == b"unmount" {
        return Ok(Command::Unmount);
    }
    if line == b"restart" {
        return Ok(Command::Restart);
    }
    let (verb, name) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        // A known verb without a name: the name is what is missing.
        None if [&b"pin"[..], b"unpin", b"verify", b"evict"].contains(&line) => {
            return Err(ControlError::BadName)
        }
        None => return Err(bad(line)),
    };
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(ControlError::BadName);
    }
    let name = OsStr::from_bytes(name).to_os_string();
    match verb {
        b"pin" => Ok(Command::Pin(name)),
        b"unpin" => Ok(Command::Unpin(name)),
        b"verify" => Ok(Command::Verify(name)),
        b"evict" => Ok(Command::Evict(name)),
        _ => Err(bad(verb)),
    }
}

/// Where things are and the limits of the background work.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The cache directory (its path is the mount; used for names, never for I/O).
    pub cache_dir: PathBuf,
    /// Where instance directories live, for the backing-file guard and Nova's lock files.
    pub instances_dir: PathBuf,
    pub min_free: Option<MinFree>,
    pub pressure_min_age: u64,
    pub verify_interval: u64,
    pub verify_rate_mib: u64,
    /// The device of this mount when it is live already (a server taking over): files held
    /// open through it are references, not holders from outside.
    pub own_dev: Option<u64>,
}

pub struct Cache {
    pub state: Mutex<CacheState>,
    pub counters: Mutex<Counters>,
    pub policy: Policy,
    pub clock: Arc<dyn Clock>,
    pub proc: ProcRoot,
    pub settings: Settings,
    config: Vec<(String, String)>,
    root: OwnedFd,
    /// The last state-file write (held while writing: only the persister, control commands
    /// and shutdown take it, never a status rendering), and a signal for the persister.
    saved: Mutex<Saved>,
    dirty: Condvar,
    /// The same, for status files, which must not wait for a write in progress.
    saved_version: AtomicU64,
    saved_at: AtomicU64,
    writes: AtomicU64,
    /// The instance disks' backing-file names, read on a thread of their own (they may sit
    /// on a filesystem that hangs).
    disks: crate::disks::Disks,
    /// Free space is below the `--min-free` target and what may go has gone (said once).
    pub pressure_short: std::sync::atomic::AtomicBool,
    /// Status-file snapshots alive. Memory only under it; taken after the state lock is
    /// released, never before it.
    snapshots: Mutex<SnapshotStore>,
    /// Eviction deadlines, earliest first, and the eviction thread's wake-up.
    queue: Mutex<Queue>,
    due: Condvar,
    invalidate: OnceLock<Box<dyn Invalidate>>,
    /// The server process and how to ask its supervisor for a restart.
    server: OnceLock<Server>,
    /// Checksum jobs (birth or re-verification), earliest first, and their thread's wake-up.
    jobs: Mutex<Queue>,
    job_due: Condvar,
    /// Whether the kernel granted passthrough (known after the FUSE handshake).
    passthrough: std::sync::atomic::AtomicBool,
    /// Holders by request thread id, with that thread's start time: a thread that opens
    /// again costs one small /proc read instead of five.
    holders: Mutex<HashMap<u32, (u64, Holder)>>,
    /// The covered filesystem's device as mountinfo shows it, and our own mount's (0 before
    /// the mount), for `/proc` walks.
    mount_dev: u64,
    own_dev: std::sync::atomic::AtomicU64,
    /// When holders outside the mount were last re-derived for a status file.
    outside_seen: Mutex<Option<std::time::Instant>>,
    /// Set once this daemon no longer owns its mount (detached by a signal, `unmount`, or
    /// anyone): from then on it evicts nothing, records no checksum verdict and writes no
    /// state; it only serves the handles still open.
    detached: std::sync::atomic::AtomicBool,
    /// The state file and its temporary twin: one per host on shared storage.
    state_file: OsString,
    state_tmp: OsString,
    /// With `--shared`: the thread that holds this host's cluster locks.
    keeper: OnceLock<Arc<crate::shared::Keeper>>,
    /// A `statvfs` of the covered directory for `metrics` that has not answered yet (the
    /// storage hangs): no other is started until it does.
    space_probe: Mutex<Option<std::sync::mpsc::Receiver<Option<libc::statvfs>>>>,
}

/// How long a `metrics` rendering waits for the free space of the covered directory; past
/// it the free space is left out (its `statvfs` goes on in the background).
pub const SPACE_WAIT: Duration = Duration::from_millis(200);

/// Entries kept in the holder cache before it starts over.
const HOLDER_CACHE: usize = 4096;

/// Status files re-derive holders outside the mount at most this often (a walk of /proc).
const OUTSIDE_REFRESH: Duration = Duration::from_secs(5);

/// The state file is written at most this often (bursts of releases coalesce).
pub const PERSIST_EVERY: Duration = Duration::from_secs(1);

/// How long the backing-file names read for a status file are reused by the next ones
/// (eviction never uses this copy: it reads the instance disks at decision time).
pub const SHOWN_REFS_TTL: Duration = Duration::from_secs(5);

/// How long a status file waits for a fresh read of the instance disks before it shows the
/// previous one (which it says nothing about: `referenced` is a hint, never a decision).
pub const SHOWN_REFS_WAIT: Duration = Duration::from_millis(500);

/// How long an eviction waits for a read of the instance disks begun after it took Nova's
/// lock; without one in time the file stays (the disks may be on a hung filesystem).
pub const DISKS_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a rendering is handed again to non-root readers rather than made anew.
pub const NON_ROOT_REUSE: Duration = Duration::from_secs(1);

/// Bytes of distinct status-file snapshots that non-root readers can keep alive together
/// (a `status.json` of 3,000 images is about 1.5 MB).
pub const SNAPSHOT_BYTES_MAX: usize = 64 << 20;

/// The last state-file write.
#[derive(Debug, Default)]
struct Saved {
    version: u64,
    written: Option<Instant>,
}

/// One rendered status file, shared by every handle that opened it in the same state. Its
/// bytes count in the store's total until the last handle lets go.
#[derive(Debug)]
pub struct Snapshot {
    bytes: Box<[u8]>,
    ledger: Arc<AtomicUsize>,
    /// Unique among this process's snapshots (a journaled copy is named by it).
    id: u64,
}

static SNAPSHOT_IDS: AtomicU64 = AtomicU64::new(1);

impl Snapshot {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// A rendering an earlier server of this connection handed out, from the journal (held
    /// by its handle only; counts against no cap).
    pub fn restored(bytes: Vec<u8>) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            bytes: bytes.into_boxed_slice(),
            ledger: Arc::default(),
            id: SNAPSHOT_IDS.fetch_add(1, Ordering::Relaxed),
        })
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.ledger.fetch_sub(self.bytes.len(), Ordering::Relaxed);
    }
}

/// What a rendering depends on: two renderings with equal stamps show the same text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenderStamp {
    pub version: u64,
    pub counters: u64,
    pub writes: u64,
    pub referenced: u64,
    /// The whole second of the clock (ages and times are shown in seconds).
    pub second: u64,
}

/// The newest snapshot of each status file per kind of reader, and the bytes of all
/// snapshots alive. Holds no snapshot itself: they live as long as their handles.
#[derive(Debug)]
pub struct SnapshotStore {
    latest: HashMap<(VFile, Reader), (RenderStamp, Weak<Snapshot>)>,
    /// The last rendering of each file for non-root readers, kept a moment whether or not a
    /// handle holds it: they get it again rather than a new rendering (`NON_ROOT_REUSE`).
    recent: HashMap<(VFile, Reader), (Instant, Arc<Snapshot>)>,
    ledger: Arc<AtomicUsize>,
    cap: usize,
}

impl SnapshotStore {
    pub fn new(cap: usize) -> Self {
        SnapshotStore {
            latest: HashMap::new(),
            recent: HashMap::new(),
            ledger: Arc::default(),
            cap,
        }
    }

    /// The live snapshot of `key` rendered at `stamp`, if there is one.
    pub fn reuse(&self, key: (VFile, Reader), stamp: RenderStamp) -> Option<Arc<Snapshot>> {
        let (s, w) = self.latest.get(&key)?;
        (*s == stamp).then(|| w.upgrade()).flatten()
    }

    /// Keeps a new rendering of `key`. `capped`: the reader is held to the cap; past it, it
    /// gets the newest live snapshot of `key` (older, still one consistent state), or
    /// `None` when there is none.
    pub fn admit(
        &mut self,
        key: (VFile, Reader),
        stamp: RenderStamp,
        bytes: Vec<u8>,
        capped: bool,
    ) -> Option<Arc<Snapshot>> {
        if let Some(s) = self.reuse(key, stamp) {
            // Another reader rendered the same state meanwhile.
            return Some(s);
        }
        if capped && self.bytes() + bytes.len() > self.cap {
            return self.latest.get(&key).and_then(|(_, w)| w.upgrade());
        }
        self.ledger.fetch_add(bytes.len(), Ordering::Relaxed);
        let snap = Arc::new(Snapshot {
            bytes: bytes.into_boxed_slice(),
            ledger: self.ledger.clone(),
            id: SNAPSHOT_IDS.fetch_add(1, Ordering::Relaxed),
        });
        if self.latest.len() >= 256 {
            self.latest.retain(|_, (_, w)| w.strong_count() > 0);
        }
        self.latest.insert(key, (stamp, Arc::downgrade(&snap)));
        Some(snap)
    }

    /// A rendering of `key` made less than `age` ago, if one is kept.
    pub fn recent(&self, key: (VFile, Reader), age: Duration) -> Option<Arc<Snapshot>> {
        self.recent.get(&key).filter(|(at, _)| at.elapsed() < age).map(|(_, s)| s.clone())
    }

    /// Keeps `snap` as the recent rendering of `key` (older ones of other keys let go).
    pub fn keep_recent(&mut self, key: (VFile, Reader), snap: Arc<Snapshot>, age: Duration) {
        if self.recent.len() >= 256 {
            self.recent.retain(|_, (at, _)| at.elapsed() < age);
        }
        self.recent.insert(key, (Instant::now(), snap));
    }

    /// Bytes of all snapshots alive.
    pub fn bytes(&self) -> usize {
        self.ledger.load(Ordering::Relaxed)
    }
}

impl Cache {
    /// Builds the service over the covered root (an `O_PATH` fd), restoring saved state and
    /// registering every regular file of the root with its holders from before the mount.
    pub fn open(
        root: OwnedFd,
        policy: Policy,
        clock: Arc<dyn Clock>,
        proc: ProcRoot,
        settings: Settings,
        config: Vec<(String, String)>,
    ) -> std::io::Result<Arc<Self>> {
        let dev = backing::stat(root.as_fd())?.dev;
        let mount_dev =
            proc.mount_dev_of(std::os::fd::AsRawFd::as_raw_fd(&root.as_fd())).unwrap_or(dev);
        let mut state = CacheState::new();
        let (state_file, state_tmp) = state_names(&policy);
        let shown_file = state_file.to_string_lossy().into_owned();
        let mut read = backing::read_file_at(root.as_fd(), &state_file);
        if matches!(read, Ok(None)) && state_file != STATE_FILE {
            // First start with a state file per host: the one all hosts wrote before, if any.
            read = backing::read_file_at(root.as_fd(), OsStr::new(STATE_FILE));
        }
        match read {
            Ok(Some(text)) => {
                let bad = state.restore(&String::from_utf8_lossy(&text));
                if bad > 0 {
                    warn!("{shown_file}: skipped {bad} unreadable line(s)");
                }
            }
            Ok(None) => {}
            Err(e) => warn!("reading {shown_file}: {e}; starting with empty state"),
        }
        if state_file != STATE_FILE {
            info!("shared storage: this host's state file is {shown_file}");
            restore_other_hosts(root.as_fd(), &state_file, &mut state);
        }
        let settings_own_dev = settings.own_dev.unwrap_or(0);
        let disks =
            crate::disks::Disks::spawn(settings.instances_dir.clone(), settings.cache_dir.clone());
        let cache = Arc::new(Cache {
            state: Mutex::new(state),
            counters: Mutex::new(Counters::default()),
            policy,
            clock,
            proc,
            settings,
            config,
            root,
            saved: Mutex::new(Saved::default()),
            dirty: Condvar::new(),
            saved_version: AtomicU64::new(0),
            saved_at: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            disks,
            pressure_short: Default::default(),
            snapshots: Mutex::new(SnapshotStore::new(SNAPSHOT_BYTES_MAX)),
            queue: Mutex::new(Queue::new()),
            due: Condvar::new(),
            invalidate: OnceLock::new(),
            server: OnceLock::new(),
            jobs: Mutex::new(Queue::new()),
            job_due: Condvar::new(),
            passthrough: Default::default(),
            holders: Mutex::new(HashMap::new()),
            mount_dev,
            own_dev: settings_own_dev.into(),
            outside_seen: Mutex::new(None),
            space_probe: Mutex::new(None),
            detached: Default::default(),
            state_file,
            state_tmp,
            keeper: OnceLock::new(),
        });
        cache.scan()?;
        let now = cache.now();
        let interval = cache.settings.verify_interval;
        let checks: Vec<(u64, Option<SystemTime>)> = {
            let state = cache.state.lock();
            state
                .images()
                .map(|i| {
                    let v = match i.verified {
                        Verified::Ok(t) | Verified::Mismatch(t) => Some(t),
                        Verified::Never | Verified::Pending => None,
                    };
                    // A `verify` acknowledged by an earlier daemon that stopped first: now.
                    let at = match i.verified {
                        Verified::Pending if i.checksum.is_some() => Some(now),
                        _ => next_check(i.checksum.map(|c| c.at), v, interval, now),
                    };
                    (i.ino, at)
                })
                .collect()
        };
        for (ino, at) in checks {
            cache.schedule(ino);
            if let Some(at) = at {
                cache.verify_at(ino, at);
            }
        }
        Ok(cache)
    }

    /// Queues a checksum job for `ino` at `at`.
    pub fn verify_at(&self, ino: u64, at: SystemTime) {
        if self.jobs.lock().push(ino, at) {
            self.job_due.notify_one();
        }
    }

    /// `verify NAME`, or a file whose writing just ended: hash it now.
    pub fn request_verify(&self, ino: u64) {
        self.state.lock().set_verify_pending(ino);
        self.verify_at(ino, self.now());
    }

    pub fn take_verify_due(&self, now: SystemTime) -> Vec<u64> {
        self.jobs.lock().take_due(now)
    }

    pub fn wait_for_verify(&self) {
        wait_due(&self.jobs, &self.job_due, &*self.clock);
    }

    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The covered directory (an `O_PATH` fd).
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Who serves this mount (status files show it) and how `restart` reaches its supervisor.
    pub fn set_server(
        &self,
        info: ServerInfo,
        restart: Box<dyn Fn() -> Result<(), String> + Send + Sync>,
    ) {
        if let Some(last) = &info.last_restart {
            let detail = format!("{} ({} ms)", last.cause, last.duration.as_millis());
            let now = self.now();
            self.state.lock().event(
                now,
                crate::state::EventKind::Restarted,
                OsStr::new("-"),
                detail,
            );
        }
        let _ = self.server.set(Server { info, restart });
    }

    /// The supervisor refused a `restart` (the binary on disk cannot take over).
    pub fn restart_refused(&self, why: &str) {
        warn!("restart refused: {why}");
        let now = self.now();
        self.state.lock().event(
            now,
            crate::state::EventKind::RestartRefused,
            OsStr::new("-"),
            why.to_owned(),
        );
    }

    pub fn server_info(&self) -> Option<&ServerInfo> {
        self.server.get().map(|s| &s.info)
    }

    pub fn set_invalidator(&self, i: Box<dyn Invalidate>) {
        let _ = self.invalidate.set(i);
    }

    pub fn invalidator(&self) -> Option<&dyn Invalidate> {
        self.invalidate.get().map(|b| b.as_ref())
    }

    /// Queues the file's eviction deadline (if it has one) for the eviction thread.
    pub fn schedule(&self, ino: u64) {
        let deadline = {
            let state = self.state.lock();
            state.image(ino).and_then(|img| CacheState::deadline(img, &self.policy))
        };
        if let Some(d) = deadline {
            self.schedule_at(ino, d);
        }
    }

    pub fn schedule_at(&self, ino: u64, at: SystemTime) {
        if self.queue.lock().push(ino, at) {
            self.due.notify_one();
        }
    }

    /// Makes the eviction thread run now (inode 0 is never a file).
    pub fn wake_evictor(&self) {
        self.schedule_at(0, SystemTime::UNIX_EPOCH);
    }

    /// Pops every eviction deadline due at `now` (each inode once).
    pub fn take_due(&self, now: SystemTime) -> Vec<u64> {
        self.queue.lock().take_due(now)
    }

    /// Blocks until the earliest deadline passes (or an earlier one is queued).
    pub fn wait_for_due(&self) {
        wait_due(&self.queue, &self.due, &*self.clock);
    }

    /// Registers the regular files of the root and finds processes holding them open.
    fn scan(&self) -> std::io::Result<()> {
        for e in backing::read_dir(self.root.as_fd())? {
            if e.kind != libc::S_IFREG {
                continue;
            }
            if is_evicting_name(&e.name) {
                self.finish_interrupted_eviction(&e.name);
                continue;
            }
            if is_own_file(&e.name) {
                continue;
            }
            let Ok(fd) = backing::open_path_at(self.root.as_fd(), &e.name) else { continue };
            let Ok(st) = backing::stat(fd.as_fd()) else { continue };
            self.observe(&e.name, &st);
        }
        match self.refresh_outside(None) {
            Ok(()) => {
                let state = self.state.lock();
                for img in state.images() {
                    for (h, write) in &img.early {
                        info!(
                            "pid {} ({}) holds {} open{} outside the mount",
                            h.pid,
                            crate::text::escape(h.program.as_bytes()),
                            crate::text::escape(img.name.as_deref().unwrap_or_default().as_bytes()),
                            if *write { " for writing" } else { "" }
                        );
                    }
                }
            }
            Err(e) => warn!(
                "looking for processes that hold cache files open: {e}; each eviction looks again"
            ),
        }
        Ok(())
    }

    /// A file left under its eviction name by a daemon that stopped between the two steps of
    /// an eviction: the name it had is put back if it is free (the eviction is decided again),
    /// otherwise it stays hidden and an error says where.
    fn finish_interrupted_eviction(&self, private: &OsStr) {
        let original = evicting_original(private);
        let shown = private.to_string_lossy();
        let restored = original
            .as_ref()
            .is_some_and(|name| backing::rename_noreplace(self.root(), private, name).is_ok());
        match (restored, original) {
            (true, Some(name)) => {
                warn!(
                    "an interrupted eviction left {shown}: restored as {}",
                    name.to_string_lossy()
                )
            }
            _ => log::error!(
                "an interrupted eviction left {} in the cache directory and its name is taken: \
                 remove or rename it by hand",
                self.settings.cache_dir.join(private).display()
            ),
        }
    }

    /// Re-derives, from `/proc`, which processes hold cache files open outside the mount:
    /// the files `inos` (all cache files for `None`). Never under the state lock; the walk
    /// touches no filesystem.
    pub fn refresh_outside(&self, inos: Option<&[u64]>) -> Result<(), Incomplete> {
        let files: HashMap<u64, OsString> = {
            let state = self.state.lock();
            match inos {
                None => state.images().filter_map(|i| Some((i.ino, i.name.clone()?))).collect(),
                Some(inos) => inos
                    .iter()
                    .filter_map(|&ino| Some((ino, state.image(ino)?.name.clone()?)))
                    .collect(),
            }
        };
        if files.is_empty() {
            return Ok(());
        }
        let own = self.own_dev.load(std::sync::atomic::Ordering::Relaxed);
        let want =
            Wanted { dev: self.mount_dev, files: &files, own_dev: (own != 0).then_some(own) };
        let found = self.proc.holders_of(&want)?;
        let now = self.now();
        let effects: Vec<RefEffect> = {
            let mut state = self.state.lock();
            files
                .keys()
                .map(|&ino| {
                    let held = found
                        .iter()
                        .filter(|h| h.ino == ino)
                        .map(|h| (h.holder.clone(), h.write))
                        .collect();
                    state.set_outside(ino, held, now)
                })
                .collect()
        };
        for effect in effects {
            self.after(effect, now);
        }
        self.sync_locks();
        Ok(())
    }

    /// Schedules what a reference change asks for.
    fn after(&self, effect: RefEffect, now: SystemTime) {
        match effect {
            RefEffect::Unreferenced { ino } => self.schedule(ino),
            RefEffect::WritingDone { ino, .. } => {
                self.schedule(ino);
                self.verify_at(ino, now);
                // The file grew the cache: let the eviction thread check free space.
                self.wake_evictor();
            }
            RefEffect::None | RefEffect::Gone => {}
        }
    }

    /// Hands the cache the `--shared` lock keeper (once, at start).
    pub fn set_keeper(&self, keeper: Arc<crate::shared::Keeper>) {
        let _ = self.keeper.set(keeper);
    }

    /// The `--shared` lock keeper, if coordination is on.
    pub fn keeper(&self) -> Option<&Arc<crate::shared::Keeper>> {
        self.keeper.get()
    }

    /// Tells the keeper the references may have changed (never waits).
    fn sync_locks(&self) {
        if let Some(k) = self.keeper.get() {
            k.sync();
        }
    }

    /// Asks for a fresh read of the instance disks if the last one is older than a few
    /// seconds, without waiting for it.
    pub fn request_disks(&self) {
        let _ = self.disks.recent(SHOWN_REFS_TTL, Duration::ZERO);
    }

    /// The names the last read of the instance disks found, `None` if it failed or there
    /// was none yet.
    pub fn referenced_if_known(&self) -> Option<Arc<BTreeSet<OsString>>> {
        self.disks.last_names()
    }

    /// A release of `name` on any host (its lock file's mtime, `at`): the idle age counts
    /// from the last use anywhere.
    pub fn used_elsewhere(&self, name: &OsStr, at: SystemTime) {
        let ino = self.state.lock().used_elsewhere(name, at);
        if let Some(ino) = ino {
            self.schedule(ino);
        }
    }

    /// Our own mount's device (mountinfo's), once mounted: descriptors on it, in any mount
    /// namespace, are never holders outside the mount.
    pub fn set_own_dev(&self, dev: u64) {
        self.own_dev.store(dev, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this daemon still owns its mount (see `detached`).
    pub fn owns_mount(&self) -> bool {
        !self.detached.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The mount is no longer this daemon's: stop deciding, once and for good.
    pub fn lose_mount(&self, why: &str) {
        if !self.detached.swap(true, std::sync::atomic::Ordering::SeqCst) {
            warn!(
                "{}: {why}; this daemon now only serves its open files: no eviction, no checksum \
                 verdict, no state write",
                self.settings.cache_dir.display()
            );
            // Wake the background threads so that they see it.
            self.wake_evictor();
            self.dirty.notify_one();
            self.job_due.notify_one();
        }
    }

    pub fn now(&self) -> std::time::SystemTime {
        self.clock.now()
    }

    /// A regular file under `name` in the root.
    pub fn observe(&self, name: &OsStr, st: &Stat) {
        if is_own_file(name) {
            return;
        }
        if !st.is_file() {
            self.unlinked(name);
            return;
        }
        let new = {
            let mut state = self.state.lock();
            let known = state.by_name(name).is_some_and(|i| i.ino == st.ino);
            state.observe(name, st.ino, st.size, st.mtime);
            !known
        };
        if new {
            self.schedule(st.ino);
        }
    }

    pub fn unlinked(&self, name: &OsStr) {
        self.state.lock().forget_name(name);
    }

    pub fn renamed(&self, from: &OsStr, to: &OsStr) {
        self.state.lock().rename(from, to);
    }

    pub fn exchanged(&self, a: &OsStr, b: &OsStr) {
        self.state.lock().exchange(a, b);
    }

    /// An open of a cache file through the mount; `pid` is the request's thread id.
    /// `false`: the file is being evicted, the open must fail with `ENOENT`.
    pub fn opened(&self, ino: u64, fh: u64, pid: u32, write: bool) -> bool {
        let holder = self.holder(pid);
        let now = self.now();
        let (effect, name) = {
            let mut state = self.state.lock();
            let effect = state.reference(RefChange::Open { fh, ino, holder, write }, now);
            (effect, state.image(ino).and_then(|i| i.name.clone()))
        };
        if effect == RefEffect::Gone {
            return false;
        }
        // Also when the keeper's list says the lock is held: it may be dropping it for the
        // release this open follows.
        self.sync_locks();
        if let (Some(k), Some(name)) = (self.keeper.get(), name) {
            if !self.protect(k, &name, ino) {
                // Evicted by another host just before this host's lock: a cache miss.
                self.released(fh, None);
                return false;
            }
        }
        true
    }

    /// `--shared`: before an open of `name` (inode `ino`) is answered, this host's shared
    /// lock on it, and then the file still there: false if another host evicted it first.
    /// Waits for the keeper a bounded time; without its lock the open goes ahead (logged by
    /// the keeper, retried at its next look).
    fn protect(&self, keeper: &crate::shared::Keeper, name: &OsStr, ino: u64) -> bool {
        use crate::shared::Ensured;
        match keeper.ensure(name) {
            Some(Ensured::Held) => {}
            // Another host's eviction held the exclusive lock the whole wait: the file is
            // going (answering with it would hand out a file deleted under the opener).
            Some(Ensured::Busy) => {
                warn!(
                    "open of {}: another host is evicting it (its exclusive lock stayed for \
                     {:?}): answered as gone",
                    crate::text::escape(name.as_bytes()),
                    crate::shared::ENSURE_TIMEOUT
                );
                return false;
            }
            Some(Ensured::Taken) => {
                // An open reaches the storage's server, where a lookup may be answered from
                // the client's cache (GlusterFS keeps entries a second).
                let opened = backing::open_at(self.root(), name, libc::O_RDONLY | libc::O_NONBLOCK)
                    .and_then(|f| backing::stat(f.as_fd()));
                return match opened {
                    Ok(st) => st.ino == ino,
                    Err(e) => !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESTALE)),
                };
            }
            Some(Ensured::Failed) | None => return true,
        }
        match backing::open_path_at(self.root(), name).and_then(|fd| backing::stat(fd.as_fd())) {
            Ok(st) => st.ino == ino,
            Err(e) => !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESTALE)),
        }
    }

    /// A handle released; `size`: the file's size now, if the handle could have changed it.
    /// Who a request thread belongs to (pid reuse is caught by the thread's start time).
    fn holder(&self, tid: u32) -> Holder {
        let started = self.proc.start_time(tid);
        if let Some((t, h)) = self.holders.lock().get(&tid) {
            if Some(*t) == started {
                return h.clone();
            }
        }
        let Some(h) = self.proc.holder(tid) else {
            return Holder { pid: tid, program: "unknown".into(), instance: None, start_time: 0 };
        };
        if let Some(t) = started {
            let mut cache = self.holders.lock();
            if cache.len() >= HOLDER_CACHE {
                cache.clear();
            }
            cache.insert(tid, (t, h.clone()));
        }
        h
    }

    pub fn released(&self, fh: u64, size: Option<(u64, u64)>) -> RefEffect {
        let now = self.now();
        let effect = {
            let mut state = self.state.lock();
            if let Some((ino, size)) = size {
                state.resized(ino, size);
            }
            state.reference(RefChange::Release { fh }, now)
        };
        self.sync_locks();
        self.dirty.notify_one();
        self.after(effect, now);
        effect
    }

    /// A use through `utime`/`touch`: `before` and `after` are the file as it was just
    /// before and after its times were set.
    pub fn touched(&self, ino: u64, before: &Stat, after: &Stat) {
        let now = self.now();
        let hash = self.state.lock().touch_times(ino, stamp(before), stamp(after), now);
        self.after_use(ino, hash, now);
    }

    /// A size change through the mount (`truncate`, `ftruncate`): a use and a data change;
    /// `before` and `after`: the file just before and after.
    pub fn truncated(&self, ino: u64, before: &Stat, after: &Stat) {
        let now = self.now();
        let hash = self.state.lock().truncated(ino, stamp(before), stamp(after), now);
        self.after_use(ino, hash, now);
    }

    fn after_use(&self, ino: u64, hash: bool, now: SystemTime) {
        self.dirty.notify_one();
        self.schedule(ino);
        if hash {
            self.verify_at(ino, now);
        }
    }

    /// The inode of the cache file `name`, if there is one.
    pub fn ino_of(&self, name: &OsStr) -> Option<u64> {
        self.state.lock().by_name(name).map(|i| i.ino)
    }

    /// Names and inodes of every cache file (for `images/`).
    pub fn names(&self) -> Vec<(OsString, u64)> {
        let s = self.state.lock();
        s.images().filter_map(|i| Some((i.name.clone()?, i.ino))).collect()
    }

    /// Names instance disks use as backing files, from a read begun now (a few hundred bytes
    /// per disk, on the disk reader's thread; waited for `DISKS_TIMEOUT` at most). An error
    /// means "unknown": eviction must not go ahead on it.
    pub fn referenced(&self) -> Result<Arc<BTreeSet<OsString>>, String> {
        self.disks.fresh(DISKS_TIMEOUT)
    }

    /// Names the last read of the instance disks found as backing files (none read yet:
    /// empty). A hint for choosing what to try; a decision always reads afresh.
    pub fn last_referenced(&self) -> Arc<BTreeSet<OsString>> {
        self.disks.last_names().unwrap_or_default()
    }

    /// For a status file: re-derives holders outside the mount, if there are any, at most
    /// every few seconds (a /proc walk costs, and any user may open status files in a loop).
    fn refresh_outside_for_status(&self) {
        let inos = self.state.lock().held_outside();
        if inos.is_empty() {
            return;
        }
        {
            let mut seen = self.outside_seen.lock();
            if seen.is_some_and(|t| t.elapsed() < OUTSIDE_REFRESH) {
                return;
            }
            *seen = Some(std::time::Instant::now());
        }
        if let Err(e) = self.refresh_outside(Some(&inos)) {
            log::debug!("status: holders outside the mount not re-checked: {e}");
        }
    }

    /// Sizes of files being written now (their writes bypass the daemon).
    fn refresh_sizes(&self) {
        let writing: Vec<(u64, OsString)> = {
            let state = self.state.lock();
            state
                .images()
                .filter(|i| i.writers() > 0)
                .filter_map(|i| Some((i.ino, i.name.clone()?)))
                .collect()
        };
        for (ino, name) in writing {
            let st = backing::open_path_at(self.root.as_fd(), &name)
                .and_then(|fd| backing::stat(fd.as_fd()));
            if let Some(st) = st.ok().filter(|st| st.ino == ino) {
                self.state.lock().resized(ino, st.size);
            }
        }
    }

    /// Backing-file names for display: a read at most `SHOWN_REFS_TTL` old, waiting
    /// `SHOWN_REFS_WAIT` at most for a new one. Returns the names and the read's number.
    fn shown_referenced(&self) -> (u64, Arc<BTreeSet<OsString>>) {
        match self.disks.recent(SHOWN_REFS_TTL, SHOWN_REFS_WAIT) {
            Some(read) => (read.seq, read.names.unwrap_or_default()),
            None => (0, Arc::default()),
        }
    }
    /// The stamp a rendering made now would have (reads no file).
    fn render_stamp(&self) -> RenderStamp {
        let version = self.state.lock().shown;
        let counters = status::counters_sum(&self.counters.lock());
        let referenced = self.disks.last_seq();
        RenderStamp {
            version,
            counters,
            writes: self.writes.load(Ordering::Relaxed),
            referenced,
            second: crate::clock::unix_secs(self.now()),
        }
    }

    /// Whether the state file holds `version`, and when it was written.
    fn persisted(&self, version: u64) -> Persisted {
        let at = self.saved_at.load(Ordering::Relaxed);
        Persisted {
            on_disk: self.saved_version.load(Ordering::Relaxed) == version,
            at: (at > 0).then(|| crate::clock::from_unix_secs(at)),
            writes: self.writes.load(Ordering::Relaxed),
        }
    }

    /// The text of a status file for `reader`, shared with every other handle that opened
    /// it in the same state (same stamp). `None`: non-root readers hold more than
    /// `SNAPSHOT_BYTES_MAX` of snapshots, none of this file; the open fails (`EAGAIN`).
    pub fn snapshot(&self, file: VFile, reader: Reader) -> Option<Arc<Snapshot>> {
        let key = (file, reader);
        let capped = reader != Reader::Root;
        if capped {
            // Any user may open status files in a loop: for them a rendering is made at most
            // once per `NON_ROOT_REUSE` per file, whatever changed meanwhile.
            if let Some(s) = self.snapshots.lock().recent(key, NON_ROOT_REUSE) {
                return Some(s);
            }
        }
        let now = self.render_stamp();
        if let Some(s) = self.snapshots.lock().reuse(key, now) {
            return Some(s);
        }
        let (bytes, stamp) = self.render_as(file, reader);
        let mut store = self.snapshots.lock();
        let snap = store.admit(key, stamp, bytes, capped);
        if let (true, Some(s)) = (capped, &snap) {
            store.keep_recent(key, s.clone(), NON_ROOT_REUSE);
        }
        snap
    }

    /// Bytes of status-file snapshots alive.
    pub fn snapshot_bytes(&self) -> usize {
        self.snapshots.lock().bytes()
    }

    /// Renders a status file as root sees it.
    pub fn render(&self, file: VFile) -> Vec<u8> {
        self.render_as(file, Reader::Root).0
    }

    /// Renders a status file for `reader`, with the stamp of what it shows.
    fn render_as(&self, file: VFile, reader: Reader) -> (Vec<u8>, RenderStamp) {
        self.refresh_outside_for_status();
        self.refresh_sizes();
        let (referenced_gen, referenced) = match file {
            VFile::Events | VFile::Config | VFile::Control | VFile::Server => {
                (self.disks.last_seq(), Arc::default())
            }
            _ => self.shown_referenced(),
        };
        let space =
            if matches!(file, VFile::Metrics) { self.space_for_status() } else { Space::default() };
        let now = self.now();
        let (text, stamp) = {
            let state = self.state.lock();
            let mut counters = self.counters.lock();
            if let Some(k) = self.keeper.get() {
                counters.shared_lock_errors = k.errors();
                counters.shared_unprotected = k.unprotected();
            }
            let persisted = self.persisted(state.version);
            let stamp = RenderStamp {
                version: state.shown,
                counters: status::counters_sum(&counters),
                writes: persisted.writes,
                referenced: referenced_gen,
                second: crate::clock::unix_secs(now),
            };
            let view = View {
                state: &state,
                policy: &self.policy,
                referenced: &referenced,
                now,
                counters: &counters,
                reader,
                persisted,
                space,
                server: self.server_info(),
            };
            let text = match file {
                VFile::Status => status::table(&view),
                VFile::StatusJson => status::json(&view),
                VFile::Metrics => {
                    let mut m = status::metrics(&view);
                    m.push_str(&status::server_metrics(self.server_info()));
                    m
                }
                VFile::Server => status::server(self.server_info()),
                VFile::Events => status::events(&state, reader),
                VFile::Config => {
                    let on = self.passthrough.load(std::sync::atomic::Ordering::Relaxed);
                    let mut pairs = self.config.clone();
                    pairs.push(("passthrough".into(), if on { "on" } else { "off" }.into()));
                    status::config(&pairs)
                }
                VFile::Control => String::new(),
                VFile::Image(ino) => match state.image(ino) {
                    Some(img) if img.name.is_some() => {
                        let mut text = status::image(&view, img);
                        if let (Some(k), Some(name)) = (self.keeper.get(), &img.name) {
                            text.push_str(&crate::shared::status_lines(k, name));
                        }
                        text
                    }
                    _ => String::new(),
                },
            };
            (text, stamp)
        };
        // Not written here: the persister writes within `PERSIST_EVERY`, and the text says
        // whether it is on disk yet.
        self.changed();
        (text.into_bytes(), stamp)
    }

    /// Free space on the cache filesystem and the `--min-free` target: one `statvfs` of the
    /// covered directory, never under a lock.
    pub fn space(&self) -> Space {
        let vfs = backing::statvfs(self.root()).ok();
        let total = vfs.map_or(0, |v| v.f_blocks * v.f_frsize);
        Space {
            free: vfs.map(|v| v.f_bavail * v.f_frsize),
            min_free: self.settings.min_free.map_or(0, |m| m.bytes(total)),
        }
    }

    /// [`Cache::space`] for a status file on a FUSE worker: the `statvfs` runs on a thread
    /// of its own and is waited for [`SPACE_WAIT`] at most (the storage may hang); while one
    /// has not answered, no other starts and the free space is left out.
    fn space_for_status(&self) -> Space {
        let mut probe = self.space_probe.lock();
        let rx = match probe.take() {
            Some(rx) => rx,
            None => {
                let (tx, rx) = std::sync::mpsc::channel();
                let root = self.root.try_clone();
                let spawned = std::thread::Builder::new().name("statvfs".into()).spawn(move || {
                    let vfs = root.ok().and_then(|r| backing::statvfs(r.as_fd()).ok());
                    let _ = tx.send(vfs);
                });
                if spawned.is_err() {
                    return Space { free: None, min_free: 0 };
                }
                rx
            }
        };
        match rx.recv_timeout(SPACE_WAIT) {
            Ok(vfs) => {
                let total = vfs.map_or(0, |v| v.f_blocks * v.f_frsize);
                Space {
                    free: vfs.map(|v| v.f_bavail * v.f_frsize),
                    min_free: self.settings.min_free.map_or(0, |m| m.bytes(total)),
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                *probe = Some(rx);
                Space { free: None, min_free: 0 }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Space { free: None, min_free: 0 }
            }
        }
    }

    /// Writes the state file now if anything changed since the last write (control
    /// commands, shutdown).
    pub fn persist(&self) {
        self.write_state(false);
    }

    /// Writes the state file if anything changed; `paced`: not if the last write is less
    /// than `PERSIST_EVERY` ago.
    fn write_state(&self, paced: bool) {
        if !self.owns_mount() {
            // Another daemon may own the directory now.
            return;
        }
        let mut saved = self.saved.lock();
        if paced && saved.written.is_some_and(|w| w.elapsed() < PERSIST_EVERY) {
            return;
        }
        let (version, text) = {
            let s = self.state.lock();
            if s.version == saved.version {
                return;
            }
            (s.version, s.persist_text())
        };
        match backing::replace_file_at(
            self.root.as_fd(),
            &self.state_tmp,
            &self.state_file,
            text.as_bytes(),
        ) {
            Ok(()) => {
                saved.version = version;
                self.saved_version.store(version, Ordering::Relaxed);
                self.saved_at.store(crate::clock::unix_secs(self.now()), Ordering::Relaxed);
                self.writes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => warn!("writing {}: {e}", self.state_file.to_string_lossy()),
        }
        saved.written = Some(Instant::now());
    }

    /// The persister: writes changes within a fraction of a second of the first one
    /// (coalescing bursts), never more than once per `PERSIST_EVERY`.
    pub fn spawn_persister(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("persist".into())
            .spawn(move || loop {
                let Some(c) = me.upgrade() else { return };
                let pause = {
                    let mut saved = c.saved.lock();
                    if c.state.lock().version == saved.version {
                        c.dirty.wait_for(&mut saved, Duration::from_secs(5));
                    }
                    let since = saved.written.map_or(PERSIST_EVERY, |w| w.elapsed());
                    Duration::from_millis(200).max(PERSIST_EVERY.saturating_sub(since))
                };
                drop(c);
                std::thread::sleep(pause);
                let Some(c) = me.upgrade() else { return };
                c.write_state(true);
            })
            .expect("spawn persister");
    }

    /// Something worth persisting changed: the persister writes it shortly (coalescing
    /// bursts, at most once per `PERSIST_EVERY`).
    pub fn changed(&self) {
        self.dirty.notify_one();
    }

    /// Runs a control command.
    pub fn control(&self, cmd: Command) -> Result<(), ControlError> {
        if !self.owns_mount() {
            return Err(ControlError::Detached);
        }
        let now = self.now();
        let result = match &cmd {
            Command::Pin(n) | Command::Unpin(n) => {
                let pin = matches!(cmd, Command::Pin(_));
                let was = self.state.lock().by_name(n).map(|i| i.pinned);
                if self.state.lock().set_pin(n, pin, now) {
                    if was != Some(pin) {
                        let shown = crate::text::escape(n.as_bytes());
                        info!("{} {shown}", if pin { "pinned" } else { "unpinned" });
                    }
                    if !pin {
                        self.schedule(self.ino_of(n).unwrap_or(0));
                    }
                    Ok(())
                } else {
                    Err(ControlError::NoSuchFile)
                }
            }
            Command::Evict(n) => crate::evict::evict_named(self, n),
            Command::Verify(n) => {
                let ino = self.ino_of(n).ok_or(ControlError::NoSuchFile)?;
                self.request_verify(ino);
                Ok(())
            }
            Command::Restart => match self.server.get() {
                Some(s) => {
                    info!("control: restart requested");
                    (s.restart)().map_err(ControlError::Restart)
                }
                None => Err(ControlError::Restart("this daemon runs without a supervisor".into())),
            },
            Command::Unmount => {
                // The signal thread does it, as for SIGTERM: a worker must not wait for it.
                info!("control: unmount requested");
                unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                Ok(())
            }
        };
        self.persist();
        result
    }
}

/// Sleeps until the earliest entry of a deadline queue is due.
fn wait_due(q: &Mutex<Queue>, wake: &Condvar, clock: &dyn Clock) {
    let mut q = q.lock();
    loop {
        let now = clock.now();
        let wait = match q.peek() {
            Some(t) if t <= now => return,
            Some(t) => t.duration_since(now).unwrap_or_default(),
            None => Duration::from_secs(3600),
        };
        wake.wait_for(&mut q, wait.min(Duration::from_secs(3600)));
    }
}

/// The stamp of the file `st`: what a checksum taken now would be tied to (see [`Stamp`]).
pub fn stamp(st: &Stat) -> Stamp {
    Stamp { ino: st.ino, size: st.size, mtime: st.mtime }
}

/// imagecachefs's own files in the covered directory: every host's state file on shared
/// storage, and the lock directory, included.
pub fn is_own_file(name: &OsStr) -> bool {
    name == STATE_FILE
        || name == STATE_TMP
        || name.as_bytes().starts_with(STATE_PER_HOST.as_bytes())
        || name == crate::shared::LOCK_DIR
        || is_evicting_name(name)
}

/// How many other hosts' state files are read for their checksums at start.
const OTHER_HOSTS_READ: usize = 64;

/// On shared storage: the checksums other hosts recorded (their state files), so that a file
/// another host already hashed is not read again here when its stamp matches.
fn restore_other_hosts(root: BorrowedFd<'_>, own: &OsStr, state: &mut CacheState) {
    let Ok(entries) = backing::read_dir(root) else { return };
    let others = entries
        .into_iter()
        .filter(|e| e.kind == libc::S_IFREG && e.name != own)
        .filter(|e| e.name.as_bytes().starts_with(STATE_PER_HOST.as_bytes()))
        .filter(|e| !e.name.as_bytes().ends_with(b"~") && e.name != STATE_TMP)
        .take(OTHER_HOSTS_READ);
    for e in others {
        if let Ok(Some(text)) = backing::read_file_at(root, &e.name) {
            let bad = state.restore_others(&String::from_utf8_lossy(&text));
            if bad > 0 {
                warn!("{}: skipped {bad} unreadable line(s)", e.name.to_string_lossy());
            }
        }
    }
}

/// The prefix of the per-host state files on shared storage.
pub const STATE_PER_HOST: &str = ".imagecachefs.state.";

/// The state file and its temporary twin: on shared storage one pair per host
/// (`.imagecachefs.state.<machine id>`, and the same with `~`, which no node name has), so
/// that two hosts never write the same file.
pub fn state_names(policy: &Policy) -> (OsString, OsString) {
    if policy.shared.is_none() {
        return (STATE_FILE.into(), STATE_TMP.into());
    }
    let node = crate::shared::node_name();
    (format!("{STATE_PER_HOST}{node}").into(), format!("{STATE_PER_HOST}{node}~").into())
}

/// A file being evicted is first renamed to `EVICTING` + its name in hex (so that a rename
/// onto its name between the last check and the unlink cannot make the daemon delete another
/// file); a name too long for that is checked and unlinked in place.
pub const EVICTING: &str = ".imagecachefs.evicting.";

pub fn is_evicting_name(name: &OsStr) -> bool {
    name.as_bytes().starts_with(EVICTING.as_bytes())
}

/// The private name an eviction renames `name` to, if it fits in a name.
pub fn evicting_name(name: &OsStr) -> Option<OsString> {
    let hex = crate::verify::hex(name.as_bytes());
    (EVICTING.len() + hex.len() <= 255).then(|| OsString::from(format!("{EVICTING}{hex}")))
}

fn evicting_original(private: &OsStr) -> Option<OsString> {
    use std::os::unix::ffi::OsStringExt;
    let hex = private.as_bytes().strip_prefix(EVICTING.as_bytes())?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = hex
        .chunks(2)
        .map(|c| std::str::from_utf8(c).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    // Only a plain name in the cache directory: anyone who owns the directory could plant
    // such a file while it is not covered, and the name is where it would be moved.
    let name = OsString::from_vec(bytes?);
    let b = name.as_bytes();
    let plain = !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/') && !b.contains(&0);
    (plain && !is_own_file(&name) && name != crate::fs::STATUS_DIR).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eviction_name_decodes_only_to_a_plain_name_in_the_directory() {
        let name = OsStr::new("0d5e6b61602d758984b3bf038267614d6016eb2a");
        let private = evicting_name(name).expect("fits");
        assert!(is_own_file(&private));
        assert_eq!(evicting_original(&private).as_deref(), Some(name));
        let planted = |target: &str| {
            OsString::from(format!("{EVICTING}{}", crate::verify::hex(target.as_bytes())))
        };
        for bad in ["/etc/ld.so.preload", "../../escaped", "a/b", "..", ".", "", ".imagecache"] {
            assert_eq!(evicting_original(&planted(bad)), None, "{bad:?}");
        }
        assert_eq!(evicting_original(&planted(STATE_FILE)), None);
        assert_eq!(evicting_original(OsStr::new(".imagecachefs.evicting.abc")), None, "odd");
        assert_eq!(evicting_original(OsStr::new(".imagecachefs.evicting.zz")), None);
        assert!(evicting_name(OsStr::new(&"x".repeat(200))).is_none(), "too long to encode");
    }

    #[test]
    fn control_lines_parse_or_refuse() {
        assert_eq!(parse_command(b"pin abc\n"), Ok(Command::Pin("abc".into())));
        assert_eq!(parse_command(b"evict swap_512"), Ok(Command::Evict("swap_512".into())));
        assert_eq!(parse_command(b"unpin x"), Ok(Command::Unpin("x".into())));
        assert_eq!(parse_command(b"verify x"), Ok(Command::Verify("x".into())));
        assert_eq!(parse_command(b"unmount\n"), Ok(Command::Unmount));
        assert!(matches!(parse_command(b"unmount x"), Err(ControlError::BadCommand(_))));
        assert!(matches!(parse_command(b"remove x"), Err(ControlError::BadCommand(_))));
        assert_eq!(parse_command(b"pin"), Err(ControlError::BadName));
        assert_eq!(parse_command(b"pin ../x"), Err(ControlError::BadName));
        assert_eq!(parse_command(b"pin a/b"), Err(ControlError::BadName));
        assert_eq!(parse_command(b"pin .."), Err(ControlError::BadName));
        assert_eq!(parse_command(b"pin "), Err(ControlError::BadName));
    }

    #[test]
    fn snapshots_are_shared_counted_and_capped() {
        let mut store = SnapshotStore::new(1000);
        let key = (VFile::StatusJson, Reader::Other);
        let stamp = RenderStamp { version: 1, ..RenderStamp::default() };
        let first = store.admit(key, stamp, vec![b'x'; 400], true).unwrap();
        // Two thousand opens of the same state share one copy.
        let held: Vec<_> = (0..2000).map(|_| store.reuse(key, stamp).unwrap()).collect();
        assert!(held.iter().all(|h| Arc::ptr_eq(h, &first)));
        assert_eq!(store.bytes(), 400);
        // A new state renders anew; past the cap a capped reader gets the newest copy.
        let newer = RenderStamp { version: 2, ..stamp };
        let second = store.admit(key, newer, vec![b'y'; 400], true).unwrap();
        assert_eq!(store.bytes(), 800);
        let third = store.admit(key, RenderStamp { version: 3, ..stamp }, vec![b'z'; 400], true);
        assert!(Arc::ptr_eq(&third.unwrap(), &second), "over the cap: the newest live copy");
        assert_eq!(store.bytes(), 800);
        // Another file with nothing alive: refused.
        let other = (VFile::Metrics, Reader::Other);
        assert!(store.admit(other, stamp, vec![b'm'; 400], true).is_none());
        // Root is not held to the cap.
        assert!(store
            .admit((VFile::Metrics, Reader::Root), stamp, vec![b'r'; 400], false)
            .is_some());
        // Closing every handle frees the bytes.
        drop((first, held, second));
        assert_eq!(store.bytes(), 0);
        assert!(store.reuse(key, newer).is_none(), "nothing is kept without a handle");
    }

    #[test]
    fn a_million_reschedules_keep_one_entry_per_inode() {
        let mut q = Queue::new();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let inodes = [11u64, 12, 13, 0];
        let mut seed = 0x1234_5678_u64;
        for i in 0..1_000_000u64 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let ino = inodes[(seed >> 33) as usize % inodes.len()];
            // Deadlines move later with every release, as idle deadlines do.
            q.push(ino, t0 + Duration::from_millis(i));
            assert!(q.len() <= inodes.len() && q.by_time.len() <= inodes.len(), "at {i}");
        }
        assert_eq!(q.len(), inodes.len());
        // The earliest asked-for deadline of each inode is kept.
        assert_eq!(q.peek(), Some(t0));
        let due = q.take_due(t0 + Duration::from_secs(10_000));
        let mut sorted = due.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), due.len(), "each inode once: {due:?}");
        assert_eq!(sorted.len(), inodes.len());
        assert!(q.is_empty() && q.by_time.is_empty());
    }

    #[test]
    fn an_earlier_deadline_replaces_a_later_one() {
        let mut q = Queue::new();
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        assert!(q.push(5, t(100)));
        assert!(!q.push(6, t(200)));
        assert!(!q.push(5, t(150)), "a later time for a queued inode changes nothing");
        assert_eq!(q.take_due(t(120)), vec![5]);
        assert!(q.push(6, t(180)), "the only entry is the earliest");
        assert_eq!(q.peek(), Some(t(180)), "an earlier time replaces the queued one");
        assert_eq!(q.len(), 1);
        assert!(q.take_due(t(179)).is_empty());
        assert_eq!(q.take_due(t(180)), vec![6]);
        assert!(q.take_due(t(1000)).is_empty(), "the replaced entry is gone too");
    }
}
