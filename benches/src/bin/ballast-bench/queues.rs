//! `queues`: what a queue costs when a node holds many (issue #12). Creates
//! `--queues` queues (default 10,000, each with its dead-letter queue) and
//! reports the create rate, the data directory's disk use, the broker's
//! RSS, OS threads and open files; SIGKILLs and restarts the broker and
//! measures the time from spawn to gRPC health SERVING and to every queue
//! open (queues open in the background), and the same figures again, idle
//! once every queue is open; then runs a steady open-loop
//! publish/consume load spread over `--sample` queues taken evenly across
//! all of them, alone and while one other queue is flooded (nobody consumes
//! it), and reports publish-to-durable and publish-to-delivery p50/p99 and
//! the isolation ratio (p99 during / alone).
//!
//! Needs a broker the bench starts (no `--addr`): it reads the process's
//! /proc entries and restarts it. The broker's `queues_max` must hold
//! twice `--queues` (dead-letter queues count).

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::broker::Channel;
use ballast_proto::v1::{
    self as pb, admin_client::AdminClient, consumer_client::ConsumerClient, publisher_client::PublisherClient,
};
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{Sync, broker::Target, load};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Queues to create, each with its dead-letter queue.
    #[arg(long, default_value_t = 10_000)]
    queues: usize,
    /// Create calls in flight at once.
    #[arg(long, default_value_t = 16)]
    create_concurrency: usize,
    /// Queues the steady load is spread over, taken evenly across all.
    #[arg(long, default_value_t = 100)]
    sample: usize,
    /// Steady publish rate over the sampled queues together, messages per
    /// second (one message per call).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Seconds of steady load per phase (alone, then during the flood).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Payload size in bytes (at least 16).
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Flood producer tasks (each one batch call in flight, unpaced).
    #[arg(long, default_value_t = 4)]
    flood_producers: usize,
    /// Messages per flood call.
    #[arg(long, default_value_t = 100)]
    flood_batch: usize,
    /// Longest wait for the restarted broker to report SERVING, in seconds.
    #[arg(long, default_value_t = 300.0)]
    serve_max_seconds: f64,
}

/// Name of the `index`th queue.
fn queue_name(index: usize) -> String {
    format!("bench-q{index:05}")
}

