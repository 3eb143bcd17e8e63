//! `outbox-relay load`: writes seed-shaped business transactions into pg_start.
//!
//! Each source transaction is ONE statement (so one database transaction and one round
//! trip): insert into `main.transactions`, the same row into `outbox.transactions`, and
//! add the amount to the account's `main.balance`.
//!
//! With `--rows-per-transaction R` (R > 1) each source transaction inserts R rows instead,
//! still in one statement: ids `base..base+R`, accounts taken in turn, amounts of
//! alternating sign, and each touched account's balance moved by its rows' sum. Such a
//! transaction, larger than the relay's `--batch-size`, is what the relay streams into
//! one open destination transaction (the chaos runner writes some beside the small ones).
//!
//! Invariant: a transaction is counted at most once, through any outage of pg_start.
//! The id is chosen by the client before the first attempt and kept for every retry; a
//! retry that hits the primary key means an earlier attempt committed (its reply was
//! lost), so it is counted as committed and not written again. The source of truth is
//! what pg_start holds, never the generator's counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use thiserror::Error;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use crate::config::SourceArgs;
use crate::error::{self, ErrorClass};
use crate::pg;
use crate::retry::Backoff;

/// Inserts one transaction: ledger row, outbox row, balance upsert.
const INSERT_TXN: &str = "\
WITH t AS (
    INSERT INTO main.transactions (id, account_id, amount, created_at)
    VALUES ($1, $2, $3::int8, $4::text::timestamp)
    RETURNING id, account_id, amount, created_at
), o AS (
    INSERT INTO outbox.transactions (id, account_id, amount, created_at)
    SELECT id, account_id, amount, created_at FROM t
)
INSERT INTO main.balance AS b (account_id, current_balance, updated_at)
SELECT account_id, amount, created_at FROM t
ON CONFLICT (account_id) DO UPDATE
    SET current_balance = b.current_balance + EXCLUDED.current_balance,
        updated_at = EXCLUDED.updated_at";

/// Inserts one transaction of `$6` rows: ids `$1..$1+$6`, accounts from `$2` on in
/// turn (modulo `$5`), amounts `$3` and `-$3` alternately, one balance upsert per account.
const INSERT_BULK: &str = "\
WITH t AS (
    INSERT INTO main.transactions (id, account_id, amount, created_at)
    SELECT $1::int8 + g, 1 + ($2::int8 - 1 + g) % $5::int8,
           CASE WHEN g % 2 = 0 THEN $3::int8 ELSE -$3::int8 END, $4::text::timestamp
    FROM generate_series(0::int8, $6::int8 - 1) AS g
    RETURNING id, account_id, amount, created_at
), o AS (
    INSERT INTO outbox.transactions (id, account_id, amount, created_at)
    SELECT id, account_id, amount, created_at FROM t
)
INSERT INTO main.balance AS b (account_id, current_balance, updated_at)
SELECT account_id, sum(amount), max(created_at) FROM t GROUP BY account_id
ON CONFLICT (account_id) DO UPDATE
    SET current_balance = b.current_balance + EXCLUDED.current_balance,
        updated_at = EXCLUDED.updated_at";

/// Options of `outbox-relay load`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Transactions per second over all workers; 0 writes as fast as pg_start allows.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Stop after this many transactions (default 1000 when no --duration is given).
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Concurrent connections writing transactions.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Accounts are numbered 1..=ACCOUNTS.
    #[arg(long, default_value_t = 10)]
    pub accounts: i64,
    /// Rows each source transaction inserts (ids, accounts and balances as one
    /// transaction of that many rows); above the relay's `--batch-size` it is a large
    /// source transaction.
    #[arg(long, default_value_t = 1)]
    pub rows_per_transaction: u32,
    /// Give up on a single transaction after retrying it this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub give_up_after: f64,
    /// Seconds between progress lines on stderr (0 for none).
    #[arg(long, default_value_t = 1.0)]
    pub progress_every: f64,
}

impl LoadArgs {
    /// Options for `count` transactions against `source_url`, as fast as possible.
    pub fn count(source_url: &str, count: u64) -> Self {
        Self {
            source: SourceArgs {
                source_url: source_url.to_string(),
            },
            rate: 0.0,
            count: Some(count),
            duration: None,
            concurrency: 4,
            accounts: 10,
            rows_per_transaction: 1,
            give_up_after: 600.0,
            progress_every: 0.0,
        }
    }
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("pg_start refused a transaction with a non-retryable error{}", what_to_do(.0))]
    Definite(#[source] tokio_postgres::Error),
}

