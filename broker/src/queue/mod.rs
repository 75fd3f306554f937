//! Queues: a name, settings, one storage log per lane, dedupe, and the
//! delivery state (consumers, credits, leases, the [`LaneScheduler`]).

mod delivery;
mod headers;
mod name;
mod pacing;
mod peek;
#[allow(clippy::module_inception, reason = "the file is named after the type, as everywhere else")]
mod queue;
mod quota;
mod redrive;
mod saturation;
mod scheduler;
mod settings;

pub(crate) use delivery::check_ids;
pub use delivery::{Delivery, DeliveryFigures, Extension, Holder, RefusedCounts, Subscription};
pub use name::QueueName;
pub use pacing::PacingFigures;
pub use peek::Peeked;
pub use queue::{Publish, Queue, QueueStats, Receipt};
pub(crate) use queue::{QUEUE_FILE, remove_in_background, write_atomically};
pub use redrive::Redriven;
pub use saturation::Figures;
pub use scheduler::LaneScheduler;
pub use settings::{ExpiredAction, QueueSettings, SettingsRequest, SyncPolicySetting};

/// Reserved header: Unix milliseconds before which a message is not
/// delivered (publish delay, nack delay). Stripped from deliveries.
pub const HEADER_NOT_BEFORE: &str = "ballast-not-before";
/// Reserved headers added to a dead-lettered message.
pub const HEADER_DEAD_LETTER_REASON: &str = "ballast-dead-letter-reason";
pub const HEADER_SOURCE_QUEUE: &str = "ballast-source-queue";
pub const HEADER_SOURCE_LANE: &str = "ballast-source-lane";
pub const HEADER_SOURCE_OFFSET: &str = "ballast-source-offset";
pub const HEADER_ATTEMPTS: &str = "ballast-attempts";
/// Reserved header set on the first redelivered copy of a message and kept
/// on every later copy and on its dead letter: the offset of the message's
/// publish receipt (its lane is the copy's lane, or `ballast-source-lane`
/// for a dead letter), which each redelivery otherwise replaces.
pub const HEADER_ORIGINAL_OFFSET: &str = "ballast-original-offset";
/// Reserved header set on a message published with a `ttl_ms`: the Unix
/// milliseconds after which it is expired (publish time + its TTL). Kept
/// on its redelivered copies, left off its dead letter. Counted in the
/// publisher's header allowance, not the broker's reserve.
pub const HEADER_EXPIRES_AT: &str = "ballast-expires-at";
/// The dead-letter reason of an expired message.
pub const EXPIRED_REASON: &str = "expired";
