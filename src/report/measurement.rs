//! The measurement report of a segmented study: a Comprehensive SR instance (SOP Class
//! 1.2.840.10008.5.1.4.1.1.88.33) whose content follows TID 1500 "Measurement Report", with one
//! TID 1411 "Volumetric ROI Measurements" group per segment of the DICOM Segmentation
//! ([`super::seg`]) the volumes were measured on. A DICOM Part 10 file in explicit VR little
//! endian.
//!
//! The instance is a new series in the source study (Series Number: the source's + 3000; the
//! classification SR uses + 1000, the SEG + 2000): the Patient, General Study and Patient Study
//! attributes are copied from the source instance ([`MeasurementReport::context`]) as the SR
//! and the SEG copy them. The content tree (codes, value and relationship types as highdicom
//! 0.28 writes and reads them, `MeasurementReport` and
//! `VolumetricROIMeasurementsAndQualitativeEvaluations`):
//!
//! ```text
//! CONTAINER (DCM 126000 Imaging Measurement Report)  SEPARATE, template TID 1500 (DCMR)
//! ├─ HAS CONCEPT MOD  CODE (DCM 121049 Language of Content Item and Descendants)
//! │                        = (RFC5646 en-US English (United States))
//! ├─ HAS OBS CONTEXT  CODE   (DCM 121005 Observer Type) = (DCM 121007 Device)
//! ├─ HAS OBS CONTEXT  UIDREF (DCM 121012 Device Observer UID) = the SR's, for the same model
//! ├─ HAS OBS CONTEXT  TEXT   (DCM 121013 Device Observer Name) = "BrainAI Serve"
//! ├─ HAS OBS CONTEXT  TEXT   (DCM 121014 Device Observer Manufacturer) = "BrainAI Serve"
//! ├─ HAS OBS CONTEXT  TEXT   (DCM 121015 Device Observer Model Name) = model name
//! ├─ HAS CONCEPT MOD  CODE (DCM 121058 Procedure reported) = (SCT 363679005 Imaging procedure)
//! ├─ CONTAINS CONTAINER (DCM 111028 Image Library)  SEPARATE
//! │  └─ CONTAINS CONTAINER (DCM 126200 Image Library Group)  SEPARATE    one per source series
//! │     └─ CONTAINS IMAGE (SCT 260753009 Source) → each instance of the series
//! ├─ CONTAINS CONTAINER (DCM 126010 Imaging Measurements)  SEPARATE
//! │  └─ CONTAINS CONTAINER (DCM 125007 Measurement Group)  SEPARATE, TID 1411   one per segment
//! │     ├─ HAS OBS CONTEXT TEXT   (DCM 112039 Tracking Identifier) = segment label
//! │     ├─ HAS OBS CONTEXT UIDREF (DCM 112040 Tracking Unique Identifier)
//! │     │                         = 2.25.<from the SEG's SOP Instance UID and segment number>
//! │     ├─ CONTAINS CODE (SCT 276214006 Finding category) = Segmented Property Category
//! │     ├─ CONTAINS CODE (DCM 121071 Finding) = Segmented Property Type
//! │     ├─ HAS CONCEPT MOD TEXT (DCM 111001 Algorithm Name) = model name
//! │     ├─ HAS CONCEPT MOD TEXT (DCM 111003 Algorithm Version) = model version
//! │     ├─ HAS CONCEPT MOD TEXT (DCM 111002 Algorithm Parameters) = "sha256:<hex>"
//! │     ├─ CONTAINS IMAGE (DCM 121191 Referenced Segment) → the SEG (Segmentation Storage, its
//! │     │                                                   SOP Instance UID, Segment Number)
//! │     ├─ CONTAINS UIDREF (DCM 121232 Source series for segmentation) = reference series
//! │     ├─ CONTAINS NUM (SCT 118565006 Volume) = mL (UCUM ml)          when the volume is known
//! │     │  └─ HAS CONCEPT MOD CODE (SCT 370129005 Measurement Method)
//! │     │                        = (DCM 126030 Sum of segmented voxel method for volume)
//! │     └─ CONTAINS NUM (99BRAINAI VOXELS Segmented voxel count) = voxels (UCUM {voxels})
//! ├─ CONTAINS TEXT (99BRAINAI USAGE Usage restriction) = "NOT FOR DIAGNOSTIC USE: …"
//! │                                                       (model not clinically trained)
//! └─ CONTAINS TEXT (99BRAINAI WARNING Warning) = each of the report's warnings
//! ```
//!
//! TID 1500 is extensible: the usage restriction and the warnings are TEXT items of the root,
//! after the rows the template defines, as the classification SR writes them; an untrained
//! model's Series Description starts with "NOT FOR DIAGNOSTIC USE" too. The Current Requested
//! Procedure Evidence Sequence lists every source series with its instances, and the SEG.
//! The volume is written to `f32` precision (the shortest Decimal String that reads back as the
//! same `f32`: 6 to 9 significant digits).
//!
//! The Series and SOP Instance UIDs and the Device Observer UID come from the classification SR's
//! generators ([`super::sr`]); the Tracking Unique Identifier of a segment is derived from the
//! SEG's SOP Instance UID and its Segment Number, so that every report on the same SEG names the
//! same region the same.
//!
//! Nothing here logs or panics; error messages never carry attribute values of the context
//! (patient data), only field names and indices.

use std::collections::HashSet;

