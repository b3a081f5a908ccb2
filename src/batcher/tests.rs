//! Batcher behaviour with the shared test doubles (`backend::testing`; the real ONNX Runtime engine
//! is covered by the integration tests) and tokio's paused clock for timers.

use std::time::Duration;

use tokio::time::Instant;

use super::policy::TIMER_SLACK;
use super::*;
use crate::backend::testing::{BatchLog, Echo, Gate, PANIC, POISON, Probe};

const INPUT_LEN: usize = 2;
const OUTPUT_LEN: usize = 2;

fn config(max_batch_size: usize, delay_ms: u64, capacity: usize) -> BatcherConfig {
    BatcherConfig {
        sizes: BatchSizes::new(max_batch_size),
        max_queue_delay: Duration::from_millis(delay_ms),
        queue_capacity: [capacity, capacity],
        instances: 1,
        max_queue_wait: None,
        input_len: INPUT_LEN,
        output_len: OUTPUT_LEN,
        host_memory: HostMemory::Pageable,
        inline_run: Duration::ZERO,
    }
}

fn probe_factory(log: &BatchLog, gate: &Gate) -> InstanceFactory {
    let (log, gate) = (log.clone(), gate.clone());
    Arc::new(move |_| {
        Ok(Box::new(Probe {
            inner: Echo {
                input_len: INPUT_LEN,
                output_len: OUTPUT_LEN,
            },
            log: log.clone(),
            gate: gate.clone(),
            input_len: INPUT_LEN,
        }) as Box<dyn crate::backend::Backend>)
    })
}

fn metrics() -> ModelMetrics {
    ModelMetrics::new("test", "1")
}

/// A batcher over an echo backend; returns the log of batches run after warm-up.
async fn start(cfg: BatcherConfig) -> (Batcher, BatchLog) {
    let log = BatchLog::default();
    let batcher = Batcher::start(cfg, probe_factory(&log, &Gate::new()), metrics())
        .await
        .unwrap();
    log.clear();
    (batcher, log)
}

fn image(v: f32) -> Vec<f32> {
    vec![v; INPUT_LEN]
}

/// Reserves and submits routine images.
fn send(b: &Batcher, images: Vec<Vec<f32>>, deadline: Option<Instant>) -> Vec<Pending> {
    send_at(b, images, deadline, Priority::Routine)
}

fn send_at(
    b: &Batcher,
    images: Vec<Vec<f32>>,
    deadline: Option<Instant>,
    priority: Priority,
) -> Vec<Pending> {
    let places = b.reserve(images.len(), priority, deadline).unwrap();
    let tickets = places
        .into_places()
        .into_iter()
        .zip(&images)
        .map(|(place, i)| place.fill(i))
        .collect();
    b.submit(tickets, deadline, &tracing::Span::none()).unwrap()
}

/// Every answer, awaited for at most a minute of real time, so a lost answer fails instead of
/// hanging. (A tokio timer would not do: the paused clock jumps straight to it whenever the
/// runtime idles, as it does while an instance thread runs.)
async fn answers(pending: Vec<Pending>) -> Vec<Result<ImageOutput, BatchError>> {
    let (expired_tx, expired) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(60));
        let _ = expired_tx.send(());
    });
    let all = async {
        let mut out = Vec::new();
        for rx in pending {
            out.push(rx.await.expect("the batcher answers every image"));
        }
        out
    };
    tokio::select! {
        out = all => out,
        _ = expired => panic!("no answer within a minute"),
    }
}

#[tokio::test(start_paused = true)]
async fn warmup_runs_every_size_before_start_returns() {
    let log = BatchLog::default();
    let _batcher = Batcher::start(
        config(8, 5, 64),
        probe_factory(&log, &Gate::new()),
        metrics(),
    )
    .await
    .unwrap();
    assert_eq!(log.sizes(), [1, 2, 4, 8]);
}

#[tokio::test(start_paused = true)]
async fn warmup_failure_fails_start() {
    let factory: InstanceFactory = Arc::new(|_| Err(EngineError::Inference("no model".into())));
    let err = Batcher::start(config(4, 5, 64), factory, metrics())
        .await
        .err()
        .unwrap();
    assert_eq!(err, EngineError::Inference("no model".into()));
}

