//! W3C trace context: `traceparent` and `tracestate` are application
//! headers the broker carries untouched, byte for byte, through every copy
//! it makes of a message. See: #15 item 6.

use std::time::Duration;

use ballast_proto::v1 as pb;

use crate::support::*;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// Two vendors' entries, with the spaces and `=` the format allows.
const TRACESTATE: &str = "rojo=00f067aa0ba902b7, congo=t61rcWkgMzE";

fn traced(payload: &str) -> pb::Message {
    let mut message = message(payload);
    message.headers.insert("traceparent".into(), TRACEPARENT.into());
    message.headers.insert("tracestate".into(), TRACESTATE.into());
    message
}

#[track_caller]
fn assert_traced(headers: &std::collections::HashMap<String, String>, what: &str) {
    assert_eq!(headers.get("traceparent").map(String::as_str), Some(TRACEPARENT), "{what}: {headers:?}");
    assert_eq!(headers.get("tracestate").map(String::as_str), Some(TRACESTATE), "{what}: {headers:?}");
}

/// The trace headers arrive as published on the first delivery, on a
/// delayed message, on a redelivery after a nack with a delay, on a
/// redelivery after the lease expired, on the dead letter, and on the
/// message redriven from the dead-letter queue.
#[tokio::test]
async fn trace_headers_travel_untouched_through_every_copy() {
    let broker = BrokerProcess::start();
    let settings = pb::QueueSettings { max_attempts: Some(3), lease_timeout_ms: Some(1000), ..queue_settings() };
    create(&mut broker.admin().await, "traced", settings).await;
    let mut publisher = broker.publisher().await;
    publish(&mut publisher, "traced", traced("now")).await;
    publish(&mut publisher, "traced", pb::Message { delay_ms: 200, ..traced("later") }).await;

    let mut session = Session::open(&mut broker.consumer().await, "traced", 1).await;
    let first = session.delivery().await;
    assert_eq!((first.payload.as_ref(), first.attempt), (&b"now"[..], 1));
    assert_traced(&first.headers, "published");
    session.nack(first.delivery_id, 100, "retry later").await;
    // The delayed message and the nacked one's copy, in whichever order
    // their delays end.
    session.credit(2).await;
    let (a, b) = (session.delivery().await, session.delivery().await);
    let (delayed, nacked) = if a.payload.as_ref() == b"later" { (a, b) } else { (b, a) };
    assert_eq!(delayed.payload.as_ref(), b"later");
    assert_traced(&delayed.headers, "delayed");
    session.ack(vec![delayed.delivery_id]).await;
    assert_eq!((nacked.payload.as_ref(), nacked.attempt), (&b"now"[..], 2));
    assert_traced(&nacked.headers, "redelivered after a nack with a delay");
    // Not settled: the 1 s lease expires and the message comes back.
    session.credit(1).await;
    let expired = session.delivery().await;
    assert_eq!((expired.payload.as_ref(), expired.attempt), (&b"now"[..], 3));
    assert_traced(&expired.headers, "redelivered after its lease expired");
    session.nack(expired.delivery_id, 0, "give up").await;

    let mut dead = Session::open(&mut broker.consumer().await, "traced.dead", 1).await;
    let letter = dead.delivery().await;
    assert_eq!(letter.headers.get("ballast-dead-letter-reason").map(String::as_str), Some("give up"));
    assert_traced(&letter.headers, "dead-lettered");
    drop(dead);
    // The dropped session's lease on the letter is released once the broker
    // sees its stream end; a redrive passes over leased letters, so repeat
    // it (bounded) until the letter has moved.
    let mut admin = broker.admin().await;
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let mut moved = 0;
    while moved == 0 && std::time::Instant::now() < until {
        let redriven = pb::RedriveRequest { name: "traced".into(), max_messages: 0, reason: String::new() };
        moved = admin.redrive(redriven).await.unwrap().into_inner().moved;
        if moved == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(moved, 1);
    session.credit(1).await;
    let back = session.delivery().await;
    assert_eq!((back.payload.as_ref(), back.attempt), (&b"now"[..], 1));
    assert_traced(&back.headers, "redriven");
    session.ack(vec![back.delivery_id]).await;
    session.expect_silence(Duration::from_millis(100)).await;
}
