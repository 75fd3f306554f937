//! OS threads do not grow with logs: every log's background work runs on
//! one bounded flush pool. Alone in its test binary, so that no other test
//! starts or ends threads while it counts them.

use ballast_storage::{FlushPool, Log, LogOptions, NewRecord};

fn os_threads() -> usize {
    std::fs::read_dir("/proc/self/task").expect("Linux /proc").count()
}

/// Opening 200 logs (and appending to and closing them) starts no thread:
/// the process has as many threads after as before, the pool's included.
#[test]
fn threads_stay_constant_as_logs_are_opened() {
    let pool = FlushPool::new(2).unwrap();
    let root = tempfile::tempdir().unwrap();
    let options = LogOptions {
        segment_size: 64 * 1024,
        record_size_max: 1024,
        pool: Some(pool.clone()),
        ..LogOptions::default()
    };
    let before = os_threads();
    let logs: Vec<Log> =
        (0..200).map(|i| Log::open(root.path().join(i.to_string()), options.clone()).unwrap()).collect();
    let record = NewRecord { payload: bytes::Bytes::from_static(b"x"), ..NewRecord::default() };
    for log in &logs {
        log.append(std::slice::from_ref(&record)).unwrap().commit.wait().unwrap();
    }
    let open = os_threads();
    assert_eq!(open, before, "{} logs open: {open} threads, {before} before", logs.len());
    for log in logs {
        log.close().unwrap();
    }
    assert_eq!(os_threads(), before);
    println!("200 logs on a pool of {}: {before} OS threads in the process", pool.threads());
}
