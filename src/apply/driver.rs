//! The one retry-and-reconnect loop around pg_end: the sink's batches and offset reads,
//! direct mode's batches and progress read, and reconcile's batches are all driven to
//! an end by [`Driver::run`].
//!
//! A [`Driver`] owns pg_end's URL and the connection (made when there is none or it
//! was closed, with an optional session-setup statement such as direct mode's
//! `SET synchronous_commit = …`). The caller says what one attempt does ([`Attempt`],
//! e.g. [`Apply`]) and what happens between attempts ([`Session`]: its stop, its logs
//! and metrics, and whether the connection may be given up).
//!
//! ```text
//!   run ─► connection closed? ─may_release─► drop it (no: Ended::InDoubt)
//!    ▲     attempt: connect + setup + Attempt::run, all within the timeout
//!    │       ├─ Ok ─────────────────────────────► Ok(output)
//!    │       ├─ definite (error::pg::classify) ─► Ended::Failed, never retried
//!    │       └─ transient or timed out: bound reached? ─► Ended::Failed
//!    │            retrying (log, count) ─ may_release? no ─► Ended::InDoubt
//!    │            drop the connection ─ stopped? ─► Ended::Stopped
//!    └──────── backoff sleep, a stop looked at every 100 ms ─► Ended::Stopped
//! ```
//!
//! Invariant: every attempt (connecting, the setup statement and the caller's work) is
//! bounded by the timeout ([`APPLY_TIMEOUT`] unless set otherwise), on both ends: each
//! connection tells pg_end to end a statement, or a transaction left idle, that outlasts
//! it (`statement_timeout`, `idle_in_transaction_session_timeout`). A connection given
//! up without being closed (a black-holed network, a proxy that stops forwarding) leaves
//! its backend and the locks of its open transaction behind: pg_end ends them within
//! the timeout, where they would otherwise block every later connection (the progress
//! row, the rows of the batch) until pg_end's TCP keepalive noticed, or never if a
//! proxy held the socket open. A definite error is
//! never retried; a transient one is retried, after capped backoff, on a new connection,
//! unless the session says a commit on the connection is in doubt (then the run ends
//! with [`Ended::InDoubt`] and the caller's session with it: no later connection can
//! tell whether that commit survived); a stop is seen between attempts, within 100 ms
//! of backoff sleep, never in the middle of an attempt, so an attempt that committed is
//! always reported as committed.

use std::future::Future;
use std::time::Duration;

use thiserror::Error;

use super::{ApplyBatch, ApplyError, ApplyOutcome, Target};
use crate::error::{error_chain, ErrorClass};
use crate::pg;
use crate::retry::Backoff;

/// How long one attempt may take before it counts as a transient failure (a
/// black-holed or frozen pg_end must not hold a pipeline forever).
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a backoff sleep looks at the session's stop.
const STOP_CHECK_EVERY: Duration = Duration::from_millis(100);

/// One failed attempt.
#[derive(Debug, Error)]
pub enum Failure {
    /// pg_end unreachable, restarting, too slow, a deadlock: what happened, with all
    /// its sources, for the log. Retried.
    #[error("{0}")]
    Transient(String),
    /// pg_end refused for a reason a retry will not cure: a person must look.
    #[error(transparent)]
    Definite(ApplyError),
}

impl Failure {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Transient(_) => ErrorClass::Transient,
            Self::Definite(_) => ErrorClass::Definite,
        }
    }
}

impl From<ApplyError> for Failure {
    /// By the one error policy ([`crate::error::pg::classify`], through [`ApplyError`]).
    fn from(error: ApplyError) -> Self {
        match error.class() {
            ErrorClass::Transient => Self::Transient(error_chain(&error)),
            ErrorClass::Definite => Self::Definite(error),
        }
    }
}

/// Why [`Driver::run`] returned without a result.
#[derive(Debug, Error)]
pub enum Ended {
    /// A definite failure, or a transient one once the attempts allowed were used up.
    #[error(transparent)]
    Failed(Failure),
    /// A transient failure on a connection the session would not give up: a commit on
    /// it is in doubt, and the caller's session must end.
    #[error("{0}")]
    InDoubt(String),
    /// A stop was asked for between attempts.
    #[error("stopped before pg_end took the work")]
    Stopped,
}

