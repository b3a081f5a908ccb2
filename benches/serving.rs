//! Serving benchmark: the service against the bare model, measured side by side in one run.
//!
//! `cargo bench --bench serving -- [--model-dir DIR] [--seconds S] [--rounds R] [--batch B]
//!  [--delay-us D] [--concurrency C] [--threads T]`
//!
//! Prints (medians over the rounds, bare and served runs alternating):
//! - preprocessing of a 512×512 JPEG and a 256×256 PNG to the model tensor (one core), and the
//!   resize step alone: Pillow-exact resampler vs fast_image_resize vs the image crate;
//! - throughput of a bare ONNX Runtime loop vs the served model at saturation (same threads, same
//!   batch size), and their ratio;
//! - latency of one image at light load: served p50 vs the bare batch-1 run, and the difference.
//!
//! Not a test: nothing is asserted; see docs/PERFORMANCE.md for recorded results.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use brainai::backend::host::{HostBuffer, HostMemory};
use brainai::backend::ort::{self as engine, OrtBackend, OrtOptions};
use brainai::backend::{Backend, BatchSizes, Device};
use brainai::input::{Encoding, InputLimits};
use brainai::model::ModelSpec;
use brainai::preprocess::Preprocessor;
use brainai::preprocess::resample::{self, Filter};
use clap::Parser;

#[path = "../tests/common/mod.rs"]
mod common;

#[derive(Parser, Debug)]
struct Opts {
    #[arg(long, default_value = "models/brain-tumor-resnet50")]
    model_dir: PathBuf,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 12.0)]
    seconds: f64,
    /// Alternating bare/served rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 2000)]
    delay_us: u64,
    /// Concurrent single-image callers at saturation.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// ORT intra-op threads for both the bare loop and the server (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// libonnxruntime.so (default: the project's .venv).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    ort_library: Option<PathBuf>,
    /// Execution device for both: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Sequential calls for the light-load latency.
    #[arg(long, default_value_t = 40)]
    light_calls: usize,
    /// Model instances of the served side (the bare loop is one session).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// ORT intra-op spin-waiting, for both sides.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    spinning: bool,
    /// Only the bare ORT loop's throughput (for tests/load/bare_vs_served.py, which drives the
    /// served side with ghz).
    #[arg(long)]
    bare_only: bool,
    /// On CUDA: the bare loop's input and the server's batch buffers page-locked
    /// (`--pinned-buffers`); false: both pageable.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pinned: bool,
    /// Accepted for `cargo bench` compatibility.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Opts {
    fn host_memory(&self) -> HostMemory {
        HostMemory::for_device(self.device, self.pinned)
    }
}

fn data(name: &str) -> Vec<u8> {
    std::fs::read(common::repo().join("tests/data").join(name)).expect("test image")
}

fn time_per_call(iterations: usize, mut f: impl FnMut()) -> f64 {
    f();
    let started = Instant::now();
    for _ in 0..iterations {
        f();
    }
    started.elapsed().as_secs_f64() / iterations as f64
}

fn preprocessing(spec: &ModelSpec, rounds: usize) {
    let pre = Preprocessor::new(
        spec.config.input.clone(),
        InputLimits {
            max_image_bytes: 64 << 20,
            max_pixels: 1 << 26,
        },
    );
    println!("\n## Preprocessing (one core, ms per image, median of {rounds} rounds of 200)");
    for name in ["flair_512_a.jpg", "flair_512_rgb.png", "flair_256_a.png"] {
        let bytes = data(name);
        let ms = common::median(
            (0..rounds)
                .map(|_| {
                    1e3 * time_per_call(200, || {
                        pre.preprocess_to_vec(&bytes, Encoding::Detect).unwrap();
                    })
                })
                .collect(),
        );
        let decode = common::median(
            (0..rounds)
                .map(|_| {
                    1e3 * time_per_call(200, || drop(image::load_from_memory(&bytes).unwrap()))
                })
                .collect(),
        );
        println!(
            "{name:<22} → {}×{} tensor: {ms:.3} ms (of which decode {decode:.3} ms)",
            spec.config.input.width, spec.config.input.height
        );
    }

    // The resize step alone, 512×512 RGB → 256×256, three implementations.
    let rgb = image::load_from_memory(&data("flair_512_rgb.png"))
        .unwrap()
        .to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let src = rgb.as_raw().clone();
    let ours = common::median(
        (0..rounds)
            .map(|_| {
                1e3 * time_per_call(200, || {
                    drop(resample::resize(&src, w, h, 3, 256, 256, Filter::Bilinear))
                })
            })
            .collect(),
    );
    let fir = common::median(
        (0..rounds)
            .map(|_| {
                1e3 * time_per_call(200, || {
                    use fast_image_resize as fr;
                    let s = fr::images::Image::from_vec_u8(
                        w as u32,
                        h as u32,
                        src.clone(),
                        fr::PixelType::U8x3,
                    )
                    .unwrap();
                    let mut d = fr::images::Image::new(256, 256, fr::PixelType::U8x3);
                    fr::Resizer::new()
                        .resize(
                            &s,
                            &mut d,
                            &fr::ResizeOptions::new()
                                .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear)),
                        )
                        .unwrap();
                })
            })
            .collect(),
    );
    let img = common::median(
        (0..rounds)
            .map(|_| {
                1e3 * time_per_call(200, || {
                    drop(image::imageops::resize(
                        &rgb,
                        256,
                        256,
                        image::imageops::FilterType::Triangle,
                    ))
                })
            })
            .collect(),
    );
    println!(
        "resize 512²→256² RGB bilinear: Pillow-exact (used) {ours:.3} ms, fast_image_resize {fir:.3} ms, image crate {img:.3} ms"
    );
}

