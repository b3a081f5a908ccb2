//! Dynamic batcher of one model version, model-agnostic: f32 tensors of `input_len` values in, one
//! output of `output_len` values per image out. The queue ([`queue`]) is shared under a lock;
//! batches are formed by the policy in [`policy`], by the queue task for an idle instance and by an
//! instance for itself as it finishes a batch; each model instance ([`instance`]) runs batches on
//! its own OS thread. Callers hold a cloneable [`Batcher`]: they [`Batcher::reserve`] queue places
//! (one semaphore permit per image, released on dispatch, expiry or cancel), split the
//! [`Reservation`] into [`Place`]s, [`Place::claim`] each image's row of a batch buffer as its
//! preprocessing starts, then [`Batcher::submit`] the [`Ticket`]s (place + row) and await each
//! image's answer on a oneshot.

mod buffers;
mod dispatch;
mod estimate;
mod instance;
pub(crate) mod policy;
mod queue;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::backend::host::HostMemory;
use crate::backend::{BatchSizes, EngineError, InstanceFactory};
use crate::metrics::ModelMetrics;
pub use crate::priority::Priority;
pub(crate) use buffers::Slot;

/// Batching knobs of one model version.
#[derive(Debug, Clone)]
pub struct BatcherConfig {
    /// The batch sizes: the largest batch, and what warm-up runs.
    pub sizes: BatchSizes,
    /// How long the oldest queued image may wait for a batch to fill.
    pub max_queue_delay: Duration,
    /// Most images admitted per priority (indexed by [`Priority::ALL`] order); more are refused.
    pub queue_capacity: [usize; 2],
    /// Number of model instances (threads, each with its own backend).
    pub instances: usize,
    /// Longest a request may expect to wait for its answer: one that would wait longer (by the
    /// measured batch times) is refused at admission, deadline or not. `None`: no limit.
    pub max_queue_wait: Option<Duration>,
    /// f32 values per input image.
    pub input_len: usize,
    /// f32 values per output.
    pub output_len: usize,
    /// Batch buffers and the instances' gather buffers: page-locked on CUDA (see
    /// [`crate::backend::host`]).
    pub host_memory: HostMemory,
    /// A batch whose measured run time is at most this runs on the thread that forms it, on an
    /// idle instance's engine, instead of being handed to the instance thread (zero: never).
    pub inline_run: Duration,
}

/// One image's rows of its batch's output, without a copy: every image of a batch shares the one
/// pooled buffer the model run wrote (a segmentation model's output is a megabyte per slice),
/// which goes back to the model's output pool when the last of them is done with it.
#[derive(Debug, Clone)]
pub struct OutputRows {
    batch: Arc<buffers::PooledOutput>,
    start: usize,
    len: usize,
}

impl OutputRows {
    /// Rows `start..start + len` of `batch`.
    pub(crate) fn new(batch: Arc<buffers::PooledOutput>, start: usize, len: usize) -> Self {
        assert!(
            start + len <= batch.data.len(),
            "rows inside the batch: this is a bug"
        );
        OutputRows { batch, start, len }
    }
}

/// Rows are equal when their values are.
impl PartialEq for OutputRows {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::ops::Deref for OutputRows {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.batch.data[self.start..self.start + self.len]
    }
}

/// The answer for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageOutput {
    /// The model's output for this image (`output_len` values).
    pub values: OutputRows,
    /// Images in the batch this one ran in.
    pub batch_size: usize,
    /// Time from enqueue to the batch being handed to an instance.
    pub queue_time: Duration,
    /// Model run time of the batch.
    pub inference_time: Duration,
    /// When the batch's run ended (the "reply" stage runs from here to the caller's result).
    pub finished: std::time::Instant,
}

