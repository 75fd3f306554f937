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
//! Message expiry (`message_ttl_ms`, a publish's `ttl_ms`): a record
//! carries its deadline (its publish time plus the queue's TTL, and its own
//! `ballast-expires-at`), checked whenever a lane yields a record (cursor,
//! requeue, delayed set) and when a lease ends without ack. An expired
//! record is never delivered: it is dropped (acked, inline) or handed to
//! the timer task, which dead-letters it with reason `expired`. No expiry
//! time is held in memory and the backlog is never scanned for it.
//!
//! Delivery pacing (`max_delivery_rate`): dispatch asks the queue's
//! [`Pacer`] before each delivery; see `queue/pacing.rs`.
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

use ballast_storage::{AckKind, Commit, Cursor, Log, NewRecord, Record};
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    EXPIRED_REASON, ExpiredAction, HEADER_EXPIRES_AT, HEADER_NOT_BEFORE, LaneScheduler, PacingFigures, Queue,
    QueueSettings, headers,
};
use crate::{
    error::{BrokerError, Result},
    limits::{
        CONSUMERS_MAX, CREDIT_MAX, DELAY_MS_MAX, DELAYED_MAX, EXPIRING_MAX, LANES_MAX, LEASE_TIMEOUT_MS_MAX,
        LEASE_TIMEOUT_MS_MIN, NACK_REASON_SIZE_MAX, PULL_LEASES_MAX, REREAD_RETRY_MS,
    },
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
    /// The lease's length (the queue's `lease_timeout_ms`), for consumers
    /// that extend it.
    pub lease_ms: u64,
}

/// What an extend did to one lease (see [`Queue::extend`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extension {
    /// Held until this deadline, Unix ms.
    Extended { lease_deadline_ms: u64 },
    /// Its deadline had passed: it is being taken back for redelivery and
    /// was left alone.
    Expired,
    /// Not a lease the caller holds (settled, taken back, never issued, or
    /// another stream's): left alone.
    NotLeased,
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
    /// Leases delivered by Pulls (bounded by [`PULL_LEASES_MAX`]).
    pull_leases: usize,
    /// Round-robin position among consumers.
    next_consumer: u64,
    /// When the timer task plans to wake (`u64::MAX`: not planned).
    timer_deadline: u64,
    /// Expired messages dispatch read, for the timer task to dead-letter
    /// (at most [`EXPIRING_MAX`] with those running), with their attempts.
    expiring: Vec<(Lease, Record, u32)>,
    /// Expired messages being dead-lettered by tasks now.
    expiring_running: usize,
    /// The delivery pace (`max_delivery_rate`) and its figures.
    pacer: super::pacing::Pacer,
}

/// One dispatch's view of expiry: what the queue's settings say and how
/// much expiry work it may still do.
struct ExpiryPass<'a> {
    now: u64,
    ttl_ms: u64,
    /// Whether expired messages go to the dead-letter queue (else dropped).
    dead_letter: bool,
    /// The state's `expiring`.
    expiring: &'a mut Vec<(Lease, Record, u32)>,
    /// Expired messages this pass may still hand to the timer.
    room: usize,
    /// Expired messages this pass may still handle at all: the work one
    /// dispatch does under the mutex for a backlog of expired messages is
    /// bounded; the timer runs the next pass.
    budget: usize,
}

/// Expired messages of a queue since start, by what became of them.
#[derive(Debug, Default)]
pub(crate) struct ExpiredCounters {
    pub dead_lettered: std::sync::atomic::AtomicU64,
    pub dropped: std::sync::atomic::AtomicU64,
}

struct LaneState {
    cursor: Cursor,
    /// Read but not yet due: `(due_ms, offset, prior_attempts)`.
    delayed: BTreeSet<(u64, u64, u32)>,
    /// Released leases to deliver before anything else:
    /// `(offset, prior_attempts)`.
    requeue: VecDeque<(u64, u32)>,
    /// Offsets the cursor passes over once: after a rewind (see
    /// [`Queue::rewind_lane`]), those leased, requeued or delayed at the
    /// time, which are owned elsewhere. Emptied as the cursor passes them.
    skip: BTreeSet<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    lane: u32,
    offset: u64,
    /// The consumer that received it. A consume stream may ack or nack only
    /// its own deliveries (see [`Holder`]).
    consumer_id: u64,
    /// Delivered by a Pull: counted in [`DeliveryState::pull_leases`].
    pull: bool,
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
    /// A Pull in progress (its leases outlive it) rather than a stream.
    pull: bool,
}

/// Who may settle (ack or nack) a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// The consume stream that received it, by consumer id: a stream's
    /// acks and nacks of another consumer's deliveries are refused as
    /// unknown deliveries.
    Consumer(u64),
    /// Any caller that names the delivery id (unary Ack and Nack, used with
    /// Pull): the ids are random 64-bit numbers, so only a caller that was
    /// given one can name it.
    AnyCaller,
}

impl Holder {
    fn holds(self, lease: &Lease) -> bool {
        match self {
            Holder::Consumer(id) => !lease.pull && lease.consumer_id == id,
            Holder::AnyCaller => true,
        }
    }
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
                    skip: BTreeSet::new(),
                })
                .collect(),
            scheduler: LaneScheduler::new(&settings.lane_weights, settings.strict_priority),
            leases: HashMap::new(),
            expiries: BTreeSet::new(),
            consumers: BTreeMap::new(),
            pull_leases: 0,
            next_consumer: 0,
            timer_deadline: 0,
            expiring: Vec::new(),
            expiring_running: 0,
            pacer: super::pacing::Pacer::new(std::time::Instant::now()),
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
        if !self.expiring.is_empty() {
            return Some(0);
        }
        let lease = self.expiries.first().map(|&(d, _)| d);
        let can_deliver = self.consumers.values().any(|c| c.credit > 0);
        let delayed =
            self.lanes.iter().filter_map(|l| l.delayed.first().map(|&(d, _, _)| d)).filter(|_| can_deliver).min();
        let paced = self.pacer.resume_ms().filter(|_| can_deliver);
        lease.into_iter().chain(delayed).chain(paced).min()
    }

    /// Whether a lease holds the message at `lane`, `offset` (a scan of
    /// the leases: for redrive, not the delivery path).
    pub(crate) fn holds_offset(&self, lane: u32, offset: u64) -> bool {
        self.leases.values().any(|l| l.lane == lane && l.offset == offset)
    }

    fn remove_lease(&mut self, delivery_id: u64) -> Option<Lease> {
        let lease = self.leases.remove(&delivery_id)?;
        self.expiries.remove(&(lease.deadline_ms, delivery_id));
        if let Some(consumer) = self.consumers.get_mut(&lease.consumer_id) {
            consumer.in_flight -= 1;
        }
        if lease.pull {
            self.pull_leases -= 1;
        }
        Some(lease)
    }

    /// A fresh delivery id: random (so a caller cannot guess another's),
    /// never 0 and never the id of a live lease of this queue.
    fn new_delivery_id(&self) -> u64 {
        loop {
            let id = random_u64();
            if id != 0 && !self.leases.contains_key(&id) {
                return id;
            }
        }
    }

    /// Pull leases plus the credit of Pulls in progress: what Pulls hold or
    /// may soon hold.
    fn pull_holdings(&self) -> usize {
        let pending: usize = self.consumers.values().filter(|c| c.pull).map(|c| c.credit as usize).sum();
        self.pull_leases + pending
    }
}

