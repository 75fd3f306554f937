//! The peers' servers: `nats-server` and RabbitMQ, each started by the bench
//! on loopback with fresh data in a directory of its own, and stopped when
//! its handle drops (on success, on error and on panic alike).
//!
//! Rules:
//! 1. A peer's binary is looked up before anything starts; a missing one is
//!    an error naming the flag to pass and `benches/scripts/install-peers`.
//! 2. Every port is free when chosen (bound to port 0, then released) and
//!    on 127.0.0.1 only; nothing listens on a fixed port, so two runs (or a
//!    system RabbitMQ) do not collide. RabbitMQ's Erlang port mapper
//!    (`epmd`) gets a port of the run's too and is stopped with the node.
//! 3. A server counts as started once a client connects to it; a server
//!    that exits first, or is not reachable within [`START_TIMEOUT`], is an
//!    error pointing at its log.
//! 4. Stop is SIGTERM, a wait of up to [`STOP_TIMEOUT`], then SIGKILL; the
//!    data directory is removed unless `--keep`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// Longest wait for a started peer to accept clients. RabbitMQ boots in
/// 5-10 s on an idle 2-vCPU machine; a loaded one takes longer.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Longest wait for a peer to stop after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a peer binary is looked for when no flag names it.
const NATS_CANDIDATES: &[&str] = &["/usr/sbin/nats-server", "/usr/bin/nats-server"];
/// Debian's script that runs the node as the calling user (the
/// `/usr/sbin/rabbitmq-server` wrapper would switch to the `rabbitmq` user,
/// who cannot write the run's directories).
const RABBITMQ_CANDIDATES: &[&str] = &["/usr/lib/rabbitmq/bin/rabbitmq-server"];

/// Finds a peer's binary: `flag` if given (it must exist), else the first
/// of `candidates`, else `name` on `PATH`.
pub fn find_binary(name: &str, flag: &str, given: Option<&Path>, candidates: &[&str]) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        anyhow::ensure!(path.exists(), "{} (given with {flag}) does not exist", path.display());
        return Ok(path.to_owned());
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join(name)).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates.iter().map(PathBuf::from).chain(on_path).find(|path| path.is_file()).with_context(|| {
        format!(
            "{name} not found (looked in {} and on PATH): install it with benches/scripts/install-peers \
             (Debian, as root), pass {flag} PATH, or leave the peer out with --peers",
            candidates.join(", ")
        )
    })
}

/// The NATS binary (`--nats-server` or the usual places).
pub fn nats_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    find_binary("nats-server", "--nats-server", given, NATS_CANDIDATES)
}

/// The RabbitMQ start script (`--rabbitmq-server` or the usual places).
pub fn rabbitmq_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    find_binary("rabbitmq-server", "--rabbitmq-server", given, RABBITMQ_CANDIDATES)
}

/// A peer server process started by the bench.
#[derive(Debug)]
pub struct Server {
    /// For messages: `nats-server`, `rabbitmq-server`.
    pub name: &'static str,
    /// The client port on 127.0.0.1.
    pub port: u16,
    /// The process whose CPU time counts as the server's (for RabbitMQ the
    /// Erlang VM, a child of the start script), once known.
    pub cpu_pid: Option<u32>,
    /// The server's combined stdout and stderr.
    pub log: PathBuf,
    /// The process the bench spawned; SIGTERM goes to it.
    child: Option<Child>,
    /// The run's directory of this server (data, logs), removed on drop
    /// unless kept.
    dir: PathBuf,
    keep: bool,
    /// RabbitMQ's `epmd` port, stopped after the node.
    epmd_port: Option<u16>,
}

impl Server {
    /// Starts `nats-server` with JetStream, its store in `dir`, on a free
    /// loopback port.
    pub fn nats(binary: &Path, dir: PathBuf, keep: bool) -> anyhow::Result<Server> {
        fresh_dir(&dir)?;
        let port = free_port()?;
        let log = dir.join("nats-server.log");
        let mut command = Command::new(binary);
        command.arg("-js").arg("-sd").arg(dir.join("store")).arg("-a").arg("127.0.0.1").arg("-p").arg(port.to_string());
        let child = spawn(&mut command, &log)?;
        let cpu_pid = Some(child.id());
        Ok(Server { name: "nats-server", port, cpu_pid, log, child: Some(child), dir, keep, epmd_port: None })
    }

