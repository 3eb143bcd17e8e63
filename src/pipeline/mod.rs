//! The replication pipeline shared by the connector (slot → Kafka) and direct mode
//! (slot → pg_end): sessions, the slot's lifecycle, decoding, batching and the
//! acknowledgement of the slot. What differs is the [`Destination`].
//!
//! ```text
//!  pg_start ──walsender──▶ pgwire-replication ──▶ pgoutput::decode ──▶ Destination batch
//!     ▲                                                                 │ commit(batch + progress)
//!     │ update_applied_lsn(confirmable)                                 │ in ONE Kafka or pg_end
//!     └──────────── ProgressTracker ◀── durable_through(ticket) ◀───────┘ transaction
//! ```
//!
//! # Invariants
//! 1. The slot's confirmed flush LSN is advanced only to what [`ProgressTracker`]
//!    allows: the commit end LSN of a source transaction that, with every earlier one,
//!    is durable in the destination (or, idle, a keepalive's WAL end).
//! 2. Each destination commit also stores the commit end LSN of its last source
//!    transaction, atomically with the rows ([`ProgressRecord`]: the Kafka progress
//!    topic, or pg_end's `outbox_relay.direct_progress`). Every (re)start reads it back
//!    and skips source transactions at or below it, so a kill between the destination
//!    commit and the slot confirmation re-reads those transactions and drops them.
//! 3. One source transaction is never split across two destination commits.
//! 4. Memory is bounded: a batch holds at most `--batch-size` rows and `--batch-bytes`
//!    of complete source transactions, and at most as much again of the open one. At
//!    most one batch is being committed while the next one is read; when the next one
//!    is full, nothing more is read until the first is durable, and
//!    pgwire-replication's bounded channel makes the walsender wait. A source
//!    transaction larger than a batch is streamed (see "Large source transactions").
//! 5. Transient failures are retried with capped backoff; only a definite error (a lost
//!    slot, a bad configuration) stops the pipeline. A producer fenced by another
//!    instance is transient: the session ends, and the slot decides who streams.
//! 6. A slot is created only when the destination has no streaming progress for it. A
//!    slot missing after use, or invalidated, is a definite error (see [`source`]).
//! 7. Commits complete in order, one at a time: a batch's commit starts only after the
//!    previous one has returned, so durability, progress records and slot
//!    confirmations follow the source's commit order. A session never ends with a
//!    commit running: it is awaited, and what it made durable is confirmed, first.
//! 8. A commit may return before its batch is durable (pg_end's asynchronous commit):
//!    it then names the destination log position that makes it so
//!    ([`Committed::flush_needed`]), and the batch is marked durable only once the
//!    destination reports its log flushed that far, oldest batch first. Such positions
//!    are only meaningful within one session: the destination ends the session rather
//!    than reconnect under commits it has not seen flushed.
//!
//! 9. The slot is never confirmed past the destination's durable progress record
//!    (`Session::recorded`): an idle session (a keepalive's or a heartbeat's position
//!    past the last transaction) first commits a progress record alone, at most every
//!    [`IDLE_RECORD_INTERVAL`]. See "Slot identity".
//! 10. One instance per slot is active (see "Standby").
//!
//! # Standby
//! The slot is the lock: PostgreSQL lets one session stream from it. A session that
//! finds it held stands by ([`Pipeline::stand_by`]): it does not read the destination's
//! progress (a Kafka destination fences there) and tells the destination to let go of
//! what would fence ([`Destination::stand_by`]); it polls the slot and takes it when it
//! is free. A slot that does not exist is created under a pg_start advisory lock, held
//! until its stream starts: between its creation and that start (the initial snapshot)
//! the slot is free, so a session takes a free slot only under the same lock, and
//! stands by while another holds it.
//!
//! The lock is held by a pg_start session, which outlives a frozen or cut-off holder as
//! long as its kernel answers: so it is a lease ([`leased`]). While it holds the lock, a
//! session pings it and sets its `idle_session_timeout` to pg_start's
//! `wal_sender_timeout`, so pg_start ends it, and the lock goes to a standby, after the
//! same silence that ends a silent instance's walsender and frees the slot. A creator
//! that comes back commits nothing more under it: pg_start ends the session no sooner
//! than a lease after the last ping it answered, and before each commit of the
//! snapshot the creator checks that this is still ahead ([`LeaseClock::check`]); then
//! its session ends, and it stands by. (A freeze between that check and the commit
//! leaves one chunk to a Kafka destination's fence, which the instance that took over
//! set, and to pg_end's event ids.) Without a `wal_sender_timeout` (0) there is no
//! lease, as there is no takeover from a silent active instance.
//!
//! # Slot identity
//! Every progress record carries pg_start's system identifier. With invariant 9, a slot
//! confirmed past the record's LSN was advanced, or dropped and created again, behind
//! the relay's back; a different system identifier means another server (a restore, a
//! failover to a server without the slot). Either way the slot starts after data the
//! relay never delivered, and the session stops with a definite error that says to run
//! `reconcile` ([`Pipeline::check_identity`]). Records without the identifier (written
//! by older versions, which confirmed keepalive positions freely) are not checked.
//!
//! # Overlap
//! A destination commit is a round trip to other servers (a Kafka transaction, a
//! durable pg_end commit), and decoding the next batch costs about as much CPU time.
//! [`Destination::commit`] therefore hands the batch over and returns a future that
//! owns it; the pipeline runs it as a task, goes on decoding into a fresh batch, and
//! takes its result (mark durable, confirm the slot) when it completes. Where commits
//! are asynchronous, a later commit reports the earlier ones flushed; with no batch
//! following, [`Destination::sync`] is asked to make them durable [`SYNC_DELAY`] after
//! the last commit.
//!
//! # When a batch is committed
//! When it is full; otherwise once `--linger-ms` has passed since its first
//! transaction, nothing is being committed, and the destination's
//! [`Destination::commit_interval`] has passed since the last commit started
//! (`Session::due`). The interval bounds the commit rate where a commit costs more
//! than its rows (a Kafka transaction); it is zero for the others.
//!
//! # Large source transactions
//! When the open source transaction alone grows past `--batch-size` rows or
//! `--batch-bytes`, the batch is *spilled* ([`Destination::spill`]): once the commit in
//! flight is settled, what the batch holds (complete transactions and the open one's
//! rows so far) goes into one destination transaction that stays open, and the batch
//! is empty again; the next part is read while that one is sent, and sent after it.
//! The rest of the source transaction follows the same way, and the
//! batch's commit completes that one destination transaction with the progress
//! record, so the source transaction stays atomic (invariant 3) with memory bounded by
//! a batch. Nothing spilled is durable before that commit: a session that ends first
//! rolls the open destination transaction back ([`Destination::abandon`]), and its
//! source transactions are read again from the slot (the slot was not confirmed past
//! them). While spilled, no other commit runs (invariant 7 holds).
//!
//! # Backfill
//! An on-demand backfill (`outbox-relay backfill`) is requested in the stream and
//! carried by every progress record from then on; its chunks join batches between
//! source transactions, at most one per batch, each moving its position in that
//! batch's record (see [`backfill`]). A batch of chunks alone stands at the last
//! record's LSN.
//!
//! # Reading
//! Events the replication worker has queued are taken without a `select!` each, and
//! under load the reader pauses briefly when the queue runs dry, so that the walsender
//! is not made to wake it for every message: see [`events`].

pub mod backfill;
mod events;
mod snapshot;
#[cfg(test)]
pub(crate) mod testing;

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_replication::{PgWireError, ReplicationClient, ReplicationEvent};
use thiserror::Error;
use tokio::sync::watch;

use crate::config::OutboxArgs;
use crate::error::{error_chain, ErrorClass};
use crate::lsn::Lsn;
use crate::metrics;
use crate::pg;
use crate::pgoutput::{self, LogicalMessage};
use crate::progress::ConfirmGate;
use crate::progress::{ProgressRecord, ProgressState, ProgressTracker, TxnTicket};
use crate::retry::{self, Backoff};
pub use crate::source::ColumnDef;
use crate::source::{self, SourceError, TableName};

/// Settings of the replication side, shared by `connector` and `direct`.
#[derive(clap::Args, Debug, Clone)]
pub struct StreamArgs {
    #[command(flatten)]
    pub outbox: OutboxArgs,
    /// Rows per destination commit (a source transaction is never split).
    #[arg(long, env = "OUTBOX_RELAY_BATCH_SIZE", default_value_t = 5000)]
    pub batch_size: usize,
    /// Bytes of row data per destination commit.
    #[arg(long, default_value_t = 4 << 20)]
    pub batch_bytes: usize,
    /// Rows per chunk of an on-demand backfill (`outbox-relay backfill`), about (at
    /// least a page's, at most `--batch-size`): a batch carries one chunk besides the
    /// stream.
    #[arg(long, default_value_t = 1000)]
    pub backfill_chunk_rows: usize,
    /// Longest time a row waits for its batch to fill, in milliseconds.
    #[arg(long, env = "OUTBOX_RELAY_LINGER_MS", default_value_t = 20)]
    pub linger_ms: u64,
    /// Fail instead of creating a missing slot.
    #[arg(long)]
    pub no_create_slot: bool,
    /// Fail instead of creating a missing publication.
    #[arg(long)]
    pub no_create_publication: bool,
    /// Emit a `pg_logical_emit_message` heartbeat this often (seconds; 0 = off) so
    /// that the slot advances on a database whose other tables are busy.
    #[arg(long, default_value_t = 0.0)]
    pub heartbeat_secs: f64,
    /// On PostgreSQL 17 or newer, create the slot without `FAILOVER` (by default it is
    /// created with it, so that a standby with `sync_replication_slots = on` keeps a
    /// copy that survives a promotion; `outbox-relay check` says what else that needs).
    #[arg(long)]
    pub no_failover_slot: bool,
}

#[derive(Debug, Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{0}")]
    Definite(String),
    /// Not a `#[source]`: the message holds the server's words already.
    #[error("replication stream: {error}{hint}", error = .0,
            hint = source::replication_refused(.0).unwrap_or_default())]
    Replication(PgWireError),
    /// A destination commit failed; `class` says whether to retry.
    #[error("{context}")]
    Destination {
        context: String,
        class: ErrorClass,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("undecodable pgoutput message at {lsn}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: pgoutput::DecodeError,
    },
    #[error("stopping")]
    Stopped,
}

impl PipelineError {
    pub fn class(&self) -> ErrorClass {
        match self {
            PipelineError::Source(e) => e.class(),
            PipelineError::Definite(_) | PipelineError::Decode { .. } => ErrorClass::Definite,
            PipelineError::Stopped => ErrorClass::Transient,
            PipelineError::Replication(e) => match e {
                PgWireError::Auth(_)
                | PgWireError::Tls(_)
                | PgWireError::MessageTooLarge { .. } => ErrorClass::Definite,
                e if source::replication_refused(e).is_some() => ErrorClass::Definite,
                _ => ErrorClass::Transient,
            },
            PipelineError::Destination { class, .. } => *class,
        }
    }
}

