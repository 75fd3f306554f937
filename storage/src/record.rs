//! The record format: encode and decode, with the CRC.
//!
//! Layout (little-endian, see `docs/storage-format.md`):
//!
//! ```text
//! 0   u32 len            bytes of the record, this header included, padding excluded
//! 4   u32 crc            CRC32 (crc32fast) over bytes [8, len)
//! 8   u64 offset         position of the record in its lane's log
//! 16  u64 timestamp_ms   enqueue time, Unix milliseconds
//! 24  u32 attempt        delivery attempts so far
//! 28  u16 flags          opaque to storage
//! 30  u16 key_len        idempotency key size (0: no key)
//! 32  u32 headers_len    encoded headers size
//! 36  u32 payload_len
//! 40  key | headers | payload, then zero padding to a multiple of 8
//! ```
//!
//! Headers are encoded as repeated `u16 name_len, name, u32 value_len, value`,
//! both UTF-8. The decoder treats every byte as untrusted input: it checks
//! lengths against the buffer, the CRC, and UTF-8, and returns an error
//! instead of panicking.
//!
//! # Public codec
//!
//! [`encode`] and [`decode`] are public so that tools and benchmarks can
//! run the exact code the log runs, without a log: `Log::append` encodes
//! every record with [`encode`], and `Log::read` and `Cursor::next` decode
//! with [`decode`]. [`decode`] keeps the log's invariant: it returns a
//! [`Record`] only after the length, the CRC, the expected offset, the inner
//! lengths and UTF-8 validate; otherwise an [`Invalid`] says why. Neither
//! touches a file, and neither enforces the log's limits (record, key and
//! header sizes; see [`limits`](crate::limits)): that is `Log::append`'s job.

use bytes::Bytes;

use crate::limits::{RECORD_ALIGN, RECORD_HEADER_SIZE};

/// A record to append. The log assigns the offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewRecord {
    /// Enqueue time, Unix milliseconds (also the clock of the dedupe window).
    pub timestamp_ms: u64,
    /// Delivery attempts so far (0 for a fresh publish).
    pub attempt: u32,
    /// Caller-defined flags; storage stores them and never interprets them.
    pub flags: u16,
    /// Optional idempotency key (at most [`KEY_SIZE_MAX`](crate::limits::KEY_SIZE_MAX) bytes).
    pub key: Option<Bytes>,
    /// Headers, a string map in insertion order.
    pub headers: Vec<(String, String)>,
    /// The message body.
    pub payload: Bytes,
}

/// A record read back from the log, validated (length, offset, CRC, UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub timestamp_ms: u64,
    pub attempt: u32,
    pub flags: u16,
    pub key: Option<Bytes>,
    pub headers: Vec<(String, String)>,
    /// Zero-copy view into the segment's memory map.
    pub payload: Bytes,
}

impl NewRecord {
    /// Encoded size of the headers block, in bytes.
    pub(crate) fn headers_size(&self) -> u64 {
        headers_size(&self.headers)
    }

    /// Encoded size without padding: what the `len` field holds.
    pub(crate) fn encoded_len(&self) -> u64 {
        encoded_len(self.key.as_ref().map_or(0, Bytes::len), &self.headers, self.payload.len())
    }

    /// Bytes this record takes in a segment once appended: the 40-byte
    /// record header, key, encoded headers and payload, padded to
    /// [`RECORD_ALIGN`]. The same figure as [`Record::stored_size`] of the
    /// record read back, and what [`Log::pending_bytes`](crate::Log::pending_bytes)
    /// sums.
    pub fn stored_size(&self) -> u64 {
        padded(self.encoded_len())
    }
}

impl Record {
    /// Bytes this record takes in its segment: the 40-byte record header,
    /// key, encoded headers and payload, padded to [`RECORD_ALIGN`] (see
    /// [`stored_size`]).
    pub fn stored_size(&self) -> u64 {
        stored_size(self.key.as_ref().map_or(0, Bytes::len), &self.headers, self.payload.len())
    }
}

/// Bytes a record with a key of `key_len` bytes (0: no key), these
/// headers and a payload of `payload_len` bytes takes in a segment: the
/// 40-byte record header, the key, the headers block (per header a 2-byte
/// name length, the name, a 4-byte value length, the value) and the
/// payload, padded to [`RECORD_ALIGN`] (`docs/storage-format.md` §2.3).
/// The single source of truth for the stored size of a record.
pub fn stored_size(key_len: usize, headers: &[(String, String)], payload_len: usize) -> u64 {
    padded(encoded_len(key_len, headers, payload_len))
}

