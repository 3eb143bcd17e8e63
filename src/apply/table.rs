//! The generic inbox's apply: events into an operator's table in pg_end, keyed by the
//! event id, and an optional handler statement run over exactly the events that were
//! new. Called by [`super::apply`] inside the batch's one transaction.
//!
//! # Invariants
//! 1. The event id is the idempotency key: a row is inserted with
//!    `ON CONFLICT (<id>) DO NOTHING`, so an event whose id is in the table is never
//!    inserted twice; one whose stored row has other content is a `conflict` dead
//!    letter, never an overwrite.
//! 2. The handler runs once per new event: over `new_events`, the rows of the table
//!    whose ids this transaction's insert returned, in the transaction that stores the
//!    offsets (or the source LSN). A replayed event is not returned by the insert, so
//!    the handler never sees it again.
//! 3. One bad event never blocks its batch: a value PostgreSQL refuses for its column
//!    (`apply_failed`) or an event the handler raises an error for (`handler_failed`)
//!    is isolated by bisection under savepoints and dead-lettered with its full
//!    content; the rest commits. A statement that cannot work for any event (a
//!    syntax error, a missing table or column, a permission: SQLSTATE classes 42, 0A,
//!    …) is a definite error for the whole batch, and so is a handler that fails for
//!    every new event of a batch of two or more with the same SQLSTATE: nothing is
//!    committed and the relay stops, naming the statement.
//!
//! The common case is cheaper: a batch whose ids are all new is written with a `COPY`
//! (`copy_part`) that either inserts every event or fails as a whole with
//! `unique_violation`, and the whole batch is first tried without a savepoint
//! (`apply_plain`); anything that fails sends the batch down the careful path
//! (`apply_events`) in a new transaction.
//!
//! Values travel as text arrays (`unnest($1::text[], …)`) and are cast to each
//! column's type by PostgreSQL's own input functions, so every type the server knows
//! is accepted as it would be in SQL. A missing or null field takes the column's
//! default when it has one.

use std::collections::HashSet;

use futures_util::SinkExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::{GenericClient, Transaction};

use super::{ApplyError, ApplyOutcome, DeadLetter, DeadLetterKind, Origin};
use crate::error::{self, ErrorClass};
use crate::source::{quote_ident, TableName};

/// A column of an inbox table that events fill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// As `format_type` prints it (`numeric(12,2)`, `character varying(36)`).
    pub type_sql: String,
    /// The column's default expression, as `pg_get_expr` prints it.
    pub default: Option<String>,
    /// `NOT NULL` and no default: an event without this field is refused before SQL.
    pub required: bool,
    /// Compared when an id is already there (record content, not delivery position).
    pub content: bool,
}

/// An inbox table as pg_end has it, with the statements that apply events to it.
#[derive(Debug, Clone)]
pub struct TableTarget {
    /// The inbox's name, for errors and logs.
    pub inbox: String,
    pub table: TableName,
    /// The columns events fill, in the order of [`Event::values`].
    pub columns: Vec<Column>,
    /// The index in `columns` of the event id column.
    pub id: usize,
    /// The handler as the operator wrote it (for error messages).
    pub handler: Option<String>,
    insert_sql: String,
    copy_sql: String,
    compare_sql: String,
    handler_sql: Option<String>,
}

/// One event for a [`TableTarget`]: its values as text, in column order.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Which of the batch's targets (index into [`super::ApplyBatch::tables`]).
    pub target: usize,
    pub values: Vec<Option<String>>,
    pub origin: Origin,
}

/// A target's statements prepared on one pg_end connection (parsed and planned once
/// per connection, not once per batch).
#[derive(Clone)]
pub struct TableStatements {
    insert: tokio_postgres::Statement,
    copy: tokio_postgres::Statement,
    handler: Option<tokio_postgres::Statement>,
}

/// One event as [`TableTarget::compare`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compared {
    /// Its index in the events compared.
    pub index: usize,
    /// The id as PostgreSQL prints it (canonical: `01` is `1`).
    pub id: String,
    pub found: bool,
    /// The content columns whose stored value differs (when found).
    pub differing: Vec<String>,
}

