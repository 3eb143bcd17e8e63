//! Failover slots (PostgreSQL 17 and newer): the relay creates its slot with FAILOVER
//! unless told not to, and `check` says whether a promotion of a pg_start standby would
//! keep the slot, naming what is missing. On older versions `check` says that a
//! promotion loses the slot. Runs on whatever version the stack runs (the version
//! matrix of `scripts/test` runs it on 14 to 18).

mod common;

use std::time::Duration;

use common::TestDbs;

async fn server_version(dbs: &TestDbs) -> i32 {
    dbs.source()
        .await
        .query_one("SELECT current_setting('server_version_num')::int4", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until the relay streams: its slot is made (a slot seen while
/// CREATE_REPLICATION_SLOT runs is still ephemeral, dropped if the relay stops then).
async fn wait_streaming(relay: &common::Relay) {
    common::wait_until("the relay to stream", Duration::from_secs(60), || async {
        std::fs::read_to_string(&relay.log)
            .unwrap_or_default()
            .contains("streaming")
    })
    .await;
}

async fn failover_flag(dbs: &TestDbs, slot: &str) -> bool {
    dbs.source()
        .await
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}

/// `check`'s failover line for a direct-mode deployment (`--no-kafka`: its one slot).
fn check_line(dbs: &TestDbs, direct_slot: &str) -> String {
    let (code, stdout, stderr) = common::run_binary(&[
        "check",
        "--source-url",
        &dbs.source_url,
        "--target-url",
        &dbs.target_url,
        "--no-kafka",
        "--direct-slot",
        direct_slot,
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    stdout
        .lines()
        .find(|l| l.contains("pg_start: failover slots"))
        .unwrap_or_else(|| panic!("no failover line:\n{stdout}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn slots_are_made_for_failover_and_check_names_what_a_promotion_needs() {
    let dbs = TestDbs::new().await;
    let version = server_version(&dbs).await;
    let (with, without) = (common::random_name("slot"), common::random_name("slot"));
    let mut a = common::spawn_direct(&dbs, &with, &[], &[]);
    wait_streaming(&a).await;
    assert!(a.terminate().success());
    let mut b = common::spawn_direct(&dbs, &without, &["--no-failover-slot"], &[]);
    wait_streaming(&b).await;
    assert!(b.terminate().success());

    let line = check_line(&dbs, &without);
    eprintln!("PostgreSQL {version}: {line}");
    if version < 170000 {
        assert!(line.contains("has no failover slots"), "{line}");
        return;
    }
    assert!(failover_flag(&dbs, &with).await, "created with FAILOVER");
    assert!(!failover_flag(&dbs, &without).await, "--no-failover-slot");
    assert!(
        line.contains(&format!("slot {without} was created without FAILOVER")),
        "{line}"
    );
    let made_for_failover = check_line(&dbs, &with);
    assert!(
        !made_for_failover.contains("was created without"),
        "{made_for_failover}"
    );
    assert!(
        line.contains("synchronized_standby_slots is empty"),
        "{line}"
    );
}
