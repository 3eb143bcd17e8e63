//! A route bound to its source's columns, and the rendering of one row into a record
//! or a dead letter.

use std::borrow::Cow;

use base64::Engine as _;

use super::{Part, PayloadFormat, Route, ValueKind};
use crate::record::encode::{self, ColumnSpec};
use crate::source::ColumnDef;

const BYTEA_OID: u32 = 17;
const TEXT_OID: u32 = 25;
const NUMERIC_OID: u32 = 1700;
const BOOL_OID: u32 = 16;
const JSONB_OID: u32 = 3802;

/// A route with its columns resolved to positions in the source's rows.
#[derive(Debug, Clone)]
pub struct Bound {
    source: String,
    id: Option<usize>,
    key: Option<usize>,
    topic: Vec<BoundPart>,
    value: BoundValue,
    headers: Vec<(String, usize)>,
    /// The trace column's position, where the source has it.
    trace: Option<usize>,
    /// Every column, for a dead letter's copy of the row.
    all: Vec<ColumnSpec>,
    /// Why every row of this source is a dead letter (a column the route names is
    /// missing), if it is.
    unusable: Option<String>,
}

#[derive(Debug, Clone)]
enum BoundPart {
    Text(String),
    Column(usize, String),
}

#[derive(Debug, Clone)]
enum BoundValue {
    /// The row as JSON: these columns' renderings, and their positions in the row
    /// (`None`: every column, in order).
    Row {
        specs: Vec<ColumnSpec>,
        positions: Option<Vec<usize>>,
    },
    Payload {
        column: usize,
        type_oid: u32,
        format: PayloadFormat,
    },
}

/// What one row becomes.
#[derive(Debug)]
pub enum Rendered<'a> {
    Record {
        topic: Cow<'a, str>,
        key: Option<&'a [u8]>,
        /// `None`: a NULL payload (a record with no value).
        value: Option<Vec<u8>>,
        /// The route's headers, NULL columns as headers without a value.
        headers: Vec<(&'a str, Option<&'a [u8]>)>,
        /// The event id's text.
        id: Option<&'a [u8]>,
    },
    /// The row cannot be routed: it goes to the dead-letter topic with this reason.
    Dead { reason: String },
}

