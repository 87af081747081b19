//! A real cluster filesystem on one machine, for the shared-storage tests: a one-brick
//! GlusterFS volume served by a private `glusterd` and mounted by two GlusterFS FUSE clients,
//! each standing for a compute node.
//!
//! glusterd refuses bricks on 127.x, and the tests must send no traffic outside loopback and
//! namespaces of their own: every GlusterFS process runs in a network namespace this harness
//! creates (`icfs-gl-<pid>-<seq>-{s,a,b}`), joined to the others by veth pairs with addresses
//! of 10.213.0.0/16 inside those namespaces only (the host's interfaces are never touched).
//! Processes join only the network namespace (`setns(CLONE_NEWNET)` before `exec`, not
//! `ip netns exec`, which also unshares the mount namespace): the client mounts are made in
//! the test's mount namespace, where the `imagecachefs` daemons over them run.
//!
//! ```text
//!   ns a: glusterfs client -> <root>/a  --veth 10.213.1.0/30--+
//!                                                             ns s: glusterd + brick 10.213.0.1
//!   ns b: glusterfs client -> <root>/b  --veth 10.213.2.0/30--+      (on its lo, in ns s only)
//! ```
//!
//! glusterd gets its own working directory, run directory and CLI socket under the scratch
//! directory, so it never meets a system glusterd. The brick is `<root>/brick`: the test
//! reads the truth there (what exists, whatever the clients cache).
//!
//! Tests using it run one at a time (one lock for the whole binary): a cluster costs seconds
//! of CPU. [`Cluster`]'s `Drop` unmounts the clients, kills every process, deletes the
//! namespaces and the brick's log, even when the test panics; a cluster left by a test binary
//! that was killed outright is swept by the next [`Cluster::new`] (namespaces named after a
//! dead pid). Every wait has a deadline and says what did not happen, with the log's tail.
#![allow(dead_code)]

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::common::{
    detach, kill_and_reap, on_path, run_timeout, terminate, wait_until, BindMount, Mount,
};

/// The daemon's lock files, one per cache file, in this directory of `_base` (`--shared`).
pub const LOCK_DIR: &str = ".imagecachefs.locks";

/// The brick's address, on `lo` of the server namespace.
pub const SERVER: &str = "10.213.0.1";
/// How long glusterd, a volume command and a client mount may take to come up.
const START: Duration = Duration::from_secs(30);
/// What a GlusterFS command may take before the test fails instead of hanging.
const COMMAND: Duration = Duration::from_secs(60);
/// Namespace names start with this, then `<pid>-<seq>-<role>`.
const NS_PREFIX: &str = "icfs-gl-";

static SERIAL: Mutex<()> = Mutex::new(());
static SEQ: AtomicU32 = AtomicU32::new(0);

/// Fails (never skips) when a tool the cluster needs is missing.
pub fn require_gluster() {
    for t in ["glusterd", "gluster", "glusterfs", "ip"] {
        assert!(
            on_path(t),
            "the shared-storage tests need `{t}` on PATH: run tests/setup.sh (it installs \
             glusterfs-server, glusterfs-client and iproute2)"
        );
    }
}

/// The last `n` lines of a log file (or why it could not be read).
pub fn tail(path: &Path, n: usize) -> String {
    match fs::read_to_string(path) {
        Ok(t) => {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// `cmd` will run in the network namespace `ns` (and in the test's mount namespace).
fn in_netns<'a>(cmd: &'a mut Command, ns: &str) -> &'a mut Command {
    let path = format!("/run/netns/{ns}");
    let f = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// `ip ARGS` that must succeed within the deadline.
fn ip(args: &[&str]) {
    let (code, out, err) = run_timeout(Command::new("ip").args(args), COMMAND);
    assert_eq!(code, 0, "ip {} failed ({code}): {out}{err}", args.join(" "));
}

/// Pids of the processes whose network namespace is the one at `ns_path`.
fn pids_in_netns(ns_path: &Path) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(want) = fs::metadata(ns_path).map(|m| m.ino()) else {
        return Vec::new();
    };
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == want))
        .collect()
}

