//! Replay: start a sink from an earlier position than pg_end's stored offsets
//! (`--from-beginning`, `--from-offset N`, `--from-timestamp MS`).
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

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;

use crate::kafka::{self, topic_partitions, TopicLookupError};

/// How long the lookups of a replay position may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where to start instead of pg_end's stored offsets (at most one of the three).
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
}

impl ReplayArgs {
    /// Whether any replay was asked for.
    pub fn is_set(&self) -> bool {
        self.from_beginning || self.from_offset.is_some() || self.from_timestamp.is_some()
    }
}

/// A replay position, resolved: where each partition starts on its first assignment.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplayStart {
    Beginning,
    Offset(i64),
    /// Per partition (from a timestamp); a partition not listed starts at its end.
    Offsets(HashMap<i32, Offset>),
}

impl ReplayStart {
    /// The start offset of `partition`.
    pub fn offset_of(&self, partition: i32) -> Offset {
        match self {
            Self::Beginning => Offset::Beginning,
            Self::Offset(offset) => Offset::Offset(*offset),
            Self::Offsets(offsets) => offsets.get(&partition).copied().unwrap_or(Offset::End),
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
    #[error("the replay lookup task failed: {0}")]
    Task(String),
}

/// Resolves `args` (blocking for a timestamp: one metadata and one offsets request).
pub async fn resolve(
    args: &ReplayArgs,
    brokers: &str,
    topic: &str,
) -> Result<Option<ReplayStart>, ReplayError> {
    if args.from_beginning {
        return Ok(Some(ReplayStart::Beginning));
    }
    if let Some(offset) = args.from_offset {
        return Ok(Some(ReplayStart::Offset(offset)));
    }
    let Some(timestamp_ms) = args.from_timestamp else {
        return Ok(None);
    };
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || offsets_for_timestamp(&brokers, &topic, timestamp_ms))
        .await
        .map_err(|e| ReplayError::Task(e.to_string()))?
        .map(|offsets| Some(ReplayStart::Offsets(offsets)))
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
    fn the_three_options_exclude_each_other() {
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
    }

    #[test]
    fn start_offsets_per_partition() {
        assert_eq!(ReplayStart::Beginning.offset_of(2), Offset::Beginning);
        assert_eq!(ReplayStart::Offset(5).offset_of(0), Offset::Offset(5));
        let by_time = ReplayStart::Offsets(HashMap::from([(0, Offset::Offset(9))]));
        assert_eq!(by_time.offset_of(0), Offset::Offset(9));
        assert_eq!(by_time.offset_of(1), Offset::End);
    }
}
