//! Segmentation through the one pipeline: each slice is a set of images keyed by MR sequence
//! (`[input] channels`), put in the model's channel order, decoded and stacked into one row of a
//! batch buffer (off the async runtime), run by the model's batcher like any classification, and
//! its per-pixel output mapped back to the slice's geometry ([`crate::postprocess`], also off the
//! async runtime). Same admission, queue places, budgets, deadline and audit facts as `classify`.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use super::{
    Admitted, ImageResult, Pipeline, ServedModel, Timing, batch_error, check_decode_budget,
    input_error, note_dicom, on_rayon, reserve, within,
};
use crate::batcher::{BatchError, Ticket};
use crate::error::{ErrorKind, InferError, echo};
use crate::input::Encoding;
use crate::input::dicom::DicomIds;
use crate::input::sequence::Sequence;
use crate::metrics::Stage;
use crate::model::InputSpec;
use crate::model::task::Classification;
use crate::postprocess::{Mask, Segmenter};
use crate::priority::Priority;
use crate::security::audit;

/// One image of a slice, named by its MR sequence as the caller wrote it.
#[derive(Debug, Clone)]
pub struct SequenceImage {
    /// `FLAIR`, `T1`, `T1c` (or `T1ce`, `T1Gd`) or `T2`, any case.
    pub sequence: String,
    pub data: bytes::Bytes,
    pub encoding: Encoding,
}

/// One slice: one image per sequence the model takes, or (`tensor`) the stacked input tensor
/// in the model's layout and size, used as it is (an Open Inference Protocol FP32 input).
#[derive(Debug, Clone, Default)]
pub struct SliceInput {
    pub images: Vec<SequenceImage>,
    pub tensor: Option<Vec<f32>>,
}

/// A segmentation request, transport-neutral.
#[derive(Debug, Default)]
pub struct SegmentRequest {
    pub slices: Vec<SliceInput>,
    /// `None`: the model's default priority.
    pub priority: Option<Priority>,
    /// When the caller stops waiting.
    pub deadline: Option<Instant>,
    /// Also return each slice's class probability maps (bounded by `--max-probability-mib`).
    pub probabilities: bool,
}

/// The answer for one slice.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceResult {
    /// Index of the slice in its request.
    pub index: usize,
    pub mask: Mask,
    pub timing: Timing,
    /// Slices in the batch it ran in.
    pub batch_size: usize,
    /// The DICOM channels' identifiers, by sequence.
    pub dicom: Vec<(Sequence, DicomIds)>,
    /// Caveats about this slice's input (e.g. the sequence guard's), besides the model's.
    pub warnings: Vec<String>,
}

/// A sequence name as callers write it (case-insensitive; `T1ce`/`T1Gd` are T1c, as BraTS names
/// them).
pub fn parse_sequence(name: &str) -> Option<Sequence> {
    match name.trim().to_ascii_lowercase().as_str() {
        "flair" => Some(Sequence::Flair),
        "t1" => Some(Sequence::T1),
        "t1c" | "t1ce" | "t1gd" | "t1+c" => Some(Sequence::T1c),
        "t2" => Some(Sequence::T2),
        _ => None,
    }
}

impl Admitted {
    /// The model a segmentation request names; one that names none gets the default model if it
    /// segments, else the one segmentation model served (if there is exactly one).
    pub fn resolve_segmenter(
        &self,
        model: &str,
        version: &str,
    ) -> Result<Arc<ServedModel>, InferError> {
        if !model.is_empty() {
            return self.resolve(model, version);
        }
        if let Ok(default) = self.pipeline().registry().resolve("", version)
            && default.segmenter.is_some()
        {
            return self.resolve("", version);
        }
        let mut names: Vec<String> = self
            .pipeline()
            .registry()
            .served()
            .iter()
            .filter(|m| m.segmenter.is_some())
            .map(|m| m.spec.config.name.clone())
            .collect();
        names.sort();
        names.dedup();
        match &names[..] {
            [one] => self.resolve(one, version),
            [] => Err(InferError::new(
                ErrorKind::FailedPrecondition,
                "this server serves no segmentation model",
            )),
            several => Err(InferError::invalid(format!(
                "the request names no model and this server serves several segmentation models \
                 ({}); set `model`",
                several.join(", ")
            ))),
        }
    }

