//! Who may call what, route by route, and the record each call leaves, over real TCP against the
//! real server: every Open Inference Protocol route (gRPC `ModelInfer`, `ModelMetadata`,
//! `ModelReady`, `ServerMetadata`; REST infer and metadata) needs its scope, so mounting a front
//! end outside the security layer fails here; open endpoints ignore credentials they do not need;
//! a token removed from the callers file stops working within the reload period; and
//! `ClassifyStream`, `ClassifySeries`, OIP `ModelInfer` and OIP HTTP infer each leave one audit
//! record naming the model and the number of images.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use brainai::kserve_pb as kpb;
use brainai::kserve_pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use brainai::pb;
use brainai::pb::tumor_classifier_client::TumorClassifierClient;
use common::*;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

const PACS: &str = "pacs-0123456789abcdef-secret";
const VIEWER: &str = "viewer-0123456789abcdef-secret";
const BASIC: &str = "Basic dXNlcjpwYXNzd29yZA==";

/// pacs may infer and read, viewer may only read.
fn write_callers(path: &Path, callers: &[(&str, &str, &str)]) {
    let text: String = callers
        .iter()
        .map(|(name, token, scopes)| {
            format!("[[caller]]\nname = \"{name}\"\ntoken = \"{token}\"\nscopes = {scopes}\n\n")
        })
        .collect();
    // Written aside, then renamed: the reloader never reads half a file.
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

fn callers_file(dir: &Path) -> PathBuf {
    let path = dir.join("callers.toml");
    write_callers(
        &path,
        &[
            ("pacs", PACS, r#"["infer", "read"]"#),
            ("viewer", VIEWER, r#"["read"]"#),
        ],
    );
    path
}

/// The tiny model with a callers file (and `extra` flags).
async fn serve_protected(dir: &Path, extra: &[&str]) -> TestServer {
    let callers = callers_file(dir);
    let callers = callers.display().to_string();
    let mut flags = vec!["--auth-callers", callers.as_str()];
    flags.extend_from_slice(extra);
    serve(args(&fixture_model("tiny"), &flags), None).await
}

/// `message` with `authorization: <value>` when given.
fn with_auth<T>(message: T, authorization: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(60));
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    request
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn model_infer(images: &[Vec<u8>]) -> kpb::ModelInferRequest {
    kpb::ModelInferRequest {
        model_name: "tiny".into(),
        id: "req-1".into(),
        inputs: vec![kpb::model_infer_request::InferInputTensor {
            name: "IMAGE".into(),
            datatype: "BYTES".into(),
            shape: vec![images.len() as i64],
            parameters: HashMap::new(),
            contents: Some(kpb::InferTensorContents {
                bytes_contents: images.to_vec(),
                ..Default::default()
            }),
        }],
        ..Default::default()
    }
}

/// A v2 JSON infer body with the images as base64 BYTES.
fn json_infer(images: &[Vec<u8>]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    serde_json::to_vec(&serde_json::json!({
        "inputs": [{
            "name": "IMAGE",
            "datatype": "BYTES",
            "shape": [images.len()],
            "data": images.iter().map(|i| b64.encode(i)).collect::<Vec<_>>(),
        }]
    }))
    .unwrap()
}

/// Every OIP gRPC method under `authorization`: the status code of each, by name.
async fn oip_grpc_codes(
    channel: &Channel,
    authorization: Option<&str>,
) -> Vec<(&'static str, Code)> {
    let mut oip = GrpcInferenceServiceClient::new(channel.clone());
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    let png = data("flair_256_a.png");
    vec![
        (
            "ModelInfer",
            code(
                bounded(
                    "ModelInfer",
                    oip.model_infer(with_auth(model_infer(&[png]), authorization)),
                )
                .await
                .map(drop),
            ),
        ),
        (
            "ModelMetadata",
            code(
                bounded(
                    "ModelMetadata",
                    oip.model_metadata(with_auth(
                        kpb::ModelMetadataRequest {
                            name: "tiny".into(),
                            version: String::new(),
                        },
                        authorization,
                    )),
                )
                .await
                .map(drop),
            ),
        ),
        (
            "ModelReady",
            code(
                bounded(
                    "ModelReady",
                    oip.model_ready(with_auth(
                        kpb::ModelReadyRequest {
                            name: "tiny".into(),
                            version: String::new(),
                        },
                        authorization,
                    )),
                )
                .await
                .map(drop),
            ),
        ),
        (
            "ServerMetadata",
            code(
                bounded(
                    "ServerMetadata",
                    oip.server_metadata(with_auth(kpb::ServerMetadataRequest {}, authorization)),
                )
                .await
                .map(drop),
            ),
        ),
        (
            "ServerLive",
            code(
                bounded(
                    "ServerLive",
                    oip.server_live(with_auth(kpb::ServerLiveRequest {}, authorization)),
                )
                .await
                .map(drop),
            ),
        ),
    ]
}

/// Every OIP REST route under `authorization`: the HTTP status of each, by route.
async fn oip_rest_statuses(
    addr: std::net::SocketAddr,
    authorization: Option<&str>,
) -> Vec<(&'static str, u16)> {
    let body = json_infer(&[data("flair_256_a.png")]);
    let mut out = Vec::new();
    for (method, path) in [
        ("POST", "/v2/models/tiny/infer"),
        ("POST", "/v2/models/tiny/versions/1/infer"),
        ("GET", "/v2/models/tiny"),
        ("GET", "/v2/models/tiny/versions/1"),
        ("GET", "/v2/models/tiny/ready"),
        ("GET", "/v2/models/tiny/versions/1/ready"),
        ("GET", "/v2"),
        ("GET", "/v2/health/ready"),
    ] {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(value) = authorization {
            headers.push(("authorization", value));
        }
        let payload: &[u8] = if method == "POST" { &body } else { b"" };
        out.push((
            path,
            http(addr, method, path, &headers, payload).await.status,
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_open_inference_protocol_route_needs_its_scope() {
    let dir = tempfile::tempdir().unwrap();
    let t = serve_protected(dir.path(), &[]).await;
    let (pacs, viewer) = (bearer(PACS), bearer(VIEWER));

    let (ok, denied, unauthenticated) = (Code::Ok, Code::PermissionDenied, Code::Unauthenticated);
    // Every route of both front ends is checked before the verdict, so a failure lists all the
    // unprotected ones.
    let mut wrong = Vec::new();
    for (who, authorization, expected) in [
        ("no credential", None, [unauthenticated; 4]),
        (
            "a read-only caller",
            Some(viewer.as_str()),
            [denied, ok, ok, ok],
        ),
        ("an infer caller", Some(pacs.as_str()), [ok; 4]),
    ] {
        let got = oip_grpc_codes(&t.channel, authorization).await;
        let want = [
            "ModelInfer",
            "ModelMetadata",
            "ModelReady",
            "ServerMetadata",
        ]
        .into_iter()
        .zip(expected)
        .chain([("ServerLive", ok)]);
        for ((method, code), (_, expected)) in got.into_iter().zip(want) {
            if code != expected {
                wrong.push(format!(
                    "gRPC {method}, {who}: {code:?}, expected {expected:?}"
                ));
            }
        }
    }
    for (who, authorization, expected) in [
        ("no credential", None, [401, 401, 401, 401, 401, 401, 401]),
        (
            "a read-only caller",
            Some(viewer.as_str()),
            [403, 403, 200, 200, 200, 200, 200],
        ),
        ("an infer caller", Some(pacs.as_str()), [200; 7]),
    ] {
        let got = oip_rest_statuses(t.server.http_addr, authorization).await;
        for ((route, status), expected) in got.into_iter().zip(expected.into_iter().chain([200])) {
            if status != expected {
                wrong.push(format!(
                    "REST {route}, {who}: {status}, expected {expected}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_endpoints_ignore_credentials_they_do_not_need() {
    let dir = tempfile::tempdir().unwrap();
    let t = serve_protected(dir.path(), &[]).await;
    let http_addr = t.server.http_addr;
    // A browser's Basic credentials, or a token nobody issued, on the page and the probes.
    for authorization in [BASIC, "Bearer not-a-token-we-ever-issued-1234"] {
        for path in ["/", "/v2/health/live", "/v2/health/ready"] {
            let r = http(
                http_addr,
                "GET",
                path,
                &[("authorization", authorization)],
                b"",
            )
            .await;
            assert_eq!(
                r.status,
                200,
                "{path} with {authorization:?}: {}",
                String::from_utf8_lossy(&r.body)
            );
        }
        let mut health = tonic_health::pb::health_client::HealthClient::new(t.channel.clone());
        let status = bounded(
            "health",
            health.check(with_auth(
                tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                },
                Some(authorization),
            )),
        )
        .await
        .expect("health answers whatever the header")
        .into_inner()
        .status;
        assert_eq!(status, ServingStatus::Serving as i32);
    }
    // On a protected route the other scheme is refused, and the refusal says why.
    let r = http(
        http_addr,
        "GET",
        "/v2/models/tiny",
        &[("authorization", BASIC)],
        b"",
    )
    .await;
    assert_eq!(r.status, 401);
    let reason = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        reason.contains("Basic scheme") && reason.contains("Bearer <token>"),
        "{reason}"
    );
    assert!(!reason.contains("dXNlcjpwYXNzd29yZA"), "{reason}");
    let status = bounded(
        "ListModels",
        TumorClassifierClient::new(t.channel.clone())
            .list_models(with_auth(pb::ListModelsRequest {}, Some(BASIC))),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("Basic scheme"), "{status:?}");
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_removed_from_the_callers_file_is_refused_after_the_reload() {
    let dir = tempfile::tempdir().unwrap();
    let t = serve_protected(dir.path(), &["--credentials-reload-s", "1"]).await;
    let list = |token: &'static str| {
        let channel = t.channel.clone();
        async move {
            bounded(
                "ListModels",
                TumorClassifierClient::new(channel)
                    .list_models(with_auth(pb::ListModelsRequest {}, Some(&bearer(token)))),
            )
            .await
            .map(drop)
            .map_err(|s| s.code())
        }
    };
    assert_eq!(list(VIEWER).await, Ok(()));
    // Revoke the viewer's token, issue a new one.
    const ROTATED: &str = "viewer-rotated-0123456789abcdef";
    write_callers(
        &dir.path().join("callers.toml"),
        &[
            ("pacs", PACS, r#"["infer", "read"]"#),
            ("viewer", ROTATED, r#"["read"]"#),
        ],
    );
    // The reloader polls every second: within PATIENCE the old token must be refused.
    bounded("the revoked token to be refused", async {
        while list(VIEWER).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(list(VIEWER).await, Err(Code::Unauthenticated));
    assert_eq!(list(ROTATED).await, Ok(()), "the new token works");
    assert_eq!(list(PACS).await, Ok(()), "the others stay");
    t.server.shutdown().await.unwrap();
}

/// The audit file's records, once there are `n` (bounded wait).
async fn records(file: &Path, n: usize) -> Vec<serde_json::Value> {
    bounded("audit records", async {
        loop {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            if text.lines().count() >= n {
                return text
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<_>>();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// The record of the call just made: exactly one more line than the `seen` before it, by `pacs`,
/// with the front end, method (for REST the start of the route: its template or its path, never
/// another route), outcome and image count given, and the tiny model.
async fn next_record(
    audit: &Path,
    seen: &mut usize,
    (front_end, method, outcome, images): (&str, &str, &str, u64),
) -> serde_json::Value {
    let all = records(audit, *seen + 1).await;
    assert_eq!(all.len(), *seen + 1, "one record per call: {all:#?}");
    *seen += 1;
    let record = all.last().unwrap().clone();
    assert_eq!(record["caller"], "pacs", "{record}");
    assert_eq!(record["front_end"], front_end, "{record}");
    let m = record["method"].as_str().unwrap();
    if front_end == "grpc" {
        assert_eq!(m, method, "{record}");
    } else {
        assert!(m.starts_with(method) && m.ends_with("/infer"), "{record}");
    }
    assert_eq!(record["outcome"], outcome, "{record}");
    assert_eq!(record["images"], images, "{record}");
    assert_eq!(record["model"]["name"], "tiny", "{record}");
    assert_eq!(record["model"]["version"], "1", "{record}");
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_front_end_leaves_one_audit_record_per_call() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let audit_flag = audit.display().to_string();
    let t = serve_protected(dir.path(), &["--audit-log", &audit_flag]).await;
    let pacs = bearer(PACS);
    let png = data("flair_256_a.png");
    let mut classifier = TumorClassifierClient::new(t.channel.clone());

    let mut seen = 0;

    // ClassifyStream: three messages, one call.
    let messages: Vec<_> = (0..3)
        .map(|i| pb::ClassifyStreamRequest {
            image: Some(image(&format!("s{i}"), png.clone())),
            ..Default::default()
        })
        .collect();
    let mut stream = bounded(
        "ClassifyStream",
        classifier.classify_stream(with_auth(tokio_stream::iter(messages), Some(&pacs))),
    )
    .await
    .expect("stream opens")
    .into_inner();
    let mut answers = 0;
    while let Some(answer) = bounded("stream answers", stream.message()).await.unwrap() {
        assert!(
            matches!(
                answer.outcome,
                Some(pb::classify_stream_response::Outcome::Result(_))
            ),
            "{answer:?}"
        );
        answers += 1;
    }
    assert_eq!(answers, 3);
    drop(stream);
    next_record(
        &audit,
        &mut seen,
        ("grpc", "brainai.v1.TumorClassifier/ClassifyStream", "OK", 3),
    )
    .await;

    // ClassifySeries: two instances of one series.
    let series = "1.2.826.0.1.3680043.10.1234.77";
    let request = pb::ClassifySeriesRequest {
        instances: (1..=2)
            .map(|k| pb::Image {
                id: format!("slice-{k}"),
                data: dicom_slice(series, k, "MR").into(),
                format: pb::ImageFormat::Dicom as i32,
                raw: None,
            })
            .collect(),
        ..Default::default()
    };
    bounded(
        "ClassifySeries",
        classifier.classify_series(with_auth(request, Some(&pacs))),
    )
    .await
    .expect("series classified");
    let record = next_record(
        &audit,
        &mut seen,
        ("grpc", "brainai.v1.TumorClassifier/ClassifySeries", "OK", 2),
    )
    .await;
    // The series record names its instances.
    let dicom = record["dicom"].as_array().expect("the series' instances");
    assert_eq!(dicom.len(), 2, "{record}");
    assert!(dicom.iter().all(|d| d["series"] == series), "{record}");

    // OIP ModelInfer: a batch of two.
    bounded(
        "ModelInfer",
        GrpcInferenceServiceClient::new(t.channel.clone()).model_infer(with_auth(
            model_infer(&[png.clone(), png.clone()]),
            Some(&pacs),
        )),
    )
    .await
    .expect("ModelInfer");
    next_record(
        &audit,
        &mut seen,
        ("grpc", "inference.GRPCInferenceService/ModelInfer", "OK", 2),
    )
    .await;

    // OIP HTTP infer: a batch of two.
    let r = http(
        t.server.http_addr,
        "POST",
        "/v2/models/tiny/infer",
        &[
            ("content-type", "application/json"),
            ("authorization", &pacs),
        ],
        &json_infer(&[png.clone(), png]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    next_record(&audit, &mut seen, ("rest", "POST /v2/models/", "200", 2)).await;
    t.server.shutdown().await.unwrap();
}