/// What the pipeline reads from the slot: the outbox tables (inserts) and the prefixes
/// of the transactional logical messages that are outboxes too. The destination is
/// told which one by its index in these lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outbox {
    pub tables: Vec<TableName>,
    pub prefixes: Vec<String>,
    /// Each table's event id column, where its route names one: the initial snapshot's
    /// order for a table without a primary key (see [`snapshot`]).
    pub ids: Vec<Option<String>>,
}

impl Outbox {
    /// One outbox table.
    pub fn table(table: TableName) -> Self {
        Self {
            tables: vec![table],
            prefixes: Vec::new(),
            ids: vec![None],
        }
    }

    /// What the pipeline reads for `routes`: their tables and message prefixes, each
    /// in route order (table `i` is the `i`-th table route, prefix `j` the `j`-th
    /// message route).
    pub fn of_routes(routes: &[crate::route::Route]) -> Self {
        let mut outbox = Self::default();
        for route in routes {
            match &route.source {
                crate::route::RouteSource::Table(t) => {
                    outbox.tables.push(t.clone());
                    outbox.ids.push(route.id.clone());
                }
                crate::route::RouteSource::Message(p) => outbox.prefixes.push(p.clone()),
            }
        }
        outbox
    }
}

/// What the source says about one transaction.
#[derive(Debug, Clone, Copy)]
pub struct TxnMeta {
    /// LSN of the commit record (`None` for the rows of the initial snapshot).
    pub commit_lsn: Lsn,
    pub xid: Option<u32>,
    /// Commit time, µs since 2000-01-01.
    pub commit_time_micros: Option<i64>,
}

/// Where the outbox rows go. The pipeline hands it whole source transactions, then
/// asks it to make its batch durable together with a progress record.
#[allow(async_fn_in_trait)]
pub trait Destination {
    /// The `stage` label of this destination's metrics.
    const STAGE: &'static str;
    /// Reads the progress stored with the destination's data for `slot`. Called only
    /// while this instance holds the slot (or its creation lock): a destination that
    /// fences earlier writers (Kafka's transactional ids) does so here, first.
    async fn read_progress(&mut self, slot: &str) -> Result<Option<ProgressRecord>, PipelineError>;
    /// Another instance holds the slot: let go of anything that would fence it.
    async fn stand_by(&mut self) {}
    /// Outbox table `table`'s columns, in the order rows list them (after every
    /// Relation message, and before the snapshot's rows).
    fn set_columns(&mut self, table: usize, columns: &[ColumnDef]) -> Result<(), PipelineError>;
    /// A source transaction starts.
    fn begin_txn(&mut self, meta: TxnMeta);
    /// A chunk of backfill `id` starts (see [`backfill`]): its rows come as a
    /// transaction of their own, which ends with `end_txn`.
    fn begin_backfill(&mut self, meta: TxnMeta, _id: &str) {
        self.begin_txn(meta);
    }
    /// One inserted row of outbox table `table` in the current transaction; `None` is
    /// NULL.
    fn row(&mut self, table: usize, values: &[Option<&[u8]>]);
    /// A logical message with prefix `prefix` in the current transaction (for a
    /// non-transactional one, the pipeline makes a transaction of it alone). Only
    /// called when [`Outbox::prefixes`] is not empty.
    fn message(&mut self, _prefix: usize, _content: &[u8], _transactional: bool) {}
    /// A row of a transaction read again that the destination already holds (it is
    /// skipped): the outbox cleanup deletes what it did not delete before a crash.
    fn delivered_row(&mut self, _table: usize, _values: &[Option<&[u8]>], _end_lsn: Lsn) {}
    /// A bound on what the slot may be confirmed to, besides durability (the outbox
    /// cleanup holds it until the rows are deleted).
    fn confirm_gate(&self) -> Option<ConfirmGate> {
        None
    }
    /// The current transaction is complete: its rows join the batch.
    fn end_txn(&mut self);
    /// The current transaction is abandoned (the session broke in its middle).
    fn discard_txn(&mut self);
    /// Rows and bytes in the batch.
    fn batch_size(&self) -> (usize, usize);
    /// The open source transaction has grown past a batch (see "Large source
    /// transactions"): hands everything in the batch to a destination transaction
    /// that stays open (begun by the first spill), leaving an empty batch, and returns
    /// the work that does so. The pipeline runs it while it reads the next part, and
    /// awaits it before the next `spill` or `commit` (so the parts go in order); it
    /// calls `spill` only with no commit in flight. The next `commit` completes that
    /// transaction. The rows of the open source transaction spilled so far are no
    /// longer the batch's: `discard_txn` does not take them back, `abandon` does.
    fn spill(&mut self) -> impl Future<Output = Result<(), PipelineError>> + Send + 'static;
    /// The session ends with a spilled destination transaction open: it is rolled back
    /// (or left for the next session to fence), never committed. Its source
    /// transactions are read again from the slot.
    async fn abandon(&mut self) {}
    /// The least time between the starts of two commits of batches that are not full:
    /// a bound on the commit rate where each commit costs more than its rows.
    fn commit_interval(&self) -> Duration {
        Duration::ZERO
    }
    /// A session starts: whatever an earlier one left in the batch is dropped (its
    /// transactions are read again from the slot).
    fn clear(&mut self);
    /// Hands the batch over, leaving an empty one, and returns the work that commits it
    /// and `progress`, atomically. The future owns what it needs, so the next batch is
    /// read while it runs; the pipeline awaits it before it calls `commit` (or `sync`)
    /// again or `read_progress`. It retries transient failures itself until a stop,
    /// except where a retry could hide the loss of an earlier commit that was not yet
    /// durable (then the session must start again from the destination's progress).
    fn commit(
        &mut self,
        slot: &str,
        progress: &ProgressRecord,
    ) -> impl Future<Output = Result<Committed, PipelineError>> + Send + 'static;
    /// Makes every commit so far durable and returns how far the destination is
    /// durable. Called only after a commit returned [`Committed::flush_needed`].
    fn sync(&mut self) -> impl Future<Output = Result<Lsn, PipelineError>> + Send + 'static {
        std::future::ready(Ok(Lsn::ZERO))
    }
}

/// What a completed destination commit says about its durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The destination's own log position (pg_end's WAL) that must be durable before
    /// the batch is: `None` when the batch was durable when the commit returned.
    pub flush_needed: Option<Lsn>,
    /// How far the destination's log was durable when the commit returned, as seen by
    /// the connection that made the commit.
    pub flushed: Lsn,
}

impl Committed {
    /// A commit that returned only once durable (a Kafka transaction, a synchronous
    /// pg_end commit).
    pub const DURABLE: Committed = Committed {
        flush_needed: None,
        flushed: Lsn::ZERO,
    };
}

/// How often a standby looks at the slot.
const STANDBY_POLL: Duration = Duration::from_millis(500);

/// The longest a connection to pg_start, or a query of its catalog, may take before
/// the session is ended as broken.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a standby waits for.
#[derive(Debug, Clone, Copy)]
enum Holder {
    /// The slot, held by the session with this pid.
    Slot(Option<i32>),
    /// The creation lock: another instance is creating the slot or delivering its
    /// initial snapshot.
    Creation,
}

/// Runs `work`, which holds the slot creation lock on `client`, under the lock's lease
/// (see "Standby"): `client`'s session ends after `lease` without a ping, so a frozen
/// holder loses the lock, and `work` ends with a transient error once this instance
/// learns it lost it (a ping fails, or pg_start does not answer one within `lease`).
async fn leased<T>(
    client: &Arc<tokio_postgres::Client>,
    lease: Option<Duration>,
    clock: &Arc<LeaseClock>,
    work: impl Future<Output = Result<T, PipelineError>>,
) -> Result<T, PipelineError> {
    let Some(lease) = lease else {
        return work.await;
    };
    let lost = move |detail: String| -> PipelineError {
        SourceError::Transient {
            context: format!(
                "lost the slot creation lock: {detail}; pg_start ends its session after \
                 {lease:?} (wal_sender_timeout) without a sign of this instance, and \
                 another instance may have taken over the slot's creation or snapshot"
            ),
            source: None,
        }
        .into()
    };
    let set = |value: String| async move {
        let statement = format!("SET idle_session_timeout = {value}");
        bounded(async {
            (client.batch_execute(&statement).await)
                .map_err(SourceError::query("setting the creation lock's lease"))
        })
        .await
    };
    let sent = Instant::now();
    set(lease.as_millis().max(1).to_string()).await?;
    clock.held_until(Some(sent + lease));
    // A task of its own: a long stretch of work without an await does not starve it.
    let pinger = Arc::clone(client);
    let pinged = Arc::clone(clock);
    let mut heartbeat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(lease / 4).await;
            let sent = Instant::now();
            match tokio::time::timeout(lease, pinger.simple_query("")).await {
                Ok(Ok(_)) => pinged.held_until(Some(sent + lease)),
                Ok(Err(error)) => return lost(format!("its session failed ({error})")),
                Err(_) => return lost(format!("pg_start did not answer within {lease:?}")),
            }
        }
    });
    tokio::pin!(work);
    let result = tokio::select! {
        result = &mut work => {
            heartbeat.abort();
            // The task's reference to the session is gone once it has ended, so a
            // caller that drops `client` releases the lock then.
            let _ = heartbeat.await;
            result
        }
        error = &mut heartbeat => Err(error.unwrap_or_else(|e| lost(format!("{e}")))),
    };
    clock.held_until(None);
    if result.is_ok() {
        set("DEFAULT".into()).await?;
    }
    result
}

/// Until when this instance surely holds the slot creation lock: pg_start ends the
/// lock's session no sooner than its lease after the last ping this instance sent and
/// saw answered. `None` outside a lease.
#[derive(Debug, Default)]
struct LeaseClock(std::sync::Mutex<Option<Instant>>);

impl LeaseClock {
    fn held_until(&self, until: Option<Instant>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = until;
    }

    /// An error if the lease may have run out: this instance was frozen or cut off for
    /// longer than it, so another may hold the lock, and what was to be committed under
    /// it is not.
    fn check(&self) -> Result<(), PipelineError> {
        let until = *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match until {
            Some(until) if Instant::now() >= until => Err(SourceError::Transient {
                context: "the slot creation lock's lease may have run out (no ping answered \
                          for longer than wal_sender_timeout: this instance was frozen or cut \
                          off), so another instance may be delivering the snapshot; not \
                          committing under it"
                    .into(),
                source: None,
            }
            .into()),
            _ => Ok(()),
        }
    }
}

/// A pg_start query within [`QUERY_TIMEOUT`].
async fn bounded<T, E: Into<PipelineError>>(
    query: impl Future<Output = Result<T, E>>,
) -> Result<T, PipelineError> {
    match tokio::time::timeout(QUERY_TIMEOUT, query).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(SourceError::Transient {
            context: format!("pg_start did not answer within {QUERY_TIMEOUT:?}"),
            source: None,
        }
        .into()),
    }
}

