//! PostgreSQL's binary forms of a record's values, as a batch sends them to pg_end: the
//! rows of a binary `COPY` and the array parameters of the apply statements. Binary,
//! because parsing the text forms was a large share of pg_end's work per row, and a
//! binary `COPY` inserts a page's rows at once where an `INSERT` inserts them one by one.
//!
//! Invariant: the binary value sent for a text that passed [`super::validate`] is the
//! value PostgreSQL's own text input makes of that text: `numeric_in`'s digits and
//! display scale (`12.30` stays `12.30`), and `timestamp_in`'s microseconds (which
//! [`super::validate::created_at`] computes, a fraction past six digits rounded as
//! PostgreSQL rounds it). So a row is the same whichever client wrote it, as text or as binary, and
//! comparing a record with pg_end's row compares values. A test checks this against a
//! server for random texts (`tests/sink.rs::binary_values_are_what_postgres_makes_of_the_text`).

use std::error::Error;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_types::{accepts, to_sql_checked, IsNull, ToSql, Type};

use super::validate::{Amount, Timestamp};

/// `numeric`'s sign word for positive numbers (and zero), and for negative ones.
const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;

/// The start of a binary `COPY` stream: signature, flags, header extension length.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Writes `amount` in `numeric`'s binary form: digit count, weight, sign and display
/// scale (16 bits each), then the digits in base 10,000, the first of them weighing
/// 10,000^weight, without leading or trailing zero digits.
pub fn write_numeric(amount: &Amount<'_>, out: &mut impl BufMut) {
    let Amount {
        negative,
        int_digits,
        frac_digits,
        exponent,
    } = *amount;
    let exponent = i64::from(exponent);
    // Far below numeric's limit of 16383 for a valid amount.
    let dscale = amount.display_scale();
    let digits = |i: usize| -> u16 {
        let d = match i.checked_sub(int_digits.len()) {
            None => int_digits.as_bytes()[i],
            Some(j) => frac_digits.as_bytes()[j],
        };
        u16::from(d - b'0')
    };
    let count = int_digits.len() + frac_digits.len();
    let Some(first) = (0..count).find(|&i| digits(i) != 0) else {
        out.put_u16(0);
        out.put_i16(0);
        out.put_u16(NUMERIC_POS);
        out.put_u16(dscale);
        return;
    };
    let last = (first..count)
        .rev()
        .find(|&i| digits(i) != 0)
        .unwrap_or(first);
    // The digit at index i weighs 10^(point - 1 - i).
    let point = int_digits.len() as i64 + exponent;
    let power = |i: usize| point - 1 - i as i64;
    // Base-10,000 digit g holds the decimal powers 4g..=4g+3.
    let weight = power(first).div_euclid(4);
    let lowest = power(last).div_euclid(4);
    out.put_u16((weight - lowest + 1) as u16);
    out.put_i16(weight as i16);
    out.put_u16(if negative { NUMERIC_NEG } else { NUMERIC_POS });
    out.put_u16(dscale);
    // Powers fall by one per decimal digit, so the base-10,000 digit falls by at most one.
    let (mut group, mut value) = (weight, 0u16);
    for i in first..=last {
        let g = power(i).div_euclid(4);
        if g != group {
            out.put_u16(value);
            (group, value) = (g, 0);
        }
        value += digits(i) * 10u16.pow(power(i).rem_euclid(4) as u32);
    }
    out.put_u16(value);
}

/// A `numeric` parameter (an element of a `numeric[]`), sent in binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numeric<'a> {
    /// An amount as a record wrote it.
    Written(Amount<'a>),
    /// `value × 10^-scale`, with display scale `scale`.
    Scaled { value: i128, scale: u16 },
}

impl ToSql for Numeric<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match *self {
            Numeric::Written(amount) => write_numeric(&amount, out),
            Numeric::Scaled { value, scale } => {
                let digits = value.unsigned_abs().to_string();
                let amount = Amount {
                    negative: value < 0,
                    int_digits: &digits,
                    frac_digits: "",
                    exponent: -i32::from(scale),
                };
                write_numeric(&amount, out);
            }
        }
        Ok(IsNull::No)
    }

    accepts!(NUMERIC);
    to_sql_checked!();
}

