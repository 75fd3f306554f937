//! Message expiry: a queue's `message_ttl_ms` and a publish's `ttl_ms`. An
//! expired message is never delivered, whether it waits in its lane, is
//! leased when its deadline passes, or is delayed; it is dead-lettered with
//! reason `expired` or dropped, and counted. See: #15 item 3.

use std::time::Duration;

use ballast_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

/// Longest a queue's or message's TTL may be (MESSAGE_TTL_MS_MAX).
const TTL_MAX_MS: u64 = 14 * 24 * 3600 * 1000;

fn with_ttl(payload: &str, ttl_ms: u64) -> pb::Message {
    pb::Message { ttl_ms, ..message(payload) }
}

/// The dead letters of `queue` (its `.dead` queue) Peek shows, oldest first.
async fn dead_letters(broker: &BrokerProcess, queue: &str) -> Vec<pb::PeekedMessage> {
    let request = pb::PeekRequest { queue: format!("{queue}.dead"), start: None, max_messages: 1000 };
    broker.consumer().await.peek(request).await.unwrap().into_inner().messages
}

/// Waits until `queue.dead` holds `count` dead letters; returns them.
async fn wait_dead_letters(broker: &BrokerProcess, queue: &str, count: usize) -> Vec<pb::PeekedMessage> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let dead = dead_letters(broker, queue).await;
        if dead.len() >= count {
            assert_eq!(dead.len(), count, "{dead:?}");
            return dead;
        }
        assert!(std::time::Instant::now() < deadline, "{queue}.dead holds {} of {count}", dead.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `queue`'s Stats count `dead_lettered` and `dropped` expired messages.
async fn wait_expired(broker: &BrokerProcess, queue: &str, dead_lettered: u64, dropped: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = stats(broker, queue).await;
        if (s.expired_dead_lettered, s.expired_dropped) == (dead_lettered, dropped) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expired {:?}, expected {:?}",
            (s.expired_dead_lettered, s.expired_dropped),
            (dead_lettered, dropped)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn header<'a>(message: &'a pb::PeekedMessage, name: &str) -> Option<&'a str> {
    message.headers.get(name).map(String::as_str)
}

/// A queued message past its TTL is skipped by delivery: the consumer gets
/// the fresh message behind it, and the expired one is in the dead-letter
/// queue with reason `expired`, its application headers, without its
/// deadline header; Stats and the metric count it.
#[tokio::test]
async fn an_expired_queued_message_is_dead_lettered_not_delivered() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "ttl", queue_settings()).await;
    let mut publisher = broker.publisher().await;
    let mut old = with_ttl("old", 100);
    old.headers.insert("traceparent".into(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    publish(&mut publisher, "ttl", old).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish(&mut publisher, "ttl", message("fresh")).await;
    let mut session = Session::open(&mut broker.consumer().await, "ttl", 10).await;
    let delivery = session.delivery().await;
    assert_eq!(delivery.payload.as_ref(), b"fresh");
    session.ack(vec![delivery.delivery_id]).await;
    session.expect_silence(Duration::from_millis(300)).await;
    let dead = wait_dead_letters(&broker, "ttl", 1).await;
    assert_eq!(dead[0].payload.as_ref(), b"old");
    assert_eq!(dead[0].reason, "expired");
    assert_eq!(header(&dead[0], "ballast-attempts"), Some("0"), "never delivered");
    assert!(header(&dead[0], "traceparent").is_some(), "application headers kept");
    assert_eq!(header(&dead[0], "ballast-expires-at"), None, "a dead letter does not expire");
    wait_expired(&broker, "ttl", 1, 0).await;
    let metrics = broker.scrape();
    let labels = r#"queue="ttl",lane="normal",action="dead_letter""#;
    assert_eq!(sample(&metrics, "ballast_expired_messages_total", labels), Some(1.0), "{metrics}");
}

/// With `expired_action: DROP`, expired messages go nowhere: not
/// delivered, not dead-lettered, counted as dropped, and the depth falls
/// to what is left.
#[tokio::test]
async fn the_drop_action_drops_expired_messages() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { expired_action: pb::ExpiredAction::Drop.into(), ..queue_settings() };
    let info = create(&mut broker.admin().await, "drops", settings).await;
    assert_eq!(info.settings.unwrap().expired_action, i32::from(pb::ExpiredAction::Drop));
    let mut publisher = broker.publisher().await;
    publish_batch(&mut publisher, "drops", (0..3).map(|i| with_ttl(&format!("gone{i}"), 100)).collect()).await;
    publish(&mut publisher, "drops", message("kept")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut session = Session::open(&mut broker.consumer().await, "drops", 10).await;
    assert_eq!(session.delivery().await.payload.as_ref(), b"kept");
    session.expect_silence(Duration::from_millis(300)).await;
    wait_expired(&broker, "drops", 0, 3).await;
    assert_eq!(depth(&mut broker.admin().await, "drops").await, 1, "only the delivered message is left");
    assert!(dead_letters(&broker, "drops").await.is_empty());
}

/// A message whose deadline passes while it is leased is not redelivered:
/// nacked, or its lease expiring, it ends in the dead-letter queue with
/// reason `expired` after the attempts it had.
#[tokio::test]
async fn a_leased_message_past_its_deadline_expires_at_lease_end() {
    let broker = BrokerProcess::start();
    // Margins of a second, so a slow machine still delivers both before
    // their deadline.
    let settings = pb::QueueSettings { lease_timeout_ms: Some(1500), ..queue_settings() };
    create(&mut broker.admin().await, "leased", settings).await;
    let mut publisher = broker.publisher().await;
    publish_batch(&mut publisher, "leased", vec![with_ttl("nacked", 1000), with_ttl("abandoned", 1000)]).await;
    let mut session = Session::open(&mut broker.consumer().await, "leased", 2).await;
    let first = session.delivery().await;
    let second = session.delivery().await;
    assert_eq!((first.payload.as_ref(), second.payload.as_ref()), (&b"nacked"[..], &b"abandoned"[..]));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    session.nack(first.delivery_id, 0, "busy").await;
    // The second lease runs out (1.5 s) after the message's deadline.
    session.credit(2).await;
    session.expect_silence(Duration::from_millis(600)).await;
    let dead = wait_dead_letters(&broker, "leased", 2).await;
    let mut payloads: Vec<&[u8]> = dead.iter().map(|d| d.payload.as_ref()).collect();
    payloads.sort_unstable();
    assert_eq!(payloads, vec![&b"abandoned"[..], &b"nacked"[..]]);
    for letter in &dead {
        assert_eq!(letter.reason, "expired", "{letter:?}");
        assert_eq!(header(letter, "ballast-attempts"), Some("1"), "{letter:?}");
    }
    wait_expired(&broker, "leased", 2, 0).await;
    let metrics = broker.scrape();
    let redelivered = r#"queue="leased",lane="normal",reason="lease_expired""#;
    let redelivered = sample(&metrics, "ballast_redelivered_messages_total", redelivered).unwrap_or(0.0);
    assert_eq!(redelivered, 0.0, "nothing redelivered");
}

/// A delayed message whose deadline comes before its delay is never
/// delivered; neither is a message nacked with a delay that outlasts it.
#[tokio::test]
async fn a_delayed_message_past_its_deadline_is_never_delivered() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "later", queue_settings()).await;
    let mut publisher = broker.publisher().await;
    let delayed = pb::Message { delay_ms: 300, ..with_ttl("delayed", 100) };
    publish(&mut publisher, "later", delayed).await;
    publish(&mut publisher, "later", with_ttl("nacked", 1000)).await;
    let mut session = Session::open(&mut broker.consumer().await, "later", 2).await;
    let nacked = session.delivery().await;
    assert_eq!(nacked.payload.as_ref(), b"nacked");
    session.nack(nacked.delivery_id, 1500, "later").await;
    session.expect_silence(Duration::from_millis(1800)).await;
    let dead = wait_dead_letters(&broker, "later", 2).await;
    assert!(dead.iter().all(|d| d.reason == "expired"), "{dead:?}");
    wait_expired(&broker, "later", 2, 0).await;
}

