//! The broker's configuration: every setting with one named default, read
//! from an optional TOML file and overridden by flags.
//!
//! ```toml
//! data_dir = "./data"
//! listen = "127.0.0.1:7400"
//! shutdown_timeout_ms = 10000
//! queues_max = 20000
//! queue_open_threads = 8  # queues opened at once after a start; 0: on first call
//!
//! [storage]
//! segment_size = 67108864
//! flush_threads = 0  # threads shared by every lane's log; 0: one per core
//! open_files_max = 512  # descriptors of log files held open at once
//!
//! [grpc]             # connections, keepalive and stream limits
//! keepalive_interval_ms = 30000
//! keepalive_timeout_ms = 10000
//! tcp_keepalive_ms = 60000
//! connections_max = 1024
//! streams_per_connection_max = 1024
//! watch_streams_max = 256
//!
//! [auth]             # principals and permissions; none: every call is open
//! file = "/etc/ballast/auth.toml"
//!
//! [tls]              # TLS on the gRPC listener (off without cert)
//! cert = "/etc/ballast/server.pem"
//! key = "/etc/ballast/server.key"
//! client_ca = "/etc/ballast/clients-ca.pem"  # mutual TLS: client certificates required
//!
//! [metrics]
//! tls = false        # serve /metrics over TLS with [tls]'s cert and key
//!
//! [queue_defaults]   # the defaults of every new queue
//! lanes = ["high", "normal", "low"]
//! lane_weights = [4, 2, 1]
//! lease_timeout_ms = 30000
//! max_attempts = 5
//! ```

use std::{net::SocketAddr, path::PathBuf, sync::OnceLock};

use serde::{Deserialize, Serialize};

use crate::queue::QueueSettings;

/// Default data directory.
pub const DATA_DIR_DEFAULT: &str = "./data";
/// Default gRPC address: loopback only.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7400";
/// Default Prometheus metrics address: loopback only.
pub const METRICS_LISTEN_DEFAULT: &str = "127.0.0.1:7401";
/// Default disk watermark: publishes stop below 512 MiB free.
pub const DISK_FREE_MIN_BYTES_DEFAULT: u64 = 512 * 1024 * 1024;
/// How long a graceful shutdown waits for in-flight requests, in ms.
pub const SHUTDOWN_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default HTTP/2 ping interval on an idle connection, in ms.
pub const KEEPALIVE_INTERVAL_MS_DEFAULT: u64 = 30_000;
/// Default wait for a ping's answer before the connection is closed, in ms.
pub const KEEPALIVE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default idle time before the kernel's TCP keepalive probes start, in ms.
pub const TCP_KEEPALIVE_MS_DEFAULT: u64 = 60_000;
/// Default limit on connections held at once.
pub const CONNECTIONS_MAX_DEFAULT: usize = 1024;
/// Default limit on concurrent calls (HTTP/2 streams) per connection.
pub const STREAMS_PER_CONNECTION_MAX_DEFAULT: u32 = 1024;
/// Default publish slots (`grpc.publish_slots`): 0, one per core
/// (`std::thread::available_parallelism`), as many as the runtime has
/// workers, so the calls doing publish work never outnumber the workers
/// that run them.
pub const PUBLISH_SLOTS_DEFAULT: usize = 0;
/// Default limit on queues (dead-letter and damaged queues included):
/// 10,000 queues, each with its dead-letter queue, the figure the broker is
/// benchmarked at (`ballast-bench queues`). An idle queue costs little (see
/// the README's limits).
pub const QUEUES_MAX_DEFAULT: usize = 20_000;
/// Default number of queues opened at once in the background after a
/// start (four per core of the 2-core machine the figures are from).
pub const QUEUE_OPEN_THREADS_DEFAULT: usize = 8;
/// Default limit on Stats Watch streams open at once.
pub const WATCH_STREAMS_MAX_DEFAULT: usize = 256;
/// Default longest time a call may take until its response starts, in ms:
/// above the longest Pull wait (`PULL_WAIT_MS_MAX`, 60 s), so a client
/// without a deadline never holds a call, its task and its memory forever.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 120_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where queues live.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Longest wait for in-flight requests on SIGTERM/SIGINT, in ms.
    pub shutdown_timeout_ms: u64,
    /// Prometheus `/metrics` HTTP address: loopback by default.
    pub metrics_listen: SocketAddr,
    /// Publishes are refused while the data directory's filesystem has less
    /// free space than this, in bytes (consumers, acks and admin go on).
    pub disk_free_min_bytes: u64,
    /// Queues this broker holds at most, dead-letter and damaged queues
    /// included (1..=`limits::QUEUES_MAX`); one more is RESOURCE_EXHAUSTED.
    pub queues_max: usize,
    /// Queues opened at once, each on a blocking thread, by the background
    /// opener after a start (0..=`limits::QUEUE_OPEN_THREADS_MAX`). 0 opens
    /// none in the background: a queue opens on its first call, so queues
    /// nobody uses cost no memory for their logs, but ListQueues, Stats and
    /// the metrics show them as opening until then.
    pub queue_open_threads: usize,
    pub storage: StorageConfig,
    pub grpc: GrpcConfig,
    pub auth: AuthConfig,
    /// Settings a new queue gets for every field its creator leaves unset.
    pub queue_defaults: QueueSettings,
    /// TLS on the gRPC listener (and, with `metrics.tls`, the metrics one).
    pub tls: TlsConfig,
    pub metrics: MetricsConfig,
    /// Start on a non-loopback address without TLS and authentication
    /// (see [`check_exposure`]).
    pub insecure: bool,
    /// Replication (`docs/replication.md`): this node's id and its
    /// peers. Absent: a single node, and `replicas` above 1 is refused.
    pub cluster: Option<ClusterConfig>,
    /// Test seam, never read from a file: failures to inject into every
    /// log's I/O (see `ballast_storage::Faults`).
    #[serde(skip)]
    pub faults: FaultSeam,
    /// Never read from a file: the flush pool and descriptor cache every
    /// lane's log shares, created on first use from `[storage]`.
    #[serde(skip)]
    pub storage_shared: StorageShared,
}