/// Why an inbox cannot be bound to pg_end.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("inbox {inbox}: {message}")]
    Invalid { inbox: String, message: String },
    #[error("inbox {inbox}: cannot read the table {table} from pg_end")]
    Catalog {
        inbox: String,
        table: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("inbox {inbox}: pg_end refuses the {statement} statement: {message}\n{sql}")]
    Statement {
        inbox: String,
        statement: &'static str,
        message: String,
        sql: String,
    },
}

/// A column as the catalog lists it.
#[derive(Debug, Clone)]
pub struct CatalogColumn {
    pub name: String,
    pub type_sql: String,
    pub not_null: bool,
    pub default: Option<String>,
    /// Identity `ALWAYS` or generated: cannot be written.
    pub read_only: bool,
}

const READ_COLUMNS: &str = "\
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid),
       a.attidentity = 'a' OR a.attgenerated <> ''
FROM pg_attribute a
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum";

/// Single-column unique indexes (without predicate or expression): the columns
/// `ON CONFLICT (column)` can name. The primary key's first.
const READ_UNIQUE: &str = "\
SELECT a.attname::text
FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indnatts = 1
  AND i.indpred IS NULL AND i.indexprs IS NULL
ORDER BY i.indisprimary DESC, a.attnum";

/// The table's columns and its single-column unique keys, or why not.
pub async fn read_table(
    client: &impl GenericClient,
    inbox: &str,
    table: &TableName,
) -> Result<(Vec<CatalogColumn>, Vec<String>), BindError> {
    let catalog = |source| BindError::Catalog {
        inbox: inbox.to_string(),
        table: table.to_string(),
        source,
    };
    let exists = client
        .query_one(
            "SELECT to_regclass($1::text) IS NOT NULL",
            &[&table.quoted()],
        )
        .await
        .map_err(catalog)?
        .try_get::<_, bool>(0)
        .map_err(catalog)?;
    if !exists {
        return Err(BindError::Invalid {
            inbox: inbox.to_string(),
            message: format!(
                "the table {table} does not exist in pg_end; create it first (docs/sink.md, \"Inboxes\")"
            ),
        });
    }
    let rows = client
        .query(READ_COLUMNS, &[&table.quoted()])
        .await
        .map_err(catalog)?;
    let mut columns = Vec::with_capacity(rows.len());
    for row in rows {
        columns.push(CatalogColumn {
            name: row.try_get(0).map_err(catalog)?,
            type_sql: row.try_get(1).map_err(catalog)?,
            not_null: row.try_get(2).map_err(catalog)?,
            default: row.try_get(3).map_err(catalog)?,
            read_only: row.try_get::<_, Option<bool>>(4).map_err(catalog)? == Some(true),
        });
    }
    let unique = client
        .query(READ_UNIQUE, &[&table.quoted()])
        .await
        .map_err(catalog)?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<Vec<String>, _>>()
        .map_err(catalog)?;
    Ok((columns, unique))
}

