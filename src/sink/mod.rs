//! `outbox-relay sink`: applies the topic's records to pg_end so that every source
//! transaction is counted in `main.balance` exactly once.
//!
//! Invariant: the sink's progress is the Kafka offset per (topic, partition) stored in
//! pg_end's `outbox_relay.sink_offsets` by the same database transaction as the rows
//! (and dead letters) up to it ([`crate::apply`]). Nothing else is trusted: on
//! assignment a partition resumes at the stored offset + 1 ([`rebalance`]; or, once,
//! at an earlier position asked for with `--from-…`, see [`replay`]), Kafka's
//! group offsets are committed after pg_end's commit for monitoring only, and a
//! `kill -9` at any instant loses at most a batch that pg_end never committed, which
//! is read again.
//!
//! ```text
//!  Kafka (read_committed) ──recv──► decode (record.rs) ──► pending batch ──► apply ──► pg_end
//!        ▲                              │ bad input: DeadLetter ─┘   │ size or linger    (one txn:
//!        │ assign at stored+1           └ u/d/tombstone: skipped   │                    rows, dead
//!        └── rebalance.rs ◄── sink_offsets ◄─────────────────────────┘                    letters,
//!                                                                                         offsets)
//! ```
//!
//! # Pipelining
//! A batch is applied by a task of its own while the loop goes on consuming and
//! decoding the next one: at most one batch in flight and one pending (the loop stops
//! polling when the pending one is full), applied one after the other in the order
//! they were consumed. A batch is applied when it is full, when nothing is being
//! applied and no record waits in the consumer (a quiet topic's records do not wait
//! out a window), or at the latest `--batch-linger-ms` after its first record; under a
//! backlog, batches fill while the one before is applied. Records already fetched are
//! drained in one go, not one `select!` per record. Kafka's group offsets are
//! committed, at most once a second, after pg_end has committed
//! the batch. A revoked partition's records are dropped from the pending batch; the
//! batch in flight may still apply them, which is harmless (see below).
//!
//! # Progress tracking
//! A batch's progress is the highest offset consumed in each partition, whether the
//! record there was applied, skipped (a Debezium update, a tombstone) or
//! dead-lettered: every offset up to it is accounted for in pg_end. The stored offset
//! only moves forward (`WHERE excluded.last_offset > last_offset`), so a batch applied
//! late by a sink that has since lost the partition cannot move it back; and it cannot
//! double-count, because rows are inserted by id with `ON CONFLICT DO NOTHING` and only
//! inserted rows reach the balances.
//!
//! # Outages
//! - pg_end down or restarting: the same batch is retried with capped backoff; the
//!   consumer's position stays in memory and nothing advances.
//! - brokers down or the coordinator moving: librdkafka reconnects and rejoins by
//!   itself; the loop logs its errors and keeps polling.
//! - a rebalance: buffered records of revoked partitions are dropped (the new owner
//!   reads them from pg_end's offsets).
//! - SIGTERM/SIGINT: polling stops, the buffered batch gets one attempt (abandoned if
//!   pg_end does not take it), the consumer leaves the group, exit 0.
//!
//! A definite error from pg_end on the bookkeeping statements (the schema is missing)
//! stops the sink with an error: it needs a person, and retrying changes nothing.

pub mod rebalance;
pub mod replay;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, MessageStream, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;
use tokio::sync::watch;

use crate::apply::driver::{self, Driver, Ended, Failure};
use crate::apply::table::{BindError, Event, TableTarget};
use crate::apply::{
    self, ApplyBatch, ApplyError, DeadLetter, KafkaOffset, Origin, Progress, TxnRecord,
};
use crate::config::{self, KafkaArgs, TargetArgs};
use crate::inbox::{self, Extracted, InboxKind, InboxSpec, Inboxes, RecordView};
use crate::pg;
use crate::record::decode::{Decoded, Detected, Format};
use crate::record::{self, HEADER_COMMIT_TS, HEADER_LSN};
use crate::retry;
use crate::telemetry;
use rebalance::{OffsetReader, ReadFailure, RebalanceEvent, SinkContext};

/// How often a summary line is logged while records flow.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Options of `outbox-relay sink`.
#[derive(clap::Args, Debug, Clone)]
pub struct SinkArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Kafka consumer group: the sinks of one group share the topic's partitions.
    #[arg(long, env = "OUTBOX_RELAY_SINK_GROUP", default_value = config::DEFAULT_SINK_GROUP)]
    pub group: String,
    /// Apply a batch once it holds this many records.
    #[arg(long, env = "OUTBOX_RELAY_SINK_BATCH_SIZE", default_value_t = 5000)]
    pub batch_size: usize,
    /// Apply a batch at the latest this many milliseconds after its first record (it
    /// is applied sooner when full, or when nothing is being applied and no record waits).
    #[arg(long, env = "OUTBOX_RELAY_SINK_BATCH_LINGER_MS", default_value_t = 20)]
    pub batch_linger_ms: u64,
    /// An inbox, as an inline TOML table: `{table = "inbox.events", topics =
    /// ["outbox.event.order"], handler = "…"}` (see docs/sink.md, "Inboxes").
    /// Repeatable; `[[inbox]]` tables in the configuration file. Without any, the
    /// ledger profile on --topic with --format.
    #[arg(long = "inbox", value_parser = InboxSpec::parse)]
    pub inboxes: Vec<InboxSpec>,
    /// Record format: detected per record (auto), or one forced.
    #[arg(
        long,
        env = "OUTBOX_RELAY_SINK_FORMAT",
        value_enum,
        default_value = "auto"
    )]
    pub format: Format,
    /// Extra librdkafka consumer property (KEY=VALUE), repeatable; overrides the
    /// sink's defaults except the ones correctness rests on (isolation level, auto
    /// commit and offset store, which cannot be overridden).
    #[arg(long = "consumer-property", value_name = "KEY=VALUE")]
    pub consumer_properties: Vec<String>,
    /// Start from an earlier position than pg_end's stored offsets (see [`replay`]).
    #[command(flatten)]
    pub replay: replay::ReplayArgs,
    #[command(flatten)]
    pub metrics: crate::metrics::MetricsArgs,
}

