//! Model instances: each an OS thread that builds one backend (its engine, shared under a lock).
//! It warms up every batch size, then waits (idle) for the queue task to hand it a batch, runs it,
//! answers every image, and takes its next batch itself if one is due, else goes idle again. A
//! batch measured to run within `inline_run` instead runs on the thread that formed it, on an
//! idle instance's engine ([`run_in_place`]). A run that fails or panics fails its own batch only;
//! the instance keeps serving.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::buffers::PooledOutput;
use super::queue::{self, Batch};
use super::{BatchError, ImageOutput, OutputRows, Shared, buffers};
use crate::backend::host::HostBuffer;
use crate::backend::{Backend, EngineError, InstanceFactory};
use crate::metrics::Stage;

/// Starts every instance and waits until all are warm. Returns the instances' batch senders (the
/// queue task's way to hand a batch to an idle instance).
pub(super) async fn start_all(
    shared: Arc<Shared>,
    factory: InstanceFactory,
) -> Result<Vec<mpsc::UnboundedSender<Batch>>, EngineError> {
    // The runtime's clock (paused in tests) for the queue times the instances compare.
    let runtime = tokio::runtime::Handle::current();
    let mut senders = Vec::with_capacity(shared.config.instances);
    let mut warmups = Vec::with_capacity(shared.config.instances);
    for instance in 0..shared.config.instances {
        let (batch_tx, mut batch_rx) = mpsc::unbounded_channel();
        let (warm_tx, warm_rx) = oneshot::channel();
        let (shared, factory, runtime) = (shared.clone(), factory.clone(), runtime.clone());
        std::thread::Builder::new()
            .name(format!("brainai-instance-{instance}"))
            .spawn(move || {
                let backend = match warm_up(instance, &shared, &factory) {
                    Ok(backend) => backend,
                    Err(e) => {
                        let _ = warm_tx.send(Err(e));
                        return;
                    }
                };
                // Reported warm once idle (below), not before: a call made as soon as start
                // returns finds this instance idle and can run in place on it.
                let mut warm_tx = Some(warm_tx);
                *lock_engine(&shared, instance) = Some(Engine {
                    backend,
                    // Where scattered batches are gathered: allocated once, at its largest.
                    scratch: HostBuffer::new(
                        shared.config.sizes.max() * shared.config.input_len,
                        shared.config.host_memory,
                    ),
                });
                let mut next = None;
                loop {
                    let batch = match next.take() {
                        Some(batch) => batch,
                        None => {
                            // Idle: the queue task hands over the next batch (or a thread runs a
                            // short one in place on this engine). It only needs waking when
                            // images wait (their delay runs from now on); a new image wakes it
                            // anyway.
                            let waiting = {
                                let mut core = queue::lock(&shared);
                                core.idle.push(instance);
                                core.queued() > 0
                            };
                            if waiting {
                                shared.wake.notify_one();
                            }
                            if let Some(warm_tx) = warm_tx.take() {
                                let _ = warm_tx.send(Ok(()));
                                tracing::info!(instance, "model instance warm");
                            }
                            match batch_rx.blocking_recv() {
                                Some(batch) => batch,
                                None => break,
                            }
                        }
                    };
                    run_on_engine(instance, &shared, batch, false);
                    // The next batch, taken here when one is due (a backlog): the instance runs
                    // it at once instead of going idle and being handed it by the queue task (two
                    // thread wake-ups between two runs).
                    next = {
                        let _clock = runtime.enter();
                        let now = tokio::time::Instant::now();
                        queue::next_batch(&mut queue::lock(&shared), &shared, now, true).due()
                    };
                    if next.is_some() {
                        shared.publish_depth();
                    }
                }
                // The backend is released on its own thread, as it was built.
                drop(lock_engine(&shared, instance).take());
            })
            .map_err(|e| EngineError::Runtime(format!("cannot start instance thread: {e}")))?;
        senders.push(batch_tx);
        warmups.push(warm_rx);
    }
    for warm in warmups {
        warm.await
            .map_err(|_| EngineError::Runtime("instance thread ended during warm-up".into()))??;
    }
    Ok(senders)
}

