//! The web console and its JSON API on the metrics listener, end to end:
//! the API's figures are GetStats's, one queue's page carries a history
//! the stats tick samples, bad names and unknown queues get the right HTTP
//! status, and with an auth file the API wants a bearer token and shows
//! only the queues the token's principal has `stats` on.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    time::{Duration, Instant},
};

use ballast_proto::v1::{self as pb, stats_client::StatsClient};
use serde_json::Value;

use crate::support::{
    BrokerProcess, create, create_as, message, on_lane, publish, pull_ids, queue_settings, start_with_principals,
};

/// An HTTP answer: status code, head (lower-cased), body.
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("JSON expected ({e}): {}", self.body))
    }
}

/// `GET path` on `addr` over HTTP/1.0, with `Authorization: Bearer` when
/// `token` is given.
pub fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Answer {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the metrics listener");
    let authorization = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n{authorization}\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).expect("a status line");
    Answer { status, head: head.to_ascii_lowercase(), body: body.to_owned() }
}

/// GetStats of every queue (`queue` empty) or one, as JSON through the
/// same converter the API uses, so the two compare field by field.
async fn grpc_stats(broker: &BrokerProcess, queue: &str) -> Value {
    let mut client = StatsClient::new(broker.channel().await);
    let response = client.get_stats(pb::StatsRequest { queue: queue.into() }).await.unwrap().into_inner();
    ballast_broker::grpc::json::stats(&response)
}

/// `value` without its volatile parts: the time it was taken and the
/// oldest messages' ages (which grow by the millisecond), returned apart.
fn steady(mut value: Value) -> (Value, Vec<u64>) {
    let mut ages = Vec::new();
    value["at_ms"] = Value::Null;
    value["disk_free_bytes"] = Value::Null;
    for queue in value["queues"].as_array_mut().expect("queues") {
        let mut take = |saturation: &mut Value| {
            ages.push(saturation["oldest_age_ms"].as_u64().expect("an age"));
            saturation["oldest_age_ms"] = Value::Null;
        };
        take(&mut queue["saturation"]);
        for lane in queue["lanes"].as_array_mut().expect("lanes") {
            take(&mut lane["saturation"]);
        }
    }
    (value, ages)
}

/// The API's answer for `path` compared with GetStats taken just before
/// and just after it: when nothing moved between the two (no stats tick
/// fell between them), the API's figures must be exactly theirs, and its
/// ages between theirs. Tries again when a tick fell between.
async fn assert_api_equals_stats(broker: &BrokerProcess, path: &str, queue: &str, pick: impl Fn(Value) -> Value) {
    for _ in 0..50 {
        let before = grpc_stats(broker, queue).await;
        let api = get(broker.metrics_addr, path, None);
        let after = grpc_stats(broker, queue).await;
        assert_eq!(api.status, 200, "{}", api.body);
        let (before, ages_before) = steady(before);
        let (after, ages_after) = steady(after);
        if before != after {
            continue;
        }
        let (api, ages) = steady(pick(api.json()));
        assert_eq!(api, before, "the API's figures are GetStats's");
        for ((low, age), high) in ages_before.iter().zip(&ages).zip(&ages_after) {
            assert!(low <= age && age <= high, "age {age} between {low} and {high}");
        }
        return;
    }
    panic!("GetStats never held still across one API call");
}

