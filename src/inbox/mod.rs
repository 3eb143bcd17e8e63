//! Inboxes: where records land in pg_end. An inbox names the topics that feed it
//! (names, or patterns starting with `^`), the record format, and either the built-in
//! `ledger` profile (the seed's `main.transactions` + balance rule, with its fast
//! path) or a table of the operator's: the event id column (the conflict key), how a
//! record's fields map to the columns, and an optional handler statement run over the
//! events that were new ([`crate::apply::table`]).
//!
//! Declared as TOML tables ([`InboxSpec`], repeatable `--inbox` or `[[inbox]]` in the
//! configuration file). Without any, the sink has one inbox: the ledger, on `--topic`
//! with `--format`, exactly as before inboxes existed.
//!
//! # Invariants
//! 1. Every record of a subscribed topic reaches exactly one inbox (the first declared
//!    whose topics match), or a dead letter that says no inbox takes it.
//! 2. Every inbox is checked against pg_end before the first record is read: its
//!    table, its id column's unique index, its column names, and its statements as
//!    PostgreSQL plans them. A mistake stops the relay at start with the inbox's name
//!    and what to fix, never after some records were applied.

pub mod extract;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Deserialize;

use crate::apply::table::{self, BindError, Column, TableTarget};
use crate::record::decode::Format;
use crate::source::TableName;

pub use extract::{extract, Extracted, RecordView};

/// A built-in route + inbox pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// The seed's ledger: rows into `main.transactions`, amounts added to
    /// `main.balance`, with the binary-COPY fast path.
    Ledger,
}

/// The record format of an inbox's topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventFormat {
    /// Per record: a Debezium envelope, else a CloudEvent, else the value itself.
    #[default]
    Auto,
    /// The connector's row JSON (`row` routes).
    #[serde(alias = "connector")]
    Row,
    /// The connector's payload records (`payload` routes, the event-router preset):
    /// JSON or not.
    #[serde(alias = "event-router")]
    Payload,
    /// Debezium change events.
    Debezium,
    /// The seed's plain JSON rows.
    Seed,
    /// CloudEvents, structured (JSON) or binary (`ce_*` headers).
    #[serde(rename = "cloudevents")]
    CloudEvents,
}

/// Where a column's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A field of the body, by path (`data.total`; a number steps into an array).
    Field(Vec<String>),
    /// `$key`: the record key (UTF-8).
    Key,
    /// `$value`: the record value as received (UTF-8).
    Value,
    /// `$body`: the body as JSON (the row, Debezium's `after`, the CloudEvent).
    Body,
    /// `$header.NAME`.
    Header(String),
    /// `$topic`, `$partition`, `$offset`, `$timestamp` (Kafka's, RFC 3339), `$lsn`
    /// (the connector's source commit LSN): where the record was, not what it says;
    /// not compared when an id is already there.
    Topic,
    Partition,
    Offset,
    Timestamp,
    Lsn,
}

impl Source {
    pub fn parse(text: &str) -> Result<Self, String> {
        Ok(match text {
            "$key" => Self::Key,
            "$value" => Self::Value,
            "$body" => Self::Body,
            "$topic" => Self::Topic,
            "$partition" => Self::Partition,
            "$offset" => Self::Offset,
            "$timestamp" => Self::Timestamp,
            "$lsn" => Self::Lsn,
            _ => {
                if let Some(name) = text.strip_prefix("$header.") {
                    if name.is_empty() {
                        return Err("`$header.` needs a header name".into());
                    }
                    Self::Header(name.to_string())
                } else if text.starts_with('$') {
                    return Err(format!(
                        "unknown source {text:?}: a field path, or one of $key, $value, $body, \
                         $header.NAME, $topic, $partition, $offset, $timestamp, $lsn"
                    ));
                } else if text.is_empty() || text.split('.').any(str::is_empty) {
                    return Err(format!("{text:?} is not a field path (`a`, `data.total`)"));
                } else {
                    Self::Field(text.split('.').map(String::from).collect())
                }
            }
        })
    }

