//! The sink against the real stack: Kafka → pg_end exactly once, through duplicates,
//! replays, bad input, SIGKILLs, a pg_end restart and a group of two.
//!
//! Each test fills its own source database with `outbox_relay::cmd::load`, produces the
//! source rows to its own random topic in one of the formats the sink reads, runs the
//! `outbox-relay sink` binary, and waits (polling with a deadline) until `verify` passes
//! against the source. The apply module on its own is tested in `tests/apply.rs`; the
//! sink's throughput is measured by `scripts/bench`, not here.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine;
use common::connector::spawn_connector;
use common::sink::{
    dead_letter_count, dead_letters, merge, produce, producer, seed, source_rows, spawn_sink,
    stored_offsets, wait_offsets, Out, Row, MAX_MESSAGE_BYTES,
};
use common::{load, random_name, TestDbs};
use rand::Rng;

/// A topic of `partitions` partitions that accepts values above the sink's 1 MiB limit,
/// to test `oversized`.
async fn create_topic(partitions: i32) -> String {
    common::create_topic(
        "sink",
        partitions,
        &[("max.message.bytes", MAX_MESSAGE_BYTES)],
    )
    .await
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_records_from_a_plain_producer_are_applied_and_sigterm_exits_cleanly() {
    let dbs = TestDbs::new().await;
    load(&dbs, 1500).await;
    let topic = create_topic(3).await;
    let records: Vec<Out> = source_rows(&dbs).await.iter().map(seed).collect();
    let last = produce(&producer(), &topic, &records).await;

    let mut sink = spawn_sink(&dbs, &topic, &random_name("group"), &[]);
    dbs.wait_verified(Duration::from_secs(120)).await;
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
    dbs.wait_verified(Duration::from_secs(120)).await;
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
    dbs.wait_verified(Duration::from_secs(120)).await;
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
    dbs.wait_verified(Duration::from_secs(120)).await;
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;
    assert!(sink.terminate().success());
    assert_eq!(
        common::count(&dbs.target_url, "SELECT count(*) FROM main.transactions").await,
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
    dbs.wait_verified(Duration::from_secs(120)).await;
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
    dbs.wait_verified(Duration::from_secs(60)).await;
    assert_eq!(
        common::count(&dbs.target_url, "SELECT count(*) FROM main.transactions").await,
        1200
    );
    assert_eq!(dead_letter_count(&dbs).await, 0);
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

    dbs.wait_verified(Duration::from_secs(120)).await;
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
    dbs.wait_verified(Duration::from_secs(60)).await;
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
    dbs.wait_verified(Duration::from_secs(180)).await;
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
    // JSON logs, for the "partition assigned/revoked" events.
    let extra = ["--log-format", "json", "--batch-size", "500"];
    let a = spawn_sink(&dbs, &topic, &group, &extra);
    let mut b = spawn_sink(&dbs, &topic, &group, &extra);
    let (a_log, b_log) = (a.log.clone(), b.log.clone());
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
    dbs.wait_verified(Duration::from_secs(180)).await;
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;
    assert_eq!(
        assigned_partitions(a_log).len(),
        3,
        "the survivor owns every partition"
    );
    assert_eq!(dead_letter_count(&dbs).await, 0);
}

/// A sink member frozen (SIGSTOP) inside a pg_end transaction leaves its backend idle
/// in that transaction, the batch's ids and balances locked. The group drops it after
/// its session timeout (10 s) and the other member, given its partition, applies the
/// same records, which wait for those locks: pg_end ends the abandoned transaction
/// within the sink's apply timeout (60 s), so pg_end is exact while the frozen member
/// is still frozen. Resumed, it finds its session ended by pg_end, a failure it retries
/// (not one that stops it), and repeats nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_frozen_inside_a_pg_end_transaction_does_not_hold_up_the_group() {
    let _faults = common::fault_lock().await;
    let dbs = TestDbs::new().await;
    load(&dbs, 1500).await;
    // One partition: one member applies, the other stands by in the group.
    let topic = create_topic(1).await;
    let records: Vec<Out> = source_rows(&dbs).await.iter().map(seed).collect();
    let (first, rest) = records.split_at(500);
    let (warm, rest) = rest.split_at(50);
    let (held, rest) = rest.split_at(250);
    let group = random_name("group");
    let extra = ["--log-format", "json"];
    let producer = producer();
    let mut last = produce(&producer, &topic, first).await;
    let mut one = spawn_sink(&dbs, &topic, &group, &extra);
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;
    let mut two = spawn_sink(&dbs, &topic, &group, &extra);
    // The second member's join moves the partition (eagerly: revoked, then assigned to
    // one of the two); wait for that second assignment.
    let assignments = |relay: &common::Relay| {
        std::fs::read_to_string(&relay.log)
            .unwrap_or_default()
            .matches("\"partition assigned\"")
            .count()
    };
    common::wait_until(
        "the partition is assigned again after the second member joins",
        Duration::from_secs(60),
        || async {
            assignments(&one) + assignments(&two) >= 2
                && assigned_partitions(&one.log).len() + assigned_partitions(&two.log).len() == 1
        },
    )
    .await;
    let (owner, other) = if assigned_partitions(&one.log).is_empty() {
        (&mut two, &mut one)
    } else {
        (&mut one, &mut two)
    };
    // The owner applies on its current connection once, so that its statements are
    // prepared there (a `Parse` of the credit would wait for the lock below outside
    // any transaction).
    merge(&mut last, produce(&producer, &topic, warm).await);
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;

    let blocker = dbs.hold_balances().await;
    merge(&mut last, produce(&producer, &topic, held).await);
    dbs.freeze_inside_transaction(blocker, owner).await;
    let frozen = Instant::now();
    merge(&mut last, produce(&producer, &topic, rest).await);
    dbs.wait_verified(Duration::from_secs(150)).await;
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;
    eprintln!(
        "pg_end exact {:?} after the owner froze inside its transaction",
        frozen.elapsed()
    );
    assert!(
        owner.child.try_wait().unwrap().is_none(),
        "the owner is frozen, not gone"
    );
    assert_eq!(
        assigned_partitions(&other.log).len(),
        1,
        "the other member took the partition"
    );

    owner.resume();
    // Back, it finds its session ended and its partition gone; it stays in the group.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (member, name) in [
        (&mut *owner, "the resumed member"),
        (&mut *other, "the other"),
    ] {
        assert!(
            member.child.try_wait().unwrap().is_none(),
            "{name} exited:\n{}",
            member.log_text()
        );
    }
    dbs.wait_verified(Duration::from_secs(60)).await;
    assert_eq!(dead_letter_count(&dbs).await, 0);
    assert!(owner.terminate().success(), "{}", owner.log_text());
    assert!(other.terminate().success(), "{}", other.log_text());
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
    dbs.wait_verified(Duration::from_secs(180)).await;
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;
    assert_eq!(dead_letter_count(&dbs).await, 0);
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
    let _connector = spawn_connector(
        &dbs.source_url,
        &topic,
        &random_name("progress"),
        &random_name("slot"),
        &[],
        &[],
    );
    let _sink = spawn_sink(&dbs, &topic, &random_name("group"), &[]);
    load(&dbs, 1000).await;
    dbs.wait_verified(Duration::from_secs(180)).await;
    assert_eq!(dead_letter_count(&dbs).await, 0);
}
