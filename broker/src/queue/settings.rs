//! A queue's settings: the request (every field optional), the resolved
//! settings (every field set), and their validation.

use serde::{Deserialize, Serialize};

use crate::{
    error::{BrokerError, Result},
    limits::*,
};

/// When a publish counts as durable (see `ballast_storage::SyncPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicySetting {
    #[default]
    Fsync,
    Interval,
    None,
}

/// What becomes of a message whose time to live has passed (see
/// `docs/api.md`, "Message expiry").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExpiredAction {
    /// Stored in the dead-letter queue with reason `expired` (dropped, and
    /// counted, when the queue has none).
    #[default]
    DeadLetter,
    /// Dropped (marked done) and counted.
    Drop,
}

/// Resolved settings of a queue. Persisted with the queue (`queue.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    /// Lane names, highest priority first.
    pub lanes: Vec<String>,
    /// Scheduler weight per lane.
    pub lane_weights: Vec<u32>,
    /// Serve lanes in strict priority order instead of by weight.
    pub strict_priority: bool,
    /// Lane of a publish that names none.
    pub default_lane: u32,
    /// Lease (visibility) timeout of a delivery, in milliseconds.
    pub lease_timeout_ms: u64,
    /// Deliveries before a message is dead-lettered.
    pub max_attempts: u32,
    /// Whether the queue has a dead-letter queue `<name>.dead`.
    pub dead_letter: bool,
    /// Idempotency-key window, in milliseconds.
    pub dedupe_window_ms: u64,
    /// Largest payload, in bytes.
    pub message_size_max: u32,
    pub sync_policy: SyncPolicySetting,
    /// Sync interval for the `interval` policy, in milliseconds.
    pub sync_interval_ms: u64,
    /// Admission limit on messages not yet acked, all lanes together.
    pub max_messages: u64,
    /// Admission limit on the stored bytes of unacked records, all lanes together.
    pub max_bytes: u64,
    /// Per lane: the fraction of the limits up to which it is admitted.
    pub lane_admission: Vec<f64>,
    /// Publish quota in messages per second, all producers together; 0 is
    /// none (see `queue/quota.rs`).
    pub max_publish_rate: u64,
    /// Publish quota in stored bytes per second; 0 is none.
    pub max_publish_byte_rate: u64,
    /// Time to live of a message from its publish, in milliseconds; 0 is
    /// none. A message past it is never delivered (see `expired_action`).
    pub message_ttl_ms: u64,
    /// What becomes of an expired message.
    pub expired_action: ExpiredAction,
    /// Deliveries per second to all consumers together; 0 is none (see
    /// `queue/pacing.rs`).
    pub max_delivery_rate: u64,
    /// Copies of the queue kept by the cluster (`docs/replication.md`): 1
    /// is a queue of this node only; more is a replicated queue, which
    /// must equal the cluster's voters. Fixed at creation.
    pub replicas: u32,
}

impl Default for QueueSettings {
    /// The defaults every queue starts from (operators can override them in
    /// the `[queue_defaults]` table of the config file).
    fn default() -> QueueSettings {
        QueueSettings {
            lanes: vec!["high".into(), "normal".into(), "low".into()],
            lane_weights: vec![4, 2, 1],
            strict_priority: false,
            default_lane: 1,
            lease_timeout_ms: 30_000,
            max_attempts: 5,
            dead_letter: true,
            dedupe_window_ms: 5 * 60 * 1000,
            message_size_max: 1024 * 1024,
            sync_policy: SyncPolicySetting::Fsync,
            sync_interval_ms: 100,
            max_messages: MAX_MESSAGES_DEFAULT,
            max_bytes: MAX_BYTES_DEFAULT,
            lane_admission: vec![1.0, 0.9, 0.7],
            max_publish_rate: 0,
            max_publish_byte_rate: 0,
            message_ttl_ms: 0,
            expired_action: ExpiredAction::DeadLetter,
            max_delivery_rate: 0,
            replicas: 1,
        }
    }
}

/// Settings as asked for at creation: unset fields take the defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SettingsRequest {
    pub lanes: Vec<String>,
    pub lane_weights: Vec<u32>,
    pub strict_priority: Option<bool>,
    pub default_lane: Option<u32>,
    pub lease_timeout_ms: Option<u64>,
    pub max_attempts: Option<u32>,
    pub dead_letter: Option<bool>,
    pub dedupe_window_ms: Option<u64>,
    pub message_size_max: Option<u32>,
    pub sync_policy: Option<SyncPolicySetting>,
    pub sync_interval_ms: Option<u64>,
    pub max_messages: Option<u64>,
    pub max_bytes: Option<u64>,
    pub lane_admission: Vec<f64>,
    pub max_publish_rate: Option<u64>,
    pub max_publish_byte_rate: Option<u64>,
    pub message_ttl_ms: Option<u64>,
    pub expired_action: Option<ExpiredAction>,
    pub max_delivery_rate: Option<u64>,
    pub replicas: Option<u32>,
}

