//! PublishStream: batches as requests on one stream, each answered by its
//! sequence with PublishBatch's semantics; a failed request is answered
//! and the stream goes on.

use std::collections::HashMap;

use ballast_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

use crate::support::*;

/// An open PublishStream: requests in, responses out.
struct Stream {
    requests: mpsc::Sender<pb::PublishStreamRequest>,
    responses: Streaming<pb::PublishStreamResponse>,
}

impl Stream {
    async fn open(broker: &BrokerProcess) -> Stream {
        let (requests, outbound) = mpsc::channel(256);
        let responses = broker
            .publisher()
            .await
            .publish_stream(ReceiverStream::new(outbound))
            .await
            .expect("the stream opens")
            .into_inner();
        Stream { requests, responses }
    }

    async fn send(&self, sequence: u64, queue: &str, messages: Vec<pb::Message>) {
        let request = pb::PublishStreamRequest { sequence, queue: queue.into(), messages };
        self.requests.send(request).await.expect("the stream takes requests");
    }

    async fn next(&mut self) -> pb::PublishStreamResponse {
        self.responses.message().await.expect("a response, not an error").expect("the stream has not ended")
    }

    /// One request and its answer.
    async fn call(&mut self, sequence: u64, queue: &str, messages: Vec<pb::Message>) -> pb::PublishStreamResponse {
        self.send(sequence, queue, messages).await;
        let response = self.next().await;
        assert_eq!(response.sequence, sequence);
        response
    }
}

fn keyed(payload: &str, key: &str) -> pb::Message {
    pb::Message { idempotency_key: key.into(), ..message(payload) }
}

#[tokio::test]
async fn every_request_is_answered_by_its_sequence_with_its_receipts() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "a", queue_settings()).await;
    create(&mut admin, "b", queue_settings()).await;
    let mut stream = Stream::open(&broker).await;
    for sequence in 0..40u64 {
        let queue = if sequence % 2 == 0 { "a" } else { "b" };
        let messages = (0..10).map(|i| message(format!("{sequence}-{i}"))).collect();
        stream.send(sequence, queue, messages).await;
    }
    let mut answers: HashMap<u64, pb::PublishStreamResponse> = HashMap::new();
    for _ in 0..40 {
        let response = stream.next().await;
        assert!(answers.insert(response.sequence, response).is_none(), "each request answered once");
    }
    let mut offsets: HashMap<&str, Vec<u64>> = HashMap::new();
    for sequence in 0..40u64 {
        let response = &answers[&sequence];
        assert!(response.error.is_none(), "{response:?}");
        assert_eq!(response.receipts.len(), 10);
        let queue = if sequence % 2 == 0 { "a" } else { "b" };
        let ids: Vec<u64> = response.receipts.iter().map(|r| r.id.expect("an id").offset).collect();
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "a batch's receipts are in message order: {ids:?}");
        assert!(response.receipts[9].queue.as_ref().expect("figures").depth >= 10);
        offsets.entry(queue).or_default().extend(ids);
    }
    for queue in ["a", "b"] {
        let mut ids = offsets.remove(queue).expect("published");
        ids.sort_unstable();
        assert_eq!(ids, (0..200).collect::<Vec<u64>>(), "queue {queue}: every message stored once");
        assert_eq!(depth(&mut admin, queue).await, 200);
    }
}

#[tokio::test]
async fn a_failed_request_is_answered_and_the_stream_goes_on() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "q", queue_settings()).await;
    let mut stream = Stream::open(&broker).await;

    let bad_lane = stream.call(1, "q", vec![message("ok"), on_lane("bad", 7)]).await;
    let error = bad_lane.error.expect("refused");
    assert_eq!(error.code, Code::InvalidArgument as i32, "{error:?}");
    assert!(error.message.contains("lane"), "{error:?}");
    assert!(bad_lane.receipts.is_empty());

    let missing = stream.call(2, "nope", vec![message("x")]).await.error.expect("refused");
    assert_eq!(missing.code, Code::NotFound as i32, "{missing:?}");

    let empty = stream.call(3, "q", Vec::new()).await.error.expect("refused");
    assert_eq!(empty.code, Code::InvalidArgument as i32, "{empty:?}");

    let fine = stream.call(4, "q", vec![message("fine")]).await;
    assert!(fine.error.is_none(), "{fine:?}");
    assert_eq!(fine.receipts[0].id.expect("id").offset, 0, "nothing of the failed requests was stored");
    assert_eq!(depth(&mut broker.admin().await, "q").await, 1);
}

#[tokio::test]
async fn a_refusal_carries_retry_after_and_the_figures() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { max_messages: Some(4), ..queue_settings() };
    create(&mut broker.admin().await, "small", settings).await;
    let mut stream = Stream::open(&broker).await;
    let fill = stream.call(0, "small", (0..4).map(|i| on_lane(format!("{i}"), 0)).collect()).await;
    assert!(fill.error.is_none(), "{fill:?}");
    let refused = stream.call(1, "small", vec![on_lane("over", 0)]).await.error.expect("refused");
    assert_eq!(refused.code, Code::ResourceExhausted as i32, "{refused:?}");
    let retry_after: u64 = refused.metadata["retry-after-ms"].parse().expect("a number");
    assert!(retry_after > 0);
    assert_eq!(refused.metadata["ballast-depth"], "4");
    assert_eq!(refused.metadata["ballast-lane-index"], "0");
}

#[tokio::test]
async fn keys_are_deduplicated_across_requests_and_calls() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "q", queue_settings()).await;
    let mut stream = Stream::open(&broker).await;
    let first = stream.call(0, "q", vec![keyed("one", "k1")]).await.receipts[0];
    assert!(!first.duplicate);
    let again = stream.call(1, "q", vec![keyed("one", "k1"), keyed("two", "k2")]).await;
    assert!(again.receipts[0].duplicate);
    assert_eq!(again.receipts[0].id, first.id);
    assert!(!again.receipts[1].duplicate);
    let unary = publish(&mut broker.publisher().await, "q", keyed("two", "k2")).await;
    assert!(unary.duplicate, "a unary retry of a stream publish is a duplicate");
    assert_eq!(unary.id, again.receipts[1].id);
    assert_eq!(depth(&mut broker.admin().await, "q").await, 2);
}

#[tokio::test]
async fn a_closed_stream_ends_after_its_last_answer() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "q", queue_settings()).await;
    let mut stream = Stream::open(&broker).await;
    for sequence in 0..10 {
        stream.send(sequence, "q", vec![message(format!("{sequence}"))]).await;
    }
    drop(stream.requests);
    let mut answered = 0;
    while let Some(response) = stream.responses.message().await.expect("the stream ends cleanly") {
        assert!(response.error.is_none(), "{response:?}");
        answered += 1;
    }
    assert_eq!(answered, 10, "every request sent before the close was answered");
}

#[tokio::test]
async fn an_undecodable_request_ends_the_stream_with_invalid_argument() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "q", queue_settings()).await;
    let mut stream = Stream::open(&broker).await;
    // A payload past the gRPC decode limit (17 MiB).
    let huge = message(vec![0u8; 18 << 20]);
    stream.send(0, "q", vec![huge]).await;
    let status = stream.responses.message().await.expect_err("the stream ends");
    assert!(matches!(status.code(), Code::ResourceExhausted | Code::InvalidArgument), "{status:?}");
}
