//! `outbox-relay status`: one screen answering "is it healthy, and how far behind?".
//!
//! It reads, each part on its own and bounded by `--timeout`:
//! - pg_start: the connector's and the direct mode's slots (active pid, confirmed flush
//!   LSN, lag in bytes behind `pg_current_wal_lsn()`, `wal_status`, `safe_wal_size`);
//! - Kafka: the topic's low and high watermarks per partition, and the connector's
//!   progress-topic record (the LSN of the last source transaction in Kafka);
//! - pg_end: the sink's stored offsets per partition (with their lag against the high
//!   watermark), the direct mode's stored LSN, and the dead letters.
//!
//! Invariant: status only reads (no slot, topic, group or row is created or moved), and
//! a component that is down makes its own part say `unreachable: <error>` while the
//! others are still shown; the command then exits 1. An invalidated slot (`wal_status =
//! lost`, or an `invalidation_reason`: see [`source::invalidation`]) is a problem too.
//! What needs a look but is not an outage (dead letters, a slot with no walsender, a
//! missing slot) is a warning.
//!
//! The sink's lag per partition counts records it has not applied. Offsets alone
//! cannot say it: on a topic written in Kafka transactions, a partition ends with the
//! commit markers of its last transactions (one per transactional id that wrote there
//! last: the connector rotates four) and maybe records of aborted ones, none of which a
//! read_committed consumer ever sees. So where `high watermark - 1 - last stored
//! offset` is above 0, status reads the partition read_committed from the offset after
//! the stored one: reaching its end without a record means caught up, lag 0; a record
//! means behind, and the offset difference (an upper bound) stands.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::future::Future;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;
use tokio_postgres::Client;

use crate::apply;
use crate::config::{self, KafkaArgs, SlotsArgs, SourceArgs, TargetArgs};
use crate::error::error_chain;
use crate::kafka;
use crate::pg;
use crate::progress::{BackfillProgress, ProgressState, SnapshotProgress};
use crate::source;

/// Options of `outbox-relay status`.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub slots: SlotsArgs,
    /// The connector's progress topics' base name (slot S's records are in `<base>.S`).
    #[arg(long, env = "OUTBOX_RELAY_PROGRESS_TOPIC", default_value = config::DEFAULT_PROGRESS_TOPIC)]
    pub progress_topic: String,
    /// The connector's dead-letter topic (its records are counted).
    #[arg(long, env = "OUTBOX_RELAY_DEAD_LETTER_TOPIC", default_value = config::DEFAULT_DEAD_LETTER_TOPIC)]
    pub dead_letter_topic: String,
    /// Skip Kafka (a deployment that runs only direct mode). Implied by a
    /// configuration file with `[direct]` and neither `[connector]` nor `[sink]`.
    #[arg(long)]
    pub no_kafka: bool,
    /// Seconds each part may take before it counts as unreachable.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl StatusArgs {
    /// Options for the given databases, brokers and topic, with the defaults otherwise.
    pub fn new(source_url: &str, target_url: &str, brokers: &str, topic: &str) -> Self {
        Self {
            source: SourceArgs {
                source_url: source_url.to_string(),
            },
            target: TargetArgs {
                target_url: target_url.to_string(),
            },
            kafka: KafkaArgs::new(brokers, topic),
            slots: SlotsArgs::default(),
            progress_topic: config::DEFAULT_PROGRESS_TOPIC.into(),
            dead_letter_topic: config::DEFAULT_DEAD_LETTER_TOPIC.into(),
            no_kafka: false,
            timeout: 10.0,
            json: false,
        }
    }
}

/// One component's part of the report.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Part<T> {
    Reachable(T),
    Unreachable { error: String },
    Skipped,
}

impl<T> Part<T> {
    pub fn reachable(&self) -> Option<&T> {
        match self {
            Part::Reachable(t) => Some(t),
            _ => None,
        }
    }
}

/// pg_start's part.
#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    pub url: String,
    pub server_version: String,
    pub current_wal_lsn: String,
    /// The connector's slot, then the direct mode's.
    pub slots: Vec<SlotStatus>,
    /// The physical slots `synchronized_standby_slots` names (PostgreSQL 17+) that no
    /// standby holds: pg_start holds back the logical slots' changes until they do, so
    /// the relays stall while their slots' lag grows.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waiting_for_standby_slots: Vec<String>,
}

/// One replication slot.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    pub name: String,
    /// `connector` or `direct`.
    pub role: &'static str,
    pub exists: bool,
    pub database: Option<String>,
    pub plugin: Option<String>,
    /// Whether a walsender streams from it now.
    pub active: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<String>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`: WAL the slot holds back.
    pub lag_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` (about to be lost) or `lost`.
    pub wal_status: Option<String>,
    /// Why PostgreSQL invalidated the slot (17+: `wal_removed`, `rows_removed`,
    /// `wal_level_insufficient`, 18: `idle_timeout`); `None` for a valid slot.
    pub invalidation_reason: Option<String>,
    /// Bytes of WAL that can still be written before the slot is lost (with
    /// `max_slot_wal_keep_size`), or `None` when unlimited.
    pub safe_wal_size: Option<i64>,
    /// The relay instances standing by for the slot: their pg_start sessions' pid and
    /// client address (`pid@address`).
    pub standbys: Vec<String>,
}

/// Kafka's part.
#[derive(Debug, Clone, Serialize)]
pub struct KafkaStatus {
    pub brokers: String,
    pub topic: String,
    /// Watermarks per partition; empty with `topic_error`.
    pub partitions: Vec<PartitionStatus>,
    pub topic_error: Option<String>,
    pub progress_topic: String,
    /// The connector's progress record for its slot.
    pub progress: Option<ProgressStatus>,
    /// Why the progress record could not be read (`None`: read, or there is none).
    pub progress_error: Option<String>,
    pub dead_letter_topic: String,
    /// The connector's dead letters (committed records of the dead-letter topic);
    /// `None` when the topic does not exist or could not be read.
    pub dead_letters: Option<u64>,
    /// The reason of the last one.
    pub last_dead_letter: Option<String>,
}

/// One partition's watermarks.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub partition: i32,
    /// The first offset still in the log.
    pub low_watermark: i64,
    /// The offset the next record will get.
    pub high_watermark: i64,
}

/// The connector's last progress record.
#[derive(Debug, Clone, Serialize)]
pub struct ProgressStatus {
    /// `snapshot` or `streaming`.
    pub state: ProgressState,
    /// Commit end LSN of the last source transaction in Kafka.
    pub lsn: String,
    /// How far the initial snapshot got, while it is delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotProgress>,
    /// The on-demand backfills running, queued or lately finished.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backfills: Vec<BackfillProgress>,
}

