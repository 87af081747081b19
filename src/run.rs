//! Wiring: logging, the background start, the mount, the FUSE session and signals.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{error, info};

use crate::config::MountConfig;
use crate::fs::OverlayFs;
use crate::fuse::FuseAdapter;
use crate::mount::{self, Refusal};

/// Set in the daemon started by `--background`: the fd to report readiness on.
const READY_FD_ENV: &str = "IMAGECACHEFS_READY_FD";

/// Names in the cache directory that belong to imagecachefs itself.
pub const RESERVED: &[&str] = &[".imagecache"];

fn init_logging(verbose: u8, log_file: Option<&Path>) -> Result<(), Refusal> {
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
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Refusal(format!("log file {}: {e}", path.display())))?;
        b.target(env_logger::Target::Pipe(Box::new(f)));
    }
    let _ = b.try_init();
    Ok(())
}

/// `imagecachefs mount`: returns the process exit code.
pub fn mount_command(cfg: MountConfig, verbose: u8) -> i32 {
    let ready = std::env::var(READY_FD_ENV).ok().and_then(|s| s.parse::<i32>().ok());
    if cfg.background && ready.is_none() {
        return start_background(&cfg, verbose);
    }
    // SAFETY: the fd number was handed to us by our parent for this purpose only.
    let mut ready = ready.map(|fd| unsafe { File::from_raw_fd(fd) });
    let result = init_logging(verbose, cfg.log_file.as_deref()).and_then(|()| {
        serve(&cfg, || {
            if let Some(mut f) = ready.take() {
                let _ = f.write_all(b"ok\n");
            }
        })
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

/// Starts the daemon as a detached child and waits until it reports the mount live.
fn start_background(cfg: &MountConfig, verbose: u8) -> i32 {
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
    // The daemon runs in `/`: hand it the directory as an absolute path.
    let dir = mount::absolute(&cfg.dir).unwrap_or_else(|_| cfg.dir.clone());
    let mut args: Vec<OsString> = vec!["mount".into(), dir.into()];
    args.extend(["--threads".into(), cfg.threads.to_string().into()]);
    if let Some(f) = &cfg.log_file {
        args.extend(["--log-file".into(), f.clone().into()]);
    }
    for _ in 0..verbose {
        args.push("-v".into());
    }
    let wr_raw = std::os::fd::AsRawFd::as_raw_fd(&wr);
    let mut cmd = Command::new(exe);
    cmd.args(&args)
        .env(READY_FD_ENV, wr_raw.to_string())
        .current_dir("/")
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
        Some("ok") => 0,
        Some(line) => {
            eprintln!("imagecachefs: {line}");
            1
        }
        None => {
            eprintln!("imagecachefs: the daemon exited before the mount was ready");
            1
        }
    }
}

fn block_signals() -> libc::sigset_t {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
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

/// Mounts, serves until the kernel ends the session, and returns.
fn serve(cfg: &MountConfig, on_ready: impl FnOnce()) -> Result<(), Refusal> {
    let prepared = mount::prepare(&cfg.dir)?;
    let dir = prepared.dir.clone();
    let signals = block_signals();
    // Modes of new files come from the callers (already masked by the kernel).
    unsafe { libc::umask(0) };
    raise_fd_limit();
    let fs_type = mount::covered_fs_type(&prepared);
    mount::mount(&prepared)?;
    let fail = |msg: String| {
        let _ = mount::detach(&dir);
        Refusal(msg)
    };
    let mount::Prepared { dir_fd, dev, .. } = prepared;
    let pt_dev = dev.try_clone().map_err(|e| fail(format!("dup /dev/fuse: {e}")))?;
    let start = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let reserved = RESERVED.iter().map(OsString::from).collect();
    let core = Arc::new(
        OverlayFs::new(dir_fd, reserved, start)
            .map_err(|e| fail(format!("{}: {e}", dir.display())))?,
    );
    let adapter = FuseAdapter::new(core.clone(), pt_dev, fs_type);
    let mut fuse_cfg = fuser::Config::default();
    fuse_cfg.n_threads = Some(cfg.threads);
    fuse_cfg.acl = fuser::SessionACL::All;
    let session = fuser::Session::from_fd(adapter, dev, fuser::SessionACL::All, fuse_cfg)
        .map_err(|e| fail(format!("FUSE handshake on {}: {e}", dir.display())))?;
    let our_dev = mount::top_mount(&dir).map(|m| makedev(m.dev));
    info!(
        "mounted over {} ({} worker threads, passthrough {})",
        dir.display(),
        cfg.threads,
        if core.passthrough_enabled() { "on" } else { "OFF" }
    );
    on_ready();
    spawn_signal_thread(signals, dir.clone(), our_dev, core.clone());
    session.run().map_err(|e| Refusal(format!("FUSE session on {}: {e}", dir.display())))?;
    info!("session on {} ended; exiting", dir.display());
    Ok(())
}

/// Waits for SIGTERM/SIGINT and detaches the mount lazily, once: new opens reach the covered
/// directory, open files are served until their last release, then the session ends.
fn spawn_signal_thread(
    set: libc::sigset_t,
    dir: std::path::PathBuf,
    dev: Option<u64>,
    core: Arc<OverlayFs>,
) {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut detached = false;
            loop {
                let mut sig = 0;
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    return;
                }
                if sig == libc::SIGHUP || detached {
                    continue;
                }
                detached = true;
                let ours = mount::top_mount(&dir).map(|m| makedev(m.dev));
                if ours.is_none() || ours != dev {
                    info!("signal {sig}: {} is no longer mounted by this daemon", dir.display());
                    continue;
                }
                match mount::detach(&dir) {
                    Ok(()) => info!(
                        "signal {sig}: detached {}; serving {} open handle(s) until their last close",
                        dir.display(),
                        core.open_handles()
                    ),
                    Err(e) => error!("signal {sig}: detaching {}: {e}", dir.display()),
                }
            }
        })
        .expect("spawn signal thread");
}

/// `imagecachefs unmount`: returns the process exit code.
pub fn unmount_command(dir: &Path, verbose: u8) -> i32 {
    let _ = init_logging(verbose, None);
    match mount::unmount(dir) {
        Ok(()) => 0,
        Err(r) => {
            eprintln!("imagecachefs: {r}");
            1
        }
    }
}
