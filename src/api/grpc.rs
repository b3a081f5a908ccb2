//! The `brainai.v1.TumorClassifier` gRPC front end: protobuf ↔ pipeline types, and nothing else.
//! Its routes are declared here ([`ROUTES`]); the call layer (`api::call`) admits and records every
//! call. The one place where [`InferError`] becomes a gRPC `Status`.

use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::routes::{Protection, Route};
use crate::error::{ErrorKind, InferError};
use crate::input::Encoding;
use crate::model::Scaling;
use crate::pb;
use crate::pipeline::registry::{ModelStatus, VersionState};
use crate::pipeline::segment::{SegmentRequest, SequenceImage, SliceInput, SliceResult};
use crate::pipeline::series::{SeriesRequest, SeriesResult};
use crate::pipeline::study::{StudyRequest, StudyResult};
use crate::pipeline::{Admitted, ImageInput, ImageResult, InferRequest, Pipeline, ServedModel};
use crate::postprocess::Area;
use crate::priority::Priority;
use crate::security::audit;
use crate::security::auth::Scope;

/// The methods of `brainai.v1.TumorClassifier`: classification needs the `infer` scope, the
/// model list and metadata `read`.
pub const ROUTES: &[Route] = &[
    Route::new(
        "/brainai.v1.TumorClassifier/Classify",
        "Classify",
        Protection::Scope(Scope::Infer),
    ),
    Route::new(
        "/brainai.v1.TumorClassifier/ClassifyStream",
        "ClassifyStream",
        Protection::Scope(Scope::Infer),
    ),
    Route::new(
        "/brainai.v1.TumorClassifier/ClassifySeries",
        "ClassifySeries",
        Protection::Scope(Scope::Infer),
    ),
    Route::new(
        "/brainai.v1.TumorClassifier/Segment",
        "Segment",
        Protection::Scope(Scope::Infer),
    ),
    Route::new(
        "/brainai.v1.TumorClassifier/SegmentStream",
        "SegmentStream",
        Protection::Scope(Scope::Infer),
    ),
    Route::new(
        "/brainai.v1.TumorClassifier/SegmentStudy",
        "SegmentStudy",
        Protection::Scope(Scope::Infer),
    ),
    Route::new(
        "/brainai.v1.TumorClassifier/ClassifySlices",
        "ClassifySlices",
        Protection::Scope(Scope::Infer),
    ),
    Route::new(
        "/brainai.v1.TumorClassifier/GetModel",
        "GetModel",
        Protection::Scope(Scope::Read),
    ),
    Route::new(
        "/brainai.v1.TumorClassifier/ListModels",
        "ListModels",
        Protection::Scope(Scope::Read),
    ),
];

/// The one mapping from the transport-neutral error kind to a gRPC status code.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Internal => Code::Internal,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
    }
}

/// A call's error as its gRPC status. Its reason (as logs may show it) goes into the call's facts,
/// for the call layer's rejection log.
impl From<InferError> for Status {
    fn from(e: InferError) -> Status {
        audit::note_error(e.log_message());
        Status::new(code(e.kind), e.message)
    }
}

/// The gRPC service; cheap to clone.
#[derive(Clone)]
pub struct ClassifierService {
    pipeline: Pipeline,
}

impl ClassifierService {
    pub fn new(pipeline: Pipeline) -> Self {
        ClassifierService { pipeline }
    }
}

/// Deadline from the `grpc-timeout` header (e.g. `100m`, `5S`), a little early: the transport
/// cancels the call at the deadline itself (answering CANCELLED), so the service answers
/// DEADLINE_EXCEEDED just before, by 10% of the timeout, at most 20 ms.
pub fn request_deadline<T>(request: &Request<T>) -> Option<Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(value)?;
    let margin = (timeout / 10).min(Duration::from_millis(20));
    Some(Instant::now() + timeout - margin)
}

pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    // ASCII only (a header value that is not ASCII never gets here, but a multi-byte last
    // character must not split a char: found by fuzzing).
    if value.len() < 2 || value.len() > 9 || !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub(crate) fn priority(value: i32) -> Result<Option<Priority>, InferError> {
    match pb::Priority::try_from(value) {
        Ok(pb::Priority::Unspecified) => Ok(None),
        Ok(pb::Priority::Stat) => Ok(Some(Priority::Stat)),
        Ok(pb::Priority::Routine) => Ok(Some(Priority::Routine)),
        Err(_) => Err(InferError::invalid(format!(
            "unknown priority value {value}"
        ))),
    }
}

pub(crate) fn image_input(image: pb::Image, index: usize) -> Result<ImageInput, InferError> {
    let encoding = match pb::ImageFormat::try_from(image.format) {
        Ok(pb::ImageFormat::Unspecified) => Encoding::Detect,
        Ok(pb::ImageFormat::Png) => Encoding::Png,
        Ok(pb::ImageFormat::Jpeg) => Encoding::Jpeg,
        Ok(pb::ImageFormat::Dicom) => Encoding::Dicom,
        Ok(pb::ImageFormat::Raw) => {
            let raw = image.raw.ok_or_else(|| {
                InferError::invalid(format!(
                    "image {index}: format RAW needs the `raw` field (width, height, channels)"
                ))
            })?;
            Encoding::Raw {
                width: raw.width,
                height: raw.height,
                channels: raw.channels,
            }
        }
        Err(_) => {
            return Err(InferError::invalid(format!(
                "image {index}: unknown image format value {}",
                image.format
            )));
        }
    };
    Ok(ImageInput::Encoded {
        data: image.data,
        encoding,
    })
}

/// The images of a request and their ids, in order.
fn image_inputs(images: Vec<pb::Image>) -> Result<(Vec<String>, Vec<ImageInput>), InferError> {
    let mut ids = Vec::with_capacity(images.len());
    let mut inputs = Vec::with_capacity(images.len());
    for (index, image) in images.into_iter().enumerate() {
        ids.push(image.id.clone());
        inputs.push(image_input(image, index)?);
    }
    Ok((ids, inputs))
}

fn model_ref(model: &ServedModel) -> pb::ModelRef {
    pb::ModelRef {
        name: model.spec.config.name.clone(),
        version: model.spec.version.clone(),
        sha256: model.spec.sha256.clone(),
        clinically_trained: model.spec.config.clinically_trained,
    }
}

fn classification(model: &ServedModel, id: String, r: ImageResult) -> pb::Classification {
    let labels = model.classifier.labels();
    let c = r.classification;
    pb::Classification {
        image_id: id,
        index: r.index as u32,
        label: labels[c.best].clone(),
        probability: c.probabilities[c.best],
        probabilities: labels
            .iter()
            .zip(&c.probabilities)
            .map(|(label, &probability)| pb::LabelProbability {
                label: label.clone(),
                probability,
            })
            .collect(),
        model: Some(model_ref(model)),
        timing: Some(pb::Timing {
            queue_seconds: r.timing.queue.as_secs_f64(),
            preprocess_seconds: r.timing.preprocess.as_secs_f64(),
            inference_seconds: r.timing.inference.as_secs_f64(),
        }),
        batch_size: r.batch_size as u32,
        from_cache: r.from_cache,
        warnings: model.warnings.iter().chain(&r.warnings).cloned().collect(),
        dicom: r.dicom.map(|ids| pb::DicomReference {
            study_instance_uid: ids.study_instance_uid,
            series_instance_uid: ids.series_instance_uid,
            sop_instance_uid: ids.sop_instance_uid,
        }),
    }
}

