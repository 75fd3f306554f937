//! `Queue`: one durable, dedicated queue with its lanes, publish path and
//! dedupe. Delivery lives in `delivery.rs`.
//!
//! Directory layout: `<data>/queues/<name>/queue.toml` (name, creation time,
//! settings; written last on creation, so a directory without it is an
//! interrupted creation) and `<data>/queues/<name>/lanes/<index>/` (one
//! storage log per lane).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ballast_storage::{
    AckError, AckKind, AppendError, Appended, Commit, Log, NewRecord, limits::RECORD_HEADER_SIZE, record::headers_size,
};
use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::{
    HEADER_EXPIRES_AT, HEADER_NOT_BEFORE, QueueName, QueueSettings, SettingsRequest, delivery::DeliveryState,
    quota::Turn,
};
use crate::{
    broker::Node,
    config::Config,
    dedupe::{Claims, Dedupe, Stored},
    error::{BrokerError, Refusal, RefusalReason, Result},
    limits::{
        BATCH_COUNT_MAX, DELAY_MS_MAX, HEADERS_COUNT_MAX, HEADERS_SIZE_MAX, KEY_SIZE_MAX, MESSAGE_TTL_MS_MAX,
        PUBLISH_HEADERS_COUNT_MAX, PUBLISH_HEADERS_SIZE_MAX, PUBLISH_THROTTLE_WAIT_MS_MAX, REFUSAL_HOLD_MS,
        RESERVED_HEADER_PREFIX, RESERVED_HEADERS_COUNT, RESERVED_HEADERS_SIZE, RETRY_AFTER_MS_MAX, RETRY_AFTER_MS_MIN,
    },
    now_ms,
};

/// A message to publish, validated by [`Queue::publish`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Publish {
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
    pub key: Option<Bytes>,
    /// `None`: the queue's default lane.
    pub lane: Option<u32>,
    pub delay_ms: u64,
    /// Time to live from now, in milliseconds; 0: the queue's
    /// `message_ttl_ms` alone. The earlier of the two deadlines applies.
    pub ttl_ms: u64,
}

/// Where a published message is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub lane: u32,
    pub offset: u64,
    /// The key was seen before: nothing was stored; this is the original.
    pub duplicate: bool,
}

/// A publish call's messages on their way to storage ([`Queue::store`]).
struct Batch {
    messages: Vec<Publish>,
    /// Per message: its lane.
    lanes: Vec<u32>,
    keys: Keys,
    /// The publish time of every message.
    now: u64,
    /// For a replicated queue: the leader's term the keys were looked up
    /// in (`Cluster::leader_term`).
    term: Option<u64>,
}

/// How a call's idempotency keys resolved ([`Queue::claim_keys`]).
struct Keys {
    /// Per message: the original receipt of a key stored before (nothing
    /// to store for it).
    seen: Vec<Option<Receipt>>,
    /// `(message, earlier message with the same key)`: stored once, for
    /// the earlier one; both get its receipt.
    repeats: Vec<(usize, usize)>,
    /// The keys the call claimed, resolved however the call ends.
    claims: Claims,
}

/// One lane's append of a publish call, not yet committed.
struct LaneAppend {
    lane: u32,
    first_offset: u64,
    /// The messages of the call appended, in order from `first_offset`.
    indexes: Vec<usize>,
    /// The storage commit to wait for; `None` for a replicated queue,
    /// whose append was committed by the cluster log.
    commit: Option<Commit>,
}

/// One lane's records of a publish call, built and not yet stored.
struct LaneBatch {
    lane: u32,
    indexes: Vec<usize>,
    records: Vec<NewRecord>,
}

/// Counts describing a queue now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages not done per lane (in-flight included).
    pub lane_depths: Vec<u64>,
    pub in_flight: u64,
    pub consumers: u32,
}

/// The persisted description of a queue (`queue.toml`).
#[derive(Debug, Serialize, Deserialize)]
struct QueueFile {
    name: String,
    created_at_ms: u64,
    settings: QueueSettings,
}

pub(crate) const QUEUE_FILE: &str = "queue.toml";

/// One queue.
pub struct Queue {
    pub name: QueueName,
    /// The settings in force: replaced whole by [`Queue::update_settings`]
    /// (after they are durable), read as a snapshot by each use.
    settings: parking_lot::RwLock<Arc<QueueSettings>>,
    /// Serializes settings updates: one writes `queue.toml` at a time.
    settings_update: Mutex<()>,
    pub created_at_ms: u64,
    /// Where the queue's files are.
    pub(crate) dir: PathBuf,
    /// One log per lane, index = lane.
    pub(crate) lanes: Vec<Arc<Log>>,
    /// The dead-letter queue, if the queue has one.
    pub(crate) dead_letter: Option<Arc<Queue>>,
    pub(crate) node: Arc<Node>,
    /// Per lane: counters and smoothed rates for the saturation figures.
    pub(crate) meters: Vec<super::saturation::LaneMeter>,
    pub(crate) refused: super::saturation::Refused,
    /// Expired messages since start (`delivery.rs`).
    pub(crate) expired: super::delivery::ExpiredCounters,
    /// The publish quota (`max_publish_rate`, `max_publish_byte_rate`).
    quota: super::quota::Quota,
    /// Per lane: offsets below this are durable and may be delivered.
    pub(crate) durable: Vec<std::sync::atomic::AtomicU64>,
    /// Idempotency keys; shared with the [`Claims`] of calls in progress.
    dedupe: Arc<Mutex<Dedupe>>,
    /// Admitted counts not yet in the logs (see `Queue::admit`).
    pub(crate) admitting: super::saturation::Admitting,
    pub(crate) delivery: Mutex<DeliveryState>,
    /// Wakes the queue's timer task (leases, delays) when deadlines change.
    pub(crate) timer_wake: Arc<Notify>,
    /// Set when the queue is deleted or the broker shuts down.
    pub(crate) closed: AtomicBool,
    /// Set when the queue is deleted: its directory goes when it drops.
    pub(crate) removed: AtomicBool,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // Let the timer task see the queue is gone.
        self.timer_wake.notify_one();
        if self.removed.load(Ordering::Acquire) {
            // Close the logs first (sync and stop their flushers), then remove.
            self.lanes.clear();
            remove_in_background(&self.dir);
        }
    }
}

