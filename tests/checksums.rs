//! Checksums through a real mount (PRODUCT.md, "Checksums" and "State survives restarts"): the
//! SHA-1 recorded once writing ends is the SHA-1 of the real file, re-verification finds a byte
//! flipped underneath the mount, a corrupt file is flagged, logged and evicted as soon as
//! nothing uses it, the checksum thread honours `--verify-rate`, and digests and verification
//! results survive `kill -9` and a remount.
//!
//! Layout as in `tests/eviction.rs` (see `tests/nova/mod.rs`): `<tmp>/instances/_base` is
//! mounted, `<tmp>/covered` reaches the real files (a bind mount made before the overlay), which
//! is where corruption is injected and where `sha1sum` reads.

mod common;
mod nova;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{convert_to_raw, run_ok, tool, wait_until, Mount, Proc, LOCKER, READER};
use nova::*;

const MIB: usize = 1 << 20;

/// `sha1sum PATH`: the hex digest.
fn sha1sum(path: &Path) -> String {
    let out = run_ok(tool("sha1sum").arg(path));
    let digest = out.split_whitespace().next().unwrap_or_default().to_string();
    assert_eq!(digest.len(), 40, "sha1sum {path:?} printed {out:?}");
    digest
}

/// Waits until `images/NAME` shows a digest (not `pending`) and returns it; on timeout the
/// panic shows the status file, the events and the daemon log.
fn wait_sha1(n: &Nova, m: &Mount, name: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = n.status(name);
        if let Some(sha1) = text.as_deref().and_then(|t| field(t, "sha1")) {
            if sha1 != "pending" {
                return sha1;
            }
        }
        assert!(
            Instant::now() < deadline,
            "images/{name} still has no digest after {timeout:?}:\n{}\nevents:\n{}\nlog:\n{}",
            text.unwrap_or_else(|| "(no status file)".into()),
            n.events(),
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts `images/NAME`'s `sha1:` is a well-formed lower-case hex digest equal to `want`.
fn assert_sha1(n: &Nova, name: &str, got: &str, want: &str) {
    assert!(
        got.len() == 40 && got.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "sha1 of {name} is not 40 lower-case hex digits: {got:?}"
    );
    assert_eq!(got, want, "sha1 of {name} (status) vs sha1sum of the real file\n{}", n.events());
}

/// Flips every bit of the byte at `offset` of the real file (underneath the mount), as bit rot
/// would: same inode, size and mtime (a write that moves the mtime is a change, not
/// corruption).
fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mtime = f.metadata().unwrap().modified().unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] = !b[0];
    f.write_all_at(&b, offset).unwrap();
    f.set_modified(mtime).unwrap();
    f.sync_all().unwrap();
    assert_eq!(fs::metadata(path).unwrap().modified().unwrap(), mtime, "mtime of {path:?}");
}

/// The modification time of a file.
fn mtime(path: &Path) -> std::time::SystemTime {
    fs::metadata(path).unwrap_or_else(|e| panic!("stat {path:?}: {e}")).modified().unwrap()
}

/// How many `KIND NAME ` events there are.
fn events_of(n: &Nova, kind: &str, name: &str) -> usize {
    event_lines(&n.events(), &format!("{kind} {name} "))
}

/// Waits until NAME's digest is neither `pending` nor `old`, and checks it is the real file's.
fn wait_new_sha1(n: &Nova, m: &Mount, name: &str, old: &str, why: &str) -> String {
    let new =
        wait_until(Duration::from_secs(20), &format!("a new digest of {name} ({why})"), || {
            let sha1 = field(&n.status(name)?, "sha1")?;
            (sha1 != "pending" && sha1 != old).then_some(sha1)
        });
    let want = sha1sum(&n.real(name));
    assert_eq!(
        new,
        want,
        "{why}: digest of {name} vs sha1sum
{}
{}",
        n.events(),
        m.log_text()
    );
    new
}

