//! Partition assignment: each partition this sink is given resumes right after the
//! last offset pg_end has applied, never where Kafka's group offsets say.
//!
//! Invariant: a partition is handed to librdkafka with an explicit start offset
//! (`stored + 1`, or the beginning when pg_end has none) in the same rebalance
//! callback that receives it, so not one record of it is fetched from any other
//! position. The one exception is a replay ([`super::replay`]): the first time this
//! process is assigned a partition, it starts at the replay position instead, which
//! is safe because applying a record twice changes nothing. Records of a revoked partition that were buffered and not yet applied
//! are dropped by the poll loop (see [`RebalanceEvent`]); the new owner reads them
//! again from pg_end's offsets.
//!
//! # Why a blocking read on a thread of its own
//! librdkafka calls the rebalance callback inside `poll`, that is inside
//! `StreamConsumer::recv` on the sink's tokio task; the callback cannot `.await`. The
//! alternatives were to assign the partitions paused and seek them later from async
//! code (but records already fetched from the group offsets race with the seek, and a
//! gap in offsets is normal in a transactional topic, so they cannot be told apart),
//! or to block the tokio worker on a future (`block_in_place`, which needs the
//! multi-threaded runtime and makes the library unusable from a current-thread one).
//! Instead, [`OffsetReader`] owns a plain thread with a current-thread runtime of its
//! own; the callback sends it the partitions over a std channel and waits for the
//! answer. The read is one indexed query (milliseconds). While pg_end is down the
//! callback waits, retrying with backoff: a sink cannot consume without knowing where
//! to start, librdkafka's heartbeats run on its own threads meanwhile, and the wait
//! ends at shutdown ([`OffsetReader::read`] returns `None`, the partitions are not
//! taken). A definite error (the bookkeeping table is missing) is handed to the poll
//! loop, which stops the sink. The wait blocks the tokio worker that polls; on the
//! binary's multi-threaded runtime the shutdown watcher runs on another worker and
//! ends the wait, while on a current-thread runtime a shutdown requested during such
//! an outage is noticed only once pg_end answers.
//!
//! Both rebalance protocols are handled: eager (`assign`/`unassign`, the default
//! `range,roundrobin`) and cooperative (`incremental_assign`/`incremental_unassign`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::replay::ReplayStart;
use crate::apply::driver::{self, Driver, Ended, Failure};
use crate::apply::{self, ApplyError};
use crate::error::error_chain;

/// A (topic, partition) pair.
pub type Partition = (String, i32);

/// A change of assignment, for the poll loop to act on after `recv` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceEvent {
    /// These partitions now start at the given offsets (`None`: the beginning).
    Assigned(Vec<(Partition, Option<i64>)>),
    /// These partitions are no longer ours: drop their buffered records.
    Revoked(Vec<Partition>),
}

/// How long one attempt to read the stored offsets may take.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Why no offsets came back.
#[derive(Debug)]
pub enum ReadFailure {
    /// The sink is stopping.
    Stopped,
    /// pg_end refused the query for a reason a retry will not cure.
    Definite(ApplyError),
}

/// Reads the stored offsets on a thread of its own; see the module documentation.
pub struct OffsetReader {
    requests: mpsc::Sender<Request>,
}

struct Request {
    partitions: Vec<Partition>,
    reply: mpsc::Sender<Result<HashMap<Partition, i64>, ReadFailure>>,
}

impl OffsetReader {
    /// Starts the reader thread. It ends when the `OffsetReader` is dropped.
    pub fn spawn(target_url: String, stop: Arc<AtomicBool>) -> std::io::Result<Self> {
        let (requests, incoming) = mpsc::channel::<Request>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("sink-offsets".into())
            .spawn(move || {
                while let Ok(request) = incoming.recv() {
                    let result =
                        runtime.block_on(read_until_done(&target_url, &request.partitions, &stop));
                    let _ = request.reply.send(result);
                }
            })?;
        Ok(Self { requests })
    }

    /// Blocks until pg_end answered, the sink stops, or pg_end refused definitively.
    pub fn read(&self, partitions: &[Partition]) -> Result<HashMap<Partition, i64>, ReadFailure> {
        let (reply, answer) = mpsc::channel();
        let request = Request {
            partitions: partitions.to_vec(),
            reply,
        };
        if self.requests.send(request).is_err() {
            return Err(ReadFailure::Stopped);
        }
        answer.recv().unwrap_or(Err(ReadFailure::Stopped))
    }
}

