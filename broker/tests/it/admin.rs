//! Queue administration, health and reflection, and every bad input's status.

use ballast_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn create_get_list_purge_delete() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    let info = create(&mut admin, "orders", queue_settings()).await;
    assert_eq!(info.name, "orders");
    assert_eq!(info.dead_letter_queue, "orders.dead");
    let settings = info.settings.expect("resolved settings");
    assert_eq!(settings.lanes, vec!["high", "normal", "low"]);
    assert_eq!(settings.lane_weights, vec![4, 2, 1]);
    assert_eq!(settings.default_lane, Some(1));
    assert_eq!(settings.max_attempts, Some(5));
    assert_eq!(settings.sync_policy, pb::SyncPolicy::Fsync as i32);

    // Creating again with the same (or unset) settings returns the queue.
    let again = create(&mut admin, "orders", queue_settings()).await;
    assert_eq!(again.created_at_ms, info.created_at_ms);

    assert_eq!(queue_names(&mut admin).await, ["orders", "orders.dead"]);

    let mut publisher = broker.publisher().await;
    publish_batch(&mut publisher, "orders", (0..10).map(|i| on_lane(format!("m{i}"), i % 3)).collect()).await;
    let info = admin.get_queue(pb::GetQueueRequest { name: "orders".into() }).await.unwrap().into_inner();
    assert_eq!(info.depth, 10);
    assert_eq!(info.lane_depths, vec![4, 3, 3]);

    let purged = admin.purge_queue(pb::PurgeQueueRequest { name: "orders".into() }).await.unwrap().into_inner();
    assert_eq!(purged.purged, 10);
    assert_eq!(depth(&mut admin, "orders").await, 0);

    // The dead-letter queue goes with its queue, not on its own.
    assert_status(
        admin.delete_queue(pb::DeleteQueueRequest { name: "orders.dead".into() }).await,
        Code::FailedPrecondition,
        "delete orders",
    );
    admin.delete_queue(pb::DeleteQueueRequest { name: "orders".into() }).await.unwrap();
    assert!(queue_names(&mut admin).await.is_empty());
    assert_status(admin.get_queue(pb::GetQueueRequest { name: "orders".into() }).await, Code::NotFound, "orders");

    // A re-created queue starts empty.
    create(&mut admin, "orders", queue_settings()).await;
    assert_eq!(depth(&mut admin, "orders").await, 0);

    // Deleted files go in the background: the queue re-created at once is
    // whole (in a directory of its own), and nothing of the old one stays.
    let mut publisher = broker.publisher().await;
    publish_batch(&mut publisher, "orders", (0..100).map(|i| message(format!("{i}"))).collect()).await;
    admin.delete_queue(pb::DeleteQueueRequest { name: "orders".into() }).await.unwrap();
    create(&mut admin, "orders", queue_settings()).await;
    publish(&mut publisher, "orders", message("new")).await;
    let queues = broker.data_dir.join("queues");
    wait_until("the deleted queue's files to go", || {
        let mut names: Vec<String> =
            std::fs::read_dir(&queues).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        names.sort();
        // Sorted: "orders.dead~<generation>", then "orders~<generation>".
        names.len() == 2 && names[0].starts_with("orders.dead~") && names[1].starts_with("orders~")
    })
    .await;
    assert_eq!(depth(&mut admin, "orders").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_and_settings_survive_a_restart() {
    let mut broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    let settings = pb::QueueSettings {
        lanes: vec!["urgent".into(), "bulk".into()],
        lane_weights: vec![9, 1],
        lease_timeout_ms: Some(1234),
        dead_letter: Some(false),
        ..queue_settings()
    };
    let before = create(&mut admin, "billing", settings).await;
    publish(&mut broker.publisher().await, "billing", on_lane("x", 1)).await;
    broker.terminate_cleanly();
    broker.restart();
    let mut admin = broker.admin().await;
    let after = admin.get_queue(pb::GetQueueRequest { name: "billing".into() }).await.unwrap().into_inner();
    assert_eq!(after.settings, before.settings);
    assert_eq!(after.created_at_ms, before.created_at_ms);
    assert_eq!(after.lane_depths, vec![0, 1]);
    assert_eq!(after.dead_letter_queue, "");
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let broker = BrokerProcess::start();
    let channel = broker.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "ballast.v1.Admin", "ballast.v1.Publisher", "ballast.v1.Consumer"] {
        let response =
            health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(
            response.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let response = responses.message().await.unwrap().expect("a reflection response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else { panic!("{response:?}") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["ballast.v1.Admin", "ballast.v1.Publisher", "ballast.v1.Consumer", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
}

#[tokio::test]
async fn bad_input_gets_the_right_status_and_changes_nothing() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    let mut publisher = broker.publisher().await;
    let mut consumer = broker.consumer().await;
    let small = pb::QueueSettings { message_size_max: Some(1000), ..queue_settings() };
    create(&mut admin, "q", small).await;
    let receipt = publish(&mut publisher, "q", message("kept")).await;

    // Unknown queue.
    assert_status(
        publisher.publish(pb::PublishRequest { queue: "nope".into(), message: Some(message("x")) }).await,
        Code::NotFound,
        "nope",
    );
    assert_status(admin.purge_queue(pb::PurgeQueueRequest { name: "nope".into() }).await, Code::NotFound, "nope");
    assert_status(Session::try_open(&mut consumer, "nope", 1).await.map(|_| ()), Code::NotFound, "nope");

    // Bad names.
    for (name, needle) in [("", "empty"), ("Upper", "start with"), ("a/b", "only a-z"), ("x.dead", "reserved")] {
        assert_status(
            admin.create_queue(pb::CreateQueueRequest { name: name.into(), settings: None }).await,
            Code::InvalidArgument,
            needle,
        );
    }
    let long = "a".repeat(129);
    assert_status(
        admin.create_queue(pb::CreateQueueRequest { name: long, settings: None }).await,
        Code::InvalidArgument,
        "128",
    );

    // Bad settings name the setting.
    let cases = [
        (pb::QueueSettings { lanes: (0..9).map(|i| format!("l{i}")).collect(), ..queue_settings() }, "lanes"),
        (pb::QueueSettings { max_attempts: Some(0), ..queue_settings() }, "max_attempts"),
        (pb::QueueSettings { sync_policy: 99, ..queue_settings() }, "sync_policy"),
        (pb::QueueSettings { lease_timeout_ms: Some(1), ..queue_settings() }, "lease_timeout_ms"),
    ];
    for (settings, key) in cases {
        assert_status(
            admin.create_queue(pb::CreateQueueRequest { name: "other".into(), settings: Some(settings) }).await,
            Code::InvalidArgument,
            key,
        );
    }

    // Conflicting settings.
    assert_status(
        admin
            .create_queue(pb::CreateQueueRequest {
                name: "q".into(),
                settings: Some(pb::QueueSettings { max_attempts: Some(9), ..queue_settings() }),
            })
            .await,
        Code::AlreadyExists,
        "max_attempts",
    );

    // Lane out of range, oversize payload, reserved header, oversize batch.
    assert_status(
        publisher.publish(pb::PublishRequest { queue: "q".into(), message: Some(on_lane("x", 3)) }).await,
        Code::InvalidArgument,
        "lane 3",
    );
    assert_status(
        publisher.publish(pb::PublishRequest { queue: "q".into(), message: Some(message(vec![0u8; 1001])) }).await,
        Code::InvalidArgument,
        "message_size_max",
    );
    let mut reserved = message("x");
    reserved.headers.insert("ballast-not-before".into(), "0".into());
    assert_status(
        publisher.publish(pb::PublishRequest { queue: "q".into(), message: Some(reserved) }).await,
        Code::InvalidArgument,
        "reserved",
    );
    assert_status(
        publisher
            .publish_batch(pb::PublishBatchRequest {
                queue: "q".into(),
                messages: (0..1001).map(|_| message("x")).collect(),
            })
            .await,
        Code::InvalidArgument,
        "1000",
    );
    assert_status(
        publisher.publish_batch(pb::PublishBatchRequest { queue: "q".into(), messages: vec![] }).await,
        Code::InvalidArgument,
        "at least one",
    );
    // One bad message rejects the whole batch: nothing of it is stored.
    assert_status(
        publisher
            .publish_batch(pb::PublishBatchRequest {
                queue: "q".into(),
                messages: vec![message("fine"), on_lane("bad", 7)],
            })
            .await,
        Code::InvalidArgument,
        "message 1",
    );
    assert_status(
        publisher.publish(pb::PublishRequest { queue: "q".into(), message: None }).await,
        Code::InvalidArgument,
        "no message",
    );

    // Zero or excessive credit.
    assert_status(Session::try_open(&mut consumer, "q", 0).await.map(|_| ()), Code::InvalidArgument, "credit");
    assert_status(Session::try_open(&mut consumer, "q", 10_001).await.map(|_| ()), Code::InvalidArgument, "10000");
    assert_status(
        consumer.pull(pb::PullRequest { queue: "q".into(), max_messages: 0, wait_ms: 0 }).await,
        Code::InvalidArgument,
        "credit",
    );
    assert_status(
        consumer.pull(pb::PullRequest { queue: "q".into(), max_messages: 1, wait_ms: 3_600_000 }).await,
        Code::InvalidArgument,
        "wait_ms",
    );

    // Unknown deliveries: a clear error that changes nothing.
    assert_status(
        consumer.ack(pb::AckRequest { queue: "q".into(), delivery_ids: vec![42] }).await,
        Code::FailedPrecondition,
        "42",
    );
    assert_status(
        consumer.nack(pb::NackRequest { queue: "q".into(), delivery_id: 42, delay_ms: 0, reason: String::new() }).await,
        Code::FailedPrecondition,
        "42",
    );
    let mut session = Session::open(&mut consumer, "q", 1).await;
    let delivery = session.delivery().await;
    session.ack(vec![delivery.delivery_id + 1000]).await;
    match session.next_within(std::time::Duration::from_secs(5)).await {
        Some(Ok(pb::consume_response::Kind::Rejected(r))) => {
            assert_eq!(r.delivery_id, delivery.delivery_id + 1000);
            assert_eq!(r.code, Code::FailedPrecondition as i32);
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // A zero credit grant ends the stream with INVALID_ARGUMENT.
    session.credit(0).await;
    match session.next_within(std::time::Duration::from_secs(5)).await {
        Some(Err(status)) => assert_eq!(status.code(), Code::InvalidArgument, "{status:?}"),
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }

    // A stream whose first request is not subscribe.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::ConsumeRequest { kind: Some(pb::consume_request::Kind::Credit(pb::Credit { credit: 1 })) })
        .await
        .unwrap();
    assert_status(
        consumer.consume(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map(|_| ()),
        Code::InvalidArgument,
        "subscribe",
    );

    // Nothing was lost: the one stored message is still there (its lease was
    // released when the stream ended).
    assert_eq!(depth(&mut admin, "q").await, 1);
    let mut session = Session::open(&mut consumer, "q", 1).await;
    let again = session.delivery().await;
    assert_eq!(again.id, receipt.id);
    assert_eq!(&again.payload[..], b"kept");
}

/// The rest of issue 3's bad-input list, end to end: every call on an
/// unknown queue is NOT_FOUND, a bad name anywhere is INVALID_ARGUMENT,
/// limits are named, and a batch with one bad message on another lane
/// stores nothing of any lane.
#[tokio::test]
async fn more_bad_input_is_refused_and_stores_nothing() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    let mut publisher = broker.publisher().await;
    let mut consumer = broker.consumer().await;
    let mut stats = pb::stats_client::StatsClient::new(broker.channel().await);
    create(&mut admin, "q", queue_settings()).await;

    // Unknown queue: every call.
    let nope = || "nope".to_owned();
    assert_status(admin.get_queue(pb::GetQueueRequest { name: nope() }).await, Code::NotFound, "nope");
    assert_status(admin.delete_queue(pb::DeleteQueueRequest { name: nope() }).await, Code::NotFound, "nope");
    assert_status(
        publisher.publish_batch(pb::PublishBatchRequest { queue: nope(), messages: vec![message("x")] }).await,
        Code::NotFound,
        "nope",
    );
    assert_status(
        consumer.pull(pb::PullRequest { queue: nope(), max_messages: 1, wait_ms: 0 }).await,
        Code::NotFound,
        "nope",
    );
    assert_status(consumer.ack(pb::AckRequest { queue: nope(), delivery_ids: vec![1] }).await, Code::NotFound, "nope");
    assert_status(
        consumer.nack(pb::NackRequest { queue: nope(), delivery_id: 1, delay_ms: 0, reason: String::new() }).await,
        Code::NotFound,
        "nope",
    );
    assert_status(
        stats.watch(pb::WatchRequest { queue: nope(), interval_ms: 0 }).await.map(|_| ()),
        Code::NotFound,
        "nope",
    );

    // A bad name is INVALID_ARGUMENT wherever it appears.
    assert_status(
        publisher.publish(pb::PublishRequest { queue: "Bad Name".into(), message: Some(message("x")) }).await,
        Code::InvalidArgument,
        "Bad Name",
    );
    assert_status(stats.get_stats(pb::StatsRequest { queue: "../etc".into() }).await, Code::InvalidArgument, "../etc");

    // Limits on acks, pulls and credit name the limit.
    assert_status(
        consumer.ack(pb::AckRequest { queue: "q".into(), delivery_ids: vec![] }).await,
        Code::InvalidArgument,
        "at least one",
    );
    assert_status(
        consumer.ack(pb::AckRequest { queue: "q".into(), delivery_ids: (0..10_001).collect() }).await,
        Code::InvalidArgument,
        "10000",
    );
    assert_status(
        consumer.pull(pb::PullRequest { queue: "q".into(), max_messages: 10_001, wait_ms: 0 }).await,
        Code::InvalidArgument,
        "10000",
    );
    assert_status(
        consumer
            .nack(pb::NackRequest { queue: "q".into(), delivery_id: 1, delay_ms: u64::MAX, reason: String::new() })
            .await,
        Code::InvalidArgument,
        "delay",
    );
    let session = Session::open(&mut consumer, "q", 10_000).await;
    session.credit(1).await;
    let mut session = session;
    match session.next_within(std::time::Duration::from_secs(5)).await {
        Some(Err(status)) => {
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains("10000"), "{status:?}");
        }
        other => panic!("credit over the limit: expected INVALID_ARGUMENT, got {other:?}"),
    }

    // Headers over their total size (64 KiB), alone or on another lane of a
    // batch: refused whole, naming the message and the limit, before any
    // lane stores anything.
    let mut heavy = on_lane("h", 2);
    heavy.headers.insert("big".into(), "v".repeat(64 * 1024));
    assert_status(
        publisher.publish(pb::PublishRequest { queue: "q".into(), message: Some(heavy.clone()) }).await,
        Code::InvalidArgument,
        "65536",
    );
    assert_status(
        publisher
            .publish_batch(pb::PublishBatchRequest { queue: "q".into(), messages: vec![on_lane("fine", 0), heavy] })
            .await,
        Code::InvalidArgument,
        "message 1",
    );
    assert_eq!(depth(&mut admin, "q").await, 0, "nothing of a refused batch is stored");
    // At a publish's limit (64 KiB less the room kept for the broker's
    // headers, the delay's included) it is stored, delayed or not.
    let mut at_limit = on_lane("d", 1);
    let limit = ballast_broker::limits::PUBLISH_HEADERS_SIZE_MAX as usize;
    at_limit.headers.insert("big".into(), "v".repeat(limit - 9));
    publish(&mut publisher, "q", at_limit.clone()).await;
    at_limit.delay_ms = 1000;
    publish(&mut publisher, "q", at_limit).await;
    assert_eq!(depth(&mut admin, "q").await, 2);
}

/// A queue directory without `queue.toml` (a creation or deletion cut short
/// by a crash) is not opened as a queue, and is removed (in the background)
/// when the broker starts; the broker serves meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_deletion_is_removed_at_start() {
    let mut broker = BrokerProcess::start();
    create(&mut broker.admin().await, "kept", queue_settings()).await;
    broker.terminate_cleanly();
    let orphan = broker.data_dir.join("queues").join("gone~42");
    std::fs::create_dir_all(orphan.join("lanes").join("0")).unwrap();
    std::fs::write(orphan.join("lanes").join("0").join("00000000000000000000.seg"), vec![0u8; 1 << 20]).unwrap();
    broker.restart();
    assert_eq!(queue_names(&mut broker.admin().await).await, ["kept", "kept.dead"]);
    wait_until("the orphan directory to go", || !orphan.exists()).await;
}
