//! Routes against the real stack: several outboxes (a Debezium-shaped table, a plain
//! table with a text payload, logical messages) into topics chosen per row, exactly
//! once across topics through a SIGKILL, with the rows that cannot be routed in the
//! dead-letter topic; and `--cleanup` after a kill between the Kafka commit and the
//! delete.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::connector::spawn_connector;
use common::{random_name, read_topic, ReadRecord, TestDbs};
use outbox_relay::cmd::load::{self, LoadArgs};

/// Debezium's outbox shape, a second outbox whose payload is JSON in a text column,
/// in their own schema.
const SCHEMA: &str = "
    CREATE SCHEMA app;
    CREATE TABLE app.outbox (
        id uuid PRIMARY KEY,
        aggregatetype varchar(255),
        aggregateid varchar(255),
        type varchar(255) NOT NULL,
        payload jsonb
    );
    CREATE TABLE app.audit (
        id bigint PRIMARY KEY,
        kind text NOT NULL,
        body text
    );";

/// The record of an event: topic, key, value, the `id` header.
type Event = (String, Option<Vec<u8>>, Vec<u8>, Option<Vec<u8>>);

fn header<'a>(record: &'a ReadRecord, name: &str) -> Option<&'a [u8]> {
    record
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_slice())
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes));
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn routed_events_reach_their_topics_once_in_whole_source_transactions_through_a_kill() {
    let dbs = TestDbs::new().await;
    let source = dbs.source().await;
    source.batch_execute(SCHEMA).await.unwrap();
    // Aggregate types unique to this run: the topics are outbox.event.<type>.
    let nonce = random_name("t").replace('_', "");
    let types = [format!("Order{nonce}"), format!("Customer{nonce}")];
    let audit_topic = random_name("audit");
    let message_prefix = random_name("events");
    let dead_letters = random_name("dead");
    let progress = random_name("progress");
    let slot = random_name("slot");
    let publication = random_name("pub");

    // Rows present before the slot exists (its snapshot), then transactions that
    // touch both tables, several aggregate types and a message at once.
    let mut expected: HashMap<String, Event> = HashMap::new();
    let mut txn_events: Vec<Vec<String>> = Vec::new();
    let insert_txn = |t: usize| {
        let mut sql = String::from("BEGIN;");
        let mut ids = Vec::new();
        let mut events = Vec::new();
        for k in 0..3 {
            let id = format!("00000000-0000-4000-8000-{:012}", t * 10 + k);
            let ty = &types[(t + k) % 2];
            let payload = format!(r#"{{"n": {t}, "k": {k}, "amount": 12.30, "name": "é\"x"}}"#);
            sql.push_str(&format!(
                "INSERT INTO app.outbox VALUES ('{id}', '{ty}', 'agg-{t}', 'Created', '{payload}');"
            ));
            // PostgreSQL prints jsonb in its own form: compare as JSON.
            events.push((
                id.clone(),
                (
                    format!("outbox.event.{ty}"),
                    Some(format!("agg-{t}").into_bytes()),
                    payload.into_bytes(),
                    Some(id.clone().into_bytes()),
                ),
            ));
            ids.push(id);
        }
        let audit_id = 1_000_000 + t;
        let body = format!(r#"{{"audit": {t}}}"#);
        sql.push_str(&format!(
            "INSERT INTO app.audit VALUES ({audit_id}, 'k', '{body}');"
        ));
        events.push((
            format!("audit-{audit_id}"),
            (
                audit_topic.clone(),
                Some(audit_id.to_string().into_bytes()),
                body.into_bytes(),
                None,
            ),
        ));
        let message_id = format!("m-{t}");
        let message = format!(
            r#"{{"id": "{message_id}", "aggregatetype": "{}", "aggregateid": "agg-{t}", "payload": {{"m": {t}}}}}"#,
            types[t % 2]
        );
        sql.push_str(&format!(
            "SELECT pg_logical_emit_message(true, '{message_prefix}', '{message}');"
        ));
        events.push((
            message_id.clone(),
            (
                format!("outbox.event.{}", types[t % 2]),
                Some(format!("agg-{t}").into_bytes()),
                format!(r#"{{"m": {t}}}"#).into_bytes(),
                Some(message_id.into_bytes()),
            ),
        ));
        sql.push_str("COMMIT;");
        (sql, events)
    };
    for t in 0..5 {
        // The snapshot holds table rows; its messages were never in the slot.
        let (sql, events) = insert_txn(t);
        let sql = sql.replace(
            &format!("SELECT pg_logical_emit_message(true, '{message_prefix}'"),
            "SELECT pg_logical_emit_message(true, 'not-routed'",
        );
        source.batch_execute(&sql).await.unwrap();
        let mut ids = Vec::new();
        for (id, event) in events {
            if !id.starts_with("m-") {
                ids.push(id.clone());
                expected.insert(id, event);
            }
        }
        txn_events.push(ids);
    }

    let routes = [
        r#"{table = "app.outbox", preset = "event-router"}"#.to_string(),
        format!(
            r#"{{table = "app.audit", topic = "{audit_topic}", value = "payload", payload = "body", payload_format = "json"}}"#
        ),
        format!(r#"{{message_prefix = "{message_prefix}", preset = "event-router"}}"#),
    ];
    let mut args: Vec<&str> = vec![
        "--publication",
        &publication,
        "--dead-letter-topic",
        &dead_letters,
        "--batch-size",
        "20",
    ];
    for route in &routes {
        args.extend(["--route", route.as_str()]);
    }
    let spawn = || spawn_connector(&dbs.source_url, "unused", &progress, &slot, &args, &[]);
    let mut connector = spawn();
    // Messages exist only in the slot: wait until it streams (its snapshot, the five
    // audit rows, is in Kafka) before writing them.
    common::wait_until("the snapshot", Duration::from_secs(120), || {
        let audit_topic = audit_topic.clone();
        async move { std::panic::catch_unwind(|| read_topic(&audit_topic).len()).unwrap_or(0) >= 5 }
    })
    .await;

    let mut run = |from: usize, to: usize| {
        let mut batch = Vec::new();
        for t in from..to {
            let (sql, events) = insert_txn(t);
            batch.push(sql);
            let mut ids = Vec::new();
            for (id, event) in events {
                ids.push(id.clone());
                expected.insert(id, event);
            }
            txn_events.push(ids);
        }
        batch
    };
    for sql in run(5, 60) {
        source.batch_execute(&sql).await.unwrap();
    }
    // Rows that cannot be routed: a NULL key, a NULL topic column, an illegal topic,
    // a text payload that is not the JSON it is declared to be, a message that is not
    // a JSON object, a non-transactional message. Each one is a dead letter.
    source
        .batch_execute(&format!(
            "INSERT INTO app.outbox VALUES ('00000000-0000-4000-9000-000000000001', '{}', NULL, 'Bad', '{{}}');
             INSERT INTO app.outbox VALUES ('00000000-0000-4000-9000-000000000002', NULL, 'a', 'Bad', '{{}}');
             INSERT INTO app.outbox VALUES ('00000000-0000-4000-9000-000000000003', 'Order Lines', 'a', 'Bad', '{{}}');
             INSERT INTO app.audit VALUES (7, 'k', 'not json');
             SELECT pg_logical_emit_message(true, '{message_prefix}', 'not json');
             SELECT pg_logical_emit_message(false, '{message_prefix}', '{{\"id\": \"lone\"}}');",
            types[0]
        ))
        .await
        .unwrap();
    // A SIGKILL in the middle of more transactions, then a restart.
    let more = run(60, 120);
    for (i, sql) in more.iter().enumerate() {
        source.batch_execute(sql).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        if i == 20 {
            connector.kill9();
            connector = spawn();
        }
    }

    // Every routed topic, read read_committed until it holds what it must.
    let mut topics: Vec<String> = types.iter().map(|t| format!("outbox.event.{t}")).collect();
    topics.push(audit_topic.clone());
    let mut wanted: BTreeMap<String, usize> = BTreeMap::new();
    for (topic, ..) in expected.values() {
        *wanted.entry(topic.clone()).or_default() += 1;
    }
    let mut records: Vec<ReadRecord> = Vec::new();
    common::wait_until("every routed event", Duration::from_secs(180), || {
        let topics = topics.clone();
        let wanted = wanted.clone();
        async move {
            let counts: Vec<(usize, usize)> = topics
                .iter()
                .map(|t| {
                    let count = std::panic::catch_unwind(|| read_topic(t).len()).unwrap_or(0);
                    (count, wanted[t])
                })
                .collect();
            eprintln!("records per topic (read, wanted): {counts:?}");
            counts.iter().all(|(read, wanted)| read >= wanted)
        }
    })
    .await;
    let mut by_topic: BTreeMap<String, Vec<ReadRecord>> = BTreeMap::new();
    for topic in &topics {
        let read = read_topic(topic);
        records.extend(read.iter().cloned());
        by_topic.insert(topic.clone(), read);
    }
    assert!(connector.terminate().success());

    // Each event exactly once, with its key, value and id header.
    let mut seen: HashMap<String, (String, Vec<u8>)> = HashMap::new();
    for (topic, read) in &by_topic {
        assert_eq!(read.len(), wanted[topic], "records in {topic}");
        for record in read {
            let id = match header(record, "id") {
                Some(id) => String::from_utf8(id.to_vec()).unwrap(),
                None => format!(
                    "audit-{}",
                    String::from_utf8(record.key.clone().unwrap()).unwrap()
                ),
            };
            let (want_topic, key, value, id_header) = expected
                .get(&id)
                .unwrap_or_else(|| panic!("unexpected event {id} in {topic}"));
            assert_eq!(topic, want_topic, "{id}");
            assert_eq!(&record.key, key, "{id}");
            assert_eq!(json(&record.value), json(value), "{id}");
            assert_eq!(header(record, "id").map(<[u8]>::to_vec), *id_header);
            let xid = header(record, "outbox-relay.lsn").unwrap().to_vec();
            assert!(
                seen.insert(id.clone(), (topic.clone(), xid)).is_none(),
                "{id} twice"
            );
        }
    }
    assert_eq!(seen.len(), expected.len(), "every event once");
    // A source transaction's events, across topics, carry one commit LSN: they were
    // read whole (a read_committed reader never sees part of one).
    for ids in &txn_events {
        let lsns: std::collections::HashSet<&Vec<u8>> = ids.iter().map(|id| &seen[id].1).collect();
        assert_eq!(lsns.len(), 1, "one source transaction, one commit: {ids:?}");
    }

    // The dead letters: each bad row once, with its reason and whole content.
    let letters = read_topic(&dead_letters);
    let reasons: Vec<String> = letters
        .iter()
        .map(|r| json(&r.value)["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(letters.len(), 6, "{reasons:#?}");
    for (needle, what) in [
        ("key column is NULL", "NULL aggregateid"),
        (
            "topic column \"aggregatetype\" is NULL",
            "NULL aggregatetype",
        ),
        ("not a legal Kafka topic name", "a space in the topic"),
        ("declared JSON", "a text payload that is not JSON"),
        ("not a JSON object", "a message that is not JSON"),
        ("non-transactional", "pg_logical_emit_message(false, …)"),
    ] {
        assert!(
            reasons.iter().filter(|r| r.contains(needle)).count() == 1,
            "one dead letter for {what}: {reasons:#?}"
        );
    }
    for letter in &letters {
        let value = json(&letter.value);
        assert!(value["lsn"].as_str().unwrap().contains('/'));
        assert!(header(letter, "outbox-relay.error").is_some());
        assert!(!value["event"].is_null() || value["event_base64"].is_string());
    }
    let bad = letters
        .iter()
        .map(|r| json(&r.value))
        .find(|v| v["reason"].as_str().unwrap().contains("declared JSON"))
        .unwrap();
    assert_eq!(bad["event"]["body"], "not json");
    assert_eq!(bad["event"]["id"], 7);
}

/// The initial snapshot of two outboxes with primary keys (uuid, bigint), interrupted
/// twice right after a chunk (once in each table), while rows keep being written to
/// both: every event is in its topic once.
#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_snapshot_of_two_outboxes_resumes_in_key_order_exactly_once() {
    let dbs = TestDbs::new().await;
    let source = dbs.source().await;
    source.batch_execute(SCHEMA).await.unwrap();
    let nonce = random_name("t").replace('_', "");
    let insert_nonce = nonce.clone();
    let audit_topic = random_name("audit");
    let (progress, slot, publication) = (
        random_name("progress"),
        random_name("slot"),
        random_name("pub"),
    );
    let insert = move |from: u32, to: u32| {
        format!(
            "INSERT INTO app.outbox SELECT gen_random_uuid(), 'Snap{nonce}', 'agg-' || g, 'Created', \
                 jsonb_build_object('n', g) FROM generate_series({from}, {to}) g;
             INSERT INTO app.audit SELECT g, 'k', jsonb_build_object('a', g)::text \
                 FROM generate_series({from}, {to}) g;"
        )
    };
    source.batch_execute(&insert(1, 3000)).await.unwrap();
    let writer = {
        let (url, insert) = (dbs.source_url.clone(), insert.clone());
        tokio::spawn(async move {
            let client = common::connect(&url).await;
            for t in 0..60u32 {
                let from = 10_000 + t * 10;
                client.batch_execute(&insert(from, from + 9)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let routes = [
        r#"{table = "app.outbox", preset = "event-router"}"#.to_string(),
        format!(
            r#"{{table = "app.audit", topic = "{audit_topic}", value = "payload", payload = "body", payload_format = "json"}}"#
        ),
    ];
    let mut args: Vec<&str> = vec!["--publication", &publication, "--batch-size", "200"];
    for route in &routes {
        args.extend(["--route", route.as_str()]);
    }
    // 15 chunks of the first table's 3,000 rows, then the second's: a crash in each.
    for chunks in ["4", "14"] {
        let mut connector = spawn_connector(
            &dbs.source_url,
            "unused",
            &progress,
            &slot,
            &args,
            &[common::crash_after_snapshot_chunks(chunks)],
        );
        let status = common::wait_for_exit(&mut connector, Duration::from_secs(120)).await;
        assert!(!status.success(), "the test hook aborts the process");
    }
    let mut connector = spawn_connector(&dbs.source_url, "unused", &progress, &slot, &args, &[]);
    writer.await.unwrap();
    for (topic, table, key) in [
        (
            format!("outbox.event.Snap{}", insert_nonce),
            "app.outbox",
            "id::text",
        ),
        (audit_topic.clone(), "app.audit", "id::text"),
    ] {
        let expected: std::collections::BTreeSet<String> = source
            .query(&format!("SELECT {key} FROM {table}"), &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut seen: HashMap<String, usize> = HashMap::new();
        common::wait_until(
            &format!("{topic} holds every row"),
            Duration::from_secs(120),
            || {
                let topic = topic.clone();
                let n = expected.len();
                async move { read_topic(&topic).len() >= n }
            },
        )
        .await;
        let log = connector.log_text();
        for record in read_topic(&topic) {
            let id = match header(&record, "id") {
                Some(id) => String::from_utf8_lossy(id).into_owned(),
                None => {
                    String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()).into_owned()
                }
            };
            *seen.entry(id).or_default() += 1;
        }
        let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
        assert!(
            twice.is_empty(),
            "{topic}: events twice, e.g. {twice:?}\n{log}"
        );
        let got: std::collections::BTreeSet<String> = seen.into_keys().collect();
        assert_eq!(got, expected, "{topic}: the events vs the table's rows");
    }
    let log = connector.log_text();
    assert!(
        log.contains("resuming the slot's initial snapshot"),
        "{log}"
    );
    assert!(connector.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_topic_creation_off_a_missing_topic_sends_its_rows_to_dead_letters() {
    let dbs = TestDbs::new().await;
    load::run(&LoadArgs::count(&dbs.source_url, 50))
        .await
        .unwrap();
    let (dead_letters, progress, slot) = (
        random_name("dead"),
        random_name("progress"),
        random_name("slot"),
    );
    let missing = random_name("missing");
    let route =
        format!(r#"{{table = "outbox.transactions", topic = "{missing}-${{account_id}}"}}"#);
    let mut connector = spawn_connector(
        &dbs.source_url,
        "unused",
        &progress,
        &slot,
        &[
            "--route",
            &route,
            "--no-create-topics",
            "--dead-letter-topic",
            &dead_letters,
        ],
        &[],
    );
    common::wait_until("50 dead letters", Duration::from_secs(120), || {
        let dead_letters = dead_letters.clone();
        async move {
            std::panic::catch_unwind(|| read_topic(&dead_letters).len()).unwrap_or(0) >= 50
        }
    })
    .await;
    assert!(connector.terminate().success());
    let letters = read_topic(&dead_letters);
    assert_eq!(letters.len(), 50);
    let ids: std::collections::HashSet<i64> = letters
        .iter()
        .map(|r| {
            let v = json(&r.value);
            assert!(
                v["reason"].as_str().unwrap().contains("does not exist"),
                "{v}"
            );
            v["event"]["id"].as_i64().unwrap()
        })
        .collect();
    assert_eq!(ids.len(), 50, "each row once");

    // `status` counts them, and says why the last one is there.
    let (_, stdout, stderr) = common::run_binary(&[
        "status",
        "--source-url",
        &dbs.source_url,
        "--target-url",
        &dbs.target_url,
        "--slot",
        &slot,
        "--progress-topic",
        &progress,
        "--dead-letter-topic",
        &dead_letters,
        "--json",
    ]);
    let report = json(stdout.as_bytes());
    assert_eq!(report["kafka"]["dead_letters"], 50, "{stdout}{stderr}");
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains(&format!("50 dead letters in Kafka topic {dead_letters}")),
        "{warnings}"
    );
}

/// Issue 24, item 8: rows committed in Kafka but not yet deleted when the connector
/// is killed are deleted after the restart (the slot is not confirmed past a row
/// before its delete, so the restart reads it again, skips it as delivered, and
/// deletes it).
#[tokio::test(flavor = "multi_thread")]
async fn cleanup_deletes_after_a_restart_what_a_kill_left_between_kafka_commit_and_delete() {
    let dbs = TestDbs::new().await;
    let (topic, progress, slot) = (
        random_name("outbox"),
        random_name("progress"),
        random_name("slot"),
    );
    // The slot exists before the rows: they are streamed, not snapshotted.
    let mut connector = spawn_connector(&dbs.source_url, &topic, &progress, &slot, &[], &[]);
    common::wait_until("the slot", Duration::from_secs(60), || async {
        common::count(
            &dbs.source_url,
            &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        )
        .await
            == 1
    })
    .await;
    assert!(connector.terminate().success());
    load::run(&LoadArgs::count(&dbs.source_url, 1500))
        .await
        .unwrap();
    // Deletes far apart: the third Kafka commit happens before any delete, and the
    // process dies right after it.
    let mut connector = spawn_connector(
        &dbs.source_url,
        &topic,
        &progress,
        &slot,
        &[
            "--cleanup",
            "--cleanup-every-ms",
            "600000",
            "--batch-size",
            "100",
        ],
        &[common::crash_after_commits("3")],
    );
    let status = common::wait_for_exit(&mut connector, Duration::from_secs(120)).await;
    assert!(!status.success(), "the test hook aborts the connector");
    let committed = read_topic(&topic).len();
    assert!(committed >= 100, "some batches were committed: {committed}");
    assert_eq!(
        common::count(&dbs.source_url, "SELECT count(*) FROM outbox.transactions").await,
        1500,
        "nothing was deleted before the kill"
    );
    let mut connector = spawn_connector(
        &dbs.source_url,
        &topic,
        &progress,
        &slot,
        &["--cleanup", "--cleanup-every-ms", "200"],
        &[],
    );
    common::wait_until(
        "the outbox to be empty",
        Duration::from_secs(120),
        || async {
            common::count(&dbs.source_url, "SELECT count(*) FROM outbox.transactions").await == 0
        },
    )
    .await;
    assert!(connector.terminate().success());
    let records = read_topic(&topic);
    let ids: std::collections::HashSet<Vec<u8>> = records.iter().map(|r| r.value.clone()).collect();
    assert_eq!(records.len(), 1500, "every row once in Kafka");
    assert_eq!(ids.len(), 1500);
}

/// Issue 24, item 6: `check` validates each route against its live table and prints
/// what one row would become.
#[tokio::test(flavor = "multi_thread")]
async fn check_validates_routes_and_shows_a_sample_record() {
    let dbs = TestDbs::new().await;
    let source = dbs.source().await;
    source.batch_execute(SCHEMA).await.unwrap();
    source
        .batch_execute(
            "INSERT INTO app.outbox VALUES ('00000000-0000-4000-8000-000000000001', 'Order', 'o-1', 'Created', '{\"a\": 1}');
             CREATE PUBLICATION routes_pub FOR TABLE app.outbox, app.audit WITH (publish = 'insert');",
        )
        .await
        .unwrap();
    let config = std::env::temp_dir().join(format!("{}.toml", random_name("routes")));
    let run = |routes: &str| {
        std::fs::write(&config, routes).unwrap();
        let (code, stdout, stderr) = common::run_binary(&[
            "check",
            "--config",
            config.to_str().unwrap(),
            "--source-url",
            &dbs.source_url,
            "--target-url",
            &dbs.target_url,
            "--publication",
            "routes_pub",
            "--no-kafka",
        ]);
        (code, format!("{stdout}{stderr}"))
    };
    let (code, out) = run(
        "[[route]]\ntable = \"app.outbox\"\npreset = \"event-router\"\n\n[[route]]\ntable = \"app.audit\"\ntopic = \"audit\"\nvalue = \"payload\"\npayload = \"body\"\n",
    );
    assert!(out.contains("ok    route table app.outbox: app.outbox (id, aggregatetype, aggregateid, type, payload) → outbox.event.${aggregatetype}"), "{out}");
    assert!(
        out.contains(
            "ok    route table app.outbox: sample: topic outbox.event.Order, key o-1, value {\"a\": 1}, header id=00000000-0000-4000-8000-000000000001"
        ),
        "{out}"
    );
    assert!(
        out.contains("route table app.audit: sample: the table is empty"),
        "{out}"
    );
    assert!(
        out.contains(
            "ok    pg_start: publication: routes_pub publishes inserts of app.outbox, app.audit"
        ),
        "{out}"
    );
    assert_eq!(code, 0, "{out}");

    // A template over a missing column, a table outside the publication, a bad key.
    let (code, out) = run(
        "[[route]]\ntable = \"app.outbox\"\npreset = \"event-router\"\ntopic = \"t.${region}\"\n\n[[route]]\ntable = \"outbox.transactions\"\n",
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  route table app.outbox: the route for table app.outbox names what the source does not have: the topic column \"region\""),
        "{out}"
    );
    assert!(
        out.contains("FAIL  pg_start: publication: the outbox table outbox.transactions is not in publication routes_pub"),
        "{out}"
    );
    let (code, out) = run("[[route]]\ntable = \"app.outbox\"\nprest = \"x\"\n");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("unknown field `prest`"), "{out}");
}