    /// Whether the value is the record's content (compared on a repeated id).
    fn is_content(&self) -> bool {
        !matches!(
            self,
            Self::Topic | Self::Partition | Self::Offset | Self::Timestamp | Self::Lsn
        )
    }
}

/// One inbox as declared: a TOML table.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InboxSpec {
    /// For logs and errors (default: the table, or the profile).
    pub name: Option<String>,
    /// `ledger`: the built-in profile (no `table`, `columns`, `id` or `handler`).
    pub profile: Option<Profile>,
    /// Topic names, or patterns starting with `^` (default: the sink's `--topic`).
    pub topics: Option<Vec<String>>,
    /// `auto` (default), `row`, `payload`, `debezium`, `seed`, `cloudevents`.
    pub format: Option<EventFormat>,
    /// The inbox table in pg_end, schema-qualified.
    pub table: Option<String>,
    /// The event id column (default: the table's one-column primary key).
    pub id: Option<String>,
    /// Column → source (a field path, `$key`, `$header.id`, …). Default: every
    /// writable column from the body field of the same name.
    pub columns: Option<BTreeMap<String, String>>,
    /// A statement run over `new_events` (the rows this batch inserted).
    pub handler: Option<String>,
}

impl InboxSpec {
    /// Parses one `--inbox` value: an inline TOML table, or its body alone.
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let body = if trimmed.starts_with('{') {
            format!("inbox = {trimmed}")
        } else {
            format!("[inbox]\n{trimmed}")
        };
        #[derive(Deserialize)]
        struct Wrapper {
            inbox: InboxSpec,
        }
        toml::from_str::<Wrapper>(&body)
            .map(|w| w.inbox)
            .map_err(|e| format!("invalid inbox: {}", e.message()))
    }

    fn label(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.table.clone())
            .or_else(|| self.profile.map(|_| "ledger".to_string()))
            .unwrap_or_else(|| "(unnamed)".into())
    }
}

/// Which topics feed an inbox.
#[derive(Debug, Clone)]
pub struct Topics {
    names: Vec<String>,
    patterns: Vec<(String, regex::Regex)>,
}

impl Topics {
    fn parse(inbox: &str, topics: &[String]) -> Result<Self, BindError> {
        let mut names = Vec::new();
        let mut patterns = Vec::new();
        for topic in topics {
            if topic.starts_with('^') {
                let regex = regex::Regex::new(topic)
                    .map_err(|e| invalid(inbox, format!("topic pattern {topic:?}: {e}")))?;
                patterns.push((topic.clone(), regex));
            } else {
                crate::route::check_topic_name(topic).map_err(|e| invalid(inbox, e.to_string()))?;
                names.push(topic.clone());
            }
        }
        if names.is_empty() && patterns.is_empty() {
            return Err(invalid(inbox, "`topics` is empty".into()));
        }
        Ok(Self { names, patterns })
    }

    /// The names and patterns, as declared.
    pub fn all(&self) -> Vec<&str> {
        self.names
            .iter()
            .map(String::as_str)
            .chain(self.patterns.iter().map(|(p, _)| p.as_str()))
            .collect()
    }

    fn matches(&self, topic: &str) -> bool {
        self.names.iter().any(|n| n == topic)
            || self.patterns.iter().any(|(_, r)| r.is_match(topic))
    }
}

fn invalid(inbox: &str, message: String) -> BindError {
    BindError::Invalid {
        inbox: inbox.to_string(),
        message,
    }
}

/// An inbox checked against pg_end.
#[derive(Debug, Clone)]
pub struct Inbox {
    pub name: String,
    pub topics: Topics,
    pub kind: InboxKind,
}

#[derive(Debug, Clone)]
pub enum InboxKind {
    Ledger(Format),
    Table {
        format: EventFormat,
        /// Index into [`Inboxes::tables`].
        target: usize,
        /// One per column of the target, in its order.
        sources: Vec<Source>,
    },
}

/// The inboxes of a run, bound to pg_end, and the topic → inbox lookup.
#[derive(Debug, Clone)]
pub struct Inboxes {
    pub inboxes: Vec<Inbox>,
    pub tables: Arc<[TableTarget]>,
    by_topic: HashMap<String, Option<usize>>,
    /// The last topic looked up, and its inbox.
    last: Option<(String, Option<usize>)>,
}