/// Removes a deleted queue's directory on a thread of its own: unlinking
/// gigabytes of segments takes seconds, and the last reference to a queue
/// may drop on a runtime worker that other queues' calls need. Each queue
/// directory has its own generation suffix, so a queue of the same name
/// created meanwhile is elsewhere; a crash before the removal ends leaves a
/// directory without `queue.toml`, which the next start removes.
pub(crate) fn remove_in_background(dir: &Path) {
    let remove = |dir: &Path| {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "removing a deleted queue's files");
        }
    };
    let spawned = std::thread::Builder::new().name("queue-remove".into()).spawn({
        let dir = dir.to_owned();
        move || remove(&dir)
    });
    if spawned.is_err() {
        remove(dir);
    }
}

impl Queue {
    /// Creates the queue's files: lane logs first, `queue.toml` last.
    pub(crate) fn create(
        dir: &Path,
        name: QueueName,
        settings: QueueSettings,
        config: &Config,
        node: Arc<Node>,
        dead_letter: Option<Arc<Queue>>,
    ) -> Result<Arc<Queue>> {
        let created_at_ms = now_ms();
        std::fs::create_dir_all(dir.join("lanes")).map_err(|e| storage_error(dir, e))?;
        let queue = Queue::open_logs(dir, name, settings, created_at_ms, config, node, dead_letter)?;
        queue.write_file(&queue.settings())?;
        Ok(queue)
    }

    /// Writes `queue.toml` with `settings`: a temporary file, synced, renamed
    /// over the old one, and the directory synced, so a crash leaves the old
    /// file or the new one.
    fn write_file(&self, settings: &QueueSettings) -> Result<()> {
        let file =
            QueueFile { name: self.name.to_string(), created_at_ms: self.created_at_ms, settings: settings.clone() };
        let text = toml::to_string(&file).map_err(|e| BrokerError::Storage(e.to_string()))?;
        write_atomically(&self.dir, QUEUE_FILE, text.as_bytes()).map_err(|e| storage_error(&self.dir, e))
    }

    /// The settings in force now (a snapshot: an update replaces them).
    pub fn settings(&self) -> Arc<QueueSettings> {
        Arc::clone(&self.settings.read())
    }

