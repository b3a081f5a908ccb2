//! PNG, JPEG and raw pixels → [`Pixels`]: size limits, format detection, a header-only dimension
//! check before anything is allocated, and Pillow's conversions to 8 bits (alpha dropped, 16-bit
//! samples as the model's [`SixteenBit`] policy says).

use std::io::Cursor;

use image::{DynamicImage, ImageFormat as CodecFormat, ImageReader};

use super::SixteenBit;
use super::message::clean_message;
use super::{Encoding, InputError, InputLimits, Pixels};

/// Bytes the decoder will allocate for one image's pixels, read from its header alone (PNG IHDR,
/// JPEG frame header, raw geometry), after the same size, format and pixel-count checks as
/// [`decode`]: the basis of the decoding budgets, checked before anything is decoded.
pub fn decoded_size(
    data: &[u8],
    encoding: Encoding,
    limits: &InputLimits,
) -> Result<u64, InputError> {
    limits.check_size(data)?;
    let header_err = |format: &'static str| InputError::Decode {
        format,
        message: "the header is cut short or invalid".into(),
    };
    let (width, height, bytes_per_pixel) = match (encoding, detect(data)) {
        (
            Encoding::Raw {
                width,
                height,
                channels,
            },
            _,
        ) => (width, height, u64::from(channels)),
        (Encoding::Png | Encoding::Detect, Some(CodecFormat::Png)) => {
            // IHDR is the first chunk: width, height, bit depth, colour type.
            let ihdr = data.get(16..26).ok_or_else(|| header_err("PNG"))?;
            let width = u32::from_be_bytes([ihdr[0], ihdr[1], ihdr[2], ihdr[3]]);
            let height = u32::from_be_bytes([ihdr[4], ihdr[5], ihdr[6], ihdr[7]]);
            let sample_bytes = if ihdr[8] == 16 { 2 } else { 1 };
            let channels = match ihdr[9] {
                0 => 1,
                2 => 3,
                3 => 4, // palette, expanded to RGB(A)
                4 => 2,
                6 => 4,
                _ => return Err(header_err("PNG")),
            };
            (width, height, channels * sample_bytes)
        }
        (Encoding::Jpeg | Encoding::Detect, Some(CodecFormat::Jpeg)) => {
            let (width, height, components) = jpeg_frame(data).ok_or_else(|| header_err("JPEG"))?;
            (width, height, if components == 1 { 1 } else { 3 })
        }
        // Wrong or unknown formats: `decode` says what is wrong.
        _ => return decode(data, encoding, limits, SixteenBit::Pillow).map(|_| 0),
    };
    check_pixels(width, height, limits)?;
    Ok(u64::from(width) * u64::from(height) * bytes_per_pixel)
}

