//! The disk and the node: the data directory's lock, failing and full
//! disks, storage errors as clients see them.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::support::*;

/// Every regular file under `dir` with its contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                files.insert(entry.path(), std::fs::read(entry.path()).unwrap());
            }
        }
    }
    files
}

/// A second `ballastd` on a data directory a running one holds exits at
/// once, non-zero, with a message naming the directory and the holder, and
/// changes no file; the first goes on serving, its messages intact.
#[tokio::test]
async fn a_second_broker_on_the_same_data_dir_is_refused() {
    let broker = BrokerProcess::start();
    create(&mut broker.admin().await, "held", queue_settings()).await;
    publish_batch(&mut broker.publisher().await, "held", (0..20).map(|i| message(format!("{i}"))).collect()).await;
    let before = snapshot(&broker.data_dir);

    let mut second = Command::new(env!("CARGO_BIN_EXE_ballastd"))
        .arg("--data-dir")
        .arg(&broker.data_dir)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run a second ballastd");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while second.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            second.kill().unwrap();
            let output = second.wait_with_output().unwrap();
            panic!("the second broker is still running after 30 s: {}", String::from_utf8_lossy(&output.stdout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the second broker must refuse; it exited with {}", output.status);
    assert!(
        stderr.contains("is in use by another broker") && stderr.contains(&broker.data_dir.display().to_string()),
        "the refusal names the directory: {stderr}"
    );
    let pid = broker_pid(&broker);
    assert!(stderr.contains(&format!("pid {pid}")), "the refusal names the holder (pid {pid}): {stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("listening on"), "it never served");
    assert_eq!(snapshot(&broker.data_dir), before, "the refused broker changed no file");

    assert_eq!(depth(&mut broker.admin().await, "held").await, 20);
    publish(&mut broker.publisher().await, "held", message("still serving")).await;
    assert_eq!(depth(&mut broker.admin().await, "held").await, 21);
}

/// The lock dies with its process: after a SIGKILL (the lock file left
/// behind) the broker restarts on the same directory.
#[tokio::test]
async fn the_lock_does_not_outlive_a_killed_broker() {
    let mut broker = BrokerProcess::start();
    create(&mut broker.admin().await, "k", queue_settings()).await;
    publish(&mut broker.publisher().await, "k", message("one")).await;
    broker.kill();
    assert!(broker.data_dir.join("lock").exists());
    broker.restart();
    assert_eq!(depth(&mut broker.admin().await, "k").await, 1);
}

/// The pid written in the lock file by the running broker.
fn broker_pid(broker: &BrokerProcess) -> u32 {
    let text = std::fs::read_to_string(broker.data_dir.join("lock")).expect("the lock file");
    text.trim().parse().expect("a pid")
}

/// An in-process broker (through the library) whose logs' I/O goes through
/// one fault seam, on a fresh data directory with 64 KiB segments.
struct InProcess {
    addr: std::net::SocketAddr,
    /// `None` when another recorder was installed first.
    metrics_addr: Option<std::net::SocketAddr>,
    data_dir: PathBuf,
    faults: std::sync::Arc<ballast_storage::Faults>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    async fn start() -> InProcess {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let data_dir = dir.path().join("data");
        let faults = ballast_storage::Faults::new();
        let mut config = ballast_broker::Config {
            data_dir: data_dir.clone(),
            disk_free_min_bytes: 0,
            faults: ballast_broker::config::FaultSeam(Some(faults.clone())),
            ..ballast_broker::Config::default()
        };
        config.storage.segment_size = 64 * 1024;
        // One recorder for the test process, installed before any broker
        // opens (queues take their metric handles then).
        // `None` if some other test of this process installed one first;
        // the metric checks then say they are skipped.
        static RECORDER: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
            std::sync::OnceLock::new();
        let handle = RECORDER.get_or_init(ballast_broker::metrics::install).clone();
        let broker = ballast_broker::Broker::open(config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = handle.is_some().then(|| metrics.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server =
            tokio::spawn(ballast_broker::server::serve(broker, listener, handle.map(|h| (metrics, h)), async {
                let _ = stopped.await;
            }));
        InProcess { addr, metrics_addr, data_dir, faults, stop: Some(stop), server: Some(server), _dir: dir }
    }

    async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap()
    }

    /// The queue's status in the gRPC health service.
    async fn health(&self, queue: &str) -> i32 {
        let mut client = tonic_health::pb::health_client::HealthClient::new(self.channel().await);
        let request = tonic_health::pb::HealthCheckRequest { service: format!("ballast.v1.Queue/{queue}") };
        match client.check(request).await {
            Ok(response) => response.into_inner().status,
            // Not reported yet: statuses follow the broker's stats tick.
            Err(status) if status.code() == Code::NotFound => -1,
            Err(status) => panic!("health check of {queue}: {status}"),
        }
    }

    /// Waits (30 s at most) until the queue's health is `status`.
    async fn wait_health(&self, queue: &str, status: tonic_health::ServingStatus) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.health(queue).await != status as i32 {
            assert!(std::time::Instant::now() < deadline, "{queue} never became {status:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asserts `ballast_queue_storage_failed` of one lane, from
    /// `GET /metrics`.
    async fn assert_storage_failed_gauge(&self, queue: &str, lane: &str, expected: f64) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Some(addr) = self.metrics_addr else {
            eprintln!("another metrics recorder is installed in this process: gauge check skipped");
            return;
        };
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let value = sample(&response, "ballast_queue_storage_failed", &format!("queue=\"{queue}\",lane=\"{lane}\""));
        assert_eq!(value, Some(expected), "ballast_queue_storage_failed of {queue}/{lane}");
    }

    async fn lane_failed(&self, queue: &str) -> bool {
        let mut client = pb::stats_client::StatsClient::new(self.channel().await);
        let stats = client.get_stats(pb::StatsRequest { queue: queue.into() }).await.unwrap().into_inner();
        stats.queues[0].lanes.iter().any(|lane| lane.storage_failed)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.server.take().unwrap().await.unwrap().unwrap();
    }
}

use ballast_proto::v1 as pb;
use tonic::Code;

/// One publish of `payload`, its status on failure.
async fn try_publish(
    publisher: &mut pb::publisher_client::PublisherClient<tonic::transport::Channel>,
    queue: &str,
    payload: String,
) -> Result<pb::Receipt, tonic::Status> {
    publisher
        .publish(pb::PublishRequest { queue: queue.into(), message: Some(message(payload)) })
        .await
        .map(|r| r.into_inner().receipt.expect("a receipt"))
}

/// Every payload left in `queue`, read through a consume stream.
async fn drain(channel: tonic::transport::Channel, queue: &str, count: u64) -> Vec<String> {
    let mut consumer = pb::consumer_client::ConsumerClient::new(channel);
    let mut session = Session::open(&mut consumer, queue, 10_000).await;
    let mut payloads = Vec::new();
    for _ in 0..count {
        payloads.push(String::from_utf8(session.delivery().await.payload.to_vec()).unwrap());
    }
    session.expect_silence(Duration::from_millis(200)).await;
    payloads
}

/// EIO from fsync and from write, through the storage fault seam, on a
/// running broker: the publish whose sync failed is refused UNAVAILABLE
/// with retry-after-ms and an error id (no path); the queue reports it
/// (health NOT_SERVING, the lane's `storage_failed`) while the disk keeps
/// failing, refuses publishes meanwhile, and recovers by itself once the
/// disk works (the lane's log reopened); nothing acknowledged is lost, and
/// nothing is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_fsync_and_write_are_refused_reported_and_recovered() {
    use tonic_health::ServingStatus;
    let broker = InProcess::start().await;
    let mut admin = pb::admin_client::AdminClient::new(broker.channel().await);
    create(&mut admin, "f", queue_settings()).await;
    let mut publisher = pb::publisher_client::PublisherClient::new(broker.channel().await);
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        try_publish(&mut publisher, "f", format!("m{i}")).await.unwrap();
        acknowledged.push(format!("m{i}"));
    }
    broker.wait_health("f", ServingStatus::Serving).await;

    broker.faults.fail_syncs(u64::MAX);
    let status = try_publish(&mut publisher, "f", "lost-1".into()).await.expect_err("the sync failed");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.metadata().get("retry-after-ms").is_some(), "{status:?}");
    assert!(status.message().contains("error id"), "{status:?}");
    assert!(!status.message().contains(&*broker.data_dir.to_string_lossy()), "no path to clients: {status:?}");
    broker.wait_health("f", ServingStatus::NotServing).await;
    assert!(broker.lane_failed("f").await);
    broker.assert_storage_failed_gauge("f", "normal", 1.0).await;
    broker.assert_storage_failed_gauge("f", "high", 0.0).await;
    let status = try_publish(&mut publisher, "f", "lost-2".into()).await.expect_err("still failing");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    broker.faults.fail_syncs(0);
    broker.wait_health("f", ServingStatus::Serving).await;
    assert!(!broker.lane_failed("f").await);
    broker.assert_storage_failed_gauge("f", "normal", 0.0).await;
    try_publish(&mut publisher, "f", "after-sync".into()).await.unwrap();
    acknowledged.push("after-sync".into());

    broker.faults.fail_writes(1);
    let status = try_publish(&mut publisher, "f", "lost-3".into()).await.expect_err("the write failed");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Retried as a client would, after retry-after-ms, until it lands
    // (the lane may be reopened before any tick reports it).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let receipt = loop {
        match try_publish(&mut publisher, "f", "after-write".into()).await {
            Ok(receipt) => break receipt,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(std::time::Instant::now() < deadline, "the lane never recovered");
                let retry: u64 = status.metadata().get("retry-after-ms").unwrap().to_str().unwrap().parse().unwrap();
                tokio::time::sleep(Duration::from_millis(retry)).await;
            }
        }
    };
    acknowledged.push("after-write".into());
    assert_eq!(receipt.id.unwrap().offset, 21, "the failed appends' offsets are reused");

    let mut delivered = drain(broker.channel().await, "f", acknowledged.len() as u64).await;
    delivered.sort();
    acknowledged.sort();
    assert_eq!(delivered, acknowledged, "every acknowledged message, once; none of the refused ones");
    broker.stop().await;
}

