//! Outbox cleanup (`--cleanup`): deletes the outbox rows whose records are committed
//! in Kafka, so that the outbox table does not grow forever.
//!
//! ```text
//!  KafkaDestination::commit ── Ok ──▶ PendingIds (bounded) ──every --cleanup-every-ms──▶
//!      DELETE FROM <outbox> USING unnest($1) WHERE <id column> = …   (own pg_start connection)
//! ```
//!
//! # Invariant
//! A row is deleted only after the Kafka commit that holds its record returned `Ok`
//! (acks=all, min.insync.replicas=2): the ids of a batch join [`PendingIds`] after that
//! commit and never before. Deleting cannot change what is delivered:
//! - the publication publishes inserts only, so the deletes never reach Kafka;
//! - logical decoding reads the inserts from the WAL, not from the table, so a source
//!   transaction read again after a crash (between the Kafka commit and the slot
//!   confirmation) still carries its rows, and is skipped by the progress record;
//! - the initial snapshot reads the table only when the relay creates a NEW slot, and a
//!   row deleted here was delivered through the old one.
//!
//! A delete that fails, or that a crash loses, only leaves rows behind (harmless: the
//! next successful cleanup does not see them, they are removed by hand or by a later
//! `DELETE … WHERE created_at < …`). Memory is bounded: at most `--cleanup-max-pending`
//! ids wait; beyond that the oldest are forgotten (their rows stay) and counted in a
//! warning.
//!
//! The ids are matched on each route's event id column (`--id-column`, default `id`,
//! in the one-table case), which the writer must keep unique in the outbox (the seed's
//! ids are the ledger's primary key). Without an index on that column each delete
//! scans the outbox, which stays small while cleanup runs.
//!
//! The slot is not confirmed past a row before its delete has committed
//! ([`PendingIds::gate`]): rows that a kill left behind after their Kafka commit are
//! in transactions the slot sends again, which the pipeline skips as delivered and
//! hands here ([`crate::pipeline::Destination::delivered_row`]). One window remains:
//! the rows present when the slot was created come from its snapshot, not from the
//! slot, so a kill between the snapshot's Kafka commit and their delete leaves them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::error::{self, ErrorClass};
use crate::lsn::Lsn;
use crate::pg;
use crate::progress::ConfirmGate;
use crate::source::{quote_ident, TableName};

/// Options of the outbox cleanup.
#[derive(clap::Args, Debug, Clone)]
pub struct CleanupArgs {
    /// Delete outbox rows once their records are committed in Kafka. Off by default:
    /// deleting from the service's table must be asked for (another reader, such as a
    /// polling relay during a switchover, may still need the rows).
    #[arg(long, env = "OUTBOX_RELAY_CLEANUP")]
    pub cleanup: bool,
    /// How often the delivered rows are deleted, in milliseconds.
    #[arg(long, env = "OUTBOX_RELAY_CLEANUP_EVERY_MS", default_value_t = 1000)]
    pub cleanup_every_ms: u64,
    /// Most ids waiting to be deleted; beyond it the oldest are forgotten (their rows
    /// stay in the outbox).
    #[arg(long, default_value_t = 1_000_000)]
    pub cleanup_max_pending: usize,
}

/// Ids per DELETE statement (whole batches are deleted together up to it).
const DELETE_CHUNK: usize = 5000;
/// How long a graceful shutdown waits for the last deletes.
const FINAL_DRAIN: Duration = Duration::from_secs(10);

/// The ids of one committed batch (or of one transaction read again), in source
/// order: `(table, id)`, the table being the index among the routed tables.
#[derive(Debug)]
struct Entry {
    lsn: Lsn,
    ids: Vec<(usize, String)>,
}

/// Ids of rows committed in Kafka and not yet deleted, oldest first, bounded; and
/// the gate that holds the slot's confirmation below the first of them.
#[derive(Debug, Clone)]
pub struct PendingIds {
    inner: Arc<Mutex<Pending>>,
    gate: ConfirmGate,
}

#[derive(Debug)]
struct Pending {
    entries: VecDeque<Entry>,
    len: usize,
    max: usize,
    /// Every entry up to this LSN is deleted (or forgotten).
    deleted_through: Lsn,
    /// Ids forgotten because the queue was full (their rows stay).
    forgotten: u64,
}

impl Pending {
    /// The gate: below the first pending entry, or open when none is pending.
    fn gate(&self) -> Option<Lsn> {
        (!self.entries.is_empty()).then_some(self.deleted_through)
    }

    fn pop(&mut self) -> Option<Entry> {
        let entry = self.entries.pop_front()?;
        self.len -= entry.ids.len();
        self.deleted_through = self.deleted_through.max(entry.lsn);
        Some(entry)
    }
}

