//! Appends, reads, cursors, acks, reopen and retention.

use ballast_storage::{AckKind, Log, ReadError, SyncPolicy};

use crate::support::*;

/// Appended records read back by offset and through a cursor, across
/// segment rolls, and again after a reopen.
#[test]
fn append_read_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_options()).unwrap();
    append_all(&log, 0, 500, 300);
    assert_eq!(log.next_offset(), 500);
    assert!(log.stats().segment_count > 1, "300-byte records should fill several 64 KiB segments");
    for offset in [0, 1, 199, 499] {
        let r = log.read(offset).unwrap();
        assert_eq!(r.offset, offset);
        assert_eq!(payload_index(&r.payload), offset);
    }
    assert_eq!(log.read(500), Err(ReadError::NotWritten { offset: 500, next_offset: 500 }));
    let mut cursor = log.cursor(0);
    for expected in 0..500 {
        let r = cursor.next().unwrap().unwrap();
        assert_eq!(r.offset, expected);
    }
    assert!(cursor.next().is_none());
    log.close().unwrap();

    let log = Log::open(dir.path(), small_options()).unwrap();
    assert_eq!(log.next_offset(), 500);
    let mut cursor = log.cursor(0);
    let offsets: Vec<u64> = std::iter::from_fn(|| cursor.next()).map(|r| r.unwrap().offset).collect();
    assert_eq!(offsets, (0..500).collect::<Vec<_>>());
    append_all(&log, 500, 10, 300);
    assert_eq!(payload_index(&log.read(505).unwrap().payload), 505);
}

/// Acked offsets are skipped by cursors, survive a reopen, and whole
/// segments of acked records are deleted.
#[test]
fn acks_persist_and_drive_retention() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), small_options()).unwrap();
    append_all(&log, 0, 1000, 300);
    let before = log.stats();
    log.ack(0, 600, AckKind::Acked).unwrap().wait().unwrap();
    log.ack(700, 1, AckKind::DeadLettered).unwrap().wait().unwrap();
    assert_eq!(log.ack_floor(), 600);
    assert!(log.is_done(700));
    assert!(!log.is_done(600));
    log.sync().unwrap();
    // Retention runs in the background flusher after the floor moves.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while log.stats().segment_count >= before.segment_count && std::time::Instant::now() < deadline {
        log.sync().unwrap();
        std::thread::yield_now();
    }
    let after = log.stats();
    assert!(after.segment_count < before.segment_count, "retention removed nothing: {after:?}");
    assert!(after.first_offset <= 600);
    assert_eq!(after.pending, 1000 - 600 - 1);
    log.close().unwrap();

    let log = Log::open(dir.path(), small_options()).unwrap();
    assert_eq!(log.ack_floor(), 600);
    assert!(log.is_done(700));
    let mut cursor = log.cursor(0);
    let offsets: Vec<u64> = std::iter::from_fn(|| cursor.next()).map(|r| r.unwrap().offset).collect();
    let expected: Vec<u64> = (600..1000).filter(|&o| o != 700).collect();
    assert_eq!(offsets, expected);
    assert!(matches!(log.read(0), Err(ReadError::Removed { .. })));
}

/// Each sync policy accepts appends and reads them back after reopen.
#[test]
fn every_policy_round_trips() {
    for policy in [SyncPolicy::Fsync, SyncPolicy::Interval { interval_ms: 5 }, SyncPolicy::None] {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), options_with(policy)).unwrap();
        append_all(&log, 0, 100, 100);
        log.close().unwrap();
        let log = Log::open(dir.path(), options_with(policy)).unwrap();
        assert_eq!(log.next_offset(), 100, "{policy:?}");
    }
}
