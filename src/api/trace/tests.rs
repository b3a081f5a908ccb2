//! The call span, end to end through the layer: an in-memory exporter collects what the
//! OpenTelemetry layer ends.

use http_body::Frame;
use std::sync::{Arc, Mutex};
use std::task::Waker;

use bytes::Bytes;
use opentelemetry::Value;
use opentelemetry::trace::{Status, TracerProvider as _};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tonic::codegen::http::{HeaderValue, StatusCode};
use tracing_subscriber::layer::SubscriberExt;

use super::*;

/// Collects the spans the SDK ends.
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

/// Runs `f` with the OpenTelemetry layer as this thread's subscriber, on a current-thread
/// runtime; the spans it ended.
fn traced<F: Future<Output = ()>>(f: impl FnOnce() -> F) -> Vec<SpanData> {
    let collected = Collected::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(collected.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || runtime.block_on(f()));
    provider.shutdown().unwrap();
    collected.0.lock().unwrap().clone()
}

/// A handler: answers `status` with `body` (and a `grpc-status` header when the third field
/// says one), or never (`None`).
#[derive(Clone)]
struct Handler<B>(Option<(StatusCode, B)>, Option<&'static str>);

impl<B: Clone + Send + 'static> Service<Request<()>> for Handler<B> {
    type Response = Response<B>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        let answer = self.0.clone();
        let grpc_status = self.1;
        Box::pin(async move {
            match answer {
                Some((status, body)) => {
                    let mut response = Response::new(body);
                    *response.status_mut() = status;
                    if let Some(code) = grpc_status {
                        response
                            .headers_mut()
                            .insert("grpc-status", HeaderValue::from_static(code));
                    }
                    Ok(response)
                }
                None => std::future::pending().await,
            }
        })
    }
}

/// A body that sends one data frame, then waits forever (a stream the client leaves).
#[derive(Clone, Default)]
struct Endless(bool);

impl Body for Endless {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if std::mem::replace(&mut self.0, true) {
            Poll::Pending
        } else {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"first")))))
        }
    }
}

type Empty = http_body_util::Empty<Bytes>;