impl Bound {
    pub(super) fn new(route: &Route, columns: &[ColumnDef]) -> Self {
        let missing: std::cell::RefCell<Vec<String>> = Default::default();
        let find = |what: &str, name: &str| -> Option<usize> {
            let found = columns.iter().position(|c| c.name == name);
            if found.is_none() {
                missing
                    .borrow_mut()
                    .push(format!("the {what} column {name:?}"));
            }
            found
        };
        let id = match &route.id {
            Some(name) => find("event id", name),
            None => {
                let keys: Vec<usize> = (0..columns.len()).filter(|&i| columns[i].key).collect();
                match keys.as_slice() {
                    [one] => Some(*one),
                    _ => match columns.iter().position(|c| c.name == "id") {
                        Some(id) => Some(id),
                        None => {
                            missing.borrow_mut().push(
                                "a one-column primary key or an `id` column to use as the event \
                                 id (set `id`)"
                                    .into(),
                            );
                            None
                        }
                    },
                }
            }
        };
        let key = match &route.key {
            Some(name) => find("key", name),
            None => id,
        };
        let topic = route
            .topic
            .parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => BoundPart::Text(t.clone()),
                Part::Column(c) => BoundPart::Column(find("topic", c).unwrap_or(0), c.clone()),
            })
            .collect();
        let value = match route.value {
            ValueKind::Row => {
                let positions: Option<Vec<usize>> = route
                    .columns
                    .as_ref()
                    .map(|names| names.iter().filter_map(|n| find("value", n)).collect());
                let specs = match &positions {
                    Some(p) => p.iter().map(|&i| &columns[i]).collect::<Vec<_>>(),
                    None => columns.iter().collect(),
                }
                .into_iter()
                .map(|c| ColumnSpec::new(&c.name, c.type_oid))
                .collect();
                BoundValue::Row { specs, positions }
            }
            ValueKind::Payload => {
                let column = find("payload", &route.payload);
                BoundValue::Payload {
                    column: column.unwrap_or(0),
                    type_oid: column.map_or(TEXT_OID, |i| columns[i].type_oid),
                    format: route.payload_format,
                }
            }
        };
        let headers = route
            .headers
            .iter()
            .filter_map(|(name, column)| find("header", column).map(|i| (name.clone(), i)))
            .collect();
        // Lenient, unlike the columns above: a source without it is traced no further.
        let trace = route
            .trace_column
            .as_ref()
            .and_then(|name| columns.iter().position(|c| &c.name == name));
        let missing = missing.into_inner();
        let unusable = (!missing.is_empty()).then(|| {
            format!(
                "the route for {} names what the source does not have: {}",
                route.source,
                missing.join(", ")
            )
        });
        Self {
            source: route.source.to_string(),
            id,
            key,
            topic,
            value,
            headers,
            trace,
            all: columns
                .iter()
                .map(|c| ColumnSpec::new(&c.name, c.type_oid))
                .collect(),
            unusable,
        }
    }

    /// Why every row of this source is a dead letter, if it is (for logs and `check`).
    pub fn unusable(&self) -> Option<&str> {
        self.unusable.as_deref()
    }

    /// The source, as dead letters name it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The record (or dead letter) of one row: `values` holds each column's text in
    /// the source's order, `None` for NULL. `whole`, for a message, is its content:
    /// the value of a `row` route without `columns`, as is.
    pub fn render<'a>(
        &'a self,
        values: &[Option<&'a [u8]>],
        whole: Option<&'a [u8]>,
    ) -> Rendered<'a> {
        if let Some(reason) = &self.unusable {
            return Rendered::Dead {
                reason: reason.clone(),
            };
        }
        let get = |i: usize| values.get(i).copied().flatten();
        let id = self.id.and_then(get);
        if id.is_none() {
            return dead("the event id is NULL");
        }
        let key = self.key.and_then(get);
        if key.is_none() {
            return dead("the key column is NULL");
        }
        let topic = match self.topic.as_slice() {
            [BoundPart::Text(t)] => Cow::Borrowed(t.as_str()),
            parts => {
                let mut topic = String::new();
                for part in parts {
                    match part {
                        BoundPart::Text(t) => topic.push_str(t),
                        BoundPart::Column(i, name) => match get(*i) {
                            Some(v) => topic.push_str(&String::from_utf8_lossy(v)),
                            None => {
                                return Rendered::Dead {
                                    reason: format!("the topic column {name:?} is NULL"),
                                }
                            }
                        },
                    }
                }
                if let Err(reason) = super::check_topic_name(&topic) {
                    return Rendered::Dead {
                        reason: format!("the routed topic {reason}"),
                    };
                }
                Cow::Owned(topic)
            }
        };
        let value = match &self.value {
            BoundValue::Row { specs, positions } => {
                let mut out = Vec::with_capacity(128);
                match (positions, whole) {
                    (None, Some(content)) => out.extend_from_slice(content),
                    (None, None) => encode::encode_row(&mut out, specs, values.iter().copied()),
                    (Some(positions), _) => {
                        encode::encode_row(&mut out, specs, positions.iter().map(|&i| get(i)))
                    }
                }
                Some(out)
            }
            BoundValue::Payload {
                column,
                type_oid,
                format,
            } => match get(*column) {
                None => None,
                Some(text) => match payload(text, *type_oid, *format) {
                    Ok(value) => Some(value),
                    Err(reason) => return Rendered::Dead { reason },
                },
            },
        };
        let mut headers: Vec<(&str, Option<&[u8]>)> = self
            .headers
            .iter()
            .map(|(name, i)| (name.as_str(), get(*i)))
            .collect();
        if let Some(context) = self.trace.and_then(get) {
            headers.push((crate::telemetry::TRACEPARENT, Some(context)));
        }
        Rendered::Record {
            topic,
            key,
            value,
            headers,
            id,
        }
    }

    /// The event id's text in `values`, if the route found its column.
    pub fn id_of<'a>(&self, values: &[Option<&'a [u8]>]) -> Option<&'a [u8]> {
        self.id.and_then(|i| values.get(i).copied().flatten())
    }

    /// The whole row as JSON, for a dead letter.
    pub fn row_json(&self, values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        encode::encode_row(&mut out, &self.all, values.iter().copied());
        out
    }
}

fn dead(reason: &str) -> Rendered<'static> {
    Rendered::Dead {
        reason: reason.to_string(),
    }
}

