//! On-demand backfill: the rows of an outbox table (all of them, or those a WHERE
//! clause selects) sent again while the stream goes on, without a new slot, for
//! example after pg_end was restored from an old backup.
//!
//! An operator asks for one with `outbox-relay backfill`, which writes the request
//! into pg_start's WAL as a transactional logical message with prefix [`PREFIX`]
//! ([`Request`]). The pipeline reads it in the stream like any change.
//!
//! # Invariants
//! 1. A request is taken once: it joins the pipeline's backfill state ([`Backfills`])
//!    at its transaction's commit, and that state rides in the progress record of every
//!    commit from the batch holding that transaction on. A request read again after a
//!    crash is in a transaction the destination already holds, and is skipped with it.
//! 2. Its rows are read in the table's physical order, in chunks of whole pages (a
//!    `ctid` range, which PostgreSQL 14 and newer read with a TID range scan: each
//!    chunk reads its pages and no others, with or without a key or an index), each
//!    chunk under a snapshot of its own (no transaction stays open on pg_start). A
//!    chunk joins a batch with the first page it did not read: the batch's progress
//!    record says how far the backfill got, atomically with the rows. A session that
//!    ends resumes from the destination's record, so no row of the table is skipped,
//!    and none is in the destination twice from one backfill (a chunk not durable is
//!    read again). An outbox is insert-only, so its rows keep their pages; a rewrite
//!    of the table during a backfill (`VACUUM FULL`, `CLUSTER`) moves them, and may
//!    make it miss some: do not rewrite the outbox while a backfill runs. The pages
//!    past the table's end when a chunk is read hold rows the stream delivers.
//!    A row the backfill sends is, by its nature, one the stream may have sent too:
//!    its records carry the backfill header ([`crate::record::HEADER_BACKFILL`]), and
//!    inboxes and the ledger count an event id once.
//! 3. Memory: one chunk is read ahead, of about `--backfill-chunk-rows` rows and at most
//!    about `--batch-bytes` (its pages are chosen from the rows and bytes per page of
//!    the chunk before, and are never more than a tenth of the chunk's rows).
//! 4. The stream comes first: a chunk joins a batch only between source transactions,
//!    never a spilled one, and a batch holds at most one chunk.
//! 5. Nothing a request says can write or widen the read: the reader's session is
//!    read-only (`default_transaction_read_only`), the filter must have balanced
//!    parentheses and no `;` outside its quotes and comments ([`check_filter`]), it
//!    stands on lines of its own around the chunk's page range, and the query is
//!    prepared before it is run (one statement). A query that fails for good (a filter
//!    naming a column since dropped) ends that backfill as `failed`, recorded with the
//!    reason; the pipeline goes on.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_postgres::{SimpleQueryMessage, SimpleQueryRow};

use super::ColumnDef;
use crate::error::{error_chain, ErrorClass};
use crate::pg;
use crate::progress::{BackfillProgress, BackfillState};
use crate::retry::Backoff;
use crate::source::{self, quote_ident, SourceError, TableName};

/// The prefix of the logical messages that carry requests.
pub const PREFIX: &str = "outbox-relay-backfill";

/// Finished backfills kept in the progress record (for `status`), newest last.
const KEEP_FINISHED: usize = 5;

/// What a request message holds (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Request {
    /// Send `table`'s rows again (those `filter` selects), by the relays of every slot
    /// of the database, or of `slot` alone.
    Start {
        id: String,
        table: String,
        #[serde(default, rename = "where", skip_serializing_if = "Option::is_none")]
        filter: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<String>,
    },
    /// Stop backfill `id` where it is.
    Cancel {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slot: Option<String>,
    },
}

impl Request {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The backfills of the progress record, as the batch being read leaves them.
#[derive(Debug, Default, Clone)]
pub(super) struct Backfills {
    pub list: Vec<BackfillProgress>,
}

impl Backfills {
    /// The one being sent: the first running.
    pub fn active(&self) -> Option<&BackfillProgress> {
        self.list.iter().find(|b| b.state == BackfillState::Running)
    }

    fn active_mut(&mut self) -> Option<&mut BackfillProgress> {
        self.list
            .iter_mut()
            .find(|b| b.state == BackfillState::Running)
    }

