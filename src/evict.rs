//! Lazy eviction: one thread sleeps until the earliest deadline (a heap of `(when, inode)`),
//! re-checks that file, and evicts it — no directory walks, no polling, nothing to do while
//! nothing is due. Operator `evict NAME` runs the same [`try_evict`] on the FUSE worker that
//! received it: it waits for no other thread.
//!
//! An eviction is atomic against opens and decided on fresh facts, in this order: Nova's own
//! lock file (`locks/nova-<name>`, `lockf`, non-blocking) is taken first; then, under it, the
//! instance disks' backing files are read and `/proc` is walked for holders outside the mount;
//! then the state lock marks the file `evicting` only if nothing blocks it — from then on an
//! open of it gets `ENOENT`, and an open that came first has already made it blocked; then the
//! file is renamed to a private name, checked to be the same single-link inode, and unlinked;
//! then the lock is released. The kernel's caches are invalidated by the notifier thread
//! (never from a request handler, never waited for), so `stat` says `ENOENT` at once.
//! A daemon that no longer owns its mount decides nothing.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::SystemTime;

use log::{error, info, warn};

use crate::backing;
use crate::cache::{Cache, ControlError};
use crate::guard::{self, LockResult};
use crate::state::{Blocker, CacheState, EventKind};

/// Tells the kernel a name is gone (implemented over fuser's notifier in `fuse.rs`).
pub trait Invalidate: Send + Sync {
    fn deleted(&self, ino: u64, name: &OsStr);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Idle past its kind's threshold.
    Idle,
    /// Its checksum no longer matches.
    Corrupt,
    /// Free space below `--min-free`.
    Pressure,
    /// `imagecachefs evict`.
    Operator,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Idle => "idle",
            Reason::Corrupt => "corrupt",
            Reason::Pressure => "pressure",
            Reason::Operator => "operator",
        }
    }
}

/// Why an attempted eviction did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    Blocked(Blocker),
    /// Nova holds its lock on the file (a spawn or its own cache manager at work).
    NovaLock,
    /// The lock file could not be taken (e.g. the instances directory is missing).
    LockError,
    /// The file changed under us (renamed, removed) or the unlink failed.
    Vanished,
    /// The instance disks could not all be read: the file may be someone's base.
    GuardError,
    /// The /proc walk for holders outside the mount did not finish.
    HoldersUnknown,
    /// The file has another name (a hard link): removing this one frees nothing, and the
    /// other name must keep working.
    Linked,
    /// This daemon's mount was detached: it no longer decides.
    Detached,
    /// Another eviction of the same file (the eviction thread's, an operator's) is under way.
    InProgress,
    /// `--shared`: another host holds a lock on the file (it uses it, or evicts it).
    OtherHost,
    /// `--shared`: free of locks for less than `--shared-quarantine` so far.
    Quarantine,
    /// `--shared`: the lock could not be checked (an error other than "busy", or no answer
    /// in time): nobody knows who uses the file.
    ClusterUnknown,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Blocked(b) => b.as_str(),
            Refused::NovaLock => "locked by nova",
            Refused::LockError => "nova lock file unavailable",
            Refused::Vanished => "changed during eviction",
            Refused::GuardError => "instance disks unreadable",
            Refused::HoldersUnknown => "processes holding it could not all be checked",
            Refused::Linked => "it has another name (hard link)",
            Refused::Detached => "this daemon no longer owns the mount",
            Refused::InProgress => "another eviction of it is under way",
            Refused::OtherHost => "another host uses it (holds its lock)",
            Refused::Quarantine => "free of locks for less than --shared-quarantine so far",
            Refused::ClusterUnknown => "its lock on the shared storage could not be checked",
        }
    }

    /// A refusal because of the other hosts (`imagecachefs_shared_refusals_total`).
    pub fn shared_metric(self) -> Option<&'static str> {
        match self {
            Refused::OtherHost => Some("other_host"),
            Refused::Quarantine => Some("quarantine"),
            Refused::ClusterUnknown => Some("unknown"),
            _ => None,
        }
    }

    fn metric(self) -> &'static str {
        match self {
            Refused::Blocked(Blocker::Writing) => "writing",
            Refused::Blocked(Blocker::InUse) => "in_use",
            Refused::Blocked(Blocker::HeldBeforeMount) => "held_before_mount",
            Refused::Blocked(Blocker::Pinned) => "pinned",
            Refused::Blocked(Blocker::Referenced) => "referenced",
            Refused::Blocked(Blocker::SharedStorage) => "shared_storage",
            Refused::Blocked(Blocker::NotDue) => "not_due",
            Refused::NovaLock => "nova_lock",
            Refused::LockError => "lock_error",
            Refused::Vanished => "vanished",
            Refused::GuardError => "guard_error",
            Refused::HoldersUnknown => "holders_unknown",
            Refused::Linked => "linked",
            Refused::Detached => "detached",
            Refused::InProgress => "in_progress",
            Refused::OtherHost => "other_host",
            Refused::Quarantine => "quarantine",
            Refused::ClusterUnknown => "shared_unknown",
        }
    }
}

