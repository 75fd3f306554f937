//! [`Error`]: everything that can go wrong in the client, typed by what the
//! caller would do about it.

use std::{error::Error as _, fmt, time::Duration};

use tonic::{Code, Status, metadata::MetadataMap};

use crate::contract;

/// The client's one error type: what happened, and (through
/// [`Error::is_retryable`] and [`Error::retry_after`]) whether sending the
/// same request again can help.
///
/// Broker answers map by gRPC code; failures to reach the broker at all, or a
/// connection lost mid-call, are [`Error::Transport`]. The producer already
/// retries the retryable kinds within its deadline, so an error it returns
/// means the retries ran out, the deadline passed, or retrying cannot help.
///
/// ```
/// use ballast_client::Error;
///
/// let refused = Error::ResourceExhausted {
///     message: "queue payments is 95% full; lane low is refused above 70%".into(),
///     retry_after: Some(std::time::Duration::from_millis(250)),
///     refusal: None,
/// };
/// assert!(refused.is_retryable());
/// assert_eq!(refused.retry_after(), Some(std::time::Duration::from_millis(250)));
///
/// let missing = Error::NotFound { message: "queue payments does not exist".into() };
/// assert!(!missing.is_retryable());
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request is malformed: a bad queue name, lane, header, key, delay
    /// or an oversize payload. Checked locally where the client can, by the
    /// broker otherwise (`INVALID_ARGUMENT`). Fix the request; never retried.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// What is wrong, naming the limit that was hit.
        message: String,
    },

    /// The queue does not exist (`NOT_FOUND`).
    #[error("not found: {message}")]
    NotFound {
        /// The broker's explanation.
        message: String,
    },

    /// The queue already exists with other settings (`ALREADY_EXISTS`).
    #[error("already exists: {message}")]
    AlreadyExists {
        /// The broker's explanation.
        message: String,
    },

    /// The broker refused the work because a limit was hit: the queue is too
    /// full for the lane, or the disk is nearly full (`RESOURCE_EXHAUSTED`).
    /// Slow down; retry no sooner than `retry_after`. Nothing was stored.
    #[error("refused by the broker: {message}{}", RetryAfter(*retry_after))]
    ResourceExhausted {
        /// The broker's explanation.
        message: String,
        /// The broker's hint (`retry-after-ms` metadata), if it sent one.
        retry_after: Option<Duration>,
        /// The figures behind the refusal, when the broker sent any (an
        /// admission refusal always does; see [`Refusal`]).
        refusal: Option<Box<Refusal>>,
    },

    /// The broker answered that it cannot serve now, typically while it
    /// shuts down (`UNAVAILABLE`). Retryable.
    #[error("broker unavailable: {message}")]
    Unavailable {
        /// The broker's explanation.
        message: String,
    },

    /// A cluster node that is not the leader was asked to change or deliver
    /// from a replicated queue (`UNAVAILABLE`, `ballast-reason:
    /// not_leader`; `docs/replication.md`). The [`Client`](crate::Client)
    /// sends the next calls to `leader` by itself. Retryable; not a
    /// failure for the circuit breaker (the broker answered).
    #[error("not the cluster's leader: {message}")]
    NotLeader {
        /// The broker's explanation.
        message: String,
        /// The leader's `host:port`, if the node knew one (none during an
        /// election).
        leader: Option<String>,
        /// The broker's `retry-after-ms`.
        retry_after: Option<Duration>,
    },

    /// The broker could not be reached, or the connection was lost before
    /// the answer arrived. The request may or may not have been applied; a
    /// publish is safe to retry because it carries its idempotency key.
    #[error("transport failure: {message}")]
    Transport {
        /// What the connection reported.
        message: String,
    },

    /// The call did not finish within its deadline. Like a transport failure
    /// the outcome is unknown; a publish retried with the same idempotency
    /// key is stored at most once.
    #[error("deadline exceeded{}{}", After(*timeout), LastError(last_error.as_deref()))]
    DeadlineExceeded {
        /// The time budget that ran out; `None` when the broker reported
        /// that a deadline passed on its side.
        timeout: Option<Duration>,
        /// The last failure seen before the deadline, if any attempt failed.
        last_error: Option<Box<Error>>,
    },

    /// The broker aborted the call, for example on a conflict with a
    /// concurrent operation (`ABORTED`). Retryable.
    #[error("aborted by the broker: {message}")]
    Aborted {
        /// The broker's explanation.
        message: String,
    },

    /// The operation does not apply to the current state, for example an
    /// ack of an expired delivery (`FAILED_PRECONDITION`).
    #[error("failed precondition: {message}")]
    FailedPrecondition {
        /// The broker's explanation.
        message: String,
    },

    /// The caller's principal may not do this action on this queue
    /// (`PERMISSION_DENIED`); the message names both. Never retried.
    #[error("permission denied: {message}")]
    PermissionDenied {
        /// The broker's explanation.
        message: String,
    },

    /// The broker did not accept the call's credentials
    /// (`UNAUTHENTICATED`): none were sent, the token is malformed or
    /// unknown, or the client certificate is not mapped to a principal.
    /// Fix [`ClientConfig::token`](crate::ClientConfig::token); never retried.
    #[error("unauthenticated (check the token or client certificate): {message}")]
    Unauthenticated {
        /// The broker's explanation (which of the above).
        message: String,
    },

    /// The circuit breaker for this queue is open after repeated failures:
    /// the call failed fast without reaching the broker. Retry after
    /// `retry_in`, when the breaker lets a probe through.
    #[error("circuit breaker open after repeated failures; next probe in {}ms", retry_in.as_millis())]
    CircuitOpen {
        /// Time until the breaker lets a probe call through.
        retry_in: Duration,
    },

    /// The broker failed in a way retrying will not fix: an internal error,
    /// an unimplemented method (an older broker), data loss, or another code.
    #[error("broker error ({code:?}): {message}")]
    Broker {
        /// The gRPC status code.
        code: Code,
        /// The broker's explanation.
        message: String,
    },

    /// The broker's answer broke the protocol (a missing field, a wrong
    /// number of receipts, an unexpected message on the consume stream).
    #[error("protocol violation: {message}")]
    Protocol {
        /// What was wrong with the answer.
        message: String,
    },

    /// The broker address could not be parsed as a URI.
    #[error("invalid broker address {addr:?}: {message}")]
    InvalidAddress {
        /// The address as given.
        addr: String,
        /// Why it is invalid.
        message: String,
    },

    /// TLS failed: the broker's certificate is not signed by the given CA,
    /// the broker wants a client certificate, one side speaks TLS and the
    /// other does not, or a TLS file cannot be read. The message says which
    /// and what to change; retrying cannot help.
    #[error("TLS failed: {message}")]
    Tls {
        /// What failed and what to change.
        message: String,
    },

    /// The producer was closed (or its background task ended) before the
    /// call was answered.
    #[error("the producer is closed")]
    Closed,
}

