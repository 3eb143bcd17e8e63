//! The checkers of a chaos run, beyond `verify`:
//! - the slot's `confirmed_flush_lsn` never passed what the next stage held, sampled
//!   all along the run and judged afterwards against a `test_decoding` witness slot;
//! - the topic, read with `read_committed`, holds every outbox id exactly once;
//! - the dead-letter table is empty.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::pg;
use crate::progress::{ProgressRecord, ProgressState};

/// A client context that keeps the checkers' Kafka clients quiet: they meet every
/// broker outage the runner injects, and their errors are expected, retried, and not
/// the relay's logs.
pub struct Quiet;

impl ClientContext for Quiet {
    fn log(&self, _level: RDKafkaLogLevel, _fac: &str, _log_message: &str) {}
    fn error(&self, _error: KafkaError, _reason: &str) {}
}

impl ConsumerContext for Quiet {}

/// What the next stage held: pg_end's `direct_progress` row, or the progress topic.
#[derive(Debug, Clone)]
pub enum NextStage {
    PgEnd { url: String },
    ProgressTopic { brokers: String, topic: String },
}

/// What the next stage held at a sample, read after the slot's confirmed LSN.
///
/// For the progress topic it is not an LSN read on the spot but the partition's high
/// watermark, resolved once the run is over ([`resolve_topic_samples`]). Reading the
/// progress record itself with `read_committed` at sample time would race with Kafka:
/// `commitTransaction` returns once the coordinator has logged the decision, and the
/// markers that make the records visible to `read_committed` readers reach the
/// partition a moment later, so a reader in between sees the slot confirmed before the
/// progress record is readable. The high watermark has no such gap: a record
/// acknowledged with `acks=all` lies below it, and whether its transaction committed
/// is read after the run, when every transaction is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    Lsn(Lsn),
    /// The progress partition's high watermark: records at offsets below it.
    TopicBelow(i64),
}

/// One sample: the slot's confirmed LSN, then what the next stage held (read after).
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub confirmed: Lsn,
    pub held: Held,
}

/// A sample judged: the slot's confirmed LSN and the LSN the next stage held.
#[derive(Debug, Clone, Copy)]
pub struct LsnSample {
    pub confirmed: Lsn,
    pub held: Lsn,
}

async fn timed<T>(secs: u64, f: impl std::future::Future<Output = Option<T>>) -> Option<T> {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .ok()
        .flatten()
}

/// Samples the slot and the next stage every `every` until `stop` is set.
pub async fn sample_lsns(
    source_url: String,
    slot: String,
    next: NextStage,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut source: Option<Client> = None;
    let mut target: Option<Client> = None;
    let mut watermarks: Option<Arc<WatermarkReader>> = None;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        if source.is_none() {
            source = timed(5, async { pg::connect(&source_url).await.ok() }).await;
        }
        let Some(client) = source.as_ref() else {
            continue;
        };
        let confirmed = match timed(5, async { slot_confirmed(client, &slot).await.ok() }).await {
            None => {
                source = None;
                continue;
            }
            Some(None) => continue, // no slot yet
            Some(Some(lsn)) => lsn,
        };
        let held = match &next {
            NextStage::PgEnd { url } => {
                if target.is_none() {
                    target = timed(5, async { pg::connect(url).await.ok() }).await;
                }
                let Some(client) = target.as_ref() else {
                    continue;
                };
                let held = timed(5, async {
                    let row = client
                        .query_opt(
                            "SELECT commit_lsn::text FROM outbox_relay.direct_progress WHERE slot_name = $1",
                            &[&slot],
                        )
                        .await
                        .ok()?;
                    Some(row.map(|r| r.get::<_, String>(0)))
                })
                .await;
                match held {
                    None => {
                        target = None;
                        continue;
                    }
                    Some(None) => Held::Lsn(Lsn::ZERO),
                    Some(Some(text)) => Held::Lsn(text.parse().unwrap_or(Lsn::ZERO)),
                }
            }
            NextStage::ProgressTopic { brokers, topic } => {
                if watermarks.is_none() {
                    watermarks = WatermarkReader::new(brokers, topic).ok().map(Arc::new);
                }
                let Some(reader) = watermarks.clone() else {
                    continue;
                };
                let high = tokio::task::spawn_blocking(move || reader.high(Duration::from_secs(5)))
                    .await
                    .ok()
                    .and_then(Result::ok);
                match high {
                    Some(high) => Held::TopicBelow(high),
                    None => {
                        // A fresh client next time: after broker restarts, an idle
                        // client's cached metadata can stay "unknown partition".
                        watermarks = None;
                        continue;
                    }
                }
            }
        };
        samples.push(Sample { confirmed, held });
    }
    samples
}

