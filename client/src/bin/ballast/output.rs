//! Rendering for people (aligned text) and for scripts (`--json`: one JSON
//! object per line).

use std::{
    borrow::Cow,
    io::Write,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ballast_client::{BrokerStats, Delivery, LeaseExtension, PeekedMessage, QueueInfo, Receipt, Redriven, Saturation};
use serde_json::{Value, json};

/// Where command output goes, in the chosen format.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// A new token, shown once, and the auth-file entry holding its hash.
    pub fn token(&self, name: &str, token: &str, token_sha256: &str) -> std::io::Result<()> {
        if self.json {
            return line(&json!({ "name": name, "token": token, "token_sha256": token_sha256 }));
        }
        write(&format!(
            "token: {token}\n\
             (shown once: store it where the client reads it, e.g. a file for --token-file, or BALLAST_TOKEN)\n\n\
             # add to the broker's auth file (--auth-file), with the rules this principal needs:\n\
             [[principals]]\n\
             name = \"{name}\"\n\
             token_sha256 = \"{token_sha256}\"\n\
             allow = []  # rules, e.g. {{ queues = \"orders*\", actions = [\"publish\", \"consume\"] }}\n"
        ))
    }

    pub fn queue(&self, queue: &QueueInfo) -> std::io::Result<()> {
        if self.json {
            return line(&queue_json(queue));
        }
        let settings = &queue.settings;
        let mut text = String::new();
        let mut field = |name: &str, value: String| text.push_str(&format!("{name:<18} {value}\n"));
        field("name", printable(&queue.name).into_owned());
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
                format!("{index}:{}{weight} ({depth})", printable(lane))
            })
            .collect();
        field("lanes", lanes.join(", "));
        field("default lane", optional(settings.default_lane));
        field("strict priority", optional(settings.strict_priority));
        field("lease timeout ms", optional(settings.lease_timeout.map(|d| d.as_millis())));
        field("max attempts", optional(settings.max_attempts));
        field(
            "dead letter queue",
            queue.dead_letter_queue.as_deref().map_or_else(|| "-".into(), |n| printable(n).into_owned()),
        );
        field("dedupe window ms", optional(settings.dedupe_window.map(|d| d.as_millis())));
        field("message size max", optional(settings.message_size_max));
        field("sync policy", settings.sync_policy.map_or("-".into(), |p| p.as_str().to_owned()));
        field("sync interval ms", optional(settings.sync_interval.map(|d| d.as_millis())));
        field("max messages", optional(settings.max_messages));
        field("max bytes", optional(settings.max_bytes));
        field("max publish rate", optional(settings.max_publish_rate));
        field("max publish byte rate", optional(settings.max_publish_byte_rate));
        field("message ttl ms", optional(settings.message_ttl.map(|d| d.as_millis())));
        field("expired action", settings.expired_action.map_or("-".into(), |a| a.as_str().to_owned()));
        field("max delivery rate", optional(settings.max_delivery_rate));
        field("replicas", optional(settings.replicas));
        let admission: Vec<String> = settings.lane_admission.iter().map(|f| f.to_string()).collect();
        field("lane admission", if admission.is_empty() { "-".into() } else { admission.join(", ") });
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
        let width = queues.iter().map(|q| printable(&q.name).chars().count()).max().unwrap_or(0).max("NAME".len());
        let mut text = format!("{:<width$}  {:>10}  {:>9}  {:>9}  LANES\n", "NAME", "DEPTH", "IN FLIGHT", "CONSUMERS");
        for queue in queues {
            text.push_str(&format!(
                "{:<width$}  {:>10}  {:>9}  {:>9}  {}\n",
                printable(&queue.name),
                queue.depth,
                queue.in_flight,
                queue.consumers,
                printable(&queue.settings.lanes.join(","))
            ));
        }
        write(&text)
    }

    pub fn deleted(&self, name: &str) -> std::io::Result<()> {
        if self.json { line(&json!({ "deleted": name })) } else { write(&format!("deleted {}\n", printable(name))) }
    }

    pub fn purged(&self, name: &str, purged: u64) -> std::io::Result<()> {
        if self.json {
            line(&json!({ "queue": name, "purged": purged }))
        } else {
            write(&format!("purged {purged} messages from {}\n", printable(name)))
        }
    }

    pub fn extension(&self, delivery_id: u64, extension: &LeaseExtension) -> std::io::Result<()> {
        let deadline_ms = match extension {
            LeaseExtension::Extended { lease_deadline } => {
                lease_deadline.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis())
            }
            LeaseExtension::Expired | LeaseExtension::NotLeased => 0,
        };
        let outcome = match extension {
            LeaseExtension::Extended { .. } => "extended",
            LeaseExtension::Expired => "expired",
            LeaseExtension::NotLeased => "not leased",
        };
        if self.json {
            let deadline = (deadline_ms > 0).then_some(deadline_ms as u64);
            line(&json!({ "delivery_id": delivery_id, "outcome": outcome, "lease_deadline_ms": deadline }))
        } else if deadline_ms > 0 {
            write(&format!("{delivery_id} {outcome} until {deadline_ms} (Unix ms)\n"))
        } else {
            write(&format!("{delivery_id} {outcome}\n"))
        }
    }

    pub fn redriven(&self, name: &str, done: &Redriven) -> std::io::Result<()> {
        if self.json {
            line(&json!({
                "queue": name,
                "moved": done.moved,
                "already_moved": done.already_moved,
                "skipped_leased": done.skipped_leased,
            }))
        } else {
            write(&format!(
                "moved {} dead letters back to {} ({} already moved before, {} leased and left)\n",
                done.moved,
                printable(name),
                done.already_moved,
                done.skipped_leased
            ))
        }
    }

    pub fn receipt(&self, receipt: &Receipt) -> std::io::Result<()> {
        if self.json {
            line(&json!({
                "id": { "lane": receipt.id.lane, "offset": receipt.id.offset },
                "duplicate": receipt.duplicate,
                "queue_saturation": receipt.queue_saturation.as_ref().map(saturation_json),
                "lane_saturation": receipt.lane_saturation.as_ref().map(saturation_json),
            }))
        } else if receipt.duplicate {
            write(&format!("{} duplicate\n", receipt.id))
        } else {
            write(&format!("{}\n", receipt.id))
        }
    }

    pub fn delivery(&self, delivery: &Delivery) -> std::io::Result<()> {
        if !self.json {
            return write(&format!("{} {}\n", delivery.id, printable(&String::from_utf8_lossy(&delivery.payload))));
        }
        let mut object = json!({
            "id": { "lane": delivery.id.lane, "offset": delivery.id.offset },
            "attempt": delivery.attempt,
            "headers": delivery.headers,
            "idempotency_key": delivery.idempotency_key,
            "published_at_ms": unix_ms(delivery.published_at),
        });
        with_payload(&mut object, &delivery.payload);
        line(&object)
    }

    /// A peeked message: `lane:offset attempts=N age=MS [reason=R] PAYLOAD`,
    /// or one JSON object.
    pub fn peeked(&self, message: &PeekedMessage) -> std::io::Result<()> {
        let age_ms = message.age.as_millis();
        if !self.json {
            let reason = message.reason.as_deref().map(|r| format!(" reason={}", printable(r))).unwrap_or_default();
            let text = String::from_utf8_lossy(&message.payload);
            let payload = printable(&text);
            return write(&format!("{} attempts={} age={age_ms}ms{reason} {payload}\n", message.id, message.attempts));
        }
        let mut object = json!({
            "id": { "lane": message.id.lane, "offset": message.id.offset },
            "attempts": message.attempts,
            "reason": message.reason,
            "age_ms": age_ms as u64,
            "headers": message.headers,
            "idempotency_key": message.idempotency_key,
            "published_at_ms": unix_ms(message.published_at),
        });
        with_payload(&mut object, &message.payload);
        line(&object)
    }

    /// One snapshot: a JSON object, or a table with the disk line under it.
    pub fn stats(&self, stats: &BrokerStats) -> std::io::Result<()> {
        if self.json {
            return line(&stats_json(stats));
        }
        write(&format!("{}{}\n", stats_table(stats), disk_line(stats)))
    }

    /// One update of `ballast top`: on a terminal the screen is cleared and
    /// redrawn in one write (no flicker from partial frames); elsewhere the
    /// frames follow each other, separated by a blank line, with no escape
    /// codes in the output.
    pub fn frame(&self, screen: &Screen, stats: &BrokerStats) -> std::io::Result<()> {
        if self.json {
            return line(&stats_json(stats));
        }
        let header = format!(
            "ballast top  {}  every {} ms  at {}  {}{}",
            screen.addr,
            screen.interval.as_millis(),
            utc_time(stats.at),
            disk_line(stats),
            if screen.terminal { "  (Ctrl-C quits)" } else { "" },
        );
        let body = stats_table(stats);
        if screen.terminal {
            // Home the cursor, clear the screen, draw.
            write(&format!("\x1b[H\x1b[2J{header}\n\n{body}"))
        } else {
            write(&format!("{header}\n{body}\n"))
        }
    }
}

