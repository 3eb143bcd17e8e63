//! Encoding of outbox rows as Kafka record values. Pure, no I/O.
//!
//! Invariant: every column is the faithful JSON image of the text PostgreSQL printed
//! for it under the relay's session settings (`DateStyle=ISO, MDY`,
//! `extra_float_digits=3`, `TimeZone=UTC`, `bytea_output=hex`,
//! `IntervalStyle=postgres`; see `source::replication_config` and the snapshot), by one
//! rule per type, chosen once per column from its type OID in [`ColumnSpec::new`]:
//! - `int2`, `int4`, `int8`, `oid`, `float4`, `float8`, `numeric`: the printed text as a
//!   JSON number, never through a float (`12.30` stays `12.30`, a float keeps its
//!   shortest exact digits); the values that are not JSON numbers, `NaN`, `Infinity` and
//!   `-Infinity`, become those strings;
//! - `bool`: `true`/`false`;
//! - `json`, `jsonb`: the JSON itself, embedded as printed;
//! - `bytea`: its bytes in standard, padded base64, as a string;
//! - arrays of any of these (any number of dimensions): nested JSON arrays, each element
//!   by its element type's rule, a `NULL` element `null`; explicit lower bounds
//!   (`[0:1]={1,2}`) are dropped, the elements and their order kept;
//! - everything else (text types, `uuid`, date and time types, enums, domains, unknown
//!   types): the printed text as a JSON string, escaped by serde_json.
//!
//! A SQL `NULL` is `null`. A text that does not have its type's expected form (which
//! PostgreSQL does not print under those settings) becomes the JSON string of the text
//! rather than an error, so a row always encodes. The common scalar types cost no
//! allocation; only `bytea` and arrays do extra work, and only for those columns.
//! docs/connector.md ("How column types are encoded") is the user-facing table.

use base64::Engine;

const BOOL_OID: u32 = 16;
const BYTEA_OID: u32 = 17;
const CHAR_OID: u32 = 18;
const NAME_OID: u32 = 19;
const INT8_OID: u32 = 20;
const INT2_OID: u32 = 21;
const INT4_OID: u32 = 23;
const TEXT_OID: u32 = 25;
const OID_OID: u32 = 26;
const JSON_OID: u32 = 114;
const FLOAT4_OID: u32 = 700;
const FLOAT8_OID: u32 = 701;
const BPCHAR_OID: u32 = 1042;
const VARCHAR_OID: u32 = 1043;
const DATE_OID: u32 = 1082;
const TIME_OID: u32 = 1083;
const TIMESTAMP_OID: u32 = 1114;
const TIMESTAMPTZ_OID: u32 = 1184;
const INTERVAL_OID: u32 = 1186;
const TIMETZ_OID: u32 = 1266;
const NUMERIC_OID: u32 = 1700;
const UUID_OID: u32 = 2950;
const JSONB_OID: u32 = 3802;

/// The builtin array types encoded as JSON arrays, `(array type OID, element type OID)`,
/// as in `pg_type` (`oid`, `typelem`). All use `,` between elements; arrays of other
/// types (`box[]`, whose delimiter is `;`, enum and domain arrays, …) stay strings.
pub const ARRAY_ELEMENT_OIDS: [(u32, u32); 23] = [
    (1000, BOOL_OID),
    (1001, BYTEA_OID),
    (1002, CHAR_OID),
    (1003, NAME_OID),
    (1005, INT2_OID),
    (1007, INT4_OID),
    (1009, TEXT_OID),
    (1014, BPCHAR_OID),
    (1015, VARCHAR_OID),
    (1016, INT8_OID),
    (1021, FLOAT4_OID),
    (1022, FLOAT8_OID),
    (1028, OID_OID),
    (1115, TIMESTAMP_OID),
    (1182, DATE_OID),
    (1183, TIME_OID),
    (1185, TIMESTAMPTZ_OID),
    (1187, INTERVAL_OID),
    (1231, NUMERIC_OID),
    (1270, TIMETZ_OID),
    (199, JSON_OID),
    (2951, UUID_OID),
    (3807, JSONB_OID),
];

/// Deepest array nesting accepted (PostgreSQL's `MAXDIM`); deeper text stays a string.
const MAX_ARRAY_DEPTH: usize = 6;

