//! Processing: a stable study's instances, routed to models through the one pipeline (the same
//! admission, budgets, batchers and audit facts as every call), and its results into the outbox.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;

use tracing::Instrument;

use super::Node;
use super::config::{Route, Trigger};
use super::spool::JobInfo;
use crate::error::{ErrorKind, InferError};
use crate::input::dicom::{self, Header};
use crate::input::sequence::{self, Sequence};
use crate::input::{Encoding, InputLimits};
use crate::metrics;
use crate::model::Task;
use crate::pipeline::series::SeriesRequest;
use crate::pipeline::study::StudyRequest;
use crate::security::audit::{self, CallFacts};
use crate::state::Phase;

/// How often the spool is looked at for stable studies.
const TICK: Duration = Duration::from_millis(200);

/// One series of a job.
struct Series {
    uid: String,
    modality: String,
    sequence: Sequence,
    first: Header,
    instances: Vec<usize>,
}

/// Why a job stopped before its results were filed.
enum Stop {
    /// Not now (warming up, draining, queue full): the job waits and runs again.
    Later,
    /// Nothing can come of it; the job goes.
    Failed(String),
}

/// The processing loop: every stable study, one at a time (the pipeline runs each one's slices
/// in parallel), while the server serves and the outbox has room.
pub async fn run(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let wait = match node.settings.trigger {
        Trigger::Stable => node.settings.stable,
        Trigger::Association => Duration::ZERO,
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = node.spool.released.notified() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        // Not while warming up or draining, not with a full outbox, and not while the audit
        // trail cannot be written under --audit-fail-closed: the studies wait in the spool.
        if node.pipeline.state().phase() != Phase::Serving
            || !node.outbox.has_room()
            || node.audit_refusing()
        {
            continue;
        }
        for job in node.spool.take_ready(wait) {
            if *stop.borrow() {
                node.spool.retry_later(&job.id, false);
                continue;
            }
            let span = tracing::info_span!("dicom.study", job = %job.id, called = %job.called);
            process(&node, &job).instrument(span).await;
        }
    }
}

async fn process(node: &Node, job: &JobInfo) {
    match results(node, job).await {
        Ok(results) if results.is_empty() => node.spool.remove(&job.id),
        Ok(results) => {
            let outbox = node.outbox.clone();
            let id = job.id.clone();
            let filed = tokio::task::spawn_blocking(move || outbox.commit(&id, &results))
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r);
            match filed {
                Ok(()) => {
                    node.spool.mark_delivering(&job.id);
                }
                Err(e) => {
                    tracing::error!(error = %e, "the outbox cannot be written; the study waits");
                    node.spool.retry_later(&job.id, true);
                }
            }
        }
        Err(Stop::Later) => node.spool.retry_later(&job.id, true),
        Err(Stop::Failed(reason)) => {
            tracing::warn!(reason = %reason, "a received study could not be processed");
            node.spool.remove(&job.id);
        }
    }
}

/// Headers need no size limit of their own here: the files are on disk, under the spool's cap.
const HEADER_LIMITS: InputLimits = InputLimits {
    max_image_bytes: 1 << 40,
    max_pixels: 1 << 32,
};

