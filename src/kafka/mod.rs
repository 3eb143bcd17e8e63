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
//!
//! Each slot has a progress topic of its own, `<progress-topic>.<slot>`
//! ([`progress_topic_of`]): a `read_committed` read stops at its partition's last
//! stable offset, which any open transaction on that partition holds back, so on a
//! shared partition one slot's open transaction (or a hung instance's, until its
//! timeout) stalled every other slot's start. On its own partition a slot waits only
//! for its own transactions, which its new instance's `init_transactions` resolves
//! before the read. The shared topic of earlier versions (`<progress-topic>` itself)
//! is read once, when the slot's own topic holds nothing yet.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;

use crate::error::ErrorClass;
use crate::progress::ProgressRecord;
use crate::secret::Secret;

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

impl KafkaSetupError {
    /// A refused configuration or a progress record that is not valid needs a person;
    /// the rest (brokers unreachable, a leader not elected yet) is retried.
    pub fn class(&self) -> ErrorClass {
        match self {
            KafkaSetupError::Config(_) | KafkaSetupError::BadProgressRecord { .. } => {
                ErrorClass::Definite
            }
            KafkaSetupError::CreateTopic { .. }
            | KafkaSetupError::CreateTopicCode { .. }
            | KafkaSetupError::ReadProgress { .. }
            | KafkaSetupError::ReadProgressTimeout { .. } => ErrorClass::Transient,
        }
    }
}

/// A topic to create if it is missing.
#[derive(Debug, Clone)]
pub struct TopicSpec<'a> {
    pub name: &'a str,
    pub partitions: i32,
    pub replication_factor: i32,
    pub configs: &'a [(&'a str, &'a str)],
}

/// Why a topic's partitions could not be listed.
#[derive(Debug, Error)]
pub enum TopicLookupError {
    #[error("the metadata request failed (are the brokers up?)")]
    Kafka(#[source] KafkaError),
    #[error("the brokers answered {0:?} (does the topic exist?)")]
    Topic(RDKafkaRespErr),
}

/// The partition ids of `topic`, ascending.
pub fn topic_partitions<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, TopicLookupError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(TopicLookupError::Kafka)?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(TopicLookupError::Topic(
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
        ));
    };
    if let Some(error) = found.error() {
        return Err(TopicLookupError::Topic(error));
    }
    let mut partitions: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
    partitions.sort_unstable();
    Ok(partitions)
}

/// Whether `client`'s metadata request (which also updates its own cache) finds
/// `topic` with partitions, each with a leader; `false` on any error or at `deadline`.
pub fn has_leaders<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    deadline: std::time::Instant,
) -> bool {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let Ok(metadata) = client.fetch_metadata(Some(topic), left.max(Duration::from_millis(1)))
    else {
        return false;
    };
    metadata.topics().iter().any(|t| {
        t.name() == topic
            && t.error().is_none()
            && !t.partitions().is_empty()
            && t.partitions()
                .iter()
                .all(|p| p.error().is_none() && p.leader() >= 0)
    })
}

/// Whether `topic` exists (the brokers' auto-creation is assumed off).
pub fn topic_exists(
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> Result<bool, TopicLookupError> {
    let consumer: BaseConsumer<EndOfPartitionIsExpected> = client_config(brokers)
        .create_with_context(EndOfPartitionIsExpected)
        .map_err(TopicLookupError::Kafka)?;
    match topic_partitions(&consumer, topic, timeout) {
        Ok(_) => Ok(true),
        Err(TopicLookupError::Topic(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART)) => {
            Ok(false)
        }
        Err(error) => Err(error),
    }
}

/// How many committed records `topic` holds (`read_committed`, every partition from
/// its beginning to its current end), and the last one's value. For small topics (the
/// dead letters): it reads them all.
pub fn read_committed_count(
    brokers: &str,
    topic: &str,
    timeout: Duration,
) -> Result<(u64, Option<Vec<u8>>), TopicLookupError> {
    let consumer: BaseConsumer<EndOfPartitionIsExpected> = client_config(brokers)
        .set("group.id", "outbox-relay-status")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create_with_context(EndOfPartitionIsExpected)
        .map_err(TopicLookupError::Kafka)?;
    let partitions = topic_partitions(&consumer, topic, timeout)?;
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        assignment
            .add_partition_offset(topic, *p, Offset::Beginning)
            .map_err(TopicLookupError::Kafka)?;
    }
    consumer
        .assign(&assignment)
        .map_err(TopicLookupError::Kafka)?;
    let deadline = Instant::now() + timeout;
    let mut at_end = std::collections::HashSet::new();
    let (mut count, mut last) = (0, None);
    while at_end.len() < partitions.len() && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Err(KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Ok(message)) => {
                at_end.remove(&message.partition());
                count += 1;
                last = message.payload().map(<[u8]>::to_vec);
            }
            Some(Err(error)) => return Err(TopicLookupError::Kafka(error)),
            None => {}
        }
    }
    if at_end.len() < partitions.len() {
        return Err(TopicLookupError::Kafka(KafkaError::MessageConsumption(
            RDKafkaErrorCode::RequestTimedOut,
        )));
    }
    Ok((count, last))
}

