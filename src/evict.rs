//! Lazy eviction: one thread sleeps until the earliest deadline (a heap of `(when, inode)`),
//! re-checks that file, and evicts it — no directory walks, no polling, nothing to do while
//! nothing is due.
//!
//! An eviction is atomic against opens: under Nova's own lock file (`locks/nova-<name>`,
//! `lockf`, non-blocking), the state lock marks the file `evicting` only if nothing blocks it;
//! from then on an open of it gets `ENOENT`, and an open that came first has already made it
//! blocked. Then the name is unlinked, the entry dropped, and the kernel's caches invalidated
//! from this thread (never from a request handler), so `stat` says `ENOENT` at once.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Blocked(b) => b.as_str(),
            Refused::NovaLock => "locked by nova",
            Refused::LockError => "nova lock file unavailable",
            Refused::Vanished => "changed during eviction",
            Refused::GuardError => "instance disks unreadable",
        }
    }

    fn metric(self) -> &'static str {
        match self {
            Refused::Blocked(Blocker::Writing) => "writing",
            Refused::Blocked(Blocker::InUse) => "in_use",
            Refused::Blocked(Blocker::HeldBeforeMount) => "held_before_mount",
            Refused::Blocked(Blocker::Pinned) => "pinned",
            Refused::Blocked(Blocker::Referenced) => "referenced",
            Refused::Blocked(Blocker::NotDue) => "not_due",
            Refused::NovaLock => "nova_lock",
            Refused::LockError => "lock_error",
            Refused::Vanished => "vanished",
            Refused::GuardError => "guard_error",
        }
    }
}

/// What the guards outside the bookkeeping say, read once per eviction pass: holders from
/// before the mount re-checked in /proc, and the backing-file names of every instance disk
/// (`None`: not all of them could be read, so no file may go).
pub struct Guards {
    referenced: Option<BTreeSet<OsString>>,
}

impl Guards {
    pub fn read(cache: &Cache) -> Self {
        cache.recheck_early();
        Guards { referenced: cache.referenced().ok() }
    }
}

/// Tries to evict one file now. `floor`: evict below its threshold if idle at least this
/// long (pressure and operators); `None` keeps the threshold.
pub fn try_evict(
    cache: &Cache,
    ino: u64,
    reason: Reason,
    floor: Option<u64>,
    guards: &Guards,
) -> Result<u64, Refused> {
    let Some(name) = cache.state.lock().image(ino).and_then(|i| i.name.clone()) else {
        return Err(Refused::Vanished);
    };
    let referenced = guards.referenced.as_ref().ok_or(Refused::GuardError)?.contains(&name);
    let _lock = match guard::try_nova_lock(&cache.settings.instances_dir, &name) {
        Ok(LockResult::Taken(l)) => l,
        Ok(LockResult::Busy) => return Err(Refused::NovaLock),
        Err(e) => {
            warn!("evicting {}: nova lock file: {e}", name.to_string_lossy());
            return Err(Refused::LockError);
        }
    };
    let now = cache.now();
    let size = {
        let mut state = cache.state.lock();
        state.begin_evict(ino, &cache.policy, referenced, now, floor).map_err(Refused::Blocked)?;
        state.image(ino).map(|i| i.size).unwrap_or(0)
    };
    // The name must still be this inode: never remove a file that replaced it.
    let same = backing::open_path_at(cache.root(), &name)
        .and_then(|fd| backing::stat(fd.as_fd()))
        .is_ok_and(|st| st.ino == ino);
    let removed = same && {
        match backing::unlink_at(cache.root(), &name, false) {
            Ok(()) => true,
            Err(e) => {
                error!("evicting {}: unlink: {e}", name.to_string_lossy());
                false
            }
        }
    };
    if !removed {
        cache.state.lock().evict_failed(ino);
        return Err(Refused::Vanished);
    }
    let shown = name.to_string_lossy().into_owned();
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
        cache.settings.cache_dir.join(&shown).display(),
        size,
        reason.as_str()
    );
    if let Some(inval) = cache.invalidator() {
        inval.deleted(ino, &name);
    }
    cache.changed();
    Ok(size)
}

