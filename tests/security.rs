//! Transport security and access, end to end over real TCP: TLS on the gRPC and HTTP API ports,
//! mutual TLS (a good, a wrong-CA, an expired and a missing client certificate), a server
//! certificate rotated on disk and picked up live while a call stays open, bearer tokens
//! (accepted, missing, wrong, without the scope), the plaintext health-only port, the audit
//! trail (records, no patient data, fail-open and fail-closed) and the CLI's TLS and token flags;
//! the certificate's expiry exported from the start, an expired certificate refused at start and
//! at reload, tokens over plaintext warned about. Certificates are made at test time with rcgen.
//! The process-wide gauges are read right after a start: `make test` runs each test in a process
//! of its own (cargo-nextest).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use brainai::pb;
use brainai::pb::tumor_classifier_client::TumorClassifierClient;
use brainai::server::{self, RunningServer};
use common::certs::Ca;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_check_response::ServingStatus;

/// notAfter of every certificate [`Ca::leaf`] makes that is not expired: 2099-12-31T00:00:00Z.
const NOT_AFTER: f64 = 4_102_358_400.0;

const PACS_TOKEN: &str = "pacs-0123456789abcdef-secret";
const VIEWER_TOKEN: &str = "viewer-0123456789abcdef-secret";

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Starts the tiny model with `extra` flags and waits for SERVING through the health-only port
/// (which every test server here opens: plaintext, so it works whatever the main port demands).
async fn start(extra: &[&str]) -> RunningServer {
    let mut flags = vec!["--health-addr", "127.0.0.1:0"];
    flags.extend_from_slice(extra);
    let args = args(&fixture_model("tiny"), &flags);
    let server = server::start(&args, None).await.expect("server starts");
    let health = connect(server.health_addr.expect("health-only port")).await;
    wait_for_health(&health, ServingStatus::Serving).await;
    server
}

/// A TLS channel to the gRPC port trusting `ca`, with an optional client identity.
async fn tls_channel(
    addr: SocketAddr,
    ca: &str,
    identity: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    bounded(
        "TLS connect",
        Channel::from_shared(format!("https://localhost:{}", addr.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect(),
    )
    .await
}

/// A call that failed in the transport (the connection refused or closed, or a TLS alert read as
/// HTTP/2 by a plaintext client), not with a status the server sent: the client's code for that
/// depends on when and how the connection died.
fn assert_transport_error(status: &tonic::Status) {
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
        ) && std::error::Error::source(status).is_some(),
        "{status:?}"
    );
}

