//! The model's DICOM guard refuses other modalities: a model trained on MR (`[input.dicom]
//! modality = ["MR"]`, as the default model declares) answers a CT instance with
//! FAILED_PRECONDITION naming the modality, through `Classify` and `ClassifySeries`, while the
//! same slice marked MR is classified; under `sequence_policy = "warn"` the CT slice is answered
//! with the reason as a warning.

mod common;

use std::path::Path;

use brainai::pb;
use common::*;
use tonic::Code;

const SERIES: &str = "1.2.826.0.1.3680043.10.1234.31";

/// tiny, named `name`, with the default model's DICOM guard under `policy`.
fn guarded(root: &Path, name: &str, policy: &str) {
    let dir = copy_model("tiny", root, name);
    let toml = std::fs::read_to_string(dir.join("model.toml")).unwrap();
    std::fs::write(
        dir.join("model.toml"),
        format!(
            "{toml}\n[input.dicom]\nmodality = [\"MR\"]\nsequences = [\"FLAIR\"]\n\
             sequence_policy = \"{policy}\"\n"
        ),
    )
    .unwrap();
}

fn dicom(id: &str, bytes: Vec<u8>) -> pb::Image {
    pb::Image {
        id: id.into(),
        data: bytes.into(),
        format: pb::ImageFormat::Dicom as i32,
        raw: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ct_instance_is_refused_by_a_model_trained_on_mr() {
    let root = tempfile::tempdir().unwrap();
    guarded(root.path(), "reject", "reject");
    guarded(root.path(), "warn", "warn");
    let mut t = serve(
        repository_args(root.path(), &["--default-model", "reject"]),
        None,
    )
    .await;
    let classify = |model: &str, modality: &str| {
        request_for(
            model,
            "",
            vec![dicom("slice", dicom_slice(SERIES, 1, modality))],
        )
    };

    // The MR slice passes the guard (the control: only the modality differs).
    let mr = bounded("Classify MR", t.client.classify(classify("reject", "MR")))
        .await
        .expect("an MR FLAIR slice is classified")
        .into_inner();
    assert_eq!(mr.results.len(), 1);

    let refused = bounded("Classify CT", t.client.classify(classify("reject", "CT")))
        .await
        .expect_err("a CT slice must be refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("modality is \"CT\"")
            && refused.message().contains("accepts MR"),
        "{}",
        refused.message()
    );

    let series = pb::ClassifySeriesRequest {
        model: "reject".into(),
        instances: (1..=3)
            .map(|k| dicom(&format!("ct-{k}"), dicom_slice(SERIES, k, "CT")))
            .collect(),
        ..Default::default()
    };
    let refused = bounded("ClassifySeries CT", t.client.classify_series(series))
        .await
        .expect_err("a CT series must be refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("modality is \"CT\""),
        "{}",
        refused.message()
    );

    // warn: answered, the reason attached.
    let warned = bounded(
        "Classify CT, warn",
        t.client.classify(classify("warn", "CT")),
    )
    .await
    .expect("warn answers")
    .into_inner();
    assert!(
        warned.results[0]
            .warnings
            .iter()
            .any(|w| w.contains("modality is \"CT\"")),
        "{:?}",
        warned.results[0].warnings
    );
    t.server.shutdown().await.unwrap();
}
