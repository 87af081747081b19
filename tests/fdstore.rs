//! systemd's side of a restart without unmount: the supervisor hands the connection to the
//! service manager's fd store (`FDSTORE=1`), says `READY=1` once the mount serves, and a new
//! supervisor started with the stored fds (`LISTEN_FDS`, `LISTEN_FDNAMES`) takes the mount
//! over after the old supervisor and its server died. systemd cannot run as PID 1 on the
//! machines the tests run on, so the test plays the service manager's part of the protocol
//! (sd_notify(3), sd_listen_fds(3)) itself: a datagram socket for `NOTIFY_SOCKET`, the fds it
//! received put at 3, 4, 5 of the next supervisor.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, children, is_fuse, kill_and_reap, wait_until, Scratch};

/// One notify datagram: its text and the fds it carried (`None` once the read times out).
fn receive(sock: &UnixDatagram) -> Option<(String, Vec<OwnedFd>)> {
    let (bytes, fds) = imagecachefs::supervise::recv(sock.as_fd()).ok()??;
    Some((String::from_utf8_lossy(&bytes).into_owned(), fds))
}

/// What the service manager keeps: the fd store by name, and whether READY=1 came.
#[derive(Default)]
struct Manager {
    store: Vec<(String, OwnedFd)>,
    ready: bool,
    removed: Vec<String>,
}

impl Manager {
    fn take(&mut self, sock: &UnixDatagram) {
        while let Some((text, mut fds)) = receive(sock) {
            let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(str::to_owned);
            if text.lines().any(|l| l == "READY=1") {
                self.ready = true;
            }
            if text.lines().any(|l| l == "FDSTORE=1") {
                let name = field("FDNAME=").unwrap_or_default();
                assert_eq!(fds.len(), 1, "one fd per FDSTORE message: {text:?}");
                self.store.push((name, fds.remove(0)));
            }
            if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                let name = field("FDNAME=").unwrap_or_default();
                self.store.retain(|(n, _)| *n != name);
                self.removed.push(name);
            }
        }
    }
}

fn notify_socket(s: &Scratch) -> (UnixDatagram, std::path::PathBuf) {
    let path = s.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    (sock, path)
}

