//! [`QueueSettings`], [`QueueInfo`] and [`SyncPolicy`]: a queue as the admin
//! API sees it, in Rust types (no prost types in the public API).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ballast_proto::v1 as proto;

/// Durability of a publish acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncPolicy {
    /// Acknowledged once on stable storage (fdatasync); concurrent publishes
    /// share one sync. The broker's default.
    Fsync,
    /// Acknowledged once written to the OS, synced every `sync_interval`. A
    /// power loss can lose the last interval.
    Interval,
    /// Acknowledged once written to the OS, synced only at checkpoints. A
    /// power loss can lose recent messages.
    None,
}

impl SyncPolicy {
    /// The policy's name as the CLI and the broker's config spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncPolicy::Fsync => "fsync",
            SyncPolicy::Interval => "interval",
            SyncPolicy::None => "none",
        }
    }

    fn to_proto(policy: Option<SyncPolicy>) -> proto::SyncPolicy {
        match policy {
            None => proto::SyncPolicy::Unspecified,
            Some(SyncPolicy::Fsync) => proto::SyncPolicy::Fsync,
            Some(SyncPolicy::Interval) => proto::SyncPolicy::Interval,
            Some(SyncPolicy::None) => proto::SyncPolicy::None,
        }
    }

    fn from_proto(value: i32) -> Option<SyncPolicy> {
        match proto::SyncPolicy::try_from(value).ok()? {
            proto::SyncPolicy::Unspecified => None,
            proto::SyncPolicy::Fsync => Some(SyncPolicy::Fsync),
            proto::SyncPolicy::Interval => Some(SyncPolicy::Interval),
            proto::SyncPolicy::None => Some(SyncPolicy::None),
        }
    }
}

impl std::str::FromStr for SyncPolicy {
    type Err = String;

    fn from_str(text: &str) -> Result<SyncPolicy, String> {
        match text {
            "fsync" => Ok(SyncPolicy::Fsync),
            "interval" => Ok(SyncPolicy::Interval),
            "none" => Ok(SyncPolicy::None),
            other => Err(format!("unknown sync policy {other:?}; expected fsync, interval or none")),
        }
    }
}

/// What becomes of a message whose time to live has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpiredAction {
    /// Stored in the dead-letter queue with reason `expired` (dropped when
    /// the queue has none). The broker's default.
    DeadLetter,
    /// Dropped and counted.
    Drop,
}

impl ExpiredAction {
    /// The action's name as the CLI and the broker's config spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            ExpiredAction::DeadLetter => "dead_letter",
            ExpiredAction::Drop => "drop",
        }
    }

    fn to_proto(action: Option<ExpiredAction>) -> proto::ExpiredAction {
        match action {
            None => proto::ExpiredAction::Unspecified,
            Some(ExpiredAction::DeadLetter) => proto::ExpiredAction::DeadLetter,
            Some(ExpiredAction::Drop) => proto::ExpiredAction::Drop,
        }
    }

    fn from_proto(value: i32) -> Option<ExpiredAction> {
        match proto::ExpiredAction::try_from(value).ok()? {
            proto::ExpiredAction::Unspecified => None,
            proto::ExpiredAction::DeadLetter => Some(ExpiredAction::DeadLetter),
            proto::ExpiredAction::Drop => Some(ExpiredAction::Drop),
        }
    }
}

impl std::str::FromStr for ExpiredAction {
    type Err = String;

    fn from_str(text: &str) -> Result<ExpiredAction, String> {
        match text {
            "dead_letter" => Ok(ExpiredAction::DeadLetter),
            "drop" => Ok(ExpiredAction::Drop),
            other => Err(format!("unknown expired action {other:?}; expected dead_letter or drop")),
        }
    }
}

