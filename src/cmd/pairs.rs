//! `verify` and `reconcile` for route → inbox pairs: does each inbox hold exactly the
//! events its sources hold?
//!
//! # What is compared
//! For each route whose source can be read (its outbox table, or the `source_query` it
//! names: needed once the outbox is cleaned up, and for logical messages), every source
//! row is made into its record by the route, as the connector makes it, and into its
//! event by the inbox its topic feeds, as the sink takes it. The inbox table is then
//! asked, set-based, a batch of events per statement, which ids it holds and whether
//! with the same content (the inbox's own compare statement: each value cast to its
//! column's type, compared as PostgreSQL prints it):
//! - **missing**: in a source, not in the inbox;
//! - **changed**: in both, with other content (the columns that come from the record);
//! - **extra**: in the inbox, made by none of the sources read;
//! - **refused**: in a source, with a value the inbox's column refuses (a data
//!   exception, SQLSTATE class 22, e.g. `"x"` for a `numeric`). The pipeline
//!   dead-letters such an event (`apply_failed`), so it is reported apart with the
//!   server's reason and never copied; the inbox still lacks it, so it is a
//!   difference (a person fixes the event or the mapping). It is found by bisecting a
//!   batch whose compare statement fails that way, so one bad event never stops the
//!   comparison of the others.
//!
//! # Invariants
//! 1. Read-only on both sides, except `reconcile` without `--dry-run`, which only adds
//!    the missing events, through [`crate::apply::apply`] with the inbox's handler: each once,
//!    even if the pipeline delivers it at the same time or reconcile runs twice.
//! 2. Changed and extra events are reported, never overwritten or deleted.
//! 3. Memory: one batch of events per inbox, plus the ids of the events the sources
//!    hold (to find the extra ones).

use std::collections::{BTreeMap, HashSet};

use futures_util::{pin_mut, TryStreamExt};
use serde::Serialize;
use thiserror::Error;
use tokio_postgres::Client;

use crate::apply::driver::{self, Driver, Failure};
use crate::apply::table::{BindError, Compared, Event, TableTarget};
use crate::apply::{ApplyBatch, Origin, Progress};
use crate::inbox::{self, Extracted, InboxKind, InboxSpec, Inboxes, RecordView};
use crate::record::decode::Format;
use crate::route::{Rendered, Route, RouteSource, RouteSpec};
use crate::source::{self, quote_ident, ColumnDef};

/// Events compared (and copied) per statement.
const BATCH: usize = 2000;

/// How many ids of each kind a report lists.
const SAMPLE: usize = 20;

/// The route → inbox pairs of `verify` and `reconcile`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PairArgs {
    /// A route, as the connector's (docs/connector.md, "Routes"), with an optional
    /// `source_query`; `[[route]]` in the configuration file. Used with --inbox.
    #[arg(long = "route", env = "OUTBOX_RELAY_ROUTES", value_delimiter = '\n', value_parser = RouteSpec::parse)]
    pub routes: Vec<RouteSpec>,
    /// An inbox, as the sink's (docs/sink.md, "Inboxes"); `[[inbox]]` in the
    /// configuration file. With any, the route → inbox pairs are checked instead of
    /// the seed's ledger (which stays checked when an inbox is `profile = "ledger"`).
    #[arg(long = "inbox", value_parser = InboxSpec::parse)]
    pub inboxes: Vec<InboxSpec>,
}

impl PairArgs {
    pub fn is_set(&self) -> bool {
        !self.inboxes.is_empty()
    }

    /// Whether the seed's ledger is one of the inboxes (its own checks then run too).
    pub fn has_ledger(&self) -> bool {
        self.inboxes
            .iter()
            .any(|i| i.profile == Some(inbox::Profile::Ledger))
    }
}

#[derive(Debug, Error)]
pub enum PairError {
    #[error("{0}")]
    Route(String),
    #[error("an inbox cannot be used")]
    Inbox(#[source] Box<BindError>),
    #[error("cannot read {what}")]
    Query {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("applying missing events to pg_end failed")]
    Apply(#[source] Failure),
}

/// An event in both places with other content.
#[derive(Debug, Clone, Serialize)]
pub struct ChangedEvent {
    pub id: String,
    /// The columns whose stored value is not the source's.
    pub columns: Vec<String>,
}

/// What one inbox holds compared with its sources.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PairReport {
    pub inbox: String,
    /// The sources read (`table app.outbox`, `query of messages with prefix "o"`).
    pub sources: Vec<String>,
    /// Events the sources make for this inbox.
    pub source_events: u64,
    /// Rows of the inbox table.
    pub inbox_events: u64,
    pub missing_count: u64,
    pub missing_sample: Vec<String>,
    pub extra_count: u64,
    pub extra_sample: Vec<String>,
    pub changed_count: u64,
    pub changed_sample: Vec<ChangedEvent>,
    /// Source events whose values the inbox's columns refuse, or (found by
    /// `reconcile`, which runs it) its handler refuses: dead letters of the pipeline,
    /// with the server's reason.
    pub refused_count: u64,
    pub refused_sample: Vec<RefusedEvent>,
    /// `reconcile`: missing events inserted now (the rest were there by then).
    pub copied: u64,
}

impl PairReport {
    /// The inbox holds exactly its sources' events (after a reconcile: it does now).
    pub fn ok(&self, copied_counts: bool) -> bool {
        let missing = if copied_counts {
            self.missing_count.saturating_sub(self.copied)
        } else {
            self.missing_count
        };
        missing == 0 && self.extra_count == 0 && self.changed_count == 0 && self.refused_count == 0
    }

