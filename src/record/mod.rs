//! The wire format of a relayed record, both ways: what the connector writes to Kafka
//! and what the sink (and direct mode's dead letters) read back. Pure, no I/O.
//!
//! One outbox row is one record:
//! - **value**: the row as a JSON object, each column the faithful JSON image of the
//!   text PostgreSQL printed for it, by one rule per type ([`encode`]); read back,
//!   together with the seed's and Debezium's shapes, by [`decode`];
//! - **key**: the key column's text, as is (the connector's `--key-column`);
//! - **headers**: the source transaction's commit LSN ([`HEADER_LSN`]), xid
//!   ([`HEADER_XID`]) and commit time ([`HEADER_COMMIT_TS`], RFC 3339 in UTC), the same
//!   on every record of that transaction ([`txn_headers`]); a backfill's records carry
//!   [`HEADER_BACKFILL`] instead of the last two.
//!
//! Invariant: whatever the connector writes, the sink reads back to the same row; a
//! header's name and form are defined here and nowhere else, so the two sides share a
//! format and not each other's internals.

pub mod decode;
pub mod encode;

use rdkafka::message::{Header, OwnedHeaders};

use crate::lsn::Lsn;

/// The source transaction's commit end LSN, `X/X`.
pub const HEADER_LSN: &str = "outbox-relay.lsn";
/// The source transaction's id.
pub const HEADER_XID: &str = "outbox-relay.xid";
/// The source transaction's commit time, RFC 3339 in UTC with microseconds.
pub const HEADER_COMMIT_TS: &str = "outbox-relay.commit-ts";
/// On the records of an on-demand backfill (rows sent again, see
/// `crate::pipeline::backfill`): its id. Their [`HEADER_LSN`] is the stream's position
/// when they were sent, and they have no xid and no commit time.
pub const HEADER_BACKFILL: &str = "outbox-relay.backfill";

/// Headers of one source transaction's records. `commit_time_micros` is PostgreSQL's:
/// microseconds since 2000-01-01.
pub fn txn_headers(lsn: Lsn, xid: Option<u32>, commit_time_micros: Option<i64>) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new().insert(Header {
        key: HEADER_LSN,
        value: Some(lsn.to_string().as_bytes()),
    });
    if let Some(xid) = xid {
        headers = headers.insert(Header {
            key: HEADER_XID,
            value: Some(xid.to_string().as_bytes()),
        });
    }
    if let Some(ts) = commit_time_micros.and_then(pg_micros_to_utc) {
        headers = headers.insert(Header {
            key: HEADER_COMMIT_TS,
            value: Some(
                ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                    .as_bytes(),
            ),
        });
    }
    headers
}

/// PostgreSQL's epoch is 2000-01-01; Unix time is 946684800 s later.
pub fn pg_micros_to_utc(micros: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp_micros(crate::pgoutput::unix_micros(micros)?)
}

/// A [`HEADER_LSN`] value, parsed; `None` when it is not an LSN.
pub fn header_lsn(value: &[u8]) -> Option<Lsn> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// A [`HEADER_COMMIT_TS`] value as Unix microseconds: the connector's form
/// (`…Z`, read without chrono), or any RFC 3339 time.
pub fn header_commit_time(value: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(value).ok()?;
    match text
        .strip_suffix('Z')
        .and_then(crate::apply::validate::plain_timestamp)
    {
        Some(utc) => Some(utc.unix_micros()),
        None => chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|t| t.timestamp_micros()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers as _;

    #[test]
    fn the_headers_written_are_read_back() {
        // 2025-07-23 20:06:21.085330 UTC in PostgreSQL's microseconds.
        let unix = chrono::DateTime::parse_from_rfc3339("2025-07-23T20:06:21.085330Z")
            .unwrap()
            .timestamp_micros();
        let pg = unix - 946_684_800_000_000;
        let headers = txn_headers(Lsn(0x16B3748), Some(42), Some(pg));
        let value = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .unwrap()
        };
        assert_eq!(header_lsn(value(HEADER_LSN)), Some(Lsn(0x16B3748)));
        assert_eq!(value(HEADER_XID), b"42");
        assert_eq!(header_commit_time(value(HEADER_COMMIT_TS)), Some(unix));
    }

    #[test]
    fn commit_times_are_read_in_either_form() {
        let expected = chrono::DateTime::parse_from_rfc3339("2025-07-23T20:06:21.085330Z")
            .unwrap()
            .timestamp_micros();
        assert_eq!(
            header_commit_time(b"2025-07-23T20:06:21.085330Z"),
            Some(expected)
        );
        assert_eq!(
            header_commit_time(b"2025-07-23T22:06:21.08533+02:00"),
            Some(expected)
        );
        assert_eq!(header_commit_time(b"yesterday"), None);
        assert_eq!(header_lsn(b"not an lsn"), None);
    }
}
