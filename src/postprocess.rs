//! Segmentation postprocessing: a model's per-pixel output for one slice becomes a label map at the
//! geometry of the slice's images (the model's `mask_resize`), with each class's and region's pixel
//! count and bounding box, the map as a lossless 8-bit PNG and, when asked, the class probability
//! maps. Runs on the preprocessing pool, off the async runtime. The mapping back follows Pillow,
//! as a research team's numpy + Pillow code would do it (`tests/reference/segment_reference.py`).

use crate::model::{Layout, MaskResize, ModelSpec, OutputKind, SegmentationSpec, Task};
use crate::preprocess::resample::{self, Filter};

/// How many pixels of one class (or region) and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Area {
    pub pixels: u64,
    /// `[x0, y0, x1, y1]`, inclusive; `None` when no pixel has the class.
    pub bbox: Option<[u32; 4]>,
}

impl Area {
    fn add(&mut self, x: u32, y: u32) {
        self.pixels += 1;
        self.bbox = Some(match self.bbox {
            None => [x, y, x, y],
            Some([x0, y0, x1, y1]) => [x0.min(x), y0.min(y), x1.max(x), y1.max(y)],
        });
    }

    fn union(&mut self, other: &Area) {
        self.pixels += other.pixels;
        self.bbox = match (self.bbox, other.bbox) {
            (None, b) | (b, None) => b,
            (Some([a0, b0, a1, b1]), Some([c0, d0, c1, d1])) => {
                Some([a0.min(c0), b0.min(d0), a1.max(c1), b1.max(d1)])
            }
        };
    }
}

/// One slice's segmentation at the geometry of its images.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    pub width: u32,
    pub height: u32,
    /// The label of each pixel, row-major (`width × height`).
    pub labels: Vec<u8>,
    /// Per label, in label order.
    pub classes: Vec<Area>,
    /// Per region of the model, in its order.
    pub regions: Vec<Area>,
    /// The label map as an 8-bit grayscale PNG (value = label index).
    pub png: Vec<u8>,
    /// `[classes, height, width]` probabilities at the mask's geometry, when asked.
    pub probabilities: Option<Vec<f32>>,
}

/// Turns a segmentation model's output into [`Mask`]s.
#[derive(Debug, Clone)]
pub struct Segmenter {
    spec: SegmentationSpec,
    kind: OutputKind,
    classes: usize,
    /// The output's (= the model input's) width and height.
    width: usize,
    height: usize,
}

impl Segmenter {
    /// `None` for a model that does not segment.
    pub fn new(spec: &ModelSpec) -> Option<Self> {
        let Task::Segmentation(segmentation) = &spec.config.task else {
            return None;
        };
        Some(Segmenter {
            spec: segmentation.clone(),
            kind: spec.config.output_kind,
            classes: spec.config.labels.len(),
            width: spec.config.input.width as usize,
            height: spec.config.input.height as usize,
        })
    }

    /// Values of the model's output per slice.
    pub fn output_len(&self) -> usize {
        self.classes * self.width * self.height
    }

    /// Bytes of the answer for one slice of `width × height` (the label map, and the probability
    /// maps when asked): what the slice's answer holds in memory until it is sent.
    pub fn answer_bytes(&self, width: u32, height: u32, probabilities: bool) -> u64 {
        let pixels = u64::from(width) * u64::from(height);
        let per_pixel = if probabilities {
            // The label map, its PNG (at most about the map's size) and C f32 values.
            2 + 4 * self.classes as u64
        } else {
            2
        };
        // The model-size planes the mapping works on.
        pixels * per_pixel + (self.output_len() as u64) * 4
    }

