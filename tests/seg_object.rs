//! The DICOM Segmentation of a segmented series (`brainai::report::seg::build`), checked by two
//! independent DICOM implementations: dicom3tools' `dciodvfy` (IOD and module conformance: no
//! line may start with "Error") and highdicom 0.28 with pydicom (`tests/reference/seg_check.py`:
//! the masks highdicom reconstructs per source instance and segment are exactly the label maps
//! put in, a region being the union of its classes; the segments, codes, colours, references and
//! the volume read back). The tools are required: a missing one fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use brainai::input::InputLimits;
use brainai::input::dicom::{self, PatientContext};
use brainai::report::ModelIdentity;
use brainai::report::seg::{self, Code, SegFrame, SegReport, SegmentSpec};
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use serde_json::{Value, json};

const LIMITS: InputLimits = InputLimits {
    max_image_bytes: 64 << 20,
    max_pixels: 1 << 26,
};

const SHA256: &str = "3f1c2a9d0b7e4f5a6c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d";
const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
const WARNING: &str = "Research prototype: results were not reviewed by a radiologist";
/// Synthetic instances of the reference series and of a second (co-registered) input series.
const SOURCE_ROOT: &str = "1.2.826.0.1.3680043.10.1234.77.1";
const OTHER_SERIES: &str = "1.2.826.0.1.3680043.10.1234.77.2";
const ROWS: usize = 11;
const COLUMNS: usize = 10;
const SLICES: usize = 4;
/// Label-map values: 0 background, 1 necrosis, 2 edema, 3 enhancing tumour.
const NECROSIS: u8 = 1;
const EDEMA: u8 = 2;
const ENHANCING: u8 = 3;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn source_path(name: &str) -> PathBuf {
    repo().join("tests/data/dicom").join(name)
}

/// The patient context of a test file, as the service takes it from the first source instance.
fn context(name: &str) -> (PatientContext, dicom::DicomIds) {
    let path = source_path(name);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let image = dicom::decode(&data, &LIMITS).unwrap_or_else(|e| panic!("{name}: {e}"));
    (image.context, image.header.ids)
}

/// Four 11 × 10 slices (110 bits a frame: frames start inside a byte): slice 0 edema around enhancing tumour, slice 1 edema around necrosis,
/// slice 2 nothing, slice 3 a little edema in a corner.
fn label_maps() -> Vec<Vec<u8>> {
    let mut maps = vec![vec![0u8; ROWS * COLUMNS]; SLICES];
    let mut paint = |slice: usize, centre: (f64, f64), radius: f64, value: u8| {
        for r in 0..ROWS {
            for c in 0..COLUMNS {
                let (dr, dc) = (r as f64 - centre.0, c as f64 - centre.1);
                if (dr * dr + dc * dc).sqrt() <= radius {
                    maps[slice][r * COLUMNS + c] = value;
                }
            }
        }
    };
    paint(0, (5.0, 4.0), 3.5, EDEMA);
    paint(0, (5.0, 4.0), 1.5, ENHANCING);
    paint(1, (6.0, 5.0), 3.0, EDEMA);
    paint(1, (6.5, 5.5), 1.0, NECROSIS);
    paint(3, (10.0, 0.0), 1.2, EDEMA);
    maps
}

fn instance(slice: usize) -> String {
    format!("{SOURCE_ROOT}.{}", slice + 1)
}

fn segment(label: &str, classes: &[u8], kind: (&str, &str), color: [u8; 3]) -> SegmentSpec {
    SegmentSpec {
        label: label.into(),
        classes: classes.to_vec(),
        category: Code::new("49755003", "SCT", "Morphologically Altered Structure"),
        kind: Code::new(kind.0, "SCT", kind.1),
        color,
    }
}

