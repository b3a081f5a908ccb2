//! The Comprehensive SR instance (SOP Class 1.2.840.10008.5.1.4.1.1.88.33) for a classified MR
//! series, as a DICOM Part 10 file in explicit VR little endian.
//!
//! The instance is a new series in the source study: the Patient, General Study and Patient Study
//! attributes are copied from the source instance ([`SeriesReport::context`]), Type 2 attributes
//! the source lacks are written empty. The content tree (no template; every relationship is one
//! that Comprehensive SR allows):
//!
//! ```text
//! CONTAINER (99BRAINAI, REPORT, "BrainAI Serve classification report")  SEPARATE
//! ├─ HAS OBS CONTEXT  CODE   (DCM 121005 Observer Type) = (DCM 121007 Device)
//! ├─ HAS OBS CONTEXT  UIDREF (DCM 121012 Device Observer UID) = 2.25.<from the model SHA-256>
//! ├─ HAS OBS CONTEXT  TEXT   (DCM 121013 Device Observer Name) = "BrainAI Serve"
//! ├─ HAS OBS CONTEXT  TEXT   (DCM 121014 Device Observer Manufacturer) = "BrainAI Serve"
//! ├─ HAS OBS CONTEXT  TEXT   (DCM 121015 Device Observer Model Name) = model name
//! ├─ CONTAINS TEXT (99BRAINAI, USAGE, "Usage restriction") = "NOT FOR DIAGNOSTIC USE: …"
//! │                                                         (model not clinically trained)
//! ├─ CONTAINS TEXT (99BRAINAI, WARNING, "Warning") = each of the report's warnings
//! ├─ CONTAINS CONTAINER (99BRAINAI, ALGORITHM, "Algorithm identification")  SEPARATE
//! │  ├─ CONTAINS TEXT (DCM 111001 Algorithm Name) = model name
//! │  ├─ CONTAINS TEXT (DCM 111003 Algorithm Version) = model version
//! │  └─ CONTAINS TEXT (99BRAINAI, SHA256, "Model SHA-256") = "sha256:<hex>"
//! ├─ CONTAINS CONTAINER (DCM 121111 Summary)  SEPARATE                        the series result
//! │  └─ CONTAINS TEXT (DCM 121071 Finding) = finding label
//! │     └─ HAS PROPERTIES NUM (DCM 122157 Probability) = p  (UCUM "1", no units)
//! │        ├─ HAS CONCEPT MOD TEXT (SCT 370129005 Measurement Method) = aggregation
//! │        └─ INFERRED FROM IMAGE (DCM 121112 Source of Measurement) → the slice it came from
//! └─ CONTAINS CONTAINER (DCM 125007 Measurement Group)  SEPARATE              one per slice
//!    ├─ CONTAINS IMAGE (DCM 121112 Source of Measurement) → the slice (and frame, for
//!    │                                                       multi-frame SOP classes)
//!    ├─ CONTAINS NUM (99BRAINAI, FRAME, "Frame number") = frame    (multi-frame sources)
//!    ├─ CONTAINS NUM (DCM 122157 Probability) = finding probability
//!    │  └─ HAS CONCEPT MOD TEXT (DCM 121071 Finding) = finding label
//!    └─ CONTAINS TEXT (99BRAINAI, CLASS, "Most probable class") = top label
//!       └─ HAS PROPERTIES NUM (DCM 122157 Probability) = its probability
//! ```
//!
//! The model is also named in the Contributing Equipment Sequence, (DCM 109102 Processing
//! Equipment). The evidence (study → series → instances) is the Current Requested Procedure
//! Evidence Sequence. UIDs are `2.25.` UUID-derived UIDs (RFC 9562 version 8): 128 bits of a
//! SHA-256 over the source series, the model, the slices and a per-call nonce.
//!
//! Nothing here logs; error messages never carry attribute values of the context (patient data).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, DicomValue, PrimitiveValue, Tag, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemElement;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use sha2::{Digest, Sha256};

use super::{ModelIdentity, SeriesReport, SliceFinding};

/// Comprehensive SR Storage.
pub const COMPREHENSIVE_SR: &str = "1.2.840.10008.5.1.4.1.1.88.33";
/// Explicit VR Little Endian.
pub(super) const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
/// Manufacturer (General Equipment and Contributing Equipment).
pub const MANUFACTURER: &str = "BrainAI Serve";
/// The text item written when the model was not clinically trained.
pub const NOT_FOR_DIAGNOSTIC_USE: &str =
    "NOT FOR DIAGNOSTIC USE: the model was not clinically trained";
