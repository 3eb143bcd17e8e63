//! The apply module on its own, against a real pg_end: idempotence, conflicts, progress
//! that only moves forward, bisection to dead letters, binary values equal to what
//! PostgreSQL makes of the text, and concurrent appliers. The sink and direct mode both
//! call it this way.

mod common;

use std::collections::BTreeMap;

use common::sink::{dead_letter_count, dead_letters};
use common::{balances, TestDbs};
use outbox_relay::apply::{self, ApplyBatch, KafkaOffset, Origin, Progress, TxnRecord};
use outbox_relay::lsn::Lsn;
use rand::Rng;

fn txn(id: i64, account_id: i64, amount: &str) -> (TxnRecord, Origin) {
    (
        TxnRecord {
            id,
            account_id,
            amount: amount.to_string(),
            created_at: "2025-07-23 20:06:21.085330".to_string(),
        },
        Origin {
            topic: Some("t".into()),
            partition: Some(0),
            offset: Some(id),
            ..Origin::default()
        },
    )
}

fn kafka_progress(last_offset: i64) -> Progress {
    Progress::KafkaOffsets(vec![KafkaOffset {
        topic: "t".into(),
        partition: 0,
        last_offset,
    }])
}

#[tokio::test]
async fn apply_is_idempotent_reports_conflicts_and_progress_only_moves_forward() {
    let dbs = TestDbs::new().await;
    let mut client = apply::Target::new(dbs.target().await);
    let batch = ApplyBatch {
        records: vec![
            txn(1, 1, "10"),
            txn(2, 1, "-2.50"),
            txn(3, 2, "7"),
            txn(1, 1, "10.0"),
        ],
        dead_letters: Vec::new(),
        progress: kafka_progress(10),
        ..ApplyBatch::default()
    };
    let first = apply::apply(&mut client, &batch).await.unwrap();
    assert_eq!(
        (first.inserted, first.duplicates, first.dead_letters),
        (3, 1, 0)
    );
    let second = apply::apply(&mut client, &batch).await.unwrap();
    assert_eq!(
        (second.inserted, second.duplicates, second.dead_letters),
        (0, 4, 0)
    );
    assert_eq!(
        balances(&client, true).await,
        BTreeMap::from([(1, "7.5".to_string()), (2, "7".to_string())])
    );

    // Same id, other content: a conflict, never an overwrite. Older progress: ignored.
    let conflict = ApplyBatch {
        records: vec![txn(3, 2, "8"), txn(4, 2, "1")],
        dead_letters: Vec::new(),
        progress: kafka_progress(5),
        ..ApplyBatch::default()
    };
    let outcome = apply::apply(&mut client, &conflict).await.unwrap();
    assert_eq!(
        (outcome.inserted, outcome.conflicts, outcome.dead_letters),
        (1, 1, 1)
    );
    assert_eq!(balances(&client, true).await[&2], "8");
    let stored = apply::read_kafka_offsets(&*client, &[("t".to_string(), 0), ("t".to_string(), 1)])
        .await
        .unwrap();
    assert_eq!(
        stored,
        std::collections::HashMap::from([(("t".to_string(), 0), 10)])
    );
    // Applying the conflict again does not write its dead letter twice.
    let again = apply::apply(&mut client, &conflict).await.unwrap();
    assert_eq!((again.dead_letters, again.dead_letters_written), (1, 0));
    assert_eq!(dead_letter_count(&dbs).await, 1);

    // The direct-mode form of progress.
    for (lsn, expected) in [(0x200, 0x200), (0x100, 0x200), (0x300, 0x300)] {
        let batch = ApplyBatch {
            records: Vec::new(),
            dead_letters: Vec::new(),
            progress: Progress::SourceLsn {
                slot: "s".into(),
                commit_lsn: Lsn(lsn),
                system_identifier: None,
                snapshot: None,
                backfills: None,
            },
            ..ApplyBatch::default()
        };
        apply::apply(&mut client, &batch).await.unwrap();
        assert_eq!(
            apply::read_source_lsn(&*client, "s").await.unwrap(),
            Some(Lsn(expected))
        );
    }
}