/// Reads pg_end's stored offsets of no partition, before the sink subscribes: a pg_end
/// without the relay's schema stops the sink at its start, not once a topic it waits
/// for has appeared. Waits while pg_end is unreachable, as the rebalance read does.
pub async fn probe(url: &str, stop: &AtomicBool) -> Result<(), ReadFailure> {
    read_until_done(url, &[], stop).await.map(drop)
}

/// Reads the stored offsets of `partitions`: on a new connection, retried through the
/// [`Driver`] until pg_end answers, refuses definitively, or the sink stops.
async fn read_until_done(
    url: &str,
    partitions: &[Partition],
    stop: &AtomicBool,
) -> Result<HashMap<Partition, i64>, ReadFailure> {
    if stop.load(Ordering::Relaxed) {
        return Err(ReadFailure::Stopped);
    }
    let mut session = Reading { stop };
    let mut pg_end = Driver::new(url).with_timeout(READ_TIMEOUT);
    match pg_end.run(&mut session, &mut ReadOffsets(partitions)).await {
        Ok(offsets) => Ok(offsets),
        Err(Ended::Failed(Failure::Definite(error))) => Err(ReadFailure::Definite(error)),
        // With no bound on attempts and no connection held back, only a stop is left.
        Err(Ended::Stopped | Ended::InDoubt(_) | Ended::Failed(Failure::Transient(_))) => {
            Err(ReadFailure::Stopped)
        }
    }
}

/// One read of the stored offsets.
struct ReadOffsets<'p>(&'p [Partition]);

impl driver::Attempt for ReadOffsets<'_> {
    type Output = HashMap<Partition, i64>;
    fn run<'a>(
        &'a mut self,
        target: &'a mut apply::Target,
    ) -> impl std::future::Future<Output = Result<Self::Output, ApplyError>> + Send + 'a {
        apply::read_kafka_offsets(&**target, self.0)
    }
}

/// The offset reader's side of the driver: the sink's stop, and its log.
struct Reading<'s> {
    stop: &'s AtomicBool,
}

impl driver::Session for Reading<'_> {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn retrying(&mut self, failure: &str, attempt: u32) {
        tracing::warn!(
            error = %failure,
            attempt,
            "cannot read the stored offsets from pg_end; retrying"
        );
    }
}

/// The sink's consumer context: decides where assigned partitions start and tells the
/// poll loop about every change of assignment.
pub struct SinkContext {
    reader: OffsetReader,
    /// Changes of assignment since the poll loop last looked, oldest first.
    events: Mutex<Vec<RebalanceEvent>>,
    /// A definite error met in a callback; the poll loop stops the sink with it.
    fatal: Mutex<Option<ApplyError>>,
    /// Wakes the poll loop when an event is pushed or `fatal` is set: the callbacks
    /// run inside a poll that returns no record, and on a quiet topic (or with the
    /// partitions not taken) no record would ever wake it to look.
    changed: tokio::sync::Notify,
    /// `--from-…`: where partitions start on their first assignment, if not pg_end's.
    replay: Option<ReplayStart>,
    /// The partitions this process was assigned before: they no longer replay.
    assigned_before: Mutex<HashSet<Partition>>,
    /// Repeats of one client or consumer error, logged once a minute.
    pub errors: crate::kafka::Throttle,
}

impl SinkContext {
    pub fn new(reader: OffsetReader) -> Self {
        Self {
            reader,
            events: Mutex::new(Vec::new()),
            fatal: Mutex::new(None),
            changed: tokio::sync::Notify::new(),
            replay: None,
            assigned_before: Mutex::new(HashSet::new()),
            errors: crate::kafka::Throttle::new(Duration::from_secs(60)),
        }
    }

    /// Starts each partition at `replay` the first time it is assigned (see
    /// [`super::replay`]); `None` keeps pg_end's stored offsets.
    pub fn with_replay(mut self, replay: Option<ReplayStart>) -> Self {
        self.replay = replay;
        self
    }

    /// The replay start of `partition` if this is its first assignment here.
    fn replay_start(&self, partition: &Partition) -> Option<Offset> {
        let replay = self.replay.as_ref()?;
        let first = self
            .assigned_before
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(partition.clone());
        first.then(|| replay.offset_of(&partition.0, partition.1))
    }

