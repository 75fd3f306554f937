//! UpdateQueue: settings changed on a live queue take effect at once, are
//! durable (also across a kill -9 in the middle of updates) and audited;
//! the settings a live queue is built on are refused. See: #15 item 4.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use ballast_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

fn update(name: &str, settings: pb::QueueSettings) -> pb::UpdateQueueRequest {
    pb::UpdateQueueRequest { name: name.into(), settings: Some(settings) }
}

async fn settings_of(broker: &BrokerProcess, name: &str) -> pb::QueueSettings {
    let info = broker.admin().await.get_queue(pb::GetQueueRequest { name: name.into() }).await.unwrap();
    info.into_inner().settings.expect("resolved settings")
}

/// An update changes only what it names, answers with the settings in
/// force, applies at once (the next delivery's lease is the new lease
/// timeout; the lowered max_attempts dead-letters on the next nack), is
/// written to an audit line naming the changed keys, and is still in force
/// after a kill -9 and restart.
#[tokio::test]
async fn an_update_applies_at_once_and_survives_a_crash() {
    let mut broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "live", queue_settings()).await;
    let before = settings_of(&broker, "live").await;
    let changes = pb::QueueSettings { lease_timeout_ms: Some(700), max_attempts: Some(1), ..Default::default() };
    let info = admin.update_queue(update("live", changes)).await.unwrap().into_inner();
    let after = info.settings.expect("settings");
    assert_eq!((after.lease_timeout_ms, after.max_attempts), (Some(700), Some(1)));
    let unchanged = pb::QueueSettings {
        lease_timeout_ms: before.lease_timeout_ms,
        max_attempts: before.max_attempts,
        ..after.clone()
    };
    assert_eq!(unchanged, before, "nothing else changed");
    publish(&mut broker.publisher().await, "live", message("m")).await;
    let mut session = Session::open(&mut broker.consumer().await, "live", 1).await;
    let delivery = session.delivery().await;
    assert_eq!(delivery.lease_ms, 700, "the new lease timeout applies to the next delivery");
    session.nack(delivery.delivery_id, 0, "broken").await;
    let mut dead = Session::open(&mut broker.consumer().await, "live.dead", 1).await;
    assert_eq!(dead.delivery().await.payload.as_ref(), b"m", "dead-lettered after its one attempt");
    let log = std::fs::read_to_string(broker.data_dir.with_extension("log")).unwrap();
    let audited =
        |needles: &[&str]| log.lines().any(|l| l.contains("ballast::audit") && needles.iter().all(|n| l.contains(n)));
    assert!(audited(&["\"live\"", "\"update\"", "\"ok\""]), "{log}");
    assert!(audited(&["settings updated", "lease_timeout_ms,max_attempts"]), "{log}");
    drop(session);
    drop(dead);
    broker.kill();
    broker.restart();
    let restarted = settings_of(&broker, "live").await;
    assert_eq!(restarted, after, "the update is durable");
}

/// Lanes (their names or order), weights, strict priority, dead letter,
/// message size and sync policy cannot change on a live
/// queue: INVALID_ARGUMENT naming the setting, and nothing of the update
/// applies. Given with the queue's own value they are accepted. Values are
/// validated as on create: max_attempts 1000 is taken, 1001 refused. An
/// unknown queue is NOT_FOUND.
#[tokio::test]
async fn fixed_settings_are_refused_and_change_nothing() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "fixed", queue_settings()).await;
    let before = settings_of(&broker, "fixed").await;
    let mut reordered = before.lanes.clone();
    reordered.reverse();
    let refused: Vec<(pb::QueueSettings, &str)> = vec![
        (pb::QueueSettings { lanes: reordered, ..Default::default() }, "lanes cannot change on a live queue"),
        (pb::QueueSettings { lanes: vec!["a".into()], ..Default::default() }, "lanes cannot change"),
        (pb::QueueSettings { lane_weights: vec![1, 1, 1], ..Default::default() }, "lane_weights cannot change"),
        (pb::QueueSettings { strict_priority: Some(true), ..Default::default() }, "strict_priority cannot change"),
        (pb::QueueSettings { dead_letter: Some(false), ..Default::default() }, "dead_letter cannot change"),
        (pb::QueueSettings { message_size_max: Some(1000), ..Default::default() }, "message_size_max cannot change"),
        (
            pb::QueueSettings { sync_policy: pb::SyncPolicy::None as i32, ..Default::default() },
            "sync_policy cannot change",
        ),
        (pb::QueueSettings { max_attempts: Some(1001), ..Default::default() }, "max_attempts"),
        (pb::QueueSettings { lane_admission: vec![1.0], ..Default::default() }, "lane_admission"),
    ];
    for (changes, needle) in refused {
        // Each refused change rides with a valid one, which must not apply.
        let changes = pb::QueueSettings { max_messages: Some(77), ..changes };
        assert_status(admin.update_queue(update("fixed", changes)).await, Code::InvalidArgument, needle);
    }
    assert_eq!(settings_of(&broker, "fixed").await, before, "no refused update changed anything");
    let same_fixed = pb::QueueSettings { max_attempts: Some(1000), ..before.clone() };
    let info = admin.update_queue(update("fixed", same_fixed)).await.expect("fixed settings at their own value");
    assert_eq!(info.into_inner().settings.unwrap().max_attempts, Some(1000));
    let unknown = update("nope", pb::QueueSettings { max_messages: Some(5), ..Default::default() });
    assert_status(admin.update_queue(unknown).await, Code::NotFound, "nope");
}