/// Three classes, two regions and a class that occurs nowhere, on four slices of a slightly
/// oblique (1°) axial series, 5 mm apart; two referenced series.
fn report(context_of: &str, clinically_trained: bool) -> SegReport {
    let (context, ids) = context(context_of);
    let (cos, sin) = (1f64.to_radians().cos(), 1f64.to_radians().sin());
    let orientation = [cos, sin, 0.0, -sin, cos, 0.0];
    let frames: Vec<SegFrame> = label_maps()
        .into_iter()
        .enumerate()
        .map(|(i, labels)| SegFrame {
            sop_class_uid: MR.into(),
            sop_instance_uid: instance(i),
            position: [-120.3, -98.75, 12.5 + 5.0 * i as f64],
            labels,
        })
        .collect();
    let source = frames
        .iter()
        .map(|f| (f.sop_class_uid.clone(), f.sop_instance_uid.clone()))
        .collect();
    let other = (1..=SLICES)
        .map(|i| (MR.to_string(), format!("{OTHER_SERIES}.{i}")))
        .collect();
    SegReport {
        frame_of_reference_uid: frame_of_reference(&context),
        context,
        study_instance_uid: ids.study_instance_uid,
        source_series_instance_uid: ids.series_instance_uid.clone(),
        rows: ROWS as u32,
        columns: COLUMNS as u32,
        pixel_spacing: [0.9375, 1.25],
        orientation,
        slice_thickness: Some(5.0),
        spacing_between_slices: Some(5.0),
        frames,
        segments: vec![
            segment(
                "necrosis",
                &[NECROSIS],
                ("6574001", "Necrosis"),
                [0, 0, 255],
            ),
            segment("edema", &[EDEMA], ("79654002", "Edema"), [255, 255, 0]),
            segment(
                "enhancing_tumor",
                &[ENHANCING],
                ("418701002", "Enhancing tumor"),
                [255, 0, 0],
            ),
            segment(
                "whole_tumor",
                &[NECROSIS, EDEMA, ENHANCING],
                ("108369006", "Neoplasm"),
                [0, 200, 100],
            ),
            segment(
                "tumor_core",
                &[NECROSIS, ENHANCING],
                ("1255116004", "Tumor core"),
                [200, 100, 50],
            ),
            segment("cyst", &[4], ("367643001", "Cyst"), [128, 0, 128]),
        ],
        referenced_series: vec![
            (ids.series_instance_uid, source),
            (OTHER_SERIES.into(), other),
        ],
        model: ModelIdentity {
            name: "brats-unet3d".into(),
            version: "4".into(),
            sha256: SHA256.into(),
            clinically_trained,
        },
        warnings: if clinically_trained {
            vec![]
        } else {
            vec![WARNING.into()]
        },
    }
}

fn frame_of_reference(context: &PatientContext) -> String {
    context
        .0
        .get(tags::FRAME_OF_REFERENCE_UID)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .expect("the test files have a Frame of Reference UID")
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `tests/reference/seg_check.py` on the SEG, masks for the source instances in slice order.
fn highdicom(path: &Path, report: &SegReport) -> Value {
    let output = Command::new(common::python())
        .arg(repo().join("tests/reference/seg_check.py"))
        .arg(path)
        .args(report.frames.iter().map(|f| &f.sop_instance_uid))
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "highdicom could not read {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the script prints JSON")
}

/// The mask of `classes` on a label map, as rows of 0/1.
fn mask(labels: &[u8], classes: &[u8]) -> Value {
    json!(
        labels
            .chunks(COLUMNS)
            .map(|row| row
                .iter()
                .map(|v| u8::from(classes.contains(v)))
                .collect::<Vec<_>>())
            .collect::<Vec<_>>()
    )
}

