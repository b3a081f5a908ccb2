//! ClassifySeries (issue 9): one MR series through the real server: slice order from Image
//! Position/Orientation (Patient) whatever order the instances arrive in, duplicates and gaps
//! reported, the model's central fraction and aggregation, one series per call, the sequence
//! guard (reject, warn, unknown), and multi-frame instances as slices.

mod common;

use std::path::{Path, PathBuf};

use brainai::pb;
use common::*;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use tonic::Code;

fn template() -> Vec<u8> {
    std::fs::read(repo().join("tests/data/dicom/ts_explicit_le.dcm")).unwrap()
}

/// How one synthetic slice differs from the template.
#[derive(Clone)]
struct Slice {
    series: &'static str,
    number: i64,
    /// Position along z (axial slices), in mm; `None`: no position or orientation at all.
    z: Option<f64>,
    description: &'static str,
    /// Window center: varies the image, so slices get different probabilities.
    center: f64,
    /// Keep the template's FLAIR timing (inversion recovery, TI 2500, TE 120, TR 9000 ms).
    timing: bool,
}

fn slice(number: i64, z: f64) -> Slice {
    Slice {
        series: "1.2.826.0.1.3680043.10.1234.900",
        number,
        z: Some(z),
        description: "AX FLAIR",
        center: 600.0 + 120.0 * number as f64,
        timing: true,
    }
}

/// The template instance with this slice's identity, position and window.
fn instance(s: &Slice) -> Vec<u8> {
    let bytes = template();
    let mut obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(&bytes[..])
        .unwrap();
    let sop = format!("{}.{}", s.series, s.number);
    let text = |tag, vr, value: String| DataElement::new(tag, vr, PrimitiveValue::from(value));
    obj.put(text(tags::SOP_INSTANCE_UID, VR::UI, sop.clone()));
    obj.put(text(tags::SERIES_INSTANCE_UID, VR::UI, s.series.into()));
    obj.put(text(tags::INSTANCE_NUMBER, VR::IS, s.number.to_string()));
    obj.put(text(tags::SERIES_DESCRIPTION, VR::LO, s.description.into()));
    obj.put(text(tags::WINDOW_CENTER, VR::DS, format!("{}", s.center)));
    obj.put(text(tags::WINDOW_WIDTH, VR::DS, "1400".into()));
    match s.z {
        Some(z) => {
            obj.put(text(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                format!("-100\\-90\\{z}"),
            ));
            obj.put(text(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                "1\\0\\0\\0\\1\\0".into(),
            ));
        }
        None => {
            obj.remove_element(tags::IMAGE_POSITION_PATIENT);
            obj.remove_element(tags::IMAGE_ORIENTATION_PATIENT);
        }
    }
    if !s.timing {
        for tag in [
            tags::SCANNING_SEQUENCE,
            tags::INVERSION_TIME,
            tags::ECHO_TIME,
            tags::REPETITION_TIME,
        ] {
            obj.remove_element(tag);
        }
    }
    obj.update_meta(|meta| meta.media_storage_sop_instance_uid = sop);
    let mut out = Vec::new();
    obj.write_all(&mut out).unwrap();
    out
}

fn series_request(slices: &[Slice]) -> pb::ClassifySeriesRequest {
    pb::ClassifySeriesRequest {
        instances: slices
            .iter()
            .map(|s| pb::Image {
                id: format!("slice-{}", s.number),
                data: instance(s).into(),
                format: pb::ImageFormat::Dicom as i32,
                raw: None,
            })
            .collect(),
        ..Default::default()
    }
}

/// tiny's model directory with `extra` appended to its model.toml.
fn tiny_with(root: &Path, name: &str, extra: &str) -> PathBuf {
    let dir = copy_model("tiny", root, name);
    let toml = std::fs::read_to_string(dir.join("model.toml")).unwrap();
    std::fs::write(dir.join("model.toml"), format!("{toml}\n{extra}\n")).unwrap();
    dir
}