impl Inboxes {
    /// The one inbox of a sink without `--inbox`: the ledger on `topic`.
    pub fn ledger(topic: &str, format: Format) -> Self {
        Self {
            inboxes: vec![Inbox {
                name: "ledger".into(),
                topics: Topics {
                    names: vec![topic.to_string()],
                    patterns: Vec::new(),
                },
                kind: InboxKind::Ledger(format),
            }],
            tables: Arc::from(Vec::new()),
            by_topic: HashMap::new(),
            last: None,
        }
    }

    /// Checks `specs` against pg_end and prepares their statements there.
    /// `default_topic` and `default_format` are the sink's `--topic` and `--format`.
    pub async fn bind(
        specs: &[InboxSpec],
        client: &mut tokio_postgres::Client,
        default_topic: &str,
        default_format: Format,
    ) -> Result<Self, BindError> {
        let mut inboxes = Vec::with_capacity(specs.len());
        let mut tables = Vec::new();
        for spec in specs {
            let name = spec.label();
            let topics = spec
                .topics
                .clone()
                .unwrap_or_else(|| vec![default_topic.to_string()]);
            let topics = Topics::parse(&name, &topics)?;
            for earlier in &inboxes {
                let earlier: &Inbox = earlier;
                if let Some(topic) = topics
                    .names
                    .iter()
                    .find(|t| earlier.topics.names.contains(t))
                {
                    return Err(invalid(
                        &name,
                        format!(
                            "topic {topic} also feeds inbox {}; one inbox per topic",
                            earlier.name
                        ),
                    ));
                }
            }
            let kind = match spec.profile {
                Some(Profile::Ledger) => {
                    if spec.table.is_some()
                        || spec.columns.is_some()
                        || spec.id.is_some()
                        || spec.handler.is_some()
                    {
                        return Err(invalid(
                            &name,
                            "the ledger profile has its own table and handler: drop `table`, `id`, `columns` and `handler`".into(),
                        ));
                    }
                    InboxKind::Ledger(ledger_format(&name, spec.format, default_format)?)
                }
                None => {
                    let (target, sources) = bind_table(spec, &name, client).await?;
                    tables.push(target);
                    InboxKind::Table {
                        format: spec.format.unwrap_or_default(),
                        target: tables.len() - 1,
                        sources,
                    }
                }
            };
            inboxes.push(Inbox { name, topics, kind });
        }
        if inboxes.is_empty() {
            return Ok(Self::ledger(default_topic, default_format));
        }
        Ok(Self {
            inboxes,
            tables: Arc::from(tables),
            by_topic: HashMap::new(),
            last: None,
        })
    }

