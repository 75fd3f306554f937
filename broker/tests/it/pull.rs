//! Pull's bounds (response size, leases per queue, a cancelled Pull) and
//! who may settle a delivery. See: #13 items 3 and 10.

use std::time::Duration;

use ballast_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

async fn pull(
    consumer: &mut ballast_proto::v1::consumer_client::ConsumerClient<tonic::transport::Channel>,
    queue: &str,
    max_messages: u32,
) -> Result<Vec<pb::Delivery>, tonic::Status> {
    let request = pb::PullRequest { queue: queue.into(), max_messages, wait_ms: 1000 };
    consumer.pull(request).await.map(|r| r.into_inner().deliveries)
}

async fn info(broker: &BrokerProcess, queue: &str) -> pb::QueueInfo {
    broker.admin().await.get_queue(pb::GetQueueRequest { name: queue.into() }).await.unwrap().into_inner()
}

/// A Pull response is capped at PULL_RESPONSE_SIZE_MAX (16.5 MiB): 16
/// messages of 1 MiB fit in one response; of 17, 16 are returned and the
/// last is not leased (it was: it stayed leased until expiry, counting an
/// attempt), so the next Pull gets it at attempt 1.
#[tokio::test]
async fn a_pull_response_is_capped_by_size() {
    const MIB: usize = 1024 * 1024;
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { message_size_max: Some(2 * MIB as u32), ..queue_settings() };
    create(&mut broker.admin().await, "big", settings).await;
    let mut publisher = broker.publisher().await;
    for i in 0..16u8 {
        publish(&mut publisher, "big", message(vec![i; MIB])).await;
    }
    let mut consumer = broker.consumer().await;
    // Within the limit: all of them.
    let all = pull(&mut consumer, "big", 100).await.unwrap();
    assert_eq!(all.len(), 16);
    let ids = all.iter().map(|d| d.delivery_id).collect();
    consumer.ack(pb::AckRequest { queue: "big".into(), delivery_ids: ids }).await.unwrap();
    // Past it: 16 of 17, and the 17th is not leased.
    for i in 0..17u8 {
        publish(&mut publisher, "big", message(vec![i; MIB])).await;
    }
    let capped = pull(&mut consumer, "big", 100).await.unwrap();
    assert_eq!(capped.len(), 16);
    assert_eq!(info(&broker, "big").await.in_flight, 16, "what was not returned is not leased");
    let rest = pull(&mut consumer, "big", 100).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].attempt, 1, "left out of a response is not an attempt");
    assert_eq!(rest[0].payload[0], 16);
}

/// Pull leases per queue are bounded by PULL_LEASES_MAX (10,000): Pulls
/// up to the limit are served, the next one is RESOURCE_EXHAUSTED, one
/// asking for more than is left gets fewer, and acks make room again.
#[tokio::test]
async fn pull_leases_at_the_limit_and_past() {
    const LIMIT: usize = 10_000;
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "many", queue_settings()).await;
    let mut publisher = broker.publisher().await;
    for batch in 0..11 {
        publish_batch(&mut publisher, "many", (0..1000).map(|i| message(format!("{batch}-{i}"))).collect()).await;
    }
    let mut consumer = broker.consumer().await;
    let mut held = Vec::new();
    while held.len() < LIMIT {
        let got = pull(&mut consumer, "many", 5000).await.unwrap();
        assert!(!got.is_empty());
        held.extend(got.into_iter().map(|d| d.delivery_id));
    }
    assert_eq!(held.len(), LIMIT, "at the limit");
    assert_status(pull(&mut consumer, "many", 1).await, Code::ResourceExhausted, "pulled messages not yet acked");
    // Acking 5 makes room for 5, whatever the Pull asks for.
    let acked: Vec<u64> = held.drain(..5).collect();
    consumer.ack(pb::AckRequest { queue: "many".into(), delivery_ids: acked }).await.unwrap();
    assert_eq!(pull(&mut consumer, "many", 100).await.unwrap().len(), 5, "fewer than asked: the room left");
    assert_eq!(info(&broker, "many").await.in_flight, LIMIT as u64);
}

/// A Pull cancelled while it waits (the client gave up) leaves no consumer
/// behind: before, its consumer stayed registered for good, counting
/// against the queue's consumers.
#[tokio::test]
async fn a_cancelled_pull_leaves_no_consumer() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "wait", queue_settings()).await;
    let mut consumer = broker.consumer().await;
    let request = pb::PullRequest { queue: "wait".into(), max_messages: 5, wait_ms: 30_000 };
    let mut call = tonic::Request::new(request);
    call.set_timeout(Duration::from_millis(300));
    let status = consumer.pull(call).await.unwrap_err();
    assert!(matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded), "{status:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while info(&broker, "wait").await.consumers != 0 {
        assert!(std::time::Instant::now() < deadline, "the cancelled Pull's consumer is still registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And a message published now is not lost to it.
    publish(&mut broker.publisher().await, "wait", message("after")).await;
    let got = pull(&mut consumer, "wait", 5).await.unwrap();
    assert_eq!(got.len(), 1);
}

/// Delivery ids are random, and a stream may settle only its own
/// deliveries: another stream's ack and nack of them are rejected
/// FAILED_PRECONDITION and change nothing; the unary Ack (which names the
/// id) may settle any delivery.
#[tokio::test]
async fn a_stream_cannot_settle_another_streams_delivery() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "own", queue_settings()).await;
    publish_batch(&mut broker.publisher().await, "own", (0..4).map(|i| message(format!("{i}"))).collect()).await;
    let mut consumer = broker.consumer().await;
    let mut mine = Session::open(&mut consumer, "own", 4).await;
    let mut other = Session::open(&mut consumer, "own", 1).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(mine.delivery().await.delivery_id);
    }
    let adjacent = ids.windows(2).filter(|w| w[0].abs_diff(w[1]) == 1).count();
    assert_eq!(adjacent, 0, "ids are not a counter: {ids:?}");
    other.ack(vec![ids[0]]).await;
    other.nack(ids[1], 0, "not mine").await;
    for _ in 0..2 {
        match other.next_within(Duration::from_secs(10)).await {
            Some(Ok(pb::consume_response::Kind::Rejected(r))) => {
                assert_eq!(r.code, Code::FailedPrecondition as i32, "{r:?}");
                assert!(ids[..2].contains(&r.delivery_id));
            }
            got => panic!("expected a rejection, got {got:?}"),
        }
    }
    assert_eq!(info(&broker, "own").await.in_flight, 4, "nothing changed");
    mine.ack(vec![ids[0], ids[1]]).await;
    consumer.ack(pb::AckRequest { queue: "own".into(), delivery_ids: vec![ids[2]] }).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while info(&broker, "own").await.in_flight != 1 {
        assert!(std::time::Instant::now() < deadline, "acks by the owner and by unary Ack apply");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