/// A queue's settings. Every field is optional: `None` (or an empty list)
/// takes the broker's default, shown in parentheses.
///
/// ```
/// use std::time::Duration;
/// use ballast_client::{QueueSettings, SyncPolicy};
///
/// let mut settings = QueueSettings::default();
/// settings.lanes = vec!["urgent".into(), "bulk".into()];
/// settings.max_attempts = Some(10);
/// settings.lease_timeout = Some(Duration::from_secs(60));
/// settings.sync_policy = Some(SyncPolicy::Fsync);
/// // Refuse work beyond 50 000 messages or 256 MiB; the bulk lane only up
/// // to half of that, so it is shed first.
/// settings.max_messages = Some(50_000);
/// settings.max_bytes = Some(256 << 20);
/// settings.lane_admission = vec![1.0, 0.5];
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct QueueSettings {
    /// Lane names, highest priority first (1..=8 lanes). (default: high, normal, low)
    pub lanes: Vec<String>,
    /// Scheduler weight per lane, same order as `lanes`, each 1..=1000.
    /// (default: 4, 2, 1)
    pub lane_weights: Vec<u32>,
    /// Serve lanes in strict priority order instead of by weight. (default: false)
    pub strict_priority: Option<bool>,
    /// Lane a publish goes to when it names none. (default: the middle lane)
    pub default_lane: Option<u32>,
    /// How long a delivery stays leased without ack or nack before it is
    /// redelivered (millisecond precision). (default: 30 s)
    pub lease_timeout: Option<Duration>,
    /// Deliveries of a message before it is dead-lettered. (default: 5)
    pub max_attempts: Option<u32>,
    /// Whether the queue has a dead-letter queue `<name>.dead`. (default: true)
    pub dead_letter: Option<bool>,
    /// Window in which a repeated idempotency key returns the original
    /// receipt (millisecond precision). (default: 5 min)
    pub dedupe_window: Option<Duration>,
    /// Largest payload accepted, in bytes. (default: 1 MiB)
    pub message_size_max: Option<u32>,
    /// Durability of publish acknowledgements. (default: fsync)
    pub sync_policy: Option<SyncPolicy>,
    /// Sync interval for [`SyncPolicy::Interval`]. (default: 100 ms)
    pub sync_interval: Option<Duration>,
    /// Admission limit: messages not yet acked (in-flight included), all
    /// lanes together. (default: 1 000 000)
    pub max_messages: Option<u64>,
    /// Admission limit: stored bytes of the records not yet acked, all
    /// lanes together. At least 64 KiB. (default: 1 GiB)
    pub max_bytes: Option<u64>,
    /// Per lane, same order as `lanes`: the fraction of `max_messages` and
    /// `max_bytes`, in (0, 1], up to which the lane's publishes are admitted.
    /// A publish that would take the queue past its lane's fraction is
    /// refused with [`Error::ResourceExhausted`](crate::Error::ResourceExhausted),
    /// so lower lanes with lower fractions are shed first.
    /// (default: 1.0, 0.9, 0.7; in general 1.0 for the first lane down to
    /// 0.7 for the last)
    pub lane_admission: Vec<f64>,
    /// Publish quota: messages per second the queue takes from all its
    /// producers together; 0 for none. Calls over it wait for their turn
    /// (the broker answers later), and a call whose turn is further away
    /// than its lane's wait (its `lane_admission` fraction of 1 s) is
    /// refused with [`Error::ResourceExhausted`](crate::Error::ResourceExhausted)
    /// ([`Refusal::is_rate_limited`](crate::Refusal::is_rate_limited)).
    /// Lanes keep their priority: a call waits only behind its own and
    /// higher lanes' traffic. Keeps one queue's flood from taking the
    /// broker's CPU from the others. Every call given its turn counts,
    /// whether admission then stores or refuses it.
    /// (default: 0)
    pub max_publish_rate: Option<u64>,
    /// Publish quota in stored bytes per second; 0 for none. Same rules as
    /// `max_publish_rate`. (default: 0)
    pub max_publish_byte_rate: Option<u64>,
    /// Time to live of every message from its publish (millisecond
    /// precision, at most [`contract::MESSAGE_TTL_MAX`](crate::contract::MESSAGE_TTL_MAX));
    /// zero for none. An expired message is never delivered: see
    /// `expired_action`. A message's own [`Message::with_ttl`](crate::Message::with_ttl)
    /// applies too; the earlier deadline wins. (default: none)
    pub message_ttl: Option<Duration>,
    /// What becomes of an expired message. (default: dead-letter)
    pub expired_action: Option<ExpiredAction>,
    /// Delivery pace: deliveries per second to all the queue's consumers
    /// together, however many attach; 0 for none. Lanes keep their weights
    /// inside it; what is not delivered stays in the backlog, and
    /// [`QueueStats::paced`](crate::QueueStats::paced) says so. (default: 0)
    pub max_delivery_rate: Option<u64>,
    /// Copies of the queue: 1, a queue of the node it is created on; or the
    /// cluster's voter count, a queue replicated by Raft and served by the
    /// cluster's leader (a [`Client`](crate::Client) follows the leader by
    /// itself). Fixed at creation. (default: 1)
    pub replicas: Option<u32>,
}

impl QueueSettings {
    pub(crate) fn into_proto(self) -> proto::QueueSettings {
        proto::QueueSettings {
            lanes: self.lanes,
            lane_weights: self.lane_weights,
            strict_priority: self.strict_priority,
            default_lane: self.default_lane,
            lease_timeout_ms: self.lease_timeout.map(millis),
            max_attempts: self.max_attempts,
            dead_letter: self.dead_letter,
            dedupe_window_ms: self.dedupe_window.map(millis),
            message_size_max: self.message_size_max,
            sync_policy: SyncPolicy::to_proto(self.sync_policy).into(),
            sync_interval_ms: self.sync_interval.map(millis),
            max_messages: self.max_messages,
            max_bytes: self.max_bytes,
            lane_admission: self.lane_admission,
            max_publish_rate: self.max_publish_rate,
            max_publish_byte_rate: self.max_publish_byte_rate,
            message_ttl_ms: self.message_ttl.map(millis),
            expired_action: ExpiredAction::to_proto(self.expired_action).into(),
            max_delivery_rate: self.max_delivery_rate,
            replicas: self.replicas,
        }
    }

