//! Wiring: logging, the background start, the mount, the FUSE session and signals.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{error, info};

use crate::backing;
use crate::cache::{Cache, Settings};
use crate::clock::SystemClock;
use crate::config::{MountConfig, StorageChoice};
use crate::fs::{OverlayFs, STATUS_DIR};
use crate::fuse::FuseAdapter;
use crate::journal::Journal;
use crate::mount::{self, Refusal};
use crate::supervise::{self, ServerFds};
use crate::sync::Mutex;

/// Set in the daemon started by `--background`: the fd to report readiness on.
pub(crate) const READY_FD_ENV: &str = "IMAGECACHEFS_READY_FD";
/// Set in the daemon started by `--background` (supervisor and servers): it logs to syslog.
const BACKGROUND_ENV: &str = "IMAGECACHEFS_BACKGROUND";

/// Where syslog datagrams go when the daemon runs in the background without `--log-file`
/// (overridable through [`SYSLOG_SOCKET_ENV`], for tests and unusual hosts).
const SYSLOG_SOCKET: &str = "/dev/log";
const SYSLOG_SOCKET_ENV: &str = "IMAGECACHEFS_SYSLOG_SOCKET";

/// The `--log-file` being written, reopened by name on `SIGHUP` (after log rotation).
static LOG_FILE: OnceLock<LogFile> = OnceLock::new();

struct LogFile {
    path: PathBuf,
    // Only the log file itself is written under it; it is swapped, never reopened, under it.
    file: Mutex<File>,
}

/// Opens (or creates, readable by its group, never by others: the daemon runs with umask 0)
/// the log file.
fn open_log(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().create(true).append(true).mode(0o640).open(path)
}

/// The logger's handle on [`LOG_FILE`]: each record is one `write_all`.
struct LogFileWriter(&'static LogFile);

impl Write for LogFileWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.file.lock().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.file.lock().flush()
    }
}

/// Reopens `--log-file` by its name (`SIGHUP`): a rotated-away file is let go, a new one is
/// created. `Ok(None)` when logging goes elsewhere.
pub fn reopen_log_file() -> std::io::Result<Option<&'static Path>> {
    let Some(log) = LOG_FILE.get() else { return Ok(None) };
    // Opened before taking the lock: the path may be anywhere, even on a slow filesystem.
    let fresh = open_log(&log.path)?;
    *log.file.lock() = fresh;
    Ok(Some(&log.path))
}

/// Sends each log record as one syslog datagram (`<PRI>imagecachefs[PID]: message`, which
/// journald and rsyslog both read) to `/dev/log`; nothing is kept when no one listens.
struct SyslogWriter {
    socket: Option<UnixDatagram>,
    path: PathBuf,
    record: Vec<u8>,
}

impl Write for SyslogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // One record is capped (a datagram has a size limit); the rest is dropped.
        let room = 8192usize.saturating_sub(self.record.len());
        self.record.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let record = std::mem::take(&mut self.record);
        let line = record.strip_suffix(b"\n").unwrap_or(&record);
        if line.is_empty() {
            return Ok(());
        }
        if self.socket.is_none() {
            self.socket = UnixDatagram::unbound().ok();
        }
        if let Some(sock) = &self.socket {
            // No syslog daemon: the line is lost, which must not stop the daemon.
            let _ = sock.send_to(line, &self.path);
        }
        Ok(())
    }
}

/// Syslog priority of a record: facility `daemon` (3) and the level's severity.
fn syslog_priority(level: log::Level) -> u8 {
    let severity = match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    };
    3 * 8 + severity
}

/// Whether this process is the daemon started by `mount --background` (its standard streams
/// are `/dev/null`).
pub fn is_background_daemon() -> bool {
    std::env::var_os(BACKGROUND_ENV).is_some()
}

/// Starts the log backend (once; later calls change nothing): `--log-file` if given, else
/// syslog for a background daemon (whose standard error is `/dev/null`), else standard error.
/// Panics are logged too, from then on (see [`log_panic`]).
pub fn init_logging(verbose: u8, log_file: Option<&Path>) -> Result<(), Refusal> {
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if STARTED.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(());
    }
    let level = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    // journald stamps every line itself.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        b.format_timestamp(None);
    }
    if let Some(path) = log_file {
        let f = open_log(path).map_err(|e| Refusal(format!("log file {}: {e}", path.display())))?;
        let log =
            LOG_FILE.get_or_init(|| LogFile { path: path.to_path_buf(), file: Mutex::new(f) });
        b.target(env_logger::Target::Pipe(Box::new(LogFileWriter(log))));
    } else if is_background_daemon() {
        let path = std::env::var_os(SYSLOG_SOCKET_ENV).unwrap_or_else(|| SYSLOG_SOCKET.into());
        let pid = std::process::id();
        b.format(move |buf, record| {
            writeln!(
                buf,
                "<{}>imagecachefs[{pid}]: {}",
                syslog_priority(record.level()),
                record.args()
            )
        });
        b.target(env_logger::Target::Pipe(Box::new(SyslogWriter {
            socket: None,
            path: path.into(),
            record: Vec::new(),
        })));
    }
    if b.try_init().is_ok() {
        STARTED.store(true, std::sync::atomic::Ordering::SeqCst);
        std::panic::set_hook(Box::new(|info| log_panic(info.payload(), info.location())));
    }
    Ok(())
}

