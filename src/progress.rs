//! The single owner of "what may be acknowledged to the replication slot", and the
//! progress record each destination stores with its data ([`ProgressRecord`]).
//!
//! Synchronous and I/O-free, so that every rule below is unit-tested on its own.
//!
//! # Invariant
//! The LSN returned by [`ProgressTracker::confirmable`] never passes a source
//! transaction whose records are not durable in the next stage (committed in a Kafka
//! transaction, acknowledged by `acks=all`, or, in direct mode, committed in pg_end
//! and flushed to its WAL: an asynchronous commit counts only once pg_end reports its
//! WAL flushed past it, see `crate::direct`).
//! It only ever moves forward.
//!
//! # How
//! Source transactions are registered in commit order, as they are read from the
//! slot, each with the number of records still outstanding. Records become durable
//! one by one (at-least-once producer) or all at once up to a ticket (a committed Kafka
//! or pg_end transaction). The confirmable LSN is the commit end LSN of the newest
//! transaction such that it and every earlier one are fully durable.
//!
//! A keepalive's WAL end (or a heartbeat's position) may be confirmed only when
//! nothing is in flight and no transaction is half read: then every change before that
//! position has been received and is durable, and a transaction that commits later
//! will be sent again after a restart because its commit lies past the confirmed LSN.
//! This keeps an idle outbox from pinning WAL while other tables are written.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;

/// Identifies a registered source transaction: its position in commit order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TxnTicket(u64);

#[derive(Debug)]
struct InFlight {
    ticket: TxnTicket,
    end_lsn: Lsn,
    outstanding: u64,
}

/// Tracks source transactions from the moment they are read until they are durable.
#[derive(Debug)]
pub struct ProgressTracker {
    /// The newest LSN that may be (or has been) confirmed.
    confirmed: Lsn,
    /// Registered transactions not yet confirmable, oldest first.
    in_flight: VecDeque<InFlight>,
    /// The next ticket to hand out.
    next_ticket: u64,
    /// A transaction has begun (Begin seen) but its Commit has not been read.
    txn_open: bool,
}

impl ProgressTracker {
    /// Starts from the slot's (or the next stage's) durable position.
    pub fn new(confirmed: Lsn) -> Self {
        Self {
            confirmed,
            in_flight: VecDeque::new(),
            next_ticket: 0,
            txn_open: false,
        }
    }

    /// A Begin was read.
    pub fn begin(&mut self) {
        self.txn_open = true;
    }

    /// A Commit was read: the whole transaction is known, with `records` records
    /// handed to the next stage. A transaction with no records is durable at once
    /// once everything before it is.
    pub fn commit(&mut self, end_lsn: Lsn, records: u64) -> TxnTicket {
        self.txn_open = false;
        let ticket = TxnTicket(self.next_ticket);
        self.next_ticket += 1;
        self.in_flight.push_back(InFlight {
            ticket,
            end_lsn,
            outstanding: records,
        });
        self.advance();
        ticket
    }

    /// The transaction being read was abandoned (the session broke mid-transaction);
    /// it will be sent again from the slot.
    pub fn abandon_open(&mut self) {
        self.txn_open = false;
    }

    /// `count` records of `ticket` are durable (at-least-once producer acks).
    pub fn records_durable(&mut self, ticket: TxnTicket, count: u64) {
        if let Some(entry) = self.in_flight.iter_mut().find(|e| e.ticket == ticket) {
            entry.outstanding = entry.outstanding.saturating_sub(count);
        }
        self.advance();
    }

    /// Every transaction up to and including `ticket` is durable (a committed Kafka
    /// or pg_end transaction that held all of their records).
    pub fn durable_through(&mut self, ticket: TxnTicket) {
        for entry in self.in_flight.iter_mut().take_while(|e| e.ticket <= ticket) {
            entry.outstanding = 0;
        }
        self.advance();
    }

    /// The server reported its WAL end (keepalive or heartbeat) at `wal_end`.
    pub fn idle_position(&mut self, wal_end: Lsn) {
        if self.in_flight.is_empty() && !self.txn_open {
            self.confirmed = self.confirmed.max(wal_end);
        }
    }

    /// The LSN that may be confirmed to the slot now.
    pub fn confirmable(&self) -> Lsn {
        self.confirmed
    }

    /// Source transactions read but not yet durable.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn advance(&mut self) {
        while let Some(front) = self.in_flight.front() {
            if front.outstanding > 0 {
                break;
            }
            self.confirmed = self.confirmed.max(front.end_lsn);
            self.in_flight.pop_front();
        }
    }
}