/// What a session that ended with `ended` reports once the commits it had started were
/// settled with `settled`: a definite error while settling (a fence) stops the relay,
/// whatever ended the session, which would otherwise be retried (and, for a fence, fence
/// the successor back). A transient one leaves `ended`: what was being committed is read
/// again from the slot.
fn session_outcome<T>(
    ended: Result<T, PipelineError>,
    settled: Result<(), PipelineError>,
) -> Result<T, PipelineError> {
    match settled {
        Err(error) if error.class() == ErrorClass::Definite => Err(error),
        Err(error) => {
            tracing::warn!(
                error = %error_chain(&error),
                "what was being committed when the session ended is not known to be \
                 durable; it is read again from the slot"
            );
            ended
        }
        Ok(()) => ended,
    }
}

/// Takes the session-level advisory lock under which `slot` is created (and an
/// unfinished one dropped) and taken: two instances starting together on a new slot do
/// not both commit a snapshot marker, and none takes the slot while its creator
/// delivers the snapshot. `false` if another session holds it.
async fn lock_creation(client: &tokio_postgres::Client, slot: &str) -> Result<bool, PipelineError> {
    let locked: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock(hashtext('outbox-relay slot creation'), hashtext($1))",
            &[&slot],
        )
        .await
        .map_err(|source| SourceError::Query {
            context: "taking the slot creation lock".into(),
            source,
        })?
        .get(0);
    Ok(locked)
}

/// The pipeline's state across replication sessions.
pub struct Pipeline<D: Destination> {
    source_url: String,
    slot: String,
    args: StreamArgs,
    outbox: Outbox,
    dest: D,
    /// Everything at or below this LSN is durable in the destination.
    durable_lsn: Lsn,
    /// pg_start's `wal_sender_timeout`: a session that hears nothing for this long is
    /// ended as broken (`None`: never).
    silence: Option<Duration>,
    /// pg_start's system identifier, stamped on every progress record.
    system_identifier: Option<String>,
    /// A slot is being created (see `Pipeline::session`).
    creating: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Until when the slot creation lock is surely held (see [`leased`]).
    lease: Arc<LeaseClock>,
    /// The on-demand backfills, as the batch being read leaves them.
    backfills: backfill::Backfills,
    /// Each outbox table's columns as the session's last Relation message gave them
    /// (a backfill chunk's may differ while the table is altered).
    stream_columns: Vec<Option<Vec<ColumnDef>>>,
    stop: watch::Receiver<bool>,
}

/// How a session ended without an error.
#[derive(Debug)]
enum SessionEnd {
    Stopped,
}

/// Where the read loop is in the stream.
struct Reading {
    /// The outbox tables' relation ids (and their index), once their Relation
    /// messages have been seen.
    relations: Vec<(u32, usize)>,
    /// Whether a transaction is open, and whether it is skipped (already durable).
    open: Option<bool>,
    /// The open transaction's commit LSN.
    commit_lsn: Lsn,
    /// The destination's batch size (rows, bytes) when the open transaction began, or
    /// when it was last spilled: what it holds beyond that is the open transaction's.
    txn_base: (usize, usize),
    /// `--linger-ms`.
    linger: Duration,
    /// The destination's least time between commits ([`Destination::commit_interval`]).
    interval: Duration,
    /// When the last event came from the replication session (at the latest).
    heard: Instant,
    /// An event was handled since `heard` was last set.
    fresh: bool,
    /// The backfill requests of the open transaction (see [`backfill`]).
    requests: Vec<Vec<u8>>,
}

/// What a wait with no event queued came to.
enum Waited {
    /// The next replication event (or the stream's end, or its error).
    Event(Result<Option<ReplicationEvent>, PgWireError>),
    /// A commit completed or a batch fell due, and was handled.
    Handled,
    /// A stop was asked for.
    Stop,
    /// Nothing came from pg_start for this long: the connection is taken for dead.
    Silence(Duration),
}

