//! Every limit at its value and one past it.

use ballast_storage::{AppendError, Log, LogOptions, NewRecord, limits};
use bytes::Bytes;

use crate::support::*;

/// A record exactly at `record_size_max` is accepted; one byte more is
/// refused with the limit named, and nothing is written.
#[test]
fn record_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_options()).unwrap();
    let max = small_options().record_size_max as usize;
    let at_limit = NewRecord { payload: Bytes::from(vec![7u8; max - 40]), ..NewRecord::default() };
    log.append(&[at_limit]).unwrap().commit.wait().unwrap();
    let past = NewRecord { payload: Bytes::from(vec![7u8; max - 39]), ..NewRecord::default() };
    match log.append(&[record(0, 10), past]) {
        Err(AppendError::RecordTooLarge { index: 1, size, max: m }) => {
            assert_eq!(size, max as u64 + 1);
            assert_eq!(m as usize, max);
        }
        other => panic!("expected RecordTooLarge, got {other:?}"),
    }
    assert_eq!(log.next_offset(), 1, "a refused batch writes nothing");
}

#[test]
fn key_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_options()).unwrap();
    let key = |n: usize| NewRecord { key: Some(Bytes::from(vec![b'k'; n])), ..NewRecord::default() };
    log.append(&[key(limits::KEY_SIZE_MAX as usize)]).unwrap().commit.wait().unwrap();
    assert!(matches!(log.append(&[key(limits::KEY_SIZE_MAX as usize + 1)]), Err(AppendError::KeyTooLarge { .. })));
}

/// A one-byte key is accepted; an empty one (`Some` of no bytes) is refused
/// as a whole batch, since the key journal cannot hold it.
#[test]
fn empty_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_options()).unwrap();
    let key = |n: usize| NewRecord { key: Some(Bytes::from(vec![b'k'; n])), ..NewRecord::default() };
    log.append(&[key(1)]).unwrap().commit.wait().unwrap();
    assert!(matches!(log.append(&[key(1), key(0)]), Err(AppendError::KeyEmpty { index: 1 })));
    assert_eq!(log.next_offset(), 1, "a refused batch writes nothing");
}

#[test]
fn header_limits() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogOptions { record_size_max: 200_000, segment_size: 1 << 20, ..small_options() })
        .unwrap();
    let with = |count: usize, value: usize| NewRecord {
        headers: (0..count).map(|i| (format!("h{i}"), "v".repeat(value))).collect(),
        ..NewRecord::default()
    };
    let max = limits::HEADERS_COUNT_MAX as usize;
    log.append(&[with(max, 1)]).unwrap().commit.wait().unwrap();
    assert!(matches!(log.append(&[with(max + 1, 1)]), Err(AppendError::TooManyHeaders { .. })));
    assert!(matches!(
        log.append(&[with(1, limits::HEADERS_SIZE_MAX as usize)]),
        Err(AppendError::HeadersTooLarge { .. })
    ));
}

#[test]
fn batch_limits() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogOptions { segment_size: 8 << 20, ..small_options() }).unwrap();
    assert!(matches!(log.append(&[]), Err(AppendError::BatchEmpty)));
    let batch = vec![NewRecord::default(); limits::BATCH_COUNT_MAX];
    log.append(&batch).unwrap().commit.wait().unwrap();
    let batch = vec![NewRecord::default(); limits::BATCH_COUNT_MAX + 1];
    assert!(matches!(log.append(&batch), Err(AppendError::BatchTooLarge { .. })));
    assert_eq!(log.next_offset(), limits::BATCH_COUNT_MAX as u64);
}

/// Bad options are refused at open with the setting named.
#[test]
fn options_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let bad = [
        LogOptions { segment_size: limits::SEGMENT_SIZE_MIN - 8, ..LogOptions::default() },
        LogOptions { segment_size: limits::SEGMENT_SIZE_MAX + 8, ..LogOptions::default() },
        LogOptions { segment_size: 64 * 1024, record_size_max: 64 * 1024, ..LogOptions::default() },
        LogOptions { sync_policy: ballast_storage::SyncPolicy::Interval { interval_ms: 0 }, ..LogOptions::default() },
    ];
    for options in bad {
        let error = Log::open(dir.path(), options.clone()).expect_err("invalid options must be refused");
        assert!(error.to_string().contains("must be"), "{error}");
    }
    let _ = record(0, 0);
}