impl Error {
    /// Whether sending the same request again may succeed: the broker was
    /// unreachable, busy, refusing for now, or the deadline passed. False for
    /// requests the broker judged wrong (bad argument, unknown queue, ...).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::ResourceExhausted { .. }
            | Error::Unavailable { .. }
            | Error::NotLeader { .. }
            | Error::Transport { .. }
            | Error::DeadlineExceeded { .. }
            | Error::Aborted { .. }
            | Error::CircuitOpen { .. } => true,
            Error::InvalidArgument { .. }
            | Error::NotFound { .. }
            | Error::AlreadyExists { .. }
            | Error::FailedPrecondition { .. }
            | Error::PermissionDenied { .. }
            | Error::Unauthenticated { .. }
            | Error::Broker { .. }
            | Error::Protocol { .. }
            | Error::InvalidAddress { .. }
            | Error::Tls { .. }
            | Error::Closed => false,
        }
    }

    /// The least time to wait before a retry, when the failure says: the
    /// broker's retry-after hint on a refusal, or the time until an open
    /// circuit breaker lets a probe through.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::ResourceExhausted { retry_after, .. } | Error::NotLeader { retry_after, .. } => *retry_after,
            Error::CircuitOpen { retry_in } => Some(*retry_in),
            _ => None,
        }
    }

    /// The figures behind an admission refusal: which lane was refused, how
    /// full the queue was and the lane's threshold, or the free disk space.
    ///
    /// ```
    /// # fn example(error: &ballast_client::Error) {
    /// if let Some(refusal) = error.refusal() {
    ///     if refusal.is_disk_low() {
    ///         eprintln!("the broker's disk is nearly full");
    ///     } else if let (Some(lane), Some(saturation)) = (&refusal.lane, refusal.saturation) {
    ///         eprintln!("lane {lane} refused: the queue is {:.0}% full", saturation * 100.0);
    ///     }
    /// }
    /// # }
    /// ```
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            Error::ResourceExhausted { refusal, .. } => refusal.as_deref(),
            _ => None,
        }
    }

    /// The gRPC status code this error corresponds to, if it came from (or
    /// stands for) a gRPC status.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::InvalidArgument { .. } => Some(Code::InvalidArgument),
            Error::NotFound { .. } => Some(Code::NotFound),
            Error::AlreadyExists { .. } => Some(Code::AlreadyExists),
            Error::ResourceExhausted { .. } => Some(Code::ResourceExhausted),
            Error::Unavailable { .. } | Error::NotLeader { .. } | Error::Transport { .. } => Some(Code::Unavailable),
            Error::DeadlineExceeded { .. } => Some(Code::DeadlineExceeded),
            Error::Aborted { .. } => Some(Code::Aborted),
            Error::FailedPrecondition { .. } => Some(Code::FailedPrecondition),
            Error::PermissionDenied { .. } => Some(Code::PermissionDenied),
            Error::Unauthenticated { .. } => Some(Code::Unauthenticated),
            Error::Broker { code, .. } => Some(*code),
            Error::CircuitOpen { .. }
            | Error::Protocol { .. }
            | Error::InvalidAddress { .. }
            | Error::Tls { .. }
            | Error::Closed => None,
        }
    }

    /// A failure of the local transport: [`Error::Tls`] when its causes
    /// say TLS failed, [`Error::Transport`] otherwise.
    pub(crate) fn transport(message: &str, source: &(dyn std::error::Error + 'static)) -> Error {
        let message = transport_message(message, source);
        match crate::tls::advice(&crate::client::error_chain(source)) {
            Some(advice) => Error::Tls { message: advice },
            None => Error::Transport { message },
        }
    }

    /// Maps a gRPC status to an error.
    ///
    /// A status that carries a source error was made by the local transport
    /// (connect refused, connection reset, h2 failure), not sent by the
    /// broker: it becomes [`Error::Transport`] whatever its code, because the
    /// broker never judged the request. A status the broker sent has no
    /// source and maps by code.
    pub fn from_status(status: Status) -> Error {
        let message = status.message().to_owned();
        if let Some(source) = status.source() {
            return Error::transport(&message, source);
        }
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument { message },
            Code::NotFound => Error::NotFound { message },
            Code::AlreadyExists => Error::AlreadyExists { message },
            Code::ResourceExhausted => Error::ResourceExhausted {
                retry_after: retry_after(&status),
                refusal: Refusal::from_metadata(status.metadata()).map(Box::new),
                message,
            },
            Code::Unavailable
                if status.metadata().get(contract::REASON_METADATA).and_then(|v| v.to_str().ok())
                    == Some(contract::REASON_NOT_LEADER) =>
            {
                let leader = status.metadata().get(contract::LEADER_METADATA).and_then(|v| v.to_str().ok());
                Error::NotLeader { leader: leader.map(str::to_owned), retry_after: retry_after(&status), message }
            }
            Code::Unavailable => Error::Unavailable { message },
            Code::DeadlineExceeded => Error::DeadlineExceeded {
                timeout: None,
                last_error: Some(Box::new(Error::Broker { code: Code::DeadlineExceeded, message })),
            },
            Code::Aborted => Error::Aborted { message },
            Code::FailedPrecondition => Error::FailedPrecondition { message },
            Code::PermissionDenied => Error::PermissionDenied { message },
            Code::Unauthenticated => Error::Unauthenticated { message },
            code @ (Code::Ok
            | Code::Cancelled
            | Code::Unknown
            | Code::Unimplemented
            | Code::Internal
            | Code::DataLoss) => Error::Broker { code, message },
        }
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Error {
        Error::from_status(status)
    }
}

