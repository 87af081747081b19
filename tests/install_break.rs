//! Attempts to break the way operators install and mount imagecachefs (issue 14): the mount
//! helper as util-linux `mount(8)` really runs it from an fstab entry, and `--create-dir`
//! mounts started together. Each test is the reproduction of a way an operator's mount went
//! wrong. The helper is put in `/sbin` of a private mount namespace only (an overlay), so the
//! host is untouched; every daemon started is unmounted, waited for, and killed if it lingers.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    bin, daemon_pids, detach, kill_daemons, mounts_at, on_path, run_timeout, wait_daemons_gone,
    Scratch,
};

const FSTYPE: &str = "fuse.imagecachefs";
const HELPER: &str = "mount.fuse.imagecachefs";

fn require(name: &str, package: &str) {
    assert!(
        on_path(name),
        "this test needs `{name}` on PATH: apt-get install -y {package} (see .ci/run)"
    );
}

fn helper_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-scripts").join(HELPER)
}

/// Whatever the helper mounted at `dir` is detached and its daemon gone when this drops.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for _ in 0..8 {
            if mounts_at(&self.0).last().map(String::as_str) != Some(FSTYPE) || !detach(&self.0) {
                break;
            }
        }
        if !wait_daemons_gone(&self.0, Duration::from_secs(10)) {
            kill_daemons(&self.0);
        }
    }
}

/// Runs `script` (bash) in a private mount namespace whose `/sbin` holds the helper, as
/// util-linux looks for helpers there only.
fn in_namespace(s: &Scratch, script: &str) -> (i32, String, String) {
    require("unshare", "util-linux");
    require("mount", "mount");
    let helpers = s.path("helpers");
    fs::create_dir(&helpers).unwrap();
    fs::copy(helper_script(), helpers.join(HELPER)).unwrap();
    let prologue = format!(
        "set -uo pipefail\n\
         sbin=$(readlink -f /sbin)\n\
         mount -t overlay overlay -o lowerdir={}:\"$sbin\" \"$sbin\" || exit 99\n\
         trap '\"$IMAGECACHEFS_BIN\" unmount {} 2>/dev/null || true' EXIT\n",
        helpers.display(),
        s.base.display()
    );
    run_timeout(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "bash", "-c"])
            .arg(prologue + script)
            .env("IMAGECACHEFS_BIN", bin()),
        Duration::from_secs(60),
    )
}

/// Reproduction: an fstab entry `DIR DIR fuse.imagecachefs original_min_age=9 0 0`, then
/// `mount -T FSTAB DIR -o original_min_age=60` to try another value once. mount(8) hands the
/// helper `-o rw,original_min_age=9,original_min_age=60` (fstab's options first), and the
/// helper passed both as flags: the daemon's parser refused "the argument
/// '--original-min-age <SECS>' cannot be used multiple times" and nothing was mounted. As
/// with every mount option, the command line must override fstab: the last value counts.
#[test]
fn mount_o_overrides_an_option_of_the_fstab_entry() {
    let s = Scratch::new();
    let dir = s.base.display().to_string();
    let fstab = s.path("fstab");
    fs::write(&fstab, format!("{dir} {dir} {FSTYPE} original_min_age=9,no_evict,nofail 0 0\n"))
        .unwrap();
    let guard = Cleanup(s.base.clone());
    let text = format!(
        "mount -T {fstab} {dir} -o original_min_age=60,no_evict || exit 98\n\
         echo \"== $(grep -E '^(original_min_age|no_evict):' {dir}/.imagecache/config | tr '\\n' ' ')\"\n",
        fstab = fstab.display(),
    );
    let (code, out, err) = in_namespace(&s, &text);
    let ctx = format!("exit {code}\nstdout: {out}\nstderr: {err}");
    assert_eq!(code, 0, "mount -o over an fstab entry\n{ctx}");
    let line = out.lines().find(|l| l.starts_with("== ")).unwrap_or_else(|| panic!("{ctx}"));
    assert!(line.contains("original_min_age: 60"), "the command line's value counts\n{ctx}");
    assert!(!err.contains("multiple times"), "{ctx}");
    drop(guard);
    assert!(wait_daemons_gone(&s.base, Duration::from_secs(20)), "the daemon exited\n{ctx}");
}

