//! Consumer-paced delivery: lanes, credit, ack and nack, leases, dead
//! letters, delays, pull.

use std::time::{Duration, Instant};

use ballast_proto::v1 as pb;

use crate::support::*;

/// Publishes `per_lane` messages to each of the three default lanes, lowest
/// lane first, so that delivery order shows the scheduler and not arrival.
async fn fill_lanes(broker: &BrokerProcess, queue: &str, per_lane: usize) {
    let mut publisher = broker.publisher().await;
    for lane in [2u32, 1, 0] {
        let messages = (0..per_lane).map(|i| on_lane(format!("{lane}-{i}"), lane)).collect();
        publish_batch(&mut publisher, queue, messages).await;
    }
}

#[tokio::test]
async fn weighted_lanes_are_served_by_weight() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "w", queue_settings()).await;
    fill_lanes(&broker, "w", 20).await;
    let mut session = Session::open(&mut broker.consumer().await, "w", 35).await;
    let mut got: Vec<(u32, String)> = Vec::new();
    for _ in 0..35 {
        let d = session.delivery().await;
        got.push((d.id.expect("id").lane, String::from_utf8(d.payload.to_vec()).unwrap()));
    }
    // Weights 4:2:1: five rounds of 7 deliveries while every lane has work.
    for round in got.chunks(7) {
        let count = |lane| round.iter().filter(|(l, _)| *l == lane).count();
        assert_eq!((count(0), count(1), count(2)), (4, 2, 1), "round {round:?}");
    }
    // Then the rest; within a lane, order is publish order.
    session.credit(25).await;
    for _ in 0..25 {
        let d = session.delivery().await;
        got.push((d.id.expect("id").lane, String::from_utf8(d.payload.to_vec()).unwrap()));
    }
    for lane in 0..3u32 {
        let in_lane: Vec<&str> = got.iter().filter(|(l, _)| *l == lane).map(|(_, p)| p.as_str()).collect();
        let expected: Vec<String> = (0..20).map(|i| format!("{lane}-{i}")).collect();
        assert_eq!(in_lane, expected);
    }
}

#[tokio::test]
async fn strict_priority_drains_higher_lanes_first() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { strict_priority: Some(true), ..queue_settings() };
    create(&mut broker.admin().await, "s", settings).await;
    fill_lanes(&broker, "s", 10).await;
    let mut session = Session::open(&mut broker.consumer().await, "s", 30).await;
    let mut got = Vec::new();
    for _ in 0..30 {
        let d = session.delivery().await;
        got.push(String::from_utf8(d.payload.to_vec()).unwrap());
    }
    let expected: Vec<String> = [0, 1, 2].iter().flat_map(|lane| (0..10).map(move |i| format!("{lane}-{i}"))).collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn credit_is_never_exceeded() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "c", queue_settings()).await;
    publish_batch(&mut broker.publisher().await, "c", (0..20).map(|i| message(format!("{i}"))).collect()).await;
    let mut session = Session::open(&mut broker.consumer().await, "c", 5).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(session.delivery().await.delivery_id);
    }
    session.expect_silence(Duration::from_millis(300)).await;
    // Acks do not return credit: still nothing.
    session.ack(held.clone()).await;
    session.expect_silence(Duration::from_millis(300)).await;
    // More credit: exactly that many more.
    session.credit(3).await;
    for _ in 0..3 {
        session.delivery().await;
    }
    session.expect_silence(Duration::from_millis(300)).await;
    let info = broker.admin().await.get_queue(pb::GetQueueRequest { name: "c".into() }).await.unwrap().into_inner();
    assert_eq!(info.in_flight, 3);
    assert_eq!(info.depth, 15);
}

#[tokio::test]
async fn competing_consumers_share_and_disconnect_releases_leases() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "share", queue_settings()).await;
    publish_batch(&mut broker.publisher().await, "share", (0..10).map(|i| message(format!("{i}"))).collect()).await;
    let mut consumer = broker.consumer().await;
    let mut a = Session::open(&mut consumer, "share", 4).await;
    let mut b = Session::open(&mut consumer, "share", 4).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(a.delivery().await.payload);
        seen.push(b.delivery().await.payload);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 8, "no message goes to two consumers");
    // A disconnects holding 4: they are redelivered at once (not after the
    // 30 s lease), without counting an attempt.
    drop(a);
    let mut c = Session::open(&mut consumer, "share", 10).await;
    let mut redelivered = Vec::new();
    for _ in 0..6 {
        let d = c.delivery().await;
        redelivered.push(d.attempt);
    }
    assert!(redelivered.iter().all(|&a| a == 1), "released leases keep their attempt: {redelivered:?}");
}