/// What highdicom reads back is what went in: every mask, segment, reference and the volume.
fn assert_reads_back(read: &Value, report: &SegReport) {
    assert_eq!(read["transfer_syntax"], "1.2.840.10008.1.2.1");
    assert_eq!(read["sop_class"], seg::SEGMENTATION_STORAGE);
    assert_eq!(read["modality"], "SEG");
    assert_eq!(read["segmentation_type"], "BINARY");
    assert_eq!(read["image_type"], json!(["DERIVED", "PRIMARY"]));
    assert_eq!(read["content_label"], seg::CONTENT_LABEL);
    assert_eq!(
        read["highdicom_warnings"],
        json!([]),
        "highdicom warned while reading"
    );

    // The masks, segment by segment: a class is its value, a region the union of its classes.
    let masks = &read["masks"];
    for (slice, frame) in report.frames.iter().enumerate() {
        for (s, segment) in report.segments.iter().enumerate() {
            assert_eq!(
                masks[&frame.sop_instance_uid][(s + 1).to_string()],
                mask(&frame.labels, &segment.classes),
                "slice {slice}, segment {}",
                segment.label
            );
        }
    }

    // One frame per (segment, slice) with a pixel, segment-major; an empty segment has one
    // all-zero frame on the first slice.
    let mut expected_frames = vec![];
    for (s, segment) in report.segments.iter().enumerate() {
        let before = expected_frames.len();
        for frame in &report.frames {
            if frame.labels.iter().any(|v| segment.classes.contains(v)) {
                expected_frames.push(json!([s + 1, frame.sop_instance_uid]));
            }
        }
        if expected_frames.len() == before {
            expected_frames.push(json!([s + 1, report.frames[0].sop_instance_uid]));
        }
    }
    assert_eq!(read["frame_sources"], json!(expected_frames));
    assert_eq!(read["number_of_frames"], expected_frames.len());

    let segments = read["segments"].as_array().unwrap();
    assert_eq!(segments.len(), report.segments.len());
    for (s, (got, spec)) in segments.iter().zip(&report.segments).enumerate() {
        assert_eq!(got["number"], s + 1);
        assert_eq!(got["label"], spec.label.as_str());
        let code = |c: &Code| json!([c.value, c.scheme, c.meaning]);
        assert_eq!(got["category"], code(&spec.category));
        assert_eq!(got["type"], code(&spec.kind));
        assert_eq!(got["algorithm_type"], "AUTOMATIC");
        assert_eq!(got["algorithm_name"], report.model.name.as_str());
        assert_eq!(
            got["algorithm_family"],
            json!(["123110", "DCM", "Artificial Intelligence"])
        );
        assert_eq!(got["algorithm_version"], report.model.version.as_str());
        assert_eq!(got["algorithm_parameters"], format!("sha256:{SHA256}"));
        // highdicom converts the Recommended Display CIELab Value back to the colour put in.
        let rgb: Vec<i64> = serde_json::from_value(got["rgb"].clone()).unwrap();
        for (back, put) in rgb.iter().zip(spec.color) {
            assert!(
                (back - i64::from(put)).abs() <= 1,
                "{}: {rgb:?}",
                spec.label
            );
        }
    }

    // Every instance of every referenced series, in the source study.
    let mut sources: Vec<Value> = read["source_images"].as_array().unwrap().clone();
    sources.sort_by_key(|v| v.to_string());
    let mut expected: Vec<Value> = report
        .referenced_series
        .iter()
        .flat_map(|(series, instances)| {
            instances
                .iter()
                .map(move |(_, uid)| json!([report.study_instance_uid, series, uid]))
        })
        .collect();
    expected.sort_by_key(|v| v.to_string());
    assert_eq!(sources, expected);

    let measures = &read["pixel_measures"];
    assert_eq!(measures["PixelSpacing"], json!(report.pixel_spacing));
    assert_eq!(measures["SliceThickness"], 5.0);

    // A regular volume: slices × rows × columns × segments, the spacing of the report.
    let volume = &read["volume"];
    assert!(volume.get("error").is_none(), "get_volume failed: {volume}");
    assert_eq!(
        volume["shape"],
        json!([SLICES, ROWS, COLUMNS, report.segments.len()])
    );
    let spacing: Vec<f64> = serde_json::from_value(volume["spacing"].clone()).unwrap();
    for (got, want) in spacing.iter().zip([5.0, 0.9375, 1.25]) {
        assert!((got - want).abs() < 1e-6, "spacing {spacing:?}");
    }
    let pixels: usize = report
        .segments
        .iter()
        .map(|s| {
            report
                .frames
                .iter()
                .flat_map(|f| &f.labels)
                .filter(|v| s.classes.contains(v))
                .count()
        })
        .sum();
    assert_eq!(volume["sum"], pixels);
}

