//! `outbox-relay direct`: outbox → inbox without a queue. The outbox's inserts stream
//! from a replication slot straight into pg_end, through the same [`crate::pipeline`]
//! as the connector and the same [`crate::apply`] as the sink.
//!
//! # Progress: a bookkeeping row, not a replication origin
//! The commit end LSN of the last applied source transaction is stored in
//! `outbox_relay.direct_progress` (one row per slot) by the same pg_end transaction
//! that applies the rows ([`apply::Progress::SourceLsn`]). A replication origin
//! (`pg_replication_origin_xact_setup`) would do the same job, but needs superuser or
//! `pg_replication_origin_*` grants on pg_end, ties the progress to one database
//! cluster's catalog (lost on a logical dump/restore), and would be a second way of
//! storing progress next to the sink's offsets table. The row is plain data: it moves
//! only forward, it is visible to `status`, and it is restored with the data it covers.
//!
//! # Asynchronous commit, confirmed once flushed
//! By default (`--synchronous-commit off`) pg_end's commits return before their WAL is
//! flushed, as a native subscription's apply worker commits: the next batch is applied
//! while the WAL writer flushes the last one. After each commit the connection reads
//! pg_end's WAL insert position (what must be flushed for the batch to be durable) and
//! its flush position; the pipeline marks a batch durable, and confirms the slot past
//! it, only once a flush position at or past its insert position has been seen
//! ([`Committed`]). With no batch following, a small synchronous write on the same
//! connection flushes the rest ([`Destination::sync`]).
//!
//! Positions are compared only on the connection that made the commits: a pg_end crash
//! ends every connection, and its recovered WAL may grow past a lost commit's position.
//! So when the connection breaks while a commit on it is not yet seen flushed, the
//! session ends (a transient error) and the next one reads the progress row again,
//! made durable first. Readers of pg_end may see rows that a crash of pg_end then
//! takes back, to be applied again from the slot; with `on` (or `local`,
//! `remote_write`, `remote_apply`, for a pg_end with synchronous standbys) a batch is
//! durable, to that level, when its commit returns.
//!
//! # Invariants
//! 1. Many source transactions go into one pg_end transaction, never one source
//!    transaction into two ([`crate::pipeline`] hands whole transactions over).
//! 2. The slot is confirmed only after the pg_end commit that holds the rows and the
//!    progress row is durable; on start the progress row is read (and made durable)
//!    and transactions at or below it are skipped, so `kill -9` of the relay or of
//!    pg_end at any instant neither loses nor repeats.
//! 3. Rows that cannot be applied become dead letters in the same pg_end transaction;
//!    the stream goes on.
//! 4. pg_end outages are retried with capped backoff. One batch is applied while the
//!    next is read (the pipeline's overlap); when that one is full, nothing more is
//!    read from the slot until the first is committed (bounded memory).

mod spill;

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{watch, Mutex};
use tokio_postgres::types::PgLsn;

use crate::apply::driver::{self, Driver, Ended, Failure};
use crate::apply::table::Event;
use crate::apply::{self, ApplyBatch, DeadLetter, DeadLetterKind, Origin, Progress, TxnRecord};
use crate::config::{self, SourceArgs, TargetArgs};
use crate::error::{self, ErrorClass};
use crate::inbox::{self, Extracted, InboxKind, InboxSpec, Inboxes, RecordView};
use crate::lsn::Lsn;
use crate::pipeline::{
    ColumnDef, Committed, Destination, Outbox, Pipeline, PipelineError, StreamArgs, TxnMeta,
};
use crate::progress::{ProgressRecord, ProgressState};
use crate::record::decode::{Decoded, Format};
use crate::record::encode::{self, ColumnSpec};
use crate::route::{self, Rendered, Route, RouteSource, RouteSpec};
use crate::source::TableName;

/// Options of `outbox-relay direct`.
#[derive(clap::Args, Debug, Clone)]
pub struct DirectArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub target: TargetArgs,
    /// The logical replication slot (created if missing, unless --no-create-slot).
    #[arg(long, env = "OUTBOX_RELAY_DIRECT_SLOT", default_value = config::DEFAULT_DIRECT_SLOT)]
    pub slot: String,
    /// pg_end's `synchronous_commit` for the applying connection. `off` (as a native
    /// subscription's default): commits return before their WAL is flushed, and the
    /// slot is confirmed past a batch only once pg_end has flushed it. Otherwise each
    /// commit waits for that level of durability.
    #[arg(
        long,
        env = "OUTBOX_RELAY_SYNCHRONOUS_COMMIT",
        value_enum,
        default_value_t = SynchronousCommit::Off
    )]
    pub synchronous_commit: SynchronousCommit,
    #[command(flatten)]
    pub stream: StreamArgs,
    /// A route, as an inline TOML table (as the connector's, docs/connector.md
    /// "Routes"): what an outbox table or message prefix becomes, and by its topic which
    /// inbox takes it. Repeatable; `[[route]]` tables in the configuration file. Used
    /// with --inbox; without any, the --table outbox as whole rows, topic its name.
    #[arg(long = "route", env = "OUTBOX_RELAY_ROUTES", value_delimiter = '\n', value_parser = RouteSpec::parse)]
    pub routes: Vec<RouteSpec>,
    /// An inbox, as an inline TOML table (as the sink's, docs/sink.md "Inboxes"): the
    /// routes' records go to the inbox their topic feeds. Repeatable; `[[inbox]]`
    /// tables in the configuration file. Without any, the seed's ledger from --table.
    #[arg(long = "inbox", value_parser = InboxSpec::parse)]
    pub inboxes: Vec<InboxSpec>,
    #[command(flatten)]
    pub metrics: crate::metrics::MetricsArgs,
}

