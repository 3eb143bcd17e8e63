//! A Kafka record's value → [`TxnRecord`]: pure parsing, no I/O.
//!
//! Invariant: any bytes whatsoever give either a record, a deliberate skip, or a
//! [`Rejected`] with a precise error and a dead-letter kind; never a panic and never a
//! silent drop. Numbers are kept as their JSON text (`serde_json`'s
//! `arbitrary_precision`): an amount never goes through a float.
//!
//! # Formats
//! - **connector** and **seed**: the value is the row itself,
//!   `{"id": …, "account_id": …, "amount": …, "created_at": "…"}`. The connector keys
//!   its records by account and adds `outbox-relay.lsn`/`.xid`/`.commit-ts` headers; the
//!   seed keyed them by `str(id)` and wrote the amount as an integer. The value shape
//!   is the same, so the two differ here only in how they are counted.
//! - **debezium**: a change event, `{"schema": …, "payload": {"op": …, "after": {…}}}`
//!   or without the schema wrapper `{"op": …, "after": {…}}`. `c` (create) and `r`
//!   (snapshot read) are inserts; `u`, `d`, `t` and `m` are skipped and counted (the
//!   outbox is insert-only), and so are tombstones (a record without a value).
//!
//! Field values accepted:
//! - `id`, `account_id`: a JSON integer, or a string holding one, within 64 bits.
//! - `amount`: a JSON number (exact text), a decimal string, or Debezium's
//!   `VariableScaleDecimal` `{"scale": s, "value": "<base64>"}`; with the schema wrapper
//!   also a Kafka Connect `Decimal` (base64 bytes, scale in the schema). Unscaled values
//!   wider than 128 bits are refused.
//! - `created_at`: timestamp text (`2025-07-23 20:06:21.085330` or with a `T`), or an
//!   integer epoch: microseconds (`io.debezium.time.MicroTimestamp`, assumed when there
//!   is no schema), or per the schema milliseconds (`io.debezium.time.Timestamp`,
//!   `org.apache.kafka.connect.data.Timestamp`) or nanoseconds
//!   (`io.debezium.time.NanoTimestamp`).
//!
//! Not supported (dead-lettered as `invalid_value`): Debezium's `precise` decimals in a
//! record without the schema wrapper (bytes without a scale), `ZonedTimestamp` strings
//! (a `timestamptz` source column), `BC` dates, `infinity`, years beyond 9999.

use base64::Engine;
use serde_json::{Map, Number, Value};

use crate::apply::validate;
use crate::apply::{DeadLetterKind, TxnRecord};

/// Values larger than this are dead-lettered unparsed (`oversized`).
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// Which record format(s) the sink accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Detect per record: a Debezium envelope, else a plain row.
    Auto,
    /// outbox-relay's connector: plain rows with `outbox-relay.*` headers.
    Connector,
    /// The seed's producer: plain rows keyed by id.
    Seed,
    /// Debezium change events.
    Debezium,
}

/// The format a record turned out to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Connector,
    Seed,
    Debezium,
}

/// Why a record is not applied although it is fine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// A Debezium event other than an insert (`u`, `d`, `t`, `m`).
    DebeziumOp(String),
    /// A record without a value (a Debezium tombstone).
    Tombstone,
}

/// What a well-formed record means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Insert(TxnRecord, Detected),
    Skip(Skip),
}

/// A record that must become a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub kind: DeadLetterKind,
    /// Precise, and free of the record's values (the raw bytes are kept beside it).
    pub error: String,
}

fn reject(kind: DeadLetterKind, error: impl Into<String>) -> Rejected {
    Rejected {
        kind,
        error: error.into(),
    }
}

