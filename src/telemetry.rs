//! Trace context: one trace from the service that wrote an outbox row, through Kafka,
//! to the sink's apply in pg_end.
//!
//! The connector carries an outbox column (`--trace-column`) as the record header
//! [`TRACEPARENT`], unchanged. The sink parses that header as a W3C Trace Context
//! `traceparent` ([`producer_span`]) and, once pg_end has committed the batch that
//! holds the record, ends one span ([`APPLY_SPAN`], kind consumer) per such record whose
//! parent is the producer's span: same trace id, parent span id = the header's.
//! Spans are exported with OpenTelemetry over OTLP/HTTP (protobuf) by a batch
//! processor on a thread of its own.
//!
//! # Invariants
//! 1. Tracing costs nothing unless an endpoint is configured
//!    (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`, the standard
//!    variables, [`Settings::from_env`]): without one no exporter, no thread, and the sink
//!    does not even parse the header ([`enabled`] is one atomic load).
//! 2. Tracing never changes what is delivered: a missing, malformed or unsampled
//!    `traceparent` only means no span; an unreachable collector only means lost
//!    spans (the export queue is bounded, spans beyond it are dropped). Nothing of the
//!    apply waits for an export.
//! 3. A span says "applied": it is ended only after pg_end's commit of its record's
//!    batch, at most once per record and sink process (a batch pg_end never committed
//!    makes no span; a record read again after a restart makes a second one, as it is
//!    applied — found already there — a second time).
//! 4. The sampling decision is the producer's: the default sampler follows the
//!    parent's `sampled` flag (`OTEL_TRACES_SAMPLER` overrides it, as in every
//!    OpenTelemetry SDK).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

/// The record header that carries the trace context (W3C Trace Context's name).
pub const TRACEPARENT: &str = "traceparent";

/// The name of the sink's span for one applied record.
pub const APPLY_SPAN: &str = "outbox-relay apply";

/// The producer's span, from a `traceparent` header value, by the W3C rules (the
/// OpenTelemetry SDK's propagator: lowercase hex, version `ff` and all-zero ids refused,
/// a later version may carry more fields). `None` for anything invalid.
pub fn producer_span(value: &[u8]) -> Option<Context> {
    struct Header<'a>(&'a str);
    impl Extractor for Header<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            (key == TRACEPARENT).then_some(self.0)
        }
        fn keys(&self) -> Vec<&str> {
            vec![TRACEPARENT]
        }
    }
    let value = std::str::from_utf8(value).ok()?;
    let context = TraceContextPropagator::new().extract(&Header(value));
    context.has_active_span().then_some(context)
}

/// Where spans go, from the standard OpenTelemetry variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The full URL spans are posted to (`…/v1/traces`).
    pub endpoint: String,
}

/// Why the configured exporter cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{0}")]
    Config(String),
    #[error("cannot build the OTLP span exporter: {0}")]
    Exporter(String),
}

