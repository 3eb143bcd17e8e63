//! Generic inboxes on the real stack (issue #25): records of any shape into an
//! operator's table in pg_end, keyed by the event id, with a handler statement that
//! runs exactly once per new event, through sink SIGKILLs, replays and bad input.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::sink::{produce, producer, spawn_sink, wait_offsets, Out};
use common::{count, create_topic, random_name, wait_for_exit, Relay, TestDbs, BROKERS};

/// The inbox of an event-router-shaped topic, and a per-aggregate counter.
const INBOX_SQL: &str = "
CREATE SCHEMA inbox;
CREATE TABLE inbox.events (
    event_id     uuid PRIMARY KEY,
    aggregate_id text NOT NULL,
    payload      jsonb,
    kafka_offset bigint,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE inbox.counters (
    aggregate_id text PRIMARY KEY,
    events       bigint NOT NULL,
    total        numeric NOT NULL
);";

/// A Debezium-shaped outbox on pg_start.
const APP_OUTBOX_SQL: &str = "
CREATE SCHEMA app;
CREATE TABLE app.outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL,
                         aggregateid text NOT NULL, type text NOT NULL, payload jsonb);";

/// Adds each new event to its aggregate's counter; `amount` must be a number (an
/// event whose amount is not makes the handler raise an error for that event).
const COUNTER_HANDLER: &str = "
INSERT INTO inbox.counters AS c (aggregate_id, events, total)
SELECT aggregate_id, count(*), sum((payload->>'amount')::numeric)
FROM new_events GROUP BY aggregate_id ORDER BY aggregate_id
ON CONFLICT (aggregate_id) DO UPDATE
    SET events = c.events + EXCLUDED.events, total = c.total + EXCLUDED.total";

fn inbox_flag(topic: &str, handler: &str) -> String {
    let handler = handler.replace('\n', " ");
    format!(
        r#"{{name = "orders", topics = ["{topic}"], format = "event-router", table = "inbox.events", columns = {{event_id = "$header.id", aggregate_id = "$key", payload = "$value", kafka_offset = "$offset"}}, handler = "{handler}"}}"#
    )
}