/// `verify NAME` and its `ok` verdict; the file is not (or no longer) corrupt and stays.
fn verify_ok(n: &Nova, m: &Mount, name: &str) {
    let (before, corrupt) = (events_of(n, "verified", name), events_of(n, "corrupt", name));
    verify(n, name);
    wait_until(Duration::from_secs(20), &format!("a new verification of {name}"), || {
        (events_of(n, "verified", name) > before || events_of(n, "corrupt", name) > corrupt)
            .then_some(())
    });
    let text = n.status(name).expect("status file");
    assert!(
        field(&text, "verified").unwrap_or_default().starts_with("ok "),
        "{name} is not verified ok:\n{text}\n{}\n{}",
        n.events(),
        m.log_text()
    );
    assert_ne!(field(&text, "state").as_deref(), Some("corrupt"), "{text}");
    assert_eq!(events_of(n, "corrupt", name), corrupt, "{}", n.events());
    n.stays(m, name, Duration::from_millis(500), "it is not corrupt");
}

/// `imagecachefs verify DIR NAME`, which must succeed.
fn verify(n: &Nova, name: &str) {
    let (code, out, err) = icfs(&["verify"], &n.dir, name);
    assert_eq!(code, 0, "imagecachefs verify {name} failed ({code}):\n{out}{err}");
}

/// Waits until `verified:` of NAME starts with `prefix` (`ok ` or `mismatch `); returns the
/// status text.
fn wait_verified(n: &Nova, name: &str, prefix: &str, timeout: Duration) -> String {
    wait_until(timeout, &format!("`verified: {prefix}...` for {name}"), || {
        let text = n.status(name)?;
        field(&text, "verified")?.starts_with(prefix).then_some(text)
    })
}