use dicom_core::{DataElement, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use sha2::{Digest, Sha256};

use super::ModelIdentity;
use super::seg::{self, SEGMENTATION_STORAGE, SegIds};
use super::sr::{
    ALGORITHM_NAME, ALGORITHM_VERSION, CODING_SCHEME, Code, DEVICE, DEVICE_OBSERVER_MANUFACTURER,
    DEVICE_OBSERVER_MODEL_NAME, DEVICE_OBSERVER_NAME, DEVICE_OBSERVER_UID, FINDING, MANUFACTURER,
    MEASUREMENT_GROUP, MEASUREMENT_METHOD, NOT_FOR_DIAGNOSTIC_USE, Now, OBSERVER_TYPE, USAGE,
    WARNING, base_item, check_uid, code, code_item, concept, container, device_uid,
    document_general, ds, el, fresh_uids_of, lo, part10, seq, sop_common, study_of, text_item,
    uid_from, uidref_item, with_children,
};
use crate::input::dicom::PatientContext;

/// Added to the source's Series Number for the new series (the SR uses 1000, the SEG 2000).
pub const SERIES_NUMBER_OFFSET: i64 = 3000;
/// TID 1500, the template of the root content item.
pub const TEMPLATE: &str = "1500";
/// TID 1411, the template of each measurement group.
pub const GROUP_TEMPLATE: &str = "1411";

const TITLE: Code = Code("126000", "DCM", "Imaging Measurement Report");
const LANGUAGE: Code = Code("121049", "DCM", "Language of Content Item and Descendants");
const ENGLISH_US: Code = Code("en-US", "RFC5646", "English (United States)");
const PROCEDURE_REPORTED: Code = Code("121058", "DCM", "Procedure reported");
const IMAGING_PROCEDURE: Code = Code("363679005", "SCT", "Imaging procedure");
const IMAGE_LIBRARY: Code = Code("111028", "DCM", "Image Library");
const IMAGE_LIBRARY_GROUP: Code = Code("126200", "DCM", "Image Library Group");
const SOURCE: Code = Code("260753009", "SCT", "Source");
const IMAGING_MEASUREMENTS: Code = Code("126010", "DCM", "Imaging Measurements");
const TRACKING_IDENTIFIER: Code = Code("112039", "DCM", "Tracking Identifier");
const TRACKING_UID: Code = Code("112040", "DCM", "Tracking Unique Identifier");
const FINDING_CATEGORY: Code = Code("276214006", "SCT", "Finding category");
const ALGORITHM_PARAMETERS: Code = Code("111002", "DCM", "Algorithm Parameters");
const REFERENCED_SEGMENT: Code = Code("121191", "DCM", "Referenced Segment");
const SOURCE_SERIES_FOR_SEGMENTATION: Code =
    Code("121232", "DCM", "Source series for segmentation");
const VOLUME: Code = Code("118565006", "SCT", "Volume");
const MILLILITER: Code = Code("ml", "UCUM", "milliliter");
const SUM_OF_SEGMENTED_VOXELS: Code =
    Code("126030", "DCM", "Sum of segmented voxel method for volume");
const VOXEL_COUNT: Code = Code("VOXELS", CODING_SCHEME, "Segmented voxel count");
const VOXELS: Code = Code("{voxels}", "UCUM", "voxels");

/// The largest voxel count a Decimal String (16 characters) holds as an integer.
const MAX_VOXELS: u64 = 9_999_999_999_999_999;

/// One segment's measurements.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentMeasurement {
    /// Its Segment Number in the SEG ([`seg::segment_number`]).
    pub segment_number: u16,
    /// The tracking identifier, e.g. "edema" (the Segment Label).
    pub label: String,
    /// The segment's Segmented Property Type.
    pub finding: seg::Code,
    /// Its Segmented Property Category.
    pub category: seg::Code,
    pub voxels: u64,
    /// `None` when the voxel depth is unknown: then no volume is written.
    pub volume_ml: Option<f64>,
}

/// Everything the measurement report says.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasurementReport {
    /// Patient and study attributes of the source, copied as the SR and the SEG copy them.
    pub context: PatientContext,
    pub study_instance_uid: String,
    /// The SEG the measurements are of.
    pub segmentation: SegIds,
    /// The series the segmentation was computed from (the reference first), with their
    /// instances (SOP Class UID, SOP Instance UID): the evidence.
    pub source_series: Vec<(String, Vec<(String, String)>)>,
    pub measurements: Vec<SegmentMeasurement>,
    pub model: ModelIdentity,
    pub warnings: Vec<String>,
}

