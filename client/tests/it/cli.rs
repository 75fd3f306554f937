//! The `ballast` binary against the real broker: output and exit codes.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use crate::support::Broker;

fn ballast(broker_url: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .arg("--addr")
        .arg(broker_url)
        .args(args)
        .env_remove("BALLAST_ADDR")
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

/// Stats is not available until the broker has the RPC: a clear message and
/// exit code 1. A bad queue name is a usage error (2).
#[test]
fn stats_and_usage_errors() {
    let broker = Broker::start();
    let url = broker.url();
    let stats = ballast(&url, &["stats"], None);
    assert_eq!(code(&stats), 1);
    assert!(String::from_utf8_lossy(&stats.stderr).contains("not available"), "{stats:?}");
    let bad = ballast(&url, &["queue", "get", "Bad Name"], None);
    assert_eq!(code(&bad), 2, "{bad:?}");
    let unknown_flag = ballast(&url, &["queue", "list", "--frobnicate"], None);
    assert_eq!(code(&unknown_flag), 2);
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