/// What `ballast top` shows above the table.
#[derive(Debug, Clone)]
pub struct Screen {
    pub addr: String,
    pub interval: Duration,
    /// Whether stdout is a terminal (clear and redraw) or not (append).
    pub terminal: bool,
}

/// A row per queue, then a row per lane indented under it.
fn stats_table(stats: &BrokerStats) -> String {
    let width = stats
        .queues
        .iter()
        .flat_map(|queue| {
            std::iter::once(printable(&queue.name).chars().count())
                .chain(queue.lanes.iter().map(|lane| printable(&lane.name).chars().count() + 2))
        })
        .max()
        .unwrap_or(0)
        .max(Row::HEADER[0].len());
    let mut text = Row::header(width);
    if stats.queues.is_empty() {
        text.push_str("(no queues)\n");
    }
    for queue in &stats.queues {
        let row = Row {
            name: printable(&queue.name).into_owned(),
            figures: &queue.saturation,
            admission: "-".into(),
            in_flight: queue.in_flight,
            consumers: queue.consumers.to_string(),
            refused: (queue.refused_queue_full + queue.refused_disk_full + queue.refused_publish_rate).to_string(),
        };
        text.push_str(&row.render(width));
        for lane in &queue.lanes {
            let row = Row {
                name: format!("  {}", printable(&lane.name)),
                figures: &lane.saturation,
                admission: percent(lane.admission, 0),
                in_flight: lane.in_flight,
                consumers: String::new(),
                refused: String::new(),
            };
            text.push_str(&row.render(width));
        }
    }
    text
}

