//! Decoder for the `pgoutput` logical replication output plugin, protocol
//! version 1 (PostgreSQL's "Logical Replication Message Formats").
//!
//! Invariant: this module is pure and total. It does no I/O, keeps no global
//! state, and [`decode`] never panics on any input, however short, long or
//! malformed: every read is checked (`get`, `split_first_chunk`,
//! `split_at_checked`, `checked_*`/`saturating_*` arithmetic, `try_from` for
//! lengths), there is no `unwrap`/`expect`/indexing/slicing that can panic, and
//! no length or count taken from the input is used in unchecked arithmetic or
//! trusted for an allocation size. Bad input yields a [`DecodeError`] that
//! names the message (`"Insert"`, `"Relation"`, ...) and the field that
//! failed. The clippy `deny` list below enforces the mechanical half of this.
//!
//! Layout reminders (all integers big-endian, strings NUL-terminated):
//! protocol v1 DML/`Relation`/`Type`/`Message` carry no xid (that is v2
//! streaming, which is not supported: its message types are rejected as
//! [`DecodeError::UnknownMessageType`]). Column values are zero-copy
//! [`Bytes`] slices of the input buffer, so decoding a row costs one `Vec`
//! allocation plus one reference-count increment per `t`/`b` value.

#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]

mod reader;

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::arithmetic_side_effects
)]
mod tests;

use std::collections::HashMap;
use std::fmt;

use bytes::Bytes;

use crate::lsn::Lsn;
use reader::Reader;

/// Microseconds from the Unix epoch to the PostgreSQL epoch (2000-01-01 UTC).
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A PostgreSQL time (µs since 2000-01-01) as µs since the Unix epoch.
pub fn unix_micros(pg_micros: i64) -> Option<i64> {
    pg_micros.checked_add(PG_EPOCH_UNIX_MICROS)
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    /// `B`: start of a transaction.
    Begin(Begin),
    /// `C`: end of a transaction.
    Commit(Commit),
    /// `O`: the transaction was replayed from another node (replication origin).
    Origin(Origin),
    /// `R`: schema of a relation; sent before its first change in a session
    /// and again whenever PostgreSQL invalidates its cached schema.
    Relation(Relation),
    /// `Y`: a non-builtin type used by a column (e.g. an enum).
    Type(TypeMsg),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: one or more relations were truncated.
    Truncate(Truncate),
    /// `M`: a message from `pg_logical_emit_message`.
    Message(LogicalDecodingMessage),
}

impl LogicalMessage {
    /// The message's name as used in [`DecodeError`]s ("Begin", "Insert", ...).
    pub fn name(&self) -> &'static str {
        match self {
            LogicalMessage::Begin(_) => "Begin",
            LogicalMessage::Commit(_) => "Commit",
            LogicalMessage::Origin(_) => "Origin",
            LogicalMessage::Relation(_) => "Relation",
            LogicalMessage::Type(_) => "Type",
            LogicalMessage::Insert(_) => "Insert",
            LogicalMessage::Update(_) => "Update",
            LogicalMessage::Delete(_) => "Delete",
            LogicalMessage::Truncate(_) => "Truncate",
            LogicalMessage::Message(_) => "Message",
        }
    }
}

/// `B` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC. For a transaction
    /// replayed with a replication origin this is the origin's timestamp.
    pub commit_time_micros: i64,
    /// Transaction id.
    pub xid: u32,
}

impl Begin {
    /// [`Self::commit_time_micros`] as microseconds since the Unix epoch.
    pub fn commit_time_unix_micros(&self) -> Option<i64> {
        unix_micros(self.commit_time_micros)
    }
}

/// `C` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Unused by PostgreSQL so far (always 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End LSN of the transaction: the position to confirm once it is applied.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time_micros: i64,
}

impl Commit {
    /// [`Self::commit_time_micros`] as microseconds since the Unix epoch.
    pub fn commit_time_unix_micros(&self) -> Option<i64> {
        unix_micros(self.commit_time_micros)
    }
}

/// `O` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// LSN of the commit on the origin server.
    pub commit_lsn: Lsn,
    /// Name of the replication origin.
    pub name: String,
}

