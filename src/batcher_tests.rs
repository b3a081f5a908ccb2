//! Batch policy and batcher behaviour, with a test-double backend (the real ONNX Runtime engine is
//! covered by the integration tests) and tokio's paused clock for timers.

use std::sync::{Arc, Mutex};

use super::*;

const IMAGE_LEN: usize = 2;

/// Records batch sizes; answers each image with [first value, -first value] as logits.
/// An image whose first value is `POISON` makes the run fail, `PANIC` makes it panic.
struct Recorder {
    sizes: Arc<Mutex<Vec<usize>>>,
    gate: Option<Arc<Mutex<std::sync::mpsc::Receiver<()>>>>,
}

const POISON: f32 = 666.0;
const PANIC: f32 = 999.0;

impl Backend for Recorder {
    fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, EngineError> {
        assert_eq!(input.len(), batch * IMAGE_LEN);
        self.sizes.lock().unwrap().push(batch);
        if let Some(gate) = &self.gate {
            let _ = gate.lock().unwrap().recv();
        }
        let firsts: Vec<f32> = input.chunks(IMAGE_LEN).map(|c| c[0]).collect();
        if firsts.contains(&PANIC) {
            panic!("test backend panic");
        }
        if firsts.contains(&POISON) {
            return Err(EngineError::Inference("poisoned input".into()));
        }
        Ok(firsts.iter().flat_map(|&v| [v, -v]).collect())
    }
}

fn config(max_batch_size: usize, delay_ms: u64, capacity: usize) -> BatcherConfig {
    BatcherConfig {
        max_batch_size,
        max_queue_delay: Duration::from_millis(delay_ms),
        queue_capacity: capacity,
        instances: 1,
        image_len: IMAGE_LEN,
        num_labels: 2,
        output_kind: OutputKind::Logits,
    }
}

/// A batcher over a recorder; returns the batch sizes the backend saw after warm-up.
async fn start(cfg: BatcherConfig) -> (Batcher, Arc<Mutex<Vec<usize>>>) {
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let s = sizes.clone();
    let factory: BackendFactory = Arc::new(move |_| {
        Ok(Box::new(Recorder {
            sizes: s.clone(),
            gate: None,
        }) as Box<dyn Backend>)
    });
    let batcher = Batcher::start(cfg, factory).await.unwrap();
    sizes.lock().unwrap().clear();
    (batcher, sizes)
}

/// Passes warm-up straight through, then gates every run.
struct GatedAfterWarmup {
    inner: Recorder,
    warm: bool,
    runs: usize,
    warmup_runs: usize,
}

impl Backend for GatedAfterWarmup {
    fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, EngineError> {
        self.runs += 1;
        if !self.warm {
            if self.runs == self.warmup_runs {
                self.warm = true;
            }
            return Ok(vec![0.0; batch * 2]);
        }
        self.inner.run(input, batch)
    }
}

fn image(v: f32) -> Vec<f32> {
    vec![v; IMAGE_LEN]
}

async fn answers(pending: Vec<Pending>) -> Vec<Result<ImageOutput, BatchError>> {
    let mut out = Vec::new();
    for rx in pending {
        out.push(rx.await.unwrap());
    }
    out
}

#[test]
fn policy_dispatches_full_batches_at_once() {
    let t0 = Instant::now();
    let d = Duration::from_millis(10);
    assert_eq!(
        decide(4, Some(t0), t0, true, 4, d, false),
        Decision::Dispatch
    );
    // Due one timer tick early: tokio's 1 ms timer rounds up.
    let due = t0 + d - TIMER_SLACK;
    assert_eq!(
        decide(3, Some(t0), t0, true, 4, d, false),
        Decision::Wait(Some(due))
    );
    assert_eq!(
        decide(
            3,
            Some(t0),
            due - Duration::from_micros(1),
            true,
            4,
            d,
            false
        ),
        Decision::Wait(Some(due))
    );
    // Short delays keep at least half of their wait.
    let short = Duration::from_micros(600);
    assert_eq!(
        decide(1, Some(t0), t0, true, 4, short, false),
        Decision::Wait(Some(t0 + short / 2))
    );
    assert_eq!(
        decide(3, Some(t0), due, true, 4, d, false),
        Decision::Dispatch
    );
    // No idle instance: keep forming the batch, no timer needed.
    assert_eq!(
        decide(9, Some(t0), t0 + d, false, 4, d, false),
        Decision::Wait(None)
    );
    assert_eq!(decide(0, None, t0, true, 4, d, false), Decision::Wait(None));
    // Closing flushes what is left without waiting.
    assert_eq!(
        decide(1, Some(t0), t0, true, 4, d, true),
        Decision::Dispatch
    );
}