/// One line of the stats table.
struct Row<'a> {
    name: String,
    figures: &'a Saturation,
    admission: String,
    in_flight: u64,
    consumers: String,
    refused: String,
}

impl Row<'_> {
    const HEADER: [&'static str; 12] = [
        "QUEUE / LANE",
        "DEPTH",
        "BYTES",
        "SAT",
        "ADMIT",
        "IN FLIGHT",
        "OLDEST",
        "DRAIN",
        "PUB/S",
        "ACK/S",
        "CONSUMERS",
        "REFUSED",
    ];
    /// Right-aligned widths of the columns after the name.
    const WIDTHS: [usize; 11] = [10, 10, 6, 5, 9, 7, 7, 8, 8, 9, 7];

    fn header(width: usize) -> String {
        Row::line(width, Row::HEADER.map(str::to_owned))
    }

    fn render(&self, width: usize) -> String {
        let figures = self.figures;
        let empty = figures.depth == 0;
        let drain = match figures.drain_estimate {
            _ if empty => "-".to_owned(),
            // Messages wait and nothing was acked recently.
            None => "?".to_owned(),
            Some(estimate) => duration(estimate),
        };
        Row::line(
            width,
            [
                self.name.clone(),
                figures.depth.to_string(),
                bytes(figures.bytes),
                percent(figures.saturation, 1),
                self.admission.clone(),
                self.in_flight.to_string(),
                if empty { "-".to_owned() } else { duration(figures.oldest_age) },
                drain,
                format!("{:.1}", figures.publish_rate),
                format!("{:.1}", figures.ack_rate),
                self.consumers.clone(),
                self.refused.clone(),
            ],
        )
    }

    fn line(width: usize, cells: [String; 12]) -> String {
        let [name, rest @ ..] = cells;
        let mut text = format!("{name:<width$}");
        for (cell, cell_width) in rest.iter().zip(Row::WIDTHS) {
            text.push_str(&format!("  {cell:>cell_width$}"));
        }
        let trimmed = text.trim_end().len();
        text.truncate(trimmed);
        text.push('\n');
        text
    }
}