/// The rule for one value's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scalar {
    /// The text as a JSON number when it is one, else as a string (`NaN`, `Infinity`).
    Number,
    /// `t`/`f` (and `true`/`false`, the form of a `bool::text` cast) as `true`/`false`.
    Bool,
    /// The text embedded as JSON when serde_json accepts it.
    Json,
    /// `\x` hex text as a base64 string of the bytes.
    Bytea,
    /// The text as a JSON string.
    String,
}

impl Scalar {
    fn of(type_oid: u32) -> Self {
        match type_oid {
            INT2_OID | INT4_OID | INT8_OID | OID_OID | FLOAT4_OID | FLOAT8_OID | NUMERIC_OID => {
                Self::Number
            }
            BOOL_OID => Self::Bool,
            JSON_OID | JSONB_OID => Self::Json,
            BYTEA_OID => Self::Bytea,
            _ => Self::String,
        }
    }
}

/// The rule for one column: a scalar, or an array whose elements follow a scalar rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rendering {
    Scalar(Scalar),
    Array(Scalar),
}

impl Rendering {
    fn of(type_oid: u32) -> Self {
        match ARRAY_ELEMENT_OIDS
            .iter()
            .find(|(array, _)| *array == type_oid)
        {
            Some(&(_, element)) => Self::Array(Scalar::of(element)),
            None => Self::Scalar(Scalar::of(type_oid)),
        }
    }
}

/// How one column is rendered into the JSON object.
#[derive(Debug, Clone)]
pub struct ColumnSpec {
    /// The column's name, already JSON-escaped with its quotes and colon: `"id":`.
    key: Vec<u8>,
    /// The rule for the column's type, decided here once rather than per row.
    rendering: Rendering,
}

impl ColumnSpec {
    pub fn new(name: &str, type_oid: u32) -> Self {
        let mut key = serde_json::to_vec(name).unwrap_or_else(|_| b"\"\"".to_vec());
        key.push(b':');
        Self {
            key,
            rendering: Rendering::of(type_oid),
        }
    }
}

/// Appends `{"col":value,…}` for one row to `out`. `values` holds the text form of
/// each column in `columns`' order, `None` for NULL.
pub fn encode_row<'a>(
    out: &mut Vec<u8>,
    columns: &[ColumnSpec],
    values: impl IntoIterator<Item = Option<&'a [u8]>>,
) {
    out.push(b'{');
    for (i, (column, value)) in columns.iter().zip(values).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&column.key);
        encode_value(out, column.rendering, value);
    }
    out.push(b'}');
}

fn encode_value(out: &mut Vec<u8>, rendering: Rendering, value: Option<&[u8]>) {
    let Some(text) = value else {
        out.extend_from_slice(b"null");
        return;
    };
    match rendering {
        Rendering::Scalar(scalar) => encode_scalar(out, scalar, text),
        Rendering::Array(element) => {
            let start = out.len();
            if encode_array(out, element, text).is_none() {
                out.truncate(start);
                encode_string(out, text);
            }
        }
    }
}

fn encode_scalar(out: &mut Vec<u8>, scalar: Scalar, text: &[u8]) {
    match scalar {
        Scalar::Number if is_json_number(text) => out.extend_from_slice(text),
        Scalar::Bool if text == b"t" || text == b"true" => out.extend_from_slice(b"true"),
        Scalar::Bool if text == b"f" || text == b"false" => out.extend_from_slice(b"false"),
        // serde_json does not check the UTF-8 of strings it skips, so check it first.
        Scalar::Json
            if std::str::from_utf8(text).is_ok()
                && serde_json::from_slice::<serde::de::IgnoredAny>(text).is_ok() =>
        {
            out.extend_from_slice(text)
        }
        Scalar::Bytea => {
            let start = out.len();
            if encode_bytea(out, text).is_none() {
                out.truncate(start);
                encode_string(out, text);
            }
        }
        _ => encode_string(out, text),
    }
}

/// The text as a JSON string; bytes that are not UTF-8 become U+FFFD.
fn encode_string(out: &mut Vec<u8>, text: &[u8]) {
    let text = String::from_utf8_lossy(text);
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text.as_ref());
}

/// PostgreSQL's hex form of a `bytea`, `\x0a1b…`, to the bytes it stands for; `None`
/// when the text is not that form (an odd number of digits, a non-hex character, or the
/// `escape` output form).
pub fn decode_bytea_hex(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    hex.chunks_exact(2).map(hex_byte).collect()
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    match pair {
        [high, low] => Some(nibble(*high)? << 4 | nibble(*low)?),
        _ => None,
    }
}

