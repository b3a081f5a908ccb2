//! The Segmentation instance (SOP Class 1.2.840.10008.5.1.4.1.1.66.4, PS3.3 A.51) of a segmented
//! MR series, as a DICOM Part 10 file in explicit VR little endian.
//!
//! The instance is a new series in the source study: the Patient, General Study and Patient Study
//! attributes are copied from the source instance ([`SegReport::context`]) exactly as the SR does
//! ([`super::sr`]), Type 2 attributes the source lacks are written empty. It is a BINARY
//! segmentation on the grid of the reference series:
//!
//! - one segment ([`SegmentSpec`]) per class of the model's label map or region (a union of
//!   classes), numbered 1.. in the order given, with its coded category and type, the algorithm
//!   (DCM 123110 Artificial Intelligence; name, version, "sha256:<hex>") and its colour as
//!   Recommended Display CIELab Value (sRGB → CIE XYZ → CIELab D65, scaled as PS3.3 C.10.7.1.1,
//!   the same formulas as highdicom's `CIELabColor.from_rgb`);
//! - one frame per (segment, source slice) where the segment has at least one pixel, ordered by
//!   segment then slice; a segment with no pixel anywhere gets one all-zero frame on the first
//!   slice, so that every declared segment is present and reads as empty;
//! - frames are 1 bit a pixel, packed bit-contiguously across frames (PS3.5 8.1.1: the first
//!   pixel in the least significant bit of the first byte, no padding between frames), the value
//!   padded to an even length;
//! - each frame names its source instance (Derivation Image Sequence, Spatial Locations Preserved
//!   YES), its segment (Segment Identification) and its position (Plane Position (Patient)); the
//!   dimensions are Referenced Segment Number then Image Position (Patient), whose index is the
//!   1-based slice number in [`SegReport::frames`] order;
//! - the shared Pixel Measures carry the Slice Thickness, which the macro requires: the source's,
//!   else the spacing between slices, else the distance between adjacent slices (an error when
//!   none is known: one slice and neither value);
//! - the Common Instance Reference module lists every series the result was computed from.
//!
//! Each frame of [`SegReport::frames`] derives from one single-frame source instance (no
//! Referenced Frame Number is written), so two frames may not share a source instance nor a
//! position. The Content Creator's Name is "BrainAI Serve^" (the caret keeps dciodvfy from
//! reading a name with a space as the retired Person Name form).
//!
//! A model that is not clinically trained is labelled "NOT FOR DIAGNOSTIC USE" in the Series
//! Description, the Content Description and the Image Comments (which also carry the warnings).
//! UIDs are `2.25.` UUID-derived UIDs (RFC 9562 version 8): 128 bits of a SHA-256 over the source
//! series, the model, the slices and a per-call nonce.
//!
//! Nothing here logs or panics; error messages never carry attribute values of the context
//! (patient data), only field names and indices.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use dicom_core::{DataElement, PrimitiveValue, Tag, VR, dicom_value};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_object::mem::InMemElement;
use sha2::{Digest, Sha256};

use super::sr::{
    MANUFACTURER, NOT_FOR_DIAGNOSTIC_USE, Now, check_uid, el, lo, part10, printable, seq, st,
    study_of, uid_from,
};

/// Segmentation Storage.
pub const SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";
/// Content Label (CS) of every instance.
pub const CONTENT_LABEL: &str = "BRAINAI";
/// Added to the source's Series Number for the new series (the SR uses 1000).
pub const SERIES_NUMBER_OFFSET: i64 = 2000;

/// Algorithm Family of the segments: the code highdicom's examples use for AI/ML algorithms
/// (`codes.DCM.ArtificialIntelligence`).
const ARTIFICIAL_INTELLIGENCE: (&str, &str, &str) = ("123110", "DCM", "Artificial Intelligence");
/// Purpose of Reference of a Source Image Sequence item.
const SOURCE_IMAGE: (&str, &str, &str) = (
    "121322",
    "DCM",
    "Source image for image processing operation",
);
/// Derivation Code of the frames.
const SEGMENTATION: (&str, &str, &str) = ("113076", "DCM", "Segmentation");

/// A coded concept (e.g. SNOMED CT: value "79654002", scheme "SCT", meaning "Edema").
#[derive(Debug, Clone, PartialEq)]
pub struct Code {
    pub value: String,
    pub scheme: String,
    pub meaning: String,
}

impl Code {
    pub fn new(value: &str, scheme: &str, meaning: &str) -> Self {
        Code {
            value: value.into(),
            scheme: scheme.into(),
            meaning: meaning.into(),
        }
    }
}

/// One segment of the object: a class of the label map, or a region (a union of classes).
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentSpec {
    /// Segment Label, e.g. "edema", "whole_tumor".
    pub label: String,
    /// Label-map values that belong to it (one value for a class).
    pub classes: Vec<u8>,
    /// Segmented Property Category.
    pub category: Code,
    /// Segmented Property Type.
    pub kind: Code,
    /// sRGB; written as Recommended Display CIELab Value.
    pub color: [u8; 3],
}

/// One segmented reference slice: the source instance its frame derives from, and its label map.
#[derive(Debug, Clone, PartialEq)]
pub struct SegFrame {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// Image Position (Patient) of the source slice.
    pub position: [f64; 3],
    /// rows × columns label map, row-major, values index the model's labels.
    pub labels: Vec<u8>,
}

/// Everything the SEG object says.
#[derive(Debug, Clone, PartialEq)]
pub struct SegReport {
    /// Patient and study attributes of the source, copied as the SR copies them.
    pub context: crate::input::dicom::PatientContext,
    pub study_instance_uid: String,
    /// The reference series the frames derive from.
    pub source_series_instance_uid: String,
    pub frame_of_reference_uid: String,
    pub rows: u32,
    pub columns: u32,
    /// DICOM order: row spacing, column spacing (mm).
    pub pixel_spacing: [f64; 2],
    /// Image Orientation (Patient).
    pub orientation: [f64; 6],
    pub slice_thickness: Option<f64>,
    pub spacing_between_slices: Option<f64>,
    /// Segmented reference slices, in slice order.
    pub frames: Vec<SegFrame>,
    pub segments: Vec<SegmentSpec>,
    /// Every series the result was computed from (the reference series first), each with its
    /// instances as (SOP Class UID, SOP Instance UID): the Referenced Series Sequence.
    pub referenced_series: Vec<(String, Vec<(String, String)>)>,
    pub model: super::ModelIdentity,
    pub warnings: Vec<String>,
}

/// A frame of the instance: which segment, on which slice (indices into the report).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Planned {
    segment: usize,
    slice: usize,
}

/// The identity of a built SEG instance, which a measurement report ([`super::measurement`])
/// references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegIds {
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
}

/// The Segment Number of `report.segments[index]`: segments are numbered 1.. in the order of
/// [`SegReport::segments`] (at most 65535 of them, which [`build`] checks); `None` past that.
pub fn segment_number(index: usize) -> Option<u16> {
    index.checked_add(1).and_then(|n| u16::try_from(n).ok())
}

