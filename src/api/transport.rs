//! Connections, owned here rather than left to tonic's server: a cap on open connections (an idle
//! one is closed to make room), a deadline for a new connection's first request, an idle timeout,
//! a maximum connection age that closes *gracefully* (GOAWAY, the calls in flight finish, then the
//! connection closes; tonic's own option cut connections off without a GOAWAY), HTTP/2 keepalive
//! and stream limits, and shutdown in two steps (GOAWAY to everyone, then close what is left). The
//! gRPC port speaks HTTP/2 only; the metrics port HTTP/1.1 only, with a header-read timeout.
//! Open, refused and server-closed connections are counted per listener.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tower::Service;

use crate::metrics;
use crate::security::ConnInfo;
use crate::security::tls::{self, Alpn, Io, Tls};

/// How one listener's connections are limited and closed.
#[derive(Debug, Clone)]
pub struct ConnectionPolicy {
    /// `grpc` or `http`: the `listener` label of the connection metrics.
    pub listener: &'static str,
    /// Most connections open at once. At the cap, the connection idle the longest is closed to
    /// make room; with none idle, the new connection is refused (closed at once).
    pub max_connections: usize,
    /// A new connection must start its first request within this time.
    pub first_request_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// A connection older than this is asked to go away (GOAWAY); its calls in flight finish.
    pub max_age: Option<Duration>,
    /// How long calls in flight get after a GOAWAY (age, eviction, shutdown) before the
    /// connection is closed regardless.
    pub grace: Duration,
    /// HTTP/2 PING interval and how long to wait for its answer (dead peers are dropped).
    pub keepalive: Option<(Duration, Duration)>,
    /// Most concurrent HTTP/2 streams (calls) per connection.
    pub max_concurrent_streams: u32,
    /// Largest header block (request metadata) HTTP/2 accepts before it must tear the whole
    /// connection down; calls over `--max-metadata-bytes` but under this are refused one by one.
    pub max_header_list_size: u32,
    /// HTTP/1: time to read a request's headers.
    pub header_read_timeout: Duration,
}

/// What the server asks of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Serve.
    Running,
    /// Stop accepting; send every connection a GOAWAY and let its calls finish.
    Graceful,
    /// Close every connection now.
    Now,
}

/// Requests in flight on one connection, and since when it has had none.
#[derive(Default)]
struct Activity {
    active: AtomicUsize,
    requests: AtomicU64,
    /// Nanoseconds since `epoch()` when `active` last changed.
    last_change: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    Instant::now().duration_since(epoch()).as_nanos() as u64
}

impl Activity {
    fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.last_change.store(now_ns(), Ordering::SeqCst);
        ActiveGuard(self.clone())
    }

    /// How long the connection has had no request in flight (zero while it has one).
    fn idle_for(&self) -> Duration {
        if self.active.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(now_ns().saturating_sub(self.last_change.load(Ordering::SeqCst)))
    }
}

/// One request in flight; dropped when its response body is finished (or abandoned).
struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.last_change.store(now_ns(), Ordering::SeqCst);
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in flight until it is done.
pub struct TrackedBody<B> {
    inner: B,
    _guard: ActiveGuard,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The service of one connection: counts its requests in flight.
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    /// The peer's address and verified client certificate, attached to every request.
    conn: ConnInfo,
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Body + Unpin,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.conn.clone());
        let guard = self.activity.begin();
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|inner| TrackedBody {
                inner,
                _guard: guard,
            }))
        })
    }
}

struct Entry {
    activity: Arc<Activity>,
    close: Arc<Notify>,
    /// Already asked to close (evicted): not a candidate again.
    closing: bool,
}

/// The open connections of one listener.
pub struct Connections {
    policy: ConnectionPolicy,
    open: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
}

