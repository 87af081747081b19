//! The command line's refusals, for real: each one prints ONE line on stderr starting with
//! `imagecachefs: `, exits 1 (clap usage errors exit 2) and changes nothing. Also the success
//! cases they are refusals of: `mount --background` returns once the mount is live, and
//! `unmount` detaches an imagecachefs mount.

mod common;

use common::{
    bin, daemon_pids, detach, is_fuse, kill_and_reap, kill_daemons, mounts_at, run_timeout,
    wait_daemons_gone, wait_timeout, Mount, Scratch,
};
use std::ffi::CString;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

fn icfs(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    run_timeout(Command::new(bin()).args(args), Duration::from_secs(20))
}

/// Asserts the refusal format: exit 1, exactly one stderr line `imagecachefs: ...` holding
/// `needle`.
fn assert_refusal((code, out, err): &(i32, String, String), needle: &str) {
    let ctx = format!("exit {code}\nstdout: {out:?}\nstderr: {err:?}");
    assert_eq!(*code, 1, "a refusal exits 1\n{ctx}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "a refusal prints exactly one line on stderr\n{ctx}");
    assert!(lines[0].starts_with("imagecachefs: "), "the line starts with `imagecachefs: `\n{ctx}");
    assert!(lines[0].contains(needle), "the line says {needle:?}\n{ctx}");
}

/// Detaches whatever got mounted at `dir` by a command that should have refused (so a wrong
/// success leaves nothing behind), on drop.
struct DetachAll(PathBuf);

impl Drop for DetachAll {
    fn drop(&mut self) {
        for _ in 0..8 {
            if mounts_at(&self.0).is_empty() {
                break;
            }
            detach(&self.0);
        }
    }
}

#[test]
fn mount_of_a_missing_dir_does_not_exist() {
    let s = Scratch::new();
    let dir = s.path("nope");
    let _guard = DetachAll(dir.clone());
    assert_refusal(&icfs(&["mount".as_ref(), dir.as_os_str()]), "does not exist");
    assert!(!dir.exists(), "the refusal must not create the directory");
}

#[test]
fn mount_of_a_file_is_not_a_directory() {
    let s = Scratch::new();
    let file = s.path("file");
    std::fs::write(&file, b"x").unwrap();
    let _guard = DetachAll(file.clone());
    assert_refusal(&icfs(&["mount".as_ref(), file.as_os_str()]), "is not a directory");
    assert!(mounts_at(&file).is_empty());
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[test]
fn mount_over_a_live_mount_is_already_an_imagecachefs_mount() {
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    let m = Mount::new(&s.base, &[]);
    std::fs::write(s.base.join("f"), b"before").unwrap();
    assert_refusal(&icfs(&["mount".as_ref(), s.base.as_os_str()]), "already an imagecachefs mount");
    assert_eq!(mounts_at(&s.base).len(), 1, "exactly one mount stays at the dir");
    // The first mount is untouched and still serving.
    assert!(is_fuse(&s.base));
    assert_eq!(std::fs::read(s.base.join("f")).unwrap(), b"before");
    // `--background` refuses the same way.
    assert_refusal(
        &icfs(&["mount".as_ref(), s.base.as_os_str(), "--background".as_ref()]),
        "already an imagecachefs mount",
    );
    assert_eq!(mounts_at(&s.base).len(), 1);
    let st = m.stop();
    assert!(st.success(), "daemon exit: {st}");
}

#[test]
fn mount_over_a_dead_mount_is_a_stale_imagecachefs_mount() {
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    let m = Mount::new(&s.base, &[]);
    let stale = m.kill9_leave_stale();
    assert_eq!(mounts_at(&stale.dir).len(), 1, "the dead mount is still attached");
    let e = std::fs::metadata(&s.base).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "a dead FUSE mount answers ENOTCONN");
    assert_refusal(&icfs(&["mount".as_ref(), s.base.as_os_str()]), "stale imagecachefs mount");
    assert_eq!(mounts_at(&s.base).len(), 1, "the refusal changes nothing");
    drop(stale);
    assert!(mounts_at(&s.base).is_empty());
}

#[test]
fn unmount_detaches_a_stale_mount() {
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    std::fs::write(s.path("covered-marker"), b"").unwrap();
    let m = Mount::new(&s.base, &[]);
    let stale = m.kill9_leave_stale();
    let (code, out, err) = icfs(&["unmount".as_ref(), s.base.as_os_str()]);
    assert_eq!(code, 0, "unmount of a stale imagecachefs mount\nstdout: {out}\nstderr: {err}");
    assert!(mounts_at(&stale.dir).is_empty(), "the stale mount is detached");
    assert!(std::fs::metadata(&s.base).unwrap().is_dir());
}

#[test]
fn mount_without_dev_fuse_says_dev_fuse() {
    common::require_tool("unshare");
    common::require_tool("sh");
    common::require_tool("mount");
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    // A private mount namespace whose /dev is an empty tmpfs: no /dev/fuse in there.
    let res = run_timeout(
        Command::new("unshare")
            .args(["-m", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount -t tmpfs none /dev && test ! -e /dev/fuse && exec \"$0\" mount \"$1\"")
            .arg(bin())
            .arg(&s.base),
        Duration::from_secs(20),
    );
    assert_refusal(&res, "/dev/fuse");
    assert!(mounts_at(&s.base).is_empty());
}

#[test]
fn mount_by_an_unprivileged_user_is_not_permitted() {
    common::require_tool("setpriv");
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    let c = CString::new(s.tmp.path().as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::chmod(c.as_ptr(), 0o755) }, 0);
    let b = CString::new(s.base.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::chown(b.as_ptr(), 65534, 65534) }, 0);
    let res = run_timeout(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin())
            .arg("mount")
            .arg(&s.base),
        Duration::from_secs(20),
    );
    assert_refusal(&res, "not permitted");
    assert!(mounts_at(&s.base).is_empty(), "nothing may be mounted");
}

