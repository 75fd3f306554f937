//! Consumer-paced delivery for one queue.
//!
//! Rules (all under the queue's `delivery` mutex):
//! 1. A consumer holds `credit`; each delivery uses one. The broker never
//!    sends a delivery to a consumer without credit, and `credit + in_flight`
//!    never exceeds [`CREDIT_MAX`], which also bounds the consumer's channel.
//! 2. Every message taken from a lane (cursor, delayed set or requeue) ends up
//!    in exactly one place: leased (`in_flight`), back in the lane's requeue,
//!    or handed to a redelivery task that re-appends or dead-letters it and
//!    only then acks the original offset. So nothing is dropped silently.
//! 3. Lanes are served by smooth weighted round-robin over the lanes that
//!    have something to deliver (or in strict order when the queue says so).
//! 4. Memory is bounded: leases by consumers x credit, the delayed set by
//!    [`DELAYED_MAX`] per lane, the requeue by released leases.
//!
//! Nack and lease expiry re-append the message at the tail of its lane with
//! its attempt count (durable), then ack the original; past `max_attempts`
//! it is appended to the dead-letter queue instead. A consumer that
//! disconnects releases its leases to the front of their lanes without
//! counting an attempt.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use ballast_storage::{AckKind, Cursor, Log, NewRecord, Record};
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{HEADER_NOT_BEFORE, LaneScheduler, Queue, QueueSettings, headers};
use crate::{
    error::{BrokerError, Result},
    limits::{CONSUMERS_MAX, CREDIT_MAX, DELAY_MS_MAX, DELAYED_MAX, NACK_REASON_SIZE_MAX},
    now_ms,
};

/// A message leased to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub delivery_id: u64,
    pub lane: u32,
    pub offset: u64,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    pub key: Option<Bytes>,
    /// 1 for the first delivery.
    pub attempt: u32,
    pub published_at_ms: u64,
    pub lease_deadline_ms: u64,
}

/// A consumer's registration: deliveries arrive on `deliveries`.
#[derive(Debug)]
pub struct Subscription {
    pub consumer_id: u64,
    pub deliveries: mpsc::Receiver<Delivery>,
}

pub(crate) struct DeliveryState {
    lanes: Vec<LaneState>,
    /// Which lane the next delivery comes from.
    scheduler: LaneScheduler,
    leases: HashMap<u64, Lease>,
    /// `(deadline_ms, delivery_id)` of every lease, for expiry.
    expiries: BTreeSet<(u64, u64)>,
    consumers: BTreeMap<u64, Consumer>,
    /// Round-robin position among consumers.
    next_consumer: u64,
    /// When the timer task plans to wake (`u64::MAX`: not planned).
    timer_deadline: u64,
}

struct LaneState {
    cursor: Cursor,
    /// Read but not yet due: `(due_ms, offset, prior_attempts)`.
    delayed: BTreeSet<(u64, u64, u32)>,
    /// Released leases to deliver before anything else:
    /// `(offset, prior_attempts)`.
    requeue: VecDeque<(u64, u32)>,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    lane: u32,
    offset: u64,
    consumer_id: u64,
    deadline_ms: u64,
    /// The delivery's attempt number (1-based).
    attempt: u32,
    /// When it was delivered, Unix ms.
    delivered_ms: u64,
    /// The record's stored size, taken off the lane's byte count when the
    /// record is done.
    size: u64,
}

struct Consumer {
    credit: u32,
    in_flight: u32,
    sender: mpsc::Sender<Delivery>,
}

impl DeliveryState {
    pub(crate) fn new(lanes: &[Arc<Log>], settings: &QueueSettings) -> DeliveryState {
        DeliveryState {
            lanes: lanes
                .iter()
                .map(|log| LaneState {
                    cursor: log.cursor(log.ack_floor()),
                    delayed: BTreeSet::new(),
                    requeue: VecDeque::new(),
                })
                .collect(),
            scheduler: LaneScheduler::new(&settings.lane_weights, settings.strict_priority),
            leases: HashMap::new(),
            expiries: BTreeSet::new(),
            consumers: BTreeMap::new(),
            next_consumer: 0,
            timer_deadline: 0,
        }
    }