/// A librdkafka property given with `--kafka-property KEY=VALUE`: how the relay
/// reaches a secured cluster (TLS, SASL) without a flag per setting.
///
/// The value is a [`Secret`]: printed only for keys that cannot hold one.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaProperty {
    pub key: String,
    pub value: Secret,
}

/// Properties the relay sets itself because exactly-once rests on them; a
/// `--kafka-property` may not change them.
const RESERVED_PROPERTIES: [&str; 9] = [
    "bootstrap.servers",
    "group.id",
    "transactional.id",
    "enable.idempotence",
    "acks",
    "isolation.level",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "transaction.timeout.ms",
];

impl KafkaProperty {
    /// Parses `KEY=VALUE`; `KEY_file=PATH` reads the value of `KEY` from a file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| "a Kafka property must be KEY=VALUE".to_string())?;
        let key = key.trim();
        if key.is_empty() {
            return Err("a Kafka property must be KEY=VALUE".into());
        }
        let (key, value) = match key.strip_suffix("_file") {
            Some(real) => {
                let path = std::path::Path::new(value.trim());
                let secret = Secret::from_file(path)
                    .map_err(|e| format!("cannot read {key}={}: {e}", path.display()))?;
                (real, secret)
            }
            None => (key, Secret::new(value.trim())),
        };
        if RESERVED_PROPERTIES.contains(&key) {
            return Err(format!(
                "{key} is set by outbox-relay itself (exactly-once depends on it) and cannot be overridden"
            ));
        }
        Ok(Self {
            key: key.to_string(),
            value,
        })
    }

    /// Whether the value may be a credential: passwords, secrets, keys, JAAS and
    /// OAuth settings. Their values are never printed.
    pub fn is_sensitive(&self) -> bool {
        let key = self.key.to_ascii_lowercase();
        [
            "password",
            "secret",
            "jaas",
            "oauthbearer",
            "ssl.key.pem",
            "token",
        ]
        .iter()
        .any(|word| key.contains(word))
    }
}

impl std::fmt::Debug for KafkaProperty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for KafkaProperty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_sensitive() {
            write!(f, "{}={}", self.key, self.value)
        } else {
            write!(f, "{}={}", self.key, self.value.expose())
        }
    }
}

/// The `--kafka-property` settings of this process, applied by [`client_config`].
///
/// Process-wide because `client_config(brokers)` is called from every corner of the
/// relay; the command sets them once, at start, before it makes any client.
static CLIENT_PROPERTIES: std::sync::RwLock<Vec<KafkaProperty>> =
    std::sync::RwLock::new(Vec::new());

/// Sets the properties every Kafka client of this process gets, and logs them with
/// their secrets redacted.
///
/// Each is checked first, as librdkafka will take it, so that a property it refuses
/// stops the command here, with an error that names the key and never shows the
/// value (librdkafka's own message carries the whole value: a pasted JAAS line with
/// its password, or a misspelt `sasl.pasword`). A `*.location` property must name a
/// file (or, for `ssl.ca.location`, a directory) this process can read.
pub fn set_client_properties(properties: &[KafkaProperty]) -> Result<(), String> {
    for property in properties {
        check_client_property(property)?;
    }
    if !properties.is_empty() {
        let shown: Vec<String> = properties.iter().map(ToString::to_string).collect();
        tracing::info!(properties = %shown.join(", "), "kafka client properties");
    }
    let mut current = CLIENT_PROPERTIES
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *current = properties.to_vec();
    Ok(())
}

