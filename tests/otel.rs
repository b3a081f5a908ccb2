//! OpenTelemetry traces, end to end: the `brainai` binary exports over OTLP/gRPC to a receiver in
//! this test (the collector's TraceService on tonic). A call's W3C `traceparent` (gRPC metadata or
//! an HTTP header) is continued; the call, request, preprocessing, queue-wait and response spans
//! form one chain in the caller's trace; the batch span, in its own trace, links to the request
//! span of each call it served; a call without (or with a broken) traceparent starts a new trace;
//! nothing identifies a patient or an image; the spans buffered at exit are exported; and without
//! `--otlp-endpoint` nothing is exported at all.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use brainai::pb;
use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tonic::metadata::MetadataValue;
use tonic_health::pb::health_check_response::ServingStatus;

const BIN: &str = env!("CARGO_BIN_EXE_brainai");

/// How long spans may take to arrive (the exporter sends every 100 ms here).
const ARRIVAL: Duration = Duration::from_secs(30);

/// The in-test OTLP receiver: keeps every export request.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    async fn start() -> (Receiver, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Receiver::default();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (receiver, addr)
    }

    fn requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.0.lock().unwrap().clone()
    }

    /// Every span received so far.
    fn spans(&self) -> Vec<Span> {
        self.requests()
            .into_iter()
            .flat_map(|r| r.resource_spans)
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .collect()
    }

    /// Waits until `done` holds for the spans received (at most [`ARRIVAL`]); the spans.
    async fn wait_for(&self, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + ARRIVAL;
        loop {
            let spans = self.spans();
            if done(&spans) || tokio::time::Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A `brainai serve` process on ephemeral ports.
struct Served {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl Served {
    /// Serves the tiny model with `extra` flags and `env`; returns once it is SERVING.
    async fn start(extra: &[&str], env: &[(&str, &str)]) -> Served {
        let mut command = Command::new(BIN);
        command
            .arg("serve")
            .args(["--model-dir", &fixture_model("tiny").display().to_string()])
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
                "--intra-op-threads",
                "1",
                "--max-queue-delay-us",
                "0",
            ])
            .args(extra)
            .env_remove("BRAINAI_OTLP_ENDPOINT")
            .env("BRAINAI_LOG", "info,ort=warn")
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn brainai serve");
        let (tx, log) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (grpc, http) = loop {
            let line = log
                .recv_timeout(PATIENCE)
                .expect("server logs its addresses");
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse().ok())
            };
            if let (Some(g), Some(h)) = (field("grpc_addr="), field("http_addr=")) {
                break (g, h);
            }
        };
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || while log.recv().is_ok() {});
        wait_for_health(&connect(grpc).await, ServingStatus::Serving).await;
        Served { child, grpc, http }
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(mut self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM");
        let deadline = std::time::Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(std::time::Instant::now() < deadline, "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "server exit: {status}");
    }

    async fn classify(&self, id: &str, metadata: &[(&'static str, &str)]) {
        let mut client =
            pb::tumor_classifier_client::TumorClassifierClient::new(connect(self.grpc).await);
        let mut request = tonic::Request::new(request(vec![flat_image(id, 32, 32, 3, 40)]));
        for (k, v) in metadata {
            request
                .metadata_mut()
                .insert(*k, MetadataValue::try_from(*v).unwrap());
        }
        bounded("Classify", client.classify(request))
            .await
            .expect("Classify answers whatever the trace headers");
    }

    async fn classify_stream(&self, id: &str, traceparent: &str) {
        let mut client =
            pb::tumor_classifier_client::TumorClassifierClient::new(connect(self.grpc).await);
        let message = pb::ClassifyStreamRequest {
            image: Some(flat_image(id, 32, 32, 3, 40)),
            ..Default::default()
        };
        let mut request = tonic::Request::new(tokio_stream::iter(vec![message]));
        request
            .metadata_mut()
            .insert("traceparent", MetadataValue::try_from(traceparent).unwrap());
        let mut answers = bounded("ClassifyStream", client.classify_stream(request))
            .await
            .expect("ClassifyStream")
            .into_inner();
        let mut n = 0;
        while let Some(answer) = bounded("stream answer", answers.message()).await.unwrap() {
            assert!(
                matches!(
                    answer.outcome,
                    Some(pb::classify_stream_response::Outcome::Result(_))
                ),
                "{answer:?}"
            );
            n += 1;
        }
        assert_eq!(n, 1, "one answer per message");
    }

    async fn rest_classify(&self, traceparent: Option<&str>) {
        let mut headers = vec![("Content-Type", "image/png")];
        if let Some(tp) = traceparent {
            headers.push(("traceparent", tp));
        }
        let r = http(
            self.http,
            "POST",
            "/v1/classify",
            &headers,
            &data("flair_256_a.png"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
}

fn traceparent(trace: &str, parent: &str) -> String {
    format!("00-{trace}-{parent}-01")
}

fn hex_id(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// A span attribute as text (strings as they are, numbers in decimal).
fn attr(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn named<'a>(spans: &'a [Span], name: &str, trace: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| s.name == name && hex_id(&s.trace_id) == trace)
        .collect()
}

/// The one span called `name` in `trace`, a child of `parent` (a span id).
fn child<'a>(spans: &'a [Span], name: &str, trace: &str, parent: &[u8]) -> &'a Span {
    let found = named(spans, name, trace);
    assert_eq!(
        found.len(),
        1,
        "one {name:?} span in trace {trace}: {found:#?}"
    );
    let span = found[0];
    assert_eq!(
        hex_id(&span.parent_span_id),
        hex_id(parent),
        "{name:?} is a child of its parent"
    );
    span
}

/// The spans one call should produce in `trace`, complete (the call span ends last).
fn chain_complete(spans: &[Span], call_name: &str, trace: &str) -> bool {
    let Some(call) = named(spans, call_name, trace).into_iter().next() else {
        return false;
    };
    let classify = named(spans, "classify", trace);
    ["preprocess", "queue", "response"]
        .iter()
        .all(|n| !named(spans, n, trace).is_empty())
        && classify.iter().all(|c| {
            spans
                .iter()
                .any(|b| b.name == "batch" && b.links.iter().any(|l| l.span_id == c.span_id))
        })
        && !classify.is_empty()
        && !call.span_id.is_empty()
}

/// Checks the chain of one call continued from `parent` in `trace`; returns its request span.
fn assert_chain<'a>(
    spans: &'a [Span],
    call_name: &str,
    trace: &str,
    parent: &str,
    status: (&str, &str),
) -> &'a Span {
    let calls = named(spans, call_name, trace);
    assert_eq!(
        calls.len(),
        1,
        "one {call_name:?} call span in the caller's trace {trace}; spans received: {:#?}",
        spans
            .iter()
            .map(|s| (&s.name, hex_id(&s.trace_id)))
            .collect::<Vec<_>>()
    );
    let call = calls[0];
    assert_eq!(
        hex_id(&call.parent_span_id),
        parent,
        "the call span's parent is the traceparent's span"
    );
    assert_eq!(call.kind, SpanKind::Server as i32, "a server span");
    assert_eq!(
        attr(call, status.0).as_deref(),
        Some(status.1),
        "{call_name:?} records {}",
        status.0
    );
    let classify = child(spans, "classify", trace, &call.span_id);
    assert_eq!(attr(classify, "model").as_deref(), Some("tiny"));
    assert_eq!(attr(classify, "images").as_deref(), Some("1"));
    let preprocess = child(spans, "preprocess", trace, &classify.span_id);
    let queue = child(spans, "queue", trace, &classify.span_id);
    let response = child(spans, "response", trace, &call.span_id);
    assert!(
        preprocess.end_time_unix_nano <= queue.start_time_unix_nano,
        "an image is queued after it is preprocessed"
    );
    assert!(
        call.start_time_unix_nano <= response.start_time_unix_nano
            && response.end_time_unix_nano <= call.end_time_unix_nano,
        "the response is sent within the call"
    );
    if !call_name.ends_with("Stream") {
        // A unary answer: sent once the image ran (a stream's response starts at once).
        assert!(
            response.start_time_unix_nano >= queue.end_time_unix_nano,
            "the response is sent after the image ran"
        );
    }
    // The batch span: its own trace (a root), linked to the request span it served.
    let batches: Vec<&Span> = spans
        .iter()
        .filter(|s| {
            s.name == "batch"
                && s.links
                    .iter()
                    .any(|l| l.span_id == classify.span_id && hex_id(&l.trace_id) == trace)
        })
        .collect();
    assert_eq!(
        batches.len(),
        1,
        "one batch span links to the request span of trace {trace}"
    );
    let batch = batches[0];
    assert!(batch.parent_span_id.is_empty(), "a batch span is a root");
    assert_ne!(hex_id(&batch.trace_id), trace, "a batch has its own trace");
    assert_eq!(attr(batch, "size").as_deref(), Some("1"));
    assert!(
        queue.end_time_unix_nano <= batch.start_time_unix_nano,
        "the queue wait ends when the batch takes the image"
    );
    classify
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_continue_the_callers_trace_on_every_front_end() {
    let (receiver, addr) = Receiver::start().await;
    let endpoint = format!("http://{addr}");
    let served = Served::start(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-service-name",
            "brainai-under-test",
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;

    let (grpc_trace, grpc_parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let (rest_trace, rest_parent) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let (stream_trace, stream_parent) = ("5c1b4e3b2a3c4d5e8f9a0b1c2d3e4f50", "1122334455667788");
    served
        .classify(
            "PATIENT^OTEL-grpc",
            &[
                ("traceparent", &traceparent(grpc_trace, grpc_parent)),
                ("tracestate", "congo=t61rcWkgMzE"),
            ],
        )
        .await;
    served.classify("PATIENT^OTEL-none", &[]).await;
    served
        .classify(
            "PATIENT^OTEL-invalid",
            &[("traceparent", "00-not-a-trace-context-01")],
        )
        .await;
    served
        .classify_stream(
            "PATIENT^OTEL-stream",
            &traceparent(stream_trace, stream_parent),
        )
        .await;
    served
        .rest_classify(Some(&traceparent(rest_trace, rest_parent)))
        .await;

    const CLASSIFY: &str = "brainai.v1.TumorClassifier/Classify";
    const STREAM: &str = "brainai.v1.TumorClassifier/ClassifyStream";
    const REST: &str = "POST /v1/classify";
    let fresh = |spans: &[Span]| -> Vec<Span> {
        spans
            .iter()
            .filter(|s| s.name == CLASSIFY && s.parent_span_id.is_empty())
            .cloned()
            .collect()
    };
    let spans = receiver
        .wait_for(|spans| {
            chain_complete(spans, CLASSIFY, grpc_trace)
                && chain_complete(spans, STREAM, stream_trace)
                && chain_complete(spans, REST, rest_trace)
                && fresh(spans).len() >= 2
        })
        .await;

    let grpc_classify = assert_chain(
        &spans,
        CLASSIFY,
        grpc_trace,
        grpc_parent,
        ("rpc.grpc.status_code", "0"),
    );
    let call = named(&spans, CLASSIFY, grpc_trace)[0];
    assert_eq!(
        call.trace_state, "congo=t61rcWkgMzE",
        "the caller's tracestate is kept"
    );
    assert_eq!(
        attr(call, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_chain(
        &spans,
        STREAM,
        stream_trace,
        stream_parent,
        ("rpc.grpc.status_code", "0"),
    );
    assert_chain(
        &spans,
        REST,
        rest_trace,
        rest_parent,
        ("http.response.status_code", "200"),
    );
    assert_eq!(
        attr(named(&spans, REST, rest_trace)[0], "http.route").as_deref(),
        Some("/v1/classify")
    );

    // Without a traceparent, and with a broken one: a new trace each, the call span its root.
    let fresh = fresh(&spans);
    assert_eq!(
        fresh.len(),
        2,
        "two Classify calls without a usable traceparent start their own traces"
    );
    let known: HashSet<String> = [grpc_trace, rest_trace, stream_trace]
        .map(String::from)
        .into();
    let fresh_traces: HashSet<String> = fresh.iter().map(|s| hex_id(&s.trace_id)).collect();
    assert_eq!(fresh_traces.len(), 2, "one trace each");
    assert!(fresh_traces.is_disjoint(&known), "new trace ids");
    for call in &fresh {
        let trace = hex_id(&call.trace_id);
        child(&spans, "classify", &trace, &call.span_id);
    }
    assert_ne!(
        grpc_classify.span_id, fresh[0].span_id,
        "distinct spans per call"
    );

    // The resource names the service; nothing names a patient or an image.
    let requests = receiver.requests();
    for r in requests.iter().flat_map(|r| &r.resource_spans) {
        let resource = r.resource.as_ref().expect("a resource");
        let name = resource
            .attributes
            .iter()
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref());
        assert_eq!(
            name,
            Some(&Value::StringValue("brainai-under-test".into())),
            "service.name"
        );
    }
    let everything = format!("{requests:?}");
    assert!(
        !everything.contains("PATIENT") && !everything.contains("OTEL-"),
        "an image id reached the exported spans"
    );
    served.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_buffered_at_exit_are_exported() {
    let (receiver, addr) = Receiver::start().await;
    let endpoint = format!("http://{addr}");
    // An export interval far beyond the test: only the flush at exit can deliver the spans.
    let served = Served::start(
        &["--otlp-endpoint", &endpoint],
        &[("OTEL_BSP_SCHEDULE_DELAY", "600000")],
    )
    .await;
    let trace = "7d3e1a2b3c4d5e6f708192a3b4c5d6e7";
    served
        .classify(
            "PATIENT^OTEL-exit",
            &[("traceparent", &traceparent(trace, "0102030405060708"))],
        )
        .await;
    served.stop();
    let spans = receiver
        .wait_for(|spans| !named(spans, "classify", trace).is_empty())
        .await;
    let calls = named(&spans, "brainai.v1.TumorClassifier/Classify", trace);
    assert_eq!(calls.len(), 1, "the call span was exported at exit");
    child(&spans, "classify", trace, &calls[0].span_id);
    let service = receiver.requests()[0].resource_spans[0]
        .resource
        .as_ref()
        .unwrap()
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.clone());
    assert_eq!(
        service.and_then(|v| v.value),
        Some(Value::StringValue("brainai-serve".into())),
        "the default service name"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported() {
    let (receiver, addr) = Receiver::start().await;
    // The SDK's own variable points at the receiver: only --otlp-endpoint turns export on.
    let endpoint = format!("http://{addr}");
    let served = Served::start(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let tp = traceparent("8e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b", "0a0b0c0d0e0f1011");
    served
        .classify("PATIENT^OTEL-off", &[("traceparent", &tp)])
        .await;
    served.rest_classify(Some(&tp)).await;
    // After the exit nothing more can come: whatever was to be exported has been.
    served.stop();
    assert!(
        receiver.requests().is_empty(),
        "spans were exported without --otlp-endpoint"
    );
}