/// The panic hook: the message, where, and the thread's name go to the log (error level), so
/// that a panic of a daemon whose standard error is `/dev/null` still leaves a trace.
pub fn log_panic(payload: &(dyn std::any::Any + Send), location: Option<&std::panic::Location>) {
    let thread = std::thread::current();
    let line = panic_line(thread.name(), payload, location);
    // RUST_BACKTRACE still works: the default hook that would print it is replaced.
    let trace = std::backtrace::Backtrace::capture();
    if trace.status() == std::backtrace::BacktraceStatus::Captured {
        error!("{line}\n{trace}");
    } else {
        error!("{line}");
    }
}

/// `panic in thread 'NAME' at FILE:LINE:COL: MESSAGE`.
fn panic_line(
    thread: Option<&str>,
    payload: &(dyn std::any::Any + Send),
    location: Option<&std::panic::Location>,
) -> String {
    let message = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a non-text panic payload)");
    let at = location.map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()));
    format!(
        "panic in thread '{}'{}: {message}",
        thread.unwrap_or("<unnamed>"),
        at.unwrap_or_default()
    )
}

/// `imagecachefs mount`: returns the process exit code.
pub fn mount_command(cfg: MountConfig, verbose: u8) -> i32 {
    let ready = std::env::var(READY_FD_ENV).ok().and_then(|s| s.parse::<i32>().ok());
    if cfg.background && ready.is_none() {
        return start_background(&cfg);
    }
    let Some(fds) = supervise::server_fds() else {
        // This process stays as the supervisor; the server is its child.
        if let Err(r) = init_logging(verbose, cfg.log_file.as_deref()) {
            eprintln!("imagecachefs: {r}");
            return 1;
        }
        let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
        return supervise::supervise(supervise::Plan {
            exe,
            args: std::env::args_os().skip(1).collect(),
            signals: handled_signals(),
            signal_name,
        });
    };
    // A supervised server panics no further than the log: the process ends, its supervisor
    // starts another, and the kernel resends what this one left unanswered.
    std::panic::set_hook(Box::new(|info| {
        log_panic(info.payload(), info.location());
        std::process::abort();
    }));
    // SAFETY: the fd number was handed to us by our parent for this purpose only.
    let mut ready = ready.map(|fd| unsafe { File::from_raw_fd(fd) });
    let result = init_logging(verbose, cfg.log_file.as_deref()).and_then(|()| {
        serve(
            &cfg,
            || {
                if let Some(mut f) = ready.take() {
                    let _ = f.write_all(b"ok\n");
                }
            },
            fds,
        )
    });
    match result {
        Ok(()) => 0,
        Err(r) => {
            eprintln!("imagecachefs: {r}");
            if cfg.log_file.is_some() {
                error!("{r}");
            }
            if let Some(mut f) = ready.take() {
                let _ = writeln!(f, "{r}");
            }
            1
        }
    }
}

/// Said once the mount is live, while a terminal still reads it: a background daemon with no
/// `--log-file` logs to syslog, and where no one listens its log is lost.
fn warn_if_no_syslog(cfg: &MountConfig) {
    if cfg.log_file.is_some() {
        return;
    }
    let socket = std::env::var_os(SYSLOG_SOCKET_ENV).unwrap_or_else(|| SYSLOG_SOCKET.into());
    if std::fs::symlink_metadata(&socket).is_err() {
        eprintln!(
            "imagecachefs: warning: no syslog socket at {}: the daemon's log is lost; give \
             --log-file",
            Path::new(&socket).display()
        );
    }
}

