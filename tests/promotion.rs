//! Following a promotion (#26 item 3): direct mode with a multi-host source URL
//! (`target_session_attrs=read-write`) streams from pg_start; pg_start goes down and its
//! physical standby is promoted; the relay finds the new primary, resumes from the
//! failover slot synchronised to it (PostgreSQL 17+), and pg_end ends exact: every
//! transaction once, balances equal.
//!
//! It runs on a stack instance of its own (PostgreSQL 17 with the standby profile, at
//! port offset 2400, state in /var/tmp/outbox-relay-promotion), because a promotion
//! cannot be undone on the shared stack; the instance is reset before and after. It
//! holds `common::fault_lock()`, so no fault test runs beside it.

mod common;

use std::process::Command;
use std::time::Duration;

use outbox_relay::cmd::load::{self, LoadArgs};

/// pg_start 10400, pg_end 10401, pg_standby 10404; brokers 21490.. (unused here).
const PORT_OFFSET: u16 = 2400;
const STATE_DIR: &str = "/var/tmp/outbox-relay-promotion";

/// `scripts/stack ARGS…` on this test's instance.
fn stack(args: &[&str]) -> String {
    let offset = PORT_OFFSET.to_string();
    common::stack_with(
        &[
            ("OUTBOX_RELAY_STACK_DIR", STATE_DIR),
            ("OUTBOX_RELAY_STACK_PORT_OFFSET", &offset),
        ],
        args,
    )
}

fn url(port: u16, db: &str) -> String {
    format!("postgres://postgres:postgres@127.0.0.1:{port}/{db}")
}

/// Resets the instance when dropped, whatever the outcome: a promoted standby must not
/// outlive the test.
struct Instance;

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = Command::new(common::repo().join("scripts/stack"))
            .arg("reset")
            .env("OUTBOX_RELAY_STACK_DIR", STATE_DIR)
            .env("OUTBOX_RELAY_STACK_PORT_OFFSET", PORT_OFFSET.to_string())
            .output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_mode_follows_a_promotion_of_pg_start_s_standby_exactly_once() {
    let _lock = common::fault_lock().await;
    let (primary, end, standby) = (8000 + PORT_OFFSET, 8001 + PORT_OFFSET, 8004 + PORT_OFFSET);
    stack(&["reset"]);
    let _instance = Instance;
    stack(&["up", "--pg", "17", "--standby"]);

    let source_url = format!(
        "postgres://postgres:postgres@127.0.0.1:{primary},127.0.0.1:{standby}/db_start?target_session_attrs=read-write"
    );
    let target_url = url(end, "db_end");
    outbox_relay::cmd::migrate::source(&url(primary, "db_start"))
        .await
        .unwrap();
    outbox_relay::cmd::migrate::target(&target_url)
        .await
        .unwrap();

    let slot = "promotion";
    let mut relay = common::spawn_direct_between(&source_url, &target_url, slot, &[], &[]);
    common::wait_until("the relay to stream", Duration::from_secs(60), || async {
        relay.log_text().contains("streaming")
    })
    .await;
    load::run(&LoadArgs::count(&source_url, 1000))
        .await
        .unwrap();
    common::wait_verified(&source_url, &target_url, Duration::from_secs(60)).await;

    // The failover slot is on the standby, synchronised (not a temporary copy).
    let on_standby = common::connect(&url(standby, "postgres")).await;
    common::wait_until(
        "the slot to be synchronised to the standby",
        Duration::from_secs(120),
        || async {
            on_standby
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND synced AND NOT temporary",
                    &[&slot],
                )
                .await
                .unwrap()
                .is_some()
        },
    )
    .await;

    // pg_start goes down; its standby is promoted; the writers and the relay find it.
    stack(&["stop", "pg_start"]);
    let promoted = std::time::Instant::now();
    stack(&["promote"]);
    load::run(&LoadArgs::count(&source_url, 1000))
        .await
        .unwrap();
    common::wait_verified(&source_url, &target_url, Duration::from_secs(120)).await;
    eprintln!(
        "after the promotion, pg_end exact {:?} later",
        promoted.elapsed()
    );
    common::connector::assert_running(&mut relay, "after the promotion");
    assert!(relay.terminate().success());
}
