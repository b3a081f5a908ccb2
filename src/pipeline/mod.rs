//! The one request path every front end shares: admit (not draining, counted for the drain) →
//! resolve the model ([`registry`]) → reserve queue places → preprocess (off the async runtime) →
//! submit to the model's batcher → await → postprocess. Front ends translate wire ↔ these types and
//! nothing else, so admission, batching, metrics and drain behave the same behind each of them.
//!
//! Admission is a value: only an [`Admitted`] call (from [`Pipeline::admit`]) can classify, so no
//! front end can skip it. What a call learns (model, images, DICOM UIDs) goes into the call's audit
//! facts, which the one call layer (`api::call`) records when the call ends.

pub mod cache;
pub mod registry;
pub mod segment;
pub mod series;
pub mod served;
pub mod study;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::Instrument;

use crate::batcher::{BatchError, Place, Reservation, Ticket};
use crate::error::{ErrorKind, InferError};
use crate::input::Encoding;
use crate::input::InputError;
use crate::input::dicom::DicomIds;
use crate::metrics::Stage;
use crate::model::task::Classification;
use crate::preprocess::DicomSource;
use crate::priority::Priority;
use crate::security::audit;
use crate::state::{InflightGuard, Phase, ServingState};
use crate::threads::ThreadCpu;
pub use registry::Registry;
pub use served::ServedModel;

/// One image of a request.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// Encoded (or raw 8-bit) image bytes: decoded and preprocessed as the model's `model.toml`
    /// says.
    Encoded {
        data: bytes::Bytes,
        encoding: Encoding,
    },
    /// A tensor already in the model's layout and size (e.g. an Open Inference Protocol FP32
    /// input): used as it is.
    Tensor(Vec<f32>),
}

impl ImageInput {
    /// Bytes of the input as sent.
    pub fn len_bytes(&self) -> usize {
        match self {
            ImageInput::Encoded { data, .. } => data.len(),
            ImageInput::Tensor(values) => values.len() * 4,
        }
    }
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
    /// Also return each image as the model saw it, as a PNG ([`ImageResult::preview`]), made
    /// from the same decode, within the same budgets.
    pub preview: bool,
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
    /// Study, series and SOP instance UIDs of a DICOM input, for the PACS to file the result.
    pub dicom: Option<DicomIds>,
    /// Caveats about this image's input (e.g. the sequence guard's), besides the model's.
    pub warnings: Vec<String>,
    /// Answered from the model's result cache (the same input was classified before).
    pub from_cache: bool,
    /// The image after colour conversion and resizing, before scaling, as a PNG (when the
    /// request asked for previews).
    pub preview: Option<Vec<u8>>,
}

/// Limits of the request path.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_images_per_request: usize,
    /// Most bytes one request's images may decode to (read from their headers before decoding).
    pub max_request_decode_bytes: u64,
    /// Most bytes being decoded at once, over all requests; an image waits for room.
    pub max_decode_in_flight_bytes: u64,
    /// A request whose images together decode to at most this many bytes is preprocessed on the
    /// async worker that received it, instead of being handed to a preprocessing thread and back
    /// (two thread wake-ups: about a third of the serving path's own CPU for one small slice).
    /// 0: every image goes to the preprocessing pool.
    pub inline_decode_bytes: u64,
    /// Most bytes of probability maps one segmentation request may ask for.
    pub max_probability_bytes: u64,
    /// Most instances one study may hold.
    pub max_study_instances: usize,
    /// Most bytes one study's instances may decode to, with the planes aligned from them.
    pub max_study_decode_bytes: u64,
}

/// An image this large (decoded) takes the one "large image" lane, so at most one such decode
/// runs at a time and the other preprocessing threads stay free for ordinary images.
const LARGE_IMAGE_BYTES: u64 = 32 << 20;

/// The shared pipeline; cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    registry: Arc<Registry>,
    state: Arc<ServingState>,
    limits: Limits,
    /// Decoding budget in KiB (semaphore permits are u32).
    decoding: Arc<Semaphore>,
    /// The decoding budget's size, in KiB: the most one request can take at once.
    decoding_capacity_kib: u32,
    large_lane: Arc<Semaphore>,
    next_request: Arc<AtomicU64>,
}

