//! Shared helpers of the integration tests (and of `benches/serving.rs` and
//! `benches/device_bound.rs`): start the real server on 127.0.0.1:0, connect the generated client,
//! wait for health, scrape metrics, read test images, build model repositories, and wrap the real
//! ONNX Runtime backend in the shared test probe.
#![allow(dead_code)]

pub mod certs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use brainai::backend::ort::{OrtBackend, OrtOptions, find_runtime_library, init_runtime};
use brainai::backend::testing::{BatchLog, Gate, Probe};
use brainai::backend::{Backend, BackendFactory, Device};
use brainai::config::{Cli, Command, ServeArgs};
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

/// The median of a bench's rounds (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
    serve_args(&["--model-dir", &model_dir.display().to_string()], extra)
}

/// Serve arguments for every model of `repository`, plus `extra` flags.
pub fn repository_args(repository: &Path, extra: &[&str]) -> ServeArgs {
    serve_args(
        &["--model-repository", &repository.display().to_string()],
        extra,
    )
}

fn serve_args(source: &[&str], extra: &[&str]) -> ServeArgs {
    let mut argv: Vec<String> = vec!["brainai".into(), "serve".into()];
    argv.extend(source.iter().map(|s| s.to_string()));
    argv.extend([
        "--http-addr".into(),
        "127.0.0.1:0".into(),
        "--grpc-addr".into(),
        "127.0.0.1:0".into(),
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
    ]);
    if !extra.contains(&"--intra-op-threads") {
        // Tiny models: one thread each keeps parallel tests from oversubscribing the cores.
        argv.extend(["--intra-op-threads".into(), "1".into()]);
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    match Cli::parse_from(argv).command {
        Command::Serve(args) => *args,
        _ => unreachable!(),
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
    bounded(
        "connect",
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
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
    wait_for_service_health(channel, server::SERVICE_NAME, status).await;
}

/// Waits until the health service `service` reports `status`.
pub async fn wait_for_service_health(channel: &Channel, service: &str, status: ServingStatus) {
    let mut health = HealthClient::new(channel.clone());
    let watch = async {
        let mut stream = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
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

/// Metric samples of `name` with all of `labels`, from one scrape.
pub async fn scrape(addr: SocketAddr, name: &str, labels: &[&str]) -> f64 {
    let (code, text) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200, "GET /metrics");
    metric_value(&text, name, labels)
}

pub fn image(id: &str, data: Vec<u8>) -> pb::Image {
    pb::Image {
        id: id.into(),
        data: data.into(),
        format: pb::ImageFormat::Unspecified as i32,
        raw: None,
    }
}

pub fn request(images: Vec<pb::Image>) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        images,
        ..Default::default()
    }
}

/// A request for `model` (and `version`, empty: the highest).
pub fn request_for(model: &str, version: &str, images: Vec<pb::Image>) -> pb::ClassifyRequest {
    pb::ClassifyRequest {
        images,
        model: model.into(),
        version: version.into(),
        ..Default::default()
    }
}

/// Raw 8-bit pixels with every value `value`.
pub fn flat_image(id: &str, width: u32, height: u32, channels: u32, value: u8) -> pb::Image {
    pb::Image {
        id: id.into(),
        data: vec![value; (width * height * channels) as usize].into(),
        format: pb::ImageFormat::Raw as i32,
        raw: Some(pb::RawPixels {
            width,
            height,
            channels,
        }),
    }
}

/// A DICOM instance of series `series` made from tests/data/dicom/ts_explicit_le.dcm (an axial
/// MR FLAIR slice): SOP Instance UID `<series>.<number>`, Instance Number `number`, at
/// z = 5·number mm, with Modality `modality`.
pub fn dicom_slice(series: &str, number: u32, modality: &str) -> Vec<u8> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let bytes = data("dicom/ts_explicit_le.dcm");
    let mut obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(&bytes[..])
        .expect("the template parses");
    let sop = format!("{series}.{number}");
    let text = |tag, vr, value: String| DataElement::new(tag, vr, PrimitiveValue::from(value));
    obj.put(text(tags::SOP_INSTANCE_UID, VR::UI, sop.clone()));
    obj.put(text(tags::SERIES_INSTANCE_UID, VR::UI, series.into()));
    obj.put(text(tags::INSTANCE_NUMBER, VR::IS, number.to_string()));
    obj.put(text(tags::MODALITY, VR::CS, modality.into()));
    obj.put(text(
        tags::IMAGE_POSITION_PATIENT,
        VR::DS,
        format!("-100\\-90\\{}", 5 * number),
    ));
    obj.put(text(
        tags::IMAGE_ORIENTATION_PATIENT,
        VR::DS,
        "1\\0\\0\\0\\1\\0".into(),
    ));
    obj.update_meta(|meta| meta.media_storage_sop_instance_uid = sop);
    let mut out = Vec::new();
    obj.write_all(&mut out).expect("written to memory");
    out
}

/// Copies the fixture model `fixture` into `repository/name` (model.toml and every version).
pub fn copy_model(fixture: &str, repository: &Path, name: &str) -> PathBuf {
    let src = fixture_model(fixture);
    let dst = repository.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(src.join("model.toml"), dst.join("model.toml")).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        if entry.path().join("model.onnx").is_file() {
            let version = dst.join(entry.file_name());
            std::fs::create_dir_all(&version).unwrap();
            std::fs::copy(entry.path().join("model.onnx"), version.join("model.onnx")).unwrap();
        }
    }
    dst
}

