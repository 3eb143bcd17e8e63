//! `outbox-relay connector`: the outbox table's inserts, from a logical replication
//! slot (pgoutput) into Kafka, exactly once.
//!
//! The replication side (sessions, slot lifecycle, acknowledgement) is the shared
//! [`crate::pipeline`]; this module is its Kafka [`Destination`]: each outbox row
//! becomes one record (value: the row as JSON, exact; key: `--key-column`; headers:
//! commit LSN, xid, commit time), and a batch of whole source transactions is one
//! Kafka transaction that also writes the progress record (see [`crate::kafka`]).
//!
//! # Invariants
//! 1. `commit`'s future completes only when the batch and its progress record are
//!    committed in Kafka (`acks=all`, `min.insync.replicas=2`); the pipeline confirms
//!    the slot after that, never before. The next batch is encoded meanwhile, but
//!    nothing of it reaches the producer before that commit has returned: one Kafka
//!    transaction holds exactly one batch, and the committed ones are the batches in
//!    order, whichever of the producers that take turns ran each (`producer.rs`).
//! 2. The transactional ids are `outbox-relay-<slot>` and `outbox-relay-<slot>-<n>`
//!    ([`transactional_id`]): a second instance on the same slot fences the first on
//!    all of them, and its open transaction is aborted.
//! 3. The progress record is read back after `init_transactions` on every id, so an
//!    open transaction of a fenced predecessor is resolved before it is read.
//!
//! In `at-least-once` mode there are no Kafka transactions: a batch is durable once
//! every record of it is acknowledged, and a crash may send a batch again (the sink is
//! idempotent). The progress record is still written, but only as the mark that the
//! slot has been used; it is never used to skip.
//!
//! With `--cleanup`, the ids of each committed batch are handed to [`cleanup`], which
//! deletes those rows from the outbox on a connection of its own.

pub mod cleanup;
mod producer;
mod topics;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::message::{Header, OwnedHeaders};
use tokio::sync::watch;

use crate::config::{self, KafkaArgs, SourceArgs};
use crate::error::ErrorClass;
use crate::kafka::{self, TopicSpec};
use crate::lsn::Lsn;
use crate::pipeline::{
    ColumnDef, Committed, Destination, Outbox, Pipeline, PipelineError, StreamArgs, TxnMeta,
};
use crate::progress::{ConfirmGate, ProgressRecord};
use crate::record::txn_headers;
use crate::retry::Backoff;
use crate::route::{self, Bound, Rendered, Route, RouteArgs, RouteSource};

use cleanup::{CleanupArgs, OutboxCleaner, PendingIds};
use producer::{BatchProducer, Partitioning};
pub use producer::{DeliveryMode, TRANSACTIONAL_PRODUCERS};
use topics::Topics;

/// The header a dead letter carries its reason in.
pub const HEADER_ERROR: &str = "outbox-relay.error";

/// Options of `outbox-relay connector`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectorArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The logical replication slot (created if missing, unless --no-create-slot).
    #[arg(long, env = "OUTBOX_RELAY_SLOT", default_value = config::DEFAULT_SLOT)]
    pub slot: String,
    #[command(flatten)]
    pub stream: StreamArgs,
    #[command(flatten)]
    pub route: RouteArgs,
    /// The topic of the rows and messages that cannot be routed (a NULL key or topic
    /// column, a bad payload, a missing topic with --no-create-topics, …), each with
    /// its reason and source position.
    #[arg(long, env = "OUTBOX_RELAY_DEAD_LETTER_TOPIC", default_value = config::DEFAULT_DEAD_LETTER_TOPIC)]
    pub dead_letter_topic: String,
    /// Do not create routed topics that do not exist: their records go to the
    /// dead-letter topic instead.
    #[arg(long)]
    pub no_create_topics: bool,
    /// The progress topics' base name: slot S's last source LSN in Kafka is in the compacted topic `<base>.S`.
    #[arg(long, env = "OUTBOX_RELAY_PROGRESS_TOPIC", default_value = config::DEFAULT_PROGRESS_TOPIC)]
    pub progress_topic: String,
    /// Partitions of the topics the connector creates.
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    /// Replication factor of the topics the connector creates (with 3 or more, they
    /// get min.insync.replicas=2).
    #[arg(long, default_value_t = 3)]
    pub replication_factor: i32,
    /// `transactional` (exactly once into Kafka) or `at-least-once`.
    #[arg(
        long,
        value_enum,
        env = "OUTBOX_RELAY_DELIVERY",
        default_value = "transactional"
    )]
    pub delivery: DeliveryMode,
    /// Least time between the starts of two batch commits, in milliseconds: a bound on
    /// the commit rate, since every Kafka transaction costs the brokers its markers and
    /// transaction-log writes. A full batch does not wait for it [default: 50 in
    /// transactional mode, 0 at-least-once]
    #[arg(long, env = "OUTBOX_RELAY_COMMIT_INTERVAL_MS")]
    pub commit_interval_ms: Option<u64>,
    #[command(flatten)]
    pub transaction_timeout: TransactionTimeout,
    #[command(flatten)]
    pub metrics: crate::metrics::MetricsArgs,
    #[command(flatten)]
    pub cleanup: CleanupArgs,
}

