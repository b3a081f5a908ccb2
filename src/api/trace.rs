//! The call span of every front end, in one tower layer: around the whole gRPC service stack
//! (`brainai.v1`, the Open Inference Protocol, health, reflection) and around every route of the
//! HTTP API. It continues the caller's W3C trace context (`traceparent`/`tracestate` headers; gRPC
//! metadata are HTTP/2 headers), runs the handler inside the call span (so the request's spans
//! below it nest there), opens a `response` span from the handler's answer until the last byte of
//! the body (with gRPC: the trailers) has been handed to the connection, and records the outcome:
//! the HTTP status and, with gRPC, the `grpc-status`; a call whose client went away before the
//! answer was complete is recorded as cancelled.
//!
//! A missing traceparent starts a new trace; an invalid one (W3C Trace Context, strictly) is
//! ignored, never a reason to refuse a call. The call span's name is a gRPC method this server
//! serves (`package.Service/Method`, else `grpc unknown`) or the HTTP method and route template
//! (`POST /v2/models/{model}/infer`), never anything else from the request.
//! Without the OpenTelemetry layer (no `--otlp-endpoint`) the spans are disabled and the headers
//! are not even parsed.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use http_body::Body;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tonic::codegen::http::{HeaderMap, Request, Response};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::response::{End, Watch, Watched};

/// Which protocol a [`TraceLayer`] serves: it decides the span's name and which status counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Grpc,
    Http,
}

/// Opens the call span of each request (see the module's documentation).
#[derive(Debug, Clone, Copy)]
pub struct TraceLayer {
    protocol: Protocol,
}

impl TraceLayer {
    /// For the gRPC port.
    pub fn grpc() -> Self {
        TraceLayer {
            protocol: Protocol::Grpc,
        }
    }

