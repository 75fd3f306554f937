//! Hard ceilings of the broker. Operator-tunable defaults live in
//! `config.rs` and are validated against these at startup.

/// Queues (dead-letter queues included) one broker holds. Each queue costs a
/// few file descriptors and a flusher thread per lane; creating one more is
/// refused with RESOURCE_EXHAUSTED.
pub const QUEUES_MAX: usize = 1024;

/// Lanes per queue. Lane indexes travel as `u32` but must stay below this.
pub const LANES_MAX: usize = 8;

/// Longest queue name, in bytes (the name regex is `[a-z0-9][a-z0-9._-]{0,127}`).
/// A dead-letter queue's name is its queue's plus `.dead`, so it may be 5
/// bytes longer: every name a user may create can have its dead-letter
/// queue.
pub const QUEUE_NAME_SIZE_MAX: usize = 128;

/// Suffix of a queue's dead-letter queue.
pub const DEAD_LETTER_SUFFIX: &str = ".dead";

/// Largest lane weight.
pub const LANE_WEIGHT_MAX: u32 = 1000;

/// Longest lane name, in bytes.
pub const LANE_NAME_SIZE_MAX: usize = 32;

/// Ceiling for a queue's `message_size_max` (16 MiB, the storage ceiling). A
/// bigger payload is refused with INVALID_ARGUMENT before touching storage.
pub const MESSAGE_SIZE_MAX: u32 = ballast_storage::limits::PAYLOAD_SIZE_MAX;

/// Messages in one PublishBatch. Bigger batches are refused with
/// INVALID_ARGUMENT; the client library splits batches to stay under it.
pub const BATCH_COUNT_MAX: usize = 1000;

/// Credit one consumer may hold, and so deliveries it may have in flight.
/// Bounds the broker's memory per consumer; more is INVALID_ARGUMENT.
pub const CREDIT_MAX: u32 = 10_000;

/// Consumers (streams and in-progress pulls) per queue; more is
/// RESOURCE_EXHAUSTED.
pub const CONSUMERS_MAX: usize = 1024;

/// Nacks of one consume stream being applied at once (each stores a
/// durable copy off the stream's loop). At the limit the stream's next
/// request waits, so a client that sends nacks faster than they apply (or
/// never reads its rejections) is slowed instead of growing the broker's
/// tasks without bound.
pub const STREAM_NACKS_IN_FLIGHT_MAX: usize = 1024;

/// Longest Pull wait, in milliseconds.
pub const PULL_WAIT_MS_MAX: u64 = 60_000;

/// Longest publish or nack delay, in milliseconds (7 days).
pub const DELAY_MS_MAX: u64 = 7 * 24 * 3600 * 1000;

/// Longest lease, in milliseconds (12 hours).
pub const LEASE_TIMEOUT_MS_MAX: u64 = 12 * 3600 * 1000;

/// Smallest lease, in milliseconds.
pub const LEASE_TIMEOUT_MS_MIN: u64 = 10;

/// Most attempts a queue may allow before dead-lettering.
pub const MAX_ATTEMPTS_MAX: u32 = 1000;

/// Longest dedupe window, in milliseconds (7 days).
pub const DEDUPE_WINDOW_MS_MAX: u64 = 7 * 24 * 3600 * 1000;

/// Idempotency keys remembered per queue. When full, the oldest key is
/// forgotten early (counted in the log), so memory stays bounded under any
/// key rate.
pub const DEDUPE_KEYS_MAX: usize = 1_000_000;

/// Messages read ahead whose delay has not expired, per lane. When full the
/// lane stops reading further until some come due, so memory stays bounded.
pub const DELAYED_MAX: usize = 100_000;

/// Headers per message and their encoded size (storage ceilings).
pub const HEADERS_COUNT_MAX: u32 = ballast_storage::limits::HEADERS_COUNT_MAX;
pub const HEADERS_SIZE_MAX: u32 = ballast_storage::limits::HEADERS_SIZE_MAX;

/// Longest idempotency key, in bytes.
pub const KEY_SIZE_MAX: u32 = ballast_storage::limits::KEY_SIZE_MAX;