/// The values of PostgreSQL's `synchronous_commit`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynchronousCommit {
    Off,
    Local,
    On,
    #[value(name = "remote_write")]
    RemoteWrite,
    #[value(name = "remote_apply")]
    RemoteApply,
}

impl SynchronousCommit {
    fn as_sql(self) -> &'static str {
        match self {
            SynchronousCommit::Off => "off",
            SynchronousCommit::Local => "local",
            SynchronousCommit::On => "on",
            SynchronousCommit::RemoteWrite => "remote_write",
            SynchronousCommit::RemoteApply => "remote_apply",
        }
    }
}

/// Runs direct mode until `stop` turns true or a definite error occurs.
pub async fn run(args: DirectArgs, stop: watch::Receiver<bool>) -> Result<(), PipelineError> {
    args.metrics
        .start(crate::metrics::DIRECT_METRICS)
        .await
        .map_err(PipelineError::Definite)?;
    let mut destination = PgEndDestination::new(
        &args.target.target_url,
        &args.slot,
        args.synchronous_commit,
        stop.clone(),
    );
    let outbox = if args.inboxes.is_empty() {
        if !args.routes.is_empty() {
            return Err(PipelineError::Definite(
                "--route needs --inbox in direct mode: the route's topic names the inbox that takes its records".into(),
            ));
        }
        let table = TableName::parse(&args.stream.outbox.table)
            .map_err(|e| PipelineError::Definite(format!("--table: {e}")))?;
        Outbox::table(table)
    } else {
        let routed = Routed::new(&args, &stop).await?;
        let Some(routed) = routed else {
            return Ok(());
        };
        let outbox = Outbox::of_routes(&routed.routes);
        destination.routed = Some(routed);
        outbox
    };
    let mut pipeline = Pipeline::new(
        args.source.source_url.clone(),
        args.slot.clone(),
        args.stream.clone(),
        outbox,
        destination,
        stop,
    )?;
    pipeline.run().await
}

/// Direct mode with inboxes: routes make records of rows and messages exactly as the
/// connector does, and the inboxes take them exactly as the sink does, so a route →
/// inbox pair means the same with or without Kafka in between.
struct Routed {
    routes: Vec<Route>,
    /// Per outbox table (pipeline order): its route, bound once its columns are known.
    tables: Vec<(usize, Option<route::Bound>)>,
    /// Per message prefix (pipeline order): its route.
    messages: Vec<usize>,
    inboxes: Inboxes,
}

impl Routed {
    async fn new(
        args: &DirectArgs,
        stop: &watch::Receiver<bool>,
    ) -> Result<Option<Self>, PipelineError> {
        let table = &args.stream.outbox.table;
        let specs = if args.routes.is_empty() {
            vec![RouteSpec {
                table: Some(table.clone()),
                ..RouteSpec::default()
            }]
        } else {
            args.routes.clone()
        };
        let routes = route::resolve_all(&specs, table)
            .map_err(|e| PipelineError::Definite(e.to_string()))?;
        let stopped = || *stop.borrow();
        let inboxes = Inboxes::bind_when_reachable(
            &args.inboxes,
            &args.target.target_url,
            table,
            Format::Auto,
            &stopped,
        )
        .await
        .map_err(|e| PipelineError::Definite(crate::error::error_chain(&e)))?;
        let Some(mut inboxes) = inboxes else {
            return Ok(None);
        };
        // A route whose one topic no inbox takes would make every row a dead letter:
        // refused before the first row, as `check` reports it. (A templated topic is
        // known per row; a row no inbox takes is a dead letter that says so.)
        let untaken: Vec<String> = routes
            .iter()
            .filter_map(|r| inboxes.untaken(r.topic.literal()?, &r.source.to_string()))
            .collect();
        if !untaken.is_empty() {
            return Err(PipelineError::Definite(untaken.join("; ")));
        }
        let mut tables = Vec::new();
        let mut messages = Vec::new();
        for (index, route) in routes.iter().enumerate() {
            tracing::info!(source = %route.source, topic = %route.topic, "route");
            match route.source {
                RouteSource::Table(_) => tables.push((index, None)),
                RouteSource::Message(_) => messages.push(index),
            }
        }
        Ok(Some(Self {
            routes,
            tables,
            messages,
            inboxes,
        }))
    }
}

