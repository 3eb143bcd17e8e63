//! `outbox-relay verify`: is pg_end an exact copy of what pg_start committed?
//!
//! It checks, and reports precisely when any fails:
//! - every id of pg_start's `main.transactions` is in pg_end with the same row, and
//!   pg_end has no id that pg_start lacks;
//! - each account's `main.balance` is equal on both sides;
//! - on each side, `main.balance` equals the sum of that side's `main.transactions`.
//!
//! It reads set-based: each side first hashes its rows into [`BUCKETS`] digests (count
//! and the sum of a 64-bit hash of each row) in one query; rows are fetched only for the
//! buckets whose digests differ. Equal databases of a million rows cost two aggregate
//! queries, not a million round trips.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;
use tokio_postgres::Client;

use crate::cmd::pairs::{PairArgs, PairError, PairReport};
use crate::config::{SourceArgs, TargetArgs};
use crate::pg;

/// Number of hash buckets; a power of two, as the bucket is `id & (BUCKETS - 1)`.
pub const BUCKETS: i32 = 1024;

/// How many ids of each kind of difference the report lists.
const SAMPLE: usize = 20;

const BUCKET_DIGESTS: &str = "\
SELECT (id & 1023)::int4, count(*)::int8,
       sum(hashtextextended(concat_ws(',', id, account_id, trim_scale(amount), created_at), 0))::text
FROM main.transactions GROUP BY 1";

const BUCKET_ROWS: &str = "\
SELECT id, account_id, trim_scale(amount)::text, created_at::text
FROM main.transactions WHERE (id & 1023)::int4 = ANY($1) ORDER BY id";

const BALANCES: &str = "SELECT account_id, trim_scale(current_balance)::text FROM main.balance";

const BALANCE_DRIFT: &str = "\
SELECT coalesce(b.account_id, t.account_id), trim_scale(b.current_balance)::text, trim_scale(t.total)::text
FROM main.balance b
FULL JOIN (SELECT account_id, sum(amount) AS total FROM main.transactions GROUP BY account_id) t
    ON t.account_id = b.account_id
WHERE b.current_balance IS DISTINCT FROM t.total
ORDER BY 1";

/// Options of `outbox-relay verify`.
#[derive(clap::Args, Debug, Clone)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Poll until the databases converge or this many seconds have passed.
    #[arg(long, default_value_t = 0.0)]
    pub wait: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub pairs: PairArgs,
}

#[derive(Debug, Error)]
pub enum VerifyError {
    #[error("checking the route -> inbox pairs failed")]
    Pairs(#[source] Box<PairError>),
    #[error("cannot read {which}")]
    Query {
        which: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{which} returned an unexpected value: {detail}")]
    Unexpected { which: &'static str, detail: String },
}

/// A row of `main.transactions`, with values in canonical text form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TxnRow {
    pub id: i64,
    pub account_id: i64,
    pub amount: String,
    pub created_at: String,
}

/// One id present on both sides with different values.
#[derive(Debug, Clone, Serialize)]
pub struct ChangedRow {
    pub source: TxnRow,
    pub target: TxnRow,
}

/// One account whose balance differs between the sides (`None`: no balance row).
#[derive(Debug, Clone, Serialize)]
pub struct BalanceDiff {
    pub account_id: i64,
    pub source: Option<String>,
    pub target: Option<String>,
}

/// One account whose balance is not the sum of its transactions on one side.
#[derive(Debug, Clone, Serialize)]
pub struct BalanceDrift {
    pub account_id: i64,
    pub balance: Option<String>,
    pub sum_of_transactions: Option<String>,
}

/// The outcome of one comparison.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub ok: bool,
    pub source_transactions: u64,
    pub target_transactions: u64,
    /// In pg_start, not in pg_end.
    pub missing_count: u64,
    pub missing_sample: Vec<i64>,
    /// In pg_end, not in pg_start.
    pub extra_count: u64,
    pub extra_sample: Vec<i64>,
    /// On both sides, with different values.
    pub changed_count: u64,
    pub changed_sample: Vec<ChangedRow>,
    pub balance_diffs: Vec<BalanceDiff>,
    pub source_drift: Vec<BalanceDrift>,
    pub target_drift: Vec<BalanceDrift>,
    /// Whether the seed's ledger was compared (always without inboxes; with them, when
    /// one is `profile = "ledger"`).
    pub ledger_checked: bool,
    /// The route -> inbox pairs (with `--inbox`).
    pub inboxes: Vec<PairReport>,
}

impl Report {
    fn finish(mut self) -> Self {
        self.ok = self.inboxes.iter().all(|i| i.ok(false))
            && self.missing_count == 0
            && self.extra_count == 0
            && self.changed_count == 0
            && self.balance_diffs.is_empty()
            && self.source_drift.is_empty()
            && self.target_drift.is_empty();
        self
    }

