//! Checks, in Rust and before any SQL, that a record's values are ones PostgreSQL will
//! accept for `numeric` and `timestamp`, so that one bad value becomes one dead letter
//! instead of failing the statement that carries the whole batch.
//!
//! Invariant: whatever passes [`amount`] and [`created_at`] is accepted by
//! PostgreSQL's `numeric` and `timestamp` input functions. The checks are stricter than
//! PostgreSQL (no whitespace, no `NaN`/`Infinity`, no `BC`, 4-digit years), never
//! looser; anything unforeseen that still slips through is caught by the bisecting
//! fallback in [`super::apply`].

use std::fmt;

use chrono::format::{self, Item, Parsed, StrftimeItems};
use chrono::{Datelike, NaiveDateTime, Timelike};

/// At most this many digits in an amount (before and after the point together).
///
/// Far below PostgreSQL's `numeric` limits (131072 digits before the point, 16383
/// after), so that nothing that passes here overflows there, and far above any money.
pub const MAX_AMOUNT_DIGITS: usize = 1000;

/// The largest exponent magnitude accepted in an amount written as `1.5e3`.
pub const MAX_AMOUNT_EXPONENT: i32 = 1000;

/// The longest timestamp text accepted (`2025-07-23 20:06:21.085330` is 26 bytes).
pub const MAX_TIMESTAMP_LEN: usize = 40;

/// The timestamp forms PostgreSQL prints (`ISO` date style) and ISO 8601's `T` form.
pub const TIMESTAMP_FORMATS: [&str; 2] = ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"];

/// Why a value was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidValue {
    /// The field, as named in the record (`amount`, `created_at`).
    pub field: &'static str,
    /// What is wrong with it, without the value itself.
    pub reason: String,
}

impl fmt::Display for InvalidValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field, self.reason)
    }
}

impl std::error::Error for InvalidValue {}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidValue {
    InvalidValue {
        field,
        reason: reason.into(),
    }
}

/// Checks an amount and returns its canonical form: no `+`, no exponent, no leading
/// zeros, no trailing zeros after the point, no point if there is no fraction, `0`
/// for zero. Two amounts are equal as `numeric` exactly when their canonical forms are
/// equal.
///
/// Grammar: `[+-]? (digits [. digits?] | . digits) ([eE] [+-]? digits)?`.
pub fn amount(text: &str) -> Result<String, InvalidValue> {
    parse_amount(text).map(|decimal| decimal.canonical())
}

/// Checks an amount as [`amount`] does, without building its canonical form.
pub fn check_amount(text: &str) -> Result<(), InvalidValue> {
    parse_amount(text).map(|_| ())
}

/// A valid amount's parts, as written: `[-] int_digits . frac_digits × 10^exponent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount<'a> {
    pub negative: bool,
    /// ASCII digits before the point, leading zeros included (may be empty).
    pub int_digits: &'a str,
    /// ASCII digits after the point, trailing zeros included (may be empty).
    pub frac_digits: &'a str,
    /// Within ±[`MAX_AMOUNT_EXPONENT`].
    pub exponent: i32,
}

