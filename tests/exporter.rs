//! The HTTP exporter (`--metrics-listen`) on a real mount: a scrape parsed by Prometheus' own
//! parser (the same exposition as `.imagecache/metrics`, `up`, `build_info`, every counter at
//! 0 from the start), only `GET /metrics` served, a taken port refused before mounting, the
//! port let go when the daemon lets go of its mount, and hostile clients (slow, huge, many)
//! stalling neither a scrape nor the mount.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, is_fuse, run_timeout, tool, wait_until, Mount, Scratch};

/// The exporter's bounds (src/exporter.rs), as this test relies on them.
const MAX_CONNECTIONS: usize = 32;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// A port free on the loopback address now.
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// One HTTP/1.1 exchange: the status code, the headers (lower-case names) and the body. The
/// exporter closes every connection after its response.
fn http(addr: SocketAddr, request: &str) -> (u16, BTreeMap<String, String>, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap_or_else(|e| panic!("reading the answer to {request:?}: {e}"));
    let text = String::from_utf8(raw).expect("the answer is text");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn get(addr: SocketAddr, path: &str) -> (u16, BTreeMap<String, String>, String) {
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n"))
}

/// Every sample of `text` as Prometheus' parser (python3 prometheus_client) reads it:
/// `name{label="value",...}` (labels sorted) to its value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    const SCRIPT: &str = r#"
import sys
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError as e:
    print("prometheus_client is missing: %s" % e, file=sys.stderr)
    sys.exit(3)
for f in text_string_to_metric_families(sys.stdin.read()):
    for s in f.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        print("%s{%s} %r" % (s.name, labels, s.value))
"#;
    let mut child = tool("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(3),
        "the Python module prometheus_client is not installed for python3 ({}): tests/setup.sh \
         installs it",
        err.trim()
    );
    assert!(out.status.success(), "Prometheus' parser refused the text:\n{err}\n{text}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

/// The reasons STATUS.md lists for a counter's `reason` label.
fn documented_reasons(metric: &str) -> BTreeSet<String> {
    let md = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/STATUS.md"))
        .unwrap();
    let line = md
        .lines()
        .find(|l| l.starts_with(&format!("- `{metric}{{reason}}`:")))
        .unwrap_or_else(|| panic!("STATUS.md lists no reasons for {metric}"));
    let at = md.find(line).unwrap();
    // The item runs to the next item or the end of the list.
    let item: String = md[at..]
        .lines()
        .enumerate()
        .take_while(|(i, l)| *i == 0 || l.starts_with("  "))
        .fold(String::new(), |a, (_, l)| a + " " + l);
    let (_, list) = item.split_once("}`:").unwrap();
    // The reasons are the code spans before the first full stop.
    let list = list.split(". ").next().unwrap();
    list.split('`')
        .skip(1)
        .step_by(2)
        .filter(|r| r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_scrape_is_the_metrics_file_with_up_build_info_and_every_counter_at_zero() {
    let s = Scratch::new();
    let addr = free_port();
    let listen = addr.to_string();
    let m = Mount::new(&s.base, &["--metrics-listen", &listen, "--min-free", "1M"]);
    std::fs::write(s.base.join("swap_1"), vec![7u8; 12_345]).unwrap();
    let metrics_file = s.base.join(".imagecache/metrics");
    wait_until(Duration::from_secs(10), "the new file in the metrics file", || {
        std::fs::read_to_string(&metrics_file)
            .unwrap()
            .contains("imagecachefs_cache_size_bytes 12345")
            .then_some(())
    });

    let (status, headers, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let scraped = parse(&body);
    let file = parse(&std::fs::read_to_string(&metrics_file).unwrap());
    // The same exposition: the same series (values such as free space may move in between).
    let keys = |m: &BTreeMap<String, f64>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&scraped), keys(&file), "the scrape and the metrics file differ:\n{body}");
    let comments = |t: &str| t.lines().filter(|l| l.starts_with('#')).count();
    let file_text = std::fs::read_to_string(&metrics_file).unwrap();
    assert_eq!(comments(&body), comments(&file_text), "the same # HELP and # TYPE lines");

    assert_eq!(scraped.get("imagecachefs_up{}"), Some(&1.0), "{body}");
    let build = format!("imagecachefs_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(scraped.get(&build), Some(&1.0), "{body}");
    for metric in ["imagecachefs_evictions_total", "imagecachefs_eviction_refusals_total"] {
        let reasons = documented_reasons(metric);
        assert!(!reasons.is_empty(), "{metric}");
        let shown: BTreeSet<String> = scraped
            .keys()
            .filter_map(|k| k.strip_prefix(&format!("{metric}{{reason=\"")))
            .map(|r| r.trim_end_matches("\"}").to_string())
            .collect();
        assert_eq!(shown, reasons, "{metric}: every documented reason, nothing else:\n{body}");
        for r in &reasons {
            let v = scraped[&format!("{metric}{{reason=\"{r}\"}}")];
            assert_eq!(v, 0.0, "{metric} {r} starts at 0");
        }
    }
    for counter in ["reclaimed_bytes", "verifications", "checksum_mismatches"] {
        let v = scraped.get(&format!("imagecachefs_{counter}_total{{}}"));
        assert_eq!(v, Some(&0.0), "{counter}:\n{body}");
    }
    assert_eq!(scraped.get("imagecachefs_cache_size_bytes{}"), Some(&12_345.0), "{body}");
    let target = scraped.get("imagecachefs_min_free_bytes{}").copied();
    assert_eq!(target, Some((1u64 << 20) as f64), "{body}");
    let vfs = nix_statvfs(&s.tmp.path().join("."));
    let free = scraped["imagecachefs_free_bytes{}"];
    assert!(free > 0.0 && free <= vfs as f64 * 1.01, "free {free}, statvfs {vfs}");

    // Nothing but GET /metrics.
    for path in ["/", "/metrics/", "/metrics.txt", "/status.json", "/../metrics"] {
        let (status, _, body) = get(addr, path);
        assert_eq!(status, 404, "{path}: {body}");
    }
    for method in ["POST", "PUT", "DELETE"] {
        let (status, headers, body) = http(
            addr,
            &format!("{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"),
        );
        assert_eq!(status, 405, "{method}: {body}");
        assert_eq!(headers.get("allow").map(String::as_str), Some("GET, HEAD"), "{method}");
    }
    // A query string (as Prometheus may add) is the same page.
    assert_eq!(get(addr, "/metrics?x=1").0, 200);
    drop(m);
}

/// Bytes free for unprivileged users on the filesystem of `p`.
fn nix_statvfs(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut v: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut v) }, 0);
    v.f_bavail * v.f_frsize
}

/// The TCP ports process `pid` listens on (`/proc/PID/fd` sockets that `/proc/net/tcp` and
/// `tcp6` list in state LISTEN), with their local addresses as the kernel shows them.
fn listening(pid: u32) -> Vec<String> {
    let mut inodes = BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        let t = target.to_string_lossy().into_owned();
        if let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
            inodes.insert(ino.to_string());
        }
    }
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                out.push(f[1].to_string());
            }
        }
    }
    out
}

