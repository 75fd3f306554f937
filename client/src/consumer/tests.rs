//! Consumer tests against the in-process fake broker (`crate::fake`), whose
//! delivery ids restart at 1 in every session, so an ack sent on the wrong
//! session would hit a different message.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use tokio::sync::{Notify, Semaphore};

use super::*;
use crate::fake::{FakeServer, SessionLog};

fn config() -> ConsumerConfig {
    ConsumerConfig {
        reconnect: Backoff::new(Duration::from_millis(1), Duration::from_millis(10)),
        stop_timeout: Duration::from_secs(2),
        ..ConsumerConfig::default()
    }
}

/// Waits (with a deadline, never a bare sleep) until `condition` holds.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Message offsets acked by the fake, sorted.
fn acked_offsets(server: &FakeServer) -> Vec<u64> {
    let mut offsets: Vec<u64> = server.state.lock().acked.iter().map(|id| id.offset).collect();
    offsets.sort_unstable();
    offsets
}

/// Every ack and nack a session sent names a delivery of that same session,
/// no delivery is acked or nacked twice, and credit is granted only after the
/// acks and nacks that free it (so the broker's credit + unacked rule holds).
fn assert_session_discipline(sessions: &[SessionLog]) {
    for (index, session) in sessions.iter().enumerate() {
        let mut settled = HashSet::new();
        let mut granted: u64 = 0;
        for request in &session.requests {
            let ids = match request {
                RequestKind::Ack(ack) => ack.delivery_ids.clone(),
                RequestKind::Nack(nack) => vec![nack.delivery_id],
                RequestKind::Credit(credit) => {
                    granted += u64::from(credit.credit);
                    assert!(
                        granted <= settled.len() as u64,
                        "session {index} granted {granted} credit after settling only {}",
                        settled.len()
                    );
                    continue;
                }
                RequestKind::Extend(extend) => {
                    for id in &extend.delivery_ids {
                        assert!(session.delivered.contains_key(id), "session {index} extended {id}, never delivered");
                        assert!(!settled.contains(id), "session {index} extended {id} after settling it");
                    }
                    continue;
                }
                RequestKind::Subscribe(_) => continue,
            };
            for id in ids {
                assert!(session.delivered.contains_key(&id), "session {index} settled {id}, which it never delivered");
                assert!(settled.insert(id), "session {index} settled {id} twice");
            }
        }
    }
}

/// Every message is handled and acked once; the window (credit held plus
/// unacked deliveries) never exceeds the prefetch; credit is granted in
/// batches rather than per message.
#[tokio::test]
async fn acks_everything_within_the_window() {
    let server = FakeServer::start().await;
    server.state.add_queue("jobs", 50);
    let consumer = server
        .client()
        .consumer("jobs", ConsumerConfig { prefetch: 8, concurrency: 3, max_messages: Some(50), ..config() })
        .expect("valid");
    let handle = consumer.spawn(|_delivery: Delivery| async { Ok::<(), String>(()) });
    let stats = handle.join().await.expect("runs to max_messages");

    assert_eq!(acked_offsets(&server), (0..50).collect::<Vec<u64>>());
    assert_eq!(stats.acked, 50);
    assert_eq!(stats.handled, 50);
    let state = server.state.lock();
    assert!(state.window_max <= 8, "window reached {}", state.window_max);
    assert_eq!(state.rejected, 0);
    assert_session_discipline(&state.sessions);
    let grants = state.sessions[0].requests.iter().filter(|r| matches!(r, RequestKind::Credit(_))).count();
    assert!(grants < 50, "credit was granted {grants} times for 50 messages");
}

/// No more than `concurrency` handlers run at once.
#[tokio::test]
async fn concurrency_is_limited() {
    let server = FakeServer::start().await;
    server.state.add_queue("jobs", 30);
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let consumer = server
        .client()
        .consumer("jobs", ConsumerConfig { prefetch: 16, concurrency: 4, max_messages: Some(30), ..config() })
        .expect("valid");
    let (running_in, peak_in) = (running.clone(), peak.clone());
    let handle = consumer.spawn(move |_delivery: Delivery| {
        let (running, peak) = (running_in.clone(), peak_in.clone());
        async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            running.fetch_sub(1, Ordering::SeqCst);
            Ok::<(), String>(())
        }
    });
    handle.join().await.expect("runs to max_messages");
    assert_eq!(peak.load(Ordering::SeqCst), 4);
    assert_eq!(acked_offsets(&server).len(), 30);
}

