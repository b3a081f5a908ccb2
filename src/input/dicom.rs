//! DICOM Part 10 files → per-frame modality values (or 8-bit RGB), with the DICOM pixel semantics
//! the training export applied: Bits Allocated/Stored, Pixel Representation, Modality LUT (Rescale
//! Slope/Intercept or a Modality LUT Sequence), Pixel Padding Value, photometric interpretation,
//! Planar Configuration, multi-frame. Windowing (VOI) is the model's choice and lives in
//! [`crate::preprocess::voi`].
//!
//! Hostile files are stopped before the parser sees them: [`prescan`] walks every element header
//! of the file (inflating a deflated data set up to a limit) and refuses any declared length past
//! the end of the data, sequences nested deeper than [`MAX_DEPTH`], and unsupported transfer
//! syntaxes; the pixel geometry is checked against the limits before anything is decoded.
//! Decoding itself is dicom-rs (`dicom-object`, `dicom-pixeldata`).

use std::io::Read;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions, file::ReadPreamble};
use dicom_pixeldata::PixelDecoder;

use super::{InputError, InputLimits, Pixels};

/// Deepest nesting of sequences accepted. Enhanced MR functional groups nest 3–4 levels.
pub const MAX_DEPTH: usize = 32;

/// Transfer syntaxes this build decodes: (UID, name).
pub const SUPPORTED_TRANSFER_SYNTAXES: &[(&str, &str)] = &[
    ("1.2.840.10008.1.2", "Implicit VR Little Endian"),
    ("1.2.840.10008.1.2.1", "Explicit VR Little Endian"),
    ("1.2.840.10008.1.2.2", "Explicit VR Big Endian"),
    (
        "1.2.840.10008.1.2.1.99",
        "Deflated Explicit VR Little Endian",
    ),
    ("1.2.840.10008.1.2.5", "RLE Lossless"),
    ("1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)"),
    ("1.2.840.10008.1.2.4.51", "JPEG Extended (Process 2 & 4)"),
    ("1.2.840.10008.1.2.4.57", "JPEG Lossless (Process 14)"),
    (
        "1.2.840.10008.1.2.4.70",
        "JPEG Lossless (Process 14, Selection Value 1)",
    ),
    ("1.2.840.10008.1.2.4.80", "JPEG-LS Lossless"),
    ("1.2.840.10008.1.2.4.81", "JPEG-LS Near-Lossless"),
    ("1.2.840.10008.1.2.4.90", "JPEG 2000 Lossless"),
    ("1.2.840.10008.1.2.4.91", "JPEG 2000"),
];

const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";
const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";

/// Names of a few transfer syntaxes that are refused, for a clearer message.
const KNOWN_UNSUPPORTED: &[(&str, &str)] = &[
    ("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile"),
    ("1.2.840.10008.1.2.4.101", "MPEG2 High Profile"),
    ("1.2.840.10008.1.2.4.102", "MPEG-4 AVC/H.264"),
    ("1.2.840.10008.1.2.4.103", "MPEG-4 AVC/H.264 BD"),
    ("1.2.840.10008.1.2.4.107", "HEVC/H.265 Main"),
    ("1.2.840.10008.1.2.4.108", "HEVC/H.265 Main 10"),
    ("1.2.840.10008.1.2.4.110", "JPEG XL Lossless"),
    ("1.2.840.10008.1.2.4.111", "JPEG XL JPEG Recompression"),
    ("1.2.840.10008.1.2.4.112", "JPEG XL"),
    (
        "1.2.840.10008.1.2.4.201",
        "High-Throughput JPEG 2000 Lossless",
    ),
    (
        "1.2.840.10008.1.2.4.202",
        "High-Throughput JPEG 2000 RPCL Lossless",
    ),
    ("1.2.840.10008.1.2.4.203", "High-Throughput JPEG 2000"),
    ("1.2.840.10008.1.2.4.92", "JPEG 2000 Part 2 Lossless"),
    ("1.2.840.10008.1.2.4.93", "JPEG 2000 Part 2"),
    ("1.2.840.10008.1.2.4.94", "JPIP Referenced"),
    ("1.2.840.10008.1.2.4.95", "JPIP Referenced Deflate"),
];