/// pg_end's part.
#[derive(Debug, Clone, Serialize)]
pub struct TargetStatus {
    pub url: String,
    /// The sink's stored offset per partition of the topic (with the lag once Kafka
    /// answered), partition order.
    pub sink: Vec<SinkPartition>,
    /// The other topics the sink stores offsets for (its inboxes' topics, a routed
    /// deployment's), each with its partitions' lag once Kafka answered.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_sinks: Vec<SinkTopic>,
    /// The direct mode's stored LSN for its slot.
    pub direct: Option<DirectStatus>,
    pub dead_letters: i64,
    pub dead_letters_by_kind: BTreeMap<String, i64>,
    pub last_dead_letter_at: Option<String>,
}

/// The sink's progress in one partition.
#[derive(Debug, Clone, Serialize)]
pub struct SinkPartition {
    pub partition: i32,
    /// The last offset applied (`None`: nothing yet; the sink starts at the beginning).
    pub last_offset: Option<i64>,
    pub updated_at: Option<String>,
    pub high_watermark: Option<i64>,
    /// Records not yet applied: 0 when every committed record is; otherwise `high
    /// watermark - 1 - last_offset`, an upper bound (see the module documentation).
    pub lag: Option<i64>,
}

/// The sink's progress on a topic other than `--topic`.
#[derive(Debug, Clone, Serialize)]
pub struct SinkTopic {
    pub topic: String,
    /// As the `--topic` table: stored offsets, with watermarks and lag once Kafka
    /// answered (every partition of the topic then has a row).
    pub partitions: Vec<SinkPartition>,
}

/// The direct mode's progress.
#[derive(Debug, Clone, Serialize)]
pub struct DirectStatus {
    pub slot: String,
    pub commit_lsn: String,
    pub updated_at: String,
    /// How far the initial snapshot got, while it is delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotProgress>,
    /// The on-demand backfills running, queued or lately finished.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backfills: Vec<BackfillProgress>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// No component unreachable and no slot lost.
    pub ok: bool,
    /// What makes `ok` false.
    pub problems: Vec<String>,
    /// What needs a look but is not an outage.
    pub warnings: Vec<String>,
    pub pg_start: Part<SourceStatus>,
    pub kafka: Part<KafkaStatus>,
    pub pg_end: Part<TargetStatus>,
}

const SLOTS: &str = "\
SELECT s.name, s.ord, r.database::text, r.plugin::text, coalesce(r.active, false), r.active_pid,
       r.confirmed_flush_lsn::text,
       pg_wal_lsn_diff(pg_current_wal_lsn(), r.confirmed_flush_lsn)::int8,
       r.wal_status, r.safe_wal_size::int8, r.slot_name IS NOT NULL,
       ARRAY(SELECT a.pid::text || '@' || coalesce(host(a.client_addr), 'local')
             FROM pg_stat_activity a
             WHERE a.application_name = 'outbox-relay standby:' || s.name ORDER BY a.pid),
       to_jsonb(r) ->> 'invalidation_reason'
FROM unnest($1::text[]) WITH ORDINALITY AS s(name, ord)
LEFT JOIN pg_replication_slots r ON r.slot_name = s.name
ORDER BY s.ord";

const SINK_OFFSETS: &str = "\
SELECT partition, last_offset, updated_at::text FROM outbox_relay.sink_offsets
WHERE topic = $1 ORDER BY partition";

const OTHER_SINK_OFFSETS: &str = "\
SELECT topic, partition, last_offset, updated_at::text FROM outbox_relay.sink_offsets
WHERE topic <> $1 ORDER BY topic, partition";

const DIRECT_PROGRESS: &str = "\
SELECT commit_lsn::text, updated_at::text, snapshot, backfill
FROM outbox_relay.direct_progress WHERE slot_name = $1";

const DEAD_LETTERS: &str = "\
SELECT kind, count(*)::int8, max(received_at)::text FROM outbox_relay.dead_letters GROUP BY kind";

/// Reads every part, concurrently, each bounded by `args.timeout`.
pub async fn run(args: &StatusArgs) -> StatusReport {
    let timeout = Duration::from_secs_f64(args.timeout.max(0.1));
    let (pg_start, kafka, pg_end) = tokio::join!(
        bounded(timeout, source_status(args)),
        async {
            if args.no_kafka {
                Part::Skipped
            } else {
                bounded(timeout, kafka_status(args, timeout)).await
            }
        },
        bounded(timeout, target_status(args)),
    );
    let mut report = StatusReport {
        ok: true,
        problems: Vec::new(),
        warnings: Vec::new(),
        pg_start,
        kafka,
        pg_end,
    };
    reread_absent_slots(args, &mut report, timeout).await;
    join_lag(&mut report);
    settle_lag(args, &mut report, timeout).await;
    other_lag(args, &mut report, timeout).await;
    judge(args, &mut report);
    report
}

/// Reads pg_start's slots again when one was absent while its relay's progress says it
/// streamed from it: the three parts are read at once, so a relay that created its slot
/// and wrote its first progress meanwhile looks like a lost slot. A relay creates its
/// slot before it writes any progress, so a slot still absent now, after the progress
/// was read, is lost.
async fn reread_absent_slots(args: &StatusArgs, report: &mut StatusReport, timeout: Duration) {
    let Some(source) = report.pg_start.reachable() else {
        return;
    };
    if !source
        .slots
        .iter()
        .any(|slot| !slot.exists && streamed_from(report, slot).is_some())
    {
        return;
    }
    let again = bounded(timeout, source_status(args)).await;
    if again.reachable().is_some() {
        report.pg_start = again;
    }
}

/// Sets to 0 the lag of each `--topic` partition whose records after the stored
/// offset are only commit markers or aborted records (see the module documentation).
async fn settle_lag(args: &StatusArgs, report: &mut StatusReport, timeout: Duration) {
    let Part::Reachable(target) = &mut report.pg_end else {
        return;
    };
    if args.no_kafka || !target.sink.iter().any(|p| p.lag.is_some_and(|lag| lag > 0)) {
        return;
    }
    let (brokers, topic) = (args.kafka.brokers.clone(), args.kafka.topic.clone());
    let mut sink = target.sink.clone();
    let settled = tokio::task::spawn_blocking(move || {
        settle(&brokers, &topic, &mut sink, timeout);
        sink
    })
    .await;
    if let Ok(sink) = settled {
        target.sink = sink;
    }
}

/// Sets to 0 the lag of each partition of `topic` in `sink` that [`caught_up`] finds
/// at its end; the offset differences stand where Kafka does not answer. Blocks.
fn settle(brokers: &str, topic: &str, sink: &mut [SinkPartition], timeout: Duration) {
    let starts: Vec<(i32, i64)> = sink
        .iter()
        .filter(|p| p.lag.is_some_and(|lag| lag > 0))
        .filter_map(|p| Some((p.partition, p.last_offset? + 1)))
        .collect();
    if starts.is_empty() {
        return;
    }
    let Ok(ended) = caught_up(brokers, topic, &starts, timeout) else {
        return;
    };
    for p in sink {
        if ended.contains(&p.partition) {
            p.lag = Some(0);
        }
    }
}

