//! The `ballast` binary against the real broker: output and exit codes.

use std::{
    io::{BufRead, BufReader, Read, Write},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::support::Broker;

/// `ballast --addr URL ARGS`, deaf to a `BALLAST_ADDR` (and TLS settings)
/// in the environment.
fn command(broker_url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ballast"));
    command.arg("--addr").arg(broker_url).args(args).env_remove("BALLAST_ADDR");
    for tls in ["BALLAST_TLS_CA", "BALLAST_TLS_CERT", "BALLAST_TLS_KEY"] {
        command.env_remove(tls);
    }
    command
}

fn ballast(broker_url: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = command(broker_url, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ballast");
    let mut input = child.stdin.take().expect("piped stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("ballast runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited, not killed")
}

/// The documented flow: create a queue, publish from arguments and stdin,
/// list it, consume with --count and --json; with the documented exit codes
/// for not found (3) and already exists (4).
#[test]
fn queue_publish_consume() {
    let broker = Broker::start();
    let url = broker.url();

    let created = ballast(&url, &["queue", "create", "emails", "--max-attempts", "3"], None);
    assert_eq!(code(&created), 0, "{created:?}");
    assert!(stdout(&created).contains("max attempts"), "{}", stdout(&created));
    let clash = ballast(&url, &["queue", "create", "emails", "--max-attempts", "4"], None);
    assert_eq!(code(&clash), 4, "{clash:?}");

    let published = ballast(&url, &["publish", "emails", "one", "two", "--lane", "high", "-H", "k=v"], None);
    assert_eq!(code(&published), 0, "{published:?}");
    assert_eq!(stdout(&published), "0:0\n0:1\n", "receipts lane:offset in order");
    let piped = ballast(&url, &["publish", "emails", "--key", "batch", "--json"], Some("three\nfour\n"));
    assert_eq!(code(&piped), 0, "{piped:?}");
    let again = ballast(&url, &["publish", "emails", "--key", "batch"], Some("three\nfour\n"));
    assert_eq!(stdout(&again), "1:0 duplicate\n1:1 duplicate\n", "same keys, stored once");

    let listed = ballast(&url, &["queue", "list"], None);
    let line = stdout(&listed).lines().find(|l| l.starts_with("emails ")).map(str::to_owned).expect("listed");
    assert!(line.split_whitespace().nth(1) == Some("4"), "depth 4: {line}");

    let consumed = ballast(&url, &["consume", "emails", "--count", "4", "--json", "--credit", "2"], None);
    assert_eq!(code(&consumed), 0, "{consumed:?}");
    let mut payloads: Vec<String> = stdout(&consumed)
        .lines()
        .map(|line| {
            let delivery: serde_json::Value = serde_json::from_str(line).expect("a JSON line per delivery");
            delivery["payload"].as_str().expect("a UTF-8 payload").to_owned()
        })
        .collect();
    // Lanes are served by weight, so only the set is certain.
    payloads.sort();
    assert_eq!(payloads, ["four", "one", "three", "two"]);

    let got = ballast(&url, &["queue", "get", "emails", "--json"], None);
    let info: serde_json::Value = serde_json::from_str(stdout(&got).trim()).expect("json");
    assert_eq!(info["depth"], 0, "everything acked");

    let missing = ballast(&url, &["queue", "get", "nope"], None);
    assert_eq!(code(&missing), 3, "{missing:?}");
    let deleted = ballast(&url, &["queue", "delete", "emails"], None);
    assert_eq!(code(&deleted), 0, "{deleted:?}");
}

/// A bad queue name is a usage error (2), as is an unknown flag.
#[test]
fn usage_errors() {
    let broker = Broker::start();
    let url = broker.url();
    let bad = ballast(&url, &["queue", "get", "Bad Name"], None);
    assert_eq!(code(&bad), 2, "{bad:?}");
    let unknown_flag = ballast(&url, &["queue", "list", "--frobnicate"], None);
    assert_eq!(code(&unknown_flag), 2);
    let bad_stats = ballast(&url, &["stats", "Bad Name"], None);
    assert_eq!(code(&bad_stats), 2, "{bad_stats:?}");
    let fast_top = ballast(&url, &["top", "--interval-ms", "50"], None);
    assert_eq!(code(&fast_top), 2, "the broker's interval floor is 100 ms: {fast_top:?}");
}

/// Admission through the CLI: a queue created with --max-messages refuses
/// the low lane at 70% (exit 5, the broker's explanation on stderr) while
/// the high lane is admitted; `stats --json` reports the figures, and the
/// human table shows the queue and its lanes.
#[test]
fn stats_after_a_refusal() {
    let broker = Broker::start();
    let url = broker.url();
    let created = ballast(&url, &["queue", "create", "emails", "--max-messages", "10", "--json"], None);
    assert_eq!(code(&created), 0, "{created:?}");
    let info: serde_json::Value = serde_json::from_str(stdout(&created).trim()).expect("json");
    assert_eq!(info["settings"]["max_messages"], 10);
    assert_eq!(info["settings"]["lane_admission"], serde_json::json!([1.0, 0.9, 0.7]));

    let messages: Vec<String> = (0..7).map(|i| format!("m{i}")).collect();
    let mut args = vec!["publish", "emails", "--lane", "low", "--json"];
    args.extend(messages.iter().map(String::as_str));
    let published = ballast(&url, &args, None);
    assert_eq!(code(&published), 0, "{published:?}");
    let last: serde_json::Value =
        serde_json::from_str(stdout(&published).lines().last().expect("receipts")).expect("json");
    assert_eq!(last["queue_saturation"]["depth"], 7, "receipts carry the figures: {last}");
    assert_eq!(last["lane_saturation"]["depth"], 7);

    let refused = ballast(&url, &["--timeout-ms", "500", "publish", "emails", "--lane", "low", "one too many"], None);
    assert_eq!(code(&refused), 5, "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("lane low"), "{refused:?}");
    // A refused batch fails each of its messages alike: one line for the
    // error, one for the count of the others.
    let batch = ballast(&url, &["--timeout-ms", "500", "publish", "emails", "--lane", "low", "a", "b", "c", "d"], None);
    assert_eq!(code(&batch), 5, "{batch:?}");
    let stderr = String::from_utf8_lossy(&batch.stderr);
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
    assert!(stderr.contains("and 3 more messages failed with the same error"), "{stderr}");
    let urgent = ballast(&url, &["publish", "emails", "--lane", "high", "urgent"], None);
    assert_eq!(code(&urgent), 0, "the high lane is admitted up to 100%: {urgent:?}");

    let stats = ballast(&url, &["stats", "emails", "--json"], None);
    assert_eq!(code(&stats), 0, "{stats:?}");
    let text = stdout(&stats);
    assert_eq!(text.lines().count(), 1, "one object: {text}");
    let stats: serde_json::Value = serde_json::from_str(text.trim()).expect("json");
    assert!(stats["disk_free_bytes"].as_u64().is_some_and(|free| free > 0), "{stats}");
    let queues = stats["queues"].as_array().expect("queues");
    assert_eq!(queues.len(), 1, "{stats}");
    let emails = &queues[0];
    assert_eq!(emails["name"], "emails");
    assert_eq!(emails["depth"], 8);
    assert_eq!(emails["max_messages"], 10);
    assert!((emails["saturation"].as_f64().expect("a number") - 0.8).abs() < 1e-9, "{emails}");
    assert!(emails["refused_queue_full"].as_u64().is_some_and(|refused| refused >= 1), "{emails}");
    assert!(emails["drain_estimate_ms"].is_null(), "nothing consumes: unknown: {emails}");
    let lanes = emails["lanes"].as_array().expect("lanes");
    let depths: Vec<_> = lanes.iter().map(|lane| (lane["name"].clone(), lane["depth"].clone())).collect();
    assert_eq!(depths, [("high".into(), 1.into()), ("normal".into(), 0.into()), ("low".into(), 7.into())]);
    assert_eq!(lanes[2]["admission"], 0.7);

    let table = ballast(&url, &["stats"], None);
    assert_eq!(code(&table), 0, "{table:?}");
    let text = stdout(&table);
    let row = |name: &str| text.lines().find(|line| line.split_whitespace().next() == Some(name)).map(str::to_owned);
    let emails = row("emails").unwrap_or_else(|| panic!("a row for emails: {text}"));
    assert_eq!(emails.split_whitespace().nth(1), Some("8"), "{text}");
    assert!(emails.contains("80.0%"), "{text}");
    assert!(row("emails.dead").is_some(), "every queue: {text}");
    let low = text.lines().find(|line| line.starts_with("  low")).expect("lane rows");
    assert!(low.contains("70%"), "the lane's admission threshold: {text}");
    assert!(text.contains("disk free"), "{text}");

    let missing = ballast(&url, &["stats", "nope"], None);
    assert_eq!(code(&missing), 3, "{missing:?}");
}

/// `ballast top --iterations 2` shows two updates and exits 0; piped, it
/// writes no escape codes. With --json it prints one object per update.
#[test]
fn top_iterations() {
    let broker = Broker::start();
    let url = broker.url();
    assert_eq!(code(&ballast(&url, &["queue", "create", "emails"], None)), 0);
    let top = ballast(&url, &["top", "--iterations", "2", "--interval-ms", "100", "emails"], None);
    assert_eq!(code(&top), 0, "{top:?}");
    let text = stdout(&top);
    assert_eq!(text.lines().filter(|line| line.starts_with("ballast top")).count(), 2, "{text}");
    assert_eq!(text.lines().filter(|line| line.starts_with("emails ")).count(), 2, "{text}");
    assert!(!text.contains('\x1b'), "no escape codes into a pipe: {text:?}");

    let once = ballast(&url, &["top", "--once", "--json"], None);
    assert_eq!(code(&once), 0, "{once:?}");
    let json = ballast(&url, &["top", "--iterations", "2", "--interval-ms", "100", "--json"], None);
    assert_eq!(code(&json), 0, "{json:?}");
    let updates: Vec<serde_json::Value> =
        stdout(&json).lines().map(|line| serde_json::from_str(line).expect("a JSON line per update")).collect();
    assert_eq!(updates.len(), 2);
    let at = |update: &serde_json::Value| update["at_ms"].as_u64().expect("at_ms");
    assert!(at(&updates[1]) >= at(&updates[0]) + 90, "one update per interval: {updates:?}");

    let missing = ballast(&url, &["top", "--once", "nope"], None);
    assert_eq!(code(&missing), 3, "{missing:?}");
}

/// A running `ballast top` exits 0 on Ctrl-C (SIGINT), and with the error's
/// code when the broker ends the stream (here: the queue is deleted, 3).
#[test]
fn top_exits_on_ctrl_c_and_when_the_stream_ends() {
    let broker = Broker::start();
    let url = broker.url();
    assert_eq!(code(&ballast(&url, &["queue", "create", "emails"], None)), 0);

    let top = Top::spawn(&url, &["top", "--interval-ms", "100", "emails"]);
    top.wait_for_update();
    let status = Command::new("kill").args(["-INT", &top.id().to_string()]).status().expect("run kill");
    assert!(status.success());
    let (status, stderr) = top.wait();
    assert_eq!(status.code(), Some(0), "Ctrl-C is a clean exit: {status:?} {stderr}");

    let top = Top::spawn(&url, &["top", "--interval-ms", "100", "emails"]);
    top.wait_for_update();
    assert_eq!(code(&ballast(&url, &["queue", "delete", "emails"], None)), 0);
    let (status, stderr) = top.wait();
    assert_eq!(status.code(), Some(3), "the stream ended with NOT_FOUND: {stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
}

/// A `ballast top` child whose output is read as it comes.
struct Top {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Top {
    fn spawn(url: &str, args: &[&str]) -> Top {
        let mut child = command(url, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ballast top");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Top { child, lines }
    }

    fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most 10 s) until an update was printed.
    fn wait_for_update(&self) {
        loop {
            let line = self.lines.recv_timeout(Duration::from_secs(10)).expect("ballast top prints an update");
            if line.starts_with("ballast top") {
                return;
            }
        }
    }

    /// Waits (at most 10 s) for the exit; returns the status and stderr.
    fn wait(self) -> (ExitStatus, String) {
        let id = self.id();
        let mut child = self.child;
        let (sender, exited) = mpsc::channel();
        std::thread::spawn(move || {
            let status = child.wait().expect("wait for ballast top");
            let mut stderr = String::new();
            let _ = child.stderr.take().expect("piped stderr").read_to_string(&mut stderr);
            let _ = sender.send((status, stderr));
        });
        match exited.recv_timeout(Duration::from_secs(10)) {
            Ok(outcome) => outcome,
            Err(_) => {
                let _ = Command::new("kill").args(["-KILL", &id.to_string()]).status();
                panic!("ballast top did not exit within 10 s");
            }
        }
    }
}

/// An unreachable broker exits with 6 (unavailable).
#[test]
fn unreachable_broker() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let output = ballast(&url, &["--timeout-ms", "1000", "queue", "list"], None);
    assert_eq!(code(&output), 6, "{output:?}");
}

/// Text from the broker cannot drive the terminal: a payload and a lane
/// name holding escape sequences print with their control characters
/// escaped in `consume`, `queue get` and `stats` (see: #13, item 12), while
/// `--json` keeps the exact text.
#[test]
fn control_characters_are_escaped() {
    let broker = Broker::start();
    let url = broker.url();
    let lane = "evil\u{1b}]0;owned\u{7}";
    let created = ballast(&url, &["queue", "create", "esc", "--lanes", lane, "--lane-weights", "1"], None);
    assert_eq!(code(&created), 0, "{created:?}");
    let published = ballast(&url, &["publish", "esc", "clear\u{1b}[2Jscreen\u{9b}"], None);
    assert_eq!(code(&published), 0, "{published:?}");

    let shown = [
        stdout(&ballast(&url, &["queue", "get", "esc"], None)),
        stdout(&ballast(&url, &["stats", "esc"], None)),
        stdout(&ballast(&url, &["consume", "esc", "--count", "1"], None)),
    ];
    for text in &shown {
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "a control character reached stdout: {text:?}");
    }
    assert!(shown[0].contains("evil\\u{1b}]0;owned\\u{7}"), "{}", shown[0]);
    assert!(shown[1].contains("evil\\u{1b}]0;owned\\u{7}"), "{}", shown[1]);
    assert!(shown[2].contains("clear\\u{1b}[2Jscreen\\u{9b}"), "{}", shown[2]);

    let published = ballast(&url, &["publish", "esc", "again\u{1b}[31m"], None);
    assert_eq!(code(&published), 0, "{published:?}");
    let json = ballast(&url, &["consume", "esc", "--count", "1", "--json"], None);
    let delivery: serde_json::Value = serde_json::from_str(stdout(&json).trim()).expect("a JSON line");
    assert_eq!(delivery["payload"], "again\u{1b}[31m", "JSON carries the exact payload");
}

/// With --tls-ca the CLI speaks TLS to a TLS broker (a bare address
/// becomes https://); without it the CLI says the broker speaks TLS.
#[test]
fn tls_flags_reach_a_tls_broker() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let broker = Broker::start_with(&["--tls-cert", cert, "--tls-key", key]);
    let addr = format!("localhost:{}", broker.addr.port());

    let created = ballast(&addr, &["--tls-ca", cert, "queue", "create", "secure"], None);
    assert_eq!(code(&created), 0, "{created:?}");
    let plain = ballast(&addr, &["queue", "list", "--timeout-ms", "3000"], None);
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert_ne!(code(&plain), 0, "{plain:?}");
    assert!(stderr.contains("TLS failed: the broker speaks TLS and this client does not"), "{stderr}");
}

/// `ballast extend` extends a pulled lease (exit 0), and answers per id
/// with exit 1 when one of them is not leased; --json prints one object
/// per id.
#[test]
fn extend_leases_by_id() {
    use ballast_proto::v1 as pb;

    let broker = Broker::start();
    let url = broker.url();
    let created = ballast(&url, &["queue", "create", "jobs", "--lease-timeout-ms", "2000"], None);
    assert_eq!(code(&created), 0, "{created:?}");
    assert_eq!(code(&ballast(&url, &["publish", "jobs", "one"], None)), 0);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let delivery_id = runtime.block_on(async {
        let mut consumer = pb::consumer_client::ConsumerClient::connect(url.clone()).await.expect("connect");
        let pull = pb::PullRequest { queue: "jobs".into(), max_messages: 1, wait_ms: 2000 };
        let deliveries = consumer.pull(pull).await.expect("pull").into_inner().deliveries;
        deliveries[0].delivery_id
    });
    let id = delivery_id.to_string();
    let extended = ballast(&url, &["extend", "jobs", &id, "--lease-ms", "60000"], None);
    assert_eq!(code(&extended), 0, "{extended:?}");
    assert!(stdout(&extended).starts_with(&format!("{id} extended until ")), "{}", stdout(&extended));
    let mixed = ballast(&url, &["--json", "extend", "jobs", &id, "7"], None);
    assert_eq!(code(&mixed), 1, "{mixed:?}");
    let lines: Vec<serde_json::Value> =
        stdout(&mixed).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 2, "{}", stdout(&mixed));
    assert_eq!(lines[0]["outcome"], "extended");
    assert!(lines[0]["lease_deadline_ms"].as_u64().is_some());
    assert_eq!((lines[1]["delivery_id"].as_u64(), lines[1]["outcome"].as_str()), (Some(7), Some("not leased")));
    let bad = ballast(&url, &["extend", "jobs", &id, "--lease-ms", "9"], None);
    assert_eq!(code(&bad), 2, "{bad:?}");
}

/// `ballast queue update` changes only the flags given and prints the
/// queue; a setting that cannot change on a live queue exits 2 naming it.
#[test]
fn queue_update() {
    let broker = Broker::start();
    let url = broker.url();
    let created = ballast(&url, &["queue", "create", "tuned"], None);
    assert_eq!(code(&created), 0, "{created:?}");
    let updated = ballast(&url, &["--json", "queue", "update", "tuned", "--max-attempts", "9"], None);
    assert_eq!(code(&updated), 0, "{updated:?}");
    let queue: serde_json::Value = serde_json::from_str(stdout(&updated).trim()).expect("one JSON object");
    assert_eq!(queue["settings"]["max_attempts"], 9, "{queue}");
    assert_eq!(queue["settings"]["lease_timeout_ms"], 30_000, "{queue}");
    let refused = ballast(&url, &["queue", "update", "tuned", "--lanes", "a,b"], None);
    assert_eq!(code(&refused), 2, "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("lanes cannot change on a live queue"), "{stderr}");
}

/// `ballast peek` shows messages without taking them: one page of
/// --count, or every page with --all; the queue keeps them all.
#[test]
fn peek_pages_without_taking() {
    let broker = Broker::start();
    let url = broker.url();
    assert_eq!(code(&ballast(&url, &["queue", "create", "seen"], None)), 0);
    assert_eq!(code(&ballast(&url, &["publish", "seen", "a", "b", "c"], None)), 0);
    let one = ballast(&url, &["peek", "seen", "--count", "1"], None);
    assert_eq!(code(&one), 0, "{one:?}");
    assert_eq!(stdout(&one).lines().count(), 1, "{}", stdout(&one));
    assert!(stdout(&one).contains("attempts=0") && stdout(&one).ends_with(" a\n"), "{}", stdout(&one));
    let all = ballast(&url, &["--json", "peek", "seen", "--count", "2", "--all"], None);
    assert_eq!(code(&all), 0, "{all:?}");
    let payloads: Vec<String> = stdout(&all)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON")["payload"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(payloads, ["a", "b", "c"]);
    let consumed = ballast(&url, &["consume", "seen", "--count", "3"], None);
    assert_eq!(code(&consumed), 0, "every message is still there: {consumed:?}");
}

/// A dead letter seen with `ballast peek NAME.dead` (its reason shown)
/// goes back with `ballast redrive NAME`; a second redrive moves nothing.
#[test]
fn peek_and_redrive_dead_letters() {
    use ballast_proto::v1 as pb;

    let broker = Broker::start();
    let url = broker.url();
    assert_eq!(code(&ballast(&url, &["queue", "create", "mail", "--max-attempts", "1"], None)), 0);
    assert_eq!(code(&ballast(&url, &["publish", "mail", "hello"], None)), 0);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let mut consumer = pb::consumer_client::ConsumerClient::connect(url.clone()).await.expect("connect");
        let pull = pb::PullRequest { queue: "mail".into(), max_messages: 1, wait_ms: 2000 };
        let id = consumer.pull(pull).await.expect("pull").into_inner().deliveries[0].delivery_id;
        let nack = pb::NackRequest { queue: "mail".into(), delivery_id: id, delay_ms: 0, reason: "smtp down".into() };
        consumer.nack(nack).await.expect("nack");
    });
    let dead = ballast(&url, &["peek", "mail.dead"], None);
    assert_eq!(code(&dead), 0, "{dead:?}");
    assert!(stdout(&dead).contains("attempts=1") && stdout(&dead).contains("reason=smtp down"), "{}", stdout(&dead));
    let moved = ballast(&url, &["--json", "redrive", "mail"], None);
    assert_eq!(code(&moved), 0, "{moved:?}");
    let done: serde_json::Value = serde_json::from_str(stdout(&moved).trim()).expect("JSON");
    assert_eq!((done["moved"].as_u64(), done["already_moved"].as_u64()), (Some(1), Some(0)), "{done}");
    assert_eq!(stdout(&ballast(&url, &["peek", "mail.dead"], None)), "", "the dead-letter queue is empty");
    let again = ballast(&url, &["redrive", "mail"], None);
    assert!(stdout(&again).starts_with("moved 0 dead letters back to mail"), "{}", stdout(&again));
    let consumed = ballast(&url, &["consume", "mail", "--count", "1"], None);
    assert!(stdout(&consumed).contains("hello"), "{consumed:?}");
}

/// `--message-ttl-ms` and `--expired-action` set a queue's expiry on
/// create and update (`--max-delivery-rate` its pace); `publish --ttl-ms` gives a message its own: past it,
/// the message is dead-lettered with reason `expired` (seen with `ballast
/// peek NAME.dead`) and counted in `ballast stats --json`.
#[test]
fn expiry_and_pacing_flags() {
    let broker = Broker::start();
    let url = broker.url();
    let created = ballast(&url, &["--json", "queue", "create", "brief", "--message-ttl-ms", "60000"], None);
    assert_eq!(code(&created), 0, "{created:?}");
    let queue: serde_json::Value = serde_json::from_str(stdout(&created).trim()).expect("one JSON object");
    assert_eq!(queue["settings"]["message_ttl_ms"], 60_000, "{queue}");
    assert_eq!(queue["settings"]["expired_action"], "dead_letter", "{queue}");
    let updated = ballast(&url, &["--json", "queue", "update", "brief", "--expired-action", "drop"], None);
    let queue: serde_json::Value = serde_json::from_str(stdout(&updated).trim()).expect("one JSON object");
    assert_eq!(queue["settings"]["expired_action"], "drop", "{queue}");
    let args = ["--json", "queue", "update", "brief", "--expired-action", "dead_letter", "--max-delivery-rate", "500"];
    let updated = ballast(&url, &args, None);
    let queue: serde_json::Value = serde_json::from_str(stdout(&updated).trim()).expect("one JSON object");
    assert_eq!(queue["settings"]["max_delivery_rate"], 500, "{queue}");
    assert_eq!(code(&ballast(&url, &["publish", "brief", "gone", "--ttl-ms", "1"], None)), 0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(code(&ballast(&url, &["publish", "brief", "kept"], None)), 0);
    let consumed = ballast(&url, &["consume", "brief", "--count", "1"], None);
    assert!(stdout(&consumed).contains("kept") && !stdout(&consumed).contains("gone"), "{consumed:?}");
    let dead = ballast(&url, &["peek", "brief.dead"], None);
    assert!(stdout(&dead).contains("reason=expired") && stdout(&dead).contains("gone"), "{}", stdout(&dead));
    let stats = ballast(&url, &["--json", "stats", "brief"], None);
    assert!(stdout(&stats).contains("\"expired_dead_lettered\":1"), "{}", stdout(&stats));
}
