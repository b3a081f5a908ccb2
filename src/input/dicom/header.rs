//! What the header says: the pixel module's attributes, the Modality and VOI LUT modules, the
//! acquisition parameters the sequence guard reads and the geometry series sorting reads.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject};

use super::{DicomIds, invalid};
use crate::input::InputError;

/// A lookup table (Modality LUT or VOI LUT Sequence item): LUT Descriptor and LUT Data.
#[derive(Debug, Clone, PartialEq)]
pub struct Lut {
    /// First stored value mapped (LUT Descriptor, second value).
    pub first_mapped: i64,
    /// Bits per entry (LUT Descriptor, third value).
    pub bits: u32,
    pub data: Vec<u16>,
}

impl Lut {
    /// The entry for `value`, clamped to the table: what pydicom's `apply_modality_lut` and
    /// `apply_voi` do.
    pub fn lookup(&self, value: f64) -> f64 {
        let last = self.data.len() as f64 - 1.0;
        let index = (value - self.first_mapped as f64).clamp(0.0, last);
        f64::from(self.data[index as usize])
    }
}

/// VOI LUT Function (0028,1056).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VoiFunction {
    #[default]
    Linear,
    LinearExact,
    Sigmoid,
}

/// Photometric interpretation, as the service handles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Photometric {
    Monochrome1,
    Monochrome2,
    Rgb,
    YbrFull,
    /// YBR_FULL with Cb and Cr halved horizontally: JPEG decoders return RGB for it, native data
    /// is expanded and converted.
    YbrFull422,
}

/// What the header says about how the series was acquired: what the sequence guard
/// ([`super::sequence`]) reads. Descriptions are free text an operator typed; they carry no
/// patient data by convention but are still never logged.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Acquisition {
    pub series_description: String,
    pub protocol_name: String,
    pub sequence_name: String,
    /// Scanning Sequence (0018,0020) values, e.g. `SE`, `IR`.
    pub scanning_sequence: Vec<String>,
    /// An inversion-recovery preparation (Scanning Sequence IR, or Enhanced MR's Inversion
    /// Recovery YES).
    pub inversion_recovery: bool,
    pub inversion_time_ms: Option<f64>,
    pub echo_time_ms: Option<f64>,
    pub repetition_time_ms: Option<f64>,
    /// Contrast/Bolus Agent (0018,0010); empty when none.
    pub contrast_agent: String,
}

/// Where the slices are: what series sorting reads.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Geometry {
    pub sop_class_uid: String,
    pub instance_number: Option<i64>,
    /// Image Position (Patient) of a single-frame instance, or the shared one.
    pub position: Option<[f64; 3]>,
    /// Image Orientation (Patient): row and column direction cosines.
    pub orientation: Option<[f64; 6]>,
    /// Per-frame positions of an Enhanced (multi-frame) instance, in frame order.
    pub frame_positions: Vec<Option<[f64; 3]>>,
    /// Pixel Spacing (0028,0030): row spacing, then column spacing, in mm (top level, or the
    /// shared Pixel Measures of an Enhanced instance).
    pub pixel_spacing: Option<[f64; 2]>,
    /// Slice Thickness (0018,0050), in mm.
    pub slice_thickness: Option<f64>,
    /// Frame of Reference UID (0020,0052): the patient coordinate system the positions are in.
    pub frame_of_reference_uid: String,
    /// A keyed hash of Patient ID and Issuer of Patient ID (the key random per process): tells
    /// instances of two patients apart without holding the identifier, or anything that could be
    /// turned back into it. `None` when the instance has no Patient ID.
    pub patient_key: Option<u64>,
}

/// What the header says about the pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub transfer_syntax: String,
    pub ids: DicomIds,
    /// Modality (0008,0060), e.g. `MR`.
    pub modality: String,
    pub rows: u32,
    pub columns: u32,
    pub frames: u32,
    pub samples_per_pixel: u16,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub signed: bool,
    pub photometric: Photometric,
    /// Rescale Slope and Intercept, when both are present.
    pub rescale: Option<(f64, f64)>,
    pub modality_lut: Option<Lut>,
    /// Window Center/Width pairs, in file order.
    pub windows: Vec<(f64, f64)>,
    pub voi_function: VoiFunction,
    /// First item of the VOI LUT Sequence.
    pub voi_lut: Option<Lut>,
    /// Pixel Padding Value and Pixel Padding Range Limit (stored values).
    pub padding: Option<(i64, Option<i64>)>,
    pub acquisition: Acquisition,
    pub geometry: Geometry,
}