/// Starts `imagecachefs mount DIR` as systemd would: `NOTIFY_SOCKET`, the unit's
/// `IMAGECACHEFS_FDSTORE=1`, and the stored fds (if any) at 3.. with `LISTEN_*`.
fn start(
    s: &Scratch,
    notify: &std::path::Path,
    stored: &[(String, OwnedFd)],
    log: &std::path::Path,
) -> std::process::Child {
    let raw: Vec<RawFd> = stored.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let names: Vec<&str> = stored.iter().map(|(n, _)| n.as_str()).collect();
    let logf = File::create(log).unwrap();
    let mut cmd = Command::new("/bin/sh");
    // LISTEN_PID must be the supervisor's pid: the shell's, which exec keeps.
    cmd.arg("-c")
        .arg(if stored.is_empty() {
            "exec \"$0\" mount \"$1\"".to_string()
        } else {
            "LISTEN_PID=$$ exec \"$0\" mount \"$1\"".to_string()
        })
        .arg(bin())
        .arg(&s.base)
        .env("NOTIFY_SOCKET", notify)
        .env("IMAGECACHEFS_FDSTORE", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf);
    if !stored.is_empty() {
        cmd.env("LISTEN_FDS", stored.len().to_string()).env("LISTEN_FDNAMES", names.join(":"));
        unsafe {
            cmd.pre_exec(move || {
                // Above every fd the child could have, then down to 3, 4, 5 (no clobbering).
                let mut high = Vec::new();
                for &fd in &raw {
                    let h = libc::fcntl(fd, libc::F_DUPFD, 100);
                    if h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high.push(h);
                }
                for (i, &h) in high.iter().enumerate() {
                    if libc::dup2(h, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(h);
                }
                Ok(())
            });
        }
    }
    cmd.spawn().expect("spawn imagecachefs")
}

fn log_text(p: &std::path::Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The supervisor and its server both die (`kill -9`); the fd store keeps the connection; a
/// new supervisor started with the stored fds serves the same mount: a file held open across
/// it all reads on, its reference is still counted, and no unmount happened.
#[test]
fn a_supervisor_restarted_from_the_fd_store_takes_the_mount_over() {
    let s = Scratch::new();
    std::fs::write(s.base.join("img"), vec![7u8; 1 << 20]).unwrap();
    let (sock, notify) = notify_socket(&s);
    let log1 = s.path("sup1.log");
    let mut sup1 = start(&s, &notify, &[], &log1);
    let mut mgr = Manager::default();
    wait_until(Duration::from_secs(20), "READY=1 and three stored fds", || {
        mgr.take(&sock);
        (mgr.ready && mgr.store.len() == 3).then_some(())
    });
    assert!(is_fuse(&s.base), "READY=1 came before the mount was live:\n{}", log_text(&log1));
    let mut names: Vec<&str> = mgr.store.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(names, ["imagecachefs-dev", "imagecachefs-dir", "imagecachefs-journal"]);

    // A VM-like reader holds the base open through the mount.
    let mut held = File::open(s.base.join("img")).unwrap();
    let refs = |what: &str| {
        let v = status_json(&s.base).unwrap_or_else(|| panic!("{what}: status.json"));
        let img = v["images"].as_array().unwrap().iter().find(|i| i["name"] == "img").cloned();
        img.unwrap_or_else(|| panic!("{what}: no img in {v}"))["refs"].as_u64().unwrap()
    };
    assert_eq!(refs("before"), 1);
    let mount_id = mount_id_of(&s.base);

    // The supervisor dies: its server notices and exits (two servers must never serve one
    // connection); the stored fds keep the mount alive, nobody serves it meanwhile.
    let server = children(sup1.id());
    assert_eq!(server.len(), 1, "one server: {server:?}");
    kill_and_reap(&mut sup1);
    wait_until(Duration::from_secs(5), "the orphaned server to exit", || {
        (!std::path::Path::new(&format!("/proc/{}", server[0])).exists()
            || proc_state(server[0]) == 'Z')
            .then_some(())
    });
    assert!(log_text(&log1).contains("fd store keeps the mount"), "{}", log_text(&log1));

    // systemd's Restart=: a new supervisor with the stored fds.
    let stored = std::mem::take(&mut mgr.store);
    let log2 = s.path("sup2.log");
    let mut sup2 = start(&s, &notify, &stored, &log2);
    // The fds are the new supervisor's now (systemd keeps its own copies; here the test
    // keeps them until the new supervisor has stored them again).
    let mut mgr2 = Manager::default();
    wait_until(Duration::from_secs(20), "READY=1 from the new supervisor", || {
        mgr2.take(&sock);
        mgr2.ready.then_some(())
    });
    drop(stored);
    let mut buf = vec![0u8; 4096];
    held.read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 7), "the held file reads on");
    assert_eq!(mount_id_of(&s.base), mount_id, "the same mount, never unmounted");
    assert_eq!(refs("after"), 1, "the held reference is still counted, once");
    let text = log_text(&log2);
    assert!(text.contains("fd store"), "{text}");
    drop(held);
    wait_until(Duration::from_secs(10), "refs back to 0", || (refs("released") == 0).then_some(()));
    // A new file through the mount works too.
    File::create(s.base.join("new")).unwrap().write_all(b"x").unwrap();

    // A real stop: the mount goes, and the stored fds are removed from the store.
    unsafe { libc::kill(sup2.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while sup2.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the supervisor did not stop:\n{}", log_text(&log2));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!is_fuse(&s.base), "stopped but still mounted");
    wait_until(Duration::from_secs(5), "FDSTOREREMOVE for the three fds", || {
        mgr2.take(&sock);
        (mgr2.removed.len() == 3).then_some(())
    });
}

/// `DIR/.imagecache/status.json`, parsed (None when it cannot be read or parsed).
fn status_json(dir: &std::path::Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join(".imagecache/status.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn proc_state(pid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')').next().and_then(|r| r.trim().chars().next()).unwrap_or('?')
}

/// The mount id of the top mount at `dir` (`/proc/self/mountinfo`).
fn mount_id_of(dir: &std::path::Path) -> u64 {
    let want = dir.to_string_lossy().replace(' ', "\\040");
    let mut text = String::new();
    File::open("/proc/self/mountinfo").unwrap().read_to_string(&mut text).unwrap();
    text.lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(4) == Some(&want.as_str())).then(|| f[0].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("{dir:?} is not mounted"))
}
