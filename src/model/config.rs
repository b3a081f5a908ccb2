//! `model.toml`: everything needed to serve a model faithfully (input, output, labels), how to batch
//! it, and which versions to serve. Unknown keys are refused, so a typo cannot silently fall back
//! to a default. Each error names the file and the problem.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{
    Aggregation, ColorMode, Concept, DicomGuard, DicomOutput, DicomWindow, GuardPolicy, InputSpec,
    Layout, MaskResize, ModelError, OutputKind, Region, ResizeFilter, Scaling, SegmentCodes,
    SegmentationSpec, SeriesSettings, Task,
};
use crate::input::SixteenBit;
use crate::input::sequence::Sequence;
use crate::priority::Priority;

/// Batching settings of one model; each one unset falls back to the server-wide flag. Also what a
/// `--model-override NAME:KEY=VALUE` flag sets (it wins over `model.toml`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingOverrides {
    /// Largest batch (capped at `[model] max_batch_size`).
    pub max_batch_size: Option<usize>,
    pub max_queue_delay_us: Option<u64>,
    /// Longest expected wait for an answer before a request is refused (0: no limit).
    pub max_queue_wait_ms: Option<u64>,
    /// Most routine images admitted.
    pub queue_capacity: Option<usize>,
    /// Most STAT images admitted.
    pub stat_queue_capacity: Option<usize>,
    pub instances: Option<usize>,
    /// Priority of requests that name none.
    pub default_priority: Option<Priority>,
}

impl BatchingOverrides {
    /// `self`, with unset keys taken from `other`.
    pub fn or(&self, other: &BatchingOverrides) -> BatchingOverrides {
        BatchingOverrides {
            max_batch_size: self.max_batch_size.or(other.max_batch_size),
            max_queue_delay_us: self.max_queue_delay_us.or(other.max_queue_delay_us),
            max_queue_wait_ms: self.max_queue_wait_ms.or(other.max_queue_wait_ms),
            queue_capacity: self.queue_capacity.or(other.queue_capacity),
            stat_queue_capacity: self.stat_queue_capacity.or(other.stat_queue_capacity),
            instances: self.instances.or(other.instances),
            default_priority: self.default_priority.or(other.default_priority),
        }
    }

    /// Sets one key from its text (`--model-override NAME:KEY=VALUE`).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{key} must be a non-negative integer, got {v:?}"))
        };
        match key {
            "max_batch_size" => self.max_batch_size = Some(number(value)? as usize),
            "max_queue_delay_us" => self.max_queue_delay_us = Some(number(value)?),
            "max_queue_wait_ms" => self.max_queue_wait_ms = Some(number(value)?),
            "queue_capacity" => self.queue_capacity = Some(number(value)? as usize),
            "stat_queue_capacity" => self.stat_queue_capacity = Some(number(value)? as usize),
            "instances" => self.instances = Some(number(value)? as usize),
            "default_priority" => self.default_priority = Some(value.parse()?),
            _ => {
                return Err(format!(
                    "unknown key {key:?}: use max_batch_size, max_queue_delay_us, max_queue_wait_ms, \
                     queue_capacity, stat_queue_capacity, instances or default_priority"
                ));
            }
        }
        Ok(())
    }
}

/// Which versions of a model are served (Triton's `version_policy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The highest `n` versions.
    Latest(usize),
    /// Every version present.
    All,
    /// These versions (those present).
    Specific(Vec<u64>),
}

impl VersionPolicy {
    /// The versions to serve out of `available` (ascending).
    pub fn select(&self, available: &[u64]) -> Vec<u64> {
        match self {
            VersionPolicy::Latest(n) => available[available.len().saturating_sub(*n)..].to_vec(),
            VersionPolicy::All => available.to_vec(),
            VersionPolicy::Specific(wanted) => available
                .iter()
                .copied()
                .filter(|v| wanted.contains(v))
                .collect(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            VersionPolicy::Latest(n) => format!("latest {n}"),
            VersionPolicy::All => "all".into(),
            VersionPolicy::Specific(v) => format!("specific {v:?}"),
        }
    }
}

/// A parsed and validated `model.toml`, shared by all versions of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Directory name under the model repository.
    pub name: String,
    pub dir: PathBuf,
    pub description: String,
    pub clinically_trained: bool,
    /// Classification (the default) or segmentation, with how its output is read.
    pub task: Task,
    /// Largest batch the model accepts.
    pub max_batch_size: usize,
    pub input: InputSpec,
    pub output_name: String,
    pub output_kind: OutputKind,
    pub labels: Vec<String>,
    pub batching: BatchingOverrides,
    pub versions: VersionPolicy,
    pub series: SeriesSettings,
    /// `[cache] max_kib`: bytes of results kept per served version (0: no cache).
    pub cache_max_bytes: usize,
    /// SHA-256 of the file's text: when it changes, every version is reloaded.
    pub toml_sha256: String,
}

