//! The local stack under faults: the load generator through a pg_start crash, and a
//! real three-broker Kafka producing with acks=all while one broker is dead.
//!
//! These tests kill shared components, so each holds `common::fault_lock()`.

mod common;

use std::time::Duration;

use common::{stack, TestDbs, BROKERS};
use outbox_relay::cmd::load::{self, LoadArgs};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

#[tokio::test]
async fn load_survives_a_pg_start_crash_without_losing_or_double_counting() {
    let _lock = common::fault_lock().await;
    let dbs = TestDbs::new().await;
    let mut args = LoadArgs::count(&dbs.source_url, 3000);
    args.rate = 1000.0;
    let load = tokio::spawn(async move { load::run(&args).await });

    // Crash pg_start (SIGKILL of the postmaster) once the load is well under way.
    let source = dbs.source().await;
    common::wait_until("load to be under way", Duration::from_secs(60), || async {
        source
            .query_one("SELECT count(*) >= 500 FROM main.transactions", &[])
            .await
            .map(|row| row.get::<_, bool>(0))
            .unwrap_or(false)
    })
    .await;
    stack(&["kill", "pg_start"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack(&["start", "pg_start"]);

    let summary = load.await.unwrap().unwrap();
    assert_eq!(summary.failed, 0);
    assert!(
        summary.retried > 0,
        "the crash should have forced retries: {summary:?}"
    );

    // pg_start holds exactly what the generator counted as committed: nothing lost,
    // nothing written twice, and the balances are the sums.
    let source = dbs.source().await;
    let ledger: i64 = source
        .query_one("SELECT count(*) FROM main.transactions", &[])
        .await
        .unwrap()
        .get(0);
    let outbox: i64 = source
        .query_one("SELECT count(*) FROM outbox.transactions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ledger as u64, summary.committed);
    assert_eq!(summary.committed, 3000);
    assert_eq!(outbox, ledger);
    let report = dbs.verify().await;
    assert!(report.source_drift.is_empty(), "{}", report.render());
}

#[tokio::test]
async fn kafka_keeps_accepting_acks_all_writes_with_one_broker_killed() {
    let _lock = common::fault_lock().await;
    let topic = common::random_name("stack-test");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .create()
        .unwrap();
    let created = admin
        .create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(3))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap();
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "120000")
        .create()
        .unwrap();

    stack(&["kill", "kafka2"]);
    let mut deliveries = Vec::new();
    for i in 0..100 {
        let payload = format!("{{\"n\":{i}}}");
        let key = i.to_string();
        let record = FutureRecord::to(&topic).key(&key).payload(&payload);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for delivery in deliveries {
        delivery
            .await
            .expect("delivery reported")
            .expect("delivered with one broker down");
    }
    stack(&["start", "kafka2"]);

    // Everything produced is there.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("group.id", common::random_name("stack-test"))
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(30))
        .unwrap();
    let partitions = &metadata.topics()[0].partitions();
    assert_eq!(partitions.len(), 3);
    assert!(partitions.iter().all(|p| p.replicas().len() == 3));
    let mut total = 0;
    for p in 0..3 {
        let (low, high) = consumer
            .fetch_watermarks(&topic, p, Duration::from_secs(30))
            .unwrap();
        total += high - low;
    }
    assert_eq!(total, 100);
    let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
}
