//! Image → model input tensor: decode ([`crate::input`]), colour, resize ([`resample`]), scale,
//! written straight into the model's layout. Mirrors what training did with Pillow (filters, luma
//! formula, rounding), which `tests/reference` checks across sizes, channels and formats.

mod guard;
pub mod resample;
pub mod voi;

use crate::input::dicom::{self, DicomIds};
use crate::input::{self, Encoding, InputError, InputLimits, Pixels};
use crate::model::{ColorMode, DicomOutput, InputSpec, Layout, ResizeFilter, Scaling};
use resample::Filter;

/// Where a DICOM input came from, and what the guard said about it.
#[derive(Debug, Clone, PartialEq)]
pub struct DicomSource {
    pub ids: DicomIds,
    pub warnings: Vec<String>,
}

/// Decoded pixels before conversion and resizing.
enum Plane {
    Bytes(Pixels),
    /// One channel of unrounded 8-bit-scale levels (DICOM, `output = "float"`).
    Float {
        width: u32,
        height: u32,
        data: Vec<f32>,
    },
}

/// Turns images into input tensors for one model.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    spec: InputSpec,
    limits: InputLimits,
    /// Value of an 8-bit pixel, per channel.
    lut: Vec<[f32; 256]>,
}

/// What preprocessing learned about a multi-modal input ([`Preprocessor::preprocess_channels`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelsSource {
    /// Size of the channels' images (all the same): the geometry of the answer's mask.
    pub width: u32,
    pub height: u32,
    /// The DICOM channels' identifiers and guard warnings, in channel order.
    pub dicom: Vec<(crate::input::sequence::Sequence, DicomSource)>,
}

impl Preprocessor {
    pub fn new(spec: InputSpec, limits: InputLimits) -> Self {
        let mut lut = vec![[0f32; 256]; spec.channel_count()];
        for (c, table) in lut.iter_mut().enumerate() {
            for (p, v) in table.iter_mut().enumerate() {
                *v = match spec.scaling {
                    // Same float32 operations, in the same order, as numpy's reference.
                    Scaling::MeanStd { ref mean, ref std } => (p as f32 / 255.0 - mean[c]) / std[c],
                    Scaling::ScaleOffset { scale, offset } => p as f32 * scale + offset,
                };
            }
        }
        Preprocessor { spec, limits, lut }
    }

    /// The limits it decodes under.
    pub fn input_limits(&self) -> InputLimits {
        self.limits
    }

    /// f32 values of one image's tensor.
    pub fn image_len(&self) -> usize {
        self.spec.image_len()
    }

    /// Decodes, converts, resizes and scales one image into `out` (`image_len()` values). A
    /// DICOM instance's identifiers come back.
    pub fn preprocess(
        &self,
        data: &[u8],
        encoding: Encoding,
        out: &mut [f32],
    ) -> Result<Option<DicomSource>, InputError> {
        self.preprocess_with(data, encoding, out, false)
            .map(|(ids, _)| ids)
    }

    /// [`Preprocessor::preprocess`], and with `preview` also the image as the model sees it, as
    /// a PNG ([`Preprocessor::preview_png`]), from the same decode: what the upload page shows
    /// next to a result.
    pub fn preprocess_with(
        &self,
        data: &[u8],
        encoding: Encoding,
        out: &mut [f32],
        preview: bool,
    ) -> Result<(Option<DicomSource>, Option<Vec<u8>>), InputError> {
        assert_eq!(
            out.len(),
            self.spec.image_len(),
            "output buffer has the wrong size: this is a bug"
        );
        let (plane, ids) = self.decode(data, encoding)?;
        let preview = match plane {
            Plane::Bytes(pixels) => {
                let pixels = self.resize(self.convert_color(pixels));
                self.write_tensor(&pixels, out);
                preview.then(|| png(&pixels)).transpose()?
            }
            Plane::Float {
                width,
                height,
                data,
            } => {
                let levels = self.resize_levels(data, width, height);
                self.write_levels(&levels, out);
                preview.then(|| png(&self.rounded(&levels))).transpose()?
            }
        };
        Ok((ids, preview))
    }