    /// For the HTTP API's routes (applied with `Router::layer`, so the route template is known).
    pub fn http() -> Self {
        TraceLayer {
            protocol: Protocol::Http,
        }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Traced<S>;
    fn layer(&self, inner: S) -> Traced<S> {
        Traced {
            inner,
            protocol: self.protocol,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
    protocol: Protocol,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Traced<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Body + Send + 'static,
{
    type Response = Response<Watched<ResBody, CallTrace>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let span = call_span(self.protocol, &request);
        let protocol = self.protocol;
        let future = span.in_scope(|| self.inner.call(request));
        let future = future.instrument(span.clone());
        // Disarmed once the handler answers: dropped before that (the client reset the stream or
        // closed the connection), it records the call as cancelled.
        let unanswered = Unanswered {
            call: span.clone(),
            protocol,
        };
        Box::pin(async move {
            let mut unanswered = unanswered;
            let result = future.await;
            unanswered.call = tracing::Span::none();
            let response = match result {
                Ok(response) => response,
                Err(e) => {
                    span.record("otel.status_code", "ERROR");
                    return Err(e);
                }
            };
            let status = response.status().as_u16();
            span.record("http.response.status_code", i64::from(status));
            if protocol == Protocol::Http && status >= 500 {
                span.record("otel.status_code", "ERROR");
            }
            let response_span = if span.is_disabled() {
                tracing::Span::none()
            } else {
                // A trailers-only gRPC answer (an error) has its status in the headers.
                if protocol == Protocol::Grpc {
                    record_grpc_status(&span, response.headers());
                }
                tracing::debug_span!(parent: &span, "response")
            };
            Ok(response.map(|inner| {
                Watched::new(
                    inner,
                    CallTrace {
                        protocol,
                        call: span,
                        response: response_span,
                    },
                )
            }))
        })
    }
}

/// Records a call whose handler never answered as cancelled, when dropped armed.
struct Unanswered {
    /// `Span::none()` once disarmed.
    call: tracing::Span,
    protocol: Protocol,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.call.is_disabled() {
            cancelled(&self.call, self.protocol, false);
        }
    }
}

/// The call ended before its answer was complete because the client went away: an error
/// (`error.type` `cancelled`), with gRPC's `CANCELLED` or, when no status was sent, HTTP's 499
/// (client closed request).
fn cancelled(call: &tracing::Span, protocol: Protocol, status_sent: bool) {
    call.record("otel.status_code", "ERROR");
    call.record("error.type", "cancelled");
    match protocol {
        Protocol::Grpc => {
            call.record("rpc.grpc.status_code", tonic::Code::Cancelled as i64);
        }
        Protocol::Http if !status_sent => {
            call.record("http.response.status_code", 499_i64);
        }
        Protocol::Http => {}
    }
}

/// The call span, continuing the caller's trace when its `traceparent` is valid.
fn call_span<B>(protocol: Protocol, request: &Request<B>) -> tracing::Span {
    let span = match protocol {
        Protocol::Grpc => match super::routes::known_grpc_route(request.uri().path()) {
            Some(route) => {
                let (service, method) = route.grpc_parts();
                tracing::debug_span!(
                "call",
                otel.name = %format_args!("{service}/{method}"),
                otel.kind = "server",
                otel.status_code = Empty,
                error.type = Empty,
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                rpc.grpc.status_code = Empty,
                http.response.status_code = Empty,
                )
            }
            // A path no service serves: nothing of it is recorded (it is the caller's text).
            None => tracing::debug_span!(
                "call",
                otel.name = "grpc unknown",
                otel.kind = "server",
                otel.status_code = Empty,
                error.type = Empty,
                rpc.system = "grpc",
                rpc.grpc.status_code = Empty,
                http.response.status_code = Empty,
            ),
        },
        Protocol::Http => {
            let method = super::routes::http_verb(request.method());
            let route = request
                .extensions()
                .get::<axum::extract::MatchedPath>()
                .map(|p| p.as_str().to_string());
            let name = match &route {
                Some(route) => format!("{method} {route}"),
                None => method.to_string(),
            };
            tracing::debug_span!(
                "call",
                otel.name = %name,
                otel.kind = "server",
                otel.status_code = Empty,
                error.type = Empty,
                http.request.method = method,
                http.route = route.as_deref(),
                http.response.status_code = Empty,
            )
        }
    };
    if !span.is_disabled()
        && let Some(parent) = caller_context(request.headers())
    {
        // Fails only without the OpenTelemetry layer, when there is nothing to continue.
        let _ = span.set_parent(parent);
    }
    span
}

/// Records `grpc-status` from response headers or trailers on the call span; the codes that mean
/// a server fault (OpenTelemetry's gRPC conventions) mark the span as an error.
fn record_grpc_status(span: &tracing::Span, headers: &HeaderMap) {
    let Some(code) = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    span.record("rpc.grpc.status_code", i64::from(code));
    use tonic::Code;
    if matches!(
        Code::from(code),
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    ) {
        span.record("otel.status_code", "ERROR");
    }
}

/// The caller's trace context: one valid W3C `traceparent` (see [`parse_traceparent`]) and the
/// `tracestate` that goes with it (all its headers, in order; an invalid one is dropped alone).
fn caller_context(headers: &HeaderMap) -> Option<opentelemetry::Context> {
    let mut traceparents = headers.get_all("traceparent").iter();
    let traceparent = traceparents.next()?;
    if traceparents.next().is_some() {
        // Two parents: neither is the caller's for sure.
        return None;
    }
    let (trace_id, span_id, flags) = parse_traceparent(traceparent.as_bytes())?;
    let state = headers
        .get_all("tracestate")
        .iter()
        .map(|v| v.to_str().ok())
        .collect::<Option<Vec<_>>>()
        .and_then(|parts| TraceState::from_str(&parts.join(",")).ok())
        .unwrap_or_default();
    let parent = SpanContext::new(trace_id, span_id, flags, true, state);
    Some(opentelemetry::Context::new().with_remote_span_context(parent))
}

/// A W3C Trace Context `traceparent` (`version-traceid-parentid-flags`), strictly: two, 32, 16
/// and two lowercase hex digits; version `ff` is invalid; version `00` has exactly these four
/// fields, a later version may have more after a `-` (not read); trace and parent ids of all
/// zeros are invalid. Of the flags only `sampled` is kept. Anything else → `None` (ignored).
fn parse_traceparent(value: &[u8]) -> Option<(TraceId, SpanId, TraceFlags)> {
    const LEN: usize = 55;
    if value.len() < LEN || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let version = lower_hex(&value[..2])?;
    if version == 0xff || (value.len() > LEN && (version == 0 || value[LEN] != b'-')) {
        return None;
    }
    let trace = lower_hex(&value[3..35])?;
    let parent = lower_hex(&value[36..52])?;
    let flags = lower_hex(&value[53..55])?;
    if trace == 0 || parent == 0 {
        return None;
    }
    Some((
        TraceId::from_bytes(trace.to_be_bytes()),
        SpanId::from_bytes((parent as u64).to_be_bytes()),
        TraceFlags::new(flags as u8) & TraceFlags::SAMPLED,
    ))
}

/// Lowercase hex digits (at most 32) as a number; anything else → `None`.
fn lower_hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(n << 4 | u128::from(v))
    })
}

/// The spans of a call's answer: the `response` span (and the call's) last until its body ends,
/// which reads the gRPC trailers' status. Dropped before its end (the client went away
/// mid-answer), the call is recorded as cancelled.
pub struct CallTrace {
    protocol: Protocol,
    call: tracing::Span,
    response: tracing::Span,
}

impl Watch for CallTrace {
    fn polling<R>(&mut self, poll: impl FnOnce() -> R) -> R {
        // Both entered: a span ends (for OpenTelemetry) when it is last exited, so the call span
        // lasts until the body's last frame too.
        let _call = self.call.enter();
        let _response = self.response.enter();
        poll()
    }

    fn trailers(&mut self, trailers: &HeaderMap) {
        if self.protocol == Protocol::Grpc && !self.call.is_disabled() {
            record_grpc_status(&self.call, trailers);
        }
    }

    fn end(mut self, how: End) {
        if self.call.is_disabled() {
            return;
        }
        match how {
            End::Done | End::Dropped { at_end: true } => {}
            End::Failed => {
                self.call.record("otel.status_code", "ERROR");
            }
            End::Dropped { at_end: false } => cancelled(&self.call, self.protocol, true),
        }
        // The response ends here, then the call: a body the connection never polled (an empty
        // one, a trailers-only gRPC answer, one whose client left) entered neither span since
        // the handler answered, and a span never exited again ends when it closes — the
        // response, closed here, would end after its call.
        self.response.in_scope(|| {});
        self.response = tracing::Span::none();
        self.call.in_scope(|| {});
    }
}

#[cfg(test)]
mod tests;
