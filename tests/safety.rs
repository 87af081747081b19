//! The paths where imagecachefs could delete a needed image or hang its mount, each walked on
//! a real mount: a detached daemon that lingers, Nova's lock taken after the facts it guards,
//! files opened before they became cache files, descriptors inherited after the mount,
//! shared storage, control commands against a busy root, a holder in another mount namespace,
//! a stalled filesystem elsewhere on the host, a symlinked cache directory, hard links, and a
//! name that appears behind the mount while a file is being created.
//!
//! Layout as in `eviction.rs` (`tests/nova`): `<tmp>/instances/_base` is mounted, its parent is
//! the instances directory, `<tmp>/covered` shows the real files. Every wait has a deadline,
//! every loop a bound, every background process is owned by a guard that ends it.

mod common;
mod nova;

use std::fs::{self, File};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bin, run, run_ok, run_timeout, tool, wait_until, Mount, Proc, Scratch, READER};
use nova::*;

/// Sends `sig` to a pid (and SIGKILL on drop, for processes that are not our children).
struct Pid(i32);

impl Drop for Pid {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// SIGCONT on drop, so that a stopped daemon can be stopped for good.
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

fn evict_cmd(dir: &Path, name: &str) -> Command {
    let mut c = Command::new(bin());
    c.args(["evict"]).arg(dir).arg(name);
    c
}

// ---------------------------------------------------------------------------------------------
// 1. A detached daemon decides nothing

/// Daemon 1 lingers after `unmount` because a process still reads a file through it; daemon 2
/// mounts over the same directory and a process holds B through it. Daemon 1 must not evict B
/// (its view is stale), and daemon 2 counts the reader of A as a holder through the earlier
/// overlay, never daemon 1's own descriptors.
#[test]
fn a_detached_daemon_evicts_nothing_and_writes_no_state() {
    const A: &str = H1;
    const B: &str = H2;
    let n = Nova::new();
    write_file(&n.at(A), &pseudo_random(64 << 10, 1));
    write_file(&n.at(B), &pseudo_random(64 << 10, 2));
    let m1 = n.mount(("1", "1", "1"), &[]);
    let mut hold_a = Proc::python(READER, &[&n.at(A)]);
    hold_a.wait_line("ready");
    fs::read(n.at(B)).unwrap();
    let (code, _, err) = run(Command::new(bin()).arg("unmount").arg(&n.dir));
    assert_eq!(code, 0, "unmount: {err}");
    wait_until(Duration::from_secs(5), "daemon 1 to see that its mount is gone", || {
        m1.log_text().contains("only serves its open files").then_some(())
    });
    assert!(m1.running(), "daemon 1 should linger while A is open through it");

    // Daemon 2 evicts nothing by age, so that every state write below would be daemon 1's.
    let m2 = n.mount(("1", "1", "1"), &["--no-evict"]);
    let mut hold_b = Proc::python(READER, &[&n.at(B)]);
    hold_b.wait_line("ready");
    // Daemon 1's threshold passes several times over while it still runs.
    n.stays(&m2, B, Duration::from_secs(4), "daemon 2 shows it in use");
    assert!(m1.running(), "daemon 1 exited although A is still open through it");
    let log1 = m1.log_text();
    assert!(!log1.contains("evicted"), "the detached daemon evicted something:\n{log1}");
    assert_eq!(n.field(B, "state"), "in-use");
    // A is read through daemon 1's (detached) overlay: daemon 2 sees that reader, and only it.
    let holders = n.field(A, "holders");
    assert!(holders.contains(&hold_a.pid().to_string()), "A's holders: {holders:?}");
    assert!(
        !holders.contains(&m1.server_pid().to_string()),
        "daemon 1 counted as holder: {holders:?}"
    );
    assert!(
        !holders.contains(&m1.pid().to_string()),
        "supervisor 1 counted as holder: {holders:?}"
    );

    // Daemon 2 has written its state (a status read persists it). Now A's reader closes its
    // file through daemon 1, which then exits: neither may touch the state file.
    let state = n.real(".imagecachefs.state");
    let stamp = |p: &Path| {
        let m = fs::metadata(p).expect("daemon 2 wrote its state file");
        (std::os::unix::fs::MetadataExt::ino(&m), m.modified().unwrap())
    };
    let before = stamp(&state);
    drop(hold_a);
    assert!(m1.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(stamp(&state), before, "the detached daemon wrote the state file");
    drop(hold_b);
    drop(m2);
}

// ---------------------------------------------------------------------------------------------
// 2. Nova's lock comes before the facts it guards

/// The daemon's open of Nova's lock file is slowed down (strace fault injection) while a
/// Nova-style spawn takes the lock, creates a qcow2 overlay on the base and releases it. The
/// eviction, which was asked for before the overlay existed, must see it and refuse.
#[test]
fn an_overlay_created_while_eviction_waits_for_the_lock_is_seen() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(1 << 20, 3));
    fs::create_dir_all(n.instances.join("inst-1")).unwrap();
    let m = n.mount((LONG, LONG, LONG), &[]);
    let lock = n.lock_file(H1);
    File::create(&lock).unwrap();
    let mut strace = Proc::spawn_logged(
        tool("strace")
            .args(["-f", "-qq", "-e", "trace=openat", "-e", "inject=openat:delay_enter=3000000"])
            .arg("-P")
            .arg(&lock)
            .args(["-p", &m.server_pid().to_string()]),
        n.s.path("strace.log"),
    );
    // strace is attached once it has printed nothing but the daemon is stopped/traced.
    wait_until(Duration::from_secs(10), "strace to attach", || {
        let status = fs::read_to_string(format!("/proc/{}/status", m.server_pid())).ok()?;
        status
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
            .then_some(())
    });
    let dir = n.dir.clone();
    let evict =
        std::thread::spawn(move || run_timeout(&mut evict_cmd(&dir, H1), Duration::from_secs(30)));
    // Give the eviction time to reach the lock file's open, then do what Nova does.
    std::thread::sleep(Duration::from_millis(700));
    let disk = n.instances.join("inst-1/disk");
    let script = "import fcntl,subprocess,sys\nf=open(sys.argv[1],'a')\nfcntl.lockf(f,fcntl.LOCK_EX)\nsubprocess.run(['qemu-img','create','-q','-u','-f','qcow2','-b',sys.argv[2],'-F','raw',sys.argv[3],'1M'],check=True)\nfcntl.lockf(f,fcntl.LOCK_UN)\n";
    run_ok(tool("python3").arg("-c").arg(script).arg(&lock).arg(n.at(H1)).arg(&disk));
    let (code, _, err) = evict.join().unwrap();
    strace.assert_alive();
    drop(strace);
    assert_ne!(code, 0, "evict succeeded although an overlay names the base");
    assert!(err.contains("backing file"), "refusal should name the overlay: {err}");
    n.stays(&m, H1, Duration::from_millis(200), "an instance disk names it");
}