    /// Segments the request's slices with `model`; one result per slice, in order. Answers
    /// DEADLINE_EXCEEDED at the request's deadline at the latest.
    pub async fn segment(
        &self,
        model: &Arc<ServedModel>,
        request: SegmentRequest,
    ) -> Result<Vec<SliceResult>, InferError> {
        within(
            request.deadline,
            "deadline exceeded before the slices were segmented",
            self.pipeline().segment(model, request),
        )
        .await
    }

    /// Classifies the request's slices with multi-modal classifier `model` (`[input] channels`):
    /// one result per slice, in order, as [`Admitted::classify`] answers images.
    pub async fn classify_slices(
        &self,
        model: &Arc<ServedModel>,
        request: SegmentRequest,
    ) -> Result<Vec<ImageResult>, InferError> {
        model.classifies()?;
        within(
            request.deadline,
            "deadline exceeded before the slices were classified",
            self.pipeline().classify_slices(model, request),
        )
        .await
    }
}

/// A slice as the request gave it: its images in channel order, or the stacked tensor; or (a
/// study) its channels' gray levels, already at the reference slice's geometry.
pub(super) enum SliceSource {
    Images(Vec<(bytes::Bytes, Encoding)>),
    Tensor(Vec<f32>),
    Levels {
        planes: Vec<Vec<f32>>,
        width: u32,
        height: u32,
    },
}

/// One slice ready to run: its row of a batch buffer and what preprocessing learned.
struct PreparedSlice {
    ticket: Ticket,
    width: u32,
    height: u32,
    dicom: Vec<(Sequence, crate::preprocess::DicomSource)>,
    took: Duration,
}

/// What a slice's output row becomes.
#[derive(Clone)]
pub(super) enum SliceTask {
    /// A mask (and, when asked, its probability maps).
    Segment {
        segmenter: Segmenter,
        probabilities: bool,
    },
    /// One classification of the slice's stacked channels (a multi-modal classifier).
    Classify,
}

impl SliceTask {
    /// The most an answer holds for a slice of `width × height`.
    fn answer_bytes(&self, width: u32, height: u32) -> u64 {
        match self {
            SliceTask::Segment {
                segmenter,
                probabilities,
            } => segmenter.answer_bytes(width, height, *probabilities),
            SliceTask::Classify => 0,
        }
    }
}

/// What one slice's output row became.
pub(super) enum SliceAnswer {
    Mask(Mask),
    Classification(Classification),
}

/// One slice, run: its answer and where its time went.
pub(super) struct SliceRun {
    pub(super) index: usize,
    pub(super) answer: SliceAnswer,
    pub(super) timing: Timing,
    batch_size: usize,
    dicom: Vec<(Sequence, DicomIds)>,
    warnings: Vec<String>,
}

