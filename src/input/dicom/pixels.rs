//! Pixel data → frames: the decoders (dicom-rs's, and libjpeg-turbo for 12-bit JPEG), stored
//! values, padding, planar configuration and YBR_FULL → RGB; and the bytes decoding allocates.

use dicom_object::DefaultDicomObject;
use dicom_pixeldata::PixelDecoder;

use super::header::{Header, Photometric};
use super::{JPEG_BASELINE, JPEG_EXTENDED, error_chain, invalid, jpeg, ts_name, unwind};
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
        let data = jpeg::decode_12_bit(object, header)?;
        return frames(header, &data, false, false);
    }
    if matches!(
        header.transfer_syntax.as_str(),
        JPEG_BASELINE | JPEG_EXTENDED
    ) && header.photometric == Photometric::Rgb
        && header.samples_per_pixel == 3
        && let Some(data) = jpeg::decode_untransformed_rgb(object, header)?
    {
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
    let pixels = header.rows as usize * header.columns as usize;
    if header.photometric == Photometric::YbrFull422
        && matches!(
            decoded.photometric_interpretation(),
            dicom_pixeldata::PhotometricInterpretation::YbrFull422
        )
        && decoded.data().len() < header.frames as usize * pixels * 3
    {
        // Native YBR_FULL_422: two Y samples share one Cb and one Cr (PS3.3 C.7.6.3.1.2).
        let full = expand_ybr_422(header, decoded.data())?;
        return frames(header, &full, false, true);
    }
    frames(header, decoded.data(), planar, ybr)
}

/// Native YBR_FULL_422 samples (Y1 Y2 Cb Cr for each pair of pixels of a row) as YBR_FULL
/// (Y1 Cb Cr Y2 Cb Cr), as pydicom expands them before converting to RGB.
fn expand_ybr_422(header: &Header, data: &[u8]) -> Result<Vec<u8>, InputError> {
    let (width, height, frames) = (header.columns, header.rows, header.frames as usize);
    let pixels = width as usize * height as usize;
    if width % 2 == 1 {
        return Err(invalid(format!(
            "YBR_FULL_422 pixel data needs an even number of columns; this image has {width}"
        )));
    }
    let need = frames * pixels * 2;
    if data.len() < need {
        return Err(invalid(format!(
            "the pixel data holds {} bytes; {width}×{height} × {frames} frames of YBR_FULL_422 \
             (2 bytes a pixel) need {need}",
            data.len()
        )));
    }
    let mut out = Vec::with_capacity(frames * pixels * 3);
    for pair in data[..need].chunks_exact(4) {
        let [y1, y2, cb, cr] = [pair[0], pair[1], pair[2], pair[3]];
        out.extend_from_slice(&[y1, cb, cr, y2, cb, cr]);
    }
    Ok(out)
}

