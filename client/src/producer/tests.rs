//! Producer tests against the in-process fake broker (`crate::fake`).

use std::time::Duration;

use tokio::time::Instant;

use tonic::Status;

use super::*;
use crate::{
    Backoff, Client, MessageId,
    fake::{FakeServer, Fault, PublishKind, StreamFault, refused},
};

/// Fast retries so failure tests take milliseconds; a fixed jitter seed so
/// they replay the same way.
fn config() -> ProducerConfig {
    ProducerConfig {
        linger: Duration::ZERO,
        deadline: Duration::from_secs(10),
        attempt_timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            attempts_max: 5,
            backoff: Backoff::new(Duration::from_millis(1), Duration::from_millis(5)),
        },
        jitter_seed: Some(42),
        ..ProducerConfig::default()
    }
}

/// A publish whose answer is lost after the broker stored it is retried with
/// the same idempotency key, so the broker stores it once and the caller
/// gets the original id with `duplicate` set.
#[tokio::test]
async fn retried_publish_after_lost_answer_is_stored_once() {
    let server = FakeServer::start().await;
    server.state.fault(Fault::StoreThenUnavailable);
    let producer = server.client().producer(config()).expect("valid config");

    let receipt = producer.publish("orders", Message::new("one")).await.expect("retry succeeds");

    let state = server.state.lock();
    assert_eq!(state.stored.len(), 1, "stored once");
    assert_eq!(&state.stored[0].message.payload[..], b"one");
    assert_eq!(receipt.id, MessageId::from(state.stored[0].id));
    assert!(receipt.duplicate, "the retry hit the dedupe entry");
    assert_eq!(state.calls.len(), 2);
    let key = &state.calls[0].keys[0];
    assert_eq!(key.len(), 32, "a generated 128-bit hex key");
    assert_eq!(&state.calls[1].keys[0], key, "the retry reused the key");
}

/// Batches travel as requests on one PublishStream by default; with
/// `publish_stream` off, and against a broker without the stream, as unary
/// calls (a lone message as Publish, several as PublishBatch).
#[tokio::test]
async fn batches_go_over_the_stream_or_unary_calls() {
    for (publish_stream, no_publish_stream, expected) in [
        (true, false, [PublishKind::Stream, PublishKind::Stream]),
        (false, false, [PublishKind::Unary, PublishKind::Batch]),
        (true, true, [PublishKind::Unary, PublishKind::Batch]),
    ] {
        let server = FakeServer::start().await;
        server.state.lock().no_publish_stream = no_publish_stream;
        let producer = server.client().producer(ProducerConfig { publish_stream, ..config() }).expect("valid config");
        producer.publish("orders", Message::new("alone")).await.expect("published");
        let results = producer.publish_all("orders", (0..5).map(|i| Message::new(format!("m{i}")))).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let state = server.state.lock();
        let kinds: Vec<PublishKind> = state.calls.iter().map(|call| call.kind).collect();
        assert_eq!(kinds, expected, "publish_stream {publish_stream}, broker without it {no_publish_stream}");
        assert_eq!(state.stored.len(), 6);
    }
}

/// A request that never gets its answer holds up no other request on the
/// same stream: answers come by sequence, not in order.
#[tokio::test]
async fn a_hung_stream_request_holds_up_no_other() {
    let server = FakeServer::start().await;
    server.state.fault(Fault::StoreThenHang);
    let producer = Arc::new(
        server
            .client()
            .producer(ProducerConfig { attempt_timeout: Duration::from_secs(5), ..config() })
            .expect("valid config"),
    );
    let hung = {
        let producer = producer.clone();
        tokio::spawn(async move { producer.publish("orders", Message::new("hung")).await })
    };
    // Wait until the broker holds the hung request, then publish past it.
    while server.state.lock().stored.is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let receipt = producer.publish("orders", Message::new("next")).await.expect("answered");
    assert!(!hung.is_finished(), "the first request is still waiting for its answer");
    assert_eq!(receipt.id.offset, 1);
    hung.abort();
}

