//! Criterion benchmarks of `ballast-storage`: append throughput (record size
//! x batch size x sync policy), sequential and random reads, and recovery
//! time of a 1 GiB log after a clean shutdown and after a kill.
//!
//! Run: `cargo bench -p ballast-benches --bench storage` (criterion's usual
//! arguments work, e.g. `-- append/fsync` to filter, `--sample-size 20`,
//! `--measurement-time 10`). Figures and the disk baseline they are compared
//! with are in `BENCHMARKS.md`.
//!
//! Environment:
//! - `BALLAST_BENCH_DIR`: where the logs are written (default: the cargo
//!   target's tmp dir). It must be on the real disk, not a tmpfs, or the
//!   fsync figures mean nothing.
//! - `BALLAST_BENCH_RECOVERY_MIB`: size of the recovery log (default 1024).
//! - `BALLAST_BENCH_READ_MIB`: size of the log the read benchmarks scan
//!   (default 256).
//!
//! Record sizes are payload bytes (no key, no headers); on disk each record
//! also has a 40-byte header and padding to 8 bytes (100 B -> 144 B,
//! 1 KiB -> 1064 B). Throughput is reported in payload bytes and records.

use std::{
    fs,
    hint::black_box,
    path::{Path, PathBuf},
    process::Command,
    sync::Barrier,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ballast_storage::{Log, LogOptions, NewRecord, SyncPolicy};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use tempfile::TempDir;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Producer threads for the fsync policy: group commit only shows when
/// several appends are in flight while a sync runs.
const FSYNC_THREADS: u64 = 4;

fn bench_root() -> PathBuf {
    let root = std::env::var_os("BALLAST_BENCH_DIR")
        .map_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("ballast-storage-bench"), PathBuf::from);
    fs::create_dir_all(&root).expect("creating the bench directory");
    root
}

fn scratch_dir() -> TempDir {
    tempfile::tempdir_in(bench_root()).expect("creating a bench log directory")
}

fn env_mib(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn options(policy: SyncPolicy) -> LogOptions {
    // Default segment size (64 MiB) and checkpoint interval.
    LogOptions { sync_policy: policy, ..LogOptions::default() }
}

fn batch(payload_size: usize, count: usize) -> Vec<NewRecord> {
    let payload = Bytes::from(vec![0x5a; payload_size]);
    let timestamp_ms = now_ms();
    (0..count).map(|_| NewRecord { timestamp_ms, payload: payload.clone(), ..NewRecord::default() }).collect()
}

fn policy_name(policy: SyncPolicy) -> &'static str {
    match policy {
        SyncPolicy::Fsync => "fsync",
        SyncPolicy::Interval { .. } => "interval",
        SyncPolicy::None => "none",
    }
}

fn size_name(size: usize) -> String {
    if size % 1024 == 0 { format!("{}KiB", size / 1024) } else { format!("{size}B") }
}

/// Appends `batch` `n` times from the calling thread, waiting on each commit.
fn append_n(log: &Log, batch: &[NewRecord], n: u64) {
    for _ in 0..n {
        log.append(batch).expect("append").commit.wait().expect("commit");
    }
}

/// Group-commit figures gathered over one benchmark.
#[derive(Debug, Default)]
struct SyncTally {
    appends: u64,
    syncs: u64,
    bytes: u64,
}

impl SyncTally {
    fn add(&mut self, log: &Log, encoded_record_bytes: u64) {
        let stats = log.stats();
        self.appends += stats.next_offset;
        self.syncs += stats.sync_count;
        self.bytes += stats.next_offset * encoded_record_bytes;
    }

    fn report(&self, id: &str, batch: u64) {
        if self.syncs == 0 {
            return;
        }
        let batches = self.appends / batch;
        println!(
            "{id}: {batches} batches shared {} data syncs: {:.2} batches and {:.1} KiB on disk per sync",
            self.syncs,
            batches as f64 / self.syncs as f64,
            self.bytes as f64 / self.syncs as f64 / 1024.0,
        );
    }
}