/// `R` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation OID; the `rel_id` that DML messages refer to.
    pub rel_id: u32,
    /// Schema name; the empty string means `pg_catalog`.
    pub namespace: String,
    /// Relation name.
    pub name: String,
    /// `relreplident`: `b'd'` default (primary key), `b'n'` nothing,
    /// `b'f'` full, `b'i'` index.
    pub replica_identity: u8,
    /// Published columns, in the order tuples list them.
    pub columns: Vec<Column>,
}

impl Relation {
    /// Position of the column called `name` (exact, case-sensitive match),
    /// which is also its position in this relation's [`TupleData`].
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Bit 1 set: the column is part of the replica identity key.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// OID of the column's type.
    pub type_oid: u32,
    /// `atttypmod`, -1 when the type has none.
    pub type_modifier: i32,
}

impl Column {
    /// True when the column is part of the replica identity key.
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// `Y` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMsg {
    /// OID of the type.
    pub type_oid: u32,
    /// Schema name; the empty string means `pg_catalog`.
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// `I` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// OID of the relation (see [`Relation::rel_id`]).
    pub rel_id: u32,
    /// The new row.
    pub new: TupleData,
}

/// `U` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// OID of the relation (see [`Relation::rel_id`]).
    pub rel_id: u32,
    /// Old key (`K`): present when the update changed a replica identity
    /// key column; non-key columns are [`ColumnValue::Null`].
    pub key: Option<TupleData>,
    /// Whole old row (`O`): present for `REPLICA IDENTITY FULL`.
    pub old: Option<TupleData>,
    /// The new row. Columns stored out of line and left unchanged are
    /// [`ColumnValue::UnchangedToast`].
    pub new: TupleData,
}

/// `D` message. Exactly one of `key` and `old` is `Some`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// OID of the relation (see [`Relation::rel_id`]).
    pub rel_id: u32,
    /// Old key (`K`); non-key columns are [`ColumnValue::Null`].
    pub key: Option<TupleData>,
    /// Whole old row (`O`, `REPLICA IDENTITY FULL`).
    pub old: Option<TupleData>,
}

/// `T` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Bit 1: `CASCADE`; bit 2: `RESTART IDENTITY`.
    pub options: u8,
    /// OIDs of every truncated relation (including those reached by cascade).
    pub rel_ids: Vec<u32>,
}

impl Truncate {
    /// `TRUNCATE ... CASCADE`.
    pub fn cascade(&self) -> bool {
        self.options & 1 != 0
    }

    /// `TRUNCATE ... RESTART IDENTITY`.
    pub fn restart_identity(&self) -> bool {
        self.options & 2 != 0
    }
}

/// `M` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalDecodingMessage {
    /// Emitted inside a transaction (between Begin and Commit) rather than
    /// immediately.
    pub transactional: bool,
    /// LSN of the message.
    pub lsn: Lsn,
    /// The message's prefix.
    pub prefix: String,
    /// The message's content (zero-copy slice of the input).
    pub content: Bytes,
}

/// The column values of one row.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData {
    /// One value per column of the relation, in [`Relation::columns`] order.
    pub columns: Vec<ColumnValue>,
}

/// One column value in a [`TupleData`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnValue {
    /// `n`: SQL NULL (also every non-key column of a `K` tuple).
    Null,
    /// `u`: an out-of-line (TOASTed) value that the update did not change;
    /// the value itself is not sent.
    UnchangedToast,
    /// `t`: the value in the type's text output format.
    Text(Bytes),
    /// `b`: the value in the type's binary send format (`binary` option).
    Binary(Bytes),
}

impl ColumnValue {
    /// The text-format bytes, if this is a [`ColumnValue::Text`].
    pub fn as_text(&self) -> Option<&[u8]> {
        match self {
            ColumnValue::Text(b) => Some(b),
            _ => None,
        }
    }

    /// True for [`ColumnValue::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, ColumnValue::Null)
    }
}

