//! `brainai classify FILE|DIR…` without `--series`: the files go in calls the server accepts, a
//! few calls in flight, and each file's result or error is printed in input order as soon as its
//! call (and every call before it) has completed.
//!
//! - A call carries at most the model's max batch size of images (read with `GetModel`;
//!   `--images-per-call` sets it), at most 64 (the server's default `--max-images-per-request`; a
//!   server with a lower limit names it when it refuses a call, and the rest of the run keeps to
//!   it) and at most 32 MiB of files (a larger file goes alone).
//! - In flight: the model's instances + 1 calls (one running, one queued behind each instance), at
//!   most 4; `--in-flight` sets it. Files are read when their call is sent, so at most that many
//!   calls' files are in memory, however large the directory.
//! - A file that cannot be read, or that the server refuses (`image N: …`, `INVALID_ARGUMENT` or
//!   `FAILED_PRECONDITION`), fails alone: the rest of its call is sent again without it.
//! - A call whose images would decode to more than one request may is split in halves (a file
//!   alone over it fails alone).
//! - `RESOURCE_EXHAUSTED` and `UNAVAILABLE` are tried again ([`super::retry`]); any other refusal
//!   (credentials, an unknown model, a deadline) stops the run, naming the files of the call.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures_util::StreamExt;

use super::Caller;
use super::output::Printer;
use super::retry::{self, Failed};
use crate::pb;

/// Images per call when the model's batch size cannot be read (`GetModel` refused).
const FALLBACK_PER_CALL: usize = 8;
/// The server's default `--max-images-per-request`: no call carries more unless asked to.
const SERVER_MAX_IMAGES: usize = 64;
/// Most file bytes in one call: half the server's default gRPC message limit (64 MiB).
const MAX_CALL_BYTES: u64 = 32 << 20;
/// Most calls in flight unless `--in-flight` says otherwise.
const MAX_DEFAULT_IN_FLIGHT: usize = 4;

/// One file of the run.
struct File {
    /// Its place in the input order.
    index: usize,
    path: PathBuf,
    /// Its size when the run planned its call (0 when unknown: a read error comes later).
    size: u64,
}

/// A file's result, or why it has none.
type Outcome = (File, Result<pb::Classification, String>);

/// How the run splits its work.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    per_call: usize,
    in_flight: usize,
}