/// The local coding scheme of the concepts DICOM has no code for.
pub const CODING_SCHEME: &str = "99BRAINAI";

/// A coded concept: (Code Value, Coding Scheme Designator, Code Meaning).
#[derive(Clone, Copy)]
pub(super) struct Code(
    pub(super) &'static str,
    pub(super) &'static str,
    pub(super) &'static str,
);

const REPORT_TITLE: Code = Code(
    "REPORT",
    CODING_SCHEME,
    "BrainAI Serve classification report",
);
pub(super) const USAGE: Code = Code("USAGE", CODING_SCHEME, "Usage restriction");
pub(super) const WARNING: Code = Code("WARNING", CODING_SCHEME, "Warning");
const ALGORITHM: Code = Code("ALGORITHM", CODING_SCHEME, "Algorithm identification");
const MODEL_SHA256: Code = Code("SHA256", CODING_SCHEME, "Model SHA-256");
const TOP_CLASS: Code = Code("CLASS", CODING_SCHEME, "Most probable class");
const FRAME: Code = Code("FRAME", CODING_SCHEME, "Frame number");

pub(super) const OBSERVER_TYPE: Code = Code("121005", "DCM", "Observer Type");
pub(super) const DEVICE: Code = Code("121007", "DCM", "Device");
pub(super) const DEVICE_OBSERVER_UID: Code = Code("121012", "DCM", "Device Observer UID");
pub(super) const DEVICE_OBSERVER_NAME: Code = Code("121013", "DCM", "Device Observer Name");
pub(super) const DEVICE_OBSERVER_MANUFACTURER: Code =
    Code("121014", "DCM", "Device Observer Manufacturer");
pub(super) const DEVICE_OBSERVER_MODEL_NAME: Code =
    Code("121015", "DCM", "Device Observer Model Name");
pub(super) const ALGORITHM_NAME: Code = Code("111001", "DCM", "Algorithm Name");
pub(super) const ALGORITHM_VERSION: Code = Code("111003", "DCM", "Algorithm Version");
const SUMMARY: Code = Code("121111", "DCM", "Summary");
pub(super) const FINDING: Code = Code("121071", "DCM", "Finding");
const PROBABILITY: Code = Code("122157", "DCM", "Probability");
pub(super) const MEASUREMENT_METHOD: Code = Code("370129005", "SCT", "Measurement Method");
const SOURCE_OF_MEASUREMENT: Code = Code("121112", "DCM", "Source of Measurement");
pub(super) const MEASUREMENT_GROUP: Code = Code("125007", "DCM", "Measurement Group");
const NO_UNITS: Code = Code("1", "UCUM", "no units");
const PROCESSING_EQUIPMENT: Code = Code("109102", "DCM", "Processing Equipment");

/// Patient, General Study and Patient Study attributes copied from the source: (tag, VR, Type 2).
/// Type 2 attributes the source lacks are written empty; Type 3 ones are left out.
pub(super) const COPIED: &[(Tag, VR, bool)] = &[
    (tags::PATIENT_NAME, VR::PN, true),
    (tags::PATIENT_ID, VR::LO, true),
    (tags::ISSUER_OF_PATIENT_ID, VR::LO, false),
    (tags::PATIENT_BIRTH_DATE, VR::DA, true),
    (tags::PATIENT_SEX, VR::CS, true),
    (tags::OTHER_PATIENT_I_DS_SEQUENCE, VR::SQ, false),
    (tags::STUDY_DATE, VR::DA, true),
    (tags::STUDY_TIME, VR::TM, true),
    (tags::REFERRING_PHYSICIAN_NAME, VR::PN, true),
    (tags::STUDY_ID, VR::SH, true),
    (tags::ACCESSION_NUMBER, VR::SH, true),
    (tags::STUDY_DESCRIPTION, VR::LO, false),
    (tags::PATIENT_AGE, VR::AS, false),
    (tags::PATIENT_SIZE, VR::DS, false),
    (tags::PATIENT_WEIGHT, VR::DS, false),
];

/// Character sets whose text dicom-rs encodes and whose G0 is ASCII (single value only).
const COPYABLE_CHARSETS: &[&str] = &[
    "ISO_IR 100",
    "ISO_IR 101",
    "ISO_IR 109",
    "ISO_IR 110",
    "ISO_IR 126",
    "ISO_IR 127",
    "ISO_IR 138",
    "ISO_IR 144",
    "ISO_IR 166",
    "ISO_IR 192",
    "GB18030",
    "GBK",
];

