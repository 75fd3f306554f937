//! Broker errors. Every variant maps to one gRPC status in
//! `grpc/status.rs`, with a message a person can act on.

use ballast_storage::{AckError, AppendError, OpenError, SyncError};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("queue {0:?} not found")]
    QueueNotFound(String),
    #[error("invalid queue name {name:?}: {reason}")]
    InvalidQueueName { name: String, reason: &'static str },
    #[error("invalid setting {key}: {message}")]
    InvalidSetting { key: &'static str, message: String },
    #[error("queue {name:?} already exists with other settings: {difference}")]
    QueueExists { name: String, difference: String },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{what} limit reached ({max}); {hint}")]
    LimitReached { what: &'static str, max: usize, hint: &'static str },
    #[error("delivery {delivery_id} is not leased (unknown, already acked, or its lease expired)")]
    UnknownDelivery { delivery_id: u64 },
    #[error("the broker is shutting down; retry against the restarted broker")]
    ShuttingDown,
    /// A call on a replicated queue reached a node that is not the
    /// cluster's leader. `leader`: the leader's gRPC address, if known
    /// (none during an election).
    #[error("{}", match leader {
        Some(leader) => format!("queue {queue} is replicated and this node is not the cluster's leader; call the leader at {leader} (metadata ballast-leader)"),
        None => format!("queue {queue} is replicated and the cluster has no leader now (an election); retry shortly"),
    })]
    NotLeader { queue: String, leader: Option<String> },
    /// The cluster log could not take a command (the leader lost its
    /// majority meanwhile, or Raft stopped); nothing was acknowledged.
    #[error("the cluster log did not commit the write: {0}; retry (the leader may have changed)")]
    Cluster(String),
    /// A real ENOSPC from the disk (not the watermark, which is a
    /// `Refused`): nothing of the call was stored. The path is in the
    /// broker's log, not here: clients never see paths.
    #[error(
        "the broker's disk is full (ENOSPC) while {during}; nothing was stored. Free space on the broker's data volume, then retry (after {} ms at the earliest)",
        crate::limits::DISK_FULL_RETRY_AFTER_MS
    )]
    DiskFull { during: &'static str },
    /// A queue's log failed a write or sync (it is poisoned) and is being
    /// reopened; `detail` (with paths) goes to the broker's log only.
    #[error(
        "the queue's storage failed a write or sync and is being recovered: this call was not acknowledged, retry it (after {} ms at the earliest; with idempotency keys a retry never stores twice)",
        crate::limits::STORAGE_RECOVERY_RETRY_AFTER_MS
    )]
    StorageRecovering { detail: String },
    /// The process ran out of file descriptors (EMFILE or ENFILE); the
    /// path is in the broker's log.
    #[error(
        "the broker has no file descriptors left (too many open files) while {during}. Raise the broker's open-files limit (RLIMIT_NOFILE: systemd LimitNOFILE, ulimit -n) or delete unused queues, then retry"
    )]
    FileDescriptorsExhausted { during: &'static str },
    /// The queue's files could not be opened at start, so the broker set
    /// it aside (the detail, with paths, is in its log under the id).
    #[error(
        "queue {name:?} is damaged: its files could not be opened when the broker started (error id {error_id}; the broker log has the detail), so it is set aside and serves nothing. Delete it with DeleteQueue (its messages are lost), or stop the broker, repair or restore its files and restart"
    )]
    QueueDamaged { name: String, error_id: String },
    #[error("{0}")]
    Refused(Box<Refusal>),
    /// An I/O or format failure with its detail (paths included), which
    /// goes to the broker's log under an error id; the client gets only
    /// the id (`grpc/status.rs`).
    #[error("storage failure: {0}")]
    Storage(String),
    /// Another broker holds the data directory's lock (only at open).
    #[error(
        "data directory {} is in use by another broker ({holder}); stop it, or give this one another --data-dir. Nothing was changed",
        dir.display()
    )]
    DataDirInUse { dir: std::path::PathBuf, holder: String },
}

/// A publish refused by admission: why, and the figures behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub queue: String,
    /// The refused lane's name (any UTF-8) and index.
    pub lane: String,
    pub lane_index: u32,
    /// The queue's figures when it refused.
    pub figures: crate::queue::Figures,
    /// The lane's admission fraction.
    pub threshold: f64,
    /// A hint: retrying sooner is likely to be refused again.
    pub retry_after_ms: u64,
    pub reason: RefusalReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// With the batch, the queue would exceed the lane's share of a limit.
    QueueFull {
        max_messages: u64,
        max_bytes: u64,
        /// The refused batch: messages to store and their stored bytes.
        batch_messages: u64,
        batch_bytes: u64,
        /// The lane's share of the limits (`max_* x` its admission fraction).
        lane_max_messages: u64,
        lane_max_bytes: u64,
        /// By how much the queue plus the batch would exceed each share
        /// (0: within it). At least one is above 0.
        excess_messages: u64,
        excess_bytes: u64,
    },
    DiskLow {
        free: u64,
        min: u64,
    },
    /// The call's turn under the queue's publish quota is further away than
    /// the lane may wait.
    PublishRate {
        /// The quota (0: that dimension is free).
        max_publish_rate: u64,
        max_publish_byte_rate: u64,
        batch_messages: u64,
        batch_bytes: u64,
        /// How far away the call's turn was, and how long the lane may wait
        /// (the call was refused after waiting that long).
        wait_ms: u64,
        max_wait_ms: u64,
    },
}