/// Why a message could not be decoded. Every variant except
/// [`DecodeError::Empty`] and [`DecodeError::UnknownMessageType`] names the
/// message and the field; offsets count bytes from the start of the message
/// (the type byte is offset 0).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The buffer was empty: not even a message type byte.
    #[error("pgoutput: empty message (no message type byte)")]
    Empty,
    /// The message type byte is not one protocol v1 defines.
    #[error("pgoutput: unknown message type {}", ShowByte(*.0))]
    UnknownMessageType(u8),
    /// The message ended before `field` was complete.
    #[error("pgoutput {message} message: unexpected end of data in {field} at offset {offset}")]
    UnexpectedEof {
        message: &'static str,
        field: &'static str,
        offset: usize,
    },
    /// A string field had no NUL terminator before the end of the message.
    #[error("pgoutput {message} message: {field} string starting at offset {offset} has no NUL terminator")]
    UnterminatedString {
        message: &'static str,
        field: &'static str,
        offset: usize,
    },
    /// A string field is not valid UTF-8.
    #[error(
        "pgoutput {message} message: {field} is not valid UTF-8 (bad byte at offset {offset})"
    )]
    InvalidUtf8 {
        message: &'static str,
        field: &'static str,
        offset: usize,
    },
    /// A length or count field was negative.
    #[error("pgoutput {message} message: {field} is negative ({value})")]
    NegativeLength {
        message: &'static str,
        field: &'static str,
        value: i64,
    },
    /// The byte introducing a tuple (`K`, `O`, `N`) was not one allowed here.
    #[error("pgoutput {message} message: {field} is {}, expected {expected}", ShowByte(*.found))]
    UnexpectedTupleMarker {
        message: &'static str,
        field: &'static str,
        found: u8,
        expected: &'static str,
    },
    /// A column value kind was not `n`, `u`, `t` or `b`.
    #[error("pgoutput {message} message: {field} is {}, expected 'n', 'u', 't' or 'b'", ShowByte(*.kind))]
    UnknownTupleKind {
        message: &'static str,
        field: &'static str,
        kind: u8,
    },
    /// The message was complete but bytes were left over.
    #[error("pgoutput {message} message: {count} trailing bytes after the last field")]
    TrailingBytes { message: &'static str, count: usize },
}

/// Shows a protocol byte as `'N' (0x4e)`, or just `0x00` when not printable.
struct ShowByte(u8);

impl fmt::Display for ShowByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}' (0x{:02x})", char::from(self.0), self.0)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// Decodes one pgoutput (protocol v1) message: the payload of one XLogData
/// (`w`) replication message, or one `data` row of
/// `pg_logical_slot_{get,peek}_binary_changes`.
///
/// Never panics. Column values and message contents are zero-copy slices of
/// `buf`. The whole buffer must be consumed: trailing bytes are an error.
pub fn decode(buf: &Bytes) -> Result<LogicalMessage, DecodeError> {
    let Some((&tag, rest)) = buf.as_ref().split_first() else {
        return Err(DecodeError::Empty);
    };
    let reader = |message| Reader::after_tag(buf, rest, message);
    Ok(match tag {
        b'B' => LogicalMessage::Begin(decode_begin(reader("Begin"))?),
        b'C' => LogicalMessage::Commit(decode_commit(reader("Commit"))?),
        b'O' => LogicalMessage::Origin(decode_origin(reader("Origin"))?),
        b'R' => LogicalMessage::Relation(decode_relation(reader("Relation"))?),
        b'Y' => LogicalMessage::Type(decode_type(reader("Type"))?),
        b'I' => LogicalMessage::Insert(decode_insert(reader("Insert"))?),
        b'U' => LogicalMessage::Update(decode_update(reader("Update"))?),
        b'D' => LogicalMessage::Delete(decode_delete(reader("Delete"))?),
        b'T' => LogicalMessage::Truncate(decode_truncate(reader("Truncate"))?),
        b'M' => LogicalMessage::Message(decode_message(reader("Message"))?),
        other => return Err(DecodeError::UnknownMessageType(other)),
    })
}

// Each decode_* reads its fields and then requires the end of the message.

fn decode_begin(mut r: Reader<'_>) -> Result<Begin, DecodeError> {
    let final_lsn = r.lsn("final LSN")?;
    let commit_time_micros = r.i64("commit timestamp")?;
    let xid = r.u32("xid")?;
    r.finish()?;
    Ok(Begin {
        final_lsn,
        commit_time_micros,
        xid,
    })
}

