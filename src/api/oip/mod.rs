//! The Open Inference Protocol (KServe v2) on top of the pipeline: what a model looks like as
//! tensors, and tensors ↔ pipeline requests and results. Shared by the gRPC service
//! ([`grpc`], `inference.GRPCInferenceService`) and the HTTP/REST routes ([`http`]), which only
//! translate their wire format to these types.
//!
//! A model has two inputs — `IMAGE`, a `BYTES` tensor of encoded images (PNG, JPEG; shape `[N]` or
//! `[N, 1]`) decoded and preprocessed exactly as `Classify` does, and its own input tensor (e.g.
//! `input`) as `FP32` in the model's layout and size, used as it is — of which a request sends
//! one; and two outputs: `probabilities` (`FP32 [N, labels]`, or with the classification
//! extension `BYTES [N, k]` of `"score:index:label"`) and `label` (`BYTES [N]`).
//!
//! A segmentation model's inputs are one `BYTES` input per channel, named by its MR sequence
//! (`FLAIR`, `T1c`, `T2`, …: element *i* of each is slice *i*), or its stacked tensor as `FP32`;
//! its outputs are `mask` (`UINT8 [N, H, W]`, the label map at the slices' geometry) and, when
//! asked for by name, `probabilities` (`FP32 [N, labels, H, W]`). A multi-modal classifier takes
//! the same per-channel inputs and answers as any classifier.

pub mod grpc;
pub mod http;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{InferError, echo};
use crate::input::Encoding;
use crate::model::{Layout, ModelConfig, Task};
use crate::pipeline::segment::{SegmentRequest, SequenceImage, SliceInput};
use crate::pipeline::{Admitted, ImageInput, ImageResult, InferRequest, Pipeline, ServedModel};
use crate::priority::Priority;

/// Name of the `BYTES` input of encoded images.
pub const IMAGE_INPUT: &str = "IMAGE";
pub const PROBABILITIES: &str = "probabilities";
pub const LABEL: &str = "label";
/// A segmentation model's label map output.
pub const MASK: &str = "mask";
/// `platform` of every model in metadata.
pub const PLATFORM: &str = "onnxruntime_onnx";
/// Protocol extensions this server implements (server metadata).
pub const EXTENSIONS: [&str; 2] = ["classification", "binary_tensor_data"];

/// Most inputs, outputs or raw contents in one request (the server takes one input and has two
/// outputs; the cap only has to keep decoding bounded). The gRPC pre-scan applies it before
/// protobuf decoding, the HTTP decoder while reading the JSON.
pub const MAX_TENSORS: usize = 16;
/// Most dimensions of a tensor shape.
pub const MAX_DIMS: usize = 8;
/// Most entries of one parameters map.
pub const MAX_PARAMETERS: usize = 64;

/// The `priority` request parameter: 0 (or absent) the model's default, 1 STAT, 2 ROUTINE — the
/// values of `brainai.v1.Priority`. Anything else is refused whole, never truncated (a value that
/// wrapped into range would ride the wrong queue).
pub fn priority(value: Option<i64>) -> Result<Option<Priority>, InferError> {
    match value {
        None | Some(0) => Ok(None),
        Some(1) => Ok(Some(Priority::Stat)),
        Some(2) => Ok(Some(Priority::Routine)),
        Some(other) => Err(InferError::invalid(format!(
            "parameter priority is {other}: use 0 (the model's default), 1 (stat) or 2 (routine)"
        ))
        .quoting_caller()),
    }
}

/// The data of one tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bytes(Vec<Vec<u8>>),
    Fp32(Vec<f32>),
    /// Output only (a segmentation mask).
    Uint8(Vec<u8>),
}

/// One input tensor of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    /// `None`: the datatype is one this server does not take (refused with its name).
    pub data: Option<TensorData>,
}

/// One output a request asks for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RequestedOutput {
    pub name: String,
    /// The classification extension: the top `k` as `"score:index:label"` strings.
    pub classification: Option<usize>,
    /// HTTP: return it in the binary-data extension's body.
    pub binary: bool,
}