    /// A request read in a source transaction that joins the batch, by the relay of
    /// `slot`, which reads the outbox `tables`. Returns whether the active backfill
    /// changed (its reader is then replaced).
    pub fn request(&mut self, content: &[u8], tables: &[TableName], slot: &str) -> bool {
        let before = self.active().map(|b| b.id.clone());
        let other = |to: &Option<String>| to.as_deref().is_some_and(|to| to != slot);
        match serde_json::from_slice::<Request>(content) {
            Ok(Request::Start { slot, .. } | Request::Cancel { slot, .. }) if other(&slot) => {
                return false;
            }
            Ok(Request::Start {
                id, table, filter, ..
            }) => {
                if self.list.iter().any(|b| b.id == id) {
                    tracing::warn!(%id, "a backfill with this id was requested before; ignored");
                    return false;
                }
                let known = TableName::parse(&table).ok().filter(|t| tables.contains(t));
                let error = known.is_none().then(|| {
                    format!(
                        "{table} is not an outbox table of this relay (it reads {})",
                        tables
                            .iter()
                            .map(TableName::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                });
                tracing::info!(%id, %table, filter = ?filter, error = ?error, "backfill requested");
                self.list.push(BackfillProgress {
                    id,
                    table: known.map_or(table, |t| t.to_string()),
                    filter,
                    state: if error.is_some() {
                        BackfillState::Failed
                    } else {
                        BackfillState::Running
                    },
                    next_page: 0,
                    rows: 0,
                    error,
                });
            }
            Ok(Request::Cancel { id, .. }) => {
                match self
                    .list
                    .iter_mut()
                    .find(|b| b.id == id && b.state == BackfillState::Running)
                {
                    Some(b) => {
                        tracing::info!(%id, rows = b.rows, "backfill cancelled");
                        b.state = BackfillState::Cancelled;
                    }
                    None => {
                        tracing::warn!(%id, "cancel of a backfill that is not running; ignored")
                    }
                }
            }
            Err(error) => {
                tracing::error!(
                    %error,
                    content = %String::from_utf8_lossy(content),
                    "an unreadable backfill request (write requests with `outbox-relay backfill`); ignored"
                );
                return false;
            }
        }
        self.trim();
        self.active().map(|b| b.id.clone()) != before
    }

    /// The active backfill sent `rows` more rows, those of the pages before
    /// `next_page`; `last`: it sent everything.
    pub fn advance(&mut self, rows: u64, next_page: u64, last: bool) {
        if let Some(b) = self.active_mut() {
            b.rows += rows;
            b.next_page = next_page;
            if last {
                tracing::info!(id = %b.id, rows = b.rows, "backfill done");
                b.state = BackfillState::Done;
                self.trim();
            }
        }
    }

    /// The active backfill cannot go on.
    pub fn fail(&mut self, error: String) {
        if let Some(b) = self.active_mut() {
            tracing::error!(id = %b.id, %error, "backfill failed");
            b.state = BackfillState::Failed;
            b.error = Some(error);
            self.trim();
        }
    }

    /// Drops the oldest finished backfills beyond [`KEEP_FINISHED`].
    fn trim(&mut self) {
        let finished = self
            .list
            .iter()
            .filter(|b| b.state != BackfillState::Running)
            .count();
        let mut drop = finished.saturating_sub(KEEP_FINISHED);
        self.list.retain(|b| {
            if drop > 0 && b.state != BackfillState::Running {
                drop -= 1;
                return false;
            }
            true
        });
    }
}

/// A chunk of the active backfill's rows, those of a range of the table's pages.
pub(super) struct Chunk {
    /// The outbox table (its index among those the relay reads) and its columns, in
    /// the order the rows list them.
    pub table: usize,
    pub columns: Arc<[ColumnDef]>,
    pub rows: Vec<SimpleQueryRow>,
    /// The first page the chunk did not read.
    pub next_page: u64,
    /// Nothing follows: the backfill is complete with this chunk.
    pub last: bool,
}

/// Reads the active backfill's chunks ahead, one at a time, on a task of its own.
pub(super) struct Reader {
    /// The backfill it reads.
    pub id: String,
    chunks: mpsc::Receiver<Result<Chunk, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a reader needs besides the backfill.
#[derive(Clone)]
pub(super) struct ReaderSettings {
    pub source_url: String,
    pub tables: Vec<TableName>,
    pub chunk_rows: usize,
    pub batch_bytes: usize,
}

impl Reader {
    /// Starts reading `backfill` from its next page.
    pub fn spawn(backfill: &BackfillProgress, settings: ReaderSettings) -> Self {
        let (tx, chunks) = mpsc::channel(1);
        let job = Job {
            table: settings
                .tables
                .iter()
                .position(|t| t.to_string() == backfill.table)
                .unwrap_or(usize::MAX),
            name: backfill.table.clone(),
            filter: backfill.filter.clone(),
            next_page: backfill.next_page,
            settings,
        };
        Self {
            id: backfill.id.clone(),
            chunks,
            task: tokio::spawn(job.run(tx)),
        }
    }

    /// The next chunk, if one is ready.
    pub fn try_next(&mut self) -> Option<Result<Chunk, String>> {
        self.chunks.try_recv().ok()
    }
}

/// The next chunk of `reader`: pending while there is none (or no reader).
pub(super) async fn next(reader: &mut Option<Reader>) -> Result<Chunk, String> {
    match reader {
        Some(r) => match r.chunks.recv().await {
            Some(chunk) => chunk,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// A reader's work.
struct Job {
    table: usize,
    name: String,
    filter: Option<String>,
    next_page: u64,
    settings: ReaderSettings,
}

/// Rows per page assumed at least when the pages of a chunk are chosen: a chunk reads at
/// most a tenth of its rows in pages.
const MIN_ROWS_PER_PAGE: usize = 10;

impl Job {
    /// Reads until the last chunk is handed over (or the reader is dropped), retrying
    /// what a retry may cure; a failure for good is handed over as the last item.
    async fn run(mut self, tx: mpsc::Sender<Result<Chunk, String>>) {
        let mut backoff = Backoff::reconnect();
        loop {
            match self.read(&tx).await {
                Ok(()) => return,
                Err(error) if error.class() == ErrorClass::Definite => {
                    let _ = tx.send(Err(error_chain(&error))).await;
                    return;
                }
                Err(error) => {
                    tracing::warn!(error = %error_chain(&error), "backfill: reading again after a failure");
                    backoff.wait().await;
                }
            }
        }
    }

    async fn read(&mut self, tx: &mpsc::Sender<Result<Chunk, String>>) -> Result<(), SourceError> {
        let table = TableName::parse(&self.name).map_err(SourceError::Definite)?;
        if self.table == usize::MAX {
            return Err(SourceError::Definite(format!(
                "{table} is not an outbox table of this relay"
            )));
        }
        if let Some(filter) = &self.filter {
            check_filter(filter).map_err(SourceError::Definite)?;
        }
        let query = |context: &str| {
            let context = context.to_string();
            move |source| SourceError::Query { context, source }
        };
        let client = pg::connect(&self.settings.source_url)
            .await
            .map_err(|source| SourceError::Transient {
                context: "connecting to read a backfill".into(),
                source: Some(source),
            })?;
        client
            .batch_execute(&format!(
                "{}; SET default_transaction_read_only = on",
                super::snapshot::FORMATS.replace("SET LOCAL", "SET")
            ))
            .await
            .map_err(query("setting the backfill session's formats"))?;
        let columns: Arc<[ColumnDef]> = source::outbox_columns(&client, &table).await?.into();
        let pages_sql = format!(
            "SELECT (pg_relation_size('{}') / current_setting('block_size')::int8)::text",
            table.quoted().replace('\'', "''")
        );
        let rows_wanted = self.settings.chunk_rows.max(1);
        let most_pages = (rows_wanted / MIN_ROWS_PER_PAGE).max(1) as u64;
        // Rows and bytes per page of what the last chunk returned (none yet: one page).
        let mut pages = 1u64;
        let mut checked = false;
        loop {
            let end = super::snapshot::first_value(
                &client
                    .simple_query(&pages_sql)
                    .await
                    .map_err(query(&format!("reading the size of {table}")))?,
            )
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
            let to = self.next_page.saturating_add(pages);
            let select = select(&table, &columns, self.filter.as_deref(), self.next_page, to);
            if !checked {
                // One statement (a prepared statement cannot hold two).
                client
                    .prepare(&select)
                    .await
                    .map_err(query(&format!("checking the backfill's query on {table}")))?;
                checked = true;
            }
            let rows: Vec<SimpleQueryRow> = if self.next_page < end {
                client
                    .simple_query(&select)
                    .await
                    .map_err(query(&format!("reading a backfill chunk of {table}")))?
                    .into_iter()
                    .filter_map(|m| match m {
                        SimpleQueryMessage::Row(row) => Some(row),
                        _ => None,
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let last = to >= end;
            let bytes: usize = rows
                .iter()
                .map(|row| {
                    (0..columns.len())
                        .filter_map(|c| row.get(c))
                        .map(str::len)
                        .sum::<usize>()
                })
                .sum();
            // The next chunk's pages: about the rows wanted, and about `--batch-bytes`.
            let wanted = match bytes.checked_div(rows.len()) {
                Some(row_bytes) => rows_wanted.min(self.settings.batch_bytes / row_bytes.max(1)),
                None => rows_wanted,
            };
            let per_page = (rows.len() as u64 / pages).max(MIN_ROWS_PER_PAGE as u64);
            pages = (wanted as u64 / per_page).clamp(1, most_pages);
            let chunk = Chunk {
                table: self.table,
                columns: Arc::clone(&columns),
                rows,
                next_page: to,
                last,
            };
            if tx.send(Ok(chunk)).await.is_err() || last {
                return Ok(());
            }
            self.next_page = to;
        }
    }
}

/// The query of a chunk (and what `outbox-relay backfill` checks): the rows of `table`
/// on pages `from` to `to` (excluded) that `filter` selects. The filter stands on lines
/// of its own, around the page range (invariant 5).
pub fn select(
    table: &TableName,
    columns: &[ColumnDef],
    filter: Option<&str>,
    from: u64,
    to: u64,
) -> String {
    let list = columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ");
    let range = format!("ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid");
    match filter {
        Some(filter) => format!(
            "SELECT {list} FROM (SELECT * FROM {} WHERE {range}) AS backfill WHERE (\n{filter}\n)",
            table.quoted()
        ),
        None => format!("SELECT {list} FROM {} WHERE {range}", table.quoted()),
    }
}

/// A filter's parentheses balance, and it holds no `;`, outside its string literals,
/// quoted identifiers and comments: it is one condition, which cannot close the query
/// around it.
pub fn check_filter(filter: &str) -> Result<(), String> {
    let refused = |what: &str| {
        Err(format!(
            "the backfill filter {filter:?} {what}: give one SQL condition on the table's columns"
        ))
    };
    if filter.trim().is_empty() {
        return refused("is empty");
    }
    let b = filter.as_bytes();
    let (mut i, mut depth) = (0usize, 0i64);
    while i < b.len() {
        match b[i] {
            b'\'' | b'"' => {
                let quote = b[i];
                i += 1;
                loop {
                    if i >= b.len() {
                        return refused("has an unterminated quote");
                    }
                    if b[i] == quote {
                        // A doubled quote is one quote character.
                        if b.get(i + 1) == Some(&quote) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => match filter[i + 2..].find("*/") {
                Some(end) => i += 2 + end + 1,
                None => return refused("has an unterminated comment"),
            },
            b'$' => {
                // A dollar quote: $tag$ ... $tag$ (tag: letters, digits, _).
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
                    .map(|p| i + 1 + p);
                if let Some(end) = tag_end.filter(|&e| b[e] == b'$') {
                    let tag = &filter[i..=end];
                    match filter[end + 1..].find(tag) {
                        Some(close) => i = end + 1 + close + tag.len() - 1,
                        None => return refused("has an unterminated dollar quote"),
                    }
                }
            }
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth < 0 {
                    return refused("closes a parenthesis it did not open");
                }
            }
            b';' => return refused("holds a `;`"),
            _ => {}
        }
        i += 1;
    }
    if depth != 0 {
        return refused("leaves a parenthesis open");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> Vec<TableName> {
        vec![TableName::parse("outbox.transactions").unwrap()]
    }

    fn start(id: &str) -> Vec<u8> {
        Request::Start {
            id: id.into(),
            table: "outbox.transactions".into(),
            filter: None,
            slot: None,
        }
        .to_json()
        .into_bytes()
    }

    #[test]
    fn requests_queue_behind_the_active_one_and_finish_in_order() {
        let mut b = Backfills::default();
        assert!(b.request(&start("a"), &tables(), "s"));
        assert!(!b.request(&start("b"), &tables(), "s"), "b waits behind a");
        assert!(
            !b.request(&start("a"), &tables(), "s"),
            "an id is taken once"
        );
        assert_eq!(b.list.len(), 2);
        b.advance(10, 4, false);
        assert_eq!(b.active().unwrap().next_page, 4);
        b.advance(3, 5, true);
        assert_eq!(b.list[0].state, BackfillState::Done);
        assert_eq!(b.list[0].rows, 13);
        assert_eq!(b.active().unwrap().id, "b");
        assert_eq!(
            BackfillProgress::describe_all(&b.list),
            [
                "backfill a of outbox.transactions: done, 13 rows sent",
                "backfill b of outbox.transactions: running, 0 rows sent",
            ]
        );
    }

    #[test]
    fn a_request_for_another_table_fails_at_once_and_a_cancel_stops_the_active_one() {
        let mut b = Backfills::default();
        let other = Request::Start {
            id: "x".into(),
            table: "public.other".into(),
            filter: None,
            slot: None,
        };
        assert!(!b.request(other.to_json().as_bytes(), &tables(), "s"));
        assert_eq!(b.list[0].state, BackfillState::Failed);
        assert!(b.list[0]
            .error
            .as_deref()
            .unwrap()
            .contains("not an outbox table"));
        assert!(b.request(&start("a"), &tables(), "s"));
        let elsewhere = Request::Cancel {
            id: "a".into(),
            slot: Some("another".into()),
        };
        assert!(!b.request(elsewhere.to_json().as_bytes(), &tables(), "s"));
        assert!(
            b.active().is_some(),
            "a request for another slot is not this relay's"
        );
        let cancel = Request::Cancel {
            id: "a".into(),
            slot: Some("s".into()),
        };
        assert!(b.request(cancel.to_json().as_bytes(), &tables(), "s"));
        assert!(b.active().is_none());
        assert!(!b.request(b"not json", &tables(), "s"));
    }

    #[test]
    fn only_the_newest_finished_backfills_are_kept() {
        let mut b = Backfills::default();
        for i in 0..(KEEP_FINISHED + 3) {
            b.request(&start(&i.to_string()), &tables(), "s");
            b.advance(1, 1, true);
        }
        assert_eq!(b.list.len(), KEEP_FINISHED);
        assert_eq!(b.list[0].id, "3");
    }

    #[test]
    fn a_chunk_reads_its_page_range_and_the_filter_stands_apart() {
        let columns = [
            ColumnDef {
                name: "id".into(),
                type_oid: 20,
                key: false,
            },
            ColumnDef {
                name: "amount".into(),
                type_oid: 20,
                key: false,
            },
        ];
        let table = TableName::parse("outbox.transactions").unwrap();
        assert_eq!(
            select(&table, &columns, Some("amount > 0 -- positive"), 4, 9),
            "SELECT \"id\", \"amount\" FROM (SELECT * FROM \"outbox\".\"transactions\" \
             WHERE ctid >= '(4,0)'::tid AND ctid < '(9,0)'::tid) AS backfill \
             WHERE (\namount > 0 -- positive\n)"
        );
        assert_eq!(
            select(&table, &columns, None, 0, 1),
            "SELECT \"id\", \"amount\" FROM \"outbox\".\"transactions\" \
             WHERE ctid >= '(0,0)'::tid AND ctid < '(1,0)'::tid"
        );
    }

    #[test]
    fn a_filter_must_be_one_condition() {
        for ok in [
            "account_id % 3 = 0",
            "created_at >= '2026-11-01' AND (amount > 0 OR amount < -5)",
            "note = 'a ) ; ('' quote' -- a comment with ) and ;",
            "\"odd ) name\" = 1 /* ) ; */ AND x = $$ ) ; $$ AND y = $t$ ( $t$",
        ] {
            assert_eq!(check_filter(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("true) OR (true", "closes a parenthesis"),
            (
                "true)) UNION ALL SELECT * FROM t WHERE ((true",
                "closes a parenthesis",
            ),
            ("(true", "leaves a parenthesis open"),
            ("true; DELETE FROM main.balance", "holds a `;`"),
            ("x = 'open", "unterminated quote"),
            ("x = 1 /* open", "unterminated comment"),
            ("x = $q$ open", "unterminated dollar quote"),
            ("  ", "is empty"),
        ] {
            let error = check_filter(bad).unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }
}
