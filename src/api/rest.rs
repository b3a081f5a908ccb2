//! The HTTP API port (`--http-addr`, default `:8000`, as Triton): the router, which declares every
//! route (path, name, protection) where it mounts it; the Open Inference Protocol's REST routes
//! ([`crate::api::oip::http`]), a plain JSON endpoint for people who do not want tensors
//! (`POST /v1/classify`), and the upload page (`GET /`). Every route goes through the same call
//! layer and pipeline as gRPC. Errors are JSON `{"error": "..."}` with the HTTP status of their kind
//! ([`super::web`]); bodies over `--max-http-body-bytes` are refused 413.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post};
use base64::Engine;
use bytes::Bytes;
use serde_json::json;
use tokio::time::Instant;

use super::call::CallLayer;
use super::oip::http as oip;
use super::routes::{Protection, Route, UNMATCHED_HTTP};
use super::web::{Answer, LimitedBody, Rest};
use crate::error::InferError;
use crate::input::Encoding;
use crate::pipeline::segment::{SegmentRequest, SequenceImage, SliceInput};
use crate::pipeline::{ImageInput, InferRequest, Pipeline};
use crate::priority::Priority;
use crate::security::auth::Scope;

use Protection::Open;

/// Every route of the HTTP API port: its path template, its name in metrics, audit records and
/// traces, and what it takes to call it. Mounted by [`router`], each with its own copy of the call
/// layer; `/v2/repository/...` (the repository extension) is not served here.
mod declared {
    use super::*;
    pub static PAGE: Route = Route::new("/", "page", Open);
    pub static PAGE_JS: Route = Route::new("/page.js", "page.js", Open);
    pub static PAGE_CSS: Route = Route::new("/page.css", "page.css", Open);
    pub static CLASSIFY: Route = Route::new(
        "/v1/classify",
        "v1.classify",
        Protection::Scope(Scope::Infer),
    );
    pub static SEGMENT: Route =
        Route::new("/v1/segment", "v1.segment", Protection::Scope(Scope::Infer));
    pub static SEGMENT_STUDY: Route = Route::new(
        "/v1/segment-study",
        "v1.segment_study",
        Protection::Scope(Scope::Infer),
    );
    pub static MODELS: Route =
        Route::new("/v1/models", "v1.models", Protection::Scope(Scope::Read));
    pub static LIVE: Route = Route::new("/v2/health/live", "v2.health.live", Open);
    pub static READY: Route = Route::new("/v2/health/ready", "v2.health.ready", Open);
    pub static SERVER_METADATA: Route =
        Route::new("/v2", "v2.server_metadata", Protection::Scope(Scope::Read));
    pub static MODEL_METADATA: Route = Route::new(
        "/v2/models/{model}",
        "v2.model_metadata",
        Protection::Scope(Scope::Read),
    );
    pub static VERSION_METADATA: Route = Route::new(
        "/v2/models/{model}/versions/{version}",
        "v2.model_metadata",
        Protection::Scope(Scope::Read),
    );
    pub static MODEL_READY: Route = Route::new(
        "/v2/models/{model}/ready",
        "v2.model_ready",
        Protection::Scope(Scope::Read),
    );
    pub static VERSION_READY: Route = Route::new(
        "/v2/models/{model}/versions/{version}/ready",
        "v2.model_ready",
        Protection::Scope(Scope::Read),
    );
    pub static INFER: Route = Route::new(
        "/v2/models/{model}/infer",
        "v2.infer",
        Protection::Scope(Scope::Infer),
    );
    pub static VERSION_INFER: Route = Route::new(
        "/v2/models/{model}/versions/{version}/infer",
        "v2.infer",
        Protection::Scope(Scope::Infer),
    );
}

