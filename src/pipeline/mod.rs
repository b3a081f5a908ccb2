//! The one request path every front end shares: admit (not draining, counted for the drain) →
//! resolve the model ([`registry`]) → reserve queue places → preprocess (off the async runtime) →
//! submit to the model's batcher → await → postprocess. Front ends translate wire ↔ these types and
//! nothing else, so admission, batching, metrics and drain behave the same behind each of them.

pub mod registry;
pub mod served;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::batcher::{BatchError, Priority};
use crate::error::{ErrorKind, InferError};
use crate::input::Encoding;
use crate::model::task::Classification;
use crate::state::{InflightGuard, Phase, ServingState};
pub use registry::Registry;
pub use served::ServedModel;

/// One encoded image of a request.
#[derive(Debug, Clone)]
pub struct ImageInput {
    pub data: Vec<u8>,
    pub encoding: Encoding,
}

/// A classification request, transport-neutral.
#[derive(Debug)]
pub struct InferRequest {
    pub images: Vec<ImageInput>,
    /// `None`: the model's default priority.
    pub priority: Option<Priority>,
    /// Index of the first image in error messages and results (a stream's sequence number).
    pub first_index: usize,
    /// When the caller stops waiting.
    pub deadline: Option<Instant>,
}

/// Where one image's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    pub queue: Duration,
    pub preprocess: Duration,
    pub inference: Duration,
}

/// The result for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageResult {
    /// Index of the image in its request (from `first_index`).
    pub index: usize,
    pub classification: Classification,
    pub timing: Timing,
    /// Images in the batch it ran in.
    pub batch_size: usize,
}

/// The shared pipeline; cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    registry: Arc<Registry>,
    state: Arc<ServingState>,
    max_images_per_request: usize,
    next_request: Arc<AtomicU64>,
}

impl Pipeline {
    pub fn new(
        registry: Arc<Registry>,
        state: Arc<ServingState>,
        max_images_per_request: usize,
    ) -> Self {
        Pipeline {
            registry,
            state,
            max_images_per_request,
            next_request: Arc::new(AtomicU64::new(1)),
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn state(&self) -> &Arc<ServingState> {
        &self.state
    }

    pub fn max_images_per_request(&self) -> usize {
        self.max_images_per_request
    }

    /// Lets a call in (counted until the guard drops) unless the server is warming up or draining.
    pub fn admit(&self) -> Result<InflightGuard, InferError> {
        let guard = self.state.inflight().enter();
        match self.state.phase() {
            Phase::Serving => Ok(guard),
            Phase::Starting => Err(InferError::unavailable(
                "the model is loading and warming up; retry shortly",
            )),
            Phase::Draining => Err(InferError::unavailable(
                "the server is shutting down; retry on another replica",
            )),
        }
    }

    /// The model version a request names (empty name: the default model; empty version: its
    /// highest served version).
    pub fn resolve(&self, model: &str, version: &str) -> Result<Arc<ServedModel>, InferError> {
        self.registry.resolve(model, version)
    }

    /// Classifies the request's images with `model`; one result per image, in order. Answers
    /// DEADLINE_EXCEEDED at the request's deadline at the latest.
    pub async fn classify(
        &self,
        model: &Arc<ServedModel>,
        request: InferRequest,
    ) -> Result<Vec<ImageResult>, InferError> {
        match request.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, self.run(model, request))
                .await
                .unwrap_or_else(|_| {
                    Err(InferError::deadline(
                        "deadline exceeded before the images were classified",
                    ))
                }),
            None => self.run(model, request).await,
        }
    }

    async fn run(
        &self,
        model: &Arc<ServedModel>,
        request: InferRequest,
    ) -> Result<Vec<ImageResult>, InferError> {
        let n = request.images.len();
        if n == 0 {
            return Err(InferError::invalid("request has no images"));
        }
        if n > self.max_images_per_request {
            return Err(InferError::invalid(format!(
                "request has {n} images, over the limit of {} per request",
                self.max_images_per_request
            )));
        }
        let priority = request.priority.unwrap_or(model.settings.default_priority);
        // Queue places first: a full queue is refused before anything is decoded.
        let places = model
            .batcher
            .reserve(n, priority)
            .map_err(|e| InferError::new(ErrorKind::ResourceExhausted, e.to_string()))?;
        let span = tracing::info_span!(
            "classify",
            request = self.next_request.fetch_add(1, Ordering::Relaxed),
            model = %model.spec.config.name,
            version = %model.spec.version,
            images = n,
            priority = priority.as_str(),
        );
        let first = request.first_index;
        let prepared = preprocess(model.clone(), request.images, first).await?;
        let (tensors, preprocess_times): (Vec<Vec<f32>>, Vec<Duration>) =
            prepared.into_iter().unzip();
        let pending = model
            .batcher
            .submit(places, tensors, request.deadline, &span)
            .map_err(|e| batch_error(e, first))?;
        let mut results = Vec::with_capacity(n);
        for (offset, rx) in pending.into_iter().enumerate() {
            let index = first + offset;
            let output = rx
                .await
                .unwrap_or(Err(BatchError::Stopped))
                .map_err(|e| batch_error(e, index))?;
            results.push(ImageResult {
                index,
                classification: model.classifier.classify(&output.values),
                timing: Timing {
                    queue: output.queue_time,
                    preprocess: preprocess_times[offset],
                    inference: output.inference_time,
                },
                batch_size: output.batch_size,
            });
        }
        model.metrics.images_done(results.len());
        Ok(results)
    }
}

/// The error of image `index` from the batcher.
fn batch_error(error: BatchError, index: usize) -> InferError {
    let kind = match &error {
        BatchError::QueueFull { .. } => ErrorKind::ResourceExhausted,
        BatchError::DeadlineExceeded { .. } => ErrorKind::DeadlineExceeded,
        BatchError::Engine(_) => ErrorKind::Internal,
        BatchError::Stopped => ErrorKind::Unavailable,
    };
    InferError::new(kind, error.to_string()).for_image(index)
}

/// Decodes and preprocesses every image in parallel on the rayon pool, off the async runtime.
/// The first bad image (by index) fails the request.
async fn preprocess(
    model: Arc<ServedModel>,
    images: Vec<ImageInput>,
    first: usize,
) -> Result<Vec<(Vec<f32>, Duration)>, InferError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        use rayon::prelude::*;
        let results: Vec<Result<(Vec<f32>, Duration), InferError>> = images
            .into_par_iter()
            .enumerate()
            .map(|(offset, image)| {
                let started = std::time::Instant::now();
                let tensor = model
                    .preprocessor
                    .preprocess_to_vec(&image.data, image.encoding)
                    .map_err(|e| InferError::invalid(e.to_string()).for_image(first + offset))?;
                let took = started.elapsed();
                model.metrics.preprocess_duration(took.as_secs_f64());
                Ok((tensor, took))
            })
            .collect();
        let _ = tx.send(results);
    });
    let results = rx.await.expect("the preprocessing job always answers");
    results.into_iter().collect()
}
