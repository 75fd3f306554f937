//! `compare`: Ballast side by side with NATS JetStream and RabbitMQ, one
//! load generator driving all three with the same parameters, in
//! interleaved rounds (the median of each figure is reported).
//!
//! Built only with the `compare` feature of `ballast-benches` (the peers'
//! clients, `async-nats` and `lapin`, stay out of default builds and CI):
//!
//! ```text
//! benches/scripts/install-peers        # Debian, as root: nats-server, rabbitmq-server
//! cargo build --release -p ballast-broker -p ballast-benches --features ballast-benches/compare
//! target/release/ballast-bench compare --rounds 3 --messages 200000 --size 1024,100 --rate 2000,10000
//! ```
//!
//! The bench starts each peer itself on loopback, with fresh data in a
//! directory of the run beside the started broker's (`--data-root`, so all
//! three write to the same disk), and stops them at the end, also on error:
//! `nats-server -js` (file storage) and a RabbitMQ node of its own (ports,
//! node name, Mnesia and logs of the run, no plugins). `--peers nats` or
//! `--peers rabbitmq` runs one peer, `--peers none` Ballast alone (the
//! smoke test's way to exercise Ballast's side without the peers). The
//! peers share the bench's process group, so a Ctrl-C stops them too
//! (their data then stays under `--data-root`, in `peers-<pid>`).
//!
//! Workloads, each on a fresh queue per system and round:
//!
//! 1. **publish**: `--messages` of `--size` bytes, durable, from
//!    `--producers` connections each keeping `--unacked` messages
//!    unacknowledged. Ballast through the client `Producer` (batches of
//!    `--batch`, `--linger-ms`); NATS: JetStream publishes with their
//!    `PubAck` futures; RabbitMQ: persistent publishes with publisher
//!    confirms.
//! 2. **drain**: the queue the publish filled, by one consumer with
//!    `--prefetch` unacknowledged at most: Ballast's `Consumer` (credit),
//!    a JetStream pull consumer (`max_ack_pending` and pull batches of the
//!    prefetch, explicit acks), RabbitMQ `basic.qos` with acks.
//! 3. **latency**: publish-to-delivery (and publish-to-ack) at each
//!    `--rate`, open loop, measured from each message's intended send time
//!    (as `latency` does: coordinated omission is corrected by
//!    construction). Ballast through the `Producer` with linger 0 and the
//!    `Consumer`.
//!
//! Ballast also runs each workload through the generated stubs, the
//! `ballast_raw` row: what the broker does without the client library's
//! costs, so the table shows where a gap lies. Publish: `PublishBatch`
//! calls of `--batch` messages, `unacked / batch` calls in flight per
//! connection, idempotency keys as the Producer sends them; drain: a raw
//! `Consume` stream with the prefetch as credit, acks in chunks; latency:
//! one unary `Publish` per message.
//!
//! Durability differs and the table does not hide it: Ballast acks after
//! its sync policy (`--sync`, fsync by default), a quorum queue confirms
//! after its Raft log's fsync, and JetStream 2.9 acknowledges before any
//! fsync (it syncs every two minutes by default).
//!
//! Each round also measures the disk's own floor beside the brokers' data
//! (`--disk-probe` sequential 4 KiB writes, each followed by `fdatasync`,
//! what fio's `--bs=4k --fdatasync=1` job measures): the table gives each
//! Ballast latency p99 over that fdatasync p99 (issue #18 asks for 2x at
//! most at 10,000 msg/s).
//!
//! Next to each figure: the load tool's own CPU share (`/proc/self/stat`,
//! CPU seconds over wall seconds and cores: the share of the machine the
//! generator took from the brokers) and the broker's CPU in cores. The JSON
//! (`target/bench-results/compare.json`) has every round; the table on
//! stdout has the medians and the ratios Ballast / peer.

mod clients;
mod disk;
mod servers;

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::Semaphore;