/// [`Config::storage_shared`]: runtime handles, not settings, so they never
/// make two configs differ; clones of a config share them.
#[derive(Debug, Clone, Default)]
pub struct StorageShared(
    std::sync::Arc<(OnceLock<Option<ballast_storage::FlushPool>>, OnceLock<ballast_storage::FileCache>)>,
);

impl PartialEq for StorageShared {
    fn eq(&self, _: &StorageShared) -> bool {
        true
    }
}

/// [`Config::faults`]: equal when both are the same `Faults` (or none).
#[derive(Debug, Clone, Default)]
pub struct FaultSeam(pub Option<std::sync::Arc<ballast_storage::Faults>>);

impl PartialEq for FaultSeam {
    fn eq(&self, other: &FaultSeam) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

/// Storage settings shared by every lane's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Size of each segment file, in bytes.
    pub segment_size: u64,
    /// Synced bytes between checkpoints (bounds crash recovery), in bytes.
    pub checkpoint_interval_bytes: u64,
    /// Threads of the flush pool that every lane's log shares (group
    /// commit, checkpoints, retention, segment growth): 0 means one per
    /// core (at least 2, at most 16); otherwise 2..=64
    /// (`ballast_storage::limits::FLUSH_THREADS_MIN..=FLUSH_THREADS_MAX`).
    pub flush_threads: usize,
    /// Descriptors of log files (segments, journals, checkpoints) held open
    /// at once, by every lane together; past it the least recently used is
    /// closed and opened again when needed. In
    /// `ballast_storage::limits::OPEN_FILES_MIN..=OPEN_FILES_MAX` (16..=1,048,576).
    pub open_files_max: usize,
}

/// Authentication and authorization (`docs/security.md`).
/// Default Raft heartbeat interval of the cluster log, in ms.
pub const CLUSTER_HEARTBEAT_MS_DEFAULT: u64 = 150;
/// Default lower bound of the randomized election timeout, in ms: a
/// follower that hears nothing from a leader for this long (plus a random
/// part up to the upper bound) starts an election.
pub const CLUSTER_ELECTION_TIMEOUT_MIN_MS_DEFAULT: u64 = 1_000;
/// Default upper bound of the randomized election timeout, in ms.
pub const CLUSTER_ELECTION_TIMEOUT_MAX_MS_DEFAULT: u64 = 2_000;