/// The partitions of `starts` (partition, offset) with no committed record from that
/// offset on: a read_committed read reaches their end first.
fn caught_up(
    brokers: &str,
    topic: &str,
    starts: &[(i32, i64)],
    timeout: Duration,
) -> Result<std::collections::HashSet<i32>, String> {
    use rdkafka::error::KafkaError;
    use rdkafka::{Message, Offset, TopicPartitionList};
    use std::collections::HashSet;
    let consumer: BaseConsumer<kafka::EndOfPartitionIsExpected> = kafka::client_config(brokers)
        .set("group.id", "outbox-relay-status")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create_with_context(kafka::EndOfPartitionIsExpected)
        .map_err(|e| error_chain(&e))?;
    let mut assignment = TopicPartitionList::new();
    for (partition, start) in starts {
        assignment
            .add_partition_offset(topic, *partition, Offset::Offset(*start))
            .map_err(|e| error_chain(&e))?;
    }
    consumer.assign(&assignment).map_err(|e| error_chain(&e))?;
    let mut open: HashSet<i32> = starts.iter().map(|(p, _)| *p).collect();
    let mut ended = HashSet::new();
    let deadline = std::time::Instant::now() + timeout;
    while !open.is_empty() && std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            // A committed record after the stored offset: behind.
            Some(Ok(record)) => {
                open.remove(&record.partition());
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                if open.remove(&partition) {
                    ended.insert(partition);
                }
            }
            Some(Err(_)) | None => {}
        }
    }
    Ok(ended)
}

async fn bounded<T>(timeout: Duration, part: impl Future<Output = Result<T, String>>) -> Part<T> {
    match tokio::time::timeout(timeout, part).await {
        Ok(Ok(t)) => Part::Reachable(t),
        Ok(Err(error)) => Part::Unreachable { error },
        Err(_) => Part::Unreachable {
            error: format!("no answer within {:.1}s", timeout.as_secs_f64()),
        },
    }
}

async fn connect(url: &str) -> Result<Client, String> {
    pg::connect(url).await.map_err(|e| error_chain(&e))
}

async fn source_status(args: &StatusArgs) -> Result<SourceStatus, String> {
    let url = &args.source.source_url;
    let client = connect(url).await?;
    let query_error = |e: tokio_postgres::Error| error_chain(&e);
    // A standby has no current WAL position of its own to measure the slots against.
    source::check_primary(&client)
        .await
        .map_err(|e| error_chain(&e))?;
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), pg_current_wal_lsn()::text",
            &[],
        )
        .await
        .map_err(query_error)?;
    let names = vec![args.slots.slot.clone(), args.slots.direct_slot.clone()];
    let rows = client.query(SLOTS, &[&names]).await.map_err(query_error)?;
    let mut slots = Vec::with_capacity(rows.len());
    for (r, role) in rows.iter().zip(["connector", "direct"]) {
        slots.push(SlotStatus {
            name: r.try_get(0).map_err(query_error)?,
            role,
            database: r.try_get(2).map_err(query_error)?,
            plugin: r.try_get(3).map_err(query_error)?,
            active: r.try_get(4).map_err(query_error)?,
            active_pid: r.try_get(5).map_err(query_error)?,
            confirmed_flush_lsn: r.try_get(6).map_err(query_error)?,
            lag_bytes: r.try_get(7).map_err(query_error)?,
            wal_status: r.try_get(8).map_err(query_error)?,
            safe_wal_size: r.try_get(9).map_err(query_error)?,
            exists: r.try_get(10).map_err(query_error)?,
            standbys: r.try_get(11).map_err(query_error)?,
            invalidation_reason: r.try_get(12).map_err(query_error)?,
        });
    }
    let waiting_for_standby_slots = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots
             WHERE slot_type = 'physical' AND NOT active
               AND slot_name = ANY (string_to_array(replace(
                   current_setting('synchronized_standby_slots', true), ' ', ''), ','))
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(query_error)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(SourceStatus {
        url: pg::redact_url(url),
        server_version: row.try_get(0).map_err(query_error)?,
        current_wal_lsn: row.try_get(1).map_err(query_error)?,
        slots,
        waiting_for_standby_slots,
    })
}

async fn kafka_status(args: &StatusArgs, timeout: Duration) -> Result<KafkaStatus, String> {
    let args = args.clone();
    // librdkafka's calls block: a thread of the blocking pool, each call bounded.
    let per_call = timeout.mul_f64(0.8);
    tokio::task::spawn_blocking(move || kafka_status_blocking(&args, per_call))
        .await
        .map_err(|e| format!("the kafka status task failed: {e}"))?
}

fn kafka_status_blocking(args: &StatusArgs, timeout: Duration) -> Result<KafkaStatus, String> {
    let (brokers, topic, progress_topic, slot) = (
        args.kafka.brokers.as_str(),
        args.kafka.topic.as_str(),
        args.progress_topic.as_str(),
        args.slots.slot.as_str(),
    );
    // Client errors go to the report, not to the log: a broker that is down would
    // otherwise add a line per retry to a one-screen command.
    let consumer: BaseConsumer<kafka::LastClientError> = kafka::client_config(brokers)
        .set("group.id", "outbox-relay-status")
        .set("enable.auto.commit", "false")
        .set_log_level(rdkafka::config::RDKafkaLogLevel::Critical)
        .create_with_context(kafka::LastClientError::default())
        .map_err(|e| error_chain(&e))?;
    // Any broker answering metadata at all is "reachable"; a missing topic is not an outage.
    let metadata = consumer.fetch_metadata(None, timeout).map_err(|e| {
        format!(
            "no broker answered: {}",
            kafka::metadata_failure(&consumer, &e)
        )
    })?;
    let exists = |name: &str| metadata.topics().iter().any(|t| t.name() == name);

    let mut status = KafkaStatus {
        brokers: brokers.to_string(),
        topic: topic.to_string(),
        partitions: Vec::new(),
        topic_error: None,
        progress_topic: kafka::progress_topic_of(progress_topic, slot),
        progress: None,
        progress_error: None,
        dead_letter_topic: args.dead_letter_topic.clone(),
        dead_letters: None,
        last_dead_letter: None,
    };
    if exists(&args.dead_letter_topic) {
        if let Ok((count, last)) =
            kafka::read_committed_count(brokers, &args.dead_letter_topic, timeout)
        {
            status.dead_letters = Some(count);
            status.last_dead_letter = last.and_then(|value| {
                serde_json::from_slice::<serde_json::Value>(&value)
                    .ok()
                    .and_then(|v| v["reason"].as_str().map(str::to_string))
            });
        }
    }
    if exists(topic) {
        match kafka::topic_partitions(&consumer, topic, timeout) {
            Ok(partitions) => {
                for partition in partitions {
                    let (low, high) = consumer
                        .fetch_watermarks(topic, partition, timeout)
                        .map_err(|e| {
                            format!("watermarks of {topic}/{partition}: {}", error_chain(&e))
                        })?;
                    status.partitions.push(PartitionStatus {
                        partition,
                        low_watermark: low,
                        high_watermark: high,
                    });
                }
            }
            Err(error) => status.topic_error = Some(error_chain(&error)),
        }
    } else {
        status.topic_error = Some("does not exist".into());
    }
    // The slot's own topic, or the shared one of earlier versions (`read_progress`).
    if exists(&status.progress_topic) || exists(progress_topic) {
        match kafka::read_progress(brokers, progress_topic, slot, timeout) {
            Ok(record) => {
                status.progress = record.map(|r| ProgressStatus {
                    state: r.state,
                    lsn: r.lsn,
                    snapshot: r.snapshot,
                    backfills: r.backfills,
                })
            }
            Err(error) => status.progress_error = Some(error_chain(&error)),
        }
    }
    Ok(status)
}

