//! What reaches the broker that the Rust client never sends, and the
//! connection limits: raw request bodies, oversized messages and metadata,
//! too many connections, streams or Watch calls, and peers that vanish.

use std::{path::PathBuf, time::Duration};

use ballast_proto::v1::{self as pb, admin_client::AdminClient, stats_client::StatsClient};
use bytes::{Buf, BufMut, Bytes};
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    metadata::{MetadataKey, MetadataValue},
    transport::Channel,
};

use crate::support::*;

/// Sends and receives message bodies as raw bytes.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// A unary call with a raw body.
async fn raw_unary(channel: &Channel, path: &'static str, body: Bytes) -> Result<Bytes, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    grpc.unary(tonic::Request::new(body), PathAndQuery::from_static(path), RawCodec).await.map(|r| r.into_inner())
}

/// A server-streaming call with a raw body: the stream's first item.
async fn raw_server_streaming(channel: &Channel, path: &'static str, body: Bytes) -> Result<Option<Bytes>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let mut stream =
        grpc.server_streaming(tonic::Request::new(body), PathAndQuery::from_static(path), RawCodec).await?.into_inner();
    stream.message().await
}

/// A bidirectional call whose first request is a raw body: the first
/// response (or the status the stream ended with).
async fn raw_streaming(channel: &Channel, path: &'static str, body: Bytes) -> Result<Option<Bytes>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(body).await.unwrap();
    let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
    let result = grpc.streaming(tonic::Request::new(requests), PathAndQuery::from_static(path), RawCodec).await;
    let mut stream = result?.into_inner();
    let first = stream.message().await;
    drop(tx);
    first
}

const UNARY_METHODS: [&str; 11] = [
    "/ballast.v1.Admin/CreateQueue",
    "/ballast.v1.Admin/GetQueue",
    "/ballast.v1.Admin/ListQueues",
    "/ballast.v1.Admin/DeleteQueue",
    "/ballast.v1.Admin/PurgeQueue",
    "/ballast.v1.Publisher/Publish",
    "/ballast.v1.Publisher/PublishBatch",
    "/ballast.v1.Stats/GetStats",
    "/ballast.v1.Consumer/Pull",
    "/ballast.v1.Consumer/Ack",
    "/ballast.v1.Consumer/Nack",
];

/// Bodies that are not protobuf: a truncated length-delimited field, a
/// varint that never ends, a length past the end, a field number 0, and
/// the deprecated group wire type.
const NOT_PROTOBUF: [&[u8]; 5] =
    [b"\x0a\xff", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0a\x05ab", b"\x00\x01", b"\x0b"];

fn errors(broker: &BrokerProcess, code: &str) -> f64 {
    sample(&broker.scrape(), "ballast_errors_total", &format!("code=\"{code}\"")).unwrap_or(0.0)
}

/// A request body that is not protobuf answers INVALID_ARGUMENT on every
/// unary method and both streams (tonic's own answer was INTERNAL), and
/// each is counted in `ballast_errors_total`. See: #13 item 9.
#[tokio::test]
async fn a_body_that_is_not_protobuf_is_invalid_argument() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "q", queue_settings()).await;
    let channel = broker.channel().await;
    let before = errors(&broker, "invalid_argument");
    let mut calls = 0.0;
    for body in NOT_PROTOBUF {
        let body = Bytes::from_static(body);
        for path in UNARY_METHODS {
            let status = raw_unary(&channel, path, body.clone()).await.expect_err(path);
            assert_eq!(status.code(), Code::InvalidArgument, "{path} {body:?}: {status:?}");
            assert!(status.message().contains("not a valid ballast.v1 message"), "{status:?}");
            calls += 1.0;
        }
        let status = raw_server_streaming(&channel, "/ballast.v1.Stats/Watch", body.clone()).await.expect_err("watch");
        assert_eq!(status.code(), Code::InvalidArgument, "Watch {body:?}: {status:?}");
        let status = raw_streaming(&channel, "/ballast.v1.Consumer/Consume", body.clone()).await.expect_err("consume");
        assert_eq!(status.code(), Code::InvalidArgument, "Consume {body:?}: {status:?}");
        calls += 2.0;
    }
    assert_eq!(errors(&broker, "invalid_argument") - before, calls, "each is counted");
}