/// An instance's backend and the buffer where its scattered batches are gathered.
pub(super) struct Engine {
    backend: Box<dyn Backend>,
    scratch: HostBuffer,
}

/// The engine of `instance`. A panic while it was held (outside the backend, whose panics
/// [`execute`] contains) leaves nothing half-changed that matters: a poisoned lock is used as is.
fn lock_engine(shared: &Shared, instance: usize) -> MutexGuard<'_, Option<Engine>> {
    shared.engines[instance]
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Runs `batch` on `instance`'s engine, on this thread: the instance's own, or (`in_place`) the
/// one that formed the batch.
fn run_on_engine(instance: usize, shared: &Shared, batch: Batch, in_place: bool) {
    shared.metrics.batch_ran(in_place);
    let mut engine = lock_engine(shared, instance);
    match engine.as_mut() {
        Some(Engine { backend, scratch }) => {
            run_batch(instance, shared, backend.as_mut(), batch, scratch);
        }
        // Only an instance that finished warming up is ever idle, and it keeps its engine until
        // the queue task has ended: not reached, but answered rather than lost.
        None => {
            for job in batch.jobs {
                let _ = job.reply.send(Err(BatchError::Stopped));
            }
        }
    }
}

/// Runs `batch` on idle `instance`'s engine here, on the dispatching thread, then makes the
/// instance idle again (waking the queue task if images wait).
pub(super) fn run_in_place(shared: &Shared, instance: usize, batch: Batch) {
    run_on_engine(instance, shared, batch, true);
    let waiting = {
        let mut core = queue::lock(shared);
        core.idle.push(instance);
        core.queued() > 0
    };
    if waiting {
        shared.wake.notify_one();
    }
}

/// Builds the backend and runs every warm-up batch size (through [`execute`], so warm-up checks
/// the output exactly as serving does).
fn warm_up(
    instance: usize,
    shared: &Shared,
    factory: &InstanceFactory,
) -> Result<Box<dyn Backend>, EngineError> {
    let config = &shared.config;
    catch_unwind(AssertUnwindSafe(|| {
        let mut backend = factory(instance)?;
        for size in config.sizes.warmup() {
            let input = vec![0f32; size * config.input_len];
            let started = std::time::Instant::now();
            let outputs = shared.outputs.take();
            execute(
                instance,
                backend.as_mut(),
                &input,
                size,
                config.output_len,
                outputs,
            )?;
            // Seeds the batch-time estimates admission relies on.
            shared.times.record(size, started.elapsed());
        }
        Ok(backend)
    }))
    .unwrap_or_else(|panic| {
        Err(EngineError::Panic {
            instance,
            message: panic_message(panic.as_ref()),
        })
    })
}

/// One model run: contains panics, and is the one place that checks the output's size.
fn execute(
    instance: usize,
    backend: &mut dyn Backend,
    input: &[f32],
    batch: usize,
    output_len: usize,
    mut outputs: PooledOutput,
) -> Result<PooledOutput, EngineError> {
    catch_unwind(AssertUnwindSafe(|| {
        backend.run_into(input, batch, &mut outputs.data)
    }))
    .unwrap_or_else(|panic| {
        Err(EngineError::Panic {
            instance,
            message: panic_message(panic.as_ref()),
        })
    })?;
    if outputs.data.len() != batch * output_len {
        return Err(EngineError::Inference(format!(
            "model returned {} values for {batch} images, expected {batch} × {output_len}",
            outputs.data.len()
        )));
    }
    Ok(outputs)
}

