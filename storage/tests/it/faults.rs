//! Full disks and failing syncs (of data, journals, and the directory after
//! a segment roll).

use std::{path::PathBuf, process::Command};

use ballast_storage::{AppendError, Faults, Log, LogOptions, NewRecord};

use crate::{spare, support::*};

fn options_256k() -> LogOptions {
    LogOptions { segment_size: 256 * 1024, record_size_max: 16 * 1024, ..LogOptions::default() }
}

/// Appends 1 KiB records until the log refuses with `DiskFull`; returns how
/// many were acknowledged. Every acknowledged one must stay readable.
fn fill_until_full(log: &Log) -> u64 {
    let mut acknowledged = 0;
    loop {
        let batch: Vec<_> = (acknowledged..acknowledged + 16).map(|i| record(i, 1024)).collect();
        match log.append(&batch) {
            Ok(appended) => {
                appended.commit.wait().expect("a sync on a full tmpfs still succeeds");
                acknowledged += 16;
            }
            Err(AppendError::DiskFull { path }) => {
                assert!(path.extension().is_some_and(|e| e == "seg"), "DiskFull names the segment: {path:?}");
                return acknowledged;
            }
            Err(e) => panic!("expected DiskFull, got {e}"),
        }
        assert!(acknowledged < 1_000_000, "the disk never filled");
    }
}

fn check_full_then_recovered(log: &Log, free_space: impl FnOnce()) {
    let acknowledged = fill_until_full(log);
    assert!(acknowledged > 0);
    assert_eq!(log.next_offset(), acknowledged, "a refused batch leaves nothing behind");
    // Single records still fit in what is left of the current, preallocated
    // segment; then they are refused too, and keep being refused.
    let mut acknowledged = acknowledged;
    while let Ok(a) = log.append(&[record(acknowledged, 1024)]) {
        a.commit.wait().unwrap();
        acknowledged += 1;
    }
    assert!(matches!(log.append(&[record(0, 1024)]), Err(AppendError::DiskFull { .. })));
    assert_eq!(log.next_offset(), acknowledged);
    for offset in [0, acknowledged / 2, acknowledged - 1] {
        assert_eq!(payload_index(&log.read(offset).unwrap().payload), offset);
    }
    free_space();
    let batch: Vec<_> = (acknowledged..acknowledged + 300).map(|i| record(i, 1024)).collect();
    log.append(&batch).expect("appends resume once space returns").commit.wait().unwrap();
    assert_eq!(payload_index(&log.read(acknowledged + 299).unwrap().payload), acknowledged + 299);
}

/// ENOSPC on a real, tiny filesystem: a 4 MiB tmpfs mounted for the test
/// (this needs root, which the CI machine has). Space "returns" when the test
/// deletes a filler file. If mounting is impossible the test fails, saying
/// so, unless `BALLAST_SKIP_TMPFS=1` asks to skip it (then it says so on
/// stderr and checks the seam instead): it never passes silently without
/// the real filesystem.
#[test]
fn enospc_on_a_real_small_filesystem() {
    let Some(mount) = TmpfsMount::new("4m") else {
        enospc_through_fault_injection();
        return;
    };
    let mount_point = &mount.path;
    let filler = mount_point.join("filler");
    std::fs::write(&filler, vec![1u8; 1024 * 1024]).unwrap();
    let dir = mount_point.join("log");
    let log = Log::open(&dir, options_256k()).unwrap();
    check_full_then_recovered(&log, || std::fs::remove_file(&filler).unwrap());
    log.close().unwrap();
    let log = Log::open(&dir, options_256k()).unwrap();
    assert!(log.next_offset() > 300);
    assert_eq!(log.stats().quarantined, 0);
}

/// ENOSPC through the fault-injection seam (`Faults::set_disk_full`), which
/// fails preallocation and file growth as a full disk would.
#[test]
fn enospc_through_fault_injection() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let log = Log::open(dir.path(), LogOptions { faults: Some(faults.clone()), ..options_256k() }).unwrap();
    append_all(&log, 0, 500, 1024);
    faults.set_disk_full(true);
    // The current segment still has room: preallocated space never fails.
    let mut acknowledged = 500;
    loop {
        let batch: Vec<_> = (acknowledged..acknowledged + 16).map(|i| record(i, 1024)).collect();
        match log.append(&batch) {
            Ok(a) => {
                a.commit.wait().unwrap();
                acknowledged += 16;
            }
            Err(AppendError::DiskFull { .. }) => break,
            Err(e) => panic!("expected DiskFull, got {e}"),
        }
    }
    assert_eq!(log.next_offset(), acknowledged);
    faults.set_disk_full(false);
    append_all(&log, acknowledged, 300, 1024);
    log.close().unwrap();
    let log = Log::open(dir.path(), options_256k()).unwrap();
    assert_eq!(log.next_offset(), acknowledged + 300);
    for offset in (0..acknowledged + 300).step_by(97) {
        assert_eq!(payload_index(&log.read(offset).unwrap().payload), offset);
    }
}

