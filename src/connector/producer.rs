//! The Kafka side of the connector: it makes a batch durable, either in one Kafka
//! transaction (with the progress record) or, at-least-once, by waiting for every
//! record's `acks=all` acknowledgement.
//!
//! Transactional batches take turns on [`TRANSACTIONAL_PRODUCERS`] producers, one
//! transactional id each. One id cannot begin its next transaction until the
//! coordinator has written the previous one's commit markers: librdkafka's
//! `AddPartitionsToTxn` is refused with `CONCURRENT_TRANSACTIONS` and retried every
//! 20 ms, which made one id's cycle ~65 ms here (`scripts/bench.d/notes.md`). Taking
//! turns gives each id the other ids' turns to finish its markers in.
//!
//! Invariants:
//! 1. [`BatchProducer::commit`] returns `Ok` only when every record of the batch is
//!    durable in Kafka; on any doubt it retries the whole batch (an aborted Kafka
//!    transaction is invisible to `read_committed` readers).
//! 2. A batch's transaction begins only after the previous batch's `commit_transaction`
//!    has returned, whichever producer ran it: the committed transactions are the
//!    batches in order with no gap, each with its progress record, exactly as with one
//!    producer. Taking turns overlaps one id's commit markers with the next batches,
//!    never two open transactions.
//! 3. A retry never runs on the producer whose attempt failed: it runs on a new one
//!    (a new epoch), because the broker deduplicates by (producer, epoch, sequence)
//!    and would otherwise take retried records for the failed attempt's (see
//!    [`BatchProducer::recreate`]).
//! 4. Every transactional id is initialised (fenced) before the progress record is
//!    read back, at start and at each retry: no other instance can commit on any of
//!    them in between (see [`BatchProducer::recreate`]).
//! 5. A batch spilled by a source transaction larger than a batch
//!    ([`BatchProducer::spill`]) is sent into a transaction left open; the next
//!    `commit` completes it with the rest and the progress record, in one attempt: its
//!    spilled records are no longer held, so a failure is never retried in place. It
//!    aborts, and the session ends: the next one fences (aborting anything left open)
//!    and reads the progress back, and the slot sends the source transaction again.
//!    A transaction that outlived `transaction.timeout.ms` is a definite error that
//!    names the setting to raise; a source transaction is never split to fit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Header;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use thiserror::Error;
use tokio::sync::watch;

use super::{transactional_id, Batch, OutRecord};
use crate::error::kafka::ProducerFailure;
use crate::error::{self, ErrorClass};
use crate::kafka;
use crate::pipeline::PipelineError;
use crate::progress::ProgressRecord;
use crate::retry::Backoff;

/// How batches are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeliveryMode {
    /// One Kafka transaction per batch, with the progress record: exactly once.
    Transactional,
    /// Idempotent producer, acks=all, no transactions: duplicates after a crash.
    AtLeastOnce,
}

#[derive(Debug, Error)]
pub enum FlushError {
    /// Transient: the session ends, and the next one finds out who holds the slot. An
    /// instance fences only once it holds the slot, but its `init_transactions` can
    /// complete after it lost the slot (a Kafka outage drew the call out while pg_start
    /// ended its walsender, and the standby took the slot and fenced first): the
    /// instance that holds the slot is then the fenced one. Stopping would leave no
    /// instance streaming until something restarted it; ending the session lets the
    /// slot decide again (the holder stands by if the other now holds it, or takes it
    /// back and fences on its next start, which reads the progress record after).
    #[error(
        "another connector initialised transactional.id {0} after this one (this instance \
         was fenced): the session ends, and this instance stands by while the other holds \
         the slot, or takes the slot back and fences it in turn"
    )]
    Fenced(String),
    #[error("the producer hit a fatal error")]
    Fatal(#[source] KafkaError),
    #[error("kafka producer setup failed")]
    Setup(#[source] KafkaError),
    #[error(
        "the Kafka transaction a source transaction larger than a batch was streamed into \
         failed ({0}); it is aborted, and the slot sends the source transaction again"
    )]
    Spilled(#[source] KafkaError),
    #[error(
        "a source transaction took {elapsed:?} to stream into one Kafka transaction, past the \
         producers' transaction timeout ({timeout:?}), and the brokers aborted it. It is \
         never split: raise --transaction-timeout-ms (at most the brokers' \
         transaction.max.timeout.ms, 900000 by default; `outbox-relay check` shows both) so \
         that it covers the largest source transaction"
    )]
    TransactionTooLong {
        elapsed: Duration,
        timeout: Duration,
    },
    #[error("stopping")]
    Stopped,
}

