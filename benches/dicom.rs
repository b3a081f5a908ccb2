//! DICOM benchmark (issue 9), side by side in one run on one core (this process and its Python
//! child pinned to CPU 0):
//!
//! 1. A 512×512 16-bit MR slice (uncompressed, JPEG-LS lossless, JPEG 2000 lossless) to the default
//!    model's 256×256 NCHW tensor: the service's `Preprocessor` against pydicom + numpy + Pillow
//!    doing the same steps (`benches/dicom_pydicom.py`), in alternating rounds; medians and the
//!    ratio pydicom / service per round.
//! 2. With `--series MODEL_DIR` (`make bench-dicom` passes the default model): a 24-slice series
//!    end to end through a separately started `brainai serve` (gRPC ClassifySeries from this
//!    process): latency per call and slices per second.
//!
//! `cargo bench --bench dicom [-- --rounds N --iterations N --series DIR]`. Results:
//! docs/PERFORMANCE.md. Not a test: nothing is asserted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use brainai::input::{Encoding, InputLimits, SixteenBit};
use brainai::model::{ColorMode, DicomWindow, InputSpec, Layout, ResizeFilter, Scaling};
use brainai::preprocess::Preprocessor;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    repo().join(".venv/bin/python")
}

fn pin_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t with CPU 0 set, for this process (children inherit it).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = arg("--rounds").map_or(5, |v| v.parse().unwrap());
    let iterations: usize = arg("--iterations").map_or(30, |v| v.parse().unwrap());
    pin_to_cpu0();
    let dir = tempfile::tempdir().unwrap();
    let made = Command::new(python())
        .arg(repo().join("benches/dicom_pydicom.py"))
        .arg("make")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(made.success(), "benches/dicom_pydicom.py make failed");
    let files = ["uncompressed.dcm", "jpegls.dcm", "j2k.dcm"];
    let spec = InputSpec {
        channels: Vec::new(),
        tensors: Vec::new(),
        tensor_name: "input".into(),
        layout: Layout::Nchw,
        height: 256,
        width: 256,
        color: ColorMode::Rgb,
        resize_filter: ResizeFilter::Bilinear,
        scaling: Scaling::MeanStd {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        },
        sixteen_bit: SixteenBit::Pillow,
        dicom_window: DicomWindow::Header,
        dicom_guard: None,
        dicom_output: Default::default(),
    };
    let pre = Preprocessor::new(
        spec,
        InputLimits {
            max_image_bytes: 64 << 20,
            max_pixels: 1 << 26,
        },
    );
    println!("DICOM slice → tensor, one core (CPU 0), {rounds} rounds × {iterations} iterations");
    println!(
        "{:<18} {:>5} {:>12} {:>12} {:>8}",
        "file", "round", "service ms", "pydicom ms", "ratio"
    );
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); files.len()];
    let mut ours_all: Vec<Vec<f64>> = vec![Vec::new(); files.len()];
    for round in 0..rounds {
        let ours: Vec<f64> = files
            .iter()
            .map(|f| {
                let data = std::fs::read(dir.path().join(f)).unwrap();
                pre.preprocess_to_vec(&data, Encoding::Dicom).unwrap();
                median(
                    (0..iterations)
                        .map(|_| {
                            let start = Instant::now();
                            std::hint::black_box(
                                pre.preprocess_to_vec(&data, Encoding::Dicom).unwrap(),
                            );
                            start.elapsed().as_secs_f64() * 1000.0
                        })
                        .collect(),
                )
            })
            .collect();
        let out = Command::new(python())
            .arg(repo().join("benches/dicom_pydicom.py"))
            .arg("time")
            .args(files.iter().map(|f| dir.path().join(f)))
            .args(["--iterations", &iterations.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for (i, f) in files.iter().enumerate() {
            let p = theirs[f].as_f64().unwrap();
            let ratio = p / ours[i];
            ratios[i].push(ratio);
            ours_all[i].push(ours[i]);
            println!(
                "{f:<18} {round:>5} {:>12.3} {:>12.3} {:>8.2}",
                ours[i], p, ratio
            );
        }
    }
    println!("\nmedians over rounds:");
    for (i, f) in files.iter().enumerate() {
        println!(
            "{f:<18} service {:.3} ms/image, pydicom/service {:.2}x (rounds: {})",
            median(ours_all[i].clone()),
            median(ratios[i].clone()),
            ratios[i]
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if let Some(model) = arg("--series") {
        series(Path::new(&model), dir.path());
    }
}

/// A 24-slice series through a separately started server.
fn series(model: &Path, dir: &Path) {
    // The server gets both cores; unpin this process (the client) too.
    // SAFETY: as in pin_to_cpu0, with every CPU set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..libc::CPU_SETSIZE as usize {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    let made = Command::new(python())
        .args(["-c", SERIES_SCRIPT])
        .arg(dir.join("uncompressed.dcm"))
        .arg(dir.join("series"))
        .status()
        .unwrap();
    assert!(made.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(repo().join("target/release/brainai"))
        .args(["serve", "--model-dir"])
        .arg(model)
        .args([
            "--grpc-addr",
            &format!("127.0.0.1:{port}"),
            "--http-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("target/release/brainai: run make build");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let url = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        let mut client = loop {
            match brainai::pb::tumor_classifier_client::TumorClassifierClient::connect(url.clone())
                .await
            {
                Ok(c) => break c.max_encoding_message_size(256 << 20),
                Err(_) if start.elapsed().as_secs() < 120 => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await
                }
                Err(e) => panic!("server did not start: {e}"),
            }
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("series"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        let instances: Vec<brainai::pb::Image> = files
            .iter()
            .map(|p| brainai::pb::Image {
                id: p.display().to_string(),
                data: std::fs::read(p).unwrap().into(),
                format: brainai::pb::ImageFormat::Dicom as i32,
                raw: None,
            })
            .collect();
        let request = brainai::pb::ClassifySeriesRequest {
            instances,
            ..Default::default()
        };
        // Waits for warm-up (UNAVAILABLE until SERVING), then one unmeasured call.
        loop {
            match client.classify_series(request.clone()).await {
                Ok(_) => break,
                Err(e) if e.code() == tonic::Code::Unavailable => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        let mut latencies = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            let r = client
                .classify_series(request.clone())
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.slices.len(), 24);
            latencies.push(start.elapsed().as_secs_f64());
        }
        let m = median(latencies.clone());
        println!(
            "\n24-slice 512x512 series, ClassifySeries end to end ({}): median {:.3} s per series, \
             {:.1} slices/s (calls: {})",
            model.display(),
            m,
            24.0 / m,
            latencies
                .iter()
                .map(|l| format!("{l:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    });
    let _ = server.kill();
    let _ = server.wait();
}

/// 24 copies of one slice as a series, 5 mm apart, shuffled file names.
const SERIES_SCRIPT: &str = r#"
import sys, pydicom
from pathlib import Path
src, out = sys.argv[1], Path(sys.argv[2])
out.mkdir(exist_ok=True)
for k in range(24):
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = f"{ds.SeriesInstanceUID}.{k + 1}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = k + 1
    ds.SeriesDescription = "AX FLAIR"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-120, -120, 5.0 * k]
    ds.save_as(out / f"{(k * 7) % 24:02d}.dcm", enforce_file_format=True)
"#;