/// A bound on the slot's confirmation besides durability, shared between the
/// pipeline (which reads it at every confirmation) and what holds it back (the outbox
/// cleanup, until the rows it was handed are deleted). Unbounded when new.
#[derive(Debug, Clone)]
pub struct ConfirmGate(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Default for ConfirmGate {
    fn default() -> Self {
        Self(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
            u64::MAX,
        )))
    }
}

impl ConfirmGate {
    /// The highest LSN that may be confirmed.
    pub fn get(&self) -> Lsn {
        Lsn(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Holds confirmations at `lsn` (or releases them, with `None`).
    pub fn set(&self, lsn: Option<Lsn>) {
        let value = lsn.map_or(u64::MAX, |l| l.as_u64());
        self.0.store(value, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What a destination stores, atomically with the rows it holds, about how far it
/// holds the slot's stream: the value of a record of the Kafka progress topic (keyed by
/// slot name), or pg_end's direct-mode progress row read back as one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRecord {
    /// `snapshot`: the relay created the slot and is emitting the rows that were in
    /// the outbox at that moment; nothing of the slot's stream is in Kafka yet.
    /// `streaming`: everything up to `lsn` is in Kafka.
    pub state: ProgressState,
    /// Commit end LSN of the last source transaction in Kafka, as `X/X`.
    pub lsn: String,
    /// pg_start's system identifier (IDENTIFY_SYSTEM's `systemid`), written by the
    /// relays that keep the slot's confirmed position at or below the stored `lsn`
    /// (`crate::pipeline`, "Slot identity"). Absent from older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_identifier: Option<String>,
    /// How far the slot's initial snapshot got (`snapshot` records after its first
    /// chunk). See `crate::pipeline::snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotProgress>,
    /// The on-demand backfills requested in the stream up to `lsn`, and how far each
    /// got (`streaming` records). See `crate::pipeline::backfill`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backfills: Vec<BackfillProgress>,
}

/// One on-demand backfill: the rows of an outbox table (those its filter selects) sent
/// again, in page order, in chunks each committed with a record of this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillProgress {
    /// The request's id (what `backfill` printed, and the records' backfill header).
    pub id: String,
    /// The outbox table, as `schema.name`.
    pub table: String,
    /// The request's WHERE clause, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    pub state: BackfillState,
    /// The first of the table's pages not yet read (it is read in page order).
    #[serde(default)]
    pub next_page: u64,
    /// Rows sent so far.
    #[serde(default)]
    pub rows: u64,
    /// Why it failed (`failed` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackfillState {
    /// Being sent, or, behind an earlier one, waiting its turn.
    Running,
    Done,
    Failed,
    Cancelled,
}

impl BackfillProgress {
    /// One phrase for `status`.
    pub fn describe(&self, queued: bool) -> String {
        let state = match self.state {
            BackfillState::Running if queued => "queued",
            BackfillState::Running => "running",
            BackfillState::Done => "done",
            BackfillState::Failed => "failed",
            BackfillState::Cancelled => "cancelled",
        };
        let mut text = format!("backfill {} of {}", self.id, self.table);
        if let Some(filter) = &self.filter {
            text.push_str(&format!(" where {filter}"));
        }
        text.push_str(&format!(": {state}, {} rows sent", self.rows));
        if let Some(error) = &self.error {
            text.push_str(&format!(" ({error})"));
        }
        text
    }

    /// Each backfill of `backfills` described, the queued ones (running behind an
    /// earlier running one) said to be so.
    pub fn describe_all(backfills: &[BackfillProgress]) -> Vec<String> {
        let mut active = false;
        backfills
            .iter()
            .map(|b| {
                let queued = b.state == BackfillState::Running && active;
                active |= b.state == BackfillState::Running;
                b.describe(queued)
            })
            .collect()
    }
}

/// How far a slot's initial snapshot got. Its rows are delivered table by table, each
/// table in primary-key order, in chunks, each committed with a record of this.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotProgress {
    /// The slot's consistent point, as `X/X`: its stream starts there.
    pub consistent_point: String,
    /// What has been delivered: every row of `done`, and of `table` those with a key at
    /// or below `after`.
    #[serde(default)]
    pub delivered: Delivered,
    /// Rows delivered so far (what `status` shows).
    #[serde(default)]
    pub rows: u64,
}

impl SnapshotProgress {
    /// One phrase for `status`: the rows delivered and where the snapshot is.
    pub fn describe(&self) -> String {
        let mut text = format!("initial snapshot, {} rows delivered", self.rows);
        if let Some(table) = &self.delivered.table {
            text.push_str(&format!(", in {table}"));
        }
        if !self.delivered.done.is_empty() {
            text.push_str(&format!(", done: {}", self.delivered.done.join(", ")));
        }
        text
    }
}

/// The part of the snapshot's rows delivered so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivered {
    /// Tables delivered whole (as `schema.name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub done: Vec<String>,
    /// The table being delivered, and the position of the last row delivered: its
    /// key's columns, as their output functions print them (`None`: NULL), then its
    /// `ctid` where the key is not the primary key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<Option<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressState {
    Snapshot,
    Streaming,
}

impl ProgressRecord {
    pub fn streaming(lsn: Lsn) -> Self {
        Self {
            state: ProgressState::Streaming,
            lsn: lsn.to_string(),
            system_identifier: None,
            snapshot: None,
            backfills: Vec::new(),
        }
    }

