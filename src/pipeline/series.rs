//! One DICOM series through the shared pipeline: headers first (series identity, the sequence
//! guard, slice order, duplicates and gaps, which slices to classify, the decoding budget), then
//! queue places for the selected slices, then decoding and preprocessing off the runtime, then the
//! model's batcher as for any other request, then the series summary and, on request, the
//! structured report.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use super::{
    Admitted, ImageResult, Pipeline, Prepared, check_decode_budget, input_error, on_rayon, reserve,
    within,
};
use crate::batcher::Place;
use crate::error::{ErrorKind, InferError};
use crate::input::Encoding;
use crate::input::dicom::{self, DicomIds, Header};
use crate::input::sequence::{self, Sequence};
use crate::model::Aggregation;
use crate::preprocess::DicomSource;
use crate::priority::Priority;
use crate::report::{self, ModelIdentity, SeriesFinding, SeriesReport, SliceFinding};
use crate::threads::ThreadCpu;

/// A series request, transport-neutral.
#[derive(Debug)]
pub struct SeriesRequest {
    pub instances: Vec<(bytes::Bytes, Encoding)>,
    pub priority: Option<Priority>,
    pub deadline: Option<Instant>,
    pub structured_report: bool,
    /// Most instances the series may hold: --max-images-per-request for a call, the study limit
    /// for a series the DICOM node received.
    pub max_instances: usize,
}

/// One slice, in slice order.
#[derive(Debug, Clone)]
pub struct Slice {
    pub instance: usize,
    pub sop_instance_uid: String,
    /// 1-based frame number in a multi-frame instance.
    pub frame: Option<u32>,
    /// Position along the slice normal, in mm.
    pub position: Option<f64>,
    /// Set for the selected (classified) slices.
    pub result: Option<ImageResult>,
}

/// How the slices were ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortedBy {
    Position,
    InstanceNumber,
    Request,
}

impl SortedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            SortedBy::Position => "position",
            SortedBy::InstanceNumber => "instance_number",
            SortedBy::Request => "request",
        }
    }
}

/// The series result.
#[derive(Debug, Clone)]
pub struct SeriesResult {
    pub ids: DicomIds,
    pub slices: Vec<Slice>,
    pub finding: SeriesFinding,
    pub detected: Sequence,
    pub sorted_by: SortedBy,
    pub warnings: Vec<String>,
    pub structured_report: Option<Vec<u8>>,
}

/// Slices closer than this along the normal are the same position, in mm.
const SAME_POSITION_MM: f64 = 0.01;
/// A step this many times the median spacing is a gap.
const GAP_FACTOR: f64 = 1.5;

impl Admitted {
    /// Classifies one series; answers DEADLINE_EXCEEDED at the deadline at the latest.
    pub async fn classify_series(
        &self,
        model: &Arc<crate::pipeline::ServedModel>,
        request: SeriesRequest,
    ) -> Result<SeriesResult, InferError> {
        model.classifies()?;
        model.takes_single_images()?;
        within(
            request.deadline,
            "deadline exceeded before the series was classified",
            self.pipeline.run_series(model, request),
        )
        .await
    }
}

