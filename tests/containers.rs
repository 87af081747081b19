//! Nova in containers (kolla-ansible, OpenStack-Helm), for real: a "container" is a mount
//! namespace made with `unshare --mount --propagation slave|shared|private` BEFORE
//! imagecachefs mounts on the host, which bind-mounts the host's instances directory the way
//! kolla's `-v /var/lib/nova:/var/lib/nova` does. The host side is a shared mount of the
//! scratch directory (systemd makes `/` shared on a real node; this machine's `/` may be
//! private, so the test makes its own peer group).
//!
//! What must hold (docs/OPERATIONS.md, "Nova in containers"): with `slave` or `shared`
//! propagation the container sees the overlay (the status tree is there) and its opens are
//! handles of the daemon, counted in `images/NAME` with the container's pid; a remount after
//! a crash (`kill -9`, lazy unmount, mount again) reaches it too, and the new daemon finds the
//! descriptor it kept on the dead mount. With `private` the container keeps seeing the covered
//! directory — no `.imagecache` there — and an image it opens is not seen by the daemon until
//! an eviction walks `/proc` for it: that finds the descriptor and refuses, and from then on
//! the status files show it as a holder from outside the mount.
//!
//! Nothing here skips: a missing `unshare` or root fails the test and says so.
mod common;
use common::{bin, detach, require_fuse, run, tool, wait_until, Mount, Proc, Scratch};
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const IMAGE: &str = "0d5e6b61602d758984b3bf038267614d6016eb2a";

/// The scratch directory bind-mounted on itself and made shared (its own peer group), as a
/// compute node's `/var/lib/nova` is under systemd; detached on drop.
struct SharedHostDir {
    dir: PathBuf,
}

impl SharedHostDir {
    fn new(dir: &Path) -> Self {
        let c = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let flags = [libc::MS_BIND, libc::MS_SHARED];
        for f in flags {
            let src = if f == libc::MS_BIND { c.as_ptr() } else { std::ptr::null() };
            let rc = unsafe { libc::mount(src, c.as_ptr(), std::ptr::null(), f, std::ptr::null()) };
            assert_eq!(rc, 0, "mount flags {f:#x} on {dir:?}: {}", std::io::Error::last_os_error());
        }
        SharedHostDir { dir: dir.to_path_buf() }
    }
}

impl Drop for SharedHostDir {
    fn drop(&mut self) {
        detach(&self.dir);
    }
}

/// One "container": a shell in a new mount namespace with `propagation`, which bind-mounts
/// the instances directory at `view` (kolla's volume), prints `ready`, and then follows the
/// test's steps, each a file the test creates in `ctl` (polled, 30 s at most each).
fn container(propagation: &str, instances: &Path, view: &Path, ctl: &Path) -> Proc {
    let script = r#"
        set -eu
        instances=$1 view=$2 ctl=$3 image=$4
        step() {
            for _ in $(seq 1 600); do [ -e "$ctl/$1" ] && return 0; sleep 0.05; done
            echo "timed out waiting for $1"; exit 1
        }
        look() {
            if [ -e "$view/_base/.imagecache/status" ]; then echo overlay; else echo covered; fi
        }
        mount --bind "$instances" "$view"
        echo ready
        step mounted
        look
        exec 3<"$view/_base/$image"
        echo holding
        step remounted
        look
        step done
    "#;
    Proc::spawn(
        tool("unshare")
            .args(["--mount", "--propagation", propagation, "--", "bash", "-c", script, "ctr"])
            .arg(instances)
            .arg(view)
            .arg(ctl)
            .arg(IMAGE),
    )
}

/// Fields drop in order: the shared bind goes before the scratch directory is removed.
struct Node {
    _shared: SharedHostDir,
    s: Scratch,
    view: tempfile::TempDir,
    ctl: PathBuf,
}

impl Node {
    fn new() -> Self {
        require_fuse();
        let s = Scratch::new();
        fs::write(s.base.join(IMAGE), b"a base image").unwrap();
        let ctl = s.path("ctl");
        fs::create_dir(&ctl).unwrap();
        let view = tempfile::Builder::new().prefix("icfs-test-ctr").tempdir().unwrap();
        let shared = SharedHostDir::new(s.tmp.path());
        Node { _shared: shared, s, view, ctl }
    }

