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