/// Why an image (or a whole request) got no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    #[error(
        "queue is full: {waiting} images waiting, capacity {capacity} ({} priority); retry later",
        priority.as_str()
    )]
    QueueFull {
        priority: Priority,
        waiting: usize,
        capacity: usize,
    },
    #[error("deadline exceeded after {waited_ms} ms in the queue")]
    DeadlineExceeded { waited_ms: u64 },
    #[error(
        "the model cannot answer before the deadline: about {need_ms} ms of work is ahead of this \
         request and {left_ms} ms are left; retry later or on another replica"
    )]
    WontFinish { need_ms: u64, left_ms: u64 },
    #[error(
        "the model is overloaded: about {need_ms} ms of work is ahead of this request, over the \
         {limit_ms} ms limit; retry later or on another replica"
    )]
    QueueTooLong { need_ms: u64, limit_ms: u64 },
    #[error(
        "deadline would pass before the image's batch ran: {left_ms} ms left, a batch takes about \
         {run_ms} ms"
    )]
    WouldMissDeadline { left_ms: u64, run_ms: u64 },
    /// The model run of batch `batch` failed. The error's text is for the server log; callers get
    /// [`BatchError::public_message`].
    #[error("batch {batch}: {error}")]
    Engine { batch: u64, error: EngineError },
    #[error("the batcher has stopped")]
    Stopped,
}

impl BatchError {
    /// The message for callers: the same as `Display`, except that a failed model run says only
    /// that it failed and which batch the server log describes (ONNX Runtime's messages carry
    /// source paths, C++ signatures and node names, which callers have no use for).
    pub fn public_message(&self) -> String {
        match self {
            BatchError::Engine { batch, error } => {
                let what = match error {
                    EngineError::Panic { .. } => "the model instance panicked",
                    _ => "the model run failed",
                };
                format!("inference failed: {what} (batch {batch}; the server log has the details)")
            }
            other => other.to_string(),
        }
    }
}

pub use queue::Pending;

/// Queue places for the images of one request, taken before they are decoded. Dropping it (a
/// request that failed before submitting) gives the places back.
pub struct Reservation {
    permits: OwnedSemaphorePermit,
    priority: Priority,
    shared: Arc<Shared>,
}

impl Reservation {
    /// Images it holds places for.
    pub fn len(&self) -> usize {
        self.permits.num_permits()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// One place per image, each to [`Place::claim`] its image's row when its preprocessing
    /// starts (rows follow the order images reach the queue).
    pub fn into_places(mut self) -> Vec<Place> {
        let n = self.len();
        let mut places = Vec::with_capacity(n);
        for _ in 0..n {
            let permit = self
                .permits
                .split(1)
                .expect("one permit per place, counted above");
            places.push(Place {
                permit,
                priority: self.priority,
                shared: self.shared.clone(),
            });
        }
        places
    }
}

/// One image's queue place, not yet holding a tensor.
pub struct Place {
    permit: OwnedSemaphorePermit,
    priority: Priority,
    shared: Arc<Shared>,
}

impl Place {
    /// The next free row of the batch buffer of this place's priority, to preprocess the image
    /// into ([`Ticket::as_mut_slice`], `input_len` values), then [`Batcher::submit`] it.
    pub fn claim(self) -> Ticket {
        Ticket {
            slot: self.shared.pool.claim(self.priority),
            place: self.permit,
            priority: self.priority,
        }
    }

    /// A row holding a copy of `tensor` (`input_len` values).
    pub fn fill(self, tensor: &[f32]) -> Ticket {
        let mut ticket = self.claim();
        ticket.as_mut_slice().copy_from_slice(tensor);
        ticket
    }
}

/// One image ready to queue: its queue place and its row of a batch buffer. Each ticket carries
/// its own place, so what is submitted can never outnumber what was reserved.
pub struct Ticket {
    slot: Slot,
    place: OwnedSemaphorePermit,
    priority: Priority,
}

impl Ticket {
    /// The image's row, to write its tensor into.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        self.slot.as_mut_slice()
    }

    /// The row's values.
    pub fn as_slice(&self) -> &[f32] {
        self.slot.as_slice()
    }
}

/// What the work of one image carries through the queue into its batch.
pub(crate) struct Job {
    /// The image's tensor, in its row of a batch buffer.
    tensor: Slot,
    priority: Priority,
    enqueued: Instant,
    reply: oneshot::Sender<Result<ImageOutput, BatchError>>,
    /// The request's span: instance logs about this image are emitted inside it.
    span: tracing::Span,
    /// The image's wait in the queue, a child of `span`: ends when a batch takes the image or
    /// the caller stops waiting.
    queued: queue::QueueWait,
}

/// One queued image: its job, its deadline and its queue place.
pub(crate) struct Entry {
    job: Job,
    deadline: Option<Instant>,
    /// Released on dispatch, expiry or cancel (whenever the entry leaves the queue).
    _place: OwnedSemaphorePermit,
}