/// The figures the broker attaches to an admission refusal
/// ([`Error::ResourceExhausted`]), parsed from the status metadata (see
/// [`contract`] rule 2). Each is `None` when the broker did not send it or
/// sent something unreadable.
///
/// `depth`, `bytes` and `saturation` are the *queue's* figures (all lanes
/// together) when it refused: admission compares them with the refused
/// lane's `threshold`. A refusal for a nearly full disk also carries
/// `disk_free_bytes`.
///
/// ```
/// use ballast_client::Refusal;
///
/// let mut refusal = Refusal::default();
/// refusal.lane = Some("low".into());
/// refusal.saturation = Some(0.7);
/// refusal.threshold = Some(0.7);
/// assert!(!refusal.is_disk_low());
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Refusal {
    /// Name of the refused lane (`ballast-lane`, or `ballast-lane-bin` for
    /// a name that is not printable ASCII).
    pub lane: Option<String>,
    /// Index of the refused lane (`ballast-lane-index`).
    pub lane_index: Option<u32>,
    /// Messages in the queue not yet acked (`ballast-depth`).
    pub depth: Option<u64>,
    /// Stored bytes of the queue's records not yet acked (`ballast-bytes`).
    pub bytes: Option<u64>,
    /// The queue's saturation, 0..1 (`ballast-saturation`).
    pub saturation: Option<f64>,
    /// The refused lane's admission threshold, 0..1 (`ballast-threshold`).
    pub threshold: Option<f64>,
    /// Free bytes on the broker's disk, sent when the disk is nearly full
    /// (`ballast-disk-free-bytes`).
    pub disk_free_bytes: Option<u64>,
    /// Why: `queue_full`, `disk_low` or `publish_rate` (`ballast-reason`).
    pub reason: Option<String>,
}