// ---------------------------------------------------------------------------------------------
// 3. Every open of a regular file is a reference, wherever it lives

/// A file opened in a subdirectory and moved into the cache directory, a file hard-linked in
/// from a subdirectory (then unlinked there), and a regular file made with `mknod`: each is
/// held open past its threshold and must stay; once released, it goes.
#[test]
fn files_opened_before_they_became_cache_files_are_held() {
    let n = Nova::new();
    let m = n.mount(("1", "1", "1"), &[]);
    fs::create_dir(n.at("sub")).unwrap();
    write_file(&n.at("sub/moved"), b"moved in");
    let mut moved = Proc::python(READER, &[&n.at("sub/moved")]);
    moved.wait_line("ready");
    fs::rename(n.at("sub/moved"), n.at(H1)).unwrap();

    write_file(&n.at("sub/linked"), b"linked in");
    let mut linked = Proc::python(READER, &[&n.at("sub/linked")]);
    linked.wait_line("ready");
    fs::hard_link(n.at("sub/linked"), n.at(H2)).unwrap();
    fs::remove_file(n.at("sub/linked")).unwrap();

    let mknod = "import os,stat,sys\nos.mknod(sys.argv[1], 0o644 | stat.S_IFREG)\nf=open(sys.argv[1],'rb')\nprint('ready',flush=True)\nimport time\ntime.sleep(120)";
    let mut made = Proc::python(mknod, &[&n.at(H3)]);
    made.wait_line("ready");

    for name in [H1, H2, H3] {
        n.stays(&m, name, Duration::from_millis(1500), "a process holds it open");
    }
    for name in [H1, H2, H3] {
        assert_eq!(n.field(name, "refs"), "1", "{name}");
    }
    drop((moved, linked, made));
    for name in [H1, H2, H3] {
        n.wait_evicted(name, Duration::from_secs(10));
    }
}