impl TableTarget {
    /// The statements for `columns` of `table` keyed by `columns[id]`; `handler` is
    /// the operator's statement over `new_events`. Pure: see [`Self::prepare`] for the
    /// check against pg_end.
    pub fn new(
        inbox: &str,
        table: TableName,
        columns: Vec<Column>,
        id: usize,
        handler: Option<String>,
    ) -> Self {
        let n = columns.len();
        let params: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
        let aliases: Vec<String> = (1..=n).map(|i| format!("c{i}")).collect();
        let cast = |i: usize, c: &Column| format!("x.c{}::{}", i + 1, c.type_sql);
        let exprs: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| match &c.default {
                Some(default) => format!("COALESCE({}, {default})", cast(i, c)),
                None => cast(i, c),
            })
            .collect();
        let names: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
        let id_name = quote_ident(&columns[id].name);
        let insert_sql = format!(
            "INSERT INTO {table} AS t ({names})\n\
             SELECT {exprs}\n\
             FROM unnest({params}) AS x({aliases})\n\
             ORDER BY x.c{order} COLLATE \"C\"\n\
             ON CONFLICT ({id_name}) DO NOTHING\n\
             RETURNING t.{id_name}::text",
            table = table.quoted(),
            names = names.join(", "),
            exprs = exprs.join(", "),
            params = params.join(", "),
            aliases = aliases.join(", "),
            order = id + 1,
        );
        let copy_sql = format!(
            "COPY {table} ({names}) FROM STDIN",
            table = table.quoted(),
            names = names.join(", "),
        );
        // Per content column: is the stored value the one this event carries? A
        // column with a default matches when the event leaves it out.
        let same: Vec<String> = columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.content)
            .map(|(i, c)| {
                let equal = format!(
                    "(t.{}::text IS NOT DISTINCT FROM ({})::text)",
                    quote_ident(&c.name),
                    cast(i, c)
                );
                if c.default.is_some() {
                    format!("(x.c{} IS NULL OR {equal})", i + 1)
                } else {
                    equal
                }
            })
            .collect();
        let compare_sql = format!(
            "SELECT x.ord::int8, t.{id_name} IS NOT NULL, ARRAY[{same}]::bool[], ({id_cast})::text\n\
             FROM unnest({params}) WITH ORDINALITY AS x({aliases}, ord)\n\
             LEFT JOIN {table} t ON t.{id_name} = {id_cast}",
            same = if same.is_empty() {
                "true".to_string()
            } else {
                same.join(", ")
            },
            params = params.join(", "),
            aliases = aliases.join(", "),
            table = table.quoted(),
            id_cast = cast(id, &columns[id]),
        );
        let handler_sql = handler.as_deref().map(|h| {
            let new_events = format!(
                "new_events AS (SELECT t.* FROM {table} t WHERE t.{id_name} = ANY($1::text[]::{ty}[]))",
                table = table.quoted(),
                ty = columns[id].type_sql,
            );
            splice_handler(&new_events, h)
        });
        Self {
            inbox: inbox.to_string(),
            table,
            columns,
            id,
            handler,
            insert_sql,
            copy_sql,
            compare_sql,
            handler_sql,
        }
    }

    /// The statements as PostgreSQL plans them, in a transaction rolled back at once:
    /// a statement that cannot work (a typo in the handler, a missing table, a type
    /// without a cast from text) is refused here, before any record is read.
    pub async fn prepare(&self, client: &mut tokio_postgres::Client) -> Result<(), BindError> {
        let tx = client
            .transaction()
            .await
            .map_err(|source| BindError::Catalog {
                inbox: self.inbox.clone(),
                table: self.table.to_string(),
                source,
            })?;
        let mut statements = vec![
            ("insert", &self.insert_sql),
            ("copy", &self.copy_sql),
            ("compare", &self.compare_sql),
        ];
        if let Some(handler) = &self.handler_sql {
            statements.push(("handler", handler));
        }
        for (statement, sql) in statements {
            if let Err(error) = tx.prepare(sql).await {
                return Err(BindError::Statement {
                    inbox: self.inbox.clone(),
                    statement,
                    message: super::db_error_text(&error),
                    sql: sql.clone(),
                });
            }
        }
        let _ = tx.rollback().await;
        Ok(())
    }

    /// Which of `events` the table holds, and with what: per event (in order), its id
    /// as PostgreSQL prints it, whether it is there, and the content columns that
    /// differ (for `verify` and `reconcile`).
    pub async fn compare(
        &self,
        client: &impl GenericClient,
        events: &[&Event],
    ) -> Result<Vec<Compared>, tokio_postgres::Error> {
        let columns = arrays(self.columns.len(), events.iter().copied());
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = columns
            .iter()
            .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let rows = client.query(self.compare_sql.as_str(), &params).await?;
        let content: Vec<&str> = self
            .columns
            .iter()
            .filter(|c| c.content)
            .map(|c| c.name.as_str())
            .collect();
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let ord: i64 = row.try_get(0)?;
            let same: Vec<Option<bool>> = row.try_get(2)?;
            out.push(Compared {
                index: usize::try_from(ord - 1).unwrap_or(usize::MAX),
                found: row.try_get(1)?,
                differing: content
                    .iter()
                    .zip(&same)
                    .filter(|(_, s)| **s != Some(true))
                    .map(|(name, _)| name.to_string())
                    .collect(),
                id: row.try_get::<_, Option<String>>(3)?.unwrap_or_default(),
            });
        }
        out.sort_by_key(|c| c.index);
        Ok(out)
    }

    /// Its statements, prepared on `client` (pipelined: one round trip).
    pub async fn statements(
        &self,
        client: &impl GenericClient,
    ) -> Result<TableStatements, tokio_postgres::Error> {
        let handler = async {
            match &self.handler_sql {
                Some(sql) => client.prepare(sql).await.map(Some),
                None => Ok(None),
            }
        };
        let (insert, copy, handler) = tokio::try_join!(
            client.prepare(&self.insert_sql),
            client.prepare(&self.copy_sql),
            handler
        )?;
        Ok(TableStatements {
            insert,
            copy,
            handler,
        })
    }

    /// The handler statement as run (with `new_events` spliced in).
    pub fn handler_sql(&self) -> Option<&str> {
        self.handler_sql.as_deref()
    }
}

