//! Shared harness for the real-mount tests: a scratch directory, an `imagecachefs` daemon
//! mounted over it (a child process, foreground mode, log to a file), a bind mount of the
//! covered directory made before the overlay, polling with a deadline, running commands (with
//! or without a deadline), and [`Proc`], a background process owned by the test.
//!
//! Nothing here skips: a missing `/dev/fuse`, tool or permission fails the test and says so.
#![allow(dead_code)]

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
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

/// Whether `name` is a file in one of the directories of `PATH`.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// Fails with a clear message when an external tool is missing.
pub fn require_tool(name: &str) {
    assert!(on_path(name), "this test needs `{name}` on PATH (install it: see .ci/run)");
}

/// A `Command` for an external tool (C locale, stdin closed), failing (never skipping) when it
/// is missing.
pub fn tool(name: &str) -> Command {
    require_tool(name);
    let mut c = Command::new(name);
    c.env("LC_ALL", "C").env("LANG", "C").stdin(Stdio::null());
    c
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

/// `umount2(dir, MNT_DETACH)`: detaches the top mount at `dir`; false when nothing was.
pub fn detach(dir: &Path) -> bool {
    let t = CString::new(dir.as_os_str().as_bytes()).unwrap();
    unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) == 0 }
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
        detach(&self.target);
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
        Mount::spawn(Path::new(bin()), dir, extra)
    }

    /// As [`Mount::new`], run from the binary `program` (a copy that a test can replace
    /// before `imagecachefs restart`).
    pub fn with_binary(program: &Path, dir: &Path, extra: &[&str]) -> Self {
        Mount::spawn(program, dir, extra)
    }

    fn spawn(program: &Path, dir: &Path, extra: &[&str]) -> Self {
        let log = dir
            .with_file_name(format!("{}.daemon.log", dir.file_name().unwrap().to_string_lossy()));
        Mount::spawn_from(program, dir, extra, log, |_| {}, || is_fuse(dir))
    }

    /// As [`Mount::new`], the daemon's output going to `log` (not next to `dir`: where that
    /// is a shared filesystem, two nodes' daemons would write the same file).
    pub fn with_log(dir: &Path, extra: &[&str], log: PathBuf) -> Self {
        Mount::spawn_with(dir, extra, log, |_| {}, || is_fuse(dir))
    }

    /// As [`Mount::with_log`], the command first handed to `prepare` (to add a `pre_exec`, for
    /// example), and the mount live once `mounted` says so (where `dir` is a FUSE filesystem
    /// already, `is_fuse` would not tell).
    pub fn spawn_with(
        dir: &Path,
        extra: &[&str],
        log: PathBuf,
        prepare: impl FnOnce(&mut Command),
        mounted: impl Fn() -> bool,
    ) -> Self {
        Mount::spawn_from(Path::new(bin()), dir, extra, log, prepare, mounted)
    }

    fn spawn_from(
        program: &Path,
        dir: &Path,
        extra: &[&str],
        log: PathBuf,
        prepare: impl FnOnce(&mut Command),
        mounted: impl Fn() -> bool,
    ) -> Self {
        require_fuse();
        let logf = File::create(&log).unwrap();
        let mut cmd = Command::new(program);
        cmd.arg("mount")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        prepare(&mut cmd);
        let child = cmd.spawn().expect("spawn imagecachefs");
        let mut m = Mount { dir: dir.to_path_buf(), log, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !mounted() {
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

    /// Kills the whole daemon (supervisor and server) with SIGKILL, no cleanup, and detaches
    /// the dead mount: the old "daemon crash".
    pub fn kill9(mut self) {
        self.kill_child();
        detach(&self.dir);
    }

    /// The pid of the server: the supervisor's child (waits up to 5 s for there to be exactly
    /// one, as there is none for a moment after a server died).
    pub fn server_pid(&self) -> u32 {
        let sup = self.pid();
        assert_ne!(sup, 0, "no supervisor process");
        wait_until(
            Duration::from_secs(5),
            "the supervisor's single server child",
            || match children(sup)[..] {
                [one] => Some(one),
                _ => None,
            },
        )
    }

    /// `pid:` of `.imagecache/server`: the server that answered (None when the file cannot
    /// be read or has no such line).
    pub fn status_server_pid(&self) -> Option<u32> {
        server_info(&self.dir)?.get("pid")?.parse().ok()
    }

    /// SIGKILLs the server only (the supervisor keeps the connection) and returns the pid of
    /// its replacement once that one answers through the mount (`.imagecache/server` names
    /// it); 5 s at most.
    pub fn kill_server(&self) -> u32 {
        let old = self.server_pid();
        unsafe { libc::kill(old as i32, libc::SIGKILL) };
        let sup = self.pid();
        let what = format!("a new server to replace the killed server {old}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(p) = self.status_server_pid() {
                if p != old && children(sup).contains(&p) {
                    return p;
                }
            }
            assert!(Instant::now() < deadline, "timed out after 5 s: {what}\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(5));
        }
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
        let st = wait_timeout(&mut c, timeout);
        if st.is_none() {
            kill_and_reap(&mut c);
            detach(&self.dir);
        }
        st
    }

    /// Kills the whole daemon (supervisor and server) with SIGKILL and leaves its dead (stale)
    /// mount in place; the returned guard detaches it on drop.
    pub fn kill9_leave_stale(mut self) -> StaleMount {
        self.kill_child();
        StaleMount { dir: self.dir.clone() }
    }

    /// SIGKILLs the supervisor and its server(s): the supervisor is stopped first so that it
    /// cannot start another server meanwhile; returns once they are gone (5 s at most), so the
    /// mount is dead.
    fn kill_child(&mut self) {
        if let Some(mut c) = self.child.take() {
            let sup = c.id();
            unsafe { libc::kill(sup as i32, libc::SIGSTOP) };
            let servers = children(sup);
            for &p in &servers {
                unsafe { libc::kill(p as i32, libc::SIGKILL) };
            }
            kill_and_reap(&mut c);
            wait_until(Duration::from_secs(5), "the killed servers to be gone", || {
                servers.iter().all(|&p| !alive(p)).then_some(())
            });
        }
    }

    fn stop_inner(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        terminate(&mut c, Duration::from_secs(30)).ok()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.child.is_some() && self.stop_inner().is_none() {
            // Daemon hung: make sure no mount is left behind.
            detach(&self.dir);
        }
    }
}

/// The dead mount of a killed daemon (`ENOTCONN` on access), detached on drop.
pub struct StaleMount {
    pub dir: PathBuf,
}

impl Drop for StaleMount {
    fn drop(&mut self) {
        detach(&self.dir);
    }
}

/// The children of `pid` (of every one of its threads), from `/proc/PID/task/*/children`.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for t in tasks.flatten() {
        let Ok(text) = fs::read_to_string(t.path().join("children")) else { continue };
        out.extend(text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether any thread of process `pid` still runs (has not exited). A killed process's
/// leader can be a zombie while its other threads still exit, and its files are closed only
/// when the last one has: every thread is checked.
pub fn alive(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().any(|t| match fs::read_to_string(t.path().join("stat")) {
        // The state follows the parenthesised command name (which may hold spaces).
        // A zombie leader whose other threads still exit keeps the process's descriptors
        // (a FUSE connection among them) until the last one is gone.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| {
            !rest.starts_with(['Z', 'X'])
                || fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()) > 1
        }),
        Err(_) => false,
    })
}

