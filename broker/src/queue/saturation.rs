//! Saturation: how full a queue and its lanes are, how fast they move, and
//! the admission decision that sheds the lowest lanes first.
//!
//! Figures are cheap to take (two locks per lane and, when the ack floor
//! moved, one record read for the oldest age), so every publish receipt
//! carries them. Rates are exponentially smoothed once per
//! [`STATS_TICK_MS`] by the broker's stats task.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use super::Queue;
use crate::{
    error::{BrokerError, Refusal, RefusalReason, Result},
    limits::{RATE_SMOOTHING, RETRY_AFTER_MS_MAX, RETRY_AFTER_MS_MIN, RETRY_AFTER_MS_UNKNOWN, STATS_TICK_MS},
    now_ms,
};

/// Saturation figures of a queue or a lane.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Figures {
    /// Messages not yet acked (in-flight included).
    pub depth: u64,
    /// Stored size of those messages' records: 0 for an empty lane.
    pub bytes: u64,
    /// max(depth / max_messages, bytes / max_bytes).
    pub saturation: f64,
    pub oldest_age_ms: u64,
    /// depth / ack rate; `None` when nothing was acked recently.
    pub drain_estimate_ms: Option<u64>,
    pub ack_rate: f64,
    pub publish_rate: f64,
    /// Stored bytes of acked (or dead-lettered) records per second,
    /// smoothed like `ack_rate`: the drain rate of `bytes`.
    pub ack_byte_rate: f64,
}

/// Per-lane counters, smoothed rates and exported metrics.
#[derive(Debug)]
pub(crate) struct LaneMeter {
    pub metrics: crate::metrics::LazyLaneMetrics,
    pub published: AtomicU64,
    pub acked: AtomicU64,
    /// Stored bytes of the records counted in `acked`.
    pub acked_bytes: AtomicU64,
    /// Bytes of the lane's records not yet done (acked, dead-lettered or
    /// purged), each counted at its stored size (`ballast_storage::stored_size`).
    /// Taken from `Log::pending_bytes` on open; appends add their records,
    /// acks take theirs off. It cannot drift from the log, except for
    /// records storage quarantines, after which `Queue::recount_bytes`
    /// resets it from the log.
    pub backlog_bytes: AtomicU64,
    /// Makes a change to the lane's log and to `backlog_bytes` one step for
    /// the operations that set the count from the log (purge, recount):
    /// they hold it exclusively; appends and acks hold it shared, so they
    /// never wait for each other (an append's write is not an ack's
    /// business: each only adds or takes off its own records' bytes).
    pub backlog_sync: RwLock<()>,
    rates: Mutex<Rates>,
    /// `(ack floor, timestamp of the record there)`: the oldest message's
    /// age is re-read only when the floor moves.
    oldest: Mutex<Option<(u64, u64)>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Rates {
    last_published: u64,
    last_acked: u64,
    last_acked_bytes: u64,
    publish_rate: f64,
    ack_rate: f64,
    ack_byte_rate: f64,
}

/// Messages and bytes admitted whose records may not be in their logs yet.
/// Admission adds them to the logs' counts, and checks and reserves under
/// one lock, so batches admitted at the same time cannot all take the
/// queue's last room.
#[derive(Debug, Default)]
pub(crate) struct Admitting {
    /// `(messages, bytes)` of the batches between admission and append.
    counts: Mutex<(u64, u64)>,
}

/// A batch's admitted counts, reserved until the batch is in its logs (or
/// failed to get there): dropping it releases them, however the append
/// ended. Between the append and the drop the batch counts twice, which
/// errs towards refusing, never towards overshooting.
#[must_use = "the reservation ends when this drops"]
pub(crate) struct Admitted<'a> {
    admitting: &'a Admitting,
    messages: u64,
    bytes: u64,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut counts = self.admitting.counts.lock();
        counts.0 -= self.messages;
        counts.1 -= self.bytes;
    }
}

/// Counters of refused publishes.
#[derive(Debug, Default)]
pub(crate) struct Refused {
    pub queue_full: AtomicU64,
    pub disk_full: AtomicU64,
    pub publish_rate: AtomicU64,
    /// Not refusals: publish calls that waited for their quota turn, and
    /// their waits in microseconds.
    pub throttled: AtomicU64,
    pub throttled_us: AtomicU64,
}