impl ConnectorArgs {
    /// `--commit-interval-ms`, or its default for the delivery mode: 50 ms between
    /// Kafka transactions (20 a second at most, each with its markers and
    /// transaction-log writes), none between at-least-once batches, whose commit costs
    /// nothing but the records' acknowledgements.
    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.commit_interval_ms.unwrap_or(match self.delivery {
            DeliveryMode::Transactional => 50,
            DeliveryMode::AtLeastOnce => 0,
        }))
    }

    /// The routes: the `--route`s, or the one of the one-table flags.
    pub fn routes(&self) -> Result<Vec<Route>, PipelineError> {
        self.route
            .resolve(&self.stream.outbox.table, &self.kafka.topic)
            .map_err(|e| PipelineError::Definite(e.to_string()))
    }
}

/// The producers' `transaction.timeout.ms`: shared by the connector and `check`.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct TransactionTimeout {
    /// The longest a Kafka transaction may stay open, in milliseconds (the producers'
    /// transaction.timeout.ms; at least 300000, at most the brokers'
    /// transaction.max.timeout.ms): a source transaction larger than a batch must stream
    /// into its one Kafka transaction within it (it is never split)
    #[arg(long = "transaction-timeout-ms", default_value_t = 300_000,
          value_parser = clap::value_parser!(u64).range(300_000..))]
    pub transaction_timeout_ms: u64,
}

impl TransactionTimeout {
    pub fn get(self) -> Duration {
        Duration::from_millis(self.transaction_timeout_ms)
    }
}

/// Runs the connector until `stop` turns true or a definite error occurs.
pub async fn run(args: ConnectorArgs, stop: watch::Receiver<bool>) -> Result<(), PipelineError> {
    let routes = args.routes()?;
    crate::route::check_topic_name(&args.dead_letter_topic)
        .map_err(|e| PipelineError::Definite(format!("--dead-letter-topic: {e}")))?;
    for route in &routes {
        tracing::info!(source = %route.source, topic = %route.topic, "route");
    }
    args.metrics
        .start(crate::metrics::CONNECTOR_METRICS)
        .await
        .map_err(PipelineError::Definite)?;
    refuse_unusable_source(&args.source.source_url).await?;
    let mut backoff = Backoff::reconnect();
    let topics = Arc::new(Topics::new(&args));
    // Topics and producer: retried until the brokers answer.
    let unreachable_because = || {
        let brokers = args.kafka.brokers.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                kafka::unreachable_because(&brokers, Duration::from_secs(5))
            })
            .await
            .ok()
            .flatten()
        }
    };
    let producer = loop {
        let mut stopped = stop.clone();
        // Brokers that refuse the relay (a wrong SASL password, an untrusted
        // certificate) or do not answer are named at once: the topic request below
        // would only say so when it times out, 30 s later.
        if let Some(because) = unreachable_because().await {
            tracing::warn!(
                brokers = %args.kafka.brokers,
                unreachable = %because,
                "kafka not ready, retrying"
            );
            tokio::select! {
                _ = backoff.wait() => {}
                _ = stopped.wait_for(|s| *s) => return Ok(()),
            }
            continue;
        }
        let attempt = tokio::select! {
            attempt = setup_kafka(&args, &routes, &topics, stop.clone()) => attempt,
            _ = stopped.wait_for(|s| *s) => return Ok(()),
        };
        match attempt {
            Ok(producer) => break producer,
            Err(error) if error.class() == ErrorClass::Transient => {
                // A timed-out request does not say why; the brokers' own reason does.
                let because = unreachable_because().await;
                tracing::warn!(
                    error = %crate::error::error_chain(&error),
                    brokers = %args.kafka.brokers,
                    unreachable = because.as_deref().unwrap_or("no: they answer metadata"),
                    "kafka not ready, retrying"
                );
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = stopped.wait_for(|s| *s) => return Ok(()),
                }
            }
            Err(error) => return Err(error),
        }
    };
    let outbox = Outbox::of_routes(&routes);
    let pending = args
        .cleanup
        .cleanup
        .then(|| PendingIds::new(args.cleanup.cleanup_max_pending));
    let destination =
        KafkaDestination::new(&args, routes.clone(), producer, topics, pending.clone());
    let mut pipeline = Pipeline::new(
        args.source.source_url.clone(),
        args.slot.clone(),
        args.stream.clone(),
        outbox,
        destination,
        stop,
    )?;
    let Some(pending) = pending else {
        return pipeline.run().await;
    };
    let tables = routes
        .iter()
        .filter_map(|r| match &r.source {
            RouteSource::Table(t) => Some((t.clone(), r.id.clone())),
            RouteSource::Message(_) => None,
        })
        .collect();
    let cleaner = OutboxCleaner::new(
        args.source.source_url.clone(),
        tables,
        &args.cleanup,
        pending,
    );
    let (finish, finished) = watch::channel(false);
    let cleaner = tokio::spawn(cleaner.run(finished));
    let result = pipeline.run().await;
    // The pipeline has made its last batch durable (or failed): delete what it
    // delivered, within a bound, then exit.
    let _ = finish.send(true);
    if let Err(error) = cleaner.await {
        tracing::warn!(%error, "outbox cleanup task ended abnormally");
    }
    result
}

