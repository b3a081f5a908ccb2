//! Every Prometheus metric the service exports, described once. Per-model metrics carry `model` and
//! `version` labels; [`ModelMetrics`] holds one version's handles, made when it loads. The HTTP
//! endpoint that serves them is on the probes port (`api::probes`).
//!
//! Metric names are an interface (dashboards, alerts and the autoscaler use them): they are listed
//! in the README. Labels never carry patient data, image ids or caller-supplied strings.

use std::sync::OnceLock;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::priority::Priority;

pub const REQUESTS_TOTAL: &str = "brainai_requests_total";
pub const REQUEST_DURATION: &str = "brainai_request_duration_seconds";
pub const QUEUE_DURATION: &str = "brainai_queue_duration_seconds";
pub const PREPROCESS_DURATION: &str = "brainai_preprocess_duration_seconds";
pub const PREPROCESS_CPU: &str = "brainai_preprocess_cpu_seconds";
pub const INFERENCE_DURATION: &str = "brainai_inference_duration_seconds";
pub const BATCH_SIZE: &str = "brainai_batch_size";
pub const BATCH_OCCUPANCY: &str = "brainai_batch_occupancy_ratio";
pub const QUEUE_DEPTH: &str = "brainai_queue_depth";
pub const STAGE_DURATION: &str = "brainai_stage_duration_seconds";
pub const BATCH_ASSEMBLY: &str = "brainai_batch_assembly_total";
pub const BATCH_RUNS: &str = "brainai_batch_runs_total";
pub const MODEL_INSTANCES: &str = "brainai_model_instances";
pub const BATCH_BUFFERS: &str = "brainai_batch_buffers";
pub const BATCH_BUFFER_BYTES: &str = "brainai_batch_buffer_bytes";
pub const BATCH_BUFFER_ALLOCATIONS: &str = "brainai_batch_buffer_allocations_total";
pub const OUTPUT_BUFFER_ALLOCATIONS: &str = "brainai_output_buffer_allocations_total";
pub const PINNED_HOST_BYTES: &str = "brainai_pinned_host_bytes";
pub const IMAGES_TOTAL: &str = "brainai_images_total";
pub const DROPPED_TOTAL: &str = "brainai_dropped_total";
pub const MODEL_INFO: &str = "brainai_model_info";
pub const MODEL_LOAD_FAILURES: &str = "brainai_model_load_failures_total";
pub const CONNECTIONS_OPEN: &str = "brainai_connections_open";
pub const CONNECTIONS_REFUSED: &str = "brainai_connections_refused_total";
pub const CONNECTIONS_CLOSED: &str = "brainai_connections_closed_total";
pub const BODIES_REFUSED: &str = "brainai_request_bodies_refused_total";
pub const BODY_BYTES_IN_FLIGHT: &str = "brainai_request_body_bytes_in_flight";
pub const GPU_UTILIZATION: &str = "brainai_gpu_utilization_ratio";
pub const GPU_MEMORY_USED: &str = "brainai_gpu_memory_used_bytes";
pub const GPU_MEMORY_TOTAL: &str = "brainai_gpu_memory_total_bytes";
pub const GPU_POWER: &str = "brainai_gpu_power_watts";
pub const GPU_TEMPERATURE: &str = "brainai_gpu_temperature_celsius";
pub const GPU_PROCESS_MEMORY: &str = "brainai_gpu_process_memory_bytes";
/// The GPU metrics (NVML): exported only where NVML and a GPU are.
pub const GPU_METRICS: [&str; 6] = [
    GPU_UTILIZATION,
    GPU_MEMORY_USED,
    GPU_MEMORY_TOTAL,
    GPU_POWER,
    GPU_TEMPERATURE,
    GPU_PROCESS_MEMORY,
];
pub const CACHE_REQUESTS: &str = "brainai_result_cache_requests_total";
pub const CACHE_BYTES: &str = "brainai_result_cache_bytes";
pub const CACHE_ENTRIES: &str = "brainai_result_cache_entries";
pub const CACHE_EVICTIONS: &str = "brainai_result_cache_evictions_total";
pub const TLS_CERT_EXPIRY: &str = "brainai_tls_certificate_expiry_timestamp_seconds";
pub const TLS_RELOADS: &str = "brainai_tls_reloads_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "brainai_tls_handshake_failures_total";
pub const AUTH_REFUSED: &str = "brainai_auth_refused_total";
pub const INSECURE_CONFIG: &str = "brainai_insecure_config";
pub const AUDIT_RECORDS: &str = "brainai_audit_records_total";
pub const AUDIT_WRITE_FAILURES: &str = "brainai_audit_write_failures_total";
pub const DICOM_ASSOCIATIONS: &str = "brainai_dicom_associations_total";
pub const DICOM_ASSOCIATIONS_ACTIVE: &str = "brainai_dicom_associations_active";
pub const DICOM_INSTANCES: &str = "brainai_dicom_instances_total";
pub const DICOM_ECHOES: &str = "brainai_dicom_echoes_total";
pub const DICOM_SERIES_PROCESSED: &str = "brainai_dicom_series_processed_total";
pub const DICOM_DELIVERIES: &str = "brainai_dicom_deliveries_total";
pub const DICOM_OUTBOX_DEPTH: &str = "brainai_dicom_outbox_depth";
pub const DICOM_OUTBOX_BYTES: &str = "brainai_dicom_outbox_bytes";
pub const DICOM_OUTBOX_AGE: &str = "brainai_dicom_outbox_oldest_age_seconds";
pub const DICOM_SPOOL_BYTES: &str = "brainai_dicom_spool_bytes";
pub const DICOM_SPOOL_CAPACITY: &str = "brainai_dicom_spool_capacity_bytes";