/// gRPC decode limit: the largest batch of largest messages plus framing is
/// far above this, so it is set from the message limit instead: one
/// maximum-size message plus 1 MiB of headers and framing, or a batch of
/// small ones.
pub const GRPC_DECODE_SIZE_MAX: usize = MESSAGE_SIZE_MAX as usize + 1024 * 1024;

/// Header names starting with this are reserved for the broker.
pub const RESERVED_HEADER_PREFIX: &str = "ballast-";

const _: () = assert!(LANES_MAX <= u8::MAX as usize);
const _: () = assert!(QUEUE_NAME_SIZE_MAX > DEAD_LETTER_SUFFIX.len());

/// Default admission limit on a queue's unacked messages.
pub const MAX_MESSAGES_DEFAULT: u64 = 1_000_000;
/// Largest `max_messages` a queue may set.
pub const MAX_MESSAGES_MAX: u64 = 1_000_000_000_000;
/// Default admission limit on a queue's bytes on disk (1 GiB).
pub const MAX_BYTES_DEFAULT: u64 = 1 << 30;
/// Smallest and largest `max_bytes` a queue may set (64 KiB .. 1 PiB).
pub const MAX_BYTES_MIN: u64 = 64 * 1024;
pub const MAX_BYTES_MAX: u64 = 1 << 50;

/// Bounds of a refusal's retry-after hint, in milliseconds.
pub const RETRY_AFTER_MS_MIN: u64 = 100;
pub const RETRY_AFTER_MS_MAX: u64 = 30_000;
/// Retry-after hint when nothing is consuming (no drain rate to go by).
pub const RETRY_AFTER_MS_UNKNOWN: u64 = 1_000;

/// How often rates, disk free space and gauges are refreshed, in ms.
pub const STATS_TICK_MS: u64 = 1_000;
/// Smoothing of the publish and ack rates: weight of the newest tick.
pub const RATE_SMOOTHING: f64 = 0.3;
/// Stats Watch interval bounds and default, in milliseconds.
pub const WATCH_INTERVAL_MS_MIN: u64 = 100;
pub const WATCH_INTERVAL_MS_MAX: u64 = 60_000;
pub const WATCH_INTERVAL_MS_DEFAULT: u64 = 1_000;

/// Publish quotas (`max_publish_rate`, `max_publish_byte_rate`): how far
/// ahead of its quota a queue's producers may run before calls wait, in
/// milliseconds of quota. Small, so that a flood is spread out rather than
/// let through in bursts that other queues would feel.
pub const QUOTA_BURST_MS: u64 = 100;
/// Longest a publish waits for its turn under its queue's quota, in
/// milliseconds, scaled by its lane's admission fraction (low waits at most
/// 0.7 s by default). A call whose turn is further away is refused with
/// RESOURCE_EXHAUSTED once it has waited this long, so producers that
/// ignore retry-after are held to a few calls per second each.
pub const PUBLISH_THROTTLE_WAIT_MS_MAX: u64 = 1_000;

/// Retry-after hint, in milliseconds, of a publish refused by a real
/// ENOSPC from the disk (`ballast-reason: disk_full`): space rarely
/// returns sooner, and the disk watermark (`disk_free_min_bytes`) usually
/// refuses first.
pub const DISK_FULL_RETRY_AFTER_MS: u64 = 1_000;

/// Retry-after hint, in milliseconds, of a call refused with UNAVAILABLE
/// because its queue's log failed a write or sync and is being reopened.
pub const STORAGE_RECOVERY_RETRY_AFTER_MS: u64 = 1_000;

/// First pause, in milliseconds, before the broker reopens a lane's log
/// that a failed write or sync poisoned; it doubles after each failed
/// reopen up to [`LANE_REOPEN_BACKOFF_MS_MAX`], so a dead disk costs one
/// recovery attempt per that long, not a busy loop.
pub const LANE_REOPEN_BACKOFF_MS_MIN: u64 = 1_000;

/// Longest pause, in milliseconds, between two reopen attempts of a
/// poisoned lane.
pub const LANE_REOPEN_BACKOFF_MS_MAX: u64 = 30_000;
