//! Every PostgreSQL type an outbox uses is encoded faithfully (`record::encode`), checked
//! against the real server of the local stack (`scripts/stack up`).
//!
//! Property: for random values of every supported type, and arrays of them in one to
//! three dimensions with NULL elements and explicit lower bounds, the JSON that
//! `encode_row` makes of the text PostgreSQL prints (under the replication session's
//! settings) is that text's faithful image by the type's rule in docs/connector.md, and,
//! where the generated value is known exactly (integers, floats, bool, bytea, text,
//! uuid, json), it is that value. The text is read over the simple query protocol, which
//! returns each value through its type's output function: what pgoutput sends.
//!
//! Also: `encode::ARRAY_ELEMENT_OIDS` is the server's own catalog; and the relay itself
//! (connector → Kafka) writes the rows of such a table, from the snapshot and from the
//! stream, byte for byte as `encode_row` makes them of that text, although the
//! database's own settings print every date, time, interval and bytea differently.

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use base64::Engine as _;
use common::TestDbs;
use outbox_relay::record::encode::{self, ColumnSpec};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;
use tokio_postgres::{Client, SimpleQueryMessage};

/// The replication session's settings (`source::replication_config`).
const SESSION: &str = "SET datestyle = 'ISO, MDY'; SET extra_float_digits = 3; \
                       SET TimeZone = 'UTC'; SET bytea_output = 'hex'; \
                       SET IntervalStyle = 'postgres'";

/// Cases per property, and rows inserted (in one statement) per case.
const CASES: u32 = 128;
const ROWS: usize = 4;

/// The documented rule a type's values are judged by (docs/connector.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// The printed text as a JSON number; `NaN`, `Infinity`, `-Infinity` as strings.
    Number,
    Bool,
    /// The JSON the server printed, embedded.
    Json,
    /// Base64 of the bytes.
    Bytea,
    /// The printed text as a string.
    Text,
}

/// What a generated value is known to be, beyond what the server prints.
#[derive(Debug, Clone)]
enum Known {
    /// Only the server's text is the oracle (numeric, jsonb, dates and times, …).
    Printed,
    Integer(i128),
    Float4(f32),
    Float8(f64),
    Bool(bool),
    Bytes(Vec<u8>),
    Text(String),
    Json(Value),
}

/// One non-NULL value: a SQL expression of the column's type and what it is known to be.
#[derive(Debug, Clone)]
struct Literal {
    sql: String,
    known: Known,
}

/// One column's value in one row.
#[derive(Debug, Clone)]
enum Cell {
    Null,
    Scalar(Literal),
    /// An array with these dimension lengths and lower bounds, elements in row-major
    /// order (`None` for a NULL element).
    Array {
        lengths: Vec<usize>,
        lower_bounds: Vec<i32>,
        elements: Vec<Option<Literal>>,
    },
}

/// One supported type: its SQL name, rule, and a strategy for its non-NULL values.
struct Type {
    sql: &'static str,
    rule: Rule,
    values: BoxedStrategy<Literal>,
    /// Whether the test also has a column of its array type.
    with_array: bool,
}

fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn literal(text: &str, sql_type: &str, known: Known) -> Literal {
    Literal {
        sql: format!("{}::{sql_type}", quote(text)),
        known,
    }
}

/// Text with every character PostgreSQL's array output must quote or escape, often.
fn text_values() -> BoxedStrategy<String> {
    prop_oneof![
        "[^\u{0}]{0,12}",
        "[\"\\\\{},; \t\na\u{e9}]{0,6}",
        Just("NULL".to_string()),
        Just("null".to_string()),
        Just(String::new()),
    ]
    .boxed()
}

/// PostgreSQL's input for a float that is not finite.
fn non_finite(value: f64) -> Option<&'static str> {
    match value {
        v if v.is_nan() => Some("NaN"),
        f64::INFINITY => Some("Infinity"),
        f64::NEG_INFINITY => Some("-Infinity"),
        _ => None,
    }
}

fn json_values() -> impl Strategy<Value = Value> {
    let number = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        "-?(0|[1-9][0-9]{0,25})(\\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?",
    ]
    .prop_map(|text| Value::Number(serde_json::from_str(&text).expect("a JSON number")));
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number,
        text_values().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z\"\\\\ ]{0,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A date's text without its era, and its era: `""` or `" BC"`.