/// `[cluster]`: this node's place in a statically configured cluster.
///
/// ```toml
/// [cluster]
/// node_id = 1
/// peers = [
///   { id = 1, addr = "127.0.0.1:7400" },
///   { id = 2, addr = "127.0.0.1:7410" },
///   { id = 3, addr = "127.0.0.1:7420" },
/// ]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id, one of `peers`' ids, never 0.
    pub node_id: u64,
    /// Every voter of the cluster, this node included: its id and the
    /// gRPC address the other nodes and the clients reach it at.
    pub peers: Vec<Peer>,
    /// Raft heartbeat interval, in ms.
    #[serde(default = "heartbeat_default")]
    pub heartbeat_ms: u64,
    /// Randomized election timeout's lower bound, in ms.
    #[serde(default = "election_min_default")]
    pub election_timeout_min_ms: u64,
    /// Randomized election timeout's upper bound, in ms.
    #[serde(default = "election_max_default")]
    pub election_timeout_max_ms: u64,
    /// Bearer token this node presents to its peers when they have an
    /// auth file (a principal with the `cluster` permission).
    #[serde(default)]
    pub token: Option<String>,
    /// With `[tls]`: the CA certificates (PEM) that signed the peers'
    /// server certificates. Peers are dialed over TLS, presenting this
    /// node's own `[tls]` certificate when `tls.client_ca` asks for one.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

fn heartbeat_default() -> u64 {
    CLUSTER_HEARTBEAT_MS_DEFAULT
}
fn election_min_default() -> u64 {
    CLUSTER_ELECTION_TIMEOUT_MIN_MS_DEFAULT
}
fn election_max_default() -> u64 {
    CLUSTER_ELECTION_TIMEOUT_MAX_MS_DEFAULT
}

/// One voter of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub id: u64,
    /// `host:port` of its gRPC listener.
    pub addr: String,
}

impl ClusterConfig {
    /// Checks the node set: ids unique and non-zero, this node among
    /// them, an odd count up to `REPLICAS_MAX`, the timeouts ordered.
    pub fn validate(&self) -> Result<(), String> {
        let max = crate::limits::REPLICAS_MAX as usize;
        let n = self.peers.len();
        if !(3..=max).contains(&n) || n % 2 == 0 {
            return Err(format!("peers must list an odd count of 3..={max} nodes (this one included); got {n}"));
        }
        for (i, peer) in self.peers.iter().enumerate() {
            if peer.id == 0 {
                return Err("peers: node ids start at 1".to_owned());
            }
            if self.peers[..i].iter().any(|p| p.id == peer.id) {
                return Err(format!("peers: node id {} appears twice", peer.id));
            }
            if peer.addr.is_empty() {
                return Err(format!("peers: node {} has no addr", peer.id));
            }
        }
        if !self.peers.iter().any(|p| p.id == self.node_id) {
            return Err(format!("node_id {} is not among peers' ids", self.node_id));
        }
        if !(10..=10_000).contains(&self.heartbeat_ms) {
            return Err(format!("heartbeat_ms must be in 10..=10000; got {}", self.heartbeat_ms));
        }
        if self.election_timeout_min_ms < 2 * self.heartbeat_ms
            || self.election_timeout_max_ms <= self.election_timeout_min_ms
            || self.election_timeout_max_ms > 60_000
        {
            return Err(format!(
                "election timeouts must satisfy 2 x heartbeat_ms <= election_timeout_min_ms < \
                 election_timeout_max_ms <= 60000; got {}..{} with a heartbeat of {}",
                self.election_timeout_min_ms, self.election_timeout_max_ms, self.heartbeat_ms
            ));
        }
        Ok(())
    }

    /// This node's own peer entry.
    pub fn me(&self) -> &Peer {
        self.peers.iter().find(|p| p.id == self.node_id).expect("validated: node_id is among peers")
    }

