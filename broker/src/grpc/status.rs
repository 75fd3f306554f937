//! `BrokerError` to gRPC status: exhaustive, so a new error must be mapped.

use tonic::{Code, Status};

use tonic::metadata::{MetadataMap, MetadataValue};

use crate::error::{BrokerError, Refusal, RefusalReason};

/// Metadata key of the retry-after hint on RESOURCE_EXHAUSTED, in ms.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";
/// Metadata key of the refused lane's name, sent only when the name is
/// printable ASCII (an ASCII metadata value cannot carry anything else).
pub const LANE: &str = "ballast-lane";
/// Binary metadata key of the refused lane's name as UTF-8 bytes (base64 on
/// the wire, as gRPC does for every `-bin` key): always sent.
pub const LANE_BIN: &str = "ballast-lane-bin";
/// Metadata key of the refused lane's index (decimal): always sent.
pub const LANE_INDEX: &str = "ballast-lane-index";
/// Metadata key of the refusal's reason: `queue_full`, `disk_low` or
/// `publish_rate` (the names of `ballast_refused_publishes_total`'s
/// `reason` label): always sent.
pub const REASON: &str = "ballast-reason";
/// Metadata key naming the cluster leader's gRPC address on an
/// UNAVAILABLE from a follower (`docs/replication.md`).
pub const LEADER: &str = "ballast-leader";

/// RESOURCE_EXHAUSTED with the hint and the figures in metadata (see
/// `docs/metrics.md`, "Admission").
fn refused(refusal: &Refusal) -> Status {
    let mut metadata = MetadataMap::new();
    let mut put = |key: &'static str, value: String| {
        if let Ok(value) = MetadataValue::try_from(value) {
            metadata.insert(key, value);
        }
    };
    put(RETRY_AFTER_MS, refusal.retry_after_ms.to_string());
    put(REASON, refusal.reason.name().to_owned());
    // Raw UTF-8 would pass here as opaque header bytes that clients cannot
    // read as text, so only a printable ASCII name goes in `ballast-lane`;
    // the index and the binary entry below always carry the lane.
    if refusal.lane.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        put(LANE, refusal.lane.clone());
    }
    put(LANE_INDEX, refusal.lane_index.to_string());
    put("ballast-depth", refusal.figures.depth.to_string());
    put("ballast-bytes", refusal.figures.bytes.to_string());
    put("ballast-saturation", format!("{:.4}", refusal.figures.saturation));
    put("ballast-threshold", format!("{:.4}", refusal.threshold));
    if let RefusalReason::DiskLow { free, .. } = refusal.reason {
        put("ballast-disk-free-bytes", free.to_string());
    }
    metadata.insert_bin(LANE_BIN, MetadataValue::from_bytes(refusal.lane.as_bytes()));
    Status::with_metadata(Code::ResourceExhausted, refusal.to_string(), metadata)
}

/// Value of [`REASON`] on a publish refused by a real ENOSPC (not the
/// watermark, which is `disk_low`).
pub const REASON_DISK_FULL: &str = "disk_full";

/// A fresh id for one storage failure, quoted to the client and logged with
/// the detail: the client sees no path, the operator finds the line.
/// Unique within the process and unlikely to repeat across restarts.
pub fn error_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:x}-{n}", crate::now_ms())
}

/// A status whose message and metadata carry a retry-after hint (and a
/// reason, when there is one).
fn with_retry_after(code: Code, message: String, retry_after_ms: u64, reason: Option<&'static str>) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert(RETRY_AFTER_MS, MetadataValue::from(retry_after_ms));
    if let Some(reason) = reason {
        metadata.insert(REASON, MetadataValue::from_static(reason));
    }
    Status::with_metadata(code, message, metadata)
}

/// The status a client sees for `error`. Storage failures are logged here
/// with their detail under an error id; the client gets the id, never the
/// detail (which holds paths).
pub fn to_status(error: BrokerError) -> Status {
    let status = status_of(error);
    crate::metrics::count_error(status.code());
    status
}

fn status_of(error: BrokerError) -> Status {
    let code = match &error {
        BrokerError::QueueNotFound(_) => Code::NotFound,
        BrokerError::InvalidQueueName { .. } | BrokerError::InvalidSetting { .. } | BrokerError::InvalidArgument(_) => {
            Code::InvalidArgument
        }
        BrokerError::QueueExists { .. } => Code::AlreadyExists,
        BrokerError::FailedPrecondition(_) | BrokerError::UnknownDelivery { .. } | BrokerError::QueueDamaged { .. } => {
            Code::FailedPrecondition
        }
        BrokerError::LimitReached { .. } | BrokerError::FileDescriptorsExhausted { .. } => Code::ResourceExhausted,
        BrokerError::DiskFull { .. } => {
            let retry = crate::limits::DISK_FULL_RETRY_AFTER_MS;
            return with_retry_after(Code::ResourceExhausted, error.to_string(), retry, Some(REASON_DISK_FULL));
        }
        BrokerError::StorageRecovering { detail } => {
            let id = error_id();
            tracing::error!(error_id = %id, %detail, "a call failed on a poisoned log (being reopened)");
            let retry = crate::limits::STORAGE_RECOVERY_RETRY_AFTER_MS;
            return with_retry_after(Code::Unavailable, format!("{error} (error id {id})"), retry, None);
        }
        BrokerError::Refused(refusal) => return refused(refusal),
        BrokerError::ShuttingDown => Code::Unavailable,
        BrokerError::NotLeader { leader, .. } => {
            let mut status = with_retry_after(
                Code::Unavailable,
                error.to_string(),
                crate::limits::NOT_LEADER_RETRY_AFTER_MS,
                Some("not_leader"),
            );
            if let Some(leader) = leader
                && let Ok(value) = MetadataValue::try_from(leader.as_str())
            {
                status.metadata_mut().insert(LEADER, value);
            }
            return status;
        }
        BrokerError::Cluster(_) => {
            let retry = crate::limits::NOT_LEADER_RETRY_AFTER_MS;
            return with_retry_after(Code::Unavailable, error.to_string(), retry, Some("cluster"));
        }
        // Only `Broker::open` returns it; no call can see it.
        BrokerError::DataDirInUse { .. } => Code::FailedPrecondition,
        BrokerError::Storage(detail) => {
            let id = error_id();
            tracing::error!(error_id = %id, %detail, "storage failure answered as INTERNAL");
            return Status::internal(format!("storage failure, error id {id}; see the broker log"));
        }
    };
    Status::new(code, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log that cannot open for want of descriptors is RESOURCE_EXHAUSTED
    /// telling the operator to raise RLIMIT_NOFILE, not INTERNAL; and a
    /// damaged queue's calls are FAILED_PRECONDITION saying it can be
    /// deleted.
    #[test]
    fn descriptors_exhausted_and_damaged_queues_have_their_own_statuses() {
        for errno in [libc::EMFILE, libc::ENFILE] {
            let open = ballast_storage::OpenError::Io {
                path: "/data/queues/q~1/lanes/0".into(),
                source: std::io::Error::from_raw_os_error(errno),
            };
            let status = status_of(BrokerError::from(open));
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            assert!(status.message().contains("RLIMIT_NOFILE"), "{status:?}");
            assert!(!status.message().contains('/'), "no path reaches the client: {status:?}");
        }
        let status = status_of(BrokerError::QueueDamaged { name: "q".into(), error_id: "abc-1".into() });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("is damaged"), "{status:?}");
        assert!(status.message().contains("DeleteQueue"), "{status:?}");
        assert!(status.message().contains("abc-1"), "{status:?}");
    }
}