/// Why the server closed a connection (the `reason` label of [`CONNECTIONS_CLOSED`]).
pub const CLOSE_REASONS: [&str; 5] = [
    "idle",
    "first_request_timeout",
    "age",
    "evicted",
    "shutdown",
];

/// Why a request body was refused (the `reason` label of [`BODIES_REFUSED`]).
pub const BODY_REFUSALS: [&str; 3] = ["too_slow", "too_large", "in_flight_cap"];

/// Why an image was dropped before it ran (the `reason` label): its deadline passed or would pass
/// before its batch ran; its caller left; the queue was full; the model was too busy to answer it
/// in time (refused at admission).
pub const DROP_REASONS: [&str; 4] = ["deadline", "cancelled", "queue_full", "overload"];

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
            // Stages run from microseconds (a hand-off between threads) to seconds (a queue).
            let stages = [
                1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &sizes))
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(STAGE_DURATION.into()), &stages)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(BATCH_OCCUPANCY.into()), &ratio)
                })
                .expect("bucket lists are non-empty constants")
                .install_recorder()
                .expect("the Prometheus recorder is installed once per process");
            describe();
            // Exported from the start, 0 where nothing is page-locked (CPU).
            gauge!(PINNED_HOST_BYTES).set(0.0);
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        DICOM_ASSOCIATIONS,
        Unit::Count,
        "DICOM associations, by outcome: accepted, rejected (AE title or address), limited (over --dicom-max-associations*), draining, failed (protocol or TLS)."
    );
    describe_gauge!(
        DICOM_ASSOCIATIONS_ACTIVE,
        Unit::Count,
        "DICOM associations open now."
    );
    describe_counter!(
        DICOM_INSTANCES,
        Unit::Count,
        "DICOM instances received by C-STORE, by outcome: stored, spool_full (A700), refused, discarded (their association was aborted)."
    );
    describe_counter!(DICOM_ECHOES, Unit::Count, "C-ECHO requests answered.");
    describe_counter!(
        DICOM_SERIES_PROCESSED,
        Unit::Count,
        "Received series classified and studies segmented, by task and outcome (ok, failed, unrouted, deferred: the server was busy or not serving; the study waits and is tried again)."
    );
    describe_counter!(
        DICOM_DELIVERIES,
        Unit::Count,
        "Results sent by C-STORE, by outcome: delivered (per object), refused (the destination answered a failure, per object), failed (the association failed, per attempt)."
    );
    describe_gauge!(
        DICOM_OUTBOX_DEPTH,
        Unit::Count,
        "Results waiting in the outbox."
    );
    describe_gauge!(
        DICOM_OUTBOX_BYTES,
        Unit::Bytes,
        "Bytes of results waiting in the outbox."
    );
    describe_gauge!(
        DICOM_OUTBOX_AGE,
        Unit::Seconds,
        "Age of the oldest result waiting in the outbox (0 when empty)."
    );
    describe_gauge!(
        DICOM_SPOOL_BYTES,
        Unit::Bytes,
        "Bytes of received instances in the spool."
    );
    describe_gauge!(
        DICOM_SPOOL_CAPACITY,
        Unit::Bytes,
        "The spool's size cap (--dicom-spool-max-mib)."
    );
    describe_counter!(
        REQUESTS_TOTAL,
        Unit::Count,
        "Calls answered, by rpc, status code name, model and version (empty when no model was resolved)."
    );
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Wall time of a call, by rpc, model and version."
    );
    describe_histogram!(
        QUEUE_DURATION,
        Unit::Seconds,
        "Time an image waited in the batcher queue, by model, version and priority."
    );
    describe_histogram!(
        PREPROCESS_DURATION,
        Unit::Seconds,
        "Decode + resize + normalise time of one image, by model and version."
    );
    describe_histogram!(
        PREPROCESS_CPU,
        Unit::Seconds,
        "CPU time of the thread that decoded + resized + normalised one image (its wall time less \
         preemption), by model and version; PNG/JPEG/raw images are sampled, one in 8 per thread: \
         use the mean (_sum / _count)."
    );
    describe_histogram!(
        INFERENCE_DURATION,
        Unit::Seconds,
        "Model run time of one batch, by model and version."
    );
    describe_histogram!(
        BATCH_SIZE,
        Unit::Count,
        "Images per batch run by the model, by model and version."
    );
    describe_histogram!(
        BATCH_OCCUPANCY,
        Unit::Count,
        "Batch size divided by max batch size (how full the batches are; GPU batch occupancy), by model and version."
    );
    describe_histogram!(
        STAGE_DURATION,
        Unit::Seconds,
        "Where an image's time goes, by model, version and stage: decode_wait (waiting for the \
         decoding budget and a preprocessing thread), preprocess, queue, dispatch (queue task to \
         instance thread), assemble (the batch's tensor; per batch), run (per batch), reply (run \
         end to the caller's result, postprocessing included)."
    );
    describe_counter!(
        BATCH_ASSEMBLY,
        Unit::Count,
        "Batches by how their tensor was assembled: in_place (consecutive rows of one batch buffer, \
         no copy) or gathered (copied into the instance's scratch buffer), by model and version."
    );
    describe_counter!(
        BATCH_RUNS,
        Unit::Count,
        "Batches by the thread that ran them: instance_thread (handed to the model instance's \
         thread) or dispatcher (a batch short enough to run where it was formed, --inline-run-us), \
         by model and version."
    );
    describe_gauge!(
        MODEL_INSTANCES,
        Unit::Count,
        "Model instances serving a model version (0 once it is unloaded). The share of the time \
         they spend running batches: rate(brainai_inference_duration_seconds_sum) divided by this."
    );
    describe_gauge!(
        BATCH_BUFFERS,
        Unit::Count,
        "Batch buffers held by a model version's pool (in use or free for reuse)."
    );
    describe_gauge!(
        PINNED_HOST_BYTES,
        Unit::Bytes,
        "Host memory page-locked with the CUDA runtime for batch tensors (batch buffers, gather and padding buffers); 0 on CPU"
    );
    describe_gauge!(
        BATCH_BUFFER_BYTES,
        Unit::Bytes,
        "Bytes held by a model version's batch buffers."
    );
    describe_counter!(
        BATCH_BUFFER_ALLOCATIONS,
        Unit::Count,
        "Batch buffers allocated; flat once warm (buffers are reused), by model and version."
    );
    describe_counter!(
        OUTPUT_BUFFER_ALLOCATIONS,
        Unit::Count,
        "Batch output buffers allocated (a full batch of model output each); flat once warm \
         (buffers are reused), by model and version."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Images admitted and waiting for a batch (being decoded or queued), by model, version and priority."
    );
    describe_counter!(
        IMAGES_TOTAL,
        Unit::Count,
        "Images that received a result, by model and version."
    );
    describe_counter!(
        DROPPED_TOTAL,
        Unit::Count,
        "Images dropped before running, by model, version and reason (deadline, cancelled, queue_full, overload)."
    );
    describe_gauge!(
        MODEL_INFO,
        Unit::Count,
        "1 for each loaded model version (0 once unloaded). Labels: name, version, sha256, device."
    );
    describe_gauge!(
        CONNECTIONS_OPEN,
        Unit::Count,
        "Client connections open, by listener (grpc, rest: the HTTP API, metrics: the metrics and probes port, health: the plaintext health-only port)."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        Unit::Count,
        "Connections refused at the connection cap because none open was idle, by listener."
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        Unit::Count,
        "Connections the server closed, by listener and reason (idle, first_request_timeout, age, evicted, shutdown)."
    );
    describe_counter!(
        BODIES_REFUSED,
        Unit::Count,
        "Request bodies refused, by listener and reason: too_slow (a pause over --body-read-timeout-s, or under --min-body-rate-bytes-s after it), too_large (a declared length over the port's limit, refused unread), in_flight_cap (request bodies in flight at --max-body-bytes-in-flight-mib)."
    );
    describe_gauge!(
        BODY_BYTES_IN_FLIGHT,
        Unit::Bytes,
        "Bytes of request bodies held by calls in flight, every port together (a declared length counts in full from the first read); capped by --max-body-bytes-in-flight-mib."
    );
    describe_gauge!(
        GPU_UTILIZATION,
        Unit::Count,
        "GPU utilisation, 0..1 (share of the last sample period a kernel ran), by device (NVML index); only with --device cuda and NVML."
    );
    describe_gauge!(
        GPU_MEMORY_USED,
        Unit::Bytes,
        "GPU memory in use on the device (all processes), by device."
    );
    describe_gauge!(
        GPU_MEMORY_TOTAL,
        Unit::Bytes,
        "GPU memory installed, by device."
    );
    describe_gauge!(
        GPU_POWER,
        Unit::Count,
        "GPU power draw in watts, by device."
    );
    describe_gauge!(
        GPU_TEMPERATURE,
        Unit::Count,
        "GPU core temperature in degrees Celsius, by device."
    );
    describe_gauge!(
        GPU_PROCESS_MEMORY,
        Unit::Bytes,
        "GPU memory this server process holds on the device."
    );
    describe_counter!(
        CACHE_REQUESTS,
        Unit::Count,
        "Result-cache lookups of models with [cache] in model.toml, by model, version and result (hit, miss)."
    );
    describe_gauge!(
        CACHE_BYTES,
        Unit::Bytes,
        "Bytes of results the result cache holds, by model and version."
    );
    describe_gauge!(
        CACHE_ENTRIES,
        Unit::Count,
        "Results the result cache holds, by model and version."
    );
    describe_counter!(
        CACHE_EVICTIONS,
        Unit::Count,
        "Results evicted (least recently used) to stay within [cache] max_kib, by model and version."
    );
    describe_gauge!(
        TLS_CERT_EXPIRY,
        Unit::Seconds,
        "When the serving TLS certificate expires (its notAfter, Unix time); exported from the start, updated on every reload."
    );
    describe_counter!(
        TLS_RELOADS,
        Unit::Count,
        "TLS certificate/key/client-CA reloads after the files changed, by result (ok, error: the previous certificate stays)."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        Unit::Count,
        "TLS handshakes that failed (plaintext client, unknown CA, expired or missing client certificate), by listener and reason (error, timeout)."
    );
    describe_counter!(
        AUTH_REFUSED,
        Unit::Count,
        "Calls refused by authentication or authorisation, by front end (grpc, rest) and code (UNAUTHENTICATED, PERMISSION_DENIED)."
    );
    describe_gauge!(
        INSECURE_CONFIG,
        Unit::Count,
        "1 while the server runs with a configuration that exposes credentials, by reason \
         (tokens_without_tls: bearer tokens accepted on plaintext ports); 0 otherwise."
    );
    describe_counter!(
        AUDIT_RECORDS,
        Unit::Count,
        "Audit records written (one per call)."
    );
    describe_counter!(
        AUDIT_WRITE_FAILURES,
        Unit::Count,
        "Audit records that could not be written (with --audit-fail-closed, calls are refused until a write succeeds)."
    );
    describe_counter!(
        MODEL_LOAD_FAILURES,
        Unit::Count,
        "Model versions (or model.toml files) that failed to load, check or warm up, by model."
    );
}