/// `DIR/.imagecache/server` (`pid`, `started`, `restarts`, `last_restart`) as key → value
/// (None when it cannot be read).
pub fn server_info(dir: &Path) -> Option<std::collections::BTreeMap<String, String>> {
    let text = fs::read_to_string(dir.join(".imagecache/server")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
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

/// Polls `child` until it exits or `timeout` passes; `None` while it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILL and reap (the process may be gone already).
pub fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERM, then waits up to `grace`: `Ok(status)` when the process exited in time, else
/// `Err(status)` after a SIGKILL.
pub fn terminate(child: &mut Child, grace: Duration) -> Result<ExitStatus, ExitStatus> {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    match wait_timeout(child, grace) {
        Some(st) => Ok(st),
        None => {
            let _ = child.kill();
            Err(child.wait().unwrap())
        }
    }
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

/// A Nova-style qcow2 overlay `disk` whose backing file is `base` (absolute, raw).
pub fn overlay(disk: &Path, base: &Path) {
    fs::create_dir_all(disk.parent().unwrap()).unwrap();
    run_ok(
        tool("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(disk),
    );
}

/// Nova's conversion of a downloaded qcow2 to a raw base: `qemu-img convert -t none` (an
/// O_DIRECT target).
pub fn convert_to_raw(qcow2: &Path, raw: &Path) {
    run_ok(
        tool("qemu-img")
            .args(["convert", "-t", "none", "-O", "raw", "-f", "qcow2"])
            .arg(qcow2)
            .arg(raw),
    );
}

/// Runs a command with a deadline (a refusal must not hang), stdin closed and its output in
/// files (a daemon it leaves behind cannot hold a pipe open); returns (code, stdout, stderr).
/// Past the deadline: SIGTERM, SIGKILL 3 s later, and a panic with the output so far.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (out_p, err_p) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_p).unwrap())
        .stderr(File::create(&err_p).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let read = |p: &Path| fs::read_to_string(p).unwrap_or_default();
    let Some(status) = wait_timeout(&mut child, timeout) else {
        let _ = terminate(&mut child, Duration::from_secs(3));
        panic!(
            "{cmd:?} still running after {timeout:?}\nstdout: {}\nstderr: {}",
            read(&out_p),
            read(&err_p)
        );
    };
    (status.code().unwrap_or(-1), read(&out_p), read(&err_p))
}

/// The environment variable that marks a server (the supervisor's child) apart from its
/// supervisor; both have the supervisor's command line.
pub const SERVER_ENV: &str = "IMAGECACHEFS_SERVER";

/// Whether process `pid` is a server (its environment has [`SERVER_ENV`]).
pub fn is_server(pid: i32) -> bool {
    let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else { return false };
    let want = format!("{SERVER_ENV}=");
    env.split(|&b| b == 0).any(|v| v.starts_with(want.as_bytes()))
}

/// Pids of `imagecachefs mount DIR` daemons, one per mount: the supervisors, not their
/// servers (those started with `--background` are not our children).
pub fn daemon_pids(dir: &Path) -> Vec<i32> {
    all_daemon_pids(dir).into_iter().filter(|&p| !is_server(p)).collect()
}

/// Pids of every `imagecachefs mount DIR` process: supervisors and servers.
pub fn all_daemon_pids(dir: &Path) -> Vec<i32> {
    let want = dir.as_os_str().as_bytes();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.len() > 2
            && args[0].ends_with(b"imagecachefs")
            && args[1] == b"mount"
            && args.contains(&want)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Waits up to `timeout` until no `imagecachefs mount DIR` process (supervisor or server) is
/// left; false if one is.
pub fn wait_daemons_gone(dir: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !all_daemon_pids(dir).is_empty() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// SIGKILLs every `imagecachefs mount DIR` process, supervisors and servers (no waiting).
pub fn kill_daemons(dir: &Path) {
    for pid in all_daemon_pids(dir) {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The SplitMix64 step: a fast, reproducible pseudo-random sequence from a seed.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A background process owned by the test, so that none outlives it (a failing test
/// included): dropping it sends SIGTERM, then SIGKILL after 15 s. Its stdout is either
/// collected as lines (for [`Proc::wait_line`]) or, with its stderr, written to a log file
/// that the panics about it show.
pub struct Proc {
    pub what: String,
    log: Option<PathBuf>,
    child: Option<Child>,
    lines: Option<mpsc::Receiver<String>>,
    /// With [`Proc::spawn_stdin_open`]: the write end of its stdin, kept open and empty.
    _stdin: Option<ChildStdin>,
}

impl Proc {
    /// How long SIGTERM has before SIGKILL.
    const GRACE: Duration = Duration::from_secs(15);

    /// Stdin closed, stdout collected for [`Proc::wait_line`], stderr the test's.
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut p = Proc::start(cmd.stdin(Stdio::null()).stdout(Stdio::piped()), None);
        let out = p.child.as_mut().unwrap().stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        p.lines = Some(lines);
        p
    }

    /// Stdin closed, stdout and stderr written to `log`.
    pub fn spawn_logged(cmd: &mut Command, log: PathBuf) -> Self {
        Proc::logged(cmd.stdin(Stdio::null()), log)
    }

    /// As [`Proc::spawn_logged`], but stdin is a pipe that stays open and empty: a tool that
    /// reads commands from it (`qemu-io`) waits, its image open, until it is ended.
    pub fn spawn_stdin_open(cmd: &mut Command, log: PathBuf) -> Self {
        let mut p = Proc::logged(cmd.stdin(Stdio::piped()), log);
        p._stdin = p.child.as_mut().unwrap().stdin.take();
        p
    }

    /// A python3 one-liner run with `args`, as [`Proc::spawn`].
    pub fn python(script: &str, args: &[&Path]) -> Self {
        Proc::spawn(tool("python3").arg("-c").arg(script).args(args))
    }

    fn logged(cmd: &mut Command, log: PathBuf) -> Self {
        let logf = File::create(&log).unwrap_or_else(|e| panic!("create {log:?}: {e}"));
        Proc::start(cmd.stdout(logf.try_clone().unwrap()).stderr(logf), Some(log))
    }

    fn start(cmd: &mut Command, log: Option<PathBuf>) -> Self {
        let what = format!("{cmd:?}");
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        Proc { what, log, child: Some(child), lines: None, _stdin: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// What the process wrote to its log (empty without one).
    pub fn log_text(&self) -> String {
        self.log.as_ref().and_then(|l| fs::read_to_string(l).ok()).unwrap_or_default()
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("{} exited early with {st}:\n{}", self.what, self.log_text());
        }
    }

    /// Waits (15 s at most) for the process to print `want` on a line of its own.
    pub fn wait_line(&mut self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let got = self
                .lines
                .as_ref()
                .expect("wait_line needs Proc::spawn")
                .recv_timeout(Duration::from_millis(50));
            match got {
                Ok(l) if l.trim() == want => return,
                Ok(_) => {}
                Err(_) => self.assert_alive(),
            }
            assert!(Instant::now() < deadline, "{} did not print {want:?}", self.what);
        }
    }

    /// Waits until the process accepts connections on the unix socket `sock`.
    pub fn wait_for_socket(&mut self, sock: &Path) {
        wait_until(Duration::from_secs(15), &format!("{sock:?} to accept"), || {
            self.assert_alive();
            UnixStream::connect(sock).ok().map(drop)
        });
    }

    /// Whether the process has `path` open (as seen in `/proc/PID/fd`).
    pub fn has_open(&self, path: &Path) -> bool {
        let Ok(fds) = fs::read_dir(format!("/proc/{}/fd", self.pid())) else {
            return false;
        };
        fds.flatten().any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l == path))
    }

    /// Waits (up to `timeout`) until the process has `path` open.
    pub fn wait_open(&mut self, path: &Path, timeout: Duration) {
        let what = format!("{} to open {path:?}", self.what);
        wait_until(timeout, &what, || {
            self.assert_alive();
            self.has_open(path).then_some(())
        });
    }

    /// Waits until the process has exec'd `program` and holds `path` open on `fd`.
    pub fn wait_for_exec_holding(&mut self, program: &str, fd: u32, path: &Path) {
        let pid = self.pid();
        wait_until(Duration::from_secs(10), &format!("{program} holding {path:?}"), || {
            self.assert_alive();
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            let link = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
            (comm.trim_end() == program && link == path).then_some(())
        });
    }

    /// SIGTERM, then waits for the exit (SIGKILL and a panic after 15 s); returns its status.
    pub fn terminate(mut self) -> ExitStatus {
        self.terminate_inner()
    }

    /// As [`Proc::terminate`], and the process must exit successfully.
    pub fn stop(mut self) -> ExitStatus {
        let st = self.terminate_inner();
        assert!(st.success(), "{} exited with {st} after SIGTERM:\n{}", self.what, self.log_text());
        st
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
    }

    fn terminate_inner(&mut self) -> ExitStatus {
        let mut c = self.child.take().unwrap();
        terminate(&mut c, Self::GRACE).unwrap_or_else(|_| {
            panic!("{} ignored SIGTERM for {:?}:\n{}", self.what, Self::GRACE, self.log_text())
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = terminate(&mut c, Self::GRACE);
        }
    }
}

/// For [`Proc::python`]: holds a file open for reading until ended.
pub const READER: &str = "import sys,time\nf=open(sys.argv[1],'rb')\nf.read(1)\nprint('ready',flush=True)\ntime.sleep(120)";
/// For [`Proc::python`]: holds a file open for writing (after writing to it) until ended.
pub const WRITER: &str = "import sys,time\nf=open(sys.argv[1],'ab')\nf.write(b'x'*65536)\nf.flush()\nprint('ready',flush=True)\ntime.sleep(120)";
/// For [`Proc::python`]: Nova's lock, `lockf(LOCK_EX)` on `locks/nova-<name>`, held until
/// ended.
pub const LOCKER: &str = "import fcntl,sys,time\nf=open(sys.argv[1],'a')\nfcntl.lockf(f, fcntl.LOCK_EX)\nprint('locked',flush=True)\ntime.sleep(120)";