/// Before any topic is created: a pg_start that refuses the connector for good (a
/// wrong password, no such database, an old version, `wal_level` not logical) stops it
/// with what to do, and leaves nothing behind in Kafka. A pg_start that does not answer
/// is the pipeline's to wait for.
async fn refuse_unusable_source(url: &str) -> Result<(), PipelineError> {
    let checks = async {
        let client =
            crate::pg::connect(url)
                .await
                .map_err(|source| crate::source::SourceError::Query {
                    context: format!("connecting to pg_start ({})", crate::pg::redact_url(url)),
                    source,
                })?;
        crate::source::check_version(&client).await?;
        crate::source::check_wal_level(&client).await
    };
    match tokio::time::timeout(crate::pg::CONNECT_TIMEOUT * 2, checks).await {
        Ok(Err(error)) if error.class() == ErrorClass::Definite => Err(error.into()),
        _ => Ok(()),
    }
}

async fn setup_kafka(
    args: &ConnectorArgs,
    routes: &[Route],
    topics: &Topics,
    stop: watch::Receiver<bool>,
) -> Result<BatchProducer, PipelineError> {
    // The literal topics at once (a templated one when its first record comes), the
    // dead-letter topic, which must exist even with --no-create-topics, and the
    // progress topic.
    let literal: Vec<String> = routes
        .iter()
        .filter_map(|r| r.topic.literal().map(str::to_string))
        .collect();
    let progress_topic = kafka::progress_topic_of(&args.progress_topic, &args.slot);
    let topics_ready = async {
        tokio::try_join!(
            topics.ensure(&literal),
            topics.create(&args.dead_letter_topic),
            async {
                kafka::ensure_topic(
                    &args.kafka.brokers,
                    &TopicSpec {
                        name: &progress_topic,
                        partitions: 1,
                        replication_factor: args.replication_factor,
                        // A committed progress record must survive the loss of a
                        // broker, as the records it covers do.
                        configs: if args.replication_factor >= 3 {
                            &[("cleanup.policy", "compact"), ("min.insync.replicas", "2")]
                        } else {
                            &[("cleanup.policy", "compact")]
                        },
                    },
                )
                .await
                .map_err(PipelineError::from)
            },
        )
    };
    let partitioning = if routes.iter().any(|r| r.java_partitioning) {
        Partitioning::Java
    } else {
        Partitioning::Librdkafka
    };
    let (ensured, (), ()) = topics_ready.await?;
    // The producers are made (and fence) only once the session holds the slot
    // (`read_progress`); they learn these topics then. The progress topic takes a
    // record in every batch, the literal topics most of them.
    let mut producer = BatchProducer::new(
        &args.kafka.brokers,
        args.delivery,
        partitioning,
        &args.slot,
        args.transaction_timeout.get(),
        stop,
    );
    let mut known = ensured.learned;
    known.push(progress_topic);
    producer.know_topics(known);
    Ok(producer)
}

/// The transactional id of the slot's producer `turn` (invariant 2):
/// `outbox-relay-<slot>` for the first (the id of the versions with one producer, so
/// that those are fenced too), `outbox-relay-<slot>-<turn>` for the others. A slot name
/// has no `-`, so no two slots' ids collide.
pub fn transactional_id(slot: &str, turn: usize) -> String {
    if turn == 0 {
        format!("outbox-relay-{slot}")
    } else {
        format!("outbox-relay-{slot}-{turn}")
    }
}

/// One record ready for Kafka.
#[derive(Debug, Clone)]
pub struct OutRecord {
    /// Index into [`Batch::topics`].
    pub topic: u32,
    pub key: Option<Bytes>,
    /// `None`: a record without a value (a NULL payload).
    pub value: Option<Bytes>,
    /// Index into [`Batch::headers`]: the source transaction the record came from.
    pub txn: usize,
    /// The route's own headers (and a dead letter's reason), after the transaction's.
    pub headers: Vec<(Box<str>, Option<Bytes>)>,
}

/// Source transactions gathered for one Kafka transaction.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<OutRecord>,
    /// The topics the records go to.
    pub topics: Vec<String>,
    topic_index: HashMap<String, u32>,
    /// One header set per source transaction (commit LSN, xid, commit time).
    pub headers: Vec<OwnedHeaders>,
    /// The commit LSN and xid of each source transaction, for dead letters.
    pub txns: Vec<(Lsn, Option<u32>)>,
    pub value_bytes: usize,
    /// Dead letters in the batch.
    pub dead_letters: u64,
    /// The event id of each delivered table row, with `--cleanup` only: (table, id).
    pub ids: Vec<(usize, String)>,
    /// The source commit time of each source transaction (µs since the Unix epoch),
    /// for the latency histogram once the batch is committed.
    pub commit_times: Vec<i64>,
}

