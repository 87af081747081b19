//! The supervisor: the process `imagecachefs mount` stays as. It holds the FUSE connection
//! (a duplicate of the `/dev/fuse` fd, never a clone), the covered directory's fd and the
//! journal of what the kernel was told, does no FUSE work itself, and runs the server as its
//! child. A server that dies for any reason is replaced at once by a new one that takes the
//! connection over without `FUSE_INIT` and has the kernel resend what the dead one left
//! unanswered; `imagecachefs restart` replaces the server and the supervisor itself with the
//! binary now on disk. The supervisor never touches a filesystem: it waits on its child, its
//! socket to the server and its signals.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{error, info, warn};

use crate::journal::Journal;

/// In a server: the fds it was given (`sock=N,journal=N[,dev=N,dir=N]`).
pub const SERVER_ENV: &str = "IMAGECACHEFS_SERVER";
/// In a supervisor started by `restart`: the connection it takes over
/// (`dev=N,dir=N,journal=N,restarts=N,died=MS`).
pub const TAKEOVER_ENV: &str = "IMAGECACHEFS_TAKEOVER";
/// In a server that replaced another: `MS CAUSE`, when the other died (ms since the epoch)
/// and why.
pub const LAST_RESTART_ENV: &str = "IMAGECACHEFS_LAST_RESTART";

/// Set (to `1`) by a systemd unit with `FileDescriptorStoreMax=3` or more: the connection's fds
/// are also kept in systemd's fd store, so a new supervisor started by systemd takes over.
pub const FDSTORE_ENV: &str = "IMAGECACHEFS_FDSTORE";
/// The names of the fds in systemd's fd store.
const STORE_NAMES: [&str; 3] = ["imagecachefs-dev", "imagecachefs-dir", "imagecachefs-journal"];

/// Whether the connection's fds go to systemd's fd store too.
pub fn fdstore_enabled() -> bool {
    std::env::var_os(FDSTORE_ENV).is_some_and(|v| v == "1")
        && std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The fds systemd handed back from its store (`LISTEN_FDS`, `LISTEN_FDNAMES`), by name.
fn fds_from_systemd() -> Option<[OwnedFd; 3]> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    if pid != std::process::id() {
        return None;
    }
    let n: usize = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let mut found: [Option<OwnedFd>; 3] = [None, None, None];
    for (i, name) in names.split(':').enumerate().take(n) {
        let Some(fd) = take_fd(3 + i as u64) else { continue };
        if let Some(k) = STORE_NAMES.iter().position(|s| *s == name) {
            found[k] = Some(fd);
        }
    }
    let [Some(dev), Some(dir), Some(journal)] = found else { return None };
    Some([dev, dir, journal])
}

/// Messages on the socket between supervisor and server (one datagram each).
pub const MSG_FDS: &[u8] = b"fds";
pub const MSG_READY: &[u8] = b"ready";
/// `mounted PATH`: where the first server mounted (detached if it dies before it serves).
pub const MSG_MOUNTED: &[u8] = b"mounted ";
/// `mountdev N`: the device number of the mount the first server made (its connection's).
/// A later server compares it with what is mounted at the path: once the mount was
/// detached, whatever is there is another daemon's.
pub const MSG_MOUNT_DEV: &[u8] = b"mountdev ";
pub const MSG_RESTART: &[u8] = b"restart";
/// `keep ID` with an fd: the covered file of node ID, whose data the server serves itself
/// (no passthrough), kept by the supervisor while it is open: a file removed while open is
/// found only through it by the next server.
pub const MSG_KEEP: &[u8] = b"keep ";
/// `drop ID`: node ID's last handle closed.
pub const MSG_DROP: &[u8] = b"drop ";
/// `kept ID` with an fd, to a new server, for each file kept; then [`MSG_KEPT_END`].
pub const MSG_KEPT: &[u8] = b"kept ";
pub const MSG_KEPT_END: &[u8] = b"kept-end";
/// In a supervisor started by `restart`: the files kept, `ID:FD ID:FD ...`.
const KEPT_ENV: &str = "IMAGECACHEFS_KEPT";
/// Sent by a serving server every [`HEARTBEAT`]: a server silent for [`SILENT_MAX`] is hung
/// (stopped, or frozen whole) and is killed, so that a new one serves; the kernel resends
/// what it held. (A server that never sent one, an older binary, is never judged.)
pub const MSG_ALIVE: &[u8] = b"alive";
pub const HEARTBEAT: Duration = Duration::from_secs(1);
pub const SILENT_MAX: Duration = Duration::from_secs(5);
pub const MSG_REFUSED: &[u8] = b"refused ";