    fn step(&self, name: &str) {
        fs::write(self.ctl.join(name), b"").unwrap();
    }

    fn image_field(&self, key: &str) -> Option<String> {
        let text = fs::read_to_string(self.s.base.join(".imagecache/images").join(IMAGE)).ok()?;
        text.lines().find_map(|l| l.strip_prefix(&format!("{key}: ")).map(str::to_string))
    }

    /// Waits until `images/IMAGE` lists `pid` among its holders; returns the line.
    fn wait_holder(&self, pid: u32) -> String {
        wait_until(Duration::from_secs(15), &format!("pid {pid} among the holders"), || {
            self.image_field("holders").filter(|h| {
                h.split("; ").any(|one| one.split_whitespace().next() == Some(&pid.to_string()))
            })
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Any leftover overlay first, then the shared bind (the field order does the rest).
        detach(&self.s.base);
    }
}

/// A container with `slave` or `shared` propagation: sees the overlay made after it started,
/// its open is a counted handle, and a remount after a crash reaches it as well.
fn sees_the_overlay_and_a_remount(propagation: &str) {
    let node = Node::new();
    let mut ctr = container(propagation, node.s.tmp.path(), node.view.path(), &node.ctl);
    ctr.wait_line("ready");
    let m = Mount::new(&node.s.base, &[]);
    node.step("mounted");
    ctr.wait_line("overlay");
    ctr.wait_line("holding");
    let pid = ctr.pid();
    let holders = node.wait_holder(pid);
    assert!(!holders.contains("before mount"), "a handle of this daemon: {holders}");
    assert_eq!(node.image_field("refs").as_deref(), Some("1"), "{holders}");

    // The daemon dies; the host detaches the dead mount and mounts again.
    m.kill9();
    let m = Mount::new(&node.s.base, &[]);
    node.step("remounted");
    ctr.wait_line("overlay");
    // The descriptor the container kept on the dead mount: found through /proc.
    let holders = node.wait_holder(pid);
    assert!(holders.contains("before mount"), "{holders}");
    assert_eq!(node.image_field("state").as_deref(), Some("in-use"), "{holders}");
    node.step("done");
    drop(ctr);
    assert!(m.stop().success());
}

#[test]
fn a_slave_container_sees_the_overlay_and_a_remount_after_a_crash() {
    sees_the_overlay_and_a_remount("slave");
}

#[test]
fn a_shared_container_sees_the_overlay_and_a_remount_after_a_crash() {
    sees_the_overlay_and_a_remount("shared");
}

#[test]
fn a_private_container_keeps_the_covered_directory_and_is_still_a_holder() {
    let node = Node::new();
    let mut ctr = container("private", node.s.tmp.path(), node.view.path(), &node.ctl);
    ctr.wait_line("ready");
    let m = Mount::new(&node.s.base, &[]);
    node.step("mounted");
    // How an operator tells: no .imagecache in the container's _base.
    ctr.wait_line("covered");
    ctr.wait_line("holding");
    // Its open never reached the daemon, so the status files do not show it yet; but an
    // eviction walks /proc for the file first, finds the descriptor, and refuses.
    let (code, out, err) = run(Command::new(bin()).arg("evict").arg(&node.s.base).arg(IMAGE));
    assert_eq!(code, 1, "evict must be refused:\nstdout: {out}\nstderr: {err}");
    assert!(out.contains("refused") || err.contains("refused"), "{out}{err}");
    assert!(node.s.base.join(IMAGE).exists(), "the image stays");
    let holders = node.wait_holder(ctr.pid());
    assert!(holders.contains("before mount"), "found through /proc, not a handle: {holders}");
    assert_eq!(node.image_field("state").as_deref(), Some("in-use"), "{holders}");
    node.step("remounted");
    ctr.wait_line("covered");
    node.step("done");
    drop(ctr);
    assert!(m.stop().success());
}

/// imagecachefs itself in a container without `--pid=host`: its own PID namespace (and
/// `/proc`). An open by a host process is a counted handle, but the kernel reports its pid as
/// 0 (not visible in the daemon's namespace), so `holders` says `0 unknown`; the daemon says
/// so at start.
#[test]
fn a_daemon_without_the_host_pid_namespace_counts_opens_as_pid_0() {
    let node = Node::new();
    let log = node.s.path("daemon.log");
    // Its mount namespace is a shared copy, so that its mount reaches the host (as
    // `-v /var/lib/nova:/var/lib/nova:rshared` does for a container).
    let daemon = Proc::spawn_logged(
        tool("unshare")
            .args(["--pid", "--fork", "--mount", "--propagation", "shared", "--mount-proc"])
            .arg(bin())
            .arg("mount")
            .arg(&node.s.base)
            .env("RUST_LOG", "info"),
        log.clone(),
    );
    let stop = StopDaemons(node.s.base.clone());
    wait_until(Duration::from_secs(20), "the daemon's mount to reach the host", || {
        common::is_fuse(&node.s.base).then_some(())
    });
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("not in the host's PID namespace"), "{text}");
    let mut reader = Proc::spawn(
        tool("bash")
            .arg("-c")
            .arg(r#"exec 3<"$1"; echo holding; exec sleep 60"#)
            .arg("reader")
            .arg(node.s.base.join(IMAGE)),
    );
    reader.wait_line("holding");
    let holders = wait_until(Duration::from_secs(15), "the reader's handle", || {
        node.image_field("holders").filter(|h| h != "-")
    });
    assert_eq!(holders, "0 unknown", "{}", fs::read_to_string(&log).unwrap());
    assert_eq!(node.image_field("refs").as_deref(), Some("1"));
    drop(reader);
    drop(stop);
    drop(daemon);
}

/// SIGTERM to every daemon serving `dir` (ours run inside `unshare`), waited for; on drop.
struct StopDaemons(PathBuf);

impl Drop for StopDaemons {
    fn drop(&mut self) {
        for pid in common::daemon_pids(&self.0) {
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if !common::wait_daemons_gone(&self.0, Duration::from_secs(20)) {
            common::kill_daemons(&self.0);
        }
        detach(&self.0);
    }
}

/// preflight.sh tells, before anything is mounted, which running nova-compute (here: a
/// program of that name in a "container") would see the mount and which would not.
#[test]
fn preflight_names_a_nova_compute_whose_namespace_would_not_see_the_mount() {
    let node = Node::new();
    let nova_compute = node.s.path("nova-compute");
    let sleep = ["/usr/bin/sleep", "/bin/sleep"].into_iter().find(|p| Path::new(p).exists());
    fs::copy(sleep.expect("this test needs /usr/bin/sleep (coreutils)"), &nova_compute).unwrap();
    let script = r#"mount --bind "$1" "$2"; echo ready; exec "$3" 60"#;
    let start = |propagation: &str, view: &Path| {
        let mut p = Proc::spawn(
            tool("unshare")
                .args(["--mount", "--propagation", propagation, "--", "bash", "-c", script])
                .arg("ctr")
                .arg(node.s.tmp.path())
                .arg(view)
                .arg(&nova_compute),
        );
        p.wait_line("ready");
        wait_until(Duration::from_secs(10), "the exec of nova-compute", || {
            let comm = fs::read_to_string(format!("/proc/{}/comm", p.pid())).ok()?;
            (comm.trim() == "nova-compute").then_some(())
        });
        p
    };
    let other_view = tempfile::Builder::new().prefix("icfs-test-ctr").tempdir().unwrap();
    let slave = start("slave", node.view.path());
    let private = start("private", other_view.path());
    let preflight = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-scripts/preflight.sh");
    let (code, out, err) = run(Command::new(preflight)
        .arg("--cache-dir")
        .arg(&node.s.base)
        .env("IMAGECACHEFS_BIN", bin()));
    let ctx = format!("preflight: exit {code}\nstdout: {out}\nstderr: {err}");
    let line_of = |pid: u32| {
        out.lines().find(|l| l.contains(&format!("pid {pid} (nova-compute)"))).map(str::to_string)
    };
    assert!(out.lines().any(|l| l.starts_with("ok") && l.contains("is a shared mount")), "{ctx}");
    let ok = line_of(slave.pid()).unwrap_or_else(|| panic!("the slave one is named\n{ctx}"));
    assert!(ok.starts_with("ok") && ok.contains("receives mounts"), "{ok}\n{ctx}");
    let bad = line_of(private.pid()).unwrap_or_else(|| panic!("the private one is named\n{ctx}"));
    assert!(bad.starts_with("FAIL") && bad.contains("private propagation"), "{bad}\n{ctx}");
    assert_eq!(code, 1, "{ctx}");
}
