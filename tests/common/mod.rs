//! Shared helpers of the integration tests: start the real server on 127.0.0.1:0, connect the
//! generated client, wait for health, scrape metrics, read test images.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use brainai::config::{Cli, Command, ServeArgs};
use brainai::engine::BackendFactory;
use brainai::pb;
use brainai::pb::tumor_classifier_client::TumorClassifierClient;
use brainai::server::{self, RunningServer};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Upper bound for waiting on the server in tests (a hang guard, not a timing assertion).
pub const PATIENCE: Duration = Duration::from_secs(120);

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture_model(name: &str) -> PathBuf {
    repo().join("tests/fixtures/models").join(name)
}

pub fn data(name: &str) -> Vec<u8> {
    let path = repo().join("tests/data").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn python() -> PathBuf {
    let py = repo().join(".venv/bin/python");
    assert!(py.is_file(), "{} missing: run `make setup`", py.display());
    py
}

/// Serve arguments for `model_dir` on ephemeral loopback ports, plus `extra` flags.
pub fn args(model_dir: &Path, extra: &[&str]) -> ServeArgs {
    let mut argv: Vec<String> = vec![
        "brainai".into(),
        "serve".into(),
        "--model-dir".into(),
        model_dir.display().to_string(),
        "--grpc-addr".into(),
        "127.0.0.1:0".into(),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
    ];
    if !extra.contains(&"--intra-op-threads") {
        // Tiny models: one thread each keeps parallel tests from oversubscribing the cores.
        argv.extend(["--intra-op-threads".into(), "1".into()]);
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    match Cli::parse_from(argv).command {
        Command::Serve(args) => args,
        Command::Classify(_) => unreachable!(),
    }
}

pub struct TestServer {
    pub server: RunningServer,
    pub client: TumorClassifierClient<Channel>,
    pub channel: Channel,
}

impl TestServer {
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.server.grpc_addr)
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.server.metrics_addr
    }
}

pub async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the test server")
}

/// Starts a server (optionally with a test backend factory) and waits until health says SERVING.
pub async fn serve(args: ServeArgs, factory: Option<BackendFactory>) -> TestServer {
    let server = server::start(&args, factory).await.expect("server starts");
    let channel = connect(server.grpc_addr).await;
    wait_for_health(&channel, ServingStatus::Serving).await;
    let client = TumorClassifierClient::new(channel.clone())
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    TestServer {
        server,
        client,
        channel,
    }
}

/// Waits (through the health Watch stream, no polling) until `service` reports `status`.
pub async fn wait_for_health(channel: &Channel, status: ServingStatus) {
    let mut health = HealthClient::new(channel.clone());
    let watch = async {
        let mut stream = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: server::SERVICE_NAME.into(),
            })
            .await
            .expect("health watch")
            .into_inner();
        while let Some(update) = stream.message().await.expect("health stream") {
            if update.status == status as i32 {
                return;
            }
        }
        panic!("health stream ended before {status:?}");
    };
    tokio::time::timeout(PATIENCE, watch)
        .await
        .unwrap_or_else(|_| panic!("health never reported {status:?}"));
}

pub async fn health_status(channel: &Channel, service: &str) -> i32 {
    HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status
}

pub fn image(id: &str, data: Vec<u8>) -> pb::Image {
    pb::Image {
        id: id.into(),
        data,
        format: pb::ImageFormat::Unspecified as i32,
        raw: None,
    }
}

pub fn request(images: Vec<pb::Image>) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        images,
        model: String::new(),
    }
}

/// Plain HTTP/1.1 GET on the metrics port; returns (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics port");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("HTTP status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Sum of every sample of `name` whose labels contain all of `labels` (e.g. `reason="deadline"`).
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// Runs the independent Python reference (Pillow + numpy + onnxruntime) and returns stdout.
pub fn reference(args: &[&str]) -> String {
    let out = std::process::Command::new(python())
        .arg(repo().join("tests/reference/reference.py"))
        .args(args)
        .output()
        .expect("run tests/reference/reference.py");
    assert!(
        out.status.success(),
        "reference.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Classifies the named files of tests/data in one `Classify` call (image ids = file names).
pub async fn classify_files(t: &mut TestServer, names: &[&str]) -> Vec<pb::Classification> {
    let images = names.iter().map(|n| image(n, data(n))).collect();
    let results = t
        .client
        .classify(request(images))
        .await
        .expect("classify")
        .into_inner()
        .results;
    assert_eq!(results.len(), names.len(), "one result per image");
    results
}

/// Classifies the named test images in one call and checks every probability against
/// onnxruntime's Python API on the Pillow-preprocessed tensor (tolerance 1e-4). Returns the results.
pub async fn classify_matches_reference(
    t: &mut TestServer,
    model_dir: &Path,
    names: &[&str],
) -> Vec<pb::Classification> {
    let served = classify_files(t, names).await;
    let mut argv = vec![
        "classify".to_string(),
        "--model-dir".into(),
        model_dir.display().to_string(),
    ];
    argv.extend(
        names
            .iter()
            .map(|n| repo().join("tests/data").join(n).display().to_string()),
    );
    let reference: serde_json::Value = serde_json::from_str(&reference(
        &argv.iter().map(String::as_str).collect::<Vec<_>>(),
    ))
    .unwrap();
    let expected = reference["probabilities"].as_array().unwrap();
    for (i, r) in served.iter().enumerate() {
        for (j, p) in r.probabilities.iter().enumerate() {
            let e = expected[i][j].as_f64().unwrap() as f32;
            assert!(
                (p.probability - e).abs() <= 1e-4,
                "{} {}: label {j}: served {} vs onnxruntime-python {e}",
                model_dir.display(),
                names[i],
                p.probability
            );
        }
    }
    served
}