impl SinkArgs {
    /// Options for a sink of `group` on `topic`, reading from `brokers`, writing to
    /// `target_url`, with the defaults of the command line.
    pub fn new(target_url: &str, brokers: &str, topic: &str, group: &str) -> Self {
        Self {
            target: TargetArgs {
                target_url: target_url.to_string(),
            },
            kafka: KafkaArgs::new(brokers, topic),
            group: group.to_string(),
            batch_size: 5000,
            batch_linger_ms: 20,
            format: Format::Auto,
            inboxes: Vec::new(),
            consumer_properties: Vec::new(),
            replay: replay::ReplayArgs::default(),
            // Embedded sinks (tests, the chaos runner) serve no endpoint of their own.
            metrics: crate::metrics::MetricsArgs {
                metrics_addr: Some("off".into()),
            },
        }
    }
}

#[derive(Debug, Error)]
pub enum SinkError {
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("the Kafka consumer failed (creation, subscription, or a fatal error)")]
    Consumer(#[source] KafkaError),
    #[error("cannot start the offset reader thread")]
    Thread(#[source] std::io::Error),
    #[error("pg_end refused the sink's work; it needs a person")]
    Definite(#[source] ApplyError),
    #[error("the applier task failed: {0}")]
    Applier(String),
    #[error("cannot find where to replay from")]
    Replay(#[source] Box<replay::ReplayError>),
    #[error("an inbox cannot be used")]
    Inbox(#[source] Box<BindError>),
}

/// What a sink run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SinkStats {
    /// Records consumed from Kafka (all of them, whatever became of them).
    pub consumed: u64,
    /// Rows newly inserted into pg_end (and counted in the balances).
    pub inserted: u64,
    /// Records whose transaction pg_end already had, identical.
    pub duplicates: u64,
    /// Dead letters (bad input and conflicts).
    pub dead_letters: u64,
    /// Of those, conflicts: an id already applied with other content.
    pub conflicts: u64,
    /// Records skipped on purpose: Debezium updates/deletes/truncates/messages, tombstones.
    pub skipped: u64,
    pub connector_records: u64,
    pub seed_records: u64,
    pub debezium_records: u64,
    /// Records of generic inboxes (tables with handlers) turned into events.
    pub inbox_events: u64,
    /// Batches committed to pg_end.
    pub batches: u64,
    /// Apply attempts that failed transiently and were retried.
    pub retries: u64,
    /// Buffered records dropped because their partition was revoked.
    pub dropped_on_revoke: u64,
}

impl SinkStats {
    /// Adds the counts an applier task kept for its batch.
    fn add_applied(&mut self, applied: &SinkStats) {
        self.batches += applied.batches;
        self.inserted += applied.inserted;
        self.duplicates += applied.duplicates;
        self.conflicts += applied.conflicts;
        self.dead_letters += applied.dead_letters;
        self.retries += applied.retries;
    }
}

/// The records consumed and not yet applied.
#[derive(Default)]
struct Pending {
    records: Vec<(TxnRecord, Origin)>,
    events: Vec<Event>,
    dead_letters: Vec<DeadLetter>,
    /// The highest offset consumed per partition.
    last_offsets: BTreeMap<(String, i32), i64>,
    /// Records consumed into this batch (applied, dead-lettered or skipped).
    consumed: usize,
    /// When the first record of this batch arrived.
    since: Option<tokio::time::Instant>,
    /// Source commit times (the connector's header) of the batch's records, for the
    /// end-to-end latency.
    commit_times: Vec<i64>,
    /// The records that carried a trace context, when tracing is on.
    traced: Vec<telemetry::Traced>,
    /// The topic name the batch's origins share.
    topic: Option<Arc<str>>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.consumed == 0
    }

    /// Forgets everything of `partitions`.
    fn drop_partitions(&mut self, partitions: &[(String, i32)]) -> u64 {
        let revoked = |topic: &str, partition: i32| {
            partitions
                .iter()
                .any(|(t, p)| t == topic && *p == partition)
        };
        let of = |origin: &Origin| {
            origin
                .topic
                .as_deref()
                .zip(origin.partition)
                .is_some_and(|(topic, partition)| revoked(topic, partition))
        };
        let before = self.records.len() + self.events.len() + self.dead_letters.len();
        self.records.retain(|(_, origin)| !of(origin));
        self.events.retain(|event| !of(&event.origin));
        self.dead_letters.retain(|letter| !of(&letter.origin));
        self.traced
            .retain(|traced| !revoked(&traced.topic, traced.partition));
        let dropped = before - self.records.len() - self.events.len() - self.dead_letters.len();
        for partition in partitions {
            self.last_offsets.remove(partition);
        }
        if self.last_offsets.is_empty() {
            *self = Pending::default();
        }
        dropped as u64
    }

    fn take_batch(&mut self, tables: &Arc<[TableTarget]>) -> ApplyBatch {
        let pending = std::mem::take(self);
        ApplyBatch {
            records: pending.records,
            events: pending.events,
            tables: tables.clone(),
            dead_letters: pending.dead_letters,
            progress: Progress::KafkaOffsets(
                pending
                    .last_offsets
                    .into_iter()
                    .map(|((topic, partition), last_offset)| KafkaOffset {
                        topic,
                        partition,
                        last_offset,
                    })
                    .collect(),
            ),
            dead_letters_apart: false,
        }
    }
}

/// Runs the sink until `stop` turns true (the binary's SIGTERM/SIGINT; a sender that
/// is gone counts as a stop) or a definite error: set-up, the poll loop, shutdown.
pub async fn run(args: SinkArgs, stop: watch::Receiver<bool>) -> Result<SinkStats, SinkError> {
    if args.batch_size == 0 {
        return Err(SinkError::InvalidOption(
            "--batch-size must be at least 1".into(),
        ));
    }
    // Served first: /healthz answers (and /readyz says not ready) while the sink
    // waits for pg_end below.
    args.metrics
        .start(crate::metrics::SINK_METRICS)
        .await
        .map_err(SinkError::InvalidOption)?;
    let flag = StopFlag::follow(stop.clone());
    let Some(inboxes) = bind_inboxes(&args, &flag).await? else {
        return Ok(SinkStats::default());
    };
    match rebalance::probe(&args.target.target_url, &flag.flag).await {
        Ok(()) => {}
        Err(ReadFailure::Stopped) => return Ok(SinkStats::default()),
        Err(ReadFailure::Definite(error)) => return Err(SinkError::Definite(error)),
    }
    let consumer = set_up(&args, &inboxes, flag.shared()).await?;
    let mut sink = SinkLoop::new(&args, &consumer, inboxes, flag.shared());
    let result = sink.poll(stop).await;
    let (result, stats) = sink.shut_down(result).await;
    // Whatever still waits (the offset reader) ends now.
    flag.raise();
    drop(flag);
    drop(consumer);
    tracing::info!(
        consumed = stats.consumed,
        inserted = stats.inserted,
        duplicates = stats.duplicates,
        dead_letters = stats.dead_letters,
        skipped = stats.skipped,
        "sink stopped"
    );
    result.map(|()| stats)
}

/// The caller's stop as a flag that the applier task and the offset reader's thread
/// read without awaiting (the reader blocks inside librdkafka's rebalance callback).
struct StopFlag {
    flag: Arc<AtomicBool>,
    /// Raises the flag when the caller's stop turns true; aborted on drop.
    watcher: tokio::task::JoinHandle<()>,
}

impl StopFlag {
    fn follow(mut stop: watch::Receiver<bool>) -> Self {
        let flag = Arc::new(AtomicBool::new(false));
        let watcher = {
            let flag = flag.clone();
            tokio::spawn(async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
                flag.store(true, Ordering::Relaxed);
            })
        };
        Self { flag, watcher }
    }

    fn shared(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    fn raise(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }
}

impl Drop for StopFlag {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// The inboxes, checked against pg_end (waiting for it while it is unreachable);
/// `None` if the sink is stopped first. Without `--inbox`: the ledger on --topic.
async fn bind_inboxes(args: &SinkArgs, stop: &StopFlag) -> Result<Option<Inboxes>, SinkError> {
    if args.inboxes.is_empty() {
        return Ok(Some(Inboxes::ledger(&args.kafka.topic, args.format)));
    }
    Inboxes::bind_when_reachable(
        &args.inboxes,
        &args.target.target_url,
        &args.kafka.topic,
        args.format,
        &|| stop.flag.load(Ordering::Relaxed),
    )
    .await
    .map_err(|e| SinkError::Inbox(Box::new(e)))
}

/// Set-up: the replay position, the offset reader and the subscribed consumer.
async fn set_up(
    args: &SinkArgs,
    inboxes: &Inboxes,
    stop: Arc<AtomicBool>,
) -> Result<StreamConsumer<SinkContext>, SinkError> {
    let topics = inboxes.subscription();
    let replay = replay::resolve(&args.replay, &args.kafka.brokers, &topics)
        .await
        .map_err(|e| SinkError::Replay(Box::new(e)))?;
    let reader =
        OffsetReader::spawn(args.target.target_url.clone(), stop).map_err(SinkError::Thread)?;
    let consumer = consumer(args, SinkContext::new(reader).with_replay(replay))?;
    let subscription: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&subscription)
        .map_err(SinkError::Consumer)?;
    tracing::info!(
        topics = ?topics,
        group = %args.group,
        target = %pg::redact_url(&args.target.target_url),
        batch_size = args.batch_size,
        "sink started"
    );
    Ok(consumer)
}

/// The poll loop and what it keeps between polls: the batch being filled, the one in
/// flight, the counts.
struct SinkLoop<'a> {
    args: &'a SinkArgs,
    consumer: &'a StreamConsumer<SinkContext>,
    inboxes: Inboxes,
    stop: Arc<AtomicBool>,
    linger: Duration,
    pending: Pending,
    stats: SinkStats,
    /// pg_end's connection: in the applier task while a batch is in flight, here
    /// otherwise.
    writer: Option<Driver>,
    in_flight: Option<InFlight>,
    group_offsets: GroupOffsets,
    report: Report,
    /// Consumer errors in a row: the loop slows down when they repeat.
    kafka_errors: u64,
    /// Whether the last poll found no record waiting.
    caught_up: bool,
}

impl<'a> SinkLoop<'a> {
    fn new(
        args: &'a SinkArgs,
        consumer: &'a StreamConsumer<SinkContext>,
        inboxes: Inboxes,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Self {
            args,
            consumer,
            inboxes,
            stop,
            linger: Duration::from_millis(args.batch_linger_ms),
            pending: Pending::default(),
            stats: SinkStats::default(),
            writer: Some(Driver::new(args.target.target_url.clone())),
            in_flight: None,
            group_offsets: GroupOffsets::new(),
            report: Report::new(),
            kafka_errors: 0,
            caught_up: false,
        }
    }

    /// Consumes, batches and hands batches to the applier until a stop or an error.
    async fn poll(&mut self, mut stop: watch::Receiver<bool>) -> Result<(), SinkError> {
        let consumer = self.consumer;
        let mut messages = consumer.stream();
        loop {
            let full = self.pending.consumed >= self.args.batch_size;
            let deadline = self.pending.since.map(|since| since + self.linger);
            let group_due = self.group_offsets.due();
            tokio::select! {
                biased;
                _ = stop.wait_for(|stopped| *stopped) => {
                    // Before the last batch's one attempt: it must not wait out an outage.
                    self.stop.store(true, Ordering::Relaxed);
                    return Ok(());
                }
                done = wait_applied(&mut self.in_flight), if self.in_flight.is_some() => {
                    self.in_flight = None;
                    let committed = finish_batch(
                        done,
                        consumer,
                        &mut self.group_offsets,
                        &mut self.writer,
                        &mut self.stats,
                    )?;
                    if !committed {
                        return Ok(()); // stopping; the batch was abandoned
                    }
                }
                _ = retry::sleep_until(deadline), if deadline.is_some() && !full => {}
                // The last batch's offsets when no further batch comes to carry them.
                _ = retry::sleep_until(group_due), if group_due.is_some() => {
                    self.group_offsets.commit(consumer);
                }
                received = messages.next(), if !full => {
                    self.receive(received, &mut messages).await?;
                }
                // A change of assignment or a definite error in a rebalance callback
                // (on_rebalance below takes them).
                _ = consumer.context().changed() => {}
            }
            on_rebalance(
                consumer,
                &mut self.pending,
                &mut self.group_offsets,
                &mut self.stats,
            )?;
            self.maybe_apply();
            self.report.maybe_log(&self.stats);
        }
    }

    /// Decodes a received record, then what librdkafka has already fetched, without
    /// going back through the select: one wake-up and one timer per burst, not per
    /// record.
    async fn receive(
        &mut self,
        first: Option<KafkaResult<BorrowedMessage<'a>>>,
        messages: &mut MessageStream<'a, SinkContext>,
    ) -> Result<(), SinkError> {
        let mut received = first;
        self.caught_up = false;
        loop {
            // Assignment changes happened inside this poll, before its message.
            on_rebalance(
                self.consumer,
                &mut self.pending,
                &mut self.group_offsets,
                &mut self.stats,
            )?;
            match received {
                Some(Ok(message)) => {
                    self.kafka_errors = 0;
                    consume(
                        &message,
                        &mut self.inboxes,
                        &mut self.pending,
                        &mut self.stats,
                    );
                }
                Some(Err(error @ KafkaError::MessageConsumptionFatal(_))) => {
                    // librdkafka gave up on this consumer (e.g. another instance runs
                    // with the same group.instance.id): needs a person.
                    return Err(SinkError::Consumer(error));
                }
                Some(Err(error)) => {
                    self.kafka_errors += 1;
                    // librdkafka retries by itself; log (each error once a minute),
                    // and slow down if it repeats.
                    if let Some(repeats) = self.consumer.context().errors.admit(&error.to_string())
                    {
                        tracing::warn!(%error, repeats, "kafka consumer error");
                    }
                    if self.kafka_errors > 10 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    return Ok(());
                }
                // The stream of a consumer never ends.
                None => return Ok(()),
            }
            if self.pending.consumed >= self.args.batch_size {
                return Ok(());
            }
            match messages.next().now_or_never() {
                Some(next) => received = next,
                None => {
                    self.caught_up = true;
                    return Ok(());
                }
            }
        }
    }

    /// Hands the pending batch to the applier when it is full, when nothing is being
    /// applied and the consumer has caught up (no record waits: a batch does not wait
    /// for records that are not there), or at the latest `linger` after its first
    /// record.
    fn maybe_apply(&mut self) {
        let due = self
            .pending
            .since
            .is_some_and(|since| since + self.linger <= tokio::time::Instant::now());
        let idle = self.caught_up && self.in_flight.is_none();
        let full = self.pending.consumed >= self.args.batch_size;
        if !self.pending.is_empty() && (full || due || idle) {
            if let Some(writer) = self.writer.take() {
                self.in_flight = Some(InFlight::start(
                    writer,
                    &mut self.pending,
                    &self.inboxes.tables,
                    self.stop.clone(),
                ));
            }
        }
    }

    /// Shutdown: the batch in flight finishes (or is abandoned if pg_end does not take
    /// it), the buffered one gets one attempt, and Kafka is told what pg_end committed.
    async fn shut_down(
        mut self,
        result: Result<(), SinkError>,
    ) -> (Result<(), SinkError>, SinkStats) {
        let mut result = result;
        let mut pg_end_takes_batches = true;
        if let Some(applying) = self.in_flight.take() {
            match finish_batch(
                applying.task.await,
                self.consumer,
                &mut self.group_offsets,
                &mut self.writer,
                &mut self.stats,
            ) {
                Ok(committed) => pg_end_takes_batches = committed,
                Err(error) => result = result.and(Err(error)),
            }
        }
        if result.is_ok() && pg_end_takes_batches && !self.pending.is_empty() {
            if let Some(writer) = self.writer.take() {
                let tables = &self.inboxes.tables;
                let done = InFlight::start(writer, &mut self.pending, tables, self.stop.clone())
                    .task
                    .await;
                let _ = finish_batch(
                    done,
                    self.consumer,
                    &mut self.group_offsets,
                    &mut None,
                    &mut self.stats,
                );
            }
        }
        self.group_offsets.commit(self.consumer);
        (result, self.stats)
    }
}

/// A batch being applied to pg_end by a task of its own, while the consumer loop
/// decodes the next one: at most one batch in flight and one pending, and batches are
/// applied one after the other, in the order they were consumed.
struct InFlight {
    task: tokio::task::JoinHandle<Applied>,
}

/// What the applier task hands back: the writer, the batch's progress, and how it went.
/// The records are dropped in the task, off the consumer loop.
struct Applied {
    writer: Driver,
    progress: Progress,
    commit_times: Vec<i64>,
    traced: Vec<telemetry::Traced>,
    stats: SinkStats,
    result: Result<bool, SinkError>,
}

impl InFlight {
    fn start(
        mut writer: Driver,
        pending: &mut Pending,
        tables: &Arc<[TableTarget]>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let commit_times = std::mem::take(&mut pending.commit_times);
        let traced = std::mem::take(&mut pending.traced);
        let batch = pending.take_batch(tables);
        let task = tokio::spawn(async move {
            let mut stats = SinkStats::default();
            let result = apply_until_done(&mut writer, &batch, &stop, &mut stats).await;
            Applied {
                writer,
                progress: batch.progress,
                commit_times,
                traced,
                stats,
                result,
            }
        });
        Self { task }
    }
}

async fn wait_applied(in_flight: &mut Option<InFlight>) -> Result<Applied, tokio::task::JoinError> {
    match in_flight {
        Some(applying) => (&mut applying.task).await,
        None => std::future::pending().await,
    }
}

/// Takes back the writer and the counts of a finished batch; once pg_end committed
/// it, records the latency and tells Kafka. `Ok(false)`: the sink is stopping and the
/// batch was abandoned.
fn finish_batch(
    done: Result<Applied, tokio::task::JoinError>,
    consumer: &StreamConsumer<SinkContext>,
    group_offsets: &mut GroupOffsets,
    writer: &mut Option<Driver>,
    stats: &mut SinkStats,
) -> Result<bool, SinkError> {
    let applied = done.map_err(|e| SinkError::Applier(e.to_string()))?;
    stats.add_applied(&applied.stats);
    *writer = Some(applied.writer);
    let committed = applied.result?;
    if committed {
        // Source commit → pg_end commit, per applied record that carries the
        // connector's commit-time header.
        crate::metrics::record_latencies("sink", &applied.commit_times);
        telemetry::applied(&applied.traced);
        group_offsets.committed(consumer, &applied.progress);
    }
    Ok(committed)
}

/// Builds the consumer. Settings that correctness rests on are applied last, so that
/// `--consumer-property` cannot override them.
fn consumer(
    args: &SinkArgs,
    context: SinkContext,
) -> Result<StreamConsumer<SinkContext>, SinkError> {
    // The base of every client: brokers and the --kafka-property security settings.
    let mut config = crate::kafka::client_config(&args.kafka.brokers);
    config
        .set("group.id", &args.group)
        .set("client.id", "outbox-relay-sink")
        // Noticed within seconds when a sink dies, so its partitions move on quickly.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "3000")
        // Bounds the memory of records fetched ahead while a batch is being applied:
        // in bytes, and in records (librdkafka's default of 100,000 per partition
        // costs ~1 KiB each for the outbox's small records).
        .set("queued.max.messages.kbytes", "16384")
        .set(
            "queued.min.messages",
            args.batch_size.clamp(1000, 100_000).to_string(),
        )
        // Once those bounds are reached, librdkafka waits this long before fetching
        // the partition again (default 1 s): at the sink's pace the queue is drained
        // in milliseconds, so a long wait starves the applier.
        .set("fetch.queue.backoff.ms", "10")
        // A fetch returns as soon as records are there; this bounds the wait when
        // none are (librdkafka's default of 500 ms adds to the latency of a record
        // made visible by a transaction's commit markers).
        .set("fetch.wait.max.ms", "100")
        // Per-partition consumer lag for the metrics (SinkContext::stats).
        .set("statistics.interval.ms", "5000")
        // How soon a topic created after the start is seen: an inbox subscribed by
        // pattern takes a new matching topic (an event router's new aggregate type)
        // at the next metadata refresh, and a named topic that did not exist yet the
        // same way (librdkafka's default: every 5 minutes).
        .set("topic.metadata.refresh.interval.ms", "5000")
        .set("auto.offset.reset", "earliest");
    for property in &args.consumer_properties {
        let (key, value) = property.split_once('=').ok_or_else(|| {
            SinkError::InvalidOption(format!("--consumer-property {property:?} is not KEY=VALUE"))
        })?;
        config.set(key.trim(), value.trim());
    }
    config
        // Only committed records of transactional producers (the connector's).
        .set("isolation.level", "read_committed")
        // Progress lives in pg_end; Kafka's group offsets are written by us, after it.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    config
        .create_with_context(context)
        .map_err(SinkError::Consumer)
}

/// Acts on the assignment changes of the last poll.
fn on_rebalance(
    consumer: &StreamConsumer<SinkContext>,
    pending: &mut Pending,
    group_offsets: &mut GroupOffsets,
    stats: &mut SinkStats,
) -> Result<(), SinkError> {
    let context = consumer.context();
    if let Some(error) = context.take_fatal() {
        return Err(SinkError::Definite(error));
    }
    for event in context.take_events() {
        match event {
            RebalanceEvent::Revoked(partitions) => {
                group_offsets.revoke(&partitions);
                let dropped = pending.drop_partitions(&partitions);
                stats.dropped_on_revoke += dropped;
                if dropped > 0 {
                    tracing::info!(dropped, "dropped buffered records of revoked partitions");
                }
            }
            // The group took this member (with partitions or none) and pg_end told
            // where they start: the sink consumes, idle or not, so it is ready.
            // (An applied batch says so too; a pg_end retry says it is not.)
            RebalanceEvent::Assigned(_) => crate::metrics::health().set_ready(true),
        }
    }
    Ok(())
}

/// Decodes one record into the pending batch, for the inbox its topic feeds.
fn consume(
    message: &rdkafka::message::BorrowedMessage<'_>,
    inboxes: &mut Inboxes,
    pending: &mut Pending,
    stats: &mut SinkStats,
) {
    let topic = message.topic();
    let partition = message.partition();
    let offset = message.offset();
    let kafka_headers = message.headers();
    // Room for the connector's three headers (~125 bytes) in one allocation.
    let mut headers = apply::Headers::with_capacity(kafka_headers.map_or(0, |h| h.count() * 64));
    let mut lsn_header = None;
    let mut trace_parent = None;
    for header in kafka_headers.iter().flat_map(|h| h.iter()) {
        headers.push(header.key, header.value);
        if header.key == HEADER_LSN {
            lsn_header = Some(header.value);
        } else if header.key == HEADER_COMMIT_TS {
            if let Some(committed) = header.value.and_then(record::header_commit_time) {
                pending.commit_times.push(committed);
            }
        } else if header.key == telemetry::TRACEPARENT && telemetry::enabled() {
            trace_parent = header.value.and_then(telemetry::producer_span);
        }
    }
    let source_lsn = lsn_header.flatten().and_then(record::header_lsn);
    let value = message.payload();
    let topic_shared = match &pending.topic {
        Some(shared) if **shared == *topic => shared.clone(),
        _ => pending.topic.insert(Arc::from(topic)).clone(),
    };
    let make_origin = |headers: apply::Headers| Origin {
        topic: Some(topic_shared.clone()),
        partition: Some(partition),
        offset: Some(offset),
        source_lsn,
        key: message.key().map(<[u8]>::to_vec),
        value: value.map(<[u8]>::to_vec),
        headers,
    };

    stats.consumed += 1;
    let decoded = match inboxes.for_topic(topic).map(|inbox| &inbox.kind) {
        Some(InboxKind::Ledger(format)) => {
            match record::decode::decode(*format, value, lsn_header.is_some()) {
                Ok(Decoded::Insert(txn, detected)) => {
                    match detected {
                        Detected::Connector => stats.connector_records += 1,
                        Detected::Seed => stats.seed_records += 1,
                        Detected::Debezium => stats.debezium_records += 1,
                    }
                    pending.records.push((txn, make_origin(headers)));
                    Ok(None)
                }
                Ok(Decoded::Skip(skip)) => Ok(Some(skip)),
                Err(rejected) => Err(rejected),
            }
        }
        Some(InboxKind::Table {
            format,
            target,
            sources,
        }) => {
            let list: Vec<(&str, Option<&[u8]>)> = headers.iter().collect();
            let view = RecordView {
                topic,
                partition: Some(partition),
                offset: Some(offset),
                timestamp_ms: message.timestamp().to_millis(),
                key: message.key(),
                value,
                headers: &list,
                lsn: source_lsn,
            };
            match inbox::extract(*format, sources, &view) {
                Ok(Extracted::Event(values)) => {
                    drop(list);
                    stats.inbox_events += 1;
                    pending.events.push(Event {
                        target: *target,
                        values,
                        origin: make_origin(headers),
                    });
                    Ok(None)
                }
                Ok(Extracted::Skip(skip)) => Ok(Some(skip)),
                Err(rejected) => Err(rejected),
            }
        }
        None => Err(record::decode::Rejected {
            kind: apply::DeadLetterKind::UnknownFormat,
            error: format!("no inbox takes records of topic {topic}"),
        }),
    };
    if let Some(parent) = trace_parent {
        pending.traced.push(telemetry::Traced {
            parent,
            topic: topic_shared.clone(),
            partition,
            offset,
            received: std::time::SystemTime::now(),
            outcome: match &decoded {
                Ok(None) => telemetry::Outcome::Applied,
                Ok(Some(_)) => telemetry::Outcome::Skipped,
                Err(_) => telemetry::Outcome::DeadLetter,
            },
        });
    }
    match decoded {
        Ok(None) => {}
        Ok(Some(skip)) => {
            stats.skipped += 1;
            tracing::debug!(topic, partition, offset, ?skip, "record skipped");
        }
        Err(rejected) => {
            stats.dead_letters += 1;
            tracing::warn!(
                topic,
                partition,
                offset,
                kind = %rejected.kind,
                error = %rejected.error,
                "dead letter"
            );
            let headers = message
                .headers()
                .iter()
                .flat_map(|h| h.iter())
                .map(|h| (h.key, h.value))
                .collect();
            pending.dead_letters.push(DeadLetter {
                kind: rejected.kind,
                error: rejected.error,
                origin: make_origin(headers),
            });
        }
    }
    // A lookup by &str first: a String per record was a measurable cost.
    match pending
        .last_offsets
        .iter_mut()
        .find(|((t, p), _)| t == topic && *p == partition)
    {
        Some((_, last)) => *last = (*last).max(offset),
        None => {
            pending
                .last_offsets
                .insert((topic.to_string(), partition), offset);
        }
    }
    pending.consumed += 1;
    if pending.since.is_none() {
        pending.since = Some(tokio::time::Instant::now());
    }
}

/// The connector's commit-time header (RFC 3339, UTC) in microseconds since
/// 1970-01-01, read without chrono's general parser for the form the connector writes
/// (`2025-07-23T20:06:21.085330Z`).
/// Kafka's group offsets, for lag monitoring only (pg_end holds the offsets that
/// count): what pg_end has committed is told to Kafka at most every
/// [`GROUP_COMMIT_EVERY`], not once per batch. An OffsetCommit is a replicated write on
/// the group coordinator, which serves one request per connection at a time: at the
/// hundred small batches a second of a 2,000 tx/s stream, the commits queued the
/// consumer's heartbeats behind them until its session timed out (a 17 s stall in the
/// bench's steady state).
struct GroupOffsets {
    latest: BTreeMap<(String, i32), i64>,
    last_commit: tokio::time::Instant,
}

const GROUP_COMMIT_EVERY: Duration = Duration::from_secs(1);

impl GroupOffsets {
    fn new() -> Self {
        Self {
            latest: BTreeMap::new(),
            last_commit: tokio::time::Instant::now(),
        }
    }

    /// After pg_end committed a batch: remember its offsets, and tell Kafka if due.
    fn committed(&mut self, consumer: &StreamConsumer<SinkContext>, progress: &Progress) {
        self.record(progress);
        if self.last_commit.elapsed() >= GROUP_COMMIT_EVERY {
            self.commit(consumer);
        }
    }

    fn record(&mut self, progress: &Progress) {
        if let Progress::KafkaOffsets(offsets) = progress {
            for o in offsets {
                let last = self
                    .latest
                    .entry((o.topic.clone(), o.partition))
                    .or_insert(o.last_offset);
                *last = (*last).max(o.last_offset);
            }
        }
    }

    /// When the offsets not yet told to Kafka are due, if there are any.
    fn due(&self) -> Option<tokio::time::Instant> {
        (!self.latest.is_empty()).then_some(self.last_commit + GROUP_COMMIT_EVERY)
    }

    /// Forgets revoked partitions: their new owner reports them.
    fn revoke(&mut self, partitions: &[(String, i32)]) {
        for partition in partitions {
            self.latest.remove(partition);
        }
    }

    /// What to commit (the next offset to read per partition), emptying the list.
    fn take(&mut self) -> Option<TopicPartitionList> {
        self.last_commit = tokio::time::Instant::now();
        if self.latest.is_empty() {
            return None;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), last_offset) in std::mem::take(&mut self.latest) {
            if let Err(error) =
                tpl.add_partition_offset(&topic, partition, Offset::Offset(last_offset + 1))
            {
                tracing::debug!(%error, "cannot list an offset to commit to kafka");
            }
        }
        Some(tpl)
    }

    fn commit(&mut self, consumer: &StreamConsumer<SinkContext>) {
        let Some(tpl) = self.take() else { return };
        if let Err(error) = consumer.commit(&tpl, CommitMode::Async) {
            // Harmless: pg_end holds the offsets that count.
            tracing::debug!(%error, "cannot commit offsets to kafka (monitoring only)");
        }
    }
}