/// The SEG instance as DICOM Part 10 bytes (explicit VR little endian).
pub fn build(report: &SegReport) -> Result<Vec<u8>, String> {
    build_with_ids(report).map(|(bytes, _)| bytes)
}

/// The SEG instance as DICOM Part 10 bytes (explicit VR little endian), with the Series and SOP
/// Instance UIDs it was given.
pub fn build_with_ids(report: &SegReport) -> Result<(Vec<u8>, SegIds), String> {
    check(report)?;
    let context = &report.context.0;
    let now = Now::utc();
    let uids = fresh_uids(report);

    let (study_uid, source_series_number) = study_of(context, &report.study_instance_uid)?;

    let thickness = slice_thickness(report)?;
    let members = memberships(&report.segments);
    let planned = plan(report, &members);
    let pixel_data = pack(report, &members, &planned)?;

    let model = &report.model;
    let trained = model.clinically_trained;
    let mut obj = InMemDicomObject::new_empty();

    // SOP Common.
    obj.put(el(tags::SOP_CLASS_UID, VR::UI, SEGMENTATION_STORAGE));
    obj.put(el(tags::SOP_INSTANCE_UID, VR::UI, &uids.instance));
    obj.put(el(tags::INSTANCE_CREATION_DATE, VR::DA, &now.date));
    obj.put(el(tags::INSTANCE_CREATION_TIME, VR::TM, &now.time));

    // General Series, Segmentation Series.
    obj.put(el(tags::MODALITY, VR::CS, "SEG"));
    obj.put(el(tags::SERIES_INSTANCE_UID, VR::UI, &uids.series));
    obj.put(el(
        tags::SERIES_NUMBER,
        VR::IS,
        &(source_series_number + SERIES_NUMBER_OFFSET).to_string(),
    ));
    obj.put(el(tags::SERIES_DATE, VR::DA, &now.date));
    obj.put(el(tags::SERIES_TIME, VR::TM, &now.time));
    // The disclaimer first, so that truncation to 64 characters (LO) keeps it.
    let description = if trained {
        format!("AI segmentation {}", model.name)
    } else {
        format!("NOT FOR DIAGNOSTIC USE: AI segmentation {}", model.name)
    };
    obj.put(el(tags::SERIES_DESCRIPTION, VR::LO, &lo(&description)));

    // Frame of Reference.
    obj.put(el(
        tags::FRAME_OF_REFERENCE_UID,
        VR::UI,
        &report.frame_of_reference_uid,
    ));
    obj.put(DataElement::new(
        tags::POSITION_REFERENCE_INDICATOR,
        VR::LO,
        PrimitiveValue::Empty,
    ));

    // General Equipment, Enhanced General Equipment.
    obj.put(el(tags::MANUFACTURER, VR::LO, MANUFACTURER));
    obj.put(el(tags::MANUFACTURER_MODEL_NAME, VR::LO, &lo(&model.name)));
    obj.put(el(
        tags::DEVICE_SERIAL_NUMBER,
        VR::LO,
        &model.sha256.to_ascii_lowercase(),
    ));
    obj.put(el(tags::SOFTWARE_VERSIONS, VR::LO, &lo(&model.version)));

    // General Image.
    obj.put(el(tags::INSTANCE_NUMBER, VR::IS, "1"));
    obj.put(el(tags::CONTENT_DATE, VR::DA, &now.date));
    obj.put(el(tags::CONTENT_TIME, VR::TM, &now.time));
    obj.put(DataElement::new(
        tags::IMAGE_TYPE,
        VR::CS,
        dicom_value!(Strs, ["DERIVED", "PRIMARY"]),
    ));
    obj.put(el(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"));
    obj.put(el(tags::BURNED_IN_ANNOTATION, VR::CS, "NO"));
    if let Some(comments) = image_comments(report) {
        obj.put(el(tags::IMAGE_COMMENTS, VR::LT, &comments));
    }

    // Image Pixel.
    obj.put(us(tags::SAMPLES_PER_PIXEL, 1));
    obj.put(el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"));
    // Both are at most 65535 (checked).
    obj.put(us(tags::ROWS, report.rows as u16));
    obj.put(us(tags::COLUMNS, report.columns as u16));
    obj.put(us(tags::BITS_ALLOCATED, 1));
    obj.put(us(tags::BITS_STORED, 1));
    obj.put(us(tags::HIGH_BIT, 0));
    obj.put(us(tags::PIXEL_REPRESENTATION, 0));

    // Segmentation Image.
    obj.put(el(tags::SEGMENTATION_TYPE, VR::CS, "BINARY"));
    obj.put(el(
        tags::SEGMENTS_OVERLAP,
        VR::CS,
        if overlap(&members) { "YES" } else { "NO" },
    ));
    obj.put(el(tags::CONTENT_LABEL, VR::CS, CONTENT_LABEL));
    obj.put(el(tags::CONTENT_DESCRIPTION, VR::LO, &lo(&description)));
    obj.put(el(
        tags::CONTENT_CREATOR_NAME,
        VR::PN,
        &format!("{MANUFACTURER}^"),
    ));
    obj.put(seq(
        tags::SEGMENT_SEQUENCE,
        report
            .segments
            .iter()
            .enumerate()
            .map(|(i, segment)| segment_item(i, segment, report))
            .collect(),
    ));

    // Multi-frame Functional Groups.
    obj.put(el(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        &planned.len().to_string(),
    ));
    obj.put(seq(
        tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
        vec![shared_groups(report, thickness)],
    ));
    obj.put(seq(
        tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
        planned
            .iter()
            .map(|frame| frame_groups(report, *frame))
            .collect(),
    ));

    // Multi-frame Dimension.
    obj.put(seq(
        tags::DIMENSION_ORGANIZATION_SEQUENCE,
        vec![InMemDicomObject::from_element_iter([el(
            tags::DIMENSION_ORGANIZATION_UID,
            VR::UI,
            &uids.dimensions,
        )])],
    ));
    obj.put(seq(
        tags::DIMENSION_INDEX_SEQUENCE,
        vec![
            dimension(
                &uids.dimensions,
                tags::REFERENCED_SEGMENT_NUMBER,
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                "Segment Number",
            ),
            dimension(
                &uids.dimensions,
                tags::IMAGE_POSITION_PATIENT,
                tags::PLANE_POSITION_SEQUENCE,
                "Image Position Patient",
            ),
        ],
    ));

    // Common Instance Reference: every series is in the study of the instance.
    obj.put(seq(
        tags::REFERENCED_SERIES_SEQUENCE,
        report
            .referenced_series
            .iter()
            .map(|(series, instances)| {
                InMemDicomObject::from_element_iter([
                    el(tags::SERIES_INSTANCE_UID, VR::UI, series),
                    seq(
                        tags::REFERENCED_INSTANCE_SEQUENCE,
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
            .collect(),
    ));

    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from(pixel_data),
    ));

    let bytes = part10(
        obj,
        context,
        &study_uid,
        "SEG",
        planned.len() * 512 + (64 << 10),
    )?;
    let ids = SegIds {
        series_instance_uid: uids.series,
        sop_instance_uid: uids.instance,
    };
    Ok((bytes, ids))
}

/// Refuses reports that would make an invalid instance. Messages name the field and indices,
/// never a value from the context.
fn check(report: &SegReport) -> Result<(), String> {
    check_uid("study UID", &report.study_instance_uid)?;
    check_uid("source series UID", &report.source_series_instance_uid)?;
    check_uid("Frame of Reference UID", &report.frame_of_reference_uid)?;

    if !(1..=65_535).contains(&report.rows) || !(1..=65_535).contains(&report.columns) {
        return Err("rows and columns must be 1 to 65535".into());
    }
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if !report.pixel_spacing.iter().all(|&v| positive(v)) {
        return Err("the pixel spacing is not two finite positive values".into());
    }
    if report.slice_thickness.is_some_and(|v| !positive(v)) {
        return Err("the slice thickness is not a finite positive value".into());
    }
    if report.spacing_between_slices.is_some_and(|v| !positive(v)) {
        return Err("the spacing between slices is not a finite positive value".into());
    }
    check_orientation(&report.orientation)?;

    if report.frames.is_empty() {
        return Err("the report has no frames".into());
    }
    let pixels = report.rows as usize * report.columns as usize;
    let mut instances = HashSet::new();
    let mut positions = HashSet::new();
    for (i, frame) in report.frames.iter().enumerate() {
        check_uid(&format!("SOP Class UID of frame {i}"), &frame.sop_class_uid)?;
        check_uid(
            &format!("SOP Instance UID of frame {i}"),
            &frame.sop_instance_uid,
        )?;
        if frame.labels.len() != pixels {
            return Err(format!(
                "frame {i}: the label map has {} values, not rows × columns = {pixels}",
                frame.labels.len()
            ));
        }
        if !frame.position.iter().all(|v| v.is_finite()) {
            return Err(format!("frame {i}: the position is not finite"));
        }
        if !instances.insert(frame.sop_instance_uid.as_str()) {
            return Err(format!(
                "frame {i} derives from the same source instance as an earlier frame"
            ));
        }
        // +0.0 for -0.0, so that equal positions compare equal.
        if !positions.insert(frame.position.map(|v| (v + 0.0).to_bits())) {
            return Err(format!(
                "frame {i} has the same position as an earlier frame"
            ));
        }
    }

    if report.segments.is_empty() {
        return Err("the report has no segments".into());
    }
    if report.segments.len() > 65_535 {
        return Err("the report has more than 65535 segments".into());
    }
    for (i, segment) in report.segments.iter().enumerate() {
        if lo(&segment.label).is_empty() {
            return Err(format!("segment {i}: the label is empty"));
        }
        if segment.classes.is_empty() {
            return Err(format!("segment {i}: no label-map class belongs to it"));
        }
        check_code(&format!("segment {i}: the category"), &segment.category)?;
        check_code(&format!("segment {i}: the type"), &segment.kind)?;
    }

    check_references(report)?;

    let sha = &report.model.sha256;
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("the model SHA-256 is not 64 hexadecimal digits".into());
    }
    if lo(&report.model.name).is_empty() || lo(&report.model.version).is_empty() {
        return Err("the model name or version is empty".into());
    }
    Ok(())
}

/// Two unit direction cosines, orthogonal (with a tolerance for rounded source values).
fn check_orientation(orientation: &[f64; 6]) -> Result<(), String> {
    let error = || Err("the orientation is not two orthogonal unit vectors".into());
    if !orientation.iter().all(|v| v.is_finite()) {
        return error();
    }
    let (row, column) = (&orientation[..3], &orientation[3..]);
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let unit = |a: &[f64]| (dot(a, a).sqrt() - 1.0).abs() < 1e-2;
    if unit(row) && unit(column) && dot(row, column).abs() < 1e-2 {
        Ok(())
    } else {
        error()
    }
}

/// Code Value and Coding Scheme Designator are SH (16 characters), Code Meaning is LO.
fn check_code(what: &str, code: &Code) -> Result<(), String> {
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

/// The referenced series: the source series first, every series and instance once, each series
/// with an instance, every frame's source instance in the source series.
fn check_references(report: &SegReport) -> Result<(), String> {
    let Some((first, source_instances)) = report.referenced_series.first() else {
        return Err("the report references no series".into());
    };
    if *first != report.source_series_instance_uid {
        return Err("the first referenced series is not the source series".into());
    }
    let mut series = HashSet::new();
    let mut instances = HashSet::new();
    for (i, (uid, members)) in report.referenced_series.iter().enumerate() {
        check_uid(&format!("UID of referenced series {i}"), uid)?;
        if !series.insert(uid.as_str()) {
            return Err(format!("referenced series {i} is listed twice"));
        }
        if members.is_empty() {
            return Err(format!("referenced series {i} has no instances"));
        }
        for (j, (class, instance)) in members.iter().enumerate() {
            check_uid(
                &format!("SOP Class UID of instance {j} of referenced series {i}"),
                class,
            )?;
            check_uid(
                &format!("SOP Instance UID of instance {j} of referenced series {i}"),
                instance,
            )?;
            if !instances.insert(instance.as_str()) {
                return Err(format!(
                    "instance {j} of referenced series {i} is listed twice"
                ));
            }
        }
    }
    for (i, frame) in report.frames.iter().enumerate() {
        let listed = source_instances.iter().any(|(class, instance)| {
            *class == frame.sop_class_uid && *instance == frame.sop_instance_uid
        });
        if !listed {
            return Err(format!(
                "frame {i}: its source instance is not among the source series' referenced \
                 instances (with the same SOP Class UID)"
            ));
        }
    }
    Ok(())
}

/// For each segment, which of the 256 label-map values belong to it.
fn memberships(segments: &[SegmentSpec]) -> Vec<[bool; 256]> {
    segments
        .iter()
        .map(|segment| {
            let mut member = [false; 256];
            for &class in &segment.classes {
                member[usize::from(class)] = true;
            }
            member
        })
        .collect()
}

/// Whether two segments share a class (a region and its classes do).
fn overlap(members: &[[bool; 256]]) -> bool {
    (0..256).any(|value| members.iter().filter(|m| m[value]).count() > 1)
}

/// The frames, ordered by segment then slice: each slice where the segment has a pixel, or the
/// first slice alone (all zero) when it has none.
fn plan(report: &SegReport, members: &[[bool; 256]]) -> Vec<Planned> {
    let mut planned = vec![];
    for (segment, member) in members.iter().enumerate() {
        let before = planned.len();
        for (slice, frame) in report.frames.iter().enumerate() {
            if frame.labels.iter().any(|&v| member[usize::from(v)]) {
                planned.push(Planned { segment, slice });
            }
        }
        if planned.len() == before {
            planned.push(Planned { segment, slice: 0 });
        }
    }
    planned
}

/// The Pixel Data value: one bit a pixel, the first pixel of the first frame in the least
/// significant bit of the first byte, frames contiguous (no padding between them), padded with
/// zero to an even length.
fn pack(
    report: &SegReport,
    members: &[[bool; 256]],
    planned: &[Planned],
) -> Result<Vec<u8>, String> {
    let pixels = report.rows as usize * report.columns as usize;
    let too_large = || "the segmentation is too large for one Pixel Data value".to_string();
    let bits = planned.len().checked_mul(pixels).ok_or_else(too_large)?;
    let bytes = bits.div_ceil(8);
    let bytes = bytes + bytes % 2;
    if bytes > (u32::MAX - 1) as usize {
        return Err(too_large());
    }
    let mut data = vec![0u8; bytes];
    for (n, frame) in planned.iter().enumerate() {
        let member = &members[frame.segment];
        let offset = n * pixels;
        for (p, &value) in report.frames[frame.slice].labels.iter().enumerate() {
            if member[usize::from(value)] {
                let bit = offset + p;
                data[bit / 8] |= 1 << (bit % 8);
            }
        }
    }
    Ok(data)
}

/// The Segment Sequence item of segment `index` (Segment Number `index + 1`).
fn segment_item(index: usize, segment: &SegmentSpec, report: &SegReport) -> InMemDicomObject {
    let model = &report.model;
    let classes = segment
        .classes
        .iter()
        .map(u8::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let description = if segment.classes.len() == 1 {
        format!("Label-map class {classes}")
    } else {
        format!("Union of label-map classes {classes}")
    };
    let algorithm = InMemDicomObject::from_element_iter([
        seq(
            tags::ALGORITHM_FAMILY_CODE_SEQUENCE,
            vec![coded(ARTIFICIAL_INTELLIGENCE)],
        ),
        el(tags::ALGORITHM_NAME, VR::LO, &lo(&model.name)),
        el(tags::ALGORITHM_VERSION, VR::LO, &lo(&model.version)),
        el(
            tags::ALGORITHM_PARAMETERS,
            VR::LT,
            &format!("sha256:{}", model.sha256.to_ascii_lowercase()),
        ),
    ]);
    let [l, a, b] = cielab(segment.color);
    InMemDicomObject::from_element_iter([
        // At most 65535 segments (checked).
        us(tags::SEGMENT_NUMBER, (index + 1) as u16),
        el(tags::SEGMENT_LABEL, VR::LO, &lo(&segment.label)),
        el(tags::SEGMENT_DESCRIPTION, VR::ST, &st(&description)),
        seq(
            tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
            vec![code_item(&segment.category)],
        ),
        seq(
            tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE,
            vec![code_item(&segment.kind)],
        ),
        el(tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC"),
        el(tags::SEGMENT_ALGORITHM_NAME, VR::LO, &lo(&model.name)),
        seq(
            tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE,
            vec![algorithm],
        ),
        DataElement::new(
            tags::RECOMMENDED_DISPLAY_CIE_LAB_VALUE,
            VR::US,
            dicom_value!(U16, [l, a, b]),
        ),
    ])
}

/// Slice Thickness, which the Pixel Measures macro requires (Type 1C, the frames being neither
/// DISTORTED nor SAMPLED): the source's; when the source has none, the spacing between slices;
/// else the smallest distance between adjacent slices along the normal of the slices.
fn slice_thickness(report: &SegReport) -> Result<f64, String> {
    if let Some(thickness) = report.slice_thickness.or(report.spacing_between_slices) {
        return Ok(thickness);
    }
    let o = &report.orientation;
    let normal = [
        o[1] * o[5] - o[2] * o[4],
        o[2] * o[3] - o[0] * o[5],
        o[0] * o[4] - o[1] * o[3],
    ];
    let along = |p: &[f64; 3]| p.iter().zip(normal).map(|(a, b)| a * b).sum::<f64>();
    report
        .frames
        .windows(2)
        .map(|pair| (along(&pair[1].position) - along(&pair[0].position)).abs())
        .filter(|d| d.is_finite() && *d > 1e-6)
        .min_by(f64::total_cmp)
        .ok_or_else(|| {
            "the slice thickness is unknown: no slice thickness, no spacing between slices, \
             and no two slices apart"
                .to_string()
        })
}

/// Shared Functional Groups: Plane Orientation (Patient) and Pixel Measures.
fn shared_groups(report: &SegReport, thickness: f64) -> InMemDicomObject {
    let mut measures = InMemDicomObject::from_element_iter([ds_element(
        tags::PIXEL_SPACING,
        &report.pixel_spacing,
    )]);
    measures.put(ds_element(tags::SLICE_THICKNESS, &[thickness]));
    if let Some(spacing) = report.spacing_between_slices {
        measures.put(ds_element(tags::SPACING_BETWEEN_SLICES, &[spacing]));
    }
    InMemDicomObject::from_element_iter([
        seq(
            tags::PLANE_ORIENTATION_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([ds_element(
                tags::IMAGE_ORIENTATION_PATIENT,
                &report.orientation,
            )])],
        ),
        seq(tags::PIXEL_MEASURES_SEQUENCE, vec![measures]),
    ])
}

/// The Per-frame Functional Groups item of a frame.
fn frame_groups(report: &SegReport, frame: Planned) -> InMemDicomObject {
    let source = &report.frames[frame.slice];
    // At most 65535 segments; slices are fewer than 2^32 (the frames fit a Pixel Data value).
    let segment_number = (frame.segment + 1) as u16;
    let source_image = InMemDicomObject::from_element_iter([
        el(
            tags::REFERENCED_SOP_CLASS_UID,
            VR::UI,
            &source.sop_class_uid,
        ),
        el(
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            &source.sop_instance_uid,
        ),
        seq(
            tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
            vec![coded(SOURCE_IMAGE)],
        ),
        el(tags::SPATIAL_LOCATIONS_PRESERVED, VR::CS, "YES"),
    ]);
    let derivation = InMemDicomObject::from_element_iter([
        seq(tags::DERIVATION_CODE_SEQUENCE, vec![coded(SEGMENTATION)]),
        seq(tags::SOURCE_IMAGE_SEQUENCE, vec![source_image]),
    ]);
    InMemDicomObject::from_element_iter([
        seq(tags::DERIVATION_IMAGE_SEQUENCE, vec![derivation]),
        seq(
            tags::FRAME_CONTENT_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([DataElement::new(
                tags::DIMENSION_INDEX_VALUES,
                VR::UL,
                dicom_value!(U32, [u32::from(segment_number), frame.slice as u32 + 1]),
            )])],
        ),
        seq(
            tags::PLANE_POSITION_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([ds_element(
                tags::IMAGE_POSITION_PATIENT,
                &source.position,
            )])],
        ),
        seq(
            tags::SEGMENT_IDENTIFICATION_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([us(
                tags::REFERENCED_SEGMENT_NUMBER,
                segment_number,
            )])],
        ),
    ])
}

/// A Dimension Index Sequence item.
fn dimension(organization: &str, index: Tag, group: Tag, label: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        el(tags::DIMENSION_ORGANIZATION_UID, VR::UI, organization),
        DataElement::new(
            tags::DIMENSION_INDEX_POINTER,
            VR::AT,
            dicom_value!(Tags, [index]),
        ),
        DataElement::new(
            tags::FUNCTIONAL_GROUP_POINTER,
            VR::AT,
            dicom_value!(Tags, [group]),
        ),
        el(tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label),
    ])
}

/// Image Comments (LT): the usage restriction of an untrained model, then the warnings.
fn image_comments(report: &SegReport) -> Option<String> {
    let trained = report.model.clinically_trained;
    let mut parts: Vec<&str> = vec![];
    if !trained {
        parts.push(NOT_FOR_DIAGNOSTIC_USE);
    }
    for warning in &report.warnings {
        let written = !trained && warning == NOT_FOR_DIAGNOSTIC_USE;
        if !warning.trim().is_empty() && !written {
            parts.push(warning);
        }
    }
    if parts.is_empty() {
        None
    } else {
        Some(printable(&parts.join("\n")).chars().take(10_240).collect())
    }
}

// Elements and values.

fn us(tag: Tag, value: u16) -> InMemElement {
    DataElement::new(tag, VR::US, dicom_value!(U16, [value]))
}

fn coded((value, scheme, meaning): (&str, &str, &str)) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        el(tags::CODE_VALUE, VR::SH, value),
        el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
        el(tags::CODE_MEANING, VR::LO, meaning),
    ])
}