impl<D: Destination> Pipeline<D> {
    pub fn new(
        source_url: String,
        slot: String,
        args: StreamArgs,
        outbox: Outbox,
        dest: D,
        stop: watch::Receiver<bool>,
    ) -> Result<Self, PipelineError> {
        if outbox.tables.is_empty() && outbox.prefixes.is_empty() {
            return Err(PipelineError::Definite(
                "nothing to read: no outbox table and no message prefix".into(),
            ));
        }
        source::validate_identifier(&slot)
            .map_err(|e| PipelineError::Definite(format!("--slot: {e}")))?;
        if args.batch_size == 0 {
            return Err(PipelineError::Definite(
                "--batch-size must be at least 1".into(),
            ));
        }
        Ok(Self {
            source_url,
            slot,
            args,
            outbox,
            dest,
            durable_lsn: Lsn::ZERO,
            silence: None,
            system_identifier: None,
            creating: Default::default(),
            lease: Default::default(),
            backfills: Default::default(),
            stream_columns: Vec::new(),
            stop,
        })
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Before a commit made under the slot creation lock (the initial snapshot's): an
    /// error if its lease may have run out (see "Standby").
    fn check_lease(&self) -> Result<(), PipelineError> {
        self.lease.check()
    }

    /// Runs sessions until a stop or a definite error.
    pub async fn run(&mut self) -> Result<(), PipelineError> {
        let mut backoff = Backoff::reconnect();
        let mut stop = self.stop.clone();
        loop {
            if self.stopping() {
                return Ok(());
            }
            match self.session(&mut backoff).await {
                Ok(SessionEnd::Stopped) | Err(PipelineError::Stopped) => {
                    tracing::info!(slot = %self.slot, "stopped");
                    return Ok(());
                }
                Err(error) if error.class() == ErrorClass::Transient => {
                    metrics::health().set_ready(false);
                    ::metrics::counter!(metrics::RETRIES, "cause" => "session").increment(1);
                    tracing::warn!(error = %error_chain(&error), "session ended, reconnecting");
                    tokio::select! {
                        _ = backoff.wait() => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// One replication session: checks, the slot (standing by while another instance
    /// holds it), stream until an error or a stop.
    ///
    /// The slot is the lock that makes one instance active (see "Standby" in the
    /// module doc): the destination's progress is read, and a Kafka destination fences
    /// earlier instances, only once this session holds the slot, or, for a slot that
    /// does not exist yet, holds the advisory lock under which it is created.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<SessionEnd, PipelineError> {
        // Until it streams, a session holds nothing a stop must wait for (like a kill,
        // an abandoned set-up leaves nothing the next start does not handle), so a stop
        // is not held back by a server that does not answer. Except while it creates
        // the slot and delivers its initial snapshot: the slot stays ephemeral until its
        // snapshot is built, and a stop then would drop it; the creation is seen through,
        // and the snapshot stops once a chunk is durable (it resumes there), or, done,
        // the stream then stops.
        let mut stop = self.stop.clone();
        let creating = std::sync::Arc::clone(&self.creating);
        let (mut replication, client) = {
            let opened = self.open();
            tokio::pin!(opened);
            let mut stop_seen = false;
            loop {
                tokio::select! {
                    opened = &mut opened => break opened?,
                    _ = stop.wait_for(|s| *s), if !stop_seen => {
                        if !creating.load(std::sync::atomic::Ordering::SeqCst) {
                            return Err(PipelineError::Stopped);
                        }
                        stop_seen = true;
                    }
                }
            }
        };
        tracing::info!(slot = %self.slot, durable_lsn = %self.durable_lsn, "streaming");
        metrics::health().set_ready(true);
        backoff.reset();
        // Releases the creation lock, if this session took it.
        drop(client);
        let monitor = self.spawn_monitor();
        let result = self.stream(&mut replication).await;
        monitor.abort();
        // Dropping the client ends the session (stop()+join() can hang on some paths).
        drop(replication);
        result
    }

    /// A session's set-up: checks, then the slot held and streaming started, with the
    /// destination's progress read (returned with the pg_start connection, which holds
    /// the creation lock if it was taken).
    async fn open(
        &mut self,
    ) -> Result<(ReplicationClient, Arc<tokio_postgres::Client>), PipelineError> {
        let url = self.source_url.clone();
        // A refused password or a missing database is definite; a server that is
        // down or starting is transient (SourceError::Query classifies by SQLSTATE).
        // Every call to pg_start here is bounded ([`bounded`]): a server (or a proxy)
        // that accepts and never answers ends the attempt, which is retried.
        let client = bounded(async {
            match pg::connect(&url).await {
                Ok(client) => Ok(Arc::new(client)),
                Err(source) => {
                    let error = SourceError::Query {
                        context: format!("connecting to pg_start ({})", pg::redact_url(&url)),
                        source,
                    };
                    // Of several hosts, tokio-postgres reports the last one's error
                    // alone: ask each, so that the log says which refused and why
                    // (during a failover: one down, the other still a standby).
                    let several = pg::PgTarget::from_url(&url).is_ok_and(|t| t.host_count() > 1);
                    if several && error.class() == ErrorClass::Transient {
                        source::replication_target(&url).await?;
                    }
                    Err(error)
                }
            }
        })
        .await?;
        let info = bounded(source::check_source(
            &client,
            &self.outbox.tables,
            &self.args.outbox.publication,
            !self.args.no_create_publication,
        ))
        .await?;
        self.silence = bounded(source::wal_sender_timeout(&client)).await?;
        let database = source::database_of(&url).unwrap_or_default();
        let slot = self.slot.clone();
        // What the destination's progress says, once read (none for a new slot).
        self.backfills = Default::default();

        let mut replication = loop {
            match bounded(source::slot_state(&client, &slot)).await? {
                Some(state) if state.active_pid.is_some() => {
                    self.stand_by(&client, Holder::Slot(state.active_pid))
                        .await?;
                }
                Some(state) => {
                    source::check_slot(&slot, &state, &database)?;
                    // A slot is free between its creation and the start of its stream,
                    // while its creator delivers the initial snapshot: taking it then
                    // would fence the creator and start the snapshot over.
                    if !bounded(lock_creation(&client, &slot)).await? {
                        self.stand_by(&client, Holder::Creation).await?;
                        continue;
                    }
                    let start = state.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
                    let (silence, clock) = (self.silence, Arc::clone(&self.lease));
                    let resumed = leased(&client, silence, &clock, async {
                        match self.acquire(start).await? {
                            Some(replication) => self
                                .resume(replication, &client, &info, start)
                                .await
                                .map(Some),
                            None => Ok(None),
                        }
                    })
                    .await?;
                    match resumed {
                        Some(replication) => break replication,
                        // Another instance took it in between.
                        None => self.stand_by(&client, Holder::Slot(None)).await?,
                    }
                }
                None => {
                    if !bounded(lock_creation(&client, &slot)).await? {
                        self.stand_by(&client, Holder::Creation).await?;
                        continue;
                    }
                    let (silence, clock) = (self.silence, Arc::clone(&self.lease));
                    break leased(&client, silence, &clock, self.create_missing(&info)).await?;
                }
            }
        };
        replication
            .wait_started()
            .await
            .map_err(PipelineError::Replication)?;
        // `wait_started` says only that the session started. One that ended since (pg_start
        // crashed while the destination's progress was read) is not streaming: the next
        // attempt finds the slot free, or held by a successor, and stands by, rather than
        // commit as the active instance and meet the successor's fence.
        if !replication.is_running() {
            return Err(SourceError::Transient {
                context: "the replication session ended while the destination's progress \
                          was read"
                    .into(),
                source: None,
            }
            .into());
        }
        Ok((replication, client))
    }

    /// Creates the slot that does not exist (with the creation lock held), unless the
    /// destination's progress says this relay delivered from a slot of that name: then
    /// a new one would skip or repeat what it held.
    async fn create_missing(
        &mut self,
        info: &source::SourceInfo,
    ) -> Result<ReplicationClient, PipelineError> {
        let slot = self.slot.clone();
        let progress = self.dest.read_progress(&slot).await?;
        if let Some(record) = progress
            .as_ref()
            .filter(|r| r.state == ProgressState::Streaming)
        {
            return Err(PipelineError::Definite(format!(
                "slot {slot} is missing, but this relay has streamed from it (its destination \
                 holds up to LSN {}): recreating it would skip every transaction written since. \
                 Recover (docs/operations.md, \"Slot lost or invalidated\"): start with a new \
                 --slot (a new slot emits the outbox rows present when it is created), then \
                 run `outbox-relay reconcile` so pg_end holds everything pg_start has",
                record.lsn
            )));
        }
        if let Some(snapshot) = progress.as_ref().and_then(|r| r.snapshot.as_ref()) {
            return Err(PipelineError::Definite(format!(
                "slot {slot} is missing, but its initial snapshot had delivered {} rows \
                 (its stream, which was to bring the rows written since, is gone with \
                 it): a new slot here would deliver those rows again. Recover: start \
                 with a new --slot (its snapshot delivers every row present then, and \
                 inboxes count an event id once), then run `outbox-relay reconcile`",
                snapshot.rows
            )));
        }
        if self.args.no_create_slot {
            return Err(PipelineError::Definite(format!(
                "slot {slot} does not exist in pg_start; create it \
                 (SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')) \
                 or start without --no-create-slot"
            )));
        }
        self.create_slot(info).await
    }

    /// Starts streaming from the existing slot at `start`; `None` if another session
    /// holds it.
    async fn acquire(&mut self, start: Lsn) -> Result<Option<ReplicationClient>, PipelineError> {
        let target = source::replication_target(&self.source_url).await?;
        let config = source::replication_config(
            &target,
            &self.slot,
            &self.args.outbox.publication,
            start,
            self.silence,
        );
        let started = async {
            let mut replication = ReplicationClient::connect_gated(config).await?;
            let system = replication.identify_system().await?;
            replication.start().await?;
            replication.wait_started().await?;
            Ok::<_, PgWireError>((replication, system.system_id))
        };
        match tokio::time::timeout(QUERY_TIMEOUT + pg::CONNECT_TIMEOUT, started).await {
            Ok(Ok((replication, system_id))) => {
                self.system_identifier = Some(system_id);
                Ok(Some(replication))
            }
            Ok(Err(error)) if source::slot_in_use(&error) => Ok(None),
            Ok(Err(error)) if source::slot_invalidated(&error) => {
                Err(source::invalidated(&self.slot, &error.to_string()).into())
            }
            Ok(Err(error)) => Err(PipelineError::Replication(error)),
            Err(_) => Err(SourceError::Transient {
                context: "pg_start did not start the replication session in time".into(),
                source: None,
            }
            .into()),
        }
    }

    /// With the slot held: reads the destination's progress (a Kafka destination fences
    /// earlier instances first) and resumes after it, or, when the slot's initial
    /// snapshot never completed, drops the slot and creates it again.
    async fn resume(
        &mut self,
        replication: ReplicationClient,
        client: &tokio_postgres::Client,
        info: &source::SourceInfo,
        slot_confirmed: Lsn,
    ) -> Result<ReplicationClient, PipelineError> {
        let progress = self.dest.read_progress(&self.slot).await?;
        if let Some(record) = &progress {
            self.check_identity(record, slot_confirmed)?;
        }
        if progress.as_ref().map(|r| r.state) != Some(ProgressState::Snapshot) {
            self.durable_lsn = progress
                .as_ref()
                .and_then(ProgressRecord::lsn)
                .unwrap_or(Lsn::ZERO);
            self.backfills.list = progress.map(|r| r.backfills).unwrap_or_default();
            return Ok(replication);
        }
        // The relay created this slot and its initial snapshot did not complete.
        let slot = self.slot.clone();
        if !lock_creation(client, &slot).await? {
            return Err(SourceError::Transient {
                context: format!("another instance is creating slot {slot}"),
                source: None,
            }
            .into());
        }
        drop(replication);
        // The walsender releases the slot a moment after its connection closes.
        let released = Instant::now() + Duration::from_secs(10);
        while source::slot_holder(client, &slot).await?.is_some() && Instant::now() < released {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(progress) = progress.and_then(|r| r.snapshot) {
            // Some of it was delivered: the rest is, and the stream starts at the
            // slot's consistent point (see snapshot, "Resuming").
            self.creating
                .store(true, std::sync::atomic::Ordering::SeqCst);
            let resumed = snapshot::resume(self, info, progress).await;
            self.creating
                .store(false, std::sync::atomic::Ordering::SeqCst);
            let start = resumed?;
            self.durable_lsn = start;
            return match self.acquire(start).await? {
                Some(replication) => Ok(replication),
                None => Err(SourceError::Transient {
                    context: format!("slot {slot} was taken while its snapshot was resumed"),
                    source: None,
                }
                .into()),
            };
        }
        // Nothing of it was delivered (no chunk was committed), so a fresh slot and
        // snapshot lose and repeat nothing.
        tracing::warn!(%slot, "the slot's initial snapshot never delivered a row; recreating it");
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .map_err(|source| SourceError::Query {
                context: format!("dropping the unfinished slot {slot}"),
                source,
            })?;
        self.create_slot(info).await
    }

    /// Slot identity: the slot and the server must be the ones the destination's
    /// progress came from. A record stamped with a system identifier was written by a
    /// relay that never confirms the slot past the record's LSN (see "Slot identity" in
    /// the module doc), so a slot confirmed further was advanced, or dropped and
    /// created again, behind the relay's back: what lies between was never delivered.
    fn check_identity(
        &self,
        record: &ProgressRecord,
        slot_confirmed: Lsn,
    ) -> Result<(), PipelineError> {
        let (Some(stored), Some(lsn)) = (&record.system_identifier, record.lsn()) else {
            return Ok(());
        };
        if record.state != ProgressState::Streaming || lsn.is_zero() {
            return Ok(());
        }
        let slot = &self.slot;
        let recover = format!(
            "Recover (docs/operations.md, \"Slot lost or invalidated\"): drop slot {slot} \
             and start with a new --slot (a new slot emits the outbox rows present when it is \
             created), then run `outbox-relay reconcile` so that pg_end holds everything \
             pg_start has"
        );
        if self
            .system_identifier
            .as_deref()
            .is_some_and(|now| now != stored)
        {
            return Err(PipelineError::Definite(format!(
                "pg_start is not the server this relay's progress came from (system identifier \
                 {}, the progress was written against {stored}): slot {slot} is not the one the \
                 relay streamed from (a restore, or a failover to a server that did not have \
                 the slot). {recover}",
                self.system_identifier.as_deref().unwrap_or("?")
            )));
        }
        if slot_confirmed > lsn {
            return Err(PipelineError::Definite(format!(
                "slot {slot} is confirmed up to {slot_confirmed}, past what the destination \
                 holds ({lsn}): the slot was dropped and created again, or advanced, behind \
                 the relay's back, and the transactions in between were never delivered. \
                 {recover}"
            )));
        }
        Ok(())
    }

    /// Stands by while another instance holds the slot (or is creating it): this one
    /// neither takes the slot nor touches the destination (a Kafka destination drops
    /// its producers, so it fences no one), reports not ready, and shows in
    /// pg_stat_activity under [`source::standby_application_name`]. Returns once the
    /// slot (or the creation lock) is free, to try again.
    async fn stand_by(
        &mut self,
        client: &tokio_postgres::Client,
        holder: Holder,
    ) -> Result<(), PipelineError> {
        let slot = self.slot.clone();
        self.dest.stand_by().await;
        metrics::health().set_ready(false);
        ::metrics::gauge!(metrics::STANDBY, "stage" => D::STAGE).set(1.0);
        let query = |context: &'static str| {
            move |source| SourceError::Query {
                context: context.into(),
                source,
            }
        };
        client
            .batch_execute(&format!(
                "SELECT pg_advisory_unlock_all(); SET application_name = '{}'",
                source::standby_application_name(&slot)
            ))
            .await
            .map_err(query("marking this session as a standby"))?;
        match holder {
            Holder::Slot(Some(pid)) => tracing::info!(
                %slot,
                holder_pid = pid,
                "standing by: another instance streams from the slot; taking over when it is released"
            ),
            Holder::Slot(None) => tracing::info!(
                %slot,
                "standing by: another instance streams from the slot; taking over when it is released"
            ),
            Holder::Creation => tracing::info!(
                %slot,
                "standing by: another instance is creating the slot or delivering its initial snapshot"
            ),
        }
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return Err(PipelineError::Stopped),
                _ = tokio::time::sleep(STANDBY_POLL) => {}
            }
            let free = match holder {
                Holder::Slot(_) => bounded(source::slot_holder(client, &slot)).await?.is_none(),
                Holder::Creation => bounded(lock_creation(client, &slot)).await?,
            };
            if free {
                break;
            }
        }
        client
            .batch_execute("RESET application_name")
            .await
            .map_err(query("ending this session's standby"))?;
        ::metrics::gauge!(metrics::STANDBY, "stage" => D::STAGE).set(0.0);
        tracing::info!(%slot, "the slot is free: taking over");
        Ok(())
    }

    async fn create_slot(
        &mut self,
        info: &source::SourceInfo,
    ) -> Result<ReplicationClient, PipelineError> {
        // A stop waits for the slot's creation (it stays ephemeral until its snapshot is
        // built, and a stop then would drop it), and then for the chunk of its snapshot
        // being delivered (see `session`).
        self.creating
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let created = snapshot::create_slot_and_emit(self, info).await;
        self.creating
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let (replication, lsn) = created?;
        self.durable_lsn = lsn;
        Ok(replication)
    }

    /// Beside a stream, on a pg_start connection of its own: every [`LAG_EVERY`] the
    /// slot's lag as pg_start measures it (`pg_current_wal_lsn()` minus the slot's
    /// `confirmed_flush_lsn`, the figure `status` shows) into the slot-lag gauge, and
    /// the heartbeat message every `--heartbeat-secs` if asked. The walsender's
    /// keepalives cannot tell the lag: while it waits for a standby named in
    /// `synchronized_standby_slots`, its position is what it may send, and the gauge
    /// read 0 while the stream stalled.
    fn spawn_monitor(&self) -> tokio::task::JoinHandle<()> {
        let url = self.source_url.clone();
        let slot = self.slot.clone();
        let heartbeat = (self.args.heartbeat_secs > 0.0)
            .then(|| Duration::from_secs_f64(self.args.heartbeat_secs));
        let every = heartbeat.map_or(LAG_EVERY, |h| h.min(LAG_EVERY));
        let stage = D::STAGE;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut client = None;
            let (mut last_lag, mut last_heartbeat) = (None::<Instant>, None::<Instant>);
            loop {
                tick.tick().await;
                if client.is_none() {
                    client = pg::connect(&url).await.ok();
                }
                let Some(c) = &client else { continue };
                let due = |last: Option<Instant>, every: Duration| {
                    last.is_none_or(|at| at.elapsed() + Duration::from_millis(50) >= every)
                };
                let mut failed = false;
                if heartbeat.is_some_and(|h| due(last_heartbeat, h)) {
                    last_heartbeat = Some(Instant::now());
                    // Non-transactional: it reaches the slot at once and touches no table.
                    failed |= c
                        .execute(
                            "SELECT pg_logical_emit_message(false, 'outbox-relay-heartbeat', '')",
                            &[],
                        )
                        .await
                        .is_err();
                }
                if due(last_lag, LAG_EVERY) {
                    last_lag = Some(Instant::now());
                    match c
                        .query_opt(
                            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8
                             FROM pg_replication_slots WHERE slot_name = $1",
                            &[&slot],
                        )
                        .await
                    {
                        Ok(Some(row)) => {
                            if let Ok(Some(lag)) = row.try_get::<_, Option<i64>>(0) {
                                ::metrics::gauge!(metrics::SLOT_LAG_BYTES, "stage" => stage)
                                    .set(lag.max(0) as f64);
                            }
                        }
                        Ok(None) => {}
                        Err(_) => failed = true,
                    }
                }
                if failed {
                    client = None;
                }
            }
        })
    }

    /// Streams from the slot into the destination until an error or a stop; never
    /// returns with a commit running.
    async fn stream(
        &mut self,
        replication: &mut ReplicationClient,
    ) -> Result<SessionEnd, PipelineError> {
        self.dest.clear();
        let mut s = Session::new(self.durable_lsn, self.dest.confirm_gate());
        self.stream_columns = vec![None; self.outbox.tables.len()];
        self.start_backfill(&mut s);
        let result = self.stream_events(replication, &mut s).await;
        s.reader = None;
        self.abandon_spilled(&mut s).await;
        if s.settled() {
            return result;
        }
        let settled = self.settle_all(&mut s).await;
        if settled.is_ok() {
            s.confirm(replication);
        }
        session_outcome(result, settled)
    }

    /// The session's read loop: takes the next event (or, with none queued, waits for
    /// one, a commit's completion, a batch falling due, or a stop) and hands it on.
    async fn stream_events(
        &mut self,
        replication: &mut ReplicationClient,
        s: &mut Session,
    ) -> Result<SessionEnd, PipelineError> {
        let mut r = Reading {
            relations: Vec::with_capacity(self.outbox.tables.len()),
            open: None,
            commit_lsn: Lsn::ZERO,
            txn_base: (0, 0),
            linger: Duration::from_millis(self.args.linger_ms),
            interval: self.dest.commit_interval(),
            heard: Instant::now(),
            fresh: false,
            requests: Vec::new(),
        };
        let mut stop = self.stop.clone();
        let mut events = events::Events::new();
        loop {
            let event = match events.queued(replication) {
                Some(event) => event,
                None => {
                    if std::mem::take(&mut r.fresh) {
                        // The events just handled came at the latest now: one clock
                        // read per wait, not one per event.
                        r.heard = Instant::now();
                    }
                    events.before_wait(replication);
                    match self.wait(replication, s, &r, &mut stop).await? {
                        Waited::Event(event) => {
                            events.taken();
                            event
                        }
                        Waited::Silence(silence) => Err(PgWireError::Io(Arc::new(
                            std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!(
                                    "pg_start sent nothing for {silence:?} (its wal_sender_timeout; \
                                     an idle walsender sends a keepalive every half of it)"
                                ),
                            ),
                        ))),
                        Waited::Handled => continue,
                        Waited::Stop => {
                            self.stop_session(replication, s, &mut r).await?;
                            return Ok(SessionEnd::Stopped);
                        }
                    }
                }
            };
            r.fresh = true;
            match event {
                Ok(Some(event)) => self.on_event(event, replication, s, &mut r).await?,
                Ok(None) => {
                    return Err(PipelineError::Replication(PgWireError::Protocol(
                        "replication stream ended".into(),
                    )))
                }
                Err(error) => {
                    // Complete transactions in the batch are valid: make them durable
                    // before reconnecting, so the next session does not redo them.
                    if r.open.take().is_some() {
                        self.dest.discard_txn();
                    }
                    s.tracker.abandon_open();
                    let drained = self.drain(s, replication).await;
                    return session_outcome(Err(PipelineError::Replication(error)), drained);
                }
            }
        }
    }

    /// With no event queued: waits for whichever comes first of a stop, the commit in
    /// flight completing (handled here), the batch or a sync falling due (handled
    /// here), and the next event.
    async fn wait(
        &mut self,
        replication: &mut ReplicationClient,
        s: &mut Session,
        r: &Reading,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Waited, PipelineError> {
        // The batch may only be committed between source transactions (the rows of an
        // open one are in the destination's batch but not complete), and a lingering
        // batch waits for the commit in flight rather than for its own turn inside
        // flush().
        let deadline = if r.open.is_none() && s.in_flight.is_none() {
            s.due(r.linger, r.interval)
                .or_else(|| s.sync_due())
                .or_else(|| s.record_due())
        } else {
            None
        };
        let silent_until = self.silence.map(|silence| r.heard + silence);
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Ok(Waited::Stop),
            result = committing(&mut s.in_flight) => {
                self.committed(s, result)?;
                s.confirm(replication);
                Ok(Waited::Handled)
            }
            _ = retry::sleep_until(deadline) => {
                if !s.batch.is_empty() {
                    self.flush(s).await?;
                } else if !s.unflushed.is_empty() {
                    self.start_sync(s);
                } else {
                    self.start_record(s);
                }
                Ok(Waited::Handled)
            }
            chunk = backfill::next(&mut s.reader), if r.open.is_none() && !s.spilled && !s.batch.backfill => {
                self.add_chunk(chunk, s);
                if s.in_flight.is_none() && s.due(r.linger, r.interval).is_some_and(|due| due <= Instant::now()) {
                    self.flush(s).await?;
                }
                Ok(Waited::Handled)
            }
            event = replication.recv() => Ok(Waited::Event(event)),
            _ = retry::sleep_until(silent_until) => Ok(Waited::Silence(self.silence.unwrap_or_default())),
        }
    }

    /// A stop: an open transaction is abandoned (read again from the slot on the next
    /// start), the complete ones are made durable and confirmed.
    async fn stop_session(
        &mut self,
        replication: &ReplicationClient,
        s: &mut Session,
        r: &mut Reading,
    ) -> Result<(), PipelineError> {
        if r.open.take().is_some() {
            self.dest.discard_txn();
            s.tracker.abandon_open();
        }
        self.drain(s, replication).await?;
        // Give the worker a moment to send the final status update.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        Ok(())
    }

    /// One replication event.
    async fn on_event(
        &mut self,
        event: ReplicationEvent,
        replication: &ReplicationClient,
        s: &mut Session,
        r: &mut Reading,
    ) -> Result<(), PipelineError> {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                s.tracker.begin();
                let commit_lsn = Lsn(final_lsn.as_u64());
                let skip = commit_lsn < self.durable_lsn;
                if !skip {
                    self.dest.begin_txn(TxnMeta {
                        commit_lsn,
                        xid: Some(xid),
                        commit_time_micros: Some(commit_time_micros),
                    });
                    r.txn_base = self.dest.batch_size();
                }
                r.open = Some(skip);
                r.commit_lsn = commit_lsn;
                r.requests.clear();
            }
            ReplicationEvent::XLogData {
                data, wal_start, ..
            } => {
                self.on_message(&data, Lsn(wal_start.as_u64()), r)?;
                self.spill_if_large(s, r).await?;
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                self.on_commit(Lsn(end_lsn.as_u64()), s, r).await?;
                s.confirm(replication);
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                s.idle_position(Lsn(wal_end.as_u64()), replication);
            }
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                let lsn = Lsn(lsn.as_u64());
                let outbox = self.outbox.prefixes.iter().position(|p| *p == prefix);
                match (outbox, transactional) {
                    (Some(i), true) if r.open == Some(false) => {
                        self.dest.message(i, &content, true);
                        self.spill_if_large(s, r).await?;
                    }
                    (Some(i), false) => self.on_lone_message(i, lsn, &content, s, r).await?,
                    (None, true) if prefix == backfill::PREFIX && r.open == Some(false) => {
                        r.requests.push(content.to_vec());
                    }
                    (None, false) => s.idle_position(lsn, replication),
                    _ => {}
                }
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// A non-transactional message with an outbox prefix: refused (it is not part of
    /// any source transaction, so its delivery could not be tied to one), never
    /// dropped. It becomes a source transaction of its own, at its LSN, in which the
    /// destination makes a dead letter of it.
    async fn on_lone_message(
        &mut self,
        prefix: usize,
        lsn: Lsn,
        content: &[u8],
        s: &mut Session,
        r: &mut Reading,
    ) -> Result<(), PipelineError> {
        if r.open.is_some() {
            // pgoutput sends such a message between transactions only.
            return Ok(());
        }
        s.tracker.begin();
        if lsn <= self.durable_lsn {
            s.tracker.commit(lsn, 0);
            return Ok(());
        }
        tracing::error!(
            prefix = %self.outbox.prefixes[prefix],
            %lsn,
            "a non-transactional logical message with an outbox prefix: only \
             pg_logical_emit_message(true, …) is relayed; this one is a dead letter (the \
             connector's dead-letter topic, or pg_end's outbox_relay.dead_letters in direct mode)"
        );
        self.dest.begin_txn(TxnMeta {
            commit_lsn: lsn,
            xid: None,
            commit_time_micros: None,
        });
        self.dest.message(prefix, content, false);
        r.open = Some(false);
        self.on_commit(lsn, s, r).await
    }

    /// A pgoutput message: an outbox table's Relation sets the destination's columns,
    /// its inserts become rows (or, in a transaction already durable, delivered rows).
    fn on_message(
        &mut self,
        data: &bytes::Bytes,
        at: Lsn,
        r: &mut Reading,
    ) -> Result<(), PipelineError> {
        let message =
            pgoutput::decode(data).map_err(|source| PipelineError::Decode { lsn: at, source })?;
        match message {
            LogicalMessage::Relation(relation) => {
                let Some(table) = self
                    .outbox
                    .tables
                    .iter()
                    .position(|t| relation.namespace == t.schema && relation.name == t.name)
                else {
                    return Ok(());
                };
                let columns: Vec<ColumnDef> =
                    relation.columns.iter().map(ColumnDef::from).collect();
                self.dest.set_columns(table, &columns)?;
                if let Some(known) = self.stream_columns.get_mut(table) {
                    *known = Some(columns);
                }
                r.relations.retain(|(_, t)| *t != table);
                r.relations.push((relation.rel_id, table));
            }
            LogicalMessage::Insert(insert) if r.open.is_some() => {
                let Some(&(_, table)) = r.relations.iter().find(|(rel, _)| *rel == insert.rel_id)
                else {
                    return Ok(());
                };
                let values: Vec<Option<&[u8]>> =
                    insert.new.columns.iter().map(|c| c.as_text()).collect();
                if r.open == Some(false) {
                    self.dest.row(table, &values);
                } else {
                    self.dest.delivered_row(table, &values, r.commit_lsn);
                }
            }
            // Updates, deletes and truncates of the outbox are not published; types,
            // origins and messages carry nothing to relay.
            _ => {}
        }
        Ok(())
    }

    /// A source transaction's commit: a skipped one only moves the tracker; a new one
    /// joins the batch, which is committed when full, or when due with nothing in
    /// flight.
    async fn on_commit(
        &mut self,
        end_lsn: Lsn,
        s: &mut Session,
        r: &mut Reading,
    ) -> Result<(), PipelineError> {
        match r.open.take() {
            None => {}
            Some(true) => {
                s.tracker.commit(end_lsn, 0);
            }
            Some(false) if end_lsn <= self.durable_lsn => {
                if s.spilled {
                    // Part of it is in the open destination transaction: the session
                    // ends, that transaction is rolled back, and the slot sends the
                    // source transaction again (to be skipped then at its Begin).
                    return Err(PipelineError::Destination {
                        context: format!(
                            "source transaction ending at {end_lsn} was already durable but \
                             partly streamed again"
                        ),
                        class: ErrorClass::Transient,
                        source: "a spilled transaction that is already durable".into(),
                    });
                }
                self.dest.discard_txn();
                s.tracker.commit(end_lsn, 0);
            }
            Some(false) => {
                self.dest.end_txn();
                s.stream_lsn = end_lsn;
                if !r.requests.is_empty() {
                    let mut changed = false;
                    for request in std::mem::take(&mut r.requests) {
                        changed |=
                            self.backfills
                                .request(&request, &self.outbox.tables, &self.slot);
                    }
                    if changed {
                        s.reader = None;
                        self.start_backfill(s);
                    }
                    s.batch.backfill = true;
                }
                if !s.spilled && !s.batch.backfill {
                    if let Some(chunk) = s.reader.as_mut().and_then(backfill::Reader::try_next) {
                        self.add_chunk(chunk, s);
                    }
                }
                let batch = &mut s.batch;
                batch.last_end_lsn = Some(end_lsn);
                batch.last_ticket = Some(s.tracker.commit(end_lsn, 1));
                batch.transactions += 1;
                batch.started.get_or_insert_with(Instant::now);
                let (rows, bytes) = self.dest.batch_size();
                ::metrics::gauge!(metrics::IN_FLIGHT_RECORDS, "stage" => D::STAGE).set(rows as f64);
                ::metrics::gauge!(metrics::IN_FLIGHT_BYTES, "stage" => D::STAGE).set(bytes as f64);
                // A spilled batch holds a destination transaction open: it is
                // committed as soon as its source transaction is complete.
                let full =
                    s.spilled || rows >= self.args.batch_size || bytes >= self.args.batch_bytes;
                let due = s
                    .due(r.linger, r.interval)
                    .is_some_and(|due| due <= Instant::now());
                if full || (due && s.in_flight.is_none()) {
                    self.flush(s).await?;
                }
            }
        }
        Ok(())
    }

    /// Starts the batch's commit, after the one in flight (if any) has completed:
    /// one commit at a time, in order.
    async fn flush(&mut self, s: &mut Session) -> Result<(), PipelineError> {
        // A batch of backfill chunks alone stands at the last record's position.
        let Some(last_lsn) = s
            .batch
            .last_end_lsn
            .or(s.batch.backfill.then_some(s.last_record))
        else {
            return Ok(());
        };
        s.batch.last_end_lsn = Some(last_lsn);
        self.settle(s).await?;
        settle_spill(s).await?;
        let (rows, _) = self.dest.batch_size();
        let record = ProgressRecord::streaming(last_lsn)
            .of_system(self.system_identifier.as_deref())
            .with_backfills(&self.backfills.list);
        s.last_record = last_lsn;
        let commit = self.dest.commit(&self.slot, &record);
        s.last_commit = Some(Instant::now());
        // The commit completes the spilled destination transaction, if any.
        s.spilled = false;
        s.in_flight = Some(InFlight {
            commit: tokio::spawn(commit),
            mark: std::mem::take(&mut s.batch),
            rows,
        });
        Ok(())
    }

    /// After a row (or message) of the open source transaction: when what the batch
    /// holds of it has passed a batch, spills the batch (see "Large source
    /// transactions"), after the commit in flight.
    async fn spill_if_large(
        &mut self,
        s: &mut Session,
        r: &mut Reading,
    ) -> Result<(), PipelineError> {
        if r.open != Some(false) {
            return Ok(());
        }
        let (rows, bytes) = self.dest.batch_size();
        let (base_rows, base_bytes) = r.txn_base;
        if rows.saturating_sub(base_rows) < self.args.batch_size
            && bytes.saturating_sub(base_bytes) < self.args.batch_bytes
        {
            return Ok(());
        }
        self.settle(s).await?;
        // One part is sent while the next is read; the parts go in order.
        settle_spill(s).await?;
        if !s.spilled {
            tracing::info!(
                commit_lsn = %r.commit_lsn,
                rows = rows - base_rows,
                "a source transaction larger than a batch: streaming it into one open \
                 destination transaction"
            );
        }
        s.spilled = true;
        let spill = self.dest.spill();
        r.txn_base = self.dest.batch_size();
        #[cfg(feature = "fault-injection")]
        let spill = async move {
            spill.await?;
            AFTER_SPILL.pass();
            Ok(())
        };
        s.spilling = Some(tokio::spawn(spill));
        ::metrics::counter!(metrics::SPILLS, "stage" => D::STAGE).increment(1);
        Ok(())
    }

    /// A session ending with a spilled batch rolls its destination transaction back:
    /// its source transactions (none of them confirmed) are read again from the slot.
    async fn abandon_spilled(&mut self, s: &mut Session) {
        if !std::mem::take(&mut s.spilled) {
            return;
        }
        // Its outcome does not matter: it is all rolled back.
        let _ = settle_spill(s).await;
        tracing::warn!(
            "the session ended while a source transaction larger than a batch was being \
             streamed: its open destination transaction is rolled back, and the slot sends \
             it again"
        );
        self.dest.abandon().await;
        s.batch = BatchMark::default();
    }

    /// Starts reading the active backfill, if there is one and no reader.
    fn start_backfill(&mut self, s: &mut Session) {
        if s.reader.is_some() {
            return;
        }
        if let Some(active) = self.backfills.active() {
            s.reader = Some(backfill::Reader::spawn(
                active,
                backfill::ReaderSettings {
                    source_url: self.source_url.clone(),
                    tables: self.outbox.tables.clone(),
                    chunk_rows: self.args.backfill_chunk_rows.min(self.args.batch_size),
                    batch_bytes: self.args.batch_bytes,
                },
            ));
        }
    }

    /// A chunk of the active backfill joins the batch, as a transaction of its own,
    /// with the backfill's new position; or the backfill's failure does. Called
    /// between source transactions only.
    fn add_chunk(&mut self, chunk: Result<backfill::Chunk, String>, s: &mut Session) {
        let reading = s.reader.as_ref().map(|r| r.id.clone());
        if reading.is_none() || reading.as_ref() != self.backfills.active().map(|b| &b.id) {
            // Read for a backfill that is no longer the active one.
            s.reader = None;
            self.start_backfill(s);
            return;
        }
        s.batch.backfill = true;
        s.batch.started.get_or_insert_with(Instant::now);
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(error) => {
                self.backfills.fail(error);
                s.reader = None;
                self.start_backfill(s);
                return;
            }
        };
        let table = chunk.table;
        let known = self.stream_columns.get(table).cloned().flatten();
        let differs = known.as_deref() != Some(&chunk.columns[..]);
        if differs {
            if let Err(error) = self.dest.set_columns(table, &chunk.columns) {
                self.backfills.fail(error_chain(&error));
                s.reader = None;
                self.start_backfill(s);
                return;
            }
        }
        self.dest.begin_backfill(
            TxnMeta {
                commit_lsn: s.stream_lsn,
                xid: None,
                commit_time_micros: None,
            },
            reading.as_deref().unwrap_or_default(),
        );
        let mut values: Vec<Option<&[u8]>> = Vec::with_capacity(chunk.columns.len());
        for row in &chunk.rows {
            values.clear();
            values.extend((0..chunk.columns.len()).map(|c| row.get(c).map(str::as_bytes)));
            self.dest.row(table, &values);
        }
        self.dest.end_txn();
        if let (true, Some(known)) = (differs, known) {
            // The stream's rows keep the stream's columns.
            let _ = self.dest.set_columns(table, &known);
        }
        let rows = chunk.rows.len() as u64;
        s.batch.backfill_rows += rows;
        self.backfills.advance(rows, chunk.next_page, chunk.last);
        if chunk.last {
            s.reader = None;
            self.start_backfill(s);
        }
    }

