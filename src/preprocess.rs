//! Image → model input tensor: decode, colour handling, resize, scale, written straight into the
//! model's layout. Mirrors what training did with Pillow (filters, luma formula, rounding).

use std::io::Cursor;

use fast_image_resize::{self as fir, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageFormat as CodecFormat, ImageReader};

use crate::model::{ColorMode, InputSpec, Layout, ResizeFilter, Scaling};
use crate::resample::{self, Filter};

/// How the bytes of one image are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// PNG or JPEG, detected from the magic bytes.
    Detect,
    Png,
    Jpeg,
    /// Raw 8-bit interleaved pixels.
    Raw {
        width: u32,
        height: u32,
        channels: u32,
    },
}

/// Limits against hostile input.
#[derive(Debug, Clone, Copy)]
pub struct InputLimits {
    /// Largest accepted encoded (or raw) image, in bytes.
    pub max_image_bytes: usize,
    /// Largest accepted decoded image, in pixels (width × height).
    pub max_pixels: u64,
}

/// Why one image was rejected. Messages say what was wrong with the data; the caller adds which
/// image it was.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PreprocessError {
    #[error("image data is empty")]
    Empty,
    #[error("image is {bytes} bytes, over the limit of {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    #[error("data is neither PNG nor JPEG (first bytes: {0})")]
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
}

impl PreprocessError {
    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            PreprocessError::Empty => "empty",
            PreprocessError::TooLarge { .. } => "too_large",
            PreprocessError::UnknownFormat(_) => "unknown_format",
            PreprocessError::FormatMismatch { .. } => "format_mismatch",
            PreprocessError::Decode { .. } => "decode",
            PreprocessError::TooManyPixels { .. } => "too_many_pixels",
            PreprocessError::RawGeometry(_) => "raw_geometry",
        }
    }
}

/// 8-bit pixels with 1 (luma) or 3 (RGB) interleaved channels.
struct Pixels {
    width: u32,
    height: u32,
    channels: usize,
    data: Vec<u8>,
}

/// Turns images into input tensors for one model.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    spec: InputSpec,
    limits: InputLimits,
    /// value of an 8-bit pixel, per channel.
    lut: [[f32; 256]; 3],
}