fn decode_commit(mut r: Reader<'_>) -> Result<Commit, DecodeError> {
    let flags = r.u8("flags")?;
    let commit_lsn = r.lsn("commit LSN")?;
    let end_lsn = r.lsn("end LSN")?;
    let commit_time_micros = r.i64("commit timestamp")?;
    r.finish()?;
    Ok(Commit {
        flags,
        commit_lsn,
        end_lsn,
        commit_time_micros,
    })
}

fn decode_origin(mut r: Reader<'_>) -> Result<Origin, DecodeError> {
    let commit_lsn = r.lsn("origin commit LSN")?;
    let name = r.cstring("origin name")?;
    r.finish()?;
    Ok(Origin { commit_lsn, name })
}

/// Smallest encoding of one Relation column: flags, empty name's NUL,
/// type OID, type modifier.
const MIN_RELATION_COLUMN_LEN: usize = 1 + 1 + 4 + 4;

fn decode_relation(mut r: Reader<'_>) -> Result<Relation, DecodeError> {
    let rel_id = r.u32("relation OID")?;
    let namespace = r.cstring("namespace")?;
    let name = r.cstring("relation name")?;
    let replica_identity = r.u8("replica identity")?;
    let ncols = r.count16("column count")?;
    // Never trust a count for an allocation size beyond what the input can hold.
    let cap = ncols.min(
        r.remaining()
            .checked_div(MIN_RELATION_COLUMN_LEN)
            .unwrap_or(0),
    );
    let mut columns = Vec::with_capacity(cap);
    for _ in 0..ncols {
        let flags = r.u8("column flags")?;
        let name = r.cstring("column name")?;
        let type_oid = r.u32("column type OID")?;
        let type_modifier = r.i32("column type modifier")?;
        columns.push(Column {
            flags,
            name,
            type_oid,
            type_modifier,
        });
    }
    r.finish()?;
    Ok(Relation {
        rel_id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn decode_type(mut r: Reader<'_>) -> Result<TypeMsg, DecodeError> {
    let type_oid = r.u32("type OID")?;
    let namespace = r.cstring("type namespace")?;
    let name = r.cstring("type name")?;
    r.finish()?;
    Ok(TypeMsg {
        type_oid,
        namespace,
        name,
    })
}

/// Which tuple of a DML message is being read; picks the field names used in
/// errors.
#[derive(Clone, Copy)]
enum Which {
    Key,
    Old,
    New,
}

struct TupleFields {
    count: &'static str,
    kind: &'static str,
    length: &'static str,
    value: &'static str,
}

impl Which {
    fn fields(self) -> TupleFields {
        match self {
            Which::Key => TupleFields {
                count: "key tuple column count",
                kind: "key tuple column kind",
                length: "key tuple column length",
                value: "key tuple column value",
            },
            Which::Old => TupleFields {
                count: "old tuple column count",
                kind: "old tuple column kind",
                length: "old tuple column length",
                value: "old tuple column value",
            },
            Which::New => TupleFields {
                count: "new tuple column count",
                kind: "new tuple column kind",
                length: "new tuple column length",
                value: "new tuple column value",
            },
        }
    }
}

fn decode_tuple(r: &mut Reader<'_>, which: Which) -> Result<TupleData, DecodeError> {
    let f = which.fields();
    let ncols = r.count16(f.count)?;
    // Each column takes at least its kind byte.
    let mut columns = Vec::with_capacity(ncols.min(r.remaining()));
    for _ in 0..ncols {
        let value = match r.u8(f.kind)? {
            b'n' => ColumnValue::Null,
            b'u' => ColumnValue::UnchangedToast,
            b't' => {
                let len = r.count32(f.length)?;
                ColumnValue::Text(r.bytes(len, f.value)?)
            }
            b'b' => {
                let len = r.count32(f.length)?;
                ColumnValue::Binary(r.bytes(len, f.value)?)
            }
            kind => {
                return Err(DecodeError::UnknownTupleKind {
                    message: r.message(),
                    field: f.kind,
                    kind,
                })
            }
        };
        columns.push(value);
    }
    Ok(TupleData { columns })
}

fn marker_error(
    r: &Reader<'_>,
    field: &'static str,
    found: u8,
    expected: &'static str,
) -> DecodeError {
    DecodeError::UnexpectedTupleMarker {
        message: r.message(),
        field,
        found,
        expected,
    }
}

fn decode_insert(mut r: Reader<'_>) -> Result<Insert, DecodeError> {
    let rel_id = r.u32("relation OID")?;
    match r.u8("new tuple marker")? {
        b'N' => {}
        other => return Err(marker_error(&r, "new tuple marker", other, "'N'")),
    }
    let new = decode_tuple(&mut r, Which::New)?;
    r.finish()?;
    Ok(Insert { rel_id, new })
}

fn decode_update(mut r: Reader<'_>) -> Result<Update, DecodeError> {
    let rel_id = r.u32("relation OID")?;
    let mut key = None;
    let mut old = None;
    match r.u8("tuple marker")? {
        b'K' => key = Some(decode_tuple(&mut r, Which::Key)?),
        b'O' => old = Some(decode_tuple(&mut r, Which::Old)?),
        b'N' => {}
        other => return Err(marker_error(&r, "tuple marker", other, "'K', 'O' or 'N'")),
    }
    if key.is_some() || old.is_some() {
        match r.u8("new tuple marker")? {
            b'N' => {}
            other => return Err(marker_error(&r, "new tuple marker", other, "'N'")),
        }
    }
    let new = decode_tuple(&mut r, Which::New)?;
    r.finish()?;
    Ok(Update {
        rel_id,
        key,
        old,
        new,
    })
}

fn decode_delete(mut r: Reader<'_>) -> Result<Delete, DecodeError> {
    let rel_id = r.u32("relation OID")?;
    let mut key = None;
    let mut old = None;
    match r.u8("tuple marker")? {
        b'K' => key = Some(decode_tuple(&mut r, Which::Key)?),
        b'O' => old = Some(decode_tuple(&mut r, Which::Old)?),
        other => return Err(marker_error(&r, "tuple marker", other, "'K' or 'O'")),
    }
    r.finish()?;
    Ok(Delete { rel_id, key, old })
}

fn decode_truncate(mut r: Reader<'_>) -> Result<Truncate, DecodeError> {
    let nrels = r.count32("relation count")?;
    let options = r.u8("options")?;
    let cap = nrels.min(r.remaining().checked_div(4).unwrap_or(0));
    let mut rel_ids = Vec::with_capacity(cap);
    for _ in 0..nrels {
        rel_ids.push(r.u32("relation OID")?);
    }
    r.finish()?;
    Ok(Truncate { options, rel_ids })
}

fn decode_message(mut r: Reader<'_>) -> Result<LogicalDecodingMessage, DecodeError> {
    let flags = r.u8("flags")?;
    let lsn = r.lsn("message LSN")?;
    let prefix = r.cstring("prefix")?;
    let len = r.count32("content length")?;
    let content = r.bytes(len, "content")?;
    r.finish()?;
    Ok(LogicalDecodingMessage {
        transactional: flags & 1 != 0,
        lsn,
        prefix,
        content,
    })
}

/// The latest [`Relation`] seen for each relation OID.
///
/// pgoutput sends a Relation message before the first change to a relation
/// in each replication session and again whenever the relation's cached
/// schema is invalidated (ALTER TABLE, but also e.g. TRUNCATE), so a
/// consumer keeps the last one per `rel_id` and resolves DML against it.
#[derive(Debug, Clone, Default)]
pub struct RelationCache {
    relations: HashMap<u32, Relation>,
}

impl RelationCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `rel` as the current schema of `rel.rel_id`, returning the one
    /// it replaces.
    pub fn update(&mut self, rel: Relation) -> Option<Relation> {
        self.relations.insert(rel.rel_id, rel)
    }

    /// The current schema of `rel_id`, if a Relation message for it was seen.
    pub fn get(&self, rel_id: u32) -> Option<&Relation> {
        self.relations.get(&rel_id)
    }

    /// Forgets `rel_id`.
    pub fn remove(&mut self, rel_id: u32) -> Option<Relation> {
        self.relations.remove(&rel_id)
    }

    /// Forgets everything (e.g. on reconnect, since PostgreSQL resends
    /// Relation messages in each new session).
    pub fn clear(&mut self) {
        self.relations.clear();
    }

    /// Number of relations known.
    pub fn len(&self) -> usize {
        self.relations.len()
    }

    /// True when no relation is known.
    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }
}
