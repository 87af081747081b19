//! Shared harness for the real-mount tests: a scratch directory, an `imagecachefs` daemon
//! mounted over it (a child process, foreground mode, log to a file), a bind mount of the
//! covered directory made before the overlay, and polling with a deadline.
//!
//! Nothing here skips: a missing `/dev/fuse`, tool or permission fails the test and says so.
#![allow(dead_code)]

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_imagecachefs")
}

/// Fails (never skips) when the machine lacks what real-mount tests need.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "real-mount tests need /dev/fuse (load the fuse module)"
    );
    assert_eq!(unsafe { libc::geteuid() }, 0, "real-mount tests need root");
}

/// Fails with a clear message when an external tool is missing.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(found, "this test needs `{name}` on PATH (install it: see .ci/run)");
}

/// Polls `f` until it returns `Some` or the deadline passes; panics with `what` on timeout.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn statfs_type(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_type as i64)
}

pub fn is_fuse(path: &Path) -> bool {
    statfs_type(path) == Some(FUSE_SUPER_MAGIC)
}

/// A scratch tree: `root/_base` is the cache directory, `root/bind` a bind mount of it made
/// before the overlay (the covered files, as an operator would reach them).
pub struct Scratch {
    pub tmp: tempfile::TempDir,
    pub base: PathBuf,
}

impl Scratch {
    pub fn new() -> Self {
        require_fuse();
        let tmp = tempfile::Builder::new().prefix("icfs-test").tempdir().unwrap();
        let base = tmp.path().join("_base");
        std::fs::create_dir(&base).unwrap();
        Scratch { tmp, base }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }
}

/// A bind mount, detached on drop.
pub struct BindMount {
    pub target: PathBuf,
}

impl BindMount {
    pub fn new(src: &Path, target: &Path) -> Self {
        std::fs::create_dir_all(target).unwrap();
        let s = CString::new(src.as_os_str().as_bytes()).unwrap();
        let t = CString::new(target.as_os_str().as_bytes()).unwrap();
        let rc = unsafe {
            libc::mount(s.as_ptr(), t.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null())
        };
        assert_eq!(rc, 0, "bind mount {src:?} -> {target:?}: {}", std::io::Error::last_os_error());
        // Private: on hosts where `/` is a shared mount, the overlay mounted later over `src`
        // would otherwise propagate onto the bind mount and hide the covered files.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                t.as_ptr(),
                std::ptr::null(),
                libc::MS_PRIVATE,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "make {target:?} private: {}", std::io::Error::last_os_error());
        BindMount { target: target.to_path_buf() }
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        let t = CString::new(self.target.as_os_str().as_bytes()).unwrap();
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.target);
    }
}

/// An `imagecachefs mount DIR` daemon running in the foreground as a child process.
/// Dropping it stops the daemon (SIGTERM) and waits for it.
pub struct Mount {
    pub dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Mount {
    /// Mounts over `dir` with extra CLI arguments; returns once the mount is live.
    pub fn new(dir: &Path, extra: &[&str]) -> Self {
        require_fuse();
        let log = dir
            .with_file_name(format!("{}.daemon.log", dir.file_name().unwrap().to_string_lossy()));
        let logf = File::create(&log).unwrap();
        let child = Command::new(bin())
            .arg("mount")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("spawn imagecachefs");
        let mut m = Mount { dir: dir.to_path_buf(), log, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_fuse(dir) {
            if let Some(st) = m.child.as_mut().unwrap().try_wait().unwrap() {
                m.child = None;
                panic!("imagecachefs exited with {st} before mounting:\n{}", m.log_text());
            }
            assert!(Instant::now() < deadline, "mount did not come up:\n{}", m.log_text());
            std::thread::sleep(Duration::from_millis(10));
        }
        m
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends SIGTERM and waits (up to 30 s) for the daemon to exit; returns its status.
    pub fn stop(mut self) -> ExitStatus {
        self.stop_inner().expect("daemon did not exit within 30 s after SIGTERM")
    }

    /// Kills the daemon with SIGKILL (no cleanup) and detaches the dead mount.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let t = CString::new(self.dir.as_os_str().as_bytes()).unwrap();
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }

    /// Sends SIGTERM without waiting: the daemon detaches and may keep serving open handles.
    pub fn signal_term(&self) {
        if let Some(c) = self.child.as_ref() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }

    /// True while the daemon process has not exited (peeks without reaping it).
    pub fn running(&self) -> bool {
        let Some(c) = self.child.as_ref() else {
            return false;
        };
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                c.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        rc == 0 && unsafe { info.si_pid() } == 0
    }

    /// Waits up to `timeout` for the daemon to exit on its own (no signal sent); returns its
    /// status, or `None` after killing it when it did not exit in time.
    pub fn wait_exit(mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                let t = CString::new(self.dir.as_os_str().as_bytes()).unwrap();
                unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the daemon with SIGKILL and leaves its dead (stale) mount in place; the returned
    /// guard detaches it on drop.
    pub fn kill9_leave_stale(mut self) -> StaleMount {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        StaleMount { dir: self.dir.clone() }
    }

    fn stop_inner(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.child.is_some() && self.stop_inner().is_none() {
            // Daemon hung: make sure no mount is left behind.
            let t = CString::new(self.dir.as_os_str().as_bytes()).unwrap();
            unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// The dead mount of a killed daemon (`ENOTCONN` on access), detached on drop.
pub struct StaleMount {
    pub dir: PathBuf,
}

impl Drop for StaleMount {
    fn drop(&mut self) {
        let t = CString::new(self.dir.as_os_str().as_bytes()).unwrap();
        unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    }
}

/// File-system types of the mounts whose mount point is exactly `dir`, bottom first.
pub fn mounts_at(dir: &Path) -> Vec<String> {
    let want = dir.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 2 && f[1] == want).then(|| f[2].to_string())
        })
        .collect()
}

/// Runs a command, returning (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "{cmd:?} failed ({code}):\nstdout: {out}\nstderr: {err}");
    out
}
