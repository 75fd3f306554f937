//! Restarts, kills and shutdowns of the real process.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ballast_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn idempotent_publish_holds_across_a_restart() {
    let mut broker = BrokerProcess::start();
    create(&mut broker.admin().await, "idem", queue_settings()).await;
    let keyed = |payload: &str, key: &str| pb::Message { idempotency_key: key.into(), ..message(payload) };
    let mut publisher = broker.publisher().await;
    let first = publish(&mut publisher, "idem", keyed("one", "key-1")).await;
    assert!(!first.duplicate);
    let again = publish(&mut publisher, "idem", keyed("one again", "key-1")).await;
    assert!(again.duplicate);
    assert_eq!(again.id, first.id);
    // Within a batch too.
    let batch =
        publish_batch(&mut publisher, "idem", vec![keyed("a", "key-2"), keyed("b", "key-2"), keyed("c", "key-1")])
            .await;
    assert!(!batch[0].duplicate && batch[1].duplicate && batch[2].duplicate);
    assert_eq!(batch[1].id, batch[0].id);
    assert_eq!(batch[2].id, first.id);

    broker.kill();
    broker.restart();
    let mut publisher = broker.publisher().await;
    let after = publish(&mut publisher, "idem", keyed("one, after the crash", "key-1")).await;
    assert!(after.duplicate, "the key survives a SIGKILL and restart");
    assert_eq!(after.id, first.id);
    assert!(publish(&mut publisher, "idem", keyed("two", "key-2")).await.duplicate);
    assert_eq!(depth(&mut broker.admin().await, "idem").await, 2);
}

#[tokio::test]
async fn restart_redelivers_exactly_the_unacked() {
    let mut broker = BrokerProcess::start();
    create(&mut broker.admin().await, "r", queue_settings()).await;
    publish_batch(&mut broker.publisher().await, "r", (0..10).map(|i| message(format!("{i}"))).collect()).await;
    let mut consumer = broker.consumer().await;
    let mut acked = Vec::new();
    {
        let mut session = Session::open(&mut consumer, "r", 6).await;
        let mut ids = Vec::new();
        for _ in 0..6 {
            let d = session.delivery().await;
            if ids.len() < 4 {
                ids.push(d.delivery_id);
                acked.push(String::from_utf8(d.payload.to_vec()).unwrap());
            }
        }
        // Unary ack answers once the acks are durable.
        consumer.ack(pb::AckRequest { queue: "r".into(), delivery_ids: ids }).await.unwrap();
    }
    broker.kill();
    broker.restart();
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "r", 10).await;
    let mut redelivered = Vec::new();
    for _ in 0..6 {
        redelivered.push(String::from_utf8(session.delivery().await.payload.to_vec()).unwrap());
    }
    session.expect_silence(Duration::from_millis(300)).await;
    for a in &acked {
        assert!(!redelivered.contains(a), "acked {a} redelivered: {redelivered:?}");
    }
    redelivered.sort();
    let mut expected: Vec<String> = (0..10).map(|i| i.to_string()).filter(|p| !acked.contains(p)).collect();
    expected.sort();
    assert_eq!(redelivered, expected);
}

/// A payload that carries its own check: `<producer>:<seq>:<crc32 of both>`
/// padded to `size` with bytes derived from the sequence.
fn checked_payload(producer: u32, seq: u64, size: usize) -> Vec<u8> {
    let mut body = format!("{producer}:{seq}:").into_bytes();
    while body.len() < size - 8 {
        body.push(b'a' + u8::try_from((seq + body.len() as u64) % 26).unwrap());
    }
    let crc = crc32fast::hash(&body);
    body.extend_from_slice(format!("{crc:08x}").as_bytes());
    body
}

