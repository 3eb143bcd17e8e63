//! The sink against the real stack: Kafka → pg_end exactly once, through duplicates,
//! replays, bad input, SIGKILLs, a pg_end restart and a group of two.
//!
//! Each test fills its own source database (with `outbox_relay::load` or a bulk
//! insert), produces the source rows to its own random topic in one of the formats the
//! sink reads, runs the `outbox-relay sink` binary, and waits (polling with a deadline)
//! until `verify` passes against the source.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine;
use common::{random_name, Relay, TestDbs, BROKERS};
use outbox_relay::apply::{self, ApplyBatch, KafkaOffset, Origin, Progress, TxnRecord};
use outbox_relay::load::{self, LoadArgs};
use outbox_relay::lsn::Lsn;
use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

/// Topics accept values above the sink's 1 MiB limit, to test `oversized`.
const MAX_MESSAGE_BYTES: &str = "3145728";

/// A row of the source's `main.transactions`, as PostgreSQL prints it.
#[derive(Debug, Clone)]
struct Row {
    id: i64,
    account_id: i64,
    amount: String,
    created_at: String,
}

/// A record to produce.
#[derive(Debug, Clone, Default)]
struct Out {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

impl Out {
    fn value(value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: None,
            value: Some(value.into()),
            headers: Vec::new(),
        }
    }
}

