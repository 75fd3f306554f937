use std::time::Instant;

use bytes::Bytes;

use super::{
    flusher::{Cycle, JournalWrite},
    *,
};
use crate::{
    file::{Faults, Io},
    limits::SEGMENT_SIZE_MIN,
};

fn options(sync_policy: SyncPolicy) -> LogOptions {
    LogOptions { segment_size: SEGMENT_SIZE_MIN, record_size_max: 16 * 1024, sync_policy, ..LogOptions::default() }
}

fn record(size: usize) -> NewRecord {
    NewRecord { payload: Bytes::from(vec![b'x'; size]), ..NewRecord::default() }
}

fn ack_journal_size(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(crate::acks::FILE_NAME)).unwrap().len()
}

/// An ack is journaled only once the record it acks is synced: a flusher
/// cycle whose snapshot predates the append (so it syncs nothing of it)
/// keeps the ack buffered; the next cycle, which syncs the record, writes it.
#[test]
fn acks_are_journaled_only_after_their_records_are_synced() {
    let dir = tempfile::tempdir().unwrap();
    // A long interval keeps the background flusher out of the way.
    let log = Log::open(dir.path(), options(SyncPolicy::Interval { interval_ms: 60_000 })).unwrap();
    let shared = Arc::clone(&log.shared);
    let cycle = |dirty: Vec<Arc<Segment>>, point: Option<Point>| Cycle {
        data_target: 0,
        acks_target: 0,
        dirty,
        point,
        checkpoint_due: false,
        shutdown: false,
        acks_paused: false,
        sync_dir: false,
    };
    let before = shared.commit.lock().point;
    let _ = log.append(&[record(100), record(100)]).unwrap();
    let _commit = log.ack(0, 2, AckKind::Acked).unwrap();
    assert_eq!(ack_journal_size(dir.path()), 16, "nothing journaled yet");

    assert_eq!(shared.flush_once(&cycle(Vec::new(), before)).unwrap(), JournalWrite::Written);
    assert_eq!(ack_journal_size(dir.path()), 16, "an ack was journaled before its record was synced");
    assert!(shared.acks.lock().journal.has_buffered());

    let (dirty, after) = {
        let mut commit = shared.commit.lock();
        (std::mem::take(&mut commit.dirty), commit.point)
    };
    assert_eq!(after.map(|p| p.next_offset), Some(2));
    shared.flush_once(&cycle(dirty, after)).unwrap();
    assert_eq!(ack_journal_size(dir.path()), 16 + 24, "the ack is journaled once its records are synced");
    assert!(!shared.acks.lock().journal.has_buffered());
}