/// Whether `pid` runs (a zombie does not).
fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// SIGKILLs the processes in a namespace of ours and deletes it.
fn delete_netns(ns: &str) {
    let path = Path::new("/run/netns").join(ns);
    for pid in pids_in_netns(&path) {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = run_timeout(Command::new("ip").args(["netns", "del", ns]), COMMAND);
}

/// Removes what a test binary killed outright left behind: its namespaces (and processes in
/// them) and its GlusterFS mounts, recognised by the dead pid in their names.
fn sweep_stale() {
    let alive = |pid: &str| pid.parse().is_ok_and(alive);
    if let Ok(dir) = fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(NS_PREFIX) else { continue };
            let pid = rest.split('-').next().unwrap_or_default();
            if !pid.is_empty() && !alive(pid) {
                delete_netns(&name);
            }
        }
    }
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for l in mounts.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if f.len() < 3 || f[2] != "fuse.glusterfs" {
            continue;
        }
        let Some(vol) = f[0].strip_prefix(&format!("{SERVER}:icfs")) else { continue };
        let pid = vol.split('n').next().unwrap_or_default();
        if !pid.is_empty() && !alive(pid) {
            detach(Path::new(&f[1].replace("\\040", " ")));
        }
    }
    // Scratch directories name their owner; the brick's log is named after its directory.
    let Ok(tmp) = fs::read_dir(std::env::temp_dir()) else { return };
    for e in tmp.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("icfs-test-gl") {
            continue;
        }
        let owner = fs::read_to_string(e.path().join("owner")).unwrap_or_default();
        // Never through a mount still there: removal would reach into it.
        let now = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mounted = now.lines().any(|l| l.split(' ').nth(1).is_some_and(|m| m.contains(&name)));
        if !owner.trim().is_empty() && !alive(owner.trim()) && !mounted {
            let _ = fs::remove_dir_all(e.path());
            let _ = fs::remove_file(format!("/var/log/glusterfs/bricks/tmp-{name}-brick.log"));
        }
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// The pid the wrapper of [`isolate`] forwards signals to.
static ISOLATED: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    unsafe { libc::kill(ISOLATED.load(Ordering::Relaxed), sig) };
}

/// Makes `cmd` run in a mount namespace of its own where `machine_id` is bound over
/// `/etc/machine-id`, and as PID 1 of a PID namespace of its own with its own `/proc`.
///
/// Nothing of it reaches the test's namespace: the mounts holding `/etc` (or `/`) and `/proc`
/// are made private there first. Only shared mounts (the node's client mount) pass mounts
/// made below them back to the test. The spawned process is a wrapper: it forwards
/// SIGTERM, SIGINT and SIGHUP to the program and exits as it does; the program dies with it
/// (`PR_SET_PDEATHSIG`), so that a SIGKILL of the wrapper is one of the program.
fn isolate(cmd: &mut Command, machine_id: &Path) {
    let (id_src, id_dst) = (cstr(machine_id), cstr(Path::new("/etc/machine-id")));
    let (root, etc, proc_) =
        (cstr(Path::new("/")), cstr(Path::new("/etc")), cstr(Path::new("/proc")));
    let proc_type = CString::new("proc").unwrap();
    let fail = || Err(std::io::Error::last_os_error());
    unsafe {
        cmd.pre_exec(move || {
            let null = std::ptr::null();
            let private = |p: &CString| {
                libc::mount(null, p.as_ptr(), null, libc::MS_PRIVATE, std::ptr::null())
            };
            if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID) != 0 {
                return fail();
            }
            // `/etc` is a mount point on some hosts, not on others: either will do.
            if (private(&etc) != 0 && private(&root) != 0) || private(&proc_) != 0 {
                return fail();
            }
            if libc::mount(id_src.as_ptr(), id_dst.as_ptr(), null, libc::MS_BIND, std::ptr::null())
                != 0
            {
                return fail();
            }
            let pid = libc::fork();
            if pid < 0 {
                return fail();
            }
            if pid == 0 {
                // PID 1 of the new namespace: the program, with a `/proc` of it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                if libc::mount(
                    proc_type.as_ptr(),
                    proc_.as_ptr(),
                    proc_type.as_ptr(),
                    flags,
                    std::ptr::null(),
                ) != 0
                {
                    return fail();
                }
                return Ok(());
            }
            // The wrapper: forwards signals, waits, exits as the program did. It closes every
            // descriptor but stdio first: `spawn` waits for its report pipe to close at exec,
            // which the wrapper never does.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            ISOLATED.store(pid, Ordering::Relaxed);
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = forward as extern "C" fn(libc::c_int) as usize;
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaction(sig, &act, std::ptr::null_mut());
            }
            let mut status = 0;
            loop {
                let r = libc::waitpid(pid, &mut status, 0);
                if r == pid {
                    break;
                }
                if r < 0 && *libc::__errno_location() != libc::EINTR {
                    libc::_exit(127);
                }
            }
            if libc::WIFEXITED(status) {
                libc::_exit(libc::WEXITSTATUS(status));
            }
            libc::_exit(128 + libc::WTERMSIG(status));
        });
    }
}