async fn create_topic(partitions: i32) -> String {
    let name = random_name("sink");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(3))
            .set("max.message.bytes", MAX_MESSAGE_BYTES);
        let error = match admin.create_topics([&topic], &options).await {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => return name,
                Some(Err((_, code))) => code.to_string(),
                None => "no result".to_string(),
            },
            Err(error) => error.to_string(),
        };
        // A broker may be down for another test's fault; RF 3 needs all three.
        assert!(
            Instant::now() < deadline,
            "cannot create topic {name}: {error}"
        );
        eprintln!("creating topic {name}: {error}; retrying");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn producer() -> FutureProducer {
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
async fn produce(producer: &FutureProducer, topic: &str, records: &[Out]) -> BTreeMap<i32, i64> {
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

async fn source_rows(dbs: &TestDbs) -> Vec<Row> {
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
fn seed(row: &Row) -> Out {
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

/// The connector's records: key = account_id, compact JSON, `outbox-relay.*` headers.
fn connector(row: &Row, lsn: u64) -> Out {
    Out {
        key: Some(row.account_id.to_string().into_bytes()),
        value: Some(
            format!(
                r#"{{"id":{},"account_id":{},"amount":{},"created_at":"{}"}}"#,
                row.id, row.account_id, row.amount, row.created_at
            )
            .into_bytes(),
        ),
        headers: vec![
            ("outbox-relay.lsn".into(), format!("0/{lsn:X}").into_bytes()),
            ("outbox-relay.xid".into(), b"1234".to_vec()),
            (
                "outbox-relay.commit-ts".into(),
                b"2025-07-23 20:06:21.085330+00".to_vec(),
            ),
        ],
    }
}

fn epoch_micros(created_at: &str) -> i64 {
    chrono::NaiveDateTime::parse_from_str(created_at, "%Y-%m-%d %H:%M:%S%.f")
        .unwrap()
        .and_utc()
        .timestamp_micros()
}

/// Kafka Connect's decimal bytes: minimal big-endian two's complement, base64.
fn decimal_bytes(amount: &str) -> (i64, String) {
    let (int, frac) = amount.split_once('.').unwrap_or((amount, ""));
    let unscaled: i128 = format!("{int}{frac}").parse().unwrap();
    let bytes = unscaled.to_be_bytes();
    let mut start = 0;
    while start < 15
        && ((bytes[start] == 0 && bytes[start + 1] & 0x80 == 0)
            || (bytes[start] == 0xFF && bytes[start + 1] & 0x80 != 0))
    {
        start += 1;
    }
    (
        frac.len() as i64,
        base64::engine::general_purpose::STANDARD.encode(&bytes[start..]),
    )
}

/// A Debezium change event; every other one with the schema wrapper and the amount as
/// a `VariableScaleDecimal`, the others bare with the amount as a string.
fn debezium(row: &Row, with_schema: bool) -> Out {
    let micros = epoch_micros(&row.created_at);
    let value = if with_schema {
        let (scale, bytes) = decimal_bytes(&row.amount);
        serde_json::json!({
            "schema": {"type": "struct", "name": "dbserver.outbox.transactions.Envelope", "fields": [
                {"field": "before", "type": "struct", "optional": true, "fields": []},
                {"field": "after", "type": "struct", "optional": true, "fields": [
                    {"field": "id", "type": "int64"},
                    {"field": "account_id", "type": "int64"},
                    {"field": "amount", "type": "struct", "name": "io.debezium.data.VariableScaleDecimal"},
                    {"field": "created_at", "type": "int64", "name": "io.debezium.time.MicroTimestamp"}
                ]},
                {"field": "op", "type": "string"}
            ]},
            "payload": {
                "before": null,
                "after": {"id": row.id, "account_id": row.account_id,
                          "amount": {"scale": scale, "value": bytes}, "created_at": micros},
                "source": {"connector": "postgresql", "lsn": 123},
                "op": "c", "ts_ms": 1753301181085u64
            }
        })
    } else {
        serde_json::json!({
            "before": null,
            "after": {"id": row.id, "account_id": row.account_id, "amount": row.amount, "created_at": micros},
            "op": "r", "ts_ms": 1753301181085u64
        })
    };
    Out {
        key: Some(format!(r#"{{"id":{}}}"#, row.id).into_bytes()),
        value: Some(value.to_string().into_bytes()),
        headers: Vec::new(),
    }
}

fn spawn_sink(dbs: &TestDbs, topic: &str, group: &str, extra: &[&str]) -> Relay {
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

/// Polls `verify` until it passes; panics with its report after `timeout`. A failure
/// to read (a database restarting for some fault test) is retried like a difference.
async fn wait_verified(dbs: &TestDbs, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let source = outbox_relay::pg::connect(&dbs.source_url)
                .await
                .map_err(|e| e.to_string())?;
            let target = outbox_relay::pg::connect(&dbs.target_url)
                .await
                .map_err(|e| e.to_string())?;
            outbox_relay::verify::compare(&source, &target)
                .await
                .map_err(|e| e.to_string())
        };
        let outcome = match attempt.await {
            Ok(report) if report.ok => return,
            Ok(report) => report.render(),
            Err(error) => format!("cannot read: {error}"),
        };
        assert!(
            Instant::now() < deadline,
            "verify still fails after {timeout:?}:\n{outcome}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// pg_end's stored offsets of `topic` (none while pg_end cannot be read).
async fn stored_offsets(dbs: &TestDbs, topic: &str) -> BTreeMap<i32, i64> {
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

/// Waits until pg_end's stored offsets reach `last` in every partition.
async fn wait_offsets(dbs: &TestDbs, topic: &str, last: &BTreeMap<i32, i64>, timeout: Duration) {
    common::wait_until(
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

/// One number from pg_end, retried for a while if pg_end is restarting.
async fn count(dbs: &TestDbs, sql: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match dbs.target().await.query_one(sql, &[]).await {
            Ok(row) => return row.get(0),
            Err(error) if Instant::now() < deadline => {
                eprintln!("{sql}: {error}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => panic!("{sql}: {error}"),
        }
    }
}

async fn dead_letter_count(dbs: &TestDbs) -> i64 {
    count(dbs, "SELECT count(*) FROM outbox_relay.dead_letters").await
}

fn merge(a: &mut BTreeMap<i32, i64>, b: BTreeMap<i32, i64>) {
    for (p, o) in b {
        let e = a.entry(p).or_insert(o);
        *e = (*e).max(o);
    }
}

/// Fills the source with `n` transactions by the load generator.
async fn load(dbs: &TestDbs, n: u64) {
    let summary = load::run(&LoadArgs::count(&dbs.source_url, n))
        .await
        .unwrap();
    assert_eq!(summary.committed, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_records_from_a_plain_producer_are_applied_and_sigterm_exits_cleanly() {
    let dbs = TestDbs::new().await;
    load(&dbs, 1500).await;
    let topic = create_topic(3).await;
    let records: Vec<Out> = source_rows(&dbs).await.iter().map(seed).collect();
    let last = produce(&producer(), &topic, &records).await;

    let mut sink = spawn_sink(&dbs, &topic, &random_name("group"), &[]);
    wait_verified(&dbs, Duration::from_secs(120)).await;
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;
    assert_eq!(dead_letter_count(&dbs).await, 0);
    let status = sink.terminate();
    assert!(status.success(), "sink exit status after SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_records_are_applied() {
    let dbs = TestDbs::new().await;
    load(&dbs, 1500).await;
    let topic = create_topic(3).await;
    let records: Vec<Out> = source_rows(&dbs)
        .await
        .iter()
        .enumerate()
        .map(|(i, row)| connector(row, 0x16B3748 + i as u64))
        .collect();
    let last = produce(&producer(), &topic, &records).await;

    let _sink = spawn_sink(
        &dbs,
        &topic,
        &random_name("group"),
        &["--format", "connector"],
    );
    wait_verified(&dbs, Duration::from_secs(120)).await;
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;
    assert_eq!(dead_letter_count(&dbs).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_change_events_are_applied_and_non_inserts_skipped() {
    let dbs = TestDbs::new().await;
    load(&dbs, 1500).await;
    let topic = create_topic(3).await;
    let rows = source_rows(&dbs).await;
    let mut records = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        records.push(debezium(row, i % 2 == 0));
        if i % 100 == 0 {
            // An update, a delete and its tombstone: skipped, never dead letters.
            let update = serde_json::json!({"before": null, "after": {"id": row.id, "account_id": row.account_id,
                "amount": "999999", "created_at": 0}, "op": "u"});
            records.push(Out::value(update.to_string()));
            let delete = serde_json::json!({"before": {"id": row.id}, "after": null, "op": "d"});
            records.push(Out::value(delete.to_string()));
            records.push(Out::default());
        }
    }
    let last = produce(&producer(), &topic, &records).await;

    let _sink = spawn_sink(&dbs, &topic, &random_name("group"), &[]);
    wait_verified(&dbs, Duration::from_secs(120)).await;
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;
    assert_eq!(dead_letter_count(&dbs).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_replays_change_nothing() {
    let dbs = TestDbs::new().await;
    load(&dbs, 1000).await;
    let topic = create_topic(3).await;
    let rows = source_rows(&dbs).await;
    // Every record three times: twice in the seed's format, once in the connector's.
    let mut records: Vec<Out> = rows.iter().map(seed).collect();
    records.extend(rows.iter().map(seed));
    records.extend(rows.iter().map(|r| connector(r, 0x1000)));
    let producer = producer();
    let mut last = produce(&producer, &topic, &records).await;

    let mut sink = spawn_sink(
        &dbs,
        &topic,
        &random_name("group"),
        &["--batch-size", "700"],
    );
    wait_verified(&dbs, Duration::from_secs(120)).await;
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;
    assert!(sink.terminate().success());
    assert_eq!(
        count(&dbs, "SELECT count(*) FROM main.transactions").await,
        1000
    );

    // A new group id with the bookkeeping intact: the sink resumes from pg_end's
    // offsets, not Kafka's; then new transactions arrive and only they are added.
    let mut sink = spawn_sink(&dbs, &topic, &random_name("group"), &[]);
    load(&dbs, 200).await;
    let all = source_rows(&dbs).await;
    let new: Vec<Out> = all
        .iter()
        .filter(|r| !rows.iter().any(|old| old.id == r.id))
        .map(seed)
        .collect();
    assert_eq!(new.len(), 200);
    merge(&mut last, produce(&producer, &topic, &new).await);
    wait_verified(&dbs, Duration::from_secs(120)).await;
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;
    assert!(sink.terminate().success());

    // A replay from offset 0: forget the offsets (the rows stay), a third group.
    dbs.target()
        .await
        .execute(
            "DELETE FROM outbox_relay.sink_offsets WHERE topic = $1",
            &[&topic],
        )
        .await
        .unwrap();
    let _sink = spawn_sink(&dbs, &topic, &random_name("group"), &[]);
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(120)).await;
    wait_verified(&dbs, Duration::from_secs(60)).await;
    assert_eq!(
        count(&dbs, "SELECT count(*) FROM main.transactions").await,
        1200
    );
    assert_eq!(dead_letter_count(&dbs).await, 0);
}

/// The dead letters of the test topic, by offset: (kind, error, value).
async fn dead_letters(dbs: &TestDbs) -> BTreeMap<i64, (String, String, Option<Vec<u8>>)> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_becomes_dead_letters_and_the_records_after_it_are_applied() {
    let dbs = TestDbs::new().await;
    load(&dbs, 300).await;
    let topic = create_topic(1).await;
    let rows = source_rows(&dbs).await;
    let producer = producer();
    let good = "2025-07-23 20:06:21.085330";
    let bad: Vec<(&str, Out)> = vec![
        ("invalid_json", Out::value("{not json")),
        ("invalid_json", Out::value(vec![0xff, 0xfe, 0x00, 0x7b])),
        ("invalid_json", Out::value("")),
        ("unknown_format", Out::value(r#"{"hello": "world"}"#)),
        ("unknown_format", Out::value("[1, 2, 3]")),
        (
            "missing_field",
            Out::value(format!(
                r#"{{"id": 1, "amount": 5, "created_at": "{good}"}}"#
            )),
        ),
        ("missing_field", Out::value(r#"{"op": "c", "after": null}"#)),
        (
            "wrong_type",
            Out::value(format!(
                r#"{{"id": 1, "account_id": true, "amount": 5, "created_at": "{good}"}}"#
            )),
        ),
        (
            "wrong_type",
            Out::value(format!(
                r#"{{"id": 1, "account_id": 2, "amount": [5], "created_at": "{good}"}}"#
            )),
        ),
        (
            "invalid_value",
            Out::value(format!(
                r#"{{"id": 1, "account_id": 2, "amount": "abc", "created_at": "{good}"}}"#
            )),
        ),
        (
            "invalid_value",
            Out::value(
                r#"{"id": 1, "account_id": 2, "amount": 5, "created_at": "2025-02-30 12:00:00"}"#,
            ),
        ),
        (
            "invalid_value",
            Out::value(format!(
                r#"{{"id": 99999999999999999999, "account_id": 2, "amount": 5, "created_at": "{good}"}}"#
            )),
        ),
        (
            "oversized",
            Out::value(format!(r#"{{"pad": "{}"}}"#, "x".repeat((1 << 20) + 10))),
        ),
    ];

    // Part 1: good rows with every kind of bad input between them.
    let (first, second) = rows.split_at(150);
    let mut records = Vec::new();
    let mut expected: BTreeMap<usize, &str> = BTreeMap::new();
    let mut bad_iter = bad.iter();
    for (i, row) in first.iter().enumerate() {
        records.push(seed(row));
        if i % 10 == 5 {
            if let Some((kind, out)) = bad_iter.next() {
                expected.insert(records.len(), *kind);
                records.push(out.clone());
            }
        }
    }
    for (kind, out) in bad_iter {
        expected.insert(records.len(), *kind);
        records.push(out.clone());
    }
    // Skipped on purpose, not dead letters: a tombstone and a Debezium update.
    records.push(Out::default());
    records.push(Out::value(
        r#"{"op": "u", "before": null, "after": {"id": 1}}"#,
    ));
    records.push(seed(&first[0])); // a plain duplicate
    let last = produce(&producer, &topic, &records).await;
    let _sink = spawn_sink(&dbs, &topic, &random_name("group"), &[]);
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(120)).await;

    // Part 2: a conflict with a row pg_end already has, then a row followed at once by
    // a conflicting copy of itself (same batch), then the rest.
    let mut conflicting = first[0].clone();
    conflicting.amount = "12345.67".into();
    let mut part2 = vec![seed(&conflicting), seed(&second[0])];
    let mut conflicting = second[0].clone();
    conflicting.account_id += 1;
    part2.push(seed(&conflicting));
    part2.extend(second[1..].iter().map(seed));
    let offset_base = last[&0] + 1;
    let last = produce(&producer, &topic, &part2).await;
    expected.insert((offset_base) as usize, "conflict");
    expected.insert((offset_base + 2) as usize, "conflict");

    wait_verified(&dbs, Duration::from_secs(120)).await;
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;

    let letters = dead_letters(&dbs).await;
    let kinds: BTreeMap<i64, &str> = letters
        .iter()
        .map(|(o, (k, _, _))| (*o, k.as_str()))
        .collect();
    let expected: BTreeMap<i64, &str> = expected.into_iter().map(|(o, k)| (o as i64, k)).collect();
    assert_eq!(kinds, expected);
    for (offset, (kind, error, value)) in &letters {
        assert!(!error.is_empty(), "dead letter at {offset} has no error");
        let produced = if *offset < offset_base {
            &records[*offset as usize]
        } else {
            &part2[(*offset - offset_base) as usize]
        };
        assert_eq!(
            value, &produced.value,
            "raw value of the {kind} dead letter at {offset}"
        );
    }
    assert!(
        letters[&offset_base].1.contains("amount"),
        "{}",
        letters[&offset_base].1
    );
    assert!(
        letters[&(offset_base + 2)].1.contains("account_id"),
        "{}",
        letters[&(offset_base + 2)].1
    );
    // Every row is there with the first version's content.
    wait_verified(&dbs, Duration::from_secs(60)).await;
}

/// Produces `records` in small chunks, paced, so that they flow while a test injects
/// faults; returns the last offsets.
fn produce_paced(
    topic: String,
    records: Vec<Out>,
    chunk: usize,
    every: Duration,
) -> tokio::task::JoinHandle<BTreeMap<i32, i64>> {
    tokio::spawn(async move {
        let producer = producer();
        let mut last = BTreeMap::new();
        let mut tick = tokio::time::interval(every);
        for part in records.chunks(chunk) {
            tick.tick().await;
            merge(&mut last, produce(&producer, &topic, part).await);
        }
        last
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_five_times_and_a_pg_end_restart_lose_and_duplicate_nothing() {
    let _faults = common::fault_lock().await;
    let dbs = TestDbs::new().await;
    load(&dbs, 12_000).await;
    let topic = create_topic(3).await;
    let records: Vec<Out> = source_rows(&dbs)
        .await
        .iter()
        .enumerate()
        .map(|(i, row)| connector(row, 0x2000 + i as u64))
        .collect();
    // ~12000 records over ~15 s.
    let flow = produce_paced(topic.clone(), records, 80, Duration::from_millis(100));

    // Static membership: a sink restarted in place gets its partitions back at once
    // instead of after the dead instance's session timeout, so that every kill lands
    // while it is applying.
    let group = random_name("group");
    let instance = format!("group.instance.id={}", random_name("sink"));
    let extra = [
        "--batch-size",
        "300",
        "--batch-linger-ms",
        "50",
        "--consumer-property",
        &instance,
    ];
    let mut sink = spawn_sink(&dbs, &topic, &group, &extra);
    let progress = || async { stored_offsets(&dbs, &topic).await.values().sum::<i64>() };
    for kill in 1..=6 {
        // Kill only once this instance has committed something, at a random moment.
        let before = progress().await;
        let deadline = Instant::now() + Duration::from_secs(90);
        while progress().await <= before {
            assert!(
                Instant::now() < deadline,
                "the sink made no progress after restart #{kill}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if kill == 3 {
            // pg_end goes down under a running sink (it retries its batch), the sink is
            // killed during the outage, and its successor starts while pg_end is still
            // down (its partition assignment waits for the stored offsets).
            tokio::task::spawn_blocking(|| common::stack(&["stop", "pg_end"]))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(rand::rng().random_range(300..1500))).await;
            sink.kill9();
            eprintln!("kill -9 #{kill} while pg_end is down");
            sink = spawn_sink(&dbs, &topic, &group, &extra);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            tokio::task::spawn_blocking(|| common::stack(&["start", "pg_end"]))
                .await
                .unwrap();
            continue;
        }
        let pause = rand::rng().random_range(0..800);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        sink.kill9();
        eprintln!("kill -9 #{kill} {pause} ms after progress");
        sink = spawn_sink(&dbs, &topic, &group, &extra);
    }
    let last = flow.await.unwrap();
    wait_verified(&dbs, Duration::from_secs(180)).await;
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;
    assert_eq!(dead_letter_count(&dbs).await, 0);
    drop(sink);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sinks_in_one_group_one_killed_mid_run() {
    let _faults = common::fault_lock().await;
    let dbs = TestDbs::new().await;
    load(&dbs, 9000).await;
    let topic = create_topic(3).await;
    let records: Vec<Out> = source_rows(&dbs).await.iter().map(seed).collect();
    let group = random_name("group");
    let extra = ["--batch-size", "500"];
    let (_a, a_log) = spawn_sink_logged(&dbs, &topic, &group, &extra);
    let (mut b, b_log) = spawn_sink_logged(&dbs, &topic, &group, &extra);
    // ~9000 records over ~12 s.
    let flow = produce_paced(topic.clone(), records, 75, Duration::from_millis(100));
    // The two share the partitions (and have applied some) before one dies.
    let (dbs_ref, topic_ref) = (&dbs, topic.as_str());
    let (a_log, b_log) = (&a_log, &b_log);
    common::wait_until(
        "both sinks own partitions and all partitions have progress",
        Duration::from_secs(60),
        move || async move {
            let (a, b) = (assigned_partitions(a_log), assigned_partitions(b_log));
            !a.is_empty()
                && !b.is_empty()
                && a.is_disjoint(&b)
                && stored_offsets(dbs_ref, topic_ref).await.len() == 3
        },
    )
    .await;
    eprintln!(
        "sink a owns {:?}, sink b owns {:?}",
        assigned_partitions(a_log),
        assigned_partitions(b_log)
    );
    tokio::time::sleep(Duration::from_millis(rand::rng().random_range(200..1500))).await;
    b.kill9();
    let last = flow.await.unwrap();
    // The survivor takes the dead one's partitions after the session timeout.
    wait_verified(&dbs, Duration::from_secs(180)).await;
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;
    assert_eq!(
        assigned_partitions(a_log).len(),
        3,
        "the survivor owns every partition"
    );
    assert_eq!(dead_letter_count(&dbs).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_run_loses_and_duplicates_nothing() {
    let _faults = common::fault_lock().await;
    let dbs = TestDbs::new().await;
    load(&dbs, 6000).await;
    let topic = create_topic(3).await;
    let records: Vec<Out> = source_rows(&dbs).await.iter().map(seed).collect();
    let flow = produce_paced(topic.clone(), records, 50, Duration::from_millis(100));
    let _sink = spawn_sink(
        &dbs,
        &topic,
        &random_name("group"),
        &["--batch-size", "300"],
    );
    let (dbs_ref, topic_ref) = (&dbs, topic.as_str());
    common::wait_until(
        "the sink applied something",
        Duration::from_secs(60),
        move || async move { !stored_offsets(dbs_ref, topic_ref).await.is_empty() },
    )
    .await;
    // A leader of some partitions and perhaps the group coordinator goes away and
    // comes back while records flow (RF 3, min ISR 2: the topic stays writable).
    let broker = ["kafka1", "kafka2", "kafka3"][rand::rng().random_range(0..3)];
    eprintln!("restarting {broker}");
    tokio::task::spawn_blocking(move || common::stack(&["stop", broker]))
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || common::stack(&["start", broker]))
        .await
        .unwrap();
    let last = flow.await.unwrap();
    wait_verified(&dbs, Duration::from_secs(180)).await;
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;
    assert_eq!(dead_letter_count(&dbs).await, 0);
}

/// Starts a sink logging JSON lines to a file of its own; returns the file.
fn spawn_sink_logged(
    dbs: &TestDbs,
    topic: &str,
    group: &str,
    extra: &[&str],
) -> (Relay, std::path::PathBuf) {
    let log = std::env::temp_dir().join(format!("{}.log", random_name("sink")));
    let file = std::fs::File::create(&log).unwrap();
    eprintln!("sink of group {group} logs to {}", log.display());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        // Several sinks run at once: each serves its metrics on a port of its own.
        .env("OUTBOX_RELAY_METRICS_ADDR", "127.0.0.1:0")
        .args([
            "--log-format",
            "json",
            "sink",
            "--target-url",
            &dbs.target_url,
            "--brokers",
            BROKERS,
            "--topic",
            topic,
            "--group",
            group,
        ])
        .args(extra)
        .env("OUTBOX_RELAY_LOG", "info")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("spawn outbox-relay sink");
    (Relay { child }, log)
}

/// The partitions a sink owns now, replayed from its "partition assigned/revoked" log.
fn assigned_partitions(log: &std::path::Path) -> std::collections::BTreeSet<i64> {
    let mut owned = std::collections::BTreeSet::new();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let fields = &event["fields"];
        let Some(partition) = fields["partition"].as_i64() else {
            continue;
        };
        match fields["message"].as_str() {
            Some("partition assigned") => {
                owned.insert(partition);
            }
            Some("partition revoked") => {
                owned.remove(&partition);
            }
            _ => {}
        }
    }
    owned
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_with_the_connector() {
    let dbs = TestDbs::new().await;
    let topic = create_topic(3).await;
    load(&dbs, 1000).await;
    let _connector = Relay::spawn(
        &[
            "connector",
            "--source-url",
            &dbs.source_url,
            "--brokers",
            BROKERS,
            "--topic",
            &topic,
            "--progress-topic",
            &random_name("progress"),
            "--slot",
            &random_name("slot"),
        ],
        &[],
    );
    let _sink = spawn_sink(&dbs, &topic, &random_name("group"), &[]);
    load(&dbs, 1000).await;
    wait_verified(&dbs, Duration::from_secs(180)).await;
    assert_eq!(dead_letter_count(&dbs).await, 0);
}

/// Throughput of the binary on 50k seed records already in the topic: prints
/// records/s from the sink's start to pg_end holding the last offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_50k_records() {
    const N: usize = 50_000;
    let _faults = common::fault_lock().await;
    let dbs = TestDbs::new().await;
    // Bulk-fill the source: the load generator writes ~2-3k/s, too slow to set up 50k.
    let mut rng = rand::rng();
    let txns: Vec<load::SourceTxn> = (0..N)
        .map(|_| load::SourceTxn::random(&mut rng, 10))
        .collect();
    let source = dbs.source().await;
    source
        .execute(
            "INSERT INTO main.transactions (id, account_id, amount, created_at)
             SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[]::numeric[], $4::text[]::timestamp[])
             ON CONFLICT (id) DO NOTHING",
            &[
                &txns.iter().map(|t| t.id).collect::<Vec<_>>(),
                &txns.iter().map(|t| t.account_id).collect::<Vec<_>>(),
                &txns.iter().map(|t| t.amount).collect::<Vec<_>>(),
                &txns.iter().map(|t| t.created_at.clone()).collect::<Vec<_>>(),
            ],
        )
        .await
        .unwrap();
    source
        .batch_execute(
            "INSERT INTO main.balance (account_id, current_balance, updated_at)
             SELECT account_id, sum(amount), max(created_at) FROM main.transactions GROUP BY account_id",
        )
        .await
        .unwrap();
    let topic = create_topic(3).await;
    let records: Vec<Out> = source_rows(&dbs).await.iter().map(seed).collect();
    let n = records.len();
    let last = produce(&producer(), &topic, &records).await;

    let start = Instant::now();
    let _sink = spawn_sink(&dbs, &topic, &random_name("group"), &[]);
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(300)).await;
    let elapsed = start.elapsed();
    eprintln!(
        "sink throughput: {n} records applied in {:.2} s = {:.0} records/s (including start-up and group join)",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    println!(
        "sink throughput: {n} records in {:.2} s = {:.0} records/s",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    wait_verified(&dbs, Duration::from_secs(60)).await;
}

// The apply module on its own (direct mode will call it the same way).

fn txn(id: i64, account_id: i64, amount: &str) -> (TxnRecord, Origin) {
    (
        TxnRecord {
            id,
            account_id,
            amount: amount.to_string(),
            created_at: "2025-07-23 20:06:21.085330".to_string(),
        },
        Origin {
            topic: Some("t".into()),
            partition: Some(0),
            offset: Some(id),
            ..Origin::default()
        },
    )
}

fn kafka_progress(last_offset: i64) -> Progress {
    Progress::KafkaOffsets(vec![KafkaOffset {
        topic: "t".into(),
        partition: 0,
        last_offset,
    }])
}

async fn balances(client: &tokio_postgres::Client) -> BTreeMap<i64, String> {
    client
        .query(
            "SELECT account_id, trim_scale(current_balance)::text FROM main.balance",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn apply_is_idempotent_reports_conflicts_and_progress_only_moves_forward() {
    let dbs = TestDbs::new().await;
    let mut client = apply::Target::new(dbs.target().await);
    let batch = ApplyBatch {
        records: vec![
            txn(1, 1, "10"),
            txn(2, 1, "-2.50"),
            txn(3, 2, "7"),
            txn(1, 1, "10.0"),
        ],
        dead_letters: Vec::new(),
        progress: kafka_progress(10),
    };
    let first = apply::apply(&mut client, &batch).await.unwrap();
    assert_eq!(
        (first.inserted, first.duplicates, first.dead_letters),
        (3, 1, 0)
    );
    let second = apply::apply(&mut client, &batch).await.unwrap();
    assert_eq!(
        (second.inserted, second.duplicates, second.dead_letters),
        (0, 4, 0)
    );
    assert_eq!(
        balances(&client).await,
        BTreeMap::from([(1, "7.5".to_string()), (2, "7".to_string())])
    );

    // Same id, other content: a conflict, never an overwrite. Older progress: ignored.
    let conflict = ApplyBatch {
        records: vec![txn(3, 2, "8"), txn(4, 2, "1")],
        dead_letters: Vec::new(),
        progress: kafka_progress(5),
    };
    let outcome = apply::apply(&mut client, &conflict).await.unwrap();
    assert_eq!(
        (outcome.inserted, outcome.conflicts, outcome.dead_letters),
        (1, 1, 1)
    );
    assert_eq!(balances(&client).await[&2], "8");
    let stored = apply::read_kafka_offsets(&*client, &[("t".to_string(), 0), ("t".to_string(), 1)])
        .await
        .unwrap();
    assert_eq!(
        stored,
        std::collections::HashMap::from([(("t".to_string(), 0), 10)])
    );
    // Applying the conflict again does not write its dead letter twice.
    let again = apply::apply(&mut client, &conflict).await.unwrap();
    assert_eq!((again.dead_letters, again.dead_letters_written), (1, 0));
    assert_eq!(dead_letter_count(&dbs).await, 1);

    // The direct-mode form of progress.
    for (lsn, expected) in [(0x200, 0x200), (0x100, 0x200), (0x300, 0x300)] {
        let batch = ApplyBatch {
            records: Vec::new(),
            dead_letters: Vec::new(),
            progress: Progress::SourceLsn {
                slot: "s".into(),
                commit_lsn: Lsn(lsn),
            },
        };
        apply::apply(&mut client, &batch).await.unwrap();
        assert_eq!(
            apply::read_source_lsn(&*client, "s").await.unwrap(),
            Some(Lsn(expected))
        );
    }
}

#[tokio::test]
async fn apply_bisects_to_dead_letter_a_record_postgres_refuses() {
    let dbs = TestDbs::new().await;
    let mut client = apply::Target::new(dbs.target().await);
    // Something the Rust checks cannot foresee: a constraint of pg_end's own.
    client
        .batch_execute("ALTER TABLE main.transactions ADD CONSTRAINT not_13 CHECK (amount <> 13)")
        .await
        .unwrap();
    let mut records: Vec<_> = (1..=100).map(|id| txn(id, id % 3, "1")).collect();
    records[41].0.amount = "13".into();
    records.push(txn(1000, 1, "not a number")); // caught before the SQL
    let batch = ApplyBatch {
        records,
        dead_letters: Vec::new(),
        progress: kafka_progress(1000),
    };
    let outcome = apply::apply(&mut client, &batch).await.unwrap();
    assert!(outcome.bisected);
    assert_eq!((outcome.inserted, outcome.dead_letters), (99, 2));
    let letters = dead_letters(&dbs).await;
    assert_eq!(letters[&42].0, "apply_failed");
    assert!(letters[&42].1.contains("not_13"), "{}", letters[&42].1);
    assert_eq!(letters[&1000].0, "invalid_value");
    let total: String = client
        .query_one("SELECT sum(current_balance)::text FROM main.balance", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, "99");
}

/// An amount as a client may write it: sign, digits on either side of the point
/// (leading and trailing zeros too), an exponent now and then.
fn random_amount(rng: &mut impl Rng) -> String {
    fn digits(rng: &mut impl Rng) -> String {
        (0..rng.random_range(0..24))
            .map(|_| match rng.random_range(0..4) {
                0 => '0',
                _ => char::from(b'0' + rng.random_range(0..10u8)),
            })
            .collect()
    }
    let sign = ["", "-", "+"][rng.random_range(0..3)];
    let (int, frac) = (digits(rng), digits(rng));
    let mut text = match (int.is_empty(), rng.random_bool(0.5) || frac.is_empty()) {
        (true, _) => format!("{sign}{}.{frac}", if frac.is_empty() { "0" } else { "" }),
        (false, true) if frac.is_empty() => format!("{sign}{int}"),
        (false, _) => format!("{sign}{int}.{frac}"),
    };
    if rng.random_bool(0.3) {
        let e = rng.random_range(-40..=40);
        text.push_str(&format!("{}{e}", ["e", "E"][rng.random_range(0..2)]));
    }
    text
}

/// A timestamp in the forms PostgreSQL and ISO 8601 write, with 0 to 9 fraction digits,
/// often a half-way seventh digit.
fn random_timestamp(rng: &mut impl Rng) -> String {
    let separator = [' ', 'T'][rng.random_range(0..2)];
    let mut text = format!(
        "{:04}-{:02}-{:02}{separator}{:02}:{:02}:{:02}",
        rng.random_range(1..=9999),
        rng.random_range(1..=12),
        rng.random_range(1..=28),
        rng.random_range(0..24),
        rng.random_range(0..60),
        rng.random_range(0..60),
    );
    let fraction: String = (0..rng.random_range(0..=9))
        .map(|i| match (i, rng.random_range(0..3)) {
            (6, 0) => '5',
            (_, 0) => '9',
            _ => char::from(b'0' + rng.random_range(0..10u8)),
        })
        .collect();
    if !fraction.is_empty() {
        text.push('.');
        text.push_str(&fraction);
    }
    text
}

/// The apply path sends amounts and timestamps in binary (`apply::binary`); what
/// pg_end stores must be what its own text input makes of the record's text, display
/// scale and rounding of a seventh fraction digit included, and so must the balances.
#[tokio::test]
async fn binary_values_are_what_postgres_makes_of_the_text() {
    let dbs = TestDbs::new().await;
    let mut client = apply::Target::new(dbs.target().await);
    let seed: u64 = rand::rng().random();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut records: Vec<(TxnRecord, Origin)> = (1..=4000)
        .map(|id| {
            let (mut record, origin) = txn(id, id % 13, &random_amount(&mut rng));
            record.created_at = random_timestamp(&mut rng);
            (record, origin)
        })
        .collect();
    let extremes = [
        ("9".repeat(1000), "9999-12-31 23:59:59.9999995"),
        (
            format!("0.{}1", "0".repeat(998)),
            "0001-01-01 00:00:00.0000005",
        ),
        ("1e1000".to_string(), "2000-01-01T00:00:00.0000015"),
        ("-1.5E-1000".to_string(), "1999-12-31 23:59:59.9999999"),
        ("-0.000e-1000".to_string(), "2016-12-31 23:59:59.123456789"),
        (".5".to_string(), "2024-02-29 12:00:00"),
        ("5.".to_string(), "2024-02-29T12:00:00."),
        ("1".to_string(), "2016-12-31 23:59:60"),
    ];
    for (i, (amount, created_at)) in extremes.iter().enumerate() {
        let (mut record, origin) = txn(10_000 + i as i64, 99, amount);
        record.created_at = created_at.to_string();
        records.push((record, origin));
    }
    let batch = ApplyBatch {
        records: records.clone(),
        dead_letters: Vec::new(),
        progress: Progress::None,
    };
    let outcome = apply::apply(&mut client, &batch).await.unwrap();
    // Refused by the checks: a point with no fraction digits after it, a leap second.
    assert_eq!(
        (outcome.inserted, outcome.dead_letters),
        (records.len() as u64 - 2, 2),
        "seed {seed}"
    );
    records.retain(|(r, _)| !r.created_at.ends_with('.') && !r.created_at.contains(":60"));

    let text = |f: fn(&TxnRecord) -> String| -> Vec<String> {
        records.iter().map(|(r, _)| f(r)).collect()
    };
    let ids: Vec<i64> = records.iter().map(|(r, _)| r.id).collect();
    let accounts: Vec<i64> = records.iter().map(|(r, _)| r.account_id).collect();
    let (amounts, times) = (text(|r| r.amount.clone()), text(|r| r.created_at.clone()));
    client
        .batch_execute(
            "CREATE TEMP TABLE expected (id int8, account_id int8, amount numeric, created_at timestamp)",
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO expected
             SELECT id, account_id, amount::numeric, created_at::timestamp
             FROM unnest($1::int8[], $2::int8[], $3::text[], $4::text[])
                 AS x(id, account_id, amount, created_at)",
            &[&ids, &accounts, &amounts, &times],
        )
        .await
        .unwrap();
    let differing = client
        .query(
            "SELECT e.id, e.amount::text, t.amount::text, e.created_at::text, t.created_at::text
             FROM expected e LEFT JOIN main.transactions t USING (id)
             WHERE t.id IS NULL OR t.amount::text <> e.amount::text
                OR t.created_at IS DISTINCT FROM e.created_at
             LIMIT 5",
            &[],
        )
        .await
        .unwrap();
    let shown: Vec<_> = differing
        .iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let given = &records.iter().find(|(x, _)| x.id == id).unwrap().0;
            format!(
                "{given:?}: text gives {:?} {:?}, binary {:?} {:?}",
                r.get::<_, String>(1),
                r.get::<_, String>(3),
                r.get::<_, Option<String>>(2),
                r.get::<_, Option<String>>(4),
            )
        })
        .collect();
    assert!(shown.is_empty(), "seed {seed}: {shown:#?}");
    let balances_differ: i64 = client
        .query_one(
            "SELECT count(*) FROM main.balance b FULL JOIN (
                 SELECT account_id, sum(amount) AS s, max(created_at) AS m
                 FROM expected GROUP BY account_id) e USING (account_id)
             WHERE b.current_balance::text IS DISTINCT FROM e.s::text
                OR b.updated_at IS DISTINCT FROM e.m",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(balances_differ, 0, "seed {seed}");
}

/// Two appliers racing over overlapping batches (a rebalance, two sinks on one
/// partition for a moment): every id is inserted by exactly one of them and counted
/// in the balance once, whether an applier took the plain-insert path or fell back to
/// `ON CONFLICT` after a `unique_violation`.
#[tokio::test]
async fn concurrent_appliers_of_overlapping_batches_count_every_id_once() {
    let dbs = TestDbs::new().await;
    let mut first = apply::Target::new(dbs.target().await);
    let mut second = apply::Target::new(dbs.target().await);
    let batch = |ids: std::ops::Range<i64>| ApplyBatch {
        records: ids.map(|id| txn(id, id % 7, "1.5")).collect(),
        dead_letters: Vec::new(),
        progress: Progress::None,
    };
    let (mut inserted, mut duplicates) = (0, 0);
    for round in 0..20i64 {
        let base = round * 1000;
        // Overlap of 400 ids, in both orders of arrival.
        let (a, b) = (batch(base..base + 700), batch(base + 300..base + 1000));
        let (a, b) = tokio::join!(apply::apply(&mut first, &a), apply::apply(&mut second, &b));
        for outcome in [a.unwrap(), b.unwrap()] {
            assert_eq!(outcome.conflicts, 0);
            inserted += outcome.inserted;
            duplicates += outcome.duplicates;
        }
    }
    assert_eq!(inserted, 20_000, "each id inserted exactly once");
    assert_eq!(duplicates, 20 * 400, "the overlap is seen as duplicates");
    let expected: BTreeMap<i64, String> = (0..7)
        .map(|account| {
            let n = (0..20_000i64).filter(|id| id % 7 == account).count();
            (account, format!("{}", n as f64 * 1.5))
        })
        .collect();
    assert_eq!(balances(&first).await, expected);
}