/// Positions of the seed's columns in the outbox rows.
#[derive(Debug, Clone, Copy)]
struct Columns {
    id: usize,
    account_id: usize,
    amount: usize,
    created_at: usize,
}

/// Where the open source transaction's rows start (and the batch's byte count
/// before it), and its commit LSN.
#[derive(Debug, Clone, Copy)]
struct OpenTxn {
    records: usize,
    events: usize,
    dead_letters: usize,
    value_bytes: usize,
    commit_lsn: Lsn,
    /// Source commit time, µs since 2000-01-01, for the end-to-end latency.
    commit_time_micros: Option<i64>,
}

struct PgEndDestination {
    /// Shared with the apply in flight, which holds it until it is done.
    pg_end: Arc<Mutex<PgEnd>>,
    /// With inboxes: the routes and inboxes that turn rows into events.
    routed: Option<Routed>,
    columns: Option<Columns>,
    /// For rendering a row as JSON in a dead letter.
    specs: Vec<ColumnSpec>,
    batch: ApplyBatch,
    value_bytes: usize,
    txn: Option<OpenTxn>,
    /// Source commit times of the batch's transactions (µs since the Unix epoch).
    commit_times: Vec<i64>,
    /// The open pg_end transaction of a spilled batch (see [`spill`]).
    spill: Option<spill::Spill>,
}

/// The connection to pg_end.
struct PgEnd {
    /// The connection (set to the `synchronous_commit` level) and the retries on it.
    driver: Driver,
    /// The slot whose progress row this relay writes.
    slot: String,
    synchronous_commit: SynchronousCommit,
    /// pg_end's WAL insert position after the last commit on the driver's connection
    /// that has not been seen flushed.
    unflushed: Option<Lsn>,
    stop: watch::Receiver<bool>,
}

/// pg_end's WAL insert and flush positions, in that order.
const WAL_POSITIONS: &str = "SELECT pg_current_wal_insert_lsn(), pg_current_wal_flush_lsn()";

/// A write that makes every commit before it durable: its own commit is synchronous
/// (locally: what is compared is pg_end's own flush position), and a commit that wrote
/// WAL flushes the WAL up to its commit record.
const FLUSH_WRITE: &str = "\
UPDATE outbox_relay.direct_progress SET updated_at = now() WHERE slot_name = $1";

impl PgEnd {
    /// Commits return before their WAL is flushed.
    fn asynchronous(&self) -> bool {
        self.synchronous_commit == SynchronousCommit::Off
    }

    /// Gives the connection up with commits on it not yet seen flushed: the error that
    /// ends the session.
    fn in_doubt(&mut self) -> PipelineError {
        self.driver.disconnect();
        let upto = match self.unflushed.take() {
            Some(lsn) => format!(" (up to WAL {lsn})"),
            None => String::new(),
        };
        PipelineError::Destination {
            context: format!(
                "the connection to pg_end was lost before pg_end was seen to flush its \
                 commits{upto}; what they hold is read again from the slot"
            ),
            class: ErrorClass::Transient,
            source: "connection given up".into(),
        }
    }
}

/// A failure the driver ended with, as the pipeline's error.
fn destination_error(context: &str, failure: Failure) -> PipelineError {
    PipelineError::Destination {
        context: context.into(),
        class: failure.class(),
        source: Box::new(failure),
    }
}

/// Direct mode's side of the driver while applying a batch: the pipeline's stop, and
/// the commit-in-doubt rule.
struct Applying<'s> {
    stop: &'s watch::Receiver<bool>,
    /// As it was when the batch's first attempt started.
    unflushed: Option<Lsn>,
}

impl driver::Session for Applying<'_> {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn retrying(&mut self, failure: &str, attempt: u32) {
        tracing::warn!(
            error = %failure,
            attempt,
            "pg_end apply failed, retrying the same batch"
        );
    }

    /// A commit on the connection not yet seen flushed may be lost, if pg_end crashed,
    /// and no later connection can tell: the connection is not exchanged for a new
    /// one, the session ends, and its successor starts from pg_end's progress row.
    fn may_release(&mut self) -> bool {
        self.unflushed.is_none()
    }
}

/// Direct mode's side of the driver while reading the progress row at the start of a
/// session: the pipeline's stop; a connection given up is noted (see `read_progress`).
struct ReadingProgress<'s> {
    stop: &'s watch::Receiver<bool>,
    released: bool,
}

impl driver::Session for ReadingProgress<'_> {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    fn retrying(&mut self, failure: &str, attempt: u32) {
        tracing::warn!(error = %failure, attempt, "reading direct-mode progress, retrying");
    }

    fn may_release(&mut self) -> bool {
        self.released = true;
        true
    }
}

/// One attempt at a batch: the apply, then (commits being asynchronous) pg_end's WAL
/// insert and flush positions, read on the connection that committed it.
///
/// A retry first reads the progress row: a failed attempt whose COMMIT went through
/// (its outcome was lost with the connection) has moved it to the batch's LSN, and the
/// batch is then not applied a second time. Rows would be deduplicated by their ids,
/// but dead letters have none, and would be written twice.
struct ApplyAndRead<'b> {
    batch: &'b ApplyBatch,
    asynchronous: bool,
    /// An attempt has been made (whatever came of it).
    tried: bool,
}