/// Admission fractions for `n` lanes: 1.0 for the first, down to 0.7 for
/// the last, evenly spaced.
impl SettingsRequest {
    /// A request that asks for every value of `settings`: an update to it
    /// changes what differs and refuses what cannot change.
    pub fn from_settings(settings: &QueueSettings) -> SettingsRequest {
        let s = settings.clone();
        SettingsRequest {
            lanes: s.lanes,
            lane_weights: s.lane_weights,
            strict_priority: Some(s.strict_priority),
            default_lane: Some(s.default_lane),
            lease_timeout_ms: Some(s.lease_timeout_ms),
            max_attempts: Some(s.max_attempts),
            dead_letter: Some(s.dead_letter),
            dedupe_window_ms: Some(s.dedupe_window_ms),
            message_size_max: Some(s.message_size_max),
            sync_policy: Some(s.sync_policy),
            sync_interval_ms: Some(s.sync_interval_ms),
            max_messages: Some(s.max_messages),
            max_bytes: Some(s.max_bytes),
            lane_admission: s.lane_admission,
            max_publish_rate: Some(s.max_publish_rate),
            max_publish_byte_rate: Some(s.max_publish_byte_rate),
            message_ttl_ms: Some(s.message_ttl_ms),
            expired_action: Some(s.expired_action),
            max_delivery_rate: Some(s.max_delivery_rate),
            replicas: Some(s.replicas),
        }
    }
}

fn default_admission(n: usize) -> Vec<f64> {
    if n <= 1 {
        return vec![1.0];
    }
    (0..n).map(|i| 1.0 - 0.3 * i as f64 / (n - 1) as f64).collect()
}

fn invalid(key: &'static str, message: String) -> BrokerError {
    BrokerError::InvalidSetting { key, message }
}

