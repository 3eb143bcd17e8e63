//! Foundation: the load generator and the verifier against the real PostgreSQL stack.

mod common;

use common::{count, load, TestDbs};
use outbox_relay::cmd::load::LoadArgs;

#[tokio::test]
async fn load_writes_each_transaction_to_ledger_outbox_and_balance() {
    let dbs = TestDbs::new().await;
    let summary = outbox_relay::cmd::load::run(&LoadArgs::count(&dbs.source_url, 500))
        .await
        .unwrap();
    assert_eq!(summary.committed, 500);
    assert_eq!(summary.failed, 0);

    let ledger = "SELECT count(*) FROM main.transactions";
    assert_eq!(count(&dbs.source_url, ledger).await, 500);
    let outbox = "SELECT count(*) FROM outbox.transactions";
    assert_eq!(count(&dbs.source_url, outbox).await, 500);
    let source = dbs.source().await;
    // The outbox row is the ledger row.
    let differing: i64 = source
        .query_one(
            "SELECT count(*) FROM main.transactions t FULL JOIN outbox.transactions o USING (id)
             WHERE (t.account_id, t.amount, t.created_at) IS DISTINCT FROM (o.account_id, o.amount, o.created_at)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(differing, 0);
    // Seed value ranges.
    let bad: i64 = source
        .query_one(
            "SELECT count(*) FROM main.transactions
             WHERE account_id NOT BETWEEN 1 AND 10 OR abs(amount) NOT BETWEEN 10 AND 100 OR amount % 10 <> 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bad, 0);
    // Balances equal the sums on the source side.
    let report = dbs.verify().await;
    assert!(report.source_drift.is_empty(), "{}", report.render());
}

#[tokio::test]
async fn load_with_rows_per_transaction_writes_each_as_one_source_transaction() {
    let dbs = TestDbs::new().await;
    let args = LoadArgs {
        rows_per_transaction: 301,
        concurrency: 2,
        ..LoadArgs::count(&dbs.source_url, 4)
    };
    let summary = outbox_relay::cmd::load::run(&args).await.unwrap();
    assert_eq!(summary.committed, 4);

    for table in ["main.transactions", "outbox.transactions"] {
        let sql = format!("SELECT count(*) FROM {table}");
        assert_eq!(count(&dbs.source_url, &sql).await, 4 * 301, "{table}");
        // One source transaction per 301 rows, its ids consecutive.
        let sql = format!(
            "SELECT count(*) FROM (SELECT xmin::text, max(id) - min(id), count(*) FROM {table}
             GROUP BY 1 HAVING max(id) - min(id) = 300 AND count(*) = 301) t"
        );
        assert_eq!(count(&dbs.source_url, &sql).await, 4, "{table}");
    }
    let bad = "SELECT count(*) FROM main.transactions
               WHERE account_id NOT BETWEEN 1 AND 10 OR abs(amount) NOT BETWEEN 10 AND 100";
    assert_eq!(count(&dbs.source_url, bad).await, 0);
    let report = dbs.verify().await;
    assert!(report.source_drift.is_empty(), "{}", report.render());
}

/// A run with --duration lasts its duration even when its rate gives it a single
/// transaction: back-to-back runs then keep the rate (the chaos runner writes its large
/// transactions so; a run that ended after its one transaction made them back to back).
#[tokio::test]
async fn load_at_a_rate_below_one_per_duration_writes_one_and_lasts_the_duration() {
    let dbs = TestDbs::new().await;
    let args = LoadArgs {
        rate: 0.25,
        count: None,
        duration: Some(2.0),
        concurrency: 1,
        ..LoadArgs::count(&dbs.source_url, 0)
    };
    let started = std::time::Instant::now();
    let summary = outbox_relay::cmd::load::run(&args).await.unwrap();
    assert_eq!(summary.committed, 1);
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        count(&dbs.source_url, "SELECT count(*) FROM main.transactions").await,
        1
    );
}

/// A value the client cannot convert has no SQLSTATE, like a lost connection, but no
/// retry cures it: it must stop the command (found when `load` retried a parameter of
/// the wrong type for ten minutes).
#[tokio::test]
async fn a_type_mismatch_is_a_definite_error_and_a_lost_connection_is_not() {
    use outbox_relay::error::{pg::classify, ErrorClass};
    let dbs = TestDbs::new().await;
    let source = dbs.source().await;
    let wrong_parameter = source
        .execute("SELECT $1::int4", &[&1i64])
        .await
        .unwrap_err();
    assert_eq!(
        classify(&wrong_parameter),
        ErrorClass::Definite,
        "{wrong_parameter}"
    );
    let row = source
        .query_one("SELECT 1::int8, NULL::int4", &[])
        .await
        .unwrap();
    let wrong_column = row.try_get::<_, i32>(0).unwrap_err();
    assert_eq!(
        classify(&wrong_column),
        ErrorClass::Definite,
        "{wrong_column}"
    );
    let null = row.try_get::<_, i32>(1).unwrap_err();
    assert_eq!(classify(&null), ErrorClass::Definite, "{null}");
    let refused = tokio_postgres::connect("host=127.0.0.1 port=1 user=x", tokio_postgres::NoTls)
        .await
        .err()
        .expect("nothing listens on port 1");
    assert_eq!(classify(&refused), ErrorClass::Transient, "{refused}");
}