#[tokio::test(start_paused = true)]
async fn warmup_checks_the_output_size_like_serving_does() {
    // A backend whose output is one value short: the same check refuses it at warm-up.
    let factory: InstanceFactory = Arc::new(|_| {
        Ok(Box::new(Echo {
            input_len: INPUT_LEN,
            output_len: OUTPUT_LEN - 1,
        }) as Box<dyn crate::backend::Backend>)
    });
    let err = Batcher::start(config(2, 5, 64), factory, metrics())
        .await
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "inference failed: model returned 1 values for 1 images, expected 1 × 2"
    );
}

#[tokio::test(start_paused = true)]
async fn full_batch_runs_without_waiting_for_the_delay() {
    let (batcher, log) = start(config(4, 10_000, 64)).await;
    let t0 = Instant::now();
    let out = answers(send(
        &batcher,
        (0..4).map(|i| image(i as f32)).collect(),
        None,
    ))
    .await;
    assert!(
        Instant::now() - t0 < Duration::from_secs(10),
        "waited for the queue delay"
    );
    assert_eq!(log.sizes(), [4]);
    for (i, r) in out.into_iter().enumerate() {
        let r = r.unwrap();
        assert_eq!(r.batch_size, 4);
        assert_eq!(r.values[..], [i as f32, -(i as f32)]);
    }
}

#[tokio::test(start_paused = true)]
async fn partial_batch_waits_for_max_queue_delay_then_runs() {
    let (batcher, log) = start(config(8, 50, 64)).await;
    let t0 = Instant::now();
    let out = answers(send(&batcher, vec![image(1.0), image(2.0)], None)).await;
    assert!(Instant::now() - t0 >= Duration::from_millis(50) - TIMER_SLACK);
    assert_eq!(log.sizes(), [2]);
    assert!(out.iter().all(|r| r.as_ref().unwrap().batch_size == 2));
}

#[tokio::test(start_paused = true)]
async fn requests_within_the_window_are_merged() {
    let (batcher, log) = start(config(8, 50, 64)).await;
    let first = send(&batcher, vec![image(1.0)], None);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = send(&batcher, vec![image(2.0)], None);
    let (a, b) = tokio::join!(answers(first), answers(second));
    assert_eq!(log.sizes(), [2]);
    assert_eq!(a[0].as_ref().unwrap().batch_size, 2);
    assert_eq!(b[0].as_ref().unwrap().batch_size, 2);
}

