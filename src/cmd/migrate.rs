//! Applies the schemas in `sql/` to pg_start and pg_end.
//!
//! Invariants:
//! - applying them any number of times, even from several processes at once, leaves the
//!   same schema (each script is idempotent and runs under an advisory lock);
//! - `--relay-only` creates the relay's own bookkeeping (the schema `outbox_relay` in
//!   pg_end) and nothing else: no table of the demo's ledger and nothing in pg_start,
//!   for a team that brings its own outbox and inbox. It is the tail of
//!   `sql/pg_end.sql`, from [`RELAY_SCHEMA_START`] on, so the two cannot drift apart.

use thiserror::Error;

use crate::pg;

/// The source schema: service tables, outbox, publication.
pub const PG_START_SQL: &str = include_str!("../../sql/pg_start.sql");
/// The target schema: inbox tables and the relay's bookkeeping.
pub const PG_END_SQL: &str = include_str!("../../sql/pg_end.sql");

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error("cannot connect to {which} ({url})")]
    Connect {
        which: &'static str,
        url: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("applying the {which} schema failed")]
    Apply {
        which: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// The statement that opens the relay's own part of `sql/pg_end.sql`: everything
/// before it is the demo's ledger, everything from it on is the relay's bookkeeping.
pub const RELAY_SCHEMA_START: &str = "CREATE SCHEMA IF NOT EXISTS outbox_relay;";

/// The relay's bookkeeping alone: `sql/pg_end.sql` from [`RELAY_SCHEMA_START`] on.
pub fn relay_schema_sql() -> &'static str {
    let start = PG_END_SQL
        .find(RELAY_SCHEMA_START)
        .expect("sql/pg_end.sql creates the schema outbox_relay");
    &PG_END_SQL[start..]
}

/// Applies `sql` in one transaction, serialised with other migrations by an advisory lock.
async fn apply(which: &'static str, url: &str, sql: &str) -> Result<(), MigrateError> {
    let client = pg::connect(url)
        .await
        .map_err(|source| MigrateError::Connect {
            which,
            url: pg::redact_url(url),
            source,
        })?;
    // Notices ("already exists, skipping") are expected on every run after the first.
    let script = format!(
        "SET client_min_messages = warning;\nBEGIN;\nSELECT pg_advisory_xact_lock(7283517041);\n{sql}\nCOMMIT;"
    );
    client
        .batch_execute(&script)
        .await
        .map_err(|source| MigrateError::Apply { which, source })
}

/// Applies the source schema to pg_start.
pub async fn source(url: &str) -> Result<(), MigrateError> {
    apply("pg_start", url, PG_START_SQL).await
}

/// Applies the target schema to pg_end.
pub async fn target(url: &str) -> Result<(), MigrateError> {
    apply("pg_end", url, PG_END_SQL).await
}

/// Applies only the relay's bookkeeping to pg_end (`migrate --relay-only`).
pub async fn relay_only(url: &str) -> Result<(), MigrateError> {
    apply("pg_end", url, relay_schema_sql()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_s_part_of_pg_end_holds_its_tables_and_none_of_the_ledger_s() {
        let relay = relay_schema_sql();
        for table in ["sink_offsets", "direct_progress", "dead_letters"] {
            assert!(
                relay.contains(&format!("CREATE TABLE IF NOT EXISTS outbox_relay.{table}")),
                "{table}"
            );
        }
        assert!(!relay.contains("main."), "{relay}");
        // The ledger's part holds nothing of the relay's.
        let ledger = &PG_END_SQL[..PG_END_SQL.len() - relay.len()];
        assert!(!ledger.contains("outbox_relay"), "{ledger}");
    }
}