fn date_text() -> impl Strategy<Value = (String, &'static str)> {
    (1..=9999u32, 1..=12u32, 1..=28u32, prop::bool::weighted(0.1)).prop_map(
        |(year, month, day, bc)| {
            // 4713 BC is the earliest date.
            let (year, era) = if bc {
                (year % 4713 + 1, " BC")
            } else {
                (year, "")
            };
            (format!("{year:04}-{month:02}-{day:02}"), era)
        },
    )
}

/// A timestamp's text, with a time zone offset if `zoned`.
fn timestamp_text(zoned: bool) -> impl Strategy<Value = String> {
    (date_text(), time_text(), zone_text()).prop_map(move |((date, era), time, zone)| {
        let zone = if zoned { zone.as_str() } else { "" };
        format!("{date} {time}{zone}{era}")
    })
}

fn time_text() -> impl Strategy<Value = String> {
    (0..24u32, 0..60u32, 0..60u32, 0..1_000_000u32)
        .prop_map(|(h, m, s, micros)| format!("{h:02}:{m:02}:{s:02}.{micros:06}"))
}

fn zone_text() -> impl Strategy<Value = String> {
    (
        any::<bool>(),
        0..=14u32,
        prop::sample::select(vec![0u32, 15, 30, 45]),
    )
        .prop_map(|(west, h, m)| format!("{}{h:02}:{m:02}", if west { '-' } else { '+' }))
}

/// Printed-only values of `sql_type` from text strategies, sometimes one of `specials`.
fn printed(
    sql_type: &'static str,
    texts: impl Strategy<Value = String> + 'static,
    specials: &'static [&'static str],
) -> BoxedStrategy<Literal> {
    let text = if specials.is_empty() {
        texts.boxed()
    } else {
        prop_oneof![
            9 => texts,
            1 => prop::sample::select(specials).prop_map(str::to_string),
        ]
        .boxed()
    };
    text.prop_map(move |t| literal(&t, sql_type, Known::Printed))
        .boxed()
}