    pub(crate) fn in_flight_count(&self) -> u64 {
        self.leases.len() as u64
    }

    pub(crate) fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    fn consumer_with_credit(&mut self) -> Option<u64> {
        let found = self
            .consumers
            .range(self.next_consumer..)
            .chain(self.consumers.range(..self.next_consumer))
            .find(|(_, c)| c.credit > 0)
            .map(|(&id, _)| id)?;
        self.next_consumer = found + 1;
        Some(found)
    }

    /// The earliest deadline of a lease, or of a delayed message if some
    /// consumer could take it (without credit a due message waits for the
    /// credit, which dispatches by itself).
    fn next_deadline(&self) -> Option<u64> {
        let lease = self.expiries.first().map(|&(d, _)| d);
        let can_deliver = self.consumers.values().any(|c| c.credit > 0);
        let delayed =
            self.lanes.iter().filter_map(|l| l.delayed.first().map(|&(d, _, _)| d)).filter(|_| can_deliver).min();
        lease.into_iter().chain(delayed).min()
    }

    fn remove_lease(&mut self, delivery_id: u64) -> Option<Lease> {
        let lease = self.leases.remove(&delivery_id)?;
        self.expiries.remove(&(lease.deadline_ms, delivery_id));
        if let Some(consumer) = self.consumers.get_mut(&lease.consumer_id) {
            consumer.in_flight -= 1;
        }
        Some(lease)
    }
}

/// Publishes a queue refused, by reason, and throttled, since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefusedCounts {
    pub queue_full: u64,
    pub disk_low: u64,
    pub publish_rate: u64,
    pub throttled: u64,
    pub throttled_ms: u64,
}

/// Delivery figures of a queue now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryFigures {
    pub in_flight: u64,
    pub lane_in_flight: Vec<u64>,
    pub consumers: u32,
    /// Credit held by the consumers (deliveries they may still receive).
    pub credit: u64,
}

impl Queue {
    /// Leases, consumers and credit.
    pub fn delivery_figures(&self) -> DeliveryFigures {
        let state = self.delivery.lock();
        let mut lane_in_flight = vec![0; state.lanes.len()];
        for lease in state.leases.values() {
            lane_in_flight[lease.lane as usize] += 1;
        }
        DeliveryFigures {
            in_flight: state.leases.len() as u64,
            lane_in_flight,
            consumers: u32::try_from(state.consumers.len()).unwrap_or(u32::MAX),
            credit: state.consumers.values().map(|c| u64::from(c.credit)).sum(),
        }
    }

    /// Publishes refused and throttled since start.
    pub fn refused_count(&self) -> RefusedCounts {
        let r = &self.refused;
        RefusedCounts {
            queue_full: r.queue_full.load(Ordering::Relaxed),
            disk_low: r.disk_full.load(Ordering::Relaxed),
            publish_rate: r.publish_rate.load(Ordering::Relaxed),
            throttled: r.throttled.load(Ordering::Relaxed),
            throttled_ms: r.throttled_us.load(Ordering::Relaxed) / 1000,
        }
    }

    /// Registers a consumer with `credit` initial credit.
    pub fn subscribe(&self, credit: u32) -> Result<Subscription> {
        check_credit(credit, 0)?;
        if self.is_closed() {
            return Err(BrokerError::QueueNotFound(self.name.to_string()));
        }
        let consumer_id = self.node.next_consumer();
        let (sender, deliveries) = mpsc::channel(CREDIT_MAX as usize);
        {
            let mut state = self.delivery.lock();
            if state.consumers.len() >= CONSUMERS_MAX {
                return Err(BrokerError::LimitReached {
                    what: "consumers per queue",
                    max: CONSUMERS_MAX,
                    hint: "close idle consumers or use more queues",
                });
            }
            state.consumers.insert(consumer_id, Consumer { credit, in_flight: 0, sender });
        }
        self.dispatch();
        Ok(Subscription { consumer_id, deliveries })
    }