    /// A multi-modal input (`[input] channels`): one image per channel, in the model's channel
    /// order, each decoded, made gray (Pillow's luma), resized and scaled with its channel's
    /// mean/std into its channel of `out` (`image_len()` values). Every image must have the same
    /// size: the answer's geometry. A DICOM image is checked by the model's guard against the
    /// sequence of its channel. An error names the channel (its index in `images`).
    pub fn preprocess_channels(
        &self,
        images: &[(&[u8], Encoding)],
        out: &mut [f32],
    ) -> Result<ChannelsSource, (usize, InputError)> {
        assert_eq!(
            out.len(),
            self.spec.image_len(),
            "wrong output size: this is a bug"
        );
        assert_eq!(
            images.len(),
            self.spec.channels.len(),
            "one image per channel: this is a bug"
        );
        let mut geometry = None;
        let mut dicom = Vec::new();
        for (c, &(data, encoding)) in images.iter().enumerate() {
            let sequence = self.spec.channels[c];
            let (plane, source) = self
                .decode_as(data, encoding, Some(sequence))
                .map_err(|e| (c, e))?;
            let size = match &plane {
                Plane::Bytes(p) => (p.width, p.height),
                Plane::Float { width, height, .. } => (*width, *height),
            };
            match geometry {
                None => geometry = Some(size),
                Some(first) if first != size => {
                    return Err((
                        c,
                        InputError::Inconsistent(format!(
                            "the image is {}×{}, but the {} image is {}×{}: a slice's images must have the same size",
                            size.0,
                            size.1,
                            self.spec.channels[0].as_str(),
                            first.0,
                            first.1
                        )),
                    ));
                }
                Some(_) => {}
            }
            if let Some(source) = source {
                dicom.push((sequence, source));
            }
            match plane {
                Plane::Bytes(pixels) => {
                    let pixels = self.resize(self.convert_color(pixels));
                    let lut = &self.lut[c];
                    self.write_channel(c, pixels.data.iter().map(|&p| lut[p as usize]), out);
                }
                Plane::Float {
                    width,
                    height,
                    data,
                } => {
                    let levels = self.resize_levels(data, width, height);
                    let value = |v: f32| match &self.spec.scaling {
                        Scaling::MeanStd { mean, std } => (v / 255.0 - mean[c]) / std[c],
                        Scaling::ScaleOffset { scale, offset } => v * scale + offset,
                    };
                    self.write_channel(c, levels.iter().map(|&v| value(v)), out);
                }
            }
        }
        let (width, height) = geometry.expect("a model with channels has at least one");
        Ok(ChannelsSource {
            width,
            height,
            dicom,
        })
    }

    /// One DICOM instance of a study as its gray levels (windowed as the model's `[input.dicom]`
    /// says, 0–255, as `f32`): what a study's series are resampled on before
    /// [`Preprocessor::preprocess_levels`]. The sequence guard is not applied: the study's plan
    /// decided each series' channel (from the headers, or as the caller named it).
    pub fn decode_levels(&self, data: &[u8]) -> Result<(Vec<f32>, u32, u32), InputError> {
        let image = dicom::decode(data, &self.limits)?;
        if image.frames.len() != 1 {
            return Err(InputError::Decode {
                format: "DICOM",
                message: format!(
                    "the instance has {} frames; a study takes single-frame instances",
                    image.frames.len()
                ),
            });
        }
        let frame = image.frames.into_iter().next().expect("one frame");
        Ok(match self.dicom_frame(frame, &image.header)? {
            Plane::Float {
                width,
                height,
                data,
            } => (data, width, height),
            Plane::Bytes(pixels) => {
                let gray = if pixels.channels == 3 {
                    // Pillow's luma, as `convert_color` makes gray for a gray model.
                    pixels
                        .data
                        .chunks_exact(3)
                        .map(|p| {
                            ((p[0] as u32 * 19595
                                + p[1] as u32 * 38470
                                + p[2] as u32 * 7471
                                + 0x8000)
                                >> 16) as f32
                        })
                        .collect()
                } else {
                    pixels.data.iter().map(|&v| f32::from(v)).collect()
                };
                (gray, pixels.width, pixels.height)
            }
        })
    }

    /// A study's slice: one gray-level plane per channel (`width × height` each, the reference
    /// slice's geometry), resized and scaled into the model's input as
    /// [`Preprocessor::preprocess_channels`] does for decoded 16-bit images.
    pub fn preprocess_levels(&self, planes: &[Vec<f32>], width: u32, height: u32, out: &mut [f32]) {
        assert_eq!(
            out.len(),
            self.spec.image_len(),
            "wrong output size: this is a bug"
        );
        assert_eq!(
            planes.len(),
            self.spec.channels.len(),
            "one plane per channel: this is a bug"
        );
        for (c, plane) in planes.iter().enumerate() {
            let levels = self.resize_levels(plane.clone(), width, height);
            let value = |v: f32| match &self.spec.scaling {
                Scaling::MeanStd { mean, std } => (v / 255.0 - mean[c]) / std[c],
                Scaling::ScaleOffset { scale, offset } => v * scale + offset,
            };
            self.write_channel(c, levels.iter().map(|&v| value(v)), out);
        }
    }