impl QueueSettings {
    /// Fills the request's unset fields from `defaults` and validates.
    pub fn resolve(request: &SettingsRequest, defaults: &QueueSettings) -> Result<QueueSettings> {
        let lanes = if request.lanes.is_empty() { defaults.lanes.clone() } else { request.lanes.clone() };
        let lane_weights = if !request.lane_weights.is_empty() {
            request.lane_weights.clone()
        } else if lanes.len() == defaults.lanes.len() {
            defaults.lane_weights.clone()
        } else {
            (0..lanes.len()).rev().map(|i| 1u32 << i.min(9)).collect()
        };
        let default_lane = request.default_lane.unwrap_or(if request.lanes.is_empty() {
            defaults.default_lane
        } else {
            u32::try_from(lanes.len() / 2).unwrap_or(0)
        });
        let lane_admission = if !request.lane_admission.is_empty() {
            request.lane_admission.clone()
        } else if lanes.len() == defaults.lanes.len() {
            defaults.lane_admission.clone()
        } else {
            default_admission(lanes.len())
        };
        let settings = QueueSettings {
            lane_admission,
            max_messages: request.max_messages.unwrap_or(defaults.max_messages),
            max_bytes: request.max_bytes.unwrap_or(defaults.max_bytes),
            max_publish_rate: request.max_publish_rate.unwrap_or(defaults.max_publish_rate),
            max_publish_byte_rate: request.max_publish_byte_rate.unwrap_or(defaults.max_publish_byte_rate),
            message_ttl_ms: request.message_ttl_ms.unwrap_or(defaults.message_ttl_ms),
            expired_action: request.expired_action.unwrap_or(defaults.expired_action),
            max_delivery_rate: request.max_delivery_rate.unwrap_or(defaults.max_delivery_rate),
            replicas: request.replicas.unwrap_or(defaults.replicas),
            lanes,
            lane_weights,
            strict_priority: request.strict_priority.unwrap_or(defaults.strict_priority),
            default_lane,
            lease_timeout_ms: request.lease_timeout_ms.unwrap_or(defaults.lease_timeout_ms),
            max_attempts: request.max_attempts.unwrap_or(defaults.max_attempts),
            dead_letter: request.dead_letter.unwrap_or(defaults.dead_letter),
            dedupe_window_ms: request.dedupe_window_ms.unwrap_or(defaults.dedupe_window_ms),
            message_size_max: request.message_size_max.unwrap_or(defaults.message_size_max),
            sync_policy: request.sync_policy.unwrap_or(defaults.sync_policy),
            sync_interval_ms: request.sync_interval_ms.unwrap_or(defaults.sync_interval_ms),
        };
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every setting against its ceiling; the error names the key and
    /// the allowed range.
    pub fn validate(&self) -> Result<()> {
        let n = self.lanes.len();
        if !(1..=LANES_MAX).contains(&n) {
            return Err(invalid("lanes", format!("a queue has 1..={LANES_MAX} lanes; got {n}")));
        }
        for (i, name) in self.lanes.iter().enumerate() {
            if name.is_empty() || name.len() > LANE_NAME_SIZE_MAX {
                return Err(invalid(
                    "lanes",
                    format!("lane names are 1..={LANE_NAME_SIZE_MAX} bytes; lane {i} is {}", name.len()),
                ));
            }
            if self.lanes[..i].contains(name) {
                return Err(invalid("lanes", format!("lane name {name:?} appears twice")));
            }
        }
        if self.lane_weights.len() != n {
            return Err(invalid(
                "lane_weights",
                format!("one weight per lane: {n} lanes, {} weights", self.lane_weights.len()),
            ));
        }
        if let Some(w) = self.lane_weights.iter().find(|w| !(1..=LANE_WEIGHT_MAX).contains(*w)) {
            return Err(invalid("lane_weights", format!("weights are 1..={LANE_WEIGHT_MAX}; got {w}")));
        }
        if self.default_lane as usize >= n {
            return Err(invalid("default_lane", format!("must be a lane index in 0..{n}; got {}", self.default_lane)));
        }
        if !(LEASE_TIMEOUT_MS_MIN..=LEASE_TIMEOUT_MS_MAX).contains(&self.lease_timeout_ms) {
            return Err(invalid(
                "lease_timeout_ms",
                format!("must be in {LEASE_TIMEOUT_MS_MIN}..={LEASE_TIMEOUT_MS_MAX}; got {}", self.lease_timeout_ms),
            ));
        }
        if !(1..=MAX_ATTEMPTS_MAX).contains(&self.max_attempts) {
            return Err(invalid(
                "max_attempts",
                format!("must be in 1..={MAX_ATTEMPTS_MAX}; got {}", self.max_attempts),
            ));
        }
        if self.dedupe_window_ms > DEDUPE_WINDOW_MS_MAX {
            return Err(invalid(
                "dedupe_window_ms",
                format!("must be at most {DEDUPE_WINDOW_MS_MAX}; got {}", self.dedupe_window_ms),
            ));
        }
        if !(1..=MESSAGE_SIZE_MAX).contains(&self.message_size_max) {
            return Err(invalid(
                "message_size_max",
                format!("must be in 1..={MESSAGE_SIZE_MAX}; got {}", self.message_size_max),
            ));
        }
        if !(1..=MAX_MESSAGES_MAX).contains(&self.max_messages) {
            return Err(invalid(
                "max_messages",
                format!("must be in 1..={MAX_MESSAGES_MAX}; got {}", self.max_messages),
            ));
        }
        if !(MAX_BYTES_MIN..=MAX_BYTES_MAX).contains(&self.max_bytes) {
            return Err(invalid(
                "max_bytes",
                format!("must be in {MAX_BYTES_MIN}..={MAX_BYTES_MAX}; got {}", self.max_bytes),
            ));
        }
        if self.lane_admission.len() != n {
            return Err(invalid(
                "lane_admission",
                format!("one fraction per lane: {n} lanes, {} fractions", self.lane_admission.len()),
            ));
        }
        if let Some(f) = self.lane_admission.iter().find(|f| !(**f > 0.0 && **f <= 1.0)) {
            return Err(invalid("lane_admission", format!("fractions are in (0, 1]; got {f}")));
        }
        if self.message_ttl_ms > MESSAGE_TTL_MS_MAX {
            return Err(invalid(
                "message_ttl_ms",
                format!("must be at most {MESSAGE_TTL_MS_MAX} (0: none); got {}", self.message_ttl_ms),
            ));
        }
        if self.max_delivery_rate > MAX_DELIVERY_RATE_MAX {
            return Err(invalid(
                "max_delivery_rate",
                format!("must be at most {MAX_DELIVERY_RATE_MAX} (0: none); got {}", self.max_delivery_rate),
            ));
        }
        if !(1..=REPLICAS_MAX).contains(&self.replicas) || self.replicas % 2 == 0 {
            return Err(invalid(
                "replicas",
                format!(
                    "must be 1 (this node only) or an odd count up to {REPLICAS_MAX} (the cluster's voters); got {}",
                    self.replicas
                ),
            ));
        }
        let interval_max = ballast_storage::limits::SYNC_INTERVAL_MS_MAX;
        if self.sync_policy == SyncPolicySetting::Interval && !(1..=interval_max).contains(&self.sync_interval_ms) {
            return Err(invalid(
                "sync_interval_ms",
                format!("must be in 1..={interval_max}; got {}", self.sync_interval_ms),
            ));
        }
        Ok(())
    }

    /// These settings with `changes` applied (unset fields keep their
    /// value), validated as on create. A setting the live queue is built on
    /// (its lanes and their order, weights, scheduling, dead-letter queue,
    /// and what its storage logs were opened with) asked for with another
    /// value refuses the whole update, naming it.
    pub fn updated(&self, changes: &SettingsRequest) -> Result<QueueSettings> {
        let fixed = |key: &'static str, differs: bool, why: &str| {
            if differs {
                Err(invalid(
                    key,
                    format!(
                        "{key} cannot change on a live queue ({why}); create a new queue with the settings you need"
                    ),
                ))
            } else {
                Ok(())
            }
        };
        let lanes_why = "each lane is a log on disk, in priority order";
        let storage_why = "the queue's storage logs are opened with it";
        let asked = |value: Option<_>, current| value.is_some_and(|v| v != current);
        fixed("lanes", !changes.lanes.is_empty() && changes.lanes != self.lanes, lanes_why)?;
        let weights = !changes.lane_weights.is_empty() && changes.lane_weights != self.lane_weights;
        fixed("lane_weights", weights, "the lane scheduler is built on them")?;
        fixed(
            "strict_priority",
            asked(changes.strict_priority, self.strict_priority),
            "the lane scheduler is built on it",
        )?;
        fixed("dead_letter", asked(changes.dead_letter, self.dead_letter), "the dead-letter queue exists or not")?;
        let size = changes.message_size_max.is_some_and(|v| v != self.message_size_max);
        fixed("message_size_max", size, storage_why)?;
        fixed("sync_policy", changes.sync_policy.is_some_and(|v| v != self.sync_policy), storage_why)?;
        let interval = changes.sync_interval_ms.is_some_and(|v| v != self.sync_interval_ms);
        fixed("sync_interval_ms", interval, storage_why)?;
        let replicas = changes.replicas.is_some_and(|v| v != self.replicas);
        fixed("replicas", replicas, "the queue's copies are made when it is created")?;
        let updated = QueueSettings {
            default_lane: changes.default_lane.unwrap_or(self.default_lane),
            lease_timeout_ms: changes.lease_timeout_ms.unwrap_or(self.lease_timeout_ms),
            max_attempts: changes.max_attempts.unwrap_or(self.max_attempts),
            max_messages: changes.max_messages.unwrap_or(self.max_messages),
            max_bytes: changes.max_bytes.unwrap_or(self.max_bytes),
            lane_admission: if changes.lane_admission.is_empty() {
                self.lane_admission.clone()
            } else {
                changes.lane_admission.clone()
            },
            max_publish_rate: changes.max_publish_rate.unwrap_or(self.max_publish_rate),
            max_publish_byte_rate: changes.max_publish_byte_rate.unwrap_or(self.max_publish_byte_rate),
            dedupe_window_ms: changes.dedupe_window_ms.unwrap_or(self.dedupe_window_ms),
            message_ttl_ms: changes.message_ttl_ms.unwrap_or(self.message_ttl_ms),
            expired_action: changes.expired_action.unwrap_or(self.expired_action),
            max_delivery_rate: changes.max_delivery_rate.unwrap_or(self.max_delivery_rate),
            ..self.clone()
        };
        updated.validate()?;
        Ok(updated)
    }