#[test]
fn warmup_covers_powers_of_two_and_the_maximum() {
    assert_eq!(warmup_sizes(1), [1]);
    assert_eq!(warmup_sizes(8), [1, 2, 4, 8]);
    assert_eq!(warmup_sizes(6), [1, 2, 4, 6]);
}

#[test]
fn softmax_is_stable() {
    let p = softmax(&[1000.0, 1000.0]);
    assert_eq!(p, [0.5, 0.5]);
    let p = softmax(&[0.0, (3.0f32).ln()]);
    assert!((p[1] - 0.75).abs() < 1e-6);
}

#[tokio::test(start_paused = true)]
async fn warmup_runs_every_size_before_start_returns() {
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let s = sizes.clone();
    let factory: BackendFactory = Arc::new(move |_| {
        Ok(Box::new(Recorder {
            sizes: s.clone(),
            gate: None,
        }) as Box<dyn Backend>)
    });
    let _batcher = Batcher::start(config(8, 5, 64), factory).await.unwrap();
    assert_eq!(*sizes.lock().unwrap(), [1, 2, 4, 8]);
}

#[tokio::test(start_paused = true)]
async fn warmup_failure_fails_start() {
    let factory: BackendFactory = Arc::new(|_| Err(EngineError::Inference("no model".into())));
    let err = Batcher::start(config(4, 5, 64), factory)
        .await
        .err()
        .unwrap();
    assert_eq!(err, EngineError::Inference("no model".into()));
}

#[tokio::test(start_paused = true)]
async fn full_batch_runs_without_waiting_for_the_delay() {
    let (batcher, sizes) = start(config(4, 10_000, 64)).await;
    let t0 = Instant::now();
    let pending = batcher
        .submit((0..4).map(|i| image(i as f32)).collect(), None)
        .unwrap();
    let out = answers(pending).await;
    assert!(
        Instant::now() - t0 < Duration::from_secs(10),
        "waited for the queue delay"
    );
    assert_eq!(*sizes.lock().unwrap(), [4]);
    for (i, r) in out.into_iter().enumerate() {
        let r = r.unwrap();
        assert_eq!(r.batch_size, 4);
        assert_eq!(r.probabilities, softmax(&[i as f32, -(i as f32)]));
    }
}

#[tokio::test(start_paused = true)]
async fn partial_batch_waits_for_max_queue_delay_then_runs() {
    let (batcher, sizes) = start(config(8, 50, 64)).await;
    let t0 = Instant::now();
    let pending = batcher.submit(vec![image(1.0), image(2.0)], None).unwrap();
    let out = answers(pending).await;
    assert!(Instant::now() - t0 >= Duration::from_millis(50) - TIMER_SLACK);
    assert_eq!(*sizes.lock().unwrap(), [2]);
    assert!(out.iter().all(|r| r.as_ref().unwrap().batch_size == 2));
}

#[tokio::test(start_paused = true)]
async fn requests_within_the_window_are_merged() {
    let (batcher, sizes) = start(config(8, 50, 64)).await;
    let first = batcher.submit(vec![image(1.0)], None).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = batcher.submit(vec![image(2.0)], None).unwrap();
    let (a, b) = tokio::join!(answers(first), answers(second));
    assert_eq!(*sizes.lock().unwrap(), [2]);
    assert_eq!(a[0].as_ref().unwrap().batch_size, 2);
    assert_eq!(b[0].as_ref().unwrap().batch_size, 2);
}

