//! The scrapeable exporter (`--metrics-listen ADDR:PORT`): `GET /metrics` over HTTP, with the
//! very exposition of `.imagecache/metrics`, for Prometheus to scrape without a textfile
//! collector (`HEAD` too, without the body). Everything else gets 404 (another path) or 405
//! (another method on `/metrics`).
//!
//! Owns one thread, `exporter`, running a single-threaded tokio runtime under hyper's HTTP/1
//! server. It renders from the cache's memory (`Cache::snapshot`, as a non-root reader: at
//! most one rendering a second however often it is asked, see `NON_ROOT_REUSE`) and never
//! touches the mount. What any client can make it do is bounded: [`MAX_CONNECTIONS`] at once
//! (past it the oldest one still sending its request makes room), a request head of at most
//! [`MAX_HEAD`] bytes and [`MAX_HEADERS`] headers, read within [`HEAD_TIMEOUT`], every
//! connection closed after one response or after [`CONNECTION_DEADLINE`], whatever it does. No FUSE worker and no lock
//! holder ever waits on this thread; it waits on the state lock (memory only) and, for at
//! most `SHOWN_REFS_WAIT`, on the instance-disk reader, like any status file.
//!
//! The listener is bound before the mount ([`start`]), so a taken port refuses the mount with
//! one line naming the address. It stops listening before the daemon detaches its own mount
//! (`SIGTERM`, `unmount`: [`let_go`]) or once it sees it detached by someone else, so that the
//! daemon that replaces it can bind the same port while this one still serves its last open
//! files. A server that takes over a live
//! mount after its predecessor died cannot refuse the mount for a taken port: it logs the
//! refusal once and binds as soon as the port is free ([`start_after_takeover`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use log::{error, info, warn};
use tokio::task::AbortHandle;

use crate::cache::{Cache, VFile};
use crate::mount::Refusal;
use crate::status::Reader;

/// Connections served at once. Past it, a new connection takes the place of the oldest one
/// that has not sent its whole request head yet, or is closed at once if all have.
pub const MAX_CONNECTIONS: usize = 32;

/// The largest request head read (hyper's smallest read buffer); a longer one is answered
/// `431` and the connection closed.
pub const MAX_HEAD: usize = 8192;

/// Request headers accepted (a scrape sends about five).
pub const MAX_HEADERS: usize = 32;

/// A client that has not sent its whole request head by then is disconnected.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// No connection lives longer, whatever it does (a reader that never reads the response).
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(15);

/// How often the thread checks that the daemon still owns its mount.
const OWNER_CHECK: Duration = Duration::from_millis(200);

/// The exposition format's content type (text format 0.0.4).
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The listening socket while the exporter thread has it, for [`let_go`]: the thread clears
/// it (under this lock) before it closes the socket, so the descriptor is never another file.
static LISTENING: Mutex<Option<RawFd>> = Mutex::new(None);

/// Set by [`let_go`]: the listener's failing accept is the end, not an error to wait out.
static LET_GO: AtomicBool = AtomicBool::new(false);

/// Stops listening at once, from any thread: called before the daemon detaches its own mount,
/// so that when `imagecachefs unmount` returns (the mount gone from the table) the port is
/// free for the daemon mounted next, even while this one still serves open files. Without it
/// the port was released only at the exporter's next owner check, and a mount started right
/// after the unmount was refused with "Address already in use".
pub fn let_go() {
    let listening = LISTENING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(fd) = *listening {
        LET_GO.store(true, Ordering::SeqCst);
        // A listening TCP socket shut down stops listening: the port can be bound again
        // (the daemon binds with SO_REUSEADDR), and the pending accept wakes with an error.
        // SAFETY: `fd` is the exporter's open listener, not closed while the lock is held.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// Binds `addr` (if given) and serves `/metrics` from `cache` on a thread of its own. Called
/// before the mount: a refusal (the port is taken, the address is not this host's) stops the
/// mount with one line naming the address.
pub fn start(addr: Option<SocketAddr>, cache: &Arc<Cache>) -> Result<(), Refusal> {
    let Some(addr) = addr else { return Ok(()) };
    let listener = TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| Refusal(format!("--metrics-listen {addr}: cannot listen: {e}")))?;
    let cache = cache.clone();
    std::thread::Builder::new()
        .name("exporter".into())
        .spawn(move || serve(listener, addr, cache))
        .map_err(|e| Refusal(format!("--metrics-listen {addr}: starting its thread: {e}")))?;
    Ok(())
}

/// How often a server that took over a live mount tries again to bind a port that was taken.
pub const REBIND_EVERY: Duration = Duration::from_secs(1);

/// As [`start`], for a server that took over a live mount (its predecessor was killed): the
/// mount must not go down for the exporter, and the port may still be held for a moment (by
/// a predecessor whose last threads still exit, or anyone who bound it in between), so a
/// taken port is logged once and tried again every [`REBIND_EVERY`] on the exporter's own
/// thread until it is bound or the daemon no longer owns its mount.
pub fn start_after_takeover(addr: Option<SocketAddr>, cache: &Arc<Cache>) {
    let Some(addr) = addr else { return };
    let cache = cache.clone();
    let spawned = std::thread::Builder::new().name("exporter".into()).spawn(move || {
        let mut logged = false;
        let listener = loop {
            match TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
                Ok(l) => break l,
                Err(e) if !logged => {
                    error!(
                        "--metrics-listen {addr}: cannot listen: {e}; trying again every {}s",
                        REBIND_EVERY.as_secs()
                    );
                    logged = true;
                }
                Err(_) => {}
            }
            std::thread::sleep(REBIND_EVERY);
            if !cache.owns_mount() {
                return;
            }
        };
        serve(listener, addr, cache);
    });
    if let Err(e) = spawned {
        error!("--metrics-listen {addr}: starting its thread: {e}; serving without it");
    }
}

