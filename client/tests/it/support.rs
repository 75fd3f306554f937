//! A real `ballastd` child process on a loopback port with its own data
//! directory.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

/// A `ballastd` process, killed on drop.
pub struct Broker {
    child: Option<Child>,
    pub addr: SocketAddr,
    data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        // Small segments: every lane preallocates one, and the default 64 MiB
        // makes creating a queue take seconds on a busy test machine.
        std::fs::write(config_path(&data_dir), "[storage]\nsegment_size = 4194304\n").expect("write config");
        let (child, addr) = spawn(&data_dir, "127.0.0.1:0".parse().expect("address"));
        Broker { child: Some(child), addr, data_dir, _dir: dir }
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
        let (child, addr) = spawn(&self.data_dir, self.addr);
        self.child = Some(child);
        self.addr = addr;
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

fn spawn(data_dir: &Path, listen: SocketAddr) -> (Child, SocketAddr) {
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
            .arg("--config")
            .arg(config_path(data_dir))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn ballastd");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        if let Some(addr) = line.trim().strip_prefix("listening on ") {
            return (child, addr.parse().expect("ballastd prints a socket address"));
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
