//! Routes: how one outbox source (a table of the publication, or a
//! `pg_logical_emit_message` prefix) becomes Kafka records. Pure, no I/O.
//!
//! A route names the event id (the idempotency key end to end), the record key, the
//! topic (a literal, or a template over the row's columns such as
//! `outbox.event.${aggregatetype}`), the value (`row`: the whole row as JSON; or
//! `payload`: one column's content) and headers (header name → column). Routes are
//! declared as TOML tables ([`RouteSpec`], repeatable `--route` or `[[route]]` in the
//! configuration file); without any, the one-table flags (`--table`, `--topic`,
//! `--key-column`, `--preset`) make one.
//!
//! A logical message's top-level JSON fields stand in for columns ([`message_row`]).
//!
//! `--trace-column` names the column (or message field) that holds the writer's W3C
//! trace context: where a source has it, its value travels as the header
//! `traceparent` (see [`crate::telemetry`]); a source without it, or a NULL, gives a
//! record without that header, never a dead letter.
//!
//! # Invariants
//! 1. Every row (or message) of a routed source becomes exactly one record: either
//!    the routed one, or a dead letter ([`Rendered::Dead`]) that keeps the row's full
//!    content and says why. Nothing is dropped: a NULL id, key or topic column, a
//!    template naming a missing column, an illegal topic name or a payload that is not
//!    valid for its declared format all make a dead letter.
//! 2. Rendering is deterministic: the same row gives the same record, byte for byte,
//!    so a source transaction read again after a crash is sent again identically.
//! 3. The `event-router` preset's defaults are exactly Debezium's Outbox Event Router
//!    defaults ([`RouteSpec::event_router`]).

mod render;

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::source::{validate_identifier, ColumnDef, TableName};

pub use render::{dead_letter_value, message_row, Bound, Rendered};

/// Where a route reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteSource {
    /// Inserts into an outbox table of the publication.
    Table(TableName),
    /// Transactional logical messages with this prefix.
    Message(String),
}

impl std::fmt::Display for RouteSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteSource::Table(t) => write!(f, "table {t}"),
            RouteSource::Message(p) => write!(f, "messages with prefix {p:?}"),
        }
    }
}

/// A preset's defaults, which a route's own keys override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// The whole row as JSON, keyed by `key`, on the `--topic` topic.
    #[default]
    Row,
    /// Debezium's Outbox Event Router: topic `outbox.event.${aggregatetype}`, key
    /// `aggregateid`, value the `payload` column, header `id`.
    EventRouter,
}

/// What a record's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValueKind {
    /// The row as a JSON object (every column, or `columns`).
    Row,
    /// One column's content (`payload`).
    Payload,
}

/// How a payload column's content becomes the record value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadFormat {
    /// By the column's type: json/jsonb as JSON, bytea as its bytes, anything else as
    /// its text.
    #[default]
    Auto,
    /// The content must be valid JSON (for a text column holding JSON); otherwise the
    /// row is a dead letter.
    Json,
    /// The text as is.
    Text,
    /// bytea's bytes (a text column's UTF-8 bytes).
    Bytes,
}

/// One route as declared: a TOML table. Keys not given take the preset's defaults.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The outbox table, schema-qualified (`public.outbox`).
    pub table: Option<String>,
    /// Or: the prefix of the transactional logical messages that are the outbox.
    pub message_prefix: Option<String>,
    /// `row` (default) or `event-router`.
    #[serde(default)]
    pub preset: Preset,
    /// The event id column (default: the table's one-column primary key, else its
    /// `id` column; `id` for messages and the event-router preset).
    pub id: Option<String>,
    /// The record key column (default: the event id; `aggregateid` for event-router).
    pub key: Option<String>,
    /// The topic: a literal, or a template with `${column}` placeholders.
    pub topic: Option<String>,
    /// `row` or `payload` (default: `row`; `payload` for event-router).
    pub value: Option<ValueKind>,
    /// The payload column (default `payload`).
    pub payload: Option<String>,
    /// How the payload is read (default `auto`).
    pub payload_format: Option<PayloadFormat>,
    /// Record headers: header name → column (event-router: `id` → the id column).
    pub headers: Option<BTreeMap<String, String>>,
    /// The columns a `row` value carries (default: all of them, in table order).
    pub columns: Option<Vec<String>>,
    /// For `verify` and `reconcile`: a query on pg_start whose columns stand in for
    /// the table's (named as the table's columns), when the outbox is cleaned up or
    /// the route reads logical messages. Default: the outbox table itself.
    pub source_query: Option<String>,
}

