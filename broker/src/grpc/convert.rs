//! Protocol messages to domain types and back. Everything the client sends
//! is checked here or in the domain layer; nothing here panics on input.

use ballast_proto::v1 as pb;
use bytes::Bytes;

use crate::{
    broker::{DamagedQueue, OpeningQueue},
    error::{BrokerError, Result},
    queue::{
        Delivery, ExpiredAction, Extension, Figures, Peeked, Publish, Queue, QueueSettings, Receipt, SettingsRequest,
        SyncPolicySetting,
    },
};

pub fn settings_request(settings: Option<pb::QueueSettings>) -> Result<SettingsRequest> {
    let Some(s) = settings else { return Ok(SettingsRequest::default()) };
    let sync_policy = match pb::SyncPolicy::try_from(s.sync_policy) {
        Ok(pb::SyncPolicy::Unspecified) => None,
        Ok(pb::SyncPolicy::Fsync) => Some(SyncPolicySetting::Fsync),
        Ok(pb::SyncPolicy::Interval) => Some(SyncPolicySetting::Interval),
        Ok(pb::SyncPolicy::None) => Some(SyncPolicySetting::None),
        Err(_) => {
            return Err(BrokerError::InvalidSetting {
                key: "sync_policy",
                message: format!("unknown value {}; use FSYNC, INTERVAL or NONE", s.sync_policy),
            });
        }
    };
    let expired_action = match pb::ExpiredAction::try_from(s.expired_action) {
        Ok(pb::ExpiredAction::Unspecified) => None,
        Ok(pb::ExpiredAction::DeadLetter) => Some(ExpiredAction::DeadLetter),
        Ok(pb::ExpiredAction::Drop) => Some(ExpiredAction::Drop),
        Err(_) => {
            return Err(BrokerError::InvalidSetting {
                key: "expired_action",
                message: format!("unknown value {}; use DEAD_LETTER or DROP", s.expired_action),
            });
        }
    };
    Ok(SettingsRequest {
        message_ttl_ms: s.message_ttl_ms,
        expired_action,
        max_delivery_rate: s.max_delivery_rate,
        replicas: s.replicas,
        lanes: s.lanes,
        lane_weights: s.lane_weights,
        strict_priority: s.strict_priority,
        default_lane: s.default_lane,
        lease_timeout_ms: s.lease_timeout_ms,
        max_attempts: s.max_attempts,
        dead_letter: s.dead_letter,
        dedupe_window_ms: s.dedupe_window_ms,
        message_size_max: s.message_size_max,
        sync_policy,
        sync_interval_ms: s.sync_interval_ms,
        max_messages: s.max_messages,
        max_bytes: s.max_bytes,
        lane_admission: s.lane_admission,
        max_publish_rate: s.max_publish_rate,
        max_publish_byte_rate: s.max_publish_byte_rate,
    })
}

pub fn settings(s: &QueueSettings) -> pb::QueueSettings {
    let sync_policy = match s.sync_policy {
        SyncPolicySetting::Fsync => pb::SyncPolicy::Fsync,
        SyncPolicySetting::Interval => pb::SyncPolicy::Interval,
        SyncPolicySetting::None => pb::SyncPolicy::None,
    };
    pb::QueueSettings {
        lanes: s.lanes.clone(),
        lane_weights: s.lane_weights.clone(),
        strict_priority: Some(s.strict_priority),
        default_lane: Some(s.default_lane),
        lease_timeout_ms: Some(s.lease_timeout_ms),
        max_attempts: Some(s.max_attempts),
        dead_letter: Some(s.dead_letter),
        dedupe_window_ms: Some(s.dedupe_window_ms),
        message_size_max: Some(s.message_size_max),
        sync_policy: sync_policy.into(),
        sync_interval_ms: Some(s.sync_interval_ms),
        max_messages: Some(s.max_messages),
        max_bytes: Some(s.max_bytes),
        lane_admission: s.lane_admission.clone(),
        max_publish_rate: Some(s.max_publish_rate),
        max_publish_byte_rate: Some(s.max_publish_byte_rate),
        message_ttl_ms: Some(s.message_ttl_ms),
        max_delivery_rate: Some(s.max_delivery_rate),
        replicas: Some(s.replicas),
        expired_action: match s.expired_action {
            ExpiredAction::DeadLetter => pb::ExpiredAction::DeadLetter,
            ExpiredAction::Drop => pb::ExpiredAction::Drop,
        }
        .into(),
    }
}

