//! The Stats answer as JSON, for the console's API (`crate::console`):
//! the fields of `ballast.v1.StatsResponse` under their proto names, so a
//! script reads the same figures GetStats returns (docs/operating.md).
//! Integers are JSON numbers (exact up to 2^53); an unset
//! `drain_estimate_ms` is `null`.

use ballast_proto::v1 as pb;
use serde_json::{Value, json};

/// A whole StatsResponse.
pub fn stats(response: &pb::StatsResponse) -> Value {
    json!({
        "at_ms": response.at_ms,
        "disk_free_bytes": response.disk_free_bytes,
        "disk_free_min_bytes": response.disk_free_min_bytes,
        "queues": response.queues.iter().map(queue).collect::<Vec<_>>(),
    })
}

/// One queue's stats.
pub fn queue(stats: &pb::QueueStats) -> Value {
    json!({
        "name": stats.name,
        "saturation": saturation(stats.saturation.as_ref()),
        "lanes": stats.lanes.iter().map(lane).collect::<Vec<_>>(),
        "in_flight": stats.in_flight,
        "consumers": stats.consumers,
        "credit": stats.credit,
        "max_messages": stats.max_messages,
        "max_bytes": stats.max_bytes,
        "refused_queue_full": stats.refused_queue_full,
        "refused_disk_full": stats.refused_disk_full,
        "refused_publish_rate": stats.refused_publish_rate,
        "throttled_calls": stats.throttled_calls,
        "throttled_ms": stats.throttled_ms,
        "damaged": stats.damaged,
        "opening": stats.opening,
    })
}

fn lane(stats: &pb::LaneStats) -> Value {
    json!({
        "name": stats.name,
        "saturation": saturation(stats.saturation.as_ref()),
        "admission": stats.admission,
        "in_flight": stats.in_flight,
        "storage_failed": stats.storage_failed,
    })
}

/// A Saturation; all zero when unset (a queue still opening or damaged).
fn saturation(figures: Option<&pb::Saturation>) -> Value {
    let figures = figures.cloned().unwrap_or_default();
    json!({
        "depth": figures.depth,
        "bytes": figures.bytes,
        "saturation": finite(figures.saturation),
        "oldest_age_ms": figures.oldest_age_ms,
        "drain_estimate_ms": figures.drain_estimate_ms,
        "ack_rate": finite(figures.ack_rate),
        "publish_rate": finite(figures.publish_rate),
    })
}

/// JSON has no NaN or infinity: such a value (never expected) is `null`.
fn finite(value: f64) -> Value {
    serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every StatsResponse field is in the JSON under its proto name, an
    /// unset drain estimate is null, and a NaN rate does not break the
    /// document.
    #[test]
    fn fields_keep_their_proto_names() {
        let response = pb::StatsResponse {
            at_ms: 7,
            disk_free_bytes: 100,
            disk_free_min_bytes: 10,
            cluster: None,
            queues: vec![pb::QueueStats {
                name: "jobs".into(),
                saturation: Some(pb::Saturation {
                    depth: 3,
                    bytes: 300,
                    saturation: 0.25,
                    oldest_age_ms: 40,
                    drain_estimate_ms: None,
                    ack_rate: f64::NAN,
                    publish_rate: 2.5,
                }),
                lanes: vec![pb::LaneStats {
                    name: "high".into(),
                    saturation: None,
                    admission: 1.0,
                    in_flight: 1,
                    storage_failed: false,
                }],
                consumers: 2,
                max_messages: 12,
                ..Default::default()
            }],
        };
        let value = stats(&response);
        assert_eq!(value["at_ms"], 7);
        assert_eq!(value["disk_free_min_bytes"], 10);
        let queue = &value["queues"][0];
        assert_eq!(queue["name"], "jobs");
        assert_eq!(queue["saturation"]["depth"], 3);
        assert_eq!(queue["saturation"]["saturation"], 0.25);
        assert_eq!(queue["saturation"]["drain_estimate_ms"], Value::Null);
        assert_eq!(queue["saturation"]["ack_rate"], Value::Null);
        assert_eq!(queue["saturation"]["publish_rate"], 2.5);
        assert_eq!(queue["consumers"], 2);
        assert_eq!(queue["max_messages"], 12);
        assert_eq!(queue["lanes"][0]["name"], "high");
        assert_eq!(queue["lanes"][0]["admission"], 1.0);
        assert_eq!(queue["lanes"][0]["saturation"]["depth"], 0);
    }
}