/// Comprehensive SR Part 10 bytes (explicit VR little endian), content per TID 1500.
pub fn build(report: &MeasurementReport) -> Result<Vec<u8>, String> {
    check(report)?;
    let context = &report.context.0;
    let now = Now::utc();
    // A digest of the SEG's SOP Instance UID and the model, and a per-call nonce.
    let (series_uid, instance_uid) = fresh_uids_of(|hasher| {
        for part in [
            report.segmentation.sop_instance_uid.as_bytes(),
            report.model.sha256.as_bytes(),
        ] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part);
        }
    });
    let (study_uid, source_series_number) = study_of(context, &report.study_instance_uid)?;

    let mut obj = InMemDicomObject::new_empty();

    sop_common(&mut obj, &instance_uid, &now);

    // SR Document Series.
    obj.put(el(tags::MODALITY, VR::CS, "SR"));
    obj.put(el(tags::SERIES_INSTANCE_UID, VR::UI, &series_uid));
    obj.put(el(
        tags::SERIES_NUMBER,
        VR::IS,
        &(source_series_number + SERIES_NUMBER_OFFSET).to_string(),
    ));
    obj.put(el(tags::SERIES_DATE, VR::DA, &now.date));
    obj.put(el(tags::SERIES_TIME, VR::TM, &now.time));
    // The disclaimer first, so that truncation to 64 characters (LO) keeps it.
    let description = if report.model.clinically_trained {
        format!("AI volumetry {}", report.model.name)
    } else {
        format!("NOT FOR DIAGNOSTIC USE: AI volumetry {}", report.model.name)
    };
    obj.put(el(tags::SERIES_DESCRIPTION, VR::LO, &lo(&description)));
    obj.put(seq(
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        vec![],
    ));

    document_general(&mut obj, &now, evidence(report, &study_uid));

    // SR Document Content: the root content item.
    obj.put(el(tags::VALUE_TYPE, VR::CS, "CONTAINER"));
    obj.put(concept(TITLE));
    obj.put(el(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"));
    obj.put(template(TEMPLATE));
    obj.put(seq(tags::CONTENT_SEQUENCE, content(report)));

    part10(
        obj,
        context,
        &study_uid,
        "measurement report",
        report.measurements.len() * 2048 + (16 << 10),
    )
}

/// Refuses reports that would make an invalid instance. Messages name the field and indices,
/// never a value from the context.
fn check(report: &MeasurementReport) -> Result<(), String> {
    check_uid("study UID", &report.study_instance_uid)?;
    let segmentation = &report.segmentation;
    check_uid("SEG Series Instance UID", &segmentation.series_instance_uid)?;
    check_uid("SEG SOP Instance UID", &segmentation.sop_instance_uid)?;

    if report.source_series.is_empty() {
        return Err("the report has no source series".into());
    }
    let mut series = HashSet::new();
    let mut instances = HashSet::new();
    for (i, (uid, members)) in report.source_series.iter().enumerate() {
        check_uid(&format!("UID of source series {i}"), uid)?;
        if !series.insert(uid.as_str()) {
            return Err(format!("source series {i} is listed twice"));
        }
        if *uid == segmentation.series_instance_uid {
            return Err(format!("source series {i} is the SEG's series"));
        }
        if members.is_empty() {
            return Err(format!("source series {i} has no instances"));
        }
        for (j, (class, instance)) in members.iter().enumerate() {
            check_uid(
                &format!("SOP Class UID of instance {j} of source series {i}"),
                class,
            )?;
            check_uid(
                &format!("SOP Instance UID of instance {j} of source series {i}"),
                instance,
            )?;
            if !instances.insert(instance.as_str()) {
                return Err(format!("instance {j} of source series {i} is listed twice"));
            }
        }
    }
    if instances.contains(segmentation.sop_instance_uid.as_str()) {
        return Err("the SEG SOP Instance UID is among the source instances".into());
    }

    if report.measurements.is_empty() {
        return Err("the report has no measurements".into());
    }
    let mut numbers = HashSet::new();
    for (i, measurement) in report.measurements.iter().enumerate() {
        if measurement.segment_number == 0 {
            return Err(format!("measurement {i}: segment numbers are 1-based"));
        }
        if !numbers.insert(measurement.segment_number) {
            return Err(format!(
                "measurement {i}: its segment number is measured twice"
            ));
        }
        if lo(&measurement.label).is_empty() {
            return Err(format!("measurement {i}: the label is empty"));
        }
        check_code(
            &format!("measurement {i}: the finding"),
            &measurement.finding,
        )?;
        check_code(
            &format!("measurement {i}: the category"),
            &measurement.category,
        )?;
        if measurement.voxels > MAX_VOXELS {
            return Err(format!(
                "measurement {i}: the voxel count does not fit a Decimal String"
            ));
        }
        if let Some(volume) = measurement.volume_ml
            && !(volume.is_finite() && volume >= 0.0 && volume <= f64::from(f32::MAX))
        {
            return Err(format!(
                "measurement {i}: the volume is not a finite non-negative value"
            ));
        }
    }

    let sha = &report.model.sha256;
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("the model SHA-256 is not 64 hexadecimal digits".into());
    }
    if lo(&report.model.name).is_empty() || lo(&report.model.version).is_empty() {
        return Err("the model name or version is empty".into());
    }
    Ok(())
}

/// Code Value and Coding Scheme Designator are SH (16 characters), Code Meaning is LO.
fn check_code(what: &str, code: &seg::Code) -> Result<(), String> {
    let short = |s: &str| {
        let s = s.trim();
        !s.is_empty() && s.chars().count() <= 16 && !s.chars().any(|c| c == '\\' || c.is_control())
    };
    if !short(&code.value) || !short(&code.scheme) {
        return Err(format!(
            "{what}: the code value and scheme must be 1 to 16 characters without backslash"
        ));
    }
    if lo(&code.meaning).is_empty() {
        return Err(format!("{what}: the code meaning is empty"));
    }
    Ok(())
}

/// The content items under the root container.
fn content(report: &MeasurementReport) -> Vec<InMemDicomObject> {
    let model = &report.model;
    let mut items = vec![
        code_item("HAS CONCEPT MOD", LANGUAGE, ENGLISH_US),
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
        code_item("HAS CONCEPT MOD", PROCEDURE_REPORTED, IMAGING_PROCEDURE),
        container("CONTAINS", IMAGE_LIBRARY, image_library(report)),
        container(
            "CONTAINS",
            IMAGING_MEASUREMENTS,
            report
                .measurements
                .iter()
                .map(|m| measurement_group(report, m))
                .collect(),
        ),
    ];
    if !model.clinically_trained {
        items.push(text_item("CONTAINS", USAGE, NOT_FOR_DIAGNOSTIC_USE));
    }
    for warning in &report.warnings {
        let written = !model.clinically_trained && warning == NOT_FOR_DIAGNOSTIC_USE;
        if !warning.trim().is_empty() && !written {
            items.push(text_item("CONTAINS", WARNING, warning));
        }
    }
    items
}

/// TID 1600: one Image Library Group per source series, an IMAGE item per instance.
fn image_library(report: &MeasurementReport) -> Vec<InMemDicomObject> {
    report
        .source_series
        .iter()
        .map(|(_, instances)| {
            container(
                "CONTAINS",
                IMAGE_LIBRARY_GROUP,
                instances
                    .iter()
                    .map(|(class, instance)| {
                        reference_item("CONTAINS", SOURCE, class, instance, None)
                    })
                    .collect(),
            )
        })
        .collect()
}

