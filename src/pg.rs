//! PostgreSQL connections and the transient/definite split of their errors.
//!
//! Invariant: every error that a retry can cure (the server restarting, the network
//! gone, a serialization failure) is classified [`ErrorClass::Transient`]; everything
//! else (a missing table, a permission, a constraint we did not expect) is
//! [`ErrorClass::Definite`] and must reach a person instead of being retried forever.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

/// Whether an operation that failed may succeed if it is simply tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Transient,
    Definite,
}

/// How long a connection attempt may take before it counts as a transient failure.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects and drives the connection on a background task.
///
/// The task ends when the connection breaks; the `Client` then returns errors that
/// [`classify`] reports as transient, and the caller reconnects.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    // Keepalives so that a black-holed server is noticed without waiting for the
    // kernel's two-hour default.
    config.keepalives_idle(Duration::from_secs(10));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "postgres connection closed");
        }
    });
    Ok(client)
}

/// Classifies a PostgreSQL client error.
pub fn classify(error: &tokio_postgres::Error) -> ErrorClass {
    let Some(db) = error.as_db_error() else {
        // No SQLSTATE: an I/O error, a closed connection or a timeout.
        return ErrorClass::Transient;
    };
    let code = db.code();
    let class = &code.code()[..2];
    if matches!(class, "08" | "53" | "57" | "58")
        || *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::LOCK_NOT_AVAILABLE
        || *code == SqlState::OBJECT_IN_USE
    {
        ErrorClass::Transient
    } else {
        ErrorClass::Definite
    }
}

/// Strips the password from a connection URL so that it can be logged.
pub fn redact_url(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(config) => {
            let host = config
                .get_hosts()
                .first()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    #[cfg(unix)]
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .unwrap_or_default();
            let port = config.get_ports().first().copied().unwrap_or(5432);
            format!(
                "postgres://{}@{}:{}/{}",
                config.get_user().unwrap_or(""),
                host,
                port,
                config.get_dbname().unwrap_or("")
            )
        }
        Err(_) => "<unparsable postgres url>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_drops_the_password() {
        let redacted = redact_url("postgres://postgres:s3cret@127.0.0.1:8000/db_start");
        assert_eq!(redacted, "postgres://postgres@127.0.0.1:8000/db_start");
        assert!(!redacted.contains("s3cret"));
    }
}
