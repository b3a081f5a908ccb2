//! Segmentation benchmark (issue 23): the service against the bare model and against the Python
//! stack a research team would write, measured side by side in one run, rounds alternating.
//!
//! `cargo bench --bench segment -- [--model-dir DIR] [--seconds S] [--rounds R] [--batch B]
//!  [--concurrency C] [--threads T] [--iterations N]`
//!
//! Prints (medians over the rounds):
//! - postprocessing of one slice (the U-Net's 4 × 240 × 240 logits → argmax → the label map
//!   mapped back to the slice's 256 × 256 → per-label counts and boxes → PNG): the service's
//!   `Segmenter::segment` against numpy + Pillow doing the same (`benches/segment_python.py`);
//! - throughput at saturation: a bare ONNX Runtime loop at batch B against the served model
//!   (`Segment` calls of one slice each, C at once, the same ORT threads and batch size), and
//!   against the per-request Python stack (Pillow + numpy + onnxruntime, one slice at a time).
//!
//! Not a test: nothing is asserted; docs/PERFORMANCE.md has the recorded results.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use brainai::backend::host::HostMemory;
use brainai::backend::ort::{self as engine, OrtBackend, OrtOptions};
use brainai::backend::{Backend, BatchSizes, Device};
use brainai::input::{Encoding, InputLimits};
use brainai::model::ModelSpec;
use brainai::pb;
use brainai::postprocess::Segmenter;
use brainai::preprocess::Preprocessor;
use clap::Parser;

#[path = "../tests/common/mod.rs"]
mod common;

#[derive(Parser, Debug)]
struct Opts {
    #[arg(long, default_value = "models/brain-tumor-unet")]
    model_dir: PathBuf,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Alternating rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 2000)]
    delay_us: u64,
    /// Concurrent single-slice callers at saturation.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// ORT intra-op threads for the bare loop, the server and the Python stack (0: per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Model instances of the served side (the bare loop is one session).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// ORT intra-op threads of the Python stack (0: per core; default: --threads).
    #[arg(long)]
    python_threads: Option<usize>,
    /// Postprocessing runs per round and side.
    #[arg(long, default_value_t = 300)]
    iterations: usize,
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_library: Option<PathBuf>,
    /// Accepted for `cargo bench` compatibility.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The slice: FLAIR, T1c and T2 stand-ins of 256 × 256 (the model takes 240 × 240).
const SLICE: [(&str, &str); 3] = [
    ("FLAIR", "flair_256_a.png"),
    ("T1c", "flair_256_b.png"),
    ("T2", "flair_256_c.png"),
];

fn data(name: &str) -> Vec<u8> {
    std::fs::read(common::repo().join("tests/data").join(name)).unwrap()
}

