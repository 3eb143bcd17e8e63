//! `outbox-relay reconcile`: the safety net for when the stream cannot be trusted to
//! hold everything (a slot was lost or invalidated, a sink was pointed at an empty
//! database): copies to pg_end every transaction of pg_start's `main.transactions`
//! that pg_end lacks.
//!
//! Invariant: reconcile only ever adds, and adds through the same idempotent
//! [`apply::apply`] as the sink and direct mode, so a missing transaction is counted in
//! pg_end's balances exactly once even if the pipeline delivers it at the same time, or
//! reconcile runs twice, or is killed in the middle. Rows that pg_end holds with other
//! values, rows that pg_end has and pg_start lacks, and balances that are not the sum
//! of their transactions are reported, never overwritten or deleted: they need a person.
//!
//! ```text
//!   pg_start ─┐  per side: 1024 bucket digests      ┌─ differing buckets, 32 at a time:
//!             ├─ (verify::differing_buckets) ───────┤    rows of both sides (verify::bucket_rows)
//!   pg_end  ──┘                                     │    row_diff ─► missing ─► apply, in batches
//!                                                   └─► extra / changed: counted and reported
//!   then verify::compare: the state reconcile leaves
//! ```
//!
//! Memory is bounded by one group of buckets (1/32 of the table) at a time, plus the
//! ids of the missing rows. It is safe to run while the relay runs: a row in flight is
//! either applied by reconcile (and is then a duplicate for the sink) or by the sink.
//! `--dry-run` reads the same and applies nothing.

use std::time::Duration;

use serde::Serialize;
use thiserror::Error;
use tokio_postgres::Client;

use crate::apply::driver::{self, Driver, Failure};
use crate::apply::{self, ApplyBatch, Origin, Progress, TxnRecord};
use crate::cmd::pairs::{PairArgs, PairError, PairReport};
use crate::cmd::verify::{self, ChangedRow, Report, TxnRow, VerifyError};
use crate::config::{SourceArgs, TargetArgs};
use crate::pg;
use crate::retry::Backoff;

/// Buckets whose rows are read together: 1/32 of the table per step.
const BUCKETS_PER_STEP: usize = 32;

/// How many ids of each kind the report lists.
const SAMPLE: usize = 20;

/// Attempts per batch when pg_end fails transiently.
const APPLY_ATTEMPTS: u32 = 8;

/// Per account: how many missing rows, and the sum they add to its balance.
const CREDITS: &str = "\
SELECT account_id, count(*)::int8, trim_scale(sum(amount))::text
FROM main.transactions WHERE id = ANY($1) GROUP BY account_id ORDER BY account_id";

/// Options of `outbox-relay reconcile`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Rows per pg_end transaction.
    #[arg(long, default_value_t = 5000)]
    pub batch_size: usize,
    /// Print what would be applied; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub pairs: PairArgs,
}