/// The routes of the HTTP API port, each behind the call layer (access, cross-site check, the
/// call's record), all behind the trace layer (which knows each route's template).
pub fn router(pipeline: Pipeline, max_body: usize, calls: CallLayer) -> Router {
    use declared::*;
    let at = |router: Router<Rest>, route: &'static Route, handler: MethodRouter<Rest>| {
        router.route(route.path, handler.layer(calls.on(route)))
    };
    let router = Router::new();
    let router = at(router, &PAGE, get(super::page::page));
    let router = at(router, &PAGE_JS, get(super::page::page_js));
    let router = at(router, &PAGE_CSS, get(super::page::page_css));
    let router = at(router, &CLASSIFY, post(classify));
    let router = at(router, &SEGMENT, post(segment));
    let router = at(router, &SEGMENT_STUDY, post(segment_study));
    let router = at(router, &MODELS, get(models));
    let router = at(router, &LIVE, get(oip::live));
    let router = at(router, &READY, get(oip::ready));
    let router = at(router, &SERVER_METADATA, get(oip::server_metadata));
    let router = at(router, &MODEL_METADATA, get(oip::model_metadata));
    let router = at(router, &VERSION_METADATA, get(oip::model_metadata));
    let router = at(router, &MODEL_READY, get(oip::model_ready));
    let router = at(router, &VERSION_READY, get(oip::model_ready));
    let router = at(router, &INFER, post(oip::infer));
    let router = at(router, &VERSION_INFER, post(oip::infer));
    router
        .fallback_service(any(not_found).layer(calls.on(&UNMATCHED_HTTP)))
        .layer(axum::middleware::map_response(nosniff))
        .with_state(Rest { pipeline, max_body })
        .layer(super::trace::TraceLayer::http())
}

/// Every answer of the router declares `X-Content-Type-Options: nosniff` (the call layer's
/// refusals and the 404 included): a browser takes the declared type and never guesses another (a
/// JSON error read as HTML, an upload as script).
async fn nosniff(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({
            "error": "not found: try GET /, GET /v1/models, POST /v1/classify, POST /v1/segment, or the /v2 routes of the Open \
                      Inference Protocol"
        })),
    )
        .into_response()
}

/// One uploaded file.
pub(crate) struct Upload {
    /// The form field's name (`/v1/segment`: the sequence).
    pub(crate) field: String,
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
            field: String::new(),
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
        let field_name = field.name().unwrap_or_default().to_string();
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
                field: field_name,
                name,
                data: data.to_vec(),
            });
        }
    }
    Ok(files)
}

/// `GET /v1/models`: every model served (its highest version), with what a page or a script
/// needs to call it: task, channels, labels, colours, regions, trained flag; and the default.
async fn models(State(rest): State<Rest>) -> Answer {
    let registry = rest.pipeline.registry();
    let mut served = registry.served();
    // Highest version of each model first, then by name.
    served.sort_by(|a, b| {
        let version = |m: &crate::pipeline::ServedModel| m.spec.version.parse::<u64>().unwrap_or(0);
        (a.spec.config.name.as_str(), std::cmp::Reverse(version(a)))
            .cmp(&(b.spec.config.name.as_str(), std::cmp::Reverse(version(b))))
    });
    served.dedup_by(|a, b| a.spec.config.name == b.spec.config.name);
    let models: Vec<_> = served
        .iter()
        .map(|m| {
            let config = &m.spec.config;
            let (colors, regions) = match &config.task {
                crate::model::Task::Segmentation(seg) => (
                    seg.hex_colors(),
                    seg.regions
                        .iter()
                        .map(|g| json!({"name": g.name, "labels": g.label_names(&config.labels)}))
                        .collect::<Vec<_>>(),
                ),
                crate::model::Task::Classification => (Vec::new(), Vec::new()),
            };
            json!({
                "name": config.name,
                "version": m.spec.version,
                "sha256": m.spec.sha256,
                "task": config.task.as_str(),
                "description": config.description,
                "clinically_trained": config.clinically_trained,
                "channels": config.input.channels.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
                "labels": config.labels,
                "colors": colors,
                "regions": regions,
                "warnings": m.warnings,
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "default_model": registry.default_model(),
        "models": models,
    }))
    .into_response())
}