/// One answered call.
pub fn request_done(
    rpc: &'static str,
    code: &'static str,
    model: &str,
    version: &str,
    seconds: f64,
) {
    let (model, version) = (model.to_string(), version.to_string());
    counter!(REQUESTS_TOTAL, "rpc" => rpc, "code" => code, "model" => model.clone(),
        "version" => version.clone())
    .increment(1);
    histogram!(REQUEST_DURATION, "rpc" => rpc, "model" => model, "version" => version)
        .record(seconds);
}

/// Exports the connection metrics of `listener` at zero.
pub fn connections_known(listener: &'static str) {
    gauge!(CONNECTIONS_OPEN, "listener" => listener).set(0.0);
    counter!(CONNECTIONS_REFUSED, "listener" => listener).increment(0);
    for reason in CLOSE_REASONS {
        counter!(CONNECTIONS_CLOSED, "listener" => listener, "reason" => reason).increment(0);
    }
}

pub fn connections_open(listener: &'static str, open: usize) {
    gauge!(CONNECTIONS_OPEN, "listener" => listener).set(open as f64);
}

pub fn connection_refused(listener: &'static str) {
    counter!(CONNECTIONS_REFUSED, "listener" => listener).increment(1);
}

pub fn connection_closed(listener: &'static str, reason: &'static str) {
    counter!(CONNECTIONS_CLOSED, "listener" => listener, "reason" => reason).increment(1);
}

