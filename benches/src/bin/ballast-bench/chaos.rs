//! `chaos`: a bounded soak of the failures real deployments meet, all at
//! once, with the invariants checked at the end.
//!
//! Producers publish durably with idempotency keys (a failed call is
//! retried with the same keys until it succeeds, as the client library
//! does), and some of their attempts carry a deadline of a few
//! milliseconds so they are cancelled mid-way (after the append, during the
//! fsync, anywhere). Consumers ack what they receive. Meanwhile, every
//! `--interval-ms`, the bench injects one fault, picked by `--weights`:
//!
//! - `kill`: SIGKILL the broker and restart it on the same data and port;
//! - `stop`: SIGSTOP the broker for 0.1-1.5 s, then SIGCONT (a stalled
//!   process: clients time out, nothing is lost);
//! - `consumer`: one consumer drops its stream with deliveries unacked (its
//!   host died); they must be redelivered;
//! - `disk`: with `--disk-full`, fill the data directory's filesystem to
//!   the last byte for 0.2-1.5 s, then free it (run with `--data-root` on a
//!   small filesystem of its own, such as a tmpfs, and a broker
//!   `--config` whose disk watermark is below it).
//!
//! At the end the producers stop, the consumers drain the queue, and the
//! bench checks: every acknowledged publish was delivered (lost = 0), no
//! payload was corrupt (each carries a CRC), and no idempotency key was
//! stored twice (a key delivered from two offsets). The run is bounded by
//! `--seconds` and `--cycles` (kill cycles), whichever ends first.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::broker::Channel;
use anyhow::Context;
use ballast_proto::v1::{self as pb, consumer_client::ConsumerClient, publisher_client::PublisherClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    Sync,
    broker::Target,
    recovery::{Delivered, broken_promises, flush, outage_code, payload},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Longest time of the fault phase, in seconds.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Stop after this many kill cycles (0: only --seconds bounds the run).
    #[arg(long, default_value_t = 0)]
    cycles: u32,
    /// Time between two faults, in ms.
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
    /// Relative weights of the faults: kill, stop, consumer, disk.
    #[arg(long, value_delimiter = ',', default_value = "4,2,3,1")]
    weights: Vec<u32>,
    /// Fill the data filesystem in `disk` faults (needs --data-root on a
    /// filesystem of its own; without it `disk` faults are skipped).
    #[arg(long)]
    disk_full: bool,
    /// Producer connections, each with one batch call in flight.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Messages per publish call.
    #[arg(long, default_value_t = 20)]
    batch: usize,
    /// Payload size in bytes (at least 24).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Percentage of publish attempts sent with a 1-20 ms deadline.
    #[arg(long, default_value_t = 10)]
    cancel_percent: u32,
    /// Consumer streams.
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Credit of each consumer stream.
    #[arg(long, default_value_t = 200)]
    credit: u32,
    /// Longest wait for the queue to drain at the end, in seconds.
    #[arg(long, default_value_t = 120.0)]
    drain_max_seconds: f64,
    /// Seed of the fault sequence [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Longest wait for the broker to listen again after a restart, in seconds.
    #[arg(long, default_value_t = 30.0)]
    serve_max_seconds: f64,
}

/// The lease of the scenario's queue: longer than any SIGSTOP, so no lease
/// expires and re-appends a message (which would give it a new offset and
/// read as stored twice).
const LEASE_TIMEOUT_MS: u64 = 120_000;

/// How long a producer keeps retrying its last batch once the fault phase
/// is over.
const STOP_RETRY_MAX: Duration = Duration::from_secs(30);

/// What each message went through, keyed by (producer, seq).
#[derive(Debug, Default)]
struct Ledger {
    acked: HashSet<(u32, u64)>,
    delivered: Delivered,
}

#[derive(Debug, Default)]
struct Shared {
    ledger: Mutex<Ledger>,
    acked_publishes: AtomicU64,
    deduped_retries: AtomicU64,
    cancelled_attempts: AtomicU64,
    /// Batches given up after the fault phase (never acknowledged).
    abandoned_batches: AtomicU64,
    deliveries: AtomicU64,
    /// Bumped by a `consumer` fault; the consumer whose index it names
    /// drops its stream at once.
    consumer_kill: AtomicU64,
    /// Set while the disk is filled (errors then are expected).
    disk_full: AtomicBool,
    errors: Mutex<HashMap<String, u64>>,
}