fn record_refusal(cache: &Cache, ino: u64, why: Refused) {
    let now = cache.now();
    *cache.counters.lock().refusals.entry(why.metric()).or_default() += 1;
    let mut state = cache.state.lock();
    if let Some(name) = state.image(ino).and_then(|i| i.name.clone()) {
        warn!("not evicting {}: {}", name.to_string_lossy(), why.as_str());
        state.event(now, EventKind::Refused, &name, why.as_str().to_string());
    }
}

/// Evaluates every due entry of the deadline queue at the cache's `now`. Returns how many
/// files were evicted. Tests call this directly instead of sleeping.
pub fn run_once(cache: &Cache) -> usize {
    let mut evicted = 0;
    for (name, reply) in cache.take_operator_jobs() {
        let result = evict_named(cache, &name);
        evicted += usize::from(result.is_ok());
        let _ = reply.send(result);
    }
    let now = cache.now();
    let mut guards = None;
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
        let guards = guards.get_or_insert_with(|| Guards::read(cache));
        match try_evict(cache, ino, reason, None, guards) {
            Ok(_) => evicted += 1,
            // A release or an unpin schedules the file again; nothing to retry.
            Err(Refused::Blocked(Blocker::InUse | Blocker::Writing | Blocker::Pinned)) => {}
            Err(Refused::Blocked(Blocker::NotDue)) => cache.schedule(ino),
            Err(Refused::Vanished) => {}
            Err(why) => {
                record_refusal(cache, ino, why);
                // Nothing announces that a lock was dropped or an instance deleted: look again
                // after a pause that grows with the threshold.
                let retry = match why {
                    Refused::NovaLock => 1,
                    _ => cache.policy.min_age(crate::kind::Kind::Other).clamp(1, 600),
                };
                cache.schedule_at(ino, now + Duration::from_secs(retry));
            }
        }
    }
    evicted + relieve_pressure(cache)
}

/// Under `--min-free`, evicts unreferenced, unguarded files least recently used first (none
/// idle for less than `--pressure-min-age`) until the target is met.
pub fn relieve_pressure(cache: &Cache) -> usize {
    let Some(min_free) = cache.settings.min_free else { return 0 };
    let Ok(vfs) = backing::statvfs(cache.root()) else { return 0 };
    let total = vfs.f_blocks * vfs.f_frsize;
    let target = min_free.bytes(total);
    let mut free = vfs.f_bavail * vfs.f_frsize;
    if free >= target {
        return 0;
    }
    let mut candidates: Vec<(SystemTime, u64)> = {
        let state = cache.state.lock();
        state
            .images()
            .filter(|i| i.refs() == 0 && !i.pinned)
            .map(|i| (i.last_used, i.ino))
            .collect()
    };
    candidates.sort();
    let guards = Guards::read(cache);
    let mut evicted = 0;
    for (_, ino) in candidates {
        if free >= target {
            break;
        }
        let floor = Some(cache.settings.pressure_min_age);
        if let Ok(size) = try_evict(cache, ino, Reason::Pressure, floor, &guards) {
            evicted += 1;
            free += size;
        }
    }
    if free < target {
        warn!("free space {free} bytes is still below the --min-free target {target}: the rest is needed");
    }
    evicted
}

/// `evict NAME`: now, below its threshold, unless something needs it.
pub fn evict_named(cache: &Cache, name: &OsStr) -> Result<(), ControlError> {
    let ino = cache.ino_of(name).ok_or(ControlError::NoSuchFile)?;
    match try_evict(cache, ino, Reason::Operator, Some(0), &Guards::read(cache)) {
        Ok(_) => Ok(()),
        Err(why) => {
            record_refusal(cache, ino, why);
            Err(ControlError::Refused(why.as_str()))
        }
    }
}

/// The eviction thread: sleeps until the earliest deadline or a wake-up, then `run_once`.
pub fn spawn(cache: Arc<Cache>) {
    std::thread::Builder::new()
        .name("evict".into())
        .spawn(move || loop {
            cache.wait_for_due();
            run_once(&cache);
        })
        .expect("spawn eviction thread");
}