/// Puts `onnx` in as version `version` of the model in `model_dir`, atomically (written aside,
/// then renamed), as a deployment tool would.
pub fn add_version(model_dir: &Path, version: u64, onnx: &[u8]) {
    let staging = model_dir.join(format!(".staging-{version}"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("model.onnx"), onnx).unwrap();
    std::fs::rename(&staging, model_dir.join(version.to_string())).unwrap();
}

/// The models `ListModels` reports.
pub async fn list_models(channel: &Channel) -> pb::ListModelsResponse {
    TumorClassifierClient::new(channel.clone())
        .list_models(pb::ListModelsRequest {})
        .await
        .expect("ListModels")
        .into_inner()
}

/// The real ONNX Runtime backend of every model, wrapped in the shared test probe: every batch is
/// logged and passes `gate` (open unless the test closes it); each instance's start-up first
/// passes `start` (open unless the test closes it).
pub struct Probed {
    pub factory: BackendFactory,
    pub log: BatchLog,
    pub gate: Gate,
    pub start: Gate,
}

pub fn probed_ort() -> Probed {
    let library = find_runtime_library(None).expect("make setup installs onnxruntime");
    init_runtime(&library).expect("ONNX Runtime loads");
    let (log, gate, start) = (BatchLog::default(), Gate::new(), Gate::new());
    let (l, g, st) = (log.clone(), gate.clone(), start.clone());
    let factory: BackendFactory = Arc::new(move |spec, batch_sizes, _instance| {
        st.wait();
        let inner = OrtBackend::open(
            spec,
            OrtOptions {
                device: Device::Cpu,
                intra_op_threads: 1,
                intra_op_spinning: true,
                batch_sizes,
                host_memory: Default::default(),
            },
        )?;
        Ok(Box::new(Probe {
            inner,
            log: l.clone(),
            gate: g.clone(),
            input_len: spec.config.input.image_len(),
        }) as Box<dyn Backend>)
    });
    Probed {
        factory,
        log,
        gate,
        start,
    }
}

/// For a server whose runs a test holds at a gate: every run on its instance thread. A tiny
/// model's batch would otherwise run where it is formed (`--inline-run-us`), on an async worker of
/// the runtime the test itself runs on, and a held run would hold that worker.
pub const HELD_RUNS: &[&str] = &["--inline-run-us", "0"];

/// The batches run, and the gate each run waits at, of a [`serve_gated`] server.
pub struct Gated {
    pub log: BatchLog,
    pub gate: Gate,
}

/// Serves the fixture `model` over the probed ONNX Runtime backend; once it is warm, clears the
/// batch log (warm-up runs) and closes the gate, so each run waits for `gate.release`. Runs stay
/// on the instance threads (`--inline-run-us 0`, see [`HELD_RUNS`]).
pub async fn serve_gated(model: &str, extra: &[&str]) -> (TestServer, Gated) {
    let h = probed_ort();
    let extra = [extra, HELD_RUNS].concat();
    let t = serve(args(&fixture_model(model), &extra), Some(h.factory)).await;
    h.log.clear();
    h.gate.close();
    let gated = Gated {
        log: h.log,
        gate: h.gate,
    };
    (t, gated)
}

/// A gRPC channel straight over one HTTP/2 connection, without tonic's client-side deadline
/// enforcement: a call with a `grpc-timeout` header gets the *server's* answer to its deadline.
#[derive(Clone)]
pub struct RawH2(
    hyper::client::conn::http2::SendRequest<tonic::body::Body>,
    SocketAddr,
);

impl tower::Service<hyper::Request<tonic::body::Body>> for RawH2 {
    type Response = hyper::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, hyper::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut request: hyper::Request<tonic::body::Body>) -> Self::Future {
        // HTTP/2 requests carry scheme and authority (tonic's channel adds them).
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        *request.uri_mut() = format!("http://{}{path}", self.1)
            .parse()
            .expect("a valid URI");
        let mut sender = self.0.clone();
        Box::pin(async move { sender.send_request(request).await })
    }
}

