//! A real `ballastd` child process on a loopback port with its own data
//! directory, and a recording relay in front of it.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ballast_client::contract;
use ballast_proto::v1::{
    self as pb,
    publisher_client::PublisherClient,
    publisher_server::{Publisher, PublisherServer},
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Status};

/// A `ballastd` process, killed on drop.
pub struct Broker {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// Where its Prometheus `/metrics` endpoint listens (a free port, so
    /// brokers of parallel tests do not collide on the default 7401).
    pub metrics_addr: SocketAddr,
    data_dir: PathBuf,
    /// Flags passed on every start after the defaults.
    extra_args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with(&[])
    }

    /// A broker started with `extra_args` after the test defaults.
    pub fn start_with(extra_args: &[&str]) -> Broker {
        let extra_args: Vec<String> = extra_args.iter().map(|arg| (*arg).to_owned()).collect();
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        // Small segments: every lane preallocates one, and the default 64 MiB
        // makes creating a queue take seconds on a busy test machine.
        std::fs::write(config_path(&data_dir), "[storage]\nsegment_size = 4194304\n").expect("write config");
        let (child, addr, metrics_addr) = spawn(&data_dir, "127.0.0.1:0".parse().expect("address"), &extra_args);
        Broker { child: Some(child), addr, metrics_addr, data_dir, extra_args, _dir: dir }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self) -> ballast_client::Client {
        ballast_client::Client::new(&self.url()).expect("valid address")
    }

    /// SIGKILL: no chance to sync or say goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL ballastd");
            child.wait().expect("reap ballastd");
        }
    }

    /// Starts the broker again on the same data directory and port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill the broker before restarting it");
        let (child, addr, metrics_addr) = spawn(&self.data_dir, self.addr, &self.extra_args);
        self.child = Some(child);
        self.addr = addr;
        self.metrics_addr = metrics_addr;
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `target/<profile>/ballastd`, next to the directory holding this test
/// executable (`target/<profile>/deps/it-...`).
fn ballastd() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("ballastd"))
        .expect("the test executable lives in target/<profile>/deps");
    assert!(
        path.exists(),
        "{} does not exist: the client's end-to-end tests run the real broker; \
         build it first with `cargo build -p ballast-broker` (same profile and target dir)",
        path.display()
    );
    path
}

fn config_path(data_dir: &Path) -> PathBuf {
    data_dir.with_extension("toml")
}

/// Starts `ballastd` and reads the addresses it prints: `listening on ADDR`
/// then `metrics on ADDR`.
fn spawn(data_dir: &Path, listen: SocketAddr, extra_args: &[String]) -> (Child, SocketAddr, SocketAddr) {
    let log_path = data_dir.with_extension("log");
    // Binding a port just released by the killed process can race with
    // TIME_WAIT; retry a few times.
    for attempt in 0..50 {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("broker log file");
        let mut child = Command::new(ballastd())
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .arg("--config")
            .arg(config_path(data_dir))
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn ballastd");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        if let Some(addr) = line.trim().strip_prefix("listening on ") {
            let mut metrics = String::new();
            let _ = stdout.read_line(&mut metrics);
            let metrics = metrics.trim().strip_prefix("metrics on ").unwrap_or_else(|| {
                panic!("ballastd printed {metrics:?} after its gRPC address, not `metrics on ADDR`")
            });
            return (
                child,
                addr.parse().expect("ballastd prints a socket address"),
                metrics.parse().expect("ballastd prints the metrics socket address"),
            );
        }
        let status = child.wait().expect("wait for ballastd");
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if attempt == 49 || !log.contains("cannot listen") {
            panic!("ballastd did not start ({status}); its log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    unreachable!("the loop returns or panics")
}

/// Waits (with a deadline) until `check` returns true.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Broker {
    /// `GET /metrics`: the broker's Prometheus text.
    pub fn scrape(&self) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.metrics_addr).expect("connect to /metrics");
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("send the request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read the response");
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_owned()
    }
}

/// The value of the sample `name{labels}` in Prometheus text.
pub fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines().find_map(|line| line.strip_prefix(&prefix)).map(|value| value.trim().parse().expect("a number"))
}

/// A gRPC relay between a producer and the real broker that records when
/// each publish attempt arrived and when its answer left, so a test can
/// measure the client's waits between attempts on the broker's real answers.
/// Refusals pass through with their retry-after hint and figures.
pub struct Relay {
    pub addr: SocketAddr,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    task: tokio::task::JoinHandle<()>,
}

