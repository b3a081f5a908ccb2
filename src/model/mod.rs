//! The model repository: `<repository>/<name>/model.toml` and `<name>/<version>/model.onnx`.
//!
//! [`config`] parses and validates `model.toml`; [`repository`] finds models and versions on disk
//! and hashes them; [`task`] turns a model's output into a result (softmax, argmax). A
//! [`ModelSpec`] is one version, ready to load.

pub mod config;
pub mod repository;
pub mod task;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::input::SixteenBit;

pub use config::{BatchingOverrides, ModelConfig, VersionPolicy};

/// Errors while reading a model directory. Each message names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid model.toml: {message}")]
    Config { path: PathBuf, message: String },
    #[error(
        "{dir}: no version directory with a model.onnx (expected {dir}/<N>/model.onnx, N a positive integer)"
    )]
    NoVersion { dir: PathBuf },
    #[error("{dir}: version {version} has no model.onnx")]
    MissingVersion { dir: PathBuf, version: u64 },
}

/// Memory layout of the model's input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Layout {
    #[serde(rename = "NCHW")]
    Nchw,
    #[serde(rename = "NHWC")]
    Nhwc,
}

impl Layout {
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Nchw => "NCHW",
            Layout::Nhwc => "NHWC",
        }
    }
}

/// Colour handling before resizing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColorMode {
    /// Convert to RGB (grayscale inputs are replicated, alpha dropped), as Pillow's `convert("RGB")`.
    Rgb,
    /// Convert to 8-bit luma (Pillow's ITU-R 601-2 formula), replicated to 3 channels.
    Grayscale,
}

impl ColorMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ColorMode::Rgb => "rgb",
            ColorMode::Grayscale => "grayscale",
        }
    }
}

/// Resize filter; must be the one used in training (Pillow semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeFilter {
    Nearest,
    Bilinear,
    Bicubic,
    Lanczos3,
}

impl ResizeFilter {
    pub fn as_str(self) -> &'static str {
        match self {
            ResizeFilter::Nearest => "nearest",
            ResizeFilter::Bilinear => "bilinear",
            ResizeFilter::Bicubic => "bicubic",
            ResizeFilter::Lanczos3 => "lanczos3",
        }
    }
}

/// How a DICOM image's modality values become 8-bit pixels (`[input.dicom]` in `model.toml`): it
/// must match what the training export did.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum DicomWindow {
    /// The file's first Window Center/Width (with its VOI LUT Function) or its VOI LUT Sequence;
    /// per-image min–max when the file has neither.
    #[default]
    Header,
    /// Per-image minimum to maximum (padding pixels excluded), as BraTS slice exports do.
    MinMax,
    /// Per-image percentiles (numpy's default linear interpolation), clipped.
    Percentile { low: f64, high: f64 },
    /// A fixed LINEAR window.
    Fixed { center: f64, width: f64 },
}

impl DicomWindow {
    /// As `model.toml` writes it.
    pub fn describe(&self) -> String {
        match self {
            DicomWindow::Header => "header".into(),
            DicomWindow::MinMax => "minmax".into(),
            DicomWindow::Percentile { low, high } => format!("percentile {low}–{high}"),
            DicomWindow::Fixed { center, width } => format!("center {center} width {width}"),
        }
    }
}

/// What the window of a DICOM image produces (`[input.dicom] output`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DicomOutput {
    /// 8-bit pixels (`floor(t × 255 + 0.5)`), as a PNG training export was; then the usual
    /// resize and scaling.
    #[default]
    Uint8,
    /// Unrounded values `t × 255` (float32): resized as Pillow resizes mode `F`, then scaled as
    /// 8-bit values would be. Colour images stay 8-bit.
    Float,
}

/// What a model accepts as DICOM input (`modality`, `sequences`, `sequence_policy` in
/// `[input.dicom]`): the sequence guard.
#[derive(Debug, Clone, PartialEq)]
pub struct DicomGuard {
    /// Accepted Modality values (empty: any).
    pub modalities: Vec<String>,
    /// Accepted MR sequences (empty: any).
    pub sequences: Vec<crate::input::sequence::Sequence>,
    /// What happens to a series of another sequence; an unknown one always only warns.
    pub policy: GuardPolicy,
}

