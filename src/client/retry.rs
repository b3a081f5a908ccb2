//! Calls the server refused for now, tried again: `RESOURCE_EXHAUSTED` (admission: the queue is
//! full, or the work ahead would take too long) and `UNAVAILABLE` (starting, draining, or not
//! reachable). Bounded exponential backoff with jitter, then a clear give-up.

use std::future::Future;
use std::time::Duration;

/// The wait after the first refused try; each further one doubles, up to [`MAX_DELAY`].
pub const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest wait between two tries.
pub const MAX_DELAY: Duration = Duration::from_secs(5);

/// A refusal that may succeed later, unchanged: the server is busy or unavailable. Not a call over
/// a per-request limit ("… over the limit of 256 MiB per request"): waiting cannot change that.
pub fn retryable(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::ResourceExhausted => !over_request_limit(status),
        _ => false,
    }
}

/// A call refused as more than one request may carry (too many images, or too many bytes to
/// decode): smaller calls may pass.
pub fn over_request_limit(status: &tonic::Status) -> bool {
    status.message().contains(" per request")
}

/// The wait after `failed` refused tries (1, 2, …): half of `FIRST_DELAY · 2^(failed−1)` (at most
/// [`MAX_DELAY`]) plus a random part of up to the other half ("equal jitter"), so that clients
/// refused together do not all come back together, and none comes back at once.
pub fn delay(failed: u32, random: u64) -> Duration {
    let doublings = failed.saturating_sub(1).min(16);
    let full = FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY);
    let half = full / 2;
    half + Duration::from_nanos(random % (half.as_nanos() as u64 + 1))
}

/// A call that failed: its last status and how many times it was tried.
#[derive(Debug)]
pub struct Failed {
    pub status: tonic::Status,
    pub tries: u32,
}

impl Failed {
    /// The status in words; a retryable one says that the client gave up.
    pub fn describe(&self) -> String {
        let status = &self.status;
        if retryable(status) {
            format!(
                "gave up after {} tries, the server still answered {:?}: {}",
                self.tries,
                status.code(),
                status.message()
            )
        } else {
            format!("server answered {:?}: {}", status.code(), status.message())
        }
    }
}

/// Makes the call (`call()` builds a fresh one each time) until it succeeds, fails for a reason
/// that waiting cannot change, or has been tried `max_tries` times.
pub async fn with_retries<T, F, Fut>(max_tries: u32, mut call: F) -> Result<T, Failed>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match call().await {
            Ok(value) => return Ok(value),
            Err(status) if retryable(&status) && tries < max_tries => {
                tokio::time::sleep(delay(tries, random())).await;
            }
            Err(status) => return Err(Failed { status, tries }),
        }
    }
}

/// 64 random bits (std's hasher keys are seeded randomly, and differ for each `RandomState`).
fn random() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn delays_double_up_to_the_cap_with_jitter_in_the_upper_half() {
        for (failed, full_ms) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (6, 3200),
            (7, 5000),
            (40, 5000),
        ] {
            let full = Duration::from_millis(full_ms);
            assert_eq!(delay(failed, 0), full / 2, "no jitter: half, try {failed}");
            for r in [1, 12_345, 987_654_321_987, u64::MAX / 3] {
                let d = delay(failed, r);
                assert!(
                    d >= full / 2 && d <= full,
                    "try {failed}: {d:?} outside [{:?}, {full:?}]",
                    full / 2
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn busy_and_unavailable_are_retried_then_given_up() {
        let tries = AtomicU32::new(0);
        let answer = |fail: u32, code: tonic::Code| {
            let n = tries.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n <= fail {
                    Err(tonic::Status::new(code, "busy"))
                } else {
                    Ok(n)
                }
            }
        };
        assert_eq!(
            with_retries(4, || answer(3, tonic::Code::ResourceExhausted))
                .await
                .unwrap(),
            4,
            "three refusals, then the fourth try succeeds"
        );
        tries.store(0, Ordering::SeqCst);
        assert_eq!(
            with_retries(4, || answer(1, tonic::Code::Unavailable))
                .await
                .unwrap(),
            2
        );
        tries.store(0, Ordering::SeqCst);
        let failed = with_retries(3, || answer(10, tonic::Code::ResourceExhausted))
            .await
            .unwrap_err();
        assert_eq!(failed.tries, 3);
        assert_eq!(tries.load(Ordering::SeqCst), 3, "bounded");
        assert_eq!(
            failed.describe(),
            "gave up after 3 tries, the server still answered ResourceExhausted: busy"
        );
        tries.store(0, Ordering::SeqCst);
        let failed = with_retries(5, || answer(10, tonic::Code::InvalidArgument))
            .await
            .unwrap_err();
        assert_eq!(
            failed.tries, 1,
            "a refusal waiting cannot change is not retried"
        );
        assert_eq!(failed.describe(), "server answered InvalidArgument: busy");
        let over = tonic::Status::resource_exhausted(
            "the request's images would decode to 300 MiB, over the limit of 256 MiB per request; \
             send fewer or smaller images per call",
        );
        let failed = with_retries(5, || std::future::ready(Err::<(), _>(over.clone())))
            .await
            .unwrap_err();
        assert_eq!(failed.tries, 1, "over a per-request limit: not retried");
    }
}
