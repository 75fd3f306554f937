//! A real `ballastd` process on a loopback port, and gRPC clients for it.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use ballast_proto::v1::{
    self as pb, admin_client::AdminClient, consumer_client::ConsumerClient, publisher_client::PublisherClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming, transport::Channel};

/// A `ballastd` child process on its own data directory.
pub struct BrokerProcess {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub data_dir: PathBuf,
    _dir: tempfile::TempDir,
    extra_args: Vec<String>,
    /// The child's RLIMIT_NOFILE (soft and hard), if the test sets one.
    open_files_max: Option<u64>,
}

impl BrokerProcess {
    pub fn start() -> BrokerProcess {
        BrokerProcess::start_with(&[])
    }

    /// Starts `ballastd` with extra flags (and a fresh data directory).
    pub fn start_with(extra_args: &[&str]) -> BrokerProcess {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        let data_dir = dir.path().join("data");
        let extra_args: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        let (child, addr, metrics_addr) = spawn(&data_dir, "127.0.0.1:0".parse().unwrap(), &extra_args, None);
        BrokerProcess { child: Some(child), addr, metrics_addr, data_dir, _dir: dir, extra_args, open_files_max: None }
    }

    /// Starts `ballastd` listening on `listen` (a cluster's peers must know
    /// each other's ports before they start), on a fresh data directory.
    pub fn start_at(listen: SocketAddr, extra_args: &[&str]) -> BrokerProcess {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        let data_dir = dir.path().join("data");
        let extra_args: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        let (child, addr, metrics_addr) = spawn(&data_dir, listen, &extra_args, None);
        BrokerProcess { child: Some(child), addr, metrics_addr, data_dir, _dir: dir, extra_args, open_files_max: None }
    }

    /// Sends a signal (SIGSTOP, SIGCONT) to the running child.
    pub fn signal(&self, signal_number: libc::c_int) {
        signal(self.child.as_ref().expect("running"), signal_number);
    }

    /// Whether the child is running (not killed or exited).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts `ballastd` with its soft and hard RLIMIT_NOFILE set to
    /// `open_files_max` (so it cannot raise it), on a fresh data directory.
    pub fn start_with_open_files_max(open_files_max: u64, extra_args: &[&str]) -> BrokerProcess {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
        let data_dir = dir.path().join("data");
        let extra_args: Vec<String> = extra_args.iter().map(|s| (*s).to_owned()).collect();
        let listen = "127.0.0.1:0".parse().unwrap();
        let (child, addr, metrics_addr) = spawn(&data_dir, listen, &extra_args, Some(open_files_max));
        let open_files_max = Some(open_files_max);
        BrokerProcess { child: Some(child), addr, metrics_addr, data_dir, _dir: dir, extra_args, open_files_max }
    }