fn series_response(
    model: &ServedModel,
    ids: &[String],
    result: SeriesResult,
) -> pb::ClassifySeriesResponse {
    pb::ClassifySeriesResponse {
        series: Some(pb::DicomReference {
            study_instance_uid: result.ids.study_instance_uid,
            series_instance_uid: result.ids.series_instance_uid,
            sop_instance_uid: String::new(),
        }),
        slices: result
            .slices
            .into_iter()
            .enumerate()
            .map(|(k, s)| pb::SliceResult {
                slice: k as u32,
                instance_index: s.instance as u32,
                sop_instance_uid: s.sop_instance_uid,
                frame: s.frame.unwrap_or(0),
                position_mm: s.position,
                selected: s.result.is_some(),
                classification: s
                    .result
                    .map(|r| classification(model, ids[s.instance].clone(), r)),
            })
            .collect(),
        finding: Some(pb::SeriesFinding {
            label: result.finding.label,
            probability: result.finding.probability,
            aggregation: result.finding.aggregation,
            slice: result.finding.slice.map(|k| k as u32),
        }),
        model: Some(model_ref(model)),
        detected_sequence: result.detected.as_str().into(),
        sort: result.sorted_by.as_str().into(),
        warnings: model
            .warnings
            .iter()
            .chain(&result.warnings)
            .cloned()
            .collect(),
        structured_report: result.structured_report.unwrap_or_default(),
    }
}

/// A `SegmentRequest`'s slices as the pipeline takes them (and their ids).
pub fn segment_slices(
    slices: Vec<pb::SegmentSlice>,
) -> Result<(Vec<String>, Vec<SliceInput>), InferError> {
    let mut ids = Vec::with_capacity(slices.len());
    let mut inputs = Vec::with_capacity(slices.len());
    for (index, slice) in slices.into_iter().enumerate() {
        ids.push(slice.id);
        let mut images = Vec::with_capacity(slice.images.len());
        for image in slice.images {
            let Some(data) = image.image else {
                return Err(InferError::invalid(format!(
                    "slice {index}: the {} entry has no image",
                    crate::error::echo(&image.sequence)
                ))
                .quoting_caller());
            };
            let ImageInput::Encoded { data, encoding } = image_input(data, index)
                .map_err(|e| InferError::invalid(e.message.replacen("image", "slice", 1)))?
            else {
                unreachable!("image_input never makes tensors")
            };
            images.push(SequenceImage {
                sequence: image.sequence,
                data,
                encoding,
            });
        }
        inputs.push(SliceInput {
            images,
            tensor: None,
        });
    }
    Ok((ids, inputs))
}

fn bounding_box(area: &Area) -> Option<pb::BoundingBox> {
    area.bbox
        .map(|[x0, y0, x1, y1]| pb::BoundingBox { x0, y0, x1, y1 })
}