pub async fn raw_h2(addr: SocketAddr) -> RawH2 {
    let stream = bounded("connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(conn);
    RawH2(sender, addr)
}

/// Waits until `cond` holds, yielding to the runtime in between (bounded by PATIENCE).
pub async fn until(what: &str, cond: impl Fn() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("gave up waiting for {what}"));
}

/// Awaits `future` for at most PATIENCE (a hang guard, not a timing assertion).
pub async fn bounded<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish"))
}

/// Waits until the drain has begun: `/readyz` on the metrics port (which answers to the end)
/// says 503, and the inference port `closed` refuses new connections (its listener is dropped
/// and every connection sent a GOAWAY when the drain starts).
pub async fn until_draining(metrics: SocketAddr, closed: &[SocketAddr]) {
    bounded("/readyz to say 503", async {
        while http_get(metrics, "/readyz").await.0 != 503 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    for &addr in closed {
        bounded("the port to refuse connections", async {
            while tokio::net::TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
}

/// A call that hyper's HTTP/2 client had opened but whose HEADERS it wrote after its answer to
/// the server's shutdown PING (it answers PINGs before queued streams), so the server's final
/// GOAWAY (RFC 9113 §6.8, sent on that answer) does not cover it: h2 fails it with the GOAWAY's
/// NO_ERROR, which tonic reports as INTERNAL. The server never saw it (the tests check the
/// server's count of answered calls); no server-side setting of hyper/h2 can wait longer.
/// Told apart by the error's source (the h2 crate is no direct dependency to downcast to).
pub fn refused_by_goaway(status: &tonic::Status) -> bool {
    let source = format!("{:?}", std::error::Error::source(status));
    status.code() == tonic::Code::Internal
        && source.contains("GoAway(")
        && source.contains("NO_ERROR, Remote")
}

/// A call made on a channel whose connection got the drain's GOAWAY, with the port closed: it
/// was never processed. tonic reports that as UNAVAILABLE (could not connect), as CANCELLED
/// "operation was canceled" when the request had already been handed to the connection the
/// GOAWAY closed (hyper's pool gives the request back unsent), or as INTERNAL when hyper wrote
/// it after its answer to the shutdown PING, past the final GOAWAY ([`refused_by_goaway`]);
/// every way the caller may retry elsewhere.
pub fn assert_unsent(err: &tonic::Status) {
    assert!(
        err.code() == tonic::Code::Unavailable
            || (err.code() == tonic::Code::Cancelled
                && err.message().contains("operation was canceled"))
            || refused_by_goaway(err),
        "{:?}: {}",
        err.code(),
        err.message()
    );
}

/// CRC-32 (IEEE) of a PNG chunk's type and data, for tests that build or repair PNGs by hand.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Plain HTTP/1.1 GET on the metrics port; returns (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = bounded("connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect metrics port");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    bounded("HTTP response", stream.read_to_end(&mut buf))
        .await
        .unwrap();
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

/// An HTTP/1.1 response: status, headers (lower-case names), body.
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut stream = bounded("connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    bounded("HTTP response", stream.read_to_end(&mut buf))
        .await
        .unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response head");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("an HTTP status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = buf[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&data[..eol])
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .expect("a chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
}

/// A multipart/form-data body of files (field `image`); returns (content type, body).
pub fn multipart(files: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "brainai-test-boundary-7d41";
    let mut body = Vec::new();
    for (name, data) in files {
        body.extend(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// A multipart/form-data body of files, each in its own named field (`/v1/segment`: the field
/// is the sequence); returns (content type, body).
pub fn multipart_fields(fields: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "brainai-test-boundary-9c02";
    let mut body = Vec::new();
    for (field, data) in fields {
        body.extend(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{field}.png\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend(b"\r\n");
    }
    body.extend(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
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
    reference_script("reference.py", args)
}

/// Runs `tests/reference/<script>` with `args`; its stdout.
pub fn reference_script(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(python())
        .arg(repo().join("tests/reference").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run tests/reference/{script}: {e}"));
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Classifies the named files of tests/data in one `Classify` call (image ids = file names).
pub async fn classify_files(t: &mut TestServer, names: &[&str]) -> Vec<pb::Classification> {
    let images = names.iter().map(|n| image(n, data(n))).collect();
    let results = bounded("classify", t.client.classify(request(images)))
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

/// A model directory whose model.toml is tiny's with `[input]` replaced (tiny's graph as the
/// model file: only preprocessing is compared).
pub fn variant_dir(root: &Path, name: &str, input: &str, graph_of: &str) -> PathBuf {
    let src = fixture_model(graph_of);
    let toml = std::fs::read_to_string(src.join("model.toml")).unwrap();
    let start = toml.find("[input]").unwrap();
    let end = toml.find("[output]").unwrap();
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join("1")).unwrap();
    std::fs::write(
        dir.join("model.toml"),
        format!("{}[input]\n{input}\n\n{}", &toml[..start], &toml[end..]),
    )
    .unwrap();
    std::fs::copy(src.join("1/model.onnx"), dir.join("1/model.onnx")).unwrap();
    dir
}

pub fn input_section(
    layout: &str,
    (w, h): (u32, u32),
    color: &str,
    filter: &str,
    scaling: &str,
) -> String {
    format!(
        "name = \"input\"\nlayout = \"{layout}\"\nheight = {h}\nwidth = {w}\ncolor = \"{color}\"\n\
         resize_filter = \"{filter}\"\n{scaling}"
    )
}

/// The tensors `tests/reference/<script> preprocess` makes of `images` for the model in `dir`,
/// one Vec per image.
pub fn reference_tensors(
    script: &str,
    dir: &Path,
    images: &[PathBuf],
    image_len: usize,
) -> Vec<Vec<f32>> {
    let out = tempfile::NamedTempFile::new().unwrap();
    let mut argv = vec![
        "preprocess".to_string(),
        "--model-dir".into(),
        dir.display().to_string(),
        "--out".into(),
        out.path().display().to_string(),
    ];
    argv.extend(images.iter().map(|p| p.display().to_string()));
    reference_script(script, &argv.iter().map(String::as_str).collect::<Vec<_>>());
    let values: Vec<f32> = std::fs::read(out.path())
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(
        values.len(),
        image_len * images.len(),
        "reference tensor size"
    );
    values.chunks(image_len).map(<[f32]>::to_vec).collect()
}

/// The audit file's records, once at least `n` are there (bounded by PATIENCE).
pub async fn audit_records(file: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    bounded("audit records", async {
        loop {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let lines: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if lines.len() >= n {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// The executable `name` on the PATH, or a failure naming the Debian package that provides it.
pub fn tool(name: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not on the PATH: install the Debian package `{package}` \
                 (apt-get install {package}); this test does not skip without it"
            )
        })
}

/// dicom3tools' `dciodvfy` on `path`: fails on any "Error" line or when it did not check the
/// file as `iod` (e.g. "ComprehensiveSR", "Segmentation"); returns the warnings.
pub fn dciodvfy(path: &Path, iod: &str) -> Vec<String> {
    let output = std::process::Command::new(tool("dciodvfy", "dicom3tools"))
        .arg(path)
        .output()
        .expect("dciodvfy runs");
    // dciodvfy reports on stderr; take both.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("Error")).collect();
    assert!(
        errors.is_empty(),
        "dciodvfy found errors in {}:\n{text}",
        path.display()
    );
    assert!(
        text.contains(iod),
        "dciodvfy did not check the file as a {iod}:\n{text}"
    );
    let warnings: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("Warning"))
        .map(str::to_string)
        .collect();
    for warning in &warnings {
        eprintln!("dciodvfy {}: {warning}", path.display());
    }
    warnings
}

/// A mask PNG's width, height and values.
pub fn decode_mask(png: &[u8]) -> (u32, u32, Vec<u8>) {
    let image = image::load_from_memory(png)
        .expect("the mask is a PNG")
        .to_luma8();
    (image.width(), image.height(), image.into_raw())
}

/// Writes a pydicom phantom study (`tests/dicom/make_study.py`, whose text documents `spec`) into
/// `dir`; its files, sorted.
pub fn write_study(dir: &Path, spec: &serde_json::Value) -> Vec<PathBuf> {
    let out = std::process::Command::new(python())
        .arg(repo().join("tests/dicom/make_study.py"))
        .arg(dir)
        .arg(spec.to_string())
        .output()
        .expect("make_study.py runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut files = files_under(dir);
    files.sort();
    files
}

/// Every file under `dir`, recursively (none when it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}