impl Shared {
    fn error(&self, kind: String) {
        *self.errors.lock().expect("errors lock").entry(kind).or_default() += 1;
    }

    /// Files an error by what explains it: the outage of a kill or stop,
    /// a refusal (retried), the disk being full, or nothing (unexpected).
    fn classify(&self, what: &str, status: &tonic::Status) {
        let kind = match status.code() {
            code if outage_code(code) => "outage",
            tonic::Code::ResourceExhausted => "refused",
            _ if self.disk_full.load(Ordering::Relaxed) => "disk full",
            _ => "unexpected",
        };
        self.error(format!("{kind}: {what} {:?}", status.code()));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Fault {
    Kill,
    Stop,
    Consumer,
    Disk,
}

pub async fn run(target: &mut Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(target.started(), "chaos kills the broker: let the bench start it (no --addr)");
    anyhow::ensure!(args.size >= 24 && args.producers > 0 && args.batch > 0, "size >= 24, counts > 0");
    anyhow::ensure!(args.weights.len() == 4, "--weights takes four numbers: kill,stop,consumer,disk");
    anyhow::ensure!(args.cancel_percent <= 100, "--cancel-percent is at most 100");
    let disk_root = match (args.disk_full, target.data_root()) {
        (true, Some(root)) => Some(root.to_owned()),
        (true, None) => anyhow::bail!("--disk-full needs a broker started by the bench"),
        (false, _) => None,
    };
    let queue = "bench-chaos";
    let mut settings = sync.settings();
    settings.lease_timeout_ms = Some(LEASE_TIMEOUT_MS);
    target.fresh_queue(queue, settings).await?;
    let shared = Arc::new(Shared::default());
    let stop_producers = Arc::new(AtomicBool::new(false));
    let stop_consumers = Arc::new(AtomicBool::new(false));

    let mut producers = Vec::new();
    for p in 0..args.producers {
        let channel = target.channel().await?;
        let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop_producers));
        let producer = Producer {
            queue,
            id: u32::try_from(p)?,
            batch: args.batch,
            size: args.size,
            cancel_percent: args.cancel_percent,
        };
        producers.push(tokio::spawn(producer.run(channel, shared, stop)));
    }
    let mut consumers = Vec::new();
    for c in 0..args.consumers {
        let channel = target.channel().await?;
        let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop_consumers));
        consumers.push(tokio::spawn(consume(channel, queue, c as u64, args.credit, shared, stop)));
    }

    let started = Instant::now();
    let mut counts: HashMap<Fault, u64> = HashMap::new();
    let mut kills = 0u32;
    let mut restart_s: Vec<f64> = Vec::new();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    // The seed fixes the order and length of the faults, not the load's
    // timing around them.
    println!("chaos: fault seed {seed} (--seed {seed} replays the fault sequence)");
    let mut rng = fastrand::Rng::with_seed(seed);
    while started.elapsed().as_secs_f64() < args.seconds && (args.cycles == 0 || kills < args.cycles) {
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
        let fault = pick(&mut rng, &args.weights, disk_root.is_some());
        match fault {
            Fault::Kill => {
                let took = tokio::task::block_in_place(|| target.kill_and_restart())?;
                anyhow::ensure!(
                    took.as_secs_f64() < args.serve_max_seconds,
                    "the broker took {:.1} s to listen again after kill {kills}",
                    took.as_secs_f64()
                );
                restart_s.push(took.as_secs_f64());
                kills += 1;
            }
            Fault::Stop => {
                let pid = target.pid().context("the bench started the broker")?;
                signal(pid, libc::SIGSTOP)?;
                tokio::time::sleep(Duration::from_millis(rng.u64(100..1500))).await;
                signal(pid, libc::SIGCONT)?;
            }
            Fault::Consumer => {
                shared.consumer_kill.store(rng.u64(0..args.consumers.max(1) as u64) + 1, Ordering::Relaxed);
            }
            Fault::Disk => {
                let root = disk_root.as_deref().expect("disk faults are picked only with a root");
                shared.disk_full.store(true, Ordering::Relaxed);
                let filled = tokio::task::block_in_place(|| fill(root));
                tokio::time::sleep(Duration::from_millis(rng.u64(200..1500))).await;
                let _ = std::fs::remove_file(root.join(FILLER));
                filled?;
                // Calls that failed during the episode finish failing now.
                tokio::time::sleep(Duration::from_millis(200)).await;
                shared.disk_full.store(false, Ordering::Relaxed);
            }
        }
        *counts.entry(fault).or_default() += 1;
        let done: u64 = counts.values().sum();
        if done % 100 == 0 {
            println!(
                "  {:.0} s: {done} faults ({kills} kills), {} publishes acknowledged",
                started.elapsed().as_secs_f64(),
                shared.acked_publishes.load(Ordering::Relaxed)
            );
        }
    }
    let fault_seconds = started.elapsed().as_secs_f64();
    stop_producers.store(true, Ordering::Relaxed);
    for producer in producers {
        producer.await?;
    }
    let drained = drain(target, queue, &shared, args.drain_max_seconds).await?;
    stop_consumers.store(true, Ordering::Relaxed);
    for consumer in consumers {
        consumer.await?;
    }
    report(args, sync, seed, &shared, &counts, kills, &restart_s, fault_seconds, drained)
}