/// An inference request, transport-neutral.
#[derive(Debug, Clone, Default)]
pub struct OipRequest {
    pub model: String,
    pub version: String,
    pub id: String,
    pub inputs: Vec<InputTensor>,
    pub outputs: Vec<RequestedOutput>,
    /// Triton's `timeout` request parameter (microseconds), or the transport's deadline.
    pub deadline: Option<Instant>,
    pub priority: Option<Priority>,
}

/// One output tensor of a response.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: TensorData,
    pub binary: bool,
}

impl OutputTensor {
    pub fn datatype(&self) -> &'static str {
        match self.data {
            TensorData::Bytes(_) => "BYTES",
            TensorData::Fp32(_) => "FP32",
            TensorData::Uint8(_) => "UINT8",
        }
    }
}

/// A response parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Bool(bool),
    Int(i64),
    Text(String),
}

/// The answer to an inference request.
pub struct OipResponse {
    pub model: Arc<ServedModel>,
    pub id: String,
    pub outputs: Vec<OutputTensor>,
}

impl OipResponse {
    /// What every response says about the model that produced it: SHA-256, whether it was
    /// clinically trained, its warnings and its labels.
    pub fn parameters(&self) -> Vec<(&'static str, Param)> {
        parameters(&self.model)
    }
}

/// Model identity as response (and metadata) parameters.
pub fn parameters(model: &ServedModel) -> Vec<(&'static str, Param)> {
    let spec = &model.spec;
    vec![
        ("model_sha256", Param::Text(spec.sha256.clone())),
        (
            "clinically_trained",
            Param::Bool(spec.config.clinically_trained),
        ),
        ("warnings", Param::Text(model.warnings.join(" | "))),
        ("labels", Param::Text(spec.config.labels.join(","))),
    ]
}