/// A route ready to bind to a source's columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub source: RouteSource,
    /// `None`: the table's primary key, found when the route is bound.
    pub id: Option<String>,
    /// `None`: the event id.
    pub key: Option<String>,
    pub topic: Template,
    pub value: ValueKind,
    pub payload: String,
    pub payload_format: PayloadFormat,
    pub headers: Vec<(String, String)>,
    pub columns: Option<Vec<String>>,
    /// See [`RouteSpec::source_query`].
    pub source_query: Option<String>,
    /// `--trace-column`: the column sent as header `traceparent` where the source has
    /// it (a route that declares a `traceparent` header itself keeps its own).
    pub trace_column: Option<String>,
    /// Keys are placed on partitions as Kafka's Java client places them (murmur2), as
    /// Debezium does: the `event-router` preset's default, so that a key stays on the
    /// partition it had under Debezium (consumers that keep per-partition state, Kafka
    /// Streams joins). Otherwise librdkafka's default (CRC32).
    pub java_partitioning: bool,
}

/// A route that cannot be used, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("route for {route}: {message}")]
pub struct RouteError {
    pub route: String,
    pub message: String,
}

impl RouteSpec {
    /// Parses one `--route` value: an inline TOML table (`{table = "public.outbox",
    /// preset = "event-router"}`), or its body alone (`table = "public.outbox"`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let body = if trimmed.starts_with('{') {
            format!("route = {trimmed}")
        } else {
            format!("[route]\n{trimmed}")
        };
        #[derive(Deserialize)]
        struct Wrapper {
            route: RouteSpec,
        }
        toml::from_str::<Wrapper>(&body)
            .map(|w| w.route)
            .map_err(|e| format!("invalid route: {}", e.message()))
    }

    /// Debezium's Outbox Event Router defaults on `table` (`table.field.event.id=id`,
    /// `table.field.event.key=aggregateid`, `table.field.event.payload=payload`,
    /// `route.by.field=aggregatetype`, `route.topic.replacement=outbox.event.${routedByValue}`,
    /// and the event id as header `id`).
    pub fn event_router(table: &str) -> Self {
        Self {
            table: Some(table.to_string()),
            preset: Preset::EventRouter,
            ..Self::default()
        }
    }

    /// The route this declares; `default_topic` is the connector's `--topic`.
    pub fn resolve(&self, default_topic: &str) -> Result<Route, RouteError> {
        let named = self
            .table
            .as_deref()
            .map(|t| format!("table {t}"))
            .or_else(|| {
                self.message_prefix
                    .as_deref()
                    .map(|p| format!("messages with prefix {p:?}"))
            })
            .unwrap_or_else(|| "(no source)".into());
        let error = |message: String| RouteError {
            route: named.clone(),
            message,
        };
        let source = match (&self.table, &self.message_prefix) {
            (Some(table), None) => RouteSource::Table(TableName::parse(table).map_err(error)?),
            (None, Some(prefix)) if !prefix.is_empty() => RouteSource::Message(prefix.clone()),
            (None, Some(_)) => return Err(error("message_prefix must not be empty".into())),
            (Some(_), Some(_)) => {
                return Err(error(
                    "give either `table` or `message_prefix`, not both".into(),
                ))
            }
            (None, None) => {
                return Err(error(
                    "a route needs `table = \"schema.table\"` or `message_prefix = \"…\"`".into(),
                ))
            }
        };
        let router = self.preset == Preset::EventRouter;
        let is_message = matches!(source, RouteSource::Message(_));
        let id = self
            .id
            .clone()
            .or_else(|| (router || is_message).then(|| "id".to_string()));
        let key = self
            .key
            .clone()
            .or_else(|| router.then(|| "aggregateid".to_string()));
        let topic_text = self.topic.clone().unwrap_or_else(|| {
            if router {
                "outbox.event.${aggregatetype}".into()
            } else {
                default_topic.to_string()
            }
        });
        let topic = Template::parse(&topic_text).map_err(error)?;
        let value = self.value.unwrap_or(if router {
            ValueKind::Payload
        } else {
            ValueKind::Row
        });
        let headers = match &self.headers {
            Some(h) => h.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            None if router => vec![("id".to_string(), id.clone().unwrap_or_default())],
            None => Vec::new(),
        };
        for (name, _) in &headers {
            if name.is_empty() {
                return Err(error("a header name must not be empty".into()));
            }
        }
        if self.columns.is_some() && value == ValueKind::Payload {
            return Err(error(
                "`columns` applies to `value = \"row\"` only; with a payload, carry extra columns as `headers`".into(),
            ));
        }
        if !is_message {
            for column in [&id, &key].into_iter().flatten() {
                validate_identifier(column).map_err(error)?;
            }
        }
        Ok(Route {
            source,
            id,
            key,
            topic,
            value,
            payload: self.payload.clone().unwrap_or_else(|| "payload".into()),
            payload_format: self.payload_format.unwrap_or_default(),
            headers,
            columns: self.columns.clone(),
            source_query: self.source_query.clone(),
            trace_column: None,
            java_partitioning: router,
        })
    }
}

