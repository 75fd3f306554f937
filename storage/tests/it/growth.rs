//! Segment files grow with the backlog: an empty log costs one growth step
//! of disk, not a whole segment.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use ballast_storage::{
    AppendError, Faults, Log, LogOptions, SyncPolicy,
    limits::{SEGMENT_GROWTH_STEP_MIN, SEGMENT_SIZE_DEFAULT},
};

use crate::support::*;

/// Bytes a directory tree takes on disk: allocated blocks of every file and
/// directory in it, the directory itself included (what `du` counts).
fn disk_use(path: &Path) -> u64 {
    let meta = std::fs::symlink_metadata(path).unwrap();
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            total += disk_use(&entry.unwrap().path());
        }
    }
    total
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// An empty queue with its dead-letter queue is 6 logs (3 lanes each) with
/// default options (64 MiB segments): together, with their checkpoints,
/// journals and directories, they take at most 1 MiB of disk, open and
/// after a clean close.
#[test]
fn six_empty_logs_use_at_most_1_mib() {
    let root = tempfile::tempdir().unwrap();
    let logs: Vec<Log> = (0..6)
        .map(|lane| Log::open(root.path().join(format!("lane-{lane}")), LogOptions::default()).unwrap())
        .collect();
    for log in &logs {
        assert_eq!(log.stats().disk_bytes, SEGMENT_GROWTH_STEP_MIN, "an empty log holds one growth step");
    }
    let open = disk_use(root.path());
    for log in logs {
        log.close().unwrap();
    }
    let closed = disk_use(root.path());
    println!("6 empty logs: {open} bytes on disk open, {closed} after close");
    assert!(open <= 1 << 20, "6 empty logs use {open} bytes on disk");
    assert!(closed <= 1 << 20, "6 closed empty logs use {closed} bytes on disk");
}

/// The active segment file grows in doubling steps from 64 KiB as records
/// are appended (the flush pool may take a step ahead of the writer), always
/// at least as long as the data in it and at most two steps ahead of it,
/// and the records stay readable across a reopen.
#[test]
fn segment_grows_in_doubling_steps() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogOptions::default()).unwrap();
    let segment = segment_files(dir.path()).pop().unwrap();
    let mut lengths = vec![file_len(&segment)];
    let mut next = 0;
    // About 1.1 MiB of records in 1 KiB records, 16 per batch.
    while next < 1100 {
        append_all(&log, next, 16, 1000);
        next += 16;
        // Stats first: the flush pool may grow the file meanwhile, and the
        // file grows before the allocated length is raised.
        let stats = log.stats();
        let len = file_len(&segment);
        assert!(stats.disk_bytes <= len, "stats report an allocated length");
        assert!(len >= stats.data_bytes, "the file ({len}) covers the data ({})", stats.data_bytes);
        assert!(len <= 4 * stats.data_bytes.max(SEGMENT_GROWTH_STEP_MIN), "{len} is more than two steps ahead");
        if lengths.last() != Some(&len) {
            lengths.push(len);
        }
    }
    assert_eq!(lengths[0], SEGMENT_GROWTH_STEP_MIN, "a new segment holds one step");
    for pair in lengths.windows(2) {
        assert_eq!(pair[1], 2 * pair[0], "each step doubles: {lengths:?}");
    }
    assert!(lengths.len() >= 6, "64 KiB to at least 2 MiB: {lengths:?}");
    log.close().unwrap();
    let log = Log::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(log.next_offset(), next);
    for offset in (0..next).step_by(37).chain([next - 1]) {
        assert_eq!(payload_index(&log.read(offset).unwrap().payload), offset);
    }
    // And it keeps growing from where it stopped.
    append_all(&log, next, 1200, 1000);
    let data = log.stats().data_bytes;
    assert!((data..=4 * data).contains(&file_len(&segment)), "{} for {data} bytes of data", file_len(&segment));
    assert!(file_len(&segment) < SEGMENT_SIZE_DEFAULT);
}

/// A segment fills up to exactly its size: the last step is capped at the
/// segment size, and the next record starts a new segment that begins
/// small again.
#[test]
fn growth_stops_at_the_segment_size() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions { segment_size: 300 * 1024, record_size_max: 16 * 1024, ..LogOptions::default() };
    let log = Log::open(dir.path(), options.clone()).unwrap();
    append_all(&log, 0, 400, 1000);
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(file_len(&files[0]), 300 * 1024, "a full segment is exactly its size");
    // 105 records (109,264 bytes): 128 KiB, or 256 KiB grown ahead.
    assert!(file_len(&files[1]) <= 4 * SEGMENT_GROWTH_STEP_MIN, "a new segment starts small");
    log.close().unwrap();
    let log = Log::open(dir.path(), options).unwrap();
    assert_eq!(payload_index(&log.read(399).unwrap().payload), 399);
}