/// Encoded size of a headers block: per header a 2-byte name length, the
/// name, a 4-byte value length, the value. What the log's
/// [`HEADERS_SIZE_MAX`](crate::limits::HEADERS_SIZE_MAX) limits.
pub fn headers_size(headers: &[(String, String)]) -> u64 {
    headers.iter().map(|(k, v)| 2 + k.len() as u64 + 4 + v.len() as u64).sum()
}

/// Encoded bytes of a record with a key of `key_len` bytes, these headers
/// and a payload of `payload_len` bytes, before padding: what the log's
/// `record_size_max` limits.
pub fn encoded_len(key_len: usize, headers: &[(String, String)], payload_len: usize) -> u64 {
    RECORD_HEADER_SIZE as u64 + key_len as u64 + headers_size(headers) + payload_len as u64
}

/// Size a record of `len` bytes occupies in a segment, padding included.
pub(crate) fn padded(len: u64) -> u64 {
    len.div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

/// Appends the encoding of `record`, as the record at `offset` of its log,
/// to `buf`: the 40-byte record header with the CRC32, the key, the headers
/// block and the payload, zero-padded to [`RECORD_ALIGN`]. Returns the bytes
/// appended, [`NewRecord::stored_size`]. Bytes already in `buf` are kept.
///
/// This is the encoder `Log::append` runs on every record, after checking
/// the record against the log's limits.
///
/// # Panics
///
/// If a field does not fit the format: the whole record over `u32::MAX`
/// bytes, the key over `u16::MAX`, a header name over `u16::MAX`, a header
/// value, the headers block or the payload over `u32::MAX`. Every record
/// `Log::append` accepts fits, as its limits are far below these.
pub fn encode(record: &NewRecord, offset: u64, buf: &mut Vec<u8>) -> usize {
    let start = buf.len();
    let len = record.encoded_len();
    let key = record.key.as_deref().unwrap_or(&[]);
    let len32 = u32::try_from(len).expect("record size was validated against the segment size");
    let key_len = u16::try_from(key.len()).expect("key size was validated against KEY_SIZE_MAX");
    let headers_len = u32::try_from(record.headers_size()).expect("headers size was validated");
    let payload_len = u32::try_from(record.payload.len()).expect("payload size was validated");

    buf.extend_from_slice(&len32.to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // CRC, filled below
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&record.timestamp_ms.to_le_bytes());
    buf.extend_from_slice(&record.attempt.to_le_bytes());
    buf.extend_from_slice(&record.flags.to_le_bytes());
    buf.extend_from_slice(&key_len.to_le_bytes());
    buf.extend_from_slice(&headers_len.to_le_bytes());
    buf.extend_from_slice(&payload_len.to_le_bytes());
    buf.extend_from_slice(key);
    for (name, value) in &record.headers {
        let name_len = u16::try_from(name.len()).expect("header name size was validated");
        let value_len = u32::try_from(value.len()).expect("header value size was validated");
        buf.extend_from_slice(&name_len.to_le_bytes());
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(&value_len.to_le_bytes());
        buf.extend_from_slice(value.as_bytes());
    }
    buf.extend_from_slice(&record.payload);
    assert_eq!((buf.len() - start) as u64, len, "encoded length disagrees with encoded_len");
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    let pad = padded(len) - len;
    buf.extend(std::iter::repeat_n(0u8, pad as usize));
    buf.len() - start
}

/// Why bytes at a position are not a valid record ([`decode`]'s error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Invalid {
    /// The length field is zero: unwritten (preallocated) space, the end of
    /// the data in a segment.
    Zero,
    /// The length field is below the header size or runs past the buffer.
    BadLength,
    /// The CRC does not match.
    Crc,
    /// The CRC matches but the record's offset is not the expected one
    /// (a stale or misplaced record).
    WrongOffset,
    /// The CRC matches but the inner lengths or UTF-8 are inconsistent.
    Malformed,
}

impl Invalid {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Invalid::Zero => "unwritten space where a record was expected",
            Invalid::BadLength => "impossible record length",
            Invalid::Crc => "CRC mismatch",
            Invalid::WrongOffset => "record carries an unexpected offset",
            Invalid::Malformed => "malformed record body",
        }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

impl std::error::Error for Invalid {}

/// The fixed header of a record, parsed but not yet CRC-checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub len: u32,
    pub crc: u32,
    pub offset: u64,
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(buf[at..at + 2].try_into().expect("two bytes"))
}
fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("four bytes"))
}
fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("eight bytes"))
}

/// Parses the fixed header at the start of `buf` and checks the length
/// against `buf` (the bytes up to the end of valid data). No CRC check.
pub(crate) fn peek(buf: &[u8]) -> Result<Header, Invalid> {
    if buf.len() < RECORD_HEADER_SIZE as usize {
        return if buf.iter().all(|&b| b == 0) { Err(Invalid::Zero) } else { Err(Invalid::BadLength) };
    }
    let len = u32_at(buf, 0);
    if len == 0 {
        return Err(Invalid::Zero);
    }
    if len < RECORD_HEADER_SIZE || len as usize > buf.len() {
        return Err(Invalid::BadLength);
    }
    Ok(Header { len, crc: u32_at(buf, 4), offset: u64_at(buf, 8) })
}