fn verify_payload(payload: &[u8]) -> Option<(u32, u64)> {
    let (body, crc) = payload.split_at(payload.len().checked_sub(8)?);
    let crc = u32::from_str_radix(std::str::from_utf8(crc).ok()?, 16).ok()?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?;
    let mut parts = text.splitn(3, ':');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[tokio::test]
async fn sigkill_during_publish_load_loses_no_acknowledged_message() {
    let mut broker = BrokerProcess::start();
    create(&mut broker.admin().await, "load", queue_settings()).await;
    let stop = Arc::new(AtomicBool::new(false));
    // Acknowledged publishes so far: the kill waits for enough of them, so
    // the test does not depend on how fast the machine publishes.
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut producers = Vec::new();
    for producer in 0..4u32 {
        let endpoint = broker.endpoint();
        let stop = Arc::clone(&stop);
        let progress = Arc::clone(&progress);
        producers.push(tokio::spawn(async move {
            let mut client = pb::publisher_client::PublisherClient::connect(endpoint).await.unwrap();
            let mut acknowledged = Vec::new();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let batch = 1 + (seq % 7) as usize;
                let messages: Vec<pb::Message> = (0..batch)
                    .map(|i| message(checked_payload(producer, seq + i as u64, 64 + ((seq as usize + i) % 900))))
                    .collect();
                match client.publish_batch(pb::PublishBatchRequest { queue: "load".into(), messages }).await {
                    Ok(_) => {
                        acknowledged.extend(seq..seq + batch as u64);
                        progress.fetch_add(batch as u64, Ordering::Relaxed);
                    }
                    Err(_) => break, // the broker died under us
                }
                seq += batch as u64;
            }
            acknowledged
        }));
    }
    wait_until("300 acknowledged publishes under load", || progress.load(Ordering::Relaxed) >= 300).await;
    broker.kill();
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged: BTreeMap<(u32, u64), bool> = BTreeMap::new();
    for (producer, task) in producers.into_iter().enumerate() {
        for seq in task.await.unwrap() {
            acknowledged.insert((u32::try_from(producer).unwrap(), seq), false);
        }
    }
    assert!(acknowledged.len() > 100, "the load published only {} messages", acknowledged.len());

    broker.restart();
    let total = depth(&mut broker.admin().await, "load").await;
    assert!(total >= acknowledged.len() as u64, "depth {total} < acknowledged {}", acknowledged.len());
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "load", 10_000).await;
    let mut received = 0u64;
    let mut ids = Vec::new();
    while received < total {
        let d = session.delivery().await;
        received += 1;
        let (producer, seq) =
            verify_payload(&d.payload).unwrap_or_else(|| panic!("corrupt payload delivered: {:?}", d.payload));
        if let Some(seen) = acknowledged.get_mut(&(producer, seq)) {
            *seen = true;
        }
        ids.push(d.delivery_id);
        if ids.len() == 500 {
            session.ack(std::mem::take(&mut ids)).await;
            session.credit(500).await;
        }
    }
    let lost: Vec<_> = acknowledged.iter().filter(|(_, seen)| !**seen).map(|(k, _)| *k).collect();
    assert!(lost.is_empty(), "{} acknowledged messages lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(10)]);
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let mut broker = BrokerProcess::start();
    create(&mut broker.admin().await, "g", queue_settings()).await;
    publish_batch(&mut broker.publisher().await, "g", (0..5).map(|i| message(format!("{i}"))).collect()).await;
    let mut consumer = broker.consumer().await;
    let mut session = Session::open(&mut consumer, "g", 2).await;
    let held = session.delivery().await;
    session.delivery().await;

    // Publishers keep publishing while the signal arrives: each call either
    // succeeds (and is durable) or fails cleanly.
    let endpoint = broker.endpoint();
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let published = Arc::clone(&progress);
    let load = tokio::spawn(async move {
        let mut client = pb::publisher_client::PublisherClient::connect(endpoint).await.unwrap();
        let mut ok = 0u64;
        let mut codes = Vec::new();
        for i in 0..100_000u64 {
            match client
                .publish(pb::PublishRequest { queue: "g".into(), message: Some(message(format!("late {i}"))) })
                .await
            {
                Ok(_) => {
                    ok += 1;
                    published.store(ok, Ordering::Relaxed);
                }
                Err(status) => {
                    codes.push(status.code());
                    break;
                }
            }
        }
        (ok, codes)
    });
    // The signal arrives while publishes are flowing, however fast they go.
    wait_until("publishes to flow", || progress.load(Ordering::Relaxed) >= 20).await;
    broker.send_sigterm();
    // The consume stream ends with UNAVAILABLE.
    loop {
        match session.next_within(Duration::from_secs(10)).await {
            Some(Ok(_)) => continue,
            Some(Err(status)) => {
                assert!(matches!(status.code(), Code::Unavailable | Code::Ok), "{status:?}");
                break;
            }
            None => panic!("the consume stream did not end on SIGTERM"),
        }
    }
    let status = broker.wait_exit();
    assert!(status.success(), "ballastd exited with {status}");
    let (late_ok, codes) = load.await.unwrap();
    assert!(
        codes.iter().all(|c| matches!(c, Code::Unavailable | Code::Cancelled | Code::Unknown)),
        "publishes during shutdown fail as unavailable, got {codes:?}"
    );

    broker.restart();
    let mut admin = broker.admin().await;
    assert_eq!(depth(&mut admin, "g").await, 5 + late_ok, "every acknowledged publish is there, the held ones too");
    let _ = held;
}

/// An open Stats Watch does not hold up a graceful shutdown: on SIGTERM the
/// watch ends (cleanly or UNAVAILABLE) and the process exits 0 well before
/// its shutdown timeout, even when the next tick is a minute away. The
/// bounds are fractions of that timeout (120 s), not of the machine's
/// speed: a held-up shutdown would take the whole timeout.
// Multi-threaded: the client's connection must answer the broker's GOAWAY
// while this thread blocks waiting for the process to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_an_open_stats_watch_promptly() {
    let mut broker = BrokerProcess::start_with(&["--shutdown-timeout-ms", "120000"]);
    create(&mut broker.admin().await, "w", queue_settings()).await;
    let mut stats = pb::stats_client::StatsClient::new(broker.channel().await);
    let mut all =
        stats.watch(pb::WatchRequest { queue: String::new(), interval_ms: 60_000 }).await.unwrap().into_inner();
    let mut one = stats.watch(pb::WatchRequest { queue: "w".into(), interval_ms: 60_000 }).await.unwrap().into_inner();
    all.message().await.unwrap().expect("the first figures at once");
    one.message().await.unwrap().expect("the first figures at once");

    let signalled = std::time::Instant::now();
    broker.send_sigterm();
    for watch in [&mut all, &mut one] {
        match tokio::time::timeout(Duration::from_secs(60), watch.message()).await {
            Ok(Ok(None)) => {}
            // UNAVAILABLE, or the connection closing under the second
            // watch before its status was read (a transport error).
            Ok(Err(status)) => assert!(
                status.code() == Code::Unavailable
                    || (status.code() == Code::Unknown && status.message().contains("h2 protocol error")),
                "{status:?}"
            ),
            Ok(Ok(Some(figures))) => panic!("no figures expected after SIGTERM, got {figures:?}"),
            Err(_) => panic!("the watch did not end within 60 s of SIGTERM (half the shutdown timeout)"),
        }
    }
    let status = broker.wait_exit();
    let took = signalled.elapsed();
    assert!(status.success(), "ballastd exited with {status}");
    assert!(took < Duration::from_secs(90), "shutdown took {took:?} with a watch open (timeout 120 s)");
}
