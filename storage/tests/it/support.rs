//! Helpers shared by the storage integration tests.

use ballast_storage::{Log, LogOptions, NewRecord, SyncPolicy};
use bytes::Bytes;

/// Small segments so tests exercise rolls, retention and recovery quickly.
pub fn small_options() -> LogOptions {
    LogOptions { segment_size: 64 * 1024, record_size_max: 16 * 1024, ..LogOptions::default() }
}

pub fn options_with(policy: SyncPolicy) -> LogOptions {
    LogOptions { sync_policy: policy, ..small_options() }
}

/// A record whose payload encodes its index, so a test can check it.
pub fn record(i: u64, size: usize) -> NewRecord {
    let mut payload = format!("record-{i}-").into_bytes();
    payload.resize(size.max(payload.len()), b'x');
    NewRecord { timestamp_ms: 1_000 + i, payload: Bytes::from(payload), ..NewRecord::default() }
}

pub fn payload_index(payload: &[u8]) -> u64 {
    let text = std::str::from_utf8(payload).expect("test payloads are UTF-8");
    text.split('-').nth(1).and_then(|s| s.parse().ok()).expect("test payload format")
}

pub fn append_all(log: &Log, from: u64, count: u64, size: usize) {
    let batch: Vec<NewRecord> = (from..from + count).map(|i| record(i, size)).collect();
    let appended = log.append(&batch).expect("append");
    appended.commit.wait().expect("commit");
}

/// Bytes of `path` held in the page cache (`mincore` over a fresh map).
pub fn cached_size(path: &std::path::Path) -> u64 {
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: a read-only map of a file no one truncates during the test;
    // its bytes are never read, only its residency queried.
    let map = unsafe { memmap2::Mmap::map(&file).unwrap() };
    // SAFETY: sysconf only reads its argument.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let mut resident = vec![0u8; map.len().div_ceil(page)];
    // SAFETY: the range is the whole live map and `resident` has one byte
    // per page of it.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, map.len(), resident.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    (resident.iter().filter(|&&r| r & 1 == 1).count() * page) as u64
}

/// Syncs `path` and drops its pages from the page cache, so a later read of
/// it shows up in [`cached_size`].
pub fn evict_from_cache(path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    file.sync_all().unwrap();
    // SAFETY: posix_fadvise only reads its integer arguments; the fd is live.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

/// Runs a flusher cycle, then another: the second starts only after the
/// first one's turn ended, including the work it does after resolving its
/// commits (growth and the spare segment ahead of the writer, whose syncs
/// would otherwise race a fault a test injects next).
pub fn settle(log: &Log) {
    log.sync().expect("sync");
    log.sync().expect("sync");
}
