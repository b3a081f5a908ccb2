//! The queue task: the one owner of the queued images (one FIFO per priority). It wakes on a new
//! image, a free instance or its timer; drops images whose caller left or whose deadline passed;
//! asks the policy whether to dispatch; and fills each batch from the highest priority first.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::policy::{BatchPolicy, Decision, QueueState};
use super::{BatchError, Entry, Job, Priority, Shared};

/// A batch handed to an instance.
pub(super) struct Batch {
    pub jobs: Vec<Job>,
    pub dispatched: Instant,
}

pub(super) struct QueueTask {
    shared: Arc<Shared>,
    policy: BatchPolicy,
    rx: mpsc::UnboundedReceiver<Entry>,
    ready_rx: mpsc::UnboundedReceiver<usize>,
    instance_txs: Vec<mpsc::UnboundedSender<Batch>>,
    idle: Vec<usize>,
    /// One FIFO per priority, [`Priority::ALL`] order.
    queues: [VecDeque<Entry>; 2],
}

impl QueueTask {
    pub fn new(
        shared: Arc<Shared>,
        rx: mpsc::UnboundedReceiver<Entry>,
        ready_rx: mpsc::UnboundedReceiver<usize>,
        instance_txs: Vec<mpsc::UnboundedSender<Batch>>,
    ) -> Self {
        let policy = BatchPolicy {
            max_batch_size: shared.config.sizes.max(),
            max_queue_delay: shared.config.max_queue_delay,
        };
        QueueTask {
            shared,
            policy,
            rx,
            ready_rx,
            instance_txs,
            idle: Vec::new(),
            queues: [VecDeque::new(), VecDeque::new()],
        }
    }

    pub async fn run(mut self) {
        let mut closing = false;
        loop {
            let now = Instant::now();
            self.drop_dead(now);
            let state = QueueState {
                queued: self.queues.iter().map(VecDeque::len).sum(),
                // Queues are in row order, which is nearly but not exactly arrival order: the
                // oldest image is looked for in all of them.
                oldest: self
                    .queues
                    .iter()
                    .flat_map(|q| q.iter().map(|e| e.job.enqueued))
                    .min(),
                now,
                instance_idle: !self.idle.is_empty(),
                closing,
            };
            match self.policy.decide(&state) {
                Decision::Dispatch => self.dispatch(),
                Decision::Wait(_) if closing && state.queued == 0 => break,
                Decision::Wait(until) => {
                    let timer = async {
                        match until {
                            Some(t) => tokio::time::sleep_until(t).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        biased;
                        Some(instance) = self.ready_rx.recv() => self.idle.push(instance),
                        entry = self.rx.recv(), if !closing => match entry {
                            Some(entry) => {
                                self.push(entry);
                                // Take whatever else is already waiting, so a burst forms one batch.
                                while let Ok(entry) = self.rx.try_recv() {
                                    self.push(entry);
                                }
                            }
                            None => closing = true,
                        },
                        () = timer => {}
                    }
                }
            }
            self.shared.publish_depth();
        }
        // Dropping the instance senders ends the instance threads once they finish their batch.
    }

    /// Queues an image in the order its batch-buffer row was claimed (when its preprocessing
    /// started), not the order it finished preprocessing: batches taken from the front are then
    /// consecutive rows of one buffer and run in place. Nearly always a push at the back.
    fn push(&mut self, entry: Entry) {
        let queue = &mut self.queues[entry.job.priority.index()];
        let key = entry.job.tensor.order();
        let at = queue.partition_point(|e| e.job.tensor.order() <= key);
        queue.insert(at, entry);
    }

    /// Answers and removes entries whose caller went away, whose deadline passed, or whose
    /// deadline would pass before the next batch finished (by the measured run time of a batch of
    /// that size): running them would be work nobody waits for. Their queue places are released
    /// as the entries drop.
    fn drop_dead(&mut self, now: Instant) {
        let metrics = &self.shared.metrics;
        let queued: usize = self.queues.iter().map(VecDeque::len).sum();
        let run = self
            .shared
            .times
            .of(queued.clamp(1, self.policy.max_batch_size));
        for queue in &mut self.queues {
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

    /// Hands up to `max_batch_size` images, highest priority first, to an idle instance.
    fn dispatch(&mut self) {
        let instance = self
            .idle
            .pop()
            .expect("the policy dispatches only with an idle instance");
        let mut jobs = Vec::with_capacity(self.policy.max_batch_size);
        for p in Priority::ALL {
            let queue = &mut self.queues[p.index()];
            let mut take = queue.len().min(self.policy.max_batch_size - jobs.len());
            // With more than a batch waiting (saturation), a batch never straddles two buffers: it
            // ends at its first buffer's last row, so the next batch starts at row 0 of the next
            // buffer and, like every one after it, runs in place. Without this, one partial batch
            // shifts the batches against the buffers for good and every batch is gathered (seen
            // on a GPU: 4.5 ms of copying per 32-image batch, against an 8 ms run).
            if jobs.is_empty() && take == self.policy.max_batch_size && queue.len() > take {
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
                let mut job = entry.job;
                job.queued = tracing::Span::none();
                job
            }));
        }
        // A batch that took the last row claimed so far of the buffer its priority is filling
        // has caught up with preprocessing: the next image starts a fresh buffer at row 0, so
        // that the next batch is again rows 0.. of one buffer instead of straddling two.
        for p in Priority::ALL {
            if let Some(last) = jobs
                .iter()
                .filter(|j| j.priority == p)
                .map(|j| &j.tensor)
                .max_by_key(|t| t.order())
            {
                self.shared.pool.seal_if_last(p, last);
            }
        }
        let batch = Batch {
            jobs,
            dispatched: Instant::now(),
        };
        if let Err(mpsc::error::SendError(batch)) = self.instance_txs[instance].send(batch) {
            // The instance thread is gone (it only ends when this task ends): answer, don't hang.
            for job in batch.jobs {
                let _ = job.reply.send(Err(BatchError::Stopped));
            }
        }
    }
}