/// Whether librdkafka takes `property`, and can read the file a `*.location` names.
fn check_client_property(property: &KafkaProperty) -> Result<(), String> {
    let key = property.key.as_str();
    let value = property.value.expose();
    let mut config = ClientConfig::new();
    config.set(key, value);
    if let Err(error) = config.create_native_config() {
        let reason = match error {
            KafkaError::ClientConfig(_, description, _, _) => description,
            other => other.to_string(),
        };
        // The description may quote the value (an invalid enum value does).
        let reason = if value.is_empty() || !property.is_sensitive() {
            reason
        } else {
            reason.replace(value, "<redacted>")
        };
        return Err(format!(
            "kafka property {key}: librdkafka refuses it: {}",
            reason.trim_end_matches('.')
        ));
    }
    if key.ends_with(".location") && !(key == "ssl.ca.location" && value == "probe") {
        let path = std::path::Path::new(value);
        let readable = if path.is_dir() && key == "ssl.ca.location" {
            std::fs::read_dir(path).map(drop)
        } else {
            std::fs::File::open(path).map(drop)
        };
        readable
            .map_err(|e| format!("kafka property {key}: cannot read {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Whether a `--kafka-property` sets `key`.
pub fn has_client_property(key: &str) -> bool {
    CLIENT_PROPERTIES
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .any(|property| property.key == key)
}

/// Base client settings shared by every client the relay makes: the bootstrap
/// servers, then the `--kafka-property` settings (security and tuning). Callers set
/// what their role needs after this, so those settings win.
pub fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", "outbox-relay")
        .set("socket.keepalive.enable", "true");
    let properties = CLIENT_PROPERTIES
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for property in properties.iter() {
        config.set(property.key.as_str(), property.value.expose());
    }
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

/// A `read_committed` consumer of group `group` that reads partitions to their end and
/// commits nothing: a fetch that finds nothing new comes back at once (10 ms, not the
/// broker's default 500 ms), since such a read waits for the end of the partition.
pub fn read_to_end_config(brokers: &str, group: &str) -> ClientConfig {
    let mut config = client_config(brokers);
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "10")
        .set("fetch.error.backoff.ms", "10");
    config
}

/// A consumer context for reading a partition to its end: reaching the end is the
/// goal, not an error worth a log line.
pub struct EndOfPartitionIsExpected;

impl rdkafka::ClientContext for EndOfPartitionIsExpected {
    fn error(&self, error: KafkaError, reason: &str) {
        let end_of_partition = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end_of_partition {
            tracing::warn!(%error, reason, "kafka client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for EndOfPartitionIsExpected {}

/// Repeats of one message within a window are counted, not logged: librdkafka reports
/// "all brokers are down" on every reconnect attempt, several times a second, for as
/// long as the brokers are unreachable. The first of each message is logged at once;
/// a repeat once the window has passed is logged with how many were held back.
pub struct Throttle {
    window: Duration,
    seen: std::sync::Mutex<HashMap<String, (Instant, u64)>>,
}

impl Throttle {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            seen: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// `Some(held back since the last one logged)` when `message` is to be logged now.
    pub fn admit(&self, message: &str) -> Option<u64> {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        match seen.get_mut(message) {
            Some((last, held)) if now.duration_since(*last) < self.window => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                // Bounded: messages carry broker names, not offsets; a few dozen at most.
                if seen.len() >= 256 {
                    seen.clear();
                }
                seen.insert(message.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

/// A client context that keeps the last error librdkafka reported, so that a failed
/// request can say why: a TLS handshake the broker refused (no client certificate, an
/// unknown CA), a failed SASL login, an address that does not resolve. librdkafka's
/// texts name brokers and causes, never a credential. The errors reach the context when
/// the client is polled.
#[derive(Default)]
pub struct LastClientError(std::sync::Mutex<Option<String>>);

impl LastClientError {
    /// The last error's text, if any.
    pub fn last(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl rdkafka::ClientContext for LastClientError {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "kafka client error");
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // "all brokers are down" follows each broker's own error and says less.
        if last.is_some() && error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            return;
        }
        *last = Some(if reason.is_empty() {
            error.to_string()
        } else {
            reason.to_string()
        });
    }
}

impl rdkafka::consumer::ConsumerContext for LastClientError {}

/// Why `consumer` could not fetch metadata: `error`, and the last broker's own reason
/// (a refused connection or TLS handshake, a failed login), which the error alone does
/// not say. librdkafka has queued each broker's reason; polling hands them to the
/// context (a poll that handled a log line returns None too: it polls for a while).
pub fn metadata_failure(
    consumer: &rdkafka::consumer::BaseConsumer<LastClientError>,
    error: &KafkaError,
) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
    while std::time::Instant::now() < deadline {
        let _ = consumer.poll(std::time::Duration::from_millis(50));
    }
    match consumer.context().last() {
        Some(cause) => format!("{error}; last error: {cause}"),
        None => error.to_string(),
    }
}

/// Why no broker of `brokers` answers a metadata request within `timeout` (the
/// brokers' own reason: a refused connection, a TLS handshake, a login), or `None`
/// when one does. Blocks: for a request that failed without saying why.
pub fn unreachable_because(brokers: &str, timeout: Duration) -> Option<String> {
    let consumer: BaseConsumer<LastClientError> = client_config(brokers)
        .create_with_context(LastClientError::default())
        .ok()?;
    match consumer.fetch_metadata(None, timeout) {
        Ok(_) => None,
        Err(error) => Some(metadata_failure(&consumer, &error)),
    }
}

/// The topic that holds `slot`'s progress records: `<base>.<slot>` (slot names are
/// `[a-z0-9_]`, so the name is a valid topic name). Everything that reads or writes a
/// slot's progress records by topic name goes through this function.
pub fn progress_topic_of(base: &str, slot: &str) -> String {
    format!("{base}.{slot}")
}

/// Reads the last committed progress record of `slot`: from its own topic
/// ([`progress_topic_of`]`(base, slot)`), or, while that holds nothing yet, from the
/// shared topic `base` that earlier versions wrote (a slot moving to this version
/// resumes where it was; its first commit writes to its own topic). `None`: the slot
/// has no progress (never used, or deleted on purpose with a tombstone).
///
/// Blocking: call it from `spawn_blocking`. Both reads together take at most
/// `timeout`.
pub fn read_progress(
    brokers: &str,
    base: &str,
    slot: &str,
    timeout: Duration,
) -> Result<Option<ProgressRecord>, KafkaSetupError> {
    let deadline = Instant::now() + timeout;
    let own = progress_topic_of(base, slot);
    if let Some(found) = read_progress_in(brokers, &own, slot, timeout, deadline)? {
        return Ok(found);
    }
    Ok(read_progress_in(brokers, base, slot, timeout, deadline)?.flatten())
}

/// Whether the progress topic `topic` exists, asked again until `deadline` while the
/// cluster cannot say (no broker, no leader yet).
fn progress_topic_exists(
    client: &BaseConsumer<EndOfPartitionIsExpected>,
    topic: &str,
    timeout: Duration,
    deadline: Instant,
) -> Result<bool, KafkaSetupError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match topic_partitions(client, topic, left.min(Duration::from_secs(5))) {
            Ok(_) => return Ok(true),
            Err(TopicLookupError::Topic(
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
            )) => return Ok(false),
            Err(error) => tracing::debug!(topic, %error, "progress topic metadata, retrying"),
        }
        if Instant::now() >= deadline {
            return Err(KafkaSetupError::ReadProgressTimeout {
                topic: topic.to_string(),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Reads the last committed progress record of `slot` from one progress topic's
/// partition: `None` when the topic does not exist or has never held a record,
/// `Some(None)` when it holds no live record of the slot (none, or a tombstone).
///
/// It reads the single partition with
/// `isolation.level=read_committed`, so only committed records count, up to the
/// partition's high watermark: every transaction with records below it must be
/// resolved first.
///
/// The end is asked for first (`ListOffsets`, as `read_uncommitted`: the high
/// watermark, not the last stable offset), and the read goes on until the consumer's
/// position reaches it. The last stable offset is not enough: a Kafka transaction is
/// committed once its coordinator has logged the decision, and the markers reach the
/// partitions after that. A session restarted in that window (same process, so no
/// `init_transactions` waits for the markers) read up to the last stable offset, below
/// the batch's own progress record, took the record before it, and sent the batch's
/// transactions again (chaos run 8, docs/reliability.md, finding 8). Waiting for the
/// high watermark waits for the markers; an open transaction of a hung predecessor
/// delays the read until it is aborted (by `init_transactions` or its timeout).
///
/// Nor is the end of partition that a fetch reports: a newly elected leader serves
/// fetches up to its own high watermark, which can lag behind records already
/// acknowledged to every producer until its followers fetch again, whereas
/// `ListOffsets` refuses to answer until it has caught up (KIP-207). Trusting the fetch's end made a restart right after a leader change
/// read the progress record *before* the last committed one, and send that batch's
/// transactions again (chaos run 6, docs/reliability.md, finding 7).
fn read_progress_in(
    brokers: &str,
    topic: &str,
    slot: &str,
    timeout: Duration,
    deadline: Instant,
) -> Result<Option<Option<ProgressRecord>>, KafkaSetupError> {
    let read_error = |source| KafkaSetupError::ReadProgress {
        topic: topic.to_string(),
        source,
    };
    let consumer: BaseConsumer<EndOfPartitionIsExpected> =
        read_to_end_config(brokers, "outbox-relay-progress-reader")
            .create_with_context(EndOfPartitionIsExpected)
            .map_err(KafkaSetupError::Config)?;
    // The high watermark: a read_committed client would be told the last stable offset.
    let ends: BaseConsumer<EndOfPartitionIsExpected> = client_config(brokers)
        .set("isolation.level", "read_uncommitted")
        .create_with_context(EndOfPartitionIsExpected)
        .map_err(KafkaSetupError::Config)?;

    let timed_out = || KafkaSetupError::ReadProgressTimeout {
        topic: topic.to_string(),
        secs: timeout.as_secs(),
    };
    if !progress_topic_exists(&ends, topic, timeout, deadline)? {
        return Ok(None);
    }
    let (low, end) = loop {
        match ends.fetch_watermarks(topic, 0, Duration::from_secs(5)) {
            Ok(watermarks) => break watermarks,
            Err(error) => {
                // Among others: the leader's high watermark is not caught up yet.
                tracing::debug!(%error, "progress topic end offset, retrying");
                if Instant::now() >= deadline {
                    return Err(timed_out());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let reached_end = || {
        consumer.position().ok().is_some_and(|list| {
            list.find_partition(topic, 0)
                .is_some_and(|p| matches!(p.offset(), Offset::Offset(o) if o >= end))
        })
    };
    if end == 0 {
        return Ok(None);
    }
    let mut last = None;
    if low >= end {
        return Ok(Some(None));
    }
    // From the log's start, known already: no offset lookup before the first fetch.
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Offset(low))
        .map_err(read_error)?;
    consumer.assign(&assignment).map_err(read_error)?;
    while !reached_end() {
        if Instant::now() >= deadline {
            return Err(timed_out());
        }
        // Short polls: the position passes the last transaction's marker without an
        // event, and each poll is the moment it is looked at again.
        match consumer.poll(Duration::from_millis(10)) {
            Some(Ok(message)) if message.key() == Some(slot.as_bytes()) => {
                // A tombstone: the slot's progress was deleted on purpose.
                last = message
                    .payload()
                    .map(|payload| parse_progress(topic, slot, payload))
                    .transpose()?;
            }
            Some(Err(error)) if !matches!(error, KafkaError::PartitionEOF(_)) => {
                tracing::debug!(%error, "progress topic read error, retrying");
            }
            // Another slot's record, the end of what a fetch returned, or nothing yet.
            _ => {}
        }
    }
    Ok(Some(last))
}

/// A progress record's value, checked.
fn parse_progress(
    topic: &str,
    slot: &str,
    payload: &[u8],
) -> Result<ProgressRecord, KafkaSetupError> {
    let bad = |detail: String| KafkaSetupError::BadProgressRecord {
        topic: topic.to_string(),
        slot: slot.to_string(),
        detail,
    };
    let record: ProgressRecord = serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))?;
    if record.lsn().is_none() {
        return Err(bad(format!("lsn {:?} is not an LSN", record.lsn)));
    }
    Ok(record)
}

#[cfg(test)]
mod property_tests {
    use super::*;

    #[test]
    fn a_throttle_admits_each_message_once_per_window_and_counts_the_rest() {
        let throttle = Throttle::new(Duration::from_millis(200));
        assert_eq!(throttle.admit("all brokers down"), Some(0));
        assert_eq!(throttle.admit("another"), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.admit("all brokers down"), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(throttle.admit("all brokers down"), Some(5));
        assert_eq!(throttle.admit("all brokers down"), None);
    }

    #[test]
    fn the_last_client_error_keeps_a_broker_s_reason_over_all_brokers_down() {
        use rdkafka::ClientContext;
        let context = LastClientError::default();
        assert_eq!(context.last(), None);
        let down = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        context.error(down.clone(), "3/3 brokers are down");
        assert_eq!(context.last().as_deref(), Some("3/3 brokers are down"));
        let reason = "ssl://k1:9093/bootstrap: SSL handshake failed: alert bad certificate";
        context.error(
            KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            reason,
        );
        context.error(down, "3/3 brokers are down");
        assert_eq!(context.last().as_deref(), Some(reason));
    }

    #[test]
    fn a_property_librdkafka_refuses_is_named_without_its_value() {
        let refused =
            |text: &str| check_client_property(&KafkaProperty::parse(text).unwrap()).unwrap_err();
        let jaas = refused(
            "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule \
             required username=\"relay\" password=\"TopSecretJaas\";",
        );
        assert!(
            jaas.contains("sasl.jaas.config") && jaas.contains("JAAS"),
            "{jaas}"
        );
        assert!(!jaas.contains("TopSecretJaas"), "{jaas}");
        let typo = refused("sasl.pasword=relay-secret");
        assert!(typo.contains("sasl.pasword"), "{typo}");
        assert!(!typo.contains("relay-secret"), "{typo}");
        let wrong = refused("security.protocol=ssll");
        assert!(wrong.contains("Invalid value \"ssll\""), "{wrong}");
        let wrong = refused("sasl.oauthbearer.method=hunter2");
        assert!(wrong.contains("sasl.oauthbearer.method"), "{wrong}");
        assert!(!wrong.contains("hunter2"), "{wrong}");
        let missing = refused("ssl.ca.location=/nonexistent/ca.pem");
        assert!(
            missing.contains("cannot read /nonexistent/ca.pem") && missing.contains("No such file"),
            "{missing}"
        );
        for fine in [
            "security.protocol=SASL_SSL",
            "sasl.password=hunter2",
            "ssl.ca.location=probe",
            "ssl.ca.location=/etc",
            "linger.ms=5",
        ] {
            assert_eq!(
                check_client_property(&KafkaProperty::parse(fine).unwrap()),
                Ok(()),
                "{fine}"
            );
        }
    }

    #[test]
    fn properties_parse_redact_and_refuse_what_exactly_once_rests_on() {
        let p = KafkaProperty::parse("security.protocol=SASL_SSL").unwrap();
        assert_eq!(p.to_string(), "security.protocol=SASL_SSL");
        let p = KafkaProperty::parse("sasl.password=hunter2").unwrap();
        assert_eq!(p.to_string(), "sasl.password=<redacted>");
        assert_eq!(format!("{p:?}"), "sasl.password=<redacted>");
        assert_eq!(p.value.expose(), "hunter2");
        assert!(KafkaProperty::parse("isolation.level=read_uncommitted")
            .unwrap_err()
            .contains("cannot be overridden"));
        assert!(KafkaProperty::parse("no-equals").is_err());

        let path =
            std::env::temp_dir().join(format!("outbox-relay-kafka-pw-{}", std::process::id()));
        std::fs::write(&path, "from-file\n").unwrap();
        let p = KafkaProperty::parse(&format!("sasl.password_file={}", path.display())).unwrap();
        assert_eq!(
            (p.key.as_str(), p.value.expose()),
            ("sasl.password", "from-file")
        );
        std::fs::remove_file(&path).unwrap();
    }
}