impl Pipeline {
    pub fn new(registry: Arc<Registry>, state: Arc<ServingState>, limits: Limits) -> Self {
        let kib = (limits.max_decode_in_flight_bytes.div_ceil(1024)).min(u64::from(u32::MAX >> 3));
        Pipeline {
            registry,
            state,
            limits,
            decoding: Arc::new(Semaphore::new(kib as usize)),
            decoding_capacity_kib: kib as u32,
            large_lane: Arc::new(Semaphore::new(1)),
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
        self.limits.max_images_per_request
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Holds `bytes` of the shared decoding budget (at most all of it) until the permit drops:
    /// what one request decodes and answers, so concurrent requests cannot together exceed
    /// `--max-decode-in-flight-mib`.
    async fn hold_decoding(&self, bytes: u64) -> tokio::sync::OwnedSemaphorePermit {
        let kib = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .min(self.decoding_capacity_kib);
        self.decoding
            .clone()
            .acquire_many_owned(kib)
            .await
            .expect("the decoding budget is never closed")
    }

    /// Lets a call in (counted for the drain until the [`Admitted`] drops) unless the server is
    /// warming up or draining.
    pub fn admit(&self) -> Result<Admitted, InferError> {
        let inflight = self.state.inflight().enter();
        match self.state.phase() {
            Phase::Serving => Ok(Admitted {
                pipeline: self.clone(),
                _inflight: inflight,
            }),
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
        let resolved = self.registry.resolve(model, version)?;
        let spec = &resolved.spec;
        audit::note_model(&spec.config.name, &spec.version, &spec.sha256);
        Ok(resolved)
    }
}

/// A call the pipeline let in: the only way to classify. Counted for the drain while it lives.
pub struct Admitted {
    pipeline: Pipeline,
    _inflight: InflightGuard,
}

impl Admitted {
    /// [`Pipeline::resolve`].
    pub fn resolve(&self, model: &str, version: &str) -> Result<Arc<ServedModel>, InferError> {
        self.pipeline.resolve(model, version)
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Classifies the request's images with `model`; one result per image, in order. Answers
    /// DEADLINE_EXCEEDED at the request's deadline at the latest.
    pub async fn classify(
        &self,
        model: &Arc<ServedModel>,
        request: InferRequest,
    ) -> Result<Vec<ImageResult>, InferError> {
        model.classifies()?;
        if request
            .images
            .iter()
            .any(|i| matches!(i, ImageInput::Encoded { .. }))
        {
            model.takes_single_images().inspect_err(|_| {
                audit::note_images(request.images.len());
            })?;
        }
        within(
            request.deadline,
            "deadline exceeded before the images were classified",
            self.pipeline.classify_through_cache(model, request),
        )
        .await
    }
}

impl ServedModel {
    /// Refuses a classification of a segmentation model (FAILED_PRECONDITION, naming it).
    pub fn classifies(&self) -> Result<(), InferError> {
        match &self.segmenter {
            None => Ok(()),
            Some(_) => Err(InferError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "model {} is a segmentation model: it takes {} per slice and answers masks \
                     (use Segment or POST /v1/segment)",
                    self.spec.config.name,
                    self.spec.config.input.channel_names()
                ),
            )),
        }
    }
}

impl ServedModel {
    /// Refuses single images for a multi-modal model (`[input] channels`), naming what it takes.
    pub fn takes_single_images(&self) -> Result<(), InferError> {
        let input = &self.spec.config.input;
        if !input.is_multi_modal() {
            return Ok(());
        }
        Err(InferError::invalid(format!(
            "model {} is multi-modal: it takes {} for each slice, one image per sequence; send \
             slices (gRPC ClassifyRequest.slices, one HTTP part or OIP input per sequence)",
            self.spec.config.name,
            input.channel_names()
        )))
    }
}

/// `work`, answered DEADLINE_EXCEEDED (`what`) once `deadline` passes.
async fn within<T>(
    deadline: Option<Instant>,
    what: &'static str,
    work: impl Future<Output = Result<T, InferError>>,
) -> Result<T, InferError> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, work)
            .await
            .unwrap_or_else(|_| Err(InferError::deadline(what))),
        None => work.await,
    }
}

/// Refuses work whose images would decode to more than `limit` bytes (`what`: "the request's
/// images", "the series"), before anything is reserved or decoded.
fn check_decode_budget(total: u64, limit: u64, what: &str, advice: &str) -> Result<(), InferError> {
    if total > limit {
        return Err(InferError::new(
            ErrorKind::ResourceExhausted,
            format!(
                "{what} would decode to {} MiB, over the limit of {} MiB per request; {advice}",
                total.div_ceil(1 << 20),
                limit >> 20
            ),
        ));
    }
    Ok(())
}