#[test]
fn the_daemon_listens_only_when_asked_and_only_where_asked() {
    let s = Scratch::new();
    let m = Mount::new(&s.base, &[]);
    // The server listens; the supervisor never does.
    assert_eq!(listening(m.pid()), Vec::<String>::new(), "the supervisor listens nowhere");
    assert_eq!(
        listening(m.server_pid()),
        Vec::<String>::new(),
        "no listener without --metrics-listen"
    );
    drop(m);
    let addr = free_port();
    let m = Mount::new(&s.base, &["--metrics-listen", &addr.to_string()]);
    // 127.0.0.1 is 0100007F in the kernel's table.
    let want = format!("0100007F:{:04X}", addr.port());
    assert_eq!(listening(m.server_pid()), vec![want], "one listener, on the address given");
    assert_eq!(listening(m.pid()), Vec::<String>::new(), "the supervisor listens nowhere");
    // Another loopback address of this host reaches nothing.
    let other = SocketAddr::from(([127, 0, 0, 2], addr.port()));
    let e = TcpStream::connect_timeout(&other, Duration::from_secs(5)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{other}: {e}");
    assert_eq!(get(addr, "/metrics").0, 200);
    drop(m);
}

#[test]
fn a_taken_port_refuses_the_mount_with_one_line_before_mounting() {
    let s = Scratch::new();
    let addr = free_port();
    let listen = addr.to_string();
    let _first = Mount::new(&s.base, &["--metrics-listen", &listen]);
    let other = s.path("other");
    std::fs::create_dir(&other).unwrap();
    for extra in [&[][..], &["--background"][..]] {
        let (code, out, err) = run_timeout(
            Command::new(bin())
                .arg("mount")
                .arg(&other)
                .args(["--metrics-listen", &listen])
                .args(extra),
            Duration::from_secs(30),
        );
        assert_eq!(code, 1, "{extra:?}: stdout {out}\nstderr {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{extra:?}: one line: {err}");
        assert!(
            lines[0]
                .starts_with(&format!("imagecachefs: --metrics-listen {addr}: cannot listen: "))
                && lines[0].contains("in use"),
            "{extra:?}: {err}"
        );
        assert!(!is_fuse(&other), "{extra:?}: nothing mounted");
    }
    // The first daemon still serves.
    assert_eq!(get(addr, "/metrics").0, 200);
    // An address that is not this host's is refused the same way.
    let (code, _, err) = run_timeout(
        Command::new(bin()).arg("mount").arg(&other).args(["--metrics-listen", "192.0.2.1:9477"]),
        Duration::from_secs(30),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with("imagecachefs: --metrics-listen 192.0.2.1:9477: cannot listen"),
        "{err}"
    );
    assert!(!is_fuse(&other));
}

#[test]
fn the_port_is_let_go_with_the_mount_so_a_new_daemon_can_take_it() {
    let s = Scratch::new();
    let addr = free_port();
    let listen = addr.to_string();
    let old = Mount::new(&s.base, &["--metrics-listen", &listen]);
    std::fs::write(s.base.join("swap_1"), b"x").unwrap();
    // An open file keeps the old daemon serving after its mount is detached.
    let held = std::fs::File::open(s.base.join("swap_1")).unwrap();
    old.signal_term();
    wait_until(Duration::from_secs(10), "the mount detached", || (!is_fuse(&s.base)).then_some(()));
    assert!(old.running(), "the old daemon still serves the open file");
    wait_until(Duration::from_secs(5), "the old daemon's listener closed", || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err().then_some(())
    });
    let new = Mount::new(&s.base, &["--metrics-listen", &listen]);
    let (status, _, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(old.running(), "the old daemon still serves the open file");
    drop(held);
    assert!(old.wait_exit(Duration::from_secs(30)).is_some_and(|st| st.success()));
    drop(new);
}

#[test]
fn hostile_clients_stall_neither_a_scrape_nor_the_mount() {
    let s = Scratch::new();
    let addr = free_port();
    let listen = addr.to_string();
    let m = Mount::new(&s.base, &["--metrics-listen", &listen]);
    std::fs::write(s.base.join("swap_1"), b"x").unwrap();

    // Slow clients: half a request line, then nothing.
    let slow: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"GET /metr").unwrap();
            c
        })
        .collect();
    // A huge request head: refused (431) or cut off, never read whole.
    let mut huge = TcpStream::connect(addr).unwrap();
    huge.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    huge.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..20_000 {
        head.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(40)).as_bytes());
    }
    let started = Instant::now();
    // The server stops reading: the write may fail part way, which is the point.
    let _ = huge.write_all(&head);
    let mut answer = Vec::new();
    let _ = huge.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "a huge head is refused: {answer:.200}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "refused at once");

    // Meanwhile a scrape and the mount answer at once.
    let t = Instant::now();
    let (status, _, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(t.elapsed() < Duration::from_secs(3), "the scrape took {:?}", t.elapsed());
    let t = Instant::now();
    assert!(std::fs::read_to_string(s.base.join(".imagecache/status")).unwrap().contains("swap_1"));
    std::fs::metadata(s.base.join("swap_1")).unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "the mount took {:?}", t.elapsed());

    // The slow clients are cut off once their head is overdue.
    for mut c in slow {
        c.set_read_timeout(Some(HEAD_TIMEOUT * 3)).unwrap();
        let t = Instant::now();
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf);
        assert!(t.elapsed() < HEAD_TIMEOUT * 3, "a slow client was not cut off");
    }

    // Many connections at once that send nothing: the oldest of them make room, so a scrape
    // still gets in at once, and no more than the bound stay open.
    let flood: Vec<TcpStream> =
        (0..MAX_CONNECTIONS + 8).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let t = Instant::now();
    let (status, _, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(t.elapsed() < Duration::from_secs(3), "the scrape took {:?}", t.elapsed());
    let closed = wait_until(Duration::from_secs(5), "the oldest silent connections closed", || {
        let closed = flood
            .iter()
            .filter(|c| {
                c.set_nonblocking(true).unwrap();
                let mut b = [0u8; 1];
                match (&**c).read(&mut b) {
                    Ok(0) => true,
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                    Ok(_) => false,
                }
            })
            .count();
        (closed > 8).then_some(closed)
    });
    assert!(closed <= 8 + 2, "only as many as needed made room: {closed}");
    std::fs::metadata(s.base.join("swap_1")).unwrap();
    drop(flood);
    drop(m);
}