impl Pipeline {
    async fn run_series(
        &self,
        model: &Arc<crate::pipeline::ServedModel>,
        request: SeriesRequest,
    ) -> Result<SeriesResult, InferError> {
        let n = request.instances.len();
        crate::security::audit::note_images(n);
        if n == 0 {
            return Err(InferError::invalid("the series has no instances"));
        }
        if n > request.max_instances {
            return Err(InferError::invalid(format!(
                "the series has {n} instances, over the limit of {} per request",
                request.max_instances
            )));
        }
        // Headers only: nothing is decoded before the series is known to be acceptable.
        let instances = Arc::new(request.instances);
        let headers = {
            let (model, instances) = (model.clone(), instances.clone());
            on_rayon(move || headers(&model, &instances)).await?
        };
        let first = &headers[0].0;
        for (i, (header, _)) in headers.iter().enumerate() {
            if header.ids.series_instance_uid != first.ids.series_instance_uid {
                return Err(InferError::invalid(format!(
                    "instance {i} belongs to series {}, instance 0 to series {}: one call \
                     takes one series",
                    header.ids.series_instance_uid, first.ids.series_instance_uid
                )));
            }
        }
        let detected = sequence::detect(&first.acquisition).sequence;
        let mut warnings = model
            .preprocessor
            .guard(first)
            .map_err(|e| input_error(e).for_image(0))?;
        let (mut slices, sorted_by) = order(&headers, &mut warnings);
        if slices.len() < 2 {
            return Err(InferError::invalid(format!(
                "a series needs at least 2 slices; this one has {}: send a single slice to \
                 Classify",
                slices.len()
            )));
        }
        let settings = &model.spec.config.series;
        let count = ((slices.len() as f64 * settings.central_fraction).ceil() as usize)
            .clamp(1, slices.len());
        let start = (slices.len() - count) / 2;
        let selected = start..start + count;
        let needed: Vec<bool> = (0..n)
            .map(|i| slices[selected.clone()].iter().any(|s| s.instance == i))
            .collect();
        let total: u64 = headers
            .iter()
            .zip(&needed)
            .filter(|(_, needed)| **needed)
            .map(|((_, size), _)| size)
            .sum();
        check_decode_budget(
            total,
            self.limits.max_request_decode_bytes,
            "the series",
            "send fewer or smaller instances",
        )?;
        let priority = request.priority.unwrap_or(model.settings.default_priority);
        let places = reserve(model, count, priority, request.deadline)?;
        let span = self.span(model, count, priority);
        // Decode the instances with selected slices (within the shared decoding budget), and
        // preprocess the selected frames.
        let wanted: Vec<(usize, Option<u32>)> = slices[selected.clone()]
            .iter()
            .map(|s| (s.instance, s.frame))
            .collect();
        let (prepared, context) = async {
            let room = self.hold_decoding(total).await;
            let (model, instances) = (model.clone(), instances.clone());
            let headers: Vec<Header> = headers.iter().map(|(h, _)| h.clone()).collect();
            let places = places.into_places();
            on_rayon(move || {
                let result = prepare(&model, &instances, &headers, &needed, &wanted, places);
                drop(room);
                result
            })
            .await
        }
        .instrument(tracing::debug_span!(parent: &span, "preprocess", images = count as i64))
        .await?;
        let indices: Vec<usize> = (0..prepared.len()).collect();
        let results = self
            .submit_and_await(model, prepared, &indices, request.deadline, &span)
            .await?;
        for (slice, result) in slices[selected.clone()].iter_mut().zip(results) {
            slice.result = Some(result);
        }
        let finding = summarise(model, &slices);
        let ids = DicomIds {
            sop_instance_uid: String::new(),
            ..first.ids.clone()
        };
        let structured_report = if request.structured_report {
            Some(structured_report(
                model, &headers, &slices, &finding, &warnings, context,
            )?)
        } else {
            None
        };
        Ok(SeriesResult {
            ids,
            slices,
            finding,
            detected,
            sorted_by,
            warnings,
            structured_report,
        })
    }
}

/// Every instance's header and decoded size.
fn headers(
    model: &crate::pipeline::ServedModel,
    instances: &[(bytes::Bytes, Encoding)],
) -> Result<Vec<(Header, u64)>, InferError> {
    let limits = model.preprocessor.input_limits();
    instances
        .iter()
        .enumerate()
        .map(|(i, (data, encoding))| {
            if !encoding.is_dicom(data) {
                return Err(InferError::invalid(
                    "ClassifySeries takes DICOM instances; this is not one (no DICM marker)",
                )
                .for_image(i));
            }
            dicom::read_header(data, &limits).map_err(|e| input_error(e).for_image(i))
        })
        .collect()
}

