//! The queue: one FIFO per priority, shared (under a lock) by the callers that add images, the
//! queue task and the instances. The queue task wakes on a new image, an instance going idle with
//! images waiting, or its timer; it drops images whose caller left or whose deadline passed, asks
//! the policy whether to dispatch, and hands a batch to an idle instance. An instance that
//! finishes a batch takes its next one itself when one is due (a backlog): no round trip through
//! the queue task between two runs. A short batch (by its measured run time) runs where it is
//! formed instead: on the caller that queued its last image ([`take_in_place`]) or on the queue
//! task. Each batch is filled from the highest priority first.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::policy::{Decision, QueueState};
use super::{BatchError, Entry, ImageOutput, Job, Priority, Shared, instance};

/// An image's wait in the queue: the `queue` span, a child of the request's span, ended by
/// whichever comes first, a batch taking the image ([`take`]) or its caller no longer waiting
/// (its [`Pending`] dropped unanswered, with the request span). A wait that ended only when the
/// queue dropped the image later would end after the request span it belongs to.
#[derive(Clone, Default)]
pub(crate) struct QueueWait(Option<Arc<Mutex<Option<tracing::Span>>>>);

impl QueueWait {
    pub fn start(request: &tracing::Span) -> Self {
        let span = tracing::debug_span!(parent: request, "queue");
        if span.is_disabled() {
            return QueueWait(None);
        }
        QueueWait(Some(Arc::new(Mutex::new(Some(span)))))
    }

    /// Ends the span now (its last handle closes it); later calls do nothing.
    pub fn end(&self) {
        if let Some(span) = &self.0 {
            drop(span.lock().unwrap_or_else(PoisonError::into_inner).take());
        }
    }
}

/// Receiver of one image's answer. Dropped before the answer comes (the caller stopped waiting),
/// it ends the image's queue span if no batch took the image yet.
pub struct Pending {
    answer: oneshot::Receiver<Result<ImageOutput, BatchError>>,
    queued: QueueWait,
}

impl Pending {
    pub(super) fn new(
        answer: oneshot::Receiver<Result<ImageOutput, BatchError>>,
        queued: QueueWait,
    ) -> Self {
        Pending { answer, queued }
    }
}

impl Future for Pending {
    type Output = Result<Result<ImageOutput, BatchError>, oneshot::error::RecvError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.answer).poll(cx)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.queued.end();
    }
}

/// A batch handed to an instance.
pub(super) struct Batch {
    pub jobs: Vec<Job>,
    pub dispatched: Instant,
}

/// The queued images and the idle instances.
#[derive(Default)]
pub(super) struct Core {
    /// One FIFO per priority, [`Priority::ALL`] order.
    queues: [VecDeque<Entry>; 2],
    /// Instances waiting for a batch from the queue task.
    pub idle: Vec<usize>,
    /// No more images will arrive: flush without waiting.
    pub closing: bool,
}

impl Core {
    pub fn queued(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }

    /// Queues an image in the order its batch-buffer row was claimed (when its preprocessing
    /// started), not the order it finished preprocessing: batches taken from the front are then
    /// consecutive rows of one buffer and run in place. Nearly always a push at the back.
    pub fn push(&mut self, entry: Entry) {
        let queue = &mut self.queues[entry.job.priority.index()];
        let key = entry.job.tensor.order();
        let at = queue.partition_point(|e| e.job.tensor.order() <= key);
        queue.insert(at, entry);
    }
}

/// The shared queue, locked. A panic while it is held cannot leave it half-changed in a way that
/// matters more than losing the batcher, so a poisoned lock is used as it is.
pub(super) fn lock(shared: &Shared) -> MutexGuard<'_, Core> {
    shared.core.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the queue holds for an instance now.
pub(super) enum Next {
    /// A due batch, taken out of the queue.
    Due(Batch),
    /// Nothing is due before this instant (`None`: before news: an image, an idle instance).
    NotBefore(Option<Instant>),
}

impl Next {
    /// The due batch, if any.
    pub(super) fn due(self) -> Option<Batch> {
        match self {
            Next::Due(batch) => Some(batch),
            Next::NotBefore(_) => None,
        }
    }
}

/// Under the lock: drops dead entries, then decides for an instance that is free (`idle`).
pub(super) fn next_batch(core: &mut Core, shared: &Shared, now: Instant, idle: bool) -> Next {
    drop_dead(core, shared, now);
    let state = QueueState {
        queued: core.queued(),
        // Queues are in row order, which is nearly but not exactly arrival order: the oldest
        // image is looked for in all of them.
        oldest: core
            .queues
            .iter()
            .flat_map(|q| q.iter().map(|e| e.job.enqueued))
            .min(),
        now,
        instance_idle: idle,
        closing: core.closing,
    };
    match shared.policy.decide(&state) {
        Decision::Dispatch => Next::Due(Batch {
            jobs: take(core, shared),
            dispatched: Instant::now(),
        }),
        Decision::Wait(until) => Next::NotBefore(until),
    }
}

/// Under the lock: a due batch and an idle instance to run it on, when that batch is short enough
/// (by its measured run time) to run on the calling thread ([`super::BatcherConfig::inline_run`]).
pub(super) fn take_in_place(
    core: &mut Core,
    shared: &Shared,
    now: Instant,
) -> Option<(usize, Batch)> {
    let size = core.queued().min(shared.policy.max_batch_size);
    if core.idle.is_empty() || !instance::runs_in_place(shared, size) {
        return None;
    }
    let batch = next_batch(core, shared, now, true).due()?;
    let instance = core.idle.pop().expect("checked above");
    Some((instance, batch))
}