impl PendingIds {
    pub fn new(max: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Pending {
                entries: VecDeque::new(),
                len: 0,
                max: max.max(1),
                deleted_through: Lsn::ZERO,
                forgotten: 0,
            })),
            gate: ConfirmGate::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // The critical sections cannot panic halfway; a poisoned lock is still valid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The gate the pipeline reads before each confirmation of the slot.
    pub fn gate(&self) -> ConfirmGate {
        self.gate.clone()
    }

    /// Ids whose records are committed in Kafka, by the source transactions up to
    /// `lsn`. The gate closes below them before this returns.
    pub fn push(&self, lsn: Lsn, ids: Vec<(usize, String)>) {
        if ids.is_empty() {
            return;
        }
        let mut pending = self.lock();
        pending.len += ids.len();
        pending.entries.push_back(Entry { lsn, ids });
        let mut forgotten = 0;
        while pending.len > pending.max && pending.entries.len() > 1 {
            if let Some(entry) = pending.pop() {
                forgotten += entry.ids.len() as u64;
            }
        }
        if forgotten > 0 {
            pending.forgotten += forgotten;
            tracing::warn!(
                forgotten,
                total_forgotten = pending.forgotten,
                "outbox cleanup is behind: forgetting the oldest ids, their rows stay in the outbox"
            );
        }
        self.gate.set(pending.gate());
    }

    /// The oldest entries, up to [`DELETE_CHUNK`] ids (at least one entry), left in
    /// place until [`PendingIds::done`].
    fn peek(&self) -> (usize, Vec<(usize, String)>) {
        let pending = self.lock();
        let (mut entries, mut ids) = (0, Vec::new());
        for entry in &pending.entries {
            if entries > 0 && ids.len() + entry.ids.len() > DELETE_CHUNK {
                break;
            }
            ids.extend(entry.ids.iter().cloned());
            entries += 1;
        }
        (entries, ids)
    }

    /// The oldest `entries` are deleted: the gate opens past them.
    fn done(&self, entries: usize) {
        let mut pending = self.lock();
        for _ in 0..entries {
            pending.pop();
        }
        self.gate.set(pending.gate());
    }

    pub fn len(&self) -> usize {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Deletes pending ids from the outbox tables on a connection of its own.
pub struct OutboxCleaner {
    url: String,
    /// The routed tables (the index the ids carry) and their event id column
    /// (`None`: the one-column primary key).
    tables: Vec<(TableName, Option<String>)>,
    every: Duration,
    pending: PendingIds,
    /// The connection and each table's DELETE statement, re-established after a
    /// failure.
    client: Option<(Client, Vec<String>)>,
    deleted: u64,
}

impl OutboxCleaner {
    pub fn new(
        url: String,
        tables: Vec<(TableName, Option<String>)>,
        args: &CleanupArgs,
        pending: PendingIds,
    ) -> Self {
        Self {
            url,
            tables,
            every: Duration::from_millis(args.cleanup_every_ms.max(1)),
            pending,
            client: None,
            deleted: 0,
        }
    }

    /// Deletes every `--cleanup-every-ms` until `finish` turns true, then makes a last
    /// bounded attempt at what is pending (a graceful shutdown leaves an empty queue).
    pub async fn run(mut self, mut finish: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = finish.wait_for(|f| *f) => break,
            }
            self.drain(None).await;
        }
        let deadline = Instant::now() + FINAL_DRAIN;
        let _ = tokio::time::timeout(FINAL_DRAIN, self.drain(Some(deadline))).await;
        tracing::info!(
            deleted = self.deleted,
            left = self.pending.len(),
            "outbox cleanup stopped"
        );
    }

    /// Deletes what is pending, oldest first, until the queue is empty or a delete
    /// fails (a transient failure is retried on a later call; with a deadline, until
    /// then).
    async fn drain(&mut self, deadline: Option<Instant>) {
        loop {
            let (entries, ids) = self.pending.peek();
            if entries == 0 {
                return;
            }
            match self.delete(&ids).await {
                Ok(n) => {
                    self.deleted += n;
                    self.pending.done(entries);
                    tracing::debug!(ids = ids.len(), deleted = n, "outbox rows deleted");
                }
                Err(error) if error.class() == ErrorClass::Transient => {
                    tracing::warn!(error = %crate::error::error_chain(&error), "outbox cleanup failed, will retry");
                    self.client = None;
                    match deadline {
                        Some(d) if Instant::now() + Duration::from_millis(500) < d => {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        _ => return,
                    }
                }
                Err(error) => {
                    // Retrying cannot cure it: the rows stay, the relay goes on.
                    tracing::error!(error = %crate::error::error_chain(&error), ids = ids.len(),
                        "outbox cleanup failed; these rows stay in the outbox");
                    self.pending.done(entries);
                    return;
                }
            }
        }
    }

    /// Deletes `ids`, one statement per table, in one transaction.
    async fn delete(&mut self, ids: &[(usize, String)]) -> Result<u64, CleanupError> {
        if self.client.is_none() {
            self.client = Some(self.connect().await?);
        }
        let Some((client, statements)) = &mut self.client else {
            return Ok(0);
        };
        let mut by_table: Vec<Vec<&str>> = vec![Vec::new(); statements.len()];
        for (table, id) in ids {
            if let Some(list) = by_table.get_mut(*table) {
                list.push(id);
            }
        }
        let query = |source| CleanupError::Query {
            context: "deleting delivered outbox rows",
            source,
        };
        let txn = client.transaction().await.map_err(query)?;
        let mut deleted = 0;
        for (statement, list) in statements.iter().zip(&by_table) {
            if !list.is_empty() {
                deleted += txn
                    .execute(statement.as_str(), &[list])
                    .await
                    .map_err(query)?;
            }
        }
        txn.commit().await.map_err(query)?;
        Ok(deleted)
    }

    async fn connect(&self) -> Result<(Client, Vec<String>), CleanupError> {
        let client = pg::connect(&self.url)
            .await
            .map_err(|source| CleanupError::Query {
                context: "connecting to pg_start",
                source,
            })?;
        let mut statements = Vec::with_capacity(self.tables.len());
        for (table, id_column) in &self.tables {
            let found: Option<(String, String)> = client
                .query_opt(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
                     FROM pg_attribute a
                     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                       AND CASE WHEN $2::text IS NULL
                           THEN a.attnum = ANY (SELECT unnest(i.indkey) FROM pg_index i
                                                WHERE i.indrelid = a.attrelid AND i.indisprimary
                                                  AND i.indnatts = 1)
                           ELSE a.attname = $2::text END",
                    &[&table.quoted(), id_column],
                )
                .await
                .map_err(|source| CleanupError::Query {
                    context: "reading the id column's type",
                    source,
                })?
                .map(|r| (r.get(0), r.get(1)));
            let Some((column, column_type)) = found else {
                return Err(CleanupError::NoIdColumn {
                    table: table.to_string(),
                    column: id_column
                        .clone()
                        .unwrap_or_else(|| "(a one-column primary key)".into()),
                });
            };
            // The ids travel as text and are cast to the column's own type, so that an
            // index on the column is used when there is one.
            statements.push(format!(
                "DELETE FROM {table} AS t USING unnest($1::text[]) AS d(id) \
                 WHERE t.{column} = d.id::{column_type}",
                table = table.quoted(),
                column = quote_ident(&column),
            ));
        }
        Ok((client, statements))
    }
}