/// Images per second of a plain ORT loop over batches of `batch` images.
fn bare_throughput(backend: &mut OrtBackend, input: &[f32], batch: usize, seconds: f64) -> f64 {
    backend.run(input, batch).unwrap();
    let started = Instant::now();
    let mut images = 0usize;
    while started.elapsed().as_secs_f64() < seconds {
        backend.run(input, batch).unwrap();
        images += batch;
    }
    images as f64 / started.elapsed().as_secs_f64()
}

fn bare_latency_ms(backend: &mut OrtBackend, one: &[f32], calls: usize) -> f64 {
    backend.run(one, 1).unwrap();
    common::median(
        (0..calls)
            .map(|_| {
                let t = Instant::now();
                backend.run(one, 1).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

async fn served(opts: &Opts, png: Arc<Vec<u8>>) -> (f64, (f64, f64)) {
    let mut flags: Vec<String> = vec![
        "--intra-op-threads".into(),
        opts.threads.to_string(),
        "--max-batch-size".into(),
        opts.batch.to_string(),
        "--max-queue-delay-us".into(),
        opts.delay_us.to_string(),
        "--queue-capacity".into(),
        (opts.concurrency * 4).max(64).to_string(),
        "--device".into(),
        opts.device.to_string(),
        format!("--intra-op-spinning={}", opts.spinning),
        format!("--instances={}", opts.instances),
        format!("--pinned-buffers={}", opts.pinned),
    ];
    if let Some(p) = &opts.ort_library {
        flags.extend(["--ort-library".to_string(), p.display().to_string()]);
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    // Waits on real readiness: health reports SERVING once every instance is warm.
    let t = common::serve(common::args(&opts.model_dir, &flags), None).await;
    let client = t.client.clone();
    let request = move |png: &Vec<u8>| common::request(vec![common::image("", png.to_vec())]);

    // Light load: one call at a time.
    let mut c = client.clone();
    c.classify(request(&png)).await.unwrap();
    let mut lat = Vec::new();
    let mut overhead = Vec::new();
    for _ in 0..opts.light_calls {
        let t = Instant::now();
        let r = c.classify(request(&png)).await.unwrap().into_inner();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        lat.push(ms);
        // Everything but the model run of this very call: measured side by side, immune to
        // the model getting slower or faster between runs.
        overhead.push(ms - r.results[0].timing.unwrap().inference_seconds * 1e3);
    }
    let light_p50 = (common::median(lat), common::median(overhead));

    // Saturation: `concurrency` callers in a closed loop.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..opts.concurrency {
        let (mut c, stop, done, png) = (client.clone(), stop.clone(), done.clone(), png.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                c.classify(request(&png)).await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Let the pipeline fill before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start_count = done.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(opts.seconds)).await;
    let images = done.load(Ordering::Relaxed) - start_count;
    let throughput = images as f64 / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    t.server.shutdown().await.unwrap();
    (throughput, light_p50)
}

fn main() {
    let opts = Opts::parse();
    let library =
        engine::find_runtime_library(opts.ort_library.as_deref()).expect("run `make setup`");
    engine::init_runtime(&library).expect("ONNX Runtime loads");
    let spec = ModelSpec::load(&opts.model_dir, None).expect("run `make model`");
    println!("# BrainAI Serve benchmark");
    println!(
        "model {} v{} ({}), device {}, batch {}, queue delay {} µs, ORT threads {} (0 = per core), {} s per measurement, {} rounds",
        spec.config.name,
        spec.version,
        &spec.sha256[..12],
        opts.device,
        opts.batch,
        opts.delay_us,
        opts.threads,
        opts.seconds,
        opts.rounds
    );

    if !opts.bare_only {
        preprocessing(&spec, opts.rounds);
    }

    let pre = Preprocessor::new(
        spec.config.input.clone(),
        InputLimits {
            max_image_bytes: 64 << 20,
            max_pixels: 1 << 26,
        },
    );
    let png = Arc::new(data("flair_256_a.png"));
    let one = pre.preprocess_to_vec(&png, Encoding::Detect).unwrap();
    // The bare loop's input, in the same memory the server's batch buffers use.
    let mut input = HostBuffer::new(opts.batch * one.len(), opts.host_memory());
    input
        .chunks_mut(one.len())
        .for_each(|row| row.copy_from_slice(&one));
    let mut one_buffer = HostBuffer::new(one.len(), opts.host_memory());
    one_buffer.copy_from_slice(&one);
    let one = one_buffer;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if opts.bare_only {
        let options = OrtOptions {
            device: opts.device,
            intra_op_threads: opts.threads,
            intra_op_spinning: opts.spinning,
            batch_sizes: BatchSizes::new(opts.batch),
            host_memory: opts.host_memory(),
        };
        let mut backend = OrtBackend::open(&spec, options).unwrap();
        let runs: Vec<f64> = (0..opts.rounds)
            .map(|_| bare_throughput(&mut backend, &input, opts.batch, opts.seconds))
            .collect();
        println!(
            "bare ORT loop, batch {}: {:.3} images/s",
            opts.batch,
            common::median(runs)
        );
        println!(
            "bare ORT batch-1 run: {:.3} ms",
            bare_latency_ms(&mut backend, &one, opts.light_calls)
        );
        return;
    }
    let (mut bare_tp, mut bare_lat, mut served_tp, mut served_lat, mut served_overhead) =
        (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..opts.rounds {
        {
            let mut backend = OrtBackend::open(
                &spec,
                OrtOptions {
                    device: opts.device,
                    intra_op_threads: opts.threads,
                    intra_op_spinning: opts.spinning,
                    batch_sizes: BatchSizes::new(opts.batch),
                    host_memory: opts.host_memory(),
                },
            )
            .unwrap();
            bare_lat.push(bare_latency_ms(&mut backend, &one, opts.light_calls));
            bare_tp.push(bare_throughput(
                &mut backend,
                &input,
                opts.batch,
                opts.seconds,
            ));
        }
        let (tp, (lat, overhead)) = runtime.block_on(served(&opts, png.clone()));
        served_tp.push(tp);
        served_lat.push(lat);
        served_overhead.push(overhead);
        println!(
            "round {}: bare {:.2} img/s, served {:.2} img/s; latency bare {:.2} ms, served {:.2} ms (overhead {:.2} ms)",
            round + 1,
            bare_tp[round],
            tp,
            bare_lat[round],
            lat,
            overhead
        );
    }
    let (bt, st, bl, sl) = (
        common::median(bare_tp),
        common::median(served_tp),
        common::median(bare_lat),
        common::median(served_lat),
    );
    let so = common::median(served_overhead);
    println!(
        "\n## Throughput at saturation (median of {} rounds)",
        opts.rounds
    );
    println!("bare ORT loop, batch {}: {bt:.2} images/s", opts.batch);
    println!(
        "served, {} concurrent single-image callers: {st:.2} images/s",
        opts.concurrency
    );
    println!("ratio served / bare: {:.3}   (target ≥ 0.95)", st / bt);
    println!("\n## Latency of one image at light load (median)");
    println!(
        "bare ORT batch-1 run: {bl:.2} ms; served call (PNG 256², includes decode): {sl:.2} ms"
    );
    println!(
        "added by the service: {so:.2} ms = served call minus that call's own model run (served p50 minus bare p50: {:.2} ms)   (target ≤ max_queue_delay {:.2} ms + 2 ms = {:.2} ms)",
        sl - bl,
        opts.delay_us as f64 / 1e3,
        opts.delay_us as f64 / 1e3 + 2.0
    );
}
