//! The `brainai` binary as operators run it: serve, the classify client, SIGTERM drain, clear
//! start-up errors, and no patient identifiers in the logs.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use tonic_health::pb::health_check_response::ServingStatus;

const BIN: &str = env!("CARGO_BIN_EXE_brainai");

struct Served {
    child: Child,
    grpc: std::net::SocketAddr,
    http: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    /// Every stderr line, as the process writes them.
    log: mpsc::Receiver<String>,
    lines: Vec<String>,
}

impl Served {
    fn drain_log(&mut self) -> String {
        while let Ok(line) = self.log.try_recv() {
            self.lines.push(line);
        }
        self.lines.join("\n")
    }
}

/// Starts `brainai serve` on ephemeral ports and reads the bound addresses from its log.
fn spawn(model: &str, extra: &[&str]) -> Served {
    spawn_serving(
        &["--model-dir", &fixture_model(model).display().to_string()],
        extra,
    )
}

fn spawn_serving(source: &[&str], extra: &[&str]) -> Served {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(source)
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--intra-op-threads",
            "1",
        ])
        .args(extra)
        .env(
            "BRAINAI_LOG",
            "debug,ort=warn,h2=info,tower=info,hyper=info",
        )
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn brainai serve");
    let (tx, log) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let (grpc, http, metrics) = loop {
        let line = log
            .recv_timeout(PATIENCE)
            .expect("server logs its addresses");
        lines.push(line.clone());
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse().ok())
        };
        if let (Some(g), Some(h), Some(m)) = (
            field("grpc_addr="),
            field("http_addr="),
            field("metrics_addr="),
        ) {
            break (g, h, m);
        }
    };
    Served {
        child,
        grpc,
        http,
        metrics,
        log,
        lines,
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classify_cli_prints_one_line_per_file_and_json() {
    let mut s = spawn("tiny", &[]);
    wait_for_health(&connect(s.grpc).await, ServingStatus::Serving).await;
    let files = [
        repo().join("tests/data/flair_256_a.png"),
        repo().join("tests/data/flair_512_a.jpg"),
    ];
    let out = Command::new(BIN)
        .args(["classify", "--server", &format!("http://{}", s.grpc)])
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (line, file) in lines.iter().zip(&files) {
        assert!(line.starts_with(&file.display().to_string()), "{line}");
        // Every label's probability ("[no_tumor=… tumor=…]"), each matched on its own.
        assert!(
            line.contains("[no_tumor=")
                && line.contains(" tumor=")
                && line.contains("model=tiny v1"),
            "{line}"
        );
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("not clinically trained"));

    let out = Command::new(BIN)
        .args([
            "classify",
            "--json",
            "--server",
            &format!("http://{}", s.grpc),
        ])
        .args(&files)
        .output()
        .unwrap();
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[1]["model"]["name"], "tiny");
    assert!(results[0]["probabilities"]["tumor"].as_f64().is_some());

    // A bad file is reported on its own line with its name and the server's reason, exit code
    // non-zero.
    let out = Command::new(BIN)
        .args(["classify", "--server", &format!("http://{}", s.grpc)])
        .arg(repo().join("tests/data/bad/not_an_image.bin"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.lines()
            .any(|l| l.contains("not_an_image.bin") && l.contains("neither PNG, JPEG nor DICOM")),
        "{err}"
    );

    sigterm(&s.child);
    assert!(wait_exit(&mut s.child).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_work_then_exits_zero() {
    // A 3 s queue delay keeps a single image waiting in the queue when SIGTERM arrives.
    let mut s = spawn(
        "tiny",
        &["--max-queue-delay-us", "3000000", "--drain-timeout-s", "60"],
    );
    let channel = connect(s.grpc).await;
    wait_for_health(&channel, ServingStatus::Serving).await;
    let mut client =
        brainai::pb::tumor_classifier_client::TumorClassifierClient::new(channel.clone());
    let in_flight = tokio::spawn(async move {
        client
            .classify(request(vec![image(
                "PATIENT^JOHN^DOE-1932",
                data("flair_256_a.png"),
            )]))
            .await
    });
    let metrics = s.metrics;
    tokio::time::timeout(PATIENCE, async {
        loop {
            let (_, text) = http_get(metrics, "/metrics").await;
            if metric_value(&text, "brainai_queue_depth", &[]) >= 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the image reaches the queue");

    // Health watchers (the PACS clients' client-side health checks) see NOT_SERVING on the
    // stream they hold open.
    let mut watch = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    sigterm(&s.child);
    bounded("NOT_SERVING on the open health watch", async {
        while let Some(update) = watch.message().await.expect("health watch") {
            if update.status == ServingStatus::NotServing as i32 {
                return;
            }
        }
        panic!("the health watch ended before NOT_SERVING");
    })
    .await;
    // The drain: /readyz says 503, the gRPC port refuses new connections and every open one got
    // a GOAWAY, so a new call goes elsewhere (here: nowhere, UNAVAILABLE) while the queued image
    // still waits for its batch.
    until_draining(s.metrics, &[s.grpc, s.http]).await;
    let mut late =
        brainai::pb::tumor_classifier_client::TumorClassifierClient::new(channel.clone());
    let err = late
        .classify(request(vec![image("late", data("flair_256_b.png"))]))
        .await
        .unwrap_err();
    assert_unsent(&err);
    assert!(
        !in_flight.is_finished(),
        "the queued call is still waiting for its batch"
    );
    let done = bounded("the queued call", in_flight)
        .await
        .unwrap()
        .expect("queued work finishes during the drain");
    assert_eq!(done.into_inner().results.len(), 1);
    let status = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut s.child);
        (status, s.drain_log())
    })
    .await
    .unwrap();
    assert!(
        status.0.success(),
        "exit status {:?}\n{}",
        status.0,
        status.1
    );
    assert!(
        status.1.contains("SIGTERM received") && status.1.contains("drained"),
        "{}",
        status.1
    );
    // Patient safety: the image id (which a PACS may fill with patient data) is never logged.
    assert!(
        !status.1.contains("JOHN"),
        "image id leaked into the log:\n{}",
        status.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_text_in_errors_never_reaches_the_debug_log() {
    let mut s = spawn("tiny", &[]);
    let channel = connect(s.grpc).await;
    wait_for_health(&channel, ServingStatus::Serving).await;
    let mut client = brainai::pb::tumor_classifier_client::TumorClassifierClient::new(channel);
    let err = client
        .classify(request_for(
            "PATIENT^JANE^ROE-19520101",
            "",
            vec![image("x", data("flair_256_a.png"))],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("PATIENT^JANE"),
        "the caller sees its own text"
    );
    let err = client
        .classify(request_for(
            "",
            "PATIENT^JANE^ROE",
            vec![image("x", data("flair_256_a.png"))],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // The HTTP API: 20 KB of caller text in a query parameter, an input name and a JSON value.
    let long = format!("PATIENT^JANE^ROE{}", "x".repeat(20_000));
    let r = http(
        s.http,
        "POST",
        &format!("/v1/classify?priority={long}"),
        &[("content-type", "image/png")],
        &data("flair_256_a.png"),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.body.len() < 512,
        "a {}-byte error echoes the caller",
        r.body.len()
    );
    let r = http(
        s.http,
        "POST",
        "/v2/models/tiny/infer",
        &[],
        format!(
            r#"{{"inputs": [{{"name": "{long}", "datatype": "FP32", "shape": [1], "data": [1]}}]}}"#
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.body.len() < 512,
        "a {}-byte error echoes the caller",
        r.body.len()
    );
    let r = http(
        s.http,
        "POST",
        "/v2/models/tiny/infer",
        &[],
        format!(r#"{{"inputs": "{long}"}}"#).as_bytes(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.body.len() < 512,
        "a {}-byte error echoes the caller",
        r.body.len()
    );
    sigterm(&s.child);
    let (status, log) = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut s.child);
        (status, s.drain_log())
    })
    .await
    .unwrap();
    assert!(status.success());
    assert!(
        log.contains("request rejected"),
        "the rejections are logged: {log}"
    );
    assert!(!log.contains("JANE"), "caller text reached the log:\n{log}");
}

/// `preview=1` decodes each image once, after the queue has admitted the request and within the
/// decoding budgets: an image over the request's budget is refused before it is decoded (it was
/// decoded for its preview first: 0.44 s of CPU and +184 MB for a 202 KB PNG).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_are_decoded_within_the_budgets() {
    let mut s = spawn(
        "tiny",
        &[
            "--max-request-decode-mib",
            "16",
            "--max-pixels",
            "100000000",
        ],
    );
    wait_for_health(&connect(s.grpc).await, ServingStatus::Serving).await;
    // 8000×8000 RGB: a small PNG that decodes to 183 MiB.
    let big = {
        let img = image::RgbImage::new(8000, 8000);
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png
    };
    let before = peak_rss(&s.child);
    let (content_type, body) = multipart(&[("big.png", &big)]);
    let r = http(
        s.http,
        "POST",
        "/v1/classify?preview=1",
        &[("content-type", &content_type)],
        &body,
    )
    .await;
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("over the limit of 16 MiB per request"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let grown = peak_rss(&s.child).saturating_sub(before);
    assert!(
        grown < 100 << 20,
        "the refused preview was decoded: peak memory grew {} MiB",
        grown >> 20
    );
    // A preview within the budgets comes back with its result.
    let (content_type, body) = multipart(&[("a.png", &data("flair_256_a.png"))]);
    let r = http(
        s.http,
        "POST",
        "/v1/classify?preview=1",
        &[("content-type", &content_type)],
        &body,
    )
    .await;
    assert_eq!(r.status, 200);
    let preview = r.json()["results"][0]["preview"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        preview.starts_with("data:image/png;base64,"),
        "{preview:.40}"
    );
    sigterm(&s.child);
    assert!(wait_exit(&mut s.child).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_ends_the_drain_at_once() {
    // A drain timeout far beyond the test's patience and a call queued for 10 minutes: only the
    // second signal can end the process in time.
    let mut s = spawn(
        "tiny",
        &[
            "--max-queue-delay-us",
            "600000000",
            "--max-queue-wait-ms",
            "0",
            "--drain-timeout-s",
            "3600",
        ],
    );
    let channel = connect(s.grpc).await;
    wait_for_health(&channel, ServingStatus::Serving).await;
    let mut client =
        brainai::pb::tumor_classifier_client::TumorClassifierClient::new(channel.clone());
    let queued = tokio::spawn(async move {
        client
            .classify(request(vec![image("q", data("flair_256_a.png"))]))
            .await
    });
    let metrics = s.metrics;
    bounded("the image to be queued", async {
        while metric_value(
            &http_get(metrics, "/metrics").await.1,
            "brainai_queue_depth",
            &[],
        ) < 1.0
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    sigterm(&s.child);
    until_draining(s.metrics, &[s.grpc]).await;
    sigterm(&s.child);
    let (status, log) = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut s.child);
        (status, s.drain_log())
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("second shutdown signal"), "{log}");
    let _ = queued.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_loads_a_new_version() {
    let root = tempfile::tempdir().unwrap();
    let model = copy_model("tiny", root.path(), "tiny");
    let mut s = spawn_serving(
        &["--model-repository", &root.path().display().to_string()],
        &[],
    );
    let channel = connect(s.grpc).await;
    wait_for_health(&channel, ServingStatus::Serving).await;
    let version = |channel: tonic::transport::Channel| async move {
        brainai::pb::tumor_classifier_client::TumorClassifierClient::new(channel)
            .get_model(brainai::pb::GetModelRequest::default())
            .await
            .unwrap()
            .into_inner()
            .model
            .unwrap()
            .version
    };
    assert_eq!(version(channel.clone()).await, "1");
    add_version(
        &model,
        2,
        &std::fs::read(repo().join("tests/fixtures/graphs/tiny-v2.onnx")).unwrap(),
    );
    let hup = Command::new("kill")
        .args(["-HUP", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success(), "kill -HUP");
    bounded("version 2 to be served after SIGHUP", async {
        while version(channel.clone()).await != "2" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    sigterm(&s.child);
    let (status, log) = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut s.child);
        (status, s.drain_log())
    })
    .await
    .unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("SIGHUP received"), "{log}");
}

#[test]
fn missing_onnx_runtime_fails_with_one_clear_line() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--ort-library",
            "/nonexistent/libonnxruntime.so",
            "--model-dir",
        ])
        .arg(fixture_model("tiny"))
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ONNX Runtime library:") && last.contains("make setup"),
        "{err}"
    );
}

/// Peak resident memory of a process so far (VmHWM), in bytes.
fn peak_rss(child: &Child) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb * 1024
}

/// Sends `message` as one gRPC frame to `path` over a raw HTTP/2 connection; returns grpc-status
/// and grpc-message.
async fn raw_grpc_call(
    addr: std::net::SocketAddr,
    path: &str,
    message: Vec<u8>,
) -> (String, String) {
    use http_body_util::BodyExt;
    use tower::Service;
    let mut frame = vec![0u8];
    frame.extend((message.len() as u32).to_be_bytes());
    frame.extend(message);
    let request = hyper::Request::post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(
            http_body_util::Full::new(bytes::Bytes::from(frame)).map_err(|never| match never {}),
        ))
        .unwrap();
    let mut h2 = raw_h2(addr).await;
    let response = bounded("the call", h2.call(request))
        .await
        .expect("a response");
    let headers = response.headers().clone();
    let collected = bounded("the response body", response.into_body().collect())
        .await
        .expect("the body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let get = |k: &str| {
        trailers
            .get(k)
            .or(headers.get(k))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    (get("grpc-status"), get("grpc-message"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_of_tiny_repeated_fields_are_refused_before_decoding() {
    // 63 MiB of empty images (2 bytes each on the wire, ~70 decoded: 4.3 GB resident before this
    // was bounded), and the same of empty BYTES elements and of raw contents for ModelInfer.
    let mut s = spawn("tiny", &[]);
    wait_for_health(&connect(s.grpc).await, ServingStatus::Serving).await;
    let before = peak_rss(&s.child);
    let n = 33_000_000;
    let cases = [
        (
            "/brainai.v1.TumorClassifier/Classify",
            [0x0A, 0x00].repeat(n),
            "request has 33000000 images, over the limit of 64 per request",
        ),
        (
            "/brainai.v1.TumorClassifier/ClassifySeries",
            [0x0A, 0x00].repeat(n),
            "the series has 33000000 instances, over the limit of 64 per request",
        ),
        (
            "/inference.GRPCInferenceService/ModelInfer",
            {
                // inputs { contents { bytes_contents: "" x n } }
                let contents = [0x42, 0x00].repeat(n);
                let mut tensor = vec![0x2A];
                tensor.extend(varint(contents.len()));
                tensor.extend(contents);
                let mut input = vec![0x2A];
                input.extend(varint(tensor.len()));
                input.extend(tensor);
                input
            },
            "input 0 has 33000000 BYTES elements, over the limit of 64 images per request",
        ),
        (
            "/inference.GRPCInferenceService/ModelInfer",
            [0x3A, 0x00].repeat(n),
            "at most 16 inputs, outputs and raw_input_contents",
        ),
    ];
    for (path, message, expected) in cases {
        let (status, text) = raw_grpc_call(s.grpc, path, message).await;
        assert_eq!(status, "3", "{path}: {text}");
        let text = percent_decode(&text);
        assert!(text.contains(expected), "{path}: {text}");
    }
    // HTTP JSON: 33 million numbers as FP32 data (66 MB). Read straight into floats (132 MB), not
    // into a JSON tree (~1 GB); refused for its size.
    let mut body =
        br#"{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": ["#
            .to_vec();
    body.extend(b"0,".repeat(n - 1));
    body.extend(b"0]}]}");
    let r = http(s.http, "POST", "/v2/models/tiny/infer", &[], &body).await;
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("got shape [1, 3, 32, 32] and 33000000 values"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let grown = peak_rss(&s.child).saturating_sub(before);
    assert!(
        grown < 512 << 20,
        "peak resident memory grew by {} MiB",
        grown >> 20
    );
    // Still serving.
    let channel = connect(s.grpc).await;
    let mut client = brainai::pb::tumor_classifier_client::TumorClassifierClient::new(channel);
    client
        .classify(request(vec![image("after", data("flair_256_a.png"))]))
        .await
        .expect("a good call after the large ones");
    sigterm(&s.child);
    assert!(wait_exit(&mut s.child).success());
}

fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (n & 0x7F) as u8;
        n >>= 7;
        out.push(b | if n > 0 { 0x80 } else { 0 });
        if n == 0 {
            return out;
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Synthetic patient data in tests/data/dicom/phi.dcm: every identifying value contains `PHI-`;
/// also the birth date and the given name.
const PHI: &[&str] = &["PHI-", "19610314", "Jane"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dicom_patient_data_never_reaches_logs_metrics_responses_or_errors() {
    let dir = repo().join("tests/data/dicom");
    let phi = std::fs::read(dir.join("phi.dcm")).unwrap();
    let mut s = spawn("tiny", &[]);
    let channel = connect(s.grpc).await;
    wait_for_health(&channel, ServingStatus::Serving).await;
    let mut client = brainai::pb::tumor_classifier_client::TumorClassifierClient::new(channel);
    let mut seen = Vec::new();
    // gRPC: the file declared and detected; cut short; declared PNG; inside a stream.
    for format in [
        brainai::pb::ImageFormat::Dicom,
        brainai::pb::ImageFormat::Unspecified,
    ] {
        let ok = client
            .classify(request(vec![brainai::pb::Image {
                format: format as i32,
                ..image("phi", phi.clone())
            }]))
            .await
            .unwrap()
            .into_inner();
        let dicom = ok.results[0].dicom.as_ref().unwrap();
        assert_eq!(dicom.sop_instance_uid, "1.2.826.0.1.3680043.10.1234.1.1.30");
        seen.push(format!("{ok:?}"));
    }
    for (what, data, format) in [
        (
            "cut",
            phi[..phi.len() * 7 / 10].to_vec(),
            brainai::pb::ImageFormat::Dicom,
        ),
        ("as png", phi.clone(), brainai::pb::ImageFormat::Png),
        (
            "header only",
            phi[..2400].to_vec(),
            brainai::pb::ImageFormat::Unspecified,
        ),
    ] {
        let err = client
            .classify(request(vec![brainai::pb::Image {
                format: format as i32,
                ..image("phi", data)
            }]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
        seen.push(format!("{what}: {err:?}"));
    }
    // HTTP API (the upload page's path).
    let (ctype, body) = multipart(&[("phi.dcm", &phi)]);
    let answer = http(
        s.http,
        "POST",
        "/v1/classify",
        &[("Content-Type", &ctype)],
        &body,
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    seen.push(String::from_utf8_lossy(&answer.body).into_owned());
    // The command-line client, on the file and on its directory.
    let cli = Command::new(BIN)
        .args([
            "classify",
            "--json",
            "--server",
            &format!("http://{}", s.grpc),
        ])
        .arg(dir.join("phi.dcm"))
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    seen.push(String::from_utf8_lossy(&cli.stdout).into_owned());
    seen.push(String::from_utf8_lossy(&cli.stderr).into_owned());
    let (code, metrics) = http_get(s.metrics, "/metrics").await;
    assert_eq!(code, 200);
    seen.push(metrics);
    sigterm(&s.child);
    let (status, log) = tokio::task::spawn_blocking(move || {
        let status = wait_exit(&mut s.child);
        (status, s.drain_log())
    })
    .await
    .unwrap();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("request rejected"),
        "the rejections are logged: {log}"
    );
    seen.push(log);
    let everything = seen.join("\n");
    assert!(
        everything.contains("1.2.826.0.1.3680043.10.1234.1.1.30"),
        "the UIDs come back"
    );
    for marker in PHI {
        assert!(
            !everything.contains(marker),
            "patient data {marker:?} left the server:\n{everything}"
        );
    }
}

/// The thread budget is applied and logged: `--preprocess-threads` sizes the preprocessing pool
/// (its threads, named, counted in /proc), `--io-threads` the async workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_budget_is_applied_and_logged() {
    let mut s = spawn("tiny", &["--io-threads", "3", "--preprocess-threads", "3"]);
    let budget = s
        .lines
        .iter()
        .find(|l| l.contains("thread budget"))
        .unwrap_or_else(|| panic!("no thread budget line in {:?}", s.lines))
        .clone();
    for field in ["io_threads=3", "preprocess_threads=3", "intra_op_threads=1"] {
        assert!(budget.contains(field), "{field} in {budget}");
    }
    let pid = s.child.id();
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    let preprocess = names
        .iter()
        .filter(|n| n.starts_with("brainai-preproc"))
        .count();
    assert_eq!(preprocess, 3, "threads: {names:?}");
    sigterm(&s.child);
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut s.child))
        .await
        .unwrap();
    assert!(status.success());
}