#[test]
fn operations_md_alert_rules_use_metrics_the_daemon_serves() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let ops = std::fs::read_to_string(docs.join("OPERATIONS.md")).unwrap();
    let status = std::fs::read_to_string(docs.join("STATUS.md")).unwrap();
    // STATUS.md's metric table, which tests/docs.rs holds to the live exposition.
    let served: BTreeSet<String> = status
        .lines()
        .filter_map(|l| l.strip_prefix("| `imagecachefs_"))
        .map(|l| format!("imagecachefs_{}", l.split('`').next().unwrap()))
        .collect();
    assert!(served.contains("imagecachefs_free_bytes"), "{served:?}");
    let at = ops.find("<!-- alert rules -->").expect("OPERATIONS.md has the alert rules");
    let rules = &ops[at..];
    let rules = &rules[..rules[rules.find("```yaml").unwrap() + 7..].find("```").unwrap()];
    let mut used = BTreeSet::new();
    for (i, _) in rules.match_indices("imagecachefs_") {
        let name: String =
            rules[i..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect();
        used.insert(name);
    }
    assert!(used.len() >= 5, "the rules use {used:?}");
    for name in &used {
        assert!(
            served.contains(name),
            "OPERATIONS.md's alert rules use {name}, which the daemon does not serve"
        );
    }
}