    pub(crate) fn from_proto(settings: proto::QueueSettings) -> QueueSettings {
        QueueSettings {
            lanes: settings.lanes,
            lane_weights: settings.lane_weights,
            strict_priority: settings.strict_priority,
            default_lane: settings.default_lane,
            lease_timeout: settings.lease_timeout_ms.map(Duration::from_millis),
            max_attempts: settings.max_attempts,
            dead_letter: settings.dead_letter,
            dedupe_window: settings.dedupe_window_ms.map(Duration::from_millis),
            message_size_max: settings.message_size_max,
            sync_policy: SyncPolicy::from_proto(settings.sync_policy),
            sync_interval: settings.sync_interval_ms.map(Duration::from_millis),
            max_messages: settings.max_messages,
            max_bytes: settings.max_bytes,
            lane_admission: settings.lane_admission,
            max_publish_rate: settings.max_publish_rate,
            max_publish_byte_rate: settings.max_publish_byte_rate,
            message_ttl: settings.message_ttl_ms.map(Duration::from_millis),
            expired_action: ExpiredAction::from_proto(settings.expired_action),
            max_delivery_rate: settings.max_delivery_rate,
            replicas: settings.replicas,
        }
    }

    /// The index of the lane named `name`, if the settings list lanes.
    ///
    /// ```
    /// let mut settings = ballast_client::QueueSettings::default();
    /// settings.lanes = vec!["high".into(), "normal".into(), "low".into()];
    /// assert_eq!(settings.lane_index("low"), Some(2));
    /// assert_eq!(settings.lane_index("urgent"), None);
    /// ```
    pub fn lane_index(&self, name: &str) -> Option<u32> {
        let index = self.lanes.iter().position(|lane| lane == name)?;
        u32::try_from(index).ok()
    }
}

/// A queue as the broker reports it: settings with every default resolved,
/// and its counts.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct QueueInfo {
    /// The queue's name.
    pub name: String,
    /// Resolved settings: every field is set.
    pub settings: QueueSettings,
    /// Name of the dead-letter queue, if the queue has one.
    pub dead_letter_queue: Option<String>,
    /// Messages not yet acked (in-flight included) per lane, in lane order.
    pub lane_depths: Vec<u64>,
    /// Sum of `lane_depths`.
    pub depth: u64,
    /// Deliveries currently leased to consumers.
    pub in_flight: u64,
    /// Consumers currently subscribed.
    pub consumers: u32,
    /// When the queue was created.
    pub created_at: SystemTime,
}

impl QueueInfo {
    pub(crate) fn from_proto(info: proto::QueueInfo) -> QueueInfo {
        QueueInfo {
            name: info.name,
            settings: QueueSettings::from_proto(info.settings.unwrap_or_default()),
            dead_letter_queue: Some(info.dead_letter_queue).filter(|name| !name.is_empty()),
            lane_depths: info.lane_depths,
            depth: info.depth,
            in_flight: info.in_flight,
            consumers: info.consumers,
            created_at: UNIX_EPOCH + Duration::from_millis(info.created_at_ms),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings survive the round trip through the wire form, unset fields
    /// included.
    #[test]
    fn settings_roundtrip() {
        let full = QueueSettings {
            lanes: vec!["a".into(), "b".into()],
            lane_weights: vec![2, 1],
            strict_priority: Some(true),
            default_lane: Some(1),
            lease_timeout: Some(Duration::from_millis(1500)),
            max_attempts: Some(3),
            dead_letter: Some(false),
            dedupe_window: Some(Duration::from_secs(60)),
            message_size_max: Some(4096),
            sync_policy: Some(SyncPolicy::Interval),
            sync_interval: Some(Duration::from_millis(50)),
            max_messages: Some(50),
            max_bytes: Some(1 << 20),
            lane_admission: vec![1.0, 0.5],
            max_publish_rate: Some(2000),
            max_publish_byte_rate: Some(0),
            message_ttl: Some(Duration::from_secs(90)),
            expired_action: Some(ExpiredAction::Drop),
            max_delivery_rate: Some(200),
            replicas: Some(3),
        };
        assert_eq!(QueueSettings::from_proto(full.clone().into_proto()), full);
        let empty = QueueSettings::default();
        assert_eq!(QueueSettings::from_proto(empty.clone().into_proto()), empty);
        assert_eq!(empty.into_proto().sync_policy, i32::from(proto::SyncPolicy::Unspecified));
    }

    /// Sync policies parse from their names.
    #[test]
    fn sync_policy_names() {
        for policy in [SyncPolicy::Fsync, SyncPolicy::Interval, SyncPolicy::None] {
            assert_eq!(policy.as_str().parse::<SyncPolicy>(), Ok(policy));
        }
        assert!("sometimes".parse::<SyncPolicy>().is_err());
    }
}