    /// Waits for the commit in flight, if any, and marks its batch durable.
    async fn settle(&mut self, s: &mut Session) -> Result<(), PipelineError> {
        if s.in_flight.is_none() {
            return Ok(());
        }
        let result = committing(&mut s.in_flight).await;
        self.committed(s, result)
    }

    /// Commits a progress record alone at the position the slot may be confirmed to
    /// ([`Session::record_due`]); the destination's batch is empty.
    fn start_record(&mut self, s: &mut Session) {
        debug_assert!(s.in_flight.is_none() && s.batch.is_empty());
        let lsn = s.tracker.confirmable().max(s.last_record);
        let record = ProgressRecord::streaming(lsn)
            .of_system(self.system_identifier.as_deref())
            .with_backfills(&self.backfills.list);
        s.last_record = lsn;
        let commit = self.dest.commit(&self.slot, &record);
        s.last_commit = Some(Instant::now());
        s.in_flight = Some(InFlight {
            commit: tokio::spawn(commit),
            mark: BatchMark {
                last_end_lsn: Some(lsn),
                ..BatchMark::default()
            },
            rows: 0,
        });
    }

    /// Starts making every commit so far durable, when nothing is being committed.
    fn start_sync(&mut self, s: &mut Session) {
        debug_assert!(s.in_flight.is_none());
        let sync = self.dest.sync();
        s.last_commit = Some(Instant::now());
        s.in_flight = Some(InFlight {
            commit: tokio::spawn(async move {
                let flushed = sync.await?;
                Ok(Committed {
                    flush_needed: None,
                    flushed,
                })
            }),
            mark: BatchMark::default(),
            rows: 0,
        });
    }