impl Header {
    /// The modality value of a stored value: the Modality LUT Sequence, else Rescale Slope and
    /// Intercept (`s × slope + intercept`, pydicom's order of operations), else the value.
    pub fn modality(&self, stored: i32) -> f64 {
        let s = f64::from(stored);
        if let Some(lut) = &self.modality_lut {
            lut.lookup(s)
        } else if let Some((slope, intercept)) = self.rescale {
            s * slope + intercept
        } else {
            s
        }
    }

    /// The output range of a window, as pydicom's `apply_windowing` computes it: `[0, 2^bits - 1]`
    /// of a Modality LUT Sequence, else the stored range from Bits Stored and Pixel
    /// Representation; through Rescale Slope/Intercept when both are present.
    pub fn window_range(&self) -> (f64, f64) {
        let bits = i32::from(self.bits_stored);
        let (mut lo, mut hi) = if let Some(lut) = &self.modality_lut {
            (0.0, 2f64.powi(lut.bits as i32) - 1.0)
        } else if self.signed {
            (-(2f64.powi(bits - 1)), 2f64.powi(bits - 1) - 1.0)
        } else {
            (0.0, 2f64.powi(bits) - 1.0)
        };
        if let Some((slope, intercept)) = self.rescale {
            lo = lo * slope + intercept;
            hi = hi * slope + intercept;
        }
        (lo, hi)
    }
}

