//! Logging and OpenTelemetry traces: the process's one `tracing` subscriber.
//!
//! Logs go to stderr (text or JSON) filtered by `BRAINAI_LOG`. With `--otlp-endpoint`, a second
//! layer turns this crate's spans (never its log events) into OpenTelemetry spans and exports them
//! over OTLP/gRPC in batches; without it there is no OpenTelemetry layer and no exporter at all.
//! The spans themselves are opened where the work happens: the call and its response in
//! [`crate::api::trace`], the request, preprocessing and queue wait in [`crate::pipeline`] and
//! [`crate::batcher`], the batch run on the model instance thread (linked to each request span it
//! served). See README "Traces".

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry::trace::{Link, SpanKind, TraceContextExt, TraceId, TraceState};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, SamplingResult, SdkTracerProvider, ShouldSample, SpanData,
    SpanExporter,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tonic::transport::{Certificate, ClientTlsConfig};
use tracing_subscriber::filter::{FilterExt, LevelFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The name of the instrumentation scope of every exported span.
pub const SCOPE: &str = "brainai";

/// How often at most a collector that keeps failing is logged again.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The log format of `brainai serve` (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where and how to export traces.
#[derive(Debug, Clone)]
pub struct TraceExport {
    /// OTLP/gRPC collector endpoint, `http://host:port` or `https://host:port` (see
    /// [`parse_endpoint`]).
    pub endpoint: String,
    /// With an `https://` endpoint: the PEM CA certificates that may sign the collector's
    /// certificate (`None`: the system's trusted roots).
    pub ca: Option<PathBuf>,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// Fraction of new traces sampled (a call with a `traceparent` follows its parent's decision).
    pub sample_ratio: f64,
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] exports what is still buffered.
#[must_use = "call shutdown() at exit, or spans still buffered are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered (bounded: an unreachable collector does not hold the
    /// exit) and stops the exporter. Must run outside the async runtime, while it still runs.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5))
        {
            eprintln!("warning: exporting the last traces failed: {e}");
        }
    }
}

/// Installs the global subscriber: logs as `format` says, plus the OpenTelemetry layer when
/// `export` is set. With `export`, call it inside the Tokio runtime (the gRPC exporter's channel
/// lives there).
pub fn init(format: LogFormat, export: Option<&TraceExport>) -> Result<Telemetry, String> {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    }
    .with_filter(log_filter());
    let provider = export.map(provider).transpose()?;
    let otel = provider.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(SCOPE))
            .with_filter(filter_fn(exported))
    });
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| format!("cannot install the log subscriber: {e}"))?;
    Ok(Telemetry { provider })
}

/// What the OpenTelemetry layer sees: this crate's spans, not TRACE ones, and no events (log
/// messages may quote inputs; span fields are chosen to carry none).
fn exported(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span() && meta.target().starts_with("brainai") && *meta.level() != tracing::Level::TRACE
}

/// What the log layer writes: `BRAINAI_LOG` (default `info,ort=warn`), less the lines that are
/// noise whatever the level asked for.
pub fn log_filter<S>() -> impl tracing_subscriber::layer::Filter<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let filter =
        EnvFilter::try_from_env("BRAINAI_LOG").unwrap_or_else(|_| EnvFilter::new("info,ort=warn"));
    // The SDK logs every failed export twice (an error and a warning), with no limit; the
    // exporter's wrapper ([`Reported`]) says it instead, at most once a minute.
    // With a level hint that leaves the `EnvFilter`'s level the process's maximum: without it,
    // every disabled span of hyper and h2 was created and checked on every call (+25 µs of CPU
    // per Classify call, docs/PERFORMANCE.md).
    filter.and(
        filter_fn(|meta| !sdk_export_failure(meta) && !codec_chatter(meta))
            .with_max_level_hint(LevelFilter::TRACE),
    )
}

/// OpenJPEG's progress messages, which the `jpeg2k` crate passes on at INFO (three lines for
/// every JPEG 2000 frame decoded: "Start to read j2k main header", …): codec chatter, not
/// service events; its warnings and errors still pass.
fn codec_chatter(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_event() && meta.target().starts_with("jpeg2k") && *meta.level() == tracing::Level::INFO
}