/// The `priority` (`stat` | `routine`) and `timeout_ms` of a query.
fn priority_and_deadline(
    query: &HashMap<String, String>,
) -> Result<(Option<Priority>, Option<Instant>), InferError> {
    let get = |k: &str| query.get(k).map(String::as_str).unwrap_or_default();
    let priority = match get("priority") {
        "" => None,
        p => Some(
            p.parse::<Priority>()
                .map_err(|e| InferError::invalid(e).quoting_caller())?,
        ),
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
    Ok((priority, deadline))
}

/// `POST /v1/segment`: one slice as a multipart form, one file part per sequence, each part named
/// by its sequence (`flair`, `t1c`, `t2`, …). Query: `model` (default: the default model if it
/// segments, else the one segmentation model served), `version`, `priority`, `timeout_ms`,
/// `probabilities=1` (also the class probability maps, FP32 little-endian `[labels, H, W]`,
/// base64). Answers JSON with the label map as a PNG data URL.
async fn segment(
    State(rest): State<Rest>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Answer {
    let call = rest.pipeline.admit()?;
    let get = |k: &str| query.get(k).map(String::as_str).unwrap_or_default();
    let model = call.resolve_segmenter(get("model"), get("version"))?;
    let (priority, deadline) = priority_and_deadline(&query)?;
    let images = sequence_parts(&headers, body, "/v1/segment").await?;
    let request = SegmentRequest {
        slices: vec![SliceInput {
            images,
            tensor: None,
        }],
        priority,
        deadline,
        probabilities: matches!(get("probabilities"), "1" | "true"),
    };
    let result = call
        .segment(&model, request)
        .await?
        .pop()
        .expect("one result per slice");
    Ok(axum::Json(segment_json(&model, result)).into_response())
}

/// `POST /v1/segment-study`: a DICOM study as a multipart form, every file part one instance (any
/// order, several series). Query: `model`, `version`, `priority`, `timeout_ms`,
/// `segmentation_object=1` (also the DICOM Segmentation object and its TID 1500 measurement
/// report, base64), `preview=1` (each
/// segmented reference slice as the model saw it, a PNG data URL), `linear=1`
/// (interpolate between slices), `series=UID:SEQUENCE` (repeatable: a series whose headers do not
/// say). Answers JSON: the series used, each reference slice's mask as a PNG data URL (or why it
/// was not segmented), the volumes, the warnings.
async fn segment_study(
    State(rest): State<Rest>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Answer {
    let call = rest.pipeline.admit()?;
    let pairs: Vec<(String, String)> = form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .into_owned()
        .collect();
    let query: HashMap<String, String> = pairs.iter().cloned().collect();
    let get = |k: &str| query.get(k).map(String::as_str).unwrap_or_default();
    let model = call.resolve_segmenter(get("model"), get("version"))?;
    let (priority, deadline) = priority_and_deadline(&query)?;
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("multipart/form-data"));
    if !is_form {
        return Err(InferError::invalid(
            "POST /v1/segment-study takes a multipart/form-data body: one file part per DICOM \
             instance",
        )
        .into());
    }
    let limits = *rest.pipeline.limits();
    let files = uploads(&headers, body, limits.max_study_instances).await?;
    let mut named = Vec::new();
    for (key, value) in &pairs {
        if key != "series" {
            continue;
        }
        let (uid, sequence) = value.rsplit_once(':').ok_or_else(|| {
            InferError::invalid(format!(
                "series={}: expected UID:SEQUENCE",
                crate::error::echo(value)
            ))
            .quoting_caller()
        })?;
        named.push((uid.to_string(), sequence.to_string()));
    }
    let request = crate::pipeline::study::StudyRequest {
        instances: files.into_iter().map(|f| f.data.into()).collect(),
        named,
        interpolation: if matches!(get("linear"), "1" | "true") {
            crate::study::Interpolation::Linear
        } else {
            crate::study::Interpolation::Nearest
        },
        priority,
        deadline,
        segmentation_object: matches!(get("segmentation_object"), "1" | "true"),
        previews: matches!(get("preview"), "1" | "true"),
    };
    let result = call.segment_study(&model, request).await?;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let config = &model.spec.config;
    Ok(axum::Json(json!({
        "model": {
            "name": config.name,
            "version": model.spec.version,
            "sha256": model.spec.sha256,
            "clinically_trained": config.clinically_trained,
        },
        "labels": config.labels,
        "colors": match &config.task {
            crate::model::Task::Segmentation(seg) => seg.hex_colors(),
            crate::model::Task::Classification => Vec::new(),
        },
        "study_instance_uid": result.study_instance_uid,
        "series": result.channels.iter().map(|c| json!({
            "sequence": c.sequence.as_str(),
            "series_instance_uid": c.series_instance_uid,
            "because": c.because,
            "instances": c.instances.len(),
            "exact": c.exact,
        })).collect::<Vec<_>>(),
        "slices": result.slices.iter().map(|s| json!({
            "sop_instance_uid": s.sop_instance_uid,
            "position": s.position,
            "segmented": s.mask.is_some(),
            "mask_png": s.mask.as_ref().map(|m| format!("data:image/png;base64,{}", b64(&m.png))),
            "missing": s.missing.iter().map(|q| q.as_str()).collect::<Vec<_>>(),
            "preview_png": s.preview.as_ref().map(|p| format!("data:image/png;base64,{}", b64(p))),
        })).collect::<Vec<_>>(),
        "measurements": result.measurements.iter().map(|m| json!({
            "name": m.name,
            "voxels": m.voxels,
            "volume_ml": m.volume_ml,
            "bounds_min": m.bounds.map(|b| b.0),
            "bounds_max": m.bounds.map(|b| b.1),
            "first_slice": m.slices.map(|s| s.0),
            "last_slice": m.slices.map(|s| s.1),
        })).collect::<Vec<_>>(),
        "voxel_depth_mm": result.depth.map(|d| d.0),
        "segmentation_object": result.segmentation_object.as_deref().map(b64),
        "measurement_report": result.measurement_report.as_deref().map(b64),
        "warnings": result.warnings,
    }))
    .into_response())
}

/// One slice's images from a multipart form of one file part per sequence, each named by its
/// sequence (`route` names the endpoint in the error for any other body).
async fn sequence_parts(
    headers: &HeaderMap,
    body: Bytes,
    route: &str,
) -> Result<Vec<SequenceImage>, InferError> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("multipart/form-data"));
    if !is_form {
        return Err(InferError::invalid(format!(
            "POST {route} takes a multipart/form-data body for this model: one file part per \
             sequence, named by its sequence (flair, t1, t1c, t2)"
        )));
    }
    // One part per sequence; a few more, so a duplicate is named as such.
    let files = uploads(headers, body, crate::api::prescan::MAX_SLICE_IMAGES).await?;
    Ok(files
        .into_iter()
        .map(|f| SequenceImage {
            sequence: f.field,
            data: f.data.into(),
            encoding: Encoding::Detect,
        })
        .collect())
}

