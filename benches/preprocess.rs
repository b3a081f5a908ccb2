//! Criterion microbenchmarks of preprocessing (one core, no model needed).
//!
//! `cargo bench --bench preprocess [-- FILTER]`
//!
//! - `preprocess`: decode + resize + normalise one image of `tests/data` to the 256×256 NCHW
//!   tensor of models/brain-tumor-resnet50, through the public API, as the service does
//!   (`Preprocessor::preprocess_to_vec`).
//! - `resize`: the resize step alone, 512²→256² bilinear, 1 and 3 channels: the Pillow-exact
//!   resampler the service uses against fast_image_resize and the image crate.
//!
//! Measurement times are short (30 samples, 1 s warm-up, 3 s measurement): the whole run takes
//! about a minute. The end-to-end serving benchmark is `benches/serving.rs`.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use brainai::input::{Encoding, InputLimits, SixteenBit};
use brainai::model::{ColorMode, InputSpec, Layout, ResizeFilter, Scaling};
use brainai::preprocess::Preprocessor;
use brainai::preprocess::resample::{self, Filter};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fast_image_resize as fir;

/// The `[input]` of models/brain-tumor-resnet50/model.toml, written out so that the bench does not
/// need the generated 94 MB model.onnx (`ModelSpec::load` hashes it).
fn resnet50_input() -> InputSpec {
    InputSpec {
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
        dicom_window: Default::default(),
        dicom_guard: None,
        dicom_output: Default::default(),
    }
}

/// The service's default limits (`--max-image-bytes`, `--max-pixels`).
const LIMITS: InputLimits = InputLimits {
    max_image_bytes: 16 * 1024 * 1024,
    max_pixels: 8192 * 8192,
};

fn test_data(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn preprocess(c: &mut Criterion) {
    let preprocessor = Preprocessor::new(resnet50_input(), LIMITS);
    let mut group = c.benchmark_group("preprocess");
    group.throughput(Throughput::Elements(1));
    for name in [
        "flair_256_a.png",
        "flair_256_a.jpg",
        "flair_512_a.png",
        "flair_512_a.jpg",
        "flair_512_rgb.png",
    ] {
        let data = test_data(name);
        group.bench_function(name, |b| {
            b.iter(|| {
                preprocessor
                    .preprocess_to_vec(black_box(&data), Encoding::Detect)
                    .unwrap()
            })
        });
    }
    // TODO(DICOM): a 512×512 16-bit DICOM slice → tensor belongs here, as one more case of this
    // group, once DICOM is implemented (it is not yet: no DICOM `Encoding` in src/preprocess.rs
    // and no .dcm in tests/data). No stand-in bench until then.
    group.finish();
}

/// 512²→256² bilinear with three resamplers. Only `brainai::resample::resize` is bit-identical to
/// Pillow's `Image.resize`, which training used; fast_image_resize (Convolution Bilinear) and
/// `image::imageops::resize` (Triangle) are faster or comparable but NOT bit-identical to Pillow,
/// and tests/reference_checks.rs requires identical pixels. That is why the service uses the
/// slower exact resampler; the other two are here as a yardstick. Each call returns a freshly
/// allocated output image, as the service's resize does.
fn resize(c: &mut Criterion) {
    let gray = image::load_from_memory(&test_data("flair_512_a.png"))
        .unwrap()
        .to_luma8();
    let rgb = image::load_from_memory(&test_data("flair_512_rgb.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(gray.dimensions(), (512, 512));
    assert_eq!(rgb.dimensions(), (512, 512));
    let (w, h, out_w, out_h) = (512u32, 512u32, 256u32, 256u32);

    let mut group = c.benchmark_group("resize");
    group.throughput(Throughput::Elements(1));
    let fir_options = fir::ResizeOptions::new()
        .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Bilinear));
    let mut resizer = fir::Resizer::new();

    for (label, channels, src, pixel_type) in [
        ("gray", 1, gray.as_raw(), fir::PixelType::U8),
        ("rgb", 3, rgb.as_raw(), fir::PixelType::U8x3),
    ] {
        group.bench_function(format!("pillow_exact/{label}"), |b| {
            b.iter(|| {
                resample::resize(
                    black_box(src),
                    w as usize,
                    h as usize,
                    channels,
                    out_w as usize,
                    out_h as usize,
                    Filter::Bilinear,
                )
            })
        });
        group.bench_function(format!("fast_image_resize/{label}"), |b| {
            let view = fir::images::ImageRef::new(w, h, src, pixel_type).unwrap();
            b.iter(|| {
                let mut dst = fir::images::Image::new(out_w, out_h, pixel_type);
                resizer
                    .resize(black_box(&view), &mut dst, &fir_options)
                    .unwrap();
                dst
            })
        });
    }
    group.bench_function("image_triangle/gray", |b| {
        b.iter(|| {
            image::imageops::resize(
                black_box(&gray),
                out_w,
                out_h,
                image::imageops::FilterType::Triangle,
            )
        })
    });
    group.bench_function("image_triangle/rgb", |b| {
        b.iter(|| {
            image::imageops::resize(
                black_box(&rgb),
                out_w,
                out_h,
                image::imageops::FilterType::Triangle,
            )
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = preprocess, resize
}
criterion_main!(benches);
