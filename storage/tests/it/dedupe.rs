//! Idempotency keys are recovered within the window, with bounded memory,
//! also after retention removed their segments and after a crash.

use ballast_storage::{AckKind, Log, LogOptions, NewRecord};
use bytes::Bytes;

use crate::{corruption::copy_dir, support::*};

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn keyed(i: u64, timestamp_ms: u64) -> NewRecord {
    NewRecord {
        key: Some(Bytes::from(format!("key-{i}"))),
        timestamp_ms,
        payload: Bytes::from(vec![0u8; 300]),
        ..NewRecord::default()
    }
}

fn options() -> LogOptions {
    LogOptions { checkpoint_interval_bytes: 16 * 1024, dedupe_window_ms: 60_000, ..small_options() }
}

/// Keys survive a clean close, also when every record is acked and the
/// segments that held them were removed; keys older than the window do not.
#[test]
fn keys_survive_retention_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), options()).unwrap();
    let now = now_ms();
    let old: Vec<NewRecord> = (0..50).map(|i| keyed(i, now - 120_000)).collect();
    let fresh: Vec<NewRecord> = (50..800).map(|i| keyed(i, now)).collect();
    log.append(&old).unwrap().commit.wait().unwrap();
    log.append(&fresh).unwrap().commit.wait().unwrap();
    let segments_before = log.stats().segment_count;
    log.ack(0, 800, AckKind::Acked).unwrap().wait().unwrap();
    log.close().unwrap();

    let log = Log::open(dir.path(), options()).unwrap();
    assert!(log.stats().segment_count < segments_before, "retention removed the acked segments");
    let keys = log.take_recovered_keys();
    let names: Vec<String> = keys.iter().map(|k| String::from_utf8(k.key.to_vec()).unwrap()).collect();
    assert_eq!(names.len(), 750, "every key in the window, none outside it");
    assert_eq!(names.first().unwrap(), "key-50");
    assert_eq!(keys.last().unwrap().offset, 799);
    assert!(log.take_recovered_keys().is_empty(), "keys are handed over once");
}

/// After a crash (a copy of the directory taken while the log is open), the
/// keys of records written after the last checkpoint come from the scan.
#[test]
fn keys_survive_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), options()).unwrap();
    let now = now_ms();
    for chunk in 0..10u64 {
        let batch: Vec<NewRecord> = (chunk * 30..chunk * 30 + 30).map(|i| keyed(i, now)).collect();
        log.append(&batch).unwrap().commit.wait().unwrap();
    }
    let image = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), image.path());
    let log2 = Log::open(image.path(), options()).unwrap();
    let keys = log2.take_recovered_keys();
    assert_eq!(keys.len(), 300);
    assert!(keys.iter().enumerate().all(|(i, k)| k.offset == i as u64));
    drop(log);
}

/// At most `dedupe_keys_max` keys are recovered: the newest, a key seen
/// twice counts once.
#[test]
fn recovered_keys_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions { dedupe_keys_max: 100, ..options() };
    let log = Log::open(dir.path(), options.clone()).unwrap();
    let now = now_ms();
    let batch: Vec<NewRecord> = (0..400).map(|i| keyed(i % 300, now + i)).collect();
    log.append(&batch).unwrap().commit.wait().unwrap();
    log.close().unwrap();
    let log = Log::open(dir.path(), options).unwrap();
    let keys = log.take_recovered_keys();
    assert_eq!(keys.len(), 100);
    assert!(keys.iter().all(|k| k.offset >= 300), "the newest keys are kept");
}

/// The key journal follows the keys inside the window, not the history:
/// after far more keys than fit the compaction slack, most of them already
/// outside the window, it is compacted down to the live ones, although
/// `dedupe_keys_max` alone would let it grow to 65 MiB.
#[test]
fn key_journal_stays_bounded_by_live_keys() {
    let dir = tempfile::tempdir().unwrap();
    let options = LogOptions { dedupe_keys_max: 1_000_000, ..options() };
    let log = Log::open(dir.path(), options.clone()).unwrap();
    let now = now_ms();
    let record = |i: u64, timestamp_ms: u64| NewRecord {
        key: Some(Bytes::from(format!("history-key-{i:08}"))),
        timestamp_ms,
        payload: Bytes::from_static(b"x"),
        ..NewRecord::default()
    };
    // 200,000 expired keys (48 bytes each in the journal: 9.6 MB), then 100
    // live ones.
    for chunk in 0..200u64 {
        let batch: Vec<NewRecord> = (chunk * 1000..chunk * 1000 + 1000).map(|i| record(i, now - 120_000)).collect();
        log.append(&batch).unwrap().commit.wait().unwrap();
        log.ack(chunk * 1000, 1000, AckKind::Acked).unwrap().wait().unwrap();
    }
    let live: Vec<NewRecord> = (200_000..200_100).map(|i| record(i, now)).collect();
    log.append(&live).unwrap().commit.wait().unwrap();
    log.close().unwrap();

    let journal = std::fs::metadata(dir.path().join("keys")).unwrap().len();
    assert!(journal <= 2 * 1024 * 1024, "key journal holds history: {journal} bytes");
    let log = Log::open(dir.path(), options).unwrap();
    let keys = log.take_recovered_keys();
    assert_eq!(keys.len(), 100, "the live keys are recovered");
    assert_eq!(keys[0].key, Bytes::from("history-key-00200000"));
}
