//! Criterion micro-benchmarks of the per-message hot paths.
//!
//! - `record/encode/{100,1024,16384}`: `ballast_storage::record::encode`
//!   alone, into a reused buffer: the 40-byte header, key, headers, payload,
//!   CRC32 and padding; the encoder `Log::append` runs. Per record.
//! - `record/decode/{100,1024,16384}`: `ballast_storage::record::decode`
//!   alone, from bytes in memory: length, offset and CRC32 checks, inner
//!   lengths and UTF-8 headers, zero-copy key and payload slices; the
//!   decoder `Log::read` and `Cursor::next` run. Per record.
//! - `log/append/{100,1024,16384}`: `Log::append` of 64-record batches under
//!   `SyncPolicy::None`: validation, the encoder and one `pwrite` into the
//!   page cache per batch; no sync. Per record. Minus `record/encode`: what
//!   the log adds around the encoder.
//! - `log/cursor_next/{100,1024,16384}`: `Cursor::next` over a log in the
//!   page cache: the index walk, the decoder and the done check. Per record.
//!   Minus `record/decode`: what the cursor adds.
//! - `scheduler/pick/{weighted,strict}/{all_ready,low_only}`: the broker's
//!   `LaneScheduler::serve` alone over the default lanes (weights 4:2:1),
//!   with a `take` that costs nothing: smooth weighted round-robin or strict
//!   order. `all_ready`: every lane has something; `low_only`: only the
//!   lowest lane (2) has, so every pick first tries the empty lanes.
//! - `dispatch/{weighted,strict}/{all_ready,low_only}`: the broker's whole
//!   delivery loop, in process (no gRPC), per delivery: the pick, the cursor
//!   read and decode, the lease and the channel send, on the same lane
//!   cases.
//!
//! Records carry a 32-byte idempotency key and two headers, like a typical
//! client publish. Logs live on /dev/shm when it exists (`BALLAST_BENCH_DIR`
//! overrides), so no disk is involved: these are CPU costs.
//!
//! Run: `cargo bench -p ballast-benches --bench hot_paths` (criterion's
//! usual arguments work, e.g. `-- scheduler` to filter).

use std::{
    hint::black_box,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use ballast_broker::{
    Broker, Config,
    queue::{LaneScheduler, Publish, Queue, QueueSettings, SettingsRequest, SyncPolicySetting},
};
use ballast_storage::{Log, LogOptions, NewRecord, SyncPolicy, record};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tempfile::TempDir;

const SIZES: [usize; 3] = [100, 1024, 16 * 1024];
const BATCH: usize = 64;
/// A scratch log is replaced once it holds this much (tmpfs is memory).
const SCRATCH_BYTES_MAX: u64 = 256 << 20;

fn bench_root() -> PathBuf {
    let root = std::env::var_os("BALLAST_BENCH_DIR").map_or_else(
        || {
            let shm = PathBuf::from("/dev/shm");
            if shm.is_dir() { shm.join("ballast-hot-paths") } else { std::env::temp_dir().join("ballast-hot-paths") }
        },
        PathBuf::from,
    );
    std::fs::create_dir_all(&root).expect("creating the bench directory");
    root
}

fn new_record(size: usize, i: u64) -> NewRecord {
    NewRecord {
        timestamp_ms: 1_700_000_000_000 + i,
        attempt: 0,
        flags: 0,
        key: Some(Bytes::from(format!("{i:032x}"))),
        headers: vec![("content-type".into(), "application/json".into()), ("trace-id".into(), format!("{i:016x}"))],
        payload: Bytes::from(vec![0x5a; size]),
    }
}

fn log_options() -> LogOptions {
    LogOptions { segment_size: 64 << 20, sync_policy: SyncPolicy::None, ..LogOptions::default() }
}

struct Scratch {
    log: Log,
    _dir: TempDir,
    bytes: u64,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir_in(bench_root()).expect("scratch dir");
        let log = Log::open(dir.path(), log_options()).expect("open");
        Scratch { log, _dir: dir, bytes: 0 }
    }
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    for size in SIZES {
        let new = new_record(size, 7);
        let stored = new.stored_size();
        group.throughput(Throughput::Bytes(stored));
        let mut buf = Vec::with_capacity(usize::try_from(stored).expect("fits"));
        group.bench_function(BenchmarkId::new("encode", size), |b| {
            b.iter(|| {
                buf.clear();
                black_box(record::encode(black_box(&new), black_box(1_000_000), &mut buf))
            });
        });
        // Encoded here too: a filter that skips the encode bench leaves
        // `buf` empty.
        buf.clear();
        record::encode(&new, 1_000_000, &mut buf);
        let bytes = Bytes::from(buf.clone());
        assert_eq!(record::decode(&bytes, 1_000_000).expect("valid").payload, new.payload);
        group.bench_function(BenchmarkId::new("decode", size), |b| {
            b.iter(|| black_box(record::decode(black_box(&bytes), black_box(1_000_000)).expect("valid record")));
        });
    }
    group.finish();
}

