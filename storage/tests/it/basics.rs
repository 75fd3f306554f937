//! Appends, reads, cursors, acks, reopen and retention.

use ballast_storage::{AckKind, Log, LogOptions, ReadError, SyncPolicy};

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

/// `Log::sync` forces a sync at once under `Interval`: it does not wait for
/// the interval to pass.
#[test]
fn sync_is_prompt_under_interval() {
    let dir = tempfile::tempdir().unwrap();
    let log =
        std::sync::Arc::new(Log::open(dir.path(), options_with(SyncPolicy::Interval { interval_ms: 60_000 })).unwrap());
    append_all(&log, 0, 10, 100);
    let (done, synced) = std::sync::mpsc::channel();
    let syncing = std::sync::Arc::clone(&log);
    std::thread::spawn(move || done.send(syncing.sync()));
    let result = synced.recv_timeout(std::time::Duration::from_secs(10));
    assert!(matches!(result, Ok(Ok(()))), "Log::sync did not return within 10 s of a 60 s interval: {result:?}");
    assert!(log.stats().sync_count >= 1);
}

/// Default-size segments (64 MiB), 1 MiB of records.
fn big_segment_options() -> LogOptions {
    LogOptions::default()
}

fn only_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    assert_eq!(segments.len(), 1);
    segments.pop().unwrap()
}

/// Opening a cleanly closed log reads nothing of the unused rest of its
/// active segment (here 63 of 64 MiB): the checkpoint written at close says
/// where the data ends and that nothing follows it. Also prints the open
/// times (cold and warm page cache).
#[test]
fn clean_open_reads_nothing_past_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), big_segment_options()).unwrap();
    append_all(&log, 0, 1024, 1000);
    log.close().unwrap();
    let segment = only_segment(dir.path());
    evict_from_cache(&segment);
    assert!(cached_size(&segment) < 1 << 20, "eviction worked");

    let started = std::time::Instant::now();
    let log = Log::open(dir.path(), big_segment_options()).unwrap();
    let cold = started.elapsed();
    let cached = cached_size(&segment);
    assert_eq!(log.next_offset(), 1024);
    log.close().unwrap();
    let started = std::time::Instant::now();
    let log = Log::open(dir.path(), big_segment_options()).unwrap();
    let warm = started.elapsed();
    println!(
        "open after clean close (64 MiB segment, 1 MiB of records): cold {cold:?}, warm {warm:?}, read {cached} bytes of the segment"
    );
    assert_eq!(payload_index(&log.read(1023).unwrap().payload), 1023);
    assert!(cached <= 2 << 20, "open read {cached} bytes of a segment holding 1 MiB of records");
}

/// Opening after a crash (a copy of the directory taken while the log is
/// open, same boot) reads the records written since the checkpoint, not the
/// unused rest of the segment.
#[test]
fn crash_open_reads_only_the_written_tail() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), big_segment_options()).unwrap();
    append_all(&log, 0, 1024, 1000);
    let image = tempfile::tempdir().unwrap();
    crate::corruption::copy_dir(dir.path(), image.path());
    drop(log);
    let segment = only_segment(image.path());
    evict_from_cache(&segment);

    let started = std::time::Instant::now();
    let log = Log::open(image.path(), big_segment_options()).unwrap();
    let cold = started.elapsed();
    let cached = cached_size(&segment);
    println!(
        "open after a crash (64 MiB segment, 1 MiB of records): cold {cold:?}, read {cached} bytes of the segment"
    );
    assert_eq!(log.next_offset(), 1024);
    assert!(cached <= 8 << 20, "open read {cached} bytes of a segment holding 1 MiB of records");
}