/// The exporter thread: accepts until the daemon no longer owns its mount.
fn serve(listener: TcpListener, addr: SocketAddr, cache: Arc<Cache>) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!("--metrics-listen {addr}: no runtime for the exporter: {e}; not serving");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                error!("--metrics-listen {addr}: {e}; not serving");
                return;
            }
        };
        *LISTENING.lock().unwrap_or_else(|e| e.into_inner()) = Some(listener.as_raw_fd());
        // Forgotten under the lock before the listener is closed, however the loop ends.
        let listener = Forget(Some(listener));
        let listener = listener.0.as_ref().expect("the listener");
        info!("serving metrics at http://{addr}/metrics");
        // Open connections in the order they came, each with "its request head has arrived".
        let mut open: VecDeque<(AbortHandle, Arc<AtomicBool>)> = VecDeque::new();
        let mut check = tokio::time::interval(OWNER_CHECK);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = check.tick() => {
                    if cache.owns_mount() {
                        continue;
                    }
                    info!("--metrics-listen {addr}: closed (this daemon no longer owns the mount)");
                    return;
                }
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(_) if LET_GO.load(Ordering::SeqCst) => {
                    info!("--metrics-listen {addr}: closed (this daemon lets go of its mount)");
                    return;
                }
                Err(e) => {
                    // Out of descriptors, most likely: wait instead of spinning.
                    warn!("--metrics-listen {addr}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            open.retain(|(task, _)| !task.is_finished());
            if open.len() >= MAX_CONNECTIONS {
                // The oldest connection still without a whole request head makes room: a
                // scraper sends its request at once, so holding connections open without one
                // cannot keep a scrape out.
                match open.iter().position(|(_, head)| !head.load(Ordering::Relaxed)) {
                    Some(i) => {
                        if let Some((task, _)) = open.remove(i) {
                            task.abort();
                        }
                    }
                    None => {
                        drop(stream);
                        continue;
                    }
                }
            }
            let head = Arc::new(AtomicBool::new(false));
            let task = tokio::spawn(connection(stream, cache.clone(), head.clone()));
            open.push_back((task.abort_handle(), head));
        }
    });
}

/// Owns the exporter's listener: drops it only once [`LISTENING`] no longer names it.
struct Forget(Option<tokio::net::TcpListener>);

impl Drop for Forget {
    fn drop(&mut self) {
        let mut listening = LISTENING.lock().unwrap_or_else(|e| e.into_inner());
        *listening = None;
        drop(self.0.take());
    }
}

/// Serves one connection: one request, within the bounds of the module comment. `head` is
/// set once the request head has been read.
async fn connection(stream: tokio::net::TcpStream, cache: Arc<Cache>, head: Arc<AtomicBool>) {
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .keep_alive(false)
        .serve_connection(
            hyper_util::rt::TokioIo::new(stream),
            hyper::service::service_fn(move |req| {
                head.store(true, Ordering::Relaxed);
                let cache = cache.clone();
                async move { Ok::<_, Infallible>(respond(&req, &cache)) }
            }),
        );
    // Errors are the clients' (bad requests, hang-ups, timeouts): nothing to log.
    let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
}

/// The answer to one request.
fn respond(req: &Request<Incoming>, cache: &Cache) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "not found: the exporter serves /metrics only\n");
    }
    // HEAD is GET without the body (hyper leaves it out), as every HTTP server must serve it.
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "only GET or HEAD /metrics\n");
        r.headers_mut()
            .insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    // Metrics show nothing withheld from other users: rendered as any reader sees them,
    // which also caps how often a scraper can make the daemon render.
    match cache.snapshot(VFile::Metrics, Reader::Other) {
        Some(snap) => {
            let mut r = Response::new(Full::new(Bytes::copy_from_slice(snap.bytes())));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(CONTENT_TYPE),
            );
            r
        }
        None => reply(StatusCode::SERVICE_UNAVAILABLE, "status files are at their memory cap\n"),
    }
}