#[tokio::test(start_paused = true)]
async fn large_request_is_split_and_reassembled_in_order() {
    let (batcher, log) = start(config(4, 5, 64)).await;
    let out = answers(send(
        &batcher,
        (0..10).map(|i| image(i as f32)).collect(),
        None,
    ))
    .await;
    assert_eq!(log.sizes(), [4, 4, 2]);
    for (i, r) in out.into_iter().enumerate() {
        assert_eq!(
            r.unwrap().values[..],
            [i as f32, -(i as f32)],
            "image {i} out of order"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn full_queue_is_refused_at_once_and_frees_no_capacity() {
    let (batcher, _log) = start(config(8, 60_000, 4)).await;
    let held = send(&batcher, vec![image(1.0); 3], None);
    let err = batcher.reserve(2, Priority::Routine, None).err().unwrap();
    assert_eq!(
        err,
        BatchError::QueueFull {
            priority: Priority::Routine,
            waiting: 3,
            capacity: 4
        }
    );
    assert_eq!(batcher.queue_depth(Priority::Routine), 3);
    // One more still fits.
    let last = send(&batcher, vec![image(3.0)], None);
    let (a, b) = tokio::join!(answers(held), answers(last));
    assert!(a.iter().chain(&b).all(|r| r.is_ok()));
    assert_eq!(batcher.queue_depth(Priority::Routine), 0);
}

#[tokio::test(start_paused = true)]
async fn a_reservation_that_is_never_submitted_gives_its_places_back() {
    let (batcher, _log) = start(config(8, 5, 4)).await;
    let places = batcher.reserve(4, Priority::Routine, None).unwrap();
    assert!(batcher.reserve(1, Priority::Routine, None).is_err());
    drop(places); // e.g. an image of the request failed to decode
    assert_eq!(batcher.queue_depth(Priority::Routine), 0);
    assert_eq!(
        answers(send(&batcher, vec![image(1.0); 4], None))
            .await
            .len(),
        4
    );
}

/// While the only instance is held, a queued image's deadline passes and another's caller
/// leaves: neither runs, the expired one is answered DEADLINE_EXCEEDED, the places come back.
#[tokio::test]
async fn expired_and_cancelled_entries_are_dropped_before_running() {
    let (log, gate) = (BatchLog::default(), Gate::new());
    let batcher = Batcher::start(config(8, 0, 64), probe_factory(&log, &gate), metrics())
        .await
        .unwrap();
    log.clear();
    gate.close();
    let busy = send(&batcher, vec![image(0.0)], None);
    until_batches(&log, 1).await;
    let expired = send(
        &batcher,
        vec![image(1.0)],
        Some(Instant::now() + Duration::from_millis(50)),
    );
    let cancelled = send(&batcher, vec![image(2.0)], None);
    drop(cancelled);
    let kept = send(&batcher, vec![image(3.0)], None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.release(2);
    let (_, expired, kept) = tokio::join!(answers(busy), answers(expired), answers(kept));
    assert!(
        matches!(expired[0], Err(BatchError::DeadlineExceeded { .. })),
        "{expired:?}"
    );
    assert_eq!(kept[0].as_ref().unwrap().batch_size, 1);
    assert_eq!(
        log.batches(),
        [vec![0.0], vec![3.0]],
        "dropped entries must not run"
    );
    assert_eq!(batcher.queue_depth(Priority::Routine), 0);
}

/// A batcher whose batches take 400 ms by its estimates, whatever their size.
async fn slow_on_paper(mut cfg: BatcherConfig) -> (Batcher, BatchLog, Gate) {
    let (log, gate) = (BatchLog::default(), Gate::new());
    cfg.max_queue_delay = Duration::from_millis(2);
    let batcher = Batcher::start(cfg, probe_factory(&log, &gate), metrics())
        .await
        .unwrap();
    for size in 1..=batcher.config().sizes.max() {
        batcher.shared.times.set(size, Duration::from_millis(400));
    }
    log.clear();
    (batcher, log, gate)
}

#[tokio::test]
async fn admission_refuses_what_cannot_finish_in_time() {
    let mut cfg = config(8, 2, 64);
    cfg.max_queue_wait = Some(Duration::from_secs(1));
    let (batcher, _log, _gate) = slow_on_paper(cfg).await;
    let soon = Some(Instant::now() + Duration::from_millis(100));
    match batcher.reserve(1, Priority::Routine, soon) {
        Err(BatchError::WontFinish { need_ms, left_ms }) => {
            assert_eq!(need_ms, 402, "one batch of 400 ms and the 2 ms fill delay");
            assert!(left_ms <= 100);
        }
        other => panic!("expected WontFinish, got {:?}", other.map(|r| r.len())),
    }
    match batcher.reserve(24, Priority::Routine, None) {
        Err(BatchError::QueueTooLong { need_ms, limit_ms }) => {
            assert_eq!((need_ms, limit_ms), (1200, 1000), "three batches of 8");
        }
        other => panic!("expected QueueTooLong, got {:?}", other.map(|r| r.len())),
    }
    // Sixteen routine images (two batches) are accepted and hold their places...
    let held = batcher.reserve(16, Priority::Routine, None).unwrap();
    let half_second = || Some(Instant::now() + Duration::from_millis(500));
    // ...so one more routine image cannot make a 500 ms deadline, but a STAT one can: it waits
    // behind STAT images only.
    assert!(matches!(
        batcher.reserve(1, Priority::Routine, half_second()),
        Err(BatchError::WontFinish { need_ms: 1202, .. })
    ));
    assert!(batcher.reserve(1, Priority::Stat, half_second()).is_ok());
    drop(held);
}

#[tokio::test]
async fn an_image_that_would_miss_its_deadline_is_dropped_instead_of_run() {
    let (batcher, log, gate) = slow_on_paper(config(8, 2, 64)).await;
    gate.close();
    let busy = send(&batcher, vec![image(0.0)], None);
    until_batches(&log, 1).await;
    // Admitted: the running batch (400 ms) and its own (400 ms) fit in one second...
    let late = send(
        &batcher,
        vec![image(1.0)],
        Some(Instant::now() + Duration::from_millis(1000)),
    );
    // ...but the running batch takes longer than expected: with 300 ms left when an instance is
    // free, a 400 ms batch would answer too late.
    tokio::time::sleep(Duration::from_millis(700)).await;
    gate.open();
    let (_, late) = tokio::join!(answers(busy), answers(late));
    assert!(
        matches!(late[0], Err(BatchError::WouldMissDeadline { left_ms, run_ms } ) if left_ms < run_ms),
        "{late:?}"
    );
    assert_eq!(log.batches(), [vec![0.0]], "the doomed image never ran");
}

#[tokio::test(start_paused = true)]
async fn inference_error_fails_the_batch_and_the_instance_keeps_serving() {
    let (batcher, _log) = start(config(2, 1_000, 64)).await;
    let out = answers(send(&batcher, vec![image(POISON), image(1.0)], None)).await;
    let expected = EngineError::Inference("poisoned input".into());
    for answer in &out {
        match answer {
            Err(e @ BatchError::Engine { error, .. }) => {
                assert_eq!(error, &expected);
                assert!(
                    !e.public_message().contains("poisoned"),
                    "callers do not see engine internals: {}",
                    e.public_message()
                );
            }
            other => panic!("expected the batch's engine error, got {other:?}"),
        }
    }
    assert_eq!(out[0], out[1], "one batch, one error");
    let again = answers(send(&batcher, vec![image(1.0), image(2.0)], None)).await;
    assert!(again.iter().all(|r| r.is_ok()));
}

#[tokio::test(start_paused = true)]
async fn panic_in_an_instance_is_contained() {
    let (batcher, _log) = start(config(1, 1, 64)).await;
    let out = answers(send(&batcher, vec![image(PANIC)], None)).await;
    match &out[0] {
        Err(BatchError::Engine {
            error:
                EngineError::Panic {
                    instance: 0,
                    message,
                },
            ..
        }) => {
            assert!(message.contains("test backend panic"), "{message}")
        }
        other => panic!("expected a contained panic, got {other:?}"),
    }
    let again = answers(send(&batcher, vec![image(1.0)], None)).await;
    assert!(again[0].is_ok());
}

/// Waits (real time, bounded) until the backend has run `n` batches.
async fn until_batches(log: &BatchLog, n: usize) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while log.len() < n {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the backend ran the batch");
}

/// While the only instance runs a batch, the next batch forms from everything that arrives.
#[tokio::test]
async fn next_batch_forms_while_the_instance_is_busy() {
    let (log, gate) = (BatchLog::default(), Gate::new());
    let batcher = Batcher::start(config(8, 0, 64), probe_factory(&log, &gate), metrics())
        .await
        .unwrap();
    log.clear();
    gate.close();
    let first = send(&batcher, vec![image(1.0)], None);
    until_batches(&log, 1).await;
    let rest: Vec<Vec<Pending>> = (0..3)
        .map(|i| send(&batcher, vec![image(i as f32)], None))
        .collect();
    gate.release(2);
    answers(first).await;
    for r in rest {
        assert_eq!(answers(r).await[0].as_ref().unwrap().batch_size, 3);
    }
    assert_eq!(log.sizes(), [1, 3]);
}

/// Under a backlog an instance takes its next batch itself as it finishes one, with no round trip
/// through the queue task: with this (single-threaded) runtime blocked, so that the queue task
/// cannot run, three queued batches still run one after another.
#[tokio::test]
async fn under_backlog_the_instance_takes_its_next_batches_without_the_queue_task() {
    let (log, gate) = (BatchLog::default(), Gate::new());
    let batcher = Batcher::start(config(2, 0, 64), probe_factory(&log, &gate), metrics())
        .await
        .unwrap();
    log.clear();
    gate.close();
    let first = send(&batcher, vec![image(1.0), image(2.0)], None);
    until_batches(&log, 1).await;
    let rest = send(&batcher, (0..6).map(|i| image(i as f32)).collect(), None);
    // From here on the runtime is blocked (no await) until three more batches ran.
    gate.open();
    let patience = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while log.len() < 4 {
        assert!(
            std::time::Instant::now() < patience,
            "the instance did not take the queued batches itself: {:?}",
            log.sizes()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(log.sizes(), [2, 2, 2, 2]);
    answers(first).await;
    assert!(answers(rest).await.iter().all(|a| a.is_ok()));
}

/// With the queue full of routine work, a STAT image has its own places and rides the next batch.
#[tokio::test]
async fn stat_images_skip_a_full_routine_queue_into_the_next_batch() {
    let (log, gate) = (BatchLog::default(), Gate::new());
    let mut cfg = config(4, 0, 8);
    cfg.queue_capacity = [2, 8];
    let batcher = Batcher::start(cfg, probe_factory(&log, &gate), metrics())
        .await
        .unwrap();
    log.clear();
    gate.close();
    let busy = send(&batcher, vec![image(1.0)], None);
    until_batches(&log, 1).await;
    // Eight routine images fill the routine queue: two batches' worth.
    let routine = send(
        &batcher,
        (0..8).map(|i| image(10.0 + i as f32)).collect(),
        None,
    );
    assert!(
        batcher.reserve(1, Priority::Routine, None).is_err(),
        "routine queue full"
    );
    let stat = send_at(&batcher, vec![image(99.0)], None, Priority::Stat);
    gate.release(4);
    let (_, routine, stat) = tokio::join!(answers(busy), answers(routine), answers(stat));
    assert!(routine.iter().all(Result::is_ok));
    assert!(stat[0].is_ok());
    let batches = log.batches();
    // Rows within a batch follow the batch buffers (the order does not matter to the model).
    let mut next = batches[1].clone();
    next.sort_by(f32::total_cmp);
    assert_eq!(
        next,
        [10.0, 11.0, 12.0, 99.0],
        "the STAT image rides the next batch, ahead of routine 13: {batches:?}"
    );
    // Routine 13 is the last row of its buffer and 14-17 fill the next one: with more than a batch
    // queued, the batch ends at the buffer's end, so the next one runs in place.
    assert_eq!(batches[2], [13.0]);
    assert_eq!(batches[3], [14.0, 15.0, 16.0, 17.0]);
}

/// Echoes, and records where each batch's input was in memory.
struct WhereFrom {
    inner: Echo,
    seen: Arc<std::sync::Mutex<Vec<(usize, usize)>>>,
}

impl crate::backend::Backend for WhereFrom {
    fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, EngineError> {
        self.seen
            .lock()
            .unwrap()
            .push((input.as_ptr() as usize, batch));
        self.inner.run(input, batch)
    }
}

/// A batcher whose backend records input addresses (after warm-up), max batch 4, no delay.
async fn start_where_from() -> (Batcher, Arc<std::sync::Mutex<Vec<(usize, usize)>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = seen.clone();
    let factory: InstanceFactory = Arc::new(move |_| {
        Ok(Box::new(WhereFrom {
            inner: Echo {
                input_len: INPUT_LEN,
                output_len: OUTPUT_LEN,
            },
            seen: recorder.clone(),
        }) as Box<dyn crate::backend::Backend>)
    });
    let batcher = Batcher::start(config(4, 0, 64), factory, metrics())
        .await
        .unwrap();
    seen.lock().unwrap().clear();
    (batcher, seen)
}

/// Reserves and claims `n` rows in order, each filled with its value.
fn claimed(b: &Batcher, values: &[f32]) -> Vec<(usize, Ticket)> {
    let places = b.reserve(values.len(), Priority::Routine, None).unwrap();
    places
        .into_places()
        .into_iter()
        .zip(values)
        .map(|(place, &v)| {
            let mut ticket = place.claim();
            ticket.as_mut_slice().fill(v);
            (ticket.as_slice().as_ptr() as usize, ticket)
        })
        .collect()
}

/// Submits the tickets in the given order, in one request.
fn submit_slots(b: &Batcher, tickets: Vec<Ticket>) -> Vec<Pending> {
    b.submit(tickets, None, &tracing::Span::none()).unwrap()
}

fn firsts(answers: &[Result<ImageOutput, BatchError>]) -> Vec<f32> {
    answers
        .iter()
        .map(|a| a.as_ref().unwrap().values[0])
        .collect()
}

#[tokio::test]
async fn a_batch_in_consecutive_rows_runs_from_its_buffer_without_a_copy() {
    let (batcher, seen) = start_where_from().await;
    let mut slots = claimed(&batcher, &[1.0, 2.0, 3.0, 4.0]);
    let row0 = slots[0].0;
    // Submitted in reverse: the batch is put back in row order, and each image keeps its answer.
    slots.reverse();
    let pending = submit_slots(&batcher, slots.into_iter().map(|(_, s)| s).collect());
    let answers = answers(pending).await;
    assert_eq!(firsts(&answers), [4.0, 3.0, 2.0, 1.0]);
    assert_eq!(
        *seen.lock().unwrap(),
        [(row0, 4)],
        "one batch of 4 read from the first row of the batch buffer"
    );
}

#[tokio::test]
async fn scattered_rows_are_gathered_and_each_image_keeps_its_answer() {
    let (batcher, seen) = start_where_from().await;
    // Rows 0-3 of one buffer and 0-1 of the next; the batch takes rows 2, 3 and the next 0, 1.
    let slots = claimed(&batcher, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let rows: Vec<usize> = slots.iter().map(|(p, _)| *p).collect();
    let mut slots: Vec<Ticket> = slots.into_iter().map(|(_, s)| s).collect();
    let straddling: Vec<Ticket> = slots.drain(2..).rev().collect();
    let pending = submit_slots(&batcher, straddling);
    assert_eq!(firsts(&answers(pending).await), [6.0, 5.0, 4.0, 3.0]);
    let (input, size) = seen.lock().unwrap()[0];
    assert_eq!(size, 4);
    assert!(
        !rows.contains(&input),
        "the straddling batch was gathered into the instance's scratch buffer"
    );
    // The rows left in the first buffer still run in place.
    let pending = submit_slots(&batcher, slots);
    assert_eq!(firsts(&answers(pending).await), [1.0, 2.0]);
    assert_eq!(seen.lock().unwrap()[1], (rows[0], 2));
}

/// With more than a batch queued, a batch that would straddle two buffers ends at the first one's
/// last row, so that it and the batches after it run in place instead of all being gathered.
#[tokio::test]
async fn under_backlog_a_batch_ends_at_its_buffer_so_the_next_ones_run_in_place() {
    let (batcher, seen) = start_where_from().await;
    // Rows 0-3 of one buffer, 0-3 of the next; rows 2, 3 and the whole next buffer are queued.
    let slots = claimed(&batcher, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    let rows: Vec<usize> = slots.iter().map(|(p, _)| *p).collect();
    let mut slots: Vec<Ticket> = slots.into_iter().map(|(_, s)| s).collect();
    let queued: Vec<Ticket> = slots.drain(2..).collect();
    let pending = submit_slots(&batcher, queued);
    assert_eq!(
        firsts(&answers(pending).await),
        [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    );
    assert_eq!(
        *seen.lock().unwrap(),
        [(rows[2], 2), (rows[4], 4)],
        "rows 2-3 of the first buffer, then rows 0-3 of the second, each in place"
    );
}

#[tokio::test]
async fn batch_buffers_are_reused_once_their_images_are_answered() {
    let (batcher, seen) = start_where_from().await;
    let mut first_rows = std::collections::HashSet::new();
    for round in 0..20 {
        let slots = claimed(&batcher, &[round as f32; 4]);
        first_rows.insert(slots[0].0);
        let pending = submit_slots(&batcher, slots.into_iter().map(|(_, s)| s).collect());
        assert_eq!(firsts(&answers(pending).await), [round as f32; 4]);
    }
    assert_eq!(seen.lock().unwrap().len(), 20);
    assert!(
        first_rows.len() <= 2,
        "20 batches used {} buffers: they are not reused",
        first_rows.len()
    );
}

/// Where each batch ran: the name of the thread (`None` for an unnamed one), after warm-up.
#[derive(Clone, Default)]
struct Threads(Arc<std::sync::Mutex<Vec<Option<String>>>>);

impl Threads {
    fn factory(&self, run_time: std::time::Duration) -> InstanceFactory {
        let threads = self.clone();
        Arc::new(move |_| {
            Ok(Box::new(Timed {
                threads: threads.clone(),
                run_time,
                inner: Echo {
                    input_len: INPUT_LEN,
                    output_len: OUTPUT_LEN,
                },
            }) as Box<dyn crate::backend::Backend>)
        })
    }

    fn take(&self) -> Vec<Option<String>> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// An echo that takes `run_time` (real time) per batch and notes the thread it ran on.
struct Timed {
    threads: Threads,
    run_time: std::time::Duration,
    inner: Echo,
}

impl crate::backend::Backend for Timed {
    fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, EngineError> {
        std::thread::sleep(self.run_time);
        let name = std::thread::current().name().map(str::to_string);
        self.threads.0.lock().unwrap().push(name);
        self.inner.run(input, batch)
    }
}

/// Where a batch ran.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ran {
    /// On the thread that submitted its images.
    Caller,
    /// On the instance's own thread.
    Instance,
    /// Elsewhere: the queue task (on the test's runtime thread).
    QueueTask,
}

const CALLER: &str = "test-caller";

fn ran(thread: &Option<String>) -> Ran {
    match thread.as_deref() {
        Some(CALLER) => Ran::Caller,
        Some(n) if n.starts_with("brainai-instance-") => Ran::Instance,
        _ => Ran::QueueTask,
    }
}

/// A batch measured to run within `inline_run` runs on the thread that dispatches it: the caller
/// that submitted its last image (no queue delay) or the queue task (at the end of the delay). A
/// longer one, or any with `inline_run` zero, is handed to the instance thread. Every answer is
/// the same either way.
#[tokio::test]
async fn short_batches_run_where_they_are_dispatched_and_long_ones_on_the_instance_thread() {
    let ms = std::time::Duration::from_millis;
    // (run time, inline_run, queue delay in ms, where the batches run)
    let cases = [
        (ms(0), ms(1000), 0, Ran::Caller),
        (ms(0), ms(1000), 5, Ran::QueueTask),
        (ms(0), Duration::ZERO, 0, Ran::Instance),
        (ms(20), ms(5), 0, Ran::Instance),
        (ms(20), ms(5), 5, Ran::Instance),
    ];
    for (run_time, inline_run, delay, expected) in cases {
        let threads = Threads::default();
        let mut cfg = config(4, delay, 64);
        cfg.inline_run = inline_run;
        let batcher = Batcher::start(cfg, threads.factory(run_time), metrics())
            .await
            .unwrap();
        let warmup = threads.take();
        assert!(
            warmup.iter().all(|t| ran(t) == Ran::Instance),
            "warm-up: {warmup:?}"
        );
        for round in 0..3 {
            let v = round as f32 + 1.0;
            // Submitted from a thread of its own, so that a run there is told apart from one on
            // the queue task.
            let (caller, runtime) = (batcher.clone(), tokio::runtime::Handle::current());
            let pending = std::thread::Builder::new()
                .name(CALLER.into())
                .spawn(move || {
                    let _runtime = runtime.enter();
                    send(&caller, vec![image(v), image(-v)], None)
                })
                .unwrap()
                .join()
                .unwrap();
            let out = answers(pending).await;
            let values: Vec<_> = out
                .into_iter()
                .map(|o| o.unwrap().values.to_vec())
                .collect();
            assert_eq!(values, [vec![v, -v], vec![-v, v]]);
        }
        let threads = threads.take();
        let places: Vec<Ran> = threads.iter().map(ran).collect();
        assert_eq!(
            places, [expected; 3],
            "run {run_time:?}, inline_run {inline_run:?}, delay {delay} ms: one batch per call, \
             on {threads:?}"
        );
    }
}