/// Appends the base64 JSON string of a `\x…` bytea text, decoding and encoding through
/// a stack buffer whose size is a multiple of 3 bytes, so that the concatenated chunks
/// are the encoding of the whole. `None` (with `out` partly written) if it is not hex.
fn encode_bytea(out: &mut Vec<u8>, text: &[u8]) -> Option<()> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let mut bytes = [0u8; 3 * 256];
    out.push(b'"');
    for chunk in hex.chunks(2 * bytes.len()) {
        let n = chunk.len() / 2;
        for (byte, pair) in bytes.iter_mut().zip(chunk.chunks_exact(2)) {
            *byte = hex_byte(pair)?;
        }
        let at = out.len();
        out.resize(at + base64::encoded_len(n, true)?, 0);
        base64::engine::general_purpose::STANDARD
            .encode_slice(&bytes[..n], &mut out[at..])
            .ok()?;
    }
    out.push(b'"');
    Some(())
}

/// Appends the JSON array for an array's text as `array_out` prints it: an optional
/// bounds prefix (`[0:1]=`, dropped), then `{…}` with `,` between elements, nested
/// braces for each further dimension, elements double-quoted (with `\` escaping `"` and
/// `\`) when needed, and an unquoted `NULL` for a null element. `None` (with `out` partly
/// written) if the text is not of that form.
fn encode_array(out: &mut Vec<u8>, element: Scalar, text: &[u8]) -> Option<()> {
    let mut rest = text;
    if let [b'[', ..] = rest {
        let equals = rest.iter().position(|&b| b == b'=')?;
        if !is_bounds(&rest[..equals]) {
            return None;
        }
        rest = &rest[equals + 1..];
    }
    // Used only for an element with backslash escapes: no allocation otherwise.
    let mut unescaped = Vec::new();
    let mut depth = 0usize;
    loop {
        // An item: a nested array or an element.
        if let [b'{', tail @ ..] = rest {
            depth += 1;
            if depth > MAX_ARRAY_DEPTH {
                return None;
            }
            out.push(b'[');
            rest = tail;
            if let [b'{', ..] = rest {
                continue;
            }
            // `{}` is an empty array: go straight to its closing brace.
            if !matches!(rest, [b'}', ..]) {
                rest = encode_element(out, element, rest, &mut unescaped)?;
            }
        } else if depth == 0 {
            return None;
        } else {
            rest = encode_element(out, element, rest, &mut unescaped)?;
        }
        // After an item: closing braces, then a delimiter or the end.
        loop {
            match rest {
                [b'}', tail @ ..] => {
                    out.push(b']');
                    rest = tail;
                    depth -= 1;
                    if depth == 0 {
                        return rest.is_empty().then_some(());
                    }
                }
                [b',', tail @ ..] => {
                    out.push(b',');
                    rest = tail;
                    break;
                }
                _ => return None,
            }
        }
    }
}

/// One element at the start of `rest`; returns what follows it.
fn encode_element<'t>(
    out: &mut Vec<u8>,
    element: Scalar,
    rest: &'t [u8],
    unescaped: &mut Vec<u8>,
) -> Option<&'t [u8]> {
    let quoted = rest.first() == Some(&b'"');
    let body = if quoted { &rest[1..] } else { rest };
    let (end, escaped) = element_end(body, quoted)?;
    let raw = &body[..end];
    let after = if quoted {
        body.get(end + 1..)?
    } else {
        &body[end..]
    };
    if !quoted && raw.eq_ignore_ascii_case(b"NULL") {
        out.extend_from_slice(b"null");
    } else if escaped {
        encode_scalar(out, element, unescape(raw, unescaped));
    } else {
        encode_scalar(out, element, raw);
    }
    Some(after)
}

/// The length of the element that starts `body` (after its opening quote if `quoted`),
/// and whether it has backslash escapes. A quoted element ends at its closing quote; an
/// unquoted one at the `,` or `}` after it, must not be empty and holds no `{` or `"`.
fn element_end(body: &[u8], quoted: bool) -> Option<(usize, bool)> {
    let mut end = 0;
    let mut escaped = false;
    loop {
        match (body.get(end)?, quoted) {
            (b'\\', _) => {
                escaped = true;
                end += 2;
            }
            (b'"', true) => return Some((end, escaped)),
            (b',' | b'}', false) => return (end > 0).then_some((end, escaped)),
            (b'{' | b'"', false) => return None,
            _ => end += 1,
        }
    }
}

