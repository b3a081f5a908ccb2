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
//!
//! [`prescan`] (the structural checks), `un` (attributes stored as UN, read with the dictionary's
//! VR), `header` (the attributes read), `pixels` (frames and the bytes decoding allocates) and
//! `jpeg` (the JPEG dicom-rs's adapter gets wrong: 12-bit, through libjpeg-turbo, and RGB without a
//! colour-transform marker); this module ties them together.

mod header;
mod jpeg;
mod pixels;
mod prescan;
pub use prescan::value_unit;
mod un;

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions, file::ReadPreamble};

pub use self::header::{Acquisition, Geometry, Header, Lut, Photometric, VoiFunction};
pub use self::pixels::Frame;
pub use self::prescan::{MAX_DEPTH, prescan};

use super::{InputError, InputLimits};

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
const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
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
    let header = header::read(&object)?;
    pixels::check_geometry(&header, limits)
}

/// The header alone (parsed up to Pixel Data) and the bytes decoding will allocate: what a series
/// is sorted, checked and budgeted by before any pixel is decoded.
pub fn read_header(data: &[u8], limits: &InputLimits) -> Result<(Header, u64), InputError> {
    let object = parse(data, limits, Some(tags::PIXEL_DATA))?;
    let header = header::read(&object)?;
    let size = pixels::check_geometry(&header, limits)?;
    Ok((header, size))
}

/// The attributes a derived object copies from this instance ([`PatientContext`]), from its
/// header alone.
pub fn read_context(data: &[u8], limits: &InputLimits) -> Result<PatientContext, InputError> {
    let object = parse(data, limits, Some(tags::PIXEL_DATA))?;
    Ok(PatientContext::of(&object))
}

/// Decodes every frame of a DICOM instance.
pub fn decode(data: &[u8], limits: &InputLimits) -> Result<DicomImage, InputError> {
    let object = parse(data, limits, None)?;
    let header = header::read(&object)?;
    pixels::check_geometry(&header, limits)?;
    if object.get(tags::PIXEL_DATA).is_none() {
        return Err(invalid("the instance has no Pixel Data (7FE0,0010)"));
    }
    let frames = pixels::decode(&object, &header)?;
    let context = PatientContext::of(&object);
    Ok(DicomImage {
        header,
        frames,
        context,
    })
}

/// An error and its sources, each first line cleaned, joined by ": ".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = vec![super::message::clean_message(&error.to_string())];
    let mut source = error.source();
    while let Some(e) = source {
        let part = super::message::clean_message(&e.to_string());
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
    let scan = prescan::scan(data, limits)?;
    let mut options = OpenFileOptions::new().read_preamble(ReadPreamble::Never);
    if let Some(tag) = until {
        options = options.read_until(tag);
    }
    let mut object = unwind(|| options.from_reader(scan.body))
        .map_err(|()| invalid("the DICOM parser failed on malformed data"))?
        .map_err(|e| invalid(format!("the file could not be parsed: {}", error_chain(&e))))?;
    let big_endian = object.meta().transfer_syntax().trim_matches(['\0', ' ']) == EXPLICIT_BE;
    un::resolve(&mut object, big_endian);
    match scan.pixel_data {
        Some((0x7FE0, 0x0010)) => Ok(object),
        Some((group, element)) => Err(invalid(format!(
            "the instance holds floating-point pixel data ({group:04X},{element:04X}), which is \
             not supported"
        ))),
        // A structured report, a waveform, an RT plan: say so, rather than what an image would
        // miss (Rows, ...).
        None => Err(invalid(format!(
            "the instance has no Pixel Data (7FE0,0010): not an image (SOP Class UID {})",
            object
                .get(tags::SOP_CLASS_UID)
                .and_then(|e| e.to_str().ok())
                .map(|uid| uid
                    .trim_matches(['\0', ' '])
                    .chars()
                    .take(64)
                    .collect::<String>())
                .filter(|uid| !uid.is_empty())
                .unwrap_or_else(|| "absent".into())
        ))),
    }
}

/// Runs third-party parsing or decoding, turning a panic into `Err(())`.
fn unwind<T>(f: impl FnOnce() -> T) -> Result<T, ()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_dicom_finds_the_marker_after_the_preamble_or_at_the_start() {
        let mut preambled = vec![0; 128];
        preambled.extend_from_slice(b"DICM\x02\x00");
        assert!(is_dicom(&preambled));
        assert!(is_dicom(b"DICM\x02\x00\x00\x00"));
        assert!(!is_dicom(&preambled[..130]));
        assert!(!is_dicom(b"\x89PNG\r\n\x1a\n"));
    }

    #[test]
    fn transfer_syntaxes_are_named_with_their_uid() {
        assert_eq!(
            ts_name("1.2.840.10008.1.2.5"),
            "RLE Lossless, 1.2.840.10008.1.2.5"
        );
        assert_eq!(
            ts_name("1.2.840.10008.1.2.4.102"),
            "MPEG-4 AVC/H.264, 1.2.840.10008.1.2.4.102"
        );
        assert_eq!(ts_name("1.2.3"), "1.2.3");
    }

    #[test]
    fn the_patient_context_copies_its_attributes_and_never_shows_them() {
        let object = InMemDicomObject::from_element_iter([
            dicom_core::DataElement::new(
                tags::PATIENT_NAME,
                dicom_core::VR::PN,
                dicom_core::PrimitiveValue::from("Doe^Jane"),
            ),
            dicom_core::DataElement::new(
                tags::ROWS,
                dicom_core::VR::US,
                dicom_core::PrimitiveValue::from(2u16),
            ),
        ]);
        let context = PatientContext::of(&object);
        assert!(context.0.get(tags::PATIENT_NAME).is_some());
        assert!(context.0.get(tags::ROWS).is_none());
        assert_eq!(
            format!("{context:?}"),
            "PatientContext(1 attributes, redacted)"
        );
    }
}