impl Connections {
    pub fn new(policy: ConnectionPolicy) -> Arc<Self> {
        metrics::connections_known(policy.listener);
        Arc::new(Connections {
            policy,
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Connections open now.
    pub fn count(&self) -> usize {
        self.open.lock().expect("connections lock").len()
    }

    /// Registers a new connection, closing the longest-idle one if at the cap; `None` (refused)
    /// when at the cap with every connection busy.
    fn admit(&self) -> Option<(u64, Arc<Activity>, Arc<Notify>)> {
        let mut open = self.open.lock().expect("connections lock");
        let live = open.values().filter(|e| !e.closing).count();
        if live >= self.policy.max_connections {
            let victim = open
                .iter_mut()
                .filter(|(_, e)| !e.closing && e.activity.active.load(Ordering::SeqCst) == 0)
                .max_by_key(|(_, e)| e.activity.idle_for())
                .map(|(_, e)| e);
            match victim {
                Some(victim) => {
                    victim.closing = true;
                    victim.close.notify_one();
                    metrics::connection_closed(self.policy.listener, "evicted");
                }
                None => {
                    metrics::connection_refused(self.policy.listener);
                    return None;
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::default());
        activity.last_change.store(now_ns(), Ordering::SeqCst);
        let close = Arc::new(Notify::new());
        open.insert(
            id,
            Entry {
                activity: activity.clone(),
                close: close.clone(),
                closing: false,
            },
        );
        metrics::connections_open(self.policy.listener, open.len());
        Some((id, activity, close))
    }

    fn remove(&self, id: u64) {
        let mut open = self.open.lock().expect("connections lock");
        open.remove(&id);
        metrics::connections_open(self.policy.listener, open.len());
    }
}

/// Why the server closed a connection (or that the peer did).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Closing {
    Idle,
    FirstRequest,
    Age,
    Evicted,
    Shutdown,
}

impl Closing {
    fn as_str(self) -> &'static str {
        match self {
            Closing::Idle => "idle",
            Closing::FirstRequest => "first_request_timeout",
            Closing::Age => "age",
            Closing::Evicted => "evicted",
            Closing::Shutdown => "shutdown",
        }
    }
}

/// Watches one served connection: closes it gracefully when it is idle, too old, evicted or the
/// server stops, and for good once the grace period after that is over.
async fn supervise<C>(
    conn: C,
    graceful: fn(Pin<&mut C>),
    policy: &ConnectionPolicy,
    activity: Arc<Activity>,
    close: Arc<Notify>,
    mut stop: watch::Receiver<Stop>,
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(conn);
    let opened = Instant::now();
    let mut closing: Option<(Closing, Instant)> = None;
    let check_every = Duration::from_millis(250)
        .min(policy.idle_timeout / 2)
        .min(policy.first_request_timeout / 2)
        .max(Duration::from_millis(10));
    let begin = |conn: Pin<&mut C>, why: Closing, closing: &mut Option<(Closing, Instant)>| {
        if closing.is_none() {
            graceful(conn);
            // Evictions are counted where they are decided (`Connections::admit`).
            if why != Closing::Evicted {
                metrics::connection_closed(policy.listener, why.as_str());
            }
            *closing = Some((why, Instant::now() + policy.grace));
        }
    };
    if *stop.borrow() != Stop::Running {
        begin(conn.as_mut(), Closing::Shutdown, &mut closing);
    }
    loop {
        tokio::select! {
            result = &mut conn => {
                if let Err(e) = result {
                    tracing::debug!(listener = policy.listener, error = %e, "connection ended with an error");
                }
                return;
            }
            () = close.notified() => begin(conn.as_mut(), Closing::Evicted, &mut closing),
            changed = stop.changed() => {
                let now = if changed.is_err() { Stop::Now } else { *stop.borrow() };
                match now {
                    Stop::Running => {}
                    Stop::Graceful => begin(conn.as_mut(), Closing::Shutdown, &mut closing),
                    Stop::Now => return,
                }
            }
            () = tokio::time::sleep(check_every) => {
                if let Some((why, deadline)) = closing {
                    if Instant::now() >= deadline {
                        tracing::debug!(listener = policy.listener, reason = why.as_str(), "grace period over: closing the connection");
                        return;
                    }
                    continue;
                }
                let never_asked = activity.requests.load(Ordering::SeqCst) == 0;
                if never_asked && opened.elapsed() >= policy.first_request_timeout {
                    // Nothing to finish: close at once (a silent TCP connection never reads a GOAWAY).
                    metrics::connection_closed(policy.listener, Closing::FirstRequest.as_str());
                    return;
                }
                if activity.idle_for() >= policy.idle_timeout {
                    begin(conn.as_mut(), Closing::Idle, &mut closing);
                } else if policy.max_age.is_some_and(|age| opened.elapsed() >= age) {
                    begin(conn.as_mut(), Closing::Age, &mut closing);
                }
            }
        }
    }
}

/// Bytes read from a gRPC connection's socket at a time. HTTP/2's framing reads a few kB per
/// call of the socket, so a 256² PNG slice (a 44 kB message) took five `recvfrom` per request; with
/// this buffer it takes one, which saves about 10 µs of CPU per call (docs/PERFORMANCE.md). It
/// costs 64 KiB per open connection: 64 MiB at the default `--max-connections` of 1024.
const GRPC_READ_BUFFER: usize = 64 << 10;

/// Accepts connections until the server stops; serves each with `service` over HTTP/2 (gRPC),
/// behind TLS when `tls` is set.
pub async fn serve_h2<S, B>(
    listener: TcpListener,
    connections: Arc<Connections>,
    service: S,
    stop: watch::Receiver<Stop>,
    tls: Option<Arc<Tls>>,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let policy = connections.policy.clone();
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(policy.max_concurrent_streams)
        .max_header_list_size(policy.max_header_list_size);
    if let Some((interval, timeout)) = policy.keepalive {
        builder
            .keep_alive_interval(interval)
            .keep_alive_timeout(timeout);
    }
    accept_loop(
        listener,
        connections,
        stop,
        move |stream, activity, close, stop, policy| {
            let (service, builder, tls) = (service.clone(), builder.clone(), tls.clone());
            Box::pin(async move {
                let Some((io, conn)) = secure(stream, tls, Alpn::H2, &policy).await else {
                    return;
                };
                let service = Tracked {
                    inner: service,
                    activity: activity.clone(),
                    conn,
                };
                let io = tokio::io::BufReader::with_capacity(GRPC_READ_BUFFER, io);
                let conn =
                    builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
                supervise(
                    conn,
                    |c| c.graceful_shutdown(),
                    &policy,
                    activity,
                    close,
                    stop,
                )
                .await;
            })
        },
    )
    .await;
}

/// The connection as served: TLS after a handshake bounded by the first-request timeout (`None`
/// when it fails), or plain TCP.
async fn secure(
    stream: TcpStream,
    tls: Option<Arc<Tls>>,
    alpn: Alpn,
    policy: &ConnectionPolicy,
) -> Option<(Io, ConnInfo)> {
    let remote = stream.peer_addr().ok();
    let io = match tls {
        None => Io::Plain(stream),
        Some(tls) => {
            tls::handshake(
                tls.acceptor(alpn),
                stream,
                policy.first_request_timeout,
                policy.listener,
            )
            .await?
        }
    };
    let certificate = io.peer_certificate().map(Arc::new);
    Some((
        io,
        ConnInfo {
            remote,
            certificate,
        },
    ))
}

/// Accepts connections until the server stops; serves each over HTTP/1.1, behind TLS when `tls`
/// is set.
pub async fn serve_h1<S, B>(
    listener: TcpListener,
    connections: Arc<Connections>,
    service: S,
    stop: watch::Receiver<Stop>,
    tls: Option<Arc<Tls>>,
) where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let policy = connections.policy.clone();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(policy.header_read_timeout);
    accept_loop(
        listener,
        connections,
        stop,
        move |stream, activity, close, stop, policy| {
            let (service, builder, tls) = (service.clone(), builder.clone(), tls.clone());
            Box::pin(async move {
                let Some((io, conn)) = secure(stream, tls, Alpn::Http1, &policy).await else {
                    return;
                };
                let service = Tracked {
                    inner: service,
                    activity: activity.clone(),
                    conn,
                };
                let conn =
                    builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
                supervise(
                    conn,
                    |c| c.graceful_shutdown(),
                    &policy,
                    activity,
                    close,
                    stop,
                )
                .await;
            })
        },
    )
    .await;
}

type ConnTask = Pin<Box<dyn Future<Output = ()> + Send>>;

async fn accept_loop<F>(
    listener: TcpListener,
    connections: Arc<Connections>,
    mut stop: watch::Receiver<Stop>,
    serve: F,
) where
    F: Fn(
        TcpStream,
        Arc<Activity>,
        Arc<Notify>,
        watch::Receiver<Stop>,
        ConnectionPolicy,
    ) -> ConnTask,
{
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() != Stop::Running {
                    // Dropping the listener closes the port: new clients are refused at once.
                    return;
                }
            }
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(e) => {
                        // Out of file descriptors or similar: say so, back off briefly.
                        tracing::warn!(listener = connections.policy.listener, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // TCP_NODELAY: without it small responses wait for the peer's delayed ACK (~40 ms).
                let _ = stream.set_nodelay(true);
                let Some((id, activity, close)) = connections.admit() else {
                    drop(stream);
                    continue;
                };
                let task = serve(stream, activity, close, stop.clone(), connections.policy.clone());
                let connections = connections.clone();
                tokio::spawn(async move {
                    task.await;
                    connections.remove(id);
                });
            }
        }
    }
}

/// Raises this process's open-file limit to its hard limit (connections are file descriptors), and
/// returns the soft limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return None;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        Some(limit.rlim_cur)
    }
    #[cfg(not(unix))]
    {
        None
    }
}
