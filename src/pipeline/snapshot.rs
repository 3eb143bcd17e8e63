//! Slot creation with an exported snapshot, and the delivery, in chunks, of the rows
//! that were in the outbox at that moment.
//!
//! # Invariants
//! 1. The rows present when the slot is created (those of source transactions that
//!    committed before its consistent point) are delivered exactly once, and before
//!    anything of the slot's stream; the stream starts at the consistent point.
//! 2. Memory is bounded: rows are read through a cursor, at most one chunk at a time, and
//!    committed in chunks of at most `--batch-size` rows (and `--batch-bytes`), each
//!    with a `snapshot` progress record that says how far the snapshot got
//!    ([`SnapshotProgress`]). A table without a primary key is the exception: it has no
//!    order to resume in, so its rows are one chunk (and held in memory).
//! 3. An interrupted snapshot (a kill of the relay, of pg_start, a broker) resumes
//!    after its last committed chunk and never repeats or skips a row (see "Resuming").
//!
//! # The sequence
//! 1. commit a `snapshot` marker (the relay is about to create the slot);
//! 2. create the slot on a replication session, exporting its snapshot;
//! 3. read the outbox under that snapshot, table by table, each in primary-key order,
//!    and commit each chunk with a `snapshot` record (the tables done, the last key);
//! 4. commit a `streaming` record at the consistent point, and stream.
//!
//! A crash before the first chunk leaves the marker alone (and maybe a slot): nothing
//! was delivered, so the next start drops that slot and begins again.
//!
//! # Resuming
//! The exported snapshot dies with the session that created the slot, so a resumed
//! read takes a fresh one, and notes pg_start's WAL insert position right after
//! (`upto`): every transaction the fresh snapshot sees committed before `upto`. It
//! sees more than the slot's snapshot did: the transactions that committed between the
//! consistent point and `upto`, which the slot's stream delivers. Their outbox rows are
//! found by peeking the slot (`pg_logical_slot_peek_binary_changes`, which consumes
//! nothing) up to `upto`, and the resumed read skips rows with those keys. Peeking past
//! the fresh snapshot is harmless (a key it does not hold skips nothing). So the
//! resumed read delivers exactly the rows of the slot's snapshot that no chunk
//! delivered, except rows deleted meanwhile (which a service does not do to outbox
//! rows it has not seen relayed). The keys peeked are held in memory: as many as the
//! outbox rows written while the snapshot was interrupted.

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::{pin_mut, TryStreamExt};
use pgwire_replication::ReplicationClient;
use tokio_postgres::{SimpleQueryMessage, Transaction};

use super::{Committed, Destination, Pipeline, PipelineError, TxnMeta};
use crate::lsn::Lsn;
use crate::pg;
use crate::pgoutput::{self, LogicalMessage};
use crate::progress::{ProgressRecord, ProgressState, SnapshotProgress};
use crate::source::{self, quote_ident, SourceError, SourceInfo};

/// Rows per `FETCH` from the snapshot's cursor, at most (and at most `--batch-size`).
const FETCH_ROWS: usize = 10_000;

/// The formats of the replication session (see [`source::replication_config`]), so
/// that snapshot rows and streamed rows are byte for byte alike.
pub(super) const FORMATS: &str = "SET LOCAL datestyle = 'ISO, MDY'; SET LOCAL extra_float_digits = 3; \
    SET LOCAL TimeZone = 'UTC'; SET LOCAL bytea_output = 'hex'; SET LOCAL IntervalStyle = 'postgres'";

/// Outbox rows that the slot's stream delivers, each with how many times: (table
/// index, the row's values in the table's column order, as their output functions
/// print them).
type Streamed = HashMap<(usize, Vec<Option<String>>), usize>;

pub(super) async fn create_slot_and_emit<D: Destination>(
    pipeline: &mut Pipeline<D>,
    info: &SourceInfo,
) -> Result<(ReplicationClient, Lsn), PipelineError> {
    let slot = pipeline.slot.clone();
    // 1. The marker.
    pipeline.check_lease()?;
    commit_marker(&mut pipeline.dest, &slot).await?;

    // 2. The slot, on a session that stays idle until the snapshot is imported.
    let (mut replication, target, consistent_point, snapshot) = create(pipeline, info).await?;
    tracing::info!(%slot, %consistent_point, "created replication slot");

    // 3. The rows under the snapshot, on the server that exported it.
    let mut client = connect(&target).await?;
    let txn = snapshot_transaction(&mut client, Some(&snapshot)).await?;
    let mut progress = SnapshotProgress {
        consistent_point: consistent_point.to_string(),
        ..Default::default()
    };
    let rows = deliver(pipeline, info, &txn, &mut progress, Streamed::new()).await?;
    drop(txn);
    tracing::info!(%slot, rows, "delivered the outbox rows present at slot creation");

    replication
        .start()
        .await
        .map_err(PipelineError::Replication)?;
    Ok((replication, consistent_point))
}