use crate::{Sync, broker::Target, load};
use clients::{OnPayload, Publisher, RabbitQueue, System};
use servers::Server;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Peers beside Ballast, comma-separated: nats, rabbitmq, or none.
    #[arg(long, value_delimiter = ',', default_values = ["nats", "rabbitmq"])]
    peers: Vec<Peer>,
    /// Workloads to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values = ["publish", "drain", "latency"])]
    workloads: Vec<Workload>,
    /// Interleaved rounds (each runs every workload on every system).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Messages per publish and drain run.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Payload sizes in bytes for publish and drain, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1024])]
    size: Vec<usize>,
    /// Producer connections (publish; latency spreads sends over them).
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Messages each producer keeps unacknowledged (publish).
    #[arg(long, default_value_t = 256)]
    unacked: usize,
    /// Ballast's batch: messages per raw PublishBatch call and the
    /// Producer's `batch_count_max`.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// The Ballast Producer's linger in the publish workload, ms (the
    /// latency workload uses 0).
    #[arg(long, default_value_t = 5)]
    linger_ms: u64,
    /// Unacknowledged deliveries a consumer may hold (drain and latency).
    #[arg(long, default_value_t = 1000)]
    prefetch: u32,
    /// Offered rates for the latency workload, messages per second,
    /// comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [2_000, 10_000])]
    rate: Vec<u64>,
    /// Payload size of the latency workload, bytes (at least 16).
    #[arg(long, default_value_t = 1024)]
    latency_size: usize,
    /// Measured seconds per latency run (after the warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Warm-up seconds per latency run, not measured.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Sends in flight at most in the latency workload; past it the
    /// generator waits (and the wait shows in the latencies).
    #[arg(long, default_value_t = 4096)]
    inflight: usize,
    /// How RabbitMQ stores the queue.
    #[arg(long, value_enum, default_value_t = RabbitQueue::Quorum)]
    rabbitmq_queue: RabbitQueue,
    /// The nats-server binary [default: /usr/sbin/nats-server or PATH].
    #[arg(long)]
    nats_server: Option<std::path::PathBuf>,
    /// RabbitMQ's start script [default: /usr/lib/rabbitmq/bin/rabbitmq-server or PATH].
    #[arg(long)]
    rabbitmq_server: Option<std::path::PathBuf>,
    /// Write + fdatasync pairs of 4 KiB per round measuring the disk's own
    /// floor beside the brokers' data (0: skip).
    #[arg(long, default_value_t = 2000)]
    disk_probe: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Peer {
    Nats,
    Rabbitmq,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    Publish,
    Drain,
    Latency,
}