/// A gRPC message over the decode limit (17 MiB) answers
/// RESOURCE_EXHAUSTED, as docs/api.md says (tonic's own answer was
/// OUT_OF_RANGE); a message at the limit is decoded. See: #13 item 9.
#[tokio::test]
async fn a_message_over_the_decode_limit_is_resource_exhausted() {
    const LIMIT: usize = 17 * 1024 * 1024;
    let broker = BrokerProcess::start();
    let channel = broker.channel().await;
    // A Publish to an unknown queue whose payload makes it `size` bytes.
    let publish_of_size = |size: usize| {
        let mut payload = size - 20;
        loop {
            let request = pb::PublishRequest { queue: "nope".into(), message: Some(message(vec![0u8; payload])) };
            let len = prost::Message::encoded_len(&request);
            if len == size {
                return Bytes::from(prost::Message::encode_to_vec(&request));
            }
            payload = payload + size - len;
        }
    };
    // At the limit: decoded, then refused for the unknown queue.
    let status = raw_unary(&channel, "/ballast.v1.Publisher/Publish", publish_of_size(LIMIT)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "decoded at the limit: {status:?}");
    // One byte past it.
    let past = publish_of_size(LIMIT + 1);
    let before = errors(&broker, "resource_exhausted");
    for path in ["/ballast.v1.Publisher/Publish", "/ballast.v1.Admin/GetQueue"] {
        let status = raw_unary(&channel, path, past.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{path}: {status:?}");
        assert!(status.message().contains("larger than the broker accepts"), "{status:?}");
    }
    let status = raw_streaming(&channel, "/ballast.v1.Consumer/Consume", past).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "Consume: {status:?}");
    assert_eq!(errors(&broker, "resource_exhausted") - before, 3.0);
}

/// Request metadata up to METADATA_SIZE_MAX (64 KiB, counted as HTTP/2
/// does) is accepted; past it the call gets RESOURCE_EXHAUSTED naming the
/// limit, also for 2,000 small entries, which HTTP/2's own limit answered
/// with a 431 that clients report as UNKNOWN. See: #13 item 9.
#[tokio::test]
async fn oversized_metadata_is_resource_exhausted() {
    const LIMIT: usize = 64 * 1024;
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    // The headers every call carries (te, content-type, user-agent,
    // grpc-timeout...), measured as the broker measures them: what one
    // filler entry adds is known, the rest is found by bisection on the
    // broker's answer, so the test does not depend on the client's set.
    let call = |entries: usize, last: usize| {
        let mut request = tonic::Request::new(pb::ListQueuesRequest {});
        for i in 0..entries {
            let key = MetadataKey::from_bytes(format!("x-fill-{i:04}").as_bytes()).unwrap();
            let len = if i + 1 == entries { last } else { 100 };
            request.metadata_mut().insert(key, MetadataValue::try_from("v".repeat(len)).unwrap());
        }
        request
    };
    // Each full entry is 11 + 100 + 32 = 143 bytes; the last one's value
    // (0..2000 bytes) brings the total across the limit.
    let entries = (LIMIT - 1000) / 143;
    let mut low = 0;
    let mut high = 2000;
    // Largest size of the last entry that passes: between low and high.
    assert!(admin.list_queues(call(entries, low)).await.is_ok());
    let refused = admin.list_queues(call(entries, high)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains(&LIMIT.to_string()), "{refused:?}");
    while high - low > 1 {
        let mid = (low + high) / 2;
        if admin.list_queues(call(entries, mid)).await.is_ok() {
            low = mid;
        } else {
            high = mid;
        }
    }
    // At the limit it passes, one byte more is refused.
    assert!(admin.list_queues(call(entries, low)).await.is_ok());
    let past = admin.list_queues(call(entries, low + 1)).await.unwrap_err();
    assert_eq!(past.code(), Code::ResourceExhausted, "{past:?}");
    // 2,000 small entries: a status a client can act on, not UNKNOWN.
    let status = admin.list_queues(call(2000, 1)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("2000") || status.message().contains("metadata"), "{status:?}");
}