#[derive(Debug, thiserror::Error)]
enum CleanupError {
    #[error("{context}")]
    Query {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the event id column {column} is not a column of {table}")]
    NoIdColumn { table: String, column: String },
}

impl CleanupError {
    fn class(&self) -> ErrorClass {
        match self {
            CleanupError::Query { source, .. } => error::pg::classify(source),
            CleanupError::NoIdColumn { .. } => ErrorClass::Definite,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(range: std::ops::Range<u32>) -> Vec<(usize, String)> {
        range.map(|i| (0, i.to_string())).collect()
    }

    #[test]
    fn pending_ids_hold_the_gate_below_the_first_batch_not_deleted() {
        let pending = PendingIds::new(100);
        let gate = pending.gate();
        assert_eq!(gate.get(), Lsn(u64::MAX), "nothing pending: open");
        pending.push(Lsn(10), ids(0..3));
        pending.push(Lsn(20), ids(3..5));
        assert_eq!(gate.get(), Lsn::ZERO, "nothing deleted yet");
        let (entries, taken) = pending.peek();
        assert_eq!((entries, taken.len()), (2, 5));
        // A failed delete leaves everything in place.
        assert_eq!(pending.len(), 5);
        pending.done(1);
        assert_eq!(gate.get(), Lsn(10));
        pending.done(1);
        assert_eq!(gate.get(), Lsn(u64::MAX));
        assert!(pending.is_empty());
    }

    #[test]
    fn pending_ids_are_bounded_and_forget_the_oldest_batches() {
        let pending = PendingIds::new(5);
        pending.push(Lsn(10), ids(0..3));
        pending.push(Lsn(20), ids(3..8));
        assert_eq!(pending.len(), 5);
        // The forgotten batch's rows stay; the gate no longer waits for them.
        assert_eq!(pending.gate().get(), Lsn(10));
        assert_eq!(pending.peek().1, ids(3..8));
    }
}