impl ModelConfig {
    /// Reads and validates `dir/model.toml`; the model is named after `dir`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("model.toml");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .ok_or_else(|| ModelError::Config {
                path: path.clone(),
                message: "cannot take the model name from the directory name".into(),
            })?;
        Self::parse(&name, dir, &text)
    }

    /// Validates the text of a `model.toml` of model `name` in `dir`.
    pub fn parse(name: &str, dir: &Path, text: &str) -> Result<Self, ModelError> {
        let path = dir.join("model.toml");
        let err = |message: String| ModelError::Config {
            path: path.clone(),
            message,
        };
        let file: ModelToml = toml::from_str(text).map_err(|e| err(e.message().to_string()))?;
        let name = name.to_string();
        let input = file.input.validate().map_err(err)?;
        if file.output.labels.len() < 2 {
            return Err(err("[output] labels must name at least two classes".into()));
        }
        let task = file.output.task(file.model.task.as_deref()).map_err(err)?;
        if matches!(task, Task::Segmentation(_)) && !input.is_multi_modal() {
            return Err(err(
                "[input] a segmentation model declares its channels (e.g. channels = [\"FLAIR\", \"T1c\", \"T2\"])".into(),
            ));
        }
        if input.is_multi_modal()
            && input
                .dicom_guard
                .as_ref()
                .is_some_and(|g| !g.sequences.is_empty())
        {
            return Err(err(
                "[input.dicom] sequences: with channels, each channel's sequence is checked; leave sequences out".into(),
            ));
        }
        if file.model.max_batch_size == 0 {
            return Err(err("[model] max_batch_size must be at least 1".into()));
        }
        let versions = file.versions.unwrap_or_default().validate().map_err(err)?;
        let series = file
            .series
            .unwrap_or_default()
            .validate(&file.output.labels)
            .map_err(err)?;
        let cache_max_bytes = match file.cache {
            None => 0,
            Some(CacheSection { max_kib }) if max_kib > 4 << 20 => {
                return Err(err(format!(
                    "[cache] max_kib is {max_kib}: at most 4194304 (4 GiB; a result takes about 150 bytes)"
                )));
            }
            Some(CacheSection { max_kib }) => (max_kib as usize) << 10,
        };
        Ok(ModelConfig {
            series,
            cache_max_bytes,
            name,
            dir: dir.to_path_buf(),
            description: file.model.description.unwrap_or_default(),
            clinically_trained: file.model.clinically_trained,
            task,
            max_batch_size: file.model.max_batch_size,
            input,
            output_name: file.output.name,
            output_kind: file.output.kind,
            labels: file.output.labels,
            batching: file.batching.unwrap_or_default(),
            versions,
            toml_sha256: hex::encode(Sha256::digest(text.as_bytes())),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelToml {
    model: ModelSection,
    input: InputSection,
    output: OutputSection,
    batching: Option<BatchingOverrides>,
    versions: Option<VersionsSection>,
    series: Option<SeriesSection>,
    cache: Option<CacheSection>,
}

/// `[cache]`: `max_kib`, the result cache's size per served version (opt-in; 0 turns it off).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheSection {
    max_kib: u64,
}

/// `[series]`: `central_fraction` (0 < f <= 1, default 1), `aggregation = "max" | "mean_top_k"`,
/// `top_k` (default 3), `finding` (a label; default the last).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SeriesSection {
    central_fraction: Option<f64>,
    aggregation: Option<String>,
    top_k: Option<usize>,
    finding: Option<String>,
}

impl SeriesSection {
    fn validate(self, labels: &[String]) -> Result<SeriesSettings, String> {
        let central_fraction = self.central_fraction.unwrap_or(1.0);
        if !(central_fraction > 0.0 && central_fraction <= 1.0) {
            return Err(format!(
                "[series] central_fraction must be in (0, 1], not {central_fraction}"
            ));
        }
        let aggregation = match (self.aggregation.as_deref(), self.top_k) {
            (None | Some("max"), None) => Aggregation::Max,
            (Some("mean_top_k"), k) => match k.unwrap_or(3) {
                0 => return Err("[series] top_k must be at least 1".into()),
                k => Aggregation::MeanTopK(k),
            },
            (None | Some("max"), Some(_)) => {
                return Err("[series] top_k goes with aggregation = \"mean_top_k\"".into());
            }
            (Some(other), _) => {
                return Err(format!(
                    "[series] aggregation must be \"max\" or \"mean_top_k\", not {other:?}"
                ));
            }
        };
        let finding_label = match &self.finding {
            None => labels.len() - 1,
            Some(name) => labels.iter().position(|l| l == name).ok_or_else(|| {
                format!("[series] finding {name:?} is not one of the labels {labels:?}")
            })?,
        };
        Ok(SeriesSettings {
            central_fraction,
            aggregation,
            finding_label,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelSection {
    /// "classification" (default) or "segmentation".
    task: Option<String>,
    description: Option<String>,
    clinically_trained: bool,
    max_batch_size: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputSection {
    name: Option<String>,
    layout: Layout,
    height: u32,
    width: u32,
    color: Option<ColorMode>,
    channels: Option<Vec<Sequence>>,
    tensors: Option<Vec<String>>,
    resize_filter: ResizeFilter,
    mean: Option<Vec<f32>>,
    std: Option<Vec<f32>>,
    scale: Option<f32>,
    offset: Option<f32>,
    #[serde(default)]
    sixteen_bit: SixteenBit,
    dicom: Option<DicomSection>,
}

/// `[input.dicom]`: `window = "header" | "minmax" | "percentile" | { center, width }`, and
/// `percentiles = [low, high]` with `"percentile"` (default [1, 99]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DicomSection {
    window: Option<WindowToml>,
    percentiles: Option<[f64; 2]>,
    modality: Option<Vec<String>>,
    sequences: Option<Vec<crate::input::sequence::Sequence>>,
    sequence_policy: Option<GuardPolicy>,
    #[serde(default)]
    output: DicomOutput,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum WindowToml {
    Named(String),
    Fixed { center: f64, width: f64 },
}

impl DicomSection {
    fn guard(&self) -> Result<Option<DicomGuard>, String> {
        if self.modality.is_none() && self.sequences.is_none() {
            if self.sequence_policy.is_some() {
                return Err("[input.dicom] sequence_policy needs `modality` or `sequences`".into());
            }
            return Ok(None);
        }
        let sequences = self.sequences.clone().unwrap_or_default();
        if sequences.contains(&crate::input::sequence::Sequence::Unknown) {
            return Err(
                "[input.dicom] sequences cannot accept \"unknown\": unknown always warns".into(),
            );
        }
        Ok(Some(DicomGuard {
            modalities: self.modality.clone().unwrap_or_default(),
            sequences,
            policy: self.sequence_policy.unwrap_or(GuardPolicy::Reject),
        }))
    }

    fn validate(self) -> Result<DicomWindow, String> {
        let window = match self.window {
            None => DicomWindow::Header,
            Some(WindowToml::Named(name)) => match name.as_str() {
                "header" => DicomWindow::Header,
                "minmax" => DicomWindow::MinMax,
                "percentile" => {
                    let [low, high] = self.percentiles.unwrap_or([1.0, 99.0]);
                    if !(0.0..=100.0).contains(&low)
                        || !(0.0..=100.0).contains(&high)
                        || low >= high
                    {
                        return Err(format!(
                            "[input.dicom] percentiles must be 0 <= low < high <= 100, not [{low}, {high}]"
                        ));
                    }
                    return Ok(DicomWindow::Percentile { low, high });
                }
                other => {
                    return Err(format!(
                        "[input.dicom] window must be \"header\", \"minmax\", \"percentile\" or {{ center, width }}, not {other:?}"
                    ));
                }
            },
            Some(WindowToml::Fixed { center, width }) => {
                if !center.is_finite() || !width.is_finite() || width < 1.0 {
                    return Err(format!(
                        "[input.dicom] a fixed window needs a finite center and a width of at least 1, not center {center} width {width}"
                    ));
                }
                DicomWindow::Fixed { center, width }
            }
        };
        if self.percentiles.is_some() {
            return Err("[input.dicom] percentiles go with window = \"percentile\" only".into());
        }
        Ok(window)
    }
}

impl InputSection {
    fn validate(self) -> Result<InputSpec, String> {
        let channels = self.channels.clone().unwrap_or_default();
        let (color, tensor_name, tensors) = self.layout_of_channels(&channels)?;
        let count = if channels.is_empty() {
            3
        } else {
            channels.len()
        };
        let scaling = match (self.mean, self.std, self.scale) {
            (Some(mean), Some(std), None) => {
                if mean.len() != count || std.len() != count {
                    return Err(format!(
                        "[input] mean and std need one value per input channel: {count}, not {} and {}",
                        mean.len(),
                        std.len()
                    ));
                }
                if std.iter().any(|s| !s.is_finite() || *s == 0.0)
                    || mean.iter().any(|m| !m.is_finite())
                {
                    return Err("[input] mean and std values must be finite, std non-zero".into());
                }
                Scaling::MeanStd { mean, std }
            }
            (None, None, Some(scale)) => Scaling::ScaleOffset {
                scale,
                offset: self.offset.unwrap_or(0.0),
            },
            _ => {
                return Err(format!(
                    "[input] needs exactly one scaling: `mean` and `std` ({count} values each), or `scale` (and optional `offset`)"
                ));
            }
        };
        if self.height == 0 || self.width == 0 {
            return Err("[input] height and width must be positive".into());
        }
        if u64::from(self.height) * u64::from(self.width) > 1 << 24 {
            return Err("[input] height × width must be at most 16777216 pixels".into());
        }
        Ok(InputSpec {
            channels,
            tensors,
            color,
            tensor_name,
            layout: self.layout,
            height: self.height,
            width: self.width,
            resize_filter: self.resize_filter,
            scaling,
            sixteen_bit: self.sixteen_bit,
            dicom_output: self.dicom.as_ref().map(|d| d.output).unwrap_or_default(),
            dicom_guard: match &self.dicom {
                Some(section) => section.guard()?,
                None => None,
            },
            dicom_window: match self.dicom {
                Some(section) => section.validate()?,
                None => DicomWindow::Header,
            },
        })
    }
}

impl InputSection {
    /// The colour mode, the one input's name and the per-channel inputs' names, checked against
    /// `channels`: a multi-modal input is gray per channel (no `color`), and names either one
    /// stacked input (`name`) or one input per channel (`tensors`).
    fn layout_of_channels(
        &self,
        channels: &[Sequence],
    ) -> Result<(ColorMode, String, Vec<String>), String> {
        if channels.is_empty() {
            if self.tensors.is_some() {
                return Err("[input] tensors goes with channels (one input per channel)".into());
            }
            let color = self
                .color
                .ok_or("[input] needs color = \"rgb\" or \"grayscale\"")?;
            let name = self
                .name
                .clone()
                .ok_or("[input] needs name (the graph's input)")?;
            return Ok((color, name, Vec::new()));
        }
        if self.color.is_some() {
            return Err(
                "[input] color goes with single-image models: with channels, each channel is one gray image".into(),
            );
        }
        if channels.len() > 4 {
            return Err("[input] channels: at most 4 (FLAIR, T1, T1c, T2)".into());
        }
        for (i, c) in channels.iter().enumerate() {
            if *c == Sequence::Unknown {
                return Err("[input] channels: \"unknown\" is not a sequence".into());
            }
            if channels[..i].contains(c) {
                return Err(format!("[input] channels lists {} twice", c.as_str()));
            }
        }
        match (&self.name, &self.tensors) {
            (Some(name), None) => Ok((ColorMode::Grayscale, name.clone(), Vec::new())),
            (None, Some(tensors)) if tensors.len() == channels.len() => {
                Ok((ColorMode::Grayscale, tensors[0].clone(), tensors.clone()))
            }
            (None, Some(tensors)) => Err(format!(
                "[input] tensors names {} inputs for {} channels: one per channel",
                tensors.len(),
                channels.len()
            )),
            _ => Err(
                "[input] needs exactly one of name (one stacked input) and tensors (one input per channel)"
                    .into(),
            ),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputSection {
    name: String,
    kind: OutputKind,
    labels: Vec<String>,
    /// Segmentation: the output's layout (default NCHW).
    layout: Option<Layout>,
    /// Segmentation: one `#rrggbb` per label.
    colors: Option<Vec<String>>,
    /// Segmentation: how the output is mapped back to the image (default nearest).
    mask_resize: Option<MaskResize>,
    /// Segmentation: named unions of classes.
    regions: Option<std::collections::BTreeMap<String, Vec<String>>>,
    /// Segmentation: each label's or region's coded concepts, for DICOM Segmentation objects.
    codes: Option<std::collections::BTreeMap<String, CodesSection>>,
}

/// `[output.codes.<label or region>]`: `category` and `type` as `[value, scheme, meaning]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CodesSection {
    category: [String; 3],
    #[serde(rename = "type")]
    kind: [String; 3],
}

impl OutputSection {
    fn task(&self, task: Option<&str>) -> Result<Task, String> {
        let segmentation_keys = self.layout.is_some()
            || self.colors.is_some()
            || self.mask_resize.is_some()
            || self.regions.is_some()
            || self.codes.is_some();
        for (i, label) in self.labels.iter().enumerate() {
            if label.is_empty() || self.labels[..i].contains(label) {
                return Err(format!(
                    "[output] labels: {label:?} is empty or listed twice"
                ));
            }
        }
        match task.unwrap_or("classification") {
            "classification" if segmentation_keys => Err(
                "[output] layout, colors, mask_resize, regions and codes go with [model] task = \"segmentation\""
                    .into(),
            ),
            "classification" => Ok(Task::Classification),
            "segmentation" => Ok(Task::Segmentation(self.segmentation()?)),
            other => Err(format!(
                "[model] task must be \"classification\" or \"segmentation\", not {other:?}"
            )),
        }
    }

    fn segmentation(&self) -> Result<SegmentationSpec, String> {
        if self.labels.len() > 256 {
            return Err(
                "[output] labels: a segmentation model has at most 256 classes (8-bit masks)"
                    .into(),
            );
        }
        let index = |label: &String| {
            self.labels.iter().position(|l| l == label).ok_or_else(|| {
                format!(
                    "[output.regions]: {label:?} is not one of the labels {:?}",
                    self.labels
                )
            })
        };
        let mut regions = Vec::new();
        for (name, members) in self.regions.iter().flatten() {
            if members.is_empty() {
                return Err(format!("[output.regions] {name} lists no label"));
            }
            let mut classes = members.iter().map(index).collect::<Result<Vec<_>, _>>()?;
            classes.sort_unstable();
            classes.dedup();
            if classes.contains(&0) {
                return Err(format!(
                    "[output.regions] {name} includes the background (label 0, {:?})",
                    self.labels[0]
                ));
            }
            regions.push(Region {
                name: name.clone(),
                classes,
            });
        }
        let colors = match &self.colors {
            None => default_colors(self.labels.len()),
            Some(colors) if colors.len() != self.labels.len() => {
                return Err(format!(
                    "[output] colors has {} entries for {} labels",
                    colors.len(),
                    self.labels.len()
                ));
            }
            Some(colors) => colors
                .iter()
                .map(|c| {
                    parse_color(c).ok_or_else(|| format!("[output] colors: {c:?} is not #rrggbb"))
                })
                .collect::<Result<_, _>>()?,
        };
        let mut codes = std::collections::BTreeMap::new();
        for (name, section) in self.codes.iter().flatten() {
            if !self.labels[1..].contains(name) && !regions.iter().any(|r| &r.name == name) {
                return Err(format!(
                    "[output.codes] {name} is not a label (other than the background) or a region"
                ));
            }
            let code = |[value, scheme, meaning]: &[String; 3]| {
                if value.is_empty() || scheme.is_empty() || meaning.is_empty() {
                    return Err(format!(
                        "[output.codes] {name}: a code is [value, scheme, meaning], none empty"
                    ));
                }
                Ok(Concept {
                    value: value.clone(),
                    scheme: scheme.clone(),
                    meaning: meaning.clone(),
                })
            };
            codes.insert(
                name.clone(),
                SegmentCodes {
                    category: code(&section.category)?,
                    kind: code(&section.kind)?,
                },
            );
        }
        Ok(SegmentationSpec {
            layout: self.layout.unwrap_or(Layout::Nchw),
            mask_resize: self.mask_resize.unwrap_or(MaskResize::Nearest),
            colors,
            regions,
            codes,
        })
    }
}

fn parse_color(text: &str) -> Option<[u8; 3]> {
    let hex = text
        .strip_prefix('#')
        .filter(|h| h.len() == 6 && h.is_ascii())?;
    let byte = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).ok();
    Some([byte(0)?, byte(2)?, byte(4)?])
}

/// Black for the background, then a fixed palette (matplotlib's tab10) round.
fn default_colors(n: usize) -> Vec<[u8; 3]> {
    const PALETTE: [[u8; 3]; 10] = [
        [0xd6, 0x27, 0x28],
        [0x2c, 0xa0, 0x2c],
        [0xff, 0xd7, 0x00],
        [0x1f, 0x77, 0xb4],
        [0x94, 0x67, 0xbd],
        [0xff, 0x7f, 0x0e],
        [0x17, 0xbe, 0xcf],
        [0xe3, 0x77, 0xc2],
        [0x8c, 0x56, 0x4b],
        [0xbc, 0xbd, 0x22],
    ];
    (0..n)
        .map(|i| {
            if i == 0 {
                [0, 0, 0]
            } else {
                PALETTE[(i - 1) % 10]
            }
        })
        .collect()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VersionsSection {
    /// "latest" (default), "all" or "specific".
    policy: Option<String>,
    /// With "latest": how many (default 1).
    latest: Option<usize>,
    /// With "specific": which.
    specific: Option<Vec<u64>>,
}

impl VersionsSection {
    fn validate(self) -> Result<VersionPolicy, String> {
        match (
            self.policy.as_deref().unwrap_or("latest"),
            self.latest,
            self.specific,
        ) {
            ("latest", n, None) => match n.unwrap_or(1) {
                0 => Err("[versions] latest must be at least 1".into()),
                n => Ok(VersionPolicy::Latest(n)),
            },
            ("all", None, None) => Ok(VersionPolicy::All),
            ("specific", None, Some(v)) if !v.is_empty() => Ok(VersionPolicy::Specific(v)),
            ("specific", None, _) => {
                Err("[versions] policy \"specific\" needs a non-empty `specific` list".into())
            }
            (p @ ("latest" | "all" | "specific"), _, _) => Err(format!(
                "[versions] policy {p:?}: `latest` goes with \"latest\", `specific` with \"specific\""
            )),
            (p, _, _) => Err(format!(
                "[versions] unknown policy {p:?}: use \"latest\", \"all\" or \"specific\""
            )),
        }
    }
}

/// Reads `path` as SHA-256, lowercase hex.
pub(super) fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut file = std::fs::File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_policies_select_from_what_is_present() {
        let available = [1, 2, 5];
        assert_eq!(VersionPolicy::Latest(1).select(&available), [5]);
        assert_eq!(VersionPolicy::Latest(2).select(&available), [2, 5]);
        assert_eq!(VersionPolicy::Latest(9).select(&available), [1, 2, 5]);
        assert_eq!(VersionPolicy::All.select(&available), [1, 2, 5]);
        assert_eq!(VersionPolicy::Specific(vec![1, 3]).select(&available), [1]);
        assert!(VersionPolicy::Latest(1).select(&[]).is_empty());
    }

    #[test]
    fn overrides_parse_and_layer() {
        let mut cli = BatchingOverrides::default();
        cli.set("max_batch_size", "4").unwrap();
        cli.set("default_priority", "stat").unwrap();
        assert!(cli.set("instances", "-1").is_err());
        assert!(cli.set("batch", "4").unwrap_err().contains("unknown key"));
        let file = BatchingOverrides {
            max_batch_size: Some(16),
            instances: Some(2),
            ..Default::default()
        };
        let merged = cli.or(&file);
        assert_eq!(merged.max_batch_size, Some(4), "the command line wins");
        assert_eq!(merged.instances, Some(2), "model.toml fills the rest");
        assert_eq!(merged.default_priority, Some(Priority::Stat));
        assert_eq!(merged.queue_capacity, None);
    }
}