/// Resumes a snapshot interrupted after `progress` (see "Resuming"), with the slot
/// free and its creation lock held. Returns the slot's consistent point, where its
/// stream starts.
pub(super) async fn resume<D: Destination>(
    pipeline: &mut Pipeline<D>,
    info: &SourceInfo,
    mut progress: SnapshotProgress,
) -> Result<Lsn, PipelineError> {
    let slot = pipeline.slot.clone();
    let consistent_point: Lsn = progress.consistent_point.parse().map_err(|_| {
        PipelineError::Definite(format!(
            "the snapshot progress of slot {slot} has an unreadable consistent point {:?}",
            progress.consistent_point
        ))
    })?;
    pipeline.dest.clear();
    let target = source::replication_target(&pipeline.source_url).await?;
    let mut client = connect(&target).await?;
    let txn = snapshot_transaction(&mut client, None).await?;
    // The snapshot is taken by this statement, and the position read after it.
    let upto = txn
        .simple_query("SELECT pg_current_wal_insert_lsn()::text")
        .await
        .map_err(|source| SourceError::Query {
            context: "taking a fresh snapshot to resume the initial one".into(),
            source,
        })?;
    let upto = first_value(&upto).unwrap_or_default();
    let streamed = streamed_since(pipeline, info, &target, &upto).await?;
    tracing::info!(
        %slot,
        %consistent_point,
        %upto,
        delivered = ?progress.delivered,
        streamed = streamed.values().sum::<usize>(),
        "resuming the slot's initial snapshot under a fresh one"
    );
    let rows = deliver(pipeline, info, &txn, &mut progress, streamed).await?;
    tracing::info!(%slot, rows, "delivered the rest of the outbox rows present at slot creation");
    Ok(consistent_point)
}

/// Creates the slot: its replication session (not started), the server, the
/// consistent point and the exported snapshot's name.
async fn create<D: Destination>(
    pipeline: &mut Pipeline<D>,
    info: &SourceInfo,
) -> Result<(ReplicationClient, pg::PgTarget, Lsn, String), PipelineError> {
    let slot = pipeline.slot.clone();
    let target = source::replication_target(&pipeline.source_url).await?;
    let config = source::replication_config(
        &target,
        &slot,
        &pipeline.args.outbox.publication,
        Lsn::ZERO,
        pipeline.silence,
    );
    let mut replication = ReplicationClient::connect_gated(config)
        .await
        .map_err(PipelineError::Replication)?;
    let system = replication
        .identify_system()
        .await
        .map_err(PipelineError::Replication)?;
    pipeline.system_identifier = Some(system.system_id);
    let command = if info.server_version_num >= 170000 && !pipeline.args.no_failover_slot {
        // Synchronised to standbys that ask for it (`sync_replication_slots`).
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER true)",
            quote_ident(&slot)
        )
    } else if info.server_version_num >= 150000 {
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')",
            quote_ident(&slot)
        )
    } else {
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(&slot)
        )
    };
    let rows = replication
        .simple_query(&command)
        .await
        .map_err(PipelineError::Replication)?;
    let text = |i: usize| -> Option<String> {
        rows.first()
            .and_then(|r| r.get(i))
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let consistent_point: Lsn = text(1).and_then(|s| s.parse().ok()).ok_or_else(|| {
        PipelineError::Definite("CREATE_REPLICATION_SLOT returned no consistent point".into())
    })?;
    let snapshot = text(2).ok_or_else(|| {
        PipelineError::Definite("CREATE_REPLICATION_SLOT exported no snapshot".into())
    })?;
    Ok((replication, target, consistent_point, snapshot))
}