fn disk_line(stats: &BrokerStats) -> String {
    let disk = format!(
        "disk free {} (publishes refused below {})",
        bytes(stats.disk_free_bytes),
        bytes(stats.disk_free_min_bytes)
    );
    match &stats.cluster {
        None => disk,
        Some(cluster) => {
            let leader = cluster
                .leader
                .as_ref()
                .map_or("none (an election)".to_owned(), |(id, addr)| format!("node {id} at {addr}"));
            format!(
                "{disk}; cluster: node {} is {} in term {}, leader {leader}, applied {} of {}",
                cluster.node_id, cluster.role, cluster.term, cluster.last_applied, cluster.last_log_index
            )
        }
    }
}

fn stats_json(stats: &BrokerStats) -> Value {
    let queues: Vec<Value> = stats
        .queues
        .iter()
        .map(|queue| {
            let mut object = saturation_json(&queue.saturation);
            object["name"] = Value::from(queue.name.clone());
            object["in_flight"] = Value::from(queue.in_flight);
            object["consumers"] = Value::from(queue.consumers);
            object["credit"] = Value::from(queue.credit);
            object["max_messages"] = Value::from(queue.max_messages);
            object["max_bytes"] = Value::from(queue.max_bytes);
            object["refused_queue_full"] = Value::from(queue.refused_queue_full);
            object["refused_disk_full"] = Value::from(queue.refused_disk_full);
            object["refused_publish_rate"] = Value::from(queue.refused_publish_rate);
            object["throttled_calls"] = Value::from(queue.throttled_calls);
            object["throttled_ms"] = Value::from(queue.throttled.as_millis() as u64);
            object["expired_dead_lettered"] = Value::from(queue.expired_dead_lettered);
            object["expired_dropped"] = Value::from(queue.expired_dropped);
            object["paced"] = Value::from(queue.paced);
            object["paced_ms"] = Value::from(queue.paced_time.as_millis() as u64);
            object["paced_held_back"] = Value::from(queue.paced_held_back);
            object["lanes"] = queue
                .lanes
                .iter()
                .map(|lane| {
                    let mut object = saturation_json(&lane.saturation);
                    object["name"] = Value::from(lane.name.clone());
                    object["admission"] = Value::from(lane.admission);
                    object["in_flight"] = Value::from(lane.in_flight);
                    object
                })
                .collect();
            object
        })
        .collect();
    json!({
        "at_ms": unix_ms(stats.at),
        "disk_free_bytes": stats.disk_free_bytes,
        "disk_free_min_bytes": stats.disk_free_min_bytes,
        "queues": queues,
        "cluster": stats.cluster.as_ref().map(|c| json!({
            "node_id": c.node_id,
            "role": c.role,
            "term": c.term,
            "leader_id": c.leader.as_ref().map(|(id, _)| *id),
            "leader_addr": c.leader.as_ref().map(|(_, addr)| addr.clone()),
            "last_log_index": c.last_log_index,
            "last_applied": c.last_applied,
            "peers": c.peers.iter().map(|(id, matched, lag)| json!({"node_id": id, "matched_index": matched, "lag": lag})).collect::<Vec<_>>(),
        })),
    })
}

