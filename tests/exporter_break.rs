//! Attempts to break the HTTP exporter (`--metrics-listen`, issue 14) on real mounts: each
//! test is the reproduction of a way a scraper lost its metrics. The mount goes with its
//! [`Mount`]; waits poll with deadlines.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{alive, wait_until, Mount, Scratch};

/// A port free on the loopback address now.
fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// One raw exchange: everything the exporter answers before it closes the connection.
fn ask(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap_or_else(|e| panic!("reading the answer to {request:?}: {e}"));
    String::from_utf8(raw).expect("the answer is text")
}

/// The header `name` (lower case) of a raw answer.
fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let (head, _) = answer.split_once("\r\n\r\n")?;
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// Reproduction: `curl -I http://ADDR/metrics` (and monitoring probes that check an
/// endpoint with HEAD) got `405`, although HEAD is GET without the body for every HTTP
/// server. It must get the head of a scrape and no body.
#[test]
fn head_gets_the_head_of_a_scrape_without_the_body() {
    let s = Scratch::new();
    let addr = free_port();
    let m = Mount::new(&s.base, &["--metrics-listen", &addr.to_string()]);
    let got = ask(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(got.starts_with("HTTP/1.1 200 "), "{got:.200}");
    let head = ask(addr, "HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 "), "HEAD /metrics: {head:.200}");
    assert_eq!(header(&head, "content-type"), header(&got, "content-type"), "{head}");
    let (_, body) = head.split_once("\r\n\r\n").unwrap();
    assert_eq!(body, "", "HEAD has no body");
    drop(m);
}

/// Reproduction: the server is killed (`kill -9`), and the port is taken for a moment when
/// its replacement starts (here by this test, bound while the supervisor is stopped; in the
/// field by anything that binds it in between). The replacement logged "cannot listen ...
/// serving without it" and never tried again: the mount went on with no exporter until the
/// next restart, while Prometheus saw only a scrape target down. It must bind as soon as the
/// port is free again.
#[test]
fn a_replaced_server_binds_the_port_once_it_is_free_again() {
    let s = Scratch::new();
    let addr = free_port();
    let m = Mount::new(&s.base, &["--metrics-listen", &addr.to_string()]);
    assert!(ask(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").starts_with("HTTP/1.1 200 "));
    let sup = m.pid();
    let old = m.server_pid();
    // The supervisor is held back, so that the port is taken before it starts a new server.
    unsafe { libc::kill(sup as i32, libc::SIGSTOP) };
    let resume = Resume(sup);
    unsafe { libc::kill(old as i32, libc::SIGKILL) };
    wait_until(Duration::from_secs(10), "the killed server gone", || (!alive(old)).then_some(()));
    // std binds with SO_REUSEADDR, as the daemon does: the old connections do not matter.
    let squatter = wait_until(Duration::from_secs(5), "the port taken by this test", || {
        TcpListener::bind(addr).ok()
    });
    drop(resume);
    let new =
        wait_until(Duration::from_secs(10), "a new server answering through the mount", || {
            m.status_server_pid().filter(|&p| p != old)
        });
    wait_until(Duration::from_secs(5), "the new server's refusal logged", || {
        m.log_text().contains("cannot listen").then_some(())
    });
    drop(squatter);
    let t = Instant::now();
    let got = wait_until(Duration::from_secs(10), "the new server serving metrics", || {
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut raw = String::new();
        c.read_to_string(&mut raw).ok()?;
        Some(raw)
    });
    assert!(got.starts_with("HTTP/1.1 200 "), "{got:.200}");
    assert!(got.contains("imagecachefs_up 1"), "{got}");
    assert_eq!(m.status_server_pid(), Some(new), "served by the new server");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "bound {:?} after the port was free",
        t.elapsed()
    );
    drop(m);
}

/// Lets a stopped supervisor go on, also when the test fails while it is stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// Reproduction: `imagecachefs unmount DIR && imagecachefs mount DIR --metrics-listen ADDR`
/// (an operator remounting with other flags, while VMs keep the old daemon serving their open
/// files). The unmount returned once the mount was gone, but the old daemon let go of the
/// port only at its exporter's next check, up to 200 ms later: the new mount was refused
/// with "cannot listen: Address already in use". The port must be free when the unmount
/// returns.
#[test]
fn a_mount_right_after_an_unmount_gets_the_port() {
    let s = Scratch::new();
    let addr = free_port();
    let listen = addr.to_string();
    let mut old = Mount::new(&s.base, &["--metrics-listen", &listen]);
    std::fs::write(s.base.join("swap_1"), b"x").unwrap();
    for round in 0..3 {
        // An open file keeps the old daemon serving after its mount is detached.
        let held = std::fs::File::open(s.base.join("swap_1")).unwrap();
        let (code, _, err) = common::run_timeout(
            std::process::Command::new(common::bin()).arg("unmount").arg(&s.base),
            Duration::from_secs(20),
        );
        assert_eq!(code, 0, "round {round}: unmount: {err}");
        // At once, as a script does: Mount::new fails the test if the daemon exits instead.
        let new = Mount::new(&s.base, &["--metrics-listen", &listen]);
        let got = ask(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 200 "), "round {round}: {got:.200}");
        assert!(old.running(), "round {round}: the old daemon still serves the open file");
        drop(held);
        assert!(
            old.wait_exit(Duration::from_secs(30)).is_some_and(|st| st.success()),
            "round {round}: the old daemon exits once its file is closed"
        );
        old = new;
    }
    drop(old);
}

/// As [`a_mount_right_after_an_unmount_gets_the_port`], the mount detached by someone else
/// (`umount -l DIR`, by an operator or a script) and the next daemon started at once: the old
/// daemon lets go of the port as soon as it sees its mount gone (its mount-table watch wakes
/// at the change), not at its exporter's next check up to 200 ms later.
#[test]
fn a_mount_right_after_a_lazy_umount_gets_the_port() {
    let s = Scratch::new();
    let addr = free_port();
    let listen = addr.to_string();
    let mut old = Mount::new(&s.base, &["--metrics-listen", &listen]);
    std::fs::write(s.base.join("swap_1"), b"x").unwrap();
    for round in 0..3 {
        let held = std::fs::File::open(s.base.join("swap_1")).unwrap();
        let (code, _, err) = common::run_timeout(
            common::tool("umount").arg("-l").arg(&s.base),
            Duration::from_secs(20),
        );
        assert_eq!(code, 0, "round {round}: umount -l: {err}");
        let new = Mount::new(&s.base, &["--metrics-listen", &listen]);
        let got = ask(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 200 "), "round {round}: {got:.200}");
        drop(held);
        assert!(
            old.wait_exit(Duration::from_secs(30)).is_some_and(|st| st.success()),
            "round {round}: the old daemon exits once its file is closed"
        );
        old = new;
    }
    drop(old);
}