impl driver::Attempt for ApplyAndRead<'_> {
    type Output = (apply::ApplyOutcome, Option<(Lsn, Lsn)>);
    async fn run(&mut self, target: &mut apply::Target) -> Result<Self::Output, apply::ApplyError> {
        let committed_before = match (&self.batch.progress, self.tried) {
            (
                apply::Progress::SourceLsn {
                    slot,
                    commit_lsn,
                    snapshot,
                    backfills,
                    ..
                },
                true,
            ) => {
                // The initial snapshot's chunks all stand at 0/0, and a batch of
                // backfill chunks alone at the last record's LSN: one is committed when
                // its progress is stored (each stores a different one).
                let stored = apply::read_source_lsn(&**target, slot).await?;
                let with = apply::read_source_system(&**target, slot).await?;
                stored.is_some_and(|stored| {
                    stored > *commit_lsn
                        || (stored == *commit_lsn
                            && with.snapshot == *snapshot
                            && with.backfills == *backfills)
                })
            }
            _ => false,
        };
        self.tried = true;
        let outcome = if committed_before {
            // This instance's commit that went through before its connection broke,
            // or a successor's commit of the same source transactions while this one
            // was frozen: either way pg_end holds the batch, and it is not applied again.
            tracing::info!(
                "pg_end already holds the batch (its progress row covers it): not applying it again"
            );
            apply::ApplyOutcome::default()
        } else {
            #[cfg(feature = "fault-injection")]
            let doubt = commit_in_doubt_hook();
            let outcome = apply::apply(target, self.batch).await?;
            #[cfg(feature = "fault-injection")]
            if doubt {
                // The connection ends right after the COMMIT: a transient error.
                let ended = target
                    .batch_execute("SELECT pg_terminate_backend(pg_backend_pid())")
                    .await;
                if let Err(e) = ended {
                    return Err(apply::ApplyError::new(
                        "test hook OUTBOX_RELAY_TEST_DOUBT_COMMITS",
                        e,
                    ));
                }
            }
            outcome
        };
        if !self.asynchronous {
            return Ok((outcome, None));
        }
        let positions = wal_positions(target)
            .await
            .map_err(|e| apply::ApplyError::new("reading WAL positions", e))?;
        Ok((outcome, Some(positions)))
    }
}

/// Test hook (the `fault-injection` feature only): `OUTBOX_RELAY_TEST_DOUBT_COMMITS=N`
/// makes each of the first N batch commits report a lost connection after it went
/// through, as a COMMIT whose outcome never reached the relay.
#[cfg(feature = "fault-injection")]
fn commit_in_doubt_hook() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LEFT: std::sync::OnceLock<AtomicU64> = std::sync::OnceLock::new();
    let left = LEFT.get_or_init(|| {
        AtomicU64::new(
            std::env::var("OUTBOX_RELAY_TEST_DOUBT_COMMITS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        )
    });
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// One attempt at reading the progress row: `(row, whether it was made durable, the
/// system identifier stored with it)`.
struct ReadProgress<'s> {
    slot: &'s str,
}

impl driver::Attempt for ReadProgress<'_> {
    type Output = (Option<Lsn>, bool, apply::StoredProgress);
    async fn run(&mut self, target: &mut apply::Target) -> Result<Self::Output, apply::ApplyError> {
        let lsn = apply::read_source_lsn(&**target, self.slot).await?;
        let system = apply::read_source_system(&**target, self.slot).await?;
        // The row may be an asynchronous commit not yet flushed, this run's or an
        // earlier run's (which may have had another --synchronous-commit): it is made
        // durable before the pipeline skips what it covers, and before an idle
        // keepalive confirms the slot up to it.
        let flush_it = lsn.is_some();
        if flush_it {
            flush(target, self.slot)
                .await
                .map_err(|e| apply::ApplyError::new("flushing pg_end's WAL", e))?;
        }
        Ok((lsn, flush_it, system))
    }
}

