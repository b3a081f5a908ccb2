//! Each call recorded once, whatever its front end and however it ends: the call layer's one
//! record (audit line, `brainai_requests_total`) for calls that complete, are refused, or are
//! abandoned by their client (cancelled, crashed, a client deadline that fires first, an HTTP
//! client that disconnects) — `--audit-fail-closed` included; audit methods named by their
//! declared route, never by the path as sent; cross-site browser requests refused; the Open
//! Inference Protocol's inputs, outputs, priority and version taken as strictly as Triton does.

mod common;

use std::path::Path;
use std::time::Duration;

use brainai::pb;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The records after `settle`: no record may arrive late or twice.
async fn exactly(file: &Path, n: usize) -> Vec<serde_json::Value> {
    let lines = audit_records(file, n).await;
    // A second record of the same call would be written at once (on the same drop or end); give
    // the writer thread a moment to show one.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = audit_records(file, n).await;
    assert_eq!(again.len(), n, "one record per call: {again:#?}");
    lines
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// How a client abandons a call whose image waits at the model.
#[derive(Debug, Clone, Copy)]
enum Abandon {
    /// A gRPC unary call whose client gives up (the future dropped: RST_STREAM).
    Cancel,
    /// A client that crashes: its connection closes under the call.
    Crash,
    /// A client deadline that fires before the answer.
    Deadline,
    /// An HTTP client that disconnects while its 64 images wait at the model.
    Disconnect,
}

/// Calls that their client abandons while their images wait at the model get one record each,
/// `CANCELLED` (gRPC) or 499 (HTTP), with the model and images they had reached; the metrics count
/// them once too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_calls_are_recorded_once() {
    for fail_closed in [false, true] {
        for how in [
            Abandon::Cancel,
            Abandon::Crash,
            Abandon::Deadline,
            Abandon::Disconnect,
        ] {
            abandon(how, fail_closed).await;
        }
    }
}

