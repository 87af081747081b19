//! Lazy eviction through a real mount (PRODUCT.md, "Never evict what is needed" and "Eviction
//! is atomic against opens"): a cache file goes the moment it has no reference and its idle age
//! passed its kind's threshold, and never while a QEMU process holds it, a writer has it open,
//! an operator pinned it, a stopped instance's disk names it as its backing file or Nova holds
//! its lock file.
//!
//! Layout of every test: `<tmp>/instances/_base` is the mounted cache directory (so the
//! instances directory is its parent, as on a compute node), `<tmp>/instances/locks` Nova's lock
//! directory, `<tmp>/covered` a bind mount of `_base` made before the overlay (the real files),
//! and `<tmp>/elsewhere` a directory outside the instances directory for overlays whose base
//! must not be guarded by the backing-file scan. Thresholds are seconds; everything polls with
//! a deadline. Every background process is owned by a [`Proc`], killed on drop.

mod common;
mod nova;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    convert_to_raw, overlay, run_ok, splitmix64, tool, wait_until, Proc, LOCKER, READER, WRITER,
};
use nova::*;

// ---------------------------------------------------------------------------------------------
// 1. Nova's flow, a QEMU holder, then idle eviction

/// Nova's download (`.part`, `qemu-img convert -t none` to `.converted`, rename) inside the
/// mount; `qemu-nbd` on an overlay outside the instances directory holds the base past twice
/// its threshold; once it stops, the base goes about one threshold later, `stat` says `ENOENT`
/// at once, the event is logged and the real file is gone.
#[test]
fn qemu_holder_keeps_the_base_and_it_goes_one_threshold_after_the_holder_stops() {
    const T: u64 = 3;
    let n = Nova::new();
    let src_dir = n.s.path("src");
    fs::create_dir_all(&src_dir).unwrap();
    let raw_bytes = pseudo_random(8 << 20, 1);
    let (raw, qcow2) = (src_dir.join("src.raw"), src_dir.join("src.qcow2"));
    fs::write(&raw, &raw_bytes).unwrap();
    run_ok(tool("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow2));

    let t = T.to_string();
    let m = n.mount((&t, LONG, LONG), &[]);
    let part = n.at(&format!("{H1}.part"));
    let converted = n.at(&format!("{H1}.converted"));
    write_file(&part, &fs::read(&qcow2).unwrap());
    convert_to_raw(&part, &converted);
    fs::remove_file(&part).unwrap();
    fs::rename(&converted, n.at(H1)).unwrap();
    assert!(fs::read(n.real(H1)).unwrap() == raw_bytes, "converted base differs from the source");

    // A running "VM": qemu-nbd serving an overlay that lives outside the instances directory,
    // so only its open file keeps the base.
    let disk = n.elsewhere("disk.qcow2");
    overlay(&disk, &n.at(H1));
    let sock = n.elsewhere("nbd.sock");
    let mut nbd = Proc::spawn(
        tool("qemu-nbd").args(["--persistent", "-f", "qcow2", "-k"]).arg(&sock).arg(&disk),
    );
    nbd.wait_for_socket(&sock);
    wait_until(Duration::from_secs(5), "the base to be in use by qemu-nbd", || {
        (n.field(H1, "state") == "in-use").then_some(())
    });
    let holders = n.field(H1, "holders");
    assert!(
        holders.contains(&nbd.pid().to_string()) && holders.contains("qemu-nbd"),
        "holders of {H1} should name qemu-nbd (pid {}): {holders:?}",
        nbd.pid()
    );
    n.stays(&m, H1, Duration::from_secs(2 * T), "qemu-nbd holds it open");
    nbd.assert_alive();
    let text = n.status(H1).unwrap();
    assert_eq!(field(&text, "state").as_deref(), Some("in-use"), "{text}");
    assert_eq!(field(&text, "evicts_at").as_deref(), Some("-"), "{text}");
    assert_eq!(field(&text, "refs").as_deref(), Some("1"), "{text}");
    // Cache the name in the kernel: after the eviction it must be invalidated, not expire.
    assert!(fs::metadata(n.at(H1)).is_ok());

    let stopped = Instant::now();
    nbd.terminate();
    wait_until(Duration::from_secs(3), "the base to become idle after qemu-nbd exited", || {
        match n.status(H1).and_then(|t| field(&t, "state")) {
            Some(s) if s == "idle" => Some(()),
            None => Some(()), // already gone: the timing check below reports it
            Some(_) => None,
        }
    });
    if let Some(text) = n.status(H1) {
        let at = field(&text, "evicts_at").unwrap_or_default();
        assert!(
            at.ends_with('Z') && at.contains('T'),
            "idle file's evicts_at is not a time: {text}"
        );
    }
    let evicted = n.wait_evicted(H1, Duration::from_secs(T + 3));
    let after = evicted - stopped;
    assert!(
        after >= Duration::from_secs(T - 1),
        "{H1} was evicted {after:?} after its last holder stopped, before its {T} s threshold"
    );
    n.assert_fully_evicted(H1);
    assert!(
        n.has_event(&format!("evicted {H1} reason idle")),
        "no `evicted {H1} reason idle` event:\n{}",
        n.events()
    );
    // The source of the overlay is unaffected.
    assert!(disk.is_file());
    drop(m);
}

/// A process that opened the base before the mount (a VM started before imagecachefs) is
/// found through `/proc` and keeps the base; once it exits the base goes.
#[test]
fn a_holder_from_before_the_mount_keeps_the_base() {
    const T: u64 = 1;
    let n = Nova::new();
    // Not mounted yet: this is the plain directory.
    write_file(&n.at(H1), &pseudo_random(256 << 10, 9));
    let mut reader = Proc::python(READER, &[&n.at(H1)]);
    reader.wait_line("ready");
    let m = n.mount(("1", "2", "2"), &[]);
    let text = n.status(H1).unwrap_or_else(|| panic!("no images/{H1}:\n{}", m.log_text()));
    assert_eq!(field(&text, "state").as_deref(), Some("in-use"), "{text}");
    assert_eq!(field(&text, "refs").as_deref(), Some("1"), "{text}");
    assert_eq!(field(&text, "evicts_at").as_deref(), Some("-"), "{text}");
    let holders = field(&text, "holders").unwrap_or_default();
    assert!(
        holders.contains(&reader.pid().to_string()),
        "holders should name pid {}: {text}",
        reader.pid()
    );

    n.stays(&m, H1, Duration::from_secs(3 * T + 1), "a process from before the mount holds it");
    reader.assert_alive();
    reader.kill();
    n.wait_evicted(H1, Duration::from_secs(8));
    n.assert_fully_evicted(H1);
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// 2. A stopped instance's disk guards its base

/// No process holds the base, but `instances/<uuid>/disk` names it as its backing file: it
/// stays past three thresholds, shows `referenced`, and the refusal is logged. Once the
/// instance is deleted, the base goes.
#[test]
fn stopped_instance_overlay_keeps_its_base() {
    const T: u64 = 2;
    let n = Nova::new();
    let t = T.to_string();
    let m = n.mount((&t, &t, &t), &[]);
    write_file(&n.at(H2), &pseudo_random(1 << 20, 2));
    let inst = n.instances.join(INSTANCE);
    overlay(&inst.join("disk"), &n.at(H2));
    fs::write(
        inst.join("disk.info"),
        format!("{{\"{}\": \"qcow2\"}}", inst.join("disk").display()),
    )
    .unwrap();

    n.stays(
        &m,
        H2,
        Duration::from_secs(3 * T),
        "a stopped instance's disk names it as backing file",
    );
    let text = n.status(H2).unwrap();
    assert_eq!(field(&text, "state").as_deref(), Some("referenced"), "{text}");
    assert_eq!(field(&text, "evicts_at").as_deref(), Some("-"), "{text}");
    assert_eq!(field(&text, "refs").as_deref(), Some("0"), "{text}");
    assert!(
        n.has_event(&format!("eviction-refused {H2} ")),
        "no `eviction-refused {H2}` event after its deadline passed:\n{}",
        n.events()
    );

    // The instance is deleted: nothing needs the base any more.
    fs::remove_dir_all(&inst).unwrap();
    n.wait_evicted(H2, Duration::from_secs(15));
    n.assert_fully_evicted(H2);
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// 3. Partial downloads

/// A `.part` and a `.converted` left behind (no writer) go after `--partial-min-age`; a `.part`
/// that a process holds open for writing stays, shown as `writing`, and goes once it is closed.
#[test]
fn stale_partial_files_go_and_one_being_written_stays() {
    const T: u64 = 2;
    let n = Nova::new();
    let t = T.to_string();
    let m = n.mount((LONG, LONG, &t), &[]);
    let live = format!("{H2}.part");
    let mut writer = Proc::python(WRITER, &[&n.at(&live)]);
    writer.wait_line("ready");

    let stale = format!("{H1}.part");
    let stale_conv = format!("{H3}.converted");
    write_file(&n.at(&stale), &pseudo_random(64 << 10, 3));
    write_file(&n.at(&stale_conv), &pseudo_random(64 << 10, 4));
    let written = Instant::now();
    assert_eq!(n.field(&stale, "kind"), "partial");
    assert_eq!(n.field(&stale, "min_age"), t);
    for name in [&stale, &stale_conv] {
        let at = n.wait_evicted(name, Duration::from_secs(T + 3));
        assert!(
            at - written >= Duration::from_secs(T - 1),
            "{name} went {:?} after it was written, before its {T} s threshold",
            at - written
        );
        n.assert_fully_evicted(name);
        assert!(n.has_event(&format!("evicted {name} reason idle")), "{}", n.events());
    }

    n.stays(&m, &live, Duration::from_secs(T + 1), "a writer holds it open");
    writer.assert_alive();
    let text = n.status(&live).unwrap();
    assert_eq!(field(&text, "state").as_deref(), Some("writing"), "{text}");
    assert_eq!(field(&text, "evicts_at").as_deref(), Some("-"), "{text}");
    assert_eq!(fs::metadata(n.real(&live)).unwrap().len(), 65536);

    let closed = Instant::now();
    writer.kill();
    let at = n.wait_evicted(&live, Duration::from_secs(T + 3));
    assert!(at - closed >= Duration::from_secs(T - 1), "{live} went before its threshold");
    n.assert_fully_evicted(&live);
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// 4. Nova's lock file

/// Another process holds `locks/nova-<name>` with `lockf`: the file is not evicted while the
/// lock is held, goes soon after it is released, and the lock file itself is never removed.
#[test]
fn nova_lock_defers_eviction_and_the_lock_file_stays() {
    const T: u64 = 2;
    let n = Nova::new();
    let t = T.to_string();
    let m = n.mount((&t, &t, &t), &[]);
    let lock = n.lock_file(H1);
    let mut locker = Proc::python(LOCKER, &[&lock]);
    locker.wait_line("locked");
    write_file(&n.at(H1), &pseudo_random(256 << 10, 5));

    n.stays(&m, H1, Duration::from_secs(3 * T), "Nova holds its lock file");
    locker.assert_alive();
    assert!(
        n.has_event(&format!("eviction-refused {H1} ")),
        "no `eviction-refused {H1}` event while Nova held the lock:\n{}",
        n.events()
    );

    locker.kill();
    n.wait_evicted(H1, Duration::from_secs(T + 3));
    n.assert_fully_evicted(H1);
    assert!(lock.is_file(), "the eviction removed Nova's lock file {lock:?}");
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// 5. Pins and --no-evict

/// A pinned file stays past three thresholds (`pinned`, `evicts_at: -`); after `unpin` it goes
/// within a threshold.
#[test]
fn pinned_file_stays_until_unpinned() {
    const T: u64 = 2;
    let n = Nova::new();
    let t = T.to_string();
    let m = n.mount((&t, &t, &t), &[]);
    write_file(&n.at(H1), &pseudo_random(256 << 10, 6));
    let (code, out, err) = icfs(&["pin"], &n.dir, H1);
    assert_eq!(code, 0, "pin failed:\n{out}{err}");
    let text = n.status(H1).unwrap();
    assert_eq!(field(&text, "state").as_deref(), Some("pinned"), "{text}");
    assert_eq!(field(&text, "evicts_at").as_deref(), Some("-"), "{text}");

    n.stays(&m, H1, Duration::from_secs(3 * T), "it is pinned");
    let (code, out, err) = icfs(&["unpin"], &n.dir, H1);
    assert_eq!(code, 0, "unpin failed:\n{out}{err}");
    n.wait_evicted(H1, Duration::from_secs(T + 3));
    n.assert_fully_evicted(H1);
    drop(m);
}

/// `--no-evict`: nothing goes by age, whatever its kind; `evicts_at` says `never`.
#[test]
fn no_evict_keeps_every_kind() {
    let n = Nova::new();
    let m = n.mount(("1", "1", "1"), &["--no-evict"]);
    let names = [
        H1.to_string(),
        format!("{H2}_10737418240"),
        format!("{H3}.part"),
        format!("{H4}.converted"),
        "ephemeral_1_0706d66".to_string(),
        "swap_512".to_string(),
        "something-else".to_string(),
    ];
    for (i, name) in names.iter().enumerate() {
        write_file(&n.at(name), &pseudo_random(64 << 10, 10 + i as u64));
    }
    std::thread::sleep(Duration::from_secs(3));
    for name in &names {
        assert!(n.real(name).is_file() && n.at(name).is_file(), "--no-evict evicted {name}");
        let text = n.status(name).unwrap();
        assert_eq!(field(&text, "state").as_deref(), Some("idle"), "{text}");
        assert_eq!(field(&text, "evicts_at").as_deref(), Some("never"), "{text}");
    }
    assert!(!n.has_event("evicted "), "--no-evict logged evictions:\n{}", n.events());
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// What counts as a use, and last use across a crash

/// Nova touches a base file on every spawn: `touch` (utimens) through the mount is a use and
/// pushes the deadline; reading status files is not. After the last touch the file goes one
/// threshold later.
#[test]
fn touch_is_a_use_and_reading_status_is_not() {
    const T: u64 = 2;
    let n = Nova::new();
    let t = T.to_string();
    let m = n.mount((&t, &t, &t), &[]);
    write_file(&n.at(H1), &pseudo_random(64 << 10, 11));
    let mut last_touch = Instant::now();
    let end = Instant::now() + Duration::from_secs(2 * T + 1);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(700));
        assert!(n.real(H1).is_file(), "{H1} was evicted although it was touched every 0.7 s");
        run_ok(tool("touch").arg(n.at(H1)));
        last_touch = Instant::now();
    }
    // Status reads are not uses: poll them hard until the file goes.
    let gone = wait_until(Duration::from_secs(T + 3), "the eviction after the last touch", || {
        let _ = n.status(H1);
        let _ = fs::read_to_string(n.dir.join(".imagecache/status"));
        n.gone_from_covered(H1).then(Instant::now)
    });
    assert!(
        gone - last_touch >= Duration::from_secs(T - 1),
        "{H1} went {:?} after its last touch, before its {T} s threshold",
        gone - last_touch
    );
    n.assert_fully_evicted(H1);
    drop(m);
}

/// The last use is persisted: after `kill -9` and a remount, an idle file goes at its old
/// deadline (last use plus threshold), not one threshold after the remount.
#[test]
fn last_use_survives_kill_9_and_the_deadline_is_kept() {
    const T: u64 = 5;
    let n = Nova::new();
    let t = T.to_string();
    let m = n.mount((&t, &t, &t), &[]);
    write_file(&n.at(H1), &pseudo_random(64 << 10, 12));
    let used = Instant::now();
    let before = n.status(H1).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    drop(m.kill9_leave_stale());
    assert!(n.real(H1).is_file(), "{H1} went before the crash");
    let m = n.mount((&t, &t, &t), &[]);
    let after = n.status(H1).unwrap_or_else(|| panic!("no images/{H1}:\n{}", m.log_text()));
    assert_eq!(field(&after, "last_used"), field(&before, "last_used"), "{before}\n{after}");
    assert!(fs::metadata(n.at(H1)).is_ok(), "{H1} is not visible after the remount");
    let gone = n.wait_evicted(H1, Duration::from_secs(T + 2).saturating_sub(used.elapsed()));
    assert!(gone - used >= Duration::from_secs(T - 1), "{H1} went before its threshold");
    n.assert_fully_evicted(H1);
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// 6. The operator's `evict`

/// `imagecachefs evict DIR NAME` removes an idle file at once, far below its threshold; it
/// refuses (exit 1, nothing changed) a file that is in use, referenced by an instance disk or
/// pinned.
#[test]
fn evict_command_removes_an_idle_file_and_refuses_a_needed_one() {
    let n = Nova::new();
    let m = n.mount((LONG, LONG, LONG), &[]);
    let bytes = pseudo_random(512 << 10, 7);
    for name in [H1, H2, H3, H4] {
        write_file(&n.at(name), &bytes);
    }
    assert!(fs::metadata(n.at(H1)).is_ok());

    let (code, out, err) = icfs(&["evict"], &n.dir, H1);
    assert_eq!(code, 0, "evict of an idle file failed:\n{out}{err}\n{}", m.log_text());
    n.assert_fully_evicted(H1);
    assert!(n.has_event(&format!("evicted {H1} ")), "no eviction event:\n{}", n.events());

    // In use: this process holds it open through the mount.
    let held = File::open(n.at(H2)).unwrap();
    let inst = n.instances.join(INSTANCE);
    overlay(&inst.join("disk"), &n.at(H3));
    let (code, out, err) = icfs(&["pin"], &n.dir, H4);
    assert_eq!(code, 0, "pin failed:\n{out}{err}");

    // Birth checksums are computed in the background: let them land before comparing.
    for name in [H2, H3, H4] {
        wait_until(Duration::from_secs(20), &format!("the sha1 of {name}"), || {
            (n.field(name, "sha1") != "pending").then_some(())
        });
    }
    for (name, state) in [(H2, "in-use"), (H3, "referenced"), (H4, "pinned")] {
        let before = n.status(name).unwrap();
        let (code, out, err) = icfs(&["evict"], &n.dir, name);
        assert_eq!(code, 1, "evict of a {state} file: exit {code}\nstdout: {out}\nstderr: {err}");
        assert!(!err.trim().is_empty(), "evict of a {state} file refused without a message");
        assert!(n.real(name).is_file(), "refused evict removed the {state} file {name}");
        assert!(fs::read(n.at(name)).unwrap() == bytes, "refused evict changed {name}");
        let after = n.status(name).unwrap();
        assert_eq!(field(&after, "state").as_deref(), Some(state), "{after}");
        for key in ["sha1", "verified", "refs", "evicts_at"] {
            assert_eq!(field(&before, key), field(&after, key), "refused evict changed {key}");
        }
    }
    let mut buf = vec![0u8; bytes.len()];
    held.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == bytes, "the holder's open file changed");
    drop(held);
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// 7. Opens racing the deadline

#[derive(Debug)]
enum Outcome {
    /// Opened and read the whole, exact content; `started` is when the open began.
    Read { started: Instant },
    /// `ENOENT` from `open`; `ended` is when it returned.
    Gone { ended: Instant },
    /// Anything else: an errno or a short/torn read.
    Bad(String),
}

/// Eight threads open, read and close the same file in a loop, timing each open to land near
/// the moment its 1 s idle deadline passes (no reference held in between, so the eviction can
/// win). Every open either reads the exact content or fails with `ENOENT` after the file was
/// evicted, never another errno, a short read or a success after an `ENOENT`; at the end the
/// file is either fully there or fully gone.
#[test]
fn opens_racing_the_deadline_see_the_whole_file_or_enoent() {
    const THREADS: u64 = 8;
    let n = Arc::new(Nova::new());
    let m = n.mount(("1", LONG, LONG), &[]);
    let bytes = Arc::new(pseudo_random(512 << 10, 8));
    write_file(&n.at(H1), &bytes);

    let epoch = Instant::now();
    let last_close = Arc::new(AtomicU64::new(0)); // ns since epoch
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            let (n, bytes, last_close, stop, outcomes) =
                (n.clone(), bytes.clone(), last_close.clone(), stop.clone(), outcomes.clone());
            std::thread::spawn(move || {
                let path = n.at(H1);
                let mut rng = 0x5eed ^ (i << 32);
                let mut buf = Vec::with_capacity(bytes.len());
                let mut first = true;
                while !stop.load(Ordering::Relaxed) {
                    // Rounds: every thread opens once near the deadline (the round's last
                    // close plus 1 s), give or take 20 ms, drifting 4 ms later every second
                    // so that the opens win the first rounds, just before the eviction, and the
                    // eviction wins a later one with opens just after it.
                    if !first {
                        // Let the round's other opens close: its last close is the deadline.
                        std::thread::sleep(Duration::from_millis(150));
                    }
                    first = false;
                    let drift = 4 * epoch.elapsed().as_secs() as i64 - 20;
                    let jitter_ms = drift + (splitmix64(&mut rng) % 40) as i64;
                    // The first round opens at once (the file was just written).
                    let base = last_close.load(Ordering::SeqCst);
                    let target = if base == 0 {
                        epoch
                    } else {
                        epoch + Duration::from_nanos(base) + Duration::from_secs(1)
                    };
                    let target = if jitter_ms >= 0 {
                        target + Duration::from_millis(jitter_ms as u64)
                    } else {
                        target - Duration::from_millis((-jitter_ms) as u64)
                    };
                    while Instant::now() < target && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(
                            (target - Instant::now()).min(Duration::from_millis(50)),
                        );
                    }
                    let started = Instant::now();
                    let outcome = match File::open(&path) {
                        Ok(mut f) => {
                            buf.clear();
                            let r = f.read_to_end(&mut buf);
                            drop(f);
                            let closed = (Instant::now() - epoch).as_nanos() as u64;
                            last_close.fetch_max(closed, Ordering::SeqCst);
                            match r {
                                Err(e) => Outcome::Bad(format!("read after a good open: {e}")),
                                Ok(len) if len != bytes.len() => Outcome::Bad(format!(
                                    "short read: {len} of {} bytes",
                                    bytes.len()
                                )),
                                Ok(_) if buf != *bytes => {
                                    let at = buf.iter().zip(bytes.iter()).position(|(a, b)| a != b);
                                    Outcome::Bad(format!("torn read: differs at byte {at:?}"))
                                }
                                Ok(_) => Outcome::Read { started },
                            }
                        }
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                            std::thread::sleep(Duration::from_millis(20));
                            Outcome::Gone { ended: Instant::now() }
                        }
                        Err(e) => Outcome::Bad(format!("open: {e}")),
                    };
                    outcomes.lock().unwrap().push(outcome);
                }
            })
        })
        .collect();

    // Up to 25 rounds of about a second each; stop one second after the first ENOENT.
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut first_gone = None;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let seen = outcomes.lock().unwrap().iter().find_map(|o| match o {
            Outcome::Gone { ended } => Some(*ended),
            _ => None,
        });
        if let Some(t) = seen {
            first_gone = Some(t);
            if Instant::now() > t + Duration::from_secs(1) {
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }

    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    let bad: Vec<&String> = outcomes
        .iter()
        .filter_map(|o| if let Outcome::Bad(s) = o { Some(s) } else { None })
        .collect();
    assert!(
        bad.is_empty(),
        "{} bad outcomes, e.g. {:?}\nlog:\n{}",
        bad.len(),
        &bad[..bad.len().min(5)],
        m.log_text()
    );
    let reads = outcomes.iter().filter(|o| matches!(o, Outcome::Read { .. })).count();
    assert!(reads >= THREADS as usize, "only {reads} successful reads before anything else");
    if let Some(gone) = first_gone {
        let gones = outcomes.iter().filter(|o| matches!(o, Outcome::Gone { .. })).count();
        eprintln!(
            "evicted {:?} into the race after {reads} reads; {gones} opens saw ENOENT",
            gone - epoch
        );
        let late = outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Read { started } if *started > gone))
            .count();
        assert_eq!(late, 0, "{late} opens succeeded after another open had seen ENOENT");
        // ENOENT only for an evicted file.
        assert!(n.gone_from_covered(H1), "an open got ENOENT but {H1} was not evicted");
        n.assert_fully_evicted(H1);
    } else {
        eprintln!("the opens won every round ({reads} reads); checking the final eviction only");
        // Fully there: the same bytes through the mount and underneath.
        assert!(fs::read(n.at(H1)).unwrap() == *bytes, "{H1} changed through the mount");
        n.wait_evicted(H1, Duration::from_secs(4));
        n.assert_fully_evicted(H1);
    }
    assert!(
        event_lines(&n.events(), &format!("evicted {H1} ")) == 1,
        "expected exactly one eviction of {H1}:\n{}",
        n.events()
    );
    drop(m);
}

/// After a daemon crash, a process still reading through the dead mount (a VM keeps reading
/// its base over passthrough) is found by the next daemon and keeps the file.
#[test]
fn a_reader_through_a_dead_mount_keeps_its_file_after_a_remount() {
    let n = Nova::new();
    let name = "7110eda4d09e062aa5e4a390b0a572ac0d2c0220";
    write_file(&n.dir.join(name), &pseudo_random(1 << 20, 7));
    let m = n.mount(("2", "2", "2"), &[]);
    let mut reader = Proc::python(
        "import sys, time; f = open(sys.argv[1], 'rb'); f.read(1); print('open', flush=True); \
         time.sleep(60)",
        &[&n.at(name)],
    );
    reader.wait_line("open");
    drop(m.kill9_leave_stale());
    let m2 = n.mount(("2", "2", "2"), &[]);
    let text = n.status(name).expect("status after the remount");
    assert_eq!(field(&text, "refs").as_deref(), Some("1"), "{text}");
    let holders = field(&text, "holders").unwrap_or_default();
    assert!(holders.contains(&format!("{} ", reader.pid())), "{text}");
    assert!(holders.ends_with("(before mount)"), "{text}");
    n.stays(&m2, name, Duration::from_secs(4), "a reader through the dead mount holds it");
    reader.terminate();
    n.status(name); // the holder is found gone when the status is read
    n.wait_evicted(name, Duration::from_secs(10));
}

// ---------------------------------------------------------------------------------------------
// 9. What a guest writes into its own disk

/// A raw instance disk (`use_cow_images = False`) whose first bytes its guest made a qcow2
/// version 3 header naming `backing` at `offset` (written there when it fits), then zeros.
fn forged_raw_disk(disk: &Path, offset: u64, backing: &Path) {
    let name = backing.as_os_str().as_encoded_bytes();
    let mut bytes = vec![0u8; 64 << 10];
    bytes[..4].copy_from_slice(b"QFI\xfb");
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    bytes[8..16].copy_from_slice(&offset.to_be_bytes());
    bytes[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    bytes[20..24].copy_from_slice(&16u32.to_be_bytes());
    let fits = |at: &usize| at.checked_add(name.len()).is_some_and(|end| end <= bytes.len());
    if let Some(at) = usize::try_from(offset).ok().filter(fits) {
        bytes[at..at + name.len()].copy_from_slice(name);
    }
    fs::create_dir_all(disk.parent().unwrap()).unwrap();
    fs::write(disk, bytes).unwrap();
}

/// Nova's `disk.info` beside `disk`, recording its format.
fn record_format(disk: &Path, format: &str) {
    let line = format!("{{\"{}\": \"{format}\"}}\n", disk.display());
    fs::write(disk.with_file_name("disk.info"), line).unwrap();
}

/// A guest owns its raw disk's first sector: a qcow2 header it forged naming a base protects
/// nothing where `disk.info` calls the disk raw, and a forged header with a backing-name
/// offset no file reaches (no `disk.info`) does not stop the scan and so every eviction. A
/// real qcow2 overlay of another instance still keeps its base.
#[test]
fn a_forged_header_in_a_raw_disk_protects_nothing_and_a_real_overlay_still_does() {
    const T: u64 = 2;
    let n = Nova::new();
    let t = T.to_string();
    // A refused eviction is retried after the resized threshold: keep it short too.
    let m = n.mount((&t, &t, &t), &[]);
    write_file(&n.at(H1), &pseudo_random(1 << 20, 11));
    write_file(&n.at(H2), &pseudo_random(1 << 20, 12));
    let written = Instant::now();

    let raw = n.instances.join(INSTANCE).join("disk");
    forged_raw_disk(&raw, 0x200, &n.at(H1));
    record_format(&raw, "raw");
    let unparsable = n.instances.join("7d9a4a3e-0000-4000-8000-00000000002b").join("disk");
    forged_raw_disk(&unparsable, u64::MAX, &n.at(H1));
    let cow = n.instances.join("7d9a4a3e-0000-4000-8000-00000000002c").join("disk");
    overlay(&cow, &n.at(H2));
    record_format(&cow, "qcow2");

    let evicted = n.wait_evicted(H1, Duration::from_secs(3 * T + 5));
    assert!(
        evicted - written >= Duration::from_secs(T - 1),
        "{H1} went {:?} after its last use, before its {T} s threshold",
        evicted - written
    );
    n.assert_fully_evicted(H1);
    // H2's deadline has passed too; only the overlay's header keeps it.
    n.stays(&m, H2, Duration::from_secs(T + 1), "a qcow2 overlay names it as backing file");
    let text = n.status(H2).unwrap();
    assert_eq!(field(&text, "state").as_deref(), Some("referenced"), "{text}");
    let log = m.log_text();
    assert!(
        log.contains(&format!("{}: qcow2 backing file name at offset", unparsable.display())),
        "the unparsable header is not logged:\n{log}"
    );
    fs::remove_file(&cow).unwrap();
    n.wait_evicted(H2, Duration::from_secs(3 * T + 5));
    drop(m);
}

/// `--min-free` is looked at when the mount comes up, not only when something is written
/// through it: with a target no filesystem meets, idle files past the pressure floor go at
/// once, while nobody touches the mount; the one held open stays.
#[test]
fn disk_pressure_is_relieved_at_mount_without_any_activity() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(64 << 10, 11));
    write_file(&n.at(H2), &pseudo_random(64 << 10, 12));
    let mut holder = Proc::python(READER, &[&n.at(H2)]);
    holder.wait_line("ready");
    let m = n.mount((LONG, LONG, LONG), &["--min-free", "99.99%", "--pressure-min-age", "0"]);
    n.wait_evicted(H1, Duration::from_secs(10));
    n.stays(&m, H2, Duration::from_millis(500), "a process from before the mount holds it");
    holder.assert_alive();
    assert!(n.has_event(&format!("evicted {H1} reason pressure")), "{}", n.events());
}