/// The route settings of the commands that read routes (`connector`, `check`).
#[derive(clap::Args, Debug, Clone)]
pub struct RouteArgs {
    /// The column whose value is the Kafka record key (one key's records stay in order).
    #[arg(long, env = "OUTBOX_RELAY_KEY_COLUMN", default_value = "account_id")]
    pub key_column: String,
    /// The outbox column that identifies a row, unique in the outbox: the event id
    /// (dead letters, `--cleanup`).
    #[arg(long, env = "OUTBOX_RELAY_ID_COLUMN", default_value = "id")]
    pub id_column: String,
    /// The route of the one-table case (--table): `row` (the row as JSON on --topic,
    /// keyed by --key-column) or `event-router` (Debezium's Outbox Event Router
    /// defaults: topic outbox.event.<aggregatetype>, key aggregateid, value payload,
    /// header id, keys on partitions by murmur2 as Java clients place them; --topic,
    /// --key-column and --id-column are not used).
    #[arg(long, value_enum, env = "OUTBOX_RELAY_PRESET", default_value = "row")]
    pub preset: Preset,
    /// A route, as an inline TOML table: `{table = "public.outbox", preset =
    /// "event-router"}` (see docs/connector.md, "Routes"). Repeatable; `[[route]]`
    /// tables in the configuration file. With any, --table, --preset, --key-column and
    /// --id-column are not used.
    #[arg(long = "route", env = "OUTBOX_RELAY_ROUTES", value_delimiter = '\n', value_parser = RouteSpec::parse)]
    pub routes: Vec<RouteSpec>,
    /// The outbox column (or logical-message field) holding the writer's W3C trace
    /// context; its value travels as the Kafka header `traceparent`, which the sink
    /// continues (docs/operations.md, "Tracing"). Applies to every route; a source
    /// without that column sends its records without the header.
    #[arg(long, env = "OUTBOX_RELAY_TRACE_COLUMN")]
    pub trace_column: Option<String>,
}

impl RouteArgs {
    /// The routes: the `--route`s, or the one the one-table flags make of `table`;
    /// a `row` route's default topic is `topic`.
    pub fn resolve(&self, table: &str, topic: &str) -> Result<Vec<Route>, RouteError> {
        let specs = if self.routes.is_empty() {
            vec![match self.preset {
                Preset::Row => RouteSpec {
                    table: Some(table.to_string()),
                    id: Some(self.id_column.clone()),
                    key: Some(self.key_column.clone()),
                    ..RouteSpec::default()
                },
                Preset::EventRouter => RouteSpec::event_router(table),
            }]
        } else {
            self.routes.clone()
        };
        let mut routes = resolve_all(&specs, topic)?;
        if let Some(column) = &self.trace_column {
            for route in &mut routes {
                let declared = route
                    .headers
                    .iter()
                    .any(|(name, _)| name.eq_ignore_ascii_case(crate::telemetry::TRACEPARENT));
                if !declared {
                    route.trace_column = Some(column.clone());
                }
            }
        }
        Ok(routes)
    }
}

/// Every route, resolved; two routes on one source are refused.
pub fn resolve_all(specs: &[RouteSpec], default_topic: &str) -> Result<Vec<Route>, RouteError> {
    let mut routes: Vec<Route> = Vec::with_capacity(specs.len());
    for spec in specs {
        let route = spec.resolve(default_topic)?;
        if routes.iter().any(|r| r.source == route.source) {
            return Err(RouteError {
                route: route.source.to_string(),
                message: "declared twice; one route per table or prefix".into(),
            });
        }
        routes.push(route);
    }
    Ok(routes)
}

impl Route {
    /// Binds the route to its source's columns (a table's Relation, or a message's
    /// fields). Columns the route names that are missing do not fail here: each row
    /// becomes a dead letter that says so (`check` reports them before a start).
    pub fn bind(&self, columns: &[ColumnDef]) -> Bound {
        Bound::new(self, columns)
    }

    /// The column names this route reads, for `check`: (what, column).
    pub fn named_columns(&self) -> Vec<(&'static str, String)> {
        let mut named = Vec::new();
        if let Some(id) = &self.id {
            named.push(("id", id.clone()));
        }
        if let Some(key) = &self.key {
            named.push(("key", key.clone()));
        }
        for column in self.topic.columns() {
            named.push(("topic", column.to_string()));
        }
        if self.value == ValueKind::Payload {
            named.push(("payload", self.payload.clone()));
        }
        for (_, column) in &self.headers {
            named.push(("header", column.clone()));
        }
        for column in self.columns.iter().flatten() {
            named.push(("columns", column.clone()));
        }
        named
    }
}

/// A topic: literal text and `${column}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Column(String),
}