/// What a server was given by its supervisor.
#[derive(Debug)]
pub struct ServerFds {
    pub sock: OwnedFd,
    pub journal: OwnedFd,
    /// The connection and covered directory of a mount that is already live (a takeover).
    pub live: Option<(OwnedFd, OwnedFd)>,
    /// When the previous server died (ms since the epoch) and why.
    pub last_restart: Option<(u64, String)>,
    /// The device number of this connection's mount (see [`MSG_MOUNT_DEV`]), when known.
    pub mount_dev: Option<u64>,
}

fn parse_fds(text: &str) -> Vec<(String, u64)> {
    text.split(',')
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

fn get(kv: &[(String, u64)], key: &str) -> Option<u64> {
    kv.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// Takes an fd number handed over by the parent, making it close on exec again.
fn take_fd(n: u64) -> Option<OwnedFd> {
    let fd = RawFd::try_from(n).ok()?;
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return None;
    }
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The fds of a supervised server, if this process is one (read once, at start).
pub fn server_fds() -> Option<ServerFds> {
    let text = std::env::var(SERVER_ENV).ok()?;
    std::env::remove_var(SERVER_ENV);
    let kv = parse_fds(&text);
    let sock = take_fd(get(&kv, "sock")?)?;
    let journal = take_fd(get(&kv, "journal")?)?;
    let live = match (get(&kv, "dev"), get(&kv, "dir")) {
        (Some(d), Some(r)) => Some((take_fd(d)?, take_fd(r)?)),
        _ => None,
    };
    let last_restart = std::env::var(LAST_RESTART_ENV).ok().and_then(|s| {
        let (ms, cause) = s.split_once(' ')?;
        Some((ms.parse().ok()?, cause.to_owned()))
    });
    let mount_dev = get(&kv, "mountdev");
    Some(ServerFds { sock, journal, live, last_restart, mount_dev })
}

/// In a server taking over: the files its supervisor kept (`MSG_KEPT` ... `MSG_KEPT_END`,
/// queued before the server started), by node id; 2 s at most.
pub fn receive_kept(sock: BorrowedFd<'_>) -> HashMap<u64, OwnedFd> {
    let mut kept = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        let Ok(Some((msg, fds))) = recv(sock) else { break };
        if msg == MSG_KEPT_END {
            break;
        }
        if let Some(id) = msg.strip_prefix(MSG_KEPT) {
            let id = std::str::from_utf8(id).ok().and_then(|i| i.parse().ok());
            if let (Some(id), Some(fd)) = (id, fds.into_iter().next()) {
                kept.insert(id, fd);
            }
        }
    }
    kept
}

/// Sends one message, with fds, on a `SOCK_SEQPACKET` socket.
pub fn send(sock: BorrowedFd<'_>, msg: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(raw.as_slice()) as u32) };
    let mut control = vec![0u8; if raw.is_empty() { 0 } else { space as usize }];
    let mut iov = libc::iovec { iov_base: msg.as_ptr() as *mut _, iov_len: msg.len() };
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if !raw.is_empty() {
        hdr.msg_control = control.as_mut_ptr() as *mut _;
        hdr.msg_controllen = control.len();
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&hdr);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(raw.as_slice()) as u32) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr(),
                libc::CMSG_DATA(c) as *mut RawFd,
                raw.len(),
            );
        }
    }
    if unsafe { libc::sendmsg(sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message and its fds; `Ok(None)` at end of stream.
pub fn recv(sock: BorrowedFd<'_>) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; 4096];
    let mut control = vec![0u8; unsafe { libc::CMSG_SPACE(4 * 8) } as usize];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut _, iov_len: buf.len() };
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr() as *mut _;
    hdr.msg_controllen = control.len();
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c) as *const RawFd;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(*p.add(i)));
                }
            }
            c = libc::CMSG_NXTHDR(&hdr, c);
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(n as usize);
    Ok(Some((buf, fds)))
}

fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    if unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What the supervisor runs the server with.
pub struct Plan {
    /// The binary a restart (`imagecachefs restart`) runs: the path this one was started
    /// from, which an upgrade replaces.
    pub exe: PathBuf,
    /// The command line after the program name.
    pub args: Vec<OsString>,
    /// The signals the server's signal thread takes (blocked here, read from a signalfd).
    pub signals: Vec<libc::c_int>,
    /// Names a signal for the log.
    pub signal_name: fn(libc::c_int) -> String,
}

/// The connection a supervisor keeps, and where it is mounted.
struct Held {
    dev: OwnedFd,
    dir: OwnedFd,
    mount_point: Option<PathBuf>,
    /// The mount's device number (see [`MSG_MOUNT_DEV`]).
    mount_dev: Option<u64>,
}

struct Server {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    sock: OwnedFd,
    started: Instant,
    ready: bool,
    /// When its last heartbeat came (none yet: not judged).
    alive: Option<Instant>,
}

/// How a child ended.
enum Ended {
    Exited(i32),
    Killed(libc::c_int, bool),
}

fn describe(e: &Ended, name: fn(libc::c_int) -> String) -> String {
    match e {
        Ended::Exited(c) => format!("exited with status {c}"),
        Ended::Killed(s, core) => {
            format!("killed by {}{}", name(*s), if *core { " (core dumped)" } else { "" })
        }
    }
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Reaps the child behind `pidfd` (it has ended, or `block`: waits for it).
fn reap(pidfd: BorrowedFd<'_>, block: bool) -> Option<Ended> {
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | if block { 0 } else { libc::WNOHANG };
    let rc =
        unsafe { libc::waitid(libc::P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, flags) };
    if rc != 0 || unsafe { info.si_pid() } == 0 {
        return None;
    }
    let status = unsafe { info.si_status() };
    Some(match info.si_code {
        libc::CLD_EXITED => Ended::Exited(status),
        libc::CLD_DUMPED => Ended::Killed(status, true),
        _ => Ended::Killed(status, false),
    })
}

fn signalfd(signals: &[libc::c_int]) -> io::Result<OwnedFd> {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in signals {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn read_signal(fd: BorrowedFd<'_>) -> Option<libc::c_int> {
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            &mut info as *mut _ as *mut libc::c_void,
            std::mem::size_of::<libc::signalfd_siginfo>(),
        )
    };
    (n == std::mem::size_of::<libc::signalfd_siginfo>() as isize).then_some(info.ssi_signo as i32)
}

/// Clears close-on-exec of `fd` in the child being prepared (async-signal-safe).
fn inherit(fd: RawFd) -> io::Result<()> {
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The formats of journal a binary reads (`imagecachefs journal-formats`), within 5 s.
fn formats_of(exe: &Path) -> Result<Vec<u32>, String> {
    let mut child = Command::new(exe)
        .arg("journal-formats")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} did not answer within 5 s", exe.display()));
            }
        }
    }
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut out);
    }
    let formats: Vec<u32> = out.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    if formats.is_empty() {
        return Err(format!(
            "{} does not say which journal formats it reads (an imagecachefs without restart \
             support?)",
            exe.display()
        ));
    }
    Ok(formats)
}

/// Runs the supervisor until the mount ends; returns the exit code. `fresh`: no connection
/// yet (the first server mounts); otherwise this is a supervisor started by `restart`.
pub fn supervise(plan: Plan) -> i32 {
    let mut sup = match Supervisor::start(plan) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("imagecachefs: {e}");
            error!("{e}");
            return 1;
        }
    };
    sup.run()
}

struct Supervisor {
    plan: Plan,
    journal: OwnedFd,
    held: Option<Held>,
    restarts: u64,
    /// When the last server died (ms since the epoch), why, and when it was seen.
    last_death: Option<(u64, String, Instant)>,
    signals: OwnedFd,
    stopping: bool,
    /// Signals already logged as ignored.
    ignored: u128,
    /// Servers that died young in a row (start-up crash loop: restarts slow down).
    quick_deaths: u32,
    /// Covered files of nodes whose data a server serves itself, while open (`MSG_KEEP`).
    kept: HashMap<u64, OwnedFd>,
    /// A server of this connection reported it live once: from then on, a dead server is
    /// replaced (before, its death means the mount did not come up).
    served: bool,
}