/// One GlusterFS FUSE client: a compute node's view of the shared instances directory.
pub struct Node {
    /// `a` or `b`.
    pub name: &'static str,
    /// Its network namespace.
    pub ns: String,
    /// The client mount: the shared instances directory as this node sees it.
    pub mnt: PathBuf,
    /// `<mnt>/_base`: the shared cache directory, where imagecachefs mounts on this node.
    pub base: PathBuf,
    /// A bind mount of the client mount made before any imagecachefs mount (private, so
    /// none reaches it): this node's GlusterFS view of `_base` without imagecachefs, where
    /// the lock files can be looked at.
    pub raw: PathBuf,
    /// This node's own instances directory (local, not on the volume): its stopped
    /// instances' disks.
    pub instances: PathBuf,
    /// Where this node's daemon and client write their logs (local).
    pub logs: PathBuf,
    client: Mutex<Option<Child>>,
}

impl Node {
    /// The client's log file.
    pub fn client_log(&self) -> PathBuf {
        self.logs.join("glusterfs-client.log")
    }

    /// The file `name` of the shared cache directory, as this node sees it.
    pub fn at(&self, name: &str) -> PathBuf {
        self.base.join(name)
    }

    /// Starts imagecachefs over this node's `_base` (its log and instances directory are
    /// this node's own) with extra flags; returns once the mount is live.
    ///
    /// Both nodes run on one machine; a daemon must not see the other node for what it is
    /// not: each runs in namespaces of its own ([`isolate`]): a mount namespace where a file
    /// of this node's is bound over `/etc/machine-id` (which names a node's own files on
    /// shared storage), and a PID namespace with its own `/proc` (a daemon walks `/proc` for
    /// processes holding its files, and would find the other node's holders through the
    /// other node's mount). Processes outside it reach the daemon only through its mount, as
    /// on a real node. Its FUSE mount still reaches the test's namespace: the client mount
    /// under it is made a shared mount.
    pub fn mount(&self, extra: &[&str]) -> Mount {
        let mut args = vec!["--instances-dir", self.instances.to_str().unwrap()];
        args.extend_from_slice(extra);
        let id_file = self.logs.join("machine-id");
        fs::write(&id_file, format!("{}\n", self.machine_id())).unwrap();
        let mnt = cstr(&self.mnt);
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                mnt.as_ptr(),
                std::ptr::null(),
                libc::MS_SHARED,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "make {:?} shared: {}", self.mnt, std::io::Error::last_os_error());
        let prepare = move |cmd: &mut Command| isolate(cmd, &id_file);
        let base = self.base.clone();
        let mounted =
            move || crate::common::mounts_at(&base).pop().as_deref() == Some("fuse.imagecachefs");
        let host_id = fs::read_to_string("/etc/machine-id").ok();
        let m = Mount::spawn_with(
            &self.base,
            &args,
            self.logs.join("imagecachefs.log"),
            prepare,
            mounted,
        );
        assert_eq!(
            fs::read_to_string("/etc/machine-id").ok(),
            host_id,
            "node {}'s machine id leaked into the test's mount namespace",
            self.name
        );
        m
    }

    /// Whether some open file description holds a lock on byte 0 of `name`'s lock file, as
    /// this node's GlusterFS client reports it (`F_OFD_GETLK` for a write lock: a shared
    /// lock of any node's daemon, or an evictor's); `None` while there is no lock file.
    pub fn lock_held(&self, name: &str) -> Option<bool> {
        let path = self.raw.join("_base").join(LOCK_DIR).join(name);
        let f = File::open(&path).ok()?;
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_len = 1;
        let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        assert_eq!(rc, 0, "F_OFD_GETLK on {path:?}: {}", std::io::Error::last_os_error());
        Some(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    /// The machine id this node's daemon sees.
    pub fn machine_id(&self) -> String {
        format!("1c5{:029x}", self.name.as_bytes()[0])
    }

    /// `.imagecache/images/NAME` through this node's mount, if it can be read.
    pub fn status(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.base.join(".imagecache/images").join(name)).ok()
    }

    /// A file of this node's status tree (`config`, `events`, `metrics`, ...).
    pub fn status_file(&self, file: &str) -> String {
        let p = self.base.join(".imagecache").join(file);
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {p:?} on node {}: {e}", self.name))
    }

    /// The client process's pid, while it runs.
    pub fn client_pid(&self) -> Option<u32> {
        self.client.lock().unwrap().as_ref().map(|c| c.id())
    }

    /// SIGKILLs this node's GlusterFS client (the node dies as the brick sees it: the TCP
    /// connection closes) and detaches its dead mount.
    pub fn kill_client(&self) {
        if let Some(mut c) = self.client.lock().unwrap().take() {
            kill_and_reap(&mut c);
        }
        detach(&self.mnt);
    }
}