fn types() -> Vec<Type> {
    fn ty(sql: &'static str, rule: Rule, values: BoxedStrategy<Literal>) -> Type {
        Type {
            sql,
            rule,
            values,
            with_array: true,
        }
    }
    let integer = |sql: &'static str, values: BoxedStrategy<i128>| {
        ty(
            sql,
            Rule::Number,
            values
                .prop_map(move |n| literal(&n.to_string(), sql, Known::Integer(n)))
                .boxed(),
        )
    };
    let numeric_text = prop_oneof![
        "-?[0-9]{1,30}(\\.[0-9]{1,30})?",
        "-?[0-9]{1,3}\\.[0-9]{1,5}e[+-]?[0-9]{1,2}",
    ];
    let uuid = any::<[u8; 16]>().prop_map(|b| {
        let hex: String = b.iter().map(|b| format!("{b:02x}")).collect();
        let text = format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        );
        // The server reads upper case and prints lower case.
        literal(&text.to_uppercase(), "uuid", Known::Text(text))
    });
    let mut types = vec![
        integer("int2", any::<i16>().prop_map(i128::from).boxed()),
        integer("int4", any::<i32>().prop_map(i128::from).boxed()),
        integer("int8", any::<i64>().prop_map(i128::from).boxed()),
        integer("oid", any::<u32>().prop_map(i128::from).boxed()),
        ty(
            "numeric",
            Rule::Number,
            printed("numeric", numeric_text, &["NaN", "Infinity", "-Infinity"]),
        ),
        ty(
            "float4",
            Rule::Number,
            any::<f32>()
                .prop_map(|v| {
                    // `{:e}`: Rust's shortest text that reads back to the same value.
                    let text =
                        non_finite(f64::from(v)).map_or_else(|| format!("{v:e}"), str::to_string);
                    literal(&text, "float4", Known::Float4(v))
                })
                .boxed(),
        ),
        ty(
            "float8",
            Rule::Number,
            any::<f64>()
                .prop_map(|v| {
                    let text = non_finite(v).map_or_else(|| format!("{v:e}"), str::to_string);
                    literal(&text, "float8", Known::Float8(v))
                })
                .boxed(),
        ),
        ty(
            "bool",
            Rule::Bool,
            any::<bool>()
                .prop_map(|b| literal(&b.to_string(), "bool", Known::Bool(b)))
                .boxed(),
        ),
        ty(
            "json",
            Rule::Json,
            (json_values(), any::<bool>())
                .prop_map(|(value, pretty)| {
                    let text = if pretty {
                        serde_json::to_string_pretty(&value)
                    } else {
                        serde_json::to_string(&value)
                    };
                    literal(&text.expect("JSON text"), "json", Known::Json(value))
                })
                .boxed(),
        ),
        ty(
            "jsonb",
            Rule::Json,
            json_values()
                .prop_map(|value| literal(&value.to_string(), "jsonb", Known::Printed))
                .boxed(),
        ),
        ty(
            "bytea",
            Rule::Bytea,
            prop::collection::vec(any::<u8>(), 0..48)
                .prop_map(|bytes| {
                    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    literal(&format!("\\x{hex}"), "bytea", Known::Bytes(bytes))
                })
                .boxed(),
        ),
        ty("uuid", Rule::Text, uuid.boxed()),
        ty(
            "text",
            Rule::Text,
            text_values()
                .prop_map(|t| literal(&t, "text", Known::Text(t.clone())))
                .boxed(),
        ),
        ty(
            "varchar",
            Rule::Text,
            text_values()
                .prop_map(|t| literal(&t, "varchar", Known::Text(t.clone())))
                .boxed(),
        ),
        ty(
            "char(6)",
            Rule::Text,
            "[^\u{0}]{0,6}|[\" ,{}\\\\]{0,6}"
                .prop_map(|t| literal(&t, "char(6)", Known::Text(format!("{t:<6}"))))
                .boxed(),
        ),
        ty(
            "name",
            Rule::Text,
            "[a-zA-Z0-9_ \u{e9}\",{}\\\\]{0,20}"
                .prop_map(|t| literal(&t, "name", Known::Text(t.clone())))
                .boxed(),
        ),
        ty("\"char\"", Rule::Text, printed("\"char\"", "[^\u{0}]", &[])),
        ty(
            "timestamp",
            Rule::Text,
            printed(
                "timestamp",
                timestamp_text(false),
                &["infinity", "-infinity"],
            ),
        ),
        ty(
            "timestamptz",
            Rule::Text,
            printed(
                "timestamptz",
                timestamp_text(true),
                &["infinity", "-infinity"],
            ),
        ),
        ty(
            "date",
            Rule::Text,
            printed(
                "date",
                date_text().prop_map(|(date, era)| format!("{date}{era}")),
                &["infinity", "-infinity"],
            ),
        ),
        ty(
            "time",
            Rule::Text,
            printed("time", time_text(), &["24:00:00"]),
        ),
        ty(
            "timetz",
            Rule::Text,
            printed(
                "timetz",
                (time_text(), zone_text()).prop_map(|(t, z)| format!("{t}{z}")),
                &[],
            ),
        ),
        ty(
            "interval",
            Rule::Text,
            printed(
                "interval",
                (
                    -1200..1200i32,
                    -1000..1000i32,
                    -10i64.pow(12)..10i64.pow(12),
                )
                    .prop_map(|(m, d, us)| format!("{m} mons {d} days {us} microseconds")),
                &[],
            ),
        ),
    ];
    // Other types, scalar only: their text, as a string.
    for (sql, values) in [
        (
            "mood",
            prop::sample::select(vec!["sad", "ok", "a \"b\", {c}"])
                .prop_map(|t| literal(t, "mood", Known::Text(t.to_string())))
                .boxed(),
        ),
        (
            "positive",
            (1..i64::MAX)
                .prop_map(|n| literal(&n.to_string(), "positive", Known::Text(n.to_string())))
                .boxed(),
        ),
        (
            "inet",
            any::<[u8; 4]>()
                .prop_map(|[a, b, c, d]| {
                    let text = format!("{a}.{b}.{c}.{d}");
                    literal(&text, "inet", Known::Text(text.clone()))
                })
                .boxed(),
        ),
    ] {
        types.push(Type {
            sql,
            rule: Rule::Text,
            values,
            with_array: false,
        });
    }
    types
}

/// A column of the probe table: `c{i}` of type `types[i]`, or `a{i}` of its array type.
struct Column {
    name: String,
    sql_type: String,
    rule: Rule,
    array: bool,
}