/// Encoded size of one record on disk (no key, no headers): fixed header,
/// payload, padding to the record alignment.
fn encoded_size(payload_size: usize) -> u64 {
    use ballast_storage::limits::{RECORD_ALIGN, RECORD_HEADER_SIZE};
    (u64::from(RECORD_HEADER_SIZE) + payload_size as u64).div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

/// Append throughput: {100 B, 1 KiB} x batches of {1, 16, 256} x {fsync, none}.
///
/// - `none`: one thread appends batch after batch (a commit resolves as soon
///   as the batch is written to the OS). Each sample starts a fresh log in a
///   fresh directory, so samples start with no dirty pages of earlier ones;
///   the close (a full sync) is outside the timing. Segment rolls (create,
///   preallocate, sync) and the flusher's once-a-second sync happen inside
///   the timing, as they do in service. This is the burst rate into the
///   page cache: a sample stays below the kernel's dirty limits, so it is
///   not throttled to the disk's writeback rate (sustained, it is).
/// - `fsync`: 4 threads append concurrently to one log (a fresh one per
///   sample, like `none`), each waiting on its commit before the next
///   append, so up to 4 batches share each `fdatasync` (group commit). One iteration is one batch, whichever
///   thread appends it; the time is from releasing the threads until the
///   last commit resolved. After each benchmark the batches per sync are
///   printed from `LogStats::sync_count`.
fn append(c: &mut Criterion) {
    for policy in [SyncPolicy::Fsync, SyncPolicy::None] {
        let name = policy_name(policy);
        let mut group = c.benchmark_group(format!("append/{name}"));
        if policy == SyncPolicy::Fsync {
            group.sampling_mode(SamplingMode::Flat);
        }
        for size in [100usize, 1024] {
            for count in [1usize, 16, 256] {
                let records = batch(size, count);
                let encoded = encoded_size(size) * count as u64;
                group.throughput(Throughput::ElementsAndBytes { elements: count as u64, bytes: (size * count) as u64 });
                let id = BenchmarkId::new(size_name(size), count);
                let mut tally = SyncTally::default();
                match policy {
                    SyncPolicy::Fsync => {
                        group.bench_function(id.clone(), |b| {
                            b.iter_custom(|iters| {
                                let dir = scratch_dir();
                                let log = Log::open(dir.path(), options(policy)).expect("open");
                                let elapsed = append_concurrently(&log, &records, iters);
                                tally.add(&log, encoded / count as u64);
                                log.close().expect("close");
                                elapsed
                            });
                        });
                    }
                    _ => {
                        group.bench_function(id.clone(), |b| {
                            b.iter_custom(|iters| {
                                let dir = scratch_dir();
                                let log = Log::open(dir.path(), options(policy)).expect("open");
                                let start = Instant::now();
                                append_n(&log, &records, iters);
                                let elapsed = start.elapsed();
                                log.close().expect("close");
                                elapsed
                            });
                        });
                    }
                }
                tally.report(&format!("append/{name}/{}/{count}", size_name(size)), count as u64);
            }
        }
        group.finish();
    }
}

/// `iters` appends of `batch` shared among [`FSYNC_THREADS`] threads.
fn append_concurrently(log: &Log, batch: &[NewRecord], iters: u64) -> Duration {
    let start_line = Barrier::new(FSYNC_THREADS as usize + 1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..FSYNC_THREADS)
            .map(|t| {
                let share = iters / FSYNC_THREADS + u64::from(t < iters % FSYNC_THREADS);
                let start_line = &start_line;
                scope.spawn(move || {
                    start_line.wait();
                    append_n(log, batch, share);
                })
            })
            .collect();
        start_line.wait();
        let start = Instant::now();
        for worker in workers {
            worker.join().expect("append thread");
        }
        start.elapsed()
    })
}

/// A log filled with `mib` MiB of 1 KiB records (none policy).
#[derive(Debug)]
struct FilledLog {
    dir: TempDir,
    log: Log,
    records: u64,
}

const FILL_BATCH: usize = 256;
const FILL_PAYLOAD: usize = 1024;

/// Appends 1 KiB records in batches of 256 until the records take `bytes`
/// bytes on disk (rounded down to whole batches).
fn fill(log: &Log, bytes: u64) {
    let records = batch(FILL_PAYLOAD, FILL_BATCH);
    let batches = bytes / (encoded_size(FILL_PAYLOAD) * FILL_BATCH as u64);
    append_n(log, &records, batches);
}