    /// The mask of one slice from its output (`output_len()` values), at `width × height`.
    pub fn segment(&self, output: &[f32], width: u32, height: u32, probabilities: bool) -> Mask {
        assert_eq!(
            output.len(),
            self.output_len(),
            "wrong output size: this is a bug"
        );
        let (w0, h0) = (width as usize, height as usize);
        let same_size = (w0, h0) == (self.width, self.height);
        let (labels, probability_maps) = match self.spec.mask_resize {
            MaskResize::Nearest => {
                let labels = self.argmax_planes(output);
                let labels = if same_size {
                    labels
                } else {
                    resample::nearest(&labels, self.width, self.height, 1, w0, h0)
                };
                let maps = probabilities.then(|| {
                    let planes = self.probability_planes(output);
                    if same_size {
                        planes.concat()
                    } else {
                        planes
                            .iter()
                            .flat_map(|p| resample::nearest(p, self.width, self.height, 1, w0, h0))
                            .collect()
                    }
                });
                (labels, maps)
            }
            MaskResize::Bilinear => {
                let mut planes = self.probability_planes(output);
                if !same_size {
                    planes = planes
                        .iter()
                        .map(|p| {
                            resample::resize_f32(
                                p,
                                self.width,
                                self.height,
                                w0,
                                h0,
                                Filter::Bilinear,
                            )
                        })
                        .collect();
                }
                let labels = argmax(&planes, w0 * h0);
                (labels, probabilities.then(|| planes.concat()))
            }
        };
        let mut classes = vec![Area::default(); self.classes];
        for (i, &label) in labels.iter().enumerate() {
            classes[label as usize].add((i % w0) as u32, (i / w0) as u32);
        }
        let regions = self
            .spec
            .regions
            .iter()
            .map(|region| {
                let mut area = Area::default();
                for &c in &region.classes {
                    area.union(&classes[c]);
                }
                area
            })
            .collect();
        Mask {
            png: png_gray(&labels, width, height),
            width,
            height,
            labels,
            classes,
            regions,
            probabilities: probability_maps,
        }
    }

    /// The value of class `k` at pixel `i` of the output.
    #[inline]
    fn at(&self, output: &[f32], k: usize, i: usize) -> f32 {
        match self.spec.layout {
            Layout::Nchw => output[k * self.width * self.height + i],
            Layout::Nhwc => output[i * self.classes + k],
        }
    }

    /// The most probable class of each pixel at the model's size (ties: the lowest label).
    fn argmax_planes(&self, output: &[f32]) -> Vec<u8> {
        let n = self.width * self.height;
        match self.spec.layout {
            Layout::Nhwc => output
                .chunks_exact(self.classes)
                .map(|scores| first_max(scores.iter().copied()))
                .collect(),
            Layout::Nchw => {
                // Plane by plane, so each pass reads memory in order.
                let mut best = output[..n].to_vec();
                let mut labels = vec![0u8; n];
                for k in 1..self.classes {
                    let plane = &output[k * n..(k + 1) * n];
                    for ((b, l), &v) in best.iter_mut().zip(labels.iter_mut()).zip(plane) {
                        if v > *b {
                            *b = v;
                            *l = k as u8;
                        }
                    }
                }
                labels
            }
        }
    }

    /// Class probabilities at the model's size, one plane per class: the output itself, or its
    /// softmax over the classes (in f64) for logits.
    fn probability_planes(&self, output: &[f32]) -> Vec<Vec<f32>> {
        let n = self.width * self.height;
        let mut planes = vec![vec![0f32; n]; self.classes];
        match self.kind {
            OutputKind::Probabilities => {
                for (k, plane) in planes.iter_mut().enumerate() {
                    for (i, v) in plane.iter_mut().enumerate() {
                        *v = self.at(output, k, i);
                    }
                }
            }
            OutputKind::Logits => {
                let mut exps = vec![0f64; self.classes];
                #[allow(clippy::needless_range_loop)] // `i` indexes every class's plane
                for i in 0..n {
                    let max = (0..self.classes)
                        .map(|k| self.at(output, k, i))
                        .fold(f32::NEG_INFINITY, f32::max) as f64;
                    let mut sum = 0.0;
                    for (k, e) in exps.iter_mut().enumerate() {
                        *e = (self.at(output, k, i) as f64 - max).exp();
                        sum += *e;
                    }
                    for (plane, e) in planes.iter_mut().zip(&exps) {
                        plane[i] = (e / sum) as f32;
                    }
                }
            }
        }
        planes
    }
}

/// The index of the first largest value.
fn first_max(values: impl Iterator<Item = f32>) -> u8 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (k, v) in values.enumerate() {
        if v > best.1 || k == 0 {
            best = (k, v);
        }
    }
    best.0 as u8
}