    /// Applies `changes` (unset fields keep their value) to the live queue:
    /// validated like a creation, refused whole if it would change a
    /// setting that cannot change on a live queue, written to `queue.toml`
    /// durably, and only then put in force. Returns the keys that changed
    /// (empty: nothing to do, nothing written).
    pub fn update_settings(&self, changes: &SettingsRequest) -> Result<Vec<&'static str>> {
        let one_at_a_time = self.settings_update.lock();
        let current = self.settings();
        let updated = current.updated(changes)?;
        let changed = current.changed_keys(&updated);
        if changed.is_empty() {
            return Ok(changed);
        }
        self.write_file(&updated)?;
        self.quota.set_rates(updated.max_publish_rate, updated.max_publish_byte_rate);
        self.dedupe.lock().set_window(updated.dedupe_window_ms);
        for log in &self.lanes {
            log.set_dedupe_window_ms(updated.dedupe_window_ms);
        }
        *self.settings.write() = Arc::new(updated);
        // A lower limit or threshold may refuse what is queued for
        // admission; a longer lease applies to the next delivery; a new
        // delivery pace or TTL applies to this dispatch.
        drop(one_at_a_time);
        self.dispatch();
        Ok(changed)
    }

    /// Reads a queue directory's `queue.toml`: the queue's name, settings
    /// and creation time.
    pub(crate) fn read_settings(dir: &Path) -> Result<(QueueName, QueueSettings, u64)> {
        let file = Queue::read_file(dir)?;
        Ok((QueueName::parse(&file.name)?, file.settings, file.created_at_ms))
    }

    fn read_file(dir: &Path) -> Result<QueueFile> {
        let path = dir.join(QUEUE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| storage_error(&path, e))?;
        let file: QueueFile =
            toml::from_str(&text).map_err(|e| BrokerError::Storage(format!("{}: {e}", path.display())))?;
        file.settings.validate()?;
        Ok(file)
    }

    /// Opens a queue's lane logs (recovery) and builds its state, from
    /// the settings of its `queue.toml`.
    pub(crate) fn open_logs(
        dir: &Path,
        name: QueueName,
        settings: QueueSettings,
        created_at_ms: u64,
        config: &Config,
        node: Arc<Node>,
        dead_letter: Option<Arc<Queue>>,
    ) -> Result<Arc<Queue>> {
        let options = config.log_options(&settings);
        let mut lanes = Vec::with_capacity(settings.lanes.len());
        for index in 0..settings.lanes.len() {
            let log = Log::open(dir.join("lanes").join(index.to_string()), options.clone())?;
            lanes.push(Arc::new(log));
        }
        let mut dedupe = Dedupe::new(settings.dedupe_window_ms);
        let mut keys: Vec<(u64, Bytes, Stored)> = Vec::new();
        for (lane, log) in lanes.iter().enumerate() {
            let lane = u32::try_from(lane).expect("at most LANES_MAX lanes");
            keys.extend(
                log.take_recovered_keys()
                    .into_iter()
                    .map(|k| (k.timestamp_ms, k.key, Stored { lane, offset: k.offset })),
            );
        }
        keys.sort_by_key(|(t, _, _)| *t);
        dedupe.recover(keys);
        let delivery = DeliveryState::new(&lanes, &settings);
        let durable = lanes.iter().map(|log| std::sync::atomic::AtomicU64::new(log.next_offset())).collect();
        let meters = lanes.iter().map(|log| super::saturation::LaneMeter::new(initial_bytes(&name, log))).collect();
        let quota = super::quota::Quota::new(
            settings.max_publish_rate,
            settings.max_publish_byte_rate,
            settings.lanes.len(),
            std::time::Instant::now(),
        );
        let queue = Arc::new(Queue {
            name,
            settings: parking_lot::RwLock::new(Arc::new(settings)),
            settings_update: Mutex::new(()),
            created_at_ms,
            dir: dir.to_owned(),
            lanes,
            dead_letter,
            node,
            durable,
            meters,
            refused: super::saturation::Refused::default(),
            expired: super::delivery::ExpiredCounters::default(),
            quota,
            dedupe: Arc::new(Mutex::new(dedupe)),
            admitting: super::saturation::Admitting::default(),
            delivery: Mutex::new(delivery),
            timer_wake: Arc::new(Notify::new()),
            closed: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        });
        super::delivery::spawn_timer(&queue);
        Ok(queue)
    }

    /// Deletes the queue durably (its `queue.toml` goes first, so a crash
    /// from here on leaves a directory that the next start removes); the
    /// files go when the last reference drops.
    pub(crate) fn mark_removed(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        let path = self.dir.join(QUEUE_FILE);
        std::fs::remove_file(&path).map_err(|e| storage_error(&path, e))?;
        std::fs::File::open(&self.dir).and_then(|f| f.sync_all()).map_err(|e| storage_error(&self.dir, e))?;
        self.removed.store(true, Ordering::Release);
        Ok(())
    }

    /// The name of the queue's dead-letter queue, if it has one.
    pub fn dead_letter_name(&self) -> Option<String> {
        self.dead_letter.as_ref().map(|q| q.name.to_string())
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Lane `lane`'s counters and histograms, registered on first use (an
    /// idle lane holds no series).
    pub(crate) fn lane_metrics(&self, lane: usize) -> &crate::metrics::LaneMetrics {
        // The settings snapshot (a lock and an Arc) is read only when the
        // lane's series are first registered.
        self.meters[lane].metrics.get(self.name.as_str(), || self.settings().lanes[lane].clone())
    }

    /// Whether lane `lane`'s log can write (it is not poisoned).
    pub fn lane_writable(&self, lane: usize) -> bool {
        self.lanes[lane].poisoned().is_none()
    }

    /// Whether every lane can write (no log of the queue is poisoned).
    pub fn is_writable(&self) -> bool {
        (0..self.lanes.len()).all(|lane| self.lane_writable(lane))
    }

    /// The queue's lanes: one log each, fixed for the queue's life (an
    /// update cannot change them), so no settings snapshot is read.
    pub fn lane_count(&self) -> u32 {
        u32::try_from(self.lanes.len()).expect("at most LANES_MAX lanes")
    }

    pub fn stats(&self) -> QueueStats {
        let lane_depths = self.lanes.iter().map(|log| log.stats().pending).collect();
        let delivery = self.delivery.lock();
        QueueStats {
            lane_depths,
            in_flight: delivery.in_flight_count(),
            consumers: u32::try_from(delivery.consumer_count()).unwrap_or(u32::MAX),
        }
    }

    /// Publishes messages: validated together, deduplicated by key, appended
    /// per lane (one append, so all or none, per lane), answered once durable
    /// under the queue's sync policy.
    ///
    /// Once the call's keys are claimed, the rest (admission, appends,
    /// commits, recording the keys) runs in a task of its own that the call
    /// awaits ([`Queue::store`]). A call dropped halfway (a client deadline
    /// or disconnect drops the handler) therefore never leaves records
    /// appended but their keys unrecorded: the task completes, and a retry
    /// with the same key is answered as a duplicate instead of storing the
    /// message twice.
    pub async fn publish(self: &Arc<Self>, messages: Vec<Publish>) -> Result<Vec<Receipt>> {
        if messages.is_empty() {
            return Err(BrokerError::InvalidArgument("a publish needs at least one message".into()));
        }
        if messages.len() > BATCH_COUNT_MAX {
            return Err(BrokerError::InvalidArgument(format!(
                "a batch holds at most {BATCH_COUNT_MAX} messages; got {}",
                messages.len()
            )));
        }
        let lanes: Vec<u32> = messages.iter().enumerate().map(|(i, m)| self.validate(i, m)).collect::<Result<_>>()?;
        if self.is_closed() {
            return Err(BrokerError::QueueNotFound(self.name.to_string()));
        }
        if self.quota.is_limited() {
            self.wait_for_quota(&messages, &lanes).await?;
            // The queue may have been deleted during the wait.
            if self.is_closed() {
                return Err(BrokerError::QueueNotFound(self.name.to_string()));
            }
        }
        // A replicated queue looks its keys up only once this node, as
        // leader, has applied every entry of earlier terms: a key stored
        // by the previous leader is then in the index.
        let term = match self.replicated() {
            Some(cluster) => Some(cluster.leader_term(self.name.as_str()).await?),
            None => None,
        };
        let now = now_ms();
        let keys = self.claim_keys(&messages, now).await;
        let queue = Arc::clone(self);
        let stored = tokio::spawn(async move { queue.store(Batch { messages, lanes, keys, now, term }).await });
        let outcome = match stored.await {
            Ok(receipts) => receipts,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            // The runtime is shutting down.
            Err(_) => Err(BrokerError::ShuttingDown),
        };
        if let Err(BrokerError::Refused(refusal)) = &outcome
            && matches!(refusal.reason, RefusalReason::QueueFull { .. } | RefusalReason::DiskLow { .. })
        {
            // Answered a little later, holding nothing (no slot, no key,
            // the messages dropped): a producer that retries refusals at
            // once makes at most one call per REFUSAL_HOLD_MS per call in
            // flight, instead of taking the node's CPU with requests
            // decoded only to be refused.
            tokio::time::sleep(Duration::from_millis(REFUSAL_HOLD_MS)).await;
        }
        outcome
    }

    /// Resolves the call's idempotency keys: a key stored before answers
    /// with its original receipt; a key repeated within the batch is
    /// stored once (for its first message); every other key is claimed.
    async fn claim_keys(&self, messages: &[Publish], now: u64) -> Keys {
        let mut keys =
            Keys { seen: vec![None; messages.len()], repeats: Vec::new(), claims: Claims::new(&self.dedupe) };
        let mut first_of_key: HashMap<&Bytes, usize> = HashMap::new();
        for (i, message) in messages.iter().enumerate() {
            let Some(key) = &message.key else { continue };
            if let Some(&first) = first_of_key.get(key) {
                keys.repeats.push((i, first));
                continue;
            }
            first_of_key.insert(key, i);
            if let Some(at) = keys.claims.claim(i, key, now).await {
                keys.seen[i] = Some(Receipt { lane: at.lane, offset: at.offset, duplicate: true });
            }
        }
        keys
    }

    /// The part of a publish that runs to its end once begun, whatever
    /// happens to the call (see [`Queue::publish`]): admission, one append
    /// per lane, the commits, and the keys recorded for every lane whose
    /// commit resolved. If a lane fails, the lanes appended before it are
    /// still committed and their keys recorded (so a retry of the batch
    /// stores only what is missing); the call then fails.
    async fn store(self: Arc<Self>, batch: Batch) -> Result<Vec<Receipt>> {
        let Batch { messages, lanes, keys, now, term } = batch;
        // The node's publish work is shared fairly between queues: wait
        // for a slot in this queue's line (`fair.rs`), held until the
        // records are appended. Taken here, in the task that does the
        // work, so that a slot is never held while that task waits to be
        // scheduled; after the keys, so a call waiting on another's claim
        // holds none.
        let slot = self.node.fair().acquire(&self.name).await;
        let Keys { seen, repeats, mut claims } = keys;
        // What to store: one record per message that is neither a duplicate
        // nor a repeat of an earlier key in the batch. Admission decides on
        // the sizes alone; the records are built only for an admitted batch,
        // so a refusal stays cheap.
        let mut to_store: Vec<bool> = seen.iter().map(Option::is_none).collect();
        for &(i, _) in &repeats {
            to_store[i] = false;
        }
        let mut adding = vec![(0u64, 0u64); self.lanes.len()];
        for (i, message) in messages.iter().enumerate().filter(|&(i, _)| to_store[i]) {
            let lane = &mut adding[lanes[i] as usize];
            lane.0 += 1;
            lane.1 += stored_size(message, now);
        }
        let started = std::time::Instant::now();
        let admitted = self.admit(&adding)?;
        let batches = self.lane_batches(&messages, &to_store, &lanes, now);
        let (appended, mut failure) = match self.replicated().cloned() {
            None => {
                let appended = self.append(batches);
                // The CPU part is done; the commit wait holds no slot.
                drop(slot);
                appended
            }
            Some(cluster) => {
                // The cluster log's round trip holds no slot.
                drop(slot);
                self.append_replicated(&cluster, batches, term).await
            }
        };
        // The records are in their logs' counts now (or were not stored).
        drop(admitted);

        // A stored message gets its receipt once durable.
        let mut receipts = seen;
        for lane in appended {
            if let Some(commit) = lane.commit
                && let Err(error) = commit.await
            {
                failure.get_or_insert(error.into());
                continue;
            }
            let count = lane.indexes.len() as u64;
            self.mark_durable(lane.lane, lane.first_offset + count);
            for (n, &i) in lane.indexes.iter().enumerate() {
                receipts[i] = Some(Receipt { lane: lane.lane, offset: lane.first_offset + n as u64, duplicate: false });
            }
            let meter = &self.meters[lane.lane as usize];
            meter.published.fetch_add(count, Ordering::Relaxed);
            let metrics = self.lane_metrics(lane.lane as usize);
            metrics.published.increment(count);
            metrics.publish_durable.record(started.elapsed().as_secs_f64());
        }
        // A claimed key's message has a receipt exactly when it is durable.
        claims.stored(|i| receipts[i].map(|r| Stored { lane: r.lane, offset: r.offset }), now);
        // Whatever became durable is delivered, whether or not the call
        // succeeds as a whole.
        self.dispatch();
        if let Some(error) = failure {
            if matches!(error, BrokerError::DiskFull { .. }) {
                // Counted with the watermark's refusals: the producer sees
                // RESOURCE_EXHAUSTED, `ballast-reason: disk_full`.
                self.refused.disk_full.fetch_add(1, Ordering::Relaxed);
                let lane = adding.iter().position(|(n, _)| *n > 0).unwrap_or(0);
                self.lane_metrics(lane).refused_disk_full.increment(1);
            }
            // `claims` drops here: the claims not recorded are abandoned.
            return Err(error);
        }
        for (i, first) in repeats {
            receipts[i] = receipts[first].map(|r| Receipt { duplicate: true, ..r });
        }
        Ok(receipts.into_iter().map(|r| r.expect("every message has a receipt")).collect())
    }

    /// Waits for the call's turn under the publish quota (see
    /// `queue/quota.rs`). The call waits as its lowest-priority lane: on
    /// that lane's line, for at most that lane's admission fraction of
    /// `PUBLISH_THROTTLE_WAIT_MS_MAX`. A call whose turn is further away is
    /// refused after waiting that long, so that a producer ignoring
    /// refusals is slowed as much as one that waits.
    async fn wait_for_quota(&self, messages: &[Publish], lanes: &[u32]) -> Result<()> {
        let now = now_ms();
        let count_bytes = self.quota.limits_bytes();
        let mut costs = vec![(0u64, 0u64); self.lanes.len()];
        for (message, &lane) in messages.iter().zip(lanes) {
            let cost = &mut costs[lane as usize];
            cost.0 += 1;
            if count_bytes {
                cost.1 += stored_size(message, now);
            }
        }
        let count = messages.len() as u64;
        let lane = lanes.iter().copied().max().unwrap_or(0);
        let settings = self.settings();
        let fraction = |lane: u32| settings.lane_admission[lane as usize];
        let max_wait = Duration::from_millis(PUBLISH_THROTTLE_WAIT_MS_MAX).mul_f64(fraction(lane));
        match self.quota.reserve(std::time::Instant::now(), lane as usize, &costs, max_wait) {
            Turn::Wait(wait) if wait.is_zero() => Ok(()),
            Turn::Wait(wait) => {
                self.refused.throttled.fetch_add(1, Ordering::Relaxed);
                let us = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
                self.refused.throttled_us.fetch_add(us, Ordering::Relaxed);
                self.lane_metrics(lane as usize).publish_throttle.record(wait.as_secs_f64());
                tokio::time::sleep(wait).await;
                Ok(())
            }
            Turn::Refused { wait } => {
                tokio::time::sleep(max_wait).await;
                if self.is_closed() {
                    return Err(BrokerError::QueueNotFound(self.name.to_string()));
                }
                self.refused.publish_rate.fetch_add(1, Ordering::Relaxed);
                self.lane_metrics(lane as usize).refused_publish_rate.increment(1);
                let (figures, _) = self.figures_with(false);
                let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                // Counted above only under a byte rate; the message names them.
                let bytes = if count_bytes {
                    costs.iter().map(|(_, b)| b).sum()
                } else {
                    messages.iter().map(|m| stored_size(m, now)).sum()
                };
                Err(BrokerError::Refused(Box::new(Refusal {
                    queue: self.name.to_string(),
                    lane: settings.lanes[lane as usize].clone(),
                    lane_index: lane,
                    figures,
                    threshold: fraction(lane),
                    retry_after_ms: ms(wait - max_wait).clamp(RETRY_AFTER_MS_MIN, RETRY_AFTER_MS_MAX),
                    reason: RefusalReason::PublishRate {
                        max_publish_rate: settings.max_publish_rate,
                        max_publish_byte_rate: settings.max_publish_byte_rate,
                        batch_messages: count,
                        batch_bytes: bytes,
                        wait_ms: ms(wait),
                        max_wait_ms: ms(max_wait),
                    },
                })))
            }
        }
    }

    /// The records of the messages marked `to_store`, one batch per lane
    /// in lane order.
    fn lane_batches(&self, messages: &[Publish], to_store: &[bool], lanes: &[u32], now: u64) -> Vec<LaneBatch> {
        let mut batches = Vec::new();
        for lane in 0..self.lane_count() {
            let indexes: Vec<usize> = (0..messages.len()).filter(|&i| lanes[i] == lane && to_store[i]).collect();
            if indexes.is_empty() {
                continue;
            }
            let records = indexes.iter().map(|&i| to_record(&messages[i], now)).collect();
            batches.push(LaneBatch { lane, indexes, records });
        }
        batches
    }

    /// Appends the batches, one append per lane. Stops at the first lane
    /// whose append fails and returns its error with the lanes appended
    /// before it, which are stored and must be committed.
    fn append(&self, batches: Vec<LaneBatch>) -> (Vec<LaneAppend>, Option<BrokerError>) {
        let mut appended = Vec::new();
        for LaneBatch { lane, indexes, records } in batches {
            match self.append_to(lane, &records) {
                Ok(done) => appended.push(LaneAppend {
                    lane,
                    first_offset: done.first_offset,
                    indexes,
                    commit: Some(done.commit),
                }),
                Err(error) => return (appended, Some(error.into())),
            }
        }
        (appended, None)
    }

    /// The same for a replicated queue: one `Append` entry per lane,
    /// proposed to the cluster log in lane order and awaited until
    /// committed and applied here (`docs/replication.md`). `term` is the
    /// one the keys were looked up in: an entry written in another term
    /// stores nothing.
    async fn append_replicated(
        &self,
        cluster: &crate::cluster::node::Cluster,
        batches: Vec<LaneBatch>,
        term: Option<u64>,
    ) -> (Vec<LaneAppend>, Option<BrokerError>) {
        let mut appended = Vec::new();
        for LaneBatch { lane, indexes, records } in batches {
            match self.propose_append(cluster, lane, term, records).await {
                Ok(first_offset) => appended.push(LaneAppend { lane, first_offset, indexes, commit: None }),
                Err(error) => return (appended, Some(error)),
            }
        }
        (appended, None)
    }

    /// Proposes one `Append` of `records` to `lane`; returns the offset of
    /// the first, once committed and applied on this node.
    async fn propose_append(
        &self,
        cluster: &crate::cluster::node::Cluster,
        lane: u32,
        term: Option<u64>,
        records: Vec<NewRecord>,
    ) -> Result<u64> {
        // Moved, not copied: the records were built for this proposal.
        let command = crate::cluster::Command::Append {
            queue: self.name.to_string(),
            lane,
            term,
            records: records.into_iter().map(crate::cluster::RecordData::from_record).collect(),
        };
        match cluster.propose(self.name.as_str(), command).await? {
            crate::cluster::Applied::Appended { first_offset } => Ok(first_offset),
            other => Err(BrokerError::Cluster(format!("an append was applied as {other:?}"))),
        }
    }

    /// The cluster log, if this queue is replicated and this node runs one.
    /// Asked on every ack and publish: a node without a cluster answers
    /// without reading the settings snapshot.
    pub(crate) fn replicated(&self) -> Option<&Arc<crate::cluster::node::Cluster>> {
        self.node.cluster().filter(|_| self.settings().replicas > 1)
    }

    /// Applies a cluster log `Append` (every replica, the leader too):
    /// stores the records from `expected` on (the offset the cluster log
    /// says the first takes), skipping those a replay finds already
    /// stored; records their keys for dedupe; makes them deliverable
    /// (committed by the cluster, so durable). Returns `expected`.
    pub(crate) fn apply_append(&self, lane: u32, expected: u64, records: &[NewRecord]) -> Result<u64> {
        let log = self.lanes.get(lane as usize).ok_or_else(|| {
            BrokerError::InvalidArgument(format!("lane {lane} does not exist in queue {}", self.name))
        })?;
        let next = log.next_offset();
        let count = records.len() as u64;
        if next < expected {
            return Err(BrokerError::Storage(format!(
                "lane {lane} of {} ends at offset {next} but the cluster log's sync point says {expected}: this \
                 node's copy lost records; re-seed it from a follower's copy",
                self.name
            )));
        }
        let stored = (next - expected).min(count);
        if stored < count {
            // The lane's own sync is the flusher's; the cluster log holds
            // the records durably meanwhile.
            let appended = self.append_to(lane, &records[stored as usize..])?;
            debug_assert_eq!(appended.first_offset, expected + stored);
        }
        self.mark_durable(lane, expected + count);
        {
            let mut dedupe = self.dedupe.lock();
            for (i, record) in records.iter().enumerate() {
                if let Some(key) = &record.key {
                    let at = Stored { lane, offset: expected + i as u64 };
                    dedupe.applied(key.clone(), at, record.timestamp_ms);
                }
            }
        }
        self.dispatch();
        Ok(expected)
    }

    /// Applies a cluster log `Ack`: each record not done yet is marked
    /// done (the leader's own acks are done already and skipped).
    pub(crate) fn apply_ack(&self, lane: u32, acks: &[(u64, u64)], kind: u8) -> Result<()> {
        if lane >= self.lane_count() {
            return Err(BrokerError::InvalidArgument(format!("lane {lane} does not exist in queue {}", self.name)));
        }
        let kind = match kind {
            2 => AckKind::DeadLettered,
            _ => AckKind::Acked,
        };
        for &(offset, size) in acks {
            if offset < self.lanes[lane as usize].next_offset() {
                drop(self.ack_record_local(lane, offset, size, kind)?);
            }
        }
        Ok(())
    }

    /// Applies a cluster log `Purge`: every record of `lane` below `end`
    /// done, the lane's bytes counted again.
    pub(crate) fn apply_purge(&self, lane: u32, end: u64) -> Result<()> {
        let log = self.lanes.get(lane as usize).ok_or_else(|| {
            BrokerError::InvalidArgument(format!("lane {lane} does not exist in queue {}", self.name))
        })?;
        {
            let _exclusive = self.meters[lane as usize].backlog_sync.write();
            let floor = log.ack_floor();
            let end = end.min(log.next_offset());
            if end > floor {
                drop(log.ack(floor, end - floor, AckKind::Acked)?);
            }
        }
        self.recount_bytes(lane as usize);
        Ok(())
    }

    /// Checks one message against the queue's limits; returns its lane.
    fn validate(&self, index: usize, message: &Publish) -> Result<u32> {
        let which = |what: String| BrokerError::InvalidArgument(format!("message {index}: {what}"));
        let size = message.payload.len();
        let settings = self.settings();
        if size > settings.message_size_max as usize {
            return Err(which(format!(
                "payload is {size} bytes; queue {} accepts at most {} (message_size_max)",
                self.name, settings.message_size_max
            )));
        }
        let lane = message.lane.unwrap_or(settings.default_lane);
        if lane >= self.lane_count() {
            return Err(which(format!(
                "lane {lane} does not exist; queue {} has lanes 0..{}",
                self.name,
                self.lane_count()
            )));
        }
        if let Some(key) = &message.key
            && key.len() > KEY_SIZE_MAX as usize
        {
            return Err(which(format!("idempotency key is {} bytes; the limit is {KEY_SIZE_MAX}", key.len())));
        }
        // Checked here, not left to storage: a batch must be refused whole
        // before any lane stores anything. The room the broker keeps for its
        // own headers (the delay's, a redelivery's, a dead letter's) is not
        // the publisher's, so that every message published can always be
        // stored again with them.
        // A TTL's `ballast-expires-at` header is the message's own: it
        // takes one of the publisher's headers, not the broker's reserve.
        let ttl_header = message.ttl_ms > 0;
        let headers_count = message.headers.len() + usize::from(ttl_header);
        if headers_count > PUBLISH_HEADERS_COUNT_MAX as usize {
            let ttl_note = if ttl_header { "; a ttl_ms takes one" } else { "" };
            return Err(which(format!(
                "{headers_count} headers; the limit is {PUBLISH_HEADERS_COUNT_MAX} ({HEADERS_COUNT_MAX} less \
                 {RESERVED_HEADERS_COUNT} kept for the broker's headers){ttl_note}",
            )));
        }
        let headers_size = headers_size(&message.headers) + if ttl_header { EXPIRES_AT_HEADER_SIZE } else { 0 };
        if headers_size > u64::from(PUBLISH_HEADERS_SIZE_MAX) {
            return Err(which(format!(
                "headers take {headers_size} bytes encoded (name and value plus 6 bytes each); the limit is \
                 {PUBLISH_HEADERS_SIZE_MAX} ({HEADERS_SIZE_MAX} less {RESERVED_HEADERS_SIZE} kept for the broker's headers)"
            )));
        }
        // Only a small `storage.segment_size` makes this bind: records
        // then cannot outgrow a segment, and neither can their copies.
        let key_len = message.key.as_ref().map_or(0, Bytes::len);
        let record_size = ballast_storage::record::encoded_len(key_len, &message.headers, size)
            + if ttl_header { EXPIRES_AT_HEADER_SIZE } else { 0 };
        let record_size_max = u64::from(self.lanes[lane as usize].options().record_size_max);
        if record_size + u64::from(RESERVED_HEADERS_SIZE) > record_size_max {
            return Err(which(format!(
                "the record takes {record_size} bytes (payload, key and headers plus a {RECORD_HEADER_SIZE}-byte header) \
                 and its copies {RESERVED_HEADERS_SIZE} more for the broker's headers; this broker's segments hold \
                 records of at most {record_size_max} bytes (storage.segment_size)"
            )));
        }
        if let Some((name, _)) = message.headers.iter().find(|(name, _)| name.starts_with(RESERVED_HEADER_PREFIX)) {
            return Err(which(format!("header {name:?} uses the reserved prefix {RESERVED_HEADER_PREFIX:?}")));
        }
        if message.delay_ms > DELAY_MS_MAX {
            return Err(which(format!("delay is {} ms; the limit is {DELAY_MS_MAX}", message.delay_ms)));
        }
        if message.ttl_ms > MESSAGE_TTL_MS_MAX {
            return Err(which(format!(
                "ttl_ms is {}; the limit is {MESSAGE_TTL_MS_MAX} (MESSAGE_TTL_MS_MAX, 14 days)",
                message.ttl_ms
            )));
        }
        Ok(lane)
    }

    /// Appends records to one lane as they are (redelivery, dead letters)
    /// and waits until durable.
    pub(crate) async fn append_raw(&self, lane: u32, record: NewRecord) -> Result<u64> {
        if let Some(cluster) = self.replicated().cloned() {
            // No key is looked up for these: any term will do.
            return self.propose_append(&cluster, lane, None, vec![record]).await;
        }
        let appended = self.append_to(lane, &[record])?;
        appended.commit.await?;
        self.mark_durable(lane, appended.first_offset + 1);
        Ok(appended.first_offset)
    }

    /// Appends to one lane's log and counts the records' bytes, in one step
    /// for purges and recounts (see `LaneMeter::backlog_sync`). The bytes
    /// are counted before the records can be delivered, so before any ack
    /// takes them off.
    fn append_to(&self, lane: u32, records: &[NewRecord]) -> Result<Appended, AppendError> {
        let meter = &self.meters[lane as usize];
        let _shared = meter.backlog_sync.read();
        let appended = self.lanes[lane as usize].append(records)?;
        meter.backlog_bytes.fetch_add(records.iter().map(NewRecord::stored_size).sum::<u64>(), Ordering::Relaxed);
        Ok(appended)
    }

    /// Marks one record done and takes its `size` off the lane's byte
    /// count, in one step. `None`: it was already done (a purge got there
    /// first), so nothing changed.
    pub(crate) fn ack_record(
        &self,
        lane: u32,
        offset: u64,
        size: u64,
        kind: AckKind,
    ) -> Result<Option<Commit>, AckError> {
        let commit = self.ack_record_local(lane, offset, size, kind)?;
        if commit.is_some()
            && let Some(cluster) = self.replicated()
        {
            cluster.propose_ack(self.name.as_str(), lane, offset, size, kind as u8);
        }
        Ok(commit)
    }

    /// [`Queue::ack_record`] on this node only.
    fn ack_record_local(&self, lane: u32, offset: u64, size: u64, kind: AckKind) -> Result<Option<Commit>, AckError> {
        let log = &self.lanes[lane as usize];
        let meter = &self.meters[lane as usize];
        let _shared = meter.backlog_sync.read();
        if log.is_done(offset) {
            return Ok(None);
        }
        let commit = log.ack(offset, 1, kind)?;
        let before = meter
            .backlog_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bytes| Some(bytes.saturating_sub(size)))
            .unwrap_or_else(|bytes| bytes);
        debug_assert!(before >= size, "lane {lane} byte count {before} below a record of {size}");
        Ok(Some(commit))
    }

    /// Sets a lane's byte count from its log after storage quarantined
    /// records (a read or the cursor found them corrupt and marked them
    /// done, which the count does not see). No append or ack of the lane
    /// runs meanwhile (`backlog_sync`), so it is exact. If the log cannot count either (damage not quarantined
    /// yet), the count keeps the quarantined records until the next
    /// quarantine or a restart corrects it.
    pub(crate) fn recount_bytes(&self, lane: usize) {
        let meter = &self.meters[lane];
        let _exclusive = meter.backlog_sync.write();
        match self.lanes[lane].pending_bytes() {
            Ok(bytes) => meter.backlog_bytes.store(bytes, Ordering::Relaxed),
            Err(error) => {
                tracing::warn!(queue = %self.name, lane, %error, "lane bytes keep quarantined records until a restart");
            }
        }
    }

    /// Notes that every offset of `lane` below `end` is durable: appends are
    /// sequential and a sync covers everything written before it, so a
    /// resolved commit vouches for all earlier offsets too. Delivery never
    /// reads past this point, so no consumer sees a message whose publish
    /// could still be lost (no phantom deliveries after a power loss).
    pub(crate) fn mark_durable(&self, lane: u32, end: u64) {
        self.durable[lane as usize].fetch_max(end, Ordering::AcqRel);
    }
}