impl FlushError {
    pub fn class(&self) -> ErrorClass {
        match self {
            FlushError::Setup(_) | FlushError::TransactionTooLong { .. } => ErrorClass::Definite,
            FlushError::Fenced(_)
            | FlushError::Fatal(_)
            | FlushError::Spilled(_)
            | FlushError::Stopped => ErrorClass::Transient,
        }
    }
}

/// Counts records enqueued and their delivery reports, so that the at-least-once
/// mode waits for exactly its records' acknowledgements and sends a batch with a lost
/// record again.
///
/// The wait is on a condition variable signalled by the delivery callback (run by
/// the `ThreadedProducer`'s polling thread), not on `flush`: rust-rdkafka's `flush`
/// polls for up to 100 ms at a time, and when the polling thread has already served
/// the last report it sleeps those 100 ms for nothing, once per wait.
///
/// The counts are atomics, and the callback signals only when the reports have caught
/// up with the records enqueued: a signal per report cost a lock and a `futex` call
/// per record, thousands per Kafka transaction. No wake-up is lost: the waiter checks
/// the counts holding `lock` and releases it only inside the wait, and the callback
/// takes `lock` after counting and before signalling, so it signals either before the
/// check (which then sees the count) or while the waiter waits.
#[derive(Default)]
pub struct DeliveryCounter {
    failed: AtomicU64,
    enqueued: AtomicU64,
    reported: AtomicU64,
    lock: Mutex<()>,
    report: Condvar,
}

impl DeliveryCounter {
    /// Waits until every record enqueued so far has its delivery report, at most
    /// `timeout`; `false` if some are still outstanding.
    fn wait_reported(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.caught_up() {
                return true;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = self
                .report
                .wait_timeout(guard, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Counts one delivery report; signals the waiter once the reports have caught up.
    fn count_report(&self) {
        self.reported.fetch_add(1, Ordering::SeqCst);
        if self.caught_up() {
            drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
            self.report.notify_all();
        }
    }

    fn caught_up(&self) -> bool {
        self.reported.load(Ordering::SeqCst) >= self.enqueued.load(Ordering::SeqCst)
    }
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.failed.fetch_add(1, Ordering::SeqCst);
            tracing::debug!(%error, "record delivery failed");
        }
        self.count_report();
    }
}

/// Transactional producers taking turns (see the module doc). A constant, not an
/// option: an instance must fence every id an earlier instance may have used.
pub const TRANSACTIONAL_PRODUCERS: usize = 4;

/// Where the producers put a keyed record (see [`crate::route::Route::java_partitioning`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partitioning {
    /// librdkafka's default: CRC32 of the key.
    Librdkafka,
    /// Kafka's Java client's: murmur2 of the key (librdkafka's `murmur2_random`).
    Java,
}

pub struct BatchProducer {
    brokers: String,
    mode: DeliveryMode,
    partitioning: Partitioning,
    /// The slot, which names the transactional ids ([`transactional_id`]).
    slot: String,
    /// One producer at-least-once, [`TRANSACTIONAL_PRODUCERS`] transactional; none
    /// before [`BatchProducer::fence`], while standing by, and after a failed
    /// replacement.
    producers: Vec<ThreadedProducer<DeliveryCounter>>,
    /// Topics every new producer learns before its first batch.
    known_topics: Vec<String>,
    /// The producer of the next batch.
    turn: usize,
    stop: watch::Receiver<bool>,
    /// The last progress record this instance made durable, or read back when its
    /// session began (see [`BatchProducer::recreate`] and
    /// [`BatchProducer::commit_acks`]).
    committed: Option<ProgressRecord>,
    /// Since when a spilled batch's transaction is open (invariant 5).
    spilled: Option<std::time::Instant>,
    /// The open spilled transaction has been warned about (half its timeout gone).
    spill_warned: bool,
    /// The producers' `transaction.timeout.ms`.
    transaction_timeout: Duration,
}

/// Longest wait of [`BatchProducer::learn_topics`].
const LEARN_TOPICS_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound of one Kafka call; a broker outage is retried in a loop around it, which
/// looks at the stop signal between calls: a SIGTERM is seen within this bound
/// whatever is down.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

