//! Prometheus metrics and health endpoints for the long-running commands.
//!
//! One HTTP listener per process (default 127.0.0.1, a port per command) serves
//! `/metrics` (Prometheus text), `/healthz` (the process is alive) and `/readyz` (it is
//! connected to what it reads and writes, and not stuck): 200 or 503.
//!
//! Invariant: recording a metric never blocks or fails the data path; the names below
//! are the only ones the relay emits, so the docs can list them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Bytes of WAL between pg_start's current position and the slot's confirmed LSN, read
/// from pg_start every 5 s while the relay streams (the figure `status` shows).
pub const SLOT_LAG_BYTES: &str = "outbox_relay_slot_lag_bytes";
/// The LSN confirmed to the slot, as a number.
pub const CONFIRMED_LSN: &str = "outbox_relay_confirmed_lsn";
/// Outbox rows read from the slot and delivered (label `stage`).
pub const RECORDS: &str = "outbox_relay_records_total";
/// Source transactions delivered.
pub const TRANSACTIONS: &str = "outbox_relay_transactions_total";
/// Rows and bytes in the batch not yet durable.
pub const IN_FLIGHT_RECORDS: &str = "outbox_relay_in_flight_records";
pub const IN_FLIGHT_BYTES: &str = "outbox_relay_in_flight_bytes";
/// Batches spilled into a destination transaction left open, because one source
/// transaction outgrew a batch (label `stage`).
pub const SPILLS: &str = "outbox_relay_spills_total";
/// Rows an on-demand backfill made durable in the destination (label `stage`).
pub const BACKFILL_ROWS: &str = "outbox_relay_backfill_rows_total";
/// Kafka transactions by `outcome` (committed, aborted).
pub const KAFKA_TRANSACTIONS: &str = "outbox_relay_kafka_transactions_total";
/// Retries by `cause`.
pub const RETRIES: &str = "outbox_relay_retries_total";
/// Records between the sink's position and the partition's end (label `partition`).
pub const CONSUMER_LAG: &str = "outbox_relay_consumer_lag";
/// Rows per pg_end apply transaction.
pub const APPLY_BATCH_SIZE: &str = "outbox_relay_apply_batch_size";
/// Duration of one pg_end apply transaction.
pub const APPLY_DURATION: &str = "outbox_relay_apply_duration_seconds";
/// Source commit → the destination's commit, per source transaction: pg_end's for the
/// sink and direct mode, Kafka's for the connector (label `stage`).
pub const END_TO_END_LATENCY: &str = "outbox_relay_end_to_end_latency_seconds";
/// [`END_TO_END_LATENCY`]'s buckets (seconds): 10 ms apart up to 100 ms and 50 ms apart
/// up to 300 ms, so that an alert on a p99 of 100 ms or 250 ms reads it to within a
/// bucket, then coarser out to a minute (a backlog).
pub const LATENCY_BUCKETS: [f64; 22] = [
    0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Records, now that their destination commit has returned, the end-to-end latency of
/// the source transactions committed at `commit_times` (µs since the Unix epoch).
pub fn record_latencies(stage: &'static str, commit_times: &[i64]) {
    if commit_times.is_empty() {
        return;
    }
    let now = chrono::Utc::now().timestamp_micros();
    let histogram = ::metrics::histogram!(END_TO_END_LATENCY, "stage" => stage);
    for &committed in commit_times {
        histogram.record(now.saturating_sub(committed).max(0) as f64 / 1e6);
    }
}
/// 1 while the process stands by for a slot another instance holds (label `stage`).
pub const STANDBY: &str = "outbox_relay_standby";
/// Records written to the dead-letter table.
pub const DEAD_LETTERS: &str = "outbox_relay_dead_letters_total";

/// Whether the process is connected and making progress, for `/readyz`.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// The process-wide health flag.
pub fn health() -> &'static Health {
    static HEALTH: OnceLock<Health> = OnceLock::new();
    HEALTH.get_or_init(Health::default)
}

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests); then ours stays idle.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The Prometheus recorder with the relay's histogram buckets.
fn build_recorder() -> PrometheusRecorder {
    let buckets = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(END_TO_END_LATENCY.into()), &LATENCY_BUCKETS)
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(APPLY_BATCH_SIZE.into()),
                &[1.0, 10.0, 100.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0],
            )
        })
        .map(|b| b.build_recorder())
        .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder())
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` in the background.
pub async fn serve(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let handle = recorder();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| std::future::ready("ok\n")))
        .route(
            "/readyz",
            get(|| async {
                if health().is_ready() {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "metrics endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz");
    Ok(bound)
}

/// The `--metrics-addr` flag of the long-running commands.
#[derive(clap::Args, Debug, Clone)]
pub struct MetricsArgs {
    /// Where to serve /metrics, /healthz and /readyz: host:port, or "off"
    /// [default: 127.0.0.1:9641 for the connector, :9642 the sink, :9643 direct mode]
    #[arg(long, env = "OUTBOX_RELAY_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
}

/// Default metrics ports of the long-running commands.
pub const CONNECTOR_METRICS: &str = "127.0.0.1:9641";
pub const SINK_METRICS: &str = "127.0.0.1:9642";
pub const DIRECT_METRICS: &str = "127.0.0.1:9643";

impl MetricsArgs {
    /// Starts the endpoint unless disabled; `default` when no address is given.
    pub async fn start(&self, default: &str) -> Result<Option<SocketAddr>, String> {
        let text = self.metrics_addr.as_deref().unwrap_or(default);
        if text == "off" {
            return Ok(None);
        }
        let addr: SocketAddr = text
            .parse()
            .map_err(|e| format!("--metrics-addr {text:?}: {e}"))?;
        serve(addr)
            .await
            .map(Some)
            .map_err(|e| format!("--metrics-addr {addr}: cannot listen: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end-to-end latency histogram reads a 100 ms objective to within 10 ms: 95 ms
    /// counts at `le="0.1"` and not at `le="0.09"`; other `_seconds` histograms keep the
    /// coarse buckets.
    #[test]
    fn the_latency_histogram_has_10_ms_buckets_up_to_100_ms() {
        let recorder = build_recorder();
        metrics::with_local_recorder(&recorder, || {
            ::metrics::histogram!(END_TO_END_LATENCY, "stage" => "sink").record(0.095);
            ::metrics::histogram!(APPLY_DURATION).record(0.095);
        });
        let body = recorder.handle().render();
        let count = |series: &str| {
            body.lines()
                .find(|line| line.starts_with(series))
                .and_then(|line| line.rsplit(' ').next())
                .map(str::to_string)
        };
        let latency = format!("{END_TO_END_LATENCY}_bucket{{stage=\"sink\",le=");
        assert_eq!(
            count(&format!("{latency}\"0.09\"}}")).as_deref(),
            Some("0"),
            "{body}"
        );
        assert_eq!(
            count(&format!("{latency}\"0.1\"}}")).as_deref(),
            Some("1"),
            "{body}"
        );
        let apply = format!("{APPLY_DURATION}_bucket{{le=");
        assert_eq!(count(&format!("{apply}\"0.09\"}}")), None, "{body}");
        assert_eq!(
            count(&format!("{apply}\"0.1\"}}")).as_deref(),
            Some("1"),
            "{body}"
        );
    }
}
