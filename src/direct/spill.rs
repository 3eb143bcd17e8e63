//! Direct mode's spilled batches: a source transaction larger than a batch is applied
//! part by part into ONE pg_end transaction left open ([`apply::OpenApply`]), so that
//! memory holds a batch, not the transaction, and pg_end still sees it atomically (see
//! "Large source transactions" in [`crate::pipeline`]).
//!
//! The open transaction lives in a task of its own, which holds pg_end's connection (the
//! destination's mutex) from the first part to the commit; the destination hands it the
//! parts through a channel of one, so a part is read from the slot while the one before
//! is applied, and no more.
//!
//! # Invariants
//! 1. Every part, and the last batch with the progress row, is applied in the same
//!    pg_end transaction, on the connection that made the commits before it (a new
//!    connection would put those in doubt: see "Asynchronous commit" in the module
//!    above); nothing of it is visible before its COMMIT.
//! 2. Any failure rolls the whole transaction back and ends the session (the parts are
//!    not kept to be applied again): the slot sends the source transaction again. The
//!    connection is given up with it, so commits on it that were not yet seen flushed
//!    end the session too, as everywhere in direct mode. A COMMIT whose outcome was lost
//!    is settled by the next session, which reads the progress row.
//! 3. While the transaction is open nothing else uses the connection: the task holds
//!    the mutex until it has committed or rolled back.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};

use super::{destination_error, wal_positions, PgEnd};
use crate::apply::table::TableTarget;
use crate::apply::{self, ApplyBatch, ApplyError, ApplyOutcome};
use crate::error::ErrorClass;
use crate::pipeline::{Committed, PipelineError};

/// What the task is handed.
enum Part {
    /// A part of the batch: applied, not committed.
    Apply(ApplyBatch, oneshot::Sender<Result<(), PipelineError>>),
    /// The rest of the batch, with its progress: applied, then everything committed.
    Commit(
        ApplyBatch,
        oneshot::Sender<Result<Committed, PipelineError>>,
    ),
}

/// The open transaction of a spilled batch.
pub(super) struct Spill {
    parts: mpsc::Sender<Part>,
    task: tokio::task::JoinHandle<()>,
}

/// The open transaction's task ended before it was asked to (it failed, and said so
/// to the part it failed on).
fn ended() -> PipelineError {
    PipelineError::Destination {
        context: "the pg_end transaction of a source transaction larger than a batch ended".into(),
        class: ErrorClass::Transient,
        source: "its task ended".into(),
    }
}

fn failed(error: ApplyError) -> PipelineError {
    destination_error(
        "applying a source transaction larger than a batch to pg_end (it is rolled back and \
         read again from the slot)",
        error.into(),
    )
}

impl Spill {
    /// Starts the task; it takes pg_end's connection once the one commit that may
    /// hold it has returned. `tables`: the inboxes the parts' events go to.
    pub(super) fn start(pg_end: Arc<Mutex<PgEnd>>, tables: Arc<[TableTarget]>) -> Self {
        let (parts, received) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            let mut pg_end = pg_end.lock().await;
            if !apply_parts(&mut pg_end, &tables, received).await {
                // Rolled back (the transaction was dropped): the connection goes too.
                let _ = pg_end.in_doubt();
            }
        });
        Self { parts, task }
    }

    /// Hands a part over; completes once it is applied (not committed).
    pub(super) fn part(
        &self,
        batch: ApplyBatch,
    ) -> impl Future<Output = Result<(), PipelineError>> + Send + 'static {
        let parts = self.parts.clone();
        async move {
            let (reply, replied) = oneshot::channel();
            parts
                .send(Part::Apply(batch, reply))
                .await
                .map_err(|_| ended())?;
            replied.await.map_err(|_| ended())?
        }
    }

    /// Hands the rest over and commits everything.
    pub(super) async fn commit(self, batch: ApplyBatch) -> Result<Committed, PipelineError> {
        let (reply, replied) = oneshot::channel();
        self.parts
            .send(Part::Commit(batch, reply))
            .await
            .map_err(|_| ended())?;
        let committed = replied.await.map_err(|_| ended())?;
        let _ = self.task.await;
        committed
    }

    /// Rolls everything back (the session ends before its source transaction did).
    pub(super) async fn abandon(self) {
        drop(self.parts);
        let _ = self.task.await;
    }
}