/// Starts the daemon as a detached child and waits until it reports the mount live.
fn start_background(cfg: &MountConfig) -> i32 {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("imagecachefs: pipe: {}", std::io::Error::last_os_error());
        return 1;
    }
    let (rd, wr) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("imagecachefs: cannot find own executable: {e}");
            return 1;
        }
    };
    // The same command line without `--background`; the daemon runs in `/`, so the
    // directory goes as an absolute path.
    let dir = mount::absolute(&cfg.dir).unwrap_or_else(|_| cfg.dir.clone());
    let mut args: Vec<OsString> = Vec::new();
    for a in std::env::args_os().skip(1) {
        if a == "--background" {
            continue;
        }
        args.push(if a == cfg.dir.as_os_str() { dir.clone().into() } else { a });
    }
    let wr_raw = std::os::fd::AsRawFd::as_raw_fd(&wr);
    let mut cmd = Command::new(exe);
    cmd.args(&args)
        .env(READY_FD_ENV, wr_raw.to_string())
        .env(BACKGROUND_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    unsafe {
        cmd.pre_exec(move || {
            // Keep the readiness pipe across exec; leave the caller's session.
            let flags = libc::fcntl(wr_raw, libc::F_GETFD);
            libc::fcntl(wr_raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            libc::setsid();
            Ok(())
        });
    }
    if let Err(e) = cmd.spawn() {
        eprintln!("imagecachefs: starting the daemon: {e}");
        return 1;
    }
    drop(wr);
    let mut msg = String::new();
    let _ = (&rd).take(4096).read_to_string(&mut msg);
    match msg.lines().next() {
        Some("ok") => {
            warn_if_no_syslog(cfg);
            0
        }
        Some(line) => {
            eprintln!("imagecachefs: {line}");
            1
        }
        None => {
            let log = match &cfg.log_file {
                Some(f) => f.display().to_string(),
                None => "syslog".to_owned(),
            };
            eprintln!(
                "imagecachefs: the daemon exited before the mount was ready (its log: {log})"
            );
            1
        }
    }
}

/// Every signal whose default action ends the process, apart from the ones a fault raises
/// (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS, SIGABRT) and the uncatchable ones, plus
/// the terminal stop signals (a stopped daemon hangs every access to the mount): the signal
/// thread takes them all (see [`spawn_signal_thread`]), so a stray `kill -USR1` cannot leave
/// the mount dead. glibc's internal real-time signals (below SIGRTMIN) stay its own.
fn handled_signals() -> Vec<libc::c_int> {
    let mut sigs = vec![
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGPIPE,
        libc::SIGALRM,
        libc::SIGTERM,
        libc::SIGSTKFLT,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        libc::SIGPWR,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
    ];
    sigs.extend(libc::SIGRTMIN()..=libc::SIGRTMAX());
    sigs
}

/// Blocks [`handled_signals`] in this thread and every thread it starts from now on.
fn block_signals() -> libc::sigset_t {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in handled_signals() {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// `SIGUSR1`, `SIGRTMIN+3`, ... for the log.
pub(crate) fn signal_name(sig: libc::c_int) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGSYS => "SIGSYS",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSTKFLT => "SIGSTKFLT",
        libc::SIGVTALRM => "SIGVTALRM",
        libc::SIGPROF => "SIGPROF",
        libc::SIGIO => "SIGIO",
        libc::SIGPWR => "SIGPWR",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGTTIN => "SIGTTIN",
        libc::SIGTTOU => "SIGTTOU",
        s if s >= libc::SIGRTMIN() => return format!("SIGRTMIN+{}", s - libc::SIGRTMIN()),
        s => return format!("signal {s}"),
    };
    name.to_owned()
}

fn raise_fd_limit() {
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn makedev(dev: (u32, u32)) -> u64 {
    libc::makedev(dev.0, dev.1)
}

/// Serves the mount for its supervisor until the kernel ends the session: mounts it first
/// (the first server), or takes over the live connection of a server that ended.
fn serve(cfg: &MountConfig, on_ready: impl FnOnce(), sup: ServerFds) -> Result<(), Refusal> {
    let journal =
        Arc::new(Journal::open(sup.journal.as_fd()).map_err(|e| Refusal(format!("journal: {e}")))?);
    let taking_over = sup.live.is_some();
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| Refusal(format!("dup: {e}")));
    let (dir, dir_fd, dev, prepared) = match sup.live {
        None => {
            let p = crate::setup::prepare(cfg)?;
            (p.dir.clone(), dup(&p.dir_fd)?, dup(&p.dev)?, Some(p))
        }
        Some((dev, dir_fd)) => {
            let dir = mount::absolute(&cfg.dir).unwrap_or_else(|_| cfg.dir.clone());
            (dir, dir_fd, dev, None)
        }
    };
    // Where the mount lands (a symlinked directory's target), resolved before the mount:
    // afterwards resolving it would ask this daemon, which serves nothing yet. (A server
    // taking over reads it from the mount table: the path is this mount.)
    let mount_point = mount::mount_point(&dir);
    // Every path is absolute by now; do not keep the caller's directory busy.
    let _ = std::env::set_current_dir("/");
    if !taking_over && backing::open_path_at(dir_fd.as_fd(), OsStr::new(STATUS_DIR)).is_ok() {
        return Err(Refusal(format!(
            "{} contains a file named {STATUS_DIR}, the name of imagecachefs's status tree: \
             rename it first",
            dir.display()
        )));
    }
    if let Some(sub) = &cfg.nova_subdirectory {
        if !taking_over && dir.file_name().is_some_and(|n| n != sub.as_str()) {
            log::warn!(
                "nova.conf names the image cache subdirectory {sub:?} but {} is mounted: \
                 Nova may be caching images somewhere else",
                dir.display()
            );
        }
    }
    if cfg.nova_scanner_on && !taking_over {
        log::warn!(
            "{}: [image_cache] remove_unused_base_images is not False: Nova's own cache manager \
             will still delete images behind imagecachefs's back; set it to False",
            cfg.nova_conf.as_deref().unwrap_or(Path::new("nova.conf")).display()
        );
    }
    let signals = block_signals();
    // Modes of new files come from the callers (already masked by the kernel).
    unsafe { libc::umask(0) };
    // Few threads and small allocations: one malloc arena per worker thread only holds on
    // to memory (measured: RSS 47 MiB instead of 21 MiB after rendering 10 000 rows).
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    raise_fd_limit();
    warn_request_timeout();
    let (fstype, fs_type) = mount::filesystem_of(dir_fd.as_fd());
    let shared = shared_storage(cfg.storage, &fstype, fs_type);
    if cfg.policy.coordinated && !taking_over {
        crate::shared::check(&dir, shared.as_deref(), &fstype, dir_fd.as_fd()).map_err(Refusal)?;
    }
    if let (Some(kind), false) = (shared.as_ref().filter(|_| !taking_over), cfg.policy.coordinated)
    {
        log::warn!(
            "{} is on shared storage ({kind}): other hosts may use its files, so nothing is \
             evicted (use --storage local if only this host uses it)",
            dir.display()
        );
    }
    let policy = crate::state::Policy { shared: shared.clone(), ..cfg.policy.clone() };
    let instances_dir = instances_dir_of(cfg, &dir);
    let instances_dir_shown = instances_dir.clone();
    let settings = Settings {
        cache_dir: dir.clone(),
        instances_dir,
        min_free: cfg.min_free,
        pressure_min_age: cfg.pressure_min_age,
        verify_interval: cfg.verify_interval,
        verify_rate_mib: cfg.verify_rate_mib,
        own_dev: if taking_over {
            mount::top_mount(&mount_point).map(|m| makedev(m.dev))
        } else {
            None
        },
    };
    // Before the mount: finding pre-mount holders stats /proc/*/fd targets, which must not
    // reach this mount before it is served.
    let root = dir_fd.try_clone().map_err(|e| Refusal(format!("dup: {e}")))?;
    let mut shown_cfg = MountConfig { instances_dir: Some(instances_dir_shown), ..cfg.clone() };
    shown_cfg.policy = policy.clone();
    crate::shared::set_node_name(cfg.node_name.clone());
    let cache = Cache::open(
        root,
        policy,
        Arc::new(SystemClock),
        crate::procfs::ProcRoot::default(),
        settings,
        {
            let mut pairs = shown_cfg.pairs();
            pairs.push(("filesystem".into(), if fstype.is_empty() { "-".into() } else { fstype }));
            pairs
        },
    )
    .map_err(|e| Refusal(format!("reading {}: {e}", dir.display())))?;
    crate::shared::start(&cache, cfg.policy.coordinated.then_some(cfg.shared_quarantine))
        .map_err(Refusal)?;
    match &prepared {
        Some(prepared) => {
            crate::exporter::start(cfg.metrics_listen, &cache)?;
            mount::mount(prepared)?;
            // The supervisor holds the connection from now on: it outlives this server.
            let fds = [dev.as_fd(), dir_fd.as_fd()];
            if let Err(e) = supervise::send(sup.sock.as_fd(), supervise::MSG_FDS, &fds) {
                let _ = mount::detach(&mount_point);
                return Err(Refusal(format!("handing the connection to the supervisor: {e}")));
            }
            let mut m = supervise::MSG_MOUNTED.to_vec();
            m.extend_from_slice(mount_point.as_os_str().as_encoded_bytes());
            let _ = supervise::send(sup.sock.as_fd(), &m, &[]);
        }
        // The mount is live: a listener that cannot start must not take it down.
        None => {
            // A supervisor that took over (restart, fd store) learns where to detach too.
            let mut m = supervise::MSG_MOUNTED.to_vec();
            m.extend_from_slice(mount_point.as_os_str().as_encoded_bytes());
            let _ = supervise::send(sup.sock.as_fd(), &m, &[]);
            crate::exporter::start_after_takeover(cfg.metrics_listen, &cache);
        }
    }
    let fail = |msg: String| {
        if !taking_over {
            let _ = mount::detach(&mount_point);
        }
        Refusal(msg)
    };
    let pt_dev = dev.try_clone().map_err(|e| fail(format!("dup /dev/fuse: {e}")))?;
    let started = SystemTime::now();
    let start = started.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let incarnation = journal.next_incarnation();
    let core = Arc::new(
        OverlayFs::new(dir_fd, cache.clone(), start, incarnation)
            .map_err(|e| fail(format!("{}: {e}", dir.display())))?,
    );
    cache.spawn_persister();
    let mut fuse_cfg = fuser::Config::default();
    fuse_cfg.n_threads = Some(cfg.threads);
    fuse_cfg.acl = fuser::SessionACL::All;
    let session = if taking_over {
        let tables = journal.tables();
        let Some(init) = tables.init else {
            return Err(Refusal("the journal holds no FUSE_INIT result: cannot take over".into()));
        };
        if init.passthrough && cfg.passthrough {
            core.enable_passthrough(crate::passthrough::Passthrough::new(pt_dev));
        }
        let kept = supervise::receive_kept(sup.sock.as_fd());
        let (lost_nodes, lost_handles) = core.restore(&tables, &kept);
        if !lost_handles.is_empty() {
            log::warn!(
                "took over without {} open handle(s) whose files are gone: requests for them \
                 fail",
                lost_handles.len()
            );
        }
        if !lost_nodes.is_empty() {
            // Removed files the kernel still remembers: it asks nothing more of them.
            log::debug!("took over without {} node(s) whose files are gone", lost_nodes.len());
        }
        core.set_journal(journal.clone());
        core.set_keeper(keeper_of(&sup.sock));
        let adapter = FuseAdapter::resumed(core.clone(), fs_type);
        let session = fuser::Session::from_fd_initialized(
            adapter,
            dev,
            fuser::SessionACL::All,
            fuse_cfg,
            fuser::Version(init.major, init.minor),
        );
        // What the dead server read and never answered comes back first.
        if let Err(e) = session.notifier().resend() {
            log::warn!("FUSE_NOTIFY_RESEND: {e}: requests the previous server held may hang");
        }
        info!(
            "took over {} ({} node(s), {} open handle(s))",
            dir.display(),
            tables.nodes.len(),
            tables.opens.len()
        );
        session
    } else {
        core.set_journal(journal.clone());
        core.set_keeper(keeper_of(&sup.sock));
        let adapter = FuseAdapter::new(core.clone(), cfg.passthrough.then_some(pt_dev), fs_type);
        fuser::Session::from_fd(adapter, dev, fuser::SessionACL::All, fuse_cfg)
            .map_err(|e| fail(format!("FUSE handshake on {}: {e}", dir.display())))?
    };
    let (ours, our_dev) =
        supervise::own_mount(sup.sock.as_fd(), taking_over, sup.mount_dev, &mount_point, &cache);
    if let Some(d) = our_dev {
        cache.set_own_dev(d);
    }
    cache.set_passthrough(core.passthrough_enabled());
    cache.set_invalidator(Box::new(crate::fuse::KernelNotifier::spawn(session.notifier())));
    if let Some(m) = &ours {
        spawn_mount_watch(m.id, cache.clone());
    }
    crate::evict::spawn(cache.clone());
    crate::checksums::spawn(cache.clone());
    let last_restart = sup.last_restart.map(|(ms, cause)| {
        let at = UNIX_EPOCH + std::time::Duration::from_millis(ms);
        let duration = SystemTime::now().duration_since(at).unwrap_or_default();
        crate::cache::LastRestart { cause, at, duration }
    });
    let info = crate::cache::ServerInfo {
        pid: std::process::id(),
        started,
        // Servers this connection had before this one (the journal counts them, whoever
        // supervised them).
        restarts: u64::from(incarnation.saturating_sub(1)),
        last_restart,
    };
    let sock = Arc::new(sup.sock);
    let asker = sock.clone();
    cache.set_server(
        info,
        Box::new(move || {
            supervise::send(asker.as_fd(), supervise::MSG_RESTART, &[])
                .map_err(|e| format!("the supervisor is not reachable ({e})"))
        }),
    );
    if taking_over {
        info!("serving {} again", dir.display());
    } else {
        info!(
            "mounted over {} ({} worker threads, passthrough {})",
            dir.display(),
            cfg.threads,
            if core.passthrough_enabled() { "on" } else { "OFF" }
        );
    }
    on_ready();
    let _ = supervise::send(sock.as_fd(), supervise::MSG_READY, &[]);
    supervise::spawn_heartbeat(sock.clone());
    spawn_supervisor_listener(sock, cache.clone());
    spawn_signal_thread(signals, mount_point, our_dev, core.clone(), cache.clone());
    session.run().map_err(|e| Refusal(format!("FUSE session on {}: {e}", dir.display())))?;
    cache.persist();
    info!("session on {} ended; exiting", dir.display());
    Ok(())
}

/// Sends the covered file of a node served by the daemon to the supervisor, which keeps it
/// while it is open (`keep ID`), and tells it when to let go (`drop ID`).
fn keeper_of(sock: &OwnedFd) -> crate::fs::KeepFile {
    let sock = sock.try_clone().ok();
    Box::new(move |id, fd| {
        let Some(sock) = &sock else { return };
        let sent = match fd {
            Some(fd) => {
                let m = [supervise::MSG_KEEP, id.to_string().as_bytes()].concat();
                supervise::send(sock.as_fd(), &m, &[fd])
            }
            None => {
                let m = [supervise::MSG_DROP, id.to_string().as_bytes()].concat();
                supervise::send(sock.as_fd(), &m, &[])
            }
        };
        if let Err(e) = sent {
            log::debug!("keeping node {id} with the supervisor: {e}");
        }
    })
}

/// Reads what the supervisor says (a refused restart); says once if it is gone, since a crash
/// of this server then ends the mount.
fn spawn_supervisor_listener(sock: Arc<OwnedFd>, cache: Arc<Cache>) {
    std::thread::Builder::new()
        .name("supervisor".into())
        .spawn(move || loop {
            match supervise::recv(sock.as_fd()) {
                Ok(Some((msg, _))) => {
                    if let Some(why) = msg.strip_prefix(supervise::MSG_REFUSED) {
                        let why = String::from_utf8_lossy(why).into_owned();
                        cache.restart_refused(&why);
                    }
                }
                Ok(None) | Err(_) if supervise::fdstore_enabled() => {
                    // systemd keeps the connection and starts a supervisor that takes it
                    // over: two servers must never serve one connection.
                    log::warn!(
                        "the supervisor is gone; systemd's fd store keeps the mount: exiting"
                    );
                    cache.persist();
                    std::process::exit(0);
                }
                Ok(None) | Err(_) => {
                    log::warn!(
                        "the supervisor is gone: this server goes on, but if it dies the mount \
                         dies with it"
                    );
                    return;
                }
            }
        })
        .expect("spawn supervisor listener");
}

/// The kernel aborts a connection whose oldest request waits longer than its request timeout
/// (Linux 6.14+), and a server being replaced leaves requests waiting: this mount never asks
/// for a timeout, but the system-wide ones apply all the same.
fn warn_request_timeout() {
    for name in ["default_request_timeout", "max_request_timeout"] {
        let path = format!("/proc/sys/fs/fuse/{name}");
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let secs: u64 = text.trim().parse().unwrap_or(0);
        if secs > 0 {
            log::warn!(
                "{path} is {secs}: the kernel aborts this mount if a server restart ever takes \
                 longer than that (set it to 0)"
            );
        }
    }
}

/// Takes every signal of [`handled_signals`]. SIGTERM/SIGINT detach the mount lazily, once:
/// new opens reach the covered directory, open files are served until their last release,
/// then the session ends. SIGHUP reopens `--log-file` (log rotation). Any other is logged the
/// first time it arrives and otherwise ignored.
fn spawn_signal_thread(
    set: libc::sigset_t,
    dir: std::path::PathBuf,
    dev: Option<u64>,
    core: Arc<OverlayFs>,
    cache: Arc<Cache>,
) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut detached = false;
            // Signals already logged as ignored (bit = number): one line each, however many.
            let mut ignored: u128 = 0;
            loop {
                let mut sig = 0;
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    return;
                }
                if sig == libc::SIGHUP {
                    match reopen_log_file() {
                        Ok(Some(path)) => info!("SIGHUP: reopened the log file {}", path.display()),
                        Ok(None) => info!("SIGHUP: no --log-file to reopen; ignored"),
                        Err(e) => {
                            error!("SIGHUP: reopening the log file: {e}; still writing the old one")
                        }
                    }
                    continue;
                }
                if sig != libc::SIGTERM && sig != libc::SIGINT {
                    let bit = 1u128 << (sig as u32 % 128);
                    if ignored & bit == 0 {
                        ignored |= bit;
                        info!(
                            "{}: ignored (only SIGTERM and SIGINT stop the daemon)",
                            signal_name(sig)
                        );
                    }
                    continue;
                }
                if detached {
                    continue;
                }
                detached = true;
                let sig = signal_name(sig);
                let ours = mount::top_mount(&dir).map(|m| makedev(m.dev));
                if ours.is_none() || ours != dev {
                    info!("{sig}: {} is no longer mounted by this daemon", dir.display());
                    cache.lose_mount("the mount is no longer this daemon's");
                    continue;
                }
                // The port too is free for the next daemon once the mount is gone.
                crate::exporter::let_go();
                // The last state this daemon may write: after the detach another daemon may
                // own the directory.
                cache.persist();
                let detached = mount::detach(&dir);
                cache.lose_mount("the mount was detached");
                match detached {
                    Ok(()) => info!(
                        "{sig}: detached {}; serving {} open handle(s) until their last close",
                        dir.display(),
                        core.open_handles()
                    ),
                    Err(e) => error!("{sig}: detaching {}: {e}", dir.display()),
                }
            }
        })
        .expect("spawn signal thread");
}

