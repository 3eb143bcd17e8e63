//! Sink replay against the real stack: `--from-beginning` and `--from-timestamp` over a
//! topic that was applied already change nothing in pg_end, and a new group without a
//! replay flag starts at pg_end's stored offsets; `--from-lsn` on the connector's own
//! topic reads exactly the source transactions at or after the position.
//!
//! The test uses its own databases, topic and consumer groups; it stops no shared
//! component.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::connector::spawn_connector;
use common::sink::{
    dead_letter_count, merge, produce, producer, seed, source_rows, spawn_sink, stored_offsets, Out,
};
use common::{balances, load, random_name, read_topic, Relay, TestDbs, BROKERS};
use outbox_relay::lsn::Lsn;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use serde_json::Value;

/// Produces the seed's records (key: id) for the source rows with `id` in `ids`, plus
/// `bad` values; returns the last offset written per partition.
async fn produce_seed(
    topic: &str,
    dbs: &TestDbs,
    ids: &[i64],
    bad: &[&[u8]],
) -> BTreeMap<i32, i64> {
    let mut records: Vec<Out> = source_rows(dbs)
        .await
        .iter()
        .filter(|row| ids.contains(&row.id))
        .map(seed)
        .collect();
    records.extend(bad.iter().map(|value| Out {
        key: Some(b"bad".to_vec()),
        value: Some(value.to_vec()),
        headers: Vec::new(),
    }));
    produce(&producer(), topic, &records).await
}

async fn all_ids(dbs: &TestDbs) -> Vec<i64> {
    source_rows(dbs).await.iter().map(|row| row.id).collect()
}

/// A sink of its own group, in batches of 50; `flags` are replay flags.
fn replay_sink(dbs: &TestDbs, topic: &str, group: &str, flags: &[&str]) -> Relay {
    let mut extra = vec!["--batch-size", "50"];
    extra.extend_from_slice(flags);
    spawn_sink(dbs, topic, group, &extra)
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
fn stop_and_stats(mut relay: Relay) -> Value {
    assert!(relay.terminate().success(), "the sink did not exit 0");
    let text = std::fs::read_to_string(&relay.log).unwrap();
    let line = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("sink: "))
        .unwrap_or_else(|| panic!("no stats line in {}", relay.log.display()));
    serde_json::from_str(line).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_replaying_an_applied_topic_changes_nothing() {
    let dbs = TestDbs::new().await;
    let topic = common::create_topic("replay", 3, &[]).await;

    // Two phases of records, a timestamp between them, one bad record in the first.
    load(&dbs, 300).await;
    let first_ids = all_ids(&dbs).await;
    let mut last = produce_seed(&topic, &dbs, &first_ids, &[b"not json"]).await;
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
    let second_last = produce_seed(&topic, &dbs, &second_ids, &[]).await;
    merge(&mut last, second_last.clone());

    // Apply everything once.
    let group = random_name("group");
    let sink = replay_sink(&dbs, &topic, &group, &[]);
    dbs.wait_verified(Duration::from_secs(120)).await;
    wait_consumed(&topic, &group, &last).await;
    let first = stop_and_stats(sink);
    assert_eq!(first["inserted"], 400, "{first}");
    assert_eq!(dead_letter_count(&dbs).await, 1);
    let (offsets, money) = (
        stored_offsets(&dbs, &topic).await,
        balances(&dbs.target().await, false).await,
    );
    assert_eq!(offsets, last);

    // From the beginning, in a new group (which would otherwise start at pg_end's
    // stored offsets and read nothing): every record is read again, nothing changes.
    let group = random_name("group");
    let sink = replay_sink(&dbs, &topic, &group, &["--from-beginning"]);
    let log = sink.log.clone();
    wait_consumed(&topic, &group, &last).await;
    let replayed = stop_and_stats(sink);
    assert_eq!(replayed["consumed"], 401, "{replayed}");
    assert_eq!(replayed["inserted"], 0, "{replayed}");
    assert_eq!(replayed["duplicates"], 400, "{replayed}");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("partition assigned, replaying"));
    assert!(dbs.verify().await.ok);
    assert_eq!(
        dead_letter_count(&dbs).await,
        1,
        "a replay added dead letters"
    );
    assert_eq!(
        stored_offsets(&dbs, &topic).await,
        offsets,
        "stored offsets moved"
    );
    assert_eq!(balances(&dbs.target().await, false).await, money);

    // From the timestamp between the phases: only the second phase is read again.
    let group = random_name("group");
    let between = between_ms.to_string();
    let sink = replay_sink(&dbs, &topic, &group, &["--from-timestamp", &between]);
    wait_consumed(&topic, &group, &second_last).await;
    let replayed = stop_and_stats(sink);
    assert_eq!(replayed["consumed"], 100, "{replayed}");
    assert_eq!(replayed["inserted"], 0, "{replayed}");
    assert!(dbs.verify().await.ok);
    assert_eq!(dead_letter_count(&dbs).await, 1);
    assert_eq!(stored_offsets(&dbs, &topic).await, offsets);
    assert_eq!(balances(&dbs.target().await, false).await, money);

    // Without a replay flag, a new group starts at pg_end's offsets: nothing to read.
    let group = random_name("group");
    let sink = replay_sink(&dbs, &topic, &group, &[]);
    let log = sink.log.clone();
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
    let idle = stop_and_stats(sink);
    assert_eq!(idle["consumed"], 0, "{idle}");
}