    /// Grants a consumer more credit.
    pub fn add_credit(&self, consumer_id: u64, credit: u32) -> Result<()> {
        {
            let mut state = self.delivery.lock();
            let consumer = state
                .consumers
                .get_mut(&consumer_id)
                .ok_or_else(|| BrokerError::InvalidArgument("the consumer is not subscribed".into()))?;
            check_credit(credit, consumer.credit + consumer.in_flight)?;
            consumer.credit += credit;
        }
        self.dispatch();
        Ok(())
    }

    /// Ends a consumer. With `release`, its leases go back to the front of
    /// their lanes at once (a stream that closed); without, they stay until
    /// acked, nacked or expired (a Pull that returned them).
    pub fn unsubscribe(&self, consumer_id: u64, release: bool) {
        {
            let mut state = self.delivery.lock();
            // Dropping the consumer drops its sender: the receiver still
            // yields what was sent, then ends.
            if state.consumers.remove(&consumer_id).is_none() || !release {
                return;
            }
            let mine: Vec<u64> =
                state.leases.iter().filter(|(_, l)| l.consumer_id == consumer_id).map(|(&id, _)| id).collect();
            let mut released: Vec<Lease> = mine.into_iter().filter_map(|id| state.remove_lease(id)).collect();
            released.sort_by_key(|l| std::cmp::Reverse(l.offset));
            for lease in released {
                self.meters[lease.lane as usize].metrics.released.increment(1);
                state.lanes[lease.lane as usize].requeue.push_front((lease.offset, lease.attempt - 1));
            }
        }
        self.dispatch();
    }

    /// Acks deliveries. All must be leased, or nothing changes. With `wait`,
    /// returns once the acks are durable under the sync policy.
    pub async fn ack(&self, delivery_ids: &[u64], wait: bool) -> Result<()> {
        let leases: Vec<Lease> = {
            let mut state = self.delivery.lock();
            if let Some(&delivery_id) = delivery_ids.iter().find(|id| !state.leases.contains_key(id)) {
                return Err(BrokerError::UnknownDelivery { delivery_id });
            }
            delivery_ids.iter().filter_map(|&id| state.remove_lease(id)).collect()
        };
        let mut commits = Vec::with_capacity(leases.len());
        for lease in leases {
            // `None`: purged meanwhile; the purge is the ack.
            commits.extend(self.ack_record(lease.lane, lease.offset, lease.size, AckKind::Acked)?);
            let meter = &self.meters[lease.lane as usize];
            meter.acked.fetch_add(1, Ordering::Relaxed);
            meter.acked_bytes.fetch_add(lease.size, Ordering::Relaxed);
            meter.metrics.acked.increment(1);
            meter.metrics.delivery_to_ack.record(now_ms().saturating_sub(lease.delivered_ms) as f64 / 1000.0);
        }
        if wait {
            for commit in commits {
                commit.await?;
            }
        }
        Ok(())
    }

    /// Nacks a delivery: redelivered after `delay_ms` (re-appended with its
    /// attempt count), or dead-lettered after its last attempt.
    pub async fn nack(self: &Arc<Self>, delivery_id: u64, delay_ms: u64, reason: &str) -> Result<()> {
        if delay_ms > DELAY_MS_MAX {
            return Err(BrokerError::InvalidArgument(format!(
                "nack delay is {delay_ms} ms; the limit is {DELAY_MS_MAX}"
            )));
        }
        if reason.len() > NACK_REASON_SIZE_MAX {
            return Err(BrokerError::InvalidArgument(format!(
                "nack reason is {} bytes; the limit is {NACK_REASON_SIZE_MAX} (NACK_REASON_SIZE_MAX)",
                reason.len()
            )));
        }
        let lease =
            self.delivery.lock().remove_lease(delivery_id).ok_or(BrokerError::UnknownDelivery { delivery_id })?;
        self.retry(lease, delay_ms, reason).await;
        Ok(())
    }

