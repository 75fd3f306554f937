//! Queues: a name, settings, one storage log per lane, dedupe, and the
//! delivery state (consumers, credits, leases, the [`LaneScheduler`]).

mod delivery;
mod name;
#[allow(clippy::module_inception, reason = "the file is named after the type, as everywhere else")]
mod queue;
mod quota;
mod saturation;
mod scheduler;
mod settings;

pub use delivery::{Delivery, DeliveryFigures, Holder, RefusedCounts, Subscription};
pub use name::QueueName;
pub use queue::{Publish, Queue, QueueStats, Receipt};
pub(crate) use queue::{QUEUE_FILE, remove_in_background};
pub use saturation::Figures;
pub use scheduler::LaneScheduler;
pub use settings::{QueueSettings, SettingsRequest, SyncPolicySetting};

/// Reserved header: Unix milliseconds before which a message is not
/// delivered (publish delay, nack delay). Stripped from deliveries.
pub const HEADER_NOT_BEFORE: &str = "ballast-not-before";
/// Reserved headers added to a dead-lettered message.
pub const HEADER_DEAD_LETTER_REASON: &str = "ballast-dead-letter-reason";
pub const HEADER_SOURCE_QUEUE: &str = "ballast-source-queue";
pub const HEADER_SOURCE_LANE: &str = "ballast-source-lane";
pub const HEADER_SOURCE_OFFSET: &str = "ballast-source-offset";
pub const HEADER_ATTEMPTS: &str = "ballast-attempts";