    /// The child's pid, while it runs.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("ballastd is running").id()
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint()).unwrap().connect().await.expect("connect to ballastd")
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    pub async fn publisher(&self) -> PublisherClient<Channel> {
        PublisherClient::new(self.channel().await)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub async fn consumer(&self) -> ConsumerClient<Channel> {
        ConsumerClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    /// SIGKILL: no chance to sync or clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL ballastd");
            child.wait().expect("reap ballastd");
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("ballastd is running");
        signal(&child, libc::SIGTERM);
        wait_timeout(&mut child, Duration::from_secs(30)).expect("ballastd exits within 30 s of SIGTERM")
    }

    /// SIGTERM, and asserts a clean exit (status 0), with the broker's log
    /// in the failure message.
    pub fn terminate_cleanly(&mut self) {
        let status = self.terminate();
        if !status.success() {
            let log = std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default();
            panic!("ballastd did not exit cleanly after SIGTERM ({status}); its log:\n{log}");
        }
    }

    pub fn send_sigterm(&self) {
        signal(self.child.as_ref().expect("running"), libc::SIGTERM);
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_timeout(&mut child, Duration::from_secs(30)).expect("ballastd exits within 30 s")
    }

    /// Starts the broker again with other flags (same data and port).
    pub fn restart_with(&mut self, extra_args: &[&str]) {
        self.extra_args = extra_args.iter().map(|s| (*s).to_owned()).collect();
        self.restart();
    }

    /// `GET /metrics`: the Prometheus text.
    pub fn scrape(&self) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.metrics_addr).expect("connect to /metrics");
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_owned()
    }

    /// Starts the broker again on the same data directory and port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the broker before restarting it");
        let (child, addr, metrics_addr) = spawn(&self.data_dir, self.addr, &self.extra_args, self.open_files_max);
        self.child = Some(child);
        self.addr = addr;
        self.metrics_addr = metrics_addr;
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal})");
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spawn(
    data_dir: &Path,
    listen: SocketAddr,
    extra_args: &[String],
    open_files_max: Option<u64>,
) -> (Child, SocketAddr, SocketAddr) {
    // Binding a port just released by the previous process can race with
    // TIME_WAIT or another test; retry a few times.
    for attempt in 0..50 {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.with_extension("log"))
            .expect("broker log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_ballastd"));
        if let Some(max) = open_files_max {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit { rlim_cur: max as libc::rlim_t, rlim_max: max as libc::rlim_t };
            // SAFETY: between fork and exec only setrlimit runs, which is
            // async-signal-safe and reads `limit`, a copy owned by the closure.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn ballastd");
        let stdout = child.stdout.take().expect("stdout");
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        if let Some(addr) = line.trim().strip_prefix("listening on ") {
            let mut metrics = String::new();
            let _ = stdout.read_line(&mut metrics);
            let metrics = metrics.trim().strip_prefix("metrics on ").expect("the metrics address line");
            return (child, addr.parse().expect("address"), metrics.parse().expect("metrics address"));
        }
        let status = child.wait().expect("wait");
        let log = std::fs::read_to_string(data_dir.with_extension("log")).unwrap_or_default();
        if attempt == 49 || !log.contains("cannot listen") {
            panic!("ballastd did not start ({status}); its log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    unreachable!("the loop returns or panics")
}

pub fn queue_settings() -> pb::QueueSettings {
    pb::QueueSettings::default()
}

pub async fn create(admin: &mut AdminClient<Channel>, name: &str, settings: pb::QueueSettings) -> pb::QueueInfo {
    admin
        .create_queue(pb::CreateQueueRequest { name: name.into(), settings: Some(settings) })
        .await
        .unwrap_or_else(|s| panic!("create {name}: {s}"))
        .into_inner()
}

pub fn message(payload: impl Into<Vec<u8>>) -> pb::Message {
    pb::Message { payload: payload.into().into(), ..Default::default() }
}

pub fn on_lane(payload: impl Into<Vec<u8>>, lane: u32) -> pb::Message {
    pb::Message { lane: Some(lane), ..message(payload) }
}

pub async fn publish(publisher: &mut PublisherClient<Channel>, queue: &str, message: pb::Message) -> pb::Receipt {
    publisher
        .publish(pb::PublishRequest { queue: queue.into(), message: Some(message) })
        .await
        .unwrap_or_else(|s| panic!("publish to {queue}: {s}"))
        .into_inner()
        .receipt
        .expect("a receipt")
}

pub async fn publish_batch(
    publisher: &mut PublisherClient<Channel>,
    queue: &str,
    messages: Vec<pb::Message>,
) -> Vec<pb::Receipt> {
    publisher
        .publish_batch(pb::PublishBatchRequest { queue: queue.into(), messages })
        .await
        .unwrap_or_else(|s| panic!("publish batch to {queue}: {s}"))
        .into_inner()
        .receipts
}

pub async fn depth(admin: &mut AdminClient<Channel>, queue: &str) -> u64 {
    admin.get_queue(pb::GetQueueRequest { name: queue.into() }).await.expect("get queue").into_inner().depth
}

/// A consume stream: send requests with the helpers, read with `next`.
pub struct Session {
    requests: mpsc::Sender<pb::ConsumeRequest>,
    responses: Streaming<pb::ConsumeResponse>,
}

impl Session {
    pub async fn open(consumer: &mut ConsumerClient<Channel>, queue: &str, credit: u32) -> Session {
        Session::try_open(consumer, queue, credit).await.unwrap_or_else(|s| panic!("subscribe to {queue}: {s}"))
    }

    pub async fn try_open(consumer: &mut ConsumerClient<Channel>, queue: &str, credit: u32) -> Result<Session, Status> {
        let (requests, rx) = mpsc::channel(1024);
        requests.send(subscribe(queue, credit)).await.unwrap();
        let mut responses = consumer.consume(ReceiverStream::new(rx)).await?.into_inner();
        match responses.message().await?.and_then(|r| r.kind) {
            Some(pb::consume_response::Kind::Subscribed(s)) => {
                assert!(s.consumer_id > 0);
                Ok(Session { requests, responses })
            }
            other => panic!("expected subscribed, got {other:?}"),
        }
    }

    /// Ends the request side (a half-close, as a client that is done
    /// sending does) and returns the response side, still open.
    pub fn half_close(self) -> Streaming<pb::ConsumeResponse> {
        self.responses
    }

    /// The stream's request side, for sending from another task.
    pub fn sender(&self) -> mpsc::Sender<pb::ConsumeRequest> {
        self.requests.clone()
    }

    pub async fn send(&self, kind: pb::consume_request::Kind) {
        self.requests.send(pb::ConsumeRequest { kind: Some(kind) }).await.expect("stream open");
    }

    pub async fn credit(&self, credit: u32) {
        self.send(pb::consume_request::Kind::Credit(pb::Credit { credit })).await;
    }

    pub async fn ack(&self, delivery_ids: Vec<u64>) {
        self.send(pb::consume_request::Kind::Ack(pb::Ack { delivery_ids })).await;
    }

    pub async fn nack(&self, delivery_id: u64, delay_ms: u64, reason: &str) {
        self.send(pb::consume_request::Kind::Nack(pb::Nack { delivery_id, delay_ms, reason: reason.into() })).await;
    }

    /// The next response, or `None` if none arrives within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Result<pb::consume_response::Kind, Status>> {
        match tokio::time::timeout(wait, self.responses.message()).await {
            Err(_) => None,
            Ok(Ok(Some(response))) => Some(Ok(response.kind.expect("a response kind"))),
            Ok(Ok(None)) => Some(Err(Status::new(Code::Ok, "stream ended"))),
            Ok(Err(status)) => Some(Err(status)),
        }
    }

    /// The next delivery (panics on anything else or after 10 s).
    pub async fn delivery(&mut self) -> pb::Delivery {
        match self.next_within(Duration::from_secs(10)).await {
            Some(Ok(pb::consume_response::Kind::Delivery(d))) => d,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    /// Asserts that nothing arrives for `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(response) = self.next_within(wait).await {
            panic!("expected nothing for {wait:?}, got {response:?}");
        }
    }
}

pub fn subscribe(queue: &str, credit: u32) -> pb::ConsumeRequest {
    pb::ConsumeRequest {
        kind: Some(pb::consume_request::Kind::Subscribe(pb::Subscribe { queue: queue.into(), credit })),
    }
}

/// Asserts a call failed with `code` and a message containing `needle`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, needle: &str) {
    match result {
        Err(status) => {
            assert_eq!(status.code(), code, "status {status:?}");
            assert!(status.message().contains(needle), "message {:?} should mention {needle:?}", status.message());
        }
        Ok(value) => panic!("expected {code:?} ({needle}), got Ok({value:?})"),
    }
}

