//! Following a promotion (#26 item 3): direct mode with a multi-host source URL
//! (`target_session_attrs=read-write`) streams from pg_start; pg_start goes down and its
//! physical standby is promoted; the relay finds the new primary, resumes from the
//! failover slot synchronised to it (PostgreSQL 17+), and pg_end ends exact: every
//! transaction once, balances equal. And `scripts/stack failover` there and back: the
//! primary fenced, its standby promoted, the old primary re-made as the new standby, twice,
//! with the relay following each time.
//!
//! Each test runs on a stack instance of its own (PostgreSQL 17 with the standby profile,
//! at port offset 2400, state in /var/tmp/outbox-relay-promotion), because a promotion
//! cannot be undone on the shared stack; the instance is reset before and after. Each
//! holds `common::fault_lock()`, so neither a fault test nor the other one runs beside it.

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

    // Pointed at the standby alone, `check` fails its `primary` line and `status` says
    // what to change (the relay would wait there, saying the same).
    let on_the_standby = url(standby, "db_start");
    let (code, stdout, _) = common::run_binary(&[
        "check",
        "--no-kafka",
        "--source-url",
        &on_the_standby,
        "--target-url",
        &target_url,
        "--direct-slot",
        slot,
    ]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL  pg_start: primary: ")
                && l.contains("it is a standby (in recovery)")
                && l.contains("target_session_attrs=read-write")),
        "{stdout}"
    );
    let (code, stdout, _) = common::run_binary(&[
        "status",
        "--no-kafka",
        "--source-url",
        &on_the_standby,
        "--target-url",
        &target_url,
    ]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("it is a standby (in recovery)"), "{stdout}");

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

/// The multi-host source URL `scripts/stack env` prints under the standby profile.
fn multihost_source_url() -> String {
    stack(&["env"])
        .lines()
        .find_map(|line| line.strip_prefix("export PG_SOURCE_MULTIHOST_URL="))
        .expect("scripts/stack env prints PG_SOURCE_MULTIHOST_URL")
        .trim_matches('\'')
        .to_string()
}

/// Waits until the relay's failover slot has a synchronised copy (not a temporary one) on
/// the standby at `port`.
async fn wait_slot_synced(port: u16, slot: &str) {
    let standby = common::connect(&url(port, "postgres")).await;
    common::wait_until(
        "the slot to be synchronised to the standby",
        Duration::from_secs(120),
        || async {
            standby
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
}

/// `scripts/stack failover` there and back (#26 item 3): direct mode on the multi-host
/// source URL follows pg_start -> pg_standby, then pg_standby -> pg_start (the old primary
/// re-made as a standby by the first failover), and pg_end ends exact after each.
#[tokio::test(flavor = "multi_thread")]
async fn direct_mode_follows_failovers_there_and_back_exactly_once() {
    let _lock = common::fault_lock().await;
    let (start, end, standby) = (8000 + PORT_OFFSET, 8001 + PORT_OFFSET, 8004 + PORT_OFFSET);
    stack(&["reset"]);
    let _instance = Instance;
    stack(&["up", "--pg", "17", "--standby"]);
    assert_eq!(stack(&["primary"]).trim(), "pg_start");

    let source_url = multihost_source_url();
    let target_url = url(end, "db_end");
    outbox_relay::cmd::migrate::source(&url(start, "db_start"))
        .await
        .unwrap();
    outbox_relay::cmd::migrate::target(&target_url)
        .await
        .unwrap();

    let slot = "failover";
    let mut relay = common::spawn_direct_between(&source_url, &target_url, slot, &[], &[]);
    common::wait_until("the relay to stream", Duration::from_secs(60), || async {
        relay.log_text().contains("streaming")
    })
    .await;
    load::run(&LoadArgs::count(&source_url, 1000))
        .await
        .unwrap();
    common::wait_verified(&source_url, &target_url, Duration::from_secs(60)).await;

    // There (pg_start fenced, pg_standby promoted, pg_start re-made as its standby), and
    // back once the slot is synchronised to the re-made pg_start. `failover` itself waits
    // until the slot is synchronised to the standby it promotes.
    for (round, (primary, new_standby_port)) in [("pg_standby", start), ("pg_start", standby)]
        .into_iter()
        .enumerate()
    {
        let began = std::time::Instant::now();
        stack(&["failover"]);
        let failed_over = began.elapsed();
        assert_eq!(stack(&["primary"]).trim(), primary);
        load::run(&LoadArgs::count(&source_url, 1000))
            .await
            .unwrap();
        common::wait_verified(&source_url, &target_url, Duration::from_secs(120)).await;
        eprintln!(
            "failover {} (to {primary}): took {failed_over:?}, pg_end exact {:?} after it began",
            round + 1,
            began.elapsed()
        );
        common::connector::assert_running(&mut relay, "after the failover");
        if round == 0 {
            wait_slot_synced(new_standby_port, slot).await;
        }
    }
    assert!(relay.terminate().success());
}
