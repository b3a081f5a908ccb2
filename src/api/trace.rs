//! The call span of every front end, in one tower layer: around the whole gRPC service stack
//! (`brainai.v1`, the Open Inference Protocol, health, reflection) and around every route of the
//! HTTP API. It continues the caller's W3C trace context (`traceparent`/`tracestate` headers; gRPC
//! metadata are HTTP/2 headers), runs the handler inside the call span (so the request's spans
//! below it nest there), opens a `response` span from the handler's answer until the last byte of
//! the body (with gRPC: the trailers) has been handed to the connection, and records the outcome:
//! the HTTP status and, with gRPC, the `grpc-status`.
//!
//! A missing traceparent starts a new trace; an invalid one is ignored (never a reason to refuse a
//! call). The call span's name is the gRPC method (`package.Service/Method`) or the HTTP method
//! and route template (`POST /v2/models/{model}/infer`), never anything else from the request.
//! Without the OpenTelemetry layer (no `--otlp-endpoint`) the spans are disabled and the headers
//! are not even parsed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

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
    type Response = Response<TracedBody<ResBody>>;
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
        Box::pin(async move {
            let response = match future.await {
                Ok(response) => response,
                Err(e) => {
                    span.record("otel.status_code", "ERROR");
                    return Err(e);
                }
            };
            let status = response.status().as_u16();
            span.record("http.response.status_code", status);
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
            Ok(response.map(|inner| TracedBody {
                inner,
                protocol,
                call: span,
                response: response_span,
            }))
        })
    }
}

/// The call span, continuing the caller's trace when its `traceparent` is valid.
fn call_span<B>(protocol: Protocol, request: &Request<B>) -> tracing::Span {
    let span = match protocol {
        Protocol::Grpc => {
            let (service, method) = grpc_method(request.uri().path());
            tracing::debug_span!(
                "call",
                otel.name = %format_args!("{service}/{method}"),
                otel.kind = "server",
                otel.status_code = Empty,
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                rpc.grpc.status_code = Empty,
                http.response.status_code = Empty,
            )
        }
        Protocol::Http => {
            let method = http_method(request.method());
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
                http.request.method = method,
                http.route = route.as_deref(),
                http.response.status_code = Empty,
            )
        }
    };
    if !span.is_disabled() {
        let parent = TraceContextPropagator::new().extract(&Headers(request.headers()));
        if parent.span().span_context().is_valid() {
            // Fails only without the OpenTelemetry layer, when there is nothing to continue.
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// `/package.Service/Method` → (`package.Service`, `Method`); anything else (a path the client
/// made up) → `unknown`, so no request text becomes a span name.
fn grpc_method(path: &str) -> (&str, &str) {
    let plausible = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
    };
    path.strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .filter(|(service, method)| plausible(service) && plausible(method))
        .unwrap_or(("unknown", "unknown"))
}

/// The HTTP method as semantic conventions name it (`_OTHER` for one they do not know).
fn http_method(method: &tonic::codegen::http::Method) -> &'static str {
    use tonic::codegen::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
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
    span.record("rpc.grpc.status_code", code);
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

/// The response body: the `response` span lasts until it ends (or is dropped), and it reads the
/// gRPC trailers' status.
pub struct TracedBody<B> {
    inner: B,
    protocol: Protocol,
    call: tracing::Span,
    response: tracing::Span,
}

impl<B: Body + Unpin> Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        // Both entered: a span ends (for OpenTelemetry) when it is last exited, so the call span
        // lasts until the body's last frame too.
        let _call = this.call.enter();
        let _response = this.response.enter();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if this.protocol == Protocol::Grpc
            && !this.call.is_disabled()
            && let Poll::Ready(Some(Ok(frame))) = &frame
            && let Some(trailers) = frame.trailers_ref()
        {
            record_grpc_status(&this.call, trailers);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Request headers as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_names_come_from_plausible_paths_only() {
        assert_eq!(
            grpc_method("/brainai.v1.TumorClassifier/Classify"),
            ("brainai.v1.TumorClassifier", "Classify")
        );
        assert_eq!(grpc_method("/a b/c"), ("unknown", "unknown"));
        assert_eq!(grpc_method("/PATIENT^JANE/x"), ("unknown", "unknown"));
        assert_eq!(grpc_method("/only"), ("unknown", "unknown"));
        assert_eq!(grpc_method(""), ("unknown", "unknown"));
    }
}
