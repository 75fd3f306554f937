//! The wire contract between this client and `ballastd`, in one place.
//!
//! Everything the client assumes about the broker beyond the shapes in
//! `ballast.proto` is written down here, so a change on either side has one
//! place to look. The broker implements the same rules; its ceilings live in
//! `broker/src/limits.rs`.
//!
//! 1. Address: the broker listens on [`ADDR_DEFAULT`] unless told otherwise;
//!    the client and the `ballast` CLI default to the same address (the CLI
//!    also reads the `BALLAST_ADDR` environment variable).
//! 2. Refusal: a publish the broker will not admit fails with
//!    `RESOURCE_EXHAUSTED` and the ASCII metadata entry [`RETRY_AFTER_METADATA`]
//!    holding a decimal number of milliseconds to wait before retrying, and
//!    stores nothing. An admission refusal also carries the refused lane's
//!    index ([`LANE_INDEX_METADATA`]) and name ([`LANE_METADATA`] when it is
//!    printable ASCII, always as UTF-8 in [`LANE_BIN_METADATA`]), the
//!    queue's depth, bytes and saturation ([`DEPTH_METADATA`],
//!    [`BYTES_METADATA`], [`SATURATION_METADATA`]) and the lane's threshold
//!    ([`THRESHOLD_METADATA`]); a refusal for a nearly full disk adds
//!    [`DISK_FREE_BYTES_METADATA`]. Admission compares the whole queue
//!    (every lane's messages and bytes) with the publishing lane's fraction
//!    of `max_messages` and `max_bytes`; a batch that would cross it is
//!    refused whole. A batch larger than that fraction of an empty queue can
//!    never be admitted and fails with `INVALID_ARGUMENT` instead, so the
//!    producer sends its messages one by one.
//! 3. Retryable failures: `UNAVAILABLE`, `RESOURCE_EXHAUSTED`,
//!    `DEADLINE_EXCEEDED`, `ABORTED`, and transport or connect failures (the
//!    request may or may not have reached the broker). Never retried:
//!    `INVALID_ARGUMENT`, `NOT_FOUND`, `ALREADY_EXISTS`,
//!    `FAILED_PRECONDITION`, `PERMISSION_DENIED` (and every other code). See
//!    [`is_retryable_code`].
//! 4. Idempotency: a retried publish is safe only because every message
//!    carries an idempotency key. The producer generates one per logical
//!    message ([`IDEMPOTENCY_KEY_BITS`] random bits, lower-case hex) unless the
//!    caller set one, and reuses it on every retry. The broker answers a key it
//!    has seen within the queue's dedupe window with the original message id
//!    and `duplicate = true`, storing nothing.
//! 5. Consume stream: the first request is `subscribe{queue, credit}` with
//!    credit in `1..=`[`CREDIT_MAX`]; the broker answers `subscribed{queue,
//!    consumer_id}`, then sends deliveries. Credit is token-based: each
//!    delivery uses one credit, the consumer grants more with `credit{n}`, and
//!    acks do not return credit. The broker keeps credit held plus unacked
//!    deliveries at or below [`CREDIT_MAX`]. Ack is `ack{delivery_ids}`, nack
//!    is `nack{delivery_id, delay_ms, reason}`; an ack or nack of an unknown or
//!    expired delivery comes back as `rejected{delivery_id, code, message}`.
//! 6. Sessions: delivery ids belong to one stream. Closing the stream releases
//!    every lease it holds and the broker redelivers those messages, so after
//!    a reconnect the consumer drops what it held; the results of handlers
//!    that were running can no longer be acked and those messages are
//!    delivered again (at-least-once). When the client half-closes the request
//!    stream, the broker applies the acks it has read and then ends the
//!    response stream.
//! 7. Saturation: every receipt carries the figures of the queue and of the
//!    message's lane, taken right after the publish (a batch's receipts share
//!    the figures taken after the whole batch). The Stats service returns the
//!    same figures per queue and lane (`GetStats`; an empty queue name means
//!    every queue) and pushes them (`Watch`) every `interval_ms` in
//!    [`WATCH_INTERVAL_MIN`]`..=`[`WATCH_INTERVAL_MAX`], the first snapshot
//!    at once; the watch ends with an error status when the queue is deleted
//!    or the broker shuts down. A drain estimate is absent ("unknown") while
//!    messages wait and nothing was acked recently.