pub async fn run(
    target: &Target,
    args: &Args,
    sync: Sync,
    data_root: &Path,
    keep: bool,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        args.rounds > 0
            && args.messages > 0
            && args.producers > 0
            && args.unacked > 0
            && args.batch > 0
            && args.prefetch > 0
            && args.size.iter().all(|&s| s > 0),
        "rounds, messages, producers, unacked, batch, prefetch and sizes must be positive"
    );
    anyhow::ensure!(
        args.prefetch <= ballast_client::contract::CREDIT_MAX && args.prefetch <= u32::from(u16::MAX),
        "--prefetch must be at most {} (Ballast's credit ceiling; RabbitMQ's is 65,535)",
        ballast_client::contract::CREDIT_MAX
    );
    anyhow::ensure!(args.latency_size >= 16, "--latency-size must be at least 16 bytes (a sequence number)");
    anyhow::ensure!(args.rate.iter().all(|&r| r > 0) && args.inflight > 0, "rates and --inflight must be positive");
    anyhow::ensure!(
        !args.peers.contains(&Peer::None) || args.peers.len() == 1,
        "--peers none runs Ballast alone: do not list peers with it"
    );
    let peers = Peers::start(args, data_root, keep).await?;
    let mut systems = vec![System::Ballast { endpoint: target.endpoint.clone() }];
    systems.extend(peers.systems.iter().map(|(system, _)| system.clone()));
    let broker_pid = |system: &System| match system {
        System::Ballast { .. } | System::BallastRaw { .. } => target.pid(),
        _ => peers.systems.iter().find(|(s, _)| s.name() == system.name()).and_then(|(_, pid)| *pid),
    };

    let mut results = Results::default();
    for round in 0..args.rounds {
        // Interleaved, and each round starts with another system, so none
        // always runs first (or last) on a warming machine.
        let mut order = systems.clone();
        let first = round % order.len();
        order.rotate_left(first);
        println!("round {} of {}: {}", round + 1, args.rounds, names(&order));
        if args.disk_probe > 0 {
            let dir = target.data_root().map_or_else(|| data_root.to_owned(), Path::to_owned);
            let (count, meter) = (args.disk_probe, Meter::start(None));
            let histogram = tokio::task::spawn_blocking(move || disk::fdatasync_latency(&dir, count)).await??;
            let (_, usage) = meter.stop()?;
            println!(
                "  {:<10} fdatasync 4 KiB: p50 {:.2} ms p99 {:.2} ms",
                "disk",
                ms(&histogram, 0.5),
                ms(&histogram, 0.99)
            );
            for (quantile, kind) in [(0.5, "fdatasync_p50"), (0.99, "fdatasync_p99")] {
                let detail = load::percentiles(&histogram);
                results.add(Figure { kind, parameter: 4096 }, "disk", ms(&histogram, quantile), usage, detail);
            }
        }
        for &size in &args.size {
            if !args.workloads.iter().any(|w| matches!(w, Workload::Publish | Workload::Drain)) {
                break;
            }
            for system in &with_raw(target, &order, args.producers).await? {
                let pid = broker_pid(system);
                publish_and_drain(&mut results, target, args, sync, system, size, pid).await?;
            }
        }
        if args.workloads.contains(&Workload::Latency) {
            for &rate in &args.rate {
                for system in &with_raw(target, &order, args.producers).await? {
                    system.fresh_queue(target, sync).await?;
                    let (measured, usage) = latency(system, args, rate, broker_pid(system)).await?;
                    println!(
                        "  {:<10} latency at {rate}/s: delivery p50 {:.2} ms p99 {:.2} ms, ack p50 {:.2} ms p99 {:.2} ms, \
                         send lag p99 {:.2} ms (tool CPU {:.0}%)",
                        system.name(),
                        ms(&measured.delivered, 0.5),
                        ms(&measured.delivered, 0.99),
                        ms(&measured.acked, 0.5),
                        ms(&measured.acked, 0.99),
                        ms(&measured.send_lag, 0.99),
                        usage.tool_share * 100.0
                    );
                    for (quantile, label) in [(0.5, "p50"), (0.99, "p99")] {
                        let figure = Figure::latency(rate, label);
                        results.add(figure, system.name(), ms(&measured.delivered, quantile), usage, measured.json());
                    }
                }
            }
        }
    }

    let systems: Vec<&str> = systems.iter().map(System::name).collect();
    let figures = results.summary(&systems);
    print_table(&results, &systems);
    println!(
        "durability: Ballast acks after its sync policy ({}); a RabbitMQ {} queue confirms after {}; \
         NATS JetStream acks before any fsync",
        format!("{sync:?}").to_lowercase(),
        format!("{:?}", args.rabbitmq_queue).to_lowercase(),
        match args.rabbitmq_queue {
            RabbitQueue::Quorum => "its Raft log's fsync",
            RabbitQueue::Classic => "the message is written (fsynced in batches)",
        }
    );
    Ok(serde_json::json!({
        "scenario": "compare", "sync": format!("{sync:?}").to_lowercase(),
        "systems": systems, "versions": peers.versions,
        "rounds": args.rounds, "messages": args.messages, "sizes": args.size, "producers": args.producers,
        "unacked": args.unacked, "batch": args.batch, "linger_ms": args.linger_ms, "prefetch": args.prefetch,
        "rates": args.rate, "latency_size": args.latency_size, "seconds": args.seconds, "warmup": args.warmup,
        "inflight": args.inflight,
        "rabbitmq_queue": format!("{:?}", args.rabbitmq_queue).to_lowercase(),
        "cpus": cpus(),
        "figures": figures,
        "failures": [],
    }))
}