async fn abandon(how: Abandon, fail_closed: bool) {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut flags = vec!["--audit-log".to_string(), path(&audit)];
    if fail_closed {
        flags.push("--audit-fail-closed".into());
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (t, gated) = serve_gated("tiny", &flags).await;
    // The recorder is the process's: count from here (other tests here run alongside).
    let counted = |rpc: &'static str| {
        let metrics = t.metrics_addr();
        async move {
            scrape(
                metrics,
                "brainai_requests_total",
                &[&format!("rpc=\"{rpc}\""), "code=\"CANCELLED\""],
            )
            .await
        }
    };
    let http_before = counted("v1.classify").await;
    let started = || !gated.log.is_empty();
    let what = format!("{how:?} (fail closed: {fail_closed})");
    match how {
        Abandon::Cancel | Abandon::Crash => {
            let raw = raw_h2(t.server.grpc_addr).await;
            let mut client = pb::tumor_classifier_client::TumorClassifierClient::new(raw.clone());
            let call = tokio::spawn(async move {
                client
                    .classify(request(vec![image("a", data("flair_256_a.png"))]))
                    .await
            });
            until("the run to start", started).await;
            call.abort();
            if matches!(how, Abandon::Crash) {
                drop(raw);
            }
            let lines = exactly(&audit, 1).await;
            assert_eq!(lines[0]["outcome"], "CANCELLED", "{what}: {lines:#?}");
            assert_eq!(lines[0]["method"], "brainai.v1.TumorClassifier/Classify");
            assert_eq!(lines[0]["model"]["name"], "tiny");
            assert_eq!(lines[0]["images"], 1);
        }
        Abandon::Deadline => {
            let mut request =
                tonic::Request::new(request(vec![image("c", data("flair_256_a.png"))]));
            request.set_timeout(Duration::from_secs(3));
            let mut client = t.client.clone();
            let call = tokio::spawn(async move { client.classify(request).await });
            // The run starts and is held at the gate until the deadline has passed (on a very
            // slow machine the deadline may pass first and the image leave the queue unrun: one
            // record either way).
            let err = bounded("the deadline", call).await.unwrap().unwrap_err();
            assert!(
                matches!(
                    err.code(),
                    tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                ),
                "{what}: {err:?}"
            );
            let lines = exactly(&audit, 1).await;
            let outcome = lines[0]["outcome"].as_str().unwrap();
            assert!(
                outcome == "DEADLINE_EXCEEDED" || outcome == "CANCELLED",
                "{what}: {lines:#?}"
            );
        }
        Abandon::Disconnect => {
            let files: Vec<(String, Vec<u8>)> = (0..64)
                .map(|i| (format!("f{i}.png"), data("flair_256_a.png")))
                .collect();
            let refs: Vec<(&str, &[u8])> = files
                .iter()
                .map(|(n, d)| (n.as_str(), d.as_slice()))
                .collect();
            let (content_type, body) = multipart(&refs);
            let mut stream = tokio::net::TcpStream::connect(t.server.http_addr)
                .await
                .unwrap();
            let head = format!(
                "POST /v1/classify HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\n\
                 Content-Length: {}\r\n\r\n",
                t.server.http_addr,
                body.len()
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(&body).await.unwrap();
            until("the HTTP call's run to start", started).await;
            drop(stream);
            let lines = exactly(&audit, 1).await;
            assert_eq!(lines[0]["outcome"], "499", "{what}: {lines:#?}");
            assert_eq!(lines[0]["method"], "POST /v1/classify");
            assert_eq!(lines[0]["images"], 64);
            // Counted once (no other test here abandons an HTTP call).
            assert_eq!(counted("v1.classify").await - http_before, 1.0, "{what}");
        }
    }
    gated.gate.open();
    bounded("the drain", t.server.shutdown()).await.unwrap();
}

/// The audit record and the metrics name a call by its declared route: never the path as sent,
/// which could carry a patient's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_named_by_their_route_never_by_caller_text() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let t = serve(
        args(&fixture_model("tiny"), &["--audit-log", &path(&audit)]),
        None,
    )
    .await;
    let r = http(t.server.http_addr, "GET", "/v2/models/Doe%5EJane", &[], b"").await;
    assert_eq!(r.status, 404);
    let r = http(
        t.server.http_addr,
        "GET",
        "/v2/models/tiny/versions/1",
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 200);
    let r = http(t.server.http_addr, "GET", "/Doe%5EJane/record", &[], b"").await;
    assert_eq!(r.status, 404);
    // An unregistered gRPC method.
    let raw = raw_h2(t.server.grpc_addr).await;
    let mut grpc = tonic::client::Grpc::new(raw);
    grpc.ready().await.unwrap();
    let path = "/DOE_JANE.Svc/1234567".parse().unwrap();
    let err = grpc
        .unary::<pb::ListModelsRequest, pb::ListModelsResponse, _>(
            tonic::Request::new(pb::ListModelsRequest {}),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    let lines = exactly(&audit, 4).await;
    let methods: Vec<&str> = lines
        .iter()
        .map(|l| l["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        methods,
        [
            "GET /v2/models/{model}",
            "GET /v2/models/{model}/versions/{version}",
            "GET (unmatched)",
            "(unknown)"
        ]
    );
    let text = std::fs::read_to_string(&audit).unwrap();
    let metrics = http_get(t.metrics_addr(), "/metrics").await.1;
    for leak in ["Jane", "JANE", "1234567"] {
        assert!(
            !text.contains(leak),
            "{leak} reached the audit trail:\n{text}"
        );
        assert!(!metrics.contains(leak), "{leak} reached the metrics");
    }
    assert_eq!(
        metric_value(&metrics, "brainai_requests_total", &["rpc=\"unknown\""]),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "brainai_requests_total",
            &["rpc=\"v2.model_metadata\"", "code=\"NOT_FOUND\""]
        ),
        1.0
    );
    t.server.shutdown().await.unwrap();
}

/// A page on another site cannot make a browser post to the API; clients that are not browsers,
/// and the server's own page, can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_browser_requests_are_refused() {
    let t = serve(
        args(
            &fixture_model("tiny"),
            &["--http-allowed-origins", "https://viewer.example"],
        ),
        None,
    )
    .await;
    let addr = t.server.http_addr;
    let json = serde_json::json!({
        "inputs": [{
            "name": "IMAGE", "datatype": "BYTES", "shape": [1],
            "data": [base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                data("flair_256_a.png"),
            )],
        }]
    })
    .to_string();
    let infer = "/v2/models/tiny/infer";
    let evil = ("origin", "https://evil.example");
    // The classic forgery: text/plain JSON from another site's page.
    let r = http(
        addr,
        "POST",
        infer,
        &[evil, ("content-type", "text/plain")],
        json.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["error"].as_str().unwrap().contains("cross-site"));
    // Even as JSON, and from a browser that says where it came from.
    for headers in [
        vec![evil, ("content-type", "application/json")],
        vec![("sec-fetch-site", "cross-site")],
        vec![("origin", "null")],
    ] {
        let r = http(addr, "POST", infer, &headers, json.as_bytes()).await;
        assert_eq!(r.status, 403, "{headers:?}");
    }
    // Multipart from another site.
    let (content_type, body) = multipart(&[("a.png", &data("flair_256_a.png"))]);
    let r = http(
        addr,
        "POST",
        "/v1/classify",
        &[evil, ("content-type", &content_type)],
        &body,
    )
    .await;
    assert_eq!(r.status, 403);
    // The server's own page, an allowed origin, and clients that are not browsers.
    let own = format!("http://{addr}");
    for headers in [
        vec![("origin", own.as_str()), ("sec-fetch-site", "same-origin")],
        vec![
            ("origin", "https://viewer.example"),
            ("sec-fetch-site", "cross-site"),
        ],
        vec![],
        vec![("content-type", "application/json")],
    ] {
        let r = http(addr, "POST", infer, &headers, json.as_bytes()).await;
        assert_eq!(
            r.status,
            200,
            "{headers:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let r = http(
        addr,
        "POST",
        "/v1/classify",
        &[("origin", own.as_str()), ("content-type", &content_type)],
        &body,
    )
    .await;
    assert_eq!(r.status, 200);
    // JSON only as JSON: a form's content type is refused even without an Origin.
    for form in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let r = http(
            addr,
            "POST",
            infer,
            &[("content-type", form)],
            json.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 400, "{form}");
        assert!(
            r.json()["error"]
                .as_str()
                .unwrap()
                .contains("application/json"),
            "{form}"
        );
    }
    // Reading is not changing anything: metadata from another origin is fine.
    let r = http(addr, "GET", "/v2/models/tiny", &[evil], b"").await;
    assert_eq!(r.status, 200);
    t.server.shutdown().await.unwrap();
}

