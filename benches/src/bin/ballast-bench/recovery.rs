//! `recovery`: kill -9 under load. Several producers publish durably (with
//! idempotency keys, retrying a failed call with the same keys, as the
//! client library does) while a consumer consumes and acks; the bench
//! SIGKILLs the broker it started, restarts it on the same data directory
//! and port, and measures the time until it listens, answers a publish and
//! delivers again. After the last cycle the producers stop and the consumer
//! drains the queue. Every acknowledged publish must be delivered (lost = 0);
//! duplicates (redeliveries of acks lost in the crash) are counted apart from
//! messages stored twice (a dedupe failure), and every payload carries a
//! CRC that is checked on delivery.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::broker::Channel;
use ballast_proto::v1::{self as pb, consumer_client::ConsumerClient, publisher_client::PublisherClient};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{Sync, broker::Target, load};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Kill-and-restart cycles.
    #[arg(long, default_value_t = 3)]
    cycles: u32,
    /// Seconds of load before each kill (and after the last restart).
    #[arg(long, default_value_t = 3.0)]
    load_seconds: f64,
    /// Producer connections, each with one batch call in flight.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Messages per publish call.
    #[arg(long, default_value_t = 20)]
    batch: usize,
    /// Payload size in bytes (at least 24).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Credit of the consumer stream.
    #[arg(long, default_value_t = 500)]
    credit: u32,
    /// Longest wait for the queue to drain at the end, in seconds.
    #[arg(long, default_value_t = 120.0)]
    drain_max_seconds: f64,
    /// Longest wait for the broker to serve again after a restart, in seconds.
    #[arg(long, default_value_t = 30.0)]
    serve_max_seconds: f64,
}

/// Payload layout: producer u32, seq u64, crc32 u32 over the rest, filler.
const HEADER: usize = 16;

pub(crate) fn payload(producer: u32, seq: u64, size: usize) -> Bytes {
    let mut body = BytesMut::with_capacity(size);
    body.put_u32_le(producer);
    body.put_u64_le(seq);
    body.put_u32_le(0);
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(producer);
    while body.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        body.put_u8(x as u8);
    }
    let crc = crc32fast::hash(&body[HEADER..]) ^ crc32fast::hash(&body[..12]);
    body[12..16].copy_from_slice(&crc.to_le_bytes());
    body.freeze()
}

/// (producer, seq) of an intact payload, or None if it is corrupt.
pub(crate) fn check(payload: &[u8]) -> Option<(u32, u64)> {
    if payload.len() < HEADER {
        return None;
    }
    let crc = u32::from_le_bytes(payload[12..16].try_into().ok()?);
    if crc != crc32fast::hash(&payload[HEADER..]) ^ crc32fast::hash(&payload[..12]) {
        return None;
    }
    Some((u32::from_le_bytes(payload[..4].try_into().ok()?), u64::from_le_bytes(payload[4..12].try_into().ok()?)))
}

/// What each message went through, keyed by (producer, seq).
#[derive(Debug, Default)]
struct Ledger {
    acked: HashSet<(u32, u64)>,
    delivered: Delivered,
    rejected_acks: u64,
}

/// Where each checked payload was delivered from, keyed by its
/// (producer, seq).
#[derive(Debug, Default)]
pub(crate) struct Delivered {
    /// First (lane, offset) seen, deliveries, and whether a second
    /// (lane, offset) was seen (the key stored twice).
    pub(crate) by_key: HashMap<(u32, u64), (u32, u64, u32, bool)>,
    /// Deliveries whose payload failed its CRC.
    pub(crate) corrupt: u64,
}

impl Delivered {
    pub(crate) fn record(&mut self, delivery: &pb::Delivery) {
        let at = delivery.id.as_ref().map_or((u32::MAX, u64::MAX), |id| (id.lane, id.offset));
        match check(&delivery.payload) {
            None => self.corrupt += 1,
            Some(key) => {
                let entry = self.by_key.entry(key).or_insert((at.0, at.1, 0, false));
                entry.2 += 1;
                if (entry.0, entry.1) != at {
                    entry.3 = true;
                }
            }
        }
    }
}

/// The outage being measured: when the kill happened, and the first
/// successful publish and first delivery that started after it.
#[derive(Debug, Default)]
struct Outage {
    killed_at: Option<Instant>,
    first_publish: Option<Instant>,
    first_delivery: Option<Instant>,
}

