//! Replay: start a sink from an earlier position than pg_end's stored offsets
//! (`--from-beginning`, `--from-offset N`, `--from-timestamp MS`, `--from-lsn LSN`).
//!
//! Invariant: replaying never changes what pg_end counts. Every replayed record that
//! was applied before is a duplicate for [`crate::apply`] (its id is already there:
//! nothing is inserted or credited), a replayed bad record finds its dead letter
//! already there (unique on topic, partition, offset), and the stored offset only moves
//! forward, so a replayed batch below it leaves it where it is. What replay can do is
//! apply records that pg_end lacks below its stored offset, for instance after pg_end
//! was restored from a backup older than its offsets, or after rows were deleted by hand.
//!
//! The override applies to each partition the first time this process is assigned it;
//! when a rebalance later hands the partition back, it resumes from pg_end as always,
//! so a rebalance in the middle of a replay does not start it over. A timestamp is
//! resolved to offsets once, before the consumer joins its group (`offsets_for_times`:
//! the first offset whose timestamp is at or after it; the end of a partition that has
//! none).
//!
//! A source position (`--from-lsn`) is resolved the same way, by a binary search of each
//! partition on the records' `outbox-relay.lsn` header (the source transaction's commit
//! LSN). It rests on one property of the connector's topics: within a partition, the
//! committed records' LSNs never decrease with the offset (batches are committed one
//! after another in source commit order, and a key's records keep their order). Reading
//! `read_committed`, the first visible record at or after an offset is a monotone
//! function of the offset, so the search finds the first committed record whose LSN is
//! at or after the position, skipping aborted records and transaction markers. A record
//! without the header (not written by the connector) stops the search with an error
//! rather than guess.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;

use rdkafka::message::{Headers, Message};

use crate::kafka::{self, topic_partitions, EndOfPartitionIsExpected, TopicLookupError};
use crate::lsn::Lsn;
use crate::record::HEADER_LSN;

/// How long the lookups of a replay position may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where to start instead of pg_end's stored offsets (at most one of the four).
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
#[group(multiple = false)]
pub struct ReplayArgs {
    /// Replay every partition from its first record (records already applied are
    /// duplicates and change nothing). Only the first assignment of each partition.
    #[arg(long)]
    pub from_beginning: bool,
    /// Replay every partition from this offset (the first record if it is older).
    /// Only the first assignment of each partition.
    #[arg(long, value_name = "OFFSET", value_parser = clap::value_parser!(i64).range(0..))]
    pub from_offset: Option<i64>,
    /// Replay every partition from its first record with a timestamp at or after this
    /// one (milliseconds since the epoch). Only the first assignment of each partition.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(i64).range(0..))]
    pub from_timestamp: Option<i64>,
    /// Replay every partition from its first record of a source transaction that
    /// committed at or after this source position (`X/Y`, as PostgreSQL prints an LSN:
    /// a slot's `confirmed_flush_lsn`, a `status` line). Only the first assignment of
    /// each partition.
    #[arg(long, value_name = "LSN")]
    pub from_lsn: Option<Lsn>,
}

impl ReplayArgs {
    /// Whether any replay was asked for.
    pub fn is_set(&self) -> bool {
        self.from_beginning
            || self.from_offset.is_some()
            || self.from_timestamp.is_some()
            || self.from_lsn.is_some()
    }
}

/// A replay position, resolved: where each partition starts on its first assignment.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplayStart {
    Beginning,
    Offset(i64),
    /// Per (topic, partition) (from a timestamp or an LSN); a partition not listed
    /// starts at its end.
    Offsets(HashMap<(String, i32), Offset>),
}

