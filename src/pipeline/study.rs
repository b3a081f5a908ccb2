//! A DICOM study through the shared pipeline: every instance's header (off the runtime) → the
//! study's plan ([`crate::study::plan`]: series, sequences, channels, alignment) → decoding of the
//! instances the plan uses, within the decoding budget → each reference slice's channels aligned
//! onto its grid (exactly, or resampled in patient coordinates) → the model's batcher, in chunks
//! of at most `--max-images-per-request` slices, like any `Segment` → masks at the reference
//! geometry → the tumour measured in millilitres → on request, a DICOM Segmentation object.
//! Same admission, queue places, priorities, deadline, budgets and audit facts as every call.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use super::segment::{SliceAnswer, SliceSource, SliceTask};
use super::{Admitted, Pipeline, ServedModel, check_decode_budget, input_error, on_rayon, within};
use crate::error::{ErrorKind, InferError, echo};
use crate::input::dicom::{self, Header};
use crate::input::sequence::Sequence;
use crate::model::Task;
use crate::postprocess::Mask;
use crate::priority::Priority;
use crate::report::ModelIdentity;
use crate::report::seg::{Code, SegFrame, SegReport, SegmentSpec};
use crate::security::audit;
use crate::study::measure::{Measurement, measure};
use crate::study::{self as plan_study, ChannelSeries, DepthFrom, Interpolation, Partner, Plan};

/// A study to segment, transport-neutral.
#[derive(Debug, Default)]
pub struct StudyRequest {
    /// DICOM instances, in any order.
    pub instances: Vec<bytes::Bytes>,
    /// Series Instance UID → sequence name, for series whose headers do not say.
    pub named: Vec<(String, String)>,
    pub interpolation: Interpolation,
    pub priority: Option<Priority>,
    pub deadline: Option<Instant>,
    /// Also build the DICOM Segmentation object and its measurement report (TID 1500).
    pub segmentation_object: bool,
    /// Also return each segmented reference slice as the model saw it (its gray levels as a PNG
    /// at its geometry): what a viewer draws the mask over.
    pub previews: bool,
}

/// One reference slice of the answer, in slice order.
#[derive(Debug, Clone)]
pub struct StudySlice {
    pub sop_instance_uid: String,
    /// Position along the reference normal, in mm.
    pub position: f64,
    /// `None`: not segmented, because the sequences in `missing` have no slice here.
    pub mask: Option<Mask>,
    pub missing: Vec<Sequence>,
    /// When asked for and segmented: the reference channel's gray levels, 8-bit PNG.
    pub preview: Option<Vec<u8>>,
}

/// Where a study's time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct StudyTiming {
    pub headers: Duration,
    pub decode: Duration,
    pub align: Duration,
    /// Summed over the slices, as each slice's timing is.
    pub queue: Duration,
    pub inference: Duration,
    /// Wall time from the first slice submitted to the masks and measurements: the queue, the
    /// model's runs and the postprocessing, overlapped.
    pub segment: Duration,
    pub segmentation_object: Duration,
}

/// The answer for a study.
#[derive(Debug, Clone)]
pub struct StudyResult {
    pub study_instance_uid: String,
    pub frame_of_reference_uid: String,
    pub channels: Vec<ChannelSeries>,
    pub slices: Vec<StudySlice>,
    pub measurements: Vec<Measurement>,
    pub depth: Option<(f64, DepthFrom)>,
    /// The DICOM Segmentation object (Part 10), when asked for.
    pub segmentation_object: Option<Vec<u8>>,
    /// Its measurement report (TID 1500 Comprehensive SR, Part 10), with it.
    pub measurement_report: Option<Vec<u8>>,
    pub warnings: Vec<String>,
    pub timing: StudyTiming,
}

impl Admitted {
    /// Segments a study with segmentation model `model`; DEADLINE_EXCEEDED at the deadline at
    /// the latest.
    pub async fn segment_study(
        &self,
        model: &Arc<ServedModel>,
        request: StudyRequest,
    ) -> Result<StudyResult, InferError> {
        within(
            request.deadline,
            "deadline exceeded before the study was segmented",
            self.pipeline().run_study(model, request),
        )
        .await
    }
}

/// An instance's decoded gray levels and size.
type Levels = (Vec<f32>, u32, u32);