    /// Writes one channel's values (a plane in row-major order) into channel `c` of `out`.
    fn write_channel(&self, c: usize, values: impl Iterator<Item = f32>, out: &mut [f32]) {
        let channels = self.spec.channel_count();
        let plane = self.spec.width as usize * self.spec.height as usize;
        match self.spec.layout {
            Layout::Nchw => {
                for (o, v) in out[c * plane..(c + 1) * plane].iter_mut().zip(values) {
                    *o = v;
                }
            }
            Layout::Nhwc => {
                for (o, v) in out[c..].iter_mut().step_by(channels).zip(values) {
                    *o = v;
                }
            }
        }
    }

    /// Converts, resizes and scales decoded pixels into `out`.
    fn write_plane(&self, plane: Plane, out: &mut [f32]) {
        match plane {
            Plane::Bytes(pixels) => {
                let pixels = self.resize(self.convert_color(pixels));
                self.write_tensor(&pixels, out);
            }
            Plane::Float {
                width,
                height,
                data,
            } => self.write_levels(&self.resize_levels(data, width, height), out),
        }
    }

    /// Float levels resized to the model's size with its filter, as Pillow resizes mode `F`.
    fn resize_levels(&self, data: Vec<f32>, width: u32, height: u32) -> Vec<f32> {
        let (w, h) = (self.spec.width as usize, self.spec.height as usize);
        let (in_w, in_h) = (width as usize, height as usize);
        if (in_w, in_h) == (w, h) {
            return data;
        }
        let filter = match self.spec.resize_filter {
            ResizeFilter::Nearest => return resample::nearest(&data, in_w, in_h, 1, w, h),
            ResizeFilter::Bilinear => Filter::Bilinear,
            ResizeFilter::Bicubic => Filter::Bicubic,
            ResizeFilter::Lanczos3 => Filter::Lanczos3,
        };
        resample::resize_f32(&data, in_w, in_h, w, h, filter)
    }

    /// A one-channel float plane of 8-bit-scale levels, replicated to 3 channels and scaled as
    /// 8-bit values are (the same float32 operations as the 8-bit table).
    fn write_levels(&self, levels: &[f32], out: &mut [f32]) {
        let plane = levels.len();
        let value = |v: f32, c: usize| match &self.spec.scaling {
            Scaling::MeanStd { mean, std } => (v / 255.0 - mean[c]) / std[c],
            Scaling::ScaleOffset { scale, offset } => v * scale + offset,
        };
        match self.spec.layout {
            Layout::Nchw => {
                for c in 0..3 {
                    for (o, &v) in out[c * plane..(c + 1) * plane].iter_mut().zip(levels) {
                        *o = value(v, c);
                    }
                }
            }
            Layout::Nhwc => {
                for (o, &v) in out.chunks_exact_mut(3).zip(levels) {
                    for (c, oc) in o.iter_mut().enumerate() {
                        *oc = value(v, c);
                    }
                }
            }
        }
    }

    /// 8-bit pixels of one image: PNG/JPEG/raw as Pillow decodes them, DICOM through its pixel
    /// semantics and the model's window.
    fn decode(
        &self,
        data: &[u8],
        encoding: Encoding,
    ) -> Result<(Plane, Option<DicomSource>), InputError> {
        self.decode_as(data, encoding, None)
    }

    /// [`Preprocessor::decode`]; a DICOM image of a multi-modal input (`channel`: its channel's
    /// sequence) is checked by the model's guard as that sequence.
    fn decode_as(
        &self,
        data: &[u8],
        encoding: Encoding,
        channel: Option<crate::input::sequence::Sequence>,
    ) -> Result<(Plane, Option<DicomSource>), InputError> {
        if !encoding.is_dicom(data) {
            let pixels = input::decode(data, encoding, &self.limits, self.spec.sixteen_bit)?;
            return Ok((Plane::Bytes(pixels), None));
        }
        let image = dicom::decode(data, &self.limits)?;
        let warnings = match (channel, &self.spec.dicom_guard) {
            (Some(sequence), Some(guard)) => {
                let channel_guard = crate::model::DicomGuard {
                    sequences: vec![sequence],
                    ..guard.clone()
                };
                guard::check(&channel_guard, &image.header).map_err(InputError::NotAccepted)?
            }
            _ => self.guard(&image.header)?,
        };
        if image.frames.len() != 1 {
            let takes = match channel {
                None => "Classify takes single-frame instances",
                Some(_) => "a slice's channel is one single-frame instance",
            };
            return Err(InputError::Decode {
                format: "DICOM",
                message: format!("the instance has {} frames; {takes}", image.frames.len()),
            });
        }
        let frame = image.frames.into_iter().next().expect("one frame");
        let plane = self.dicom_frame(frame, &image.header)?;
        Ok((
            plane,
            Some(DicomSource {
                ids: image.header.ids,
                warnings,
            }),
        ))
    }