impl Supervisor {
    fn start(plan: Plan) -> Result<Supervisor, String> {
        let signals = signalfd(&plan.signals).map_err(|e| format!("signalfd: {e}"))?;
        let mut sup = Supervisor {
            plan,
            journal: Journal::create().map_err(|e| format!("journal memfd: {e}"))?,
            held: None,
            restarts: 0,
            last_death: None,
            signals,
            stopping: false,
            ignored: 0,
            quick_deaths: 0,
            served: false,
            kept: HashMap::new(),
        };
        if let Ok(text) = std::env::var(KEPT_ENV) {
            std::env::remove_var(KEPT_ENV);
            for pair in text.split_whitespace() {
                let parsed = pair.split_once(':').and_then(|(id, fd)| {
                    Some((id.parse::<u64>().ok()?, take_fd(fd.parse().ok()?)?))
                });
                if let Some((id, fd)) = parsed {
                    sup.kept.insert(id, fd);
                }
            }
        }
        if let Ok(text) = std::env::var(TAKEOVER_ENV) {
            std::env::remove_var(TAKEOVER_ENV);
            let kv = parse_fds(&text);
            let fd = |k| get(&kv, k).and_then(take_fd);
            let (Some(dev), Some(dir), Some(journal)) = (fd("dev"), fd("dir"), fd("journal"))
            else {
                return Err(format!("{TAKEOVER_ENV}={text}: the connection's fds are missing"));
            };
            let mount_dev = get(&kv, "mountdev");
            sup.held = Some(Held { dev, dir, mount_point: None, mount_dev });
            sup.served = true;
            sup.journal = journal;
            sup.restarts = get(&kv, "restarts").unwrap_or(0);
            let died = get(&kv, "died").unwrap_or_else(now_ms);
            sup.last_death = Some((died, "restart (upgrade)".into(), Instant::now()));
            info!("supervisor {} took over the connection", std::process::id());
        } else if let Some([dev, dir, journal]) = fds_from_systemd() {
            sup.held = Some(Held { dev, dir, mount_point: None, mount_dev: None });
            sup.journal = journal;
            sup.served = true;
            let cause = "supervisor restarted by systemd (fd store)".to_owned();
            sup.last_death = Some((now_ms(), cause, Instant::now()));
            info!(
                "supervisor {} took over the connection from systemd's fd store",
                std::process::id()
            );
        }
        Ok(sup)
    }

    fn spawn(&mut self) -> io::Result<Server> {
        let (mine, theirs) = socketpair()?;
        let mut spec = format!("sock={},journal={}", theirs.as_raw_fd(), self.journal.as_raw_fd());
        let mut keep = vec![theirs.as_raw_fd(), self.journal.as_raw_fd()];
        if let Some(h) = &self.held {
            spec.push_str(&format!(",dev={},dir={}", h.dev.as_raw_fd(), h.dir.as_raw_fd()));
            keep.extend([h.dev.as_raw_fd(), h.dir.as_raw_fd()]);
            if let Some(d) = h.mount_dev {
                spec.push_str(&format!(",mountdev={d}"));
            }
        }
        // A crash restart runs the very binary this supervisor runs.
        let exe = if self.held.is_some() {
            PathBuf::from("/proc/self/exe")
        } else {
            self.plan.exe.clone()
        };
        let mut cmd = Command::new(exe);
        cmd.arg0(&self.plan.exe).args(&self.plan.args).env(SERVER_ENV, spec);
        match &self.last_death {
            Some((ms, cause, _)) => cmd.env(LAST_RESTART_ENV, format!("{ms} {cause}")),
            None => cmd.env_remove(LAST_RESTART_ENV),
        };
        if self.held.is_some() {
            // Only the first server reports to whoever started the mount.
            cmd.env_remove(crate::run::READY_FD_ENV);
        }
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &keep {
                    inherit(fd)?;
                }
                // The signals stay blocked across exec: one that arrives while the server
                // starts waits for its signal thread instead of killing it.
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let pid = child.id() as libc::pid_t;
        // Reaped through the pidfd, not `Child`.
        drop(child);
        let pidfd = pidfd_open(pid)?;
        drop(theirs);
        if self.held.is_some() {
            // Queued before the server reads anything: it takes them before it serves.
            for (id, fd) in &self.kept {
                let m = format!("{}{id}", String::from_utf8_lossy(MSG_KEPT));
                let _ = send(mine.as_fd(), m.as_bytes(), &[fd.as_fd()]);
            }
            let _ = send(mine.as_fd(), MSG_KEPT_END, &[]);
        }
        Ok(Server { pid, pidfd, sock: mine, started: Instant::now(), ready: false, alive: None })
    }