/// `text` with each `\x` replaced by `x`, in `buffer`.
fn unescape<'b>(text: &[u8], buffer: &'b mut Vec<u8>) -> &'b [u8] {
    buffer.clear();
    let mut bytes = text.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => buffer.extend(bytes.next()),
            _ => buffer.push(b),
        }
    }
    buffer
}

/// `[lb:ub]` once per dimension, each bound an optionally signed integer.
fn is_bounds(mut text: &[u8]) -> bool {
    if text.is_empty() {
        return false;
    }
    while !text.is_empty() {
        let [b'[', tail @ ..] = text else {
            return false;
        };
        let Some(lower) = signed_digits(tail) else {
            return false;
        };
        let [b':', tail @ ..] = lower else {
            return false;
        };
        let Some(upper) = signed_digits(tail) else {
            return false;
        };
        let [b']', tail @ ..] = upper else {
            return false;
        };
        text = tail;
    }
    true
}

/// What follows `-?[0-9]+` at the start of `text`, if it starts so.
fn signed_digits(text: &[u8]) -> Option<&[u8]> {
    let unsigned = text.strip_prefix(b"-").unwrap_or(text);
    let rest = skip_digits(unsigned);
    (rest.len() < unsigned.len()).then_some(rest)
}

/// RFC 8259 number grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
pub fn is_json_number(text: &[u8]) -> bool {
    let mut rest = text;
    if let [b'-', tail @ ..] = rest {
        rest = tail;
    }
    rest = match rest {
        [b'0', tail @ ..] => tail,
        [b'1'..=b'9', ..] => skip_digits(rest),
        _ => return false,
    };
    if let [b'.', tail @ ..] = rest {
        let after = skip_digits(tail);
        if after.len() == tail.len() {
            return false;
        }
        rest = after;
    }
    if let [b'e' | b'E', tail @ ..] = rest {
        let tail = match tail {
            [b'+' | b'-', t @ ..] => t,
            t => t,
        };
        let after = skip_digits(tail);
        if after.len() == tail.len() {
            return false;
        }
        rest = after;
    }
    rest.is_empty()
}

