//! outbox-relay: delivers the transactions a service writes to its outbox in one
//! PostgreSQL database (pg_start) to another (pg_end), through Kafka or directly, so
//! that every transaction is counted in pg_end exactly once, whatever fails.
//!
//! # Layout
//! - [`lsn`]: the `Lsn` newtype.
//! - [`pgoutput`]: pure decoder of the pgoutput logical replication protocol.
//! - [`pg`]: PostgreSQL connections and error classification.
//! - [`retry`]: the one backoff helper.
//! - [`secret`]: the `Secret` type that never prints its value.
//! - [`config`]: settings shared by the commands, defaulting to the local stack.
//! - [`migrate`]: the schemas in `sql/`.
//! - [`load`]: the load generator writing seed-shaped transactions to pg_start.
//! - [`verify`]: the checker comparing pg_start and pg_end.
//! - [`apply`]: the one set-based, idempotent apply to pg_end (sink and direct mode).
//! - [`sink`]: `outbox-relay sink`, Kafka → pg_end with offsets stored in pg_end.
//! - [`status`]: `outbox-relay status`, health and lag of every component.
//! - [`chaos`]: `outbox-relay chaos`, the fault-injection runner and its checkers.
//! - [`reconcile`]: `outbox-relay reconcile`, copies what pg_end lacks from pg_start.

pub mod apply;
pub mod cmd;
pub mod config;
pub mod connector;
pub mod direct;
pub mod error;
pub mod kafka;
pub mod lsn;
pub mod metrics;
pub mod pg;
pub mod pgoutput;
pub mod pipeline;
pub mod progress;
pub mod record;
pub mod retry;
pub mod secret;
pub mod sink;
pub mod source;
