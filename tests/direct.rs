//! Direct mode against the real stack: slot → pg_end, exactly once, through kills and
//! outages of both databases.

mod common;

use std::time::Duration;

use common::sink::dead_letter_count;
use common::{load, random_name, stack, Relay, TestDbs};
use outbox_relay::cmd::load::LoadArgs;
use outbox_relay::lsn::Lsn;

/// The batch size of every relay in these tests.
const BATCH: [&str; 2] = ["--batch-size", "500"];

fn spawn_direct(dbs: &TestDbs, slot: &str, envs: &[(&str, &str)]) -> Relay {
    common::spawn_direct(dbs, slot, &BATCH, envs)
}

/// Reads the slot's confirmed LSN and then the LSN recorded in pg_end, over
/// connections it keeps between samples (a connection per sample made each one cost
/// two backend starts, and a busy CI machine then took fewer than 50 samples in a
/// whole run). A connection that fails is dropped and opened again at the next sample,
/// as the databases are killed and restarted under it.
struct LsnSampler {
    source_url: String,
    target_url: String,
    slot: String,
    source: Option<tokio_postgres::Client>,
    target: Option<tokio_postgres::Client>,
}

impl LsnSampler {
    fn new(dbs: &TestDbs, slot: &str) -> Self {
        Self {
            source_url: dbs.source_url.clone(),
            target_url: dbs.target_url.clone(),
            slot: slot.to_owned(),
            source: None,
            target: None,
        }
    }

    /// The slot's confirmed LSN and the LSN recorded in pg_end, read in that order;
    /// `None` while either is unreadable.
    async fn sample(&mut self) -> Option<(Lsn, Lsn)> {
        let confirmed: Option<String> = Self::read(
            &mut self.source,
            &self.source_url,
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &self.slot,
        )
        .await?;
        let recorded: Option<String> = Self::read(
            &mut self.target,
            &self.target_url,
            "SELECT commit_lsn::text FROM outbox_relay.direct_progress WHERE slot_name = $1",
            &self.slot,
        )
        .await?;
        Some((confirmed?.parse().ok()?, recorded?.parse().ok()?))
    }

