//! Readiness and drain, in one place. [`ServingState`] is a tokio `watch` of the server's phase and
//! of each model's readiness: gRPC health, `/readyz` and every other readiness surface read it
//! (none keeps its own flag). [`Inflight`] counts calls in progress so the drain can wait for them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, watch};

/// Where the server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Loading and warming up the models; nothing is served yet.
    Starting,
    /// Serving requests.
    Serving,
    /// Shutting down: new work is refused, work in progress finishes.
    Draining,
}

/// One snapshot of readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub phase: Phase,
    /// Model name → whether at least one of its versions is loaded and warm.
    pub models: BTreeMap<String, bool>,
}

impl Readiness {
    /// The server as a whole takes requests.
    pub fn server_ready(&self) -> bool {
        self.phase == Phase::Serving
    }

    /// `model` takes requests.
    pub fn model_ready(&self, model: &str) -> bool {
        self.server_ready() && self.models.get(model).copied().unwrap_or(false)
    }
}

/// The readiness of the server and its models; cheap to share (`Arc`), many readers.
pub struct ServingState {
    tx: watch::Sender<Readiness>,
    inflight: Arc<Inflight>,
}

impl Default for ServingState {
    fn default() -> Self {
        Self::new()
    }
}

impl ServingState {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Readiness {
            phase: Phase::Starting,
            models: BTreeMap::new(),
        });
        ServingState {
            tx,
            inflight: Arc::new(Inflight::default()),
        }
    }

    /// The current snapshot.
    pub fn get(&self) -> Readiness {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every later change.
    pub fn subscribe(&self) -> watch::Receiver<Readiness> {
        self.tx.subscribe()
    }

    pub fn phase(&self) -> Phase {
        self.tx.borrow().phase
    }

    pub fn is_draining(&self) -> bool {
        self.phase() == Phase::Draining
    }

    /// Moves to `phase` (never back out of `Draining`).
    pub fn set_phase(&self, phase: Phase) {
        self.tx.send_if_modified(|r| {
            let changed = r.phase != phase && r.phase != Phase::Draining;
            if changed {
                r.phase = phase;
            }
            changed
        });
    }

    /// Records whether `model` can serve.
    pub fn set_model(&self, model: &str, ready: bool) {
        self.tx.send_if_modified(|r| {
            let changed = r.models.get(model) != Some(&ready);
            r.models.insert(model.to_string(), ready);
            changed
        });
    }

    /// Forgets a model that was unloaded.
    pub fn remove_model(&self, model: &str) {
        self.tx
            .send_if_modified(|r| r.models.remove(model).is_some());
    }

    /// Resolves once the server starts draining.
    pub async fn draining(&self) {
        let mut rx = self.subscribe();
        // The sender lives as long as `self`, so `wait_for` only ends on the condition.
        let _ = rx.wait_for(|r| r.phase == Phase::Draining).await;
    }

    /// The in-flight call counter.
    pub fn inflight(&self) -> &Arc<Inflight> {
        &self.inflight
    }
}

/// Counts calls in progress so shutdown can wait for them.
#[derive(Default)]
pub struct Inflight {
    count: AtomicUsize,
    idle: Notify,
}

impl Inflight {
    /// Counts one call until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> InflightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InflightGuard(self.clone())
    }

    /// Calls in progress now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves when no call is in progress.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One call in progress; dropping it ends the call for the drain.
pub struct InflightGuard(Arc<Inflight>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Runs `tick` every `every`, the first time one period from now, until the task is aborted or
/// the runtime ends; a late tick is delayed, not bunched up (the file and repository pollers).
pub fn spawn_every<F, Fut>(every: std::time::Duration, mut tick: F) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            interval.tick().await;
            tick().await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn draining_is_final_and_wakes_waiters() {
        let state = Arc::new(ServingState::new());
        assert!(!state.get().server_ready());
        state.set_model("m", true);
        assert!(
            !state.get().model_ready("m"),
            "not before the server serves"
        );
        state.set_phase(Phase::Serving);
        assert!(state.get().model_ready("m"));
        assert!(!state.get().model_ready("other"));
        let waiter = tokio::spawn({
            let state = state.clone();
            async move { state.draining().await }
        });
        state.set_phase(Phase::Draining);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("draining() resolves")
            .unwrap();
        state.set_phase(Phase::Serving);
        assert_eq!(state.phase(), Phase::Draining, "no way back from draining");
    }

    #[tokio::test]
    async fn inflight_waits_for_the_last_guard() {
        let inflight = Arc::new(Inflight::default());
        let a = inflight.enter();
        let b = inflight.enter();
        assert_eq!(inflight.count(), 2);
        drop(a);
        let waiting = tokio::spawn({
            let inflight = inflight.clone();
            async move { inflight.wait_idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(b);
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("idle once the last guard is gone")
            .unwrap();
    }
}