fn slice_mask(model: &ServedModel, id: String, r: SliceResult) -> pb::SliceMask {
    let config = &model.spec.config;
    let regions = match &config.task {
        crate::model::Task::Segmentation(s) => &s.regions[..],
        crate::model::Task::Classification => &[],
    };
    pb::SliceMask {
        slice_id: id,
        index: r.index as u32,
        width: r.mask.width,
        height: r.mask.height,
        classes: config
            .labels
            .iter()
            .zip(&r.mask.classes)
            .map(|(label, area)| pb::ClassArea {
                label: label.clone(),
                pixels: area.pixels,
                bbox: bounding_box(area),
            })
            .collect(),
        regions: regions
            .iter()
            .zip(&r.mask.regions)
            .map(|(region, area)| pb::RegionArea {
                name: region.name.clone(),
                labels: region.label_names(&config.labels),
                pixels: area.pixels,
                bbox: bounding_box(area),
            })
            .collect(),
        probabilities: r
            .mask
            .probabilities
            .map(|p| p.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
            .unwrap_or_default(),
        mask_png: r.mask.png,
        model: Some(model_ref(model)),
        timing: Some(pb::Timing {
            queue_seconds: r.timing.queue.as_secs_f64(),
            preprocess_seconds: r.timing.preprocess.as_secs_f64(),
            inference_seconds: r.timing.inference.as_secs_f64(),
        }),
        batch_size: r.batch_size as u32,
        warnings: model.warnings.iter().chain(&r.warnings).cloned().collect(),
        dicom: r
            .dicom
            .into_iter()
            .map(|(sequence, ids)| pb::SequenceReference {
                sequence: sequence.as_str().into(),
                reference: Some(pb::DicomReference {
                    study_instance_uid: ids.study_instance_uid,
                    series_instance_uid: ids.series_instance_uid,
                    sop_instance_uid: ids.sop_instance_uid,
                }),
            })
            .collect(),
    }
}

fn model_info(model: &ServedModel) -> pb::ModelInfo {
    let input = &model.spec.config.input;
    let (mean, std, scale, offset) = match &input.scaling {
        Scaling::MeanStd { mean, std } => (mean.clone(), std.clone(), 0.0, 0.0),
        Scaling::ScaleOffset { scale, offset } => (vec![], vec![], *scale, *offset),
    };
    let s = &model.settings;
    let config = &model.spec.config;
    let (colors, regions, mask_resize) = match &config.task {
        crate::model::Task::Segmentation(seg) => (
            seg.hex_colors(),
            seg.regions
                .iter()
                .map(|region| pb::RegionInfo {
                    name: region.name.clone(),
                    labels: region.label_names(&config.labels),
                })
                .collect(),
            seg.mask_resize.as_str().to_string(),
        ),
        crate::model::Task::Classification => (Vec::new(), Vec::new(), String::new()),
    };
    pb::ModelInfo {
        task: config.task.as_str().into(),
        channels: input
            .channels
            .iter()
            .map(|c| c.as_str().to_string())
            .collect(),
        colors,
        regions,
        mask_resize,
        model: Some(model_ref(model)),
        labels: model.spec.config.labels.clone(),
        input: Some(pb::InputSpec {
            tensor_name: input.tensor_name.clone(),
            layout: input.layout.as_str().into(),
            height: input.height,
            width: input.width,
            color: input.color.as_str().into(),
            resize_filter: input.resize_filter.as_str().into(),
            mean,
            std,
            scale,
            offset,
        }),
        device: model.device.to_string(),
        max_batch_size: s.max_batch_size as u32,
        description: model.spec.config.description.clone(),
        output_tensor_name: model.spec.config.output_name.clone(),
        output_kind: model.spec.config.output_kind.as_str().into(),
        warnings: model.warnings.clone(),
        batching: Some(pb::Batching {
            max_batch_size: s.max_batch_size as u32,
            max_queue_delay_us: s.max_queue_delay.as_micros() as u64,
            queue_capacity: s.queue_capacity as u32,
            stat_queue_capacity: s.stat_queue_capacity as u32,
            instances: s.instances as u32,
            default_priority: s.default_priority.as_str().into(),
        }),
    }
}

fn model_status(m: ModelStatus) -> pb::ModelStatus {
    pb::ModelStatus {
        name: m.name,
        versions: m
            .versions
            .into_iter()
            .map(|v| pb::VersionStatus {
                version: v.version.to_string(),
                state: match v.state {
                    VersionState::Ready => pb::VersionState::Ready,
                    VersionState::Loading => pb::VersionState::Loading,
                    VersionState::Failed => pb::VersionState::Failed,
                } as i32,
                sha256: v.sha256,
                error: v.error.unwrap_or_default(),
            })
            .collect(),
        version_policy: m.policy,
        is_default: m.is_default,
        error: m.error.unwrap_or_default(),
    }
}

/// The responses of a streaming call.
type Responses<T> = Pin<Box<dyn futures_util::Stream<Item = Result<T, Status>> + Send>>;

/// What one message of a stream becomes: its response (a result or an error response, never a
/// broken stream).
type OneMessage<Req, Resp> =
    for<'a> fn(&'a Admitted, u64, Req) -> futures_util::future::BoxFuture<'a, Resp>;

