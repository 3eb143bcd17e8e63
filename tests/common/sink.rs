//! Helpers for the tests of the sink and of what it leaves in pg_end (`tests/sink.rs`,
//! `tests/apply.rs`, `tests/replay.rs`, `tests/status.rs`): records produced to a test's
//! own topic, a sink consuming them, and pg_end's stored offsets and dead letters.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use super::{count, Relay, TestDbs, BROKERS};

/// The producer's limit: above the sink's 1 MiB, so that tests can send `oversized`
/// values (their topic must accept them too).
pub const MAX_MESSAGE_BYTES: &str = "3145728";

/// A row of the source's `main.transactions`, as PostgreSQL prints it.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub account_id: i64,
    pub amount: String,
    pub created_at: String,
}

/// A record to produce.
#[derive(Debug, Clone, Default)]
pub struct Out {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Out {
    pub fn value(value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: None,
            value: Some(value.into()),
            headers: Vec::new(),
        }
    }
}

/// The source's `main.transactions`, by id.
pub async fn source_rows(dbs: &TestDbs) -> Vec<Row> {
    dbs.source()
        .await
        .query(
            "SELECT id, account_id, amount::text, created_at::text FROM main.transactions ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Row {
            id: r.get(0),
            account_id: r.get(1),
            amount: r.get(2),
            created_at: r.get(3),
        })
        .collect()
}

/// The seed's producer: key `str(id)`, Python's `json.dumps` spacing, integer amount.
pub fn seed(row: &Row) -> Out {
    Out {
        key: Some(row.id.to_string().into_bytes()),
        value: Some(
            format!(
                r#"{{"id": {}, "account_id": {}, "amount": {}, "created_at": "{}"}}"#,
                row.id, row.account_id, row.amount, row.created_at
            )
            .into_bytes(),
        ),
        headers: Vec::new(),
    }
}

/// An idempotent `acks=all` producer that may send values up to [`MAX_MESSAGE_BYTES`].
pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.max.bytes", MAX_MESSAGE_BYTES)
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// Produces `records` in order and returns the last offset written to each partition.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    records: &[Out],
) -> BTreeMap<i32, i64> {
    let mut last = BTreeMap::new();
    for chunk in records.chunks(5000) {
        let sends = chunk.iter().map(|out| {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic);
            if let Some(key) = &out.key {
                record = record.key(key.as_slice());
            }
            if let Some(value) = &out.value {
                record = record.payload(value.as_slice());
            }
            if !out.headers.is_empty() {
                let mut headers = OwnedHeaders::new();
                for (key, value) in &out.headers {
                    headers = headers.insert(Header {
                        key,
                        value: Some(value.as_slice()),
                    });
                }
                record = record.headers(headers);
            }
            producer.send(record, Duration::from_secs(120))
        });
        for result in futures_util::future::join_all(sends).await {
            let delivery = result.map_err(|(e, _)| e).expect("produce");
            let entry = last.entry(delivery.partition).or_insert(delivery.offset);
            *entry = (*entry).max(delivery.offset);
        }
    }
    last
}

/// Adds the last offsets `b` to `a`: the larger offset of each partition.
pub fn merge(a: &mut BTreeMap<i32, i64>, b: BTreeMap<i32, i64>) {
    for (p, o) in b {
        let e = a.entry(p).or_insert(o);
        *e = (*e).max(o);
    }
}

/// Spawns `outbox-relay sink` from `topic` into the pair's pg_end, in consumer group
/// `group`, with `extra` arguments; its output goes to [`Relay::log`].
pub fn spawn_sink(dbs: &TestDbs, topic: &str, group: &str, extra: &[&str]) -> Relay {
    let mut args = vec![
        "sink",
        "--target-url",
        &dbs.target_url,
        "--brokers",
        BROKERS,
        "--topic",
        topic,
        "--group",
        group,
    ];
    args.extend_from_slice(extra);
    Relay::spawn(&args, &[])
}

/// pg_end's stored offsets of `topic` (none while pg_end cannot be read).
pub async fn stored_offsets(dbs: &TestDbs, topic: &str) -> BTreeMap<i32, i64> {
    dbs.target()
        .await
        .query(
            "SELECT partition, last_offset FROM outbox_relay.sink_offsets WHERE topic = $1",
            &[&topic],
        )
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Waits until pg_end's stored offsets reach `last` in every partition, then checks
/// that they are exactly `last`.
pub async fn wait_offsets(
    dbs: &TestDbs,
    topic: &str,
    last: &BTreeMap<i32, i64>,
    timeout: Duration,
) {
    super::wait_until(
        "the sink's stored offsets reach the end",
        timeout,
        || async move {
            let stored = stored_offsets(dbs, topic).await;
            last.iter()
                .all(|(p, o)| stored.get(p).is_some_and(|s| s >= o))
        },
    )
    .await;
    assert_eq!(&stored_offsets(dbs, topic).await, last, "stored offsets");
}

/// The number of dead letters in pg_end.
pub async fn dead_letter_count(dbs: &TestDbs) -> i64 {
    count(
        &dbs.target_url,
        "SELECT count(*) FROM outbox_relay.dead_letters",
    )
    .await
}

/// pg_end's dead letters, by Kafka offset: (kind, error, value).
pub async fn dead_letters(dbs: &TestDbs) -> BTreeMap<i64, (String, String, Option<Vec<u8>>)> {
    dbs.target()
        .await
        .query(
            "SELECT kafka_offset, kind, error, record_value FROM outbox_relay.dead_letters",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect()
}