    /// Marks every message done; leases are dropped. Returns how many.
    pub fn purge(&self) -> Result<u64> {
        let mut state = self.delivery.lock();
        state.leases.clear();
        state.expiries.clear();
        for consumer in state.consumers.values_mut() {
            consumer.in_flight = 0;
        }
        let mut purged = 0;
        for (lane, log) in self.lanes.iter().enumerate() {
            // Held across the ack: no append or ack slips in between, so
            // every record is done afterwards and the lane holds 0 bytes.
            let meter = &self.meters[lane];
            let exclusive = meter.backlog_sync.write();
            let stats = log.stats();
            purged += stats.pending;
            if stats.next_offset > stats.ack_floor {
                // Not awaited: the purge is durable with the next sync.
                drop(log.ack(stats.ack_floor, stats.next_offset - stats.ack_floor, AckKind::Acked)?);
            }
            meter.backlog_bytes.store(0, Ordering::Relaxed);
            drop(exclusive);
            let lane = &mut state.lanes[lane];
            lane.requeue.clear();
            lane.delayed.clear();
            lane.cursor.seek(stats.next_offset);
        }
        Ok(purged)
    }

    /// Sends deliveries while some consumer has credit and some lane has a
    /// message. Cheap when there is nothing to do.
    pub(crate) fn dispatch(&self) {
        if self.is_closed() {
            return;
        }
        let now = now_ms();
        let wake_timer = {
            let mut guard = self.delivery.lock();
            let state = &mut *guard;
            while let Some(consumer_id) = state.consumer_with_credit() {
                let Some((lane, offset, prior, record)) = self.next_message(state, now) else { break };
                let delivery_id = self.node.next_delivery();
                let deadline_ms = now + self.settings.lease_timeout_ms;
                let attempt = prior + 1;
                let published_ms = record.timestamp_ms;
                let size = record.stored_size();
                let delivery = to_delivery(delivery_id, lane, record, attempt, deadline_ms);
                let Some(consumer) = state.consumers.get_mut(&consumer_id) else { break };
                match consumer.sender.try_send(delivery) {
                    Ok(()) => {
                        consumer.credit -= 1;
                        consumer.in_flight += 1;
                        debug_assert!(consumer.credit + consumer.in_flight <= CREDIT_MAX, "credit bound broken");
                        state.leases.insert(
                            delivery_id,
                            Lease { lane, offset, consumer_id, deadline_ms, attempt, delivered_ms: now, size },
                        );
                        let metrics = &self.meters[lane as usize].metrics;
                        metrics.delivered.increment(1);
                        if attempt == 1 {
                            metrics.publish_to_delivery.record(now.saturating_sub(published_ms) as f64 / 1000.0);
                        }
                        state.expiries.insert((deadline_ms, delivery_id));
                    }
                    Err(_) => {
                        // The consumer went away: put the message back; its
                        // stream task releases its leases.
                        state.lanes[lane as usize].requeue.push_front((offset, prior));
                        consumer.credit = 0;
                    }
                }
            }
            // Wake the timer only if something is now due before the time it
            // sleeps until (otherwise every dispatch would spin it).
            state.next_deadline().is_some_and(|d| d < state.timer_deadline)
        };
        if wake_timer {
            self.timer_wake.notify_one();
        }
    }

    /// The next message to deliver: the scheduler picks a lane with
    /// something to take (see [`LaneScheduler`]), then it is taken.
    fn next_message(&self, state: &mut DeliveryState, now: u64) -> Option<(u32, u64, u32, Record)> {
        let lanes = &mut state.lanes;
        let (lane, (offset, prior, record)) = state.scheduler.serve(|lane| self.take(lane, &mut lanes[lane], now))?;
        let lane = u32::try_from(lane).expect("at most LANES_MAX lanes");
        Some((lane, offset, prior, record))
    }

