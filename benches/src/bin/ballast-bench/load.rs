//! Shared pieces of the scenarios: producers, consumers, histograms.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::broker::Channel;
use ballast_proto::v1::{self as pb, consumer_client::ConsumerClient, publisher_client::PublisherClient};
use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Runs `send(seq, intended)` for each `seq` in `0..count` at its intended
/// time `start + seq * interval_ns`, on an OS thread paced by the kernel's
/// high-resolution sleep, and returns what the calls returned (typically
/// the handles of the tasks they spawned). Open-loop generators use it
/// rather than tokio's timer, whose 1 ms granularity would make the
/// generator itself late by milliseconds, and that lateness would count in
/// every latency measured from intended times. A send that blocks (no
/// permit free) delays the ones after it; their latencies show it.
pub fn open_loop<T: Send + 'static>(
    count: u64,
    start: Instant,
    interval_ns: u64,
    mut send: impl FnMut(u64, Instant) -> anyhow::Result<T> + Send + 'static,
) -> std::thread::JoinHandle<anyhow::Result<Vec<T>>> {
    std::thread::Builder::new()
        .name("open-loop".into())
        .spawn(move || {
            let mut sent = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
            for seq in 0..count {
                let at = start + Duration::from_nanos(seq * interval_ns);
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                sent.push(send(seq, at)?);
            }
            Ok(sent)
        })
        .expect("spawning the generator thread")
}