fn columns(types: &[Type]) -> Vec<Column> {
    let scalars = types.iter().enumerate().map(|(i, t)| Column {
        name: format!("c{i}"),
        sql_type: t.sql.to_string(),
        rule: t.rule,
        array: false,
    });
    let arrays = types
        .iter()
        .enumerate()
        .filter(|(_, t)| t.with_array)
        .map(|(i, t)| Column {
            name: format!("a{i}"),
            sql_type: format!("{}[]", t.sql),
            rule: t.rule,
            array: true,
        });
    scalars.chain(arrays).collect()
}

/// Arrays of `values`: empty, or one to three dimensions of one to three elements each,
/// a fifth of them NULL, sometimes with explicit lower bounds.
fn arrays(values: BoxedStrategy<Literal>) -> BoxedStrategy<Cell> {
    let empty = Just(Cell::Array {
        lengths: vec![],
        lower_bounds: vec![],
        elements: vec![],
    });
    let filled = prop::collection::vec(1..=3usize, 1..=3)
        .prop_flat_map(move |lengths| {
            let count: usize = lengths.iter().product();
            let dims = lengths.len();
            (
                Just(lengths),
                prop::collection::vec(prop::option::weighted(0.8, values.clone()), count),
                prop::option::weighted(0.3, prop::collection::vec(-3..3i32, dims)),
            )
        })
        .prop_map(|(lengths, elements, bounds)| Cell::Array {
            lower_bounds: bounds.unwrap_or_else(|| vec![1; lengths.len()]),
            lengths,
            elements,
        });
    prop_oneof![1 => empty, 6 => filled].boxed()
}

fn cells(types: &[Type]) -> Vec<BoxedStrategy<Cell>> {
    let scalars = types.iter().map(|t| {
        prop::option::weighted(0.85, t.values.clone())
            .prop_map(|v| v.map_or(Cell::Null, Cell::Scalar))
            .boxed()
    });
    let arrays = types.iter().filter(|t| t.with_array).map(|t| {
        prop::option::weighted(0.9, arrays(t.values.clone()))
            .prop_map(|v| v.unwrap_or(Cell::Null))
            .boxed()
    });
    scalars.chain(arrays).collect()
}

/// The SQL expression of a cell of `column`.
fn cell_sql(cell: &Cell, column: &Column) -> String {
    match cell {
        Cell::Null => "NULL".into(),
        Cell::Scalar(literal) => literal.sql.clone(),
        Cell::Array { lengths, .. } if lengths.is_empty() => {
            format!("'{{}}'::{}", column.sql_type)
        }
        Cell::Array {
            lengths,
            lower_bounds,
            elements,
        } => {
            let element_type = column.sql_type.trim_end_matches("[]");
            let mut elements = elements.iter().map(|e| match e {
                Some(literal) => literal.sql.clone(),
                None => format!("NULL::{element_type}"),
            });
            let nested = nest(lengths, &mut elements);
            let array = format!("{nested}::{}", column.sql_type);
            if lower_bounds.iter().all(|&b| b == 1) {
                return array;
            }
            let mut prefix = String::new();
            for (lower, length) in lower_bounds.iter().zip(lengths) {
                let _ = write!(prefix, "[{lower}:{}]", lower + *length as i32 - 1);
            }
            format!("('{prefix}=' || ({array})::text)::{}", column.sql_type)
        }
    }
}

/// `ARRAY[…]` of the next elements, nested per `lengths`.
fn nest(lengths: &[usize], elements: &mut impl Iterator<Item = String>) -> String {
    let items: Vec<String> = match lengths {
        [] => return elements.next().expect("enough elements"),
        [length, inner @ ..] => (0..*length).map(|_| nest(inner, elements)).collect(),
    };
    format!("ARRAY[{}]", items.join(","))
}

/// The probe table's database, connection, and columns with their type OIDs.
struct Probe {
    _dbs: TestDbs,
    client: Client,
    columns: Vec<Column>,
    specs: Vec<ColumnSpec>,
}

