//! Server lifecycle against the real server: warm-up before ready, deadlines, queue full, drain on
//! shutdown, refusing a model that disagrees with its model.toml. The shared test probe around the
//! real ONNX Runtime backend (`common::probed_ort`) lets the tests hold an instance busy without
//! timing guesses.

mod common;

use std::time::Duration;

use brainai::batcher::Priority;
use brainai::pb;
use common::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_not_serving_until_every_batch_size_is_warm() {
    let h = probed_ort();
    h.start.close();
    let server = brainai::server::start(
        &args(&fixture_model("tiny"), &["--max-batch-size", "8"]),
        Some(h.factory),
    )
    .await
    .unwrap();
    let channel = connect(server.grpc_addr).await;
    assert_eq!(
        health_status(&channel, "").await,
        ServingStatus::NotServing as i32
    );
    assert_eq!(
        health_status(&channel, brainai::server::SERVICE_NAME).await,
        ServingStatus::NotServing as i32
    );
    assert_eq!(http_get(server.metrics_addr, "/readyz").await.0, 503);
    assert_eq!(http_get(server.metrics_addr, "/healthz").await.0, 200);
    let mut client = pb::tumor_classifier_client::TumorClassifierClient::new(channel.clone());
    let err = client
        .classify(request(vec![image("early", data("flair_256_a.png"))]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("warming up"), "{}", err.message());
    assert!(h.log.is_empty());

    h.start.release(1);
    wait_for_health(&channel, ServingStatus::Serving).await;
    assert_eq!(
        h.log.sizes(),
        [1, 2, 4, 8],
        "warm-up ran every power-of-two size"
    );
    assert_eq!(http_get(server.metrics_addr, "/readyz").await.0, 200);
    client
        .classify(request(vec![image("late", data("flair_256_a.png"))]))
        .await
        .expect("serves once warm");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deadline_is_answered_and_the_image_never_runs() {
    let (t, h) = serve_gated(
        "tiny",
        &["--max-batch-size", "4", "--max-queue-delay-us", "0"],
    )
    .await;

    // Call A occupies the only instance (held at the gate).
    let mut a_client = t.client.clone();
    let a = tokio::spawn(async move {
        a_client
            .classify(request(vec![image("a", data("flair_256_a.png"))]))
            .await
    });
    until("call A to reach the model", || h.log.len() == 1).await;

    // Call B waits behind it with a 300 ms deadline.
    let mut b_req = tonic::Request::new(request(vec![image("b", data("flair_256_b.png"))]));
    b_req.set_timeout(Duration::from_millis(300));
    let mut b_client = t.client.clone();
    let err = bounded("call B", b_client.classify(b_req))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());

    h.gate.release(1);
    bounded("call A", a)
        .await
        .unwrap()
        .expect("call A completes");
    // The next call runs alone: B was dropped, not run.
    h.gate.release(1);
    let mut c_client = t.client.clone();
    let c = bounded(
        "call C",
        c_client.classify(request(vec![image("c", data("flair_256_c.png"))])),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(c.results[0].batch_size, 1);
    assert_eq!(
        h.log.sizes(),
        [1, 1],
        "B's image must never reach the model"
    );
    let (_, metrics) = http_get(t.metrics_addr(), "/metrics").await;
    assert!(
        metric_value(&metrics, "brainai_dropped_total", &["reason=\"deadline\""]) >= 1.0,
        "{metrics}"
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_resource_exhausted_at_once() {
    let (t, h) = serve_gated(
        "tiny",
        &[
            "--max-batch-size",
            "2",
            "--max-queue-delay-us",
            "0",
            "--queue-capacity",
            "4",
            "--max-images-per-request",
            "4",
        ],
    )
    .await;
    let img = || image("q", data("flair_256_a.png"));

    // Two images run (held at the gate); four more fill the queue.
    let mut c1 = t.client.clone();
    let running = tokio::spawn(async move { c1.classify(request(vec![img(), img()])).await });
    until("the first batch to reach the model", || h.log.len() == 1).await;
    let mut c2 = t.client.clone();
    let queued =
        tokio::spawn(async move { c2.classify(request(vec![img(), img(), img(), img()])).await });
    let model = t.server.registry.resolve("", "").unwrap();
    until("four images queued", || {
        model.batcher.queue_depth(Priority::Routine) == 4
    })
    .await;

    let mut c3 = t.client.clone();
    let err = bounded("call 3", c3.classify(request(vec![img()])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        err.message(),
        "queue is full: 4 images waiting, capacity 4 (routine priority); retry later",
        "a whole-request error, not one about image 0"
    );

    h.gate.release(3);
    assert_eq!(
        bounded("call 1", running)
            .await
            .unwrap()
            .unwrap()
            .into_inner()
            .results
            .len(),
        2
    );
    assert_eq!(
        bounded("call 2", queued)
            .await
            .unwrap()
            .unwrap()
            .into_inner()
            .results
            .len(),
        4
    );
    let (_, metrics) = http_get(t.metrics_addr(), "/metrics").await;
    assert!(
        metric_value(
            &metrics,
            "brainai_dropped_total",
            &["reason=\"queue_full\""]
        ) >= 1.0
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_calls_and_finishes_queued_work() {
    // A drain timeout beyond PATIENCE: the port must close when the drain starts, not when the
    // drain times out.
    let (mut t, h) = serve_gated(
        "tiny",
        &[
            "--max-batch-size",
            "4",
            "--max-queue-delay-us",
            "0",
            "--drain-timeout-s",
            "3600",
        ],
    )
    .await;

    let mut c1 = t.client.clone();
    let in_flight = tokio::spawn(async move {
        c1.classify(request(vec![image("inflight", data("flair_256_a.png"))]))
            .await
    });
    until("the call to reach the model", || h.log.len() == 1).await;

    t.server.begin_shutdown();
    until_draining(t.metrics_addr(), &[t.server.grpc_addr, t.server.http_addr]).await;
    // The connection got a GOAWAY: a new call is not sent on it (it would go to another replica).
    let err = t
        .client
        .classify(request(vec![image("late", data("flair_256_a.png"))]))
        .await
        .unwrap_err();
    assert_unsent(&err);

    h.gate.release(1);
    let done = bounded("the in-flight call", in_flight)
        .await
        .unwrap()
        .expect("in-flight call completes during drain");
    assert_eq!(done.into_inner().results[0].image_id, "inflight");
    tokio::time::timeout(PATIENCE, t.server.wait())
        .await
        .expect("server stops after draining")
        .expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_that_disagrees_with_its_config_is_refused() {
    let server = brainai::server::start(&args(&fixture_model("tiny-mismatch"), &[]), None)
        .await
        .unwrap();
    let err = tokio::time::timeout(PATIENCE, server.wait())
        .await
        .expect("start-up fails promptly")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not match its model.toml")
            && err.contains("name = \"pixels\"")
            && err.contains("input"),
        "{err}"
    );
}

#[test]
fn missing_model_directory_is_a_clear_error() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt
        .block_on(brainai::server::start(
            &args(std::path::Path::new("/nonexistent/model"), &[]),
            None,
        ))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("/nonexistent/model/model.toml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_instances_run_batches_at_the_same_time() {
    let h = probed_ort();
    let t = serve(
        args(
            &fixture_model("tiny"),
            &[
                "--instances",
                "2",
                "--max-batch-size",
                "1",
                "--max-queue-delay-us",
                "0",
                HELD_RUNS[0],
                HELD_RUNS[1],
            ],
        ),
        Some(h.factory),
    )
    .await;
    assert_eq!(h.log.len(), 2, "each instance warmed up batch size 1");
    h.log.clear();
    h.gate.close();
    let calls: Vec<_> = (0..2)
        .map(|i| {
            let mut c = t.client.clone();
            tokio::spawn(async move {
                c.classify(request(vec![image(
                    &format!("i{i}"),
                    data("flair_256_a.png"),
                )]))
                .await
            })
        })
        .collect();
    // Both calls reach the model while neither has finished: two instances are running.
    until("both instances to be running", || h.log.len() == 2).await;
    h.gate.release(2);
    for c in calls {
        assert_eq!(
            bounded("a call", c)
                .await
                .unwrap()
                .unwrap()
                .into_inner()
                .results[0]
                .batch_size,
            1
        );
    }
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_request_is_served_in_the_next_batch_past_a_full_routine_queue() {
    let (t, h) = serve_gated(
        "tiny",
        &[
            "--max-batch-size",
            "4",
            "--max-queue-delay-us",
            "0",
            "--queue-capacity",
            "8",
            "--stat-queue-capacity",
            "4",
            "--max-images-per-request",
            "4",
        ],
    )
    .await;
    let dark = |id: &str| flat_image(id, 32, 32, 3, 10);
    let mut busy_client = t.client.clone();
    let busy = tokio::spawn(async move { busy_client.classify(request(vec![dark("busy")])).await });
    until("the first batch to reach the model", || h.log.len() == 1).await;

    // The routine queue fills up (two full batches' worth)...
    let routine: Vec<_> = (0..2)
        .map(|i| {
            let mut c = t.client.clone();
            let images = (0..4).map(|j| dark(&format!("r{i}{j}"))).collect();
            tokio::spawn(async move { c.classify(request(images)).await })
        })
        .collect();
    let model = t.server.registry.resolve("", "").unwrap();
    until("eight routine images queued", || {
        model.batcher.queue_depth(Priority::Routine) == 8
    })
    .await;
    let err = t
        .client
        .clone()
        .classify(request(vec![dark("one too many")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());

    // ...but a STAT read has places of its own and rides the very next batch.
    let mut stat_client = t.client.clone();
    let stat = tokio::spawn(async move {
        stat_client
            .classify(pb::ClassifyRequest {
                priority: pb::Priority::Stat as i32,
                ..request(vec![flat_image("stat", 32, 32, 3, 250)])
            })
            .await
    });
    until("the STAT image queued", || {
        model.batcher.queue_depth(Priority::Stat) == 1
    })
    .await;
    h.gate.release(4);
    let stat = bounded("the STAT call", stat)
        .await
        .unwrap()
        .expect("STAT call");
    assert_eq!(stat.into_inner().results[0].batch_size, 4);
    bounded("the busy call", busy).await.unwrap().unwrap();
    for r in routine {
        bounded("a routine call", r).await.unwrap().unwrap();
    }
    let batches = h.log.batches();
    let routine_value = batches[0][0];
    assert_eq!(batches[1].len(), 4);
    // Rows within a batch follow the batch buffers, so the STAT image need not be first in it.
    assert_eq!(
        batches[1].iter().filter(|v| **v != routine_value).count(),
        1,
        "the STAT image rides the next batch, with three routine ones: {batches:?}"
    );
    assert!(batches[2..].iter().flatten().all(|v| *v == routine_value));

    let text = http_get(t.metrics_addr(), "/metrics").await.1;
    assert!(
        metric_value(
            &text,
            "brainai_queue_duration_seconds_count",
            &["model=\"tiny\"", "priority=\"stat\""]
        ) >= 1.0,
        "queue time is split by priority"
    );
    t.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_does_not_hold_the_drain() {
    // A drain timeout far beyond PATIENCE: if the open stream held the drain until the timeout,
    // the bounded wait below would fail.
    let (mut t, h) = serve_gated(
        "tiny",
        &["--max-queue-delay-us", "0", "--drain-timeout-s", "3600"],
    )
    .await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let message = |i: u32| pb::ClassifyStreamRequest {
        image: Some(flat_image(&format!("s{i}"), 32, 32, 3, 20)),
        ..Default::default()
    };
    tx.send(message(0)).await.unwrap();
    let mut client = t.client.clone();
    let mut inbound = bounded(
        "the stream to open",
        client.classify_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .unwrap()
    .into_inner();
    until("the first image to reach the model", || h.log.len() == 1).await;

    t.server.begin_shutdown();
    until_draining(t.metrics_addr(), &[t.server.grpc_addr, t.server.http_addr]).await;
    // The client has not half-closed; it even sends another image after the drain began.
    tx.send(message(1)).await.unwrap();
    h.gate.open();
    let first = bounded("the in-flight image's answer", inbound.message())
        .await
        .expect("a response")
        .expect("the in-flight image is answered");
    assert_eq!((first.image_id.as_str(), first.sequence), ("s0", 0));
    assert!(matches!(
        first.outcome,
        Some(pb::classify_stream_response::Outcome::Result(_))
    ));
    let end = bounded("the stream to end", inbound.message())
        .await
        .expect_err("the stream ends with a status");
    assert_eq!(end.code(), Code::Unavailable);
    assert!(end.message().contains("shutting down"), "{}", end.message());
    bounded("the server to stop", t.server.wait())
        .await
        .expect("clean stop");
    assert_eq!(
        h.log.len(),
        1,
        "the message sent during the drain never ran"
    );
    drop(tx);
}

/// Every preprocessing (rayon) thread held in a job until this is dropped. One of them, the
/// attendant, runs the jobs queued on the pool when asked, one at a time: a test sees exactly
/// which calls needed the pool.
struct PoolHeld {
    gate: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    attendant: Option<std::sync::mpsc::Sender<tokio::sync::oneshot::Sender<bool>>>,
}

impl PoolHeld {
    fn take() -> PoolHeld {
        let gate = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let threads = rayon::current_num_threads();
        let (started_tx, started) = std::sync::mpsc::channel();
        let (attendant, asks) = std::sync::mpsc::channel::<tokio::sync::oneshot::Sender<bool>>();
        rayon::spawn({
            let started_tx = started_tx.clone();
            move || {
                let _ = started_tx.send(());
                // Until the test drops its end: each ask runs one queued job (true) or finds
                // none (false).
                for reply in asks {
                    let ran = rayon::yield_now() == Some(rayon::Yield::Executed);
                    let _ = reply.send(ran);
                }
            }
        });
        for _ in 1..threads {
            let (gate, started_tx) = (gate.clone(), started_tx.clone());
            rayon::spawn(move || {
                let _ = started_tx.send(());
                let (open, cv) = &*gate;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
            });
        }
        // Each job blocks its thread, so `threads` started jobs are on `threads` threads.
        for _ in 0..threads {
            started
                .recv_timeout(PATIENCE)
                .expect("every preprocessing thread took a holding job");
        }
        PoolHeld {
            gate,
            attendant: Some(attendant),
        }
    }

    /// Runs one job queued on the pool; false when none is queued.
    async fn run_one(&self) -> bool {
        let (reply, ran) = tokio::sync::oneshot::channel();
        self.attendant
            .as_ref()
            .expect("held")
            .send(reply)
            .expect("the attendant holds its thread");
        bounded("the attendant", ran).await.expect("it answers")
    }
}

impl Drop for PoolHeld {
    fn drop(&mut self) {
        self.attendant = None;
        let (open, cv) = &*self.gate;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }
}

/// A PNG or JPEG request that decodes to at most `--inline-decode-kib` (256 KiB by default: one
/// 256² slice) is preprocessed on the async worker that received it, saving two thread hand-offs;
/// larger requests, DICOM, and every request with `--inline-decode-kib 0` go to the
/// preprocessing pool. Shown by holding every preprocessing thread: the small call is answered;
/// each of the others is answered only after the pool ran one job for it. (The count is exact
/// because each test runs in a process of its own, `make test`'s nextest: no other test's job is
/// on this pool.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_requests_are_preprocessed_without_the_pool_and_large_ones_on_it() {
    let inline = serve(args(&fixture_model("tiny"), &[]), None).await;
    let pooled = serve(
        args(&fixture_model("tiny"), &["--inline-decode-kib", "0"]),
        None,
    )
    .await;
    let classify = |server: &TestServer, file: &'static str| {
        let mut client = server.client.clone();
        tokio::spawn(async move {
            client
                .classify(request(vec![image(file, data(file))]))
                .await
                .map(|r| r.into_inner().results[0].clone())
        })
    };

    let held = PoolHeld::take();
    // 256×256 RGB PNG: 192 KiB decoded.
    let small = bounded(
        "a small call while every preprocessing thread is held",
        classify(&inline, "flair_256_a.png"),
    )
    .await
    .unwrap()
    .expect("answered without the pool");
    // 512×512 RGB PNG: 768 KiB decoded; a small DICOM (always the pool); and the small PNG
    // again with inline decoding off.
    let large = classify(&inline, "flair_512_rgb.png");
    let dicom = classify(&inline, "dicom/mono8.dcm");
    let small_pooled = classify(&pooled, "flair_256_a.png");
    // The pool runs nothing but what the attendant runs: count the jobs the three calls need.
    let mut jobs = 0;
    bounded("the three calls, their jobs run one by one", async {
        while !(large.is_finished() && dicom.is_finished() && small_pooled.is_finished()) {
            if held.run_one().await {
                jobs += 1;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    })
    .await;
    assert_eq!(
        jobs, 3,
        "the large image, the DICOM image and the small image with --inline-decode-kib 0 are \
         each preprocessed on the pool"
    );
    drop(held);
    bounded("the large call", large)
        .await
        .unwrap()
        .expect("large image answered");
    bounded("the DICOM call", dicom)
        .await
        .unwrap()
        .expect("DICOM image answered");
    let small_pooled = bounded("the pooled call", small_pooled)
        .await
        .unwrap()
        .expect("small image answered on the pool");
    assert_eq!(
        (small.label, small.probabilities),
        (small_pooled.label, small_pooled.probabilities),
        "the same image gets the same answer on either path"
    );
    inline.server.shutdown().await.unwrap();
    pooled.server.shutdown().await.unwrap();
}