    fn run(&mut self) -> i32 {
        let mut delay = Duration::ZERO;
        loop {
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            let mut server = match self.spawn() {
                Ok(s) => s,
                Err(e) => {
                    error!("starting the server: {e}");
                    if self.held.is_none() {
                        eprintln!("imagecachefs: starting the server: {e}");
                        return 1;
                    }
                    delay = Duration::from_millis(200);
                    continue;
                }
            };
            // The server has its copy of the readiness pipe: if it dies before it writes,
            // whoever waits there must see the end of it.
            close_ready_fd();
            let ended = self.watch(&mut server);
            let Some(ended) = ended else {
                // `restart`: the server is gone and a new supervisor takes over (the exec
                // failed when this returns).
                continue;
            };
            let cause = describe(&ended, self.plan.signal_name);
            if let Ended::Exited(0) = ended {
                info!("server {} ended with the session; the mount is gone", server.pid);
                if fdstore_enabled() {
                    for name in STORE_NAMES {
                        notify_systemd(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
                    }
                }
                return 0;
            }
            if !self.served {
                // It never served: the mount did not come up (its reason is logged).
                if let Some(h) = self.held.take() {
                    warn!("server {} {cause} before the mount was ready", server.pid);
                    let mount_point = h.mount_point.clone();
                    // Closing the connection first: nothing can wait on it any more.
                    drop(h);
                    if let Some(mp) = mount_point {
                        let _ = crate::mount::detach(&mp);
                    }
                }
                return match ended {
                    Ended::Exited(c) => c,
                    Ended::Killed(..) => 1,
                };
            }
            if self.stopping && !server.ready {
                // Told to stop, and the server that should have stopped the mount died before
                // it served (servers that cannot start): give the mount up rather than
                // restart servers forever while whoever stops us waits.
                error!("server {} {cause} while stopping: giving up the mount", server.pid);
                self.give_up();
                return 1;
            }
            self.restarts += 1;
            let died = now_ms();
            error!(
                "server {} {cause}; starting server #{} on the same connection",
                server.pid,
                self.restarts + 1
            );
            self.last_death = Some((died, cause, Instant::now()));
            self.quick_deaths = if server.started.elapsed() < Duration::from_secs(2) {
                self.quick_deaths + 1
            } else {
                0
            };
            // A server that keeps dying at start (a request that crashes it is resent to the
            // next one): slow down, but never give the mount up.
            delay = match self.quick_deaths {
                0..=3 => Duration::ZERO,
                n => Duration::from_millis(50 << (n - 3).min(4)),
            };
        }
    }

    /// Ends the mount without a server: detaches it where it is known, closes the connection
    /// (requests still waiting on it fail) and takes it out of systemd's fd store.
    fn give_up(&mut self) {
        if let Some(h) = self.held.take() {
            let mount_point = h.mount_point.clone();
            drop(h);
            match mount_point {
                Some(mp) => {
                    if let Err(e) = crate::mount::detach(&mp) {
                        warn!("detaching {}: {e}", mp.display());
                    }
                }
                None => warn!("the mount point is not known here: the dead mount stays"),
            }
        }
        if fdstore_enabled() {
            for name in STORE_NAMES {
                notify_systemd(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
            }
        }
    }

    /// Waits for the server to end (its status), or for a `restart` to hand over (`None`).
    fn watch(&mut self, server: &mut Server) -> Option<Ended> {
        loop {
            let mut pfds = [
                libc::pollfd { fd: server.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: server.sock.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.signals.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            let timeout = if server.alive.is_some() { HEARTBEAT.as_millis() as i32 } else { -1 };
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), 3, timeout) };
            if n < 0 {
                continue;
            }
            if n == 0 {
                // Nothing came in a heartbeat's time (so no heartbeat is waiting unread).
                if let Some(last) = server.alive.filter(|t| t.elapsed() > SILENT_MAX) {
                    error!(
                        "server {} sent no heartbeat for {} ms (stopped or hung): killing it",
                        server.pid,
                        last.elapsed().as_millis()
                    );
                    server.alive = None;
                    unsafe { libc::kill(server.pid, libc::SIGKILL) };
                }
                continue;
            }
            if pfds[2].revents != 0 {
                if let Some(sig) = read_signal(self.signals.as_fd()) {
                    self.on_signal(sig, server);
                }
            }
            if pfds[1].revents & (libc::POLLIN | libc::POLLHUP) != 0 {
                match recv(server.sock.as_fd()) {
                    Ok(Some((msg, fds))) => {
                        if let Some(none) = self.on_message(&msg, fds, server) {
                            return none;
                        }
                    }
                    // The server's end closed: it is ending; the pidfd says how.
                    Ok(None) | Err(_) => {
                        return reap(server.pidfd.as_fd(), true);
                    }
                }
            }
            if pfds[0].revents != 0 {
                // Its messages sent before it died come first.
                while let Ok(Some((msg, fds))) = recv_nonblocking(server.sock.as_fd()) {
                    if let Some(none) = self.on_message(&msg, fds, server) {
                        return none;
                    }
                }
                return reap(server.pidfd.as_fd(), true);
            }
        }
    }

    fn on_signal(&mut self, sig: libc::c_int, server: &Server) {
        match sig {
            libc::SIGTERM | libc::SIGINT => {
                // The server detaches the mount and serves open files until their last close;
                // one still starting is told once it serves.
                self.stopping = true;
                info!("{}: stopping the server {}", (self.plan.signal_name)(sig), server.pid);
                if server.ready {
                    unsafe { libc::kill(server.pid, sig) };
                }
            }
            libc::SIGHUP => {
                let _ = crate::run::reopen_log_file();
                unsafe { libc::kill(server.pid, sig) };
            }
            _ => {
                let bit = 1u128 << (sig as u32 % 128);
                if self.ignored & bit == 0 {
                    self.ignored |= bit;
                    info!(
                        "{}: ignored by the supervisor (SIGTERM and SIGINT stop the mount)",
                        (self.plan.signal_name)(sig)
                    );
                }
            }
        }
    }

    /// Handles one message; `Some(None)`: hand over to a new supervisor failed or was done
    /// (the caller starts a server), `None`: go on watching.
    #[allow(clippy::option_option)]
    fn on_message(
        &mut self,
        msg: &[u8],
        fds: Vec<OwnedFd>,
        server: &mut Server,
    ) -> Option<Option<Ended>> {
        if msg == MSG_FDS {
            let mut it = fds.into_iter();
            if let (Some(dev), Some(dir)) = (it.next(), it.next()) {
                if fdstore_enabled() {
                    let fds = [dev.as_fd(), dir.as_fd(), self.journal.as_fd()];
                    for (name, fd) in STORE_NAMES.iter().zip(fds) {
                        notify_systemd_fds(&format!("FDSTORE=1\nFDNAME={name}"), &[fd]);
                    }
                }
                self.held = Some(Held { dev, dir, mount_point: None, mount_dev: None });
            }
        } else if let Some(path) = msg.strip_prefix(MSG_MOUNTED) {
            if let Some(h) = &mut self.held {
                h.mount_point = Some(PathBuf::from(std::ffi::OsStr::from_bytes(path)));
            }
        } else if let Some(d) = msg.strip_prefix(MSG_MOUNT_DEV) {
            if let (Some(h), Some(d)) =
                (&mut self.held, std::str::from_utf8(d).ok().and_then(|d| d.parse().ok()))
            {
                h.mount_dev = Some(d);
            }
        } else if let Some(id) = msg.strip_prefix(MSG_KEEP) {
            let id = std::str::from_utf8(id).ok().and_then(|i| i.parse().ok());
            if let (Some(id), Some(fd)) = (id, fds.into_iter().next()) {
                self.kept.insert(id, fd);
            }
        } else if let Some(id) = msg.strip_prefix(MSG_DROP) {
            if let Some(id) = std::str::from_utf8(id).ok().and_then(|i| i.parse::<u64>().ok()) {
                self.kept.remove(&id);
            }
        } else if msg == MSG_ALIVE {
            server.alive = Some(Instant::now());
        } else if msg == MSG_READY {
            server.ready = true;
            self.served = true;
            if let Some((_, _, seen)) = &self.last_death {
                info!(
                    "server {} serving, {} ms after its predecessor ended",
                    server.pid,
                    seen.elapsed().as_millis()
                );
            }
            self.quick_deaths = 0;
            notify_systemd("READY=1");
            if self.stopping {
                unsafe { libc::kill(server.pid, libc::SIGTERM) };
            }
        } else if msg == MSG_RESTART {
            match self.check_upgrade() {
                Err(why) => {
                    warn!("restart refused: {why}");
                    let mut m = MSG_REFUSED.to_vec();
                    m.extend_from_slice(why.as_bytes());
                    let _ = send(server.sock.as_fd(), &m, &[]);
                }
                Ok(()) => {
                    info!(
                        "restart: replacing server {} and this supervisor with {}",
                        server.pid,
                        self.plan.exe.display()
                    );
                    unsafe { libc::kill(server.pid, libc::SIGKILL) };
                    let _ = reap(server.pidfd.as_fd(), true);
                    let e = self.exec_successor();
                    error!(
                        "restart: running {} failed ({e}); keeping this binary",
                        self.plan.exe.display()
                    );
                    self.restarts += 1;
                    self.last_death =
                        Some((now_ms(), format!("restart failed: {e}"), Instant::now()));
                    return Some(None);
                }
            }
        }
        None
    }

    fn check_upgrade(&self) -> Result<(), String> {
        let Some(_) = &self.held else { return Err("the mount is not live yet".into()) };
        let format = Journal::format_of(self.journal.as_fd()).map_err(|e| e.to_string())?;
        let reads = formats_of(&self.plan.exe)?;
        if !reads.contains(&format) {
            return Err(format!(
                "{} reads journal formats {reads:?}, the running mount's is {format}: \
                 unmount and mount again to use it",
                self.plan.exe.display()
            ));
        }
        Ok(())
    }

    /// Replaces this process with the binary on disk, handing it the connection; returns
    /// only on failure.
    fn exec_successor(&self) -> io::Error {
        let Some(h) = &self.held else { return io::Error::other("no connection") };
        let mut spec = format!(
            "dev={},dir={},journal={},restarts={},died={}",
            h.dev.as_raw_fd(),
            h.dir.as_raw_fd(),
            self.journal.as_raw_fd(),
            self.restarts + 1,
            now_ms()
        );
        if let Some(d) = h.mount_dev {
            spec.push_str(&format!(",mountdev={d}"));
        }
        for fd in [h.dev.as_raw_fd(), h.dir.as_raw_fd(), self.journal.as_raw_fd()]
            .into_iter()
            .chain(self.kept.values().map(|f| f.as_raw_fd()))
        {
            if let Err(e) = inherit(fd) {
                return e;
            }
        }
        let kept: Vec<String> =
            self.kept.iter().map(|(id, fd)| format!("{id}:{}", fd.as_raw_fd())).collect();
        let cstr = |b: &[u8]| CString::new(b).unwrap_or_default();
        let exe = cstr(self.plan.exe.as_os_str().as_bytes());
        let mut argv = vec![exe.clone()];
        argv.extend(self.plan.args.iter().map(|a| cstr(a.as_bytes())));
        let mut envp: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| k != TAKEOVER_ENV && k != KEPT_ENV && k != crate::run::READY_FD_ENV)
            .map(|(k, v)| {
                let mut b = k.as_bytes().to_vec();
                b.push(b'=');
                b.extend_from_slice(v.as_bytes());
                cstr(&b)
            })
            .collect();
        envp.push(cstr(format!("{TAKEOVER_ENV}={spec}").as_bytes()));
        envp.push(cstr(format!("{KEPT_ENV}={}", kept.join(" ")).as_bytes()));
        let argp: Vec<*const libc::c_char> =
            argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        let envpp: Vec<*const libc::c_char> =
            envp.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        // The signals stay blocked across exec: the new supervisor reads them from its own
        // signalfd, so none is lost or acted on by default in between.
        unsafe { libc::execve(exe.as_ptr(), argp.as_ptr(), envpp.as_ptr()) };
        let e = io::Error::last_os_error();
        for fd in [h.dev.as_raw_fd(), h.dir.as_raw_fd(), self.journal.as_raw_fd()] {
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        e
    }
}

fn recv_nonblocking(sock: BorrowedFd<'_>) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 || pfd.revents & libc::POLLIN == 0 {
        return Ok(None);
    }
    recv(sock)
}