/// Decodes one PNG, JPEG or raw image into 8-bit gray or RGB pixels (DICOM goes through
/// [`super::dicom`]).
pub fn decode(
    data: &[u8],
    encoding: Encoding,
    limits: &InputLimits,
    sixteen_bit: SixteenBit,
) -> Result<Pixels, InputError> {
    limits.check_size(data)?;
    let detected = detect(data);
    let format = match (encoding, detected) {
        (
            Encoding::Raw {
                width,
                height,
                channels,
            },
            _,
        ) => return raw(data, width, height, channels, limits),
        (Encoding::Detect, Some(f)) => f,
        (Encoding::Detect, None) => {
            return Err(InputError::UnknownFormat(format!(
                "{} bytes without a PNG, JPEG or DICOM signature",
                data.len()
            )));
        }
        (Encoding::Png, Some(CodecFormat::Png)) => CodecFormat::Png,
        (Encoding::Jpeg, Some(CodecFormat::Jpeg)) => CodecFormat::Jpeg,
        (declared, found) => {
            return Err(InputError::FormatMismatch {
                declared: match declared {
                    Encoding::Png => "PNG",
                    Encoding::Jpeg => "JPEG",
                    _ => "DICOM",
                },
                detected: if super::dicom::is_dicom(data) {
                    "DICOM"
                } else {
                    found.map_or("neither PNG, JPEG nor DICOM", format_name)
                },
            });
        }
    };
    let name = format_name(format);
    let decode_err = |e: image::ImageError| InputError::Decode {
        format: name,
        message: clean_message(&e.to_string()),
    };

    if format == CodecFormat::Jpeg {
        check_jpeg_complete(data)?;
        return decode_jpeg(data, limits);
    }
    // Read the header first, so a decompression bomb is refused before anything is allocated.
    let (width, height) = ImageReader::with_format(Cursor::new(data), format)
        .into_dimensions()
        .map_err(decode_err)?;
    check_pixels(width, height, limits)?;

    let mut reader = ImageReader::with_format(Cursor::new(data), format);
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(width);
    image_limits.max_image_height = Some(height);
    image_limits.max_alloc = Some(limits.max_pixels.saturating_mul(16));
    reader.limits(image_limits);
    let image = reader.decode().map_err(decode_err)?;
    Ok(to_pixels(image, sixteen_bit))
}

/// JPEG through zune-jpeg in strict mode: gray stays gray, everything else (YCbCr, CMYK, Adobe)
/// becomes RGB, as the image crate and Pillow's `convert` do.
///
/// A baseline file cut short and given an end-of-image marker again would otherwise decode
/// "successfully": decoders (zune-jpeg, and libjpeg behind Pillow) treat a marker inside the
/// entropy-coded data as the end and fill the rest of the image with flat blocks. So a baseline
/// (sequential) JPEG is decoded *without* its final end-of-image marker: a complete image needs
/// none, while a cut-off one runs out of data before its last row, which strict mode reports.
/// (A progressive JPEG's later scans only refine an image its first scans already cover, and its
/// decoder needs the marker; it is decoded as it comes.)
fn decode_jpeg(data: &[u8], limits: &InputLimits) -> Result<Pixels, InputError> {
    let data = match data.windows(2).rposition(|w| w == [0xFF, 0xD9]) {
        Some(eoi) if !jpeg_is_progressive(data) => &data[..eoi],
        _ => data,
    };
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    let err = |e: zune_jpeg::errors::DecodeErrors| InputError::Decode {
        format: "JPEG",
        message: clean_message(&e.to_string()),
    };
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(usize::from(u16::MAX))
        .set_max_height(usize::from(u16::MAX));
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(data), options);
    decoder.decode_headers().map_err(err)?;
    let info = decoder.info().ok_or_else(|| InputError::Decode {
        format: "JPEG",
        message: "no image header".into(),
    })?;
    let (width, height) = (u32::from(info.width), u32::from(info.height));
    check_pixels(width, height, limits)?;
    let gray = matches!(
        decoder.input_colorspace(),
        Some(ColorSpace::Luma | ColorSpace::LumaA)
    );
    let out = if gray {
        ColorSpace::Luma
    } else {
        ColorSpace::RGB
    };
    decoder.set_options(decoder.options().jpeg_set_out_colorspace(out));
    let data = decoder.decode().map_err(err)?;
    let channels = if gray { 1 } else { 3 };
    if data.len() != width as usize * height as usize * channels {
        return Err(InputError::Decode {
            format: "JPEG",
            message: "decoded size does not match the header".into(),
        });
    }
    Ok(Pixels {
        width,
        height,
        channels,
        data,
    })
}

/// The frame header (SOFn) of a JPEG: (width, height, components), read by walking the marker
/// segments up to it.
fn jpeg_frame(data: &[u8]) -> Option<(u32, u32, u8)> {
    let (at, _) = jpeg_sof(data)?;
    let sof = data.get(at + 4..at + 10)?;
    let height = u16::from_be_bytes([sof[1], sof[2]]);
    let width = u16::from_be_bytes([sof[3], sof[4]]);
    Some((u32::from(width), u32::from(height), sof[5]))
}

