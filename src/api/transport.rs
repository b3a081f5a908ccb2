//! Connections, owned here rather than left to tonic's server: a cap on open connections (an idle
//! one is closed to make room), a deadline for a new connection's first request, an idle timeout,
//! a maximum connection age that closes *gracefully* (GOAWAY, the calls in flight finish, then the
//! connection closes; tonic's own option cut connections off without a GOAWAY), HTTP/2 keepalive
//! and stream limits, and shutdown in two steps (GOAWAY to everyone, then close what is left). One
//! [`serve`] for every port: the gRPC ports speak HTTP/2 only, the HTTP API and metrics ports
//! HTTP/1.1 only, with a header-read timeout. Every request's body is bounded on the way in
//! ([`super::body`]: read timeout, minimum rate, declared length, bytes in flight). Open, refused
//! and server-closed connections are counted per listener.
//!
//! A graceful close of an HTTP/2 connection (age, idle, eviction, shutdown) is h2's two-step
//! GOAWAY of RFC 9113 §6.8: a first GOAWAY with the last stream id 2^31-1 and a PING; streams the
//! client opened before it saw that GOAWAY are still accepted and served; when the PING's answer
//! comes (one round trip later), the final GOAWAY names the last stream served, and the connection
//! closes once those streams are done. A peer that never answers the PING is closed after the
//! grace period (`--connection-grace-s`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Body;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tower::Service;

use super::body::{BodyPolicy, RequestBody, Reservation};
use super::response::{End, Watch, Watched};
use crate::metrics;
use crate::security::ConnInfo;
use crate::security::tls::{self, Alpn, Io, Tls};

/// The HTTP version a port speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (the HTTP API and metrics ports).
    Http1,
    /// HTTP/2 (the gRPC ports).
    Http2,
}

/// How one listener's connections are limited and closed.
#[derive(Debug, Clone)]
pub struct ConnectionPolicy {
    /// `grpc`, `rest` (the HTTP API), `metrics` or `health`: the `listener` label of the
    /// connection metrics.
    pub listener: &'static str,
    /// What the port speaks.
    pub protocol: Protocol,
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
    /// Largest header block (request metadata) HTTP/2 takes in ([`MAX_HEADER_LIST_SIZE`]).
    pub max_header_list_size: u32,
    /// HTTP/1: time to read a request's headers.
    pub header_read_timeout: Duration,
    /// How the requests' bodies are bounded.
    pub bodies: Arc<BodyPolicy>,
}

/// The largest HTTP/2 header block (all of a call's metadata) h2 takes in. Calls over
/// `--max-metadata-bytes` but within this are refused alone, RESOURCE_EXHAUSTED, by
/// [`super::status::StatusLayer`]. Past it h2 answers by itself: HTTP 431 for that stream alone
/// (no gRPC status: tonic reports INTERNAL, grpc-go UNKNOWN) up to about 1.25× this much on the
/// wire, and beyond that (more CONTINUATION frames than the limit needs, or a block decoding to
/// over 4× it) a GOAWAY with ENHANCE_YOUR_CALM that ends every call on the connection; h2 0.4
/// offers no other answer. 16 MiB is h2's and grpc-go's own default; grpc-go and grpc-java
/// clients read it from SETTINGS and fail a larger call themselves, unsent.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 << 20;

impl ConnectionPolicy {
    /// The policy of one port from the serve options: `listener` names it in the metrics.
    pub fn from_args(
        args: &crate::config::ServeArgs,
        listener: &'static str,
        protocol: Protocol,
        max_connections: usize,
        budget: &Arc<super::body::BodyBudget>,
    ) -> Self {
        let secs = Duration::from_secs;
        let (max_declared, max_declared_flag, streams): (u64, _, &'static [&'static str]) =
            match protocol {
                // A unary call's body is one gRPC frame: 5 bytes of header, then the message.
                Protocol::Http2 => (
                    args.max_message_bytes as u64 + 5,
                    "--max-message-bytes",
                    &super::body::GRPC_REQUEST_STREAMS,
                ),
                Protocol::Http1 => (
                    args.max_http_body_bytes as u64,
                    "--max-http-body-bytes",
                    &[],
                ),
            };
        ConnectionPolicy {
            listener,
            protocol,
            max_connections,
            first_request_timeout: secs(args.first_request_timeout_s),
            idle_timeout: secs(args.idle_timeout_s),
            max_age: (args.max_connection_age_s > 0).then(|| secs(args.max_connection_age_s)),
            grace: secs(args.connection_grace_s),
            keepalive: (args.keepalive_interval_s > 0).then(|| {
                (
                    secs(args.keepalive_interval_s),
                    secs(args.keepalive_timeout_s),
                )
            }),
            max_concurrent_streams: args.max_concurrent_streams,
            max_header_list_size: MAX_HEADER_LIST_SIZE
                .max(u32::try_from(args.max_metadata_bytes).unwrap_or(u32::MAX)),
            header_read_timeout: secs(args.header_read_timeout_s),
            bodies: Arc::new(BodyPolicy {
                listener,
                read_timeout: secs(args.body_read_timeout_s),
                min_rate: args.min_body_rate_bytes_s,
                max_declared,
                max_declared_flag,
                streams,
                budget: budget.clone(),
            }),
        }
    }
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