/// Random delivery ids come from the OS in batches of this many, so an id
/// costs a copy, not a system call.
const RANDOM_BATCH: usize = 64;

/// A random `u64` from the OS's random source (`getrandom`), taken from a
/// per-thread batch.
fn random_u64() -> u64 {
    use std::cell::RefCell;
    thread_local! {
        static BATCH: RefCell<(usize, [u64; RANDOM_BATCH])> = const { RefCell::new((RANDOM_BATCH, [0; RANDOM_BATCH])) };
    }
    BATCH.with_borrow_mut(|(next, values)| {
        if *next == RANDOM_BATCH {
            let mut bytes = [0u8; RANDOM_BATCH * 8];
            if let Err(error) = getrandom::fill(&mut bytes) {
                // Linux's getrandom(2) does not fail once the pool is
                // initialised; if it ever does, ids stay unique but become
                // guessable, which the log says.
                tracing::error!(%error, "the OS random source failed; delivery ids fall back to the clock");
                let seed = crate::now_ms().wrapping_mul(0x9E37_79B9_7F4A_7C15);
                for (i, chunk) in bytes.chunks_exact_mut(8).enumerate() {
                    chunk.copy_from_slice(&(seed ^ (i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)).to_le_bytes());
                }
            }
            for (value, chunk) in values.iter_mut().zip(bytes.chunks_exact(8)) {
                *value = u64::from_le_bytes(chunk.try_into().expect("chunks of 8 bytes"));
            }
            *next = 0;
        }
        let value = values[*next];
        *next += 1;
        value
    })
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
    /// Expired messages since start: dead-lettered, dropped.
    pub expired_dead_lettered: u64,
    pub expired_dropped: u64,
    /// Whether and how much `max_delivery_rate` holds delivery back.
    pub pacing: PacingFigures,
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
            expired_dead_lettered: self.expired.dead_lettered.load(Ordering::Relaxed),
            expired_dropped: self.expired.dropped.load(Ordering::Relaxed),
            pacing: state.pacer.figures(std::time::Instant::now()),
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
        self.register(|_| Ok(credit), false)
    }

    /// Registers a Pull of up to `max_messages`. Its credit is cut so that
    /// the queue's Pull leases (and the credit of Pulls in progress) stay
    /// within [`PULL_LEASES_MAX`]; at the limit it is refused with
    /// RESOURCE_EXHAUSTED. End it with `unsubscribe(_, false)`: its leases
    /// stay until acked, nacked, released or expired.
    pub fn subscribe_pull(&self, max_messages: u32) -> Result<Subscription> {
        check_credit(max_messages, 0)?;
        self.register(
            |state| {
                let room = PULL_LEASES_MAX.saturating_sub(state.pull_holdings());
                if room == 0 {
                    return Err(BrokerError::LimitReached {
                        what: "pulled messages not yet acked per queue",
                        max: PULL_LEASES_MAX,
                        hint: "ack or nack pulled messages (or let their leases expire) before pulling more",
                    });
                }
                Ok(max_messages.min(u32::try_from(room).unwrap_or(u32::MAX)))
            },
            true,
        )
    }

    fn register(&self, credit: impl FnOnce(&DeliveryState) -> Result<u32>, pull: bool) -> Result<Subscription> {
        if self.is_closed() {
            return Err(BrokerError::QueueNotFound(self.name.to_string()));
        }
        let consumer_id = self.node.next_consumer();
        let (sender, deliveries) = mpsc::channel(CREDIT_MAX as usize);
        {
            let mut state = self.delivery.lock();
            let credit = credit(&state)?;
            check_credit(credit, 0)?;
            if state.consumers.len() >= CONSUMERS_MAX {
                return Err(BrokerError::LimitReached {
                    what: "consumers per queue",
                    max: CONSUMERS_MAX,
                    hint: "close idle consumers or use more queues",
                });
            }
            state.consumers.insert(consumer_id, Consumer { credit, in_flight: 0, sender, pull });
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
            self.requeue_released(&mut state, mine);
        }
        self.dispatch();
    }

    /// Takes back deliveries nobody will see (a Pull's response was full):
    /// they go back to the front of their lanes without counting an
    /// attempt. Ids not leased are skipped.
    pub fn release(&self, delivery_ids: &[u64]) {
        if delivery_ids.is_empty() {
            return;
        }
        self.requeue_released(&mut self.delivery.lock(), delivery_ids.to_vec());
        self.dispatch();
    }

    /// Takes back the leases of `delivery_ids` (those still leased) and
    /// requeues them ([`Queue::requeue_leases`]).
    fn requeue_released(&self, state: &mut DeliveryState, delivery_ids: Vec<u64>) {
        let released: Vec<Lease> = delivery_ids.into_iter().filter_map(|id| state.remove_lease(id)).collect();
        self.requeue_leases(state, released);
    }

    /// Puts ended leases back at the front of their lanes, in offset
    /// order, with the attempt they had (it did not count).
    fn requeue_leases(&self, state: &mut DeliveryState, mut released: Vec<Lease>) {
        released.sort_by_key(|l| std::cmp::Reverse(l.offset));
        for lease in released {
            self.lane_metrics(lease.lane as usize).released.increment(1);
            state.lanes[lease.lane as usize].requeue.push_front((lease.offset, lease.attempt - 1));
        }
    }

    /// Acks deliveries. All must be leased and held by `holder`, or nothing
    /// changes. With `wait`, returns once the acks are durable under the
    /// sync policy. If storage refuses an ack, that message goes back to
    /// the front of its lane (redelivered without counting an attempt), the
    /// others are still acked, and the first error is returned: every
    /// message taken from a lane ends acked, requeued or dead-lettered.
    pub async fn ack(&self, delivery_ids: &[u64], wait: bool, holder: Holder) -> Result<()> {
        let leases: Vec<(u64, Lease)> = {
            let mut state = self.delivery.lock();
            if let Some(&delivery_id) =
                delivery_ids.iter().find(|id| !state.leases.get(id).is_some_and(|l| holder.holds(l)))
            {
                return Err(BrokerError::UnknownDelivery { delivery_id });
            }
            delivery_ids.iter().filter_map(|&id| state.remove_lease(id).map(|lease| (id, lease))).collect()
        };
        let mut commits = Vec::new();
        let failed = self.ack_leases(leases, wait.then_some(&mut commits));
        if let Some((_, error)) = failed.into_iter().next() {
            return Err(error);
        }
        if wait {
            for commit in commits {
                commit.await?;
            }
        }
        Ok(())
    }

    /// Acks each of `delivery_ids` on its own, as a consume stream's ack
    /// does: an id not leased by `holder` changes nothing and comes back
    /// with its error, the others are acked. Does not wait: stream acks
    /// become durable with the next sync. One lock and one pass over the
    /// meters for the whole request.
    pub fn ack_each(&self, delivery_ids: &[u64], holder: Holder) -> Vec<(u64, BrokerError)> {
        let mut rejected = Vec::new();
        let leases: Vec<(u64, Lease)> = {
            let mut state = self.delivery.lock();
            let mut leases = Vec::with_capacity(delivery_ids.len());
            for &delivery_id in delivery_ids {
                if state.leases.get(&delivery_id).is_some_and(|l| holder.holds(l))
                    && let Some(lease) = state.remove_lease(delivery_id)
                {
                    leases.push((delivery_id, lease));
                } else {
                    rejected.push((delivery_id, BrokerError::UnknownDelivery { delivery_id }));
                }
            }
            leases
        };
        rejected.extend(self.ack_leases(leases, None));
        rejected
    }

    /// Marks the records of `leases` (each with its delivery id) done in
    /// storage and counts them. If storage refuses an ack, that message
    /// goes back to the front of its lane (redelivered without counting an
    /// attempt) and its id comes back with the error; the others are
    /// still acked. The commits to await for durability go to `commits`,
    /// if the caller waits for them.
    fn ack_leases(&self, leases: Vec<(u64, Lease)>, mut commits: Option<&mut Vec<Commit>>) -> Vec<(u64, BrokerError)> {
        let mut failed: Vec<Lease> = Vec::new();
        let mut errors = Vec::new();
        let now = now_ms();
        let mut acked = [(0u64, 0u64); LANES_MAX];
        for (delivery_id, lease) in leases {
            // `None`: purged meanwhile; the purge is the ack.
            match self.ack_record(lease.lane, lease.offset, lease.size, AckKind::Acked) {
                Ok(commit) => {
                    if let Some(commits) = commits.as_deref_mut() {
                        commits.extend(commit);
                    }
                }
                Err(error) => {
                    tracing::error!(queue = %self.name, lane = lease.lane, offset = lease.offset, %error,
                        "ack not stored; the message goes back to its lane");
                    failed.push(lease);
                    errors.push((delivery_id, error.into()));
                    continue;
                }
            }
            let lane = &mut acked[lease.lane as usize];
            lane.0 += 1;
            lane.1 += lease.size;
            let waited = now.saturating_sub(lease.delivered_ms) as f64 / 1000.0;
            self.lane_metrics(lease.lane as usize).delivery_to_ack.record(waited);
        }
        for (lane, &(count, bytes)) in acked.iter().enumerate().filter(|(_, (count, _))| *count > 0) {
            let meter = &self.meters[lane];
            meter.acked.fetch_add(count, Ordering::Relaxed);
            meter.acked_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.lane_metrics(lane).acked.increment(count);
        }
        if !failed.is_empty() {
            self.requeue_leases(&mut self.delivery.lock(), failed);
            self.dispatch();
        }
        errors
    }

    /// Nacks a delivery held by `holder`: redelivered after `delay_ms`
    /// (re-appended with its attempt count), or dead-lettered after its
    /// last attempt.
    pub async fn nack(self: &Arc<Self>, delivery_id: u64, delay_ms: u64, reason: &str, holder: Holder) -> Result<()> {
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
        let lease = {
            let mut state = self.delivery.lock();
            if !state.leases.get(&delivery_id).is_some_and(|l| holder.holds(l)) {
                return Err(BrokerError::UnknownDelivery { delivery_id });
            }
            state.remove_lease(delivery_id).expect("checked above under the same lock")
        };
        self.retry(lease, delay_ms, reason).await;
        Ok(())
    }

    /// Whether the message at `lane`, `offset` is leased now.
    pub(crate) fn is_leased(&self, lane: u32, offset: u64) -> bool {
        self.delivery.lock().holds_offset(lane, offset)
    }

    /// Extends the leases of `delivery_ids` held by `holder`: each gets the
    /// deadline now + `lease_ms` (0: the queue's `lease_timeout_ms`), which
    /// may also shorten it. Answered per id, in order; only a lease held and
    /// not yet past its deadline changes, so an expired lease is never
    /// revived and another stream's is never touched. Nothing is written to
    /// storage: leases live in memory and end with the broker anyway.
    pub fn extend(&self, delivery_ids: &[u64], lease_ms: u64, holder: Holder) -> Result<Vec<Extension>> {
        let lease_ms = if lease_ms == 0 { self.settings().lease_timeout_ms } else { lease_ms };
        if !(LEASE_TIMEOUT_MS_MIN..=LEASE_TIMEOUT_MS_MAX).contains(&lease_ms) {
            return Err(BrokerError::InvalidArgument(format!(
                "lease_ms is {lease_ms}; it must be in {LEASE_TIMEOUT_MS_MIN}..={LEASE_TIMEOUT_MS_MAX} \
                 (the bounds of a queue's lease_timeout_ms), or 0 for the queue's lease"
            )));
        }
        check_ids("extend", delivery_ids)?;
        let now = now_ms();
        let lease_deadline_ms = now + lease_ms;
        let (extensions, wake_timer) = {
            let mut guard = self.delivery.lock();
            let state = &mut *guard;
            let extensions: Vec<Extension> = delivery_ids
                .iter()
                .map(|&delivery_id| {
                    let Some(lease) = state.leases.get_mut(&delivery_id).filter(|l| holder.holds(l)) else {
                        return Extension::NotLeased;
                    };
                    if lease.deadline_ms <= now {
                        return Extension::Expired;
                    }
                    state.expiries.remove(&(lease.deadline_ms, delivery_id));
                    lease.deadline_ms = lease_deadline_ms;
                    state.expiries.insert((lease_deadline_ms, delivery_id));
                    self.lane_metrics(lease.lane as usize).lease_extended.increment(1);
                    Extension::Extended { lease_deadline_ms }
                })
                .collect();
            // A shortened lease may now be the first due.
            (extensions, state.next_deadline().is_some_and(|d| d < state.timer_deadline))
        };
        if wake_timer {
            self.timer_wake.notify_one();
        }
        Ok(extensions)
    }

    /// Marks every message done; leases are dropped. Returns how many.
    pub fn purge(&self) -> Result<u64> {
        let mut state = self.delivery.lock();
        state.leases.clear();
        state.expiries.clear();
        // Expired messages not yet handed to the timer are purged too.
        state.expiring.clear();
        state.pull_leases = 0;
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
                if let Some(cluster) = self.replicated() {
                    let lane = u32::try_from(lane).expect("at most LANES_MAX lanes");
                    let command =
                        crate::cluster::Command::Purge { queue: self.name.to_string(), lane, end: stats.next_offset };
                    let (cluster, queue) = (Arc::clone(cluster), self.name.to_string());
                    tokio::spawn(async move { cluster.propose(&queue, command).await });
                }
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
        let settings = self.settings();
        let lease_timeout_ms = settings.lease_timeout_ms;
        let rate = settings.max_delivery_rate;
        let clock = std::time::Instant::now();
        let wake_timer = {
            let mut guard = self.delivery.lock();
            let state = &mut *guard;
            // Expired messages this dispatch may still handle (see
            // `ExpiryPass::budget`), across all its deliveries.
            let mut budget = EXPIRING_MAX;
            let mut paced = None;
            while let Some(consumer_id) = state.consumer_with_credit() {
                if let Some(wait) = state.pacer.wait(rate, clock) {
                    paced = Some(wait);
                    break;
                }
                let mut pass = ExpiryPass {
                    now,
                    ttl_ms: settings.message_ttl_ms,
                    dead_letter: settings.expired_action == ExpiredAction::DeadLetter && self.dead_letter.is_some(),
                    room: EXPIRING_MAX.saturating_sub(state.expiring.len() + state.expiring_running),
                    budget,
                    expiring: &mut state.expiring,
                };
                let next = Self::next_message(self, &mut state.lanes, &mut state.scheduler, &mut pass);
                budget = pass.budget;
                let Some((lane, offset, prior, record)) = next else { break };
                let delivery_id = state.new_delivery_id();
                let deadline_ms = now + lease_timeout_ms;
                let attempt = prior + 1;
                let published_ms = record.timestamp_ms;
                let size = record.stored_size();
                let mut delivery = to_delivery(delivery_id, lane, record, attempt, deadline_ms);
                delivery.lease_ms = lease_timeout_ms;
                let Some(consumer) = state.consumers.get_mut(&consumer_id) else { break };
                match consumer.sender.try_send(delivery) {
                    Ok(()) => {
                        consumer.credit -= 1;
                        consumer.in_flight += 1;
                        debug_assert!(consumer.credit + consumer.in_flight <= CREDIT_MAX, "credit bound broken");
                        let pull = consumer.pull;
                        if pull {
                            state.pull_leases += 1;
                        }
                        state.leases.insert(
                            delivery_id,
                            Lease { lane, offset, consumer_id, pull, deadline_ms, attempt, delivered_ms: now, size },
                        );
                        let metrics = self.lane_metrics(lane as usize);
                        metrics.delivered.increment(1);
                        if attempt == 1 {
                            metrics.publish_to_delivery.record(now.saturating_sub(published_ms) as f64 / 1000.0);
                        }
                        state.expiries.insert((deadline_ms, delivery_id));
                        state.pacer.charge(rate, clock);
                    }
                    Err(_) => {
                        // The consumer went away: put the message back; its
                        // stream task releases its leases.
                        state.lanes[lane as usize].requeue.push_front((offset, prior));
                        consumer.credit = 0;
                    }
                }
            }
            // Paced: the timer runs dispatch again at the next token.
            match paced.map(|wait| (wait, held_back(state, &self.durable))) {
                Some((wait, held_back)) if held_back > 0 => state.pacer.pace(clock, now, wait, held_back),
                _ => state.pacer.unpace(clock),
            }
            // Wake the timer only if something is now due before the time it
            // sleeps until (otherwise every dispatch would spin it), or to
            // run the next pass over expired messages.
            budget == 0 || state.next_deadline().is_some_and(|d| d < state.timer_deadline)
        };
        if wake_timer {
            self.timer_wake.notify_one();
        }
    }

    /// The next message to deliver: the scheduler picks a lane with
    /// something to take (see [`LaneScheduler`]), then it is taken.
    fn next_message(
        &self,
        lanes: &mut [LaneState],
        scheduler: &mut LaneScheduler,
        pass: &mut ExpiryPass<'_>,
    ) -> Option<(u32, u64, u32, Record)> {
        let (lane, (offset, prior, record)) = scheduler.serve(|lane| self.take(lane, &mut lanes[lane], pass))?;
        let lane = u32::try_from(lane).expect("at most LANES_MAX lanes");
        Some((lane, offset, prior, record))
    }

    /// Takes the next message of one lane: released leases first, then due
    /// delayed messages, then fresh ones from the cursor.
    /// An expired message is never returned: see [`Queue::keep_unexpired`].
    fn take(&self, lane: usize, state: &mut LaneState, pass: &mut ExpiryPass<'_>) -> Option<(u64, u32, Record)> {
        let now = pass.now;
        // A message that cannot be read now goes to the delayed set, to be
        // tried again later (kept, never dropped).
        let retry_at = now + REREAD_RETRY_MS;
        while let Some((offset, prior)) = state.requeue.pop_front() {
            if pass.budget == 0 || pass.room == 0 {
                state.requeue.push_front((offset, prior));
                return None;
            }
            match self.reread(lane, offset) {
                Reread::Record(record) => {
                    if let Some(kept) = self.keep_unexpired(lane, state, offset, prior, record, pass) {
                        return Some(kept);
                    }
                }
                Reread::Done => {}
                Reread::Failed => {
                    state.delayed.insert((retry_at, offset, prior));
                }
            }
        }
        while let Some(&(due, offset, prior)) = state.delayed.first() {
            if due > now || pass.budget == 0 || pass.room == 0 {
                break;
            }
            state.delayed.pop_first();
            match self.reread(lane, offset) {
                Reread::Record(record) => {
                    if let Some(kept) = self.keep_unexpired(lane, state, offset, prior, record, pass) {
                        return Some(kept);
                    }
                }
                Reread::Done => {}
                Reread::Failed => {
                    state.delayed.insert((retry_at, offset, prior));
                }
            }
        }
        let durable = self.durable[lane].load(Ordering::Acquire);
        while state.delayed.len() < DELAYED_MAX && state.cursor.offset() < durable {
            if pass.budget == 0 || pass.room == 0 {
                return None;
            }
            match state.cursor.next()? {
                Ok(record) => {
                    // Since a rewind, offsets owned elsewhere are passed
                    // over once (and skipped entries the cursor stepped
                    // past, done meanwhile, are dropped).
                    while state.skip.first().is_some_and(|&first| first < record.offset) {
                        state.skip.pop_first();
                    }
                    if state.skip.first() == Some(&record.offset) {
                        state.skip.pop_first();
                        continue;
                    }
                    match not_before(&record) {
                        // Checked for expiry when due: a delayed message
                        // costs its place in the delayed set either way.
                        Some(due) if due > now => {
                            state.delayed.insert((due, record.offset, record.attempt));
                        }
                        _ => {
                            let (offset, prior) = (record.offset, record.attempt);
                            if let Some(kept) = self.keep_unexpired(lane, state, offset, prior, record, pass) {
                                return Some(kept);
                            }
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(queue = %self.name, lane, %error, "skipping corrupt records");
                    self.recount_bytes(lane);
                }
            }
        }
        None
    }

    /// `record` as taken from a lane, unless it has expired: then it is
    /// dropped here (acked as dead-lettered, which is a few memory updates
    /// and no wait) or handed to the timer task for the dead-letter queue,
    /// and `None` is returned. A drop storage refuses keeps the message in
    /// the delayed set, to be tried again in [`REREAD_RETRY_MS`].
    fn keep_unexpired(
        &self,
        lane: usize,
        state: &mut LaneState,
        offset: u64,
        prior: u32,
        record: Record,
        pass: &mut ExpiryPass<'_>,
    ) -> Option<(u64, u32, Record)> {
        if !expired(&record, pass.ttl_ms, pass.now) {
            return Some((offset, prior, record));
        }
        pass.budget -= 1;
        let lane_index = u32::try_from(lane).expect("at most LANES_MAX lanes");
        let size = record.stored_size();
        let lease = Lease {
            lane: lane_index,
            offset,
            consumer_id: 0,
            pull: false,
            deadline_ms: 0,
            attempt: prior + 1,
            delivered_ms: pass.now,
            size,
        };
        if pass.dead_letter {
            pass.room -= 1;
            pass.expiring.push((lease, record, prior));
            return None;
        }
        match self.ack_record(lane_index, offset, size, AckKind::DeadLettered) {
            Ok(_) => self.count_expired(&lease, false),
            Err(error) => {
                tracing::error!(queue = %self.name, lane, offset, %error, "an expired message could not be dropped; trying again later");
                state.delayed.insert((pass.now + REREAD_RETRY_MS, offset, prior));
            }
        }
        None
    }

    /// Counts a message whose expiry is stored: in the lane's figures (it
    /// is done), the queue's expired counts and the metrics.
    fn count_expired(&self, lease: &Lease, dead_lettered: bool) {
        let meter = &self.meters[lease.lane as usize];
        meter.acked.fetch_add(1, Ordering::Relaxed);
        meter.acked_bytes.fetch_add(lease.size, Ordering::Relaxed);
        let metrics = self.lane_metrics(lease.lane as usize);
        if dead_lettered {
            self.expired.dead_lettered.fetch_add(1, Ordering::Relaxed);
            metrics.expired_dead_lettered.increment(1);
        } else {
            self.expired.dropped.fetch_add(1, Ordering::Relaxed);
            metrics.expired_dropped.increment(1);
        }
    }

    /// The expired messages dispatch handed over, now counted as running.
    fn take_expiring(&self) -> Vec<(Lease, Record, u32)> {
        let mut state = self.delivery.lock();
        let taken = std::mem::take(&mut state.expiring);
        state.expiring_running += taken.len();
        taken
    }

    /// Dead-letters (or, by the queue's setting or for want of a
    /// dead-letter queue, drops) a message that expired after `attempts`
    /// deliveries, then acks it. If that cannot be stored now, the message
    /// is kept in the delayed set and tried again in [`REREAD_RETRY_MS`]
    /// (found expired again when it comes out).
    async fn expire_message(&self, lease: Lease, record: Record, attempts: u32) {
        let keep = |error: BrokerError| {
            tracing::error!(queue = %self.name, lane = lease.lane, offset = lease.offset, %error,
                "an expired message could not be dead-lettered or dropped; trying again later");
            let due = now_ms() + REREAD_RETRY_MS;
            self.delivery.lock().lanes[lease.lane as usize].delayed.insert((due, lease.offset, lease.attempt - 1));
        };
        if self.settings().expired_action == ExpiredAction::Drop || self.dead_letter.is_none() {
            match self.ack_record(lease.lane, lease.offset, lease.size, AckKind::DeadLettered) {
                Ok(_) => self.count_expired(&lease, false),
                Err(error) => keep(error.into()),
            }
            return;
        }
        let original_offset = headers::original_offset(&record.headers, lease.offset);
        let dead = Lease { attempt: attempts, ..lease };
        if let Err(error) = self.dead_letter(dead, record, EXPIRED_REASON, original_offset).await {
            keep(error);
            return;
        }
        // As for a redelivery: the dead letter is stored, so the message
        // is not kept; an ack storage refuses is read again after the
        // lane's log is reopened (at least once). Counted after the ack,
        // so the counts never run ahead of the depth.
        if let Err(error) = self.ack_record(lease.lane, lease.offset, lease.size, AckKind::DeadLettered) {
            tracing::error!(queue = %self.name, %error, "acking an expired message after its dead letter");
        }
        self.count_expired(&lease, true);
    }

    /// Reads a lane again from its ack floor, after its poisoned log was
    /// reopened: the reopen keeps only the acks journaled before the
    /// failure, so a message acked in memory whose ack never reached the
    /// journal is pending again in storage while this lane's cursor is past
    /// it. Without the rewind it would be stranded (counted in the depth,
    /// never delivered) until a restart; with it, it is delivered again (at
    /// least once). Offsets leased, requeued, delayed or expiring now are
    /// owned elsewhere and passed over once.
    pub(crate) fn rewind_lane(&self, lane: usize) {
        {
            let mut guard = self.delivery.lock();
            let state = &mut *guard;
            let lane_index = u32::try_from(lane).expect("at most LANES_MAX lanes");
            let leased = state.leases.values().filter(|l| l.lane == lane_index).map(|l| l.offset);
            let mut skip: BTreeSet<u64> = leased.collect();
            skip.extend(state.expiring.iter().filter(|(l, _, _)| l.lane == lane_index).map(|(l, _, _)| l.offset));
            let lane_state = &mut state.lanes[lane];
            skip.extend(lane_state.requeue.iter().map(|&(offset, _)| offset));
            skip.extend(lane_state.delayed.iter().map(|&(_, offset, _)| offset));
            let floor = self.lanes[lane].ack_floor();
            if floor < lane_state.cursor.offset() {
                tracing::info!(queue = %self.name, lane, from = floor, to = lane_state.cursor.offset(),
                    "reading the lane again from its ack floor after a reopen");
            }
            lane_state.cursor.seek(floor);
            lane_state.skip = skip;
        }
        self.dispatch();
    }

    /// Reads a message again by offset (requeue, delayed, redelivery).
    fn reread(&self, lane: usize, offset: u64) -> Reread {
        let log = &self.lanes[lane];
        if log.is_done(offset) {
            return Reread::Done;
        }
        #[cfg(test)]
        if tests::reread_fails(&self.name) {
            tracing::error!(queue = %self.name, offset, "injected read failure");
            return Reread::Failed;
        }
        match log.read(offset) {
            Ok(record) => Reread::Record(record),
            Err(error) => {
                if matches!(error, ballast_storage::ReadError::Corrupt { .. }) {
                    tracing::error!(queue = %self.name, lane, offset, %error, "corrupt message quarantined, not delivered");
                    // Quarantined: the lane's byte count follows the log.
                    self.recount_bytes(lane);
                    return Reread::Done;
                }
                tracing::error!(queue = %self.name, lane, offset, %error,
                    retry_ms = REREAD_RETRY_MS, "cannot read a message for redelivery; trying again later");
                Reread::Failed
            }
        }
    }

    /// Reads the message of a lease ended without ack, for [`Self::retry`].
    /// If it cannot be read now, it is kept: it goes to the delayed set to
    /// be delivered later without counting this attempt.
    fn reread_for_retry(&self, lease: &Lease) -> Option<Record> {
        match self.reread(lease.lane as usize, lease.offset) {
            Reread::Record(record) => Some(record),
            Reread::Done => None,
            Reread::Failed => {
                let due = now_ms() + REREAD_RETRY_MS;
                self.delivery.lock().lanes[lease.lane as usize].delayed.insert((due, lease.offset, lease.attempt - 1));
                self.dispatch();
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
        let Some(record) = self.reread_for_retry(&lease) else { return };
        if expired(&record, self.settings().message_ttl_ms, now_ms()) {
            // Expired while leased: it ends here instead of being
            // redelivered, after the attempts it had.
            self.expire_message(lease, record, lease.attempt).await;
            self.dispatch();
            return;
        }
        let original_offset = headers::original_offset(&record.headers, lease.offset);
        let outcome = if lease.attempt >= self.settings().max_attempts {
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
                    self.lane_metrics(lease.lane as usize).dead_lettered.increment(1);
                } else if reason == LEASE_EXPIRED {
                    self.lane_metrics(lease.lane as usize).redelivered_expired.increment(1);
                } else {
                    self.lane_metrics(lease.lane as usize).redelivered_nack.increment(1);
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
        let own = headers::dead_letter_own_headers(record.headers.clone());
        let source = headers::DeadLetterSource {
            reason,
            queue: self.name.as_str(),
            lane: &self.settings().lanes[lease.lane as usize],
            offset: lease.offset,
            attempts: lease.attempt,
            original_offset,
        };
        let full = copy_of(&record, 0, headers::dead_letter_headers(own.clone(), &source));
        let lane = lease.lane.min(dead.lane_count() - 1);
        if self.append_copy(dead, lane, lease.lane, full, || copy_of(&record, 0, own)).await? {
            dead.dispatch();
        } else {
            self.lane_metrics(lease.lane as usize).dropped_dead_letters.increment(1);
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
                self.lane_metrics(source_lane as usize).stripped_copies.increment(1);
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
    /// This node lost the cluster's leadership: every consumer of this
    /// replicated queue is let go (its stream ends; it reconnects to the
    /// new leader) and their leases go back to their lanes.
    pub(crate) fn release_consumers(&self) {
        let mut state = self.delivery.lock();
        state.consumers.clear();
        let all: Vec<u64> = state.leases.keys().copied().collect();
        self.requeue_released(&mut state, all);
    }

    /// This node became the cluster's leader: every lane is read again
    /// from its ack floor, so what a former leader leased and nobody acked
    /// is delivered again.
    pub(crate) fn take_leadership(&self) {
        for lane in 0..self.lanes.len() {
            self.rewind_lane(lane);
        }
    }

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

/// What reading a message again found.
enum Reread {
    Record(Record),
    /// Done meanwhile (acked, purged, quarantined): nothing to deliver.
    Done,
    /// Not readable now (not a CRC failure): try again later.
    Failed,
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

/// Deliveries the consumers could take now: their credit, up to the
/// messages waiting in the lanes (released leases and the durable records
/// past each cursor; delayed ones not counted). O(lanes + consumers).
fn held_back(state: &DeliveryState, durable: &[std::sync::atomic::AtomicU64]) -> u64 {
    let credit: u64 = state.consumers.values().map(|c| u64::from(c.credit)).sum();
    let mut waiting = 0u64;
    for (lane, durable) in state.lanes.iter().zip(durable) {
        waiting += lane.requeue.len() as u64 + durable.load(Ordering::Acquire).saturating_sub(lane.cursor.offset());
        if waiting >= credit {
            break;
        }
    }
    waiting.min(credit)
}

/// Whether `record` has expired at `now`: its own `ballast-expires-at`, or
/// its publish time plus the queue's `ttl_ms` (0: none), whichever is
/// earlier, has passed. A redelivered copy keeps its message's publish
/// time and header, so the deadline counts from the first publish.
fn expired(record: &Record, ttl_ms: u64, now: u64) -> bool {
    if ttl_ms > 0 && record.timestamp_ms.saturating_add(ttl_ms) <= now {
        return true;
    }
    let own = record.headers.iter().find(|(k, _)| k == HEADER_EXPIRES_AT).and_then(|(_, v)| v.parse::<u64>().ok());
    own.is_some_and(|at| at <= now)
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
        lease_ms: 0,
    }
}

/// Checks the ids of an ack or extend: at least one, at most [`CREDIT_MAX`]
/// (no caller can hold more leases of one stream).
pub(crate) fn check_ids(call: &str, delivery_ids: &[u64]) -> Result<()> {
    if delivery_ids.is_empty() {
        return Err(BrokerError::InvalidArgument(format!("{call} needs at least one delivery id")));
    }
    if delivery_ids.len() > CREDIT_MAX as usize {
        return Err(BrokerError::InvalidArgument(format!(
            "at most {CREDIT_MAX} delivery ids per {call} (the credit limit); got {}",
            delivery_ids.len()
        )));
    }
    Ok(())
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
            for (lease, record, attempts) in queue.take_expiring() {
                let queue = Arc::clone(&queue);
                tokio::spawn(async move {
                    queue.expire_message(lease, record, attempts).await;
                    queue.delivery.lock().expiring_running -= 1;
                    queue.dispatch();
                });
            }
            queue.dispatch();
        }
    });
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Mutex, time::Duration};

    use ballast_storage::Faults;
    use bytes::Bytes;

    use super::*;
    use crate::{Broker, Config, config::FaultSeam, queue::Publish};

    /// Queues whose next rereads fail, and how many.
    static REREAD_FAILURES: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());

    /// Whether a reread of `queue` should fail now (taking one failure).
    pub(super) fn reread_fails(queue: &crate::queue::QueueName) -> bool {
        let mut failures = REREAD_FAILURES.lock().expect("no test panics holding it");
        match failures.get_mut(queue.as_str()) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        }
    }

    async fn open(dir: &std::path::Path, faults: Option<Arc<Faults>>) -> Arc<Broker> {
        let config = Config { data_dir: dir.to_owned(), faults: FaultSeam(faults), ..Config::default() };
        Broker::open(config).unwrap()
    }

    fn messages(count: usize) -> Vec<Publish> {
        (0..count)
            .map(|i| Publish {
                payload: Bytes::from(format!("m{i}")),
                headers: vec![],
                key: None,
                lane: Some(0),
                delay_ms: 0,
                ttl_ms: 0,
            })
            .collect()
    }

    async fn next(subscription: &mut Subscription) -> Delivery {
        tokio::time::timeout(Duration::from_secs(10), subscription.deliveries.recv())
            .await
            .expect("a delivery within 10 s")
            .expect("the consumer is subscribed")
    }

    /// A lease past its deadline that the timer has not yet taken back is
    /// EXPIRED to an extend and stays as it is (it is redelivered, never
    /// revived); the same call extends a live lease of the caller's and
    /// leaves another consumer's alone.
    #[tokio::test]
    async fn an_expired_lease_is_not_extended() {
        let dir = tempfile::tempdir().unwrap();
        let broker = open(dir.path(), None).await;
        let queue = broker.create("extend", &Default::default()).await.unwrap();
        queue.publish(messages(3)).await.unwrap();
        let mut mine = queue.subscribe(2).unwrap();
        let mut theirs = queue.subscribe(1).unwrap();
        let (expired, live) = (next(&mut mine).await.delivery_id, next(&mut mine).await.delivery_id);
        let foreign = next(&mut theirs).await.delivery_id;
        // Past its deadline in the lease table only: the timer still sleeps
        // until the old deadline, so it cannot take the lease back first.
        let past = now_ms() - 1;
        queue.delivery.lock().leases.get_mut(&expired).unwrap().deadline_ms = past;
        let extensions = queue.extend(&[expired, live, foreign], 60_000, Holder::Consumer(mine.consumer_id)).unwrap();
        assert_eq!(extensions[0], Extension::Expired);
        assert!(
            matches!(extensions[1], Extension::Extended { lease_deadline_ms } if lease_deadline_ms > past + 59_000)
        );
        assert_eq!(extensions[2], Extension::NotLeased, "another consumer's lease");
        let state = queue.delivery.lock();
        assert_eq!(state.leases[&expired].deadline_ms, past, "the expired lease is left alone");
        let foreign_deadline = state.leases[&foreign].deadline_ms;
        assert!(state.expiries.contains(&(foreign_deadline, foreign)));
        assert_eq!(state.expiries.len(), 3, "one expiry entry per lease, the extended one moved");
    }

    /// An ack of several deliveries that storage refuses (the log is
    /// poisoned by a failed sync) leaves none of them stranded: each goes
    /// back to its lane and is delivered again, with its attempt uncounted.
    /// Before, the first failure returned and the other leases were gone:
    /// neither acked nor redelivered until a restart.
    #[tokio::test]
    async fn an_ack_storage_refuses_requeues_every_message() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let broker = open(dir.path(), Some(Arc::clone(&faults))).await;
        let queue = broker.create("acks", &Default::default()).await.unwrap();
        queue.publish(messages(3)).await.unwrap();
        let mut subscription = queue.subscribe(3).unwrap();
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(next(&mut subscription).await.delivery_id);
        }
        // Poison the lane's log: the next sync fails.
        faults.fail_sync_after(0);
        assert!(queue.publish(messages(1)).await.is_err(), "the sync fails");
        let holder = Holder::Consumer(subscription.consumer_id);
        assert!(queue.ack(&ids, false, holder).await.is_err(), "storage refuses the acks");
        assert_eq!(queue.delivery_figures().in_flight, 0);
        queue.add_credit(subscription.consumer_id, 3).unwrap();
        let mut again = Vec::new();
        for _ in 0..3 {
            let delivery = next(&mut subscription).await;
            assert_eq!(delivery.attempt, 1, "{delivery:?}");
            again.push(delivery.offset);
        }
        again.sort_unstable();
        assert_eq!(again, vec![0, 1, 2], "every message of the failed ack is delivered again");
    }

    /// A nacked message whose record cannot be read for the redelivery
    /// (an I/O error, not a CRC failure) is kept and delivered again once
    /// it can be read; before, `retry` returned and the message stayed
    /// unacked but undeliverable until a restart.
    #[tokio::test]
    async fn a_retry_that_cannot_read_the_message_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let broker = open(dir.path(), None).await;
        let queue = broker.create("unreadable", &Default::default()).await.unwrap();
        queue.publish(messages(1)).await.unwrap();
        let mut subscription = queue.subscribe(1).unwrap();
        let first = next(&mut subscription).await;
        REREAD_FAILURES.lock().unwrap().insert("unreadable".into(), 1);
        let holder = Holder::Consumer(subscription.consumer_id);
        queue.nack(first.delivery_id, 0, "try again", holder).await.unwrap();
        assert_eq!(REREAD_FAILURES.lock().unwrap()["unreadable"], 0, "the retry's read failed");
        queue.add_credit(subscription.consumer_id, 1).unwrap();
        let again = next(&mut subscription).await;
        assert_eq!(again.offset, first.offset);
        assert_eq!(again.payload, first.payload);
    }

    /// A consumer may settle only its own deliveries: another consumer's
    /// ack or nack of them is refused as an unknown delivery and changes
    /// nothing; a unary caller (Pull) may settle any delivery it can name.
    #[tokio::test]
    async fn a_consumer_cannot_settle_another_consumers_delivery() {
        let dir = tempfile::tempdir().unwrap();
        let broker = open(dir.path(), None).await;
        let queue = broker.create("bound", &Default::default()).await.unwrap();
        queue.publish(messages(2)).await.unwrap();
        let mut a = queue.subscribe(2).unwrap();
        let b = queue.subscribe(1).unwrap();
        let (one, two) = (next(&mut a).await, next(&mut a).await);
        let other = Holder::Consumer(b.consumer_id);
        let refused = queue.ack(&[one.delivery_id], false, other).await;
        assert!(matches!(refused, Err(BrokerError::UnknownDelivery { .. })), "{refused:?}");
        let refused = queue.nack(one.delivery_id, 0, "", other).await;
        assert!(matches!(refused, Err(BrokerError::UnknownDelivery { .. })), "{refused:?}");
        assert_eq!(queue.delivery_figures().in_flight, 2, "nothing changed");
        queue.ack(&[one.delivery_id], false, Holder::Consumer(a.consumer_id)).await.unwrap();
        queue.ack(&[two.delivery_id], false, Holder::AnyCaller).await.unwrap();
        assert_eq!(queue.delivery_figures().in_flight, 0);
    }

    /// More expired messages than one dispatch handles or hands to the
    /// timer ([`EXPIRING_MAX`]) are all dead-lettered, or dropped, over
    /// several passes, and the fresh message behind them is delivered: the
    /// bound splits the work, it does not stall it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expired_messages_past_expiring_max_are_handled_in_passes() {
        let dir = tempfile::tempdir().unwrap();
        let broker = open(dir.path(), None).await;
        let count = EXPIRING_MAX * 2 + 100;
        for (name, action) in [("expire-dead", ExpiredAction::DeadLetter), ("expire-drop", ExpiredAction::Drop)] {
            let request = crate::queue::SettingsRequest { expired_action: Some(action), ..Default::default() };
            let queue = broker.create(name, &request).await.unwrap();
            let mut left = count;
            while left > 0 {
                let batch = messages(left.min(1000)).into_iter().map(|m| Publish { ttl_ms: 1, ..m }).collect();
                queue.publish(batch).await.unwrap();
                left -= left.min(1000);
            }
            // Past the last message's 1 ms TTL.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let fresh = Publish { payload: Bytes::from_static(b"fresh"), ..messages(1).remove(0) };
            queue.publish(vec![fresh]).await.unwrap();
            let mut subscription = queue.subscribe(1).unwrap();
            assert_eq!(next(&mut subscription).await.payload, Bytes::from_static(b"fresh"), "{name}");
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let expected = (u64::from(action == ExpiredAction::DeadLetter), u64::from(action == ExpiredAction::Drop));
            loop {
                let figures = queue.delivery_figures();
                let counted = (figures.expired_dead_lettered, figures.expired_dropped);
                if counted == (expected.0 * count as u64, expected.1 * count as u64) {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "{name}: {counted:?} of {count}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let dead = queue.dead_letter.as_ref().unwrap().stats().lane_depths.iter().sum::<u64>();
            assert_eq!(dead, expected.0 * count as u64, "{name}");
            assert_eq!(queue.stats().lane_depths.iter().sum::<u64>(), 1, "{name}: only the delivered message");
        }
    }

    /// Delivery ids are random 64-bit numbers, not a counter: consecutive
    /// ids are not adjacent and their high bits vary.
    #[test]
    fn delivery_ids_are_random() {
        let ids: Vec<u64> = (0..200).map(|_| random_u64()).collect();
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ids.len());
        assert!(ids.windows(2).all(|w| w[0].abs_diff(w[1]) > 1 << 20), "adjacent ids: {ids:?}");
        let high = ids.iter().filter(|&&id| id >> 63 == 1).count();
        assert!((40..=160).contains(&high), "{high} of 200 ids have the top bit set");
    }
}