impl Pipeline {
    async fn run_study(
        &self,
        model: &Arc<ServedModel>,
        request: StudyRequest,
    ) -> Result<StudyResult, InferError> {
        let config = &model.spec.config;
        audit::note_images(request.instances.len());
        let Task::Segmentation(spec) = &config.task else {
            return Err(InferError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "model {} is a classification model: a study is segmented by a segmentation \
                     model (ListModels names each model's task)",
                    config.name
                ),
            ));
        };
        let segmenter = model.segmenter.clone().expect("a segmentation model");
        let n = request.instances.len();
        if n > self.limits.max_study_instances {
            return Err(InferError::invalid(format!(
                "the study has {n} instances, over the limit of {} per call",
                self.limits.max_study_instances
            )));
        }
        let mut named = Vec::with_capacity(request.named.len());
        for (uid, name) in &request.named {
            let sequence = super::segment::parse_sequence(name).ok_or_else(|| {
                InferError::invalid(format!(
                    "series {}: unknown sequence {}: use FLAIR, T1, T1c or T2",
                    echo(uid),
                    echo(name)
                ))
                .quoting_caller()
            })?;
            named.push((uid.clone(), sequence));
        }
        let span = tracing::info_span!(
            "segment_study",
            model = %config.name,
            version = %model.spec.version,
            instances = n as i64,
        );
        async move {
            let mut timing = StudyTiming::default();
            // 1. Every header, off the runtime: the plan is made before any pixel is decoded.
            let started = std::time::Instant::now();
            let limits = model.preprocessor.input_limits();
            let instances = Arc::new(request.instances);
            let headers: Vec<(Header, u64)> = {
                let instances = instances.clone();
                on_rayon(move || {
                    use rayon::prelude::*;
                    instances
                        .par_iter()
                        .enumerate()
                        .map(|(i, data)| {
                            dicom::read_header(data, &limits).map_err(|e| {
                                let e = input_error(e);
                                InferError {
                                    message: format!("instance {i}: {}", e.message),
                                    ..e
                                }
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .await?
            };
            let sizes: Vec<u64> = headers.iter().map(|(_, s)| *s).collect();
            let headers: Vec<Header> = headers.into_iter().map(|(h, _)| h).collect();
            let options = plan_study::StudyOptions {
                named,
                interpolation: request.interpolation,
            };
            let plan = plan_study::plan(
                &headers,
                &config.input.channels,
                config.input.dicom_guard.as_ref(),
                &options,
            )?;
            timing.headers = started.elapsed();
            // 2. The decoding budget: the instances used, as decoded and as levels, and the
            // aligned planes, held until the study is answered.
            let used: Vec<usize> = {
                let mut used: Vec<usize> = plan
                    .slices
                    .iter()
                    .filter(|s| s.complete())
                    .flat_map(|s| s.partners.iter().flatten().flat_map(partner_instances))
                    .collect();
                used.sort_unstable();
                used.dedup();
                used
            };
            let plane_bytes =
                |i: usize| u64::from(headers[i].rows) * u64::from(headers[i].columns) * 4;
            let reference_plane = plan.slices.first().map_or(0, |s| {
                u64::from(s.plane.rows) * u64::from(s.plane.columns) * 4
            });
            let complete = plan.slices.iter().filter(|s| s.complete()).count() as u64;
            let total = used
                .iter()
                .map(|&i| sizes[i].saturating_add(plane_bytes(i)))
                .fold(0u64, u64::saturating_add)
                .saturating_add(
                    complete.saturating_mul(reference_plane * config.input.channels.len() as u64),
                );
            check_decode_budget(
                total,
                self.limits.max_study_decode_bytes,
                "the study's instances (decoded, and aligned onto the reference slices)",
                "send fewer or smaller series, or raise --max-study-decode-mib",
            )?;
            let _room = self.hold_decoding(total).await;
            // 3. Decode the instances used, off the runtime.
            let started = std::time::Instant::now();
            let decoded: HashMap<usize, Levels> = {
                let instances = instances.clone();
                let model = model.clone();
                let used_here = used.clone();
                let uids: Vec<String> = used
                    .iter()
                    .map(|&i| headers[i].ids.series_instance_uid.clone())
                    .collect();
                let count = used_here.len() as i64;
                on_rayon(move || {
                    use rayon::prelude::*;
                    used_here
                        .par_iter()
                        .zip(uids.par_iter())
                        .map(|(&i, uid)| {
                            model
                                .preprocessor
                                .decode_levels(&instances[i])
                                .map(|levels| (i, levels))
                                .map_err(|e| {
                                    let e = input_error(e);
                                    InferError {
                                        message: format!(
                                            "instance {i} (series {uid}): {}",
                                            e.message
                                        ),
                                        ..e
                                    }
                                })
                        })
                        .collect::<Result<HashMap<_, _>, _>>()
                })
                .instrument(tracing::debug_span!("decode", instances = count))
                .await?
            };
            timing.decode = started.elapsed();
            for ids in used.iter().map(|&i| &headers[i].ids) {
                audit::note_dicom(
                    &ids.study_instance_uid,
                    &ids.series_instance_uid,
                    &ids.sop_instance_uid,
                );
            }
            // 4. Each complete reference slice's channels on its grid, off the runtime.
            let started = std::time::Instant::now();
            let planes: Vec<Option<Vec<Vec<f32>>>> = {
                let plan = plan.clone();
                let geometry: HashMap<usize, crate::study::geometry::Plane> = used
                    .iter()
                    .filter_map(|&i| plan_study::plane_of(&headers[i]).map(|p| (i, p)))
                    .collect();
                on_rayon(move || {
                    use rayon::prelude::*;
                    plan.slices
                        .par_iter()
                        .map(|slice| {
                            if !slice.complete() {
                                return None;
                            }
                            Some(
                                slice
                                    .partners
                                    .iter()
                                    .map(|p| {
                                        align(
                                            p.expect("complete"),
                                            &decoded,
                                            &geometry,
                                            &slice.plane,
                                        )
                                    })
                                    .collect(),
                            )
                        })
                        .collect()
                })
                .instrument(tracing::debug_span!("align"))
                .await
            };
            timing.align = started.elapsed();
            // 5. The complete slices through the model's batcher, a request's worth at a time.
            let started = std::time::Instant::now();
            let (width, height) = plan
                .slices
                .first()
                .map_or((0, 0), |s| (s.plane.columns, s.plane.rows));
            let task = SliceTask::Segment {
                segmenter: segmenter.clone(),
                probabilities: false,
            };
            // Previews from the reference channel's plane, before the planes go to the batcher.
            let previews: Vec<Option<Vec<u8>>> = if request.previews {
                let refs: Vec<Option<Vec<f32>>> = planes
                    .iter()
                    .map(|p| p.as_ref().map(|channels| channels[0].clone()))
                    .collect();
                on_rayon(move || {
                    use rayon::prelude::*;
                    refs.into_par_iter()
                        .map(|levels| {
                            let levels = levels?;
                            let bytes: Vec<u8> = levels
                                .iter()
                                .map(|&v| v.round().clamp(0.0, 255.0) as u8)
                                .collect();
                            Some(crate::postprocess::png_gray(&bytes, width, height))
                        })
                        .collect()
                })
                .await
            } else {
                vec![None; plan.slices.len()]
            };
            let mut masks: Vec<Option<Mask>> = vec![None; plan.slices.len()];
            let order: Vec<usize> = (0..plan.slices.len())
                .filter(|&k| planes[k].is_some())
                .collect();
            let mut planes = planes;
            let mut queue = Duration::ZERO;
            let mut inference = Duration::ZERO;
            for chunk in order.chunks(self.limits.max_images_per_request.max(1)) {
                let sources: Vec<SliceSource> = chunk
                    .iter()
                    .map(|&k| SliceSource::Levels {
                        planes: planes[k].take().expect("a complete slice"),
                        width,
                        height,
                    })
                    .collect();
                let answers = u64::from(width) * u64::from(height) * 2 * chunk.len() as u64;
                let runs = self
                    .run_sources(
                        model,
                        sources,
                        answers,
                        request.priority,
                        request.deadline,
                        task.clone(),
                    )
                    .await
                    .map_err(|e| renumber(e, chunk))?;
                for (run, &k) in runs.into_iter().zip(chunk) {
                    queue += run.timing.queue;
                    inference += run.timing.inference;
                    let SliceAnswer::Mask(mask) = run.answer else {
                        unreachable!("a segmentation task")
                    };
                    masks[k] = Some(mask);
                }
            }
            timing.queue = queue;
            timing.inference = inference;
            // 6. Measurements over the masks.
            let labels = &config.labels;
            let regions: Vec<(String, Vec<u8>)> = spec
                .regions
                .iter()
                .map(|r| (r.name.clone(), r.classes.iter().map(|&c| c as u8).collect()))
                .collect();
            let refs: Vec<(usize, &[u8])> = masks
                .iter()
                .enumerate()
                .filter_map(|(k, m)| m.as_ref().map(|m| (k, &m.labels[..])))
                .collect();
            let measurements = measure(&plan, &refs, labels, &regions);
            timing.segment = started.elapsed();
            // 7. The DICOM Segmentation object.
            let mut warnings: Vec<String> = model.warnings.clone();
            warnings.extend(plan.warnings.iter().cloned());
            let (segmentation_object, measurement_report) =
                if request.segmentation_object && !refs.is_empty() {
                    let started = std::time::Instant::now();
                    let first = plan.slices[refs[0].0].instance;
                    let context =
                        dicom::read_context(&instances[first], &limits).map_err(input_error)?;
                    let seg = seg_report(model, &plan, &headers, &masks, context, &warnings);
                    let measured = measurements.clone();
                    let (seg_bytes, sr_bytes) = on_rayon(move || {
                        let (bytes, ids) = crate::report::seg::build_with_ids(&seg)
                            .map_err(|e| format!("the DICOM Segmentation object: {e}"))?;
                        let report = measurement_report(&seg, ids, &measured);
                        let sr = crate::report::measurement::build(&report)
                            .map_err(|e| format!("the measurement report: {e}"))?;
                        Ok::<_, String>((bytes, sr))
                    })
                    .await
                    .map_err(|e| {
                        InferError::new(ErrorKind::Internal, format!("{e} could not be built"))
                    })?;
                    timing.segmentation_object = started.elapsed();
                    (Some(seg_bytes), Some(sr_bytes))
                } else {
                    (None, None)
                };
            let slices = plan
                .slices
                .iter()
                .zip(masks)
                .zip(previews)
                .map(|((s, mask), preview)| StudySlice {
                    sop_instance_uid: headers[s.instance].ids.sop_instance_uid.clone(),
                    position: s.along,
                    missing: s
                        .partners
                        .iter()
                        .zip(&plan.channels)
                        .filter(|(p, _)| p.is_none())
                        .map(|(_, c)| c.sequence)
                        .collect(),
                    mask,
                    preview,
                })
                .collect();
            Ok(StudyResult {
                study_instance_uid: plan.study_instance_uid.clone(),
                frame_of_reference_uid: plan.frame_of_reference_uid.clone(),
                channels: plan.channels.clone(),
                slices,
                measurements,
                depth: plan.depth,
                segmentation_object,
                measurement_report,
                warnings,
                timing,
            })
        }
        .instrument(span)
        .await
    }
}

/// The instances a partner reads.
fn partner_instances(p: &Partner) -> Vec<usize> {
    match *p {
        Partner::Exact(i) | Partner::Nearest(i) => vec![i],
        Partner::Linear(a, b, _) => vec![a, b],
    }
}

/// One channel's plane on a reference slice's grid.
fn align(
    partner: Partner,
    decoded: &HashMap<usize, Levels>,
    geometry: &HashMap<usize, crate::study::geometry::Plane>,
    target: &crate::study::geometry::Plane,
) -> Vec<f32> {
    use crate::study::resample::{blend, onto};
    let resampled = |i: usize| onto(&decoded[&i].0, &geometry[&i], target);
    match partner {
        Partner::Exact(i) => decoded[&i].0.clone(),
        Partner::Nearest(i) => resampled(i),
        Partner::Linear(a, b, w) => blend(&resampled(a), &resampled(b), w),
    }
}

/// A chunk's error about its slice k ("slice 3: …") renamed to the study's reference slice.
fn renumber(e: InferError, chunk: &[usize]) -> InferError {
    let message = e
        .message
        .strip_prefix("slice ")
        .and_then(|rest| {
            let (k, tail) = rest.split_once(':')?;
            let k: usize = k.trim().parse().ok()?;
            Some(format!("reference slice {}:{tail}", chunk.get(k)?))
        })
        .unwrap_or(e.message);
    InferError { message, ..e }
}

/// The measurement report of the Segmentation object `seg` (written with `ids`): one group per
/// segment, its volume from `measured` (the labels' and regions' measurements, by name).
fn measurement_report(
    seg: &SegReport,
    ids: crate::report::seg::SegIds,
    measured: &[Measurement],
) -> crate::report::measurement::MeasurementReport {
    use crate::report::measurement::{MeasurementReport, SegmentMeasurement};
    let measurements = seg
        .segments
        .iter()
        .enumerate()
        .map(|(k, segment)| {
            let m = measured.iter().find(|m| m.name == segment.label);
            SegmentMeasurement {
                segment_number: crate::report::seg::segment_number(k)
                    .expect("at most 256 labels and their regions"),
                label: segment.label.clone(),
                finding: segment.kind.clone(),
                category: segment.category.clone(),
                voxels: m.map_or(0, |m| m.voxels),
                volume_ml: m.and_then(|m| m.volume_ml),
            }
        })
        .collect();
    MeasurementReport {
        context: seg.context.clone(),
        study_instance_uid: seg.study_instance_uid.clone(),
        segmentation: ids,
        source_series: seg.referenced_series.clone(),
        measurements,
        model: seg.model.clone(),
        warnings: seg.warnings.clone(),
    }
}

/// The Segmentation object's content: the reference slices segmented, one segment per class
/// (not the background) and per region, coded as the model declares.
fn seg_report(
    model: &ServedModel,
    plan: &Plan,
    headers: &[Header],
    masks: &[Option<Mask>],
    context: dicom::PatientContext,
    warnings: &[String],
) -> SegReport {
    let config = &model.spec.config;
    let Task::Segmentation(spec) = &config.task else {
        unreachable!("a segmentation model")
    };
    let code = |c: crate::model::Concept| Code {
        value: c.value,
        scheme: c.scheme,
        meaning: c.meaning,
    };
    let mut segments: Vec<SegmentSpec> = config
        .labels
        .iter()
        .enumerate()
        .skip(1)
        .map(|(k, label)| {
            let codes = spec.codes_of(label);
            SegmentSpec {
                label: label.clone(),
                classes: vec![k as u8],
                category: code(codes.category),
                kind: code(codes.kind),
                color: spec.colors[k],
            }
        })
        .collect();
    for region in &spec.regions {
        let codes = spec.codes_of(&region.name);
        // A region's colour: its first class's.
        segments.push(SegmentSpec {
            label: region.name.clone(),
            classes: region.classes.iter().map(|&c| c as u8).collect(),
            category: code(codes.category),
            kind: code(codes.kind),
            color: spec.colors[region.classes[0]],
        });
    }
    let reference = &plan.slices[0];
    let first = &headers[reference.instance];
    let frames = plan
        .slices
        .iter()
        .zip(masks)
        .filter_map(|(s, m)| {
            let m = m.as_ref()?;
            let h = &headers[s.instance];
            Some(SegFrame {
                sop_class_uid: h.geometry.sop_class_uid.clone(),
                sop_instance_uid: h.ids.sop_instance_uid.clone(),
                position: s.plane.origin,
                labels: m.labels.clone(),
            })
        })
        .collect();
    let referenced_series = plan
        .channels
        .iter()
        .map(|c| {
            (
                c.series_instance_uid.clone(),
                c.instances
                    .iter()
                    .map(|&i| {
                        (
                            headers[i].geometry.sop_class_uid.clone(),
                            headers[i].ids.sop_instance_uid.clone(),
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    SegReport {
        context,
        study_instance_uid: plan.study_instance_uid.clone(),
        source_series_instance_uid: first.ids.series_instance_uid.clone(),
        frame_of_reference_uid: plan.frame_of_reference_uid.clone(),
        rows: reference.plane.rows,
        columns: reference.plane.columns,
        pixel_spacing: reference.plane.spacing,
        orientation: {
            let o = &reference.plane.orientation;
            [
                o.row[0],
                o.row[1],
                o.row[2],
                o.column[0],
                o.column[1],
                o.column[2],
            ]
        },
        slice_thickness: first.geometry.slice_thickness,
        spacing_between_slices: plan
            .depth
            .filter(|(_, from)| *from == DepthFrom::Positions)
            .map(|(d, _)| d),
        frames,
        segments,
        referenced_series,
        model: ModelIdentity {
            name: config.name.clone(),
            version: model.spec.version.clone(),
            sha256: model.spec.sha256.clone(),
            clinically_trained: config.clinically_trained,
        },
        warnings: warnings.to_vec(),
    }
}