impl ReconcileArgs {
    pub fn new(source_url: &str, target_url: &str) -> Self {
        Self {
            source: SourceArgs {
                source_url: source_url.to_string(),
            },
            target: TargetArgs {
                target_url: target_url.to_string(),
            },
            batch_size: 5000,
            dry_run: false,
            json: false,
            pairs: PairArgs::default(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ReconcileError {
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("cannot connect to {which} ({url})")]
    Connect {
        which: &'static str,
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("comparing pg_start and pg_end failed")]
    Compare(#[from] VerifyError),
    #[error("reading the missing rows' amounts from pg_start failed")]
    Credits(#[source] tokio_postgres::Error),
    #[error("applying missing transactions to pg_end failed")]
    Apply(#[source] Failure),
    #[error("reconciling the route -> inbox pairs failed")]
    Pairs(#[source] Box<PairError>),
}

/// What the missing rows add to one account's balance.
#[derive(Debug, Clone, Serialize)]
pub struct Credit {
    pub account_id: i64,
    pub rows: i64,
    pub amount: String,
}

/// What reconcile found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconcileReport {
    pub dry_run: bool,
    /// Transactions pg_start has and pg_end lacked.
    pub missing: u64,
    pub missing_sample: Vec<i64>,
    /// Per account, what those transactions add (or, dry run, would add) to the balance.
    pub credits: Vec<Credit>,
    /// Rows inserted into pg_end (and counted in its balances). 0 on a dry run.
    pub inserted: u64,
    /// Missing rows that were there by the time they were applied (the relay won).
    pub duplicates: u64,
    /// Missing rows that were there with other values by then (dead-lettered).
    pub conflicts: u64,
    /// pg_end transactions committed.
    pub batches: u64,
    /// In pg_end, not in pg_start: reported, never deleted.
    pub extra: u64,
    pub extra_sample: Vec<i64>,
    /// On both sides with different values: reported, never overwritten.
    pub changed: u64,
    pub changed_sample: Vec<ChangedRow>,
    /// `verify` on the state reconcile leaves (on a dry run: the current state).
    pub verify: Report,
    /// The route -> inbox pairs (with `--inbox`): what each inbox lacked, and copied.
    pub inboxes: Vec<PairReport>,
}

impl ReconcileReport {
    /// Whether pg_end is an exact copy of pg_start afterwards (dry run: already).
    pub fn ok(&self) -> bool {
        let ledger =
            self.ledger_skipped() || (self.verify.ok && (!self.dry_run || self.missing == 0));
        ledger && self.inboxes.iter().all(|i| i.ok(!self.dry_run))
    }

    /// Inboxes were reconciled and the seed's ledger is not one of them.
    fn ledger_skipped(&self) -> bool {
        !self.inboxes.is_empty() && !self.verify.ledger_checked
    }

    /// The human-readable form.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let verb = if self.dry_run { "would add" } else { "added" };
        for inbox in &self.inboxes {
            let _ = writeln!(out, "reconcile: {}", inbox.render(verb));
        }
        if self.ledger_skipped() {
            return out.trim_end().to_string();
        }
        let verb = if self.dry_run { "would add" } else { "added" };
        if self.missing == 0 {
            let _ = writeln!(out, "reconcile: pg_end lacks no transaction of pg_start");
        } else if self.dry_run {
            let _ = writeln!(
                out,
                "reconcile --dry-run: pg_end lacks {} transactions of pg_start (first ids: {:?}); \
                 nothing was changed",
                self.missing, self.missing_sample
            );
        } else {
            let _ = writeln!(
                out,
                "reconcile: pg_end lacked {} transactions of pg_start (first ids: {:?}); inserted {} \
                 in {} batches ({} were there by then, {} conflicts dead-lettered)",
                self.missing,
                self.missing_sample,
                self.inserted,
                self.batches,
                self.duplicates,
                self.conflicts
            );
        }
        for c in &self.credits {
            let _ = writeln!(
                out,
                "  account {}: {verb} {} to the balance ({} transactions)",
                c.account_id, c.amount, c.rows
            );
        }
        if self.extra > 0 {
            let _ = writeln!(
                out,
                "  NOT repaired: {} transactions in pg_end that pg_start lacks (first ids: {:?}); \
                 reconcile never deletes",
                self.extra, self.extra_sample
            );
        }
        if self.changed > 0 {
            let _ = writeln!(
                out,
                "  NOT repaired: {} transactions differ between pg_start and pg_end; reconcile \
                 never overwrites:",
                self.changed
            );
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
        if !self.verify.target_drift.is_empty() {
            let _ = writeln!(
                out,
                "  NOT repaired: pg_end balances that are not the sum of pg_end's transactions \
                 (reconcile adds only the missing rows' amounts, so this drift predates it)"
            );
        }
        let _ = write!(
            out,
            "{}{}",
            if self.dry_run { "now: " } else { "after: " },
            self.verify.render()
        );
        out
    }
}

/// Compares, applies what pg_end lacks (unless `dry_run`), and verifies.
pub async fn run(args: &ReconcileArgs) -> Result<ReconcileReport, ReconcileError> {
    if args.batch_size == 0 {
        return Err(ReconcileError::InvalidOption(
            "--batch-size must be at least 1".into(),
        ));
    }
    let source = connect("pg_start", &args.source.source_url).await?;
    let mut inboxes = Vec::new();
    if args.pairs.is_set() {
        inboxes =
            crate::cmd::pairs::check(&args.pairs, &source, &args.target.target_url, !args.dry_run)
                .await
                .map_err(|e| ReconcileError::Pairs(Box::new(e)))?;
        if !args.pairs.has_ledger() {
            return Ok(ReconcileReport {
                dry_run: args.dry_run,
                inboxes,
                ..ReconcileReport::default()
            });
        }
    }
    // Reads (whole-table scans, unbounded) have a connection of their own; applies
    // retry a bounded number of times, reconnecting, each attempt bounded on both ends
    // (see `apply::driver`).
    let reader = connect("pg_end", &args.target.target_url).await?;
    let mut pg_end = Driver::new(args.target.target_url.clone())
        .with_backoff(Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(5),
        ))
        .with_attempts(APPLY_ATTEMPTS);
    let mut report = ReconcileReport {
        dry_run: args.dry_run,
        ..ReconcileReport::default()
    };
    let mut missing_ids: Vec<i64> = Vec::new();

    let buckets = verify::differing_buckets(&source, &reader).await?;
    tracing::info!(
        differing_buckets = buckets.len(),
        of = verify::BUCKETS,
        "compared pg_start and pg_end"
    );
    for step in buckets.chunks(BUCKETS_PER_STEP) {
        let (source_rows, target_rows) = tokio::try_join!(
            verify::bucket_rows("pg_start", &source, step),
            verify::bucket_rows("pg_end", &reader, step)
        )?;
        let diff = verify::row_diff(&source_rows, &target_rows);
        drop((source_rows, target_rows));
        report.extra += diff.extra.len() as u64;
        sample(&mut report.extra_sample, diff.extra.iter().map(|r| r.id));
        report.changed += diff.changed.len() as u64;
        let room = SAMPLE.saturating_sub(report.changed_sample.len());
        report
            .changed_sample
            .extend(diff.changed.into_iter().take(room));
        report.missing += diff.missing.len() as u64;
        sample(
            &mut report.missing_sample,
            diff.missing.iter().map(|r| r.id),
        );
        missing_ids.extend(diff.missing.iter().map(|r| r.id));
        if args.dry_run {
            continue;
        }
        for rows in diff.missing.chunks(args.batch_size) {
            let outcome = apply_rows(&mut pg_end, rows).await?;
            report.inserted += outcome.inserted;
            report.duplicates += outcome.duplicates;
            report.conflicts += outcome.conflicts;
            report.batches += 1;
        }
    }
    if !missing_ids.is_empty() {
        report.credits = credits(&source, &missing_ids).await?;
    }
    report.verify = verify::compare(&source, &reader).await?;
    report.inboxes = inboxes;
    tracing::info!(
        dry_run = args.dry_run,
        missing = report.missing,
        inserted = report.inserted,
        extra = report.extra,
        changed = report.changed,
        verified = report.verify.ok,
        "reconcile done"
    );
    Ok(report)
}

fn sample(into: &mut Vec<i64>, ids: impl Iterator<Item = i64>) {
    let room = SAMPLE.saturating_sub(into.len());
    into.extend(ids.take(room));
}

async fn connect(which: &'static str, url: &str) -> Result<Client, ReconcileError> {
    pg::connect(url)
        .await
        .map_err(|source| ReconcileError::Connect {
            which,
            url: pg::redact_url(url),
            source,
        })
}

/// The per-account sums of the missing rows, read from pg_start in one query.
async fn credits(source: &Client, ids: &[i64]) -> Result<Vec<Credit>, ReconcileError> {
    let rows = source
        .query(CREDITS, &[&ids])
        .await
        .map_err(ReconcileError::Credits)?;
    rows.iter()
        .map(|r| {
            Ok(Credit {
                account_id: r.try_get(0)?,
                rows: r.try_get(1)?,
                amount: r.try_get(2)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(ReconcileError::Credits)
}

/// Applies `rows` as one batch with no progress marker, retrying transient failures
/// (reconnecting) up to [`APPLY_ATTEMPTS`] attempts in all.
async fn apply_rows(
    pg_end: &mut Driver,
    rows: &[TxnRow],
) -> Result<apply::ApplyOutcome, ReconcileError> {
    let origin = Origin {
        headers: [("outbox-relay.origin", Some(&b"reconcile"[..]))]
            .into_iter()
            .collect(),
        ..Origin::default()
    };
    let batch = ApplyBatch {
        records: rows
            .iter()
            .map(|r| {
                (
                    TxnRecord {
                        id: r.id,
                        account_id: r.account_id,
                        amount: r.amount.clone(),
                        created_at: r.created_at.clone(),
                    },
                    origin.clone(),
                )
            })
            .collect(),
        progress: Progress::None,
        ..ApplyBatch::default()
    };
    pg_end
        .run(&mut Reconciling, &mut driver::Apply(&batch))
        .await
        .map_err(|ended| ReconcileError::Apply(ended.into()))
}

/// Reconcile's side of the driver: it never stops half-way and keeps no commit in
/// doubt (each batch is committed synchronously), so it only logs its retries.
struct Reconciling;

impl driver::Session for Reconciling {
    fn stopped(&self) -> bool {
        false
    }

    fn retrying(&mut self, failure: &str, attempt: u32) {
        tracing::warn!(
            error = %failure,
            attempt,
            "cannot apply a batch to pg_end; retrying"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_run_with_missing_rows_is_not_ok() {
        let mut report = ReconcileReport {
            dry_run: true,
            missing: 3,
            ..ReconcileReport::default()
        };
        report.verify.ok = true; // a dry run's verify sees the unrepaired state anyway
        assert!(!report.ok());
        report.dry_run = false;
        assert!(report.ok());
        assert!(report.render().contains("lacked 3"), "{}", report.render());
    }
}