/// ENOSPC through the fault seam when a publish needs a new segment: the
/// publish is refused RESOURCE_EXHAUSTED with `retry-after-ms` and
/// `ballast-reason: disk_full` (like the watermark's refusal), stores
/// nothing, and does not poison the queue; CreateQueue is refused the same
/// way with nothing half-created; both work once space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_through_the_seam_is_resource_exhausted_with_a_reason() {
    use tonic_health::ServingStatus;
    let broker = InProcess::start().await;
    let mut admin = pb::admin_client::AdminClient::new(broker.channel().await);
    create(&mut admin, "e", queue_settings()).await;
    let mut publisher = pb::publisher_client::PublisherClient::new(broker.channel().await);
    broker.faults.set_disk_full(true);
    let mut acknowledged = 0u64;
    let status = loop {
        match try_publish(&mut publisher, "e", format!("{acknowledged:04}{}", "x".repeat(1000))).await {
            Ok(_) => acknowledged += 1,
            Err(status) => break status,
        }
        assert!(acknowledged < 1000, "the current segment never filled");
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.metadata().get("ballast-reason").unwrap(), "disk_full");
    assert!(status.metadata().get("retry-after-ms").unwrap().to_str().unwrap().parse::<u64>().unwrap() > 0);
    assert!(status.message().contains("disk is full"), "{status:?}");
    assert!(!status.message().contains(&*broker.data_dir.to_string_lossy()), "no path to clients: {status:?}");
    assert!(!broker.lane_failed("e").await, "ENOSPC refuses, it does not poison");
    let mut stats = pb::stats_client::StatsClient::new(broker.channel().await);
    let figures = stats.get_stats(pb::StatsRequest { queue: "e".into() }).await.unwrap().into_inner();
    assert_eq!(figures.queues[0].refused_disk_full, 1, "a real ENOSPC counts as a disk-full refusal");

    let refused = admin
        .create_queue(pb::CreateQueueRequest { name: "g".into(), settings: Some(queue_settings()) })
        .await
        .expect_err("no space for its segments");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("disk is full"), "{refused:?}");
    assert_eq!(queue_names(&mut admin).await, ["e", "e.dead"]);
    let queues_dir = broker.data_dir.join("queues");
    wait_until("the failed creation's directories to go", || std::fs::read_dir(&queues_dir).unwrap().count() == 2)
        .await;

    broker.faults.set_disk_full(false);
    try_publish(&mut publisher, "e", "after".into()).await.unwrap();
    create(&mut admin, "g", queue_settings()).await;
    assert_eq!(depth(&mut admin, "e").await, acknowledged + 1);
    broker.wait_health("e", ServingStatus::Serving).await;
    broker.stop().await;
}