/// Watches the mount table (`/proc/self/mountinfo` signals every change with `POLLPRI`) and
/// tells the cache once our mount `id` is gone from it, whoever detached it: a daemon that no
/// longer owns the mount must not decide anything for the directory. Reads only the kernel's
/// mount table.
fn spawn_mount_watch(id: u64, cache: Arc<Cache>) {
    std::thread::Builder::new()
        .name("mounts".into())
        .spawn(move || {
            let Ok(file) = File::open("/proc/self/mountinfo") else {
                error!(
                    "cannot watch /proc/self/mountinfo: a detach by another process goes unseen"
                );
                return;
            };
            let present = || {
                std::fs::read_to_string("/proc/self/mountinfo")
                    .map(|t| mount::parse_mountinfo(&t).iter().any(|m| m.id == id))
                    .unwrap_or(true)
            };
            while cache.owns_mount() {
                if !present() {
                    crate::exporter::let_go();
                    cache.lose_mount("the mount was detached");
                    return;
                }
                let mut pfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&file),
                    events: libc::POLLPRI | libc::POLLERR,
                    revents: 0,
                };
                // A timeout as well, in case a change notification is ever missed.
                unsafe { libc::poll(&mut pfd, 1, 10_000) };
                // Re-arm: the next poll waits for the next change.
                let _ = (&file).read(&mut [0u8; 4096]);
                let _ = std::io::Seek::seek(&mut (&file), std::io::SeekFrom::Start(0));
            }
        })
        .expect("spawn mount watcher");
}

