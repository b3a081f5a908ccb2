//! Device-bound serving: how close the batcher keeps a model-bound instance to full, measured
//! without an accelerator.
//!
//! `cargo bench --bench device_bound -- [--seconds S] [--rounds R] [--batch B] [--fixed-us F]
//!  [--per-image-us P] [--concurrency C] [--config NAME:FLAG,FLAG ...]`
//!
//! The real server (gRPC front end, pipeline, batcher, instance threads) serves the tiny fixture
//! model's preprocessing, but each instance "runs" a batch by sleeping for what an accelerator would
//! take: `fixed + per_image × padded batch`. The CPU is then free while a batch runs, as it is while
//! ONNX Runtime waits on a CUDA stream, so the measurement isolates what the serving structure costs
//! a device: idle gaps between runs (answering a batch, handing the instance the next) and batches
//! that leave with fewer images than they could. ghz (`.tools/bin/ghz`, a separate process) sends
//! single-image PNG calls over TCP, as in `benches/targets.py`: a FLAIR slice, resized to 32² by
//! default so that two cores can decode as fast as the simulated device runs (`--image-side 0`
//! sends the 256² slice itself).
//!
//! Printed per configuration (rounds alternate between configurations; medians reported):
//! served images/s, the simulated device's capacity at the largest batch (`max_batch / t(max)`),
//! their ratio, the mean batch size, the fraction of wall time each instance spent "running"
//! (`busy`: one minus it is the structure's idle time; per round also as the dashboard's "Model
//! instances busy" panel computes it from /metrics), and a run's mean length against the
//! nominal one (a sleep overruns by the kernel's timer slack and wake-up latency, which lowers the
//! ratio but not `busy`).
//!
//! This is a model of an accelerator, not one: it leaves out the host→device copy, contention for
//! the device between instances (two sleeping instances overlap completely, which a real GPU's
//! two streams do only in part) and the CPU threads a CUDA launch uses. Measurements on a real GPU
//! come from `benches/gpu_check.sh`. Not a test: nothing is asserted; docs/PERFORMANCE.md records
//! results.