#[tokio::test]
async fn apply_bisects_to_dead_letter_a_record_postgres_refuses() {
    let dbs = TestDbs::new().await;
    let mut client = apply::Target::new(dbs.target().await);
    // Something the Rust checks cannot foresee: a constraint of pg_end's own.
    client
        .batch_execute("ALTER TABLE main.transactions ADD CONSTRAINT not_13 CHECK (amount <> 13)")
        .await
        .unwrap();
    let mut records: Vec<_> = (1..=100).map(|id| txn(id, id % 3, "1")).collect();
    records[41].0.amount = "13".into();
    records.push(txn(1000, 1, "not a number")); // caught before the SQL
    let batch = ApplyBatch {
        records,
        dead_letters: Vec::new(),
        progress: kafka_progress(1000),
        ..ApplyBatch::default()
    };
    let outcome = apply::apply(&mut client, &batch).await.unwrap();
    assert!(outcome.bisected);
    assert_eq!((outcome.inserted, outcome.dead_letters), (99, 2));
    let letters = dead_letters(&dbs).await;
    assert_eq!(letters[&42].0, "apply_failed");
    assert!(letters[&42].1.contains("not_13"), "{}", letters[&42].1);
    assert_eq!(letters[&1000].0, "invalid_value");
    let total: String = client
        .query_one("SELECT sum(current_balance)::text FROM main.balance", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, "99");
}

/// An amount as a client may write it: sign, digits on either side of the point
/// (leading and trailing zeros too), an exponent now and then.
fn random_amount(rng: &mut impl Rng) -> String {
    fn digits(rng: &mut impl Rng) -> String {
        (0..rng.random_range(0..24))
            .map(|_| match rng.random_range(0..4) {
                0 => '0',
                _ => char::from(b'0' + rng.random_range(0..10u8)),
            })
            .collect()
    }
    let sign = ["", "-", "+"][rng.random_range(0..3)];
    let (int, frac) = (digits(rng), digits(rng));
    let mut text = match (int.is_empty(), rng.random_bool(0.5) || frac.is_empty()) {
        (true, _) => format!("{sign}{}.{frac}", if frac.is_empty() { "0" } else { "" }),
        (false, true) if frac.is_empty() => format!("{sign}{int}"),
        (false, _) => format!("{sign}{int}.{frac}"),
    };
    if rng.random_bool(0.3) {
        let e = rng.random_range(-40..=40);
        text.push_str(&format!("{}{e}", ["e", "E"][rng.random_range(0..2)]));
    }
    text
}

/// A timestamp in the forms PostgreSQL and ISO 8601 write, with 0 to 9 fraction digits,
/// often a half-way seventh digit.
fn random_timestamp(rng: &mut impl Rng) -> String {
    let separator = [' ', 'T'][rng.random_range(0..2)];
    let mut text = format!(
        "{:04}-{:02}-{:02}{separator}{:02}:{:02}:{:02}",
        rng.random_range(1..=9999),
        rng.random_range(1..=12),
        rng.random_range(1..=28),
        rng.random_range(0..24),
        rng.random_range(0..60),
        rng.random_range(0..60),
    );
    let fraction: String = (0..rng.random_range(0..=9))
        .map(|i| match (i, rng.random_range(0..3)) {
            (6, 0) => '5',
            (_, 0) => '9',
            _ => char::from(b'0' + rng.random_range(0..10u8)),
        })
        .collect();
    if !fraction.is_empty() {
        text.push('.');
        text.push_str(&fraction);
    }
    text
}