/// Refuses empty and oversized geometry; returns the bytes decoded (every frame's samples, as
/// `decoded_size` counts a PNG's), what the decoding budgets hold.
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
    // The refusal bounds the allocation (the samples plus up to 8 bytes a pixel of frames and
    // windowing); the budget counts the samples decoded, not that bound: a cine of 105 MiB of
    // RGB pixels counted 387 MiB and was refused where it fit (issue 22, finding 25).
    let decoded = pixels.checked_mul(u64::from(frames));
    decoded
        .and_then(|p| p.checked_mul(sample_bytes + 8))
        .filter(|bytes| *bytes <= 16 * limits.max_image_bytes as u64 + (1 << 30))
        .and(decoded)
        .map(|p| p * sample_bytes)
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
            if matches!(
                header.photometric,
                Photometric::YbrFull | Photometric::YbrFull422
            ) && ybr
            {
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::dicom::header::{Acquisition, Geometry, VoiFunction};
    use crate::input::dicom::{DicomIds, PatientContext};

    const LIMITS: InputLimits = InputLimits {
        max_image_bytes: 1 << 20,
        max_pixels: 1 << 20,
    };

    fn header(columns: u32, rows: u32, frames: u32, bits: (u16, u16), signed: bool) -> Header {
        Header {
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            ids: DicomIds::default(),
            modality: "MR".into(),
            rows,
            columns,
            frames,
            samples_per_pixel: 1,
            bits_allocated: bits.0,
            bits_stored: bits.1,
            signed,
            photometric: Photometric::Monochrome2,
            rescale: None,
            modality_lut: None,
            windows: Vec::new(),
            voi_function: VoiFunction::Linear,
            voi_lut: None,
            padding: None,
            acquisition: Acquisition::default(),
            geometry: Geometry::default(),
        }
    }

    fn rgb(columns: u32, rows: u32, frames: u32, photometric: Photometric) -> Header {
        Header {
            samples_per_pixel: 3,
            photometric,
            ..header(columns, rows, frames, (8, 8), false)
        }
    }

    fn le16(values: &[u16]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn mono(frame: &Frame) -> (&[i32], Option<&[bool]>) {
        match frame {
            Frame::Mono {
                stored, padding, ..
            } => (stored, padding.as_deref()),
            Frame::Color(_) => panic!("a colour frame"),
        }
    }

    #[test]
    fn stored_values_keep_the_bits_stored_and_extend_the_sign() {
        // 12 of 16 bits, unsigned: the high bits (overlay or garbage) are masked off.
        let h = header(4, 1, 1, (16, 12), false);
        let data = le16(&[0xF123, 0x0FFF, 0x0800, 0x0000]);
        assert_eq!(stored_values(&data, &h), [0x123, 4095, 2048, 0]);
        // 12 of 16 bits, signed: bit 11 is the sign.
        let h = header(4, 1, 1, (16, 12), true);
        assert_eq!(stored_values(&data, &h), [291, -1, -2048, 0]);
        // 16 bits signed, 8 bits signed, 32 bits signed.
        let h = header(2, 1, 1, (16, 16), true);
        assert_eq!(stored_values(&le16(&[0x8000, 0x7FFF]), &h), [-32768, 32767]);
        let h = header(3, 1, 1, (8, 8), true);
        assert_eq!(stored_values(&[0x80, 0x7F, 0xFF], &h), [-128, 127, -1]);
        let h = header(2, 1, 1, (8, 8), false);
        assert_eq!(stored_values(&[0x80, 0xFF], &h), [128, 255]);
        let h = header(2, 1, 1, (32, 32), true);
        let data: Vec<u8> = [0xFFFF_FFFFu32, 0x8000_0000]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(stored_values(&data, &h), [-1, i32::MIN]);
    }

    #[test]
    fn frames_split_multi_frame_data_and_mark_padding() {
        let mut h = header(2, 1, 3, (16, 16), false);
        h.padding = Some((7, None));
        let data = le16(&[1, 7, 7, 2, 3, 4]);
        let split = frames(&h, &data, false, false).unwrap();
        assert_eq!(split.len(), 3);
        assert_eq!(mono(&split[0]), (&[1, 7][..], Some(&[false, true][..])));
        assert_eq!(mono(&split[2]), (&[3, 4][..], Some(&[false, false][..])));
        // A padding range, given in either order.
        h.padding = Some((4, Some(2)));
        let split = frames(&h, &data, false, false).unwrap();
        assert_eq!(mono(&split[1]).1, Some(&[false, true][..]));
        assert_eq!(mono(&split[2]).1, Some(&[true, true][..]));
    }

    #[test]
    fn frames_refuse_short_pixel_data() {
        let h = header(3, 2, 2, (16, 16), false);
        let err = frames(&h, &[0; 23], false, false).unwrap_err().to_string();
        assert!(
            err.contains(
                "the pixel data holds 23 bytes; 3×2 × 2 frames × 1 samples × 2 bytes need 24"
            ),
            "{err}"
        );
    }

    #[test]
    fn colour_frames_are_interleaved_and_converted_from_ybr_full() {
        let planar = [1, 2, 10, 20, 100, 200];
        let split = frames(&rgb(2, 1, 1, Photometric::Rgb), &planar, true, false).unwrap();
        let Frame::Color(pixels) = &split[0] else {
            panic!("colour")
        };
        assert_eq!(pixels.data, [1, 10, 100, 2, 20, 200]);
        // YBR_FULL still to convert (pydicom's numbers for these samples).
        let ybr = [128, 128, 128, 76, 85, 255];
        let h = rgb(2, 1, 1, Photometric::YbrFull);
        let Frame::Color(pixels) = &frames(&h, &ybr, false, true).unwrap()[0] else {
            panic!("colour")
        };
        assert_eq!(pixels.data, [128, 128, 128, 254, 0, 0]);
        // Already converted by the decoder: left alone.
        let Frame::Color(pixels) = &frames(&h, &ybr, false, false).unwrap()[0] else {
            panic!("colour")
        };
        assert_eq!(pixels.data, ybr);
    }

    #[test]
    fn ybr_full_to_rgb_matches_pydicom() {
        // pydicom 3.0.2's convert_color_space(arr, "YBR_FULL", "RGB") of these samples.
        let mut data = [
            128, 128, 128, 255, 128, 128, 76, 85, 255, 0, 0, 0, 255, 255, 255, 150, 44, 21,
        ];
        ybr_full_to_rgb(&mut data);
        assert_eq!(
            data,
            [
                128, 128, 128, 255, 255, 255, 254, 0, 0, 0, 135, 0, 255, 121, 255, 0, 255, 1
            ]
        );
    }

    #[test]
    fn check_geometry_refuses_empty_and_oversized_images() {
        let err = check_geometry(&header(0, 5, 1, (16, 16), false), &LIMITS).unwrap_err();
        assert!(
            err.to_string()
                .contains("the image is 0×5 with 1 frames: no pixels")
        );
        let err = check_geometry(&header(2048, 1024, 1, (16, 16), false), &LIMITS).unwrap_err();
        assert!(matches!(
            err,
            InputError::TooManyPixels {
                pixels: 2_097_152,
                ..
            }
        ));
        let err =
            check_geometry(&header(1024, 1024, u32::MAX, (16, 16), false), &LIMITS).unwrap_err();
        assert!(err.to_string().contains("is too large to decode"), "{err}");
        assert!(check_geometry(&header(64, 64, 2, (16, 16), false), &LIMITS).is_ok());
    }

    #[test]
    fn decodes_a_file_end_to_end() {
        // Exercised with real files in tests/dicom.rs; here one native file, through dicom-rs.
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/dicom/ts_explicit_le.dcm"
        );
        let data = std::fs::read(path).unwrap();
        let object = crate::input::dicom::parse(&data, &LIMITS, None).unwrap();
        let header = crate::input::dicom::header::read(&object).unwrap();
        let split = decode(&object, &header).unwrap();
        assert_eq!(split.len(), 1);
        let (stored, _) = mono(&split[0]);
        assert_eq!(stored.len(), (header.rows * header.columns) as usize);
        let _ = PatientContext::of(&object);
    }

    #[test]
    fn native_ybr_full_422_is_expanded_as_pydicom_does() {
        // Y1 Y2 Cb Cr → Y1 Cb Cr Y2 Cb Cr (PS3.3 C.7.6.3.1.2).
        let h = rgb(2, 1, 2, Photometric::YbrFull422);
        let data = [10, 20, 128, 129, 30, 40, 127, 126];
        assert_eq!(
            expand_ybr_422(&h, &data).unwrap(),
            [10, 128, 129, 20, 128, 129, 30, 127, 126, 40, 127, 126]
        );
        let odd = rgb(3, 1, 1, Photometric::YbrFull422);
        let err = expand_ybr_422(&odd, &[0; 6]).unwrap_err().to_string();
        assert!(
            err.contains("an even number of columns; this image has 3"),
            "{err}"
        );
        let err = expand_ybr_422(&h, &data[..6]).unwrap_err().to_string();
        assert!(err.contains("(2 bytes a pixel) need 8"), "{err}");
        // Expanded, it is converted like YBR_FULL.
        let full = expand_ybr_422(
            &rgb(2, 1, 1, Photometric::YbrFull422),
            &[128, 128, 128, 128],
        )
        .unwrap();
        let Frame::Color(pixels) =
            &frames(&h, &[full.clone(), full].concat(), false, true).unwrap()[0]
        else {
            panic!("colour")
        };
        assert_eq!(pixels.data, [128; 6]);
    }
}
