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

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::message::OwnedHeaders;
use tokio::sync::watch;

use crate::config::{self, KafkaArgs, SourceArgs};
use crate::error::ErrorClass;
use crate::kafka::{self, TopicSpec};
use crate::lsn::Lsn;
use crate::pipeline::{
    ColumnDef, Committed, Destination, Pipeline, PipelineError, StreamArgs, TxnMeta,
};
use crate::progress::ProgressRecord;
use crate::record::encode::{self, ColumnSpec};
use crate::record::txn_headers;
use crate::retry::Backoff;
use crate::source::TableName;

use cleanup::{CleanupArgs, OutboxCleaner, PendingIds};
use producer::BatchProducer;
pub use producer::{DeliveryMode, TRANSACTIONAL_PRODUCERS};

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
    /// The column whose value is the Kafka record key (one key's records stay in order).
    #[arg(long, env = "OUTBOX_RELAY_KEY_COLUMN", default_value = "account_id")]
    pub key_column: String,
    /// The compacted topic holding the last source LSN in Kafka, per slot.
    #[arg(long, env = "OUTBOX_RELAY_PROGRESS_TOPIC", default_value = config::DEFAULT_PROGRESS_TOPIC)]
    pub progress_topic: String,
    /// Partitions of the topic when the connector creates it.
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
    /// Replication factor of the topics the connector creates.
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
}