/// Whether the frame is progressive or hierarchical (SOF2, SOF6, SOF10, SOF14).
fn jpeg_is_progressive(data: &[u8]) -> bool {
    jpeg_sof(data).is_some_and(|(_, marker)| matches!(marker, 0xC2 | 0xC6 | 0xCA | 0xCE))
}

/// Position and marker byte of the first SOFn segment.
fn jpeg_sof(data: &[u8]) -> Option<(usize, u8)> {
    let mut at = 2; // after SOI
    while at + 4 <= data.len() {
        if data[at] != 0xFF {
            return None;
        }
        let marker = data[at + 1];
        match marker {
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => return Some((at, marker)),
            0xDA | 0xD9 => return None,
            0xFF => at += 1, // fill byte
            _ => {
                let len = u16::from_be_bytes([data[at + 2], data[at + 3]]) as usize;
                at += 2 + len;
            }
        }
    }
    None
}

fn check_pixels(width: u32, height: u32, limits: &InputLimits) -> Result<(), InputError> {
    let pixels = width as u64 * height as u64;
    if pixels > limits.max_pixels {
        return Err(InputError::TooManyPixels {
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    if pixels == 0 {
        return Err(InputError::RawGeometry(format!(
            "image is {width}×{height}: no pixels"
        )));
    }
    Ok(())
}

fn raw(
    data: &[u8],
    width: u32,
    height: u32,
    channels: u32,
    limits: &InputLimits,
) -> Result<Pixels, InputError> {
    if !matches!(channels, 1 | 3 | 4) {
        return Err(InputError::RawGeometry(format!(
            "channels must be 1, 3 or 4, got {channels}"
        )));
    }
    check_pixels(width, height, limits)?;
    let expected = width as u64 * height as u64 * channels as u64;
    if data.len() as u64 != expected {
        return Err(InputError::RawGeometry(format!(
            "{} bytes do not match {width}×{height}×{channels} = {expected} bytes",
            data.len()
        )));
    }
    let data = if channels == 4 {
        data.chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect()
    } else {
        data.to_vec()
    };
    Ok(Pixels {
        width,
        height,
        channels: if channels == 4 { 3 } else { channels as usize },
        data,
    })
}

fn detect(data: &[u8]) -> Option<CodecFormat> {
    if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(CodecFormat::Png)
    } else if data.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(CodecFormat::Jpeg)
    } else {
        None
    }
}

/// The JPEG decoder fills a truncated scan with grey and reports success; a cut-off image must not
/// be classified. Entropy-coded data cannot contain FF D9, so the image is complete only if an
/// end-of-image marker follows the last start-of-scan marker (an EXIF thumbnail's own markers
/// come earlier in the file).
fn check_jpeg_complete(data: &[u8]) -> Result<(), InputError> {
    let last = |marker: u8| data.windows(2).rposition(|w| w == [0xFF, marker]);
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) if eoi > sos => Ok(()),
        (None, _) => Err(InputError::Decode {
            format: "JPEG",
            message: "no start-of-scan marker: the data holds no image".into(),
        }),
        _ => Err(InputError::Decode {
            format: "JPEG",
            message: format!(
                "data ends early: no end-of-image marker after the image data (got {} bytes; truncated upload?)",
                data.len()
            ),
        }),
    }
}

fn format_name(format: CodecFormat) -> &'static str {
    match format {
        CodecFormat::Png => "PNG",
        CodecFormat::Jpeg => "JPEG",
        _ => "other",
    }
}

