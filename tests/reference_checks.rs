//! Numbers checked against an independent reference (tests/reference/reference.py: Pillow + numpy +
//! onnxruntime's Python API), never against this code's own output.

mod common;

use std::path::{Path, PathBuf};

use brainai::input::{Encoding, InputLimits};
use brainai::model::ModelSpec;
use brainai::preprocess::Preprocessor;
use common::*;

const LIMITS: InputLimits = InputLimits {
    max_image_bytes: 64 << 20,
    max_pixels: 1 << 26,
};

const PNGS: [&str; 5] = [
    "flair_256_a.png",
    "flair_256_tumor.png",
    "flair_512_a.png",
    "flair_512_rgb.png",
    "flair_300x220.png",
];

/// A model directory with `model.toml` edited by `edit`, sharing the tiny model's graph.
fn variant(base: &str, edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture_model(base);
    let toml = std::fs::read_to_string(src.join("model.toml")).unwrap();
    std::fs::write(dir.path().join("model.toml"), edit(toml)).unwrap();
    std::fs::create_dir(dir.path().join("1")).unwrap();
    std::fs::copy(src.join("1/model.onnx"), dir.path().join("1/model.onnx")).unwrap();
    dir
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Max |rust - reference| over the images, preprocessed for the model in `model_dir`.
fn max_preprocess_diff(model_dir: &Path, images: &[&str]) -> f32 {
    let spec = ModelSpec::load(model_dir, None).unwrap();
    let pre = Preprocessor::new(spec.config.input.clone(), LIMITS);
    let out = tempfile::NamedTempFile::new().unwrap();
    let paths: Vec<PathBuf> = images
        .iter()
        .map(|i| repo().join("tests/data").join(i))
        .collect();
    let mut argv = vec![
        "preprocess".to_string(),
        "--model-dir".into(),
        model_dir.display().to_string(),
    ];
    argv.extend(paths.iter().map(|p| p.display().to_string()));
    argv.extend(["--out".into(), out.path().display().to_string()]);
    reference(&argv.iter().map(String::as_str).collect::<Vec<_>>());
    let expected = read_f32(out.path());
    let n = spec.config.input.image_len();
    assert_eq!(expected.len(), n * images.len(), "reference tensor size");
    let mut worst = 0f32;
    for (i, name) in images.iter().enumerate() {
        let got = pre
            .preprocess_to_vec(&data(name), Encoding::Detect)
            .unwrap();
        for (g, e) in got.iter().zip(&expected[i * n..(i + 1) * n]) {
            worst = worst.max((g - e).abs());
        }
    }
    worst
}

#[test]
fn nearest_resize_matches_pillow_exactly() {
    // tiny-nhwc-probs: nearest, grayscale (Pillow's luma), NHWC, scale/offset.
    let diff = max_preprocess_diff(&fixture_model("tiny-nhwc-probs"), &PNGS);
    assert_eq!(diff, 0.0, "nearest must be identical to Pillow");
    let rgb_nearest = variant("tiny", |t| t.replace("\"bilinear\"", "\"nearest\""));
    assert_eq!(max_preprocess_diff(rgb_nearest.path(), &PNGS), 0.0);
}

#[test]
fn bilinear_bicubic_lanczos_match_pillow() {
    for filter in ["bilinear", "bicubic", "lanczos3"] {
        let dir = variant("tiny", |t| {
            t.replace("\"bilinear\"", &format!("\"{filter}\""))
                .replace("height = 32", "height = 256")
                .replace("width = 32", "width = 256")
        });
        let diff = max_preprocess_diff(dir.path(), &PNGS);
        eprintln!("{filter} 256x256: max difference to Pillow {diff}");
        assert!(diff <= 1e-3, "{filter}: max difference {diff} to Pillow");
        if filter != "lanczos3" {
            // Pure fixed-point arithmetic, as Pillow's: expect the very same 8-bit pixels.
            assert_eq!(diff, 0.0, "{filter}: not bit-identical to Pillow");
        }
    }
    // Downscaling to the tiny model's 32×32 exercises wide filter support.
    let diff = max_preprocess_diff(&fixture_model("tiny"), &PNGS);
    assert!(diff <= 1e-3, "bilinear 32×32: max difference {diff}");
}

#[test]
fn jpeg_decoding_is_close_to_pillow() {
    // JPEG decoders may differ by rounding in the IDCT; compare decoded pixels (no resize: the
    // model input is the image's own size, scale 1).
    for (name, size) in [("flair_512_a.jpg", 512), ("flair_256_a.jpg", 256)] {
        let dir = variant("tiny-nhwc-probs", |t| {
            t.replace("height = 32", &format!("height = {size}"))
                .replace("width = 32", &format!("width = {size}"))
                .replace("color = \"grayscale\"", "color = \"rgb\"")
                .replace("scale = 0.00392156862745098", "scale = 1.0")
        });
        let diff = max_preprocess_diff(dir.path(), &[name]);
        eprintln!("{name}: max decoded difference to Pillow {diff} levels");
        assert!(
            diff <= 2.0,
            "{name}: decoded pixels differ from Pillow's by up to {diff} levels"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_probabilities_equal_onnxruntime_python_on_the_pillow_tensor() {
    for model in ["tiny", "tiny-nhwc-probs"] {
        let dir = fixture_model(model);
        let mut t = serve(args(&dir, &[]), None).await;
        classify_matches_reference(&mut t, &dir, &PNGS).await;
        t.server.shutdown().await.unwrap();
    }
}
