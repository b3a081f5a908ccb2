//! Command line: `brainai serve` and `brainai classify`. Every serve option is also a `BRAINAI_*`
//! environment variable; `--help` is the reference (and the README table mirrors it).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::engine::Device;

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
    /// Serve a model over gRPC (with health, reflection and Prometheus metrics).
    Serve(ServeArgs),
    /// Classify image files with a running server; one line per file.
    Classify(ClassifyArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Model directory: model.toml plus <version>/model.onnx.
    #[arg(
        long,
        env = "BRAINAI_MODEL_DIR",
        default_value = "models/brain-tumor-resnet50"
    )]
    pub model_dir: PathBuf,

    /// Model version to serve (default: the highest version directory).
    #[arg(long, env = "BRAINAI_MODEL_VERSION")]
    pub model_version: Option<u64>,

    /// gRPC listen address.
    #[arg(long, env = "BRAINAI_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

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

    /// ONNX Runtime intra-op threads per instance (0: one per core).
    #[arg(long, env = "BRAINAI_INTRA_OP_THREADS", default_value_t = 0)]
    pub intra_op_threads: usize,

    /// Let ONNX Runtime's idle intra-op threads spin-wait (lower latency inside a run; on small
    /// machines the spinning takes CPU from decoding and gRPC).
    #[arg(long, env = "BRAINAI_INTRA_OP_SPINNING", default_value_t = true, action = clap::ArgAction::Set)]
    pub intra_op_spinning: bool,

    /// Largest batch (capped at the model's max_batch_size from model.toml).
    #[arg(long, env = "BRAINAI_MAX_BATCH_SIZE", default_value_t = 8)]
    pub max_batch_size: usize,

    /// Longest time, in microseconds, the oldest queued image waits for its batch to fill.
    #[arg(long, env = "BRAINAI_MAX_QUEUE_DELAY_US", default_value_t = 2000)]
    pub max_queue_delay_us: u64,

    /// Most images waiting in the queue; beyond it requests get RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "BRAINAI_QUEUE_CAPACITY", default_value_t = 256)]
    pub queue_capacity: usize,

    /// Most images in one Classify request.
    #[arg(long, env = "BRAINAI_MAX_IMAGES_PER_REQUEST", default_value_t = 64)]
    pub max_images_per_request: usize,

    /// Largest encoded (or raw) image, in bytes.
    #[arg(long, env = "BRAINAI_MAX_IMAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_image_bytes: usize,

    /// Largest decoded image, in pixels (guards against decompression bombs).
    #[arg(long, env = "BRAINAI_MAX_PIXELS", default_value_t = 8192 * 8192)]
    pub max_pixels: u64,

    /// Largest gRPC message the server accepts, in bytes.
    #[arg(long, env = "BRAINAI_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// On SIGTERM/SIGINT, how long queued and running work may take to finish, in seconds.
    #[arg(long, env = "BRAINAI_DRAIN_TIMEOUT_S", default_value_t = 30)]
    pub drain_timeout_s: u64,

    /// Connections are closed after this many seconds so clients re-resolve (0: never).
    #[arg(long, env = "BRAINAI_MAX_CONNECTION_AGE_S", default_value_t = 300)]
    pub max_connection_age_s: u64,

    /// Log format: text or json.
    #[arg(long, env = "BRAINAI_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct ClassifyArgs {
    /// Server URL.
    #[arg(long, env = "BRAINAI_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,

    /// Model name (default: the server's).
    #[arg(long)]
    pub model: Option<String>,

    /// Print JSON (one object for the whole call) instead of one line per file.
    #[arg(long)]
    pub json: bool,

    /// Call deadline in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub timeout_s: f64,

    /// PNG or JPEG files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

impl ServeArgs {
    /// Checks combinations clap cannot; each message names the option.
    pub fn validate(&self) -> Result<(), String> {
        if self.instances == 0 {
            return Err("--instances must be at least 1".into());
        }
        if self.max_batch_size == 0 {
            return Err("--max-batch-size must be at least 1".into());
        }
        if self.max_images_per_request == 0 {
            return Err("--max-images-per-request must be at least 1".into());
        }
        if self.queue_capacity < self.max_images_per_request {
            return Err(format!(
                "--queue-capacity ({}) must be at least --max-images-per-request ({}), or a full-size request could never be queued",
                self.queue_capacity, self.max_images_per_request
            ));
        }
        Ok(())
    }
}
