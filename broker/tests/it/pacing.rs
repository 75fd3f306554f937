//! Delivery pacing: a queue's `max_delivery_rate` holds for all its
//! consumers together, however many attach and leave, with the lanes'
//! weights inside it; Stats and metrics show when and how much delivery is
//! held back. See: #15 item 5.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ballast_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

/// Deliveries per lane (0 and 2) counted by the consumers.
type Counts = Arc<[AtomicU64; 3]>;

/// One consumer of `queue` from `from` to `until`: it acks every delivery
/// at once and tops its credit up, counting deliveries received before
/// `window_end` per lane.
async fn consumer(broker: Arc<BrokerProcess>, from: Instant, until: Instant, window_end: Instant, counts: Counts) {
    tokio::time::sleep_until(from.into()).await;
    let mut session = Session::open(&mut broker.consumer().await, "paced", 50).await;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        match session.next_within(left).await {
            Some(Ok(pb::consume_response::Kind::Delivery(delivery))) => {
                if Instant::now() < window_end {
                    let lane = delivery.id.expect("an id").lane as usize;
                    counts[lane].fetch_add(1, Ordering::Relaxed);
                }
                session.ack(vec![delivery.delivery_id]).await;
                session.credit(1).await;
            }
            None => return,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
}

/// At 200 deliveries/s, consumers joining and leaving over a 5 s window
/// (one, then three, then four, then two) together receive 1,000 ± 10%;
/// the high lane gets about 4 of every 5 (weights 4 and 1 inside the
/// pace). Meanwhile Stats say the queue is paced and how much the pace
/// holds back, and the metrics count the time paced. Raised to none by
/// UpdateQueue, the rest of the backlog drains at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_rate_holds_while_consumers_join_and_leave() {
    let broker = Arc::new(BrokerProcess::start());
    let mut admin = broker.admin().await;
    let settings = pb::QueueSettings { max_delivery_rate: Some(200), ..queue_settings() };
    let info = create(&mut admin, "paced", settings).await;
    assert_eq!(info.settings.unwrap().max_delivery_rate, Some(200));
    let mut publisher = broker.publisher().await;
    for lane in [0, 2] {
        for _ in 0..2 {
            publish_batch(&mut publisher, "paced", (0..500).map(|i| on_lane(format!("m{i}"), lane)).collect()).await;
        }
    }
    let counts: Counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let start = Instant::now() + Duration::from_millis(200);
    let at = |ms: u64| start + Duration::from_millis(ms);
    let window_end = at(5000);
    let plan = [(0, 5000), (1000, 3000), (1000, 5000), (2000, 4000)];
    let consumers: Vec<_> = plan
        .iter()
        .map(|&(from, until)| {
            tokio::spawn(consumer(Arc::clone(&broker), at(from), at(until), window_end, Arc::clone(&counts)))
        })
        .collect();
    tokio::time::sleep_until(at(2500).into()).await;
    let during = stats(&broker, "paced").await;
    assert!(during.paced, "{during:?}");
    assert!(during.paced_held_back > 0, "{during:?}");
    for consumer in consumers {
        consumer.await.unwrap();
    }
    let (high, low) = (counts[0].load(Ordering::Relaxed), counts[2].load(Ordering::Relaxed));
    let delivered = high + low;
    assert!((900..=1100).contains(&delivered), "{delivered} deliveries in 5 s at 200/s");
    let share = high as f64 / delivered as f64;
    assert!((0.7..=0.9).contains(&share), "the high lane got {high} of {delivered}");
    let after = stats(&broker, "paced").await;
    assert!(after.paced_ms >= 3000, "{after:?}");
    let metrics = broker.scrape();
    let paced_seconds = sample(&metrics, "ballast_queue_paced_seconds_total", r#"queue="paced""#).unwrap_or(0.0);
    assert!(paced_seconds >= 3.0, "{metrics}");

    let unpaced = pb::QueueSettings { max_delivery_rate: Some(0), ..Default::default() };
    admin.update_queue(pb::UpdateQueueRequest { name: "paced".into(), settings: Some(unpaced) }).await.unwrap();
    let left = u32::try_from(depth(&mut admin, "paced").await).unwrap();
    assert!(left >= 900, "{left} left of 2000");
    let begun = Instant::now();
    let mut session = Session::open(&mut broker.consumer().await, "paced", left).await;
    for _ in 0..left {
        session.delivery().await;
    }
    assert!(begun.elapsed() < Duration::from_secs(4), "no pace: {left} in {:?}", begun.elapsed());
    assert!(!stats(&broker, "paced").await.paced);
}

/// The pace is bounded: at the limit (1,000,000/s) accepted, one past it
/// refused naming the key, on create and on update.
#[tokio::test]
async fn the_delivery_rate_is_bounded() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    let at_limit = pb::QueueSettings { max_delivery_rate: Some(1_000_000), ..queue_settings() };
    create(&mut admin, "fast", at_limit).await;
    let past = pb::QueueSettings { max_delivery_rate: Some(1_000_001), ..queue_settings() };
    let refused = admin.create_queue(pb::CreateQueueRequest { name: "faster".into(), settings: Some(past.clone()) });
    assert_status(refused.await, Code::InvalidArgument, "max_delivery_rate");
    let refused = admin.update_queue(pb::UpdateQueueRequest { name: "fast".into(), settings: Some(past) });
    assert_status(refused.await, Code::InvalidArgument, "max_delivery_rate");
}
