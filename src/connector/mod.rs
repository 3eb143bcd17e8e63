//! `outbox-relay connector`: the outbox table's inserts, from a logical replication
//! slot (pgoutput) into Kafka, exactly once.
//!
//! ```text
//!  pg_start ──walsender──▶ pgwire-replication ──▶ pgoutput::decode ──▶ Batch
//!     ▲                                                                 │ one Kafka transaction:
//!     │ update_applied_lsn(confirmable)                                 │ records + progress record
//!     └──────────── ProgressTracker ◀── durable_through(ticket) ◀─────── commit_transaction()
//! ```
//!
//! # Invariants
//! 1. The slot's confirmed flush LSN is advanced only to what [`ProgressTracker`]
//!    allows: the commit end LSN of a source transaction that, with every earlier one,
//!    is in a committed Kafka transaction (or, idle, a keepalive's WAL end).
//! 2. Each Kafka transaction also writes the commit end LSN of its last source
//!    transaction to the compacted progress topic (see [`crate::kafka`]). On every
//!    (re)start the connector reads it back, `read_committed`, after
//!    `init_transactions` has fenced any previous instance, and skips source
//!    transactions at or below it. A kill between the Kafka commit and the slot
//!    confirmation therefore re-reads those transactions from the slot and drops them.
//! 3. One source transaction is never split across two Kafka transactions.
//! 4. Memory is bounded: a batch holds at most `--batch-size` records (plus the rest
//!    of one source transaction) and `--batch-bytes`; while it is committed, nothing
//!    more is read from the slot, and pgwire-replication's bounded channel makes the
//!    walsender wait.
//! 5. Transient failures (PostgreSQL or brokers gone, min ISR not met, a hung broker)
//!    are retried with capped backoff; only a definite error (a lost slot, a fenced
//!    producer, a bad configuration) stops the connector.
//!
//! In `at-least-once` mode there are no Kafka transactions: a batch is durable once
//! every record of it is acknowledged (`acks=all`, idempotent producer), and a crash
//! may send a batch again (the sink is idempotent). The progress record is still
//! written, but only as the mark that the slot has been used.

mod producer;
mod snapshot;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgwire_replication::{PgWireError, ReplicationClient, ReplicationEvent};
use rdkafka::message::{Header, OwnedHeaders};
use thiserror::Error;
use tokio::sync::watch;

use crate::config::{KafkaArgs, SourceArgs};
use crate::kafka::encode::{self, ColumnSpec};
use crate::kafka::{self, KafkaSetupError, ProgressRecord, ProgressState, TopicSpec};
use crate::lsn::Lsn;
use crate::pg::{self, ErrorClass};
use crate::pgoutput::{self, LogicalMessage, RelationCache};
use crate::progress::{ProgressTracker, TxnTicket};
use crate::retry::Backoff;
use crate::source::{self, SourceError, TableName};

pub use producer::DeliveryMode;
use producer::{BatchProducer, FlushError};

/// Options of `outbox-relay connector`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectorArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The logical replication slot (created if missing, unless --no-create-slot).
    #[arg(long, env = "OUTBOX_RELAY_SLOT", default_value = "outbox_relay")]
    pub slot: String,
    /// The publication that holds the outbox table.
    #[arg(long, env = "OUTBOX_RELAY_PUBLICATION", default_value = "outbox_relay")]
    pub publication: String,
    /// The outbox table, schema-qualified.
    #[arg(
        long,
        env = "OUTBOX_RELAY_TABLE",
        default_value = "outbox.transactions"
    )]
    pub table: String,
    /// The column whose value is the Kafka record key (one key's records stay in order).
    #[arg(long, env = "OUTBOX_RELAY_KEY_COLUMN", default_value = "account_id")]
    pub key_column: String,
    /// The compacted topic holding the last source LSN in Kafka, per slot.
    #[arg(
        long,
        env = "OUTBOX_RELAY_PROGRESS_TOPIC",
        default_value = "outbox-relay-progress"
    )]
    pub progress_topic: String,
    /// Partitions of the topic when the connector creates it.
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    /// Replication factor of the topics the connector creates.
    #[arg(long, default_value_t = 3)]
    pub replication_factor: i32,
    /// Records per Kafka transaction (a source transaction is never split).
    #[arg(long, env = "OUTBOX_RELAY_BATCH_SIZE", default_value_t = 5000)]
    pub batch_size: usize,
    /// Bytes of record values per Kafka transaction.
    #[arg(long, default_value_t = 4 << 20)]
    pub batch_bytes: usize,
    /// Longest time a record waits for its batch to fill, in milliseconds.
    #[arg(long, env = "OUTBOX_RELAY_LINGER_MS", default_value_t = 20)]
    pub linger_ms: u64,
    /// `transactional` (exactly once into Kafka) or `at-least-once`.
    #[arg(
        long,
        value_enum,
        env = "OUTBOX_RELAY_DELIVERY",
        default_value = "transactional"
    )]
    pub delivery: DeliveryMode,
    /// Fail instead of creating a missing slot.
    #[arg(long)]
    pub no_create_slot: bool,
    /// Fail instead of creating a missing publication.
    #[arg(long)]
    pub no_create_publication: bool,
    /// Emit a `pg_logical_emit_message` heartbeat this often (seconds; 0 = off) so
    /// that the slot advances on a database whose other tables are busy.
    #[arg(long, default_value_t = 0.0)]
    pub heartbeat_secs: f64,
}

