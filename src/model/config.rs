//! `model.toml`: everything needed to serve a model faithfully (input, output, labels), how to batch
//! it, and which versions to serve. Unknown keys are refused, so a typo cannot silently fall back
//! to a default. Each error names the file and the problem.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{
    Aggregation, ColorMode, DicomGuard, DicomOutput, DicomWindow, GuardPolicy, InputSpec, Layout,
    ModelError, OutputKind, ResizeFilter, Scaling, SeriesSettings,
};
use crate::input::SixteenBit;
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
    description: Option<String>,
    clinically_trained: bool,
    max_batch_size: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputSection {
    name: String,
    layout: Layout,
    height: u32,
    width: u32,
    color: ColorMode,
    resize_filter: ResizeFilter,
    mean: Option<[f32; 3]>,
    std: Option<[f32; 3]>,
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
        let scaling = match (self.mean, self.std, self.scale) {
            (Some(mean), Some(std), None) => {
                if std.iter().any(|s| !s.is_finite() || *s == 0.0) {
                    return Err("[input] std values must be finite and non-zero".into());
                }
                Scaling::MeanStd { mean, std }
            }
            (None, None, Some(scale)) => Scaling::ScaleOffset {
                scale,
                offset: self.offset.unwrap_or(0.0),
            },
            _ => {
                return Err(
                    "[input] needs exactly one scaling: `mean` and `std` (3 values each), or `scale` (and optional `offset`)"
                        .into(),
                );
            }
        };
        if self.height == 0 || self.width == 0 {
            return Err("[input] height and width must be positive".into());
        }
        Ok(InputSpec {
            tensor_name: self.name,
            layout: self.layout,
            height: self.height,
            width: self.width,
            color: self.color,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputSection {
    name: String,
    kind: OutputKind,
    labels: Vec<String>,
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