impl LaneMeter {
    /// A meter for a lane whose log holds `backlog_bytes` of records not
    /// yet done.
    pub(crate) fn new(backlog_bytes: u64) -> LaneMeter {
        LaneMeter {
            metrics: crate::metrics::LazyLaneMetrics::default(),
            published: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            acked_bytes: AtomicU64::new(0),
            backlog_bytes: AtomicU64::new(backlog_bytes),
            backlog_sync: RwLock::new(()),
            rates: Mutex::new(Rates::default()),
            oldest: Mutex::new(None),
        }
    }

    /// Folds the counts since the last tick into the smoothed rates.
    pub(crate) fn tick(&self, seconds: f64) {
        let published = self.published.load(Ordering::Relaxed);
        let acked = self.acked.load(Ordering::Relaxed);
        let acked_bytes = self.acked_bytes.load(Ordering::Relaxed);
        let mut r = self.rates.lock();
        let smooth = |old: f64, delta: u64| {
            let now = delta as f64 / seconds;
            if old == 0.0 { now } else { RATE_SMOOTHING * now + (1.0 - RATE_SMOOTHING) * old }
        };
        r.publish_rate = smooth(r.publish_rate, published - r.last_published);
        r.ack_rate = smooth(r.ack_rate, acked - r.last_acked);
        r.ack_byte_rate = smooth(r.ack_byte_rate, acked_bytes - r.last_acked_bytes);
        // Below one message per ten ticks the rate is noise: call it zero.
        let floor = 0.1 / (STATS_TICK_MS as f64 / 1000.0);
        if r.ack_rate < floor && acked == r.last_acked {
            r.ack_rate = 0.0;
            r.ack_byte_rate = 0.0;
        }
        if r.publish_rate < floor && published == r.last_published {
            r.publish_rate = 0.0;
        }
        r.last_published = published;
        r.last_acked = acked;
        r.last_acked_bytes = acked_bytes;
    }

    /// `(publish rate, ack rate, ack byte rate)`.
    fn rates(&self) -> (f64, f64, f64) {
        let r = self.rates.lock();
        (r.publish_rate, r.ack_rate, r.ack_byte_rate)
    }
}

impl Queue {
    fn saturation_of(&self, depth: u64, bytes: u64) -> f64 {
        let s = self.settings();
        (depth as f64 / s.max_messages as f64).max(bytes as f64 / s.max_bytes as f64)
    }

    /// Figures of one lane.
    pub fn lane_figures(&self, lane: u32) -> Figures {
        self.lane_figures_with(lane, true)
    }

    /// With `read_oldest` false, the oldest age comes only from the cache
    /// (no record read): what a refusal uses, so refusing touches no file.
    fn lane_figures_with(&self, lane: u32, read_oldest: bool) -> Figures {
        let log = &self.lanes[lane as usize];
        let meter = &self.meters[lane as usize];
        let stats = log.stats();
        let (publish_rate, ack_rate, ack_byte_rate) = meter.rates();
        let now = now_ms();
        let oldest_age_ms = if stats.pending == 0 {
            0
        } else {
            let mut oldest = meter.oldest.lock();
            let timestamp = match *oldest {
                Some((floor, timestamp)) if floor == stats.ack_floor => Some(timestamp),
                Some((_, timestamp)) if !read_oldest => Some(timestamp),
                None if !read_oldest => None,
                _ => {
                    let read = match log.read(stats.ack_floor) {
                        Ok(record) => Some(record.timestamp_ms),
                        Err(ballast_storage::ReadError::Corrupt { .. }) => {
                            // Quarantined: the lane's byte count follows.
                            self.recount_bytes(lane as usize);
                            None
                        }
                        Err(_) => None,
                    };
                    if let Some(timestamp) = read {
                        *oldest = Some((stats.ack_floor, timestamp));
                    }
                    read
                }
            };
            timestamp.map_or(0, |t| now.saturating_sub(t))
        };
        let bytes = meter.backlog_bytes.load(Ordering::Relaxed);
        Figures {
            depth: stats.pending,
            bytes,
            saturation: self.saturation_of(stats.pending, bytes),
            oldest_age_ms,
            drain_estimate_ms: drain_estimate(stats.pending, ack_rate),
            ack_rate,
            publish_rate,
            ack_byte_rate,
        }
    }