impl Pipeline {
    async fn segment(
        &self,
        model: &Arc<ServedModel>,
        request: SegmentRequest,
    ) -> Result<Vec<SliceResult>, InferError> {
        let Some(segmenter) = model.segmenter.clone() else {
            audit::note_images(images_sent(&request.slices));
            return Err(InferError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "model {} is a classification model: it has no masks (use Classify; ListModels \
                     and GetModel name each model's task)",
                    model.spec.config.name
                ),
            ));
        };
        let task = SliceTask::Segment {
            segmenter,
            probabilities: request.probabilities,
        };
        let runs = self.run_slices(model, request, task).await?;
        Ok(runs
            .into_iter()
            .map(|run| SliceResult {
                index: run.index,
                mask: match run.answer {
                    SliceAnswer::Mask(mask) => mask,
                    SliceAnswer::Classification(_) => unreachable!("a segmentation task"),
                },
                timing: run.timing,
                batch_size: run.batch_size,
                dicom: run.dicom,
                warnings: run.warnings,
            })
            .collect())
    }

    /// A multi-modal classifier's request: one classification per slice (its channels stacked).
    async fn classify_slices(
        &self,
        model: &Arc<ServedModel>,
        request: SegmentRequest,
    ) -> Result<Vec<ImageResult>, InferError> {
        if request.probabilities {
            audit::note_images(images_sent(&request.slices));
            return Err(InferError::invalid(
                "probability maps are a segmentation model's answer; a classifier answers one \
                 probability per label",
            ));
        }
        let runs = self.run_slices(model, request, SliceTask::Classify).await?;
        Ok(runs
            .into_iter()
            .map(|run| ImageResult {
                index: run.index,
                classification: match run.answer {
                    SliceAnswer::Classification(c) => c,
                    SliceAnswer::Mask(_) => unreachable!("a classification task"),
                },
                timing: run.timing,
                batch_size: run.batch_size,
                // A result names one instance: the reference (first) channel's.
                dicom: run.dicom.into_iter().next().map(|(_, ids)| ids),
                warnings: run.warnings,
                from_cache: false,
                preview: None,
            })
            .collect())
    }

    /// Runs the request's slices through `model`'s batcher: each slice's images in channel
    /// order, decoded and stacked into its row (off the async runtime), its output row made into
    /// `task`'s answer (also off the async runtime). The same admission facts, budgets, queue
    /// places and deadline as a classification of images.
    async fn run_slices(
        &self,
        model: &Arc<ServedModel>,
        request: SegmentRequest,
        task: SliceTask,
    ) -> Result<Vec<SliceRun>, InferError> {
        // Images as sent: a slice's channel images, or its one stacked tensor.
        audit::note_images(images_sent(&request.slices));
        let n = request.slices.len();
        if n == 0 {
            return Err(InferError::invalid("request has no slices"));
        }
        if n > self.limits.max_images_per_request {
            return Err(InferError::invalid(format!(
                "request has {n} slices, over the limit of {} per request",
                self.limits.max_images_per_request
            )));
        }
        let (slices, total) = self.sources(model, request.slices, &task)?;
        check_decode_budget(
            total,
            self.limits.max_request_decode_bytes,
            "the request's slices (their images and answers)",
            "send fewer or smaller slices per call",
        )?;
        self.run_sources(
            model,
            slices,
            total,
            request.priority,
            request.deadline,
            task,
        )
        .await
    }

    /// Each slice's images in the model's channel order (or its tensor), and the bytes they
    /// decode to and their answers take, from their headers.
    fn sources(
        &self,
        model: &Arc<ServedModel>,
        request: Vec<SliceInput>,
        task: &SliceTask,
    ) -> Result<(Vec<SliceSource>, u64), InferError> {
        let config = &model.spec.config;
        let limits = model.preprocessor.input_limits();
        let mut slices = Vec::with_capacity(request.len());
        let mut total = 0u64;
        for (index, slice) in request.into_iter().enumerate() {
            if let Some(tensor) = slice.tensor {
                let want = config.input.image_len();
                if tensor.len() != want || !slice.images.is_empty() {
                    return Err(InferError::invalid(format!(
                        "slice {index}: the tensor has {} values; model {} takes {want}",
                        tensor.len(),
                        config.name
                    )));
                }
                total = total
                    .saturating_add(task.answer_bytes(config.input.width, config.input.height));
                slices.push(SliceSource::Tensor(tensor));
                continue;
            }
            let ordered = in_channel_order(&config.input, &config.name, slice)
                .map_err(|e| e.for_slice(index))?;
            for (c, (data, encoding)) in ordered.iter().enumerate() {
                let size = crate::input::decoded_size(data, *encoding, &limits)
                    .map_err(|e| input_error(e).for_channel(index, config.input.channels[c]))?;
                // The answer holds at most a label map and probabilities per decoded pixel.
                let answer = if c == 0 {
                    task.answer_bytes(size.min(u64::from(u32::MAX)) as u32, 1)
                } else {
                    0
                };
                total = total.saturating_add(size).saturating_add(answer);
            }
            slices.push(SliceSource::Images(ordered));
        }
        Ok((slices, total))
    }

    /// Runs slices made ready: queue places, the shared decoding budget (`total` bytes held
    /// until they are answered), preprocessing off the runtime, the batcher, the answers.
    pub(super) async fn run_sources(
        &self,
        model: &Arc<ServedModel>,
        slices: Vec<SliceSource>,
        total: u64,
        priority: Option<Priority>,
        deadline: Option<Instant>,
        task: SliceTask,
    ) -> Result<Vec<SliceRun>, InferError> {
        let config = &model.spec.config;
        let n = slices.len();
        let priority = priority.unwrap_or(model.settings.default_priority);
        let places = reserve(model, n, priority, deadline)?;
        // What this request decodes and answers, held in the shared budget until it answers.
        let _room = self.hold_decoding(total).await;
        let span = match &task {
            SliceTask::Segment { .. } => tracing::info_span!(
                "segment",
                model = %config.name,
                version = %model.spec.version,
                slices = n as i64,
                priority = priority.as_str(),
            ),
            SliceTask::Classify => tracing::info_span!(
                "classify",
                model = %config.name,
                version = %model.spec.version,
                images = n as i64,
                priority = priority.as_str(),
            ),
        };
        async {
            // Decode and stack each slice into its row, in order, as many at once as the pool has
            // threads; the first bad slice fails the request.
            use futures_util::{StreamExt, TryStreamExt};
            let parallel = rayon::current_num_threads().max(1);
            let prepared: Vec<PreparedSlice> =
                futures_util::stream::iter(slices.into_iter().zip(places.into_places()).enumerate())
                    .map(|(index, (source, place))| {
                        let model = model.clone();
                        async move {
                            let images = match source {
                                SliceSource::Tensor(values) => {
                                    let input = &model.spec.config.input;
                                    return Ok(PreparedSlice {
                                        ticket: place.fill(&values),
                                        width: input.width,
                                        height: input.height,
                                        dicom: Vec::new(),
                                        took: Duration::ZERO,
                                    });
                                }
                                SliceSource::Levels {
                                    planes,
                                    width,
                                    height,
                                } => {
                                    let mut ticket = place.claim();
                                    let job = move || {
                                        let started = std::time::Instant::now();
                                        model.preprocessor.preprocess_levels(
                                            &planes,
                                            width,
                                            height,
                                            ticket.as_mut_slice(),
                                        );
                                        let took = started.elapsed();
                                        model.metrics.preprocess_duration(took.as_secs_f64());
                                        PreparedSlice {
                                            ticket,
                                            width,
                                            height,
                                            dicom: Vec::new(),
                                            took,
                                        }
                                    };
                                    return Ok(on_rayon(job).await);
                                }
                                SliceSource::Images(images) => images,
                            };
                            let mut ticket = place.claim();
                            let sequences = model.spec.config.input.channels.clone();
                            let job = move || {
                                let started = std::time::Instant::now();
                                let borrowed: Vec<(&[u8], Encoding)> =
                                    images.iter().map(|(d, e)| (&d[..], *e)).collect();
                                let result = model
                                    .preprocessor
                                    .preprocess_channels(&borrowed, ticket.as_mut_slice());
                                let took = started.elapsed();
                                model.metrics.preprocess_duration(took.as_secs_f64());
                                result.map(|source| PreparedSlice {
                                    ticket,
                                    width: source.width,
                                    height: source.height,
                                    dicom: source.dicom,
                                    took,
                                })
                            };
                            on_rayon(job).await.map_err(|(c, e)| {
                                input_error(e).for_channel(index, sequences[c])
                            })
                        }
                    })
                    .buffered(parallel)
                    .try_collect()
                    .instrument(tracing::debug_span!("preprocess", slices = n as i64))
                    .await?;
            if let SliceTask::Segment {
                probabilities: true,
                ..
            } = &task
            {
                let bytes: u64 = prepared
                    .iter()
                    .map(|p| {
                        u64::from(p.width) * u64::from(p.height) * 4 * config.labels.len() as u64
                    })
                    .sum();
                if bytes > self.limits.max_probability_bytes {
                    return Err(InferError::invalid(format!(
                        "the probability maps of this request would take {} MiB, over the limit of \
                         {} MiB per request; ask for them for fewer slices per call, or for masks only",
                        bytes.div_ceil(1 << 20),
                        self.limits.max_probability_bytes >> 20
                    )));
                }
            }
            let mut tickets = Vec::with_capacity(n);
            let mut sources = Vec::with_capacity(n);
            for p in prepared {
                tickets.push(p.ticket);
                sources.push((p.width, p.height, p.dicom, p.took));
            }
            let pending = model
                .batcher
                .submit(tickets, deadline, &tracing::Span::current())
                .map_err(|e| batch_error(e, 0).relabel_slice())?;
            let mut runs = Vec::with_capacity(n);
            for (index, (rx, (width, height, dicom, took))) in
                pending.into_iter().zip(sources).enumerate()
            {
                let output = rx
                    .await
                    .unwrap_or(Err(BatchError::Stopped))
                    .map_err(|e| batch_error(e, index).relabel_slice())?;
                let finished = output.finished;
                let answer = match &task {
                    SliceTask::Segment {
                        segmenter,
                        probabilities,
                    } => {
                        let segmenter = segmenter.clone();
                        let probabilities = *probabilities;
                        let values = output.values;
                        SliceAnswer::Mask(
                            on_rayon(move || {
                                segmenter.segment(&values, width, height, probabilities)
                            })
                            .await,
                        )
                    }
                    SliceTask::Classify => {
                        SliceAnswer::Classification(model.classifier.classify(&output.values))
                    }
                };
                model.metrics.stage(Stage::Reply, finished.elapsed());
                let mut warnings = Vec::new();
                let mut ids = Vec::new();
                for (sequence, source) in dicom {
                    note_dicom(&source.ids);
                    warnings.extend(
                        source
                            .warnings
                            .into_iter()
                            .map(|w| format!("{}: {w}", sequence.as_str())),
                    );
                    ids.push((sequence, source.ids));
                }
                runs.push(SliceRun {
                    index,
                    answer,
                    timing: Timing {
                        queue: output.queue_time,
                        preprocess: took,
                        inference: output.inference_time,
                    },
                    batch_size: output.batch_size,
                    dicom: ids,
                    warnings,
                });
            }
            model.metrics.images_done(runs.len());
            Ok(runs)
        }
        .instrument(span)
        .await
    }
}

