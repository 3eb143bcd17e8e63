//! Encoding of outbox rows as Kafka record values. Pure, no I/O.
//!
//! Invariant: a value is reproduced exactly as PostgreSQL printed it. Numbers stay the
//! decimal text PostgreSQL sent (never through a float), so `amount` 12.30 arrives as
//! `12.30`; a value that is not a valid JSON number (`NaN`, `Infinity`) becomes a
//! string; text is escaped by serde_json.

/// Type OIDs whose text form is emitted as a JSON number when it is one.
const NUMERIC_OIDS: [u32; 7] = [20, 21, 23, 26, 700, 701, 1700];
const BOOL_OID: u32 = 16;
const JSON_OIDS: [u32; 2] = [114, 3802];

/// How one column is rendered into the JSON object.
#[derive(Debug, Clone)]
pub struct ColumnSpec {
    /// The column's name, already JSON-escaped with its quotes and colon: `"id":`.
    key: Vec<u8>,
    type_oid: u32,
}

impl ColumnSpec {
    pub fn new(name: &str, type_oid: u32) -> Self {
        let mut key = serde_json::to_vec(name).unwrap_or_else(|_| b"\"\"".to_vec());
        key.push(b':');
        Self { key, type_oid }
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
        encode_value(out, column.type_oid, value);
    }
    out.push(b'}');
}

fn encode_value(out: &mut Vec<u8>, type_oid: u32, value: Option<&[u8]>) {
    let Some(text) = value else {
        out.extend_from_slice(b"null");
        return;
    };
    if NUMERIC_OIDS.contains(&type_oid) && is_json_number(text) {
        out.extend_from_slice(text);
    } else if type_oid == BOOL_OID && (text == b"t" || text == b"f") {
        out.extend_from_slice(if text == b"t" { b"true" } else { b"false" });
    } else if JSON_OIDS.contains(&type_oid)
        && serde_json::from_slice::<serde::de::IgnoredAny>(text).is_ok()
    {
        out.extend_from_slice(text);
    } else {
        let text = String::from_utf8_lossy(text);
        // Writing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text.as_ref());
    }
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
}
