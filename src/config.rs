//! Command line: `brainai serve` and `brainai classify`. Every serve option is also a `BRAINAI_*`
//! environment variable; `--help` is the reference (and the README table mirrors it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::backend::Device;
use crate::batcher::Priority;
use crate::model::BatchingOverrides;
use crate::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "brainai",
    version,
    about = "BrainAI Serve: brain-MRI tumour classification over gRPC"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve models over gRPC (with health, reflection and Prometheus metrics).
    Serve(Box<ServeArgs>),
    /// Classify image files with a running server; one line per file, in input order.
    Classify(Box<ClassifyArgs>),
    /// Segment one slice (one image per MR sequence) with a running server; prints each label's
    /// and region's area, writes the mask with --out.
    Segment(Box<SegmentArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TLS, mutual TLS, callers, audit trail, health-only port.
    #[command(flatten)]
    pub security: crate::security::SecurityArgs,

    /// The DICOM node: C-ECHO and C-STORE in, results back by C-STORE (off unless --dicom-addr).
    #[command(flatten)]
    pub dicom: crate::node::NodeArgs,

    /// One model directory: model.toml plus <version>/model.onnx (ignored with --model-repository).
    #[arg(
        long,
        env = "BRAINAI_MODEL_DIR",
        default_value = "models/brain-tumor-resnet50"
    )]
    pub model_dir: PathBuf,

    /// Serve only this version of --model-dir (default: its model.toml's version policy, which
    /// defaults to the highest version).
    #[arg(
        long,
        env = "BRAINAI_MODEL_VERSION",
        conflicts_with = "model_repository"
    )]
    pub model_version: Option<u64>,

    /// Serve every model of a repository: each DIR/<name>/model.toml, with its own batcher.
    #[arg(long, env = "BRAINAI_MODEL_REPOSITORY")]
    pub model_repository: Option<PathBuf>,

    /// The model a request that names none gets (default: the only model).
    #[arg(long, env = "BRAINAI_DEFAULT_MODEL")]
    pub default_model: Option<String>,

    /// Per-model batching setting, NAME:KEY=VALUE (repeatable; wins over model.toml's [batching]).
    /// KEY: max_batch_size, max_queue_delay_us, queue_capacity, stat_queue_capacity, instances,
    /// default_priority.
    #[arg(long, env = "BRAINAI_MODEL_OVERRIDES", value_delimiter = ',')]
    pub model_override: Vec<String>,

    /// Re-scan the model repository every N seconds and load new or changed versions (0: only on
    /// SIGHUP).
    #[arg(long, env = "BRAINAI_REPOSITORY_POLL_S", default_value_t = 0)]
    pub repository_poll_s: u64,

    /// gRPC listen address.
    #[arg(long, env = "BRAINAI_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    /// HTTP API listen address: the Open Inference Protocol's REST routes (/v2/...), the JSON
    /// endpoint /v1/classify and the upload page at /.
    #[arg(long, env = "BRAINAI_HTTP_ADDR", default_value = "0.0.0.0:8000")]
    pub http_addr: SocketAddr,

    /// Largest HTTP API request body, in bytes (413 beyond).
    #[arg(long, env = "BRAINAI_MAX_HTTP_BODY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_http_body_bytes: usize,

    /// Prometheus metrics, /healthz and /readyz listen address.
    #[arg(long, env = "BRAINAI_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Path of libonnxruntime.so (default: the one in the project's .venv).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_library: Option<PathBuf>,

    /// Execution device: cpu, cuda or cuda:N (CUDA needs onnxruntime-gpu; see README).
    #[arg(long, env = "BRAINAI_DEVICE", default_value = "cpu")]
    pub device: Device,

    /// Model instances, each an ONNX Runtime session on its own thread.
    #[arg(long, env = "BRAINAI_INSTANCES", default_value_t = 1)]
    pub instances: usize,

    /// With --device cuda: sample NVML's GPU metrics (brainai_gpu_*) this often, in milliseconds.
    #[arg(long, env = "BRAINAI_GPU_METRICS_INTERVAL_MS", default_value_t = 1000)]
    pub gpu_metrics_interval_ms: u64,

    /// ONNX Runtime intra-op threads per instance (0: every core on cpu, 1 on cuda; see
    /// "Thread budget" in the README).
    #[arg(long, env = "BRAINAI_INTRA_OP_THREADS", default_value_t = 0)]
    pub intra_op_threads: usize,

    /// Async runtime (gRPC, HTTP) worker threads (0: a quarter of the cores, 1 to 4).
    #[arg(long, env = "BRAINAI_IO_THREADS", default_value_t = 0)]
    pub io_threads: usize,

    /// Preprocessing (decode, resize) threads (0: one per core).
    #[arg(long, env = "BRAINAI_PREPROCESS_THREADS", default_value_t = 0)]
    pub preprocess_threads: usize,

    /// Let ONNX Runtime's idle intra-op threads spin-wait (lower latency inside a run; on small
    /// machines the spinning takes CPU from decoding and gRPC).
    #[arg(long, env = "BRAINAI_INTRA_OP_SPINNING", default_value_t = true, action = clap::ArgAction::Set)]
    pub intra_op_spinning: bool,

    /// With --device cuda: page-lock the batch buffers with the CUDA runtime, so each batch's
    /// host-to-GPU copy is one DMA transfer (falls back to pageable memory, with a warning, where
    /// that fails). Ignored on CPU.
    #[arg(long, env = "BRAINAI_PINNED_BUFFERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub pinned_buffers: bool,

    /// Largest batch (capped at the model's max_batch_size from model.toml).
    #[arg(long, env = "BRAINAI_MAX_BATCH_SIZE", default_value_t = 8)]
    pub max_batch_size: usize,

    /// Longest time, in microseconds, the oldest queued image waits for its batch to fill.
    #[arg(long, env = "BRAINAI_MAX_QUEUE_DELAY_US", default_value_t = 2000)]
    pub max_queue_delay_us: u64,

    /// Longest a request may expect to wait for its answer, in milliseconds (estimated from the
    /// measured batch times): a request that would wait longer is refused RESOURCE_EXHAUSTED at
    /// once, whatever its deadline (0: no limit). Requests with a deadline are also refused when
    /// they cannot be answered before it.
    #[arg(long, env = "BRAINAI_MAX_QUEUE_WAIT_MS", default_value_t = 10_000)]
    pub max_queue_wait_ms: u64,

    /// Most routine images admitted per model (being decoded or queued); beyond it requests get
    /// RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "BRAINAI_QUEUE_CAPACITY", default_value_t = 256)]
    pub queue_capacity: usize,

    /// Most STAT images admitted per model: their own limit, so routine floods cannot block them.
    #[arg(long, env = "BRAINAI_STAT_QUEUE_CAPACITY", default_value_t = 64)]
    pub stat_queue_capacity: usize,

    /// Priority of requests that name none (per model: default_priority in [batching]).
    #[arg(long, env = "BRAINAI_DEFAULT_PRIORITY", default_value = "routine")]
    pub default_priority: Priority,

    /// Most images in one Classify request.
    #[arg(long, env = "BRAINAI_MAX_IMAGES_PER_REQUEST", default_value_t = 64)]
    pub max_images_per_request: usize,

    /// Largest encoded (or raw) image, in bytes.
    #[arg(long, env = "BRAINAI_MAX_IMAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_image_bytes: usize,

    /// Most bytes one request's images may decode to (read from their headers, before decoding);
    /// a larger request is refused RESOURCE_EXHAUSTED, in MiB.
    #[arg(long, env = "BRAINAI_MAX_REQUEST_DECODE_MIB", default_value_t = 256)]
    pub max_request_decode_mib: u64,

    /// Most bytes of class probability maps one Segment request may ask for (float32, at the
    /// slices' geometry), in MiB; a larger request is refused INVALID_ARGUMENT before its model runs.
    #[arg(long, env = "BRAINAI_MAX_PROBABILITY_MIB", default_value_t = 32)]
    pub max_probability_mib: u64,

    /// Most instances in one SegmentStudy call (all its series together); a stream with more is
    /// refused at the first instance over, before it is read.
    #[arg(long, env = "BRAINAI_MAX_STUDY_INSTANCES", default_value_t = 2000)]
    pub max_study_instances: usize,

    /// Most bytes one study's instances may decode to, with the aligned planes made from them,
    /// in MiB (read from their headers before decoding; held in the shared decoding budget,
    /// --max-decode-in-flight-mib, while the study runs).
    #[arg(long, env = "BRAINAI_MAX_STUDY_DECODE_MIB", default_value_t = 1024)]
    pub max_study_decode_mib: u64,

    /// Most bytes being decoded at once over all requests, in MiB; an image waits for room.
    #[arg(long, env = "BRAINAI_MAX_DECODE_IN_FLIGHT_MIB", default_value_t = 1024)]
    pub max_decode_in_flight_mib: u64,

    /// A PNG/JPEG/raw request whose images together decode to at most this many KiB (read from
    /// their headers) is decoded and preprocessed on the async worker that received it, without a
    /// hand-off to the preprocessing pool and back; larger requests and DICOM use the pool. 0:
    /// always the pool.
    #[arg(long, env = "BRAINAI_INLINE_DECODE_KIB", default_value_t = 256)]
    pub inline_decode_kib: u64,

    /// A batch whose measured run time is at most this many microseconds is run by the thread
    /// that forms it (the async worker that queued its last image, or the queue task) on an idle
    /// instance's engine, without a hand-off to the instance thread and back: for very small
    /// models, where the two thread wake-ups cost more than the run. The measured time is a moving
    /// average: a run that suddenly takes longer holds that worker as long. 0: always the
    /// instance thread. Default: 200 on CPU, 0 on CUDA (GPU runs stay on their instance threads).
    #[arg(long, env = "BRAINAI_INLINE_RUN_US")]
    pub inline_run_us: Option<u64>,

    /// Largest decoded image, in pixels (guards against decompression bombs).
    #[arg(long, env = "BRAINAI_MAX_PIXELS", default_value_t = 8192 * 8192)]
    pub max_pixels: u64,

    /// Largest gRPC message the server accepts, in bytes.
    #[arg(long, env = "BRAINAI_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// On SIGTERM/SIGINT, how long queued and running work may take to finish, in seconds.
    #[arg(long, env = "BRAINAI_DRAIN_TIMEOUT_S", default_value_t = 30)]
    pub drain_timeout_s: u64,

    /// Connections are asked to go away (HTTP/2 GOAWAY; calls in flight finish) after this many
    /// seconds, so clients re-resolve and spread over replicas (0: never).
    #[arg(long, env = "BRAINAI_MAX_CONNECTION_AGE_S", default_value_t = 300)]
    pub max_connection_age_s: u64,

    /// After a GOAWAY (connection age, eviction), how long calls in flight get before the
    /// connection is closed regardless, in seconds.
    #[arg(long, env = "BRAINAI_CONNECTION_GRACE_S", default_value_t = 30)]
    pub connection_grace_s: u64,

    /// Most open connections to the gRPC port (each is a file descriptor). At the cap the
    /// longest-idle connection is closed to make room; with none idle, new connections are
    /// refused. Default: 1024.
    #[arg(long, env = "BRAINAI_MAX_GRPC_CONNECTIONS")]
    pub max_grpc_connections: Option<usize>,

    /// Most open connections to the HTTP API port (`--http-addr`), capped like the gRPC port's.
    /// Default: 1024.
    #[arg(long, env = "BRAINAI_MAX_HTTP_API_CONNECTIONS")]
    pub max_http_api_connections: Option<usize>,

    /// Most open connections to the metrics and probes port (`--metrics-addr`). Default: 128.
    #[arg(long, env = "BRAINAI_MAX_METRICS_CONNECTIONS")]
    pub max_metrics_connections: Option<usize>,

    /// Deprecated: --max-grpc-connections and --max-http-api-connections (both ports).
    #[arg(long, env = "BRAINAI_MAX_CONNECTIONS", hide = true)]
    pub max_connections: Option<usize>,

    /// Deprecated: --max-metrics-connections (it never capped the HTTP API port).
    #[arg(long, env = "BRAINAI_MAX_HTTP_CONNECTIONS", hide = true)]
    pub max_http_connections: Option<usize>,

    /// A request body (HTTP API, and gRPC calls other than the long-lived request streams,
    /// ClassifyStream and SegmentStream) may pause this many
    /// seconds at most; it is also the allowance before --min-body-rate-bytes-s applies. Too
    /// slow: 408 on the HTTP API, DEADLINE_EXCEEDED on gRPC.
    #[arg(long, env = "BRAINAI_BODY_READ_TIMEOUT_S", default_value_t = 20)]
    pub body_read_timeout_s: u64,

    /// Once --body-read-timeout-s is spent, a request body must have averaged this many bytes a
    /// second, counted over the time the server waited for it (0: no minimum rate).
    #[arg(long, env = "BRAINAI_MIN_BODY_RATE_BYTES_S", default_value_t = 4096)]
    pub min_body_rate_bytes_s: u64,

    /// Most bytes of request bodies held by calls in flight over every port, in MiB (a declared
    /// length counts in full from the first read); a call over it is refused (503 on the HTTP
    /// API, RESOURCE_EXHAUSTED on gRPC).
    #[arg(
        long,
        env = "BRAINAI_MAX_BODY_BYTES_IN_FLIGHT_MIB",
        default_value_t = 512
    )]
    pub max_body_bytes_in_flight_mib: u64,

    /// A new connection that has not started a request within this many seconds is closed.
    #[arg(long, env = "BRAINAI_FIRST_REQUEST_TIMEOUT_S", default_value_t = 10)]
    pub first_request_timeout_s: u64,

    /// A connection with no call in flight for this many seconds is closed (GOAWAY).
    #[arg(long, env = "BRAINAI_IDLE_TIMEOUT_S", default_value_t = 300)]
    pub idle_timeout_s: u64,

    /// HTTP/1 (HTTP API and metrics ports): seconds to receive a request's headers.
    #[arg(long, env = "BRAINAI_HEADER_READ_TIMEOUT_S", default_value_t = 10)]
    pub header_read_timeout_s: u64,

    /// HTTP/2 keepalive PING interval in seconds (0: off); a peer that does not answer within
    /// --keepalive-timeout-s is dropped.
    #[arg(long, env = "BRAINAI_KEEPALIVE_INTERVAL_S", default_value_t = 60)]
    pub keepalive_interval_s: u64,

    /// Seconds to wait for a keepalive PING's answer.
    #[arg(long, env = "BRAINAI_KEEPALIVE_TIMEOUT_S", default_value_t = 20)]
    pub keepalive_timeout_s: u64,

    /// Most concurrent calls (HTTP/2 streams) per connection.
    #[arg(long, env = "BRAINAI_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// Largest request metadata (headers) of one call; a larger one (up to HTTP/2's limit of
    /// 16 MiB) is refused RESOURCE_EXHAUSTED alone, without disturbing the other calls on its
    /// connection.
    #[arg(long, env = "BRAINAI_MAX_METADATA_BYTES", default_value_t = 16384)]
    pub max_metadata_bytes: usize,

    /// Log format: text or json.
    #[arg(long, env = "BRAINAI_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Export OpenTelemetry traces over OTLP/gRPC to this collector: http://host:port, or
    /// https://host:port for TLS (unset: no traces are exported). See README "Traces".
    #[arg(long, env = "BRAINAI_OTLP_ENDPOINT", value_parser = crate::telemetry::parse_endpoint)]
    pub otlp_endpoint: Option<String>,

    /// With an https:// --otlp-endpoint: PEM file of the CA certificates that may sign the
    /// collector's certificate (unset: the system's trusted roots).
    #[arg(long, env = "BRAINAI_OTLP_CA")]
    pub otlp_ca: Option<PathBuf>,

    /// The service.name of exported traces.
    #[arg(
        long,
        env = "BRAINAI_OTLP_SERVICE_NAME",
        default_value = "brainai-serve"
    )]
    pub otlp_service_name: String,

    /// Fraction of new traces exported, 0 to 1; a call with a W3C traceparent follows its caller's
    /// sampling decision.
    #[arg(long, env = "BRAINAI_OTLP_SAMPLE_RATIO", default_value_t = 1.0, value_parser = crate::telemetry::parse_ratio)]
    pub otlp_sample_ratio: f64,
}