/// Runs `job` on the preprocessing (rayon) pool and awaits it, off the async runtime.
async fn on_rayon<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        let _ = tx.send(job());
    });
    rx.await.expect("a preprocessing job always answers")
}

impl Pipeline {
    /// The images of a request: those the model's result cache holds are answered from it, the
    /// rest reserved, decoded and run ([`Pipeline::reserve_and_classify`]).
    async fn classify_through_cache(
        &self,
        model: &Arc<ServedModel>,
        request: InferRequest,
    ) -> Result<Vec<ImageResult>, InferError> {
        let n = request.images.len();
        audit::note_images(n);
        if n == 0 {
            return Err(InferError::invalid("request has no images"));
        }
        if n > self.limits.max_images_per_request {
            return Err(InferError::invalid(format!(
                "request has {n} images, over the limit of {} per request",
                self.limits.max_images_per_request
            )));
        }
        let priority = request.priority.unwrap_or(model.settings.default_priority);
        let (first, deadline, preview) = (request.first_index, request.deadline, request.preview);
        // A cached result has no preview: a request for previews decodes every image.
        let Some(cache) = model.cache.as_ref().filter(|_| !preview) else {
            let indices: Vec<usize> = (first..first + n).collect();
            return self
                .reserve_and_classify(model, request.images, &indices, priority, deadline, preview)
                .await;
        };
        // The result cache: hits answer at once; only the misses are decoded and queued.
        let images = request.images;
        let keys = {
            let big = images.iter().map(ImageInput::len_bytes).sum::<usize>() > 1 << 20;
            let (model, images) = (model.clone(), images);
            let hash = move || {
                let cache = model.cache.as_ref().expect("checked above");
                let keys: Vec<_> = images.iter().map(|i| cache.key(i)).collect();
                (images, keys)
            };
            if big { on_rayon(hash).await } else { hash() }
        };
        let (images, keys) = keys;
        let mut results: Vec<Option<ImageResult>> = vec![None; n];
        let (mut misses, mut indices, mut miss_keys) = (Vec::new(), Vec::new(), Vec::new());
        for (offset, (image, key)) in images.into_iter().zip(keys).enumerate() {
            match cache.get(&key) {
                Some(hit) => {
                    if let Some(ids) = &hit.dicom {
                        note_dicom(ids);
                    }
                    results[offset] = Some(ImageResult {
                        index: first + offset,
                        classification: hit.classification,
                        timing: Timing::default(),
                        batch_size: 0,
                        dicom: hit.dicom,
                        warnings: hit.warnings,
                        from_cache: true,
                        preview: None,
                    });
                }
                None => {
                    misses.push(image);
                    indices.push(first + offset);
                    miss_keys.push(key);
                }
            }
        }
        if !misses.is_empty() {
            let fresh = self
                .reserve_and_classify(model, misses, &indices, priority, deadline, false)
                .await?;
            for (result, key) in fresh.into_iter().zip(miss_keys) {
                cache.insert(
                    key,
                    cache::Cached {
                        classification: result.classification.clone(),
                        dicom: result.dicom.clone(),
                        warnings: result.warnings.clone(),
                    },
                );
                let offset = result.index - first;
                results[offset] = Some(result);
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every image answered from the cache or the model"))
            .collect())
    }

    /// Reserves queue places, preprocesses and runs `images`; `indices` are their positions in
    /// the request (for results and errors).
    async fn reserve_and_classify(
        &self,
        model: &Arc<ServedModel>,
        images: Vec<ImageInput>,
        indices: &[usize],
        priority: Priority,
        deadline: Option<Instant>,
        preview: bool,
    ) -> Result<Vec<ImageResult>, InferError> {
        let n = images.len();
        // Queue places first: a full queue is refused before anything is decoded.
        let places = reserve(model, n, priority, deadline)?;
        let span = self.span(model, n, priority);
        async {
            let prepared = self
                .preprocess(model, images, indices, places, preview)
                .instrument(tracing::debug_span!(parent: &span, "preprocess", images = n as i64))
                .await?;
            self.submit_and_await(model, prepared, indices, deadline, &span)
                .await
        }
        .instrument(span.clone())
        .await
    }

    fn span(&self, model: &ServedModel, images: usize, priority: Priority) -> tracing::Span {
        tracing::info_span!(
            "classify",
            // Numbers as i64: OpenTelemetry exports an unsigned field as text.
            request = self.next_request.fetch_add(1, Ordering::Relaxed) as i64,
            model = %model.spec.config.name,
            version = %model.spec.version,
            images = images as i64,
            priority = priority.as_str(),
        )
    }

    /// Submits preprocessed images to the model's batcher in the reserved places and awaits
    /// their results, in order.
    async fn submit_and_await(
        &self,
        model: &Arc<ServedModel>,
        prepared: Vec<Prepared>,
        indices: &[usize],
        deadline: Option<Instant>,
        span: &tracing::Span,
    ) -> Result<Vec<ImageResult>, InferError> {
        let n = prepared.len();
        let mut tickets = Vec::with_capacity(n);
        let mut sources = Vec::with_capacity(n);
        for prepared in prepared {
            tickets.push(prepared.ticket);
            sources.push((prepared.dicom, prepared.took, prepared.preview));
        }
        let pending = model
            .batcher
            .submit(tickets, deadline, span)
            .map_err(|e| batch_error(e, indices[0]))?;
        let mut results = Vec::with_capacity(n);
        for (offset, (rx, (dicom, took, preview))) in pending.into_iter().zip(sources).enumerate() {
            let index = indices[offset];
            let output = rx
                .await
                .unwrap_or(Err(BatchError::Stopped))
                .map_err(|e| batch_error(e, index))?;
            let classification = model.classifier.classify(&output.values);
            model.metrics.stage(Stage::Reply, output.finished.elapsed());
            results.push(ImageResult {
                index,
                classification,
                timing: Timing {
                    queue: output.queue_time,
                    preprocess: took,
                    inference: output.inference_time,
                },
                batch_size: output.batch_size,
                warnings: dicom
                    .as_ref()
                    .map(|d| d.warnings.clone())
                    .unwrap_or_default(),
                dicom: dicom.map(|d| {
                    note_dicom(&d.ids);
                    d.ids
                }),
                from_cache: false,
                preview,
            });
        }
        model.metrics.images_done(results.len());
        Ok(results)
    }
}

/// Names a classified DICOM instance in the call's audit record.
fn note_dicom(ids: &DicomIds) {
    audit::note_dicom(
        &ids.study_instance_uid,
        &ids.series_instance_uid,
        &ids.sop_instance_uid,
    );
}

/// Queue places for `n` images: a full queue is refused before anything is decoded.
fn reserve(
    model: &ServedModel,
    n: usize,
    priority: Priority,
    deadline: Option<Instant>,
) -> Result<Reservation, InferError> {
    model
        .batcher
        .reserve(n, priority, deadline)
        .map_err(|e| match e {
            BatchError::DeadlineExceeded { .. } => {
                InferError::deadline("deadline exceeded before the request could be queued")
            }
            e => InferError::new(ErrorKind::ResourceExhausted, e.to_string()),
        })
}

/// One image, preprocessed into its row of a batch buffer.
struct Prepared {
    ticket: Ticket,
    dicom: Option<DicomSource>,
    took: Duration,
    preview: Option<Vec<u8>>,
}

/// The error for a rejected input: FAILED_PRECONDITION when the model does not accept it,
/// INVALID_ARGUMENT otherwise.
pub(crate) fn input_error(e: InputError) -> InferError {
    match e {
        InputError::NotAccepted(message) => InferError::new(ErrorKind::FailedPrecondition, message),
        e => InferError::invalid(e.to_string()),
    }
}

/// The error of image `index` from the batcher.
fn batch_error(error: BatchError, index: usize) -> InferError {
    let kind = match &error {
        BatchError::QueueFull { .. }
        | BatchError::WontFinish { .. }
        | BatchError::QueueTooLong { .. } => ErrorKind::ResourceExhausted,
        BatchError::DeadlineExceeded { .. } | BatchError::WouldMissDeadline { .. } => {
            ErrorKind::DeadlineExceeded
        }
        BatchError::Engine { .. } => ErrorKind::Internal,
        BatchError::Stopped => ErrorKind::Unavailable,
    };
    InferError::new(kind, error.public_message()).for_image(index)
}

impl Pipeline {
    /// Decodes and preprocesses the images on the rayon pool, off the async runtime, in order and
    /// as many at once as the pool has threads. What decoding may cost is bounded before it
    /// starts: each image's decoded size is read from its header; a request over its budget is
    /// refused; each image waits for room in the budget shared by all requests; large images take
    /// turns in one lane. When the caller leaves or its deadline passes, this future is dropped and
    /// no further image starts. The first bad image (by index) fails the request.
    async fn preprocess(
        &self,
        model: &Arc<ServedModel>,
        images: Vec<ImageInput>,
        indices: &[usize],
        places: Reservation,
        preview: bool,
    ) -> Result<Vec<Prepared>, InferError> {
        use futures_util::{StreamExt, TryStreamExt};
        let limits = model.preprocessor.input_limits();
        let tensor_len = model.preprocessor.image_len();
        let mut sizes = Vec::with_capacity(images.len());
        let mut dicom = false;
        for (offset, image) in images.iter().enumerate() {
            let size = match image {
                ImageInput::Encoded { data, encoding } => {
                    dicom |= encoding.is_dicom(data);
                    crate::input::decoded_size(data, *encoding, &limits)
                        .map_err(|e| input_error(e).for_image(indices[offset]))?
                }
                ImageInput::Tensor(values) if values.len() != tensor_len => {
                    let input = &model.spec.config.input;
                    return Err(InferError::invalid(format!(
                        "the tensor has {} values; model {} takes {} {}×{} with 3 channels = {tensor_len}",
                        values.len(),
                        model.spec.config.name,
                        input.layout.as_str(),
                        input.height,
                        input.width
                    ))
                    .for_image(indices[offset]));
                }
                ImageInput::Tensor(_) => 0,
            };
            sizes.push(size);
        }
        let total: u64 = sizes.iter().sum();
        check_decode_budget(
            total,
            self.limits.max_request_decode_bytes,
            "the request's images",
            "send fewer or smaller images per call",
        )?;
        // A small request (one PNG or JPEG slice) costs less to decode here than to hand to a
        // preprocessing thread and back; larger ones keep the async workers free for the network.
        // DICOM always takes the pool: its compressed transfer syntaxes (JPEG 2000, JPEG-LS) cost
        // far more per pixel than the decoded size suggests.
        let inline = !dicom && total <= self.limits.inline_decode_bytes;
        let parallel = rayon::current_num_threads().max(1);
        let places: Vec<Place> = places.into_places();
        futures_util::stream::iter(images.into_iter().zip(sizes).zip(places).enumerate())
            .map(|(offset, ((image, size), place))| {
                let (model, decoding, large_lane) = (
                    model.clone(),
                    self.decoding.clone(),
                    self.large_lane.clone(),
                );
                async move {
                    let waiting = std::time::Instant::now();
                    let (data, encoding) = match image {
                        ImageInput::Tensor(values) => {
                            return Ok(Prepared {
                                ticket: place.fill(&values),
                                dicom: None,
                                took: Duration::ZERO,
                                preview: None,
                            });
                        }
                        ImageInput::Encoded { data, encoding } => (data, encoding),
                    };
                    let kib = u32::try_from(size.div_ceil(1024)).unwrap_or(u32::MAX);
                    let room = decoding
                        .acquire_many_owned(kib)
                        .await
                        .expect("the decoding budget is never closed");
                    let lane = if size >= LARGE_IMAGE_BYTES {
                        Some(large_lane.acquire_owned().await.expect("never closed"))
                    } else {
                        None
                    };
                    // The image's row of the batch buffer being filled, claimed just before it is
                    // preprocessed so that rows follow the order images reach the queue.
                    let mut ticket = place.claim();
                    let job = move || {
                        let started = std::time::Instant::now();
                        let cpu = ThreadCpu::sampled();
                        model.metrics.stage(Stage::DecodeWait, started - waiting);
                        let result = model.preprocessor.preprocess_with(
                            &data,
                            encoding,
                            ticket.as_mut_slice(),
                            preview,
                        );
                        let (took, cpu) = (started.elapsed(), cpu.elapsed());
                        drop((room, lane));
                        result.map(|(dicom, preview)| {
                            model.metrics.preprocess_duration(took.as_secs_f64());
                            if let Some(cpu) = cpu {
                                model.metrics.preprocess_cpu(cpu);
                            }
                            Prepared {
                                ticket,
                                dicom,
                                took,
                                preview,
                            }
                        })
                    };
                    let result = if inline { job() } else { on_rayon(job).await };
                    result.map_err(|e| input_error(e).for_image(indices[offset]))
                }
            })
            .buffered(parallel)
            .try_collect()
            .await
    }
}
