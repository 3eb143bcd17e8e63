//! The one way rows reach pg_end: a batch of source transactions, the dead letters
//! that came with it and the progress marker that covers both, applied in ONE pg_end
//! database transaction, set-based.
//!
//! Invariant: a source transaction is counted in `main.balance` exactly once, however
//! often its record is applied. The transaction id is the idempotency key: a row is
//! inserted into `main.transactions` with `ON CONFLICT (id) DO NOTHING`, and only the
//! rows that this very statement inserted (its `RETURNING`) are added to the balances.
//! A record whose id is already there with other content is a `conflict` dead letter,
//! never an overwrite. The progress marker (Kafka offsets or a source LSN) is written
//! in the same transaction and only ever moves forward, so replaying a batch, applying
//! it from two processes at once, or crashing at any instant changes nothing.
//!
//! The common case is cheaper: a batch is first inserted with a binary `COPY` (no
//! speculative insertion, nothing returned, values sent in [`binary`] form), which
//! either inserts every row, so the balances are credited from the input (summed per
//! account in Rust, [`credit`]), or fails as a whole with `unique_violation`; then the
//! transaction starts over and the batch takes the `ON CONFLICT` path above. Either
//! way a row is credited exactly when this transaction inserted it.
//!
//! ```text
//!   ApplyBatch ──validate (Rust)──► records ok ─┬─► COPY; balance += Rust-summed credits
//!       │                                       │   └─unique_violation─► start over with:
//!       │                                       ├─► INSERT transactions ON CONFLICT DO NOTHING
//!       │                                       │        └─RETURNING─► balance += per account
//!       │                                       └─► not inserted: compare with pg_end's row
//!       │                                               same = duplicate, else = conflict
//!       └── dead letters (given + invalid + conflicts) ─► outbox_relay.dead_letters
//!       └── progress ─► sink_offsets / direct_progress   (GREATEST: forward only)
//!                                         all of it: one transaction, then COMMIT
//! ```
//!
//! # One bad record never blocks a batch
//! Values PostgreSQL would refuse (a non-numeric amount, an impossible date) are caught
//! in Rust by [`validate`] and become dead letters before any SQL runs. If the batch
//! still fails with a definite error, something unforeseen is wrong with one record:
//! the transaction starts over and the batch is bisected under savepoints until the
//! record is isolated and dead-lettered as `apply_failed`; the rest is applied.
//! Errors on the bookkeeping statements themselves are returned as they are.
//!
//! # Deadlocks
//! Two appliers that touch the same ids or accounts lock them in the same order: the
//! rows are inserted sorted by id, the balances upserted sorted by account, the
//! progress rows sorted by (topic, partition). A deadlock that still happens is a
//! transient error: the caller retries the batch.
//!
//! # Dead letters are written once per origin
//! A unique index on `(topic, partition, kafka_offset)` makes a replayed Kafka record's
//! dead letter a no-op. Dead letters without a Kafka origin (direct mode) have no such
//! key and would be written again if their batch were applied twice.
//!
//! # Retries
//! [`apply`] makes one attempt. Its callers (sink, direct mode, reconcile) retry
//! through the one [`Driver`]: timeout, reconnect, backoff, and the transient/definite
//! split of [`crate::error`].

pub mod binary;
pub mod credit;
pub mod driver;
pub mod table;
pub mod validate;

pub use driver::{Driver, APPLY_TIMEOUT};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use futures_util::SinkExt;
use thiserror::Error;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient, Statement, Transaction};

use crate::error::{self, ErrorClass};
use crate::lsn::Lsn;

/// One source transaction, as it is to be written to pg_end's `main.transactions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnRecord {
    /// The client-made id: the idempotency key of the whole pipeline.
    pub id: i64,
    pub account_id: i64,
    /// Exact decimal text (`-50`, `12.30`, `1.5e2`); never went through a float.
    pub amount: String,
    /// `timestamp without time zone` text in a form PostgreSQL accepts
    /// (`2025-07-23 20:06:21.085330`).
    pub created_at: String,
}

/// Where a record came from: kept with each record so that a dead letter made of it
/// (now or after a conflict is found) carries its raw bytes and origin.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Origin {
    /// Shared by the records of a topic: a clone is a reference count, not a copy.
    pub topic: Option<Arc<str>>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    /// The source commit LSN, when known (direct mode, or the connector's header).
    pub source_lsn: Option<Lsn>,
    /// Raw record key, as received.
    pub key: Option<Vec<u8>>,
    /// Raw record value, as received.
    pub value: Option<Vec<u8>>,
    /// Record headers, as received.
    pub headers: Headers,
}

/// A record's headers, kept as received in one buffer (one allocation per record, not
/// one per header) and rendered as JSON only when a dead letter is written.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    /// Per header: key length (u32 LE), key, value length (u32 LE, `u32::MAX` for
    /// none), value.
    buf: Vec<u8>,
}

impl Headers {
    /// Room for `bytes` of keys and values without growing (8 more per header).
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            buf: Vec::with_capacity(bytes),
        }
    }

    pub fn push(&mut self, key: &str, value: Option<&[u8]>) {
        // Kafka bounds a record (headers included) far below 4 GiB.
        let len = |n: usize| (n as u32).to_le_bytes();
        self.buf.extend_from_slice(&len(key.len()));
        self.buf.extend_from_slice(key.as_bytes());
        match value {
            Some(value) => {
                self.buf.extend_from_slice(&len(value.len()));
                self.buf.extend_from_slice(value);
            }
            None => self.buf.extend_from_slice(&u32::MAX.to_le_bytes()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        fn take<'b>(rest: &mut &'b [u8], n: usize) -> Option<&'b [u8]> {
            let (head, tail) = rest.split_at_checked(n)?;
            *rest = tail;
            Some(head)
        }
        fn len(rest: &mut &[u8]) -> Option<u32> {
            Some(u32::from_le_bytes(take(rest, 4)?.try_into().ok()?))
        }
        let mut rest = self.buf.as_slice();
        std::iter::from_fn(move || {
            let key_len = len(&mut rest)? as usize;
            // Keys were pushed as &str.
            let key = std::str::from_utf8(take(&mut rest, key_len)?).unwrap_or_default();
            let value = match len(&mut rest)? {
                u32::MAX => None,
                n => Some(take(&mut rest, n as usize)?),
            };
            Some((key, value))
        })
    }

    /// `[{"key": …, "value": …}]` as stored in `dead_letters.headers`, `null` if none.
    pub fn to_json(&self) -> serde_json::Value {
        headers_json(self.iter())
    }
}

