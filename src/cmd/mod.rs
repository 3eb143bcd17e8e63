//! The one-shot and operator commands, apart from the relay's engine: each reads the
//! engine's state or the databases, prints a report and exits (`chaos` runs the engine
//! as separate processes under faults). None of them is on the path a record takes.
//!
//! - [`migrate`]: applies the schemas in `sql/`.
//! - [`backfill`]: asks the relays to send an outbox table's rows again.
//! - [`load`]: writes seed-shaped business transactions into pg_start.
//! - [`verify`]: compares pg_start and pg_end.
//! - [`check`]: validates the configuration and connects to everything it names.
//! - [`status`]: health and lag of every component.
//! - [`reconcile`]: copies what pg_end lacks from pg_start through the one apply.
//! - [`pairs`]: `verify` and `reconcile` for route → inbox pairs.
//! - [`chaos`]: the fault-injection runner and its checkers.

pub mod backfill;
pub mod chaos;
pub mod check;
pub mod load;
pub mod migrate;
pub mod pairs;
pub mod reconcile;
pub mod status;
pub mod verify;
