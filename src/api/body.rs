//! Request bodies as the transport hands them to every route of every port ([`RequestBody`]): a
//! body must keep arriving (no pause over `--body-read-timeout-s`) and, after that allowance, at
//! `--min-body-rate-bytes-s` on average; a request may not declare a longer body than its port
//! accepts (refused at once, unread); and the bytes of request bodies that all calls together
//! hold are capped (`--max-body-bytes-in-flight-mib`, [`BodyBudget`]). gRPC request streams
//! (`ClassifyStream`, reflection) are long-lived by design: only their errors are classified.
//!
//! A failed read says why ([`BodyErrorKind`]): too slow, declared too large, over the budget, the
//! client went away, or malformed. The error carries the gRPC status its call ends with (tonic
//! finds it in the error's source chain); the HTTP API maps the kind to its status
//! ([`BodyErrorKind::http_status`]).

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::StatusCode;
use tokio::time::{Instant, Sleep};

use crate::metrics;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The gRPC methods whose request is a long-lived stream: a client may keep it open and quiet for
/// as long as the call lasts, so it is neither timed, limited nor counted against the budget
/// (each of its messages is bounded by `--max-message-bytes` and HTTP/2 flow control).
/// `SegmentStudy` streams too, but it is one upload of a bounded study: it is timed, held to the
/// minimum rate and counted like a unary body, so a study trickled in cannot hold its call open.
pub const GRPC_REQUEST_STREAMS: [&str; 4] = [
    "/brainai.v1.TumorClassifier/ClassifyStream",
    "/brainai.v1.TumorClassifier/SegmentStream",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// How one port's request bodies are bounded.
#[derive(Debug)]
pub struct BodyPolicy {
    /// The `listener` label of the refusal metric.
    pub listener: &'static str,
    /// Longest pause in a body, and the allowance before `min_rate` applies.
    pub read_timeout: Duration,
    /// Bytes per second a body must average once `read_timeout` is spent (0: no rate).
    pub min_rate: u64,
    /// Longest body a request may declare (`Content-Length`); longer is refused unread.
    pub max_declared: u64,
    /// The option that sets `max_declared`, for the refusal's message.
    pub max_declared_flag: &'static str,
    /// Request paths whose body is a long-lived stream (see [`GRPC_REQUEST_STREAMS`]).
    pub streams: &'static [&'static str],
    /// Shared by every port of the server.
    pub budget: Arc<BodyBudget>,
}

/// The bytes of request bodies held by calls in flight, over every port, and their cap.
#[derive(Debug)]
pub struct BodyBudget {
    cap: u64,
    used: AtomicU64,
}

impl BodyBudget {
    pub fn new(cap: u64) -> Arc<Self> {
        metrics::body_bytes_in_flight_known();
        Arc::new(BodyBudget {
            cap,
            used: AtomicU64::new(0),
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    fn try_take(&self, n: u64) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(n).filter(|&total| total <= self.cap)
            })
            .is_ok();
        if taken {
            metrics::body_bytes_in_flight(n as f64);
        }
        taken
    }

    fn give_back(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::SeqCst);
        metrics::body_bytes_in_flight(-(n as f64));
    }
}

/// What one call holds of the budget: returned when the last holder (the request body, and the
/// response the transport keeps until it is sent) is dropped, since a handler may keep the bytes
/// it read until it has answered.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: AtomicU64,
}

impl Reservation {
    fn take(&self, n: u64) -> bool {
        if n == 0 {
            return true;
        }
        let taken = self.budget.try_take(n);
        if taken {
            self.bytes.fetch_add(n, Ordering::SeqCst);
        }
        taken
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let n = *self.bytes.get_mut();
        if n > 0 {
            self.budget.give_back(n);
        }
    }
}

/// Why a request body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyErrorKind {
    /// It paused too long, or arrived under the minimum rate.
    TooSlow,
    /// It declared a length over the port's limit.
    TooLarge,
    /// The request bodies in flight were at their cap.
    Busy,
    /// The client reset the call or closed the connection before the body ended.
    ClientGone,
    /// It broke the protocol (a bad chunk, a length that does not match).
    Malformed,
}