impl PgEndDestination {
    /// An empty destination; it connects to pg_end on its first use.
    fn new(
        url: &str,
        slot: &str,
        synchronous_commit: SynchronousCommit,
        stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            pg_end: Arc::new(Mutex::new(PgEnd {
                driver: Driver::new(url).with_setup(format!(
                    "SET synchronous_commit = {}",
                    synchronous_commit.as_sql()
                )),
                slot: slot.to_string(),
                synchronous_commit,
                unflushed: None,
                stop,
            })),
            routed: None,
            columns: None,
            specs: Vec::new(),
            batch: ApplyBatch::default(),
            value_bytes: 0,
            txn: None,
            commit_times: Vec::new(),
            spill: None,
        }
    }

    /// A row or message that no record can be made of: a dead letter with its content.
    fn unroutable(&mut self, reason: &str, value: Vec<u8>) {
        tracing::warn!(error = %reason, "outbox row or message cannot be routed; dead-lettered");
        self.value_bytes += value.len();
        self.batch.dead_letters.push(DeadLetter {
            kind: DeadLetterKind::Unroutable,
            error: reason.to_string(),
            origin: Origin {
                source_lsn: self.txn.map(|t| t.commit_lsn),
                value: Some(value),
                ..Origin::default()
            },
        });
    }

    /// A routed record, taken by the inbox its topic feeds, as the sink would take it.
    fn routed_record(
        &mut self,
        inboxes: &mut Inboxes,
        rendered: Rendered<'_>,
        source: &str,
        whole: &dyn Fn() -> Vec<u8>,
    ) {
        let (topic, key, value, headers) = match rendered {
            Rendered::Dead { reason } => {
                return self.unroutable(&format!("{source}: {reason}"), whole());
            }
            Rendered::Record {
                topic,
                key,
                value,
                headers,
                ..
            } => (topic, key, value, headers),
        };
        let source_lsn = self.txn.map(|t| t.commit_lsn);
        self.value_bytes += 64 + value.as_ref().map_or(0, Vec::len) + key.map_or(0, <[u8]>::len);
        let origin = |value: Option<Vec<u8>>| Origin {
            topic: Some(Arc::from(topic.as_ref())),
            source_lsn,
            key: key.map(<[u8]>::to_vec),
            value,
            headers: headers.iter().copied().collect(),
            ..Origin::default()
        };
        let rejected = match inboxes.for_topic(&topic).map(|i| &i.kind) {
            None => crate::record::decode::Rejected {
                kind: DeadLetterKind::UnknownFormat,
                error: format!("no inbox takes records of topic {topic} ({source})"),
            },
            Some(InboxKind::Ledger(format)) => {
                match crate::record::decode::decode(*format, value.as_deref(), true) {
                    Ok(Decoded::Insert(record, _)) => {
                        self.batch.records.push((record, origin(None)));
                        return;
                    }
                    Ok(Decoded::Skip(_)) => return,
                    Err(rejected) => rejected,
                }
            }
            Some(InboxKind::Table {
                format,
                target,
                sources,
            }) => {
                let view = RecordView {
                    topic: &topic,
                    partition: None,
                    offset: None,
                    timestamp_ms: self
                        .txn
                        .and_then(|t| t.commit_time_micros)
                        .and_then(crate::record::pg_micros_to_utc)
                        .map(|t| t.timestamp_millis()),
                    key,
                    value: value.as_deref(),
                    headers: &headers,
                    lsn: source_lsn,
                };
                match inbox::extract(*format, sources, &view) {
                    Ok(Extracted::Event(values)) => {
                        let target = *target;
                        self.batch.events.push(Event {
                            target,
                            values,
                            origin: origin(value),
                        });
                        return;
                    }
                    Ok(Extracted::Skip(_)) => return,
                    Err(rejected) => rejected,
                }
            }
        };
        tracing::warn!(kind = %rejected.kind, error = %rejected.error, "outbox row cannot be applied; dead-lettered");
        self.batch.dead_letters.push(DeadLetter {
            kind: rejected.kind,
            error: rejected.error,
            origin: origin(value.or_else(|| Some(whole()))),
        });
    }

    fn dead_letter(&mut self, kind: DeadLetterKind, error: String, values: &[Option<&[u8]>]) {
        let mut value = Vec::new();
        encode::encode_row(&mut value, &self.specs, values.iter().copied());
        self.batch.dead_letters.push(DeadLetter {
            kind,
            error,
            origin: Origin {
                source_lsn: self.txn.map(|t| t.commit_lsn),
                value: Some(value),
                ..Origin::default()
            },
        });
    }
}

fn text<'a>(values: &[Option<&'a [u8]>], index: usize) -> Result<&'a str, String> {
    let bytes = values
        .get(index)
        .copied()
        .flatten()
        .ok_or_else(|| "is NULL".to_string())?;
    std::str::from_utf8(bytes).map_err(|_| "is not UTF-8".to_string())
}

fn integer(
    values: &[Option<&[u8]>],
    index: usize,
    name: &str,
) -> Result<i64, (DeadLetterKind, String)> {
    let value =
        text(values, index).map_err(|e| (DeadLetterKind::MissingField, format!("{name} {e}")))?;
    value.parse().map_err(|_| {
        (
            DeadLetterKind::InvalidValue,
            format!("{name} {value:?} is not a 64-bit integer"),
        )
    })
}

impl Destination for PgEndDestination {
    const STAGE: &'static str = "direct";