/// An attempt that hangs after storing is cut by the attempt timeout and
/// retried with the same key; still stored once.
#[tokio::test]
async fn hung_attempt_is_retried_with_same_key() {
    let server = FakeServer::start().await;
    server.state.fault(Fault::StoreThenHang);
    let producer = server
        .client()
        .producer(ProducerConfig { attempt_timeout: Duration::from_millis(200), ..config() })
        .expect("valid config");

    let receipt = producer.publish("orders", Message::new("one")).await.expect("retry succeeds");

    let state = server.state.lock();
    assert_eq!(state.stored.len(), 1);
    assert!(receipt.duplicate);
    assert_eq!(state.calls[0].keys, state.calls[1].keys);
}

/// A caller's own key is sent as is, and a second logical message with the
/// same key is reported as a duplicate of the first.
#[tokio::test]
async fn caller_key_is_used() {
    let server = FakeServer::start().await;
    let producer = server.client().producer(config()).expect("valid config");
    let first = producer.publish("orders", Message::new("a").with_idempotency_key("order-1")).await.expect("ok");
    let second = producer.publish("orders", Message::new("a").with_idempotency_key("order-1")).await.expect("ok");
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(first.id, second.id);
    assert_eq!(server.state.lock().calls[0].keys, vec!["order-1".to_owned()]);
}

/// A refusal's retry-after hint delays the retry by at least the hint, even
/// with a backoff of a few milliseconds.
#[tokio::test]
async fn retry_after_is_honoured() {
    let server = FakeServer::start().await;
    server.state.fault(Fault::Refuse(refused(Duration::from_millis(300))));
    let producer = server.client().producer(config()).expect("valid config");

    let receipt = producer.publish("orders", Message::new("one")).await.expect("second attempt succeeds");
    assert!(!receipt.duplicate, "the refused attempt stored nothing");

    let state = server.state.lock();
    assert_eq!(state.calls.len(), 2);
    let waited = state.calls[1].at - state.calls[0].at;
    assert!(waited >= Duration::from_millis(300), "retried after {waited:?}");
}

/// Receipts carry the queue's and the lane's figures, batched or not.
#[tokio::test]
async fn receipts_carry_saturation() {
    let server = FakeServer::start().await;
    let producer = server.client().producer(config()).expect("valid config");
    let results = producer.publish_all("orders", (0..4).map(|i| Message::new(format!("m{i}")).with_lane(i % 2))).await;
    let receipts: Vec<Receipt> = results.into_iter().collect::<Result<_, _>>().expect("stored");
    // Two batches (one per lane), in either order: the later one's receipts
    // see all four messages.
    let last = receipts.iter().max_by_key(|r| r.queue_saturation.map(|s| s.depth)).expect("four receipts");
    let queue = last.queue_saturation.expect("queue figures");
    assert_eq!(queue.depth, 4);
    let m3 = receipts.last().expect("four receipts");
    assert_eq!(m3.lane_saturation.expect("lane figures").depth, 2, "lane 1 holds m1 and m3");
    assert_eq!(queue.saturation, 4.0 / crate::fake::FAKE_MAX_MESSAGES as f64);
    assert_eq!(queue.oldest_age, Duration::from_millis(250));
    assert_eq!(queue.drain_estimate, None, "nothing consumes: unknown");
}

/// When the refusals outlast the attempts, the caller gets the refusal with
/// the broker's hint and figures; refusals leave the queue's breaker closed.
#[tokio::test]
async fn refusal_figures_reach_the_caller() {
    let server = FakeServer::start().await;
    let mut status = refused(Duration::from_millis(5));
    for (key, value) in [(contract::LANE_METADATA, "low"), (contract::DEPTH_METADATA, "70")] {
        status.metadata_mut().insert(key, value.parse().expect("ASCII"));
    }
    for _ in 0..2 {
        server.state.fault(Fault::Refuse(status.clone()));
    }
    let producer = server
        .client()
        .producer(ProducerConfig { retry: RetryPolicy { attempts_max: 2, ..config().retry }, ..config() })
        .expect("valid config");
    let error = producer.publish("orders", Message::new("x").with_lane(2)).await.expect_err("refused twice");
    assert_eq!(error.retry_after(), Some(Duration::from_millis(5)));
    let refusal = error.refusal().expect("figures");
    assert_eq!((refusal.lane.as_deref(), refusal.depth), (Some("low"), Some(70)));
    assert!(server.state.lock().stored.is_empty());
    assert_eq!(producer.breaker_state("orders"), BreakerState::Closed);
}