impl Batch {
    /// The index of `topic` in [`Batch::topics`].
    fn topic(&mut self, topic: &str) -> u32 {
        // Most rows go where the one before went.
        if let Some(last) = self.topics.last() {
            if last == topic {
                return self.topics.len() as u32 - 1;
            }
        }
        if let Some(&i) = self.topic_index.get(topic) {
            return i;
        }
        let i = self.topics.len() as u32;
        self.topics.push(topic.to_string());
        self.topic_index.insert(topic.to_string(), i);
        i
    }

    /// Turns the records bound for `missing` topics into dead letters (the topics do
    /// not exist and may not be created).
    fn reroute(&mut self, missing: &[String], dead_letter_topic: &str) {
        let dlq = self.topic(dead_letter_topic);
        let missing: Vec<u32> = missing
            .iter()
            .filter_map(|t| self.topic_index.get(t).copied())
            .collect();
        for record in &mut self.records {
            if !missing.contains(&record.topic) {
                continue;
            }
            let topic = &self.topics[record.topic as usize];
            let reason = format!(
                "topic {topic} does not exist and topic creation is off (--no-create-topics)"
            );
            let (lsn, xid) = self
                .txns
                .get(record.txn)
                .copied()
                .unwrap_or((Lsn::ZERO, None));
            let value = route::dead_letter_value(
                &reason,
                &format!("route to topic {topic}"),
                &lsn.to_string(),
                xid,
                record.value.as_deref().unwrap_or(b"null"),
            );
            self.value_bytes += value.len();
            record.value = Some(Bytes::from(value));
            record.topic = dlq;
            record
                .headers
                .push((HEADER_ERROR.into(), Some(Bytes::from(reason))));
            self.dead_letters += 1;
        }
    }
}

/// How far a [`Batch`] reached at one point: what [`BatchExtent::truncate`] takes it
/// back to.
#[derive(Debug, Clone, Copy, Default)]
struct BatchExtent {
    records: usize,
    ids: usize,
    value_bytes: usize,
    dead_letters: u64,
}

impl BatchExtent {
    fn of(batch: &Batch) -> Self {
        Self {
            records: batch.records.len(),
            ids: batch.ids.len(),
            value_bytes: batch.value_bytes,
            dead_letters: batch.dead_letters,
        }
    }

    /// Drops what `batch` gained since this extent was taken (its header sets are
    /// pushed only when a transaction ends).
    fn truncate(self, batch: &mut Batch) {
        batch.records.truncate(self.records);
        batch.ids.truncate(self.ids);
        batch.value_bytes = self.value_bytes;
        batch.dead_letters = self.dead_letters;
    }
}

/// A table route and, once the table's columns are known, its binding.
struct TableRoute {
    route: Route,
    bound: Option<Bound>,
}

/// The open source transaction.
struct OpenTxn {
    headers: OwnedHeaders,
    lsn: Lsn,
    xid: Option<u32>,
    commit_time_micros: Option<i64>,
    /// Rows of a backfill chunk: sent again, so not handed to the outbox cleanup.
    backfill: bool,
}

/// The Kafka destination of the pipeline.
struct KafkaDestination {
    progress_topic: String,
    dead_letter_topic: String,
    brokers: String,
    mode: DeliveryMode,
    commit_interval: Duration,
    /// Shared with the commit in flight, which holds it until it is done.
    producer: Arc<Mutex<BatchProducer>>,
    /// The topics known to exist, and their creation.
    topics: Arc<Topics>,
    /// Per outbox table (the pipeline's index), its route.
    tables: Vec<TableRoute>,
    /// Per message prefix (the pipeline's index), its route.
    messages: Vec<Route>,
    batch: Batch,
    /// The batch as it was before the open source transaction.
    txn_start: BatchExtent,
    txn: Option<OpenTxn>,
    /// Where committed ids go to be deleted (`--cleanup`), else `None`.
    cleanup: Option<PendingIds>,
}

impl KafkaDestination {
    /// An empty destination of `routes`, producing with `producer`; `cleanup` is where
    /// committed ids go with `--cleanup`.
    fn new(
        args: &ConnectorArgs,
        routes: Vec<Route>,
        producer: BatchProducer,
        topics: Arc<Topics>,
        cleanup: Option<PendingIds>,
    ) -> Self {
        let (mut tables, mut messages) = (Vec::new(), Vec::new());
        for route in routes {
            match route.source {
                RouteSource::Table(_) => tables.push(TableRoute { route, bound: None }),
                RouteSource::Message(_) => messages.push(route),
            }
        }
        Self {
            progress_topic: args.progress_topic.clone(),
            dead_letter_topic: args.dead_letter_topic.clone(),
            brokers: args.kafka.brokers.clone(),
            mode: args.delivery,
            commit_interval: args.commit_interval(),
            producer: Arc::new(Mutex::new(producer)),
            topics,
            tables,
            messages,
            batch: Batch::default(),
            txn_start: BatchExtent::default(),
            txn: None,
            cleanup,
        }
    }
}

