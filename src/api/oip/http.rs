//! The Open Inference Protocol over HTTP/REST: the v2 JSON tensor format and its binary-data
//! extension (as tritonclient's HTTP client uses it) ↔ the OIP types of [`super`].
//!
//! - `GET /v2/health/live`, `/v2/health/ready`, `/v2`, `/v2/models/{m}[/versions/{v}]`,
//!   `/v2/models/{m}[/versions/{v}]/ready`
//! - `POST /v2/models/{m}[/versions/{v}]/infer`: JSON, or JSON followed by binary tensors when
//!   the `Inference-Header-Content-Length` header gives the JSON's length. `BYTES` in JSON `data`
//!   are base64 strings (an image is not text); binary `BYTES` are 4-byte little-endian lengths
//!   and bytes, binary `FP32` little-endian floats. Outputs come back binary when asked for
//!   (`parameters.binary_data` on an output, or `binary_data_output` on the request).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::{
    InputTensor, MAX_DIMS, MAX_TENSORS, OipRequest, OipResponse, Param, RequestedOutput, TensorData,
};
use crate::api::web::{Answer, LimitedBody, Rest};
use crate::error::InferError;

/// Header of the binary-data extension: how many leading bytes of the body are JSON.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

fn params_json(params: Vec<(&'static str, Param)>) -> Value {
    let mut map = Map::new();
    for (k, v) in params {
        map.insert(
            k.to_string(),
            match v {
                Param::Bool(b) => json!(b),
                Param::Int(i) => json!(i),
                Param::Text(s) => json!(s),
            },
        );
    }
    Value::Object(map)
}

pub async fn live() -> StatusCode {
    StatusCode::OK
}

pub async fn ready(State(rest): State<Rest>) -> StatusCode {
    if rest.pipeline.state().get().server_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

pub async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "brainai",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": super::EXTENSIONS,
    }))
    .into_response()
}

/// `{model}` or `{model}/versions/{version}` path parameters.
pub type ModelPath = Path<Vec<(String, String)>>;

fn model_and_version(path: &[(String, String)]) -> (String, String) {
    let get = |k: &str| {
        path.iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    (get("model"), get("version"))
}

pub async fn model_metadata(State(rest): State<Rest>, Path(path): ModelPath) -> Answer {
    let (name, version) = model_and_version(&path);
    let model = rest.pipeline.resolve(&name, &version)?;
    let (inputs, outputs) = super::tensors(&model);
    let tensors = |list: Vec<(String, &str, Vec<i64>)>| {
        list.into_iter()
            .map(|(name, datatype, shape)| json!({"name": name, "datatype": datatype, "shape": shape}))
            .collect::<Vec<_>>()
    };
    Ok(axum::Json(json!({
        "name": model.spec.config.name,
        "versions": super::versions(&rest.pipeline, &model),
        "platform": super::PLATFORM,
        "inputs": tensors(inputs),
        "outputs": tensors(outputs),
        "parameters": params_json(super::parameters(&model)),
    }))
    .into_response())
}

pub async fn model_ready(State(rest): State<Rest>, Path(path): ModelPath) -> Answer {
    let (name, version) = model_and_version(&path);
    rest.pipeline.resolve(&name, &version)?;
    Ok(if rest.pipeline.state().get().server_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
    .into_response())
}

pub async fn infer(
    State(rest): State<Rest>,
    Path(path): ModelPath,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Answer {
    let call = rest.pipeline.admit()?;
    let (name, version) = model_and_version(&path);
    let (request, binary_all) = decode(
        &name,
        &version,
        &headers,
        &body,
        rest.pipeline.max_images_per_request(),
    )?;
    let response = super::infer(&call, request).await?;
    Ok(encode(response, binary_all))
}

fn invalid(message: impl Into<String>) -> InferError {
    InferError::invalid(message)
}

/// The body is JSON (or JSON and binary tensors): sent as `application/json`,
/// `application/octet-stream` or with no type (tritonclient sends none). The content types a web
/// page may send to another site without asking first (`text/plain`, forms) are refused: no
/// other site's page can make a browser post an inference request here.
fn check_content_type(headers: &HeaderMap) -> Result<(), InferError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if matches!(
        essence.as_str(),
        "application/json" | "application/octet-stream"
    ) {
        return Ok(());
    }
    Err(invalid(format!(
        "Content-Type {}: send the inference request as application/json (or \
         application/octet-stream with {HEADER_LENGTH})",
        crate::error::echo(&essence)
    ))
    .quoting_caller())
}

/// A v2 inference request as JSON. `data` is kept as raw JSON text and read straight into the
/// tensor's values once the datatype is known: a generic JSON tree would spend ~32 bytes on every
/// number of a tensor (a 64 MiB body of `0,` would become a gigabyte).
#[derive(serde::Deserialize)]
struct JsonRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow)]
    inputs: Option<Vec<JsonInput<'a>>>,
    #[serde(default)]
    outputs: Option<Vec<JsonOutput>>,
}