#[derive(Debug, Default)]
struct Shared {
    ledger: Mutex<Ledger>,
    outage: Mutex<Outage>,
    acked_publishes: AtomicU64,
    deduped_retries: AtomicU64,
    deliveries: AtomicU64,
    errors: Mutex<HashMap<String, u64>>,
}

impl Shared {
    fn error(&self, kind: String) {
        *self.errors.lock().expect("errors lock").entry(kind).or_default() += 1;
    }
}

/// Errors a client sees while the broker is down or restarting.
pub(crate) fn outage_code(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
    )
}

pub async fn run(target: &mut Target, args: &Args, sync: Sync) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(target.started(), "recovery kills the broker: let the bench start it (no --addr)");
    anyhow::ensure!(args.size >= 24 && args.producers > 0 && args.batch > 0, "size >= 24, counts > 0");
    let queue = "bench-recovery";
    target.fresh_queue(queue, sync.settings()).await?;
    let shared = Arc::new(Shared::default());
    let stop_producers = Arc::new(AtomicBool::new(false));
    let stop_consumer = Arc::new(AtomicBool::new(false));

    let mut producers = Vec::new();
    for p in 0..args.producers {
        let channel = target.channel().await?;
        let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop_producers));
        let (batch, size) = (args.batch, args.size);
        producers.push(tokio::spawn(produce(channel, queue, u32::try_from(p)?, batch, size, shared, stop)));
    }
    let consumer = {
        let channel = target.channel().await?;
        let (shared, stop) = (Arc::clone(&shared), Arc::clone(&stop_consumer));
        tokio::spawn(consume(channel, queue, args.credit, shared, stop))
    };

    let load = Duration::from_secs_f64(args.load_seconds);
    let mut cycles = Vec::new();
    for cycle in 1..=args.cycles {
        tokio::time::sleep(load).await;
        let acked_before = shared.acked_publishes.load(Ordering::Relaxed);
        let killed_at = Instant::now();
        *shared.outage.lock().expect("outage lock") = Outage { killed_at: Some(killed_at), ..Outage::default() };
        tokio::task::block_in_place(|| target.kill_and_restart())?;
        let listening = killed_at.elapsed();
        let began = Instant::now();
        let (publish, delivery) = loop {
            let seen = {
                let outage = shared.outage.lock().expect("outage lock");
                outage.first_publish.zip(outage.first_delivery)
            };
            if let Some((p, d)) = seen {
                break (p.duration_since(killed_at), d.duration_since(killed_at));
            }
            anyhow::ensure!(
                began.elapsed().as_secs_f64() < args.serve_max_seconds,
                "cycle {cycle}: the broker did not serve again within {} s",
                args.serve_max_seconds
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        println!(
            "cycle {cycle}: {acked_before} publishes acknowledged so far; SIGKILL -> listening {:.3} s, first publish {:.3} s, first delivery {:.3} s",
            listening.as_secs_f64(),
            publish.as_secs_f64(),
            delivery.as_secs_f64()
        );
        cycles.push(serde_json::json!({
            "cycle": cycle, "acked_before_kill": acked_before,
            "listening_s": listening.as_secs_f64(), "first_publish_s": publish.as_secs_f64(),
            "first_delivery_s": delivery.as_secs_f64(),
        }));
    }
    tokio::time::sleep(load).await;
    stop_producers.store(true, Ordering::Relaxed);
    for producer in producers {
        producer.await?;
    }
    // Drain: until every acknowledged publish was delivered and the queue is
    // empty.
    let drain_start = Instant::now();
    let stats_channel = target.channel().await?;
    let mut drained = false;
    while drain_start.elapsed().as_secs_f64() < args.drain_max_seconds {
        let missing = {
            let ledger = shared.ledger.lock().expect("ledger lock");
            ledger.acked.iter().filter(|k| !ledger.delivered.by_key.contains_key(k)).count()
        };
        if missing == 0 && Target::stats_on(&stats_channel, queue).await?.saturation.unwrap_or_default().depth == 0 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_consumer.store(true, Ordering::Relaxed);
    consumer.await?;

    let ledger = shared.ledger.lock().expect("ledger lock");
    let acked = ledger.acked.len() as u64;
    let lost = ledger.acked.iter().filter(|k| !ledger.delivered.by_key.contains_key(k)).count() as u64;
    let delivered = ledger.delivered.by_key.len() as u64;
    let duplicates: u64 = ledger.delivered.by_key.values().map(|v| u64::from(v.2 - 1)).sum();
    let stored_twice = ledger.delivered.by_key.values().filter(|v| v.3).count() as u64;
    let unacked_delivered = ledger.delivered.by_key.keys().filter(|k| !ledger.acked.contains(k)).count() as u64;
    let errors = shared.errors.lock().expect("errors lock").clone();
    let unexpected: u64 = errors.iter().filter(|(k, _)| k.starts_with("unexpected")).map(|(_, v)| v).sum();
    println!(
        "recovery: {} cycles, {} producers x batch {}, {} B, sync {:?}",
        args.cycles, args.producers, args.batch, args.size, sync
    );
    println!(
        "acknowledged publishes {acked}; delivered {delivered} distinct ({} deliveries); lost {lost}; duplicates {duplicates} (stored twice {stored_twice}); delivered without an acknowledged publish {unacked_delivered}; corrupt payloads {}; retries answered as duplicates {}",
        shared.deliveries.load(Ordering::Relaxed),
        ledger.delivered.corrupt,
        shared.deduped_retries.load(Ordering::Relaxed)
    );
    let mut kinds: Vec<_> = errors.iter().collect();
    kinds.sort();
    for (kind, count) in &kinds {
        println!("  client errors: {count:>6} {kind}");
    }
    println!("  acks rejected after a restart: {}", ledger.rejected_acks);
    let column = |key: &str| -> Vec<f64> { cycles.iter().filter_map(|c| c[key].as_f64()).collect() };
    for key in ["listening_s", "first_publish_s", "first_delivery_s"] {
        let v = column(key);
        if !v.is_empty() {
            let max = v.iter().copied().fold(0.0, f64::max);
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            println!("  SIGKILL -> {:<16} mean {:.3} s, max {:.3} s", key.trim_end_matches("_s"), mean, max);
        }
    }
    let failures =
        broken_promises(lost, ledger.delivered.corrupt, stored_twice, unexpected, drained, args.drain_max_seconds);
    Ok(serde_json::json!({
        "scenario": "recovery", "cycles": args.cycles, "load_seconds": args.load_seconds,
        "producers": args.producers, "batch": args.batch, "size": args.size,
        "sync": format!("{sync:?}").to_lowercase(),
        "restarts": cycles,
        "acked_publishes": acked, "delivered_distinct": delivered,
        "deliveries": shared.deliveries.load(Ordering::Relaxed),
        "lost": lost, "duplicates": duplicates, "stored_twice": stored_twice,
        "delivered_unacked_publish": unacked_delivered, "corrupt": ledger.delivered.corrupt,
        "retries_answered_duplicate": shared.deduped_retries.load(Ordering::Relaxed),
        "rejected_acks": ledger.rejected_acks,
        "client_errors": errors, "unexpected_errors": unexpected,
        "drained": drained,
        "failures": failures,
    }))
}

/// What a kill test found broken: acknowledged publishes not delivered,
/// corrupt payloads, idempotency keys stored twice, unexpected client
/// errors, a queue that did not drain.
pub(crate) fn broken_promises(
    lost: u64,
    corrupt: u64,
    stored_twice: u64,
    unexpected: u64,
    drained: bool,
    drain_max_seconds: f64,
) -> Vec<String> {
    let mut failures = Vec::new();
    if lost > 0 {
        failures.push(format!("{lost} acknowledged publishes were not delivered"));
    }
    if corrupt > 0 {
        failures.push(format!("{corrupt} corrupt payloads delivered"));
    }
    if stored_twice > 0 {
        failures.push(format!("{stored_twice} idempotency keys stored twice"));
    }
    if unexpected > 0 {
        failures.push(format!("{unexpected} unexpected errors"));
    }
    if !drained {
        failures.push(format!("the queue did not drain within {drain_max_seconds} s"));
    }
    failures
}

/// One producer: batches of `batch` messages with idempotency keys, one
/// call in flight; a failed call is retried with the same keys until it
/// succeeds (so stopping waits for the current batch).
async fn produce(
    channel: Channel,
    queue: &'static str,
    producer: u32,
    batch: usize,
    size: usize,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) {
    let mut client = PublisherClient::new(channel);
    let mut next = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let seqs = next..next + batch as u64;
        next += batch as u64;
        let messages: Vec<pb::Message> = seqs
            .clone()
            .map(|seq| pb::Message {
                payload: payload(producer, seq, size),
                idempotency_key: format!("p{producer}-{seq}"),
                ..Default::default()
            })
            .collect();
        loop {
            let started = Instant::now();
            let mut request =
                tonic::Request::new(pb::PublishBatchRequest { queue: queue.into(), messages: messages.clone() });
            request.set_timeout(Duration::from_secs(10));
            match client.publish_batch(request).await {
                Ok(response) => {
                    let receipts = response.into_inner().receipts;
                    let deduped = receipts.iter().filter(|r| r.duplicate).count() as u64;
                    shared.deduped_retries.fetch_add(deduped, Ordering::Relaxed);
                    {
                        let mut ledger = shared.ledger.lock().expect("ledger lock");
                        for seq in seqs.clone() {
                            ledger.acked.insert((producer, seq));
                        }
                    }
                    shared.acked_publishes.fetch_add(batch as u64, Ordering::Relaxed);
                    let mut outage = shared.outage.lock().expect("outage lock");
                    if outage.first_publish.is_none() && outage.killed_at.is_some_and(|k| started > k) {
                        outage.first_publish = Some(Instant::now());
                    }
                    break;
                }
                Err(status) => {
                    let kind = if outage_code(status.code()) { "during restart" } else { "unexpected" };
                    shared.error(format!("{kind}: publish {:?}", status.code()));
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
    }
}

/// The consumer: reconnects after a broken stream; checks every payload;
/// acks and grants credit back as it goes.
async fn consume(channel: Channel, queue: &'static str, credit: u32, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let subscribed_at = Instant::now();
        if let Err(status) = session(&channel, queue, credit, &shared, &stop, subscribed_at).await {
            let kind = if outage_code(status.code()) { "during restart" } else { "unexpected" };
            shared.error(format!("{kind}: consume {:?}", status.code()));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

async fn session(
    channel: &Channel,
    queue: &str,
    credit: u32,
    shared: &Shared,
    stop: &AtomicBool,
    subscribed_at: Instant,
) -> Result<(), tonic::Status> {
    let mut client = ConsumerClient::new(channel.clone());
    let (tx, rx) = mpsc::channel(64);
    let subscribe = pb::Subscribe { queue: queue.into(), credit };
    let send = |tx: &mpsc::Sender<pb::ConsumeRequest>, kind| {
        tx.try_send(pb::ConsumeRequest { kind: Some(kind) }).map_err(|_| tonic::Status::unavailable("request queue"))
    };
    send(&tx, pb::consume_request::Kind::Subscribe(subscribe))?;
    let mut stream = client.consume(ReceiverStream::new(rx)).await?.into_inner();
    let mut to_ack = Vec::new();
    let chunk = (credit as usize / 4).max(1);
    while !stop.load(Ordering::Relaxed) {
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
                {
                    let mut outage = shared.outage.lock().expect("outage lock");
                    if outage.first_delivery.is_none() && outage.killed_at.is_some_and(|k| subscribed_at > k) {
                        outage.first_delivery = Some(Instant::now());
                    }
                }
                to_ack.push(d.delivery_id);
                if to_ack.len() >= chunk {
                    flush(&tx, &mut to_ack).await?;
                }
            }
            Some(pb::consume_response::Kind::Rejected(_)) => {
                shared.ledger.lock().expect("ledger lock").rejected_acks += 1;
            }
            // It never extends leases, so no `extended` answer comes.
            Some(pb::consume_response::Kind::Subscribed(_) | pb::consume_response::Kind::Extended(_)) => {}
            None => return Err(tonic::Status::unavailable("the consume stream ended")),
        }
    }
    flush(&tx, &mut to_ack).await?;
    Ok(())
}

/// [`load::flush`], its failure as the broken stream it means.
pub(crate) async fn flush(tx: &mpsc::Sender<pb::ConsumeRequest>, to_ack: &mut Vec<u64>) -> Result<(), tonic::Status> {
    load::flush(tx, to_ack).await.map_err(|_| tonic::Status::unavailable("the consume stream closed"))
}
