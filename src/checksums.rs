//! The checksum thread: the birth SHA-1 of a cache file once its last writer is gone (the
//! daemon does not see passthrough writes, so it reads the covered file), and re-verification
//! every `--verify-interval` or on demand. One thread, rate-limited, never on a request path;
//! a hash is abandoned as soon as the file goes, is renamed away or is opened for writing.
//! The file is stat'ed before and after hashing: a hash of a file that changed meanwhile is
//! discarded, and a file whose stamp (inode, size, mtime) moved since its checksum was
//! written, not corrupted, so it gets a new checksum. Only a different digest under the same
//! stamp is a mismatch: it marks the file corrupt, and its eviction is due at once (it goes
//! as soon as nothing uses or references it).

use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use log::{error, info, warn};

use crate::backing;
use crate::cache::{self, Cache};
use crate::state::{CheckPlan, HashOutcome, Verified};
use crate::verify::{self, hex, Hashed, Rate};

/// Hashes one file now: a birth checksum if it has none, or if it changed since (its stamp
/// moved), else a re-verification; a file whose writing ended without moving its stamp is
/// not hashed at all. Returns `false` if the work was abandoned (file gone or changed).
pub fn check_one(cache: &Cache, ino: u64) -> bool {
    let (name, write_gen) = {
        let state = cache.state.lock();
        let Some(img) = state.image(ino) else { return false };
        let Some(name) = img.name.clone() else { return false };
        if img.writers() > 0 || img.evicting {
            return false;
        }
        (name, img.write_gen)
    };
    let file = backing::open_path_at(cache.root(), &name).and_then(|fd| {
        let st = backing::stat(fd.as_fd())?;
        if st.ino != ino {
            return Err(std::io::Error::from_raw_os_error(libc::ESTALE));
        }
        let file = backing::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_NOATIME)
            .or_else(|_| backing::reopen(fd.as_fd(), libc::O_RDONLY))?;
        Ok((file, st))
    });
    let (file, before) = match file {
        Ok(f) => f,
        Err(e) => {
            // Renamed between reading the name and opening it, or not readable right now.
            let renamed = matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESTALE));
            if !renamed {
                warn!("checksum of {}: {e}", crate::text::escape(name.as_bytes()));
            }
            retry(cache, ino, write_gen, if renamed { Duration::ZERO } else { RETRY_AFTER });
            return false;
        }
    };
    let stamp = cache::stamp(&before);
    let plan = cache.state.lock().plan_check(ino, write_gen, stamp);
    match plan {
        CheckPlan::Skip => {
            retry(cache, ino, write_gen, Duration::ZERO);
            return false;
        }
        // Writing ended and nothing changed: no hash, unless the periodic re-verification is
        // due (its job may have been dropped while a writer had the file). Otherwise that job
        // is still queued.
        CheckPlan::Kept if !periodic_due(cache, ino) => {
            cache.changed();
            return true;
        }
        CheckPlan::Kept | CheckPlan::Hash => {}
    }
    let changed = || {
        let state = cache.state.lock();
        state.image(ino).is_none_or(|i| {
            i.write_gen != write_gen
                || i.writers() > 0
                || i.evicting
                || i.name.as_ref() != Some(&name)
        })
    };
    let rate = match cache.settings.verify_rate_mib {
        0 => Rate(None),
        mib => Rate(Some(mib << 20)),
    };
    let started = Instant::now();
    let digest = match verify::sha1_file(&file, rate, &changed) {
        Ok(Hashed::Done(d)) => d,
        Ok(Hashed::Cancelled) => {
            retry(cache, ino, write_gen, Duration::ZERO);
            return false;
        }
        Err(e) => {
            error!("checksum of {}: read: {e}", crate::text::escape(name.as_bytes()));
            retry(cache, ino, write_gen, RETRY_AFTER);
            return false;
        }
    };
    {
        let mut c = cache.counters.lock();
        c.verifier_bytes += before.size;
        c.verifier_seconds += started.elapsed().as_secs_f64();
    }
    // Escaped: a name must not add lines to the log.
    let shown = cache.settings.cache_dir.join(crate::text::escape(name.as_bytes()));
    // Written meanwhile by someone the daemon does not see: what was read is no one state of
    // the file, neither a checksum nor a verdict.
    if backing::stat(file.as_fd()).map(|after| cache::stamp(&after)).ok() != Some(stamp) {
        info!("{} changed while it was hashed; hashing it again later", shown.display());
        retry(cache, ino, write_gen, RETRY_AFTER);
        return false;
    }
    if !cache.owns_mount() {
        // A daemon whose mount was detached records no verdict: the files may be in another
        // daemon's hands by now.
        return false;
    }
    let now = cache.now();
    // Bound first: the state lock must be released before `schedule` takes it again.
    let outcome = cache.state.lock().record_hash(ino, write_gen, digest, stamp, now);
    match outcome {
        Some(HashOutcome::Created { replaced: None }) => {
            info!("sha1 of {} is {}", shown.display(), hex(&digest));
        }
        Some(HashOutcome::Created { replaced: Some(old) }) => {
            warn!(
                "{} was changed behind the mount (its size or mtime moved): new sha1 {}, \
                 replacing {}; not corruption",
                shown.display(),
                hex(&digest),
                hex(&old)
            );
        }
        Some(HashOutcome::Verified) => {
            cache.counters.lock().verifications += 1;
            info!("verified {}: sha1 {} ok", shown.display(), hex(&digest));
        }
        Some(HashOutcome::Corrupt { expected }) => {
            {
                let mut c = cache.counters.lock();
                c.verifications += 1;
                c.mismatches += 1;
            }
            error!(
                "CORRUPT {}: expected sha1 {} found {}; evicting it once nothing uses it",
                shown.display(),
                hex(&expected),
                hex(&digest)
            );
            cache.schedule(ino);
        }
        None => return false,
    }
    cache.changed();
    // An interval of 0 turns periodic re-verification off (on demand still works).
    if cache.settings.verify_interval > 0 {
        cache.verify_at(ino, crate::clock::add_secs(now, cache.settings.verify_interval));
    }
    true
}