impl BatchProducer {
    /// A producer with no Kafka producers yet: nothing is fenced before
    /// [`BatchProducer::fence`], which the session calls once it holds the slot.
    pub fn new(
        brokers: &str,
        mode: DeliveryMode,
        partitioning: Partitioning,
        slot: &str,
        transaction_timeout: Duration,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            brokers: brokers.to_string(),
            mode,
            partitioning,
            slot: slot.to_string(),
            producers: Vec::new(),
            known_topics: Vec::new(),
            turn: 0,
            stop,
            committed: None,
            spilled: None,
            spill_warned: false,
            transaction_timeout,
        }
    }

    /// Creates a new set of producers; in transactional mode, `init_transactions`
    /// fences any earlier instance (or this one's earlier set) with the same
    /// transactional ids and resolves its open transactions. The new set replaces the
    /// old one only once it is whole; if building it fails, the old one is dropped
    /// anyway (part of the new set may have fenced it) and the next commit builds
    /// again. Blocking.
    pub fn fence(&mut self) -> Result<(), FlushError> {
        let old = std::mem::take(&mut self.producers);
        // New epochs abort whatever was left open, a spilled transaction too.
        self.spilled = None;
        let new = Self::create_all(
            &self.brokers,
            self.mode,
            self.partitioning,
            &self.slot,
            self.transaction_timeout,
            &self.stop,
        )?;
        self.producers = new;
        self.turn = 0;
        drop(old);
        self.learn_topics(&self.known_topics);
        Ok(())
    }

    /// Drops the producers (standing by: this instance must not fence the active one).
    pub fn release(&mut self) {
        self.producers.clear();
        self.spilled = None;
    }

    /// The mode's producers, created in parallel: each `init_transactions` is a round
    /// trip to its coordinator, and waits out the brokers in an outage.
    fn create_all(
        brokers: &str,
        mode: DeliveryMode,
        partitioning: Partitioning,
        slot: &str,
        transaction_timeout: Duration,
        stop: &watch::Receiver<bool>,
    ) -> Result<Vec<ThreadedProducer<DeliveryCounter>>, FlushError> {
        let count = match mode {
            DeliveryMode::Transactional => TRANSACTIONAL_PRODUCERS,
            DeliveryMode::AtLeastOnce => 1,
        };
        std::thread::scope(|scope| {
            let created: Vec<_> = (0..count)
                .map(|turn| {
                    scope.spawn(move || {
                        Self::create(
                            brokers,
                            mode,
                            partitioning,
                            &transactional_id(slot, turn),
                            transaction_timeout,
                            stop,
                        )
                    })
                })
                .collect();
            created
                .into_iter()
                .map(|handle| {
                    handle
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        })
    }

    /// The producer whose turn it is.
    fn producer(&self) -> &ThreadedProducer<DeliveryCounter> {
        &self.producers[self.turn]
    }

    /// Records the progress record read back when a session begins: the one a new
    /// producer must still find after a retry (see [`BatchProducer::recreate`]).
    pub fn set_committed(&mut self, record: Option<ProgressRecord>) {
        self.committed = record;
    }

    fn create(
        brokers: &str,
        mode: DeliveryMode,
        partitioning: Partitioning,
        transactional_id: &str,
        transaction_timeout: Duration,
        stop: &watch::Receiver<bool>,
    ) -> Result<ThreadedProducer<DeliveryCounter>, FlushError> {
        let mut config = kafka::client_config(brokers);
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("retry.backoff.ms", "20")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.kbytes", "16384")
            .set("queue.buffering.max.messages", "100000")
            // Retry a record until the transaction gives up on it; never drop it.
            .set("message.timeout.ms", "300000");
        // A `--kafka-property partitioner=…` is the operator's choice and stays.
        if partitioning == Partitioning::Java && !kafka::has_client_property("partitioner") {
            config.set("partitioner", "murmur2_random");
        }
        if mode == DeliveryMode::Transactional {
            config.set("transactional.id", transactional_id).set(
                "transaction.timeout.ms",
                transaction_timeout.as_millis().to_string(),
            );
        }
        let producer: ThreadedProducer<DeliveryCounter> = config
            .create_with_context(DeliveryCounter::default())
            .map_err(FlushError::Setup)?;
        if mode == DeliveryMode::Transactional {
            let mut backoff = Backoff::reconnect();
            // A broker connection first: librdkafka asks for the transaction coordinator
            // once a broker is up, and otherwise only on its next 500 ms timer.
            let _ = producer.client().fetch_metadata(None, CALL_TIMEOUT);
            loop {
                match producer.init_transactions(CALL_TIMEOUT) {
                    Ok(()) => break,
                    Err(KafkaError::Transaction(e)) if e.is_retriable() => {
                        if *stop.borrow() {
                            return Err(FlushError::Stopped);
                        }
                        tracing::warn!(error = %e, "init_transactions: brokers not ready, retrying");
                        std::thread::sleep(backoff.next_delay());
                    }
                    Err(error) => return Err(fatal(error, transactional_id)),
                }
            }
        }
        Ok(producer)
    }

    /// Adds `topics` to those every producer learns ([`BatchProducer::learn_topics`]).
    pub fn know_topics(&mut self, topics: Vec<String>) {
        self.known_topics.extend(topics);
    }

    /// Makes every producer learn `topics`' partitions and their leaders, waiting (a
    /// little) for the leaders of a topic created a moment ago. A producer meeting a
    /// topic for the first time holds its records back until its own metadata request
    /// comes back, and retries on a timer while the topic has no leaders yet: ~0.5 s
    /// per producer and new topic here, paid by the batch that waits on it. Best
    /// effort: what is still unknown at the deadline is left to librdkafka.
    pub fn learn_topics(&self, topics: &[String]) {
        if topics.is_empty() {
            return;
        }
        let deadline = std::time::Instant::now() + LEARN_TOPICS_TIMEOUT;
        std::thread::scope(|scope| {
            for producer in &self.producers {
                scope.spawn(move || {
                    for topic in topics {
                        while !kafka::has_leaders(producer.client(), topic, deadline) {
                            if std::time::Instant::now() >= deadline {
                                tracing::debug!(%topic, "topic leaders not known yet, sending anyway");
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                });
            }
        });
    }

    /// Makes the whole batch durable; blocks until it is, or until a definite error.
    /// `progress_topic` is the configured base name: the record goes to the slot's own
    /// topic ([`kafka::progress_topic_of`]).
    pub fn commit(
        &mut self,
        batch: &Batch,
        progress_topic: &str,
        slot: &str,
        progress: &ProgressRecord,
    ) -> Result<(), FlushError> {
        let progress_value = progress.to_bytes();
        let own_topic = kafka::progress_topic_of(progress_topic, slot);
        if let Some(since) = self.spilled.take() {
            // Invariant 5: one attempt.
            let result = self.commit_transaction(batch, &own_topic, slot, &progress_value, true);
            return match result {
                Ok(()) => {
                    tracing::info!(
                        seconds = since.elapsed().as_secs_f64(),
                        "the Kafka transaction of a source transaction larger than a batch is committed"
                    );
                    self.committed = Some(progress.clone());
                    self.turn = (self.turn + 1) % self.producers.len();
                    Ok(())
                }
                Err(attempt) => Err(self.spill_failed(since, attempt)),
            };
        }
        let mut backoff = Backoff::reconnect();
        if self.producers.is_empty()
            && self.recreate(progress_topic, slot, progress)? == Found::ThisBatch
        {
            self.committed = Some(progress.clone());
            return Ok(());
        }
        loop {
            if *self.stop.borrow() && backoff.attempts() > 0 {
                // A stop during an outage: leave the batch to the next run (the slot
                // was not confirmed past it).
                return Err(FlushError::Stopped);
            }
            let failed_before = self.producer().context().failed.load(Ordering::SeqCst);
            let result = match self.mode {
                DeliveryMode::Transactional => {
                    self.commit_transaction(batch, &own_topic, slot, &progress_value, false)
                }
                DeliveryMode::AtLeastOnce => self.commit_acks(
                    batch,
                    failed_before,
                    &own_topic,
                    slot,
                    &progress_value,
                    // A snapshot chunk's record says which rows are delivered: it
                    // may be durable only after they are.
                    self.committed.as_ref().map(|c| c.state) == Some(progress.state)
                        && progress.snapshot.is_none(),
                ),
            };
            match result {
                Ok(()) => break,
                Err(Attempt::Definite(error)) => return Err(error),
                Err(Attempt::Retry(error)) => {
                    ::metrics::counter!(crate::metrics::RETRIES, "cause" => "kafka").increment(1);
                    tracing::warn!(%error, records = batch.records.len(), "kafka batch not durable yet, retrying on a new producer");
                }
                Err(Attempt::Recreate(error)) => {
                    ::metrics::counter!(crate::metrics::RETRIES, "cause" => "kafka_producer_recreated")
                        .increment(1);
                    tracing::warn!(%error, "kafka producer must be recreated");
                }
            }
            if *self.stop.borrow() {
                // The batch is left to the next run (the slot was not confirmed past it).
                return Err(FlushError::Stopped);
            }
            if self.recreate(progress_topic, slot, progress)? == Found::ThisBatch {
                break;
            }
            std::thread::sleep(backoff.next_delay());
        }
        self.committed = Some(progress.clone());
        self.turn = (self.turn + 1) % self.producers.len();
        Ok(())
    }

    /// Replaces the producers with new ones: a new producer id or, transactional, a
    /// new epoch of each transactional id, so that the retry's records carry
    /// sequence numbers no broker has seen. The old producers are then dropped, their
    /// queues purged. All of them, not only the one whose attempt failed: a newer
    /// instance fenced on one id only could still commit on another while this one
    /// reads the progress record (invariant 4).
    ///
    /// Retrying on the same producer lost records (regression test:
    /// `all_brokers_down_again_and_again_the_connector_waits_and_loses_nothing`):
    /// a partition leader wrote an attempt's records but the acknowledgement was lost
    /// in an outage; the attempt was aborted, and librdkafka sent the retry's records
    /// for that partition under the same epoch with the same sequence numbers, which
    /// the broker took for duplicates of the aborted ones and acknowledged without
    /// writing them. The retry's transaction committed without those records.
    ///
    /// A new transactional producer fences every other instance, including a newer
    /// one that took this connector's place while it was cut off (which would
    /// otherwise have fenced this one at its next call). So the new producer reads the
    /// progress record back first:
    /// - the batch's own record: the failed attempt did commit (its outcome was lost
    ///   with the connection), and the batch is durable as it is;
    /// - the last record this instance committed (or read when its session began): no
    ///   one else has written; the batch is sent again;
    /// - anything else: another instance has committed since, and this one ends its
    ///   session as fenced ([`FlushError::Fenced`]) rather than commit what it holds a
    ///   second time.
    fn recreate(
        &mut self,
        progress_topic: &str,
        slot: &str,
        pending: &ProgressRecord,
    ) -> Result<Found, FlushError> {
        self.fence()?;
        if self.mode != DeliveryMode::Transactional {
            return Ok(Found::Ours);
        }
        let mut backoff = Backoff::reconnect();
        loop {
            match kafka::read_progress(&self.brokers, progress_topic, slot, CALL_TIMEOUT) {
                Ok(found) => {
                    if let Some(judged) = judge(found.as_ref(), pending, self.committed.as_ref()) {
                        return Ok(judged);
                    }
                    tracing::warn!(
                        ours = ?self.committed,
                        ?found,
                        "the progress topic moved on without this instance: another connector took over"
                    );
                    return Err(FlushError::Fenced(self.current_id()));
                }
                Err(error) => {
                    if *self.stop.borrow() {
                        return Err(FlushError::Stopped);
                    }
                    tracing::warn!(%error, "reading the progress record back, retrying");
                    std::thread::sleep(backoff.next_delay());
                }
            }
        }
    }

    /// Sends a spilled batch (invariant 5): in transactional mode into the current
    /// producer's transaction, begun by the first spill and left open for the next
    /// [`BatchProducer::commit`]; at-least-once, until every record is acknowledged.
    /// Blocks while librdkafka's queue is full (the backpressure that bounds memory).
    /// A failure ends the session (a transient error): nothing spilled is kept to
    /// send again.
    pub fn spill(&mut self, batch: &Batch) -> Result<(), FlushError> {
        if self.producers.is_empty() {
            return Err(FlushError::Spilled(KafkaError::Canceled));
        }
        if self.mode == DeliveryMode::AtLeastOnce {
            let failed_before = self.producer().context().failed.load(Ordering::SeqCst);
            return match self.send_and_wait(failed_before, || self.send_records(batch)) {
                Ok(()) => Ok(()),
                Err(Attempt::Definite(error)) => Err(error),
                Err(Attempt::Retry(error) | Attempt::Recreate(error)) => {
                    Err(FlushError::Spilled(error))
                }
            };
        }
        let since = match self.spilled {
            Some(since) => since,
            None => {
                if let Err(error) = self.producer().begin_transaction() {
                    let attempt = self.txn_error(error);
                    return Err(self.spill_failed(std::time::Instant::now(), attempt));
                }
                self.spill_warned = false;
                *self.spilled.insert(std::time::Instant::now())
            }
        };
        if let Err(error) = self.send_records(batch) {
            self.spilled = None;
            let attempt = self.txn_error(error);
            return Err(self.spill_failed(since, attempt));
        }
        let open = since.elapsed();
        if open > self.transaction_timeout / 2 && !std::mem::replace(&mut self.spill_warned, true) {
            tracing::warn!(
                open_seconds = open.as_secs(),
                timeout_seconds = self.transaction_timeout.as_secs(),
                "a source transaction larger than a batch has held its Kafka transaction open \
                 for half of the transaction timeout; if it does not commit in time the brokers \
                 abort it (raise --transaction-timeout-ms)"
            );
        }
        Ok(())
    }

    /// The error a failed spilled transaction ends the session with (invariant 5): its
    /// transaction is aborted (best effort: the next session's producers fence it
    /// anyway) and the producers dropped.
    fn spill_failed(&mut self, since: std::time::Instant, attempt: Attempt) -> FlushError {
        self.spilled = None;
        let elapsed = since.elapsed();
        let error = match attempt {
            Attempt::Definite(FlushError::Stopped) => FlushError::Stopped,
            _ if elapsed >= self.transaction_timeout => FlushError::TransactionTooLong {
                elapsed,
                timeout: self.transaction_timeout,
            },
            Attempt::Definite(error) => error,
            Attempt::Retry(error) | Attempt::Recreate(error) => FlushError::Spilled(error),
        };
        if !self.producers.is_empty() {
            let _ = self.producer().abort_transaction(CALL_TIMEOUT);
        }
        self.producers.clear();
        error
    }

    /// Leaves a spilled transaction (the session ended before its source transaction
    /// did): aborted, as in [`BatchProducer::spill_failed`].
    pub fn abandon(&mut self) {
        if let Some(since) = self.spilled {
            let _ = self.spill_failed(since, Attempt::Definite(FlushError::Stopped));
        }
    }

    /// One attempt in one Kafka transaction; `begun`: by a spill (invariant 5).
    fn commit_transaction(
        &self,
        batch: &Batch,
        progress_topic: &str,
        slot: &str,
        progress: &[u8],
        begun: bool,
    ) -> Result<(), Attempt> {
        let started = std::time::Instant::now();
        let begin = if begun {
            Ok(())
        } else {
            self.producer().begin_transaction()
        };
        if let Err(error) = begin {
            let attempt = self.txn_error(error);
            if matches!(attempt, Attempt::Retry(_)) {
                // E.g. an earlier abort that is not complete yet: finish it first.
                self.abort()?;
            }
            return Err(attempt);
        }
        let sent = self
            .send_records(batch)
            .and_then(|()| self.send_progress(progress_topic, slot, progress));
        if let Err(error) = sent {
            self.abort()?;
            return Err(self.txn_error(error));
        }
        // rust-rdkafka's commit_transaction flushes first, with the 100 ms polls
        // described at [`DeliveryCounter`]: wait for the reports here, so that its
        // flush finds nothing outstanding.
        let sent = started.elapsed();
        self.wait_delivered(CALL_TIMEOUT);
        let acknowledged = started.elapsed();
        #[cfg(feature = "fault-injection")]
        hold_point_before_commit();
        loop {
            match self.producer().commit_transaction(CALL_TIMEOUT) {
                Ok(()) => {
                    tracing::debug!(
                        records = batch.records.len(),
                        sent_ms = sent.as_millis() as u64,
                        acknowledged_ms = acknowledged.as_millis() as u64,
                        committed_ms = started.elapsed().as_millis() as u64,
                        "kafka transaction committed"
                    );
                    ::metrics::counter!(crate::metrics::KAFKA_TRANSACTIONS, "outcome" => "committed")
                        .increment(1);
                    return Ok(());
                }
                Err(KafkaError::Transaction(e)) if e.is_retriable() && !e.txn_requires_abort() => {
                    // The commit's outcome is not known yet: asking again is the
                    // documented way to learn it.
                    tracing::warn!(error = %e, "commit_transaction: retrying");
                    if *self.stop.borrow() {
                        let _ = self.abort();
                        return Err(Attempt::Definite(FlushError::Stopped));
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(error) => {
                    let attempt = self.txn_error(error);
                    if matches!(attempt, Attempt::Retry(_)) {
                        self.abort()?;
                    }
                    return Err(attempt);
                }
            }
        }
    }

    /// One at-least-once attempt: the batch's records, and every record sent since the
    /// failure count was `failed_before`, must be acknowledged.
    ///
    /// The progress record only marks the slot as used and the snapshot as done (its
    /// LSN is never used to skip: `KafkaDestination::read_progress`). When it changes
    /// that mark, or says how far the initial snapshot got (`unchanged` is false: a new
    /// slot's first records, a snapshot's chunks and its end, a progress topic read
    /// back empty), it is sent only once the rows are
    /// all acknowledged, so that a `streaming` record never precedes a snapshot's rows. Otherwise it travels with
    /// the rows: one round of acknowledgements per batch instead of two.
    #[allow(clippy::too_many_arguments)]
    fn commit_acks(
        &self,
        batch: &Batch,
        failed_before: u64,
        progress_topic: &str,
        slot: &str,
        progress: &[u8],
        unchanged: bool,
    ) -> Result<(), Attempt> {
        if unchanged {
            return self.send_and_wait(failed_before, || {
                self.send_records(batch)?;
                self.send_progress(progress_topic, slot, progress)
            });
        }
        self.send_and_wait(failed_before, || self.send_records(batch))?;
        let failed_before = self.producer().context().failed.load(Ordering::SeqCst);
        self.send_and_wait(failed_before, || {
            self.send_progress(progress_topic, slot, progress)
        })
    }

    /// Sends with `send`, then waits until every record is acknowledged; a failed
    /// delivery since the count was `failed_before` makes the attempt fail (the whole
    /// batch is sent again).
    fn send_and_wait(
        &self,
        failed_before: u64,
        send: impl FnOnce() -> Result<(), KafkaError>,
    ) -> Result<(), Attempt> {
        send().map_err(Attempt::Retry)?;
        // Wait until every record is acknowledged or failed.
        while !self.wait_delivered(CALL_TIMEOUT) {
            tracing::warn!("still waiting for acknowledgements");
            if *self.stop.borrow() {
                return Err(Attempt::Definite(FlushError::Stopped));
            }
        }
        let failed_after = self.producer().context().failed.load(Ordering::SeqCst);
        if failed_after != failed_before {
            return Err(Attempt::Retry(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut,
            )));
        }
        Ok(())
    }

    /// Waits until every enqueued record has its delivery report and is released by
    /// librdkafka (it is counted as outstanding until just after its report), at most
    /// `timeout`.
    fn wait_delivered(&self, timeout: Duration) -> bool {
        if !self.producer().context().wait_reported(timeout) {
            return false;
        }
        let deadline = std::time::Instant::now() + Duration::from_millis(50);
        while self.producer().in_flight_count() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// Enqueues the batch's records, waiting when the local queue is full.
    fn send_records(&self, batch: &Batch) -> Result<(), KafkaError> {
        for record in &batch.records {
            self.send(record_of(batch, record))?;
        }
        Ok(())
    }

    fn send_progress(
        &self,
        progress_topic: &str,
        slot: &str,
        progress: &[u8],
    ) -> Result<(), KafkaError> {
        self.send(
            BaseRecord::to(progress_topic)
                .key(slot.as_bytes())
                .payload(progress),
        )
    }

    fn send(&self, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<(), KafkaError> {
        loop {
            match self.producer().send(record) {
                Ok(()) => {
                    self.producer()
                        .context()
                        .enqueued
                        .fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Backpressure: the background thread drains the queue (unless the
                    // brokers are down: a stop must still be seen).
                    if *self.stop.borrow() {
                        return Err(KafkaError::Canceled);
                    }
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, _)) => return Err(error),
            }
        }
    }

    /// Aborts the open transaction and returns only when the abort is complete (or
    /// there was nothing to abort). A timed-out `abort_transaction` goes on inside
    /// librdkafka, and every other transactional call then fails with "conflicting
    /// abort_transaction API call is already in progress" until `abort_transaction` is
    /// called again and succeeds: giving up after one call wedged the producer for
    /// good after an outage of two brokers (regression test:
    /// `two_brokers_down_below_min_isr_the_connector_waits_and_loses_nothing`).
    fn abort(&self) -> Result<(), Attempt> {
        ::metrics::counter!(crate::metrics::KAFKA_TRANSACTIONS, "outcome" => "aborted")
            .increment(1);
        let mut backoff = Backoff::reconnect();
        loop {
            match self.producer().abort_transaction(CALL_TIMEOUT) {
                Ok(()) => return Ok(()),
                Err(KafkaError::Transaction(e)) if e.is_fatal() => {
                    return Err(self.txn_error(KafkaError::Transaction(e)));
                }
                Err(KafkaError::Transaction(e)) if e.is_retriable() => {
                    if *self.stop.borrow() {
                        return Err(Attempt::Definite(FlushError::Stopped));
                    }
                    tracing::warn!(error = %e, "abort_transaction not complete yet, retrying");
                    std::thread::sleep(backoff.next_delay());
                }
                Err(error) => {
                    // No transaction in progress: nothing to abort.
                    tracing::debug!(%error, "abort_transaction");
                    return Ok(());
                }
            }
        }
    }

    /// The transactional id of the producer whose turn it is.
    fn current_id(&self) -> String {
        transactional_id(&self.slot, self.turn)
    }

    fn txn_error(&self, error: KafkaError) -> Attempt {
        match error::kafka::classify(&error) {
            ProducerFailure::Fenced => Attempt::Definite(FlushError::Fenced(self.current_id())),
            ProducerFailure::Fatal => Attempt::Recreate(error),
            ProducerFailure::Retriable => Attempt::Retry(error),
        }
    }
}

/// The Kafka record of one of the batch's records: its topic, key, value, the source
/// transaction's headers and then the route's own.
fn record_of<'a>(batch: &'a Batch, record: &'a OutRecord) -> BaseRecord<'a, [u8], [u8]> {
    let topic = batch.topics[record.topic as usize].as_str();
    let mut base = BaseRecord::to(topic);
    if let Some(value) = &record.value {
        base = base.payload(value.as_ref());
    }
    if let Some(key) = &record.key {
        base = base.key(key.as_ref());
    }
    let mut headers = batch.headers.get(record.txn).cloned();
    if !record.headers.is_empty() {
        let mut extended = headers.unwrap_or_default();
        for (name, value) in &record.headers {
            extended = extended.insert(Header {
                key: name,
                value: value.as_deref(),
            });
        }
        headers = Some(extended);
    }
    if let Some(headers) = headers {
        base = base.headers(headers);
    }
    base
}

/// Whose the progress record `found` by a new producer is; `None`: another instance's.
fn judge(
    found: Option<&ProgressRecord>,
    pending: &ProgressRecord,
    committed: Option<&ProgressRecord>,
) -> Option<Found> {
    if found == Some(pending) {
        Some(Found::ThisBatch)
    } else if found == committed {
        Some(Found::Ours)
    } else {
        None
    }
}

/// What a new producer found in the progress topic (see [`BatchProducer::recreate`]).
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// The record of the batch being committed: it is durable.
    ThisBatch,
    /// This instance's last record: the batch is to be sent again.
    Ours,
}

enum Attempt {
    Retry(KafkaError),
    Recreate(KafkaError),
    Definite(FlushError),
}

/// The error of a producer call that cannot be retried on the same producer.
fn fatal(error: KafkaError, transactional_id: &str) -> FlushError {
    match error::kafka::classify(&error) {
        ProducerFailure::Fenced => FlushError::Fenced(transactional_id.to_string()),
        ProducerFailure::Fatal | ProducerFailure::Retriable => FlushError::Fatal(error),
    }
}

/// Maps a producer failure onto the pipeline's error, keeping its class.
pub(super) fn destination_error(error: FlushError) -> PipelineError {
    if matches!(error, FlushError::Stopped) {
        return PipelineError::Stopped;
    }
    PipelineError::Destination {
        context: "kafka".into(),
        class: error.class(),
        source: Box::new(error),
    }
}

/// Test hook (the `fault-injection` feature only):
/// `OUTBOX_RELAY_TEST_HOLD_TRANSACTION=N` stops the Nth Kafka transaction between its
/// last acknowledged record and its commit, for good: its records, the progress record
/// among them, stay in their partitions uncommitted, as with an instance hung (or
/// SIGSTOPped) mid-transaction, until a successor fences it or the coordinator's
/// timeout aborts it.
#[cfg(feature = "fault-injection")]
fn hold_point_before_commit() {
    use std::sync::atomic::AtomicU64;
    static TRANSACTIONS: AtomicU64 = AtomicU64::new(0);
    static HOLD: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let hold = HOLD.get_or_init(|| {
        std::env::var("OUTBOX_RELAY_TEST_HOLD_TRANSACTION")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    if let Some(hold) = hold {
        if TRANSACTIONS.fetch_add(1, Ordering::SeqCst) + 1 == *hold {
            eprintln!("test hook: holding a Kafka transaction open before its commit");
            loop {
                std::thread::park();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    /// The callback signals only when the reports catch up, and that signal must wake
    /// the waiter: a waiter that missed it would sleep out its whole timeout
    /// (`CALL_TIMEOUT` in the connector) and find the count only then, here a failed
    /// round. (The lost wake-up race itself is argued at [`DeliveryCounter`]; its
    /// window is nanoseconds wide, which no test hits reliably.)
    #[test]
    fn the_last_report_wakes_the_waiter() {
        let counter = std::sync::Arc::new(DeliveryCounter::default());
        let timeout = Duration::from_secs(5);
        for round in 0..2_000u64 {
            let records = 1 + round % 7;
            counter.enqueued.fetch_add(records, Ordering::SeqCst);
            let reporter = {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    for i in 0..records {
                        if (round + i) % 3 == 0 {
                            std::thread::yield_now();
                        }
                        counter.count_report();
                    }
                })
            };
            let started = std::time::Instant::now();
            assert!(
                counter.wait_reported(timeout),
                "round {round}: not reported"
            );
            assert!(
                started.elapsed() < timeout,
                "round {round}: woken by the timeout, not by the last report"
            );
            reporter.join().unwrap();
        }
    }

    #[test]
    fn a_new_producer_tells_its_own_progress_from_another_instances() {
        let at = |lsn: u64| ProgressRecord::streaming(Lsn(lsn));
        let (committed, pending) = (at(100), at(200));
        // The failed attempt committed after all.
        assert_eq!(
            judge(Some(&pending), &pending, Some(&committed)),
            Some(Found::ThisBatch)
        );
        // Nothing new: send the batch again.
        assert_eq!(
            judge(Some(&committed), &pending, Some(&committed)),
            Some(Found::Ours)
        );
        assert_eq!(judge(None, &pending, None), Some(Found::Ours));
        // Another instance committed since (beyond, or short of, this batch).
        assert_eq!(judge(Some(&at(300)), &pending, Some(&committed)), None);
        assert_eq!(judge(Some(&at(150)), &pending, Some(&committed)), None);
        assert_eq!(judge(Some(&at(150)), &pending, None), None);
        // The record vanished (the topic was deleted): not this instance's doing.
        assert_eq!(judge(None, &pending, Some(&committed)), None);
    }
}