/// `imagecachefs mount DIR --check`: the configuration parsed (flags, nova.conf, bounds,
/// instances directory), printed as the `config` status file would show it; nothing mounted.
pub fn check_command(cfg: &MountConfig) -> i32 {
    let dir = mount::absolute(&cfg.dir).unwrap_or_else(|_| cfg.dir.clone());
    let mut shown = MountConfig { instances_dir: Some(instances_dir_of(cfg, &dir)), ..cfg.clone() };
    // The storage as the mount would find it (nothing is mounted: the directory is looked at
    // as it is).
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap_or_default();
    let (mut fstype, mut magic) = (String::new(), 0);
    if let Ok(fd) = backing::open_dir_path(&c) {
        (fstype, magic) = mount::filesystem_of(fd.as_fd());
    }
    shown.policy.shared = shared_storage(cfg.storage, &fstype, magic);
    if cfg.policy.coordinated {
        // Not probed (that would create the lock directory): the storage kind and mount
        // options are.
        let checked = backing::open_dir_path(&c)
            .map_err(|e| format!("{}: {e}", dir.display()))
            .and_then(|fd| {
                crate::shared::check_options(
                    &dir,
                    shown.policy.shared.as_deref(),
                    &fstype,
                    fd.as_fd(),
                )
            });
        if let Err(e) = checked {
            eprintln!("imagecachefs: {e}");
            return 1;
        }
    }
    let mut pairs = shown.pairs();
    pairs.push(("filesystem".into(), if fstype.is_empty() { "-".into() } else { fstype }));
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(&format!("{k}: {v}\n"));
    }
    let _ = std::io::stdout().write_all(out.as_bytes());
    0
}