impl Probe {
    async fn new(columns: Vec<Column>) -> Self {
        let dbs = TestDbs::new().await;
        let client = dbs.source().await;
        let definitions: Vec<String> = columns
            .iter()
            .map(|c| format!("{} {}", c.name, c.sql_type))
            .collect();
        client
            .batch_execute(&format!(
                "CREATE TYPE mood AS ENUM ('sad', 'ok', 'a \"b\", {{c}}');
                 CREATE DOMAIN positive AS int8 CHECK (VALUE > 0);
                 CREATE TABLE probe (id int8 PRIMARY KEY, {});
                 {SESSION}",
                definitions.join(", ")
            ))
            .await
            .expect("create the probe table");
        // The OIDs the server gives the columns, as pgoutput's Relation message would.
        let oids: Vec<(String, u32)> = client
            .query(
                "SELECT attname::text, atttypid FROM pg_attribute
                 WHERE attrelid = 'probe'::regclass AND attnum > 0 ORDER BY attnum",
                &[],
            )
            .await
            .expect("read the columns' types")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let specs = oids
            .iter()
            .map(|(name, oid)| ColumnSpec::new(name, *oid))
            .collect();
        Self {
            _dbs: dbs,
            client,
            columns,
            specs,
        }
    }

    /// Inserts `rows`, reads them back as the server prints them, encodes them and checks
    /// every value; rolls the insert back.
    async fn check(&self, rows: &[Vec<Cell>]) -> Result<(), TestCaseError> {
        let values: Vec<String> = rows
            .iter()
            .enumerate()
            .map(|(id, cells)| {
                let sql: Vec<String> = cells
                    .iter()
                    .zip(&self.columns)
                    .map(|(cell, column)| cell_sql(cell, column))
                    .collect();
                format!("({id}, {})", sql.join(", "))
            })
            .collect();
        let names: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        let arrays: Vec<(usize, &Column)> = self
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.array)
            .collect();
        let dims: Vec<String> = arrays
            .iter()
            .map(|(_, c)| format!("array_dims({})", c.name))
            .collect();
        let elements: Vec<String> = arrays
            .iter()
            .map(|(i, c)| {
                format!(
                    "SELECT {i}, id, n, e IS NULL, format('%s', e) \
                     FROM probe, unnest({}) WITH ORDINALITY AS u(e, n)",
                    c.name
                )
            })
            .collect();
        let sql = format!(
            "BEGIN; INSERT INTO probe (id, {names}) VALUES {values};
             SELECT id, {names}, {dims} FROM probe ORDER BY id;
             {elements} ORDER BY 1, 2, 3;
             ROLLBACK",
            names = names.join(", "),
            values = values.join(", "),
            dims = dims.join(", "),
            elements = elements.join(" UNION ALL "),
        );
        let outcome = self.client.simple_query(&sql).await;
        if outcome.is_err() {
            // The failed statement left the transaction open and aborted.
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        let messages = outcome.map_err(|e| {
            let detail = e.as_db_error().map(|d| d.message().to_string());
            TestCaseError::fail(format!("{e}: {detail:?}\n{sql}"))
        })?;
        // The two SELECTs' rows, told apart by their width.
        let width = 1 + self.columns.len() + arrays.len();
        let mut printed_rows = Vec::new();
        // (column index, row id) → the elements' printed text, in row-major order.
        let mut printed_elements: BTreeMap<(usize, usize), Vec<Option<String>>> = BTreeMap::new();
        for message in &messages {
            let SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            if row.len() == width {
                printed_rows.push(row);
            } else {
                let column: usize = row.get(0).unwrap().parse().unwrap();
                let id: usize = row.get(1).unwrap().parse().unwrap();
                let text = (row.get(3) == Some("f")).then(|| row.get(4).unwrap().to_string());
                printed_elements.entry((column, id)).or_default().push(text);
            }
        }
        prop_assert_eq!(printed_rows.len(), rows.len());

        for (id, (cells, printed)) in rows.iter().zip(printed_rows).enumerate() {
            let texts: Vec<Option<&str>> =
                (0..=self.columns.len()).map(|i| printed.get(i)).collect();
            let mut out = Vec::new();
            encode::encode_row(
                &mut out,
                &self.specs,
                texts.iter().map(|t| t.map(str::as_bytes)),
            );
            let json: Value = serde_json::from_slice(&out).map_err(|e| {
                TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&out)))
            })?;
            prop_assert_eq!(&json["id"], &Value::from(id));
            let mut dims = texts.len();
            for (i, (column, cell)) in self.columns.iter().zip(cells).enumerate() {
                let text = texts[i + 1];
                let image = &json[&column.name];
                let context = || format!("{} {}: {text:?} → {image}", column.name, column.sql_type);
                if !column.array {
                    let known = match cell {
                        Cell::Scalar(literal) => Some(&literal.known),
                        _ => None,
                    };
                    check_value(column.rule, text, known, image)
                        .map_err(|e| TestCaseError::fail(format!("{}: {e}", context())))?;
                    continue;
                }
                let dims_text = printed.get(dims);
                dims += 1;
                let elements = printed_elements.remove(&(i, id)).unwrap_or_default();
                check_array(column.rule, cell, dims_text, &elements, image)
                    .map_err(|e| TestCaseError::fail(format!("{}: {e}", context())))?;
            }
        }
        Ok(())
    }
}