/// What a person does about pg_start refusing `load`'s transactions, by SQLSTATE, as a
/// parenthesis to append; empty where the error says it all.
fn what_to_do(error: &tokio_postgres::Error) -> &'static str {
    use tokio_postgres::error::SqlState;
    match error.code() {
        Some(code)
            if [
                SqlState::UNDEFINED_TABLE,
                SqlState::UNDEFINED_COLUMN,
                SqlState::INVALID_SCHEMA_NAME,
            ]
            .contains(code) =>
        {
            " (load writes the seed's tables main.transactions, outbox.transactions and \
             main.balance: run `outbox-relay migrate` to create them)"
        }
        Some(code) if *code == SqlState::INSUFFICIENT_PRIVILEGE => {
            " (the role of --source-url needs INSERT on main.transactions and \
             outbox.transactions, and INSERT and UPDATE on main.balance)"
        }
        Some(code) if *code == SqlState::READ_ONLY_SQL_TRANSACTION => {
            " (--source-url names a read-only server, a standby: name the primary)"
        }
        _ => "",
    }
}

/// What a load run did, as the generator saw it.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct LoadSummary {
    /// Transactions known to be committed (including `found_committed`).
    pub committed: u64,
    /// Of those, transactions whose reply was lost and which a retry found committed.
    pub found_committed: u64,
    /// Attempts repeated after a transient error.
    pub retried: u64,
    /// Transactions abandoned after `--give-up-after` seconds; their fate is unknown
    /// to the generator (pg_start knows).
    pub failed: u64,
    pub elapsed_secs: f64,
}

impl LoadSummary {
    /// Adds the counts of `other`, a run beside or after this one; the elapsed time is
    /// the longer of the two.
    pub fn absorb(&mut self, other: &LoadSummary) {
        self.committed += other.committed;
        self.found_committed += other.found_committed;
        self.retried += other.retried;
        self.failed += other.failed;
        self.elapsed_secs = self.elapsed_secs.max(other.elapsed_secs);
    }
}

/// One seed-shaped source transaction: one row, or `rows` rows from `id` on.
#[derive(Debug, Clone)]
pub struct SourceTxn {
    pub id: i64,
    pub account_id: i64,
    pub amount: i64,
    pub created_at: String,
    pub rows: i64,
    /// The accounts a transaction of several rows takes in turn.
    pub accounts: i64,
}

impl SourceTxn {
    /// A random transaction with the seed's value ranges: a client-made signed 64-bit
    /// id, an account in 1..=accounts, an amount that is a multiple of 10 in 10..=100
    /// with a random sign, and the client's local time.
    /// With `rows` > 1 the ids `id..id+rows` are all in range.
    pub fn random(rng: &mut impl Rng, accounts: i64, rows: i64) -> Self {
        let sign = if rng.random_bool(0.5) { 1 } else { -1 };
        let rows = rows.max(1);
        Self {
            id: Self::first_id(rng, rows),
            rows,
            accounts: accounts.max(1),
            account_id: rng.random_range(1..=accounts.max(1)),
            amount: sign * 10 * rng.random_range(1..=10i64),
            created_at: chrono::Local::now()
                .naive_local()
                .format("%Y-%m-%d %H:%M:%S%.6f")
                .to_string(),
        }
    }

    /// A random first id such that the ids `id..id+rows` are all in range.
    fn first_id(rng: &mut impl Rng, rows: i64) -> i64 {
        rng.random_range(i64::MIN..=i64::MAX - (rows - 1))
    }

    /// The statement that writes this transaction, and how many of
    /// [`SourceTxn::params`] it takes.
    fn statement(&self) -> (&'static str, usize) {
        if self.rows > 1 {
            (INSERT_BULK, 6)
        } else {
            (INSERT_TXN, 4)
        }
    }
}

#[derive(Default)]
struct Counters {
    committed: AtomicU64,
    found_committed: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
}

