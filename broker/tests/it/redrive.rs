//! Redrive: dead letters back to their source queue, exactly once even when
//! the redrive is killed midway and repeated. See: #15 item 2.

use std::{collections::BTreeSet, time::Duration};

use ballast_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

fn redrive(name: &str, max_messages: u64, reason: &str) -> pb::RedriveRequest {
    pb::RedriveRequest { name: name.into(), max_messages, reason: reason.into() }
}

/// Publishes `count` messages to `queue` (max_attempts 1) and nacks each
/// delivery with the reason its payload maps to, then waits until all are
/// shown in the dead-letter queue.
async fn dead_letters(broker: &BrokerProcess, queue: &str, messages: Vec<pb::Message>, reason: fn(&str) -> String) {
    let count = messages.len();
    let mut publisher = broker.publisher().await;
    for chunk in messages.chunks(100) {
        publish_batch(&mut publisher, queue, chunk.to_vec()).await;
    }
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, queue, count as u32).await;
    for _ in 0..count {
        let delivery = session.delivery().await;
        session.nack(delivery.delivery_id, 0, &reason(&String::from_utf8_lossy(&delivery.payload))).await;
    }
    let dead = format!("{queue}.dead");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let shown = shown(broker, &dead).await;
        if shown == count {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{dead} shows {shown} of {count}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Messages of `queue` Peek shows (durable, not done), all pages.
async fn shown(broker: &BrokerProcess, queue: &str) -> usize {
    let mut consumer = broker.consumer().await;
    let (mut count, mut start) = (0, None);
    loop {
        let request = pb::PeekRequest { queue: queue.into(), start, max_messages: 1000 };
        let page = consumer.peek(request).await.unwrap().into_inner();
        count += page.messages.len();
        match page.next {
            Some(next) => start = Some(next),
            None => return count,
        }
    }
}

/// Redrive by reason, up to N, then the rest: each dead letter comes back
/// once, on its source lane, with its application headers (not the
/// broker's) and attempts from 1; a repeat moves nothing; the dead-letter
/// queue ends empty. A queue without dead letters' queue, or a dead-letter
/// queue itself, is FAILED_PRECONDITION.
#[tokio::test]
async fn redrive_moves_each_dead_letter_back_once() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    let settings = pb::QueueSettings { max_attempts: Some(1), ..queue_settings() };
    create(&mut admin, "jobs", settings).await;
    let messages = (0..5)
        .map(|i| {
            let mut m = on_lane(format!("m{i}"), i % 3);
            m.headers.insert("tenant".into(), format!("t{i}"));
            m
        })
        .collect();
    dead_letters(&broker, "jobs", messages, |p| if p == "m1" || p == "m3" { "b".into() } else { "a".into() }).await;
    let by_reason = admin.redrive(redrive("jobs", 0, "b")).await.unwrap().into_inner();
    assert_eq!((by_reason.moved, by_reason.already_moved, by_reason.skipped_leased), (2, 0, 0));
    let one = admin.redrive(redrive("jobs", 1, "")).await.unwrap().into_inner();
    assert_eq!(one.moved, 1);
    let rest = admin.redrive(redrive("jobs", 0, "")).await.unwrap().into_inner();
    assert_eq!(rest.moved, 2);
    let again = admin.redrive(redrive("jobs", 0, "")).await.unwrap().into_inner();
    assert_eq!((again.moved, again.already_moved), (0, 0), "nothing left to move");
    assert_eq!(shown(&broker, "jobs.dead").await, 0);
    let mut session = Session::open(&mut broker.consumer().await, "jobs", 5).await;
    let mut seen = BTreeSet::new();
    for _ in 0..5 {
        let d = session.delivery().await;
        let payload = String::from_utf8_lossy(&d.payload).into_owned();
        let i: u32 = payload[1..].parse().unwrap();
        assert_eq!(d.attempt, 1, "{payload}: attempts start again");
        assert_eq!(d.id.unwrap().lane, i % 3, "{payload}: its source lane");
        assert_eq!(d.headers.get("tenant"), Some(&format!("t{i}")), "{payload}: its headers");
        assert!(d.headers.keys().all(|k| !k.starts_with("ballast-")), "{payload}: no broker headers: {:?}", d.headers);
        assert!(d.idempotency_key.starts_with("ballast-redrive:"), "{}", d.idempotency_key);
        assert!(seen.insert(payload));
    }
    session.expect_silence(Duration::from_millis(200)).await;
    let text = broker.scrape();
    let redriven: f64 = ["high", "normal", "low"]
        .iter()
        .map(|lane| {
            sample(&text, "ballast_redriven_messages_total", &format!("queue=\"jobs\",lane=\"{lane}\"")).unwrap_or(0.0)
        })
        .sum();
    assert_eq!(redriven, 5.0, "counted in ballast_redriven_messages_total");
    assert_status(admin.redrive(redrive("jobs.dead", 0, "")).await, Code::FailedPrecondition, "no dead-letter queue");
    assert_status(admin.redrive(redrive("nope", 0, "")).await, Code::NotFound, "nope");
}

/// A redrive of 600 dead letters killed (-9) as soon as copies appear in
/// the source queue, then repeated after the restart: every message is in
/// the source queue exactly once and the dead-letter queue is empty; the
/// repeat reports what the first run had stored as already moved.
#[tokio::test]
async fn a_redrive_killed_midway_and_repeated_moves_each_once() {
    const COUNT: usize = 600;
    let mut broker = BrokerProcess::start();
    let settings = pb::QueueSettings { max_attempts: Some(1), ..queue_settings() };
    create(&mut broker.admin().await, "crash", settings).await;
    let messages = (0..COUNT).map(|i| message(format!("m{i}"))).collect();
    dead_letters(&broker, "crash", messages, |_| "bug".into()).await;
    let mut admin = broker.admin().await;
    let running = tokio::spawn(async move { admin.redrive(redrive("crash", 0, "")).await });
    let mut watcher = broker.admin().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while depth(&mut watcher, "crash").await == 0 {
        assert!(std::time::Instant::now() < deadline, "no copy was ever stored");
    }
    broker.kill();
    let first = running.await.unwrap();
    broker.restart();
    let second = broker.admin().await.redrive(redrive("crash", 0, "")).await.unwrap().into_inner();
    eprintln!("first run: {first:?}; second: {second:?}");
    assert_eq!(shown(&broker, "crash.dead").await, 0, "every dead letter acked");
    let mut session = Session::open(&mut broker.consumer().await, "crash", COUNT as u32).await;
    let mut seen = BTreeSet::new();
    for _ in 0..COUNT {
        let d = session.delivery().await;
        assert!(seen.insert(d.payload.clone()), "moved twice: {:?}", d.payload);
    }
    session.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(seen.len(), COUNT, "none lost");
    if let Ok(first) = first {
        assert_eq!(first.into_inner().moved as usize, COUNT, "the first run finished before the kill");
    } else {
        assert!(second.moved < COUNT as u64 || second.already_moved > 0, "{second:?}");
    }
}
