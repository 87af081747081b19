//! Attempts to break the way operators install and mount imagecachefs (issue 14): the mount
//! helper as util-linux `mount(8)` really runs it from an fstab entry. Each test is the
//! reproduction of a way an operator's mount went wrong. The helper is put in `/sbin` of a
//! private mount namespace only (an overlay), so the host is untouched; every daemon started
//! there is unmounted, waited for, and killed if it lingers.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::Scratch;
use common::{bin, detach, kill_daemons, mounts_at, on_path, run_timeout, wait_daemons_gone};

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