    /// Starts a RabbitMQ node of its own (name, ports, Mnesia and logs in
    /// `dir`, no plugins, a fresh Erlang cookie) on free loopback ports.
    pub fn rabbitmq(binary: &Path, dir: PathBuf, keep: bool) -> anyhow::Result<Server> {
        fresh_dir(&dir)?;
        let port = free_port()?;
        let dist_port = free_port()?;
        let epmd_port = free_port()?;
        let log = dir.join("rabbitmq-server.log");
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        let mut command = Command::new(binary);
        command
            .env("HOME", &dir)
            .env("RABBITMQ_NODENAME", format!("ballast-bench-{}@localhost", std::process::id()))
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .current_dir(&dir);
        let child = spawn(&mut command, &log)?;
        Ok(Server {
            name: "rabbitmq-server",
            port,
            cpu_pid: None,
            log,
            child: Some(child),
            dir,
            keep,
            epmd_port: Some(epmd_port),
        })
    }

    /// Fails if the server has exited (so a start that failed is reported
    /// with its log instead of waiting out the timeout).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        let child = self.child.as_mut().context("the server was stopped")?;
        if let Some(status) = child.try_wait()? {
            bail!("{} exited ({status}) before accepting clients; see {}", self.name, self.log.display());
        }
        Ok(())
    }

    /// Called once the server accepts clients: finds the process whose CPU
    /// time is the server's (RabbitMQ: the Erlang VM the script started).
    pub fn started(&mut self) {
        if self.cpu_pid.is_none() {
            let script = self.child.as_ref().map(Child::id);
            self.cpu_pid = script.and_then(|pid| child_process(pid, "beam")).or(script);
        }
    }

    /// Retries `connect` until it succeeds, the server exits, or
    /// [`START_TIMEOUT`] passes.
    pub async fn wait_until_ready<T, F, Fut>(&mut self, mut connect: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_running()?;
            match connect().await {
                Ok(client) => {
                    self.started();
                    return Ok(client);
                }
                Err(error) if Instant::now() >= deadline => {
                    return Err(error.context(format!(
                        "{} did not accept clients within {} s; see {}",
                        self.name,
                        START_TIMEOUT.as_secs(),
                        self.log.display()
                    )));
                }
                // Polling a port that is not open yet: nothing to wait on.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = libc::pid_t::try_from(child.id()).unwrap_or(libc::pid_t::MAX);
            // SAFETY: kill(2) on our own child; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("{} did not stop within {} s of SIGTERM: killed", self.name, STOP_TIMEOUT.as_secs());
                // The VM first: killing the script alone would orphan it.
                if let Some(vm) = self.cpu_pid.filter(|&vm| vm != child.id()) {
                    let vm = libc::pid_t::try_from(vm).unwrap_or(libc::pid_t::MAX);
                    // SAFETY: as above, on the VM the script started.
                    unsafe { libc::kill(vm, libc::SIGKILL) };
                }
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if let Some(port) = self.epmd_port {
            // `epmd -kill` stops the run's port mapper once no node is
            // registered; it is not ours to keep.
            let _ = Command::new("epmd")
                .arg("-port")
                .arg(port.to_string())
                .arg("-kill")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A port free on 127.0.0.1 when asked (bound to port 0, then released).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Empties `dir` of an earlier run's files and creates it.
fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Spawns `command` with stdout and stderr appended to `log`.
fn spawn(command: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    command
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {}", command.get_program().to_string_lossy()))
}

/// A child of `parent` whose command name contains `name` (from
/// `/proc/PID/stat`), if there is one.
fn child_process(parent: u32, name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        let (head, tail) = stat.rsplit_once(')')?;
        let ppid: u32 = tail.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == parent && head.contains(name)).then_some(pid)
    })
}

/// CPU time (user + system) a process has used so far, from
/// `/proc/<pid>/stat` (`pid` is a number or `self`).
pub fn cpu_time(pid: &str) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("/proc/{pid}/stat"))?;
    // After the command name (which may hold spaces and parentheses):
    // state is field 3, utime field 14, stime field 15.
    let (_, tail) = stat.rsplit_once(')').context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let ticks = |index: usize| -> anyhow::Result<u64> {
        Ok(fields.get(index).context("short /proc/PID/stat")?.parse::<u64>()?)
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second).ok().filter(|&t| t > 0).unwrap_or(100);
    Ok(Duration::from_secs_f64(total as f64 / per_second as f64))
}