/// Under `Interval`, wake-ups of the flusher do not postpone the periodic
/// sync: it happens on time while something keeps waking the flusher.
#[test]
fn wakeups_do_not_postpone_the_interval_sync() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), options(SyncPolicy::Interval { interval_ms: 200 })).unwrap();
    let _ = log.append(&[record(100)]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while log.stats().sync_count == 0 {
        assert!(Instant::now() < deadline, "no sync within 10 s of a 200 ms interval");
        log.shared.wake();
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A full disk while writing the ack journal makes the flusher retry after
/// a pause, not in a busy loop; the ack commits once space returns.
#[test]
fn ack_journal_disk_full_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let log = Log::open(dir.path(), LogOptions { faults: Some(faults.clone()), ..options(SyncPolicy::Fsync) }).unwrap();
    log.append(&[record(100)]).unwrap().commit.wait().unwrap();
    faults.set_disk_full(true);
    let commit = log.ack(0, 1, AckKind::Acked).unwrap();
    let window = Duration::from_millis(500);
    std::thread::sleep(window);
    let hits = faults.disk_full_hits.load(std::sync::atomic::Ordering::SeqCst);
    assert!(hits >= 1, "the ack journal was written");
    assert!(hits <= 20, "{hits} ack journal writes hit ENOSPC within {window:?}: a busy loop");
    assert!(!commit.is_resolved(), "the ack is not durable while the disk is full");
    faults.set_disk_full(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !commit.is_resolved() {
        assert!(Instant::now() < deadline, "the ack did not commit within 10 s of space returning");
        std::thread::yield_now();
    }
    commit.wait().unwrap();
}

/// A segment whose map fails while rolling fails that append only: the next
/// append creates the segment again and succeeds.
#[test]
fn failed_segment_map_does_not_block_later_appends() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let log = Log::open(dir.path(), LogOptions { faults: Some(faults.clone()), ..options(SyncPolicy::Fsync) }).unwrap();
    let batch: Vec<NewRecord> = (0..100).map(|_| record(1000)).collect();
    faults.fail_maps(1);
    assert!(matches!(log.append(&batch), Err(AppendError::Io { .. })));
    assert_eq!(log.next_offset(), 0);
    log.append(&batch).expect("the segment is created again").commit.wait().unwrap();
    assert_eq!(log.next_offset(), 100);
}

/// A group commit syncs the ack journal only when it wrote ack entries to
/// it: cycles of a publish-only workload pay one device flush (the
/// segment's), not two; an ack still gets its journal synced before its
/// commit resolves.
#[test]
fn ack_journal_is_synced_only_when_written() {
    use std::os::unix::fs::MetadataExt;

    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let log = Log::open(dir.path(), LogOptions { faults: Some(faults.clone()), ..options(SyncPolicy::Fsync) }).unwrap();
    let acks_inode = std::fs::metadata(dir.path().join(crate::acks::FILE_NAME)).unwrap().ino();
    let acks_syncs = || faults.synced_inodes.lock().iter().filter(|&&inode| inode == acks_inode).count();
    let at_open = acks_syncs();

    for _ in 0..5 {
        log.append(&[record(100)]).unwrap().commit.wait().unwrap();
    }
    let stats = log.stats();
    assert!(stats.sync_count >= 1);
    assert_eq!(stats.ack_sync_count, 0, "group commits without acks synced the ack journal");
    assert_eq!(acks_syncs(), at_open, "the ack journal was fdatasynced with nothing written to it");

    log.ack(0, 3, AckKind::Acked).unwrap().wait().unwrap();
    assert_eq!(ack_journal_size(dir.path()), 16 + 24, "the ack is journaled before its commit resolves");
    assert_eq!(log.stats().ack_sync_count, 1);
    assert_eq!(acks_syncs(), at_open + 1, "the ack's entry was synced before its commit resolved");

    for _ in 0..5 {
        log.append(&[record(100)]).unwrap().commit.wait().unwrap();
    }
    assert_eq!(log.stats().ack_sync_count, 1, "the journal is clean again after its sync");
    assert_eq!(acks_syncs(), at_open + 1);
}

/// Appends `batch` on another thread while every sync is held, and returns
/// its result: an append that made a device flush would still be blocked
/// when the bound (generous, for a loaded machine) runs out.
fn append_with_syncs_held(log: &Arc<Log>, faults: &Faults, batch: Vec<NewRecord>) -> Appended {
    faults.hold_syncs(true);
    let (tx, rx) = std::sync::mpsc::channel();
    let appender = Arc::clone(log);
    std::thread::spawn(move || tx.send(appender.append(&batch)));
    let appended = rx.recv_timeout(std::time::Duration::from_secs(30));
    faults.hold_syncs(false);
    appended.expect("the append made a device flush (it blocked on a held sync)").unwrap()
}

/// A roll makes no device flush on the appending thread, whether it takes
/// the spare or (no spare ready) creates the file inline: with every sync
/// held the append still returns. Its commit resolves only after the group
/// commit synced the new segment (its header with the records) and then the
/// directory (its name).
#[test]
fn a_roll_syncs_nothing_on_the_append_path_and_its_commit_waits_for_the_directory() {
    use std::os::unix::fs::MetadataExt;

    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let log = Arc::new(
        Log::open(dir.path(), LogOptions { faults: Some(faults.clone()), ..options(SyncPolicy::Fsync) }).unwrap(),
    );
    let dir_inode = std::fs::metadata(dir.path()).unwrap().ino();
    for (round, spare) in [(0u64, false), (1, true)] {
        if spare {
            // Past the fill threshold; the second cycle runs only after the
            // first one's turn, which prepared the spare.
            log.sync().unwrap();
            log.sync().unwrap();
            assert_eq!(log.stats().spare_bytes, crate::limits::SEGMENT_GROWTH_STEP_MIN);
        }
        faults.synced_inodes.lock().clear();
        // More than the rest of the 64 KiB segment, less than another one.
        let count = if spare { 50 } else { 100 };
        let appended = append_with_syncs_held(&log, &faults, (0..count).map(|_| record(1000)).collect());
        appended.commit.wait().unwrap();
        let stats = log.stats();
        assert_eq!((stats.rolls_inline, stats.rolls_from_spare), (1, round), "round {round}: {stats:?}");
        let segments = log.shared.segments.read().clone();
        let new_inode = std::fs::metadata(&segments.last().unwrap().path).unwrap().ino();
        let synced = faults.synced_inodes.lock().clone();
        let segment_at = synced.iter().position(|&i| i == new_inode).expect("the new segment was synced");
        let dir_at = synced.iter().position(|&i| i == dir_inode).expect("the directory was synced");
        assert!(segment_at < dir_at, "round {round}: the directory is synced after the segment: {synced:?}");
    }
}

/// Under a timed policy the flusher's cycles run at its deadlines only; a
/// step between them (the writer wakes it when a batch crosses half of the
/// allocation or the spare's fill threshold, `Shared::ahead_due`) still
/// does the work ahead of the writer: growth first, then the spare.
#[test]
fn a_step_between_deadlines_grows_ahead_and_prepares_the_spare() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions { segment_size: 1 << 20, ..options(SyncPolicy::Interval { interval_ms: 60_000 }) };
    let log = Log::open(dir.path(), options).unwrap();
    let step = || {
        // The pool may run a step too; they take turns on `flusher`.
        let step = Job::step(&*log.shared);
        assert!(matches!(step, Step::WaitUntil(_) | Step::Idle), "no cycle is due: {step:?}");
    };
    // 40 KiB: past half of the first 64 KiB step, far below half the segment.
    let appended = log.append(&(0..40).map(|_| record(1000)).collect::<Vec<_>>()).unwrap();
    assert!(Shared::ahead_due(&log.shared.segments.read()[0], SEGMENT_HEADER_SIZE, 64 + 40 * 1040));
    drop(appended);
    step();
    let stats = log.stats();
    assert_eq!((stats.disk_bytes, stats.spare_bytes), (2 * crate::limits::SEGMENT_GROWTH_STEP_MIN, 0), "{stats:?}");
    // Past half of the segment: the spare.
    log.append(&(0..500).map(|_| record(1000)).collect::<Vec<_>>()).unwrap();
    step();
    assert_eq!(log.stats().spare_bytes, crate::limits::SEGMENT_GROWTH_STEP_MIN);
}

/// The writer wakes the flusher only when a batch crosses one of the
/// points where work ahead of it is due, not on every append.
#[test]
fn work_ahead_is_due_only_when_a_batch_crosses_its_point() {
    let dir = tempfile::tempdir().unwrap();
    let segment = Segment::create(&Io::default(), dir.path(), 0, 1 << 20, SEGMENT_HEADER_SIZE).unwrap();
    // Allocated 64 KiB: half is 32 KiB; the spare's point is 512 KiB.
    for (from, to, due) in [
        (64, 32 * 1024, false),
        (64, 32 * 1024 + 1, true),
        (32 * 1024, 32 * 1024 + 8, true),
        (32 * 1024 + 1, 40 * 1024, false),
        (500 * 1024, 512 * 1024, false),
        (500 * 1024, 512 * 1024 + 1, true),
        (512 * 1024 + 1, 600 * 1024, false),
    ] {
        assert_eq!(Shared::ahead_due(&segment, from, to), due, "{from}..{to}");
    }
}