/// Parses one record's value. `connector_headers` tells whether the record carries the
/// connector's [`HEADER_LSN`](super::HEADER_LSN) (used only to tell connector records from seed ones).
pub fn decode(
    format: Format,
    value: Option<&[u8]>,
    connector_headers: bool,
) -> Result<Decoded, Rejected> {
    let Some(value) = value else {
        return match format {
            Format::Auto | Format::Debezium => Ok(Decoded::Skip(Skip::Tombstone)),
            Format::Connector | Format::Seed => Err(reject(
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
    if value.is_empty() {
        return Err(reject(DeadLetterKind::InvalidJson, "the value is empty"));
    }
    if let Some(decoded) = plain_row(format, value, connector_headers) {
        return Ok(decoded);
    }
    decode_tree(format, value, connector_headers)
}

/// A plain row exactly as the connector and the seed write it: these four fields and
/// no other, the integers and the amount as JSON numbers, the timestamp a string
/// without escapes.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainRow<'a> {
    id: i64,
    account_id: i64,
    amount: Number,
    created_at: &'a str,
}

/// The common case, decoded without building a JSON tree (which was a quarter of the
/// sink's instructions). Anything else, including a row the checks refuse, returns
/// `None` and takes [`decode_tree`], which gives the same record or the precise
/// rejection (property test `the_plain_row_path_agrees_with_the_tree_path`).
fn plain_row(format: Format, value: &[u8], connector_headers: bool) -> Option<Decoded> {
    if format == Format::Debezium {
        return None;
    }
    let row: PlainRow<'_> = serde_json::from_slice(value).ok()?;
    let amount = row.amount.as_str();
    validate::check_amount(amount).ok()?;
    validate::created_at(row.created_at).ok()?;
    let detected = match connector_headers {
        true => Detected::Connector,
        false => Detected::Seed,
    };
    Some(Decoded::Insert(
        TxnRecord {
            id: row.id,
            account_id: row.account_id,
            amount: amount.to_string(),
            created_at: row.created_at.to_string(),
        },
        detected,
    ))
}

/// The general path: any JSON, any of the formats.
fn decode_tree(format: Format, value: &[u8], connector_headers: bool) -> Result<Decoded, Rejected> {
    let json: Value = serde_json::from_slice(value).map_err(|e| {
        reject(
            DeadLetterKind::InvalidJson,
            format!("the value is not JSON: {e}"),
        )
    })?;
    let Value::Object(object) = json else {
        return Err(reject(
            DeadLetterKind::UnknownFormat,
            format!("the value is a JSON {}, not an object", type_name(&json)),
        ));
    };

    let envelope = debezium_envelope(&object);
    let plain = match connector_headers {
        true => Detected::Connector,
        false => Detected::Seed,
    };
    match (format, envelope) {
        (Format::Auto | Format::Debezium, Some((payload, schema))) => debezium(payload, schema),
        (Format::Connector | Format::Seed, Some(_)) => Err(reject(
            DeadLetterKind::UnknownFormat,
            "the value is a Debezium change event, but the sink is set to plain rows (--format)",
        )),
        (Format::Debezium, None) => Err(reject(
            DeadLetterKind::UnknownFormat,
            "the value is not a Debezium change event (no `op`, no `payload`)",
        )),
        (Format::Auto, None) if !object.contains_key("id") => Err(reject(
            DeadLetterKind::UnknownFormat,
            "the value is neither a row (no `id`) nor a Debezium change event (no `op`, no `payload`)",
        )),
        (Format::Auto | Format::Connector | Format::Seed, None) => {
            row(&object, &FieldSchemas::default()).map(|r| Decoded::Insert(r, plain))
        }
    }
}

/// The envelope's payload and, with the schema wrapper, its schema.
fn debezium_envelope(object: &Map<String, Value>) -> Option<(&Map<String, Value>, Option<&Value>)> {
    if let Some(Value::Object(payload)) = object.get("payload") {
        if payload.contains_key("op") || payload.contains_key("after") {
            return Some((payload, object.get("schema")));
        }
    }
    if object.contains_key("op") && (object.contains_key("after") || object.contains_key("before"))
    {
        return Some((object, None));
    }
    None
}

fn debezium(payload: &Map<String, Value>, schema: Option<&Value>) -> Result<Decoded, Rejected> {
    let op = match payload.get("op") {
        None | Some(Value::Null) => {
            return Err(reject(
                DeadLetterKind::MissingField,
                "the Debezium event has no `op`",
            ))
        }
        Some(Value::String(op)) => op.as_str(),
        Some(other) => {
            return Err(reject(
                DeadLetterKind::WrongType,
                format!(
                    "the Debezium `op` is a JSON {}, not a string",
                    type_name(other)
                ),
            ))
        }
    };
    match op {
        "c" | "r" => {}
        "u" | "d" | "t" | "m" => return Ok(Decoded::Skip(Skip::DebeziumOp(op.to_string()))),
        _ => {
            return Err(reject(
                DeadLetterKind::InvalidValue,
                "the Debezium `op` is not one of c, r, u, d, t, m",
            ))
        }
    }
    let after = match payload.get("after") {
        None | Some(Value::Null) => {
            return Err(reject(
                DeadLetterKind::MissingField,
                format!("the Debezium `{op}` event has no `after` row"),
            ))
        }
        Some(Value::Object(after)) => after,
        Some(other) => {
            return Err(reject(
                DeadLetterKind::WrongType,
                format!(
                    "the Debezium `after` is a JSON {}, not an object",
                    type_name(other)
                ),
            ))
        }
    };
    let schemas = schema.map(FieldSchemas::of_after).unwrap_or_default();
    row(after, &schemas).map(|r| Decoded::Insert(r, Detected::Debezium))
}

/// What the Kafka Connect schema says about the two fields whose encoding varies.
#[derive(Debug, Default)]
struct FieldSchemas {
    /// Logical type name of `amount` and, for `Decimal`, its scale.
    amount: Option<(String, Option<i64>)>,
    /// Logical type name of `created_at`.
    created_at: Option<String>,
}

impl FieldSchemas {
    /// Reads `schema.fields[field = after].fields[…]` of a Debezium envelope schema.
    fn of_after(schema: &Value) -> Self {
        let after = schema
            .get("fields")
            .and_then(Value::as_array)
            .and_then(|fields| {
                fields
                    .iter()
                    .find(|f| f.get("field") == Some(&Value::from("after")))
            });
        let field = |name: &str| {
            after
                .and_then(|a| a.get("fields"))
                .and_then(Value::as_array)
                .and_then(|fields| {
                    fields
                        .iter()
                        .find(|f| f.get("field") == Some(&Value::from(name)))
                })
        };
        let type_name = |f: &Value| f.get("name").and_then(Value::as_str).map(str::to_string);
        Self {
            amount: field("amount").and_then(|f| {
                let scale =
                    f.get("parameters")
                        .and_then(|p| p.get("scale"))
                        .and_then(|s| match s {
                            Value::String(s) => s.parse().ok(),
                            Value::Number(n) => n.as_i64(),
                            _ => None,
                        });
                type_name(f).map(|name| (name, scale))
            }),
            created_at: field("created_at").and_then(type_name),
        }
    }
}

fn row(object: &Map<String, Value>, schemas: &FieldSchemas) -> Result<TxnRecord, Rejected> {
    Ok(TxnRecord {
        id: integer(object, "id")?,
        account_id: integer(object, "account_id")?,
        amount: amount(object, schemas)?,
        created_at: created_at(object, schemas)?,
    })
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn field<'a>(object: &'a Map<String, Value>, name: &str) -> Result<&'a Value, Rejected> {
    match object.get(name) {
        None => Err(reject(
            DeadLetterKind::MissingField,
            format!("`{name}` is missing"),
        )),
        Some(Value::Null) => Err(reject(
            DeadLetterKind::MissingField,
            format!("`{name}` is null"),
        )),
        Some(value) => Ok(value),
    }
}

fn wrong_type(name: &str, value: &Value, expected: &str) -> Rejected {
    reject(
        DeadLetterKind::WrongType,
        format!(
            "`{name}` is a JSON {}, expected {expected}",
            type_name(value)
        ),
    )
}

fn invalid_value(error: validate::InvalidValue) -> Rejected {
    reject(
        DeadLetterKind::InvalidValue,
        format!("`{}` {}", error.field, error.reason),
    )
}

/// A JSON integer (or a string holding one) that fits 64 bits.
fn integer(object: &Map<String, Value>, name: &str) -> Result<i64, Rejected> {
    let value = field(object, name)?;
    let text = match value {
        Value::Number(n) => n.as_str(),
        Value::String(s) => s.as_str(),
        other => return Err(wrong_type(name, other, "an integer")),
    };
    if let Ok(parsed) = text.parse::<i64>() {
        return Ok(parsed);
    }
    let digits = text.strip_prefix('-').unwrap_or(text);
    let reason = if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        "is beyond the 64-bit integer range"
    } else {
        "is not an integer"
    };
    Err(reject(
        DeadLetterKind::InvalidValue,
        format!("`{name}` {reason}"),
    ))
}

fn amount(object: &Map<String, Value>, schemas: &FieldSchemas) -> Result<String, Rejected> {
    let value = field(object, "amount")?;
    let text = match (value, &schemas.amount) {
        (Value::Number(n), _) => number_text(n),
        // Kafka Connect `Decimal`: base64 of the unscaled value, scale in the schema.
        (Value::String(s), Some((name, Some(scale))))
            if name == "org.apache.kafka.connect.data.Decimal" =>
        {
            decimal_from_base64(s, *scale)?
        }
        (Value::String(s), _) => s.clone(),
        // Debezium `VariableScaleDecimal`: {"scale": s, "value": base64}.
        (Value::Object(o), _) => match (o.get("scale"), o.get("value")) {
            (Some(Value::Number(scale)), Some(Value::String(bytes))) => {
                let scale = scale.as_i64().ok_or_else(|| {
                    reject(
                        DeadLetterKind::InvalidValue,
                        "`amount.scale` is not an integer",
                    )
                })?;
                decimal_from_base64(bytes, scale)?
            }
            _ => {
                return Err(wrong_type(
                    "amount",
                    value,
                    "a number, a decimal string or {\"scale\", \"value\"}",
                ))
            }
        },
        (other, _) => return Err(wrong_type("amount", other, "a number or a decimal string")),
    };
    validate::amount(&text).map_err(invalid_value)?;
    Ok(text)
}

/// The exact text of a JSON number (it was never parsed into a float).
fn number_text(n: &Number) -> String {
    n.as_str().to_string()
}

/// The widest unscaled value accepted, in bytes (an `i128`: 38 decimal digits).
const MAX_DECIMAL_BYTES: usize = 16;

/// Decodes Kafka Connect's decimal encoding: big-endian two's complement unscaled value.
fn decimal_from_base64(encoded: &str, scale: i64) -> Result<String, Rejected> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| reject(DeadLetterKind::InvalidValue, "`amount` is not valid base64"))?;
    if bytes.is_empty() || bytes.len() > MAX_DECIMAL_BYTES {
        return Err(reject(
            DeadLetterKind::InvalidValue,
            format!(
                "`amount` decodes to {} bytes; 1 to {MAX_DECIMAL_BYTES} are supported",
                bytes.len()
            ),
        ));
    }
    if !(-i64::from(validate::MAX_AMOUNT_EXPONENT)..=i64::from(validate::MAX_AMOUNT_EXPONENT))
        .contains(&scale)
    {
        return Err(reject(
            DeadLetterKind::InvalidValue,
            "`amount` has an out-of-range scale",
        ));
    }
    // Sign-extend to 16 bytes.
    let fill = if bytes[0] & 0x80 != 0 { 0xFF } else { 0x00 };
    let mut wide = [fill; MAX_DECIMAL_BYTES];
    wide[MAX_DECIMAL_BYTES - bytes.len()..].copy_from_slice(&bytes);
    let unscaled = i128::from_be_bytes(wide);
    // unscaled × 10^-scale, written with an exponent, then in canonical decimal form.
    validate::amount(&format!("{unscaled}e{}", -scale)).map_err(invalid_value)
}