    async fn read_progress(&mut self, slot: &str) -> Result<Option<ProgressRecord>, PipelineError> {
        let mut guard = self.pg_end.lock().await;
        let pg_end = &mut *guard;
        let mut attempt = ReadProgress { slot };
        let mut session = ReadingProgress {
            stop: &pg_end.stop,
            released: false,
        };
        let read = pg_end.driver.run(&mut session, &mut attempt).await;
        if session.released {
            // A new session is starting: it takes the progress row, whatever
            // survived, as the truth, so commits in doubt are no error here.
            pg_end.unflushed = None;
        }
        match read {
            Ok((lsn, flushed, stored)) => {
                if flushed {
                    pg_end.unflushed = None;
                }
                let unreadable = |column: &str, error: serde_json::Error| {
                    PipelineError::Definite(format!(
                        "outbox_relay.direct_progress.{column} of slot {slot} is not \
                         readable ({error}): it was not written by this relay"
                    ))
                };
                let snapshot = stored
                    .snapshot
                    .map(|s| serde_json::from_str(&s))
                    .transpose()
                    .map_err(|e| unreadable("snapshot", e))?;
                let backfills = stored
                    .backfills
                    .map(|s| serde_json::from_str(&s))
                    .transpose()
                    .map_err(|e| unreadable("backfill", e))?
                    .unwrap_or_default();
                Ok(lsn.map(|lsn| ProgressRecord {
                    // The snapshot marker, and the snapshot's chunks, stand at 0/0.
                    state: if lsn.is_zero() {
                        ProgressState::Snapshot
                    } else {
                        ProgressState::Streaming
                    },
                    lsn: lsn.to_string(),
                    system_identifier: stored.system_identifier,
                    snapshot,
                    backfills,
                }))
            }
            Err(Ended::Stopped) => Err(PipelineError::Stopped),
            Err(ended) => Err(destination_error(
                "reading direct-mode progress from pg_end",
                ended.into(),
            )),
        }
    }

    fn set_columns(&mut self, table: usize, columns: &[ColumnDef]) -> Result<(), PipelineError> {
        if let Some(routed) = &mut self.routed {
            if let Some((route, bound)) = routed.tables.get_mut(table) {
                let made = routed.routes[*route].bind(columns);
                if let Some(problem) = made.unusable() {
                    tracing::error!(
                        problem,
                        "every row of this outbox becomes a dead letter in pg_end's \
                         outbox_relay.dead_letters until the route or the table is fixed"
                    );
                }
                *bound = Some(made);
            }
            return Ok(());
        }
        let find = |name: &str| {
            columns.iter().position(|c| c.name == name).ok_or_else(|| {
                PipelineError::Definite(format!(
                    "the outbox table has no column {name}; direct mode needs id, account_id, amount, created_at"
                ))
            })
        };
        self.columns = Some(Columns {
            id: find("id")?,
            account_id: find("account_id")?,
            amount: find("amount")?,
            created_at: find("created_at")?,
        });
        self.specs = columns
            .iter()
            .map(|c| ColumnSpec::new(&c.name, c.type_oid))
            .collect();
        Ok(())
    }

    fn begin_txn(&mut self, meta: TxnMeta) {
        self.txn = Some(OpenTxn {
            records: self.batch.records.len(),
            events: self.batch.events.len(),
            dead_letters: self.batch.dead_letters.len(),
            value_bytes: self.value_bytes,
            commit_lsn: meta.commit_lsn,
            commit_time_micros: meta.commit_time_micros,
        });
    }

    fn row(&mut self, table: usize, values: &[Option<&[u8]>]) {
        if let Some(mut routed) = self.routed.take() {
            if let Some((_, Some(bound))) = routed.tables.get(table) {
                let rendered = bound.render(values, None);
                let whole = || bound.row_json(values);
                let source = bound.source().to_string();
                self.routed_record(&mut routed.inboxes, rendered, &source, &whole);
            }
            self.routed = Some(routed);
            return;
        }
        let Some(c) = self.columns else {
            return;
        };
        let record = (|| {
            Ok::<_, (DeadLetterKind, String)>(TxnRecord {
                id: integer(values, c.id, "id")?,
                account_id: integer(values, c.account_id, "account_id")?,
                amount: text(values, c.amount)
                    .map_err(|e| (DeadLetterKind::MissingField, format!("amount {e}")))?
                    .to_string(),
                created_at: text(values, c.created_at)
                    .map_err(|e| (DeadLetterKind::MissingField, format!("created_at {e}")))?
                    .to_string(),
            })
        })();
        match record {
            Ok(record) => {
                self.value_bytes += 64 + record.amount.len() + record.created_at.len();
                self.batch.records.push((
                    record,
                    Origin {
                        source_lsn: self.txn.map(|t| t.commit_lsn),
                        ..Origin::default()
                    },
                ));
            }
            Err((kind, error)) => {
                tracing::warn!(%kind, %error, "outbox row cannot be applied; dead-lettered");
                self.dead_letter(kind, error, values);
            }
        }
    }