fn infer_json(inputs: serde_json::Value, extra: serde_json::Value) -> Vec<u8> {
    let mut doc = serde_json::json!({ "inputs": inputs });
    if let serde_json::Value::Object(extra) = extra {
        doc.as_object_mut().unwrap().extend(extra);
    }
    doc.to_string().into_bytes()
}

fn image_input(name: &str) -> serde_json::Value {
    serde_json::json!([{
        "name": name, "datatype": "BYTES", "shape": [1],
        "data": [base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            data("flair_256_a.png"),
        )],
    }])
}

/// The Open Inference Protocol adapter is as strict as Triton: input names, repeated outputs,
/// out-of-range priorities and version strings that only look like numbers are refused; errors
/// quote at most 64 characters of what the caller sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_requests_are_checked_like_triton_checks_them() {
    let t = serve(args(&fixture_model("tiny"), &[]), None).await;
    let addr = t.server.http_addr;
    let infer = "/v2/models/tiny/infer";
    let post = |body: Vec<u8>, path: &'static str| async move {
        http(
            addr,
            "POST",
            path,
            &[("content-type", "application/json")],
            &body,
        )
        .await
    };
    let ok = post(
        infer_json(image_input("IMAGE"), serde_json::json!({})),
        infer,
    )
    .await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    let cases = [
        (
            infer_json(image_input("bogus_name"), serde_json::json!({})),
            infer,
            400,
            "not an input of model tiny",
        ),
        (
            infer_json(
                image_input("IMAGE"),
                serde_json::json!({"outputs": [{"name": "label"}, {"name": "label"}]}),
            ),
            infer,
            400,
            "requested twice",
        ),
        (
            infer_json(
                image_input("IMAGE"),
                serde_json::json!({"parameters": {"priority": 4294967297i64}}),
            ),
            infer,
            400,
            "use 0 (the model's default), 1 (stat) or 2 (routine)",
        ),
        (
            infer_json(image_input("IMAGE"), serde_json::json!({})),
            "/v2/models/tiny/versions/+1/infer",
            404,
            "version \"+1\" of model tiny is not served",
        ),
    ];
    for (body, path, status, expected) in cases {
        let r = post(body, path).await;
        assert_eq!(
            r.status,
            status,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let error = r.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains(expected), "{error}");
    }
    // The same over gRPC.
    let mut oip =
        brainai::kserve_pb::grpc_inference_service_client::GrpcInferenceServiceClient::new(
            t.channel.clone(),
        );
    let request = |name: &str, version: &str, priority: Option<i64>| {
        use brainai::kserve_pb::{infer_parameter::ParameterChoice, *};
        let mut parameters = std::collections::HashMap::new();
        if let Some(p) = priority {
            parameters.insert(
                "priority".to_string(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(p)),
                },
            );
        }
        ModelInferRequest {
            model_name: "tiny".into(),
            model_version: version.into(),
            parameters,
            inputs: vec![model_infer_request::InferInputTensor {
                name: name.into(),
                datatype: "BYTES".into(),
                shape: vec![1],
                contents: Some(InferTensorContents {
                    bytes_contents: vec![data("flair_256_a.png")],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    };
    oip.model_infer(request("IMAGE", "", None)).await.unwrap();
    for (r, code) in [
        (
            request("bogus_name", "", None),
            tonic::Code::InvalidArgument,
        ),
        (
            request("IMAGE", "", Some((1 << 32) + 1)),
            tonic::Code::InvalidArgument,
        ),
        (request("IMAGE", "+1", None), tonic::Code::NotFound),
    ] {
        assert_eq!(oip.model_infer(r).await.unwrap_err().code(), code);
    }
    // A 100 KB string where an array belongs: the error quotes 64 characters of it.
    let long = "A".repeat(100_000);
    let r = post(format!("{{\"inputs\":\"{long}\"}}").into_bytes(), infer).await;
    assert_eq!(r.status, 400);
    assert!(r.body.len() < 1024, "a {}-byte error", r.body.len());
    let error = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        error.contains("AAAA") && error.contains("100000 bytes"),
        "{error}"
    );
    // And in a tensor's data.
    let r = post(
        infer_json(
            serde_json::json!([{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [[long]]}]),
            serde_json::json!({}),
        ),
        infer,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.body.len() < 1024, "a {}-byte error", r.body.len());
    t.server.shutdown().await.unwrap();
}

/// `priority: 1` over the Open Inference Protocol rides the STAT queue, on both transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_priority_reaches_the_stat_queue() {
    // A model of its own: the queue-depth gauge is the process's, shared with the other tests'
    // servers of `tiny`.
    let repository = tempfile::tempdir().unwrap();
    copy_model("tiny", repository.path(), "stat-queue");
    let probed = probed_ort();
    let t = serve(
        repository_args(
            repository.path(),
            &[&["--max-batch-size", "1"], HELD_RUNS].concat(),
        ),
        Some(probed.factory),
    )
    .await;
    probed.log.clear();
    probed.gate.close();
    let gated = Gated {
        log: probed.log,
        gate: probed.gate,
    };
    let addr = t.server.http_addr;
    // One routine image holds the instance at the gate; the next wait in their queues.
    let body = |priority: i64| {
        infer_json(
            image_input("IMAGE"),
            serde_json::json!({"parameters": {"priority": priority}}),
        )
    };
    let hold = tokio::spawn(async move {
        http(addr, "POST", "/v2/models/stat-queue/infer", &[], &body(2)).await
    });
    until("the held run", || !gated.log.is_empty()).await;
    let stat_http = tokio::spawn(async move {
        http(addr, "POST", "/v2/models/stat-queue/infer", &[], &body(1)).await
    });
    let mut oip =
        brainai::kserve_pb::grpc_inference_service_client::GrpcInferenceServiceClient::new(
            t.channel.clone(),
        );
    let stat_grpc = tokio::spawn(async move {
        use brainai::kserve_pb::{infer_parameter::ParameterChoice, *};
        oip.model_infer(ModelInferRequest {
            model_name: "stat-queue".into(),
            parameters: [(
                "priority".to_string(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(1)),
                },
            )]
            .into(),
            inputs: vec![model_infer_request::InferInputTensor {
                name: "IMAGE".into(),
                datatype: "BYTES".into(),
                shape: vec![1],
                contents: Some(InferTensorContents {
                    bytes_contents: vec![data("flair_256_a.png")],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
    });
    bounded("two STAT images queued", async {
        loop {
            let stat = scrape(
                t.metrics_addr(),
                "brainai_queue_depth",
                &["model=\"stat-queue\"", "priority=\"stat\""],
            )
            .await;
            if stat >= 2.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    gated.gate.open();
    assert_eq!(hold.await.unwrap().status, 200);
    assert_eq!(stat_http.await.unwrap().status, 200);
    stat_grpc.await.unwrap().unwrap();
    t.server.shutdown().await.unwrap();
}

/// A second call on the same connection after an abandoned one still works (the record of the
/// first did not disturb the connection), and nothing is left in flight for the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_drains_after_abandoned_calls() {
    let (t, gated) = serve_gated("tiny", &[]).await;
    let mut client = t.client.clone();
    let call = tokio::spawn(async move {
        client
            .classify(request(vec![image("a", data("flair_256_a.png"))]))
            .await
    });
    until("the run to start", || !gated.log.is_empty()).await;
    call.abort();
    gated.gate.open();
    let mut stream = tokio::net::TcpStream::connect(t.server.http_addr)
        .await
        .unwrap();
    stream
        .write_all(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    bounded("ready", stream.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(buf.starts_with(b"HTTP/1.1 200"));
    t.client
        .clone()
        .classify(request(vec![image("b", data("flair_256_a.png"))]))
        .await
        .unwrap();
    bounded("the drain", t.server.shutdown()).await.unwrap();
}