fn filled_log(mib: u64) -> FilledLog {
    let dir = scratch_dir();
    let log = Log::open(dir.path(), options(SyncPolicy::None)).expect("open");
    fill(&log, mib * MIB);
    let records = log.next_offset();
    FilledLog { dir, log, records }
}

/// Reads over a pre-filled log of 1 KiB records (in the page cache, as a
/// consumer just behind the producers finds it): a cursor from the start
/// (wrapping around at the end), and reads by random offset. One iteration
/// reads one record: its CRC is checked and its payload is a zero-copy view
/// of the map.
fn read(c: &mut Criterion) {
    let mib = env_mib("BALLAST_BENCH_READ_MIB", 256);
    let mut fixture: Option<FilledLog> = None;
    let mut group = c.benchmark_group("read");
    group.throughput(Throughput::ElementsAndBytes { elements: 1, bytes: FILL_PAYLOAD as u64 });
    group.bench_function(BenchmarkId::new("cursor_sequential", size_name(FILL_PAYLOAD)), |b| {
        let fixture = fixture.get_or_insert_with(|| filled_log(mib));
        let mut cursor = fixture.log.cursor(0);
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let record = match cursor.next() {
                    Some(record) => record,
                    None => {
                        cursor.seek(0);
                        cursor.next().expect("the log is not empty")
                    }
                };
                black_box(record.expect("read"));
            }
            start.elapsed()
        });
    });
    group.bench_function(BenchmarkId::new("by_random_offset", size_name(FILL_PAYLOAD)), |b| {
        let fixture = fixture.get_or_insert_with(|| filled_log(mib));
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                // xorshift64
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                black_box(fixture.log.read(rng % fixture.records).expect("read"));
            }
            start.elapsed()
        });
    });
    group.finish();
    if let Some(fixture) = fixture {
        let FilledLog { dir, log, .. } = fixture;
        log.close().expect("close");
        drop(dir);
    }
}

/// The files of a log directory other than segments (checkpoint, ack and
/// key journals), as bytes: restoring them rewinds the log's durable point.
#[derive(Debug, Clone)]
struct MetaSnapshot(Vec<(PathBuf, Vec<u8>)>);

impl MetaSnapshot {
    fn take(dir: &Path) -> MetaSnapshot {
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("dir entry").path();
            if path.is_file() && path.extension().is_none_or(|e| e != "seg") {
                files.push((path.clone(), fs::read(&path).expect("read")));
            }
        }
        MetaSnapshot(files)
    }

    fn restore(&self) {
        for (path, bytes) in &self.0 {
            fs::write(path, bytes).expect("restore");
        }
    }
}

/// One log of `mib` MiB with three recorded durable points: the clean end,
/// and checkpoints 8 MiB and 64 MiB before the end.
///
/// A kill leaves the page cache intact: every record written before it is
/// in the files, but the last checkpoint may be up to an interval behind
/// (with the fsync policy, 8 MiB of synced data; with `none`, a second of
/// appends). Recovery then validates everything after that checkpoint: the
/// "unsynced tail". The image of such a kill is built exactly, without
/// killing anything: the log is written under `Interval` with the longest
/// interval, so a checkpoint is written only when `Log::sync` asks; right
/// after the sync at `end - tail` the checkpoint and journal files are saved
/// (a checkpoint of a live log, of this boot: what a kill leaves); the rest
/// is appended and the log closed. Segments after a clean close hold the
/// same bytes as after a kill, and recovery of such an image rewrites only
/// the checkpoint (the files end in zeros where the writes ended: nothing to
/// cut), so putting the saved files back before each open replays the same
/// kill every time.
#[derive(Debug)]
struct RecoveryLog {
    dir: TempDir,
    clean: MetaSnapshot,
    tails: Vec<(u64, MetaSnapshot)>,
}

const TAILS_MIB: [u64; 2] = [8, 64];