/// Messages published together are sent as batches of at most
/// `batch_count_max`; the remainder goes out after the linger.
#[tokio::test]
async fn batches_by_count_then_linger() {
    let server = FakeServer::start().await;
    let linger = Duration::from_millis(100);
    let producer =
        server.client().producer(ProducerConfig { linger, batch_count_max: 10, ..config() }).expect("valid config");

    let start = Instant::now();
    let results = producer.publish_all("orders", (0..25).map(|i| Message::new(format!("m{i}")))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let state = server.state.lock();
    let sizes: Vec<usize> = state.calls.iter().map(|call| call.keys.len()).collect();
    assert_eq!(sizes, vec![10, 10, 5]);
    assert!(state.calls.iter().all(|call| call.batch));
    assert!(state.calls[2].at - start >= linger, "the partial batch waited for the linger");
    assert!(state.calls[0].at - start < linger, "the full batch did not wait");
    assert_eq!(state.stored.len(), 25);
    // Receipts come back in order, one per message.
    let offsets: Vec<u64> = results.iter().map(|r| r.as_ref().expect("ok").id.offset).collect();
    assert_eq!(offsets, (0..25).collect::<Vec<u64>>());
}

/// Concurrent publishes within the linger share one batch; a lone publish
/// is sent with the unary Publish call.
#[tokio::test]
async fn linger_gathers_concurrent_publishes() {
    let server = FakeServer::start().await;
    let producer = Arc::new(
        server
            .client()
            .producer(ProducerConfig { linger: Duration::from_millis(50), ..config() })
            .expect("valid config"),
    );
    let tasks: Vec<_> = (0..3)
        .map(|i| {
            let producer = producer.clone();
            tokio::spawn(async move { producer.publish("orders", Message::new(format!("m{i}"))).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("no panic").expect("published");
    }
    producer.publish("orders", Message::new("alone")).await.expect("published");

    let state = server.state.lock();
    let shapes: Vec<(bool, usize)> = state.calls.iter().map(|call| (call.batch, call.keys.len())).collect();
    assert_eq!(shapes, vec![(true, 3), (false, 1)]);
}

/// Messages of different lanes never share a batch: the broker admits,
/// refuses and throttles a batch whole, as its most restricted lane.
#[tokio::test]
async fn batches_hold_one_lane() {
    let server = FakeServer::start().await;
    let producer =
        server.client().producer(ProducerConfig { linger: Duration::from_millis(50), ..config() }).expect("valid");
    let lanes = [Some(0), Some(2), Some(0), None, Some(2), Some(2)];
    let messages = lanes.iter().enumerate().map(|(i, lane)| {
        let message = Message::new(format!("m{i}"));
        match lane {
            Some(lane) => message.with_lane(*lane),
            None => message,
        }
    });
    let results = producer.publish_all("orders", messages).await;
    assert!(results.iter().all(Result::is_ok));

    let state = server.state.lock();
    let mut shapes: Vec<(bool, usize)> = state.calls.iter().map(|call| (call.batch, call.keys.len())).collect();
    shapes.sort();
    // Lane 0 twice, lane 2 three times, the unnamed lane once.
    assert_eq!(shapes, vec![(false, 1), (true, 2), (true, 3)]);
    let lane_of: HashMap<&String, Option<u32>> =
        state.stored.iter().map(|m| (&m.message.idempotency_key, m.message.lane)).collect();
    for call in &state.calls {
        let lanes: Vec<Option<u32>> = call.keys.iter().map(|key| lane_of[key]).collect();
        assert!(lanes.windows(2).all(|pair| pair[0] == pair[1]), "a batch mixed lanes: {lanes:?}");
    }
}

/// A batch's payload size limit splits batches; a message bigger than the
/// limit goes alone.
#[tokio::test]
async fn batches_by_size() {
    let server = FakeServer::start().await;
    let producer = server
        .client()
        .producer(ProducerConfig { linger: Duration::from_millis(20), batch_size_max: 10, ..config() })
        .expect("valid config");
    let messages = ["aaaa", "bbbb", "cccc", "dddddddddddddddd", "e"].map(Message::new);
    let results = producer.publish_all("orders", messages).await;
    assert!(results.iter().all(Result::is_ok));
    let sizes: Vec<usize> = server.state.lock().calls.iter().map(|call| call.keys.len()).collect();
    assert_eq!(sizes, vec![2, 1, 1, 1], "4+4 | 4 (16 would not fit) | 16 alone | 1");
}

/// One invalid message rejects a batch; the producer then sends each alone,
/// so only the bad one fails and nothing is stored twice.
#[tokio::test]
async fn invalid_message_fails_alone() {
    let server = FakeServer::start().await;
    let producer = server
        .client()
        .producer(ProducerConfig { linger: Duration::from_millis(20), ..config() })
        .expect("valid config");
    let results = producer.publish_all("orders", ["good", "bad", "fine"].map(Message::new)).await;
    assert!(results[0].is_ok());
    assert!(matches!(results[1], Err(Error::InvalidArgument { .. })), "{:?}", results[1]);
    assert!(results[2].is_ok());
    assert_eq!(server.state.lock().stored.len(), 2);
}

/// Requests the client can judge are refused before any network call.
#[tokio::test]
async fn local_validation() {
    let server = FakeServer::start().await;
    let producer = server.client().producer(config()).expect("valid config");
    for (queue, message) in [
        ("Bad Name", Message::new("x")),
        ("orders", Message::new("x").with_header("ballast-x", "1")),
        ("orders", Message::new("x").with_idempotency_key("k".repeat(257))),
    ] {
        let error = producer.publish(queue, message).await.expect_err("invalid");
        assert!(matches!(error, Error::InvalidArgument { .. }), "{error:?}");
    }
    assert!(server.state.lock().calls.is_empty());
}

/// Repeated failures open the queue's breaker: the call in progress stops
/// with CircuitOpen, later calls fail fast without reaching the broker, and
/// after the open duration a successful probe closes it again.
#[tokio::test]
async fn breaker_fails_fast_then_recovers() {
    let server = FakeServer::start().await;
    for _ in 0..3 {
        server.state.fault(Fault::Refuse(Status::unavailable("down")));
    }
    let clock = Arc::new(crate::clock::ManualClock::new());
    let breaker = BreakerConfig {
        failure_threshold: 3,
        failure_window: Duration::from_secs(60),
        open_duration: Duration::from_secs(30),
        half_open_probes: 1,
    };
    let producer = Producer::with_clock(
        server.client_channel(),
        ProducerConfig { breaker, retry: RetryPolicy { attempts_max: 10, ..config().retry }, ..config() },
        clock.clone(),
    )
    .expect("valid config");

    let error = producer.publish("orders", Message::new("x")).await.expect_err("breaker opens");
    assert!(matches!(error, Error::CircuitOpen { .. }), "{error:?}");
    assert!(error.is_retryable());
    assert_eq!(producer.breaker_state("orders"), BreakerState::Open);
    assert_eq!(producer.breaker_state("other"), BreakerState::Closed, "breakers are per queue");

    let start = Instant::now();
    let error = producer.publish("orders", Message::new("y")).await.expect_err("fails fast");
    assert!(matches!(error, Error::CircuitOpen { retry_in } if retry_in == Duration::from_secs(30)));
    assert!(start.elapsed() < Duration::from_millis(100));
    assert_eq!(server.state.lock().calls.len(), 3, "the open breaker sent nothing");

    clock.advance(Duration::from_secs(30));
    producer.publish("orders", Message::new("z")).await.expect("probe succeeds");
    assert_eq!(producer.breaker_state("orders"), BreakerState::Closed);
}

/// A broker that is not there: the publish fails with a retryable error
/// within the deadline, and the breaker then fails calls fast.
#[tokio::test]
async fn dead_broker_fails_fast() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let client = Client::new(&addr.to_string()).expect("valid address");
    let producer = client
        .producer(ProducerConfig {
            breaker: BreakerConfig { failure_threshold: 2, ..BreakerConfig::default() },
            deadline: Duration::from_secs(5),
            ..config()
        })
        .expect("valid config");

    let error = producer.publish("orders", Message::new("x")).await.expect_err("nobody listens");
    assert!(error.is_retryable(), "{error:?}");
    let start = Instant::now();
    let error = producer.publish("orders", Message::new("y")).await.expect_err("still down");
    assert!(matches!(error, Error::CircuitOpen { .. }), "{error:?}");
    assert!(start.elapsed() < Duration::from_millis(100));
}

/// A broker that never answers: the call ends with DeadlineExceeded at its
/// deadline, not later.
#[tokio::test]
async fn deadline_bounds_the_call() {
    let server = FakeServer::start().await;
    server.state.fault(Fault::StoreThenHang);
    let producer = server
        .client()
        .producer(ProducerConfig { deadline: Duration::from_millis(300), ..config() })
        .expect("valid config");
    let start = Instant::now();
    let error = producer.publish("orders", Message::new("x")).await.expect_err("hangs");
    assert!(matches!(error, Error::DeadlineExceeded { .. }), "{error:?}");
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2), "{elapsed:?}");
}

/// close() sends what is still lingering and waits for the answers.
#[tokio::test]
async fn close_flushes_lingering_messages() {
    let server = FakeServer::start().await;
    let producer = server
        .client()
        .producer(ProducerConfig { linger: Duration::from_secs(3600), ..config() })
        .expect("valid config");
    let pending = producer.submit("orders", Message::new("x")).await.expect("queued");
    producer.close().await;
    let receipt = pending.wait().await.expect("answered before close returned");
    assert_eq!(receipt.id.offset, 0);
    assert_eq!(server.state.lock().stored.len(), 1);
}

/// Out-of-range settings are refused with the setting's name.
#[test]
fn config_validation() {
    assert!(ProducerConfig::default().validate().is_ok());
    let error = ProducerConfig { batch_count_max: contract::BATCH_COUNT_MAX + 1, ..ProducerConfig::default() }
        .validate()
        .expect_err("too big");
    assert!(error.to_string().contains("batch_count_max"), "{error}");
    assert!(
        ProducerConfig { batch_count_max: contract::BATCH_COUNT_MAX, ..ProducerConfig::default() }.validate().is_ok()
    );
    assert!(ProducerConfig { in_flight_batches_max: 0, ..ProducerConfig::default() }.validate().is_err());
    assert!(ProducerConfig { deadline: Duration::ZERO, ..ProducerConfig::default() }.validate().is_err());
}

/// How long the stall tests let a silent node keep a request.
const STALL: Duration = Duration::from_millis(300);

/// A producer whose attempts (and so its stream's stall limit) last
/// `STALL`, over `client`.
fn stall_producer(client: &Client) -> Producer {
    client.producer(ProducerConfig { attempt_timeout: STALL, ..config() }).expect("valid config")
}

/// A node that takes the publish stream and its requests but answers
/// nothing (paused, its connection up) is given up after the attempt
/// timeout: with a second address the publish is stored there, within a
/// few attempt timeouts, and later publishes go there at once. Without the
/// stall, every retry queued on the silent stream until the deadline.
#[tokio::test]
async fn a_silent_stream_moves_to_the_next_address() {
    let (silent, answering, producer) = publish_past_a_stalled_node(StreamFault::Silent).await;
    let start = Instant::now();
    producer.publish("orders", Message::new("two")).await.expect("stored on the second node");
    assert!(start.elapsed() < STALL, "the next publish went to the answering node at once");

    let state = silent.state.lock();
    assert_eq!(state.streams_opened, 1, "one stream to the silent node");
    assert!(state.unanswered >= 1);
    assert_eq!(answering.state.lock().stored.len(), 2);
}

/// A node that never replies to the stream's call (no headers) is given
/// up the same way.
#[tokio::test]
async fn a_stream_never_opened_moves_to_the_next_address() {
    let (_silent, answering, _producer) = publish_past_a_stalled_node(StreamFault::NoReply).await;
    assert_eq!(answering.state.lock().stored.len(), 1);
}

/// Two fakes, every stream to the first with `fault`, and a producer
/// given both addresses, which has published one message: stored on the
/// second within a few stall limits, nothing on the first.
async fn publish_past_a_stalled_node(fault: StreamFault) -> (FakeServer, FakeServer, Producer) {
    let silent = FakeServer::start().await;
    silent.state.lock().stream_faults.extend([fault; 8]);
    let answering = FakeServer::start().await;
    let client = Client::new(&format!("{},{}", silent.addr, answering.addr)).expect("addresses");
    let producer = stall_producer(&client);

    let start = Instant::now();
    let receipt = producer.publish("orders", Message::new("one")).await.expect("stored on the second node");
    let elapsed = start.elapsed();
    assert!(elapsed < 5 * STALL, "published in {elapsed:?}");
    assert!(!receipt.duplicate);
    assert_eq!(silent.state.lock().stored.len(), 0);
    (silent, answering, producer)
}

/// With one address, a stalled stream is replaced by a new one (on a new
/// connection) and the producer recovers once the node answers again.
#[tokio::test]
async fn a_stalled_stream_is_replaced_on_a_single_address() {
    let server = FakeServer::start().await;
    server.state.lock().stream_faults.push_back(StreamFault::Silent);
    let producer = stall_producer(&server.client());

    let start = Instant::now();
    let receipt = producer.publish("orders", Message::new("one")).await.expect("stored on a new stream");
    let elapsed = start.elapsed();
    assert!(elapsed < 5 * STALL, "published in {elapsed:?}");
    assert_eq!(receipt.id.offset, 0);
    let state = server.state.lock();
    assert_eq!(state.streams_opened, 2, "the silent stream, then a new one");
    assert_eq!(state.stored.len(), 1);
}

/// Requests waiting on a stream that answers nothing for the stall limit
/// fail with a retryable UNAVAILABLE that says the stream stalled.
#[tokio::test]
async fn requests_on_a_stalled_stream_fail_saying_so() {
    let server = FakeServer::start().await;
    server.state.lock().stream_faults.push_back(StreamFault::Silent);
    let stream = PublishStream::new(PublisherClient::new(server.client_channel()), 4, STALL);
    let message = Message::new("x").into_proto("key-1".to_owned());

    let start = Instant::now();
    let sent = tokio::time::timeout(10 * STALL, stream.publish("orders", vec![message])).await;
    let Sent::Answered(answer) = sent.expect("the stall ends the request") else { panic!("the fake has the stream") };
    let error = answer.expect_err("nothing answers");
    assert!(start.elapsed() >= STALL && start.elapsed() < 3 * STALL, "{:?}", start.elapsed());
    assert!(matches!(&error, Error::Unavailable { message } if message.contains("stalled")), "{error:?}");
    assert!(error.is_retryable());
}

/// One request the node holds while it answers the others is no stall:
/// the stream lives on (answers arriving mean the node is alive), however
/// long the held request waits.
#[tokio::test]
async fn a_held_request_among_answered_ones_keeps_the_stream() {
    let server = FakeServer::start().await;
    server.state.fault(Fault::StoreThenHang);
    let stream = Arc::new(PublishStream::new(PublisherClient::new(server.client_channel()), 4, STALL));
    let held = {
        let stream = Arc::clone(&stream);
        let message = Message::new("held").into_proto("held".to_owned());
        tokio::spawn(async move { stream.publish("orders", vec![message]).await })
    };
    // The broker holds the first request (stored, never answered) before
    // the others go out; then answers keep coming for four stall limits.
    while server.state.lock().stored.is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let until = Instant::now() + 4 * STALL;
    let mut index = 0;
    while Instant::now() < until {
        let message = Message::new("next").into_proto(format!("next-{index}"));
        let Sent::Answered(answer) = stream.publish("orders", vec![message]).await else { panic!("stream") };
        answer.expect("answered");
        index += 1;
        tokio::time::sleep(STALL / 6).await;
    }
    assert!(!held.is_finished(), "the held request still waits on the same stream");
    assert_eq!(server.state.lock().streams_opened, 1);
    held.abort();
}