use std::time::Duration;

use tonic::Code;

/// Where `ballastd` listens by default, and so where the client connects
/// unless told otherwise.
pub const ADDR_DEFAULT: &str = "http://127.0.0.1:7400";

/// Metadata naming the cluster leader's `host:port` on a follower's
/// UNAVAILABLE (`docs/replication.md`).
pub const LEADER_METADATA: &str = "ballast-leader";

/// Shortest wait before retrying an UNAVAILABLE: a follower during an
/// election or a broker shutting down is not back sooner (the broker's
/// `retry-after-ms` for a redirect, `NOT_LEADER_RETRY_AFTER_MS`).
pub const UNAVAILABLE_RETRY_FLOOR: Duration = Duration::from_millis(200);

/// How long an address that could not be reached is not followed again
/// when a follower names it as leader (its view of the leader lags an
/// election by up to an election timeout).
pub const UNREACHABLE_FOR: Duration = Duration::from_secs(3);

/// ASCII metadata key on a `RESOURCE_EXHAUSTED` status: how long to wait
/// before retrying, in decimal milliseconds.
pub const RETRY_AFTER_METADATA: &str = "retry-after-ms";

/// ASCII metadata key on an admission refusal: the refused lane's name,
/// sent only when the name is printable ASCII.
pub const LANE_METADATA: &str = "ballast-lane";

/// Binary metadata key on an admission refusal: the refused lane's name as
/// UTF-8, whatever its characters.
pub const LANE_BIN_METADATA: &str = "ballast-lane-bin";

/// ASCII metadata key on an admission refusal: the refused lane's index,
/// decimal.
pub const LANE_INDEX_METADATA: &str = "ballast-lane-index";

/// ASCII metadata key on an admission refusal: the queue's messages not yet
/// acked, decimal.
pub const DEPTH_METADATA: &str = "ballast-depth";

/// ASCII metadata key on an admission refusal: the stored bytes of the
/// queue's records not yet acked, decimal.
pub const BYTES_METADATA: &str = "ballast-bytes";

/// ASCII metadata key on an admission refusal: the queue's saturation, a
/// decimal fraction (`0.7000`).
pub const SATURATION_METADATA: &str = "ballast-saturation";

/// ASCII metadata key on an admission refusal: the refused lane's admission
/// threshold, a decimal fraction.
pub const THRESHOLD_METADATA: &str = "ballast-threshold";

/// ASCII metadata key on a refusal for a nearly full disk: the free bytes,
/// decimal.
pub const DISK_FREE_BYTES_METADATA: &str = "ballast-disk-free-bytes";

/// ASCII metadata key on every refusal: why, `queue_full`, `disk_low` or
/// `publish_rate` (the queue's publish quota).
pub const REASON_METADATA: &str = "ballast-reason";

/// [`REASON_METADATA`] of a refusal by the queue's publish quota.
pub const REASON_PUBLISH_RATE: &str = "publish_rate";

/// `ballast-reason` of a cluster follower's UNAVAILABLE naming the leader.
pub const REASON_NOT_LEADER: &str = "not_leader";

/// Shortest interval between stats snapshots the broker pushes.
pub const WATCH_INTERVAL_MIN: Duration = Duration::from_millis(100);

/// Longest interval between stats snapshots the broker pushes.
pub const WATCH_INTERVAL_MAX: Duration = Duration::from_millis(60_000);

/// Random bits in a generated idempotency key (rendered as 32 hex digits).
pub const IDEMPOTENCY_KEY_BITS: u32 = 128;

/// Longest idempotency key the broker accepts, in bytes. A longer one is
/// refused locally with [`Error::InvalidArgument`](crate::Error::InvalidArgument).
pub const IDEMPOTENCY_KEY_SIZE_MAX: usize = 256;

/// Most credit a consumer may hold, and so the largest prefetch window.
pub const CREDIT_MAX: u32 = 10_000;