/// The task's work: `true` once committed, `false` when it failed or was abandoned
/// (the transaction is then dropped, which rolls it back).
async fn apply_parts(
    pg_end: &mut PgEnd,
    tables: &Arc<[TableTarget]>,
    mut parts: mpsc::Receiver<Part>,
) -> bool {
    let Some(mut next) = parts.recv().await else {
        return false;
    };
    let asynchronous = pg_end.asynchronous();
    // Invariant 1: the connection of the commits not yet seen flushed, or, with none,
    // any connection.
    let usable = pg_end.driver.current().is_some_and(|t| !t.is_closed());
    if !usable {
        let connected = if pg_end.unflushed.is_some() {
            Err(pg_end.in_doubt())
        } else {
            pg_end
                .driver
                .connection()
                .await
                .map(drop)
                .map_err(|failure| destination_error("connecting to pg_end", failure))
        };
        if let Err(error) = connected {
            reply_error(next, error);
            return false;
        }
    }
    let Some(target) = pg_end.driver.current() else {
        reply_error(next, ended());
        return false;
    };
    let mut open = match bounded(target.open(tables)).await {
        Ok(open) => open,
        Err(error) => {
            reply_error(next, error);
            return false;
        }
    };
    let mut outcome = ApplyOutcome::default();
    let (last, reply) = loop {
        match next {
            Part::Apply(batch, reply) => match bounded(open.apply(&batch)).await {
                Ok(applied) => {
                    add(&mut outcome, &applied);
                    let _ = reply.send(Ok(()));
                }
                Err(error) => {
                    let _ = reply.send(Err(error));
                    return false;
                }
            },
            Part::Commit(batch, reply) => break (batch, reply),
        }
        match parts.recv().await {
            Some(part) => next = part,
            None => return false,
        }
    };
    let committed = match bounded(open.apply(&last)).await {
        Err(error) => Err(error),
        Ok(applied) => {
            add(&mut outcome, &applied);
            match bounded(open.commit()).await {
                Ok(()) if asynchronous => bounded(async {
                    wal_positions(target)
                        .await
                        .map_err(|e| ApplyError::new("reading WAL positions", e))
                })
                .await
                .map(Some),
                done => done.map(|()| None),
            }
        }
    };
    let committed = match committed {
        Ok(committed) => committed,
        Err(error) => {
            let _ = reply.send(Err(error));
            return false;
        }
    };
    tracing::info!(
        inserted = outcome.inserted,
        duplicates = outcome.duplicates,
        dead_letters = outcome.dead_letters,
        "a source transaction larger than a batch is committed in pg_end"
    );
    let committed = match committed {
        Some((needed, flushed)) => {
            pg_end.unflushed = (flushed < needed).then_some(needed);
            Committed {
                flush_needed: Some(needed),
                flushed,
            }
        }
        None => Committed::DURABLE,
    };
    let _ = reply.send(Ok(committed));
    true
}

fn reply_error(part: Part, error: PipelineError) {
    match part {
        Part::Apply(_, reply) => drop(reply.send(Err(error))),
        Part::Commit(_, reply) => drop(reply.send(Err(error))),
    }
}

/// A pg_end step within the apply timeout, as every pg_end round trip of the relay.
async fn bounded<T>(step: impl Future<Output = Result<T, ApplyError>>) -> Result<T, PipelineError> {
    match tokio::time::timeout(apply::APPLY_TIMEOUT, step).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(error)) => Err(failed(error)),
        Err(_) => Err(timed_out()),
    }
}

fn timed_out() -> PipelineError {
    PipelineError::Destination {
        context: format!(
            "a part of a source transaction larger than a batch took longer than {:?} to \
             apply to pg_end",
            apply::APPLY_TIMEOUT
        ),
        class: ErrorClass::Transient,
        source: "timed out".into(),
    }
}

fn add(total: &mut ApplyOutcome, part: &ApplyOutcome) {
    total.inserted += part.inserted;
    total.duplicates += part.duplicates;
    total.dead_letters += part.dead_letters;
}