/// One slice's answer as `/v1/segment` (and the page) show it.
fn segment_json(
    model: &crate::pipeline::ServedModel,
    r: crate::pipeline::segment::SliceResult,
) -> serde_json::Value {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let config = &model.spec.config;
    let crate::model::Task::Segmentation(seg) = &config.task else {
        unreachable!("segment answers come from segmentation models")
    };
    let bbox = |a: &crate::postprocess::Area| match a.bbox {
        Some(b) => json!(b),
        None => serde_json::Value::Null,
    };
    let mut answer = json!({
        "model": {
            "name": config.name,
            "version": model.spec.version,
            "sha256": model.spec.sha256,
            "clinically_trained": config.clinically_trained,
        },
        "width": r.mask.width,
        "height": r.mask.height,
        "labels": config.labels,
        "colors": seg.hex_colors(),
        "mask_png": format!("data:image/png;base64,{}", b64(&r.mask.png)),
        "classes": config.labels.iter().zip(&r.mask.classes).map(|(label, a)| json!({
            "label": label, "pixels": a.pixels, "bbox": bbox(a),
        })).collect::<Vec<_>>(),
        "regions": seg.regions.iter().zip(&r.mask.regions).map(|(region, a)| json!({
            "name": region.name,
            "labels": region.label_names(&config.labels),
            "pixels": a.pixels,
            "bbox": bbox(a),
        })).collect::<Vec<_>>(),
        "batch_size": r.batch_size,
        "timing": {
            "queue_seconds": r.timing.queue.as_secs_f64(),
            "preprocess_seconds": r.timing.preprocess.as_secs_f64(),
            "inference_seconds": r.timing.inference.as_secs_f64(),
        },
        "warnings": model.warnings.iter().chain(&r.warnings).collect::<Vec<_>>(),
        "dicom": r.dicom.iter().map(|(sequence, ids)| json!({
            "sequence": sequence.as_str(),
            "study_instance_uid": ids.study_instance_uid,
            "series_instance_uid": ids.series_instance_uid,
            "sop_instance_uid": ids.sop_instance_uid,
        })).collect::<Vec<_>>(),
    });
    if let Some(p) = &r.mask.probabilities {
        let bytes: Vec<u8> = p.iter().flat_map(|v| v.to_le_bytes()).collect();
        answer["probabilities_f32le"] = json!(b64(&bytes));
    }
    answer
}