/// The publish workload and the drain of what it stored (Ballast raw:
/// `PublishBatch` calls of `--batch`, then a raw consume stream).
async fn publish_and_drain(
    results: &mut Results,
    target: &Target,
    args: &Args,
    sync: Sync,
    system: &System,
    size: usize,
    broker_pid: Option<u32>,
) -> anyhow::Result<()> {
    let name = system.name();
    system.fresh_queue(target, sync).await?;
    let (elapsed, usage) = match system {
        System::BallastRaw { publish: channels, .. } => {
            let inflight = (args.unacked / args.batch).max(1);
            let meter = Meter::start(broker_pid);
            load::publish_all(channels, clients::QUEUE, args.messages, size, args.batch, inflight, true).await?;
            meter.stop()?
        }
        _ => publish_with(system, args, size, broker_pid).await?,
    };
    if args.workloads.contains(&Workload::Publish) {
        let rate = load::rate(args.messages, elapsed);
        print_figure(name, &format!("publish {size} B"), rate, usage);
        results.add(Figure::publish(size), name, rate, usage, serde_json::Value::Null);
    }
    if args.workloads.contains(&Workload::Drain) {
        let meter = Meter::start(broker_pid);
        system.consume(args.messages, args.prefetch, Arc::new(|_| {})).await?;
        let (elapsed, usage) = meter.stop()?;
        let rate = load::rate(args.messages, elapsed);
        print_figure(name, &format!("drain {size} B"), rate, usage);
        results.add(Figure::drain(size), name, rate, usage, serde_json::Value::Null);
    }
    Ok(())
}

/// `order` with Ballast's raw row right before Ballast's, on connections
/// of its own (one per producer, one for the consumer).
async fn with_raw(target: &Target, order: &[System], producers: usize) -> anyhow::Result<Vec<System>> {
    let mut systems = Vec::with_capacity(order.len() + 1);
    for system in order {
        if matches!(system, System::Ballast { .. }) {
            let mut publish = Vec::with_capacity(producers);
            for _ in 0..producers {
                publish.push(target.channel().await?);
            }
            systems.push(System::BallastRaw { publish, consume: target.channel().await? });
        }
        systems.push(system.clone());
    }
    Ok(systems)
}

/// Publishes `--messages` through `--producers` publishers of `system`,
/// each keeping `--unacked` unacknowledged; returns the time from the first
/// send to the last ack.
async fn publish_with(
    system: &System,
    args: &Args,
    size: usize,
    broker_pid: Option<u32>,
) -> anyhow::Result<(Duration, Usage)> {
    let linger = Duration::from_millis(args.linger_ms);
    let mut publishers = Vec::new();
    for index in 0..args.producers {
        publishers.push(system.publisher(index, args.unacked, args.batch, linger).await?);
    }
    let payload = Bytes::from(vec![b'x'; size]);
    let producers = args.producers as u64;
    let meter = Meter::start(broker_pid);
    let mut tasks = Vec::new();
    for (index, publisher) in publishers.into_iter().enumerate() {
        // The remainder goes to the first producers, one message each.
        let count = args.messages / producers + u64::from((index as u64) < args.messages % producers);
        let (payload, window) = (payload.clone(), args.unacked);
        tasks.push(tokio::spawn(async move { publisher.send_all(count, payload, window).await }));
    }
    for task in tasks {
        task.await??;
    }
    meter.stop()
}

/// What one open-loop latency run measured.
struct Measured {
    achieved_rate: f64,
    /// Intended send time to delivery to the consumer.
    delivered: hdrhistogram::Histogram<u64>,
    /// Intended send time to the system's durable ack.
    acked: hdrhistogram::Histogram<u64>,
    /// How late the generator sent after the intended time.
    send_lag: hdrhistogram::Histogram<u64>,
}

impl Measured {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "achieved_rate": self.achieved_rate,
            "publish_to_delivery": load::percentiles(&self.delivered),
            "publish_to_ack": load::percentiles(&self.acked),
            "send_lag": load::percentiles(&self.send_lag),
        })
    }
}