/// SOP Classes whose IOD is multi-frame (PS3.3 Annex A): only references to these carry a
/// Referenced Frame Number. A frame of a legacy single-frame class (e.g. MR Image Storage with
/// Number of Frames) is referenced as the instance, its frame number is a NUM item of the slice.
const MULTI_FRAME_SOP_CLASSES: &[&str] = &[
    "1.2.840.10008.5.1.4.1.1.20",
    "1.2.840.10008.5.1.4.1.1.3.1",
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
    "1.2.840.10008.5.1.4.1.1.12.1",
    "1.2.840.10008.5.1.4.1.1.12.2",
    "1.2.840.10008.5.1.4.1.1.12.3",
    "1.2.840.10008.5.1.4.1.1.481.1",
    "1.2.840.10008.5.1.4.1.1.481.2",
    "1.2.840.10008.5.1.4.1.1.77.1.1.1",
    "1.2.840.10008.5.1.4.1.1.77.1.2.1",
    "1.2.840.10008.5.1.4.1.1.77.1.4.1",
    "1.2.840.10008.5.1.4.1.1.77.1.6",
    "1.2.840.10008.5.1.4.1.1.4.1",
    "1.2.840.10008.5.1.4.1.1.4.2",
    "1.2.840.10008.5.1.4.1.1.4.3",
    "1.2.840.10008.5.1.4.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.77.1.5.1",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2",
    "1.2.840.10008.5.1.4.1.1.12.1.1",
    "1.2.840.10008.5.1.4.1.1.12.2.1",
    "1.2.840.10008.5.1.4.1.1.66.4",
    "1.2.840.10008.5.1.4.1.1.77.1.5.4",
    "1.2.840.10008.5.1.4.1.1.13.1.1",
    "1.2.840.10008.5.1.4.1.1.13.1.2",
    "1.2.840.10008.5.1.4.1.1.13.1.3",
    "1.2.840.10008.5.1.4.1.1.130",
    "1.2.840.10008.5.1.4.1.1.6.2",
    "1.2.840.10008.5.1.4.1.1.14.1",
    "1.2.840.10008.5.1.4.1.1.14.2",
    "1.2.840.10008.5.1.4.1.1.2.2",
    "1.2.840.10008.5.1.4.1.1.4.4",
    "1.2.840.10008.5.1.4.1.1.128.1",
    "1.2.840.10008.5.1.4.1.1.13.1.4",
    "1.2.840.10008.5.1.4.1.1.13.1.5",
    "1.2.840.10008.5.1.4.1.1.30",
    "1.2.840.10008.5.1.4.1.1.77.1.5.5",
    "1.2.840.10008.5.1.4.1.1.77.1.5.6",
];