/// `reject` (FAILED_PRECONDITION) or `warn` (answered, with a warning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardPolicy {
    Reject,
    Warn,
}

/// How a series is summarised (`[series]` in `model.toml`).
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesSettings {
    /// Classify the central fraction of the sorted slices (1.0: all).
    pub central_fraction: f64,
    pub aggregation: Aggregation,
    /// The label the series finding is about (default: the last label, e.g. `tumor`).
    pub finding_label: usize,
}

/// How per-slice probabilities of the finding label become the series'.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Aggregation {
    /// The highest, with the slice it came from.
    Max,
    /// The mean of the `k` highest.
    MeanTopK(usize),
}

impl Aggregation {
    pub fn describe(self, slices: usize) -> String {
        match self {
            Aggregation::Max => format!("maximum over {slices} slices"),
            Aggregation::MeanTopK(k) => {
                format!("mean of the top {} of {slices} slices", k.min(slices))
            }
        }
    }
}

/// Pixel scaling from 8-bit values to the model's input values.
#[derive(Debug, Clone, PartialEq)]
pub enum Scaling {
    /// `(pixel / 255 - mean[c]) / std[c]`, one value per input channel.
    MeanStd { mean: Vec<f32>, std: Vec<f32> },
    /// `pixel * scale + offset`.
    ScaleOffset { scale: f32, offset: f32 },
}

/// Whether the model's output needs a softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    Logits,
    Probabilities,
}

impl OutputKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::Logits => "logits",
            OutputKind::Probabilities => "probabilities",
        }
    }
}

/// What a model does with its input (`[model] task`).
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// One label for the whole image (`[output]`: `[batch, labels]`).
    Classification,
    /// One label per pixel (`[output]`: `[batch, labels, H, W]` or `[batch, H, W, labels]`).
    Segmentation(SegmentationSpec),
}

impl Task {
    pub fn as_str(&self) -> &'static str {
        match self {
            Task::Classification => "classification",
            Task::Segmentation(_) => "segmentation",
        }
    }
}

/// How a segmentation model's per-pixel output is read and mapped back to the image.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentationSpec {
    /// Layout of the output tensor (its height and width are the input's).
    pub layout: Layout,
    /// How the model-size output becomes a mask at the input image's size.
    pub mask_resize: MaskResize,
    /// One colour per label (the page's legend and overlay), `#rrggbb`.
    pub colors: Vec<[u8; 3]>,
    /// Named unions of classes (e.g. BraTS's whole tumour).
    pub regions: Vec<Region>,
    /// Coded concepts of labels and regions (`[output.codes]`), by name; see
    /// [`SegmentationSpec::codes_of`] for the default.
    pub codes: std::collections::BTreeMap<String, SegmentCodes>,
}

/// A coded concept: value, coding scheme designator (e.g. `SCT`: SNOMED CT), meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concept {
    pub value: String,
    pub scheme: String,
    pub meaning: String,
}

impl Concept {
    fn sct(value: &str, meaning: &str) -> Self {
        Concept {
            value: value.into(),
            scheme: "SCT".into(),
            meaning: meaning.into(),
        }
    }
}

/// What a segment is, as DICOM Segmentation objects code it (Segmented Property Category and
/// Type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentCodes {
    pub category: Concept,
    pub kind: Concept,
}

impl SegmentationSpec {
    /// The codes of label or region `name`: as `[output.codes]` declares them, else SNOMED CT
    /// "Morphologically Altered Structure" / "Neoplasm" (a tumour-segmentation model's classes
    /// are parts of a neoplasm; the model's own codes say which).
    pub fn codes_of(&self, name: &str) -> SegmentCodes {
        self.codes
            .get(name)
            .cloned()
            .unwrap_or_else(|| SegmentCodes {
                category: Concept::sct("49755003", "Morphologically Altered Structure"),
                kind: Concept::sct("108369006", "Neoplasm"),
            })
    }

    /// The colours as `model.toml` writes them, `#rrggbb`.
    pub fn hex_colors(&self) -> Vec<String> {
        self.colors
            .iter()
            .map(|[r, g, b]| format!("#{r:02x}{g:02x}{b:02x}"))
            .collect()
    }
}

/// A named union of classes.
#[derive(Debug, Clone, PartialEq)]
pub struct Region {
    pub name: String,
    /// Label indices, ascending.
    pub classes: Vec<usize>,
}