/// An open-loop run at `rate` on `system`'s (fresh, empty) queue: one
/// consumer, sends spread over `--producers` publishers.
async fn latency(
    system: &System,
    args: &Args,
    rate: u64,
    broker_pid: Option<u32>,
) -> anyhow::Result<(Measured, Usage)> {
    let total = rate * (args.seconds + args.warmup);
    let warmup_count = rate * args.warmup;
    let interval_ns = 1_000_000_000 / rate;
    let mut publishers = Vec::new();
    let window = args.inflight.div_ceil(args.producers);
    for index in 0..args.producers {
        publishers.push(system.publisher(index, window, args.batch, Duration::ZERO).await?);
    }
    let delivered = Arc::new(Mutex::new(load::histogram()));
    let acked = Arc::new(Mutex::new(load::histogram()));
    let send_lag = Arc::new(Mutex::new(load::histogram()));
    let meter = Meter::start(broker_pid);
    let start = Instant::now();
    let intended = move |seq: u64| start + Duration::from_nanos(seq * interval_ns);
    let on_payload: OnPayload = {
        let delivered = Arc::clone(&delivered);
        Arc::new(move |payload: &[u8]| {
            let Some(seq) = payload.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes) else {
                return;
            };
            if seq >= warmup_count {
                let us = intended(seq).elapsed().as_micros().max(1) as u64;
                let _ = delivered.lock().expect("histogram lock").record(us);
            }
        })
    };
    let consumer = {
        let system = system.clone();
        let prefetch = args.prefetch;
        tokio::spawn(async move { system.consume(total, prefetch, on_payload).await })
    };

    let permits = Arc::new(Semaphore::new(args.inflight));
    let filler = Bytes::from(vec![b'x'; args.latency_size - 8]);
    let runtime = tokio::runtime::Handle::current();
    let size = args.latency_size;
    let generator = {
        let (acked, send_lag) = (Arc::clone(&acked), Arc::clone(&send_lag));
        load::open_loop(total, start, interval_ns, move |seq, at| {
            let permit = runtime.block_on(Arc::clone(&permits).acquire_owned())?;
            if seq >= warmup_count {
                let us = Instant::now().saturating_duration_since(at).as_micros().max(1) as u64;
                let _ = send_lag.lock().expect("histogram lock").record(us);
            }
            let mut payload = BytesMut::with_capacity(size);
            payload.put_u64_le(seq);
            payload.put_slice(&filler);
            let publisher: Publisher = publishers[(seq % publishers.len() as u64) as usize].clone();
            let acked = Arc::clone(&acked);
            Ok(runtime.spawn(async move {
                let result = async { publisher.send(payload.freeze()).await?.await }.await;
                if seq >= warmup_count {
                    let us = at.elapsed().as_micros().max(1) as u64;
                    let _ = acked.lock().expect("histogram lock").record(us);
                }
                drop(permit);
                result
            }))
        })
    };
    let sends = load::join_open_loop(generator).await?;
    for send in sends {
        send.await??;
    }
    let offered_for = start.elapsed();
    tokio::time::timeout(Duration::from_secs(120), consumer).await???;
    let (_, usage) = meter.stop()?;
    let take = |h: &Arc<Mutex<hdrhistogram::Histogram<u64>>>| h.lock().expect("histogram lock").clone();
    let measured = Measured {
        achieved_rate: load::rate(total, offered_for),
        delivered: take(&delivered),
        acked: take(&acked),
        send_lag: take(&send_lag),
    };
    Ok((measured, usage))
}

/// The peers the run started, stopped when dropped.
struct Peers {
    /// Each peer's system and the pid whose CPU counts as its own.
    systems: Vec<(System, Option<u32>)>,
    versions: serde_json::Map<String, serde_json::Value>,
    /// Held for their `Drop`, which stops them.
    servers: Vec<Server>,
    /// The run's directory holding each server's.
    root: std::path::PathBuf,
}