async fn target_status(args: &StatusArgs) -> Result<TargetStatus, String> {
    let url = &args.target.target_url;
    let client = connect(url).await?;
    let query_error =
        |e: tokio_postgres::Error| format!("{}{}", error_chain(&e), apply::what_to_do(&e));
    let offsets = client
        .query(SINK_OFFSETS, &[&args.kafka.topic])
        .await
        .map_err(query_error)?;
    let mut other_sinks: Vec<SinkTopic> = Vec::new();
    for r in client
        .query(OTHER_SINK_OFFSETS, &[&args.kafka.topic])
        .await
        .map_err(query_error)?
    {
        let topic: String = r.try_get(0).map_err(query_error)?;
        let partition = SinkPartition {
            partition: r.try_get(1).map_err(query_error)?,
            last_offset: Some(r.try_get(2).map_err(query_error)?),
            updated_at: Some(r.try_get(3).map_err(query_error)?),
            high_watermark: None,
            lag: None,
        };
        match other_sinks.last_mut() {
            Some(last) if last.topic == topic => last.partitions.push(partition),
            _ => other_sinks.push(SinkTopic {
                topic,
                partitions: vec![partition],
            }),
        }
    }
    let direct = client
        .query_opt(DIRECT_PROGRESS, &[&args.slots.direct_slot])
        .await
        .map_err(query_error)?;
    let letters = client.query(DEAD_LETTERS, &[]).await.map_err(query_error)?;
    let mut sink = Vec::with_capacity(offsets.len());
    for r in &offsets {
        sink.push(SinkPartition {
            partition: r.try_get(0).map_err(query_error)?,
            last_offset: Some(r.try_get(1).map_err(query_error)?),
            updated_at: Some(r.try_get(2).map_err(query_error)?),
            high_watermark: None,
            lag: None,
        });
    }
    let direct = match direct {
        Some(r) => Some(DirectStatus {
            slot: args.slots.direct_slot.clone(),
            commit_lsn: r.try_get(0).map_err(query_error)?,
            updated_at: r.try_get(1).map_err(query_error)?,
            snapshot: r
                .try_get::<_, Option<String>>(2)
                .map_err(query_error)?
                .and_then(|s| serde_json::from_str(&s).ok()),
            backfills: r
                .try_get::<_, Option<String>>(3)
                .map_err(query_error)?
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default(),
        }),
        None => None,
    };
    let mut by_kind = BTreeMap::new();
    let mut last_at: Option<String> = None;
    for r in &letters {
        let kind: String = r.try_get(0).map_err(query_error)?;
        by_kind.insert(kind, r.try_get::<_, i64>(1).map_err(query_error)?);
        let at: Option<String> = r.try_get(2).map_err(query_error)?;
        // Same format and time zone on every row: text order is time order.
        if at > last_at {
            last_at = at;
        }
    }
    Ok(TargetStatus {
        url: pg::redact_url(url),
        sink,
        other_sinks,
        direct,
        dead_letters: by_kind.values().sum(),
        dead_letters_by_kind: by_kind,
        last_dead_letter_at: last_at,
    })
}

/// Puts the watermarks next to the sink's offsets: every partition of the topic gets a
/// row, with the lag `high - 1 - last` (or `high - low` when nothing is stored).
fn join_lag(report: &mut StatusReport) {
    let (Part::Reachable(kafka), Part::Reachable(target)) = (&report.kafka, &mut report.pg_end)
    else {
        return;
    };
    fill_lag(&mut target.sink, &kafka.partitions);
}

/// Puts `watermarks` next to the stored offsets `sink`: every partition gets a row,
/// with the lag `high - 1 - last` (or `high - low` when nothing is stored).
fn fill_lag(sink: &mut Vec<SinkPartition>, watermarks: &[PartitionStatus]) {
    for p in watermarks {
        let row = match sink.iter_mut().position(|s| s.partition == p.partition) {
            Some(index) => &mut sink[index],
            None => {
                sink.push(SinkPartition {
                    partition: p.partition,
                    last_offset: None,
                    updated_at: None,
                    high_watermark: None,
                    lag: None,
                });
                sink.last_mut().expect("just pushed")
            }
        };
        row.high_watermark = Some(p.high_watermark);
        row.lag = Some(match row.last_offset {
            Some(last) => (p.high_watermark - 1 - last).max(0),
            None => p.high_watermark - p.low_watermark,
        });
    }
    sink.sort_by_key(|s| s.partition);
}

/// The lag of the sink's other topics: their watermarks, then [`caught_up`] as for
/// `--topic`. Left without lag when Kafka does not answer in time.
async fn other_lag(args: &StatusArgs, report: &mut StatusReport, timeout: Duration) {
    let (Part::Reachable(_), Part::Reachable(target)) = (&report.kafka, &mut report.pg_end) else {
        return;
    };
    if target.other_sinks.is_empty() || args.no_kafka {
        return;
    }
    let (brokers, mut others) = (args.kafka.brokers.clone(), target.other_sinks.clone());
    let per_call = timeout.mul_f64(0.5);
    let read = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = kafka::client_config(&brokers)
            .create()
            .map_err(|e| error_chain(&e))?;
        for other in &mut others {
            let Ok(partitions) = kafka::topic_partitions(&consumer, &other.topic, per_call) else {
                continue; // deleted since, or no answer: its offsets stand alone
            };
            let watermarks: Vec<PartitionStatus> = partitions
                .into_iter()
                .filter_map(|partition| {
                    let (low, high) = consumer
                        .fetch_watermarks(&other.topic, partition, per_call)
                        .ok()?;
                    Some(PartitionStatus {
                        partition,
                        low_watermark: low,
                        high_watermark: high,
                    })
                })
                .collect();
            fill_lag(&mut other.partitions, &watermarks);
            settle(&brokers, &other.topic, &mut other.partitions, per_call);
        }
        Ok::<_, String>(others)
    });
    if let Ok(Ok(Ok(others))) = tokio::time::timeout(timeout * 2, read).await {
        target.other_sinks = others;
    }
}