/// The apply path sends amounts and timestamps in binary (`apply::binary`); what
/// pg_end stores must be what its own text input makes of the record's text, display
/// scale and rounding of a seventh fraction digit included, and so must the balances.
#[tokio::test]
async fn binary_values_are_what_postgres_makes_of_the_text() {
    let dbs = TestDbs::new().await;
    let mut client = apply::Target::new(dbs.target().await);
    let seed: u64 = rand::rng().random();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut records: Vec<(TxnRecord, Origin)> = (1..=4000)
        .map(|id| {
            let (mut record, origin) = txn(id, id % 13, &random_amount(&mut rng));
            record.created_at = random_timestamp(&mut rng);
            (record, origin)
        })
        .collect();
    let extremes = [
        ("9".repeat(1000), "9999-12-31 23:59:59.9999995"),
        (
            format!("0.{}1", "0".repeat(998)),
            "0001-01-01 00:00:00.0000005",
        ),
        ("1e1000".to_string(), "2000-01-01T00:00:00.0000015"),
        ("-1.5E-1000".to_string(), "1999-12-31 23:59:59.9999999"),
        ("-0.000e-1000".to_string(), "2016-12-31 23:59:59.123456789"),
        (".5".to_string(), "2024-02-29 12:00:00"),
        ("5.".to_string(), "2024-02-29T12:00:00."),
        ("1".to_string(), "2016-12-31 23:59:60"),
    ];
    for (i, (amount, created_at)) in extremes.iter().enumerate() {
        let (mut record, origin) = txn(10_000 + i as i64, 99, amount);
        record.created_at = created_at.to_string();
        records.push((record, origin));
    }
    let batch = ApplyBatch {
        records: records.clone(),
        dead_letters: Vec::new(),
        progress: Progress::None,
        ..ApplyBatch::default()
    };
    let outcome = apply::apply(&mut client, &batch).await.unwrap();
    // Refused by the checks: a point with no fraction digits after it, a leap second.
    assert_eq!(
        (outcome.inserted, outcome.dead_letters),
        (records.len() as u64 - 2, 2),
        "seed {seed}"
    );
    records.retain(|(r, _)| !r.created_at.ends_with('.') && !r.created_at.contains(":60"));

    let text = |f: fn(&TxnRecord) -> String| -> Vec<String> {
        records.iter().map(|(r, _)| f(r)).collect()
    };
    let ids: Vec<i64> = records.iter().map(|(r, _)| r.id).collect();
    let accounts: Vec<i64> = records.iter().map(|(r, _)| r.account_id).collect();
    let (amounts, times) = (text(|r| r.amount.clone()), text(|r| r.created_at.clone()));
    client
        .batch_execute(
            "CREATE TEMP TABLE expected (id int8, account_id int8, amount numeric, created_at timestamp)",
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO expected
             SELECT id, account_id, amount::numeric, created_at::timestamp
             FROM unnest($1::int8[], $2::int8[], $3::text[], $4::text[])
                 AS x(id, account_id, amount, created_at)",
            &[&ids, &accounts, &amounts, &times],
        )
        .await
        .unwrap();
    let differing = client
        .query(
            "SELECT e.id, e.amount::text, t.amount::text, e.created_at::text, t.created_at::text
             FROM expected e LEFT JOIN main.transactions t USING (id)
             WHERE t.id IS NULL OR t.amount::text <> e.amount::text
                OR t.created_at IS DISTINCT FROM e.created_at
             LIMIT 5",
            &[],
        )
        .await
        .unwrap();
    let shown: Vec<_> = differing
        .iter()
        .map(|r| {
            let id: i64 = r.get(0);
            let given = &records.iter().find(|(x, _)| x.id == id).unwrap().0;
            format!(
                "{given:?}: text gives {:?} {:?}, binary {:?} {:?}",
                r.get::<_, String>(1),
                r.get::<_, String>(3),
                r.get::<_, Option<String>>(2),
                r.get::<_, Option<String>>(4),
            )
        })
        .collect();
    assert!(shown.is_empty(), "seed {seed}: {shown:#?}");
    let balances_differ: i64 = client
        .query_one(
            "SELECT count(*) FROM main.balance b FULL JOIN (
                 SELECT account_id, sum(amount) AS s, max(created_at) AS m
                 FROM expected GROUP BY account_id) e USING (account_id)
             WHERE b.current_balance::text IS DISTINCT FROM e.s::text
                OR b.updated_at IS DISTINCT FROM e.m",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(balances_differ, 0, "seed {seed}");
}

/// Two appliers racing over overlapping batches (a rebalance, two sinks on one
/// partition for a moment): every id is inserted by exactly one of them and counted
/// in the balance once, whether an applier took the plain-insert path or fell back to
/// `ON CONFLICT` after a `unique_violation`.
#[tokio::test]
async fn concurrent_appliers_of_overlapping_batches_count_every_id_once() {
    let dbs = TestDbs::new().await;
    let mut first = apply::Target::new(dbs.target().await);
    let mut second = apply::Target::new(dbs.target().await);
    let batch = |ids: std::ops::Range<i64>| ApplyBatch {
        records: ids.map(|id| txn(id, id % 7, "1.5")).collect(),
        dead_letters: Vec::new(),
        progress: Progress::None,
        ..ApplyBatch::default()
    };
    let (mut inserted, mut duplicates) = (0, 0);
    for round in 0..20i64 {
        let base = round * 1000;
        // Overlap of 400 ids, in both orders of arrival.
        let (a, b) = (batch(base..base + 700), batch(base + 300..base + 1000));
        let (a, b) = tokio::join!(apply::apply(&mut first, &a), apply::apply(&mut second, &b));
        for outcome in [a.unwrap(), b.unwrap()] {
            assert_eq!(outcome.conflicts, 0);
            inserted += outcome.inserted;
            duplicates += outcome.duplicates;
        }
    }
    assert_eq!(inserted, 20_000, "each id inserted exactly once");
    assert_eq!(duplicates, 20 * 400, "the overlap is seen as duplicates");
    let expected: BTreeMap<i64, String> = (0..7)
        .map(|account| {
            let n = (0..20_000i64).filter(|id| id % 7 == account).count();
            (account, format!("{}", n as f64 * 1.5))
        })
        .collect();
    assert_eq!(balances(&first, true).await, expected);
}