/// The slices of every instance, sorted along the slice normal (or by Instance Number, or as
/// sent), with warnings for repeated instances, duplicate positions and gaps.
fn order(headers: &[(Header, u64)], warnings: &mut Vec<String>) -> (Vec<Slice>, SortedBy) {
    let mut seen = std::collections::HashMap::new();
    let mut slices = Vec::new();
    for (i, (header, _)) in headers.iter().enumerate() {
        let uid = &header.ids.sop_instance_uid;
        if let Some(j) = seen.insert(uid.clone(), i) {
            warnings.push(format!(
                "instance {i} repeats instance {j} (the same SOP Instance UID); it is classified \
                 once"
            ));
            continue;
        }
        let g = &header.geometry;
        let normal = g.orientation.map(|o| {
            [
                o[1] * o[5] - o[2] * o[4],
                o[2] * o[3] - o[0] * o[5],
                o[0] * o[4] - o[1] * o[3],
            ]
        });
        let along = |p: Option<[f64; 3]>| {
            p.zip(normal)
                .map(|(p, n)| p[0] * n[0] + p[1] * n[1] + p[2] * n[2])
        };
        for f in 0..header.frames {
            let (frame, position) = if header.frames == 1 {
                (None, along(g.position))
            } else {
                (
                    Some(f + 1),
                    along(g.frame_positions.get(f as usize).copied().flatten()),
                )
            };
            slices.push(Slice {
                instance: i,
                sop_instance_uid: uid.clone(),
                frame,
                position,
                result: None,
            });
        }
    }
    let same_orientation = {
        let first = headers[0].0.geometry.orientation;
        headers
            .iter()
            .all(|(h, _)| match (first, h.geometry.orientation) {
                (Some(a), Some(b)) => a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4),
                _ => false,
            })
    };
    let sorted_by = if same_orientation && slices.iter().all(|s| s.position.is_some()) {
        slices.sort_by(|a, b| a.position.unwrap().total_cmp(&b.position.unwrap()));
        let steps: Vec<f64> = slices
            .windows(2)
            .map(|w| w[1].position.unwrap() - w[0].position.unwrap())
            .collect();
        for (k, step) in steps.iter().enumerate() {
            if *step < SAME_POSITION_MM {
                warnings.push(format!(
                    "slices {k} and {} are at the same position ({:.2} mm): duplicate slices",
                    k + 1,
                    slices[k].position.unwrap()
                ));
            }
        }
        let mut spacings: Vec<f64> = steps
            .iter()
            .copied()
            .filter(|s| *s >= SAME_POSITION_MM)
            .collect();
        spacings.sort_by(f64::total_cmp);
        if let Some(&median) = spacings.get(spacings.len() / 2) {
            for (k, step) in steps.iter().enumerate() {
                if *step > GAP_FACTOR * median {
                    warnings.push(format!(
                        "a gap of {step:.2} mm between slices {k} and {} (spacing {median:.2} \
                         mm): slices may be missing",
                        k + 1
                    ));
                }
            }
        }
        SortedBy::Position
    } else if headers
        .iter()
        .all(|(h, _)| h.geometry.instance_number.is_some())
    {
        let number = |s: &Slice| headers[s.instance].0.geometry.instance_number.unwrap();
        slices.sort_by_key(|s| (number(s), s.frame));
        let single_frame = headers.iter().all(|(h, _)| h.frames == 1);
        for k in 1..slices.len() {
            let (a, b) = (number(&slices[k - 1]), number(&slices[k]));
            if single_frame && a == b {
                warnings.push(format!(
                    "slices {} and {k} have the same Instance Number {a}: duplicate slices",
                    k - 1
                ));
            } else if single_frame && b > a + 1 {
                warnings.push(format!(
                    "Instance Numbers jump from {a} to {b} between slices {} and {k}: slices \
                     may be missing",
                    k - 1
                ));
            }
        }
        warnings.push(
            "the slices are ordered by Instance Number: Image Position/Orientation (Patient) \
             is missing or differs between instances"
                .into(),
        );
        SortedBy::InstanceNumber
    } else {
        warnings.push(
            "the slices are in the order sent: neither positions nor Instance Numbers are \
             available"
                .into(),
        );
        SortedBy::Request
    };
    (slices, sorted_by)
}

/// Decodes the needed instances and preprocesses the wanted (instance, frame) slices, in order;
/// also the patient context of the first decoded instance (for the report).
fn prepare(
    model: &crate::pipeline::ServedModel,
    instances: &[(bytes::Bytes, Encoding)],
    headers: &[Header],
    needed: &[bool],
    wanted: &[(usize, Option<u32>)],
    places: Vec<Place>,
) -> Result<(Vec<Prepared>, Option<dicom::PatientContext>), InferError> {
    let limits = model.preprocessor.input_limits();
    let mut frames: Vec<Option<Vec<Option<dicom::Frame>>>> = vec![None; instances.len()];
    let mut context = None;
    let mut took = vec![Duration::ZERO; instances.len()];
    let mut cpu = vec![Duration::ZERO; instances.len()];
    for (i, (data, _)) in instances.iter().enumerate() {
        if !needed[i] {
            continue;
        }
        let (started, thread_cpu) = (std::time::Instant::now(), ThreadCpu::start());
        let image = dicom::decode(data, &limits).map_err(|e| input_error(e).for_image(i))?;
        context.get_or_insert(image.context);
        frames[i] = Some(image.frames.into_iter().map(Some).collect());
        took[i] = started.elapsed();
        cpu[i] = thread_cpu.elapsed().unwrap_or_default();
    }
    let mut prepared = Vec::with_capacity(wanted.len());
    for (&(i, frame), place) in wanted.iter().zip(places) {
        let (started, thread_cpu) = (std::time::Instant::now(), ThreadCpu::start());
        let index = frame.map_or(0, |f| f as usize - 1);
        let decoded = frames[i]
            .as_mut()
            .and_then(|f| f.get_mut(index))
            .and_then(Option::take)
            .expect("every wanted frame was decoded once");
        let mut ticket = place.claim();
        model
            .preprocessor
            .frame_into(decoded, &headers[i], ticket.as_mut_slice())
            .map_err(|e| input_error(e).for_image(i))?;
        let share = headers[i].frames.max(1);
        let took = started.elapsed() + took[i] / share;
        model.metrics.preprocess_duration(took.as_secs_f64());
        model
            .metrics
            .preprocess_cpu(thread_cpu.elapsed().unwrap_or_default() + cpu[i] / share);
        prepared.push(Prepared {
            ticket,
            dicom: Some(DicomSource {
                ids: headers[i].ids.clone(),
                warnings: Vec::new(),
            }),
            took,
            preview: None,
        });
    }
    Ok((prepared, context))
}

