//! Extreme configuration values never panic: every deadline (eviction, re-verification, the
//! status files' `evicts_at`) is computed with saturating time arithmetic, whatever the ages,
//! the interval and the clock say. The cache runs over a plain temporary directory with a
//! manual clock, as in `core.rs`; `evict::run_once` and `checksums::run_once` are called
//! directly. Values the parsers now refuse (above ten years) are fed in anyway: the arithmetic
//! must hold even if a bound is ever loosened.

use std::ffi::{CString, OsStr};
use std::fs;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use imagecachefs::cache::{Cache, Settings, VFile};
use imagecachefs::checksums::next_check;
use imagecachefs::clock::{add_secs, far_future, from_unix_secs, unix_secs, ManualClock};
use imagecachefs::config::MAX_SECS;
use imagecachefs::procfs::ProcRoot;
use imagecachefs::state::Policy;
use imagecachefs::{checksums, evict};

const ORIG: &str = "0d5e6b61602d758984b3bf038267614d6016eb2a";
const RESIZED: &str = "0d5e6b61602d758984b3bf038267614d6016eb2a_10";
const PART: &str = "1111111111111111111111111111111111111111.part";

/// Seconds at the edges: 0, 1, the largest accepted, just above, i64/u64 limits, the far
/// future, and anything.
fn secs() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(MAX_SECS),
        Just(MAX_SECS + 1),
        Just(i64::MAX as u64),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(imagecachefs::clock::FAR_FUTURE_SECS),
        any::<u64>(),
    ]
}

/// Where the manual clock starts: the epoch, today, the far future, anything it can hold.
fn start() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1_800_000_000),
        Just(imagecachefs::clock::FAR_FUTURE_SECS),
        0..=imagecachefs::clock::FAR_FUTURE_SECS,
    ]
}

fn open_cache(
    tmp: &tempfile::TempDir,
    clock: Arc<ManualClock>,
    policy: Policy,
    verify_interval: u64,
    pressure_min_age: u64,
) -> Arc<Cache> {
    let base = tmp.path().join("instances/_base");
    let c = CString::new(base.as_os_str().as_bytes()).unwrap();
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    assert!(fd >= 0);
    let settings = Settings {
        cache_dir: base,
        instances_dir: tmp.path().join("instances"),
        min_free: Some(imagecachefs::config::MinFree::Percent(99.9)),
        pressure_min_age,
        verify_interval,
        verify_rate_mib: 0,
        own_dev: None,
    };
    Cache::open(
        unsafe { OwnedFd::from_raw_fd(fd) },
        policy,
        clock,
        ProcRoot(tmp.path().join("proc")),
        settings,
        Vec::new(),
    )
    .unwrap()
}

/// Opens a cache over three files with the given values, uses, releases, verifies, renders and
/// evicts around the clock's jumps; returns the status table and the original's status file
/// (empty once it is evicted).
fn exercise(
    ages: [u64; 3],
    interval: u64,
    pressure: u64,
    start: u64,
    jumps: &[u64],
) -> (String, String) {
    let tmp = tempfile::Builder::new().prefix("icfs-test-extremes").tempdir().unwrap();
    fs::create_dir_all(tmp.path().join("instances/_base")).unwrap();
    fs::create_dir_all(tmp.path().join("proc")).unwrap();
    for name in [ORIG, RESIZED, PART] {
        fs::write(tmp.path().join("instances/_base").join(name), name.as_bytes()).unwrap();
    }
    let clock = ManualClock::new(from_unix_secs(start));
    let policy = Policy {
        original_min_age: ages[0],
        resized_min_age: ages[1],
        partial_min_age: ages[2],
        evict: true,
        shared: None,
    };
    let c = open_cache(&tmp, clock.clone(), policy, interval, pressure);
    checksums::run_once(&c);
    let ino = c.ino_of(OsStr::new(ORIG)).expect("the original is known");
    assert!(c.opened(ino, 1, 1, false));
    for (i, &jump) in jumps.iter().enumerate() {
        clock.advance(Duration::from_secs(jump));
        if i == 0 {
            c.released(1, None);
        }
        for (_, ino) in c.names() {
            c.schedule(ino);
            c.render(VFile::Image(ino));
        }
        evict::run_once(&c);
        checksums::run_once(&c);
        c.render(VFile::StatusJson);
        c.render(VFile::Metrics);
    }
    c.persist();
    let image = c.ino_of(OsStr::new(ORIG)).map(|i| c.render(VFile::Image(i))).unwrap_or_default();
    (String::from_utf8(c.render(VFile::Status)).unwrap(), String::from_utf8(image).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn extreme_values_never_panic(
        ages in [secs(), secs(), secs()],
        interval in secs(),
        pressure in secs(),
        start in start(),
        jumps in proptest::collection::vec(secs(), 1..4),
    ) {
        let (table, _) = exercise(ages, interval, pressure, start, &jumps);
        prop_assert!(table.lines().count() >= 1, "the status table renders: {table:?}");
    }

    #[test]
    fn deadlines_saturate_and_never_precede_their_start(
        age in secs(), interval in secs(), at in start(),
    ) {
        let t = from_unix_secs(at);
        let d = add_secs(t, age);
        prop_assert!(d >= t && d <= far_future().max(t));
        prop_assert_eq!(unix_secs(d), (at.saturating_add(age)).min(imagecachefs::clock::FAR_FUTURE_SECS).max(at));
        match next_check(Some(t), Some(t), interval, t) {
            None => prop_assert_eq!(interval, 0),
            Some(n) => prop_assert!(n >= t && n <= far_future().max(t)),
        }
    }
}

#[test]
fn deadline_of_an_idle_file_saturates() {
    // CacheState::deadline through a real image: an original that may idle u64::MAX seconds
    // evicts at the far future instead of panicking, and its re-verification is as far.
    let (table, image) =
        exercise([u64::MAX, u64::MAX, u64::MAX], u64::MAX, u64::MAX, 1_800_000_000, &[1]);
    assert!(table.contains(ORIG), "{table}");
    assert!(image.lines().any(|l| l == "state: idle"), "{image}");
    let want = format!("evicts_at: {}", imagecachefs::clock::rfc3339(far_future()));
    assert!(image.lines().any(|l| l == want), "want {want:?} in\n{image}");
}
