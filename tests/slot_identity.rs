//! Slot identity: a slot dropped and created again behind the relay's back, or a
//! pg_start that is not the server the progress came from, starts after data the relay
//! never delivered. The relay stops with exit 2 and says to run `reconcile`, rather
//! than stream from it.

mod common;

use std::time::Duration;

use common::connector::KafkaPipeline as Pipeline;
use common::TestDbs;
use outbox_relay::cmd::load::{self, LoadArgs};

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_created_again_behind_the_connector_stops_it_with_exit_2() {
    let p = Pipeline::new().await;
    let mut connector = p.spawn_connector(&[], &[]);
    load::run(&LoadArgs::count(&p.dbs.source_url, 200))
        .await
        .unwrap();
    p.assert_topic_exactly_once().await;
    assert!(connector.terminate().success());

    let source = p.dbs.source().await;
    source
        .execute("SELECT pg_drop_replication_slot($1)", &[&p.slot])
        .await
        .unwrap();
    // Written while there is no slot: no slot will ever send these.
    load::run(&LoadArgs::count(&p.dbs.source_url, 100))
        .await
        .unwrap();
    source
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&p.slot],
        )
        .await
        .unwrap();

    let mut connector = p.spawn_connector(&[], &[]);
    let status = common::wait_for_exit(&mut connector, Duration::from_secs(90)).await;
    let log = connector.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("behind the relay's back") && log.contains("reconcile"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_from_another_pg_start_stops_direct_mode_with_exit_2() {
    let dbs = TestDbs::new().await;
    let slot = common::random_name("slot");
    let mut relay = common::spawn_direct(&dbs, &slot, &[], &[]);
    load::run(&LoadArgs::count(&dbs.source_url, 200))
        .await
        .unwrap();
    dbs.wait_verified(Duration::from_secs(120)).await;
    assert!(relay.terminate().success());
    let target = dbs.target().await;
    let stored: Option<String> = target
        .query_one(
            "SELECT system_identifier FROM outbox_relay.direct_progress WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        stored.is_some(),
        "the progress row carries pg_start's identity"
    );
    // As if pg_end had been restored next to another pg_start.
    target
        .execute(
            "UPDATE outbox_relay.direct_progress SET system_identifier = '1' WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap();

    let mut relay = common::spawn_direct(&dbs, &slot, &[], &[]);
    let status = common::wait_for_exit(&mut relay, Duration::from_secs(90)).await;
    let log = relay.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("is not the server") && log.contains("reconcile"),
        "{log}"
    );
}

/// An idle outbox while other tables are written: the slot is confirmed past them only
/// once a progress record says so, and a restart then passes the identity check.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_slot_is_confirmed_through_progress_records_and_restarts_cleanly() {
    let dbs = TestDbs::new().await;
    let slot = common::random_name("slot");
    let mut relay = common::spawn_direct(&dbs, &slot, &["--heartbeat-secs", "1"], &[]);
    load::run(&LoadArgs::count(&dbs.source_url, 50))
        .await
        .unwrap();
    dbs.wait_verified(Duration::from_secs(120)).await;
    let source = dbs.source().await;
    source
        .batch_execute(
            "CREATE TABLE public.other (x int); INSERT INTO public.other SELECT generate_series(1, 1000);",
        )
        .await
        .unwrap();
    let target_lsn: String = source
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let passed = || async {
        let confirmed: bool = dbs
            .source()
            .await
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &target_lsn],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(false);
        let recorded: bool = dbs
            .target()
            .await
            .query_one(
                "SELECT commit_lsn >= $2::text::pg_lsn FROM outbox_relay.direct_progress WHERE slot_name = $1",
                &[&slot, &target_lsn],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(false);
        confirmed && recorded
    };
    common::wait_until(
        "the slot and the progress row to pass the other table's writes",
        Duration::from_secs(60),
        passed,
    )
    .await;
    assert!(relay.terminate().success());
    let mut relay = common::spawn_direct(&dbs, &slot, &[], &[]);
    load::run(&LoadArgs::count(&dbs.source_url, 50))
        .await
        .unwrap();
    dbs.wait_verified(Duration::from_secs(120)).await;
    common::connector::assert_running(&mut relay, "after the restart");
}
