use bytes::Bytes;
use proptest::prelude::*;

use super::*;

fn roundtrip(record: &NewRecord, offset: u64) -> Record {
    let mut buf = vec![0xee; 3];
    let written = encode(record, offset, &mut buf);
    assert_eq!(&buf[..3], &[0xee; 3], "bytes already in the buffer are kept");
    assert_eq!(written, buf.len() - 3, "encode returns the bytes it appended");
    buf.drain(..3);
    assert_eq!(buf.len() as u64, padded(record.encoded_len()));
    assert_eq!(buf.len() as u64, record.stored_size(), "stored_size is the encoded size, padding included");
    let decoded = decode(&Bytes::from(buf), offset).expect("a freshly encoded record decodes");
    assert_eq!(decoded.stored_size(), record.stored_size());
    decoded
}

proptest! {
    /// Whatever we encode decodes to the same fields.
    #[test]
    fn encode_decode_roundtrip(
        offset in any::<u64>(),
        timestamp_ms in any::<u64>(),
        attempt in any::<u32>(),
        flags in any::<u16>(),
        key in proptest::option::of(proptest::collection::vec(any::<u8>(), 1..64)),
        headers in proptest::collection::vec(("[a-z-]{0,12}", "\\PC{0,16}"), 0..5),
        payload in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let record = NewRecord {
            timestamp_ms, attempt, flags,
            key: key.map(Bytes::from),
            headers,
            payload: Bytes::from(payload),
        };
        let back = roundtrip(&record, offset);
        prop_assert_eq!(back.offset, offset);
        prop_assert_eq!(back.timestamp_ms, record.timestamp_ms);
        prop_assert_eq!(back.attempt, record.attempt);
        prop_assert_eq!(back.flags, record.flags);
        prop_assert_eq!(back.key, record.key);
        prop_assert_eq!(back.headers, record.headers);
        prop_assert_eq!(back.payload, record.payload);
    }

    /// Flipping any single bit of an encoded record makes it fail validation
    /// (or, for a flip in the padding, leaves it intact): never wrong data.
    #[test]
    fn any_bit_flip_is_detected(payload in proptest::collection::vec(any::<u8>(), 0..256), bit in any::<prop::sample::Index>()) {
        let record = NewRecord { timestamp_ms: 7, payload: Bytes::from(payload), ..NewRecord::default() };
        let mut buf = Vec::new();
        encode(&record, 42, &mut buf);
        let len = record.encoded_len() as usize;
        let bit = bit.index(len * 8);
        buf[bit / 8] ^= 1 << (bit % 8);
        let result = decode(&Bytes::from(buf), 42);
        prop_assert!(result.is_err(), "flip of bit {} went undetected", bit);
    }
}

/// Decoding arbitrary bytes never panics.
#[test]
fn garbage_never_panics() {
    proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..512), offset in any::<u64>())| {
        let _ = decode(&Bytes::from(bytes), offset);
    });
}

#[test]
fn zero_bytes_read_as_end_of_data() {
    assert_eq!(peek(&[0; 64]).unwrap_err(), Invalid::Zero);
    assert_eq!(peek(&[0; 8]).unwrap_err(), Invalid::Zero);
    assert_eq!(peek(&[1; 8]).unwrap_err(), Invalid::BadLength);
}

#[test]
fn wrong_offset_is_detected() {
    let mut buf = Vec::new();
    encode(&NewRecord::default(), 5, &mut buf);
    assert_eq!(check(&buf, 6).unwrap_err(), Invalid::WrongOffset);
    assert!(check(&buf, 5).is_ok());
}

#[test]
fn invalid_displays_its_reason() {
    assert_eq!(Invalid::Crc.to_string(), "CRC mismatch");
    let error: Box<dyn std::error::Error> = Box::new(Invalid::WrongOffset);
    assert_eq!(error.to_string(), Invalid::WrongOffset.describe());
}

/// Rewrites the CRC of the encoded record at the start of `buf` so that it
/// matches its bytes again.
fn reseal(buf: &mut [u8]) {
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
    let crc = crc32fast::hash(&buf[8..len]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

proptest! {
    /// CRC-valid records whose inner lengths lie (key, headers block,
    /// payload, a header's name or value length) reach the body parser,
    /// which refuses them as malformed or returns a record whose parts add
    /// up to the record's length: never a panic, never bytes from outside
    /// the record. Random bytes (`garbage_never_panics`) fail the CRC first
    /// and never get this far.
    #[test]
    fn lying_inner_lengths_are_refused(
        key in proptest::option::of(proptest::collection::vec(any::<u8>(), 1..16)),
        headers in proptest::collection::vec(("[a-z]{0,6}", "[a-z]{0,6}"), 0..4),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        field in 0usize..5,
        header_index in any::<prop::sample::Index>(),
        lie in any::<u32>(),
        small in any::<bool>(),
    ) {
        let record = NewRecord {
            timestamp_ms: 1,
            key: key.map(Bytes::from),
            headers: headers.clone(),
            payload: Bytes::from(payload),
            ..NewRecord::default()
        };
        let mut buf = Vec::new();
        encode(&record, 9, &mut buf);
        // Small lies land near the truth, where off-by-one bugs live.
        let lie = if small { lie % 80 } else { lie };
        let key_len = record.key.as_ref().map_or(0, Bytes::len);
        match field {
            0 => buf[30..32].copy_from_slice(&(lie as u16).to_le_bytes()),
            1 => buf[32..36].copy_from_slice(&lie.to_le_bytes()),
            2 => buf[36..40].copy_from_slice(&lie.to_le_bytes()),
            _ if headers.is_empty() => buf[36..40].copy_from_slice(&lie.to_le_bytes()),
            _ => {
                // The name (field 3) or value (field 4) length of one header.
                let at = header_index.index(headers.len());
                let mut pos = 40 + key_len;
                for (name, value) in &headers[..at] {
                    pos += 2 + name.len() + 4 + value.len();
                }
                if field == 3 {
                    buf[pos..pos + 2].copy_from_slice(&(lie as u16).to_le_bytes());
                } else {
                    let pos = pos + 2 + headers[at].0.len();
                    buf[pos..pos + 4].copy_from_slice(&lie.to_le_bytes());
                }
            }
        }
        reseal(&mut buf);
        let len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as u64;
        let bytes = Bytes::from(buf.clone());
        prop_assert!(verify(&bytes, 9).is_ok(), "the CRC matches, so the body parser is reached");
        match decode(&bytes, 9) {
            Ok(back) => {
                let parts = RECORD_HEADER_SIZE as u64
                    + back.key.as_ref().map_or(0, Bytes::len) as u64
                    + headers_size(&back.headers)
                    + back.payload.len() as u64;
                prop_assert_eq!(parts, len, "a decoded record's parts add up to its length");
                prop_assert!(check(&buf, 9).is_ok());
            }
            Err(invalid) => {
                prop_assert_eq!(invalid, Invalid::Malformed);
                prop_assert_eq!(check(&buf, 9).unwrap_err(), Invalid::Malformed);
            }
        }
    }
}