/// The report as a DICOM Part 10 file.
pub fn build(report: &SeriesReport) -> Result<Vec<u8>, String> {
    check(report)?;
    let context = &report.context.0;
    let now = Now::utc();
    let (series_uid, instance_uid) = fresh_uids(report);

    let (study_uid, source_series_number) = study_of(context, &report.study_instance_uid)?;

    let mut obj = InMemDicomObject::new_empty();

    sop_common(&mut obj, &instance_uid, &now);
    obj.put(seq(
        tags::CONTRIBUTING_EQUIPMENT_SEQUENCE,
        vec![contributing_equipment(report, &now)],
    ));

    // SR Document Series.
    obj.put(el(tags::MODALITY, VR::CS, "SR"));
    obj.put(el(tags::SERIES_INSTANCE_UID, VR::UI, &series_uid));
    obj.put(el(
        tags::SERIES_NUMBER,
        VR::IS,
        &(source_series_number + 1000).to_string(),
    ));
    obj.put(el(tags::SERIES_DATE, VR::DA, &now.date));
    obj.put(el(tags::SERIES_TIME, VR::TM, &now.time));
    // The disclaimer first, so that truncation to 64 characters (LO) keeps it.
    let description = if report.model.clinically_trained {
        format!("AI classification {}", report.model.name)
    } else {
        format!(
            "NOT FOR DIAGNOSTIC USE: AI classification {}",
            report.model.name
        )
    };
    obj.put(el(tags::SERIES_DESCRIPTION, VR::LO, &lo(&description)));
    obj.put(seq(
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        vec![],
    ));

    document_general(&mut obj, &now, evidence(report, &study_uid));

    // SR Document Content: the root content item.
    obj.put(el(tags::VALUE_TYPE, VR::CS, "CONTAINER"));
    obj.put(concept(REPORT_TITLE));
    obj.put(el(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"));
    obj.put(seq(tags::CONTENT_SEQUENCE, content(report)));

    part10(obj, context, &study_uid, "SR", 16 << 10)
}

/// The SOP Common module of a Comprehensive SR made now, with the local coding scheme declared.
pub(super) fn sop_common(obj: &mut InMemDicomObject, instance_uid: &str, now: &Now) {
    // SOP Common.
    obj.put(el(tags::SOP_CLASS_UID, VR::UI, COMPREHENSIVE_SR));
    obj.put(el(tags::SOP_INSTANCE_UID, VR::UI, instance_uid));
    obj.put(el(tags::INSTANCE_CREATION_DATE, VR::DA, &now.date));
    obj.put(el(tags::INSTANCE_CREATION_TIME, VR::TM, &now.time));
    obj.put(seq(
        tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE,
        vec![InMemDicomObject::from_element_iter([
            el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, CODING_SCHEME),
            el(
                tags::CODING_SCHEME_NAME,
                VR::ST,
                "BrainAI Serve local concepts",
            ),
            el(
                tags::CODING_SCHEME_RESPONSIBLE_ORGANIZATION,
                VR::ST,
                MANUFACTURER,
            ),
        ])],
    ));
}

/// The General Equipment and SR Document General modules of a document made now, with its
/// evidence (the Current Requested Procedure Evidence Sequence item).
pub(super) fn document_general(obj: &mut InMemDicomObject, now: &Now, evidence: InMemDicomObject) {
    // General Equipment.
    obj.put(el(tags::MANUFACTURER, VR::LO, MANUFACTURER));
    obj.put(el(tags::MANUFACTURER_MODEL_NAME, VR::LO, MANUFACTURER));
    obj.put(el(
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        env!("CARGO_PKG_VERSION"),
    ));

    // SR Document General.
    obj.put(el(tags::INSTANCE_NUMBER, VR::IS, "1"));
    obj.put(el(tags::COMPLETION_FLAG, VR::CS, "COMPLETE"));
    obj.put(el(tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED"));
    obj.put(el(tags::CONTENT_DATE, VR::DA, &now.date));
    obj.put(el(tags::CONTENT_TIME, VR::TM, &now.time));
    obj.put(seq(tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, vec![]));
    obj.put(seq(
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![evidence],
    ));
}

/// The study a derived object belongs to (the context's, which must be the report's) and the
/// source's Series Number (0 when absent or out of range), which its own is derived from.
pub(super) fn study_of(context: &InMemDicomObject, study: &str) -> Result<(String, i64), String> {
    if context_str(context, tags::STUDY_INSTANCE_UID).is_some_and(|uid| uid != study) {
        return Err("the context's Study Instance UID differs from the report's study UID".into());
    }
    let series_number = context_str(context, tags::SERIES_NUMBER)
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| (0..1_000_000).contains(n))
        .unwrap_or(0);
    Ok((study.to_string(), series_number))
}

/// A derived object of the source study as Part 10 bytes: the Patient, General Study and Patient
/// Study attributes copied from `context` (Type 2 ones it lacks written empty), the Specific
/// Character Set they need, the file meta group, explicit VR little endian. `what` names the
/// object in errors ("SR", "SEG").
pub(super) fn part10(
    mut obj: InMemDicomObject,
    context: &InMemDicomObject,
    study_uid: &str,
    what: &str,
    capacity: usize,
) -> Result<Vec<u8>, String> {
    let own_ascii = all_ascii(&obj);

    // Patient, General Study, Patient Study: copied.
    obj.put(el(tags::STUDY_INSTANCE_UID, VR::UI, study_uid));
    for &(tag, vr, type2) in COPIED {
        if let Some(element) = context.get(tag) {
            obj.put(element.clone());
        } else if type2 {
            obj.put(DataElement::new(tag, vr, PrimitiveValue::Empty));
        }
    }

    if let Some(charset) = charset(context, own_ascii, all_ascii(&obj)) {
        obj.put(charset);
    }

    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(EXPLICIT_VR_LE)
                .implementation_class_uid(uid_from(&Sha256::digest(
                    b"brainai-serve implementation class",
                )))
                .implementation_version_name(format!("BRAINAI_{}", env!("CARGO_PKG_VERSION"))),
        )
        .map_err(|e| format!("the {what} file meta group could not be built: {e}"))?;
    let mut out = Vec::with_capacity(capacity);
    file.write_all(&mut out)
        .map_err(|e| format!("the {what} could not be encoded: {e}"))?;
    Ok(out)
}

/// Refuses reports that would make an invalid instance. Messages name the field, never a value
/// from the context.
fn check(report: &SeriesReport) -> Result<(), String> {
    if report.slices.is_empty() {
        return Err("the report has no slices".into());
    }
    check_uid("study UID", &report.study_instance_uid)?;
    check_uid("series UID", &report.series_instance_uid)?;
    for (i, slice) in report.slices.iter().enumerate() {
        check_uid(&format!("SOP Class UID of slice {i}"), &slice.sop_class_uid)?;
        check_uid(
            &format!("SOP Instance UID of slice {i}"),
            &slice.sop_instance_uid,
        )?;
        if slice.frame == Some(0) {
            return Err(format!("slice {i}: frame numbers are 1-based"));
        }
        for (what, p) in [
            ("probability", slice.probability),
            ("finding probability", slice.finding_probability),
        ] {
            check_probability(&format!("slice {i}: {what}"), p)?;
        }
        if slice.label.trim().is_empty() {
            return Err(format!("slice {i}: the label is empty"));
        }
    }
    check_probability("the series probability", report.finding.probability)?;
    if report.finding.label.trim().is_empty() {
        return Err("the finding label is empty".into());
    }
    if let Some(index) = report.finding.slice
        && index >= report.slices.len()
    {
        return Err(format!(
            "the finding refers to slice {index} of {}",
            report.slices.len()
        ));
    }
    let sha = &report.model.sha256;
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("the model SHA-256 is not 64 hexadecimal digits".into());
    }
    if report.model.name.trim().is_empty() || report.model.version.trim().is_empty() {
        return Err("the model name or version is empty".into());
    }
    Ok(())
}