fn created_at(object: &Map<String, Value>, schemas: &FieldSchemas) -> Result<String, Rejected> {
    let value = field(object, "created_at")?;
    match value {
        Value::String(s) => {
            validate::created_at(s).map_err(invalid_value)?;
            Ok(s.clone())
        }
        Value::Number(n) => {
            let epoch: i64 = n.as_str().parse().map_err(|_| {
                reject(
                    DeadLetterKind::InvalidValue,
                    "`created_at` is a number but not a 64-bit integer epoch",
                )
            })?;
            let time = match schemas.created_at.as_deref() {
                Some("io.debezium.time.Timestamp" | "org.apache.kafka.connect.data.Timestamp") => {
                    chrono::DateTime::from_timestamp_millis(epoch)
                }
                Some("io.debezium.time.NanoTimestamp") => {
                    Some(chrono::DateTime::from_timestamp_nanos(epoch))
                }
                Some("io.debezium.time.MicroTimestamp") | None => {
                    chrono::DateTime::from_timestamp_micros(epoch)
                }
                Some(_) => {
                    return Err(reject(
                        DeadLetterKind::InvalidValue,
                        "`created_at` is a number of an unsupported logical type",
                    ))
                }
            };
            let text = time
                .map(|t| t.naive_utc().format("%Y-%m-%d %H:%M:%S%.6f").to_string())
                .ok_or_else(|| {
                    reject(
                        DeadLetterKind::InvalidValue,
                        "`created_at` is an epoch out of range",
                    )
                })?;
            validate::created_at(&text).map_err(invalid_value)?;
            Ok(text)
        }
        other => Err(wrong_type(
            "created_at",
            other,
            "a timestamp string or an epoch integer",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert(format: Format, value: &str) -> TxnRecord {
        match decode(format, Some(value.as_bytes()), false) {
            Ok(Decoded::Insert(record, _)) => record,
            other => panic!("{value}: {other:?}"),
        }
    }

    fn rejected(format: Format, value: &[u8]) -> Rejected {
        match decode(format, Some(value), false) {
            Err(rejected) => rejected,
            other => panic!("{}: {other:?}", String::from_utf8_lossy(value)),
        }
    }

    fn txn(id: i64, account_id: i64, amount: &str, created_at: &str) -> TxnRecord {
        TxnRecord {
            id,
            account_id,
            amount: amount.into(),
            created_at: created_at.into(),
        }
    }

    #[test]
    fn seed_records_keep_exact_numbers() {
        let value = r#"{"id": 1472072969025220725, "account_id": 5, "amount": 50, "created_at": "2025-07-23 20:06:21.085330"}"#;
        assert_eq!(
            insert(Format::Auto, value),
            txn(1472072969025220725, 5, "50", "2025-07-23 20:06:21.085330")
        );
        // Exact decimal text, far beyond f64's precision.
        let value = r#"{"id": -9223372036854775808, "account_id": 1, "amount": 12345678901234567890.123456789, "created_at": "2025-07-23T20:06:21"}"#;
        assert_eq!(
            insert(Format::Seed, value).amount,
            "12345678901234567890.123456789"
        );
        assert_eq!(insert(Format::Seed, value).id, i64::MIN);
    }

    #[test]
    fn connector_records_are_told_by_their_headers() {
        let value = br#"{"id":"7","account_id":"3","amount":"-12.30","created_at":"2025-07-23 20:06:21.1"}"#;
        assert_eq!(
            decode(Format::Auto, Some(value), true),
            Ok(Decoded::Insert(
                txn(7, 3, "-12.30", "2025-07-23 20:06:21.1"),
                Detected::Connector
            ))
        );
        assert!(matches!(
            decode(Format::Connector, Some(value), false),
            Ok(Decoded::Insert(_, Detected::Seed))
        ));
    }

    #[test]
    fn debezium_envelopes_with_and_without_schema() {
        let bare = r#"{"before": null, "after": {"id": 1, "account_id": 2, "amount": "30", "created_at": 1753301181085330}, "op": "c", "ts_ms": 1}"#;
        assert_eq!(
            insert(Format::Auto, bare),
            txn(1, 2, "30", "2025-07-23 20:06:21.085330")
        );
        let wrapped = r#"{"schema": {"type": "struct", "fields": [
                {"field": "before", "type": "struct", "fields": []},
                {"field": "after", "type": "struct", "fields": [
                    {"field": "id", "type": "int64"},
                    {"field": "amount", "type": "struct", "name": "io.debezium.data.VariableScaleDecimal"},
                    {"field": "created_at", "type": "int64", "name": "io.debezium.time.Timestamp"}]}]},
            "payload": {"before": null, "after": {"id": 1, "account_id": 2,
                "amount": {"scale": 2, "value": "/4U="}, "created_at": 1753301181085}, "op": "r"}}"#;
        // 0xFF85 = -123, scale 2.
        assert_eq!(
            insert(Format::Debezium, wrapped),
            txn(1, 2, "-1.23", "2025-07-23 20:06:21.085000")
        );
        let fixed_scale = r#"{"schema": {"fields": [{"field": "after", "fields": [
                {"field": "amount", "name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": "1"}},
                {"field": "created_at", "name": "io.debezium.time.NanoTimestamp"}]}]},
            "payload": {"after": {"id": 1, "account_id": 2, "amount": "AeI=", "created_at": 1753301181085330123}, "op": "c"}}"#;
        assert_eq!(
            insert(Format::Auto, fixed_scale),
            txn(1, 2, "48.2", "2025-07-23 20:06:21.085330")
        );
        let number = r#"{"op": "c", "after": {"id": 1, "account_id": 2, "amount": 12.5, "created_at": "2025-07-23 20:06:21"}}"#;
        assert_eq!(insert(Format::Auto, number).amount, "12.5");
    }

    #[test]
    fn debezium_non_inserts_and_tombstones_are_skipped() {
        for op in ["u", "d", "t", "m"] {
            let value = format!(r#"{{"op": "{op}", "before": {{"id": 1}}, "after": null}}"#);
            assert_eq!(
                decode(Format::Auto, Some(value.as_bytes()), false),
                Ok(Decoded::Skip(Skip::DebeziumOp(op.into())))
            );
        }
        assert_eq!(
            decode(Format::Auto, None, false),
            Ok(Decoded::Skip(Skip::Tombstone))
        );
        assert_eq!(
            decode(Format::Seed, None, false).unwrap_err().kind,
            DeadLetterKind::EmptyValue
        );
    }

    #[test]
    fn every_kind_of_bad_input() {
        use DeadLetterKind::*;
        let cases: &[(Format, &[u8], DeadLetterKind)] = &[
            (Format::Auto, b"not json", InvalidJson),
            (Format::Auto, b"", InvalidJson),
            (Format::Auto, b"\xff\xfe{}", InvalidJson),
            (Format::Auto, br#"{"id": 1, "account_id": 2, "amount": 3"#, InvalidJson),
            (Format::Auto, b"[1, 2]", UnknownFormat),
            (Format::Auto, b"42", UnknownFormat),
            (Format::Auto, br#"{"hello": "world"}"#, UnknownFormat),
            (Format::Debezium, br#"{"id": 1, "account_id": 2, "amount": 3, "created_at": "2025-07-23 20:06:21"}"#, UnknownFormat),
            (Format::Seed, br#"{"op": "c", "after": {}}"#, UnknownFormat),
            (Format::Auto, br#"{"id": 1, "amount": 3, "created_at": "2025-07-23 20:06:21"}"#, MissingField),
            (Format::Auto, br#"{"id": 1, "account_id": null, "amount": 3, "created_at": "2025-07-23 20:06:21"}"#, MissingField),
            (Format::Auto, br#"{"id": 1, "account_id": 2, "amount": 3}"#, MissingField),
            (Format::Auto, br#"{"op": "c", "after": null}"#, MissingField),
            (Format::Auto, br#"{"payload": {"after": {}}}"#, MissingField),
            (Format::Auto, br#"{"id": true, "account_id": 2, "amount": 3, "created_at": "2025-07-23 20:06:21"}"#, WrongType),
            (Format::Auto, br#"{"id": 1, "account_id": [2], "amount": 3, "created_at": "2025-07-23 20:06:21"}"#, WrongType),
            (Format::Auto, br#"{"id": 1, "account_id": 2, "amount": false, "created_at": "2025-07-23 20:06:21"}"#, WrongType),
            (Format::Auto, br#"{"id": 1, "account_id": 2, "amount": {"x": 1}, "created_at": "2025-07-23 20:06:21"}"#, WrongType),
            (Format::Auto, br#"{"id": 1, "account_id": 2, "amount": 3, "created_at": {}}"#, WrongType),
            (Format::Auto, br#"{"op": 1, "after": {}}"#, WrongType),
            (Format::Auto, br#"{"op": "c", "after": [1]}"#, WrongType),
            (Format::Auto, br#"{"id": 1, "account_id": 2, "amount": "abc", "created_at": "2025-07-23 20:06:21"}"#, InvalidValue),
            (Format::Auto, br#"{"id": 1, "account_id": 2, "amount": "NaN", "created_at": "2025-07-23 20:06:21"}"#, InvalidValue),
            (Format::Auto, br#"{"id": 1, "account_id": 2, "amount": 1e99999, "created_at": "2025-07-23 20:06:21"}"#, InvalidValue),
            (Format::Auto, br#"{"id": 1, "account_id": 2, "amount": 3, "created_at": "2025-02-30 10:00:00"}"#, InvalidValue),
            (Format::Auto, br#"{"id": 1, "account_id": 2, "amount": 3, "created_at": "soon"}"#, InvalidValue),
            (Format::Auto, br#"{"id": 1, "account_id": 2, "amount": 3, "created_at": 1.5}"#, InvalidValue),
            (Format::Auto, br#"{"id": 1, "account_id": 2, "amount": 3, "created_at": 9223372036854775807}"#, InvalidValue),
            (Format::Auto, br#"{"id": 9223372036854775808, "account_id": 2, "amount": 3, "created_at": "2025-07-23 20:06:21"}"#, InvalidValue),
            (Format::Auto, br#"{"id": 1.5, "account_id": 2, "amount": 3, "created_at": "2025-07-23 20:06:21"}"#, InvalidValue),
            (Format::Auto, br#"{"id": "x", "account_id": 2, "amount": 3, "created_at": "2025-07-23 20:06:21"}"#, InvalidValue),
            (Format::Auto, br#"{"id": 1, "account_id": 2, "amount": {"scale": 0, "value": "!!"}, "created_at": "2025-07-23 20:06:21"}"#, InvalidValue),
            (Format::Auto, br#"{"id": 1, "account_id": 2, "amount": {"scale": 0, "value": "AAAAAAAAAAAAAAAAAAAAAAA="}, "created_at": "2025-07-23 20:06:21"}"#, InvalidValue),
            (Format::Auto, br#"{"op": "x", "after": {}}"#, InvalidValue),
        ];
        for (format, value, kind) in cases {
            let r = rejected(*format, value);
            assert_eq!(
                r.kind,
                *kind,
                "{}: {}",
                String::from_utf8_lossy(value),
                r.error
            );
            assert!(!r.error.is_empty());
        }
        let big = vec![b' '; MAX_VALUE_BYTES + 1];
        assert_eq!(rejected(Format::Auto, &big).kind, Oversized);
    }

    #[test]
    fn the_connector_row_takes_the_plain_row_path() {
        let value = br#"{"id":7,"account_id":-2,"amount":-50.250,"created_at":"2025-07-23 20:06:21.085330"}"#;
        let expected = Decoded::Insert(
            TxnRecord {
                id: 7,
                account_id: -2,
                amount: "-50.250".into(),
                created_at: "2025-07-23 20:06:21.085330".into(),
            },
            Detected::Connector,
        );
        assert_eq!(plain_row(Format::Auto, value, true), Some(expected.clone()));
        assert_eq!(decode_tree(Format::Auto, value, true), Ok(expected));
        // Not a plain row: another field, a string id, an escaped timestamp.
        for other in [
            &br#"{"id":7,"account_id":2,"amount":1,"created_at":"2025-07-23 20:06:21","note":1}"#[..],
            br#"{"id":"7","account_id":2,"amount":1,"created_at":"2025-07-23 20:06:21"}"#,
            br#"{"id":7,"account_id":2,"amount":1,"created_at":"\u0032025-07-23 20:06:21"}"#,
        ] {
            assert_eq!(plain_row(Format::Auto, other, false), None);
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            for format in [Format::Auto, Format::Connector, Format::Seed, Format::Debezium] {
                let _ = decode(format, Some(&bytes), false);
            }
        }

        #[test]
        fn the_plain_row_path_agrees_with_the_tree_path(
            id in "-?[0-9]{1,20}(\\.[0-9])?|\"[0-9]{1,3}\"|null",
            amount in "-?[0-9]{1,40}(\\.[0-9]{0,4})?([eE][-+]?[0-9]{1,3})?|\"1\"|true",
            created_at in "20[0-9]{2}-[0-9]{2}-[0-9]{2}[ T][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?|x|\\\\u0032",
            extra in "|,\"op\":\"c\"|,\"id\":2",
            headers: bool,
        ) {
            let value = format!(
                r#"{{"id":{id},"account_id":{id},"amount":{amount},"created_at":"{created_at}"{extra}}}"#
            );
            for format in [Format::Auto, Format::Connector, Format::Seed, Format::Debezium] {
                if let Some(fast) = plain_row(format, value.as_bytes(), headers) {
                    proptest::prop_assert_eq!(Ok(fast), decode_tree(format, value.as_bytes(), headers));
                }
            }
        }

        #[test]
        fn arbitrary_json_fields_never_panic(
            id in "\\PC{0,24}", amount in "\\PC{0,24}", created_at in "\\PC{0,32}", op in "[a-z]{0,2}"
        ) {
            let row = serde_json::json!({"id": id, "account_id": 1, "amount": amount, "created_at": created_at});
            for value in [row.clone(), serde_json::json!({"op": op, "after": row})] {
                let bytes = value.to_string().into_bytes();
                let _ = decode(Format::Auto, Some(&bytes), false);
            }
        }
    }
}