/// Waits until every acknowledged publish was delivered and the queue is
/// empty, or `max_seconds` pass; returns whether it drained.
async fn drain(target: &Target, queue: &str, shared: &Shared, max_seconds: f64) -> anyhow::Result<bool> {
    let start = Instant::now();
    let channel = target.channel().await?;
    while start.elapsed().as_secs_f64() < max_seconds {
        let missing = {
            let ledger = shared.ledger.lock().expect("ledger lock");
            ledger.acked.iter().filter(|k| !ledger.delivered.by_key.contains_key(k)).count()
        };
        if missing == 0 && Target::stats_on(&channel, queue).await?.saturation.unwrap_or_default().depth == 0 {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(false)
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    sync: Sync,
    seed: u64,
    shared: &Shared,
    counts: &HashMap<Fault, u64>,
    kills: u32,
    restart_s: &[f64],
    fault_seconds: f64,
    drained: bool,
) -> anyhow::Result<serde_json::Value> {
    let ledger = shared.ledger.lock().expect("ledger lock");
    let acked = ledger.acked.len() as u64;
    let lost = ledger.acked.iter().filter(|k| !ledger.delivered.by_key.contains_key(k)).count() as u64;
    let stored_twice = ledger.delivered.by_key.values().filter(|v| v.3).count() as u64;
    let redeliveries: u64 = ledger.delivered.by_key.values().map(|v| u64::from(v.2 - 1)).sum();
    let errors = shared.errors.lock().expect("errors lock").clone();
    let unexpected: u64 = errors.iter().filter(|(k, _)| k.starts_with("unexpected")).map(|(_, v)| v).sum();
    let count = |fault| counts.get(&fault).copied().unwrap_or(0);
    let restart_mean = restart_s.iter().sum::<f64>() / restart_s.len().max(1) as f64;
    let restart_max = restart_s.iter().copied().fold(0.0, f64::max);
    println!(
        "chaos: {fault_seconds:.0} s of faults, sync {sync:?}: {} kill -9, {} SIGSTOP, {} consumers dropped, {} disk-full episodes",
        count(Fault::Kill),
        count(Fault::Stop),
        count(Fault::Consumer),
        count(Fault::Disk)
    );
    println!("  SIGKILL -> listening again: mean {restart_mean:.3} s, max {restart_max:.3} s");
    println!(
        "  acknowledged publishes {acked}; lost {lost}; corrupt {}; keys stored twice {stored_twice}; redeliveries {redeliveries}; retries answered as duplicates {}; attempts cancelled by deadline {}; batches given up at the end {}",
        ledger.delivered.corrupt,
        shared.deduped_retries.load(Ordering::Relaxed),
        shared.cancelled_attempts.load(Ordering::Relaxed),
        shared.abandoned_batches.load(Ordering::Relaxed)
    );
    let mut kinds: Vec<_> = errors.iter().collect();
    kinds.sort();
    for (kind, n) in &kinds {
        println!("  client errors: {n:>7} {kind}");
    }
    let failures =
        broken_promises(lost, ledger.delivered.corrupt, stored_twice, unexpected, drained, args.drain_max_seconds);
    Ok(serde_json::json!({
        "scenario": "chaos", "seconds": fault_seconds, "interval_ms": args.interval_ms,
        "weights": args.weights, "disk_full": args.disk_full,
        "producers": args.producers, "batch": args.batch, "size": args.size,
        "cancel_percent": args.cancel_percent, "consumers": args.consumers, "credit": args.credit,
        "sync": format!("{sync:?}").to_lowercase(),
        "faults": { "kill": count(Fault::Kill), "stop": count(Fault::Stop),
            "consumer": count(Fault::Consumer), "disk": count(Fault::Disk) },
        "seed": seed, "kill_cycles": kills, "restart_mean_s": restart_mean, "restart_max_s": restart_max,
        "acked_publishes": acked, "lost": lost, "corrupt": ledger.delivered.corrupt,
        "stored_twice": stored_twice, "redeliveries": redeliveries,
        "deliveries": shared.deliveries.load(Ordering::Relaxed),
        "retries_answered_duplicate": shared.deduped_retries.load(Ordering::Relaxed),
        "cancelled_attempts": shared.cancelled_attempts.load(Ordering::Relaxed),
        "abandoned_batches": shared.abandoned_batches.load(Ordering::Relaxed),
        "client_errors": errors, "unexpected_errors": unexpected,
        "drained": drained,
        "failures": failures,
    }))
}

/// One fault, by weight; `disk` only when the disk can be filled.
fn pick(rng: &mut fastrand::Rng, weights: &[u32], disk: bool) -> Fault {
    let faults = [Fault::Kill, Fault::Stop, Fault::Consumer, Fault::Disk];
    let usable = |i: usize| faults[i] != Fault::Disk || disk;
    let total: u32 = (0..4).filter(|&i| usable(i)).map(|i| weights[i]).sum();
    if total == 0 {
        return Fault::Kill;
    }
    let mut roll = rng.u32(0..total);
    for i in (0..4).filter(|&i| usable(i)) {
        if roll < weights[i] {
            return faults[i];
        }
        roll -= weights[i];
    }
    Fault::Kill
}

fn signal(pid: u32, signal: libc::c_int) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid)?;
    // SAFETY: kill(2) on our own child process; no memory is involved.
    let rc = unsafe { libc::kill(pid, signal) };
    anyhow::ensure!(rc == 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    Ok(())
}

/// The file a `disk` fault fills the filesystem with.
const FILLER: &str = "chaos-filler";

/// Fills the filesystem of `root` to the last block with one file.
fn fill(root: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(root.join(FILLER))?;
    let chunk = vec![0u8; 1 << 20];
    loop {
        match file.write(&chunk) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(()),
            Err(e) => return Err(e).context("filling the disk"),
        }
    }
}

