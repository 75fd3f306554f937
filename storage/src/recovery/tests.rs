use std::os::unix::fs::MetadataExt;

use super::*;
use crate::{Log, NewRecord, file::Faults, limits::SEGMENT_SIZE_MIN};

fn options() -> LogOptions {
    LogOptions { segment_size: SEGMENT_SIZE_MIN, record_size_max: 16 * 1024, ..LogOptions::default() }
}

/// Writes `count` records of 1,000 bytes to a log in `dir` and closes it,
/// then (after `before`, which sees the closed log) removes its
/// checkpoint: the next open's scan covers every segment, as after a crash
/// before the first checkpoint.
fn log_without_checkpoint<T>(dir: &Path, count: usize, before: impl FnOnce(&Path) -> T) -> T {
    let log = Log::open(dir, options()).unwrap();
    let batch: Vec<NewRecord> = (0..count)
        .map(|_| NewRecord { payload: bytes::Bytes::from(vec![7u8; 1000]), ..NewRecord::default() })
        .collect();
    log.append(&batch).unwrap().commit.wait().unwrap();
    log.close().unwrap();
    let seen = before(dir);
    fs::remove_file(dir.join(crate::checkpoint::FILE_NAME)).unwrap();
    seen
}

fn segment_inodes(dir: &Path) -> Vec<u64> {
    let mut inodes: Vec<(String, u64)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().ino()))
        .collect();
    inodes.sort();
    inodes.into_iter().map(|(_, ino)| ino).collect()
}

/// Recovery syncs every segment its scan covered, not only the last one,
/// before its checkpoint vouches for them: a crash can leave records of an
/// earlier segment in the page cache only.
#[test]
fn every_scanned_segment_is_synced() {
    let dir = tempfile::tempdir().unwrap();
    let inodes = log_without_checkpoint(dir.path(), 200, segment_inodes);
    assert!(inodes.len() >= 3, "200 KB of records fill several 64 KiB segments");

    let faults = Faults::new();
    let recovered = recover(
        &std::sync::Arc::from(dir.path()),
        &options(),
        &Io::new(Some(faults.clone()), Default::default()),
        None,
    )
    .unwrap();
    assert_eq!(recovered.point.next_offset, 200);
    let synced = faults.synced_inodes.lock().clone();
    for (index, inode) in inodes.iter().enumerate() {
        assert!(synced.contains(inode), "segment {index} of {} was scanned but not synced", inodes.len());
    }
}

/// After a kill, recovery reads only what follows the checkpoint: the
/// records of the checkpoint's segment before it are not indexed at open,
/// but on the first read below the checkpoint, which then finds them.
#[test]
fn the_prefix_before_a_checkpoint_is_indexed_on_first_read() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions {
        segment_size: 1024 * 1024,
        // Checkpoints only when `Log::sync` asks.
        sync_policy: crate::SyncPolicy::Interval { interval_ms: 60_000 },
        ..options()
    };
    let record = |i: u64| NewRecord { payload: bytes::Bytes::from(vec![i as u8; 1000]), ..NewRecord::default() };
    let log = Log::open(dir.path(), options.clone()).unwrap();
    log.append(&(0..300).map(record).collect::<Vec<_>>()).unwrap();
    log.sync().unwrap();
    // `sync` answers once the data is synced; the flusher writes the
    // checkpoint just after, so wait for it (under load it can lag).
    let io = Io::new(None, Default::default());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while crate::checkpoint::Checkpoint::open(&io, dir.path()).unwrap().1.map(|r| r.point.next_offset) != Some(300) {
        assert!(std::time::Instant::now() < deadline, "no checkpoint at offset 300 after the sync");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // The image a kill leaves: a checkpoint of this boot at offset 300,
    // records past it in the page cache.
    let checkpoint = dir.path().join(crate::checkpoint::FILE_NAME);
    let saved = fs::read(&checkpoint).unwrap();
    log.append(&(300..320).map(record).collect::<Vec<_>>()).unwrap();
    log.close().unwrap();
    fs::write(&checkpoint, saved).unwrap();

    let log = Log::open(dir.path(), options).unwrap();
    assert_eq!(log.next_offset(), 320);
    // 300 records of 1040 bytes before the checkpoint would take 10 entries
    // (one per 32 KiB); the 20 after it take one.
    assert_eq!(log.stats().index_entries, 1, "recovery indexed records before the checkpoint");
    for offset in [0, 150, 299, 300, 319] {
        assert_eq!(log.read(offset).unwrap().payload[0], offset as u8, "offset {offset}");
    }
    assert!(log.stats().index_entries >= 10, "the first read below the checkpoint indexes the prefix");
    log.append(&(320..400).map(record).collect::<Vec<_>>()).unwrap();
    let mut cursor = log.cursor(0);
    for offset in 0..400 {
        let record = cursor.next().expect("a record").expect("intact");
        assert_eq!((record.offset, record.payload[0]), (offset, offset as u8));
    }
    assert!(cursor.next().is_none());
}

/// Resident bytes of this process's mappings of `path` (`Rss` in
/// `/proc/self/smaps`).
fn resident_bytes_of(path: &Path) -> u64 {
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
    let name = path.to_str().unwrap();
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            inside = line.ends_with(name);
        } else if inside && let Some(kb) = line.strip_prefix("Rss:") {
            total += kb.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap() * 1024;
        }
    }
    total
}

/// The pages recovery's scan read through the maps leave the process's
/// resident set when it ends (they stay in the page cache): with tens of
/// thousands of idle lanes, the page each scan touched was a third of the
/// broker's memory after a restart. Reads fault them back in.
#[test]
fn recovery_leaves_no_scanned_page_resident() {
    let dir = tempfile::tempdir().unwrap();
    log_without_checkpoint(dir.path(), 100, |_| ());
    let recovered =
        recover(&std::sync::Arc::from(dir.path()), &options(), &Io::new(None, Default::default()), None).unwrap();
    assert_eq!(recovered.point.next_offset, 100);
    for segment in &recovered.segments {
        assert!(segment.is_mapped(), "the scanned segments are mapped");
        assert_eq!(resident_bytes_of(&segment.path), 0, "{} is resident", segment.path.display());
    }
    // Reading a record faults its page back in.
    let log = Log::open(dir.path(), options()).unwrap();
    assert_eq!(log.read(0).unwrap().payload.len(), 1000);
}

/// Opening a log whose ack journal holds only its header (an idle lane)
/// does not sync the journal: nothing in it can be unsynced. A journal
/// with entries replayed as found is synced, since a killed process may
/// have left them in the page cache only.
#[test]
fn an_empty_ack_journal_is_not_synced_at_open() {
    let synced_acks = |dir: &Path| {
        let acks = fs::metadata(dir.join("acks")).unwrap().ino();
        let faults = Faults::new();
        recover(&std::sync::Arc::from(dir), &options(), &Io::new(Some(faults.clone()), Default::default()), None)
            .unwrap();
        faults.synced_inodes.lock().contains(&acks)
    };
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), options()).unwrap();
    log.append(&[NewRecord { payload: bytes::Bytes::from_static(b"x"), ..NewRecord::default() }])
        .unwrap()
        .commit
        .wait()
        .unwrap();
    log.close().unwrap();
    assert!(!synced_acks(dir.path()), "an ack journal with no entry is not synced");
    let log = Log::open(dir.path(), options()).unwrap();
    log.ack(0, 1, crate::AckKind::Acked).unwrap().wait().unwrap();
    log.close().unwrap();
    assert!(synced_acks(dir.path()), "a journal with entries is synced");
}