    /// The client address of node `id`, if it is a peer.
    pub fn addr_of(&self, id: u64) -> Option<&str> {
        self.peers.iter().find(|p| p.id == id).map(|p| p.addr.as_str())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The TOML file of principals (`--auth-file`). Without it every call
    /// is open, as on a broker without authentication; with it every call
    /// but health checks needs a principal's token or certificate.
    pub file: Option<PathBuf>,
}

impl Config {
    /// Whether calls need credentials (an auth file is set).
    pub fn auth_configured(&self) -> bool {
        self.auth.file.is_some()
    }
}

/// Connection settings of the gRPC server: how dead peers are found and
/// how many connections and calls it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    /// HTTP/2 ping interval, in ms: a connection is pinged when it has been
    /// quiet this long.
    pub keepalive_interval_ms: u64,
    /// How long a ping may go unanswered, in ms, before the connection is
    /// closed: its consume streams end and their leases go back to their
    /// lanes without counting an attempt.
    pub keepalive_timeout_ms: u64,
    /// Idle time before TCP keepalive probes start, in ms (the kernel's
    /// probe interval and count then apply).
    pub tcp_keepalive_ms: u64,
    /// Connections held at once; a new one past it is closed at once (and
    /// logged).
    pub connections_max: usize,
    /// Concurrent calls (HTTP/2 streams) per connection, announced to the
    /// client: its HTTP/2 layer waits before starting more.
    pub streams_per_connection_max: u32,
    /// Stats Watch streams open at once; one more is RESOURCE_EXHAUSTED.
    pub watch_streams_max: usize,
    /// Longest time, in ms, from a call's arrival to its response's start
    /// (a unary call's whole answer; a stream's subscription, not the
    /// stream): past it the call ends CANCELLED ("Timeout expired"). A
    /// client's shorter `grpc-timeout` wins. A Pull must wait less.
    pub request_timeout_ms: u64,
    /// Publish calls doing their CPU work (admission, encoding, appending)
    /// at once, node-wide; more wait in their queue's line and the freed
    /// slots go round the queues with calls waiting (`fair.rs`). 0: one
    /// per core.
    pub publish_slots: usize,
}

impl Default for GrpcConfig {
    fn default() -> GrpcConfig {
        GrpcConfig {
            keepalive_interval_ms: KEEPALIVE_INTERVAL_MS_DEFAULT,
            keepalive_timeout_ms: KEEPALIVE_TIMEOUT_MS_DEFAULT,
            tcp_keepalive_ms: TCP_KEEPALIVE_MS_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            streams_per_connection_max: STREAMS_PER_CONNECTION_MAX_DEFAULT,
            watch_streams_max: WATCH_STREAMS_MAX_DEFAULT,
            request_timeout_ms: REQUEST_TIMEOUT_MS_DEFAULT,
            publish_slots: PUBLISH_SLOTS_DEFAULT,
        }
    }
}

impl GrpcConfig {
    /// Checks each setting against its range; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        use crate::limits::{
            CONNECTIONS_MAX, KEEPALIVE_MS_MAX, KEEPALIVE_MS_MIN, PUBLISH_SLOTS_MAX, REQUEST_TIMEOUT_MS_MAX,
            REQUEST_TIMEOUT_MS_MIN, STREAMS_PER_CONNECTION_MAX, WATCH_STREAMS_MAX,
        };
        if !(REQUEST_TIMEOUT_MS_MIN..=REQUEST_TIMEOUT_MS_MAX).contains(&self.request_timeout_ms) {
            return Err(format!(
                "request_timeout_ms must be in {REQUEST_TIMEOUT_MS_MIN}..={REQUEST_TIMEOUT_MS_MAX}; got {}",
                self.request_timeout_ms
            ));
        }
        let ms = [
            ("keepalive_interval_ms", self.keepalive_interval_ms),
            ("keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("tcp_keepalive_ms", self.tcp_keepalive_ms),
        ];
        for (key, value) in ms {
            if !(KEEPALIVE_MS_MIN..=KEEPALIVE_MS_MAX).contains(&value) {
                return Err(format!("{key} must be in {KEEPALIVE_MS_MIN}..={KEEPALIVE_MS_MAX}; got {value}"));
            }
        }
        let counts = [
            ("connections_max", self.connections_max, CONNECTIONS_MAX),
            (
                "streams_per_connection_max",
                self.streams_per_connection_max as usize,
                STREAMS_PER_CONNECTION_MAX as usize,
            ),
            ("watch_streams_max", self.watch_streams_max, WATCH_STREAMS_MAX),
        ];
        for (key, value, max) in counts {
            if !(1..=max).contains(&value) {
                return Err(format!("{key} must be in 1..={max}; got {value}"));
            }
        }
        if self.publish_slots > PUBLISH_SLOTS_MAX {
            return Err(format!(
                "publish_slots must be in 0..={PUBLISH_SLOTS_MAX} (0: one per core); got {}",
                self.publish_slots
            ));
        }
        Ok(())
    }

    /// The publish slots: `publish_slots`, or one per core when 0.
    pub fn publish_slots(&self) -> usize {
        match self.publish_slots {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            slots => slots,
        }
    }
}