/// Adds one rendered row (or message) to the batch; `table` is the outbox table it
/// came from (`None`: a message), `event` the whole of it, for a dead letter.
#[allow(clippy::too_many_arguments)]
fn add(
    batch: &mut Batch,
    cleanup: Option<&PendingIds>,
    txn: Option<&OpenTxn>,
    dead_letter_topic: &str,
    table: Option<usize>,
    rendered: Rendered<'_>,
    source: &str,
    event: &dyn Fn() -> Vec<u8>,
) {
    let txn_index = batch.headers.len();
    match rendered {
        Rendered::Record {
            topic,
            key,
            value,
            headers,
            id,
        } => {
            if let (Some(table), Some(_)) = (table, cleanup) {
                if let Some(id) = id.and_then(|v| std::str::from_utf8(v).ok()) {
                    batch.ids.push((table, id.to_string()));
                }
            }
            let topic = batch.topic(&topic);
            let value = value.map(Bytes::from);
            batch.value_bytes += value.as_ref().map_or(0, Bytes::len);
            batch.records.push(OutRecord {
                topic,
                key: key.map(Bytes::copy_from_slice),
                value,
                txn: txn_index,
                headers: headers
                    .into_iter()
                    .map(|(name, v)| (name.into(), v.map(Bytes::copy_from_slice)))
                    .collect(),
            });
        }
        Rendered::Dead { reason } => {
            dead_letter(batch, txn, dead_letter_topic, &reason, source, &event())
        }
    }
}

/// Adds a dead letter of `event` (the row as JSON, or the message) to the batch.
fn dead_letter(
    batch: &mut Batch,
    txn: Option<&OpenTxn>,
    dead_letter_topic: &str,
    reason: &str,
    source: &str,
    event: &[u8],
) {
    let (lsn, xid) = txn.map_or((Lsn::ZERO, None), |t| (t.lsn, t.xid));
    tracing::warn!(%source, %lsn, reason, "dead letter");
    let value = route::dead_letter_value(reason, source, &lsn.to_string(), xid, event);
    let topic = batch.topic(dead_letter_topic);
    batch.value_bytes += value.len();
    batch.dead_letters += 1;
    batch.records.push(OutRecord {
        topic,
        key: None,
        value: Some(Bytes::from(value)),
        txn: batch.headers.len(),
        headers: vec![(
            HEADER_ERROR.into(),
            Some(Bytes::copy_from_slice(reason.as_bytes())),
        )],
    });
}

impl Destination for KafkaDestination {
    const STAGE: &'static str = "connector";

    fn commit_interval(&self) -> Duration {
        self.commit_interval
    }

    async fn read_progress(&mut self, slot: &str) -> Result<Option<ProgressRecord>, PipelineError> {
        let (brokers, topic, slot) = (
            self.brokers.clone(),
            self.progress_topic.clone(),
            slot.to_string(),
        );
        // Fence first (invariant 3): an open transaction of an earlier instance is
        // aborted before the progress topic is read.
        let producer = Arc::clone(&self.producer);
        let record = tokio::task::spawn_blocking(move || {
            lock(&producer)?
                .fence()
                .map_err(producer::destination_error)?;
            kafka::read_progress(&brokers, &topic, &slot, Duration::from_secs(60))
                .map_err(PipelineError::from)
        })
        .await
        .map_err(|e| PipelineError::Definite(format!("progress reader panicked: {e}")))??;
        lock(&self.producer)?.set_committed(record.clone());
        // At-least-once batches may be partly durable: their progress only marks the
        // slot as used, and never lets a transaction be skipped.
        Ok(match (self.mode, record) {
            (DeliveryMode::AtLeastOnce, Some(mut r)) => {
                r.lsn = Lsn::ZERO.to_string();
                Some(r)
            }
            (_, record) => record,
        })
    }