/// Exports the request-body metrics of `listener` at zero.
pub fn bodies_known(listener: &'static str) {
    for reason in BODY_REFUSALS {
        counter!(BODIES_REFUSED, "listener" => listener, "reason" => reason).increment(0);
    }
}

pub fn body_refused(listener: &'static str, reason: &'static str) {
    counter!(BODIES_REFUSED, "listener" => listener, "reason" => reason).increment(1);
}

/// Exports the in-flight gauge (at its current value, zero at the start).
pub fn body_bytes_in_flight_known() {
    gauge!(BODY_BYTES_IN_FLIGHT).increment(0.0);
}

/// Request-body bytes taken (positive) or given back (negative).
pub fn body_bytes_in_flight(delta: f64) {
    gauge!(BODY_BYTES_IN_FLIGHT).increment(delta);
}

/// The result cache's metrics of one model version.
#[derive(Clone)]
pub struct CacheMetrics {
    hits: Counter,
    misses: Counter,
    bytes: Gauge,
    entries: Gauge,
    evictions: Counter,
}

impl CacheMetrics {
    pub fn new(model: &str, version: &str) -> Self {
        let base = [
            ("model", model.to_string()),
            ("version", version.to_string()),
        ];
        let with = |result: &'static str| {
            let mut labels = base.to_vec();
            labels.push(("result", result.to_string()));
            labels
        };
        let m = CacheMetrics {
            hits: counter!(CACHE_REQUESTS, &with("hit")),
            misses: counter!(CACHE_REQUESTS, &with("miss")),
            bytes: gauge!(CACHE_BYTES, &base),
            entries: gauge!(CACHE_ENTRIES, &base),
            evictions: counter!(CACHE_EVICTIONS, &base),
        };
        m.hits.increment(0);
        m.misses.increment(0);
        m.bytes.set(0.0);
        m.entries.set(0.0);
        m.evictions.increment(0);
        m
    }

    pub fn hit(&self) {
        self.hits.increment(1);
    }

    pub fn miss(&self) {
        self.misses.increment(1);
    }

    pub fn stored(&self, bytes: usize, entries: usize, evicted: u64) {
        self.bytes.set(bytes as f64);
        self.entries.set(entries as f64);
        self.evictions.increment(evicted);
    }
}