/// `image` is the faithful image of the server's `printed` text by `rule`, and the
/// value generated, when it is `known`.
fn check_value(
    rule: Rule,
    printed: Option<&str>,
    known: Option<&Known>,
    image: &Value,
) -> Result<(), String> {
    let Some(printed) = printed else {
        return match image {
            Value::Null if known.is_none() => Ok(()),
            _ => Err("NULL must be null, and only NULL".into()),
        };
    };
    match rule {
        Rule::Number => match image {
            Value::String(s) if ["NaN", "Infinity", "-Infinity"].contains(&printed) => {
                ensure(s == printed, "NaN/Infinity as the same string")
            }
            Value::Number(n) => ensure(n.as_str() == printed, "the printed digits"),
            _ => Err("a number".into()),
        },
        Rule::Bool => ensure(
            *image == Value::Bool(printed == "t") && (printed == "t" || printed == "f"),
            "true for t, false for f",
        ),
        Rule::Json => {
            let server: Value = serde_json::from_str(printed).map_err(|e| e.to_string())?;
            ensure(*image == server, "the server's JSON")
        }
        Rule::Bytea => {
            let Value::String(b64) = image else {
                return Err("a base64 string".into());
            };
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| e.to_string())?;
            let server = encode::decode_bytea_hex(printed.as_bytes()).ok_or("hex")?;
            ensure(bytes == server, "the printed bytes")
        }
        Rule::Text => ensure(*image == Value::String(printed.into()), "the printed text"),
    }?;
    match known {
        None | Some(Known::Printed) => Ok(()),
        Some(Known::Integer(n)) => ensure(
            matches!(image, Value::Number(number) if number.as_str() == n.to_string()),
            "the integer",
        ),
        Some(Known::Float4(v)) => ensure(
            float_image(image, f64::from(*v), |t| t.parse::<f32>().map(f64::from)),
            "the float4",
        ),
        Some(Known::Float8(v)) => {
            ensure(float_image(image, *v, |t| t.parse::<f64>()), "the float8")
        }
        Some(Known::Bool(b)) => ensure(*image == Value::Bool(*b), "the bool"),
        Some(Known::Bytes(bytes)) => ensure(
            *image == Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            "base64 of the bytes inserted",
        ),
        Some(Known::Text(t)) => ensure(*image == Value::String(t.clone()), "the text inserted"),
        Some(Known::Json(v)) => ensure(image == v, "the JSON inserted"),
    }
}

/// A float's image is the same value: the same bits (so `-0` stays `-0`), or the string
/// of a non-finite value.
fn float_image<E>(image: &Value, value: f64, parse: impl Fn(&str) -> Result<f64, E>) -> bool {
    match image {
        Value::String(s) if value.is_nan() => s == "NaN",
        Value::String(s) if value.is_infinite() => {
            s == if value > 0.0 { "Infinity" } else { "-Infinity" }
        }
        Value::Number(n) => parse(n.as_str()).is_ok_and(|v| v.to_bits() == value.to_bits()),
        _ => false,
    }
}