#[derive(Debug, Error)]
pub enum ConnectorError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    #[error("{0}")]
    Definite(String),
    #[error("replication stream: {0}")]
    Replication(#[source] PgWireError),
    #[error("kafka: {0}")]
    Flush(#[from] FlushError),
    #[error("undecodable pgoutput message at {lsn}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: pgoutput::DecodeError,
    },
}

impl ConnectorError {
    fn class(&self) -> ErrorClass {
        match self {
            ConnectorError::Source(e) => e.class(),
            ConnectorError::Kafka(KafkaSetupError::Config(_))
            | ConnectorError::Kafka(KafkaSetupError::BadProgressRecord { .. })
            | ConnectorError::Definite(_)
            | ConnectorError::Decode { .. } => ErrorClass::Definite,
            ConnectorError::Kafka(_) => ErrorClass::Transient,
            ConnectorError::Replication(e) => match e {
                PgWireError::Auth(_)
                | PgWireError::Tls(_)
                | PgWireError::MessageTooLarge { .. } => ErrorClass::Definite,
                _ => ErrorClass::Transient,
            },
            ConnectorError::Flush(e) => e.class(),
        }
    }
}

/// One record ready for Kafka.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub key: Option<Bytes>,
    pub value: Bytes,
    /// Index into [`Batch::headers`]: the source transaction the record came from.
    pub txn: usize,
}

/// Source transactions gathered for one Kafka transaction.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<OutRecord>,
    /// One header set per source transaction (commit LSN, xid, commit time).
    pub headers: Vec<OwnedHeaders>,
    pub value_bytes: usize,
    /// Commit end LSN of the last complete source transaction in the batch.
    pub last_end_lsn: Option<Lsn>,
    /// The tracker ticket of that transaction.
    pub last_ticket: Option<TxnTicket>,
    /// When the first record entered the batch.
    pub started: Option<Instant>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.last_ticket.is_none()
    }
}

/// The source transaction being read.
struct OpenTxn {
    /// Already in Kafka (at or below the progress LSN): read and dropped.
    skip: bool,
    records: Vec<OutRecord>,
    value_bytes: usize,
    headers: OwnedHeaders,
}

/// The connector's state across replication sessions.
pub struct Connector {
    args: ConnectorArgs,
    table: TableName,
    producer: BatchProducer,
    /// Everything at or below this LSN is in Kafka (read from the progress topic).
    kafka_lsn: Lsn,
    stop: watch::Receiver<bool>,
    stopping: Arc<AtomicBool>,
}

