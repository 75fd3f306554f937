//! Browsing a queue without leasing: [`Queue::peek`] reads the messages not
//! yet done (waiting, leased or delayed alike), lane by lane in offset
//! order, a page at a time. Nothing about delivery changes: no lease, no
//! attempt, no cursor moves.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::{HEADER_ATTEMPTS, HEADER_DEAD_LETTER_REASON, HEADER_NOT_BEFORE, Queue};

/// One message as [`Queue::peek`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peeked {
    pub lane: u32,
    pub offset: u64,
    pub payload: Bytes,
    /// As a delivery would carry them (a dead letter's broker headers too).
    pub headers: Vec<(String, String)>,
    pub key: Option<Bytes>,
    /// Deliveries made so far: for a dead letter, those of its source
    /// queue (`ballast-attempts`).
    pub attempts: u32,
    /// A dead letter's reason (`ballast-dead-letter-reason`).
    pub reason: Option<String>,
    pub published_at_ms: u64,
}

impl Queue {
    /// Up to `max_messages` messages not yet done, from `start` (lane,
    /// offset; `None`: the first lane's oldest) on, lanes in priority
    /// order; and where the next page starts (`None`: nothing after them).
    /// Only durable records are shown, as only they are delivered.
    pub fn peek(&self, start: Option<(u32, u64)>, max_messages: usize) -> (Vec<Peeked>, Option<(u32, u64)>) {
        let (first_lane, mut from) = start.unwrap_or((0, 0));
        let mut page = Vec::new();
        for lane in first_lane..self.lane_count() {
            let log = &self.lanes[lane as usize];
            let durable = self.durable[lane as usize].load(Ordering::Acquire);
            let mut cursor = log.cursor(from.max(log.stats().ack_floor));
            from = 0;
            while let Some(read) = cursor.next() {
                let record = match read {
                    Ok(record) => record,
                    Err(error) => {
                        tracing::warn!(queue = %self.name, lane, %error, "peek passed over an unreadable range");
                        continue;
                    }
                };
                if record.offset >= durable {
                    break;
                }
                if page.len() == max_messages {
                    return (page, Some((lane, record.offset)));
                }
                page.push(peeked(lane, record));
            }
        }
        (page, None)
    }
}

fn peeked(lane: u32, record: ballast_storage::Record) -> Peeked {
    let header = |name: &str| record.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let attempts = header(HEADER_ATTEMPTS).and_then(|a| a.parse().ok()).unwrap_or(record.attempt);
    let reason = header(HEADER_DEAD_LETTER_REASON);
    Peeked {
        lane,
        offset: record.offset,
        payload: record.payload,
        headers: record.headers.into_iter().filter(|(k, _)| k != HEADER_NOT_BEFORE).collect(),
        key: record.key,
        attempts,
        reason,
        published_at_ms: record.timestamp_ms,
    }
}