/// `[tls]`: the gRPC listener's certificate, its key and, for mutual TLS,
/// the CAs that sign client certificates (PEM files). Without `cert` the
/// listener speaks plaintext. The files reload on SIGHUP and when they
/// change, for new connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain, leaf first.
    pub cert: Option<PathBuf>,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// CA certificates; with it every client must present a certificate
    /// one of them signed.
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// Whether the gRPC listener speaks TLS.
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }

    /// Checks that the keys come together; the files are checked when the
    /// configuration is built (`grpc::tls::build`).
    pub fn validate(&self) -> Result<(), String> {
        match (&self.cert, &self.key, &self.client_ca) {
            (Some(_), None, _) => Err("tls.cert needs tls.key (the certificate's private key)".to_owned()),
            (None, Some(_), _) => Err("tls.key needs tls.cert (the certificate it belongs to)".to_owned()),
            (None, None, Some(_)) => Err("tls.client_ca needs tls.cert and tls.key (mutual TLS is TLS)".to_owned()),
            _ => Ok(()),
        }
    }
}

/// `[metrics]`: the Prometheus endpoint's transport.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` over TLS with `[tls]`'s certificate and key
    /// (client certificates are not asked for).
    pub tls: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from(DATA_DIR_DEFAULT),
            listen: LISTEN_DEFAULT.parse().expect("the default listen address parses"),
            shutdown_timeout_ms: SHUTDOWN_TIMEOUT_MS_DEFAULT,
            metrics_listen: METRICS_LISTEN_DEFAULT.parse().expect("the default metrics address parses"),
            disk_free_min_bytes: DISK_FREE_MIN_BYTES_DEFAULT,
            queues_max: QUEUES_MAX_DEFAULT,
            queue_open_threads: QUEUE_OPEN_THREADS_DEFAULT,
            storage: StorageConfig::default(),
            grpc: GrpcConfig::default(),
            auth: AuthConfig::default(),
            queue_defaults: QueueSettings::default(),
            tls: TlsConfig::default(),
            metrics: MetricsConfig::default(),
            insecure: false,
            cluster: None,
            faults: FaultSeam::default(),
            storage_shared: StorageShared::default(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> StorageConfig {
        StorageConfig {
            segment_size: ballast_storage::limits::SEGMENT_SIZE_DEFAULT,
            checkpoint_interval_bytes: ballast_storage::limits::CHECKPOINT_INTERVAL_BYTES_DEFAULT,
            flush_threads: 0,
            open_files_max: ballast_storage::limits::OPEN_FILES_DEFAULT,
        }
    }
}

impl Config {
    /// Parses a TOML config file's text.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every setting; the message names the key and the range.
    pub fn validate(&self) -> Result<(), String> {
        self.queue_defaults.validate().map_err(|e| format!("queue_defaults: {e}"))?;
        let log = self.log_options_without_pool(&self.queue_defaults);
        log.validate().map_err(|e| format!("storage: {e}"))?;
        let (min, max) = (ballast_storage::limits::FLUSH_THREADS_MIN, ballast_storage::limits::FLUSH_THREADS_MAX);
        let threads = self.storage.flush_threads;
        if threads != 0 && !(min..=max).contains(&threads) {
            return Err(format!("storage.flush_threads must be 0 (one per core) or in {min}..={max}; got {threads}"));
        }
        let (min, max) = (ballast_storage::limits::OPEN_FILES_MIN, ballast_storage::limits::OPEN_FILES_MAX);
        let files = self.storage.open_files_max;
        if !(min..=max).contains(&files) {
            return Err(format!("storage.open_files_max must be in {min}..={max}; got {files}"));
        }
        self.grpc.validate().map_err(|e| format!("grpc.{e}"))?;
        if let Some(cluster) = &self.cluster {
            cluster.validate().map_err(|e| format!("cluster.{e}"))?;
        }
        let max = crate::limits::QUEUES_MAX;
        if !(1..=max).contains(&self.queues_max) {
            return Err(format!("queues_max must be in 1..={max}; got {}", self.queues_max));
        }
        let max = crate::limits::QUEUE_OPEN_THREADS_MAX;
        if self.queue_open_threads > max {
            return Err(format!(
                "queue_open_threads must be in 0..={max} (0: open each queue on its first call); got {}",
                self.queue_open_threads
            ));
        }
        Ok(())
    }

    /// Checks that the TLS settings come together. Separate from
    /// [`Config::validate`] (which a file's text gets) because flags may
    /// complete what the file starts: call it once flags are applied.
    pub fn validate_tls(&self) -> Result<(), String> {
        self.tls.validate()?;
        if self.metrics.tls && !self.tls.enabled() {
            return Err("metrics.tls needs tls.cert and tls.key".to_owned());
        }
        Ok(())
    }