/// Whether the file's periodic re-verification is due now.
fn periodic_due(cache: &Cache, ino: u64) -> bool {
    let times = cache.state.lock().image(ino).and_then(|i| {
        let v = match i.verified {
            Verified::Ok(t) | Verified::Mismatch(t) => Some(t),
            Verified::Never | Verified::Pending => None,
        };
        Some((i.checksum?.at, v))
    });
    let now = cache.now();
    times
        .and_then(|(at, v)| next_check(Some(at), v, cache.settings.verify_interval, now))
        .is_some_and(|next| next <= now)
}

/// Pause before hashing again a file that could not be read.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Queues an abandoned job again if the file is still there as it was: renamed (`X.converted`
/// -> `X`) needs the job under its new name. A file reopened for writing is left alone (its
/// writer's release queues it).
fn retry(cache: &Cache, ino: u64, write_gen: u64, after: Duration) {
    let again = cache.state.lock().image(ino).is_some_and(|i| {
        i.write_gen == write_gen && i.writers() == 0 && !i.evicting && i.name.is_some()
    });
    if again {
        cache.verify_at(ino, crate::clock::add(cache.now(), after));
    }
}

/// Runs every checksum job due at the cache's `now` (tests call this instead of sleeping).
pub fn run_once(cache: &Cache) -> usize {
    if !cache.owns_mount() {
        return 0;
    }
    let now = cache.now();
    cache.take_verify_due(now).into_iter().filter(|&ino| check_one(cache, ino)).count()
}

/// The checksum thread.
pub fn spawn(cache: Arc<Cache>) {
    std::thread::Builder::new()
        .name("checksum".into())
        .spawn(move || {
            while cache.owns_mount() {
                cache.wait_for_verify();
                run_once(&cache);
            }
        })
        .expect("spawn checksum thread");
}

/// When a file's next check is due, given what is known about it: its birth checksum at
/// once, a re-verification an interval after the last one (never with an interval of 0).
pub fn next_check(
    checksum_at: Option<SystemTime>,
    verified_at: Option<SystemTime>,
    interval: u64,
    now: SystemTime,
) -> Option<SystemTime> {
    match (checksum_at, verified_at) {
        (None, _) => Some(now),
        (Some(_), _) if interval == 0 => None,
        (Some(c), v) => Some(crate::clock::add_secs(v.unwrap_or(c).max(c), interval)),
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::os::fd::OwnedFd;

    use super::*;
    use crate::cache::{Settings, VFile};
    use crate::clock::{from_unix_secs, ManualClock};
    use crate::procfs::ProcRoot;
    use crate::state::Policy;

    const NAME: &str = "0d5e6b61602d758984b3bf038267614d6016eb2a";
    const DAY: u64 = 86_400;

    /// A cache over a temporary directory holding one file, with a manual clock.
    fn cache(tmp: &std::path::Path, clock: Arc<ManualClock>) -> Arc<Cache> {
        let base = tmp.join("_base");
        std::fs::create_dir_all(&base).unwrap();
        std::fs::create_dir_all(tmp.join("proc")).unwrap();
        std::fs::write(base.join(NAME), vec![7u8; 100_000]).unwrap();
        let root: OwnedFd = std::fs::File::open(&base).unwrap().into();
        let settings = Settings {
            cache_dir: base,
            instances_dir: tmp.to_path_buf(),
            min_free: None,
            pressure_min_age: 600,
            verify_interval: DAY,
            verify_rate_mib: 0,
            own_dev: None,
        };
        Cache::open(root, Policy::default(), clock, ProcRoot(tmp.join("proc")), settings, vec![])
            .unwrap()
    }

    fn shown(c: &Cache, ino: u64) -> String {
        String::from_utf8(c.render(VFile::Image(ino))).unwrap()
    }

    /// A periodic re-verification that fell due while a writer held the file is not lost
    /// when writing ends without a change: the stamp check goes on to hash the file.
    #[test]
    fn a_verification_due_during_writing_runs_when_writing_ends() {
        let tmp = tempfile::Builder::new().prefix("icfs-test-checksums").tempdir().unwrap();
        let clock = ManualClock::new(from_unix_secs(1_800_000_000));
        let c = cache(tmp.path(), clock.clone());
        let ino = c.ino_of(OsStr::new(NAME)).unwrap();
        assert_eq!(run_once(&c), 1, "the birth checksum");
        assert!(shown(&c, ino).contains("verified: never"));

        // Opened for writing (nothing written) across the day the verification falls due.
        assert!(c.opened(ino, 1, 1, true));
        clock.advance(Duration::from_secs(DAY + 1));
        assert_eq!(run_once(&c), 0, "never hashed while a writer has it");
        assert_eq!(c.released(1, None), crate::state::RefEffect::WritingDone { ino, write_gen: 1 });
        assert_eq!(run_once(&c), 1);
        let text = shown(&c, ino);
        assert!(text.contains("verified: ok "), "{text}");

        // Written for a moment again, before the next day: no hash at all.
        let birth_and_verify = c.counters.lock().verifier_bytes;
        assert!(c.opened(ino, 2, 1, true));
        c.released(2, None);
        assert_eq!(run_once(&c), 1);
        assert_eq!(c.counters.lock().verifier_bytes, birth_and_verify, "hashed again");
        assert!(shown(&c, ino).contains("verified: ok "));
    }
}