/// Most messages in one `PublishBatch`; the producer never builds a bigger
/// batch.
pub const BATCH_COUNT_MAX: usize = 1000;

/// Largest gRPC message the broker decodes: the largest payload (16 MiB)
/// plus 1 MiB for headers and framing. The producer keeps a batch's payload
/// bytes under [`BATCH_SIZE_MAX`], leaving room for the framing.
pub const GRPC_DECODE_SIZE_MAX: usize = 17 * 1024 * 1024;

/// Ceiling for a producer's `batch_size_max` setting, in payload bytes. A
/// single message bigger than the configured size is sent alone.
pub const BATCH_SIZE_MAX: usize = 16 * 1024 * 1024;

/// Longest publish or nack delay the broker accepts (7 days).
pub const DELAY_MAX: Duration = Duration::from_millis(7 * 24 * 3600 * 1000);

/// Longest time to live of a message or a queue (the broker's
/// `MESSAGE_TTL_MS_MAX`, 14 days).
pub const MESSAGE_TTL_MAX: Duration = Duration::from_millis(14 * 24 * 3600 * 1000);

/// Header names with this prefix are reserved for the broker; the client
/// refuses them locally.
pub const RESERVED_HEADER_PREFIX: &str = "ballast-";

/// Longest queue name, in bytes (the name pattern is
/// `[a-z0-9][a-z0-9._-]{0,127}`).
pub const QUEUE_NAME_SIZE_MAX: usize = 128;

/// Whether a failure with this gRPC code may succeed if the same request is
/// sent again (rule 3 above). Transport failures are retryable too; they are
/// told apart from broker answers by [`Error::from_status`](crate::Error).
pub fn is_retryable_code(code: Code) -> bool {
    match code {
        Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded | Code::Aborted => true,
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss
        | Code::Unauthenticated => false,
    }
}

/// Checks a queue name against the broker's pattern
/// `[a-z0-9][a-z0-9._-]{0,127}`, so a typo fails before any network call.
pub fn check_queue_name(name: &str) -> Result<(), crate::Error> {
    let valid_first = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let valid_rest = |b: u8| valid_first(b) || matches!(b, b'.' | b'_' | b'-');
    let bytes = name.as_bytes();
    let valid = match bytes.split_first() {
        None => false,
        Some((first, rest)) => {
            // A dead-letter queue's name is its queue's plus ".dead".
            let max = if name.ends_with(".dead") { QUEUE_NAME_SIZE_MAX + ".dead".len() } else { QUEUE_NAME_SIZE_MAX };
            bytes.len() <= max && valid_first(*first) && rest.iter().all(|b| valid_rest(*b))
        }
    };
    if valid {
        Ok(())
    } else {
        Err(crate::Error::InvalidArgument {
            message: format!(
                "queue name {name:?} is invalid: it must match [a-z0-9][a-z0-9._-]{{0,127}} \
                 (1 to {QUEUE_NAME_SIZE_MAX} bytes)"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The retryable set is exactly the one the broker contract names.
    #[test]
    fn retryable_codes() {
        for code in [Code::Unavailable, Code::ResourceExhausted, Code::DeadlineExceeded, Code::Aborted] {
            assert!(is_retryable_code(code), "{code:?} must be retryable");
        }
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::FailedPrecondition,
            Code::PermissionDenied,
            Code::Internal,
        ] {
            assert!(!is_retryable_code(code), "{code:?} must not be retryable");
        }
    }

    /// Queue names follow the broker's pattern, at and past the length limit.
    #[test]
    fn queue_names() {
        for name in ["a", "payments", "emails.dead", "0-x_y.z", &"a".repeat(QUEUE_NAME_SIZE_MAX)] {
            assert!(check_queue_name(name).is_ok(), "{name:?} should be valid");
        }
        for name in ["", "A", "-x", ".x", "pay ments", "päy", &"a".repeat(QUEUE_NAME_SIZE_MAX + 1)] {
            assert!(check_queue_name(name).is_err(), "{name:?} should be invalid");
        }
    }
}
