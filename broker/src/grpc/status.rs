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

/// The status a client sees for `error`. Storage failures are logged here
/// with their detail; the client gets INTERNAL with the same text.
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
        BrokerError::FailedPrecondition(_) | BrokerError::UnknownDelivery { .. } => Code::FailedPrecondition,
        BrokerError::LimitReached { .. } | BrokerError::DiskFull(_) => Code::ResourceExhausted,
        BrokerError::Refused(refusal) => return refused(refusal),
        BrokerError::ShuttingDown => Code::Unavailable,
        // Only `Broker::open` returns it; no call can see it.
        BrokerError::DataDirInUse { .. } => Code::FailedPrecondition,
        BrokerError::Storage(_) => {
            tracing::error!(%error, "storage failure answered as INTERNAL");
            Code::Internal
        }
    };
    Status::new(code, error.to_string())
}