/// State shared by the handles, the queue task and the instances.
struct Shared {
    config: BatcherConfig,
    metrics: ModelMetrics,
    /// Queue places per priority ([`Priority::ALL`] order).
    places: [Arc<Semaphore>; 2],
    /// Measured run time of each batch size.
    times: estimate::ServiceTimes,
    /// Instances running a batch now.
    busy: AtomicUsize,
    /// Number of the next batch (for logs, and errors that point to them).
    next_batch: std::sync::atomic::AtomicU64,
    /// The batch buffers images are preprocessed into.
    pool: buffers::BufferPool,
    /// The buffers batches' outputs are written into.
    outputs: Arc<buffers::OutputPool>,
    policy: policy::BatchPolicy,
    /// The queued images and the idle instances.
    core: std::sync::Mutex<queue::Core>,
    /// Wakes the queue task: images were queued, or an instance went idle while images wait.
    wake: Notify,
    /// Each instance's engine once it is warm. Its thread locks it to run a batch, and so does a
    /// thread that runs a short batch in place ([`BatcherConfig::inline_run`]); either only ever
    /// runs an instance that is not running anything else, so the lock is never waited on.
    engines: Vec<std::sync::Mutex<Option<instance::Engine>>>,
}

impl Shared {
    /// Whether a batch of `size` images runs on the thread that dispatches it: its measured run
    /// time is within [`BatcherConfig::inline_run`]. For very small models the hand-off to the
    /// instance thread and the answer's way back (two thread wake-ups) cost more than the run.
    fn runs_in_place(&self, size: usize) -> bool {
        let limit = self.config.inline_run;
        !limit.is_zero() && self.times.of(size) <= limit
    }

    /// Images holding a place of `priority` now (being decoded, or queued).
    fn waiting(&self, priority: Priority) -> usize {
        let i = priority.index();
        self.config.queue_capacity[i] - self.places[i].available_permits()
    }

    fn publish_depth(&self) {
        for p in Priority::ALL {
            self.metrics.set_queue_depth(p, self.waiting(p));
        }
    }
}

/// Cheap cloneable handle to the queue task; the task (and then the instances) ends once every
/// handle is dropped and the queue is empty.
#[derive(Clone)]
pub struct Batcher {
    /// Never sent on: the queue task sees it close when the last handle is dropped.
    handles: mpsc::UnboundedSender<std::convert::Infallible>,
    shared: Arc<Shared>,
}

impl Batcher {
    /// Starts the instances (each builds its backend and runs every warm-up batch size) and the
    /// queue task. Returns once every instance is warm, or with the first instance's error.
    pub async fn start(
        config: BatcherConfig,
        factory: InstanceFactory,
        metrics: ModelMetrics,
    ) -> Result<Batcher, EngineError> {
        assert!(config.instances > 0, "validated by the caller");
        let shared = Arc::new(Shared {
            pool: buffers::BufferPool::new(
                config.sizes.max(),
                config.input_len,
                2 * config.instances + 2,
                config.host_memory,
                metrics.clone(),
            ),
            // As many as the input buffers: a batch's output is held while its images are
            // postprocessed and answered.
            outputs: buffers::OutputPool::new(
                config.sizes.max(),
                config.output_len,
                2 * config.instances + 2,
                metrics.clone(),
            ),
            places: config.queue_capacity.map(|c| Arc::new(Semaphore::new(c))),
            times: estimate::ServiceTimes::new(config.sizes.max()),
            busy: AtomicUsize::new(0),
            next_batch: std::sync::atomic::AtomicU64::new(1),
            policy: policy::BatchPolicy {
                max_batch_size: config.sizes.max(),
                max_queue_delay: config.max_queue_delay,
            },
            core: Default::default(),
            wake: Notify::new(),
            engines: (0..config.instances).map(|_| Default::default()).collect(),
            config,
            metrics,
        });
        let instance_txs = instance::start_all(shared.clone(), factory).await?;
        let (handles, handles_rx) = mpsc::unbounded_channel();
        let task = dispatch::QueueTask {
            shared: shared.clone(),
            handles: handles_rx,
            instance_txs,
        };
        tokio::spawn(task.run());
        Ok(Batcher { handles, shared })
    }

