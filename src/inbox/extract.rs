//! A Kafka record → an inbox event's values: pure, no I/O.
//!
//! Invariant: any record gives either the values of its event, a deliberate skip (a
//! Debezium update or delete, a tombstone), or a [`Rejected`] with a precise error and
//! a dead-letter kind; never a panic and never a silent drop. Numbers keep their JSON
//! text (`arbitrary_precision`): a value never goes through a float.
//!
//! # The body
//! Field sources name fields of the record's *body*, which depends on the format:
//! - `row` (the connector's row JSON), `seed` and `payload` (the event-router
//!   preset's payload): the value itself;
//! - `debezium`: the change event's `after` (`{"payload": {"op", "after"}}` or without
//!   the schema wrapper); creates (`c`) and snapshot reads (`r`) are events, other
//!   operations and tombstones are skipped;
//! - `cloudevents`: the structured event (`id`, `source`, `type`, `data`, …); in binary
//!   mode (no JSON envelope, `ce_*` headers) the attributes come from the headers and
//!   `data` is the value;
//! - `auto`: a Debezium envelope, else a structured CloudEvent, else a binary one,
//!   else the value itself.
//!
//! A field's text is its content for a string, its exact text for a number,
//! `true`/`false`, the JSON text of an object or array, and no value for `null` or a
//! missing field.

use serde_json::Value;

use super::{EventFormat, Source};
use crate::apply::DeadLetterKind;
use crate::lsn::Lsn;
use crate::record::decode::{Rejected, Skip, MAX_VALUE_BYTES};

/// The parts of a record the sources read.
pub struct RecordView<'a> {
    pub topic: &'a str,
    /// `None` in direct mode (no Kafka).
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    /// Kafka's timestamp (direct mode: the source commit time), milliseconds since the
    /// epoch.
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
    pub lsn: Option<Lsn>,
}

/// What a record means for an inbox.
#[derive(Debug, Clone, PartialEq)]
pub enum Extracted {
    /// The event's values, in the order of the sources.
    Event(Vec<Option<String>>),
    Skip(Skip),
}

fn reject(kind: DeadLetterKind, error: impl Into<String>) -> Rejected {
    Rejected {
        kind,
        error: error.into(),
    }
}

/// The values `sources` take in `record`, read as `format`.
pub fn extract(
    format: EventFormat,
    sources: &[Source],
    record: &RecordView<'_>,
) -> Result<Extracted, Rejected> {
    let body = match body(format, record)? {
        Body::Skip(skip) => return Ok(Extracted::Skip(skip)),
        Body::Json(body) => Some(body),
        Body::Opaque => None,
    };
    let mut values = Vec::with_capacity(sources.len());
    for source in sources {
        values.push(value_of(source, body.as_ref(), record)?);
    }
    Ok(Extracted::Event(values))
}

enum Body {
    Json(Value),
    /// A payload that is not JSON: only `$value`, `$key`, headers and positions.
    Opaque,
    Skip(Skip),
}