impl ReplayStart {
    /// The start offset of `partition` of `topic`.
    pub fn offset_of(&self, topic: &str, partition: i32) -> Offset {
        match self {
            Self::Beginning => Offset::Beginning,
            Self::Offset(offset) => Offset::Offset(*offset),
            Self::Offsets(offsets) => offsets
                .get(&(topic.to_string(), partition))
                .copied()
                .unwrap_or(Offset::End),
        }
    }
}

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("cannot create a Kafka client to look up the replay position")]
    Client(#[source] KafkaError),
    #[error("cannot read the partitions of topic {topic}")]
    Topic {
        topic: String,
        #[source]
        source: TopicLookupError,
    },
    #[error("cannot look up the offsets of timestamp {timestamp_ms} ms in topic {topic}")]
    Times {
        topic: String,
        timestamp_ms: i64,
        #[source]
        source: KafkaError,
    },
    #[error(
        "cannot read topic {topic} partition {partition} at offset {offset} to find LSN {lsn}"
    )]
    Read {
        topic: String,
        partition: i32,
        offset: i64,
        lsn: Lsn,
        #[source]
        source: KafkaError,
    },
    #[error(
        "topic {topic} partition {partition} offset {offset} has no readable {HEADER_LSN} header \
         ({found}): --from-lsn works on the connector's records; use --from-offset or \
         --from-timestamp for this topic"
    )]
    NoLsn {
        topic: String,
        partition: i32,
        offset: i64,
        found: String,
    },
    #[error("the replay lookup task failed: {0}")]
    Task(String),
    #[error("a replay from a timestamp or an LSN needs topic names, not the pattern {0:?}")]
    Pattern(String),
}

/// Resolves `args` for `topics` (blocking for a timestamp or an LSN: one lookup per
/// topic). A topic pattern (`^…`) cannot be looked up: name the topics.
pub async fn resolve(
    args: &ReplayArgs,
    brokers: &str,
    topics: &[String],
) -> Result<Option<ReplayStart>, ReplayError> {
    if args.from_beginning {
        return Ok(Some(ReplayStart::Beginning));
    }
    if let Some(offset) = args.from_offset {
        return Ok(Some(ReplayStart::Offset(offset)));
    }
    if args.from_lsn.is_none() && args.from_timestamp.is_none() {
        return Ok(None);
    }
    let mut all = HashMap::new();
    for topic in topics {
        if topic.starts_with('^') {
            return Err(ReplayError::Pattern(topic.clone()));
        }
        let (brokers, name) = (brokers.to_string(), topic.to_string());
        let (lsn, timestamp_ms) = (args.from_lsn, args.from_timestamp);
        let offsets = tokio::task::spawn_blocking(move || match lsn {
            Some(lsn) => offsets_for_lsn(&brokers, &name, lsn),
            None => offsets_for_timestamp(&brokers, &name, timestamp_ms.unwrap_or_default()),
        })
        .await
        .map_err(|e| ReplayError::Task(e.to_string()))??;
        all.extend(
            offsets
                .into_iter()
                .map(|(partition, offset)| ((topic.clone(), partition), offset)),
        );
    }
    Ok(Some(ReplayStart::Offsets(all)))
}

fn offsets_for_timestamp(
    brokers: &str,
    topic: &str,
    timestamp_ms: i64,
) -> Result<HashMap<i32, Offset>, ReplayError> {
    let consumer: BaseConsumer = kafka::client_config(brokers)
        .set("group.id", "outbox-relay-replay-lookup")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(ReplayError::Client)?;
    let partitions = topic_partitions(&consumer, topic, LOOKUP_TIMEOUT).map_err(|source| {
        ReplayError::Topic {
            topic: topic.to_string(),
            source,
        }
    })?;
    let times_error = |source| ReplayError::Times {
        topic: topic.to_string(),
        timestamp_ms,
        source,
    };
    let mut query = TopicPartitionList::new();
    for partition in &partitions {
        query
            .add_partition_offset(topic, *partition, Offset::Offset(timestamp_ms))
            .map_err(times_error)?;
    }
    let answer = consumer
        .offsets_for_times(query, LOOKUP_TIMEOUT)
        .map_err(times_error)?;
    let mut offsets = HashMap::new();
    for element in answer.elements() {
        if let Err(error) = element.error() {
            return Err(times_error(error));
        }
        // -1 (no record at or after the timestamp) comes back as Offset::End.
        offsets.insert(element.partition(), element.offset());
    }
    tracing::info!(topic, timestamp_ms, ?offsets, "replay offsets resolved");
    Ok(offsets)
}