/// TID 1411 for one segment.
fn measurement_group(
    report: &MeasurementReport,
    measurement: &SegmentMeasurement,
) -> InMemDicomObject {
    let model = &report.model;
    let segmentation = &report.segmentation;
    // Checked: there is a first source series.
    let reference_series = report
        .source_series
        .first()
        .map_or("", |(uid, _)| uid.as_str());
    let mut children = vec![
        text_item("HAS OBS CONTEXT", TRACKING_IDENTIFIER, &measurement.label),
        uidref_item(
            "HAS OBS CONTEXT",
            TRACKING_UID,
            &tracking_uid(segmentation, measurement.segment_number),
        ),
        coded_item("CONTAINS", FINDING_CATEGORY, &measurement.category),
        coded_item("CONTAINS", FINDING, &measurement.finding),
        text_item("HAS CONCEPT MOD", ALGORITHM_NAME, &model.name),
        text_item("HAS CONCEPT MOD", ALGORITHM_VERSION, &model.version),
        text_item(
            "HAS CONCEPT MOD",
            ALGORITHM_PARAMETERS,
            &format!("sha256:{}", model.sha256.to_ascii_lowercase()),
        ),
        reference_item(
            "CONTAINS",
            REFERENCED_SEGMENT,
            SEGMENTATION_STORAGE,
            &segmentation.sop_instance_uid,
            Some(measurement.segment_number),
        ),
        uidref_item("CONTAINS", SOURCE_SERIES_FOR_SEGMENTATION, reference_series),
    ];
    if let Some(volume) = measurement.volume_ml {
        let mut num = num_item("CONTAINS", VOLUME, &ds(volume as f32), MILLILITER);
        with_children(
            &mut num,
            vec![code_item(
                "HAS CONCEPT MOD",
                MEASUREMENT_METHOD,
                SUM_OF_SEGMENTED_VOXELS,
            )],
        );
        children.push(num);
    }
    children.push(num_item(
        "CONTAINS",
        VOXEL_COUNT,
        &measurement.voxels.to_string(),
        VOXELS,
    ));
    let mut group = container("CONTAINS", MEASUREMENT_GROUP, children);
    group.put(template(GROUP_TEMPLATE));
    group
}

/// Hierarchical SOP Instance Reference: the study; each source series with its instances, then
/// the SEG's series with the SEG.
fn evidence(report: &MeasurementReport, study_uid: &str) -> InMemDicomObject {
    let segmentation = &report.segmentation;
    let seg_instance = [(
        SEGMENTATION_STORAGE.to_string(),
        segmentation.sop_instance_uid.clone(),
    )];
    let series = report
        .source_series
        .iter()
        .map(|(uid, instances)| (uid.as_str(), instances.as_slice()))
        .chain([(
            segmentation.series_instance_uid.as_str(),
            seg_instance.as_slice(),
        )])
        .map(|(uid, instances)| {
            InMemDicomObject::from_element_iter([
                el(tags::SERIES_INSTANCE_UID, VR::UI, uid),
                seq(
                    tags::REFERENCED_SOP_SEQUENCE,
                    instances
                        .iter()
                        .map(|(class, instance)| {
                            InMemDicomObject::from_element_iter([
                                el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, class),
                                el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, instance),
                            ])
                        })
                        .collect(),
                ),
            ])
        })
        .collect();
    InMemDicomObject::from_element_iter([
        el(tags::STUDY_INSTANCE_UID, VR::UI, study_uid),
        seq(tags::REFERENCED_SERIES_SEQUENCE, series),
    ])
}

/// The Tracking Unique Identifier of a segment of a SEG: the same for the same SEG and segment.
fn tracking_uid(segmentation: &SegIds, segment_number: u16) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"brainai-serve tracking UID v1\0");
    let uid = segmentation.sop_instance_uid.as_bytes();
    hasher.update((uid.len() as u64).to_le_bytes());
    hasher.update(uid);
    hasher.update(segment_number.to_le_bytes());
    uid_from(&hasher.finalize())
}

// Content items.

/// Content Template Sequence: a DCMR template.
fn template(identifier: &str) -> dicom_object::mem::InMemElement {
    seq(
        tags::CONTENT_TEMPLATE_SEQUENCE,
        vec![InMemDicomObject::from_element_iter([
            el(tags::MAPPING_RESOURCE, VR::CS, "DCMR"),
            el(tags::TEMPLATE_IDENTIFIER, VR::CS, identifier),
        ])],
    )
}

/// A CODE item whose value is a segment's code.
fn coded_item(relationship: &str, name: Code, value: &seg::Code) -> InMemDicomObject {
    let mut item = base_item(relationship, "CODE", name);
    item.put(seq(
        tags::CONCEPT_CODE_SEQUENCE,
        vec![InMemDicomObject::from_element_iter([
            el(tags::CODE_VALUE, VR::SH, value.value.trim()),
            el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, value.scheme.trim()),
            el(tags::CODE_MEANING, VR::LO, &lo(&value.meaning)),
        ])],
    ));
    item
}

/// A NUM item: a Decimal String with its units.
fn num_item(relationship: &str, name: Code, value: &str, units: Code) -> InMemDicomObject {
    let mut item = base_item(relationship, "NUM", name);
    let measured = InMemDicomObject::from_element_iter([
        el(tags::NUMERIC_VALUE, VR::DS, value),
        seq(tags::MEASUREMENT_UNITS_CODE_SEQUENCE, vec![code(units)]),
    ]);
    item.put(seq(tags::MEASURED_VALUE_SEQUENCE, vec![measured]));
    item
}

