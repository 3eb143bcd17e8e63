//! Slot creation with an exported snapshot, and the delivery of the rows that were in
//! the outbox at that moment.
//!
//! Invariant: the rows present when the slot is created are delivered exactly once,
//! together with the slot's starting LSN. The sequence is:
//! 1. commit a `snapshot` progress record (the relay is about to create the slot);
//! 2. create the slot on a replication session, exporting its snapshot;
//! 3. read the outbox under that snapshot (exactly the rows committed before the slot's
//!    consistent point; later ones come from the slot);
//! 4. commit those rows and a `streaming` progress record at the consistent point in
//!    ONE destination transaction.
//!
//! A crash before 4 leaves a `snapshot` record and maybe a slot whose rows were never
//! delivered; the next start drops that slot and begins again. A crash after 4 streams
//! from the slot, whose first transactions commit after the consistent point.

use pgwire_replication::ReplicationClient;

use super::{Destination, Pipeline, PipelineError, TxnMeta};
use crate::lsn::Lsn;
use crate::pg;
use crate::progress::{ProgressRecord, ProgressState};
use crate::source::{self, quote_ident, SourceError, SourceInfo};

pub(super) async fn create_slot_and_emit<D: Destination>(
    pipeline: &mut Pipeline<D>,
    info: &SourceInfo,
) -> Result<(ReplicationClient, Lsn), PipelineError> {
    let slot = pipeline.slot.clone();
    // 1. The marker.
    commit_marker(&mut pipeline.dest, &slot).await?;

    // 2. The slot, on a session that stays idle until the snapshot is imported.
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
    tracing::info!(%slot, %consistent_point, "created replication slot");

    // 3. The rows under the snapshot, on the server that exported it.
    let mut client =
        pg::connect_target(&target)
            .await
            .map_err(|source| SourceError::Transient {
                context: "connecting to read the initial snapshot".into(),
                source: Some(source),
            })?;
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
    txn.batch_execute(&format!(
        "SET TRANSACTION SNAPSHOT '{}'",
        snapshot.replace('\'', "''")
    ))
    .await
    .map_err(|source| SourceError::Query {
        context: "importing the slot's snapshot".into(),
        source,
    })?;
    // The same rendering as the replication session's (see source::replication_config),
    // so that snapshot rows and streamed rows are byte for byte alike.
    txn.batch_execute("SET LOCAL datestyle = 'ISO, MDY'; SET LOCAL extra_float_digits = 3; SET LOCAL TimeZone = 'UTC'; SET LOCAL bytea_output = 'hex'; SET LOCAL IntervalStyle = 'postgres'")
        .await
        .map_err(|source| SourceError::Query {
            context: "setting the snapshot session's formats".into(),
            source,
        })?;
    pipeline.dest.begin_txn(TxnMeta {
        commit_lsn: consistent_point,
        xid: None,
        commit_time_micros: None,
    });
    let mut total = 0;
    for (i, table) in pipeline.outbox.tables.iter().enumerate() {
        let columns = &info.columns[i];
        // The simple protocol returns each value as its type's output function prints
        // it, which is what pgoutput sends (a `::text` cast is not always the same:
        // char(n) loses its padding, bool prints true/false).
        let select = format!(
            "SELECT {} FROM {}",
            columns
                .iter()
                .map(|c| quote_ident(&c.name))
                .collect::<Vec<_>>()
                .join(", "),
            table.quoted()
        );
        let messages = txn
            .simple_query(&select)
            .await
            .map_err(|source| SourceError::Query {
                context: format!("reading the outbox {table} under the slot's snapshot"),
                source,
            })?;
        pipeline.dest.set_columns(i, columns)?;
        let mut rows = 0;
        for message in &messages {
            let tokio_postgres::SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            let values: Vec<Option<&[u8]>> = (0..columns.len())
                .map(|c| row.get(c).map(str::as_bytes))
                .collect();
            pipeline.dest.row(i, &values);
            rows += 1;
        }
        total += rows;
    }
    drop(txn);
    pipeline.dest.end_txn();

    // 4. Rows and the streaming record, atomically.
    commit_durably(
        &mut pipeline.dest,
        &slot,
        &ProgressRecord::streaming(consistent_point)
            .of_system(pipeline.system_identifier.as_deref()),
    )
    .await?;
    tracing::info!(%slot, rows = total, "delivered the outbox rows present at slot creation");

    replication
        .start()
        .await
        .map_err(PipelineError::Replication)?;
    Ok((replication, consistent_point))
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