/// Options of a cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// `network.ping-timeout` and `server.tcp-user-timeout`, seconds: how long the brick keeps
    /// the locks of a client it cannot reach (GlusterFS's default is 42).
    pub timeout_secs: u32,
    /// `client.strict-locks`: a client that lost its locks while cut off gets `EBADFD` on
    /// their fds after the partition heals, instead of fds silently reopened without them.
    /// Off by default, as GlusterFS ships it and as the study advises until it is tried with
    /// QEMU (whose own lock-holding descriptors would fail after a heal too); the daemon
    /// notices a cut by its lock checks during the cut either way (measured).
    pub strict_locks: bool,
    /// The clients' `--enable-ino32`: 32-bit inode numbers. Off by default, as GlusterFS
    /// ships it: its own inode numbers are the low 64 bits of the file's GFID (a version-4
    /// UUID), with the top bit always set, which imagecachefs maps to node ids of its own.
    pub ino32: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { timeout_secs: 5, strict_locks: false, ino32: false }
    }
}

/// The volume, its server and two client nodes; everything is torn down on drop.
pub struct Cluster {
    pub root: PathBuf,
    pub volume: String,
    pub brick: PathBuf,
    pub a: Node,
    pub b: Node,
    pub opts: Options,
    ns_server: String,
    namespaces: Vec<String>,
    glusterd: Option<Child>,
    glusterd_log: PathBuf,
    sock: PathBuf,
    run_dir: PathBuf,
    // Dropped after everything above is torn down (fields drop in order, after `drop`).
    raws: Vec<BindMount>,
    tmp: Option<tempfile::TempDir>,
    _serial: MutexGuard<'static, ()>,
}

impl Cluster {
    /// A running volume with `_base` in its root, mounted by nodes `a` and `b`.
    pub fn new(opts: Options) -> Self {
        crate::common::require_fuse();
        require_gluster();
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        sweep_stale();
        let tmp = tempfile::Builder::new().prefix("icfs-test-gl").tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        fs::write(root.join("owner"), std::process::id().to_string()).unwrap();
        let (pid, seq) = (std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let ns = |role: &str| format!("{NS_PREFIX}{pid}-{seq}-{role}");
        let node = |name: &'static str| {
            let logs = root.join(format!("node-{name}"));
            let instances = logs.join("instances");
            fs::create_dir_all(&instances).unwrap();
            let mnt = root.join(name);
            fs::create_dir_all(&mnt).unwrap();
            Node {
                name,
                ns: ns(name),
                base: mnt.join("_base"),
                raw: root.join(format!("{name}-raw")),
                mnt,
                instances,
                logs,
                client: Mutex::new(None),
            }
        };
        let (a, b) = (node("a"), node("b"));
        let mut c = Cluster {
            volume: format!("icfs{pid}n{seq}"),
            brick: root.join("brick"),
            ns_server: ns("s"),
            namespaces: Vec::new(),
            glusterd: None,
            glusterd_log: root.join("glusterd.log"),
            sock: root.join("run/glusterd.socket"),
            run_dir: root.join("run"),
            root,
            a,
            b,
            opts,
            raws: Vec::new(),
            tmp: Some(tmp),
            _serial: serial,
        };
        c.network();
        c.start_glusterd();
        c.create_volume();
        c.mount_client(0);
        c.mount_client(1);
        fs::create_dir(&c.a.base).unwrap_or_else(|e| panic!("mkdir {:?}: {e}", c.a.base));
        let b_base = c.b.base.clone();
        wait_until(START, "node b to see _base made by node a", || b_base.is_dir().then_some(()));
        for i in 0..2 {
            let n = c.nodes()[i];
            let raw = BindMount::new(&n.mnt, &n.raw);
            c.raws.push(raw);
        }
        c
    }