/// Runs the connector until `stop` turns true or a definite error occurs.
pub async fn run(args: ConnectorArgs, stop: watch::Receiver<bool>) -> Result<(), PipelineError> {
    args.metrics
        .start(crate::metrics::CONNECTOR_METRICS)
        .await
        .map_err(PipelineError::Definite)?;
    let mut backoff = Backoff::reconnect();
    // Topics and producer: retried until the brokers answer.
    let producer = loop {
        match setup_kafka(&args, stop.clone()).await {
            Ok(producer) => break producer,
            Err(error) if error.class() == ErrorClass::Transient && !*stop.borrow() => {
                tracing::warn!(error = %crate::error::error_chain(&error), "kafka not ready, retrying");
                backoff.wait().await;
            }
            Err(error) => return Err(error),
        }
    };
    let pending = args
        .cleanup
        .cleanup
        .then(|| PendingIds::new(args.cleanup.cleanup_max_pending));
    let destination = KafkaDestination::new(&args, producer, pending.clone());
    let mut pipeline = Pipeline::new(
        args.source.source_url.clone(),
        args.slot.clone(),
        args.stream.clone(),
        destination,
        stop,
    )?;
    let Some(pending) = pending else {
        return pipeline.run().await;
    };
    let table = TableName::parse(&args.stream.outbox.table)
        .map_err(|e| PipelineError::Definite(format!("--table: {e}")))?;
    let cleaner = OutboxCleaner::new(
        args.source.source_url.clone(),
        table,
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

async fn setup_kafka(
    args: &ConnectorArgs,
    stop: watch::Receiver<bool>,
) -> Result<BatchProducer, PipelineError> {
    kafka::ensure_topic(
        &args.kafka.brokers,
        &TopicSpec {
            name: &args.kafka.topic,
            partitions: args.partitions,
            replication_factor: args.replication_factor,
            // An acknowledged record must survive the loss of a broker.
            configs: if args.replication_factor >= 3 {
                &[("min.insync.replicas", "2")]
            } else {
                &[]
            },
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
    let (brokers, slot) = (args.kafka.brokers.clone(), args.slot.clone());
    let mode = args.delivery;
    tokio::task::spawn_blocking(move || BatchProducer::new(&brokers, mode, &slot, stop))
        .await
        .map_err(|e| PipelineError::Definite(format!("producer setup panicked: {e}")))?
        .map_err(producer::destination_error)
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
    /// The `--id-column` value of each record, with `--cleanup` only.
    pub ids: Vec<String>,
}

/// How far a [`Batch`] reached at one point: what [`BatchExtent::truncate`] takes it
/// back to.
#[derive(Debug, Clone, Copy, Default)]
struct BatchExtent {
    records: usize,
    ids: usize,
    value_bytes: usize,
}

impl BatchExtent {
    fn of(batch: &Batch) -> Self {
        Self {
            records: batch.records.len(),
            ids: batch.ids.len(),
            value_bytes: batch.value_bytes,
        }
    }

    /// Drops what `batch` gained since this extent was taken (its header sets are
    /// pushed only when a transaction ends).
    fn truncate(self, batch: &mut Batch) {
        batch.records.truncate(self.records);
        batch.ids.truncate(self.ids);
        batch.value_bytes = self.value_bytes;
    }
}

/// The Kafka destination of the pipeline.
struct KafkaDestination {
    topic: String,
    progress_topic: String,
    brokers: String,
    key_column: String,
    mode: DeliveryMode,
    commit_interval: Duration,
    /// Shared with the commit in flight, which holds it until it is done.
    producer: Arc<Mutex<BatchProducer>>,
    /// How each column of the outbox is rendered.
    columns: Vec<ColumnSpec>,
    key_index: Option<usize>,
    batch: Batch,
    /// The batch as it was before the open source transaction.
    txn_start: BatchExtent,
    txn_headers: Option<OwnedHeaders>,
    /// The column that identifies an outbox row, for the cleanup.
    id_column: String,
    id_index: Option<usize>,
    /// Where committed ids go to be deleted (`--cleanup`), else `None`.
    cleanup: Option<PendingIds>,
}

impl KafkaDestination {
    /// An empty destination of `args`' topics, producing with `producer`; `cleanup`
    /// is where committed ids go with `--cleanup`.
    fn new(args: &ConnectorArgs, producer: BatchProducer, cleanup: Option<PendingIds>) -> Self {
        Self {
            topic: args.kafka.topic.clone(),
            progress_topic: args.progress_topic.clone(),
            brokers: args.kafka.brokers.clone(),
            key_column: args.key_column.clone(),
            mode: args.delivery,
            commit_interval: args.commit_interval(),
            producer: Arc::new(Mutex::new(producer)),
            columns: Vec::new(),
            key_index: None,
            batch: Batch::default(),
            txn_start: BatchExtent::default(),
            txn_headers: None,
            id_column: args.cleanup.id_column.clone(),
            id_index: None,
            cleanup,
        }
    }
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
        let record = tokio::task::spawn_blocking(move || {
            kafka::read_progress(&brokers, &topic, &slot, Duration::from_secs(60))
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

    fn set_columns(&mut self, columns: &[ColumnDef]) -> Result<(), PipelineError> {
        self.key_index = columns.iter().position(|c| c.name == self.key_column);
        if self.key_index.is_none() {
            return Err(PipelineError::Definite(format!(
                "--key-column {} is not a column of the outbox table",
                self.key_column
            )));
        }
        self.id_index = columns.iter().position(|c| c.name == self.id_column);
        if self.cleanup.is_some() && self.id_index.is_none() {
            return Err(PipelineError::Definite(format!(
                "--id-column {} is not a column of the outbox table (needed by --cleanup)",
                self.id_column
            )));
        }
        self.columns = columns
            .iter()
            .map(|c| ColumnSpec::new(&c.name, c.type_oid))
            .collect();
        Ok(())
    }

    fn begin_txn(&mut self, meta: TxnMeta) {
        self.txn_start = BatchExtent::of(&self.batch);
        self.txn_headers = Some(txn_headers(
            meta.commit_lsn,
            meta.xid,
            meta.commit_time_micros,
        ));
    }

    fn row(&mut self, values: &[Option<&[u8]>]) {
        let mut value = Vec::with_capacity(128);
        encode::encode_row(&mut value, &self.columns, values.iter().copied());
        let key = self
            .key_index
            .and_then(|k| values.get(k).copied().flatten())
            .map(Bytes::copy_from_slice);
        if self.cleanup.is_some() {
            // A NULL or non-text id cannot be matched: that row stays.
            if let Some(id) = self
                .id_index
                .and_then(|i| values.get(i).copied().flatten())
                .and_then(|v| std::str::from_utf8(v).ok())
            {
                self.batch.ids.push(id.to_string());
            }
        }
        self.batch.value_bytes += value.len();
        self.batch.records.push(OutRecord {
            key,
            value: Bytes::from(value),
            txn: self.batch.headers.len(),
        });
    }

    fn end_txn(&mut self) {
        if let Some(headers) = self.txn_headers.take() {
            self.batch.headers.push(headers);
        }
    }

    fn discard_txn(&mut self) {
        self.txn_start.truncate(&mut self.batch);
        self.txn_headers = None;
    }

    fn batch_size(&self) -> (usize, usize) {
        (self.batch.records.len(), self.batch.value_bytes)
    }

    fn clear(&mut self) {
        self.batch = Batch::default();
        self.txn_start = BatchExtent::default();
        self.txn_headers = None;
    }

    fn commit(
        &mut self,
        slot: &str,
        progress: &ProgressRecord,
    ) -> impl Future<Output = Result<Committed, PipelineError>> + Send + 'static {
        let batch = std::mem::take(&mut self.batch);
        let (topic, progress_topic) = (self.topic.clone(), self.progress_topic.clone());
        let (slot, progress) = (slot.to_string(), progress.clone());
        let producer = Arc::clone(&self.producer);
        let cleanup = self.cleanup.clone();
        async move {
            let batch = tokio::task::spawn_blocking(move || {
                lock(&producer)?
                    .commit(&topic, &batch, &progress_topic, &slot, &progress)
                    .map_err(producer::destination_error)?;
                Ok::<_, PipelineError>(batch)
            })
            .await
            .map_err(|e| PipelineError::Definite(format!("kafka commit panicked: {e}")))??;
            // Only now, after the Kafka commit, may the rows be deleted.
            if let Some(pending) = cleanup {
                pending.push(batch.ids);
            }
            Ok(Committed::DURABLE)
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
        let producer =
            BatchProducer::new(&args.kafka.brokers, args.delivery, "unused", stop).unwrap();
        let mut d = KafkaDestination::new(&args, producer, Some(PendingIds::new(100)));
        let column = |name: &str, type_oid| ColumnDef {
            name: name.into(),
            type_oid,
        };
        d.set_columns(&[column("id", 20), column("account_id", 20)])
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
        d.row(&[Some(id.as_bytes()), Some(b"7")]);
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
        assert_eq!(d.batch.ids, ["3"]);
    }
}