/// An event-router record: key the aggregate, value the payload, header `id`, and the
/// connector's LSN header (source positions increase with `n`).
fn event(n: u64, aggregate: &str, amount: &str) -> Out {
    Out {
        key: Some(aggregate.as_bytes().to_vec()),
        value: Some(format!(r#"{{"amount": {amount}, "n": {n}}}"#).into_bytes()),
        headers: vec![
            ("id".into(), uuid(n).into_bytes()),
            (
                "outbox-relay.lsn".into(),
                format!("0/{:X}", 0x1000_0000 + n * 0x100).into_bytes(),
            ),
        ],
    }
}

fn uuid(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

async fn exec(dbs: &TestDbs, sql: &str) {
    dbs.target().await.batch_execute(sql).await.unwrap();
}

async fn counters(dbs: &TestDbs) -> BTreeMap<String, (i64, String)> {
    dbs.target()
        .await
        .query(
            "SELECT aggregate_id, events, total::text FROM inbox.counters",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

async fn dead_letter_kinds(dbs: &TestDbs) -> BTreeMap<String, i64> {
    dbs.target()
        .await
        .query(
            "SELECT kind, count(*) FROM outbox_relay.dead_letters GROUP BY kind",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn an_event_router_topic_feeds_an_inbox_whose_handler_counts_each_event_once() {
    let dbs = TestDbs::new().await;
    // A team's own pg_end (`migrate --relay-only`): none of the ledger's tables.
    exec(&dbs, "DROP SCHEMA main CASCADE").await;
    exec(&dbs, INBOX_SQL).await;
    let topic = create_topic("inbox-orders", 3, &[]).await;
    let group = random_name("inbox");
    let inbox = inbox_flag(&topic, COUNTER_HANDLER);
    let args = ["--inbox", inbox.as_str(), "--batch-size", "200"];

    // 3,000 events over 7 aggregates, with amounts such as 12.30; the expected counts.
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut records = Vec::new();
    for n in 1..=3000u64 {
        let aggregate = format!("order-{}", n % 7);
        let cents = (n % 1000) as i64 + 1;
        records.push(event(
            n,
            &aggregate,
            &format!("{}.{:02}", cents / 100, cents % 100),
        ));
        let e = expected.entry(aggregate).or_default();
        e.0 += 1;
        e.1 += cents;
    }
    // Bad input: an amount the handler cannot add (handler_failed), an event without
    // its id header (missing_field), the id of event 1 with another payload (conflict).
    let mut poison = event(3001, "order-1", "\"abc\"");
    poison.value = Some(br#"{"amount": "abc"}"#.to_vec());
    let mut no_id = event(3002, "order-2", "1");
    no_id.headers.retain(|(k, _)| k != "id");
    let mut conflict = event(1, "order-1", "99");
    conflict.value = Some(br#"{"amount": 99}"#.to_vec());

    let producer = producer();
    let mut sink = spawn_sink(&dbs, &topic, &group, &args);
    let mut last = BTreeMap::new();
    for (i, chunk) in records.chunks(500).enumerate() {
        common::sink::merge(&mut last, produce(&producer, &topic, chunk).await);
        if i == 1 || i == 3 {
            // Resent as a connector would after a crash: duplicates.
            common::sink::merge(&mut last, produce(&producer, &topic, &chunk[..100]).await);
            tokio::time::sleep(Duration::from_millis(300)).await;
            sink.kill9();
            sink = spawn_sink(&dbs, &topic, &group, &args);
        }
    }
    common::sink::merge(
        &mut last,
        produce(&producer, &topic, &[poison, no_id, conflict]).await,
    );
    wait_offsets(&dbs, &topic, &last, Duration::from_secs(120)).await;

    let want: BTreeMap<String, (i64, String)> = expected
        .iter()
        .map(|(a, (n, cents))| {
            (
                a.clone(),
                (*n, format!("{}.{:02}", cents / 100, cents % 100)),
            )
        })
        .collect();
    assert_eq!(counters(&dbs).await, want, "each event counted once");
    assert_eq!(
        count(&dbs.target_url, "SELECT count(*) FROM inbox.events").await,
        3000
    );
    let kinds = dead_letter_kinds(&dbs).await;
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("conflict".to_string(), 1),
            ("handler_failed".to_string(), 1),
            ("missing_field".to_string(), 1),
        ]),
        "dead letters"
    );
    // A dead letter keeps what it refused.
    let kept = count(
        &dbs.target_url,
        "SELECT count(*) FROM outbox_relay.dead_letters WHERE record_value IS NOT NULL AND headers IS NOT NULL",
    )
    .await;
    assert_eq!(kept, 3);
    sink.terminate();

    // Replaying an applied range, by source position (event 1500 on) and from the
    // beginning, changes nothing.
    let mut consumed = Vec::new();
    for replay in [vec!["--from-lsn", "0/1005DC00"], vec!["--from-beginning"]] {
        let mut args = args.to_vec();
        args.extend(replay.iter().copied());
        let mut sink = spawn_sink(&dbs, &topic, &random_name("replay"), &args);
        common::wait_until("the replay starts", Duration::from_secs(60), || async {
            std::fs::read_to_string(&sink.log)
                .unwrap_or_default()
                .matches("replaying")
                .count()
                >= 3
        })
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let status = sink.terminate();
        let log = std::fs::read_to_string(&sink.log).unwrap();
        assert!(status.success(), "{log}");
        let stats: serde_json::Value = serde_json::from_str(
            log.lines()
                .find_map(|l| l.strip_prefix("sink: "))
                .unwrap_or_else(|| panic!("no stats line: {log}")),
        )
        .unwrap();
        assert_eq!(stats["inserted"], 0, "{log}");
        consumed.push(stats["consumed"].as_u64().unwrap());
        assert_eq!(counters(&dbs).await, want, "a replay changes nothing");
        assert_eq!(dead_letter_kinds(&dbs).await, kinds);
    }
    assert!(
        consumed[0] > 1000 && consumed[0] < consumed[1] && consumed[1] == 3203,
        "from the LSN: about half; from the beginning: all 3,203 records: {consumed:?}"
    );
}

#[tokio::test]
async fn several_topics_debezium_and_cloudevents_feed_inboxes() {
    let dbs = TestDbs::new().await;
    exec(
        &dbs,
        "CREATE SCHEMA inbox;
         CREATE TABLE inbox.payments (id text PRIMARY KEY, amount numeric(12,2) NOT NULL, note text,
                                      source text NOT NULL DEFAULT 'unknown');
         CREATE TABLE inbox.totals (k int PRIMARY KEY, n bigint NOT NULL, total numeric NOT NULL);
         INSERT INTO inbox.totals VALUES (1, 0, 0);",
    )
    .await;
    let rows = create_topic("inbox-rows", 2, &[]).await;
    let debezium = create_topic("inbox-dbz", 2, &[]).await;
    let cloud = create_topic("inbox-ce", 1, &[]).await;
    let handler = "UPDATE inbox.totals SET n = n + (SELECT count(*) FROM new_events), total = total + (SELECT coalesce(sum(amount), 0) FROM new_events) WHERE k = 1";
    let config = std::env::temp_dir().join(format!("{}.toml", random_name("inbox")));
    std::fs::write(
        &config,
        format!(
            "[[sink.inbox]]\nname = \"payments\"\ntopics = [\"{rows}\", \"{debezium}\"]\ntable = \"inbox.payments\"\nhandler = \"{handler}\"\n\n\
             [[sink.inbox]]\nname = \"cloud\"\ntopics = [\"{cloud}\"]\nformat = \"cloudevents\"\ntable = \"inbox.payments\"\nhandler = \"{handler}\"\n\
             [sink.inbox.columns]\nid = \"id\"\namount = \"data.amount\"\nsource = \"source\"\n"
        ),
    )
    .unwrap();

    let producer = producer();
    let mut row_records = Vec::new();
    let mut dbz_records = Vec::new();
    let mut ce_records = Vec::new();
    for n in 0..300 {
        row_records.push(Out::value(format!(
            r#"{{"id": "r{n}", "amount": 1.25, "note": "row"}}"#
        )));
        dbz_records.push(Out::value(format!(
            r#"{{"schema": {{}}, "payload": {{"op": "c", "before": null, "after": {{"id": "d{n}", "amount": "2.50"}}, "source": {{}}}}}}"#
        )));
        // Updates and tombstones are skipped, not applied.
        dbz_records.push(Out::value(format!(
            r#"{{"op": "u", "before": {{"id": "d{n}"}}, "after": {{"id": "d{n}", "amount": "9"}}}}"#
        )));
        ce_records.push(Out::value(format!(
            r#"{{"specversion": "1.0", "id": "c{n}", "type": "payment", "source": "/pay", "data": {{"amount": 0.75}}}}"#
        )));
    }
    let config_arg = format!("--config={}", config.display());
    let group = random_name("inbox");
    let spawn = || {
        Relay::spawn(
            &[
                "sink",
                &config_arg,
                "--target-url",
                &dbs.target_url,
                "--brokers",
                BROKERS,
                "--group",
                &group,
                "--batch-size",
                "100",
            ],
            &[],
        )
    };
    let mut sink = spawn();
    let mut last_rows = produce(&producer, &rows, &row_records[..150]).await;
    let mut last_dbz = produce(&producer, &debezium, &dbz_records[..300]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    sink.kill9();
    sink = spawn();
    common::sink::merge(
        &mut last_rows,
        produce(&producer, &rows, &row_records[150..]).await,
    );
    common::sink::merge(
        &mut last_dbz,
        produce(&producer, &debezium, &dbz_records[300..]).await,
    );
    let last_ce = produce(&producer, &cloud, &ce_records).await;
    wait_offsets(&dbs, &rows, &last_rows, Duration::from_secs(120)).await;
    wait_offsets(&dbs, &debezium, &last_dbz, Duration::from_secs(120)).await;
    wait_offsets(&dbs, &cloud, &last_ce, Duration::from_secs(120)).await;
    sink.terminate();

    let client = dbs.target().await;
    let by_prefix = client
        .query(
            "SELECT left(id, 1), count(*), sum(amount)::text, min(source) FROM inbox.payments GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect::<Vec<(String, i64, String, String)>>();
    assert_eq!(
        by_prefix,
        vec![
            ("c".into(), 300, "225.00".into(), "/pay".into()),
            ("d".into(), 300, "750.00".into(), "unknown".into()),
            ("r".into(), 300, "375.00".into(), "unknown".into()),
        ],
        "every event once; a missing field takes the column's default"
    );
    let totals = client
        .query_one("SELECT n, total::text FROM inbox.totals WHERE k = 1", &[])
        .await
        .unwrap();
    assert_eq!(
        (totals.get::<_, i64>(0), totals.get::<_, String>(1)),
        (900, "1350.00".into())
    );
    assert_eq!(dead_letter_kinds(&dbs).await, BTreeMap::new());
}

#[tokio::test]
async fn a_broken_inbox_stops_the_sink_with_exit_2_and_commits_nothing() {
    let dbs = TestDbs::new().await;
    exec(&dbs, INBOX_SQL).await;
    let topic = create_topic("inbox-broken", 1, &[]).await;
    let producer = producer();
    let records: Vec<Out> = (1..=5).map(|n| event(n, "order-1", "1")).collect();
    let last = produce(&producer, &topic, &records).await;
    assert_eq!(last.len(), 1);

    let run = |inbox: String| {
        let dbs = &dbs;
        let topic = topic.clone();
        async move {
            let mut sink = spawn_sink(dbs, &topic, &random_name("broken"), &["--inbox", &inbox]);
            let status = wait_for_exit(&mut sink, Duration::from_secs(60)).await;
            (status.code(), std::fs::read_to_string(&sink.log).unwrap())
        }
    };
    // Found at start: a handler naming a table that is not there, an id column
    // without a unique index, a column the table does not have.
    let (code, log) = run(inbox_flag(
        &topic,
        "UPDATE inbox.nope SET n = 1 FROM new_events",
    ))
    .await;
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("inbox orders") && log.contains("handler") && log.contains("inbox.nope"),
        "{log}"
    );
    let (code, log) = run(inbox_flag(&topic, COUNTER_HANDLER).replace(
        "table = \"inbox.events\"",
        "table = \"inbox.events\", id = \"aggregate_id\"",
    ))
    .await;
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("unique index"), "{log}");
    // Found on the first batch: a handler that fails for every event.
    let (code, log) = run(inbox_flag(
        &topic,
        "INSERT INTO inbox.counters SELECT aggregate_id, 1 / 0, 0 FROM new_events",
    ))
    .await;
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("every one of the batch's 5 new events"),
        "{log}"
    );
    assert_eq!(
        count(&dbs.target_url, "SELECT count(*) FROM inbox.events").await,
        0
    );
    assert_eq!(
        count(
            &dbs.target_url,
            "SELECT count(*) FROM outbox_relay.sink_offsets"
        )
        .await,
        0,
        "nothing committed"
    );
    assert_eq!(
        count(
            &dbs.target_url,
            "SELECT count(*) FROM outbox_relay.dead_letters"
        )
        .await,
        0
    );
}

/// An inbox subscribed by pattern takes topics created after the sink started (the
/// event-router preset makes a topic per aggregate type, the first time one is
/// written) within seconds: librdkafka looks for new matching topics at each metadata
/// refresh, every 5 minutes by default, which the sink brings down to 5 s.
#[tokio::test]
async fn a_pattern_inbox_takes_topics_created_after_the_sink_started() {
    let dbs = TestDbs::new().await;
    exec(&dbs, "DROP SCHEMA main CASCADE").await;
    exec(&dbs, INBOX_SQL).await;
    let prefix = random_name("late");
    let inbox = inbox_flag(&format!("^{prefix}_.*"), COUNTER_HANDLER);
    let group = random_name("late");
    let mut sink = spawn_sink(&dbs, "unused", &group, &["--inbox", inbox.as_str()]);
    common::wait_until("the sink subscribes", Duration::from_secs(60), || async {
        std::fs::read_to_string(&sink.log)
            .unwrap_or_default()
            .contains("sink started")
    })
    .await;
    let producer = producer();
    let mut total = 0;
    for round in 0..2u64 {
        let topic = create_topic(&prefix, 1, &[]).await;
        let records: Vec<Out> = (1..=10)
            .map(|i| event(round * 100 + i, "order-1", "1"))
            .collect();
        let last = produce(&producer, &topic, &records).await;
        total += 10;
        // Well under librdkafka's own 5 minutes.
        wait_offsets(&dbs, &topic, &last, Duration::from_secs(60)).await;
        assert_eq!(
            counters(&dbs).await,
            BTreeMap::from([("order-1".to_string(), (total, format!("{total}")))]),
        );
    }
    sink.terminate();
}

/// Direct mode, the same route → inbox pair without Kafka: the connector's
/// event-router routes (an outbox table and a logical-message prefix) feed the inbox
/// and its handler, through SIGKILLs of the relay.
#[tokio::test]
async fn direct_mode_feeds_the_same_inbox_from_routes_through_kills() {
    let dbs = TestDbs::new().await;
    // A team's own pg_end (`migrate --relay-only`): none of the ledger's tables.
    exec(&dbs, "DROP SCHEMA main CASCADE").await;
    exec(&dbs, INBOX_SQL).await;
    let publication = random_name("inbox_pub");
    let prefix = random_name("orders");
    let source = dbs.source().await;
    source
        .batch_execute(&format!(
            "{APP_OUTBOX_SQL}
             CREATE PUBLICATION {publication} FOR TABLE app.outbox WITH (publish = 'insert');"
        ))
        .await
        .unwrap();
    let slot = random_name("inbox_slot");
    let routes = [
        r#"{table = "app.outbox", preset = "event-router"}"#.to_string(),
        format!(r#"{{message_prefix = "{prefix}", preset = "event-router"}}"#),
    ];
    let handler = COUNTER_HANDLER.replace('\n', " ");
    let inbox = format!(
        r#"{{name = "orders", topics = ["^outbox\\.event\\..*"], format = "event-router", table = "inbox.events", columns = {{event_id = "$header.id", aggregate_id = "$key", payload = "$value"}}, handler = "{handler}"}}"#
    );
    let mut args: Vec<&str> = vec![
        "--publication",
        &publication,
        "--batch-size",
        "50",
        "--inbox",
        &inbox,
    ];
    for route in &routes {
        args.extend(["--route", route.as_str()]);
    }
    let spawn = || common::spawn_direct(&dbs, &slot, &args, &[]);
    let mut relay = spawn();
    // Messages exist only in the slot: write once it does.
    let slot_exists =
        format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'");
    common::wait_until("the slot", Duration::from_secs(60), || async {
        count(&dbs.source_url, &slot_exists).await == 1
    })
    .await;

    // Event n: aggregate order-(n % 5), amount n; counted into `expected`.
    fn expect(expected: &mut BTreeMap<String, (i64, i64)>, n: u64) -> String {
        let aggregate = format!("order-{}", n % 5);
        let e = expected.entry(aggregate.clone()).or_default();
        e.0 += 1;
        e.1 += n as i64;
        aggregate
    }
    fn outbox_insert(expected: &mut BTreeMap<String, (i64, i64)>, n: u64) -> String {
        let aggregate = expect(expected, n);
        format!(
            "INSERT INTO app.outbox VALUES ('{}', 'Order', '{aggregate}', 'Created', '{{\"amount\": {n}}}');",
            uuid(n)
        )
    }
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut n = 0u64;
    for t in 0..120u64 {
        let mut sql = String::from("BEGIN;");
        for _ in 0..3 {
            n += 1;
            sql.push_str(&outbox_insert(&mut expected, n));
        }
        n += 1;
        let aggregate = expect(&mut expected, n);
        sql.push_str(&format!(
            "SELECT pg_logical_emit_message(true, '{prefix}', '{{\"id\": \"{}\", \"aggregatetype\": \"Order\", \"aggregateid\": \"{aggregate}\", \"payload\": {{\"amount\": {n}}}}}');",
            uuid(n)
        ));
        sql.push_str("COMMIT;");
        source.batch_execute(&sql).await.unwrap();
        if t == 40 || t == 80 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            relay.kill9();
            relay = spawn();
        }
    }
    // One source transaction larger than a batch (50): it streams into one pg_end
    // transaction left open.
    let mut sql = String::from("BEGIN;");
    for _ in 0..120 {
        n += 1;
        sql.push_str(&outbox_insert(&mut expected, n));
    }
    sql.push_str("COMMIT;");
    source.batch_execute(&sql).await.unwrap();
    // Bad input: an amount the handler refuses, and a non-transactional message.
    source
        .batch_execute(&format!(
            "INSERT INTO app.outbox VALUES ('{}', 'Order', 'order-1', 'Created', '{{\"amount\": \"abc\"}}');
             SELECT pg_logical_emit_message(false, '{prefix}', '{{\"id\": \"lone\"}}');",
            uuid(100_000)
        ))
        .await
        .unwrap();
    let want: BTreeMap<String, (i64, String)> = expected
        .iter()
        .map(|(a, (n, total))| (a.clone(), (*n, total.to_string())))
        .collect();
    common::wait_until("every event counted", Duration::from_secs(120), || async {
        count(
            &dbs.target_url,
            "SELECT count(*) FROM outbox_relay.dead_letters",
        )
        .await
            == 2
            && counters(&dbs).await == want
    })
    .await;
    assert_eq!(counters(&dbs).await, want);
    assert_eq!(
        count(&dbs.target_url, "SELECT count(*) FROM inbox.events").await,
        600
    );
    assert_eq!(
        dead_letter_kinds(&dbs).await,
        BTreeMap::from([
            ("handler_failed".to_string(), 1),
            ("unroutable".to_string(), 1)
        ])
    );
    let kept = count(
        &dbs.target_url,
        "SELECT count(*) FROM outbox_relay.dead_letters WHERE record_value IS NOT NULL AND source_lsn IS NOT NULL",
    )
    .await;
    assert_eq!(
        kept, 2,
        "a dead letter keeps its content and source position"
    );
    relay.terminate();
    source
        .batch_execute(&format!("SELECT pg_drop_replication_slot('{slot}')"))
        .await
        .ok();
}

/// `verify` and `reconcile` on a route -> inbox pair, without any relay running: what
/// the outbox holds and the inbox lacks is reported, then copied once through the
/// inbox's handler; what differs or is extra is reported and left alone.
#[tokio::test]
async fn verify_and_reconcile_compare_an_inbox_with_its_source_by_event_id() {
    let dbs = TestDbs::new().await;
    exec(&dbs, INBOX_SQL).await;
    let source = dbs.source().await;
    source.batch_execute(APP_OUTBOX_SQL).await.unwrap();
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut sql = String::new();
    for n in 1..=500u64 {
        let aggregate = format!("order-{}", n % 4);
        sql.push_str(&format!(
            "INSERT INTO app.outbox VALUES ('{}', 'Order', '{aggregate}', 'Created', '{{\"amount\": {n}}}');",
            uuid(n)
        ));
        let e = expected.entry(aggregate).or_default();
        e.0 += 1;
        e.1 += n as i64;
    }
    source.batch_execute(&sql).await.unwrap();
    let want: BTreeMap<String, (i64, String)> = expected
        .iter()
        .map(|(a, (n, total))| (a.clone(), (*n, total.to_string())))
        .collect();

    let handler = COUNTER_HANDLER.replace('\n', " ");
    let inbox = format!(
        r#"{{name = "orders", topics = ["outbox.event.Order"], format = "event-router", table = "inbox.events", columns = {{event_id = "$header.id", aggregate_id = "$key", payload = "$value"}}, handler = "{handler}"}}"#
    );
    let table_route = r#"{table = "app.outbox", preset = "event-router"}"#;
    let query_route = r#"{table = "app.outbox", preset = "event-router", source_query = "SELECT id, aggregatetype, aggregateid, type, payload FROM app.outbox WHERE type = 'Created'"}"#;
    let run = |command: &str, route: &str, extra: &[&str]| {
        let mut args = vec![
            command,
            "--source-url",
            &dbs.source_url,
            "--target-url",
            &dbs.target_url,
            "--route",
            route,
            "--inbox",
            &inbox,
        ];
        args.extend_from_slice(extra);
        common::run_binary(&args)
    };

    let (code, out, err) = run("verify", table_route, &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("missing in the inbox: 500"), "{out}");
    let (code, out, err) = run("reconcile", query_route, &["--dry-run"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("would add 500"), "{out}");
    assert_eq!(
        count(&dbs.target_url, "SELECT count(*) FROM inbox.events").await,
        0
    );

    let (code, out, err) = run("reconcile", query_route, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("added 500"), "{out}");
    assert_eq!(
        counters(&dbs).await,
        want,
        "copied through the handler once"
    );
    let (code, out, err) = run("verify", table_route, &[]);
    assert_eq!(code, 0, "{out}{err}");

    // One event lost, one changed, one that no source holds.
    dbs.target()
        .await
        .batch_execute(&format!(
            "DELETE FROM inbox.events WHERE event_id = '{}';
             UPDATE inbox.events SET payload = '{{\"amount\": -1}}' WHERE event_id = '{}';
             INSERT INTO inbox.events VALUES ('{}', 'order-9', '{{}}', NULL);",
            uuid(7),
            uuid(8),
            uuid(9999)
        ))
        .await
        .unwrap();
    let (code, out, _) = run("verify", table_route, &["--json"]);
    assert_eq!(code, 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pair = &report["inboxes"][0];
    assert_eq!(pair["missing_count"], 1, "{out}");
    assert_eq!(pair["missing_sample"][0], uuid(7), "{out}");
    assert_eq!(pair["changed_count"], 1, "{out}");
    assert_eq!(pair["changed_sample"][0]["columns"][0], "payload", "{out}");
    assert_eq!(pair["extra_count"], 1, "{out}");
    assert_eq!(pair["extra_sample"][0], uuid(9999), "{out}");

    // The lost event is copied (and counted once more by the handler: its counter
    // lost nothing, the event row was deleted behind the relay's back); the changed
    // and the extra ones are left alone and still reported.
    let (code, out, _) = run("reconcile", table_route, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("added 1") && out.contains("never overwritten"),
        "{out}"
    );
    let events = count(
        &dbs.target_url,
        &format!(
            "SELECT count(*) FROM inbox.events WHERE event_id = '{}'",
            uuid(7)
        ),
    )
    .await;
    assert_eq!(events, 1);
    let (code, out, _) = run("reconcile", table_route, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        !out.contains("missing in the inbox"),
        "a second run copies nothing: {out}"
    );
}

/// A source event with a value the inbox's column refuses (the pipeline dead-letters
/// it) does not stop `verify` or `reconcile`: it is isolated and reported apart (a
/// difference, never counted missing or copied), and the other events are compared
/// and copied; fixed at the source, it is copied like any missing event.
#[tokio::test]
async fn verify_reports_an_event_the_inbox_refuses_apart_and_reconcile_copies_the_rest() {
    let dbs = TestDbs::new().await;
    exec(
        &dbs,
        "CREATE SCHEMA inbox;
         CREATE TABLE inbox.amounts (event_id uuid PRIMARY KEY, amount numeric NOT NULL);",
    )
    .await;
    let mut sql = String::from(APP_OUTBOX_SQL);
    for n in 1..=40u64 {
        // Event 17's amount is not a number.
        let amount = if n == 17 {
            "\"x\"".to_string()
        } else {
            n.to_string()
        };
        sql.push_str(&format!(
            "INSERT INTO app.outbox VALUES ('{}', 'Order', 'o', 'Created', '{{\"amount\": {amount}}}');",
            uuid(n)
        ));
    }
    dbs.source().await.batch_execute(&sql).await.unwrap();
    let inbox = r#"{table = "inbox.amounts", topics = ["outbox.event.Order"], format = "event-router", columns = {event_id = "$header.id", amount = "amount"}}"#;
    let route = r#"{table = "app.outbox", preset = "event-router"}"#;
    let run = |command: &str, extra: &[&str]| {
        let mut args = vec![
            command,
            "--source-url",
            &dbs.source_url,
            "--target-url",
            &dbs.target_url,
            "--route",
            route,
            "--inbox",
            inbox,
        ];
        args.extend_from_slice(extra);
        common::run_binary(&args)
    };

    let (code, out, err) = run("verify", &["--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pair = &report["inboxes"][0];
    assert_eq!(pair["source_events"], 40, "{out}");
    assert_eq!(pair["missing_count"], 39, "{out}");
    assert_eq!(pair["refused_count"], 1, "{out}");
    assert_eq!(pair["refused_sample"][0]["id"], uuid(17), "{out}");
    assert!(
        pair["refused_sample"][0]["error"]
            .as_str()
            .unwrap()
            .contains("SQLSTATE 22P02"),
        "{out}"
    );

    // The refused event stays a difference: the inbox lacks it, and no copy can add it.
    let (code, out, err) = run("reconcile", &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("added 39"), "{out}");
    assert!(
        out.contains("refused by the inbox's columns or its handler (the pipeline dead-letters them; fix the event, the mapping or the handler, never copied): 1"),
        "{out}"
    );
    assert_eq!(
        count(&dbs.target_url, "SELECT count(*) FROM inbox.amounts").await,
        39
    );
    let (code, out, err) = run("verify", &["--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pair = &report["inboxes"][0];
    assert_eq!(pair["missing_count"], 0, "{out}");
    assert_eq!(pair["extra_count"], 0, "{out}");
    assert_eq!(pair["refused_count"], 1, "{out}");

    // Fixed at the source, it is an ordinary missing event, and reconcile copies it.
    dbs.source()
        .await
        .batch_execute(&format!(
            r#"UPDATE app.outbox SET payload = '{{"amount": 17}}' WHERE id = '{}'"#,
            uuid(17)
        ))
        .await
        .unwrap();
    let (code, out, err) = run("reconcile", &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("added 1"), "{out}");
    let (code, out, err) = run("verify", &[]);
    assert_eq!(code, 0, "{out}{err}");
}

/// An event the inbox's handler refuses (the pipeline dead-letters it once) is, for
/// `reconcile`, which runs the handler, refused and not missing: reported with the
/// handler's error, and no run writes a dead letter for it again.
#[tokio::test]
async fn reconcile_reports_an_event_the_handler_refuses_and_writes_no_dead_letter() {
    let dbs = TestDbs::new().await;
    exec(&dbs, INBOX_SQL).await;
    let mut sql = String::from(APP_OUTBOX_SQL);
    for n in 1..=5u64 {
        // Event 3's amount is not a number: the counter handler's cast fails.
        let amount = if n == 3 {
            "\"abc\"".to_string()
        } else {
            n.to_string()
        };
        sql.push_str(&format!(
            "INSERT INTO app.outbox VALUES ('{}', 'Order', 'order-1', 'Created', '{{\"amount\": {amount}}}');",
            uuid(n)
        ));
    }
    dbs.source().await.batch_execute(&sql).await.unwrap();
    let inbox = inbox_flag("outbox.event.Order", COUNTER_HANDLER);
    let route = r#"{table = "app.outbox", preset = "event-router"}"#;
    let reconcile = || {
        common::run_binary(&[
            "reconcile",
            "--source-url",
            &dbs.source_url,
            "--target-url",
            &dbs.target_url,
            "--route",
            route,
            "--inbox",
            &inbox,
        ])
    };
    for run in 0..2 {
        let (code, out, err) = reconcile();
        assert_eq!(code, 1, "run {run}: {out}{err}");
        assert!(
            out.contains("or the handler, never copied): 1")
                && out.contains(&format!("id {}: inbox orders: the handler failed", uuid(3))),
            "run {run}: {out}"
        );
        // The first run adds the four others; then nothing is missing.
        let missing = out.contains("missing in the inbox: 4") && out.contains("added 4");
        assert_eq!(missing, run == 0, "run {run}: {out}");
        assert_eq!(
            count(
                &dbs.target_url,
                "SELECT count(*) FROM outbox_relay.dead_letters"
            )
            .await,
            0,
            "run {run}"
        );
    }
    assert_eq!(
        counters(&dbs).await,
        BTreeMap::from([("order-1".to_string(), (4, "12".to_string()))]),
    );
}

/// Direct mode with a route whose topic no inbox takes would make every row a dead
/// letter: it exits 2 before the first row, and `check` (direct mode's: a file with
/// `[direct]` only, or `--no-kafka`) says the same, naming the route, its topic and
/// the inboxes' topics; once the inbox takes the topic, both go ahead.
#[tokio::test]
async fn direct_mode_and_check_refuse_a_route_whose_topic_no_inbox_takes() {
    let dbs = TestDbs::new().await;
    exec(&dbs, "DROP SCHEMA main CASCADE").await;
    exec(&dbs, INBOX_SQL).await;
    let publication = random_name("untaken_pub");
    dbs.source()
        .await
        .batch_execute(&format!(
            "{APP_OUTBOX_SQL}
             CREATE PUBLICATION {publication} FOR TABLE app.outbox WITH (publish = 'insert');"
        ))
        .await
        .unwrap();
    let slot = random_name("untaken_slot");
    let route = r#"{table = "app.outbox", preset = "event-router", topic = "orders"}"#;
    let config = |inbox_topic: &str| {
        let path = std::env::temp_dir().join(format!("{}.toml", random_name("untaken")));
        let inbox = inbox_flag(inbox_topic, COUNTER_HANDLER).replace('\\', "\\\\");
        std::fs::write(
            &path,
            format!(
                "[direct]\nslot = \"{slot}\"\npublication = \"{publication}\"\n\
                 route = [{route}]\ninbox = [{inbox}]\n"
            ),
        )
        .unwrap();
        path
    };
    // The databases on the command line: the stack's environment wins over a file.
    let urls = [
        "--source-url",
        dbs.source_url.as_str(),
        "--target-url",
        dbs.target_url.as_str(),
    ];
    let check = |path: &std::path::Path| {
        let mut args = vec!["check", "--config", path.to_str().unwrap(), "--json"];
        args.extend(urls);
        common::run_binary(&args)
    };

    let wrong = config("payments");
    let (code, out, err) = check(&wrong);
    assert_eq!(code, 1, "{out}{err}");
    let lines: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let line = lines
        .iter()
        .find(|l| l["check"] == "route table app.outbox: inbox")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(line["ok"], false, "{out}");
    let detail = line["detail"].as_str().unwrap();
    assert!(
        detail.contains("topic orders") && detail.contains("orders takes payments"),
        "{detail}"
    );
    // No Kafka line and no connector's slot: a file with [direct] alone is a
    // deployment without Kafka.
    assert!(
        !lines
            .iter()
            .any(|l| l["check"].as_str().unwrap().starts_with("kafka")),
        "{out}"
    );
    let slots: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["check"].as_str()?.strip_prefix("pg_start: slot "))
        .filter(|s| *s != "retention")
        .collect();
    assert_eq!(slots, [slot.as_str()], "{out}");

    let mut relay = common::spawn_direct(&dbs, &slot, &["--config", wrong.to_str().unwrap()], &[]);
    let status = wait_for_exit(&mut relay, Duration::from_secs(60)).await;
    let log = relay.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("which no inbox takes"), "{log}");

    let right = config("orders");
    let (code, out, err) = check(&right);
    let lines: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let line = lines
        .iter()
        .find(|l| l["check"] == "route table app.outbox: inbox")
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(line["detail"], "orders → inbox orders", "{out}{err}");
    assert_eq!(code, 0, "{out}{err}");
    let mut relay = common::spawn_direct(&dbs, &slot, &["--config", right.to_str().unwrap()], &[]);
    dbs.source()
        .await
        .batch_execute(
            "INSERT INTO app.outbox VALUES ('00000000-0000-0000-0000-000000000001', 'Order', \
             'order-1', 'created', '{\"amount\": 5}')",
        )
        .await
        .unwrap();
    common::wait_until(
        "the event in the inbox",
        Duration::from_secs(60),
        || async { count(&dbs.target_url, "SELECT count(*) FROM inbox.events").await == 1 },
    )
    .await;
    assert_eq!(
        counters(&dbs).await,
        BTreeMap::from([("order-1".to_string(), (1, "5".to_string()))]),
    );
    relay.terminate();

    // A templated topic naming a column the table lacks is known from the table's
    // columns only: logged at start (as the connector does), every row a dead letter.
    let template = config("orders");
    let text = std::fs::read_to_string(&template)
        .unwrap()
        .replace(r#"topic = "orders"}"#, r#"topic = "orders${nosuch}"}"#);
    std::fs::write(&template, text).unwrap();
    let relay = common::spawn_direct(&dbs, &slot, &["--config", template.to_str().unwrap()], &[]);
    dbs.source()
        .await
        .batch_execute(
            "INSERT INTO app.outbox VALUES ('00000000-0000-0000-0000-000000000002', 'Order', \
             'order-1', 'created', '{\"amount\": 5}')",
        )
        .await
        .unwrap();
    common::wait_until(
        "the route's problem logged",
        Duration::from_secs(60),
        || async {
            relay
                .log_text()
                .contains("every row of this outbox becomes a dead letter")
        },
    )
    .await;
    for path in [wrong, right, template] {
        let _ = std::fs::remove_file(path);
    }
}
