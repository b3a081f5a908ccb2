//! A request's tracing span crosses the queue into its batch: what a model instance logs about an
//! image (on its own OS thread) is logged inside the span of the request the image came from. The
//! test installs a capturing subscriber for this whole test binary (its own process) and serves
//! the real tiny models.

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
struct Capture(Arc<Mutex<Vec<Captured>>>);

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
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
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

/// Each case: the extra server flags, and whether a batch's log lines come from the instance
/// thread (else from the async worker that ran the tiny model's batch in place).
const PATHS: [(&[&str], bool); 2] = [(&["--inline-run-us", "0"], true), (&[], false)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_logs_carry_the_request_span_and_no_image_id() {
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
