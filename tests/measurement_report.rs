//! The TID 1500 measurement report of a segmented study (`brainai::report::measurement::build`)
//! next to the SEG it measures (`brainai::report::seg::build_with_ids`), checked by three
//! independent DICOM implementations: dicom3tools' `dciodvfy` (IOD and module conformance: no
//! line may start with "Error"), highdicom 0.28 with pydicom (`tests/reference/
//! measurement_check.py`: the document reads as a `MeasurementReport` whose volumetric ROI
//! measurement groups say, segment by segment, what was put in and reference the SEG written) and
//! dcmtk's `dsrdump` (the content tree parses, relationship constraints checked). The tools are
//! required: a missing one fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use brainai::input::InputLimits;
use brainai::input::dicom::{self, PatientContext};
use brainai::report::ModelIdentity;
use brainai::report::measurement::{self, MeasurementReport, SegmentMeasurement};
use brainai::report::seg::{self, Code, SegFrame, SegIds, SegReport, SegmentSpec};
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
const SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";
const WARNING: &str = "Research prototype: results were not reviewed by a radiologist";
const NOT_FOR_DIAGNOSTIC_USE: &str = "NOT FOR DIAGNOSTIC USE: the model was not clinically trained";
/// Synthetic instances of the reference series and of a second (co-registered) input series.
const SOURCE_ROOT: &str = "1.2.826.0.1.3680043.10.1234.88.1";
const OTHER_SERIES: &str = "1.2.826.0.1.3680043.10.1234.88.2";
const ROWS: usize = 9;
const COLUMNS: usize = 10;
const SLICES: usize = 3;
const PIXEL_SPACING: [f64; 2] = [0.9375, 1.25];
const THICKNESS: f64 = 5.0;
/// Label-map values: 0 background, 1 necrosis, 2 edema, 3 enhancing tumour.
const NECROSIS: u8 = 1;
const EDEMA: u8 = 2;
const ENHANCING: u8 = 3;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The patient context of a test file, as the service takes it from the first source instance.
fn context(name: &str) -> (PatientContext, dicom::DicomIds) {
    let path = repo().join("tests/data/dicom").join(name);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let image = dicom::decode(&data, &LIMITS).unwrap_or_else(|e| panic!("{name}: {e}"));
    (image.context, image.header.ids)
}

/// Three 9 × 10 slices: slice 0 edema around enhancing tumour, slice 1 edema around necrosis,
/// slice 2 nothing.
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
    paint(0, (4.0, 4.0), 3.5, EDEMA);
    paint(0, (4.0, 4.0), 1.5, ENHANCING);
    paint(1, (5.0, 5.0), 3.0, EDEMA);
    paint(1, (5.5, 5.5), 1.0, NECROSIS);
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

fn model(clinically_trained: bool) -> ModelIdentity {
    ModelIdentity {
        name: "brats-unet3d".into(),
        version: "4".into(),
        sha256: SHA256.into(),
        clinically_trained,
    }
}

fn warnings(clinically_trained: bool) -> Vec<String> {
    if clinically_trained {
        vec![]
    } else {
        vec![WARNING.into()]
    }
}

