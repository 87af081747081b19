//! Installing imagecachefs the way compute nodes are installed, for real: `mount --create-dir`
//! on a node whose `_base` Nova has not made yet, and the Debian package's round trip —
//! `packaging/build-deb.sh`, its contents (`dpkg-deb -c`, `-I`), `dpkg -i`, a mount through
//! `mount -t fuse.imagecachefs` with the installed helper and binary, `dpkg -r`, `dpkg -P`,
//! and nothing left behind.
//!
//! Nothing here skips: a missing `dpkg`, `cargo-deb` (tests/setup.sh installs it) or root
//! fails the test and says so.
mod common;
use common::{
    daemon_pids, detach, is_fuse, kill_daemons, mounts_at, require_tool, run, run_ok, run_timeout,
    tool, wait_daemons_gone, wait_until, Mount, Scratch,
};
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const PACKAGE: &str = "imagecachefs";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn create_dir_makes_a_missing_base_owned_like_the_instances_dir_and_mounts() {
    let s = Scratch::new();
    fs::remove_dir(&s.base).unwrap();
    let instances = s.tmp.path();
    // Nova's user and mode, as the instances directory has them.
    let (uid, gid, mode) = (4242, 4343, 0o751);
    std::os::unix::fs::chown(instances, Some(uid), Some(gid)).unwrap();
    fs::set_permissions(instances, fs::Permissions::from_mode(mode)).unwrap();
    // Without the flag: refused, nothing made.
    let (code, _, err) =
        run_timeout(Command::new(common::bin()).arg("mount").arg(&s.base), Duration::from_secs(20));
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(!s.base.exists());

    let m = Mount::new(&s.base, &["--create-dir"]);
    assert!(m.log_text().contains("created "), "the log says so:\n{}", m.log_text());
    let status = fs::read_to_string(s.base.join(".imagecache/status")).unwrap();
    assert!(status.starts_with("NAME"), "the status tree is served: {status}");
    fs::write(s.base.join("swap_512"), b"x").unwrap();
    assert!(m.stop().success());
    let made = fs::metadata(&s.base).unwrap();
    assert_eq!((made.uid(), made.gid(), made.mode() & 0o7777), (uid, gid, mode));
    assert!(s.base.join("swap_512").is_file(), "written into the directory made");

    // A missing parent is refused with one line, and nothing is made.
    let deeper = s.path("nope/_base");
    let (code, _, err) = run_timeout(
        Command::new(common::bin()).arg("mount").arg(&deeper).arg("--create-dir"),
        Duration::from_secs(20),
    );
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    assert!(err.contains("its parent directory does not exist"), "{err}");
    assert!(!s.path("nope").exists());
}