/// The handler with `new_events` as its first common table expression: prepended as a
/// `WITH`, or joined to the handler's own `WITH` list.
fn splice_handler(new_events: &str, handler: &str) -> String {
    let handler = handler.trim().trim_end_matches(';').trim_end();
    let lower = handler.to_ascii_lowercase();
    let word_at = |text: &str, word: &str| {
        text.starts_with(word)
            && text[word.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_whitespace() || c == '(')
    };
    if word_at(&lower, "with") {
        let rest = handler[4..].trim_start();
        let rest_lower = rest.to_ascii_lowercase();
        if word_at(&rest_lower, "recursive") {
            let rest = rest[9..].trim_start();
            return format!("WITH RECURSIVE {new_events},\n{rest}");
        }
        return format!("WITH {new_events},\n{rest}");
    }
    format!("WITH {new_events}\n{handler}")
}

/// SQLSTATE classes of a statement that cannot work whatever the event: syntax or
/// access rule (42), feature not supported (0A), invalid schema or catalog (3F, 3D),
/// dependent objects (2B), invalid transaction state (25), insufficient resources
/// (53), program limit (54), object state (55), system errors (58, XX), config (F0).
fn statement_broken(error: &tokio_postgres::Error) -> bool {
    error.code().is_some_and(|code| {
        let class = &code.code()[..2];
        matches!(
            class,
            "42" | "0A" | "3F" | "3D" | "2B" | "25" | "53" | "54" | "55" | "58" | "XX" | "F0"
        )
    })
}

/// Events of one target, checked and deduplicated, in id order.
struct Checked<'a> {
    events: Vec<&'a Event>,
}

/// What applying a target's events found.
#[derive(Default)]
struct Tally {
    /// Events that reached the handler and failed there: SQLSTATEs seen.
    handler_failures: u64,
    handler_states: HashSet<String>,
    /// Events the handler ran over without error.
    handled: u64,
}

/// Applies `events` (all of `target`) inside `tx` in one go, no savepoint: the COPY
/// when it can, else the insert. `Ok(false)` when a statement failed for a reason the
/// careful path ([`apply_events`]) sorts out; `tx` is then aborted.
pub(super) async fn apply_plain(
    tx: &Transaction<'_>,
    target: &TableTarget,
    statements: &TableStatements,
    events: &[&Event],
    dead_letters: &mut Vec<DeadLetter>,
    outcome: &mut ApplyOutcome,
) -> Result<bool, ApplyError> {
    let prepared = prepare(target, events, dead_letters, outcome);
    if prepared.events.is_empty() {
        return Ok(true);
    }
    let part = &prepared.events[..];
    let applied = if copyable(target, part) {
        copy_part(tx, target, statements, part, outcome).await
    } else {
        apply_part(tx, target, statements, part, dead_letters, outcome).await
    };
    match applied {
        Ok(_) => Ok(true),
        Err((step, error)) if error::pg::classify(&error) == ErrorClass::Transient => {
            Err(ApplyError::new(step, error))
        }
        Err(_) => Ok(false),
    }
}

