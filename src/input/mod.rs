//! Decoding of encoded inputs into 8-bit pixels, with limits against hostile data. [`image`]
//! decodes PNG, JPEG and raw pixels the way the training pipeline's Pillow did; DICOM joins here.

pub mod dicom;
pub mod image;
pub mod message;
pub mod sequence;

pub use self::image::decode;

use serde::Deserialize;

/// How the bytes of one image are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// PNG or JPEG, detected from the magic bytes.
    Detect,
    Png,
    Jpeg,
    /// A DICOM Part 10 file ([`dicom`]); also detected from its `DICM` marker.
    Dicom,
    /// Raw 8-bit interleaved pixels.
    Raw {
        width: u32,
        height: u32,
        channels: u32,
    },
}

impl Encoding {
    /// Whether `data` goes through the DICOM decoder: declared DICOM, or detected.
    pub fn is_dicom(self, data: &[u8]) -> bool {
        self == Encoding::Dicom || (self == Encoding::Detect && dicom::is_dicom(data))
    }
}

/// Bytes decoding `data` will allocate, read from its header alone after the size, format and
/// geometry checks: the basis of the decoding budgets, checked before anything is decoded.
pub fn decoded_size(
    data: &[u8],
    encoding: Encoding,
    limits: &InputLimits,
) -> Result<u64, InputError> {
    if encoding.is_dicom(data) {
        dicom::decoded_size(data, limits)
    } else {
        image::decoded_size(data, encoding, limits)
    }
}

/// How 16-bit samples (16-bit PNG) become 8-bit ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SixteenBit {
    /// As a training pipeline on Pillow 12 saw them: 16-bit grayscale is clipped to 255
    /// (`convert("L")`/`("RGB")` of mode `I;16`), 16-bit colour and gray+alpha keep the high byte.
    #[default]
    Pillow,
    /// Scaled to the full 8-bit range: `round(v × 255 / 65535)`.
    Scale,
}

impl SixteenBit {
    pub fn as_str(self) -> &'static str {
        match self {
            SixteenBit::Pillow => "pillow",
            SixteenBit::Scale => "scale",
        }
    }
}

/// Limits against hostile input.
#[derive(Debug, Clone, Copy)]
pub struct InputLimits {
    /// Largest accepted encoded (or raw) image, in bytes.
    pub max_image_bytes: usize,
    /// Largest accepted decoded image, in pixels (width × height).
    pub max_pixels: u64,
}

impl InputLimits {
    /// Refuses empty data and data over `max_image_bytes`: the first check of every decoder.
    pub fn check_size(&self, data: &[u8]) -> Result<(), InputError> {
        if data.is_empty() {
            return Err(InputError::Empty);
        }
        if data.len() > self.max_image_bytes {
            return Err(InputError::TooLarge {
                bytes: data.len(),
                limit: self.max_image_bytes,
            });
        }
        Ok(())
    }
}

/// Why one image was rejected. Messages say what was wrong with the data; the caller adds which
/// image it was.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputError {
    #[error("image data is empty")]
    Empty,
    #[error("image is {bytes} bytes, over the limit of {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    #[error("data is neither PNG, JPEG nor DICOM ({0})")]
    UnknownFormat(String),
    #[error("declared format {declared} does not match the data, which looks like {detected}")]
    FormatMismatch {
        declared: &'static str,
        detected: &'static str,
    },
    #[error("{format} data could not be decoded: {message}")]
    Decode {
        format: &'static str,
        message: String,
    },
    #[error("image is {width}×{height} = {pixels} pixels, over the limit of {limit} pixels")]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("raw pixels: {0}")]
    RawGeometry(String),
    /// Well-formed input the model does not accept (the DICOM sequence guard).
    #[error("{0}")]
    NotAccepted(String),
    /// Inputs that do not fit together (e.g. the channels of a slice of different sizes).
    #[error("{0}")]
    Inconsistent(String),
}

/// 8-bit pixels with 1 (luma) or 3 (RGB) interleaved channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    pub width: u32,
    pub height: u32,
    pub channels: usize,
    pub data: Vec<u8>,
}