/// Where `slot`'s relay got to, by its own progress, if it ever streamed from it: the
/// connector's progress topic, or direct mode's row in pg_end.
fn streamed_from(report: &StatusReport, slot: &SlotStatus) -> Option<String> {
    match slot.role {
        "connector" => {
            let progress = report.kafka.reachable()?.progress.as_ref()?;
            Some(match progress.state {
                ProgressState::Streaming => format!("through {}", progress.lsn),
                ProgressState::Snapshot => "its initial snapshot had begun".to_string(),
            })
        }
        "direct" => {
            let direct = report.pg_end.reachable()?.direct.as_ref()?;
            if direct.slot != slot.name {
                return None;
            }
            if direct.commit_lsn != "0/0" {
                Some(format!("through {}", direct.commit_lsn))
            } else {
                direct
                    .snapshot
                    .as_ref()
                    .map(|_| "its initial snapshot had begun".to_string())
            }
        }
        _ => None,
    }
}

/// Fills `ok`, `problems` and `warnings`.
fn judge(args: &StatusArgs, report: &mut StatusReport) {
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    for (name, error) in [
        ("pg_start", unreachable(&report.pg_start)),
        ("kafka", unreachable(&report.kafka)),
        ("pg_end", unreachable(&report.pg_end)),
    ] {
        if let Some(error) = error {
            problems.push(format!("{name} unreachable: {error}"));
        }
    }
    if let Some(source) = report.pg_start.reachable() {
        for slot in &source.slots {
            if !slot.exists {
                // A slot its relay has streamed from (its progress says so) is lost: the
                // relay refuses to start, since a new slot would skip what was written
                // since (a drop, or a promotion that did not keep it).
                if let Some(through) = streamed_from(report, slot) {
                    let relay = if slot.role == "direct" {
                        "direct mode"
                    } else {
                        "the connector"
                    };
                    problems.push(format!(
                        "slot {} is missing on pg_start, but {relay}'s progress says it streamed \
                         from it ({through}): it was dropped, or lost at a promotion (not a \
                         failover slot), and {relay} refuses to start; recover with a new slot \
                         and `outbox-relay reconcile` (docs/operations.md, \"Slot lost or \
                         invalidated\")",
                        slot.name
                    ));
                }
                continue;
            }
            if let Some(cause) = source::invalidation(
                slot.wal_status.as_deref(),
                slot.invalidation_reason.as_deref(),
            ) {
                problems.push(format!(
                    "slot {} is invalidated: {cause}; recover with a new slot and \
                     `outbox-relay reconcile` (docs/operations.md, \"Slot lost or invalidated\")",
                    slot.name
                ));
            } else if slot.wal_status.as_deref() == Some("unreserved") {
                warnings.push(format!(
                    "slot {} is about to be lost (wal_status = unreserved): its consumer must \
                     catch up now",
                    slot.name
                ));
            }
            if !slot.active {
                warnings.push(format!(
                    "slot {} has no walsender: is the {} running?",
                    slot.name, slot.role
                ));
            }
        }
        for physical in &source.waiting_for_standby_slots {
            warnings.push(format!(
                "synchronized_standby_slots names the physical slot {physical}, which no \
                 standby holds: pg_start holds back the outbox's changes from the relays \
                 until its standby reconnects, or the setting drops it (the relays stall \
                 meanwhile, and their slots' lag grows)"
            ));
        }
        if source.slots.iter().all(|s| !s.exists) {
            warnings.push(format!(
                "neither slot {} nor {} exists on pg_start",
                args.slots.slot, args.slots.direct_slot
            ));
        }
    }
    if let Some(kafka) = report.kafka.reachable() {
        // A --topic that does not exist says nothing where the sink reads other topics
        // (a routed deployment, whose --topic is the unused default).
        let sink_reads_others = report.pg_end.reachable().is_some_and(|t| {
            t.sink.iter().all(|p| p.last_offset.is_none()) && !t.other_sinks.is_empty()
        });
        if let Some(error) = &kafka.topic_error {
            if !(sink_reads_others && kafka.partitions.is_empty()) {
                warnings.push(format!("topic {}: {error}", kafka.topic));
            }
        }
        if let Some(error) = &kafka.progress_error {
            warnings.push(format!("progress topic {}: {error}", kafka.progress_topic));
        }
        if let Some(n @ 1..) = kafka.dead_letters {
            warnings.push(format!(
                "{n} dead letters in Kafka topic {} (last: {})",
                kafka.dead_letter_topic,
                kafka.last_dead_letter.as_deref().unwrap_or("?")
            ));
        }
    }
    if let Some(target) = report.pg_end.reachable() {
        if target.dead_letters > 0 {
            warnings.push(format!(
                "{} dead letters in pg_end's outbox_relay.dead_letters (last at {})",
                target.dead_letters,
                target.last_dead_letter_at.as_deref().unwrap_or("?")
            ));
        }
    }
    report.ok = problems.is_empty();
    report.problems = problems;
    report.warnings = warnings;
}

fn unreachable<T>(part: &Part<T>) -> Option<&str> {
    match part {
        Part::Unreachable { error } => Some(error),
        _ => None,
    }
}

/// `1234` → `1.2 KiB`.
fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

impl StatusReport {
    /// The human-readable form: one screen. A part that is skipped prints nothing,
    /// except Kafka, which says it was skipped on purpose.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "outbox-relay status: {}", self.verdict());
        render_source(&mut out, &self.pg_start);
        render_kafka(&mut out, &self.kafka);
        render_target(&mut out, &self.pg_end);
        for p in &self.problems {
            let _ = writeln!(out, "PROBLEM: {p}");
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {w}");
        }
        out.truncate(out.trim_end().len());
        out
    }

    /// The headline's word: a problem wins over a warning.
    fn verdict(&self) -> &'static str {
        if !self.ok {
            "UNHEALTHY"
        } else if self.warnings.is_empty() {
            "OK"
        } else {
            "OK, with warnings"
        }
    }
}

/// pg_start's section: the server, then one line per slot (absent slots say so).
fn render_source(out: &mut String, part: &Part<SourceStatus>) {
    match part {
        Part::Reachable(s) => {
            let _ = writeln!(
                out,
                "pg_start  {}  PostgreSQL {}, WAL at {}",
                s.url, s.server_version, s.current_wal_lsn
            );
            for slot in &s.slots {
                let _ = writeln!(out, "{}", slot_line(slot));
            }
        }
        Part::Unreachable { error } => {
            let _ = writeln!(out, "pg_start  unreachable: {error}");
        }
        Part::Skipped => {}
    }
}

/// One slot's line (no newline); `-` for what PostgreSQL did not report.
fn slot_line(slot: &SlotStatus) -> String {
    if !slot.exists {
        return format!("  slot {:<24} ({}) absent", slot.name, slot.role);
    }
    format!(
        "  slot {:<24} ({}) {}  confirmed {}  lag {}  wal_status {}{}{}{}",
        slot.name,
        slot.role,
        match slot.active_pid {
            Some(pid) => format!("active pid {pid}"),
            None => "inactive".into(),
        },
        slot.confirmed_flush_lsn.as_deref().unwrap_or("-"),
        slot.lag_bytes.map(bytes).unwrap_or_else(|| "-".into()),
        slot.wal_status.as_deref().unwrap_or("-"),
        slot.invalidation_reason
            .as_deref()
            .map(|r| format!("  invalidated {r}"))
            .unwrap_or_default(),
        slot.safe_wal_size
            .map(|s| format!("  safe_wal_size {}", bytes(s)))
            .unwrap_or_default(),
        if slot.standbys.is_empty() {
            String::new()
        } else {
            format!("  standby {}", slot.standbys.join(", "))
        }
    )
}