/// A consume stream of a queue deleted under it ends NOT_FOUND naming the
/// queue (it was UNAVAILABLE, which clients treat as a restart); a broker
/// shutting down still ends streams UNAVAILABLE. See: #13 item 9.
#[tokio::test]
async fn a_deleted_queue_ends_its_streams_not_found() {
    let mut broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "gone", queue_settings()).await;
    create(&mut admin, "kept", queue_settings()).await;
    let mut consumer = broker.consumer().await;
    let mut gone = Session::open(&mut consumer, "gone", 1).await;
    let mut kept = Session::open(&mut consumer, "kept", 1).await;
    admin.delete_queue(pb::DeleteQueueRequest { name: "gone".into() }).await.unwrap();
    match gone.next_within(Duration::from_secs(10)).await {
        Some(Err(status)) => {
            assert_eq!(status.code(), Code::NotFound, "{status:?}");
            assert!(status.message().contains("queue gone was deleted"), "{status:?}");
        }
        other => panic!("expected NOT_FOUND, got {other:?}"),
    }
    broker.send_sigterm();
    match kept.next_within(Duration::from_secs(10)).await {
        Some(Err(status)) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    assert!(broker.wait_exit().success());
}

/// A config file in a temporary directory, for `--config`.
struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn config_file(text: &str) -> ConfigFile {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("ballastd.toml");
    std::fs::write(&path, text).unwrap();
    ConfigFile { _dir: dir, path }
}

fn start_with_config(config: &ConfigFile) -> BrokerProcess {
    BrokerProcess::start_with(&["--config", config.path.to_str().unwrap()])
}

/// Connects without the support helpers' retries, for limit tests.
async fn connect(broker: &BrokerProcess) -> Channel {
    Channel::from_shared(broker.endpoint()).unwrap().connect().await.expect("TCP connect")
}

/// `grpc.connections_max` connections are served; one more is closed at
/// once (its call fails, and the broker logs why); once one closes, a new
/// connection is served again.
#[tokio::test]
async fn connections_at_the_limit_and_past() {
    let config = config_file("[grpc]\nconnections_max = 2\n");
    let broker = start_with_config(&config);
    let list = |channel: Channel| async move { AdminClient::new(channel).list_queues(pb::ListQueuesRequest {}).await };
    let first = connect(&broker).await;
    let second = connect(&broker).await;
    list(first.clone()).await.expect("first connection served");
    list(second.clone()).await.expect("second connection served, at the limit");
    // Past the limit: the TCP connect succeeds (the kernel accepts) but
    // the broker closes it, so the call fails.
    let third = Channel::from_shared(broker.endpoint()).unwrap().connect_lazy();
    let status = list(third).await.unwrap_err();
    // How a closed connection reads depends on when the client notices.
    let closed = [Code::Unavailable, Code::Unknown, Code::Internal, Code::Cancelled];
    assert!(closed.contains(&status.code()), "{status:?}");
    let log = std::fs::read_to_string(broker.data_dir.with_extension("log")).unwrap();
    assert!(log.contains("connection refused") && log.contains("connections_max"), "{log}");
    let metrics = broker.scrape();
    assert!(sample(&metrics, "ballast_connections_refused_total", "").is_none_or(|v| v >= 1.0));
    // One closes: a new connection is served.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let channel = Channel::from_shared(broker.endpoint()).unwrap().connect_lazy();
        if list(channel).await.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no connection served after one closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    list(second).await.expect("the second connection is still served");
}