    /// The first column of the query's row, if there is one and it is not NULL; `None`
    /// if the database cannot be reached or the query fails (the connection is then
    /// dropped).
    async fn read(
        client: &mut Option<tokio_postgres::Client>,
        url: &str,
        query: &str,
        slot: &str,
    ) -> Option<Option<String>> {
        if client
            .as_ref()
            .is_none_or(tokio_postgres::Client::is_closed)
        {
            *client = Some(outbox_relay::pg::connect(url).await.ok()?);
        }
        match client.as_ref()?.query_opt(query, &[&slot]).await {
            // No row, or a NULL (a slot not confirmed yet): `Some(None)`.
            Ok(row) => Some(row.and_then(|row| row.get::<_, Option<String>>(0))),
            Err(_) => {
                *client = None;
                None
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_mode_applies_snapshot_and_stream_exactly_once() {
    let dbs = TestDbs::new().await;
    let slot = random_name("direct");
    load(&dbs, 500).await;
    let mut relay = spawn_direct(&dbs, &slot, &[]);
    load(&dbs, 1500).await;
    dbs.wait_verified(Duration::from_secs(120)).await;
    assert!(relay.terminate().success());
    assert_eq!(dead_letter_count(&dbs).await, 0);
}

/// The initial snapshot in chunks, into pg_end: crashes after a chunk's commit resume
/// after it (see tests/connector.rs's twin), and pg_end ends equal to pg_start.
#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_initial_snapshot_resumes_after_its_last_chunk_exactly_once() {
    let dbs = TestDbs::new().await;
    let slot = random_name("direct");
    load(&dbs, 20_000).await;
    let mut args = LoadArgs::count(&dbs.source_url, 2000);
    args.rate = 200.0;
    let load = tokio::spawn(async move { outbox_relay::cmd::load::run(&args).await });
    for (round, chunks) in ["6", "5"].into_iter().enumerate() {
        let mut relay = spawn_direct(&dbs, &slot, &[common::crash_after_snapshot_chunks(chunks)]);
        let status = common::wait_for_exit(&mut relay, Duration::from_secs(120)).await;
        assert!(!status.success(), "the test hook aborts the process");
        let log = relay.log_text();
        assert!(log.contains("after a snapshot chunk"), "{log}");
        assert_eq!(
            log.contains("resuming the slot's initial snapshot"),
            round > 0,
            "{log}"
        );
    }
    let mut relay = spawn_direct(&dbs, &slot, &[]);
    let summary = load.await.unwrap().unwrap();
    assert_eq!(summary.committed, 2000);
    dbs.wait_verified(Duration::from_secs(120)).await;
    let log = relay.log_text();
    assert!(
        log.contains("resuming the slot's initial snapshot"),
        "{log}"
    );
    assert!(relay.terminate().success());
    assert_eq!(dead_letter_count(&dbs).await, 0);
}

/// A source transaction larger than a batch (20,000 rows, batches of 500) is applied
/// part by part into one open pg_end transaction: a kill after some parts leaves
/// nothing of it in pg_end, and the restart applies it whole, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_transaction_larger_than_a_batch_applies_in_one_pg_end_transaction() {
    let dbs = TestDbs::new().await;
    let slot = random_name("direct");
    let mut relay = spawn_direct(&dbs, &slot, &[common::crash_after_spills("5")]);
    common::wait_until("streaming", Duration::from_secs(60), || {
        let log = relay.log_text();
        async move { log.contains("streaming") }
    })
    .await;
    load(&dbs, 300).await;
    common::write_large_transaction(&dbs.source_url, 900_000_000_000, 20_000).await;
    load(&dbs, 300).await;
    let status = common::wait_for_exit(&mut relay, Duration::from_secs(120)).await;
    assert!(!status.success(), "the test hook aborts the process");
    let log = relay.log_text();
    assert!(log.contains("after a spill"), "{log}");
    let large =
        "SELECT count(*) FROM main.transactions WHERE id BETWEEN 900000000000 AND 900000019999";
    assert_eq!(
        common::count(&dbs.target_url, large).await,
        0,
        "nothing of an unfinished spilled transaction is visible in pg_end"
    );

    let mut relay = spawn_direct(&dbs, &slot, &[]);
    dbs.wait_verified(Duration::from_secs(120)).await;
    assert_eq!(common::count(&dbs.target_url, large).await, 20_000);
    let log = relay.log_text();
    assert!(
        log.contains("a source transaction larger than a batch is committed in pg_end"),
        "{log}"
    );
    assert!(relay.terminate().success());
    assert_eq!(dead_letter_count(&dbs).await, 0);
}

/// A co-located relay can reach both databases over their Unix sockets (a URL whose host
/// is the socket directory, percent-encoded): the replication session, the regular
/// connections and pg_end's apply all run over them, and nothing over TCP.
#[tokio::test(flavor = "multi_thread")]
async fn direct_mode_runs_over_unix_sockets() {
    let dbs = TestDbs::new().await;
    let slot = random_name("direct");
    let dir = common::pg_socket_dir();
    let source_url = common::over_unix_socket(&dbs.source_url, &dir);
    let target_url = format!(
        "{}?application_name={slot}",
        common::over_unix_socket(&dbs.target_url, &dir)
    );
    load(&dbs, 300).await;
    let mut relay = common::spawn_direct_between(&source_url, &target_url, &slot, &BATCH, &[]);
    load(&dbs, 700).await;
    dbs.wait_verified(Duration::from_secs(120)).await;
    // Where the relay's sessions come from, while it runs: a Unix socket has no address.
    let walsender: Vec<(String, Option<String>)> = dbs
        .source()
        .await
        .query(
            "SELECT application_name, client_addr::text FROM pg_stat_replication \
             WHERE application_name = $1",
            &[&format!("outbox-relay:{slot}")],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let appliers: Vec<Option<String>> = dbs
        .target()
        .await
        .query(
            "SELECT client_addr::text FROM pg_stat_activity WHERE application_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(relay.terminate().success());
    assert_eq!(walsender.len(), 1, "one replication session: {walsender:?}");
    assert_eq!(walsender[0].1, None, "replication over TCP: {walsender:?}");
    assert!(!appliers.is_empty(), "no pg_end session named {slot}");
    assert!(
        appliers.iter().all(Option::is_none),
        "pg_end sessions over TCP: {appliers:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkills_and_both_databases_restarting_lose_and_duplicate_nothing() {
    let _lock = common::fault_lock().await;
    let dbs = TestDbs::new().await;
    let slot = random_name("direct");
    let witness = dbs.create_witness_slot().await;
    let mut args = LoadArgs::count(&dbs.source_url, 6000);
    args.rate = 250.0;
    let load = tokio::spawn(async move { outbox_relay::cmd::load::run(&args).await });

    // Sample the slot's confirmed LSN C and then pg_end's recorded LSN R all along;
    // afterwards, a witness slot tells every outbox transaction's commit LSN, and no
    // sample may have confirmed past a transaction pg_end did not hold: no commit end
    // LSN in (R, C].
    // Until the faults are over and pg_end is verified, however long that takes on a
    // busy machine (a fixed 40 s window once held only 45 samples).
    let (stop_sampling, sampling_stopped) = tokio::sync::watch::channel(false);
    let sampler = {
        let mut sampler = LsnSampler::new(&dbs, &slot);
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !*sampling_stopped.borrow() {
                if let Some(sample) = sampler.sample().await {
                    samples.push(sample);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            samples
        })
    };

    let mut relay = spawn_direct(&dbs, &slot, &[common::crash_after_commits("3")]);
    let status = common::wait_for_exit(&mut relay, Duration::from_secs(90)).await;
    assert!(
        !status.success(),
        "the test hook aborts between the pg_end commit and the slot ack"
    );
    for round in 0..5 {
        let mut relay = spawn_direct(&dbs, &slot, &[]);
        let wait_ms = 1000 + rand::random::<u64>() % 2000;
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        eprintln!("round {round}: SIGKILL after {wait_ms} ms");
        relay.kill9();
    }
    let _relay = spawn_direct(&dbs, &slot, &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack(&["kill", "pg_end"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack(&["start", "pg_end"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack(&["stop", "pg_start"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack(&["start", "pg_start"]);

    let summary = load.await.unwrap().unwrap();
    assert_eq!(summary.failed, 0);
    dbs.wait_verified(Duration::from_secs(180)).await;
    let _ = stop_sampling.send(true);
    let samples = sampler.await.unwrap();
    eprintln!("{} samples of the slot and pg_end", samples.len());
    assert!(samples.len() > 50, "too few samples: {}", samples.len());
    let commits = dbs.outbox_commit_lsns(&witness).await;
    assert!(
        commits.len() >= 6000,
        "witness saw {} outbox transactions",
        commits.len()
    );
    // While the slot's initial snapshot is being applied, pg_end holds the marker 0/0
    // and the new slot starts at its consistent point: not a confirmation by the relay,
    // and a crash then drops and recreates the slot (see pipeline::snapshot).
    for (confirmed, recorded) in samples.iter().filter(|(_, r)| !r.is_zero()) {
        let passed = commits.iter().find(|c| *c > recorded && *c <= confirmed);
        assert!(
            passed.is_none(),
            "the slot confirmed {confirmed} while pg_end held only up to {recorded}: \
             transaction at {:?} was not applied",
            passed
        );
    }
}

/// Undoes `stack hold-wal pg_end` if the test ends early (a no-op once pg_end was
/// killed and restarted).
struct WalHeld;

impl Drop for WalHeld {
    fn drop(&mut self) {
        let _ = std::process::Command::new(common::repo().join("scripts/stack"))
            .args(["resume", "pg_end"])
            .output();
    }
}

/// How many times [`asynchronous_commits_lost_in_a_pg_end_crash_are_applied_again`]
/// crashes pg_end at the most, until a crash takes back a visible commit.
const CRASH_ROUNDS: usize = 3;

/// pg_end's commits are asynchronous by default (`--synchronous-commit off`). With
/// pg_end's WAL writer held, the relay's commits stay in WAL buffers, visible but not
/// flushed; killing every pg_end process during a steady load then takes them back.
/// The slot must not have been confirmed past them, and the relay must not go on from
/// its in-memory position: after pg_end's crash recovery it applies them again from the
/// slot, and pg_end ends up equal to pg_start, each transaction counted once.
///
/// The test first checks that the crash did take back commits that were visible before
/// it, or it would pass without exercising the recovery. The relay is frozen (SIGSTOP)
/// from just before pg_end is killed until pg_end has restarted and been counted:
/// its connections are cut under it all the same, and it cannot apply anything again
/// before the count. Any synchronous commit on pg_end (another test's, say) flushes the
/// held WAL, so a crash that lost nothing is repeated, up to [`CRASH_ROUNDS`] times.
#[tokio::test(flavor = "multi_thread")]
async fn asynchronous_commits_lost_in_a_pg_end_crash_are_applied_again() {
    let _lock = common::fault_lock().await;
    let dbs = TestDbs::new().await;
    let slot = random_name("direct");
    let mut relay = spawn_direct(&dbs, &slot, &[]);
    load(&dbs, 500).await;
    dbs.wait_verified(Duration::from_secs(120)).await;

    let rows = "SELECT count(*) FROM main.transactions";
    let mut loads = Vec::new();
    let mut lost = None;
    for round in 1..=CRASH_ROUNDS {
        let before = common::count(&dbs.target_url, rows).await;
        stack(&["hold-wal", "pg_end"]);
        let held = WalHeld;
        // Commits follow each other every linger (20 ms): the relay never idles long
        // enough to flush them itself.
        let mut args = LoadArgs::count(&dbs.source_url, 3000);
        args.rate = 500.0;
        loads.push(tokio::spawn(async move {
            outbox_relay::cmd::load::run(&args).await
        }));
        tokio::time::sleep(Duration::from_millis(3000)).await;
        relay.pause();
        let (applied, insert, written, flushed) = {
            let target = dbs.target().await;
            let row = target
                .query_one(
                    "SELECT (SELECT count(*) FROM main.transactions), \
                     pg_current_wal_insert_lsn()::text, pg_current_wal_lsn()::text, \
                     pg_current_wal_flush_lsn()::text",
                    &[],
                )
                .await
                .unwrap();
            let lsn = |i: usize| row.get::<_, String>(i).parse::<Lsn>().unwrap();
            (row.get::<_, i64>(0), lsn(1), lsn(2), lsn(3))
        };
        stack(&["kill-all", "pg_end"]);
        stack(&["start", "pg_end"]);
        drop(held);
        assert!(applied > before, "the relay applied nothing under load");
        let recovered = common::count(&dbs.target_url, rows).await;
        eprintln!(
            "round {round}: pg_end killed with {applied} rows visible; WAL inserted to \
             {insert}, written to {written}, flushed to {flushed}: {} bytes unwritten; \
             {recovered} rows after its recovery",
            insert.as_u64().saturating_sub(written.as_u64())
        );
        // Another client's writes take pg_end's recovered WAL past the lost commits'
        // positions before the relay runs again: a flush position read on any new
        // connection now says nothing about them.
        let admin = common::connect(common::PG_END_ADMIN).await;
        admin
            .batch_execute(
                "DROP TABLE IF EXISTS wal_filler; CREATE TABLE wal_filler AS SELECT g, repeat('x', 200) AS pad \
                 FROM generate_series(1, 100000) g; DROP TABLE wal_filler",
            )
            .await
            .unwrap();
        relay.resume();
        if recovered < applied {
            lost = Some(applied - recovered);
            break;
        }
    }
    let lost = lost.unwrap_or_else(|| {
        panic!(
            "no crash of {CRASH_ROUNDS} took back a visible commit: pg_end's WAL was flushed \
             each time, and the test did not exercise the recovery"
        )
    });
    eprintln!("the crash took back {lost} rows that were visible before it");

    for load in loads {
        assert_eq!(load.await.unwrap().unwrap().failed, 0);
    }
    dbs.wait_verified(Duration::from_secs(180)).await;
    common::connector::assert_running(&mut relay, "after pg_end's crash");
    assert!(relay.terminate().success());
}

/// Outbox rows pg_end cannot take (an amount of `NaN`, a `-infinity` timestamp) are
/// dead letters that keep the row's full content and its source position, and the
/// stream goes on (issue #25, item 6: they used to be stored without any value).
#[tokio::test(flavor = "multi_thread")]
async fn direct_mode_dead_letters_keep_the_rows_content() {
    let dbs = TestDbs::new().await;
    let slot = random_name("direct");
    let mut relay = spawn_direct(&dbs, &slot, &[]);
    let source = dbs.source().await;
    common::wait_until("the slot", Duration::from_secs(60), || async {
        common::count(
            &dbs.source_url,
            &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        )
        .await
            == 1
    })
    .await;
    source
        .batch_execute(
            "INSERT INTO outbox.transactions VALUES (900001, 7, 'NaN', '2025-07-23 20:06:21');
             INSERT INTO outbox.transactions VALUES (900002, 7, '12.50', '-infinity');
             INSERT INTO outbox.transactions VALUES (900003, 7, '1.25', '2025-07-23 20:06:21');",
        )
        .await
        .unwrap();
    common::wait_until("the good row applied", Duration::from_secs(60), || async {
        common::count(
            &dbs.target_url,
            "SELECT count(*) FROM main.transactions WHERE id = 900003",
        )
        .await
            == 1
            && dead_letter_count(&dbs).await == 2
    })
    .await;
    let letters = dbs
        .target()
        .await
        .query(
            "SELECT kind, convert_from(record_value, 'UTF8'), source_lsn IS NOT NULL
             FROM outbox_relay.dead_letters ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let letters: Vec<(String, String, bool)> = letters
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(letters.len(), 2);
    for (kind, value, positioned) in &letters {
        assert_eq!(kind, "invalid_value");
        assert!(positioned, "the source position is kept");
        let row: serde_json::Value = serde_json::from_str(value).unwrap();
        assert_eq!(row["account_id"], 7, "{value}");
    }
    assert!(
        letters[0].1.contains("NaN") && letters[0].1.contains("900001"),
        "{:?}",
        letters[0]
    );
    assert!(letters[1].1.contains("-infinity"), "{:?}", letters[1]);
    assert!(relay.terminate().success());
}

/// A COMMIT whose outcome is lost with its connection is retried; the retry finds the
/// progress row already at the batch and does not apply it again, so its dead letters
/// (which, unlike rows, have no id to deduplicate by) are written once. The test hook
/// makes every batch's first COMMIT look lost (issue #26, item 7).
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_in_doubt_retried_writes_its_dead_letters_once() {
    let dbs = TestDbs::new().await;
    let slot = random_name("direct");
    let mut relay = common::spawn_direct(
        &dbs,
        &slot,
        &["--synchronous-commit", "on"],
        &[("OUTBOX_RELAY_TEST_DOUBT_COMMITS", "1000")],
    );
    common::wait_until("the slot", Duration::from_secs(60), || async {
        common::count(
            &dbs.source_url,
            &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        )
        .await
            == 1
    })
    .await;
    dbs.source()
        .await
        .batch_execute(
            "BEGIN;
             INSERT INTO outbox.transactions VALUES (900001, 7, 'NaN', '2025-07-23 20:06:21');
             INSERT INTO outbox.transactions VALUES (900002, 7, '12.50', '-infinity');
             INSERT INTO outbox.transactions VALUES (900003, 7, '1.25', '2025-07-23 20:06:21');
             COMMIT;",
        )
        .await
        .unwrap();
    common::wait_until("the good row applied", Duration::from_secs(60), || async {
        common::count(
            &dbs.target_url,
            "SELECT count(*) FROM main.transactions WHERE id = 900003",
        )
        .await
            == 1
    })
    .await;
    // Time for any further retry to write them again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = std::fs::read_to_string(&relay.log).unwrap();
    assert!(
        log.contains("pg_end already holds the batch"),
        "the hook never put a commit in doubt:\n{log}"
    );
    assert_eq!(dead_letter_count(&dbs).await, 2, "{log}");
    assert!(relay.terminate().success());
}

/// #26 item 7: the progress row a relay reads at start is made durable whatever its
/// own `--synchronous-commit`. A relay with `off` (the default) commits a batch and
/// dies before anything flushes it (pg_end's WAL writer held, the fault hook's abort
/// right after the commit): the progress row is visible but not durable. The next relay
/// runs with `on`; it reads that row, skips what it covers and confirms the slot up to
/// it. Were the row not flushed by that read, a crash of pg_end would take the rows back
/// while the slot stays confirmed past them: lost for good (the next session then stops
/// at the slot-identity check). With the read's flush, the crash takes nothing back.
#[tokio::test(flavor = "multi_thread")]
async fn the_progress_read_flushes_the_row_even_with_synchronous_commit_on() {
    let _lock = common::fault_lock().await;
    let dbs = TestDbs::new().await;
    let slot = random_name("direct");
    let rows = "SELECT count(*) FROM main.transactions";

    let mut relay = spawn_direct(&dbs, &slot, &[]);
    load(&dbs, 100).await;
    dbs.wait_verified(Duration::from_secs(120)).await;
    assert!(relay.terminate().success());

    // 50 more, applied in one asynchronous commit by a relay that aborts right after it.
    stack(&["hold-wal", "pg_end"]);
    let held = WalHeld;
    load(&dbs, 50).await;
    let mut crashing = spawn_direct(&dbs, &slot, &[common::crash_after_commits("1")]);
    let status = common::wait_for_exit(&mut crashing, Duration::from_secs(60)).await;
    assert!(!status.success(), "the fault hook did not abort the relay");
    // One batch, usually all 50 (the batch may close earlier).
    let applied = common::count(&dbs.target_url, rows).await;
    assert!(applied > 100, "the aborted relay applied nothing");
    let unflushed: i64 = dbs
        .target()
        .await
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), pg_current_wal_flush_lsn())::int8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    eprintln!("{applied} rows visible, pg_end holds {unflushed} bytes of WAL not flushed");

    let mut relay = common::spawn_direct(
        &dbs,
        &slot,
        &["--batch-size", "500", "--synchronous-commit", "on"],
        &[],
    );
    common::wait_until(
        "the slot confirmed up to the progress row",
        Duration::from_secs(60),
        || async {
            LsnSampler::new(&dbs, &slot)
                .sample()
                .await
                .is_some_and(|(confirmed, recorded)| confirmed >= recorded)
        },
    )
    .await;
    relay.pause();
    stack(&["kill-all", "pg_end"]);
    stack(&["start", "pg_end"]);
    drop(held);
    let recovered = common::count(&dbs.target_url, rows).await;
    relay.resume();
    assert_eq!(
        recovered, applied,
        "pg_end's crash took back rows the slot was confirmed past: the progress read did \
         not flush the row it read"
    );
    dbs.wait_verified(Duration::from_secs(120)).await;
    common::connector::assert_running(&mut relay, "after pg_end's crash");
    assert!(relay.terminate().success());
}

/// An on-demand backfill after pg_end lost rows (as a restore from an old backup would
/// leave it), while `load` goes on: the relay sends the rows the filter selects again,
/// a kill after its fourth chunk resumes after the last durable one, and pg_end ends
/// exactly equal to pg_start (each row counted once); `status` reports the backfill.
#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_restores_rows_pg_end_lost_across_a_kill_while_the_stream_goes_on() {
    let dbs = TestDbs::new().await;
    let slot = random_name("direct");
    let args = ["--batch-size", "500", "--backfill-chunk-rows", "50"];
    let mut relay = common::spawn_direct(
        &dbs,
        &slot,
        &args,
        &[common::crash_after_backfill_chunks("4")],
    );
    load(&dbs, 1500).await;
    dbs.wait_verified(Duration::from_secs(120)).await;

    // pg_end loses the transactions of a third of the accounts, balances included.
    dbs.target()
        .await
        .batch_execute(
            "WITH lost AS (DELETE FROM main.transactions WHERE account_id % 3 = 0 \
                           RETURNING account_id, amount) \
             UPDATE main.balance b SET current_balance = b.current_balance - l.total \
             FROM (SELECT account_id, sum(amount) AS total FROM lost GROUP BY account_id) l \
             WHERE b.account_id = l.account_id",
        )
        .await
        .unwrap();
    assert!(!dbs.verify().await.ok);
    let lost = common::count(
        &dbs.source_url,
        "SELECT count(*) FROM outbox.transactions WHERE account_id % 3 = 0",
    )
    .await;
    assert!(
        lost > 300,
        "{lost} rows to backfill: more than four chunks of a page"
    );

    let out = common::request_backfill(
        &dbs.source_url,
        &["--where", "account_id % 3 = 0", "--id", "restore-1"],
    );
    assert!(out.contains("backfill restore-1 requested"), "{out}");
    let writer = {
        let url = dbs.source_url.clone();
        tokio::spawn(async move {
            outbox_relay::cmd::load::run(&LoadArgs::count(&url, 300))
                .await
                .unwrap()
        })
    };
    let status = common::wait_for_exit(&mut relay, Duration::from_secs(120)).await;
    assert!(!status.success(), "the test hook aborts the process");
    assert!(relay.log_text().contains("after a backfill chunk"));
    let status_text = |expected: &'static str| {
        let (source_url, target_url, slot) =
            (dbs.source_url.clone(), dbs.target_url.clone(), slot.clone());
        async move {
            let (_, stdout, _) = common::run_binary(&[
                "status",
                "--source-url",
                &source_url,
                "--target-url",
                &target_url,
                "--no-kafka",
                "--direct-slot",
                &slot,
            ]);
            stdout.contains(expected).then_some(stdout)
        }
    };
    let running = status_text(
        "backfill restore-1 of outbox.transactions where account_id % 3 = 0: running, ",
    )
    .await;
    assert!(running.is_some(), "status after the kill shows it running");

    let mut relay = common::spawn_direct(&dbs, &slot, &args, &[]);
    writer.await.unwrap();
    dbs.wait_verified(Duration::from_secs(120)).await;
    common::wait_until(
        "the backfill to be done",
        Duration::from_secs(60),
        || async {
            status_text("backfill restore-1 of outbox.transactions where account_id % 3 = 0: done")
                .await
                .is_some()
        },
    )
    .await;
    dbs.wait_verified(Duration::from_secs(30)).await;
    assert!(relay.terminate().success());
    assert_eq!(dead_letter_count(&dbs).await, 0);
}

/// What `outbox-relay backfill` refuses before it writes anything: a filter that is
/// not one condition on the table (a missing column, one that would close the query
/// around it), a table that does not exist or is a view, a slot that does not exist.
#[tokio::test(flavor = "multi_thread")]
async fn backfill_requests_that_cannot_run_are_refused_with_the_reason() {
    let dbs = TestDbs::new().await;
    dbs.source()
        .await
        .batch_execute("CREATE VIEW outbox.recent AS SELECT * FROM outbox.transactions")
        .await
        .unwrap();
    for (extra, expected) in [
        (
            ["--where", "no_such_column = 1"],
            "column \"no_such_column\" does not exist",
        ),
        (
            ["--where", "true)); DELETE FROM main.balance; SELECT ((true"],
            "closes a parenthesis it did not open",
        ),
        (["--table", "outbox.nothing"], "does not exist"),
        (["--table", "outbox.recent"], "is not a plain table"),
        (
            ["--for-slot", "no_such_slot"],
            "has no pgoutput slot of that name",
        ),
        // No relay streams from this database: none would read the request.
        (
            ["--id", "lost"],
            "has no pgoutput slot: no relay streams from it",
        ),
    ] {
        let mut args = vec!["backfill", "--source-url", &dbs.source_url];
        args.extend_from_slice(&extra);
        let (code, stdout, stderr) = common::run_binary(&args);
        assert_eq!(code, 2, "{extra:?}: {stdout}{stderr}");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
}