    /// The model's sequence guard on one instance's header: refused, or its warnings.
    pub fn guard(&self, header: &dicom::Header) -> Result<Vec<String>, InputError> {
        match &self.spec.dicom_guard {
            None => Ok(Vec::new()),
            Some(guard) => guard::check(guard, header).map_err(InputError::NotAccepted),
        }
    }

    /// One decoded DICOM frame (a slice of a series) as the model's input tensor.
    pub fn frame_tensor(
        &self,
        frame: dicom::Frame,
        header: &dicom::Header,
    ) -> Result<Vec<f32>, InputError> {
        let mut out = vec![0f32; self.spec.image_len()];
        self.frame_into(frame, header, &mut out)?;
        Ok(out)
    }

    /// One decoded DICOM frame as the model's input tensor, written into `out` (`image_len()`
    /// values, e.g. a row of a batch buffer).
    pub fn frame_into(
        &self,
        frame: dicom::Frame,
        header: &dicom::Header,
        out: &mut [f32],
    ) -> Result<(), InputError> {
        assert_eq!(
            out.len(),
            self.spec.image_len(),
            "wrong output size: this is a bug"
        );
        self.write_plane(self.dicom_frame(frame, header)?, out);
        Ok(())
    }

    /// One decoded DICOM frame windowed as the model says: 8-bit pixels, or (`output = "float"`)
    /// unrounded levels. Colour frames are 8-bit either way.
    fn dicom_frame(
        &self,
        frame: dicom::Frame,
        header: &dicom::Header,
    ) -> Result<Plane, InputError> {
        let window = self.spec.dicom_window;
        Ok(match frame {
            dicom::Frame::Color(pixels) => Plane::Bytes(pixels),
            dicom::Frame::Mono {
                width,
                height,
                stored,
                padding,
            } => match self.spec.dicom_output {
                DicomOutput::Uint8 => Plane::Bytes(Pixels {
                    width,
                    height,
                    channels: 1,
                    data: voi::to_gray8(&stored, padding.as_deref(), header, window)?,
                }),
                DicomOutput::Float => Plane::Float {
                    width,
                    height,
                    data: voi::to_float(&stored, padding.as_deref(), header, window)?,
                },
            },
        })
    }

    /// The image as the model sees it, as a PNG: decoded, converted and resized, before scaling
    /// (gray for `grayscale` models, RGB otherwise).
    pub fn preview_png(&self, data: &[u8], encoding: Encoding) -> Result<Vec<u8>, InputError> {
        let pixels = match self.decode(data, encoding)?.0 {
            Plane::Bytes(pixels) => self.resize(self.convert_color(pixels)),
            Plane::Float {
                width,
                height,
                data,
            } => self.rounded(&self.resize_levels(data, width, height)),
        };
        png(&pixels)
    }

    /// The preview of float levels: rounded to 8 bits after the float resize.
    fn rounded(&self, levels: &[f32]) -> Pixels {
        Pixels {
            width: self.spec.width,
            height: self.spec.height,
            channels: 1,
            data: levels
                .iter()
                .map(|v| v.round().clamp(0.0, 255.0) as u8)
                .collect(),
        }
    }