/// Applies `batch` through the driver until it is committed (`Ok(true)`) or the sink
/// stops (`Ok(false)`: abandoned, nothing advanced); transient failures are retried
/// with backoff on a new connection, each one counted.
async fn apply_until_done(
    pg_end: &mut Driver,
    batch: &ApplyBatch,
    stop: &AtomicBool,
    stats: &mut SinkStats,
) -> Result<bool, SinkError> {
    let started = Instant::now();
    let mut session = Applying {
        stop,
        retries: 0,
        records: batch.records.len(),
    };
    let applied = pg_end.run(&mut session, &mut driver::Apply(batch)).await;
    stats.retries += session.retries;
    match applied {
        Ok(outcome) => {
            crate::metrics::health().set_ready(true);
            stats.batches += 1;
            stats.inserted += outcome.inserted;
            stats.duplicates += outcome.duplicates;
            stats.conflicts += outcome.conflicts;
            // Parse failures were counted when consumed; count the rest now.
            stats.dead_letters += outcome
                .dead_letters
                .saturating_sub(batch.dead_letters.len() as u64);
            tracing::debug!(
                records = batch.records.len(),
                inserted = outcome.inserted,
                duplicates = outcome.duplicates,
                dead_letters = outcome.dead_letters,
                bisected = outcome.bisected,
                ms = started.elapsed().as_millis() as u64,
                "batch applied"
            );
            Ok(true)
        }
        Err(Ended::Stopped) => {
            tracing::info!("stopping: the unapplied batch is abandoned; it will be read again");
            Ok(false)
        }
        Err(Ended::Failed(Failure::Definite(error))) => Err(SinkError::Definite(error)),
        // The sink sets no bound on attempts and keeps no commit in doubt.
        Err(other) => Err(SinkError::Applier(other.to_string())),
    }
}