/// Checks an amount as [`amount`] does and returns its parts.
pub fn parse_amount(text: &str) -> Result<Amount<'_>, InvalidValue> {
    const FIELD: &str = "amount";
    let bytes = text.as_bytes();
    if bytes.is_empty() {
        return Err(invalid(FIELD, "is empty"));
    }
    let mut i = 0;
    let negative = match bytes[0] {
        b'-' => {
            i += 1;
            true
        }
        b'+' => {
            i += 1;
            false
        }
        _ => false,
    };
    let int_start = i;
    while i < bytes.len() && bytes[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = &text[int_start..i];
    let mut frac_digits = "";
    if i < bytes.len() && bytes[i] == b'.' {
        i += 1;
        let frac_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = &text[frac_start..i];
    }
    if int_digits.is_empty() && frac_digits.is_empty() {
        return Err(invalid(FIELD, "is not a decimal number"));
    }
    let mut exponent: i32 = 0;
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        i += 1;
        let exp_negative = match bytes.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let exp_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let exp_digits = &text[exp_start..i];
        if exp_digits.is_empty() {
            return Err(invalid(FIELD, "has an exponent without digits"));
        }
        let magnitude = exp_digits
            .trim_start_matches('0')
            .parse::<i32>()
            .ok()
            .or_else(|| exp_digits.bytes().all(|b| b == b'0').then_some(0))
            .filter(|m| *m <= MAX_AMOUNT_EXPONENT)
            .ok_or_else(|| {
                invalid(
                    FIELD,
                    format!("has an exponent beyond ±{MAX_AMOUNT_EXPONENT}"),
                )
            })?;
        exponent = if exp_negative { -magnitude } else { magnitude };
    }
    if i != bytes.len() {
        return Err(invalid(FIELD, "is not a decimal number"));
    }
    if int_digits.len() + frac_digits.len() > MAX_AMOUNT_DIGITS {
        return Err(invalid(
            FIELD,
            format!("has more than {MAX_AMOUNT_DIGITS} digits"),
        ));
    }

    Ok(Amount {
        negative,
        int_digits,
        frac_digits,
        exponent,
    })
}

impl Amount<'_> {
    /// The display scale `numeric_in` gives the amount: the digits written after the
    /// point, less the exponent, at least 0 (at most 2,000 for a valid amount).
    pub fn display_scale(&self) -> u16 {
        (self.frac_digits.len() as i64 - i64::from(self.exponent)).max(0) as u16
    }

    /// See [`amount`].
    pub fn canonical(&self) -> String {
        let Amount {
            negative,
            int_digits,
            frac_digits,
            exponent,
        } = *self;
        // digits × 10^(point - digits.len()), with `point` the position of the point.
        let digits: String = [int_digits, frac_digits].concat();
        let point = int_digits.len() as i64 + i64::from(exponent);
        let first = digits.find(|c| c != '0');
        let Some(first) = first else {
            return "0".to_string();
        };
        let last = digits.rfind(|c| c != '0').unwrap_or(first) + 1;
        let significant = &digits[first..last];
        // Position of the point relative to the first significant digit.
        let point = point - first as i64;
        let mut out = String::with_capacity(significant.len() + 8);
        if negative {
            out.push('-');
        }
        let len = significant.len() as i64;
        if point <= 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-point) as usize));
            out.push_str(significant);
        } else if point >= len {
            out.push_str(significant);
            out.extend(std::iter::repeat_n('0', (point - len) as usize));
        } else {
            out.push_str(&significant[..point as usize]);
            out.push('.');
            out.push_str(&significant[point as usize..]);
        }
        out
    }
}

/// A `timestamp without time zone` as PostgreSQL holds it: microseconds since
/// 2000-01-01 00:00:00.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The same instant read as UTC, in microseconds since 1970-01-01.
    pub fn unix_micros(self) -> i64 {
        self.0 + PG_EPOCH_DAYS * 86_400 * 1_000_000
    }
}

/// PostgreSQL's timestamp epoch, 2000-01-01, in days since 1970-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;

