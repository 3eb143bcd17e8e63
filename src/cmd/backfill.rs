//! `outbox-relay backfill`: asks the relays streaming from pg_start to send an outbox
//! table's rows again (see `crate::pipeline::backfill`), or to stop doing so.
//!
//! The request is a transactional logical message written into pg_start's WAL: the
//! relays read it in their stream, so it needs no table, no restart and no new slot,
//! and it is taken exactly once (with the progress of the relay's destination).
//! Before writing it, the command checks what the relay would refuse later: the table
//! exists, and the filter is one read-only SQL condition over it (balanced, no `;`,
//! and the relay's own query is prepared here, which plans it without running it).

use thiserror::Error;

use crate::config::SourceArgs;
use crate::pg;
use crate::pipeline::backfill::{self, Request};
use crate::source::{self, SourceError, TableName};

#[derive(clap::Args, Debug, Clone)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// The outbox table whose rows are sent again, schema-qualified.
    #[arg(long, env = "OUTBOX_RELAY_TABLE", default_value = crate::config::DEFAULT_TABLE)]
    pub table: String,
    /// A WHERE clause over the table that selects the rows to send (default: all),
    /// e.g. `created_at >= '2026-11-01'` or `id BETWEEN 1000 AND 2000`.
    #[arg(long = "where", value_name = "SQL")]
    pub filter: Option<String>,
    /// The backfill's id (default: `backfill-` and the time): what `status` shows and
    /// the records' `outbox-relay.backfill` header holds. Used once: a relay ignores a
    /// request with an id it has taken before (a repeated command runs nothing twice).
    #[arg(long)]
    pub id: Option<String>,
    /// Only the relay of this slot takes the request (default: every relay streaming
    /// from pg_start's database, the connector and direct mode alike).
    #[arg(long = "for-slot", value_name = "SLOT")]
    pub for_slot: Option<String>,
    /// Stop the backfill with this id where it is, instead of starting one.
    #[arg(long, value_name = "ID", conflicts_with_all = ["filter", "id"])]
    pub cancel: Option<String>,
}

#[derive(Debug, Error)]
pub enum BackfillError {
    #[error("cannot connect to pg_start ({url})")]
    Connect {
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{0}")]
    Refused(String),
    #[error("the filter is not a read-only SQL condition on {table}: {detail}")]
    Filter { table: String, detail: String },
    #[error("writing the request into pg_start's WAL")]
    Emit(#[source] tokio_postgres::Error),
}

/// What was requested.
#[derive(Debug)]
pub struct Requested {
    pub request: Request,
    /// The request's position in pg_start's WAL.
    pub lsn: String,
    /// The slots whose relays read it.
    pub slots: Vec<String>,
}

/// Checks the request and writes it into pg_start's WAL.
pub async fn run(args: &BackfillArgs) -> Result<Requested, BackfillError> {
    let url = &args.source.source_url;
    let client = pg::connect(url)
        .await
        .map_err(|source| BackfillError::Connect {
            url: pg::redact_url(url),
            source,
        })?;
    let request = match &args.cancel {
        Some(id) => Request::Cancel {
            id: id.clone(),
            slot: args.for_slot.clone(),
        },
        None => {
            let table = TableName::parse(&args.table)
                .map_err(|e| BackfillError::Refused(format!("--table: {e}")))?;
            check(&client, &table, args.filter.as_deref()).await?;
            Request::Start {
                id: args.id.clone().unwrap_or_else(|| {
                    format!(
                        "backfill-{}",
                        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
                    )
                }),
                table: table.to_string(),
                filter: args.filter.clone(),
                slot: args.for_slot.clone(),
            }
        }
    };
    let slots = reading_slots(&client, args.for_slot.as_deref()).await?;
    let lsn: String = client
        .query_one(
            "SELECT pg_logical_emit_message(true, $1, $2)::text",
            &[&backfill::PREFIX, &request.to_json()],
        )
        .await
        .map_err(BackfillError::Emit)?
        .get(0);
    Ok(Requested {
        request,
        lsn,
        slots,
    })
}

/// The pgoutput slots of pg_start's database (only `for_slot`, if given): a request
/// reaches the relays streaming from them, and is lost on a database without one (a
/// slot made later starts after it).
async fn reading_slots(
    client: &tokio_postgres::Client,
    for_slot: Option<&str>,
) -> Result<Vec<String>, BackfillError> {
    let slots: Vec<String> = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots \
             WHERE database = current_database() AND plugin = 'pgoutput' ORDER BY 1",
            &[],
        )
        .await
        .map_err(|source| SourceError::Query {
            context: "listing the replication slots".into(),
            source,
        })?
        .iter()
        .map(|r| r.get(0))
        .collect();
    match for_slot {
        Some(slot) if !slots.iter().any(|s| s == slot) => {
            Err(BackfillError::Refused(format!(
            "--for-slot {slot}: pg_start's database has no pgoutput slot of that name (it has: {})",
            if slots.is_empty() { "none".into() } else { slots.join(", ") }
        )))
        }
        Some(slot) => Ok(vec![slot.to_string()]),
        None if slots.is_empty() => Err(BackfillError::Refused(
            "pg_start's database has no pgoutput slot: no relay streams from it, so none \
             would read the request (start the relay first)"
                .into(),
        )),
        None => Ok(slots),
    }
}

/// The table exists and is a plain table, and the relay's query over it with `filter`
/// is one condition that plans in a read-only transaction (prepared, never run).
async fn check(
    client: &tokio_postgres::Client,
    table: &TableName,
    filter: Option<&str>,
) -> Result<(), BackfillError> {
    let columns = source::outbox_columns(client, table).await?;
    // The relay reads a table's own pages: a view or a partitioned parent has none.
    let kind: String = client
        .query_one(
            "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)",
            &[&table.quoted()],
        )
        .await
        .map_err(|source| SourceError::Query {
            context: format!("reading what {table} is"),
            source,
        })?
        .get(0);
    if kind != "r" {
        return Err(BackfillError::Refused(format!(
            "{table} is not a plain table (pg_class.relkind {kind}): a backfill reads a table's \
             own pages; name the outbox table the relay streams"
        )));
    }
    if let Some(filter) = filter {
        backfill::check_filter(filter).map_err(BackfillError::Refused)?;
        let query = backfill::select(table, &columns, Some(filter), 0, 1);
        let refused = |e: tokio_postgres::Error| BackfillError::Filter {
            table: table.to_string(),
            detail: e
                .as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_string()),
        };
        client
            .batch_execute("BEGIN READ ONLY")
            .await
            .map_err(refused)?;
        let prepared = client.prepare(&query).await;
        client.batch_execute("ROLLBACK").await.map_err(refused)?;
        prepared.map_err(refused)?;
    }
    Ok(())
}