/// A failing handler's delivery is nacked with the policy's delay for its
/// attempt and the error as reason; a panicking handler is nacked too; the
/// redelivery is then acked.
#[tokio::test]
async fn failures_are_nacked_with_delay() {
    let server = FakeServer::start().await;
    server.state.add_queue("jobs", 2);
    let policy = NackPolicy::exponential(Duration::from_millis(250), Duration::from_secs(10));
    let consumer = server
        .client()
        .consumer("jobs", ConsumerConfig { nack_delay: policy, max_messages: Some(4), ..config() })
        .expect("valid");
    let handle = consumer.spawn(|delivery: Delivery| async move {
        match (delivery.id.offset, delivery.attempt) {
            (0, 1) => Err("smtp timeout".to_owned()),
            (1, 1) => panic!("bad template"),
            _ => Ok(()),
        }
    });
    let stats = handle.join().await.expect("runs to max_messages");
    assert_eq!((stats.acked, stats.nacked), (2, 2));
    assert_eq!(acked_offsets(&server), vec![0, 1]);
    let mut nacked = server.state.lock().nacked.clone();
    nacked.sort_by_key(|(id, _, _)| id.offset);
    assert_eq!(nacked[0].1, 250, "attempt 1 waits the base delay");
    assert_eq!(nacked[0].2, "smtp timeout");
    assert!(nacked[1].2.contains("handler panicked: bad template"), "{}", nacked[1].2);
}

/// A handler done at its first poll is settled on the loop's task without
/// a task of its own; one that waits goes on as a task and is acked when it
/// ends; one that panics after waiting is nacked as a panic. Every message
/// is settled once either way.
#[tokio::test]
async fn handlers_done_at_first_poll_need_no_task() {
    let server = FakeServer::start().await;
    server.state.add_queue("jobs", 30);
    let consumer = server
        .client()
        .consumer(
            "jobs",
            ConsumerConfig {
                prefetch: 8,
                concurrency: 4,
                max_messages: Some(30),
                nack_delay: NackPolicy::immediate(),
                ..config()
            },
        )
        .expect("valid");
    let handle = consumer.spawn(|delivery: Delivery| async move {
        match delivery.id.offset % 3 {
            0 => Ok::<(), String>(()),
            1 => {
                tokio::task::yield_now().await;
                Ok(())
            }
            _ => {
                tokio::task::yield_now().await;
                panic!("after a wait")
            }
        }
    });
    let stats = handle.join().await.expect("runs to max_messages");

    assert_eq!(stats.handled, 30);
    assert_eq!(stats.handled_inline, 10, "only the handlers that never waited ran inline");
    assert_eq!((stats.acked, stats.nacked), (20, 10));
    let state = server.state.lock();
    assert!(state.nacked.iter().all(|(_, _, reason)| reason.contains("handler panicked: after a wait")));
    assert!(state.window_max <= 8, "window reached {}", state.window_max);
    assert_session_discipline(&state.sessions);
}

/// Handlers whose first polls run longer than INLINE_POLL_BUDGET (CPU work
/// before any await), INLINE_SLOW_POLLS in a row, make the loop spawn the
/// next INLINE_PROBE_INTERVAL handlers without polling them first; then it
/// tries inline again. Every message is still acked once.
#[tokio::test]
async fn slow_first_polls_switch_handlers_to_tasks() {
    let slow = u64::from(INLINE_SLOW_POLLS);
    // Two probes inline, the interval spawned, two more probes inline.
    let count = 2 * slow + u64::from(INLINE_PROBE_INTERVAL);
    let server = FakeServer::start().await;
    server.state.add_queue("jobs", count);
    let consumer = server
        .client()
        .consumer("jobs", ConsumerConfig { prefetch: 16, concurrency: 4, max_messages: Some(count), ..config() })
        .expect("valid");
    let handle = consumer.spawn(|_delivery: Delivery| async {
        // CPU work, not a wait: spin past the budget.
        let started = std::time::Instant::now();
        while started.elapsed() <= INLINE_POLL_BUDGET * 2 {
            std::hint::spin_loop();
        }
        Ok::<(), String>(())
    });
    let stats = handle.join().await.expect("runs to max_messages");

    assert_eq!(stats.handled, count);
    assert_eq!(stats.handled_inline, 2 * slow, "only the probes before and after the interval ran inline");
    assert_eq!(acked_offsets(&server), (0..count).collect::<Vec<u64>>());
    assert_session_discipline(&server.state.lock().sessions);
}

