//! `reconcile` against the real stack: a damaged or empty pg_end, a dry run, and rows
//! that differ (reported, never overwritten).
//!
//! Every test uses its own databases; none stops a shared component.

mod common;

use common::sink::dead_letter_count;
use common::{balances, load, run_binary, TestDbs};
use outbox_relay::cmd::reconcile::{self, ReconcileArgs};
use serde_json::Value;

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
    let balances_before = balances(&dbs.target().await, false).await;

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
    assert_eq!(balances(&dbs.target().await, false).await, balances_before);

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
    assert_eq!(dead_letter_count(&dbs).await, 0);
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
        common::count(
            &dbs.target_url,
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