/// The slot's `confirmed_flush_lsn`, `None` while the slot does not exist.
pub async fn slot_confirmed(
    source: &Client,
    slot: &str,
) -> Result<Option<Lsn>, tokio_postgres::Error> {
    let row = source
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|text| text.parse().ok()))
}

/// Reads the high watermark of a single-partition topic (a `read_uncommitted` client:
/// with `read_committed` the broker answers the last stable offset instead).
pub struct WatermarkReader {
    consumer: BaseConsumer<Quiet>,
    topic: String,
}

impl WatermarkReader {
    pub fn new(brokers: &str, topic: &str) -> Result<Self, KafkaError> {
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "outbox-relay-lsn-sampler")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_uncommitted")
            .set("socket.timeout.ms", "5000")
            .create_with_context(Quiet)?;
        Ok(Self {
            consumer,
            topic: topic.to_string(),
        })
    }

    /// Blocking: every record acknowledged with `acks=all` before this call lies below
    /// the offset returned.
    pub fn high(&self, timeout: Duration) -> Result<i64, KafkaError> {
        self.consumer
            .fetch_watermarks(&self.topic, 0, timeout)
            .map(|(_, high)| high)
    }
}

/// Every streaming position of `slot` in the progress topic's committed records, as
/// (offset, LSN) in offset order. Blocking; read after the run, when no transaction is
/// left open, so `read_committed` to the end sees every committed record.
pub fn progress_history(
    brokers: &str,
    topic: &str,
    slot: &str,
    timeout: Duration,
) -> Result<Vec<(i64, Lsn)>, String> {
    let consumer: BaseConsumer<Quiet> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-relay-lsn-sampler")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create_with_context(Quiet)
        .map_err(|e| format!("progress reader: {e}"))?;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(|e| format!("progress reader: {e}"))?;
    consumer
        .assign(&assignment)
        .map_err(|e| format!("progress reader: {e}"))?;
    let deadline = std::time::Instant::now() + timeout;
    let mut history = Vec::new();
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(history),
            Some(Err(_)) => {}
            Some(Ok(message)) => {
                if message.key() != Some(slot.as_bytes()) {
                    continue;
                }
                let record: Option<ProgressRecord> = message
                    .payload()
                    .and_then(|p| serde_json::from_slice(p).ok());
                if let Some(lsn) = record
                    .filter(|r| r.state == ProgressState::Streaming)
                    .and_then(|r| r.lsn())
                {
                    history.push((message.offset(), lsn));
                }
            }
        }
    }
    Err(format!(
        "the progress topic {topic} was not read to its end in {}s",
        timeout.as_secs()
    ))
}

/// Resolves each sample to the LSN the next stage held: for the progress topic, the
/// highest streaming LSN of a committed record below the sample's high watermark
/// (`history` from [`progress_history`]); 0/0 when there is none yet.
pub fn resolve_samples(samples: &[Sample], history: &[(i64, Lsn)]) -> Vec<LsnSample> {
    samples
        .iter()
        .map(|s| LsnSample {
            confirmed: s.confirmed,
            held: match s.held {
                Held::Lsn(lsn) => lsn,
                Held::TopicBelow(high) => history
                    .iter()
                    .take_while(|(offset, _)| *offset < high)
                    .map(|(_, lsn)| *lsn)
                    .max()
                    .unwrap_or(Lsn::ZERO),
            },
        })
        .collect()
}

/// Creates a `test_decoding` slot that records every transaction from now on; with
/// `failover` (PostgreSQL 17+), a failover slot, synced to the standby, so that the
/// witness survives a `pg-start-failover`.
pub async fn create_witness(
    source: &Client,
    name: &str,
    failover: bool,
) -> Result<(), tokio_postgres::Error> {
    let sql = if failover {
        "SELECT pg_create_logical_replication_slot($1, 'test_decoding', false, false, true)"
    } else {
        "SELECT pg_create_logical_replication_slot($1, 'test_decoding')"
    };
    source.execute(sql, &[&name]).await.map(|_| ())
}

/// The commit end LSNs of the transactions that inserted into the outbox, as the
/// witness gave them so far.
pub type WitnessCommits = Arc<Mutex<BTreeSet<Lsn>>>;

