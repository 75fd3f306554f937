//! The log against a simple in-memory model, under random operations.

use std::collections::BTreeSet;

use ballast_storage::{AckKind, Log, LogOptions, NewRecord};
use bytes::Bytes;
use proptest::prelude::*;

use crate::{corruption::copy_dir, support::*};

#[derive(Debug, Clone)]
enum Op {
    Append {
        count: u64,
        size: usize,
    },
    Ack {
        at: prop::sample::Index,
        count: u64,
    },
    Read {
        at: prop::sample::Index,
    },
    /// Close cleanly and open again.
    Reopen,
    /// Take a copy of the directory while the log is open (a crash image),
    /// and continue on the copy.
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u64..40, 0usize..1500).prop_map(|(count, size)| Op::Append { count, size }),
        3 => (any::<prop::sample::Index>(), 1u64..30).prop_map(|(at, count)| Op::Ack { at, count }),
        3 => any::<prop::sample::Index>().prop_map(|at| Op::Read { at }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

/// 32 cases by default (CI); `PROPTEST_CASES` raises it for bug hunts.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32)
}

fn options() -> LogOptions {
    LogOptions {
        segment_size: 64 * 1024,
        record_size_max: 8 * 1024,
        checkpoint_interval_bytes: 32 * 1024,
        ..LogOptions::default()
    }
}

/// Checks everything the model knows against the log.
/// A record of the model: varied so stored sizes differ (a key, headers,
/// payloads that end in zero bytes, which the end-of-segment search in
/// `pending_bytes` must see past).
fn model_record(i: u64, size: usize) -> NewRecord {
    let mut r = record(i, size);
    if i % 3 == 0 {
        r.headers = vec![("h".into(), "v".repeat((i % 7) as usize)), ("name".into(), String::new())];
    }
    if i % 5 == 0 {
        r.key = Some(Bytes::from(format!("key-{i}")));
    }
    if i % 4 == 1 {
        let mut payload = r.payload.to_vec();
        payload.resize(payload.len() + (i % 13) as usize, 0);
        r.payload = Bytes::from(payload);
    }
    r
}

/// `pending_bytes` against the model: the stored sizes of the records not
/// done.
fn check_pending_bytes(log: &Log, sizes: &[u64], done: &BTreeSet<u64>) -> Result<(), TestCaseError> {
    let expected: u64 = (0..sizes.len()).filter(|&o| !done.contains(&(o as u64))).map(|o| sizes[o]).sum();
    let found = log.pending_bytes().map_err(|e| TestCaseError::fail(format!("pending_bytes: {e}")))?;
    prop_assert_eq!(found, expected);
    Ok(())
}

fn check_all(log: &Log, payloads: &[Bytes], sizes: &[u64], done: &BTreeSet<u64>) -> Result<(), TestCaseError> {
    prop_assert_eq!(log.next_offset(), payloads.len() as u64);
    // First, while the indexes of sealed segments are not built yet.
    check_pending_bytes(log, sizes, done)?;
    let mut cursor = log.cursor(0);
    let mut seen = Vec::new();
    while let Some(item) = cursor.next() {
        let record = item.map_err(|e| TestCaseError::fail(format!("cursor error: {e}")))?;
        prop_assert_eq!(&record.payload, &payloads[record.offset as usize]);
        seen.push(record.offset);
    }
    let expected: Vec<u64> = (0..payloads.len() as u64).filter(|o| !done.contains(o)).collect();
    prop_assert_eq!(seen, expected);
    for &offset in done.iter().take(50) {
        prop_assert!(log.is_done(offset));
    }
    prop_assert_eq!(log.stats().quarantined, 0);
    check_pending_bytes(log, sizes, done)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    /// Appends, acks, reads, clean reopens and crash images keep the log
    /// equal to the model: every acknowledged record readable and intact,
    /// every acked offset done and skipped, offsets contiguous.
    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        let mut log = Log::open(dirs[0].path(), options()).unwrap();
        let mut payloads: Vec<Bytes> = Vec::new();
        let mut sizes: Vec<u64> = Vec::new();
        let mut done = BTreeSet::new();
        for op in ops {
            match op {
                Op::Append { count, size } => {
                    let first = payloads.len() as u64;
                    let batch: Vec<_> = (first..first + count).map(|i| model_record(i, size)).collect();
                    let appended = log.append(&batch).unwrap();
                    prop_assert_eq!(appended.first_offset, first);
                    appended.commit.wait().unwrap();
                    sizes.extend(batch.iter().map(NewRecord::stored_size));
                    payloads.extend(batch.into_iter().map(|r| r.payload));
                    check_pending_bytes(&log, &sizes, &done)?;
                }
                Op::Ack { at, count } => {
                    if payloads.is_empty() { continue; }
                    let first = at.index(payloads.len()) as u64;
                    let count = count.min(payloads.len() as u64 - first);
                    log.ack(first, count, AckKind::Acked).unwrap().wait().unwrap();
                    done.extend(first..first + count);
                    check_pending_bytes(&log, &sizes, &done)?;
                }
                Op::Read { at } => {
                    if payloads.is_empty() { continue; }
                    let offset = at.index(payloads.len()) as u64;
                    match log.read(offset) {
                        Ok(r) => prop_assert_eq!(&r.payload, &payloads[offset as usize]),
                        // Only acked records may have been removed by retention.
                        Err(ballast_storage::ReadError::Removed { .. }) => prop_assert!(done.contains(&offset)),
                        Err(e) => return Err(TestCaseError::fail(format!("read {offset}: {e}"))),
                    }
                }
                Op::Reopen => {
                    log.close().unwrap();
                    log = Log::open(dirs.last().unwrap().path(), options()).unwrap();
                    check_all(&log, &payloads, &sizes, &done)?;
                }
                Op::Crash => {
                    let image = tempfile::tempdir().unwrap();
                    copy_dir(dirs.last().unwrap().path(), image.path());
                    let crashed = Log::open(image.path(), options()).unwrap();
                    drop(std::mem::replace(&mut log, crashed));
                    dirs.push(image);
                    check_all(&log, &payloads, &sizes, &done)?;
                }
            }
        }
        check_all(&log, &payloads, &sizes, &done)?;
    }
}

/// Many producers appending at once share syncs (group commit): fewer syncs
/// than appends, and every offset is handed out exactly once.
#[test]
fn concurrent_appends_share_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogOptions { segment_size: 4 << 20, ..options() }).unwrap();
    const THREADS: u64 = 8;
    const APPENDS: u64 = 150;
    let firsts: Vec<Vec<u64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let log = &log;
                scope.spawn(move || {
                    (0..APPENDS)
                        .map(|i| {
                            let appended =
                                log.append(&[record(t * 1_000_000 + i, 100), record(t * 1_000_000 + i, 100)]).unwrap();
                            appended.commit.wait().unwrap();
                            appended.first_offset
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all: Vec<u64> = firsts.into_iter().flatten().collect();
    all.sort_unstable();
    assert_eq!(all, (0..THREADS * APPENDS).map(|i| i * 2).collect::<Vec<_>>());
    let stats = log.stats();
    assert_eq!(stats.next_offset, THREADS * APPENDS * 2);
    assert!(
        stats.sync_count < THREADS * APPENDS,
        "no group commit: {} syncs for {} appends",
        stats.sync_count,
        THREADS * APPENDS
    );
    println!("{} appends shared {} syncs", THREADS * APPENDS, stats.sync_count);
}