/// Runs the connector until `stop` turns true or a definite error occurs.
pub async fn run(args: ConnectorArgs, stop: watch::Receiver<bool>) -> Result<(), ConnectorError> {
    let table = TableName::parse(&args.table)
        .map_err(|e| ConnectorError::Definite(format!("--table: {e}")))?;
    source::validate_identifier(&args.slot)
        .map_err(|e| ConnectorError::Definite(format!("--slot: {e}")))?;
    if args.batch_size == 0 {
        return Err(ConnectorError::Definite(
            "--batch-size must be at least 1".into(),
        ));
    }
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let stopping = stopping.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            stopping.store(true, Ordering::SeqCst);
        });
    }

    let mut backoff = Backoff::reconnect();
    // Topics and producer: retried until the brokers answer.
    let producer = loop {
        match setup_kafka(&args, stopping.clone()).await {
            Ok(producer) => break producer,
            Err(error)
                if error.class() == ErrorClass::Transient && !stopping.load(Ordering::SeqCst) =>
            {
                tracing::warn!(error = %error_chain(&error), "kafka not ready, retrying");
                backoff.wait().await;
            }
            Err(error) => return Err(error),
        }
    };
    let mut connector = Connector {
        args,
        table,
        producer,
        kafka_lsn: Lsn::ZERO,
        stop,
        stopping,
    };
    connector.run().await
}

async fn setup_kafka(
    args: &ConnectorArgs,
    stopping: Arc<AtomicBool>,
) -> Result<BatchProducer, ConnectorError> {
    kafka::ensure_topic(
        &args.kafka.brokers,
        &TopicSpec {
            name: &args.kafka.topic,
            partitions: args.partitions,
            replication_factor: args.replication_factor,
            configs: &[],
        },
    )
    .await?;
    kafka::ensure_topic(
        &args.kafka.brokers,
        &TopicSpec {
            name: &args.progress_topic,
            partitions: 1,
            replication_factor: args.replication_factor,
            configs: &[("cleanup.policy", "compact")],
        },
    )
    .await?;
    let brokers = args.kafka.brokers.clone();
    let transactional_id = format!("outbox-relay-{}", args.slot);
    let mode = args.delivery;
    let producer = tokio::task::spawn_blocking(move || {
        BatchProducer::new(&brokers, mode, &transactional_id, stopping)
    })
    .await
    .map_err(|e| ConnectorError::Definite(format!("producer setup panicked: {e}")))??;
    Ok(producer)
}

/// Formats an error with its sources, for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// How a replication session ended without a definite error.
enum SessionEnd {
    Stopped,
}

