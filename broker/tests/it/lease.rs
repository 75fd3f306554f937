//! Lease extension on the consume stream and by the unary Extend: a lease
//! held is kept past its timeout; an expired, settled or foreign lease is
//! answered per id and left alone; the bounds. See: #15 item 1.

use std::time::Duration;

use ballast_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

fn extend(delivery_ids: Vec<u64>, lease_ms: u64) -> pb::consume_request::Kind {
    pb::consume_request::Kind::Extend(pb::Extend { delivery_ids, lease_ms })
}

/// The stream's answer to an extend, as (id, outcome, deadline) triples.
async fn extended(session: &mut Session) -> Vec<(u64, pb::ExtendOutcome, u64)> {
    match session.next_within(Duration::from_secs(10)).await {
        Some(Ok(pb::consume_response::Kind::Extended(e))) => {
            e.results.iter().map(|r| (r.delivery_id, r.outcome(), r.lease_deadline_ms)).collect()
        }
        other => panic!("expected an extended answer, got {other:?}"),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A delivery whose lease a stream extends is not redelivered when its
/// original lease (300 ms) runs out: another consumer waiting with credit
/// gets nothing, and the holder's ack then succeeds. The extension is
/// counted in `ballast_lease_extensions_total`.
#[tokio::test]
async fn an_extended_lease_outlives_its_timeout() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { lease_timeout_ms: Some(300), ..queue_settings() };
    create(&mut broker.admin().await, "long", settings).await;
    publish(&mut broker.publisher().await, "long", message("slow work")).await;
    let mut consumer = broker.consumer().await;
    let mut holder = Session::open(&mut consumer, "long", 1).await;
    let delivery = holder.delivery().await;
    assert_eq!(delivery.lease_ms, 300, "the delivery says how long its lease is");
    let before = now_ms();
    holder.send(extend(vec![delivery.delivery_id], 3000)).await;
    let results = extended(&mut holder).await;
    assert_eq!(results.len(), 1);
    let (id, outcome, deadline) = results[0];
    assert_eq!((id, outcome), (delivery.delivery_id, pb::ExtendOutcome::Extended));
    assert!(deadline >= before + 3000 && deadline <= now_ms() + 3000, "deadline {deadline} is 3 s from the extend");
    // Well past the original lease: still held, so not redelivered.
    let mut waiting = Session::open(&mut consumer, "long", 1).await;
    waiting.expect_silence(Duration::from_millis(1000)).await;
    holder.ack(vec![delivery.delivery_id]).await;
    holder.expect_silence(Duration::from_millis(200)).await;
    assert_eq!(stats(&broker, "long").await.in_flight, 0, "the ack of the extended lease applied");
    let text = broker.scrape();
    assert_eq!(sample(&text, "ballast_lease_extensions_total", r#"queue="long",lane="normal""#), Some(1.0));
}

/// One extend naming an acked lease, another stream's lease, a lease
/// taken back after expiry and an id never issued answers NOT_LEASED for
/// each and changes none of them; its own live lease in the same call is
/// extended. The foreign lease still expires on time and is redelivered.
#[tokio::test]
async fn extending_a_settled_foreign_or_expired_lease_changes_nothing() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { lease_timeout_ms: Some(400), ..queue_settings() };
    create(&mut broker.admin().await, "mixed", settings).await;
    let mut publisher = broker.publisher().await;
    for i in 0..3 {
        publish(&mut publisher, "mixed", message(format!("m{i}"))).await;
    }
    let mut consumer = broker.consumer().await;
    let mut mine = Session::open(&mut consumer, "mixed", 2).await;
    let (acked, live) = (mine.delivery().await, mine.delivery().await);
    let mut theirs = Session::open(&mut consumer, "mixed", 1).await;
    let foreign = theirs.delivery().await;
    mine.ack(vec![acked.delivery_id]).await;
    mine.send(extend(vec![acked.delivery_id, foreign.delivery_id, live.delivery_id, 12345], 60_000)).await;
    let results = extended(&mut mine).await;
    let outcomes: Vec<_> = results.iter().map(|&(id, outcome, _)| (id, outcome)).collect();
    assert_eq!(
        outcomes,
        vec![
            (acked.delivery_id, pb::ExtendOutcome::NotLeased),
            (foreign.delivery_id, pb::ExtendOutcome::NotLeased),
            (live.delivery_id, pb::ExtendOutcome::Extended),
            (12345, pb::ExtendOutcome::NotLeased),
        ]
    );
    assert!(results.iter().filter(|r| r.1 != pb::ExtendOutcome::Extended).all(|r| r.2 == 0), "no deadline");
    // The foreign lease was not extended: it expires and is redelivered.
    theirs.credit(1).await;
    let again = theirs.delivery().await;
    assert_eq!((again.payload.as_ref(), again.attempt), (foreign.payload.as_ref(), 2));
    // Its old id is now an expired lease, taken back: NOT_LEASED, and the
    // redelivery's lease is untouched.
    theirs.send(extend(vec![foreign.delivery_id], 60_000)).await;
    assert_eq!(extended(&mut theirs).await[0].1, pb::ExtendOutcome::NotLeased);
    let queue = stats(&broker, "mixed").await;
    assert_eq!(queue.in_flight, 2, "the live lease and the redelivery");
}

/// The unary Extend keeps a Pull lease: a Pull waiting past the original
/// lease gets nothing, the extended lease is acked afterwards; an id the
/// caller never got is NOT_LEASED in the same answer.
#[tokio::test]
async fn unary_extend_keeps_a_pull_lease() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { lease_timeout_ms: Some(300), ..queue_settings() };
    create(&mut broker.admin().await, "pulled", settings).await;
    publish(&mut broker.publisher().await, "pulled", message("job")).await;
    let mut consumer = broker.consumer().await;
    let pull = pb::PullRequest { queue: "pulled".into(), max_messages: 1, wait_ms: 1000 };
    let pulled = consumer.pull(pull.clone()).await.unwrap().into_inner().deliveries;
    assert_eq!(pulled.len(), 1);
    let id = pulled[0].delivery_id;
    let request = pb::ExtendRequest { queue: "pulled".into(), delivery_ids: vec![id, 7], lease_ms: 5000 };
    let results = consumer.extend(request).await.unwrap().into_inner().results;
    let outcomes: Vec<_> = results.iter().map(|r| (r.delivery_id, r.outcome())).collect();
    assert_eq!(outcomes, vec![(id, pb::ExtendOutcome::Extended), (7, pb::ExtendOutcome::NotLeased)]);
    // A whole second waited past the 300 ms lease: nothing to pull.
    let later = consumer.pull(pb::PullRequest { wait_ms: 1000, ..pull }).await.unwrap().into_inner().deliveries;
    assert!(later.is_empty(), "the extended lease was redelivered: {later:?}");
    consumer.ack(pb::AckRequest { queue: "pulled".into(), delivery_ids: vec![id] }).await.unwrap();
    // lease_ms 0: the queue's lease, from now.
    let request = pb::ExtendRequest { queue: "pulled".into(), delivery_ids: vec![id], lease_ms: 0 };
    let results = consumer.extend(request).await.unwrap().into_inner().results;
    assert_eq!(results[0].outcome(), pb::ExtendOutcome::NotLeased, "acked");
}

/// An extend's lease is bounded like a queue's lease_timeout_ms (10 ms ..=
/// 12 h) and its ids like an ack's (1..=10,000): at each limit it is
/// served, one past it INVALID_ARGUMENT; an unknown queue NOT_FOUND.
/// On a stream, a bad extend ends the stream with the same status.
#[tokio::test]
async fn extend_bounds_at_the_limit_and_past() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "bounds", queue_settings()).await;
    let mut consumer = broker.consumer().await;
    let call =
        |delivery_ids: Vec<u64>, lease_ms: u64| pb::ExtendRequest { queue: "bounds".into(), delivery_ids, lease_ms };
    for lease_ms in [10, 43_200_000] {
        let results = consumer.extend(call(vec![1], lease_ms)).await.unwrap().into_inner().results;
        assert_eq!(results[0].outcome(), pb::ExtendOutcome::NotLeased);
    }
    for lease_ms in [9, 43_200_001] {
        assert_status(consumer.extend(call(vec![1], lease_ms)).await, Code::InvalidArgument, "lease_ms");
    }
    let results = consumer.extend(call((1..=10_000).collect(), 1000)).await.unwrap().into_inner().results;
    assert_eq!(results.len(), 10_000);
    assert_status(consumer.extend(call((1..=10_001).collect(), 1000)).await, Code::InvalidArgument, "at most 10000");
    assert_status(consumer.extend(call(vec![], 1000)).await, Code::InvalidArgument, "at least one");
    let unknown = pb::ExtendRequest { queue: "nope".into(), delivery_ids: vec![1], lease_ms: 1000 };
    assert_status(consumer.extend(unknown).await, Code::NotFound, "nope");
    let mut session = Session::open(&mut consumer, "bounds", 1).await;
    session.send(extend(vec![1], 9)).await;
    match session.next_within(Duration::from_secs(10)).await {
        Some(Err(status)) => assert_eq!(status.code(), Code::InvalidArgument, "{status:?}"),
        other => panic!("expected the stream to end with INVALID_ARGUMENT, got {other:?}"),
    }
}