impl Region {
    /// The names of its classes, out of the model's `labels`.
    pub fn label_names(&self, labels: &[String]) -> Vec<String> {
        self.classes.iter().map(|&c| labels[c].clone()).collect()
    }
}

/// `mask_resize`: how a model-size output is mapped back to the image's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskResize {
    /// Argmax at the model's size, then the label map resized nearest-neighbour (Pillow).
    Nearest,
    /// Class probabilities resized bilinearly (Pillow, mode `F`), then argmax.
    Bilinear,
}

impl MaskResize {
    pub fn as_str(self) -> &'static str {
        match self {
            MaskResize::Nearest => "nearest",
            MaskResize::Bilinear => "bilinear",
        }
    }
}

/// How images become the model's input tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// The one ONNX input (when `tensors` is empty).
    pub tensor_name: String,
    /// Multi-modal input: one gray image per MR sequence, stacked in this order (`[input]
    /// channels`). Empty: one image, as RGB (gray replicated) into 3 channels.
    pub channels: Vec<crate::input::sequence::Sequence>,
    /// One ONNX input per entry of `channels` (`[input] tensors`), each one channel; empty: the
    /// stacked tensor is the one input `tensor_name`.
    pub tensors: Vec<String>,
    pub layout: Layout,
    pub height: u32,
    pub width: u32,
    pub color: ColorMode,
    pub resize_filter: ResizeFilter,
    pub scaling: Scaling,
    pub sixteen_bit: SixteenBit,
    pub dicom_window: DicomWindow,
    pub dicom_output: DicomOutput,
    /// `None`: any DICOM modality and sequence.
    pub dicom_guard: Option<DicomGuard>,
}

impl InputSpec {
    /// Channels of the input tensor: one per declared sequence, else 3 (RGB).
    pub fn channel_count(&self) -> usize {
        if self.channels.is_empty() {
            3
        } else {
            self.channels.len()
        }
    }

    /// Whether each input is a set of images keyed by MR sequence.
    pub fn is_multi_modal(&self) -> bool {
        !self.channels.is_empty()
    }

    /// Number of f32 values of one input in the model's layout.
    pub fn image_len(&self) -> usize {
        self.channel_count() * self.height as usize * self.width as usize
    }

    /// The channel names as `model.toml` writes them (`FLAIR, T1c, T2`).
    pub fn channel_names(&self) -> String {
        self.channels
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One version of a model, ready to load: the model's `model.toml` and this version's
/// `model.onnx`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The model's `model.toml`, shared by its versions.
    pub config: Arc<ModelConfig>,
    /// Version directory name.
    pub version: String,
    /// Path of `model.onnx`.
    pub onnx_path: PathBuf,
    /// SHA-256 of `model.onnx`, lowercase hex.
    pub sha256: String,
}

impl ModelSpec {
    /// Version `version` of the model `config` describes, whose `model.onnx` hashes to `sha256`.
    pub fn new(config: Arc<ModelConfig>, version: u64, sha256: String) -> Self {
        ModelSpec {
            onnx_path: repository::onnx_path(&config.dir, version),
            config,
            version: version.to_string(),
            sha256,
        }
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Reads `dir/model.toml` and the chosen version (`None`: the highest) of `dir/<N>/model.onnx`.
    pub fn load(dir: &Path, version: Option<u64>) -> Result<Self, ModelError> {
        let config = ModelConfig::load(dir)?;
        let versions = repository::versions(dir)?;
        let version = match version {
            Some(v) if versions.contains(&v) => v,
            Some(v) => {
                return Err(ModelError::MissingVersion {
                    dir: dir.to_path_buf(),
                    version: v,
                });
            }
            None => *versions.last().ok_or_else(|| ModelError::NoVersion {
                dir: dir.to_path_buf(),
            })?,
        };
        let sha256 = config::sha256_file(&repository::onnx_path(dir, version))?;
        Ok(Self::new(Arc::new(config), version, sha256))
    }

    /// Warnings every result from this model carries.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if !self.config.clinically_trained {
            warnings.push(format!(
                "model {} v{} is not clinically trained: results are not for diagnostic use",
                self.config.name, self.version
            ));
        }
        warnings
    }
}

#[cfg(test)]
mod tests;
