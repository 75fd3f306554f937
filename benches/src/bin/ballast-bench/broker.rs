//! The broker under test: a `ballastd` child process started by the bench
//! (found next to the bench's own executable), or an address to target.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use ballast_proto::v1::{self as pb, admin_client::AdminClient};
use sha2::Digest;
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
};

/// A connection to the broker under test; with `--auth` every call carries
/// the run's bearer token.
pub type Channel = InterceptedService<tonic::transport::Channel, Token>;

/// Adds `authorization: Bearer <token>` to every call when the run has a
/// token; passes calls through untouched otherwise.
#[derive(Debug, Clone, Default)]
pub struct Token(Option<MetadataValue<Ascii>>);

impl Interceptor for Token {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// How the started broker is secured (`--tls`, `--auth`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Secure {
    /// TLS with a self-signed certificate made for the run.
    pub tls: bool,
    /// An auth file of one principal; the bench sends its token.
    pub auth: bool,
}

/// A broker to run scenarios against.
#[derive(Debug)]
pub struct Target {
    pub endpoint: String,
    child: Option<Child>,
    data_dir: Option<PathBuf>,
    keep: bool,
    ballastd: PathBuf,
    /// `--config` for the started broker.
    config: Option<PathBuf>,
    /// Where the started broker's log goes (default: next to its data).
    log: Option<PathBuf>,
    /// With `--tls`: the started broker's self-signed certificate (PEM),
    /// the one CA the bench's connections trust.
    tls_cert: Option<String>,
    /// With `--auth`: the token of the one principal of the started
    /// broker's auth file (allowed everything), sent on every call.
    token: Token,
}

