//! Kafka plumbing: topic creation, the transactional producer, and the compacted
//! progress topic.
//!
//! # The progress topic (the KIP-618 idea)
//! Every Kafka transaction the connector commits also writes, to a compacted topic
//! keyed by slot name, the commit end LSN of the last source transaction it holds.
//! Because that record commits atomically with the data, "what Kafka holds" is known
//! exactly after any crash: the connector reads it back (`read_committed`) before
//! streaming and skips source transactions at or below it. The slot's confirmed LSN
//! may lag behind it (a crash between the Kafka commit and the slot confirmation)
//! without ever causing a duplicate.

pub mod encode;

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::lsn::Lsn;

#[derive(Debug, Error)]
pub enum KafkaSetupError {
    #[error("kafka client configuration was refused")]
    Config(#[source] KafkaError),
    #[error("creating topic {topic} failed")]
    CreateTopic {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("creating topic {topic} failed: {code}")]
    CreateTopicCode {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("reading the progress topic {topic} failed")]
    ReadProgress {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("reading the progress topic {topic} did not reach its end within {secs} s (are the brokers up?)")]
    ReadProgressTimeout { topic: String, secs: u64 },
    #[error(
        "the progress topic {topic} holds a record for slot {slot} that is not valid: {detail}"
    )]
    BadProgressRecord {
        topic: String,
        slot: String,
        detail: String,
    },
}

/// A topic to create if it is missing.
#[derive(Debug, Clone)]
pub struct TopicSpec<'a> {
    pub name: &'a str,
    pub partitions: i32,
    pub replication_factor: i32,
    pub configs: &'a [(&'a str, &'a str)],
}

/// Base client settings shared by every client the relay makes.
pub fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", "outbox-relay")
        .set("socket.keepalive.enable", "true");
    config
}

/// Creates `spec` if it does not exist; an existing topic is left as it is.
pub async fn ensure_topic(brokers: &str, spec: &TopicSpec<'_>) -> Result<(), KafkaSetupError> {
    let admin: AdminClient<DefaultClientContext> = client_config(brokers)
        .create()
        .map_err(KafkaSetupError::Config)?;
    let mut topic = NewTopic::new(
        spec.name,
        spec.partitions,
        TopicReplication::Fixed(spec.replication_factor),
    );
    for (key, value) in spec.configs {
        topic = topic.set(key, value);
    }
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(30)))
        .request_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .map_err(|source| KafkaSetupError::CreateTopic {
            topic: spec.name.to_string(),
            source,
        })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(KafkaSetupError::CreateTopicCode { topic, code }),
        }
    }
    Ok(())
}

/// The value of a progress record. Key: the slot name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRecord {
    /// `snapshot`: the relay created the slot and is emitting the rows that were in
    /// the outbox at that moment; nothing of the slot's stream is in Kafka yet.
    /// `streaming`: everything up to `lsn` is in Kafka.
    pub state: ProgressState,
    /// Commit end LSN of the last source transaction in Kafka, as `X/X`.
    pub lsn: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressState {
    Snapshot,
    Streaming,
}

impl ProgressRecord {
    pub fn streaming(lsn: Lsn) -> Self {
        Self {
            state: ProgressState::Streaming,
            lsn: lsn.to_string(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The LSN, parsed.
    pub fn lsn(&self) -> Option<Lsn> {
        self.lsn.parse().ok()
    }
}

/// Reads the last committed progress record of `slot` from the progress topic.
///
/// Blocking: call it from `spawn_blocking`. It reads the single partition with
/// `isolation.level=read_committed` up to its end (the last stable offset), so an
/// open transaction of a fenced predecessor is either resolved or invisible.
pub fn read_progress(
    brokers: &str,
    topic: &str,
    slot: &str,
    timeout: Duration,
) -> Result<Option<ProgressRecord>, KafkaSetupError> {
    let read_error = |source| KafkaSetupError::ReadProgress {
        topic: topic.to_string(),
        source,
    };
    let consumer: BaseConsumer = client_config(brokers)
        .set("group.id", "outbox-relay-progress-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(KafkaSetupError::Config)?;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(read_error)?;
    consumer.assign(&assignment).map_err(read_error)?;

    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if Instant::now() >= deadline {
            return Err(KafkaSetupError::ReadProgressTimeout {
                topic: topic.to_string(),
                secs: timeout.as_secs(),
            });
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(error)) => {
                tracing::debug!(%error, "progress topic read error, retrying");
                continue;
            }
            Some(Ok(message)) => {
                if message.key() != Some(slot.as_bytes()) {
                    continue;
                }
                match message.payload() {
                    // A tombstone: the slot's progress was deleted on purpose.
                    None => last = None,
                    Some(payload) => {
                        let record: ProgressRecord =
                            serde_json::from_slice(payload).map_err(|e| {
                                KafkaSetupError::BadProgressRecord {
                                    topic: topic.to_string(),
                                    slot: slot.to_string(),
                                    detail: e.to_string(),
                                }
                            })?;
                        if record.lsn().is_none() {
                            return Err(KafkaSetupError::BadProgressRecord {
                                topic: topic.to_string(),
                                slot: slot.to_string(),
                                detail: format!("lsn {:?} is not an LSN", record.lsn),
                            });
                        }
                        last = Some(record);
                    }
                }
            }
        }
    }
    Ok(last)
}