impl Connector {
    async fn run(&mut self) -> Result<(), ConnectorError> {
        let mut backoff = Backoff::reconnect();
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                return Ok(());
            }
            match self.session(&mut backoff).await {
                Ok(SessionEnd::Stopped) => {
                    tracing::info!("connector stopped");
                    return Ok(());
                }
                Err(error) if error.class() == ErrorClass::Transient => {
                    tracing::warn!(error = %error_chain(&error), "connector session ended, reconnecting");
                    tokio::select! {
                        _ = backoff.wait() => {}
                        _ = self.stop.wait_for(|s| *s) => {}
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Reads the progress topic (after `init_transactions` fenced any predecessor).
    async fn read_progress(&self) -> Result<Option<ProgressRecord>, ConnectorError> {
        let (brokers, topic, slot) = (
            self.args.kafka.brokers.clone(),
            self.args.progress_topic.clone(),
            self.args.slot.clone(),
        );
        let record = tokio::task::spawn_blocking(move || {
            kafka::read_progress(&brokers, &topic, &slot, Duration::from_secs(60))
        })
        .await
        .map_err(|e| ConnectorError::Definite(format!("progress reader panicked: {e}")))??;
        Ok(record)
    }

    /// One replication session: checks, slot, stream until an error or a stop.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<SessionEnd, ConnectorError> {
        let url = self.args.source.source_url.clone();
        let client = pg::connect(&url)
            .await
            .map_err(|source| SourceError::Transient {
                context: format!("connecting to {}", pg::redact_url(&url)),
                source: Some(source),
            })?;
        let info = source::check_source(
            &client,
            &self.table,
            &self.args.publication,
            !self.args.no_create_publication,
        )
        .await?;
        let database = source::database_of(&url).unwrap_or_default();
        let slot = source::slot_state(&client, &self.args.slot).await?;
        let progress = self.read_progress().await?;
        let slot_name = self.args.slot.clone();

        let mut replication = match (slot, &progress) {
            (None, Some(record)) if record.state == ProgressState::Streaming => {
                return Err(ConnectorError::Definite(format!(
                    "slot {slot_name} is missing, but the connector has streamed from it (Kafka holds \
                     up to LSN {}): recreating it would skip every transaction written since. Recover: \
                     run `outbox-relay reconcile` so pg_end holds everything pg_start has, then start \
                     the connector with a new --slot (a new slot emits the outbox rows present when it \
                     is created)",
                    record.lsn
                )));
            }
            (None, _) if self.args.no_create_slot => {
                return Err(ConnectorError::Definite(format!(
                    "slot {slot_name} does not exist in pg_start; create it \
                     (SELECT pg_create_logical_replication_slot('{slot_name}', 'pgoutput')) \
                     or start without --no-create-slot"
                )));
            }
            (Some(state), Some(record)) if record.state == ProgressState::Snapshot => {
                // The relay created this slot, and its snapshot never reached Kafka
                // (no streaming record was committed): nothing of it was emitted, so
                // starting over with a fresh slot and snapshot loses and repeats nothing.
                if let Some(pid) = state.active_pid {
                    return Err(SourceError::Transient {
                        context: format!("slot {slot_name} is still held by pid {pid}"),
                        source: None,
                    }
                    .into());
                }
                tracing::warn!(slot = %slot_name, "slot's initial snapshot never completed; recreating it");
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&slot_name])
                    .await
                    .map_err(|source| SourceError::Query {
                        context: format!("dropping the unfinished slot {slot_name}"),
                        source,
                    })?;
                self.create_slot(&info).await?
            }
            (None, _) => self.create_slot(&info).await?,
            (Some(state), _) => {
                source::check_slot(&slot_name, &state, &database)?;
                if self.args.delivery == DeliveryMode::Transactional {
                    self.kafka_lsn = progress
                        .as_ref()
                        .and_then(ProgressRecord::lsn)
                        .unwrap_or(Lsn::ZERO);
                }
                let start = state.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
                let config =
                    source::replication_config(&url, &slot_name, &self.args.publication, start)?;
                let mut replication = ReplicationClient::connect_gated(config)
                    .await
                    .map_err(ConnectorError::Replication)?;
                replication
                    .start()
                    .await
                    .map_err(ConnectorError::Replication)?;
                replication
            }
        };
        replication
            .wait_started()
            .await
            .map_err(ConnectorError::Replication)?;
        tracing::info!(slot = %slot_name, kafka_lsn = %self.kafka_lsn, "streaming");
        backoff.reset();
        drop(client);
        let heartbeat = self.spawn_heartbeat();
        let result = self.stream(&mut replication).await;
        if let Some(h) = heartbeat {
            h.abort();
        }
        // Dropping the client ends the session (stop()+join() can hang on some paths).
        drop(replication);
        result
    }

    /// Creates the slot with an exported snapshot and emits the outbox rows that
    /// snapshot sees, in one Kafka transaction with the slot's starting LSN.
    async fn create_slot(
        &mut self,
        info: &source::SourceInfo,
    ) -> Result<ReplicationClient, ConnectorError> {
        let (replication, lsn) = snapshot::create_slot_and_emit(self, info).await?;
        self.kafka_lsn = lsn;
        Ok(replication)
    }

