//! imagecachefs on a real cluster filesystem (issue 13): a one-brick GlusterFS volume with two
//! FUSE clients standing for two compute nodes `a` and `b` (tests/gluster/mod.rs), an
//! imagecachefs daemon over each node's view of the shared `_base`, each node with its own
//! instances directory. What exists is read on the brick, whatever a client caches.
//!
//! Thresholds are seconds; every wait polls with a deadline and every loop is bounded.

mod common;
mod gluster;
mod nova;

use std::fs;
use std::time::Duration;

use gluster::{Cluster, Options};
use nova::{field, icfs, pseudo_random, H1};

/// Ages of every kind, seconds: short, so that a file is overdue within the test.
const AGE: &str = "1";

fn ages() -> Vec<&'static str> {
    vec!["--original-min-age", AGE, "--resized-min-age", AGE, "--partial-min-age", AGE]
}

/// Writes `len` bytes of test data to `path` through a mount and closes it.
fn put(path: &std::path::Path, len: usize, seed: u64) -> Vec<u8> {
    let data = pseudo_random(len, seed);
    fs::write(path, &data).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
    data
}

// ---------------------------------------------------------------------------------------------
// Detection: safe by default

/// Mounted over a GlusterFS client, imagecachefs finds it shared (`config` says `storage:
/// shared` and `filesystem: fuse.glusterfs`, the log says so once at start) and, without
/// `--shared`, evicts nothing: an idle file stays well past its threshold.
#[test]
fn glusterfs_is_detected_as_shared_and_nothing_is_evicted_without_shared() {
    let c = Cluster::new(Options::default());
    let m = c.a.mount(&ages());
    let config = c.a.status_file("config");
    assert_eq!(field(&config, "storage").as_deref(), Some("shared"), "{config}");
    assert_eq!(field(&config, "filesystem").as_deref(), Some("fuse.glusterfs"), "{config}");

    put(&c.a.at(H1), 1 << 20, 1);
    assert!(c.real(H1).is_file(), "{H1} written through node a is not on the brick");
    let threshold: u64 = AGE.parse().unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(4 * threshold + 1);
    while std::time::Instant::now() < end {
        assert!(
            !c.gone(H1),
            "{H1} was evicted on shared storage without --shared\ndaemon log:\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = c.a.status(H1).expect("images/NAME of the idle file");
    assert_eq!(field(&text, "state").as_deref(), Some("idle"), "{text}");
    assert_eq!(field(&text, "evicts_at").as_deref(), Some("never"), "{text}");

    // The operator's `evict` is refused too, with the reason, and changes nothing.
    let (code, out, err) = icfs(&["evict"], &c.a.base, H1);
    assert_ne!(code, 0, "evict on shared storage succeeded: {out}{err}");
    assert!(err.contains("shared storage"), "evict's refusal does not say why: {err}");
    assert_eq!(err.trim().lines().count(), 1, "not a one-line refusal: {err}");
    assert!(c.real(H1).is_file(), "a refused evict removed {H1}");
    let log = m.log_text();
    let said = log.matches("is on shared storage (fuse.glusterfs)").count();
    assert_eq!(said, 1, "the log should say once that the storage is shared:\n{log}");
    drop(m);
}