impl Template {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("topic {text:?}: `${{` without its closing `}}`"))?;
            let column = &after[..end];
            if column.is_empty() {
                return Err(format!("topic {text:?}: an empty `${{}}`"));
            }
            parts.push(Part::Column(column.to_string()));
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        if parts.is_empty() {
            return Err("the topic must not be empty".into());
        }
        let template = Self { parts };
        if let Some(literal) = template.literal() {
            check_topic_name(literal)?;
        }
        Ok(template)
    }

    /// The topic when it has no placeholder.
    pub fn literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Text(text)] => Some(text),
            _ => None,
        }
    }

    /// The columns the template reads.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c.as_str()),
            Part::Text(_) => None,
        })
    }
}

impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for part in &self.parts {
            match part {
                Part::Text(t) => f.write_str(t)?,
                Part::Column(c) => write!(f, "${{{c}}}")?,
            }
        }
        Ok(())
    }
}

/// Kafka's rule for a topic name: 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    let legal = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if legal {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a legal Kafka topic name (1 to 249 of letters, digits, '.', '_', '-')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_router_preset_is_debeziums_defaults() {
        let route = RouteSpec::parse(r#"{table = "public.outbox", preset = "event-router"}"#)
            .unwrap()
            .resolve("ignored")
            .unwrap();
        assert_eq!(
            route.source,
            RouteSource::Table(TableName::parse("public.outbox").unwrap())
        );
        assert_eq!(route.id.as_deref(), Some("id"));
        assert_eq!(route.key.as_deref(), Some("aggregateid"));
        assert_eq!(route.topic.to_string(), "outbox.event.${aggregatetype}");
        assert_eq!(route.value, ValueKind::Payload);
        assert_eq!(route.payload, "payload");
        assert_eq!(route.headers, vec![("id".to_string(), "id".to_string())]);
        assert!(route.java_partitioning, "keys on Debezium's partitions");
        // The flag form (`--preset event-router --table …`) makes the same route, so
        // tests/debezium_outbox.rs, which runs the flag form, covers `--route` too.
        assert_eq!(
            RouteSpec::event_router("public.outbox")
                .resolve("ignored")
                .unwrap(),
            route
        );
    }

    #[test]
    fn a_row_route_defaults_to_the_topic_flag_and_the_primary_key() {
        let route = RouteSpec::parse(r#"table = "outbox.transactions""#)
            .unwrap()
            .resolve("outbox-transactions")
            .unwrap();
        assert_eq!(route.topic.literal(), Some("outbox-transactions"));
        assert_eq!(route.id, None);
        assert_eq!(route.key, None);
        assert_eq!(route.value, ValueKind::Row);
        assert!(
            !route.java_partitioning,
            "the seed's placement is unchanged"
        );
    }

    #[test]
    fn bad_routes_are_refused_with_what_to_fix() {
        let refused = |text: &str| {
            RouteSpec::parse(text)
                .and_then(|s| s.resolve("t").map_err(|e| e.to_string()))
                .unwrap_err()
        };
        assert!(refused(r#"{tabel = "a.b"}"#).contains("unknown field `tabel`"));
        assert!(refused(r#"{preset = "row"}"#).contains("needs `table"));
        assert!(refused(r#"{table = "a.b", message_prefix = "p"}"#).contains("not both"));
        assert!(refused(r#"{table = "a.b", topic = "x.${"}"#).contains("closing"));
        assert!(refused(r#"{table = "a.b", topic = "a b"}"#).contains("legal Kafka topic"));
        assert!(
            refused(r#"{table = "a.b", value = "payload", columns = ["x"]}"#)
                .contains("`columns` applies")
        );
        assert!(refused(r#"{table = "a.b", preset = "debezium"}"#).contains("unknown variant"));
        let twice = [
            RouteSpec::parse(r#"table = "a.b""#).unwrap(),
            RouteSpec::parse(r#"{table = "a.b", key = "k"}"#).unwrap(),
        ];
        assert!(resolve_all(&twice, "t")
            .unwrap_err()
            .to_string()
            .contains("declared twice"));
    }

    #[test]
    fn templates_split_into_text_and_columns() {
        let t = Template::parse("outbox.event.${aggregatetype}-${region}").unwrap();
        assert_eq!(t.columns().collect::<Vec<_>>(), ["aggregatetype", "region"]);
        assert_eq!(t.literal(), None);
        assert_eq!(t.to_string(), "outbox.event.${aggregatetype}-${region}");
        assert_eq!(Template::parse("plain").unwrap().literal(), Some("plain"));
        assert!(Template::parse("${}").is_err());
        assert!(check_topic_name(&"x".repeat(250)).is_err());
        assert!(check_topic_name("..").is_err());
        assert!(check_topic_name("outbox.event.Order-1_a").is_ok());
    }
}