/// Tries to evict one file now. `floor`: evict below its threshold if idle at least this
/// long (pressure and operators); `None` keeps the threshold.
pub fn try_evict(
    cache: &Cache,
    ino: u64,
    reason: Reason,
    floor: Option<u64>,
) -> Result<u64, Refused> {
    let Some(name) = cache.state.lock().image(ino).and_then(|i| i.name.clone()) else {
        return Err(Refused::Vanished);
    };
    if !cache.owns_mount() {
        return Err(Refused::Detached);
    }
    if cache.policy.uncoordinated() {
        return Err(Refused::Blocked(Blocker::SharedStorage));
    }
    // Nova's lock first: whatever Nova does to this file (or to overlays on it) under the
    // lock is finished, and cannot start, while the facts below are read and acted on.
    let _lock = match guard::try_nova_lock(&cache.settings.instances_dir, &name) {
        Ok(LockResult::Taken(l)) => l,
        Ok(LockResult::Busy) => return Err(Refused::NovaLock),
        Ok(LockResult::HeldHere) => return Err(Refused::InProgress),
        Err(e) => {
            // Logged with the refusal, once per reason; the details only at debug.
            log::debug!("evicting {}: nova lock file: {e}", shown(&name));
            return Err(Refused::LockError);
        }
    };
    let referenced = cache
        .referenced()
        .map_err(|e| {
            log::debug!("evicting {}: {e}", shown(&name));
            Refused::GuardError
        })?
        .contains(&name);
    cache.refresh_outside(Some(&[ino])).map_err(|e| {
        log::debug!("evicting {}: {e}", shown(&name));
        Refused::HoldersUnknown
    })?;
    let now = cache.now();
    // The other hosts last (their locks are the slowest to ask), and only for a file that
    // nothing here keeps; the exclusive lock is then held until the file is gone.
    let keeper = match cache.keeper() {
        Some(k) => {
            cache
                .state
                .lock()
                .may_evict(ino, &cache.policy, referenced, now, floor)
                .map_err(Refused::Blocked)?;
            ask_other_hosts(cache, k, &name, ino, now)?;
            Some(k)
        }
        None => None,
    };
    let begun = {
        let mut state = cache.state.lock();
        state
            .begin_evict(ino, &cache.policy, referenced, now, floor)
            .map(|()| state.image(ino).map(|i| i.size).unwrap_or(0))
    };
    let size = match begun {
        Ok(size) => size,
        Err(b) => {
            if let Some(k) = keeper {
                k.finish(&name, false);
            }
            return Err(Refused::Blocked(b));
        }
    };
    // The facts above took time: a detach meanwhile hands the directory to another daemon.
    let removed =
        if cache.owns_mount() { remove(cache, &name, ino) } else { Err(Refused::Detached) };
    if let Some(k) = keeper {
        k.finish(&name, removed.is_ok());
    }
    if let Err(why) = removed {
        cache.state.lock().evict_failed(ino);
        return Err(why);
    }
    {
        let mut state = cache.state.lock();
        state.evicted(ino);
        state.event(now, EventKind::Evicted, &name, format!("reason {}", reason.as_str()));
    }
    {
        let mut c = cache.counters.lock();
        *c.evictions.entry(reason.as_str()).or_default() += 1;
        c.reclaimed_bytes += size;
    }
    info!(
        "evicted {} ({} bytes, {})",
        cache.settings.cache_dir.join(shown(&name)).display(),
        size,
        reason.as_str()
    );
    if let Some(inval) = cache.invalidator() {
        inval.deleted(ino, &name);
    }
    cache.changed();
    Ok(size)
}