/// A payload column's content as the record value.
fn payload(text: &[u8], type_oid: u32, format: PayloadFormat) -> Result<Vec<u8>, String> {
    let bytea = || {
        encode::decode_bytea_hex(text)
            .ok_or_else(|| "the bytea payload is not in PostgreSQL's hex form".to_string())
    };
    match format {
        PayloadFormat::Auto if type_oid == BYTEA_OID => bytea(),
        PayloadFormat::Auto | PayloadFormat::Text => Ok(text.to_vec()),
        PayloadFormat::Bytes if type_oid == BYTEA_OID => bytea(),
        PayloadFormat::Bytes => Ok(text.to_vec()),
        PayloadFormat::Json => {
            let json = if type_oid == BYTEA_OID {
                bytea()?
            } else {
                text.to_vec()
            };
            // serde_json does not check the UTF-8 of strings it skips, so check it first.
            if let Err(e) = std::str::from_utf8(&json) {
                return Err(format!(
                    "the payload is declared JSON but is not UTF-8: {e}"
                ));
            }
            match serde_json::from_slice::<serde::de::IgnoredAny>(&json) {
                Ok(_) => Ok(json),
                Err(e) => Err(format!("the payload is declared JSON but is not: {e}")),
            }
        }
    }
}

/// A message as a row: its fields as columns, and their values' text.
pub type MessageRow = (Vec<ColumnDef>, Vec<Option<Vec<u8>>>);

/// A logical message's top-level JSON fields as columns and values: a string is text
/// (its content), a number numeric (its exact text), a boolean bool, null NULL, an
/// object or array jsonb (its JSON text). Not a JSON object: the reason.
pub fn message_row(content: &[u8]) -> Result<MessageRow, String> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(content)
        .map_err(|e| format!("the message content is not a JSON object: {e}"))?;
    let mut columns = Vec::with_capacity(object.len());
    let mut values = Vec::with_capacity(object.len());
    for (name, value) in object {
        let (type_oid, text) = match value {
            serde_json::Value::Null => (TEXT_OID, None),
            serde_json::Value::String(s) => (TEXT_OID, Some(s.into_bytes())),
            serde_json::Value::Number(n) => (NUMERIC_OID, Some(n.to_string().into_bytes())),
            serde_json::Value::Bool(b) => (BOOL_OID, Some(if b { b"t" } else { b"f" }.to_vec())),
            other => (JSONB_OID, Some(other.to_string().into_bytes())),
        };
        columns.push(ColumnDef {
            name,
            type_oid,
            key: false,
        });
        values.push(text);
    }
    Ok((columns, values))
}

