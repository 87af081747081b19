//! Attempts to break restart without unmount (issue 12) on real mounts: each test is a
//! reproduction of a way a caller saw an error, or the mount misbehaved, across a server that
//! died or a supervisor told to stop. Every background process is owned by the test; the
//! mount goes with its [`Mount`]; waits poll with deadlines.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use common::{alive, is_fuse, tool, wait_until, BindMount, Mount, Proc, Scratch};

/// The journal memfd among the supervisor's descriptors, as a path that opens it.
fn journal_of(sup: u32) -> PathBuf {
    wait_until(Duration::from_secs(5), "the supervisor's journal memfd", || {
        fs::read_dir(format!("/proc/{sup}/fd")).ok()?.flatten().find_map(|fd| {
            let link = fs::read_link(fd.path()).ok()?;
            link.to_string_lossy().starts_with("/memfd:imagecachefs-journal").then(|| fd.path())
        })
    })
}

/// How many servers the supervisor's log says ended with a failure status.
fn failed_servers(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("exited with status") && l.contains("starting server"))
        .count()
}

/// A supervisor whose servers cannot start (its journal was overwritten, so each new server
/// refuses it and exits) must still obey SIGTERM: it gives up the mount and exits, instead of
/// restarting servers forever while `systemctl stop` waits for it.
#[test]
fn sigterm_stops_a_supervisor_whose_servers_keep_failing_to_start() {
    let s = Scratch::new();
    let m = Mount::new(&s.base, &[]);
    fs::write(s.base.join("f"), b"x").unwrap();
    let sup = m.pid();
    let server = m.server_pid();
    let journal = journal_of(sup);
    OpenOptions::new()
        .write(true)
        .open(&journal)
        .and_then(|f| f.write_all_at(b"NOT A JOURNAL, NOT AT ALL", 0))
        .unwrap_or_else(|e| panic!("overwriting {journal:?}: {e}"));
    unsafe { libc::kill(server as i32, libc::SIGKILL) };
    wait_until(Duration::from_secs(10), "two replacement servers that failed to start", || {
        (failed_servers(&m.log_text()) >= 2).then_some(())
    });
    let log_path = m.log.clone();
    m.signal_term();
    let exited = m.wait_exit(Duration::from_secs(10));
    let log = fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        exited.is_some(),
        "the supervisor {sup} did not exit within 10 s of SIGTERM (it was killed):\n{log}"
    );
    assert!(!is_fuse(&s.base), "the mount is still there after the supervisor stopped:\n{log}");
}

/// A file opened, then unlinked (still open), then the server killed: the descriptor must
/// go on working — `fstat`, `pread`, `pwrite`, `close` — when the daemon serves the data
/// (`--no-passthrough`, or a kernel that refused passthrough), as it does with passthrough.
#[test]
fn an_unlinked_file_still_open_survives_a_server_kill_without_passthrough() {
    let s = Scratch::new();
    let m = Mount::new(&s.base, &["--no-passthrough"]);
    let path = s.base.join("victim");
    let data = vec![0x5au8; 70_000];
    fs::write(&path, &data).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    fs::remove_file(&path).unwrap();
    let old = m.server_pid();
    let new = m.kill_server();
    assert_ne!(old, new);
    let mut errors = Vec::new();
    match f.metadata() {
        Ok(md) if md.len() == data.len() as u64 => {}
        Ok(md) => errors.push(format!("fstat: size {} instead of {}", md.len(), data.len())),
        Err(e) => errors.push(format!("fstat: {e}")),
    }
    let mut buf = vec![0u8; 100];
    match f.read_at(&mut buf, 1000) {
        Ok(100) if buf.iter().all(|&b| b == 0x5a) => {}
        Ok(n) => errors.push(format!("pread: {n} bytes {:?}", &buf[..n.min(8)])),
        Err(e) => errors.push(format!("pread: {e}")),
    }
    if let Err(e) = f.write_at(b"zz", 0) {
        errors.push(format!("pwrite: {e}"));
    }
    drop(f);
    let log = m.log_text();
    assert!(errors.is_empty(), "after the server was killed: {errors:?}\n{log}");
}

/// The FUSE worker thread of `server` (mounted with `--threads 1`: fuser names it `fuser-0`).
fn worker_thread(server: u32) -> u32 {
    wait_until(Duration::from_secs(5), "the server's FUSE worker thread", || {
        fs::read_dir(format!("/proc/{server}/task")).ok()?.flatten().find_map(|t| {
            let comm = fs::read_to_string(t.path().join("comm")).ok()?;
            comm.starts_with("fuser").then(|| t.file_name().to_str()?.parse().ok())?
        })
    })
}

