//! Applies the schemas in `sql/` to pg_start and pg_end.
//!
//! Invariant: applying them any number of times, even from several processes at once,
//! leaves the same schema (each script is idempotent and runs under an advisory lock).

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