/// The figures as flat fields; an unknown drain estimate is `null`.
fn saturation_json(figures: &Saturation) -> Value {
    json!({
        "depth": figures.depth,
        "bytes": figures.bytes,
        "saturation": figures.saturation,
        "oldest_age_ms": millis(figures.oldest_age),
        "drain_estimate_ms": figures.drain_estimate.map(millis),
        "ack_rate": figures.ack_rate,
        "publish_rate": figures.publish_rate,
    })
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
            "max_messages": settings.max_messages,
            "max_bytes": settings.max_bytes,
            "lane_admission": settings.lane_admission,
            "max_publish_rate": settings.max_publish_rate,
            "max_publish_byte_rate": settings.max_publish_byte_rate,
            "message_ttl_ms": settings.message_ttl.map(millis),
            "expired_action": settings.expired_action.map(|a| a.as_str()),
            "max_delivery_rate": settings.max_delivery_rate,
            "replicas": settings.replicas,
        },
    })
}

fn millis(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `0.7` as `70.0%` (with `decimals` digits after the point).
fn percent(fraction: f64, decimals: usize) -> String {
    format!("{:.decimals$}%", fraction * 100.0)
}

/// Bytes in binary units: `512 B`, `3.4 KiB`, `1.0 GiB`.
fn bytes(count: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = count as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{count} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// A duration to the precision a person reads at a glance: `850ms`, `4.2s`,
/// `3m07s`, `2h05m`, `3d04h`.
fn duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    let s = duration.as_secs();
    match s {
        _ if ms < 1000 => format!("{ms}ms"),
        0..60 => format!("{:.1}s", duration.as_secs_f64()),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86_400, s / 3600 % 24),
    }
}

/// Time of day in UTC, `HH:MM:SS` (no time-zone database needed).
fn utc_time(time: SystemTime) -> String {
    let s = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("{:02}:{:02}:{:02} UTC", s / 3600 % 24, s / 60 % 60, s % 60)
}

fn optional<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Text from the broker made safe to print on a terminal: control
/// characters (C0, DEL, C1) and the invisible formatting characters that
/// reorder or hide text (bidirectional overrides, zero-width marks) are
/// escaped as `\u{..}`. A payload or a lane name can then neither move the cursor,
/// recolour, retitle or clear the screen (`ballast consume`, `ballast top`)
/// nor pass itself off as other text. `--json` output needs none of this:
/// JSON escapes control characters itself.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if needs_escape(c) {
            escaped.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// Adds a payload to a JSON object: `payload` when it is UTF-8 text, else
/// `payload_hex`.
fn with_payload(object: &mut Value, payload: &[u8]) {
    match std::str::from_utf8(payload) {
        Ok(text) => object["payload"] = Value::from(text),
        Err(_) => object["payload_hex"] = Value::from(hex(payload)),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Units and precisions of the human renderings, at their boundaries.
    #[test]
    fn human_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.0 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(Duration::from_millis(999)), "999ms");
        assert_eq!(duration(Duration::from_millis(4200)), "4.2s");
        assert_eq!(duration(Duration::from_secs(187)), "3m07s");
        assert_eq!(duration(Duration::from_secs(2 * 3600 + 5 * 60)), "2h05m");
        assert_eq!(duration(Duration::from_secs(3 * 86_400 + 4 * 3600)), "3d04h");
        assert_eq!(percent(0.7, 1), "70.0%");
        assert_eq!(percent(0.9, 0), "90%");
        assert_eq!(utc_time(UNIX_EPOCH + Duration::from_secs(86_400 + 3723)), "01:02:03 UTC");
    }

    /// Terminal control sequences, C1 controls and bidirectional overrides
    /// are escaped; ordinary text (tabs and newlines aside) passes unchanged.
    #[test]
    fn printable_escapes_what_a_terminal_would_act_on() {
        assert!(matches!(printable("payment 42 ok, naïve €"), Cow::Borrowed(_)));
        assert_eq!(printable("\x1b[2J\x1b]0;owned\x07"), "\\u{1b}[2J\\u{1b}]0;owned\\u{7}");
        assert_eq!(printable("a\rb\nc\td\x7f\u{9b}"), "a\\u{d}b\\u{a}c\\u{9}d\\u{7f}\\u{9b}");
        assert_eq!(printable("abc\u{202e}fed"), "abc\\u{202e}fed");
    }
}
