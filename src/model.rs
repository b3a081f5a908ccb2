//! The model repository: `models/<name>/model.toml` + `models/<name>/<version>/model.onnx`.
//!
//! Owns parsing and validating `model.toml` (everything needed to serve a model faithfully) and
//! resolving the version directory and the model file's SHA-256.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

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

/// Pixel scaling from 8-bit values to the model's input values.
#[derive(Debug, Clone, PartialEq)]
pub enum Scaling {
    /// `(pixel / 255 - mean[c]) / std[c]`.
    MeanStd { mean: [f32; 3], std: [f32; 3] },
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

/// How images become the model's input tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub tensor_name: String,
    pub layout: Layout,
    pub height: u32,
    pub width: u32,
    pub color: ColorMode,
    pub resize_filter: ResizeFilter,
    pub scaling: Scaling,
}

impl InputSpec {
    /// Number of f32 values of one image in the model's layout (3 channels).
    pub fn image_len(&self) -> usize {
        3 * self.height as usize * self.width as usize
    }
}

/// Everything the service needs to serve one model version faithfully.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Directory name under the model repository.
    pub name: String,
    /// Version directory name.
    pub version: String,
    pub description: String,
    pub clinically_trained: bool,
    /// Largest batch the model accepts.
    pub max_batch_size: usize,
    pub input: InputSpec,
    pub output_name: String,
    pub output_kind: OutputKind,
    pub labels: Vec<String>,
    /// Path of `model.onnx`.
    pub onnx_path: PathBuf,
    /// SHA-256 of `model.onnx`, lowercase hex.
    pub sha256: String,
}

impl ModelSpec {
    /// Warnings every response from this model carries.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if !self.clinically_trained {
            warnings.push(format!(
                "model {} v{} is not clinically trained: results are not for diagnostic use",
                self.name, self.version
            ));
        }
        warnings
    }

    /// Reads `dir/model.toml` and the chosen version (`None`: the highest) of `dir/<N>/model.onnx`.
    pub fn load(dir: &Path, version: Option<u64>) -> Result<Self, ModelError> {
        let toml_path = dir.join("model.toml");
        let text = std::fs::read_to_string(&toml_path).map_err(|source| ModelError::Io {
            path: toml_path.clone(),
            source,
        })?;
        let file: ModelToml = toml::from_str(&text).map_err(|e| ModelError::Config {
            path: toml_path.clone(),
            message: e.message().to_string(),
        })?;
        let config_err = |message: String| ModelError::Config {
            path: toml_path.clone(),
            message,
        };

        let version = match version {
            Some(v) => {
                if !dir.join(v.to_string()).join("model.onnx").is_file() {
                    return Err(ModelError::MissingVersion {
                        dir: dir.to_path_buf(),
                        version: v,
                    });
                }
                v
            }
            None => latest_version(dir)?,
        };
        let onnx_path = dir.join(version.to_string()).join("model.onnx");
        let sha256 = sha256_file(&onnx_path)?;

        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .ok_or_else(|| {
                config_err("cannot take the model name from the directory name".into())
            })?;

        let scaling = match (file.input.mean, file.input.std, file.input.scale) {
            (Some(mean), Some(std), None) => {
                if std.iter().any(|s| !s.is_finite() || *s == 0.0) {
                    return Err(config_err(
                        "[input] std values must be finite and non-zero".into(),
                    ));
                }
                Scaling::MeanStd { mean, std }
            }
            (None, None, Some(scale)) => Scaling::ScaleOffset {
                scale,
                offset: file.input.offset.unwrap_or(0.0),
            },
            _ => {
                return Err(config_err(
                    "[input] needs exactly one scaling: `mean` and `std` (3 values each), or `scale` (and optional `offset`)"
                        .into(),
                ));
            }
        };
        if file.input.height == 0 || file.input.width == 0 {
            return Err(config_err(
                "[input] height and width must be positive".into(),
            ));
        }
        if file.output.labels.len() < 2 {
            return Err(config_err(
                "[output] labels must name at least two classes".into(),
            ));
        }
        if file.model.max_batch_size == 0 {
            return Err(config_err(
                "[model] max_batch_size must be at least 1".into(),
            ));
        }

        Ok(ModelSpec {
            name,
            version: version.to_string(),
            description: file.model.description.unwrap_or_default(),
            clinically_trained: file.model.clinically_trained,
            max_batch_size: file.model.max_batch_size,
            input: InputSpec {
                tensor_name: file.input.name,
                layout: file.input.layout,
                height: file.input.height,
                width: file.input.width,
                color: file.input.color,
                resize_filter: file.input.resize_filter,
                scaling,
            },
            output_name: file.output.name,
            output_kind: file.output.kind,
            labels: file.output.labels,
            onnx_path,
            sha256,
        })
    }
}