    /// Takes the next message of one lane: released leases first, then due
    /// delayed messages, then fresh ones from the cursor.
    fn take(&self, lane: usize, state: &mut LaneState, now: u64) -> Option<(u64, u32, Record)> {
        while let Some((offset, prior)) = state.requeue.pop_front() {
            if let Some(record) = self.reread(lane, offset) {
                return Some((offset, prior, record));
            }
        }
        while let Some(&(due, offset, prior)) = state.delayed.first() {
            if due > now {
                break;
            }
            state.delayed.pop_first();
            if let Some(record) = self.reread(lane, offset) {
                return Some((offset, prior, record));
            }
        }
        let durable = self.durable[lane].load(Ordering::Acquire);
        while state.delayed.len() < DELAYED_MAX && state.cursor.offset() < durable {
            match state.cursor.next()? {
                Ok(record) => match not_before(&record) {
                    Some(due) if due > now => {
                        state.delayed.insert((due, record.offset, record.attempt));
                    }
                    _ => return Some((record.offset, record.attempt, record)),
                },
                Err(error) => {
                    tracing::error!(queue = %self.name, lane, %error, "skipping corrupt records");
                    self.recount_bytes(lane);
                }
            }
        }
        None
    }

    /// Reads a message again by offset (requeue, delayed); `None` if it was
    /// done meanwhile (purge) or cannot be read.
    fn reread(&self, lane: usize, offset: u64) -> Option<Record> {
        let log = &self.lanes[lane];
        if log.is_done(offset) {
            return None;
        }
        match log.read(offset) {
            Ok(record) => Some(record),
            Err(error) => {
                tracing::error!(queue = %self.name, offset, %error, "cannot read a message for redelivery");
                if matches!(error, ballast_storage::ReadError::Corrupt { .. }) {
                    // Quarantined: the lane's byte count follows the log.
                    self.recount_bytes(lane);
                }
                None
            }
        }
    }

    /// Takes back expired leases; returns them for redelivery.
    fn expire(&self, now: u64) -> Vec<Lease> {
        let mut state = self.delivery.lock();
        let mut expired = Vec::new();
        while let Some(&(deadline, delivery_id)) = state.expiries.first() {
            if deadline > now {
                break;
            }
            if let Some(lease) = state.remove_lease(delivery_id) {
                expired.push(lease);
            }
        }
        expired
    }

    /// The earliest deadline of a lease or a delayed message, noted as the
    /// time the timer task sleeps until.
    fn timer_target(&self) -> Option<u64> {
        let mut state = self.delivery.lock();
        let deadline = state.next_deadline();
        state.timer_deadline = deadline.unwrap_or(u64::MAX);
        deadline
    }

    /// Redelivers a message whose lease ended without ack: re-append it with
    /// its attempt count (and delay), or dead-letter it after its last
    /// attempt; then ack the original. Every copy carries the offset of the
    /// message's publish receipt (`ballast-original-offset`). If storing
    /// fails for now (disk full, I/O), the message goes back to the front
    /// of its lane instead, so it is never lost. If storage refuses a copy
    /// for good, it is not requeued (that would loop forever): see
    /// [`Queue::append_copy`]; a redelivery refused even so is dead-lettered.
    async fn retry(self: &Arc<Self>, lease: Lease, delay_ms: u64, reason: &str) {
        let Some(record) = self.reread(lease.lane as usize, lease.offset) else { return };
        let original_offset = headers::original_offset(&record.headers, lease.offset);
        let outcome = if lease.attempt >= self.settings.max_attempts {
            self.dead_letter(lease, record, reason, original_offset).await
        } else {
            let own = headers::own_headers(record.headers.clone());
            let not_before = (delay_ms > 0).then(|| now_ms() + delay_ms);
            let full =
                copy_of(&record, lease.attempt, headers::redelivery_headers(own.clone(), not_before, original_offset));
            match self.append_copy(self, lease.lane, lease.lane, full, || copy_of(&record, lease.attempt, own)).await {
                Ok(true) => Ok(AckKind::Acked),
                Ok(false) => self.dead_letter(lease, record, reason, original_offset).await,
                Err(error) => Err(error),
            }
        };
        match outcome {
            Ok(kind) => {
                let meter = &self.meters[lease.lane as usize];
                if kind == AckKind::DeadLettered {
                    meter.acked.fetch_add(1, Ordering::Relaxed);
                    meter.acked_bytes.fetch_add(lease.size, Ordering::Relaxed);
                    meter.metrics.dead_lettered.increment(1);
                } else if reason == LEASE_EXPIRED {
                    meter.metrics.redelivered_expired.increment(1);
                } else {
                    meter.metrics.redelivered_nack.increment(1);
                }
                if let Err(error) = self.ack_record(lease.lane, lease.offset, lease.size, kind) {
                    tracing::error!(queue = %self.name, %error, "acking a redelivered message");
                }
            }
            Err(error) => {
                tracing::error!(queue = %self.name, offset = lease.offset, %error, "redelivery could not be stored; requeued in memory");
                self.delivery.lock().lanes[lease.lane as usize].requeue.push_back((lease.offset, lease.attempt - 1));
            }
        }
        self.dispatch();
    }