// ---------------------------------------------------------------------------------------------
// 4. A descriptor inherited after the mount

/// A process opened the base before the mount; after the mount it forks a child that inherits
/// the descriptor and exits itself. The child alone keeps the base; when it is gone, the base
/// goes.
#[test]
fn a_child_that_inherited_a_descriptor_keeps_the_base() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(64 << 10, 4));
    let trigger = n.s.path("fork-now");
    let pidfile = n.s.path("child.pid");
    let script = r#"exec 3<"$1"; while [ ! -e "$2" ]; do sleep 0.05 3<&-; done; sleep 300 & echo $! > "$3"; exit 0"#;
    let parent = Proc::spawn(
        tool("sh").args(["-c", script, "sh"]).arg(n.at(H1)).arg(&trigger).arg(&pidfile),
    );
    wait_until(Duration::from_secs(5), "the parent to open the base", || {
        parent.has_open(&n.at(H1)).then_some(())
    });
    let m = n.mount(("1", "1", "1"), &[]);
    assert_eq!(n.field(H1, "refs"), "1");
    File::create(&trigger).unwrap();
    let child = wait_until(Duration::from_secs(5), "the child's pid", || {
        fs::read_to_string(&pidfile).ok()?.trim().parse::<i32>().ok()
    });
    let _child = Pid(child);
    wait_until(Duration::from_secs(5), "the parent to exit", || {
        (!std::path::Path::new(&format!("/proc/{}/fd/3", parent.pid())).exists()).then_some(())
    });
    n.stays(&m, H1, Duration::from_secs(4), "a child holds the descriptor its parent opened");
    let holders = n.field(H1, "holders");
    assert!(holders.contains(&child.to_string()), "the child is the holder: {holders:?}");
    drop(_child);
    n.wait_evicted(H1, Duration::from_secs(15));
}

// ---------------------------------------------------------------------------------------------
// 6. Shared storage evicts nothing unless told otherwise

/// A cache directory on a FUSE filesystem (another imagecachefs stands in for a cluster
/// client) is shared storage: nothing is evicted, not even by an operator, and the status
/// says why; `--storage local` restores eviction.
#[test]
fn a_cache_on_shared_storage_evicts_nothing() {
    let s = Scratch::new();
    let outer = Mount::new(&s.base, &["--no-evict"]);
    let instances = s.base.join("instances");
    let dir = instances.join("_base");
    fs::create_dir_all(&dir).unwrap();
    write_file(&dir.join(H1), b"on a cluster filesystem");
    {
        let m = Mount::new(&dir, &["--resized-min-age", "1", "--original-min-age", "1"]);
        // `dir` was on FUSE already (the outer mount): wait for the inner one.
        wait_until(Duration::from_secs(20), "the inner mount", || {
            dir.join(".imagecache/config").exists().then_some(())
        });
        let config = fs::read_to_string(dir.join(".imagecache/config")).unwrap();
        assert!(config.contains("storage: shared\n"), "{config}");
        assert!(config.contains("filesystem: fuse.imagecachefs\n"), "{config}");
        assert!(m.log_text().contains("shared storage"), "{}", m.log_text());
        let text = fs::read_to_string(dir.join(".imagecache/images").join(H1)).unwrap();
        assert_eq!(field(&text, "evicts_at").as_deref(), Some("never"), "{text}");
        std::thread::sleep(Duration::from_secs(3));
        assert!(dir.join(H1).exists(), "evicted on shared storage:\n{}", m.log_text());
        let (code, _, err) = run(&mut evict_cmd(&dir, H1));
        assert_ne!(code, 0);
        assert!(err.contains("shared storage"), "{err}");
        assert!(dir.join(H1).exists());
    }
    {
        let _m = Mount::new(
            &dir,
            &["--resized-min-age", "1", "--original-min-age", "1", "--storage", "local"],
        );
        wait_until(Duration::from_secs(10), "eviction with --storage local", || {
            (!dir.join(H1).exists()).then_some(())
        });
    }
    drop(outer);
}