use std::path::PathBuf;
use std::process::{Command as Process, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use brainai::backend::{Backend, BackendFactory, BatchSizes, EngineError};
use brainai::server;
use clap::Parser;
use tonic_health::pb::health_check_response::ServingStatus;

#[path = "../tests/common/mod.rs"]
mod common;

#[derive(Parser, Debug)]
struct Opts {
    /// Seconds per measurement (after one second of warm-up load).
    #[arg(long, default_value_t = 8.0)]
    seconds: f64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The model's largest batch (`--max-batch-size`).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Simulated run time of any batch, in µs, plus `per_image_us` per (padded) image. The
    /// defaults are ResNet-50 on the H200 (bare ONNX Runtime, page-locked input: 1.3 ms at batch
    /// 1, 7.0 ms at batch 32; docs/PERFORMANCE.md).
    #[arg(long, default_value_t = 1100)]
    fixed_us: u64,
    #[arg(long, default_value_t = 180)]
    per_image_us: u64,
    /// ghz workers: calls in flight.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// ghz connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// `NAME:FLAG,FLAG` extra server flags of one configuration (repeatable; default: one instance
    /// and two instances).
    #[arg(long = "config")]
    configs: Vec<String>,
    /// The 256² PNG every call sends.
    #[arg(long, default_value = "tests/data/flair_256_a.png")]
    image: PathBuf,
    /// Resize the image to this side (PNG again) before sending, to take decoding's CPU out of
    /// the way: two cores cannot decode 256² slices as fast as the default device runs them
    /// (0: send the image as it is).
    #[arg(long, default_value_t = 32)]
    image_side: u32,
    /// Accepted for `cargo bench` compatibility.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Time spent "running" and images run, over all instances.
#[derive(Default)]
struct DeviceLog {
    busy_ns: AtomicU64,
    images: AtomicU64,
    batches: AtomicU64,
}

/// One instance of the simulated device: sleeps for the batch's run time, answers zeros.
struct Simulated {
    sizes: BatchSizes,
    fixed: Duration,
    per_image: Duration,
    outputs: usize,
    log: Arc<DeviceLog>,
}

impl Backend for Simulated {
    fn run(&mut self, _input: &[f32], batch: usize) -> Result<Vec<f32>, EngineError> {
        let started = Instant::now();
        // As on CUDA, a batch runs at the next warmed-up size.
        let padded = self.sizes.padded(batch) as u32;
        std::thread::sleep(self.fixed + self.per_image * padded);
        let log = &self.log;
        log.busy_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        log.images.fetch_add(batch as u64, Ordering::Relaxed);
        log.batches.fetch_add(1, Ordering::Relaxed);
        Ok(vec![0.0; batch * self.outputs])
    }
}

struct Config {
    name: String,
    flags: Vec<String>,
    instances: usize,
}

fn parse_config(spec: &str) -> Config {
    let (name, flags) = spec.split_once(':').unwrap_or((spec, ""));
    let flags: Vec<String> = flags
        .split(',')
        .filter(|f| !f.is_empty())
        .flat_map(|f| f.split('=').map(str::to_string).collect::<Vec<_>>())
        .collect();
    let instances = flags
        .iter()
        .position(|f| f == "--instances")
        .and_then(|i| flags.get(i + 1))
        .map_or(1, |n| n.parse().expect("--instances N"));
    Config {
        name: name.to_string(),
        flags,
        instances,
    }
}

struct Measured {
    images_per_s: f64,
    mean_batch: f64,
    busy: f64,
    /// `busy` as the dashboard computes it from /metrics: the run time's rate over the instances.
    busy_metrics: f64,
    run_ms: f64,
}

fn ghz_data(png: &[u8]) -> PathBuf {
    use base64::Engine as _;
    let dir = common::repo().join("target/bench/device_bound");
    std::fs::create_dir_all(&dir).expect("bench folder");
    let path = dir.join("classify.json");
    let data = base64::engine::general_purpose::STANDARD.encode(png);
    let body = format!(r#"[{{"images": [{{"id": "device-bound", "data": "{data}"}}]}}]"#);
    std::fs::write(&path, body).expect("ghz data file");
    path
}

async fn measure(opts: &Opts, config: &Config, data: &std::path::Path) -> Measured {
    let log = Arc::new(DeviceLog::default());
    let (fixed, per_image) = (
        Duration::from_micros(opts.fixed_us),
        Duration::from_micros(opts.per_image_us),
    );
    let factory_log = log.clone();
    let factory: BackendFactory = Arc::new(move |spec, sizes, _instance| {
        Ok(Box::new(Simulated {
            sizes,
            fixed,
            per_image,
            outputs: spec.config.labels.len(),
            log: factory_log.clone(),
        }))
    });
    let batch = opts.batch.to_string();
    let capacity = (opts.concurrency * 2).to_string();
    let mut flags: Vec<&str> = vec![
        "--max-batch-size",
        &batch,
        "--queue-capacity",
        &capacity,
        // A device-bound batch never runs where it is formed (the CUDA default).
        "--inline-run-us",
        "0",
    ];
    flags.extend(config.flags.iter().map(String::as_str));
    let args = common::args(&common::fixture_model("tiny"), &flags);
    let running = server::start(&args, Some(factory))
        .await
        .expect("server starts");
    let addr = running.grpc_addr;
    // Warm-up done: SERVING.
    let channel = common::connect(addr).await;
    common::wait_for_health(&channel, ServingStatus::Serving).await;

    let warm_up = 1.0;
    let ghz = Process::new(common::repo().join(".tools/bin/ghz"))
        .current_dir(common::repo())
        .args([
            "--insecure",
            "--proto",
            "proto/brainai/v1/classifier.proto",
            "--import-paths",
            "proto",
            "--call",
            "brainai.v1.TumorClassifier/Classify",
            "--disable-template-functions",
            "--disable-template-data",
        ])
        .arg("--data-file")
        .arg(data)
        .args(["-c", &opts.concurrency.to_string()])
        .args(["--connections", &opts.connections.to_string()])
        .args([
            "--duration",
            &format!("{}ms", ((opts.seconds + warm_up + 0.5) * 1e3) as u64),
        ])
        .arg(addr.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ghz runs (make setup installs it into .tools/bin)");

    tokio::time::sleep(Duration::from_secs_f64(warm_up)).await;
    let read = |log: &DeviceLog| {
        (
            Instant::now(),
            log.busy_ns.load(Ordering::Relaxed),
            log.images.load(Ordering::Relaxed),
            log.batches.load(Ordering::Relaxed),
        )
    };
    let run_time_sum = || async {
        let sum = "brainai_inference_duration_seconds_sum";
        common::scrape(running.metrics_addr, sum, &["model=\"tiny\""]).await
    };
    let (t0, busy0, images0, batches0) = read(&log);
    let runs0 = run_time_sum().await;
    tokio::time::sleep(Duration::from_secs_f64(opts.seconds)).await;
    let (t1, busy1, images1, batches1) = read(&log);
    let runs1 = run_time_sum().await;
    let instances = common::scrape(
        running.metrics_addr,
        "brainai_model_instances",
        &["model=\"tiny\""],
    )
    .await;

    let output = tokio::task::spawn_blocking(move || ghz.wait_with_output())
        .await
        .expect("ghz waits")
        .expect("ghz output");
    let summary = String::from_utf8_lossy(&output.stdout);
    // Every call must have been answered OK, except those ghz itself cut off when its duration
    // ended (at most one per worker): a refusal would make the numbers meaningless.
    let errors: Vec<&str> = summary
        .lines()
        .skip_while(|l| !l.starts_with("Error distribution"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect();
    let cut_off: usize = errors
        .iter()
        .filter(|l| l.contains("use of closed network connection"))
        .filter_map(|l| {
            l.trim()
                .strip_prefix('[')?
                .split(']')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    let refused = errors
        .iter()
        .filter(|l| !l.contains("use of closed network connection"))
        .count();
    assert!(
        output.status.success() && refused == 0 && cut_off <= opts.concurrency,
        "ghz saw failures:\n{summary}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut running = running;
    running.begin_shutdown();
    running.shutdown().await.expect("server stops");

    let wall = (t1 - t0).as_secs_f64();
    let images = (images1 - images0) as f64;
    let batches = (batches1 - batches0).max(1) as f64;
    Measured {
        images_per_s: images / wall,
        mean_batch: images / batches,
        busy: (busy1 - busy0) as f64 / 1e9 / wall / config.instances as f64,
        busy_metrics: (runs1 - runs0) / wall / instances,
        run_ms: (busy1 - busy0) as f64 / 1e6 / batches,
    }
}

fn main() {
    let opts = Opts::parse();
    let configs: Vec<Config> = if opts.configs.is_empty() {
        vec![
            parse_config("one_instance:"),
            parse_config("two_instances:--instances=2"),
        ]
    } else {
        opts.configs.iter().map(|c| parse_config(c)).collect()
    };
    let mut png = std::fs::read(common::repo().join(&opts.image)).expect("the bench image");
    if opts.image_side > 0 {
        let side = opts.image_side;
        let small = image::load_from_memory(&png)
            .expect("the bench image decodes")
            .resize_exact(side, side, image::imageops::FilterType::Triangle);
        png.clear();
        small
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("PNG encodes");
    }
    let data = ghz_data(&png);
    let run_time = |b: usize| opts.fixed_us as f64 + opts.per_image_us as f64 * b as f64;
    let capacity = opts.batch as f64 / run_time(opts.batch) * 1e6;
    println!(
        "simulated device: {} µs + {} µs per image; batch {}: {:.1} ms, {capacity:.0} images/s \
         per instance; ghz -c {} over {} connections, {} s per measurement",
        opts.fixed_us,
        opts.per_image_us,
        opts.batch,
        run_time(opts.batch) / 1e3,
        opts.concurrency,
        opts.connections,
        opts.seconds
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut results: Vec<Vec<Measured>> = configs.iter().map(|_| Vec::new()).collect();
    for round in 0..opts.rounds {
        // Alternate the order, so drift in the machine's speed falls on both sides.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..configs.len()).collect()
        } else {
            (0..configs.len()).rev().collect()
        };
        let mut line = format!("round {}:", round + 1);
        for i in order {
            let config = &configs[i];
            let m = runtime.block_on(measure(&opts, config, &data));
            let ideal = capacity * config.instances as f64;
            line += &format!(
                " {} {:.0} images/s ({:.3} of {ideal:.0}), batch {:.1}, busy {:.3} ({:.3} from \
                 /metrics), run {:.2} ms;",
                config.name,
                m.images_per_s,
                m.images_per_s / ideal,
                m.mean_batch,
                m.busy,
                m.busy_metrics,
                m.run_ms
            );
            results[i].push(m);
        }
        println!("{line}");
    }
    for (config, runs) in configs.iter().zip(results) {
        let ideal = capacity * config.instances as f64;
        let ratios: Vec<f64> = runs.iter().map(|m| m.images_per_s / ideal).collect();
        let (lo, hi) = (
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(0.0, f64::max),
        );
        println!(
            "{}: {:.0} images/s, {:.3} of the simulated capacity {ideal:.0} (rounds {lo:.3}-{hi:.3}), \
             mean batch {:.1}, instance busy {:.3}, run {:.2} ms (nominal {:.2})",
            config.name,
            common::median(runs.iter().map(|m| m.images_per_s).collect()),
            common::median(ratios),
            common::median(runs.iter().map(|m| m.mean_batch).collect()),
            common::median(runs.iter().map(|m| m.busy).collect()),
            common::median(runs.iter().map(|m| m.run_ms).collect()),
            run_time(opts.batch) / 1e3,
        );
    }
}