/// UpdateQueue sets and clears the queue's TTL on a live queue: set, the
/// waiting messages older than it expire; cleared, messages are delivered
/// whatever their age. The TTL is bounded (at the limit accepted, one past
/// refused naming the key), as is a publish's `ttl_ms`.
#[tokio::test]
async fn update_queue_changes_the_ttl_of_a_live_queue() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "aging", queue_settings()).await;
    let mut publisher = broker.publisher().await;
    publish_batch(&mut publisher, "aging", vec![message("a"), message("b")]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let update = |ttl: u64| pb::UpdateQueueRequest {
        name: "aging".into(),
        settings: Some(pb::QueueSettings { message_ttl_ms: Some(ttl), ..Default::default() }),
    };
    let info = admin.update_queue(update(100)).await.unwrap().into_inner();
    assert_eq!(info.settings.unwrap().message_ttl_ms, Some(100));
    let mut session = Session::open(&mut broker.consumer().await, "aging", 10).await;
    session.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(wait_dead_letters(&broker, "aging", 2).await.len(), 2);
    admin.update_queue(update(0)).await.unwrap();
    publish(&mut publisher, "aging", message("c")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    session.credit(1).await;
    assert_eq!(session.delivery().await.payload.as_ref(), b"c", "no TTL any more");

    admin.update_queue(update(TTL_MAX_MS)).await.unwrap();
    assert_status(admin.update_queue(update(TTL_MAX_MS + 1)).await, Code::InvalidArgument, "message_ttl_ms");
    publish(&mut publisher, "aging", with_ttl("longest", TTL_MAX_MS)).await;
    let refused =
        publisher.publish(pb::PublishRequest { queue: "aging".into(), message: Some(with_ttl("x", TTL_MAX_MS + 1)) });
    assert_status(refused.await, Code::InvalidArgument, "ttl_ms");
}

/// A TTL's deadline header takes one of the message's headers: a message
/// with the most headers a publish may carry is refused with a TTL, and
/// accepted with one header fewer.
#[tokio::test]
async fn a_ttl_takes_one_of_the_message_headers() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "crowded", queue_settings()).await;
    let mut publisher = broker.publisher().await;
    let headers = |count: usize| (0..count).map(|i| (format!("h{i:02}"), "v".to_owned())).collect();
    let publish_headers_max = 57;
    let full = pb::Message { headers: headers(publish_headers_max), ..with_ttl("full", 60_000) };
    let refused = publisher.publish(pb::PublishRequest { queue: "crowded".into(), message: Some(full) }).await;
    assert_status(refused, Code::InvalidArgument, "a ttl_ms takes one");
    let fits = pb::Message { headers: headers(publish_headers_max - 1), ..with_ttl("fits", 60_000) };
    publish(&mut publisher, "crowded", fits).await;
    let mut session = Session::open(&mut broker.consumer().await, "crowded", 1).await;
    let delivery = session.delivery().await;
    let expires_at: u64 = delivery.headers["ballast-expires-at"].parse().unwrap();
    assert!(expires_at >= delivery.published_at_ms + 60_000, "{expires_at} {}", delivery.published_at_ms);
}