/// Applies `events` (all of `target`) inside `tx`, under savepoints: see the module
/// documentation. Dead letters and counts go to `dead_letters` and `outcome`.
pub(super) async fn apply_events(
    tx: &mut Transaction<'_>,
    target: &TableTarget,
    statements: &TableStatements,
    events: &[&Event],
    dead_letters: &mut Vec<DeadLetter>,
    outcome: &mut ApplyOutcome,
) -> Result<(), ApplyError> {
    let prepared = prepare(target, events, dead_letters, outcome);
    if prepared.events.is_empty() {
        return Ok(());
    }
    let mut tally = Tally::default();
    // Ranges still to apply, the next one last.
    let mut pending: Vec<std::ops::Range<usize>> = Vec::new();
    pending.push(0..prepared.events.len());
    let all = prepared.events.len();
    // Until an id turns out to be there already: the plain COPY (see `copy_part`).
    let mut all_new = true;
    while let Some(range) = pending.pop() {
        let part = &prepared.events[range.clone()];
        let savepoint = tx
            .savepoint("inbox_part")
            .await
            .map_err(|e| ApplyError::new("setting a savepoint", e))?;
        let mut letters = Vec::new();
        let mut counts = ApplyOutcome::default();
        let copy = all_new && copyable(target, part);
        let applied = if copy {
            copy_part(&savepoint, target, statements, part, &mut counts).await
        } else {
            apply_part(
                &savepoint,
                target,
                statements,
                part,
                &mut letters,
                &mut counts,
            )
            .await
        };
        match applied {
            Ok(handled) => {
                savepoint
                    .commit()
                    .await
                    .map_err(|e| ApplyError::new("releasing a savepoint", e))?;
                tally.handled += handled;
                add(outcome, &counts);
                dead_letters.extend(letters);
            }
            Err((step, error)) => {
                if error::pg::classify(&error) == ErrorClass::Transient {
                    return Err(ApplyError::new(step, error));
                }
                savepoint
                    .rollback()
                    .await
                    .map_err(|e| ApplyError::new("rolling back to a savepoint", e))?;
                if copy && error.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                    // A replay, or a concurrent applier: this part, and what is left,
                    // by ON CONFLICT.
                    all_new = false;
                    pending.push(range);
                    continue;
                }
                if statement_broken(&error) {
                    return Err(ApplyError::Statement {
                        inbox: target.inbox.clone(),
                        statement: step,
                        message: super::db_error_text(&error),
                    });
                }
                outcome.bisected = true;
                if part.len() > 1 {
                    let middle = range.start + part.len() / 2;
                    pending.push(middle..range.end);
                    pending.push(range.start..middle);
                    continue;
                }
                let event = part[0];
                let (kind, what) = if step == "running the handler" {
                    tally.handler_failures += 1;
                    if let Some(code) = error.code() {
                        tally.handler_states.insert(code.code().to_string());
                    }
                    (
                        DeadLetterKind::HandlerFailed,
                        "the handler failed for the event",
                    )
                } else {
                    (DeadLetterKind::ApplyFailed, "pg_end refused the event")
                };
                dead_letters.push(DeadLetter {
                    kind,
                    error: format!(
                        "inbox {}: {what}: {}",
                        target.inbox,
                        super::db_error_text(&error)
                    ),
                    origin: event.origin.clone(),
                });
            }
        }
    }
    // A handler that fails for every new event is broken, not the events.
    if all > 1
        && tally.handled == 0
        && tally.handler_failures == all as u64
        && tally.handler_states.len() == 1
    {
        let state = tally.handler_states.into_iter().next().unwrap_or_default();
        return Err(ApplyError::Statement {
            inbox: target.inbox.clone(),
            statement: "running the handler",
            message: format!(
                "the handler failed for every one of the batch's {all} new events (SQLSTATE {state}); \
                 it is taken for broken, not the events"
            ),
        });
    }
    Ok(())
}

fn add(outcome: &mut ApplyOutcome, counts: &ApplyOutcome) {
    outcome.inserted += counts.inserted;
    outcome.duplicates += counts.duplicates;
    outcome.conflicts += counts.conflicts;
}

