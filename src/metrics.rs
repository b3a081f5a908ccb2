//! Every Prometheus metric the service exports, described once, and the HTTP endpoint that serves
//! them (`/metrics`), with liveness (`/healthz`) and readiness (`/readyz`).
//!
//! Metric names are an interface (dashboards and alerts use them): they are listed in the README.
//! Labels never carry patient data or image ids.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

pub const REQUESTS_TOTAL: &str = "brainai_requests_total";
pub const REQUEST_DURATION: &str = "brainai_request_duration_seconds";
pub const QUEUE_DURATION: &str = "brainai_queue_duration_seconds";
pub const PREPROCESS_DURATION: &str = "brainai_preprocess_duration_seconds";
pub const INFERENCE_DURATION: &str = "brainai_inference_duration_seconds";
pub const BATCH_SIZE: &str = "brainai_batch_size";
pub const BATCH_OCCUPANCY: &str = "brainai_batch_occupancy_ratio";
pub const QUEUE_DEPTH: &str = "brainai_queue_depth";
pub const IMAGES_TOTAL: &str = "brainai_images_total";
pub const DROPPED_TOTAL: &str = "brainai_dropped_total";
pub const MODEL_INFO: &str = "brainai_model_info";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
            let ratio = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &sizes))
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BATCH_OCCUPANCY.into()), &ratio)
                })
                .expect("bucket lists are non-empty constants")
                .install_recorder()
                .expect("the Prometheus recorder is installed once per process");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        Unit::Count,
        "gRPC calls answered, by rpc and gRPC status code name."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Wall time of a gRPC call, by rpc."
    );
    describe_histogram!(
        QUEUE_DURATION,
        Unit::Seconds,
        "Time an image waited in the batcher queue."
    );
    describe_histogram!(
        PREPROCESS_DURATION,
        Unit::Seconds,
        "Decode + resize + normalise time of one image."
    );
    describe_histogram!(
        INFERENCE_DURATION,
        Unit::Seconds,
        "Model run time of one batch."
    );
    describe_histogram!(
        BATCH_SIZE,
        Unit::Count,
        "Images per batch run by the model."
    );
    describe_histogram!(
        BATCH_OCCUPANCY,
        Unit::Count,
        "Batch size divided by max batch size (how full the batches are; GPU batch occupancy)."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Images waiting in the batcher queue."
    );
    describe_counter!(
        IMAGES_TOTAL,
        Unit::Count,
        "Images that received a classification."
    );
    describe_counter!(
        DROPPED_TOTAL,
        Unit::Count,
        "Images dropped before running, by reason (deadline, cancelled, queue_full)."
    );
    // Export the counters at zero from the start, so rate() and alerts see a series at once.
    for reason in ["deadline", "cancelled", "queue_full"] {
        counter!(DROPPED_TOTAL, "reason" => reason).increment(0);
    }
    counter!(IMAGES_TOTAL).increment(0);
    describe_gauge!(
        MODEL_INFO,
        Unit::Count,
        "The loaded model; always 1. Labels: name, version, sha256, device."
    );
}

pub fn request_done(rpc: &'static str, code: tonic::Code, seconds: f64) {
    counter!(REQUESTS_TOTAL, "rpc" => rpc, "code" => code_name(code)).increment(1);
    histogram!(REQUEST_DURATION, "rpc" => rpc).record(seconds);
}

pub fn preprocess_duration(seconds: f64) {
    histogram!(PREPROCESS_DURATION).record(seconds);
}

pub fn queue_duration(seconds: f64) {
    histogram!(QUEUE_DURATION).record(seconds);
}

pub fn batch_done(size: usize, max_batch_size: usize, seconds: f64) {
    histogram!(INFERENCE_DURATION).record(seconds);
    histogram!(BATCH_SIZE).record(size as f64);
    histogram!(BATCH_OCCUPANCY).record(size as f64 / max_batch_size as f64);
}

pub fn images_classified(n: usize) {
    counter!(IMAGES_TOTAL).increment(n as u64);
}

pub fn set_queue_depth(depth: usize) {
    gauge!(QUEUE_DEPTH).set(depth as f64);
}

pub fn dropped(reason: &'static str, n: usize) {
    counter!(DROPPED_TOTAL, "reason" => reason).increment(n as u64);
}

pub fn model_info(name: &str, version: &str, sha256: &str, device: &str) {
    gauge!(MODEL_INFO, "name" => name.to_string(), "version" => version.to_string(),
        "sha256" => sha256.to_string(), "device" => device.to_string())
    .set(1.0);
}

/// gRPC status code as the canonical upper-case name (`OK`, `INVALID_ARGUMENT`, …).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `/metrics`, `/healthz` (process up) and `/readyz` (model loaded and warm, not draining)
/// on `listener` until the task is dropped.
pub async fn serve_http(listener: TcpListener, handle: PrometheusHandle, ready: Arc<AtomicBool>) {
    // Histograms are drained into their buckets by upkeep; run it regularly as well as on scrape.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    loop {
        let Ok((stream, _peer)) = listener.accept().await else {
            continue;
        };
        let (handle, ready) = (handle.clone(), ready.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let (handle, ready) = (handle.clone(), ready.clone());
                async move { Ok::<_, Infallible>(route(&req, &handle, &ready)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn route(
    req: &Request<Incoming>,
    handle: &PrometheusHandle,
    ready: &AtomicBool,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static header values are valid")
    };
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if ready.load(Ordering::SeqCst) => {
            text(StatusCode::OK, "text/plain", "ready\n".into())
        }
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