    /// The changes of assignment since the last call, oldest first.
    pub fn take_events(&self) -> Vec<RebalanceEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A definite error met in a callback, if any.
    pub fn take_fatal(&self) -> Option<ApplyError> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Completes once a callback has pushed an event or met a definite error (at once
    /// if one did since the last call): the poll loop then takes them with
    /// [`Self::take_events`] and [`Self::take_fatal`].
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    fn push(&self, event: RebalanceEvent) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
        // A permit is kept if the loop is not waiting now.
        self.changed.notify_one();
    }

    fn assign(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
        cooperative: bool,
    ) {
        let partitions: Vec<Partition> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let stored = match self.reader.read(&partitions) {
            Ok(stored) => stored,
            Err(failure) => {
                if let ReadFailure::Definite(error) = failure {
                    tracing::error!(error = %error_chain(&error), "cannot read the stored offsets from pg_end");
                    *self.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
                    // A permit is kept if the loop is not waiting now.
                    self.changed.notify_one();
                }
                // Take nothing: with no start position the partitions must not be read.
                if !cooperative {
                    let _ = consumer.unassign();
                }
                return;
            }
        };
        let mut starts = Vec::with_capacity(partitions.len());
        for (topic, partition) in partitions {
            let last = stored.get(&(topic.clone(), partition)).copied();
            let replay = self.replay_start(&(topic.clone(), partition));
            let start = match (replay, last) {
                (Some(replay), _) => replay,
                (None, Some(last)) => Offset::Offset(last.saturating_add(1)),
                (None, None) => Offset::Beginning,
            };
            if let Err(error) = tpl.set_partition_offset(&topic, partition, start) {
                tracing::error!(%error, topic, partition, "cannot set a partition's start offset");
            }
            if replay.is_some() {
                tracing::info!(topic, partition, replay_from = ?start, stored_last = ?last, "partition assigned, replaying");
            } else {
                tracing::info!(topic, partition, resume_at = ?start, "partition assigned");
            }
            starts.push(((topic, partition), last));
        }
        let assigned = if cooperative {
            consumer.incremental_assign(tpl)
        } else {
            consumer.assign(tpl)
        };
        match assigned {
            Ok(()) => self.push(RebalanceEvent::Assigned(starts)),
            Err(error) => tracing::error!(%error, "cannot take the assigned partitions"),
        }
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList, cooperative: bool) {
        let partitions: Vec<Partition> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        for (topic, partition) in &partitions {
            tracing::info!(
                topic,
                partition,
                lost = consumer.assignment_lost(),
                "partition revoked"
            );
        }
        // Tell the poll loop before the partitions go: nothing after this callback
        // may apply their buffered records.
        self.push(RebalanceEvent::Revoked(partitions));
        let result = if cooperative {
            consumer.incremental_unassign(tpl)
        } else {
            consumer.unassign()
        };
        if let Err(error) = result {
            tracing::warn!(%error, "cannot release the revoked partitions");
        }
    }
}

impl ClientContext for SinkContext {
    /// librdkafka retries by itself; each distinct error is logged at most once a
    /// minute (with the count held back), not on every reconnect attempt.
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let text = if reason.is_empty() {
            error.to_string()
        } else {
            format!("{error}: {reason}")
        };
        if let Some(repeats) = self.errors.admit(&text) {
            tracing::warn!(error = %text, repeats, "kafka client error; librdkafka retries");
        }
    }

    /// librdkafka's statistics carry each assigned partition's consumer lag.
    fn stats(&self, statistics: rdkafka::Statistics) {
        for topic in statistics.topics.values() {
            for (partition, stats) in &topic.partitions {
                if *partition >= 0 && stats.consumer_lag >= 0 {
                    ::metrics::gauge!(
                        crate::metrics::CONSUMER_LAG,
                        "topic" => topic.topic.clone(),
                        "partition" => partition.to_string()
                    )
                    .set(stats.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for SinkContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.assign(consumer, tpl, cooperative)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.revoke(consumer, tpl, cooperative)
            }
            other => {
                // As librdkafka recommends: on a rebalance error, drop the assignment.
                tracing::warn!(error = ?other, "rebalance error; releasing the partitions");
                self.revoke(consumer, tpl, cooperative)
            }
        }
    }
}