async fn connect(target: &pg::PgTarget) -> Result<tokio_postgres::Client, PipelineError> {
    Ok(pg::connect_target(target)
        .await
        .map_err(|source| SourceError::Transient {
            context: "connecting to read the initial snapshot".into(),
            source: Some(source),
        })?)
}

/// A read-only repeatable-read transaction under `snapshot` (an exported one), or
/// under the one its first query takes, with the replication session's formats.
async fn snapshot_transaction<'c>(
    client: &'c mut tokio_postgres::Client,
    snapshot: Option<&str>,
) -> Result<Transaction<'c>, PipelineError> {
    let txn = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|source| SourceError::Query {
            context: "starting the snapshot transaction".into(),
            source,
        })?;
    if let Some(snapshot) = snapshot {
        txn.batch_execute(&format!(
            "SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
        ))
        .await
        .map_err(|source| SourceError::Query {
            context: "importing the slot's snapshot".into(),
            source,
        })?;
    }
    txn.batch_execute(FORMATS)
        .await
        .map_err(|source| SourceError::Query {
            context: "setting the snapshot session's formats".into(),
            source,
        })?;
    Ok(txn)
}

pub(super) fn first_value(messages: &[SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
        _ => None,
    })
}

/// The order in which a table's snapshot is read, and resumed.
struct SnapshotKey {
    /// The key's columns (indexes among the table's): its primary key, or else its
    /// event id column (the route's `id`, by default a column named `id`); none if it
    /// has neither.
    columns: Vec<usize>,
    /// The primary key: no two rows share it. Otherwise the rows' `ctid` breaks ties
    /// (the position then ends with it).
    unique: bool,
}

impl SnapshotKey {
    fn of<D: Destination>(pipeline: &Pipeline<D>, info: &SourceInfo, table: usize) -> Self {
        let columns = &info.columns[table];
        let primary: Vec<usize> = (0..columns.len()).filter(|&c| columns[c].key).collect();
        if !primary.is_empty() {
            return Self {
                columns: primary,
                unique: true,
            };
        }
        let id = pipeline
            .outbox
            .ids
            .get(table)
            .cloned()
            .flatten()
            .unwrap_or_else(|| "id".to_string());
        Self {
            columns: columns
                .iter()
                .position(|c| c.name == id)
                .into_iter()
                .collect(),
            unique: false,
        }
    }
}

/// The outbox rows of the transactions the slot streams up to `upto` (see
/// "Resuming"), read by peeking the slot, which must be free.
async fn streamed_since<D: Destination>(
    pipeline: &Pipeline<D>,
    info: &SourceInfo,
    target: &pg::PgTarget,
    upto: &str,
) -> Result<Streamed, PipelineError> {
    let client = connect(target).await?;
    let query = |context: &'static str| {
        move |source| -> PipelineError {
            SourceError::Query {
                context: context.into(),
                source,
            }
            .into()
        }
    };
    client
        .batch_execute(&FORMATS.replace("SET LOCAL", "SET"))
        .await
        .map_err(query("setting the peeking session's formats"))?;
    let publication = quote_ident(&pipeline.args.outbox.publication);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&pipeline.slot, &upto, &publication];
    let rows = client
        .query_raw(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1::text::name, \
             $2::text::pg_lsn, NULL, 'proto_version', '1', 'publication_names', $3::text)",
            params,
        )
        .await
        .map_err(query("peeking the slot for the rows it streams"))?;
    pin_mut!(rows);
    // Per relation: its outbox table, and where each of the table's columns is in it.
    let mut relations: Vec<(u32, usize, Vec<Option<usize>>)> = Vec::new();
    let mut streamed = Streamed::new();
    while let Some(row) = rows
        .try_next()
        .await
        .map_err(query("peeking the slot for the rows it streams"))?
    {
        let data: Vec<u8> = row.get(0);
        let message =
            pgoutput::decode(&Bytes::from(data)).map_err(|source| PipelineError::Decode {
                lsn: Lsn::ZERO,
                source,
            })?;
        match message {
            LogicalMessage::Relation(relation) => {
                let Some(table) = pipeline
                    .outbox
                    .tables
                    .iter()
                    .position(|t| relation.namespace == t.schema && relation.name == t.name)
                else {
                    continue;
                };
                let places = info.columns[table]
                    .iter()
                    .map(|column| relation.columns.iter().position(|c| c.name == column.name))
                    .collect();
                relations.retain(|(rel, _, _)| *rel != relation.rel_id);
                relations.push((relation.rel_id, table, places));
            }
            LogicalMessage::Insert(insert) => {
                let Some((_, table, places)) =
                    relations.iter().find(|(rel, _, _)| *rel == insert.rel_id)
                else {
                    continue;
                };
                let values = places
                    .iter()
                    .map(|place| {
                        place
                            .and_then(|p| insert.new.columns.get(p))
                            .and_then(|c| c.as_text())
                            .map(|b| String::from_utf8_lossy(b).into_owned())
                    })
                    .collect();
                *streamed.entry((*table, values)).or_default() += 1;
            }
            _ => {}
        }
    }
    Ok(streamed)
}