fn grpc_request(path: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut request = Request::builder().uri(path).body(()).unwrap();
    for (k, v) in headers {
        request.headers_mut().append(
            tonic::codegen::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    request
}

/// Calls a gRPC `Handler` answering 200 with an empty body, drops the answer.
async fn serve_once(layer: TraceLayer, request: Request<()>) {
    let mut service = layer.layer(Handler(Some((StatusCode::OK, Empty::new())), None));
    drop(service.call(request).await.unwrap());
}

fn calls(spans: &[SpanData]) -> Vec<&SpanData> {
    spans
        .iter()
        .filter(|s| s.span_kind == opentelemetry::trace::SpanKind::Server)
        .collect()
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name:?} span in {spans:#?}");
    found[0]
}

const CLASSIFY: &str = "/brainai.v1.TumorClassifier/Classify";

#[test]
fn invalid_traceparents_are_ignored() {
    let good_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let good_parent = "00f067aa0ba902b7";
    let invalid = [
        "00-1-1-01".to_string(),
        "00-0-0-00".into(),
        "".into(),
        "00".into(),
        "00-".into(),
        "garbage".into(),
        "00-not-a-trace-context-01".into(),
        format!("00-{}-{good_parent}-01", "0".repeat(32)),
        format!("00-{good_trace}-{}-01", "0".repeat(16)),
        format!("00-{}-{good_parent}-01", good_trace.to_uppercase()),
        format!("00-{good_trace}-{}-01", good_parent.to_uppercase()),
        format!("00-{good_trace}-{good_parent}-0A"),
        format!("0A-{good_trace}-{good_parent}-01"),
        format!("ff-{good_trace}-{good_parent}-01"),
        format!("00-{}-{good_parent}-01", &good_trace[1..]),
        format!("00-{good_trace}0-{good_parent}-01"),
        format!("00-{good_trace}-{}-01", &good_parent[1..]),
        format!("00-{good_trace}-{good_parent}0-01"),
        format!("00-{good_trace}-{good_parent}-1"),
        format!("00-{good_trace}-{good_parent}-011"),
        format!("0-{good_trace}-{good_parent}-01"),
        format!("000-{good_trace}-{good_parent}-01"),
        format!("00-{good_trace}-{good_parent}-01-extra"),
        format!("00-{good_trace}-{good_parent}-01-"),
        format!("01-{good_trace}-{good_parent}-01extra"),
        format!("00_{good_trace}_{good_parent}_01"),
        format!(" 00-{good_trace}-{good_parent}-01"),
        format!("00-{good_trace}-{good_parent}-01 "),
        format!("00 -{good_trace}-{good_parent}-01"),
        format!("00-{}g-{good_parent}-01", &good_trace[1..]),
        format!("00-{good_trace}-{}z-01", &good_parent[1..]),
        format!("00-+{}-{good_parent}-01", &good_trace[1..]),
        format!("00-{good_trace}-{good_parent}-+1"),
        format!("00-{good_trace}--{good_parent}-01"),
        format!("00-{good_trace}{good_parent}-01"),
    ];
    for value in &invalid {
        let spans = traced(|| {
            serve_once(
                TraceLayer::grpc(),
                grpc_request(CLASSIFY, &[("traceparent", value)]),
            )
        });
        let call = calls(&spans)[0];
        assert_eq!(
            call.parent_span_id,
            SpanId::INVALID,
            "{value:?} was taken for a parent"
        );
        assert!(!call.parent_span_is_remote, "{value:?}");
    }
    // Two traceparent headers: neither is taken.
    let tp = format!("00-{good_trace}-{good_parent}-01");
    let spans = traced(|| {
        serve_once(
            TraceLayer::grpc(),
            grpc_request(CLASSIFY, &[("traceparent", &tp), ("traceparent", &tp)]),
        )
    });
    assert_eq!(calls(&spans)[0].parent_span_id, SpanId::INVALID);
}

#[test]
fn valid_traceparents_are_continued() {
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    for (value, state) in [
        (format!("00-{trace}-{parent}-01"), "congo=t61rcWkgMzE"),
        (format!("00-{trace}-{parent}-ff"), ""),
        // A later version may carry more fields; the first four are read.
        (format!("cc-{trace}-{parent}-01-what-the-future-holds"), ""),
        (format!("01-{trace}-{parent}-01"), ""),
    ] {
        let mut headers = vec![("traceparent", value.as_str())];
        if !state.is_empty() {
            headers.push(("tracestate", state));
        }
        let spans = traced(|| serve_once(TraceLayer::grpc(), grpc_request(CLASSIFY, &headers)));
        let call = calls(&spans)[0];
        assert_eq!(call.span_context.trace_id().to_string(), trace, "{value}");
        assert_eq!(call.parent_span_id.to_string(), parent, "{value}");
        assert_eq!(call.span_context.trace_state().header(), state);
    }
    // Not sampled by the caller: not exported.
    let value = format!("00-{trace}-{parent}-00");
    let spans = traced(|| {
        serve_once(
            TraceLayer::grpc(),
            grpc_request(CLASSIFY, &[("traceparent", &value)]),
        )
    });
    assert!(spans.is_empty(), "{spans:#?}");
}

#[test]
fn only_served_grpc_methods_name_a_span() {
    let spans = traced(|| {
        serve_once(
            TraceLayer::grpc(),
            grpc_request("/DOE_JANE.Svc/1234567", &[]),
        )
    });
    let call = calls(&spans)[0];
    assert_eq!(call.name, "grpc unknown");
    assert_eq!(attribute(call, "rpc.service"), None);
    assert_eq!(attribute(call, "rpc.method"), None);
    let everything = format!("{spans:?}");
    assert!(
        !everything.contains("DOE") && !everything.contains("1234567"),
        "{everything}"
    );
    for path in [
        "/brainai.v1.TumorClassifier/Delete",
        "/brainai.v1.TumorClassifier",
        "/brainai.v1.TumorClassifier/Classify/x",
        "/brainai.v1.TumorClassifier/classify",
        "/",
    ] {
        let spans = traced(|| serve_once(TraceLayer::grpc(), grpc_request(path, &[])));
        assert_eq!(calls(&spans)[0].name, "grpc unknown", "{path}");
    }
    let spans = traced(|| serve_once(TraceLayer::grpc(), grpc_request(CLASSIFY, &[])));
    let call = calls(&spans)[0];
    assert_eq!(call.name, "brainai.v1.TumorClassifier/Classify");
    assert_eq!(
        attribute(call, "rpc.method"),
        Some(&Value::from("Classify"))
    );
}

#[test]
fn numbers_are_exported_as_numbers() {
    let spans = traced(|| async {
        let mut service =
            TraceLayer::grpc().layer(Handler(Some((StatusCode::OK, Empty::new())), Some("0")));
        drop(service.call(grpc_request(CLASSIFY, &[])).await.unwrap());
    });
    let call = calls(&spans)[0];
    assert_eq!(
        attribute(call, "http.response.status_code"),
        Some(&Value::I64(200))
    );
    assert_eq!(
        attribute(call, "rpc.grpc.status_code"),
        Some(&Value::I64(0))
    );
    let spans = traced(|| serve_once(TraceLayer::http(), grpc_request("/v1/classify", &[])));
    assert_eq!(
        attribute(calls(&spans)[0], "http.response.status_code"),
        Some(&Value::I64(200))
    );
}

fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    Pin::new(future).poll(&mut Context::from_waker(Waker::noop()))
}

#[test]
fn a_call_dropped_before_its_answer_is_cancelled() {
    for (layer, attribute_key, expected) in [
        (TraceLayer::grpc(), "rpc.grpc.status_code", 1),
        (TraceLayer::http(), "http.response.status_code", 499),
    ] {
        let spans = traced(|| async move {
            let mut service = layer.layer(Handler::<Empty>(None, None));
            let mut future = service.call(grpc_request(CLASSIFY, &[]));
            assert!(poll_once(&mut future).is_pending());
            drop(future);
        });
        let call = calls(&spans)[0];
        assert_eq!(
            attribute(call, attribute_key),
            Some(&Value::I64(expected)),
            "{call:#?}"
        );
        assert_eq!(
            attribute(call, "error.type"),
            Some(&Value::from("cancelled"))
        );
        assert!(matches!(call.status, Status::Error { .. }), "{call:#?}");
    }
}

#[test]
fn a_body_dropped_before_its_end_is_cancelled() {
    let spans = traced(|| async {
        let mut service =
            TraceLayer::grpc().layer(Handler(Some((StatusCode::OK, Endless::default())), None));
        let mut body = service
            .call(grpc_request(CLASSIFY, &[]))
            .await
            .unwrap()
            .into_body();
        let first = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(first.is_some());
        assert!(
            poll_once(&mut std::future::poll_fn(
                |cx| Pin::new(&mut body).poll_frame(cx)
            ))
            .is_pending()
        );
        drop(body);
    });
    let call = named(&spans, "brainai.v1.TumorClassifier/Classify");
    assert_eq!(
        attribute(call, "rpc.grpc.status_code"),
        Some(&Value::I64(1)),
        "{call:#?}"
    );
    assert_eq!(
        attribute(call, "http.response.status_code"),
        Some(&Value::I64(200))
    );
    assert!(matches!(call.status, Status::Error { .. }));
    let response = named(&spans, "response");
    assert!(
        response.end_time <= call.end_time,
        "the response ends within the call"
    );
}

#[test]
fn a_finished_answer_is_not_cancelled() {
    // A trailers-only answer (an empty body the connection never polls) and a polled one.
    for poll in [false, true] {
        let spans = traced(|| async move {
            let mut service =
                TraceLayer::grpc().layer(Handler(Some((StatusCode::OK, Empty::new())), Some("5")));
            let response = service.call(grpc_request(CLASSIFY, &[])).await.unwrap();
            let mut body = response.into_body();
            if poll {
                let end = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
                assert!(end.is_none());
            }
            drop(body);
        });
        let call = named(&spans, "brainai.v1.TumorClassifier/Classify");
        assert_eq!(
            attribute(call, "rpc.grpc.status_code"),
            Some(&Value::I64(5))
        );
        assert_eq!(attribute(call, "error.type"), None);
        assert_eq!(
            call.status,
            Status::Unset,
            "NOT_FOUND is the caller's fault"
        );
        let response = named(&spans, "response");
        assert!(
            call.start_time <= response.start_time && response.end_time <= call.end_time,
            "the response is within the call (polled: {poll})"
        );
    }
}
