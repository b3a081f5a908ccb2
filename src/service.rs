//! The `brainai.v1.TumorClassifier` gRPC front end: validates requests, preprocesses images off the
//! async runtime, submits them to the batcher and turns answers (or errors) into protobuf.
//! The one place where service errors become `tonic::Status`.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::batcher::{BatchError, Batcher};
use crate::engine::Device;
use crate::metrics as m;
use crate::model::{ModelSpec, Scaling};
use crate::pb;
use crate::preprocess::{Encoding, PreprocessError, Preprocessor};

/// What a request can fail with, before or after batching.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("the model is loading and warming up; retry shortly")]
    NotReady,
    #[error("the server is shutting down; retry on another replica")]
    ShuttingDown,
    #[error("request has no images")]
    NoImages,
    #[error("request has {count} images, over the limit of {limit} per request")]
    TooManyImages { count: usize, limit: usize },
    #[error("model {requested:?} is not served here; this server serves {served:?}")]
    UnknownModel { requested: String, served: String },
    #[error("image {index}: {error}")]
    BadImage {
        index: usize,
        error: PreprocessError,
    },
    #[error("image {index}: format RAW needs the `raw` field (width, height, channels)")]
    MissingRawGeometry { index: usize },
    #[error("image {index}: unknown image format value {value}")]
    UnknownFormat { index: usize, value: i32 },
    #[error("image {index}: {error}")]
    Batch { index: usize, error: BatchError },
    #[error("stream message {sequence} has no image")]
    StreamMessageWithoutImage { sequence: u64 },
    #[error("deadline exceeded before the images were classified")]
    DeadlineExceeded,
}