/// Closes the readiness pipe inherited from `mount --background` (the first server has it).
fn close_ready_fd() {
    if let Some(fd) =
        std::env::var(crate::run::READY_FD_ENV).ok().and_then(|s| s.parse::<RawFd>().ok())
    {
        unsafe { libc::close(fd) };
        std::env::remove_var(crate::run::READY_FD_ENV);
    }
}

/// `sd_notify`: one datagram to `$NOTIFY_SOCKET`, when systemd runs us (`Type=notify`).
pub fn notify_systemd(state: &str) {
    notify_systemd_fds(state, &[]);
}

/// `sd_pid_notify_with_fds`: the datagram carries `fds` (`FDSTORE=1`).
fn notify_systemd_fds(state: &str, fds: &[BorrowedFd<'_>]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let b = path.as_bytes();
    let connected = if let Some(abs) = b.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abs).and_then(|a| sock.connect_addr(&a))
    } else {
        sock.connect(Path::new(&path))
    };
    if let Err(e) = connected.and_then(|()| send(sock.as_fd(), state.as_bytes(), fds)) {
        warn!("telling systemd {state:?}: {e}");
    }
}

/// This connection's mount at `mount_point` and its device number, for a server that starts.
/// The first server's is the mount on top, which it just made (told to the supervisor, which
/// hands it to every later server). A later server's is the one with that device: when the
/// mount on top is another (this one was detached, and another daemon mounted the directory),
/// the connection only serves its open files, and the server says so to the cache at once —
/// it never detaches, watches or decides for the other daemon's mount.
pub fn own_mount(
    sock: BorrowedFd<'_>,
    taking_over: bool,
    known: Option<u64>,
    mount_point: &Path,
    cache: &crate::cache::Cache,
) -> (Option<crate::mount::MountInfo>, Option<u64>) {
    let top = crate::mount::top_mount(mount_point);
    let dev_of = |m: &crate::mount::MountInfo| libc::makedev(m.dev.0, m.dev.1);
    match (taking_over, known) {
        (true, Some(d)) => match top {
            Some(m) if dev_of(&m) == d => (Some(m), Some(d)),
            _ => {
                cache.lose_mount(&format!(
                    "the mount at {} is not this connection's (it was detached)",
                    mount_point.display()
                ));
                (None, Some(d))
            }
        },
        // A supervisor restarted from systemd's fd store does not know it: the mount on top.
        (true, None) => {
            let d = top.as_ref().map(dev_of);
            (top, d)
        }
        (false, _) => {
            let d = top.as_ref().map(dev_of);
            if let Some(d) = d {
                let mut m = MSG_MOUNT_DEV.to_vec();
                m.extend_from_slice(d.to_string().as_bytes());
                let _ = send(sock, &m, &[]);
            }
            (top, d)
        }
    }
}

/// In a serving server: tells the supervisor every [`HEARTBEAT`] that the process runs. Only
/// a socket write: nothing it does can hang on a filesystem.
pub fn spawn_heartbeat(sock: std::sync::Arc<OwnedFd>) {
    let spawned = std::thread::Builder::new().name("heartbeat".into()).spawn(move || {
        while send(sock.as_fd(), MSG_ALIVE, &[]).is_ok() {
            std::thread::sleep(HEARTBEAT);
        }
    });
    if let Err(e) = spawned {
        warn!("no heartbeat thread ({e}): a hung server is not replaced");
    }
}