/// Serves a bidirectional stream of an admitted call: each message read is answered by `one`, up
/// to `window` at once, responses sent as they are ready. At shutdown it reads no more messages,
/// answers those in flight, then ends the stream with UNAVAILABLE so the client sends the rest
/// elsewhere; a message that cannot be read ends it with that error after the answers.
fn serve_stream<Req, Resp>(
    call: Admitted,
    mut incoming: Streaming<Req>,
    window: usize,
    one: OneMessage<Req, Resp>,
) -> Responses<Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
{
    let (tx, rx) = mpsc::channel(window);
    // The stream is served by its own task: it carries the call's facts along, and the admitted
    // call (the drain waits for it).
    let facts = audit::current();
    tokio::spawn(audit::maybe_scope(
        facts,
        tracing::Instrument::in_current_span(async move {
            let call = &call;
            let state = call.pipeline().state().clone();
            let draining = state.draining();
            tokio::pin!(draining);
            let mut running = FuturesUnordered::new();
            let mut sequence: u64 = 0;
            let mut open = true;
            let mut drained = false;
            let mut request_error: Option<Status> = None;
            while open || !running.is_empty() {
                tokio::select! {
                    biased;
                    () = &mut draining, if open => {
                        open = false;
                        drained = true;
                    }
                    Some(response) = running.next() => {
                        if tx.send(Ok(response)).await.is_err() {
                            // The client left: the call layer records CANCELLED.
                            break;
                        }
                    }
                    message = incoming.next(), if open && running.len() < window => match message {
                        Some(Ok(message)) => {
                            let seq = sequence;
                            sequence += 1;
                            running.push(one(call, seq, message));
                        }
                        Some(Err(status)) => {
                            // A message that could not be read (not protobuf, too large): answer
                            // what was read, then end the call with that error.
                            request_error = Some(crate::api::status::fix(status));
                            open = false;
                        }
                        None => open = false,
                    },
                }
            }
            if let Some(status) = request_error {
                let _ = tx.send(Err(status)).await;
            } else if drained {
                let _ = tx
                    .send(Err(Status::unavailable(format!(
                        "the server is shutting down: this stream was closed after {sequence} \
                         messages, each answered; send the rest to another replica"
                    ))))
                    .await;
            }
        }),
    ));
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl pb::tumor_classifier_server::TumorClassifier for ClassifierService {
    async fn classify(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let deadline = request_deadline(&request);
        let call = self.pipeline.admit()?;
        let request = request.into_inner();
        let model = call.resolve(&request.model, &request.version)?;
        let (ids, images) = image_inputs(request.images)?;
        let infer = InferRequest {
            images,
            priority: priority(request.priority)?,
            first_index: 0,
            deadline,
            preview: false,
        };
        let results = call.classify(&model, infer).await?;
        Ok(Response::new(pb::ClassifyResponse {
            results: results
                .into_iter()
                .zip(ids)
                .map(|(r, id)| classification(&model, id, r))
                .collect(),
        }))
    }

    async fn segment(
        &self,
        request: Request<pb::SegmentRequest>,
    ) -> Result<Response<pb::SegmentResponse>, Status> {
        let deadline = request_deadline(&request);
        let call = self.pipeline.admit()?;
        let request = request.into_inner();
        let model = call.resolve_segmenter(&request.model, &request.version)?;
        let (ids, slices) = segment_slices(request.slices)?;
        let segment = SegmentRequest {
            slices,
            priority: priority(request.priority)?,
            deadline,
            probabilities: request.probabilities,
        };
        let results = call.segment(&model, segment).await?;
        Ok(Response::new(pb::SegmentResponse {
            results: results
                .into_iter()
                .zip(ids)
                .map(|(r, id)| slice_mask(&model, id, r))
                .collect(),
            model: Some(model_ref(&model)),
            labels: model.spec.config.labels.clone(),
        }))
    }

    async fn classify_slices(
        &self,
        request: Request<pb::ClassifySlicesRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let deadline = request_deadline(&request);
        let call = self.pipeline.admit()?;
        let request = request.into_inner();
        let model = call.resolve(&request.model, &request.version)?;
        let (ids, slices) = segment_slices(request.slices)?;
        let classify = SegmentRequest {
            slices,
            priority: priority(request.priority)?,
            deadline,
            probabilities: false,
        };
        let results = call.classify_slices(&model, classify).await?;
        Ok(Response::new(pb::ClassifyResponse {
            results: results
                .into_iter()
                .zip(ids)
                .map(|(r, id)| classification(&model, id, r))
                .collect(),
        }))
    }

    async fn classify_series(
        &self,
        request: Request<pb::ClassifySeriesRequest>,
    ) -> Result<Response<pb::ClassifySeriesResponse>, Status> {
        let deadline = request_deadline(&request);
        let call = self.pipeline.admit()?;
        let request = request.into_inner();
        let model = call.resolve(&request.model, &request.version)?;
        let (ids, images) = image_inputs(request.instances)?;
        let instances = images
            .into_iter()
            .map(|image| match image {
                ImageInput::Encoded { data, encoding } => (data, encoding),
                ImageInput::Tensor(_) => unreachable!("image_input never makes tensors"),
            })
            .collect();
        let series = SeriesRequest {
            instances,
            priority: priority(request.priority)?,
            deadline,
            structured_report: request.structured_report,
            max_instances: self.pipeline.max_images_per_request(),
        };
        let result = call.classify_series(&model, series).await?;
        Ok(Response::new(series_response(&model, &ids, result)))
    }

    async fn segment_study(
        &self,
        request: Request<Streaming<pb::SegmentStudyRequest>>,
    ) -> Result<Response<pb::SegmentStudyResponse>, Status> {
        let deadline = request_deadline(&request);
        let call = self.pipeline.admit()?;
        let mut incoming = request.into_inner();
        let limits = self.pipeline.limits();
        let mut settings: Option<pb::StudySettings> = None;
        let mut study = StudyRequest {
            deadline,
            ..Default::default()
        };
        let mut bytes = 0u64;
        // Read the stream, refusing at the first message over a limit (nothing more is read).
        while let Some(message) = incoming.message().await.map_err(crate::api::status::fix)? {
            match message.part {
                Some(pb::segment_study_request::Part::Settings(s)) => {
                    if settings.is_some() || !study.instances.is_empty() {
                        return Err(InferError::invalid(
                            "settings come once, before the first instance",
                        )
                        .into());
                    }
                    settings = Some(s);
                }
                Some(pb::segment_study_request::Part::Instance(data)) => {
                    let index = study.instances.len();
                    if index >= limits.max_study_instances {
                        return Err(InferError::invalid(format!(
                            "instance {index}: the study has more than {} instances, the limit \
                             per call",
                            limits.max_study_instances
                        ))
                        .into());
                    }
                    bytes = bytes.saturating_add(data.len() as u64);
                    if bytes > limits.max_study_decode_bytes {
                        return Err(InferError::new(
                            ErrorKind::ResourceExhausted,
                            format!(
                                "instance {index}: the study's instances take more than {} MiB, \
                                 the limit per call",
                                limits.max_study_decode_bytes >> 20
                            ),
                        )
                        .into());
                    }
                    study.instances.push(data);
                }
                Some(pb::segment_study_request::Part::Series(named)) => {
                    if study.named.len() >= MAX_NAMED_SERIES {
                        return Err(InferError::invalid(format!(
                            "more than {MAX_NAMED_SERIES} series named"
                        ))
                        .into());
                    }
                    study
                        .named
                        .push((named.series_instance_uid, named.sequence));
                }
                None => {
                    return Err(InferError::invalid("a study message with no part").into());
                }
            }
        }
        let settings = settings.unwrap_or_default();
        let model = call.resolve_segmenter(&settings.model, &settings.version)?;
        study.priority = priority(settings.priority)?;
        study.segmentation_object = settings.segmentation_object;
        study.previews = settings.previews;
        if settings.linear_between_slices {
            study.interpolation = crate::study::Interpolation::Linear;
        }
        let result = call.segment_study(&model, study).await?;
        Ok(Response::new(study_response(&model, result)))
    }

    type ClassifyStreamStream = Responses<pb::ClassifyStreamResponse>;

    async fn classify_stream(
        &self,
        request: Request<Streaming<pb::ClassifyStreamRequest>>,
    ) -> Result<Response<Self::ClassifyStreamStream>, Status> {
        let call = self.pipeline.admit()?;
        let window = self.pipeline.max_images_per_request();
        Ok(Response::new(serve_stream(
            call,
            request.into_inner(),
            window,
            |call, seq, message| Box::pin(classify_one(call, seq, message)),
        )))
    }

    type SegmentStreamStream = Responses<pb::SegmentStreamResponse>;

    async fn segment_stream(
        &self,
        request: Request<Streaming<pb::SegmentStreamRequest>>,
    ) -> Result<Response<Self::SegmentStreamStream>, Status> {
        let call = self.pipeline.admit()?;
        let window = self.pipeline.max_images_per_request();
        Ok(Response::new(serve_stream(
            call,
            request.into_inner(),
            window,
            |call, seq, message| Box::pin(segment_one(call, seq, message)),
        )))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let request = request.get_ref();
        let model = self.pipeline.resolve(&request.model, &request.version)?;
        Ok(Response::new(model_info(&model)))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let registry = self.pipeline.registry();
        Ok(Response::new(pb::ListModelsResponse {
            models: registry.list().into_iter().map(model_status).collect(),
            default_model: registry.default_model().unwrap_or_default(),
        }))
    }
}

/// One image of a stream: a result or an error response, never a broken stream.
async fn classify_one(
    call: &Admitted,
    sequence: u64,
    message: pb::ClassifyStreamRequest,
) -> pb::ClassifyStreamResponse {
    let image_id = message
        .image
        .as_ref()
        .map(|i| i.id.clone())
        .unwrap_or_default();
    let index = sequence as usize;
    let result = async {
        if call.pipeline().state().is_draining() {
            return Err(InferError::unavailable(
                "the server is shutting down; retry on another replica",
            ));
        }
        let model = call.resolve(&message.model, &message.version)?;
        let image = message.image.ok_or_else(|| {
            InferError::invalid(format!("stream message {sequence} has no image"))
        })?;
        let infer = InferRequest {
            images: vec![image_input(image, index)?],
            priority: priority(message.priority)?,
            first_index: index,
            // A stream has no per-message deadline; the call's own deadline cancels the stream.
            deadline: None,
            preview: false,
        };
        let mut results = call.classify(&model, infer).await?;
        Ok(classification(
            &model,
            image_id.clone(),
            results.pop().expect("one image in, one result out"),
        ))
    }
    .await;
    let outcome = match result {
        Ok(result) => pb::classify_stream_response::Outcome::Result(result),
        Err(e) => pb::classify_stream_response::Outcome::Error(pb::ImageError {
            code: code(e.kind) as i32,
            message: e.message,
        }),
    };
    pb::ClassifyStreamResponse {
        image_id,
        sequence,
        outcome: Some(outcome),
    }
}

/// Most series one SegmentStudy call may name.
const MAX_NAMED_SERIES: usize = 64;

/// A study's answer on the wire.
fn study_response(model: &ServedModel, r: StudyResult) -> pb::SegmentStudyResponse {
    let seconds = |d: Duration| d.as_secs_f64();
    pb::SegmentStudyResponse {
        model: Some(model_ref(model)),
        study_instance_uid: r.study_instance_uid,
        series: r
            .channels
            .iter()
            .map(|c| pb::StudySeries {
                sequence: c.sequence.as_str().into(),
                series_instance_uid: c.series_instance_uid.clone(),
                because: c.because.clone(),
                instances: c.instances.len() as u32,
                exact: c.exact,
            })
            .collect(),
        slices: r
            .slices
            .into_iter()
            .map(|s| pb::StudySliceMask {
                sop_instance_uid: s.sop_instance_uid,
                position: s.position,
                segmented: s.mask.is_some(),
                mask_png: s.mask.map(|m| m.png).unwrap_or_default(),
                missing: s.missing.iter().map(|q| q.as_str().into()).collect(),
                preview_png: s.preview.unwrap_or_default(),
            })
            .collect(),
        measurements: r
            .measurements
            .into_iter()
            .map(|m| pb::StudyMeasurement {
                name: m.name,
                voxels: m.voxels,
                volume_ml: m.volume_ml,
                bounds_min: m.bounds.map(|b| b.0.to_vec()).unwrap_or_default(),
                bounds_max: m.bounds.map(|b| b.1.to_vec()).unwrap_or_default(),
                first_slice: m.slices.map(|s| s.0 as u32),
                last_slice: m.slices.map(|s| s.1 as u32),
            })
            .collect(),
        segmentation_object: r.segmentation_object.unwrap_or_default(),
        measurement_report: r.measurement_report.unwrap_or_default(),
        warnings: r.warnings,
        timing: Some(pb::StudyTiming {
            headers_seconds: seconds(r.timing.headers),
            decode_seconds: seconds(r.timing.decode),
            align_seconds: seconds(r.timing.align),
            queue_seconds: seconds(r.timing.queue),
            inference_seconds: seconds(r.timing.inference),
            segment_seconds: seconds(r.timing.segment),
            segmentation_object_seconds: seconds(r.timing.segmentation_object),
        }),
        voxel_depth_mm: r.depth.map_or(0.0, |d| d.0),
        voxel_depth_from: match r.depth {
            None => "",
            Some((_, crate::study::DepthFrom::Positions)) => "positions",
            Some((_, crate::study::DepthFrom::SliceThickness)) => "slice_thickness",
        }
        .into(),
        labels: model.spec.config.labels.clone(),
    }
}

/// One slice of a stream: a mask or an error response, never a broken stream.
async fn segment_one(
    call: &Admitted,
    sequence: u64,
    message: pb::SegmentStreamRequest,
) -> pb::SegmentStreamResponse {
    let slice_id = message.id.clone();
    let index = sequence as usize;
    let result = async {
        if call.pipeline().state().is_draining() {
            return Err(InferError::unavailable(
                "the server is shutting down; retry on another replica",
            ));
        }
        let model = call.resolve_segmenter(&message.model, &message.version)?;
        let mut images = Vec::new();
        for (sequence, image) in [
            ("FLAIR", message.flair),
            ("T1", message.t1),
            ("T1c", message.t1c),
            ("T2", message.t2),
        ] {
            let Some(image) = image else { continue };
            let ImageInput::Encoded { data, encoding } = image_input(image, index)
                .map_err(|e| InferError::invalid(e.message.replacen("image", "slice", 1)))?
            else {
                unreachable!("image_input never makes tensors")
            };
            images.push(SequenceImage {
                sequence: sequence.into(),
                data,
                encoding,
            });
        }
        let request = SegmentRequest {
            slices: vec![SliceInput {
                images,
                tensor: None,
            }],
            priority: priority(message.priority)?,
            // A stream has no per-message deadline; the call's own deadline cancels the stream.
            deadline: None,
            probabilities: message.probabilities,
        };
        let mut result = call
            .segment(&model, request)
            .await
            .map_err(|e| e.renumber_slice(index))?
            .pop()
            .expect("one slice in, one result out");
        result.index = index;
        Ok(slice_mask(&model, slice_id.clone(), result))
    }
    .await;
    let outcome = match result {
        Ok(result) => pb::segment_stream_response::Outcome::Result(result),
        Err(e) => pb::segment_stream_response::Outcome::Error(pb::ImageError {
            code: code(e.kind) as i32,
            message: e.message,
        }),
    };
    pb::SegmentStreamResponse {
        slice_id,
        sequence,
        outcome: Some(outcome),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
        assert_eq!(
            parse_grpc_timeout("3\u{7aa}"),
            None,
            "fuzz/regressions/grpc_timeout"
        );
    }

    #[test]
    fn an_error_becomes_its_status_with_its_message() {
        let bad = InferError::invalid("image data is empty").for_image(3);
        let status = Status::from(bad);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "image 3: image data is empty");
    }
}