/// Answers and removes entries whose caller went away, whose deadline passed, or whose deadline
/// would pass before the next batch finished (by the measured run time of a batch of that size):
/// running them would be work nobody waits for. Their queue places are released as the entries
/// drop.
fn drop_dead(core: &mut Core, shared: &Shared, now: Instant) {
    let metrics = &shared.metrics;
    let max_batch = shared.policy.max_batch_size;
    let run = shared.times.of(core.queued().clamp(1, max_batch));
    for queue in &mut core.queues {
        queue.retain_mut(|entry| {
            let error = match entry.deadline {
                Some(d) if d <= now => Some(BatchError::DeadlineExceeded {
                    waited_ms: (now - entry.job.enqueued).as_millis() as u64,
                }),
                Some(d) if d <= now + run => Some(BatchError::WouldMissDeadline {
                    left_ms: (d - now).as_millis() as u64,
                    run_ms: run.as_millis() as u64,
                }),
                _ => None,
            };
            if let Some(error) = error {
                metrics.dropped("deadline", 1);
                // Take the sender out of the entry to answer it.
                let (placeholder, _) = tokio::sync::oneshot::channel();
                let reply = std::mem::replace(&mut entry.job.reply, placeholder);
                let _ = reply.send(Err(error));
                return false;
            }
            if entry.job.reply.is_closed() {
                metrics.dropped("cancelled", 1);
                return false;
            }
            true
        });
    }
}

/// Takes up to `max_batch_size` images, highest priority first.
fn take(core: &mut Core, shared: &Shared) -> Vec<Job> {
    let max = shared.policy.max_batch_size;
    let mut jobs = Vec::with_capacity(max);
    for p in Priority::ALL {
        let queue = &mut core.queues[p.index()];
        let mut take = queue.len().min(max - jobs.len());
        // With more than a batch waiting (saturation), a batch never straddles two buffers: it
        // ends at its first buffer's last row, so the next batch starts at row 0 of the next
        // buffer and, like every one after it, runs in place. Without this, one partial batch
        // shifts the batches against the buffers for good and every batch is gathered (seen on a
        // GPU: 4.5 ms of copying per 32-image batch, against an 8 ms run).
        if jobs.is_empty() && take == max && queue.len() > take {
            let first = &queue[0].job.tensor;
            take = queue
                .iter()
                .take(take)
                .take_while(|e| e.job.tensor.same_buffer(first))
                .count();
        }
        // The entries' permits drop here: dispatched images no longer hold queue places; their
        // queue spans end.
        jobs.extend(queue.drain(..take).map(|entry| {
            entry.job.queued.end();
            entry.job
        }));
    }
    // A batch that took the last row claimed so far of the buffer its priority is filling has
    // caught up with preprocessing: the next image starts a fresh buffer at row 0, so that the
    // next batch is again rows 0.. of one buffer instead of straddling two.
    for p in Priority::ALL {
        if let Some(last) = jobs
            .iter()
            .filter(|j| j.priority == p)
            .map(|j| &j.tensor)
            .max_by_key(|t| t.order())
        {
            shared.pool.seal_if_last(p, last);
        }
    }
    jobs
}

/// The queue task: dispatches to instances that wait for work, on its timer (a partial batch whose
/// oldest image has waited `max_queue_delay`) and on news. It ends, after flushing the queue, once
/// every [`super::Batcher`] handle is gone (`handles` closes).
pub(super) struct QueueTask {
    pub shared: Arc<Shared>,
    pub handles: mpsc::UnboundedReceiver<std::convert::Infallible>,
    pub instance_txs: Vec<mpsc::UnboundedSender<Batch>>,
}

impl QueueTask {
    pub async fn run(mut self) {
        loop {
            let now = Instant::now();
            let step = {
                let mut core = lock(&self.shared);
                let idle = !core.idle.is_empty();
                match next_batch(&mut core, &self.shared, now, idle) {
                    Next::Due(batch) => {
                        let instance = core.idle.pop().expect("dispatched to an idle instance");
                        Ok((instance, batch))
                    }
                    Next::NotBefore(_) if core.closing && core.queued() == 0 => break,
                    Next::NotBefore(until) => Err((until, core.closing)),
                }
            };
            self.shared.publish_depth();
            match step {
                Ok((instance, batch)) => self.send(instance, batch),
                Err((until, closing)) => {
                    let timer = async {
                        match until {
                            Some(t) => tokio::time::sleep_until(t).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        biased;
                        () = self.shared.wake.notified() => {}
                        None = self.handles.recv(), if !closing => lock(&self.shared).closing = true,
                        () = timer => {}
                    }
                }
            }
        }
        // Dropping the instance senders ends the instance threads once they finish their batch.
    }

    fn send(&self, instance: usize, batch: Batch) {
        if instance::runs_in_place(&self.shared, batch.jobs.len()) {
            instance::run_in_place(&self.shared, instance, batch);
            return;
        }
        if let Err(mpsc::error::SendError(batch)) = self.instance_txs[instance].send(batch) {
            // The instance thread is gone (it only ends when this task ends): answer, don't hang.
            for job in batch.jobs {
                let _ = job.reply.send(Err(BatchError::Stopped));
            }
        }
    }
}