/// The highest positive-integer version directory that holds a `model.onnx`.
fn latest_version(dir: &Path) -> Result<u64, ModelError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()))
        .filter(|v| *v > 0 && dir.join(v.to_string()).join("model.onnx").is_file())
        .max()
        .ok_or_else(|| ModelError::NoVersion {
            dir: dir.to_path_buf(),
        })
}

fn sha256_file(path: &Path) -> Result<String, ModelError> {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelToml {
    model: ModelSection,
    input: InputSection,
    output: OutputSection,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputSection {
    name: String,
    kind: OutputKind,
    labels: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[model]
description = "test"
clinically_trained = false
max_batch_size = 8

[input]
name = "input"
layout = "NCHW"
height = 32
width = 32
color = "rgb"
resize_filter = "bilinear"
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[output]
name = "logits"
kind = "logits"
labels = ["no_tumor", "tumor"]
"#;

    fn repo_with(toml_text: &str, versions: &[u64]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("m");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.toml"), toml_text).unwrap();
        for v in versions {
            std::fs::create_dir_all(dir.join(v.to_string())).unwrap();
            std::fs::write(dir.join(v.to_string()).join("model.onnx"), format!("v{v}")).unwrap();
        }
        root
    }

    #[test]
    fn loads_highest_version_and_hashes_it() {
        let root = repo_with(GOOD, &[1, 3, 2]);
        let spec = ModelSpec::load(&root.path().join("m"), None).unwrap();
        assert_eq!(spec.name, "m");
        assert_eq!(spec.version, "3");
        // sha256("v3")
        assert_eq!(spec.sha256, hex::encode(Sha256::digest(b"v3")));
        assert_eq!(spec.input.image_len(), 3 * 32 * 32);
        assert!(matches!(spec.input.scaling, Scaling::MeanStd { .. }));
        assert_eq!(spec.warnings().len(), 1);
    }

    #[test]
    fn explicit_missing_version_is_an_error() {
        let root = repo_with(GOOD, &[1]);
        let err = ModelSpec::load(&root.path().join("m"), Some(7)).unwrap_err();
        assert!(
            err.to_string().contains("version 7 has no model.onnx"),
            "{err}"
        );
    }

    #[test]
    fn no_version_directory_is_an_error() {
        let root = repo_with(GOOD, &[]);
        let err = ModelSpec::load(&root.path().join("m"), None).unwrap_err();
        assert!(err.to_string().contains("no version directory"), "{err}");
    }

    #[test]
    fn rejects_two_scalings_and_unknown_fields() {
        let both = GOOD.replace(
            "std = [0.229, 0.224, 0.225]",
            "std = [0.229, 0.224, 0.225]\nscale = 1.0",
        );
        let err = ModelSpec::load(&repo_with(&both, &[1]).path().join("m"), None).unwrap_err();
        assert!(err.to_string().contains("exactly one scaling"), "{err}");

        let typo = GOOD.replace("resize_filter", "resize_filtr");
        let err = ModelSpec::load(&repo_with(&typo, &[1]).path().join("m"), None).unwrap_err();
        assert!(err.to_string().contains("resize_filtr"), "{err}");

        let bad_filter = GOOD.replace("\"bilinear\"", "\"bilinearr\"");
        let err =
            ModelSpec::load(&repo_with(&bad_filter, &[1]).path().join("m"), None).unwrap_err();
        assert!(err.to_string().contains("bilinearr"), "{err}");
    }
}