impl BodyErrorKind {
    /// The HTTP API's answer: 408, 413, 503, 499 (client closed request, as nginx) or 400.
    pub fn http_status(self) -> StatusCode {
        match self {
            BodyErrorKind::TooSlow => StatusCode::REQUEST_TIMEOUT,
            BodyErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BodyErrorKind::Busy => StatusCode::SERVICE_UNAVAILABLE,
            BodyErrorKind::ClientGone => StatusCode::from_u16(499).expect("a valid status code"),
            BodyErrorKind::Malformed => StatusCode::BAD_REQUEST,
        }
    }

    /// The gRPC answer. Too slow is DEADLINE_EXCEEDED: the server's deadline for receiving the
    /// request passed (CANCELLED would say the client gave up; clients' retry policies rightly
    /// leave DEADLINE_EXCEEDED alone, since sending as slowly again would fail again).
    fn grpc_code(self) -> tonic::Code {
        match self {
            BodyErrorKind::TooSlow => tonic::Code::DeadlineExceeded,
            BodyErrorKind::TooLarge | BodyErrorKind::Busy => tonic::Code::ResourceExhausted,
            BodyErrorKind::ClientGone => tonic::Code::Cancelled,
            BodyErrorKind::Malformed => tonic::Code::InvalidArgument,
        }
    }

    /// The `reason` label of a counted refusal (the client's own failures are not counted).
    fn refusal(self) -> Option<&'static str> {
        match self {
            BodyErrorKind::TooSlow => Some("too_slow"),
            BodyErrorKind::TooLarge => Some("too_large"),
            BodyErrorKind::Busy => Some("in_flight_cap"),
            BodyErrorKind::ClientGone | BodyErrorKind::Malformed => None,
        }
    }
}

/// A request body that could not be read, with the gRPC status its call ends with.
#[derive(Debug)]
pub struct BodyError {
    kind: BodyErrorKind,
    status: tonic::Status,
}

impl BodyError {
    fn new(kind: BodyErrorKind, message: String) -> Self {
        BodyError {
            kind,
            status: tonic::Status::new(kind.grpc_code(), message),
        }
    }

    pub fn kind(&self) -> BodyErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        self.status.message()
    }

    /// The `BodyError` in an error's source chain (axum and `Limited` wrap it).
    pub fn find<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a BodyError> {
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(found) = e.downcast_ref::<BodyError>() {
                return Some(found);
            }
            next = e.source();
        }
        None
    }

    /// An error of the connection or of the client's stream, as a kind: a protocol error found
    /// in what the client sent (a bad chunk; h2's PROTOCOL_ERROR, e.g. more data than the
    /// declared length, which tonic maps to INTERNAL) is malformed; anything else (a reset, a
    /// GOAWAY, a closed or broken connection) is the client going away.
    fn from_transport(error: BoxError) -> Self {
        let parse = error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse);
        let mut text = error.to_string();
        let mut next = error.source();
        while let Some(e) = next {
            text.push_str(": ");
            text.push_str(&e.to_string());
            next = e.source();
        }
        let code = tonic::Status::from_error(error).code();
        if parse || code == tonic::Code::Internal {
            BodyError::new(
                BodyErrorKind::Malformed,
                format!("the request body is malformed: {text}"),
            )
        } else {
            BodyError::new(
                BodyErrorKind::ClientGone,
                format!("the client went away before its request body ended: {text}"),
            )
        }
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.status.message())
    }
}

impl StdError for BodyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.status)
    }
}

/// How long a body has taken, counting only the time the server waited for it (time a handler
/// spends elsewhere is not the client's).
#[derive(Debug)]
struct Pace {
    read_timeout: Duration,
    min_rate: u64,
    received: u64,
    /// Time waited before the current wait.
    waited: Duration,
    /// Since when the current wait runs.
    since: Option<Instant>,
}

/// Which rule a wait's deadline comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Pause,
    Rate,
}

impl Pace {
    /// Data came: the wait (if any) ends.
    fn arrived(&mut self, n: u64) {
        if let Some(since) = self.since.take() {
            self.waited += Instant::now().saturating_duration_since(since);
        }
        self.received += n;
    }