/// Whether the cache is on storage other hosts share (its type), as detected or told.
fn shared_storage(choice: StorageChoice, fstype: &str, magic: i64) -> Option<String> {
    match choice {
        StorageChoice::Detect => mount::shared_kind(fstype, magic),
        StorageChoice::Local => None,
        StorageChoice::Shared => Some(mount::shared_kind(fstype, magic).unwrap_or(fstype.into())),
    }
}

/// Where instance directories are: `--instances-dir` (or nova.conf's), else the cache
/// directory's parent (`dir` absolute).
fn instances_dir_of(cfg: &MountConfig, dir: &Path) -> PathBuf {
    cfg.instances_dir
        .clone()
        .unwrap_or_else(|| dir.parent().map(Path::to_path_buf).unwrap_or_else(|| "/".into()))
}

/// `dir` made absolute; a path that does not exist (and is no mount) is refused as such.
fn existing_absolute(dir: &Path) -> Result<PathBuf, String> {
    let missing = || format!("{} does not exist", dir.display());
    let abs = mount::absolute(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => missing(),
        _ => format!("{}: {e}", dir.display()),
    })?;
    // A mount point exists (and looking at it would ask its daemon, which may be hung); a
    // dead mount answers ENOTCONN, not ENOENT: only a real absence is "does not exist".
    if mount::top_mount(&mount::mount_point(&abs)).is_some() {
        return Ok(abs);
    }
    match std::fs::symlink_metadata(&abs) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(missing()),
        _ => Ok(abs),
    }
}