/// Consumes what the witness holds (`pg_logical_slot_get_changes`: logical decoding
/// hands out whole transactions) and adds the commit end LSN of every transaction that
/// inserted into the outbox to `commits`.
///
/// Consumed, not peeked at the end: a failover slot is synchronised to the standby
/// only once it moves past what the standby can reserve, and a slot that never moves
/// never is (`pg-start-failover` waits for it). After a failover the promoted
/// standby's copy may stand a little behind what was consumed here and hand some
/// transactions out again: a set keeps each once.
pub async fn consume_witness(
    source: &Client,
    witness: &str,
    commits: &WitnessCommits,
) -> Result<(), tokio_postgres::Error> {
    let rows = source
        .query(
            "SELECT lsn::text, data FROM pg_logical_slot_get_changes($1, NULL, NULL)",
            &[&witness],
        )
        .await?;
    let mut found: Vec<Lsn> = Vec::new();
    let mut touches_outbox = false;
    for row in rows {
        let data: &str = row.get(1);
        if data.starts_with("BEGIN") {
            touches_outbox = false;
        } else if data.starts_with("table outbox.transactions: INSERT") {
            touches_outbox = true;
        } else if data.starts_with("COMMIT") && touches_outbox {
            if let Ok(lsn) = row.get::<_, &str>(0).parse() {
                found.push(lsn);
            }
        }
    }
    commits
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(found);
    Ok(())
}

/// Consumes the witness every 2 s until `stop` is set ([`consume_witness`]), through
/// outages: a failed or slow call (10 s) drops the connection and the next one makes
/// a new one.
pub async fn witness_reader(
    source_url: String,
    witness: String,
    commits: WitnessCommits,
    stop: Arc<AtomicBool>,
) {
    let mut source: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        if source.is_none() {
            source = timed(5, async { pg::connect(&source_url).await.ok() }).await;
        }
        let Some(client) = source.as_ref() else {
            continue;
        };
        let consumed = timed(10, async {
            consume_witness(client, &witness, &commits).await.ok()
        })
        .await;
        if consumed.is_none() {
            source = None;
        }
    }
}

/// The outcome of the LSN check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LsnCheck {
    pub samples: usize,
    /// Samples taken while the next stage held a streaming position.
    pub judged: usize,
    pub outbox_commits: usize,
    /// Samples whose confirmed LSN covered a commit the next stage did not hold.
    pub violations: usize,
    pub first_violation: Option<String>,
}

/// No sample may have confirmed past a transaction the next stage did not hold: no
/// outbox commit end LSN in `(held, confirmed]`. Samples with nothing held yet (the
/// initial snapshot, marked 0/0) are not judged.
pub fn judge_lsns(samples: &[LsnSample], commits: &[Lsn]) -> LsnCheck {
    let mut check = LsnCheck {
        samples: samples.len(),
        outbox_commits: commits.len(),
        ..LsnCheck::default()
    };
    for s in samples.iter().filter(|s| !s.held.is_zero()) {
        check.judged += 1;
        let first_above = commits.partition_point(|c| *c <= s.held);
        if let Some(c) = commits.get(first_above).filter(|c| **c <= s.confirmed) {
            check.violations += 1;
            check.first_violation.get_or_insert_with(|| {
                format!(
                    "slot confirmed {} while the next stage held only {}: commit {c} not held",
                    s.confirmed, s.held
                )
            });
        }
    }
    check
}

/// The outcome of reading the topic back.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TopicCheck {
    pub records: u64,
    pub distinct_ids: u64,
    /// Records beyond the first for an id.
    pub duplicates: u64,
    pub duplicate_sample: Vec<i64>,
    /// Outbox ids of pg_start not in the topic.
    pub missing: u64,
    pub missing_sample: Vec<i64>,
    /// Ids in the topic that pg_start does not hold.
    pub extra: u64,
    pub unreadable: u64,
}

/// The topics a scenario's connector writes.
#[derive(Debug, Clone)]
pub enum Topics {
    /// One topic.
    Name(String),
    /// Every topic whose name starts with this (routed topics, created as records come).
    Prefix(String),
}

impl Topics {
    fn matches(&self, topic: &str) -> bool {
        match self {
            Topics::Name(name) => topic == name,
            Topics::Prefix(prefix) => topic.starts_with(prefix.as_str()),
        }
    }
}

impl std::fmt::Display for Topics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Topics::Name(name) => f.write_str(name),
            Topics::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// A `read_committed` consumer that reports the end of each partition.
fn reader(brokers: &str) -> Result<BaseConsumer<Quiet>, String> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-relay-chaos-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create_with_context(Quiet)
        .map_err(|e| format!("consumer: {e}"))
}

/// Reads every committed record of `topic`'s `partitions` from the beginning to their
/// end (the last stable offset), counting the ids of the values into `counts`. One
/// consumer per topic: a partition's end-of-file event names its partition, not its
/// topic.
fn read_ids(
    brokers: &str,
    topic: &str,
    partitions: &[i32],
    deadline: std::time::Instant,
    counts: &mut HashMap<i64, u64>,
    check: &mut TopicCheck,
) -> Result<(), String> {
    if partitions.is_empty() {
        return Err(format!("topic {topic} has no partitions"));
    }
    let consumer = reader(brokers)?;
    let mut assignment = TopicPartitionList::new();
    for p in partitions {
        assignment
            .add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut at_end = HashSet::new();
    while at_end.len() < partitions.len() {
        if std::time::Instant::now() > deadline {
            return Err(format!("reading {topic} did not reach its end in time"));
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(_)) => {}
            Some(Ok(m)) => {
                at_end.remove(&m.partition());
                check.records += 1;
                let id = m
                    .payload()
                    .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                    .and_then(|v| {
                        v.get("id")
                            .and_then(|id| id.to_string().parse::<i64>().ok())
                    });
                match id {
                    Some(id) => *counts.entry(id).or_default() += 1,
                    None => check.unreadable += 1,
                }
            }
        }
    }
    Ok(())
}