/// A dead letter's value: why, from where, and the full content refused (`event`:
/// the row as JSON or the message's JSON; a message that is not JSON as a string,
/// or as base64 in `event_base64` when it is not UTF-8).
pub fn dead_letter_value(
    reason: &str,
    source: &str,
    lsn: &str,
    xid: Option<u32>,
    event: &[u8],
) -> Vec<u8> {
    let event_value = serde_json::from_slice::<serde_json::Value>(event).ok();
    let mut letter = serde_json::Map::new();
    letter.insert("reason".into(), reason.into());
    letter.insert("source".into(), source.into());
    letter.insert("lsn".into(), lsn.into());
    letter.insert(
        "xid".into(),
        xid.map_or(serde_json::Value::Null, Into::into),
    );
    match (event_value, std::str::from_utf8(event)) {
        (Some(json), _) => {
            letter.insert("event".into(), json);
        }
        (None, Ok(text)) => {
            letter.insert("event".into(), text.into());
        }
        (None, Err(_)) => {
            letter.insert(
                "event_base64".into(),
                base64::engine::general_purpose::STANDARD
                    .encode(event)
                    .into(),
            );
        }
    }
    serde_json::to_vec(&letter).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::super::RouteSpec;
    use super::*;

    fn column(name: &str, type_oid: u32, key: bool) -> ColumnDef {
        ColumnDef {
            name: name.into(),
            type_oid,
            key,
        }
    }

    /// Debezium's outbox shape: uuid id, varchar aggregatetype/aggregateid/type, jsonb
    /// payload.
    fn outbox_columns() -> Vec<ColumnDef> {
        vec![
            column("id", 2950, true),
            column("aggregatetype", 1043, false),
            column("aggregateid", 1043, false),
            column("type", 1043, false),
            column("payload", 3802, false),
        ]
    }

    fn router() -> Bound {
        RouteSpec::event_router("public.outbox")
            .resolve("unused")
            .unwrap()
            .bind(&outbox_columns())
    }

    #[test]
    fn the_event_router_renders_debeziums_record() {
        let bound = router();
        let values: [Option<&[u8]>; 5] = [
            Some(b"6f1c0c7e-1f4e-4c43-9d0e-0c1c2b7d9a10"),
            Some(b"Order"),
            Some(b"order-17"),
            Some(b"OrderCreated"),
            Some(br#"{"total": 12.30, "items": [1, 2]}"#),
        ];
        let Rendered::Record {
            topic,
            key,
            value,
            headers,
            id,
        } = bound.render(&values, None)
        else {
            panic!("dead letter")
        };
        assert_eq!(topic, "outbox.event.Order");
        assert_eq!(key, Some(&b"order-17"[..]));
        assert_eq!(
            value.as_deref(),
            Some(&br#"{"total": 12.30, "items": [1, 2]}"#[..])
        );
        assert_eq!(
            headers,
            vec![("id", Some(&b"6f1c0c7e-1f4e-4c43-9d0e-0c1c2b7d9a10"[..]))]
        );
        assert_eq!(id, values[0]);
    }

    #[test]
    fn bad_rows_become_dead_letters_with_the_reason() {
        let bound = router();
        let reason = |values: [Option<&[u8]>; 5]| match bound.render(&values, None) {
            Rendered::Dead { reason } => reason,
            Rendered::Record { .. } => panic!("routed"),
        };
        let ok: [Option<&[u8]>; 5] = [Some(b"1"), Some(b"Order"), Some(b"o1"), None, None];
        assert!(matches!(
            bound.render(&ok, None),
            Rendered::Record { value: None, .. }
        ));
        let mut row = ok;
        row[1] = None;
        assert!(reason(row).contains("topic column \"aggregatetype\" is NULL"));
        let mut row = ok;
        row[2] = None;
        assert!(reason(row).contains("key column is NULL"));
        let mut row = ok;
        row[0] = None;
        assert!(reason(row).contains("event id is NULL"));
        let mut row = ok;
        row[1] = Some(b"Order Lines");
        assert!(reason(row).contains("not a legal Kafka topic name"));

        // A template over a column the table does not have: every row, with the name.
        let route = RouteSpec::parse(
            r#"{table = "public.outbox", preset = "event-router", topic = "t.${region}"}"#,
        )
        .unwrap()
        .resolve("unused")
        .unwrap();
        let bound = route.bind(&outbox_columns());
        assert!(bound
            .unusable()
            .unwrap()
            .contains("the topic column \"region\""));
        assert!(matches!(bound.render(&ok, None), Rendered::Dead { .. }));
    }

    #[test]
    fn the_trace_column_travels_as_traceparent_where_the_source_has_it() {
        let args = |routes: Vec<RouteSpec>| super::super::RouteArgs {
            key_column: "account_id".into(),
            id_column: "id".into(),
            preset: super::super::Preset::Row,
            routes,
            trace_column: Some("trace".into()),
        };
        let context = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut columns = outbox_columns();
        columns.push(column("trace", TEXT_OID, false));
        let spec = RouteSpec::event_router("public.outbox");
        let routes = args(vec![spec.clone()])
            .resolve("unused", "unused")
            .unwrap();
        let traced = routes[0].bind(&columns);
        let mut values: Vec<Option<&[u8]>> = vec![
            Some(b"1"),
            Some(b"Order"),
            Some(b"o1"),
            None,
            None,
            Some(context),
        ];
        let Rendered::Record { headers, .. } = traced.render(&values, None) else {
            panic!("dead letter")
        };
        assert_eq!(
            headers,
            vec![("id", Some(&b"1"[..])), ("traceparent", Some(&context[..]))]
        );
        // NULL: no header. A source without the column: no header, not a dead letter.
        values[5] = None;
        let Rendered::Record { headers, .. } = traced.render(&values, None) else {
            panic!("dead letter")
        };
        assert_eq!(headers, vec![("id", Some(&b"1"[..]))]);
        let untraced = routes[0].bind(&outbox_columns());
        assert!(untraced.unusable().is_none());
        let Rendered::Record { headers, .. } = untraced.render(&values[..5], None) else {
            panic!("dead letter")
        };
        assert_eq!(headers, vec![("id", Some(&b"1"[..]))]);
        // A route that maps `traceparent` itself keeps its own mapping.
        let own = RouteSpec {
            headers: Some([("traceparent".to_string(), "type".to_string())].into()),
            ..spec
        };
        let routes = args(vec![own]).resolve("unused", "unused").unwrap();
        assert_eq!(routes[0].trace_column, None);
    }

    #[test]
    fn payload_formats() {
        assert_eq!(
            payload(b"\\x00ff", BYTEA_OID, PayloadFormat::Auto).unwrap(),
            [0, 255]
        );
        assert_eq!(
            payload(b"plain", TEXT_OID, PayloadFormat::Auto).unwrap(),
            b"plain"
        );
        assert!(payload(b"{\"a\":1}", TEXT_OID, PayloadFormat::Json).is_ok());
        assert!(payload(b"not json", TEXT_OID, PayloadFormat::Json)
            .unwrap_err()
            .contains("declared JSON"));
        // A bytea payload of a JSON string holding a byte that is not UTF-8.
        assert!(payload(b"\\x228022", BYTEA_OID, PayloadFormat::Json)
            .unwrap_err()
            .contains("not UTF-8"));
        assert!(payload(b"zz", BYTEA_OID, PayloadFormat::Auto).is_err());
    }

    #[test]
    fn a_row_route_keys_by_the_primary_key_unless_told_and_projects_columns() {
        let columns = vec![
            column("id", 20, true),
            column("account_id", 20, false),
            column("amount", 1700, false),
        ];
        let route = RouteSpec::parse(r#"{table = "a.b", topic = "t", columns = ["amount", "id"]}"#)
            .unwrap()
            .resolve("unused")
            .unwrap();
        let bound = route.bind(&columns);
        let values: [Option<&[u8]>; 3] = [Some(b"7"), Some(b"5"), Some(b"-1.50")];
        let Rendered::Record { key, value, .. } = bound.render(&values, None) else {
            panic!()
        };
        assert_eq!(key, Some(&b"7"[..]));
        assert_eq!(value.unwrap(), br#"{"amount":-1.50,"id":7}"#);

        // No primary key: a column named `id`, else every row is a dead letter that
        // says what to set.
        let no_key: Vec<ColumnDef> = columns
            .iter()
            .map(|c| column(&c.name, c.type_oid, false))
            .collect();
        assert!(route.bind(&no_key).unusable().is_none());
        let neither: Vec<ColumnDef> = no_key
            .iter()
            .map(|c| column(&c.name.replace("id", "ref"), c.type_oid, false))
            .collect();
        let route = RouteSpec::parse(r#"{table = "a.b", topic = "t"}"#)
            .unwrap()
            .resolve("unused")
            .unwrap();
        assert!(route
            .bind(&neither)
            .unusable()
            .unwrap()
            .contains("set `id`"));
    }

    #[test]
    fn messages_fields_stand_in_for_columns() {
        let content = br#"{"id": "e1", "aggregatetype": "Order", "aggregateid": 17, "payload": {"x": 1.0}, "flag": true, "gone": null}"#;
        let (columns, values) = message_row(content).unwrap();
        let route = RouteSpec::parse(r#"{message_prefix = "orders", preset = "event-router"}"#)
            .unwrap()
            .resolve("unused")
            .unwrap();
        let bound = route.bind(&columns);
        let refs: Vec<Option<&[u8]>> = values.iter().map(|v| v.as_deref()).collect();
        let Rendered::Record {
            topic, key, value, ..
        } = bound.render(&refs, Some(content))
        else {
            panic!()
        };
        assert_eq!(topic, "outbox.event.Order");
        assert_eq!(key, Some(&b"17"[..]));
        assert_eq!(value.unwrap(), br#"{"x":1.0}"#);
        assert!(message_row(b"[1]")
            .unwrap_err()
            .contains("not a JSON object"));
        assert!(message_row(b"nope").is_err());
    }

    #[test]
    fn a_dead_letter_keeps_the_whole_event() {
        let letter = dead_letter_value("why", "table a.b", "0/10", Some(7), br#"{"a":1.50}"#);
        let parsed: serde_json::Value = serde_json::from_slice(&letter).unwrap();
        assert_eq!(parsed["reason"], "why");
        assert_eq!(parsed["lsn"], "0/10");
        assert_eq!(parsed["xid"], 7);
        assert_eq!(parsed["event"]["a"].to_string(), "1.50");
        let letter = dead_letter_value("why", "m", "0/10", None, b"not json");
        assert!(String::from_utf8(letter)
            .unwrap()
            .contains(r#""event":"not json""#));
        let letter = dead_letter_value("why", "m", "0/10", None, &[0xff, 0xfe]);
        assert!(String::from_utf8(letter)
            .unwrap()
            .contains(r#""event_base64":"//4=""#));
    }
}