fn code_item(code: &Code) -> InMemDicomObject {
    coded((code.value.trim(), code.scheme.trim(), &lo(&code.meaning)))
}

/// A multi-valued Decimal String element of finite values (checked).
fn ds_element(tag: Tag, values: &[f64]) -> InMemElement {
    DataElement::new(
        tag,
        VR::DS,
        PrimitiveValue::Strs(values.iter().map(|&v| ds(v)).collect()),
    )
}

/// A Decimal String (16 bytes at most) for a finite value: the shortest representation that
/// reads back as the same `f64` when it fits, else the closest of the fixed and the exponent
/// forms that fit.
fn ds(value: f64) -> String {
    let value = value + 0.0;
    let plain = format!("{value}");
    if plain.len() <= 16 {
        return plain;
    }
    let fixed = (0..=16).rev().map(|p| {
        let s = format!("{value:.p$}");
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    });
    let exponent = (0..=16)
        .rev()
        .map(|p| format!("{value:.p$e}").replace('e', "E"));
    let error = |s: &String| {
        s.parse::<f64>()
            .map_or(f64::INFINITY, |v| (v - value).abs())
    };
    [
        fixed.into_iter().find(|s| s.len() <= 16),
        exponent.into_iter().find(|s| s.len() <= 16),
    ]
    .into_iter()
    .flatten()
    .min_by(|a, b| error(a).total_cmp(&error(b)))
    .unwrap_or_else(|| "0".into())
}

