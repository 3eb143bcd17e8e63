//! The checkers of a chaos run, beyond `verify`:
//! - the slot's `confirmed_flush_lsn` never passed what the next stage held, sampled
//!   all along the run and judged afterwards against a `test_decoding` witness slot;
//! - the topic, read with `read_committed`, holds every outbox id exactly once;
//! - the dead-letter table is empty.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;
use tokio_postgres::Client;

use crate::kafka::{ProgressRecord, ProgressState};
use crate::lsn::Lsn;
use crate::pg;

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

/// One sample: the slot's confirmed LSN, then what the next stage held (read after).
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
) -> Vec<LsnSample> {
    let mut samples = Vec::new();
    let mut source: Option<Client> = None;
    let mut target: Option<Client> = None;
    // The progress topic is read from where the previous sample left it.
    let mut topic_pos = Offset::Beginning;
    let mut topic_held = Lsn::ZERO;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(every).await;
        if source.is_none() {
            source = timed(5, async { pg::connect(&source_url).await.ok() }).await;
        }
        let Some(client) = source.as_ref() else {
            continue;
        };
        let confirmed = timed(5, async {
            let row = client
                .query_opt(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .map_err(|_| ())
                .ok()?;
            Some(row.and_then(|r| r.get::<_, Option<String>>(0)))
        })
        .await;
        let confirmed = match confirmed {
            None => {
                source = None;
                continue;
            }
            Some(None) => continue, // no slot yet
            Some(Some(text)) => match text.parse::<Lsn>() {
                Ok(lsn) => lsn,
                Err(_) => continue,
            },
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
                    Some(None) => Lsn::ZERO,
                    Some(Some(text)) => text.parse().unwrap_or(Lsn::ZERO),
                }
            }
            NextStage::ProgressTopic { brokers, topic } => {
                let (brokers, topic, slot2) = (brokers.clone(), topic.clone(), slot.clone());
                let from = topic_pos;
                let read = tokio::task::spawn_blocking(move || {
                    read_progress_from(&brokers, &topic, &slot2, from, Duration::from_secs(8))
                })
                .await
                .ok()
                .flatten();
                match read {
                    None => continue,
                    Some((pos, held)) => {
                        topic_pos = pos;
                        if let Some(held) = held {
                            topic_held = held;
                        }
                        topic_held
                    }
                }
            }
        };
        samples.push(LsnSample { confirmed, held });
    }
    samples
}

/// Reads the progress partition from `from` to its last stable offset (a fresh
/// `read_committed` consumer, so reaching the end means everything committed before
/// this call is seen). Returns the position reached and the last streaming LSN of
/// `slot` among the records read, or `None` if the end was not reached in time.
fn read_progress_from(
    brokers: &str,
    topic: &str,
    slot: &str,
    from: Offset,
    timeout: Duration,
) -> Option<(Offset, Option<Lsn>)> {
    let consumer: BaseConsumer<Quiet> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-relay-chaos-sampler")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("socket.timeout.ms", "5000")
        .create_with_context(Quiet)
        .ok()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, from).ok()?;
    consumer.assign(&assignment).ok()?;
    let deadline = std::time::Instant::now() + timeout;
    let mut pos = from;
    let mut held = None;
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => return Some((pos, held)),
            Some(Err(_)) => {}
            Some(Ok(message)) => {
                pos = Offset::Offset(message.offset() + 1);
                if message.key() != Some(slot.as_bytes()) {
                    continue;
                }
                let record: Option<ProgressRecord> = message
                    .payload()
                    .and_then(|p| serde_json::from_slice(p).ok());
                if let Some(record) = record {
                    if record.state == ProgressState::Streaming {
                        held = record.lsn();
                    }
                }
            }
        }
    }
    None
}

/// Creates a `test_decoding` slot that records every transaction from now on.
pub async fn create_witness(source: &Client, name: &str) -> Result<(), tokio_postgres::Error> {
    source
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&name],
        )
        .await
        .map(|_| ())
}

/// The commit end LSN of every transaction that inserted into the outbox since the
/// witness was created, ascending.
pub async fn witness_commits(
    source: &Client,
    witness: &str,
) -> Result<Vec<Lsn>, tokio_postgres::Error> {
    let rows = source
        .query(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_changes($1, NULL, NULL)",
            &[&witness],
        )
        .await?;
    let mut commits = Vec::new();
    let mut touches_outbox = false;
    for row in rows {
        let data: &str = row.get(1);
        if data.starts_with("BEGIN") {
            touches_outbox = false;
        } else if data.starts_with("table outbox.transactions: INSERT") {
            touches_outbox = true;
        } else if data.starts_with("COMMIT") && touches_outbox {
            if let Ok(lsn) = row.get::<_, &str>(0).parse() {
                commits.push(lsn);
            }
        }
    }
    commits.sort();
    Ok(commits)
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

/// Reads every committed record of `topic` and compares its ids with `source_ids`.
pub fn check_topic(
    brokers: &str,
    topic: &str,
    source_ids: &HashSet<i64>,
    timeout: Duration,
) -> Result<TopicCheck, String> {
    let consumer: BaseConsumer<Quiet> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-relay-chaos-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create_with_context(Quiet)
        .map_err(|e| format!("consumer: {e}"))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .first()
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(format!("topic {topic} has no partitions"));
    }
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        assignment
            .add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut at_end = HashSet::new();
    let mut counts: HashMap<i64, u64> = HashMap::new();
    let mut check = TopicCheck::default();
    let deadline = std::time::Instant::now() + timeout;
    while at_end.len() < partitions.len() {
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "reading {topic} did not reach its end in {timeout:?}"
            ));
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