/// Refuses events without a required value, drops in-batch repeats of an id (a
/// repeat with other content is a conflict), sorts by id.
fn prepare<'a>(
    target: &TableTarget,
    events: &[&'a Event],
    dead_letters: &mut Vec<DeadLetter>,
    outcome: &mut ApplyOutcome,
) -> Checked<'a> {
    let mut kept: Vec<&'a Event> = Vec::with_capacity(events.len());
    for event in events {
        let missing = target
            .columns
            .iter()
            .zip(&event.values)
            .find(|(c, v)| c.required && v.is_none());
        match missing {
            Some((column, _)) => dead_letters.push(DeadLetter {
                kind: DeadLetterKind::MissingField,
                error: format!(
                    "inbox {}: no value for column {} (NOT NULL, no default)",
                    target.inbox, column.name
                ),
                origin: event.origin.clone(),
            }),
            None => kept.push(event),
        }
    }
    let id = target.id;
    kept.sort_by(|a, b| a.values[id].cmp(&b.values[id]));
    kept.dedup_by(|repeat, first| {
        if repeat.values[id] != first.values[id] {
            return false;
        }
        let differing: Vec<&str> = target
            .columns
            .iter()
            .zip(repeat.values.iter().zip(&first.values))
            .filter(|(c, (a, b))| c.content && a != b)
            .map(|(c, _)| c.name.as_str())
            .collect();
        if differing.is_empty() {
            outcome.duplicates += 1;
        } else {
            outcome.conflicts += 1;
            dead_letters.push(DeadLetter {
                kind: DeadLetterKind::Conflict,
                error: format!(
                    "inbox {}: id {} appears earlier in the same batch with a different {}",
                    target.inbox,
                    repeat.values[id].as_deref().unwrap_or(""),
                    differing.join(", ")
                ),
                origin: repeat.origin.clone(),
            });
        }
        true
    });
    Checked { events: kept }
}

/// The values of `part`, one text array per column.
fn arrays<'e>(columns: usize, part: impl Iterator<Item = &'e Event>) -> Vec<Vec<Option<&'e str>>> {
    let mut arrays: Vec<Vec<Option<&str>>> = vec![Vec::new(); columns];
    for event in part {
        for (array, value) in arrays.iter_mut().zip(&event.values) {
            array.push(value.as_deref());
        }
    }
    arrays
}

/// Whether `part` can take the COPY path: every value is given or its column has no
/// default (COPY cannot fall back to a default row by row, as the insert's COALESCE
/// does).
fn copyable(target: &TableTarget, part: &[&Event]) -> bool {
    part.iter().all(|e| {
        e.values
            .iter()
            .zip(&target.columns)
            .all(|(v, c)| v.is_some() || c.default.is_none())
    })
}

/// The common case, cheaper: none of the ids is in the table yet. A `COPY` either
/// inserts every event (then the handler runs over all of them) or fails as a whole,
/// `unique_violation` when an id is there (the part is then applied again by
/// [`apply_part`], `ON CONFLICT`). No speculative insertion, nothing returned. Rows in
/// the order [`prepare`] sorted them (byte order of the id's text), the insert's order.
async fn copy_part(
    tx: &Transaction<'_>,
    target: &TableTarget,
    statements: &TableStatements,
    part: &[&Event],
    outcome: &mut ApplyOutcome,
) -> Result<u64, (&'static str, tokio_postgres::Error)> {
    let mut data = Vec::with_capacity(part.len() * 64);
    for event in part {
        for (i, value) in event.values.iter().enumerate() {
            if i > 0 {
                data.push(b'\t');
            }
            match value {
                None => data.extend_from_slice(b"\\N"),
                Some(text) => copy_text(&mut data, text),
            }
        }
        data.push(b'\n');
    }
    let sink = tx
        .copy_in(&statements.copy)
        .await
        .map_err(|e| ("copying the events", e))?;
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data))
        .await
        .map_err(|e| ("copying the events", e))?;
    let inserted = sink.finish().await.map_err(|e| ("copying the events", e))?;
    let mut handled = 0;
    if let Some(handler) = &statements.handler {
        let ids: Vec<Option<&str>> = part
            .iter()
            .map(|e| e.values[target.id].as_deref())
            .collect();
        tx.execute(handler, &[&ids])
            .await
            .map_err(|e| ("running the handler", e))?;
        handled = part.len() as u64;
    }
    outcome.inserted += inserted;
    Ok(handled)
}