/// The dedupe window changes live: narrowed to 1 ms, a key published
/// before is new again; widened back, a repeated key is a duplicate.
#[tokio::test]
async fn the_dedupe_window_changes_live() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "keys", queue_settings()).await;
    let mut publisher = broker.publisher().await;
    let keyed = |key: &str| pb::Message { idempotency_key: key.into(), ..message("m") };
    assert!(!publish(&mut publisher, "keys", keyed("a")).await.duplicate);
    assert!(publish(&mut publisher, "keys", keyed("a")).await.duplicate, "within the 5 min window");
    let narrow = pb::QueueSettings { dedupe_window_ms: Some(1), ..Default::default() };
    admin.update_queue(update("keys", narrow)).await.unwrap();
    // Not waiting for a state: the narrowed window itself must pass.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(!publish(&mut publisher, "keys", keyed("a")).await.duplicate, "past the narrowed window");
    let wide = pb::QueueSettings { dedupe_window_ms: Some(600_000), ..Default::default() };
    admin.update_queue(update("keys", wide)).await.unwrap();
    assert!(!publish(&mut publisher, "keys", keyed("b")).await.duplicate);
    assert!(publish(&mut publisher, "keys", keyed("b")).await.duplicate, "within the widened window");
    assert_eq!(settings_of(&broker, "keys").await.dedupe_window_ms, Some(600_000));
}

/// An update racing publishes: four producers publish one message at a
/// time while max_messages drops from 1,000,000 to 300 (the normal lane
/// admits up to 90%: 270). Every publish is stored or refused as queue
/// full, none fails otherwise; refusals start, and the depth ends at most
/// 270 plus the four publishes that may have been admitted under the old
/// limit while the update ran.
#[tokio::test]
async fn an_update_racing_publishes_holds_the_new_limit() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "racing", queue_settings()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let stored = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut producers = Vec::new();
    for p in 0..4 {
        let mut publisher = broker.publisher().await;
        let (stop, stored, refused) = (Arc::clone(&stop), Arc::clone(&stored), Arc::clone(&refused));
        producers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let request = pb::PublishRequest { queue: "racing".into(), message: Some(message(format!("{p}-{i}"))) };
                match publisher.publish(request).await {
                    Ok(_) => stored.fetch_add(1, Ordering::Relaxed),
                    Err(status) => {
                        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                        refused.fetch_add(1, Ordering::Relaxed)
                    }
                };
                i += 1;
            }
        }));
    }
    let counted = Arc::clone(&stored);
    wait_until("100 stored", || counted.load(Ordering::Relaxed) >= 100).await;
    let changes = pb::QueueSettings { max_messages: Some(300), ..Default::default() };
    admin.update_queue(update("racing", changes)).await.expect("updated while publishing");
    let counted = Arc::clone(&refused);
    wait_until("refusals under the new limit", || counted.load(Ordering::Relaxed) >= 20).await;
    stop.store(true, Ordering::Relaxed);
    for producer in producers {
        producer.await.expect("no publish failed other than as queue full");
    }
    let depth = depth(&mut admin, "racing").await;
    assert_eq!(depth, stored.load(Ordering::Relaxed), "every stored publish is counted");
    assert!(depth <= 270 + 4, "depth {depth} past the new limit");
    assert!(depth >= 270, "publishes were admitted up to the new limit: {depth}");
}

/// kill -9 while updates are being written: after the restart the queue
/// opens (not damaged) with the last answered update's settings or the
/// one that was in flight, never a mix or a torn file.
#[tokio::test]
async fn a_crash_during_updates_leaves_the_old_or_the_new_settings() {
    let mut broker = BrokerProcess::start();
    create(&mut broker.admin().await, "torn", queue_settings()).await;
    let answered = Arc::new(AtomicU32::new(0));
    let mut admin = broker.admin().await;
    let last = Arc::clone(&answered);
    let updater = tokio::spawn(async move {
        // Values 2, 3, 4, ...: max_attempts and max_messages move together,
        // so a mix of two updates would show.
        for value in 2u32.. {
            let changes = pb::QueueSettings {
                max_attempts: Some(value),
                max_messages: Some(u64::from(value)),
                ..Default::default()
            };
            if admin.update_queue(update("torn", changes)).await.is_err() {
                return;
            }
            last.store(value, Ordering::Release);
        }
    });
    let counted = Arc::clone(&answered);
    wait_until("20 updates answered", || counted.load(Ordering::Acquire) >= 21).await;
    broker.kill();
    // Read once the updater has ended: its last answered value is final.
    updater.await.unwrap();
    let answered = answered.load(Ordering::Acquire);
    broker.restart();
    let info = broker.admin().await.get_queue(pb::GetQueueRequest { name: "torn".into() }).await.unwrap().into_inner();
    assert!(info.damaged.is_empty(), "{}", info.damaged);
    let settings = info.settings.unwrap();
    let value = settings.max_attempts.unwrap();
    assert!(value == answered || value == answered + 1, "max_attempts {value}; last answered {answered}");
    assert_eq!(settings.max_messages, Some(u64::from(value)), "one update's settings, whole");
}