/// Reads every committed record of `topics` and compares their ids with `source_ids`.
pub fn check_topic(
    brokers: &str,
    topics: &Topics,
    source_ids: &HashSet<i64>,
    timeout: Duration,
) -> Result<TopicCheck, String> {
    let metadata = reader(brokers)?
        .fetch_metadata(None, Duration::from_secs(30))
        .map_err(|e| format!("metadata of {topics}: {e}"))?;
    let found: Vec<(&str, Vec<i32>)> = metadata
        .topics()
        .iter()
        .filter(|t| topics.matches(t.name()))
        .map(|t| (t.name(), t.partitions().iter().map(|p| p.id()).collect()))
        .collect();
    if found.is_empty() {
        return Err(format!("no topic {topics}"));
    }
    let deadline = std::time::Instant::now() + timeout;
    let mut counts: HashMap<i64, u64> = HashMap::new();
    let mut check = TopicCheck::default();
    for (topic, partitions) in &found {
        read_ids(
            brokers,
            topic,
            partitions,
            deadline,
            &mut counts,
            &mut check,
        )?;
    }
    check.distinct_ids = counts.len() as u64;
    for (id, n) in &counts {
        if *n > 1 {
            check.duplicates += n - 1;
            if check.duplicate_sample.len() < 20 {
                check.duplicate_sample.push(*id);
            }
        }
        if !source_ids.contains(id) {
            check.extra += 1;
        }
    }
    for id in source_ids {
        if !counts.contains_key(id) {
            check.missing += 1;
            if check.missing_sample.len() < 20 {
                check.missing_sample.push(*id);
            }
        }
    }
    Ok(check)
}

/// The outbox ids pg_start holds.
pub async fn source_ids(source: &Client) -> Result<HashSet<i64>, tokio_postgres::Error> {
    Ok(source
        .query("SELECT id FROM outbox.transactions", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Rows in pg_end's dead-letter table.
pub async fn dead_letters(target: &Client) -> Result<i64, tokio_postgres::Error> {
    Ok(target
        .query_one("SELECT count(*) FROM outbox_relay.dead_letters", &[])
        .await?
        .get(0))
}

/// The broker (node id) leading `partition` of `topic`.
pub fn partition_leader(brokers: &str, topic: &str, partition: i32) -> Option<u8> {
    let consumer: BaseConsumer<Quiet> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create_with_context(Quiet)
        .ok()?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .ok()?;
    let leader = metadata
        .topics()
        .first()?
        .partitions()
        .iter()
        .find(|p| p.id() == partition)?
        .leader();
    u8::try_from(leader).ok().filter(|n| (1..=3).contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(v: u64) -> Lsn {
        Lsn(v)
    }

    #[test]
    fn topic_samples_hold_only_committed_records_below_their_watermark() {
        let history = [(2, lsn(10)), (5, lsn(20)), (9, lsn(30))];
        let samples = [
            Sample {
                confirmed: lsn(20),
                held: Held::TopicBelow(5),
            },
            Sample {
                confirmed: lsn(20),
                held: Held::TopicBelow(6),
            },
            Sample {
                confirmed: lsn(1),
                held: Held::TopicBelow(0),
            },
            Sample {
                confirmed: lsn(7),
                held: Held::Lsn(lsn(7)),
            },
        ];
        let held: Vec<Lsn> = resolve_samples(&samples, &history)
            .iter()
            .map(|s| s.held)
            .collect();
        assert_eq!(held, [lsn(10), lsn(20), Lsn::ZERO, lsn(7)]);
    }

    #[test]
    fn a_confirmation_past_a_held_commit_is_a_violation() {
        let commits = [lsn(10), lsn(20), lsn(30)];
        let ok = [
            LsnSample {
                confirmed: lsn(20),
                held: lsn(20),
            },
            LsnSample {
                confirmed: lsn(25),
                held: lsn(20),
            },
            LsnSample {
                confirmed: lsn(99),
                held: lsn(0),
            },
        ];
        assert_eq!(judge_lsns(&ok, &commits).violations, 0);
        let bad = [LsnSample {
            confirmed: lsn(30),
            held: lsn(20),
        }];
        let check = judge_lsns(&bad, &commits);
        assert_eq!(check.violations, 1);
        assert!(check.first_violation.is_some());
    }
}