/// dpkg, retried while another dpkg or apt holds its lock (bounded: 60 s).
fn dpkg(args: &[&str]) -> (i32, String, String) {
    let mut last = (0, String::new(), String::new());
    for _ in 0..60 {
        last = run_timeout(tool("dpkg").args(args), Duration::from_secs(120));
        if last.0 == 0 || !last.2.contains("lock") {
            return last;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    last
}

fn installed_state() -> Option<String> {
    let (code, out, _) = run(tool("dpkg-query").args(["-W", "-f", "${Status}", PACKAGE]));
    (code == 0).then_some(out)
}

/// Purges the package whatever happens to the test, and any mount it left.
struct Installed {
    dir: PathBuf,
}

impl Drop for Installed {
    fn drop(&mut self) {
        while mounts_at(&self.dir).last().map(String::as_str) == Some("fuse.imagecachefs")
            && detach(&self.dir)
        {}
        if !wait_daemons_gone(&self.dir, Duration::from_secs(10)) {
            kill_daemons(&self.dir);
        }
        let _ = dpkg(&["-P", PACKAGE]);
    }
}

#[test]
fn debian_package_installs_mounts_through_mount_t_and_removes_cleanly() {
    require_tool("dpkg");
    require_tool("dpkg-deb");
    common::require_fuse();
    assert!(
        installed_state().is_none_or(|s| !s.contains("installed") && !s.contains("config-files")),
        "the imagecachefs package is already on this machine: this test installs and removes \
         it, so it refuses to run here"
    );
    assert!(!Path::new("/usr/bin/imagecachefs").exists(), "/usr/bin/imagecachefs exists already");
    let s = Scratch::new();
    fs::remove_dir(&s.base).unwrap();

    // One command builds it.
    let (code, out, err) = run_timeout(
        Command::new(repo().join("packaging/build-deb.sh")).current_dir(repo()),
        Duration::from_secs(540),
    );
    assert_eq!(code, 0, "build-deb.sh:\nstdout: {out}\nstderr: {err}");
    let deb = PathBuf::from(out.lines().last().unwrap_or_default());
    assert!(deb.is_file() && deb.extension().is_some_and(|e| e == "deb"), "{out}");

    // Its contents.
    let listing = run_ok(tool("dpkg-deb").arg("-c").arg(&deb));
    let files: BTreeSet<String> = listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect();
    for want in [
        "/usr/bin/imagecachefs",
        "/sbin/mount.fuse.imagecachefs",
        "/lib/systemd/system/imagecachefs.service",
        "/etc/logrotate.d/imagecachefs",
        "/usr/share/man/man8/imagecachefs.8.gz",
        "/usr/share/man/man8/imagecachefs-mount.8.gz",
        "/usr/share/man/man8/mount.fuse.imagecachefs.8.gz",
        "/usr/share/doc/imagecachefs/examples/nova-compute.service.d/imagecachefs.conf",
        "/usr/share/doc/imagecachefs/examples/nova.conf.snippet",
        "/usr/share/doc/imagecachefs/examples/preflight.sh",
        "/usr/share/doc/imagecachefs/OPERATIONS.md",
    ] {
        assert!(files.contains(want), "{want} is not in the package:\n{listing}");
    }
    assert!(
        !files.iter().any(|f| f.starts_with("/etc/systemd/")),
        "nothing is enabled behind the operator's back:\n{listing}"
    );
    let info = run_ok(tool("dpkg-deb").arg("-I").arg(&deb));
    let depends = info.lines().find(|l| l.trim_start().starts_with("Depends:")).unwrap_or("");
    assert!(!depends.contains("fuse"), "imagecachefs uses nothing of fuse3: {depends}");
    assert!(
        !info.contains("postinst") && !info.contains("prerm"),
        "no maintainer script (the unit is not enabled by installing):\n{info}"
    );

    // Installed: the files are there, the unit and the helper name /usr/bin/imagecachefs.
    let _purge = Installed { dir: s.base.clone() };
    let (code, out, err) = dpkg(&["-i", deb.to_str().unwrap()]);
    assert_eq!(code, 0, "dpkg -i:\nstdout: {out}\nstderr: {err}");
    for f in &files {
        assert!(Path::new(f).exists(), "{f} is not installed");
    }
    let unit = fs::read_to_string("/lib/systemd/system/imagecachefs.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/imagecachefs mount"), "{unit}");
    assert!(!unit.contains("/usr/local/bin"), "the packaged unit runs the packaged binary");
    let page =
        run_ok(tool("gzip").args(["-dc", "/usr/share/man/man8/mount.fuse.imagecachefs.8.gz"]));
    assert!(page.contains("create_dir"), "the helper's page lists its options");

    // mount(8) finds the helper; the helper runs the installed binary; a missing _base is
    // made (create_dir).
    let dir = s.base.to_str().unwrap();
    let (code, out, err) = run_timeout(
        tool("mount")
            .args(["-t", "fuse.imagecachefs", dir, dir, "-o", "create_dir,original_min_age=7"])
            .env_remove("IMAGECACHEFS_BIN"),
        Duration::from_secs(30),
    );
    assert_eq!(code, 0, "mount -t fuse.imagecachefs:\nstdout: {out}\nstderr: {err}");
    assert!(is_fuse(&s.base), "the mount is live");
    let pids = daemon_pids(&s.base);
    assert_eq!(pids.len(), 1, "one daemon");
    let exe = fs::read_link(format!("/proc/{}/exe", pids[0])).unwrap();
    assert_eq!(exe, Path::new("/usr/bin/imagecachefs"), "the installed binary serves it");
    let config = wait_until(Duration::from_secs(10), "the config status file", || {
        fs::read_to_string(s.base.join(".imagecache/config")).ok()
    });
    assert!(config.lines().any(|l| l == "original_min_age: 7"), "{config}");
    let status = run_ok(Command::new("/usr/bin/imagecachefs").arg("status").arg(&s.base));
    assert!(status.starts_with("NAME"), "{status}");
    let (code, _, err) = run_timeout(
        Command::new("/usr/bin/imagecachefs").arg("unmount").arg(&s.base),
        Duration::from_secs(20),
    );
    assert_eq!(code, 0, "unmount: {err}");
    assert!(wait_daemons_gone(&s.base, Duration::from_secs(20)), "the daemon exits");
    assert!(!is_fuse(&s.base));

    // Removed: every file but the conffile is gone; purged: that too.
    let (code, out, err) = dpkg(&["-r", PACKAGE]);
    assert_eq!(code, 0, "dpkg -r:\nstdout: {out}\nstderr: {err}");
    let conffile = "/etc/logrotate.d/imagecachefs";
    let left: Vec<&String> =
        files.iter().filter(|f| *f != conffile && Path::new(f).exists()).collect();
    assert!(left.is_empty(), "dpkg -r left {left:?}");
    let (code, out, err) = dpkg(&["-P", PACKAGE]);
    assert_eq!(code, 0, "dpkg -P:\nstdout: {out}\nstderr: {err}");
    assert!(!Path::new(conffile).exists(), "dpkg -P left {conffile}");
    assert!(installed_state().is_none_or(|s| s.contains("not-installed")), "still known to dpkg");
}

/// The package's `/etc/logrotate.d/imagecachefs`, run by real logrotate against a daemon with
/// `--log-file` (the path swapped for a scratch one): the log is moved away and the daemon,
/// sent SIGHUP by `postrotate`, writes a new one.
#[test]
fn the_shipped_logrotate_snippet_rotates_a_running_daemons_log() {
    let s = Scratch::new();
    let log = s.path("imagecachefs.log");
    let snippet = fs::read_to_string(repo().join("packaging/logrotate")).unwrap();
    assert!(snippet.contains("/var/log/imagecachefs.log {"), "{snippet}");
    let conf = s.path("logrotate.conf");
    fs::write(&conf, snippet.replace("/var/log/imagecachefs.log", log.to_str().unwrap())).unwrap();
    let m = Mount::new(&s.base, &["--log-file", log.to_str().unwrap()]);
    let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
    wait_until(Duration::from_secs(10), "the mount line in --log-file", || {
        read(&log).contains("mounted over").then_some(())
    });
    let (code, out, err) = run_timeout(
        tool("logrotate").arg("-f").arg("-s").arg(s.path("logrotate.state")).arg(&conf),
        Duration::from_secs(30),
    );
    assert_eq!(code, 0, "logrotate:\nstdout: {out}\nstderr: {err}");
    let rotated = s.path("imagecachefs.log.1");
    assert!(read(&rotated).contains("mounted over"), "the old lines were moved away");
    wait_until(Duration::from_secs(10), "the daemon's new log file", || {
        read(&log).contains("SIGHUP: reopened the log file").then_some(())
    });
    assert!(m.stop().success());
}
