use std::os::unix::fs::MetadataExt;

use super::*;
use crate::{Log, NewRecord, file::Faults, limits::SEGMENT_SIZE_MIN};

fn options() -> LogOptions {
    LogOptions { segment_size: SEGMENT_SIZE_MIN, record_size_max: 16 * 1024, ..LogOptions::default() }
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
    let log = Log::open(dir.path(), options()).unwrap();
    let batch: Vec<NewRecord> =
        (0..200).map(|_| NewRecord { payload: bytes::Bytes::from(vec![7u8; 1000]), ..NewRecord::default() }).collect();
    log.append(&batch).unwrap().commit.wait().unwrap();
    log.close().unwrap();
    let inodes = segment_inodes(dir.path());
    assert!(inodes.len() >= 3, "200 KB of records fill several 64 KiB segments");
    // Without a checkpoint the scan covers every segment, as after a crash
    // before the first checkpoint.
    fs::remove_file(dir.path().join(crate::checkpoint::FILE_NAME)).unwrap();

    let faults = Faults::new();
    let recovered = recover(dir.path(), &options(), &Io::new(Some(faults.clone()))).unwrap();
    assert_eq!(recovered.point.next_offset, 200);
    let synced = faults.synced_inodes.lock().clone();
    for (index, inode) in inodes.iter().enumerate() {
        assert!(synced.contains(inode), "segment {index} of {} was scanned but not synced", inodes.len());
    }
}