/// Runs a load to completion.
pub async fn run(args: &LoadArgs) -> Result<LoadSummary, LoadError> {
    if args.concurrency == 0 {
        return Err(LoadError::InvalidOption(
            "--concurrency must be at least 1".into(),
        ));
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        return Err(LoadError::InvalidOption("--rate must be >= 0".into()));
    }
    if args.rows_per_transaction < 1 {
        return Err(LoadError::InvalidOption(
            "--rows-per-transaction must be at least 1".into(),
        ));
    }
    if args.accounts < 1 {
        return Err(LoadError::InvalidOption(
            "--accounts must be at least 1".into(),
        ));
    }
    let count = match (args.count, args.duration) {
        (None, None) => Some(1000),
        (count, _) => count,
    };
    let deadline = args
        .duration
        .map(|secs| Instant::now() + Duration::from_secs_f64(secs.max(0.0)));

    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));

    let progress = (args.progress_every > 0.0).then(|| {
        let counters = counters.clone();
        let every = Duration::from_secs_f64(args.progress_every);
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                let committed = counters.committed.load(Ordering::Relaxed);
                eprintln!(
                    "load: committed {committed} ({:.0}/s), retried {}, failed {}",
                    (committed - last) as f64 / every.as_secs_f64(),
                    counters.retried.load(Ordering::Relaxed),
                    counters.failed.load(Ordering::Relaxed),
                );
                last = committed;
            }
        })
    });

    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let worker = Worker {
            url: args.source.source_url.clone(),
            client: None,
            give_up_after: Duration::from_secs_f64(args.give_up_after.max(0.0)),
            counters: counters.clone(),
        };
        let (next, stop) = (next.clone(), stop.clone());
        let (rate, accounts) = (args.rate, args.accounts);
        let rows = i64::from(args.rows_per_transaction);
        workers.spawn(async move {
            let mut worker = worker;
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                // Transaction k is due at start + k / rate: one schedule shared by all
                // workers, so the rate holds whatever the concurrency. One due at or
                // after the deadline is not written, and the run still lasts until the
                // deadline: at a rate below one per --duration, back-to-back runs keep
                // the rate.
                let due = (rate > 0.0).then(|| start + Duration::from_secs_f64(k as f64 / rate));
                if stop.load(Ordering::Relaxed) || count.is_some_and(|c| k >= c) {
                    return Ok(());
                }
                if let Some(deadline) = deadline {
                    if due.unwrap_or_else(Instant::now) >= deadline {
                        tokio::time::sleep_until(deadline.into()).await;
                        return Ok(());
                    }
                }
                if let Some(due) = due {
                    tokio::time::sleep_until(due.into()).await;
                }
                let txn = SourceTxn::random(&mut rand::rng(), accounts, rows);
                if let Err(error) = worker.write(&txn).await {
                    stop.store(true, Ordering::Relaxed);
                    return Err(error);
                }
            }
        });
    }
    let mut result = Ok(());
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(error)) => result = Err(error),
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    }
    if let Some(progress) = progress {
        progress.abort();
    }
    result?;
    Ok(LoadSummary {
        committed: counters.committed.load(Ordering::Relaxed),
        found_committed: counters.found_committed.load(Ordering::Relaxed),
        retried: counters.retried.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        elapsed_secs: start.elapsed().as_secs_f64(),
    })
}

/// One writing connection, re-established after every transient failure.
struct Worker {
    url: String,
    client: Option<(Client, Statement)>,
    give_up_after: Duration,
    counters: Arc<Counters>,
}

impl Worker {
    /// Writes `txn` exactly once, retrying it with the same id through outages.
    async fn write(&mut self, txn: &SourceTxn) -> Result<(), LoadError> {
        let first = Instant::now();
        let mut backoff = Backoff::reconnect();
        let mut attempted = false;
        let mut txn = txn.clone();
        loop {
            match self.attempt(&txn).await {
                Ok(()) => {
                    self.counters.committed.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(error) if error.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    if attempted {
                        // An earlier attempt of this very transaction committed.
                        self.counters.committed.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .found_committed
                            .fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    // A first attempt collided with an older transaction's id (about
                    // one chance in 2^64 per pair): nothing was written, draw a new id.
                    txn.id = SourceTxn::first_id(&mut rand::rng(), txn.rows);
                }
                Err(error) if error::pg::classify(&error) == ErrorClass::Transient => {
                    tracing::debug!(%error, id = txn.id, "transient error, retrying the same transaction");
                    self.client = None;
                    attempted = true;
                    self.counters.retried.fetch_add(1, Ordering::Relaxed);
                    if first.elapsed() >= self.give_up_after {
                        self.counters.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            id = txn.id,
                            "giving up on a transaction; pg_start knows whether it committed"
                        );
                        return Ok(());
                    }
                    backoff.wait().await;
                }
                Err(error) => return Err(LoadError::Definite(error)),
            }
        }
    }

    async fn attempt(&mut self, txn: &SourceTxn) -> Result<(), tokio_postgres::Error> {
        let (client, statement) = match self.client.take() {
            Some(connected) => connected,
            None => {
                let client = pg::connect(&self.url).await?;
                let statement = client.prepare(txn.statement().0).await?;
                (client, statement)
            }
        };
        // INSERT_BULK's parameters begin with INSERT_TXN's.
        let params: [&(dyn ToSql + Sync); 6] = [
            &txn.id,
            &txn.account_id,
            &txn.amount,
            &txn.created_at,
            &txn.accounts,
            &txn.rows,
        ];
        let result = client
            .execute(&statement, &params[..txn.statement().1])
            .await;
        self.client = Some((client, statement));
        result?;
        Ok(())
    }
}