pub fn queue_info(queue: &Queue) -> pb::QueueInfo {
    let stats = queue.stats();
    pb::QueueInfo {
        name: queue.name.to_string(),
        settings: Some(settings(&queue.settings())),
        dead_letter_queue: queue.dead_letter_name().unwrap_or_default(),
        depth: stats.lane_depths.iter().sum(),
        lane_depths: stats.lane_depths,
        in_flight: stats.in_flight,
        consumers: stats.consumers,
        created_at_ms: queue.created_at_ms,
        damaged: String::new(),
        opening: false,
    }
}

/// A queue not open yet as ListQueues shows it: what its `queue.toml`
/// says.
pub fn opening_info(queue: &OpeningQueue) -> pb::QueueInfo {
    pb::QueueInfo {
        name: queue.name.to_string(),
        settings: Some(settings(&queue.settings)),
        dead_letter_queue: if queue.settings.dead_letter {
            format!("{}{}", queue.name, crate::limits::DEAD_LETTER_SUFFIX)
        } else {
            String::new()
        },
        created_at_ms: queue.created_at_ms,
        opening: true,
        ..pb::QueueInfo::default()
    }
}

/// A queue not open yet as Stats shows it: its name and limits.
pub fn opening_stats(queue: &OpeningQueue) -> pb::QueueStats {
    pb::QueueStats {
        name: queue.name.to_string(),
        max_messages: queue.settings.max_messages,
        max_bytes: queue.settings.max_bytes,
        opening: true,
        ..pb::QueueStats::default()
    }
}

/// A damaged queue as ListQueues and GetQueue show it: its name and why.
pub fn damaged_info(queue: &DamagedQueue) -> pb::QueueInfo {
    pb::QueueInfo { name: queue.name.to_string(), damaged: queue.error().to_string(), ..pb::QueueInfo::default() }
}

/// A damaged queue as Stats shows it: its name and why.
pub fn damaged_stats(queue: &DamagedQueue) -> pb::QueueStats {
    pb::QueueStats { name: queue.name.to_string(), damaged: queue.error().to_string(), ..pb::QueueStats::default() }
}

pub fn publish(message: Option<pb::Message>) -> Result<Publish> {
    let m = message.ok_or_else(|| BrokerError::InvalidArgument("the request has no message".into()))?;
    let mut headers: Vec<(String, String)> = m.headers.into_iter().collect();
    headers.sort_unstable();
    Ok(Publish {
        payload: m.payload,
        headers,
        key: (!m.idempotency_key.is_empty()).then(|| Bytes::from(m.idempotency_key)),
        lane: m.lane,
        delay_ms: m.delay_ms,
        ttl_ms: m.ttl_ms,
    })
}