/// Queue names at the documented limit and one past it: a 128-byte name
/// is created with its dead-letter queue (whose name is 133 bytes; before,
/// a 124..=128-byte name was refused for `<name>.dead`, a name the user
/// never typed); 129 bytes is INVALID_ARGUMENT about the name typed.
#[tokio::test]
async fn queue_names_at_the_limit_and_one_past() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    let at_limit = "n".repeat(128);
    let info = create(&mut admin, &at_limit, queue_settings()).await;
    assert_eq!(info.name, at_limit);
    let dead = format!("{at_limit}.dead");
    assert_eq!(queue_names(&mut admin).await, [at_limit.clone(), dead.clone()]);
    assert_eq!(depth(&mut admin, &dead).await, 0, "the dead-letter queue answers under its name");
    publish(&mut broker.publisher().await, &at_limit, message("x")).await;

    let past = "n".repeat(129);
    let refused =
        admin.create_queue(pb::CreateQueueRequest { name: past.clone(), settings: Some(queue_settings()) }).await;
    assert_status(refused, Code::InvalidArgument, "longer than 128 bytes");
    let refused =
        admin.create_queue(pb::CreateQueueRequest { name: past.clone(), settings: Some(queue_settings()) }).await;
    let message = refused.unwrap_err().message().to_owned();
    assert!(message.contains(&format!("{past:?}")), "the message is about the name typed: {message}");
    assert!(!message.contains(".dead"), "not about a name the user never typed: {message}");
}