// ---------------------------------------------------------------------------------------------
// 7. Control commands never wait on a thread that waits on the kernel

/// With one FUSE worker, `imagecachefs evict` of two files while other processes `stat` names
/// in the root as fast as they can: both commands finish, the files go, and the stats go on.
#[test]
fn evict_commands_with_busy_lookups_in_the_root_do_not_hang() {
    for threads in ["1", "2"] {
        let n = Nova::new();
        let names = [H1, H2, H3, H4];
        for (i, name) in names.iter().enumerate() {
            write_file(&n.at(name), &pseudo_random(4096, i as u64));
        }
        let m = n.mount((LONG, LONG, LONG), &["--threads", threads]);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..3)
            .map(|i| {
                let (stop, stats, dir) = (stop.clone(), stats.clone(), n.dir.clone());
                std::thread::spawn(move || {
                    let end = Instant::now() + Duration::from_secs(20);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        let _ = fs::metadata(dir.join(names[i % 4]));
                        let _ = fs::metadata(dir.join(format!("missing-{i}")));
                        stats.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for name in [H1, H2] {
            let (code, _, err) = run_timeout(&mut evict_cmd(&n.dir, name), Duration::from_secs(20));
            assert_eq!(code, 0, "evict {name} with {threads} thread(s): {err}\n{}", m.log_text());
        }
        let before = stats.load(Ordering::Relaxed);
        wait_until(Duration::from_secs(5), "lookups to go on after the evictions", || {
            (stats.load(Ordering::Relaxed) > before + 10).then_some(())
        });
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        for name in [H1, H2] {
            n.assert_fully_evicted(name);
        }
        assert!(n.at(H3).is_file() && n.at(H4).is_file());
    }
}

// ---------------------------------------------------------------------------------------------
// 8. A holder in another mount namespace

/// libvirt runs each qemu in a mount namespace of its own: a file opened through this mount
/// there has another mount id. A process that held a file from before the mount (so that
/// status reads re-check it in /proc) moves into a mount namespace of its own and opens
/// another file through the mount there. With one worker thread, status reads and opens in a
/// loop must all be answered, and both files are counted.
#[test]
fn a_holder_in_another_mount_namespace_does_not_hang_status_reads() {
    const SCRIPT: &str = "import ctypes,os,sys,time
f1=open(sys.argv[1],'rb')
print('ready',flush=True)
while not os.path.exists(sys.argv[3]): time.sleep(0.05)
libc=ctypes.CDLL(None,use_errno=True)
if libc.unshare(0x00020000)!=0: raise OSError(ctypes.get_errno(),'unshare')
f2=open(sys.argv[2],'rb')
print('ready2',flush=True)
time.sleep(120)";
    for threads in ["1", "2"] {
        let n = Nova::new();
        write_file(&n.at(H1), &pseudo_random(64 << 10, 5));
        write_file(&n.at(H2), &pseudo_random(64 << 10, 6));
        write_file(&n.at(H3), &pseudo_random(64 << 10, 7));
        let trigger = n.s.path("trigger");
        let mut holder = Proc::python(SCRIPT, &[&n.at(H2), &n.at(H1), &trigger]);
        holder.wait_line("ready");
        let m = n.mount((LONG, LONG, LONG), &["--threads", threads]);
        File::create(&trigger).unwrap();
        holder.wait_line("ready2");
        wait_until(Duration::from_secs(5), "both files to be counted", || {
            (n.field(H1, "refs") == "1" && n.field(H2, "refs") == "1").then_some(())
        });
        let dir = n.dir.clone();
        let looper = std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(8);
            let mut rounds = 0;
            while Instant::now() < end && rounds < 2_000 {
                for f in ["status", "status.json", "metrics"] {
                    fs::read(dir.join(".imagecache").join(f)).unwrap();
                }
                fs::read(dir.join(".imagecache/images").join(H1)).unwrap();
                drop(File::open(dir.join(H3)).unwrap());
                rounds += 1;
            }
            rounds
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !looper.is_finished() {
            assert!(
                Instant::now() < deadline,
                "status reads hung with a holder in another mount namespace ({threads} threads)\n{}",
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(looper.join().unwrap() > 0);
        holder.assert_alive();
        assert_eq!(n.field(H2, "refs"), "1");
        drop(holder);
        drop(m);
    }
}

// ---------------------------------------------------------------------------------------------
// 9. A stalled filesystem elsewhere on the host

/// A process has a file open on a FUSE filesystem whose daemon is stopped (as a qemu with a
/// volume on a dead NFS server would). Mounting, reading status files and evicting must not
/// touch it.
#[test]
fn a_stalled_filesystem_elsewhere_does_not_block_mount_status_or_eviction() {
    let stalled = Scratch::new();
    write_file(&stalled.base.join("volume"), b"a volume on a stalled server");
    let other = Mount::new(&stalled.base, &["--no-evict"]);
    let mut reader = Proc::python(READER, &[&stalled.base.join("volume")]);
    reader.wait_line("ready");
    // Stalled: the server, and its supervisor (which would replace a silent server).
    let server = other.server_pid();
    unsafe { libc::kill(other.pid() as i32, libc::SIGSTOP) };
    unsafe { libc::kill(server as i32, libc::SIGSTOP) };
    let _cont = (Continue(server), Continue(other.pid()));

    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(4096, 7));
    let mounted = Instant::now();
    let m = n.mount(("1", "1", "1"), &[]);
    assert!(mounted.elapsed() < Duration::from_secs(10));
    let dir = n.dir.clone();
    let status = std::thread::spawn(move || fs::read_to_string(dir.join(".imagecache/status")));
    wait_until(Duration::from_secs(10), "a status read", || status.is_finished().then_some(()));
    assert!(status.join().unwrap().is_ok());
    n.wait_evicted(H1, Duration::from_secs(10));
    drop(m);
    drop(_cont);
    drop(reader);
    drop(other);
}

// ---------------------------------------------------------------------------------------------
// Smaller holes

/// A cache directory given as a symlink: `SIGTERM` detaches the mount (the daemon knows
/// where it really mounted).
#[test]
fn a_symlinked_cache_directory_detaches_on_sigterm() {
    let s = Scratch::new();
    let link = s.path("link-to-base");
    std::os::unix::fs::symlink(&s.base, &link).unwrap();
    let m = Mount::new(&link, &[]);
    assert!(common::is_fuse(&s.base));
    m.signal_term();
    wait_until(Duration::from_secs(10), "the mount to be detached", || {
        (!common::is_fuse(&s.base)).then_some(())
    });
    assert!(m.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
}

/// A hard-linked cache file is not evicted by age nor by an operator (removing one name frees
/// nothing and the other name must keep working).
#[test]
fn hard_linked_cache_files_are_not_evicted() {
    let n = Nova::new();
    write_file(&n.at(H1), b"two names");
    let m = n.mount(("1", "1", "1"), &[]);
    fs::hard_link(n.at(H1), n.at(H2)).unwrap();
    // Both names cached in the kernel.
    assert!(fs::metadata(n.at(H1)).is_ok() && fs::metadata(n.at(H2)).is_ok());
    n.stays(&m, H2, Duration::from_secs(3), "it has two names");
    let (code, _, err) = run(&mut evict_cmd(&n.dir, H2));
    assert_ne!(code, 0, "evict of a hard-linked file succeeded");
    assert!(err.contains("hard link"), "{err}");
    assert_eq!(fs::read(n.at(H1)).unwrap(), b"two names");
    assert_eq!(fs::read(n.at(H2)).unwrap(), b"two names");
    // With one name left it goes.
    fs::remove_file(n.at(H1)).unwrap();
    n.wait_evicted(H2, Duration::from_secs(10));
}

/// An instance directory on a filesystem that hangs (a stopped FUSE daemon stands in for a
/// dead NFS server): status reads by any user are answered with the names read before, every
/// other operation on the cache goes on, and an eviction is refused in bounded time.
#[test]
fn an_instance_directory_on_a_hung_filesystem_blocks_no_worker() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(4096, 8));
    let inst = n.instances.join("inst-a");
    fs::create_dir_all(&inst).unwrap();
    let stalled = Mount::new(&inst, &["--no-evict"]);
    let m = n.mount((LONG, LONG, LONG), &["--threads", "1"]);
    // A hung filesystem: its supervisor stopped too, or it would replace the silent server.
    let server = stalled.server_pid();
    unsafe { libc::kill(stalled.pid() as i32, libc::SIGSTOP) };
    unsafe { libc::kill(server as i32, libc::SIGSTOP) };
    let _cont = (Continue(server), Continue(stalled.pid()));
    for _ in 0..3 {
        let (code, out, err) = run_timeout(
            tool("setpriv")
                .env("PATH", "/usr/bin:/bin")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
                .arg(n.dir.join(".imagecache/images").join(H1)),
            Duration::from_secs(10),
        );
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("state: idle"), "{out}");
    }
    let dir = n.dir.clone();
    let io = std::thread::spawn(move || {
        fs::read(dir.join(H1)).map(|b| b.len()).and_then(|_| fs::metadata(dir.join(H1)))
    });
    wait_until(Duration::from_secs(10), "a read of the base", || io.is_finished().then_some(()));
    assert!(io.join().unwrap().is_ok());
    let started = Instant::now();
    let (code, _, err) = run_timeout(&mut evict_cmd(&n.dir, H1), Duration::from_secs(30));
    assert_ne!(code, 0, "evicted although the instance disks could not be read");
    assert!(err.contains("instance disks unreadable"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    assert!(n.real(H1).is_file());
    drop(_cont);
    drop(m);
    drop(stalled);
}

/// `imagecachefs unmount` lets the daemon write its state a last time: a use just before it
/// is what the next daemon shows.
#[test]
fn unmount_keeps_the_last_use() {
    let n = Nova::new();
    write_file(&n.at(H1), b"used just before the unmount");
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    File::options().write(true).open(n.at(H1)).unwrap().set_modified(old).unwrap();
    let m = n.mount((LONG, LONG, LONG), &["--no-evict"]);
    assert!(n.field(H1, "last_used").starts_with("2020-"), "{}", n.field(H1, "last_used"));
    fs::read(n.at(H1)).unwrap();
    let (code, _, err) = run(Command::new(bin()).arg("unmount").arg(&n.dir));
    assert_eq!(code, 0, "unmount: {err}");
    assert!(m.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
    let _m = n.mount((LONG, LONG, LONG), &["--no-evict"]);
    let shown = n.field(H1, "last_used");
    assert!(!shown.starts_with("2020-"), "the last use before the unmount was lost: {shown}");
}

/// `_base` a symlink to a directory elsewhere: the cache keeps the name Nova and the instance
/// disks use (the instances directory stays the link's parent), so a stopped instance's
/// overlay naming `instances/_base/X` still protects X.
#[test]
fn a_symlinked_cache_directory_keeps_its_instances_directory_and_backing_names() {
    let s = Scratch::new();
    let instances = s.path("instances");
    fs::create_dir_all(instances.join("inst-1")).unwrap();
    let link = instances.join("_base");
    std::os::unix::fs::symlink(&s.base, &link).unwrap();
    write_file(&link.join(H1), &pseudo_random(1 << 20, 9));
    common::overlay(&instances.join("inst-1/disk"), &link.join(H1));
    let m = Mount::new(&link, &["--original-min-age", "1"]);
    let config = fs::read_to_string(link.join(".imagecache/config")).unwrap();
    let want = format!("instances_dir: {}\n", instances.display());
    assert!(config.contains(&want), "{config}");
    let status = fs::read_to_string(link.join(".imagecache/images").join(H1)).unwrap();
    assert_eq!(field(&status, "state").as_deref(), Some("referenced"), "{status}");
    let (code, _, err) = run(&mut evict_cmd(&link, H1));
    assert_ne!(code, 0, "evicted a stopped instance's base");
    assert!(err.contains("backing file"), "{err}");
    assert!(s.base.join(H1).is_file(), "{}", m.log_text());
    drop(m);
}

/// A process that reads the base through an overlayfs whose lower layer is the covered
/// directory (a container image layered on the host's cache) holds it: the overlay shows the
/// covered inode number under the same name.
#[test]
fn a_holder_through_overlayfs_keeps_the_base() {
    let n = Nova::new();
    write_file(&n.at(H1), &pseudo_random(64 << 10, 10));
    let m = n.mount((LONG, LONG, LONG), &[]);
    let (upper, work, merged) = (n.s.path("upper"), n.s.path("work"), n.s.path("merged"));
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        n.covered.target.display(),
        upper.display(),
        work.display()
    );
    run_ok(tool("mount").args(["-t", "overlay", "overlay", "-o", &opts]).arg(&merged));
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            common::detach(&self.0);
        }
    }
    let _ovl = Umount(merged.clone());
    let mut holder = Proc::python(READER, &[&merged.join(H1)]);
    holder.wait_line("ready");
    let (code, _, err) = run(&mut evict_cmd(&n.dir, H1));
    assert_ne!(code, 0, "evicted while read through overlayfs");
    assert!(err.contains("held open"), "{err}");
    assert!(n.real(H1).is_file(), "{}", m.log_text());
    drop(holder);
    let (code, _, err) = run(&mut evict_cmd(&n.dir, H1));
    assert_eq!(code, 0, "{err}");
}

/// Two `imagecachefs unmount` at once, with `_base` a mount of its own (a bind mount, as a
/// separate filesystem for the cache would be): the overlay goes, the mount under it stays.
#[test]
fn two_unmounts_at_once_detach_only_the_overlay() {
    for _ in 0..8 {
        let s = Scratch::new();
        let bind = common::BindMount::new(&s.base, &s.base);
        let m = Mount::new(&s.base, &[]);
        let unmount = || {
            let dir = s.base.clone();
            std::thread::spawn(move || run(Command::new(bin()).arg("unmount").arg(&dir)))
        };
        let (a, b) = (unmount(), unmount());
        let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
        assert!(m.wait_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
        let left = common::mounts_at(&s.base);
        assert_eq!(left.len(), 1, "mounts left at the directory: {left:?}\n{ra:?}\n{rb:?}");
        assert_ne!(left[0], "fuse.imagecachefs", "{left:?}");
        drop(bind);
    }
}

/// `imagecachefs unmount` of a mount whose daemon is stopped (as a hung one would be) looks
/// at nothing inside the mount: after its 10 s wait it detaches the mount itself.
#[test]
fn unmount_of_a_stopped_daemon_detaches_it() {
    let s = Scratch::new();
    let m = Mount::new(&s.base, &[]);
    // Hung as a whole: the server, and its supervisor (which would replace a silent server).
    let server = m.server_pid();
    unsafe { libc::kill(m.pid() as i32, libc::SIGSTOP) };
    unsafe { libc::kill(server as i32, libc::SIGSTOP) };
    let cont = (Continue(server), Continue(m.pid()));
    let started = Instant::now();
    let (code, _, err) =
        run_timeout(Command::new(bin()).arg("unmount").arg(&s.base), Duration::from_secs(40));
    assert_eq!(code, 0, "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    assert!(common::mounts_at(&s.base).is_empty(), "{:?}", common::mounts_at(&s.base));
    drop(cont);
    assert!(m.wait_exit(Duration::from_secs(20)).is_some(), "the daemon did not exit");
}