/// Images a request sent, for its audit record: a slice's channel images, or its one tensor.
fn images_sent(slices: &[SliceInput]) -> usize {
    slices
        .iter()
        .map(|s| s.images.len().max(usize::from(s.tensor.is_some())))
        .sum()
}

/// A slice's images in the channel order of model `name`'s `input`; refuses an unknown,
/// duplicated, missing or extra sequence, naming it.
pub fn in_channel_order(
    input: &InputSpec,
    name: &str,
    slice: SliceInput,
) -> Result<Vec<(bytes::Bytes, Encoding)>, InferError> {
    let mut ordered: Vec<Option<(bytes::Bytes, Encoding)>> = vec![None; input.channels.len()];
    for image in slice.images {
        let sequence = parse_sequence(&image.sequence).ok_or_else(|| {
            InferError::invalid(format!(
                "unknown sequence {}: use FLAIR, T1, T1c or T2",
                echo(&image.sequence)
            ))
            .quoting_caller()
        })?;
        let Some(c) = input.channels.iter().position(|&s| s == sequence) else {
            return Err(InferError::invalid(format!(
                "a {} image was given, but model {} takes {} only",
                sequence.as_str(),
                name,
                input.channel_names()
            )));
        };
        if ordered[c].is_some() {
            return Err(InferError::invalid(format!(
                "the {} image is given twice",
                sequence.as_str()
            )));
        }
        ordered[c] = Some((image.data, image.encoding));
    }
    let missing: Vec<&str> = input
        .channels
        .iter()
        .zip(&ordered)
        .filter(|(_, image)| image.is_none())
        .map(|(s, _)| s.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(InferError::invalid(format!(
            "no {} image: model {} takes {} for each slice",
            missing.join(" or "),
            name,
            input.channel_names()
        )));
    }
    Ok(ordered
        .into_iter()
        .map(|i| i.expect("checked above"))
        .collect())
}