/// A crash while a segment grows: the new length did not reach the disk
/// (the file is as long as before the growth, or stops at any length in
/// between), and the records written into the lost space were never
/// synced. Recovery keeps every record the file still holds whole, cuts
/// the torn one, and the log grows again from there.
#[test]
fn crash_mid_growth_keeps_the_records_the_file_holds() {
    // Long interval: nothing written in the test is synced by the flusher.
    let options = || LogOptions { sync_policy: SyncPolicy::Interval { interval_ms: 60_000 }, ..LogOptions::default() };
    for cut in [SEGMENT_GROWTH_STEP_MIN, 100_003, 2 * SEGMENT_GROWTH_STEP_MIN + 4] {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), options()).unwrap();
        append_all(&log, 0, 400, 1000);
        let image = tempfile::tempdir().unwrap();
        crate::corruption::copy_dir(dir.path(), image.path());
        drop(log);
        let segment = segment_files(image.path()).pop().unwrap();
        // 512 KiB for the batch, or 1 MiB if the flusher already grew it
        // ahead of the writer (the batch crossed half of 512 KiB).
        let len = file_len(&segment);
        assert!([8, 16].map(|steps| steps * SEGMENT_GROWTH_STEP_MIN).contains(&len), "{len}");
        std::fs::OpenOptions::new().write(true).open(&segment).unwrap().set_len(cut).unwrap();

        let log = Log::open(image.path(), options()).unwrap();
        // Records are 1,040 bytes padded, after a 64-byte header.
        let whole = (cut - 64) / 1040;
        assert_eq!(log.next_offset(), whole, "cut at {cut}: the whole records stay, the torn one goes");
        for offset in [0, whole / 2, whole - 1] {
            assert_eq!(payload_index(&log.read(offset).unwrap().payload), offset);
        }
        assert_eq!(log.stats().quarantined, 0);
        append_all(&log, whole, 400, 1000);
        log.close().unwrap();
        let log = Log::open(image.path(), options()).unwrap();
        assert_eq!(log.next_offset(), whole + 400);
        assert_eq!(payload_index(&log.read(whole + 399).unwrap().payload), whole + 399);
    }
}

/// A full disk when a segment must grow refuses the append with
/// `DiskFull` and writes nothing; the log is not poisoned, records that fit
/// in the space already allocated are still taken, and the refused batch
/// goes through once space returns.
#[test]
fn disk_full_on_growth_is_an_append_error() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let options = LogOptions { faults: Some(faults.clone()), ..LogOptions::default() };
    let log = Log::open(dir.path(), options).unwrap();
    append_all(&log, 0, 50, 1000);
    faults.set_disk_full(true);
    // The flush pool may be growing the segment one step ahead right now;
    // a batch past twice the allocation needs a step more whatever it did.
    let stats = log.stats();
    let allocated = stats.disk_bytes;
    let count = (2 * allocated - stats.data_bytes) / 1040 + 2;
    let batch: Vec<_> = (50..50 + count).map(|i| record(i, 1000)).collect();
    match log.append(&batch) {
        Err(AppendError::DiskFull { path }) => {
            assert!(path.extension().is_some_and(|e| e == "seg"), "names the segment: {path:?}")
        }
        other => panic!("expected DiskFull, got {other:?}"),
    }
    assert_eq!(log.next_offset(), 50, "nothing of the refused batch was written");
    assert!(log.poisoned().is_none());
    append_all(&log, 50, 5, 1000);
    assert!(log.stats().disk_bytes <= 2 * allocated, "the records fit without growing");
    faults.set_disk_full(false);
    let batch: Vec<_> = (55..55 + count).map(|i| record(i, 1000)).collect();
    log.append(&batch).unwrap().commit.wait().unwrap();
    assert!(log.stats().disk_bytes > 2 * allocated);
    log.close().unwrap();
    let log = Log::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(log.next_offset(), 55 + count);
    assert_eq!(payload_index(&log.read(54 + count).unwrap().payload), 54 + count);
}

/// Kernel mappings (one line of `/proc/self/maps` each) of files under
/// `dir`.
fn mappings_under(dir: &Path) -> usize {
    let dir = dir.to_str().unwrap();
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|line| line.contains(dir)).count()
}

/// An empty log holds no mapping of its segment, open or reopened after a
/// clean close (an idle lane costs no `vm.max_map_count` slot); its first
/// append maps the segment, and a log with records is mapped at open.
#[test]
fn an_empty_log_maps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(mappings_under(dir.path()), 0, "a new, empty log");
    assert!(log.read(0).is_err());
    assert!(log.cursor(0).next().is_none());
    log.close().unwrap();
    let log = Log::open(dir.path(), LogOptions::default()).unwrap();
    assert_eq!(mappings_under(dir.path()), 0, "an empty log after a clean close");
    append_all(&log, 0, 3, 100);
    assert_eq!(mappings_under(dir.path()), 1, "the first append maps the segment");
    assert_eq!(payload_index(&log.read(2).unwrap().payload), 2);
    log.close().unwrap();
    let log = Log::open(dir.path(), LogOptions::default()).unwrap();
    // The closed log's map goes once the last holder of its segment lets
    // go: a flush-pool thread finishing its last cycle of the closed log
    // may still hold it for a moment (seen once on a loaded CI run), so
    // wait, bounded, for the count to settle.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while mappings_under(dir.path()) > 1 && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(mappings_under(dir.path()), 1, "a log with records is mapped at open");
    assert_eq!(payload_index(&log.read(2).unwrap().payload), 2);
}

/// The flusher grows the active segment ahead of the writer once it is
/// half used, so the append that reaches the old end finds the space and
/// makes no `fallocate` itself (`growths_inline` stays 0); a batch larger
/// than what was grown ahead (a burst) grows the file on the append path,
/// and that is counted.
#[test]
fn growth_ahead_of_the_writer_is_not_counted_inline_but_a_burst_is() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogOptions::default()).unwrap();
    // 40 KiB: past half of the first 64 KiB step.
    append_all(&log, 0, 40, 1000);
    settle(&log);
    assert_eq!(log.stats().disk_bytes, 2 * SEGMENT_GROWTH_STEP_MIN, "grown one step ahead");
    // Up to about 100 KiB: past the first step, within the second.
    append_all(&log, 40, 60, 1000);
    assert_eq!(log.stats().growths_inline, 0, "the space was there");
    // 500 KiB at once: past what was grown ahead.
    append_all(&log, 100, 500, 1000);
    let stats = log.stats();
    assert_eq!(stats.growths_inline, 1, "{stats:?}");
    assert!(stats.disk_bytes >= stats.data_bytes);
}