    /// Waits for the commit in flight, then makes every commit durable.
    async fn settle_all(&mut self, s: &mut Session) -> Result<(), PipelineError> {
        self.settle(s).await?;
        if !s.unflushed.is_empty() {
            self.start_sync(s);
            self.settle(s).await?;
        }
        Ok(())
    }

    /// Commits the batch and waits until it (and every one before it) is durable, then
    /// confirms.
    async fn drain(
        &mut self,
        s: &mut Session,
        replication: &ReplicationClient,
    ) -> Result<(), PipelineError> {
        // A spilled batch holds part of a source transaction that did not end: it is
        // rolled back, not committed.
        self.abandon_spilled(s).await;
        self.flush(s).await?;
        self.settle_all(s).await?;
        s.confirm(replication);
        Ok(())
    }

    /// The commit (or sync) in flight has returned `result`: its batch joins the
    /// committed ones, and those the destination's log has made durable, oldest first,
    /// are marked durable (the caller confirms the slot).
    fn committed(
        &mut self,
        s: &mut Session,
        result: Result<Committed, PipelineError>,
    ) -> Result<(), PipelineError> {
        let Some(done) = s.in_flight.take() else {
            return result.map(drop);
        };
        let committed = match result {
            Ok(committed) => committed,
            Err(error) => {
                // The error ends the session. Batches committed but not yet durable stay
                // unconfirmed: no later report, from whatever connection, may release
                // them, and the next session reads them again from the slot.
                s.unflushed.clear();
                return Err(error);
            }
        };
        let batch = !done.mark.is_empty();
        let backfill_rows = done.mark.backfill_rows;
        if batch {
            ::metrics::counter!(metrics::RECORDS, "stage" => D::STAGE).increment(done.rows as u64);
            ::metrics::counter!(metrics::TRANSACTIONS, "stage" => D::STAGE)
                .increment(done.mark.transactions);
            if backfill_rows > 0 {
                ::metrics::counter!(metrics::BACKFILL_ROWS, "stage" => D::STAGE)
                    .increment(backfill_rows);
            }
            let needed = committed.flush_needed.unwrap_or(Lsn::ZERO);
            s.unflushed.push_back((needed, done.mark));
        }
        if s.batch.is_empty() {
            ::metrics::gauge!(metrics::IN_FLIGHT_RECORDS, "stage" => D::STAGE).set(0.0);
            ::metrics::gauge!(metrics::IN_FLIGHT_BYTES, "stage" => D::STAGE).set(0.0);
        }
        if let Some(last_lsn) = s.flushed(committed.flushed) {
            self.durable_lsn = self.durable_lsn.max(last_lsn);
        }
        #[cfg(feature = "fault-injection")]
        if batch {
            AFTER_COMMIT.pass();
            if backfill_rows > 0 {
                AFTER_BACKFILL_CHUNK.pass();
            }
        }
        Ok(())
    }
}