/// An array's image: nested JSON arrays of the dimensions the server reports (lower
/// bounds dropped), whose elements in row-major order are the images of the elements
/// the server prints (`unnest`), and of those generated.
fn check_array(
    rule: Rule,
    cell: &Cell,
    dims_text: Option<&str>,
    printed: &[Option<String>],
    image: &Value,
) -> Result<(), String> {
    let Cell::Array {
        lengths,
        lower_bounds,
        elements,
    } = cell
    else {
        return check_value(rule, None, None, image);
    };
    // The server's dimensions are those generated (a check of the test itself).
    let expected_dims = (!lengths.is_empty()).then(|| {
        lengths
            .iter()
            .zip(lower_bounds)
            .map(|(n, l)| format!("[{l}:{}]", l + *n as i32 - 1))
            .collect::<String>()
    });
    ensure(
        dims_text == expected_dims.as_deref(),
        "the dimensions generated",
    )?;
    let mut flat = Vec::new();
    flatten(image, lengths, &mut flat)?;
    ensure(flat.len() == printed.len(), "as many elements as unnest")?;
    for ((image, printed), known) in flat.iter().zip(printed).zip(elements) {
        check_value(
            rule,
            printed.as_deref(),
            known.as_ref().map(|l| &l.known),
            image,
        )
        .map_err(|e| format!("element {printed:?} → {image}: {e}"))?;
    }
    Ok(())
}

/// The elements of nested arrays of `lengths`, row-major; `[]` for an empty array.
fn flatten<'v>(
    image: &'v Value,
    lengths: &[usize],
    flat: &mut Vec<&'v Value>,
) -> Result<(), String> {
    let Value::Array(items) = image else {
        return Err(format!("an array, not {image}"));
    };
    match lengths {
        [] => ensure(items.is_empty(), "an empty array"),
        [length] => {
            ensure(items.len() == *length, "the dimension's length")?;
            flat.extend(items);
            Ok(())
        }
        [length, inner @ ..] => {
            ensure(items.len() == *length, "the dimension's length")?;
            items.iter().try_for_each(|item| flatten(item, inner, flat))
        }
    }
}

fn ensure(holds: bool, what: &str) -> Result<(), String> {
    if holds {
        Ok(())
    } else {
        Err(format!("not {what}"))
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn every_type_encodes_to_the_image_of_the_servers_own_text() {
    let runtime = runtime();
    let types = types();
    let probe = runtime.block_on(Probe::new(columns(&types)));
    let rows = prop::collection::vec(cells(&types), ROWS);
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&rows, |rows| runtime.block_on(probe.check(&rows)));
    if let Err(error) = outcome {
        panic!("{error}");
    }
}

/// `encode::ARRAY_ELEMENT_OIDS` is the server's own catalog: each array type's element
/// type, and `,` between elements.
#[test]
fn array_element_oids_are_the_catalogs() {
    let runtime = runtime();
    runtime.block_on(async {
        let client = common::connect(common::PG_START_ADMIN).await;
        for (array, element) in encode::ARRAY_ELEMENT_OIDS {
            let row = client
                .query_one(
                    "SELECT a.typelem, e.typdelim::text FROM pg_type a
                     JOIN pg_type e ON e.oid = a.typelem WHERE a.oid = $1",
                    &[&array],
                )
                .await
                .unwrap_or_else(|e| panic!("array type {array}: {e}"));
            assert_eq!(row.get::<_, u32>(0), element, "element of {array}");
            assert_eq!(row.get::<_, String>(1), ",", "delimiter of {array}");
        }
    });
}

/// The outbox of the end-to-end test: a row of the common types and arrays of them.
const TYPED_OUTBOX: &str = "CREATE TABLE public.typed_outbox (
    id int8 PRIMARY KEY, n numeric, f8 float8, f4 float4, b bool, j json, jb jsonb,
    by bytea, u uuid, t text, ts timestamp, tstz timestamptz, d date, tm timetz,
    iv interval, na numeric[], fa float8[], ta text[], ia int4[], ba bytea[], ja jsonb[],
    tsa timestamptz[], other_day interval[])";