impl InferError {
    /// The same error about slice `index` ("slice 3: …").
    pub fn for_slice(self, index: usize) -> Self {
        InferError {
            message: format!("slice {index}: {}", self.message),
            ..self
        }
    }

    /// The same error about the `sequence` image of slice `index` ("slice 3, T2: …").
    pub fn for_channel(self, index: usize, sequence: Sequence) -> Self {
        InferError {
            message: format!("slice {index}, {}: {}", sequence.as_str(), self.message),
            ..self
        }
    }

    /// The same error of a one-slice request about slice `index` of a stream ("slice 0: …" →
    /// "slice 7: …").
    pub fn renumber_slice(self, index: usize) -> Self {
        let message = match self.message.strip_prefix("slice 0") {
            Some(rest) => format!("slice {index}{rest}"),
            None => self.message,
        };
        InferError { message, ..self }
    }

    /// A batcher error worded for slices ("image 3: …" → "slice 3: …").
    fn relabel_slice(self) -> Self {
        let message = match self.message.strip_prefix("image ") {
            Some(rest) => format!("slice {rest}"),
            None => self.message,
        };
        InferError { message, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_parse_as_callers_write_them() {
        assert_eq!(parse_sequence("FLAIR"), Some(Sequence::Flair));
        assert_eq!(parse_sequence("flair"), Some(Sequence::Flair));
        assert_eq!(parse_sequence("T1ce"), Some(Sequence::T1c));
        assert_eq!(parse_sequence("t1c"), Some(Sequence::T1c));
        assert_eq!(parse_sequence("T1"), Some(Sequence::T1));
        assert_eq!(parse_sequence("T2"), Some(Sequence::T2));
        assert_eq!(parse_sequence("T2*"), None);
        assert_eq!(parse_sequence("unknown"), None);
    }
}