/// `--shared`: takes the exclusive lock on `name` for its eviction (held until
/// `Keeper::finish`), or says why not. A release on another host after the last one seen
/// here moves the file's last use (and so, unless an operator or pressure evicts it, its
/// deadline) before the caller decides again.
fn ask_other_hosts(
    cache: &Cache,
    keeper: &crate::shared::Keeper,
    name: &OsStr,
    ino: u64,
    now: SystemTime,
) -> Result<(), Refused> {
    use crate::shared::Gate;
    match keeper.gate(name, now) {
        Gate::Go { last_release } => {
            if let Some(m) = last_release {
                cache.used_elsewhere(name, m);
            }
            Ok(())
        }
        Gate::HeldHere => {
            // This host's lock lags a reference that just went: looked at again shortly (no
            // release will come to reschedule it).
            cache.schedule_at(ino, crate::clock::add_secs(now, 5));
            Err(Refused::Blocked(Blocker::InUse))
        }
        Gate::OtherHost => Err(Refused::OtherHost),
        Gate::Quarantine { until } => {
            cache.schedule_at(ino, until);
            Err(Refused::Quarantine)
        }
        Gate::Unknown(why) => {
            warn!("not evicting {}: its cluster lock: {why}", shown(name));
            Err(Refused::ClusterUnknown)
        }
    }
}

/// Removes `name` if it is still inode `ino` with a single link. It is first renamed to a
/// private name and checked there, so that a file renamed onto `name` meanwhile is never the
/// one deleted (it is put back).
fn remove(cache: &Cache, name: &OsStr, ino: u64) -> Result<(), Refused> {
    let root = cache.root();
    let check =
        |n: &OsStr| match backing::open_path_at(root, n).and_then(|fd| backing::stat(fd.as_fd())) {
            Ok(st) if st.ino != ino => Err(Refused::Vanished),
            Ok(st) if st.nlink > 1 => Err(Refused::Linked),
            Ok(_) => Ok(()),
            Err(_) => Err(Refused::Vanished),
        };
    check(name)?;
    let unlink = |n: &OsStr| {
        backing::unlink_at(root, n, false).map_err(|e| {
            error!("evicting {}: unlink: {e}", shown(name));
            Refused::Vanished
        })
    };
    let Some(private) = crate::cache::evicting_name(name) else {
        return unlink(name);
    };
    if let Err(e) = backing::rename_at(root, name, root, &private, libc::RENAME_NOREPLACE) {
        error!("evicting {}: rename to {}: {e}", shown(name), shown(&private));
        return Err(Refused::Vanished);
    }
    match check(&private).and_then(|()| unlink(&private)) {
        Ok(()) => Ok(()),
        Err(why) => {
            // Not ours (or linked meanwhile, or the unlink failed): back under its name.
            if let Err(e) = backing::rename_at(root, &private, root, name, libc::RENAME_NOREPLACE) {
                error!(
                    "evicting {}: putting back a file renamed onto it meanwhile: {e}; it is at {}",
                    shown(name),
                    cache.settings.cache_dir.join(&private).display()
                );
            }
            Err(why)
        }
    }
}

/// Counts a refusal; logs it and records its event when its reason changed since the last
/// one for the file (a referenced file past its deadline is refused again at every retry),
/// or always for an operator's `evict` (whose command reads the reason from `events`).
fn record_refusal(cache: &Cache, ino: u64, why: Refused, operator: bool) {
    let now = cache.now();
    {
        let mut c = cache.counters.lock();
        *c.refusals.entry(why.metric()).or_default() += 1;
        if let Some(m) = why.shared_metric() {
            *c.shared_refusals.entry(m).or_default() += 1;
        }
    }
    let mut state = cache.state.lock();
    let news = state.note_refusal(ino, why.as_str());
    if let Some(name) = state.image(ino).and_then(|i| i.name.clone()) {
        if news {
            warn!("not evicting {}: {}", shown(&name), why.as_str());
        }
        if news || operator {
            state.event(now, EventKind::Refused, &name, why.as_str().to_string());
        }
    }
}

/// A name as the log shows it: escaped, so that it cannot add lines.
fn shown(name: &OsStr) -> String {
    crate::text::escape(name.as_encoded_bytes())
}