    /// Figures of every lane and of the queue as a whole.
    pub fn figures(&self) -> (Figures, Vec<Figures>) {
        self.figures_with(true)
    }

    pub(super) fn figures_with(&self, read_oldest: bool) -> (Figures, Vec<Figures>) {
        let lanes: Vec<Figures> = (0..self.lane_count()).map(|l| self.lane_figures_with(l, read_oldest)).collect();
        let depth = lanes.iter().map(|f| f.depth).sum();
        let bytes = lanes.iter().map(|f| f.bytes).sum();
        let ack_rate = lanes.iter().map(|f| f.ack_rate).sum();
        let total = Figures {
            depth,
            bytes,
            saturation: self.saturation_of(depth, bytes),
            oldest_age_ms: lanes.iter().map(|f| f.oldest_age_ms).max().unwrap_or(0),
            drain_estimate_ms: drain_estimate(depth, ack_rate),
            ack_rate,
            publish_rate: lanes.iter().map(|f| f.publish_rate).sum(),
            ack_byte_rate: lanes.iter().map(|f| f.ack_byte_rate).sum(),
        };
        (total, lanes)
    }

    /// Refreshes the smoothed rates (the broker's stats task calls this).
    pub(crate) fn tick(&self, seconds: f64) {
        for meter in &self.meters {
            meter.tick(seconds);
        }
    }

    /// Admission: may `adding[lane] = (messages, bytes)` be stored? A lane is
    /// admitted while the queue, with the batches admitted but not yet
    /// appended, stays within the lane's fraction of `max_messages` and
    /// `max_bytes`. An admitted batch is reserved in the same step; the
    /// caller holds the reservation until its append ended. Takes no disk
    /// I/O beyond what the figures need, and stores nothing.
    pub(crate) fn admit(&self, adding: &[(u64, u64)]) -> Result<Admitted<'_>> {
        // One snapshot for the whole decision, even if an update lands meanwhile.
        let settings = self.settings();
        if let Some(free) = self.node.disk_low() {
            self.refused.disk_full.fetch_add(1, Ordering::Relaxed);
            let (total, _) = self.figures_with(false);
            let lane = adding.iter().position(|(n, _)| *n > 0).unwrap_or(0);
            self.lane_metrics(lane).refused_disk_low.increment(1);
            return Err(BrokerError::Refused(Box::new(Refusal {
                queue: self.name.to_string(),
                lane: settings.lanes[lane].clone(),
                lane_index: lane_index(lane),
                figures: total,
                threshold: settings.lane_admission[lane],
                retry_after_ms: RETRY_AFTER_MS_MAX.min(10_000),
                reason: RefusalReason::DiskLow { free, min: self.node.disk_free_min() },
            })));
        }
        let mut admitting = self.admitting.counts.lock();
        let (mut depth, mut bytes) = *admitting;
        for (log, meter) in self.lanes.iter().zip(&self.meters) {
            depth += log.stats().pending;
            bytes += meter.backlog_bytes.load(Ordering::Relaxed);
        }
        let new_messages: u64 = adding.iter().map(|(n, _)| n).sum();
        let new_bytes: u64 = adding.iter().map(|(_, b)| b).sum();
        for (lane, &(n, _)) in adding.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let threshold = settings.lane_admission[lane];
            let max_messages = (settings.max_messages as f64 * threshold).floor() as u64;
            let max_bytes = (settings.max_bytes as f64 * threshold).floor() as u64;
            if new_messages > max_messages || new_bytes > max_bytes {
                drop(admitting);
                // Not even an empty queue would take it: retrying cannot help.
                return Err(BrokerError::InvalidArgument(format!(
                    "a batch of {new_messages} messages ({new_bytes} bytes) exceeds lane {}'s share of queue {} even when \
                     the queue is empty: {:.0}% of max_messages is {max_messages} and of max_bytes {max_bytes}; split \
                     the batch, or publish to a higher lane",
                    settings.lanes[lane],
                    self.name,
                    threshold * 100.0
                )));
            }
            let excess_messages = (depth + new_messages).saturating_sub(max_messages);
            let excess_bytes = (bytes + new_bytes).saturating_sub(max_bytes);
            if excess_messages > 0 || excess_bytes > 0 {
                drop(admitting);
                self.refused.queue_full.fetch_add(1, Ordering::Relaxed);
                self.lane_metrics(lane).refused_queue_full.increment(1);
                let (total, _) = self.figures_with(false);
                return Err(BrokerError::Refused(Box::new(Refusal {
                    queue: self.name.to_string(),
                    lane: settings.lanes[lane].clone(),
                    lane_index: lane_index(lane),
                    figures: total,
                    threshold,
                    retry_after_ms: retry_after_ms(excess_messages, excess_bytes, &total),
                    reason: RefusalReason::QueueFull {
                        max_messages: settings.max_messages,
                        max_bytes: settings.max_bytes,
                        batch_messages: new_messages,
                        batch_bytes: new_bytes,
                        lane_max_messages: max_messages,
                        lane_max_bytes: max_bytes,
                        excess_messages,
                        excess_bytes,
                    },
                })));
            }
        }
        admitting.0 += new_messages;
        admitting.1 += new_bytes;
        Ok(Admitted { admitting: &self.admitting, messages: new_messages, bytes: new_bytes })
    }
}