/// Bytes of the records of `log` not yet done: what a lane's byte count
/// starts from when its queue opens. From storage's positions
/// (`Log::pending_bytes`: O(segments + index interval × done ranges), not
/// O(backlog)); if that meets damaged records not yet quarantined, the
/// unacked records are read once instead, through a cursor that
/// quarantines the damaged ones as delivery would.
fn initial_bytes(queue: &QueueName, log: &Log) -> u64 {
    match log.pending_bytes() {
        Ok(bytes) => bytes,
        Err(error) => {
            tracing::warn!(%queue, dir = %log.dir().display(), %error, "counting the lane's bytes by reading its backlog");
            backlog_bytes(queue, log)
        }
    }
}

/// Bytes of the records of `log` not yet done, read one by one (the
/// fallback of [`initial_bytes`]).
fn backlog_bytes(queue: &QueueName, log: &Log) -> u64 {
    let mut cursor = log.cursor(log.ack_floor());
    let mut bytes = 0;
    while let Some(next) = cursor.next() {
        match next {
            Ok(record) => bytes += record.stored_size(),
            Err(error) => tracing::error!(%queue, %error, "skipping corrupt records"),
        }
    }
    bytes
}

/// The stored size of the record [`to_record`] makes of `message`, without
/// making it (no copy of the headers unless the message is delayed).
fn stored_size(message: &Publish, now: u64) -> u64 {
    let key_len = message.key.as_ref().map_or(0, Bytes::len);
    if message.delay_ms == 0 && message.ttl_ms == 0 {
        return ballast_storage::record::stored_size(key_len, &message.headers, message.payload.len());
    }
    to_record(message, now).stored_size()
}

