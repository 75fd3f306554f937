//! The console's history: for each queue someone is looking at, a ring of
//! its figures, one sample per stats tick, in memory only.
//!
//! Rules:
//! 1. A queue gets a ring when its history is first read
//!    ([`History::read`]), only after the caller was allowed its stats and
//!    the queue was found, so the map is never keyed by unchecked input.
//! 2. The stats task samples the rings ([`History::sample`]); a ring not
//!    read for [`HISTORY_IDLE_MS`] is dropped there. Nobody looking means
//!    no ring and no sampling: the tick pays one uncontended lock.
//! 3. Memory is bounded: at most [`HISTORY_QUEUES_MAX`] rings of at most
//!    [`HISTORY_SAMPLES_MAX`] samples; a new ring past the count evicts the
//!    one read longest ago.
//! 4. The `rings` lock is a leaf: queue figures are taken with it released.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use crate::{
    Broker,
    limits::{HISTORY_IDLE_MS, HISTORY_QUEUES_MAX, HISTORY_SAMPLES_MAX},
    queue::QueueName,
};

/// The rings of the queues being looked at.
#[derive(Debug, Default)]
pub struct History {
    rings: Mutex<HashMap<QueueName, Ring>>,
}

/// One queue's samples, oldest first.
#[derive(Debug)]
struct Ring {
    samples: VecDeque<Sample>,
    /// When the ring was last read: the ring goes once this is older than
    /// [`HISTORY_IDLE_MS`].
    read_at: Instant,
}

/// A queue's figures at one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at_ms: u64,
    pub depth: u64,
    pub bytes: u64,
    pub saturation: f64,
    pub oldest_age_ms: u64,
    pub drain_estimate_ms: Option<u64>,
    pub publish_rate: f64,
    pub ack_rate: f64,
    /// Depth of each lane, in lane order.
    pub lane_depths: Box<[u64]>,
}

impl History {
    /// The samples of `queue`, oldest first, starting its ring if it has
    /// none (then empty until the next tick). Call it only for a queue the
    /// caller may see and that exists.
    pub fn read(&self, queue: &QueueName, now: Instant) -> Vec<Sample> {
        let mut rings = self.rings.lock();
        if !rings.contains_key(queue) && rings.len() >= HISTORY_QUEUES_MAX {
            let oldest = rings.iter().min_by_key(|(_, ring)| ring.read_at).map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                rings.remove(&oldest);
            }
        }
        let ring = rings
            .entry(queue.clone())
            .or_insert_with(|| Ring { samples: VecDeque::with_capacity(HISTORY_SAMPLES_MAX), read_at: now });
        ring.read_at = now;
        ring.samples.iter().cloned().collect()
    }

    /// One tick: drops the rings nobody read for [`HISTORY_IDLE_MS`] and
    /// appends the figures of each remaining queue that is open.
    pub fn sample(&self, broker: &Broker, now: Instant, at_ms: u64) {
        for name in self.live(now) {
            let Some(queue) = broker.open_queue(&name) else { continue };
            let (total, lanes) = queue.figures();
            let sample = Sample {
                at_ms,
                depth: total.depth,
                bytes: total.bytes,
                saturation: total.saturation,
                oldest_age_ms: total.oldest_age_ms,
                drain_estimate_ms: total.drain_estimate_ms,
                publish_rate: total.publish_rate,
                ack_rate: total.ack_rate,
                lane_depths: lanes.iter().map(|lane| lane.depth).collect(),
            };
            self.push(&name, sample);
        }
    }

    /// Drops the rings nobody read for [`HISTORY_IDLE_MS`] before `now`;
    /// returns the queues whose rings remain.
    fn live(&self, now: Instant) -> Vec<QueueName> {
        let mut rings = self.rings.lock();
        if rings.is_empty() {
            return Vec::new();
        }
        let idle = Duration::from_millis(HISTORY_IDLE_MS);
        rings.retain(|_, ring| now.saturating_duration_since(ring.read_at) < idle);
        rings.keys().cloned().collect()
    }

    /// Appends `sample` to the ring of `queue` (if it still has one),
    /// dropping the oldest past [`HISTORY_SAMPLES_MAX`].
    fn push(&self, queue: &QueueName, sample: Sample) {
        let mut rings = self.rings.lock();
        if let Some(ring) = rings.get_mut(queue) {
            if ring.samples.len() >= HISTORY_SAMPLES_MAX {
                ring.samples.pop_front();
            }
            ring.samples.push_back(sample);
        }
    }

    /// Queues with a ring now.
    pub fn len(&self) -> usize {
        self.rings.lock().len()
    }

    /// Whether no queue has a ring (nobody is looking).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> QueueName {
        QueueName::parse(s).unwrap()
    }

    fn sample(at_ms: u64) -> Sample {
        Sample {
            at_ms,
            depth: at_ms,
            bytes: 0,
            saturation: 0.0,
            oldest_age_ms: 0,
            drain_estimate_ms: None,
            publish_rate: 0.0,
            ack_rate: 0.0,
            lane_depths: Box::new([at_ms]),
        }
    }

    /// A ring holds HISTORY_SAMPLES_MAX samples, the newest ones: the
    /// one past the limit drops the oldest.
    #[test]
    fn a_ring_keeps_the_newest_samples_up_to_its_limit() {
        let history = History::default();
        let now = Instant::now();
        let jobs = name("jobs");
        assert!(history.read(&jobs, now).is_empty());
        let limit = HISTORY_SAMPLES_MAX as u64;
        for at in 0..limit {
            history.push(&jobs, sample(at));
        }
        let full = history.read(&jobs, now);
        assert_eq!(full.len(), HISTORY_SAMPLES_MAX, "at the limit, every sample is kept");
        assert_eq!(full[0].at_ms, 0);
        history.push(&jobs, sample(limit));
        let past = history.read(&jobs, now);
        assert_eq!(past.len(), HISTORY_SAMPLES_MAX, "one past the limit, still the limit");
        assert_eq!(past[0].at_ms, 1, "the oldest was dropped");
        assert_eq!(past.last().unwrap().at_ms, limit);
    }

    /// At most HISTORY_QUEUES_MAX queues have a ring: one more evicts the
    /// ring read longest ago; a queue never read has none (push is a no-op).
    #[test]
    fn rings_are_bounded_by_queue_count() {
        let history = History::default();
        let start = Instant::now();
        for i in 0..HISTORY_QUEUES_MAX {
            history.read(&name(&format!("q{i}")), start + Duration::from_millis(i as u64));
        }
        assert_eq!(history.len(), HISTORY_QUEUES_MAX, "at the limit");
        history.push(&name("never-read"), sample(1));
        assert_eq!(history.len(), HISTORY_QUEUES_MAX, "sampling does not start a ring");
        let later = start + Duration::from_secs(1);
        history.read(&name("one-more"), later);
        assert_eq!(history.len(), HISTORY_QUEUES_MAX, "one past the limit evicts one");
        assert!(!history.rings.lock().contains_key(&name("q0")), "the ring read longest ago went");
        assert!(history.rings.lock().contains_key(&name("one-more")));
    }

    /// A ring read HISTORY_IDLE_MS ago is dropped at the next tick; one
    /// read a millisecond later is kept.
    #[test]
    fn rings_nobody_reads_are_dropped() {
        let history = History::default();
        let start = Instant::now();
        history.read(&name("stale"), start);
        history.read(&name("fresh"), start + Duration::from_millis(1));
        let live = history.live(start + Duration::from_millis(HISTORY_IDLE_MS));
        assert_eq!(live, vec![name("fresh")]);
        assert_eq!(history.len(), 1);
    }
}