/// Holds the server's only worker for 3 s before its `when`-th `syscall` after the attach
/// runs (strace's `delay_enter`); the trace goes to `log`.
fn hold_before(server: u32, syscall: &str, when: u32, log: &Path) -> Proc {
    let worker = worker_thread(server);
    let mut p = Proc::spawn_logged(
        tool("strace")
            .args(["-qq", "-p", &worker.to_string(), "-o"])
            .arg(log)
            .arg("-e")
            .arg(format!("trace={syscall}"))
            .arg("-e")
            .arg(format!("inject={syscall}:delay_enter=3s:when={when}")),
        log.with_extension("err"),
    );
    wait_until(Duration::from_secs(10), "strace to attach to the worker", || {
        p.assert_alive();
        let status = fs::read_to_string(format!("/proc/{server}/task/{worker}/status")).ok()?;
        status.lines().any(|l| l.starts_with("TracerPid:") && !l.ends_with("\t0")).then_some(())
    });
    p
}

/// Waits until the held worker is inside a call naming `name` that has not returned.
fn wait_held(log: &Path, name: &str) {
    let quoted = format!("\"{name}\"");
    wait_until(Duration::from_secs(10), &format!("a held call on {name:?}"), || {
        let text = fs::read_to_string(log).ok()?;
        text.lines().any(|l| l.contains(&quoted) && !l.contains(" = ")).then_some(())
    });
}

/// An exclusive create (`O_CREAT|O_EXCL|O_TRUNC`) that a server had read but not yet run when
/// it died, while another process made the same name behind the mount (another host on
/// shared storage, an operator in the covered directory): the resent CREATE must not open —
/// let alone truncate — the other file and report it as created. It fails with `EEXIST`, and
/// the other file keeps its content.
#[test]
fn a_resent_exclusive_create_never_takes_a_file_made_meanwhile() {
    let s = Scratch::new();
    let covered = BindMount::new(&s.base, &s.path("covered"));
    let m = Mount::new(&s.base, &["--threads", "1"]);
    let server = m.server_pid();
    let log = s.path("strace.log");
    // A CREATE of a name the kernel never saw: LOOKUP's `openat` first, then CREATE's.
    let tracer = hold_before(server, "openat", 2, &log);
    let path = s.base.join("newfile");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_TRUNC)
            .open(&path)
            .map(|_| ());
        let _ = tx.send(r.map_err(|e| e.raw_os_error().unwrap_or(-1)));
    });
    wait_held(&log, "newfile");
    let other = covered.target.join("newfile");
    fs::write(&other, b"made by someone else").unwrap();
    unsafe { libc::kill(server as i32, libc::SIGKILL) };
    let got = rx.recv_timeout(Duration::from_secs(20));
    drop(tracer);
    let log = m.log_text();
    let got = got.unwrap_or_else(|_| panic!("the stuck create was never answered\n{log}"));
    let content = fs::read(&other).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&content),
        "made by someone else",
        "the other process's file was changed by the resent create\n{log}"
    );
    assert_eq!(got, Err(libc::EEXIST), "the resent exclusive create's result\n{log}");
}

/// `status.json` read in pieces (a reader with a small buffer; `cat` of a listing larger
/// than one read) while the server is replaced: what the reader gets must be one document,
/// as every open of a status file reads one snapshot — not the start of the old server's
/// rendering glued to the rest of the new one's.
#[test]
fn status_json_read_across_a_server_kill_is_one_document() {
    let s = Scratch::new();
    let m = Mount::new(&s.base, &[]);
    for i in 0..40 {
        fs::write(s.base.join(format!("image-{i:02}")), vec![i as u8; 1000]).unwrap();
    }
    let path = s.base.join(".imagecache/status.json");
    let whole = fs::read(&path).unwrap();
    let cut = 300;
    assert!(whole.len() > 2 * cut, "status.json is too short to be read in pieces");
    let f = File::open(&path).unwrap();
    let mut got = vec![0u8; cut];
    let n = f.read_at(&mut got, 0).unwrap();
    assert_eq!(n, cut, "the first piece");
    m.kill_server();
    let mut at = cut as u64;
    let mut buf = vec![0u8; 4096];
    for _ in 0..10_000 {
        let n = f.read_at(&mut buf, at).unwrap_or_else(|e| panic!("read at {at}: {e}"));
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        at += n as u64;
    }
    let text = String::from_utf8_lossy(&got);
    if let Err(e) = serde_json::from_slice::<serde_json::Value>(&got) {
        panic!("status.json read across the kill is not one JSON document ({e}):\n{text}");
    }
}