fn body(format: EventFormat, record: &RecordView<'_>) -> Result<Body, Rejected> {
    let Some(value) = record.value else {
        return match format {
            EventFormat::Auto | EventFormat::Debezium => Ok(Body::Skip(Skip::Tombstone)),
            _ => Err(reject(
                DeadLetterKind::EmptyValue,
                "the record has no value (a tombstone)",
            )),
        };
    };
    if value.len() > MAX_VALUE_BYTES {
        return Err(reject(
            DeadLetterKind::Oversized,
            format!(
                "the value has {} bytes, more than the {MAX_VALUE_BYTES} accepted",
                value.len()
            ),
        ));
    }
    let binary_cloudevent = header(record, "ce_specversion").is_some();
    let parsed = serde_json::from_slice::<Value>(value);
    let json = match (parsed, format) {
        (Ok(json), _) => json,
        // An event-router payload or a binary CloudEvent's data may be any bytes.
        (Err(_), EventFormat::Payload) => return Ok(Body::Opaque),
        (Err(_), EventFormat::Auto | EventFormat::CloudEvents) if binary_cloudevent => {
            return Ok(Body::Json(binary_event(record, None)))
        }
        (Err(e), _) => {
            return Err(reject(
                DeadLetterKind::InvalidJson,
                format!("the value is not JSON: {e}"),
            ))
        }
    };
    match format {
        EventFormat::Row | EventFormat::Seed | EventFormat::Payload => Ok(Body::Json(json)),
        EventFormat::Debezium => debezium(json),
        EventFormat::CloudEvents => {
            if json.get("specversion").is_some() {
                Ok(Body::Json(json))
            } else if binary_cloudevent {
                Ok(Body::Json(binary_event(record, Some(json))))
            } else {
                Err(reject(
                    DeadLetterKind::UnknownFormat,
                    "not a CloudEvent: no `specversion` field and no `ce_specversion` header",
                ))
            }
        }
        EventFormat::Auto => {
            if is_debezium(&json) {
                debezium(json)
            } else if json.get("specversion").is_some() {
                Ok(Body::Json(json))
            } else if binary_cloudevent {
                Ok(Body::Json(binary_event(record, Some(json))))
            } else {
                Ok(Body::Json(json))
            }
        }
    }
}

fn is_debezium(json: &Value) -> bool {
    let envelope = |v: &Value| {
        v.get("op").is_some_and(Value::is_string)
            && (v.get("after").is_some() || v.get("before").is_some())
    };
    envelope(json) || json.get("payload").is_some_and(envelope)
}

fn debezium(json: Value) -> Result<Body, Rejected> {
    let mut envelope = match json {
        Value::Object(mut top) if top.get("payload").is_some_and(Value::is_object) => {
            top.remove("payload").unwrap_or_default()
        }
        other => other,
    };
    let op = match envelope.get("op") {
        Some(Value::String(op)) => op.clone(),
        Some(_) => {
            return Err(reject(
                DeadLetterKind::WrongType,
                "the Debezium `op` field is not a string",
            ))
        }
        None => {
            return Err(reject(
                DeadLetterKind::UnknownFormat,
                "not a Debezium change event: no `op` field",
            ))
        }
    };
    if op != "c" && op != "r" {
        return Ok(Body::Skip(Skip::DebeziumOp(op)));
    }
    match envelope.get_mut("after").map(Value::take) {
        Some(after @ Value::Object(_)) => Ok(Body::Json(after)),
        _ => Err(reject(
            DeadLetterKind::MissingField,
            format!("the Debezium `{op}` event has no `after` row"),
        )),
    }
}

/// A binary-mode CloudEvent: `ce_*` headers as attributes, the value as `data`.
fn binary_event(record: &RecordView<'_>, data: Option<Value>) -> Value {
    let mut event = serde_json::Map::new();
    for (name, value) in record.headers {
        if let (Some(attribute), Some(value)) = (name.strip_prefix("ce_"), value) {
            event.insert(
                attribute.to_string(),
                Value::String(String::from_utf8_lossy(value).into_owned()),
            );
        }
    }
    let data = data.unwrap_or_else(|| {
        Value::String(String::from_utf8_lossy(record.value.unwrap_or_default()).into_owned())
    });
    event.insert("data".into(), data);
    Value::Object(event)
}

fn header<'a>(record: &RecordView<'a>, name: &str) -> Option<Option<&'a [u8]>> {
    record
        .headers
        .iter()
        .rev()
        .find(|(key, _)| *key == name)
        .map(|(_, value)| *value)
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, Rejected> {
    String::from_utf8(bytes.to_vec())
        .map_err(|_| reject(DeadLetterKind::InvalidValue, format!("{what} is not UTF-8")))
}