    /// A `snapshot` record: the snapshot got as far as `progress` says.
    pub fn snapshot(progress: SnapshotProgress) -> Self {
        Self {
            state: ProgressState::Snapshot,
            lsn: Lsn::ZERO.to_string(),
            system_identifier: None,
            snapshot: Some(progress),
            backfills: Vec::new(),
        }
    }

    /// The same record, stamped with pg_start's system identifier.
    pub fn of_system(mut self, system_identifier: Option<&str>) -> Self {
        self.system_identifier = system_identifier.map(str::to_string);
        self
    }

    /// The same record, carrying `backfills`.
    pub fn with_backfills(mut self, backfills: &[BackfillProgress]) -> Self {
        self.backfills = backfills.to_vec();
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The LSN, parsed.
    pub fn lsn(&self) -> Option<Lsn> {
        self.lsn.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_a_fully_durable_prefix() {
        let mut p = ProgressTracker::new(Lsn(100));
        p.begin();
        let a = p.commit(Lsn(200), 2);
        p.begin();
        let b = p.commit(Lsn(300), 1);
        // The later transaction is durable first: nothing moves.
        p.records_durable(b, 1);
        assert_eq!(p.confirmable(), Lsn(100));
        p.records_durable(a, 1);
        assert_eq!(p.confirmable(), Lsn(100));
        p.records_durable(a, 1);
        assert_eq!(p.confirmable(), Lsn(300));
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn durable_through_covers_earlier_tickets_only() {
        let mut p = ProgressTracker::new(Lsn(0));
        let a = p.commit(Lsn(10), 5);
        let _b = p.commit(Lsn(20), 5);
        p.durable_through(a);
        assert_eq!(p.confirmable(), Lsn(10));
        assert_eq!(p.in_flight(), 1);
    }

    #[test]
    fn empty_transactions_confirm_in_order() {
        let mut p = ProgressTracker::new(Lsn(0));
        let a = p.commit(Lsn(10), 1);
        p.commit(Lsn(20), 0);
        assert_eq!(
            p.confirmable(),
            Lsn(0),
            "an empty txn must wait for the one before it"
        );
        p.durable_through(a);
        assert_eq!(p.confirmable(), Lsn(20));
    }

    #[test]
    fn keepalive_confirms_only_when_idle() {
        let mut p = ProgressTracker::new(Lsn(0));
        p.begin();
        p.idle_position(Lsn(50));
        assert_eq!(p.confirmable(), Lsn(0), "a transaction is half read");
        let a = p.commit(Lsn(60), 1);
        p.idle_position(Lsn(70));
        assert_eq!(p.confirmable(), Lsn(0), "a transaction is in flight");
        p.durable_through(a);
        p.idle_position(Lsn(70));
        assert_eq!(p.confirmable(), Lsn(70));
    }

    #[test]
    fn never_moves_backwards() {
        let mut p = ProgressTracker::new(Lsn(500));
        let a = p.commit(Lsn(400), 1);
        p.durable_through(a);
        p.idle_position(Lsn(300));
        assert_eq!(p.confirmable(), Lsn(500));
    }

    #[test]
    fn abandoning_an_open_transaction_allows_idle_confirmation() {
        let mut p = ProgressTracker::new(Lsn(0));
        p.begin();
        p.abandon_open();
        p.idle_position(Lsn(5));
        assert_eq!(p.confirmable(), Lsn(5));
    }
}
