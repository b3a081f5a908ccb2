//! Logging and OpenTelemetry traces: the process's one `tracing` subscriber.
//!
//! Logs go to stderr (text or JSON) filtered by `BRAINAI_LOG`. With `--otlp-endpoint`, a second
//! layer turns this crate's spans (never its log events) into OpenTelemetry spans and exports them
//! over OTLP/gRPC in batches; without it there is no OpenTelemetry layer and no exporter at all.
//! The spans themselves are opened where the work happens: the call and its response in
//! [`crate::api::trace`], the request, preprocessing and queue wait in [`crate::pipeline`] and
//! [`crate::batcher`], the batch run on the model instance thread (linked to each request span it
//! served). See README "Traces".

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// The name of the instrumentation scope of every exported span.
pub const SCOPE: &str = "brainai";

/// Where and how to export traces.
#[derive(Debug, Clone)]
pub struct TraceExport {
    /// OTLP/gRPC collector endpoint, e.g. `http://otel-collector:4317`.
    pub endpoint: String,
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
    let filter =
        EnvFilter::try_from_env("BRAINAI_LOG").unwrap_or_else(|_| EnvFilter::new("info,ort=warn"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    }
    .with_filter(filter);
    let provider = export.map(provider).transpose()?;
    let otel = provider.as_ref().map(|provider| {
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

fn provider(export: &TraceExport) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(export.endpoint.clone())
        .build()
        .map_err(|e| format!("--otlp-endpoint {}: {e}", export.endpoint))?;
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(export.sample_ratio)));
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(
            Resource::builder()
                .with_service_name(export.service_name.clone())
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build(),
        )
        .build())
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

    #[test]
    fn ratio_is_a_fraction() {
        assert_eq!(parse_ratio("0.25"), Ok(0.25));
        assert_eq!(parse_ratio("1"), Ok(1.0));
        assert!(parse_ratio("1.5").is_err());
        assert!(parse_ratio("-0.1").is_err());
        assert!(parse_ratio("NaN").is_err());
    }
}