impl ServiceError {
    pub fn code(&self) -> Code {
        match self {
            ServiceError::NotReady | ServiceError::ShuttingDown => Code::Unavailable,
            ServiceError::NoImages
            | ServiceError::TooManyImages { .. }
            | ServiceError::BadImage { .. }
            | ServiceError::MissingRawGeometry { .. }
            | ServiceError::UnknownFormat { .. }
            | ServiceError::StreamMessageWithoutImage { .. } => Code::InvalidArgument,
            ServiceError::UnknownModel { .. } => Code::NotFound,
            ServiceError::DeadlineExceeded => Code::DeadlineExceeded,
            ServiceError::Batch { error, .. } => match error {
                BatchError::QueueFull { .. } => Code::ResourceExhausted,
                BatchError::DeadlineExceeded { .. } => Code::DeadlineExceeded,
                BatchError::Engine(_) => Code::Internal,
                BatchError::Stopped => Code::Unavailable,
            },
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// The model being served and what every answer says about it.
pub struct ServedModel {
    pub spec: ModelSpec,
    pub preprocessor: Preprocessor,
    pub device: Device,
    pub warnings: Vec<String>,
}

impl ServedModel {
    fn model_ref(&self) -> pb::ModelRef {
        pb::ModelRef {
            name: self.spec.name.clone(),
            version: self.spec.version.clone(),
            sha256: self.spec.sha256.clone(),
            clinically_trained: self.spec.clinically_trained,
        }
    }

    pub fn info(&self, max_batch_size: usize) -> pb::ModelInfo {
        let input = &self.spec.input;
        let (mean, std, scale, offset) = match input.scaling {
            Scaling::MeanStd { mean, std } => (mean.to_vec(), std.to_vec(), 0.0, 0.0),
            Scaling::ScaleOffset { scale, offset } => (vec![], vec![], scale, offset),
        };
        pb::ModelInfo {
            model: Some(self.model_ref()),
            labels: self.spec.labels.clone(),
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
            device: self.device.to_string(),
            max_batch_size: max_batch_size as u32,
            description: self.spec.description.clone(),
            output_tensor_name: self.spec.output_name.clone(),
            output_kind: self.spec.output_kind.as_str().into(),
            warnings: self.warnings.clone(),
        }
    }
}

/// Counts calls in progress so shutdown can wait for them.
#[derive(Default)]
pub struct Inflight {
    count: AtomicUsize,
    idle: Notify,
}

impl Inflight {
    fn enter(self: &Arc<Self>) -> InflightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InflightGuard(self.clone())
    }

    /// Calls in progress now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves when no call is in progress.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct InflightGuard(Arc<Inflight>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// State shared by every call.
pub struct Shared {
    pub model: ServedModel,
    /// Set once the instances are warm.
    pub batcher: OnceLock<Batcher>,
    pub draining: AtomicBool,
    pub inflight: Arc<Inflight>,
    pub max_images_per_request: usize,
}

/// The gRPC service; cheap to clone.
#[derive(Clone)]
pub struct ClassifierService {
    shared: Arc<Shared>,
}

impl ClassifierService {
    pub fn new(shared: Arc<Shared>) -> Self {
        ClassifierService { shared }
    }

    fn admit(&self) -> Result<(InflightGuard, Batcher), ServiceError> {
        let guard = self.shared.inflight.enter();
        if self.shared.draining.load(Ordering::SeqCst) {
            return Err(ServiceError::ShuttingDown);
        }
        let batcher = self
            .shared
            .batcher
            .get()
            .cloned()
            .ok_or(ServiceError::NotReady)?;
        Ok((guard, batcher))
    }

    fn check_model(&self, requested: &str) -> Result<(), ServiceError> {
        let served = &self.shared.model.spec.name;
        if requested.is_empty() || requested == served {
            Ok(())
        } else {
            Err(ServiceError::UnknownModel {
                requested: requested.to_string(),
                served: served.clone(),
            })
        }
    }

    /// Classifies images (numbered from `first_index` in messages); answers in the same order.
    async fn classify_images(
        &self,
        batcher: &Batcher,
        images: Vec<pb::Image>,
        first_index: usize,
        deadline: Option<Instant>,
    ) -> Result<Vec<pb::Classification>, ServiceError> {
        let ids: Vec<String> = images.iter().map(|i| i.id.clone()).collect();
        let prepared = self.preprocess(images, first_index).await?;
        let (tensors, preprocess_times): (Vec<Vec<f32>>, Vec<f64>) = prepared.into_iter().unzip();
        let pending = batcher.submit(tensors, deadline).map_err(|error| {
            if let BatchError::QueueFull { .. } = error {
                m::dropped("queue_full", ids.len());
            }
            ServiceError::Batch {
                index: first_index,
                error,
            }
        })?;
        let model = &self.shared.model;
        let mut results = Vec::with_capacity(pending.len());
        for (offset, rx) in pending.into_iter().enumerate() {
            let index = first_index + offset;
            let output = rx
                .await
                .unwrap_or(Err(BatchError::Stopped))
                .map_err(|error| ServiceError::Batch { index, error })?;
            let (best, &probability) = output
                .probabilities
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .expect("models have at least two labels");
            results.push(pb::Classification {
                image_id: ids[offset].clone(),
                index: index as u32,
                label: model.spec.labels[best].clone(),
                probability,
                probabilities: model
                    .spec
                    .labels
                    .iter()
                    .zip(&output.probabilities)
                    .map(|(label, &probability)| pb::LabelProbability {
                        label: label.clone(),
                        probability,
                    })
                    .collect(),
                model: Some(model.model_ref()),
                timing: Some(pb::Timing {
                    queue_seconds: output.queue_time.as_secs_f64(),
                    preprocess_seconds: preprocess_times[offset],
                    inference_seconds: output.inference_time.as_secs_f64(),
                }),
                batch_size: output.batch_size as u32,
                warnings: model.warnings.clone(),
            });
        }
        m::images_classified(results.len());
        Ok(results)
    }

    /// Decodes and preprocesses every image in parallel on the rayon pool, off the async runtime.
    async fn preprocess(
        &self,
        images: Vec<pb::Image>,
        first_index: usize,
    ) -> Result<Vec<(Vec<f32>, f64)>, ServiceError> {
        let mut jobs = Vec::with_capacity(images.len());
        for (offset, image) in images.into_iter().enumerate() {
            let index = first_index + offset;
            let encoding = match pb::ImageFormat::try_from(image.format) {
                Ok(pb::ImageFormat::Unspecified) => Encoding::Detect,
                Ok(pb::ImageFormat::Png) => Encoding::Png,
                Ok(pb::ImageFormat::Jpeg) => Encoding::Jpeg,
                Ok(pb::ImageFormat::Raw) => {
                    let raw = image
                        .raw
                        .ok_or(ServiceError::MissingRawGeometry { index })?;
                    Encoding::Raw {
                        width: raw.width,
                        height: raw.height,
                        channels: raw.channels,
                    }
                }
                Err(_) => {
                    return Err(ServiceError::UnknownFormat {
                        index,
                        value: image.format,
                    });
                }
            };
            jobs.push((index, image.data, encoding));
        }
        let shared = self.shared.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        rayon::spawn(move || {
            use rayon::prelude::*;
            let preprocessor = &shared.model.preprocessor;
            let results: Vec<Result<(Vec<f32>, f64), ServiceError>> = jobs
                .into_par_iter()
                .map(|(index, data, encoding)| {
                    let started = std::time::Instant::now();
                    let tensor = preprocessor
                        .preprocess_to_vec(&data, encoding)
                        .map_err(|error| ServiceError::BadImage { index, error })?;
                    let seconds = started.elapsed().as_secs_f64();
                    m::preprocess_duration(seconds);
                    Ok((tensor, seconds))
                })
                .collect();
            let _ = tx.send(results);
        });
        let results = rx.await.expect("the preprocessing job always answers");
        results.into_iter().collect()
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

fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
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

fn finish<T>(
    rpc: &'static str,
    started: Instant,
    result: Result<T, ServiceError>,
) -> Result<Response<T>, Status> {
    let code = result
        .as_ref()
        .map_or_else(ServiceError::code, |_| Code::Ok);
    m::request_done(rpc, code, started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        // Messages name the image index and the reason, never image ids or pixel data.
        tracing::debug!(rpc, code = m::code_name(code), error = %e, "request rejected");
    }
    result.map(Response::new).map_err(Status::from)
}

type ResponseStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::ClassifyStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::tumor_classifier_server::TumorClassifier for ClassifierService {
    async fn classify(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let started = Instant::now();
        let deadline = request_deadline(&request);
        let work = async {
            let (_guard, batcher) = self.admit()?;
            let request = request.into_inner();
            self.check_model(&request.model)?;
            if request.images.is_empty() {
                return Err(ServiceError::NoImages);
            }
            let limit = self.shared.max_images_per_request;
            if request.images.len() > limit {
                return Err(ServiceError::TooManyImages {
                    count: request.images.len(),
                    limit,
                });
            }
            let results = self
                .classify_images(&batcher, request.images, 0, deadline)
                .await?;
            Ok(pb::ClassifyResponse { results })
        };
        let result = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, work)
                .await
                .unwrap_or(Err(ServiceError::DeadlineExceeded)),
            None => work.await,
        };
        finish("Classify", started, result)
    }

    type ClassifyStreamStream = ResponseStream;

    async fn classify_stream(
        &self,
        request: Request<Streaming<pb::ClassifyStreamRequest>>,
    ) -> Result<Response<Self::ClassifyStreamStream>, Status> {
        let started = Instant::now();
        let (guard, batcher) = match self.admit() {
            Ok(admitted) => admitted,
            Err(e) => return finish("ClassifyStream", started, Err(e)),
        };
        let mut incoming = request.into_inner();
        let (tx, rx) = mpsc::channel(self.shared.max_images_per_request);
        let service = self.clone();
        let window = self.shared.max_images_per_request;
        tokio::spawn(async move {
            let _guard = guard;
            let mut running = FuturesUnordered::new();
            let mut sequence: u64 = 0;
            let mut open = true;
            let mut status = Code::Ok;
            while open || !running.is_empty() {
                tokio::select! {
                    message = incoming.next(), if open && running.len() < window => match message {
                        Some(Ok(message)) => {
                            let seq = sequence;
                            sequence += 1;
                            let (service, batcher) = (service.clone(), batcher.clone());
                            running.push(async move { service.classify_one(&batcher, seq, message).await });
                        }
                        Some(Err(e)) => {
                            status = e.code();
                            open = false;
                        }
                        None => open = false,
                    },
                    Some(response) = running.next() => {
                        if tx.send(Ok(response)).await.is_err() {
                            status = Code::Cancelled;
                            break;
                        }
                    }
                }
            }
            m::request_done("ClassifyStream", status, started.elapsed().as_secs_f64());
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let started = Instant::now();
        let result = self.check_model(&request.get_ref().model).map(|()| {
            let max_batch = self
                .shared
                .batcher
                .get()
                .map_or(0, |b| b.config().max_batch_size);
            self.shared.model.info(max_batch)
        });
        finish("GetModel", started, result)
    }
}

impl ClassifierService {
    /// One image of a stream: a result or an error response, never a broken stream.
    async fn classify_one(
        &self,
        batcher: &Batcher,
        sequence: u64,
        message: pb::ClassifyStreamRequest,
    ) -> pb::ClassifyStreamResponse {
        let image_id = message
            .image
            .as_ref()
            .map(|i| i.id.clone())
            .unwrap_or_default();
        let result = async {
            if self.shared.draining.load(Ordering::SeqCst) {
                return Err(ServiceError::ShuttingDown);
            }
            self.check_model(&message.model)?;
            let image = message
                .image
                .ok_or(ServiceError::StreamMessageWithoutImage { sequence })?;
            // A stream has no per-message deadline; the call's own deadline cancels the whole stream.
            let mut results = self
                .classify_images(batcher, vec![image], sequence as usize, None)
                .await?;
            Ok(results.pop().expect("one image in, one result out"))
        }
        .await;
        let outcome = match result {
            Ok(result) => pb::classify_stream_response::Outcome::Result(result),
            Err(e) => pb::classify_stream_response::Outcome::Error(pb::ImageError {
                code: e.code() as i32,
                message: e.to_string(),
            }),
        };
        pb::ClassifyStreamResponse {
            image_id,
            sequence,
            outcome: Some(outcome),
        }
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
    }

    #[test]
    fn errors_map_to_grpc_codes() {
        let bad = ServiceError::BadImage {
            index: 3,
            error: PreprocessError::Empty,
        };
        assert_eq!(bad.code(), Code::InvalidArgument);
        assert_eq!(bad.to_string(), "image 3: image data is empty");
        let full = ServiceError::Batch {
            index: 0,
            error: BatchError::QueueFull {
                queued: 4,
                capacity: 4,
            },
        };
        assert_eq!(Status::from(full).code(), Code::ResourceExhausted);
        let unknown = ServiceError::UnknownModel {
            requested: "x".into(),
            served: "y".into(),
        };
        assert_eq!(unknown.code(), Code::NotFound);
        assert_eq!(ServiceError::ShuttingDown.code(), Code::Unavailable);
    }
}