/// 8-bit gray or RGB, as Pillow's `convert` gives them: alpha dropped; 16-bit samples by `policy`.
fn to_pixels(image: DynamicImage, policy: SixteenBit) -> Pixels {
    let (width, height) = (image.width(), image.height());
    let gray = |data| Pixels {
        width,
        height,
        channels: 1,
        data,
    };
    let rgb = |data| Pixels {
        width,
        height,
        channels: 3,
        data,
    };
    // Pillow opens 16-bit gray as mode I;16 and clips it to 255 when converting; 16-bit colour and
    // gray+alpha it opens as 8-bit RGB(A), keeping the high byte.
    let scale = |v: u16| ((v as u32 * 255 + 32767) / 65535) as u8;
    let high = |v: u16| (v >> 8) as u8;
    let narrow: &dyn Fn(u16) -> u8 = match policy {
        SixteenBit::Pillow => &high,
        SixteenBit::Scale => &scale,
    };
    match image {
        DynamicImage::ImageLuma8(buf) => gray(buf.into_raw()),
        DynamicImage::ImageLumaA8(buf) => {
            gray(buf.into_raw().chunks_exact(2).map(|p| p[0]).collect())
        }
        DynamicImage::ImageRgb8(buf) => rgb(buf.into_raw()),
        DynamicImage::ImageRgba8(buf) => rgb(drop_alpha(&buf.into_raw(), 4)),
        DynamicImage::ImageLuma16(buf) => gray(
            buf.into_raw()
                .into_iter()
                .map(|v| match policy {
                    SixteenBit::Pillow => v.min(255) as u8,
                    SixteenBit::Scale => scale(v),
                })
                .collect(),
        ),
        DynamicImage::ImageLumaA16(buf) => gray(
            buf.into_raw()
                .chunks_exact(2)
                .map(|p| narrow(p[0]))
                .collect(),
        ),
        DynamicImage::ImageRgb16(buf) => rgb(buf.into_raw().into_iter().map(narrow).collect()),
        DynamicImage::ImageRgba16(buf) => rgb(buf
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [narrow(p[0]), narrow(p[1]), narrow(p[2])])
            .collect()),
        other => rgb(other.to_rgb8().into_raw()),
    }
}