/// Per pixel, the first plane with the largest value.
fn argmax(planes: &[Vec<f32>], n: usize) -> Vec<u8> {
    let mut best = planes[0].clone();
    let mut labels = vec![0u8; n];
    for (k, plane) in planes.iter().enumerate().skip(1) {
        for ((b, l), &v) in best.iter_mut().zip(labels.iter_mut()).zip(plane) {
            if v > *b {
                *b = v;
                *l = k as u8;
            }
        }
    }
    labels
}

/// An 8-bit grayscale PNG of `data` (fast compression: masks are mostly runs).
pub fn png_gray(data: &[u8], width: u32, height: u32) -> Vec<u8> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut png = Vec::with_capacity(data.len() / 8 + 128);
    image::ImageEncoder::write_image(
        PngEncoder::new_with_quality(&mut png, CompressionType::Fast, FilterType::Sub),
        data,
        width,
        height,
        image::ExtendedColorType::L8,
    )
    .expect("an 8-bit buffer of width × height encodes");
    png
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Region;

    fn segmenter(layout: Layout, kind: OutputKind, resize: MaskResize) -> Segmenter {
        Segmenter {
            spec: SegmentationSpec {
                layout,
                mask_resize: resize,
                colors: vec![[0; 3]; 3],
                regions: vec![Region {
                    name: "tumour".into(),
                    classes: vec![1, 2],
                }],
                codes: Default::default(),
            },
            kind,
            classes: 3,
            width: 2,
            height: 2,
        }
    }

    #[test]
    fn argmax_counts_and_boxes_in_both_layouts() {
        // Pixels (0,0) background, (1,0) class 1, (0,1) class 2, (1,1) a tie of 1 and 2 -> 1.
        let nchw = [
            1.0, 0.0, 0.0, 0.0, // class 0
            0.0, 5.0, 0.0, 3.0, // class 1
            0.0, 0.0, 4.0, 3.0, // class 2
        ];
        let mut nhwc = [0f32; 12];
        for k in 0..3 {
            for i in 0..4 {
                nhwc[i * 3 + k] = nchw[k * 4 + i];
            }
        }
        for (layout, output) in [(Layout::Nchw, &nchw), (Layout::Nhwc, &nhwc)] {
            let mask = segmenter(layout, OutputKind::Logits, MaskResize::Nearest)
                .segment(output, 2, 2, false);
            assert_eq!(mask.labels, [0, 1, 2, 1], "{layout:?}");
            assert_eq!(mask.classes[1].pixels, 2);
            assert_eq!(mask.classes[1].bbox, Some([1, 0, 1, 1]));
            assert_eq!(mask.classes[2].bbox, Some([0, 1, 0, 1]));
            assert_eq!(mask.regions[0].pixels, 3);
            assert_eq!(mask.regions[0].bbox, Some([0, 0, 1, 1]));
            assert!(mask.probabilities.is_none());
            let png = image::load_from_memory(&mask.png).unwrap().to_luma8();
            assert_eq!(png.as_raw(), &mask.labels);
        }
    }

    #[test]
    fn the_mask_is_mapped_back_to_the_image_size() {
        let output = [
            1.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, 0.0,
        ];
        let nearest = segmenter(Layout::Nchw, OutputKind::Probabilities, MaskResize::Nearest)
            .segment(&output, 4, 4, true);
        // Pixel (0,0) is background; ties elsewhere go to label 0 too: all background.
        assert_eq!(nearest.labels, [0; 16]);
        assert_eq!(nearest.probabilities.as_ref().unwrap().len(), 3 * 16);
        let output = [
            0.0, 1.0, 1.0, 1.0, //
            1.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 0.0, 0.0,
        ];
        let mask = segmenter(Layout::Nchw, OutputKind::Probabilities, MaskResize::Nearest)
            .segment(&output, 4, 4, false);
        assert_eq!(
            mask.labels,
            [1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            "nearest: each model pixel covers 2×2"
        );
        assert_eq!(mask.classes[1].bbox, Some([0, 0, 1, 1]));
        let bilinear = segmenter(
            Layout::Nchw,
            OutputKind::Probabilities,
            MaskResize::Bilinear,
        )
        .segment(&output, 4, 4, true);
        assert_eq!(bilinear.width, 4);
        assert_eq!(bilinear.labels[0], 1);
        assert_eq!(bilinear.labels[15], 0);
        assert_eq!(bilinear.probabilities.unwrap().len(), 48);
    }
}