#[derive(serde::Deserialize)]
struct JsonInput<'a> {
    #[serde(default)]
    name: String,
    #[serde(default)]
    datatype: String,
    #[serde(default)]
    shape: Option<Vec<i64>>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow, default)]
    data: Option<&'a serde_json::value::RawValue>,
}

#[derive(serde::Deserialize)]
struct JsonOutput {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// Reads nested JSON arrays of numbers (FP32) or of base64 strings (BYTES) into a flat list,
/// element by element, refusing more than `max` elements.
struct Flat<'v, T> {
    out: &'v mut Vec<T>,
    max: usize,
}

impl<'de, T: FlatElement> serde::de::DeserializeSeed<'de> for Flat<'_, T> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: FlatElement> serde::de::Visitor<'de> for Flat<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(T::EXPECTING)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let max = self.max;
        while seq
            .next_element_seed(Flat {
                out: &mut *self.out,
                max,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.push(T::from_number(v).ok_or_else(|| E::custom(T::EXPECTING))?)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.push(T::from_text(v).map_err(E::custom)?)
    }
}

impl<T> Flat<'_, T> {
    fn push<E: serde::de::Error>(self, value: T) -> Result<(), E> {
        if self.out.len() >= self.max {
            return Err(E::custom(format!(
                "more than {} elements, over the limit of {} images per request",
                self.max, self.max
            )));
        }
        self.out.push(value);
        Ok(())
    }
}

trait FlatElement: Sized {
    const EXPECTING: &'static str;
    fn from_number(_: f64) -> Option<Self> {
        None
    }
    fn from_text(_: &str) -> Result<Self, String> {
        Err(Self::EXPECTING.into())
    }
}

impl FlatElement for f32 {
    const EXPECTING: &'static str = "FP32 data must be numbers";
    fn from_number(v: f64) -> Option<f32> {
        Some(v as f32)
    }
}

impl FlatElement for Vec<u8> {
    const EXPECTING: &'static str = "BYTES data in JSON are base64 strings";
    fn from_text(v: &str) -> Result<Vec<u8>, String> {
        base64::engine::general_purpose::STANDARD
            .decode(v)
            .map_err(|e| format!("BYTES data are not base64: {e}"))
    }
}

fn flat<T: FlatElement>(raw: &serde_json::value::RawValue, max: usize) -> Result<Vec<T>, String> {
    use serde::de::DeserializeSeed;
    let mut out = Vec::new();
    let mut d = serde_json::Deserializer::from_str(raw.get());
    Flat { out: &mut out, max }
        .deserialize(&mut d)
        .map_err(|e| crate::error::bounded_quotes(&e.to_string()))?;
    Ok(out)
}