/// After the stream breaks, the consumer reconnects; deliveries it held are
/// dropped and the result of a handler that was running is not acked on the
/// new session (whose delivery ids collide with the old ones). Every message
/// ends up acked exactly once, the interrupted one after a redelivery.
#[tokio::test]
async fn reconnect_drops_held_deliveries_without_double_acks() {
    let server = FakeServer::start().await;
    server.state.add_queue("jobs", 4);
    let release = Arc::new(Semaphore::new(0));
    let started = Arc::new(Notify::new());
    let calls = Arc::new(AtomicU32::new(0));
    let consumer =
        server.client().consumer("jobs", ConsumerConfig { prefetch: 4, concurrency: 1, ..config() }).expect("valid");
    let (release_in, started_in, calls_in) = (release.clone(), started.clone(), calls.clone());
    let handle = consumer.spawn(move |_delivery: Delivery| {
        let (release, started, calls) = (release_in.clone(), started_in.clone(), calls_in.clone());
        async move {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                // The first handler blocks until the test lets it go.
                started.notify_one();
                release.acquire().await.expect("semaphore open").forget();
            }
            Ok::<(), String>(())
        }
    });
    started.notified().await;
    server.state.restart();
    eventually("a second session", || server.state.lock().sessions.len() >= 2).await;
    release.add_permits(1);
    eventually("all four acked", || acked_offsets(&server).len() >= 4).await;
    let stats = handle.stop().await.expect("stops");

    assert_eq!(acked_offsets(&server), vec![0, 1, 2, 3], "each message acked exactly once");
    assert_eq!(stats.abandoned, 1, "the interrupted handler's result was dropped");
    assert_eq!(stats.sessions, 2);
    assert_eq!(calls.load(Ordering::SeqCst), 5, "message 0 was handled twice (at-least-once)");
    let state = server.state.lock();
    assert_eq!(state.rejected, 0, "no ack named an unknown delivery");
    assert_session_discipline(&state.sessions);
    assert!(
        !state.sessions[0].requests.iter().any(|r| matches!(r, RequestKind::Ack(_))),
        "nothing was acked on the broken session"
    );
}

/// stop() waits for running handlers, sends their acks before closing the
/// stream, and releases deliveries that never started.
#[tokio::test]
async fn graceful_stop_finishes_in_flight_handlers() {
    let server = FakeServer::start().await;
    server.state.add_queue("jobs", 10);
    let release = Arc::new(Semaphore::new(0));
    let started = Arc::new(AtomicU32::new(0));
    let consumer =
        server.client().consumer("jobs", ConsumerConfig { prefetch: 10, concurrency: 2, ..config() }).expect("valid");
    let (release_in, started_in) = (release.clone(), started.clone());
    let handle = consumer.spawn(move |_delivery: Delivery| {
        let (release, started) = (release_in.clone(), started_in.clone());
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            release.acquire().await.expect("semaphore open").forget();
            Ok::<(), String>(())
        }
    });
    eventually("two handlers running", || started.load(Ordering::SeqCst) == 2).await;
    eventually("ten deliveries", || server.state.lock().sessions[0].delivered.len() == 10).await;

    let stopping = tokio::spawn(handle.stop());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!stopping.is_finished(), "stop waits for the running handlers");
    release.add_permits(2);
    let stats = stopping.await.expect("no panic").expect("stops");

    assert_eq!(stats.handled, 2, "no handler started after stop");
    assert_eq!(stats.acked, 2);
    assert_eq!(acked_offsets(&server), vec![0, 1]);
    let state = server.state.lock();
    assert!(state.sessions[0].closed_by_client, "the stream was half-closed after the acks");
    assert_eq!(state.ready.len(), 8, "unstarted deliveries were released");
    assert_session_discipline(&state.sessions);
}

