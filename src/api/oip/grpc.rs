//! `inference.GRPCInferenceService` (the Open Inference Protocol over gRPC): protobuf ↔ the OIP
//! types of [`super`], and nothing else. Its routes are declared here ([`ROUTES`]). Errors are the
//! same `Status`es as `brainai.v1`.

use std::collections::HashMap;

use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::{InputTensor, OipRequest, OipResponse, Param, RequestedOutput, TensorData};
use crate::api::grpc::request_deadline;
use crate::api::routes::{Protection, Route};
use crate::error::InferError;
use crate::kserve_pb as pb;
use crate::pipeline::Pipeline;
use crate::security::auth::Scope;

/// The methods of `inference.GRPCInferenceService`: liveness and readiness of the server are open
/// (probes), inference needs `infer`, the repository extension `admin`, the rest `read`.
pub const ROUTES: &[Route] = &[
    Route::new(
        "/inference.GRPCInferenceService/ServerLive",
        "ServerLive",
        Protection::Open,
    ),
    Route::new(
        "/inference.GRPCInferenceService/ServerReady",
        "ServerReady",
        Protection::Open,
    ),
    Route::new(
        "/inference.GRPCInferenceService/ModelReady",
        "ModelReady",
        Protection::Scope(Scope::Read),
    ),
    Route::new(
        "/inference.GRPCInferenceService/ServerMetadata",
        "ServerMetadata",
        Protection::Scope(Scope::Read),
    ),
    Route::new(
        "/inference.GRPCInferenceService/ModelMetadata",
        "ModelMetadata",
        Protection::Scope(Scope::Read),
    ),
    Route::new(
        "/inference.GRPCInferenceService/ModelInfer",
        "ModelInfer",
        Protection::Scope(Scope::Infer),
    ),
    Route::new(
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "RepositoryModelLoad",
        Protection::Scope(Scope::Admin),
    ),
    Route::new(
        "/inference.GRPCInferenceService/RepositoryModelUnload",
        "RepositoryModelUnload",
        Protection::Scope(Scope::Admin),
    ),
];

/// The service; cheap to clone.
#[derive(Clone)]
pub struct InferenceService {
    pipeline: Pipeline,
}

impl InferenceService {
    pub fn new(pipeline: Pipeline) -> Self {
        InferenceService { pipeline }
    }
}

fn param(p: &pb::InferParameter) -> Option<Param> {
    use pb::infer_parameter::ParameterChoice as C;
    Some(match p.parameter_choice.as_ref()? {
        C::BoolParam(b) => Param::Bool(*b),
        C::Int64Param(i) => Param::Int(*i),
        C::StringParam(s) => Param::Text(s.clone()),
    })
}

fn to_param(p: Param) -> pb::InferParameter {
    use pb::infer_parameter::ParameterChoice as C;
    pb::InferParameter {
        parameter_choice: Some(match p {
            Param::Bool(b) => C::BoolParam(b),
            Param::Int(i) => C::Int64Param(i),
            Param::Text(s) => C::StringParam(s),
        }),
    }
}

fn int_param(
    params: &HashMap<String, pb::InferParameter>,
    key: &str,
) -> Result<Option<i64>, InferError> {
    match params.get(key).and_then(param) {
        None => Ok(None),
        Some(Param::Int(i)) => Ok(Some(i)),
        Some(_) => Err(InferError::invalid(format!(
            "parameter {key} must be an int64"
        ))),
    }
}

