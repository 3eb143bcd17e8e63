//! Slot creation with an exported snapshot, and the emission of the rows that were in
//! the outbox at that moment.
//!
//! Invariant: the rows present when the slot is created are emitted exactly once, and
//! together with the slot's starting LSN. The sequence is:
//! 1. commit a `snapshot` progress record (the relay is about to create the slot);
//! 2. create the slot on a replication session, exporting its snapshot;
//! 3. read the outbox under that snapshot (exactly the rows committed before the slot's
//!    consistent point; later ones come from the slot);
//! 4. commit those rows and a `streaming` progress record at the consistent point in
//!    ONE Kafka transaction.
//!
//! A crash before 4 leaves a `snapshot` record and maybe a slot whose rows never
//! reached Kafka; the next start drops that slot and begins again. A crash after 4
//! streams from the slot and skips nothing that matters.

use bytes::Bytes;
use pgwire_replication::ReplicationClient;

use super::{txn_headers, Batch, Connector, ConnectorError, OutRecord};
use crate::kafka::encode::{self, ColumnSpec};
use crate::kafka::{ProgressRecord, ProgressState};
use crate::lsn::Lsn;
use crate::pg;
use crate::source::{self, quote_ident, SourceError, SourceInfo};

pub(super) async fn create_slot_and_emit(
    connector: &mut Connector,
    info: &SourceInfo,
) -> Result<(ReplicationClient, Lsn), ConnectorError> {
    let args = connector.args.clone();
    let slot = args.slot.as_str();

    // 1. The marker.
    let marker = ProgressRecord {
        state: ProgressState::Snapshot,
        lsn: Lsn::ZERO.to_string(),
    };
    let producer = &mut connector.producer;
    tokio::task::block_in_place(|| {
        producer.commit(
            &args.kafka.topic,
            &Batch::default(),
            &args.progress_topic,
            slot,
            &marker,
        )
    })?;

    // 2. The slot, on a session that stays idle until the snapshot is imported.
    let config =
        source::replication_config(&args.source.source_url, slot, &args.publication, Lsn::ZERO)?;
    let mut replication = ReplicationClient::connect_gated(config)
        .await
        .map_err(ConnectorError::Replication)?;
    let command = if info.server_version_num >= 150000 {
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')",
            quote_ident(slot)
        )
    } else {
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(slot)
        )
    };
    let rows = replication
        .simple_query(&command)
        .await
        .map_err(ConnectorError::Replication)?;
    let text = |i: usize| -> Option<String> {
        rows.first()
            .and_then(|r| r.get(i))
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let consistent_point: Lsn = text(1).and_then(|s| s.parse().ok()).ok_or_else(|| {
        ConnectorError::Definite("CREATE_REPLICATION_SLOT returned no consistent point".into())
    })?;
    let snapshot = text(2).ok_or_else(|| {
        ConnectorError::Definite("CREATE_REPLICATION_SLOT exported no snapshot".into())
    })?;
    tracing::info!(slot, %consistent_point, "created replication slot");

    // 3. The rows under the snapshot.
    let mut client = pg::connect(&args.source.source_url)
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
    let select = format!(
        "SELECT {} FROM {}",
        info.columns
            .iter()
            .map(|c| format!("{}::text", quote_ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", "),
        connector.table.quoted()
    );
    let rows = txn
        .query(&select, &[])
        .await
        .map_err(|source| SourceError::Query {
            context: "reading the outbox under the slot's snapshot".into(),
            source,
        })?;
    drop(txn);

    let specs: Vec<ColumnSpec> = info
        .columns
        .iter()
        .map(|c| ColumnSpec::new(&c.name, c.type_oid))
        .collect();
    let key = info
        .columns
        .iter()
        .position(|c| c.name == args.key_column)
        .ok_or_else(|| {
            ConnectorError::Definite(format!(
                "--key-column {} is not a column of {}",
                args.key_column, connector.table
            ))
        })?;
    let mut batch = Batch {
        headers: vec![txn_headers(consistent_point, None, None)],
        ..Batch::default()
    };
    for row in &rows {
        let values: Vec<Option<String>> = (0..specs.len()).map(|i| row.get(i)).collect();
        let mut value = Vec::with_capacity(128);
        encode::encode_row(
            &mut value,
            &specs,
            values.iter().map(|v| v.as_deref().map(str::as_bytes)),
        );
        batch.value_bytes += value.len();
        batch.records.push(OutRecord {
            key: values
                .get(key)
                .and_then(|v| v.as_deref())
                .map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: Bytes::from(value),
            txn: 0,
        });
    }

    // 4. Rows and the streaming record, atomically.
    let progress = ProgressRecord::streaming(consistent_point);
    let producer = &mut connector.producer;
    tokio::task::block_in_place(|| {
        producer.commit(
            &args.kafka.topic,
            &batch,
            &args.progress_topic,
            slot,
            &progress,
        )
    })?;
    tracing::info!(
        slot,
        rows = batch.records.len(),
        "emitted the outbox rows present at slot creation"
    );

    replication
        .start()
        .await
        .map_err(ConnectorError::Replication)?;
    Ok((replication, consistent_point))
}