/// Checks a `timestamp without time zone` text and returns its value as
/// `timestamp_in` makes it: a fraction past six digits is rounded as PostgreSQL rounds
/// it ([`fraction_micros`]).
pub fn created_at(text: &str) -> Result<Timestamp, InvalidValue> {
    const FIELD: &str = "created_at";
    if text.len() > MAX_TIMESTAMP_LEN {
        return Err(invalid(
            FIELD,
            format!("is longer than {MAX_TIMESTAMP_LEN} bytes"),
        ));
    }
    // chrono accepts a sign and more than four year digits; PostgreSQL's ISO output
    // never has a sign, so refuse them rather than guess.
    if !text.as_bytes().first().is_some_and(u8::is_ascii_digit) {
        return Err(invalid(
            FIELD,
            "is not a timestamp (YYYY-MM-DD HH:MM:SS[.ffffff])",
        ));
    }
    if let Some(parsed) = plain_timestamp(text) {
        return Ok(parsed);
    }
    // The formats' items are parsed once (`parse_from_str` re-parses the format string
    // on every call, the largest single cost of a batch's validation). At most one
    // format can match (they differ in a literal), so the one whose separator the text
    // has is tried first.
    static ITEMS: std::sync::LazyLock<Vec<Vec<Item<'static>>>> = std::sync::LazyLock::new(|| {
        TIMESTAMP_FORMATS
            .iter()
            .map(|format| StrftimeItems::new(format).collect())
            .collect()
    });
    let order: [usize; 2] = match text.as_bytes().get(10) {
        Some(b'T') => [1, 0],
        _ => [0, 1],
    };
    let parsed = order
        .iter()
        .find_map(|&i| {
            let mut parsed = Parsed::new();
            format::parse(&mut parsed, text, ITEMS[i].iter()).ok()?;
            parsed.to_naive_datetime_with_offset(0).ok()
        })
        .ok_or_else(|| {
            invalid(
                FIELD,
                "is not a valid timestamp (YYYY-MM-DD HH:MM:SS[.ffffff])",
            )
        })?;
    if !(1..=9999).contains(&parsed.year()) {
        return Err(invalid(FIELD, "has a year outside 1..9999"));
    }
    // chrono reads `:60` as a leap second; PostgreSQL takes `:60` as the next minute
    // but refuses it with a fraction. Refused here either way.
    if parsed.nanosecond() >= 1_000_000_000 {
        return Err(invalid(FIELD, "has a leap second (:60)"));
    }
    Ok(read_by_chrono(text, parsed))
}

/// `text`'s value, from chrono's reading of it (`parsed`, no leap second) with the
/// fraction as PostgreSQL rounds it.
fn read_by_chrono(text: &str, parsed: NaiveDateTime) -> Timestamp {
    let seconds = parsed.and_utc().timestamp() - PG_EPOCH_DAYS * 86_400;
    let micros =
        fraction_micros(fraction(text)).unwrap_or_else(|| i64::from(parsed.nanosecond()) / 1000);
    Timestamp(seconds * 1_000_000 + micros)
}

/// The fraction of a validated timestamp text, from its point (the only one it has)
/// on, or `""`.
fn fraction(text: &str) -> &str {
    text.rfind('.').map_or("", |dot| &text[dot..])
}