impl Refusal {
    /// Whether the broker refused because the queue's publish quota
    /// (`max_publish_rate`, `max_publish_byte_rate`) is taken: the call's
    /// turn was too far away. Slowing down helps; a higher lane helps while
    /// the lanes above the refused one leave part of the quota unused (a
    /// call waits only behind its own and higher lanes' traffic).
    pub fn is_rate_limited(&self) -> bool {
        self.reason.as_deref() == Some(contract::REASON_PUBLISH_RATE)
    }

    /// Whether the broker refused because its disk is nearly full (rather
    /// than because the queue is too full for the lane). Publishing to a
    /// higher lane does not help then.
    pub fn is_disk_low(&self) -> bool {
        self.disk_free_bytes.is_some()
    }

    /// The figures in `metadata`; `None` when it holds none of them.
    fn from_metadata(metadata: &MetadataMap) -> Option<Refusal> {
        let text = |key: &str| Some(metadata.get(key)?.to_str().ok()?.trim().to_owned());
        let number = |key: &str| text(key)?.parse::<u64>().ok();
        let fraction = |key: &str| text(key)?.parse::<f64>().ok().filter(|value| value.is_finite());
        let lane_bin = || {
            let value = metadata.get_bin(contract::LANE_BIN_METADATA)?.to_bytes().ok()?;
            String::from_utf8(value.to_vec()).ok()
        };
        let refusal = Refusal {
            lane: text(contract::LANE_METADATA).or_else(lane_bin),
            lane_index: text(contract::LANE_INDEX_METADATA).and_then(|index| index.parse().ok()),
            depth: number(contract::DEPTH_METADATA),
            bytes: number(contract::BYTES_METADATA),
            saturation: fraction(contract::SATURATION_METADATA),
            threshold: fraction(contract::THRESHOLD_METADATA),
            disk_free_bytes: number(contract::DISK_FREE_BYTES_METADATA),
            reason: text(contract::REASON_METADATA),
        };
        (refusal != Refusal::default()).then_some(refusal)
    }
}