/// Runs the job's routes; its results as (SOP Instance UID, Part 10 bytes).
async fn results(node: &Node, job: &JobInfo) -> Result<Vec<(String, Vec<u8>)>, Stop> {
    let paths = node.spool.instance_paths(&job.id);
    let limit = node.pipeline.limits().max_study_instances;
    // The study is read whole: no more than one call's study may be (its instances, and their
    // bytes against the study decoding budget, which they can only grow to).
    let bytes: u64 = paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let budget = node.pipeline.limits().max_study_decode_bytes;
    let refusal = if paths.len() > limit {
        Some(format!(
            "the study has {} instances, over the limit of {limit} (--max-study-instances)",
            paths.len()
        ))
    } else if bytes > budget {
        Some(format!(
            "the study's instances hold {} MiB, over the study limit of {} MiB \
             (--max-study-decode-mib)",
            bytes >> 20,
            budget >> 20
        ))
    } else {
        None
    };
    if let Some(refusal) = refusal {
        let facts = CallFacts::default();
        node.audit_job(
            job,
            "DICOM study",
            &facts,
            ErrorKind::InvalidArgument.as_str(),
            Instant::now(),
        );
        return Err(Stop::Failed(refusal));
    }
    let (instances, headers) = tokio::task::spawn_blocking(move || {
        let mut instances = Vec::new();
        let mut headers = Vec::new();
        for path in paths {
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            match dicom::read_header(&bytes, &HEADER_LIMITS) {
                Ok((header, _)) => {
                    headers.push(header);
                    instances.push(Bytes::from(bytes));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a spooled instance has no usable header; left out")
                }
            }
        }
        (instances, headers)
    })
    .await
    .map_err(|e| Stop::Failed(format!("reading the study failed: {e}")))?;
    let mut series: Vec<Series> = Vec::new();
    for (i, header) in headers.iter().enumerate() {
        let uid = &header.ids.series_instance_uid;
        match series.iter_mut().find(|s| &s.uid == uid) {
            Some(s) => s.instances.push(i),
            None => series.push(Series {
                uid: uid.clone(),
                modality: header.modality.clone(),
                sequence: sequence::detect(&header.acquisition).sequence,
                first: header.clone(),
                instances: vec![i],
            }),
        }
    }
    let default_route;
    let routes: &[Route] = if node.settings.routes.is_empty() {
        default_route = [Route::default()];
        &default_route
    } else {
        &node.settings.routes
    };
    let mut out = Vec::new();
    // Classification: each series by the first classification rule that takes it.
    for s in &series {
        let mut routed = false;
        for route in routes {
            if !route.matches(&job.called, &s.modality)
                || !route.matches_sequence(s.sequence.as_str())
            {
                continue;
            }
            let Ok(model) = node.pipeline.resolve(&route.model, "") else {
                continue;
            };
            if !matches!(model.spec.config.task, Task::Classification)
                || model.preprocessor.guard(&s.first).is_err()
                || model.takes_single_images().is_err()
            {
                continue;
            }
            routed = true;
            let request = SeriesRequest {
                instances: s
                    .instances
                    .iter()
                    .map(|&i| (instances[i].clone(), Encoding::Dicom))
                    .collect(),
                priority: route.priority,
                deadline: None,
                structured_report: true,
                max_instances: limit,
            };
            let refs = s.instances.iter().map(|&i| &headers[i]).collect::<Vec<_>>();
            let outcome = call(
                node,
                job,
                "DICOM series classification",
                &refs,
                async |admitted| {
                    let model = admitted.resolve(&route.model, "")?;
                    admitted.classify_series(&model, request).await
                },
            )
            .await;
            match outcome {
                Ok(result) => {
                    metrics::dicom_series_processed("classification", "ok");
                    if let Some(sr) = result.structured_report {
                        out.push((sop_instance_of(&sr)?, sr));
                    }
                }
                Err(e) if retry(&e) => {
                    metrics::dicom_series_processed("classification", "deferred");
                    return Err(Stop::Later);
                }
                Err(e) => {
                    metrics::dicom_series_processed("classification", "failed");
                    tracing::warn!(error = %e.log_message(), "a received series could not be classified");
                }
            }
            break;
        }
        if !routed && !segmented_by_any(node, routes, job, &series, s) {
            metrics::dicom_series_processed("classification", "unrouted");
        }
    }
    // Segmentation: the whole study, by each segmentation rule whose model's channels it covers
    // (each model once).
    let mut segmented_by: Vec<String> = Vec::new();
    for route in routes {
        let Ok(model) = node.pipeline.resolve(&route.model, "") else {
            continue;
        };
        if !covers(&model, route, job, &series) || segmented_by.contains(&model.spec.config.name) {
            continue;
        }
        segmented_by.push(model.spec.config.name.clone());
        let request = StudyRequest {
            instances: instances.clone(),
            priority: route.priority,
            segmentation_object: true,
            ..StudyRequest::default()
        };
        let refs = headers.iter().collect::<Vec<_>>();
        let outcome = call(
            node,
            job,
            "DICOM study segmentation",
            &refs,
            async |admitted| {
                let model = admitted.resolve(&route.model, "")?;
                admitted.segment_study(&model, request).await
            },
        )
        .await;
        match outcome {
            Ok(result) => {
                metrics::dicom_series_processed("segmentation", "ok");
                for object in [result.segmentation_object, result.measurement_report]
                    .into_iter()
                    .flatten()
                {
                    out.push((sop_instance_of(&object)?, object));
                }
            }
            Err(e) if retry(&e) => {
                metrics::dicom_series_processed("segmentation", "deferred");
                return Err(Stop::Later);
            }
            Err(e) => {
                metrics::dicom_series_processed("segmentation", "failed");
                tracing::warn!(error = %e.log_message(), "a received study could not be segmented");
            }
        }
    }
    Ok(out)
}

