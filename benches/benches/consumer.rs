//! Criterion benchmark of the client's per-delivery cost on a drain.
//!
//! - `drain/raw_stream`: a raw `Consume` stream through the generated stubs,
//!   acking and granting the same credit back every quarter of the window.
//! - `drain/consumer`: `ballast_client::Consumer` with a handler that does
//!   nothing (`concurrency` = prefetch, as `ballast-bench compare` runs it).
//!
//! Both drain a queue of 10,000 x 1 KiB with prefetch 1,000 from a broker in
//! this process (`ballast_broker::server::serve` on loopback, its data on
//! /dev/shm when it exists, sync policy `none`); each iteration fills the
//! queue anew (not timed) and times the drain alone. Per delivery. The
//! broker's own work is in both, so `consumer` minus `raw_stream` is what
//! the `Consumer` adds per delivery.
//!
//! Run: `cargo bench -p ballast-benches --bench consumer`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ballast_client::{Client, ConsumerConfig, Delivery};
use ballast_proto::v1::{
    self as pb, admin_client::AdminClient, consumer_client::ConsumerClient, publisher_client::PublisherClient,
};
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tempfile::TempDir;
use tokio_stream::wrappers::ReceiverStream;

const QUEUE: &str = "bench-consumer";
const MESSAGES: u64 = 10_000;
const SIZE: usize = 1024;
const PREFETCH: u32 = 1000;
const BATCH: usize = 100;

/// A broker served in this process until the runtime ends.
struct Server {
    addr: SocketAddr,
    _dir: TempDir,
}

fn bench_root() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() { shm } else { std::env::temp_dir() }
}

async fn start() -> Server {
    let dir = tempfile::tempdir_in(bench_root()).expect("temp dir");
    let config = ballast_broker::Config {
        data_dir: dir.path().join("data"),
        // tmpfs is small; the bench stores 10 MiB at a time.
        disk_free_min_bytes: 0,
        ..ballast_broker::Config::default()
    };
    let broker = ballast_broker::Broker::open(config).expect("broker opens");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("loopback port");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(ballast_broker::server::serve(broker, listener, None, std::future::pending()));
    Server { addr, _dir: dir }
}

async fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("valid URI")
        .connect()
        .await
        .expect("connects")
}

/// Re-creates the queue and stores `MESSAGES` in it.
async fn fill(addr: SocketAddr) {
    let channel = channel(addr).await;
    let mut admin = AdminClient::new(channel.clone());
    let _ = admin.delete_queue(pb::DeleteQueueRequest { name: QUEUE.into() }).await;
    let settings =
        pb::QueueSettings { sync_policy: pb::SyncPolicy::None.into(), dead_letter: Some(false), ..Default::default() };
    admin
        .create_queue(pb::CreateQueueRequest { name: QUEUE.into(), settings: Some(settings) })
        .await
        .expect("queue created");
    let mut publisher = PublisherClient::new(channel);
    let payload = Bytes::from(vec![b'x'; SIZE]);
    for _ in 0..MESSAGES as usize / BATCH {
        let messages = (0..BATCH).map(|_| pb::Message { payload: payload.clone(), ..Default::default() }).collect();
        publisher.publish_batch(pb::PublishBatchRequest { queue: QUEUE.into(), messages }).await.expect("stored");
    }
}

async fn drain_raw(addr: SocketAddr) {
    let mut client = ConsumerClient::new(channel(addr).await);
    let (requests, receiver) = tokio::sync::mpsc::channel(64);
    let subscribe = pb::Subscribe { queue: QUEUE.into(), credit: PREFETCH };
    let kind = pb::consume_request::Kind::Subscribe(subscribe);
    requests.send(pb::ConsumeRequest { kind: Some(kind) }).await.expect("open");
    let mut stream = client.consume(ReceiverStream::new(receiver)).await.expect("subscribed").into_inner();
    let (mut received, mut to_ack) = (0, Vec::new());
    while received < MESSAGES {
        let response = stream.message().await.expect("stream ok").expect("stream open");
        if let Some(pb::consume_response::Kind::Delivery(delivery)) = response.kind {
            received += 1;
            to_ack.push(delivery.delivery_id);
            if to_ack.len() >= PREFETCH as usize / 4 || received == MESSAGES {
                let credit = u32::try_from(to_ack.len()).expect("within the window");
                let ack = pb::Ack { delivery_ids: std::mem::take(&mut to_ack) };
                requests
                    .send(pb::ConsumeRequest { kind: Some(pb::consume_request::Kind::Ack(ack)) })
                    .await
                    .expect("open");
                let credit = pb::consume_request::Kind::Credit(pb::Credit { credit });
                requests.send(pb::ConsumeRequest { kind: Some(credit) }).await.expect("open");
            }
        }
    }
}

async fn drain_consumer(addr: SocketAddr) {
    let client = Client::connect(&format!("http://{addr}")).await.expect("connects");
    let config = ConsumerConfig {
        prefetch: PREFETCH,
        concurrency: PREFETCH as usize,
        max_messages: Some(MESSAGES),
        ..ConsumerConfig::default()
    };
    let seen = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&seen);
    let handle = client.consumer(QUEUE, config).expect("valid config").spawn(move |_delivery: Delivery| {
        counter.fetch_add(1, Ordering::Relaxed);
        async { Ok::<(), std::convert::Infallible>(()) }
    });
    let stats = handle.join().await.expect("drains");
    assert_eq!(stats.acked, MESSAGES);
    assert_eq!(seen.load(Ordering::Relaxed), MESSAGES);
}

fn drain(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let server = runtime.block_on(start());
    let mut group = c.benchmark_group("drain");
    group.throughput(Throughput::Elements(MESSAGES));
    group.sample_size(10);
    group.bench_function("raw_stream", |b| {
        b.iter_custom(|iterations| timed(&runtime, server.addr, iterations, drain_raw));
    });
    group.bench_function("consumer", |b| {
        b.iter_custom(|iterations| timed(&runtime, server.addr, iterations, drain_consumer));
    });
    group.finish();
}

/// `iterations` drains of a freshly filled queue; the drains' time only.
fn timed<F, Fut>(runtime: &tokio::runtime::Runtime, addr: SocketAddr, iterations: u64, drain: F) -> Duration
where
    F: Fn(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut total = Duration::ZERO;
    for _ in 0..iterations {
        runtime.block_on(fill(addr));
        let start = Instant::now();
        runtime.block_on(drain(addr));
        total += start.elapsed();
    }
    total
}

criterion_group!(benches, drain);
criterion_main!(benches);