fn value_of(
    source: &Source,
    body: Option<&Value>,
    record: &RecordView<'_>,
) -> Result<Option<String>, Rejected> {
    Ok(match source {
        Source::Field(path) => {
            let mut at = body;
            for step in path {
                at = at.and_then(|v| match v {
                    Value::Object(map) => map.get(step),
                    Value::Array(items) => step.parse::<usize>().ok().and_then(|i| items.get(i)),
                    _ => None,
                });
            }
            at.and_then(text)
        }
        Source::Key => record.key.map(|k| utf8(k, "the key")).transpose()?,
        Source::Value => record.value.map(|v| utf8(v, "the value")).transpose()?,
        Source::Body => body.map(Value::to_string),
        Source::Header(name) => header(record, name)
            .flatten()
            .map(|v| utf8(v, &format!("header {name:?}")))
            .transpose()?,
        Source::Topic => Some(record.topic.to_string()),
        Source::Partition => record.partition.map(|p| p.to_string()),
        Source::Offset => record.offset.map(|o| o.to_string()),
        Source::Timestamp => record
            .timestamp_ms
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        Source::Lsn => record.lsn.map(|l| l.to_string()),
    })
}

/// A JSON value as column text; `None` for null.
fn text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(
        value: Option<&'a [u8]>,
        headers: &'a [(&'a str, Option<&'a [u8]>)],
    ) -> RecordView<'a> {
        RecordView {
            topic: "t",
            partition: Some(2),
            offset: Some(7),
            timestamp_ms: Some(1_700_000_000_123),
            key: Some(b"k1"),
            value,
            headers,
            lsn: Some(Lsn(0x16B3748)),
        }
    }

    fn field(path: &str) -> Source {
        Source::Field(path.split('.').map(String::from).collect())
    }

    fn values(
        format: EventFormat,
        sources: &[Source],
        record: &RecordView<'_>,
    ) -> Vec<Option<String>> {
        match extract(format, sources, record) {
            Ok(Extracted::Event(values)) => values,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fields_keep_their_exact_text() {
        let value = br#"{"id": "e1", "n": 12.30, "big": 123456789012345678901234567890, "ok": true, "o": {"a": [1, 2]}, "z": null}"#;
        let record = view(Some(value), &[]);
        let got = values(
            EventFormat::Row,
            &[
                field("id"),
                field("n"),
                field("big"),
                field("ok"),
                field("o"),
                field("o.a.1"),
                field("z"),
                field("nope"),
            ],
            &record,
        );
        let want: Vec<Option<&str>> = vec![
            Some("e1"),
            Some("12.30"),
            Some("123456789012345678901234567890"),
            Some("true"),
            Some(r#"{"a":[1,2]}"#),
            Some("2"),
            None,
            None,
        ];
        assert_eq!(
            got,
            want.into_iter()
                .map(|v| v.map(String::from))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn positions_keys_and_headers() {
        let headers = [("id", Some(&b"h-1"[..])), ("none", None)];
        let record = view(Some(b"{}"), &headers);
        let got = values(
            EventFormat::Payload,
            &[
                Source::Key,
                Source::Header("id".into()),
                Source::Header("none".into()),
                Source::Topic,
                Source::Partition,
                Source::Offset,
                Source::Timestamp,
                Source::Lsn,
                Source::Value,
            ],
            &record,
        );
        assert_eq!(
            got,
            [
                Some("k1"),
                Some("h-1"),
                None,
                Some("t"),
                Some("2"),
                Some("7"),
                Some("2023-11-14T22:13:20.123Z"),
                Some("0/16B3748"),
                Some("{}"),
            ]
            .map(|v| v.map(String::from))
        );
    }

    #[test]
    fn a_payload_need_not_be_json() {
        let record = view(Some(b"plain text"), &[]);
        assert_eq!(
            values(EventFormat::Payload, &[Source::Value, field("x")], &record),
            vec![Some("plain text".to_string()), None]
        );
        let err = extract(EventFormat::Row, &[field("x")], &record).unwrap_err();
        assert_eq!(err.kind, DeadLetterKind::InvalidJson);
    }

    #[test]
    fn debezium_creates_are_events_and_the_rest_is_skipped() {
        let create = br#"{"schema": {}, "payload": {"op": "c", "after": {"id": 5, "v": "x"}}}"#;
        let update = br#"{"op": "u", "before": {}, "after": {"id": 5}}"#;
        for format in [EventFormat::Debezium, EventFormat::Auto] {
            let record = view(Some(create), &[]);
            assert_eq!(
                values(format, &[field("id"), field("v")], &record),
                vec![Some("5".into()), Some("x".into())]
            );
            let record = view(Some(update), &[]);
            assert_eq!(
                extract(format, &[field("id")], &record).unwrap(),
                Extracted::Skip(Skip::DebeziumOp("u".into()))
            );
            let record = view(None, &[]);
            assert_eq!(
                extract(format, &[field("id")], &record).unwrap(),
                Extracted::Skip(Skip::Tombstone)
            );
        }
        let record = view(Some(br#"{"op": "c", "before": null}"#), &[]);
        let err = extract(EventFormat::Debezium, &[field("id")], &record).unwrap_err();
        assert_eq!(err.kind, DeadLetterKind::MissingField);
    }

    #[test]
    fn cloudevents_structured_and_binary() {
        let structured = br#"{"specversion": "1.0", "id": "ce-1", "type": "order.created", "source": "/s", "data": {"total": 9.99}}"#;
        for format in [EventFormat::CloudEvents, EventFormat::Auto] {
            let record = view(Some(structured), &[]);
            assert_eq!(
                values(
                    format,
                    &[field("id"), field("type"), field("data.total")],
                    &record
                ),
                vec![
                    Some("ce-1".into()),
                    Some("order.created".into()),
                    Some("9.99".into())
                ]
            );
        }
        let headers = [
            ("ce_specversion", Some(&b"1.0"[..])),
            ("ce_id", Some(&b"ce-2"[..])),
            ("ce_type", Some(&b"t"[..])),
        ];
        let record = view(Some(br#"{"total": 1}"#), &headers);
        assert_eq!(
            values(
                EventFormat::Auto,
                &[field("id"), field("data.total")],
                &record
            ),
            vec![Some("ce-2".into()), Some("1".into())]
        );
        let record = view(Some(br#"{"total": 1}"#), &[]);
        let err = extract(EventFormat::CloudEvents, &[field("id")], &record).unwrap_err();
        assert_eq!(err.kind, DeadLetterKind::UnknownFormat);
    }

    #[test]
    fn bad_input_is_rejected_not_dropped() {
        let record = view(None, &[]);
        assert_eq!(
            extract(EventFormat::Row, &[], &record).unwrap_err().kind,
            DeadLetterKind::EmptyValue
        );
        let big = vec![b' '; MAX_VALUE_BYTES + 1];
        let record = view(Some(&big), &[]);
        assert_eq!(
            extract(EventFormat::Auto, &[], &record).unwrap_err().kind,
            DeadLetterKind::Oversized
        );
        let record = RecordView {
            key: Some(&[0xff]),
            ..view(Some(b"{}"), &[])
        };
        assert_eq!(
            extract(EventFormat::Row, &[Source::Key], &record)
                .unwrap_err()
                .kind,
            DeadLetterKind::InvalidValue
        );
    }

    proptest::proptest! {
        /// Whatever the bytes, extraction gives values, a skip or a rejection.
        #[test]
        fn any_bytes_are_handled(value in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            for format in [EventFormat::Auto, EventFormat::Row, EventFormat::Payload, EventFormat::Debezium, EventFormat::CloudEvents] {
                let record = view(Some(&value), &[]);
                let _ = extract(format, &[field("a.b"), Source::Value, Source::Body], &record);
            }
        }
    }
}