/// A storage failure reaches the client as INTERNAL with an error id and
/// no path; the broker's log has the id with the detail (the path). Here
/// the queues directory is replaced by a file under the running broker, so
/// CreateQueue cannot make the queue's directory.
#[tokio::test]
async fn storage_errors_carry_an_error_id_not_a_path() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    let queues = broker.data_dir.join("queues");
    std::fs::rename(&queues, broker.data_dir.join("queues.moved")).unwrap();
    std::fs::write(&queues, b"not a directory").unwrap();
    let status = admin
        .create_queue(pb::CreateQueueRequest { name: "p".into(), settings: Some(queue_settings()) })
        .await
        .expect_err("the queue's directory cannot be made");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let message = status.message();
    assert!(message.starts_with("storage failure, error id "), "{message}");
    assert!(message.ends_with("; see the broker log"), "{message}");
    assert!(!message.contains('/'), "no path reaches the client: {message}");
    let id = message.trim_start_matches("storage failure, error id ").trim_end_matches("; see the broker log");
    let log = std::fs::read_to_string(broker.data_dir.with_extension("log")).unwrap();
    let line = log.lines().find(|line| line.contains(id)).unwrap_or_else(|| panic!("error id {id} not logged:\n{log}"));
    assert!(line.contains(&*queues.to_string_lossy()), "the log line has the detail: {line}");
}

/// A tmpfs of a given size mounted on a fresh directory, unmounted when
/// dropped (also when the test panics).
struct TmpfsMount {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TmpfsMount {
    /// Mounts one, or says loudly why not: `None` only when
    /// `BALLAST_SKIP_TMPFS=1` allows skipping; otherwise a failed mount
    /// fails the test (CI runs as root).
    fn new(size: &str) -> Option<TmpfsMount> {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let why = match output {
            Ok(out) if out.status.success() => return Some(TmpfsMount { path: dir.path().to_owned(), _dir: dir }),
            Ok(out) => format!("mount exited with {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
            Err(e) => format!("cannot run mount: {e}"),
        };
        eprintln!("\n*** cannot mount a {size} tmpfs for a real ENOSPC test ({why}); the test needs root ***");
        let skip = std::env::var("BALLAST_SKIP_TMPFS").is_ok_and(|v| v == "1");
        assert!(skip, "mounting a tmpfs failed ({why}); run as root, or set BALLAST_SKIP_TMPFS=1 to skip");
        eprintln!("*** BALLAST_SKIP_TMPFS=1: skipped ***\n");
        None
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        match Command::new("umount").arg(&self.path).status() {
            Ok(status) if status.success() => {}
            other => eprintln!("umount {} failed: {other:?}", self.path.display()),
        }
    }
}

/// A `ballastd` child on a given data directory, SIGKILLed when dropped
/// (before the filesystem under it is unmounted).
struct Ballastd {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Ballastd {
    fn start(data_dir: &Path, log: &Path, args: &[&str]) -> Ballastd {
        use std::io::BufRead;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ballastd"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let addr =
            line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("ballastd did not start: {line:?}"));
        Ballastd { addr: addr.parse().unwrap(), child }
    }

