//! Attempts to break restart without unmount (issue 12) on real mounts: each test is a
//! reproduction of a way a caller saw an error, or the mount misbehaved, across a server that
//! died or a supervisor told to stop. Every background process is owned by the test; the
//! mount goes with its [`Mount`]; waits poll with deadlines.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use common::{is_fuse, wait_until, Mount, Scratch};

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
