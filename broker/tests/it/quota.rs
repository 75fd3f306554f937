//! Publish quotas (`max_publish_rate`, `max_publish_byte_rate`): producers
//! over a queue's quota are slowed to it, calls too far behind are refused
//! after their lane's wait, and other queues are not throttled.

use std::time::{Duration, Instant};

use ballast_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

/// 200 msg/s with a 100 ms burst allowance: 300 messages in calls of 10,
/// from three producers at once, cannot take less than about 1.4 s, and
/// none is refused (a call's turn is at most a few calls away, well within
/// the lane's wait). A queue without a quota, published to at the same
/// time, is never throttled. Three producers keep the quota's line longer
/// than any call's own time on a loaded machine, so calls must wait for
/// their turn however slow the machine is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_over_the_quota_are_slowed_to_it_and_other_queues_are_not() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    let quota =
        pb::QueueSettings { max_publish_rate: Some(200), sync_policy: pb::SyncPolicy::None as i32, ..queue_settings() };
    create(&mut admin, "metered", quota).await;
    create(&mut admin, "free", queue_settings()).await;
    let batch = || (0..10).map(|i| message(format!("m{i}"))).collect::<Vec<_>>();

    let free = {
        let mut publisher = broker.publisher().await;
        tokio::spawn(async move {
            for _ in 0..30 {
                publish_batch(&mut publisher, "free", batch()).await;
            }
        })
    };
    let producers = 3;
    let started = Instant::now();
    let mut metered = Vec::new();
    for _ in 0..producers {
        let mut publisher = broker.publisher().await;
        metered.push(tokio::spawn(async move {
            for _ in 0..10 {
                publish_batch(&mut publisher, "metered", batch()).await;
            }
        }));
    }
    for producer in metered {
        producer.await.unwrap();
    }
    let elapsed = started.elapsed();
    free.await.unwrap();
    // The first 100 ms of quota (20 messages, plus one call) go at once;
    // the other 270 messages are spaced 5 ms apart.
    assert!(elapsed >= Duration::from_millis(1350), "300 messages at 200/s took {elapsed:?}");

    let metered = stats(&broker, "metered").await;
    assert_eq!(metered.saturation.unwrap().depth, 300, "every message stored");
    assert_eq!(metered.refused_publish_rate, 0);
    // Past the burst, the three producers' calls line up for their turns:
    // at least the 1.35 s of quota the run spent beyond its burst is spent
    // waiting by some caller (the rest is the calls' own time, at most a
    // third of it each); waits happen side by side, at most three at once.
    assert!(metered.throttled_calls >= 10, "calls past the burst waited: {}", metered.throttled_calls);
    assert!(metered.throttled_ms >= 300, "waits added up to {} ms", metered.throttled_ms);
    let run_ms = elapsed.as_millis() as u64;
    assert!(
        metered.throttled_ms <= producers * run_ms,
        "{} ms of waits by {producers} callers in {run_ms} ms",
        metered.throttled_ms
    );
    let free = stats(&broker, "free").await;
    assert_eq!(free.saturation.unwrap().depth, 300);
    assert_eq!((free.throttled_calls, free.refused_publish_rate), (0, 0), "the quota is the metered queue's alone");

    let text = broker.scrape();
    let throttled = sample(&text, "ballast_publish_throttle_seconds_count", "queue=\"metered\",lane=\"normal\"");
    assert_eq!(throttled, Some(metered.throttled_calls as f64), "{text}");
    assert!(text.contains("# TYPE ballast_publish_throttle_seconds histogram"));
}

