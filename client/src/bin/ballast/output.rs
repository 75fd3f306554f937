//! Rendering for people (aligned text) and for scripts (`--json`: one JSON
//! object per line).

use std::{
    io::Write,
    time::{SystemTime, UNIX_EPOCH},
};

use ballast_client::{Delivery, QueueInfo, Receipt};
use serde_json::{Value, json};

/// Where command output goes, in the chosen format.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    pub fn queue(&self, queue: &QueueInfo) -> std::io::Result<()> {
        if self.json {
            return line(&queue_json(queue));
        }
        let settings = &queue.settings;
        let mut text = String::new();
        let mut field = |name: &str, value: String| text.push_str(&format!("{name:<18} {value}\n"));
        field("name", queue.name.clone());
        field("depth", queue.depth.to_string());
        field("in flight", queue.in_flight.to_string());
        field("consumers", queue.consumers.to_string());
        let lanes: Vec<String> = settings
            .lanes
            .iter()
            .enumerate()
            .map(|(index, lane)| {
                let weight = settings.lane_weights.get(index).map_or(String::new(), |w| format!(" w{w}"));
                let depth = queue.lane_depths.get(index).copied().unwrap_or(0);
                format!("{index}:{lane}{weight} ({depth})")
            })
            .collect();
        field("lanes", lanes.join(", "));
        field("default lane", optional(settings.default_lane));
        field("strict priority", optional(settings.strict_priority));
        field("lease timeout ms", optional(settings.lease_timeout.map(|d| d.as_millis())));
        field("max attempts", optional(settings.max_attempts));
        field("dead letter queue", queue.dead_letter_queue.clone().unwrap_or_else(|| "-".into()));
        field("dedupe window ms", optional(settings.dedupe_window.map(|d| d.as_millis())));
        field("message size max", optional(settings.message_size_max));
        field("sync policy", settings.sync_policy.map_or("-".into(), |p| p.as_str().to_owned()));
        field("sync interval ms", optional(settings.sync_interval.map(|d| d.as_millis())));
        field("created at ms", unix_ms(queue.created_at).to_string());
        write(&text)
    }

    pub fn queues(&self, queues: &[QueueInfo]) -> std::io::Result<()> {
        if self.json {
            for queue in queues {
                line(&queue_json(queue))?;
            }
            return Ok(());
        }
        let width = queues.iter().map(|q| q.name.len()).max().unwrap_or(0).max("NAME".len());
        let mut text = format!("{:<width$}  {:>10}  {:>9}  {:>9}  LANES\n", "NAME", "DEPTH", "IN FLIGHT", "CONSUMERS");
        for queue in queues {
            text.push_str(&format!(
                "{:<width$}  {:>10}  {:>9}  {:>9}  {}\n",
                queue.name,
                queue.depth,
                queue.in_flight,
                queue.consumers,
                queue.settings.lanes.join(",")
            ));
        }
        write(&text)
    }

    pub fn deleted(&self, name: &str) -> std::io::Result<()> {
        if self.json { line(&json!({ "deleted": name })) } else { write(&format!("deleted {name}\n")) }
    }

    pub fn purged(&self, name: &str, purged: u64) -> std::io::Result<()> {
        if self.json {
            line(&json!({ "queue": name, "purged": purged }))
        } else {
            write(&format!("purged {purged} messages from {name}\n"))
        }
    }

    pub fn receipt(&self, receipt: &Receipt) -> std::io::Result<()> {
        if self.json {
            line(&json!({
                "id": { "lane": receipt.id.lane, "offset": receipt.id.offset },
                "duplicate": receipt.duplicate,
            }))
        } else if receipt.duplicate {
            write(&format!("{} duplicate\n", receipt.id))
        } else {
            write(&format!("{}\n", receipt.id))
        }
    }

    pub fn delivery(&self, delivery: &Delivery) -> std::io::Result<()> {
        if !self.json {
            return write(&format!("{} {}\n", delivery.id, String::from_utf8_lossy(&delivery.payload)));
        }
        let mut object = json!({
            "id": { "lane": delivery.id.lane, "offset": delivery.id.offset },
            "attempt": delivery.attempt,
            "headers": delivery.headers,
            "idempotency_key": delivery.idempotency_key,
            "published_at_ms": unix_ms(delivery.published_at),
        });
        match std::str::from_utf8(&delivery.payload) {
            Ok(text) => object["payload"] = Value::from(text),
            Err(_) => object["payload_hex"] = Value::from(hex(&delivery.payload)),
        }
        line(&object)
    }
}

fn queue_json(queue: &QueueInfo) -> Value {
    let settings = &queue.settings;
    json!({
        "name": queue.name,
        "depth": queue.depth,
        "in_flight": queue.in_flight,
        "consumers": queue.consumers,
        "lane_depths": queue.lane_depths,
        "dead_letter_queue": queue.dead_letter_queue,
        "created_at_ms": unix_ms(queue.created_at),
        "settings": {
            "lanes": settings.lanes,
            "lane_weights": settings.lane_weights,
            "strict_priority": settings.strict_priority,
            "default_lane": settings.default_lane,
            "lease_timeout_ms": settings.lease_timeout.map(millis),
            "max_attempts": settings.max_attempts,
            "dead_letter": settings.dead_letter,
            "dedupe_window_ms": settings.dedupe_window.map(millis),
            "message_size_max": settings.message_size_max,
            "sync_policy": settings.sync_policy.map(|p| p.as_str()),
            "sync_interval_ms": settings.sync_interval.map(millis),
        },
    })
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn optional<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn line(value: &Value) -> std::io::Result<()> {
    write(&format!("{value}\n"))
}

/// Writes to stdout in one call, so lines from concurrent handlers do not
/// interleave; a closed pipe (`| head`) is an error the caller ends on.
fn write(text: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}