/// The serving certificate's notAfter (Unix seconds).
pub fn tls_certificate_expiry(not_after: i64) {
    gauge!(TLS_CERT_EXPIRY).set(not_after as f64);
}

/// A reload of the TLS files: `ok` or `error`.
pub fn tls_reloaded(result: &'static str) {
    counter!(TLS_RELOADS, "result" => result).increment(1);
}

pub fn tls_handshake_failed(listener: &'static str, reason: &'static str) {
    counter!(TLS_HANDSHAKE_FAILURES, "listener" => listener, "reason" => reason).increment(1);
}

/// Exports the security metrics at zero, so dashboards and alerts see them before the first event.
pub fn security_known(listeners: &[&'static str], tls: bool, audit: bool) {
    if tls {
        for result in ["ok", "error"] {
            counter!(TLS_RELOADS, "result" => result).increment(0);
        }
        for listener in listeners {
            for reason in ["error", "timeout"] {
                counter!(TLS_HANDSHAKE_FAILURES, "listener" => *listener, "reason" => reason)
                    .increment(0);
            }
        }
    }
    for front in ["grpc", "rest"] {
        for code in ["UNAUTHENTICATED", "PERMISSION_DENIED"] {
            counter!(AUTH_REFUSED, "front_end" => front, "code" => code).increment(0);
        }
    }
    if audit {
        counter!(AUDIT_RECORDS).increment(0);
        counter!(AUDIT_WRITE_FAILURES).increment(0);
    }
}

/// Whether the configuration is insecure for `reason` (see [`INSECURE_CONFIG`]).
pub fn insecure_config(reason: &'static str, insecure: bool) {
    gauge!(INSECURE_CONFIG, "reason" => reason).set(if insecure { 1.0 } else { 0.0 });
}

pub fn auth_refused(front_end: &'static str, code: &'static str) {
    counter!(AUTH_REFUSED, "front_end" => front_end, "code" => code).increment(1);
}

/// Every label set of the DICOM node's counters, at 0: an alert's `rate()` has a series from the
/// start, not from the first failure.
pub fn dicom_known() {
    for outcome in ["accepted", "rejected", "limited", "draining", "failed"] {
        counter!(DICOM_ASSOCIATIONS, "outcome" => outcome).increment(0);
    }
    for outcome in ["stored", "spool_full", "refused", "discarded"] {
        counter!(DICOM_INSTANCES, "outcome" => outcome).increment(0);
    }
    counter!(DICOM_ECHOES).increment(0);
    for task in ["classification", "segmentation"] {
        for outcome in ["ok", "failed", "unrouted", "deferred"] {
            counter!(DICOM_SERIES_PROCESSED, "task" => task, "outcome" => outcome).increment(0);
        }
    }
    for outcome in ["delivered", "failed", "refused"] {
        counter!(DICOM_DELIVERIES, "outcome" => outcome).increment(0);
    }
}

pub fn dicom_association(outcome: &'static str) {
    counter!(DICOM_ASSOCIATIONS, "outcome" => outcome).increment(1);
}

pub fn dicom_associations_active(n: usize) {
    gauge!(DICOM_ASSOCIATIONS_ACTIVE).set(n as f64);
}

pub fn dicom_instance(outcome: &'static str) {
    counter!(DICOM_INSTANCES, "outcome" => outcome).increment(1);
}

pub fn dicom_echo() {
    counter!(DICOM_ECHOES).increment(1);
}

pub fn dicom_series_processed(task: &'static str, outcome: &'static str) {
    counter!(DICOM_SERIES_PROCESSED, "task" => task, "outcome" => outcome).increment(1);
}

pub fn dicom_delivery(outcome: &'static str) {
    counter!(DICOM_DELIVERIES, "outcome" => outcome).increment(1);
}

pub fn dicom_outbox(depth: usize, bytes: u64, oldest_s: f64) {
    gauge!(DICOM_OUTBOX_DEPTH).set(depth as f64);
    gauge!(DICOM_OUTBOX_BYTES).set(bytes as f64);
    gauge!(DICOM_OUTBOX_AGE).set(oldest_s);
}

pub fn dicom_spool(used: u64, capacity: u64) {
    gauge!(DICOM_SPOOL_BYTES).set(used as f64);
    gauge!(DICOM_SPOOL_CAPACITY).set(capacity as f64);
}

pub fn audit_written() {
    counter!(AUDIT_RECORDS).increment(1);
}

pub fn audit_write_failed() {
    counter!(AUDIT_WRITE_FAILURES).increment(1);
}

/// A model version (or its model.toml) failed to load.
pub fn model_load_failed(model: &str) {
    counter!(MODEL_LOAD_FAILURES, "model" => model.to_string()).increment(1);
}

/// Exports the load-failure counter of `model` at zero, so alerts see a series from the start.
pub fn model_known(model: &str) {
    counter!(MODEL_LOAD_FAILURES, "model" => model.to_string()).increment(0);
}

/// Marks a model version loaded (`true`) or unloaded.
pub fn model_info(name: &str, version: &str, sha256: &str, device: &str, loaded: bool) {
    gauge!(MODEL_INFO, "name" => name.to_string(), "version" => version.to_string(),
        "sha256" => sha256.to_string(), "device" => device.to_string())
    .set(if loaded { 1.0 } else { 0.0 });
}

/// A stage of one image's path (`stage` label of [`STAGE_DURATION`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    DecodeWait,
    Preprocess,
    Queue,
    Dispatch,
    Assemble,
    Run,
    Reply,
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::DecodeWait,
        Stage::Preprocess,
        Stage::Queue,
        Stage::Dispatch,
        Stage::Assemble,
        Stage::Run,
        Stage::Reply,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::DecodeWait => "decode_wait",
            Stage::Preprocess => "preprocess",
            Stage::Queue => "queue",
            Stage::Dispatch => "dispatch",
            Stage::Assemble => "assemble",
            Stage::Run => "run",
            Stage::Reply => "reply",
        }
    }
}