/// Four segments (three classes and a region) on three axial slices 5 mm apart; two series.
fn seg_report(context_of: &str, clinically_trained: bool) -> SegReport {
    let (context, ids) = context(context_of);
    let frames: Vec<SegFrame> = label_maps()
        .into_iter()
        .enumerate()
        .map(|(i, labels)| SegFrame {
            sop_class_uid: MR.into(),
            sop_instance_uid: instance(i),
            position: [-120.3, -98.75, 12.5 + THICKNESS * i as f64],
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
    let frame_of_reference = context
        .0
        .get(tags::FRAME_OF_REFERENCE_UID)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .expect("the test files have a Frame of Reference UID");
    SegReport {
        context,
        study_instance_uid: ids.study_instance_uid,
        source_series_instance_uid: ids.series_instance_uid.clone(),
        frame_of_reference_uid: frame_of_reference,
        rows: ROWS as u32,
        columns: COLUMNS as u32,
        pixel_spacing: PIXEL_SPACING,
        orientation: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        slice_thickness: Some(THICKNESS),
        spacing_between_slices: Some(THICKNESS),
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
        ],
        referenced_series: vec![
            (ids.series_instance_uid, source),
            (OTHER_SERIES.into(), other),
        ],
        model: model(clinically_trained),
        warnings: warnings(clinically_trained),
    }
}

/// The measurements of every segment of the SEG, numbered as the SEG numbers them: the voxels
/// counted on the label maps, the volume from the voxel size (unknown for the last segment when
/// `unknown_depth_last`).
fn measurement_report(seg: &SegReport, ids: SegIds, unknown_depth_last: bool) -> MeasurementReport {
    let voxel_ml = PIXEL_SPACING[0] * PIXEL_SPACING[1] * THICKNESS / 1000.0;
    let count = seg.segments.len();
    let measurements = seg
        .segments
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let voxels = seg
                .frames
                .iter()
                .flat_map(|f| &f.labels)
                .filter(|v| spec.classes.contains(v))
                .count() as u64;
            let known = !(unknown_depth_last && i + 1 == count);
            SegmentMeasurement {
                segment_number: seg::segment_number(i).unwrap(),
                label: spec.label.clone(),
                finding: spec.kind.clone(),
                category: spec.category.clone(),
                voxels,
                volume_ml: known.then_some(voxels as f64 * voxel_ml),
            }
        })
        .collect();
    MeasurementReport {
        context: seg.context.clone(),
        study_instance_uid: seg.study_instance_uid.clone(),
        segmentation: ids,
        source_series: seg.referenced_series.clone(),
        measurements,
        model: seg.model.clone(),
        warnings: seg.warnings.clone(),
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `tests/reference/measurement_check.py` on the report (and the SEG).
fn highdicom(report: &Path, seg: &Path) -> Value {
    let out = common::reference_script(
        "measurement_check.py",
        &[&report.display().to_string(), &seg.display().to_string()],
    );
    serde_json::from_str(&out).expect("the script prints JSON")
}

/// dsrdump's rendering of the document (relationship content constraints checked, the default);
/// fails unless it succeeds without errors.
fn dsrdump(path: &Path) -> String {
    let output = Command::new(common::tool("dsrdump", "dcmtk"))
        .args(["+Pl", "+Pc", "+Pu", "+Pt"])
        .arg(path)
        .output()
        .expect("dsrdump runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "dsrdump failed ({}) on {}:\n{stderr}\n{stdout}",
        output.status,
        path.display()
    );
    assert!(
        !stderr.contains("E: "),
        "dsrdump reported errors on {}:\n{stderr}",
        path.display()
    );
    if !stderr.trim().is_empty() {
        eprintln!("dsrdump {}: {stderr}", path.display());
    }
    stdout
}

fn code(c: &Code) -> Value {
    json!([c.value, c.scheme, c.meaning])
}

/// What highdicom reads back is what went in, segment by segment, and references the SEG.
fn assert_reads_back(read: &Value, report: &MeasurementReport, seg: &SegReport, ids: &SegIds) {
    assert_eq!(read["sop_class"], "1.2.840.10008.5.1.4.1.1.88.33");
    assert_eq!(read["transfer_syntax"], "1.2.840.10008.1.2.1");
    assert_eq!(
        read["title"],
        json!(["126000", "DCM", "Imaging Measurement Report"])
    );
    assert_eq!(read["template"], "1500");
    assert_eq!(
        read["highdicom_warnings"],
        json!([]),
        "highdicom warned while reading"
    );
    assert_eq!(
        read["language"],
        json!([["en-US", "RFC5646", "English (United States)"]])
    );
    assert_eq!(
        read["procedure_reported"],
        json!([["363679005", "SCT", "Imaging procedure"]])
    );
    let observers = read["observers"].as_array().unwrap();
    assert_eq!(observers.len(), 1, "{observers:?}");
    assert_eq!(observers[0]["type"], json!(["121007", "DCM", "Device"]));
    assert_eq!(observers[0]["name"], "BrainAI Serve");
    assert_eq!(observers[0]["manufacturer"], "BrainAI Serve");
    assert_eq!(observers[0]["model"], report.model.name.as_str());
    assert!(observers[0]["uid"].as_str().unwrap().starts_with("2.25."));

    // The TID 1500 rows in order: language, observer (five items), procedure, library,
    // measurements; the texts after them.
    let root: Vec<(String, String, String)> = read["root_items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["relationship"].as_str().unwrap().to_string(),
                i["value_type"].as_str().unwrap().to_string(),
                i["name"][0].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected_head = [
        ("HAS CONCEPT MOD", "CODE", "121049"),
        ("HAS OBS CONTEXT", "CODE", "121005"),
        ("HAS OBS CONTEXT", "UIDREF", "121012"),
        ("HAS OBS CONTEXT", "TEXT", "121013"),
        ("HAS OBS CONTEXT", "TEXT", "121014"),
        ("HAS OBS CONTEXT", "TEXT", "121015"),
        ("HAS CONCEPT MOD", "CODE", "121058"),
        ("CONTAINS", "CONTAINER", "111028"),
        ("CONTAINS", "CONTAINER", "126010"),
    ];
    for (i, (relationship, value_type, name)) in expected_head.iter().enumerate() {
        assert_eq!(
            (root[i].0.as_str(), root[i].1.as_str(), root[i].2.as_str()),
            (*relationship, *value_type, *name),
            "root item {i}"
        );
    }
    for item in &root[expected_head.len()..] {
        assert_eq!((item.0.as_str(), item.1.as_str()), ("CONTAINS", "TEXT"));
    }

    // The image library: every instance of every source series, a group per series.
    let library: Vec<Vec<String>> = serde_json::from_value(read["image_library"].clone()).unwrap();
    let expected_library: Vec<Vec<String>> = report
        .source_series
        .iter()
        .map(|(_, instances)| instances.iter().map(|(_, uid)| uid.clone()).collect())
        .collect();
    assert_eq!(library, expected_library);

    // The evidence: the source series' instances and the SEG.
    let mut evidence: Vec<Value> = read["evidence"].as_array().unwrap().clone();
    evidence.sort_by_key(|v| v.to_string());
    let mut expected: Vec<Value> = report
        .source_series
        .iter()
        .flat_map(|(series, instances)| {
            instances
                .iter()
                .map(move |(class, uid)| json!([report.study_instance_uid, series, uid, class]))
        })
        .chain([json!([
            report.study_instance_uid,
            ids.series_instance_uid,
            ids.sop_instance_uid,
            SEGMENTATION_STORAGE
        ])])
        .collect();
    expected.sort_by_key(|v| v.to_string());
    assert_eq!(evidence, expected);

    // One TID 1411 group per segment, in order, each referencing its segment of the SEG written.
    let groups = read["groups"].as_array().unwrap();
    assert_eq!(groups.len(), report.measurements.len());
    let mut tracking_uids = vec![];
    for (i, (group, m)) in groups.iter().zip(&report.measurements).enumerate() {
        let spec = &seg.segments[i];
        assert_eq!(group["template"], "1411");
        assert_eq!(
            group["reference_type"],
            json!(["121191", "DCM", "Referenced Segment"])
        );
        assert_eq!(group["tracking_identifier"], spec.label.as_str());
        assert_eq!(group["finding"], code(&spec.kind));
        assert_eq!(group["finding_category"], code(&spec.category));
        assert_eq!(group["referenced_sop_class"], SEGMENTATION_STORAGE);
        assert_eq!(
            group["referenced_sop_instance"],
            ids.sop_instance_uid.as_str()
        );
        assert_eq!(group["referenced_segment_numbers"], json!([i + 1]));
        assert_eq!(
            group["source_series"],
            json!([seg.source_series_instance_uid])
        );
        assert_eq!(group["algorithm"]["Algorithm Name"], "brats-unet3d");
        assert_eq!(group["algorithm"]["Algorithm Version"], "4");
        assert_eq!(
            group["algorithm"]["Algorithm Parameters"],
            format!("sha256:{SHA256}")
        );
        assert_eq!(group["found_by_tracking_uid"], json!([spec.label]));
        let by_finding: Vec<String> =
            serde_json::from_value(group["found_by_finding"].clone()).unwrap();
        assert!(by_finding.contains(&spec.label), "{by_finding:?}");
        tracking_uids.push(group["tracking_uid"].as_str().unwrap().to_string());

        let measurements = group["measurements"].as_array().unwrap();
        let volume = measurements
            .iter()
            .find(|n| n["name"][0] == "118565006")
            .cloned();
        match m.volume_ml {
            Some(put) => {
                let volume = volume.expect("a volume measurement");
                assert_eq!(volume["name"], json!(["118565006", "SCT", "Volume"]));
                assert_eq!(volume["unit"], json!(["ml", "UCUM", "milliliter"]));
                assert_eq!(
                    volume["method"],
                    json!(["126030", "DCM", "Sum of segmented voxel method for volume"])
                );
                let got = volume["value"].as_f64().unwrap();
                assert!(
                    (got - put).abs() <= put * 1e-6,
                    "{}: volume {got} mL, put in {put} mL",
                    spec.label
                );
            }
            None => assert!(volume.is_none(), "{}: a volume was written", spec.label),
        }
        let voxels = measurements
            .iter()
            .find(|n| n["name"][0] == "VOXELS")
            .expect("a voxel count");
        assert_eq!(voxels["value"].as_f64().unwrap(), m.voxels as f64);
        assert_eq!(voxels["unit"], json!(["{voxels}", "UCUM", "voxels"]));
    }
    tracking_uids.sort();
    tracking_uids.dedup();
    assert_eq!(tracking_uids.len(), groups.len(), "tracking UIDs differ");

    // highdicom finds every group by the SEG's SOP Instance UID, and its own reference built
    // from the SEG names the same instance and the same kinds of item.
    let labels: Vec<&str> = seg.segments.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(read["groups_of_seg"], json!(labels));
    let own = &read["reference_from_seg"];
    assert_eq!(own["sop_instance"], ids.sop_instance_uid.as_str());
    assert_eq!(own["items"][0][0][0], "121191");
}

#[test]
fn untrained_model_report_is_valid_and_reads_back_in_highdicom() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let seg_report = seg_report("phi.dcm", false);
    let (seg_bytes, ids) = seg::build_with_ids(&seg_report).expect("the SEG builds");
    let seg_path = write(dir.path(), "seg.dcm", &seg_bytes);
    common::dciodvfy(&seg_path, "Segmentation");

    // The last segment's voxel depth is unknown: no volume for it.
    let report = measurement_report(&seg_report, ids.clone(), true);
    let bytes = measurement::build(&report).expect("the report builds");
    let path = write(dir.path(), "report.dcm", &bytes);
    let warnings = common::dciodvfy(&path, "ComprehensiveSR");
    eprintln!("{} dciodvfy warnings", warnings.len());

    let read = highdicom(&path, &seg_path);
    assert_reads_back(&read, &report, &seg_report, &ids);
    let attributes = &read["attributes"];
    assert_eq!(attributes["PatientName"], "Doe^Jane^PHI-NAME-7391");
    assert_eq!(
        attributes["StudyInstanceUID"],
        report.study_instance_uid.as_str()
    );
    assert_eq!(attributes["Modality"], "SR");
    assert_eq!(attributes["CompletionFlag"], "COMPLETE");
    assert_eq!(attributes["VerificationFlag"], "UNVERIFIED");
    for uid in ["SOPInstanceUID", "SeriesInstanceUID"] {
        let uid = attributes[uid].as_str().unwrap();
        assert!(uid.starts_with("2.25.") && uid.len() <= 64, "{uid}");
        assert_ne!(uid, ids.series_instance_uid);
        assert_ne!(uid, ids.sop_instance_uid);
    }
    assert_ne!(
        attributes["SeriesInstanceUID"],
        seg_report.source_series_instance_uid.as_str()
    );
    assert_eq!(
        attributes["SeriesDescription"],
        "NOT FOR DIAGNOSTIC USE: AI volumetry brats-unet3d"
    );
    assert_eq!(
        read["texts"],
        json!([
            ["Usage restriction", NOT_FOR_DIAGNOSTIC_USE],
            ["Warning", WARNING]
        ])
    );
    // The SEG's Series Number is the source's + 2000, the report's + 3000.
    let source_number: i64 = seg_report
        .context
        .0
        .get(tags::SERIES_NUMBER)
        .and_then(|e| e.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    assert_eq!(
        attributes["SeriesNumber"],
        (source_number + 3000).to_string()
    );

    let dump = dsrdump(&path);
    for expected in [
        "Imaging Measurement Report",
        "Referenced Segment",
        "Source series for segmentation",
        "Sum of segmented voxel method for volume",
        "milliliter",
        "TID 1500",
        "TID 1411",
        "necrosis",
        "whole_tumor",
        NOT_FOR_DIAGNOSTIC_USE,
        WARNING,
        ids.sop_instance_uid.as_str(),
    ] {
        assert!(
            dump.contains(expected),
            "dsrdump output lacks {expected:?}:\n{dump}"
        );
    }
    eprintln!("untrained report checks took {:?}", started.elapsed());
}

#[test]
fn clinically_trained_model_report_has_no_disclaimer() {
    let dir = tempfile::tempdir().unwrap();
    let seg_report = seg_report("ts_explicit_le.dcm", true);
    let (seg_bytes, ids) = seg::build_with_ids(&seg_report).expect("the SEG builds");
    let seg_path = write(dir.path(), "seg.dcm", &seg_bytes);
    let report = measurement_report(&seg_report, ids.clone(), false);
    let path = write(
        dir.path(),
        "report.dcm",
        &measurement::build(&report).expect("the report builds"),
    );
    common::dciodvfy(&path, "ComprehensiveSR");
    let read = highdicom(&path, &seg_path);
    assert_reads_back(&read, &report, &seg_report, &ids);
    assert_eq!(read["attributes"]["PatientName"], "Anon^Test");
    assert_eq!(
        read["attributes"]["SeriesDescription"],
        "AI volumetry brats-unet3d"
    );
    assert_eq!(read["texts"], json!([]));
    let dump = dsrdump(&path);
    assert!(!dump.contains("NOT FOR DIAGNOSTIC USE"), "{dump}");
}

/// A source without the Type 2 Patient and Study attributes and a non-ASCII label: valid, UTF-8,
/// empty Type 2 attributes, the label read back.
#[test]
fn sparse_context_and_unicode_label() {
    let dir = tempfile::tempdir().unwrap();
    let mut seg_report = seg_report("ts_explicit_le.dcm", false);
    let study = seg_report.study_instance_uid.clone();
    seg_report.context = PatientContext(InMemDicomObject::from_element_iter([DataElement::new(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        study.as_str(),
    )]));
    seg_report.segments[1].label = "œdème".into();
    let (seg_bytes, ids) = seg::build_with_ids(&seg_report).expect("the SEG builds");
    let seg_path = write(dir.path(), "seg.dcm", &seg_bytes);
    let report = measurement_report(&seg_report, ids.clone(), false);
    let path = write(
        dir.path(),
        "report.dcm",
        &measurement::build(&report).expect("the report builds"),
    );
    common::dciodvfy(&path, "ComprehensiveSR");
    let read = highdicom(&path, &seg_path);
    assert_reads_back(&read, &report, &seg_report, &ids);
    assert_eq!(read["attributes"]["PatientName"], "");
    assert_eq!(read["attributes"]["PatientID"], "");
    assert_eq!(read["attributes"]["SpecificCharacterSet"], "ISO_IR 192");
    assert_eq!(read["attributes"]["SeriesNumber"], "3000");
    assert_eq!(read["groups"][1]["tracking_identifier"], "œdème");
    dsrdump(&path);
}
