//! OpenTelemetry traces, end to end: the `brainai` binary exports over OTLP/gRPC to a receiver in
//! this test (the collector's TraceService on tonic). A call's W3C `traceparent` (gRPC metadata or
//! an HTTP header) is continued; the call, request, preprocessing, queue-wait and response spans
//! form one chain in the caller's trace; the batch span, in its own trace, links to the request
//! span of each call it served and is sampled with them; a call without (or with a broken)
//! traceparent starts a new trace; numbers are exported as numbers; a call the client leaves is
//! recorded as cancelled; a gRPC path no service serves names no span; nothing identifies a
//! patient or an image; the spans buffered at exit are exported; the exporter speaks TLS, and a
//! collector that refuses is logged at a bounded rate; and without `--otlp-endpoint` nothing is
//! exported at all.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
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
        Self::start_with(tonic::transport::Server::builder()).await
    }

    /// With TLS: `identity` is the receiver's certificate and key.
    async fn start_tls(identity: tonic::transport::Identity) -> (Receiver, SocketAddr) {
        let tls = tonic::transport::ServerTlsConfig::new().identity(identity);
        Self::start_with(tonic::transport::Server::builder().tls_config(tls).unwrap()).await
    }

    async fn start_with(server: tonic::transport::Server) -> (Receiver, SocketAddr) {
        let receiver = Receiver::default();
        let addr = collector(receiver.clone(), server).await;
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

/// Serves a collector's `service` on an ephemeral port of `server`; its address.
async fn collector<T: TraceService>(
    service: T,
    mut server: tonic::transport::Server,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        server
            .add_service(TraceServiceServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

/// A collector that refuses every export (non-retryable), counting them.
#[derive(Clone, Default)]
struct Refusing(Arc<AtomicUsize>);

#[tonic::async_trait]
impl TraceService for Refusing {
    async fn export(
        &self,
        _: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Err(tonic::Status::permission_denied("this collector refuses"))
    }
}

impl Refusing {
    async fn start() -> (Refusing, SocketAddr) {
        let refusing = Refusing::default();
        let addr = collector(refusing.clone(), tonic::transport::Server::builder()).await;
        (refusing, addr)
    }

    fn exports(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A `brainai serve` process on ephemeral ports.
struct Served {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    /// Its log lines so far.
    log: Arc<Mutex<Vec<String>>>,
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
        let lines = Arc::new(Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            while let Ok(line) = log.recv() {
                kept.lock().unwrap().push(line);
            }
        });
        wait_for_health(&connect(grpc).await, ServingStatus::Serving).await;
        Served {
            child,
            grpc,
            http,
            log: lines,
        }
    }

    /// The log lines so far that `pick` selects.
    fn log_lines(&self, pick: impl Fn(&str) -> bool) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| pick(l))
            .cloned()
            .collect()
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

/// An attribute that must be an integer (semantic conventions): `None` when absent or text.
fn int(span: &Span, key: &str) -> Option<i64> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?;
    match value.value.as_ref()? {
        Value::IntValue(i) => Some(*i),
        _ => None,
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
    assert_eq!(int(classify, "images"), Some(1), "images, an integer");
    assert!(int(classify, "request").is_some(), "request, an integer");
    let preprocess = child(spans, "preprocess", trace, &classify.span_id);
    let queue = child(spans, "queue", trace, &classify.span_id);
    let response = child(spans, "response", trace, &call.span_id);
    assert!(
        queue.end_time_unix_nano <= classify.end_time_unix_nano,
        "the queue wait ends within its request"
    );
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
    assert_eq!(int(batch, "size"), Some(1), "size, an integer");
    assert!(
        int(batch, "batch").is_some() && int(batch, "instance").is_some(),
        "batch and instance, integers: {batch:#?}"
    );
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

    // First (its spans would be exported before the others'): a caller that did not sample its
    // trace. Nothing of it is exported, its model run included.
    let unsampled_trace = "6e0c63257de34c926f9efcd03927272e";
    served
        .classify(
            "PATIENT^OTEL-unsampled",
            &[(
                "traceparent",
                &format!("00-{unsampled_trace}-a1b2c3d4e5f60718-00"),
            )],
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
        int(call, "http.response.status_code"),
        Some(200),
        "an integer status"
    );
    assert_eq!(int(call, "rpc.grpc.status_code"), Some(0));
    assert_eq!(
        int(
            named(&spans, REST, rest_trace)[0],
            "http.response.status_code"
        ),
        Some(200)
    );
    let unsampled: Vec<&Span> = spans
        .iter()
        .filter(|s| {
            hex_id(&s.trace_id) == unsampled_trace
                || s.links
                    .iter()
                    .any(|l| hex_id(&l.trace_id) == unsampled_trace)
        })
        .collect();
    assert!(
        unsampled.is_empty(),
        "spans of (or a batch only for) a caller that did not sample: {unsampled:#?}"
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

/// A raw HTTP/2 gRPC call on `path`: one framed `message`, the request stream ended or left open
/// (`end`); the response headers and the request stream (to reset it: a client that leaves).
async fn h2_call(
    addr: SocketAddr,
    path: &str,
    traceparent: &str,
    message: Vec<u8>,
    end: bool,
) -> (
    tonic::codegen::http::Response<h2::RecvStream>,
    h2::SendStream<bytes::Bytes>,
) {
    let tcp = bounded("connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    let (client, connection) = bounded("HTTP/2 handshake", h2::client::handshake(tcp))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = bounded("HTTP/2 ready", client.ready())
        .await
        .expect("ready");
    let request = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("traceparent", traceparent)
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).expect("send headers");
    let mut framed = vec![0u8];
    framed.extend((message.len() as u32).to_be_bytes());
    framed.extend(message);
    send.send_data(framed.into(), end)
        .expect("send the message");
    let response = bounded("response headers", response)
        .await
        .expect("response headers");
    (response, send)
}

/// At ratio 0 only callers' sampled traces are exported: a model run with the calls it served
/// (not left out because its own trace was not sampled); nothing of a call whose `traceparent` is
/// invalid (ignored, so a new unsampled trace, not a zero-padded "parent"); a gRPC path no service
/// serves as `grpc unknown`, without the caller's text; a stream its client left as CANCELLED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_callers_are_exported_whole_and_only_they() {
    use prost::Message;
    let (receiver, addr) = Receiver::start().await;
    let endpoint = format!("http://{addr}");
    let served = Served::start(
        &["--otlp-endpoint", &endpoint, "--otlp-sample-ratio", "0"],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;

    // Invalid traceparents, each flagged sampled: all ignored, so nothing of them is exported.
    let (t, p) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let invalid = [
        "00-1-1-01".to_string(),
        "00-01-01-01".into(),
        format!("00-{}-{p}-01", t.to_uppercase()),
        format!("00-{t}-{}-01", p.to_uppercase()),
        format!("00-{}-{p}-01", "0".repeat(32)),
        format!("00-{t}-{}-01", "0".repeat(16)),
        format!("ff-{t}-{p}-01"),
        format!("00-{t}-{p}-01-extra"),
        format!("00-{t}-{p}-1"),
        format!("00-{}-{p}-01", &t[..31]),
        format!("00-{t}-{}-01", &p[..15]),
        format!("0-{t}-{p}-01"),
    ];
    for tp in &invalid {
        served
            .classify("PATIENT^OTEL-invalid", &[("traceparent", tp)])
            .await;
    }

    // A gRPC path no service serves: UNIMPLEMENTED, a trailers-only answer.
    let unknown_trace = "1f2e3d4c5b6a79880123456789abcdef";
    let (answer, _request) = h2_call(
        served.grpc,
        "/DOE_JANE.Svc/1234567",
        &traceparent(unknown_trace, "1111111111111111"),
        Vec::new(),
        true,
    )
    .await;
    assert_eq!(
        answer.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"12"[..]),
        "UNIMPLEMENTED: {answer:?}"
    );

    // A ClassifyStream its client leaves after the first answer (RST_STREAM CANCEL).
    let left_trace = "2a3b4c5d6e7f80910a1b2c3d4e5f6071";
    let message = pb::ClassifyStreamRequest {
        image: Some(flat_image("PATIENT^OTEL-left", 32, 32, 3, 40)),
        ..Default::default()
    }
    .encode_to_vec();
    let (answer, mut request) = h2_call(
        served.grpc,
        "/brainai.v1.TumorClassifier/ClassifyStream",
        &traceparent(left_trace, "2222222222222222"),
        message,
        false,
    )
    .await;
    assert_eq!(answer.status(), 200);
    let mut body = answer.into_body();
    let first = bounded("the first answer", body.data())
        .await
        .expect("an answer")
        .expect("an answer");
    assert!(!first.is_empty());
    request.send_reset(h2::Reason::CANCEL);

    // Last, a caller that sampled its trace.
    let sampled_trace = "3c4d5e6f708192a3b4c5d6e7f8091a2b";
    let sampled_parent = "3333333333333333";
    served
        .classify(
            "PATIENT^OTEL-sampled",
            &[("traceparent", &traceparent(sampled_trace, sampled_parent))],
        )
        .await;

    const CLASSIFY: &str = "brainai.v1.TumorClassifier/Classify";
    const STREAM: &str = "brainai.v1.TumorClassifier/ClassifyStream";
    let spans = receiver
        .wait_for(|spans| {
            chain_complete(spans, CLASSIFY, sampled_trace)
                && spans.iter().any(|s| s.name == "run")
                && !named(spans, "grpc unknown", unknown_trace).is_empty()
                && named(spans, STREAM, left_trace)
                    .iter()
                    .any(|c| int(c, "rpc.grpc.status_code").is_some())
        })
        .await;

    // The model run of the sampled call: a batch (its own trace) linked to it, and its run.
    let classify = assert_chain(
        &spans,
        CLASSIFY,
        sampled_trace,
        sampled_parent,
        ("rpc.grpc.status_code", "0"),
    );
    let batch = spans
        .iter()
        .find(|s| s.name == "batch" && s.links.iter().any(|l| l.span_id == classify.span_id))
        .expect("the batch, sampled with the call it served");
    child(&spans, "run", &hex_id(&batch.trace_id), &batch.span_id);

    // The unknown path: a fixed name, nothing of the path.
    let unknown = named(&spans, "grpc unknown", unknown_trace);
    assert_eq!(unknown.len(), 1, "{spans:#?}");
    let unknown = unknown[0];
    assert_eq!(attr(unknown, "rpc.service"), None);
    assert_eq!(attr(unknown, "rpc.method"), None);
    assert_eq!(int(unknown, "rpc.grpc.status_code"), Some(12));
    let response = child(&spans, "response", unknown_trace, &unknown.span_id);
    assert!(
        response.end_time_unix_nano <= unknown.end_time_unix_nano,
        "a trailers-only answer's response span ends within its call"
    );

    // The stream its client left: cancelled, an error, and its response within it.
    let left = named(&spans, STREAM, left_trace);
    assert_eq!(left.len(), 1, "{spans:#?}");
    let left = left[0];
    assert_eq!(int(left, "rpc.grpc.status_code"), Some(1), "CANCELLED");
    assert_eq!(attr(left, "error.type").as_deref(), Some("cancelled"));
    assert_eq!(
        left.status.as_ref().map(|s| s.code),
        Some(opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32)
    );
    let response = child(&spans, "response", left_trace, &left.span_id);
    assert!(response.end_time_unix_nano <= left.end_time_unix_nano);

    // Nothing else: no trace of the invalid traceparents (each would have been its own,
    // zero-padded or not), no caller text anywhere.
    let known: HashSet<String> = [sampled_trace, unknown_trace, left_trace]
        .map(String::from)
        .into();
    let batch_traces: HashSet<String> = spans
        .iter()
        .filter(|s| s.name == "batch")
        .map(|s| hex_id(&s.trace_id))
        .collect();
    for span in &spans {
        let trace = hex_id(&span.trace_id);
        assert!(
            known.contains(&trace) || batch_traces.contains(&trace),
            "a span outside the sampled callers' traces: {span:#?}"
        );
    }
    for batch in spans.iter().filter(|s| s.name == "batch") {
        assert!(
            batch
                .links
                .iter()
                .any(|l| known.contains(&hex_id(&l.trace_id))),
            "a batch exported for calls none of which was sampled: {batch:#?}"
        );
    }
    let everything = format!("{:?}", receiver.requests());
    for text in ["DOE_JANE", "1234567", "PATIENT", "OTEL-"] {
        assert!(
            !everything.contains(text),
            "{text} reached the exported spans"
        );
    }
    served.stop();
}

/// A collector that refuses every export: the first failure is logged at once, then at most one
/// line a minute (not an error and a warning per export, ~8,600 lines an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_collector_is_logged_at_a_bounded_rate() {
    let (refusing, addr) = Refusing::start().await;
    let endpoint = format!("http://{addr}");
    let started = std::time::Instant::now();
    let served = Served::start(
        &["--otlp-endpoint", &endpoint],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;
    // Five exports refused, one after another (each call's spans make one).
    for _ in 0..5 {
        let before = refusing.exports();
        served.classify("PATIENT^OTEL-refused", &[]).await;
        until("the collector to refuse another export", || {
            refusing.exports() > before
        })
        .await;
    }
    let about_exports = |l: &str| {
        (l.contains(" WARN ") || l.contains(" ERROR ")) && l.to_lowercase().contains("export")
    };
    until("the first failure to be logged", || {
        !served.log_lines(about_exports).is_empty()
    })
    .await;
    let lines = served.log_lines(about_exports);
    // One line, and one more per whole minute this test has run (on a slow machine).
    let minutes = started.elapsed().as_secs() / 60;
    assert!(
        lines.len() as u64 <= 1 + minutes && lines.len() < refusing.exports(),
        "{} refused exports logged as: {lines:#?}",
        refusing.exports()
    );
    assert!(
        lines[0].contains("exporting traces to")
            && lines[0].contains(&endpoint)
            && lines[0].contains("failed"),
        "{lines:?}"
    );
    assert!(
        lines[1..].iter().all(|l| l.contains("still fails")),
        "{lines:?}"
    );
    served.stop();
}

/// `--otlp-endpoint https://…` exports over TLS, trusting the `--otlp-ca` file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_tls() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "collector test CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("collector-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (receiver, addr) = Receiver::start_tls(tonic::transport::Identity::from_pem(
        cert.pem(),
        key.serialize_pem(),
    ))
    .await;
    let endpoint = format!("https://{addr}");
    let served = Served::start(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-ca",
            &ca_file.display().to_string(),
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;
    let trace = "4d5e6f708192a3b4c5d6e7f8091a2b3c";
    served
        .classify(
            "PATIENT^OTEL-tls",
            &[("traceparent", &traceparent(trace, "0102030405060708"))],
        )
        .await;
    let spans = receiver
        .wait_for(|spans| !named(spans, "classify", trace).is_empty())
        .await;
    let calls = named(&spans, "brainai.v1.TumorClassifier/Classify", trace);
    assert_eq!(calls.len(), 1, "the call span arrived over TLS");
    served.stop();
}

/// `brainai serve` with `args`: its exit status and log, once it exits by itself.
fn refused_start(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(["--model-dir", &fixture_model("tiny").display().to_string()])
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(args)
        .env_remove("BRAINAI_OTLP_ENDPOINT")
        .env_remove("BRAINAI_OTLP_CA")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn brainai serve");
    let deadline = std::time::Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            panic!("brainai serve {args:?} did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    (status, log)
}

/// An endpoint without a scheme (or with a path, or no port) stops the start with one line
/// saying what it must be, not a message about build features.
#[test]
fn an_endpoint_that_is_not_a_url_is_refused_at_start() {
    for endpoint in [
        "127.0.0.1:4317",
        "collector:4317",
        "http://collector",
        "grpc://collector:4317",
    ] {
        let (status, log) = refused_start(&["--otlp-endpoint", endpoint]);
        assert!(!status.success(), "{endpoint}: started");
        assert!(
            log.contains("it must be http://host:port or https://host:port"),
            "{endpoint}: {log}"
        );
        assert!(!log.to_lowercase().contains("feature"), "{endpoint}: {log}");
    }
    // A CA file is for TLS only.
    let (status, log) = refused_start(&[
        "--otlp-endpoint",
        "http://127.0.0.1:4317",
        "--otlp-ca",
        "/nonexistent/ca.pem",
    ]);
    assert!(!status.success());
    assert!(
        log.contains("--otlp-ca") && log.contains("https://"),
        "{log}"
    );
}

/// A call the access check refuses is traced on both front ends: the call span (and its status)
/// is opened before access is decided, on the HTTP API as on gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_are_traced_on_every_front_end() {
    let dir = tempfile::tempdir().unwrap();
    let callers = dir.path().join("callers.toml");
    std::fs::write(
        &callers,
        "[[caller]]\nname = \"pacs\"\ntoken = \"pacs-0123456789abcdef-secret\"\n",
    )
    .unwrap();
    let (receiver, addr) = Receiver::start().await;
    let endpoint = format!("http://{addr}");
    let callers = callers.display().to_string();
    let served = Served::start(
        &["--otlp-endpoint", &endpoint, "--auth-callers", &callers],
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;
    let (rest_trace, rest_parent) = ("9af7651916cd43dd8448eb211c80319d", "c7ad6b7169203332");
    let (grpc_trace, grpc_parent) = ("8bf92f3577b34da6a3ce929d0e0e4737", "10f067aa0ba902b8");
    let tp = traceparent(rest_trace, rest_parent);
    let r = http(
        served.http,
        "POST",
        "/v1/classify",
        &[("content-type", "image/png"), ("traceparent", &tp)],
        &data("flair_256_a.png"),
    )
    .await;
    assert_eq!(r.status, 401);
    let mut client =
        pb::tumor_classifier_client::TumorClassifierClient::new(connect(served.grpc).await);
    let mut request = tonic::Request::new(request(vec![flat_image("x", 32, 32, 3, 40)]));
    request.metadata_mut().insert(
        "traceparent",
        MetadataValue::try_from(traceparent(grpc_trace, grpc_parent)).unwrap(),
    );
    let err = bounded("Classify", client.classify(request))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    const REST: &str = "POST /v1/classify";
    const CLASSIFY: &str = "brainai.v1.TumorClassifier/Classify";
    let spans = receiver
        .wait_for(|spans| {
            !named(spans, REST, rest_trace).is_empty()
                && !named(spans, CLASSIFY, grpc_trace).is_empty()
        })
        .await;
    let rest = named(&spans, REST, rest_trace)[0];
    assert_eq!(hex_id(&rest.parent_span_id), rest_parent);
    assert_eq!(int(rest, "http.response.status_code"), Some(401));
    let grpc = named(&spans, CLASSIFY, grpc_trace)[0];
    assert_eq!(
        int(grpc, "rpc.grpc.status_code"),
        Some(tonic::Code::Unauthenticated as i64)
    );
    served.stop();
}
