//! Many queues on one node (issue #12): the `queues_max` limit, a restart
//! with many queues, a queue whose files are damaged set aside while the
//! others serve, and what an idle queue costs in descriptors and disk.

use std::{path::Path, time::Duration};

use ballast_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

/// A config file in the test's data directory's parent, for `--config`.
fn config_file(broker_dir: &Path, name: &str, text: &str) -> String {
    let path = broker_dir.with_file_name(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// One lane, no dead-letter queue: the cheapest queue.
fn one_lane() -> pb::QueueSettings {
    pb::QueueSettings {
        lanes: vec!["only".into()],
        lane_weights: vec![1],
        lane_admission: vec![1.0],
        dead_letter: Some(false),
        ..queue_settings()
    }
}

/// The broker's log without ANSI colour sequences (`ESC [ ... m`).
fn without_colors(log: &str) -> String {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The directory (`<data>/queues/<name>~<generation>`) of queue `name`.
fn queue_dir(data_dir: &Path, name: &str) -> std::path::PathBuf {
    std::fs::read_dir(data_dir.join("queues"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&format!("{name}~")))
        .unwrap_or_else(|| panic!("{name}'s directory"))
}

/// The queue's health status (-1 when not reported yet).
async fn health(broker: &BrokerProcess, queue: &str) -> i32 {
    let mut client = tonic_health::pb::health_client::HealthClient::new(broker.channel().await);
    let request = tonic_health::pb::HealthCheckRequest { service: format!("ballast.v1.Queue/{queue}") };
    match client.check(request).await {
        Ok(response) => response.into_inner().status,
        Err(status) if status.code() == Code::NotFound => -1,
        Err(status) => panic!("health check of {queue}: {status}"),
    }
}

/// `queues_max` (dead-letter queues included) at the limit and one past:
/// with `queues_max = 8`, four queues with their dead-letter queues fill
/// it, a fifth is RESOURCE_EXHAUSTED naming the limit and the key, and
/// deleting one makes room.
#[tokio::test]
async fn queues_max_at_the_limit_and_one_past() {
    let probe = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let config = config_file(&probe.path().join("x"), "queues.toml", "queues_max = 8\n");
    let broker = BrokerProcess::start_with(&["--config", &config]);
    let mut admin = broker.admin().await;
    for i in 0..4 {
        create(&mut admin, &format!("q{i}"), queue_settings()).await;
    }
    assert_eq!(queue_names(&mut admin).await.len(), 8);
    let refused = admin.create_queue(pb::CreateQueueRequest { name: "q4".into(), settings: Some(one_lane()) }).await;
    assert_status(refused, Code::ResourceExhausted, "queues limit reached (8)");
    let refused = admin.create_queue(pb::CreateQueueRequest { name: "q4".into(), settings: Some(one_lane()) }).await;
    assert_status(refused, Code::ResourceExhausted, "raise queues_max");
    admin.delete_queue(pb::DeleteQueueRequest { name: "q0".into() }).await.unwrap();
    create(&mut admin, "q4", queue_settings()).await;
    assert_eq!(queue_names(&mut admin).await.len(), 8);
}

/// A queue whose files are damaged is set aside at start: the broker
/// starts and serves the other queues; the damaged ones (one with a
/// `queue.toml` that is not TOML, one whose lane directory is a file)
/// are marked in ListQueues and Stats, counted by
/// `ballast_queues_damaged`, NOT_SERVING in the health service, refused
/// with FAILED_PRECONDITION on every call (a message saying it is damaged
/// and can be deleted), cannot be created over, and DeleteQueue removes
/// them (with their dead-letter queues) so that the name can be used again.
#[tokio::test]
async fn a_damaged_queue_is_set_aside_and_can_be_deleted() {
    let mut broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    let mut publisher = broker.publisher().await;
    for name in ["good", "bad-toml", "bad-lane"] {
        create(&mut admin, name, queue_settings()).await;
        publish(&mut publisher, name, message(format!("to {name}"))).await;
    }
    broker.terminate_cleanly();
    let dir_of = |name: &str| queue_dir(&broker.data_dir, name);
    std::fs::write(dir_of("bad-toml").join("queue.toml"), b"this is [not toml").unwrap();
    // A lane's directory that is not a directory: its log cannot open. (A
    // garbage segment header would not do: storage renames such a segment
    // to `.corrupt` and opens the rest; and the tests run as root, to whom
    // an unreadable directory is readable.)
    let lane = dir_of("bad-lane").join("lanes").join("1");
    std::fs::remove_dir_all(&lane).unwrap();
    std::fs::write(&lane, b"not a directory").unwrap();
    broker.restart();

    let mut admin = broker.admin().await;
    let mut publisher = broker.publisher().await;
    publish(&mut publisher, "good", message("after the restart")).await;
    assert_eq!(depth(&mut admin, "good").await, 2, "the good queue serves");
    for name in ["bad-toml", "bad-lane"] {
        let refused = publisher.publish(pb::PublishRequest { queue: name.into(), message: Some(message("x")) }).await;
        assert_status(refused, Code::FailedPrecondition, "is damaged");
        let refused = admin.get_queue(pb::GetQueueRequest { name: name.into() }).await;
        assert_status(refused, Code::FailedPrecondition, "Delete it with DeleteQueue");
        let refused =
            admin.create_queue(pb::CreateQueueRequest { name: name.into(), settings: Some(queue_settings()) }).await;
        assert_status(refused, Code::FailedPrecondition, "is damaged");
        let mut consumer = broker.consumer().await;
        let refused = Session::try_open(&mut consumer, name, 1).await.map(|_| ());
        assert_status(refused, Code::FailedPrecondition, "is damaged");
    }
    let list = admin.list_queues(pb::ListQueuesRequest {}).await.unwrap().into_inner().queues;
    let marked: Vec<&str> = list.iter().filter(|q| !q.damaged.is_empty()).map(|q| q.name.as_str()).collect();
    assert_eq!(marked, ["bad-lane", "bad-toml"], "{list:#?}");
    assert!(list.iter().any(|q| q.name == "good" && q.damaged.is_empty()));
    let mut stats = pb::stats_client::StatsClient::new(broker.channel().await);
    let all = stats.get_stats(pb::StatsRequest { queue: String::new() }).await.unwrap().into_inner().queues;
    let marked: Vec<&str> = all.iter().filter(|q| !q.damaged.is_empty()).map(|q| q.name.as_str()).collect();
    assert_eq!(marked, ["bad-lane", "bad-toml"]);
    let text = broker.scrape();
    assert!(text.lines().any(|l| l == "ballast_queues_damaged 2"), "{}", &text[..text.len().min(400)]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while health(&broker, "bad-toml").await != tonic_health::ServingStatus::NotServing as i32 {
        assert!(std::time::Instant::now() < deadline, "bad-toml reported NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for name in ["bad-toml", "bad-lane"] {
        admin.delete_queue(pb::DeleteQueueRequest { name: name.into() }).await.unwrap();
    }
    let names = queue_names(&mut admin).await;
    assert_eq!(names, ["good", "good.dead"], "the damaged queues and their dead-letter queues are gone");
    create(&mut admin, "bad-toml", queue_settings()).await;
    publish(&mut publisher, "bad-toml", message("again")).await;
    let text = broker.scrape();
    assert!(text.lines().any(|l| l == "ballast_queues_damaged 0"));
    // Nothing of the deleted queues comes back after a restart.
    broker.terminate_cleanly();
    broker.restart();
    let mut admin = broker.admin().await;
    assert_eq!(queue_names(&mut admin).await, ["bad-toml", "bad-toml.dead", "good", "good.dead"]);
    assert_eq!(depth(&mut admin, "bad-toml").await, 1);
}

/// Whether ListQueues shows `queue` as still opening (its logs not open).
async fn is_opening(admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>, queue: &str) -> bool {
    let list = admin.list_queues(pb::ListQueuesRequest {}).await.unwrap().into_inner().queues;
    list.iter().find(|q| q.name == queue).unwrap_or_else(|| panic!("{queue} is listed")).opening
}

/// Queues the broker holds come back after a restart, and the broker
/// listens before their logs are open. 2,000 one-lane queues (one made
/// through the API, the rest copies of its directory) and one queue with
/// a dead-letter queue are made; one is then damaged (its
/// lane directory made a file). Restarted with `queue_open_threads = 0`
/// (nothing opens in the background), every queue is listed as opening
/// and NOT_SERVING; calls to queues not open yet succeed (each opens its
/// queue first, a source queue its dead-letter queue before itself); the
/// damaged queue is set aside on its first call; metrics show a used
/// queue's counters and gauges, only gauges for a queue open but unused
/// since the restart, and no series for a queue never opened. Restarted
/// with the default background opener, every queue opens (the log says how
/// many and how long) and serves, each SERVING.
// Multi-threaded: the clients' connections must answer the broker's
// GOAWAY while this thread blocks waiting for the process to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_many_queues_serves_them_all() {
    const QUEUES: usize = 2_000;
    let probe = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let config = config_file(&probe.path().join("x"), "small.toml", "[storage]\nsegment_size = 65536\n");
    let lazy =
        config_file(&probe.path().join("x"), "lazy.toml", "queue_open_threads = 0\n[storage]\nsegment_size = 65536\n");
    let mut broker = BrokerProcess::start_with(&["--config", &config]);
    let mut admin = broker.admin().await;
    create(&mut admin, "q00000", one_lane()).await;
    create(&mut admin, "with-dead", queue_settings()).await;
    broker.terminate_cleanly();
    // Creating thousands of queues through the API takes minutes in a
    // debug build (each creation syncs files and directories): the rest
    // are copies of the first queue's directory, renamed.
    let data_dir = broker.data_dir.clone();
    let queues_dir = data_dir.join("queues");
    let dir_of = |name: &str| queue_dir(&data_dir, name);
    let template = dir_of("q00000");
    let toml = std::fs::read_to_string(template.join("queue.toml")).unwrap();
    assert!(toml.contains("name = \"q00000\""), "{toml}");
    for i in 1..QUEUES {
        let name = format!("q{i:05}");
        let copy = queues_dir.join(format!("{name}~{i}"));
        copy_dir(&template, &copy);
        std::fs::write(copy.join("queue.toml"), toml.replace("\"q00000\"", &format!("\"{name}\""))).unwrap();
    }
    broker.restart();
    let mut publisher = broker.publisher().await;
    publish(&mut publisher, "q00007", message("kept")).await;
    broker.terminate_cleanly();
    let damaged = dir_of("q01000").join("lanes").join("0");
    std::fs::remove_dir_all(&damaged).unwrap();
    std::fs::write(&damaged, b"not a directory").unwrap();

    broker.restart_with(&["--config", &lazy]);
    let mut admin = broker.admin().await;
    let list = admin.list_queues(pb::ListQueuesRequest {}).await.unwrap().into_inner().queues;
    assert_eq!(list.len(), QUEUES + 2);
    assert!(list.iter().all(|q| q.opening && q.damaged.is_empty()), "nothing is open yet");
    let last = format!("q{:05}", QUEUES - 1);
    assert_eq!(health(&broker, &last).await, tonic_health::ServingStatus::NotServing as i32);
    let mut publisher = broker.publisher().await;
    publish(&mut publisher, &last, message("to a queue not open yet")).await;
    assert_eq!(depth(&mut admin, "q00007").await, 1, "a message stored before the restart is kept");
    publish(&mut publisher, "with-dead", message("opens its dead-letter queue first")).await;
    for queue in [last.as_str(), "q00007", "with-dead", "with-dead.dead"] {
        assert!(!is_opening(&mut admin, queue).await, "{queue} is open");
    }
    assert!(is_opening(&mut admin, "q00500").await, "a queue nobody called is not opened");
    let refused = publisher.publish(pb::PublishRequest { queue: "q01000".into(), message: Some(message("x")) }).await;
    assert_status(refused, Code::FailedPrecondition, "is damaged");
    let list = admin.list_queues(pb::ListQueuesRequest {}).await.unwrap().into_inner().queues;
    let marked: Vec<&str> = list.iter().filter(|q| !q.damaged.is_empty()).map(|q| q.name.as_str()).collect();
    assert_eq!(marked, ["q01000"]);
    let text = broker.scrape();
    let series = |name: &str, queue: &str| format!("{name}{{queue=\"{queue}\",lane=\"only\"}}");
    let used = series("ballast_published_messages_total", &last);
    assert!(text.lines().any(|l| l == format!("{used} 1")), "the used queue's counter: {used}");
    let depth_of_last = series("ballast_queue_depth_messages", &last);
    assert!(text.lines().any(|l| l == format!("{depth_of_last} 1")), "the used queue's depth");
    assert!(!text.contains("queue=\"q00500\""), "no series for a queue never used (nor opened)");
    // q00007 is open (GetQueue opened it) but took no message since the
    // restart: its gauges are written, its counters do not exist yet.
    assert!(text.lines().any(|l| l == format!("{} 1", series("ballast_queue_depth_messages", "q00007"))));
    assert!(!text.contains(&series("ballast_published_messages_total", "q00007")), "counters on first use only");
    assert!(text.lines().any(|l| l == format!("ballast_queues {}", QUEUES + 1)), "opening queues count");
    wait_until_serving(&broker, &last).await;

    // The default: every queue opens in the background.
    broker.terminate_cleanly();
    broker.restart_with(&["--config", &config]);
    let mut publisher = broker.publisher().await;
    for i in (0..QUEUES).step_by(97).filter(|&i| i != 1000) {
        publish(&mut publisher, &format!("q{i:05}"), message("after")).await;
    }
    let log_path = broker.data_dir.with_extension("log");
    let opened = |line: &str| line.contains("queues opened") && line.contains(&format!("queues={}", QUEUES + 1));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let line = loop {
        let log = without_colors(&std::fs::read_to_string(&log_path).unwrap());
        if let Some(line) = log.lines().rfind(|l| opened(l)) {
            break line.to_owned();
        }
        assert!(std::time::Instant::now() < deadline, "the background opener logs what it opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(line.contains("damaged=1"), "{line}");
    let log = without_colors(&std::fs::read_to_string(&log_path).unwrap());
    assert!(log.contains("open files limit"), "the start logs the open files limit");
    // The figure, for whoever runs the test with --nocapture.
    println!("restart with {} queues: {line}", QUEUES + 2);
    let mut admin = broker.admin().await;
    let list = admin.list_queues(pb::ListQueuesRequest {}).await.unwrap().into_inner().queues;
    assert!(list.iter().all(|q| !q.opening), "every queue is open");
    wait_until_serving(&broker, "q00500").await;
}

/// Copies directory `from` (files and directories only) to `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Polls the health service until `queue` is SERVING (30 s at most).
async fn wait_until_serving(broker: &BrokerProcess, queue: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while health(broker, queue).await != tonic_health::ServingStatus::Serving as i32 {
        assert!(std::time::Instant::now() < deadline, "{queue} reported SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bytes allocated on disk under `dir` (blocks, as `du` counts them).
fn disk_use(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let metadata = entry.as_ref().unwrap().metadata().unwrap();
            total += metadata.blocks() * 512;
            if metadata.is_dir() {
                pending.push(entry.unwrap().path());
            }
        }
    }
    total
}

/// Queues are not bounded by the process's descriptor limit: under an
/// RLIMIT_NOFILE of 256 (soft and hard, so the broker cannot raise it),
/// 300 queues are created (more files than descriptors: each lane's log
/// has a segment, a checkpoint and journals), every one takes a publish,
/// and after a restart under the same limit all of them serve. Needs the
/// storage's bounded open-file cache (s-storage).
#[tokio::test]
async fn queues_past_the_open_files_limit() {
    const QUEUES: usize = 300;
    let mut broker = BrokerProcess::start_with_open_files_max(256, &[]);
    let mut admin = broker.admin().await;
    let mut publisher = broker.publisher().await;
    for i in 0..QUEUES {
        let name = format!("q{i:03}");
        create(&mut admin, &name, one_lane()).await;
        publish(&mut publisher, &name, message("one")).await;
    }
    broker.terminate_cleanly();
    broker.restart();
    let mut admin = broker.admin().await;
    assert_eq!(queue_names(&mut admin).await.len(), QUEUES);
    let mut publisher = broker.publisher().await;
    for i in 0..QUEUES {
        let name = format!("q{i:03}");
        publish(&mut publisher, &name, message("two")).await;
        assert_eq!(depth(&mut admin, &name).await, 2, "{name}");
    }
    let fds = std::fs::read_dir(format!("/proc/{}/fd", broker.pid())).unwrap().count();
    assert!(fds <= 256, "{fds} descriptors open under a limit of 256");
}

/// An empty queue with its dead-letter queue, at the default settings
/// (three lanes each, 64 MiB segments), uses at most 1 MiB of disk: space
/// follows the backlog, not the queue's existence. Needs the storage's
/// lazy segment allocation (s-storage).
#[tokio::test]
async fn an_empty_queue_uses_at_most_one_mebibyte() {
    let broker = BrokerProcess::start();
    let mut admin = broker.admin().await;
    create(&mut admin, "empty", queue_settings()).await;
    let queues = broker.data_dir.join("queues");
    let used: u64 = std::fs::read_dir(&queues).unwrap().map(|e| disk_use(&e.unwrap().path())).sum();
    assert_eq!(queue_names(&mut admin).await, ["empty", "empty.dead"]);
    assert!(used <= 1 << 20, "an empty queue and its dead-letter queue use {used} bytes on disk");
}