fn to_record(message: &Publish, now: u64) -> NewRecord {
    let mut headers = message.headers.clone();
    if message.delay_ms > 0 {
        headers.push((HEADER_NOT_BEFORE.to_owned(), (now + message.delay_ms).to_string()));
    }
    if message.ttl_ms > 0 {
        headers.push((HEADER_EXPIRES_AT.to_owned(), (now + message.ttl_ms).to_string()));
    }
    NewRecord {
        timestamp_ms: now,
        attempt: 0,
        flags: 0,
        key: message.key.clone(),
        headers,
        payload: message.payload.clone(),
    }
}

/// Encoded size of a `ballast-expires-at` header at its longest (a 2-byte
/// name length, the name, a 4-byte value length, 20 digits).
const EXPIRES_AT_HEADER_SIZE: u64 = (2 + HEADER_EXPIRES_AT.len() + 4 + 20) as u64;

fn storage_error(path: &Path, e: std::io::Error) -> BrokerError {
    BrokerError::io("writing the queue's files", path, &e)
}

/// Writes `name` in `dir` durably: temporary file, fsync, rename, dir fsync.
pub(crate) fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admission's size of a message is the stored size of the record made
    /// of it, delayed (with the broker's not-before header) or not.
    #[test]
    fn admission_size_is_the_record_size() {
        let now = 1_796_000_000_000;
        for (delay_ms, ttl_ms) in [(0, 0), (1, 0), (86_400_000, 0), (0, 1), (5, 60_000)] {
            for (key, headers, payload) in [
                (None, vec![], 0usize),
                (Some(Bytes::from_static(b"k-1")), vec![("a".to_owned(), "b".to_owned())], 100),
                (Some(Bytes::from(vec![b'k'; 256])), vec![("trace".to_owned(), "x".repeat(77)); 3], 1000),
            ] {
                let payload = Bytes::from(vec![0; payload]);
                let message = Publish { payload, headers, key, lane: None, delay_ms, ttl_ms };
                assert_eq!(stored_size(&message, now), to_record(&message, now).stored_size(), "{message:?}");
            }
        }
    }

    /// The byte count a lane starts from is storage's figure, and equals
    /// reading the unacked records one by one (also with acks above the
    /// floor); each record's stored size is what it takes in the log.
    #[test]
    fn initial_bytes_are_the_unacked_records() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), ballast_storage::LogOptions::default()).unwrap();
        let records = [
            NewRecord::default(),
            NewRecord { payload: Bytes::from_static(b"x"), ..NewRecord::default() },
            NewRecord {
                key: Some(Bytes::from_static(b"key-1")),
                headers: vec![("a".into(), "b".into()), ("name".into(), "välue".into())],
                payload: Bytes::from(vec![7u8; 1001]),
                ..NewRecord::default()
            },
            NewRecord { payload: Bytes::from(vec![1u8; 13]), ..NewRecord::default() },
        ];
        for record in &records {
            let before = log.stats().data_bytes;
            log.append(std::slice::from_ref(record)).unwrap().commit.wait().unwrap();
            assert_eq!(record.stored_size(), log.stats().data_bytes - before, "{record:?}");
        }
        let name = QueueName::parse("q").unwrap();
        let all = log.stats().data_bytes - ballast_storage::limits::SEGMENT_HEADER_SIZE;
        assert_eq!(initial_bytes(&name, &log), all);
        assert_eq!(backlog_bytes(&name, &log), all);
        log.ack(2, 1, AckKind::Acked).unwrap().wait().unwrap();
        let expected = all - records[2].stored_size();
        assert_eq!(initial_bytes(&name, &log), expected);
        assert_eq!(backlog_bytes(&name, &log), expected);
    }
}
