//! What an unprivileged user can make the daemon spend, and what text it shows them, through
//! a real mount (PRODUCT.md, "What anyone can make it do is bounded"; docs/STATUS.md):
//! descriptors held on `status.json` share one rendering, an open/close loop does not turn
//! into state-file writes, a flood of failing lookups does not flood the log, names and
//! program names cannot forge lines, and non-root readers see no SHA-1s and no holders.
//!
//! The unprivileged user is `nobody` (uid 65534) through `setpriv`; the scratch directories
//! are opened up (0755) so that it can reach the mount.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{run, run_ok, tool, wait_until, Mount, Proc, Scratch};

const HASH: &str = "0d5e6b61602d758984b3bf038267614d6016eb2a";
const POLL: Duration = Duration::from_secs(10);

/// `<tmp>/instances/_base`, reachable by `nobody`.
struct Layout {
    s: Scratch,
    base: PathBuf,
}

impl Layout {
    fn new() -> Self {
        let s = Scratch::new();
        let instances = s.path("instances");
        let base = instances.join("_base");
        fs::create_dir_all(&base).unwrap();
        for dir in [s.tmp.path(), &instances, &base] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        }
        Layout { s, base }
    }
}

fn sfile(dir: &Path, rel: &str) -> PathBuf {
    dir.join(".imagecache").join(rel)
}