/// The series finding: the finding label's per-slice probabilities, aggregated.
fn summarise(model: &crate::pipeline::ServedModel, slices: &[Slice]) -> SeriesFinding {
    let settings = &model.spec.config.series;
    let label = settings.finding_label;
    let scored: Vec<(usize, f32)> = slices
        .iter()
        .enumerate()
        .filter_map(|(k, s)| {
            s.result
                .as_ref()
                .map(|r| (k, r.classification.probabilities[label]))
        })
        .collect();
    let best = scored
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
    let (probability, slice) = match settings.aggregation {
        Aggregation::Max => (best.map_or(0.0, |b| b.1), best.map(|b| b.0)),
        Aggregation::MeanTopK(k) => {
            let mut values: Vec<f32> = scored.iter().map(|s| s.1).collect();
            values.sort_by(|a, b| b.total_cmp(a));
            let top = &values[..k.min(values.len())];
            (top.iter().sum::<f32>() / top.len().max(1) as f32, None)
        }
    };
    SeriesFinding {
        label: model.classifier.labels()[label].clone(),
        probability,
        aggregation: settings.aggregation.describe(scored.len()),
        slice,
    }
}

fn structured_report(
    model: &crate::pipeline::ServedModel,
    headers: &[(Header, u64)],
    slices: &[Slice],
    finding: &SeriesFinding,
    warnings: &[String],
    context: Option<dicom::PatientContext>,
) -> Result<Vec<u8>, InferError> {
    let context = context.expect("a classified series decoded at least one instance");
    let labels = model.classifier.labels();
    let label = model.spec.config.series.finding_label;
    let first = &headers[0].0;
    // The report lists the classified slices; its finding's slice index refers to that list.
    let classified: Vec<(usize, &Slice)> = slices
        .iter()
        .enumerate()
        .filter(|(_, s)| s.result.is_some())
        .collect();
    // The report states probabilities: a model whose outputs are not (logits declared as
    // `kind = "probabilities"`) broke its output contract, which no caller can fix.
    for (_, s) in &classified {
        let c = &s.result.as_ref().expect("classified").classification;
        if let Some((k, p)) = c
            .probabilities
            .iter()
            .enumerate()
            .find(|(_, p)| !(p.is_finite() && (0.0..=1.0).contains(*p)))
        {
            return Err(InferError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "model {} version {} returned {p} for label {:?}, which is not a probability \
                     in [0, 1]: no structured report can state it (its model.toml declares \
                     [output] kind = \"probabilities\"; a model that returns logits declares \
                     kind = \"logits\")",
                    model.spec.config.name, model.spec.version, labels[k]
                ),
            ));
        }
    }
    let report = SeriesReport {
        context,
        study_instance_uid: first.ids.study_instance_uid.clone(),
        series_instance_uid: first.ids.series_instance_uid.clone(),
        slices: classified
            .iter()
            .map(|(_, s)| {
                let c = &s.result.as_ref().expect("classified").classification;
                SliceFinding {
                    sop_class_uid: headers[s.instance].0.geometry.sop_class_uid.clone(),
                    sop_instance_uid: s.sop_instance_uid.clone(),
                    frame: s.frame,
                    label: labels[c.best].clone(),
                    probability: c.probabilities[c.best],
                    finding_probability: c.probabilities[label],
                }
            })
            .collect(),
        finding: SeriesFinding {
            slice: finding
                .slice
                .and_then(|k| classified.iter().position(|(j, _)| *j == k)),
            ..finding.clone()
        },
        model: ModelIdentity {
            name: model.spec.config.name.clone(),
            version: model.spec.version.clone(),
            sha256: model.spec.sha256.clone(),
            clinically_trained: model.spec.config.clinically_trained,
        },
        warnings: model.warnings.iter().chain(warnings).cloned().collect(),
    };
    report::sr::build(&report).map_err(|e| {
        InferError::new(
            ErrorKind::Internal,
            format!("the structured report could not be built: {e}"),
        )
    })
}