/// With max_messages below the prefetch, the consumer subscribes with only
/// the credit it needs and leaves the rest of the queue alone.
#[tokio::test]
async fn max_messages_limits_credit() {
    let server = FakeServer::start().await;
    server.state.add_queue("jobs", 10);
    let consumer = server
        .client()
        .consumer("jobs", ConsumerConfig { prefetch: 100, max_messages: Some(3), ..config() })
        .expect("valid");
    let stats = consumer.spawn(|_d: Delivery| async { Ok::<(), String>(()) }).join().await.expect("runs");
    assert_eq!(stats.handled, 3);
    assert_eq!(acked_offsets(&server), vec![0, 1, 2]);
    let state = server.state.lock();
    assert_eq!(state.sessions[0].subscribe_credit, 3);
    assert_eq!(state.ready.len(), 7);
}

/// An unknown queue ends the consumer with NotFound instead of reconnecting
/// forever.
#[tokio::test]
async fn unknown_queue_is_fatal() {
    let server = FakeServer::start().await;
    let consumer = server.client().consumer("nope", config()).expect("valid");
    let error = consumer.spawn(|_d: Delivery| async { Ok::<(), String>(()) }).join().await.expect_err("fatal");
    assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
}

/// A broker that is down at start is retried until it is up; stop() during
/// the retries returns promptly.
#[tokio::test]
async fn stop_while_reconnecting() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let client = crate::Client::new(&addr.to_string()).expect("valid");
    let handle = client.consumer("jobs", config()).expect("valid").spawn(|_d: Delivery| async { Ok::<(), String>(()) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!handle.is_finished(), "a down broker is not fatal");
    let stats = tokio::time::timeout(Duration::from_secs(5), handle.stop()).await.expect("prompt").expect("ok");
    assert_eq!(stats.sessions, 0);
}

/// A node that takes the consume call and never confirms the subscription
/// (paused, its connection up) is given up after `subscribe_timeout`: a
/// client given a second address subscribes there and consumes. Without
/// it, every reconnect went back to the silent node.
#[tokio::test]
async fn a_silent_node_is_left_for_the_next_address() {
    let silent = FakeServer::start().await;
    silent.state.lock().silent_consumes = 8;
    let answering = FakeServer::start().await;
    answering.state.add_queue("jobs", 3);
    let client = crate::Client::new(&format!("{},{}", silent.addr, answering.addr)).expect("addresses");
    let subscribe_timeout = Duration::from_millis(300);
    let consumer = client
        .consumer("jobs", ConsumerConfig { subscribe_timeout, max_messages: Some(3), ..config() })
        .expect("valid");
    let start = Instant::now();
    let handle = consumer.spawn(|_d: Delivery| async { Ok::<(), String>(()) });
    let stats = tokio::time::timeout(5 * subscribe_timeout, handle.join())
        .await
        .expect("consumed from the second node within a few subscribe timeouts")
        .expect("ok");
    assert_eq!(stats.acked, 3, "after {:?}", start.elapsed());
    assert_eq!(acked_offsets(&answering), vec![0, 1, 2]);
    assert_eq!(silent.state.lock().silent_consumes, 7, "one call to the silent node");
}

/// Out-of-range settings are refused with the setting's name.
#[test]
fn config_validation() {
    assert!(ConsumerConfig::default().validate().is_ok());
    for (config, name) in [
        (ConsumerConfig { prefetch: 0, ..ConsumerConfig::default() }, "prefetch"),
        (ConsumerConfig { prefetch: contract::CREDIT_MAX + 1, ..ConsumerConfig::default() }, "prefetch"),
        (ConsumerConfig { concurrency: 0, ..ConsumerConfig::default() }, "concurrency"),
        (ConsumerConfig { max_messages: Some(0), ..ConsumerConfig::default() }, "max_messages"),
        (ConsumerConfig { extend_max: Some(Duration::ZERO), ..ConsumerConfig::default() }, "extend_max"),
    ] {
        let error = config.validate().expect_err("invalid");
        assert!(error.to_string().contains(name), "{error}");
    }
    assert!(ConsumerConfig { prefetch: contract::CREDIT_MAX, ..ConsumerConfig::default() }.validate().is_ok());
    let shortest = ConsumerConfig { extend_max: Some(Duration::from_millis(1)), ..ConsumerConfig::default() };
    assert!(shortest.validate().is_ok());
    assert!(ConsumerConfig { extend_max: None, ..ConsumerConfig::default() }.validate().is_ok(), "never extend");
}

/// Nack reasons are cut at a character boundary.
#[test]
fn truncate_respects_char_boundaries() {
    assert_eq!(truncate("héllo".into(), 2), "h");
    assert_eq!(truncate("hello".into(), 10), "hello");
}
