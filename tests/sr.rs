//! The Comprehensive SR of a classified series (`brainai::report::sr::build`), checked by three
//! independent DICOM implementations: dicom3tools' `dciodvfy` (IOD and module conformance: no
//! line may start with "Error"), dcmtk's `dsrdump` (the SR content tree parses and says what it
//! should) and pydicom (the attributes read back: patient and study copied from the source, a new
//! series and instance, references to the slices). The tools are required: a missing one fails
//! the test with the Debian package to install.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use brainai::input::InputLimits;
use brainai::input::dicom::{self, DicomImage, PatientContext};
use brainai::report::{ModelIdentity, SeriesFinding, SeriesReport, SliceFinding, sr};
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use serde_json::Value;

const LIMITS: InputLimits = InputLimits {
    max_image_bytes: 64 << 20,
    max_pixels: 1 << 26,
};

const SHA256: &str = "3f1c2a9d0b7e4f5a6c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d";
const FINDING: &str = "tumor";
const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
const ENHANCED_MR: &str = "1.2.840.10008.5.1.4.1.1.4.1";
const WARNING: &str = "Research prototype: results were not reviewed by a radiologist";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn source_path(name: &str) -> PathBuf {
    repo().join("tests/data/dicom").join(name)
}

fn decode(name: &str) -> DicomImage {
    let path = source_path(name);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    dicom::decode(&data, &LIMITS).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A report over three slices of the test series: two single-frame instances and frame 2 of the
/// multi-frame one, with the context of `context_of`.
fn report(context_of: &str, clinically_trained: bool) -> SeriesReport {
    let context = decode(context_of);
    let ids = context.header.ids.clone();
    let slices = [
        ("ts_explicit_le.dcm", None, 0.12, "no_tumor", 0.88),
        ("phi.dcm", None, 0.91, "glioma", 0.67),
        ("multiframe.dcm", Some(2), 0.47, "meningioma", 0.51),
    ]
    .into_iter()
    .map(|(file, frame, finding_probability, label, probability)| {
        let image = decode(file);
        assert_eq!(
            image.header.ids.series_instance_uid,
            ids.series_instance_uid
        );
        SliceFinding {
            sop_class_uid: MR.into(),
            sop_instance_uid: image.header.ids.sop_instance_uid,
            frame,
            label: label.into(),
            probability,
            finding_probability,
        }
    })
    .collect();
    SeriesReport {
        context: context.context,
        study_instance_uid: ids.study_instance_uid,
        series_instance_uid: ids.series_instance_uid,
        slices,
        finding: SeriesFinding {
            label: FINDING.into(),
            probability: 0.91,
            aggregation: "maximum over 3 slices".into(),
            slice: Some(1),
        },
        model: ModelIdentity {
            name: "brain-tumor-resnet50".into(),
            version: "3".into(),
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

/// Writes the SR into `dir` and returns its path.
fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// dsrdump's rendering of the document; fails unless it succeeds.
fn dsrdump(path: &Path) -> String {
    let output = Command::new(common::tool("dsrdump", "dcmtk"))
        // Long values in full, every code, referenced instance UIDs. The relationship content
        // constraints of Comprehensive SR are checked (the default).
        .args(["+Pl", "+Pc", "+Pu"])
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

const PYDICOM_READ: &str = r#"
import json, sys
import pydicom
from pydicom.multival import MultiValue

sr = pydicom.dcmread(sys.argv[1])
src = pydicom.dcmread(sys.argv[2])

def values(v):
    return [str(x) for x in v] if isinstance(v, MultiValue) else [str(v)]

images, texts, frames = [], [], []
def walk(items):
    for item in items:
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "FRAME":
            frames.append(int(item.MeasuredValueSequence[0].NumericValue))
        if item.ValueType == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            frame = ref.get("ReferencedFrameNumber")
            images.append([ref.ReferencedSOPInstanceUID, None if frame is None else int(frame)])
        if item.ValueType == "TEXT":
            texts.append(item.TextValue)
        walk(item.get("ContentSequence", []))
walk(sr.ContentSequence)

evidence = [
    [study.StudyInstanceUID, series.SeriesInstanceUID, sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID]
    for study in sr.CurrentRequestedProcedureEvidenceSequence
    for series in study.ReferencedSeriesSequence
    for sop in series.ReferencedSOPSequence
]
equipment = sr.ContributingEquipmentSequence[0]
print(json.dumps({
    "transfer_syntax": sr.file_meta.TransferSyntaxUID,
    "media_sop_instance": sr.file_meta.MediaStorageSOPInstanceUID,
    "media_sop_class": sr.file_meta.MediaStorageSOPClassUID,
    "sr": {k: str(sr.get(k, "<absent>")) for k in [
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
        "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
        "Modality", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "VerificationFlag",
        "CompletionFlag", "Manufacturer", "ValueType", "ContinuityOfContent",
        "SpecificCharacterSet"]},
    "source": {k: str(src.get(k, "<absent>")) for k in [
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
        "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"]},
    "equipment": {
        "Manufacturer": equipment.Manufacturer,
        "ManufacturerModelName": equipment.ManufacturerModelName,
        "SoftwareVersions": values(equipment.SoftwareVersions),
        "Purpose": equipment.PurposeOfReferenceCodeSequence[0].CodeValue,
    },
    "evidence": evidence,
    "images": images,
    "texts": texts,
    "frames": frames,
}))
"#;

/// The SR as pydicom reads it, next to the same attributes of `source`.
fn pydicom(path: &Path, source: &Path) -> Value {
    let output = Command::new(common::python())
        .args(["-c", PYDICOM_READ])
        .arg(path)
        .arg(source)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "pydicom could not read {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the script prints JSON")
}

fn expected_evidence(report: &SeriesReport) -> Vec<Value> {
    report
        .slices
        .iter()
        .map(|s| {
            serde_json::json!([
                report.study_instance_uid,
                report.series_instance_uid,
                s.sop_class_uid,
                s.sop_instance_uid
            ])
        })
        .collect()
}

/// The IMAGE items: the series finding's source slice, then every slice. Only references to a
/// multi-frame SOP class carry the frame number.
fn expected_images(report: &SeriesReport) -> Vec<Value> {
    let slice = |s: &SliceFinding| {
        let frame = s.frame.filter(|_| s.sop_class_uid == ENHANCED_MR);
        serde_json::json!([s.sop_instance_uid, frame])
    };
    report
        .finding
        .slice
        .map(|i| slice(&report.slices[i]))
        .into_iter()
        .chain(report.slices.iter().map(slice))
        .collect()
}

#[test]
fn untrained_model_sr_is_valid_and_says_what_it_should() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let report = report("phi.dcm", false);

    let first = sr::build(&report).expect("the SR builds");
    let first_path = write(dir.path(), "first.dcm", &first);
    common::dciodvfy(&first_path, "ComprehensiveSR");

    let dump = dsrdump(&first_path);
    for expected in [
        SHA256,
        FINDING,
        "UNVERIFIED",
        "NOT FOR DIAGNOSTIC USE",
        WARNING,
        "Comprehensive SR",
        "maximum over 3 slices",
    ] {
        assert!(
            dump.contains(expected),
            "dsrdump output lacks {expected:?}:\n{dump}"
        );
    }

    let read = pydicom(&first_path, &source_path("phi.dcm"));
    let (got, source) = (&read["sr"], &read["source"]);
    for key in [
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    ] {
        assert_eq!(got[key], source[key], "{key} is not the source's");
    }
    assert_eq!(got["PatientName"], "Doe^Jane^PHI-NAME-7391");
    assert_eq!(read["transfer_syntax"], "1.2.840.10008.1.2.1");
    assert_eq!(got["Modality"], "SR");
    assert_eq!(got["SOPClassUID"], "1.2.840.10008.5.1.4.1.1.88.33");
    assert_eq!(read["media_sop_class"], "1.2.840.10008.5.1.4.1.1.88.33");
    assert_eq!(read["media_sop_instance"], got["SOPInstanceUID"]);
    assert_eq!(got["VerificationFlag"], "UNVERIFIED");
    assert_eq!(got["CompletionFlag"], "COMPLETE");
    assert_eq!(got["Manufacturer"], "BrainAI Serve");
    assert_eq!(got["ValueType"], "CONTAINER");
    assert_eq!(got["ContinuityOfContent"], "SEPARATE");
    for uid in ["SOPInstanceUID", "SeriesInstanceUID"] {
        let uid = got[uid].as_str().unwrap();
        assert!(uid.starts_with("2.25.") && uid.len() <= 64, "{uid}");
    }
    assert_ne!(
        got["SeriesInstanceUID"],
        report.series_instance_uid.as_str()
    );

    let equipment = &read["equipment"];
    assert_eq!(equipment["Manufacturer"], "BrainAI Serve");
    assert_eq!(equipment["ManufacturerModelName"], "brain-tumor-resnet50");
    assert_eq!(equipment["Purpose"], "109102");
    let versions = equipment["SoftwareVersions"].as_array().unwrap();
    assert_eq!(versions[0], "3");
    assert!(
        versions
            .iter()
            .any(|v| v.as_str().unwrap().contains(SHA256)),
        "{versions:?}"
    );

    let sops: Vec<&str> = report
        .slices
        .iter()
        .map(|s| s.sop_instance_uid.as_str())
        .collect();
    assert_eq!(
        read["evidence"].as_array().unwrap(),
        &expected_evidence(&report)
    );
    assert_eq!(
        read["images"].as_array().unwrap(),
        &expected_images(&report)
    );
    assert_eq!(read["frames"], serde_json::json!([2]));
    let texts = read["texts"].as_array().unwrap();
    assert_eq!(
        texts
            .iter()
            .filter(|t| t.as_str().unwrap().starts_with("NOT FOR DIAGNOSTIC USE"))
            .count(),
        1
    );
    assert!(
        texts
            .iter()
            .any(|t| t == format!("sha256:{SHA256}").as_str())
    );

    // A second build is a new instance in a new series about the same slices.
    let second = sr::build(&report).expect("the SR builds again");
    let second_path = write(dir.path(), "second.dcm", &second);
    let again = pydicom(&second_path, &source_path("phi.dcm"));
    for uid in ["SOPInstanceUID", "SeriesInstanceUID"] {
        assert_ne!(again["sr"][uid], got[uid], "{uid} was reused");
    }
    assert_eq!(again["sr"]["StudyInstanceUID"], got["StudyInstanceUID"]);
    assert_eq!(again["evidence"], read["evidence"]);
    assert_eq!(again["images"], read["images"]);
    let referenced: Vec<&str> = again["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[3].as_str().unwrap())
        .collect();
    assert_eq!(referenced, sops);

    eprintln!("untrained SR checks took {:?}", started.elapsed());
}

#[test]
fn clinically_trained_model_sr_has_no_disclaimer() {
    let dir = tempfile::tempdir().unwrap();
    let report = report("ts_explicit_le.dcm", true);
    let bytes = sr::build(&report).expect("the SR builds");
    let path = write(dir.path(), "trained.dcm", &bytes);
    common::dciodvfy(&path, "ComprehensiveSR");
    let dump = dsrdump(&path);
    assert!(
        !dump.contains("NOT FOR DIAGNOSTIC USE"),
        "a clinically trained model's SR carries the disclaimer:\n{dump}"
    );
    assert!(dump.contains(SHA256) && dump.contains(FINDING));

    let read = pydicom(&path, &source_path("ts_explicit_le.dcm"));
    for key in [
        "PatientName",
        "PatientID",
        "StudyInstanceUID",
        "AccessionNumber",
    ] {
        assert_eq!(read["sr"][key], read["source"][key], "{key}");
    }
    assert_eq!(read["sr"]["PatientName"], "Anon^Test");
    assert!(
        read["texts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| !t.as_str().unwrap().contains("NOT FOR DIAGNOSTIC USE"))
    );
    assert_eq!(
        read["images"].as_array().unwrap(),
        &expected_images(&report)
    );
}

/// A source without the Type 2 Patient and Study attributes, no source slice for the finding,
/// non-ASCII text and a multi-frame SOP class: the SR has the attributes empty, no IMAGE item for
/// the finding, UTF-8, and a Referenced Frame Number.
#[test]
fn sparse_context_gives_empty_type_2_attributes() {
    let dir = tempfile::tempdir().unwrap();
    let mut report = report("ts_explicit_le.dcm", false);
    let study = report.study_instance_uid.clone();
    report.context = PatientContext(InMemDicomObject::from_element_iter([DataElement::new(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        study.as_str(),
    )]));
    report.finding.slice = None;
    report.finding.label = "tumeur cérébrale".into();
    // As if the multi-frame source were Enhanced MR: its reference carries the frame number.
    report.slices[2].sop_class_uid = ENHANCED_MR.into();
    let bytes = sr::build(&report).expect("the SR builds");
    let path = write(dir.path(), "sparse.dcm", &bytes);
    common::dciodvfy(&path, "ComprehensiveSR");
    let dump = dsrdump(&path);
    assert!(dump.contains("NOT FOR DIAGNOSTIC USE"));
    let read = pydicom(&path, &source_path("ts_explicit_le.dcm"));
    for key in ["PatientName", "PatientID", "StudyDate", "AccessionNumber"] {
        assert_eq!(read["sr"][key], "", "{key} should be present and empty");
    }
    assert_eq!(read["sr"]["StudyInstanceUID"], study.as_str());
    assert_eq!(read["sr"]["SpecificCharacterSet"], "ISO_IR 192");
    assert_eq!(
        read["images"].as_array().unwrap(),
        &expected_images(&report)
    );
    assert_eq!(read["images"][2][1], 2);
    assert!(
        read["texts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "tumeur cérébrale")
    );
}

/// A change that makes a report invalid.
type Breakage = Box<dyn Fn(&mut SeriesReport)>;

#[test]
fn invalid_reports_are_refused_without_patient_data() {
    let good = report("phi.dcm", false);
    let cases: Vec<(&str, Breakage)> = vec![
        ("no slices", Box::new(|r| r.slices.clear())),
        ("finding slice", Box::new(|r| r.finding.slice = Some(3))),
        ("NaN", Box::new(|r| r.slices[0].probability = f32::NAN)),
        ("above 1", Box::new(|r| r.finding.probability = 1.5)),
        ("sha", Box::new(|r| r.model.sha256 = "abc".into())),
        (
            "uid",
            Box::new(|r| r.slices[1].sop_instance_uid = "1.2.x".into()),
        ),
        ("study", Box::new(|r| r.study_instance_uid = "1.2.3".into())),
    ];
    for (what, break_it) in cases {
        let mut report = good.clone();
        break_it(&mut report);
        let error = sr::build(&report).expect_err(what);
        assert!(!error.contains("PHI"), "{what}: {error}");
    }
}
