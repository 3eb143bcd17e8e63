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
//! The ids are matched on `--id-column` (default `id`), which the writer must keep
//! unique in the outbox (the seed's ids are the ledger's primary key). Without an index
//! on that column each delete scans the outbox, which stays small while cleanup runs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::error::{self, ErrorClass};
use crate::pg;
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
    /// The outbox column that identifies a row (unique in the outbox).
    #[arg(long, env = "OUTBOX_RELAY_ID_COLUMN", default_value = "id")]
    pub id_column: String,
    /// Most ids waiting to be deleted; beyond it the oldest are forgotten (their rows
    /// stay in the outbox).
    #[arg(long, default_value_t = 1_000_000)]
    pub cleanup_max_pending: usize,
}

/// Ids per DELETE statement.
const DELETE_CHUNK: usize = 5000;
/// How long a graceful shutdown waits for the last deletes.
const FINAL_DRAIN: Duration = Duration::from_secs(10);

/// Ids of rows committed in Kafka and not yet deleted, oldest first, bounded.
#[derive(Debug, Clone)]
pub struct PendingIds {
    inner: Arc<Mutex<Pending>>,
}

#[derive(Debug)]
struct Pending {
    ids: VecDeque<String>,
    max: usize,
    /// Ids forgotten because the queue was full (their rows stay).
    forgotten: u64,
}

impl PendingIds {
    pub fn new(max: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Pending {
                ids: VecDeque::new(),
                max: max.max(1),
                forgotten: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // The critical sections cannot panic halfway; a poisoned lock is still valid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ids whose records are now committed in Kafka.
    pub fn push(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let mut pending = self.lock();
        pending.ids.extend(ids);
        let excess = pending.ids.len().saturating_sub(pending.max);
        if excess > 0 {
            pending.ids.drain(..excess);
            pending.forgotten += excess as u64;
            tracing::warn!(
                forgotten = excess,
                total_forgotten = pending.forgotten,
                "outbox cleanup is behind: forgetting the oldest ids, their rows stay in the outbox"
            );
        }
    }

    /// Up to `n` of the oldest ids.
    fn take(&self, n: usize) -> Vec<String> {
        let mut pending = self.lock();
        let n = n.min(pending.ids.len());
        pending.ids.drain(..n).collect()
    }

    /// Ids whose delete failed transiently, to be tried again first.
    fn put_back(&self, ids: Vec<String>) {
        let mut pending = self.lock();
        for id in ids.into_iter().rev() {
            pending.ids.push_front(id);
        }
        let excess = pending.ids.len().saturating_sub(pending.max);
        if excess > 0 {
            pending.ids.drain(..excess);
            pending.forgotten += excess as u64;
        }
    }

    pub fn len(&self) -> usize {
        self.lock().ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Deletes pending ids from the outbox on a connection of its own.
pub struct OutboxCleaner {
    url: String,
    table: TableName,
    id_column: String,
    every: Duration,
    pending: PendingIds,
    /// The connection and its DELETE statement, re-established after a failure.
    client: Option<(Client, String)>,
    deleted: u64,
}

impl OutboxCleaner {
    pub fn new(url: String, table: TableName, args: &CleanupArgs, pending: PendingIds) -> Self {
        Self {
            url,
            table,
            id_column: args.id_column.clone(),
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

    /// Deletes what is pending, in chunks, until the queue is empty or a delete fails
    /// (a transient failure is retried on a later call; with a deadline, until then).
    async fn drain(&mut self, deadline: Option<Instant>) {
        loop {
            let ids = self.pending.take(DELETE_CHUNK);
            if ids.is_empty() {
                return;
            }
            match self.delete(&ids).await {
                Ok(n) => {
                    self.deleted += n;
                    tracing::debug!(ids = ids.len(), deleted = n, "outbox rows deleted");
                }
                Err(error) if error.class() == ErrorClass::Transient => {
                    tracing::warn!(error = %crate::error::error_chain(&error), "outbox cleanup failed, will retry");
                    self.client = None;
                    self.pending.put_back(ids);
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
                    return;
                }
            }
        }
    }

    async fn delete(&mut self, ids: &[String]) -> Result<u64, CleanupError> {
        if self.client.is_none() {
            self.client = Some(self.connect().await?);
        }
        let Some((client, statement)) = &self.client else {
            return Ok(0);
        };
        client
            .execute(statement.as_str(), &[&ids])
            .await
            .map_err(|source| CleanupError::Query {
                context: "deleting delivered outbox rows",
                source,
            })
    }

    async fn connect(&self) -> Result<(Client, String), CleanupError> {
        let client = pg::connect(&self.url)
            .await
            .map_err(|source| CleanupError::Query {
                context: "connecting to pg_start",
                source,
            })?;
        let column_type: Option<String> = client
            .query_opt(
                "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a
                 WHERE a.attrelid = to_regclass($1) AND a.attname = $2
                   AND a.attnum > 0 AND NOT a.attisdropped",
                &[&self.table.quoted(), &self.id_column],
            )
            .await
            .map_err(|source| CleanupError::Query {
                context: "reading the id column's type",
                source,
            })?
            .map(|r| r.get(0));
        let Some(column_type) = column_type else {
            return Err(CleanupError::NoIdColumn {
                table: self.table.to_string(),
                column: self.id_column.clone(),
            });
        };
        // The ids travel as text and are cast to the column's own type, so that an
        // index on the column is used when there is one.
        let statement = format!(
            "DELETE FROM {table} AS t USING unnest($1::text[]) AS d(id) \
             WHERE t.{column} = d.id::{column_type}",
            table = self.table.quoted(),
            column = quote_ident(&self.id_column),
        );
        Ok((client, statement))
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
    #[error("--id-column {column} is not a column of {table}")]
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

    fn ids(range: std::ops::Range<u32>) -> Vec<String> {
        range.map(|i| i.to_string()).collect()
    }

    #[test]
    fn pending_ids_are_bounded_and_forget_the_oldest() {
        let pending = PendingIds::new(5);
        pending.push(ids(0..3));
        pending.push(ids(3..8));
        assert_eq!(pending.len(), 5);
        assert_eq!(pending.take(2), ids(3..5));
        pending.put_back(vec!["3".into(), "4".into()]);
        assert_eq!(pending.take(10), ids(3..8));
        assert!(pending.is_empty());
    }
}