/// True when the data is a DICOM Part 10 file: `DICM` after the 128-byte preamble, or at the
/// start when a sender stripped the preamble.
pub fn is_dicom(data: &[u8]) -> bool {
    data.get(128..132) == Some(b"DICM") || data.starts_with(b"DICM")
}

/// The identifiers a PACS files a result under. UIDs carry no patient data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DicomIds {
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
}

/// Attributes of the source instance that a derived object (the structured report) must copy so
/// the PACS files it with the study: the Patient, General Study and Patient Study modules, and the
/// series and frame-of-reference identifiers. It holds patient data, so its `Debug` shows only
/// how many attributes it holds; never log its contents.
#[derive(Clone, PartialEq)]
pub struct PatientContext(pub InMemDicomObject);

impl std::fmt::Debug for PatientContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PatientContext({} attributes, redacted)",
            self.0.iter().count()
        )
    }
}

/// The attributes [`PatientContext`] copies.
pub const CONTEXT_TAGS: &[Tag] = &[
    // Patient module.
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::ISSUER_OF_PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::OTHER_PATIENT_I_DS_SEQUENCE,
    // General Study module.
    tags::STUDY_INSTANCE_UID,
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::STUDY_ID,
    tags::ACCESSION_NUMBER,
    tags::STUDY_DESCRIPTION,
    // Patient Study module.
    tags::PATIENT_AGE,
    tags::PATIENT_SIZE,
    tags::PATIENT_WEIGHT,
    // Identity of the source instance and series.
    tags::SOP_CLASS_UID,
    tags::SOP_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::SERIES_NUMBER,
    tags::SERIES_DESCRIPTION,
    tags::MODALITY,
    tags::FRAME_OF_REFERENCE_UID,
    tags::SPECIFIC_CHARACTER_SET,
];

impl PatientContext {
    fn of(object: &InMemDicomObject) -> Self {
        let mut context = InMemDicomObject::new_empty();
        for tag in CONTEXT_TAGS {
            if let Some(element) = object.get(*tag) {
                context.put(element.clone());
            }
        }
        PatientContext(context)
    }
}

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

/// One frame's pixels.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// Stored values (Bits Stored, sign-extended), row-major, and which pixels are padding;
    /// [`Header::modality`] gives a stored value's modality value.
    Mono {
        width: u32,
        height: u32,
        stored: Vec<i32>,
        padding: Option<Vec<bool>>,
    },
    /// 8-bit RGB, interleaved.
    Color(Pixels),
}

/// A decoded instance.
#[derive(Debug, Clone, PartialEq)]
pub struct DicomImage {
    pub header: Header,
    pub frames: Vec<Frame>,
    pub context: PatientContext,
}

fn invalid(message: impl Into<String>) -> InputError {
    InputError::Decode {
        format: "DICOM",
        message: message.into(),
    }
}

/// Bytes decoding will allocate, from the header alone, after the structural checks of
/// [`prescan`] and the geometry checks of [`decode`].
pub fn decoded_size(data: &[u8], limits: &InputLimits) -> Result<u64, InputError> {
    let object = parse(data, limits, Some(tags::PIXEL_DATA))?;
    let header = header(&object)?;
    check_geometry(&header, limits)
}

/// The header alone (parsed up to Pixel Data) and the bytes decoding will allocate: what a series
/// is sorted, checked and budgeted by before any pixel is decoded.
pub fn read_header(data: &[u8], limits: &InputLimits) -> Result<(Header, u64), InputError> {
    let object = parse(data, limits, Some(tags::PIXEL_DATA))?;
    let header = header(&object)?;
    let size = check_geometry(&header, limits)?;
    Ok((header, size))
}