impl Settings {
    /// The settings the environment asks for: `None` when no OTLP endpoint is set, or
    /// tracing is turned off (`OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`).
    pub fn from_env() -> Result<Option<Self>, TelemetryError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Settings::from_env`] over any variable lookup.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, TelemetryError> {
        let set = |name: &str| {
            var(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        match set("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => {
                return Err(TelemetryError::Config(format!(
                    "OTEL_TRACES_EXPORTER={other} is not supported: outbox-relay exports \
                     spans with otlp (or set it to none)"
                )))
            }
        }
        let endpoint = match (
            set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            set("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(traces), _) => traces,
            (None, Some(base)) => format!("{}/v1/traces", base.trim_end_matches('/')),
            (None, None) => return Ok(None),
        };
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            match set(name).as_deref() {
                None | Some("http/protobuf") => {}
                Some(other) => {
                    return Err(TelemetryError::Config(format!(
                        "{name}={other} is not supported: outbox-relay exports spans over \
                         OTLP/HTTP with protobuf (http/protobuf, port 4318 of a collector)"
                    )))
                }
            }
        }
        if !endpoint.starts_with("http://") {
            return Err(TelemetryError::Config(format!(
                "the OTLP endpoint {endpoint:?} is not a plain http:// URL: outbox-relay \
                 exports spans over OTLP/HTTP without TLS, to a collector beside it (e.g. \
                 http://localhost:4318) that forwards them on"
            )));
        }
        Ok(Some(Self { endpoint }))
    }
}

/// The process's tracer, once [`init`] has run with an endpoint.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();
/// [`TRACER`] is set: the sink's per-record check.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are made at all (invariant 1).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The exporter of a running process: [`Telemetry::shutdown`] flushes what is queued.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// Starts exporting spans to `settings`' endpoint; `service` is the `service.name`
/// unless `OTEL_SERVICE_NAME` says otherwise. Must run inside the tokio runtime, which
/// carries the exporter's HTTP requests. Once per process.
pub fn init(settings: &Settings, service: &'static str) -> Result<Telemetry, TelemetryError> {
    let client = OnRuntime {
        runtime: tokio::runtime::Handle::try_current()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?,
        client: Arc::new(
            opentelemetry_http::hyper::HyperClient::with_default_connector(export_timeout(), None),
        ),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(settings.endpoint.clone())
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("outbox-relay");
    if TRACER.set(tracer).is_err() {
        return Err(TelemetryError::Config(
            "tracing was set up twice in one process".into(),
        ));
    }
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(endpoint = %settings.endpoint, "exporting trace spans over OTLP/HTTP");
    Ok(Telemetry { provider })
}

/// The export's time limit: `OTEL_EXPORTER_OTLP_TIMEOUT` (ms), 10 s by default.
fn export_timeout() -> Duration {
    [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok()?.trim().parse::<u64>().ok())
    .map_or(Duration::from_secs(10), Duration::from_millis)
}

impl Telemetry {
    /// Exports what is queued (within the export timeout) and stops the exporter.
    /// Blocking: call it from a blocking thread while the runtime still runs.
    pub fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "trace spans not all exported at shutdown");
        }
    }
}

/// The exporter's batch thread is not a tokio thread: its requests run on the runtime.
#[derive(Debug)]
struct OnRuntime {
    runtime: tokio::runtime::Handle,
    client: Arc<opentelemetry_http::hyper::HyperClient>,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<opentelemetry_http::Bytes>,
    ) -> Result<
        opentelemetry_http::Response<opentelemetry_http::Bytes>,
        opentelemetry_http::HttpError,
    > {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await?
    }
}

/// A record that carried a trace context, as the sink consumed it.
#[derive(Debug, Clone)]
pub struct Traced {
    /// The producer's span ([`producer_span`]).
    pub parent: Context,
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// When the sink consumed it: the span's start.
    pub received: SystemTime,
    pub outcome: Outcome,
}

/// What the sink made of a traced record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its rows are in pg_end (inserted, or found there already).
    Applied,
    /// Deliberately not applied (an update, a delete, a tombstone).
    Skipped,
    /// Stored in `outbox_relay.dead_letters`: the span's status is an error.
    DeadLetter,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Skipped => "skipped",
            Outcome::DeadLetter => "dead_letter",
        }
    }
}

/// Ends one [`APPLY_SPAN`] per record, now: pg_end has committed them (invariant 3).
pub fn applied(records: &[Traced]) {
    let Some(tracer) = TRACER.get() else {
        return;
    };
    let end = SystemTime::now();
    for record in records {
        let mut span = tracer
            .span_builder(APPLY_SPAN)
            .with_kind(SpanKind::Consumer)
            .with_start_time(record.received)
            .with_attributes([
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("messaging.destination.name", record.topic.to_string()),
                KeyValue::new(
                    "messaging.destination.partition.id",
                    record.partition.to_string(),
                ),
                KeyValue::new("messaging.kafka.offset", record.offset),
                KeyValue::new("db.system.name", "postgresql"),
                KeyValue::new("outbox_relay.outcome", record.outcome.as_str()),
            ])
            .start_with_context(tracer, &record.parent);
        if record.outcome == Outcome::DeadLetter {
            span.set_status(Status::error("the record went to the dead letters"));
        }
        span.end_with_timestamp(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_version_00_traceparent_is_parsed() {
        let parsed = producer_span(SAMPLE.as_bytes()).unwrap();
        let span = parsed.span();
        let span = span.span_context();
        assert_eq!(
            span.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(span.span_id().to_string(), "00f067aa0ba902b7");
        assert!(span.is_sampled() && span.is_remote());
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        let cases = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ];
        for case in cases {
            assert!(producer_span(case.as_bytes()).is_none(), "{case:?}");
        }
        // A later version may carry more fields after the flags.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-anything";
        assert!(producer_span(future.as_bytes()).is_some());
    }

    fn from(pairs: &[(&str, &str)]) -> Result<Option<Settings>, TelemetryError> {
        Settings::from_vars(|name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn the_endpoint_comes_from_the_standard_variables() {
        let endpoint = |pairs: &[(&str, &str)]| from(pairs).unwrap().map(|s| s.endpoint);
        assert_eq!(endpoint(&[]), None);
        assert_eq!(
            endpoint(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]).as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(
            endpoint(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:9/x"),
            ])
            .as_deref(),
            Some("http://t:9/x")
        );
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        assert_eq!(endpoint(&[base, ("OTEL_SDK_DISABLED", "true")]), None);
        assert_eq!(endpoint(&[base, ("OTEL_TRACES_EXPORTER", "none")]), None);
        for refused in [
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")][..],
            &[base, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
            &[base, ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")],
            &[base, ("OTEL_TRACES_EXPORTER", "zipkin")],
        ] {
            assert!(from(refused).is_err(), "{refused:?}");
        }
    }
}
