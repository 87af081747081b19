//! Signals and where the log goes, for real: every signal whose default action would end (or
//! stop) the daemon leaves the mount working (logged once, ignored); `SIGHUP` reopens `--log-file` after
//! it was rotated away; a `--background` daemon without `--log-file` logs to syslog (a datagram
//! socket the test binds, named through `IMAGECACHEFS_SYSLOG_SOCKET`).

mod common;

use common::{bin, daemon_pids, is_fuse, kill_daemons, run_timeout, wait_daemons_gone, wait_until};
use common::{Mount, Scratch};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

fn send(pid: u32, sig: libc::c_int) {
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill {pid} {sig}");
}

/// The mount answers: a file written through it reads back, a status file renders.
fn assert_serves(dir: &Path, what: &str) {
    assert!(is_fuse(dir), "{what}: the mount is gone");
    let f = dir.join("probe");
    std::fs::write(&f, what.as_bytes()).unwrap_or_else(|e| panic!("{what}: write: {e}"));
    assert_eq!(std::fs::read(&f).unwrap(), what.as_bytes(), "{what}");
    std::fs::read_to_string(dir.join(".imagecache/status"))
        .unwrap_or_else(|e| panic!("{what}: status: {e}"));
}

fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn stray_signals_leave_the_mount_working() {
    let s = Scratch::new();
    let m = Mount::new(&s.base, &[]);
    let rtmin = libc::SIGRTMIN();
    let rtmax = libc::SIGRTMAX();
    let signals: Vec<(libc::c_int, String)> = [
        (libc::SIGUSR1, "SIGUSR1".to_string()),
        (libc::SIGUSR2, "SIGUSR2".into()),
        (libc::SIGQUIT, "SIGQUIT".into()),
        (libc::SIGALRM, "SIGALRM".into()),
        (libc::SIGVTALRM, "SIGVTALRM".into()),
        (libc::SIGPROF, "SIGPROF".into()),
        (libc::SIGIO, "SIGIO".into()),
        (libc::SIGPWR, "SIGPWR".into()),
        (libc::SIGSTKFLT, "SIGSTKFLT".into()),
        (libc::SIGXCPU, "SIGXCPU".into()),
        (libc::SIGXFSZ, "SIGXFSZ".into()),
        (libc::SIGTSTP, "SIGTSTP".into()),
        (libc::SIGTTIN, "SIGTTIN".into()),
        (libc::SIGTTOU, "SIGTTOU".into()),
        (rtmin, "SIGRTMIN+0".into()),
        (rtmin + 5, "SIGRTMIN+5".into()),
        (rtmax, format!("SIGRTMIN+{}", rtmax - rtmin)),
    ]
    .into();
    for (sig, name) in &signals {
        send(m.pid(), *sig);
        let line = format!("{name}: ignored");
        wait_until(WAIT, &line, || (m.log_text().contains(&line) || !m.running()).then_some(()));
        assert!(m.running(), "{name} ended the daemon:\n{}", m.log_text());
        assert_serves(&s.base, name);
    }
    // SIGPIPE is ignored outright (it never reaches the signal thread).
    send(m.pid(), libc::SIGPIPE);
    // Each is logged once, however often it comes. Pending signals are taken lowest number
    // first, so the line of a real-time signal sent last proves the repeats were handled.
    for sig in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGQUIT, rtmin + 7] {
        send(m.pid(), sig);
    }
    wait_until(WAIT, "SIGRTMIN+7's line", || {
        m.log_text().contains("SIGRTMIN+7: ignored").then_some(())
    });
    let log = m.log_text();
    for name in ["SIGUSR1", "SIGUSR2", "SIGQUIT"] {
        assert_eq!(count(&log, &format!("{name}: ignored")), 1, "{name} logged once:\n{log}");
    }
    assert!(m.running(), "the daemon is alive:\n{log}");
    assert_serves(&s.base, "after the repeats");
    // SIGTERM keeps its meaning.
    let st = m.stop();
    assert!(st.success(), "daemon exit after SIGTERM: {st}");
    assert!(!is_fuse(&s.base));
}