/// Decodes every frame of a DICOM instance.
pub fn decode(data: &[u8], limits: &InputLimits) -> Result<DicomImage, InputError> {
    let object = parse(data, limits, None)?;
    let header = header(&object)?;
    check_geometry(&header, limits)?;
    if object.get(tags::PIXEL_DATA).is_none() {
        return Err(invalid("the instance has no Pixel Data (7FE0,0010)"));
    }
    if header.transfer_syntax == JPEG_EXTENDED && header.bits_stored > 8 {
        // jpeg-decoder, dicom-rs's JPEG decoder, has no 12-bit DCT: libjpeg-turbo decodes it.
        let data = jpeg12::decode(&object, &header)?;
        let frames = frames(&header, &data, false, false)?;
        let context = PatientContext::of(&object);
        return Ok(DicomImage {
            header,
            frames,
            context,
        });
    }
    // The codecs are third-party code fed hostile bytes: a panic in one (dicom-rs's RLE decoder
    // indexes past its buffer on some malformed segments, found by tests/fuzz.rs) is an error for
    // this image, not a crash of the preprocessing pool.
    let decoded = unwind(|| object.decode_pixel_data())
        .map_err(|()| {
            invalid(format!(
                "the {} decoder failed on malformed pixel data",
                ts_name(&header.transfer_syntax)
            ))
        })?
        .map_err(|e| {
            invalid(format!(
                "pixel data ({}) could not be decoded: {}",
                ts_name(&header.transfer_syntax),
                error_chain(&e)
            ))
        })?;
    let planar = matches!(
        decoded.planar_configuration(),
        dicom_pixeldata::PlanarConfiguration::PixelFirst
    );
    let ybr = matches!(
        decoded.photometric_interpretation(),
        dicom_pixeldata::PhotometricInterpretation::YbrFull
    );
    let frames = frames(&header, decoded.data(), planar, ybr)?;
    let context = PatientContext::of(&object);
    Ok(DicomImage {
        header,
        frames,
        context,
    })
}

/// An error and its sources, each first line cleaned, joined by ": ".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = vec![super::image::clean_message(&error.to_string())];
    let mut source = error.source();
    while let Some(e) = source {
        let part = super::image::clean_message(&e.to_string());
        if !parts.contains(&part) {
            parts.push(part);
        }
        source = e.source();
    }
    parts.join(": ")
}

fn ts_name(uid: &str) -> String {
    SUPPORTED_TRANSFER_SYNTAXES
        .iter()
        .chain(KNOWN_UNSUPPORTED)
        .find(|(u, _)| *u == uid)
        .map_or_else(|| uid.to_string(), |(u, name)| format!("{name}, {u}"))
}

/// Checks the file's structure, then parses it with dicom-object (up to `until`, when given).
fn parse(
    data: &[u8],
    limits: &InputLimits,
    until: Option<Tag>,
) -> Result<DefaultDicomObject, InputError> {
    limits.check_size(data)?;
    let body = prescan(data, limits)?;
    let mut options = OpenFileOptions::new().read_preamble(ReadPreamble::Never);
    if let Some(tag) = until {
        options = options.read_until(tag);
    }
    unwind(|| options.from_reader(body))
        .map_err(|()| invalid("the DICOM parser failed on malformed data"))?
        .map_err(|e| invalid(format!("the file could not be parsed: {}", error_chain(&e))))
}

/// Runs third-party parsing or decoding, turning a panic into `Err(())`.
fn unwind<T>(f: impl FnOnce() -> T) -> Result<T, ()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| ())
}