pub(super) fn check_uid(what: &str, uid: &str) -> Result<(), String> {
    let valid = !uid.is_empty()
        && uid.len() <= 64
        && uid
            .split('.')
            .all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()));
    if valid {
        Ok(())
    } else {
        Err(format!("the {what} is not a valid DICOM UID"))
    }
}

fn check_probability(what: &str, p: f32) -> Result<(), String> {
    if p.is_finite() && (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(format!("{what} is not a probability in [0, 1]"))
    }
}

/// The content items under the root container.
fn content(report: &SeriesReport) -> Vec<InMemDicomObject> {
    let model = &report.model;
    let finding = &report.finding;
    let mut items = vec![
        code_item("HAS OBS CONTEXT", OBSERVER_TYPE, DEVICE),
        uidref_item(
            "HAS OBS CONTEXT",
            DEVICE_OBSERVER_UID,
            &device_uid(&report.model),
        ),
        text_item("HAS OBS CONTEXT", DEVICE_OBSERVER_NAME, MANUFACTURER),
        text_item(
            "HAS OBS CONTEXT",
            DEVICE_OBSERVER_MANUFACTURER,
            MANUFACTURER,
        ),
        text_item("HAS OBS CONTEXT", DEVICE_OBSERVER_MODEL_NAME, &model.name),
    ];
    if !model.clinically_trained {
        items.push(text_item("CONTAINS", USAGE, NOT_FOR_DIAGNOSTIC_USE));
    }
    for warning in &report.warnings {
        let written = !model.clinically_trained && warning == NOT_FOR_DIAGNOSTIC_USE;
        if warning.trim().is_empty() || written {
            continue;
        }
        items.push(text_item("CONTAINS", WARNING, warning));
    }
    items.push(container(
        "CONTAINS",
        ALGORITHM,
        vec![
            text_item("CONTAINS", ALGORITHM_NAME, &model.name),
            text_item("CONTAINS", ALGORITHM_VERSION, &model.version),
            text_item(
                "CONTAINS",
                MODEL_SHA256,
                &format!("sha256:{}", model.sha256.to_ascii_lowercase()),
            ),
        ],
    ));

    let mut probability = num_item("HAS PROPERTIES", PROBABILITY, finding.probability);
    let mut evidence = vec![];
    if !finding.aggregation.trim().is_empty() {
        evidence.push(text_item(
            "HAS CONCEPT MOD",
            MEASUREMENT_METHOD,
            &finding.aggregation,
        ));
    }
    if let Some(index) = finding.slice {
        evidence.push(image_item(
            "INFERRED FROM",
            SOURCE_OF_MEASUREMENT,
            &report.slices[index],
        ));
    }
    with_children(&mut probability, evidence);
    let mut label = text_item("CONTAINS", FINDING, &finding.label);
    with_children(&mut label, vec![probability]);
    items.push(container("CONTAINS", SUMMARY, vec![label]));

    for slice in &report.slices {
        let mut finding_probability = num_item("CONTAINS", PROBABILITY, slice.finding_probability);
        with_children(
            &mut finding_probability,
            vec![text_item("HAS CONCEPT MOD", FINDING, &finding.label)],
        );
        let mut top = text_item("CONTAINS", TOP_CLASS, &slice.label);
        with_children(
            &mut top,
            vec![num_item("HAS PROPERTIES", PROBABILITY, slice.probability)],
        );
        let mut group = vec![image_item("CONTAINS", SOURCE_OF_MEASUREMENT, slice)];
        if let Some(frame) = slice.frame {
            group.push(number_item("CONTAINS", FRAME, &frame.to_string()));
        }
        group.extend([finding_probability, top]);
        items.push(container("CONTAINS", MEASUREMENT_GROUP, group));
    }
    items
}