    /// The keys whose values differ between two settings, in field order.
    pub fn changed_keys(&self, other: &QueueSettings) -> Vec<&'static str> {
        self.differences(other).into_iter().map(|(key, _)| key).collect()
    }

    /// The first difference between two settings, for ALREADY_EXISTS.
    pub fn difference(&self, other: &QueueSettings) -> Option<String> {
        self.differences(other).into_iter().next().map(|(_, text)| text)
    }

    /// Every field that differs, in field order: its key and "key is X,
    /// asked Y".
    fn differences(&self, other: &QueueSettings) -> Vec<(&'static str, String)> {
        let mut differences = Vec::new();
        macro_rules! compare {
            ($($field:ident),*) => {$(
                if self.$field != other.$field {
                    let key = stringify!($field);
                    differences.push((key, format!("{key} is {:?}, asked {:?}", self.$field, other.$field)));
                }
            )*};
        }
        compare!(
            lanes,
            lane_weights,
            strict_priority,
            default_lane,
            lease_timeout_ms,
            max_attempts,
            dead_letter,
            dedupe_window_ms,
            message_size_max,
            sync_policy,
            sync_interval_ms,
            max_messages,
            max_bytes,
            lane_admission,
            max_publish_rate,
            max_publish_byte_rate,
            message_ttl_ms,
            expired_action,
            max_delivery_rate,
            replicas
        );
        differences
    }

    pub fn lane_count(&self) -> u32 {
        u32::try_from(self.lanes.len()).expect("validated: at most LANES_MAX lanes")
    }

    /// The lanes' sync policy. A replicated queue's lane logs are copies
    /// of what the cluster log already holds durably on a majority: they
    /// are synced every `CLUSTER_SYNC_INTERVAL_MS` and by each sync point
    /// (`cluster::state_machine`), never on a publish's path, whatever
    /// `sync_policy` says (docs/replication.md, "Writing twice").
    pub fn storage_policy(&self) -> ballast_storage::SyncPolicy {
        if self.replicas > 1 {
            return ballast_storage::SyncPolicy::Interval { interval_ms: CLUSTER_SYNC_INTERVAL_MS };
        }
        match self.sync_policy {
            SyncPolicySetting::Fsync => ballast_storage::SyncPolicy::Fsync,
            SyncPolicySetting::Interval => ballast_storage::SyncPolicy::Interval { interval_ms: self.sync_interval_ms },
            SyncPolicySetting::None => ballast_storage::SyncPolicy::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_resolve() {
        let defaults = QueueSettings::default();
        defaults.validate().unwrap();
        assert_eq!(QueueSettings::resolve(&SettingsRequest::default(), &defaults).unwrap(), defaults);
    }

    #[test]
    fn custom_lanes_get_power_of_two_weights_and_middle_default() {
        let request =
            SettingsRequest { lanes: vec!["a".into(), "b".into(), "c".into(), "d".into()], ..Default::default() };
        let s = QueueSettings::resolve(&request, &QueueSettings::default()).unwrap();
        assert_eq!(s.lane_weights, vec![8, 4, 2, 1]);
        assert_eq!(s.default_lane, 2);
    }

    #[test]
    fn limits_are_enforced_with_the_key_named() {
        let d = QueueSettings::default();
        let cases: Vec<(SettingsRequest, &str)> = vec![
            (SettingsRequest { lanes: (0..9).map(|i| format!("l{i}")).collect(), ..Default::default() }, "lanes"),
            (SettingsRequest { lane_weights: vec![1, 2], ..Default::default() }, "lane_weights"),
            (SettingsRequest { lane_weights: vec![0, 1, 1], ..Default::default() }, "lane_weights"),
            (SettingsRequest { default_lane: Some(3), ..Default::default() }, "default_lane"),
            (SettingsRequest { max_attempts: Some(0), ..Default::default() }, "max_attempts"),
            (
                SettingsRequest { message_size_max: Some(MESSAGE_SIZE_MAX + 1), ..Default::default() },
                "message_size_max",
            ),
            (SettingsRequest { lease_timeout_ms: Some(1), ..Default::default() }, "lease_timeout_ms"),
            (SettingsRequest { message_ttl_ms: Some(MESSAGE_TTL_MS_MAX + 1), ..Default::default() }, "message_ttl_ms"),
            (
                SettingsRequest { max_delivery_rate: Some(MAX_DELIVERY_RATE_MAX + 1), ..Default::default() },
                "max_delivery_rate",
            ),
        ];
        for (request, key) in cases {
            match QueueSettings::resolve(&request, &d) {
                Err(BrokerError::InvalidSetting { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: expected InvalidSetting, got {other:?}"),
            }
        }
        let at_limit = SettingsRequest {
            lanes: (0..8).map(|i| format!("l{i}")).collect(),
            message_size_max: Some(MESSAGE_SIZE_MAX),
            message_ttl_ms: Some(MESSAGE_TTL_MS_MAX),
            max_delivery_rate: Some(MAX_DELIVERY_RATE_MAX),
            ..Default::default()
        };
        QueueSettings::resolve(&at_limit, &d).unwrap();
    }
}