/// Validates the record at the start of `buf` fully: length, CRC, expected
/// offset, inner lengths and UTF-8. Returns the header on success.
pub(crate) fn check(buf: &[u8], expected_offset: u64) -> Result<Header, Invalid> {
    let header = verify(buf, expected_offset)?;
    parse_body(&buf[..header.len as usize]).map(|_| header)
}

/// The header, length, CRC and offset checks of [`check`], without parsing
/// the body ([`decode`] parses it once, to build the record).
fn verify(buf: &[u8], expected_offset: u64) -> Result<Header, Invalid> {
    let header = peek(buf)?;
    let body = &buf[..header.len as usize];
    if crc32fast::hash(&body[8..]) != header.crc {
        return Err(Invalid::Crc);
    }
    if header.offset != expected_offset {
        return Err(Invalid::WrongOffset);
    }
    Ok(header)
}

struct Parts {
    timestamp_ms: u64,
    attempt: u32,
    flags: u16,
    key: std::ops::Range<usize>,
    headers: Vec<(String, String)>,
    payload: std::ops::Range<usize>,
}

fn parse_body(body: &[u8]) -> Result<Parts, Invalid> {
    let key_len = u16_at(body, 30) as usize;
    let headers_len = u32_at(body, 32) as usize;
    let payload_len = u32_at(body, 36) as usize;
    let header = RECORD_HEADER_SIZE as usize;
    if header + key_len + headers_len + payload_len != body.len() {
        return Err(Invalid::Malformed);
    }
    let key = header..header + key_len;
    let headers_block = &body[key.end..key.end + headers_len];
    let payload = key.end + headers_len..body.len();
    Ok(Parts {
        timestamp_ms: u64_at(body, 16),
        attempt: u32_at(body, 24),
        flags: u16_at(body, 28),
        key,
        headers: parse_headers(headers_block)?,
        payload,
    })
}

fn parse_headers(mut block: &[u8]) -> Result<Vec<(String, String)>, Invalid> {
    let mut headers = Vec::new();
    while !block.is_empty() {
        let name = take(&mut block, 2)?;
        let name = take(&mut block, u16_at(name, 0) as usize)?;
        let value = take(&mut block, 4)?;
        let value = take(&mut block, u32_at(value, 0) as usize)?;
        let name = std::str::from_utf8(name).map_err(|_| Invalid::Malformed)?;
        let value = std::str::from_utf8(value).map_err(|_| Invalid::Malformed)?;
        headers.push((name.to_owned(), value.to_owned()));
    }
    Ok(headers)
}

fn take<'a>(block: &mut &'a [u8], n: usize) -> Result<&'a [u8], Invalid> {
    if block.len() < n {
        return Err(Invalid::Malformed);
    }
    let (head, rest) = block.split_at(n);
    *block = rest;
    Ok(head)
}

/// Decodes the record at the start of `source`, which should be the record
/// at `expected_offset` of its log; bytes past the record (its padding, the
/// records after it) are ignored. In the log, `source` is a zero-copy view
/// of the segment's map from the record's position to the end of valid data.
///
/// The record is returned only once its length (against `source`), CRC32,
/// offset (against `expected_offset`), inner lengths and UTF-8 headers
/// validate; any other bytes give an [`Invalid`], never a panic. The key and
/// the payload of the record are zero-copy slices of `source`. Its padded
/// size, where the next record starts, is [`Record::stored_size`].
///
/// This is the decoder `Log::read` and `Cursor::next` run on every record.
///
/// # Errors
///
/// [`Invalid`] says which check failed.
pub fn decode(source: &Bytes, expected_offset: u64) -> Result<Record, Invalid> {
    let header = verify(source, expected_offset)?;
    let body = source.slice(..header.len as usize);
    let parts = parse_body(&body)?;
    Ok(Record {
        offset: header.offset,
        timestamp_ms: parts.timestamp_ms,
        attempt: parts.attempt,
        flags: parts.flags,
        key: (!parts.key.is_empty()).then(|| body.slice(parts.key)),
        headers: parts.headers,
        payload: body.slice(parts.payload),
    })
}

/// Reads only the key and timestamp of a validated record (dedupe recovery).
pub(crate) fn key_of(body: &[u8]) -> Option<(&[u8], u64)> {
    let key_len = u16_at(body, 30) as usize;
    let header = RECORD_HEADER_SIZE as usize;
    (key_len > 0).then(|| (&body[header..header + key_len], u64_at(body, 16)))
}

#[cfg(test)]
mod tests;