/// Waits for an [`open_loop`] generator without blocking the runtime.
pub async fn join_open_loop<T: Send + 'static>(
    generator: std::thread::JoinHandle<anyhow::Result<Vec<T>>>,
) -> anyhow::Result<Vec<T>> {
    tokio::task::spawn_blocking(move || generator.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the open-loop generator panicked"))?
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// p50/p90/p99/p999/max in milliseconds.
pub fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |us: u64| us as f64 / 1000.0;
    serde_json::json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

pub fn print_percentiles(label: &str, h: &Histogram<u64>) {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{label:<24} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
        h.len(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0
    );
}

pub fn print_percentile_header() {
    println!("{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}", "latency (ms)", "count", "p50", "p90", "p99", "p999", "max");
}

/// Publishes `total` messages of `size` bytes with `producers` connections,
/// each keeping `inflight` calls of `batch` messages going. Returns the
/// elapsed time and the per-call latency histogram (microseconds).
pub async fn publish_all(
    channels: &[Channel],
    queue: &str,
    total: u64,
    size: usize,
    batch: usize,
    inflight: usize,
    keys: bool,
) -> anyhow::Result<(Duration, Histogram<u64>)> {
    let payload = Bytes::from(vec![b'x'; size]);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for channel in channels {
        for _ in 0..inflight {
            let mut client = PublisherClient::new(channel.clone());
            let next = Arc::clone(&next);
            let payload = payload.clone();
            let queue = queue.to_owned();
            tasks.push(tokio::spawn(async move {
                let mut h = histogram();
                loop {
                    let first = next.fetch_add(batch as u64, Ordering::Relaxed);
                    if first >= total {
                        return Ok::<_, anyhow::Error>(h);
                    }
                    let n = (total - first).min(batch as u64) as usize;
                    let call = Instant::now();
                    let key = |i: u64| {
                        if keys { format!("{:032x}", u128::from(first + i) << 64 | 0xba11a57) } else { String::new() }
                    };
                    if n == 1 {
                        let message =
                            pb::Message { payload: payload.clone(), idempotency_key: key(0), ..Default::default() };
                        client.publish(pb::PublishRequest { queue: queue.clone(), message: Some(message) }).await?;
                    } else {
                        let messages = (0..n as u64)
                            .map(|i| pb::Message {
                                payload: payload.clone(),
                                idempotency_key: key(i),
                                ..Default::default()
                            })
                            .collect();
                        client.publish_batch(pb::PublishBatchRequest { queue: queue.clone(), messages }).await?;
                    }
                    h.record(call.elapsed().as_micros().max(1) as u64)?;
                }
            }));
        }
    }
    let mut all = histogram();
    for task in tasks {
        all.add(task.await??)?;
    }
    Ok((start.elapsed(), all))
}

/// Consumes and acks until `total` messages were received across
/// `consumers` streams of `credit`; calls `on_delivery` for each.
pub async fn consume(
    channels: &[Channel],
    queue: &str,
    consumers: usize,
    credit: u32,
    total: u64,
    on_delivery: Arc<dyn Fn(&pb::Delivery) + Send + Sync>,
) -> anyhow::Result<Duration> {
    let received = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..consumers {
        let channel = channels[i % channels.len()].clone();
        let queue = queue.to_owned();
        let received = Arc::clone(&received);
        let on_delivery = Arc::clone(&on_delivery);
        tasks.push(tokio::spawn(async move {
            let mut client = ConsumerClient::new(channel);
            let (tx, rx) = mpsc::channel(64);
            let subscribe = pb::Subscribe { queue, credit };
            tx.send(pb::ConsumeRequest { kind: Some(pb::consume_request::Kind::Subscribe(subscribe)) }).await?;
            let mut stream = client.consume(ReceiverStream::new(rx)).await?.into_inner();
            let mut to_ack = Vec::new();
            let chunk = (credit as usize / 4).max(1);
            while received.load(Ordering::Relaxed) < total {
                let next = tokio::time::timeout(Duration::from_millis(100), stream.message()).await;
                let Ok(message) = next else {
                    flush(&tx, &mut to_ack).await?;
                    continue;
                };
                match message?.and_then(|m| m.kind) {
                    Some(pb::consume_response::Kind::Delivery(d)) => {
                        on_delivery(&d);
                        to_ack.push(d.delivery_id);
                        received.fetch_add(1, Ordering::Relaxed);
                        if to_ack.len() >= chunk {
                            flush(&tx, &mut to_ack).await?;
                        }
                    }
                    Some(pb::consume_response::Kind::Rejected(r)) => anyhow::bail!("ack rejected: {}", r.message),
                    // It never extends leases, so no `extended` answer comes.
                    Some(pb::consume_response::Kind::Subscribed(_) | pb::consume_response::Kind::Extended(_)) => {}
                    None => anyhow::bail!("the consume stream ended"),
                }
            }
            flush(&tx, &mut to_ack).await?;
            Ok::<_, anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(start.elapsed())
}

/// Acks what is pending and grants the same credit back.
pub async fn flush(tx: &mpsc::Sender<pb::ConsumeRequest>, to_ack: &mut Vec<u64>) -> anyhow::Result<()> {
    if to_ack.is_empty() {
        return Ok(());
    }
    let n = u32::try_from(to_ack.len())?;
    let delivery_ids = std::mem::take(to_ack);
    tx.send(pb::ConsumeRequest { kind: Some(pb::consume_request::Kind::Ack(pb::Ack { delivery_ids })) }).await?;
    tx.send(pb::ConsumeRequest { kind: Some(pb::consume_request::Kind::Credit(pb::Credit { credit: n })) }).await?;
    Ok(())
}

/// `during`'s p99 over `alone`'s: how much worse the tail got.
pub fn p99_ratio(alone: &Histogram<u64>, during: &Histogram<u64>) -> f64 {
    during.value_at_quantile(0.99) as f64 / alone.value_at_quantile(0.99).max(1) as f64
}

pub fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

/// What a paced consumer calls for each delivery.
pub type OnDelivery = Arc<dyn Fn(&pb::Delivery) + Send + Sync>;

/// A consumer with a steady capacity: it holds `credit` deliveries at most,
/// "processes" them at `rate` per second (0: as fast as they come), and acks
/// each one and grants its credit back once processed. `on_receive` runs
/// when a delivery arrives on the stream, `on_process` when the consumer
/// takes it from its prefetch buffer. Stops (acking what it processed and
/// releasing the rest) once `stop` is set.
pub async fn consume_paced(
    channel: Channel,
    queue: String,
    rate: f64,
    credit: u32,
    stop: Arc<std::sync::atomic::AtomicBool>,
    on_receive: OnDelivery,
    on_process: OnDelivery,
) -> anyhow::Result<()> {
    let mut client = ConsumerClient::new(channel);
    let (tx, rx) = mpsc::channel(256);
    let subscribe = pb::Subscribe { queue, credit };
    tx.send(pb::ConsumeRequest { kind: Some(pb::consume_request::Kind::Subscribe(subscribe)) }).await?;
    let mut stream = client.consume(ReceiverStream::new(rx)).await?.into_inner();
    let mut buffer = std::collections::VecDeque::new();
    let mut to_ack = Vec::new();
    let chunk = (credit as usize / 4).max(1);
    // Token bucket: a consumer that was idle may catch up by 20 ms at most.
    let cap = (rate * 0.02).max(1.0);
    let mut tokens = 0.0f64;
    let mut last = Instant::now();
    let mut last_flush = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            message = stream.message() => match message?.and_then(|m| m.kind) {
                Some(pb::consume_response::Kind::Delivery(d)) => {
                    on_receive(&d);
                    buffer.push_back(d);
                }
                Some(pb::consume_response::Kind::Rejected(r)) => anyhow::bail!("ack rejected: {}", r.message),
                // It never extends leases, so no `extended` answer comes.
                Some(pb::consume_response::Kind::Subscribed(_) | pb::consume_response::Kind::Extended(_)) => {}
                None => anyhow::bail!("the consume stream ended"),
            },
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let n = if rate > 0.0 {
            tokens = (tokens + rate * now.duration_since(last).as_secs_f64()).min(cap);
            (tokens as usize).min(buffer.len())
        } else {
            buffer.len()
        };
        last = now;
        tokens -= n as f64;
        for d in buffer.drain(..n) {
            on_process(&d);
            to_ack.push(d.delivery_id);
        }
        if to_ack.len() >= chunk || (!to_ack.is_empty() && last_flush.elapsed() >= Duration::from_millis(2)) {
            flush(&tx, &mut to_ack).await?;
            last_flush = Instant::now();
        }
    }
    flush(&tx, &mut to_ack).await?;
    Ok(())
}

/// Nanoseconds since `start` (payload time stamps).
pub fn nanos_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