fn log_paths(c: &mut Criterion) {
    let mut group = c.benchmark_group("log");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    for size in SIZES {
        let batch: Vec<NewRecord> = (0..BATCH as u64).map(|i| new_record(size, i)).collect();
        let batch_bytes = (size as u64 + 128) * BATCH as u64;
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function(BenchmarkId::new("append", size), |b| {
            let mut scratch = Scratch::new();
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    if scratch.bytes > SCRATCH_BYTES_MAX {
                        scratch = Scratch::new();
                    }
                    let n = left.min(256);
                    let start = Instant::now();
                    for _ in 0..n {
                        black_box(scratch.log.append(&batch).expect("append"));
                    }
                    total += start.elapsed();
                    scratch.bytes += n * batch_bytes;
                    left -= n;
                }
                total
            });
        });

        // A log of about 32 MiB to read round and round.
        let scratch = Scratch::new();
        let count = ((32u64 << 20) / (size as u64 + 128)).max(BATCH as u64) / BATCH as u64;
        for _ in 0..count {
            let _ = scratch.log.append(&batch).expect("append");
        }
        scratch.log.sync().expect("sync");
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("cursor_next", size), |b| {
            let mut cursor = scratch.log.cursor(0);
            b.iter(|| {
                let record = match cursor.next() {
                    Some(record) => record,
                    None => {
                        cursor.seek(0);
                        cursor.next().expect("a record at 0")
                    }
                };
                black_box(record.expect("valid record").payload.len())
            });
        });
    }
    group.finish();
}

/// The lane pick alone, over the default lanes and weights.
fn scheduler(c: &mut Criterion) {
    let settings = QueueSettings::default();
    let lowest = settings.lane_weights.len() - 1;
    let mut group = c.benchmark_group("scheduler");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(1));
    for (mode, strict) in [("weighted", false), ("strict", true)] {
        for (case, all_ready) in [("all_ready", true), ("low_only", false)] {
            let mut scheduler = LaneScheduler::new(&settings.lane_weights, strict);
            group.bench_function(BenchmarkId::new(format!("pick/{mode}"), case), |b| {
                b.iter(|| black_box(scheduler.serve(|lane| (all_ready || black_box(lane) == lowest).then_some(()))));
            });
        }
    }
    group.finish();
}

/// An in-process broker on tmpfs with one queue per scheduler mode.
struct Dispatch {
    runtime: tokio::runtime::Runtime,
    _dir: TempDir,
    queue: Arc<Queue>,
    /// Undelivered messages per lane, as far as the bench knows.
    backlog: [u64; 3],
}

impl Dispatch {
    fn new(strict: bool) -> Dispatch {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let dir = tempfile::tempdir_in(bench_root()).expect("scratch dir");
        let config = Config { data_dir: dir.path().to_owned(), disk_free_min_bytes: 0, ..Config::default() };
        let queue = runtime.block_on(async {
            let broker = Broker::open(config).expect("open broker");
            let settings = SettingsRequest {
                strict_priority: Some(strict),
                sync_policy: Some(SyncPolicySetting::None),
                dead_letter: Some(false),
                max_messages: Some(1_000_000_000_000),
                max_bytes: Some(1 << 50),
                ..SettingsRequest::default()
            };
            broker.create("dispatch", &settings).await.expect("create queue")
        });
        Dispatch { runtime, _dir: dir, queue, backlog: [0; 3] }
    }

    /// Publishes until each lane in `lanes` has at least `n` undelivered.
    fn top_up(&mut self, lanes: &[u32], n: u64) {
        for &lane in lanes {
            while self.backlog[lane as usize] < n {
                let count = (n - self.backlog[lane as usize]).clamp(1, 1000);
                let messages = (0..count)
                    .map(|_| Publish {
                        payload: Bytes::from_static(&[0x5a; 1024]),
                        lane: Some(lane),
                        ..Publish::default()
                    })
                    .collect();
                self.runtime.block_on(self.queue.publish(messages)).expect("publish");
                self.backlog[lane as usize] += count;
            }
        }
    }

    /// Delivers `n` messages; returns the time subscribe took to dispatch
    /// them (it dispatches synchronously while the consumer has credit).
    fn deliver(&mut self, n: u32) -> Duration {
        let start = Instant::now();
        let mut subscription = self.queue.subscribe(n).expect("subscribe");
        let elapsed = start.elapsed();
        let mut ids = Vec::with_capacity(n as usize);
        while let Ok(delivery) = subscription.deliveries.try_recv() {
            self.backlog[delivery.lane as usize] -= 1;
            ids.push(delivery.delivery_id);
        }
        assert_eq!(ids.len(), n as usize, "dispatch delivered fewer than the credit");
        let holder = ballast_broker::queue::Holder::Consumer(subscription.consumer_id);
        self.runtime.block_on(self.queue.ack(&ids, false, holder)).expect("ack");
        self.queue.unsubscribe(subscription.consumer_id, false);
        elapsed
    }
}

fn dispatch(c: &mut Criterion) {
    const CHUNK: u32 = 1000;
    let mut group = c.benchmark_group("dispatch");
    group.measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(1));
    for (mode, strict) in [("weighted", false), ("strict", true)] {
        for (case, lanes) in [("all_ready", &[0u32, 1, 2][..]), ("low_only", &[2u32][..])] {
            let mut d = Dispatch::new(strict);
            group.bench_function(BenchmarkId::new(mode, case), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let n = u32::try_from(left.min(u64::from(CHUNK))).expect("at most CHUNK");
                        d.top_up(lanes, u64::from(n));
                        total += d.deliver(n);
                        left -= u64::from(n);
                    }
                    total
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, codec, log_paths, scheduler, dispatch);
criterion_main!(benches);