/// A call whose turn is further away than its lane may wait (its admission
/// fraction of 1 s) is refused once it has waited that long, with
/// RESOURCE_EXHAUSTED, the reason, a retry-after for the rest of the wait,
/// and nothing stored; a higher lane waits longer before the same refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_too_far_behind_the_quota_is_refused_after_its_lanes_wait() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "slow", pb::QueueSettings { max_publish_rate: Some(10), ..queue_settings() }).await;
    let mut publisher = broker.publisher().await;
    // An idle queue takes any batch at once: 100 messages, 10 s of quota.
    let charged = Instant::now();
    publish_batch(&mut publisher, "slow", (0..100).map(|i| on_lane(format!("{i}"), 0)).collect()).await;

    let started = Instant::now();
    let status = publisher
        .publish(pb::PublishRequest { queue: "slow".into(), message: Some(on_lane("late", 2)) })
        .await
        .expect_err("its turn is ~9.9 s away");
    let waited = started.elapsed();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(waited >= Duration::from_millis(700), "low waits 70% of 1 s before the refusal, waited {waited:?}");
    let meta = status.metadata();
    let get = |key: &str| meta.get(key).unwrap_or_else(|| panic!("metadata {key}")).to_str().unwrap().to_owned();
    assert_eq!(get("ballast-reason"), "publish_rate");
    assert_eq!(get("ballast-lane"), "low");
    // The call's turn was 9.9 s after the batch was charged, less the time
    // since; it waited 0.7 s of that. However slow the machine, the hint
    // is what was left (200 ms of slack for the clocks of two processes).
    let retry_after: u64 = get("retry-after-ms").parse().unwrap();
    let since_charged = (started - charged).as_millis() as u64;
    let expected = (9_200u64.saturating_sub(since_charged + 200))..=9_300;
    assert!(expected.contains(&retry_after), "the rest of the ~9.9 s wait: {retry_after} ms, not in {expected:?}");
    for needle in ["max_publish_rate 10 messages/s", "lane low", "at most 700 ms", "Retry after"] {
        assert!(status.message().contains(needle), "{needle:?} in {}", status.message());
    }

    let started = Instant::now();
    let status = publisher
        .publish(pb::PublishRequest { queue: "slow".into(), message: Some(on_lane("late", 0)) })
        .await
        .expect_err("high is refused too, later");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(started.elapsed() >= Duration::from_millis(1000), "high waits all of 1 s: {:?}", started.elapsed());

    let s = stats(&broker, "slow").await;
    assert_eq!(s.saturation.unwrap().depth, 100, "refused calls stored nothing");
    assert_eq!(s.refused_publish_rate, 2);
    assert_eq!(s.refused_queue_full, 0);
    let text = broker.scrape();
    let refused = |lane: &str| {
        sample(
            &text,
            "ballast_refused_publishes_total",
            &format!("queue=\"slow\",lane=\"{lane}\",reason=\"publish_rate\""),
        )
    };
    assert_eq!((refused("low"), refused("high")), (Some(1.0), Some(1.0)), "{text}");
}

/// The byte quota counts stored bytes; the settings come back from
/// GetQueue, and the refusal names the byte quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_quota_counts_stored_bytes() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    let settings = pb::QueueSettings { max_publish_byte_rate: Some(10_000), ..queue_settings() };
    let info = create(&mut admin, "bytes", settings).await;
    let settings = info.settings.unwrap();
    assert_eq!((settings.max_publish_rate, settings.max_publish_byte_rate), (Some(0), Some(10_000)));
    // Dead letters are appended by the broker: the dead-letter queue has no quota.
    let dead = admin.get_queue(pb::GetQueueRequest { name: "bytes.dead".into() }).await.unwrap().into_inner();
    assert_eq!(dead.settings.unwrap().max_publish_byte_rate, Some(0));
    let mut publisher = broker.publisher().await;
    // 100 KiB of payload: ten seconds of quota, taken at once by the idle
    // queue, so the next call's turn is far more than its lane's 0.9 s away
    // even if this machine takes seconds between the calls.
    publish(&mut publisher, "bytes", message(vec![b'x'; 100 * 1024])).await;
    let status = publisher
        .publish(pb::PublishRequest { queue: "bytes".into(), message: Some(message("small")) })
        .await
        .expect_err("~10 s of byte quota ahead");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("max_publish_byte_rate 10000 bytes/s"), "{}", status.message());
    assert!(!status.message().contains("max_publish_rate"), "{}", status.message());
}

/// Lanes keep their priority inside the quota: a low-lane flood that has
/// taken ten seconds of quota does not hold up the high and normal lanes
/// (their calls are stored), while more low-lane calls are refused. A
/// high-lane flood, in turn, is charged to the lanes below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_keep_their_priority_inside_the_quota() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "prio", pb::QueueSettings { max_publish_rate: Some(10), ..queue_settings() }).await;
    let mut publisher = broker.publisher().await;
    publish_batch(&mut publisher, "prio", (0..100).map(|i| on_lane(format!("{i}"), 2)).collect()).await;
    publish(&mut publisher, "prio", on_lane("urgent", 0)).await;
    publish(&mut publisher, "prio", on_lane("normal", 1)).await;
    let status = publisher
        .publish(pb::PublishRequest { queue: "prio".into(), message: Some(on_lane("more low", 2)) })
        .await
        .expect_err("low has ~10 s of quota ahead of it");
    assert_eq!(status.metadata().get("ballast-reason").unwrap(), "publish_rate");

    // High takes 10 s of quota: normal is charged it, so normal is refused.
    publish_batch(&mut publisher, "prio", (0..100).map(|i| on_lane(format!("h{i}"), 0)).collect()).await;
    let status = publisher
        .publish(pb::PublishRequest { queue: "prio".into(), message: Some(on_lane("late", 1)) })
        .await
        .expect_err("the high lane's flood is charged to normal");
    assert_eq!(status.metadata().get("ballast-lane").unwrap(), "normal");
    let s = stats(&broker, "prio").await;
    assert_eq!(s.saturation.unwrap().depth, 202);
    assert_eq!(s.refused_publish_rate, 2);
}