/// Every figure `GET /api/v1/queues` and `GET /api/v1/queues/{name}`
/// serve is the one GetStats returns (depths, bytes, saturation, lanes,
/// in-flight, consumers, limits, refusals, rates), for a node with a
/// backlog on several lanes, a consumer holding deliveries and refusals.
#[tokio::test]
async fn the_api_serves_the_figures_of_get_stats() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "alpha", queue_settings()).await;
    create(&mut admin, "beta", pb::QueueSettings { max_messages: Some(4), ..queue_settings() }).await;
    let mut publisher = broker.publisher().await;
    for i in 0..5u32 {
        publish(&mut publisher, "alpha", on_lane(format!("a{i}"), i % 3)).await;
    }
    for i in 0..3 {
        publish(&mut publisher, "beta", message(format!("b{i}"))).await;
    }
    // The low lane's threshold (70% of 4) refuses the next low publish.
    let refused = publisher.publish(pb::PublishRequest { queue: "beta".into(), message: Some(on_lane("x", 2)) }).await;
    assert_eq!(refused.expect_err("beta is past its low lane's threshold").code(), tonic::Code::ResourceExhausted);
    let pulled = pull_ids(&mut broker.consumer().await, "alpha", 2).await;
    assert_eq!(pulled.len(), 2);

    assert_api_equals_stats(&broker, "/api/v1/queues", "", |v| v).await;
    let one = |mut v: Value| {
        serde_json::json!({
            "at_ms": v["at_ms"].take(),
            "disk_free_bytes": v["disk_free_bytes"].take(),
            "disk_free_min_bytes": v["disk_free_min_bytes"].take(),
            "queues": [v["queue"].take()],
        })
    };
    assert_api_equals_stats(&broker, "/api/v1/queues/beta", "beta", one).await;
    let list = get(broker.metrics_addr, "/api/v1/queues", None).json();
    let names: Vec<&str> = list["queues"].as_array().unwrap().iter().map(|q| q["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "alpha.dead", "beta", "beta.dead"]);
    let beta = &list["queues"][2];
    assert_eq!(beta["saturation"]["depth"], 3);
    assert_eq!(beta["refused_queue_full"], 1);
}

/// A queue's page carries its history: empty when first read, then one
/// sample per stats tick with the queue's depth and its lanes'.
#[tokio::test]
async fn a_queue_page_has_a_history_sampled_by_the_tick() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "jobs", queue_settings()).await;
    let mut publisher = broker.publisher().await;
    publish(&mut publisher, "jobs", on_lane("h", 0)).await;
    publish(&mut publisher, "jobs", on_lane("l", 2)).await;
    let first = get(broker.metrics_addr, "/api/v1/queues/jobs", None).json();
    assert_eq!(first["history"]["tick_ms"], 1000);
    assert_eq!(first["history"]["samples"], Value::Array(vec![]), "nobody looked before: no history");
    let deadline = Instant::now() + Duration::from_secs(10);
    let samples = loop {
        let page = get(broker.metrics_addr, "/api/v1/queues/jobs", None).json();
        let samples = page["history"]["samples"].as_array().unwrap().clone();
        if samples.len() >= 2 {
            break samples;
        }
        assert!(Instant::now() < deadline, "no two samples after 10 s: {samples:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let last = samples.last().unwrap();
    assert_eq!(last["depth"], 2);
    assert_eq!(last["lane_depths"], serde_json::json!([1, 0, 1]));
    assert!(samples[0]["at_ms"].as_u64() < last["at_ms"].as_u64(), "oldest first");
}

/// Bad input gets an HTTP status and a JSON message a person can act on;
/// the console's files are served with their types and a CSP that allows
/// only themselves.
#[tokio::test]
async fn bad_requests_and_the_console_files() {
    let broker = BrokerProcess::start();
    let unknown = get(broker.metrics_addr, "/api/v1/queues/nope", None);
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["code"], "not_found");
    let bad = get(broker.metrics_addr, "/api/v1/queues/Bad%20Name", None);
    assert_eq!(bad.status, 400);
    assert!(bad.json()["message"].as_str().unwrap().contains("invalid queue name"), "{}", bad.body);
    let page = get(broker.metrics_addr, "/", None);
    assert_eq!(page.status, 200);
    assert!(page.head.contains("content-type: text/html"), "{}", page.head);
    assert!(page.head.contains("content-security-policy: default-src 'none'; script-src 'self'"), "{}", page.head);
    assert!(page.body.contains("<script src=\"/console.js\""));
    for (path, kind) in [("/console.js", "text/javascript"), ("/console.css", "text/css")] {
        let asset = get(broker.metrics_addr, path, None);
        assert_eq!(asset.status, 200, "{path}");
        assert!(asset.head.contains(&format!("content-type: {kind}")), "{path}: {}", asset.head);
    }
}

/// With an auth file the API answers 401 (saying `Bearer`) without a
/// token or with an unknown one, lists only the queues the token's
/// principal has `stats` on, refuses another queue with 403 whether it
/// exists or not, and leaves the console's files (no data) open.
#[tokio::test]
async fn with_an_auth_file_the_api_wants_a_token_with_stats() {
    const OPS: &str = "ops-token-0123456789";
    const VIEWER: &str = "viewer-token-0123456789";
    const PUBLISHER: &str = "publisher-token-01234567";
    let (broker, _auth_dir) = start_with_principals(&[
        ("ops", OPS, r#"{ queues = "*", actions = ["admin", "stats"] }"#),
        ("viewer", VIEWER, r#"{ queues = "orders*", actions = ["stats"] }"#),
        ("publisher", PUBLISHER, r#"{ queues = "*", actions = ["publish"] }"#),
    ]);
    create_as(&broker, OPS, &["orders", "payments"]).await;
    let addr = broker.metrics_addr;

    for token in [None, Some("not-a-token")] {
        let refused = get(addr, "/api/v1/queues", token);
        assert_eq!(refused.status, 401, "{token:?}");
        assert!(refused.head.contains("www-authenticate: bearer"), "{}", refused.head);
        assert_eq!(refused.json()["code"], "unauthenticated");
    }
    let listed = get(addr, "/api/v1/queues", Some(VIEWER)).json();
    let names: Vec<&str> = listed["queues"].as_array().unwrap().iter().map(|q| q["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["orders", "orders.dead"], "only the queues the viewer has stats on");
    assert_eq!(get(addr, "/api/v1/queues/orders", Some(VIEWER)).status, 200);
    for queue in ["payments", "no-such-queue"] {
        let denied = get(addr, &format!("/api/v1/queues/{queue}"), Some(VIEWER));
        assert_eq!(denied.status, 403, "{queue}: {}", denied.body);
        assert_eq!(denied.json()["code"], "permission_denied");
    }
    let nothing = get(addr, "/api/v1/queues", Some(PUBLISHER)).json();
    assert_eq!(nothing["queues"], Value::Array(vec![]), "publish alone shows no queue");
    let all = get(addr, "/api/v1/queues", Some(OPS)).json();
    assert_eq!(all["queues"].as_array().unwrap().len(), 4);
    assert_eq!(get(addr, "/", None).status, 200, "the console's files hold no data and stay open");
    assert_eq!(get(addr, "/console.js", None).status, 200);
}