/// `.ddd…` in microseconds as `timestamp_in` reads it: `rint(strtod(".ddd…") * 10^6)`
/// (`ParseFractionalSecond`). Both parsers round correctly to the nearest double, so
/// the double is the same, and `rint` in the default rounding mode rounds half to
/// even. Exact integer arithmetic up to six digits (the same result); `None` for no
/// digits.
fn fraction_micros(fraction: &str) -> Option<i64> {
    let digits = fraction.get(1..).filter(|d| !d.is_empty())?;
    if digits.len() <= 6 {
        let value = digits.bytes().try_fold(0i64, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0'))
        })?;
        return Some(value * 10i64.pow(6 - digits.len() as u32));
    }
    let value: f64 = format!("0{fraction}").parse().ok()?;
    Some((value * 1_000_000.0).round_ties_even() as i64)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (valid or not: the caller checks).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    // Howard Hinnant's `days_from_civil`: years start in March, so the leap day is last.
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The shape PostgreSQL and the connector print, `YYYY-MM-DD HH:MM:SS[.f]` (or with a
/// `T`), with a year in 1..=9999, at most 9 fraction digits and no leap second, read
/// with integer arithmetic (chrono's general parser was a tenth of the sink's
/// instructions, its date constructor a twentieth). `None` for anything else, valid or
/// not: [`created_at`] then asks chrono, which gives the same value wherever this
/// gives one (property test `the_plain_timestamp_path_agrees_with_chrono`).
pub fn plain_timestamp(text: &str) -> Option<Timestamp> {
    let b = text.as_bytes();
    if b.len() < 19 || b.len() == 20 || b.len() > 29 {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        b[range].iter().try_fold(0i64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0'))
        })
    };
    let separators = b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b' ' || b[10] == b'T')
        && b[13] == b':'
        && b[16] == b':';
    if !separators || (b.len() > 19 && b[19] != b'.') {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    let valid = (1..=9999).contains(&year)
        && (1..=month_days).contains(&day)
        && hour < 24
        && minute < 60
        && second < 60;
    if !valid {
        return None;
    }
    let micros = match b.len() {
        19 => 0,
        _ => fraction_micros(&text[19..])?,
    };
    let days = days_from_civil(year, month, day) - PG_EPOCH_DAYS;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(Timestamp(seconds * 1_000_000 + micros))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Timestamp-like text: mostly the plain shape, with any digit anywhere (impossible
    /// dates and times), either separator, 0 to 11 fraction digits, and now and then a
    /// wrong character.
    fn timestamp_like() -> impl Strategy<Value = String> {
        (
            (0u32..=9999, 0u32..=13, 0u32..=32, prop::bool::ANY),
            (0u32..=25, 0u32..=61, 0u32..=61),
            prop_oneof![Just(String::new()), "\\.[0-9]{0,11}"],
            prop::option::of((0usize..30, "[-:. T0-9xZ]")),
        )
            .prop_map(|((y, mo, d, t), (h, mi, s), fraction, edit)| {
                let separator = if t { 'T' } else { ' ' };
                let mut text = format!("{y:04}-{mo:02}-{d:02}{separator}{h:02}:{mi:02}:{s:02}");
                text.push_str(&fraction);
                if let Some((at, c)) = edit {
                    let at = at.min(text.len());
                    text.replace_range(at..(at + 1).min(text.len()), &c);
                }
                text
            })
    }

    proptest! {
        #[test]
        fn the_plain_timestamp_path_agrees_with_chrono(text in timestamp_like()) {
            if let Some(fast) = plain_timestamp(&text) {
                let order = if text.as_bytes().get(10) == Some(&b'T') { [1, 0] } else { [0, 1] };
                let chrono_says = order.iter().find_map(|&i| {
                    NaiveDateTime::parse_from_str(&text, TIMESTAMP_FORMATS[i]).ok()
                });
                prop_assert_eq!(Some(fast), chrono_says.map(|t| read_by_chrono(&text, t)), "{:?}", text);
            }
        }

        #[test]
        fn short_fractions_are_exact_and_agree_with_rounding_a_double(digits in "[0-9]{1,6}") {
            let exact = fraction_micros(&format!(".{digits}")).unwrap();
            let double: f64 = format!("0.{digits}").parse().unwrap();
            prop_assert_eq!(exact, (double * 1e6).round_ties_even() as i64);
        }

        #[test]
        fn amount_check_agrees_with_amount(text in "[-+]?[0-9]{0,4}(\\.[0-9]{0,3})?([eE][-+]?[0-9]{0,3})?x?") {
            prop_assert_eq!(check_amount(&text).is_ok(), amount(&text).is_ok());
        }
    }

    #[test]
    fn plain_timestamps_take_the_fast_path() {
        for text in [
            "2025-07-23 20:06:21.085330",
            "2025-07-23T20:06:21",
            "2024-02-29 00:00:00.1",
            "0001-01-01 00:00:00.123456789",
        ] {
            assert!(plain_timestamp(text).is_some(), "{text}");
        }
        for text in [
            "2025-07-23 20:06:60",
            "2025-02-30 00:00:00",
            "0000-01-01 00:00:00",
        ] {
            assert!(plain_timestamp(text).is_none(), "{text}");
        }
    }

    #[test]
    fn pre_parsed_timestamp_formats_accept_what_parse_from_str_accepts() {
        let reference = |text: &str| {
            TIMESTAMP_FORMATS
                .iter()
                .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        };
        for text in [
            "2025-07-23 20:06:21.085330",
            "2025-07-23T20:06:21.085330",
            "2025-07-23 20:06:21",
            "2025-07-23T20:06:21",
            "2025-07-23 20:06:21.1",
            "2025-02-30 20:06:21",
            "2025-07-23 24:00:00",
            "2025-07-23 20:06:60",
            "12345-07-23 20:06:21",
            "12345-07-23T20:06:21",
            "2025-07-23  20:06:21",
            "2025-07-23 20:06:21.",
            "2025-07-23 20:06:21.0853301234",
            "2025-07-23 20:06:21 ",
            "2025-07-23x20:06:21",
            "2025-7-3 2:6:1",
            "2025-07-23",
            "",
        ] {
            let ours = created_at(text).ok();
            let theirs = reference(text)
                .filter(|t| (1..=9999).contains(&t.year()) && t.nanosecond() < 1_000_000_000)
                .map(|t| read_by_chrono(text, t));
            assert_eq!(ours, theirs, "{text:?}");
        }
    }

    #[test]
    fn amounts_are_canonicalised() {
        for (text, canonical) in [
            ("50", "50"),
            ("-50", "-50"),
            ("+50", "50"),
            ("12.30", "12.3"),
            ("012.300", "12.3"),
            ("0", "0"),
            ("-0.000", "0"),
            (".5", "0.5"),
            ("5.", "5"),
            ("1e3", "1000"),
            ("1.5E+2", "150"),
            ("-1.5e-3", "-0.0015"),
            ("123.45e1", "1234.5"),
            ("0.00e5", "0"),
            ("1e-0", "1"),
            ("100e-2", "1"),
        ] {
            assert_eq!(amount(text).as_deref(), Ok(canonical), "{text}");
        }
    }

    #[test]
    fn bad_amounts_are_refused() {
        for text in [
            "",
            "-",
            "+",
            ".",
            "abc",
            "1.2.3",
            "1e",
            "1e+",
            " 1",
            "1 ",
            "NaN",
            "Infinity",
            "0x10",
            "1,5",
            "--1",
            "1e1001",
            "1e99999999999",
            "١٢",
        ] {
            assert!(amount(text).is_err(), "{text:?} should be refused");
        }
        assert!(amount(&"9".repeat(MAX_AMOUNT_DIGITS)).is_ok());
        assert!(amount(&"9".repeat(MAX_AMOUNT_DIGITS + 1)).is_err());
    }

    #[test]
    fn timestamps_in_postgres_forms_are_accepted() {
        for text in [
            "2025-07-23 20:06:21.085330",
            "2025-07-23 20:06:21",
            "2025-07-23T20:06:21.1",
            "2024-02-29 00:00:00",
        ] {
            assert!(created_at(text).is_ok(), "{text}");
        }
        assert_eq!(
            created_at("2025-07-23 20:06:21.085330").unwrap(),
            created_at("2025-07-23T20:06:21.08533").unwrap()
        );
    }

    #[test]
    fn timestamps_are_microseconds_from_2000_rounded_as_postgresql_rounds() {
        let micros = |text: &str| created_at(text).unwrap().0;
        assert_eq!(micros("2000-01-01 00:00:00"), 0);
        assert_eq!(micros("2000-01-01T00:00:01.5"), 1_500_000);
        assert_eq!(micros("1999-12-31 23:59:59.999999"), -1);
        assert_eq!(micros("2000-01-01 00:00:00.0000005"), 0, "half to even");
        assert_eq!(micros("2000-01-01 00:00:00.0000015"), 2, "half to even");
        assert_eq!(micros("2000-01-01 00:00:00.9999999"), 1_000_000);
        assert_eq!(micros("0001-01-01 00:00:00"), -63_082_281_600_000_000);
        assert_eq!(
            micros("2025-07-23 20:06:21.085330"),
            ((9335 * 86_400 + 20 * 3600 + 6 * 60 + 21) * 1_000_000) + 85_330
        );
        // The general parser's forms, with the same rounding.
        assert_eq!(
            micros("2025-7-3 2:6:1.0000005"),
            micros("2025-07-03 02:06:01")
        );
    }

    #[test]
    fn impossible_timestamps_are_refused() {
        for text in [
            "",
            "yesterday",
            "2025-02-30 00:00:00",
            "2023-02-29 00:00:00",
            "2025-13-01 00:00:00",
            "2025-07-23 25:00:00",
            "2025-07-23",
            "+2025-07-23 00:00:00",
            "12025-07-23 00:00:00",
            "2025-07-23 20:06:21 BC",
            "2016-12-31 23:59:60",
            "2016-12-31 23:59:60.5",
            "infinity",
            " 2025-07-23 20:06:21",
        ] {
            assert!(created_at(text).is_err(), "{text:?} should be refused");
        }
    }
}
