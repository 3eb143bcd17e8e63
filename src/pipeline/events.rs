//! Reading the slot's events from pgwire-replication's worker: queued events are taken
//! without a `select!` each, and under load the reader pauses between bursts instead of
//! being woken for every message.
//!
//! # Why the pause
//! The walsender sends every pgoutput message (begin, insert, commit) with its own
//! `send()`. A relay that goes back to `epoll_wait` as soon as it has read what arrived
//! is woken for almost every one of them, and the wake-up is paid by the sender: in a
//! 200,000-transaction drain the relay slept 49,000 times and the walsender spent twice
//! the kernel time of the same walsender feeding PostgreSQL's own apply worker (which
//! is always busy, so never woken). The walsender is what limits a drain, so that time
//! came straight off the throughput. Sleeping outside `epoll` for [`PAUSE`] when the
//! queue runs dry under load lets the socket collect a burst, which is then read in one
//! go, without waking anyone.
//!
//! # Invariants
//! 1. Events come out in the worker's order, none skipped or repeated: [`Events`] only
//!    decides *when* to call `recv`.
//! 2. The worker's final error is never lost. [`Events::queued`] polls `recv` only when
//!    the worker has counted more events forwarded than this reader has taken, so the
//!    channel holds one and `recv` returns it at once, without entering its shutdown
//!    path (which takes the worker's join handle and must not be dropped half-way).
//! 3. A pause happens only with the queue empty, after a window (at least [`WINDOW`])
//!    in which events arrived at [`BUSY_RATE`] or faster; it delays an event by at
//!    most [`PAUSE`]. Below that rate (about 3,000 one-row transactions/s) every event
//!    is read as soon as it arrives.

use std::time::{Duration, Instant};

use futures_util::FutureExt;
use pgwire_replication::{PgWireError, ReplicationClient, ReplicationEvent};

/// How long the reader sleeps, under load, when it has taken everything queued.
pub const PAUSE: Duration = Duration::from_micros(500);
/// The shortest window over which the event rate is measured.
pub const WINDOW: Duration = Duration::from_millis(10);
/// The event rate (events per second) from which the reader counts as busy.
pub const BUSY_RATE: u64 = 10_000;
/// Queued events taken between two waits, so that the pipeline still looks at the stop
/// signal and the commit in flight while a backlog streams (about 100 one-row source
/// transactions).
pub const DRAIN_BOUND: usize = 256;

pub type Received = Result<Option<ReplicationEvent>, PgWireError>;

/// The pipeline's reading state for one replication client.
pub struct Events {
    /// Items taken from this client's channel.
    taken: u64,
    /// Items taken by [`Self::queued`] since the last wait.
    drained: usize,
    rate: Rate,
}

impl Events {
    pub fn new() -> Self {
        Self {
            taken: 0,
            drained: 0,
            rate: Rate::new(Instant::now()),
        }
    }

    /// The next event the worker has already queued; `None` when the queue is empty or
    /// [`DRAIN_BOUND`] events were taken since the last wait (then the caller waits).
    pub fn queued(&mut self, replication: &mut ReplicationClient) -> Option<Received> {
        if self.drained >= DRAIN_BOUND || replication.metrics().events_forwarded() <= self.taken {
            return None;
        }
        // The channel holds an item (invariant 2); `recv` is pending only when the
        // task has used up its cooperative budget.
        let event = replication.recv().now_or_never()?;
        self.taken();
        self.drained += 1;
        Some(event)
    }

    /// Counts an item returned by `recv`. (An error or the end of the stream ends the
    /// session, so what is counted after one does not matter.)
    pub fn taken(&mut self) {
        self.taken += 1;
        self.rate.events += 1;
    }

    /// Called before the caller waits for an event (or a commit, a linger, a stop). After
    /// a drain that emptied the queue, and under load, sleep for [`PAUSE`] so that the
    /// next read takes a burst (see the module doc); not after a drain cut at
    /// [`DRAIN_BOUND`] or stopped at the runtime's budget, nor again after a wait that a
    /// commit or a linger ended. Blocks the thread on purpose: a sleep in the runtime
    /// would wait in `epoll`, which every arriving message wakes.
    pub fn before_wait(&mut self, replication: &ReplicationClient) {
        let drained = std::mem::take(&mut self.drained);
        let emptied = (1..DRAIN_BOUND).contains(&drained)
            && replication.metrics().events_forwarded() <= self.taken;
        if emptied && self.rate.busy(Instant::now()) {
            std::thread::sleep(PAUSE);
        }
    }
}

/// The event rate, measured over windows of at least [`WINDOW`].
struct Rate {
    start: Instant,
    events: u64,
    busy: bool,
}

impl Rate {
    fn new(now: Instant) -> Self {
        Self {
            start: now,
            events: 0,
            busy: false,
        }
    }

    /// Whether the last complete window reached [`BUSY_RATE`]; a window ends at the
    /// first call at least [`WINDOW`] after it started.
    fn busy(&mut self, now: Instant) -> bool {
        let window = now.duration_since(self.start);
        if window >= WINDOW {
            self.busy =
                u128::from(self.events) * 1_000_000 >= u128::from(BUSY_RATE) * window.as_micros();
            self.start = now;
            self.events = 0;
        }
        self.busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate_after(events: u64, elapsed: Duration) -> bool {
        let start = Instant::now();
        let mut rate = Rate::new(start);
        rate.events = events;
        rate.busy(start + elapsed)
    }

    #[test]
    fn the_reader_pauses_only_at_or_above_the_busy_rate() {
        let per_window = BUSY_RATE * WINDOW.as_millis() as u64 / 1000;
        assert!(rate_after(per_window, WINDOW));
        assert!(!rate_after(per_window - 1, WINDOW));
        // The same count over a long quiet stretch is a low rate.
        assert!(!rate_after(per_window, Duration::from_secs(1)));
        assert!(rate_after(BUSY_RATE, Duration::from_secs(1)));
    }

    #[test]
    fn a_window_ends_only_after_window_has_passed() {
        let start = Instant::now();
        let mut rate = Rate::new(start);
        rate.events = 1_000_000;
        // Too early to judge: not busy yet, and the events stay counted.
        assert!(!rate.busy(start + WINDOW / 2));
        assert!(rate.busy(start + WINDOW));
        // A new window began; the verdict holds until it ends, then follows its count.
        assert!(rate.busy(start + WINDOW + WINDOW / 2));
        assert!(!rate.busy(start + 2 * WINDOW));
    }
}