/// The protobuf request as an [`OipRequest`]: typed `contents`, or `raw_input_contents` (one
/// entry per input, in order).
pub(crate) fn decode(
    request: pb::ModelInferRequest,
    deadline: Option<Instant>,
    max_images: usize,
) -> Result<OipRequest, InferError> {
    let raw = request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(InferError::invalid(format!(
            "raw_input_contents has {} entries for {} inputs",
            raw.len(),
            request.inputs.len()
        )));
    }
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for (i, input) in request.inputs.into_iter().enumerate() {
        let contents = input.contents.unwrap_or_default();
        let data = match (input.datatype.as_str(), raw.get(i)) {
            ("BYTES", Some(raw)) => Some(TensorData::Bytes(
                super::bytes_from_raw(raw, max_images)
                    .map_err(|e| InferError::invalid(format!("input {i}: {e}")))?,
            )),
            ("BYTES", None) => Some(TensorData::Bytes(contents.bytes_contents)),
            ("FP32", Some(raw)) => Some(TensorData::Fp32(
                super::fp32_from_raw(raw)
                    .map_err(|e| InferError::invalid(format!("input {i}: {e}")))?,
            )),
            ("FP32", None) => Some(TensorData::Fp32(contents.fp32_contents)),
            _ => None,
        };
        inputs.push(InputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            data,
        });
    }
    let mut outputs = Vec::with_capacity(request.outputs.len());
    for output in request.outputs {
        let k = int_param(&output.parameters, "classification")?;
        outputs.push(RequestedOutput {
            name: output.name,
            classification: k.map(|k| k.max(0) as usize),
            binary: false,
        });
    }
    let timeout = super::timeout_deadline(int_param(&request.parameters, "timeout")?);
    let deadline = match (deadline, timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let priority = super::priority(int_param(&request.parameters, "priority")?)?;
    Ok(OipRequest {
        model: request.model_name,
        version: request.model_version,
        id: request.id,
        inputs,
        outputs,
        deadline,
        priority,
    })
}

fn encode(response: OipResponse, raw: bool) -> pb::ModelInferResponse {
    let mut raw_output_contents = Vec::new();
    let outputs = response
        .outputs
        .iter()
        .map(|out| {
            let mut contents = pb::InferTensorContents::default();
            match &out.data {
                TensorData::Fp32(v) if raw => raw_output_contents.push(super::fp32_to_raw(v)),
                TensorData::Bytes(v) if raw => raw_output_contents.push(super::bytes_to_raw(v)),
                TensorData::Uint8(v) if raw => raw_output_contents.push(v.clone()),
                TensorData::Fp32(v) => contents.fp32_contents = v.clone(),
                TensorData::Bytes(v) => contents.bytes_contents = v.clone(),
                TensorData::Uint8(v) => {
                    contents.uint_contents = v.iter().map(|&b| u32::from(b)).collect();
                }
            }
            pb::model_infer_response::InferOutputTensor {
                name: out.name.clone(),
                datatype: out.datatype().into(),
                shape: out.shape.clone(),
                parameters: HashMap::new(),
                contents: (!raw).then_some(contents),
            }
        })
        .collect();
    pb::ModelInferResponse {
        model_name: response.model.spec.config.name.clone(),
        model_version: response.model.spec.version.clone(),
        id: response.id.clone(),
        parameters: response
            .parameters()
            .into_iter()
            .map(|(k, v)| (k.to_string(), to_param(v)))
            .collect(),
        outputs,
        raw_output_contents,
    }
}

#[tonic::async_trait]
impl pb::grpc_inference_service_server::GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _request: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        let ready = self.pipeline.state().get().server_ready();
        Ok(Response::new(pb::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let ready = self.pipeline.state().get().server_ready()
            && self
                .pipeline
                .resolve(&request.name, &request.version)
                .is_ok();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _request: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "brainai".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: super::EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let model = self.pipeline.resolve(&request.name, &request.version)?;
        let (inputs, outputs) = super::tensors(&model);
        let meta = |(name, datatype, shape): (String, &str, Vec<i64>)| {
            pb::model_metadata_response::TensorMetadata {
                name,
                datatype: datatype.into(),
                shape,
            }
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            name: model.spec.config.name.clone(),
            versions: super::versions(&self.pipeline, &model),
            platform: super::PLATFORM.into(),
            inputs: inputs.into_iter().map(meta).collect(),
            outputs: outputs.into_iter().map(meta).collect(),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let deadline = request_deadline(&request);
        let call = self.pipeline.admit()?;
        let request = request.into_inner();
        let raw = !request.raw_input_contents.is_empty();
        let request = decode(request, deadline, self.pipeline.max_images_per_request())?;
        let response = super::infer(&call, request).await?;
        Ok(Response::new(encode(response, raw)))
    }

    async fn repository_model_load(
        &self,
        _request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        Err(Status::unimplemented(
            "models are loaded from the model repository: add the version directory, then send SIGHUP (or set --repository-poll-s)",
        ))
    }

    async fn repository_model_unload(
        &self,
        _request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        Err(Status::unimplemented(
            "models are unloaded by removing their directory from the model repository, then SIGHUP (or --repository-poll-s)",
        ))
    }
}