/// The retry-after hint of a refusal: how long consumers need, at the
/// queue's smoothed drain rates, to take the queue back under the lane's
/// share of both limits, that is
/// `max(excess_messages / ack_rate, excess_bytes / ack_byte_rate)`, clamped
/// to `RETRY_AFTER_MS_MIN..=RETRY_AFTER_MS_MAX`. When an excess has no
/// drain rate to go by (nothing acked recently), `RETRY_AFTER_MS_UNKNOWN`.
fn retry_after_ms(excess_messages: u64, excess_bytes: u64, figures: &Figures) -> u64 {
    let wait = |excess: u64, rate: f64| match excess {
        0 => Some(0.0),
        _ if rate > 0.0 => Some(excess as f64 / rate * 1000.0),
        _ => None,
    };
    match (wait(excess_messages, figures.ack_rate), wait(excess_bytes, figures.ack_byte_rate)) {
        (Some(messages), Some(bytes)) => (messages.max(bytes) as u64).clamp(RETRY_AFTER_MS_MIN, RETRY_AFTER_MS_MAX),
        _ => RETRY_AFTER_MS_UNKNOWN,
    }
}

/// A lane's position as it travels (`u32`); lanes are at most `LANES_MAX`.
fn lane_index(lane: usize) -> u32 {
    u32::try_from(lane).expect("at most LANES_MAX lanes")
}

fn drain_estimate(depth: u64, ack_rate: f64) -> Option<u64> {
    if depth == 0 {
        return Some(0);
    }
    (ack_rate > 0.0).then(|| (depth as f64 / ack_rate * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(excess: (u64, u64), rates: (f64, f64), expected_ms: u64) {
        let figures = Figures { ack_rate: rates.0, ack_byte_rate: rates.1, ..Figures::default() };
        assert_eq!(retry_after_ms(excess.0, excess.1, &figures), expected_ms, "excess {excess:?}, rates {rates:?}");
    }

    /// The hint is the longer of the two drains, clamped; unknown without a
    /// rate for an excess that needs one.
    #[test]
    fn retry_after_covers_both_excesses() {
        // 50 messages at 100/s: 500 ms; no byte excess.
        check((50, 0), (100.0, 0.0), 500);
        // Byte excess only: 200,000 bytes at 100,000 B/s is 2 s, whatever
        // the message rate says.
        check((0, 200_000), (100.0, 100_000.0), 2_000);
        // Both: the longer wins.
        check((50, 200_000), (100.0, 100_000.0), 2_000);
        check((500, 200_000), (100.0, 100_000.0), 5_000);
        // Clamped at both ends.
        check((1, 0), (1000.0, 1.0), RETRY_AFTER_MS_MIN);
        check((1_000_000, 0), (1.0, 1.0), RETRY_AFTER_MS_MAX);
        // Nothing draining: no estimate.
        check((1, 0), (0.0, 0.0), RETRY_AFTER_MS_UNKNOWN);
        check((0, 1), (5.0, 0.0), RETRY_AFTER_MS_UNKNOWN);
    }
}