/// Hierarchical SOP Instance Reference: the study, the source series, each instance once.
fn evidence(report: &SeriesReport, study_uid: &str) -> InMemDicomObject {
    let mut instances: Vec<(&str, &str)> = vec![];
    for slice in &report.slices {
        let key = (
            slice.sop_class_uid.as_str(),
            slice.sop_instance_uid.as_str(),
        );
        if !instances.contains(&key) {
            instances.push(key);
        }
    }
    let sops = instances
        .into_iter()
        .map(|(class, instance)| {
            InMemDicomObject::from_element_iter([
                el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, class),
                el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, instance),
            ])
        })
        .collect();
    let series = InMemDicomObject::from_element_iter([
        el(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            &report.series_instance_uid,
        ),
        seq(tags::REFERENCED_SOP_SEQUENCE, sops),
    ]);
    InMemDicomObject::from_element_iter([
        el(tags::STUDY_INSTANCE_UID, VR::UI, study_uid),
        seq(tags::REFERENCED_SERIES_SEQUENCE, vec![series]),
    ])
}

fn contributing_equipment(report: &SeriesReport, now: &Now) -> InMemDicomObject {
    let model = &report.model;
    let sha = model.sha256.to_ascii_lowercase();
    // Software Versions is LO (64 characters a value): the SHA-256 is exactly 64 hex digits, so
    // the "sha256:" prefix goes to the description.
    InMemDicomObject::from_element_iter([
        el(tags::MANUFACTURER, VR::LO, MANUFACTURER),
        el(tags::MANUFACTURER_MODEL_NAME, VR::LO, &lo(&model.name)),
        DataElement::new(
            tags::SOFTWARE_VERSIONS,
            VR::LO,
            dicom_value!(Strs, [lo(&model.version), sha.clone()]),
        ),
        seq(
            tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
            vec![code(PROCESSING_EQUIPMENT)],
        ),
        el(tags::CONTRIBUTION_DATE_TIME, VR::DT, &now.datetime),
        el(
            tags::CONTRIBUTION_DESCRIPTION,
            VR::ST,
            &st(&format!(
                "Classification by model {} version {} (sha256:{sha}){}",
                model.name,
                model.version,
                if model.clinically_trained {
                    ""
                } else {
                    "; NOT FOR DIAGNOSTIC USE"
                }
            )),
        ),
    ])
}

/// Specific Character Set: the source's when every value can be written in it, else UTF-8
/// (values are Unicode in memory, dicom-rs encodes them on writing); none when all is ASCII and
/// the source declared none.
pub(super) fn charset(
    context: &InMemDicomObject,
    own_ascii: bool,
    all: bool,
) -> Option<InMemElement> {
    let source = context.get(tags::SPECIFIC_CHARACTER_SET);
    let values: Vec<String> = source
        .and_then(|e| e.value().to_multi_str().ok())
        .map(|v| v.iter().map(|s| s.trim().to_string()).collect())
        .unwrap_or_default();
    if all {
        // Plain ASCII is valid in any declared repertoire.
        return source.cloned();
    }
    if values.len() == 1
        && COPYABLE_CHARSETS.contains(&values[0].as_str())
        && (own_ascii || values[0] == "ISO_IR 192")
    {
        return source.cloned();
    }
    Some(el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"))
}

pub(super) fn all_ascii(obj: &InMemDicomObject) -> bool {
    obj.iter().all(|element| match element.value() {
        DicomValue::Primitive(PrimitiveValue::Str(s)) => s.is_ascii(),
        DicomValue::Primitive(PrimitiveValue::Strs(v)) => v.iter().all(|s| s.is_ascii()),
        DicomValue::Sequence(items) => items.items().iter().all(all_ascii),
        _ => true,
    })
}

// Content items.

pub(super) fn base_item(relationship: &str, value_type: &str, name: Code) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        el(tags::RELATIONSHIP_TYPE, VR::CS, relationship),
        el(tags::VALUE_TYPE, VR::CS, value_type),
        concept(name),
    ])
}