fn recovery_log(mib: u64) -> RecoveryLog {
    let dir = scratch_dir();
    let options = LogOptions {
        sync_policy: SyncPolicy::Interval { interval_ms: ballast_storage::limits::SYNC_INTERVAL_MS_MAX },
        ..LogOptions::default()
    };
    let started = Instant::now();
    let log = Log::open(dir.path(), options).expect("open");
    let mut tails = Vec::new();
    let mut written = 0;
    for tail in TAILS_MIB.iter().rev() {
        let upto = (mib - tail) * MIB;
        fill(&log, upto - written);
        written = upto;
        log.sync().expect("sync");
        tails.push((*tail, MetaSnapshot::take(dir.path())));
    }
    fill(&log, mib * MIB - written);
    let stats = log.stats();
    log.close().expect("close");
    tails.sort_by_key(|(tail, _)| *tail);
    let clean = MetaSnapshot::take(dir.path());
    println!(
        "recovery log: {} records of {} B payload, {} segments ({} MiB of files), built in {:.1?}",
        stats.next_offset,
        FILL_PAYLOAD,
        stats.segment_count,
        stats.disk_bytes / MIB,
        started.elapsed()
    );
    RecoveryLog { dir, clean, tails }
}

/// Drops the page cache of every file in `dir` (clean pages only).
fn drop_page_cache(dir: &Path) {
    for entry in fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("dir entry").path();
        let status = Command::new("dd")
            .arg(format!("if={}", path.display()))
            .args(["iflag=nocache", "count=0", "status=none"])
            .status()
            .expect("running dd");
        assert!(status.success(), "dd iflag=nocache failed on {}", path.display());
    }
}

/// Times `Log::open` of the log in `dir` after `prepare` (not timed) and
/// closes it again (not timed).
fn time_opens(dir: &Path, iters: u64, prepare: impl Fn()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        prepare();
        let start = Instant::now();
        let log = Log::open(dir, options(SyncPolicy::Fsync)).expect("open");
        total += start.elapsed();
        black_box(log.next_offset());
        log.close().expect("close");
    }
    total
}

/// Recovery time (`Log::open`) of a 1 GiB log of 1 KiB records:
/// - `clean`: after a clean close; warm (page cache kept, as after a
///   process restart) and cold (the log's pages dropped first).
/// - `kill_tail_8MiB` / `kill_tail_64MiB`: after a kill whose last
///   checkpoint is 8 or 64 MiB before the end (warm: a kill keeps the page
///   cache), to show the scan follows the tail, not the log.
/// - `one_record`: a log holding one record after a clean close: the fixed
///   cost of an open (directory listing, checkpoint, journals, one map).
fn recovery(c: &mut Criterion) {
    let mib = env_mib("BALLAST_BENCH_RECOVERY_MIB", 1024);
    assert!(mib > *TAILS_MIB.iter().max().expect("tails"), "BALLAST_BENCH_RECOVERY_MIB must exceed the largest tail");
    let mut fixture: Option<RecoveryLog> = None;
    let mut group = c.benchmark_group(format!("recovery_{mib}MiB"));
    group.sampling_mode(SamplingMode::Flat);
    group.bench_function("clean_warm", |b| {
        let log = fixture.get_or_insert_with(|| recovery_log(mib));
        b.iter_custom(|iters| time_opens(log.dir.path(), iters, || log.clean.restore()));
    });
    group.bench_function("clean_cold", |b| {
        let log = fixture.get_or_insert_with(|| recovery_log(mib));
        b.iter_custom(|iters| {
            time_opens(log.dir.path(), iters, || {
                log.clean.restore();
                drop_page_cache(log.dir.path());
            })
        });
    });
    for tail in TAILS_MIB {
        group.bench_function(format!("kill_tail_{tail}MiB"), |b| {
            let log = fixture.get_or_insert_with(|| recovery_log(mib));
            let snapshot = log.tails.iter().find(|(t, _)| *t == tail).map(|(_, s)| s.clone()).expect("tail");
            b.iter_custom(|iters| time_opens(log.dir.path(), iters, || snapshot.restore()));
        });
    }
    drop(fixture);
    let mut one_record: Option<TempDir> = None;
    group.bench_function("one_record", |b| {
        let dir = one_record.get_or_insert_with(|| {
            let dir = scratch_dir();
            let log = Log::open(dir.path(), options(SyncPolicy::Fsync)).expect("open");
            append_n(&log, &batch(FILL_PAYLOAD, 1), 1);
            log.close().expect("close");
            dir
        });
        b.iter_custom(|iters| time_opens(dir.path(), iters, || ()));
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = storage;
    config = config();
    targets = append, read, recovery
}
criterion_main!(storage);