struct Producer {
    queue: &'static str,
    id: u32,
    batch: usize,
    size: usize,
    cancel_percent: u32,
}

impl Producer {
    /// Batches with idempotency keys, one call in flight; a failed call is
    /// retried with the same keys until it succeeds (so stopping waits for
    /// the current batch). Some attempts get a deadline of a few ms.
    async fn run(self, channel: Channel, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
        let mut client = PublisherClient::new(channel);
        let mut rng = fastrand::Rng::new();
        let mut next = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let seqs = next..next + self.batch as u64;
            next += self.batch as u64;
            let messages: Vec<pb::Message> = seqs
                .clone()
                .map(|seq| pb::Message {
                    payload: payload(self.id, seq, self.size),
                    idempotency_key: format!("p{}-{seq}", self.id),
                    ..Default::default()
                })
                .collect();
            let mut stopping_since: Option<Instant> = None;
            loop {
                if stop.load(Ordering::Relaxed) {
                    // After the fault phase a batch still failing (a queue
                    // that cannot write) is given up: never acknowledged,
                    // so nothing is owed for it.
                    let since = *stopping_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > STOP_RETRY_MAX {
                        shared.abandoned_batches.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                let cancel = rng.u32(0..100) < self.cancel_percent;
                let timeout = if cancel { Duration::from_millis(rng.u64(1..20)) } else { Duration::from_secs(10) };
                let mut request = tonic::Request::new(pb::PublishBatchRequest {
                    queue: self.queue.into(),
                    messages: messages.clone(),
                });
                request.set_timeout(timeout);
                match client.publish_batch(request).await {
                    Ok(response) => {
                        let receipts = response.into_inner().receipts;
                        let deduped = receipts.iter().filter(|r| r.duplicate).count() as u64;
                        shared.deduped_retries.fetch_add(deduped, Ordering::Relaxed);
                        let mut ledger = shared.ledger.lock().expect("ledger lock");
                        for seq in seqs.clone() {
                            ledger.acked.insert((self.id, seq));
                        }
                        shared.acked_publishes.fetch_add(self.batch as u64, Ordering::Relaxed);
                        break;
                    }
                    // The client's timer (CANCELLED) or the broker's
                    // (DEADLINE_EXCEEDED) ended the attempt.
                    Err(status)
                        if cancel
                            && matches!(status.code(), tonic::Code::DeadlineExceeded | tonic::Code::Cancelled) =>
                    {
                        shared.cancelled_attempts.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => {
                        shared.classify("publish", &status);
                        let retry_after = status
                            .metadata()
                            .get("retry-after-ms")
                            .and_then(|v| v.to_str().ok()?.parse().ok())
                            .unwrap_or(2u64);
                        tokio::time::sleep(Duration::from_millis(retry_after.min(500))).await;
                    }
                }
            }
        }
    }
}

/// A consumer: reconnects after a broken stream; checks every payload;
/// acks and grants credit back as it goes; drops its stream with its
/// deliveries unacked when a `consumer` fault names it.
async fn consume(
    channel: Channel,
    queue: &'static str,
    index: u64,
    credit: u32,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        match session(&channel, queue, index, credit, &shared, &stop).await {
            Ok(()) => {}
            Err(status) => {
                shared.classify("consume", &status);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

async fn session(
    channel: &Channel,
    queue: &str,
    index: u64,
    credit: u32,
    shared: &Shared,
    stop: &AtomicBool,
) -> Result<(), tonic::Status> {
    let mut client = ConsumerClient::new(channel.clone());
    let (tx, rx) = mpsc::channel(64);
    let subscribe = pb::Subscribe { queue: queue.into(), credit };
    tx.try_send(pb::ConsumeRequest { kind: Some(pb::consume_request::Kind::Subscribe(subscribe)) })
        .map_err(|_| tonic::Status::unavailable("request queue"))?;
    let mut stream = client.consume(ReceiverStream::new(rx)).await?.into_inner();
    let mut to_ack = Vec::new();
    let chunk = (credit as usize / 4).max(1);
    while !stop.load(Ordering::Relaxed) {
        if shared.consumer_kill.compare_exchange(index + 1, 0, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            // The host died: the stream goes, its deliveries unacked.
            return Ok(());
        }
        let message = match tokio::time::timeout(Duration::from_millis(20), stream.message()).await {
            Ok(message) => message?,
            Err(_) => {
                flush(&tx, &mut to_ack).await?;
                continue;
            }
        };
        match message.and_then(|m| m.kind) {
            Some(pb::consume_response::Kind::Delivery(d)) => {
                shared.deliveries.fetch_add(1, Ordering::Relaxed);
                shared.ledger.lock().expect("ledger lock").delivered.record(&d);
                to_ack.push(d.delivery_id);
                if to_ack.len() >= chunk {
                    flush(&tx, &mut to_ack).await?;
                }
            }
            // An ack of a delivery that a restart or a dropped stream took
            // back: it will be delivered again.
            // (It never extends leases, so no `extended` answer comes.)
            Some(
                pb::consume_response::Kind::Rejected(_)
                | pb::consume_response::Kind::Subscribed(_)
                | pb::consume_response::Kind::Extended(_),
            ) => {}
            None => return Err(tonic::Status::unavailable("the consume stream ended")),
        }
    }
    flush(&tx, &mut to_ack).await?;
    Ok(())
}
