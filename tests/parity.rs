//! Preprocessing equals the training pipeline (Pillow) across the input space, checked against the
//! independent reference (`tests/reference/`: Pillow + numpy, no code shared with the service):
//!
//! - every resize filter over 240 (source size, target size) pairs, gray and RGB: bit-identical;
//! - every input encoding (PNG 1/2/4/8/16-bit gray, gray+alpha, RGB, RGBA, palette with and without
//!   transparency; JPEG gray, YCbCr 4:2:0/4:4:4, progressive, CMYK) through the whole
//!   preprocessing, for both colour modes, all filters, down- and upscaling and both layouts:
//!   PNG identical, JPEG within the decoders' rounding;
//! - end to end through the real server with a model that returns its input (tiny-identity), so
//!   any spatial error (a flip, an off-by-one index, a swapped filter) shows element by element.

mod common;

use std::path::{Path, PathBuf};

use brainai::input::{Encoding, InputLimits};
use brainai::model::ModelSpec;
use brainai::preprocess::Preprocessor;
use brainai::preprocess::resample::{self, Filter};
use common::*;
use serde_json::Value;

const LIMITS: InputLimits = InputLimits {
    max_image_bytes: 64 << 20,
    max_pixels: 1 << 26,
};

/// Largest difference, in 8-bit levels, allowed between our JPEG decoding (zune-jpeg, through the
/// image crate) and Pillow's (libjpeg-turbo): their IDCT, colour conversion and chroma upsampling
/// round differently. Measured on the sweep: gray and 4:4:4 up to 2 levels, 4:2:0 up to 3 at the
/// decoded pixel, 4 after a lanczos upscale amplifies that. PNG must be identical.
const JPEG_LEVELS: f32 = 4.0;