pub(super) fn text_item(relationship: &str, name: Code, text: &str) -> InMemDicomObject {
    let mut item = base_item(relationship, "TEXT", name);
    item.put(el(tags::TEXT_VALUE, VR::UT, &ut(text)));
    item
}

pub(super) fn code_item(relationship: &str, name: Code, value: Code) -> InMemDicomObject {
    let mut item = base_item(relationship, "CODE", name);
    item.put(seq(tags::CONCEPT_CODE_SEQUENCE, vec![code(value)]));
    item
}

pub(super) fn uidref_item(relationship: &str, name: Code, uid: &str) -> InMemDicomObject {
    let mut item = base_item(relationship, "UIDREF", name);
    item.put(el(tags::UID, VR::UI, uid));
    item
}

/// A NUM item holding a probability (checked to be finite in [0, 1]), without units.
fn num_item(relationship: &str, name: Code, value: f32) -> InMemDicomObject {
    number_item(relationship, name, &ds(value))
}

/// A NUM item holding a Decimal String, without units.
fn number_item(relationship: &str, name: Code, value: &str) -> InMemDicomObject {
    let mut item = base_item(relationship, "NUM", name);
    let measured = InMemDicomObject::from_element_iter([
        el(tags::NUMERIC_VALUE, VR::DS, value),
        seq(tags::MEASUREMENT_UNITS_CODE_SEQUENCE, vec![code(NO_UNITS)]),
    ]);
    item.put(seq(tags::MEASURED_VALUE_SEQUENCE, vec![measured]));
    item
}

fn image_item(relationship: &str, name: Code, slice: &SliceFinding) -> InMemDicomObject {
    let mut item = base_item(relationship, "IMAGE", name);
    let mut reference = InMemDicomObject::from_element_iter([
        el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, &slice.sop_class_uid),
        el(
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            &slice.sop_instance_uid,
        ),
    ]);
    if let Some(frame) = slice.frame
        && MULTI_FRAME_SOP_CLASSES.contains(&slice.sop_class_uid.as_str())
    {
        reference.put(el(
            tags::REFERENCED_FRAME_NUMBER,
            VR::IS,
            &frame.to_string(),
        ));
    }
    item.put(seq(tags::REFERENCED_SOP_SEQUENCE, vec![reference]));
    item
}