#[tokio::test]
async fn nack_with_delay_redelivers_after_the_delay() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "n", queue_settings()).await;
    publish(&mut broker.publisher().await, "n", message("retry me")).await;
    let mut session = Session::open(&mut broker.consumer().await, "n", 10).await;
    let first = session.delivery().await;
    assert_eq!(first.attempt, 1);
    let nacked_at = Instant::now();
    session.nack(first.delivery_id, 700, "downstream timeout").await;
    session.expect_silence(Duration::from_millis(500)).await;
    let second = session.delivery().await;
    assert!(nacked_at.elapsed() >= Duration::from_millis(700), "redelivered after {:?}", nacked_at.elapsed());
    assert_eq!(second.attempt, 2);
    assert_eq!(second.payload, first.payload);
    // An immediate nack redelivers at once.
    session.nack(second.delivery_id, 0, "again").await;
    let third = session.delivery().await;
    assert_eq!(third.attempt, 3);
    session.ack(vec![third.delivery_id]).await;
    session.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn lease_expiry_redelivers_with_the_next_attempt() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { lease_timeout_ms: Some(300), ..queue_settings() };
    create(&mut broker.admin().await, "l", settings).await;
    publish(&mut broker.publisher().await, "l", message("slow")).await;
    let mut session = Session::open(&mut broker.consumer().await, "l", 10).await;
    let first = session.delivery().await;
    let start = Instant::now();
    let second = session.delivery().await;
    assert!(start.elapsed() >= Duration::from_millis(250), "redelivered after {:?}", start.elapsed());
    assert_eq!(second.attempt, 2);
    assert_ne!(second.delivery_id, first.delivery_id);
    // The expired delivery can no longer be acked.
    session.ack(vec![first.delivery_id]).await;
    match session.next_within(Duration::from_secs(5)).await {
        Some(Ok(pb::consume_response::Kind::Rejected(r))) => assert_eq!(r.delivery_id, first.delivery_id),
        other => panic!("expected a rejection of the expired delivery, got {other:?}"),
    }
    session.ack(vec![second.delivery_id]).await;
    session.expect_silence(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn dead_letter_after_max_attempts() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { max_attempts: Some(3), ..queue_settings() };
    create(&mut broker.admin().await, "d", settings).await;
    let mut message = message("poison");
    message.headers.insert("trace".into(), "t-1".into());
    publish(&mut broker.publisher().await, "d", message).await;
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "d", 10).await;
    for attempt in 1..=3 {
        let d = session.delivery().await;
        assert_eq!(d.attempt, attempt);
        session.nack(d.delivery_id, 0, &format!("failure {attempt}")).await;
    }
    session.expect_silence(Duration::from_millis(300)).await;
    let mut admin = broker.admin().await;
    assert_eq!(depth(&mut admin, "d").await, 0);
    assert_eq!(depth(&mut admin, "d.dead").await, 1);
    let mut dead = Session::open(&mut consumer, "d.dead", 1).await;
    let d = dead.delivery().await;
    assert_eq!(&d.payload[..], b"poison");
    assert_eq!(d.headers.get("trace").map(String::as_str), Some("t-1"));
    assert_eq!(d.headers.get("ballast-attempts").map(String::as_str), Some("3"));
    assert_eq!(d.headers.get("ballast-dead-letter-reason").map(String::as_str), Some("failure 3"));
    assert_eq!(d.headers.get("ballast-source-queue").map(String::as_str), Some("d"));
}

#[tokio::test]
async fn delayed_messages_wait() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "later", queue_settings()).await;
    let mut publisher = broker.publisher().await;
    let published = Instant::now();
    publish(&mut publisher, "later", pb::Message { delay_ms: 800, ..message("later") }).await;
    publish(&mut publisher, "later", message("now")).await;
    let mut session = Session::open(&mut broker.consumer().await, "later", 10).await;
    assert_eq!(&session.delivery().await.payload[..], b"now");
    let d = session.delivery().await;
    assert!(published.elapsed() >= Duration::from_millis(800), "delivered after {:?}", published.elapsed());
    assert_eq!(&d.payload[..], b"later");
    assert!(d.headers.is_empty(), "reserved headers are not delivered: {:?}", d.headers);
}