async fn classify_series(
    t: &mut TestServer,
    request: pb::ClassifySeriesRequest,
) -> Result<pb::ClassifySeriesResponse, tonic::Status> {
    let mut client =
        brainai::pb::tumor_classifier_client::TumorClassifierClient::new(t.channel.clone())
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
    bounded("classify series", client.classify_series(request))
        .await
        .map(tonic::Response::into_inner)
}

fn tumor(c: &pb::Classification) -> f32 {
    c.probabilities
        .iter()
        .find(|p| p.label == "tumor")
        .unwrap()
        .probability
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shuffled_series_is_sorted_classified_and_summarised() {
    let mut t = serve(args(&fixture_model("tiny"), &[]), None).await;
    // 10 slices 5 mm apart, sent in a scrambled order; instance numbers disagree with position
    // (descending) so sorting by position is what is checked.
    let ordered: Vec<Slice> = (0..10)
        .map(|k| Slice {
            number: 100 - k,
            ..slice(k, -20.0 + 5.0 * k as f64)
        })
        .map(|s| Slice {
            center: 600.0 + 97.0 * ((s.number * 7) % 10) as f64,
            ..s
        })
        .collect();
    let mut sent = ordered.clone();
    for (i, j) in [(0, 7), (2, 9), (3, 5), (1, 8)] {
        sent.swap(i, j);
    }
    let r = classify_series(&mut t, series_request(&sent))
        .await
        .unwrap();
    assert_eq!(r.sort, "position");
    assert_eq!(
        r.series.as_ref().unwrap().series_instance_uid,
        "1.2.826.0.1.3680043.10.1234.900"
    );
    assert_eq!(r.slices.len(), 10);
    for (k, s) in r.slices.iter().enumerate() {
        assert_eq!(s.slice as usize, k);
        assert_eq!(
            s.sop_instance_uid,
            format!("1.2.826.0.1.3680043.10.1234.900.{}", ordered[k].number),
            "slice {k}"
        );
        assert_eq!(s.position_mm, Some(-20.0 + 5.0 * k as f64));
        assert!(s.selected);
        let c = s.classification.as_ref().unwrap();
        assert_eq!(c.image_id, format!("slice-{}", ordered[k].number));
        assert_eq!(
            sent[s.instance_index as usize].number, ordered[k].number,
            "instance index points at the request's instance"
        );
    }
    // The finding: the highest tumour probability, and the slice it came from.
    let probabilities: Vec<f32> = r
        .slices
        .iter()
        .map(|s| tumor(s.classification.as_ref().unwrap()))
        .collect();
    let distinct: std::collections::BTreeSet<u32> =
        probabilities.iter().map(|p| p.to_bits()).collect();
    assert!(distinct.len() > 3, "slices differ: {probabilities:?}");
    let finding = r.finding.as_ref().unwrap();
    let (best, max) = probabilities
        .iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
        );
    assert_eq!(finding.label, "tumor");
    assert_eq!(finding.probability, max);
    assert_eq!(finding.slice, Some(best as u32));
    assert_eq!(finding.aggregation, "maximum over 10 slices");
    // Same slices, one at a time through Classify: the same per-slice probabilities.
    for (k, s) in ordered.iter().enumerate() {
        let one = bounded(
            "classify",
            t.client.classify(request(vec![image("x", instance(s))])),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(tumor(&one.results[0]), probabilities[k], "slice {k}");
    }
    assert!(
        r.warnings
            .iter()
            .all(|w| !w.contains("gap") && !w.contains("duplicate")),
        "{:?}",
        r.warnings
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_fraction_mean_of_top_k_duplicates_and_gaps() {
    let root = tempfile::tempdir().unwrap();
    let dir = tiny_with(
        root.path(),
        "fraction",
        "[series]\ncentral_fraction = 0.5\naggregation = \"mean_top_k\"\ntop_k = 2",
    );
    let mut t = serve(args(&dir, &[]), None).await;
    // Slices at 0, 4, 8, 8 (a duplicate position), 12, 20 (a gap: 12 → 20), 24, 28.
    let zs = [0.0, 4.0, 8.0, 8.0, 12.0, 20.0, 24.0, 28.0];
    let slices: Vec<Slice> = zs
        .iter()
        .enumerate()
        .map(|(k, &z)| slice(k as i64 + 1, z))
        .collect();
    let r = classify_series(&mut t, series_request(&slices))
        .await
        .unwrap();
    assert_eq!(r.slices.len(), 8);
    let selected: Vec<usize> = r
        .slices
        .iter()
        .filter(|s| s.selected)
        .map(|s| s.slice as usize)
        .collect();
    assert_eq!(selected, vec![2, 3, 4, 5], "the central half");
    assert!(
        r.slices
            .iter()
            .filter(|s| !s.selected)
            .all(|s| s.classification.is_none())
    );
    let mut top: Vec<f32> = r
        .slices
        .iter()
        .filter_map(|s| s.classification.as_ref().map(tumor))
        .collect();
    top.sort_by(|a, b| b.total_cmp(a));
    let finding = r.finding.unwrap();
    assert_eq!(finding.probability, (top[0] + top[1]) / 2.0);
    assert_eq!(finding.slice, None);
    assert_eq!(finding.aggregation, "mean of the top 2 of 4 slices");
    let warnings = r.warnings.join("\n");
    assert!(
        warnings.contains("slices 2 and 3 are at the same position (8.00 mm)"),
        "{warnings}"
    );
    assert!(
        warnings.contains("a gap of 8.00 mm between slices 4 and 5 (spacing 4.00 mm)"),
        "{warnings}"
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_positions_instance_numbers_order_the_slices() {
    let mut t = serve(args(&fixture_model("tiny"), &[]), None).await;
    let slices: Vec<Slice> = [3, 1, 2, 5]
        .iter()
        .map(|&n| Slice {
            z: None,
            ..slice(n, 0.0)
        })
        .collect();
    let r = classify_series(&mut t, series_request(&slices))
        .await
        .unwrap();
    assert_eq!(r.sort, "instance_number");
    let order: Vec<String> = r
        .slices
        .iter()
        .map(|s| s.sop_instance_uid.clone())
        .collect();
    assert_eq!(
        order,
        [1, 2, 3, 5].map(|n| format!("1.2.826.0.1.3680043.10.1234.900.{n}"))
    );
    let warnings = r.warnings.join("\n");
    assert!(
        warnings.contains("ordered by Instance Number"),
        "{warnings}"
    );
    assert!(
        warnings.contains("Instance Numbers jump from 3 to 5"),
        "{warnings}"
    );
    assert!(r.slices.iter().all(|s| s.position_mm.is_none()));
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_series_per_call_and_at_least_two_slices() {
    let mut t = serve(args(&fixture_model("tiny"), &[]), None).await;
    // Two series mixed.
    let mixed = vec![
        slice(1, 0.0),
        Slice {
            series: "1.2.826.0.1.3680043.10.1234.901",
            ..slice(2, 5.0)
        },
    ];
    let err = classify_series(&mut t, series_request(&mixed))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("instance 1 belongs to series 1.2.826.0.1.3680043.10.1234.901")
            && err.message().contains("one call takes one series"),
        "{}",
        err.message()
    );
    // One slice.
    let err = classify_series(&mut t, series_request(&[slice(1, 0.0)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("at least 2 slices"),
        "{}",
        err.message()
    );
    // The same instance twice is one slice: still too few.
    let err = classify_series(&mut t, series_request(&[slice(1, 0.0), slice(1, 0.0)]))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("at least 2 slices"),
        "{}",
        err.message()
    );
    // Not DICOM.
    let mut request = series_request(&[slice(1, 0.0), slice(2, 5.0)]);
    request.instances[1] = image("png", data("flair_256_a.png"));
    let err = classify_series(&mut t, request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("image 1: ClassifySeries takes DICOM instances"),
        "{}",
        err.message()
    );
    // A hostile instance is named, and the server keeps serving.
    let mut request = series_request(&[slice(1, 0.0), slice(2, 5.0)]);
    request.instances[0].data = std::fs::read(repo().join("tests/data/dicom/bad/huge_length.dcm"))
        .unwrap()
        .into();
    let err = classify_series(&mut t, request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("image 0: "), "{}", err.message());
    let ok = classify_series(&mut t, series_request(&[slice(1, 0.0), slice(2, 5.0)])).await;
    assert!(ok.is_ok(), "{ok:?}");
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sequence_guard_rejects_warns_and_flags_unknown() {
    let root = tempfile::tempdir().unwrap();
    let guard = "[input.dicom]\nmodality = [\"MR\"]\nsequences = [\"FLAIR\"]";
    tiny_with(
        root.path(),
        "reject",
        &format!("{guard}\nsequence_policy = \"reject\""),
    );
    tiny_with(
        root.path(),
        "warn",
        &format!("{guard}\nsequence_policy = \"warn\""),
    );
    let mut t = serve(repository_args(root.path(), &[]), None).await;
    let described = |description: &'static str| -> Vec<Slice> {
        (0..3)
            .map(|k| Slice {
                description,
                ..slice(k, 5.0 * k as f64)
            })
            .collect()
    };
    let for_model = |model: &str, slices: &[Slice]| pb::ClassifySeriesRequest {
        model: model.into(),
        ..series_request(slices)
    };
    // FLAIR: accepted, no guard warning.
    let r = classify_series(&mut t, for_model("reject", &described("AX T2 FLAIR")))
        .await
        .unwrap();
    assert_eq!(r.detected_sequence, "FLAIR");
    assert!(
        r.warnings.iter().all(|w| !w.contains("sequence")),
        "{:?}",
        r.warnings
    );
    // T1 with contrast: refused, naming what was detected.
    let err = classify_series(&mut t, for_model("reject", &described("AX T1 POST GD")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("the series is T1c") && err.message().contains("FLAIR only"),
        "{}",
        err.message()
    );
    // The same through Classify, one instance.
    let err = bounded(
        "classify",
        t.client.classify(request_for(
            "reject",
            "",
            vec![image("t2", instance(&described("AX T2 TSE")[0]))],
        )),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("the series is T2"),
        "{}",
        err.message()
    );
    // warn: answered, with the warning on the series and on Classify's result.
    let r = classify_series(&mut t, for_model("warn", &described("AX T1 POST GD")))
        .await
        .unwrap();
    assert_eq!(r.detected_sequence, "T1c");
    assert!(
        r.warnings.iter().any(|w| w.contains("the series is T1c")),
        "{:?}",
        r.warnings
    );
    let one = bounded(
        "classify",
        t.client.classify(request_for(
            "warn",
            "",
            vec![image("t1", instance(&described("AX T1")[0]))],
        )),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(
        one.results[0]
            .warnings
            .iter()
            .any(|w| w.contains("the series is T1")),
        "{:?}",
        one.results[0].warnings
    );
    // Unknown always only warns, even under reject (no description and no timing to go by;
    // with the template's FLAIR timing, the timing alone says FLAIR).
    let r = classify_series(&mut t, for_model("reject", &described("DWI b1000")))
        .await
        .unwrap();
    assert_eq!(r.detected_sequence, "FLAIR");
    let untimed: Vec<Slice> = described("DWI b1000")
        .into_iter()
        .map(|s| Slice { timing: false, ..s })
        .collect();
    let r = classify_series(&mut t, for_model("reject", &untimed))
        .await
        .unwrap();
    assert_eq!(r.detected_sequence, "unknown");
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("could not be identified")),
        "{:?}",
        r.warnings
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_of_a_multi_frame_instance_is_a_slice() {
    let mut t = serve(args(&fixture_model("tiny"), &[]), None).await;
    let data = std::fs::read(repo().join("tests/data/dicom/multiframe.dcm")).unwrap();
    let r = classify_series(
        &mut t,
        pb::ClassifySeriesRequest {
            instances: vec![image("mf", data)],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let frames: Vec<u32> = r.slices.iter().map(|s| s.frame).collect();
    assert_eq!(frames, vec![1, 2, 3]);
    assert!(r.slices.iter().all(|s| s.selected && s.instance_index == 0));
    let probabilities: Vec<f32> = r
        .slices
        .iter()
        .map(|s| tumor(s.classification.as_ref().unwrap()))
        .collect();
    assert!(
        probabilities[0] != probabilities[1] || probabilities[1] != probabilities[2],
        "the frames differ: {probabilities:?}"
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structured_report_comes_back_for_the_series_and_the_cli_writes_it() {
    let root = tempfile::tempdir().unwrap();
    let dir = tiny_with(root.path(), "half", "[series]\ncentral_fraction = 0.5");
    let mut t = serve(args(&dir, &[]), None).await;
    let slices: Vec<Slice> = (0..6).map(|k| slice(k + 1, 3.0 * k as f64)).collect();
    let r = classify_series(
        &mut t,
        pb::ClassifySeriesRequest {
            structured_report: true,
            ..series_request(&slices)
        },
    )
    .await
    .unwrap();
    assert!(!r.structured_report.is_empty());
    let sr = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(&r.structured_report[..])
        .unwrap();
    let text = |tag| {
        sr.element(tag)
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches(['\0', ' '])
            .to_string()
    };
    assert_eq!(text(tags::SOP_CLASS_UID), "1.2.840.10008.5.1.4.1.1.88.33");
    assert_eq!(text(tags::MODALITY), "SR");
    assert_eq!(text(tags::VERIFICATION_FLAG), "UNVERIFIED");
    assert_eq!(text(tags::PATIENT_NAME), "Anon^Test");
    assert_eq!(
        text(tags::STUDY_INSTANCE_UID),
        r.series.as_ref().unwrap().study_instance_uid
    );
    assert_ne!(
        text(tags::SERIES_INSTANCE_UID),
        r.series.as_ref().unwrap().series_instance_uid,
        "the report is a series of its own"
    );
    // The evidence lists exactly the classified slices.
    let evidence: std::collections::BTreeSet<String> = sr
        .element(tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()
        .iter()
        .flat_map(|study| {
            study
                .element(tags::REFERENCED_SERIES_SEQUENCE)
                .unwrap()
                .items()
                .unwrap()
        })
        .flat_map(|series| {
            series
                .element(tags::REFERENCED_SOP_SEQUENCE)
                .unwrap()
                .items()
                .unwrap()
        })
        .map(|sop| {
            sop.element(tags::REFERENCED_SOP_INSTANCE_UID)
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches(['\0', ' '])
                .to_string()
        })
        .collect();
    let classified: std::collections::BTreeSet<String> = r
        .slices
        .iter()
        .filter(|s| s.selected)
        .map(|s| s.sop_instance_uid.clone())
        .collect();
    assert_eq!(classified.len(), 3);
    assert_eq!(evidence, classified);
    // The command-line client: --sr-out writes the same kind of report.
    let files = tempfile::tempdir().unwrap();
    for s in &slices {
        std::fs::write(files.path().join(format!("{}.dcm", s.number)), instance(s)).unwrap();
    }
    let out_dir = files.path().join("sr");
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_brainai"))
        .args(["classify", "--server", &t.grpc_url(), "--sr-out"])
        .arg(&out_dir)
        .arg(files.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&cli.stdout);
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(stdout.contains("series\ttumor\t"), "{stdout}");
    let written: Vec<_> = std::fs::read_dir(&out_dir).unwrap().collect();
    assert_eq!(written.len(), 1);
    let bytes = std::fs::read(written[0].as_ref().unwrap().path()).unwrap();
    assert_eq!(&bytes[128..132], b"DICM");
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enhanced_mr_frames_are_sorted_by_their_functional_group_positions() {
    use dicom_object::InMemDicomObject;
    let mut t = serve(args(&fixture_model("tiny"), &[]), None).await;
    // An Enhanced MR instance of three frames stored at z = 10, 0, 5 mm: positions and the
    // orientation only in the functional groups, none at the top level.
    let bytes = template();
    let mut obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(&bytes[..])
        .unwrap();
    let pixels = obj
        .element(tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap()
        .to_vec();
    let frame_len = pixels.len();
    let mut all = Vec::with_capacity(3 * frame_len);
    for k in 0..3u16 {
        // Each frame a little different, so their probabilities differ.
        all.extend(
            pixels
                .chunks_exact(2)
                .flat_map(|p| (u16::from_le_bytes([p[0], p[1]]) / (k + 1)).to_le_bytes()),
        );
    }
    let text = |tag, vr, value: &str| DataElement::new(tag, vr, PrimitiveValue::from(value));
    let item = |elements: Vec<DataElement<InMemDicomObject>>| {
        InMemDicomObject::from_element_iter(elements)
    };
    let sequence = |tag, items: Vec<InMemDicomObject>| {
        DataElement::new(tag, VR::SQ, dicom_core::value::DataSetSequence::from(items))
    };
    let positions = ["-100\\-90\\10", "-100\\-90\\0", "-100\\-90\\5"];
    obj.put(sequence(
        tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
        vec![item(vec![sequence(
            tags::PLANE_ORIENTATION_SEQUENCE,
            vec![item(vec![text(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                "1\\0\\0\\0\\1\\0",
            )])],
        )])],
    ));
    obj.put(sequence(
        tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
        positions
            .iter()
            .map(|p| {
                item(vec![sequence(
                    tags::PLANE_POSITION_SEQUENCE,
                    vec![item(vec![text(tags::IMAGE_POSITION_PATIENT, VR::DS, p)])],
                )])
            })
            .collect(),
    ));
    obj.remove_element(tags::IMAGE_POSITION_PATIENT);
    obj.remove_element(tags::IMAGE_ORIENTATION_PATIENT);
    obj.put(text(tags::NUMBER_OF_FRAMES, VR::IS, "3"));
    obj.put(text(
        tags::SOP_CLASS_UID,
        VR::UI,
        "1.2.840.10008.5.1.4.1.1.4.1",
    ));
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::from(all),
    ));
    let mut data = Vec::new();
    obj.write_all(&mut data).unwrap();
    let r = classify_series(
        &mut t,
        pb::ClassifySeriesRequest {
            instances: vec![image("enhanced", data)],
            structured_report: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(r.sort, "position");
    let frames: Vec<u32> = r.slices.iter().map(|s| s.frame).collect();
    assert_eq!(frames, vec![2, 3, 1], "sorted by z: 0, 5, 10");
    let z: Vec<Option<f64>> = r.slices.iter().map(|s| s.position_mm).collect();
    assert_eq!(z, vec![Some(0.0), Some(5.0), Some(10.0)]);
    assert!(!r.structured_report.is_empty());
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_whose_probabilities_are_not_is_named_instead_of_an_internal_error() {
    // tiny-identity declares kind = "probabilities" and returns its input tensor (0..255): the
    // structured report failed with INTERNAL, "the structured report could not be built"
    // (issue 22, finding 24). The output contract is checked and the error names the model.
    let root = tempfile::tempdir().unwrap();
    let dir = copy_model("tiny-identity", root.path(), "not-probabilities");
    let mut t = serve(args(&dir, &[]), None).await;
    let slices: Vec<Slice> = (0..3).map(|k| slice(k + 1, 3.0 * k as f64)).collect();
    let err = classify_series(
        &mut t,
        pb::ClassifySeriesRequest {
            structured_report: true,
            ..series_request(&slices)
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .starts_with("model not-probabilities version 1 returned "),
        "{err:?}"
    );
    assert!(
        err.message()
            .contains("which is not a probability in [0, 1]: no structured report can state it"),
        "{err:?}"
    );
    // Without a report the series is classified as before.
    classify_series(&mut t, series_request(&slices))
        .await
        .unwrap();
}