#[test]
fn untrained_model_seg_is_valid_and_reads_back_in_highdicom() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let report = report("phi.dcm", false);
    let bytes = seg::build(&report).expect("the SEG builds");
    let path = write(dir.path(), "untrained.dcm", &bytes);
    common::dciodvfy(&path, "Segmentation");

    let read = highdicom(&path, &report);
    assert_reads_back(&read, &report);
    let attributes = &read["attributes"];
    assert_eq!(attributes["PatientName"], "Doe^Jane^PHI-NAME-7391");
    assert_eq!(
        attributes["StudyInstanceUID"],
        report.study_instance_uid.as_str()
    );
    assert_eq!(
        attributes["FrameOfReferenceUID"],
        report.frame_of_reference_uid.as_str()
    );
    assert_ne!(
        attributes["SeriesInstanceUID"],
        report.source_series_instance_uid.as_str()
    );
    for uid in ["SOPInstanceUID", "SeriesInstanceUID"] {
        let uid = attributes[uid].as_str().unwrap();
        assert!(uid.starts_with("2.25.") && uid.len() <= 64, "{uid}");
    }
    assert_eq!(attributes["Manufacturer"], "BrainAI Serve");
    assert_eq!(attributes["ManufacturerModelName"], "brats-unet3d");
    assert_eq!(attributes["SoftwareVersions"], "4");
    assert_eq!(attributes["DeviceSerialNumber"], SHA256);
    assert_eq!(attributes["SeriesNumber"], "2001");
    for key in ["series_description", "content_description"] {
        assert_eq!(
            read[key], "NOT FOR DIAGNOSTIC USE: AI segmentation brats-unet3d",
            "{key}"
        );
    }
    let comments = read["image_comments"].as_str().unwrap();
    assert!(
        comments.starts_with("NOT FOR DIAGNOSTIC USE") && comments.contains(WARNING),
        "{comments}"
    );

    // A second build is a new instance in a new series.
    let again = highdicom(
        &write(dir.path(), "again.dcm", &seg::build(&report).unwrap()),
        &report,
    );
    for uid in ["SOPInstanceUID", "SeriesInstanceUID"] {
        assert_ne!(
            again["attributes"][uid], attributes[uid],
            "{uid} was reused"
        );
    }
    assert_eq!(again["masks"], read["masks"]);
    eprintln!("untrained SEG checks took {:?}", started.elapsed());
}

#[test]
fn clinically_trained_model_seg_has_no_disclaimer() {
    let dir = tempfile::tempdir().unwrap();
    let report = report("ts_explicit_le.dcm", true);
    let path = write(
        dir.path(),
        "trained.dcm",
        &seg::build(&report).expect("the SEG builds"),
    );
    common::dciodvfy(&path, "Segmentation");
    let read = highdicom(&path, &report);
    assert_reads_back(&read, &report);
    assert_eq!(read["attributes"]["PatientName"], "Anon^Test");
    for key in [
        "series_description",
        "content_description",
        "image_comments",
    ] {
        assert!(
            !read[key]
                .as_str()
                .unwrap()
                .contains("NOT FOR DIAGNOSTIC USE"),
            "{key}: {}",
            read[key]
        );
    }
    assert_eq!(read["series_description"], "AI segmentation brats-unet3d");
}

/// A source without the Type 2 Patient and Study attributes, a non-ASCII segment label, no slice
/// thickness nor spacing: valid, UTF-8, empty Type 2 attributes.
#[test]
fn sparse_context_and_unicode_label() {
    let dir = tempfile::tempdir().unwrap();
    let mut report = report("ts_explicit_le.dcm", false);
    let study = report.study_instance_uid.clone();
    report.context = PatientContext(InMemDicomObject::from_element_iter([DataElement::new(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        study.as_str(),
    )]));
    report.segments[1].label = "œdème".into();
    report.slice_thickness = None;
    report.spacing_between_slices = None;
    let path = write(
        dir.path(),
        "sparse.dcm",
        &seg::build(&report).expect("the SEG builds"),
    );
    common::dciodvfy(&path, "Segmentation");
    let read = highdicom(&path, &report);
    assert_eq!(read["attributes"]["PatientName"], "");
    assert_eq!(read["attributes"]["PatientID"], "");
    assert_eq!(read["attributes"]["SpecificCharacterSet"], "ISO_IR 192");
    assert_eq!(read["segments"][1]["label"], "œdème");
    assert_eq!(read["attributes"]["SeriesNumber"], "2000");
    // The thickness from the slice positions, no spacing between slices.
    assert_eq!(read["pixel_measures"]["SliceThickness"], 5.0);
    assert_eq!(read["pixel_measures"]["SpacingBetweenSlices"], Value::Null);
    assert_reads_back(&read, &report);
    let masks = &read["masks"];
    for frame in &report.frames {
        assert_eq!(
            masks[&frame.sop_instance_uid]["2"],
            mask(&frame.labels, &[EDEMA])
        );
    }
}