fn text(object: &InMemDicomObject, tag: Tag) -> String {
    object
        .get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

/// An integer attribute that must fit `T`; `None` when absent.
fn int<T: TryFrom<i64>>(
    object: &InMemDicomObject,
    tag: Tag,
    name: &str,
) -> Result<Option<T>, InputError> {
    match object.get(tag) {
        None => Ok(None),
        Some(e) => e
            .to_int::<i64>()
            .ok()
            .and_then(|v| T::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| {
                invalid(format!(
                    "{name} ({:04X},{:04X}) is not a valid number",
                    tag.0, tag.1
                ))
            }),
    }
}

fn required<T>(value: Option<T>, name: &str, tag: Tag) -> Result<T, InputError> {
    value.ok_or_else(|| invalid(format!("{name} ({:04X},{:04X}) is missing", tag.0, tag.1)))
}

fn lut(item: &InMemDicomObject, what: &str) -> Result<Lut, InputError> {
    let descriptor = item
        .get(tags::LUT_DESCRIPTOR)
        .and_then(|e| e.to_multi_int::<i64>().ok())
        .filter(|d| d.len() == 3)
        .ok_or_else(|| invalid(format!("the {what} has no valid LUT Descriptor")))?;
    let entries = if descriptor[0] == 0 {
        65536
    } else {
        descriptor[0] as usize
    };
    let bits = u32::try_from(descriptor[2])
        .ok()
        .filter(|b| (1..=16).contains(b))
        .ok_or_else(|| {
            invalid(format!(
                "the {what} declares {} bits per entry",
                descriptor[2]
            ))
        })?;
    let element = item
        .get(tags::LUT_DATA)
        .ok_or_else(|| invalid(format!("the {what} has no LUT Data")))?;
    let mut data = element
        .to_multi_int::<u16>()
        .map_err(|_| invalid(format!("the {what}'s LUT Data is not 16-bit values")))?;
    if bits <= 8 && data.len() * 2 == entries.div_ceil(2) * 2 && data.len() < entries {
        // 8-bit entries packed two per 16-bit word.
        data = data
            .iter()
            .flat_map(|w| [w & 0xFF, w >> 8])
            .take(entries)
            .collect();
    }
    if data.len() != entries {
        return Err(invalid(format!(
            "the {what} declares {entries} entries but holds {}",
            data.len()
        )));
    }
    // The first mapped value is US or SS as the pixel data is; read as 16 bits either way.
    let first_mapped = descriptor[1];
    Ok(Lut {
        first_mapped,
        bits,
        data,
    })
}

fn first_item(object: &InMemDicomObject, tag: Tag) -> Option<&InMemDicomObject> {
    object
        .get(tag)
        .and_then(|e| e.items())
        .and_then(|i| i.first())
}

pub(super) fn read(object: &DefaultDicomObject) -> Result<Header, InputError> {
    let transfer_syntax = object
        .meta()
        .transfer_syntax()
        .trim_matches(['\0', ' '])
        .to_string();
    let rows = required(int::<u32>(object, tags::ROWS, "Rows")?, "Rows", tags::ROWS)?;
    let columns = required(
        int::<u32>(object, tags::COLUMNS, "Columns")?,
        "Columns",
        tags::COLUMNS,
    )?;
    let frames = int::<u32>(object, tags::NUMBER_OF_FRAMES, "Number of Frames")?.unwrap_or(1);
    let samples_per_pixel =
        int::<u16>(object, tags::SAMPLES_PER_PIXEL, "Samples per Pixel")?.unwrap_or(1);
    let bits_allocated = required(
        int::<u16>(object, tags::BITS_ALLOCATED, "Bits Allocated")?,
        "Bits Allocated",
        tags::BITS_ALLOCATED,
    )?;
    let bits_stored =
        int::<u16>(object, tags::BITS_STORED, "Bits Stored")?.unwrap_or(bits_allocated);
    let high_bit = int::<u16>(object, tags::HIGH_BIT, "High Bit")?;
    let signed =
        int::<u16>(object, tags::PIXEL_REPRESENTATION, "Pixel Representation")?.unwrap_or(0) == 1;
    if !matches!(bits_allocated, 8 | 16 | 32) {
        return Err(invalid(format!(
            "Bits Allocated is {bits_allocated}; 8, 16 or 32 are supported"
        )));
    }
    if bits_stored == 0 || bits_stored > bits_allocated {
        return Err(invalid(format!(
            "Bits Stored ({bits_stored}) must be between 1 and Bits Allocated ({bits_allocated})"
        )));
    }
    if bits_stored == 32 && !signed {
        return Err(invalid(
            "unsigned 32-bit samples (Bits Stored 32, Pixel Representation 0) are not supported",
        ));
    }
    if let Some(high_bit) = high_bit
        && high_bit != bits_stored - 1
    {
        return Err(invalid(format!(
            "High Bit is {high_bit}; only High Bit = Bits Stored - 1 ({}) is supported",
            bits_stored - 1
        )));
    }
    let photometric_text = text(object, tags::PHOTOMETRIC_INTERPRETATION);
    let photometric = match (photometric_text.as_str(), samples_per_pixel) {
        ("MONOCHROME1", 1) => Photometric::Monochrome1,
        ("MONOCHROME2", 1) => Photometric::Monochrome2,
        ("RGB", 3) => Photometric::Rgb,
        // Decoders of JPEG-family syntaxes return RGB for these.
        ("YBR_FULL", 3) => Photometric::YbrFull,
        ("YBR_FULL_422", 3) => Photometric::YbrFull422,
        ("YBR_ICT" | "YBR_RCT", 3) => Photometric::Rgb,
        (other, n) => {
            return Err(invalid(format!(
                "Photometric Interpretation {other:?} with {n} samples per pixel is not supported \
                 (MONOCHROME1, MONOCHROME2, RGB, YBR_FULL, YBR_FULL_422, YBR_ICT and YBR_RCT are)"
            )));
        }
    };
    if samples_per_pixel == 3 && bits_allocated != 8 {
        return Err(invalid(format!(
            "colour images must have 8 bits per sample; this one has {bits_allocated}"
        )));
    }
    let rescale = match (
        object.get(tags::RESCALE_SLOPE),
        object.get(tags::RESCALE_INTERCEPT),
    ) {
        (Some(s), Some(i)) => Some((
            s.to_float64()
                .map_err(|_| invalid("Rescale Slope is not a number"))?,
            i.to_float64()
                .map_err(|_| invalid("Rescale Intercept is not a number"))?,
        )),
        _ => None,
    };
    let modality_lut = first_item(object, tags::MODALITY_LUT_SEQUENCE)
        .map(|item| lut(item, "Modality LUT"))
        .transpose()?;
    let windows = match (
        object.get(tags::WINDOW_CENTER),
        object.get(tags::WINDOW_WIDTH),
    ) {
        (Some(c), Some(w)) => {
            let centers = c
                .to_multi_float64()
                .map_err(|_| invalid("Window Center is not a number"))?;
            let widths = w
                .to_multi_float64()
                .map_err(|_| invalid("Window Width is not a number"))?;
            centers.into_iter().zip(widths).collect()
        }
        _ => Vec::new(),
    };
    let voi_function = match text(object, tags::VOILUT_FUNCTION).as_str() {
        "" | "LINEAR" => VoiFunction::Linear,
        "LINEAR_EXACT" => VoiFunction::LinearExact,
        "SIGMOID" => VoiFunction::Sigmoid,
        other => {
            return Err(invalid(format!(
                "VOI LUT Function {other:?} is not one of LINEAR, LINEAR_EXACT, SIGMOID"
            )));
        }
    };
    let voi_lut = first_item(object, tags::VOILUT_SEQUENCE)
        .map(|item| lut(item, "VOI LUT"))
        .transpose()?;
    let padding = match object.get(tags::PIXEL_PADDING_VALUE) {
        None => None,
        Some(e) => Some((
            e.to_int::<i64>()
                .map_err(|_| invalid("Pixel Padding Value is not a number"))?,
            object
                .get(tags::PIXEL_PADDING_RANGE_LIMIT)
                .and_then(|e| e.to_int::<i64>().ok()),
        )),
    };
    let acquisition = acquisition(object);
    let geometry = geometry(object);
    Ok(Header {
        acquisition,
        geometry,
        transfer_syntax,
        ids: DicomIds {
            study_instance_uid: text(object, tags::STUDY_INSTANCE_UID),
            series_instance_uid: text(object, tags::SERIES_INSTANCE_UID),
            sop_instance_uid: text(object, tags::SOP_INSTANCE_UID),
        },
        modality: text(object, tags::MODALITY),
        rows,
        columns,
        frames,
        samples_per_pixel,
        bits_allocated,
        bits_stored,
        signed,
        photometric,
        rescale,
        modality_lut,
        windows,
        voi_function,
        voi_lut,
        padding,
    })
}

fn floats(object: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    object.get(tag).and_then(|e| e.to_multi_float64().ok())
}

fn float(object: &InMemDicomObject, tag: Tag) -> Option<f64> {
    floats(object, tag).and_then(|v| v.first().copied())
}

fn texts(object: &InMemDicomObject, tag: Tag) -> Vec<String> {
    text(object, tag)
        .split('\\')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// Acquisition parameters, from the top level or (Enhanced MR) the shared functional groups.
fn acquisition(object: &InMemDicomObject) -> Acquisition {
    let shared = first_item(object, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
    let in_shared = |sequence: Tag, tag: Tag| {
        shared
            .and_then(|s| first_item(s, sequence))
            .and_then(|item| float(item, tag))
    };
    let scanning_sequence = texts(object, tags::SCANNING_SEQUENCE);
    let modifier = shared.and_then(|s| first_item(s, tags::MR_MODIFIER_SEQUENCE));
    let inversion_recovery = scanning_sequence.iter().any(|s| s == "IR")
        || modifier.is_some_and(|m| text(m, tags::INVERSION_RECOVERY) == "YES");
    Acquisition {
        series_description: text(object, tags::SERIES_DESCRIPTION),
        protocol_name: text(object, tags::PROTOCOL_NAME),
        sequence_name: match text(object, tags::SEQUENCE_NAME) {
            name if name.is_empty() => text(object, tags::PULSE_SEQUENCE_NAME),
            name => name,
        },
        scanning_sequence,
        inversion_recovery,
        inversion_time_ms: float(object, tags::INVERSION_TIME)
            .or_else(|| modifier.and_then(|m| float(m, tags::INVERSION_TIMES))),
        echo_time_ms: float(object, tags::ECHO_TIME)
            .or_else(|| in_shared(tags::MR_ECHO_SEQUENCE, tags::EFFECTIVE_ECHO_TIME)),
        repetition_time_ms: float(object, tags::REPETITION_TIME).or_else(|| {
            in_shared(
                tags::MR_TIMING_AND_RELATED_PARAMETERS_SEQUENCE,
                tags::REPETITION_TIME,
            )
        }),
        contrast_agent: text(object, tags::CONTRAST_BOLUS_AGENT),
    }
}

/// Slice geometry, from the top level or (Enhanced MR) the functional groups.
fn geometry(object: &InMemDicomObject) -> Geometry {
    let three = |v: Vec<f64>| <[f64; 3]>::try_from(v).ok();
    let six = |v: Vec<f64>| <[f64; 6]>::try_from(v).ok();
    let shared = first_item(object, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
    let orientation = floats(object, tags::IMAGE_ORIENTATION_PATIENT)
        .and_then(six)
        .or_else(|| {
            shared
                .and_then(|s| first_item(s, tags::PLANE_ORIENTATION_SEQUENCE))
                .and_then(|p| floats(p, tags::IMAGE_ORIENTATION_PATIENT))
                .and_then(six)
        });
    let frame_positions = object
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .map(|frames| {
            frames
                .iter()
                .map(|frame| {
                    first_item(frame, tags::PLANE_POSITION_SEQUENCE)
                        .and_then(|p| floats(p, tags::IMAGE_POSITION_PATIENT))
                        .and_then(three)
                })
                .collect()
        })
        .unwrap_or_default();
    Geometry {
        sop_class_uid: text(object, tags::SOP_CLASS_UID),
        instance_number: object
            .get(tags::INSTANCE_NUMBER)
            .and_then(|e| e.to_int::<i64>().ok()),
        position: floats(object, tags::IMAGE_POSITION_PATIENT).and_then(three),
        orientation,
        frame_positions,
        pixel_spacing: floats(object, tags::PIXEL_SPACING)
            .or_else(|| {
                shared
                    .and_then(|s| first_item(s, tags::PIXEL_MEASURES_SEQUENCE))
                    .and_then(|p| floats(p, tags::PIXEL_SPACING))
            })
            .and_then(|v| <[f64; 2]>::try_from(v).ok())
            .filter(|[r, c]| r.is_finite() && c.is_finite() && *r > 0.0 && *c > 0.0),
        slice_thickness: float(object, tags::SLICE_THICKNESS)
            .or_else(|| {
                shared
                    .and_then(|s| first_item(s, tags::PIXEL_MEASURES_SEQUENCE))
                    .and_then(|p| float(p, tags::SLICE_THICKNESS))
            })
            .filter(|t| t.is_finite() && *t > 0.0),
        frame_of_reference_uid: text(object, tags::FRAME_OF_REFERENCE_UID),
        patient_key: {
            let id = text(object, tags::PATIENT_ID);
            (!id.is_empty()).then(|| {
                use std::hash::BuildHasher;
                static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
                    std::sync::OnceLock::new();
                let issuer = text(object, tags::ISSUER_OF_PATIENT_ID);
                KEY.get_or_init(Default::default)
                    .hash_one((id.as_str(), issuer.as_str()))
            })
        },
    }
}
#[cfg(test)]
mod tests {
    use dicom_core::value::{DataSetSequence, PrimitiveValue};
    use dicom_core::{DataElement, VR};
    use dicom_object::FileMetaTableBuilder;
    use dicom_object::mem::InMemElement;

    use super::*;

    /// An element; text with backslashes becomes several values, as a parsed file's does.
    fn el(tag: Tag, vr: VR, value: impl Into<PrimitiveValue>) -> InMemElement {
        let value = match value.into() {
            PrimitiveValue::Str(text) if text.contains('\\') => {
                PrimitiveValue::Strs(text.split('\\').map(str::to_string).collect())
            }
            value => value,
        };
        DataElement::new(tag, vr, value)
    }

    fn put(object: &mut InMemDicomObject, element: InMemElement) {
        object.put(element);
    }

    fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> InMemElement {
        DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
    }

    /// A 2×2 12-bit MR header, with `edit` applied to its elements.
    fn object(edit: impl FnOnce(&mut InMemDicomObject)) -> DefaultDicomObject {
        let mut obj = InMemDicomObject::from_element_iter([
            el(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.4"),
            el(tags::SOP_INSTANCE_UID, VR::UI, "1.2.3.4"),
            el(tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3"),
            el(tags::SERIES_INSTANCE_UID, VR::UI, "1.2.3.1"),
            el(tags::MODALITY, VR::CS, "MR"),
            el(tags::ROWS, VR::US, 2u16),
            el(tags::COLUMNS, VR::US, 3u16),
            el(tags::SAMPLES_PER_PIXEL, VR::US, 1u16),
            el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
            el(tags::BITS_ALLOCATED, VR::US, 16u16),
            el(tags::BITS_STORED, VR::US, 12u16),
            el(tags::HIGH_BIT, VR::US, 11u16),
            el(tags::PIXEL_REPRESENTATION, VR::US, 0u16),
        ]);
        edit(&mut obj);
        obj.with_meta(FileMetaTableBuilder::new().transfer_syntax("1.2.840.10008.1.2.1"))
            .unwrap()
    }

    fn refusal(edit: impl FnOnce(&mut InMemDicomObject)) -> String {
        read(&object(edit)).unwrap_err().to_string()
    }

    fn lut_item(descriptor: [u16; 3], data: Vec<u16>) -> InMemDicomObject {
        InMemDicomObject::from_element_iter([
            el(
                tags::LUT_DESCRIPTOR,
                VR::US,
                PrimitiveValue::U16(descriptor.into_iter().collect()),
            ),
            el(
                tags::LUT_DATA,
                VR::US,
                PrimitiveValue::U16(data.into_iter().collect()),
            ),
        ])
    }

    #[test]
    fn reads_the_pixel_module_and_the_identifiers() {
        let h = read(&object(|_| {})).unwrap();
        assert_eq!(
            (h.columns, h.rows, h.frames, h.samples_per_pixel),
            (3, 2, 1, 1)
        );
        assert_eq!((h.bits_allocated, h.bits_stored, h.signed), (16, 12, false));
        assert_eq!(h.photometric, Photometric::Monochrome2);
        assert_eq!(h.transfer_syntax, "1.2.840.10008.1.2.1");
        assert_eq!(h.ids.sop_instance_uid, "1.2.3.4");
        assert_eq!(h.ids.series_instance_uid, "1.2.3.1");
        assert_eq!(h.modality, "MR");
        assert_eq!(
            (h.rescale, &h.windows, h.padding),
            (None, &Vec::new(), None)
        );
    }

    #[test]
    fn reads_rescale_windows_function_and_padding() {
        let h = read(&object(|o| {
            put(o, el(tags::RESCALE_SLOPE, VR::DS, "2.5"));
            put(o, el(tags::RESCALE_INTERCEPT, VR::DS, "-1024"));
            put(o, el(tags::WINDOW_CENTER, VR::DS, "40\\400"));
            put(o, el(tags::WINDOW_WIDTH, VR::DS, "80\\2000"));
            put(o, el(tags::VOILUT_FUNCTION, VR::CS, "SIGMOID"));
            put(o, el(tags::PIXEL_PADDING_VALUE, VR::US, 4095u16));
            put(o, el(tags::PIXEL_PADDING_RANGE_LIMIT, VR::US, 4000u16));
        }))
        .unwrap();
        assert_eq!(h.rescale, Some((2.5, -1024.0)));
        assert_eq!(h.windows, [(40.0, 80.0), (400.0, 2000.0)]);
        assert_eq!(h.voi_function, VoiFunction::Sigmoid);
        assert_eq!(h.padding, Some((4095, Some(4000))));
        assert_eq!(h.modality(100), 100.0 * 2.5 - 1024.0);
        assert_eq!(h.window_range(), (-1024.0, 4095.0 * 2.5 - 1024.0));
        // Rescale needs both values.
        let h = read(&object(|o| put(o, el(tags::RESCALE_SLOPE, VR::DS, "2")))).unwrap();
        assert_eq!((h.rescale, h.modality(7)), (None, 7.0));
    }

    #[test]
    fn window_range_is_pydicoms() {
        let signed = read(&object(|o| {
            put(o, el(tags::PIXEL_REPRESENTATION, VR::US, 1u16));
        }))
        .unwrap();
        assert_eq!(signed.window_range(), (-2048.0, 2047.0));
        let lut = read(&object(|o| {
            put(
                o,
                seq(
                    tags::MODALITY_LUT_SEQUENCE,
                    vec![lut_item([3, 10, 16], vec![100, 200, 300])],
                ),
            );
        }))
        .unwrap();
        assert_eq!(lut.window_range(), (0.0, 65535.0));
        // Below, inside and past the table.
        assert_eq!(
            [lut.modality(0), lut.modality(11), lut.modality(99)],
            [100.0, 200.0, 300.0]
        );
    }

    #[test]
    fn reads_luts_packed_and_unpacked() {
        let h = read(&object(|o| {
            // Four 8-bit entries packed two per word.
            put(
                o,
                seq(
                    tags::VOILUT_SEQUENCE,
                    vec![lut_item([4, 0, 8], vec![0x0201, 0x0403])],
                ),
            );
        }))
        .unwrap();
        assert_eq!(h.voi_lut.unwrap().data, [1, 2, 3, 4]);
    }

    #[test]
    fn refuses_bad_luts() {
        let with_lut = |item: InMemDicomObject| {
            refusal(move |o| put(o, seq(tags::MODALITY_LUT_SEQUENCE, vec![item])))
        };
        let err = with_lut(InMemDicomObject::new_empty());
        assert!(
            err.contains("the Modality LUT has no valid LUT Descriptor"),
            "{err}"
        );
        let err = with_lut(lut_item([2, 0, 0], vec![1, 2]));
        assert!(
            err.contains("the Modality LUT declares 0 bits per entry"),
            "{err}"
        );
        let err = with_lut(lut_item([3, 0, 16], vec![1, 2]));
        assert!(
            err.contains("the Modality LUT declares 3 entries but holds 2"),
            "{err}"
        );
        let mut no_data = lut_item([2, 0, 16], vec![1, 2]);
        no_data.remove_element(tags::LUT_DATA);
        let err = refusal(|o| put(o, seq(tags::VOILUT_SEQUENCE, vec![no_data])));
        assert!(err.contains("the VOI LUT has no LUT Data"), "{err}");
    }

    type Edit = Box<dyn FnOnce(&mut InMemDicomObject)>;

    #[test]
    fn refuses_what_the_pixel_path_does_not_support() {
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|o| {
                    o.remove_element(tags::ROWS);
                }),
                "Rows (0028,0010) is missing",
            ),
            (
                Box::new(|o| put(o, el(tags::COLUMNS, VR::IS, "many"))),
                "Columns (0028,0011) is not a valid number",
            ),
            (
                Box::new(|o| {
                    o.remove_element(tags::BITS_ALLOCATED);
                }),
                "Bits Allocated (0028,0100) is missing",
            ),
            (
                Box::new(|o| put(o, el(tags::BITS_ALLOCATED, VR::US, 12u16))),
                "Bits Allocated is 12; 8, 16 or 32 are supported",
            ),
            (
                Box::new(|o| put(o, el(tags::BITS_STORED, VR::US, 17u16))),
                "Bits Stored (17) must be between 1 and Bits Allocated (16)",
            ),
            (
                Box::new(|o| put(o, el(tags::BITS_STORED, VR::US, 0u16))),
                "Bits Stored (0) must be",
            ),
            (
                Box::new(|o| {
                    put(o, el(tags::BITS_ALLOCATED, VR::US, 32u16));
                    put(o, el(tags::BITS_STORED, VR::US, 32u16));
                    put(o, el(tags::HIGH_BIT, VR::US, 31u16));
                }),
                "unsigned 32-bit samples",
            ),
            (
                Box::new(|o| put(o, el(tags::HIGH_BIT, VR::US, 15u16))),
                "High Bit is 15; only High Bit = Bits Stored - 1 (11) is supported",
            ),
            (
                Box::new(|o| {
                    put(
                        o,
                        el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "PALETTE COLOR"),
                    )
                }),
                "Photometric Interpretation \"PALETTE COLOR\" with 1 samples per pixel is not supported",
            ),
            (
                Box::new(|o| {
                    put(o, el(tags::SAMPLES_PER_PIXEL, VR::US, 3u16));
                    put(o, el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "RGB"));
                }),
                "colour images must have 8 bits per sample; this one has 16",
            ),
            (
                Box::new(|o| {
                    put(o, el(tags::RESCALE_SLOPE, VR::DS, "steep"));
                    put(o, el(tags::RESCALE_INTERCEPT, VR::DS, "0"));
                }),
                "Rescale Slope is not a number",
            ),
            (
                Box::new(|o| {
                    put(o, el(tags::WINDOW_CENTER, VR::DS, "40"));
                    put(o, el(tags::WINDOW_WIDTH, VR::DS, "wide"));
                }),
                "Window Width is not a number",
            ),
            (
                Box::new(|o| put(o, el(tags::VOILUT_FUNCTION, VR::CS, "CUBIC"))),
                "VOI LUT Function \"CUBIC\" is not one of LINEAR, LINEAR_EXACT, SIGMOID",
            ),
            (
                Box::new(|o| put(o, el(tags::PIXEL_PADDING_VALUE, VR::LO, "none"))),
                "Pixel Padding Value is not a number",
            ),
        ];
        for (edit, reason) in cases {
            let err = refusal(edit);
            assert!(err.contains(reason), "{reason}: {err}");
        }
    }

    #[test]
    fn reads_acquisition_and_geometry_of_enhanced_mr_from_the_functional_groups() {
        let item = |tag: Tag, inner: Vec<InMemElement>| {
            seq(tag, vec![InMemDicomObject::from_element_iter(inner)])
        };
        let h = read(&object(|o| {
            put(o, el(tags::NUMBER_OF_FRAMES, VR::IS, "2"));
            put(o, el(tags::SERIES_DESCRIPTION, VR::LO, "AX FLAIR"));
            put(o, el(tags::PULSE_SEQUENCE_NAME, VR::SH, "tir2d1"));
            put(o, el(tags::CONTRAST_BOLUS_AGENT, VR::LO, "GAD"));
            put(
                o,
                seq(
                    tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
                    vec![InMemDicomObject::from_element_iter([
                        item(
                            tags::MR_MODIFIER_SEQUENCE,
                            vec![
                                el(tags::INVERSION_RECOVERY, VR::CS, "YES"),
                                el(tags::INVERSION_TIMES, VR::FD, 2500.0f64),
                            ],
                        ),
                        item(
                            tags::MR_ECHO_SEQUENCE,
                            vec![el(tags::EFFECTIVE_ECHO_TIME, VR::FD, 90.0f64)],
                        ),
                        item(
                            tags::MR_TIMING_AND_RELATED_PARAMETERS_SEQUENCE,
                            vec![el(tags::REPETITION_TIME, VR::FD, 9000.0f64)],
                        ),
                        item(
                            tags::PLANE_ORIENTATION_SEQUENCE,
                            vec![el(
                                tags::IMAGE_ORIENTATION_PATIENT,
                                VR::DS,
                                "1\\0\\0\\0\\1\\0",
                            )],
                        ),
                    ])],
                ),
            );
            let frame = |z: &str| {
                InMemDicomObject::from_element_iter([item(
                    tags::PLANE_POSITION_SEQUENCE,
                    vec![el(tags::IMAGE_POSITION_PATIENT, VR::DS, z)],
                )])
            };
            put(
                o,
                seq(
                    tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
                    vec![frame("0\\0\\1"), frame("0\\0\\2\\9")],
                ),
            );
        }))
        .unwrap();
        assert_eq!(h.frames, 2);
        let a = &h.acquisition;
        assert_eq!(a.series_description, "AX FLAIR");
        assert_eq!(a.sequence_name, "tir2d1");
        assert!(a.inversion_recovery);
        assert_eq!(
            (a.inversion_time_ms, a.echo_time_ms, a.repetition_time_ms),
            (Some(2500.0), Some(90.0), Some(9000.0))
        );
        assert_eq!(a.contrast_agent, "GAD");
        let g = &h.geometry;
        assert_eq!(g.orientation, Some([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]));
        // A position of four values is no position.
        assert_eq!(g.frame_positions, [Some([0.0, 0.0, 1.0]), None]);
        assert_eq!(g.sop_class_uid, "1.2.840.10008.5.1.4.1.1.4");
    }

    #[test]
    fn reads_classic_acquisition_attributes() {
        let h = read(&object(|o| {
            put(o, el(tags::SCANNING_SEQUENCE, VR::CS, "SE\\IR"));
            put(o, el(tags::SEQUENCE_NAME, VR::SH, "*tir2d1"));
            put(o, el(tags::INVERSION_TIME, VR::DS, "2400"));
            put(o, el(tags::ECHO_TIME, VR::DS, "85"));
            put(o, el(tags::REPETITION_TIME, VR::DS, "8000"));
            put(o, el(tags::INSTANCE_NUMBER, VR::IS, "7"));
            put(o, el(tags::IMAGE_POSITION_PATIENT, VR::DS, "1\\2\\3"));
        }))
        .unwrap();
        let a = &h.acquisition;
        assert_eq!(a.scanning_sequence, ["SE", "IR"]);
        assert!(a.inversion_recovery);
        assert_eq!(a.sequence_name, "*tir2d1");
        assert_eq!(
            (a.inversion_time_ms, a.echo_time_ms, a.repetition_time_ms),
            (Some(2400.0), Some(85.0), Some(8000.0))
        );
        assert_eq!(h.geometry.instance_number, Some(7));
        assert_eq!(h.geometry.position, Some([1.0, 2.0, 3.0]));
    }
}