/// Kafka's section: the topic (or why it could not be read), then the connector's
/// progress record.
fn render_kafka(out: &mut String, part: &Part<KafkaStatus>) {
    match part {
        Part::Reachable(k) => {
            let total: i64 = k
                .partitions
                .iter()
                .map(|p| p.high_watermark - p.low_watermark)
                .sum();
            let _ = match &k.topic_error {
                Some(error) => {
                    writeln!(out, "kafka     {}  topic {}: {error}", k.brokers, k.topic)
                }
                None => writeln!(
                    out,
                    "kafka     {}  topic {}: {} partitions, {} offsets in the log",
                    k.brokers,
                    k.topic,
                    k.partitions.len(),
                    total
                ),
            };
            let _ = writeln!(
                out,
                "  progress topic {}: connector LSN in Kafka {}",
                k.progress_topic,
                progress_text(k)
            );
            if let Some(p) = &k.progress {
                for line in BackfillProgress::describe_all(&p.backfills) {
                    let _ = writeln!(out, "    {line}");
                }
            }
            let _ = writeln!(
                out,
                "  dead-letter topic {}: {}",
                k.dead_letter_topic,
                match k.dead_letters {
                    Some(n) => format!("{n} dead letters"),
                    None => "absent".into(),
                }
            );
        }
        Part::Unreachable { error } => {
            let _ = writeln!(out, "kafka     unreachable: {error}");
        }
        Part::Skipped => {
            let _ = writeln!(out, "kafka     skipped (--no-kafka)");
        }
    }
}

/// The connector's progress as one phrase: its LSN and state, why it could not be
/// read, or `none`.
fn progress_text(k: &KafkaStatus) -> String {
    match (&k.progress, &k.progress_error) {
        (Some(p), _) => format!(
            "{} ({})",
            p.lsn,
            match (p.state, &p.snapshot) {
                (ProgressState::Snapshot, Some(s)) => s.describe(),
                (ProgressState::Snapshot, None) => "snapshot".into(),
                (ProgressState::Streaming, _) => "streaming".into(),
            }
        ),
        (None, Some(error)) => format!("unreadable: {error}"),
        (None, None) => "none".into(),
    }
}

/// pg_end's section: the sink's offsets as a table, the direct mode's progress, and
/// the dead letters.
fn render_target(out: &mut String, part: &Part<TargetStatus>) {
    match part {
        Part::Reachable(t) => {
            let _ = writeln!(out, "pg_end    {}", t.url);
            // A routed deployment's sink reads other topics only: no empty table for
            // --topic then.
            if !t.sink.is_empty() || t.other_sinks.is_empty() {
                render_sink_table(out, &t.sink);
            }
            for other in &t.other_sinks {
                let _ = writeln!(out, "  sink on topic {}:", other.topic);
                render_sink_table(out, &other.partitions);
            }
            let _ = match &t.direct {
                Some(d) => match &d.snapshot {
                    Some(snapshot) if d.commit_lsn == "0/0" => writeln!(
                        out,
                        "  direct: slot {} in its {} (at {})",
                        d.slot,
                        snapshot.describe(),
                        d.updated_at
                    ),
                    _ => writeln!(
                        out,
                        "  direct: slot {} applied through {} (at {})",
                        d.slot, d.commit_lsn, d.updated_at
                    ),
                },
                None => writeln!(out, "  direct: no progress stored"),
            };
            if let Some(d) = &t.direct {
                for line in BackfillProgress::describe_all(&d.backfills) {
                    let _ = writeln!(out, "    {line}");
                }
            }
            let _ = writeln!(out, "{}", dead_letters_line(t));
        }
        Part::Unreachable { error } => {
            let _ = writeln!(out, "pg_end    unreachable: {error}");
        }
        Part::Skipped => {}
    }
}

/// The sink's offsets, one right-aligned row per partition, `-` where unknown.
fn render_sink_table(out: &mut String, sink: &[SinkPartition]) {
    if sink.is_empty() {
        let _ = writeln!(out, "  sink: no stored offsets for this topic");
        return;
    }
    let _ = writeln!(
        out,
        "  {:>9}  {:>12}  {:>14}  {:>10}",
        "partition", "sink offset", "high watermark", "lag"
    );
    let cell = |n: Option<i64>| n.map_or_else(|| "-".to_string(), |n| n.to_string());
    for s in sink {
        let _ = writeln!(
            out,
            "  {:>9}  {:>12}  {:>14}  {:>10}",
            s.partition,
            cell(s.last_offset),
            cell(s.high_watermark),
            cell(s.lag)
        );
    }
}