/// Rows `first..first + 3` of the end-to-end test, with NULLs, specials and escapes.
fn typed_rows(first: i64) -> String {
    let row = |id: i64| {
        format!(
            r#"({id}, {id}.10 * 10 ^ {id}, 1.0 / {id}, 'NaN', {id} % 2 = 0,
              '{{"k": [1.50, "\\\""]}}', '{{"b": 1e{id}, "a": null}}', '\x00ff{id:02x}',
              gen_random_uuid(), E'l\u00e9 "q" \\ {id}', '2025-07-23 20:06:21.08533',
              '2025-07-23 20:06:21.08533+05:30', 'infinity', '12:00+05:30',
              '1 year 2 mons -3 days 04:05:06.7', ARRAY[1.10, 'NaN', NULL],
              ARRAY['-Infinity', 1e-300]::float8[], '[0:2]={{NULL,"NULL","a,\"b}}"}}',
              '{{{{1,2}},{{3,{id}}}}}', ARRAY['\x'::bytea, '\x0a'],
              ARRAY['{{"x": "}}"}}'::jsonb, 'null'], ARRAY[now()], ARRAY['-1 day'::interval])"#
        )
    };
    (first..first + 3).map(row).collect::<Vec<_>>().join(", ")
}

/// Through the relay itself: rows read from the slot's snapshot and rows streamed by
/// pgoutput reach Kafka exactly as `encode_row` makes them of the text this test reads,
/// although the database's own settings print every one of these types differently.
#[tokio::test(flavor = "multi_thread")]
async fn the_relay_encodes_snapshot_and_streamed_rows_alike_whatever_the_servers_settings() {
    let p = common::connector::KafkaPipeline::new().await;
    p.dbs
        .source()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET TimeZone = 'Asia/Kolkata';
             ALTER DATABASE {db} SET DateStyle = 'SQL, DMY';
             ALTER DATABASE {db} SET IntervalStyle = 'iso_8601';
             ALTER DATABASE {db} SET bytea_output = 'escape';
             ALTER DATABASE {db} SET extra_float_digits = 0;
             {TYPED_OUTBOX};
             INSERT INTO public.typed_outbox VALUES {rows}",
            db = p.dbs.name,
            rows = typed_rows(1),
        ))
        .await
        .expect("create and fill the typed outbox");
    let publication = common::random_name("typed");
    let _connector = p.spawn_connector(
        &[
            "--table",
            "public.typed_outbox",
            "--key-column",
            "id",
            "--publication",
            &publication,
        ],
        &[],
    );
    // A new session has the database's settings; the rows after the snapshot.
    let source = p.dbs.source().await;
    let datestyle: String = source
        .query_one("SHOW DateStyle", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(datestyle, "SQL, DMY");
    common::wait_until(
        "the connector's slot",
        std::time::Duration::from_secs(120),
        || async {
            let slots = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1";
            let n: i64 = source.query_one(slots, &[&p.slot]).await.unwrap().get(0);
            n == 1
        },
    )
    .await;
    source
        .batch_execute(&format!(
            "INSERT INTO public.typed_outbox VALUES {}",
            typed_rows(4)
        ))
        .await
        .unwrap();

    // What the relay must have written: the rows as this session prints them with the
    // relay's settings, encoded.
    source.batch_execute(SESSION).await.unwrap();
    let specs: Vec<ColumnSpec> = source
        .query(
            "SELECT attname::text, atttypid FROM pg_attribute
             WHERE attrelid = 'public.typed_outbox'::regclass AND attnum > 0 ORDER BY attnum",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| ColumnSpec::new(r.get(0), r.get(1)))
        .collect();
    let mut expected = BTreeMap::new();
    for message in source
        .simple_query("SELECT * FROM public.typed_outbox")
        .await
        .unwrap()
    {
        let SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        let mut value = Vec::new();
        encode::encode_row(
            &mut value,
            &specs,
            (0..specs.len()).map(|i| row.get(i).map(str::as_bytes)),
        );
        expected.insert(row.get(0).unwrap().as_bytes().to_vec(), value);
    }
    assert_eq!(expected.len(), 6);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let records = loop {
        let topic = p.topic.clone();
        let records = tokio::task::spawn_blocking(move || common::read_topic(&topic))
            .await
            .unwrap();
        if records.len() >= expected.len() {
            break records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {} rows reached Kafka",
            records.len(),
            expected.len()
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    let written: BTreeMap<Vec<u8>, Vec<u8>> = records
        .into_iter()
        .map(|r| (r.key.expect("keyed by id"), r.value))
        .collect();
    for (id, value) in &expected {
        let got = written.get(id).map(|v| String::from_utf8_lossy(v));
        assert_eq!(
            got.as_deref(),
            Some(String::from_utf8_lossy(value).as_ref()),
            "row {}",
            String::from_utf8_lossy(id)
        );
    }
    assert_eq!(written.len(), expected.len());
}