/// The OpenTelemetry SDK's own log lines about one failed export (`BatchSpanProcessor.ExportError`,
/// `Export.Failed.*`).
fn sdk_export_failure(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_event()
        && meta.target().starts_with("opentelemetry")
        && (meta.name() == "BatchSpanProcessor.ExportError"
            || meta.name().starts_with("Export.Failed"))
}

fn provider(export: &TraceExport) -> Result<SdkTracerProvider, String> {
    let endpoint = &export.endpoint;
    let builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone());
    let builder = match (endpoint.starts_with("https://"), &export.ca) {
        (true, Some(ca)) => {
            builder.with_tls_config(ClientTlsConfig::new().ca_certificate(ca_file(ca)?))
        }
        (true, None) => builder.with_tls_config(ClientTlsConfig::new().with_native_roots()),
        (false, Some(ca)) => {
            return Err(format!(
                "--otlp-ca {}: only for an https:// --otlp-endpoint (it is {endpoint})",
                ca.display()
            ));
        }
        (false, None) => builder,
    };
    let exporter = builder
        .build()
        .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(Reported::new(exporter, endpoint))
        .with_sampler(BatchSampler::new(export.sample_ratio))
        .with_resource(
            Resource::builder()
                .with_service_name(export.service_name.clone())
                .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                .build(),
        )
        .build())
}