    /// [`Self::bind`] on a connection to `url`, waiting (with backoff) while pg_end is
    /// unreachable; `None` once `stopped()` says so.
    pub async fn bind_when_reachable(
        specs: &[InboxSpec],
        url: &str,
        default_topic: &str,
        default_format: Format,
        stopped: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Self>, BindError> {
        let mut backoff = crate::retry::Backoff::reconnect();
        loop {
            if stopped() {
                return Ok(None);
            }
            let attempt = async {
                let mut client =
                    crate::pg::connect(url)
                        .await
                        .map_err(|source| BindError::Catalog {
                            inbox: "(all)".into(),
                            table: "(connecting to pg_end)".into(),
                            source,
                        })?;
                Self::bind(specs, &mut client, default_topic, default_format).await
            };
            match attempt.await {
                Ok(inboxes) => {
                    for inbox in &inboxes.inboxes {
                        tracing::info!(inbox = %inbox.name, topics = ?inbox.topics.all(), "inbox");
                    }
                    return Ok(Some(inboxes));
                }
                Err(BindError::Catalog { source, .. })
                    if crate::error::pg::classify(&source)
                        == crate::error::ErrorClass::Transient =>
                {
                    tracing::warn!(
                        error = %crate::error::error_chain(&source),
                        "cannot read the inboxes' tables from pg_end; retrying"
                    );
                    backoff.wait().await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// What the consumer subscribes to: every name and pattern.
    pub fn subscription(&self) -> Vec<String> {
        let mut all: Vec<String> = Vec::new();
        for inbox in &self.inboxes {
            for topic in inbox
                .topics
                .names
                .iter()
                .chain(inbox.topics.patterns.iter().map(|(p, _)| p))
            {
                if !all.contains(topic) {
                    all.push(topic.clone());
                }
            }
        }
        all
    }

    /// `None` when an inbox takes `topic`; else why every record of it that `from` (a
    /// route) makes would be a dead letter, and what to change.
    pub fn untaken(&mut self, topic: &str, from: &str) -> Option<String> {
        if self.for_topic(topic).is_some() {
            return None;
        }
        let taken = self
            .inboxes
            .iter()
            .map(|i| format!("{} takes {}", i.name, i.topics.all().join(", ")))
            .collect::<Vec<_>>()
            .join("; ");
        Some(format!(
            "route {from} sends to topic {topic}, which no inbox takes ({taken}): add \
             {topic} to an inbox's topics, or give the route one of theirs"
        ))
    }

    /// The inbox `topic`'s records go to: the first declared that matches.
    pub fn for_topic(&mut self, topic: &str) -> Option<&Inbox> {
        // Records come in runs of one topic: the last answer first, no hashing.
        let index = match &self.last {
            Some((last, index)) if last == topic => *index,
            _ => {
                let index = match self.by_topic.get(topic) {
                    Some(index) => *index,
                    None => {
                        let found = self.inboxes.iter().position(|i| i.topics.matches(topic));
                        self.by_topic.insert(topic.to_string(), found);
                        found
                    }
                };
                self.last = Some((topic.to_string(), index));
                index
            }
        };
        index.map(|i| &self.inboxes[i])
    }
}

fn ledger_format(
    inbox: &str,
    format: Option<EventFormat>,
    default: Format,
) -> Result<Format, BindError> {
    Ok(match format {
        None => default,
        Some(EventFormat::Auto) => Format::Auto,
        Some(EventFormat::Row) => Format::Connector,
        Some(EventFormat::Seed) => Format::Seed,
        Some(EventFormat::Debezium) => Format::Debezium,
        Some(other) => {
            return Err(invalid(
                inbox,
                format!("the ledger profile reads rows (auto, row, seed, debezium), not {other:?}"),
            ))
        }
    })
}

/// The table of a generic inbox, its columns and sources, its statements prepared.
async fn bind_table(
    spec: &InboxSpec,
    name: &str,
    client: &mut tokio_postgres::Client,
) -> Result<(TableTarget, Vec<Source>), BindError> {
    let table_text = spec.table.as_deref().ok_or_else(|| {
        invalid(
            name,
            "an inbox needs `table = \"schema.table\"` (or `profile = \"ledger\"`)".into(),
        )
    })?;
    let table = TableName::parse(table_text).map_err(|e| invalid(name, e))?;
    let (catalog, unique) = table::read_table(&*client, name, &table).await?;
    let id = match &spec.id {
        Some(id) => {
            if !unique.contains(id) {
                return Err(invalid(
                    name,
                    format!(
                        "the id column {id} of {table} needs a unique index or constraint on exactly ({id}) \
                         (the conflict key of ON CONFLICT); the table has {}",
                        describe(&unique)
                    ),
                ));
            }
            id.clone()
        }
        None => unique.first().cloned().ok_or_else(|| {
            invalid(
                name,
                format!("{table} has no one-column primary key or unique index to be the event id; add one or name it with `id`"),
            )
        })?,
    };
    let mapping: Vec<(String, Source)> = match &spec.columns {
        Some(columns) => columns
            .iter()
            .map(|(column, source)| {
                Source::parse(source)
                    .map(|s| (column.clone(), s))
                    .map_err(|e| invalid(name, format!("column {column}: {e}")))
            })
            .collect::<Result<_, _>>()?,
        None => catalog
            .iter()
            .filter(|c| !c.read_only)
            .map(|c| (c.name.clone(), Source::Field(vec![c.name.clone()])))
            .collect(),
    };
    let mut columns = Vec::with_capacity(mapping.len());
    let mut sources = Vec::with_capacity(mapping.len());
    for (column, source) in mapping {
        let Some(found) = catalog.iter().find(|c| c.name == column) else {
            return Err(invalid(
                name,
                format!(
                    "{table} has no column {column}; its columns: {}",
                    describe(&catalog.iter().map(|c| c.name.clone()).collect::<Vec<_>>())
                ),
            ));
        };
        if found.read_only {
            return Err(invalid(
                name,
                format!("column {column} of {table} is generated or an identity ALWAYS column; it cannot be written"),
            ));
        }
        columns.push(Column {
            name: column.clone(),
            type_sql: found.type_sql.clone(),
            default: found.default.clone(),
            required: column == id || (found.not_null && found.default.is_none()),
            content: source.is_content(),
        });
        sources.push(source);
    }
    let Some(id_index) = columns.iter().position(|c| c.name == id) else {
        return Err(invalid(
            name,
            format!("the id column {id} has no source in `columns`"),
        ));
    };
    if let Some(missing) = catalog.iter().find(|c| {
        c.not_null
            && c.default.is_none()
            && !c.read_only
            && !columns.iter().any(|m| m.name == c.name)
    }) {
        return Err(invalid(
            name,
            format!(
                "column {} of {table} is NOT NULL without a default and has no source in `columns`",
                missing.name
            ),
        ));
    }
    let target = TableTarget::new(name, table, columns, id_index, spec.handler.clone());
    target.prepare(client).await?;
    Ok((target, sources))
}

fn describe(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_inline_and_as_a_body() {
        let spec = InboxSpec::parse(
            r#"{name = "orders", topics = ["outbox.event.order", "^outbox\\.event\\..*"], format = "event-router", table = "inbox.events", columns = {event_id = "$header.id", body = "$value"}, handler = "UPDATE t SET n = n + 1"}"#,
        )
        .unwrap();
        assert_eq!(spec.format, Some(EventFormat::Payload));
        assert_eq!(spec.columns.as_ref().unwrap()["event_id"], "$header.id");
        let spec = InboxSpec::parse("profile = \"ledger\"\ntopics = [\"transactions\"]").unwrap();
        assert_eq!(spec.profile, Some(Profile::Ledger));
        assert!(InboxSpec::parse("{tabel = \"x\"}")
            .unwrap_err()
            .contains("tabel"));
    }

    #[test]
    fn sources_parse() {
        assert_eq!(
            Source::parse("data.total").unwrap(),
            Source::Field(vec!["data".into(), "total".into()])
        );
        assert_eq!(
            Source::parse("$header.id").unwrap(),
            Source::Header("id".into())
        );
        assert_eq!(Source::parse("$lsn").unwrap(), Source::Lsn);
        assert!(Source::parse("$nope").unwrap_err().contains("$key"));
        assert!(Source::parse("a..b").is_err());
        assert!(!Source::Offset.is_content() && Source::Key.is_content());
    }

    #[test]
    fn records_go_to_the_first_inbox_whose_topics_match() {
        let mut inboxes = Inboxes::ledger("transactions", Format::Auto);
        inboxes.inboxes.push(Inbox {
            name: "events".into(),
            topics: Topics::parse("events", &["^outbox\\.event\\..*".into()]).unwrap(),
            kind: InboxKind::Ledger(Format::Auto),
        });
        assert_eq!(inboxes.for_topic("transactions").unwrap().name, "ledger");
        assert_eq!(
            inboxes.for_topic("outbox.event.order").unwrap().name,
            "events"
        );
        assert!(inboxes.for_topic("other").is_none());
        assert_eq!(
            inboxes.subscription(),
            vec!["transactions", "^outbox\\.event\\..*"]
        );
        assert!(Topics::parse("x", &["bad topic".into()]).is_err());
        assert!(Topics::parse("x", &["^(".into()]).is_err());
    }
}