    /// A freshly allocated tensor for one image.
    pub fn preprocess_to_vec(
        &self,
        data: &[u8],
        encoding: Encoding,
    ) -> Result<Vec<f32>, InputError> {
        let mut out = vec![0f32; self.spec.image_len()];
        self.preprocess(data, encoding, &mut out)?;
        Ok(out)
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
        let (w, h) = (self.spec.width as usize, self.spec.height as usize);
        let (in_w, in_h) = (pixels.width as usize, pixels.height as usize);
        if (in_w, in_h) == (w, h) {
            return pixels;
        }
        let c = pixels.channels;
        let data = match self.spec.resize_filter {
            ResizeFilter::Nearest => resample::nearest(&pixels.data, in_w, in_h, c, w, h),
            ResizeFilter::Bilinear => {
                resample::resize(&pixels.data, in_w, in_h, c, w, h, Filter::Bilinear)
            }
            ResizeFilter::Bicubic => {
                resample::resize(&pixels.data, in_w, in_h, c, w, h, Filter::Bicubic)
            }
            ResizeFilter::Lanczos3 => {
                resample::resize(&pixels.data, in_w, in_h, c, w, h, Filter::Lanczos3)
            }
        };
        Pixels {
            width: w as u32,
            height: h as u32,
            channels: c,
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

/// Pixels as a PNG (gray or RGB).
fn png(pixels: &Pixels) -> Result<Vec<u8>, InputError> {
    let color = if pixels.channels == 1 {
        image::ExtendedColorType::L8
    } else {
        image::ExtendedColorType::Rgb8
    };
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &pixels.data,
        pixels.width,
        pixels.height,
        color,
    )
    .map_err(|e| InputError::Decode {
        format: "PNG",
        message: format!("cannot encode the preview: {e}"),
    })?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::SixteenBit;

    fn spec(layout: Layout, color: ColorMode) -> InputSpec {
        InputSpec {
            channels: Vec::new(),
            tensors: Vec::new(),
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
            sixteen_bit: SixteenBit::Pillow,
            dicom_window: Default::default(),
            dicom_guard: None,
            dicom_output: Default::default(),
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
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        };
        let out = Preprocessor::new(s, LIMITS)
            .preprocess_to_vec(&[255; 4], raw(2, 2, 1))
            .unwrap();
        assert_eq!(out[0], (1.0f32 - 0.485) / 0.229);
        assert_eq!(out[11], (1.0f32 - 0.406) / 0.225);
    }

    fn two_channels(layout: Layout) -> Preprocessor {
        use crate::input::sequence::Sequence;
        let mut s = spec(layout, ColorMode::Grayscale);
        s.channels = vec![Sequence::T2, Sequence::Flair];
        s.scaling = Scaling::MeanStd {
            mean: vec![0.0, 1.0],
            std: vec![1.0 / 255.0, 1.0 / 255.0],
        };
        Preprocessor::new(s, LIMITS)
    }

    #[test]
    fn channels_are_stacked_in_order_each_with_its_own_scaling() {
        let (t2, flair) = ([1u8, 2, 3, 4], [10u8, 20, 30, 40]);
        let images = [(&t2[..], raw(2, 2, 1)), (&flair[..], raw(2, 2, 1))];
        // Channel 1 has mean 1: (p/255 - 1) * 255 = p - 255.
        let mut nchw = vec![0f32; 8];
        let source = two_channels(Layout::Nchw)
            .preprocess_channels(&images, &mut nchw)
            .unwrap();
        assert_eq!((source.width, source.height), (2, 2));
        let round = |v: &[f32]| v.iter().map(|x| x.round()).collect::<Vec<_>>();
        assert_eq!(round(&nchw), [1., 2., 3., 4., -245., -235., -225., -215.]);
        let mut nhwc = vec![0f32; 8];
        two_channels(Layout::Nhwc)
            .preprocess_channels(&images, &mut nhwc)
            .unwrap();
        assert_eq!(round(&nhwc), [1., -245., 2., -235., 3., -225., 4., -215.]);
        // RGB input is made gray with Pillow's luma.
        let rgb = [255u8, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255];
        let mut out = vec![0f32; 8];
        two_channels(Layout::Nchw)
            .preprocess_channels(
                &[(&rgb[..], raw(2, 2, 3)), (&flair[..], raw(2, 2, 1))],
                &mut out,
            )
            .unwrap();
        assert_eq!(round(&out[..4]), [76., 150., 29., 255.]);
    }

    #[test]
    fn channels_of_different_sizes_are_refused_naming_the_channel() {
        let (a, b) = ([1u8; 4], [1u8; 6]);
        let mut out = vec![0f32; 8];
        let (channel, error) = two_channels(Layout::Nchw)
            .preprocess_channels(&[(&a[..], raw(2, 2, 1)), (&b[..], raw(3, 2, 1))], &mut out)
            .unwrap_err();
        assert_eq!(channel, 1);
        assert_eq!(
            error.to_string(),
            "the image is 3×2, but the T2 image is 2×2: a slice's images must have the same size"
        );
    }
}