/// A source image outside the mount: `len` bytes, pseudo-random with a zero hole in the
/// middle, as raw and as qcow2.
fn source_image(dir: &Path, len: usize, seed: u64) -> (Vec<u8>, std::path::PathBuf) {
    fs::create_dir_all(dir).unwrap();
    let mut bytes = pseudo_random(len, seed);
    bytes[len / 4..len / 2].fill(0);
    let raw = dir.join("src.raw");
    fs::write(&raw, &bytes).unwrap();
    let qcow2 = dir.join("src.qcow2");
    run_ok(tool("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow2));
    (bytes, qcow2)
}

// ---------------------------------------------------------------------------------------------
// 8. The digest recorded when writing ends

/// A file written through the mount gets the SHA-1 of the real file (what `sha1sum` says),
/// its size and a `created` event; a rewrite replaces the digest with the new content's.
#[test]
fn sha1_of_a_file_written_through_the_mount_is_the_real_files() {
    let n = Nova::new();
    let m = n.mount((LONG, LONG, LONG), &[]);
    let bytes = pseudo_random(3 * MIB + 4096, 21);
    write_file(&n.at(H1), &bytes);
    let got = wait_sha1(&n, &m, H1, Duration::from_secs(20));
    assert_sha1(&n, H1, &got, &sha1sum(&n.real(H1)));
    let text = n.status(H1).unwrap();
    assert_eq!(field(&text, "size"), Some(bytes.len().to_string()), "size of {H1}:\n{text}");
    assert!(
        n.has_event(&format!("created {H1} sha1 {got}")),
        "no `created {H1} sha1 {got}` event:\n{}",
        n.events()
    );

    // Rewritten in place: the digest is what the file holds when this writing ends.
    {
        let f = OpenOptions::new().write(true).open(n.at(H1)).unwrap();
        f.write_all_at(&[0x5a; 4096], 8192).unwrap();
        f.sync_all().unwrap();
    }
    let new = wait_until(Duration::from_secs(20), "the digest of the rewritten file", || {
        let sha1 = field(&n.status(H1)?, "sha1")?;
        (sha1 != "pending" && sha1 != got).then_some(sha1)
    });
    assert_sha1(&n, H1, &new, &sha1sum(&n.real(H1)));
    drop(m);
}

/// `qemu-img convert` writes `X.converted` (O_DIRECT target, as Nova runs it) and a rename
/// makes it `X`: `X` shows the SHA-1 of its final bytes, which are the source's.
#[test]
fn sha1_survives_nova_convert_and_rename() {
    let n = Nova::new();
    let (bytes, qcow2) = source_image(&n.s.path("src"), 6 * MIB, 22);
    let m = n.mount((LONG, LONG, LONG), &[]);
    let converted = n.at(&format!("{H2}.converted"));
    convert_to_raw(&qcow2, &converted);
    fs::rename(&converted, n.at(H2)).unwrap();
    assert!(fs::read(n.real(H2)).unwrap() == bytes, "the converted image differs from the source");
    let got = wait_sha1(&n, &m, H2, Duration::from_secs(10));
    let want = sha1sum(&n.real(H2));
    assert_eq!(want, sha1sum(&n.s.path("src/src.raw")), "sha1sum of the source and the base");
    assert_sha1(&n, H2, &got, &want);
    assert!(n.status(&format!("{H2}.converted")).is_none(), "the old name still has a status file");
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// 9. Corruption

/// A byte flipped in the real file is found by `verify`: an unused corrupt file is reported
/// (event, `CORRUPT` log line) and evicted; one whose eviction Nova's lock defers shows
/// `verified: mismatch` and `state: corrupt` until it goes.
#[test]
fn corrupt_file_without_holder_is_flagged_and_evicted() {
    let n = Nova::new();
    let m = n.mount((LONG, LONG, LONG), &[]);
    let bytes = pseudo_random(2 * MIB, 23);
    write_file(&n.at(H1), &bytes);
    write_file(&n.at(H2), &bytes);
    let d1 = wait_sha1(&n, &m, H1, Duration::from_secs(20));
    let d2 = wait_sha1(&n, &m, H2, Duration::from_secs(20));
    assert_eq!(d1, d2);

    // H1: nothing keeps it.
    flip_byte(&n.real(H1), 1_000_000);
    let found = sha1sum(&n.real(H1));
    assert_ne!(found, d1);
    verify(&n, H1);
    n.wait_evicted(H1, Duration::from_secs(15));
    n.assert_fully_evicted(H1);
    let events = n.events();
    assert!(
        event_lines(&events, &format!("corrupt {H1} expected sha1 {d1} found {found}")) == 1,
        "no `corrupt {H1} expected sha1 {d1} found {found}` event:\n{events}"
    );
    assert!(event_lines(&events, &format!("evicted {H1} ")) == 1, "no eviction event:\n{events}");
    let log = m.log_text();
    assert!(
        log.lines().any(|l| l.contains("CORRUPT") && l.contains(H1)),
        "the daemon log has no CORRUPT line for {H1}:\n{log}"
    );

    // H2: Nova holds its lock file, so the eviction waits and the status can be read.
    let mut locker = Proc::python(LOCKER, &[&n.lock_file(H2)]);
    locker.wait_line("locked");
    flip_byte(&n.real(H2), 12345);
    let found = sha1sum(&n.real(H2));
    verify(&n, H2);
    let text = wait_verified(&n, H2, "mismatch ", Duration::from_secs(15));
    assert_eq!(field(&text, "state").as_deref(), Some("corrupt"), "{text}");
    assert_eq!(field(&text, "sha1"), Some(d2.clone()), "the recorded digest changed:\n{text}");
    assert!(
        n.has_event(&format!("corrupt {H2} expected sha1 {d2} found {found}")),
        "no corrupt event for {H2}:\n{}",
        n.events()
    );
    assert!(m.log_text().lines().any(|l| l.contains("CORRUPT") && l.contains(H2)));
    n.stays(&m, H2, Duration::from_secs(2), "Nova holds its lock");
    locker.kill();
    n.wait_evicted(H2, Duration::from_secs(10));
    n.assert_fully_evicted(H2);
    assert!(n.lock_file(H2).is_file(), "Nova's lock file was removed");
    drop(m);
}

/// A corrupt file that a process holds open through the mount stays, flagged `corrupt`, for as
/// long as it is held, and goes once the holder stops.
#[test]
fn corrupt_file_with_holder_stays_flagged_until_released() {
    let n = Nova::new();
    let m = n.mount((LONG, LONG, LONG), &[]);
    let bytes = pseudo_random(2 * MIB, 24);
    write_file(&n.at(H3), &bytes);
    let digest = wait_sha1(&n, &m, H3, Duration::from_secs(20));
    let mut holder = Proc::python(READER, &[&n.at(H3)]);
    holder.wait_line("ready");
    wait_until(Duration::from_secs(5), "the holder's reference", || {
        (n.field(H3, "refs") == "1").then_some(())
    });

    flip_byte(&n.real(H3), 777);
    let found = sha1sum(&n.real(H3));
    verify(&n, H3);
    let text = wait_verified(&n, H3, "mismatch ", Duration::from_secs(15));
    assert_eq!(field(&text, "state").as_deref(), Some("corrupt"), "{text}");
    assert_eq!(field(&text, "sha1"), Some(digest.clone()), "{text}");
    assert!(
        n.has_event(&format!("corrupt {H3} expected sha1 {digest} found {found}")),
        "no corrupt event:\n{}",
        n.events()
    );
    assert!(m.log_text().lines().any(|l| l.contains("CORRUPT") && l.contains(H3)));

    n.stays(&m, H3, Duration::from_secs(3), "a process holds it open");
    holder.assert_alive();
    let text = n.status(H3).unwrap();
    assert_eq!(field(&text, "state").as_deref(), Some("corrupt"), "{text}");
    assert_eq!(field(&text, "refs").as_deref(), Some("1"), "{text}");
    assert!(field(&text, "verified").unwrap_or_default().starts_with("mismatch "), "{text}");

    holder.kill();
    n.wait_evicted(H3, Duration::from_secs(5));
    n.assert_fully_evicted(H3);
    assert!(n.has_event(&format!("evicted {H3} ")), "{}", n.events());
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// 10. Rate limit

/// `--verify-rate 64`: re-verifying a 256 MiB file takes at least about 4 s (3 s asserted).
#[test]
fn verification_honours_the_rate_limit() {
    let n = Nova::new();
    let m = n.mount((LONG, LONG, LONG), &["--verify-rate", "64"]);
    let chunk = pseudo_random(MIB, 25);
    {
        let mut f = File::create(n.at(H4)).unwrap();
        for i in 0..256u64 {
            let mut c = chunk.clone();
            c[..8].copy_from_slice(&i.to_le_bytes());
            std::io::Write::write_all(&mut f, &c).unwrap();
        }
        f.sync_all().unwrap();
    }
    let digest = wait_sha1(&n, &m, H4, Duration::from_secs(30));
    assert_sha1(&n, H4, &digest, &sha1sum(&n.real(H4)));

    let started = Instant::now();
    verify(&n, H4);
    let text = wait_verified(&n, H4, "ok ", Duration::from_secs(30));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "verifying 256 MiB at --verify-rate 64 took only {took:?} (expected about 4 s)\n{text}"
    );
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// 11. Restart

/// Digests and verification results reported before a `kill -9` are there after a remount:
/// a verified file keeps `ok TIME`, an unverified one its digest, a corrupt one (held by a
/// process that opened it before the new mount) `mismatch TIME` and `state: corrupt`. The
/// persisted state lives in the cache directory and is invisible through the mount.
#[test]
fn digests_and_verdicts_survive_kill_9_and_remount() {
    let n = Nova::new();
    let bytes = pseudo_random(MIB, 26);
    let m = n.mount((LONG, LONG, LONG), &[]);
    for name in [H1, H2, H3] {
        write_file(&n.at(name), &bytes);
    }
    for name in [H1, H2, H3] {
        wait_sha1(&n, &m, name, Duration::from_secs(20));
    }
    verify(&n, H1);
    wait_verified(&n, H1, "ok ", Duration::from_secs(15));
    let mut holder = Proc::python(READER, &[&n.at(H3)]);
    holder.wait_line("ready");
    flip_byte(&n.real(H3), 4242);
    verify(&n, H3);
    wait_verified(&n, H3, "mismatch ", Duration::from_secs(15));
    let before: Vec<String> = [H1, H2, H3].iter().map(|name| n.status(name).unwrap()).collect();
    // The state file is written within a second of a change; status.json says when what it
    // shows is on disk. Crash as soon as it does: nothing that was reported may be lost.
    let json = n.dir.join(".imagecache/status.json");
    wait_until(Duration::from_secs(10), "status.json to say it is on disk", || {
        fs::read_to_string(&json).ok()?.contains("\"persisted\":true").then_some(())
    });
    let stale = m.kill9_leave_stale();
    holder.kill();
    drop(stale);
    assert!(!common::is_fuse(&n.dir), "the dead mount is still attached");

    // A process opens the corrupt file before the new mount.
    let mut early = Proc::python(READER, &[&n.at(H3)]);
    early.wait_line("ready");
    let m = n.mount((LONG, LONG, LONG), &[]);
    for (name, was) in [H1, H2, H3].iter().zip(&before) {
        let now = n.status(name).unwrap_or_else(|| {
            panic!("no images/{name} after the remount; before:\n{was}\nlog:\n{}", m.log_text())
        });
        for key in ["name", "kind", "size", "sha1", "verified"] {
            assert_eq!(
                field(&now, key),
                field(was, key),
                "{key} of {name} changed across kill -9 and remount\nbefore:\n{was}\nafter:\n{now}"
            );
        }
    }
    assert!(field(&before[0], "verified").unwrap().starts_with("ok "), "{}", before[0]);
    let text = n.status(H3).unwrap();
    assert!(field(&text, "verified").unwrap().starts_with("mismatch "), "{text}");
    assert_eq!(field(&text, "state").as_deref(), Some("corrupt"), "{text}");
    assert_eq!(field(&text, "refs").as_deref(), Some("1"), "{text}");
    assert!(n.real(H3).is_file(), "the held corrupt file was evicted");

    // The state is kept in the cache directory itself, and hidden by the mount.
    let names = |dir: &Path| -> BTreeSet<String> {
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
    };
    let seen = names(&n.dir);
    let files: BTreeSet<String> = [H1, H2, H3].iter().map(|s| s.to_string()).collect();
    let extra: Vec<&String> = seen.difference(&files).filter(|s| *s != ".imagecache").collect();
    assert!(extra.is_empty(), "the mount shows files that are not cache files: {extra:?}");
    let real = names(&n.covered.target);
    assert!(
        real.difference(&files).next().is_some(),
        "no persisted state in the cache directory: {real:?}"
    );
    early.kill();
    drop(m);
}

/// A download that was still being written by a process from before the mount (or through
/// the previous daemon during an upgrade) is not hashed until that writer is gone: its
/// checksum is what the file held when writing finished, and a later verify matches.
#[test]
fn a_writer_from_before_the_mount_delays_the_checksum_until_it_is_done() {
    let n = Nova::new();
    let name = "b6589fc6ab0dc82cf12099d1c2d40ab994e8410c";
    let part = format!("{name}.part");
    write_file(&n.dir.join(&part), b"first half ");
    // Holds the file open for appending; writes the rest once the go file appears, then exits.
    let go = n.s.path("go");
    let mut writer = Proc::python(
        "import os, sys, time\n\
         f = open(sys.argv[1], 'a'); print('open', flush=True)\n\
         while not os.path.exists(sys.argv[2]): time.sleep(0.01)\n\
         f.write('second half'); f.close(); print('done', flush=True); time.sleep(60)",
        &[&n.dir.join(&part), &go],
    );
    writer.wait_line("open");
    let m = n.mount(("3600", "3600", "3600"), &[]);
    let text = n.status(&part).expect("status of the .part");
    assert_eq!(field(&text, "state").as_deref(), Some("writing"), "{text}");
    assert_eq!(field(&text, "sha1").as_deref(), Some("pending"), "{text}");
    write_file(&go, b"");
    writer.wait_line("done");
    writer.terminate();
    // The writer is found gone when the status is read; then the file is hashed.
    let got = wait_sha1(&n, &m, &part, Duration::from_secs(20));
    assert_sha1(&n, &part, &got, &sha1sum(&n.real(&part)));
    fs::rename(n.at(&part), n.at(name)).unwrap();
    verify(&n, name);
    let text = wait_verified(&n, name, "ok ", Duration::from_secs(20));
    assert_eq!(field(&text, "state").as_deref(), Some("idle"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// 12. A checksum belongs to the content it was taken of

/// Nova recreates ephemeral and swap bases: a file replaced while the daemon was down (a new
/// inode under the same name, same size, other bytes) is hashed afresh at the next mount, and
/// a verify finds it good, not corrupt.
#[test]
fn a_file_replaced_while_the_daemon_was_down_is_hashed_afresh_not_condemned() {
    let n = Nova::new();
    let m = n.mount((LONG, LONG, LONG), &[]);
    write_file(&n.at(H1), &pseudo_random(MIB, 31));
    let old = wait_sha1(&n, &m, H1, Duration::from_secs(20));
    let old_ino = fs::metadata(n.real(H1)).unwrap().ino();
    assert!(m.stop().success(), "the daemon did not stop cleanly");
    assert!(!common::is_fuse(&n.dir), "still mounted after the daemon stopped");

    let tmp = n.dir.join("swap_new.tmp");
    fs::write(&tmp, pseudo_random(MIB, 32)).unwrap();
    fs::rename(&tmp, n.dir.join(H1)).unwrap();
    assert_ne!(fs::metadata(n.real(H1)).unwrap().ino(), old_ino, "the file was not replaced");
    let want = sha1sum(&n.real(H1));
    assert_ne!(want, old);

    let m = n.mount((LONG, LONG, LONG), &[]);
    let got = wait_sha1(&n, &m, H1, Duration::from_secs(20));
    assert_sha1(&n, H1, &got, &want);
    verify_ok(&n, &m, H1);
    assert_eq!(n.field(H1, "sha1"), want);
    drop(m);
}

/// A file written behind the daemon's back while it runs (through the covered directory, its
/// mtime moving) gets a new checksum at its next verification, with an event saying so; it is
/// not corrupt.
#[test]
fn a_file_changed_behind_the_mount_gets_a_new_checksum_not_a_verdict() {
    let n = Nova::new();
    let m = n.mount((LONG, LONG, LONG), &[]);
    write_file(&n.at(H2), &pseudo_random(MIB, 33));
    let old = wait_sha1(&n, &m, H2, Duration::from_secs(20));
    let before = mtime(&n.real(H2));
    {
        let f = OpenOptions::new().write(true).open(n.real(H2)).unwrap();
        f.write_all_at(&[0xa5; 4096], 0).unwrap();
        f.sync_all().unwrap();
    }
    assert_ne!(mtime(&n.real(H2)), before, "the write did not move the mtime");
    verify(&n, H2);
    let new = wait_new_sha1(&n, &m, H2, &old, "changed behind the mount");
    assert!(
        n.has_event(&format!("created {H2} sha1 {new} changed behind the mount (was sha1 {old})")),
        "no event saying {H2} changed behind the mount:\n{}",
        n.events()
    );
    assert_eq!(events_of(&n, "corrupt", H2), 0, "{}", n.events());
    verify_ok(&n, &m, H2);
    drop(m);
}

/// A corrupt file changed behind the mount stays corrupt, whatever its mtime says, until it
/// holds the content its SHA-1 was recorded for again (OPERATIONS.md, "A corrupt image").
#[test]
fn a_corrupt_file_passes_again_only_with_its_recorded_content() {
    let n = Nova::new();
    let m = n.mount((LONG, LONG, LONG), &[]);
    let bytes = pseudo_random(MIB, 38);
    write_file(&n.at(H3), &bytes);
    let recorded = wait_sha1(&n, &m, H3, Duration::from_secs(20));
    let mut holder = Proc::python(READER, &[&n.at(H3)]);
    holder.wait_line("ready");
    flip_byte(&n.real(H3), 999);
    verify(&n, H3);
    wait_verified(&n, H3, "mismatch ", Duration::from_secs(15));

    // Written again behind the mount, the mtime moving: still corrupt.
    let before = mtime(&n.real(H3));
    {
        let f = OpenOptions::new().write(true).open(n.real(H3)).unwrap();
        f.write_all_at(&[0x3c; 4096], 0).unwrap();
        f.sync_all().unwrap();
    }
    assert_ne!(mtime(&n.real(H3)), before, "the write did not move the mtime");
    verify(&n, H3);
    wait_until(Duration::from_secs(20), &format!("the second verification of {H3}"), || {
        (events_of(&n, "corrupt", H3) >= 2 || events_of(&n, "created", H3) >= 2).then_some(())
    });
    let text = n.status(H3).unwrap();
    assert_eq!(events_of(&n, "created", H3), 1, "the corrupt {H3} was blessed:\n{}", n.events());
    assert_eq!(field(&text, "state").as_deref(), Some("corrupt"), "{text}");
    assert_eq!(field(&text, "sha1"), Some(recorded.clone()), "{text}");

    // The recorded content put back (behind the mount too): it passes.
    fs::write(n.real(H3), &bytes).unwrap();
    verify_ok(&n, &m, H3);
    assert_eq!(n.field(H3, "sha1"), recorded);
    holder.kill();
    drop(m);
}

/// `truncate -s` (open, ftruncate, close) and `truncate(2)` by path through the mount change
/// the data: the file is hashed afresh, and a verify afterwards is ok.
#[test]
fn truncate_through_the_mount_rehashes_the_file() {
    let n = Nova::new();
    let m = n.mount((LONG, LONG, LONG), &[]);
    write_file(&n.at(H3), &pseudo_random(2 * MIB, 34));
    let first = wait_sha1(&n, &m, H3, Duration::from_secs(20));

    run_ok(tool("truncate").args(["-s", "1M"]).arg(n.at(H3)));
    let second = wait_new_sha1(&n, &m, H3, &first, "after truncate -s 1M");
    assert_eq!(n.field(H3, "size"), MIB.to_string());
    verify_ok(&n, &m, H3);

    // truncate(2) by path: no handle, no writer.
    let grow = (MIB + 4096).to_string();
    run_ok(
        tool("python3")
            .args(["-c", "import os,sys; os.truncate(sys.argv[1], int(sys.argv[2]))"])
            .arg(n.at(H3))
            .arg(&grow),
    );
    wait_new_sha1(&n, &m, H3, &second, "after truncate(2) by path");
    assert_eq!(n.field(H3, "size"), grow);
    verify_ok(&n, &m, H3);
    drop(m);
}

/// `touch(1)` through the mount (open for writing, futimens, close) is a use, not a write: a
/// good file keeps its digest without being hashed again, and a corrupt one stays corrupt
/// (it is not blessed with a new digest), as it does when truncated to the size it has.
#[test]
fn touch_keeps_a_good_digest_and_a_corrupt_verdict() {
    let n = Nova::new();
    let m = n.mount((LONG, LONG, LONG), &[]);
    let bytes = pseudo_random(MIB, 35);
    write_file(&n.at(H1), &bytes);
    write_file(&n.at(H4), &bytes);
    let good = wait_sha1(&n, &m, H1, Duration::from_secs(20));
    let bad = wait_sha1(&n, &m, H4, Duration::from_secs(20));

    // A good file: touched, then verified; never re-hashed.
    let before = mtime(&n.real(H1));
    run_ok(tool("touch").arg(n.at(H1)));
    assert_ne!(mtime(&n.real(H1)), before, "touch did not move the mtime");
    verify_ok(&n, &m, H1);
    assert_eq!(n.field(H1, "sha1"), good);
    assert_eq!(events_of(&n, "created", H1), 1, "{H1} was hashed again:\n{}", n.events());

    // A corrupt file, held open so that it is not evicted at once.
    let mut holder = Proc::python(READER, &[&n.at(H4)]);
    holder.wait_line("ready");
    flip_byte(&n.real(H4), 4321);
    verify(&n, H4);
    wait_verified(&n, H4, "mismatch ", Duration::from_secs(15));
    let before = mtime(&n.real(H4));
    run_ok(tool("touch").arg(n.at(H4)));
    assert_ne!(mtime(&n.real(H4)), before, "touch did not move the mtime");
    verify(&n, H4);
    wait_until(Duration::from_secs(20), &format!("the second verification of {H4}"), || {
        (events_of(&n, "corrupt", H4) >= 2 || events_of(&n, "created", H4) >= 2).then_some(())
    });
    let text = n.status(H4).unwrap();
    assert_eq!(events_of(&n, "created", H4), 1, "the corrupt {H4} was blessed:\n{}", n.events());
    assert_eq!(field(&text, "state").as_deref(), Some("corrupt"), "{text}");
    assert_eq!(field(&text, "sha1"), Some(bad.clone()), "{text}");
    assert!(field(&text, "verified").unwrap_or_default().starts_with("mismatch "), "{text}");

    // Cut to the size it has (`ftruncate` moves the mtime, no byte changes): still corrupt.
    run_ok(tool("truncate").args(["-s", &MIB.to_string()]).arg(n.at(H4)));
    verify(&n, H4);
    wait_until(Duration::from_secs(20), &format!("the third verification of {H4}"), || {
        (events_of(&n, "corrupt", H4) >= 3 || events_of(&n, "created", H4) >= 2).then_some(())
    });
    assert_eq!(events_of(&n, "created", H4), 1, "the corrupt {H4} was blessed:\n{}", n.events());
    assert_eq!(n.field(H4, "state"), "corrupt");
    holder.kill();
    n.wait_evicted(H4, Duration::from_secs(10));
    drop(m);
}

/// `fallocate` (a punched hole, a size change) and `copy_file_range` into a file go through a
/// write handle: when it is released the file is hashed afresh.
#[test]
fn fallocate_and_copy_file_range_through_a_write_handle_rehash_the_file() {
    let n = Nova::new();
    let m = n.mount((LONG, LONG, LONG), &[]);
    write_file(&n.at(H2), &pseudo_random(MIB, 36));
    write_file(&n.at(H3), &pseudo_random(MIB, 37));
    let first = wait_sha1(&n, &m, H2, Duration::from_secs(20));
    wait_sha1(&n, &m, H3, Duration::from_secs(20));

    run_ok(
        tool("fallocate")
            .args(["--punch-hole", "--offset", "65536", "--length", "65536"])
            .arg(n.at(H2)),
    );
    let punched = wait_new_sha1(&n, &m, H2, &first, "after fallocate --punch-hole");

    let grown = (2 * MIB).to_string();
    run_ok(tool("fallocate").args(["--offset", "0", "--length", &grown]).arg(n.at(H2)));
    let grew = wait_new_sha1(&n, &m, H2, &punched, "after fallocate to 2 MiB");
    assert_eq!(n.field(H2, "size"), grown);

    run_ok(
        tool("python3")
            .args([
                "-c",
                "import os,sys\n\
             s=os.open(sys.argv[1],os.O_RDONLY); d=os.open(sys.argv[2],os.O_WRONLY)\n\
             assert os.copy_file_range(s,d,65536,0,0)==65536\n\
             os.close(s); os.close(d)",
            ])
            .arg(n.at(H3))
            .arg(n.at(H2)),
    );
    wait_new_sha1(&n, &m, H2, &grew, "after copy_file_range into it");
    verify_ok(&n, &m, H2);
    drop(m);
}