/// Delivers, under `txn`'s snapshot, the outbox rows `progress` does not cover and
/// `streamed` does not hold, in chunks each committed with a `snapshot` record; then
/// commits the `streaming` record at the consistent point. Returns the rows delivered.
async fn deliver<D: Destination>(
    pipeline: &mut Pipeline<D>,
    info: &SourceInfo,
    txn: &Transaction<'_>,
    progress: &mut SnapshotProgress,
    streamed: Streamed,
) -> Result<u64, PipelineError> {
    let mut committing = None;
    let delivered = deliver_chunks(pipeline, info, txn, progress, streamed, &mut committing).await;
    if delivered.is_err() {
        // No commit is left running behind the session (the next one reads the
        // destination's progress).
        let _ = settle(&mut pipeline.dest, committing).await;
    }
    delivered
}

/// [`deliver`]'s work; `committing` is the chunk commit it leaves running on an error.
async fn deliver_chunks<D: Destination>(
    pipeline: &mut Pipeline<D>,
    info: &SourceInfo,
    txn: &Transaction<'_>,
    progress: &mut SnapshotProgress,
    mut streamed: Streamed,
    committing: &mut Option<Committing>,
) -> Result<u64, PipelineError> {
    let slot = pipeline.slot.clone();
    let consistent_point: Lsn = progress.consistent_point.parse().unwrap_or(Lsn::ZERO);
    let system = pipeline.system_identifier.clone();
    let record = |progress: &SnapshotProgress| {
        ProgressRecord::snapshot(progress.clone()).of_system(system.as_deref())
    };
    let meta = TxnMeta {
        commit_lsn: consistent_point,
        xid: None,
        commit_time_micros: None,
    };
    let tables = pipeline.outbox.tables.clone();
    let mut total = 0;
    for (i, table) in tables.iter().enumerate() {
        let name = table.to_string();
        if progress.delivered.done.contains(&name) {
            continue;
        }
        let columns = &info.columns[i];
        pipeline.dest.set_columns(i, columns)?;
        let key = SnapshotKey::of(pipeline, info, i);
        let keys = key.columns.clone();
        if keys.is_empty() {
            tracing::warn!(
                table = %name,
                "the outbox table has neither a primary key nor an event id column: its \
                 initial snapshot is one chunk, held in memory, and read again whole if \
                 interrupted; give it a primary key"
            );
        }
        // The position: the key's columns, and `ctid` where the key may repeat.
        let mut position: Vec<String> = keys
            .iter()
            .map(|&k| quote_ident(&columns[k].name))
            .collect();
        if !key.unique && !keys.is_empty() {
            position.push("ctid".into());
        }
        let key_list = position.join(", ");
        let literal = |v: &str| format!("'{}'", v.replace('\'', "''"));
        let resumed = progress.delivered.table.as_deref() == Some(name.as_str())
            && !keys.is_empty()
            && progress.delivered.after.len() == position.len();
        let after = match progress.delivered.after.as_slice() {
            _ if !resumed => String::new(),
            // A primary key: never NULL.
            after if key.unique => format!(
                " WHERE ({key_list}) > ({})",
                after
                    .iter()
                    .map(|v| literal(v.as_deref().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            // An event id, then ctid: NULL ids come last (ORDER BY puts them there).
            [Some(id), Some(ctid)] => format!(
                " WHERE ({key_list}) > ({}, {}) OR {} IS NULL",
                literal(id),
                literal(ctid),
                position[0]
            ),
            [None, Some(ctid)] => format!(
                " WHERE {} IS NULL AND ctid > {}",
                position[0],
                literal(ctid)
            ),
            _ => String::new(),
        };
        let order = if keys.is_empty() {
            String::new()
        } else {
            format!(" ORDER BY {key_list}")
        };
        // The simple protocol returns each value as its type's output function prints
        // it, which is what pgoutput sends (a `::text` cast is not always the same:
        // char(n) loses its padding, bool prints true/false).
        let tie = if position.len() > keys.len() {
            ", ctid"
        } else {
            ""
        };
        let select = format!(
            "SELECT {}{tie} FROM {}{after}{order}",
            columns
                .iter()
                .map(|c| quote_ident(&c.name))
                .collect::<Vec<_>>()
                .join(", "),
            table.quoted()
        );
        let failed = |context: String| {
            move |source| -> PipelineError { SourceError::Query { context, source }.into() }
        };
        txn.batch_execute(&format!(
            "DECLARE outbox_relay_snapshot NO SCROLL CURSOR FOR {select}"
        ))
        .await
        .map_err(failed(format!(
            "reading the outbox {table} under the slot's snapshot"
        )))?;
        // Rows per FETCH: at most a chunk, and about `--batch-bytes` at the size of the
        // rows fetched so far (the first FETCH takes few).
        let most = FETCH_ROWS.min(pipeline.args.batch_size).max(1);
        let mut fetch_rows = most.min(100);
        loop {
            let fetch = format!("FETCH FORWARD {fetch_rows} FROM outbox_relay_snapshot");
            let messages = txn.simple_query(&fetch).await.map_err(failed(format!(
                "reading the outbox {table} under the slot's snapshot"
            )))?;
            let mut fetched = 0;
            let mut fetched_bytes = 0;
            let mut open = false;
            let mut last = None;
            for message in &messages {
                let SimpleQueryMessage::Row(row) = message else {
                    continue;
                };
                fetched += 1;
                last = Some(row);
                if !streamed.is_empty() {
                    // A row the stream delivers too (see "Resuming").
                    let values = (0..columns.len())
                        .map(|c| row.get(c).map(str::to_string))
                        .collect();
                    if let Some(n) = streamed.get_mut(&(i, values)).filter(|n| **n > 0) {
                        *n -= 1;
                        continue;
                    }
                }
                if !open {
                    pipeline.dest.begin_txn(meta);
                    open = true;
                }
                let values: Vec<Option<&[u8]>> = (0..columns.len())
                    .map(|c| row.get(c).map(str::as_bytes))
                    .collect();
                fetched_bytes += values.iter().flatten().map(|v| v.len()).sum::<usize>();
                pipeline.dest.row(i, &values);
                total += 1;
                progress.rows += 1;
            }
            if open {
                pipeline.dest.end_txn();
            }
            let finished = fetched < fetch_rows;
            if let Some(row_bytes) = fetched_bytes.checked_div(fetched) {
                fetch_rows = (pipeline.args.batch_bytes / row_bytes.max(1)).clamp(1, most);
            }
            if finished {
                progress.delivered.done.push(name.clone());
                progress.delivered.table = None;
                progress.delivered.after.clear();
            } else if let Some(row) = last.filter(|_| !keys.is_empty()) {
                // The position of the last row fetched (only its key is kept).
                let mut key: Vec<Option<String>> = keys
                    .iter()
                    .map(|&k| row.get(k).map(str::to_string))
                    .collect();
                if !tie.is_empty() {
                    key.push(row.get(columns.len()).map(str::to_string));
                }
                progress.delivered.table = Some(name.clone());
                progress.delivered.after = key;
            }
            let (rows, bytes) = pipeline.dest.batch_size();
            let full = rows >= pipeline.args.batch_size || bytes >= pipeline.args.batch_bytes;
            if finished || (full && !keys.is_empty()) {
                // The chunk before is durable before this one's commit starts; this one
                // commits while the next is read. A stop is taken here, once a chunk is
                // durable (the snapshot resumes after it).
                let settled = committing.is_some();
                settle(&mut pipeline.dest, committing.take()).await?;
                if settled && pipeline.stopping() {
                    return Err(PipelineError::Stopped);
                }
                pipeline.check_lease()?;
                *committing = Some(tokio::spawn(pipeline.dest.commit(&slot, &record(progress))));
            }
            if finished {
                break;
            }
        }
        txn.batch_execute("CLOSE outbox_relay_snapshot")
            .await
            .map_err(failed(format!("closing the snapshot's cursor on {table}")))?;
    }
    settle(&mut pipeline.dest, committing.take()).await?;
    // 4. The stream starts at the consistent point.
    pipeline.check_lease()?;
    commit_durably(
        &mut pipeline.dest,
        &slot,
        &ProgressRecord::streaming(consistent_point).of_system(system.as_deref()),
    )
    .await?;
    Ok(total)
}

/// A chunk's commit, running.
type Committing = tokio::task::JoinHandle<Result<Committed, PipelineError>>;

/// Waits until the chunk being committed, if any, is durable.
async fn settle<D: Destination>(
    dest: &mut D,
    committing: Option<Committing>,
) -> Result<(), PipelineError> {
    let Some(committing) = committing else {
        return Ok(());
    };
    let committed = committing.await.map_err(|e| {
        PipelineError::Definite(format!("a snapshot chunk's commit panicked: {e}"))
    })??;
    make_durable(dest, committed).await?;
    #[cfg(feature = "fault-injection")]
    {
        AFTER_CHUNK.pass();
        FREEZE_AFTER_CHUNK.pass();
    }
    Ok(())
}

/// Commits the snapshot marker, alone: whatever an earlier session left in the batch
/// must not ride along with it (nor with the snapshot after it); that is read again
/// from the slot, or the new snapshot.
async fn commit_marker<D: Destination>(dest: &mut D, slot: &str) -> Result<(), PipelineError> {
    dest.clear();
    let marker = ProgressRecord {
        state: ProgressState::Snapshot,
        lsn: Lsn::ZERO.to_string(),
        system_identifier: None,
        snapshot: None,
        backfills: Vec::new(),
    };
    commit_durably(dest, slot, &marker).await
}

/// Commits the destination's batch with `progress` and returns once both are durable:
/// each step above relies on the one before having survived any crash.
async fn commit_durably<D: Destination>(
    dest: &mut D,
    slot: &str,
    progress: &ProgressRecord,
) -> Result<(), PipelineError> {
    let committed = dest.commit(slot, progress).await?;
    make_durable(dest, committed).await
}

/// Returns once what `committed` says was committed is durable.
async fn make_durable<D: Destination>(
    dest: &mut D,
    committed: Committed,
) -> Result<(), PipelineError> {
    if let Some(needed) = committed.flush_needed {
        if committed.flushed < needed {
            let flushed = dest.sync().await?;
            if flushed < needed {
                return Err(PipelineError::Definite(format!(
                    "the destination made its log durable only to {flushed}, not to {needed}"
                )));
            }
        }
    }
    Ok(())
}

/// Test hook: `OUTBOX_RELAY_TEST_CRASH_AFTER_SNAPSHOT_CHUNKS=N` aborts the process
/// right after the Nth chunk of the initial snapshot is committed, to prove that the
/// snapshot resumes after it.
#[cfg(feature = "fault-injection")]
static AFTER_CHUNK: super::CrashPoint = super::CrashPoint::new(
    "OUTBOX_RELAY_TEST_CRASH_AFTER_SNAPSHOT_CHUNKS",
    "aborting after a snapshot chunk was committed",
);

/// Test hook: `OUTBOX_RELAY_TEST_FREEZE_AFTER_SNAPSHOT_CHUNKS=N` stops the process
/// (SIGSTOP) right after the Nth chunk of the initial snapshot is committed, holding
/// the slot creation lock, to prove that a standby takes the snapshot over.
#[cfg(feature = "fault-injection")]
static FREEZE_AFTER_CHUNK: super::CrashPoint = super::CrashPoint::freezing(
    "OUTBOX_RELAY_TEST_FREEZE_AFTER_SNAPSHOT_CHUNKS",
    "freezing after a snapshot chunk was committed",
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::testing::Counting;

    #[tokio::test]
    async fn the_snapshot_marker_carries_nothing_an_earlier_session_left_in_the_batch() {
        let mut dest = Counting::default();
        // An earlier session's batch: a complete transaction, never committed.
        dest.begin_txn(TxnMeta {
            commit_lsn: Lsn(100),
            xid: Some(7),
            commit_time_micros: None,
        });
        dest.row(0, &[Some(b"1".as_slice())]);
        dest.row(0, &[Some(b"2".as_slice())]);
        dest.end_txn();
        commit_marker(&mut dest, "slot").await.unwrap();
        assert_eq!(dest.committed, vec![(0, ProgressState::Snapshot)]);
    }
}