    /// The time waited by the rate rule's allowance: `read_timeout` plus one second per
    /// `min_rate` bytes received.
    fn allowance(&self) -> Duration {
        if self.min_rate == 0 {
            return Duration::MAX;
        }
        self.read_timeout.saturating_add(Duration::from_secs_f64(
            self.received as f64 / self.min_rate as f64,
        ))
    }

    /// Starts a wait (if none runs): its deadline and the rule that sets it.
    fn wait(&mut self) -> (Instant, Rule) {
        let since = *self.since.get_or_insert_with(Instant::now);
        let by_rate = self.allowance().saturating_sub(self.waited);
        if self.read_timeout <= by_rate {
            (since + self.read_timeout, Rule::Pause)
        } else {
            (since + by_rate, Rule::Rate)
        }
    }

    fn total(&self) -> Duration {
        self.waited
            + self.since.map_or(Duration::ZERO, |s| {
                Instant::now().saturating_duration_since(s)
            })
    }
}

/// The bounds on one watched body.
struct Watch {
    policy: Arc<BodyPolicy>,
    declared: Option<u64>,
    started: bool,
    failed: bool,
    pace: Pace,
    timer: Option<(Pin<Box<Sleep>>, Rule)>,
    reservation: Arc<Reservation>,
}

impl Watch {
    fn fail(&mut self, kind: BodyErrorKind, message: String) -> BodyError {
        self.failed = true;
        if let Some(reason) = kind.refusal() {
            metrics::body_refused(self.policy.listener, reason);
        }
        BodyError::new(kind, message)
    }

    /// At the first read: refuse a declared length over the limit or over the budget.
    fn start(&mut self) -> Result<(), BodyError> {
        self.started = true;
        let Some(declared) = self.declared else {
            return Ok(());
        };
        let policy = self.policy.clone();
        if declared > policy.max_declared {
            return Err(self.fail(
                BodyErrorKind::TooLarge,
                format!(
                    "the request body declares {declared} bytes, over the limit of {} bytes ({})",
                    policy.max_declared, policy.max_declared_flag
                ),
            ));
        }
        if !self.reservation.take(declared) {
            return Err(self.busy(declared));
        }
        Ok(())
    }

    fn busy(&mut self, wanted: u64) -> BodyError {
        let cap = self.policy.budget.cap;
        self.fail(
            BodyErrorKind::Busy,
            format!(
                "the server is busy: request bodies in flight are at their cap of {} MiB \
                 (--max-body-bytes-in-flight-mib) with {wanted} more bytes of this one; retry later",
                cap >> 20
            ),
        )
    }

    fn too_slow(&mut self, rule: Rule) -> BodyError {
        let (received, waited) = (self.pace.received, self.pace.total().as_secs_f64());
        let timeout = self.pace.read_timeout.as_secs();
        let message = match rule {
            Rule::Pause => format!(
                "the request body stopped arriving: nothing for {timeout} s (--body-read-timeout-s) after {received} bytes"
            ),
            Rule::Rate => format!(
                "the request body arrives too slowly: {received} bytes in {waited:.1} s, under {} bytes/s after the first {timeout} s (--min-body-rate-bytes-s, --body-read-timeout-s)",
                self.pace.min_rate
            ),
        };
        self.fail(BodyErrorKind::TooSlow, message)
    }
}

/// A request's body with its port's bounds (see the module's documentation).
pub struct RequestBody<B = hyper::body::Incoming> {
    inner: B,
    /// `None` for a request stream.
    watch: Option<Watch>,
}