    /// The human-readable form.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        if !self.inboxes.is_empty() {
            let _ = writeln!(out, "verify: {}", if self.ok { "OK" } else { "FAILED" });
            for inbox in &self.inboxes {
                let _ = writeln!(out, "  {}", inbox.render("").replace('\n', "\n  "));
            }
            if !self.ledger_checked {
                return out.trim_end().to_string();
            }
            let _ = write!(out, "  ledger: ");
        }
        if self.ok {
            let _ = write!(
                out,
                "verify: OK: {} transactions on both sides, balances equal and equal to the sums",
                self.source_transactions
            );
            return out;
        }
        let _ = writeln!(
            out,
            "verify: FAILED: pg_start has {} transactions, pg_end {}",
            self.source_transactions, self.target_transactions
        );
        if self.missing_count > 0 {
            let _ = writeln!(
                out,
                "  missing in pg_end: {} (first ids: {:?})",
                self.missing_count, self.missing_sample
            );
        }
        if self.extra_count > 0 {
            let _ = writeln!(
                out,
                "  extra in pg_end (not in pg_start): {} (first ids: {:?})",
                self.extra_count, self.extra_sample
            );
        }
        if self.changed_count > 0 {
            let _ = writeln!(out, "  rows that differ: {}", self.changed_count);
            for c in &self.changed_sample {
                let _ = writeln!(
                    out,
                    "    id {}: pg_start (account {}, amount {}, {}) vs pg_end (account {}, amount {}, {})",
                    c.source.id,
                    c.source.account_id,
                    c.source.amount,
                    c.source.created_at,
                    c.target.account_id,
                    c.target.amount,
                    c.target.created_at
                );
            }
        }
        for d in &self.balance_diffs {
            let _ = writeln!(
                out,
                "  balance of account {} differs: pg_start {}, pg_end {}",
                d.account_id,
                d.source.as_deref().unwrap_or("(none)"),
                d.target.as_deref().unwrap_or("(none)")
            );
        }
        for (side, drift) in [
            ("pg_start", &self.source_drift),
            ("pg_end", &self.target_drift),
        ] {
            for d in drift {
                let _ = writeln!(
                    out,
                    "  {side}: balance of account {} is {} but its transactions sum to {}",
                    d.account_id,
                    d.balance.as_deref().unwrap_or("(none)"),
                    d.sum_of_transactions.as_deref().unwrap_or("(none)")
                );
            }
        }
        out.truncate(out.trim_end().len());
        out
    }
}

/// Compares once.
pub async fn compare(source: &Client, target: &Client) -> Result<Report, VerifyError> {
    let (source_buckets, target_buckets) = tokio::try_join!(
        bucket_digests("pg_start", source),
        bucket_digests("pg_end", target)
    )?;
    let mut report = Report {
        ledger_checked: true,
        source_transactions: source_buckets.values().map(|d| d.0).sum(),
        target_transactions: target_buckets.values().map(|d| d.0).sum(),
        ..Report::default()
    };

    let differing: Vec<i32> = (0..BUCKETS)
        .filter(|b| source_buckets.get(b) != target_buckets.get(b))
        .collect();
    if !differing.is_empty() {
        let (source_rows, target_rows) = tokio::try_join!(
            bucket_rows("pg_start", source, &differing),
            bucket_rows("pg_end", target, &differing)
        )?;
        diff_rows(&source_rows, &target_rows, &mut report);
    }

    let (source_balances, target_balances, source_drift, target_drift) = tokio::try_join!(
        balances("pg_start", source),
        balances("pg_end", target),
        drift("pg_start", source),
        drift("pg_end", target)
    )?;
    let accounts: std::collections::BTreeSet<i64> = source_balances
        .keys()
        .chain(target_balances.keys())
        .copied()
        .collect();
    for account_id in accounts {
        let (s, t) = (
            source_balances.get(&account_id),
            target_balances.get(&account_id),
        );
        if s != t {
            report.balance_diffs.push(BalanceDiff {
                account_id,
                source: s.cloned(),
                target: t.cloned(),
            });
        }
    }
    report.source_drift = source_drift;
    report.target_drift = target_drift;
    Ok(report.finish())
}