    fn message(&mut self, prefix: usize, content: &[u8], transactional: bool) {
        let Some(mut routed) = self.routed.take() else {
            return;
        };
        if let Some(route) = routed
            .messages
            .get(prefix)
            .map(|&i| routed.routes[i].clone())
        {
            let source = route.source.to_string();
            if !transactional {
                self.unroutable(
                    &format!(
                        "{source}: a non-transactional logical message: only \
                         pg_logical_emit_message(true, …) is relayed, inside the transaction \
                         that makes the change"
                    ),
                    content.to_vec(),
                );
            } else {
                match route::message_row(content) {
                    Ok((columns, values)) => {
                        let bound = route.bind(&columns);
                        let refs: Vec<Option<&[u8]>> =
                            values.iter().map(|v| v.as_deref()).collect();
                        let rendered = bound.render(&refs, Some(content));
                        self.routed_record(&mut routed.inboxes, rendered, &source, &|| {
                            content.to_vec()
                        });
                    }
                    Err(reason) => {
                        self.unroutable(&format!("{source}: {reason}"), content.to_vec())
                    }
                }
            }
        }
        self.routed = Some(routed);
    }

    fn end_txn(&mut self) {
        let micros = self.txn.take().and_then(|t| t.commit_time_micros);
        if let Some(micros) = micros.and_then(crate::pgoutput::unix_micros) {
            self.commit_times.push(micros);
        }
    }

    fn discard_txn(&mut self) {
        if let Some(txn) = self.txn.take() {
            self.batch.records.truncate(txn.records);
            self.batch.events.truncate(txn.events);
            self.batch.dead_letters.truncate(txn.dead_letters);
            self.value_bytes = txn.value_bytes;
        }
    }

    fn batch_size(&self) -> (usize, usize) {
        (
            self.batch.records.len() + self.batch.events.len() + self.batch.dead_letters.len(),
            self.value_bytes,
        )
    }

    fn spill(&mut self) -> impl Future<Output = Result<(), PipelineError>> + Send + 'static {
        let mut batch = std::mem::take(&mut self.batch);
        if let Some(routed) = &self.routed {
            batch.tables = routed.inboxes.tables.clone();
        }
        self.value_bytes = 0;
        // What the open source transaction held is the open pg_end transaction's now.
        if let Some(txn) = &mut self.txn {
            txn.records = 0;
            txn.events = 0;
            txn.dead_letters = 0;
            txn.value_bytes = 0;
        }
        let tables = batch.tables.clone();
        let pg_end = &self.pg_end;
        self.spill
            .get_or_insert_with(|| spill::Spill::start(Arc::clone(pg_end), tables))
            .part(batch)
    }

    async fn abandon(&mut self) {
        if let Some(spill) = self.spill.take() {
            spill.abandon().await;
        }
    }

    fn clear(&mut self) {
        self.batch = ApplyBatch::default();
        self.value_bytes = 0;
        self.txn = None;
        self.commit_times.clear();
        // Dropped, an open spilled transaction is rolled back.
        self.spill = None;
    }

    fn commit(
        &mut self,
        slot: &str,
        progress: &ProgressRecord,
    ) -> impl Future<Output = Result<Committed, PipelineError>> + Send + 'static {
        let mut batch = std::mem::take(&mut self.batch);
        if let Some(routed) = &self.routed {
            batch.tables = routed.inboxes.tables.clone();
        }
        batch.progress = Progress::SourceLsn {
            slot: slot.to_string(),
            commit_lsn: progress.lsn().unwrap_or(Lsn::ZERO),
            system_identifier: progress.system_identifier.clone(),
            snapshot: progress
                .snapshot
                .as_ref()
                .map(|s| serde_json::to_string(s).unwrap_or_default()),
            backfills: (!progress.backfills.is_empty())
                .then(|| serde_json::to_string(&progress.backfills).unwrap_or_default()),
        };
        self.value_bytes = 0;
        let commit_times = std::mem::take(&mut self.commit_times);
        let pg_end = Arc::clone(&self.pg_end);
        let spilled = self.spill.take();
        async move {
            let committed = match spilled {
                Some(spill) => spill.commit(batch).await?,
                None => pg_end.lock().await.apply(&batch).await?,
            };
            crate::metrics::record_latencies(Self::STAGE, &commit_times);
            Ok(committed)
        }
    }

    fn sync(&mut self) -> impl Future<Output = Result<Lsn, PipelineError>> + Send + 'static {
        let pg_end = Arc::clone(&self.pg_end);
        async move { pg_end.lock().await.sync().await }
    }
}

/// Runs [`FLUSH_WRITE`] on `client` and returns pg_end's flush position after it.
async fn flush(client: &mut apply::Target, slot: &str) -> Result<Lsn, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL synchronous_commit = local")
        .await?;
    tx.execute(FLUSH_WRITE, &[&slot]).await?;
    tx.commit().await?;
    let (_, flushed) = wal_positions(client).await?;
    Ok(flushed)
}

/// pg_end's WAL insert and flush positions.
async fn wal_positions(client: &apply::Target) -> Result<(Lsn, Lsn), tokio_postgres::Error> {
    let row = client.query_one(WAL_POSITIONS, &[]).await?;
    let lsn = |i: usize| row.try_get::<_, PgLsn>(i).map(|lsn| Lsn(u64::from(lsn)));
    Ok((lsn(0)?, lsn(1)?))
}

