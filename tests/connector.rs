//! The connector against the real stack: slot → Kafka, exactly once, through kills.

mod common;

use std::time::Duration;

use common::connector::KafkaPipeline as Pipeline;
use outbox_relay::cmd::load::{self, LoadArgs};

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

/// The rows already in the outbox when the slot is created are delivered in chunks,
/// each committed with how far the snapshot got. A crash after a chunk resumes after
/// it, under a fresh snapshot that also sees rows written since the slot was created:
/// those are left to the stream. Every row arrives exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_initial_snapshot_resumes_after_its_last_chunk_exactly_once() {
    let p = Pipeline::new().await;
    load::run(&LoadArgs::count(&p.dbs.source_url, 20_000))
        .await
        .unwrap();
    let mut args = LoadArgs::count(&p.dbs.source_url, 2000);
    args.rate = 200.0;
    let load = tokio::spawn(async move { load::run(&args).await });
    for (round, chunks) in ["6", "5"].into_iter().enumerate() {
        let mut connector = p.spawn_connector(&[], &[common::crash_after_snapshot_chunks(chunks)]);
        let status = common::wait_for_exit(&mut connector, Duration::from_secs(120)).await;
        assert!(!status.success(), "the test hook aborts the process");
        let log = connector.log_text();
        assert!(log.contains("after a snapshot chunk"), "{log}");
        assert_eq!(
            log.contains("resuming the slot's initial snapshot"),
            round > 0,
            "{log}"
        );
    }
    let mut connector = p.spawn_connector(&[], &[]);
    let summary = load.await.unwrap().unwrap();
    assert_eq!(summary.committed, 2000);
    p.assert_topic_exactly_once().await;
    let log = connector.log_text();
    assert!(
        log.contains("resuming the slot's initial snapshot"),
        "{log}"
    );
    assert!(connector.terminate().success());
}

/// A source transaction larger than a batch (20,000 rows, batches of 500) streams into
/// one open Kafka transaction: a kill after some of it was sent leaves nothing of it
/// visible (the restart sends it whole, and no id appears twice), and the restart
/// commits it as one.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_transaction_larger_than_a_batch_streams_into_one_kafka_transaction() {
    let p = Pipeline::new().await;
    let mut connector = p.spawn_connector(&[], &[common::crash_after_spills("5")]);
    common::wait_until("streaming", Duration::from_secs(60), || {
        let log = connector.log_text();
        async move { log.contains("streaming") }
    })
    .await;
    load::run(&LoadArgs::count(&p.dbs.source_url, 300))
        .await
        .unwrap();
    common::write_large_transaction(&p.dbs.source_url, 900_000_000_000, 20_000).await;
    load::run(&LoadArgs::count(&p.dbs.source_url, 300))
        .await
        .unwrap();
    let status = common::wait_for_exit(&mut connector, Duration::from_secs(120)).await;
    assert!(!status.success(), "the test hook aborts the process");
    let log = connector.log_text();
    assert!(
        log.contains("a source transaction larger than a batch"),
        "{log}"
    );
    assert!(log.contains("after a spill"), "{log}");

    let mut connector = p.spawn_connector(&[], &[]);
    p.assert_topic_exactly_once().await;
    let log = connector.log_text();
    assert!(
        log.contains(
            "the Kafka transaction of a source transaction larger than a batch is committed"
        ),
        "{log}"
    );
    assert!(connector.terminate().success());
}

