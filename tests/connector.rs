//! The connector against the real stack: slot → Kafka, exactly once, through kills.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{random_name, read_topic, Relay, TestDbs, BROKERS};
use outbox_relay::load::{self, LoadArgs};

/// A connector wired to a test's own databases, topic, progress topic and slot.
struct Pipeline {
    dbs: TestDbs,
    topic: String,
    progress_topic: String,
    slot: String,
}

impl Pipeline {
    async fn new() -> Self {
        Self {
            dbs: TestDbs::new().await,
            topic: random_name("outbox"),
            progress_topic: random_name("progress"),
            slot: random_name("slot"),
        }
    }

    fn connector_args(&self) -> Vec<String> {
        [
            "connector",
            "--source-url",
            &self.dbs.source_url,
            "--brokers",
            BROKERS,
            "--topic",
            &self.topic,
            "--progress-topic",
            &self.progress_topic,
            "--slot",
            &self.slot,
            "--batch-size",
            "500",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn spawn_connector(&self, extra: &[&str], envs: &[(&str, &str)]) -> Relay {
        let mut args = self.connector_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Relay::spawn(&args, envs)
    }

    /// Waits until the topic holds every outbox row, then checks that each id is there
    /// exactly once with exactly the source's values, keyed by account_id.
    async fn assert_topic_exactly_once(&self) {
        let source = self.dbs.source().await;
        let expected = common::expected_records(&source).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        let last = loop {
            let topic = self.topic.clone();
            let records = tokio::task::spawn_blocking(move || read_topic(&topic))
                .await
                .unwrap();
            if records.len() >= expected.len() {
                break records;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {} of {} outbox rows reached Kafka",
                records.len(),
                expected.len()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let mut seen: HashMap<i64, usize> = HashMap::new();
        for record in &last {
            let value: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
            let id = value["id"].as_i64().unwrap();
            *seen.entry(id).or_default() += 1;
            let text = std::str::from_utf8(&record.value).unwrap();
            assert_eq!(
                Some(text),
                expected.get(&id).map(String::as_str),
                "value of id {id}"
            );
            assert_eq!(
                record.key.as_deref(),
                Some(value["account_id"].to_string().as_bytes()),
                "key of id {id}"
            );
            assert!(record.headers.iter().any(|(k, _)| k == "outbox-relay.lsn"));
        }
        let duplicated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            duplicated.is_empty(),
            "{} ids duplicated, e.g. {:?}",
            duplicated.len(),
            &duplicated[..duplicated.len().min(5)]
        );
        assert_eq!(seen.len(), expected.len(), "ids in Kafka vs outbox rows");
    }

    async fn confirmed_flush_lsn(&self) -> Option<String> {
        self.dbs
            .source()
            .await
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .unwrap()
            .and_then(|r| r.get(0))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_rows_and_streamed_rows_arrive_exactly_once_with_exact_values() {
    let p = Pipeline::new().await;
    // Rows already in the outbox when the slot is created come from its snapshot.
    load::run(&LoadArgs::count(&p.dbs.source_url, 700))
        .await
        .unwrap();
    let mut connector = p.spawn_connector(&[], &[]);
    load::run(&LoadArgs::count(&p.dbs.source_url, 1300))
        .await
        .unwrap();
    p.assert_topic_exactly_once().await;
    // Graceful stop exits 0 and leaves the slot confirmed.
    assert!(connector.terminate().success());
    assert!(p.confirmed_flush_lsn().await.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_moments_and_between_kafka_commit_and_slot_ack_loses_and_duplicates_nothing(
) {
    let p = Pipeline::new().await;
    let mut args = LoadArgs::count(&p.dbs.source_url, 6000);
    args.rate = 300.0;
    let load = tokio::spawn(async move { load::run(&args).await });

    // Kills forced right after a Kafka commit, before the slot is confirmed: the
    // next instance must find those transactions in the progress topic and skip them.
    for _ in 0..2 {
        let mut connector =
            p.spawn_connector(&[], &[("OUTBOX_RELAY_TEST_CRASH_AFTER_COMMITS", "3")]);
        let status = common::wait_for_exit(&mut connector, Duration::from_secs(90)).await;
        assert!(!status.success(), "the test hook aborts the process");
    }
    // Kills at random moments.
    for round in 0..6 {
        let mut connector = p.spawn_connector(&[], &[]);
        let wait_ms = 1000 + rand::random::<u64>() % 2500;
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        eprintln!("round {round}: SIGKILL after {wait_ms} ms");
        connector.kill9();
    }
    let summary = load.await.unwrap().unwrap();
    assert_eq!(summary.committed, 6000);
    let _connector = p.spawn_connector(&[], &[]);
    p.assert_topic_exactly_once().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slot_advances_while_the_outbox_is_idle_and_other_tables_are_written() {
    let p = Pipeline::new().await;
    let _connector = p.spawn_connector(&["--heartbeat-secs", "1"], &[]);
    load::run(&LoadArgs::count(&p.dbs.source_url, 10))
        .await
        .unwrap();
    p.assert_topic_exactly_once().await;
    let source = p.dbs.source().await;
    source
        .batch_execute("CREATE TABLE public.other (x int); INSERT INTO public.other SELECT generate_series(1, 1000);")
        .await
        .unwrap();
    let target: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    common::wait_until(
        "the slot to pass the other table's writes",
        Duration::from_secs(60),
        || async {
            let confirmed = p.confirmed_flush_lsn().await.unwrap_or_default();
            let passed: bool = source
                .query_one(
                    "SELECT $1::text::pg_lsn >= $2::text::pg_lsn",
                    &[&confirmed, &target],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(false);
            passed
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_slot_after_use_is_a_definite_error() {
    let p = Pipeline::new().await;
    let mut connector = p.spawn_connector(&[], &[]);
    load::run(&LoadArgs::count(&p.dbs.source_url, 20))
        .await
        .unwrap();
    p.assert_topic_exactly_once().await;
    assert!(connector.terminate().success());
    p.dbs
        .source()
        .await
        .execute("SELECT pg_drop_replication_slot($1)", &[&p.slot])
        .await
        .unwrap();
    let mut connector = p.spawn_connector(&[], &[]);
    let status = common::wait_for_exit(&mut connector, Duration::from_secs(60)).await;
    assert_eq!(
        status.code(),
        Some(2),
        "a lost slot must stop the connector"
    );
    // Nothing was recreated behind the user's back.
    assert!(p.confirmed_flush_lsn().await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn at_least_once_mode_delivers_every_id() {
    let p = Pipeline::new().await;
    let _connector = p.spawn_connector(&["--delivery", "at-least-once"], &[]);
    load::run(&LoadArgs::count(&p.dbs.source_url, 1000))
        .await
        .unwrap();
    p.assert_topic_exactly_once().await;
}