fn run_batch(
    instance: usize,
    shared: &Shared,
    backend: &mut dyn Backend,
    mut batch: Batch,
    scratch: &mut HostBuffer,
) {
    let config = &shared.config;
    let metrics = &shared.metrics;
    metrics.stage(
        Stage::Dispatch,
        tokio::time::Instant::now().saturating_duration_since(batch.dispatched),
    );
    let n = batch.jobs.len();
    let number = shared.next_batch.fetch_add(1, Ordering::Relaxed);
    // Its own trace (a batch serves many requests), linked once to each request span it serves
    // (OpenTelemetry links, through `follows_from`); sampled when any of them is (the sampler in
    // `telemetry` reads the links). Numbers as i64: an unsigned field is exported as text.
    let span = tracing::debug_span!(
        parent: None,
        "batch",
        batch = number as i64,
        instance = instance as i64,
        size = n as i64
    );
    if !span.is_disabled() {
        let mut linked = Vec::with_capacity(n);
        for job in &batch.jobs {
            let id = job.span.id();
            if id.is_some() && !linked.contains(&id) {
                span.follows_from(&job.span);
                linked.push(id);
            }
        }
    }
    let _entered = span.enter();
    for job in &batch.jobs {
        metrics.queue_duration(
            job.priority,
            (batch.dispatched - job.enqueued).as_secs_f64(),
        );
    }
    // The tensor: the images' rows of one buffer as they are when they are consecutive, else
    // gathered. Each image keeps its own answer channel, so the jobs are put in row order: output
    // row `r` is job `r`'s.
    let assembling = std::time::Instant::now();
    batch.jobs.sort_unstable_by_key(|job| job.tensor.order());
    let rows = batch.jobs.iter().map(|job| &job.tensor);
    let input: &[f32] = match buffers::in_place(rows.clone()) {
        Some(rows) => {
            metrics.assembled(true);
            rows
        }
        None => {
            let len = config.input_len;
            for (i, slot) in rows.enumerate() {
                scratch[i * len..(i + 1) * len].copy_from_slice(slot.as_slice());
            }
            metrics.assembled(false);
            &scratch[..n * len]
        }
    };
    metrics.stage(Stage::Assemble, assembling.elapsed());
    shared.busy.fetch_add(1, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let result = tracing::debug_span!("run", size = n as i64).in_scope(|| {
        let outputs = shared.outputs.take();
        execute(instance, backend, input, n, config.output_len, outputs)
    });
    let finished = std::time::Instant::now();
    let inference_time = finished - started;
    shared.busy.fetch_sub(1, Ordering::SeqCst);
    if result.is_ok() {
        shared.times.record(n, inference_time);
    }
    shared
        .metrics
        .batch_done(n, config.sizes.max(), inference_time.as_secs_f64());

    match result {
        Ok(outputs) => {
            let outputs = Arc::new(outputs);
            for (k, job) in batch.jobs.into_iter().enumerate() {
                let values =
                    OutputRows::new(outputs.clone(), k * config.output_len, config.output_len);
                let queue_time = batch.dispatched - job.enqueued;
                // The request's span as the explicit parent, not entered: where a batch runs in
                // place that span is already entered on this thread, and entering it again would
                // leave the event in the `batch` span only.
                tracing::debug!(
                    parent: &job.span,
                    instance,
                    batch_size = n,
                    queue_ms = ms(queue_time),
                    inference_ms = ms(inference_time),
                    "image ran"
                );
                let _ = job.reply.send(Ok(ImageOutput {
                    values,
                    batch_size: n,
                    queue_time,
                    inference_time,
                    finished,
                }));
            }
        }
        Err(e) => {
            if let EngineError::Panic { message, .. } = &e {
                tracing::error!(instance, batch = number, %message, "model instance panicked; it keeps serving");
            }
            for job in batch.jobs {
                tracing::warn!(parent: &job.span, instance, batch = number, batch_size = n, error = %e, "batch failed");
                let _ = job.reply.send(Err(BatchError::Engine {
                    batch: number,
                    error: e.clone(),
                }));
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