/// An IMAGE item referencing an instance (all of its frames), or one segment of a SEG.
fn reference_item(
    relationship: &str,
    name: Code,
    class: &str,
    instance: &str,
    segment: Option<u16>,
) -> InMemDicomObject {
    let mut item = base_item(relationship, "IMAGE", name);
    let mut reference = InMemDicomObject::from_element_iter([
        el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, class),
        el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, instance),
    ]);
    if let Some(number) = segment {
        reference.put(DataElement::new(
            tags::REFERENCED_SEGMENT_NUMBER,
            VR::US,
            dicom_value!(U16, [number]),
        ));
    }
    item.put(seq(tags::REFERENCED_SOP_SEQUENCE, vec![reference]));
    item
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::sr::COMPREHENSIVE_SR;
    use dicom_core::Tag;

    const SHA: &str = "3f1c2a9d0b7e4f5a6c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d";
    const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
    const STUDY: &str = "1.2.826.0.1.3680043.10.1234.1";
    const SERIES: &str = "1.2.826.0.1.3680043.10.1234.2";
    const OTHER_SERIES: &str = "1.2.826.0.1.3680043.10.1234.3";
    const SEG_SERIES: &str = "2.25.1001";
    const SEG_INSTANCE: &str = "2.25.1002";
    const PATIENT: &str = "Doe^Jane^PHI-NAME-7391";

    fn instance(series: &str, i: usize) -> String {
        format!("{series}.{}", i + 1)
    }

    fn measurement(
        number: u16,
        label: &str,
        finding: (&str, &str),
        voxels: u64,
        volume_ml: Option<f64>,
    ) -> SegmentMeasurement {
        SegmentMeasurement {
            segment_number: number,
            label: label.into(),
            finding: seg::Code::new(finding.0, "SCT", finding.1),
            category: seg::Code::new("49755003", "SCT", "Morphologically Altered Structure"),
            voxels,
            volume_ml,
        }
    }

    fn report(clinically_trained: bool) -> MeasurementReport {
        let context = PatientContext(InMemDicomObject::from_element_iter([
            el(tags::PATIENT_NAME, VR::PN, PATIENT),
            el(tags::PATIENT_ID, VR::LO, "PHI-ID-1234"),
            el(tags::STUDY_INSTANCE_UID, VR::UI, STUDY),
            el(tags::SERIES_NUMBER, VR::IS, "7"),
        ]));
        let series = |uid: &str, n: usize| {
            (
                uid.to_string(),
                (0..n)
                    .map(|i| (MR.to_string(), instance(uid, i)))
                    .collect::<Vec<_>>(),
            )
        };
        MeasurementReport {
            context,
            study_instance_uid: STUDY.into(),
            segmentation: SegIds {
                series_instance_uid: SEG_SERIES.into(),
                sop_instance_uid: SEG_INSTANCE.into(),
            },
            source_series: vec![series(SERIES, 3), series(OTHER_SERIES, 2)],
            measurements: vec![
                measurement(1, "edema", ("79654002", "Edema"), 53, Some(12.5)),
                measurement(2, "enhancing", ("418701002", "Enhancing"), 9, Some(0.03125)),
                measurement(4, "whole_tumor", ("108369006", "Neoplasm"), 66, None),
            ],
            model: ModelIdentity {
                name: "brats-unet".into(),
                version: "2".into(),
                sha256: SHA.into(),
                clinically_trained,
            },
            warnings: vec!["Research prototype".into()],
        }
    }

    use crate::report::testing::{parse, text};

    fn items(obj: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
        obj.element(tag)
            .unwrap_or_else(|_| panic!("{tag} missing"))
            .items()
            .unwrap_or_else(|| panic!("{tag} is not a sequence"))
    }

    fn item(obj: &InMemDicomObject, tag: Tag) -> &InMemDicomObject {
        let all = items(obj, tag);
        assert_eq!(all.len(), 1, "{tag} has {} items", all.len());
        &all[0]
    }

    fn coded(obj: &InMemDicomObject) -> [String; 3] {
        [
            text(obj, tags::CODE_VALUE),
            text(obj, tags::CODING_SCHEME_DESIGNATOR),
            text(obj, tags::CODE_MEANING),
        ]
    }

    fn triple(code: Code) -> [String; 3] {
        [code.0.into(), code.1.into(), code.2.into()]
    }

    /// (relationship type, value type, concept name) of a content item.
    fn shape(obj: &InMemDicomObject) -> (String, String, [String; 3]) {
        (
            text(obj, tags::RELATIONSHIP_TYPE),
            text(obj, tags::VALUE_TYPE),
            coded(item(obj, tags::CONCEPT_NAME_CODE_SEQUENCE)),
        )
    }

    fn is(obj: &InMemDicomObject, relationship: &str, value_type: &str, name: Code) {
        assert_eq!(
            shape(obj),
            (
                relationship.to_string(),
                value_type.to_string(),
                triple(name)
            )
        );
    }

    fn template_of(obj: &InMemDicomObject) -> (String, String) {
        let template = item(obj, tags::CONTENT_TEMPLATE_SEQUENCE);
        (
            text(template, tags::MAPPING_RESOURCE),
            text(template, tags::TEMPLATE_IDENTIFIER),
        )
    }

    fn children(obj: &InMemDicomObject) -> &[InMemDicomObject] {
        items(obj, tags::CONTENT_SEQUENCE)
    }

    /// The NUM item's value and units.
    fn measured(obj: &InMemDicomObject) -> (String, [String; 3]) {
        let value = item(obj, tags::MEASURED_VALUE_SEQUENCE);
        (
            text(value, tags::NUMERIC_VALUE),
            coded(item(value, tags::MEASUREMENT_UNITS_CODE_SEQUENCE)),
        )
    }

    fn groups(obj: &InMemDicomObject) -> &[InMemDicomObject] {
        let measurements = children(obj)
            .iter()
            .find(|i| shape(i).2 == triple(IMAGING_MEASUREMENTS))
            .expect("an Imaging Measurements container");
        children(measurements)
    }

    /// The root and its TID 1500 rows: language, the device observer, the procedure, the image
    /// library, the measurements; then the usage restriction and the warning.
    #[test]
    fn root_follows_tid_1500() {
        let report = report(false);
        let obj = parse(&build(&report).unwrap());
        assert_eq!(text(&obj, tags::SOP_CLASS_UID), COMPREHENSIVE_SR);
        assert_eq!(text(&obj, tags::MODALITY), "SR");
        assert_eq!(text(&obj, tags::VALUE_TYPE), "CONTAINER");
        assert_eq!(text(&obj, tags::CONTINUITY_OF_CONTENT), "SEPARATE");
        assert_eq!(
            coded(item(&obj, tags::CONCEPT_NAME_CODE_SEQUENCE)),
            ["126000", "DCM", "Imaging Measurement Report"]
        );
        assert_eq!(template_of(&obj), ("DCMR".into(), "1500".into()));
        assert_eq!(text(&obj, tags::SERIES_NUMBER), "3007");
        assert_eq!(
            text(&obj, tags::SERIES_DESCRIPTION),
            "NOT FOR DIAGNOSTIC USE: AI volumetry brats-unet"
        );
        assert_eq!(text(&obj, tags::PATIENT_NAME), PATIENT);
        assert_eq!(text(&obj, tags::STUDY_INSTANCE_UID), STUDY);

        let root = children(&obj);
        assert_eq!(root.len(), 11);
        is(&root[0], "HAS CONCEPT MOD", "CODE", LANGUAGE);
        assert_eq!(
            coded(item(&root[0], tags::CONCEPT_CODE_SEQUENCE)),
            ["en-US", "RFC5646", "English (United States)"]
        );
        is(&root[1], "HAS OBS CONTEXT", "CODE", OBSERVER_TYPE);
        assert_eq!(
            coded(item(&root[1], tags::CONCEPT_CODE_SEQUENCE)),
            ["121007", "DCM", "Device"]
        );
        is(&root[2], "HAS OBS CONTEXT", "UIDREF", DEVICE_OBSERVER_UID);
        // The classification SR's Device Observer UID for the same model.
        assert_eq!(text(&root[2], tags::UID), device_uid(&report.model));
        is(&root[3], "HAS OBS CONTEXT", "TEXT", DEVICE_OBSERVER_NAME);
        is(
            &root[4],
            "HAS OBS CONTEXT",
            "TEXT",
            DEVICE_OBSERVER_MANUFACTURER,
        );
        is(
            &root[5],
            "HAS OBS CONTEXT",
            "TEXT",
            DEVICE_OBSERVER_MODEL_NAME,
        );
        assert_eq!(text(&root[5], tags::TEXT_VALUE), "brats-unet");
        is(&root[6], "HAS CONCEPT MOD", "CODE", PROCEDURE_REPORTED);
        assert_eq!(
            coded(item(&root[6], tags::CONCEPT_CODE_SEQUENCE)),
            ["363679005", "SCT", "Imaging procedure"]
        );

        // The image library: a group per source series, an IMAGE item per instance.
        is(&root[7], "CONTAINS", "CONTAINER", IMAGE_LIBRARY);
        let library = children(&root[7]);
        assert_eq!(library.len(), 2);
        for (group, (_, instances)) in library.iter().zip(&report.source_series) {
            is(group, "CONTAINS", "CONTAINER", IMAGE_LIBRARY_GROUP);
            let images = children(group);
            assert_eq!(images.len(), instances.len());
            for (image, (class, uid)) in images.iter().zip(instances) {
                is(image, "CONTAINS", "IMAGE", SOURCE);
                let reference = item(image, tags::REFERENCED_SOP_SEQUENCE);
                assert_eq!(text(reference, tags::REFERENCED_SOP_CLASS_UID), *class);
                assert_eq!(text(reference, tags::REFERENCED_SOP_INSTANCE_UID), *uid);
                assert!(reference.element(tags::REFERENCED_SEGMENT_NUMBER).is_err());
            }
        }

        is(&root[8], "CONTAINS", "CONTAINER", IMAGING_MEASUREMENTS);
        assert_eq!(children(&root[8]).len(), 3);
        is(&root[9], "CONTAINS", "TEXT", USAGE);
        assert_eq!(text(&root[9], tags::TEXT_VALUE), NOT_FOR_DIAGNOSTIC_USE);
        is(&root[10], "CONTAINS", "TEXT", WARNING);
        assert_eq!(text(&root[10], tags::TEXT_VALUE), "Research prototype");

        // The evidence: both source series with their instances, then the SEG.
        let study = item(&obj, tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE);
        assert_eq!(text(study, tags::STUDY_INSTANCE_UID), STUDY);
        let series = items(study, tags::REFERENCED_SERIES_SEQUENCE);
        let listed: Vec<(String, Vec<(String, String)>)> = series
            .iter()
            .map(|s| {
                (
                    text(s, tags::SERIES_INSTANCE_UID),
                    items(s, tags::REFERENCED_SOP_SEQUENCE)
                        .iter()
                        .map(|i| {
                            (
                                text(i, tags::REFERENCED_SOP_CLASS_UID),
                                text(i, tags::REFERENCED_SOP_INSTANCE_UID),
                            )
                        })
                        .collect(),
                )
            })
            .collect();
        let mut expected = report.source_series.clone();
        expected.push((
            SEG_SERIES.into(),
            vec![(SEGMENTATION_STORAGE.into(), SEG_INSTANCE.into())],
        ));
        assert_eq!(listed, expected);
    }

    /// One TID 1411 group per segment: tracking, finding, algorithm, the referenced segment of the
    /// SEG, the source series, the volume (when known) and the voxel count.
    #[test]
    fn groups_follow_tid_1411() {
        let report = report(true);
        let bytes = build(&report).unwrap();
        let obj = parse(&bytes);
        let groups = groups(&obj);
        assert_eq!(groups.len(), report.measurements.len());
        let mut tracking = HashSet::new();
        for (group, m) in groups.iter().zip(&report.measurements) {
            is(group, "CONTAINS", "CONTAINER", MEASUREMENT_GROUP);
            assert_eq!(text(group, tags::CONTINUITY_OF_CONTENT), "SEPARATE");
            assert_eq!(template_of(group), ("DCMR".into(), "1411".into()));
            let items = children(group);
            assert_eq!(items.len(), if m.volume_ml.is_some() { 11 } else { 10 });

            is(&items[0], "HAS OBS CONTEXT", "TEXT", TRACKING_IDENTIFIER);
            assert_eq!(text(&items[0], tags::TEXT_VALUE), m.label);
            is(&items[1], "HAS OBS CONTEXT", "UIDREF", TRACKING_UID);
            let uid = text(&items[1], tags::UID);
            assert!(check_uid("tracking UID", &uid).is_ok() && uid.starts_with("2.25."));
            assert_eq!(uid, tracking_uid(&report.segmentation, m.segment_number));
            assert!(tracking.insert(uid), "tracking UIDs differ by segment");

            is(&items[2], "CONTAINS", "CODE", FINDING_CATEGORY);
            assert_eq!(
                coded(item(&items[2], tags::CONCEPT_CODE_SEQUENCE)),
                ["49755003", "SCT", "Morphologically Altered Structure"]
            );
            is(&items[3], "CONTAINS", "CODE", FINDING);
            assert_eq!(
                coded(item(&items[3], tags::CONCEPT_CODE_SEQUENCE)),
                [
                    m.finding.value.clone(),
                    m.finding.scheme.clone(),
                    m.finding.meaning.clone()
                ]
            );

            is(&items[4], "HAS CONCEPT MOD", "TEXT", ALGORITHM_NAME);
            assert_eq!(text(&items[4], tags::TEXT_VALUE), "brats-unet");
            is(&items[5], "HAS CONCEPT MOD", "TEXT", ALGORITHM_VERSION);
            assert_eq!(text(&items[5], tags::TEXT_VALUE), "2");
            is(&items[6], "HAS CONCEPT MOD", "TEXT", ALGORITHM_PARAMETERS);
            assert_eq!(text(&items[6], tags::TEXT_VALUE), format!("sha256:{SHA}"));

            is(&items[7], "CONTAINS", "IMAGE", REFERENCED_SEGMENT);
            let reference = item(&items[7], tags::REFERENCED_SOP_SEQUENCE);
            assert_eq!(
                text(reference, tags::REFERENCED_SOP_CLASS_UID),
                SEGMENTATION_STORAGE
            );
            assert_eq!(
                text(reference, tags::REFERENCED_SOP_INSTANCE_UID),
                SEG_INSTANCE
            );
            let number = reference.element(tags::REFERENCED_SEGMENT_NUMBER).unwrap();
            assert_eq!(number.vr(), VR::US);
            assert_eq!(number.to_int::<u16>().unwrap(), m.segment_number);

            is(
                &items[8],
                "CONTAINS",
                "UIDREF",
                SOURCE_SERIES_FOR_SEGMENTATION,
            );
            assert_eq!(text(&items[8], tags::UID), SERIES);

            let mut rest = items[9..].iter();
            if let Some(put) = m.volume_ml {
                let volume = rest.next().unwrap();
                is(volume, "CONTAINS", "NUM", VOLUME);
                let (value, units) = measured(volume);
                assert_eq!(value.parse::<f64>().unwrap(), put);
                assert_eq!(units, ["ml", "UCUM", "milliliter"]);
                let method = item(volume, tags::CONTENT_SEQUENCE);
                is(method, "HAS CONCEPT MOD", "CODE", MEASUREMENT_METHOD);
                assert_eq!(
                    coded(item(method, tags::CONCEPT_CODE_SEQUENCE)),
                    ["126030", "DCM", "Sum of segmented voxel method for volume"]
                );
            }
            let count = rest.next().unwrap();
            is(count, "CONTAINS", "NUM", VOXEL_COUNT);
            assert_eq!(
                measured(count),
                (
                    m.voxels.to_string(),
                    ["{voxels}".into(), "UCUM".into(), "voxels".into()]
                )
            );
            assert!(rest.next().is_none());
        }

        // A trained model: no usage restriction, the warning alone; no disclaimer.
        let root = children(&obj);
        let texts: Vec<_> = root
            .iter()
            .filter(|i| text(i, tags::VALUE_TYPE) == "TEXT" && shape(i).0 == "CONTAINS")
            .map(|i| (shape(i).2, text(i, tags::TEXT_VALUE)))
            .collect();
        assert_eq!(texts, [(triple(WARNING), "Research prototype".to_string())]);
        assert_eq!(
            text(&obj, tags::SERIES_DESCRIPTION),
            "AI volumetry brats-unet"
        );
        assert!(!String::from_utf8_lossy(&bytes).contains("NOT FOR DIAGNOSTIC USE"));
    }

    /// Every build is a new instance in a new series; the tracking UIDs stay those of the SEG's
    /// segments. The usage restriction is written once even when it is among the warnings.
    #[test]
    fn new_instance_each_build_same_tracking() {
        let mut report = report(false);
        report.warnings = vec![NOT_FOR_DIAGNOSTIC_USE.into(), " ".into()];
        let (a, b) = (
            parse(&build(&report).unwrap()),
            parse(&build(&report).unwrap()),
        );
        for tag in [tags::SOP_INSTANCE_UID, tags::SERIES_INSTANCE_UID] {
            assert_ne!(text(&a, tag), text(&b, tag));
            assert!(text(&a, tag).starts_with("2.25."));
        }
        let tracking = |obj: &InMemDicomObject| -> Vec<String> {
            groups(obj)
                .iter()
                .map(|g| text(&children(g)[1], tags::UID))
                .collect()
        };
        assert_eq!(tracking(&a), tracking(&b));
        let usage: Vec<_> = children(&a)
            .iter()
            .filter(|i| text(i, tags::VALUE_TYPE) == "TEXT" && shape(i).0 == "CONTAINS")
            .map(|i| shape(i).2)
            .collect();
        assert_eq!(usage, [triple(USAGE)]);
    }

    /// The SEG says which UIDs it was given, and numbers its segments as `segment_number` says.
    #[test]
    fn seg_ids_and_segment_numbers_are_the_segs() {
        let labels: Vec<u8> = (0..12).map(|p| (p % 3) as u8).collect();
        let seg_report = seg::SegReport {
            context: report(true).context,
            study_instance_uid: STUDY.into(),
            source_series_instance_uid: SERIES.into(),
            frame_of_reference_uid: "1.2.826.0.1.3680043.10.1234.4".into(),
            rows: 3,
            columns: 4,
            pixel_spacing: [1.0, 1.0],
            orientation: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            slice_thickness: Some(2.0),
            spacing_between_slices: None,
            frames: vec![seg::SegFrame {
                sop_class_uid: MR.into(),
                sop_instance_uid: instance(SERIES, 0),
                position: [0.0, 0.0, 0.0],
                labels,
            }],
            segments: ["one", "two", "both"]
                .iter()
                .zip([vec![1], vec![2], vec![1, 2]])
                .map(|(label, classes)| seg::SegmentSpec {
                    label: (*label).into(),
                    classes,
                    category: seg::Code::new(
                        "49755003",
                        "SCT",
                        "Morphologically Altered Structure",
                    ),
                    kind: seg::Code::new("108369006", "SCT", "Neoplasm"),
                    color: [1, 2, 3],
                })
                .collect(),
            referenced_series: vec![(SERIES.into(), vec![(MR.into(), instance(SERIES, 0))])],
            model: report(true).model,
            warnings: vec![],
        };
        let (bytes, ids) = seg::build_with_ids(&seg_report).unwrap();
        let obj = parse(&bytes);
        assert_eq!(text(&obj, tags::SOP_INSTANCE_UID), ids.sop_instance_uid);
        assert_eq!(
            text(&obj, tags::SERIES_INSTANCE_UID),
            ids.series_instance_uid
        );
        assert_eq!(text(&obj, tags::SOP_CLASS_UID), SEGMENTATION_STORAGE);
        for (i, segment) in items(&obj, tags::SEGMENT_SEQUENCE).iter().enumerate() {
            assert_eq!(
                Some(
                    segment
                        .element(tags::SEGMENT_NUMBER)
                        .unwrap()
                        .to_int::<u16>()
                        .unwrap()
                ),
                seg::segment_number(i)
            );
            assert_eq!(
                text(segment, tags::SEGMENT_LABEL),
                seg_report.segments[i].label
            );
        }
        // `build` is `build_with_ids` without the identity.
        assert!(
            parse(&seg::build(&seg_report).unwrap())
                .element(tags::SEGMENT_SEQUENCE)
                .is_ok()
        );
        assert_eq!(seg::segment_number(0), Some(1));
        assert_eq!(seg::segment_number(65_534), Some(65_535));
        assert_eq!(seg::segment_number(65_535), None);
        assert_eq!(seg::segment_number(usize::MAX), None);
    }

    /// Each breakage is refused with a message naming what is wrong (the fragment), and no
    /// message carries the patient data of the context.
    #[test]
    fn invalid_reports_are_refused_without_patient_data() {
        type Breakage = Box<dyn Fn(&mut MeasurementReport)>;
        let cases: Vec<(&str, Breakage)> = vec![
            (
                "study UID",
                Box::new(|r| r.study_instance_uid = "1.2.x".into()),
            ),
            (
                "differs",
                Box::new(|r| r.study_instance_uid = "1.2.3".into()),
            ),
            (
                "SEG SOP Instance UID",
                Box::new(|r| r.segmentation.sop_instance_uid = "".into()),
            ),
            (
                "SEG Series Instance UID",
                Box::new(|r| r.segmentation.series_instance_uid = "2.25.01x".into()),
            ),
            ("no source series", Box::new(|r| r.source_series.clear())),
            (
                "UID of source series 1",
                Box::new(|r| r.source_series[1].0 = "1..2".into()),
            ),
            (
                "source series 1 is listed twice",
                Box::new(|r| r.source_series[1].0 = SERIES.into()),
            ),
            (
                "source series 0 is the SEG's series",
                Box::new(|r| r.source_series[0].0 = SEG_SERIES.into()),
            ),
            (
                "source series 1 has no instances",
                Box::new(|r| r.source_series[1].1.clear()),
            ),
            (
                "SOP Class UID of instance 2 of source series 0",
                Box::new(|r| r.source_series[0].1[2].0 = "MR".into()),
            ),
            (
                "instance 0 of source series 1 is listed twice",
                Box::new(|r| r.source_series[1].1[0].1 = instance(SERIES, 0)),
            ),
            (
                "SEG SOP Instance UID is among",
                Box::new(|r| r.source_series[1].1[0].1 = SEG_INSTANCE.into()),
            ),
            ("no measurements", Box::new(|r| r.measurements.clear())),
            (
                "measurement 1: segment numbers are 1-based",
                Box::new(|r| r.measurements[1].segment_number = 0),
            ),
            (
                "measurement 2: its segment number is measured twice",
                Box::new(|r| r.measurements[2].segment_number = 1),
            ),
            (
                "measurement 0: the label is empty",
                Box::new(|r| r.measurements[0].label = " \n".into()),
            ),
            (
                "measurement 1: the finding: the code value",
                Box::new(|r| r.measurements[1].finding.value = "1".repeat(17)),
            ),
            (
                "measurement 2: the category: the code value",
                Box::new(|r| r.measurements[2].category.scheme = "S\\CT".into()),
            ),
            (
                "measurement 0: the finding: the code meaning",
                Box::new(|r| r.measurements[0].finding.meaning = "".into()),
            ),
            (
                "measurement 1: the voxel count",
                Box::new(|r| r.measurements[1].voxels = u64::MAX),
            ),
            (
                "measurement 0: the volume",
                Box::new(|r| r.measurements[0].volume_ml = Some(f64::NAN)),
            ),
            (
                "measurement 1: the volume",
                Box::new(|r| r.measurements[1].volume_ml = Some(-1.0)),
            ),
            (
                "measurement 1: the volume",
                Box::new(|r| r.measurements[1].volume_ml = Some(1e300)),
            ),
            ("SHA-256", Box::new(|r| r.model.sha256 = "abc".into())),
            ("model name", Box::new(|r| r.model.name = "".into())),
            ("or version", Box::new(|r| r.model.version = " ".into())),
        ];
        for (fragment, break_it) in cases {
            let mut report = report(false);
            break_it(&mut report);
            let error = build(&report).expect_err(fragment);
            assert!(error.contains(fragment), "{fragment}: {error}");
            assert!(!error.contains("PHI"), "{fragment}: {error}");
        }
        // A zero volume and the largest voxel count are fine.
        let mut report = report(false);
        report.measurements[0].volume_ml = Some(0.0);
        report.measurements[1].voxels = MAX_VOXELS;
        assert!(build(&report).is_ok());
    }
}