/// SIGTERM during the initial snapshot: the connector stops once the chunk being
/// committed is durable and exits 0; the next start resumes after it.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_the_initial_snapshot_stops_at_a_chunk_and_the_next_start_resumes() {
    let p = Pipeline::new().await;
    p.dbs
        .source()
        .await
        .batch_execute(
            "INSERT INTO outbox.transactions \
             SELECT g, g % 100, g * 0.01, timestamp '2026-12-04 10:00' + g * interval '1 ms' \
             FROM generate_series(1, 100000) g",
        )
        .await
        .unwrap();
    let mut connector = p.spawn_connector(&[], &[]);
    common::wait_until("the slot", Duration::from_secs(60), || {
        let log = connector.log_text();
        async move { log.contains("created replication slot") }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(connector.terminate().success(), "{}", connector.log_text());
    assert!(
        !connector.log_text().contains("delivered the outbox rows"),
        "the snapshot was over before the stop: {}",
        connector.log_text()
    );
    let mut connector = p.spawn_connector(&[], &[]);
    p.assert_topic_exactly_once().await;
    let log = connector.log_text();
    assert!(
        log.contains("resuming the slot's initial snapshot"),
        "{log}"
    );
    assert!(connector.terminate().success());
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
        let mut connector = p.spawn_connector(&[], &[common::crash_after_commits("3")]);
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

    // The same for a slot lost while its initial snapshot was half delivered.
    let p = Pipeline::new().await;
    load::run(&LoadArgs::count(&p.dbs.source_url, 3000))
        .await
        .unwrap();
    let mut connector = p.spawn_connector(&[], &[common::crash_after_snapshot_chunks("2")]);
    common::wait_for_exit(&mut connector, Duration::from_secs(60)).await;
    p.dbs
        .source()
        .await
        .execute("SELECT pg_drop_replication_slot($1)", &[&p.slot])
        .await
        .unwrap();
    let mut connector = p.spawn_connector(&[], &[]);
    let status = common::wait_for_exit(&mut connector, Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(2), "{}", connector.log_text());
    assert!(
        connector
            .log_text()
            .contains("its initial snapshot had delivered"),
        "{}",
        connector.log_text()
    );
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

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_load_exits_0_and_a_restart_continues_exactly_once() {
    let p = Pipeline::new().await;
    let mut args = LoadArgs::count(&p.dbs.source_url, 3000);
    args.rate = 300.0;
    let load = tokio::spawn(async move { load::run(&args).await });
    for round in 0..3 {
        let mut connector = p.spawn_connector(&[], &[]);
        // Let it stream for a while (it has read part of the load once Kafka holds some).
        let wait_ms = 2500 + rand::random::<u64>() % 2000;
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        eprintln!("round {round}: SIGTERM after {wait_ms} ms");
        let status = connector.terminate();
        assert!(status.success(), "SIGTERM must exit 0, got {status}");
    }
    let summary = load.await.unwrap().unwrap();
    assert_eq!(summary.committed, 3000);
    let mut connector = p.spawn_connector(&[], &[]);
    p.assert_topic_exactly_once().await;
    assert!(connector.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn cleanup_empties_the_outbox_and_every_id_stays_in_kafka_exactly_once() {
    let p = Pipeline::new().await;
    // Rows present when the slot is created come from its snapshot; they are cleaned
    // up too.
    load::run(&LoadArgs::count(&p.dbs.source_url, 500))
        .await
        .unwrap();
    let cleanup = ["--cleanup", "--cleanup-every-ms", "200"];
    let mut args = LoadArgs::count(&p.dbs.source_url, 2500);
    args.rate = 400.0;
    let load = tokio::spawn(async move { load::run(&args).await });
    let mut connector = p.spawn_connector(&cleanup, &[]);
    // Rows are deleted while the load runs, not only at the end.
    common::wait_until(
        "outbox rows to be deleted during the load",
        Duration::from_secs(120),
        || async {
            let row = p
                .dbs
                .source()
                .await
                .query_one(
                    "SELECT (SELECT count(*) FROM outbox.transactions),
                            (SELECT count(*) FROM main.transactions)",
                    &[],
                )
                .await
                .unwrap();
            let (outbox, ledger): (i64, i64) = (row.get(0), row.get(1));
            ledger >= 1000 && outbox < ledger / 2
        },
    )
    .await;
    // A graceful stop in the middle deletes what it delivered before exiting.
    let status = connector.terminate();
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    let mut connector = p.spawn_connector(&cleanup, &[]);
    let summary = load.await.unwrap().unwrap();
    assert_eq!(summary.committed, 2500);
    common::wait_until(
        "the outbox to be empty",
        Duration::from_secs(180),
        || async { p.outbox_rows().await == 0 },
    )
    .await;
    p.assert_topic_exactly_once_per_ledger().await;
    assert!(connector.terminate().success());
    assert_eq!(p.outbox_rows().await, 0);
}

/// Finding 8 of docs/reliability.md: a Kafka transaction is committed when its
/// coordinator has logged the decision; its markers reach the partitions after that.
/// A session restarted in between read the progress topic only up to the last stable
/// offset, took the record before the batch's own, and sent the batch again. From a
/// reader's side a committed transaction whose markers are pending looks exactly like
/// an open one: here the newest progress record is in an open transaction when the
/// read starts, and is committed three seconds later. The read must wait and return
/// it, not the older record below the last stable offset.
#[tokio::test(flavor = "multi_thread")]
async fn the_progress_read_waits_for_a_transaction_whose_markers_are_pending() {
    use outbox_relay::kafka::{self, TopicSpec};
    use outbox_relay::lsn::Lsn;
    use outbox_relay::progress::ProgressRecord;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

    let suffix: u64 = rand::random();
    let (base, slot) = (
        format!("progress_pending_{suffix:x}"),
        format!("slot_{suffix:x}"),
    );
    let topic = kafka::progress_topic_of(&base, &slot);
    kafka::ensure_topic(
        common::BROKERS,
        &TopicSpec {
            name: &topic,
            partitions: 1,
            replication_factor: 3,
            configs: &[("cleanup.policy", "compact")],
        },
    )
    .await
    .unwrap();
    let (older, newer) = (
        ProgressRecord::streaming(Lsn(0x100)),
        ProgressRecord::streaming(Lsn(0x200)),
    );
    let producer: ThreadedProducer<DefaultProducerContext> = kafka::client_config(common::BROKERS)
        .set("transactional.id", format!("pending-markers-{suffix:x}"))
        .create()
        .unwrap();
    let timeout = Duration::from_secs(30);
    producer.init_transactions(timeout).unwrap();
    for (record, commit) in [(&older, true), (&newer, false)] {
        producer.begin_transaction().unwrap();
        let value = record.to_bytes();
        producer
            .send(BaseRecord::to(&topic).key(&slot).payload(&value))
            .map_err(|(e, _)| e)
            .unwrap();
        producer.flush(timeout).unwrap();
        if commit {
            producer.commit_transaction(timeout).unwrap();
        }
    }
    let read = {
        let (base, slot) = (base.clone(), slot.clone());
        std::thread::spawn(move || kafka::read_progress(common::BROKERS, &base, &slot, timeout))
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !read.is_finished(),
        "the read did not wait for the open transaction"
    );
    producer.commit_transaction(timeout).unwrap();
    let found = read.join().unwrap().unwrap();
    assert_eq!(found, Some(newer));
}

/// #26 item 6: slots do not stall each other. Two connectors on two slots share the
/// progress topic's name (as with the default). One hangs (SIGSTOP) with a Kafka
/// transaction open, its progress record in it; the other restarts and must read its
/// progress and deliver new rows at once. On a shared progress partition its read waited
/// for the hung transaction (up to the transaction timeout, 300 s). The hung one's
/// successor fences it, and both slots stay exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_hung_mid_transaction_does_not_hold_back_another_slot_s_start() {
    let a = Pipeline::new().await;
    let mut b = Pipeline::new().await;
    b.progress_topic = a.progress_topic.clone();
    let mut connector_b = b.spawn_connector(&[], &[]);
    load::run(&LoadArgs::count(&b.dbs.source_url, 200))
        .await
        .unwrap();
    b.assert_topic_exactly_once().await;

    // A's second transaction (the first after its snapshot's) stays open for good.
    let mut connector_a = a.spawn_connector(&[], &[("OUTBOX_RELAY_TEST_HOLD_TRANSACTION", "2")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !connector_a
        .log_text()
        .contains("holding a Kafka transaction open")
    {
        load::run(&LoadArgs::count(&a.dbs.source_url, 20))
            .await
            .unwrap();
        assert!(
            std::time::Instant::now() < deadline,
            "the hook never held a transaction:\n{}",
            connector_a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    connector_a.pause();

    assert!(connector_b.terminate().success());
    load::run(&LoadArgs::count(&b.dbs.source_url, 300))
        .await
        .unwrap();
    let restarted = std::time::Instant::now();
    let mut connector_b = b.spawn_connector(&[], &[]);
    b.assert_topic_exactly_once_within(Duration::from_secs(45))
        .await;
    eprintln!(
        "slot b delivered its new rows {:?} after its restart, slot a hung mid-transaction",
        restarted.elapsed()
    );
    assert!(connector_b.terminate().success());

    // A's successor fences the hung transaction and delivers everything once.
    connector_a.kill9();
    let mut connector_a = a.spawn_connector(&[], &[]);
    load::run(&LoadArgs::count(&a.dbs.source_url, 100))
        .await
        .unwrap();
    a.assert_topic_exactly_once().await;
    assert!(connector_a.terminate().success());
}

/// A slot's progress is in its own topic (`progress_topic_of`); a slot that has none
/// there yet resumes from the shared topic earlier versions wrote, and once its own
/// topic holds a record, the shared one is neither read nor waited for.
#[tokio::test(flavor = "multi_thread")]
async fn a_slot_s_progress_is_read_from_its_own_topic_then_from_the_shared_one_of_earlier_versions()
{
    use outbox_relay::kafka::{self, TopicSpec};
    use outbox_relay::lsn::Lsn;
    use outbox_relay::progress::ProgressRecord;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

    let suffix: u64 = rand::random();
    let (base, slot) = (
        format!("progress_legacy_{suffix:x}"),
        format!("slot_{suffix:x}"),
    );
    let own = kafka::progress_topic_of(&base, &slot);
    let timeout = Duration::from_secs(30);
    let read = |base: &str, slot: &str| {
        let (base, slot) = (base.to_string(), slot.to_string());
        std::thread::spawn(move || kafka::read_progress(common::BROKERS, &base, &slot, timeout))
    };
    assert_eq!(
        read(&base, &slot).join().unwrap().unwrap(),
        None,
        "no topic at all"
    );

    for name in [&base, &own] {
        kafka::ensure_topic(
            common::BROKERS,
            &TopicSpec {
                name,
                partitions: 1,
                replication_factor: 3,
                configs: &[("cleanup.policy", "compact")],
            },
        )
        .await
        .unwrap();
    }
    let producer = |id: &str| {
        let p: ThreadedProducer<DefaultProducerContext> = kafka::client_config(common::BROKERS)
            .set("transactional.id", format!("{id}-{suffix:x}"))
            .create()
            .unwrap();
        p.init_transactions(timeout).unwrap();
        p
    };
    let write = |p: &ThreadedProducer<DefaultProducerContext>,
                 topic: &str,
                 key: &str,
                 record: &ProgressRecord,
                 commit: bool| {
        p.begin_transaction().unwrap();
        let value = record.to_bytes();
        p.send(BaseRecord::to(topic).key(key).payload(&value))
            .map_err(|(e, _)| e)
            .unwrap();
        p.flush(timeout).unwrap();
        if commit {
            p.commit_transaction(timeout).unwrap();
        }
    };
    let (legacy, current) = (
        ProgressRecord::streaming(Lsn(0x100)),
        ProgressRecord::streaming(Lsn(0x200)),
    );
    let old_version = producer("legacy");
    write(&old_version, &base, &slot, &legacy, true);
    assert_eq!(
        read(&base, &slot).join().unwrap().unwrap(),
        Some(legacy.clone()),
        "an empty own topic: the shared topic's record"
    );
    let this_version = producer("current");
    write(&this_version, &own, &slot, &current, true);
    // Another slot's transaction left open on the shared topic: not waited for.
    let other = producer("other");
    write(&other, &base, "another_slot", &legacy, false);
    let started = std::time::Instant::now();
    assert_eq!(
        read(&base, &slot).join().unwrap().unwrap(),
        Some(current),
        "the own topic's record"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the read waited {:?} for the shared topic",
        started.elapsed()
    );
    other.abort_transaction(timeout).unwrap();
}

/// Invariant 3: a new instance's `init_transactions` fences every one of the slot's
/// transactional ids before the progress record is read back. A zombie of an earlier
/// instance holds, on the last id (the one the new instance uses last), an
/// open transaction with a record that was never an outbox row and a progress record
/// far ahead of the slot. The new instance must fence it (its transaction aborted, its
/// commit refused) and go on exactly once: had it left the zombie alone, the open
/// transaction would hold every `read_committed` reader below it, and its commit would
/// make the connector skip rows.
#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_transaction_on_any_of_the_slots_transactional_ids_is_fenced() {
    use outbox_relay::connector::{transactional_id, TRANSACTIONAL_PRODUCERS};
    use outbox_relay::kafka;
    use outbox_relay::lsn::Lsn;
    use outbox_relay::progress::ProgressRecord;
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

    let p = Pipeline::new().await;
    // A first instance creates the topics and delivers some rows.
    let mut connector = p.spawn_connector(&[], &[]);
    load::run(&LoadArgs::count(&p.dbs.source_url, 200))
        .await
        .unwrap();
    p.assert_topic_exactly_once().await;
    assert!(connector.terminate().success());

    let timeout = Duration::from_secs(30);
    let zombie: ThreadedProducer<DefaultProducerContext> = kafka::client_config(common::BROKERS)
        .set(
            "transactional.id",
            transactional_id(&p.slot, TRANSACTIONAL_PRODUCERS - 1),
        )
        // Longer than the test: only a fence ends this transaction in time (librdkafka's
        // default, 60 s, would let the coordinator abort it by itself).
        .set("transaction.timeout.ms", "600000")
        .create()
        .unwrap();
    zombie.init_transactions(timeout).unwrap();
    zombie.begin_transaction().unwrap();
    let ahead = ProgressRecord::streaming(Lsn(u64::MAX >> 1)).to_bytes();
    zombie
        .send(BaseRecord::to(&p.topic).key("1").payload(r#"{"id":-1}"#))
        .map_err(|(e, _)| e)
        .unwrap();
    zombie
        .send(
            BaseRecord::to(&kafka::progress_topic_of(&p.progress_topic, &p.slot))
                .key(&p.slot)
                .payload(&ahead),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    zombie.flush(timeout).unwrap();

    let mut connector = p.spawn_connector(&[], &[]);
    load::run(&LoadArgs::count(&p.dbs.source_url, 300))
        .await
        .unwrap();
    p.assert_topic_exactly_once().await;
    assert!(
        zombie.commit_transaction(timeout).is_err(),
        "the zombie's transaction could still commit"
    );
    assert!(connector.terminate().success());
}

/// Run 17 of the chaos runner (docs/reliability.md, finding 11): an instance whose
/// `init_transactions` completed after it had lost the slot fenced the standby that had
/// just taken the slot, and the fenced one exited 2, leaving nobody to stream until
/// something restarted it. Here the active connector is fenced while it streams, by a
/// producer that initialises every one of its transactional ids as such a late
/// instance would: the connector must not exit. It ends its session, takes the slot
/// again (nobody else holds it), fences in turn, reads its progress back and goes on,
/// every row in the topic exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_connector_fenced_by_a_late_instance_ends_its_session_instead_of_exiting() {
    use outbox_relay::connector::{transactional_id, TRANSACTIONAL_PRODUCERS};
    use outbox_relay::kafka;
    use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};

    let p = Pipeline::new().await;
    let mut connector = p.spawn_connector(&[], &[]);
    let mut args = LoadArgs::count(&p.dbs.source_url, 3000);
    args.rate = 300.0;
    let load = tokio::spawn(async move { load::run(&args).await });
    common::wait_until(
        "the connector streams",
        Duration::from_secs(120),
        || async { connector.log_text().contains("streaming") },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slot = p.slot.clone();
    let late: Vec<ThreadedProducer<DefaultProducerContext>> =
        tokio::task::spawn_blocking(move || {
            (0..TRANSACTIONAL_PRODUCERS)
                .map(|turn| {
                    let producer: ThreadedProducer<DefaultProducerContext> =
                        kafka::client_config(common::BROKERS)
                            .set("transactional.id", transactional_id(&slot, turn))
                            .create()
                            .unwrap();
                    producer.init_transactions(Duration::from_secs(30)).unwrap();
                    producer
                })
                .collect()
        })
        .await
        .unwrap();
    common::wait_until(
        "the connector meets the fence",
        Duration::from_secs(60),
        || async { connector.log_text().contains("this instance was fenced") },
    )
    .await;
    let summary = load.await.unwrap().unwrap();
    assert_eq!(summary.committed, 3000);
    p.assert_topic_exactly_once().await;
    common::connector::assert_running(&mut connector, "after it was fenced");
    drop(late);
    assert!(connector.terminate().success());
}

/// An on-demand backfill while the stream goes on, with a kill after its fourth chunk:
/// the topic holds every outbox row once from the stream and, as a backfill record
/// (same key, same value, the backfill header naming the request), once more for each
/// row present when the backfill was requested, none twice; the progress record says
/// it is done.
#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_resends_each_row_once_across_a_kill_while_the_stream_goes_on() {
    let p = Pipeline::new().await;
    let args = ["--backfill-chunk-rows", "50"];
    let mut connector = p.spawn_connector(&args, &[common::crash_after_backfill_chunks("4")]);
    load::run(&LoadArgs::count(&p.dbs.source_url, 1000))
        .await
        .unwrap();
    p.assert_topic_exactly_once().await;
    let before =
        common::connector::expected_records(&p.dbs.source().await, "outbox.transactions").await;

    common::request_backfill(&p.dbs.source_url, &["--id", "again-1"]);
    let writer = {
        let url = p.dbs.source_url.clone();
        tokio::spawn(async move { load::run(&LoadArgs::count(&url, 300)).await.unwrap() })
    };
    let status = common::wait_for_exit(&mut connector, Duration::from_secs(120)).await;
    assert!(!status.success(), "the test hook aborts the process");
    assert!(connector
        .log_text()
        .contains("after a backfill chunk was committed"));

    let mut connector = p.spawn_connector(&args, &[]);
    writer.await.unwrap();
    let progress = || {
        let (topic, slot) = (p.progress_topic.clone(), p.slot.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                outbox_relay::kafka::read_progress(
                    common::BROKERS,
                    &topic,
                    &slot,
                    Duration::from_secs(10),
                )
            })
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        }
    };
    common::wait_until(
        "the backfill to be done",
        Duration::from_secs(120),
        || async {
            progress().await.backfills.first().map(|b| b.state)
                == Some(outbox_relay::progress::BackfillState::Done)
        },
    )
    .await;
    let done = progress().await.backfills.remove(0);
    assert_eq!(done.id, "again-1");
    assert!(done.rows >= before.len() as u64, "{done:?}");

    let all =
        common::connector::expected_records(&p.dbs.source().await, "outbox.transactions").await;
    let mut streamed = std::collections::HashMap::<i64, usize>::new();
    let mut resent = std::collections::HashMap::<i64, usize>::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let topic = p.topic.clone();
        let records = tokio::task::spawn_blocking(move || common::read_topic(&topic))
            .await
            .unwrap();
        streamed.clear();
        resent.clear();
        for record in &records {
            let value: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
            let id = value["id"].as_i64().unwrap();
            assert_eq!(
                all.get(&id).map(String::as_str),
                Some(std::str::from_utf8(&record.value).unwrap()),
                "value of id {id}"
            );
            assert_eq!(
                record.key.as_deref(),
                Some(value["account_id"].to_string().as_bytes()),
                "key of id {id}"
            );
            let backfill = record
                .headers
                .iter()
                .find(|(k, _)| k == "outbox-relay.backfill");
            match backfill {
                Some((_, id_header)) => {
                    assert_eq!(id_header.as_slice(), b"again-1");
                    *resent.entry(id).or_default() += 1;
                }
                None => *streamed.entry(id).or_default() += 1,
            }
        }
        if streamed.len() >= all.len() || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(streamed.len(), all.len(), "every row streamed");
    assert!(streamed.values().all(|n| *n == 1), "a row streamed twice");
    assert!(resent.values().all(|n| *n == 1), "a row re-sent twice");
    assert!(
        before.keys().all(|id| resent.contains_key(id)),
        "every row present at the request is re-sent"
    );
    assert_eq!(
        resent.len() as u64,
        done.rows,
        "the rows the backfill counted"
    );
    assert!(connector.terminate().success());
}