    /// Stores a dead letter of the message in the dead-letter queue (on
    /// the same lane index, or its last lane), or drops it when the queue
    /// has none. A dead letter the dead-letter queue refuses even without
    /// the broker's headers is dropped too, loudly: requeueing it would
    /// loop forever.
    async fn dead_letter(&self, lease: Lease, record: Record, reason: &str, original_offset: u64) -> Result<AckKind> {
        let Some(dead) = self.dead_letter.as_ref().filter(|q| !q.is_closed()) else {
            tracing::warn!(queue = %self.name, lane = lease.lane, offset = lease.offset, attempts = lease.attempt,
                "message used its last attempt and the queue has no dead-letter queue: dropped");
            return Ok(AckKind::DeadLettered);
        };
        let own = headers::own_headers(record.headers.clone());
        let source = headers::DeadLetterSource {
            reason,
            queue: self.name.as_str(),
            lane: &self.settings.lanes[lease.lane as usize],
            offset: lease.offset,
            attempts: lease.attempt,
            original_offset,
        };
        let full = copy_of(&record, 0, headers::dead_letter_headers(own.clone(), &source));
        let lane = lease.lane.min(dead.lane_count() - 1);
        if self.append_copy(dead, lane, lease.lane, full, || copy_of(&record, 0, own)).await? {
            dead.dispatch();
        } else {
            self.meters[lease.lane as usize].metrics.dropped_dead_letters.increment(1);
            tracing::error!(queue = %self.name, dead_letter_queue = %dead.name, lane = lease.lane, offset = lease.offset,
                original_offset, attempts = lease.attempt,
                "message used its last attempt and its dead-letter queue refuses it for good: dropped");
        }
        Ok(AckKind::DeadLettered)
    }

    /// Stores a copy of one of this queue's messages (from `source_lane`)
    /// in `lane` of `target` (this queue for a redelivery, its dead-letter
    /// queue for a dead letter) and waits until durable: `Ok(true)`.
    ///
    /// If storage refuses the copy for good (its headers or size: possible
    /// only for a record stored before publishes left room for the broker's
    /// headers, or for a dead-letter queue with smaller limits), `plain` is
    /// stored instead, the message without the broker's headers, which is
    /// never bigger than the record it copies; counted and logged.
    /// `Ok(false)`: that was refused for good too. A passing failure (disk
    /// full, I/O) is an error: the caller keeps the message for later.
    async fn append_copy(
        &self,
        target: &Queue,
        lane: u32,
        source_lane: u32,
        full: NewRecord,
        plain: impl FnOnce() -> NewRecord,
    ) -> Result<bool> {
        let error = match target.append_raw(lane, full).await {
            Ok(_) => return Ok(true),
            Err(error) if refused_for_good(&error) => error,
            Err(error) => return Err(error),
        };
        tracing::error!(queue = %self.name, target = %target.name, %error,
            "storage refuses a copy with the broker's headers; storing the message without them");
        match target.append_raw(lane, plain()).await {
            Ok(_) => {
                self.meters[source_lane as usize].metrics.stripped_copies.increment(1);
                Ok(true)
            }
            Err(error) if refused_for_good(&error) => {
                tracing::error!(queue = %self.name, target = %target.name, %error,
                    "storage refuses the message even without the broker's headers");
                Ok(false)
            }
            Err(error) => Err(error),
        }
    }