/// A command run as `nobody`.
fn nobody(program: &str) -> Command {
    let mut c = tool("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(program);
    c
}

/// A python3 script run as `nobody` with `args`: the system's interpreter (one on root's
/// `PATH`, such as a pyenv shim under /root, may be out of nobody's reach).
fn nobody_python(script: &str, args: &[&Path]) -> Command {
    let python = "/usr/bin/python3";
    assert!(Path::new(python).is_file(), "this test needs {python} (install python3)");
    let mut c = nobody(python);
    c.arg("-c").arg(script).args(args);
    c
}

/// The daemon's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One metric's value from `metrics`.
fn metric(dir: &Path, name: &str) -> u64 {
    let text = fs::read_to_string(sfile(dir, "metrics")).unwrap();
    let line = text
        .lines()
        .find(|l| l.split(' ').next() == Some(name))
        .unwrap_or_else(|| panic!("no {name} in metrics:\n{text}"));
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Waits until the checksum thread has hashed all `files` (until then every SHA-1 changes
/// the state, and so the rendering).
fn steady(m: &Mount, files: usize) {
    wait_until(Duration::from_secs(60), "every SHA-1 computed", || {
        let t = fs::read_to_string(sfile(&m.dir, "status.json")).unwrap();
        let hashed = t.matches("\"sha1\":\"").count() - t.matches("\"sha1\":\"pending\"").count();
        (hashed == files).then_some(())
    });
}

/// 1,000 descriptors held open on `status.json` by `nobody`, over a few hundred files with
/// long names: the daemon's memory grows by a few renderings, not by one per descriptor.
#[test]
fn descriptors_held_on_status_json_share_one_rendering() {
    let l = Layout::new();
    // Before the mount: the scan registers them (quicker than 400 creates through it).
    let files = 600;
    for i in 0..files {
        fs::write(l.base.join(format!("{i:04}{}", "n".repeat(196))), b"x").unwrap();
    }
    let m = Mount::new(&l.base, &["--no-evict"]);
    let json = sfile(&l.base, "status.json");
    steady(&m, files);
    let one = run_ok(nobody("cat").arg(&json)).len() as u64;
    assert!(one > 200_000, "status.json of {files} files is only {one} bytes");
    let before = rss_kib(m.server_pid());

    let holders = 1000;
    let script = "import resource, sys, time\n\
                  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
                  resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n\
                  fds = [open(sys.argv[1], 'rb') for _ in range(int(sys.argv[2]))]\n\
                  print('ready', flush=True)\n\
                  time.sleep(120)\n";
    let n = holders.to_string();
    let mut p = Proc::spawn(&mut nobody_python(script, &[&json, Path::new(&n)]));
    p.wait_line("ready");
    let during = rss_kib(m.server_pid());
    let grown = during.saturating_sub(before) * 1024;
    // Shared renderings: one per second of opening (a few), plus per-handle bookkeeping
    // (well under 1 KiB each) and allocator slack. One copy per descriptor would be
    // `holders * one`, over ten times this bound.
    let bound = 8 * one + holders * 1024 + (8 << 20);
    assert!(holders * one > 10 * bound, "the test would not tell the two apart");
    assert!(
        grown <= bound,
        "{holders} descriptors on a {one}-byte status.json grew the daemon by {grown} bytes \
         (bound {bound}; RSS {before} KiB -> {during} KiB)"
    );
    drop(p);
    drop(m);
}

/// `nobody` holding a descriptor on `status.json` after each change of the state (an open and
/// close of a cache file): every descriptor has its own rendering, but all of them together
/// stay within the cap on non-root snapshots (`SNAPSHOT_BYTES_MAX`, 64 MiB).
#[test]
fn renderings_kept_by_non_root_readers_are_capped() {
    let l = Layout::new();
    let files = 600;
    for i in 0..files {
        fs::write(l.base.join(format!("{i:04}{}", "n".repeat(196))), b"x").unwrap();
    }
    fs::set_permissions(
        l.base.join("0000".to_string() + &"n".repeat(196)),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let m = Mount::new(&l.base, &["--no-evict"]);
    let json = sfile(&l.base, "status.json");
    steady(&m, files);
    let one = run_ok(nobody("cat").arg(&json)).len() as u64;
    let before = rss_kib(m.server_pid());
    let cap: u64 = 64 << 20;
    let rounds = 1000;
    assert!(rounds * one > 2 * cap, "the test would not reach the cap");
    let script = "import resource, sys, time\n\
                  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
                  resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n\
                  fds = []\n\
                  for _ in range(int(sys.argv[3])):\n\
                  \x20   open(sys.argv[2], 'rb').close()\n\
                  \x20   fds.append(open(sys.argv[1], 'rb'))\n\
                  print('ready', flush=True)\n\
                  time.sleep(120)\n";
    let n = rounds.to_string();
    let image = l.base.join("0000".to_string() + &"n".repeat(196));
    let mut p = Proc::spawn(&mut nobody_python(script, &[&json, &image, Path::new(&n)]));
    p.wait_line("ready");
    let grown = rss_kib(m.server_pid()).saturating_sub(before) * 1024;
    let bound = cap + 8 * one + rounds * 1024 + (8 << 20);
    assert!(
        grown <= bound,
        "{rounds} renderings of a {one}-byte status.json held by nobody grew the daemon by \
         {grown} bytes (bound {bound})"
    );
    // Root still reads fresh state.
    let (code, _, err) = run(tool("cat").arg(&json));
    assert_eq!(code, 0, "root reading status.json past the cap: {err}");
    drop(p);
    drop(m);
}

/// `nobody` opening and closing a cache file and reading status files in a loop for 5 s
/// changes the state many times, but the state file is written at most about once a second;
/// `status.json` says whether what it shows is on disk, and soon it is.
#[test]
fn an_open_close_loop_writes_the_state_file_at_most_once_a_second() {
    let l = Layout::new();
    fs::write(l.base.join(HASH), b"base image\n").unwrap();
    fs::set_permissions(l.base.join(HASH), fs::Permissions::from_mode(0o644)).unwrap();
    let m = Mount::new(&l.base, &[]);
    wait_until(POLL, "the first state-file write", || {
        (metric(&l.base, "imagecachefs_state_writes_total") > 0).then_some(())
    });
    let writes0 = metric(&l.base, "imagecachefs_state_writes_total");
    let secs = 5.0;
    let script = "import sys, time\n\
                  end = time.monotonic() + float(sys.argv[4])\n\
                  n = 0\n\
                  while time.monotonic() < end:\n\
                  \x20   open(sys.argv[1], 'rb').close()\n\
                  \x20   open(sys.argv[2]).read()\n\
                  \x20   open(sys.argv[3]).read()\n\
                  \x20   n += 1\n\
                  print(n)\n";
    let started = Instant::now();
    let out = run_ok(&mut nobody_python(
        script,
        &[
            &l.base.join(HASH),
            &sfile(&l.base, "events"),
            &sfile(&l.base, "status.json"),
            Path::new(&secs.to_string()),
        ],
    ));
    let elapsed = started.elapsed().as_secs_f64();
    let loops: u64 = out.trim().parse().unwrap();
    let writes = metric(&l.base, "imagecachefs_state_writes_total") - writes0;
    assert!(loops >= 20, "only {loops} rounds in {elapsed:.1} s: the loop did not run");
    assert!(
        writes as f64 <= elapsed + 2.0,
        "{loops} open/close rounds in {elapsed:.1} s wrote the state file {writes} times"
    );
    // What the loop did reaches the disk within about a second.
    wait_until(POLL, "status.json to say its state is on disk", || {
        let text = fs::read_to_string(sfile(&l.base, "status.json")).unwrap();
        text.contains("\"persisted\":true").then_some(())
    });
    drop(m);
}

/// 2,000 `stat`s of a 300-byte name (`ENAMETOOLONG` underneath) by `nobody`, and 100 KB of
/// garbage written to `control` by root, add almost nothing to the daemon's log.
#[test]
fn failing_lookups_and_garbage_commands_do_not_flood_the_log() {
    let l = Layout::new();
    let m = Mount::new(&l.base, &[]);
    let before = m.log_text().len();
    let long = l.base.join("n".repeat(300));
    let script = "import os, sys\n\
                  for _ in range(2000):\n\
                  \x20   try:\n\
                  \x20       os.stat(sys.argv[1])\n\
                  \x20   except OSError as e:\n\
                  \x20       assert e.errno == 36, e\n\
                  print('done')\n";
    let out = run_ok(&mut nobody_python(script, &[&long]));
    assert_eq!(out.trim(), "done");
    let grown = m.log_text().len() - before;
    assert!(grown < 2000, "2,000 stats of a long name logged {grown} bytes:\n{}", m.log_text());

    let before = m.log_text().len();
    let garbage: Vec<u8> = (0..100_000u32).map(|i| b"x\x01\n\x1b[2J;"[i as usize % 8]).collect();
    let garbage_line = vec![b'z'; 4000];
    for data in [&garbage[..], &garbage_line[..]] {
        let e = fs::write(sfile(&l.base, "control"), data).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "garbage to control: {e}");
    }
    let log = m.log_text();
    let added = &log[before..];
    assert!(added.len() < 1500, "garbage to control logged {} bytes:\n{added}", added.len());
    assert!(!added.contains('\x1b') && !added.contains('\x01'), "unescaped input:\n{added:?}");
    drop(m);
}

/// A file named `evil\nstate: idle`, a 255-byte name, and a holder whose program's name has a
/// newline: every text keeps one line per row and per key, the names come back escaped, and
/// `status.json` is valid JSON with structured holders.
#[test]
fn names_and_program_names_cannot_forge_lines() {
    let l = Layout::new();
    let evil = "evil\nstate: idle";
    let long = "l".repeat(255);
    let m = Mount::new(&l.base, &[]);
    for n in [evil, &long, HASH] {
        fs::write(l.base.join(n), b"content\n").unwrap();
    }
    // `tail -f` opens the file itself and keeps it open: its program is its executable.
    let prog_dir = l.s.path("bin");
    fs::create_dir(&prog_dir).unwrap();
    let prog = prog_dir.join("ta\nil");
    common::require_tool("tail");
    fs::copy(run_ok(tool("sh").args(["-c", "command -v tail"])).trim(), &prog).unwrap();
    let mut holder = Proc::spawn_logged(
        Command::new(&prog).args(["-f", "-n", "0"]).arg(l.base.join(evil)),
        l.s.path("tail.log"),
    );
    holder.wait_open(&l.base.join(evil), POLL);
    let escaped_evil = "evil\\x0astate:\\x20idle";
    let image = wait_until(POLL, "the holder and the SHA-1 of the evil file", || {
        let t = fs::read_to_string(sfile(&l.base, &format!("images/{evil}"))).ok()?;
        (t.contains("refs: 1\n") && !t.contains("sha1: pending")).then_some(t)
    });
    assert_eq!(image.lines().count(), 13, "13 keys, one line each:\n{image}");
    assert_eq!(image.lines().filter(|l| l.starts_with("state: ")).count(), 1, "{image}");
    assert!(image.starts_with(&format!("name: {escaped_evil}\n")), "{image}");
    let want_holder = format!("holders: {} ta\\x0ail\n", holder.pid());
    assert!(image.contains(&want_holder), "want {want_holder:?} in:\n{image}");

    let table = fs::read_to_string(sfile(&l.base, "status")).unwrap();
    assert_eq!(table.lines().count(), 4, "a header and three rows:\n{table}");
    let widths: Vec<usize> = table.lines().map(str::len).collect();
    assert!(widths.iter().all(|&w| w < 200), "a 255-byte name widened the table: {widths:?}");
    assert!(table.lines().any(|l| l.starts_with(escaped_evil)), "{table}");

    let script = "import json, sys\n\
                  d = json.load(open(sys.argv[1]))\n\
                  for i in d['images']:\n\
                  \x20   h = i['holders']\n\
                  \x20   print(i['name'], len(h), *(x['program'] + '|' + str(x['pid']) + '|' + str(x['since']) for x in h))\n";
    let out = run_ok(tool("python3").args(["-c", script]).arg(sfile(&l.base, "status.json")));
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 3, "{out}");
    let evil_row = rows.iter().find(|r| r.starts_with(escaped_evil)).expect("the evil row");
    let fields: Vec<&str> = evil_row.split(' ').collect();
    assert_eq!(fields[1], "1", "{evil_row}");
    let holder_fields: Vec<&str> = fields[2].split('|').collect();
    assert_eq!(holder_fields[0], "ta\\x0ail", "{evil_row}");
    assert_eq!(holder_fields[1], holder.pid().to_string(), "{evil_row}");
    assert!(holder_fields[2].ends_with('Z'), "since is a time: {evil_row}");
    assert!(rows.iter().any(|r| r.starts_with(&format!("{long} 0"))), "{out}");

    let events = fs::read_to_string(sfile(&l.base, "events")).unwrap();
    assert!(events.lines().all(|l| l.as_bytes()[..4].iter().all(u8::is_ascii_digit)), "{events}");
    assert!(events.contains(&format!(" created {escaped_evil} sha1 ")), "{events}");
    let log = m.log_text();
    assert!(log.contains(escaped_evil), "the log names the file, escaped:\n{log}");
    assert!(!log.lines().any(|l| l.starts_with("state: idle")), "a forged log line:\n{log}");
    drop(holder);
    drop(m);
}

/// `nobody` reads every status file but sees no SHA-1 and no holder (pid, program); root
/// sees both.
#[test]
fn non_root_readers_see_no_sha1s_and_no_holders() {
    let l = Layout::new();
    let m = Mount::new(&l.base, &[]);
    let file = l.base.join(HASH);
    fs::write(&file, b"secret content\n").unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
    let sha1 = wait_until(POLL, "the SHA-1", || {
        let t = fs::read_to_string(sfile(&l.base, &format!("images/{HASH}"))).ok()?;
        let s = t.lines().find_map(|l| l.strip_prefix("sha1: "))?.to_string();
        (s != "pending").then_some(s)
    });
    let holder = Proc::spawn_logged(
        tool("sh").args(["-c", r#"exec 3<"$1"; exec sleep 60"#, "sh"]).arg(&file),
        l.s.path("sleeper.log"),
    );
    let pid = holder.pid().to_string();
    wait_until(POLL, "the holder counted", || {
        let t = fs::read_to_string(sfile(&l.base, &format!("images/{HASH}"))).ok()?;
        t.contains(&format!("holders: {pid} ")).then_some(())
    });
    for rel in ["status", "status.json", "events", &format!("images/{HASH}"), "metrics"] {
        let p = sfile(&l.base, rel);
        let (code, out, err) = run(nobody("cat").arg(&p));
        assert_eq!(code, 0, "nobody reading {rel}: {err}");
        assert!(!out.is_empty() || rel == "events", "{rel} is empty for nobody");
        assert!(!out.contains(&sha1[..12]), "nobody sees the SHA-1 in {rel}:\n{out}");
        assert!(!out.contains(&format!("{pid} ")), "nobody sees the holder in {rel}:\n{out}");
        let root = fs::read_to_string(&p).unwrap();
        if rel != "metrics" {
            assert!(root.contains(&sha1[..12]), "root sees the SHA-1 in {rel}:\n{root}");
        }
    }
    let image = run_ok(nobody("cat").arg(sfile(&l.base, &format!("images/{HASH}"))));
    assert!(image.contains("refs: 1\n") && image.contains("holders: hidden\n"), "{image}");
    assert!(image.contains("sha1: hidden\n") && image.contains("state: in-use\n"), "{image}");
    let json = run_ok(nobody("cat").arg(sfile(&l.base, "status.json")));
    assert!(json.contains("\"holders\":null") && json.contains("\"sha1\":null"), "{json}");
    // The name itself is for everyone, as `ls` of the directory would show it.
    assert!(json.contains(HASH), "{json}");
    drop(holder);
    drop(m);
}

/// Reading status files in a loop does not read every instance disk each time: the
/// backing-file names shown (`state: referenced`) are read at most every 5 s. Counted with
/// `strace` on the daemon: opens of the instance disk while `status` is read for 3 s.
#[test]
fn status_reads_reuse_the_backing_file_names_for_a_few_seconds() {
    let l = Layout::new();
    let base = l.base.join(HASH);
    fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let disk = l.s.path("instances/instance-00000001/disk");
    common::overlay(&disk, &base);
    let m = Mount::new(&l.base, &[]);
    let image = sfile(&l.base, &format!("images/{HASH}"));
    wait_until(POLL, "the base shown as referenced", || {
        fs::read_to_string(&image).ok()?.contains("state: referenced\n").then_some(())
    });
    let trace = l.s.path("strace.log");
    let pid = m.server_pid().to_string();
    let strace = Proc::spawn_logged(
        tool("strace")
            .args(["-f", "-qq", "-e", "trace=openat,open", "-o"])
            .arg(&trace)
            .args(["-p", &pid]),
        l.s.path("strace.out"),
    );
    wait_until(POLL, "strace to attach", || {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let tracer = status.lines().find_map(|l| l.strip_prefix("TracerPid:"))?.trim().to_string();
        (tracer != "0").then_some(())
    });
    let started = Instant::now();
    let mut reads = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let text = fs::read_to_string(sfile(&l.base, "status")).unwrap();
        assert!(text.contains(" referenced "), "{text}");
        reads += 1;
    }
    strace.terminate();
    let opens = fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .filter(|l| l.contains("instance-00000001/disk\""))
        .count();
    assert!(reads >= 20, "only {reads} reads of status in 3 s");
    assert!(opens <= 2, "{reads} reads of status opened the instance disk {opens} times");
    drop(m);
}