/// The LSN header of a record the connector wrote.
fn record_lsn(record: &common::ReadRecord) -> Lsn {
    let (_, value) = record
        .headers
        .iter()
        .find(|(k, _)| k == "outbox-relay.lsn")
        .expect("the connector's records carry outbox-relay.lsn");
    std::str::from_utf8(value).unwrap().parse().unwrap()
}

/// The last offset of each partition among `records`.
fn last_offsets<'a>(records: impl Iterator<Item = &'a common::ReadRecord>) -> BTreeMap<i32, i64> {
    let mut last = BTreeMap::new();
    for r in records {
        let o = last.entry(r.partition).or_insert(r.offset);
        *o = (*o).max(r.offset);
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_replays_the_connectors_topic_from_a_source_position() {
    let dbs = TestDbs::new().await;
    let (topic, progress, slot) = (
        random_name("replay_lsn"),
        random_name("progress"),
        random_name("slot"),
    );
    // Small batches: many Kafka transactions, so the search crosses their markers.
    let mut connector = spawn_connector(
        &dbs.source_url,
        &topic,
        &progress,
        &slot,
        &["--batch-size", "20"],
        &[],
    );
    let source_url = dbs.source_url.clone();
    let slot_name = slot.clone();
    common::wait_until(
        "the connector made its slot",
        Duration::from_secs(60),
        || {
            let (url, slot) = (source_url.clone(), slot_name.clone());
            async move {
                common::count(
                    &url,
                    &format!(
                        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"
                    ),
                )
                .await
                    == 1
            }
        },
    )
    .await;

    // Two phases; the source position between them.
    load(&dbs, 300).await;
    let between: String = dbs
        .source()
        .await
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let between: Lsn = between.parse().unwrap();
    load(&dbs, 100).await;
    let read = {
        let topic = topic.clone();
        move || {
            let topic = topic.clone();
            async move {
                tokio::task::spawn_blocking(move || read_topic(&topic))
                    .await
                    .unwrap()
            }
        }
    };
    common::wait_until(
        "the topic holds all 400 rows",
        Duration::from_secs(120),
        || {
            let read = read.clone();
            async move { read().await.len() == 400 }
        },
    )
    .await;
    assert!(connector.terminate().success());
    let records = read().await;
    let after: Vec<&common::ReadRecord> = records
        .iter()
        .filter(|r| record_lsn(r) >= between)
        .collect();
    assert_eq!(
        after.len(),
        100,
        "the harness: 100 records after the position"
    );
    let last = last_offsets(records.iter());

    // Apply everything once.
    let group = random_name("group");
    let sink = replay_sink(&dbs, &topic, &group, &[]);
    dbs.wait_verified(Duration::from_secs(120)).await;
    wait_consumed(&topic, &group, &last).await;
    let first = stop_and_stats(sink);
    assert_eq!(first["inserted"], 400, "{first}");
    let money = balances(&dbs.target().await, false).await;

    // From the position between the phases: exactly the second phase, read again.
    let group = random_name("group");
    let sink = replay_sink(&dbs, &topic, &group, &["--from-lsn", &between.to_string()]);
    let log = sink.log.clone();
    wait_consumed(&topic, &group, &last_offsets(after.iter().copied())).await;
    let replayed = stop_and_stats(sink);
    assert_eq!(replayed["consumed"], 100, "{replayed}");
    assert_eq!(replayed["inserted"], 0, "{replayed}");
    assert_eq!(replayed["duplicates"], 100, "{replayed}");
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("replay offsets resolved"));
    assert!(dbs.verify().await.ok);
    assert_eq!(balances(&dbs.target().await, false).await, money);

    // From the first position, everything; from past the end, nothing.
    let group = random_name("group");
    let sink = replay_sink(&dbs, &topic, &group, &["--from-lsn", "0/0"]);
    wait_consumed(&topic, &group, &last).await;
    let all = stop_and_stats(sink);
    assert_eq!(all["consumed"], 400, "{all}");
    assert_eq!(all["inserted"], 0, "{all}");

    let end: String = dbs
        .source()
        .await
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let group = random_name("group");
    let sink = replay_sink(&dbs, &topic, &group, &["--from-lsn", &end]);
    let log = sink.log.clone();
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
    let idle = stop_and_stats(sink);
    assert_eq!(idle["consumed"], 0, "{idle}");
}