    async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap()
    }
}

impl Drop for Ballastd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real ENOSPC: `ballastd` (64 KiB segments, no watermark) on a 4 MiB
/// tmpfs, partly taken by a filler file. Publishes fill it until one is
/// refused RESOURCE_EXHAUSTED with `retry-after-ms` and `ballast-reason:
/// disk_full`; CreateQueue is refused the same way, leaving nothing; once
/// the filler is deleted publishes and creation work again; after a
/// SIGKILL and restart every acknowledged message is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_on_a_real_small_filesystem() {
    let Some(mount) = TmpfsMount::new("4m") else { return };
    let scratch = tempfile::tempdir().unwrap();
    let config = scratch.path().join("ballastd.toml");
    std::fs::write(&config, "[storage]\nsegment_size = 65536\n").unwrap();
    let config = config.to_str().unwrap().to_owned();
    let args = ["--config", &config, "--disk-free-min-bytes", "0"];
    let filler = mount.path.join("filler");
    std::fs::write(&filler, vec![1u8; 1 << 20]).unwrap();
    let data_dir = mount.path.join("data");
    let log = scratch.path().join("ballastd.log");
    let broker = Ballastd::start(&data_dir, &log, &args);
    let mut admin = pb::admin_client::AdminClient::new(broker.channel().await);
    create(&mut admin, "full", queue_settings()).await;
    let mut publisher = pb::publisher_client::PublisherClient::new(broker.channel().await);

    let mut acknowledged: Vec<String> = Vec::new();
    let refusal = loop {
        let payloads: Vec<String> =
            (0..8).map(|i| format!("{:06}-{}", acknowledged.len() + i, "x".repeat(1000))).collect();
        let messages = payloads.iter().map(|p| message(p.clone())).collect();
        match publisher.publish_batch(pb::PublishBatchRequest { queue: "full".into(), messages }).await {
            Ok(_) => acknowledged.extend(payloads),
            Err(status) => break status,
        }
        assert!(acknowledged.len() < 10_000, "4 MiB never filled");
    };
    assert!(acknowledged.len() > 100, "only {} messages fit", acknowledged.len());
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert_eq!(refusal.metadata().get("ballast-reason").unwrap(), "disk_full", "{refusal:?}");
    let retry: u64 = refusal.metadata().get("retry-after-ms").unwrap().to_str().unwrap().parse().unwrap();
    assert!(retry > 0);
    assert!(refusal.message().contains("disk is full"), "{refusal:?}");
    assert!(!refusal.message().contains(&*mount.path.to_string_lossy()), "no path to clients: {refusal:?}");

    let status = admin
        .create_queue(pb::CreateQueueRequest { name: "later".into(), settings: Some(queue_settings()) })
        .await
        .expect_err("no room for a new queue");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("disk is full"), "{status:?}");
    assert_eq!(queue_names(&mut admin).await, ["full", "full.dead"], "nothing half-created");

    std::fs::remove_file(&filler).unwrap();
    let payload = "after-space-returned".to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match try_publish(&mut publisher, "full", payload.clone()).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(std::time::Instant::now() < deadline, "publishes never resumed: {status:?}");
                tokio::time::sleep(Duration::from_millis(retry)).await;
            }
        }
    }
    acknowledged.push(payload);
    create(&mut admin, "later", queue_settings()).await;

    drop(publisher);
    drop(admin);
    drop(broker);
    let broker = Ballastd::start(&data_dir, &log, &args);
    let mut admin = pb::admin_client::AdminClient::new(broker.channel().await);
    let total = depth(&mut admin, "full").await;
    assert_eq!(total, acknowledged.len() as u64, "depth after the restart");
    let delivered = drain(broker.channel().await, "full", total).await;
    let delivered: std::collections::BTreeSet<String> = delivered.into_iter().collect();
    let lost: Vec<&String> = acknowledged.iter().filter(|p| !delivered.contains(*p)).collect();
    assert!(lost.is_empty(), "{} acknowledged messages lost, e.g. {:?}", lost.len(), lost.first());
    drop(broker);
    drop(mount);
}