/// `imagecachefs unmount`: returns the process exit code.
pub fn unmount_command(dir: &Path, verbose: u8) -> i32 {
    let _ = init_logging(verbose, None);
    let checked = existing_absolute(dir).and_then(|_| {
        if unsafe { libc::geteuid() } != 0 {
            return Err(format!("unmount needs root (only root may detach {})", dir.display()));
        }
        mount::unmount(dir).map_err(|r| r.to_string())
    });
    match checked {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("imagecachefs: {e}");
            1
        }
    }
}

/// `imagecachefs restart DIR`: asks the mount's supervisor to replace its server and
/// itself with the binary on disk, and waits (10 s at most) until a new server answers.
pub fn restart_command(dir: &Path) -> i32 {
    let fail = |msg: String| {
        eprintln!("imagecachefs: {msg}");
        1
    };
    if unsafe { libc::geteuid() } != 0 {
        return fail("restart needs root (the control file is root-only)".into());
    }
    let sdir = match status_dir(dir) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    // One read gives both (two reads could straddle the replacement).
    let server = || -> Option<(String, String)> {
        let text = std::fs::read_to_string(sdir.join("server")).ok()?;
        let get = |what: &str| {
            text.lines().find_map(|l| l.strip_prefix(what)).map(|v| v.trim().to_owned())
        };
        Some((get("pid:")?, get("started:")?))
    };
    let Some((pid, started)) = server() else {
        return fail(format!("{}: no server information in the status tree", dir.display()));
    };
    let refusals = || {
        std::fs::read_to_string(sdir.join("events"))
            .map(|t| t.lines().filter(|l| l.contains(" restart-refused ")).count())
            .unwrap_or(0)
    };
    let refused_before = refusals();
    let t0 = std::time::Instant::now();
    let written = OpenOptions::new()
        .write(true)
        .open(sdir.join("control"))
        .and_then(|mut f| f.write_all(b"restart\n"));
    if let Err(e) = written {
        return fail(format!("restart {}: {e}", dir.display()));
    }
    let deadline = t0 + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
        if refusals() > refused_before {
            let events = std::fs::read_to_string(sdir.join("events")).unwrap_or_default();
            let why = events
                .lines()
                .rev()
                .find_map(|l| l.split_once(" restart-refused - ").map(|(_, w)| w.to_owned()))
                .unwrap_or_default();
            return fail(format!("restart refused: {why}"));
        }
        if let Some((p, s)) = server() {
            if p != pid || s != started {
                println!(
                    "restarted {}: server {pid} -> {p}, serving after {} ms",
                    dir.display(),
                    t0.elapsed().as_millis()
                );
                return 0;
            }
        }
    }
    fail(format!("{}: no new server answered within 10 s (see the log)", dir.display()))
}

