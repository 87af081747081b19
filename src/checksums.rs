//! The checksum thread: the birth SHA-1 of a cache file once its last writer is gone (the
//! daemon does not see passthrough writes, so it reads the covered file), and re-verification
//! every `--verify-interval` or on demand. One thread, rate-limited, never on a request path;
//! a hash is abandoned as soon as the file goes, is renamed away or is opened for writing.
//! A mismatch marks the file corrupt, and its eviction is due at once (it goes as soon as
//! nothing uses or references it).

use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use log::{error, info, warn};

use crate::backing;
use crate::cache::Cache;
use crate::verify::{self, hex, Hashed, Rate};

/// Hashes one file now: a birth checksum if it has none, else a re-verification.
/// Returns `false` if the work was abandoned (file gone or changed).
pub fn check_one(cache: &Cache, ino: u64) -> bool {
    let (name, write_gen, birth) = {
        let state = cache.state.lock();
        let Some(img) = state.image(ino) else { return false };
        let Some(name) = img.name.clone() else { return false };
        if img.writers() > 0 || img.evicting {
            return false;
        }
        (name, img.write_gen, img.checksum.is_none())
    };
    let file = backing::open_path_at(cache.root(), &name).and_then(|fd| {
        let st = backing::stat(fd.as_fd())?;
        if st.ino != ino {
            return Err(std::io::Error::from_raw_os_error(libc::ESTALE));
        }
        backing::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_NOATIME)
            .or_else(|_| backing::reopen(fd.as_fd(), libc::O_RDONLY))
    });
    let file = match file {
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
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    {
        let mut c = cache.counters.lock();
        c.verifier_bytes += size;
        c.verifier_seconds += started.elapsed().as_secs_f64();
    }
    let now = cache.now();
    // Escaped: a name must not add lines to the log.
    let shown = cache.settings.cache_dir.join(crate::text::escape(name.as_bytes()));
    if birth {
        if cache.state.lock().set_checksum(ino, write_gen, digest, now) {
            info!("sha1 of {} is {}", shown.display(), hex(&digest));
        }
    } else {
        let expected = cache.state.lock().image(ino).and_then(|i| i.checksum).map(|c| c.sha1);
        // Bound first: the state lock must be released before `schedule` takes it again.
        let verdict = cache.state.lock().set_verified(ino, write_gen, digest, now);
        match verdict {
            Some(true) => {
                cache.counters.lock().verifications += 1;
                info!("verified {}: sha1 {} ok", shown.display(), hex(&digest));
            }
            Some(false) => {
                {
                    let mut c = cache.counters.lock();
                    c.verifications += 1;
                    c.mismatches += 1;
                }
                error!(
                    "CORRUPT {}: expected sha1 {} found {}; evicting it once nothing uses it",
                    shown.display(),
                    expected.map(|e| hex(&e)).unwrap_or_default(),
                    hex(&digest)
                );
                cache.schedule(ino);
            }
            None => return false,
        }
    }
    cache.changed();
    // An interval of 0 turns periodic re-verification off (on demand still works).
    if cache.settings.verify_interval > 0 {
        cache.verify_at(ino, now + Duration::from_secs(cache.settings.verify_interval));
    }
    true
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
        cache.verify_at(ino, cache.now() + after);
    }
}

/// Runs every checksum job due at the cache's `now` (tests call this instead of sleeping).
pub fn run_once(cache: &Cache) -> usize {
    let now = cache.now();
    cache.take_verify_due(now).into_iter().filter(|&ino| check_one(cache, ino)).count()
}

/// The checksum thread.
pub fn spawn(cache: Arc<Cache>) {
    std::thread::Builder::new()
        .name("checksum".into())
        .spawn(move || loop {
            cache.wait_for_verify();
            run_once(&cache);
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
        (Some(c), v) => Some(v.unwrap_or(c).max(c) + Duration::from_secs(interval)),
    }
}