/// The acknowledgement state of one replication session.
struct Session {
    tracker: ProgressTracker,
    /// The batch being read.
    batch: BatchMark,
    /// The batch being committed (or, with an empty mark, a sync).
    in_flight: Option<InFlight>,
    /// Batches committed but not yet durable, oldest first, each with the position of
    /// the destination's log that makes it durable (see [`Committed`]).
    unflushed: VecDeque<(Lsn, BatchMark)>,
    /// The LSN last confirmed to the slot.
    confirmed: Lsn,
    /// The highest progress record durable in the destination: the slot is never
    /// confirmed past it (slot identity, see the module doc).
    recorded: Lsn,
    /// When the last commit started.
    last_commit: Option<Instant>,
    /// When the session started.
    started: Instant,
    /// The destination's bound on confirmations, if it has one.
    gate: Option<ConfirmGate>,
    /// The batch has been spilled into a destination transaction that is still open
    /// (see "Large source transactions").
    spilled: bool,
    /// The spill being sent while the next part is read (at most one).
    spilling: Option<tokio::task::JoinHandle<Result<(), PipelineError>>>,
    /// Reads the active backfill's chunks ahead, if there is one.
    reader: Option<backfill::Reader>,
    /// The position of the last progress record handed to the destination.
    last_record: Lsn,
    /// The commit end LSN of the last source transaction in a batch.
    stream_lsn: Lsn,
}

impl Session {
    /// A session that starts with everything up to `durable` durable.
    fn new(durable: Lsn, gate: Option<ConfirmGate>) -> Self {
        Self {
            tracker: ProgressTracker::new(durable),
            batch: BatchMark::default(),
            in_flight: None,
            unflushed: VecDeque::new(),
            confirmed: Lsn::ZERO,
            recorded: durable,
            last_commit: None,
            started: Instant::now(),
            gate,
            spilled: false,
            spilling: None,
            reader: None,
            last_record: durable,
            stream_lsn: durable,
        }
    }

    /// Nothing read is waiting to become durable.
    fn idle(&self) -> bool {
        self.batch.is_empty() && self.settled()
    }

    /// Nothing is being committed, and everything committed is durable.
    fn settled(&self) -> bool {
        self.in_flight.is_none() && self.unflushed.is_empty()
    }

    /// The destination's log is durable through `flushed`: the committed batches it
    /// covers, oldest first, are durable. Returns the last source LSN they hold.
    fn flushed(&mut self, flushed: Lsn) -> Option<Lsn> {
        let mut durable = None;
        while let Some((_, mark)) = match self.unflushed.front() {
            Some((needed, _)) if *needed <= flushed => self.unflushed.pop_front(),
            _ => None,
        } {
            if let Some(last_lsn) = mark.last_end_lsn {
                if let Some(ticket) = mark.last_ticket {
                    self.tracker.durable_through(ticket);
                }
                self.recorded = self.recorded.max(last_lsn);
                durable = Some(last_lsn);
            }
        }
        durable
    }

    /// When, with nothing to commit and nothing to make durable, a progress record
    /// alone is committed at the position the slot could be confirmed to (a keepalive's
    /// or a heartbeat's): [`IDLE_RECORD_INTERVAL`] after the last commit started.
    fn record_due(&self) -> Option<Instant> {
        if !self.batch.is_empty()
            || !self.unflushed.is_empty()
            || self.tracker.confirmable() <= self.recorded
        {
            return None;
        }
        Some(self.last_commit.unwrap_or(self.started) + IDLE_RECORD_INTERVAL)
    }

    /// When, with nothing to commit, the commits that are not yet durable are made so:
    /// [`SYNC_DELAY`] after the last commit started, if no later commit said they were.
    fn sync_due(&self) -> Option<Instant> {
        if !self.batch.is_empty() || self.unflushed.is_empty() {
            return None;
        }
        Some(self.last_commit.unwrap_or_else(Instant::now) + SYNC_DELAY)
    }

    /// When the batch, if it is not full, is due for its commit: `linger` after its
    /// first transaction, and not before `interval` after the last commit started.
    fn due(&self, linger: Duration, interval: Duration) -> Option<Instant> {
        // A backfill chunk is a batch's worth already: it does not linger.
        let linger = if self.batch.backfill {
            Duration::ZERO
        } else {
            linger
        };
        let lingered = self.batch.started? + linger;
        Some(match self.last_commit {
            Some(last) => lingered.max(last + interval),
            None => lingered,
        })
    }

    /// With nothing read waiting to become durable, everything before `lsn` (a
    /// keepalive's WAL end, a non-transactional message) may be confirmed.
    fn idle_position(&mut self, lsn: Lsn, replication: &ReplicationClient) {
        if self.idle() {
            self.tracker.idle_position(lsn);
            self.confirm(replication);
        }
    }

    /// Tells the slot what may be confirmed.
    fn confirm(&mut self, replication: &ReplicationClient) {
        let mut lsn = self.tracker.confirmable().min(self.recorded);
        if let Some(gate) = &self.gate {
            lsn = lsn.min(gate.get());
        }
        if lsn > self.confirmed {
            ::metrics::gauge!(metrics::CONFIRMED_LSN).set(lsn.as_u64() as f64);
            replication.update_applied_lsn(pgwire_replication::Lsn::from_u64(lsn.as_u64()));
            self.confirmed = lsn;
        }
    }
}

/// How often, at most, an idle pipeline commits a progress record alone so that the
/// slot may be confirmed past the last transaction (to a keepalive's WAL end).
const IDLE_RECORD_INTERVAL: Duration = Duration::from_secs(10);

/// How often a streaming session reads its slot's lag from pg_start (see
/// `Pipeline::spawn_monitor`).
const LAG_EVERY: Duration = Duration::from_secs(5);

/// How long commits that are not yet durable wait, when no batch follows them, before
/// the pipeline asks the destination to make them so. A later commit usually finds
/// them durable first: PostgreSQL's WAL writer flushes asynchronous commits within
/// `wal_writer_delay` (200 ms by default).
const SYNC_DELAY: Duration = Duration::from_millis(100);

/// A batch handed to the destination, and the task that commits it.
struct InFlight {
    commit: tokio::task::JoinHandle<Result<Committed, PipelineError>>,
    mark: BatchMark,
    rows: usize,
}

/// Waits for the spill being sent, if any.
async fn settle_spill(s: &mut Session) -> Result<(), PipelineError> {
    match s.spilling.take() {
        Some(spill) => spill.await.unwrap_or_else(|e| {
            Err(PipelineError::Definite(format!(
                "the destination spill task failed: {e}"
            )))
        }),
        None => Ok(()),
    }
}

/// Completes with the in-flight commit's result; pending forever when there is none.
async fn committing(in_flight: &mut Option<InFlight>) -> Result<Committed, PipelineError> {
    match in_flight {
        Some(f) => (&mut f.commit).await.unwrap_or_else(|e| {
            Err(PipelineError::Definite(format!(
                "the destination commit task failed: {e}"
            )))
        }),
        None => std::future::pending().await,
    }
}

/// Which source transactions the destination's batch holds.
#[derive(Debug, Default)]
struct BatchMark {
    /// Source transactions in the batch.
    transactions: u64,
    /// Commit end LSN of the last complete source transaction in the batch.
    last_end_lsn: Option<Lsn>,
    /// The tracker ticket of that transaction.
    last_ticket: Option<TxnTicket>,
    /// When the first transaction entered the batch.
    started: Option<Instant>,
    /// The batch changes the backfills: a chunk (at most one), a request, an end.
    backfill: bool,
    /// Rows of the backfill chunk.
    backfill_rows: u64,
}

impl BatchMark {
    /// Nothing to commit: no transaction (a sync's mark). A progress record alone has
    /// a position and no transaction.
    fn is_empty(&self) -> bool {
        self.last_end_lsn.is_none() && !self.backfill
    }
}

/// A test hook (the `fault-injection` feature only): the environment variable `var`
/// set to N aborts the process the Nth time the point is passed, or, made with
/// [`CrashPoint::freezing`], stops it (SIGSTOP, as a host cut off; SIGCONT resumes it)
/// that one time.
#[cfg(feature = "fault-injection")]
pub(crate) struct CrashPoint {
    var: &'static str,
    message: &'static str,
    freeze: bool,
    passed: std::sync::atomic::AtomicU64,
    limit: std::sync::OnceLock<Option<u64>>,
}

#[cfg(feature = "fault-injection")]
impl CrashPoint {
    pub(crate) const fn new(var: &'static str, message: &'static str) -> Self {
        Self {
            var,
            message,
            freeze: false,
            passed: std::sync::atomic::AtomicU64::new(0),
            limit: std::sync::OnceLock::new(),
        }
    }

