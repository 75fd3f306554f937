//! Segment rollover off the append path: the flusher prepares a spare
//! segment file ahead of need, the roll renames it; every crash state of a
//! roll recovers without garbage and without losing an acknowledged record.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use ballast_storage::{
    Log, LogOptions, NewRecord,
    limits::{SEGMENT_GROWTH_STEP_MIN, SPARE_PREPARE_FILL_PERCENT},
};
use bytes::Bytes;

use crate::support::*;

const SEGMENT: u64 = 64 * 1024;

pub fn options() -> LogOptions {
    LogOptions { segment_size: SEGMENT, record_size_max: 48 * 1024, ..LogOptions::default() }
}

pub fn spare_path(dir: &Path) -> PathBuf {
    dir.join("spare")
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// A record whose padded size on disk is exactly `stored` bytes (a multiple
/// of 8, at least 48): a 40-byte header and the rest payload.
pub fn record_of(i: u64, stored: u64) -> NewRecord {
    let mut payload = format!("record-{i}-").into_bytes();
    payload.resize(stored as usize - 40, b'x');
    NewRecord { timestamp_ms: 1_000 + i, payload: Bytes::from(payload), ..NewRecord::default() }
}

/// Appends records 0..10 one call each (40,000 bytes, past the fill
/// threshold of the 64 KiB segment), each waiting for its commit.
pub fn fill_past_the_threshold(log: &Log) {
    for i in 0..10 {
        log.append(&[record_of(i, 4000)]).unwrap().commit.wait().unwrap();
    }
}

/// A log whose first segment holds records 0..10 (40,000 bytes, past the
/// fill threshold) with the spare prepared; returns the offset the next
/// segment will have.
fn log_with_a_spare(dir: &Path) -> Log {
    let log = Log::open(dir, options()).unwrap();
    fill_past_the_threshold(&log);
    settle(&log);
    assert_eq!(log.stats().spare_bytes, SEGMENT_GROWTH_STEP_MIN, "the spare is ready");
    log
}

/// Appends the records `offsets` (4,000 bytes each on disk) in one batch
/// and waits for its commit.
pub fn append_range(log: &Log, offsets: std::ops::Range<u64>) {
    let batch: Vec<NewRecord> = offsets.map(|i| record_of(i, 4000)).collect();
    log.append(&batch).unwrap().commit.wait().unwrap();
}

/// Overwrites `bytes` at `pos` of the file at `path`, as a crash image.
fn overwrite(path: &Path, bytes: &[u8], pos: u64) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, bytes, pos).unwrap();
}

/// A log with its spare ready (`log_with_a_spare`) and a copy of its
/// directory taken then: the crash image a test edits into the state it
/// means.
fn spare_and_image() -> (tempfile::TempDir, Log, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with_a_spare(dir.path());
    let image = tempfile::tempdir().unwrap();
    crate::corruption::copy_dir(dir.path(), image.path());
    (dir, log, image)
}

/// Opens the log in `dir` and checks where it ends and what it quarantined.
pub fn open_expecting(dir: &Path, next_offset: u64, quarantined: u64) -> Log {
    let log = Log::open(dir, options()).unwrap();
    assert_eq!((log.next_offset(), log.stats().quarantined), (next_offset, quarantined));
    log
}

/// Closes `log`, opens `dir` again and checks that it holds exactly the
/// records `0..count`, nothing quarantined.
pub fn close_and_reopen_holding(log: Log, dir: &Path, count: u64) {
    log.close().unwrap();
    let log = open_expecting(dir, count, 0);
    check_records(&log, 0..count);
}

/// Whether recovery set any segment aside.
fn set_aside(dir: &Path) -> bool {
    names(dir).iter().any(|n| n.ends_with(".corrupt"))
}

/// The records of `offsets` all read back with their own payloads.
pub fn check_records(log: &Log, offsets: std::ops::Range<u64>) {
    for offset in offsets {
        assert_eq!(payload_index(&log.read(offset).unwrap().payload), offset);
    }
}

/// The spare is prepared once the active segment's data (header included)
/// passes `SPARE_PREPARE_FILL_PERCENT` of the segment size: not at exactly
/// that fill, and as soon as one more record passes it.
#[test]
fn the_spare_is_prepared_only_past_the_fill_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), options()).unwrap();
    let threshold = SEGMENT * SPARE_PREPARE_FILL_PERCENT / 100;
    log.append(&[record_of(0, threshold - 64)]).unwrap().commit.wait().unwrap();
    assert_eq!(log.stats().data_bytes, threshold);
    settle(&log);
    assert_eq!(log.stats().spare_bytes, 0, "at the threshold: no spare yet");
    assert!(!spare_path(dir.path()).exists());

    log.append(&[record_of(1, 48)]).unwrap().commit.wait().unwrap();
    settle(&log);
    let stats = log.stats();
    assert_eq!(stats.spare_bytes, SEGMENT_GROWTH_STEP_MIN, "one record past it: the spare is ready");
    assert_eq!(stats.disk_bytes, 2 * SEGMENT_GROWTH_STEP_MIN, "disk_bytes counts the spare");
    assert_eq!(std::fs::metadata(spare_path(dir.path())).unwrap().len(), SEGMENT_GROWTH_STEP_MIN);
}

