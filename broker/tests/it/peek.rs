//! Peek: messages read without leasing, paged; dead letters with their
//! reason and attempts. See: #15 item 2 (browsing).

use std::time::Duration;

use ballast_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

fn peek(queue: &str, start: Option<pb::MessageId>, max_messages: u32) -> pb::PeekRequest {
    pb::PeekRequest { queue: queue.into(), start, max_messages }
}

/// Dead letters are shown with their payload, headers, attempts, reason
/// and age, a page at a time (2, then 1 with no next page), lanes in
/// priority order; peeking leases nothing, so a consumer of the
/// dead-letter queue then gets every one at attempt 1. A leased message of
/// the source queue is shown too, and stays leased.
#[tokio::test]
async fn peek_shows_dead_letters_without_leasing_them() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { max_attempts: Some(1), ..queue_settings() };
    create(&mut broker.admin().await, "work", settings).await;
    let mut publisher = broker.publisher().await;
    for (i, lane) in [(0, 2), (1, 0), (2, 1)] {
        let mut m = on_lane(format!("m{i}"), lane);
        m.headers.insert("tenant".into(), format!("t{i}"));
        publish(&mut publisher, "work", m).await;
    }
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "work", 3).await;
    for _ in 0..3 {
        let delivery = session.delivery().await;
        let reason = format!("bad {}", String::from_utf8_lossy(&delivery.payload));
        session.nack(delivery.delivery_id, 0, &reason).await;
    }
    wait_until_shown(&broker, "work.dead", 3).await;
    let first = consumer.peek(peek("work.dead", None, 2)).await.unwrap().into_inner();
    let payloads: Vec<_> = first.messages.iter().map(|m| String::from_utf8_lossy(&m.payload).into_owned()).collect();
    assert_eq!(payloads, ["m1", "m2"], "lanes in priority order: high, then normal");
    let m1 = &first.messages[0];
    assert_eq!((m1.attempts, m1.reason.as_str()), (1, "bad m1"));
    assert_eq!(m1.headers.get("tenant").map(String::as_str), Some("t1"));
    assert!(m1.age_ms < 60_000 && m1.published_at_ms > 0, "{m1:?}");
    let next = first.next.expect("a next page");
    let second = consumer.peek(peek("work.dead", Some(next), 2)).await.unwrap().into_inner();
    assert_eq!(second.messages.len(), 1);
    assert_eq!((second.messages[0].payload.as_ref(), second.messages[0].reason.as_str()), (&b"m0"[..], "bad m0"));
    assert_eq!(second.next, None, "nothing follows");
    // Nothing was leased: a consumer gets all three, first attempts.
    let mut dead = Session::open(&mut consumer, "work.dead", 3).await;
    for _ in 0..3 {
        assert_eq!(dead.delivery().await.attempt, 1);
    }
    // A leased message is shown and stays leased.
    publish(&mut publisher, "work", message("held")).await;
    let mut holder = Session::open(&mut consumer, "work", 1).await;
    let held = holder.delivery().await;
    let shown = consumer.peek(peek("work", None, 10)).await.unwrap().into_inner();
    assert_eq!(shown.messages.len(), 1);
    assert_eq!(shown.messages[0].id, held.id);
    assert_eq!(stats(&broker, "work").await.in_flight, 1);
    holder.expect_silence(Duration::from_millis(100)).await;
}

/// Waits until `queue` shows `count` messages (durable ones only).
async fn wait_until_shown(broker: &BrokerProcess, queue: &str, count: usize) {
    let mut consumer = broker.consumer().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while consumer.peek(peek(queue, None, 10)).await.unwrap().into_inner().messages.len() < count {
        assert!(std::time::Instant::now() < deadline, "{queue} never showed {count} messages");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// max_messages is 1..=1000 (PEEK_MESSAGES_MAX): 1000 is served, 0 and
/// 1001 are INVALID_ARGUMENT; a start lane the queue lacks is
/// INVALID_ARGUMENT; an unknown queue NOT_FOUND; an empty queue an empty
/// page without a next one.
#[tokio::test]
async fn peek_bounds_at_the_limit_and_past() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "empty", queue_settings()).await;
    let mut consumer = broker.consumer().await;
    let page = consumer.peek(peek("empty", None, 1000)).await.unwrap().into_inner();
    assert_eq!((page.messages.len(), page.next), (0, None));
    for max in [0, 1001] {
        assert_status(consumer.peek(peek("empty", None, max)).await, Code::InvalidArgument, "max_messages");
    }
    let past = Some(pb::MessageId { lane: 3, offset: 0 });
    assert_status(consumer.peek(peek("empty", past, 10)).await, Code::InvalidArgument, "lane 3 does not exist");
    assert_status(consumer.peek(peek("nope", None, 10)).await, Code::NotFound, "nope");
}