    /// Storage options of one lane of a queue with `settings`, on the
    /// broker's flush pool (created on the first call).
    pub fn log_options(&self, settings: &QueueSettings) -> ballast_storage::LogOptions {
        let (pools, caches) = &*self.storage_shared.0;
        let files = caches.get_or_init(|| ballast_storage::FileCache::new(self.storage.open_files_max)).clone();
        // Tried once, whichever lane opens first (queues open in parallel):
        // on failure every lane falls back to the process-wide pool.
        let pool = pools
            .get_or_init(|| {
                ballast_storage::FlushPool::new(self.storage.flush_threads)
                    .inspect_err(
                        |error| tracing::warn!(%error, "starting the flush pool failed; using the default pool"),
                    )
                    .ok()
            })
            .clone();
        ballast_storage::LogOptions { pool, files: Some(files), ..self.log_options_without_pool(settings) }
    }

    fn log_options_without_pool(&self, settings: &QueueSettings) -> ballast_storage::LogOptions {
        let headroom = ballast_storage::limits::RECORD_HEADER_SIZE
            + ballast_storage::limits::KEY_SIZE_MAX
            + ballast_storage::limits::HEADERS_SIZE_MAX;
        let segment_room = self.storage.segment_size.saturating_sub(ballast_storage::limits::SEGMENT_HEADER_SIZE);
        let record_size_max = u64::from(settings.message_size_max + headroom).min(segment_room);
        ballast_storage::LogOptions {
            segment_size: self.storage.segment_size,
            record_size_max: u32::try_from(record_size_max).unwrap_or(u32::MAX),
            sync_policy: settings.storage_policy(),
            checkpoint_interval_bytes: self.storage.checkpoint_interval_bytes,
            dedupe_window_ms: settings.dedupe_window_ms,
            dedupe_keys_max: u32::try_from(crate::limits::DEDUPE_KEYS_MAX).unwrap_or(u32::MAX),
            faults: self.faults.0.clone(),
            pool: None,
            files: None,
        }
    }
}

/// A configuration the broker refuses to start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "refusing to listen on {listen} without {missing}: anyone who can reach it could read and change every \
         queue; listen on a loopback address, configure {missing}, or pass --insecure (insecure = true) to accept that"
    )]
    Exposed { listen: SocketAddr, missing: &'static str },
}