/// Every difference between two id-sorted row lists, in full (not sampled).
#[derive(Debug, Clone, Default)]
pub struct RowDiff {
    /// In pg_start, not in pg_end.
    pub missing: Vec<TxnRow>,
    /// In pg_end, not in pg_start.
    pub extra: Vec<TxnRow>,
    /// On both sides, with different values.
    pub changed: Vec<ChangedRow>,
}

/// Merges two id-sorted row lists (as [`bucket_rows`] returns them) into their
/// differences.
pub fn row_diff(source: &[TxnRow], target: &[TxnRow]) -> RowDiff {
    use std::cmp::Ordering;
    let mut diff = RowDiff::default();
    let (mut s, mut t) = (source.iter().peekable(), target.iter().peekable());
    loop {
        let order = match (s.peek(), t.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(a), Some(b)) => a.id.cmp(&b.id),
        };
        match order {
            Ordering::Less => diff.missing.extend(s.next().cloned()),
            Ordering::Greater => diff.extra.extend(t.next().cloned()),
            Ordering::Equal => {
                if let (Some(a), Some(b)) = (s.next(), t.next()) {
                    if a != b {
                        diff.changed.push(ChangedRow {
                            source: a.clone(),
                            target: b.clone(),
                        });
                    }
                }
            }
        }
    }
    diff
}

/// Merges two id-sorted row lists into the report's missing/extra/changed entries.
fn diff_rows(source: &[TxnRow], target: &[TxnRow], report: &mut Report) {
    let diff = row_diff(source, target);
    report.missing_count += diff.missing.len() as u64;
    report.extra_count += diff.extra.len() as u64;
    report.changed_count += diff.changed.len() as u64;
    let room = |sample_len: usize| SAMPLE.saturating_sub(sample_len);
    let take = room(report.missing_sample.len());
    report
        .missing_sample
        .extend(diff.missing.iter().take(take).map(|r| r.id));
    let take = room(report.extra_sample.len());
    report
        .extra_sample
        .extend(diff.extra.iter().take(take).map(|r| r.id));
    let take = room(report.changed_sample.len());
    report
        .changed_sample
        .extend(diff.changed.into_iter().take(take));
}

/// The hash buckets (`id & (BUCKETS - 1)`) whose rows differ between the sides: one
/// aggregate query per side, no rows fetched. Equal sides give an empty list.
pub async fn differing_buckets(source: &Client, target: &Client) -> Result<Vec<i32>, VerifyError> {
    let (source_buckets, target_buckets) = tokio::try_join!(
        bucket_digests("pg_start", source),
        bucket_digests("pg_end", target)
    )?;
    Ok((0..BUCKETS)
        .filter(|b| source_buckets.get(b) != target_buckets.get(b))
        .collect())
}

async fn bucket_digests(
    which: &'static str,
    client: &Client,
) -> Result<BTreeMap<i32, (u64, String)>, VerifyError> {
    let rows = client
        .query(BUCKET_DIGESTS, &[])
        .await
        .map_err(|source| VerifyError::Query { which, source })?;
    rows.iter()
        .map(|row| {
            let count: i64 = row
                .try_get(1)
                .map_err(|source| VerifyError::Query { which, source })?;
            let count = u64::try_from(count).map_err(|_| VerifyError::Unexpected {
                which,
                detail: format!("negative count {count}"),
            })?;
            Ok((
                row.try_get(0)
                    .map_err(|source| VerifyError::Query { which, source })?,
                (
                    count,
                    row.try_get(2)
                        .map_err(|source| VerifyError::Query { which, source })?,
                ),
            ))
        })
        .collect()
}