/// `--otlp-ca`: PEM certificates, read and checked at start (not at the first export).
fn ca_file(path: &std::path::Path) -> Result<Certificate, String> {
    let pem = std::fs::read(path).map_err(|e| format!("--otlp-ca {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--otlp-ca {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--otlp-ca {}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(Certificate::from_pem(pem))
}

/// `--otlp-endpoint`: an OTLP/gRPC collector, `http://host:port` or `https://host:port` (no path,
/// no query, no user). A bare `host:port` is refused here, at start, rather than taken for HTTPS
/// by the exporter.
pub fn parse_endpoint(s: &str) -> Result<String, String> {
    let valid = s.parse::<tonic::codegen::http::Uri>().ok().filter(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https"))
            && uri.authority().is_some_and(|a| {
                !a.host().is_empty() && a.port_u16().is_some() && !a.as_str().contains('@')
            })
            && matches!(uri.path(), "" | "/")
            && uri.query().is_none()
    });
    match valid {
        Some(_) => Ok(s.trim_end_matches('/').to_string()),
        None => Err(format!(
            "{} is not an OTLP/gRPC endpoint: it must be http://host:port or https://host:port",
            crate::error::echo(s)
        )),
    }
}

/// The sampler: parent-based at `--otlp-sample-ratio`, except for a span that starts its own
/// trace with links (a `batch`, linked to the request spans it served): it is sampled when any
/// linked span was, so that a model run is exported with the calls it served and not without
/// them. OpenTelemetry gives samplers a new span's links for exactly this (batch operations).
#[derive(Debug, Clone)]
struct BatchSampler(Sampler);

impl BatchSampler {
    fn new(ratio: f64) -> Self {
        BatchSampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
    }
}

impl ShouldSample for BatchSampler {
    fn should_sample(
        &self,
        parent: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let has_parent =
            parent.is_some_and(|cx| cx.has_active_span() && cx.span().span_context().is_valid());
        if has_parent || links.is_empty() {
            return self
                .0
                .should_sample(parent, trace_id, name, kind, attributes, links);
        }
        let sampled = links.iter().any(|l| l.span_context.is_sampled());
        SamplingResult {
            decision: if sampled {
                SamplingDecision::RecordAndSample
            } else {
                SamplingDecision::Drop
            },
            attributes: Vec::new(),
            trace_state: TraceState::default(),
        }
    }
}

/// The OTLP exporter, logging its failures at a bounded rate: the first failure at once, then at
/// most one line a minute with the number of failures since, and one line when it works again.
#[derive(Debug)]
struct Reported<E> {
    inner: E,
    endpoint: String,
    failures: Mutex<FailureLog>,
}

impl<E> Reported<E> {
    fn new(inner: E, endpoint: &str) -> Self {
        Reported {
            inner,
            endpoint: endpoint.to_string(),
            failures: Mutex::new(FailureLog::default()),
        }
    }

    fn note(&self, result: &OTelSdkResult) {
        let now = Instant::now();
        let line = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .note(result.is_ok(), now);
        let endpoint = &self.endpoint;
        match (line, result) {
            (Some(FailureLine::First), Err(e)) => tracing::warn!(
                "exporting traces to {endpoint} failed: {e} (while it keeps failing, one line a minute at most)"
            ),
            (Some(FailureLine::Again { failures, over }), Err(e)) => tracing::warn!(
                "exporting traces to {endpoint} still fails: {failures} failed exports in the last {} s, the last: {e}",
                over.as_secs()
            ),
            (Some(FailureLine::Recovered { failures }), _) => tracing::info!(
                "exporting traces to {endpoint} works again ({failures} failed exports since the last line)"
            ),
            _ => {}
        }
    }
}

impl<E: SpanExporter> SpanExporter for Reported<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.note(&result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .unreported();
        if failures > 0 {
            tracing::warn!(
                "exporting traces to {}: {failures} failed exports since the last line",
                self.endpoint
            );
        }
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// What to say about export failures (a pure state machine, so its pacing is testable).
#[derive(Debug, Default)]
struct FailureLog {
    /// The last export failed.
    failing: bool,
    /// Failures since the last line.
    unreported: u64,
    /// When the last line about failures was written.
    last_line: Option<Instant>,
}

#[derive(Debug, PartialEq, Eq)]
enum FailureLine {
    /// The first failure after a success (or the start).
    First,
    /// Still failing: `failures` since the last line, `over` ago.
    Again { failures: u64, over: Duration },
    /// Working again after `failures` failures not yet reported.
    Recovered { failures: u64 },
}

impl FailureLog {
    /// The line to write for one export's outcome at `now`, if any.
    fn note(&mut self, ok: bool, now: Instant) -> Option<FailureLine> {
        if ok {
            let was_failing = std::mem::take(&mut self.failing);
            let failures = std::mem::take(&mut self.unreported);
            return was_failing.then_some(FailureLine::Recovered { failures });
        }
        if !self.failing {
            self.failing = true;
            self.unreported = 0;
            self.last_line = Some(now);
            return Some(FailureLine::First);
        }
        self.unreported += 1;
        let last = self.last_line.unwrap_or(now);
        let over = now.saturating_duration_since(last);
        if over < FAILURE_LOG_INTERVAL {
            return None;
        }
        self.last_line = Some(now);
        Some(FailureLine::Again {
            failures: std::mem::take(&mut self.unreported),
            over,
        })
    }

    /// Failures not yet reported (at exit).
    fn unreported(&mut self) -> u64 {
        std::mem::take(&mut self.unreported)
    }
}

/// `--otlp-sample-ratio`: a fraction from 0 to 1.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a fraction from 0 to 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log filter keeps the level of `BRAINAI_LOG` as the process's maximum: a disabled
    /// span or event (h2's TRACE spans, this crate's DEBUG ones) then costs one comparison,
    /// instead of being created and checked on every call.
    #[test]
    fn the_log_filter_keeps_its_level_hint() {
        use tracing_subscriber::layer::Filter;
        let filter = log_filter::<tracing_subscriber::Registry>();
        let expected = EnvFilter::try_from_env("BRAINAI_LOG")
            .unwrap_or_else(|_| EnvFilter::new("info,ort=warn"))
            .max_level_hint();
        assert!(expected.is_some());
        assert_eq!(Filter::max_level_hint(&filter), expected);
    }

    #[test]
    fn ratio_is_a_fraction() {
        assert_eq!(parse_ratio("0.25"), Ok(0.25));
        assert_eq!(parse_ratio("1"), Ok(1.0));
        assert!(parse_ratio("1.5").is_err());
        assert!(parse_ratio("-0.1").is_err());
        assert!(parse_ratio("NaN").is_err());
    }

    #[test]
    fn endpoint_is_an_http_or_https_url_with_a_port() {
        for ok in [
            "http://collector:4317",
            "https://collector.example:4317",
            "http://127.0.0.1:4317/",
            "https://[::1]:4317",
        ] {
            assert_eq!(
                parse_endpoint(ok).as_deref(),
                Ok(ok.trim_end_matches('/')),
                "{ok}"
            );
        }
        for bad in [
            "collector:4317",
            "127.0.0.1:4317",
            "http://collector",
            "https://collector",
            "grpc://collector:4317",
            "unix:///tmp/otlp.sock",
            "http://collector:4317/v1/traces",
            "http://collector:4317/?x=1",
            "http://user:secret@collector:4317",
            "http://:4317",
            "",
        ] {
            let e = parse_endpoint(bad).unwrap_err();
            assert!(
                e.ends_with("it must be http://host:port or https://host:port")
                    && !e.contains('\n'),
                "{bad}: {e}"
            );
        }
        let long = format!("http://{}:4317", "a".repeat(500));
        assert!(parse_endpoint(&long).is_ok());
        let long = format!("{}:4317", "a".repeat(500));
        assert!(
            parse_endpoint(&long).unwrap_err().len() < 200,
            "echoed at most 64 characters"
        );
    }

    #[test]
    fn export_failures_are_logged_once_a_minute_at_most() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut log = FailureLog::default();
        assert_eq!(log.note(true, at(0)), None, "success says nothing");
        assert_eq!(log.note(false, at(1)), Some(FailureLine::First));
        // A collector that stays down: an export every 5 s (with retries), 8,600 an hour.
        let lines: Vec<_> = (1..=720)
            .filter_map(|i| log.note(false, at(1 + 5 * i)))
            .collect();
        assert_eq!(lines.len(), 60, "one line a minute for an hour: {lines:?}");
        assert_eq!(
            lines[0],
            FailureLine::Again {
                failures: 12,
                over: Duration::from_secs(60)
            }
        );
        assert_eq!(log.note(false, at(3620)), None);
        assert_eq!(
            log.note(true, at(3621)),
            Some(FailureLine::Recovered { failures: 1 })
        );
        assert_eq!(log.note(true, at(3622)), None);
        assert_eq!(log.note(false, at(3623)), Some(FailureLine::First));
        assert_eq!(log.note(false, at(3624)), None);
        assert_eq!(log.unreported(), 1, "reported at exit");
    }

    fn link(sampled: bool) -> Link {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags};
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Link::with_context(SpanContext::new(
            TraceId::from_bytes([7; 16]),
            SpanId::from_bytes([3; 8]),
            flags,
            true,
            TraceState::default(),
        ))
    }

    fn decide(ratio: f64, links: &[Link]) -> SamplingDecision {
        BatchSampler::new(ratio)
            .should_sample(
                Some(&Context::new()),
                TraceId::from_bytes([9; 16]),
                "batch",
                &SpanKind::Internal,
                &[],
                links,
            )
            .decision
    }

    #[test]
    fn a_batch_is_sampled_with_the_calls_it_served() {
        use SamplingDecision::{Drop, RecordAndSample};
        // Any sampled call: exported, whatever the ratio.
        assert_eq!(decide(0.0, &[link(true)]), RecordAndSample);
        assert_eq!(decide(0.0, &[link(false), link(true)]), RecordAndSample);
        // Only calls that were not sampled: not exported, whatever the ratio.
        assert_eq!(decide(1.0, &[link(false)]), Drop);
        assert_eq!(decide(1.0, &[link(false), link(false)]), Drop);
        // No links (a warm-up run): the ratio, like any new trace.
        assert_eq!(decide(1.0, &[]), RecordAndSample);
        assert_eq!(decide(0.0, &[]), Drop);
    }
}
