//! A request's tracing span crosses the queue into its batch: what a model instance logs about an
//! image (on its own OS thread) is logged inside the span of the request the image came from; an
//! image's `queue` span ends within its request's span, even when the caller leaves while the
//! image waits. The tests install a capturing subscriber for this whole test binary (its own
//! process) and serve the real tiny models.

mod common;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};

use common::*;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

/// One captured event: the thread it ran on, its message and fields, and its span scope (root
/// first) as `name{fields}`.
#[derive(Debug, Clone)]
struct Captured {
    thread: String,
    text: String,
    scope: Vec<String>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>, Arc<Mutex<Vec<Lifecycle>>>);

/// A span's life, in the order it happened: `New` with its name, fields and parent, its exits,
/// its close.
#[derive(Debug, Clone, PartialEq)]
enum Lifecycle {
    New {
        id: u64,
        name: &'static str,
        fields: String,
        parent: Option<u64>,
    },
    Exit(u64),
    Close(u64),
}

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields(String::new());
        attrs.record(&mut fields);
        let parent = attrs
            .parent()
            .cloned()
            .or_else(|| {
                attrs
                    .is_contextual()
                    .then(|| ctx.current_span().id().cloned())
                    .flatten()
            })
            .map(|p| p.into_u64());
        self.1.lock().unwrap().push(Lifecycle::New {
            id: id.into_u64(),
            name: attrs.metadata().name(),
            fields: fields.0.clone(),
            parent,
        });
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_exit(&self, id: &Id, _: Context<'_, S>) {
        self.1.lock().unwrap().push(Lifecycle::Exit(id.into_u64()));
    }

    fn on_close(&self, id: Id, _: Context<'_, S>) {
        self.1.lock().unwrap().push(Lifecycle::Close(id.into_u64()));
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let scope = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .from_root()
                    .map(|span| {
                        let ext = span.extensions();
                        let f = ext.get::<Fields>().map_or("", |f| f.0.as_str());
                        format!("{}{{{}}}", span.name(), f.trim_end())
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.0.lock().unwrap().push(Captured {
            thread: std::thread::current().name().unwrap_or("?").to_string(),
            text: fields.0,
            scope,
        });
    }
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture::default();
        let filter = tracing_subscriber::EnvFilter::new("brainai=debug");
        tracing::subscriber::set_global_default(
            Registry::default().with(capture.clone().with_filter(filter)),
        )
        .expect("the only subscriber of this test binary");
        capture
    })
}

fn events_with(text: &str) -> Vec<Captured> {
    capture()
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.text.contains(text))
        .cloned()
        .collect()
}

/// The tests of this binary share the capturing subscriber: one at a time, so that neither reads
/// the other's events.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Each case: the extra server flags, and whether a batch's log lines come from the instance
/// thread (else from the async worker that ran the tiny model's batch in place).
const PATHS: [(&[&str], bool); 2] = [(&["--inline-run-us", "0"], true), (&[], false)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_logs_carry_the_request_span_and_no_image_id() {
    let _alone = ONE_AT_A_TIME.lock().await;
    capture();
    for (flags, on_instance_thread) in PATHS {
        capture().0.lock().unwrap().clear();
        // tiny-faulty fails any batch holding a 255 pixel: both the success and the failure path
        // log.
        let t = serve(
            args(
                &fixture_model("tiny-faulty"),
                &[&["--max-queue-delay-us", "0"], flags].concat(),
            ),
            None,
        )
        .await;
        let mut client = t.client.clone();
        client
            .classify(request(vec![flat_image("PATIENT^JANE-ok", 32, 32, 3, 40)]))
            .await
            .expect("a dark image runs");
        let err = client
            .classify(request(vec![flat_image(
                "PATIENT^JANE-bad",
                32,
                32,
                3,
                255,
            )]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);

        for (message, level_ok) in [("image ran", "ok"), ("batch failed", "failed")] {
            let events = events_with(message);
            assert!(!events.is_empty(), "no {message:?} event ({level_ok} path)");
            for e in &events {
                assert_eq!(
                    e.thread.starts_with("brainai-instance-"),
                    on_instance_thread,
                    "{message:?} with {flags:?}: {e:?}"
                );
                let request_span = e
                    .scope
                    .iter()
                    .find(|s| s.starts_with("classify{"))
                    .unwrap_or_else(|| {
                        panic!("{message:?} is not inside the request's span ({flags:?}): {e:?}")
                    });
                assert!(
                    request_span.contains("model=tiny-faulty") && request_span.contains("request="),
                    "{request_span}"
                );
            }
        }
        let everything = format!("{:?}", capture().0.lock().unwrap());
        assert!(
            !everything.contains("PATIENT"),
            "an image id reached the logs"
        );
        t.server.shutdown().await.unwrap();
    }
}

/// The spans called `name` created so far whose fields contain `fields`: (id, parent).
fn spans_named(name: &str, fields: &str) -> Vec<(u64, Option<u64>)> {
    capture()
        .1
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| match l {
            Lifecycle::New {
                id,
                name: n,
                fields: f,
                parent,
            } if *n == name && f.contains(fields) => Some((*id, *parent)),
            _ => None,
        })
        .collect()
}

/// Where in the recorded lifecycle `event` happened (the last time, for an exit).
fn position(event: &Lifecycle) -> Option<usize> {
    capture().1.lock().unwrap().iter().rposition(|l| l == event)
}

/// A caller that leaves while its image waits in the queue: the image's `queue` span ends then,
/// inside the request's span, not when the queue later drops the image (which would end it after
/// its parent: trace viewers then draw the wait outliving the request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_wait_ends_within_its_request_when_the_caller_leaves() {
    let _alone = ONE_AT_A_TIME.lock().await;
    capture();
    let (t, gated) = serve_gated("tiny", &["--max-queue-delay-us", "0", "--instances", "1"]).await;
    // The first image's run waits at the gate, holding the only instance.
    let mut first = t.client.clone();
    let running = tokio::spawn(async move {
        first
            .classify(request(vec![flat_image("span-first", 32, 32, 3, 40)]))
            .await
    });
    until("the first run to reach the gate", || gated.log.len() == 1).await;
    let before = spans_named("classify", "model=tiny ").len();
    // The second image waits in the queue behind it; then its caller gives up.
    let mut second = t.client.clone();
    let waiting = tokio::spawn(async move {
        second
            .classify(request(vec![flat_image("span-second", 32, 32, 3, 40)]))
            .await
    });
    let classify = bounded("the second request span", async {
        loop {
            let spans = spans_named("classify", "model=tiny ");
            if spans.len() > before
                && let Some(queue) = spans.iter().skip(before).find_map(|(c, _)| {
                    spans_named("queue", "")
                        .into_iter()
                        .find(|(_, p)| *p == Some(*c))
                })
            {
                break (queue.1.unwrap(), queue.0);
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    })
    .await;
    let (request_span, queue_span) = classify;
    waiting.abort();
    // Bounded well below the gate's patience: the queue span must end while the image is
    // still queued (the instance is held), not when a later batch drops it.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while position(&Lifecycle::Close(queue_span)).is_none() {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the queue span of a request whose caller left lives on while the image is queued"
    );
    // The request span is exited once more as the call is dropped (its end, for OpenTelemetry):
    // after the queue span closed.
    let queue_closed = position(&Lifecycle::Close(queue_span)).unwrap();
    until("the request span's last exit", || {
        position(&Lifecycle::Exit(request_span)).is_some_and(|exit| exit > queue_closed)
    })
    .await;
    gated.gate.open();
    running.await.unwrap().expect("the first call completes");
    t.server.shutdown().await.unwrap();
}
