//! The batch policy, a pure function of the queue's state: dispatch when an instance is free and the
//! batch is full, or its oldest image has waited `max_queue_delay`, or the batcher is closing.

use std::time::Duration;

use tokio::time::Instant;

/// tokio's timer fires on whole milliseconds, rounded up, so a timer set for the exact deadline
/// wakes 0–1.5 ms late (measured: a 2 ms delay cost 3.4 ms). The policy treats a batch as due up
/// to this much early, so the oldest image waits about `max_queue_delay`, not a tick more.
pub(crate) const TIMER_SLACK: Duration = Duration::from_millis(1);

/// What the queue task does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Hand a batch to an idle instance now.
    Dispatch,
    /// Wait for news (a new image, a free instance) or until this instant.
    Wait(Option<Instant>),
}

/// The queue as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueState {
    /// Images queued, all priorities.
    pub queued: usize,
    /// When the longest-waiting queued image was enqueued.
    pub oldest: Option<Instant>,
    pub now: Instant,
    /// Some instance is free to take a batch.
    pub instance_idle: bool,
    /// No more images will arrive: flush without waiting.
    pub closing: bool,
}

/// The batching knobs the policy applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchPolicy {
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
}

impl BatchPolicy {
    /// A batch goes when an instance is free and the batch is full, or its oldest image has waited
    /// `max_queue_delay` (less [`TIMER_SLACK`], at most half the delay), or the batcher is closing.
    pub fn decide(&self, s: &QueueState) -> Decision {
        let Some(oldest) = s.oldest else {
            return Decision::Wait(None);
        };
        if s.queued == 0 || !s.instance_idle {
            return Decision::Wait(None);
        }
        let delay = self.max_queue_delay;
        let due = oldest + delay - TIMER_SLACK.min(delay / 2);
        if s.queued >= self.max_batch_size || s.closing || s.now >= due {
            Decision::Dispatch
        } else {
            Decision::Wait(Some(due))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(queued: usize, oldest: Instant, now: Instant, idle: bool) -> QueueState {
        QueueState {
            queued,
            oldest: Some(oldest),
            now,
            instance_idle: idle,
            closing: false,
        }
    }

    #[test]
    fn dispatches_full_batches_at_once_and_partial_ones_when_due() {
        let t0 = Instant::now();
        let d = Duration::from_millis(10);
        let policy = BatchPolicy {
            max_batch_size: 4,
            max_queue_delay: d,
        };
        assert_eq!(policy.decide(&state(4, t0, t0, true)), Decision::Dispatch);
        // Due one timer tick early: tokio's 1 ms timer rounds up.
        let due = t0 + d - TIMER_SLACK;
        assert_eq!(
            policy.decide(&state(3, t0, t0, true)),
            Decision::Wait(Some(due))
        );
        assert_eq!(
            policy.decide(&state(3, t0, due - Duration::from_micros(1), true)),
            Decision::Wait(Some(due))
        );
        assert_eq!(policy.decide(&state(3, t0, due, true)), Decision::Dispatch);
        // No idle instance: keep forming the batch, no timer needed.
        assert_eq!(
            policy.decide(&state(9, t0, t0 + d, false)),
            Decision::Wait(None)
        );
        let empty = QueueState {
            queued: 0,
            oldest: None,
            now: t0,
            instance_idle: true,
            closing: false,
        };
        assert_eq!(policy.decide(&empty), Decision::Wait(None));
        // Closing flushes what is left without waiting.
        let closing = QueueState {
            closing: true,
            ..state(1, t0, t0, true)
        };
        assert_eq!(policy.decide(&closing), Decision::Dispatch);
    }

    #[test]
    fn short_delays_keep_at_least_half_of_their_wait() {
        let t0 = Instant::now();
        let short = Duration::from_micros(600);
        let policy = BatchPolicy {
            max_batch_size: 4,
            max_queue_delay: short,
        };
        assert_eq!(
            policy.decide(&state(1, t0, t0, true)),
            Decision::Wait(Some(t0 + short / 2))
        );
    }
}