    pub fn nodes(&self) -> [&Node; 2] {
        [&self.a, &self.b]
    }

    /// The real file `name` of the shared cache directory, on the brick (what exists,
    /// whatever a client caches).
    pub fn real(&self, name: &str) -> PathBuf {
        self.brick.join("_base").join(name)
    }

    /// Whether `name` is gone from the brick.
    pub fn gone(&self, name: &str) -> bool {
        matches!(fs::symlink_metadata(self.real(name)), Err(e) if e.raw_os_error() == Some(libc::ENOENT))
    }

    /// Three namespaces; a veth pair from the server's to each client's.
    fn network(&mut self) {
        for ns in [&self.ns_server, &self.a.ns, &self.b.ns] {
            ip(&["netns", "add", ns]);
            self.namespaces.push(ns.clone());
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let s = self.ns_server.clone();
        ip(&["-n", &s, "addr", "add", &format!("{SERVER}/32"), "dev", "lo"]);
        for (i, n) in [&self.a, &self.b].into_iter().enumerate() {
            let link = format!("to-{}", n.name);
            let (srv, cli) = (format!("10.213.{}.1", i + 1), format!("10.213.{}.2", i + 1));
            ip(&[
                "-n", &s, "link", "add", &link, "type", "veth", "peer", "name", "to-srv", "netns",
                &n.ns,
            ]);
            ip(&["-n", &s, "addr", "add", &format!("{srv}/30"), "dev", &link]);
            ip(&["-n", &s, "link", "set", &link, "up"]);
            ip(&["-n", &n.ns, "addr", "add", &format!("{cli}/30"), "dev", "to-srv"]);
            ip(&["-n", &n.ns, "link", "set", "to-srv", "up"]);
            ip(&["-n", &n.ns, "route", "add", &format!("{SERVER}/32"), "via", &srv]);
        }
    }

    /// `gluster ARGS` through this cluster's glusterd; (code, stdout+stderr).
    pub fn gluster(&self, args: &[&str]) -> (i32, String) {
        let mut cmd = Command::new("gluster");
        cmd.arg("--mode=script")
            .arg(format!("--glusterd-sock={}", self.sock.display()))
            .arg(format!("--log-file={}", self.root.join("cli.log").display()))
            .args(args)
            .env("LC_ALL", "C");
        let (code, out, err) = run_timeout(in_netns(&mut cmd, &self.ns_server), COMMAND);
        (code, format!("{out}{err}"))
    }

    fn gluster_ok(&self, args: &[&str]) {
        let (code, out) = self.gluster(args);
        assert_eq!(
            code,
            0,
            "gluster {} failed ({code}): {out}\nglusterd log:\n{}",
            args.join(" "),
            tail(&self.glusterd_log, 20)
        );
    }

    fn start_glusterd(&mut self) {
        let work = self.root.join("glusterd");
        fs::create_dir_all(&work).unwrap();
        fs::create_dir_all(&self.run_dir).unwrap();
        let vol = self.root.join("glusterd.vol");
        fs::write(
            &vol,
            format!(
                "volume management\n    type mgmt/glusterd\n    option working-directory {}\n    \
                 option run-directory {}\n    option glusterd-sockfile {}\n    \
                 option transport-type socket\n    option transport.socket.listen-port 24007\n    \
                 option transport.socket.read-fail-log off\n    option ping-timeout 0\n    \
                 option event-threads 1\nend-volume\n",
                work.display(),
                self.run_dir.display(),
                self.sock.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new("glusterd");
        cmd.arg("-N")
            .arg("-f")
            .arg(&vol)
            .arg("-p")
            .arg(self.root.join("glusterd.pid"))
            .arg("-l")
            .arg(&self.glusterd_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(self.root.join("glusterd.stderr")).unwrap());
        let child = in_netns(&mut cmd, &self.ns_server)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn glusterd: {e}"));
        self.glusterd = Some(child);
        let deadline = Instant::now() + START;
        loop {
            if let Some(st) = self.glusterd.as_mut().unwrap().try_wait().unwrap() {
                self.glusterd = None;
                panic!(
                    "glusterd exited with {st} at start: {}\n{}",
                    tail(&self.root.join("glusterd.stderr"), 10),
                    tail(&self.glusterd_log, 20)
                );
            }
            if self.sock.exists() && self.gluster(&["volume", "list"]).0 == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "glusterd did not start within {START:?}: {}",
                tail(&self.glusterd_log, 20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn create_volume(&self) {
        fs::create_dir_all(&self.brick).unwrap();
        let brick = format!("{SERVER}:{}", self.brick.display());
        // `force`: the brick is on the root filesystem, which glusterd otherwise refuses.
        self.gluster_ok(&["volume", "create", &self.volume, &brick, "force"]);
        let t = self.opts.timeout_secs.to_string();
        let strict = if self.opts.strict_locks { "on" } else { "off" };
        for (k, v) in [
            ("network.ping-timeout", t.as_str()),
            ("server.tcp-user-timeout", t.as_str()),
            ("server.keepalive-time", "2"),
            ("server.keepalive-interval", "1"),
            ("server.keepalive-count", "2"),
            ("client.strict-locks", strict),
        ] {
            self.gluster_ok(&["volume", "set", &self.volume, k, v]);
        }
        self.gluster_ok(&["volume", "start", &self.volume]);
    }

    fn mount_client(&self, i: usize) {
        let n = self.nodes()[i];
        let mut cmd = Command::new("glusterfs");
        cmd.arg("-N")
            .arg(format!("--volfile-server={SERVER}"))
            .arg(format!("--volfile-id={}", self.volume))
            .arg(format!("--log-file={}", n.client_log().display()))
            .args(self.opts.ino32.then_some("--enable-ino32"))
            .arg(&n.mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = in_netns(&mut cmd, &n.ns)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn glusterfs client: {e}"));
        *n.client.lock().unwrap() = Some(child);
        let deadline = Instant::now() + START;
        loop {
            if let Some(st) = n.client.lock().unwrap().as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "glusterfs client of node {} exited with {st}: {}",
                    n.name,
                    tail(&n.client_log(), 20)
                );
            }
            let mounted = crate::common::mounts_at(&n.mnt).iter().any(|t| t == "fuse.glusterfs");
            // Mounted is not connected: the brick answers once a listing succeeds.
            if mounted && fs::read_dir(&n.mnt).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the glusterfs client of node {} did not mount within {START:?}: {}",
                n.name,
                tail(&n.client_log(), 20)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Cuts `n` off the server: its end of the veth pair goes down (its client and its
    /// processes keep running; the brick drops them after `timeout_secs`).
    pub fn partition(&self, n: &Node) {
        ip(&["-n", &n.ns, "link", "set", "to-srv", "down"]);
    }

    /// Undoes [`Cluster::partition`] (the route went with the link).
    pub fn heal(&self, n: &Node) {
        ip(&["-n", &n.ns, "link", "set", "to-srv", "up"]);
        let srv = if n.name == "a" { "10.213.1.1" } else { "10.213.2.1" };
        ip(&["-n", &n.ns, "route", "replace", &format!("{SERVER}/32"), "via", srv]);
    }

    /// The brick process's pid, from glusterd's pid file for it.
    fn brick_pid(&self) -> Option<i32> {
        let dir = self.run_dir.join("vols").join(&self.volume);
        fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .find_map(|e| fs::read_to_string(e.path()).ok()?.trim().parse().ok())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Clients first (detached, so that nothing waits on a dead mount), then the brick,
        // glusterd, and every process left in the namespaces.
        self.raws.clear();
        for n in [&self.a, &self.b] {
            detach(&n.mnt);
            if let Some(mut c) = n.client.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = terminate(&mut c, Duration::from_secs(5));
            }
        }
        let brick_pid = self.brick_pid();
        // The brick daemonised itself: its socket and log are where glusterd put them, named
        // in its command line.
        let brick_args: Vec<String> = brick_pid
            .and_then(|p| fs::read(format!("/proc/{p}/cmdline")).ok())
            .map(|c| {
                c.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
            })
            .unwrap_or_default();
        if let Some(p) = brick_pid {
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        if let Some(mut g) = self.glusterd.take() {
            let _ = terminate(&mut g, Duration::from_secs(5));
        }
        for ns in &self.namespaces {
            delete_netns(ns);
        }
        if let Some(p) = brick_pid {
            // Reaped by init: wait (bounded) so that its files are closed before removal.
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(p) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for w in brick_args.windows(2) {
            if w[0] == "-S" || w[0] == "-l" {
                let _ = fs::remove_file(&w[1]);
            }
        }
        drop(self.tmp.take());
    }
}
