//! Checked big-endian cursor over one pgoutput message.
//!
//! Every read either returns the value and advances, or returns a
//! [`DecodeError`] naming the message and the field; none can panic.

use bytes::Bytes;

use super::DecodeError;
use crate::lsn::Lsn;

pub(super) struct Reader<'a> {
    /// The whole message, kept to hand out zero-copy [`Bytes`] slices.
    buf: &'a Bytes,
    /// The part of `buf` not yet read.
    rest: &'a [u8],
    /// Message name used in errors ("Insert", "Relation", ...).
    message: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf` positioned at `rest`, which must be the tail of
    /// `buf` after the one-byte message type (values are sliced out of `buf`).
    pub(super) fn after_tag(buf: &'a Bytes, rest: &'a [u8], message: &'static str) -> Self {
        Reader { buf, rest, message }
    }

    pub(super) fn message(&self) -> &'static str {
        self.message
    }

    /// Bytes not yet read.
    pub(super) fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Byte offset of the next read from the start of the message.
    fn offset(&self) -> usize {
        self.buf.len().saturating_sub(self.rest.len())
    }

    fn eof(&self, field: &'static str) -> DecodeError {
        DecodeError::UnexpectedEof {
            message: self.message,
            field,
            offset: self.offset(),
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        match self.rest.split_first_chunk::<N>() {
            Some((head, tail)) => {
                self.rest = tail;
                Ok(*head)
            }
            None => Err(self.eof(field)),
        }
    }

    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(u8::from_be_bytes)
    }

    pub(super) fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        self.array::<2>(field).map(i16::from_be_bytes)
    }

    pub(super) fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array::<4>(field).map(i32::from_be_bytes)
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array::<4>(field).map(u32::from_be_bytes)
    }

    pub(super) fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array::<8>(field).map(i64::from_be_bytes)
    }

    pub(super) fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array::<8>(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    /// An Int16 count that must not be negative.
    pub(super) fn count16(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let n = self.i16(field)?;
        usize::try_from(n).map_err(|_| DecodeError::NegativeLength {
            message: self.message,
            field,
            value: i64::from(n),
        })
    }

    /// An Int32 count or length that must not be negative.
    pub(super) fn count32(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let n = self.i32(field)?;
        usize::try_from(n).map_err(|_| DecodeError::NegativeLength {
            message: self.message,
            field,
            value: i64::from(n),
        })
    }

    /// A NUL-terminated UTF-8 string (the terminator is consumed, not returned).
    pub(super) fn cstring(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let start = self.offset();
        let Some(nul) = self.rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::UnterminatedString {
                message: self.message,
                field,
                offset: start,
            });
        };
        let Some((text, tail)) = self.rest.split_at_checked(nul) else {
            return Err(self.eof(field));
        };
        let text = std::str::from_utf8(text).map_err(|e| DecodeError::InvalidUtf8 {
            message: self.message,
            field,
            offset: start.saturating_add(e.valid_up_to()),
        })?;
        // `tail` starts with the NUL found above; drop it.
        self.rest = tail.get(1..).unwrap_or_default();
        Ok(text.to_owned())
    }

    /// `len` raw bytes as a zero-copy slice of the message buffer.
    pub(super) fn bytes(&mut self, len: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        let Some((value, tail)) = self.rest.split_at_checked(len) else {
            return Err(self.eof(field));
        };
        self.rest = tail;
        // `value` is a sub-slice of `self.buf` by construction, which is
        // exactly what `slice_ref` requires.
        Ok(self.buf.slice_ref(value))
    }

    /// Ends the message: anything left over is an error.
    pub(super) fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                message: self.message,
                count: self.rest.len(),
            })
        }
    }
}