/// Classifies `files`, printing each file's result or error; exit status 1 when any file failed.
/// `Err`: the run stopped (what was printed before stays).
pub(super) async fn classify(caller: &Caller<'_>, files: Vec<PathBuf>) -> Result<ExitCode, String> {
    let plan = plan(caller).await?;
    let total = files.len();
    let per_call = AtomicUsize::new(plan.per_call);
    let mut printer = Printer::new(caller.args.json);
    // The first reason to stop, from whichever call meets it: the run stops at once, not when the
    // calls before that one have completed.
    let (stop_tx, mut stop) = tokio::sync::mpsc::channel::<String>(1);
    let mut calls = futures_util::stream::iter(Chunks::new(files, &per_call))
        .map(|chunk| {
            let stop_tx = stop_tx.clone();
            let per_call = &per_call;
            async move {
                let outcome = send(caller, per_call, chunk).await;
                if let Err(reason) = &outcome {
                    let _ = stop_tx.try_send(reason.clone());
                }
                outcome
            }
        })
        // In input order: a call that completes early waits for the ones before it.
        .buffered(plan.in_flight);
    let mut stopped = None;
    loop {
        let outcome = tokio::select! {
            biased;
            Some(reason) = stop.recv() => {
                stopped = Some(reason);
                break;
            }
            outcome = calls.next() => outcome,
        };
        match outcome {
            Some(Ok(files)) => {
                for (file, result) in files {
                    printer.file(&file.path, result);
                }
            }
            Some(Err(reason)) => {
                stopped = Some(reason);
                break;
            }
            None => break,
        }
    }
    // Calls still in flight are cancelled.
    drop(calls);
    printer.finish(stopped.as_deref());
    if let Some(message) = stopped {
        return Err(format!(
            "{message}; {} of {total} files not classified",
            total - printer.results()
        ));
    }
    if printer.failed() > 0 {
        eprintln!(
            "error: {} of {total} files could not be classified",
            printer.failed()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Images per call and calls in flight: the flags, else from the model's batching (`GetModel`).
async fn plan(caller: &Caller<'_>) -> Result<Plan, String> {
    let args = caller.args;
    if let (Some(per_call), Some(in_flight)) = (args.images_per_call, args.in_flight) {
        return Ok(Plan {
            per_call,
            in_flight,
        });
    }
    let info = retry::with_retries(args.connect.max_tries, || {
        let mut client = caller.client.clone();
        let request = caller.request(pb::GetModelRequest {
            model: args.model.clone().unwrap_or_default(),
            version: args.model_version.clone().unwrap_or_default(),
        });
        async move { client.get_model(request).await }
    })
    .await;
    let (batch, instances) = match info {
        Ok(info) => {
            let info = info.into_inner();
            let batching = info.batching.unwrap_or_default();
            let batch = match batching.max_batch_size {
                0 => info.max_batch_size,
                n => n,
            };
            (batch as usize, batching.instances as usize)
        }
        // A caller allowed to classify but not to read metadata (the `infer` scope alone).
        Err(Failed { status, .. })
            if matches!(
                status.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unimplemented
            ) =>
        {
            if args.images_per_call.is_none() {
                eprintln!(
                    "note: the model's batch size is unknown (GetModel: {:?}); sending \
                     {FALLBACK_PER_CALL} images per call (--images-per-call sets it)",
                    status.code()
                );
            }
            (FALLBACK_PER_CALL, 1)
        }
        Err(failed) => return Err(failed.describe()),
    };
    Ok(Plan {
        per_call: args
            .images_per_call
            .unwrap_or(batch.clamp(1, SERVER_MAX_IMAGES)),
        in_flight: args
            .in_flight
            .unwrap_or((instances + 1).clamp(2, MAX_DEFAULT_IN_FLIGHT)),
    })
}

/// The files in calls of at most `per_call` files (read at each call: a refusal can lower it) and
/// [`MAX_CALL_BYTES`]; a file's size is read when its call is planned.
struct Chunks<'a> {
    paths: std::iter::Enumerate<std::vec::IntoIter<PathBuf>>,
    /// The file that did not fit in the previous call.
    held: Option<File>,
    per_call: &'a AtomicUsize,
}

impl<'a> Chunks<'a> {
    fn new(paths: Vec<PathBuf>, per_call: &'a AtomicUsize) -> Self {
        Chunks {
            paths: paths.into_iter().enumerate(),
            held: None,
            per_call,
        }
    }
}

impl Iterator for Chunks<'_> {
    type Item = Vec<File>;

    fn next(&mut self) -> Option<Vec<File>> {
        let limit = self.per_call.load(Ordering::Relaxed).max(1);
        let mut chunk: Vec<File> = Vec::new();
        let mut bytes = 0;
        while chunk.len() < limit {
            let file = match self.held.take() {
                Some(file) => file,
                None => {
                    let Some((index, path)) = self.paths.next() else {
                        break;
                    };
                    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                    File { index, path, size }
                }
            };
            if !chunk.is_empty() && bytes + file.size > MAX_CALL_BYTES {
                self.held = Some(file);
                break;
            }
            bytes += file.size;
            chunk.push(file);
        }
        (!chunk.is_empty()).then_some(chunk)
    }
}

/// Reads the files of one chunk and classifies them, in as many calls as refusals of single
/// files (or of the call's size) take; the outcomes in input order. `Err`: the run must stop.
async fn send(
    caller: &Caller<'_>,
    per_call: &AtomicUsize,
    files: Vec<File>,
) -> Result<Vec<Outcome>, String> {
    let read = tokio::task::spawn_blocking(move || {
        files
            .into_iter()
            .map(|file| {
                let data = std::fs::read(&file.path);
                (file, data)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| format!("reading the files failed: {e}"))?;
    let mut done: Vec<Outcome> = Vec::with_capacity(read.len());
    let mut call = Vec::with_capacity(read.len());
    for (file, data) in read {
        match data {
            Ok(data) => call.push((file, Bytes::from(data))),
            Err(e) => done.push((file, Err(format!("cannot read the file: {e}")))),
        }
    }
    let mut calls = VecDeque::from([call]);
    while let Some(mut call) = calls.pop_front() {
        let limit = per_call.load(Ordering::Relaxed).max(1);
        if call.len() > limit {
            let rest = call.split_off(limit);
            calls.push_front(rest);
        }
        if call.is_empty() {
            continue;
        }
        let failed = match classify_call(caller, &call).await {
            Ok(results) => {
                let mut by_index: Vec<Option<pb::Classification>> = vec![None; call.len()];
                for result in results {
                    if let Some(slot) = by_index.get_mut(result.index as usize) {
                        *slot = Some(result);
                    }
                }
                for ((file, _), result) in call.into_iter().zip(by_index) {
                    let result =
                        result.ok_or_else(|| "the server sent no result for it".to_string());
                    done.push((file, result));
                }
                continue;
            }
            Err(failed) => failed,
        };
        let (code, message) = (failed.status.code(), failed.status.message());
        // More than one request may decode: halves may pass; a file alone fails alone.
        if code == tonic::Code::ResourceExhausted && retry::over_request_limit(&failed.status) {
            if call.len() == 1 {
                let (file, _) = call.remove(0);
                done.push((file, Err(message.to_string())));
            } else {
                let half = call.split_off(call.len() / 2);
                calls.push_front(half);
                calls.push_front(call);
            }
            continue;
        }
        if matches!(
            code,
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
        ) {
            // One file refused: it fails alone, the others go again.
            if let Some((i, reason)) = image_error(message).filter(|(i, _)| *i < call.len()) {
                let (file, _) = call.remove(i);
                done.push((file, Err(reason.to_string())));
                calls.push_front(call);
                continue;
            }
            // A server with fewer images per request than this call carried.
            if let Some(limit) = request_limit(message).filter(|&m| m >= 1 && m < call.len()) {
                per_call.fetch_min(limit, Ordering::Relaxed);
                calls.push_front(call);
                continue;
            }
        }
        return Err(format!("{} (files: {})", failed.describe(), names(&call)));
    }
    done.sort_by_key(|(file, _)| file.index);
    Ok(done)
}

/// One `Classify` call of these files, tried again while the server is busy or unavailable.
async fn classify_call(
    caller: &Caller<'_>,
    call: &[(File, Bytes)],
) -> Result<Vec<pb::Classification>, Failed> {
    let args = caller.args;
    retry::with_retries(args.connect.max_tries, || {
        let mut client = caller.client.clone();
        let images = call
            .iter()
            .map(|(file, data)| pb::Image {
                id: file.path.display().to_string(),
                data: data.clone(),
                format: super::format_of(&file.path) as i32,
                raw: None,
            })
            .collect();
        let request = caller.request(pb::ClassifyRequest {
            images,
            model: args.model.clone().unwrap_or_default(),
            version: args.model_version.clone().unwrap_or_default(),
            priority: super::priority(args),
        });
        async move {
            client
                .classify(request)
                .await
                .map(|response| response.into_inner().results)
        }
    })
    .await
}

/// `image N: reason` (the server's error about one image of a call) → (N, reason).
fn image_error(message: &str) -> Option<(usize, &str)> {
    let (n, reason) = message.strip_prefix("image ")?.split_once(": ")?;
    Some((n.parse().ok()?, reason))
}

/// `… over the limit of N per request` (a call with too many images) → N.
fn request_limit(message: &str) -> Option<usize> {
    let (_, limit) = message.split_once("over the limit of ")?;
    limit.strip_suffix(" per request")?.parse().ok()
}

/// The files of a call, for a message: the first three and how many more.
fn names(call: &[(File, Bytes)]) -> String {
    let mut text: Vec<String> = call
        .iter()
        .take(3)
        .map(|(file, _)| file.path.display().to_string())
        .collect();
    if call.len() > 3 {
        text.push(format!("and {} more", call.len() - 3));
    }
    text.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_of_one_image_and_of_the_call_size_are_recognised() {
        assert_eq!(
            image_error("image 3: data is neither PNG, JPEG nor DICOM"),
            Some((3, "data is neither PNG, JPEG nor DICOM"))
        );
        assert_eq!(image_error("images: 3"), None);
        assert_eq!(image_error("request has no images"), None);
        assert_eq!(
            request_limit("request has 32 images, over the limit of 4 per request"),
            Some(4)
        );
        assert_eq!(
            request_limit("about 900 ms of work, over the 400 ms limit"),
            None
        );
    }

    #[test]
    fn chunks_keep_to_the_image_and_byte_limits_and_follow_a_lowered_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for (name, size) in [
            ("a", 10),
            ("b", 10),
            ("c", MAX_CALL_BYTES),
            ("d", 10),
            ("e", 10),
        ] {
            let path = dir.path().join(name);
            std::fs::File::create(&path).unwrap().set_len(size).unwrap();
            paths.push(path);
        }
        paths.push(dir.path().join("missing"));
        let per_call = AtomicUsize::new(3);
        let mut chunks = Chunks::new(paths, &per_call);
        let indices = |c: Vec<File>| c.iter().map(|f| f.index).collect::<Vec<_>>();
        assert_eq!(
            indices(chunks.next().unwrap()),
            [0, 1],
            "c would pass 32 MiB"
        );
        per_call.store(2, Ordering::Relaxed);
        assert_eq!(indices(chunks.next().unwrap()), [2], "c alone");
        assert_eq!(indices(chunks.next().unwrap()), [3, 4], "the lowered limit");
        assert_eq!(
            indices(chunks.next().unwrap()),
            [5],
            "an unreadable file has size 0"
        );
        assert!(chunks.next().is_none());
    }
}
