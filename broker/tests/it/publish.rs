//! The publish path under stress and at its limits: calls cancelled after
//! their append, concurrent admission, the room reserved for the broker's
//! headers, nack reasons, and the original id a redelivered message keeps.
//! Some tests drive a `Broker` in-process (to cancel a call at an exact
//! point, or to race calls without gRPC in between); the others run the
//! real `ballastd`.

use std::{sync::Arc, time::Duration};

use ballast_broker::{
    Broker, Config,
    limits::{
        BATCH_COUNT_MAX, NACK_REASON_SIZE_MAX, PUBLISH_HEADERS_COUNT_MAX, PUBLISH_HEADERS_SIZE_MAX,
        RESERVED_HEADERS_SIZE,
    },
    queue::{Publish, Queue, SettingsRequest},
};
use ballast_proto::v1 as pb;
use bytes::Bytes;
use tonic::Code;

use crate::support::*;

/// A broker in this process, on a temporary data directory.
struct InProcess {
    broker: Arc<Broker>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    fn open() -> InProcess {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        let config = Config { data_dir: dir.path().to_owned(), disk_free_min_bytes: 0, ..Config::default() };
        InProcess { broker: Broker::open(config).expect("open the broker"), _dir: dir }
    }

    async fn create(&self, name: &str, request: SettingsRequest) -> Arc<Queue> {
        self.broker.create(name, &request).await.unwrap_or_else(|e| panic!("create {name}: {e}"))
    }
}

fn keyed(key: &str) -> Publish {
    Publish { payload: Bytes::from_static(b"once"), key: Some(Bytes::from(key.to_owned())), ..Publish::default() }
}

/// A publish whose call goes away after its records were appended but
/// before their commit resolved (a client deadline, a disconnect) still
/// completes: its keys are recorded once durable, so a retry with the same
/// key is answered as a duplicate and nothing is stored twice. (Before, the
/// dropped call left its claim unresolved; the retry took it over and
/// stored the message again.) Under `FSYNC` the commit waits for the
/// flusher's `fdatasync`, so a call polled once and dropped (a zero
/// timeout) is cut exactly there; ten keys make a lucky early sync
/// irrelevant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_cancelled_after_its_append_is_stored_once() {
    let broker = InProcess::open();
    let queue = broker.create("cancelled", SettingsRequest::default()).await;
    for n in 0..10 {
        let key = format!("key-{n}");
        let cut = tokio::time::timeout(Duration::ZERO, queue.publish(vec![keyed(&key)])).await;
        if let Ok(done) = cut {
            done.expect("a publish that completed at once");
        }
        let retry = queue.publish(vec![keyed(&key)]).await.expect("the retry");
        assert!(retry[0].duplicate, "the retry of {key} is answered as a duplicate: {retry:?}");
        assert_eq!(queue.stats().lane_depths.iter().sum::<u64>(), n + 1, "{key} is stored once");
    }
}

/// Concurrent batches cannot take a queue past `max_messages`: admission
/// reserves a batch's counts in the same step as it checks them, until the
/// batch is in its log. (Before, each call checked the depth and appended
/// later, so calls that checked together all got in.) Eight publishers race
/// batches of 25 into a queue of 500 until each is refused; the depth is
/// then at most 500, and the refusals come only once the queue is nearly
/// full. Repeated over several queues, as the race needs calls to meet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_never_overshoot_max_messages() {
    let broker = InProcess::open();
    let max_messages = 500;
    for round in 0..10 {
        let request = SettingsRequest { max_messages: Some(max_messages), ..SettingsRequest::default() };
        let queue = broker.create(&format!("race-{round}"), request).await;
        let publishers: Vec<_> = (0..8)
            .map(|_| {
                let queue = Arc::clone(&queue);
                tokio::spawn(async move {
                    let batch = || {
                        (0..25)
                            .map(|_| Publish {
                                payload: Bytes::from(vec![7u8; 8000]),
                                lane: Some(0),
                                ..Publish::default()
                            })
                            .collect::<Vec<_>>()
                    };
                    loop {
                        match queue.publish(batch()).await {
                            Ok(_) => tokio::task::yield_now().await,
                            Err(ballast_broker::BrokerError::Refused(_)) => return,
                            Err(e) => panic!("publish: {e}"),
                        }
                    }
                })
            })
            .collect();
        for publisher in publishers {
            publisher.await.expect("a publisher");
        }
        let depth: u64 = queue.stats().lane_depths.iter().sum();
        assert!(depth <= max_messages, "round {round}: depth {depth} is over max_messages {max_messages}");
        assert!(depth > max_messages - 25, "round {round}: refused at depth {depth}, with room for a batch");
    }
}
