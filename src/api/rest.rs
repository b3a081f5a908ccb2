//! The HTTP API port (`--http-addr`, default `:8000`, as Triton): the Open Inference Protocol's
//! REST routes ([`crate::api::oip::http`]), a plain JSON endpoint for people who do not want
//! tensors (`POST /v1/classify`), and the upload page (`GET /`). Every route goes through the same
//! pipeline as gRPC. Errors are JSON `{"error": "..."}` with the HTTP status of their kind; bodies
//! over `--max-http-body-bytes` are refused 413.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{FromRequest, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::json;
use tokio::time::Instant;

use super::oip::http as oip;
use crate::batcher::Priority;
use crate::error::{self, ErrorKind, InferError};
use crate::input::Encoding;
use crate::metrics;
use crate::pipeline::{ImageInput, InferRequest, Pipeline, ServedModel};

/// State of every route.
#[derive(Clone)]
pub struct Rest {
    pub pipeline: Pipeline,
    /// Largest request body, in bytes.
    pub max_body: usize,
}

/// The routes of the HTTP API port.
pub fn router(pipeline: Pipeline, max_body: usize) -> Router {
    Router::new()
        .merge(super::page::routes())
        .route("/v1/classify", post(classify))
        .route("/v2/health/live", get(oip::live))
        .route("/v2/health/ready", get(oip::ready))
        .route("/v2", get(oip::server_metadata))
        .route("/v2/models/{model}", get(oip::model_metadata))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(oip::model_metadata),
        )
        .route("/v2/models/{model}/ready", get(oip::model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(oip::model_ready),
        )
        .route("/v2/models/{model}/infer", post(oip::infer))
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(oip::infer),
        )
        .fallback(not_found)
        .layer(axum::middleware::map_response(nosniff))
        .with_state(Rest { pipeline, max_body })
}

/// Every answer of the router declares `X-Content-Type-Options: nosniff`: a browser takes the
/// declared type and never guesses another (a JSON error read as HTML, an upload as script).
async fn nosniff(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// An error as JSON with the HTTP status of its kind.
pub struct ApiError(pub InferError);

/// The one mapping from the transport-neutral error kind to an HTTP status.
pub fn status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        // 499 (client closed request, as nginx): the caller is gone anyway.
        ErrorKind::Cancelled => StatusCode::from_u16(499).expect("a valid status code"),
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::FailedPrecondition => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status(self.0.kind);
        (status, axum::Json(json!({"error": self.0.message}))).into_response()
    }
}

fn error_response(status: StatusCode, message: String) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

async fn not_found() -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "not found: try GET /, POST /v1/classify, or the /v2 routes of the Open Inference Protocol"
            .into(),
    )
}

/// The request body, read up to the limit; `Err` is the ready 413 (or 400) response.
pub struct Body(pub Result<Bytes, Response>);

impl FromRequest<Rest> for Body {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: Request, state: &Rest) -> Result<Self, Self::Rejection> {
        let limit = state.max_body;
        let limited = http_body_util::Limited::new(req.into_body(), limit);
        Ok(Body(match limited.collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is over the limit of {limit} bytes"),
                ))
            }
            Err(e) => Err(error_response(
                StatusCode::BAD_REQUEST,
                format!("the request body could not be read: {e}"),
            )),
        }))
    }
}

/// One uploaded file.
pub(crate) struct Upload {
    pub(crate) name: String,
    pub(crate) data: Vec<u8>,
}

/// The files of a multipart form (every part with a body), or the whole body as one image. More
/// than `max_files` parts is an error, found before they are all read.
pub(crate) async fn uploads(
    headers: &HeaderMap,
    body: Bytes,
    max_files: usize,
) -> Result<Vec<Upload>, InferError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type.starts_with("multipart/form-data") {
        return Ok(vec![Upload {
            name: String::new(),
            data: body.to_vec(),
        }]);
    }
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| InferError::invalid(format!("multipart body without a boundary: {e}")))?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut files = Vec::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| InferError::invalid(format!("the multipart body is malformed: {e}")))?
    {
        let name = field.file_name().unwrap_or_default().to_string();
        let data = field
            .bytes()
            .await
            .map_err(|e| InferError::invalid(format!("the multipart body is malformed: {e}")))?;
        if !data.is_empty() || !name.is_empty() {
            if files.len() >= max_files {
                return Err(InferError::invalid(format!(
                    "request has more than {max_files} images, over the limit of {max_files} per request"
                )));
            }
            files.push(Upload {
                name,
                data: data.to_vec(),
            });
        }
    }
    Ok(files)
}