/// What a response body holds until it is sent: its request counted as in flight, and the bytes
/// its request body took from the budget (the handler may hold them until it answers).
pub struct InFlight {
    _guard: ActiveGuard,
    _reservation: Option<Arc<Reservation>>,
}

impl Watch for InFlight {
    /// Both are released as it drops, however the body ended.
    fn end(self, _how: End) {}
}

/// The service of one connection: counts its requests in flight and bounds their bodies.
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    /// The peer's address and verified client certificate, attached to every request.
    conn: ConnInfo,
    bodies: Arc<BodyPolicy>,
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<RequestBody>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Unpin,
{
    type Response = Response<Watched<B, InFlight>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let declared = request.body().size_hint().exact();
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(self.conn.clone());
        let (body, reservation) = RequestBody::new(body, &self.bodies, parts.uri.path(), declared);
        let guard = self.activity.begin();
        let future = self.inner.call(Request::from_parts(parts, body));
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|inner| {
                Watched::new(
                    inner,
                    InFlight {
                        _guard: guard,
                        _reservation: reservation,
                    },
                )
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
        metrics::bodies_known(policy.listener);
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

/// Bytes read from an HTTP/2 connection's socket at a time. HTTP/2's framing reads a few kB per
/// call of the socket, so a 256² PNG slice (a 44 kB message) took five `recvfrom` per request; with
/// this buffer it takes one, which saves about 10 µs of CPU per call (docs/PERFORMANCE.md). It
/// costs 64 KiB per open connection: 64 MiB at the default `--max-grpc-connections` of 1024.
const GRPC_READ_BUFFER: usize = 64 << 10;

/// Accepts connections until the server stops; serves each with `service` over the port's
/// protocol, behind TLS when `tls` is set.
pub async fn serve<S, B>(
    listener: TcpListener,
    connections: Arc<Connections>,
    service: S,
    stop: watch::Receiver<Stop>,
    tls: Option<Arc<Tls>>,
) where
    S: Service<Request<RequestBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let policy = connections.policy.clone();
    let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(policy.max_concurrent_streams)
        .max_header_list_size(policy.max_header_list_size);
    if let Some((interval, timeout)) = policy.keepalive {
        h2.keep_alive_interval(interval).keep_alive_timeout(timeout);
    }
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(policy.header_read_timeout);
    accept_loop(
        listener,
        connections,
        stop,
        move |stream, activity, close, stop, policy| {
            let (service, h1, h2, tls) = (service.clone(), h1.clone(), h2.clone(), tls.clone());
            Box::pin(async move {
                let alpn = match policy.protocol {
                    Protocol::Http1 => Alpn::Http1,
                    Protocol::Http2 => Alpn::H2,
                };
                let Some((io, conn)) = secure(stream, tls, alpn, &policy).await else {
                    return;
                };
                let service = TowerToHyperService::new(Tracked {
                    inner: service,
                    activity: activity.clone(),
                    conn,
                    bodies: policy.bodies.clone(),
                });
                match policy.protocol {
                    Protocol::Http2 => {
                        let io = tokio::io::BufReader::with_capacity(GRPC_READ_BUFFER, io);
                        let conn = h2.serve_connection(TokioIo::new(io), service);
                        supervise(
                            conn,
                            |c| c.graceful_shutdown(),
                            &policy,
                            activity,
                            close,
                            stop,
                        )
                        .await;
                    }
                    Protocol::Http1 => {
                        let conn = h1.serve_connection(TokioIo::new(io), service);
                        supervise(
                            conn,
                            |c| c.graceful_shutdown(),
                            &policy,
                            activity,
                            close,
                            stop,
                        )
                        .await;
                    }
                }
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