/// Reads the broker's `retry-after-ms` hint off a status. A missing or
/// unparsable value is no hint.
fn retry_after(status: &Status) -> Option<Duration> {
    let value = status.metadata().get(contract::RETRY_AFTER_METADATA)?;
    let ms: u64 = value.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_millis(ms))
}

/// The status message plus the innermost cause, which names what actually
/// failed ("Connection refused").
fn transport_message(message: &str, source: &(dyn std::error::Error + 'static)) -> String {
    let mut root = source;
    while let Some(next) = root.source() {
        root = next;
    }
    let root = root.to_string();
    if message.is_empty() || message.contains(&root) {
        format!("{message}{root}")
    } else {
        format!("{message}: {root}")
    }
}

/// Renders an optional retry-after hint inside an error message.
struct RetryAfter(Option<Duration>);

impl fmt::Display for RetryAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(after) => write!(f, " (retry after {}ms)", after.as_millis()),
            None => Ok(()),
        }
    }
}

/// Renders an optional time budget inside an error message.
struct After(Option<Duration>);

impl fmt::Display for After {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(after) => write!(f, " after {}ms", after.as_millis()),
            None => Ok(()),
        }
    }
}

/// Renders an optional last error inside an error message.
struct LastError<'a>(Option<&'a Error>);