    fn spawn_heartbeat(&self) -> Option<tokio::task::JoinHandle<()>> {
        if self.args.heartbeat_secs <= 0.0 {
            return None;
        }
        let url = self.args.source.source_url.clone();
        let every = Duration::from_secs_f64(self.args.heartbeat_secs);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut client = None;
            loop {
                tick.tick().await;
                if client.is_none() {
                    client = pg::connect(&url).await.ok();
                }
                if let Some(c) = &client {
                    // Non-transactional: it reaches the slot at once and touches no table.
                    if c.execute(
                        "SELECT pg_logical_emit_message(false, 'outbox-relay-heartbeat', '')",
                        &[],
                    )
                    .await
                    .is_err()
                    {
                        client = None;
                    }
                }
            }
        }))
    }

    /// Streams from the slot into Kafka until an error or a stop.
    async fn stream(
        &mut self,
        replication: &mut ReplicationClient,
    ) -> Result<SessionEnd, ConnectorError> {
        let mut tracker = ProgressTracker::new(self.kafka_lsn);
        let mut relations = RelationCache::new();
        let mut columns: Option<(u32, Vec<ColumnSpec>, Option<usize>)> = None;
        let mut open: Option<OpenTxn> = None;
        let mut batch = Batch::default();
        let linger = Duration::from_millis(self.args.linger_ms);
        let mut confirmed = Lsn::ZERO;
        let mut stop = self.stop.clone();

        loop {
            let deadline = batch.started.map(|s| s + linger);
            let event = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => {
                    self.flush(&mut batch, &mut tracker).await?;
                    self.confirm(replication, &tracker, &mut confirmed);
                    // Give the worker a moment to send the final status update.
                    tokio::time::sleep(Duration::from_millis(1200)).await;
                    return Ok(SessionEnd::Stopped);
                }
                _ = sleep_until_opt(deadline) => {
                    self.flush(&mut batch, &mut tracker).await?;
                    self.confirm(replication, &tracker, &mut confirmed);
                    continue;
                }
                event = replication.recv() => event,
            };
            let event = match event {
                Ok(Some(event)) => event,
                Ok(None) => {
                    return Err(ConnectorError::Replication(PgWireError::Protocol(
                        "replication stream ended".into(),
                    )))
                }
                Err(error) => {
                    // Complete transactions in the batch are valid: make them durable
                    // before reconnecting, so the next session does not redo them.
                    tracker.abandon_open();
                    if self.flush(&mut batch, &mut tracker).await.is_ok() {
                        self.confirm(replication, &tracker, &mut confirmed);
                    }
                    return Err(ConnectorError::Replication(error));
                }
            };
            match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => {
                    tracker.begin();
                    let final_lsn = Lsn(final_lsn.as_u64());
                    open = Some(OpenTxn {
                        skip: self.args.delivery == DeliveryMode::Transactional
                            && final_lsn < self.kafka_lsn,
                        records: Vec::new(),
                        value_bytes: 0,
                        headers: txn_headers(final_lsn, Some(xid), Some(commit_time_micros)),
                    });
                }
                ReplicationEvent::XLogData {
                    data, wal_start, ..
                } => {
                    let message =
                        pgoutput::decode(&data).map_err(|source| ConnectorError::Decode {
                            lsn: Lsn(wal_start.as_u64()),
                            source,
                        })?;
                    match message {
                        LogicalMessage::Relation(relation) => {
                            if relation.namespace == self.table.schema
                                && relation.name == self.table.name
                            {
                                let specs = relation
                                    .columns
                                    .iter()
                                    .map(|c| ColumnSpec::new(&c.name, c.type_oid))
                                    .collect();
                                let key = relation.column_index(&self.args.key_column);
                                if key.is_none() {
                                    return Err(ConnectorError::Definite(format!(
                                        "--key-column {} is not a column of {}",
                                        self.args.key_column, self.table
                                    )));
                                }
                                columns = Some((relation.rel_id, specs, key));
                            }
                            relations.update(relation);
                        }
                        LogicalMessage::Insert(insert) => {
                            let (Some(txn), Some((rel_id, specs, key))) =
                                (open.as_mut(), columns.as_ref())
                            else {
                                continue;
                            };
                            if insert.rel_id != *rel_id || txn.skip {
                                continue;
                            }
                            let mut value = Vec::with_capacity(128);
                            encode::encode_row(
                                &mut value,
                                specs,
                                insert.new.columns.iter().map(|c| c.as_text()),
                            );
                            let key = key
                                .and_then(|k| insert.new.columns.get(k))
                                .and_then(|c| c.as_text())
                                .map(Bytes::copy_from_slice);
                            txn.value_bytes += value.len();
                            txn.records.push(OutRecord {
                                key,
                                value: Bytes::from(value),
                                txn: 0,
                            });
                        }
                        // Updates, deletes and truncates of the outbox are not published;
                        // types, origins and messages carry nothing to relay.
                        _ => {}
                    }
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    let end_lsn = Lsn(end_lsn.as_u64());
                    let Some(txn) = open.take() else {
                        continue;
                    };
                    if txn.skip
                        || end_lsn <= self.kafka_lsn
                            && self.args.delivery == DeliveryMode::Transactional
                    {
                        tracker.commit(end_lsn, 0);
                    } else {
                        let index = batch.headers.len();
                        batch.headers.push(txn.headers);
                        batch.value_bytes += txn.value_bytes;
                        batch.records.extend(txn.records.into_iter().map(|mut r| {
                            r.txn = index;
                            r
                        }));
                        batch.last_end_lsn = Some(end_lsn);
                        batch.last_ticket = Some(tracker.commit(end_lsn, 1));
                        batch.started.get_or_insert_with(Instant::now);
                        if batch.records.len() >= self.args.batch_size
                            || batch.value_bytes >= self.args.batch_bytes
                        {
                            self.flush(&mut batch, &mut tracker).await?;
                        }
                    }
                    self.confirm(replication, &tracker, &mut confirmed);
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    if batch.is_empty() {
                        tracker.idle_position(Lsn(wal_end.as_u64()));
                        self.confirm(replication, &tracker, &mut confirmed);
                    }
                }
                ReplicationEvent::Message {
                    transactional: false,
                    lsn,
                    ..
                } => {
                    if batch.is_empty() {
                        tracker.idle_position(Lsn(lsn.as_u64()));
                        self.confirm(replication, &tracker, &mut confirmed);
                    }
                }
                ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
            }
        }
    }

    /// Tells the slot what may be confirmed.
    fn confirm(
        &self,
        replication: &ReplicationClient,
        tracker: &ProgressTracker,
        confirmed: &mut Lsn,
    ) {
        let lsn = tracker.confirmable();
        if lsn > *confirmed {
            replication.update_applied_lsn(pgwire_replication::Lsn::from_u64(lsn.as_u64()));
            *confirmed = lsn;
        }
    }

    /// Commits the batch to Kafka (retrying through outages) and marks it durable.
    async fn flush(
        &mut self,
        batch: &mut Batch,
        tracker: &mut ProgressTracker,
    ) -> Result<(), ConnectorError> {
        let (Some(last_lsn), Some(ticket)) = (batch.last_end_lsn, batch.last_ticket) else {
            return Ok(());
        };
        let progress = ProgressRecord::streaming(last_lsn);
        let (topic, progress_topic, slot) = (
            &self.args.kafka.topic,
            &self.args.progress_topic,
            &self.args.slot,
        );
        let producer = &mut self.producer;
        tokio::task::block_in_place(|| {
            producer.commit(topic, batch, progress_topic, slot, &progress)
        })?;
        self.kafka_lsn = self.kafka_lsn.max(last_lsn);
        tracker.durable_through(ticket);
        *batch = Batch::default();
        crash_point_after_kafka_commit();
        Ok(())
    }
}