/// How a client command reaches the server: `brainai classify` and `brainai segment`.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Server URL.
    #[arg(long, env = "BRAINAI_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,

    /// Call deadline in seconds (each call of the run).
    #[arg(long, default_value_t = 60.0)]
    pub timeout_s: f64,

    /// Tries per call while the server answers RESOURCE_EXHAUSTED (busy) or UNAVAILABLE, with
    /// exponential backoff and jitter between them (0.1 s doubling up to 5 s); then the run stops.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tries: u32,

    /// TLS: the CA (PEM) the server's certificate must chain to. Implies https.
    #[arg(long, env = "BRAINAI_CA")]
    pub ca: Option<PathBuf>,

    /// Mutual TLS: this client's certificate (PEM), with --key.
    #[arg(long, env = "BRAINAI_CERT", requires = "key")]
    pub cert: Option<PathBuf>,

    /// Mutual TLS: the private key (PEM) of --cert.
    #[arg(long, env = "BRAINAI_KEY", requires = "cert")]
    pub key: Option<PathBuf>,

    /// The name the server's certificate must carry, when it differs from the URL's host.
    #[arg(long, env = "BRAINAI_TLS_DOMAIN")]
    pub tls_domain: Option<String>,

    /// Bearer token sent as `authorization: Bearer <token>` (prefer the environment variable:
    /// command lines are visible to other users).
    #[arg(long, env = "BRAINAI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// `brainai segment`: one slice, one image per sequence the model takes.