/// A failed fsync poisons the log: the pending commit fails, later appends
/// and acks fail with `Poisoned`, and a reopen recovers everything that was
/// acknowledged before.
#[test]
fn failed_sync_poisons_until_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let options = LogOptions { faults: Some(faults.clone()), ..small_options() };
    let log = Log::open(dir.path(), options.clone()).unwrap();
    append_all(&log, 0, 50, 100);
    faults.fail_sync_after(0);
    let appended = log.append(&[record(50, 100)]).unwrap();
    let error = appended.commit.wait().expect_err("the sync failed, so the commit must fail");
    assert_eq!(error.source.raw_os_error(), Some(libc_eio()));
    assert!(matches!(log.append(&[record(51, 100)]), Err(AppendError::Poisoned(_))));
    assert!(matches!(log.ack(0, 1, ballast_storage::AckKind::Acked), Err(ballast_storage::AckError::Poisoned(_))));
    assert!(log.close().is_err(), "close reports the poisoning");
    let log = Log::open(dir.path(), small_options()).unwrap();
    for offset in 0..50 {
        assert_eq!(payload_index(&log.read(offset).unwrap().payload), offset);
    }
    append_all(&log, 1000, 1, 100);
}

/// A failed write poisons the log as well, and nothing of the batch is
/// visible.
#[test]
fn failed_write_poisons() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let log = Log::open(dir.path(), LogOptions { faults: Some(faults.clone()), ..small_options() }).unwrap();
    append_all(&log, 0, 10, 100);
    faults.fail_writes(1);
    assert!(matches!(log.append(&[record(10, 100)]), Err(AppendError::Poisoned(_))));
    assert_eq!(log.next_offset(), 10);
    assert!(matches!(log.append(&[record(10, 100)]), Err(AppendError::Poisoned(_))));
}

fn libc_eio() -> i32 {
    5
}

/// A tmpfs of a given size mounted on a fresh directory, unmounted when
/// dropped (also when the test panics).
struct TmpfsMount {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TmpfsMount {
    /// Mounts one, or reports loudly why not: `None` only when
    /// `BALLAST_SKIP_TMPFS=1` allows skipping; otherwise a failed mount
    /// fails the test.
    fn new(size: &str) -> Option<TmpfsMount> {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let why = match output {
            Ok(out) if out.status.success() => {
                return Some(TmpfsMount { path: dir.path().to_owned(), _dir: dir });
            }
            Ok(out) => format!("mount exited with {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
            Err(e) => format!("cannot run mount: {e}"),
        };
        let skip = std::env::var("BALLAST_SKIP_TMPFS").is_ok_and(|v| v == "1");
        eprintln!("\n*** cannot mount a {size} tmpfs for a real ENOSPC test ({why}); the test needs root ***");
        assert!(skip, "mounting a tmpfs failed ({why}); run as root, or set BALLAST_SKIP_TMPFS=1 to skip this check");
        eprintln!("*** BALLAST_SKIP_TMPFS=1: skipping the real filesystem, checking the fault seam only ***\n");
        None
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        match Command::new("umount").arg(&self.path).status() {
            Ok(status) if status.success() => {}
            other => eprintln!("umount {} failed: {other:?}", self.path.display()),
        }
    }
}

/// A log poisoned by a failed fsync recovers in place with `reopen`:
/// every acknowledged record stays, the record whose commit failed is cut
/// (post-fsyncgate: its pages may be marked clean without being on disk,
/// so they are never trusted), its commit and any commit pending from
/// before stay failed, appends and acks work again on the same `Log`, a
/// cursor taken before goes on, and a later open agrees.
#[test]
fn failed_sync_then_reopen_keeps_every_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let options = LogOptions { faults: Some(faults.clone()), ..small_options() };
    let log = Log::open(dir.path(), options).unwrap();
    assert!(!log.reopen().unwrap(), "a healthy log has nothing to reopen");
    // Enough to span segments, so the cut is not only in the first one.
    for i in 0..10 {
        append_all(&log, i * 20, 20, 500);
    }
    let mut cursor = log.cursor(0);
    for offset in 0..150 {
        assert_eq!(payload_index(&cursor.next().unwrap().unwrap().payload), offset);
    }
    settle(&log);
    faults.fail_sync_after(0);
    let lost = log.append(&[record(9_000, 500)]).unwrap();
    assert_eq!(lost.first_offset, 200);
    let error = lost.commit.wait().expect_err("the sync failed");
    assert_eq!(error.source.raw_os_error(), Some(libc_eio()));
    assert!(log.poisoned().is_some());
    assert!(matches!(log.append(&[record(9_001, 500)]), Err(AppendError::Poisoned(_))));