/// A mount stopped with SIGTERM is detached while its server goes on serving the files still
/// open (a VM's base), and a new daemon mounts the directory (`systemctl restart`). If the
/// old server then dies, its supervisor starts a replacement on the old connection: that one
/// must know the mount at the path is not its own — never detach it when told to stop, never
/// decide evictions for it.
#[test]
fn a_server_replaced_after_its_mount_was_detached_leaves_the_next_mount_alone() {
    let s = Scratch::new();
    let old = Mount::new(&s.base, &[]);
    fs::write(s.base.join("held"), b"data").unwrap();
    let held = File::open(s.base.join("held")).unwrap();
    let old_server = old.server_pid();
    old.signal_term();
    wait_until(Duration::from_secs(10), "the old mount detached", || {
        (!is_fuse(&s.base)).then_some(())
    });
    let new = Mount::new(&s.base, &[]);
    let new_server = new.server_pid();
    unsafe { libc::kill(old_server as i32, libc::SIGKILL) };
    // The replacement takes over the old connection and is told to stop at once. (Both
    // daemons log to the same file, truncated by the new one: only lines since are there.)
    wait_until(Duration::from_secs(10), "the old connection's replacement told to stop", || {
        old.log_text()
            .lines()
            .any(|l| l.contains("SIGTERM: detached") || l.contains("no longer mounted by this"))
            .then_some(())
    });
    let log = old.log_text().replace('\0', "");
    assert!(
        is_fuse(&s.base) && alive(new_server),
        "the new mount was detached by the old connection's replacement server:\n{log}"
    );
    let mut buf = [0u8; 4];
    held.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"data", "the file held through the old mount");
    drop(held);
    assert!(old.wait_exit(Duration::from_secs(10)).is_some(), "the old daemon did not end");
    assert!(new.stop().success(), "the new daemon did not stop cleanly");
}

/// `rm -rf` through the mount while the server is replaced: a directory listed in pieces,
/// each entry unlinked as it is read (what `rm -r` and `shutil.rmtree` do). The listing must
/// go on where it was — every entry read once — so the directory ends empty and its `rmdir`
/// succeeds, as it does without a restart.
#[test]
fn a_directory_emptied_while_listed_across_a_server_kill_ends_empty() {
    let s = Scratch::new();
    let m = Mount::new(&s.base, &[]);
    let dir = s.base.join("tree");
    fs::create_dir(&dir).unwrap();
    let total = 3000;
    for i in 0..total {
        File::create(dir.join(format!("file-{i:05}-{}", "x".repeat(40)))).unwrap();
    }
    let mut removed = 0;
    let mut errors = Vec::new();
    for e in fs::read_dir(&dir).unwrap() {
        match e.and_then(|e| fs::remove_file(e.path())) {
            Ok(()) => removed += 1,
            Err(e) => errors.push(e.to_string()),
        }
        if removed == 100 {
            m.kill_server();
        }
    }
    let left = fs::read_dir(&dir).unwrap().count();
    assert!(errors.is_empty(), "listing and unlinking: {errors:?}");
    assert_eq!(
        (removed, left),
        (total, 0),
        "entries removed while listing, and left behind (rmdir: {:?})",
        fs::remove_dir(&dir).err()
    );
    fs::remove_dir(&dir).unwrap();
}

/// A server that stops answering (stopped with SIGSTOP here; a deadlock or a covered
/// filesystem that hangs does the same) is not dead, so nothing replaces it: every request
/// through the mount — Nova's, every VM's `fstat`/`open` — waits for ever, since this mount
/// never negotiates a request timeout. A request must be answered within 10 s.
#[test]
fn a_server_that_stops_answering_is_replaced() {
    let s = Scratch::new();
    let m = Mount::new(&s.base, &[]);
    fs::write(s.base.join("before"), b"x").unwrap();
    let server = m.server_pid();
    unsafe { libc::kill(server as i32, libc::SIGSTOP) };
    let (tx, rx) = mpsc::channel();
    let fresh = s.base.join("never-looked-up");
    std::thread::spawn(move || {
        let _ = tx.send(fs::symlink_metadata(&fresh).map(|_| ()).map_err(|e| e.to_string()));
    });
    let got = rx.recv_timeout(Duration::from_secs(10));
    // Whatever happened, the stopped server goes on (so the test leaves nothing hanging).
    unsafe { libc::kill(server as i32, libc::SIGCONT) };
    let log = m.log_text();
    match got {
        Ok(r) => assert_eq!(r.err().as_deref(), Some("No such file or directory (os error 2)")),
        Err(_) => {
            panic!("a lookup waited 10 s on a stopped server, and nothing replaced it\n{log}")
        }
    }
}