pub(super) fn container(
    relationship: &str,
    name: Code,
    children: Vec<InMemDicomObject>,
) -> InMemDicomObject {
    let mut item = base_item(relationship, "CONTAINER", name);
    item.put(el(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"));
    with_children(&mut item, children);
    item
}

pub(super) fn with_children(item: &mut InMemDicomObject, children: Vec<InMemDicomObject>) {
    if !children.is_empty() {
        item.put(seq(tags::CONTENT_SEQUENCE, children));
    }
}

// Elements and values.

pub(super) fn el(tag: Tag, vr: VR, value: &str) -> InMemElement {
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

pub(super) fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> InMemElement {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

pub(super) fn code(code: Code) -> InMemDicomObject {
    let Code(value, scheme, meaning) = code;
    InMemDicomObject::from_element_iter([
        el(tags::CODE_VALUE, VR::SH, value),
        el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
        el(tags::CODE_MEANING, VR::LO, meaning),
    ])
}

pub(super) fn concept(name: Code) -> InMemElement {
    seq(tags::CONCEPT_NAME_CODE_SEQUENCE, vec![code(name)])
}

/// A Decimal String (16 bytes at most) for a finite value: the shortest representation that
/// reads back as the same `f32`, in exponent form when the plain one is too long.
pub(super) fn ds(value: f32) -> String {
    let plain = format!("{value}");
    if plain.len() <= 16 {
        plain
    } else {
        format!("{value:e}").replace('e', "E")
    }
}

/// An LO value: no backslash (the value delimiter) nor control characters, 64 characters.
pub(super) fn lo(text: &str) -> String {
    text.chars()
        .map(|c| if c == '\\' || c.is_control() { ' ' } else { c })
        .take(64)
        .collect::<String>()
        .trim()
        .to_string()
}

/// An ST value: no control characters but CR, LF, FF and TAB; 1024 characters.
pub(super) fn st(text: &str) -> String {
    printable(text).chars().take(1024).collect()
}

/// A UT value: no control characters but CR, LF, FF and TAB.
fn ut(text: &str) -> String {
    printable(text)
}

pub(super) fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && !matches!(c, '\r' | '\n' | '\t' | '\u{c}') {
                ' '
            } else {
                c
            }
        })
        .collect()
}

pub(super) fn context_str(context: &InMemDicomObject, tag: Tag) -> Option<String> {
    context
        .get(tag)
        .and_then(|e| e.value().to_str().ok())
        .map(|s| s.trim_matches(|c: char| c == '\0' || c == ' ').to_string())
        .filter(|s| !s.is_empty())
}

// UIDs.

/// A `2.25.` UID from the first 128 bits of a digest, marked as an RFC 9562 version 8 UUID.
pub(super) fn uid_from(digest: &[u8]) -> String {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    format!("2.25.{}", u128::from_be_bytes(bytes))
}

/// New Series and SOP Instance UIDs: a SHA-256 over what the report is about and a nonce that
/// differs on every call (time, a process-wide counter, the process id and std's random hash
/// keys).
pub(super) fn fresh_uids(report: &SeriesReport) -> (String, String) {
    fresh_uids_of(|hasher| {
        for part in [
            report.series_instance_uid.as_bytes(),
            report.model.sha256.as_bytes(),
        ] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
        for slice in &report.slices {
            hasher.update((slice.sop_instance_uid.len() as u64).to_le_bytes());
            hasher.update(slice.sop_instance_uid.as_bytes());
            hasher.update(slice.frame.unwrap_or(0).to_le_bytes());
            hasher.update(slice.finding_probability.to_bits().to_le_bytes());
            hasher.update(slice.probability.to_bits().to_le_bytes());
        }
    })
}

/// New Series and SOP Instance UIDs for a document: a digest of what `hash_content` feeds (the
/// document's content) and a per-call nonce (counter, time, process, random).
pub(super) fn fresh_uids_of(hash_content: impl FnOnce(&mut Sha256)) -> (String, String) {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let random = std::hash::RandomState::new().hash_one((count, nanos));

    let mut hasher = Sha256::new();
    hasher.update(b"brainai-serve SR UID v1\0");
    hash_content(&mut hasher);
    hasher.update(count.to_le_bytes());
    hasher.update(nanos.to_le_bytes());
    hasher.update(std::process::id().to_le_bytes());
    hasher.update(random.to_le_bytes());
    let seed = hasher.finalize();

    let derive = |what: &[u8]| {
        let mut h = Sha256::new();
        h.update(seed);
        h.update(what);
        uid_from(&h.finalize())
    };
    (derive(b"series"), derive(b"instance"))
}

/// The Device Observer UID: the same for the same model.
pub(super) fn device_uid(model: &ModelIdentity) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"brainai-serve device observer v1\0");
    hasher.update(model.sha256.to_ascii_lowercase().as_bytes());
    uid_from(&hasher.finalize())
}

// Time.

/// The current time in UTC as DA, TM and DT (with its +0000 offset) values.
pub(super) struct Now {
    pub(super) date: String,
    pub(super) time: String,
    pub(super) datetime: String,
}

impl Now {
    pub(super) fn utc() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        let (year, month, day) = civil_from_days((secs / 86_400) as i64);
        let of_day = secs % 86_400;
        let date = format!("{year:04}{month:02}{day:02}");
        let time = format!(
            "{:02}{:02}{:02}.{:06}",
            of_day / 3600,
            of_day / 60 % 60,
            of_day % 60,
            since.subsec_micros()
        );
        let datetime = format!("{date}{time}+0000");
        Now {
            date,
            time,
            datetime,
        }
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_797), (2024, 3, 15));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn decimal_strings_fit() {
        assert_eq!(ds(0.93), "0.93");
        assert_eq!(ds(1.0), "1");
        assert_eq!(ds(0.0), "0");
        assert!(ds(1e-30).len() <= 16);
        assert_eq!(ds(1e-30).parse::<f32>().unwrap(), 1e-30);
    }

    #[test]
    fn uids_are_2_25() {
        let uid = uid_from(&Sha256::digest(b"x"));
        assert!(uid.starts_with("2.25."));
        assert!(uid.len() <= 64);
        assert!(check_uid("uid", &uid).is_ok());
    }
}