/// sRGB → CIELab (D65) → the DICOM scaled triplet (PS3.3 C.10.7.1.1): L* 0..100 and a*, b*
/// -128..127 scaled linearly to 0..65535, rounded half to even (as highdicom's `CIELabColor`).
pub(crate) fn cielab([r, g, b]: [u8; 3]) -> [u16; 3] {
    let linear = |c: u8| {
        let c = f64::from(c) / 255.0;
        let c = if c > 0.04045 {
            ((c + 0.055) / 1.055).powf(2.4)
        } else {
            c / 12.92
        };
        c * 100.0
    };
    let (r, g, b) = (linear(r), linear(g), linear(b));
    let x = r * 0.4124 + g * 0.3576 + b * 0.1805;
    let y = r * 0.2126 + g * 0.7152 + b * 0.0722;
    let z = r * 0.0193 + g * 0.1192 + b * 0.9505;
    let f = |t: f64| {
        if t >= 8.856_451_679_035_63e-3 {
            t.cbrt()
        } else {
            (841.0 / 108.0) * t + 4.0 / 29.0
        }
    };
    let (fx, fy, fz) = (f(x / 95.047), f(y / 100.0), f(z / 108.883));
    let l = (116.0 * fy - 16.0).clamp(0.0, 100.0);
    let a = (500.0 * (fx - fy)).clamp(-128.0, 127.0);
    let b = (200.0 * (fy - fz)).clamp(-128.0, 127.0);
    let scale = |v: f64| (v * 65_535.0).round_ties_even().clamp(0.0, 65_535.0) as u16;
    [
        scale(l / 100.0),
        scale((a + 128.0) / 255.0),
        scale((b + 128.0) / 255.0),
    ]
}