impl From<Ended> for Failure {
    /// For callers that neither stop nor keep commits in doubt: what is left to report.
    fn from(ended: Ended) -> Self {
        match ended {
            Ended::Failed(failure) => failure,
            other => Self::Transient(other.to_string()),
        }
    }
}

/// What one attempt does on the connection. Called again, on a new connection, after
/// a transient failure: it must be harmless to repeat (an [`super::apply`] is).
pub trait Attempt {
    type Output;
    fn run<'a>(
        &'a mut self,
        target: &'a mut Target,
    ) -> impl Future<Output = Result<Self::Output, ApplyError>> + Send + 'a;
}

/// Applies one batch ([`super::apply`]).
pub struct Apply<'b>(pub &'b ApplyBatch);

impl Attempt for Apply<'_> {
    type Output = ApplyOutcome;
    fn run<'a>(
        &'a mut self,
        target: &'a mut Target,
    ) -> impl Future<Output = Result<ApplyOutcome, ApplyError>> + Send + 'a {
        super::apply(target, self.0)
    }
}

/// What the caller decides between attempts.
pub trait Session {
    /// Whether a stop was asked for: looked at after a failed attempt and every 100 ms
    /// of the backoff sleep.
    fn stopped(&self) -> bool;
    /// Attempt `attempt` (counted from 1) failed transiently and is to be retried:
    /// log it, count it.
    fn retrying(&mut self, failure: &str, attempt: u32);
    /// Asked before the connection is given up (after a transient failure, or found
    /// closed). `false`: a commit on it is not yet known to be durable, and no other
    /// connection can tell; the run ends with [`Ended::InDoubt`].
    fn may_release(&mut self) -> bool {
        true
    }
}

/// pg_end's connection and the policy of retrying work on it; see the module
/// documentation.
pub struct Driver {
    url: String,
    /// Run on every new connection before any work (e.g. `SET synchronous_commit`).
    setup: Option<String>,
    target: Option<Target>,
    /// Bounds each attempt, connecting included.
    timeout: Duration,
    /// The delays between attempts; each run starts from its initial delay.
    backoff: Backoff,
    /// Failed attempts after which a run gives up (`None`: until a stop).
    attempts: Option<u32>,
}

impl Driver {
    /// A driver for `url` with [`APPLY_TIMEOUT`], [`Backoff::reconnect`] and no bound
    /// on attempts; it connects on first use.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            setup: None,
            target: None,
            timeout: APPLY_TIMEOUT,
            backoff: Backoff::reconnect(),
            attempts: None,
        }
    }

    /// Runs `statement` on every new connection.
    pub fn with_setup(mut self, statement: impl Into<String>) -> Self {
        self.setup = Some(statement.into());
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Gives up after `attempts` failed attempts.
    pub fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = Some(attempts);
        self
    }

    /// Starts with a connection made elsewhere.
    pub fn with_connection(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    /// The connection as it is, never a new one (e.g. to make commits made on it
    /// durable); `None` if there is none.
    pub fn current(&mut self) -> Option<&mut Target> {
        self.target.as_mut()
    }

    /// Gives the connection up.
    pub fn disconnect(&mut self) {
        self.target = None;
    }

    /// The open connection, or a new one: one attempt, bounded by the timeout. For
    /// reads by callers that keep no commit in doubt.
    pub async fn connection(&mut self) -> Result<&mut Target, Failure> {
        if self.target.as_ref().is_some_and(|t| t.is_closed()) {
            self.target = None;
        }
        let target = match self.target.take() {
            Some(target) => target,
            None => tokio::time::timeout(self.timeout, self.connect())
                .await
                .map_err(|_| self.timed_out())??,
        };
        Ok(self.target.insert(target))
    }

    /// Runs `attempt` until it succeeds, fails definitely, the session stops, or the
    /// attempts allowed are used up; see the module documentation.
    pub async fn run<A: Attempt>(
        &mut self,
        session: &mut (impl Session + ?Sized),
        attempt: &mut A,
    ) -> Result<A::Output, Ended> {
        let mut retries = Retries::new(self.backoff.clone(), self.attempts);
        loop {
            if self.target.as_ref().is_some_and(|t| t.is_closed()) {
                // Lost between runs or attempts: replaced silently, unless a commit
                // on it is in doubt.
                let may_release = session.may_release();
                self.target = None;
                if !may_release {
                    return Err(Ended::InDoubt("the connection to pg_end was closed".into()));
                }
            }
            let text = match self.attempt(attempt).await {
                Ok(output) => return Ok(output),
                Err(Failure::Definite(error)) => {
                    return Err(Ended::Failed(Failure::Definite(error)))
                }
                Err(Failure::Transient(text)) => text,
            };
            let next = retries.after_transient(&text, session);
            // A new connection for the next attempt; the one that failed may hold a
            // broken transaction or a half-read reply.
            self.target = None;
            let delay = match next {
                Next::Retry(delay) => delay,
                Next::GiveUp => return Err(Ended::Failed(Failure::Transient(text))),
                Next::InDoubt => return Err(Ended::InDoubt(text)),
                Next::Stop => return Err(Ended::Stopped),
            };
            if !pause(delay, || session.stopped()).await {
                return Err(Ended::Stopped);
            }
        }
    }

    /// One attempt: connect if needed, then the work, all within the timeout.
    async fn attempt<A: Attempt>(&mut self, attempt: &mut A) -> Result<A::Output, Failure> {
        let timeout = self.timeout;
        let work = async {
            let target = match self.target.take() {
                Some(target) => target,
                None => self.connect().await?,
            };
            attempt
                .run(self.target.insert(target))
                .await
                .map_err(Failure::from)
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(self.timed_out()),
        }
    }

    /// A new connection, its statements and idle transactions bounded on pg_end by the
    /// timeout, with the setup statement run on it.
    async fn connect(&self) -> Result<Target, Failure> {
        let client = pg::connect(&self.url)
            .await
            .map_err(|e| ApplyError::new("connecting", e))?;
        let bound = self.timeout.as_millis().max(1);
        let mut statements = format!(
            "SET statement_timeout = {bound}; SET idle_in_transaction_session_timeout = {bound}"
        );
        if let Some(setup) = &self.setup {
            statements.push_str("; ");
            statements.push_str(setup);
        }
        client
            .batch_execute(&statements)
            .await
            .map_err(|e| ApplyError::new("setting up the session", e))?;
        Ok(Target::new(client))
    }

    fn timed_out(&self) -> Failure {
        Failure::Transient(format!(
            "pg_end did not answer within {}s",
            self.timeout.as_secs_f64()
        ))
    }
}