/// `POST /v1/classify`: a multipart upload (every file part is an image) or a raw image body.
/// Query: `model`, `version`, `priority` (`stat` | `routine`), `timeout_ms`, `preview=1` (also
/// return each image as the model saw it, as a PNG data URL).
async fn classify(
    State(rest): State<Rest>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    LimitedBody(body): LimitedBody,
) -> Answer {
    let call = rest.pipeline.admit()?;
    let get = |k: &str| query.get(k).map(String::as_str).unwrap_or_default();
    let model = call.resolve(get("model"), get("version"))?;
    let (priority, deadline) = priority_and_deadline(&query)?;
    if model.spec.config.input.is_multi_modal() {
        // A multi-modal classifier: one slice, one part per sequence, as `/v1/segment` takes it.
        let images = sequence_parts(&headers, body, "/v1/classify").await?;
        // The row is named by the parts it came from ("flair, t1c, t2").
        let name = images
            .iter()
            .map(|i| crate::error::echo(&i.sequence))
            .collect::<Vec<_>>()
            .join(", ");
        let request = SegmentRequest {
            slices: vec![SliceInput {
                images,
                tensor: None,
            }],
            priority,
            deadline,
            probabilities: false,
        };
        let results = call.classify_slices(&model, request).await?;
        return Ok(classify_json(&model, results, vec![name]));
    }
    let files = uploads(&headers, body, rest.pipeline.max_images_per_request()).await?;
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
        // Previews come from the same decode as the tensors: after admission, within the
        // decoding budgets.
        preview: matches!(get("preview"), "1" | "true"),
    };
    let results = call.classify(&model, request).await?;
    Ok(classify_json(&model, results, names))
}

/// A classification's answer as `/v1/classify` (and the page) show it: one row per image, named
/// by its file.
fn classify_json(
    model: &crate::pipeline::ServedModel,
    results: Vec<crate::pipeline::ImageResult>,
    names: Vec<String>,
) -> Response {
    let labels = &model.spec.config.labels;
    let rows: Vec<_> = results
        .into_iter()
        .zip(names)
        .map(|(r, file)| {
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
            if let Some(png) = &r.preview {
                row["preview"] = json!(format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(png)
                ));
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
    axum::Json(json!({ "results": rows })).into_response()
}