    pub fn render(&self, verb: &str) -> String {
        use std::fmt::Write;
        let mut out = format!(
            "inbox {}: {} events in its sources ({}), {} in the inbox",
            self.inbox,
            self.source_events,
            self.sources.join(", "),
            self.inbox_events
        );
        if self.missing_count > 0 {
            let _ = write!(
                out,
                "\n  missing in the inbox: {} (first ids: {:?})",
                self.missing_count, self.missing_sample
            );
            match verb {
                "" => {}
                "would add" => {
                    let _ = write!(out, "; would add {}", self.missing_count);
                }
                _ => {
                    let _ = write!(out, "; {verb} {}", self.copied);
                }
            }
        }
        if self.extra_count > 0 {
            let _ = write!(
                out,
                "\n  extra in the inbox (in no source read): {} (first ids: {:?}); never deleted",
                self.extra_count, self.extra_sample
            );
        }
        if self.refused_count > 0 {
            let _ = write!(
                out,
                "\n  refused by the inbox's columns or its handler (the pipeline dead-letters them; fix the event, the mapping or the handler, never copied): {}",
                self.refused_count
            );
            for r in &self.refused_sample {
                let _ = write!(out, "\n    id {}: {}", r.id, r.error);
            }
        }
        if self.changed_count > 0 {
            let _ = write!(
                out,
                "\n  events that differ: {}; never overwritten",
                self.changed_count
            );
            for c in &self.changed_sample {
                let _ = write!(out, "\n    id {}: {}", c.id, c.columns.join(", "));
            }
        }
        out
    }
}

/// A source event the inbox's columns refuse.
#[derive(Debug, Clone, Serialize)]
pub struct RefusedEvent {
    /// The event id as the source gives it.
    pub id: String,
    /// The server's message and SQLSTATE.
    pub error: String,
}

/// Compares `events` with `table`; the events whose values its columns refuse (a data
/// exception, SQLSTATE class 22) are isolated by bisection and returned apart, as
/// (index in `events`, the server's message). Any other error ends the comparison.
async fn compare_isolating(
    table: &TableTarget,
    target: &Client,
    events: &[&Event],
) -> Result<(Vec<Compared>, Vec<(usize, String)>), tokio_postgres::Error> {
    let mut compared = Vec::with_capacity(events.len());
    let mut refused = Vec::new();
    let mut ranges = vec![(0, events.len())];
    while let Some((start, end)) = ranges.pop() {
        match table.compare(target, &events[start..end]).await {
            Ok(found) => compared.extend(found.into_iter().map(|mut c| {
                c.index += start;
                c
            })),
            Err(e) if e.code().is_some_and(|c| c.code().starts_with("22")) => {
                if end - start == 1 {
                    refused.push((start, crate::apply::db_error_text(&e)));
                } else {
                    let middle = start + (end - start) / 2;
                    ranges.push((middle, end));
                    ranges.push((start, middle));
                }
            }
            Err(e) => return Err(e),
        }
    }
    compared.sort_by_key(|c| c.index);
    Ok((compared, refused))
}

/// Compares every table inbox with its sources; with `copy`, adds the missing events.
pub async fn check(
    pairs: &PairArgs,
    source: &Client,
    target_url: &str,
    copy: bool,
) -> Result<Vec<PairReport>, PairError> {
    let mut target = crate::pg::connect(target_url)
        .await
        .map_err(|source| PairError::Query {
            what: "pg_end (connect)".into(),
            source,
        })?;
    let mut inboxes = Inboxes::bind(&pairs.inboxes, &mut target, "", Format::Auto)
        .await
        .map_err(|e| PairError::Inbox(Box::new(e)))?;
    let routes = resolve_routes(&pairs.routes)?;
    let mut state: BTreeMap<usize, Pair> = BTreeMap::new();
    for inbox in &inboxes.inboxes {
        if let InboxKind::Table { target, .. } = inbox.kind {
            state.insert(
                target,
                Pair {
                    report: PairReport {
                        inbox: inbox.name.clone(),
                        ..PairReport::default()
                    },
                    ids: HashSet::new(),
                    pending: Vec::new(),
                },
            );
        }
    }
    let mut applier = copy.then(|| Driver::new(target_url.to_string()));
    for route in &routes {
        let Some((sql, columns, label)) = source_of(route, source).await? else {
            continue;
        };
        let bound = route.bind(&columns);
        let rows = source
            .query_raw(sql.as_str(), std::iter::empty::<&str>())
            .await
            .map_err(|e| PairError::Query {
                what: format!("the events of {label} from pg_start"),
                source: e,
            })?;
        pin_mut!(rows);
        let mut touched: HashSet<usize> = HashSet::new();
        while let Some(row) = rows.try_next().await.map_err(|e| PairError::Query {
            what: format!("the events of {label} from pg_start"),
            source: e,
        })? {
            let values: Vec<Option<&str>> = (0..columns.len())
                .map(|i| row.try_get::<_, Option<&str>>(i).ok().flatten())
                .collect();
            let refs: Vec<Option<&[u8]>> = values.iter().map(|v| v.map(str::as_bytes)).collect();
            let Some(event) = event_of(&mut inboxes, bound.render(&refs, None)) else {
                continue;
            };
            let Some(pair) = state.get_mut(&event.target) else {
                continue;
            };
            if touched.insert(event.target) {
                pair.report.sources.push(label.clone());
            }
            pair.pending.push(event);
            if pair.pending.len() >= BATCH {
                pair.flush(&inboxes, &target, applier.as_mut()).await?;
            }
        }
        for pair in state.values_mut() {
            pair.flush(&inboxes, &target, applier.as_mut()).await?;
        }
    }
    let mut reports = Vec::with_capacity(state.len());
    for (index, mut pair) in state {
        pair.flush(&inboxes, &target, applier.as_mut()).await?;
        let table = &inboxes.tables[index];
        let id = quote_ident(&table.columns[table.id].name);
        let sql = format!("SELECT {id}::text FROM {}", table.table.quoted());
        let rows = target
            .query_raw(sql.as_str(), std::iter::empty::<&str>())
            .await
            .map_err(|e| PairError::Query {
                what: format!("the ids of {}", table.table),
                source: e,
            })?;
        pin_mut!(rows);
        while let Some(row) = rows.try_next().await.map_err(|e| PairError::Query {
            what: format!("the ids of {}", table.table),
            source: e,
        })? {
            pair.report.inbox_events += 1;
            let id: String = row.try_get(0).unwrap_or_default();
            if !pair.ids.contains(&id) {
                pair.report.extra_count += 1;
                if pair.report.extra_sample.len() < SAMPLE {
                    pair.report.extra_sample.push(id);
                }
            }
        }
        reports.push(pair.report);
    }
    Ok(reports)
}

/// One inbox's comparison so far.
struct Pair {
    report: PairReport,
    /// The ids (as PostgreSQL prints them) of the events its sources make.
    ids: HashSet<String>,
    pending: Vec<Event>,
}

impl Pair {
    /// Compares the pending events with the inbox; with an applier, adds the missing.
    async fn flush(
        &mut self,
        inboxes: &Inboxes,
        target: &Client,
        applier: Option<&mut Driver>,
    ) -> Result<(), PairError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let events = std::mem::take(&mut self.pending);
        let Some(table) = events.first().map(|e| &inboxes.tables[e.target]) else {
            return Ok(());
        };
        let refs: Vec<&Event> = events.iter().collect();
        let (compared, refused) =
            compare_isolating(table, target, &refs)
                .await
                .map_err(|e| PairError::Query {
                    what: format!("{} in pg_end", table.table),
                    source: e,
                })?;
        for (index, error) in refused {
            self.report.source_events += 1;
            // As the source gives it (the id itself may be what the cast refused).
            let id = events[index].values[table.id].clone().unwrap_or_default();
            if !self.ids.insert(id.clone()) {
                continue; // two source rows with one event id: counted once
            }
            self.report.refused_count += 1;
            if self.report.refused_sample.len() < SAMPLE {
                self.report.refused_sample.push(RefusedEvent { id, error });
            }
        }
        let mut missing = Vec::new();
        for c in compared {
            self.report.source_events += 1;
            if !self.ids.insert(c.id.clone()) {
                continue; // two source rows with one event id: counted once
            }
            if !c.found {
                self.report.missing_count += 1;
                if self.report.missing_sample.len() < SAMPLE {
                    self.report.missing_sample.push(c.id.clone());
                }
                if let Some(event) = events.get(c.index) {
                    missing.push(event.clone());
                }
            } else if !c.differing.is_empty() {
                self.report.changed_count += 1;
                if self.report.changed_sample.len() < SAMPLE {
                    self.report.changed_sample.push(ChangedEvent {
                        id: c.id,
                        columns: c.differing,
                    });
                }
            }
        }
        if let (Some(applier), false) = (applier, missing.is_empty()) {
            let batch = ApplyBatch {
                events: missing,
                tables: inboxes.tables.clone(),
                progress: Progress::None,
                dead_letters_apart: true,
                ..ApplyBatch::default()
            };
            let outcome = applier
                .run(&mut Reconciling, &mut driver::Apply(&batch))
                .await
                .map_err(|ended| PairError::Apply(ended.into()))?;
            self.report.copied += outcome.inserted;
            // Events the inbox's handler (or pg_end) refuses: refused, not missing;
            // the pipeline has dead-lettered them once already.
            for letter in outcome.apart {
                let Some(event) = batch.events.iter().find(|e| e.origin == letter.origin) else {
                    continue;
                };
                self.report.missing_count = self.report.missing_count.saturating_sub(1);
                let id = event.values[table.id].clone().unwrap_or_default();
                self.report.missing_sample.retain(|m| *m != id);
                self.report.refused_count += 1;
                if self.report.refused_sample.len() < SAMPLE {
                    self.report.refused_sample.push(RefusedEvent {
                        id,
                        error: letter.error,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Reconcile's side of the driver: no stop, retries logged.
struct Reconciling;

impl driver::Session for Reconciling {
    fn stopped(&self) -> bool {
        false
    }

    fn retrying(&mut self, failure: &str, attempt: u32) {
        tracing::warn!(error = %failure, attempt, "applying missing events, retrying");
    }
}

fn resolve_routes(specs: &[RouteSpec]) -> Result<Vec<Route>, PairError> {
    let mut routes = Vec::with_capacity(specs.len());
    for spec in specs {
        let default_topic = spec.table.clone().unwrap_or_default();
        routes.push(
            spec.resolve(&default_topic)
                .map_err(|e| PairError::Route(e.to_string()))?,
        );
    }
    Ok(routes)
}

/// The query that reads a route's source rows as text, their columns, and a label;
/// `None` for a message route without `source_query` (messages are only in the WAL).
async fn source_of(
    route: &Route,
    source: &Client,
) -> Result<Option<(String, Vec<ColumnDef>, String)>, PairError> {
    let (from, columns, label) = match (&route.source_query, &route.source) {
        (Some(query), _) => {
            let statement = source.prepare(query).await.map_err(|e| PairError::Query {
                what: format!("the source_query of the route for {}", route.source),
                source: e,
            })?;
            let columns = statement
                .columns()
                .iter()
                .map(|c| ColumnDef {
                    name: c.name().to_string(),
                    type_oid: c.type_().oid(),
                    key: false,
                })
                .collect();
            (
                format!("({query}) s"),
                columns,
                format!("query of {}", route.source),
            )
        }
        (None, RouteSource::Table(table)) => {
            let columns = source::outbox_columns(source, table)
                .await
                .map_err(|e| PairError::Route(e.to_string()))?;
            (table.quoted(), columns, route.source.to_string())
        }
        (None, RouteSource::Message(prefix)) => {
            tracing::warn!(
                prefix,
                "a message route without source_query: its events are only in the WAL; not compared"
            );
            return Ok(None);
        }
    };
    let list: Vec<String> = columns
        .iter()
        .map(|c: &ColumnDef| format!("{}::text", quote_ident(&c.name)))
        .collect();
    Ok(Some((
        format!("SELECT {} FROM {from}", list.join(", ")),
        columns,
        label,
    )))
}

/// The event a rendered row makes for a table inbox, if any (a row that cannot be
/// routed, or whose topic feeds no table inbox, or that is skipped, makes none).
fn event_of(inboxes: &mut Inboxes, rendered: Rendered<'_>) -> Option<Event> {
    let Rendered::Record {
        topic,
        key,
        value,
        headers,
        ..
    } = rendered
    else {
        return None;
    };
    let InboxKind::Table {
        format,
        target,
        sources,
    } = &inboxes.for_topic(&topic)?.kind
    else {
        return None;
    };
    let view = RecordView {
        topic: &topic,
        partition: None,
        offset: None,
        timestamp_ms: None,
        key,
        value: value.as_deref(),
        headers: &headers,
        lsn: None,
    };
    match inbox::extract(*format, sources, &view) {
        Ok(Extracted::Event(values)) => Some(Event {
            target: *target,
            values,
            origin: Origin {
                topic: Some(std::sync::Arc::from(topic.as_ref())),
                key: key.map(<[u8]>::to_vec),
                value,
                headers: headers.iter().copied().collect(),
                ..Origin::default()
            },
        }),
        _ => None,
    }
}