pub async fn run(target: &mut Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(target.started(), "queues reads the broker's /proc entries and restarts it: no --addr");
    anyhow::ensure!(args.queues >= 2 && args.sample >= 1, "queues >= 2 and sample >= 1");
    anyhow::ensure!(args.size >= 16 && args.rate > 0 && args.create_concurrency > 0, "size >= 16, rates > 0");
    let settings = pb::QueueSettings { dead_letter: Some(true), ..sync.settings() };

    // 1. Create.
    let channel = target.channel().await?;
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut creators = Vec::new();
    for _ in 0..args.create_concurrency.min(args.queues) {
        let (next, mut admin, settings, total) =
            (Arc::clone(&next), AdminClient::new(channel.clone()), settings.clone(), args.queues as u64);
        creators.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let request =
                    pb::CreateQueueRequest { name: queue_name(index as usize), settings: Some(settings.clone()) };
                admin.create_queue(request).await.map_err(|s| anyhow::anyhow!("creating queue {index}: {s}"))?;
            }
        }));
    }
    for creator in creators {
        creator.await??;
    }
    let create_seconds = started.elapsed().as_secs_f64();
    let create_rate = args.queues as f64 / create_seconds;
    let data = target.data_root().expect("the bench started the broker").to_owned();
    let created = Figures::take(target, &data)?;
    println!(
        "queues: created {} queues (+ dead-letter queues) in {create_seconds:.1} s ({create_rate:.0}/s)",
        args.queues
    );
    created.print("after creation");

    // 2. Restart: spawn to health SERVING.
    let listening = target.kill_and_restart()?;
    let serving = wait_serving(target, Duration::from_secs_f64(args.serve_max_seconds)).await?;
    let restart_seconds = (listening + serving).as_secs_f64();
    println!("queues: restart (SIGKILL, spawn to health SERVING) {restart_seconds:.2} s");
    // The broker serves before every queue is open (they open in the
    // background): the idle figures are taken once ListQueues shows none
    // still opening.
    let all_open = wait_all_open(target, Duration::from_secs_f64(args.serve_max_seconds)).await?;
    let all_open_seconds = restart_seconds + all_open.as_secs_f64();
    println!("queues: restart, spawn to every queue open {all_open_seconds:.2} s");
    let restarted = Figures::take(target, &data)?;
    restarted.print("idle after restart");

    // 3. Steady load over sampled queues, alone then during a flood.
    let channel = target.channel().await?;
    let sampled: Vec<String> =
        (0..args.sample.min(args.queues - 1)).map(|i| queue_name(1 + i * (args.queues - 1) / args.sample)).collect();
    let flooded = queue_name(0);
    let alone = steady(&channel, &sampled, args).await?;
    let flood = Flood::start(target, &flooded, args).await?;
    let during = steady(&channel, &sampled, args).await?;
    let flood_stored = flood.stop().await?;
    let flooded_figures = Figures::take(target, &data)?;
    load::print_percentile_header();
    load::print_percentiles("alone: durable", &alone.durable);
    load::print_percentiles("alone: delivered", &alone.delivered);
    load::print_percentiles("during: durable", &during.durable);
    load::print_percentiles("during: delivered", &during.delivered);
    let ratio = |a: &Histogram<u64>, b: &Histogram<u64>| {
        b.value_at_quantile(0.99) as f64 / a.value_at_quantile(0.99).max(1) as f64
    };
    let durable_ratio = ratio(&alone.durable, &during.durable);
    let delivery_ratio = ratio(&alone.delivered, &during.delivered);
    println!(
        "queues: steady load over {} of {} queues at {} msg/s; flood stored {flood_stored} messages; p99 during / alone: durable {durable_ratio:.2}x, delivery {delivery_ratio:.2}x",
        sampled.len(),
        args.queues,
        args.rate
    );
    Ok(serde_json::json!({
        "scenario": "queues", "queues": args.queues, "dead_letter_queues": args.queues,
        "sync": format!("{sync:?}").to_lowercase(), "size": args.size,
        "create_seconds": create_seconds, "create_per_s": create_rate,
        "after_create": created.json(), "restart_to_serving_seconds": restart_seconds,
        "restart_to_listening_seconds": listening.as_secs_f64(), "restart_to_all_open_seconds": all_open_seconds,
        "after_restart": restarted.json(),
        "after_flood": flooded_figures.json(),
        "sampled_queues": sampled.len(), "steady_rate": args.rate, "seconds": args.seconds,
        "alone": alone.json(), "during": during.json(), "flood_stored": flood_stored,
        "p99_ratio_publish_to_durable": durable_ratio, "p99_ratio_publish_to_delivery": delivery_ratio,
    }))
}

/// What the broker process holds at one moment.
#[derive(Debug)]
struct Figures {
    disk_bytes: u64,
    rss_bytes: u64,
    rss_anon_bytes: u64,
    threads: u64,
    open_files: u64,
}

impl Figures {
    fn take(target: &Target, data: &Path) -> anyhow::Result<Figures> {
        let pid = target.pid().expect("the bench started the broker");
        Ok(Figures {
            disk_bytes: disk_use(data)?,
            rss_bytes: crate::broker::proc_status_bytes(pid, "VmRSS")?,
            rss_anon_bytes: crate::broker::rss_anon(pid)?,
            threads: std::fs::read_dir(format!("/proc/{pid}/task"))?.count() as u64,
            open_files: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64,
        })
    }