#[test]
fn sighup_reopens_a_rotated_log_file() {
    let s = Scratch::new();
    let log = s.path("icfs.log");
    let m = Mount::new(&s.base, &["--log-file", log.to_str().unwrap()]);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_until(WAIT, "the mount line in --log-file", || {
        read(&log).contains("mounted over").then_some(())
    });
    // logrotate's move: the daemon keeps writing the old file until told.
    let rotated = s.path("icfs.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    send(m.pid(), libc::SIGUSR1);
    wait_until(WAIT, "USR1's line in the rotated file", || {
        read(&rotated).contains("SIGUSR1: ignored").then_some(())
    });
    assert!(!log.exists(), "nothing reopened before SIGHUP");
    send(m.pid(), libc::SIGHUP);
    wait_until(WAIT, "a new log file after SIGHUP", || {
        read(&log).contains("SIGHUP: reopened the log file").then_some(())
    });
    // Not writable by others, whatever the daemon's umask (0, for the files it creates for
    // callers): nobody must not add lines to it.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&log).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o640, "the reopened log file's mode");
    // The next lines go to the new file only.
    send(m.pid(), libc::SIGUSR2);
    wait_until(WAIT, "USR2's line in the new file", || {
        read(&log).contains("SIGUSR2: ignored").then_some(())
    });
    assert!(!read(&rotated).contains("SIGUSR2"), "the rotated file is let go");
    assert!(read(&rotated).contains("mounted over"), "the rotated file keeps its lines");
    assert_serves(&s.base, "after SIGHUP");
    let st = m.stop();
    assert!(st.success(), "daemon exit: {st}");
    assert!(read(&log).contains("ended; exiting"), "the last lines reach the new file");
}

#[test]
fn background_without_log_file_logs_to_syslog() {
    let s = Scratch::new();
    let sock_path = s.path("syslog.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let (code, out, err) = run_timeout(
        Command::new(bin())
            .arg("mount")
            .arg(&s.base)
            .arg("--background")
            .env("IMAGECACHEFS_SYSLOG_SOCKET", &sock_path)
            .env("RUST_LOG", "info"),
        Duration::from_secs(30),
    );
    let pids = daemon_pids(&s.base);
    if code != 0 || pids.len() != 1 {
        kill_daemons(&s.base);
        panic!("mount --background: exit {code}, daemons {pids:?}\nstdout: {out}\nstderr: {err}");
    }
    let pid = pids[0];
    // The supervisor's server logs under its own pid.
    let servers = common::children(pid as u32);
    let mut got: Vec<String> = Vec::new();
    let recv_until = |needle: &str, got: &mut Vec<String>| {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 9000];
        while !got.iter().any(|l| l.contains(needle)) {
            if Instant::now() > deadline {
                return false;
            }
            if let Ok(n) = sock.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        true
    };
    let mounted = recv_until("mounted over", &mut got);
    // A signal's line arrives the same way, while the daemon runs on.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let usr1 = recv_until("SIGUSR1: ignored", &mut got);
    let (ucode, _, uerr) =
        run_timeout(Command::new(bin()).arg("unmount").arg(&s.base), Duration::from_secs(20));
    let ended = recv_until("ended; exiting", &mut got);
    if !wait_daemons_gone(&s.base, WAIT) {
        kill_daemons(&s.base);
        panic!("the background daemon did not exit after unmount");
    }
    assert!(mounted && usr1 && ended, "syslog datagrams: {got:#?}");
    assert_eq!(ucode, 0, "unmount: {uerr}");
    let line = got.iter().find(|l| l.contains("mounted over")).unwrap();
    let want = |p: u32| format!("<30>imagecachefs[{p}]: mounted over {}", s.base.display());
    assert!(
        std::iter::once(pid as u32)
            .chain(servers.iter().copied())
            .any(|p| line.starts_with(&want(p))),
        "facility daemon, severity info, the supervisor's or its server's pid: {line:?}, want {:?}",
        want(pid as u32)
    );
    assert!(got.iter().all(|l| !l.ends_with('\n')), "one record per datagram: {got:#?}");
}
