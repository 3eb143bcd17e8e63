//! Day-two operations against the real stack: `status` (slots, watermarks, progress,
//! sink offsets, an unreachable component), `reconcile` (a damaged or empty pg_end, dry
//! run, rows that differ) and sink replay (`--from-beginning`, `--from-timestamp` over
//! an applied topic change nothing).
//!
//! Every test uses its own databases, topics, slots and consumer groups; none stops a
//! shared component.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{random_name, Relay, TestDbs, BROKERS};
use outbox_relay::load::{self, LoadArgs};
use outbox_relay::lsn::Lsn;
use outbox_relay::reconcile::{self, ReconcileArgs};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");

async fn load(dbs: &TestDbs, n: u64) {
    let summary = load::run(&LoadArgs::count(&dbs.source_url, n))
        .await
        .unwrap();
    assert_eq!(summary.committed, n);
}

/// Polls `verify` until it passes; panics with its report after `timeout`.
async fn wait_verified(dbs: &TestDbs, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let report = dbs.verify().await;
        if report.ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "verify still fails after {timeout:?}:\n{}",
            report.render()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs the binary to completion; returns its exit code, stdout and stderr.
fn run_binary(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BIN)
        .args(args)
        .env("OUTBOX_RELAY_LOG", "warn")
        .output()
        .expect("run outbox-relay");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn balances(dbs: &TestDbs) -> BTreeMap<i64, String> {
    dbs.target()
        .await
        .query(
            "SELECT account_id, current_balance::text FROM main.balance",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn stored_offsets(dbs: &TestDbs, topic: &str) -> BTreeMap<i32, i64> {
    dbs.target()
        .await
        .query(
            "SELECT partition, last_offset FROM outbox_relay.sink_offsets WHERE topic = $1",
            &[&topic],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

// ---------------------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_reports_slots_progress_offsets_and_an_unreachable_component() {
    let dbs = TestDbs::new().await;
    let (topic, progress_topic) = (random_name("status"), random_name("progress"));
    let (slot, direct_slot) = (random_name("slot"), random_name("direct"));
    load(&dbs, 300).await;
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
            &progress_topic,
            "--slot",
            &slot,
        ],
        &[],
    );
    let _sink = Relay::spawn(
        &[
            "sink",
            "--target-url",
            &dbs.target_url,
            "--brokers",
            BROKERS,
            "--topic",
            &topic,
            "--group",
            &random_name("group"),
        ],
        &[],
    );
    // Direct mode into the same pg_end, from a slot of its own: apply is idempotent,
    // so the two paths together still count every transaction once.
    let _direct = Relay::spawn(
        &[
            "direct",
            "--source-url",
            &dbs.source_url,
            "--target-url",
            &dbs.target_url,
            "--slot",
            &direct_slot,
        ],
        &[],
    );
    load(&dbs, 200).await;
    wait_verified(&dbs, Duration::from_secs(180)).await;

    let status_args = |target_url: &str, brokers: &str| -> Vec<String> {
        [
            "status",
            "--json",
            "--timeout",
            "5",
            "--source-url",
            &dbs.source_url,
            "--target-url",
            target_url,
            "--brokers",
            brokers,
            "--topic",
            &topic,
            "--progress-topic",
            &progress_topic,
            "--slot",
            &slot,
            "--direct-slot",
            &direct_slot,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let status = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = run_binary(&args);
        let json: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("status --json printed no JSON ({e}):\n{stdout}\n{stderr}"));
        (code, json)
    };

    // Everything applied (verify may pass through direct mode alone): wait until the
    // topic holds every transaction, the sink's offsets have caught up with the high
    // watermarks (lag 1 at most: the trailing commit marker of a Kafka transaction)
    // and both slots are streaming.
    let deadline = Instant::now() + Duration::from_secs(120);
    let json = loop {
        let (code, json) = status(status_args(&dbs.target_url, BROKERS));
        assert_eq!(code, 0, "status failed: {json:#}");
        let sink = json["pg_end"]["sink"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let caught_up = sink.len() == 3
            && sink
                .iter()
                .all(|p| p["lag"].as_i64().is_some_and(|l| l <= 1));
        let active = json["pg_start"]["slots"]
            .as_array()
            .is_some_and(|s| s.iter().all(|s| s["active"] == true));
        let in_kafka: i64 = json["kafka"]["partitions"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        p["high_watermark"].as_i64().unwrap_or(0)
                            - p["low_watermark"].as_i64().unwrap_or(0)
                    })
                    .sum()
            })
            .unwrap_or(0);
        if in_kafka >= 500 && caught_up && active && json["pg_end"]["direct"].is_object() {
            break json;
        }
        assert!(
            Instant::now() < deadline,
            "status never caught up: {json:#}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(json["ok"], true, "{json:#}");

    let source = &json["pg_start"];
    assert_eq!(source["state"], "reachable");
    let slots = source["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 2);
    for (s, name, role) in [
        (&slots[0], &slot, "connector"),
        (&slots[1], &direct_slot, "direct"),
    ] {
        assert_eq!(s["name"], name.as_str());
        assert_eq!(s["role"], role);
        assert_eq!(s["exists"], true);
        assert!(s["active_pid"].as_i64().is_some(), "{s:#}");
        let confirmed: Lsn = s["confirmed_flush_lsn"].as_str().unwrap().parse().unwrap();
        assert!(confirmed > Lsn::ZERO);
        assert!(s["lag_bytes"].as_i64().unwrap() >= 0);
        // `extended` only if the shared stack's WAL outgrew max_wal_size meanwhile.
        assert!(
            ["reserved", "extended"].contains(&s["wal_status"].as_str().unwrap_or("")),
            "{s:#}"
        );
    }

    let kafka = &json["kafka"];
    assert_eq!(kafka["state"], "reachable");
    assert_eq!(kafka["topic"], topic.as_str());
    let partitions = kafka["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 3);
    let records: i64 = partitions
        .iter()
        .map(|p| p["high_watermark"].as_i64().unwrap() - p["low_watermark"].as_i64().unwrap())
        .sum();
    assert!(records >= 500, "at least one offset per record: {kafka:#}");
    assert_eq!(kafka["progress"]["state"], "streaming", "{kafka:#}");
    let progress: Lsn = kafka["progress"]["lsn"].as_str().unwrap().parse().unwrap();
    assert!(progress > Lsn::ZERO);

    let target = &json["pg_end"];
    assert_eq!(target["state"], "reachable");
    for p in target["sink"].as_array().unwrap() {
        let last = p["last_offset"]
            .as_i64()
            .expect("an offset stored per partition");
        assert_eq!(
            p["lag"].as_i64().unwrap(),
            p["high_watermark"].as_i64().unwrap() - 1 - last
        );
    }
    let direct_lsn: Lsn = target["direct"]["commit_lsn"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(direct_lsn > Lsn::ZERO);
    assert_eq!(target["dead_letters"], 0);

    // pg_end and Kafka unreachable: their parts say so, pg_start is still reported,
    // and the exit code is 1.
    let (code, json) = status(status_args(
        "postgres://postgres:postgres@127.0.0.1:1/nowhere",
        "127.0.0.1:1",
    ));
    assert_eq!(code, 1, "{json:#}");
    assert_eq!(json["ok"], false);
    assert_eq!(json["pg_end"]["state"], "unreachable");
    assert!(json["pg_end"]["error"]
        .as_str()
        .is_some_and(|e| !e.is_empty()));
    assert_eq!(json["kafka"]["state"], "unreachable");
    assert_eq!(json["pg_start"]["state"], "reachable");
    assert_eq!(json["pg_start"]["slots"][0]["exists"], true);
    assert_eq!(json["problems"].as_array().unwrap().len(), 2, "{json:#}");

    // The human form says the same.
    let args = status_args("postgres://postgres:postgres@127.0.0.1:1/nowhere", BROKERS);
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--json")
        .collect();
    let (code, stdout, _) = run_binary(&args);
    assert_eq!(code, 1);
    assert!(stdout.contains("pg_end    unreachable: "), "{stdout}");
    assert!(stdout.contains(&format!("slot {slot}")), "{stdout}");
}

// ---------------------------------------------------------------------------------------
// reconcile
// ---------------------------------------------------------------------------------------

/// Deletes `ids` from pg_end together with their amounts in the balances, as a pg_end
/// that never received them would be.
async fn delete_with_balances(dbs: &TestDbs, ids: &[i64]) {
    let target = dbs.target().await;
    target
        .execute(
            "UPDATE main.balance b SET current_balance = b.current_balance - d.total
             FROM (SELECT account_id, sum(amount) AS total FROM main.transactions
                   WHERE id = ANY($1) GROUP BY account_id) d
             WHERE b.account_id = d.account_id",
            &[&ids],
        )
        .await
        .unwrap();
    let deleted = target
        .execute("DELETE FROM main.transactions WHERE id = ANY($1)", &[&ids])
        .await
        .unwrap();
    assert_eq!(deleted, ids.len() as u64);
}

async fn some_ids(dbs: &TestDbs, n: i64) -> Vec<i64> {
    dbs.source()
        .await
        .query(
            "SELECT id FROM main.transactions ORDER BY md5(id::text) LIMIT $1",
            &[&n],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn reconcile_repairs_deleted_rows_and_a_dry_run_changes_nothing() {
    let dbs = TestDbs::new().await;
    load(&dbs, 400).await;
    dbs.copy_source_to_target().await;
    let ids = some_ids(&dbs, 25).await;
    delete_with_balances(&dbs, &ids).await;
    let damaged = dbs.verify().await;
    assert_eq!(damaged.missing_count, 25);
    assert!(damaged.target_drift.is_empty(), "{}", damaged.render());
    let balances_before = balances(&dbs).await;

    // Dry run, through the binary: reports, changes nothing, exits 1.
    let (code, stdout, stderr) = run_binary(&[
        "reconcile",
        "--dry-run",
        "--json",
        "--source-url",
        &dbs.source_url,
        "--target-url",
        &dbs.target_url,
    ]);
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    let dry: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["missing"], 25);
    assert_eq!(dry["inserted"], 0);
    let credited: i64 = dry["credits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["rows"].as_i64().unwrap())
        .sum();
    assert_eq!(credited, 25);
    let after_dry = dbs.verify().await;
    assert_eq!(after_dry.missing_count, 25, "a dry run changed pg_end");
    assert_eq!(balances(&dbs).await, balances_before);

    // The real run, in small batches.
    let mut args = ReconcileArgs::new(&dbs.source_url, &dbs.target_url);
    args.batch_size = 7;
    let report = reconcile::run(&args).await.unwrap();
    assert_eq!(report.missing, 25);
    assert_eq!(report.inserted, 25);
    assert!(report.batches >= 4, "{} batches", report.batches);
    assert!(report.ok(), "{}", report.render());
    assert!(dbs.verify().await.ok);

    // Again: nothing to do, nothing changes.
    let again = reconcile::run(&args).await.unwrap();
    assert_eq!((again.missing, again.inserted), (0, 0));
    assert!(again.ok());
    let target = dbs.target().await;
    assert_eq!(
        count(&target, "SELECT count(*) FROM outbox_relay.dead_letters").await,
        0
    );
}

#[tokio::test]
async fn reconcile_fills_an_empty_pg_end() {
    let dbs = TestDbs::new().await;
    load(&dbs, 300).await;
    let report = reconcile::run(&ReconcileArgs::new(&dbs.source_url, &dbs.target_url))
        .await
        .unwrap();
    assert_eq!((report.missing, report.inserted), (300, 300));
    assert!(report.ok(), "{}", report.render());
    assert!(dbs.verify().await.ok);
}

#[tokio::test]
async fn reconcile_reports_changed_and_extra_rows_and_never_overwrites_them() {
    let dbs = TestDbs::new().await;
    load(&dbs, 200).await;
    dbs.copy_source_to_target().await;
    let ids = some_ids(&dbs, 3).await;
    let (missing, changed) = (ids[0], ids[1]);
    delete_with_balances(&dbs, &[missing]).await;
    let target = dbs.target().await;
    target
        .execute(
            "UPDATE main.transactions SET created_at = created_at + interval '1 second' WHERE id = $1",
            &[&changed],
        )
        .await
        .unwrap();
    target
        .batch_execute(
            "INSERT INTO main.transactions VALUES (-42, 3, 10, '2025-07-23 20:06:21.08533');
             UPDATE main.balance SET current_balance = current_balance + 10 WHERE account_id = 3;",
        )
        .await
        .unwrap();
    let created_at = "SELECT created_at::text FROM main.transactions WHERE id = $1";
    let before: String = target
        .query_one(created_at, &[&changed])
        .await
        .unwrap()
        .get(0);

    let report = reconcile::run(&ReconcileArgs::new(&dbs.source_url, &dbs.target_url))
        .await
        .unwrap();
    assert_eq!((report.missing, report.inserted), (1, 1));
    assert_eq!(report.changed, 1);
    assert_eq!(report.changed_sample[0].source.id, changed);
    assert_eq!((report.extra, report.extra_sample.clone()), (1, vec![-42]));
    assert!(!report.ok(), "{}", report.render());
    let text = report.render();
    assert!(
        text.contains("NOT repaired: 1 transactions differ"),
        "{text}"
    );
    assert!(
        text.contains("NOT repaired: 1 transactions in pg_end"),
        "{text}"
    );

    // pg_end's own rows are untouched; the missing one is back.
    let after: String = target
        .query_one(created_at, &[&changed])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, before, "reconcile overwrote a row");
    assert_eq!(
        count(
            &target,
            "SELECT count(*) FROM main.transactions WHERE id = -42"
        )
        .await,
        1
    );
    let verify = dbs.verify().await;
    assert_eq!(
        (
            verify.missing_count,
            verify.changed_count,
            verify.extra_count
        ),
        (0, 1, 1)
    );
}

// ---------------------------------------------------------------------------------------
// replay
// ---------------------------------------------------------------------------------------

async fn create_topic(partitions: i32) -> String {
    let name = random_name("replay");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let topic = NewTopic::new(&name, partitions, TopicReplication::Fixed(3));
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
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Produces the seed's records (key: id) for the source rows with `id` in `ids`, plus
/// `bad` values; returns the last offset written per partition.
async fn produce(topic: &str, dbs: &TestDbs, ids: &[i64], bad: &[&[u8]]) -> BTreeMap<i32, i64> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let rows = dbs
        .source()
        .await
        .query(
            "SELECT id, account_id, amount::text, created_at::text FROM main.transactions
             WHERE id = ANY($1) ORDER BY id",
            &[&ids],
        )
        .await
        .unwrap();
    let mut records: Vec<(String, Vec<u8>)> = rows
        .iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let value = format!(
                r#"{{"id": {id}, "account_id": {}, "amount": {}, "created_at": "{}"}}"#,
                r.get::<_, i64>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(3)
            );
            (id.to_string(), value.into_bytes())
        })
        .collect();
    records.extend(bad.iter().map(|b| ("bad".to_string(), b.to_vec())));
    let sends = records.iter().map(|(key, value)| {
        producer.send(
            FutureRecord::to(topic)
                .key(key.as_str())
                .payload(value.as_slice()),
            Duration::from_secs(60),
        )
    });
    let mut last = BTreeMap::new();
    for result in futures_util::future::join_all(sends).await {
        let delivery = result.map_err(|(e, _)| e).expect("produce");
        let entry = last.entry(delivery.partition).or_insert(delivery.offset);
        *entry = (*entry).max(delivery.offset);
    }
    last
}

async fn all_ids(dbs: &TestDbs) -> Vec<i64> {
    dbs.source()
        .await
        .query("SELECT id FROM main.transactions ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A sink of its own group, logging to a file; `extra` are replay flags.
fn spawn_sink(dbs: &TestDbs, topic: &str, group: &str, extra: &[&str]) -> (Relay, PathBuf) {
    let log = std::env::temp_dir().join(format!("{}.log", random_name("replay_sink")));
    let file = std::fs::File::create(&log).unwrap();
    eprintln!("sink {group} {extra:?} logs to {}", log.display());
    let child = Command::new(BIN)
        // Several sinks run at once: each serves its metrics on a port of its own.
        .env("OUTBOX_RELAY_METRICS_ADDR", "127.0.0.1:0")
        .args([
            "sink",
            "--target-url",
            &dbs.target_url,
            "--brokers",
            BROKERS,
            "--topic",
            topic,
            "--group",
            group,
            "--batch-size",
            "50",
        ])
        .args(extra)
        .env("OUTBOX_RELAY_LOG", "info,librdkafka=warn,rdkafka=warn")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("spawn outbox-relay sink");
    (Relay { child }, log)
}

/// The group's committed Kafka offsets (the sink commits them after each pg_end
/// commit, for monitoring): the next offset it will read, per partition.
fn committed(topic: &str, group: &str, partitions: &[i32]) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    let Ok(answer) = consumer.committed_offsets(tpl, Duration::from_secs(10)) else {
        return BTreeMap::new();
    };
    answer
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// Waits until the group has consumed through `last` in every listed partition.
async fn wait_consumed(topic: &str, group: &str, last: &BTreeMap<i32, i64>) {
    let (topic, group) = (topic.to_string(), group.to_string());
    common::wait_until(
        "the sink consumed through the end",
        Duration::from_secs(120),
        || {
            let (topic, group, last) = (topic.clone(), group.clone(), last.clone());
            async move {
                let partitions: Vec<i32> = last.keys().copied().collect();
                let done =
                    tokio::task::spawn_blocking(move || committed(&topic, &group, &partitions))
                        .await
                        .unwrap();
                last.iter()
                    .all(|(p, o)| done.get(p).is_some_and(|c| *c > *o))
            }
        },
    )
    .await;
}

/// SIGTERM, then the `sink: {stats}` line the binary prints on a clean exit.
fn stop_and_stats(mut relay: Relay, log: &Path) -> Value {
    assert!(relay.terminate().success(), "the sink did not exit 0");
    let text = std::fs::read_to_string(log).unwrap();
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("sink: "))
        .unwrap_or_else(|| panic!("no stats line in {}", log.display()));
    serde_json::from_str(line).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_replaying_an_applied_topic_changes_nothing() {
    let dbs = TestDbs::new().await;
    let topic = create_topic(3).await;

    // Two phases of records, a timestamp between them, one bad record in the first.
    load(&dbs, 300).await;
    let first_ids = all_ids(&dbs).await;
    let mut last = produce(&topic, &dbs, &first_ids, &[b"not json"]).await;
    // Clock separation (not synchronisation): no first-phase record shares the ms.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let between_ms = chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_millis(5)).await;
    load(&dbs, 100).await;
    let second_ids: Vec<i64> = all_ids(&dbs)
        .await
        .into_iter()
        .filter(|id| !first_ids.contains(id))
        .collect();
    assert_eq!(second_ids.len(), 100);
    let second_last = produce(&topic, &dbs, &second_ids, &[]).await;
    for (p, o) in &second_last {
        let e = last.entry(*p).or_insert(*o);
        *e = (*e).max(*o);
    }

    // Apply everything once.
    let group = random_name("group");
    let (sink, log) = spawn_sink(&dbs, &topic, &group, &[]);
    wait_verified(&dbs, Duration::from_secs(120)).await;
    wait_consumed(&topic, &group, &last).await;
    let first = stop_and_stats(sink, &log);
    assert_eq!(first["inserted"], 400, "{first}");
    let target = dbs.target().await;
    let dead = "SELECT count(*) FROM outbox_relay.dead_letters";
    assert_eq!(count(&target, dead).await, 1);
    let (offsets, money) = (stored_offsets(&dbs, &topic).await, balances(&dbs).await);
    assert_eq!(offsets, last);

    // From the beginning, in a new group (which would otherwise start at pg_end's
    // stored offsets and read nothing): every record is read again, nothing changes.
    let group = random_name("group");
    let (sink, log) = spawn_sink(&dbs, &topic, &group, &["--from-beginning"]);
    wait_consumed(&topic, &group, &last).await;
    let replayed = stop_and_stats(sink, &log);
    assert_eq!(replayed["consumed"], 401, "{replayed}");
    assert_eq!(replayed["inserted"], 0, "{replayed}");
    assert_eq!(replayed["duplicates"], 400, "{replayed}");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("partition assigned, replaying"));
    assert!(dbs.verify().await.ok);
    assert_eq!(count(&target, dead).await, 1, "a replay added dead letters");
    assert_eq!(
        stored_offsets(&dbs, &topic).await,
        offsets,
        "stored offsets moved"
    );
    assert_eq!(balances(&dbs).await, money);

    // From the timestamp between the phases: only the second phase is read again.
    let group = random_name("group");
    let between = between_ms.to_string();
    let (sink, log) = spawn_sink(&dbs, &topic, &group, &["--from-timestamp", &between]);
    wait_consumed(&topic, &group, &second_last).await;
    let replayed = stop_and_stats(sink, &log);
    assert_eq!(replayed["consumed"], 100, "{replayed}");
    assert_eq!(replayed["inserted"], 0, "{replayed}");
    assert!(dbs.verify().await.ok);
    assert_eq!(count(&target, dead).await, 1);
    assert_eq!(stored_offsets(&dbs, &topic).await, offsets);
    assert_eq!(balances(&dbs).await, money);

    // Without a replay flag, a new group starts at pg_end's offsets: nothing to read.
    let group = random_name("group");
    let (sink, log) = spawn_sink(&dbs, &topic, &group, &[]);
    common::wait_until(
        "the sink is assigned its partitions",
        Duration::from_secs(60),
        || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .map(|t| t.matches("partition assigned").count() >= 3)
                    .unwrap_or(false)
            }
        },
    )
    .await;
    let idle = stop_and_stats(sink, &log);
    assert_eq!(idle["consumed"], 0, "{idle}");
}
