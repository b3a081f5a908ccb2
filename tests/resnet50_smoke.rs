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
    let served = classify_matches_reference(&mut t, &dir, &names).await;
    for r in &served {
        assert_eq!(r.model.as_ref().unwrap().sha256, model.sha256);
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("not clinically trained"))
        );
    }
    t.server.shutdown().await.unwrap();
}