/// Refuses a non-loopback `listen` unless both TLS and authentication are
/// configured or the operator said `insecure`: on loopback only local
/// processes can connect, anywhere else the network can.
pub fn check_exposure(listen: SocketAddr, tls: bool, auth: bool, insecure: bool) -> Result<(), ConfigError> {
    let missing = match (tls, auth) {
        (true, true) => return Ok(()),
        (false, false) => "TLS and authentication",
        (false, true) => "TLS",
        (true, false) => "authentication",
    };
    if listen.ip().is_loopback() || insecure {
        return Ok(());
    }
    Err(ConfigError::Exposed { listen, missing })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn file_overrides_and_unknown_keys_are_refused() {
        let c = Config::from_toml("listen = \"127.0.0.1:9000\"\n[queue_defaults]\nlanes = [\"a\"]\nlane_weights = [1]\nlane_admission = [1.0]\ndefault_lane = 0\nlease_timeout_ms = 1000\nmax_attempts = 3\ndead_letter = false\ndedupe_window_ms = 0\nmessage_size_max = 100\nsync_policy = \"none\"\nsync_interval_ms = 5\nstrict_priority = true\n").unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.queue_defaults.lanes, vec!["a"]);
        assert!(Config::from_toml("lisen = \"x\"").unwrap_err().contains("lisen"));
        assert!(Config::from_toml("[queue_defaults]\nmax_attempts = 0").unwrap_err().contains("max_attempts"));
    }

    /// `storage.flush_threads` takes 0 (one per core) and 2..=64, and
    /// refuses 1 and 65, naming the key; clones of a config share one pool.
    #[test]
    fn flush_threads_at_their_bounds() {
        for (threads, valid) in [(0, true), (1, false), (2, true), (64, true), (65, false)] {
            let result = Config::from_toml(&format!("[storage]\nflush_threads = {threads}\n"));
            match result {
                Ok(_) => assert!(valid, "{threads} must be refused"),
                Err(e) => {
                    assert!(!valid, "{threads} must be accepted: {e}");
                    assert!(e.contains("storage.flush_threads"), "{e}");
                }
            }
        }
        let config = Config::from_toml("[storage]\nflush_threads = 3\n").unwrap();
        let copy = config.clone();
        let pool = config.log_options(&config.queue_defaults).pool.expect("the broker's pool");
        assert_eq!(pool.threads(), 3);
        let again = copy.log_options(&copy.queue_defaults).pool.unwrap();
        assert!(pool.ptr_eq(&again), "one pool for every lane");
    }

    /// `storage.open_files_max` takes 16 and 1,048,576 and refuses 15 and
    /// 1,048,577, naming the key; the lanes' cache has that capacity.
    #[test]
    fn open_files_max_at_its_bounds() {
        use ballast_storage::limits::{OPEN_FILES_MAX, OPEN_FILES_MIN};
        for (files, valid) in
            [(OPEN_FILES_MIN, true), (OPEN_FILES_MIN - 1, false), (OPEN_FILES_MAX, true), (OPEN_FILES_MAX + 1, false)]
        {
            match Config::from_toml(&format!("[storage]\nopen_files_max = {files}\n")) {
                Ok(config) => {
                    assert!(valid, "{files} must be refused");
                    let cache = config.log_options(&config.queue_defaults).files.expect("the broker's cache");
                    assert_eq!(cache.capacity(), files);
                }
                Err(e) => {
                    assert!(!valid, "{files} must be accepted: {e}");
                    assert!(e.contains("storage.open_files_max"), "{e}");
                }
            }
        }
    }

    /// `[auth] file` is read from the file, and only then does the broker
    /// say that calls need credentials.
    #[test]
    fn auth_file_setting() {
        assert!(!Config::default().auth_configured());
        let config = Config::from_toml("[auth]\nfile = \"/etc/ballast/auth.toml\"\n").unwrap();
        assert_eq!(config.auth.file.as_deref(), Some(std::path::Path::new("/etc/ballast/auth.toml")));
        assert!(config.auth_configured());
        assert!(Config::from_toml("[auth]\nfiles = \"x\"\n").unwrap_err().contains("files"));
    }

    /// `queues_max` takes 1 and its ceiling and refuses 0 and one past it.
    #[test]
    fn queues_max_is_checked_at_its_bounds() {
        use crate::limits::QUEUES_MAX;
        assert_eq!(Config::default().queues_max, QUEUES_MAX_DEFAULT);
        assert_eq!(Config::from_toml(&format!("queues_max = {QUEUES_MAX}")).unwrap().queues_max, QUEUES_MAX);
        assert_eq!(Config::from_toml("queues_max = 1").unwrap().queues_max, 1);
        for value in [0, QUEUES_MAX + 1] {
            let error = Config::from_toml(&format!("queues_max = {value}")).unwrap_err();
            assert!(error.contains("queues_max must be in 1..="), "{value}: {error}");
        }
    }

    /// `queue_open_threads` takes 0 and its ceiling and refuses one past it.
    #[test]
    fn queue_open_threads_is_checked_at_its_bounds() {
        use crate::limits::QUEUE_OPEN_THREADS_MAX;
        assert_eq!(Config::default().queue_open_threads, QUEUE_OPEN_THREADS_DEFAULT);
        for value in [0, QUEUE_OPEN_THREADS_MAX] {
            let config = Config::from_toml(&format!("queue_open_threads = {value}")).unwrap();
            assert_eq!(config.queue_open_threads, value);
        }
        let error = Config::from_toml(&format!("queue_open_threads = {}", QUEUE_OPEN_THREADS_MAX + 1)).unwrap_err();
        assert!(error.contains("queue_open_threads must be in 0..="), "{error}");
    }

    /// The `[grpc]` settings take values at their bounds and refuse one
    /// past them, naming the key.
    #[test]
    fn grpc_settings_are_checked_at_their_bounds() {
        use crate::limits::{
            CONNECTIONS_MAX, KEEPALIVE_MS_MAX, KEEPALIVE_MS_MIN, REQUEST_TIMEOUT_MS_MAX, REQUEST_TIMEOUT_MS_MIN,
            WATCH_STREAMS_MAX,
        };
        let ok = format!(
            "[grpc]\nkeepalive_interval_ms = {KEEPALIVE_MS_MIN}\nkeepalive_timeout_ms = {KEEPALIVE_MS_MAX}\n\
             connections_max = {CONNECTIONS_MAX}\nwatch_streams_max = 1\nstreams_per_connection_max = 1\n\
             request_timeout_ms = {REQUEST_TIMEOUT_MS_MIN}\n"
        );
        let c = Config::from_toml(&ok).unwrap();
        assert_eq!(c.grpc.connections_max, CONNECTIONS_MAX);
        let longest = format!("[grpc]\nrequest_timeout_ms = {REQUEST_TIMEOUT_MS_MAX}");
        assert_eq!(Config::from_toml(&longest).unwrap().grpc.request_timeout_ms, REQUEST_TIMEOUT_MS_MAX);
        for (text, key) in [
            (format!("[grpc]\nkeepalive_interval_ms = {}", KEEPALIVE_MS_MIN - 1), "grpc.keepalive_interval_ms"),
            (format!("[grpc]\nkeepalive_timeout_ms = {}", KEEPALIVE_MS_MAX + 1), "grpc.keepalive_timeout_ms"),
            (format!("[grpc]\nconnections_max = {}", CONNECTIONS_MAX + 1), "grpc.connections_max"),
            ("[grpc]\nconnections_max = 0".to_owned(), "grpc.connections_max"),
            (format!("[grpc]\nwatch_streams_max = {}", WATCH_STREAMS_MAX + 1), "grpc.watch_streams_max"),
            ("[grpc]\nstreams_per_connection_max = 0".to_owned(), "grpc.streams_per_connection_max"),
            (format!("[grpc]\nrequest_timeout_ms = {}", REQUEST_TIMEOUT_MS_MIN - 1), "grpc.request_timeout_ms"),
            (format!("[grpc]\nrequest_timeout_ms = {}", REQUEST_TIMEOUT_MS_MAX + 1), "grpc.request_timeout_ms"),
        ] {
            let error = Config::from_toml(&text).unwrap_err();
            assert!(error.contains(key), "{text}: {error}");
        }
    }

    /// Loopback always starts; any other address needs TLS and auth, or
    /// `insecure`, and the refusal names what is missing.
    #[test]
    fn exposure_needs_tls_and_auth_or_insecure() {
        let loopback: SocketAddr = "127.0.0.1:7400".parse().unwrap();
        let loopback6: SocketAddr = "[::1]:7400".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7400".parse().unwrap();
        let lan: SocketAddr = "10.1.2.3:7400".parse().unwrap();
        assert_eq!(check_exposure(loopback, false, false, false), Ok(()));
        assert_eq!(check_exposure(loopback6, false, false, false), Ok(()));
        assert_eq!(check_exposure(any, true, true, false), Ok(()));
        assert_eq!(check_exposure(lan, false, false, true), Ok(()));
        for (tls, auth, missing) in
            [(false, false, "TLS and authentication"), (true, false, "authentication"), (false, true, "TLS")]
        {
            let error = check_exposure(any, tls, auth, false).unwrap_err();
            assert_eq!(error, ConfigError::Exposed { listen: any, missing });
            let text = error.to_string();
            assert!(text.contains("--insecure") && text.contains(missing) && text.contains("0.0.0.0:7400"), "{text}");
        }
    }

    /// `[tls]` keys come together, `metrics.tls` needs `[tls]`, and the
    /// file form parses.
    #[test]
    fn tls_keys_come_together() {
        let c = Config::from_toml("insecure = true\n[tls]\ncert = \"a.pem\"\nkey = \"a.key\"\nclient_ca = \"ca.pem\"\n[metrics]\ntls = true\n").unwrap();
        assert!(c.tls.enabled() && c.metrics.tls && c.insecure);
        assert_eq!(c.tls.client_ca.as_deref(), Some(std::path::Path::new("ca.pem")));
        assert!(!Config::default().tls.enabled());
        for (text, needle) in [
            ("[tls]\ncert = \"a.pem\"", "tls.cert needs tls.key"),
            ("[tls]\nkey = \"a.key\"", "tls.key needs tls.cert"),
            ("[tls]\nclient_ca = \"ca.pem\"", "tls.client_ca needs"),
            ("[metrics]\ntls = true", "metrics.tls needs"),
            ("[tls]\ncrt = \"a.pem\"", "crt"),
        ] {
            let error = Config::from_toml(text).and_then(|c| c.validate_tls()).unwrap_err();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }
}
