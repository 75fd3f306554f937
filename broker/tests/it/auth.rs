//! Authentication and per-queue authorization (`--auth-file`), end to end:
//! who gets UNAUTHENTICATED and who PERMISSION_DENIED, what listings show,
//! that a forbidden queue's existence stays hidden, dead letters, reload
//! without restart, and the hold-off of peers that keep failing.

use std::{path::PathBuf, time::Duration};

use ballast_broker::auth::token_sha256_hex;
use ballast_proto::v1::{
    self as pb, admin_client::AdminClient, consumer_client::ConsumerClient, publisher_client::PublisherClient,
    stats_client::StatsClient,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Request, Status,
    metadata::{MetadataKey, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use crate::support::{BrokerProcess, message, subscribe};

const OPS: &str = "ops-token-0123456789";
const ORDERS: &str = "orders-token-0123456789";
const PUBLISH_ONLY: &str = "publish-only-token-0123";
const DLQ_READER: &str = "dlq-reader-token-0123";

/// Sends `authorization: Bearer <token>` (or nothing) on every call.
#[derive(Clone)]
struct Bearer(Option<String>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            let value = MetadataValue::try_from(format!("Bearer {token}")).expect("ascii token");
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

type Via = InterceptedService<Channel, Bearer>;

/// The gRPC clients of one principal (or of nobody).
struct As {
    admin: AdminClient<Via>,
    publisher: PublisherClient<Via>,
    consumer: ConsumerClient<Via>,
    stats: StatsClient<Via>,
}

async fn as_token(broker: &BrokerProcess, token: Option<&str>) -> As {
    let channel = broker.channel().await;
    let bearer = Bearer(token.map(str::to_owned));
    As {
        admin: AdminClient::with_interceptor(channel.clone(), bearer.clone()),
        publisher: PublisherClient::with_interceptor(channel.clone(), bearer.clone()),
        consumer: ConsumerClient::with_interceptor(channel.clone(), bearer.clone()),
        stats: StatsClient::with_interceptor(channel, bearer),
    }
}

fn principal(name: &str, token: &str, rules: &str) -> String {
    format!(
        "[[principals]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\nallow = [ {rules} ]\n\n",
        token_sha256_hex(token)
    )
}

/// The principals every test starts with.
fn principals() -> String {
    [
        principal("ops", OPS, r#"{ queues = "*", actions = ["publish", "consume", "admin", "stats"] }"#),
        principal("orders", ORDERS, r#"{ queues = "orders*", actions = ["publish", "consume", "admin", "stats"] }"#),
        principal("publisher", PUBLISH_ONLY, r#"{ queues = "*", actions = ["publish"] }"#),
        principal("dlq-reader", DLQ_READER, r#"{ queues = "jobs.dead", actions = ["consume"] }"#),
    ]
    .concat()
}

/// A broker with `text` as its auth file, and the file's path.
fn start(text: &str) -> (BrokerProcess, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let path = dir.path().join("auth.toml");
    std::fs::write(&path, text).unwrap();
    let broker = BrokerProcess::start_with(&["--auth-file", path.to_str().unwrap()]);
    (broker, dir, path)
}

/// Replaces the auth file in one step (a rename), as editors and config
/// tools do.
fn replace(path: &PathBuf, text: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, path).unwrap();
}

async fn create(client: &mut As, name: &str, settings: pb::QueueSettings) {
    let request = pb::CreateQueueRequest { name: name.into(), settings: Some(settings) };
    client.admin.create_queue(request).await.unwrap_or_else(|s| panic!("create {name}: {s}"));
}

async fn publish(client: &mut As, queue: &str) -> Result<pb::PublishResponse, Status> {
    let request = pb::PublishRequest { queue: queue.into(), message: Some(message("m")) };
    client.publisher.publish(request).await.map(tonic::Response::into_inner)
}

async fn pull(client: &mut As, queue: &str) -> Result<Vec<pb::Delivery>, Status> {
    let request = pb::PullRequest { queue: queue.into(), max_messages: 10, wait_ms: 2_000 };
    client.consumer.pull(request).await.map(|r| r.into_inner().deliveries)
}

async fn consume(client: &mut As, queue: &str) -> Result<(), Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(subscribe(queue, 10)).await.unwrap();
    let mut stream = client.consumer.consume(ReceiverStream::new(rx)).await?.into_inner();
    stream.message().await.map(|_| ())
}

async fn list(client: &mut As) -> Result<Vec<String>, Status> {
    let queues = client.admin.list_queues(pb::ListQueuesRequest {}).await?.into_inner().queues;
    Ok(queues.into_iter().map(|q| q.name).collect())
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, needles: &[&str]) -> Status {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    for needle in needles {
        assert!(status.message().contains(needle), "{needle:?} not in {status:?}");
    }
    status
}

/// No token, a malformed authorization and an unknown token are each
/// UNAUTHENTICATED saying which; reflection needs a principal too, health
/// checks do not; a valid token passes; and the failures are audited.
#[tokio::test]
async fn missing_malformed_or_unknown_credentials_are_unauthenticated() {
    let (broker, _dir, _path) = start(&principals());
    let mut nobody = as_token(&broker, None).await;
    assert_code(list(&mut nobody).await, Code::Unauthenticated, &["no credentials"]);
    assert_code(publish(&mut nobody, "q").await, Code::Unauthenticated, &["no credentials"]);
    let mut wrong = as_token(&broker, Some("not-a-token")).await;
    assert_code(list(&mut wrong).await, Code::Unauthenticated, &["unknown token"]);
    let mut request = Request::new(pb::ListQueuesRequest {});
    request.metadata_mut().insert("authorization", MetadataValue::from_static("Basic b3BzOnB3"));
    let malformed = broker.admin().await.list_queues(request).await;
    assert_code(malformed, Code::Unauthenticated, &["malformed", "Bearer"]);

    let channel = broker.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let check = tonic_health::pb::HealthCheckRequest { service: String::new() };
    assert!(health.check(check).await.is_ok(), "health checks stay open");
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let reflect = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let refused = reflection.server_reflection_info(tokio_stream::iter([reflect()])).await;
    assert_code(refused, Code::Unauthenticated, &["no credentials"]);
    let mut reflection = ServerReflectionClient::with_interceptor(channel, Bearer(Some(ORDERS.into())));
    let mut answers = reflection.server_reflection_info(tokio_stream::iter([reflect()])).await.unwrap().into_inner();
    assert!(answers.message().await.unwrap().is_some(), "any principal may reflect");

    let mut ops = as_token(&broker, Some(OPS)).await;
    assert_eq!(list(&mut ops).await.unwrap(), Vec::<String>::new());
    let log = std::fs::read_to_string(broker.data_dir.with_extension("log")).unwrap();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("ballast::audit")).collect();
    for reason in ["missing", "malformed", "unknown_token"] {
        assert!(audit.iter().any(|l| l.contains(&format!("\"{reason}\""))), "{reason} audited:\n{log}");
    }
    assert!(audit.iter().all(|l| !l.contains("not-a-token")), "tokens never reach the log");
    let metrics = broker.scrape();
    for reason in ["missing", "malformed", "unknown_token"] {
        let count = crate::support::sample(&metrics, "ballast_auth_failures_total", &format!("reason=\"{reason}\""));
        assert!(count >= Some(1.0), "{reason}: {count:?}");
    }
}

/// A principal allowed to publish but not consume gets PERMISSION_DENIED
/// naming the action and the queue on Consume, Pull, Ack, Nack, Extend and Peek, and the
/// message is not delivered to it: a principal that may consume gets it
/// as its first delivery.
#[tokio::test]
async fn a_publish_only_principal_cannot_consume() {
    let (broker, _dir, _path) = start(&principals());
    let mut ops = as_token(&broker, Some(OPS)).await;
    create(&mut ops, "jobs", pb::QueueSettings::default()).await;
    let mut publisher = as_token(&broker, Some(PUBLISH_ONLY)).await;
    publish(&mut publisher, "jobs").await.expect("publish is allowed");
    let needles = ["\"publisher\"", "consume", "\"jobs\""];
    assert_code(consume(&mut publisher, "jobs").await, Code::PermissionDenied, &needles);
    assert_code(pull(&mut publisher, "jobs").await, Code::PermissionDenied, &needles);
    let ack = pb::AckRequest { queue: "jobs".into(), delivery_ids: vec![1] };
    assert_code(publisher.consumer.ack(ack).await, Code::PermissionDenied, &needles);
    let nack = pb::NackRequest { queue: "jobs".into(), delivery_id: 1, delay_ms: 0, reason: String::new() };
    assert_code(publisher.consumer.nack(nack).await, Code::PermissionDenied, &needles);
    let extend = pb::ExtendRequest { queue: "jobs".into(), delivery_ids: vec![1], lease_ms: 0 };
    assert_code(publisher.consumer.extend(extend).await, Code::PermissionDenied, &needles);
    let peek = pb::PeekRequest { queue: "jobs".into(), start: None, max_messages: 1 };
    assert_code(publisher.consumer.peek(peek).await, Code::PermissionDenied, &needles);
    let redrive = pb::RedriveRequest { name: "jobs".into(), max_messages: 0, reason: String::new() };
    assert_code(publisher.admin.redrive(redrive).await, Code::PermissionDenied, &["admin", "\"jobs\""]);
    let update = pb::UpdateQueueRequest { name: "jobs".into(), settings: None };
    assert_code(publisher.admin.update_queue(update).await, Code::PermissionDenied, &["admin", "\"jobs\""]);
    let create_request = pb::CreateQueueRequest { name: "other".into(), settings: None };
    assert_code(publisher.admin.create_queue(create_request).await, Code::PermissionDenied, &["admin", "\"other\""]);
    let deliveries = pull(&mut ops, "jobs").await.unwrap();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].attempt, 1, "never delivered before");
    // The admin action and the refusals are audit lines naming the
    // principal, the peer, the queue, the action and the outcome.
    let log = std::fs::read_to_string(broker.data_dir.with_extension("log")).unwrap();
    let audited = |needles: &[&str]| {
        log.lines()
            .any(|l| l.contains("ballast::audit") && l.contains("127.0.0.1:") && needles.iter().all(|n| l.contains(n)))
    };
    assert!(audited(&["\"ops\"", "\"jobs\"", "\"create\"", "\"ok\""]), "{log}");
    assert!(audited(&["\"publisher\"", "\"jobs\"", "\"consume\"", "\"denied\""]), "{log}");
    assert!(audited(&["\"publisher\"", "\"other\"", "\"admin\"", "\"denied\""]), "{log}");
}

/// ListQueues, GetStats and Watch without a queue show only the queues the
/// principal may see (admin for the list, stats for the figures).
#[tokio::test]
async fn listings_show_only_permitted_queues() {
    let (broker, _dir, _path) = start(&principals());
    let mut ops = as_token(&broker, Some(OPS)).await;
    for name in ["billing", "orders-eu", "orders-us"] {
        create(&mut ops, name, pb::QueueSettings::default()).await;
    }
    let mut orders = as_token(&broker, Some(ORDERS)).await;
    // Every queue has its dead-letter queue, which follows it.
    let permitted = ["orders-eu", "orders-eu.dead", "orders-us", "orders-us.dead"];
    assert_eq!(list(&mut orders).await.unwrap(), permitted);
    assert_eq!(list(&mut ops).await.unwrap()[..2], ["billing", "billing.dead"]);
    let names = |response: pb::StatsResponse| response.queues.into_iter().map(|q| q.name).collect::<Vec<_>>();
    let stats = orders.stats.get_stats(pb::StatsRequest { queue: String::new() }).await.unwrap().into_inner();
    assert_eq!(names(stats), permitted);
    let watch = pb::WatchRequest { queue: String::new(), interval_ms: 100 };
    let mut stream = orders.stats.watch(watch).await.unwrap().into_inner();
    for _ in 0..2 {
        assert_eq!(names(stream.message().await.unwrap().expect("a tick")), permitted);
    }
    let mut publisher = as_token(&broker, Some(PUBLISH_ONLY)).await;
    assert_eq!(list(&mut publisher).await.unwrap(), Vec::<String>::new(), "no admin rule, nothing listed");
    let watch_one = pb::WatchRequest { queue: "billing".into(), interval_ms: 100 };
    assert_code(orders.stats.watch(watch_one).await, Code::PermissionDenied, &["stats", "\"billing\""]);
}

/// Asking for a forbidden queue gives the same answer whether it exists or
/// not, on every call that names a queue.
#[tokio::test]
async fn a_forbidden_queue_existence_is_not_revealed() {
    let (broker, _dir, _path) = start(&principals());
    let mut ops = as_token(&broker, Some(OPS)).await;
    create(&mut ops, "billing", pb::QueueSettings::default()).await;
    let mut orders = as_token(&broker, Some(ORDERS)).await;
    let mut answers = Vec::new();
    for name in ["billing", "billing-missing"] {
        let get = orders.admin.get_queue(pb::GetQueueRequest { name: name.into() }).await.map(|_| ());
        let purge = orders.admin.purge_queue(pb::PurgeQueueRequest { name: name.into() }).await.map(|_| ());
        let delete = orders.admin.delete_queue(pb::DeleteQueueRequest { name: name.into() }).await.map(|_| ());
        let stats = orders.stats.get_stats(pb::StatsRequest { queue: name.into() }).await.map(|_| ());
        let published = publish(&mut orders, name).await.map(|_| ());
        let pulled = pull(&mut orders, name).await.map(|_| ());
        let consumed = consume(&mut orders, name).await;
        let statuses: Vec<(Code, String)> = [get, purge, delete, stats, published, pulled, consumed]
            .into_iter()
            .map(|r| {
                let status = r.expect_err("forbidden");
                assert_eq!(status.code(), Code::PermissionDenied, "{name}: {status:?}");
                (status.code(), status.message().replace(name, "<queue>"))
            })
            .collect();
        answers.push(statuses);
    }
    assert_eq!(answers[0], answers[1], "existing and missing queues answer alike");
    assert_eq!(list(&mut ops).await.unwrap(), ["billing", "billing.dead"], "nothing was deleted");
}

/// Dead letters are readable by principals allowed on the source queue and
/// by a rule naming the dead-letter queue, and by nobody else.
#[tokio::test]
async fn dead_letters_follow_their_source_queue() {
    let text = principals()
        + &principal("other", "other-token-0123456789", r#"{ queues = "other*", actions = ["consume"] }"#)
        + &principal("jobs-only", "jobs-token-0123456789", r#"{ queues = "jobs", actions = ["consume"] }"#);
    let (broker, _dir, _path) = start(&text);
    let mut ops = as_token(&broker, Some(OPS)).await;
    let settings = pb::QueueSettings { max_attempts: Some(1), dead_letter: Some(true), ..Default::default() };
    create(&mut ops, "jobs", settings).await;
    for _ in 0..2 {
        publish(&mut ops, "jobs").await.unwrap();
    }
    // The moves to jobs.dead are internal: they need no permission there.
    for delivery in pull(&mut ops, "jobs").await.unwrap() {
        let id = delivery.delivery_id;
        let nack = pb::NackRequest { queue: "jobs".into(), delivery_id: id, delay_ms: 0, reason: "bad".into() };
        ops.consumer.nack(nack).await.unwrap();
    }
    let mut other = as_token(&broker, Some("other-token-0123456789")).await;
    assert_code(pull(&mut other, "jobs.dead").await, Code::PermissionDenied, &["consume", "\"jobs.dead\""]);
    let mut reader = as_token(&broker, Some(DLQ_READER)).await;
    assert_code(pull(&mut reader, "jobs").await, Code::PermissionDenied, &["\"jobs\""]);
    let mut jobs_only = as_token(&broker, Some("jobs-token-0123456789")).await;
    let one = pb::PullRequest { queue: "jobs.dead".into(), max_messages: 1, wait_ms: 2_000 };
    let dead = jobs_only.consumer.pull(one).await.expect("allowed through its source queue").into_inner();
    assert_eq!(dead.deliveries.len(), 1, "a dead letter");
    let other_one = pull(&mut reader, "jobs.dead").await.expect("allowed by the rule naming it");
    assert_eq!(other_one.len(), 1, "the other dead letter");
}

/// The health service stays open, but a queue's entry answers only a
/// caller allowed its stats: to anyone else (no credentials, or a principal
/// without stats on it) it is NOT_FOUND word for word as for a queue that
/// does not exist. A bad token on a health check is UNAUTHENTICATED.
#[tokio::test]
async fn queue_health_entries_are_not_an_existence_oracle() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let (broker, _dir, _path) = start(&principals());
    let mut ops = as_token(&broker, Some(OPS)).await;
    create(&mut ops, "billing", pb::QueueSettings::default()).await;
    let channel = broker.channel().await;
    let check = |token: Option<&str>, service: &str| {
        let mut health = HealthClient::with_interceptor(channel.clone(), Bearer(token.map(str::to_owned)));
        let request = HealthCheckRequest { service: service.to_owned() };
        async move { health.check(request).await.map(|r| r.into_inner().status) }
    };
    // The queue's entry appears at the next stats tick.
    eventually("billing's health entry", || {
        let answer = check(Some(OPS), "ballast.v1.Queue/billing");
        async move { answer.await.is_ok() }
    })
    .await;
    let missing = check(None, "ballast.v1.Queue/nope").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    for token in [None, Some(ORDERS)] {
        let hidden = check(token, "ballast.v1.Queue/billing").await.unwrap_err();
        assert_eq!((hidden.code(), hidden.message()), (missing.code(), missing.message()), "{token:?}");
    }
    assert!(check(None, "").await.is_ok(), "the overall entry stays open");
    assert!(check(None, "ballast.v1.Publisher").await.is_ok());
    let bad = check(Some("guess"), "").await.unwrap_err();
    assert_eq!(bad.code(), Code::Unauthenticated);
}

/// Calls `probe` until it holds, at most 30 s.
async fn eventually<F: Future<Output = bool>>(what: &str, mut probe: impl FnMut() -> F) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !probe().await {
        assert!(std::time::Instant::now() < deadline, "still waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A changed auth file takes effect without a restart (found by polling
/// its modification time, and at once on SIGHUP); a broken one is logged
/// and the principals in force stay.
#[tokio::test]
async fn the_auth_file_reloads_without_restart() {
    let (broker, _dir, path) = start(&principals());
    let fresh = "fresh-token-0123456789";
    let mut ops = as_token(&broker, Some(OPS)).await;
    create(&mut ops, "jobs", pb::QueueSettings::default()).await;
    // Streams ops holds open across the reload.
    let (requests, rx) = tokio::sync::mpsc::channel(4);
    requests.send(subscribe("jobs", 10)).await.unwrap();
    let mut consuming = ops.consumer.consume(ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert!(consuming.message().await.unwrap().is_some(), "subscribed");
    let watch = pb::WatchRequest { queue: String::new(), interval_ms: 100 };
    let mut watching = ops.stats.watch(watch).await.unwrap().into_inner();
    let mut newcomer = as_token(&broker, Some(fresh)).await;
    assert_code(list(&mut newcomer).await, Code::Unauthenticated, &["unknown token"]);
    // The file changes: the new principal is in, ops is out.
    replace(&path, &principal("fresh", fresh, r#"{ queues = "*", actions = ["admin"] }"#));
    // Found by the poll of the file's modification time, no signal sent.
    // (Waiting on the log: probing with the new token would count failed
    // authentications until the reload, and the hold-off would slow it.)
    let log_path = broker.data_dir.with_extension("log");
    let reloads = || std::fs::read_to_string(&log_path).unwrap_or_default().matches("auth file reloaded").count();
    eventually("the poll to reload the file", || {
        let done = reloads() == 1;
        async move { done }
    })
    .await;
    assert!(list(&mut newcomer).await.is_ok(), "the new token works");
    assert_code(list(&mut ops).await, Code::Unauthenticated, &["unknown token"]);
    // The streams ops had open end too.
    let ended = tokio::time::timeout(Duration::from_secs(10), consuming.message()).await.expect("the stream ends");
    assert_code(ended, Code::Unauthenticated, &["no longer holds"]);
    let watch_end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match watching.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    });
    assert_code(watch_end.await.expect("the watch ends"), Code::Unauthenticated, &["no longer holds"]);
    // A broken file: logged, and the principals in force stay.
    replace(&path, "[[principals]]\nname = \"broken\"\ntoken_sha256 = \"xyz\"\n");
    broker_signal(&broker, libc::SIGHUP);
    eventually("the broken file to be logged", || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        async move { log.contains("the previous principals stay in force") && log.contains("64 hex digits") }
    })
    .await;
    assert!(list(&mut newcomer).await.is_ok(), "the old principals stay");
    // SIGHUP reloads a good file at once (the poll may find it too).
    replace(&path, &principals());
    broker_signal(&broker, libc::SIGHUP);
    eventually("the SIGHUP reload", || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let done = log.lines().any(|l| l.contains("auth file reloaded") && l.contains("SIGHUP"));
        async move { done }
    })
    .await;
    assert!(list(&mut ops).await.is_ok(), "ops is back");
    assert_code(list(&mut newcomer).await, Code::Unauthenticated, &["unknown token"]);
}

fn broker_signal(broker: &BrokerProcess, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(broker.pid()).unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// A broken auth file stops the start, naming the file, line and principal.
#[tokio::test]
async fn a_broken_auth_file_stops_the_start() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("auth.toml");
    std::fs::write(&path, principals() + "[[principals]]\nname = \"twice\"\ntoken_sha256 = \"abc\"\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ballastd"))
        .args(["--data-dir", dir.path().join("data").to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0", "--auth-file", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("auth.toml") && stderr.contains("line 21") && stderr.contains("\"twice\""), "{stderr}");
}

/// After AUTH_FAILURES_MAX failures in a window, the peer's calls are
/// RESOURCE_EXHAUSTED with a retry-after hint, even with a valid token
/// (guessing stops), while health checks stay open; the first
/// AUTH_FAILURES_MAX failures are each UNAUTHENTICATED.
#[tokio::test]
async fn repeated_failures_hold_the_peer_off() {
    use ballast_broker::limits::{AUTH_FAILURE_WINDOW_MS, AUTH_FAILURES_MAX};
    let (broker, _dir, _path) = start(&principals());
    let mut wrong = as_token(&broker, Some("guess")).await;
    for _ in 0..AUTH_FAILURES_MAX {
        assert_code(list(&mut wrong).await, Code::Unauthenticated, &["unknown token"]);
    }
    let held = assert_code(list(&mut wrong).await, Code::ResourceExhausted, &["too many failed authentications"]);
    let retry: u64 = held.metadata().get("retry-after-ms").unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=AUTH_FAILURE_WINDOW_MS).contains(&retry), "{retry}");
    assert_eq!(held.metadata().get("ballast-reason").unwrap(), "auth_failures");
    let mut ops = as_token(&broker, Some(OPS)).await;
    assert_code(list(&mut ops).await, Code::ResourceExhausted, &["retry in"]);
    let mut health = tonic_health::pb::health_client::HealthClient::new(broker.channel().await);
    let check = tonic_health::pb::HealthCheckRequest { service: String::new() };
    assert!(health.check(check).await.is_ok());
}

/// Before credentials are checked: oversized metadata and thousands of
/// entries are RESOURCE_EXHAUSTED (the size check comes first), many
/// concurrent unauthenticated calls on one connection are all refused
/// cleanly, and the broker stays healthy.
#[tokio::test]
async fn bad_input_before_auth_is_refused_cleanly() {
    let (broker, _dir, _path) = start(&principals());
    let mut admin = broker.admin().await;
    let mut big = Request::new(pb::ListQueuesRequest {});
    big.metadata_mut().insert("x-big", MetadataValue::try_from("v".repeat(70 * 1024)).unwrap());
    assert_code(admin.list_queues(big).await, Code::ResourceExhausted, &["metadata"]);
    let mut many = Request::new(pb::ListQueuesRequest {});
    for i in 0..3000 {
        let key = MetadataKey::from_bytes(format!("x-h-{i}").as_bytes()).unwrap();
        many.metadata_mut().insert(key, MetadataValue::from_static("v"));
    }
    let status = admin.list_queues(many).await.expect_err("refused");
    assert!(matches!(status.code(), Code::ResourceExhausted), "{status:?}");
    // Many concurrent calls on one connection, none with credentials: each
    // is refused (UNAUTHENTICATED until the hold-off starts, then
    // RESOURCE_EXHAUSTED), none hangs.
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let mut admin = admin.clone();
        calls.spawn(async move { admin.list_queues(pb::ListQueuesRequest {}).await });
    }
    let results = tokio::time::timeout(Duration::from_secs(30), calls.join_all()).await.expect("all answered");
    for result in results {
        let code = result.expect_err("refused").code();
        assert!(matches!(code, Code::Unauthenticated | Code::ResourceExhausted), "{code:?}");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(broker.channel().await);
    let check = tonic_health::pb::HealthCheckRequest { service: String::new() };
    assert!(health.check(check).await.is_ok(), "the broker stays healthy");
}

/// A publish stream is authenticated once, when it opens, and every
/// request is checked against the principal's `publish` permission on its
/// own queue: a forbidden request is answered PERMISSION_DENIED (the
/// queue's existence not revealed) and the stream goes on.
#[tokio::test]
async fn publish_stream_requests_are_each_checked_for_their_queue() {
    let (broker, _dir, _path) = start(&principals());
    let mut ops = as_token(&broker, Some(OPS)).await;
    create(&mut ops, "orders-eu", pb::QueueSettings::default()).await;
    create(&mut ops, "payments", pb::QueueSettings::default()).await;
    let mut orders = as_token(&broker, Some(ORDERS)).await;
    let (requests, outbound) = tokio::sync::mpsc::channel(8);
    let mut answers = orders.publisher.publish_stream(ReceiverStream::new(outbound)).await.unwrap().into_inner();
    let request = |sequence, queue: &str| pb::PublishStreamRequest {
        sequence,
        queue: queue.into(),
        messages: vec![message("m")],
    };
    for (sequence, queue) in [(1, "payments"), (2, "no-such-queue"), (3, "orders-eu")] {
        requests.send(request(sequence, queue)).await.unwrap();
        let answer = answers.message().await.unwrap().expect("an answer");
        assert_eq!(answer.sequence, sequence);
        match queue {
            "orders-eu" => assert!(answer.error.is_none() && answer.receipts.len() == 1, "{answer:?}"),
            _ => {
                let error = answer.error.expect("refused");
                assert_eq!(error.code, Code::PermissionDenied as i32, "{error:?}");
                assert!(error.message.contains("publish"), "{error:?}");
            }
        }
    }
    // Without credentials the stream does not open at all.
    let mut nobody = as_token(&broker, None).await;
    let (_requests, outbound) = tokio::sync::mpsc::channel(1);
    let opened = nobody.publisher.publish_stream(ReceiverStream::new(outbound)).await;
    assert_code(opened.map(|_| ()), Code::Unauthenticated, &[]);
}