fn python(args: &[String]) -> serde_json::Value {
    let out = std::process::Command::new(common::python())
        .arg(common::repo().join("benches/segment_python.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "segment_python.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn bare_throughput(backend: &mut OrtBackend, input: &[f32], batch: usize, seconds: f64) -> f64 {
    backend.run(input, batch).unwrap();
    let started = Instant::now();
    let mut slices = 0usize;
    while started.elapsed().as_secs_f64() < seconds {
        backend.run(input, batch).unwrap();
        slices += batch;
    }
    slices as f64 / started.elapsed().as_secs_f64()
}

async fn served(opts: &Opts) -> f64 {
    let flags: Vec<String> = vec![
        "--intra-op-threads".into(),
        opts.threads.to_string(),
        "--max-batch-size".into(),
        opts.batch.to_string(),
        "--max-queue-delay-us".into(),
        opts.delay_us.to_string(),
        "--queue-capacity".into(),
        (opts.concurrency * 4).max(64).to_string(),
        format!("--instances={}", opts.instances),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let t = common::serve(common::args(&opts.model_dir, &flags), None).await;
    let slice = pb::SegmentSlice {
        id: String::new(),
        images: SLICE
            .iter()
            .map(|(sequence, file)| pb::SequenceImage {
                sequence: sequence.to_string(),
                image: Some(common::image("", data(file))),
            })
            .collect(),
    };
    let request = pb::SegmentRequest {
        slices: vec![slice],
        ..Default::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..opts.concurrency {
        let (mut c, stop, done, request) = (
            t.client.clone(),
            stop.clone(),
            done.clone(),
            request.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                c.segment(request.clone()).await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start_count = done.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(opts.seconds)).await;
    let slices = done.load(Ordering::Relaxed) - start_count;
    let throughput = slices as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    t.server.shutdown().await.unwrap();
    throughput
}

fn main() {
    let opts = Opts::parse();
    let library =
        engine::find_runtime_library(opts.ort_library.as_deref()).expect("run `make setup`");
    engine::init_runtime(&library).expect("ONNX Runtime loads");
    let spec = ModelSpec::load(&opts.model_dir, None).expect("run `make model`");
    let segmenter = Segmenter::new(&spec).expect("a segmentation model");
    println!("# BrainAI Serve segmentation benchmark");
    println!(
        "model {} v{} ({}), batch {}, queue delay {} µs, ORT threads {} (0 = per core; Python stack {}), served instances {}, {} s per throughput measurement, {} rounds",
        spec.config.name,
        spec.version,
        &spec.sha256[..12],
        opts.batch,
        opts.delay_us,
        opts.threads,
        opts.python_threads.unwrap_or(opts.threads),
        opts.instances,
        opts.seconds,
        opts.rounds
    );
    let pre = Preprocessor::new(
        spec.config.input.clone(),
        InputLimits {
            max_image_bytes: 64 << 20,
            max_pixels: 1 << 26,
        },
    );
    let images: Vec<Vec<u8>> = SLICE.iter().map(|(_, f)| data(f)).collect();
    let borrowed: Vec<(&[u8], Encoding)> =
        images.iter().map(|d| (&d[..], Encoding::Detect)).collect();
    let mut one = vec![0f32; spec.config.input.image_len()];
    let source = pre.preprocess_channels(&borrowed, &mut one).unwrap();
    let (w, h) = (source.width, source.height);
    let input: Vec<f32> = one.repeat(opts.batch);
    let options = OrtOptions {
        device: Device::Cpu,
        intra_op_threads: opts.threads,
        intra_op_spinning: true,
        batch_sizes: BatchSizes::new(opts.batch),
        host_memory: HostMemory::for_device(Device::Cpu, true),
    };
    // A real output of the model for this slice, for the postprocessing comparison.
    let logits = OrtBackend::open(&spec, options)
        .unwrap()
        .run(&one, 1)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let logits_file = dir.path().join("logits.f32");
    std::fs::write(
        &logits_file,
        logits
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let mask = segmenter.segment(&logits, w, h, false);
    println!(
        "slice {w}×{h}, model {}×{}, {} labels; mask PNG {} bytes; pixels per label {:?}",
        spec.config.input.width,
        spec.config.input.height,
        spec.config.labels.len(),
        mask.png.len(),
        mask.classes.iter().map(|a| a.pixels).collect::<Vec<_>>()
    );
    let python_post = vec![
        "postprocess".to_string(),
        "--logits".into(),
        logits_file.display().to_string(),
        "--classes".into(),
        spec.config.labels.len().to_string(),
        "--size".into(),
        spec.config.input.width.to_string(),
        "--out-size".into(),
        w.to_string(),
        h.to_string(),
        "--iterations".into(),
        opts.iterations.to_string(),
    ];
    let mut python_serve = vec![
        "serve".to_string(),
        "--model-dir".into(),
        opts.model_dir.display().to_string(),
        "--seconds".into(),
        opts.seconds.to_string(),
        "--threads".into(),
        opts.python_threads.unwrap_or(opts.threads).to_string(),
    ];
    for (sequence, file) in SLICE {
        python_serve.push("--image".into());
        python_serve.push(format!(
            "{sequence}={}",
            common::repo().join("tests/data").join(file).display()
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut ours, mut numpy, mut bare, mut served_tp, mut stack) =
        (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..opts.rounds {
        let mut times = Vec::with_capacity(opts.iterations);
        for _ in 0..opts.iterations {
            let t = Instant::now();
            std::hint::black_box(segmenter.segment(std::hint::black_box(&logits), w, h, false));
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ours.push(common::median(times));
        numpy.push(python(&python_post)["ms"].as_f64().unwrap());
        {
            let mut backend = OrtBackend::open(&spec, options).unwrap();
            bare.push(bare_throughput(
                &mut backend,
                &input,
                opts.batch,
                opts.seconds,
            ));
        }
        served_tp.push(runtime.block_on(served(&opts)));
        stack.push(python(&python_serve)["slices_per_s"].as_f64().unwrap());
        println!(
            "round {}: postprocess {:.3} ms vs numpy + Pillow {:.3} ms; bare {:.2} slices/s, served {:.2}, Python stack {:.2}",
            round + 1,
            ours[round],
            numpy[round],
            bare[round],
            served_tp[round],
            stack[round]
        );
    }
    let (o, n, b, s, p) = (
        common::median(ours),
        common::median(numpy),
        common::median(bare),
        common::median(served_tp),
        common::median(stack),
    );
    println!("\n## Medians of {} rounds", opts.rounds);
    println!(
        "postprocessing of one slice: {o:.3} ms (service) vs {n:.3} ms (numpy + Pillow): {:.1}×",
        n / o
    );
    println!(
        "throughput at saturation: bare ORT loop (batch {}) {b:.2} slices/s, served {s:.2} slices/s: served/bare {:.3}",
        opts.batch,
        s / b
    );
    println!(
        "per-request Python stack (Pillow + numpy + onnxruntime): {p:.2} slices/s: served/Python {:.2}×",
        s / p
    );
}