    async fn stand_by(&mut self) {
        let producer = Arc::clone(&self.producer);
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(mut producer) = producer.lock() {
                producer.release();
            }
        })
        .await;
    }

    fn set_columns(&mut self, table: usize, columns: &[ColumnDef]) -> Result<(), PipelineError> {
        let Some(t) = self.tables.get_mut(table) else {
            return Ok(());
        };
        let bound = t.route.bind(columns);
        if let Some(problem) = bound.unusable() {
            tracing::error!(
                problem,
                "every row of this outbox goes to the dead-letter topic until the route or the table is fixed"
            );
        }
        t.bound = Some(bound);
        Ok(())
    }

    fn begin_txn(&mut self, meta: TxnMeta) {
        self.txn_start = BatchExtent::of(&self.batch);
        self.txn = Some(OpenTxn {
            headers: txn_headers(meta.commit_lsn, meta.xid, meta.commit_time_micros),
            lsn: meta.commit_lsn,
            xid: meta.xid,
            commit_time_micros: meta.commit_time_micros,
            backfill: false,
        });
    }

    fn begin_backfill(&mut self, meta: TxnMeta, id: &str) {
        self.begin_txn(meta);
        if let Some(txn) = &mut self.txn {
            txn.backfill = true;
            txn.headers = std::mem::replace(&mut txn.headers, OwnedHeaders::new()).insert(Header {
                key: crate::record::HEADER_BACKFILL,
                value: Some(id.as_bytes()),
            });
        }
    }

    fn row(&mut self, table: usize, values: &[Option<&[u8]>]) {
        let Self {
            tables,
            batch,
            cleanup,
            txn,
            dead_letter_topic,
            ..
        } = self;
        let Some(bound) = tables.get(table).and_then(|t| t.bound.as_ref()) else {
            return;
        };
        let rendered = bound.render(values, None);
        // A backfill's rows were delivered before (or are by the stream): the cleanup
        // deletes what the stream delivers.
        let cleanup = cleanup
            .as_ref()
            .filter(|_| !txn.as_ref().is_some_and(|t| t.backfill));
        add(
            batch,
            cleanup,
            txn.as_ref(),
            dead_letter_topic,
            Some(table),
            rendered,
            bound.source(),
            &|| bound.row_json(values),
        );
    }

    fn message(&mut self, prefix: usize, content: &[u8], transactional: bool) {
        let Self {
            messages,
            batch,
            cleanup,
            txn,
            dead_letter_topic,
            ..
        } = self;
        let Some(route) = messages.get(prefix) else {
            return;
        };
        let source = route.source.to_string();
        if !transactional {
            let reason = "a non-transactional logical message: only \
                          pg_logical_emit_message(true, …) is relayed, inside the transaction \
                          that makes the change";
            dead_letter(
                batch,
                txn.as_ref(),
                dead_letter_topic,
                reason,
                &source,
                content,
            );
            return;
        }
        match route::message_row(content) {
            Ok((columns, values)) => {
                let bound = route.bind(&columns);
                let refs: Vec<Option<&[u8]>> = values.iter().map(|v| v.as_deref()).collect();
                let rendered = bound.render(&refs, Some(content));
                add(
                    batch,
                    cleanup.as_ref(),
                    txn.as_ref(),
                    dead_letter_topic,
                    None,
                    rendered,
                    &source,
                    &|| content.to_vec(),
                );
            }
            Err(reason) => dead_letter(
                batch,
                txn.as_ref(),
                dead_letter_topic,
                &reason,
                &source,
                content,
            ),
        }
    }

    fn delivered_row(&mut self, table: usize, values: &[Option<&[u8]>], end_lsn: Lsn) {
        let (Some(pending), Some(bound)) = (
            &self.cleanup,
            self.tables.get(table).and_then(|t| t.bound.as_ref()),
        ) else {
            return;
        };
        if let Some(id) = bound
            .id_of(values)
            .and_then(|v| std::str::from_utf8(v).ok())
        {
            pending.push(end_lsn, vec![(table, id.to_string())]);
        }
    }

    fn confirm_gate(&self) -> Option<ConfirmGate> {
        self.cleanup.as_ref().map(PendingIds::gate)
    }

    fn end_txn(&mut self) {
        if let Some(txn) = self.txn.take() {
            self.batch.headers.push(txn.headers);
            self.batch.txns.push((txn.lsn, txn.xid));
            self.batch.commit_times.extend(
                txn.commit_time_micros
                    .and_then(crate::pgoutput::unix_micros),
            );
        }
    }

    fn discard_txn(&mut self) {
        self.txn_start.truncate(&mut self.batch);
        self.txn = None;
    }

    fn batch_size(&self) -> (usize, usize) {
        (self.batch.records.len(), self.batch.value_bytes)
    }

    fn spill(&mut self) -> impl Future<Output = Result<(), PipelineError>> + Send + 'static {
        let mut batch = std::mem::take(&mut self.batch);
        // The open transaction's records point at the header set it gets when it ends.
        if let Some(txn) = &self.txn {
            batch.headers.push(txn.headers.clone());
            batch.txns.push((txn.lsn, txn.xid));
        }
        // The ids are deleted, and the latencies recorded, only once the commit has
        // made the batch durable.
        self.batch.ids = std::mem::take(&mut batch.ids);
        self.batch.commit_times = std::mem::take(&mut batch.commit_times);
        self.txn_start = BatchExtent::of(&self.batch);
        let send = self.send(batch, |producer, batch| producer.spill(batch));
        async move { send.await.map(drop) }
    }

    async fn abandon(&mut self) {
        let producer = Arc::clone(&self.producer);
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(mut producer) = producer.lock() {
                producer.abandon();
            }
        })
        .await;
    }

    fn clear(&mut self) {
        self.batch = Batch::default();
        self.txn_start = BatchExtent::default();
        self.txn = None;
    }

    fn commit(
        &mut self,
        slot: &str,
        progress: &ProgressRecord,
    ) -> impl Future<Output = Result<Committed, PipelineError>> + Send + 'static {
        let batch = std::mem::take(&mut self.batch);
        let progress_topic = self.progress_topic.clone();
        let (slot, progress) = (slot.to_string(), progress.clone());
        let cleanup = self.cleanup.clone();
        let lsn = progress.lsn().unwrap_or(Lsn::ZERO);
        let send = self.send(batch, move |producer, batch| {
            producer.commit(batch, &progress_topic, &slot, &progress)
        });
        async move {
            let batch = send.await?;
            crate::metrics::record_latencies(Self::STAGE, &batch.commit_times);
            // Only now, after the Kafka commit, may the rows be deleted.
            if let Some(pending) = cleanup {
                pending.push(lsn, batch.ids);
            }
            Ok(Committed::DURABLE)
        }
    }
}

