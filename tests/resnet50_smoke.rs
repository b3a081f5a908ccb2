//! Smoke test of the real default model: the generated ResNet-50 (`make model`) served end to end,
//! its probabilities checked against onnxruntime's Python API on the Pillow-preprocessed tensor.

mod common;

use brainai::pb;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_resnet50_serves_and_matches_onnxruntime_python() {
    let dir = repo().join("models/brain-tumor-resnet50");
    let onnx = dir.join("1/model.onnx");
    assert!(
        onnx.is_file(),
        "{} missing: run `make model`",
        onnx.display()
    );
    let mut t = serve(
        args(&dir, &["--intra-op-threads", "0", "--max-batch-size", "4"]),
        None,
    )
    .await;

    let info = t
        .client
        .get_model(pb::GetModelRequest::default())
        .await
        .unwrap()
        .into_inner();
    let model = info.model.unwrap();
    assert_eq!(model.name, "brain-tumor-resnet50");
    assert_eq!(model.sha256, sha256_hex(&onnx));
    assert!(!model.clinically_trained);
    let input = info.input.unwrap();
    assert_eq!(
        (input.height, input.width, input.layout.as_str()),
        (256, 256, "NCHW")
    );
    assert_eq!(info.labels, ["no_tumor", "tumor"]);

    let names = [
        "flair_256_a.png",
        "flair_256_tumor.png",
        "flair_512_rgb.png",
    ];
    let images = names.iter().map(|n| image(n, data(n))).collect();
    let served = t
        .client
        .classify(request(images))
        .await
        .unwrap()
        .into_inner()
        .results;

    let mut argv = vec![
        "classify".to_string(),
        "--model-dir".into(),
        dir.display().to_string(),
    ];
    argv.extend(
        names
            .iter()
            .map(|n| repo().join("tests/data").join(n).display().to_string()),
    );
    let reference: serde_json::Value = serde_json::from_str(&reference(
        &argv.iter().map(String::as_str).collect::<Vec<_>>(),
    ))
    .unwrap();
    let expected = reference["probabilities"].as_array().unwrap();
    for (i, r) in served.iter().enumerate() {
        assert_eq!(r.model.as_ref().unwrap().sha256, model.sha256);
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("not clinically trained"))
        );
        for (j, p) in r.probabilities.iter().enumerate() {
            let e = expected[i][j].as_f64().unwrap() as f32;
            assert!(
                (p.probability - e).abs() <= 1e-4,
                "{}: label {j}: served {} vs onnxruntime-python {e}",
                names[i],
                p.probability
            );
        }
    }
    t.server.shutdown().await.unwrap();
}
