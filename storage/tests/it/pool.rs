//! The flush pool shared by logs: one log's stalled fsync does not hold up
//! another's commits.

use std::{sync::mpsc, time::Duration};

use ballast_storage::{Faults, FlushPool, Log, LogOptions};

use crate::support::*;

/// With a pool of 2 threads, a log whose fsync stalls holds one thread; the
/// other keeps committing the appends of 20 other logs, in turn. Once the
/// device is released, the stalled log's commit resolves too.
#[test]
fn a_stalled_fsync_does_not_block_other_logs() {
    let pool = FlushPool::new(2).unwrap();
    assert_eq!(pool.threads(), 2);
    let faults = Faults::new();
    let stalled_dir = tempfile::tempdir().unwrap();
    let options = LogOptions { pool: Some(pool.clone()), ..small_options() };
    let stalled =
        Log::open(stalled_dir.path(), LogOptions { faults: Some(faults.clone()), ..options.clone() }).unwrap();
    faults.hold_syncs(true);
    let pending = stalled.append(&[record(0, 100)]).unwrap().commit;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while faults.syncs_waiting() == 0 {
        assert!(std::time::Instant::now() < deadline, "the stalled log's sync never started");
        std::thread::yield_now();
    }

    let dirs: Vec<_> = (0..20).map(|_| tempfile::tempdir().unwrap()).collect();
    let (done, commits) = mpsc::channel();
    let worker = {
        let options = options.clone();
        let paths: Vec<_> = dirs.iter().map(|d| d.path().to_owned()).collect();
        std::thread::spawn(move || {
            let logs: Vec<Log> = paths.iter().map(|p| Log::open(p, options.clone()).unwrap()).collect();
            for round in 0..5 {
                for log in &logs {
                    append_all(log, round, 1, 100);
                }
            }
            for log in logs {
                log.close().unwrap();
            }
            done.send(()).unwrap();
        })
    };
    commits
        .recv_timeout(Duration::from_secs(30))
        .expect("the other logs' commits resolve while one log's fsync is stalled");
    worker.join().unwrap();
    assert!(!pending.is_resolved(), "the stalled commit waits for its fsync");
    faults.hold_syncs(false);
    pending.wait().expect("the stalled commit resolves once the device is released");
    stalled.close().unwrap();
}