/// Test hook: `OUTBOX_RELAY_TEST_CRASH_AFTER_COMMITS=N` aborts the process right after
/// the Nth Kafka commit, before the slot is told, to prove that such a crash causes no
/// duplicate.
fn crash_point_after_kafka_commit() {
    use std::sync::atomic::AtomicU64;
    static COMMITS: AtomicU64 = AtomicU64::new(0);
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let limit = LIMIT.get_or_init(|| {
        std::env::var("OUTBOX_RELAY_TEST_CRASH_AFTER_COMMITS")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(limit) = limit {
        if COMMITS.fetch_add(1, Ordering::SeqCst) + 1 >= *limit {
            eprintln!("test hook: aborting after a Kafka commit, before confirming the slot");
            std::process::abort();
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Header names on every record.
pub const HEADER_LSN: &str = "outbox-relay.lsn";
pub const HEADER_XID: &str = "outbox-relay.xid";
pub const HEADER_COMMIT_TS: &str = "outbox-relay.commit-ts";

/// Headers of one source transaction's records.
pub fn txn_headers(lsn: Lsn, xid: Option<u32>, commit_time_micros: Option<i64>) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new().insert(Header {
        key: HEADER_LSN,
        value: Some(lsn.to_string().as_bytes()),
    });
    if let Some(xid) = xid {
        headers = headers.insert(Header {
            key: HEADER_XID,
            value: Some(xid.to_string().as_bytes()),
        });
    }
    if let Some(micros) = commit_time_micros {
        // PostgreSQL's epoch is 2000-01-01; Unix time is 946684800 s later.
        let unix_micros = micros.saturating_add(946_684_800_000_000);
        if let Some(ts) = chrono::DateTime::from_timestamp_micros(unix_micros) {
            headers = headers.insert(Header {
                key: HEADER_COMMIT_TS,
                value: Some(
                    ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                        .as_bytes(),
                ),
            });
        }
    }
    headers
}
