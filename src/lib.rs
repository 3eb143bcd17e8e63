//! outbox-relay: delivers the transactions a service writes to its outbox in one
//! PostgreSQL database (pg_start) to another (pg_end), through Kafka or directly, so
//! that every transaction is counted in pg_end exactly once, whatever fails.
//!
//! # Layout
//! The engine, from the bottom layer up (a module imports only from layers below it):
//! - [`lsn`]: the `Lsn` newtype, printed as `X/X`.
//! - [`secret`]: the `Secret` type that never prints its value.
//! - [`error`]: the error policy: transient or definite, `error_chain`, and the
//!   PostgreSQL and Kafka classifiers.
//! - [`retry`]: the one backoff helper and the optional-deadline sleep.
//! - [`metrics`]: the Prometheus recorder and the health endpoints.
//! - [`telemetry`]: trace context (`traceparent`) and the OTLP span export.
//! - [`pgoutput`]: the pure decoder of the pgoutput logical replication protocol.
//! - [`pg`]: PostgreSQL connections from one URL form (TLS, password files, timeouts).
//! - [`progress`]: `ProgressTracker` (what may be confirmed to the slot) and the
//!   progress record every destination stores with its data.
//! - [`apply`]: the one set-based, idempotent apply to pg_end and its driver (sink,
//!   direct mode, reconcile).
//! - [`kafka`]: Kafka clients, topics and the progress topic's read.
//! - [`source`]: pg_start's checks, the slot's state, the replication settings.
//! - [`record`]: the record wire format (value, key, headers), encode and decode.
//! - [`route`]: how an outbox table or a logical-message prefix becomes records
//!   (topic, key, value, headers, dead letters); the event-router preset.
//! - [`inbox`]: where records land in pg_end: the ledger profile, or a table with an
//!   event-id key, a column mapping and a handler; the record formats they read.
//! - [`config`]: the settings and defaults shared by the commands, and the TOML file.
//! - [`pipeline`]: the replication pipeline shared by `connector` and `direct`.
//! - [`sink`]: `outbox-relay sink`, Kafka → pg_end with offsets stored in pg_end.
//! - [`connector`]: `outbox-relay connector`, slot → Kafka, exactly once.
//! - [`direct`]: `outbox-relay direct`, slot → pg_end without Kafka.
//!
//! Apart from the engine, [`cmd`] holds the one-shot and operator commands: `migrate`,
//! `load`, `verify`, `check`, `status`, `reconcile` and `chaos`.
//!
//! Test-only fault hooks are compiled only with the `fault-injection` feature, never
//! into a release build.

pub mod apply;
pub mod cmd;
pub mod config;
pub mod connector;
pub mod direct;
pub mod error;
pub mod inbox;
pub mod kafka;
pub mod lsn;
pub mod metrics;
pub mod pg;
pub mod pgoutput;
pub mod pipeline;
pub mod progress;
pub mod record;
pub mod retry;
pub mod route;
pub mod secret;
pub mod sink;
pub mod source;
pub mod telemetry;