impl Target {
    /// Targets `addr` if given, otherwise starts `ballastd` on a fresh data
    /// directory under `data_root` on a free loopback port.
    pub fn new(
        addr: Option<String>,
        ballastd: Option<PathBuf>,
        config: Option<PathBuf>,
        log: Option<PathBuf>,
        data_root: &Path,
        keep: bool,
        secure: Secure,
    ) -> anyhow::Result<Target> {
        let Secure { tls, auth } = secure;
        let ballastd = match ballastd {
            Some(path) => path,
            None => std::env::current_exe()?.with_file_name("ballastd"),
        };
        if let Some(addr) = addr {
            anyhow::ensure!(!tls, "--tls starts a broker with a certificate of its own: it cannot be used with --addr");
            anyhow::ensure!(
                !auth,
                "--auth starts a broker with an auth file of its own: it cannot be used with --addr"
            );
            let endpoint = if addr.starts_with("http") { addr } else { format!("http://{addr}") };
            return Ok(Target {
                endpoint,
                child: None,
                data_dir: None,
                keep,
                ballastd,
                config,
                log,
                tls_cert: None,
                token: Token::default(),
            });
        }
        if !ballastd.exists() {
            bail!(
                "{} not found: build it with `cargo build --release -p ballast-broker` (or pass --ballastd PATH or --addr HOST:PORT)",
                ballastd.display()
            );
        }
        let data_dir = data_root.join(format!("run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir)?;
        let tls_cert = tls.then(|| write_certificate(&data_dir)).transpose()?;
        let token = if auth { Token(Some(write_auth_file(&data_dir)?)) } else { Token::default() };
        let data_dir = Some(data_dir);
        let mut target =
            Target { endpoint: String::new(), child: None, data_dir, keep, ballastd, config, log, tls_cert, token };
        target.start("127.0.0.1:0")?;
        Ok(target)
    }

    fn start(&mut self, listen: &str) -> anyhow::Result<()> {
        let data_dir = self.data_dir.clone().context("the bench did not start this broker")?;
        let log_path = self.log.clone().unwrap_or_else(|| data_dir.with_extension("log"));
        // Appended to: a restarted broker's lines follow the last run's.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut command = Command::new(&self.ballastd);
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        if self.tls_cert.is_some() {
            command.arg("--tls-cert").arg(data_dir.join(CERT_FILE)).arg("--tls-key").arg(data_dir.join(KEY_FILE));
        }
        if self.token.0.is_some() {
            command.arg("--auth-file").arg(data_dir.join(AUTH_FILE));
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir.join("data"))
            .arg("--listen")
            .arg(listen)
            // Several brokers may run at once (the smoke tests): no fixed port.
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.ballastd.display()))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            bail!("ballastd did not start; see {}", log_path.display());
        };
        let scheme = if self.tls_cert.is_some() { "https" } else { "http" };
        self.endpoint = format!("{scheme}://{addr}");
        self.child = Some(child);
        Ok(())
    }

    /// The directory holding the started broker's data directory (and
    /// nothing of other runs), if the bench started it.
    pub fn data_root(&self) -> Option<&Path> {
        self.data_dir.as_deref()
    }

    /// The broker's process id, if the bench started it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and start again on the same data and port; returns how long
    /// the restart took until the broker listened.
    pub fn kill_and_restart(&mut self) -> anyhow::Result<Duration> {
        let mut child = self.child.take().context("the bench did not start this broker")?;
        let port = self.endpoint.rsplit(':').next().unwrap_or("0").to_owned();
        child.kill()?;
        child.wait()?;
        let start = std::time::Instant::now();
        self.start(&format!("127.0.0.1:{port}"))?;
        Ok(start.elapsed())
    }

    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let mut endpoint = tonic::transport::Channel::from_shared(self.endpoint.clone())?;
        if let Some(cert) = &self.tls_cert {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(cert))
                .domain_name("localhost");
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(self.with_token(endpoint.connect().await?))
    }

    /// `channel` with the run's token on every call (if it has one).
    pub fn with_token(&self, channel: tonic::transport::Channel) -> Channel {
        InterceptedService::new(channel, self.token.clone())
    }

    /// Whether the bench's connections speak TLS.
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// Creates (or re-creates, emptied) a queue for a scenario.
    pub async fn fresh_queue(&self, name: &str, settings: pb::QueueSettings) -> anyhow::Result<()> {
        let mut admin = AdminClient::new(self.channel().await?);
        let _ = admin.delete_queue(pb::DeleteQueueRequest { name: name.into() }).await;
        admin.create_queue(pb::CreateQueueRequest { name: name.into(), settings: Some(settings) }).await?;
        Ok(())
    }

    pub async fn depth(&self, name: &str) -> anyhow::Result<u64> {
        let mut admin = AdminClient::new(self.channel().await?);
        Ok(admin.get_queue(pb::GetQueueRequest { name: name.into() }).await?.into_inner().depth)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM for a clean stop; SIGKILL if it lingers.
            let pid = libc::pid_t::try_from(child.id()).unwrap_or(libc::pid_t::MAX);
            // SAFETY: kill(2) on our own child; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            for _ in 0..300 {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self.data_dir
            && !self.keep
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The started broker's certificate and key files, in its run directory.
const CERT_FILE: &str = "tls-cert.pem";
const KEY_FILE: &str = "tls-key.pem";

/// The started broker's auth file (`--auth`), in its run directory.
const AUTH_FILE: &str = "auth.toml";

/// Writes an auth file of one principal allowed every action on every
/// queue, with a fresh random token; returns the `Bearer` header value.
fn write_auth_file(dir: &Path) -> anyhow::Result<MetadataValue<Ascii>> {
    let token: String = (0..32).map(|_| format!("{:02x}", fastrand::u8(..))).collect();
    let digest: String = sha2::Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(
        dir.join(AUTH_FILE),
        format!(
            "[[principals]]\nname = \"bench\"\ntoken_sha256 = \"{digest}\"\n\
             allow = [ {{ queues = \"*\", actions = [\"publish\", \"consume\", \"admin\", \"stats\"] }} ]\n"
        ),
    )?;
    Ok(format!("Bearer {token}").parse()?)
}

/// Writes a self-signed certificate for `localhost` and its key into
/// `dir`; returns the certificate (PEM).
fn write_certificate(dir: &Path) -> anyhow::Result<String> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&key)?.pem();
    std::fs::write(dir.join(CERT_FILE), &cert)?;
    std::fs::write(dir.join(KEY_FILE), key.serialize_pem())?;
    Ok(cert)
}

/// A process's anonymous resident memory (`RssAnon` in /proc), in bytes.
pub fn rss_anon(pid: u32) -> anyhow::Result<u64> {
    proc_status_bytes(pid, "RssAnon")
}

/// A kB figure of `/proc/PID/status` (`VmRSS`, `RssAnon`, ...), in bytes.
pub fn proc_status_bytes(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let prefix = format!("{key}:");
    let line =
        status.lines().find(|l| l.starts_with(&prefix)).with_context(|| format!("no {key} in /proc/PID/status"))?;
    let kib: u64 = line.split_whitespace().nth(1).with_context(|| format!("{key} value"))?.parse()?;
    Ok(kib * 1024)
}

impl Target {
    /// The queue's saturation figures from the Stats RPC.
    pub async fn stats_on(channel: &Channel, name: &str) -> anyhow::Result<pb::QueueStats> {
        let mut stats = ballast_proto::v1::stats_client::StatsClient::new(channel.clone());
        let response = stats.get_stats(pb::StatsRequest { queue: name.into() }).await?.into_inner();
        response.queues.into_iter().find(|q| q.name == name).with_context(|| format!("no stats for queue {name}"))
    }

    /// Whether the bench started the broker (and so can kill it or read its
    /// memory).
    pub fn started(&self) -> bool {
        self.child.is_some()
    }
}