impl RefusalReason {
    /// The reason's name in metrics and in the `ballast-reason` metadata.
    pub fn name(&self) -> &'static str {
        match self {
            RefusalReason::QueueFull { .. } => "queue_full",
            RefusalReason::DiskLow { .. } => "disk_low",
            RefusalReason::PublishRate { .. } => "publish_rate",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.reason {
            RefusalReason::QueueFull {
                max_messages,
                max_bytes,
                batch_messages,
                batch_bytes,
                lane_max_messages,
                lane_max_bytes,
                excess_messages,
                excess_bytes,
            } => {
                let plural = if batch_messages == 1 { "" } else { "s" };
                write!(
                    f,
                    "queue {} refused a batch of {batch_messages} message{plural} ({batch_bytes} bytes) on lane {}: with it the queue would exceed the lane's {:.0}% share of ",
                    self.queue,
                    self.lane,
                    self.threshold * 100.0
                )?;
                if excess_messages > 0 {
                    write!(f, "max_messages ({lane_max_messages} of {max_messages}) by {excess_messages} messages")?;
                }
                if excess_messages > 0 && excess_bytes > 0 {
                    write!(f, " and ")?;
                }
                if excess_bytes > 0 {
                    write!(f, "max_bytes ({lane_max_bytes} of {max_bytes}) by {excess_bytes} bytes")?;
                }
                write!(
                    f,
                    "; it holds {} messages, {} bytes ({:.0}% full)",
                    self.figures.depth,
                    self.figures.bytes,
                    self.figures.saturation * 100.0
                )?;
                write!(f, ". Retry after {} ms, or publish to a higher lane", self.retry_after_ms)
            }
            RefusalReason::PublishRate {
                max_publish_rate,
                max_publish_byte_rate,
                batch_messages,
                batch_bytes,
                wait_ms,
                max_wait_ms,
            } => {
                let plural = if batch_messages == 1 { "" } else { "s" };
                write!(f, "queue {}'s publish quota (", self.queue)?;
                if max_publish_rate > 0 {
                    write!(f, "max_publish_rate {max_publish_rate} messages/s")?;
                }
                if max_publish_rate > 0 && max_publish_byte_rate > 0 {
                    write!(f, ", ")?;
                }
                if max_publish_byte_rate > 0 {
                    write!(f, "max_publish_byte_rate {max_publish_byte_rate} bytes/s")?;
                }
                write!(
                    f,
                    ", shared by all its producers) is taken: this call of {batch_messages} message{plural} ({batch_bytes} bytes) on lane {} would have waited {wait_ms} ms for its turn; the lane waits at most {max_wait_ms} ms. Retry after {} ms, or slow the producers down",
                    self.lane, self.retry_after_ms
                )
            }
            RefusalReason::DiskLow { free, min } => write!(
                f,
                "the broker's disk has {free} bytes free, below its floor of {min} (disk_free_min_bytes): publishes are refused until space returns; consumers and acks go on"
            ),
        }
    }
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

impl BrokerError {
    /// An I/O error on `path`: `DiskFull` for ENOSPC and
    /// `FileDescriptorsExhausted` for EMFILE/ENFILE (the path logged here),
    /// `Storage` with the path otherwise.
    pub fn io(during: &'static str, path: &std::path::Path, e: &std::io::Error) -> BrokerError {
        match e.raw_os_error() {
            Some(libc::ENOSPC) => {
                tracing::warn!(path = %path.display(), "disk full while {during}");
                BrokerError::DiskFull { during }
            }
            Some(libc::EMFILE | libc::ENFILE) => {
                tracing::warn!(path = %path.display(), "out of file descriptors while {during}");
                BrokerError::FileDescriptorsExhausted { during }
            }
            _ => BrokerError::Storage(format!("{during}: {}: {e}", path.display())),
        }
    }
}

impl From<AppendError> for BrokerError {
    fn from(e: AppendError) -> BrokerError {
        match e {
            AppendError::BatchEmpty
            | AppendError::KeyEmpty { .. }
            | AppendError::BatchTooLarge { .. }
            | AppendError::RecordTooLarge { .. }
            | AppendError::KeyTooLarge { .. }
            | AppendError::TooManyHeaders { .. }
            | AppendError::HeadersTooLarge { .. } => BrokerError::InvalidArgument(e.to_string()),
            AppendError::DiskFull { path } => {
                tracing::warn!(path = %path.display(), "disk full creating a segment; the append was refused whole");
                BrokerError::DiskFull { during: "appending" }
            }
            AppendError::Io { .. } => BrokerError::Storage(e.to_string()),
            AppendError::Poisoned(_) => BrokerError::StorageRecovering { detail: e.to_string() },
        }
    }
}

/// A commit that failed: the log is poisoned (a failed sync or write).
impl From<SyncError> for BrokerError {
    fn from(e: SyncError) -> BrokerError {
        BrokerError::StorageRecovering { detail: e.to_string() }
    }
}

impl From<AckError> for BrokerError {
    fn from(e: AckError) -> BrokerError {
        match e {
            AckError::Poisoned(_) => BrokerError::StorageRecovering { detail: e.to_string() },
            AckError::OutOfRange { .. } => BrokerError::Storage(e.to_string()),
        }
    }
}

impl From<OpenError> for BrokerError {
    fn from(e: OpenError) -> BrokerError {
        match &e {
            OpenError::Io { path, source } => BrokerError::io("opening the queue's files", path, source),
            _ => BrokerError::Storage(e.to_string()),
        }
    }
}