#[tokio::test]
async fn pull_long_polls_and_ack_is_unary() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "p", queue_settings()).await;
    let mut consumer = broker.consumer().await;
    // Empty queue: waits, then returns nothing.
    let start = Instant::now();
    let empty = consumer.pull(pb::PullRequest { queue: "p".into(), max_messages: 5, wait_ms: 300 }).await.unwrap();
    assert!(empty.into_inner().deliveries.is_empty());
    assert!(start.elapsed() >= Duration::from_millis(250));
    // A publish during the wait ends it.
    let broker_addr = broker.endpoint();
    let publisher_task = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut publisher = ballast_proto::v1::publisher_client::PublisherClient::connect(broker_addr).await.unwrap();
        publish_batch(&mut publisher, "p", (0..3).map(|i| message(format!("{i}"))).collect()).await;
    });
    let got = consumer
        .pull(pb::PullRequest { queue: "p".into(), max_messages: 5, wait_ms: 10_000 })
        .await
        .unwrap()
        .into_inner();
    publisher_task.await.unwrap();
    assert!(!got.deliveries.is_empty());
    let mut ids: Vec<u64> = got.deliveries.iter().map(|d| d.delivery_id).collect();
    if ids.len() < 3 {
        let more = consumer.pull(pb::PullRequest { queue: "p".into(), max_messages: 5, wait_ms: 1000 }).await.unwrap();
        ids.extend(more.into_inner().deliveries.iter().map(|d| d.delivery_id));
    }
    assert_eq!(ids.len(), 3);
    consumer.ack(pb::AckRequest { queue: "p".into(), delivery_ids: ids.clone() }).await.unwrap();
    assert_eq!(depth(&mut broker.admin().await, "p").await, 0);
    // Acking twice is an error.
    assert_status(
        consumer.ack(pb::AckRequest { queue: "p".into(), delivery_ids: ids }).await,
        tonic::Code::FailedPrecondition,
        "not leased",
    );
}

/// A client that sends more nacks than STREAM_NACKS_IN_FLIGHT_MAX plus the
/// stream's response buffer before it reads anything is held back, and once
/// it reads, every rejection arrives and the stream still delivers: the
/// nack limit does not deadlock a stream. (The bound itself, at most that
/// many nack tasks at once, is not observable from outside and is not
/// asserted here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flooding_nacks_is_held_back_and_recovers() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "n", queue_settings()).await;
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "n", 1).await;
    // More than the limit plus everything the response channel buffers.
    const NACKS: u64 = 12_000;
    let sender = session.sender();
    let flood = tokio::spawn(async move {
        for id in 0..NACKS {
            let nack = pb::Nack { delivery_id: 1_000_000 + id, delay_ms: 0, reason: "flood".into() };
            let request = pb::ConsumeRequest { kind: Some(pb::consume_request::Kind::Nack(nack)) };
            sender.send(request).await.expect("stream open");
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut rejected = 0;
    while rejected < NACKS {
        match session.next_within(Duration::from_secs(10)).await {
            Some(Ok(pb::consume_response::Kind::Rejected(r))) => {
                assert_eq!(r.code, tonic::Code::FailedPrecondition as i32, "{r:?}");
                rejected += 1;
            }
            other => panic!("expected rejection {rejected} of {NACKS}, got {other:?}"),
        }
    }
    flood.await.unwrap();
    publish(&mut broker.publisher().await, "n", message("after")).await;
    assert_eq!(session.delivery().await.payload, "after".as_bytes());
}

/// Nacks sent just before the client half-closes its stream are applied before
/// the stream's leases are released: each counts its attempt (here the last
/// one, so every message is dead-lettered), none comes back as if it had
/// never been nacked.
#[tokio::test]
async fn nacks_sent_just_before_closing_the_stream_count() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { max_attempts: Some(1), ..queue_settings() };
    let mut admin = broker.admin().await;
    create(&mut admin, "closing", settings).await;
    let mut publisher = broker.publisher().await;
    for i in 0..50 {
        publish(&mut publisher, "closing", message(format!("m{i}"))).await;
    }
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "closing", 50).await;
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(session.delivery().await.delivery_id);
    }
    for id in ids {
        session.nack(id, 0, "closing").await;
    }
    // Done sending; the broker ends the stream once it has read the nacks.
    let mut responses = session.half_close();
    while let Ok(Some(_)) = responses.message().await {}
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (left, dead) = (depth(&mut admin, "closing").await, depth(&mut admin, "closing.dead").await);
        if dead == 50 {
            assert_eq!(left, 0, "every nacked message was dead-lettered");
            break;
        }
        assert!(Instant::now() < deadline, "{dead} of 50 dead-lettered, {left} left in the queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
