//! `outbox-relay check`: validates the configuration and connects to everything it
//! names, printing one line per check (ok, or what to fix); exits non-zero on any
//! failure. It changes nothing: no slot, publication or topic is created.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;

use crate::config::{KafkaArgs, OutboxArgs, SlotsArgs, SourceArgs, TargetArgs};
use crate::kafka;
use crate::pg;
use crate::source::{self, TableName};

/// Options of `outbox-relay check`.
#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub slots: SlotsArgs,
    #[command(flatten)]
    pub outbox: OutboxArgs,
    /// Skip the Kafka checks (a direct-mode deployment).
    #[arg(long)]
    pub no_kafka: bool,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckLine {
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

fn line(check: &str, result: Result<String, String>) -> CheckLine {
    match result {
        Ok(detail) => CheckLine {
            check: check.into(),
            ok: true,
            detail,
        },
        Err(detail) => CheckLine {
            check: check.into(),
            ok: false,
            detail,
        },
    }
}

/// Runs every check; each failure is a line, never an early return.
pub async fn run(args: &CheckArgs) -> Vec<CheckLine> {
    let mut lines = Vec::new();
    match TableName::parse(&args.outbox.table) {
        Ok(table) => source_checks(args, &table, &mut lines).await,
        Err(e) => lines.push(line("config: table", Err(e))),
    }
    target_checks(args, &mut lines).await;
    if !args.no_kafka {
        kafka_checks(args, &mut lines).await;
    }
    lines
}

/// Connects to `url` and reports it as the line `check` (the URL without its
/// password, or why not); `None` when the connection failed.
async fn connect(
    check: &str,
    url: &str,
    lines: &mut Vec<CheckLine>,
) -> Option<tokio_postgres::Client> {
    match pg::connect(url).await {
        Ok(c) => {
            lines.push(line(check, Ok(pg::redact_url(url))));
            Some(c)
        }
        Err(e) => {
            lines.push(line(
                check,
                Err(format!(
                    "{}: {}",
                    pg::redact_url(url),
                    crate::error::error_chain(&e)
                )),
            ));
            None
        }
    }
}

async fn source_checks(args: &CheckArgs, table: &TableName, lines: &mut Vec<CheckLine>) {
    let url = &args.source.source_url;
    let Some(client) = connect("pg_start: connect", url, lines).await else {
        return;
    };
    let err = |e: source::SourceError| crate::error::error_chain(&e);
    lines.push(line(
        "pg_start: version",
        source::check_version(&client)
            .await
            .map(|v| format!("server_version_num {v}"))
            .map_err(err),
    ));
    lines.push(line(
        "pg_start: wal_level",
        source::check_wal_level(&client)
            .await
            .map(|()| "logical".into())
            .map_err(err),
    ));
    lines.push(line(
        "pg_start: outbox table",
        source::outbox_columns(&client, table)
            .await
            .map(|c| {
                format!(
                    "{table} ({})",
                    c.iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
            .map_err(err),
    ));
    lines.push(line(
        "pg_start: publication",
        source::check_publication(&client, table, &args.outbox.publication, false)
            .await
            .map(|()| format!("{} publishes inserts of {table}", args.outbox.publication))
            .map_err(err),
    ));
    let database = source::database_of(url).unwrap_or_default();
    for slot in [&args.slots.slot, &args.slots.direct_slot] {
        let result = match source::slot_state(&client, slot).await {
            Ok(None) => Ok("absent: created at the first start".to_string()),
            Ok(Some(state)) => source::check_slot(slot, &state, &database)
                .map(|()| {
                    format!(
                        "confirmed {}, wal_status {}, {}",
                        state
                            .confirmed_flush_lsn
                            .map(|l| l.to_string())
                            .unwrap_or_default(),
                        state.wal_status.unwrap_or_default(),
                        match state.active_pid {
                            Some(pid) => format!("held by pid {pid}"),
                            None => "inactive".into(),
                        }
                    )
                })
                .map_err(err),
            Err(e) => Err(err(e)),
        };
        lines.push(line(&format!("pg_start: slot {slot}"), result));
    }
}

async fn target_checks(args: &CheckArgs, lines: &mut Vec<CheckLine>) {
    let url = &args.target.target_url;
    let Some(client) = connect("pg_end: connect", url, lines).await else {
        return;
    };
    for table in [
        "main.transactions",
        "main.balance",
        "outbox_relay.sink_offsets",
        "outbox_relay.direct_progress",
        "outbox_relay.dead_letters",
    ] {
        let exists = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .map(|r| r.get::<_, bool>(0));
        let result = match exists {
            Ok(true) => Ok("present".into()),
            Ok(false) => Err("missing: run `outbox-relay migrate`".into()),
            Err(e) => Err(e.to_string()),
        };
        lines.push(line(&format!("pg_end: table {table}"), result));
    }
}

async fn kafka_checks(args: &CheckArgs, lines: &mut Vec<CheckLine>) {
    let brokers = args.kafka.brokers.clone();
    let topic = args.kafka.topic.clone();
    let metadata = tokio::task::spawn_blocking({
        let (brokers, topic) = (brokers.clone(), topic.clone());
        move || {
            let consumer: BaseConsumer<kafka::LastClientError> = kafka::client_config(&brokers)
                .create_with_context(kafka::LastClientError::default())
                .map_err(|e| e.to_string())?;
            let all = consumer
                .fetch_metadata(None, Duration::from_secs(10))
                .map_err(|e| {
                    // The error alone does not say why (a refused TLS handshake, a failed
                    // login): librdkafka has queued each broker's reason, and polling
                    // hands them to the context.
                    // (A poll that handled a log line returns None too: poll for a while.)
                    let deadline = std::time::Instant::now() + Duration::from_millis(500);
                    while std::time::Instant::now() < deadline {
                        let _ = consumer.poll(Duration::from_millis(50));
                    }
                    match consumer.context().last() {
                        Some(cause) => format!("{e}; last error: {cause}"),
                        None => e.to_string(),
                    }
                })?;
            let brokers = all.brokers().len();
            let partitions: Option<Vec<usize>> = all
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .filter(|t| t.error().is_none())
                .map(|t| t.partitions().iter().map(|p| p.replicas().len()).collect());
            Ok::<_, String>((brokers, partitions))
        }
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let (broker_count, partitions) = match metadata {
        Ok(m) => m,
        Err(e) => {
            lines.push(line("kafka: brokers", Err(format!("{brokers}: {e}"))));
            return;
        }
    };
    lines.push(line(
        "kafka: brokers",
        Ok(format!("{broker_count} brokers answer at {brokers}")),
    ));
    let Some(replicas) = partitions else {
        lines.push(line(
            &format!("kafka: topic {topic}"),
            Ok("absent: the connector creates it (3 partitions, replication factor 3)".into()),
        ));
        return;
    };
    let min_rf = replicas.iter().copied().min().unwrap_or(0);
    lines.push(line(
        &format!("kafka: topic {topic}"),
        if min_rf >= 3 {
            Ok(format!("{} partitions, replication factor {min_rf}", replicas.len()))
        } else {
            Err(format!(
                "{} partitions, replication factor {min_rf}: use 3 or more replicas so that one broker can fail",
                replicas.len()
            ))
        },
    ));
    lines.push(line(
        &format!("kafka: topic {topic} min.insync.replicas"),
        min_insync_replicas(&brokers, &topic).await.and_then(|m| {
            if m >= 2 {
                Ok(format!("{m}"))
            } else {
                Err(format!(
                    "{m}: set min.insync.replicas=2 so that an acknowledged record survives a broker loss"
                ))
            }
        }),
    ));
}

async fn min_insync_replicas(brokers: &str, topic: &str) -> Result<i64, String> {
    let admin: AdminClient<DefaultClientContext> = kafka::client_config(brokers)
        .create()
        .map_err(|e| e.to_string())?;
    let results = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .map_err(|e| e.to_string())?;
    let resource = results
        .into_iter()
        .next()
        .ok_or("no answer")?
        .map_err(|e| e.to_string())?;
    resource
        .get("min.insync.replicas")
        .and_then(|e| e.value.as_deref())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "min.insync.replicas not reported".to_string())
}

/// Renders the report, one line per check.
pub fn render(lines: &[CheckLine]) -> String {
    lines
        .iter()
        .map(|l| {
            format!(
                "{:<5} {}: {}",
                if l.ok { "ok" } else { "FAIL" },
                l.check,
                l.detail
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