impl fmt::Display for LastError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(error) => write!(f, "; last error: {error}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;

    use super::*;

    /// A refusal carries the broker's retry-after hint, parsed from metadata.
    #[test]
    fn resource_exhausted_reads_retry_after() {
        let mut status = Status::resource_exhausted("queue full");
        status.metadata_mut().insert(contract::RETRY_AFTER_METADATA, MetadataValue::from_static("1500"));
        let error = Error::from_status(status);
        assert!(error.is_retryable());
        assert_eq!(error.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(error.to_string(), "refused by the broker: queue full (retry after 1500ms)");

        assert_eq!(error.refusal(), None, "no figures sent, none invented");

        let mut garbled = Status::resource_exhausted("queue full");
        garbled.metadata_mut().insert(contract::RETRY_AFTER_METADATA, MetadataValue::from_static("soon"));
        assert_eq!(Error::from_status(garbled).retry_after(), None);
    }

    /// An admission refusal's figures are parsed from the broker's metadata;
    /// unreadable values are dropped one by one, not the whole refusal.
    #[test]
    fn resource_exhausted_reads_figures() {
        let mut status = Status::resource_exhausted("queue emails is 70% full");
        let metadata = status.metadata_mut();
        for (key, value) in [
            (contract::RETRY_AFTER_METADATA, "1000"),
            (contract::LANE_METADATA, "low"),
            (contract::DEPTH_METADATA, "35"),
            (contract::BYTES_METADATA, "4096"),
            (contract::SATURATION_METADATA, "0.7000"),
            (contract::THRESHOLD_METADATA, "0.7000"),
            (contract::REASON_METADATA, "queue_full"),
        ] {
            metadata.insert(key, MetadataValue::from_static(value));
        }
        let error = Error::from_status(status);
        let refusal = error.refusal().expect("figures");
        assert_eq!(refusal.lane.as_deref(), Some("low"));
        assert_eq!((refusal.depth, refusal.bytes), (Some(35), Some(4096)));
        assert_eq!((refusal.saturation, refusal.threshold), (Some(0.7), Some(0.7)));
        assert!(!refusal.is_disk_low());
        assert!(!refusal.is_rate_limited());
        assert_eq!(refusal.reason.as_deref(), Some("queue_full"));
        assert_eq!(error.retry_after(), Some(Duration::from_millis(1000)));

        let mut quota = Status::resource_exhausted("queue q's publish quota is taken");
        quota.metadata_mut().insert(contract::REASON_METADATA, MetadataValue::from_static("publish_rate"));
        let error = Error::from_status(quota);
        let refusal = error.refusal().expect("a reason is a figure");
        assert!(refusal.is_rate_limited() && !refusal.is_disk_low());

        let mut disk = Status::resource_exhausted("disk nearly full");
        disk.metadata_mut().insert(contract::DISK_FREE_BYTES_METADATA, MetadataValue::from_static("1024"));
        disk.metadata_mut().insert(contract::SATURATION_METADATA, MetadataValue::from_static("NaN"));
        disk.metadata_mut().insert(contract::DEPTH_METADATA, MetadataValue::from_static("-1"));
        let error = Error::from_status(disk);
        let refusal = error.refusal().expect("figures");
        assert!(refusal.is_disk_low());
        assert_eq!(refusal.disk_free_bytes, Some(1024));
        assert_eq!((refusal.saturation, refusal.depth), (None, None), "unreadable values are dropped");
        assert_eq!(Error::NotFound { message: String::new() }.refusal(), None);
    }

    /// A lane name that is not printable ASCII comes only as UTF-8 in the
    /// binary entry; the index always comes as text.
    #[test]
    fn resource_exhausted_reads_a_non_ascii_lane() {
        let mut status = Status::resource_exhausted("queue full");
        let metadata = status.metadata_mut();
        metadata.insert(contract::LANE_INDEX_METADATA, MetadataValue::from_static("2"));
        metadata.insert_bin(contract::LANE_BIN_METADATA, MetadataValue::from_bytes("niedrig-ü".as_bytes()));
        let error = Error::from_status(status);
        let refusal = error.refusal().expect("figures");
        assert_eq!(refusal.lane.as_deref(), Some("niedrig-ü"));
        assert_eq!(refusal.lane_index, Some(2));

        let mut both = Status::resource_exhausted("queue full");
        both.metadata_mut().insert(contract::LANE_METADATA, MetadataValue::from_static("low"));
        both.metadata_mut().insert_bin(contract::LANE_BIN_METADATA, MetadataValue::from_bytes(b"other"));
        let refusal = Error::from_status(both).refusal().cloned().expect("figures");
        assert_eq!(refusal.lane.as_deref(), Some("low"), "the text entry wins when both are sent");
        assert_eq!(refusal.lane_index, None);
    }

    /// Broker answers map by code; the contract's non-retryable codes stay so.
    #[test]
    fn codes_map_to_variants() {
        let cases = [
            (Status::invalid_argument("bad"), false),
            (Status::not_found("gone"), false),
            (Status::already_exists("dup"), false),
            (Status::failed_precondition("lease"), false),
            (Status::permission_denied("no"), false),
            (Status::internal("disk"), false),
            (Status::unavailable("draining"), true),
            (Status::deadline_exceeded("slow"), true),
            (Status::aborted("conflict"), true),
        ];
        for (status, retryable) in cases {
            let code = status.code();
            let error = Error::from_status(status);
            assert_eq!(error.is_retryable(), retryable, "{code:?} -> {error:?}");
            assert_eq!(error.code(), Some(code), "{error:?}");
        }
    }

    /// A status made locally from a transport failure is a retryable
    /// Transport error even when its code alone would not be retryable.
    #[test]
    fn local_transport_failure_is_retryable() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer");
        let status = Status::from_error(Box::new(io));
        let error = Error::from_status(status);
        assert!(matches!(error, Error::Transport { .. }), "{error:?}");
        assert!(error.is_retryable());
        assert!(error.to_string().contains("connection reset by peer"), "{error}");
    }
}