impl<B> RequestBody<B> {
    /// `inner` bounded by `policy` (unless `path` is a request stream); the reservation, for the
    /// transport to keep until the response is sent.
    pub fn new(
        inner: B,
        policy: &Arc<BodyPolicy>,
        path: &str,
        declared: Option<u64>,
    ) -> (Self, Option<Arc<Reservation>>) {
        if policy.streams.contains(&path) {
            return (RequestBody { inner, watch: None }, None);
        }
        let reservation = Arc::new(Reservation {
            budget: policy.budget.clone(),
            bytes: AtomicU64::new(0),
        });
        let watch = Watch {
            policy: policy.clone(),
            declared,
            started: false,
            failed: false,
            pace: Pace {
                read_timeout: policy.read_timeout,
                min_rate: policy.min_rate,
                received: 0,
                waited: Duration::ZERO,
                since: None,
            },
            timer: None,
            reservation: reservation.clone(),
        };
        let body = RequestBody {
            inner,
            watch: Some(watch),
        };
        (body, Some(reservation))
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(watch) = this.watch.as_mut() else {
            return Pin::new(&mut this.inner)
                .poll_frame(cx)
                .map_err(|e| BodyError::from_transport(e.into()));
        };
        if watch.failed {
            return Poll::Ready(None);
        }
        if !watch.started
            && let Err(e) = watch.start()
        {
            return Poll::Ready(Some(Err(e)));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    watch.pace.arrived(n);
                    if watch.declared.is_none() && !watch.reservation.take(n) {
                        return Poll::Ready(Some(Err(watch.busy(n))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                watch.failed = true;
                Poll::Ready(Some(Err(BodyError::from_transport(e.into()))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if watch.pace.since.is_none() {
                    let (deadline, rule) = watch.pace.wait();
                    match &mut watch.timer {
                        Some((timer, r)) => {
                            timer.as_mut().reset(deadline);
                            *r = rule;
                        }
                        None => {
                            watch.timer = Some((Box::pin(tokio::time::sleep_until(deadline)), rule))
                        }
                    }
                }
                let (timer, rule) = watch.timer.as_mut().expect("a wait has its timer");
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        let rule = *rule;
                        Poll::Ready(Some(Err(watch.too_slow(rule))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.watch.as_ref().is_some_and(|w| w.failed) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{FutureExt, StreamExt};
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::mpsc;

    type Chunks =
        StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, std::io::Error>>>;

    fn policy(cap: u64) -> Arc<BodyPolicy> {
        Arc::new(BodyPolicy {
            listener: "test",
            read_timeout: Duration::from_secs(10),
            min_rate: 100,
            max_declared: 1000,
            max_declared_flag: "--test-limit",
            streams: &["/stream"],
            budget: BodyBudget::new(cap),
        })
    }

    /// A body fed by the test, piece by piece.
    fn fed() -> (mpsc::UnboundedSender<Bytes>, Chunks) {
        let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
        let stream = tokio_stream_from(rx).map(|b| Ok(Frame::data(b))).boxed();
        (tx, StreamBody::new(stream))
    }

    fn tokio_stream_from(
        mut rx: mpsc::UnboundedReceiver<Bytes>,
    ) -> impl futures_util::Stream<Item = Bytes> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    async fn next(body: &mut RequestBody<Chunks>) -> Option<Result<Frame<Bytes>, BodyError>> {
        body.frame().await
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_pauses_too_long_is_refused() {
        let p = policy(1 << 20);
        let (tx, inner) = fed();
        let (mut body, _r) = RequestBody::new(inner, &p, "/unary", None);
        tx.send(Bytes::from_static(b"abc")).unwrap();
        assert!(next(&mut body).await.unwrap().is_ok());
        let started = Instant::now();
        let err = next(&mut body).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), BodyErrorKind::TooSlow);
        assert!(err.message().contains("--body-read-timeout-s"), "{err}");
        // The pause rule: 10 s with no data (the rate allowance is longer: 10 s + 3/100 s).
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert!(next(&mut body).await.is_none(), "ends after the error");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_under_the_minimum_rate_is_refused_after_the_allowance() {
        let p = policy(1 << 20);
        let (tx, inner) = fed();
        let (mut body, _r) = RequestBody::new(inner, &p, "/unary", None);
        let started = Instant::now();
        // 1 byte a second: never a pause of 10 s, but 100 bytes/s are required after 10 s.
        let feeder = tokio::spawn(async move {
            while tx.send(Bytes::from_static(b"x")).is_ok() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let err = loop {
            match next(&mut body).await.unwrap() {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), BodyErrorKind::TooSlow);
        assert!(err.message().contains("--min-body-rate-bytes-s"), "{err}");
        // Allowed: 10 s plus 1/100 s per byte received, ~11 bytes by then.
        let took = started.elapsed();
        assert!(
            took > Duration::from_secs(10) && took < Duration::from_secs(11),
            "{took:?}"
        );
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_server_does_not_read_is_not_the_clients() {
        let p = policy(1 << 20);
        let (tx, inner) = fed();
        let (mut body, _r) = RequestBody::new(inner, &p, "/unary", None);
        tx.send(Bytes::from(vec![0u8; 100])).unwrap();
        assert!(next(&mut body).await.unwrap().is_ok());
        // The handler is busy for a minute before it reads on; the data is there.
        tokio::time::sleep(Duration::from_secs(60)).await;
        tx.send(Bytes::from(vec![0u8; 100])).unwrap();
        assert!(next(&mut body).await.unwrap().is_ok());
        drop(tx);
        assert!(next(&mut body).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn request_streams_are_not_timed_or_counted() {
        let p = policy(10);
        let (tx, inner) = fed();
        let (mut body, reservation) = RequestBody::new(inner, &p, "/stream", Some(1 << 30));
        assert!(reservation.is_none());
        let reader = tokio::spawn(async move {
            let mut n = 0;
            while let Some(frame) = next(&mut body).await {
                n += frame.unwrap().into_data().unwrap().len();
            }
            n
        });
        tokio::time::sleep(Duration::from_secs(3600)).await;
        tx.send(Bytes::from(vec![0u8; 100])).unwrap();
        drop(tx);
        assert_eq!(reader.await.unwrap(), 100);
        assert_eq!(p.budget.used(), 0);
    }

    #[tokio::test]
    async fn declared_lengths_over_the_limit_or_the_budget_are_refused_unread() {
        let p = policy(1500);
        let (_tx, inner) = fed();
        let (mut body, _r) = RequestBody::new(inner, &p, "/unary", Some(1001));
        let err = next(&mut body).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), BodyErrorKind::TooLarge);
        assert!(err.message().contains("--test-limit"), "{err}");
        assert_eq!(p.budget.used(), 0);

        let (_tx1, inner) = fed();
        let (mut first, first_reservation) = RequestBody::new(inner, &p, "/unary", Some(1000));
        let (tx2, inner) = fed();
        let (mut second, _r2) = RequestBody::new(inner, &p, "/unary", Some(600));
        // The first read reserves the declared length; the second does not fit beside it.
        tx2.send(Bytes::from_static(b"x")).unwrap();
        assert!(next(&mut first).now_or_never().is_none(), "waits for data");
        assert_eq!(p.budget.used(), 1000);
        let err = next(&mut second).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), BodyErrorKind::Busy);
        assert_eq!(err.status.code(), tonic::Code::ResourceExhausted);
        // Held until both the body and the transport's reservation are gone.
        drop(first);
        assert_eq!(p.budget.used(), 1000);
        drop(first_reservation);
        assert_eq!(p.budget.used(), 0);
    }

    #[tokio::test]
    async fn undeclared_bodies_take_the_budget_as_they_arrive() {
        let p = policy(150);
        let (tx, inner) = fed();
        let (mut body, reservation) = RequestBody::new(inner, &p, "/unary", None);
        tx.send(Bytes::from(vec![0u8; 100])).unwrap();
        assert!(next(&mut body).await.unwrap().is_ok());
        assert_eq!(p.budget.used(), 100);
        tx.send(Bytes::from(vec![0u8; 100])).unwrap();
        let err = next(&mut body).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), BodyErrorKind::Busy);
        drop((body, reservation));
        assert_eq!(p.budget.used(), 0);
    }

    #[test]
    fn the_status_travels_in_the_source_chain() {
        let err = BodyError::new(BodyErrorKind::TooSlow, "slow".into());
        let boxed: BoxError = Box::new(err);
        let status = tonic::Status::from_error(boxed);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(status.message(), "slow");
        let wrapped = axum::Error::new(BodyError::new(BodyErrorKind::ClientGone, "gone".into()));
        assert_eq!(
            BodyError::find(&wrapped).map(BodyError::kind),
            Some(BodyErrorKind::ClientGone)
        );
        assert_eq!(BodyErrorKind::ClientGone.http_status().as_u16(), 499);
    }
}