    assert!(log.reopen().expect("the disk works again"));
    assert!(log.poisoned().is_none());
    assert_eq!(log.next_offset(), 200, "the record whose sync failed is cut, its offset reused");
    for offset in 150..200 {
        assert_eq!(payload_index(&cursor.next().unwrap().unwrap().payload), offset, "the old cursor goes on");
    }
    assert!(cursor.next().is_none(), "nothing past the trusted end");
    append_all(&log, 200, 30, 500);
    assert_eq!(payload_index(&cursor.next().unwrap().unwrap().payload), 200);
    log.ack(0, 100, ballast_storage::AckKind::Acked).unwrap().wait().unwrap();
    log.close().unwrap();

    let log = Log::open(dir.path(), small_options()).unwrap();
    assert_eq!(log.next_offset(), 230);
    assert_eq!(log.ack_floor(), 100);
    for offset in 100..230 {
        assert_eq!(payload_index(&log.read(offset).unwrap().payload), offset);
    }
    assert_eq!(log.stats().quarantined, 0);
}

/// A failed write poisons too; a reopen that meets the failing disk again
/// fails and leaves the log poisoned (and may be retried), and the next one
/// recovers with the acknowledged records intact.
#[test]
fn failed_write_then_reopen_retries_until_the_disk_works() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let log = Log::open(dir.path(), LogOptions { faults: Some(faults.clone()), ..small_options() }).unwrap();
    append_all(&log, 0, 10, 100);
    faults.fail_writes(1);
    assert!(matches!(log.append(&[record(10, 100)]), Err(AppendError::Poisoned(_))));
    // The reopen's own syncs fail: still poisoned.
    faults.fail_sync_after(0);
    assert!(log.reopen().is_err());
    assert!(log.poisoned().is_some());
    assert!(matches!(log.append(&[record(10, 100)]), Err(AppendError::Poisoned(_))));
    assert!(log.reopen().unwrap());
    assert_eq!(log.next_offset(), 10);
    append_all(&log, 10, 5, 100);
    for offset in 0..15 {
        assert_eq!(payload_index(&log.read(offset).unwrap().payload), offset);
    }
    log.close().unwrap();
    let log = Log::open(dir.path(), small_options()).unwrap();
    assert_eq!(log.next_offset(), 15);
}

/// Under the interval policy commits resolve once written, so every
/// record was acknowledged: a reopen after a failed sync cuts none of them
/// (it writes their bytes again for recovery's syncs), and a later open
/// agrees.
#[test]
fn reopen_under_the_interval_policy_keeps_every_written_record() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let options = LogOptions {
        faults: Some(faults.clone()),
        sync_policy: ballast_storage::SyncPolicy::Interval { interval_ms: 60_000 },
        ..small_options()
    };
    let log = Log::open(dir.path(), options).unwrap();
    append_all(&log, 0, 100, 500);
    // The spare prepared after this (the segment is past half full) has
    // synced, so the failure below hits the data sync. The next batch rolls
    // onto the spare but leaves the new segment below the fill threshold,
    // so no other spare is prepared.
    settle(&log);
    append_all(&log, 100, 30, 500);
    faults.fail_sync_after(0);
    assert!(log.sync().is_err());
    assert!(log.poisoned().is_some());
    assert!(log.reopen().unwrap());
    assert_eq!(log.next_offset(), 130, "nothing acknowledged is cut");
    append_all(&log, 130, 10, 500);
    log.close().unwrap();
    let log = Log::open(dir.path(), small_options()).unwrap();
    assert_eq!(log.next_offset(), 140);
    for offset in 0..140 {
        assert_eq!(payload_index(&log.read(offset).unwrap().payload), offset);
    }
}

/// A log whose reopen failed still reports its poisoning when closed.
#[test]
fn close_after_a_failed_reopen_reports_the_poisoning() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let log = Log::open(dir.path(), LogOptions { faults: Some(faults.clone()), ..small_options() }).unwrap();
    append_all(&log, 0, 3, 100);
    faults.fail_writes(1);
    assert!(log.append(&[record(3, 100)]).is_err());
    faults.fail_syncs(u64::MAX);
    assert!(log.reopen().is_err());
    assert!(log.close().is_err(), "close reports the poisoning");
    faults.fail_syncs(0);
    let log = Log::open(dir.path(), small_options()).unwrap();
    assert_eq!(log.next_offset(), 3);
}