#[test]
fn usage_errors_exit_2() {
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    let d = s.base.as_os_str();
    let cases: Vec<Vec<&std::ffi::OsStr>> = vec![
        vec![],
        vec!["frobnicate".as_ref()],
        vec!["mount".as_ref()],
        vec!["pin".as_ref(), d],
        vec!["mount".as_ref(), d, "--no-such-flag".as_ref()],
        vec!["mount".as_ref(), d, "--threads".as_ref(), "many".as_ref()],
        vec!["mount".as_ref(), d, "--threads".as_ref()],
        vec!["unmount".as_ref()],
        vec!["unmount".as_ref(), d, "extra".as_ref()],
    ];
    for args in cases {
        let (code, out, err) = icfs(&args);
        assert_eq!(code, 2, "{args:?} is a usage error\nstdout: {out}\nstderr: {err}");
        assert!(!err.is_empty(), "{args:?}: usage errors explain themselves on stderr");
        if !args.is_empty() {
            // (With no arguments at all, clap shows the help.)
            assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
            assert!(err.starts_with("imagecachefs: "), "{args:?}: {err}");
        }
        assert!(mounts_at(&s.base).is_empty());
    }
}

#[test]
fn unmount_of_a_plain_dir_is_not_an_imagecachefs_mount() {
    let s = Scratch::new();
    assert_refusal(&icfs(&["unmount".as_ref(), s.base.as_os_str()]), "not an imagecachefs mount");
}

#[test]
fn unmount_of_a_missing_dir_refuses() {
    let s = Scratch::new();
    let (code, out, err) = icfs(&["unmount".as_ref(), s.path("nope").as_os_str()]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("imagecachefs: "), "{err:?}");
}