/// The metric handles of one model version, made once when it loads.
#[derive(Clone)]
pub struct ModelMetrics {
    stages: [Histogram; 7],
    assembly: [Counter; 2],
    runs: [Counter; 2],
    instances: Gauge,
    buffers: Gauge,
    buffer_bytes: Gauge,
    buffer_allocations: Counter,
    output_allocations: Counter,
    queue_duration: [Histogram; 2],
    queue_depth: [Gauge; 2],
    dropped: [Counter; 4],
    preprocess: Histogram,
    preprocess_cpu: Histogram,
    inference: Histogram,
    batch_size: Histogram,
    occupancy: Histogram,
    images: Counter,
}

impl ModelMetrics {
    pub fn new(model: &str, version: &str) -> Self {
        let base = [
            ("model", model.to_string()),
            ("version", version.to_string()),
        ];
        let with = |key: &'static str, value: &str| {
            let mut labels = base.to_vec();
            labels.push((key, value.to_string()));
            labels
        };
        let metrics = ModelMetrics {
            stages: Stage::ALL.map(|s| histogram!(STAGE_DURATION, &with("stage", s.as_str()))),
            assembly: ["in_place", "gathered"].map(|p| counter!(BATCH_ASSEMBLY, &with("path", p))),
            runs: ["instance_thread", "dispatcher"].map(|o| counter!(BATCH_RUNS, &with("on", o))),
            instances: gauge!(MODEL_INSTANCES, &base),
            buffers: gauge!(BATCH_BUFFERS, &base),
            buffer_bytes: gauge!(BATCH_BUFFER_BYTES, &base),
            buffer_allocations: counter!(BATCH_BUFFER_ALLOCATIONS, &base),
            output_allocations: counter!(OUTPUT_BUFFER_ALLOCATIONS, &base),
            queue_duration: Priority::ALL
                .map(|p| histogram!(QUEUE_DURATION, &with("priority", p.as_str()))),
            queue_depth: Priority::ALL.map(|p| gauge!(QUEUE_DEPTH, &with("priority", p.as_str()))),
            dropped: DROP_REASONS.map(|r| counter!(DROPPED_TOTAL, &with("reason", r))),
            preprocess: histogram!(PREPROCESS_DURATION, &base),
            preprocess_cpu: histogram!(PREPROCESS_CPU, &base),
            inference: histogram!(INFERENCE_DURATION, &base),
            batch_size: histogram!(BATCH_SIZE, &base),
            occupancy: histogram!(BATCH_OCCUPANCY, &base),
            images: counter!(IMAGES_TOTAL, &base),
        };
        // Export counters and gauges at zero from the start, so rate() and alerts see a series.
        for c in &metrics.dropped {
            c.increment(0);
        }
        metrics.images.increment(0);
        metrics.buffer_allocations.increment(0);
        metrics.output_allocations.increment(0);
        for c in metrics.assembly.iter().chain(&metrics.runs) {
            c.increment(0);
        }
        for g in &metrics.queue_depth {
            g.set(0.0);
        }
        metrics
    }

    /// One image's (or, for assemble and run, one batch's) time in `stage`.
    pub fn stage(&self, stage: Stage, took: std::time::Duration) {
        self.stage_seconds(stage, took.as_secs_f64());
    }

    fn stage_seconds(&self, stage: Stage, seconds: f64) {
        // `Stage::ALL` lists the variants in declaration order.
        self.stages[stage as usize].record(seconds);
    }

    /// A batch's tensor was assembled in place (`true`) or gathered.
    pub fn assembled(&self, in_place: bool) {
        self.assembly[usize::from(!in_place)].increment(1);
    }

    /// A batch ran on its instance's thread (`false`) or where it was formed (`true`).
    pub fn batch_ran(&self, in_place: bool) {
        self.runs[usize::from(in_place)].increment(1);
    }

    /// `n` instances serve the version (0: unloaded).
    pub fn set_instances(&self, n: usize) {
        self.instances.set(n as f64);
    }

    pub fn buffer_allocated(&self) {
        self.buffer_allocations.increment(1);
    }

    pub fn output_buffer_allocated(&self) {
        self.output_allocations.increment(1);
    }

    /// The pool holds `count` buffers of `bytes` each.
    pub fn buffers_pooled(&self, count: usize, bytes: usize) {
        self.buffers.set(count as f64);
        self.buffer_bytes.set((count * bytes) as f64);
    }

    pub fn queue_duration(&self, priority: Priority, seconds: f64) {
        self.stage_seconds(Stage::Queue, seconds);
        self.queue_duration[priority.index()].record(seconds);
    }

    pub fn set_queue_depth(&self, priority: Priority, depth: usize) {
        self.queue_depth[priority.index()].set(depth as f64);
    }

    /// `n` images dropped for `reason` (one of [`DROP_REASONS`]).
    pub fn dropped(&self, reason: &'static str, n: usize) {
        let i = DROP_REASONS
            .iter()
            .position(|r| *r == reason)
            .expect("a known drop reason");
        self.dropped[i].increment(n as u64);
    }

    pub fn preprocess_duration(&self, seconds: f64) {
        self.stage_seconds(Stage::Preprocess, seconds);
        self.preprocess.record(seconds);
    }

    /// CPU time of one image's preprocessing (see [`crate::threads::ThreadCpu`]).
    pub fn preprocess_cpu(&self, took: std::time::Duration) {
        self.preprocess_cpu.record(took.as_secs_f64());
    }

    pub fn batch_done(&self, size: usize, max_batch_size: usize, seconds: f64) {
        self.stage_seconds(Stage::Run, seconds);
        self.inference.record(seconds);
        self.batch_size.record(size as f64);
        self.occupancy.record(size as f64 / max_batch_size as f64);
    }

    pub fn images_done(&self, n: usize) {
        self.images.increment(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_listed_in_declaration_order() {
        // `ModelMetrics::stage_seconds` indexes its histograms by the variant's position.
        for (i, stage) in Stage::ALL.iter().enumerate() {
            assert_eq!(*stage as usize, i, "{}", stage.as_str());
        }
    }
}