/// An ack the broker took but whose journal write failed is undone by the
/// reopen that recovers the lane (only journaled acks are kept), so the
/// message is pending again: it must be delivered again, not stranded in
/// the depth until a restart (found by `ballast-bench chaos --disk-full`:
/// the queue never drained). A message leased at the time is not
/// delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_lost_with_a_failed_journal_write_is_delivered_again() {
    use tonic_health::ServingStatus;
    let broker = InProcess::start().await;
    let mut admin = pb::admin_client::AdminClient::new(broker.channel().await);
    create(&mut admin, "r", queue_settings()).await;
    let mut publisher = pb::publisher_client::PublisherClient::new(broker.channel().await);
    try_publish(&mut publisher, "r", "acked".into()).await.unwrap();
    try_publish(&mut publisher, "r", "leased".into()).await.unwrap();
    broker.wait_health("r", ServingStatus::Serving).await;
    let mut consumer = pb::consumer_client::ConsumerClient::new(broker.channel().await);
    let mut session = Session::open(&mut consumer, "r", 2).await;
    let first = session.delivery().await;
    let second = session.delivery().await;
    let (acked, leased) = if first.payload == "acked".as_bytes() { (first, second) } else { (second, first) };

    // The next write is the ack's journal entry: it fails, the lane is
    // poisoned, then reopened from what was journaled.
    broker.faults.fail_writes(1);
    session.ack(vec![acked.delivery_id]).await;
    broker.wait_health("r", ServingStatus::NotServing).await;
    broker.wait_health("r", ServingStatus::Serving).await;

    session.credit(2).await;
    let again = session.delivery().await;
    assert_eq!(again.payload, "acked".as_bytes(), "the message whose ack was lost is delivered again");
    assert!(session.next_within(Duration::from_millis(500)).await.is_none(), "the leased one is not delivered twice");
    session.ack(vec![again.delivery_id, leased.delivery_id]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while depth(&mut admin, "r").await != 0 {
        assert!(std::time::Instant::now() < deadline, "the queue never drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.stop().await;
}

/// A start on a full disk, when opening a queue needs to write (here: its
/// key journal must be created again), does not set the healthy queue
/// aside as damaged (which would invite its deletion; found by
/// `ballast-bench chaos --disk-full`): calls to it get the disk-full error,
/// and once space returns the next call opens it and it serves its
/// messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_on_a_full_disk_does_not_set_queues_aside() {
    let broker = InProcess::start().await;
    let mut admin = pb::admin_client::AdminClient::new(broker.channel().await);
    create(&mut admin, "full", queue_settings()).await;
    let mut publisher = pb::publisher_client::PublisherClient::new(broker.channel().await);
    try_publish(&mut publisher, "full", "kept".into()).await.unwrap();
    let data_dir = broker.data_dir.clone();
    let faults = broker.faults.clone();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let kept = dir.path().join("data");
    // The broker's temporary directory goes when it stops: keep a copy (as
    // a crash would leave it: the publish was synced).
    let copy = Command::new("cp").arg("-a").arg(&data_dir).arg(&kept).status().unwrap();
    assert!(copy.success());
    broker.stop().await;
    let queue_dir = std::fs::read_dir(kept.join("queues"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("full~"))
        .expect("the queue's directory");
    std::fs::remove_file(queue_dir.join("lanes/1/keys")).unwrap();

    let config = |faults: Option<std::sync::Arc<ballast_storage::Faults>>| ballast_broker::Config {
        data_dir: kept.clone(),
        disk_free_min_bytes: 0,
        faults: ballast_broker::config::FaultSeam(faults),
        ..ballast_broker::Config::default()
    };
    faults.set_disk_full(true);
    let broker = ballast_broker::Broker::open(config(Some(faults.clone()))).expect("the broker starts");
    let error = broker.queue("full").await.expect_err("no space to open the queue");
    assert!(error.to_string().contains("disk is full"), "{error}");
    assert!(broker.damaged_queues().is_empty(), "no queue was set aside");
    faults.set_disk_full(false);
    let queue = broker.queue("full").await.expect("the queue serves once space returns");
    assert!(broker.damaged_queues().is_empty(), "no queue was set aside");
    assert_eq!(queue.stats().lane_depths.iter().sum::<u64>(), 1, "its message is kept");
}
