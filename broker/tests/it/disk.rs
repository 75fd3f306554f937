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