impl KafkaDestination {
    /// The work that hands `batch` to the producer with `hand` (a commit or a spill):
    /// its topics made sure of first (the records of one that may not be created become
    /// dead letters), then `hand` on a blocking thread; returns the batch once handed.
    fn send(
        &self,
        mut batch: Batch,
        hand: impl FnOnce(&mut BatchProducer, &Batch) -> Result<(), producer::FlushError>
            + Send
            + 'static,
    ) -> impl Future<Output = Result<Batch, PipelineError>> + Send + 'static {
        let dead_letter_topic = self.dead_letter_topic.clone();
        let producer = Arc::clone(&self.producer);
        let topics = Arc::clone(&self.topics);
        async move {
            let ensured = topics.ensure(&batch.topics).await?;
            if !ensured.missing.is_empty() {
                batch.reroute(&ensured.missing, &dead_letter_topic);
            }
            let batch = tokio::task::spawn_blocking(move || {
                let mut producer = lock(&producer)?;
                producer.learn_topics(&ensured.learned);
                producer.know_topics(ensured.learned);
                hand(&mut producer, &batch).map_err(producer::destination_error)?;
                Ok::<_, PipelineError>(batch)
            })
            .await
            .map_err(|e| PipelineError::Definite(format!("the kafka producer panicked: {e}")))??;
            if batch.dead_letters > 0 {
                ::metrics::counter!(crate::metrics::DEAD_LETTERS, "stage" => "connector")
                    .increment(batch.dead_letters);
            }
            Ok(batch)
        }
    }
}

/// The pipeline sees the Kafka set-up's failures as its destination's, with their class.
impl From<kafka::KafkaSetupError> for PipelineError {
    fn from(error: kafka::KafkaSetupError) -> Self {
        PipelineError::Destination {
            context: "kafka".into(),
            class: error.class(),
            source: Box::new(error),
        }
    }
}