fn status_dir(dir: &Path) -> Result<std::path::PathBuf, String> {
    let abs = existing_absolute(dir)?;
    match mount::probe(&abs) {
        mount::Found::Live => Ok(abs.join(STATUS_DIR)),
        mount::Found::Stale => Err(format!("{} is a stale imagecachefs mount", dir.display())),
        mount::Found::Plain => Err(format!("{} is not an imagecachefs mount", dir.display())),
    }
}

/// `imagecachefs status DIR [--json]`.
pub fn status_command(dir: &Path, json: bool) -> i32 {
    let file = if json { "status.json" } else { "status" };
    match status_dir(dir).and_then(|d| std::fs::read(d.join(file)).map_err(|e| e.to_string())) {
        Ok(bytes) => {
            let _ = std::io::stdout().write_all(&bytes);
            0
        }
        Err(e) => {
            eprintln!("imagecachefs: {e}");
            1
        }
    }
}

/// After `evict`: the daemon tells the kernel the name is gone from a thread of its own,
/// an instant after the command returns; wait (2 s at most) until `stat` says so, so that
/// what follows the command sees `ENOENT`.
fn wait_gone(path: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::fs::symlink_metadata(path).is_ok() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// `imagecachefs pin|unpin|verify|evict DIR NAME`: one line to the control file.
pub fn control_command(dir: &Path, verb: &str, name: &OsStr) -> i32 {
    let shown = name.to_string_lossy();
    let fail = |msg: String| {
        eprintln!("imagecachefs: {msg}");
        1
    };
    let b = name.as_encoded_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&b'\n') {
        return fail(format!("{shown:?} is not a cache file name (no '/', '..' or newline)"));
    }
    if unsafe { libc::geteuid() } != 0 {
        return fail(format!("{verb} needs root (the control file is root-only)"));
    }
    let sdir = match status_dir(dir) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    let mut line = format!("{verb} ").into_bytes();
    line.extend_from_slice(b);
    line.push(b'\n');
    let written = OpenOptions::new()
        .write(true)
        .open(sdir.join("control"))
        .and_then(|mut f| f.write_all(&line));
    let Err(e) = written else {
        if let (Some(dir), "evict") = (sdir.parent(), verb) {
            wait_gone(&dir.join(name));
        }
        return 0;
    };
    let why = match e.raw_os_error() {
        Some(libc::ENOENT) => format!("{} has no cache file named {shown}", dir.display()),
        Some(libc::EBUSY) => {
            // The reason is the newest refusal of this name in `events`.
            let events = std::fs::read_to_string(sdir.join("events")).unwrap_or_default();
            let marker = format!(" eviction-refused {shown} ");
            let why = events
                .lines()
                .rev()
                .find_map(|l| l.split_once(&marker).map(|(_, why)| why.to_string()))
                .unwrap_or_else(|| "needed".into());
            format!("refused: {shown} stays ({why})")
        }
        Some(libc::EINVAL) => format!("{verb} {shown}: refused as invalid"),
        _ => format!("{verb} {shown}: {e}"),
    };
    fail(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every log line, for the panic hook's test.
    struct Capture(std::sync::Mutex<Vec<String>>);

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            self.0.lock().unwrap().push(format!("{} {}", r.level(), r.args()));
        }
        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture(std::sync::Mutex::new(Vec::new()));

    #[test]
    fn the_panic_hook_logs_message_place_and_thread_at_error() {
        assert!(log::set_logger(&CAPTURE).is_ok(), "no other logger in the unit tests");
        log::set_max_level(log::LevelFilter::Trace);
        let here = std::panic::Location::caller();
        std::thread::Builder::new()
            .name("checksum".into())
            .spawn(move || {
                log_panic(&"disk on fire", Some(here));
                log_panic(&String::from("owned message"), None);
            })
            .unwrap()
            .join()
            .unwrap();
        let lines = CAPTURE.0.lock().unwrap().clone();
        let want = format!(
            "ERROR panic in thread 'checksum' at {}:{}:{}: disk on fire",
            here.file(),
            here.line(),
            here.column()
        );
        // The first line of each record (RUST_BACKTRACE may add a trace after it).
        let firsts: Vec<&str> = lines.iter().filter_map(|l| l.lines().next()).collect();
        assert!(firsts.contains(&want.as_str()), "want {want:?} in {lines:?}");
        assert!(firsts.contains(&"ERROR panic in thread 'checksum': owned message"), "{lines:?}");
        assert_eq!(
            panic_line(None, &42u8, None),
            "panic in thread '<unnamed>': (a non-text panic payload)"
        );
    }

    #[test]
    fn syslog_records_carry_the_daemon_facility_and_severity() {
        assert_eq!(syslog_priority(log::Level::Error), 27);
        assert_eq!(syslog_priority(log::Level::Info), 30);
        assert_eq!(syslog_priority(log::Level::Trace), 31);
    }

    #[test]
    fn every_handled_signal_has_a_name() {
        let sigs = handled_signals();
        for s in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGQUIT, libc::SIGHUP, libc::SIGTERM] {
            assert!(sigs.contains(&s), "{s}");
        }
        assert!(!sigs.contains(&libc::SIGSEGV) && !sigs.contains(&libc::SIGKILL));
        assert_eq!(signal_name(libc::SIGUSR1), "SIGUSR1");
        assert_eq!(signal_name(libc::SIGRTMIN() + 3), "SIGRTMIN+3");
    }
}