/// Generic options an fstab line carries that are not imagecachefs's: `ro` (which mount(8)
/// hands over as `-o ro,...`) and a VFS flag such as `noatime` get one line naming the
/// option from `mount`, exit non-zero, and nothing is mounted.
#[test]
fn fstab_ro_and_noatime_are_refused_with_one_line_and_mount_nothing() {
    let s = Scratch::new();
    let dir = s.base.display().to_string();
    let fstab = s.path("fstab");
    fs::write(&fstab, format!("{dir} {dir} {FSTYPE} nofail,_netdev,x-systemd.automount 0 0\n"))
        .unwrap();
    let guard = Cleanup(s.base.clone());
    let text = format!(
        "mount -T {fstab} {dir} -o ro; echo \"== ro $?\"\n\
         mount -T {fstab} {dir} -o noatime; echo \"== noatime $?\"\n\
         echo \"== mounts $(grep -c ' {dir} ' /proc/self/mounts)\"\n",
        fstab = fstab.display(),
    );
    let (code, out, err) = in_namespace(&s, &text);
    let ctx = format!("exit {code}\nstdout: {out}\nstderr: {err}");
    assert_eq!(code, 0, "{ctx}");
    for (opt, why) in [("ro", "option ro is not supported"), ("noatime", "unknown option noatime")]
    {
        assert!(!out.lines().any(|l| l == format!("== {opt} 0")), "{opt} refused\n{ctx}");
        let lines: Vec<&str> = err.lines().filter(|l| l.contains(why)).collect();
        assert_eq!(lines.len(), 1, "one line for {opt}\n{ctx}");
    }
    assert_eq!(err.lines().count(), 2, "nothing else said\n{ctx}");
    assert!(out.lines().any(|l| l == "== mounts 0"), "nothing mounted\n{ctx}");
    drop(guard);
}