/// Whether segmentation rule `route` takes the study: a segmentation model, the called AE title
/// and a modality match, and its series cover the model's channels.
fn covers(
    model: &crate::pipeline::ServedModel,
    route: &Route,
    job: &JobInfo,
    series: &[Series],
) -> bool {
    matches!(model.spec.config.task, Task::Segmentation(_))
        && series
            .iter()
            .any(|s| route.matches(&job.called, &s.modality))
        && model
            .spec
            .config
            .input
            .channels
            .iter()
            .all(|c| series.iter().any(|s| s.sequence == *c))
}

fn segmented_by_any(
    node: &Node,
    routes: &[Route],
    job: &JobInfo,
    series: &[Series],
    s: &Series,
) -> bool {
    routes.iter().any(|route| {
        node.pipeline.resolve(&route.model, "").is_ok_and(|model| {
            covers(&model, route, job, series)
                && model.spec.config.input.channels.contains(&s.sequence)
        })
    })
}

/// Errors after which the same study may succeed later.
fn retry(e: &InferError) -> bool {
    matches!(
        e.kind,
        ErrorKind::Unavailable | ErrorKind::ResourceExhausted
    )
}

/// One pipeline call for a job, with its audit record.
async fn call<T>(
    node: &Node,
    job: &JobInfo,
    method: &'static str,
    headers: &[&Header],
    f: impl AsyncFnOnce(&crate::pipeline::Admitted) -> Result<T, InferError>,
) -> Result<T, InferError> {
    let facts = CallFacts::default();
    let started = Instant::now();
    let result = audit::scope(facts.clone(), async {
        let admitted = node.pipeline.admit()?;
        for h in headers {
            audit::note_dicom(
                &h.ids.study_instance_uid,
                &h.ids.series_instance_uid,
                &h.ids.sop_instance_uid,
            );
        }
        f(&admitted).await
    })
    .await;
    let outcome = match &result {
        Ok(_) => crate::error::OK,
        Err(e) => e.kind.as_str(),
    };
    node.audit_job(job, method, &facts, outcome, started);
    result
}

/// The SOP Instance UID of a result (from its File Meta Information).
fn sop_instance_of(part10: &[u8]) -> Result<String, Stop> {
    let obj = OpenFileOptions::new()
        .read_until(tags::SOP_CLASS_UID)
        .from_reader(part10.get(128..).unwrap_or_default())
        .map_err(|e| Stop::Failed(format!("a result cannot be read back: {e}")))?;
    let uid = obj
        .meta()
        .media_storage_sop_instance_uid()
        .trim_end_matches('\0')
        .to_string();
    if !super::dimse::valid_uid(&uid) {
        return Err(Stop::Failed(
            "a result has no valid SOP Instance UID".into(),
        ));
    }
    Ok(uid)
}