/// The rows of `buckets` on one side (`which` names it in errors), sorted by id, with
/// values in the canonical text form that [`row_diff`] compares.
pub async fn bucket_rows(
    which: &'static str,
    client: &Client,
    buckets: &[i32],
) -> Result<Vec<TxnRow>, VerifyError> {
    query_rows(which, client, BUCKET_ROWS, &[&buckets], |row| {
        Ok(TxnRow {
            id: row.try_get(0)?,
            account_id: row.try_get(1)?,
            amount: row.try_get(2)?,
            created_at: row.try_get(3)?,
        })
    })
    .await
}

async fn balances(
    which: &'static str,
    client: &Client,
) -> Result<BTreeMap<i64, String>, VerifyError> {
    query_rows(which, client, BALANCES, &[], |row| {
        Ok((row.try_get(0)?, row.try_get(1)?))
    })
    .await
}

async fn drift(which: &'static str, client: &Client) -> Result<Vec<BalanceDrift>, VerifyError> {
    query_rows(which, client, BALANCE_DRIFT, &[], |row| {
        Ok(BalanceDrift {
            account_id: row.try_get(0)?,
            balance: row.try_get(1)?,
            sum_of_transactions: row.try_get(2)?,
        })
    })
    .await
}

/// Runs `query` on one side (`which` names it in errors) and reads each row with
/// `read`; a failed query or read is the same error, [`VerifyError::Query`].
async fn query_rows<T, C: FromIterator<T>>(
    which: &'static str,
    client: &Client,
    query: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    read: impl Fn(&tokio_postgres::Row) -> Result<T, tokio_postgres::Error>,
) -> Result<C, VerifyError> {
    let rows = client
        .query(query, params)
        .await
        .map_err(|source| VerifyError::Query { which, source })?;
    rows.iter()
        .map(read)
        .collect::<Result<C, _>>()
        .map_err(|source| VerifyError::Query { which, source })
}

/// Connects to both sides and compares, polling up to `args.wait` seconds for the
/// databases to converge. Connection failures while waiting are retried.
pub async fn run(args: &VerifyArgs) -> Result<Report, VerifyError> {
    let deadline = Instant::now() + Duration::from_secs_f64(args.wait.max(0.0));
    loop {
        let attempt = async {
            let (source, target) = tokio::try_join!(
                pg::connect(&args.source.source_url),
                pg::connect(&args.target.target_url)
            )
            .map_err(|source| VerifyError::Query {
                which: "a database (connect)",
                source,
            })?;
            if !args.pairs.is_set() {
                return compare(&source, &target).await;
            }
            let inboxes =
                crate::cmd::pairs::check(&args.pairs, &source, &args.target.target_url, false)
                    .await
                    .map_err(|e| VerifyError::Pairs(Box::new(e)))?;
            let report = if args.pairs.has_ledger() {
                compare(&source, &target).await?
            } else {
                Report::default()
            };
            Ok(Report { inboxes, ..report }.finish())
        };
        let result = attempt.await;
        let done = Instant::now() >= deadline;
        match result {
            Ok(report) if report.ok || done => return Ok(report),
            Err(error) if done => return Err(error),
            Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, amount: &str) -> TxnRow {
        TxnRow {
            id,
            account_id: 1,
            amount: amount.into(),
            created_at: "2025-07-23 20:06:21.08533".into(),
        }
    }

    #[test]
    fn diff_rows_finds_each_kind() {
        let source = [row(1, "10"), row(2, "20"), row(4, "40")];
        let target = [row(2, "20"), row(3, "30"), row(4, "-40")];
        let mut report = Report::default();
        diff_rows(&source, &target, &mut report);
        assert_eq!(report.missing_sample, vec![1]);
        assert_eq!(report.extra_sample, vec![3]);
        assert_eq!(report.changed_count, 1);
        assert_eq!(report.changed_sample[0].source.id, 4);
        assert!(!report.finish().ok);
    }

    #[test]
    fn equal_rows_are_ok() {
        let rows = [row(-5, "10"), row(7, "-20")];
        let mut report = Report::default();
        diff_rows(&rows, &rows, &mut report);
        assert!(report.finish().ok);
    }
}