/// A PublishStream request's failure: the status a unary publish would
/// have ended with, its ASCII metadata (retry-after, the refusal's
/// figures) kept as a map.
pub fn publish_error(status: &tonic::Status) -> pb::PublishError {
    let metadata = status
        .metadata()
        .iter()
        .filter_map(|entry| match entry {
            tonic::metadata::KeyAndValueRef::Ascii(key, value) => {
                Some((key.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            }
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .collect();
    pb::PublishError { code: status.code() as i32, message: status.message().to_owned(), metadata }
}

/// Receipts with the queue's figures taken once after the publish.
pub fn receipts(queue: &Queue, receipts: Vec<Receipt>) -> Vec<pb::Receipt> {
    let (total, lanes) = queue.figures();
    receipts
        .into_iter()
        .map(|r| pb::Receipt {
            id: Some(pb::MessageId { lane: r.lane, offset: r.offset }),
            duplicate: r.duplicate,
            queue: Some(saturation(&total)),
            lane: lanes.get(r.lane as usize).map(saturation),
        })
        .collect()
}

pub fn saturation(f: &Figures) -> pb::Saturation {
    pb::Saturation {
        depth: f.depth,
        bytes: f.bytes,
        saturation: f.saturation,
        oldest_age_ms: f.oldest_age_ms,
        drain_estimate_ms: f.drain_estimate_ms,
        ack_rate: f.ack_rate,
        publish_rate: f.publish_rate,
    }
}

/// Stats of one queue.
pub fn queue_stats(queue: &Queue) -> pb::QueueStats {
    let (total, lanes) = queue.figures();
    let delivery = queue.delivery_figures();
    let refused = queue.refused_count();
    pb::QueueStats {
        name: queue.name.to_string(),
        saturation: Some(saturation(&total)),
        lanes: lanes
            .iter()
            .enumerate()
            .map(|(i, f)| pb::LaneStats {
                name: queue.settings().lanes[i].clone(),
                saturation: Some(saturation(f)),
                admission: queue.settings().lane_admission[i],
                in_flight: delivery.lane_in_flight.get(i).copied().unwrap_or(0),
                storage_failed: !queue.lane_writable(i),
            })
            .collect(),
        in_flight: delivery.in_flight,
        consumers: delivery.consumers,
        credit: delivery.credit,
        max_messages: queue.settings().max_messages,
        max_bytes: queue.settings().max_bytes,
        refused_queue_full: refused.queue_full,
        refused_disk_full: refused.disk_low,
        refused_publish_rate: refused.publish_rate,
        throttled_calls: refused.throttled,
        throttled_ms: refused.throttled_ms,
        expired_dead_lettered: delivery.expired_dead_lettered,
        expired_dropped: delivery.expired_dropped,
        paced: delivery.pacing.paced,
        paced_ms: delivery.pacing.paced_ms,
        paced_held_back: delivery.pacing.held_back,
        damaged: String::new(),
        opening: false,
    }
}

pub fn delivery(d: Delivery) -> pb::Delivery {
    pb::Delivery {
        delivery_id: d.delivery_id,
        id: Some(pb::MessageId { lane: d.lane, offset: d.offset }),
        payload: d.payload,
        headers: d.headers.into_iter().collect(),
        idempotency_key: d.key.map(|k| String::from_utf8_lossy(&k).into_owned()).unwrap_or_default(),
        attempt: d.attempt,
        published_at_ms: d.published_at_ms,
        lease_deadline_ms: d.lease_deadline_ms,
        lease_ms: d.lease_ms,
    }
}

/// A peeked message, its age taken at `now_ms`.
pub fn peeked(p: Peeked, now_ms: u64) -> pb::PeekedMessage {
    pb::PeekedMessage {
        id: Some(pb::MessageId { lane: p.lane, offset: p.offset }),
        payload: p.payload,
        headers: p.headers.into_iter().collect(),
        idempotency_key: p.key.map(|k| String::from_utf8_lossy(&k).into_owned()).unwrap_or_default(),
        attempts: p.attempts,
        reason: p.reason.unwrap_or_default(),
        published_at_ms: p.published_at_ms,
        age_ms: now_ms.saturating_sub(p.published_at_ms),
    }
}

/// One result per extended id, in request order.
pub fn extensions(delivery_ids: &[u64], extensions: Vec<Extension>) -> Vec<pb::ExtendResult> {
    delivery_ids
        .iter()
        .zip(extensions)
        .map(|(&delivery_id, extension)| {
            let (outcome, lease_deadline_ms) = match extension {
                Extension::Extended { lease_deadline_ms } => (pb::ExtendOutcome::Extended, lease_deadline_ms),
                Extension::Expired => (pb::ExtendOutcome::Expired, 0),
                Extension::NotLeased => (pb::ExtendOutcome::NotLeased, 0),
            };
            pb::ExtendResult { delivery_id, outcome: outcome.into(), lease_deadline_ms }
        })
        .collect()
}

/// The cluster figures of GetStats.
pub fn cluster_status(status: &crate::cluster::node::ClusterStatus) -> pb::ClusterStatus {
    pb::ClusterStatus {
        node_id: status.node_id,
        role: status.role.to_owned(),
        term: status.term,
        leader_id: status.leader_id.unwrap_or(0),
        leader_addr: status.leader_addr.clone().unwrap_or_default(),
        last_log_index: status.last_log_index,
        last_applied: status.last_applied,
        peers: status
            .peers
            .iter()
            .map(|&(node_id, matched_index)| pb::PeerStatus {
                node_id,
                matched_index,
                lag: status.last_log_index.saturating_sub(matched_index),
            })
            .collect(),
    }
}