/// What follows a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Another attempt after this delay.
    Retry(Duration),
    /// The attempts allowed are used up.
    GiveUp,
    /// The session keeps the connection: a commit on it is in doubt.
    InDoubt,
    Stop,
}

/// The decisions of one run between its attempts, apart from its I/O.
struct Retries {
    backoff: Backoff,
    /// Failed attempts so far.
    failed: u32,
    allowed: Option<u32>,
}

impl Retries {
    fn new(mut backoff: Backoff, allowed: Option<u32>) -> Self {
        backoff.reset();
        Self {
            backoff,
            failed: 0,
            allowed,
        }
    }

    /// After a transient failure: the bound first (the last failure is the caller's
    /// to report, not a retry), then the session is told, asked whether the connection
    /// may go, and whether it stops.
    fn after_transient(&mut self, failure: &str, session: &mut (impl Session + ?Sized)) -> Next {
        self.failed = self.failed.saturating_add(1);
        if self.allowed.is_some_and(|allowed| self.failed >= allowed) {
            return Next::GiveUp;
        }
        session.retrying(failure, self.failed);
        if !session.may_release() {
            return Next::InDoubt;
        }
        if session.stopped() {
            return Next::Stop;
        }
        Next::Retry(self.backoff.next_delay())
    }
}