/// Reproduction: the systemd unit and an fstab `mount -a` (or two `mount --create-dir` runs)
/// start at once for a missing `_base`. Both found the directory plain, and both mounted:
/// two daemons stacked on one directory, the lower one never seeing the opens made through
/// the upper one, free to evict images in use. Exactly one must mount; the other is refused
/// with one line. The directory is made with the instances directory's owner and mode (Nova's
/// uid 162, 0750) whichever wins.
#[test]
fn two_create_dir_mounts_at_once_mount_once() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let s = Scratch::new();
    let instances = s.tmp.path();
    std::os::unix::fs::chown(instances, Some(162), Some(162)).unwrap();
    fs::set_permissions(instances, fs::Permissions::from_mode(0o750)).unwrap();
    let guard = Cleanup(s.base.clone());
    let start = || {
        Command::new(bin())
            .arg("mount")
            .arg(&s.base)
            .args(["--background", "--create-dir", "--log-file"])
            .arg(s.path("daemons.log"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    for round in 0..20 {
        fs::remove_dir(&s.base).unwrap();
        let (a, b) = (start(), start());
        let results: Vec<(bool, String)> = [a, b]
            .into_iter()
            .map(|c| {
                let out = c.wait_with_output().unwrap();
                (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
            })
            .collect();
        let ctx = format!("round {round}: {results:?}");
        let mounted = mounts_at(&s.base).iter().filter(|t| *t == FSTYPE).count();
        assert_eq!(mounted, 1, "one imagecachefs mount, not a stack\n{ctx}");
        assert_eq!(results.iter().filter(|(ok, _)| *ok).count(), 1, "one mounted\n{ctx}");
        let (_, refused) = results.iter().find(|(ok, _)| !ok).unwrap();
        assert_eq!(refused.lines().count(), 1, "one line\n{ctx}");
        assert!(refused.contains("already an imagecachefs mount"), "{ctx}");
        let (code, _, err) =
            run_timeout(Command::new(bin()).arg("unmount").arg(&s.base), Duration::from_secs(20));
        assert_eq!(code, 0, "unmount: {err}\n{ctx}");
        assert!(wait_daemons_gone(&s.base, Duration::from_secs(20)), "{ctx}");
        assert!(daemon_pids(&s.base).is_empty(), "{ctx}");
        let made = fs::metadata(&s.base).unwrap();
        assert_eq!((made.uid(), made.gid(), made.mode() & 0o7777), (162, 162, 0o750), "{ctx}");
    }
    drop(guard);
}

/// Reproduction: `-o =x` (an option with a value but no name, as a typo in fstab makes it:
/// `original_min_age=9,=86400`) was taken for an empty option and ignored: the mount went on
/// without what the operator meant. It must be refused with one line, nothing mounted; an
/// empty option (`,,`) stays nothing.
#[test]
fn an_option_without_a_name_is_refused_and_mounts_nothing() {
    let s = Scratch::new();
    let guard = Cleanup(s.base.clone());
    let dir = s.base.to_str().unwrap();
    let helper = |opts: &str| {
        run_timeout(
            Command::new(helper_script())
                .args([dir, dir, "-o", opts])
                .env("IMAGECACHEFS_BIN", bin()),
            Duration::from_secs(30),
        )
    };
    let (code, out, err) = helper("original_min_age=9,=86400");
    let ctx = format!("exit {code}\nstdout: {out}\nstderr: {err}");
    assert_eq!(code, 1, "{ctx}");
    assert_eq!(err.lines().count(), 1, "one line\n{ctx}");
    assert!(err.contains("unknown option =86400"), "{ctx}");
    assert!(mounts_at(&s.base).is_empty(), "nothing mounted\n{ctx}");
    assert!(daemon_pids(&s.base).is_empty(), "no daemon\n{ctx}");
    // Empty options are still nothing: this one mounts.
    let (code, out, err) = helper("original_min_age=9,,");
    assert_eq!(code, 0, "exit {code}\nstdout: {out}\nstderr: {err}");
    assert_eq!(mounts_at(&s.base).last().map(String::as_str), Some(FSTYPE));
    let (code, _, err) =
        run_timeout(Command::new(bin()).arg("unmount").arg(&s.base), Duration::from_secs(20));
    assert_eq!(code, 0, "unmount: {err}");
    assert!(wait_daemons_gone(&s.base, Duration::from_secs(20)), "the daemon exited");
    drop(guard);
}

/// The instances directory bind-mounted shared on the host (a compute node's
/// `/var/lib/nova`), undone on drop.
struct SharedBind(PathBuf);

impl SharedBind {
    fn new(dir: &Path) -> Self {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        let rc = unsafe {
            libc::mount(c.as_ptr(), c.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null())
        };
        assert_eq!(rc, 0, "bind {dir:?}: {}", std::io::Error::last_os_error());
        let bound = SharedBind(dir.to_path_buf());
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                c.as_ptr(),
                std::ptr::null(),
                libc::MS_SHARED,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "make {dir:?} shared: {}", std::io::Error::last_os_error());
        bound
    }
}

impl Drop for SharedBind {
    fn drop(&mut self) {
        detach(&self.0);
    }
}

/// Reproduction: a nova-compute "container" (a mount namespace made with slave propagation,
/// as an OpenStack-Helm pod with one volume HostToContainer) whose volume for the instances
/// directory is private, while another mount of the same disk in it receives from the host.
/// preflight.sh said "ok ... receives mounts" because some mount of the disk received, yet
/// nova-compute, looking through its private volume, keeps seeing the covered directory. It
/// must FAIL naming the view that does not receive.
#[test]
fn preflight_fails_a_private_volume_even_when_another_mount_of_the_disk_receives() {
    require("unshare", "util-linux");
    common::require_fuse();
    let s = Scratch::new();
    let shared = SharedBind::new(s.tmp.path());
    let view = tempfile::Builder::new().prefix("icfs-test-ctr").tempdir().unwrap();
    let nova_compute = s.path("nova-compute");
    let sleep = ["/usr/bin/sleep", "/bin/sleep"].into_iter().find(|p| Path::new(p).exists());
    fs::copy(sleep.expect("this test needs /usr/bin/sleep (coreutils)"), &nova_compute).unwrap();
    // The volume is a private bind; the namespace's copy of the host's shared bind (at the
    // host's path) stays a slave that receives.
    let script =
        r#"mount --bind "$1" "$2" && mount --make-private "$2" && echo ready && exec "$3" 60"#;
    let mut ctr = common::Proc::spawn(
        common::tool("unshare")
            .args(["--mount", "--propagation", "slave", "--", "bash", "-c", script])
            .arg("ctr")
            .arg(s.tmp.path())
            .arg(view.path())
            .arg(&nova_compute),
    );
    ctr.wait_line("ready");
    let pid = ctr.pid();
    common::wait_until(Duration::from_secs(10), "the exec of nova-compute", || {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "nova-compute").then_some(())
    });
    let preflight = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-scripts/preflight.sh");
    let (code, out, err) = run_timeout(
        Command::new(preflight).arg("--cache-dir").arg(&s.base).env("IMAGECACHEFS_BIN", bin()),
        Duration::from_secs(60),
    );
    let ctx = format!("preflight: exit {code}\nstdout: {out}\nstderr: {err}");
    let line = out
        .lines()
        .find(|l| l.contains(&format!("pid {pid} (nova-compute)")))
        .unwrap_or_else(|| panic!("the container is named\n{ctx}"));
    assert!(line.starts_with("FAIL") && line.contains("private propagation"), "{line}\n{ctx}");
    assert!(line.contains(view.path().to_str().unwrap()), "names the view\n{ctx}");
    assert_eq!(code, 1, "{ctx}");

    // What preflight warns of: the mount does not reach the container's volume.
    let m = common::Mount::new(&s.base, &[]);
    let inside = PathBuf::from(format!("/proc/{pid}/root"))
        .join(view.path().join("_base/.imagecache/status").strip_prefix("/").unwrap());
    assert!(s.base.join(".imagecache/status").exists(), "the host sees the mount");
    let covered = inside.parent().and_then(Path::parent).unwrap();
    assert!(covered.is_dir(), "{covered:?}: the container sees the directory");
    assert!(!inside.exists(), "the container's volume keeps the covered directory");
    drop(m);
    ctr.kill();
    drop(shared);
}
