//! How long work will take: each batch size's measured run time (an exponentially weighted
//! average, seeded by warm-up), and from it the time a new request would need to be answered.
//! Admission refuses what cannot finish before its deadline (or within the longest queue wait
//! allowed), and dispatch drops what no longer can: a batcher past saturation then spends its time
//! on work that still counts, instead of on answers nobody waits for.

use std::sync::Mutex;
use std::time::Duration;

/// Weight of the newest run in the average.
const ALPHA: f64 = 0.25;

/// Run time of a batch of each size, 1..=max.
pub(crate) struct ServiceTimes {
    /// Seconds per batch size (index = size; 0 = not measured yet).
    secs: Mutex<Vec<f64>>,
}

impl ServiceTimes {
    pub fn new(max_batch: usize) -> Self {
        ServiceTimes {
            secs: Mutex::new(vec![0.0; max_batch + 1]),
        }
    }

    /// A batch of `size` ran for `took`.
    pub fn record(&self, size: usize, took: Duration) {
        let mut secs = self.secs.lock().expect("service times lock");
        if let Some(slot) = secs.get_mut(size) {
            let t = took.as_secs_f64();
            *slot = if *slot == 0.0 {
                t
            } else {
                *slot + ALPHA * (t - *slot)
            };
        }
    }

    /// Sets the average of `size` (tests).
    #[cfg(test)]
    pub fn set(&self, size: usize, took: Duration) {
        self.secs.lock().expect("service times lock")[size] = took.as_secs_f64();
    }

    /// Expected run time of a batch of `size`: its own average, else the nearest measured larger
    /// size's (a safe overestimate), else a larger one scaled, else zero (nothing measured yet).
    pub fn of(&self, size: usize) -> Duration {
        let secs = self.secs.lock().expect("service times lock");
        let size = size.clamp(1, secs.len() - 1);
        if secs[size] > 0.0 {
            return Duration::from_secs_f64(secs[size]);
        }
        if let Some(&t) = secs[size..].iter().find(|&&t| t > 0.0) {
            return Duration::from_secs_f64(t);
        }
        secs[1..size]
            .iter()
            .enumerate()
            .rev()
            .find(|(_, t)| **t > 0.0)
            .map_or(Duration::ZERO, |(i, t)| {
                Duration::from_secs_f64(t * size as f64 / (i + 1) as f64)
            })
    }
}

/// What the estimate needs to know about the queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backlog {
    /// Images that will run before the new ones (same or higher priority, holding places).
    pub ahead: usize,
    /// The new request's images.
    pub new: usize,
    pub max_batch: usize,
    pub instances: usize,
    /// Every instance is running a batch now.
    pub all_busy: bool,
    /// How long a partial batch waits to fill.
    pub max_queue_delay: Duration,
}

/// Time until the last of the new images is answered: the batches ahead and its own, spread over
/// the instances, plus the batch running now when no instance is free, plus the fill delay of a
/// partial last batch.
pub(crate) fn time_to_finish(b: &Backlog, run: impl Fn(usize) -> Duration) -> Duration {
    let total = b.ahead + b.new;
    let (full, rest) = (total / b.max_batch, total % b.max_batch);
    let mut work = run(b.max_batch) * full as u32;
    if rest > 0 {
        work += run(rest);
    }
    let mut finish = work / b.instances.max(1) as u32;
    if b.all_busy {
        finish += run(b.max_batch);
    }
    if rest > 0 {
        finish += b.max_queue_delay;
    }
    finish
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_times_average_and_fill_gaps_safely() {
        let t = ServiceTimes::new(8);
        assert_eq!(t.of(4), Duration::ZERO, "nothing measured");
        t.record(8, Duration::from_millis(400));
        assert_eq!(t.of(8), Duration::from_millis(400));
        assert_eq!(
            t.of(3),
            Duration::from_millis(400),
            "a larger size bounds a smaller one"
        );
        t.record(2, Duration::from_millis(100));
        assert_eq!(t.of(4), Duration::from_millis(400));
        t.record(8, Duration::from_millis(800));
        assert_eq!(
            t.of(8),
            Duration::from_millis(500),
            "0.75 × 400 + 0.25 × 800"
        );
        assert_eq!(
            t.of(100),
            Duration::from_millis(500),
            "clamped to the largest size"
        );
        let small = ServiceTimes::new(8);
        small.record(2, Duration::from_millis(100));
        assert_eq!(
            small.of(8),
            Duration::from_millis(400),
            "scaled up from the largest measured"
        );
    }

    #[test]
    fn time_to_finish_counts_batches_instances_and_the_running_one() {
        let run = |n: usize| Duration::from_millis(50 * n as u64); // 400 ms for 8
        let b = Backlog {
            ahead: 20,
            new: 4,
            max_batch: 8,
            instances: 1,
            all_busy: false,
            max_queue_delay: Duration::from_millis(2),
        };
        assert_eq!(
            time_to_finish(&b, run),
            Duration::from_millis(1200),
            "three full batches"
        );
        let b = Backlog { new: 5, ..b };
        assert_eq!(
            time_to_finish(&b, run),
            Duration::from_millis(1200 + 50 + 2),
            "and one partial batch, which waits to fill"
        );
        let b = Backlog {
            all_busy: true,
            instances: 2,
            new: 4,
            ..b
        };
        assert_eq!(time_to_finish(&b, run), Duration::from_millis(600 + 400));
    }
}