/// Record headers as stored in `dead_letters.headers`: `[{"key": …, "value": …}]`, a
/// value as a string when it is UTF-8, else `{"hex": …}`, `null` when absent.
fn headers_json<'a>(
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> serde_json::Value {
    let list: Vec<serde_json::Value> = headers
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                None => serde_json::Value::Null,
                Some(bytes) => match std::str::from_utf8(bytes) {
                    Ok(text) => serde_json::Value::from(text),
                    Err(_) => {
                        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                        serde_json::json!({ "hex": hex })
                    }
                },
            };
            serde_json::json!({ "key": key, "value": value })
        })
        .collect();
    if list.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::Value::Array(list)
    }
}

impl<'a> FromIterator<(&'a str, Option<&'a [u8]>)> for Headers {
    fn from_iter<I: IntoIterator<Item = (&'a str, Option<&'a [u8]>)>>(headers: I) -> Self {
        let mut all = Headers::default();
        for (key, value) in headers {
            all.push(key, value);
        }
        all
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Why a record was not applied. Stored as text in `outbox_relay.dead_letters.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterKind {
    /// The value is not JSON (or not UTF-8, or empty).
    InvalidJson,
    /// A required field is absent or `null`.
    MissingField,
    /// A field has the wrong JSON type (an object for an id, a boolean for an amount).
    WrongType,
    /// A field has the right type but a value pg_end cannot hold (a non-numeric amount,
    /// an impossible date, an id beyond 64 bits).
    InvalidValue,
    /// JSON of no known record format.
    UnknownFormat,
    /// The value is larger than the sink accepts.
    Oversized,
    /// The record has no value at all (a tombstone) where one is required.
    EmptyValue,
    /// The id is already in pg_end (or earlier in the batch) with different content.
    Conflict,
    /// PostgreSQL refused the record for a reason the checks did not foresee.
    ApplyFailed,
    /// An inbox's handler raised an error for this event (the event was not applied).
    HandlerFailed,
    /// Direct mode: a route cannot make a record of the row or message (a NULL id, key
    /// or topic column, a non-transactional message; see the routes).
    Unroutable,
}

impl DeadLetterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::MissingField => "missing_field",
            Self::WrongType => "wrong_type",
            Self::InvalidValue => "invalid_value",
            Self::UnknownFormat => "unknown_format",
            Self::Oversized => "oversized",
            Self::EmptyValue => "empty_value",
            Self::Conflict => "conflict",
            Self::ApplyFailed => "apply_failed",
            Self::HandlerFailed => "handler_failed",
            Self::Unroutable => "unroutable",
        }
    }
}

impl fmt::Display for DeadLetterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A record that is kept instead of applied, with why and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub kind: DeadLetterKind,
    /// What is wrong, precise enough for a person; never the row's values.
    pub error: String,
    pub origin: Origin,
}

/// How far the applied batch reaches in its input; stored with the rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Progress {
    /// The last offset consumed (applied, skipped or dead-lettered) per partition.
    KafkaOffsets(Vec<KafkaOffset>),
    /// Direct mode: the commit LSN of the last source transaction in the batch.
    /// With pg_start's system identifier (see [`crate::progress::ProgressRecord`]).
    SourceLsn {
        slot: String,
        commit_lsn: Lsn,
        system_identifier: Option<String>,
        /// The initial snapshot's progress, as JSON (`crate::progress::SnapshotProgress`).
        snapshot: Option<String>,
        /// The on-demand backfills, as JSON (a list of
        /// `crate::progress::BackfillProgress`).
        backfills: Option<String>,
    },
    /// Nothing to record (tests, manual repairs).
    #[default]
    None,
}

/// The last offset consumed in one partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KafkaOffset {
    pub topic: String,
    pub partition: i32,
    pub last_offset: i64,
}

/// What one pg_end transaction applies.
#[derive(Debug, Clone, Default)]
pub struct ApplyBatch {
    /// The ledger's records. In input order: for repeated ids, the first occurrence wins.
    pub records: Vec<(TxnRecord, Origin)>,
    /// The generic inboxes' events, each naming its target in `tables`.
    pub events: Vec<table::Event>,
    /// The generic inboxes' tables (shared by the batches of a run).
    pub tables: Arc<[table::TableTarget]>,
    /// Records already known to be bad (unparsable input).
    pub dead_letters: Vec<DeadLetter>,
    pub progress: Progress,
    /// The dead letters made while applying (events pg_end or a handler refuses) are
    /// returned in [`ApplyOutcome::apart`] instead of written: `reconcile` reports
    /// them, rather than adding one more dead letter per run for the same event.
    pub dead_letters_apart: bool,
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplyOutcome {
    /// New rows in `main.transactions`, each added to its account's balance.
    pub inserted: u64,
    /// Records whose id was already applied with the same content (in pg_end or
    /// earlier in the batch): nothing changed.
    pub duplicates: u64,
    /// Records whose id was already there with other content (also dead letters).
    pub conflicts: u64,
    /// Dead letters of this batch: given, invalid values, conflicts, apply failures.
    pub dead_letters: u64,
    /// Of those, how many were new (a replayed record's dead letter is already there).
    pub dead_letters_written: u64,
    /// Whether a definite error made the batch be bisected.
    pub bisected: bool,
    /// With [`ApplyBatch::dead_letters_apart`]: the dead letters made, not written.
    pub apart: Vec<DeadLetter>,
}

/// Why a batch could not be applied; nothing of it was committed.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// pg_end is unreachable, restarting, or a deadlock/serialization failure: retry.
    #[error("pg_end unavailable while {step}")]
    Transient {
        step: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// pg_end refused a bookkeeping statement (missing schema, permissions, a wrong
    /// password): a person must look. Record content never causes this; it is bisected
    /// into dead letters.
    #[error("pg_end refused the relay while {step}{}", what_to_do(source))]
    Definite {
        step: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// An inbox's statement cannot work for any event (see [`table`]): a person must
    /// fix the configuration or the table.
    #[error("inbox {inbox}: the statement failed while {statement}: {message}")]
    Statement {
        inbox: String,
        statement: &'static str,
        message: String,
    },
}

/// What a person does about pg_end refusing the relay for good, by the server's
/// SQLSTATE, as a parenthesis to append to the error; empty where the error says it
/// all. (`status` appends it to its pg_end part too.)
pub fn what_to_do(error: &tokio_postgres::Error) -> &'static str {
    use tokio_postgres::error::SqlState;
    let Some(code) = error.code() else {
        return "";
    };
    if [
        SqlState::UNDEFINED_TABLE,
        SqlState::UNDEFINED_COLUMN,
        SqlState::UNDEFINED_FUNCTION,
        SqlState::INVALID_SCHEMA_NAME,
    ]
    .contains(code)
    {
        " (pg_end lacks the relay's schema, or has an older one: run `outbox-relay migrate`, \
         or `outbox-relay migrate --relay-only` where pg_end holds your own inboxes)"
    } else if *code == SqlState::INVALID_PASSWORD
        || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    {
        " (check the user and password of --target-url, and pg_end's pg_hba.conf)"
    } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
        " (grant the relay's role what sql/roles.sql grants)"
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        " (the database of --target-url does not exist: create it, then run \
         `outbox-relay migrate`)"
    } else {
        ""
    }
}

impl ApplyError {
    pub fn new(step: &'static str, source: tokio_postgres::Error) -> Self {
        match error::pg::classify(&source) {
            ErrorClass::Transient => Self::Transient { step, source },
            ErrorClass::Definite => Self::Definite { step, source },
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Transient { .. } => ErrorClass::Transient,
            Self::Definite { .. } | Self::Statement { .. } => ErrorClass::Definite,
        }
    }
}

/// Inserts the rows, then credits only the rows this statement inserted, aggregated
/// per account. Input sorted by id and accounts upserted in order: a fixed lock order.
const INSERT_RECORDS: &str = "\
WITH input AS (
    SELECT * FROM unnest($1::int8[], $2::int8[], $3::numeric[], $4::timestamp[])
        AS i(id, account_id, amount, created_at)
), inserted AS (
    INSERT INTO main.transactions AS t (id, account_id, amount, created_at)
    SELECT id, account_id, amount, created_at FROM input ORDER BY id
    ON CONFLICT (id) DO NOTHING
    RETURNING t.id, t.account_id, t.amount, t.created_at
), credited AS (
    INSERT INTO main.balance AS b (account_id, current_balance, updated_at)
    SELECT account_id, sum(amount), max(created_at) FROM inserted
    GROUP BY account_id ORDER BY account_id
    ON CONFLICT (account_id) DO UPDATE
        SET current_balance = b.current_balance + EXCLUDED.current_balance,
            updated_at = GREATEST(b.updated_at, EXCLUDED.updated_at)
)
SELECT id FROM inserted";

/// The common case: none of the ids is in pg_end yet. A binary `COPY` either inserts
/// every row or fails as a whole with `unique_violation` (then [`INSERT_RECORDS`] runs
/// instead), so the balances are then credited from the input itself
/// ([`CREDIT_BALANCES`]). About half the cost of the `ON CONFLICT … RETURNING` form: no
/// speculative insertion, no rows returned, a page's rows inserted at once. Lock order as
/// there: the rows, then the balances.
const COPY_RECORDS: &str =
    "COPY main.transactions (id, account_id, amount, created_at) FROM STDIN (FORMAT binary)";

/// Credits the rows [`COPY_RECORDS`] inserted, aggregated per account, in account order,
/// from the partial sums [`credit::credits`] made of them (about one per account).
const CREDIT_BALANCES: &str = "\
INSERT INTO main.balance AS b (account_id, current_balance, updated_at)
SELECT account_id, sum(amount), max(created_at)
FROM unnest($1::int8[], $2::numeric[], $3::timestamp[]) AS i(account_id, amount, created_at)
GROUP BY account_id ORDER BY account_id
ON CONFLICT (account_id) DO UPDATE
    SET current_balance = b.current_balance + EXCLUDED.current_balance,
        updated_at = GREATEST(b.updated_at, EXCLUDED.updated_at)";

/// For ids the insert skipped: is pg_end's row the same? A separate statement, so that
/// under READ COMMITTED it sees a row a concurrent applier committed after the insert
/// statement's snapshot was taken (the insert waited for it, then skipped).
const COMPARE_EXISTING: &str = "\
SELECT x.id, t.id IS NOT NULL,
       t.account_id = x.account_id, t.amount = x.amount, t.created_at = x.created_at
FROM unnest($1::int8[], $2::int8[], $3::numeric[], $4::timestamp[])
    AS x(id, account_id, amount, created_at)
LEFT JOIN main.transactions t ON t.id = x.id";

const INSERT_DEAD_LETTERS: &str = "\
INSERT INTO outbox_relay.dead_letters
    (kind, error, topic, partition, kafka_offset, source_lsn, record_key, record_value, headers)
SELECT kind, error, topic, partition, kafka_offset, source_lsn::pg_lsn, record_key, record_value,
       headers::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[], $6::text[], $7::bytea[],
            $8::bytea[], $9::text[])
    AS d(kind, error, topic, partition, kafka_offset, source_lsn, record_key, record_value, headers)
ON CONFLICT (topic, partition, kafka_offset) DO NOTHING";

const UPSERT_KAFKA_OFFSETS: &str = "\
INSERT INTO outbox_relay.sink_offsets AS s (topic, partition, last_offset, updated_at)
SELECT topic, partition, last_offset, now()
FROM unnest($1::text[], $2::int4[], $3::int8[]) AS p(topic, partition, last_offset)
ORDER BY topic, partition
ON CONFLICT (topic, partition) DO UPDATE
    SET last_offset = EXCLUDED.last_offset, updated_at = EXCLUDED.updated_at
    WHERE EXCLUDED.last_offset > s.last_offset";

const UPSERT_SOURCE_LSN: &str = "\
INSERT INTO outbox_relay.direct_progress AS d
    (slot_name, commit_lsn, system_identifier, snapshot, backfill, updated_at)
VALUES ($1, $2::text::pg_lsn, $3, $4, $5, now())
ON CONFLICT (slot_name) DO UPDATE
    SET commit_lsn = EXCLUDED.commit_lsn, updated_at = EXCLUDED.updated_at,
        system_identifier = coalesce(EXCLUDED.system_identifier, d.system_identifier),
        snapshot = EXCLUDED.snapshot, backfill = EXCLUDED.backfill
    WHERE EXCLUDED.commit_lsn > d.commit_lsn
       OR (EXCLUDED.commit_lsn = '0/0' AND d.commit_lsn = '0/0')
       OR (EXCLUDED.commit_lsn = d.commit_lsn AND EXCLUDED.backfill IS DISTINCT FROM d.backfill)";

const READ_KAFKA_OFFSETS: &str = "\
SELECT s.topic, s.partition, s.last_offset
FROM outbox_relay.sink_offsets s
JOIN unnest($1::text[], $2::int4[]) AS p(topic, partition)
    ON p.topic = s.topic AND p.partition = s.partition";

const READ_SOURCE_LSN: &str =
    "SELECT commit_lsn::text FROM outbox_relay.direct_progress WHERE slot_name = $1";

const READ_SOURCE_SYSTEM: &str = "SELECT system_identifier, snapshot, backfill \
    FROM outbox_relay.direct_progress WHERE slot_name = $1";

/// A pg_end connection with the apply statements prepared on it: parsed and planned
/// once per connection instead of once per batch (planning the insert alone took
/// ~2 ms of a 5,000-row batch's ~12). Derefs to the client for everything else.
pub struct Target {
    client: Client,
    statements: Option<Statements>,
    /// The generic inboxes' statements, for the batch's `tables` they were made for.
    tables: Option<PreparedTables>,
}

/// Inbox tables and their statements prepared on one connection.
type PreparedTables = (Arc<[table::TableTarget]>, Arc<[table::TableStatements]>);

/// The prepared forms of the statements above (cheap to clone: reference counted).
#[derive(Clone)]
struct Statements {
    /// The ledger's, prepared for the first batch with ledger records: a pg_end without
    /// the ledger's tables (`migrate --relay-only`) serves the generic inboxes.
    ledger: Option<Ledger>,
    insert_dead_letters: Statement,
    upsert_kafka_offsets: Statement,
    upsert_source_lsn: Statement,
}

/// The ledger's prepared statements (`main.transactions`, `main.balance`).
#[derive(Clone)]
struct Ledger {
    copy_records: Statement,
    credit_balances: Statement,
    insert_records: Statement,
    compare_existing: Statement,
}

impl Ledger {
    /// Prepared on `client` (pipelined: one round trip).
    async fn prepare(client: &impl GenericClient) -> Result<Self, ApplyError> {
        let (copy_records, credit_balances, insert_records, compare_existing) = tokio::try_join!(
            client.prepare(COPY_RECORDS),
            client.prepare(CREDIT_BALANCES),
            client.prepare(INSERT_RECORDS),
            client.prepare(COMPARE_EXISTING),
        )
        .map_err(|e| ApplyError::new("preparing the ledger's statements", e))?;
        Ok(Self {
            copy_records,
            credit_balances,
            insert_records,
            compare_existing,
        })
    }
}

impl Statements {
    /// The ledger's statements, which [`Target::statements`] prepared for a batch with
    /// ledger records.
    fn ledger(&self) -> Result<&Ledger, ApplyError> {
        self.ledger.as_ref().ok_or_else(|| ApplyError::Statement {
            inbox: "ledger".into(),
            statement: "applying the records",
            message: "the ledger's statements were not prepared".into(),
        })
    }
}

impl Target {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            statements: None,
            tables: None,
        }
    }

    /// The prepared statements, prepared on first use (pipelined: one round trip),
    /// the ledger's too when `ledger` is set.
    async fn statements(&mut self, ledger: bool) -> Result<Statements, ApplyError> {
        let c = &self.client;
        let statements = match &mut self.statements {
            Some(statements) => statements,
            None => {
                let (insert_dead_letters, upsert_kafka_offsets, upsert_source_lsn) =
                    tokio::try_join!(
                        c.prepare(INSERT_DEAD_LETTERS),
                        c.prepare(UPSERT_KAFKA_OFFSETS),
                        c.prepare(UPSERT_SOURCE_LSN),
                    )
                    .map_err(|e| ApplyError::new("preparing the statements", e))?;
                self.statements.insert(Statements {
                    ledger: None,
                    insert_dead_letters,
                    upsert_kafka_offsets,
                    upsert_source_lsn,
                })
            }
        };
        if ledger && statements.ledger.is_none() {
            statements.ledger = Some(Ledger::prepare(c).await?);
        }
        Ok(statements.clone())
    }
}

impl Target {
    /// The statements of `tables` on this connection, prepared on first use.
    async fn table_statements(
        &mut self,
        tables: &Arc<[table::TableTarget]>,
    ) -> Result<Arc<[table::TableStatements]>, ApplyError> {
        if let Some((known, statements)) = &self.tables {
            if Arc::ptr_eq(known, tables) {
                return Ok(statements.clone());
            }
        }
        let mut prepared = Vec::with_capacity(tables.len());
        for target in tables.iter() {
            prepared.push(
                target
                    .statements(&self.client)
                    .await
                    .map_err(|e| ApplyError::new("preparing the inbox statements", e))?,
            );
        }
        let prepared: Arc<[table::TableStatements]> = Arc::from(prepared);
        self.tables = Some((tables.clone(), prepared.clone()));
        Ok(prepared)
    }
}

impl std::ops::Deref for Target {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Target {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// Applies `batch` in one pg_end transaction; see the module documentation.
///
/// On `Err`, nothing was committed (or, if the connection broke during `COMMIT`, the
/// outcome is unknown, which is why applying the same batch again must be, and is,
/// harmless). The caller retries transient errors with the same batch.
pub async fn apply(target: &mut Target, batch: &ApplyBatch) -> Result<ApplyOutcome, ApplyError> {
    match apply_once(target, batch, false).await? {
        Some(outcome) => Ok(outcome),
        // A generic inbox's events failed as a whole: again, part by part.
        None => apply_once(target, batch, true)
            .await?
            .ok_or_else(unreachable_plain),
    }
}

/// A pg_end transaction left open across batches, so that one source transaction too
/// large to hold in memory is applied part by part and still committed atomically
/// (direct mode's spilled batches, [`crate::pipeline`] "Large source transactions").
/// Each part is applied as [`apply`] applies a batch, under a savepoint instead of a
/// transaction of its own; only [`OpenApply::commit`] makes any of it visible. Dropped
/// without it, everything is rolled back.
pub struct OpenApply<'t> {
    tx: Transaction<'t>,
    statements: Statements,
    tables: Option<Arc<[table::TableStatements]>>,
    /// The ledger's credits of every part, sent once at the commit.
    credits: credit::Deferred,
}

impl Target {
    /// Begins a transaction whose batches may hold events of `tables`.
    pub async fn open(
        &mut self,
        tables: &Arc<[table::TableTarget]>,
    ) -> Result<OpenApply<'_>, ApplyError> {
        let statements = self.statements(false).await?;
        let tables = if tables.is_empty() {
            None
        } else {
            Some(self.table_statements(tables).await?)
        };
        let tx = begin(&mut self.client).await?;
        Ok(OpenApply {
            tx,
            statements,
            tables,
            credits: credit::Deferred::default(),
        })
    }
}

impl OpenApply<'_> {
    /// Applies one part (its progress too, if it has one). An error leaves the
    /// transaction unusable: drop it.
    pub async fn apply(&mut self, batch: &ApplyBatch) -> Result<ApplyOutcome, ApplyError> {
        if !batch.records.is_empty() && self.statements.ledger.is_none() {
            self.statements.ledger = Some(Ledger::prepare(&self.tx).await?);
        }
        let tables = self.tables.as_deref();
        let credits = Some(&mut self.credits);
        match apply_in(
            &mut self.tx,
            &self.statements,
            tables,
            batch,
            false,
            credits,
        )
        .await?
        {
            Some(outcome) => Ok(outcome),
            None => apply_in(
                &mut self.tx,
                &self.statements,
                tables,
                batch,
                true,
                Some(&mut self.credits),
            )
            .await?
            .ok_or_else(unreachable_plain),
        }
    }

    /// Credits the balances with every part's new rows, then commits.
    pub async fn commit(self) -> Result<(), ApplyError> {
        if !self.credits.is_empty() {
            credit_balances(&self.tx, self.statements.ledger()?, &self.credits.credits())
                .await
                .map_err(|e| ApplyError::new("crediting the balances", e))?;
        }
        self.tx
            .commit()
            .await
            .map_err(|e| ApplyError::new("committing", e))
    }
}

/// `careful` is never answered with "again" (it bisects); this is its type's other arm.
fn unreachable_plain() -> ApplyError {
    ApplyError::Statement {
        inbox: "(any)".into(),
        statement: "applying the events",
        message: "the careful attempt asked for another one".into(),
    }
}

/// One transaction on `target`: see [`apply_in`].
async fn apply_once(
    target: &mut Target,
    batch: &ApplyBatch,
    careful: bool,
) -> Result<Option<ApplyOutcome>, ApplyError> {
    let statements = target.statements(!batch.records.is_empty()).await?;
    let table_statements = if batch.events.is_empty() {
        None
    } else {
        Some(target.table_statements(&batch.tables).await?)
    };
    apply_in(
        &mut target.client,
        &statements,
        table_statements.as_deref(),
        batch,
        careful,
        None,
    )
    .await
}

/// Where [`apply_in`] opens its transaction: a connection's own, or a savepoint of a
/// transaction left open ([`OpenApply`]).
#[allow(async_fn_in_trait)]
trait Scope {
    async fn begin(&mut self) -> Result<Transaction<'_>, ApplyError>;
}

impl Scope for Client {
    async fn begin(&mut self) -> Result<Transaction<'_>, ApplyError> {
        begin(self).await
    }
}

impl Scope for Transaction<'_> {
    async fn begin(&mut self) -> Result<Transaction<'_>, ApplyError> {
        self.savepoint("apply_batch")
            .await
            .map_err(|e| ApplyError::new("setting a savepoint", e))
    }
}

/// One transaction begun in `scope` (committed, or released, at the end): the ledger's
/// records (with their own fall-back), then the generic inboxes' events, plainly
/// (`careful` false: no savepoint; `None` when they fail, to be applied again
/// carefully) or part by part under savepoints, then the dead letters and the progress.
/// With `deferred`, the ledger's fast path adds its credits there instead of sending
/// them (only once this transaction has succeeded: a transaction rolled back adds
/// nothing).
async fn apply_in(
    scope: &mut impl Scope,
    statements: &Statements,
    table_statements: Option<&[table::TableStatements]>,
    batch: &ApplyBatch,
    careful: bool,
    deferred: Option<&mut credit::Deferred>,
) -> Result<Option<ApplyOutcome>, ApplyError> {
    let mut pending = deferred.as_deref().cloned();
    let started = std::time::Instant::now();
    let mut outcome = ApplyOutcome::default();
    let mut dead_letters: Vec<DeadLetter> = batch.dead_letters.clone();
    let records = prepare(&batch.records, &mut dead_letters, &mut outcome);
    let table_statements = match table_statements {
        None if !batch.events.is_empty() => {
            return Err(ApplyError::Statement {
                inbox: "(any)".into(),
                statement: "applying the events",
                message: "the inboxes' statements were not prepared".into(),
            })
        }
        prepared => prepared.filter(|_| !batch.events.is_empty()),
    };
    let mut tx = scope.begin().await?;
    // The common case first, with nothing to undo but the transaction itself: a
    // savepoint around it cost pg_end 5-15% of the batch (a subtransaction).
    let first = if records.is_empty() {
        Ok(())
    } else {
        let ledger = statements.ledger()?;
        insert_new(&tx, ledger, &records, &mut outcome, pending.as_mut()).await
    };
    if let Err(error) = first {
        if error::pg::classify(&error) == ErrorClass::Transient {
            return Err(ApplyError::new("inserting the records", error));
        }
        // A replay or a concurrent applier (`unique_violation`), or a record pg_end
        // refuses: again from the start, part by part under savepoints.
        tx.rollback()
            .await
            .map_err(|e| ApplyError::new("rolling back", e))?;
        tx = scope.begin().await?;
        let all_new = error.code() != Some(&SqlState::UNIQUE_VIOLATION);
        apply_records(
            &mut tx,
            statements.ledger()?,
            &records,
            all_new,
            &mut dead_letters,
            &mut outcome,
            pending.as_mut(),
        )
        .await?;
    }
    if let Some(table_statements) = table_statements {
        if careful {
            apply_inboxes(
                &mut tx,
                batch,
                table_statements,
                &mut dead_letters,
                &mut outcome,
            )
            .await?;
        } else if !apply_inboxes_plain(
            &tx,
            batch,
            table_statements,
            &mut dead_letters,
            &mut outcome,
        )
        .await?
        {
            tx.rollback()
                .await
                .map_err(|e| ApplyError::new("rolling back", e))?;
            return Ok(None);
        }
    }
    if batch.dead_letters_apart {
        outcome.apart = dead_letters.split_off(batch.dead_letters.len());
    }
    outcome.dead_letters = dead_letters.len() as u64;
    outcome.dead_letters_written = insert_dead_letters(&tx, statements, &dead_letters).await?;
    store_progress(&tx, statements, &batch.progress).await?;
    tx.commit()
        .await
        .map_err(|e| ApplyError::new("committing", e))?;
    if let (Some(deferred), Some(pending)) = (deferred, pending) {
        *deferred = pending;
    }
    ::metrics::histogram!(crate::metrics::APPLY_DURATION).record(started.elapsed().as_secs_f64());
    ::metrics::histogram!(crate::metrics::APPLY_BATCH_SIZE).record(batch.records.len() as f64);
    ::metrics::counter!(crate::metrics::DEAD_LETTERS).increment(outcome.dead_letters_written);

    // The letters the batch came with were logged where they were made.
    for letter in dead_letters.iter().skip(batch.dead_letters.len()) {
        tracing::warn!(
            kind = %letter.kind,
            topic = letter.origin.topic.as_deref().unwrap_or(""),
            partition = letter.origin.partition,
            offset = letter.origin.offset,
            source_lsn = letter.origin.source_lsn.map(|l| l.to_string()),
            error = %letter.error,
            "dead letter"
        );
    }
    Ok(Some(outcome))
}

/// The generic inboxes' events in one go per target, without savepoints (a
/// subtransaction costs pg_end 5-15% of a batch): `false` when one failed (the
/// transaction is then aborted and the batch applied again carefully).
async fn apply_inboxes_plain(
    tx: &Transaction<'_>,
    batch: &ApplyBatch,
    statements: &[table::TableStatements],
    dead_letters: &mut Vec<DeadLetter>,
    outcome: &mut ApplyOutcome,
) -> Result<bool, ApplyError> {
    for ((index, target), statements) in batch.tables.iter().enumerate().zip(statements) {
        let events: Vec<&table::Event> =
            batch.events.iter().filter(|e| e.target == index).collect();
        if !events.is_empty()
            && !table::apply_plain(tx, target, statements, &events, dead_letters, outcome).await?
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The generic inboxes' events, target by target in the order of `batch.tables`.
async fn apply_inboxes(
    tx: &mut Transaction<'_>,
    batch: &ApplyBatch,
    statements: &[table::TableStatements],
    dead_letters: &mut Vec<DeadLetter>,
    outcome: &mut ApplyOutcome,
) -> Result<(), ApplyError> {
    for ((index, target), statements) in batch.tables.iter().enumerate().zip(statements) {
        let events: Vec<&table::Event> =
            batch.events.iter().filter(|e| e.target == index).collect();
        if !events.is_empty() {
            table::apply_events(tx, target, statements, &events, dead_letters, outcome).await?;
        }
    }
    Ok(())
}

async fn begin(client: &mut Client) -> Result<Transaction<'_>, ApplyError> {
    client
        .transaction()
        .await
        .map_err(|e| ApplyError::new("beginning a transaction", e))
}

/// A record that passed the checks, with its values as pg_end will hold them.
struct Checked<'a> {
    record: &'a TxnRecord,
    origin: &'a Origin,
    amount: validate::Amount<'a>,
    /// `created_at` as `timestamp_in` reads it.
    created_at: validate::Timestamp,
}

/// A dead letter's origin for `record`: as received, with the record's content as
/// the value when the origin has none (direct mode reads rows, not records), so that
/// a dead letter always keeps what it refused.
fn letter_origin(record: &TxnRecord, origin: &Origin) -> Origin {
    let mut origin = origin.clone();
    if origin.value.is_none() {
        origin.value = Some(
            serde_json::json!({
                "id": record.id,
                "account_id": record.account_id,
                "amount": record.amount,
                "created_at": record.created_at,
            })
            .to_string()
            .into_bytes(),
        );
    }
    origin
}

/// Validates, sorts by id, drops in-batch repeats (a different repeat is a conflict).
fn prepare<'a>(
    input: &'a [(TxnRecord, Origin)],
    dead_letters: &mut Vec<DeadLetter>,
    outcome: &mut ApplyOutcome,
) -> Vec<Checked<'a>> {
    let mut records: Vec<Checked<'a>> = Vec::with_capacity(input.len());
    for (record, origin) in input {
        let checked = validate::parse_amount(&record.amount).and_then(|amount| {
            Ok(Checked {
                record,
                origin,
                amount,
                created_at: validate::created_at(&record.created_at)?,
            })
        });
        match checked {
            Ok(checked) => records.push(checked),
            Err(invalid) => dead_letters.push(DeadLetter {
                kind: DeadLetterKind::InvalidValue,
                error: invalid.to_string(),
                origin: letter_origin(record, origin),
            }),
        }
    }
    // Stable: the repeats of an id stay in the order they came, the first one kept.
    records.sort_by_key(|c| c.record.id);
    records.dedup_by(|repeat, first| {
        if repeat.record.id != first.record.id {
            return false;
        }
        let differing = differing_fields(
            first.record.account_id == repeat.record.account_id,
            first.amount.canonical() == repeat.amount.canonical(),
            first.created_at == repeat.created_at,
        );
        if differing.is_empty() {
            outcome.duplicates += 1;
        } else {
            outcome.conflicts += 1;
            dead_letters.push(DeadLetter {
                kind: DeadLetterKind::Conflict,
                error: format!(
                    "id {} appears earlier in the same batch with a different {}",
                    repeat.record.id,
                    differing.join(", ")
                ),
                origin: letter_origin(repeat.record, repeat.origin),
            });
        }
        true
    });
    records
}

fn differing_fields(account_id: bool, amount: bool, created_at: bool) -> Vec<&'static str> {
    [
        (account_id, "account_id"),
        (amount, "amount"),
        (created_at, "created_at"),
    ]
    .into_iter()
    .filter(|(same, _)| !same)
    .map(|(_, name)| name)
    .collect()
}

/// The four parallel arrays the statements unnest.
fn columns<'c, 'r: 'c>(
    records: impl ExactSizeIterator<Item = &'c Checked<'r>>,
) -> (
    Vec<i64>,
    Vec<i64>,
    Vec<binary::Numeric<'r>>,
    Vec<validate::Timestamp>,
) {
    let mut ids = Vec::with_capacity(records.len());
    let mut accounts = Vec::with_capacity(records.len());
    let mut amounts = Vec::with_capacity(records.len());
    let mut times = Vec::with_capacity(records.len());
    for c in records {
        ids.push(c.record.id);
        accounts.push(c.record.account_id);
        amounts.push(binary::Numeric::Written(c.amount));
        times.push(c.created_at);
    }
    (ids, accounts, amounts, times)
}

/// Inserts `records` part by part under savepoints, bisecting on a definite error so
/// that only the record PostgreSQL refuses becomes a dead letter. `all_new`: try the
/// plain insert first; cleared once an id of the batch turns out to be in pg_end.
async fn apply_records(
    tx: &mut Transaction<'_>,
    ledger: &Ledger,
    records: &[Checked<'_>],
    mut all_new: bool,
    dead_letters: &mut Vec<DeadLetter>,
    outcome: &mut ApplyOutcome,
    mut deferred: Option<&mut credit::Deferred>,
) -> Result<(), ApplyError> {
    // Ranges still to apply, the next one last.
    let mut pending: Vec<std::ops::Range<usize>> = Vec::new();
    pending.push(0..records.len());
    while let Some(range) = pending.pop() {
        let part = &records[range.clone()];
        let savepoint = tx
            .savepoint("apply_part")
            .await
            .map_err(|e| ApplyError::new("setting a savepoint", e))?;
        let inserted = if all_new {
            insert_new(&savepoint, ledger, part, outcome, deferred.as_deref_mut()).await
        } else {
            insert_part(&savepoint, ledger, part, dead_letters, outcome).await
        };
        match inserted {
            Ok(()) => savepoint
                .commit()
                .await
                .map_err(|e| ApplyError::new("releasing a savepoint", e))?,
            Err(error) if all_new && error.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                // A replay, or a concurrent applier: sort this part out row by row.
                savepoint
                    .rollback()
                    .await
                    .map_err(|e| ApplyError::new("rolling back to a savepoint", e))?;
                all_new = false;
                pending.push(range);
            }
            Err(error) if error::pg::classify(&error) == ErrorClass::Definite => {
                savepoint
                    .rollback()
                    .await
                    .map_err(|e| ApplyError::new("rolling back to a savepoint", e))?;
                outcome.bisected = true;
                if part.len() == 1 {
                    let c = &part[0];
                    dead_letters.push(DeadLetter {
                        kind: DeadLetterKind::ApplyFailed,
                        error: format!("pg_end refused the record: {}", db_error_text(&error)),
                        origin: letter_origin(c.record, c.origin),
                    });
                } else {
                    let middle = range.start + part.len() / 2;
                    pending.push(middle..range.end);
                    pending.push(range.start..middle);
                }
            }
            Err(error) => return Err(ApplyError::new("inserting the records", error)),
        }
    }
    Ok(())
}

/// The error text of a refused statement, with its SQLSTATE.
pub(crate) fn db_error_text(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => crate::error::error_chain(error),
    }
}

/// Inserts a part none of whose ids is in pg_end (all of it, or a `unique_violation`),
/// then credits the balances with it, or, with `deferred`, adds the credits to it.
async fn insert_new(
    tx: &Transaction<'_>,
    ledger: &Ledger,
    part: &[Checked<'_>],
    outcome: &mut ApplyOutcome,
    deferred: Option<&mut credit::Deferred>,
) -> Result<(), tokio_postgres::Error> {
    let rows = part.iter().map(|c| binary::Row {
        id: c.record.id,
        account_id: c.record.account_id,
        amount: c.amount,
        created_at: c.created_at,
    });
    let copy = tx.copy_in(&ledger.copy_records).await?;
    futures_util::pin_mut!(copy);
    copy.send(binary::copy_rows(rows)).await?;
    let inserted = copy.finish().await?;
    debug_assert_eq!(inserted, part.len() as u64);
    let rows = part
        .iter()
        .map(|c| (c.record.account_id, c.amount, c.created_at));
    match deferred {
        Some(deferred) => deferred.add(rows),
        None => credit_balances(tx, ledger, &credit::credits(rows)).await?,
    }
    outcome.inserted += inserted;
    Ok(())
}

/// Adds `credits` to the balances.
async fn credit_balances(
    tx: &Transaction<'_>,
    ledger: &Ledger,
    credits: &[credit::Credit<'_>],
) -> Result<(), tokio_postgres::Error> {
    let (accounts, amounts, times): (Vec<i64>, Vec<_>, Vec<_>) = credits
        .iter()
        .map(|c| (c.account_id, c.amount, c.created_at))
        .collect();
    tx.execute(&ledger.credit_balances, &[&accounts, &amounts, &times])
        .await?;
    Ok(())
}

/// Inserts one part and sorts its skipped ids into duplicates and conflicts.
/// Counts into `outcome` only when the whole part succeeds.
async fn insert_part(
    tx: &Transaction<'_>,
    ledger: &Ledger,
    part: &[Checked<'_>],
    dead_letters: &mut Vec<DeadLetter>,
    outcome: &mut ApplyOutcome,
) -> Result<(), tokio_postgres::Error> {
    let (ids, accounts, amounts, times) = columns(part.iter());
    let rows = tx
        .query(&ledger.insert_records, &[&ids, &accounts, &amounts, &times])
        .await?;
    let mut inserted = std::collections::HashSet::with_capacity(rows.len());
    for row in &rows {
        inserted.insert(row.try_get::<_, i64>(0)?);
    }
    let skipped: Vec<&Checked<'_>> = part
        .iter()
        .filter(|c| !inserted.contains(&c.record.id))
        .collect();
    let mut new_letters = Vec::new();
    let mut duplicates = 0;
    if !skipped.is_empty() {
        let (ids, accounts, amounts, times) = columns(skipped.iter().copied());
        let rows = tx
            .query(
                &ledger.compare_existing,
                &[&ids, &accounts, &amounts, &times],
            )
            .await?;
        let by_id: HashMap<i64, &Checked<'_>> = skipped.iter().map(|c| (c.record.id, *c)).collect();
        for row in &rows {
            let id: i64 = row.try_get(0)?;
            let found: bool = row.try_get(1)?;
            let Some(c) = by_id.get(&id) else { continue };
            let same = |i: usize| row.try_get::<_, Option<bool>>(i).map(|v| v == Some(true));
            let differing = differing_fields(same(2)?, same(3)?, same(4)?);
            if found && differing.is_empty() {
                duplicates += 1;
            } else {
                let error = if found {
                    format!(
                        "id {id} is already in pg_end's main.transactions with a different {}; \
                         it was not overwritten",
                        differing.join(", ")
                    )
                } else {
                    format!("id {id} was neither inserted nor found in main.transactions")
                };
                new_letters.push(DeadLetter {
                    kind: DeadLetterKind::Conflict,
                    error,
                    origin: letter_origin(c.record, c.origin),
                });
            }
        }
    }
    outcome.inserted += inserted.len() as u64;
    outcome.duplicates += duplicates;
    outcome.conflicts += new_letters.len() as u64;
    dead_letters.extend(new_letters);
    Ok(())
}

/// Makes text storable in a `text` column (PostgreSQL refuses NUL characters).
fn storable(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

async fn insert_dead_letters(
    tx: &Transaction<'_>,
    statements: &Statements,
    letters: &[DeadLetter],
) -> Result<u64, ApplyError> {
    if letters.is_empty() {
        return Ok(0);
    }
    let kinds: Vec<&str> = letters.iter().map(|l| l.kind.as_str()).collect();
    let errors: Vec<String> = letters.iter().map(|l| storable(&l.error)).collect();
    let topics: Vec<Option<String>> = letters
        .iter()
        .map(|l| l.origin.topic.as_deref().map(storable))
        .collect();
    let partitions: Vec<Option<i32>> = letters.iter().map(|l| l.origin.partition).collect();
    let offsets: Vec<Option<i64>> = letters.iter().map(|l| l.origin.offset).collect();
    let lsns: Vec<Option<String>> = letters
        .iter()
        .map(|l| l.origin.source_lsn.map(|lsn| lsn.to_string()))
        .collect();
    let keys: Vec<Option<&[u8]>> = letters.iter().map(|l| l.origin.key.as_deref()).collect();
    let values: Vec<Option<&[u8]>> = letters.iter().map(|l| l.origin.value.as_deref()).collect();
    // serde_json escapes NUL as \u0000, which jsonb refuses: replace it in the text.
    let headers: Vec<Option<String>> = letters
        .iter()
        .map(|l| {
            (!l.origin.headers.is_empty()).then(|| {
                l.origin
                    .headers
                    .to_json()
                    .to_string()
                    .replace("\\u0000", "\\ufffd")
            })
        })
        .collect();
    tx.execute(
        &statements.insert_dead_letters,
        &[
            &kinds,
            &errors,
            &topics,
            &partitions,
            &offsets,
            &lsns,
            &keys,
            &values,
            &headers,
        ],
    )
    .await
    .map_err(|e| ApplyError::new("writing dead letters", e))
}

async fn store_progress(
    tx: &Transaction<'_>,
    statements: &Statements,
    progress: &Progress,
) -> Result<(), ApplyError> {
    match progress {
        Progress::None => Ok(()),
        Progress::KafkaOffsets(offsets) => {
            // One row per partition (an upsert may not touch a row twice), the highest.
            let mut last: BTreeMap<(&str, i32), i64> = BTreeMap::new();
            for o in offsets {
                let entry = last
                    .entry((o.topic.as_str(), o.partition))
                    .or_insert(o.last_offset);
                *entry = (*entry).max(o.last_offset);
            }
            if last.is_empty() {
                return Ok(());
            }
            let topics: Vec<&str> = last.keys().map(|(t, _)| *t).collect();
            let partitions: Vec<i32> = last.keys().map(|(_, p)| *p).collect();
            let offsets: Vec<i64> = last.values().copied().collect();
            tx.execute(
                &statements.upsert_kafka_offsets,
                &[&topics, &partitions, &offsets],
            )
            .await
            .map_err(|e| ApplyError::new("storing the Kafka offsets", e))?;
            Ok(())
        }
        Progress::SourceLsn {
            slot,
            commit_lsn,
            system_identifier,
            snapshot,
            backfills,
        } => {
            tx.execute(
                &statements.upsert_source_lsn,
                &[
                    slot,
                    &commit_lsn.to_string(),
                    system_identifier,
                    snapshot,
                    backfills,
                ],
            )
            .await
            .map_err(|e| ApplyError::new("storing the source LSN", e))?;
            Ok(())
        }
    }
}

/// The last applied offset of each of `partitions` (topic, partition) that has one.
pub async fn read_kafka_offsets(
    client: &impl GenericClient,
    partitions: &[(String, i32)],
) -> Result<HashMap<(String, i32), i64>, ApplyError> {
    let topics: Vec<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
    let numbers: Vec<i32> = partitions.iter().map(|(_, p)| *p).collect();
    let rows = client
        .query(READ_KAFKA_OFFSETS, &[&topics, &numbers])
        .await
        .map_err(|e| ApplyError::new("reading the stored Kafka offsets", e))?;
    rows.iter()
        .map(|row| Ok(((row.try_get(0)?, row.try_get(1)?), row.try_get(2)?)))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(|e| ApplyError::new("reading the stored Kafka offsets", e))
}

/// The commit LSN last applied from `slot` in direct mode, if any.
pub async fn read_source_lsn(
    client: &impl GenericClient,
    slot: &str,
) -> Result<Option<Lsn>, ApplyError> {
    let row = client
        .query_opt(READ_SOURCE_LSN, &[&slot])
        .await
        .map_err(|e| ApplyError::new("reading the stored source LSN", e))?;
    let Some(row) = row else { return Ok(None) };
    let text: String = row
        .try_get(0)
        .map_err(|e| ApplyError::new("reading the stored source LSN", e))?;
    // PostgreSQL prints pg_lsn exactly as Lsn parses it.
    Ok(text.parse().ok())
}

/// What the direct-mode progress row stores besides its LSN, as stored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoredProgress {
    pub system_identifier: Option<String>,
    /// `crate::progress::SnapshotProgress` as JSON.
    pub snapshot: Option<String>,
    /// A list of `crate::progress::BackfillProgress` as JSON.
    pub backfills: Option<String>,
}

/// The progress row of `slot`, besides its LSN (all `None` without a row).
pub async fn read_source_system(
    client: &impl GenericClient,
    slot: &str,
) -> Result<StoredProgress, ApplyError> {
    let row = client
        .query_opt(READ_SOURCE_SYSTEM, &[&slot])
        .await
        .map_err(|e| {
            ApplyError::new(
                "reading the stored progress (a column missing from \
             outbox_relay.direct_progress means pg_end's schema is older than this relay: \
             run `outbox-relay migrate`)",
                e,
            )
        })?;
    Ok(
        row.map_or_else(StoredProgress::default, |r| StoredProgress {
            system_identifier: r.get(0),
            snapshot: r.get(1),
            backfills: r.get(2),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_keep_bytes() {
        let json = headers_json([
            ("outbox-relay.lsn", Some(&b"0/16B3748"[..])),
            ("bin", Some(&[0xff, 0x00][..])),
            ("none", None),
        ]);
        assert_eq!(
            json,
            serde_json::json!([
                {"key": "outbox-relay.lsn", "value": "0/16B3748"},
                {"key": "bin", "value": {"hex": "ff00"}},
                {"key": "none", "value": null}
            ])
        );
        assert_eq!(headers_json([]), serde_json::Value::Null);
    }

    fn record(id: i64, amount: &str, created_at: &str) -> (TxnRecord, Origin) {
        (
            TxnRecord {
                id,
                account_id: 1,
                amount: amount.into(),
                created_at: created_at.into(),
            },
            Origin {
                offset: Some(id),
                ..Origin::default()
            },
        )
    }

    #[test]
    fn headers_give_back_what_was_pushed() {
        let pushed: Vec<(&str, Option<&[u8]>)> = vec![
            ("outbox-relay.lsn", Some(b"0/16B3748")),
            ("", Some(b"")),
            ("none", None),
            ("bin", Some(&[0xff, 0x00, 0xff, 0xff, 0xff, 0xff])),
        ];
        let headers: Headers = pushed.iter().copied().collect();
        assert_eq!(headers.iter().collect::<Vec<_>>(), pushed);
        assert_eq!(headers.to_json(), headers_json(pushed.iter().copied()));
        assert!(Headers::default().is_empty());
        assert_eq!(Headers::default().to_json(), serde_json::Value::Null);
    }

    #[test]
    fn prepare_dedupes_validates_and_sorts() {
        let t = "2025-07-23 20:06:21.085330";
        let input = vec![
            record(3, "50", t),
            record(1, "10", t),
            record(3, "50.0", "2025-07-23T20:06:21.08533"), // the same, written differently
            record(3, "60", t),                             // a conflict
            record(2, "abc", t),                            // invalid amount
            record(4, "10", "2025-02-30 00:00:00"),         // impossible date
        ];
        let mut letters = Vec::new();
        let mut outcome = ApplyOutcome::default();
        let records = prepare(&input, &mut letters, &mut outcome);
        let ids: Vec<i64> = records.iter().map(|c| c.record.id).collect();
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(records[1].record.amount, "50", "the first occurrence wins");
        assert_eq!(outcome.duplicates, 1);
        assert_eq!(outcome.conflicts, 1);
        let kinds: Vec<_> = letters.iter().map(|l| (l.kind, l.origin.offset)).collect();
        assert_eq!(
            kinds,
            vec![
                (DeadLetterKind::InvalidValue, Some(2)),
                (DeadLetterKind::InvalidValue, Some(4)),
                (DeadLetterKind::Conflict, Some(3)),
            ]
        );
        assert!(letters[2].error.contains("amount"), "{}", letters[2].error);
    }
}