#[test]
fn unmount_of_a_foreign_mount_is_not_an_imagecachefs_mount() {
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    let t = CString::new(s.base.as_os_str().as_bytes()).unwrap();
    let fstype = CString::new("tmpfs").unwrap();
    let rc =
        unsafe { libc::mount(fstype.as_ptr(), t.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
    std::fs::write(s.base.join("on-tmpfs"), b"x").unwrap();
    assert_refusal(&icfs(&["unmount".as_ref(), s.base.as_os_str()]), "not an imagecachefs mount");
    assert_eq!(mounts_at(&s.base), ["tmpfs"], "the foreign mount stays");
    assert!(s.base.join("on-tmpfs").exists());
}

#[test]
fn background_mount_returns_once_live_and_unmount_stops_it() {
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    let log = s.path("bg.log");
    std::fs::write(s.base.join("covered"), b"covered data").unwrap();
    let (code, out, err) = run_timeout(
        Command::new(bin())
            .arg("mount")
            .arg(&s.base)
            .args(["--background", "--threads", "2", "--log-file"])
            .arg(&log),
        Duration::from_secs(30),
    );
    let pids = daemon_pids(&s.base);
    if code != 0 || !is_fuse(&s.base) {
        kill_daemons(&s.base);
        panic!(
            "mount --background: exit {code}, live={}\nstdout: {out}\nstderr: {err}\nlog: {}",
            is_fuse(&s.base),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    assert_eq!(pids.len(), 1, "one daemon process runs: {pids:?}");
    assert_eq!(std::fs::read(s.base.join("covered")).unwrap(), b"covered data");
    std::fs::write(s.base.join("through"), b"through the mount").unwrap();
    assert!(log.exists(), "--log-file {log:?} is written");
    let (code, out, err) = icfs(&["unmount".as_ref(), s.base.as_os_str()]);
    assert_eq!(code, 0, "unmount\nstdout: {out}\nstderr: {err}");
    assert!(!is_fuse(&s.base), "unmount detaches at once");
    assert!(mounts_at(&s.base).is_empty());
    if !wait_daemons_gone(&s.base, Duration::from_secs(15)) {
        kill_daemons(&s.base);
        panic!("the background daemon did not exit after unmount");
    }
    assert_eq!(std::fs::read(s.base.join("through")).unwrap(), b"through the mount");
}

#[test]
fn background_mount_does_not_hold_the_callers_output_open() {
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    // `$(imagecachefs mount --background ...)` would hang if the daemon kept the pipe open.
    let mut child = Command::new(bin())
        .arg("mount")
        .arg(&s.base)
        .arg("--background")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let Some(status) = wait_timeout(&mut child, Duration::from_secs(30)) else {
        kill_and_reap(&mut child);
        panic!("mount --background did not return");
    };
    let mut stderr = child.stderr.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    // Both pipes must reach EOF soon after the command returned.
    let eof = |fd: i32| {
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let rc = unsafe { libc::poll(&mut p, 1, 5000) };
        rc == 1 && (p.revents & libc::POLLHUP != 0)
    };
    let (err_eof, out_eof) = (eof(stderr.as_raw_fd()), eof(stdout.as_raw_fd()));
    let mut err = String::new();
    if err_eof {
        let _ = stderr.read_to_string(&mut err);
    }
    let (code, _, uerr) = icfs(&["unmount".as_ref(), s.base.as_os_str()]);
    if !wait_daemons_gone(&s.base, Duration::from_secs(15)) {
        kill_daemons(&s.base);
    }
    assert!(status.success(), "mount --background: {status}\nstderr: {err}");
    assert!(err_eof, "the background daemon keeps the caller's stderr open");
    assert!(out_eof, "the background daemon keeps the caller's stdout open");
    assert_eq!(code, 0, "unmount: {uerr}");
}

/// Asserts a usage error: exit 2, exactly one stderr line `imagecachefs: ...` holding `needle`,
/// no clap tip.
fn assert_usage_error((code, out, err): &(i32, String, String), needle: &str) {
    let ctx = format!("exit {code}\nstdout: {out:?}\nstderr: {err:?}");
    assert_eq!(*code, 2, "a usage error exits 2\n{ctx}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "a usage error prints exactly one line on stderr\n{ctx}");
    assert!(lines[0].starts_with("imagecachefs: "), "the line starts with `imagecachefs: `\n{ctx}");
    assert!(lines[0].contains(needle), "the line says {needle:?}\n{ctx}");
    assert!(!err.contains("tip:") && !err.contains("-- -"), "no clap tip\n{ctx}");
}

const MAX_SECS: &str = "315360000";
const AGE_FLAGS: [&str; 5] = [
    "--original-min-age",
    "--resized-min-age",
    "--partial-min-age",
    "--pressure-min-age",
    "--verify-interval",
];

#[test]
fn huge_ages_and_intervals_are_refused_with_one_line() {
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    std::fs::write(s.base.join("0d5e6b61602d758984b3bf038267614d6016eb2a"), b"present").unwrap();
    for flag in AGE_FLAGS {
        for value in ["18446744073709551615", "9223372036854775807", "315360001"] {
            let res = icfs(&["mount".as_ref(), s.base.as_os_str(), flag.as_ref(), value.as_ref()]);
            assert_usage_error(&res, "is not a whole number from 0 to 315360000");
            assert!(res.2.contains(flag), "the line names {flag}: {:?}", res.2);
            assert!(mounts_at(&s.base).is_empty(), "{flag} {value}: nothing may be mounted");
        }
    }
    // The same bound in nova.conf, with the file and line.
    let conf = s.path("nova.conf");
    std::fs::write(
        &conf,
        "[image_cache]\nremove_unused_base_images = False\n\
         remove_unused_original_minimum_age_seconds = 18446744073709551615\n",
    )
    .unwrap();
    let res =
        icfs(&["mount".as_ref(), s.base.as_os_str(), "--nova-conf".as_ref(), conf.as_os_str()]);
    assert_refusal(
        &res,
        &format!("{}:3: remove_unused_original_minimum_age_seconds", conf.display()),
    );
    assert!(res.2.contains("is more than 315360000 seconds"), "{:?}", res.2);
    assert!(mounts_at(&s.base).is_empty());
}

#[test]
fn the_largest_accepted_values_mount_and_survive_a_new_file() {
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    // A file present at the mount (its deadline is computed at start) and one created after.
    let present = "0d5e6b61602d758984b3bf038267614d6016eb2a";
    std::fs::write(s.base.join(present), b"present before the mount").unwrap();
    let mut args: Vec<&str> = Vec::new();
    for flag in AGE_FLAGS {
        args.extend([flag, MAX_SECS]);
    }
    args.extend(["--verify-rate", "1048576", "--min-free", "9223372036854775807"]);
    let m = Mount::new(&s.base, &args);
    let created = "1111111111111111111111111111111111111111";
    std::fs::write(s.base.join(created), b"created through the mount").unwrap();
    let image = |name: &str| {
        std::fs::read_to_string(s.base.join(".imagecache/images").join(name)).unwrap_or_default()
    };
    // The checksum is recorded, then the re-verification and eviction deadlines computed.
    let text = common::wait_until(Duration::from_secs(20), "the new file's sha1", || {
        let t = image(created);
        t.lines().any(|l| l.starts_with("sha1: ") && l != "sha1: pending").then_some(t)
    });
    assert!(text.lines().any(|l| l == "state: idle"), "{text}");
    let evicts_at = text.lines().find_map(|l| l.strip_prefix("evicts_at: ")).unwrap();
    assert!(evicts_at.ends_with('Z') && evicts_at.len() == 20, "a time, ten years away: {text}");
    assert!(image(present).contains("min_age: 315360000"), "{}", image(present));
    assert!(is_fuse(&s.base), "the mount is alive");
    assert_eq!(std::fs::read(s.base.join(created)).unwrap(), b"created through the mount");
    let config = std::fs::read_to_string(s.base.join(".imagecache/config")).unwrap();
    assert!(config.lines().any(|l| l == "verify_interval: 315360000"), "{config}");
    let log = m.log_text();
    assert!(!log.contains("panic"), "{log}");
    let st = m.stop();
    assert!(st.success(), "daemon exit: {st}\n");
}

#[test]
fn negative_values_are_one_line_without_a_tip() {
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    let d = s.base.as_os_str();
    for flag in AGE_FLAGS {
        assert_usage_error(
            &icfs(&["mount".as_ref(), d, flag.as_ref(), "-5".as_ref()]),
            "\"-5\" is not a whole number from 0 to 315360000",
        );
    }
    assert_usage_error(
        &icfs(&["mount".as_ref(), d, "--threads".as_ref(), "-1".as_ref()]),
        "from 1 to 64",
    );
    assert_usage_error(
        &icfs(&["mount".as_ref(), d, "--verify-rate".as_ref(), "-64".as_ref()]),
        "from 0 to 1048576",
    );
    assert_usage_error(
        &icfs(&["mount".as_ref(), d, "--min-free".as_ref(), "-5%".as_ref()]),
        "not a percentage from 0 up to (not including) 100",
    );
    assert_usage_error(
        &icfs(&["mount".as_ref(), d, "--min-free".as_ref(), "200%".as_ref()]),
        "not a percentage from 0 up to (not including) 100",
    );
    assert!(mounts_at(&s.base).is_empty());
}

#[test]
fn status_of_a_missing_dir_does_not_exist() {
    let s = Scratch::new();
    for dir in [s.path("nope"), "/nonexistent-icfs/_base".into()] {
        assert_refusal(&icfs(&["status".as_ref(), dir.as_os_str()]), "does not exist");
        assert_refusal(&icfs(&["unmount".as_ref(), dir.as_os_str()]), "does not exist");
    }
    // A plain directory is still "not an imagecachefs mount".
    assert_refusal(&icfs(&["status".as_ref(), s.base.as_os_str()]), "not an imagecachefs mount");
}

#[test]
fn unmount_by_an_unprivileged_user_needs_root() {
    common::require_tool("setpriv");
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    let c = CString::new(s.tmp.path().as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::chmod(c.as_ptr(), 0o755) }, 0);
    let m = Mount::new(&s.base, &[]);
    let res = run_timeout(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin())
            .arg("unmount")
            .arg(&s.base),
        Duration::from_secs(20),
    );
    assert_refusal(&res, "unmount needs root");
    assert!(!res.2.contains("os error"), "no raw errno: {:?}", res.2);
    assert!(is_fuse(&s.base), "the mount stays");
    assert!(m.stop().success());
}

#[test]
fn a_missing_instances_dir_is_refused() {
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    let missing = s.path("no-instances");
    let res = icfs(&[
        "mount".as_ref(),
        s.base.as_os_str(),
        "--instances-dir".as_ref(),
        missing.as_os_str(),
    ]);
    assert_refusal(&res, &format!("{} (--instances-dir) does not exist", missing.display()));
    assert!(mounts_at(&s.base).is_empty(), "nothing may be mounted");
    assert!(!missing.exists(), "the refusal creates nothing");
    // From nova.conf, the same, naming where it came from.
    let conf = s.path("nova.conf");
    std::fs::write(&conf, format!("[DEFAULT]\ninstances_path = {}\n", missing.display())).unwrap();
    let res =
        icfs(&["mount".as_ref(), s.base.as_os_str(), "--nova-conf".as_ref(), conf.as_os_str()]);
    assert_refusal(&res, "(instances_path in");
    assert!(mounts_at(&s.base).is_empty());
}

#[test]
fn mount_check_prints_the_configuration_and_mounts_nothing() {
    let s = Scratch::new();
    let _guard = DetachAll(s.base.clone());
    let (code, out, err) = icfs(&[
        "mount".as_ref(),
        s.base.as_os_str(),
        "--check".as_ref(),
        "--original-min-age".as_ref(),
        MAX_SECS.as_ref(),
        "--background".as_ref(),
    ]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.lines().any(|l| l == format!("original_min_age: {MAX_SECS}")), "{out}");
    assert!(out.lines().any(|l| l == "resized_min_age: 3600"), "{out}");
    assert!(mounts_at(&s.base).is_empty(), "--check mounts nothing");
    assert!(daemon_pids(&s.base).is_empty(), "--check starts no daemon");
}

/// `mount --check` shows the configuration the daemon would run with, instances directory
/// included (the cache directory's parent by default), as the live `config` does.
#[test]
fn check_shows_the_default_instances_directory() {
    let s = Scratch::new();
    let (code, out, err) = icfs(&["mount".as_ref(), s.base.as_os_str(), "--check".as_ref()]);
    assert_eq!(code, 0, "{err}");
    let want = format!("instances_dir: {}\n", s.tmp.path().display());
    assert!(out.contains(&want), "{out}");
}