#[derive(Debug, Clone, Args)]
pub struct SegmentArgs {
    /// Server, TLS, token, deadline and retries.
    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Model name (default: the server's default model if it segments, else its one
    /// segmentation model).
    #[arg(long)]
    pub model: Option<String>,

    /// Model version (default: the highest served).
    #[arg(long)]
    pub model_version: Option<String>,

    /// Priority: stat or routine (default: the model's).
    #[arg(long)]
    pub priority: Option<Priority>,

    /// The slice's images, one per sequence.
    #[command(flatten)]
    pub slice: SliceFiles,

    /// Segment a whole DICOM study instead: every DICOM file under this directory (several
    /// series, any order), streamed to SegmentStudy; prints the series used and the volumes.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["flair", "t1", "t1c", "t2", "out"])]
    pub study: Option<PathBuf>,

    /// With --study: write the DICOM Segmentation object (segmentation.dcm) and its measurement
    /// report (measurement-report.dcm, TID 1500 SR) into this directory.
    #[arg(long, value_name = "DIR", requires = "study")]
    pub seg_out: Option<PathBuf>,

    /// With --study: the sequence of a series whose headers do not say, as UID=SEQUENCE
    /// (FLAIR, T1, T1c or T2); repeatable.
    #[arg(long, value_name = "UID=SEQUENCE", requires = "study")]
    pub series: Vec<String>,

    /// With --study: interpolate linearly between the two slices either side of a reference
    /// slice instead of taking the nearest.
    #[arg(long, requires = "study")]
    pub linear_between_slices: bool,

    /// Write the mask (8-bit PNG, each pixel its label's index) here.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    /// Print the answer as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One slice's images, one per MR sequence (a multi-modal model's channels).
#[derive(Debug, Clone, Default, Args)]
pub struct SliceFiles {
    /// The slice's FLAIR image (PNG, JPEG or DICOM).
    #[arg(long, value_name = "FILE")]
    pub flair: Option<PathBuf>,

    /// The slice's T1 image.
    #[arg(long, value_name = "FILE")]
    pub t1: Option<PathBuf>,

    /// The slice's contrast-enhanced T1 image.
    #[arg(long, value_name = "FILE")]
    pub t1c: Option<PathBuf>,

    /// The slice's T2 image.
    #[arg(long, value_name = "FILE")]
    pub t2: Option<PathBuf>,
}

impl SliceFiles {
    /// The images given, by sequence name.
    pub fn given(&self) -> Vec<(&'static str, &PathBuf)> {
        [
            ("FLAIR", &self.flair),
            ("T1", &self.t1),
            ("T1c", &self.t1c),
            ("T2", &self.t2),
        ]
        .into_iter()
        .filter_map(|(sequence, path)| path.as_ref().map(|p| (sequence, p)))
        .collect()
    }
}

#[derive(Debug, Clone, Args)]
pub struct ClassifyArgs {
    /// Server, TLS, token, deadline and retries.
    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Model name (default: the server's default model).
    #[arg(long)]
    pub model: Option<String>,

    /// Model version (default: the highest served).
    #[arg(long)]
    pub model_version: Option<String>,

    /// Priority: stat or routine (default: the model's).
    #[arg(long)]
    pub priority: Option<Priority>,

    /// Print JSON (one object for the whole call) instead of one line per file.
    #[arg(long)]
    pub json: bool,

    /// The files are the instances of one DICOM series: one ClassifySeries call, one line per
    /// slice in slice order and the series finding.
    #[arg(long)]
    pub series: bool,

    /// Also fetch the series' DICOM Structured Report and write it into this directory (implies
    /// --series).
    #[arg(long, value_name = "DIR")]
    pub sr_out: Option<PathBuf>,

    /// Most files in one call (default: the model's max batch size from GetModel, at most 64, the
    /// server's default --max-images-per-request; a server with a lower limit is followed).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub images_per_call: Option<usize>,

    /// Calls in flight at once; results are still printed in input order (default: the model's
    /// instances + 1, from 2 to 4).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub in_flight: Option<usize>,

    /// A multi-modal model's slice instead of files: one image per sequence, one ClassifySlices
    /// call.
    #[command(flatten)]
    pub slice: SliceFiles,

    /// PNG, JPEG or DICOM files, or directories of them (searched recursively).
    #[arg(required_unless_present_any = ["flair", "t1", "t1c", "t2"], conflicts_with_all = ["flair", "t1", "t1c", "t2"])]
    pub files: Vec<PathBuf>,
}

/// A count of at least one.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err("expected a whole number of at least 1".into()),
    }
}

impl ServeArgs {
    /// The thread counts these flags give on this machine.
    pub fn thread_budget(&self) -> crate::threads::ThreadBudget {
        crate::threads::ThreadBudget::of_this_machine(
            self.device,
            self.io_threads,
            self.preprocess_threads,
            self.intra_op_threads,
        )
    }

