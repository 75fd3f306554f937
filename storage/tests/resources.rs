//! OS threads and open files do not grow with logs: every log's background
//! work runs on one bounded flush pool, and its files go through one
//! bounded descriptor cache. In a test binary of their own, taking turns
//! (`ALONE`), so that no other test starts threads or opens files while
//! they count them.

use std::sync::Mutex;

use ballast_storage::{FileCache, FlushPool, Log, LogOptions, NewRecord};

static ALONE: Mutex<()> = Mutex::new(());

fn os_threads() -> usize {
    std::fs::read_dir("/proc/self/task").expect("Linux /proc").count()
}

/// Opening 200 logs (and appending to and closing them) starts no thread:
/// the process has no more threads after than before, the pool's included
/// (with a thread per log it had 200 more).
#[test]
fn threads_stay_constant_as_logs_are_opened() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
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
    // At most: a test that ran before this one may still be ending its
    // threads (its libtest thread, its pool's), never starting any.
    let open = os_threads();
    assert!(open <= before, "{} logs open: {open} threads, {before} before", logs.len());
    for log in logs {
        log.close().unwrap();
    }
    assert!(os_threads() <= before);
    println!("200 logs on a pool of {}: {before} OS threads in the process", pool.threads());
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("Linux /proc").count()
}

fn nofile_limit() -> libc::rlimit {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    limit
}

fn set_nofile_limit(limit: &libc::rlimit) {
    // SAFETY: setrlimit only reads the struct it is given.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, limit) }, 0);
}

/// 100 logs of 3 segments each (about 600 files) live under a soft
/// `RLIMIT_NOFILE` of 64 more than the process had open: appends, reads, a
/// close and a reopen of every log all work through a cache of 16
/// descriptors, and the process never holds more than those plus a few in
/// use at once. Without the cache (one descriptor per file) the opens fail
/// with EMFILE.
#[test]
fn many_logs_under_a_low_open_files_limit() {
    let _alone = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let pool = FlushPool::new(2).unwrap();
    let files = FileCache::new(16);
    let root = tempfile::tempdir().unwrap();
    let options = LogOptions {
        segment_size: 64 * 1024,
        record_size_max: 4096,
        pool: Some(pool),
        files: Some(files.clone()),
        ..LogOptions::default()
    };
    let before = open_fds();
    let saved = nofile_limit();
    set_nofile_limit(&libc::rlimit { rlim_cur: (before + 64) as libc::rlim_t, rlim_max: saved.rlim_max });
    let record = |i: u64| NewRecord { payload: bytes::Bytes::from(vec![i as u8; 1000]), ..NewRecord::default() };
    let mut most = 0;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let logs: Vec<Log> =
            (0..100).map(|i| Log::open(root.path().join(i.to_string()), options.clone()).unwrap()).collect();
        for log in &logs {
            let batch: Vec<_> = (0..150).map(record).collect();
            log.append(&batch).unwrap().commit.wait().unwrap();
            most = most.max(open_fds());
        }
        for log in &logs {
            assert!(log.stats().segment_count >= 3);
            assert_eq!(log.read(149).unwrap().payload[0], 149);
        }
        for log in logs {
            log.close().unwrap();
        }
        let logs: Vec<Log> =
            (0..100).map(|i| Log::open(root.path().join(i.to_string()), options.clone()).unwrap()).collect();
        for log in &logs {
            assert_eq!(log.next_offset(), 150);
            log.append(&[record(150)]).unwrap().commit.wait().unwrap();
            most = most.max(open_fds());
        }
    }));
    set_nofile_limit(&saved);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    println!("100 logs, 16-descriptor cache: at most {most} fds open ({before} before), {} reopens", files.reopened());
    assert!(most <= before + 16 + 4, "{most} descriptors open with a cache of 16 ({before} before)");
    assert!(files.open_count() <= 16);
}