/// One publish attempt as the relay saw it.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When the request reached the relay.
    pub at: Instant,
    /// When the relay sent the broker's answer back.
    pub answered: Instant,
    /// The broker's status code (`Ok` for a receipt).
    pub code: Code,
    /// The broker's retry-after hint, on a refusal.
    pub retry_after: Option<Duration>,
}

impl Relay {
    /// Starts a relay to `broker` on a free loopback port.
    pub async fn start(broker: &Broker) -> Relay {
        let upstream = PublisherClient::new(
            tonic::transport::Endpoint::from_shared(broker.url()).expect("valid address").connect_lazy(),
        );
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let service = RelayService { upstream, attempts: attempts.clone() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        let router = tonic::transport::Server::builder().add_service(PublisherServer::new(service));
        let task = tokio::spawn(async move {
            router.serve_with_incoming(TcpListenerStream::new(listener)).await.expect("relay runs");
        });
        Relay { addr, attempts, task }
    }

    pub fn client(&self) -> ballast_client::Client {
        ballast_client::Client::new(&format!("http://{}", self.addr)).expect("valid address")
    }

    /// Every attempt so far, in arrival order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().expect("not poisoned").clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct RelayService {
    upstream: PublisherClient<tonic::transport::Channel>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
}

impl RelayService {
    fn record<T>(&self, at: Instant, result: Result<tonic::Response<T>, Status>) -> Result<tonic::Response<T>, Status> {
        let (code, retry_after, result) = match result {
            Ok(response) => (Code::Ok, None, Ok(tonic::Response::new(response.into_inner()))),
            Err(status) => {
                let retry_after = status
                    .metadata()
                    .get(contract::RETRY_AFTER_METADATA)
                    .and_then(|value| value.to_str().ok()?.parse().ok())
                    .map(Duration::from_millis);
                (status.code(), retry_after, Err(forwarded(&status)))
            }
        };
        let answered = Instant::now();
        self.attempts.lock().expect("not poisoned").push(Attempt { at, answered, code, retry_after });
        result
    }
}

/// The broker's status with the contract's metadata (and nothing of the
/// transport's, such as content-type, which the relay sets itself).
fn forwarded(status: &Status) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    for key in [
        contract::RETRY_AFTER_METADATA,
        contract::LANE_METADATA,
        contract::LANE_INDEX_METADATA,
        contract::DEPTH_METADATA,
        contract::BYTES_METADATA,
        contract::SATURATION_METADATA,
        contract::THRESHOLD_METADATA,
        contract::DISK_FREE_BYTES_METADATA,
    ] {
        if let Some(value) = status.metadata().get(key) {
            metadata.insert(key, value.clone());
        }
    }
    if let Some(value) = status.metadata().get_bin(contract::LANE_BIN_METADATA) {
        metadata.insert_bin(contract::LANE_BIN_METADATA, value.clone());
    }
    Status::with_metadata(status.code(), status.message(), metadata)
}

#[tonic::async_trait]
impl Publisher for RelayService {
    type PublishStreamStream = tokio_stream::wrappers::ReceiverStream<Result<pb::PublishStreamResponse, Status>>;

    /// Not relayed: the relay answers as a broker from before the stream,
    /// so a producer behind it falls back to the unary calls it records.
    async fn publish_stream(
        &self,
        _request: tonic::Request<tonic::Streaming<pb::PublishStreamRequest>>,
    ) -> Result<tonic::Response<Self::PublishStreamStream>, Status> {
        Err(Status::unimplemented("the relay passes unary publishes only"))
    }

    async fn publish(
        &self,
        request: tonic::Request<pb::PublishRequest>,
    ) -> Result<tonic::Response<pb::PublishResponse>, Status> {
        let at = Instant::now();
        let result = self.upstream.clone().publish(request.into_inner()).await;
        self.record(at, result)
    }

    async fn publish_batch(
        &self,
        request: tonic::Request<pb::PublishBatchRequest>,
    ) -> Result<tonic::Response<pb::PublishBatchResponse>, Status> {
        let at = Instant::now();
        let result = self.upstream.clone().publish_batch(request.into_inner()).await;
        self.record(at, result)
    }
}
