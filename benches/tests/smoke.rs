//! CI smoke set: every `ballast-bench` scenario with tiny parameters against
//! a real `ballastd`, each in a few seconds, asserting on its JSON so the
//! benches never rot. `ballastd` is a binary of another package: it is taken
//! from the same target directory (built there by `cargo test --workspace`),
//! or built with `cargo build -p ballast-broker --bin ballastd` if absent.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_ballast-bench");

fn ballastd() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let bench = Path::new(BENCH);
        let path = bench.with_file_name(format!("ballastd{}", std::env::consts::EXE_SUFFIX));
        if !path.exists() {
            let profile_dir = bench.parent().expect("the bench binary has a directory");
            let target_dir = profile_dir.parent().expect("the profile directory has a parent");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = Command::new(cargo);
            build.args(["build", "-p", "ballast-broker", "--bin", "ballastd"]).env("CARGO_TARGET_DIR", target_dir);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                build.arg("--release");
            }
            let status = build.current_dir(env!("CARGO_MANIFEST_DIR")).status().expect("running cargo build");
            assert!(status.success(), "building ballastd failed");
            assert!(path.exists(), "cargo built ballastd somewhere other than {}", path.display());
        }
        path
    })
}

/// Runs one scenario; returns its JSON. Panics with its output if it fails.
fn run(scenario: &str, args: &[&str]) -> (Value, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join(format!("{scenario}.json"));
    let output = Command::new(BENCH)
        .arg("--ballastd")
        .arg(ballastd())
        .arg("--data-root")
        .arg(dir.path().join("data"))
        .arg("--json")
        .arg(&json)
        .arg(scenario)
        .args(args)
        .output()
        .expect("running ballast-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(output.status.success(), "ballast-bench {scenario} failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    let value: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON was written")).expect("valid JSON");
    assert_eq!(value["scenario"], scenario);
    (value, json, dir)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an unsigned integer: {v}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn throughput() {
    let args = ["--size", "100,16384", "--batch", "1,16", "--messages", "400", "--producers", "2", "--consumers", "2"];
    let (v, _, _dir) = run("throughput", &args);
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 4, "every size x batch combination ran");
    for r in runs {
        assert_eq!(u(&r["messages"]), 400);
        assert!(f(&r["publish"]["messages_per_s"]) > 0.0);
        assert!(f(&r["consume"]["messages_per_s"]) > 0.0);
        assert_eq!(u(&r["publish"]["call_latency"]["count"]), 400 / u(&r["batch"]));
    }
}

/// `--tls both` runs the scenario in plaintext, then over TLS, and puts
/// the change in one result.
#[test]
fn throughput_plaintext_and_tls() {
    let args = ["--tls", "both", "--size", "100", "--batch", "16", "--messages", "160", "--producers", "1"];
    let (v, _, _dir) = run("throughput", &args);
    assert_eq!(v["plaintext"]["tls"], false);
    assert_eq!(v["tls_run"]["tls"], true);
    assert_eq!(u(&v["tls_run"]["runs"][0]["messages"]), 160);
    let change = &v["change"]["/runs/0/publish/messages_per_s"];
    assert!(f(&change["plaintext"]) > 0.0 && f(&change["tls"]) > 0.0, "{change}");
}

/// `--tls on` runs latency over TLS.
#[test]
fn latency_over_tls() {
    let (v, _, _dir) = run("latency", &["--tls", "on", "--rate", "200", "--seconds", "1", "--warmup", "0"]);
    assert_eq!(v["tls"], true);
    assert_eq!(u(&v["publish_to_delivery"]["count"]), 200);
}

#[test]
fn latency() {
    let (v, json, _dir) = run("latency", &["--rate", "500", "--seconds", "1", "--warmup", "0", "--size", "64"]);
    assert_eq!(u(&v["publish_to_durable"]["count"]), 500);
    assert_eq!(u(&v["publish_to_delivery"]["count"]), 500);
    assert!(f(&v["publish_to_delivery"]["p99_ms"]) > 0.0);
    assert!(json.with_extension("svg").exists(), "latency writes a chart");
}

/// The same through the client library: a Producer over its publish
/// stream and a Consumer.
#[test]
fn latency_via_the_client_library() {
    let args = ["--via", "client", "--rate", "500", "--seconds", "1", "--warmup", "0", "--size", "64"];
    let (v, _, _dir) = run("latency", &args);
    assert_eq!(v["via"], "client");
    assert_eq!(u(&v["publish_to_durable"]["count"]), 500);
    assert_eq!(u(&v["publish_to_delivery"]["count"]), 500);
}

#[test]
fn spike() {
    let args = [
        "--size",
        "64",
        "--steady-rate",
        "500",
        "--steady-seconds",
        "0.5",
        "--consumer-rate",
        "1000",
        "--burst-factor",
        "10",
        "--burst-seconds",
        "1",
        "--max-messages",
        "2000",
        "--interval-ms",
        "250",
        "--drain-max-seconds",
        "30",
    ];
    let (v, json, _dir) = run("spike", &args);
    assert_eq!(u(&v["lost"]), 0, "every accepted message is delivered");
    assert_eq!(u(&v["unexpected_errors"]), 0, "{}", v["error_messages"]);
    assert_eq!(u(&v["refused_but_delivered"]), 0);
    assert!(u(&v["accepted"]["total"]) > 0);
    assert_eq!(u(&v["delivered"]), u(&v["accepted"]["total"]));
    assert!(u(&v["refused"]["low"]) > 0, "the burst reached admission");
    assert_eq!(u(&v["offered"]), u(&v["accepted"]["total"]) + u(&v["refused"]["total"]));
    assert!(v["drained"].as_bool().expect("drained"));
    assert!(u(&v["rss_anon_bytes"]["peak"]) > 0);
    assert!(v["samples"].as_array().expect("samples").len() >= 4);
    assert!(json.with_extension("svg").exists(), "spike writes a chart");
}

#[test]
fn priority() {
    let args = [
        "--size",
        "64",
        "--rate",
        "200",
        "--seconds",
        "1",
        "--warmup",
        "0.2",
        "--consumer-rate",
        "1000",
        "--flood-rate",
        "3000",
        "--flood-batch",
        "50",
        "--quota",
        "2000",
    ];
    let (v, json, _dir) = run("priority", &args);
    // Every high-lane message of both phases, the low flood over the quota
    // throttled (and perhaps refused) without holding the high lane up.
    assert_eq!(u(&v["baseline"]["publish_to_delivery"]["count"]), 200);
    assert_eq!(u(&v["flood"]["publish_to_delivery"]["count"]), 200);
    assert_eq!(u(&v["quota"]), 2000);
    assert!(u(&v["flood_stored"]) > 0);
    assert!(f(&v["delivery_ratio"]["p99"]) > 0.0);
    assert!(json.with_extension("svg").exists(), "priority writes a chart");
}

#[test]
fn recovery() {
    let args = ["--cycles", "1", "--load-seconds", "0.5", "--producers", "2", "--batch", "10", "--size", "64"];
    let (v, _, _dir) = run("recovery", &args);
    assert!(u(&v["acked_publishes"]) > 0);
    assert_eq!(u(&v["lost"]), 0, "no acknowledged publish is lost");
    assert_eq!(u(&v["corrupt"]), 0);
    assert_eq!(u(&v["stored_twice"]), 0);
    assert_eq!(u(&v["unexpected_errors"]), 0, "{}", v["client_errors"]);
    let restarts = v["restarts"].as_array().expect("restarts");
    assert_eq!(restarts.len(), 1);
    assert!(f(&restarts[0]["first_delivery_s"]) > 0.0);
}

/// Three nodes: a replicated queue's rate beside a single-node one, and a
/// soak of two faults with the checker: nothing acknowledged lost, nothing
/// delivered that was never published, no key stored twice.
#[test]
fn cluster() {
    let args = [
        "--rounds",
        "1",
        "--messages",
        "300",
        "--size",
        "256",
        "--in-flight",
        "64",
        "--latency-rate",
        "200",
        "--latency-seconds",
        "0.5",
        "--cycles",
        "2",
        "--cycle-seconds",
        "1",
        "--seed",
        "7",
    ];
    let (v, _, _dir) = run("cluster", &args);
    assert!(f(&v["throughput"]["median_single"]) > 0.0);
    assert!(f(&v["throughput"]["median_replicated"]) > 0.0);
    assert_eq!(u(&v["throughput"]["latency"]["replicated"]["count"]), 100);
    let soak = &v["soak"];
    assert_eq!(soak["faults"].as_array().map(Vec::len), Some(2));
    assert!(u(&soak["acknowledged"]) > 0);
    assert_eq!(u(&soak["lost"]), 0, "no acknowledged publish is lost");
    assert_eq!(u(&soak["phantom"]), 0, "nothing delivered that was never published");
    assert_eq!(u(&soak["stored_twice"]), 0, "no key stored twice");
}

/// The chaos soak, a few faults of each kind but the disk (which needs a
/// filesystem of its own): nothing lost, corrupt or stored twice.
#[test]
fn chaos() {
    let args = [
        "--seconds",
        "4",
        "--interval-ms",
        "250",
        "--weights",
        "2,1,2,0",
        "--producers",
        "2",
        "--batch",
        "10",
        "--size",
        "64",
        "--cancel-percent",
        "30",
        "--seed",
        "7",
    ];
    let (v, _, _dir) = run("chaos", &args);
    assert!(u(&v["acked_publishes"]) > 0);
    assert!(u(&v["faults"]["kill"]) + u(&v["faults"]["stop"]) + u(&v["faults"]["consumer"]) > 0);
    assert_eq!(u(&v["lost"]), 0, "no acknowledged publish is lost");
    assert_eq!(u(&v["corrupt"]), 0);
    assert_eq!(u(&v["stored_twice"]), 0, "no idempotency key is stored twice");
    assert_eq!(u(&v["unexpected_errors"]), 0, "{}", v["client_errors"]);
}

/// The steady queue of isolation and cold: 200 msg/s of 64 B for 1 s.
const STEADY_TINY: [&str; 8] = ["--rate", "200", "--seconds", "1", "--warmup", "0", "--size", "64"];

#[test]
fn isolation() {
    let args = [STEADY_TINY.as_slice(), &["--flood-producers", "1", "--rounds", "2", "--flood-quota", "5000"]].concat();
    let (v, _, _dir) = run("isolation", &args);
    // Two rounds pooled on each side.
    assert_eq!(u(&v["alone"]["publish_to_delivery"]["count"]), 400);
    assert_eq!(u(&v["during"]["publish_to_delivery"]["count"]), 400);
    assert!(f(&v["p99_ratio_publish_to_delivery"]) > 0.0);
    // The flood ran unpaced into a 5,000 msg/s quota: it was held near
    // it (100 ms of burst allowance on top, over about 2 s of flood).
    let stored = f(&v["flood_stored_per_s"]);
    assert!(stored > 0.0 && stored < 5_000.0 * 1.5, "flood stored {stored} msg/s under a 5,000 msg/s quota");
}

/// The cold-backlog scenario in its warm control (dropping the page cache
/// would disturb the rest of CI): the backlog drains while the steady
/// queue is measured, and both sides are reported.
#[test]
fn cold() {
    let tail = ["--backlog-mb", "4", "--backlog-size", "1024", "--drop-caches", "false"];
    let args = [STEADY_TINY.as_slice(), &tail].concat();
    let (v, _, _dir) = run("cold", &args);
    assert_eq!(u(&v["backlog_messages"]), 4096);
    assert_eq!(u(&v["alone"]["publish_to_delivery"]["count"]), 200);
    assert_eq!(u(&v["during"]["publish_to_delivery"]["count"]), 200);
    assert!(u(&v["drained"]) > 0, "the cold queue was drained during the measurement");
    assert!(f(&v["p99_ratio_publish_to_delivery"]) > 0.0);
}

#[test]
fn backlog() {
    let (v, _, _dir) = run("backlog", &["--messages", "5000", "--size", "100", "--batch", "500", "--producers", "2"]);
    assert_eq!(u(&v["messages"]), 5000);
    assert!(u(&v["rss_anon_backlog_bytes"]) > 0);
    assert!(u(&v["rss_anon_after_restart_bytes"]) > 0);
}

#[test]
fn overhead() {
    let args = ["--messages", "2000", "--size", "64", "--batch", "50", "--inflight", "2", "--tasks", "2"];
    let (v, _, _dir) = run("overhead", &args);
    for mode in ["raw", "producer_stream", "producer_unary", "producer_linger0"] {
        assert!(f(&v[format!("{mode}_messages_per_s").as_str()]) > 0.0, "{mode}: {v}");
    }
}

/// `overhead --drain`: a raw consume stream and the Consumer each drain
/// their filled queue, and both rates are reported.
#[test]
fn overhead_drain() {
    let args = ["--drain", "raw,consumer", "--messages", "2000", "--size", "64", "--prefetch", "100", "--rounds", "2"];
    let (v, _, _dir) = run("overhead", &args);
    assert_eq!(v["workload"], "drain");
    for mode in ["raw", "consumer"] {
        assert!(f(&v[format!("drain_{mode}_messages_per_s").as_str()]) > 0.0, "{mode}: {v}");
        assert_eq!(v[format!("drain_{mode}_rounds").as_str()].as_array().map(Vec::len), Some(2), "{mode}: {v}");
    }
}

/// Many queues, tiny: every figure is reported, the restart reaches
/// SERVING, and the steady load over the sampled queues is delivered alone
/// and during the flood.
#[test]
fn queues() {
    let config_dir = tempfile::tempdir().expect("temp dir");
    let config = config_dir.path().join("ballastd.toml");
    std::fs::write(&config, "[storage]\nsegment_size = 65536\n").expect("writing the broker config");
    let config = config.to_string_lossy().into_owned();
    let args = [
        "--broker-config",
        &config,
        "--queues",
        "6",
        "--sample",
        "3",
        "--rate",
        "100",
        "--seconds",
        "0.5",
        "--size",
        "64",
        "--flood-producers",
        "1",
        "--flood-batch",
        "10",
    ];
    let (v, _, _dir) = run("queues", &args);
    assert_eq!(u(&v["queues"]), 6);
    assert!(f(&v["create_per_s"]) > 0.0);
    for when in ["after_create", "after_restart", "after_flood"] {
        let figures = &v[when];
        assert!(u(&figures["disk_bytes"]) > 0, "{when}: {figures}");
        assert!(u(&figures["rss_bytes"]) > 0, "{when}: {figures}");
        assert!(u(&figures["threads"]) > 0, "{when}: {figures}");
        assert!(u(&figures["open_files"]) > 0, "{when}: {figures}");
    }
    assert!(f(&v["restart_to_serving_seconds"]) > 0.0);
    assert_eq!(u(&v["sampled_queues"]), 3);
    for phase in ["alone", "during"] {
        let measured = &v[phase];
        assert_eq!(u(&measured["errors"]), 0, "{phase}: {measured}");
        assert_eq!(u(&measured["sent"]), 50, "{phase}: {measured}");
        assert!(u(&measured["received"]) >= u(&measured["sent"]), "{phase}: every message is delivered: {measured}");
        assert!(f(&measured["publish_to_delivery"]["p99_ms"]) > 0.0);
    }
    assert!(u(&v["flood_stored"]) > 0, "the flood stored messages");
    assert!(f(&v["p99_ratio_publish_to_delivery"]) > 0.0);
}

/// `compare` with `--peers none`: the disk probe and Ballast's side of
/// every workload, through the client library and through the raw stubs,
/// land in the JSON with a median per figure, every round and the load
/// tool's CPU share. Only built with `--features compare` (the peers'
/// clients stay out of default builds and CI); the peers are never started
/// here.
#[cfg(feature = "compare")]
#[test]
fn compare_ballast_side() {
    #[rustfmt::skip]
    let args = [
        "--peers", "none", "--rounds", "2", "--messages", "300", "--size", "100", "--producers", "2",
        "--unacked", "32", "--batch", "8", "--prefetch", "50", "--rate", "200", "--seconds", "1",
        "--warmup", "1", "--disk-probe", "20",
    ];
    let (v, _, _dir) = run("compare", &args);
    assert_eq!(v["systems"], serde_json::json!(["ballast"]));
    let figures = v["figures"].as_array().expect("figures");
    let kinds: Vec<&str> = figures.iter().map(|fig| fig["figure"].as_str().expect("figure kind")).collect();
    assert_eq!(kinds, ["fdatasync_p50", "fdatasync_p99", "publish", "drain", "latency_p50", "latency_p99"]);
    for figure in &figures[..2] {
        let disk = &figure["systems"]["disk"];
        assert_eq!(disk["rounds"].as_array().map(Vec::len), Some(2), "the disk was probed every round: {figure}");
        assert!(f(&disk["median"]) > 0.0, "{figure}");
    }
    assert!(f(&figures[5]["ratios"]["ballast/fdatasync_p99"]) > 0.0, "p99 over the disk's: {}", figures[5]);
    for figure in &figures[2..] {
        for system in ["ballast", "ballast_raw"] {
            let s = &figure["systems"][system];
            assert_eq!(s["rounds"].as_array().map(Vec::len), Some(2), "{system} ran every round: {figure}");
            assert!(f(&s["median"]) > 0.0, "{system}: {figure}");
            let share = f(&s["tool_cpu_share_median"]);
            assert!((0.0..=1.0).contains(&share), "the tool's CPU share is a fraction of the machine: {share}");
            assert!(f(&s["broker_cpu_cores_median"]) > 0.0, "the started broker's CPU is read: {figure}");
        }
        assert!(f(&figure["ratios"]["ballast/ballast_raw"]) > 0.0);
    }
}

/// Without its feature, `compare` says how to build it (and starts no
/// broker first).
#[cfg(not(feature = "compare"))]
#[test]
fn compare_needs_its_feature() {
    let output = Command::new(BENCH).args(["compare", "--peers", "none"]).output().expect("running ballast-bench");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("--features ballast-benches/compare"), "{stderr}");
}