/// The dead letters' line (no newline): the total, then the count per kind.
fn dead_letters_line(t: &TargetStatus) -> String {
    let kinds: Vec<String> = t
        .dead_letters_by_kind
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    format!(
        "  dead letters: {}{}",
        t.dead_letters,
        if kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", kinds.join(", "))
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_human() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }

    fn report(kafka: Part<KafkaStatus>, sink: Vec<SinkPartition>) -> StatusReport {
        StatusReport {
            ok: true,
            problems: vec![],
            warnings: vec![],
            pg_start: Part::Unreachable {
                error: "connection refused".into(),
            },
            kafka,
            pg_end: Part::Reachable(TargetStatus {
                url: "postgres://postgres@127.0.0.1:8001/db_end".into(),
                sink,
                other_sinks: vec![],
                direct: None,
                dead_letters: 0,
                dead_letters_by_kind: BTreeMap::new(),
                last_dead_letter_at: None,
            }),
        }
    }

    fn slot(name: &str, role: &'static str, exists: bool, active_pid: Option<i32>) -> SlotStatus {
        SlotStatus {
            name: name.into(),
            role,
            exists,
            database: exists.then(|| "db_start".into()),
            plugin: exists.then(|| "pgoutput".into()),
            active: active_pid.is_some(),
            active_pid,
            confirmed_flush_lsn: exists.then(|| "0/1A2B3C4".into()),
            lag_bytes: exists.then_some(1536),
            wal_status: exists.then(|| "reserved".into()),
            invalidation_reason: None,
            safe_wal_size: active_pid.map(|_| 3 << 30),
            standbys: Vec::new(),
        }
    }

    fn kafka_part(topic_error: Option<&str>, progress: Option<ProgressState>) -> KafkaStatus {
        KafkaStatus {
            brokers: "127.0.0.1:19090".into(),
            topic: "outbox.transactions".into(),
            partitions: if topic_error.is_some() {
                vec![]
            } else {
                vec![
                    PartitionStatus {
                        partition: 0,
                        low_watermark: 3,
                        high_watermark: 120,
                    },
                    PartitionStatus {
                        partition: 1,
                        low_watermark: 0,
                        high_watermark: 98,
                    },
                ]
            },
            topic_error: topic_error.map(Into::into),
            progress_topic: "outbox-relay-progress".into(),
            progress: progress.map(|state| ProgressStatus {
                state,
                lsn: "0/1A2B000".into(),
                snapshot: None,
                backfills: Vec::new(),
            }),
            progress_error: topic_error.map(|_| "timed out".into()),
            dead_letter_topic: "outbox-relay-dead-letters".into(),
            dead_letters: Some(0),
            last_dead_letter: None,
        }
    }

    fn target_part(rich: bool) -> TargetStatus {
        let sink = |partition, last_offset: Option<i64>, high: Option<i64>| SinkPartition {
            partition,
            last_offset,
            updated_at: None,
            high_watermark: high,
            lag: high.map(|h| h - 1 - last_offset.unwrap_or(-1)),
        };
        TargetStatus {
            url: "postgres://postgres@127.0.0.1:8001/db_end".into(),
            sink: if rich {
                vec![
                    sink(0, Some(118), Some(120)),
                    sink(1, None, Some(98)),
                    sink(2, Some(7), None),
                ]
            } else {
                vec![]
            },
            other_sinks: if rich {
                vec![]
            } else {
                vec![SinkTopic {
                    topic: "outbox.event.order".into(),
                    partitions: vec![sink(0, Some(41), Some(42)), sink(1, Some(9), Some(12))],
                }]
            },
            direct: rich.then(|| DirectStatus {
                slot: "outbox_relay_direct".into(),
                commit_lsn: "0/1A2B3C4".into(),
                updated_at: "2026-12-01 10:00:00+00".into(),
                snapshot: None,
                backfills: vec![BackfillProgress {
                    id: "restore-1".into(),
                    table: "outbox.transactions".into(),
                    filter: Some("id > 0".into()),
                    state: crate::progress::BackfillState::Running,
                    next_page: 3,
                    rows: 42,
                    error: None,
                }],
            }),
            dead_letters: if rich { 3 } else { 0 },
            dead_letters_by_kind: if rich {
                [("decode".to_string(), 1), ("invalid".to_string(), 2)].into()
            } else {
                BTreeMap::new()
            },
            last_dead_letter_at: None,
        }
    }

    #[test]
    fn an_invalidated_slot_is_a_problem_that_names_its_cause() {
        let mut lost = slot("outbox_relay", "connector", true, None);
        lost.wal_status = Some("lost".into());
        lost.invalidation_reason = Some("idle_timeout".into());
        let mut unreserved = slot("outbox_relay_direct", "direct", true, Some(7));
        unreserved.wal_status = Some("unreserved".into());
        let mut r = report(Part::Skipped, vec![]);
        r.pg_start = Part::Reachable(SourceStatus {
            url: "u".into(),
            server_version: "18.1".into(),
            current_wal_lsn: "0/1".into(),
            slots: vec![lost, unreserved],
            waiting_for_standby_slots: Vec::new(),
        });
        judge(&StatusArgs::new("a", "b", "c", "t"), &mut r);
        assert!(!r.ok);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(
            r.problems[0].starts_with("slot outbox_relay is invalidated: it stayed inactive")
                && r.problems[0].contains("idle_replication_slot_timeout"),
            "{}",
            r.problems[0]
        );
        assert!(
            r.warnings
                .iter()
                .any(|w| w.starts_with("slot outbox_relay_direct is about to be lost")),
            "{:?}",
            r.warnings
        );
        assert!(r
            .render()
            .contains("wal_status lost  invalidated idle_timeout"));
    }

    #[test]
    fn a_missing_slot_its_relay_streamed_from_is_a_problem() {
        let absent = || {
            Part::Reachable(SourceStatus {
                url: "u".into(),
                server_version: "17.2".into(),
                current_wal_lsn: "0/1".into(),
                slots: vec![
                    slot("outbox_relay", "connector", false, None),
                    slot("outbox_relay_direct", "direct", false, None),
                ],
                waiting_for_standby_slots: Vec::new(),
            })
        };
        // Neither relay has progress: a deployment not started yet (a warning only).
        let mut r = report(Part::Reachable(kafka_part(None, None)), vec![]);
        r.pg_start = absent();
        judge(&StatusArgs::new("a", "b", "c", "t"), &mut r);
        assert!(r.ok, "{:?}", r.problems);
        // The connector's progress topic and direct mode's row say they streamed.
        let mut r = report(
            Part::Reachable(kafka_part(None, Some(ProgressState::Streaming))),
            vec![],
        );
        r.pg_start = absent();
        if let Part::Reachable(target) = &mut r.pg_end {
            target.direct = Some(DirectStatus {
                slot: "outbox_relay_direct".into(),
                commit_lsn: "0/C3AD190".into(),
                updated_at: "now".into(),
                snapshot: None,
                backfills: Vec::new(),
            });
        }
        judge(&StatusArgs::new("a", "b", "c", "t"), &mut r);
        assert!(!r.ok);
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
        assert!(
            r.problems[0].starts_with(
                "slot outbox_relay is missing on pg_start, but the connector's progress says \
                 it streamed from it (through 0/1A2B000)"
            ),
            "{}",
            r.problems[0]
        );
        assert!(
            r.problems[1].starts_with("slot outbox_relay_direct is missing on pg_start")
                && r.problems[1].contains("through 0/C3AD190")
                && r.problems[1].contains("reconcile"),
            "{}",
            r.problems[1]
        );
    }

    /// Reports that between them take every branch of `render`.
    fn every_branch() -> Vec<StatusReport> {
        let report = |ok, warnings: Vec<&str>, pg_start, kafka, pg_end| StatusReport {
            ok,
            problems: if ok {
                vec![]
            } else {
                vec!["pg_end unreachable: refused".into()]
            },
            warnings: warnings.into_iter().map(Into::into).collect(),
            pg_start,
            kafka,
            pg_end,
        };
        let source = |slots| {
            Part::Reachable(SourceStatus {
                url: "postgres://postgres@127.0.0.1:8000/db_start".into(),
                server_version: "17.2".into(),
                current_wal_lsn: "0/1A2B3C4".into(),
                slots,
                waiting_for_standby_slots: Vec::new(),
            })
        };
        vec![
            report(
                true,
                vec![],
                source(vec![
                    slot("outbox_relay", "connector", true, Some(4242)),
                    slot("outbox_relay_direct", "direct", false, None),
                ]),
                Part::Reachable(kafka_part(None, Some(ProgressState::Streaming))),
                Part::Reachable(target_part(true)),
            ),
            report(
                true,
                vec!["3 dead letters", "slot x has no walsender"],
                source(vec![slot("outbox_relay", "connector", true, None)]),
                Part::Reachable(kafka_part(Some("does not exist"), None)),
                Part::Reachable(target_part(false)),
            ),
            report(
                true,
                vec![],
                source(vec![]),
                Part::Reachable(kafka_part(None, Some(ProgressState::Snapshot))),
                Part::Skipped,
            ),
            report(
                false,
                vec!["w"],
                Part::Skipped,
                Part::Unreachable {
                    error: "no broker answered".into(),
                },
                Part::Unreachable {
                    error: "refused".into(),
                },
            ),
            report(false, vec![], Part::Skipped, Part::Skipped, Part::Skipped),
        ]
    }

    /// The text of [`every_branch`], as the one-function `render` wrote it before it
    /// was split into sections.
    const EVERY_BRANCH: &str = r#"outbox-relay status: OK
pg_start  postgres://postgres@127.0.0.1:8000/db_start  PostgreSQL 17.2, WAL at 0/1A2B3C4
  slot outbox_relay             (connector) active pid 4242  confirmed 0/1A2B3C4  lag 1.5 KiB  wal_status reserved  safe_wal_size 3.0 GiB
  slot outbox_relay_direct      (direct) absent
kafka     127.0.0.1:19090  topic outbox.transactions: 2 partitions, 215 offsets in the log
  progress topic outbox-relay-progress: connector LSN in Kafka 0/1A2B000 (streaming)
  dead-letter topic outbox-relay-dead-letters: 0 dead letters
pg_end    postgres://postgres@127.0.0.1:8001/db_end
  partition   sink offset  high watermark         lag
          0           118             120           1
          1             -              98          98
          2             7               -           -
  direct: slot outbox_relay_direct applied through 0/1A2B3C4 (at 2026-12-01 10:00:00+00)
    backfill restore-1 of outbox.transactions where id > 0: running, 42 rows sent
  dead letters: 3 (decode 1, invalid 2)
=====
outbox-relay status: OK, with warnings
pg_start  postgres://postgres@127.0.0.1:8000/db_start  PostgreSQL 17.2, WAL at 0/1A2B3C4
  slot outbox_relay             (connector) inactive  confirmed 0/1A2B3C4  lag 1.5 KiB  wal_status reserved
kafka     127.0.0.1:19090  topic outbox.transactions: does not exist
  progress topic outbox-relay-progress: connector LSN in Kafka unreadable: timed out
  dead-letter topic outbox-relay-dead-letters: 0 dead letters
pg_end    postgres://postgres@127.0.0.1:8001/db_end
  sink on topic outbox.event.order:
  partition   sink offset  high watermark         lag
          0            41              42           0
          1             9              12           2
  direct: no progress stored
  dead letters: 0
warning: 3 dead letters
warning: slot x has no walsender
=====
outbox-relay status: OK
pg_start  postgres://postgres@127.0.0.1:8000/db_start  PostgreSQL 17.2, WAL at 0/1A2B3C4
kafka     127.0.0.1:19090  topic outbox.transactions: 2 partitions, 215 offsets in the log
  progress topic outbox-relay-progress: connector LSN in Kafka 0/1A2B000 (snapshot)
  dead-letter topic outbox-relay-dead-letters: 0 dead letters
=====
outbox-relay status: UNHEALTHY
kafka     unreachable: no broker answered
pg_end    unreachable: refused
PROBLEM: pg_end unreachable: refused
warning: w
=====
outbox-relay status: UNHEALTHY
kafka     skipped (--no-kafka)
PROBLEM: pg_end unreachable: refused"#;

    #[test]
    fn render_of_every_branch_is_pinned() {
        let text: Vec<String> = every_branch().iter().map(StatusReport::render).collect();
        assert_eq!(text.join("\n=====\n"), EVERY_BRANCH);
    }

    #[test]
    fn slot_line_says_absent_or_every_figure() {
        assert_eq!(
            slot_line(&slot("s", "direct", false, None)),
            "  slot s                        (direct) absent"
        );
        assert_eq!(
            slot_line(&slot("s", "connector", true, None)),
            "  slot s                        (connector) inactive  confirmed 0/1A2B3C4  \
             lag 1.5 KiB  wal_status reserved"
        );
        let mut held = slot("s", "connector", true, Some(42));
        held.standbys = vec!["77@127.0.0.1".into()];
        assert_eq!(
            slot_line(&held),
            "  slot s                        (connector) active pid 42  confirmed 0/1A2B3C4  \
             lag 1.5 KiB  wal_status reserved  safe_wal_size 3.0 GiB  standby 77@127.0.0.1"
        );
    }

    #[test]
    fn progress_text_prefers_the_record_then_the_error() {
        let mut k = kafka_part(Some("gone"), Some(ProgressState::Snapshot));
        assert_eq!(progress_text(&k), "0/1A2B000 (snapshot)");
        // While the initial snapshot's chunks are delivered: how far it got.
        if let Some(p) = &mut k.progress {
            p.snapshot = Some(crate::progress::SnapshotProgress {
                consistent_point: "0/1A2B000".into(),
                delivered: crate::progress::Delivered {
                    done: vec!["app.audit".into()],
                    table: Some("app.outbox".into()),
                    after: vec![Some("41".into())],
                },
                rows: 1041,
            });
        }
        assert_eq!(
            progress_text(&k),
            "0/1A2B000 (initial snapshot, 1041 rows delivered, in app.outbox, done: app.audit)"
        );
        k.progress = None;
        assert_eq!(progress_text(&k), "unreadable: timed out");
        k.progress_error = None;
        assert_eq!(progress_text(&k), "none");
    }

    #[test]
    fn dead_letters_line_lists_kinds_only_when_there_are_some() {
        assert_eq!(
            dead_letters_line(&target_part(true)),
            "  dead letters: 3 (decode 1, invalid 2)"
        );
        assert_eq!(dead_letters_line(&target_part(false)), "  dead letters: 0");
    }

    #[test]
    fn lag_joins_watermarks_and_offsets_and_unreachable_is_a_problem() {
        let kafka = KafkaStatus {
            brokers: "b".into(),
            topic: "t".into(),
            partitions: vec![
                PartitionStatus {
                    partition: 0,
                    low_watermark: 0,
                    high_watermark: 11,
                },
                PartitionStatus {
                    partition: 1,
                    low_watermark: 2,
                    high_watermark: 7,
                },
            ],
            topic_error: None,
            progress_topic: "p".into(),
            progress: None,
            progress_error: None,
            dead_letter_topic: "d".into(),
            dead_letters: None,
            last_dead_letter: None,
        };
        let stored = SinkPartition {
            partition: 0,
            last_offset: Some(9),
            updated_at: None,
            high_watermark: None,
            lag: None,
        };
        let mut r = report(Part::Reachable(kafka), vec![stored]);
        join_lag(&mut r);
        let args = StatusArgs::new("a", "b", "c", "t");
        judge(&args, &mut r);
        let sink = &r.pg_end.reachable().unwrap().sink;
        assert_eq!(sink.len(), 2);
        assert_eq!((sink[0].lag, sink[1].lag), (Some(1), Some(5)));
        assert!(!r.ok);
        assert!(r.problems[0].starts_with("pg_start unreachable: connection refused"));
        let text = r.render();
        assert!(
            text.contains("pg_start  unreachable: connection refused"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["pg_start"]["state"], "unreachable");
        assert_eq!(json["pg_end"]["state"], "reachable");
        assert_eq!(json["pg_end"]["sink"][1]["lag"], 5);
    }
}