/// One queue's Stats.
pub async fn stats(broker: &BrokerProcess, queue: &str) -> pb::QueueStats {
    let mut client = ballast_proto::v1::stats_client::StatsClient::new(broker.channel().await);
    let response = client.get_stats(pb::StatsRequest { queue: queue.into() }).await.unwrap().into_inner();
    response.queues.into_iter().next().expect("the queue's stats")
}

/// The value of the sample `name{labels}` in Prometheus text.
pub fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().parse().expect("a number"))
}

/// Every queue's name, as ListQueues sorts them.
pub async fn queue_names(admin: &mut AdminClient<Channel>) -> Vec<String> {
    let queues = admin.list_queues(pb::ListQueuesRequest {}).await.expect("list queues").into_inner().queues;
    queues.into_iter().map(|q| q.name).collect()
}

/// Polls `done` until it holds; panics with `what` after 30 s.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "still waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A broker whose auth file holds `principals`, each `(name, token,
/// rules)` with `rules` the TOML of its `allow` entries; and the directory
/// holding the file (removed when dropped).
pub fn start_with_principals(principals: &[(&str, &str, &str)]) -> (BrokerProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let path = dir.path().join("auth.toml");
    let text: String = principals
        .iter()
        .map(|(name, token, rules)| {
            let digest = ballast_broker::auth::token_sha256_hex(token);
            format!("[[principals]]\nname = \"{name}\"\ntoken_sha256 = \"{digest}\"\nallow = [ {rules} ]\n\n")
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    (BrokerProcess::start_with(&["--auth-file", path.to_str().unwrap()]), dir)
}

/// Creates queues `names` (default settings) as the principal of `token`.
pub async fn create_as(broker: &BrokerProcess, token: &str, names: &[&str]) {
    let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().expect("an ASCII token");
    let bearer = move |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", value.clone());
        Ok(request)
    };
    let mut admin = AdminClient::with_interceptor(broker.channel().await, bearer);
    for name in names {
        let request = pb::CreateQueueRequest { name: (*name).into(), settings: Some(queue_settings()) };
        admin.create_queue(request).await.unwrap_or_else(|s| panic!("create {name}: {s}"));
    }
}

/// The delivery ids of one Pull of up to `max_messages` from `queue`.
pub async fn pull_ids(consumer: &mut ConsumerClient<Channel>, queue: &str, max_messages: u32) -> Vec<u64> {
    let request = pb::PullRequest { queue: queue.into(), max_messages, wait_ms: 1_000 };
    let response = consumer.pull(request).await.unwrap_or_else(|s| panic!("pull from {queue}: {s}"));
    response.into_inner().deliveries.iter().map(|d| d.delivery_id).collect()
}