    fn print(&self, when: &str) {
        println!(
            "queues: {when}: disk {:.1} MiB, RSS {:.1} MiB (anon {:.1} MiB), {} threads, {} open files",
            self.disk_bytes as f64 / 1048576.0,
            self.rss_bytes as f64 / 1048576.0,
            self.rss_anon_bytes as f64 / 1048576.0,
            self.threads,
            self.open_files
        );
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "disk_bytes": self.disk_bytes, "rss_bytes": self.rss_bytes, "rss_anon_bytes": self.rss_anon_bytes,
            "threads": self.threads, "open_files": self.open_files,
        })
    }
}

/// Bytes allocated on disk under `dir` (as `du` counts them: blocks, not
/// lengths, so preallocated and sparse files count what they hold).
fn disk_use(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // A queue directory being removed meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        for entry in entries {
            let Ok(entry) = entry else { continue };
            let Ok(metadata) = entry.metadata() else { continue };
            total += metadata.blocks() * 512;
            if metadata.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// Polls the broker's overall health until SERVING; returns how long.
async fn wait_serving(target: &Target, max: Duration) -> anyhow::Result<Duration> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let started = Instant::now();
    loop {
        if let Ok(channel) = target.channel().await {
            let mut health = HealthClient::new(channel);
            let request = HealthCheckRequest { service: String::new() };
            if let Ok(response) = health.check(request).await
                && response.into_inner().status == tonic_health::ServingStatus::Serving as i32
            {
                return Ok(started.elapsed());
            }
        }
        anyhow::ensure!(started.elapsed() < max, "the broker did not report SERVING within {max:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls ListQueues until no queue is still opening; returns how long.
async fn wait_all_open(target: &Target, max: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut admin = AdminClient::new(target.channel().await?);
    loop {
        let queues = admin.list_queues(pb::ListQueuesRequest {}).await?.into_inner().queues;
        if queues.iter().all(|q| !q.opening) {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(started.elapsed() < max, "queues were still opening after {max:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Latencies of one steady phase, in microseconds.
struct Measured {
    durable: Histogram<u64>,
    delivered: Histogram<u64>,
    sent: u64,
    received: u64,
    errors: u64,
}

impl Measured {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "publish_to_durable": load::percentiles(&self.durable),
            "publish_to_delivery": load::percentiles(&self.delivered),
            "sent": self.sent, "received": self.received, "errors": self.errors,
        })
    }
}

/// Open-loop publishes at `args.rate` over `queues` in turn for
/// `args.seconds`, one consumer stream per queue acking everything; waits
/// (5 s at most) for the deliveries of what was sent.
async fn steady(channel: &Channel, queues: &[String], args: &Args) -> anyhow::Result<Measured> {
    let start = Instant::now();
    // Marks this phase's messages: a redelivery of an earlier phase's
    // message (its ack lost when that phase's streams closed) is acked but
    // not counted.
    let phase = fastrand::u64(..);
    let delivered = Arc::new(Mutex::new(load::histogram()));
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for queue in queues {
        let (channel, queue, delivered, received, stop) =
            (channel.clone(), queue.clone(), Arc::clone(&delivered), Arc::clone(&received), Arc::clone(&stop));
        consumers.push(tokio::spawn(async move {
            let mut client = ConsumerClient::new(channel);
            let (tx, rx) = mpsc::channel(64);
            let credit = 64;
            let subscribe = pb::Subscribe { queue, credit };
            tx.send(pb::ConsumeRequest { kind: Some(pb::consume_request::Kind::Subscribe(subscribe)) }).await?;
            let mut stream = client.consume(ReceiverStream::new(rx)).await?.into_inner();
            let mut to_ack = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let Ok(message) = tokio::time::timeout(Duration::from_millis(20), stream.message()).await else {
                    load::flush(&tx, &mut to_ack).await?;
                    continue;
                };
                match message?.and_then(|m| m.kind) {
                    Some(pb::consume_response::Kind::Delivery(d)) => {
                        let payload = d.payload.clone();
                        if payload.len() >= 16 && payload[8..16] == phase.to_le_bytes() {
                            let sent = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
                            let latency = load::nanos_since(start).saturating_sub(sent) / 1000;
                            let _ = delivered.lock().expect("histogram lock").record(latency.max(1));
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        to_ack.push(d.delivery_id);
                        if to_ack.len() >= 16 {
                            load::flush(&tx, &mut to_ack).await?;
                        }
                    }
                    Some(pb::consume_response::Kind::Rejected(r)) => anyhow::bail!("ack rejected: {}", r.message),
                    // It never extends leases, so no `extended` answer comes.
                    Some(pb::consume_response::Kind::Subscribed(_) | pb::consume_response::Kind::Extended(_)) => {}
                    None => anyhow::bail!("the consume stream ended"),
                }
            }
            load::flush(&tx, &mut to_ack).await?;
            Ok::<_, anyhow::Error>(())
        }));
    }
    let count = (args.rate as f64 * args.seconds) as u64;
    let interval_ns = 1_000_000_000 / args.rate;
    let durable = Arc::new(Mutex::new(load::histogram()));
    let errors = Arc::new(AtomicU64::new(0));
    let runtime = tokio::runtime::Handle::current();
    let publisher = PublisherClient::new(channel.clone());
    let (queues_owned, size) = (queues.to_vec(), args.size);
    let (durable_in, errors_in) = (Arc::clone(&durable), Arc::clone(&errors));
    let generator = load::open_loop(count, Instant::now(), interval_ns, move |seq, intended| {
        let mut publisher = publisher.clone();
        let queue = queues_owned[seq as usize % queues_owned.len()].clone();
        let (durable, errors) = (Arc::clone(&durable_in), Arc::clone(&errors_in));
        Ok(runtime.spawn(async move {
            let mut payload = BytesMut::with_capacity(size);
            payload.put_u64_le(load::nanos_since(start));
            payload.put_u64_le(phase);
            payload.resize(size, b's');
            let message = pb::Message { payload: Bytes::from(payload), ..Default::default() };
            match publisher.publish(pb::PublishRequest { queue, message: Some(message) }).await {
                Ok(_) => {
                    let latency = intended.elapsed().as_micros() as u64;
                    let _ = durable.lock().expect("histogram lock").record(latency.max(1));
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }))
    });
    for call in load::join_open_loop(generator).await? {
        call.await?;
    }
    let sent = durable.lock().expect("histogram lock").len();
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for consumer in consumers {
        consumer.await??;
    }
    let durable = std::mem::replace(&mut *durable.lock().expect("histogram lock"), load::histogram());
    let delivered = std::mem::replace(&mut *delivered.lock().expect("histogram lock"), load::histogram());
    Ok(Measured {
        durable,
        delivered,
        sent,
        received: received.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
    })
}

/// One queue flooded by unpaced batch publishes that nobody consumes.
struct Flood {
    stop: Arc<AtomicBool>,
    stored: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Flood {
    async fn start(target: &Target, queue: &str, args: &Args) -> anyhow::Result<Flood> {
        let flood = Flood { stop: Arc::default(), stored: Arc::default(), tasks: Vec::new() };
        let mut flood = flood;
        for _ in 0..args.flood_producers {
            let mut client = PublisherClient::new(target.channel().await?);
            let (stop, stored, queue) = (Arc::clone(&flood.stop), Arc::clone(&flood.stored), queue.to_owned());
            let (batch, payload) = (args.flood_batch, Bytes::from(vec![b'f'; args.size]));
            flood.tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let messages =
                        (0..batch).map(|_| pb::Message { payload: payload.clone(), ..Default::default() }).collect();
                    let request = pb::PublishBatchRequest { queue: queue.clone(), messages };
                    match client.publish_batch(request).await {
                        Ok(_) => {
                            stored.fetch_add(batch as u64, Ordering::Relaxed);
                        }
                        // Refused at its limit: back off a little, as a
                        // client honouring retry-after would.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            }));
        }
        Ok(flood)
    }

    /// Stops the flood; returns the messages it stored.
    async fn stop(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await?;
        }
        Ok(self.stored.load(Ordering::Relaxed))
    }
}