#[tokio::test(start_paused = true)]
async fn large_request_is_split_and_reassembled_in_order() {
    let (batcher, sizes) = start(config(4, 5, 64)).await;
    let pending = batcher
        .submit((0..10).map(|i| image(i as f32)).collect(), None)
        .unwrap();
    let out = answers(pending).await;
    assert_eq!(*sizes.lock().unwrap(), [4, 4, 2]);
    for (i, r) in out.into_iter().enumerate() {
        assert_eq!(
            r.unwrap().probabilities,
            softmax(&[i as f32, -(i as f32)]),
            "image {i} out of order"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn full_queue_is_refused_at_once_and_frees_no_capacity() {
    let (batcher, _sizes) = start(config(8, 60_000, 4)).await;
    let held = batcher.submit(vec![image(1.0); 3], None).unwrap();
    let err = batcher.submit(vec![image(2.0); 2], None).err().unwrap();
    assert_eq!(
        err,
        BatchError::QueueFull {
            queued: 3,
            capacity: 4
        }
    );
    assert_eq!(batcher.queue_depth(), 3);
    // One more still fits.
    let last = batcher.submit(vec![image(3.0)], None).unwrap();
    let (a, b) = tokio::join!(answers(held), answers(last));
    assert!(a.iter().chain(&b).all(|r| r.is_ok()));
    assert_eq!(batcher.queue_depth(), 0);
}

#[tokio::test(start_paused = true)]
async fn expired_and_cancelled_entries_are_dropped_before_running() {
    let (batcher, sizes) = start(config(8, 100, 64)).await;
    let expired = batcher
        .submit(
            vec![image(1.0)],
            Some(Instant::now() + Duration::from_millis(10)),
        )
        .unwrap();
    let cancelled = batcher.submit(vec![image(2.0)], None).unwrap();
    drop(cancelled);
    let kept = batcher.submit(vec![image(3.0)], None).unwrap();
    let (expired, kept) = tokio::join!(answers(expired), answers(kept));
    assert!(
        matches!(expired[0], Err(BatchError::DeadlineExceeded { .. })),
        "{expired:?}"
    );
    assert_eq!(kept[0].as_ref().unwrap().batch_size, 1);
    assert_eq!(*sizes.lock().unwrap(), [1], "dropped entries must not run");
    assert_eq!(batcher.queue_depth(), 0);
}

#[tokio::test(start_paused = true)]
async fn inference_error_fails_the_batch_and_the_instance_keeps_serving() {
    let (batcher, _sizes) = start(config(2, 1_000, 64)).await;
    let out = answers(
        batcher
            .submit(vec![image(POISON), image(1.0)], None)
            .unwrap(),
    )
    .await;
    let expected = BatchError::Engine(EngineError::Inference("poisoned input".into()));
    assert_eq!(out, vec![Err(expected.clone()), Err(expected)]);
    let again = answers(batcher.submit(vec![image(1.0), image(2.0)], None).unwrap()).await;
    assert!(again.iter().all(|r| r.is_ok()));
}

#[tokio::test(start_paused = true)]
async fn panic_in_an_instance_is_contained() {
    let (batcher, _sizes) = start(config(1, 1, 64)).await;
    let out = answers(batcher.submit(vec![image(PANIC)], None).unwrap()).await;
    match &out[0] {
        Err(BatchError::Engine(EngineError::Panic {
            instance: 0,
            message,
        })) => {
            assert!(message.contains("test backend panic"), "{message}")
        }
        other => panic!("expected a contained panic, got {other:?}"),
    }
    let again = answers(batcher.submit(vec![image(1.0)], None).unwrap()).await;
    assert!(again[0].is_ok());
}

/// While the only instance runs a batch, the next batch forms from everything that arrives.
#[tokio::test]
async fn next_batch_forms_while_the_instance_is_busy() {
    let (open, gate) = std::sync::mpsc::channel();
    let gate = Arc::new(Mutex::new(gate));
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let (s, g) = (sizes.clone(), gate.clone());
    let warmups = warmup_sizes(8).len();
    let factory: BackendFactory = Arc::new(move |_| {
        Ok(Box::new(GatedAfterWarmup {
            inner: Recorder {
                sizes: s.clone(),
                gate: Some(g.clone()),
            },
            warm: false,
            runs: 0,
            warmup_runs: warmups,
        }) as Box<dyn Backend>)
    });
    let batcher = Batcher::start(config(8, 0, 64), factory).await.unwrap();
    let first = batcher.submit(vec![image(1.0)], None).unwrap();
    // Wait until the instance is inside the first run (blocked on the gate).
    while sizes.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rest: Vec<Vec<Pending>> = (0..3)
        .map(|i| batcher.submit(vec![image(i as f32)], None).unwrap())
        .collect();
    open.send(()).unwrap();
    open.send(()).unwrap();
    answers(first).await;
    for r in rest {
        assert_eq!(answers(r).await[0].as_ref().unwrap().batch_size, 3);
    }
    assert_eq!(*sizes.lock().unwrap(), [1, 3]);
}
