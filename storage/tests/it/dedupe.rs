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