#[tokio::test]
async fn verify_passes_on_equal_databases() {
    let dbs = TestDbs::new().await;
    load(&dbs, 300).await;
    dbs.copy_source_to_target().await;
    let report = dbs.verify().await;
    assert!(report.ok, "{}", report.render());
    assert_eq!(report.source_transactions, 300);
    assert_eq!(report.target_transactions, 300);
}

#[tokio::test]
async fn verify_passes_on_empty_databases_and_fails_when_target_is_empty() {
    let dbs = TestDbs::new().await;
    assert!(dbs.verify().await.ok);
    load(&dbs, 50).await;
    let report = dbs.verify().await;
    assert!(!report.ok);
    assert_eq!(report.missing_count, 50);
    assert_eq!(report.missing_sample.len(), 20);
}

/// Sets up an equal pair, applies `damage` to pg_end, and returns the report.
async fn damaged(damage: &str) -> (TestDbs, outbox_relay::cmd::verify::Report, i64, i64) {
    let dbs = TestDbs::new().await;
    load(&dbs, 200).await;
    dbs.copy_source_to_target().await;
    let target = dbs.target().await;
    let row = target
        .query_one(
            "SELECT id, account_id FROM main.transactions ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let (id, account): (i64, i64) = (row.get(0), row.get(1));
    target
        .batch_execute(
            &damage
                .replace("$ID", &id.to_string())
                .replace("$ACCOUNT", &account.to_string()),
        )
        .await
        .unwrap();
    let report = dbs.verify().await;
    assert!(!report.ok, "damage went unnoticed: {damage}");
    (dbs, report, id, account)
}

#[tokio::test]
async fn verify_reports_a_missing_transaction() {
    // The row is gone and its amount taken back out of the balance: the balances
    // are self-consistent on pg_end but differ from pg_start.
    let (_dbs, report, id, account) = damaged(
        "UPDATE main.balance b SET current_balance = b.current_balance - t.amount
           FROM main.transactions t WHERE t.id = $ID AND b.account_id = t.account_id;
         DELETE FROM main.transactions WHERE id = $ID;",
    )
    .await;
    assert_eq!(report.missing_count, 1);
    assert_eq!(report.missing_sample, vec![id]);
    assert_eq!((report.extra_count, report.changed_count), (0, 0));
    assert_eq!(report.balance_diffs.len(), 1);
    assert_eq!(report.balance_diffs[0].account_id, account);
    assert!(report.target_drift.is_empty() && report.source_drift.is_empty());
    assert!(
        report.render().contains("missing in pg_end: 1"),
        "{}",
        report.render()
    );
}

#[tokio::test]
async fn verify_reports_an_extra_transaction() {
    let (_dbs, report, _, _) = damaged(
        "INSERT INTO main.transactions VALUES (42, 3, 10, '2025-07-23 20:06:21.08533');
         UPDATE main.balance SET current_balance = current_balance + 10 WHERE account_id = 3;",
    )
    .await;
    assert_eq!(report.extra_count, 1);
    assert_eq!(report.extra_sample, vec![42]);
    assert_eq!((report.missing_count, report.changed_count), (0, 0));
    assert!(report.target_drift.is_empty());
    assert!(
        report.render().contains("extra in pg_end"),
        "{}",
        report.render()
    );
}

#[tokio::test]
async fn verify_reports_a_changed_row() {
    let (_dbs, report, id, _) =
        damaged("UPDATE main.transactions SET created_at = created_at + interval '1 second' WHERE id = $ID;").await;
    assert_eq!(report.changed_count, 1);
    assert_eq!(report.changed_sample[0].source.id, id);
    assert_ne!(
        report.changed_sample[0].source.created_at,
        report.changed_sample[0].target.created_at
    );
    assert_eq!((report.missing_count, report.extra_count), (0, 0));
    assert!(report.balance_diffs.is_empty());
    assert!(
        report.render().contains("rows that differ: 1"),
        "{}",
        report.render()
    );
}

#[tokio::test]
async fn verify_reports_balance_drift() {
    let (_dbs, report, _, account) =
        damaged("UPDATE main.balance SET current_balance = current_balance + 10 WHERE account_id = $ACCOUNT;").await;
    assert_eq!(
        (
            report.missing_count,
            report.extra_count,
            report.changed_count
        ),
        (0, 0, 0)
    );
    assert_eq!(report.balance_diffs.len(), 1);
    assert_eq!(report.target_drift.len(), 1);
    assert_eq!(report.target_drift[0].account_id, account);
    assert!(report.source_drift.is_empty());
    assert!(
        report.render().contains("transactions sum to"),
        "{}",
        report.render()
    );
}