    /// Where batch tensors live on the host: page-locked on CUDA (unless `--pinned-buffers false`).
    pub fn host_memory(&self) -> crate::backend::host::HostMemory {
        crate::backend::host::HostMemory::for_device(self.device, self.pinned_buffers)
    }

    /// The longest measured batch run time that is run in place (`--inline-run-us`).
    pub fn inline_run(&self) -> std::time::Duration {
        let default = match self.device {
            crate::backend::Device::Cpu => 200,
            crate::backend::Device::Cuda(_) => 0,
        };
        std::time::Duration::from_micros(self.inline_run_us.unwrap_or(default))
    }

    /// Checks combinations clap cannot; each message names the option.
    pub fn validate(&self) -> Result<(), String> {
        self.dicom.settings()?;
        if self.instances == 0 {
            return Err("--instances must be at least 1".into());
        }
        if self.max_batch_size == 0 {
            return Err("--max-batch-size must be at least 1".into());
        }
        if self.max_images_per_request == 0 {
            return Err("--max-images-per-request must be at least 1".into());
        }
        for (flag, capacity) in [
            ("--queue-capacity", self.queue_capacity),
            ("--stat-queue-capacity", self.stat_queue_capacity),
        ] {
            if capacity < self.max_images_per_request {
                return Err(format!(
                    "{flag} ({capacity}) must be at least --max-images-per-request ({}), or a full-size request could never be queued",
                    self.max_images_per_request
                ));
            }
        }
        if self.max_study_decode_mib == 0
            || self.max_study_decode_mib > self.max_decode_in_flight_mib
        {
            return Err(format!(
                "--max-study-decode-mib ({}) must be at least 1 and at most --max-decode-in-flight-mib ({})",
                self.max_study_decode_mib, self.max_decode_in_flight_mib
            ));
        }
        if self.max_study_instances == 0 {
            return Err("--max-study-instances must be at least 1".into());
        }
        if self.max_request_decode_mib == 0
            || self.max_request_decode_mib > self.max_decode_in_flight_mib
        {
            return Err(format!(
                "--max-request-decode-mib ({}) must be at least 1 and at most --max-decode-in-flight-mib ({})",
                self.max_request_decode_mib, self.max_decode_in_flight_mib
            ));
        }
        for (flag, cap) in [
            ("--max-grpc-connections", self.grpc_connections()),
            ("--max-http-api-connections", self.http_api_connections()),
            ("--max-metrics-connections", self.metrics_connections()),
        ] {
            if cap == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        if self.body_read_timeout_s == 0 {
            return Err("--body-read-timeout-s must be at least 1".into());
        }
        let largest = (self.max_http_body_bytes as u64).max(self.max_message_bytes as u64 + 5);
        if self.max_body_bytes_in_flight_mib.saturating_mul(1 << 20) < largest {
            return Err(format!(
                "--max-body-bytes-in-flight-mib ({}) must hold the largest body one call may send ({largest} bytes: --max-http-body-bytes, --max-message-bytes)",
                self.max_body_bytes_in_flight_mib
            ));
        }
        if self.first_request_timeout_s == 0
            || self.idle_timeout_s == 0
            || self.header_read_timeout_s == 0
        {
            return Err(
                "--first-request-timeout-s, --idle-timeout-s and --header-read-timeout-s must be at least 1"
                    .into(),
            );
        }
        self.overrides().map(|_| ())
    }

    /// Open connections the gRPC port takes (`--max-grpc-connections`).
    pub fn grpc_connections(&self) -> usize {
        self.max_grpc_connections
            .or(self.max_connections)
            .unwrap_or(1024)
    }

    /// Open connections the HTTP API port takes (`--max-http-api-connections`).
    pub fn http_api_connections(&self) -> usize {
        self.max_http_api_connections
            .or(self.max_connections)
            .unwrap_or(1024)
    }

    /// Open connections the metrics port takes (`--max-metrics-connections`).
    pub fn metrics_connections(&self) -> usize {
        self.max_metrics_connections
            .or(self.max_http_connections)
            .unwrap_or(128)
    }

    /// One warning per deprecated option in use (flag or environment variable), naming what
    /// replaces it; the server logs them at start. They go away in the next release.
    pub fn deprecations(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(n) = self.max_connections {
            out.push(format!(
                "--max-connections / BRAINAI_MAX_CONNECTIONS ({n}) is deprecated: use --max-grpc-connections and --max-http-api-connections (it sets both where they are not given)"
            ));
        }
        if let Some(n) = self.max_http_connections {
            out.push(format!(
                "--max-http-connections / BRAINAI_MAX_HTTP_CONNECTIONS ({n}) is deprecated: use --max-metrics-connections (it caps the metrics port, not the HTTP API)"
            ));
        }
        out
    }

    /// The `--model-override NAME:KEY=VALUE` flags, by model name.
    pub fn overrides(&self) -> Result<HashMap<String, BatchingOverrides>, String> {
        let mut by_model: HashMap<String, BatchingOverrides> = HashMap::new();
        for flag in &self.model_override {
            let parsed = flag
                .split_once(':')
                .and_then(|(model, kv)| Some((model, kv.split_once('=')?)));
            let Some((model, (key, value))) = parsed.filter(|(m, _)| !m.is_empty()) else {
                return Err(format!(
                    "--model-override {flag:?}: expected NAME:KEY=VALUE, e.g. tiny:max_batch_size=4"
                ));
            };
            by_model
                .entry(model.to_string())
                .or_default()
                .set(key, value)
                .map_err(|e| format!("--model-override {flag:?}: {e}"))?;
        }
        Ok(by_model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(argv: &[&str]) -> ServeArgs {
        let argv = ["brainai", "serve"].iter().chain(argv);
        match Cli::try_parse_from(argv).expect("valid arguments").command {
            Command::Serve(args) => *args,
            _ => unreachable!(),
        }
    }

    #[test]
    fn connection_caps_are_named_after_their_ports() {
        let args = serve(&[
            "--max-grpc-connections",
            "5",
            "--max-http-api-connections",
            "6",
            "--max-metrics-connections",
            "7",
        ]);
        assert_eq!(
            (
                args.grpc_connections(),
                args.http_api_connections(),
                args.metrics_connections()
            ),
            (5, 6, 7)
        );
        assert!(args.deprecations().is_empty());
        let defaults = serve(&[]);
        assert_eq!(
            (
                defaults.grpc_connections(),
                defaults.http_api_connections(),
                defaults.metrics_connections()
            ),
            (1024, 1024, 128)
        );
    }

    #[test]
    fn the_old_names_still_work_and_warn() {
        let args = serve(&["--max-connections", "3", "--max-http-connections", "4"]);
        assert_eq!(
            (
                args.grpc_connections(),
                args.http_api_connections(),
                args.metrics_connections()
            ),
            (3, 3, 4)
        );
        let warnings = args.deprecations();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("--max-grpc-connections"),
            "{warnings:?}"
        );
        assert!(
            warnings[1].contains("--max-metrics-connections"),
            "{warnings:?}"
        );
        // The new names win where both are given.
        let both = serve(&["--max-connections", "3", "--max-grpc-connections", "9"]);
        assert_eq!(
            (both.grpc_connections(), both.http_api_connections()),
            (9, 3)
        );
    }

    #[test]
    fn the_body_budget_must_hold_the_largest_body() {
        let args = serve(&["--max-body-bytes-in-flight-mib", "8"]);
        let err = args.validate().unwrap_err();
        assert!(err.contains("--max-body-bytes-in-flight-mib"), "{err}");
        assert!(serve(&[]).validate().is_ok());
    }
}
