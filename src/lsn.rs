//! PostgreSQL write-ahead-log positions (`pg_lsn`).
//!
//! An [`Lsn`] is a 64-bit byte position in the WAL. PostgreSQL prints it as
//! two hexadecimal numbers separated by a slash: the upper 32 bits, then the
//! lower 32 bits, both uppercase and without zero padding (`16/B374D848`).
//! [`Lsn`]'s `Display` and `Debug` use exactly that form, and its `FromStr`
//! accepts it back (hex digits of either case, 1 to 8 per half, as
//! PostgreSQL's own `pg_lsn` input does). Ordering is plain numeric ordering
//! of the 64-bit value, so a later WAL position always compares greater.

use std::fmt;
use std::str::FromStr;

/// A position in the PostgreSQL write-ahead log.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`, PostgreSQL's `InvalidXLogRecPtr`: "no position".
    pub const ZERO: Lsn = Lsn(0);

    /// Wraps a raw 64-bit WAL position.
    pub const fn new(value: u64) -> Self {
        Lsn(value)
    }

    /// The raw 64-bit WAL position.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// True for `0/0`, which PostgreSQL uses to mean "no position".
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl From<u64> for Lsn {
    fn from(value: u64) -> Self {
        Lsn(value)
    }
}

impl From<Lsn> for u64 {
    fn from(lsn: Lsn) -> Self {
        lsn.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let high = self.0 >> 32;
        let low = self.0 & 0xFFFF_FFFF;
        write!(f, "{high:X}/{low:X}")
    }
}

impl fmt::Debug for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The text given to [`Lsn::from_str`] was not of the form `XXXXXXXX/XXXXXXXX`.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error(
    "invalid LSN {input:?}: expected two hexadecimal numbers of 1 to 8 digits \
     separated by '/', such as \"16/B374D848\""
)]
pub struct ParseLsnError {
    /// The rejected text.
    pub input: String,
}

/// Parses one half of an LSN: 1 to 8 ASCII hex digits, nothing else (no sign,
/// no `0x`, no whitespace).
fn parse_half(half: &str) -> Option<u64> {
    if half.is_empty() || half.len() > 8 || !half.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(half, 16).ok().map(u64::from)
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError {
            input: s.to_owned(),
        };
        let (high, low) = s.split_once('/').ok_or_else(err)?;
        let high = parse_half(high).ok_or_else(err)?;
        let low = parse_half(low).ok_or_else(err)?;
        Ok(Lsn((high << 32) | low))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_like_postgres() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(format!("{:?}", Lsn(0x16_B374_D848)), "16/B374D848");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!(Lsn(0x0154_7C68).to_string(), "0/1547C68");
        assert_eq!(Lsn(1 << 32).to_string(), "1/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn round_trips() {
        for value in [
            0,
            1,
            0xFFFF_FFFF,
            1 << 32,
            0x16_B374_D848,
            0x1_2345_ABCD,
            u64::MAX,
            u64::MAX - 1,
        ] {
            let lsn = Lsn::new(value);
            let parsed: Lsn = lsn.to_string().parse().unwrap();
            assert_eq!(parsed, lsn);
            assert_eq!(parsed.as_u64(), value);
            assert_eq!(u64::from(parsed), value);
            assert_eq!(Lsn::from(value), lsn);
        }
    }

    #[test]
    fn parses_lowercase_and_padded() {
        assert_eq!("16/b374d848".parse::<Lsn>().unwrap(), Lsn(0x16_B374_D848));
        assert_eq!("00000000/00000001".parse::<Lsn>().unwrap(), Lsn(1));
    }

    #[test]
    fn orders_numerically() {
        let a: Lsn = "0/FFFFFFFF".parse().unwrap();
        let b: Lsn = "1/0".parse().unwrap();
        let c: Lsn = "A/0".parse().unwrap();
        let d: Lsn = "10/0".parse().unwrap();
        assert!(Lsn::ZERO < a && a < b && b < c && c < d);
        let mut v = vec![d, Lsn::ZERO, c, a, b];
        v.sort();
        assert_eq!(v, vec![Lsn::ZERO, a, b, c, d]);
    }

    #[test]
    fn zero() {
        assert!(Lsn::ZERO.is_zero());
        assert!(Lsn::default().is_zero());
        assert!(!Lsn(1).is_zero());
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "/",
            "16",
            "16/",
            "/B374D848",
            "16/B374D848/0",
            "16:B374D848",
            "G/0",
            "0/G",
            "+1/0",
            "0/-1",
            " 1/0",
            "1/0 ",
            "0x1/0",
            "123456789/0",
            "0/123456789",
            "1/½",
        ] {
            let err = bad.parse::<Lsn>().unwrap_err();
            assert_eq!(err.input, bad);
            let msg = err.to_string();
            assert!(msg.contains("16/B374D848"), "{msg}");
            assert!(msg.contains("hexadecimal"), "{msg}");
        }
    }
}