    /// Ends every consumer (shutdown or delete): their streams finish.
    pub(crate) fn close_consumers(&self) {
        self.closed.store(true, Ordering::Release);
        self.delivery.lock().consumers.clear();
        self.timer_wake.notify_one();
    }
}

/// Whether storing a copy failed for good: an append's only
/// INVALID_ARGUMENT is storage refusing the record itself (its size, headers
/// or key), which storing the same record again cannot change.
fn refused_for_good(error: &BrokerError) -> bool {
    matches!(error, BrokerError::InvalidArgument(_))
}

/// A copy of `record` to store again, with its `attempt` count and
/// `headers`. Copies carry no key: the original holds it.
fn copy_of(record: &Record, attempt: u32, headers: Vec<(String, String)>) -> NewRecord {
    NewRecord {
        timestamp_ms: record.timestamp_ms,
        attempt,
        flags: record.flags,
        key: None,
        headers,
        payload: record.payload.clone(),
    }
}

/// The retry reason of an expired lease (also the dead-letter reason).
const LEASE_EXPIRED: &str = "lease expired";

fn check_credit(credit: u32, held: u32) -> Result<()> {
    if credit == 0 {
        return Err(BrokerError::InvalidArgument("credit must be at least 1".into()));
    }
    if u64::from(credit) + u64::from(held) > u64::from(CREDIT_MAX) {
        return Err(BrokerError::InvalidArgument(format!(
            "credit {credit} on top of {held} held (credit plus unacked deliveries) exceeds the limit of {CREDIT_MAX}"
        )));
    }
    Ok(())
}

fn not_before(record: &Record) -> Option<u64> {
    record.headers.iter().find(|(k, _)| k == HEADER_NOT_BEFORE).and_then(|(_, v)| v.parse().ok())
}

fn to_delivery(delivery_id: u64, lane: u32, record: Record, attempt: u32, lease_deadline_ms: u64) -> Delivery {
    Delivery {
        delivery_id,
        lane,
        offset: record.offset,
        headers: record.headers.into_iter().filter(|(k, _)| k != HEADER_NOT_BEFORE).collect(),
        key: record.key,
        payload: record.payload,
        attempt,
        published_at_ms: record.timestamp_ms,
        lease_deadline_ms,
    }
}

/// Starts the queue's timer task: expires leases and releases delayed
/// messages when due. It holds only a weak reference and ends with the queue.
pub(crate) fn spawn_timer(queue: &Arc<Queue>) {
    let weak: Weak<Queue> = Arc::downgrade(queue);
    let wake = Arc::clone(&queue.timer_wake);
    tokio::spawn(async move {
        loop {
            let deadline = {
                let Some(queue) = weak.upgrade() else { return };
                if queue.is_closed() {
                    return;
                }
                queue.timer_target()
            };
            let wait =
                deadline.map_or(Duration::from_secs(3600), |d| Duration::from_millis(d.saturating_sub(now_ms())));
            // `Notify` keeps one permit, so a wake-up between reading the
            // deadline and waiting is not lost.
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = wake.notified() => {}
            }
            let Some(queue) = weak.upgrade() else { return };
            let expired = queue.expire(now_ms());
            for lease in expired {
                let queue = Arc::clone(&queue);
                tokio::spawn(async move { queue.retry(lease, 0, LEASE_EXPIRED).await });
            }
            queue.dispatch();
        }
    });
}