/// `text` in COPY's text format: backslash, tab, newline and carriage return escaped.
fn copy_text(out: &mut Vec<u8>, text: &str) {
    for &b in text.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// Inserts one part, runs the handler over what it inserted, sorts the rest into
/// duplicates and conflicts. Returns how many events the handler ran over; on error,
/// the step that failed.
async fn apply_part(
    tx: &Transaction<'_>,
    target: &TableTarget,
    statements: &TableStatements,
    part: &[&Event],
    dead_letters: &mut Vec<DeadLetter>,
    outcome: &mut ApplyOutcome,
) -> Result<u64, (&'static str, tokio_postgres::Error)> {
    let columns = arrays(target.columns.len(), part.iter().copied());
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = columns
        .iter()
        .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let rows = tx
        .query(&statements.insert, &params)
        .await
        .map_err(|e| ("inserting the events", e))?;
    let inserted: Vec<String> = rows
        .iter()
        .map(|r| r.try_get::<_, String>(0))
        .collect::<Result<_, _>>()
        .map_err(|e| ("inserting the events", e))?;
    let mut handled = 0;
    if let (Some(handler), false) = (&statements.handler, inserted.is_empty()) {
        tx.execute(handler, &[&inserted])
            .await
            .map_err(|e| ("running the handler", e))?;
        handled = inserted.len() as u64;
    }
    outcome.inserted += inserted.len() as u64;
    if inserted.len() == part.len() {
        return Ok(handled);
    }
    // Some ids were there already: the same content (a duplicate) or not (a conflict).
    // Ids come back as PostgreSQL prints them, so an id written otherwise ("01") is
    // compared again here, harmlessly.
    let returned: HashSet<&str> = inserted.iter().map(String::as_str).collect();
    let skipped: Vec<&Event> = part
        .iter()
        .copied()
        .filter(|e| {
            !e.values[target.id]
                .as_deref()
                .is_some_and(|id| returned.contains(id))
        })
        .collect();
    let columns = arrays(target.columns.len(), skipped.iter().copied());
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = columns
        .iter()
        .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let rows = tx
        .query(target.compare_sql.as_str(), &params)
        .await
        .map_err(|e| ("comparing with the stored events", e))?;
    let content: Vec<&str> = target
        .columns
        .iter()
        .filter(|c| c.content)
        .map(|c| c.name.as_str())
        .collect();
    let mut conflicts = 0;
    for row in &rows {
        let step = |e| ("comparing with the stored events", e);
        let ord: i64 = row.try_get(0).map_err(step)?;
        let found: bool = row.try_get(1).map_err(step)?;
        let same: Vec<Option<bool>> = row.try_get(2).map_err(step)?;
        let Some(event) = usize::try_from(ord - 1).ok().and_then(|i| skipped.get(i)) else {
            continue;
        };
        let id = event.values[target.id].as_deref().unwrap_or("");
        let differing: Vec<&str> = content
            .iter()
            .zip(&same)
            .filter(|(_, s)| **s != Some(true))
            .map(|(name, _)| *name)
            .collect();
        if found && differing.is_empty() {
            continue; // a duplicate (or this very insert, its id written otherwise)
        }
        conflicts += 1;
        let error = if found {
            format!(
                "inbox {}: id {id} is already in {} with a different {}; it was not overwritten",
                target.inbox,
                target.table,
                differing.join(", ")
            )
        } else {
            format!(
                "inbox {}: id {id} was neither inserted nor found in {}",
                target.inbox, target.table
            )
        };
        dead_letters.push(DeadLetter {
            kind: DeadLetterKind::Conflict,
            error,
            origin: event.origin.clone(),
        });
    }
    outcome.conflicts += conflicts as u64;
    outcome.duplicates += (part.len() - inserted.len()).saturating_sub(conflicts) as u64;
    Ok(handled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, type_sql: &str) -> Column {
        Column {
            name: name.into(),
            type_sql: type_sql.into(),
            default: None,
            required: false,
            content: true,
        }
    }

    #[test]
    fn copy_text_escapes_what_copy_reads_as_special() {
        let mut out = Vec::new();
        copy_text(&mut out, "a\\b\tc\nd\re \\N");
        assert_eq!(out, b"a\\\\b\\tc\\nd\\re \\\\N");
    }

    #[test]
    fn handlers_get_new_events_as_their_first_cte() {
        let n = "new_events AS (x)";
        assert_eq!(
            splice_handler(n, "UPDATE c SET n = n + 1 FROM new_events;\n"),
            "WITH new_events AS (x)\nUPDATE c SET n = n + 1 FROM new_events"
        );
        assert_eq!(
            splice_handler(n, "with s AS (SELECT 1) INSERT INTO t SELECT * FROM s"),
            "WITH new_events AS (x),\ns AS (SELECT 1) INSERT INTO t SELECT * FROM s"
        );
        assert_eq!(
            splice_handler(n, "WITH RECURSIVE r(n) AS (SELECT 1) SELECT 1"),
            "WITH RECURSIVE new_events AS (x),\nr(n) AS (SELECT 1) SELECT 1"
        );
        // A word that only starts with "with" is not a WITH.
        assert_eq!(
            splice_handler(n, "withdraw()"),
            "WITH new_events AS (x)\nwithdraw()"
        );
    }

    #[test]
    fn statements_cast_text_to_each_column_and_key_on_the_id() {
        let mut amount = column("amount", "numeric(12,2)");
        amount.default = Some("0".into());
        let target = TableTarget::new(
            "orders",
            TableName::parse("inbox.orders").unwrap(),
            vec![column("event_id", "uuid"), amount],
            0,
            Some("UPDATE totals SET n = n + 1".into()),
        );
        assert!(
            target.insert_sql.contains("x.c1::uuid"),
            "{}",
            target.insert_sql
        );
        assert!(
            target
                .insert_sql
                .contains("COALESCE(x.c2::numeric(12,2), 0)"),
            "{}",
            target.insert_sql
        );
        assert!(target
            .insert_sql
            .contains("ON CONFLICT (\"event_id\") DO NOTHING"));
        assert!(target
            .handler_sql()
            .unwrap()
            .contains("ANY($1::text[]::uuid[])"));
        assert!(target.compare_sql.contains("x.c2 IS NULL OR"));
    }

    fn event(values: &[Option<&str>], offset: i64) -> Event {
        Event {
            target: 0,
            values: values.iter().map(|v| v.map(String::from)).collect(),
            origin: Origin {
                offset: Some(offset),
                ..Origin::default()
            },
        }
    }

    #[test]
    fn prepare_refuses_missing_required_values_and_dedupes_by_id() {
        let mut id = column("id", "int8");
        id.required = true;
        let target = TableTarget::new(
            "i",
            TableName::parse("public.t").unwrap(),
            vec![id, column("v", "text")],
            0,
            None,
        );
        let events = [
            event(&[Some("2"), Some("a")], 0),
            event(&[None, Some("b")], 1),
            event(&[Some("1"), Some("c")], 2),
            event(&[Some("2"), Some("a")], 3),
            event(&[Some("2"), Some("z")], 4),
        ];
        let refs: Vec<&Event> = events.iter().collect();
        let mut letters = Vec::new();
        let mut outcome = ApplyOutcome::default();
        let prepared = prepare(&target, &refs, &mut letters, &mut outcome);
        let offsets: Vec<_> = prepared.events.iter().map(|e| e.origin.offset).collect();
        assert_eq!(offsets, vec![Some(2), Some(0)], "sorted by id, first kept");
        assert_eq!(outcome.duplicates, 1);
        assert_eq!(outcome.conflicts, 1);
        let kinds: Vec<_> = letters.iter().map(|l| (l.kind, l.origin.offset)).collect();
        assert_eq!(
            kinds,
            vec![
                (DeadLetterKind::MissingField, Some(1)),
                (DeadLetterKind::Conflict, Some(4))
            ]
        );
    }
}