fn classify_request(token: Option<&str>) -> tonic::Request<pb::ClassifyRequest> {
    let mut request = tonic::Request::new(request(vec![image(
        "secret-image-id-7",
        data("flair_256_a.png"),
    )]));
    request.set_timeout(Duration::from_secs(60));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// One Classify call; the status on failure.
async fn classify(
    channel: &Channel,
    token: Option<&str>,
) -> Result<pb::ClassifyResponse, tonic::Status> {
    bounded(
        "Classify",
        TumorClassifierClient::new(channel.clone()).classify(classify_request(token)),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// One HTTP/1.1 request over TLS to the HTTP API port: (status, body).
async fn https(
    addr: SocketAddr,
    ca: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    use rustls::pki_types::pem::PemObject;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = bounded("connect", tokio::net::TcpStream::connect(addr))
        .await
        .unwrap();
    let mut tls = bounded(
        "TLS handshake",
        connector.connect("localhost".try_into().unwrap(), tcp),
    )
    .await
    .expect("TLS handshake with the HTTP API port");
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    // A close without close_notify is fine here: the response is complete.
    let _ = bounded("HTTPS response", tls.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_grpc_and_http_api_plaintext_refused_metrics_stay_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("BrainAI test CA");
    let server_pem = ca.write_leaf(dir.path(), "server", true, false);
    let server = start(&[
        "--tls-cert",
        &path(&server_pem.cert),
        "--tls-key",
        &path(&server_pem.key),
    ])
    .await;

    let channel = tls_channel(server.grpc_addr, &ca.pem(), None)
        .await
        .unwrap();
    let response = classify(&channel, None).await.expect("Classify over TLS");
    assert_eq!(response.results.len(), 1);
    assert_eq!(response.results[0].model.as_ref().unwrap().name, "tiny");

    // A plaintext client gets no service from the TLS port.
    let plain = Channel::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(plain) = plain {
        let status = classify(&plain, None).await.unwrap_err();
        assert_transport_error(&status);
    }
    // A client that does not trust the server's CA refuses it.
    let other = Ca::new("some other CA");
    match tls_channel(server.grpc_addr, &other.pem(), None).await {
        Err(_) => {}
        Ok(ch) => assert!(classify(&ch, None).await.is_err()),
    }

    // The HTTP API port speaks HTTPS.
    let (status, body) = https(server.http_addr, &ca.pem(), "GET", "/v2", &[], b"").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"name\""), "{body}");
    let mut plain = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .unwrap();
    plain
        .write_all(b"GET /v2 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = bounded("plaintext answer", plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "plaintext HTTP must not be served on the TLS port"
    );

    // The metrics port stays plaintext and says when the certificate expires.
    let expiry = scrape(
        server.metrics_addr,
        "brainai_tls_certificate_expiry_timestamp_seconds",
        &[],
    )
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expiry > now, "expiry {expiry} should be in the future");
    let failures = scrape(
        server.metrics_addr,
        "brainai_tls_handshake_failures_total",
        &["listener=\"grpc\""],
    )
    .await;
    assert!(
        failures >= 1.0,
        "the plaintext and untrusting clients failed their handshakes"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_good_wrong_ca_expired_and_missing_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("BrainAI server CA");
    let clients = Ca::new("Hospital client CA");
    let rogue = Ca::new("Rogue CA");
    let server_pem = ca.write_leaf(dir.path(), "server", true, false);
    let client_ca = clients.write_ca(&dir.path().join("clients.crt"));
    let server = start(&[
        "--tls-cert",
        &path(&server_pem.cert),
        "--tls-key",
        &path(&server_pem.key),
        "--tls-client-ca",
        &path(&client_ca),
    ])
    .await;

    let good = clients.leaf("pacs-router", false, false);
    let channel = tls_channel(server.grpc_addr, &ca.pem(), Some(good))
        .await
        .expect("a good client certificate connects");
    classify(&channel, None).await.expect("mutual TLS call");

    for (what, identity) in [
        ("wrong CA", Some(rogue.leaf("pacs-router", false, false))),
        ("expired", Some(clients.leaf("pacs-router", false, true))),
        ("no certificate", None),
    ] {
        // With TLS 1.3 the server's verdict on the client certificate arrives after the
        // client's side of the handshake: connect may succeed, the first call must not.
        if let Ok(channel) = tls_channel(server.grpc_addr, &ca.pem(), identity).await {
            let status = classify(&channel, None).await.unwrap_err();
            assert_transport_error(&status);
            let _ = what;
        }
    }
    let failures = scrape(
        server.metrics_addr,
        "brainai_tls_handshake_failures_total",
        &["listener=\"grpc\"", "reason=\"error\""],
    )
    .await;
    assert!(
        failures >= 3.0,
        "three refused client certificates, counted {failures}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_server_certificate_is_picked_up_live_without_dropping_calls() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new("CA before rotation");
    let new_ca = Ca::new("CA after rotation");
    let pem = old_ca.write_leaf(dir.path(), "server", true, false);
    let server = start(&[
        "--tls-cert",
        &path(&pem.cert),
        "--tls-key",
        &path(&pem.key),
        "--credentials-reload-s",
        "1",
    ])
    .await;
    let old_channel = tls_channel(server.grpc_addr, &old_ca.pem(), None)
        .await
        .unwrap();
    let mut client = TumorClassifierClient::new(old_channel.clone());

    // A call in flight across the rotation: a ClassifyStream kept open.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let message = |id: &str| pb::ClassifyStreamRequest {
        image: Some(image(id, data("flair_256_a.png"))),
        ..Default::default()
    };
    tx.send(message("before")).await.unwrap();
    let mut stream = bounded(
        "open stream",
        client.classify_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .unwrap()
    .into_inner();
    bounded("first answer", stream.message())
        .await
        .unwrap()
        .expect("answer before rotation");

    // Rotate: a new key and certificate from another CA, written the way cert-manager's volume
    // update lands (new files in place).
    let (cert, key) = new_ca.leaf("server", true, false);
    std::fs::write(&pem.key, key).unwrap();
    std::fs::write(&pem.cert, cert).unwrap();
    bounded("new connections to present the new certificate", async {
        loop {
            if let Ok(ch) = tls_channel(server.grpc_addr, &new_ca.pem(), None).await
                && classify(&ch, None).await.is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    // New connections no longer get the old certificate...
    match tls_channel(server.grpc_addr, &old_ca.pem(), None).await {
        Err(_) => {}
        Ok(ch) => assert!(classify(&ch, None).await.is_err()),
    }
    // ...while the call opened before the rotation goes on, and the old connection serves on.
    tx.send(message("after")).await.unwrap();
    let after = bounded("answer after rotation", stream.message())
        .await
        .unwrap()
        .expect("the stream opened before the rotation still answers");
    assert!(
        matches!(
            after.outcome,
            Some(pb::classify_stream_response::Outcome::Result(_))
        ),
        "{after:?}"
    );
    drop(tx);
    assert!(
        bounded("stream end", stream.message())
            .await
            .unwrap()
            .is_none()
    );
    classify(&old_channel, None)
        .await
        .expect("the connection opened before the rotation still serves");

    // Files that do not load leave the last good certificate in force.
    std::fs::write(&pem.key, "-----BEGIN PRIVATE KEY-----\nbroken\n").unwrap();
    bounded("the failed reload to be counted", async {
        while scrape(
            server.metrics_addr,
            "brainai_tls_reloads_total",
            &["result=\"error\""],
        )
        .await
            < 1.0
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let ch = tls_channel(server.grpc_addr, &new_ca.pem(), None)
        .await
        .unwrap();
    classify(&ch, None)
        .await
        .expect("still serving the last good certificate");
    assert!(
        scrape(
            server.metrics_addr,
            "brainai_tls_reloads_total",
            &["result=\"ok\""]
        )
        .await
            >= 1.0
    );
    server.shutdown().await.unwrap();
}

fn callers_file(dir: &Path) -> PathBuf {
    let file = dir.join("callers.toml");
    std::fs::write(
        &file,
        format!(
            "[[caller]]\nname = \"pacs\"\ntoken = \"{PACS_TOKEN}\"\n\n\
             [[caller]]\nname = \"viewer\"\ntoken = \"{VIEWER_TOKEN}\"\nscopes = [\"read\"]\n"
        ),
    )
    .unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_accepted_missing_wrong_and_without_scope() {
    let dir = tempfile::tempdir().unwrap();
    let callers = callers_file(dir.path());
    let server = start(&["--auth-callers", &path(&callers)]).await;
    let channel = connect(server.grpc_addr).await;

    classify(&channel, Some(PACS_TOKEN))
        .await
        .expect("pacs may classify");
    for (token, code) in [
        (None, Code::Unauthenticated),
        (
            Some("not-a-token-we-ever-issued-123"),
            Code::Unauthenticated,
        ),
        (Some(VIEWER_TOKEN), Code::PermissionDenied),
    ] {
        let status = classify(&channel, token).await.unwrap_err();
        assert_eq!(status.code(), code, "{token:?}: {status:?}");
        for secret in [PACS_TOKEN, VIEWER_TOKEN, "not-a-token-we-ever-issued"] {
            assert!(!status.message().contains(secret), "{status:?}");
        }
    }
    // The viewer may read.
    let mut request = tonic::Request::new(pb::ListModelsRequest::default());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {VIEWER_TOKEN}").parse().unwrap(),
    );
    let models = bounded(
        "ListModels",
        TumorClassifierClient::new(channel.clone()).list_models(request),
    )
    .await
    .expect("viewer may list models")
    .into_inner();
    assert!(!models.models.is_empty());
    // Health stays open; reflection needs a credential unless --auth-open-reflection.
    assert_eq!(
        health_status(&channel, "brainai.v1.TumorClassifier").await,
        ServingStatus::Serving as i32
    );
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel.clone(),
        );
    let list = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let refused = bounded(
        "reflection",
        reflection.server_reflection_info(tokio_stream::iter(vec![list])),
    )
    .await;
    match refused {
        Err(status) => assert_eq!(status.code(), Code::Unauthenticated),
        Ok(response) => {
            let status = response.into_inner().message().await.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated);
        }
    }

    // The HTTP API: the same callers, 401 and 403 with JSON.
    let png = data("flair_256_a.png");
    let no = http(
        server.http_addr,
        "POST",
        "/v1/classify",
        &[("content-type", "image/png")],
        &png,
    )
    .await;
    assert_eq!(no.status, 401, "{}", String::from_utf8_lossy(&no.body));
    assert!(
        no.headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("www-authenticate") && v.starts_with("Bearer")),
        "{:?}",
        no.headers
    );
    let viewer = format!("Bearer {VIEWER_TOKEN}");
    let denied = http(
        server.http_addr,
        "POST",
        "/v1/classify",
        &[("content-type", "image/png"), ("authorization", &viewer)],
        &png,
    )
    .await;
    assert_eq!(
        denied.status,
        403,
        "{}",
        String::from_utf8_lossy(&denied.body)
    );
    let pacs = format!("Bearer {PACS_TOKEN}");
    let ok = http(
        server.http_addr,
        "POST",
        "/v1/classify",
        &[("content-type", "image/png"), ("authorization", &pacs)],
        &png,
    )
    .await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(http_get(server.http_addr, "/v2/health/ready").await.0, 200);
    let refused = scrape(
        server.metrics_addr,
        "brainai_auth_refused_total",
        &["front_end=\"grpc\"", "code=\"UNAUTHENTICATED\""],
    )
    .await;
    assert!(refused >= 3.0, "{refused}");
    server.shutdown().await.unwrap();
}

/// The audit file's records, once `n` are there.
async fn records(file: &Path, n: usize) -> Vec<serde_json::Value> {
    bounded("audit records", async {
        loop {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let lines: Vec<_> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines.len() >= n {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_one_record_per_call_without_patient_data() {
    let dir = tempfile::tempdir().unwrap();
    let callers = callers_file(dir.path());
    let audit = dir.path().join("audit.jsonl");
    let server = start(&[
        "--auth-callers",
        &path(&callers),
        "--audit-log",
        &path(&audit),
    ])
    .await;
    let channel = connect(server.grpc_addr).await;
    classify(&channel, Some(PACS_TOKEN)).await.unwrap();
    classify(&channel, None).await.unwrap_err();
    // A DICOM instance full of (synthetic) patient data.
    let phi = std::fs::read(repo().join("tests/data/dicom/phi.dcm")).unwrap();
    let mut request = classify_request(Some(PACS_TOKEN));
    request.get_mut().images = vec![image("PHI-image-id", phi)];
    let dicom = bounded(
        "Classify DICOM",
        TumorClassifierClient::new(channel.clone()).classify(request),
    )
    .await
    .expect("DICOM classified")
    .into_inner();
    let uids = dicom.results[0].dicom.clone().unwrap();
    // Health is not audited.
    health_status(&channel, "").await;
    let pacs = format!("Bearer {PACS_TOKEN}");
    let rest = http(
        server.http_addr,
        "POST",
        "/v1/classify",
        &[("content-type", "image/png"), ("authorization", &pacs)],
        &data("flair_256_a.png"),
    )
    .await;
    assert_eq!(rest.status, 200);

    let lines = records(&audit, 4).await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let ok = &lines[0];
    assert_eq!(ok["caller"], "pacs");
    assert_eq!(ok["auth"], "token");
    assert_eq!(ok["front_end"], "grpc");
    assert_eq!(ok["method"], "brainai.v1.TumorClassifier/Classify");
    assert_eq!(ok["outcome"], "OK");
    assert_eq!(ok["images"], 1);
    assert_eq!(ok["peer"], "127.0.0.1");
    assert_eq!(ok["model"]["name"], "tiny");
    assert_eq!(ok["model"]["sha256"].as_str().unwrap().len(), 64);
    assert!(ok["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(ok["time"].as_str().unwrap().ends_with('Z'));
    let refused = &lines[1];
    assert_eq!(refused["outcome"], "UNAUTHENTICATED");
    assert_eq!(refused["caller"], "anonymous");
    assert_eq!(refused["images"], 0);
    let d = &lines[2];
    assert_eq!(d["dicom"][0]["study"], uids.study_instance_uid.as_str());
    assert_eq!(d["dicom"][0]["series"], uids.series_instance_uid.as_str());
    assert_eq!(
        d["dicom"][0]["sop_instance"],
        uids.sop_instance_uid.as_str()
    );
    let r = &lines[3];
    assert_eq!(r["front_end"], "rest");
    assert_eq!(r["method"], "POST /v1/classify");
    assert_eq!(r["outcome"], "200");
    assert_eq!(r["model"]["name"], "tiny");

    let text = std::fs::read_to_string(&audit).unwrap();
    for secret in [
        "PHI-",
        "19610314",
        "Jane",
        "secret-image-id",
        PACS_TOKEN,
        VIEWER_TOKEN,
    ] {
        assert!(
            !text.contains(secret),
            "{secret:?} reached the audit trail:\n{text}"
        );
    }
    assert_eq!(
        scrape(server.metrics_addr, "brainai_audit_records_total", &[]).await,
        4.0
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_sink_failures_fail_open_or_closed() {
    // An unwritable audit trail stops the start, naming it.
    let a = args(
        &fixture_model("tiny"),
        &["--audit-log", "/nonexistent-dir/audit.jsonl"],
    );
    let e = server::start(&a, None).await.err().expect("start-up error");
    assert!(
        e.to_string().contains("/nonexistent-dir/audit.jsonl"),
        "{e}"
    );

    // Writes that fail while running (/dev/full: ENOSPC on every write): counted, calls go on.
    let server = start(&["--audit-log", "/dev/full"]).await;
    let channel = connect(server.grpc_addr).await;
    for _ in 0..3 {
        classify(&channel, None).await.expect("fail-open serves on");
    }
    bounded("failures counted", async {
        while scrape(
            server.metrics_addr,
            "brainai_audit_write_failures_total",
            &[],
        )
        .await
            < 3.0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    server.shutdown().await.unwrap();

    // Fail-closed: once a write has failed, calls are refused UNAVAILABLE (health stays open).
    let server = start(&["--audit-log", "/dev/full", "--audit-fail-closed"]).await;
    let channel = connect(server.grpc_addr).await;
    let first = classify(&channel, None).await;
    assert!(
        first.is_ok(),
        "the sink was healthy when the first call came: {first:?}"
    );
    let status = bounded("a refusal", async {
        loop {
            match classify(&channel, None).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(status) => return status,
            }
        }
    })
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("audit"), "{status:?}");
    assert_eq!(
        health_status(&channel, "").await,
        ServingStatus::Serving as i32
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_classifies_over_mutual_tls_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("BrainAI server CA");
    let clients = Ca::new("Hospital client CA");
    let server_pem = ca.write_leaf(dir.path(), "server", true, false);
    let client_pem = clients.write_leaf(dir.path(), "pacs-router", false, false);
    let ca_file = ca.write_ca(&dir.path().join("ca.crt"));
    let client_ca = clients.write_ca(&dir.path().join("clients.crt"));
    let callers = callers_file(dir.path());
    let server = start(&[
        "--tls-cert",
        &path(&server_pem.cert),
        "--tls-key",
        &path(&server_pem.key),
        "--tls-client-ca",
        &path(&client_ca),
        "--auth-callers",
        &path(&callers),
    ])
    .await;
    let png = repo().join("tests/data/flair_256_a.png");
    let run = |token: Option<&'static str>, with_cert: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_brainai"));
        cmd.args([
            "classify",
            "--server",
            &format!("https://localhost:{}", server.grpc_addr.port()),
            "--ca",
            &path(&ca_file),
        ]);
        if with_cert {
            cmd.args([
                "--cert",
                &path(&client_pem.cert),
                "--key",
                &path(&client_pem.key),
            ]);
        }
        cmd.arg(&png).env_remove("BRAINAI_TOKEN");
        if let Some(token) = token {
            cmd.env("BRAINAI_TOKEN", token);
        }
        cmd
    };
    let commands = [
        run(Some(PACS_TOKEN), true),
        run(None, true),
        run(Some(PACS_TOKEN), false),
    ];
    let out = tokio::task::spawn_blocking(move || {
        commands.map(|mut c| c.output().expect("run brainai classify"))
    });
    let [ok, missing, no_cert] = bounded("the CLI", out).await.unwrap();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout.contains("flair_256_a.png"), "{stdout}");
    // With a certificate but no token, the certificate's CN names no caller: PERMISSION_DENIED.
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(err.contains("PermissionDenied"), "{err}");
    let err = String::from_utf8_lossy(&no_cert.stderr);
    assert!(!no_cert.status.success(), "no client certificate must fail");
    for out in [&ok, &missing, &no_cert] {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains(PACS_TOKEN), "the token leaked: {all}");
    }
    let _ = err;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_expiry_is_exported_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("BrainAI test CA");
    let pem = ca.write_leaf(dir.path(), "server", true, false);
    let server = start(&["--tls-cert", &path(&pem.cert), "--tls-key", &path(&pem.key)]).await;
    // Before any reload, any call, any handshake: the alert on a renewal that never came needs it.
    let (_, text) = http_get(server.metrics_addr, "/metrics").await;
    assert_eq!(
        metric_value(
            &text,
            "brainai_tls_certificate_expiry_timestamp_seconds",
            &[]
        ),
        NOT_AFTER,
        "{text}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_stops_the_start_and_is_never_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("BrainAI test CA");
    let expired = ca.write_leaf(dir.path(), "expired", true, true);
    let a = args(
        &fixture_model("tiny"),
        &[
            "--tls-cert",
            &path(&expired.cert),
            "--tls-key",
            &path(&expired.key),
        ],
    );
    let e = server::start(&a, None)
        .await
        .err()
        .expect("an expired certificate stops the start")
        .to_string();
    assert!(
        e.contains(&path(&expired.cert)) && e.contains("expired on 2021-01-01"),
        "{e}"
    );

    // Running: a renewal that writes an expired certificate leaves the good one in force.
    let pem = ca.write_leaf(dir.path(), "server", true, false);
    let server = start(&[
        "--tls-cert",
        &path(&pem.cert),
        "--tls-key",
        &path(&pem.key),
        "--credentials-reload-s",
        "1",
    ])
    .await;
    std::fs::copy(&expired.key, &pem.key).unwrap();
    std::fs::copy(&expired.cert, &pem.cert).unwrap();
    bounded("the refused reload to be counted", async {
        while scrape(
            server.metrics_addr,
            "brainai_tls_reloads_total",
            &["result=\"error\""],
        )
        .await
            < 1.0
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // A client that checks validity (rustls) still connects: the old certificate is served.
    let channel = tls_channel(server.grpc_addr, &ca.pem(), None)
        .await
        .expect("the valid certificate is still served");
    classify(&channel, None).await.expect("served as before");
    assert_eq!(
        scrape(
            server.metrics_addr,
            "brainai_tls_certificate_expiry_timestamp_seconds",
            &[]
        )
        .await,
        NOT_AFTER,
        "the expiry of the certificate in force"
    );
    server.shutdown().await.unwrap();
}

/// Log lines written while `f` runs on this thread (which is where `server::start` reads the
/// configuration).
#[derive(Clone, Default)]
struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_without_tls_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let callers = callers_file(dir.path());
    let log = LogCapture::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let server = {
        let _guard = tracing::subscriber::set_default(subscriber);
        start(&["--auth-callers", &path(&callers)]).await
    };
    let text = log.text();
    assert!(
        text.contains("WARN") && text.contains("--auth-callers without --tls-cert"),
        "{text}"
    );
    assert!(!text.contains(PACS_TOKEN) && !text.contains(VIEWER_TOKEN));
    assert_eq!(
        scrape(
            server.metrics_addr,
            "brainai_insecure_config",
            &["reason=\"tokens_without_tls\""]
        )
        .await,
        1.0
    );
    server.shutdown().await.unwrap();

    // With TLS: nothing to warn about, and the gauge says so.
    let ca = Ca::new("BrainAI test CA");
    let pem = ca.write_leaf(dir.path(), "server", true, false);
    let server = start(&[
        "--auth-callers",
        &path(&callers),
        "--tls-cert",
        &path(&pem.cert),
        "--tls-key",
        &path(&pem.key),
    ])
    .await;
    let (_, text) = http_get(server.metrics_addr, "/metrics").await;
    assert!(
        text.contains("brainai_insecure_config{reason=\"tokens_without_tls\"} 0"),
        "{text}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_alone_lets_a_certificate_call_whatever_else_comes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("BrainAI server CA");
    let clients = Ca::new("Hospital client CA");
    let server_pem = ca.write_leaf(dir.path(), "server", true, false);
    let client_ca = clients.write_ca(&dir.path().join("clients.crt"));
    let server = start(&[
        "--tls-cert",
        &path(&server_pem.cert),
        "--tls-key",
        &path(&server_pem.key),
        "--tls-client-ca",
        &path(&client_ca),
    ])
    .await;
    let channel = tls_channel(
        server.grpc_addr,
        &ca.pem(),
        Some(clients.leaf("viewer", false, false)),
    )
    .await
    .expect("a good client certificate connects");
    // The README: with mutual TLS and no callers file, a certificate the client CA signed may
    // call everything, with a bearer token the server never issued (a gateway's) or none.
    classify(&channel, None).await.expect("no token");
    classify(&channel, Some("a-gateway-token-0123456789"))
        .await
        .expect("a token nobody issued is not needed, so not checked");
    server.shutdown().await.unwrap();
}