/// Evaluates every due entry of the deadline queue at the cache's `now`. Returns how many
/// files were evicted. Tests call this directly instead of sleeping.
pub fn run_once(cache: &Cache) -> usize {
    if !cache.owns_mount() {
        return 0;
    }
    let mut evicted = 0;
    let now = cache.now();
    for ino in cache.take_due(now).into_iter().filter(|&ino| ino != 0) {
        let (deadline, reason) = {
            let state = cache.state.lock();
            let Some(img) = state.image(ino) else { continue };
            let reason = if img.corrupt() { Reason::Corrupt } else { Reason::Idle };
            (CacheState::deadline(img, &cache.policy), reason)
        };
        match deadline {
            None => continue,
            Some(d) if d > now => {
                cache.schedule_at(ino, d);
                continue;
            }
            Some(_) => {}
        }
        match try_evict(cache, ino, reason, None) {
            Ok(_) => evicted += 1,
            // A release or an unpin schedules the file again; nothing to retry.
            Err(Refused::Blocked(Blocker::InUse | Blocker::Writing | Blocker::Pinned)) => {}
            Err(Refused::Blocked(Blocker::NotDue)) => cache.schedule(ino),
            Err(Refused::Vanished | Refused::Detached | Refused::InProgress) => {}
            // Looked at again when the quarantine ends (scheduled by the refusal).
            Err(Refused::Quarantine) => record_refusal(cache, ino, Refused::Quarantine, false),
            Err(why) => {
                record_refusal(cache, ino, why, false);
                // Nothing announces that a lock was dropped, an instance deleted or a process
                // from before the mount gone: look again after a pause that grows with the
                // threshold.
                let retry = match why {
                    Refused::NovaLock => 1,
                    _ => cache.policy.min_age(crate::kind::Kind::Other).clamp(1, 600),
                };
                cache.schedule_at(ino, crate::clock::add_secs(now, retry));
            }
        }
    }
    if cache.settings.min_free.is_some() {
        // Instance disks grow and other writers fill the filesystem without a release here:
        // free space is looked at again soon (one statvfs, no directory walk).
        cache.schedule_at(0, crate::clock::add(now, PRESSURE_CHECK));
    }
    evicted + relieve_pressure(cache)
}

/// How often free space is checked under `--min-free`, whatever happens in the cache.
pub const PRESSURE_CHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// Under `--min-free`, evicts unreferenced, unguarded files least recently used first (none
/// idle for less than `--pressure-min-age`) until the target is met.
pub fn relieve_pressure(cache: &Cache) -> usize {
    let Some(min_free) = cache.settings.min_free else { return 0 };
    let Ok(vfs) = backing::statvfs(cache.root()) else { return 0 };
    let total = vfs.f_blocks * vfs.f_frsize;
    let target = min_free.bytes(total);
    let mut free = vfs.f_bavail * vfs.f_frsize;
    if free >= target {
        if cache.pressure_short.swap(false, std::sync::atomic::Ordering::Relaxed) {
            info!("free space {free} bytes meets the --min-free target {target} again");
        }
        return 0;
    }
    // Each attempt takes Nova's lock, reads every instance disk and walks /proc: files that
    // would be refused anyway (used too recently, or named by the last read of the disks)
    // are not tried.
    let now = cache.now();
    let floor = cache.settings.pressure_min_age;
    let referenced = cache.last_referenced();
    let mut candidates: Vec<(SystemTime, u64)> = {
        let state = cache.state.lock();
        state
            .images()
            .filter(|i| i.refs() == 0 && !i.pinned && i.age(now) >= floor)
            .filter(|i| i.name.as_ref().is_some_and(|n| !referenced.contains(n)))
            .map(|i| (i.last_used, i.ino))
            .collect()
    };
    candidates.sort();
    let mut evicted = 0;
    for (_, ino) in candidates {
        if free >= target {
            break;
        }
        if let Ok(size) = try_evict(cache, ino, Reason::Pressure, Some(floor)) {
            evicted += 1;
            free += size;
        }
    }
    // Said when it starts and when it ends, not at every check.
    let short = free < target;
    if cache.pressure_short.swap(short, std::sync::atomic::Ordering::Relaxed) != short {
        if short {
            warn!("free space {free} bytes is still below the --min-free target {target}: the rest is needed");
        } else {
            info!("free space {free} bytes meets the --min-free target {target} again");
        }
    }
    evicted
}

/// `evict NAME`: now, below its threshold, unless something needs it.
pub fn evict_named(cache: &Cache, name: &OsStr) -> Result<(), ControlError> {
    let ino = cache.ino_of(name).ok_or(ControlError::NoSuchFile)?;
    match try_evict(cache, ino, Reason::Operator, Some(0)) {
        Ok(_) => Ok(()),
        Err(why) => {
            record_refusal(cache, ino, why, true);
            Err(ControlError::Refused(why.as_str()))
        }
    }
}

/// The eviction thread: sleeps until the earliest deadline or a wake-up, then `run_once`.
pub fn spawn(cache: Arc<Cache>) {
    std::thread::Builder::new()
        .name("evict".into())
        .spawn(move || {
            // At mount: deadlines that passed while no daemon ran, and free space.
            run_once(&cache);
            while cache.owns_mount() {
                cache.wait_for_due();
                run_once(&cache);
            }
        })
        .expect("spawn eviction thread");
}