impl Preprocessor {
    pub fn new(spec: InputSpec, limits: InputLimits) -> Self {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (p, v) in table.iter_mut().enumerate() {
                *v = match spec.scaling {
                    // Same float32 operations, in the same order, as numpy's reference.
                    Scaling::MeanStd { mean, std } => (p as f32 / 255.0 - mean[c]) / std[c],
                    Scaling::ScaleOffset { scale, offset } => p as f32 * scale + offset,
                };
            }
        }
        Preprocessor { spec, limits, lut }
    }

    /// The model input this preprocessor writes.
    pub fn spec(&self) -> &InputSpec {
        &self.spec
    }

    /// Decodes, converts, resizes and scales one image into `out` (`spec.image_len()` values).
    pub fn preprocess(
        &self,
        data: &[u8],
        encoding: Encoding,
        out: &mut [f32],
    ) -> Result<(), PreprocessError> {
        assert_eq!(
            out.len(),
            self.spec.image_len(),
            "output buffer has the wrong size: this is a bug"
        );
        let pixels = self.decode(data, encoding)?;
        let pixels = self.convert_color(pixels);
        let pixels = self.resize(pixels);
        self.write_tensor(&pixels, out);
        Ok(())
    }

    /// Convenience: a freshly allocated tensor for one image.
    pub fn preprocess_to_vec(
        &self,
        data: &[u8],
        encoding: Encoding,
    ) -> Result<Vec<f32>, PreprocessError> {
        let mut out = vec![0f32; self.spec.image_len()];
        self.preprocess(data, encoding, &mut out)?;
        Ok(out)
    }

    fn decode(&self, data: &[u8], encoding: Encoding) -> Result<Pixels, PreprocessError> {
        if data.is_empty() {
            return Err(PreprocessError::Empty);
        }
        if data.len() > self.limits.max_image_bytes {
            return Err(PreprocessError::TooLarge {
                bytes: data.len(),
                limit: self.limits.max_image_bytes,
            });
        }
        let detected = detect(data);
        let format = match (encoding, detected) {
            (
                Encoding::Raw {
                    width,
                    height,
                    channels,
                },
                _,
            ) => return self.raw(data, width, height, channels),
            (Encoding::Detect, Some(f)) => f,
            (Encoding::Detect, None) => {
                return Err(PreprocessError::UnknownFormat(hex_prefix(data)));
            }
            (Encoding::Png, Some(CodecFormat::Png)) => CodecFormat::Png,
            (Encoding::Jpeg, Some(CodecFormat::Jpeg)) => CodecFormat::Jpeg,
            (declared, found) => {
                return Err(PreprocessError::FormatMismatch {
                    declared: if declared == Encoding::Png {
                        "PNG"
                    } else {
                        "JPEG"
                    },
                    detected: found.map_or("neither PNG nor JPEG", format_name),
                });
            }
        };
        let name = format_name(format);
        let decode_err = |e: image::ImageError| PreprocessError::Decode {
            format: name,
            message: e.to_string(),
        };

        if format == CodecFormat::Jpeg {
            check_jpeg_complete(data)?;
        }
        // Read the header first, so a decompression bomb is refused before anything is allocated.
        let (width, height) = ImageReader::with_format(Cursor::new(data), format)
            .into_dimensions()
            .map_err(decode_err)?;
        self.check_pixels(width, height)?;

        let mut reader = ImageReader::with_format(Cursor::new(data), format);
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(width);
        limits.max_image_height = Some(height);
        limits.max_alloc = Some(self.limits.max_pixels.saturating_mul(16));
        reader.limits(limits);
        let image = reader.decode().map_err(decode_err)?;
        Ok(from_dynamic(image))
    }

    fn check_pixels(&self, width: u32, height: u32) -> Result<(), PreprocessError> {
        let pixels = width as u64 * height as u64;
        if pixels > self.limits.max_pixels {
            return Err(PreprocessError::TooManyPixels {
                width,
                height,
                pixels,
                limit: self.limits.max_pixels,
            });
        }
        if pixels == 0 {
            return Err(PreprocessError::RawGeometry(format!(
                "image is {width}×{height}: no pixels"
            )));
        }
        Ok(())
    }

    fn raw(
        &self,
        data: &[u8],
        width: u32,
        height: u32,
        channels: u32,
    ) -> Result<Pixels, PreprocessError> {
        if !matches!(channels, 1 | 3 | 4) {
            return Err(PreprocessError::RawGeometry(format!(
                "channels must be 1, 3 or 4, got {channels}"
            )));
        }
        self.check_pixels(width, height)?;
        let expected = width as u64 * height as u64 * channels as u64;
        if data.len() as u64 != expected {
            return Err(PreprocessError::RawGeometry(format!(
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

    fn convert_color(&self, pixels: Pixels) -> Pixels {
        match (self.spec.color, pixels.channels) {
            // Pillow's convert("L"): ITU-R 601-2 luma in 16.16 fixed point, rounded.
            (ColorMode::Grayscale, 3) => Pixels {
                data: pixels
                    .data
                    .chunks_exact(3)
                    .map(|p| {
                        ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000)
                            >> 16) as u8
                    })
                    .collect(),
                channels: 1,
                ..pixels
            },
            // Gray input for an RGB model stays one channel until written: replicating after the
            // resize gives the same values as Pillow's convert("RGB") before it, at a third of the work.
            _ => pixels,
        }
    }

    fn resize(&self, pixels: Pixels) -> Pixels {
        let (w, h) = (self.spec.width, self.spec.height);
        if pixels.width == w && pixels.height == h {
            return pixels;
        }
        let filter = match self.spec.resize_filter {
            ResizeFilter::Nearest => return nearest(pixels, w, h),
            ResizeFilter::Bilinear => Filter::Bilinear,
            ResizeFilter::Bicubic => Filter::Bicubic,
            ResizeFilter::Lanczos3 => Filter::Lanczos3,
        };
        let data = resample::resize(
            &pixels.data,
            pixels.width as usize,
            pixels.height as usize,
            pixels.channels,
            w as usize,
            h as usize,
            filter,
        );
        Pixels {
            width: w,
            height: h,
            channels: pixels.channels,
            data,
        }
    }

    fn write_tensor(&self, pixels: &Pixels, out: &mut [f32]) {
        let plane = pixels.width as usize * pixels.height as usize;
        let lut = &self.lut;
        match (self.spec.layout, pixels.channels) {
            (Layout::Nchw, 1) => {
                for c in 0..3 {
                    for (o, &p) in out[c * plane..(c + 1) * plane].iter_mut().zip(&pixels.data) {
                        *o = lut[c][p as usize];
                    }
                }
            }
            (Layout::Nchw, _) => {
                let (r, rest) = out.split_at_mut(plane);
                let (g, b) = rest.split_at_mut(plane);
                for (i, p) in pixels.data.chunks_exact(3).enumerate() {
                    r[i] = lut[0][p[0] as usize];
                    g[i] = lut[1][p[1] as usize];
                    b[i] = lut[2][p[2] as usize];
                }
            }
            (Layout::Nhwc, 1) => {
                for (o, &p) in out.chunks_exact_mut(3).zip(&pixels.data) {
                    o[0] = lut[0][p as usize];
                    o[1] = lut[1][p as usize];
                    o[2] = lut[2][p as usize];
                }
            }
            (Layout::Nhwc, _) => {
                for (o, p) in out.chunks_exact_mut(3).zip(pixels.data.chunks_exact(3)) {
                    o[0] = lut[0][p[0] as usize];
                    o[1] = lut[1][p[1] as usize];
                    o[2] = lut[2][p[2] as usize];
                }
            }
        }
    }
}

/// Nearest-neighbour resize (source pixel `floor((i + 0.5) * in / out)`, as Pillow).
fn nearest(pixels: Pixels, w: u32, h: u32) -> Pixels {
    let pixel_type = if pixels.channels == 1 {
        PixelType::U8
    } else {
        PixelType::U8x3
    };
    let src = fir::images::Image::from_vec_u8(pixels.width, pixels.height, pixels.data, pixel_type)
        .expect("buffer length is width*height*channels: this is a bug");
    let mut dst = fir::images::Image::new(w, h, pixel_type);
    Resizer::new()
        .resize(
            &src,
            &mut dst,
            &ResizeOptions::new().resize_alg(ResizeAlg::Nearest),
        )
        .expect("same pixel type on both sides: this is a bug");
    Pixels {
        width: w,
        height: h,
        channels: pixels.channels,
        data: dst.into_vec(),
    }
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
fn check_jpeg_complete(data: &[u8]) -> Result<(), PreprocessError> {
    let last = |marker: u8| data.windows(2).rposition(|w| w == [0xFF, marker]);
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) if eoi > sos => Ok(()),
        (None, _) => Err(PreprocessError::Decode {
            format: "JPEG",
            message: "no start-of-scan marker: the data holds no image".into(),
        }),
        _ => Err(PreprocessError::Decode {
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

fn hex_prefix(data: &[u8]) -> String {
    data.iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// 8-bit gray or RGB pixels; alpha is dropped (as Pillow's convert("RGB") does), 16-bit scaled to 8.
fn from_dynamic(image: DynamicImage) -> Pixels {
    let (width, height) = (image.width(), image.height());
    match image {
        DynamicImage::ImageLuma8(buf) => Pixels {
            width,
            height,
            channels: 1,
            data: buf.into_raw(),
        },
        DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_) => Pixels {
            width,
            height,
            channels: 1,
            data: image.to_luma8().into_raw(),
        },
        DynamicImage::ImageRgb8(buf) => Pixels {
            width,
            height,
            channels: 3,
            data: buf.into_raw(),
        },
        other => Pixels {
            width,
            height,
            channels: 3,
            data: other.to_rgb8().into_raw(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(layout: Layout, color: ColorMode) -> InputSpec {
        InputSpec {
            tensor_name: "input".into(),
            layout,
            height: 2,
            width: 2,
            color,
            resize_filter: ResizeFilter::Nearest,
            scaling: Scaling::ScaleOffset {
                scale: 1.0,
                offset: 0.0,
            },
        }
    }

    const LIMITS: InputLimits = InputLimits {
        max_image_bytes: 1 << 20,
        max_pixels: 1 << 20,
    };

    fn raw(w: u32, h: u32, c: u32) -> Encoding {
        Encoding::Raw {
            width: w,
            height: h,
            channels: c,
        }
    }

    #[test]
    fn raw_rgb_is_written_in_both_layouts() {
        let data = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        let nchw = Preprocessor::new(spec(Layout::Nchw, ColorMode::Rgb), LIMITS)
            .preprocess_to_vec(&data, raw(2, 2, 3))
            .unwrap();
        assert_eq!(nchw, [1., 4., 7., 10., 2., 5., 8., 11., 3., 6., 9., 12.]);
        let nhwc = Preprocessor::new(spec(Layout::Nhwc, ColorMode::Rgb), LIMITS)
            .preprocess_to_vec(&data, raw(2, 2, 3))
            .unwrap();
        assert_eq!(nhwc, data.map(f32::from));
    }

    #[test]
    fn gray_is_replicated_and_rgb_uses_pillow_luma() {
        let gray = Preprocessor::new(spec(Layout::Nchw, ColorMode::Rgb), LIMITS)
            .preprocess_to_vec(&[10, 20, 30, 40], raw(2, 2, 1))
            .unwrap();
        assert_eq!(
            gray,
            [10., 20., 30., 40., 10., 20., 30., 40., 10., 20., 30., 40.]
        );
        // Pillow: L = (R*19595 + G*38470 + B*7471 + 0x8000) >> 16; (255,0,0) -> 76, (0,255,0) -> 150.
        let luma = Preprocessor::new(spec(Layout::Nhwc, ColorMode::Grayscale), LIMITS)
            .preprocess_to_vec(
                &[255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255],
                raw(2, 2, 3),
            )
            .unwrap();
        assert_eq!(
            luma,
            [
                76., 76., 76., 150., 150., 150., 29., 29., 29., 255., 255., 255.
            ]
        );
    }

    #[test]
    fn mean_std_lut_matches_formula() {
        let mut s = spec(Layout::Nchw, ColorMode::Rgb);
        s.scaling = Scaling::MeanStd {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        };
        let out = Preprocessor::new(s, LIMITS)
            .preprocess_to_vec(&[255; 4], raw(2, 2, 1))
            .unwrap();
        assert_eq!(out[0], (1.0f32 - 0.485) / 0.229);
        assert_eq!(out[11], (1.0f32 - 0.406) / 0.225);
    }

    #[test]
    fn rejects_bad_input_with_reasons() {
        let p = Preprocessor::new(spec(Layout::Nchw, ColorMode::Rgb), LIMITS);
        assert_eq!(
            p.preprocess_to_vec(&[], Encoding::Detect),
            Err(PreprocessError::Empty)
        );
        assert!(matches!(
            p.preprocess_to_vec(b"hello world", Encoding::Detect),
            Err(PreprocessError::UnknownFormat(_))
        ));
        let err = p.preprocess_to_vec(&[0; 11], raw(2, 2, 3)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "raw pixels: 11 bytes do not match 2×2×3 = 12 bytes"
        );
        assert!(matches!(
            p.preprocess_to_vec(&[0; 8], raw(2, 2, 2)),
            Err(PreprocessError::RawGeometry(_))
        ));
        let big = vec![0u8; (1 << 20) + 1];
        assert!(matches!(
            p.preprocess_to_vec(&big, Encoding::Detect),
            Err(PreprocessError::TooLarge { .. })
        ));
        let err = p
            .preprocess_to_vec(&[0xFF, 0xD8, 0xFF, 0xE0], Encoding::Png)
            .unwrap_err();
        assert!(err.to_string().contains("declared format PNG"), "{err}");
        let err = p
            .preprocess_to_vec(&[0; 4096 * 4096 / 16], raw(4096, 4096, 1))
            .unwrap_err();
        assert!(
            matches!(err, PreprocessError::TooManyPixels { .. }),
            "{err}"
        );
    }

    #[test]
    fn decodes_png_roundtrip() {
        let mut png = Vec::new();
        image::GrayImage::from_raw(2, 2, vec![0, 85, 170, 255])
            .unwrap()
            .write_to(&mut Cursor::new(&mut png), CodecFormat::Png)
            .unwrap();
        let out = Preprocessor::new(spec(Layout::Nchw, ColorMode::Rgb), LIMITS)
            .preprocess_to_vec(&png, Encoding::Detect)
            .unwrap();
        assert_eq!(&out[..4], &[0., 85., 170., 255.]);
    }
}