/// `POST /v1/classify`: a multipart upload (every file part is an image) or a raw image body.
/// Query: `model`, `version`, `priority` (`stat` | `routine`), `timeout_ms`, `preview=1` (also
/// return each image as the model saw it, as a PNG data URL).
async fn classify(
    State(rest): State<Rest>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let body = match body.0 {
        Ok(body) => body,
        Err(too_large) => return too_large,
    };
    let mut served: Option<std::sync::Arc<ServedModel>> = None;
    let result = async {
        let _guard = rest.pipeline.admit()?;
        let get = |k: &str| query.get(k).map(String::as_str).unwrap_or_default();
        let model = rest.pipeline.resolve(get("model"), get("version"))?;
        served = Some(model.clone());
        let priority = match get("priority") {
            "" => None,
            p => Some(p.parse::<Priority>().map_err(InferError::invalid)?),
        };
        let deadline = match get("timeout_ms") {
            "" => None,
            ms => Some(
                Instant::now()
                    + std::time::Duration::from_millis(ms.parse().map_err(|_| {
                        InferError::invalid("timeout_ms must be a whole number of milliseconds")
                    })?),
            ),
        };
        let files = uploads(&headers, body, rest.pipeline.max_images_per_request()).await?;
        let preview = matches!(get("preview"), "1" | "true");
        let previews = if preview {
            let mut out = Vec::with_capacity(files.len());
            for (i, f) in files.iter().enumerate() {
                let png = rest
                    .pipeline
                    .preview(&model, f.data.clone(), Encoding::Detect)
                    .await
                    .map_err(|e| e.for_image(i))?;
                out.push(Some(format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(png)
                )));
            }
            out
        } else {
            vec![None; files.len()]
        };
        let names: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
        let request = InferRequest {
            images: files
                .into_iter()
                .map(|f| ImageInput::Encoded {
                    data: f.data.into(),
                    encoding: Encoding::Detect,
                })
                .collect(),
            priority,
            first_index: 0,
            deadline,
        };
        let results = rest.pipeline.classify(&model, request).await?;
        let labels = &model.spec.config.labels;
        let rows: Vec<_> = results
            .into_iter()
            .zip(names)
            .zip(previews)
            .map(|((r, file), preview)| {
                let c = &r.classification;
                let mut row = json!({
                    "file": file,
                    "index": r.index,
                    "label": labels[c.best],
                    "probability": c.probabilities[c.best],
                    "probabilities": labels.iter().zip(&c.probabilities).map(|(l, p)| (l.clone(), json!(p))).collect::<serde_json::Map<_, _>>(),
                    "model": {
                        "name": model.spec.config.name,
                        "version": model.spec.version,
                        "sha256": model.spec.sha256,
                        "clinically_trained": model.spec.config.clinically_trained,
                    },
                    "batch_size": r.batch_size,
                    "from_cache": r.from_cache,
                    "timing": {
                        "queue_seconds": r.timing.queue.as_secs_f64(),
                        "preprocess_seconds": r.timing.preprocess.as_secs_f64(),
                        "inference_seconds": r.timing.inference.as_secs_f64(),
                    },
                    "warnings": model.warnings.iter().chain(&r.warnings).collect::<Vec<_>>(),
                });
                if let Some(p) = preview {
                    row["preview"] = json!(p);
                }
                if let Some(ids) = &r.dicom {
                    row["dicom"] = json!({
                        "study_instance_uid": ids.study_instance_uid,
                        "series_instance_uid": ids.series_instance_uid,
                        "sop_instance_uid": ids.sop_instance_uid,
                    });
                }
                row
            })
            .collect();
        Ok::<_, InferError>(json!({ "results": rows }))
    }
    .await;
    let outcome = result
        .as_ref()
        .map_or_else(|e| e.kind.as_str(), |_| error::OK);
    let (name, version) = served.as_deref().map_or(("", ""), |m| {
        (m.spec.config.name.as_str(), m.spec.version.as_str())
    });
    metrics::request_done(
        "v1.classify",
        outcome,
        name,
        version,
        started.elapsed().as_secs_f64(),
    );
    match result {
        Ok(doc) => axum::Json(doc).into_response(),
        Err(e) => {
            tracing::debug!(
                rpc = "v1.classify",
                code = outcome,
                error = e.log_message(),
                "request rejected"
            );
            ApiError(e).into_response()
        }
    }
}