fn lock(
    producer: &Mutex<BatchProducer>,
) -> Result<std::sync::MutexGuard<'_, BatchProducer>, PipelineError> {
    producer
        .lock()
        .map_err(|_| PipelineError::Definite("the kafka producer was poisoned by a panic".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers as _;

    /// The connector's options from its command line.
    fn parse(args: &[&str]) -> ConnectorArgs {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            args: ConnectorArgs,
        }
        let command_line = std::iter::once("connector").chain(args.iter().copied());
        <Command as clap::Parser>::try_parse_from(command_line)
            .unwrap()
            .args
    }

    /// An at-least-once destination with `--cleanup`, from a command line: its
    /// producer connects lazily, so no broker is needed.
    fn destination() -> KafkaDestination {
        let args = parse(&[
            "--brokers",
            "127.0.0.1:1",
            "--delivery",
            "at-least-once",
            "--cleanup",
        ]);
        let (_, stop) = watch::channel(false);
        let producer = BatchProducer::new(
            &args.kafka.brokers,
            args.delivery,
            Partitioning::Librdkafka,
            "unused",
            args.transaction_timeout.get(),
            stop,
        );
        let routes = args.routes().unwrap();
        let topics = Arc::new(Topics::new(&args));
        let mut d =
            KafkaDestination::new(&args, routes, producer, topics, Some(PendingIds::new(100)));
        let column = |name: &str, type_oid| ColumnDef {
            name: name.into(),
            type_oid,
            key: name == "id",
        };
        d.set_columns(0, &[column("id", 20), column("account_id", 20)])
            .unwrap();
        d
    }

    /// One source transaction of one row.
    fn txn(d: &mut KafkaDestination, lsn: u64, id: &str) {
        d.begin_txn(TxnMeta {
            commit_lsn: Lsn(lsn),
            xid: Some(lsn as u32),
            commit_time_micros: None,
        });
        d.row(0, &[Some(id.as_bytes()), Some(b"7")]);
    }

    #[test]
    fn kafka_transactions_are_spaced_by_default_and_at_least_once_batches_are_not() {
        let interval = |args: &[&str]| parse(args).commit_interval();
        assert_eq!(interval(&[]), Duration::from_millis(50));
        assert_eq!(interval(&["--delivery", "at-least-once"]), Duration::ZERO);
        assert_eq!(
            interval(&["--commit-interval-ms", "0"]),
            Duration::ZERO,
            "an explicit interval overrides the mode's default"
        );
        assert_eq!(
            interval(&["--delivery", "at-least-once", "--commit-interval-ms", "30"]),
            Duration::from_millis(30)
        );
    }

    #[test]
    fn a_new_session_starts_from_an_empty_batch() {
        let mut d = destination();
        // What a broken session leaves behind: a complete transaction and an open one.
        txn(&mut d, 100, "1");
        d.end_txn();
        txn(&mut d, 200, "2");
        assert_eq!(d.batch.records.len(), 2);

        d.clear();
        assert_eq!(d.batch_size(), (0, 0));

        // The next session's transactions are the batch, alone: records, the header
        // set each points at, and the ids the cleanup deletes once they are durable.
        txn(&mut d, 300, "3");
        d.end_txn();
        let after_one = d.batch_size();
        txn(&mut d, 400, "4");
        d.discard_txn();
        assert_eq!(d.batch_size(), after_one);
        assert_eq!(d.batch.records.len(), 1);
        assert_eq!(d.batch.records[0].txn, 0);
        assert_eq!(d.batch.headers.len(), 1);
        let lsn = d.batch.headers[0]
            .iter()
            .find(|h| h.key == crate::record::HEADER_LSN)
            .and_then(|h| h.value);
        assert_eq!(lsn, Some(Lsn(300).to_string().as_bytes()));
        assert_eq!(d.batch.ids, [(0, "3".to_string())]);
    }

    #[test]
    fn a_spill_leaves_an_empty_batch_whose_later_records_carry_the_open_transaction_s_headers() {
        let mut d = destination();
        txn(&mut d, 100, "1");
        d.end_txn();
        txn(&mut d, 200, "2");
        d.row(0, &[Some(b"3"), Some(b"7")]);
        // What the spill takes: both transactions' records, each pointing at its own
        // header set (the open one's pushed for it by the spill).
        assert_eq!(
            d.batch.records.iter().map(|r| r.txn).collect::<Vec<_>>(),
            [0, 1, 1]
        );
        drop(d.spill());
        assert_eq!(d.batch_size(), (0, 0));
        assert!(d.batch.headers.is_empty() && d.batch.records.is_empty());
        // The ids wait for the commit that makes them durable.
        assert_eq!(d.batch.ids.len(), 3);

        // The rest of the open transaction: its records point at the header set it
        // gets when it ends, the first of the emptied batch.
        d.row(0, &[Some(b"4"), Some(b"7")]);
        d.end_txn();
        assert_eq!(d.batch.records.len(), 1);
        assert_eq!(d.batch.records[0].txn, 0);
        let lsn = d.batch.headers[0]
            .iter()
            .find(|h| h.key == crate::record::HEADER_LSN)
            .and_then(|h| h.value);
        assert_eq!(lsn, Some(Lsn(200).to_string().as_bytes()));
        assert_eq!(d.batch.ids.len(), 4);
        // A transaction abandoned after a spill drops only what came after it.
        txn(&mut d, 300, "5");
        drop(d.spill());
        d.row(0, &[Some(b"6"), Some(b"7")]);
        d.discard_txn();
        assert_eq!(d.batch_size(), (0, 0));
    }

    #[test]
    fn rows_that_cannot_be_routed_are_dead_letters_in_the_same_batch() {
        let mut d = destination();
        d.begin_txn(TxnMeta {
            commit_lsn: Lsn(500),
            xid: Some(9),
            commit_time_micros: None,
        });
        d.row(0, &[Some(b"1"), Some(b"7")]);
        // A NULL key: a dead letter with the whole row and the source position.
        d.row(0, &[Some(b"2"), None]);
        d.end_txn();
        assert_eq!(d.batch.records.len(), 2);
        assert_eq!(d.batch.dead_letters, 1);
        let letter = &d.batch.records[1];
        assert_eq!(
            d.batch.topics[letter.topic as usize],
            config::DEFAULT_DEAD_LETTER_TOPIC
        );
        let value: serde_json::Value =
            serde_json::from_slice(letter.value.as_deref().unwrap()).unwrap();
        assert_eq!(value["reason"], "the key column is NULL");
        assert_eq!(value["lsn"], Lsn(500).to_string());
        assert_eq!(value["xid"], 9);
        assert_eq!(value["event"]["id"], 2);
        assert_eq!(&*letter.headers[0].0, HEADER_ERROR);

        // A topic that may not be created: its records become dead letters too.
        let mut batch = std::mem::take(&mut d.batch);
        batch.reroute(
            &[config::DEFAULT_TOPIC.to_string()],
            config::DEFAULT_DEAD_LETTER_TOPIC,
        );
        assert_eq!(batch.dead_letters, 2);
        let first: serde_json::Value =
            serde_json::from_slice(batch.records[0].value.as_deref().unwrap()).unwrap();
        assert!(first["reason"].as_str().unwrap().contains("does not exist"));
        assert_eq!(first["event"]["account_id"], 7);
    }
}