// UIDs.

struct Uids {
    series: String,
    instance: String,
    dimensions: String,
}

/// New Series, SOP Instance and Dimension Organization UIDs: a SHA-256 over what the report is
/// about and a nonce that differs on every call (time, a process-wide counter, the process id
/// and std's random hash keys).
fn fresh_uids(report: &SegReport) -> Uids {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let random = std::hash::RandomState::new().hash_one((count, nanos));

    let mut hasher = Sha256::new();
    hasher.update(b"brainai-serve SEG UID v1\0");
    let mut part = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    part(report.source_series_instance_uid.as_bytes());
    part(report.model.sha256.as_bytes());
    for frame in &report.frames {
        part(frame.sop_instance_uid.as_bytes());
    }
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
    Uids {
        series: derive(b"series"),
        instance: derive(b"instance"),
        dimensions: derive(b"dimension organization"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::dicom::PatientContext;
    use crate::report::ModelIdentity;

    const SHA: &str = "3f1c2a9d0b7e4f5a6c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d";
    const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
    const STUDY: &str = "1.2.826.0.1.3680043.10.1234.1";
    const SERIES: &str = "1.2.826.0.1.3680043.10.1234.2";
    const OTHER_SERIES: &str = "1.2.826.0.1.3680043.10.1234.3";
    const FOR: &str = "1.2.826.0.1.3680043.10.1234.4";
    const ROWS: usize = 6;
    const COLUMNS: usize = 8;
    const PATIENT: &str = "Doe^Jane^PHI-NAME-7391";

    fn instance(slice: usize) -> String {
        format!("1.2.826.0.1.3680043.10.1234.2.{}", slice + 1)
    }

    /// Label values: 0 background, 1 necrosis, 2 edema, 3 enhancing. Slice 0 has edema and
    /// enhancing tumour, slice 1 edema and necrosis, slice 2 nothing.
    fn label_maps() -> Vec<Vec<u8>> {
        let mut maps = vec![vec![0u8; ROWS * COLUMNS]; 3];
        for (r, c) in [(1, 1), (1, 2), (2, 1), (2, 2), (5, 7)] {
            maps[0][r * COLUMNS + c] = 2;
        }
        for (r, c) in [(0, 0), (3, 4), (3, 5)] {
            maps[0][r * COLUMNS + c] = 3;
        }
        for (r, c) in [(4, 6), (0, 7)] {
            maps[1][r * COLUMNS + c] = 2;
        }
        maps[1][2 * COLUMNS + 3] = 1;
        maps
    }

    fn segment(
        label: &str,
        classes: &[u8],
        value: &str,
        meaning: &str,
        color: [u8; 3],
    ) -> SegmentSpec {
        SegmentSpec {
            label: label.into(),
            classes: classes.to_vec(),
            category: Code::new("49755003", "SCT", "Morphologically Altered Structure"),
            kind: Code::new(value, "SCT", meaning),
            color,
        }
    }

    fn report(clinically_trained: bool) -> SegReport {
        let context = PatientContext(InMemDicomObject::from_element_iter([
            el(tags::PATIENT_NAME, VR::PN, PATIENT),
            el(tags::PATIENT_ID, VR::LO, "PHI-ID-1234"),
            el(tags::STUDY_INSTANCE_UID, VR::UI, STUDY),
            el(tags::SERIES_NUMBER, VR::IS, "7"),
        ]));
        let frames: Vec<SegFrame> = label_maps()
            .into_iter()
            .enumerate()
            .map(|(i, labels)| SegFrame {
                sop_class_uid: MR.into(),
                sop_instance_uid: instance(i),
                position: [-120.0, -100.5, 10.0 + 5.0 * i as f64],
                labels,
            })
            .collect();
        let source: Vec<(String, String)> = frames
            .iter()
            .map(|f| (f.sop_class_uid.clone(), f.sop_instance_uid.clone()))
            .collect();
        SegReport {
            context,
            study_instance_uid: STUDY.into(),
            source_series_instance_uid: SERIES.into(),
            frame_of_reference_uid: FOR.into(),
            rows: ROWS as u32,
            columns: COLUMNS as u32,
            pixel_spacing: [0.9375, 0.5],
            orientation: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            slice_thickness: Some(5.0),
            spacing_between_slices: Some(5.0),
            frames,
            segments: vec![
                segment("edema", &[2], "79654002", "Edema", [255, 255, 0]),
                segment("enhancing", &[3], "418701002", "Enhancing", [255, 0, 0]),
                segment(
                    "whole_tumor",
                    &[1, 2, 3],
                    "108369006",
                    "Neoplasm",
                    [0, 128, 255],
                ),
            ],
            referenced_series: vec![
                (SERIES.into(), source),
                (
                    OTHER_SERIES.into(),
                    vec![(MR.into(), "1.2.826.0.1.3680043.10.1234.3.1".into())],
                ),
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

    fn item(obj: &InMemDicomObject, tag: Tag) -> &InMemDicomObject {
        &obj.element(tag)
            .unwrap_or_else(|_| panic!("{tag} missing"))
            .items()
            .unwrap_or_else(|| panic!("{tag} is not a sequence"))[0]
    }

    fn items(obj: &InMemDicomObject, tag: Tag) -> &[InMemDicomObject] {
        obj.element(tag).unwrap().items().unwrap()
    }

    fn uint(obj: &InMemDicomObject, tag: Tag) -> u32 {
        obj.element(tag).unwrap().to_int::<u32>().unwrap()
    }

    /// The frames of the Pixel Data, unpacked as PS3.5 8.1.1 says (little-endian bit order).
    fn unpack(obj: &InMemDicomObject, frames: usize) -> Vec<Vec<u8>> {
        let data = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
        let pixels = ROWS * COLUMNS;
        assert_eq!(
            data.len(),
            (frames * pixels).div_ceil(8).next_multiple_of(2)
        );
        (0..frames)
            .map(|f| {
                (0..pixels)
                    .map(|p| {
                        let bit = f * pixels + p;
                        (data[bit / 8] >> (bit % 8)) & 1
                    })
                    .collect()
            })
            .collect()
    }

    fn mask(labels: &[u8], classes: &[u8]) -> Vec<u8> {
        labels
            .iter()
            .map(|v| u8::from(classes.contains(v)))
            .collect()
    }

    #[test]
    fn frames_masks_and_references_read_back() {
        let report = report(false);
        let obj = parse(&build(&report).expect("the SEG builds"));
        let maps = label_maps();

        assert_eq!(text(&obj, tags::SOP_CLASS_UID), SEGMENTATION_STORAGE);
        assert_eq!(
            obj.meta()
                .media_storage_sop_class_uid
                .trim_end_matches('\0'),
            SEGMENTATION_STORAGE
        );
        assert_eq!(text(&obj, tags::MODALITY), "SEG");
        assert_eq!(text(&obj, tags::SEGMENTATION_TYPE), "BINARY");
        assert_eq!(text(&obj, tags::SEGMENTS_OVERLAP), "YES");
        assert_eq!(text(&obj, tags::PATIENT_NAME), PATIENT);
        assert_eq!(text(&obj, tags::STUDY_INSTANCE_UID), STUDY);
        assert_eq!(text(&obj, tags::SERIES_NUMBER), "2007");
        assert_eq!(text(&obj, tags::FRAME_OF_REFERENCE_UID), FOR);
        assert_ne!(text(&obj, tags::SERIES_INSTANCE_UID), SERIES);
        for (tag, value) in [
            (tags::BITS_ALLOCATED, 1),
            (tags::BITS_STORED, 1),
            (tags::HIGH_BIT, 0),
            (tags::SAMPLES_PER_PIXEL, 1),
            (tags::PIXEL_REPRESENTATION, 0),
            (tags::ROWS, ROWS as u32),
            (tags::COLUMNS, COLUMNS as u32),
        ] {
            assert_eq!(uint(&obj, tag), value, "{tag}");
        }

        // (segment index, slice): edema on slices 0 and 1, enhancing on 0, the whole tumour on
        // 0 and 1; slice 2 has no frame.
        let expected = [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1)];
        assert_eq!(uint(&obj, tags::NUMBER_OF_FRAMES), expected.len() as u32);
        let frames = unpack(&obj, expected.len());
        let per_frame = items(&obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
        assert_eq!(per_frame.len(), expected.len());
        for (n, &(segment, slice)) in expected.iter().enumerate() {
            let classes = &report.segments[segment].classes;
            assert_eq!(frames[n], mask(&maps[slice], classes), "frame {n}");
            let groups = &per_frame[n];
            let source = item(
                item(groups, tags::DERIVATION_IMAGE_SEQUENCE),
                tags::SOURCE_IMAGE_SEQUENCE,
            );
            assert_eq!(
                text(source, tags::REFERENCED_SOP_INSTANCE_UID),
                instance(slice)
            );
            assert_eq!(text(source, tags::REFERENCED_SOP_CLASS_UID), MR);
            assert_eq!(text(source, tags::SPATIAL_LOCATIONS_PRESERVED), "YES");
            assert_eq!(
                text(
                    item(source, tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE),
                    tags::CODE_VALUE
                ),
                "121322"
            );
            assert_eq!(
                text(
                    item(
                        item(groups, tags::DERIVATION_IMAGE_SEQUENCE),
                        tags::DERIVATION_CODE_SEQUENCE
                    ),
                    tags::CODE_VALUE
                ),
                "113076"
            );
            assert_eq!(
                uint(
                    item(groups, tags::SEGMENT_IDENTIFICATION_SEQUENCE),
                    tags::REFERENCED_SEGMENT_NUMBER
                ),
                segment as u32 + 1
            );
            let index: Vec<u32> = item(groups, tags::FRAME_CONTENT_SEQUENCE)
                .element(tags::DIMENSION_INDEX_VALUES)
                .unwrap()
                .to_multi_int()
                .unwrap();
            assert_eq!(index, [segment as u32 + 1, slice as u32 + 1]);
            let position: Vec<f64> = item(groups, tags::PLANE_POSITION_SEQUENCE)
                .element(tags::IMAGE_POSITION_PATIENT)
                .unwrap()
                .to_multi_float64()
                .unwrap();
            assert_eq!(position, report.frames[slice].position);
        }

        let shared = item(&obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
        let measures = item(shared, tags::PIXEL_MEASURES_SEQUENCE);
        assert_eq!(
            measures
                .element(tags::PIXEL_SPACING)
                .unwrap()
                .to_multi_float64()
                .unwrap(),
            [0.9375, 0.5]
        );
        assert_eq!(text(measures, tags::SLICE_THICKNESS), "5");

        // Every referenced series and instance, the source series first.
        let series = items(&obj, tags::REFERENCED_SERIES_SEQUENCE);
        assert_eq!(series.len(), 2);
        assert_eq!(text(&series[0], tags::SERIES_INSTANCE_UID), SERIES);
        let referenced: Vec<String> = items(&series[0], tags::REFERENCED_INSTANCE_SEQUENCE)
            .iter()
            .map(|i| text(i, tags::REFERENCED_SOP_INSTANCE_UID))
            .collect();
        assert_eq!(referenced, (0..3).map(instance).collect::<Vec<_>>());
        assert_eq!(text(&series[1], tags::SERIES_INSTANCE_UID), OTHER_SERIES);
    }

    #[test]
    fn segment_sequence_says_what_it_should() {
        let report = report(true);
        let obj = parse(&build(&report).unwrap());
        let segments = items(&obj, tags::SEGMENT_SEQUENCE);
        assert_eq!(segments.len(), 3);
        for (i, (got, spec)) in segments.iter().zip(&report.segments).enumerate() {
            assert_eq!(uint(got, tags::SEGMENT_NUMBER), i as u32 + 1);
            assert_eq!(text(got, tags::SEGMENT_LABEL), spec.label);
            assert_eq!(text(got, tags::SEGMENT_ALGORITHM_TYPE), "AUTOMATIC");
            assert_eq!(text(got, tags::SEGMENT_ALGORITHM_NAME), "brats-unet");
            let kind = item(got, tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE);
            assert_eq!(text(kind, tags::CODE_VALUE), spec.kind.value);
            assert_eq!(text(kind, tags::CODING_SCHEME_DESIGNATOR), "SCT");
            assert_eq!(text(kind, tags::CODE_MEANING), spec.kind.meaning);
            let category = item(got, tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE);
            assert_eq!(text(category, tags::CODE_VALUE), "49755003");
            let algorithm = item(got, tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE);
            let family = item(algorithm, tags::ALGORITHM_FAMILY_CODE_SEQUENCE);
            assert_eq!(text(family, tags::CODE_VALUE), "123110");
            assert_eq!(text(family, tags::CODING_SCHEME_DESIGNATOR), "DCM");
            assert_eq!(text(algorithm, tags::ALGORITHM_NAME), "brats-unet");
            assert_eq!(text(algorithm, tags::ALGORITHM_VERSION), "2");
            assert_eq!(
                text(algorithm, tags::ALGORITHM_PARAMETERS),
                format!("sha256:{SHA}")
            );
            let lab: Vec<u16> = got
                .element(tags::RECOMMENDED_DISPLAY_CIE_LAB_VALUE)
                .unwrap()
                .to_multi_int()
                .unwrap();
            assert_eq!(lab, cielab(spec.color));
        }
        // A clinically trained model: no disclaimer anywhere, the warning in the comments.
        for tag in [tags::SERIES_DESCRIPTION, tags::CONTENT_DESCRIPTION] {
            assert_eq!(text(&obj, tag), "AI segmentation brats-unet");
        }
        assert_eq!(text(&obj, tags::IMAGE_COMMENTS), "Research prototype");
        assert_eq!(text(&obj, tags::CONTENT_LABEL), CONTENT_LABEL);
        assert_eq!(text(&obj, tags::CONTENT_CREATOR_NAME), "BrainAI Serve^");
        assert_eq!(text(&obj, tags::MANUFACTURER), MANUFACTURER);
        assert_eq!(text(&obj, tags::MANUFACTURER_MODEL_NAME), "brats-unet");
        assert_eq!(text(&obj, tags::SOFTWARE_VERSIONS), "2");
        assert_eq!(text(&obj, tags::DEVICE_SERIAL_NUMBER), SHA);
    }

    /// highdicom's `CIELabColor.from_rgb(...).value` (highdicom 0.28.2) for the same colours.
    #[test]
    fn cielab_matches_highdicom() {
        for (rgb, expected) in [
            ([255, 255, 0], [63_660, 27_356, 57_178]),
            ([255, 0, 0], [34_886, 53_484, 50_172]),
            ([0, 128, 255], [35_860, 37_725, 14_668]),
            ([0, 0, 0], [0, 32_896, 32_896]),
            ([255, 255, 255], [65_535, 32_897, 32_893]),
            ([0, 255, 0], [57_498, 10_747, 54_274]),
            ([0, 0, 255], [21_170, 53_250, 5_175]),
            ([10, 20, 30], [3_899, 32_725, 30_804]),
            ([200, 100, 50], [35_144, 42_228, 44_558]),
        ] {
            assert_eq!(cielab(rgb), expected, "{rgb:?}");
        }
    }

    #[test]
    fn untrained_model_is_labelled_not_for_diagnostic_use() {
        let obj = parse(&build(&report(false)).unwrap());
        for tag in [tags::SERIES_DESCRIPTION, tags::CONTENT_DESCRIPTION] {
            assert_eq!(
                text(&obj, tag),
                "NOT FOR DIAGNOSTIC USE: AI segmentation brats-unet"
            );
        }
        let comments = text(&obj, tags::IMAGE_COMMENTS);
        assert_eq!(
            comments,
            format!("{NOT_FOR_DIAGNOSTIC_USE}\nResearch prototype")
        );
    }

    /// A segment without a pixel anywhere has one all-zero frame on the first slice; without
    /// shared classes the segments do not overlap.
    #[test]
    fn empty_segment_has_one_empty_frame() {
        let mut report = report(false);
        report.segments = vec![
            segment("necrosis_absent", &[4], "6574001", "Necrosis", [10, 20, 30]),
            segment("edema", &[2], "79654002", "Edema", [255, 255, 0]),
        ];
        let obj = parse(&build(&report).unwrap());
        assert_eq!(text(&obj, tags::SEGMENTS_OVERLAP), "NO");
        assert_eq!(uint(&obj, tags::NUMBER_OF_FRAMES), 3);
        let frames = unpack(&obj, 3);
        assert!(frames[0].iter().all(|&b| b == 0));
        let per_frame = items(&obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE);
        let groups = &per_frame[0];
        assert_eq!(
            uint(
                item(groups, tags::SEGMENT_IDENTIFICATION_SEQUENCE),
                tags::REFERENCED_SEGMENT_NUMBER
            ),
            1
        );
        let source = item(
            item(groups, tags::DERIVATION_IMAGE_SEQUENCE),
            tags::SOURCE_IMAGE_SEQUENCE,
        );
        assert_eq!(text(source, tags::REFERENCED_SOP_INSTANCE_UID), instance(0));
        let maps = label_maps();
        assert_eq!(frames[1], mask(&maps[0], &[2]));
        assert_eq!(frames[2], mask(&maps[1], &[2]));
    }

    /// Frames whose bits straddle bytes: 3 × 5 pixels a frame, 7 frames (105 bits → 14 bytes).
    #[test]
    fn odd_frame_sizes_pack_contiguously() {
        let mut report = report(true);
        report.rows = 3;
        report.columns = 5;
        report.segments = vec![segment("all", &[0, 1, 2, 3], "1", "All", [1, 2, 3])];
        let mut maps = vec![];
        report.frames = (0..7)
            .map(|i| {
                let labels: Vec<u8> = (0..15)
                    .map(|p| u8::from((p * 7 + i * 3) % 5 == 0))
                    .collect();
                maps.push(labels.clone());
                SegFrame {
                    sop_class_uid: MR.into(),
                    sop_instance_uid: instance(i),
                    position: [0.0, 0.0, i as f64],
                    labels,
                }
            })
            .collect();
        report.segments[0].classes = vec![1];
        report.referenced_series.truncate(1);
        report.referenced_series[0].1 = (0..7).map(|i| (MR.to_string(), instance(i))).collect();
        let obj = parse(&build(&report).unwrap());
        let data = obj.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap();
        assert_eq!(data.len(), 14);
        let bits: Vec<u8> = (0..105).map(|b| (data[b / 8] >> (b % 8)) & 1).collect();
        assert_eq!(bits, maps.concat());
        assert!((105..112).all(|b| (data[b / 8] >> (b % 8)) & 1 == 0));
    }

    #[test]
    fn decimal_strings_fit() {
        assert_eq!(ds(-120.0), "-120");
        assert_eq!(ds(0.9375), "0.9375");
        assert_eq!(ds(-0.0), "0");
        for v in [
            -125.123_456_789_012_34,
            1.0 / 3.0,
            1e-300,
            -1e300,
            123_456_789_012_345_680.0,
            -0.000_001_234_567_890_123,
        ] {
            let s = ds(v);
            assert!(s.len() <= 16, "{v}: {s}");
            let back: f64 = s.parse().unwrap();
            assert!((back - v).abs() <= v.abs() * 1e-10, "{v}: {s}");
        }
    }

    /// Each breakage is refused with a message naming what is wrong (the fragment), and no
    /// message carries the patient data of the context.
    #[test]
    fn invalid_reports_are_refused_without_patient_data() {
        type Breakage = Box<dyn Fn(&mut SegReport)>;
        let cases: Vec<(&str, Breakage)> = vec![
            ("no frames", Box::new(|r| r.frames.clear())),
            ("no segments", Box::new(|r| r.segments.clear())),
            (
                "not rows × columns",
                Box::new(|r| r.frames[1].labels.truncate(47)),
            ),
            (
                "not rows × columns",
                Box::new(|r| r.frames[2].labels.push(0)),
            ),
            ("rows and columns", Box::new(|r| r.rows = 0)),
            ("rows and columns", Box::new(|r| r.columns = 70_000)),
            (
                "position is not finite",
                Box::new(|r| r.frames[0].position[2] = f64::NAN),
            ),
            ("pixel spacing", Box::new(|r| r.pixel_spacing[0] = 0.0)),
            (
                "slice thickness",
                Box::new(|r| r.slice_thickness = Some(f64::INFINITY)),
            ),
            (
                "spacing between",
                Box::new(|r| r.spacing_between_slices = Some(-5.0)),
            ),
            (
                "orientation",
                Box::new(|r| r.orientation = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]),
            ),
            (
                "orientation",
                Box::new(|r| r.orientation = [2.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
            ),
            (
                "no label-map class",
                Box::new(|r| r.segments[0].classes.clear()),
            ),
            (
                "label is empty",
                Box::new(|r| r.segments[1].label = " ".into()),
            ),
            (
                "code value",
                Box::new(|r| r.segments[0].kind.value = "1".repeat(17)),
            ),
            (
                "code value",
                Box::new(|r| r.segments[2].category.scheme = "S\\CT".into()),
            ),
            (
                "code meaning",
                Box::new(|r| r.segments[2].category.meaning = "".into()),
            ),
            ("SHA-256", Box::new(|r| r.model.sha256 = "abc".into())),
            ("model name", Box::new(|r| r.model.name = "".into())),
            (
                "SOP Instance UID of frame 1",
                Box::new(|r| r.frames[1].sop_instance_uid = "1.2.x".into()),
            ),
            (
                "differs",
                Box::new(|r| r.study_instance_uid = "1.2.3".into()),
            ),
            ("no series", Box::new(|r| r.referenced_series.clear())),
            (
                "not the source series",
                Box::new(|r| r.referenced_series.reverse()),
            ),
            (
                "listed twice",
                Box::new(|r| r.referenced_series[1].0 = SERIES.into()),
            ),
            (
                "no instances",
                Box::new(|r| r.referenced_series[1].1.clear()),
            ),
            (
                "frame 2: its source instance",
                Box::new(|r| {
                    r.referenced_series[0].1.pop();
                }),
            ),
            (
                "frame 0: its source instance",
                Box::new(|r| {
                    r.referenced_series[0].1[0].0 = "1.2.840.10008.5.1.4.1.1.2".into();
                }),
            ),
            (
                "same source instance",
                Box::new(|r| {
                    r.frames[1].sop_instance_uid = r.frames[0].sop_instance_uid.clone();
                }),
            ),
            (
                "same position",
                Box::new(|r| r.frames[1].position = r.frames[0].position),
            ),
            (
                "slice thickness is unknown",
                Box::new(|r| {
                    r.slice_thickness = None;
                    r.spacing_between_slices = None;
                    r.frames.truncate(1);
                }),
            ),
        ];
        for (fragment, break_it) in cases {
            let mut report = report(false);
            break_it(&mut report);
            let error = build(&report).expect_err(fragment);
            assert!(error.contains(fragment), "{fragment}: {error}");
            assert!(!error.contains("PHI"), "{fragment}: {error}");
        }
        // Without the thickness, the spacing between slices, then the distance between slices.
        let mut report = report(false);
        report.slice_thickness = None;
        assert_eq!(slice_thickness(&report), Ok(5.0));
        report.spacing_between_slices = None;
        report.frames[2].position[2] = 18.0;
        assert_eq!(slice_thickness(&report), Ok(3.0));
    }
}