impl Peers {
    /// Finds every requested peer's binary first (so a missing one fails
    /// before anything starts), then starts them one after another.
    async fn start(args: &Args, data_root: &Path, keep: bool) -> anyhow::Result<Peers> {
        let nats = args.peers.contains(&Peer::Nats).then(|| servers::nats_binary(args.nats_server.as_deref()));
        let rabbitmq =
            args.peers.contains(&Peer::Rabbitmq).then(|| servers::rabbitmq_binary(args.rabbitmq_server.as_deref()));
        let (nats, rabbitmq) = (nats.transpose()?, rabbitmq.transpose()?);
        let root = std::path::absolute(data_root)?.join(format!("peers-{}", std::process::id()));
        let mut peers =
            Peers { systems: Vec::new(), versions: serde_json::Map::new(), servers: Vec::new(), root: root.clone() };
        if let Some(binary) = nats {
            let version = command_output(&binary, &["--version"]);
            println!("starting {} ({version})", binary.display());
            let mut server = Server::nats(&binary, root.join("nats"), keep)?;
            let addr = format!("127.0.0.1:{}", server.port);
            server.wait_until_ready(|| clients::nats_ready(&addr)).await?;
            peers.versions.insert("nats".into(), version.into());
            peers.systems.push((System::Nats { addr }, server.cpu_pid));
            peers.servers.push(server);
        }
        if let Some(binary) = rabbitmq {
            let version = command_output(Path::new("dpkg-query"), &["-W", "-f", "${Version}", "rabbitmq-server"]);
            println!("starting {} ({version}, {:?} queues)", binary.display(), args.rabbitmq_queue);
            let mut server = Server::rabbitmq(&binary, root.join("rabbitmq"), keep)?;
            let uri = format!("amqp://guest:guest@127.0.0.1:{}/%2f", server.port);
            server.wait_until_ready(|| clients::rabbitmq_ready(&uri)).await?;
            peers.versions.insert("rabbitmq".into(), version.into());
            peers.systems.push((System::Rabbitmq { uri, queue: args.rabbitmq_queue }, server.cpu_pid));
            peers.servers.push(server);
        }
        Ok(peers)
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        if !self.servers.is_empty() {
            println!("stopping the peers");
        }
        // Each server stops and removes its directory (unless kept); the
        // run's directory is then empty, or holds what was kept.
        self.servers.clear();
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// A command's first line of output, or `unknown`.
fn command_output(program: &Path, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// CPU used during a measurement: the load tool's (this process) and the
/// broker's.
#[derive(Debug, Clone, Copy)]
struct Usage {
    /// The tool's CPU seconds over wall seconds and the machine's cores:
    /// the share of the machine the generator itself took.
    tool_share: f64,
    /// The broker's CPU seconds over wall seconds, in cores (if its
    /// process is known: a broker the bench started).
    broker_cores: Option<f64>,
}

/// Wall and CPU clocks at the start of a measurement.
struct Meter {
    start: Instant,
    tool: Duration,
    broker: Option<(u32, Duration)>,
}

impl Meter {
    fn start(broker_pid: Option<u32>) -> Meter {
        let broker = broker_pid.and_then(|pid| Some((pid, servers::cpu_time(&pid.to_string()).ok()?)));
        let tool = servers::cpu_time("self").unwrap_or_default();
        Meter { start: Instant::now(), tool, broker }
    }

    /// The elapsed wall time and the CPU used since the start.
    fn stop(&self) -> anyhow::Result<(Duration, Usage)> {
        let elapsed = self.start.elapsed();
        let wall = elapsed.as_secs_f64().max(1e-9);
        let tool = servers::cpu_time("self")?.saturating_sub(self.tool).as_secs_f64();
        let broker_cores = self.broker.and_then(|(pid, before)| {
            let after = servers::cpu_time(&pid.to_string()).ok()?;
            Some(after.saturating_sub(before).as_secs_f64() / wall)
        });
        Ok((elapsed, Usage { tool_share: tool / wall / cpus() as f64, broker_cores }))
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One row of the table: a workload at one size or rate.
#[derive(Debug, Clone, PartialEq)]
struct Figure {
    /// `publish`, `drain`, `latency_p50`, `latency_p99`, `fdatasync_p50`,
    /// `fdatasync_p99`.
    kind: &'static str,
    /// Payload or write size (publish, drain, fdatasync) or offered rate
    /// (latency).
    parameter: u64,
}

impl Figure {
    fn publish(size: usize) -> Figure {
        Figure { kind: "publish", parameter: size as u64 }
    }

    fn drain(size: usize) -> Figure {
        Figure { kind: "drain", parameter: size as u64 }
    }

    fn latency(rate: u64, quantile: &str) -> Figure {
        let kind = if quantile == "p50" { "latency_p50" } else { "latency_p99" };
        Figure { kind, parameter: rate }
    }

    fn is_latency(&self) -> bool {
        self.kind.starts_with("latency")
    }

    fn unit(&self) -> &'static str {
        if self.kind.ends_with("_p50") || self.kind.ends_with("_p99") { "ms" } else { "msg/s" }
    }

    fn label(&self) -> String {
        match self.kind {
            "publish" => format!("publish {} B", self.parameter),
            "drain" => format!("drain {} B", self.parameter),
            "fdatasync_p50" | "fdatasync_p99" => format!("fdatasync 4 KiB {}", &self.kind[10..]),
            _ => format!("delivery {} at {}/s", &self.kind[8..], self.parameter),
        }
    }
}

/// One measurement of one system in one round.
#[derive(Debug)]
struct Sample {
    figure: Figure,
    system: &'static str,
    value: f64,
    usage: Usage,
    detail: serde_json::Value,
}

/// Every round's samples, in the order they were taken.
#[derive(Debug, Default)]
struct Results {
    samples: Vec<Sample>,
}

/// The median of one figure of one system over the rounds.
#[derive(Debug, Clone, Copy)]
struct Median {
    value: f64,
    tool_share: f64,
    broker_cores: Option<f64>,
}

impl Results {
    fn add(&mut self, figure: Figure, system: &'static str, value: f64, usage: Usage, detail: serde_json::Value) {
        self.samples.push(Sample { figure, system, value, usage, detail });
    }

    /// The figures in first-measured order.
    fn figures(&self) -> Vec<Figure> {
        let mut figures: Vec<Figure> = Vec::new();
        for sample in &self.samples {
            if !figures.contains(&sample.figure) {
                figures.push(sample.figure.clone());
            }
        }
        figures
    }

    fn of<'a>(&'a self, figure: &'a Figure, system: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| &s.figure == figure && s.system == system)
    }

    fn median(&self, figure: &Figure, system: &str) -> Option<Median> {
        let samples: Vec<&Sample> = self.of(figure, system).collect();
        if samples.is_empty() {
            return None;
        }
        let broker: Vec<f64> = samples.iter().filter_map(|s| s.usage.broker_cores).collect();
        Some(Median {
            value: median(samples.iter().map(|s| s.value).collect()),
            tool_share: median(samples.iter().map(|s| s.usage.tool_share).collect()),
            broker_cores: (!broker.is_empty()).then(|| median(broker)),
        })
    }

    /// Ballast's (or its raw calls') median over the peer's: above 1,
    /// Ballast is faster (msg/s) or slower (ms).
    fn ratio(&self, figure: &Figure, ballast: &str, peer: &str) -> Option<f64> {
        let (b, p) = (self.median(figure, ballast)?, self.median(figure, peer)?);
        (p.value > 0.0).then(|| b.value / p.value)
    }

    /// A latency p99's median over the disk's `fdatasync` p99 (the floor
    /// of a durable publish; issue #18's target is within 2x).
    fn over_fdatasync(&self, figure: &Figure) -> Option<f64> {
        if figure.kind != "latency_p99" {
            return None;
        }
        let disk = self.median(&Figure { kind: "fdatasync_p99", parameter: 4096 }, "disk")?;
        let ballast = self.median(figure, "ballast")?;
        (disk.value > 0.0).then(|| ballast.value / disk.value)
    }

    /// The JSON of every figure: each system's rounds and medians, and the
    /// ratios Ballast / peer.
    fn summary(&self, systems: &[&str]) -> Vec<serde_json::Value> {
        let peers: Vec<&str> = systems.iter().copied().filter(|s| *s != "ballast").collect();
        self.figures()
            .iter()
            .map(|figure| {
                let mut by_system = serde_json::Map::new();
                for system in ["ballast_raw", "disk"].iter().chain(systems) {
                    let Some(m) = self.median(figure, system) else { continue };
                    let rounds: Vec<&Sample> = self.of(figure, system).collect();
                    by_system.insert(
                        (*system).to_owned(),
                        serde_json::json!({
                            "median": m.value,
                            "tool_cpu_share_median": m.tool_share,
                            "broker_cpu_cores_median": m.broker_cores,
                            "rounds": rounds.iter().map(|s| s.value).collect::<Vec<_>>(),
                            "tool_cpu_share": rounds.iter().map(|s| s.usage.tool_share).collect::<Vec<_>>(),
                            "broker_cpu_cores": rounds.iter().map(|s| s.usage.broker_cores).collect::<Vec<_>>(),
                            "details": rounds.iter().map(|s| s.detail.clone()).collect::<Vec<_>>(),
                        }),
                    );
                }
                let mut ratios = serde_json::Map::new();
                // Keyed `numerator/denominator`: `ballast/nats`,
                // `ballast_raw/nats`, ..., `ballast/ballast_raw`.
                let pairs = peers
                    .iter()
                    .flat_map(|peer| [("ballast", *peer), ("ballast_raw", *peer)])
                    .chain([("ballast", "ballast_raw")]);
                for (ballast, other) in pairs {
                    if let Some(r) = self.ratio(figure, ballast, other) {
                        ratios.insert(format!("{ballast}/{other}"), r.into());
                    }
                }
                if let Some(r) = self.over_fdatasync(figure) {
                    ratios.insert("ballast/fdatasync_p99".into(), r.into());
                }
                serde_json::json!({
                    "figure": figure.kind, "label": figure.label(), "unit": figure.unit(),
                    "size": (!figure.is_latency()).then_some(figure.parameter),
                    "rate": figure.is_latency().then_some(figure.parameter),
                    "systems": by_system, "ratios": ratios,
                })
            })
            .collect()
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

/// The medians side by side, each with the load tool's CPU share in
/// brackets, then the ratios Ballast / peer.
fn print_table(results: &Results, systems: &[&str]) {
    let peers: Vec<&str> = systems.iter().copied().filter(|s| *s != "ballast").collect();
    let disk = results.samples.iter().any(|s| s.system == "disk");
    let columns: Vec<&str> =
        ["ballast", "ballast_raw"].into_iter().chain(peers.iter().copied()).chain(disk.then_some("disk")).collect();
    println!("\nmedians; in brackets the load tool's CPU share of the machine ({} cores)", cpus());
    print!("{:<26}", "figure");
    for column in &columns {
        print!(" {:>20}", column);
    }
    for peer in &peers {
        print!(" {:>12}", format!("ballast/{peer}"));
    }
    println!();
    for figure in results.figures() {
        print!("{:<26}", figure.label());
        for column in &columns {
            let cell = results.median(&figure, column).map_or_else(
                || "-".to_owned(),
                |m| format!("{} [{:.0}%]", number(m.value, figure.unit()), m.tool_share * 100.0),
            );
            print!(" {cell:>20}");
        }
        for peer in &peers {
            let cell = results.ratio(&figure, "ballast", peer).map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"));
            print!(" {cell:>12}");
        }
        println!();
        if let Some(r) = results.ratio(&figure, "ballast", "ballast_raw") {
            println!("{:<26} client library / raw stubs: {:.0}%", "", r * 100.0);
        }
        if let Some(r) = results.over_fdatasync(&figure) {
            println!("{:<26} Ballast p99 / the disk's fdatasync p99: {r:.1}x", "");
        }
    }
    println!("ratios are Ballast (Producer, Consumer) / peer: above 1 is faster for msg/s, slower for ms");
}

fn number(value: f64, unit: &str) -> String {
    if unit == "ms" { format!("{value:.2} ms") } else { format!("{value:.0}/s") }
}

fn print_figure(system: &str, what: &str, rate: f64, usage: Usage) {
    let broker = usage.broker_cores.map_or_else(String::new, |c| format!(", broker {c:.2} cores"));
    println!("  {system:<10} {what}: {rate:.0} msg/s (tool CPU {:.0}%{broker})", usage.tool_share * 100.0);
}

fn ms(h: &hdrhistogram::Histogram<u64>, quantile: f64) -> f64 {
    h.value_at_quantile(quantile) as f64 / 1000.0
}

fn names(systems: &[System]) -> String {
    systems.iter().map(System::name).collect::<Vec<_>>().join(", ")
}