/// A `timestamp` parameter (an element of a `timestamp[]`), sent in binary: its
/// microseconds since 2000-01-01.
impl ToSql for Timestamp {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_i64(self.0);
        Ok(IsNull::No)
    }

    accepts!(TIMESTAMP);
    to_sql_checked!();
}

/// One row of `main.transactions` for [`copy_rows`].
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub id: i64,
    pub account_id: i64,
    pub amount: Amount<'a>,
    pub created_at: Timestamp,
}

/// The whole binary `COPY main.transactions (id, account_id, amount, created_at)`
/// stream for `rows`: header, one tuple per row, trailer.
pub fn copy_rows<'a>(rows: impl ExactSizeIterator<Item = Row<'a>>) -> Bytes {
    // A tuple is 2 + 12 + 12 + 4 + 8 + 12 bytes, plus 2 per base-10,000 amount digit.
    let mut out = BytesMut::with_capacity(COPY_HEADER.len() + 2 + rows.len() * 56);
    out.put_slice(COPY_HEADER);
    for row in rows {
        out.put_i16(4);
        out.put_i32(8);
        out.put_i64(row.id);
        out.put_i32(8);
        out.put_i64(row.account_id);
        let length_at = out.len();
        out.put_i32(0);
        write_numeric(&row.amount, &mut out);
        let length = (out.len() - length_at - 4) as i32;
        out[length_at..length_at + 4].copy_from_slice(&length.to_be_bytes());
        out.put_i32(8);
        out.put_i64(row.created_at.0);
    }
    out.put_i16(-1);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::validate::parse_amount;

    /// (weight, sign, dscale, digits) of an amount's binary form.
    fn numeric(text: &str) -> (i16, u16, u16, Vec<u16>) {
        let mut out = Vec::new();
        write_numeric(&parse_amount(text).unwrap(), &mut out);
        let word = |i: usize| u16::from_be_bytes([out[2 * i], out[2 * i + 1]]);
        let count = usize::from(word(0));
        assert_eq!(out.len(), 8 + 2 * count, "{text}");
        let digits = (0..count).map(|i| word(4 + i)).collect();
        (word(1) as i16, word(2), word(3), digits)
    }

    #[test]
    fn numerics_are_encoded_as_numeric_in_reads_them() {
        for (text, expected) in [
            ("0", (0, NUMERIC_POS, 0, vec![])),
            ("-0.00", (0, NUMERIC_POS, 2, vec![])),
            ("7", (0, NUMERIC_POS, 0, vec![7])),
            ("-50", (0, NUMERIC_NEG, 0, vec![50])),
            ("12.30", (0, NUMERIC_POS, 2, vec![12, 3000])),
            ("10000", (1, NUMERIC_POS, 0, vec![1])),
            (
                "123456789.5",
                (2, NUMERIC_POS, 1, vec![1, 2345, 6789, 5000]),
            ),
            ("0.0001", (-1, NUMERIC_POS, 4, vec![1])),
            (".00001", (-2, NUMERIC_POS, 5, vec![1000])),
            ("1.5e2", (0, NUMERIC_POS, 0, vec![150])),
            ("1.50e-2", (-1, NUMERIC_POS, 4, vec![150])),
            ("-1e8", (2, NUMERIC_NEG, 0, vec![1])),
            ("0012.000", (0, NUMERIC_POS, 3, vec![12])),
        ] {
            assert_eq!(numeric(text), expected, "{text}");
        }
    }

    #[test]
    fn a_copy_stream_has_header_tuples_and_trailer() {
        let amount = parse_amount("-2.5").unwrap();
        let row = Row {
            id: 1,
            account_id: 2,
            amount,
            created_at: Timestamp(3),
        };
        let stream = copy_rows([row, row].into_iter());
        // -2.5 is two base-10,000 digits, 2 and 5000: 8 + 4 bytes.
        let tuple = 2 + 12 + 12 + 4 + 12 + 12;
        assert_eq!(stream.len(), COPY_HEADER.len() + 2 * tuple + 2);
        assert!(stream.starts_with(b"PGCOPY\n\xff\r\n\0"));
        assert!(stream.ends_with(&[0xff, 0xff]));
        let first = &stream[COPY_HEADER.len()..];
        assert_eq!(&first[26..30], &12i32.to_be_bytes(), "the amount's length");
    }
}
