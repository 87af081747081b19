//! imagecachefs on a real cluster filesystem (issue 13): a one-brick GlusterFS volume with two
//! FUSE clients standing for two compute nodes `a` and `b` (tests/gluster/mod.rs), an
//! imagecachefs daemon over each node's view of the shared `_base`, each node with its own
//! instances directory. What exists is read on the brick, whatever a client caches. Each
//! daemon runs in mount and PID namespaces of its own (its own machine id and `/proc`), so
//! that it knows the other node only through the shared files, as on two machines. The
//! clients are mounted as GlusterFS ships them (its own 64-bit inode numbers).
//!
//! Thresholds are seconds; every wait polls with a deadline and every loop is bounded.

mod common;
mod gluster;
mod nova;

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{overlay, splitmix64, tool, wait_until, Mount, Proc, READER};
use gluster::{Cluster, Options};
use nova::{errno, event_lines, field, icfs, pseudo_random, H1, H2, H3, H4, INSTANCE};

/// Ages of every kind, seconds: short, so that a file is overdue within the test.
const AGE: &str = "1";

fn ages() -> Vec<&'static str> {
    vec!["--original-min-age", AGE, "--resized-min-age", AGE, "--partial-min-age", AGE]
}

/// A `key: value` of `images/NAME` with the status tree's `\xNN` escapes undone.
fn shown(text: &str, key: &str) -> String {
    let v = field(text, key).unwrap_or_else(|| panic!("no `{key}:` in\n{text}"));
    let mut out = String::new();
    let mut rest = v.as_str();
    while let Some(i) = rest.find("\\x") {
        out.push_str(&rest[..i]);
        match u8::from_str_radix(rest.get(i + 2..i + 4).unwrap_or("zz"), 16) {
            Ok(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            Err(_) => {
                out.push_str("\\x");
                rest = &rest[i + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The value of the metric line starting with `name ` (0 when there is none).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
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
    let end = Instant::now() + Duration::from_secs(4 * threshold + 1);
    while Instant::now() < end {
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
    let storage = shown(&text, "storage");
    assert!(
        storage.contains("fuse.glusterfs") && storage.contains("nothing is evicted"),
        "images/NAME does not say the storage is shared and why nothing goes:\n{text}"
    );

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

/// GlusterFS's own inode numbers (the clients' default, without `--enable-ino32`) are the
/// low 64 bits of each file's GFID, a version-4 UUID whose variant bits are the top two bits
/// of the number: every file has the top bit set, which imagecachefs keeps for its status
/// tree. Every file must be served all the same.
#[test]
fn files_with_any_glusterfs_inode_number_are_served() {
    let c = Cluster::new(Options::default());
    let m = c.a.mount(&[]);
    let mut failed = Vec::new();
    for i in 0..4u64 {
        let name = format!("{:040x}", 0x1de0_0000 + i);
        let data = pseudo_random(4096, i);
        let res = fs::write(c.a.at(&name), &data).and_then(|_| fs::read(c.a.at(&name)));
        match res {
            Ok(got) => assert!(got == data, "{name} read back other bytes"),
            Err(e) => {
                let ino = fs::metadata(c.b.raw.join("_base").join(&name)).map(|m| m.ino());
                failed.push(format!("{name} (GlusterFS inode {ino:x?}): {e}"));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "files not served over GlusterFS:\n{}\ndaemon log:\n{}",
        failed.join("\n"),
        m.log_text()
    );
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// Coordination (`--shared`)
//
// Node a keeps originals for an hour (it never evicts them by age), node b only `AGE`: what b
// does with a file a uses is the protocol's doing. Node a's short `--resized-min-age` only sets
// how often it re-reads its instance disks.

/// Node a's flags: a long threshold for originals, a short re-read of its instance disks.
fn keeper(quarantine: u64) -> Vec<String> {
    let mut v: Vec<String> =
        ["--original-min-age", "3600", "--resized-min-age", AGE].map(String::from).to_vec();
    v.extend(["--partial-min-age", AGE].map(String::from));
    shared(v, quarantine)
}

/// Node b's flags: every kind overdue after `AGE`.
fn evictor(quarantine: u64) -> Vec<String> {
    shared(ages().into_iter().map(String::from).collect(), quarantine)
}

fn shared(mut v: Vec<String>, quarantine: u64) -> Vec<String> {
    v.extend(["--shared".to_string(), "--shared-quarantine".into(), quarantine.to_string()]);
    v
}

fn mount(n: &gluster::Node, args: &[String]) -> Mount {
    n.mount(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Looks `name` up through `n`'s mount, so that its daemon knows the file (another node
/// made it); true when it exists there.
fn see(n: &gluster::Node, name: &str) -> bool {
    fs::metadata(n.at(name)).is_ok()
}

/// Waits until node b's GlusterFS client reports a lock on `name`'s lock file (node a's
/// shared lock).
fn wait_locked(c: &Cluster, name: &str) {
    wait_until(Duration::from_secs(15), &format!("a lock on {name}'s lock file"), || {
        c.b.lock_held(name).filter(|&h| h).map(drop)
    });
}

/// Checks, over `how_long`, that `name` stays on the brick; `why` names what keeps it.
fn stays(c: &Cluster, name: &str, how_long: Duration, why: &str, logs: &[&Mount]) {
    let end = Instant::now() + how_long;
    while Instant::now() < end {
        if c.gone(name) {
            let logs: Vec<String> = logs.iter().map(|m| m.log_text()).collect();
            panic!("{name} was evicted although {why}\ndaemon logs:\n{}", logs.join("\n---\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to `timeout` until `name` is gone from the brick; returns when.
fn wait_gone(c: &Cluster, name: &str, timeout: Duration, logs: &[&Mount]) -> Instant {
    let deadline = Instant::now() + timeout;
    while !c.gone(name) {
        if Instant::now() > deadline {
            let logs: Vec<String> = logs.iter().map(|m| m.log_text()).collect();
            panic!(
                "{name} was not evicted within {timeout:?}\ndaemon logs:\n{}",
                logs.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Instant::now()
}

/// Waits until `n`'s mount says `ENOENT` for `name` (another node deleted it); returns how
/// long that took.
fn wait_unseen(n: &gluster::Node, name: &str) -> Duration {
    let start = Instant::now();
    wait_until(Duration::from_secs(15), &format!("node {} to see {name} gone", n.name), || {
        (errno(fs::metadata(n.at(name))) == Some(libc::ENOENT)).then_some(())
    });
    start.elapsed()
}

/// A QEMU-like holder on node a keeps a file from node b well past b's threshold and the
/// quarantine; once it stops, b evicts the file, not before the quarantine has passed, and
/// node a's mount soon says `ENOENT` (Nova on a must not believe the base still exists).
#[test]
fn a_holder_on_one_node_keeps_the_file_from_the_other_until_a_quarantine_after_it() {
    const Q: u64 = 3;
    let c = Cluster::new(Options::default());
    let ma = mount(&c.a, &keeper(Q));
    let mb = mount(&c.b, &evictor(Q));
    put(&c.a.at(H1), 1 << 20, 1);
    let mut holder = Proc::python(READER, &[&c.a.at(H1)]);
    holder.wait_line("ready");
    wait_locked(&c, H1);
    assert!(see(&c.b, H1), "node b does not see {H1} made by node a");

    let age: u64 = AGE.parse().unwrap();
    stays(&c, H1, Duration::from_secs(2 * (age + Q)), "node a holds it", &[&ma, &mb]);
    let text = c.b.status(H1).expect("node b's images/NAME");
    assert_eq!(field(&text, "refs").as_deref(), Some("0"), "node b counts a's holder:\n{text}");
    assert_eq!(field(&text, "other_node_holds").as_deref(), Some("yes"), "{text}");
    let storage = shown(&text, "storage");
    assert!(storage.contains("fuse.glusterfs") && storage.contains("coordinated"), "{text}");

    let refused = metric(
        &c.b.status_file("metrics"),
        "imagecachefs_shared_refusals_total{reason=\"other_host\"}",
    );
    assert!(refused > 0.0, "node b's metrics count no refusal because of another host");

    let stopped = Instant::now();
    holder.terminate();
    // Between the release and the eviction, node b shows when the quarantine ends.
    wait_until(Duration::from_secs(Q), "node b to show when the quarantine ends", || {
        let text = c.b.status(H1)?;
        let ends = field(&text, "quarantine_ends")?;
        (ends != "-" && ends != "unknown").then_some(())
    });
    let gone = wait_gone(&c, H1, Duration::from_secs(Q + 30), &[&ma, &mb]);
    let waited = gone - stopped;
    assert!(
        waited >= Duration::from_secs(Q),
        "node b evicted {H1} {waited:?} after node a's holder stopped: the quarantine is {Q} s"
    );
    assert!(
        event_lines(&c.b.status_file("events"), &format!("evicted {H1}")) > 0,
        "node b has no `evicted {H1}` event:\n{}",
        c.b.status_file("events")
    );
    let lag = wait_unseen(&c.a, H1);
    // Each node writes a state file of its own.
    for n in c.nodes() {
        let state = c.real(&format!(".imagecachefs.state.{}", n.machine_id()));
        wait_until(Duration::from_secs(10), &format!("{state:?}"), || {
            state.is_file().then_some(())
        });
    }
    eprintln!("measured: evicted {waited:?} after the holder stopped (quarantine {Q} s, age {age} s); node a saw ENOENT {lag:?} later");
    drop((ma, mb));
}

/// The last use is shared: node a reading the file pushes node b's deadline back, so b
/// evicts it one threshold after a's use, not one threshold after it was written.
#[test]
fn a_use_on_one_node_pushes_back_the_deadline_on_the_other() {
    const Q: u64 = 1;
    const T: u64 = 4;
    let c = Cluster::new(Options::default());
    let ma = mount(&c.a, &keeper(Q));
    let t = T.to_string();
    let flags = ["--original-min-age", &t, "--resized-min-age", AGE, "--partial-min-age", AGE];
    let mb = mount(&c.b, &shared(flags.map(String::from).to_vec(), Q));
    let data = put(&c.a.at(H1), 1 << 20, 5);
    let written = Instant::now();
    assert!(see(&c.b, H1), "node b does not see {H1} made by node a");
    std::thread::sleep(Duration::from_secs(T) - Duration::from_millis(1500));
    assert!(!c.gone(H1), "{H1} went {:?} after it was written", written.elapsed());
    assert!(fs::read(c.a.at(H1)).unwrap() == data, "node a read other bytes");
    let used = Instant::now();
    let gone = wait_gone(&c, H1, Duration::from_secs(T + Q + 30), &[&ma, &mb]);
    let waited = gone - used;
    // Last-use times are kept to the second.
    assert!(
        waited + Duration::from_secs(1) >= Duration::from_secs(T),
        "node b evicted {H1} {waited:?} after node a used it: its threshold is {T} s"
    );
    eprintln!(
        "measured: evicted {waited:?} after node a's last use (threshold {T} s, quarantine {Q} s)"
    );
    drop((ma, mb));
}

/// What one node's Nova does is soon seen on the other: a base downloaded and renamed into
/// place on node b appears on node a, which looked for it just before (a cached "no such
/// file" must not hide it for long), with b's bytes; deleted on b, it is gone on a.
#[test]
fn changes_made_on_one_node_are_seen_on_the_other() {
    let c = Cluster::new(Options::default());
    let ma = mount(&c.a, &keeper(3600));
    let mb = mount(&c.b, &keeper(3600));
    let within = Duration::from_secs(10);
    let appear = |name: &str| {
        let start = Instant::now();
        wait_until(within, &format!("node a to see {name}"), || see(&c.a, name).then_some(()));
        start.elapsed()
    };
    assert_eq!(errno(fs::metadata(c.a.at(H2))), Some(libc::ENOENT), "{H2} before it exists");
    let part = format!("{H2}.part");
    let data = put(&c.b.at(&part), 1 << 20, 6);
    fs::rename(c.b.at(&part), c.b.at(H2)).unwrap();
    let new = appear(H2);
    assert!(fs::read(c.a.at(H2)).unwrap() == data, "node a reads other bytes than b wrote");
    let part_gone = wait_unseen(&c.a, &part);
    fs::remove_file(c.b.at(H2)).unwrap();
    let deleted = wait_unseen(&c.a, H2);
    eprintln!(
        "measured: node a saw b's new base {new:?} after the rename, the .part gone \
         {part_gone:?} later, the deleted base gone {deleted:?} after the delete"
    );
    drop((ma, mb));
}

/// A stopped instance on node a (a qcow2 in a's own instances directory naming the base as
/// its backing file) keeps the base from node b, which cannot see that disk; once the
/// instance is deleted, b evicts it after the quarantine.
#[test]
fn a_stopped_instance_on_one_node_keeps_its_base_from_the_other() {
    const Q: u64 = 3;
    let c = Cluster::new(Options::default());
    let ma = mount(&c.a, &keeper(Q));
    let mb = mount(&c.b, &evictor(Q));
    put(&c.a.at(H2), 1 << 20, 2);
    let inst = c.a.instances.join(INSTANCE);
    overlay(&inst.join("disk"), &c.a.at(H2));
    wait_locked(&c, H2);
    assert!(see(&c.b, H2), "node b does not see {H2} made by node a");

    let age: u64 = AGE.parse().unwrap();
    stays(
        &c,
        H2,
        Duration::from_secs(2 * (age + Q)),
        "node a's instance disk names it",
        &[&ma, &mb],
    );
    let text = c.a.status(H2).expect("node a's images/NAME");
    assert_eq!(field(&text, "state").as_deref(), Some("referenced"), "{text}");

    fs::remove_dir_all(&inst).unwrap();
    let deleted = Instant::now();
    let gone = wait_gone(&c, H2, Duration::from_secs(Q + 30), &[&ma, &mb]);
    let waited = gone - deleted;
    assert!(
        waited >= Duration::from_secs(Q),
        "node b evicted {H2} {waited:?} after the instance was deleted on a: the quarantine is {Q} s"
    );
    eprintln!("measured: evicted {waited:?} after the instance was deleted (quarantine {Q} s)");
    drop((ma, mb));
}

/// Node a starts opening, reading and closing a file with four threads in a tight loop about
/// when node b's deadline for it comes (sometimes before, sometimes after: the rounds straddle
/// the eviction): every open either fails with `ENOENT` or reads the whole file as written,
/// with no error on the open descriptor (no `ESTALE`/`ENOENT`/`EIO` on a file deleted while
/// open), no file goes from the brick while a has it open, and once a's opens have begun
/// the file stays (each one is a use). A node b that does not coordinate fails this at once.
#[test]
fn opens_on_one_node_racing_evictions_on_the_other_never_see_a_deleted_or_torn_file() {
    const Q: u64 = 1;
    const ROUNDS: u64 = 10;
    const LEN: usize = 256 << 10;
    let c = Cluster::new(Options::default());
    let ma = mount(&c.a, &keeper(Q));
    let mb = mount(&c.b, &evictor(Q));
    let age: u64 = AGE.parse().unwrap();
    let mut seed = 0x5eed_u64;
    let (mut before, mut kept, mut opens) = (0, 0, 0);
    for round in 0..ROUNDS {
        let name = format!("{:040x}", 0xace0_0000 + round);
        let data = Arc::new(put(&c.a.at(&name), LEN, round));
        assert!(see(&c.b, &name), "node b does not see {name}");
        // Pause about as long as b's deadline is away, so that the opens below meet the
        // eviction: from half of it to one and a half of it.
        let due = (age + Q) * 1000;
        std::thread::sleep(Duration::from_millis(due / 2 + splitmix64(&mut seed) % due));
        let stop = Instant::now() + Duration::from_millis(1000);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (path, data, name) = (c.a.at(&name), data.clone(), name.clone());
                let real = c.real(&name);
                std::thread::spawn(move || -> Result<(u64, bool), String> {
                    let mut n = 0;
                    // Bounded in count and in time.
                    for _ in 0..100_000 {
                        if Instant::now() > stop {
                            return Ok((n, false));
                        }
                        let mut f = match fs::File::open(&path) {
                            Ok(f) => f,
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                                return Ok((n, true))
                            }
                            Err(e) => return Err(format!("open {name}: {e}")),
                        };
                        n += 1;
                        let mut got = Vec::with_capacity(LEN);
                        if let Err(e) = f.read_to_end(&mut got) {
                            return Err(format!("read of open {name}: {e} (deleted while open?)"));
                        }
                        if got.len() != data.len() || got != *data {
                            return Err(format!(
                                "torn read of {name}: {} bytes, content differs",
                                got.len()
                            ));
                        }
                        if !real.exists() {
                            return Err(format!("{name} left the brick while node a had it open"));
                        }
                        drop(f);
                    }
                    Ok((n, false))
                })
            })
            .collect();
        let (mut saw_gone, mut round_opens) = (false, 0);
        for t in threads {
            match t.join().unwrap() {
                Ok((n, gone)) => {
                    round_opens += n;
                    saw_gone |= gone;
                }
                Err(e) => panic!(
                    "round {round}: {e}\nnode b's log:\n{}\nnode a's log:\n{}",
                    mb.log_text(),
                    ma.log_text()
                ),
            }
        }
        opens += round_opens;
        if saw_gone {
            assert_eq!(round_opens, 0, "{name} was evicted while node a kept opening it");
            before += 1;
            assert!(c.gone(&name), "node a's mount says ENOENT for {name}, which is on the brick");
            for _ in 0..10 {
                assert_eq!(
                    errno(fs::File::open(c.a.at(&name))),
                    Some(libc::ENOENT),
                    "{name} came back"
                );
            }
        } else {
            kept += 1;
        }
    }
    eprintln!(
        "measured: {opens} opens on node a; of {ROUNDS} files, node b evicted {before} before \
         a's opens began and none after"
    );
    assert!(
        before > 0 && kept > 0,
        "the rounds did not straddle node b's eviction ({before} evicted, {kept} kept): the \
         race was not run"
    );
    drop((ma, mb));
}

/// Node a's daemon and its holder are killed: its shared lock goes with the daemon, and node
/// b evicts the file, but only once the quarantine has passed since then.
#[test]
fn a_killed_node_daemon_frees_the_file_only_after_the_quarantine() {
    const Q: u64 = 4;
    let c = Cluster::new(Options::default());
    let ma = mount(&c.a, &keeper(Q));
    let mb = mount(&c.b, &evictor(Q));
    put(&c.a.at(H3), 1 << 20, 3);
    let mut holder = Proc::python(READER, &[&c.a.at(H3)]);
    holder.wait_line("ready");
    wait_locked(&c, H3);
    assert!(see(&c.b, H3), "node b does not see {H3} made by node a");

    holder.kill();
    ma.kill9();
    let killed = Instant::now();
    let gone = wait_gone(&c, H3, Duration::from_secs(Q + 30), &[&mb]);
    let waited = gone - killed;
    assert!(
        waited >= Duration::from_secs(Q),
        "node b evicted {H3} {waited:?} after node a's daemon was killed: the quarantine is {Q} s"
    );
    eprintln!("measured: evicted {waited:?} after node a's daemon was killed (quarantine {Q} s)");
    drop(mb);
}

/// Node a's client is cut off (its veth down) while a holder on a reads the file: the brick
/// drops a's lock after the ping timeout, and node b must not delete the file within the
/// quarantine of the cut. What happens next is what the quarantine cannot prevent: b evicts,
/// and once the cut heals, a's holder finds its file gone. The test records it.
#[test]
fn a_partitioned_node_keeps_its_file_for_the_quarantine() {
    const Q: u64 = 10;
    let opts = Options::default();
    let timeout = opts.timeout_secs;
    let c = Cluster::new(opts);
    let ma = mount(&c.a, &keeper(Q));
    let mb = mount(&c.b, &evictor(Q));
    put(&c.a.at(H4), 1 << 20, 4);
    // Reads one block every 200 ms past the page cache, saying how each went (at most 600
    // reads).
    let script = "import os,sys,time\nfd=os.open(sys.argv[1],os.O_RDONLY)\nprint('ready',flush=True)\nfor i in range(600):\n    try:\n        os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED); os.pread(fd,4096,(i%256)*4096); print('ok',flush=True)\n    except OSError as e:\n        print('err',e.errno,flush=True)\n    time.sleep(0.2)";
    let log = c.a.logs.join("holder.log");
    let holder =
        Proc::spawn_logged(tool("python3").arg("-c").arg(script).arg(c.a.at(H4)), log.clone());
    wait_until(Duration::from_secs(15), "the holder to open the file", || {
        fs::read_to_string(&log).ok()?.contains("ready").then_some(())
    });
    wait_locked(&c, H4);
    assert!(see(&c.b, H4), "node b does not see {H4} made by node a");

    c.partition(&c.a);
    let cut = Instant::now();
    stays(
        &c,
        H4,
        Duration::from_secs(Q),
        "node a was cut off less than the quarantine ago",
        &[&ma, &mb],
    );
    // The brick drops a's lock after its timeout; b evicts a quarantine after it sees that.
    let limit = Duration::from_secs(3 * u64::from(timeout) + Q + 30);
    let gone = wait_gone(&c, H4, limit, &[&ma, &mb]);
    let evicted_after = gone - cut;
    let before: Vec<String> =
        fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_string).collect();
    let reads_before_heal = before.len();
    let errors_cut = before.iter().filter(|l| l.starts_with("err")).count();
    c.heal(&c.a);
    let healed = Instant::now();
    // What a's holder sees once the cut heals: its file is gone on the brick.
    std::thread::sleep(Duration::from_secs(u64::from(timeout)));
    let after: Vec<String> = fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .skip(reads_before_heal)
        .map(str::to_string)
        .collect();
    let errors = after.iter().filter(|l| l.starts_with("err")).count();
    eprintln!(
        "measured: cut at 0 s, ping timeout {timeout} s, quarantine {Q} s: evicted by node b \
         after {evicted_after:?}; node a's holder: {errors_cut} of {} reads failed while cut \
         off; in the {:?} after healing, {} reads, {errors} failed ({:?})",
        reads_before_heal - 1,
        healed.elapsed(),
        after.len(),
        after.iter().find(|l| l.starts_with("err"))
    );
    eprintln!("node a's events after healing:\n{}", c.a.status_file("events"));
    assert!(ma.running(), "node a's daemon died in the partition:\n{}", ma.log_text());
    // Node a's daemon checks its locks: the cut must not go unnoticed there.
    let log = ma.log_text();
    let noticed = log.lines().any(|l| l.contains(" ERROR ") && l.contains(H4));
    assert!(noticed, "node a's daemon logged no error about {H4} while cut off:\n{log}");
    let said: Vec<&str> = log.lines().filter(|l| l.contains("imagecachefs::shared]")).collect();
    eprintln!("node a's daemon:\n{}", said.join("\n"));
    drop(holder);
    drop((ma, mb));
}

/// SIGCONTs a process when dropped (a stopped GlusterFS client must not outlive a failed
/// test: the teardown would hang on it).
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// Reads `path` on a thread of its own; `None` if no answer came within `limit` (the thread
/// is left behind, blocked).
fn read_within(path: std::path::PathBuf, limit: Duration) -> Option<std::io::Result<String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(fs::read_to_string(path));
    });
    rx.recv_timeout(limit).ok()
}

/// Node b's GlusterFS client is stopped (SIGSTOP) around the moment b's evictor takes the
/// file's cluster lock: b's lock calls hang, but its status files keep answering (no FUSE
/// worker waits for a lock call, nor for the state lock held across one).
#[test]
fn a_stalled_client_on_the_evicting_node_hangs_no_status_read() {
    const Q: u64 = 3;
    let c = Cluster::new(Options::default());
    let ma = mount(&c.a, &keeper(Q));
    let mb = mount(&c.b, &evictor(Q));
    put(&c.a.at(H1), 1 << 20, 1);
    assert!(see(&c.b, H1), "node b does not see {H1} made by node a");
    // Due on b once its quarantine (counted from b's first look) ends: stop b's client then.
    std::thread::sleep(Duration::from_secs(Q));
    // Status files are reached through a directory fd opened before: a path walk from the
    // GlusterFS mount would itself wait for the stopped client.
    let dir = fs::File::open(c.b.base.join(".imagecache")).unwrap();
    let status = |file: &str| {
        std::path::PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(file)
    };
    let pid = c.b.client_pid().expect("node b's client runs");
    let resume = Resume(pid);
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    let limit = Duration::from_secs(2);
    let mut reads = 0;
    // Past GATE_TIMEOUT (5 s) and a few of b's eviction rounds (40 reads at most).
    while stopped.elapsed() < Duration::from_secs(8) && reads < 40 {
        for file in ["events", &format!("images/{H1}")] {
            match read_within(status(file), limit) {
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("reading node b's {file}: {e}"),
                None => panic!(
                    "node b's {file} did not answer within {limit:?}, {:?} after its client \
                     was stopped\n{}",
                    stopped.elapsed(),
                    mb.log_text()
                ),
            }
        }
        reads += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(resume);
    // Back: b goes on (it may evict the file now; nothing holds it on a).
    wait_until(Duration::from_secs(30), "node b's status after its client resumed", || {
        read_within(status("metrics"), limit).and_then(|r| r.ok())
    });
    drop(mb);
    drop(ma);
}

/// Node b's GlusterFS client stopped: `metrics` through b's mount must answer too (a
/// monitoring scrape must not take a FUSE worker for as long as the storage hangs: two
/// scrapes would take them all). It used to `statvfs` the storage on the FUSE worker.
#[test]
fn metrics_answer_while_the_client_is_stalled() {
    let c = Cluster::new(Options::default());
    let mb = mount(&c.b, &evictor(3));
    let dir = fs::File::open(c.b.base.join(".imagecache")).unwrap();
    let metrics = std::path::PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    let metrics = metrics.join("metrics");
    let text = read_within(metrics.clone(), Duration::from_secs(5)).unwrap().unwrap();
    assert!(text.contains("imagecachefs_"), "{text}");
    let pid = c.b.client_pid().expect("node b's client runs");
    let resume = Resume(pid);
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    let limit = Duration::from_secs(2);
    for round in 0..3 {
        match read_within(metrics.clone(), limit) {
            Some(Ok(t)) => assert!(t.contains("imagecachefs_"), "{t}"),
            Some(Err(e)) => panic!("reading node b's metrics: {e}"),
            None => panic!(
                "node b's metrics did not answer within {limit:?} (read {round}) while its \
                 client was stopped\n{}",
                mb.log_text()
            ),
        }
    }
    drop(resume);
    drop(mb);
}