/// A tensor in metadata: name, datatype, shape (-1 for the batch axis).
pub type TensorMeta = (String, &'static str, Vec<i64>);

/// Inputs and outputs of a model in metadata.
pub fn tensors(model: &ServedModel) -> (Vec<TensorMeta>, Vec<TensorMeta>) {
    tensors_of(&model.spec.config)
}

fn tensors_of(config: &ModelConfig) -> (Vec<TensorMeta>, Vec<TensorMeta>) {
    let input = &config.input;
    let (h, w) = (i64::from(input.height), i64::from(input.width));
    let c = input.channel_count() as i64;
    let layout = match input.layout {
        Layout::Nchw => vec![-1, c, h, w],
        Layout::Nhwc => vec![-1, h, w, c],
    };
    let labels = config.labels.len() as i64;
    let inputs: Vec<TensorMeta> = if input.is_multi_modal() {
        let mut inputs: Vec<TensorMeta> = input
            .channels
            .iter()
            .map(|s| (s.as_str().to_string(), "BYTES", vec![-1]))
            .collect();
        // The stacked tensor, when the graph takes one (not one input per channel).
        if input.tensors.is_empty() {
            inputs.push((input.tensor_name.clone(), "FP32", layout));
        }
        inputs
    } else {
        vec![
            (IMAGE_INPUT.to_string(), "BYTES", vec![-1]),
            (input.tensor_name.clone(), "FP32", layout),
        ]
    };
    let outputs = match config.task {
        Task::Segmentation(_) => vec![
            (MASK.to_string(), "UINT8", vec![-1, -1, -1]),
            (PROBABILITIES.to_string(), "FP32", vec![-1, labels, -1, -1]),
        ],
        Task::Classification => vec![
            (PROBABILITIES.to_string(), "FP32", vec![-1, labels]),
            (LABEL.to_string(), "BYTES", vec![-1]),
        ],
    };
    (inputs, outputs)
}

/// The versions of `model`'s model that are being served.
pub fn versions(pipeline: &Pipeline, model: &ServedModel) -> Vec<String> {
    pipeline
        .registry()
        .list()
        .into_iter()
        .find(|m| m.name == model.spec.config.name)
        .map(|m| {
            m.versions
                .into_iter()
                .filter(|v| v.state == crate::pipeline::registry::VersionState::Ready)
                .map(|v| v.version.to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs an inference request of an admitted call through the pipeline.
pub async fn infer(call: &Admitted, request: OipRequest) -> Result<OipResponse, InferError> {
    let model = call.resolve(&request.model, &request.version)?;
    if model.segmenter.is_some() {
        return segment(call, model, request).await;
    }
    check_outputs(&model.spec.config, &request.outputs)?;
    if model.spec.config.input.is_multi_modal() {
        // A multi-modal classifier: its slices from the per-channel inputs, as a segmentation
        // model's.
        let slices = slices(&model.spec.config, request.inputs)?;
        let results = call
            .classify_slices(
                &model,
                SegmentRequest {
                    slices,
                    priority: request.priority,
                    deadline: request.deadline,
                    probabilities: false,
                },
            )
            .await?;
        let outputs = outputs(&model, &results, &request.outputs);
        return Ok(OipResponse {
            model,
            id: request.id,
            outputs,
        });
    }
    let images = images(&model.spec.config, request.inputs)?;
    let infer = InferRequest {
        images,
        priority: request.priority,
        first_index: 0,
        deadline: request.deadline,
        preview: false,
    };
    let results = call.classify(&model, infer).await?;
    let outputs = outputs(&model, &results, &request.outputs);
    Ok(OipResponse {
        model,
        id: request.id,
        outputs,
    })
}

/// A segmentation model's request: its slices from the per-channel `BYTES` inputs (or the stacked
/// `FP32` tensor), its masks (and probability maps when asked) as tensors.
async fn segment(
    call: &Admitted,
    model: Arc<ServedModel>,
    request: OipRequest,
) -> Result<OipResponse, InferError> {
    let config = &model.spec.config;
    requested_once(&request.outputs)?;
    for output in &request.outputs {
        if output.name != MASK && output.name != PROBABILITIES {
            return Err(InferError::invalid(format!(
                "output {} is not an output of segmentation model {} ({MASK}, {PROBABILITIES})",
                echo(&output.name),
                config.name
            ))
            .quoting_caller());
        }
        if output.classification.is_some() {
            return Err(InferError::invalid(
                "the classification extension does not apply to a segmentation model",
            ));
        }
    }
    let default = [RequestedOutput {
        name: MASK.into(),
        ..Default::default()
    }];
    let requested = if request.outputs.is_empty() {
        &default[..]
    } else {
        &request.outputs[..]
    };
    let probabilities = requested.iter().any(|o| o.name == PROBABILITIES);
    let slices = slices(config, request.inputs)?;
    let n = slices.len() as i64;
    let results = call
        .segment(
            &model,
            SegmentRequest {
                slices,
                priority: request.priority,
                deadline: request.deadline,
                probabilities,
            },
        )
        .await?;
    let (w, h) = (results[0].mask.width, results[0].mask.height);
    if let Some(other) = results
        .iter()
        .find(|r| (r.mask.width, r.mask.height) != (w, h))
    {
        return Err(InferError::invalid(format!(
            "slice {} is {}×{} but slice 0 is {w}×{h}: the masks of one request form one tensor, \
             so its slices must have the same size (send the others in another request)",
            other.index, other.mask.width, other.mask.height
        )));
    }
    let (w, h) = (i64::from(w), i64::from(h));
    let outputs = requested
        .iter()
        .map(|out| {
            let (shape, data) = if out.name == MASK {
                (
                    vec![n, h, w],
                    TensorData::Uint8(
                        results
                            .iter()
                            .flat_map(|r| r.mask.labels.iter().copied())
                            .collect(),
                    ),
                )
            } else {
                (
                    vec![n, config.labels.len() as i64, h, w],
                    TensorData::Fp32(
                        results
                            .iter()
                            .flat_map(|r| r.mask.probabilities.iter().flatten().copied())
                            .collect(),
                    ),
                )
            };
            OutputTensor {
                name: out.name.clone(),
                shape,
                data,
                binary: out.binary,
            }
        })
        .collect();
    Ok(OipResponse {
        model,
        id: request.id,
        outputs,
    })
}

/// A multi-modal model's inputs as slices: one `BYTES` input per channel, named by its
/// sequence, element *i* of each being slice *i*; or the stacked `FP32` tensor.
fn slices(config: &ModelConfig, inputs: Vec<InputTensor>) -> Result<Vec<SliceInput>, InferError> {
    let channels = config.input.channel_names();
    if inputs.is_empty() {
        return Err(InferError::invalid(format!(
            "send one BYTES input per channel ({channels}), or {} as FP32",
            config.input.tensor_name
        )));
    }
    if inputs
        .iter()
        .any(|i| matches!(i.data, Some(TensorData::Fp32(_))))
    {
        // The stacked tensor, checked and split as a classifier's FP32 input is.
        return Ok(images(config, inputs)?
            .into_iter()
            .map(|image| match image {
                ImageInput::Tensor(values) => SliceInput {
                    images: Vec::new(),
                    tensor: Some(values),
                },
                ImageInput::Encoded { .. } => unreachable!("an FP32 input gives tensors"),
            })
            .collect());
    }
    let mut slices: Vec<SliceInput> = Vec::new();
    let mut count = None;
    for input in inputs {
        let name = echo(&input.name);
        let Some(TensorData::Bytes(items)) = input.data else {
            return Err(InferError::invalid(format!(
                "input {name} has datatype {}: send each channel ({channels}) as BYTES (encoded \
                 images)",
                echo(&input.datatype)
            ))
            .quoting_caller());
        };
        let shape_ok = (input.shape.len() == 1 || (input.shape.len() == 2 && input.shape[1] == 1))
            && input.shape[0] == items.len() as i64;
        if !shape_ok {
            return Err(InferError::invalid(format!(
                "input {name}: a BYTES input of images has shape [N] or [N, 1] with N elements; \
                 got shape {:?} and {} elements",
                input.shape,
                items.len()
            ))
            .quoting_caller());
        }
        match count {
            None => {
                count = Some(items.len());
                slices.resize_with(items.len(), SliceInput::default);
            }
            Some(n) if n != items.len() => {
                return Err(InferError::invalid(format!(
                    "input {name} has {} images, the first input {n}: one image per slice in \
                     every channel",
                    items.len()
                ))
                .quoting_caller());
            }
            Some(_) => {}
        }
        for (slice, data) in slices.iter_mut().zip(items) {
            slice.images.push(SequenceImage {
                sequence: input.name.clone(),
                data: data.into(),
                encoding: Encoding::Detect,
            });
        }
    }
    Ok(slices)
}

/// The request's one input as the pipeline's images.
pub(crate) fn images(
    config: &ModelConfig,
    inputs: Vec<InputTensor>,
) -> Result<Vec<ImageInput>, InferError> {
    let [input] = <[InputTensor; 1]>::try_from(inputs).map_err(|inputs| {
        InferError::invalid(format!(
            "send exactly one input ({IMAGE_INPUT} as BYTES, or {} as FP32), not {}",
            config.input.tensor_name,
            inputs.len()
        ))
    })?;
    let name = echo(&input.name);
    let datatype = echo(&input.datatype);
    // The name says which input this is, as Triton checks it: the encoded images, or the model's
    // own tensor.
    let expected = match input.data {
        Some(TensorData::Bytes(_)) => IMAGE_INPUT,
        Some(TensorData::Fp32(_)) => config.input.tensor_name.as_str(),
        None | Some(TensorData::Uint8(_)) => "",
    };
    if !expected.is_empty() && input.name != expected {
        return Err(InferError::invalid(format!(
            "input {name} is not an input of model {}: send the encoded images as \
             {IMAGE_INPUT} (BYTES) or the model's tensor as {} (FP32)",
            config.name, config.input.tensor_name
        ))
        .quoting_caller());
    }
    // Checked: a product that wrapped could equal the number of values sent (fuzzing found the
    // overflow; in a release build it would have wrapped silently).
    let count = input
        .shape
        .iter()
        .try_fold(1i64, |product, d| product.checked_mul(*d));
    if input.shape.is_empty() || input.shape.iter().any(|d| *d < 0) {
        return Err(InferError::invalid(format!(
            "input {name} has shape {:?}: give every dimension, the batch first",
            input.shape
        ))
        .quoting_caller());
    }
    match input.data {
        Some(TensorData::Bytes(items)) => {
            let n = input.shape[0];
            let shape_ok =
                input.shape.len() == 1 || (input.shape.len() == 2 && input.shape[1] == 1);
            if !shape_ok || items.len() as i64 != n {
                return Err(InferError::invalid(format!(
                    "input {name}: a BYTES input of images has shape [N] or [N, 1] with N elements; \
                     got shape {:?} and {} elements",
                    input.shape,
                    items.len()
                ))
                .quoting_caller());
            }
            Ok(items
                .into_iter()
                .map(|data| ImageInput::Encoded {
                    data: data.into(),
                    encoding: Encoding::Detect,
                })
                .collect())
        }
        Some(TensorData::Fp32(values)) => {
            // A model with one ONNX input per channel has no stacked tensor to send.
            let Some((_, _, expected)) = tensors_of(config)
                .0
                .into_iter()
                .find(|(_, datatype, _)| *datatype == "FP32")
            else {
                return Err(InferError::invalid(format!(
                    "input {name}: model {} takes no FP32 tensor (its graph has one input per \
                     channel): send each channel ({}) as BYTES",
                    config.name,
                    config.input.channel_names()
                ))
                .quoting_caller());
            };
            let ok = input.shape.len() == expected.len()
                && input.shape[1..] == expected[1..]
                && count == Some(values.len() as i64);
            if !ok {
                return Err(InferError::invalid(format!(
                    "input {name}: an FP32 input must be the model's tensor, shape {:?} ({}); got \
                     shape {:?} and {} values",
                    [&[-1][..], &expected[1..]].concat(),
                    config.input.layout.as_str(),
                    input.shape,
                    values.len()
                ))
                .quoting_caller());
            }
            if let Some(k) = values.iter().position(|v| !v.is_finite()) {
                return Err(InferError::invalid(format!(
                    "input {name}: FP32 value {k} is {}: the model's input must be finite",
                    values[k]
                ))
                .quoting_caller());
            }
            let per_image = config.input.image_len();
            Ok(values
                .chunks(per_image)
                .map(|c| ImageInput::Tensor(c.to_vec()))
                .collect())
        }
        None | Some(TensorData::Uint8(_)) => Err(InferError::invalid(format!(
            "input {name} has datatype {datatype}: send BYTES (encoded images) or FP32 (the \
             model's tensor)"
        ))
        .quoting_caller()),
    }
}

/// Refuses an output named twice (as Triton does), quoting its name.
fn requested_once(requested: &[RequestedOutput]) -> Result<(), InferError> {
    for (i, output) in requested.iter().enumerate() {
        if requested[..i].iter().any(|o| o.name == output.name) {
            return Err(InferError::invalid(format!(
                "output {} is requested twice",
                echo(&output.name)
            ))
            .quoting_caller());
        }
    }
    Ok(())
}

pub(crate) fn check_outputs(
    config: &ModelConfig,
    requested: &[RequestedOutput],
) -> Result<(), InferError> {
    requested_once(requested)?;
    for output in requested {
        match output.name.as_str() {
            PROBABILITIES => {
                if output.classification == Some(0) {
                    return Err(InferError::invalid(
                        "the classification parameter of probabilities must be at least 1",
                    ));
                }
            }
            LABEL if output.classification.is_some() => {
                return Err(InferError::invalid(
                    "the classification extension applies to probabilities, not label",
                ));
            }
            LABEL => {}
            other => {
                return Err(InferError::invalid(format!(
                    "output {} is not an output of model {} ({PROBABILITIES}, {LABEL})",
                    echo(other),
                    config.name
                ))
                .quoting_caller());
            }
        }
    }
    Ok(())
}

/// The requested outputs (both when none is named) of the results.
fn outputs(
    model: &ServedModel,
    results: &[ImageResult],
    requested: &[RequestedOutput],
) -> Vec<OutputTensor> {
    let labels = &model.spec.config.labels;
    let n = results.len() as i64;
    let default = [
        RequestedOutput {
            name: PROBABILITIES.into(),
            ..Default::default()
        },
        RequestedOutput {
            name: LABEL.into(),
            ..Default::default()
        },
    ];
    let requested = if requested.is_empty() {
        &default[..]
    } else {
        requested
    };
    requested
        .iter()
        .map(|out| {
            let (shape, data) = match (out.name.as_str(), out.classification) {
                (PROBABILITIES, None) => (
                    vec![n, labels.len() as i64],
                    TensorData::Fp32(
                        results
                            .iter()
                            .flat_map(|r| r.classification.probabilities.iter().copied())
                            .collect(),
                    ),
                ),
                (PROBABILITIES, Some(k)) => {
                    let k = k.min(labels.len());
                    let items = results
                        .iter()
                        .flat_map(|r| {
                            let p = &r.classification.probabilities;
                            let mut order: Vec<usize> = (0..p.len()).collect();
                            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
                            order
                                .into_iter()
                                .take(k)
                                .map(|i| format!("{:.6}:{i}:{}", p[i], labels[i]).into_bytes())
                                .collect::<Vec<_>>()
                        })
                        .collect();
                    (vec![n, k as i64], TensorData::Bytes(items))
                }
                _ => (
                    vec![n],
                    TensorData::Bytes(
                        results
                            .iter()
                            .map(|r| labels[r.classification.best].clone().into_bytes())
                            .collect(),
                    ),
                ),
            };
            OutputTensor {
                name: out.name.clone(),
                shape,
                data,
                binary: out.binary,
            }
        })
        .collect()
}

/// The deadline of Triton's `timeout` request parameter (microseconds; 0 or absent: none).
pub fn timeout_deadline(micros: Option<i64>) -> Option<Instant> {
    micros
        .filter(|us| *us > 0)
        .map(|us| Instant::now() + Duration::from_micros(us as u64))
}

/// `BYTES` elements from the raw encoding: each a 4-byte little-endian length, then the bytes.
/// More than `max_items` elements is an error (4 bytes each on the wire, far more decoded).
pub fn bytes_from_raw(raw: &[u8], max_items: usize) -> Result<Vec<Vec<u8>>, String> {
    let mut items = Vec::new();
    let mut at = 0;
    while at < raw.len() {
        if items.len() >= max_items {
            return Err(format!(
                "more than {max_items} BYTES elements, over the limit of {max_items} images per request"
            ));
        }
        let len_bytes: [u8; 4] = raw
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .ok_or("a BYTES element's 4-byte length is cut short")?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        let item = raw
            .get(at + 4..at + 4 + len)
            .ok_or("a BYTES element is shorter than its length says")?;
        items.push(item.to_vec());
        at += 4 + len;
    }
    Ok(items)
}

/// The raw encoding of `BYTES` elements.
pub fn bytes_to_raw(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.iter().map(|i| i.len() + 4).sum());
    for item in items {
        out.extend((item.len() as u32).to_le_bytes());
        out.extend(item);
    }
    out
}

/// `FP32` values from little-endian bytes.
pub fn fp32_from_raw(raw: &[u8]) -> Result<Vec<f32>, String> {
    if !raw.len().is_multiple_of(4) {
        return Err(format!(
            "{} bytes are not a whole number of FP32 values",
            raw.len()
        ));
    }
    Ok(raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

pub fn fp32_to_raw(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_values_are_taken_whole() {
        assert_eq!(priority(None), Ok(None));
        assert_eq!(priority(Some(0)), Ok(None));
        assert_eq!(priority(Some(1)), Ok(Some(Priority::Stat)));
        assert_eq!(priority(Some(2)), Ok(Some(Priority::Routine)));
        // 2^32 + 1 truncated to 32 bits is 1 (STAT): it must be refused, not promoted.
        for bad in [(1i64 << 32) + 1, (1 << 32) + 2, 3, -1, i64::MAX, i64::MIN] {
            let e = priority(Some(bad)).unwrap_err();
            assert!(e.message.contains("use 0"), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn raw_bytes_round_trip_and_reject_short_data() {
        let items = vec![b"abc".to_vec(), vec![], vec![0xFF; 5]];
        let raw = bytes_to_raw(&items);
        assert_eq!(bytes_from_raw(&raw, 3).unwrap(), items);
        assert!(bytes_from_raw(&raw, 2).unwrap_err().contains("more than 2"));
        assert!(bytes_from_raw(&raw[..raw.len() - 1], 3).is_err());
        assert!(bytes_from_raw(&[1, 0], 3).is_err());
        assert_eq!(
            fp32_from_raw(&fp32_to_raw(&[1.5, -2.0])).unwrap(),
            [1.5, -2.0]
        );
        assert!(fp32_from_raw(&[0; 5]).is_err());
    }
}
