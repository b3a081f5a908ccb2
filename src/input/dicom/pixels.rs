//! Pixel data → frames: the decoders (dicom-rs's, and libjpeg-turbo for 12-bit JPEG), stored
//! values, padding, planar configuration and YBR_FULL → RGB; and the bytes decoding allocates.

use dicom_object::DefaultDicomObject;
use dicom_pixeldata::PixelDecoder;

use super::header::{Header, Photometric};
use super::{JPEG_EXTENDED, error_chain, invalid, jpeg12, ts_name, unwind};
use crate::input::{InputError, InputLimits, Pixels};

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

/// Decodes the pixel data of `object` into frames.
pub(super) fn decode(
    object: &DefaultDicomObject,
    header: &Header,
) -> Result<Vec<Frame>, InputError> {
    if header.transfer_syntax == JPEG_EXTENDED && header.bits_stored > 8 {
        // jpeg-decoder, dicom-rs's JPEG decoder, has no 12-bit DCT: libjpeg-turbo decodes it.
        let data = jpeg12::decode(object, header)?;
        return frames(header, &data, false, false);
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
    frames(header, decoded.data(), planar, ybr)
}

/// Refuses empty and oversized geometry; returns what decoding will allocate: the decoded
/// samples plus one f64 per pixel.
pub(super) fn check_geometry(header: &Header, limits: &InputLimits) -> Result<u64, InputError> {
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