/// A full disk during an ack-journal compaction does not poison the log:
/// the compaction writes a temporary copy first, so the journal is intact
/// and the compaction is simply tried later (found by `ballast-bench chaos
/// --disk-full`, where it poisoned the lane and failed its publishes).
/// The ack taken meanwhile stays buffered, is journaled once space returns
/// and survives a reopen.
#[test]
fn a_full_disk_during_a_journal_compaction_defers_it() {
    use ballast_storage::AckKind;
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let options = LogOptions { faults: Some(faults.clone()), ..options_256k() };
    let log = Log::open(dir.path(), options).unwrap();
    const ACKED: u64 = 1100;
    append_all(&log, 0, ACKED + 10, 64);
    // Offset 0 stays unacked, so the floor does not move and nothing
    // compacts while the journal grows to one entry per ack (1..=1100,
    // each synced on its own): past the compaction threshold.
    for offset in 1..=ACKED {
        log.ack(offset, 1, AckKind::Acked).unwrap().wait().unwrap();
    }
    faults.set_disk_full(true);
    // Acking 0 moves the floor: the next flush tries to journal it (the
    // disk is full: it stays buffered) and then to compact the journal.
    let pending = log.ack(0, 1, AckKind::Acked).unwrap();
    // The fault window covers that flush and its retries (every 100 ms).
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(log.poisoned().is_none(), "a deferred compaction must not poison: {:?}", log.poisoned());
    faults.set_disk_full(false);
    pending.wait().expect("the buffered ack is journaled once space returns");
    assert!(log.poisoned().is_none());
    log.close().unwrap();
    let log = Log::open(dir.path(), options_256k()).unwrap();
    assert_eq!(log.ack_floor(), ACKED + 1, "every ack survives the reopen");
}

/// A full disk while the flusher prepares the spare leaves none (and
/// poisons nothing); the roll then goes inline, meets the full disk too
/// and refuses its batch cleanly; once space returns it goes through. The
/// failed spare is not tried again every cycle, only once the log has
/// rolled to a new segment.
#[test]
fn a_full_disk_while_preparing_the_spare_leaves_the_roll_to_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let log = Log::open(dir.path(), LogOptions { faults: Some(faults.clone()), ..spare::options() }).unwrap();
    // Full before the threshold is passed: the records fit in the space
    // the segment already has.
    faults.set_disk_full(true);
    spare::fill_past_the_threshold(&log);
    settle(&log);
    assert_eq!(log.stats().spare_bytes, 0);
    assert!(!spare::spare_path(dir.path()).exists(), "a failed spare leaves no file");
    let batch: Vec<NewRecord> = (10..20).map(|i| spare::record_of(i, 4000)).collect();
    assert!(matches!(log.append(&batch), Err(ballast_storage::AppendError::DiskFull { .. })));
    assert!(log.poisoned().is_none());
    faults.set_disk_full(false);
    settle(&log);
    assert_eq!(log.stats().spare_bytes, 0, "not tried again while the same segment is active");
    log.append(&batch).unwrap().commit.wait().unwrap();
    assert_eq!(log.stats().rolls_inline, 1);
    // The new segment past the threshold: a spare again.
    spare::append_range(&log, 20..30);
    settle(&log);
    assert_eq!(log.stats().spare_bytes, ballast_storage::limits::SEGMENT_GROWTH_STEP_MIN);
    spare::check_records(&log, 0..30);
}

/// A failed directory sync after a roll poisons the log (the roll's name
/// may not be durable) and fails the batch's commit; the reopen keeps
/// every record acknowledged before it, and the log rolls again.
#[test]
fn a_failed_directory_sync_after_a_roll_fails_its_commit_and_reopen_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let log = Log::open(dir.path(), LogOptions { faults: Some(faults.clone()), ..spare::options() }).unwrap();
    spare::fill_past_the_threshold(&log);
    settle(&log);
    faults.fail_dir_syncs(1);
    let batch: Vec<NewRecord> = (10..20).map(|i| spare::record_of(i, 4000)).collect();
    let appended = log.append(&batch).unwrap();
    assert!(appended.commit.wait().is_err(), "the commit waits for the directory sync");
    assert!(log.poisoned().is_some());
    assert!(log.reopen().unwrap());
    assert_eq!((log.next_offset(), log.stats().quarantined), (10, 0));
    log.append(&batch).unwrap().commit.wait().unwrap();
    spare::close_and_reopen_holding(log, dir.path(), 20);
}