/// Structural checks before parsing; returns the file from `DICM` on. Walks every element header
/// (of the inflated data set, for the deflated transfer syntax) and refuses lengths past the end,
/// undefined lengths where none may be, nesting deeper than [`MAX_DEPTH`] and transfer syntaxes
/// this build cannot decode.
pub fn prescan<'a>(data: &'a [u8], limits: &InputLimits) -> Result<&'a [u8], InputError> {
    let body = if data.get(128..132) == Some(b"DICM") {
        &data[128..]
    } else if data.starts_with(b"DICM") {
        data
    } else {
        return Err(InputError::UnknownFormat(
            "no DICM marker at byte 128 (or 0): not a DICOM Part 10 file".into(),
        ));
    };
    let (transfer_syntax, dataset_start) = meta(body)?;
    if !SUPPORTED_TRANSFER_SYNTAXES
        .iter()
        .any(|(uid, _)| *uid == transfer_syntax)
    {
        return Err(invalid(format!(
            "transfer syntax {} is not supported; supported: {}",
            ts_name(&transfer_syntax),
            SUPPORTED_TRANSFER_SYNTAXES
                .iter()
                .map(|(_, name)| *name)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let rest = &body[dataset_start..];
    let inflated;
    let dataset = if transfer_syntax == DEFLATED {
        // The inflated data set may be no larger than an uncompressed file could be.
        let limit = limits.max_image_bytes as u64;
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(rest)
            .take(limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| invalid(format!("the deflated data set is corrupt: {e}")))?;
        if out.len() as u64 > limit {
            return Err(invalid(format!(
                "the deflated data set inflates to more than {limit} bytes, the limit for one \
                 image"
            )));
        }
        inflated = out;
        &inflated[..]
    } else {
        rest
    };
    let mut walker = Walker {
        data: dataset,
        pos: 0,
        explicit: transfer_syntax != IMPLICIT_LE,
        big_endian: transfer_syntax == EXPLICIT_BE,
    };
    match walker.dataset(dataset.len(), 0)? {
        Stop::End => Ok(body),
        Stop::ItemEnd | Stop::SequenceEnd => Err(invalid(format!(
            "unexpected delimiter at byte {} of the data set",
            walker.pos
        ))),
    }
}

/// The File Meta Information (always explicit VR little endian): the transfer syntax UID and
/// where the data set starts, relative to `DICM`.
fn meta(body: &[u8]) -> Result<(String, usize), InputError> {
    let mut pos = 4;
    let mut transfer_syntax = None;
    while let Some(head) = body.get(pos..pos + 8) {
        let group = u16::from_le_bytes([head[0], head[1]]);
        if group != 0x0002 {
            break;
        }
        let element = u16::from_le_bytes([head[2], head[3]]);
        let vr = [head[4], head[5]];
        let (len, header_len) = if long_length_vr(vr) {
            let l = body
                .get(pos + 8..pos + 12)
                .ok_or_else(|| invalid("the file meta information is cut short"))?;
            (u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize, 12)
        } else {
            (u16::from_le_bytes([head[6], head[7]]) as usize, 8)
        };
        let value = body.get(pos + header_len..pos + header_len + len).ok_or_else(|| {
            invalid(format!(
                "file meta element (0002,{element:04X}) declares {len} bytes past the end of the file"
            ))
        })?;
        if element == 0x0010 {
            transfer_syntax = Some(
                String::from_utf8_lossy(value)
                    .trim_matches(['\0', ' '])
                    .to_string(),
            );
        }
        pos += header_len + len;
    }
    let transfer_syntax = transfer_syntax
        .ok_or_else(|| invalid("the file meta information has no Transfer Syntax UID"))?;
    Ok((transfer_syntax, pos))
}

fn long_length_vr(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
        b"OB"
            | b"OD"
            | b"OF"
            | b"OL"
            | b"OV"
            | b"OW"
            | b"SQ"
            | b"SV"
            | b"UC"
            | b"UN"
            | b"UR"
            | b"UT"
            | b"UV"
    )
}

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_END: (u16, u16) = (0xFFFE, 0xE0DD);

/// What ended a walk over elements.
enum Stop {
    End,
    ItemEnd,
    SequenceEnd,
}

/// A walk over element headers that checks lengths and nesting without allocating.
struct Walker<'a> {
    data: &'a [u8],
    pos: usize,
    explicit: bool,
    big_endian: bool,
}

impl Walker<'_> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], InputError> {
        let b = self
            .data
            .get(self.pos..self.pos + N)
            .ok_or_else(|| invalid(format!("the data set is cut short at byte {}", self.pos)))?;
        self.pos += N;
        Ok(b.try_into().expect("N bytes"))
    }

    fn u16(&mut self) -> Result<u16, InputError> {
        let b = self.bytes::<2>()?;
        Ok(if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&mut self) -> Result<u32, InputError> {
        let b = self.bytes::<4>()?;
        Ok(if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    /// Skips `len` bytes, which must end by `end`.
    fn skip(&mut self, len: u32, end: usize, tag: (u16, u16)) -> Result<(), InputError> {
        let remaining = end.saturating_sub(self.pos);
        if len as usize > remaining {
            return Err(invalid(format!(
                "element ({:04X},{:04X}) declares {len} bytes, but only {remaining} remain",
                tag.0, tag.1
            )));
        }
        self.pos += len as usize;
        Ok(())
    }

    /// Elements until `end`, or until an item or sequence delimiter.
    fn dataset(&mut self, end: usize, depth: usize) -> Result<Stop, InputError> {
        while self.pos < end {
            let tag = (self.u16()?, self.u16()?);
            if tag == ITEM_END || tag == SEQUENCE_END {
                self.u32()?;
                return Ok(if tag == ITEM_END {
                    Stop::ItemEnd
                } else {
                    Stop::SequenceEnd
                });
            }
            if tag == ITEM {
                return Err(invalid(format!(
                    "an item outside a sequence at byte {}",
                    self.pos - 4
                )));
            }
            let (sequence, len) = if self.explicit {
                let vr = self.bytes::<2>()?;
                let len = if long_length_vr(vr) {
                    self.bytes::<2>()?;
                    self.u32()?
                } else {
                    u32::from(self.u16()?)
                };
                (&vr == b"SQ" || (&vr == b"UN" && len == UNDEFINED), len)
            } else {
                let len = self.u32()?;
                let is_sq = dicom_core::dictionary::DataDictionary::by_tag(
                    &dicom_dictionary_std::StandardDataDictionary,
                    Tag(tag.0, tag.1),
                )
                .is_some_and(|entry| {
                    matches!(entry.vr, dicom_core::dictionary::VirtualVr::Exact(vr) if vr == dicom_core::VR::SQ)
                });
                (is_sq || len == UNDEFINED, len)
            };
            if tag == (0x7FE0, 0x0010) && len == UNDEFINED {
                self.fragments(end)?;
            } else if sequence {
                self.sequence(len, end, depth + 1, tag)?;
            } else if len == UNDEFINED {
                return Err(invalid(format!(
                    "element ({:04X},{:04X}) has an undefined length but is not a sequence",
                    tag.0, tag.1
                )));
            } else {
                self.skip(len, end, tag)?;
            }
        }
        Ok(Stop::End)
    }

    /// The items of a sequence of `len` bytes (or undefined length).
    fn sequence(
        &mut self,
        len: u32,
        end: usize,
        depth: usize,
        tag: (u16, u16),
    ) -> Result<(), InputError> {
        if depth > MAX_DEPTH {
            return Err(invalid(format!(
                "sequences are nested more than {MAX_DEPTH} levels deep"
            )));
        }
        let seq_end = if len == UNDEFINED {
            end
        } else {
            let start = self.pos;
            self.skip(len, end, tag)?;
            self.pos = start;
            start + len as usize
        };
        while self.pos < seq_end {
            let item = (self.u16()?, self.u16()?);
            let item_len = self.u32()?;
            if item == SEQUENCE_END {
                if len == UNDEFINED {
                    return Ok(());
                }
                return Err(invalid(
                    "a sequence delimiter in a sequence of defined length",
                ));
            }
            if item != ITEM {
                return Err(invalid(format!(
                    "sequence ({:04X},{:04X}) holds ({:04X},{:04X}) where an item belongs",
                    tag.0, tag.1, item.0, item.1
                )));
            }
            let stop = if item_len == UNDEFINED {
                self.dataset(seq_end, depth)?
            } else {
                let start = self.pos;
                self.skip(item_len, seq_end, tag)?;
                self.pos = start;
                self.dataset(start + item_len as usize, depth)?
            };
            match (stop, item_len == UNDEFINED) {
                (Stop::ItemEnd, true) | (Stop::End, false) => {}
                _ => return Err(invalid("an item ends in the wrong place")),
            }
        }
        if len == UNDEFINED {
            return Err(invalid(format!(
                "sequence ({:04X},{:04X}) has no end",
                tag.0, tag.1
            )));
        }
        Ok(())
    }

    /// Encapsulated pixel data: items of defined length up to the sequence delimiter.
    fn fragments(&mut self, end: usize) -> Result<(), InputError> {
        loop {
            let tag = (self.u16()?, self.u16()?);
            let len = self.u32()?;
            if tag == SEQUENCE_END {
                return Ok(());
            }
            if tag != ITEM || len == UNDEFINED {
                return Err(invalid(
                    "encapsulated pixel data holds something other than fragments",
                ));
            }
            self.skip(len, end, (0x7FE0, 0x0010))?;
        }
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

fn header(object: &DefaultDicomObject) -> Result<Header, InputError> {
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
        ("YBR_FULL_422" | "YBR_ICT" | "YBR_RCT", 3) => Photometric::Rgb,
        (other, n) => {
            return Err(invalid(format!(
                "Photometric Interpretation {other:?} with {n} samples per pixel is not supported \
                 (MONOCHROME1, MONOCHROME2, RGB and YBR_FULL are)"
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
    }
}

/// Refuses empty and oversized geometry; returns what decoding will allocate: the decoded
/// samples plus one f64 per pixel.
fn check_geometry(header: &Header, limits: &InputLimits) -> Result<u64, InputError> {
    let (rows, columns, frames) = (header.rows, header.columns, header.frames);
    if rows == 0 || columns == 0 || frames == 0 {
        return Err(invalid(format!(
            "the image is {columns}×{rows} with {frames} frames: no pixels"
        )));
    }
    let pixels = u64::from(rows) * u64::from(columns);
    if pixels > limits.max_pixels {
        return Err(InputError::TooManyPixels {
            width: columns,
            height: rows,
            pixels,
            limit: limits.max_pixels,
        });
    }
    let sample_bytes = u64::from(header.bits_allocated / 8) * u64::from(header.samples_per_pixel);
    pixels
        .checked_mul(u64::from(frames))
        .and_then(|p| p.checked_mul(sample_bytes + 8))
        .filter(|bytes| *bytes <= 16 * limits.max_image_bytes as u64 + (1 << 30))
        .ok_or_else(|| {
            invalid(format!(
                "{columns}×{rows} pixels × {frames} frames × {sample_bytes} bytes is too large to \
                 decode"
            ))
        })
}

/// Splits the decoded samples into frames of modality values (or RGB).
/// `planar`: colour samples come plane by plane; `ybr`: they are still YBR_FULL after decoding.
fn frames(header: &Header, data: &[u8], planar: bool, ybr: bool) -> Result<Vec<Frame>, InputError> {
    let (width, height) = (header.columns, header.rows);
    let pixels = width as usize * height as usize;
    let samples = header.samples_per_pixel as usize;
    let sample_bytes = header.bits_allocated as usize / 8;
    let frame_bytes = pixels * samples * sample_bytes;
    let frames = header.frames as usize;
    if data.len() < frame_bytes * frames {
        return Err(invalid(format!(
            "the pixel data holds {} bytes; {width}×{height} × {frames} frames × {samples} samples × \
             {sample_bytes} bytes need {}",
            data.len(),
            frame_bytes * frames
        )));
    }
    let mut out = Vec::with_capacity(frames);
    for frame in data.chunks_exact(frame_bytes).take(frames) {
        if samples == 3 {
            let mut rgb = if planar {
                let (r, rest) = frame.split_at(pixels);
                let (g, b) = rest.split_at(pixels);
                (0..pixels).flat_map(|i| [r[i], g[i], b[i]]).collect()
            } else {
                frame.to_vec()
            };
            if header.photometric == Photometric::YbrFull && ybr {
                ybr_full_to_rgb(&mut rgb);
            }
            out.push(Frame::Color(Pixels {
                width,
                height,
                channels: 3,
                data: rgb,
            }));
            continue;
        }
        let stored = stored_values(frame, header);
        let padding = header.padding.map(|(value, limit)| {
            let (lo, hi) = match limit {
                Some(limit) => (value.min(limit), value.max(limit)),
                None => (value, value),
            };
            stored
                .iter()
                .map(|&s| (lo..=hi).contains(&i64::from(s)))
                .collect()
        });
        out.push(Frame::Mono {
            width,
            height,
            stored,
            padding,
        });
    }
    Ok(out)
}

/// Stored values as pydicom's `pixel_array` gives them: the Bits Stored low bits, sign-extended
/// when Pixel Representation is 1.
fn stored_values(frame: &[u8], header: &Header) -> Vec<i32> {
    let bits = u32::from(header.bits_stored);
    // Bits Stored ≤ 31, or 32 signed (checked with the header): every value fits an i32.
    let extend = |raw: u64| -> i32 {
        let masked = raw & ((1u64 << bits) - 1);
        if header.signed && masked >> (bits - 1) & 1 == 1 {
            (masked as i64 - (1i64 << bits)) as i32
        } else {
            masked as i32
        }
    };
    match header.bits_allocated {
        8 => frame.iter().map(|&b| extend(u64::from(b))).collect(),
        // The common MR case, kept branch-free so it vectorises.
        16 if !header.signed => {
            let mask = ((1u32 << bits) - 1) as u16;
            frame
                .chunks_exact(2)
                .map(|b| i32::from(u16::from_le_bytes([b[0], b[1]]) & mask))
                .collect()
        }
        16 => frame
            .chunks_exact(2)
            .map(|b| extend(u64::from(u16::from_le_bytes([b[0], b[1]]))))
            .collect(),
        _ => frame
            .chunks_exact(4)
            .map(|b| extend(u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))))
            .collect(),
    }
}

/// YBR_FULL → RGB, as pydicom's `convert_color_space` does it.
fn ybr_full_to_rgb(data: &mut [u8]) {
    for p in data.chunks_exact_mut(3) {
        let (y, cb, cr) = (
            f32::from(p[0]),
            f32::from(p[1]) - 128.0,
            f32::from(p[2]) - 128.0,
        );
        // pydicom's float32 matrix, its entries computed in float64.
        const G_CB: f32 = (-0.114f64 * 1.772 / 0.587) as f32;
        const G_CR: f32 = (-0.299f64 * 1.402 / 0.587) as f32;
        let r = y + 1.402 * cr;
        let g = y + G_CB * cb + G_CR * cr;
        let b = y + 1.772 * cb;
        for (out, v) in p.iter_mut().zip([r, g, b]) {
            *out = (v + 0.5).floor().clamp(0.0, 255.0) as u8;
        }
    }
}

/// 12-bit JPEG Extended (Process 4) through libjpeg-turbo 3.1 (`turbojpeg-sys`, built from its
/// bundled source), whose 12-bit DCT jpeg-decoder lacks.
mod jpeg12 {
    use std::ffi::{CStr, c_int};

    use dicom_core::value::Value;
    use turbojpeg_sys as tj;

    use super::{DefaultDicomObject, Header, InputError, invalid, tags};

    /// Frees the decompressor however decoding ends.
    struct Handle(tj::tjhandle);

    impl Drop for Handle {
        fn drop(&mut self) {
            // SAFETY: a handle from tj3Init, destroyed once.
            unsafe { tj::tj3Destroy(self.0) }
        }
    }

    impl Handle {
        fn error(&self, what: &str) -> InputError {
            // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the handle.
            let message = unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) }
                .to_string_lossy()
                .into_owned();
            invalid(format!(
                "12-bit JPEG Extended pixel data could not be decoded ({what}): {message}"
            ))
        }
    }

    /// Every frame's samples as 16-bit little-endian, frames concatenated.
    pub fn decode(object: &DefaultDicomObject, header: &Header) -> Result<Vec<u8>, InputError> {
        if header.samples_per_pixel != 1 {
            return Err(invalid(
                "12-bit JPEG Extended is supported for monochrome images only",
            ));
        }
        let element = object
            .get(tags::PIXEL_DATA)
            .ok_or_else(|| invalid("the instance has no Pixel Data (7FE0,0010)"))?;
        let Value::PixelSequence(sequence) = element.value() else {
            return Err(invalid(
                "JPEG Extended pixel data is not encapsulated in fragments",
            ));
        };
        let fragments = sequence.fragments();
        let frames = header.frames as usize;
        let codestreams: Vec<Vec<u8>> = if frames == 1 {
            vec![fragments.iter().flatten().copied().collect()]
        } else if fragments.len() == frames {
            fragments.iter().map(|f| f.to_vec()).collect()
        } else {
            return Err(invalid(format!(
                "{} fragments for {frames} frames: only one fragment per frame is supported for \
                 multi-frame 12-bit JPEG",
                fragments.len()
            )));
        };
        let mut out =
            Vec::with_capacity(frames * header.rows as usize * header.columns as usize * 2);
        for codestream in &codestreams {
            // SAFETY: tj3Init has no preconditions; a null handle is checked.
            let handle = Handle(unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) });
            if handle.0.is_null() {
                return Err(invalid("the 12-bit JPEG decoder could not be initialised"));
            }
            // SAFETY: the pointer and length describe `codestream`, alive for the call.
            if unsafe {
                tj::tj3DecompressHeader(
                    handle.0,
                    codestream.as_ptr(),
                    codestream.len() as tj::size_t,
                )
            } != 0
            {
                return Err(handle.error("header"));
            }
            // SAFETY: reading parameters of a handle that has read a header.
            let (width, height, precision) = unsafe {
                (
                    tj::tj3Get(handle.0, tj::TJPARAM_TJPARAM_JPEGWIDTH as c_int),
                    tj::tj3Get(handle.0, tj::TJPARAM_TJPARAM_JPEGHEIGHT as c_int),
                    tj::tj3Get(handle.0, tj::TJPARAM_TJPARAM_PRECISION as c_int),
                )
            };
            if i64::from(width) != i64::from(header.columns)
                || i64::from(height) != i64::from(header.rows)
                || precision != 12
            {
                return Err(invalid(format!(
                    "the JPEG codestream is {width}×{height} with {precision}-bit samples; the \
                     header says {}×{} with {} bits stored",
                    header.columns, header.rows, header.bits_stored
                )));
            }
            let mut samples = vec![0i16; width as usize * height as usize];
            // SAFETY: `samples` holds width × height 12-bit gray samples (pitch 0: packed), the
            // size the header just reported; the codestream is alive for the call.
            if unsafe {
                tj::tj3Decompress12(
                    handle.0,
                    codestream.as_ptr(),
                    codestream.len() as tj::size_t,
                    samples.as_mut_ptr(),
                    0,
                    tj::TJPF_TJPF_GRAY as c_int,
                )
            } != 0
            {
                // Warnings (e.g. a truncated scan) count as errors: a damaged image is refused.
                return Err(handle.error("scan"));
            }
            out.extend(samples.iter().flat_map(|&v| (v as u16).to_le_bytes()));
        }
        Ok(out)
    }
}