/// The sink's side of the driver: its stop, and what a transient pg_end failure costs
/// (not ready, a retry counted, a warning).
struct Applying<'s> {
    stop: &'s AtomicBool,
    retries: u64,
    records: usize,
}

impl driver::Session for Applying<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn retrying(&mut self, failure: &str, attempt: u32) {
        crate::metrics::health().set_ready(false);
        ::metrics::counter!(crate::metrics::RETRIES, "cause" => "pg_end").increment(1);
        self.retries += 1;
        tracing::warn!(
            error = %failure,
            attempt,
            records = self.records,
            "cannot apply the batch to pg_end; retrying"
        );
    }
}

/// A summary line every [`REPORT_EVERY`] while records flow.
struct Report {
    last: Instant,
    consumed: u64,
}

impl Report {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            consumed: 0,
        }
    }

    fn maybe_log(&mut self, stats: &SinkStats) {
        let elapsed = self.last.elapsed();
        if elapsed < REPORT_EVERY || stats.consumed == self.consumed {
            return;
        }
        tracing::info!(
            consumed = stats.consumed,
            rate = format!(
                "{:.0}/s",
                (stats.consumed - self.consumed) as f64 / elapsed.as_secs_f64()
            ),
            inserted = stats.inserted,
            duplicates = stats.duplicates,
            dead_letters = stats.dead_letters,
            skipped = stats.skipped,
            batches = stats.batches,
            "sink progress"
        );
        self.last = Instant::now();
        self.consumed = stats.consumed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(list: &[(&str, i32, i64)]) -> Progress {
        Progress::KafkaOffsets(
            list.iter()
                .map(|&(topic, partition, last_offset)| KafkaOffset {
                    topic: topic.into(),
                    partition,
                    last_offset,
                })
                .collect(),
        )
    }

    #[test]
    fn group_offsets_keep_the_highest_per_partition_and_forget_revoked_ones() {
        let mut group = GroupOffsets::new();
        group.record(&offsets(&[("t", 0, 10), ("t", 1, 5)]));
        group.record(&offsets(&[("t", 0, 7), ("t", 1, 9), ("t", 2, 3)]));
        group.revoke(&[("t".to_string(), 2)]);
        let tpl = group.take().expect("offsets to commit");
        let next = |partition| tpl.find_partition("t", partition).map(|e| e.offset());
        assert_eq!(
            next(0),
            Some(Offset::Offset(11)),
            "highest + 1, never lower"
        );
        assert_eq!(next(1), Some(Offset::Offset(10)));
        assert_eq!(
            next(2),
            None,
            "a revoked partition is its new owner's to report"
        );
        assert!(group.take().is_none(), "taken once");
        assert!(group.due().is_none(), "nothing left to tell Kafka");
        group.record(&offsets(&[("t", 0, 12)]));
        assert!(
            group.due().is_some(),
            "a last batch's offsets do not wait for another"
        );
    }
}