fn drop_alpha(data: &[u8], stride: usize) -> Vec<u8> {
    data.chunks_exact(stride)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: InputLimits = InputLimits {
        max_image_bytes: 1 << 20,
        max_pixels: 1 << 20,
    };

    fn raw_enc(w: u32, h: u32, c: u32) -> Encoding {
        Encoding::Raw {
            width: w,
            height: h,
            channels: c,
        }
    }

    fn decode_default(data: &[u8], encoding: Encoding) -> Result<Pixels, InputError> {
        decode(data, encoding, &LIMITS, SixteenBit::Pillow)
    }

    #[test]
    fn rejects_bad_input_with_reasons() {
        assert_eq!(
            decode_default(&[], Encoding::Detect),
            Err(InputError::Empty)
        );
        let err = decode_default(b"hello world", Encoding::Detect).unwrap_err();
        assert_eq!(
            err.to_string(),
            "data is neither PNG, JPEG nor DICOM (11 bytes without a PNG, JPEG or DICOM signature)",
            "no image bytes in the message"
        );
        let err = decode_default(&[0; 11], raw_enc(2, 2, 3)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "raw pixels: 11 bytes do not match 2×2×3 = 12 bytes"
        );
        assert!(matches!(
            decode_default(&[0; 8], raw_enc(2, 2, 2)),
            Err(InputError::RawGeometry(_))
        ));
        let big = vec![0u8; (1 << 20) + 1];
        assert!(matches!(
            decode_default(&big, Encoding::Detect),
            Err(InputError::TooLarge { .. })
        ));
        let err = decode_default(&[0xFF, 0xD8, 0xFF, 0xE0], Encoding::Png).unwrap_err();
        assert!(err.to_string().contains("declared format PNG"), "{err}");
        let err = decode_default(&[0; 4096 * 4096 / 16], raw_enc(4096, 4096, 1)).unwrap_err();
        assert!(matches!(err, InputError::TooManyPixels { .. }), "{err}");
    }

    fn png<P: image::PixelWithColorType>(w: u32, h: u32, data: Vec<P::Subpixel>) -> Vec<u8>
    where
        [P::Subpixel]: image::EncodableLayout,
    {
        let mut out = Vec::new();
        image::ImageBuffer::<P, _>::from_raw(w, h, data)
            .unwrap()
            .write_to(&mut Cursor::new(&mut out), CodecFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn sixteen_bit_follows_the_policy() {
        let gray16 = png::<image::Luma<u16>>(2, 1, vec![200, 40000]);
        let pillow = decode(&gray16, Encoding::Detect, &LIMITS, SixteenBit::Pillow).unwrap();
        assert_eq!(pillow.data, [200, 255], "Pillow clips 16-bit gray");
        let scaled = decode(&gray16, Encoding::Detect, &LIMITS, SixteenBit::Scale).unwrap();
        assert_eq!(scaled.data, [1, 156]);
        let rgb16 = png::<image::Rgb<u16>>(1, 1, vec![31010, 33542, 49490]);
        let pillow = decode(&rgb16, Encoding::Detect, &LIMITS, SixteenBit::Pillow).unwrap();
        assert_eq!(pillow.data, [121, 131, 193], "Pillow keeps the high byte");
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let mut x = 7u32;
        let pixels: Vec<u8> = (0..w * h * 3)
            .map(|_| {
                x = x.wrapping_mul(1103515245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        let mut out = Vec::new();
        image::RgbImage::from_raw(w, h, pixels)
            .unwrap()
            .write_to(&mut Cursor::new(&mut out), CodecFormat::Jpeg)
            .unwrap();
        out
    }

    #[test]
    fn a_truncated_jpeg_is_refused_even_with_an_end_marker_appended() {
        let whole = jpeg(64, 64);
        assert!(decode_default(&whole, Encoding::Detect).is_ok());
        let mut cut = whole[..whole.len() / 2].to_vec();
        let err = decode_default(&cut, Encoding::Detect).unwrap_err();
        assert!(err.to_string().contains("data ends early"), "{err}");
        // The cheap marker check is fooled by an appended end-of-image marker; strict decoding is not.
        cut.extend_from_slice(&[0xFF, 0xD9]);
        match decode_default(&cut, Encoding::Detect) {
            Err(InputError::Decode { format: "JPEG", .. }) => {}
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("a grey-padded image must not be classified"),
        }
    }

    #[test]
    fn a_real_jpeg_cut_anywhere_and_re_terminated_is_refused() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/flair_512_a.jpg");
        let whole = std::fs::read(path).unwrap();
        let limits = InputLimits {
            max_image_bytes: 1 << 24,
            max_pixels: 1 << 24,
        };
        assert!(decode(&whole, Encoding::Detect, &limits, SixteenBit::Pillow).is_ok());
        for percent in (10..=95).step_by(5) {
            let mut cut = whole[..whole.len() * percent / 100].to_vec();
            cut.extend_from_slice(&[0xFF, 0xD9]);
            assert!(
                decode(&cut, Encoding::Detect, &limits, SixteenBit::Pillow).is_err(),
                "cut at {percent} % and re-terminated: decoded as if whole"
            );
        }
    }

    #[test]
    fn decodes_png_roundtrip_and_drops_alpha() {
        let gray = png::<image::Luma<u8>>(2, 2, vec![0, 85, 170, 255]);
        assert_eq!(
            decode_default(&gray, Encoding::Detect).unwrap().data,
            [0, 85, 170, 255]
        );
        let rgba = png::<image::Rgba<u8>>(1, 1, vec![1, 2, 3, 4]);
        let p = decode_default(&rgba, Encoding::Detect).unwrap();
        assert_eq!((p.channels, p.data), (3, vec![1, 2, 3]));
    }
}
