//! The relay's error policy in one place: whether a failure is retried or stops the
//! command, and how an error is written into a log line.
//!
//! Invariant: every failure that a retry can cure (a server restarting, the network
//! gone, a serialization failure, a broker not ready) is [`ErrorClass::Transient`] and
//! is retried with capped backoff; everything else (a missing table, a refused
//! password, a fenced producer) is [`ErrorClass::Definite`] and must reach a person
//! instead of being retried forever. The two never mix: each error type of the relay
//! answers `class()` from the classifiers below, and no module decides it on its own.

/// Whether an operation that failed may succeed if it is simply tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Transient,
    Definite,
}

/// An error with all its sources, `outer: inner: innermost`, for logs and reports.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// PostgreSQL client errors.
pub mod pg {
    use tokio_postgres::error::SqlState;

    use super::ErrorClass;

    /// Transient: no SQLSTATE (I/O, a closed connection, a timeout), connection
    /// exceptions (08), insufficient resources (53), operator intervention (57: a
    /// shutdown, a crash), system errors (58), serialization failures, deadlocks, locks
    /// not available, objects in use, and a session pg_end ended because it sat idle in
    /// a transaction (25P03: the relay sets `idle_in_transaction_session_timeout` on its
    /// pg_end connections, so this is a relay that was frozen or cut off mid-transaction
    /// and has come back; the transaction was rolled back and is simply applied again on
    /// a new connection). Definite: everything else; and, with no
    /// SQLSTATE either, what the client refuses and would refuse again on every retry:
    /// a value that does not convert between its Rust and PostgreSQL types, a
    /// configuration it cannot use (no password for a role that needs one), and a TLS
    /// handshake that failed on a certificate (the server's is not signed by
    /// `sslrootcert`, or the server refused the relay's).
    pub fn classify(error: &tokio_postgres::Error) -> ErrorClass {
        let Some(db) = error.as_db_error() else {
            let conversion = std::error::Error::source(error).is_some_and(|cause| {
                cause.is::<tokio_postgres::types::WrongType>()
                    || cause.is::<tokio_postgres::types::WasNull>()
            });
            // tokio-postgres shows its error kind, and has no other way to tell it.
            let text = error.to_string();
            let configuration = text.starts_with("invalid configuration")
                || text.starts_with("invalid connection string");
            return if conversion || configuration || super::certificate_refused(error) {
                ErrorClass::Definite
            } else {
                ErrorClass::Transient
            };
        };
        of_sqlstate(db.code())
    }

    /// The class of a server error by its SQLSTATE; see [`classify`].
    pub fn of_sqlstate(code: &SqlState) -> ErrorClass {
        let class = &code.code()[..2];
        if matches!(class, "08" | "53" | "57" | "58")
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::LOCK_NOT_AVAILABLE
            || *code == SqlState::OBJECT_IN_USE
            || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
        {
            ErrorClass::Transient
        } else {
            ErrorClass::Definite
        }
    }
}

/// Whether a TLS handshake in `error`'s chain failed on a certificate: one side did not
/// trust the other's, or a certificate is expired, revoked or of the wrong kind. A
/// retry meets the same certificates.
fn certificate_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription as Alert;
    let mut next = Some(error);
    while let Some(current) = next {
        // An I/O error carries the TLS library's error inside, not as its source.
        let inner = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        for candidate in [Some(current), inner].into_iter().flatten() {
            if let Some(tls) = candidate.downcast_ref::<rustls::Error>() {
                return matches!(
                    tls,
                    rustls::Error::InvalidCertificate(_)
                        | rustls::Error::NoCertificatesPresented
                        | rustls::Error::AlertReceived(
                            Alert::BadCertificate
                                | Alert::UnsupportedCertificate
                                | Alert::CertificateRevoked
                                | Alert::CertificateExpired
                                | Alert::CertificateUnknown
                                | Alert::UnknownCA
                                | Alert::CertificateRequired
                        )
                );
            }
        }
        next = current.source();
    }
    false
}

/// Kafka producer errors (librdkafka's transactional API).
pub mod kafka {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    /// What a failed producer call means for the producer that made it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ProducerFailure {
        /// Another producer with the same transactional id took over: definite.
        Fenced,
        /// The producer is unusable, but a new one (a new epoch) may succeed.
        Fatal,
        /// The call may succeed if made again on the same producer.
        Retriable,
    }

    /// Classifies a producer error: a fence by its code, whatever call reported it;
    /// a fatal transactional error by librdkafka's own flag; anything else retriable.
    pub fn classify(error: &KafkaError) -> ProducerFailure {
        let code = match error {
            KafkaError::Transaction(e) => Some(e.code()),
            other => other.rdkafka_error_code(),
        };
        if matches!(
            code,
            Some(RDKafkaErrorCode::ProducerFenced)
                | Some(RDKafkaErrorCode::InvalidProducerEpoch)
                // librdkafka's own code for a producer that learned it was fenced.
                | Some(RDKafkaErrorCode::Fenced)
        ) {
            ProducerFailure::Fenced
        } else if matches!(error, KafkaError::Transaction(e) if e.is_fatal()) {
            ProducerFailure::Fatal
        } else {
            ProducerFailure::Retriable
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_lists_every_source_in_order() {
        let error = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&error), "outer: inner");
    }

    #[test]
    fn server_errors_a_retry_cures_are_transient_and_the_rest_definite() {
        use tokio_postgres::error::SqlState;
        for code in [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::QUERY_CANCELED,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::CONNECTION_FAILURE,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
        ] {
            assert_eq!(pg::of_sqlstate(&code), ErrorClass::Transient, "{code:?}");
        }
        for code in [
            SqlState::UNDEFINED_TABLE,
            SqlState::INVALID_PASSWORD,
            SqlState::INSUFFICIENT_PRIVILEGE,
            SqlState::IN_FAILED_SQL_TRANSACTION,
            SqlState::UNIQUE_VIOLATION,
            SqlState::NUMERIC_VALUE_OUT_OF_RANGE,
        ] {
            assert_eq!(pg::of_sqlstate(&code), ErrorClass::Definite, "{code:?}");
        }
    }

    #[test]
    fn a_fence_is_recognised_by_its_code_and_other_errors_are_retriable() {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        let fenced = KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced);
        assert_eq!(kafka::classify(&fenced), kafka::ProducerFailure::Fenced);
        let epoch = KafkaError::Global(RDKafkaErrorCode::InvalidProducerEpoch);
        assert_eq!(kafka::classify(&epoch), kafka::ProducerFailure::Fenced);
        let local = KafkaError::Global(RDKafkaErrorCode::Fenced);
        assert_eq!(kafka::classify(&local), kafka::ProducerFailure::Fenced);
        let timeout = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert_eq!(kafka::classify(&timeout), kafka::ProducerFailure::Retriable);
    }
}