fn sweep(args: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(python())
        .arg(repo().join("tests/reference/sweep.py"))
        .args(args)
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("run tests/reference/sweep.py");
    assert!(
        out.status.success(),
        "sweep.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

#[test]
fn every_filter_equals_pillow_over_240_size_pairs_gray_and_rgb() {
    let dir = sweep(&["resize"]);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cases.json")).unwrap())
            .unwrap();
    let data = std::fs::read(dir.path().join("data.bin")).unwrap();
    let cases = meta["cases"].as_array().unwrap();
    assert!(meta["pairs"].as_u64().unwrap() >= 200);
    let mut mismatches = Vec::new();
    for case in cases {
        let n = |k: &str| case[k].as_u64().unwrap() as usize;
        let range = |k: &str| {
            let r = case[k].as_array().unwrap();
            let (at, len) = (
                r[0].as_u64().unwrap() as usize,
                r[1].as_u64().unwrap() as usize,
            );
            &data[at..at + len]
        };
        let (w, h, c, ow, oh) = (n("w"), n("h"), n("channels"), n("out_w"), n("out_h"));
        let filter = case["filter"].as_str().unwrap();
        let src = range("input");
        let expected = range("output");
        let ours = if (w, h) == (ow, oh) {
            src.to_vec() // the service skips resizing at the model's own size, as Pillow copies
        } else {
            match filter {
                "nearest" => resample::nearest(src, w, h, c, ow, oh),
                "bilinear" => resample::resize(src, w, h, c, ow, oh, Filter::Bilinear),
                "bicubic" => resample::resize(src, w, h, c, ow, oh, Filter::Bicubic),
                "lanczos3" => resample::resize(src, w, h, c, ow, oh, Filter::Lanczos3),
                other => panic!("unknown filter {other}"),
            }
        };
        if ours != expected {
            let differ = ours.iter().zip(expected).filter(|(a, b)| a != b).count();
            let worst = ours
                .iter()
                .zip(expected)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            mismatches.push(format!(
                "{filter} {w}x{h}x{c} -> {ow}x{oh}: {differ} of {} values differ, by up to {worst}",
                expected.len()
            ));
        }
    }
    eprintln!(
        "{} resize cases ({} size pairs x 4 filters x gray/RGB), {} mismatches",
        cases.len(),
        meta["pairs"],
        mismatches.len()
    );
    assert!(
        mismatches.is_empty(),
        "{} of {} cases differ from Pillow:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}

const LEVELS: &str = "scale = 1.0\noffset = 0.0";
const IMAGENET: &str = "mean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]";

/// The generated format images and the committed test images.
fn all_images(formats: &Path) -> Vec<(String, PathBuf, bool)> {
    let listing: Value =
        serde_json::from_str(&std::fs::read_to_string(formats.join("formats.json")).unwrap())
            .unwrap();
    let mut images: Vec<(String, PathBuf, bool)> = listing
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let name = f["file"].as_str().unwrap().to_string();
            (
                name.clone(),
                formats.join(&name),
                f["jpeg"].as_bool().unwrap(),
            )
        })
        .collect();
    for name in [
        "flair_256_a.png",
        "flair_256_tumor.png",
        "flair_512_rgb.png",
        "flair_300x220.png",
        "flair_512_a.jpg",
    ] {
        images.push((
            name.into(),
            repo().join("tests/data").join(name),
            name.ends_with(".jpg"),
        ));
    }
    images
}

#[test]
fn every_input_encoding_preprocesses_like_pillow() {
    let formats = sweep(&["formats"]);
    let images = all_images(formats.path());
    let paths: Vec<PathBuf> = images.iter().map(|(_, p, _)| p.clone()).collect();
    let root = tempfile::tempdir().unwrap();
    let mut variants = Vec::new();
    for (i, (color, filter)) in ["rgb", "grayscale"]
        .iter()
        .flat_map(|c| ["nearest", "bilinear", "bicubic", "lanczos3"].map(|f| (*c, f)))
        .enumerate()
    {
        let layout = if i % 2 == 0 { "NCHW" } else { "NHWC" };
        for size in [(32, 32), (90, 61)] {
            variants.push((
                format!("{color}-{filter}-{layout}-{}x{}", size.0, size.1),
                input_section(layout, size, color, filter, LEVELS),
            ));
        }
    }
    variants.push((
        "imagenet-bilinear".into(),
        input_section("NCHW", (48, 40), "rgb", "bilinear", IMAGENET),
    ));
    let mut failures = Vec::new();
    let mut compared = 0;
    for (name, input) in &variants {
        let dir = variant_dir(root.path(), name, input, "tiny");
        let spec = ModelSpec::load(&dir, None).unwrap();
        let pre = Preprocessor::new(spec.config.input.clone(), LIMITS);
        let expected =
            reference_tensors("reference.py", &dir, &paths, spec.config.input.image_len());
        // ImageNet scaling divides by std ≈ 0.225: one 8-bit level is ≈ 0.0175 there.
        let level = if input.contains("mean") {
            1.0 / (255.0 * 0.224)
        } else {
            1.0
        };
        for ((image, path, jpeg), want) in images.iter().zip(&expected) {
            let got = pre
                .preprocess_to_vec(&std::fs::read(path).unwrap(), Encoding::Detect)
                .unwrap_or_else(|e| panic!("{name}: {image}: {e}"));
            let worst = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
                / level;
            let allowed = if *jpeg { JPEG_LEVELS } else { 0.0 };
            compared += 1;
            if worst > allowed + 1e-3 {
                failures.push(format!("{name}: {image}: differs by {worst:.3} levels"));
            }
        }
    }
    eprintln!(
        "{compared} (image, model input) pairs compared: {} images x {} variants",
        images.len(),
        variants.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_tensors_equal_pillow_element_by_element() {
    // One server, one identity model per preprocessing variant (a model repository).
    let formats = sweep(&["formats"]);
    let images = all_images(formats.path());
    let root = tempfile::tempdir().unwrap();
    let mut models = Vec::new();
    for color in ["rgb", "grayscale"] {
        for filter in ["nearest", "bilinear", "bicubic", "lanczos3"] {
            let name = format!("identity-{color}-{filter}");
            variant_dir(
                root.path(),
                &name,
                &input_section("NCHW", (16, 12), color, filter, LEVELS),
                "tiny-identity",
            );
            models.push(name);
        }
    }
    let mut t = serve(
        repository_args(root.path(), &["--max-queue-delay-us", "0"]),
        None,
    )
    .await;
    let mut failures = Vec::new();
    for model in &models {
        let dir = root.path().join(model);
        let paths: Vec<PathBuf> = images.iter().map(|(_, p, _)| p.clone()).collect();
        let expected = reference_tensors("reference.py", &dir, &paths, 3 * 12 * 16);
        let request = request_for(
            model,
            "",
            images
                .iter()
                .map(|(name, path, _)| image(name, std::fs::read(path).unwrap()))
                .collect(),
        );
        let served = bounded("classify", t.client.classify(request))
            .await
            .unwrap()
            .into_inner()
            .results;
        for ((r, want), (name, _, jpeg)) in served.iter().zip(&expected).zip(&images) {
            assert_eq!(r.image_id, *name);
            let got: Vec<f32> = r.probabilities.iter().map(|p| p.probability).collect();
            let worst = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let allowed = if *jpeg { JPEG_LEVELS } else { 0.0 };
            if worst > allowed {
                failures.push(format!(
                    "{model}: {name}: served tensor differs by {worst} levels"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    t.server.shutdown().await.unwrap();
}