impl PgEnd {
    /// Applies `batch` through the driver: transient failures are retried (on a new
    /// connection, unless that would put an earlier commit in doubt, which ends the
    /// session instead) until it is committed or a stop.
    async fn apply(&mut self, batch: &ApplyBatch) -> Result<Committed, PipelineError> {
        let mut attempt = ApplyAndRead {
            batch,
            asynchronous: self.asynchronous(),
            tried: false,
        };
        // `unflushed` stays as it was until an attempt succeeds: if a failed attempt's
        // commit happened and is lost, the retry (on whichever connection) applies the
        // batch again.
        let mut session = Applying {
            stop: &self.stop,
            unflushed: self.unflushed,
        };
        let (outcome, committed) = match self.driver.run(&mut session, &mut attempt).await {
            // What must be flushed for the batch to be durable.
            Ok((outcome, Some((needed, flushed)))) => {
                self.unflushed = (flushed < needed).then_some(needed);
                let committed = Committed {
                    flush_needed: Some(needed),
                    flushed,
                };
                (outcome, committed)
            }
            Ok((outcome, None)) => (outcome, Committed::DURABLE),
            Err(Ended::Stopped) => return Err(PipelineError::Stopped),
            Err(Ended::InDoubt(_)) => return Err(self.in_doubt()),
            Err(Ended::Failed(failure)) => {
                return Err(destination_error("applying to pg_end", failure))
            }
        };
        if outcome.dead_letters > 0 {
            tracing::warn!(
                dead_letters = outcome.dead_letters,
                "rows dead-lettered in pg_end"
            );
        }
        tracing::debug!(
            inserted = outcome.inserted,
            duplicates = outcome.duplicates,
            "applied"
        );
        Ok(committed)
    }

    /// Makes every commit on the connection durable; returns pg_end's flush position.
    /// Never on a new connection: its position would say nothing about the commits
    /// made on the one before.
    async fn sync(&mut self) -> Result<Lsn, PipelineError> {
        let slot = self.slot.clone();
        let Some(client) = self.driver.current() else {
            return Err(self.in_doubt());
        };
        match tokio::time::timeout(apply::APPLY_TIMEOUT, flush(client, &slot)).await {
            Ok(Ok(flushed)) => {
                if self.unflushed.is_some_and(|needed| flushed >= needed) {
                    self.unflushed = None;
                }
                Ok(flushed)
            }
            Ok(Err(error)) if error::pg::classify(&error) == ErrorClass::Definite => {
                Err(PipelineError::Destination {
                    context: "flushing pg_end's WAL".into(),
                    class: ErrorClass::Definite,
                    source: Box::new(error),
                })
            }
            // A transient failure or a timeout: the commits in doubt go with the
            // connection.
            _ => Err(self.in_doubt()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destination() -> PgEndDestination {
        let (_, stop) = watch::channel(false);
        let mut d = PgEndDestination::new(
            "postgres://127.0.0.1:1/db_end",
            "slot",
            SynchronousCommit::Off,
            stop,
        );
        let column = |name: &str, type_oid| ColumnDef {
            name: name.into(),
            type_oid,
            key: name == "id",
        };
        d.set_columns(
            0,
            &[
                column("id", 20),
                column("account_id", 20),
                column("amount", 1700),
                column("created_at", 1114),
            ],
        )
        .unwrap();
        d
    }

    /// One source transaction of one row; an `id` that is not an integer makes the row
    /// a dead letter.
    fn txn(d: &mut PgEndDestination, lsn: u64, id: &str) {
        d.begin_txn(TxnMeta {
            commit_lsn: Lsn(lsn),
            xid: Some(lsn as u32),
            commit_time_micros: Some(lsn as i64),
        });
        d.row(
            0,
            &[
                Some(id.as_bytes()),
                Some(b"7"),
                Some(b"-12.50"),
                Some(b"2025-07-23 20:06:21.085330"),
            ],
        );
    }

    #[test]
    fn a_new_session_starts_from_an_empty_batch() {
        let mut d = destination();
        // What a broken session leaves behind: a complete transaction, a dead letter,
        // and an open transaction.
        txn(&mut d, 100, "1");
        d.end_txn();
        txn(&mut d, 200, "not a number");
        d.end_txn();
        txn(&mut d, 300, "3");
        assert_eq!(d.batch.records.len(), 2);
        assert_eq!(d.batch.dead_letters.len(), 1);

        d.clear();
        assert_eq!(d.batch_size(), (0, 0));

        // The next session's transactions are the batch, alone, with their own times.
        txn(&mut d, 400, "4");
        d.end_txn();
        let after_one = d.batch_size();
        txn(&mut d, 500, "5");
        d.discard_txn();
        assert_eq!(d.batch_size(), after_one);
        let ids: Vec<i64> = d.batch.records.iter().map(|(r, _)| r.id).collect();
        assert_eq!(ids, [4]);
        assert_eq!(d.batch.records[0].1.source_lsn, Some(Lsn(400)));
        assert!(d.batch.dead_letters.is_empty());
        assert_eq!(
            d.commit_times,
            [400 + crate::pgoutput::PG_EPOCH_UNIX_MICROS]
        );
    }
}