/// `grpc.streams_per_connection_max` calls run at once on one connection;
/// one more waits (HTTP/2 holds it back) until one of them ends.
#[tokio::test]
async fn streams_per_connection_at_the_limit_and_past() {
    let config = config_file("[grpc]\nstreams_per_connection_max = 2\n");
    let broker = start_with_config(&config);
    create(&mut broker.admin().await, "s", queue_settings()).await;
    let channel = connect(&broker).await;
    let mut consumer = ballast_proto::v1::consumer_client::ConsumerClient::new(channel.clone());
    let first = Session::open(&mut consumer, "s", 1).await;
    let _second = Session::open(&mut consumer, "s", 1).await;
    let mut admin = AdminClient::new(channel);
    let third = tokio::spawn(async move { admin.get_queue(pb::GetQueueRequest { name: "s".into() }).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third call on the connection must wait while two streams are open");
    drop(first);
    let info = tokio::time::timeout(Duration::from_secs(10), third).await.expect("runs once a stream ends");
    // The call ran; the ended stream's consumer may not be gone yet.
    assert!(info.unwrap().unwrap().into_inner().consumers <= 2);
}

/// `grpc.watch_streams_max` Stats Watch streams are served; one more is
/// RESOURCE_EXHAUSTED naming the limit; once one ends, a new one is served.
#[tokio::test]
async fn watch_streams_at_the_limit_and_past() {
    let config = config_file("[grpc]\nwatch_streams_max = 2\n");
    let broker = start_with_config(&config);
    let mut stats = StatsClient::new(broker.channel().await);
    let watch = pb::WatchRequest { queue: String::new(), interval_ms: 100 };
    let mut first = stats.watch(watch.clone()).await.expect("first watch").into_inner();
    let mut second = stats.watch(watch.clone()).await.expect("second watch, at the limit").into_inner();
    assert!(first.message().await.unwrap().is_some());
    assert!(second.message().await.unwrap().is_some());
    assert_status(stats.watch(watch.clone()).await, Code::ResourceExhausted, "Stats Watch streams");
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut third = loop {
        match stats.watch(watch.clone()).await {
            Ok(stream) => break stream.into_inner(),
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
        assert!(std::time::Instant::now() < deadline, "no watch served after one ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(third.message().await.unwrap().is_some());
    assert!(second.message().await.unwrap().is_some(), "the second is still served");
}

/// A TCP relay on loopback in front of the broker that can be told to
/// stop forwarding without closing anything: the broker's peer seems to
/// have vanished (host gone, cable cut), as no FIN or RST ever arrives.
struct Blackhole {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Blackhole {
    async fn start(target: std::net::SocketAddr) -> Blackhole {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = std::sync::Arc::new(AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&cut);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else { return };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (mut from, mut to) in [(client_read, server_write), (server_read, client_write)] {
                    let flag = std::sync::Arc::clone(&flag);
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if flag.load(Ordering::SeqCst) {
                                // Hold both sockets open and forward nothing.
                                let _held = (from, to);
                                std::future::pending::<()>().await;
                                return;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Blackhole { addr, cut }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A consumer whose peer vanishes without closing its connection is found
/// by HTTP/2 keepalive (short here: 200 ms pings, 500 ms to answer): its
/// connection closes and its leases go back to the queue without counting
/// an attempt, so another consumer gets the messages with attempt 1 long
/// before their 60 s leases would expire. Without keepalive they waited for
/// the lease expiry, each counting an attempt. See: #13 item 5.
#[tokio::test]
async fn a_blackholed_consumers_leases_are_released_by_keepalive() {
    let config = config_file("[grpc]\nkeepalive_interval_ms = 200\nkeepalive_timeout_ms = 500\n");
    let broker = start_with_config(&config);
    let settings = pb::QueueSettings { lease_timeout_ms: Some(60_000), ..queue_settings() };
    create(&mut broker.admin().await, "dead", settings).await;
    publish_batch(&mut broker.publisher().await, "dead", (0..3).map(|i| message(format!("{i}"))).collect()).await;
    let relay = Blackhole::start(broker.addr).await;
    let through_relay = Channel::from_shared(format!("http://{}", relay.addr)).unwrap().connect().await.unwrap();
    let mut doomed =
        Session::open(&mut ballast_proto::v1::consumer_client::ConsumerClient::new(through_relay), "dead", 3).await;
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(doomed.delivery().await.payload);
    }
    relay.cut();
    let started = std::time::Instant::now();
    let mut survivor = Session::open(&mut broker.consumer().await, "dead", 3).await;
    let mut again = Vec::new();
    for _ in 0..3 {
        let delivery = survivor.delivery().await;
        assert_eq!(delivery.attempt, 1, "a vanished peer's lease does not count an attempt: {delivery:?}");
        again.push(delivery.payload);
    }
    again.sort();
    first.sort();
    assert_eq!(again, first);
    assert!(started.elapsed() < Duration::from_secs(10), "released after {:?}", started.elapsed());
    let info = broker.admin().await.get_queue(pb::GetQueueRequest { name: "dead".into() }).await.unwrap().into_inner();
    assert_eq!(info.consumers, 1, "the vanished consumer is gone");
}

/// CONSUMERS_MAX (1,024) consumers per queue are served; one more (a
/// stream or a Pull) is RESOURCE_EXHAUSTED naming the limit; once one
/// leaves, a new one is served.
#[tokio::test]
async fn consumers_per_queue_at_the_limit_and_past() {
    const LIMIT: usize = 1024;
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "crowd", queue_settings()).await;
    // Two connections: each holds half (the default stream limit per
    // connection is 1,024, which the extra calls below would pass).
    let mut consumers = [broker.consumer().await, broker.consumer().await];
    let mut sessions = Vec::with_capacity(LIMIT);
    for i in 0..LIMIT {
        sessions.push(Session::open(&mut consumers[i % 2], "crowd", 1).await);
    }
    assert_eq!(info_consumers(&broker, "crowd").await, LIMIT as u32, "at the limit");
    let mut extra = broker.consumer().await;
    assert_status(
        Session::try_open(&mut extra, "crowd", 1).await.map(|_| ()),
        Code::ResourceExhausted,
        "consumers per queue",
    );
    assert_status(
        extra.pull(pb::PullRequest { queue: "crowd".into(), max_messages: 1, wait_ms: 0 }).await,
        Code::ResourceExhausted,
        "consumers per queue",
    );
    drop(sessions.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while info_consumers(&broker, "crowd").await != LIMIT as u32 - 1 {
        assert!(std::time::Instant::now() < deadline, "the closed stream's consumer is still registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Session::open(&mut extra, "crowd", 1).await;
}

async fn info_consumers(broker: &BrokerProcess, queue: &str) -> u32 {
    broker.admin().await.get_queue(pb::GetQueueRequest { name: queue.into() }).await.unwrap().into_inner().consumers
}

/// A lane reads ahead at most DELAYED_MAX (100,000) messages whose delay
/// has not come: with 99,999 of them ahead, an undelayed message behind
/// them is delivered; with 100,000 the lane stops reading until some come
/// due, so the one behind them waits (memory stays bounded).
#[tokio::test]
async fn delayed_messages_in_memory_at_the_limit_and_past() {
    const LIMIT: usize = 100_000;
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings {
        lanes: vec!["at".into(), "past".into()],
        lane_weights: vec![1, 1],
        sync_policy: pb::SyncPolicy::None.into(),
        max_messages: Some(1_000_000),
        ..queue_settings()
    };
    create(&mut broker.admin().await, "later", settings).await;
    let mut publisher = broker.publisher().await;
    let hour = 3_600_000;
    for (lane, delayed) in [(0u32, LIMIT - 1), (1, LIMIT)] {
        let mut left = delayed;
        while left > 0 {
            let n = left.min(1000);
            let batch = (0..n).map(|_| pb::Message { delay_ms: hour, ..on_lane("later", lane) }).collect();
            publish_batch(&mut publisher, "later", batch).await;
            left -= n;
        }
        publish(&mut publisher, "later", on_lane(format!("now-{lane}"), lane)).await;
    }
    let mut session = Session::open(&mut broker.consumer().await, "later", 10).await;
    let delivery = session.delivery().await;
    assert_eq!(delivery.payload, "now-0".as_bytes(), "behind 99,999 delayed messages: delivered");
    session.expect_silence(Duration::from_millis(1000)).await;
}

/// `grpc.request_timeout_ms` bounds a call until its response starts: a
/// consume stream that never subscribes is ended CANCELLED at the timeout
/// (before, it held its task forever), while a subscribed stream lives on
/// past it and still delivers; a Pull that would wait as long as the
/// timeout is refused INVALID_ARGUMENT naming the setting, one that waits
/// less is served.
#[tokio::test]
async fn the_request_timeout_bounds_a_call_not_a_stream() {
    let config = config_file("[grpc]\nrequest_timeout_ms = 1000\n");
    let broker = start_with_config(&config);
    create(&mut broker.admin().await, "t", queue_settings()).await;
    let channel = connect(&broker).await;
    let mut consumer = pb::consumer_client::ConsumerClient::new(channel.clone());

    let mut subscribed = Session::open(&mut consumer, "t", 1).await;
    let (_silent, rx) = tokio::sync::mpsc::channel::<pb::ConsumeRequest>(1);
    let started = std::time::Instant::now();
    let unsubscribed = consumer.consume(tokio_stream::wrappers::ReceiverStream::new(rx));
    let status = tokio::time::timeout(Duration::from_secs(30), unsubscribed)
        .await
        .expect("a stream that never subscribes is cut by the request timeout")
        .unwrap_err();
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(900), "cut at the timeout, not before: {status:?}");

    tokio::time::sleep(Duration::from_millis(300)).await;
    publish(&mut broker.publisher().await, "t", message("after the timeout")).await;
    assert_eq!(subscribed.delivery().await.payload, "after the timeout".as_bytes(), "the stream outlives the timeout");

    let pull = |wait_ms| {
        let mut consumer = consumer.clone();
        async move { consumer.pull(pb::PullRequest { queue: "t".into(), max_messages: 1, wait_ms }).await }
    };
    let refused = pull(1000).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("grpc.request_timeout_ms"), "{refused:?}");
    pull(999).await.expect("a Pull that waits less than the timeout is served");
}