    pub(crate) const fn freezing(var: &'static str, message: &'static str) -> Self {
        Self {
            var,
            message,
            freeze: true,
            passed: std::sync::atomic::AtomicU64::new(0),
            limit: std::sync::OnceLock::new(),
        }
    }

    pub(crate) fn pass(&self) {
        use std::sync::atomic::Ordering;
        let limit = self
            .limit
            .get_or_init(|| std::env::var(self.var).ok().and_then(|v| v.parse().ok()));
        let Some(limit) = limit else {
            return;
        };
        let passed = self.passed.fetch_add(1, Ordering::SeqCst) + 1;
        if self.freeze && passed == *limit {
            eprintln!("test hook: {}", self.message);
            let stopped = std::process::Command::new("kill")
                .args(["-STOP", &std::process::id().to_string()])
                .status();
            assert!(
                stopped.is_ok_and(|s| s.success()),
                "SIGSTOP to itself failed"
            );
        } else if !self.freeze && passed >= *limit {
            eprintln!("test hook: {}", self.message);
            std::process::abort();
        }
    }
}

/// `OUTBOX_RELAY_TEST_CRASH_AFTER_COMMITS=N` aborts the process right after the Nth
/// destination commit, before the slot is told, to prove that such a crash causes no
/// duplicate.
#[cfg(feature = "fault-injection")]
static AFTER_COMMIT: CrashPoint = CrashPoint::new(
    "OUTBOX_RELAY_TEST_CRASH_AFTER_COMMITS",
    "aborting after a destination commit, before confirming the slot",
);

/// `OUTBOX_RELAY_TEST_CRASH_AFTER_SPILLS=N` aborts the process right after the Nth
/// spill of a source transaction larger than a batch, its destination transaction
/// open, to prove that none of it is delivered until it is all delivered.
#[cfg(feature = "fault-injection")]
static AFTER_SPILL: CrashPoint = CrashPoint::new(
    "OUTBOX_RELAY_TEST_CRASH_AFTER_SPILLS",
    "aborting after a spill, its destination transaction open",
);

/// `OUTBOX_RELAY_TEST_CRASH_AFTER_BACKFILL_CHUNKS=N` aborts the process right after the
/// Nth commit that carried a backfill chunk, to prove that a backfill resumes after it.
#[cfg(feature = "fault-injection")]
static AFTER_BACKFILL_CHUNK: CrashPoint = CrashPoint::new(
    "OUTBOX_RELAY_TEST_CRASH_AFTER_BACKFILL_CHUNKS",
    "aborting after a backfill chunk was committed",
);

#[cfg(test)]
mod tests {
    use super::testing::Counting;
    use super::*;

    fn session() -> Session {
        Session::new(Lsn::ZERO, None)
    }

    #[test]
    fn nothing_is_committed_under_a_creation_lock_whose_lease_may_have_run_out() {
        let clock = LeaseClock::default();
        clock.check().expect("no lease: nothing to run out");
        clock.held_until(Some(Instant::now() + Duration::from_secs(60)));
        clock.check().expect("within the lease");
        clock.held_until(Some(Instant::now() - Duration::from_millis(1)));
        let error = clock.check().expect_err("past the lease");
        assert_eq!(error.class(), ErrorClass::Transient);
        assert!(
            error.to_string().contains("lease may have run out"),
            "{error}"
        );
        clock.held_until(None);
        clock.check().expect("the lease ended with its work");
    }

    #[test]
    fn an_idle_position_waits_for_a_progress_record_before_it_is_confirmed() {
        let mut s = session();
        let t = s.tracker.commit(Lsn(100), 1);
        s.batch.last_end_lsn = Some(Lsn(100));
        s.batch.last_ticket = Some(t);
        let mark = std::mem::take(&mut s.batch);
        s.unflushed.push_back((Lsn::ZERO, mark));
        assert_eq!(s.flushed(Lsn::ZERO), Some(Lsn(100)));
        assert_eq!(s.recorded, Lsn(100));
        // A keepalive past the last transaction: confirmable, but not recorded yet.
        s.tracker.idle_position(Lsn(500));
        assert_eq!(s.tracker.confirmable(), Lsn(500));
        assert!(s.record_due().is_some(), "a progress record is due");
        // The progress record alone, durable: now the slot may pass the last transaction.
        s.unflushed.push_back((
            Lsn::ZERO,
            BatchMark {
                last_end_lsn: Some(Lsn(500)),
                ..BatchMark::default()
            },
        ));
        assert_eq!(s.flushed(Lsn::ZERO), Some(Lsn(500)));
        assert_eq!(s.recorded, Lsn(500));
        assert!(s.record_due().is_none());
    }

    #[test]
    fn a_batch_is_due_after_its_linger_and_not_before_the_commit_interval() {
        let (linger, interval) = (Duration::from_millis(20), Duration::from_millis(50));
        let mut s = session();
        assert_eq!(s.due(linger, interval), None, "an empty batch is never due");

        let t0 = Instant::now();
        s.batch.started = Some(t0);
        // No commit yet: the linger alone.
        assert_eq!(s.due(linger, interval), Some(t0 + linger));
        // A commit began 10 ms before the batch's first transaction: the interval
        // ends after the linger.
        s.last_commit = Some(t0 - Duration::from_millis(10));
        assert_eq!(
            s.due(linger, interval),
            Some(t0 + Duration::from_millis(40))
        );
        // One began long before: the linger again.
        s.last_commit = Some(t0 - Duration::from_millis(100));
        assert_eq!(s.due(linger, interval), Some(t0 + linger));
        // No interval (direct mode, at-least-once): the linger.
        s.last_commit = Some(t0);
        assert_eq!(s.due(linger, Duration::ZERO), Some(t0 + linger));
    }

    /// Three source transactions at source LSNs 10, 20, 30, each a batch committed
    /// asynchronously at destination log positions 100, 200, 300 (`None`: durable).
    fn committed_batches(s: &mut Session, needed: [Option<u64>; 3]) {
        for (i, needed) in needed.into_iter().enumerate() {
            let end_lsn = Lsn(10 * (i as u64 + 1));
            s.tracker.begin();
            let ticket = s.tracker.commit(end_lsn, 1);
            let mark = BatchMark {
                transactions: 1,
                last_end_lsn: Some(end_lsn),
                last_ticket: Some(ticket),
                ..BatchMark::default()
            };
            s.unflushed.push_back((needed.map_or(Lsn::ZERO, Lsn), mark));
        }
    }

    #[tokio::test]
    async fn a_failed_commit_leaves_the_batches_not_yet_durable_unconfirmed() {
        #[derive(clap::Parser)]
        struct Args {
            #[command(flatten)]
            stream: StreamArgs,
        }
        let args = <Args as clap::Parser>::parse_from(["test"]).stream;
        let outbox = Outbox::table(TableName::parse(&args.outbox.table).unwrap());
        let (_, stop) = watch::channel(false);
        let mut pipeline = Pipeline::new(
            String::new(),
            "slot".into(),
            args,
            outbox,
            Counting::default(),
            stop,
        )
        .unwrap();
        let mut s = session();
        committed_batches(&mut s, [Some(100), Some(200), Some(300)]);
        // The commit of a fourth batch fails: its connection was lost.
        s.in_flight = Some(InFlight {
            commit: tokio::spawn(std::future::pending()),
            mark: BatchMark::default(),
            rows: 0,
        });
        let lost = Err(PipelineError::Definite("connection lost".into()));
        assert!(pipeline.committed(&mut s, lost).is_err());
        // A flush position read afterwards, on whatever connection, releases nothing.
        assert_eq!(s.flushed(Lsn(u64::MAX)), None);
        assert_eq!(s.tracker.confirmable(), Lsn::ZERO);
        assert!(s.settled(), "nothing is left for the session's end to sync");
    }

    #[test]
    fn a_definite_error_while_settling_is_reported_whatever_ended_the_session() {
        let fenced = || PipelineError::Definite("this instance was fenced".into());
        let broken =
            || PipelineError::Replication(PgWireError::Protocol("replication stream ended".into()));
        let lost = || SourceError::Transient {
            context: "the commit's connection was lost".into(),
            source: None,
        };
        // A broken stream (retried) whose drain meets a fence: the fence.
        let outcome = session_outcome::<()>(Err(broken()), Err(fenced()));
        assert!(
            matches!(outcome, Err(PipelineError::Definite(_))),
            "{outcome:?}"
        );
        // A stop whose drain meets a fence: the fence, not a clean stop.
        let outcome = session_outcome(Ok(SessionEnd::Stopped), Err(fenced()));
        assert!(
            matches!(outcome, Err(PipelineError::Definite(_))),
            "{outcome:?}"
        );
        // A transient settling error leaves what ended the session.
        let outcome = session_outcome::<()>(Err(broken()), Err(lost().into()));
        assert!(
            matches!(outcome, Err(PipelineError::Replication(_))),
            "{outcome:?}"
        );
        let outcome = session_outcome(Ok(SessionEnd::Stopped), Err(lost().into()));
        assert!(matches!(outcome, Ok(SessionEnd::Stopped)), "{outcome:?}");
        let outcome = session_outcome::<()>(Err(broken()), Ok(()));
        assert!(
            matches!(outcome, Err(PipelineError::Replication(_))),
            "{outcome:?}"
        );
    }

    #[test]
    fn batches_become_durable_in_order_once_the_destination_log_is_flushed_past_them() {
        let mut s = session();
        committed_batches(&mut s, [Some(100), Some(200), Some(300)]);
        assert!(!s.settled() && !s.idle());
        // Flushed short of the first batch: nothing is durable, nothing confirmable.
        assert_eq!(s.flushed(Lsn(99)), None);
        assert_eq!(s.tracker.confirmable(), Lsn::ZERO);
        // Past the second but not the third.
        assert_eq!(s.flushed(Lsn(250)), Some(Lsn(20)));
        assert_eq!(s.tracker.confirmable(), Lsn(20));
        assert_eq!(s.unflushed.len(), 1);
        assert!(s.sync_due().is_some(), "the rest waits for a sync");
        assert_eq!(s.flushed(Lsn(300)), Some(Lsn(30)));
        assert_eq!(s.tracker.confirmable(), Lsn(30));
        assert!(s.settled() && s.sync_due().is_none());

        // A batch that was durable on return still waits for the ones before it.
        let mut s = session();
        committed_batches(&mut s, [Some(100), None, Some(300)]);
        assert_eq!(s.flushed(Lsn::ZERO), None);
        assert_eq!(s.tracker.confirmable(), Lsn::ZERO);
        assert_eq!(s.flushed(Lsn(100)), Some(Lsn(20)));
        assert_eq!(s.tracker.confirmable(), Lsn(20));

        // Durable on return (Kafka, synchronous pg_end): at once.
        let mut s = session();
        committed_batches(&mut s, [None, None, None]);
        assert_eq!(s.flushed(Lsn::ZERO), Some(Lsn(30)));
        assert!(s.settled());
    }
}