/// The body as an [`OipRequest`], and whether every output goes back binary. At most
/// `max_images` BYTES elements are read.
pub(crate) fn decode(
    model: &str,
    version: &str,
    headers: &HeaderMap,
    body: &[u8],
    max_images: usize,
) -> Result<(OipRequest, bool), InferError> {
    check_content_type(headers)?;
    let json_len = match headers.get(HEADER_LENGTH) {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n <= body.len())
            .ok_or_else(|| {
                invalid(format!(
                    "{HEADER_LENGTH} must be a length within the body ({} bytes)",
                    body.len()
                ))
            })?,
        None => body.len(),
    };
    let (json_part, mut binary) = body.split_at(json_len);
    let doc: JsonRequest = serde_json::from_slice(json_part).map_err(|e| {
        invalid(format!(
            "the request is not valid JSON for an inference request (a JSON object with \
             `inputs`): {}",
            crate::error::bounded_quotes(&e.to_string())
        ))
        .quoting_caller()
    })?;
    let params = doc.parameters.as_ref();
    let int = |p: Option<&Map<String, Value>>, k: &str| -> Result<Option<i64>, InferError> {
        match p.and_then(|p| p.get(k)) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| invalid(format!("parameter {k} must be an integer"))),
        }
    };
    let flag =
        |p: Option<&Map<String, Value>>, k: &str| p.and_then(|p| p.get(k)).and_then(Value::as_bool);
    let binary_all = flag(params, "binary_data_output").unwrap_or(false);

    let json_inputs = doc
        .inputs
        .ok_or_else(|| invalid("the request has no `inputs` array"))?;
    if json_inputs.len() > MAX_TENSORS {
        return Err(invalid(format!(
            "a request has at most {} inputs (this server takes one)",
            MAX_TENSORS
        )));
    }
    let mut inputs = Vec::new();
    for (i, input) in json_inputs.into_iter().enumerate() {
        let shape = input
            .shape
            .ok_or_else(|| invalid(format!("input {i} has no `shape`")))?;
        if shape.len() > MAX_DIMS {
            return Err(invalid(format!(
                "input {i}: a shape has at most {} dimensions",
                MAX_DIMS
            )));
        }
        let input_params = input.parameters.as_ref();
        let data = match int(input_params, "binary_data_size")? {
            Some(size) => {
                let size = usize::try_from(size)
                    .map_err(|_| invalid(format!("input {i}: negative binary_data_size")))?;
                if size > binary.len() {
                    return Err(invalid(format!(
                        "input {i}: binary_data_size {size} is past the end of the body"
                    )));
                }
                let (chunk, rest) = binary.split_at(size);
                binary = rest;
                match input.datatype.as_str() {
                    "BYTES" => Some(TensorData::Bytes(
                        super::bytes_from_raw(chunk, max_images)
                            .map_err(|e| invalid(format!("input {i}: {e}")))?,
                    )),
                    "FP32" => Some(TensorData::Fp32(
                        super::fp32_from_raw(chunk)
                            .map_err(|e| invalid(format!("input {i}: {e}")))?,
                    )),
                    _ => None,
                }
            }
            None => {
                let data = input.data.ok_or_else(|| {
                    invalid(format!("input {i} has neither `data` nor binary_data_size"))
                })?;
                match input.datatype.as_str() {
                    "BYTES" => Some(TensorData::Bytes(
                        flat(data, max_images).map_err(|e| invalid(format!("input {i}: {e}")))?,
                    )),
                    "FP32" => Some(TensorData::Fp32(
                        flat(data, usize::MAX).map_err(|e| invalid(format!("input {i}: {e}")))?,
                    )),
                    _ => None,
                }
            }
        };
        inputs.push(InputTensor {
            name: input.name,
            datatype: input.datatype,
            shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(invalid(format!(
            "{} bytes after the JSON and the binary inputs it announces",
            binary.len()
        )));
    }
    let json_outputs = doc.outputs.unwrap_or_default();
    if json_outputs.len() > MAX_TENSORS {
        return Err(invalid(format!(
            "a request has at most {} outputs",
            MAX_TENSORS
        )));
    }
    let mut outputs = Vec::new();
    for (i, output) in json_outputs.into_iter().enumerate() {
        let out_params = output.parameters.as_ref();
        outputs.push(RequestedOutput {
            name: output
                .name
                .ok_or_else(|| invalid(format!("output {i} has no name")))?,
            classification: int(out_params, "classification")?.map(|k| k.max(0) as usize),
            binary: flag(out_params, "binary_data").unwrap_or(binary_all),
        });
    }
    let priority = super::priority(int(params, "priority")?)?;
    Ok((
        OipRequest {
            model: model.to_string(),
            version: version.to_string(),
            id: doc.id.unwrap_or_default(),
            inputs,
            outputs,
            deadline: super::timeout_deadline(int(params, "timeout")?),
            priority,
        },
        binary_all,
    ))
}

fn encode(response: OipResponse, binary_all: bool) -> Response {
    let mut blobs: Vec<u8> = Vec::new();
    let mut outputs = Vec::new();
    for out in &response.outputs {
        let mut entry = json!({"name": out.name, "datatype": out.datatype(), "shape": out.shape});
        if out.binary || binary_all {
            let bytes = match &out.data {
                TensorData::Fp32(v) => super::fp32_to_raw(v),
                TensorData::Bytes(v) => super::bytes_to_raw(v),
                TensorData::Uint8(v) => v.clone(),
            };
            entry["parameters"] = json!({"binary_data_size": bytes.len()});
            blobs.extend(bytes);
        } else {
            entry["data"] = match &out.data {
                TensorData::Fp32(v) => json!(v),
                TensorData::Uint8(v) => json!(v),
                TensorData::Bytes(v) => json!(
                    v.iter()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .collect::<Vec<_>>()
                ),
            };
        }
        outputs.push(entry);
    }
    let doc = json!({
        "model_name": response.model.spec.config.name,
        "model_version": response.model.spec.version,
        "id": response.id,
        "parameters": params_json(response.parameters()),
        "outputs": outputs,
    });
    let json = serde_json::to_vec(&doc).expect("JSON values serialise");
    if blobs.is_empty() {
        return ([("content-type", "application/json")], json).into_response();
    }
    let length = json.len();
    let mut body = json;
    body.extend(blobs);
    let mut response = (StatusCode::OK, Bytes::from(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(HEADER_LENGTH, HeaderValue::from(length));
    response
}