/// The append that crosses the segment boundary takes the spare: the new
/// segment is the spare's file (same inode) under its segment name, no file
/// is created inline, and the records survive a close and an open.
#[test]
fn a_roll_takes_the_prepared_spare() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with_a_spare(dir.path());
    let spare_inode = std::fs::metadata(spare_path(dir.path())).unwrap().ino();
    // 10 × 4,000 bytes left room for 6 more: the batch of 10 rolls once.
    append_range(&log, 10..20);
    let stats = log.stats();
    assert_eq!((stats.rolls_from_spare, stats.rolls_inline, stats.segment_count), (1, 0, 2), "{stats:?}");
    assert!(!spare_path(dir.path()).exists(), "the spare was renamed");
    assert_eq!(std::fs::metadata(segment_path(dir.path(), 16)).unwrap().ino(), spare_inode);
    check_records(&log, 0..20);
    close_and_reopen_holding(log, dir.path(), 20);
}

/// A batch that crosses a segment before the flusher prepared a spare (a
/// burst) rolls inline: counted, and durable like any other.
#[test]
fn a_roll_without_a_spare_is_made_inline_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), options()).unwrap();
    append_range(&log, 0..40);
    let stats = log.stats();
    assert_eq!((stats.rolls_from_spare, stats.rolls_inline, stats.segment_count), (0, 2, 3), "{stats:?}");
    drop(log);
    let log = open_expecting(dir.path(), 40, 0);
    check_records(&log, 0..40);
}

/// Crash point: a spare left by an earlier run (unused, or garbage), and
/// an inline roll's `roll.tmp` cut before its rename, are removed at open,
/// and the log rolls normally afterwards.
#[test]
fn a_spare_left_by_an_earlier_run_is_removed_at_open() {
    for garbage in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with_a_spare(dir.path());
        log.close().unwrap();
        if garbage {
            std::fs::write(spare_path(dir.path()), vec![0xA5; 5000]).unwrap();
        }
        // An inline roll's own spare, cut before its rename.
        std::fs::copy(spare_path(dir.path()), dir.path().join("roll.tmp")).unwrap();
        let log = Log::open(dir.path(), options()).unwrap();
        assert!(!spare_path(dir.path()).exists(), "garbage {garbage}: the spare is removed");
        assert!(!dir.path().join("roll.tmp").exists(), "an inline roll's spare is removed");
        assert_eq!((log.next_offset(), log.stats().spare_bytes), (10, 0));
        append_range(&log, 10..20);
        check_records(&log, 0..20);
    }
}

/// Crash point: the roll renamed the spare but neither its new header nor
/// any of its records reached the disk (the name did, by a journal commit
/// of its own), so `<base>.seg` still holds the spare's header, and maybe
/// some record bytes. Nothing in it was acknowledged (its commit waits for
/// the group commit that syncs the header): it is removed, nothing is set
/// aside or quarantined, the records before it stay, and the log rolls
/// again at the same base.
#[test]
fn a_rolled_spare_whose_header_never_reached_the_disk_is_removed() {
    let (_dir, log, image) = spare_and_image();
    drop(log);
    let rolled = segment_path(image.path(), 10);
    std::fs::rename(spare_path(image.path()), &rolled).unwrap();
    let encoded = {
        let scratch = tempfile::tempdir().unwrap();
        let log = Log::open(scratch.path(), options()).unwrap();
        log.append(&[record_of(10, 4000)]).unwrap().commit.wait().unwrap();
        drop(log);
        std::fs::read(segment_path(scratch.path(), 0)).unwrap()[64..4064].to_vec()
    };
    overwrite(&rolled, &encoded, 64);

    let log = Log::open(image.path(), options()).unwrap();
    assert!(!rolled.exists(), "the spare-headed segment is removed");
    assert!(!set_aside(image.path()), "nothing set aside");
    assert_eq!((log.next_offset(), log.stats().quarantined), (10, 0));
    check_records(&log, 0..10);
    append_range(&log, 10..20);
    close_and_reopen_holding(log, image.path(), 20);
}

/// Crash point: the roll wrote the new header and records into the spare,
/// but the rename never reached the disk, so `spare` holds a real segment
/// that no name points to. Its records were not acknowledged (their commit
/// waits for the directory sync): the spare is removed and the log ends
/// where its named segments end.
#[test]
fn a_roll_whose_rename_never_reached_the_disk_leaves_the_log_before_it() {
    let (dir, log, image) = spare_and_image();
    append_range(&log, 10..20);
    drop(log);
    std::fs::copy(segment_path(dir.path(), 16), spare_path(image.path())).unwrap();

    let log = Log::open(image.path(), options()).unwrap();
    assert!(!spare_path(image.path()).exists());
    assert_eq!((log.next_offset(), log.stats().quarantined), (10, 0));
    check_records(&log, 0..10);
}

/// Crash point: two rolls, and the first one's header never reached the
/// disk while the second segment did (written back by the kernel). Neither
/// was acknowledged; the spare-headed one is removed, its offsets are
/// quarantined (never handed out again, since a later segment holds higher
/// ones), the later segment's records are read, nothing is set aside.
#[test]
fn a_spare_headed_segment_before_a_later_one_becomes_a_quarantined_gap() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with_a_spare(dir.path());
    let spare_header = std::fs::read(spare_path(dir.path())).unwrap()[..64].to_vec();
    append_range(&log, 10..40);
    drop(log);
    // Segments 0, 16 and 32: 16's header becomes the spare's again, and no
    // checkpoint vouches for anything (it would have needed 16 synced).
    overwrite(&segment_path(dir.path(), 16), &spare_header, 0);
    std::fs::remove_file(dir.path().join("checkpoint")).unwrap();

    let log = Log::open(dir.path(), options()).unwrap();
    assert!(!segment_path(dir.path(), 16).exists());
    assert!(!set_aside(dir.path()), "nothing set aside");
    assert_eq!(log.stats().quarantined, 16, "offsets 16..32 are quarantined");
    assert_eq!(log.next_offset(), 40);
    check_records(&log, 0..16);
    check_records(&log, 32..40);
    assert!((16..32).all(|offset| log.is_done(offset)));
}
