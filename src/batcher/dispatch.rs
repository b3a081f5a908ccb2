//! The queue task: hands due batches to idle instances (or runs a short one in place), on its
//! timer and on news, until every batcher handle is gone.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::queue::{Batch, Next, lock, next_batch};
use super::{BatchError, Shared, instance};

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
        if self.shared.runs_in_place(batch.jobs.len()) {
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