/// Sleeps `delay`, looking at `stopped` every [`STOP_CHECK_EVERY`]; `false` if a stop
/// came.
async fn pause(delay: Duration, stopped: impl Fn() -> bool) -> bool {
    let until = tokio::time::Instant::now() + delay;
    loop {
        if stopped() {
            return false;
        }
        let now = tokio::time::Instant::now();
        if now >= until {
            return true;
        }
        tokio::time::sleep((until - now).min(STOP_CHECK_EVERY)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;

    /// A session that records what it was told.
    #[derive(Default)]
    struct Fake {
        stopped: bool,
        in_doubt: bool,
        retried: Vec<(String, u32)>,
        asked: u32,
    }

    impl Session for Fake {
        fn stopped(&self) -> bool {
            self.stopped
        }
        fn retrying(&mut self, failure: &str, attempt: u32) {
            self.retried.push((failure.to_string(), attempt));
        }
        fn may_release(&mut self) -> bool {
            self.asked += 1;
            !self.in_doubt
        }
    }

    fn retries(allowed: Option<u32>) -> Retries {
        Retries::new(
            Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            allowed,
        )
    }

    #[test]
    fn a_transient_failure_is_told_and_retried_after_a_capped_delay() {
        let mut session = Fake::default();
        let mut r = retries(None);
        for attempt in 1..=10 {
            match r.after_transient("pg_end unavailable", &mut session) {
                Next::Retry(delay) => assert!(delay <= Duration::from_secs(5)),
                other => panic!("attempt {attempt}: {other:?}"),
            }
        }
        assert_eq!(session.retried.len(), 10);
        assert_eq!(session.retried[0], ("pg_end unavailable".to_string(), 1));
        assert_eq!(session.retried[9].1, 10);
        assert_eq!(session.asked, 10, "asked before each connection is dropped");
    }

    #[test]
    fn the_bound_counts_attempts_and_the_last_failure_is_not_a_retry() {
        let mut session = Fake::default();
        let mut r = retries(Some(8));
        let nexts: Vec<Next> = (0..8)
            .map(|_| r.after_transient("deadlock", &mut session))
            .collect();
        assert!(nexts[..7].iter().all(|n| matches!(n, Next::Retry(_))));
        assert_eq!(nexts[7], Next::GiveUp, "eight attempts in all");
        assert_eq!(session.retried.len(), 7);
    }

    #[test]
    fn a_commit_in_doubt_ends_the_run_before_a_stop_or_a_retry() {
        let mut session = Fake {
            in_doubt: true,
            stopped: true,
            ..Fake::default()
        };
        assert_eq!(
            retries(None).after_transient("connection closed", &mut session),
            Next::InDoubt
        );
        assert_eq!(session.retried.len(), 1, "the failure is still logged");
    }

    #[test]
    fn a_stop_ends_the_run_after_the_failure_is_told() {
        let mut session = Fake {
            stopped: true,
            ..Fake::default()
        };
        assert_eq!(
            retries(None).after_transient("connection refused", &mut session),
            Next::Stop
        );
        assert_eq!(session.retried.len(), 1);
    }

    #[test]
    fn a_transient_apply_failure_keeps_its_text_and_an_ended_run_becomes_a_failure() {
        let failure = Failure::Transient("pg_end unavailable while connecting: refused".into());
        assert_eq!(failure.class(), ErrorClass::Transient);
        let ended = Ended::Failed(failure);
        assert_eq!(
            Failure::from(ended).to_string(),
            "pg_end unavailable while connecting: refused"
        );
        let in_doubt = Failure::from(Ended::InDoubt("connection closed".into()));
        assert_eq!(in_doubt.class(), ErrorClass::Transient);
        assert_eq!(Failure::from(Ended::Stopped).class(), ErrorClass::Transient);
    }

    #[tokio::test]
    async fn a_stop_ends_the_backoff_sleep_within_100_ms() {
        let stop = Arc::new(AtomicBool::new(false));
        let setter = {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                stop.store(true, Ordering::Relaxed);
            })
        };
        let started = Instant::now();
        let slept = pause(Duration::from_secs(10), || stop.load(Ordering::Relaxed)).await;
        assert!(!slept, "the stop is reported");
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(150), "{elapsed:?}");
        assert!(
            elapsed < Duration::from_millis(150 + 100 + 150),
            "{elapsed:?}"
        );
        setter.await.unwrap();
        assert!(
            pause(Duration::from_millis(30), || false).await,
            "slept out"
        );
    }

    #[tokio::test]
    async fn a_driver_with_nothing_to_reach_fails_transiently_within_its_timeout() {
        // A port nothing listens on: connecting is refused, a transient failure.
        let mut driver = Driver::new("postgres://relay@127.0.0.1:1/db_end")
            .with_backoff(Backoff::new(
                Duration::from_millis(1),
                Duration::from_millis(2),
            ))
            .with_attempts(3);
        let mut session = Fake::default();
        let batch = ApplyBatch::default();
        let ended = driver
            .run(&mut session, &mut Apply(&batch))
            .await
            .expect_err("nothing to connect to");
        assert!(
            matches!(ended, Ended::Failed(Failure::Transient(_))),
            "{ended:?}"
        );
        assert_eq!(session.retried.len(), 2, "three attempts, two retries");
        assert!(driver.current().is_none());
    }
}