    /// Takes `n` queue places of `priority`, all or none, without waiting, before any image is
    /// decoded. Refused at once: a full queue; work that by the measured batch times cannot be
    /// answered before `deadline`; work that would wait longer than `max_queue_wait`.
    pub fn reserve(
        &self,
        n: usize,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<Reservation, BatchError> {
        let shared = &self.shared;
        let config = &shared.config;
        let need = self.time_to_finish(n, priority);
        let need_ms = need.as_millis() as u64;
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                shared.metrics.dropped("deadline", n);
                return Err(BatchError::DeadlineExceeded { waited_ms: 0 });
            }
            if need > left {
                shared.metrics.dropped("overload", n);
                return Err(BatchError::WontFinish {
                    need_ms,
                    left_ms: left.as_millis() as u64,
                });
            }
        }
        if let Some(limit) = config.max_queue_wait
            && need > limit
        {
            shared.metrics.dropped("overload", n);
            return Err(BatchError::QueueTooLong {
                need_ms,
                limit_ms: limit.as_millis() as u64,
            });
        }
        let i = priority.index();
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        match shared.places[i].clone().try_acquire_many_owned(n32) {
            Ok(permits) => {
                shared.publish_depth();
                Ok(Reservation {
                    permits,
                    priority,
                    shared: shared.clone(),
                })
            }
            Err(_) => {
                shared.metrics.dropped("queue_full", n);
                Err(BatchError::QueueFull {
                    priority,
                    waiting: shared.waiting(priority),
                    capacity: config.queue_capacity[i],
                })
            }
        }
    }

    /// Expected time until `n` new images of `priority` would be answered.
    pub fn time_to_finish(&self, n: usize, priority: Priority) -> Duration {
        let shared = &self.shared;
        let ahead: usize = Priority::ALL
            .iter()
            .filter(|p| **p <= priority)
            .map(|p| shared.waiting(*p))
            .sum();
        let backlog = estimate::Backlog {
            ahead,
            new: n,
            max_batch: shared.config.sizes.max(),
            instances: shared.config.instances,
            all_busy: shared.busy.load(Ordering::SeqCst) >= shared.config.instances,
            max_queue_delay: shared.config.max_queue_delay,
        };
        estimate::time_to_finish(&backlog, |size| shared.times.of(size))
    }

    /// Queues the images of `tickets`, each in its own reserved place. Each receiver yields that
    /// image's answer; `span` is the request's tracing span.
    pub fn submit(
        &self,
        tickets: Vec<Ticket>,
        deadline: Option<Instant>,
        span: &tracing::Span,
    ) -> Result<Vec<Pending>, BatchError> {
        if self.handles.is_closed() {
            // The queue task is gone (the runtime is shutting down): nothing would run these.
            return Err(BatchError::Stopped);
        }
        let now = Instant::now();
        let mut pending = Vec::with_capacity(tickets.len());
        let mut entries = Vec::with_capacity(tickets.len());
        for Ticket {
            slot,
            place,
            priority,
        } in tickets
        {
            debug_assert_eq!(slot.as_slice().len(), self.shared.config.input_len);
            let (reply, rx) = oneshot::channel();
            let queued = queue::QueueWait::start(span);
            pending.push(Pending::new(rx, queued.clone()));
            let entry = Entry {
                job: Job {
                    tensor: slot,
                    priority,
                    enqueued: now,
                    reply,
                    span: span.clone(),
                    queued,
                },
                deadline,
                _place: place,
            };
            entries.push(entry);
        }
        let in_place = {
            let mut core = queue::lock(&self.shared);
            for entry in entries {
                core.push(entry);
            }
            queue::take_in_place(&mut core, &self.shared, now)
        };
        match in_place {
            // A short batch is due and an instance is idle: it runs here, with no hand-off to the
            // queue task and the instance thread and back.
            Some((instance, batch)) => {
                self.shared.publish_depth();
                instance::run_in_place(&self.shared, instance, batch);
            }
            None => self.shared.wake.notify_one(),
        }
        Ok(pending)
    }

    /// Images of `priority` holding a queue place now (being decoded, or queued).
    pub fn queue_depth(&self, priority: Priority) -> usize {
        self.shared.waiting(priority)
    }

    pub fn config(&self) -> &BatcherConfig {
        &self.shared.config
    }
}

#[cfg(test)]
mod tests;