/// Per partition, the offset of the first committed record whose source transaction
/// committed at or after `lsn` (the partition's end if none): a binary search, see the
/// module doc.
fn offsets_for_lsn(
    brokers: &str,
    topic: &str,
    lsn: Lsn,
) -> Result<HashMap<i32, Offset>, ReplayError> {
    let consumer: BaseConsumer<EndOfPartitionIsExpected> =
        kafka::read_to_end_config(brokers, "outbox-relay-replay-lookup")
            .create_with_context(EndOfPartitionIsExpected)
            .map_err(ReplayError::Client)?;
    let partitions = topic_partitions(&consumer, topic, LOOKUP_TIMEOUT).map_err(|source| {
        ReplayError::Topic {
            topic: topic.to_string(),
            source,
        }
    })?;
    let mut offsets = HashMap::new();
    for partition in partitions {
        let read_error = |offset, source| ReplayError::Read {
            topic: topic.to_string(),
            partition,
            offset,
            lsn,
            source,
        };
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, LOOKUP_TIMEOUT)
            .map_err(|source| read_error(0, source))?;
        // Committed records below `lo` are before `lsn`; those at or after `hi`, at or
        // after it.
        let (mut lo, mut hi) = (low, high);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match first_committed_at(&consumer, topic, partition, mid)
                .map_err(|source| read_error(mid, source))?
            {
                None => hi = mid,
                Some(found) if lsn_of(topic, partition, &found)? >= lsn => hi = mid,
                Some((offset, _)) => lo = offset + 1,
            }
        }
        offsets.insert(partition, Offset::Offset(lo));
    }
    tracing::info!(topic, %lsn, ?offsets, "replay offsets resolved");
    Ok(offsets)
}

/// A record's offset and the raw value of its LSN header.
type Found = (i64, Result<Vec<u8>, String>);

/// The first committed record of `partition` at or after `offset`: its offset and LSN
/// header, or `None` at the end of the committed records.
fn first_committed_at(
    consumer: &BaseConsumer<EndOfPartitionIsExpected>,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<Found>, KafkaError> {
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + LOOKUP_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(KafkaError::MessageConsumption(
                rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
            ));
        }
        match consumer.poll(left.min(Duration::from_millis(100))) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(None),
            Some(Err(error)) => return Err(error),
            // A record fetched before this assignment's position moved is not the one
            // asked for.
            Some(Ok(message)) if message.offset() < offset => {}
            Some(Ok(message)) => {
                let header = message.headers().and_then(|headers| {
                    headers
                        .iter()
                        .find(|h| h.key == HEADER_LSN)
                        .and_then(|h| h.value.map(<[u8]>::to_vec))
                });
                let found = header.ok_or_else(|| "none".to_string());
                return Ok(Some((message.offset(), found)));
            }
        }
    }
}

fn lsn_of(topic: &str, partition: i32, found: &Found) -> Result<Lsn, ReplayError> {
    let no_lsn = |what: String| ReplayError::NoLsn {
        topic: topic.to_string(),
        partition,
        offset: found.0,
        found: what,
    };
    let raw = found.1.as_ref().map_err(|e| no_lsn(e.clone()))?;
    std::str::from_utf8(raw)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| no_lsn(format!("{:?}", String::from_utf8_lossy(raw))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        replay: ReplayArgs,
    }

    #[test]
    fn the_four_options_exclude_each_other() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|c| c.replay)
        };
        assert_eq!(parse(&[]).unwrap(), ReplayArgs::default());
        assert!(!parse(&[]).unwrap().is_set());
        assert!(parse(&["--from-beginning"]).unwrap().from_beginning);
        assert_eq!(parse(&["--from-offset", "7"]).unwrap().from_offset, Some(7));
        assert!(parse(&["--from-offset", "-1"]).is_err());
        assert!(parse(&["--from-beginning", "--from-offset", "3"]).is_err());
        assert!(parse(&["--from-offset", "3", "--from-timestamp", "5"]).is_err());
        assert_eq!(
            parse(&["--from-lsn", "0/16B3748"]).unwrap().from_lsn,
            Some("0/16B3748".parse().unwrap())
        );
        assert!(parse(&["--from-lsn", "nonsense"]).is_err());
        assert!(parse(&["--from-lsn", "0/1", "--from-beginning"]).is_err());
    }

    #[test]
    fn start_offsets_per_partition() {
        assert_eq!(ReplayStart::Beginning.offset_of("t", 2), Offset::Beginning);
        assert_eq!(ReplayStart::Offset(5).offset_of("t", 0), Offset::Offset(5));
        let by_time = ReplayStart::Offsets(HashMap::from([(("t".into(), 0), Offset::Offset(9))]));
        assert_eq!(by_time.offset_of("t", 0), Offset::Offset(9));
        assert_eq!(by_time.offset_of("t", 1), Offset::End);
        assert_eq!(by_time.offset_of("u", 0), Offset::End, "per topic");
    }
}