fn skip_digits(mut s: &[u8]) -> &[u8] {
    while let [b'0'..=b'9', tail @ ..] = s {
        s = tail;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox_columns() -> Vec<ColumnSpec> {
        vec![
            ColumnSpec::new("id", 20),
            ColumnSpec::new("account_id", 20),
            ColumnSpec::new("amount", 1700),
            ColumnSpec::new("created_at", 1114),
        ]
    }

    #[test]
    fn encodes_the_seed_shape_exactly() {
        let mut out = Vec::new();
        let values: [Option<&[u8]>; 4] = [
            Some(b"1472072969025220725"),
            Some(b"5"),
            Some(b"-50.10"),
            Some(b"2025-07-23 20:06:21.08533"),
        ];
        encode_row(&mut out, &outbox_columns(), values);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"id":1472072969025220725,"account_id":5,"amount":-50.10,"created_at":"2025-07-23 20:06:21.08533"}"#
        );
        let parsed: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["amount"].to_string(), "-50.10");
    }

    #[test]
    fn nulls_non_numbers_and_escapes() {
        let mut out = Vec::new();
        let columns = [
            ColumnSpec::new("a", 1700),
            ColumnSpec::new("b", 25),
            ColumnSpec::new("c", 16),
            ColumnSpec::new("d\"", 3802),
        ];
        let values: [Option<&[u8]>; 4] =
            [Some(b"NaN"), Some(b"x\"\n"), None, Some(b"{\"k\": [1]}")];
        encode_row(&mut out, &columns, values);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"a":"NaN","b":"x\"\n","c":null,"d\"":{"k": [1]}}"#
        );
    }

    #[test]
    fn number_grammar() {
        for ok in ["0", "-0", "10", "-80", "12.30", "1e5", "1.5E+20", "-2.5e-3"] {
            assert!(is_json_number(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "", "-", "01", "1.", ".5", "1e", "NaN", "Infinity", "+1", "1 ",
        ] {
            assert!(!is_json_number(bad.as_bytes()), "{bad}");
        }
    }

    /// One column of type `type_oid` holding `text`, encoded: the JSON after `"v":`.
    fn one(type_oid: u32, text: Option<&str>) -> String {
        let mut out = Vec::new();
        encode_row(
            &mut out,
            &[ColumnSpec::new("v", type_oid)],
            [text.map(str::as_bytes)],
        );
        let json = String::from_utf8(out).unwrap();
        serde_json::from_str::<serde_json::Value>(&json).expect("valid JSON");
        json.strip_prefix(r#"{"v":"#)
            .and_then(|j| j.strip_suffix('}'))
            .unwrap()
            .to_string()
    }

    #[test]
    fn numbers_are_the_printed_text_and_non_numbers_strings() {
        for (oid, text) in [
            (INT2_OID, "-32768"),
            (INT4_OID, "2147483647"),
            (INT8_OID, "-9223372036854775808"),
            (OID_OID, "4294967295"),
            (
                NUMERIC_OID,
                "123456789012345678901234567890.000000000000000000000001",
            ),
            (NUMERIC_OID, "0.00000000000000000001"),
            (NUMERIC_OID, "-50.10"),
            (FLOAT8_OID, "0.1"),
            (FLOAT8_OID, "1e+20"),
            (FLOAT8_OID, "-1.2345678901234567e-300"),
            (FLOAT8_OID, "-0"),
            (FLOAT4_OID, "3.4028235e+38"),
            (FLOAT4_OID, "1.5e-07"),
        ] {
            assert_eq!(one(oid, Some(text)), text, "{oid} {text}");
        }
        for oid in [NUMERIC_OID, FLOAT4_OID, FLOAT8_OID] {
            for text in ["NaN", "Infinity", "-Infinity"] {
                assert_eq!(one(oid, Some(text)), format!("\"{text}\""), "{oid}");
            }
        }
        let parsed: serde_json::Value =
            serde_json::from_str(&format!("[{}]", one(NUMERIC_OID, Some("1.10")))).unwrap();
        assert_eq!(parsed[0].to_string(), "1.10");
    }

    #[test]
    fn bools_and_json() {
        assert_eq!(one(BOOL_OID, Some("t")), "true");
        assert_eq!(one(BOOL_OID, Some("f")), "false");
        // A `bool::text` cast prints the words.
        assert_eq!(one(BOOL_OID, Some("true")), "true");
        assert_eq!(one(BOOL_OID, Some("false")), "false");
        assert_eq!(one(BOOL_OID, Some("yes")), r#""yes""#);
        assert_eq!(
            one(JSON_OID, Some(r#"{"a": [1, 2.50]}"#)),
            r#"{"a": [1, 2.50]}"#
        );
        assert_eq!(one(JSONB_OID, Some("null")), "null");
        assert_eq!(one(JSONB_OID, Some("1e400")), "1e400");
        assert_eq!(one(JSON_OID, Some("{oops")), r#""{oops""#);
    }

    #[test]
    fn text_time_uuid_and_other_types_are_strings() {
        for (oid, text, json) in [
            (TEXT_OID, "a\"b\\c\n\u{1}é", r#""a\"b\\c\n\u0001é""#),
            (VARCHAR_OID, "", r#""""#),
            (BPCHAR_OID, "ab   ", r#""ab   ""#),
            (NAME_OID, "relname", r#""relname""#),
            (CHAR_OID, "\\351", r#""\\351""#),
            (
                UUID_OID,
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                r#""a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11""#,
            ),
            (
                TIMESTAMP_OID,
                "2025-07-23 20:06:21.08533",
                r#""2025-07-23 20:06:21.08533""#,
            ),
            (
                TIMESTAMPTZ_OID,
                "2025-07-23 20:06:21+00",
                r#""2025-07-23 20:06:21+00""#,
            ),
            (TIMESTAMPTZ_OID, "-infinity", r#""-infinity""#),
            (DATE_OID, "0044-03-15 BC", r#""0044-03-15 BC""#),
            (TIME_OID, "24:00:00", r#""24:00:00""#),
            (TIMETZ_OID, "12:00:00+05:30", r#""12:00:00+05:30""#),
            (
                INTERVAL_OID,
                "1 year 2 mons -3 days 04:05:06.7",
                r#""1 year 2 mons -3 days 04:05:06.7""#,
            ),
            // An enum or any other type.
            (16_385, "pending", r#""pending""#),
            // money, inet: their text.
            (790, "$1,000.00", r#""$1,000.00""#),
            (869, "10.0.0.1", r#""10.0.0.1""#),
        ] {
            assert_eq!(one(oid, Some(text)), json, "{oid} {text:?}");
        }
        // Bytes that are not UTF-8 (impossible in a UTF8 database) do not break the JSON.
        let mut out = Vec::new();
        encode_row(
            &mut out,
            &[ColumnSpec::new("v", TEXT_OID)],
            [Some(&b"a\xffb"[..])],
        );
        assert_eq!(out, "{\"v\":\"a\u{fffd}b\"}".as_bytes());
    }

    #[test]
    fn nulls_are_null_whatever_the_type() {
        for oid in [
            INT8_OID, BOOL_OID, JSONB_OID, BYTEA_OID, TEXT_OID, 1007, 1001, 0,
        ] {
            assert_eq!(one(oid, None), "null", "{oid}");
        }
    }

    #[test]
    fn bytea_is_base64_of_its_bytes() {
        assert_eq!(one(BYTEA_OID, Some("\\x")), r#""""#);
        assert_eq!(one(BYTEA_OID, Some("\\x00")), r#""AA==""#);
        assert_eq!(one(BYTEA_OID, Some("\\x0a1bFF")), r#""Chv/""#);
        assert_eq!(one(BYTEA_OID, Some("\\xdeadbeef")), r#""3q2+7w==""#);
        // Longer than the stack buffer, of a length that is not a multiple of 3.
        let bytes: Vec<u8> = (0..2000u32).map(|i| (i * 7 % 256) as u8).collect();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let json = one(BYTEA_OID, Some(&format!("\\x{hex}")));
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        assert_eq!(json, format!("\"{b64}\""));
        // Not the hex form: the text, as a string.
        for text in ["\\x0", "\\x0g", "abc\\000", "", "x00"] {
            assert_eq!(
                one(BYTEA_OID, Some(text)),
                serde_json::to_string(text).unwrap()
            );
        }
    }

    #[test]
    fn decodes_bytea_hex() {
        assert_eq!(decode_bytea_hex(b"\\x"), Some(vec![]));
        assert_eq!(decode_bytea_hex(b"\\x00ff7F"), Some(vec![0, 0xff, 0x7f]));
        for bad in [
            &b""[..],
            b"\\",
            b"\\x1",
            b"\\xzz",
            b"00ff",
            b"\\X00",
            b"\\x00 ",
        ] {
            assert_eq!(decode_bytea_hex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn arrays_element_by_element() {
        for (oid, text, json) in [
            (1007, "{}", "[]"),
            (1007, "{1,-2,NULL}", "[1,-2,null]"),
            (1016, "{{1,2},{3,NULL}}", "[[1,2],[3,null]]"),
            (1005, "{{{1},{2}},{{3},{4}}}", "[[[1],[2]],[[3],[4]]]"),
            // Explicit lower bounds are dropped.
            (1007, "[0:1]={1,2}", "[1,2]"),
            (1007, "[-2:-1][1:2]={{1,2},{3,4}}", "[[1,2],[3,4]]"),
            (
                1231,
                "{1.10,NaN,-Infinity,NULL}",
                r#"[1.10,"NaN","-Infinity",null]"#,
            ),
            (
                1022,
                "{1.5,NaN,Infinity,-Infinity,1e+20,-0}",
                r#"[1.5,"NaN","Infinity","-Infinity",1e+20,-0]"#,
            ),
            (1021, "{3.4028235e+38}", "[3.4028235e+38]"),
            (1000, "{t,f,NULL}", "[true,false,null]"),
            (
                1009,
                r#"{plain,"a\"b","c\\d","with space","NULL",NULL,"",é,"{x,y}"}"#,
                r#"["plain","a\"b","c\\d","with space","NULL",null,"","é","{x,y}"]"#,
            ),
            (1014, r#"{"ab  ",c}"#, r#"["ab  ","c"]"#),
            (1015, "{{a,b},{c,d}}", r#"[["a","b"],["c","d"]]"#),
            // An unquoted element may carry escapes in PostgreSQL's input syntax.
            (1009, r"{a\,b}", r#"["a,b"]"#),
            (
                199,
                r#"{"{\"a\": [1, 2.50]}","null",NULL,"\"s\"",3}"#,
                r#"[{"a": [1, 2.50]},null,null,"s",3]"#,
            ),
            (
                3807,
                r#"{"[]","{\"k\": \"v\\\"\"}"}"#,
                r#"[[],{"k": "v\""}]"#,
            ),
            (1001, r#"{"\\x","\\x0a1bff",NULL}"#, r#"["","Chv/",null]"#),
            (
                2951,
                "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
                r#"["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]"#,
            ),
            (
                1185,
                r#"{"2025-07-23 20:06:21.08533+00",infinity}"#,
                r#"["2025-07-23 20:06:21.08533+00","infinity"]"#,
            ),
            (
                1187,
                r#"{"1 day 02:00:00",00:00:00}"#,
                r#"["1 day 02:00:00","00:00:00"]"#,
            ),
        ] {
            assert_eq!(one(oid, Some(text)), json, "{oid} {text}");
        }
    }

    #[test]
    fn malformed_arrays_and_other_arrays_are_strings() {
        for text in [
            "",
            "1,2",
            "{1,2",
            "{1,2}}",
            "{1,2}x",
            "{1,,2}",
            "{,}",
            "{1,}",
            r#"{"a}"#,
            r#"{"a"b}"#,
            "{a\"b}",
            "[0:1]{1,2}",
            "[0:1=]{1}",
            "[x:1]={1}",
            "[0:1]=1",
            "{{{{{{{1}}}}}}}",
            "{1}{2}",
            "{\"a\\\"}",
        ] {
            assert_eq!(
                one(1009, Some(text)),
                serde_json::to_string(text).unwrap(),
                "{text}"
            );
        }
        // Six dimensions is PostgreSQL's maximum, and fine.
        assert_eq!(one(1007, Some("{{{{{{1}}}}}}")), "[[[[[[1]]]]]]");
        // box[] (delimiter `;`), int2vector and enum arrays keep their text.
        assert_eq!(
            one(1020, Some("{(1,1),(0,0);(2,2),(1,1)}")),
            r#""{(1,1),(0,0);(2,2),(1,1)}""#
        );
        assert_eq!(one(22, Some("1 2")), r#""1 2""#);
        assert_eq!(one(16_386, Some("{a,b}")), r#""{a,b}""#);
    }

    proptest::proptest! {
        /// Whatever the bytes, every rule gives valid JSON and never panics.
        #[test]
        fn any_text_gives_valid_json(
            text in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(b"{}[]:=,\"\\ NUL-0123456789.xeE".to_vec()),
                    proptest::num::u8::ANY,
                ],
                0..40,
            ),
        ) {
            let oids = [INT8_OID, NUMERIC_OID, BOOL_OID, JSON_OID, BYTEA_OID, TEXT_OID];
            let arrays = [1007, 1231, 1000, 199, 1001, 1009];
            for oid in oids.into_iter().chain(arrays) {
                let mut out = Vec::new();
                encode_row(&mut out, &[ColumnSpec::new("v", oid)], [Some(&text[..])]);
                let parsed = serde_json::from_slice::<serde_json::Value>(&out);
                proptest::prop_assert!(parsed.is_ok(), "{oid}: {}", String::from_utf8_lossy(&out));
            }
        }

        /// Arrays as `array_out` prints them come back element for element.
        #[test]
        fn printed_text_arrays_round_trip(
            rows in proptest::collection::vec(
                proptest::collection::vec(proptest::option::of(".{0,6}"), 2),
                1..4,
            ),
            lower in proptest::option::of(-3i32..3),
        ) {
            fn print(element: &Option<String>) -> String {
                let Some(e) = element else { return "NULL".into() };
                let plain = !e.is_empty()
                    && !e.eq_ignore_ascii_case("NULL")
                    && !e.chars().any(|c| "{},\"\\".contains(c) || c.is_ascii_whitespace());
                if plain {
                    return e.clone();
                }
                format!("\"{}\"", e.replace('\\', "\\\\").replace('"', "\\\""))
            }
            let body = rows
                .iter()
                .map(|row| format!("{{{}}}", row.iter().map(print).collect::<Vec<_>>().join(",")))
                .collect::<Vec<_>>()
                .join(",");
            let prefix = lower.map(|l| format!("[{l}:{}][1:2]=", l + rows.len() as i32 - 1));
            let text = format!("{}{{{body}}}", prefix.unwrap_or_default());
            let json: serde_json::Value = serde_json::from_str(&one(1009, Some(&text))).unwrap();
            let expected = serde_json::to_value(&rows).unwrap();
            proptest::prop_assert_eq!(json, expected, "{}", text);
        }
    }
}
