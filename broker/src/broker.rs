//! `Broker`: the registry of queues, their directories and their lifecycle
//! (open on start, create, delete, shutdown).
//!
//! Directory layout: `<data>/queues/<name>~<generation>/` per queue (see
//! `queue/queue.rs` for what is inside). The generation makes a re-created
//! queue a new directory even while the deleted one is still being removed.
//! A directory without `queue.toml` is an interrupted creation or deletion
//! and is removed on start.
//!
//! Start: [`Broker::open`] reads every queue's `queue.toml` and returns;
//! the queues' logs (recovery) open afterwards, in the background, at most
//! `QUEUE_OPEN_THREADS_MAX` at once on blocking threads, dead-letter queues
//! first. So the broker listens within a second or two whatever the number
//! of queues. A call to a queue not open yet opens it at once, ahead of the
//! background order, and waits for it (its dead-letter queue first);
//! ListQueues and Stats list such a queue with `opening` set, and its
//! health service is NOT_SERVING until it is open. A queue whose files
//! cannot be opened (an unreadable `queue.toml`, a damaged segment, an
//! unreadable lane directory) is set aside as a [`DamagedQueue`]: the broker
//! serves the others, every call to it is refused with FAILED_PRECONDITION
//! (`BrokerError::QueueDamaged`), ListQueues and Stats mark it, and
//! DeleteQueue removes its files. A queue that fails to open for want of
//! descriptors or disk space is not set aside (its files are fine): the call
//! that asked gets that error, and the next call, or the background opener's
//! retry, opens it again.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use parking_lot::RwLock;

use crate::{
    config::Config,
    error::{BrokerError, Result},
    fair::FairShare,
    limits::DEAD_LETTER_SUFFIX,
    now_ms,
    queue::{Queue, QueueName, QueueSettings, SettingsRequest},
};

/// Node-wide state every queue shares: identifier sources and the disk
/// watermark.
#[derive(Debug)]
pub struct Node {
    consumer: AtomicU64,
    generation: AtomicU64,
    /// Free bytes on the data directory's filesystem, refreshed every tick.
    disk_free: AtomicU64,
    disk_free_min: u64,
    /// The node's publish slots, shared fairly between queues.
    fair: Arc<FairShare>,
    /// The cluster log, when `[cluster]` is configured (set once Raft is
    /// running, after the broker opened).
    cluster: std::sync::OnceLock<Arc<crate::cluster::node::Cluster>>,
}

impl Node {
    fn new(disk_free_min: u64, publish_slots: usize) -> Node {
        // Queue directory generations start from the clock so that a queue
        // re-created after a restart never reuses a directory name.
        let start = now_ms() << 20;
        Node {
            consumer: AtomicU64::new(1),
            generation: AtomicU64::new(start),
            disk_free: AtomicU64::new(u64::MAX),
            disk_free_min,
            fair: Arc::new(FairShare::new(publish_slots)),
            cluster: std::sync::OnceLock::new(),
        }
    }

    /// The cluster log, if this node is part of a cluster and it runs.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::node::Cluster>> {
        self.cluster.get()
    }

    /// Sets the running cluster log (once, at start).
    pub fn set_cluster(&self, cluster: Arc<crate::cluster::node::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// The fair share of publish work between queues (`fair.rs`).
    pub fn fair(&self) -> &Arc<FairShare> {
        &self.fair
    }

    /// `Some(free bytes)` while the disk is below its watermark.
    pub fn disk_low(&self) -> Option<u64> {
        let free = self.disk_free.load(Ordering::Relaxed);
        (free < self.disk_free_min).then_some(free)
    }

    pub fn disk_free(&self) -> u64 {
        self.disk_free.load(Ordering::Relaxed)
    }

    pub fn disk_free_min(&self) -> u64 {
        self.disk_free_min
    }

    /// Measures the free space of the filesystem holding `dir`.
    pub(crate) fn refresh_disk(&self, dir: &Path) {
        match free_bytes(dir) {
            Ok(free) => self.disk_free.store(free, Ordering::Relaxed),
            Err(e) => tracing::warn!(dir = %dir.display(), "cannot measure free disk space: {e}"),
        }
    }

    pub fn next_consumer(&self) -> u64 {
        self.consumer.fetch_add(1, Ordering::Relaxed)
    }

    fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed)
    }
}

/// The queues of one node.
#[derive(Debug)]
pub struct Broker {
    /// Held for the broker's life: no other broker opens the directory.
    _lock: DataDirLock,
    config: Config,
    queues_dir: PathBuf,
    queues: RwLock<BTreeMap<QueueName, Slot>>,
    /// Queues whose files could not be opened at start, set aside until
    /// deleted (or repaired and the broker restarted).
    damaged: RwLock<BTreeMap<QueueName, DamagedQueue>>,
    /// Serializes create and delete (they touch several directories).
    admin: tokio::sync::Mutex<()>,
    node: Arc<Node>,
    shutting_down: AtomicBool,
    /// Turns `true` once, at `begin_shutdown`: long-lived tasks (Stats
    /// Watch streams) wait on it so they never hold up a graceful shutdown.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Lanes whose log a failed write or sync poisoned, being reopened
    /// (`recover_lanes`); an entry goes once its lane is writable again.
    recovering: Arc<parking_lot::Mutex<HashMap<(QueueName, usize), LaneRecovery>>>,
    /// Queues whose health status may have changed since the last
    /// `report_health` (opened, created, deleted, set aside, a lane
    /// poisoned or writable again): the report is proportional to what
    /// changed, not to the number of queues.
    health_changed: Arc<parking_lot::Mutex<Vec<QueueName>>>,
}

/// A queue in the registry: open, or found at start and not open yet.
#[derive(Debug, Clone)]
enum Slot {
    Open(Arc<Queue>),
    Opening(Arc<Pending>),
}

/// A queue found at start whose logs are not open yet: opened by the
/// background opener or by the first call to it, whichever comes first.
#[derive(Debug)]
struct Pending {
    found: Found,
    /// Set once an open has begun: where its outcome will be. Reset after
    /// an open that failed for want of descriptors or disk space, so that
    /// the next call tries again.
    outcome: parking_lot::Mutex<Option<tokio::sync::watch::Receiver<Option<Opened>>>>,
}

/// How opening a pending queue ended.
#[derive(Debug, Clone)]
enum Opened {
    Queue(Arc<Queue>),
    /// Its files are damaged: it is in `Broker::damaged` now.
    SetAside,
    /// It could not be opened now, through no fault of its files.
    Retry(RetryReason),
}

/// Why opening a queue may succeed later.
#[derive(Debug, Clone, Copy)]
enum RetryReason {
    FileDescriptors,
    DiskFull,
    ShuttingDown,
}

impl RetryReason {
    fn of(error: &BrokerError) -> Option<RetryReason> {
        match error {
            BrokerError::FileDescriptorsExhausted { .. } => Some(RetryReason::FileDescriptors),
            BrokerError::DiskFull { .. } => Some(RetryReason::DiskFull),
            BrokerError::ShuttingDown => Some(RetryReason::ShuttingDown),
            _ => None,
        }
    }

    fn error(self) -> BrokerError {
        const DURING: &str = "opening the queue's files after the broker started";
        match self {
            RetryReason::FileDescriptors => BrokerError::FileDescriptorsExhausted { during: DURING },
            RetryReason::DiskFull => BrokerError::DiskFull { during: DURING },
            RetryReason::ShuttingDown => BrokerError::ShuttingDown,
        }
    }
}

/// A queue found at start, not open yet, as ListQueues and Stats show it.
#[derive(Debug, Clone)]
pub struct OpeningQueue {
    pub name: QueueName,
    pub settings: QueueSettings,
    pub created_at_ms: u64,
}

/// A poisoned lane waiting to be reopened.
#[derive(Debug)]
struct LaneRecovery {
    /// When the next reopen may start.
    next_attempt: std::time::Instant,
    /// The pause after the next failed attempt, in ms (doubling).
    backoff_ms: u64,
    /// A reopen runs now (on a blocking thread).
    running: bool,
}

/// A queue whose files could not be opened at start, set aside.
#[derive(Debug, Clone)]
pub struct DamagedQueue {
    pub name: QueueName,
    /// Its directory (removed by DeleteQueue).
    dir: PathBuf,
    /// The id under which the broker logged why (the detail has paths;
    /// clients get the id).
    pub error_id: String,
}

impl DamagedQueue {
    /// The error every call to the queue gets.
    pub fn error(&self) -> BrokerError {
        BrokerError::QueueDamaged { name: self.name.to_string(), error_id: self.error_id.clone() }
    }
}

/// The gRPC health service name of one queue: NOT_SERVING while some lane
/// of it cannot write (its log is being reopened).
pub fn queue_health_service(queue: &str) -> String {
    format!("ballast.v1.Queue/{queue}")
}

const QUEUES_DIR: &str = "queues";

impl Broker {
    /// Reads every queue's `queue.toml` under `config.data_dir` (creating
    /// the directory if needed), sets aside the queues whose `queue.toml`
    /// cannot be read, and returns; the queues' logs open in the background
    /// (at most `QUEUE_OPEN_THREADS_MAX` at once), or on their first call.
    /// Blocks: call it on a blocking thread. Must run inside a tokio
    /// runtime: the opener is a task, and queues start timer tasks.
    pub fn open(config: Config) -> Result<Arc<Broker>> {
        let started = std::time::Instant::now();
        // First of all: a second process on the same directory would treat
        // the live tail as torn and overwrite acknowledged records.
        let lock = DataDirLock::acquire(&config.data_dir)?;
        let queues_dir = config.data_dir.join(QUEUES_DIR);
        std::fs::create_dir_all(&queues_dir).map_err(|e| io_error(&queues_dir, e))?;
        let node = Arc::new(Node::new(config.disk_free_min_bytes, config.grpc.publish_slots()));
        node.refresh_disk(&queues_dir);
        let mut found: Vec<Found> = Vec::new();
        let mut damaged: BTreeMap<QueueName, DamagedQueue> = BTreeMap::new();
        for entry in std::fs::read_dir(&queues_dir).map_err(|e| io_error(&queues_dir, e))? {
            let entry = entry.map_err(|e| io_error(&queues_dir, e))?;
            let dir = entry.path();
            if !entry.file_type().map_err(|e| io_error(&dir, e))?.is_dir() {
                continue;
            }
            match Queue::read_settings(&dir) {
                Ok((name, settings, created_at_ms)) => found.push(Found { dir, name, settings, created_at_ms }),
                Err(_) if !dir.join(crate::queue::QUEUE_FILE).exists() => {
                    // In the background, as a deletion at run time is: a
                    // deletion cut short may have gigabytes left to
                    // unlink, and nothing will open this directory again
                    // (queue directories carry a generation suffix).
                    tracing::warn!(dir = %dir.display(), "removing an interrupted queue creation or deletion");
                    crate::queue::remove_in_background(&dir);
                }
                Err(error) => match name_of_dir(&dir) {
                    Some(name) => set_aside(&mut damaged, name, dir, &error),
                    None => tracing::error!(
                        dir = %dir.display(),
                        %error,
                        "cannot read this queue directory, nor tell its queue from its name; left alone"
                    ),
                },
            }
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = found.windows(2).find(|pair| pair[0].name == pair[1].name) {
            return Err(BrokerError::Storage(format!(
                "two directories hold queue {}: {} and {}; move one away",
                pair[0].name,
                pair[0].dir.display(),
                pair[1].dir.display()
            )));
        }
        sync_dir(&queues_dir)?;
        // Dead-letter queues first: their source queues hold them.
        let (dead, sources): (Vec<Found>, Vec<Found>) =
            found.into_iter().partition(|f| f.name.as_str().ends_with(DEAD_LETTER_SUFFIX));
        let order: Vec<Arc<Pending>> = dead
            .into_iter()
            .chain(sources)
            .map(|found| Arc::new(Pending { found, outcome: parking_lot::Mutex::new(None) }))
            .collect();
        let queues: BTreeMap<QueueName, Slot> =
            order.iter().map(|pending| (pending.found.name.clone(), Slot::Opening(Arc::clone(pending)))).collect();
        // Every queue starts NOT_SERVING (opening or damaged).
        let health_changed: Vec<QueueName> = queues.keys().chain(damaged.keys()).cloned().collect();
        tracing::info!(
            queues = queues.len(),
            damaged = damaged.len(),
            elapsed_ms = started.elapsed().as_millis(),
            "queues found; opening them in the background"
        );
        if queues.len() + damaged.len() > config.queues_max {
            tracing::warn!(
                queues = queues.len() + damaged.len(),
                queues_max = config.queues_max,
                "more queues than queues_max: every queue is served, but none can be created until some are deleted"
            );
        }
        let broker = Arc::new(Broker {
            _lock: lock,
            config,
            queues_dir,
            queues: RwLock::new(queues),
            damaged: RwLock::new(damaged),
            admin: tokio::sync::Mutex::new(()),
            node,
            shutting_down: AtomicBool::new(false),
            stopping: tokio::sync::watch::Sender::new(false),
            recovering: Arc::default(),
            health_changed: Arc::new(parking_lot::Mutex::new(health_changed)),
        });
        tokio::spawn(open_in_background(Arc::downgrade(&broker), order));
        Ok(broker)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn check_running(&self) -> Result<()> {
        if self.shutting_down.load(Ordering::Acquire) { Err(BrokerError::ShuttingDown) } else { Ok(()) }
    }

    /// The queue named `name`; a queue not open yet is opened first (ahead
    /// of the background opener), and the call waits for it.
    pub async fn queue(self: &Arc<Self>, name: &str) -> Result<Arc<Queue>> {
        self.check_running()?;
        let name = QueueName::parse(name)?;
        let slot = self.queues.read().get(&name).cloned();
        match slot {
            Some(Slot::Open(queue)) => Ok(queue),
            Some(Slot::Opening(pending)) => self.open_pending(&pending).await,
            None => match self.damaged.read().get(&name) {
                Some(damaged) => Err(damaged.error()),
                None => Err(BrokerError::QueueNotFound(name.to_string())),
            },
        }
    }

    /// Every open queue, by name (not the queues still opening).
    pub fn queues(&self) -> Vec<Arc<Queue>> {
        self.queues
            .read()
            .values()
            .filter_map(|slot| match slot {
                Slot::Open(queue) => Some(Arc::clone(queue)),
                Slot::Opening(_) => None,
            })
            .collect()
    }

    /// Every queue found at start whose logs are not open yet, by name.
    pub fn opening_queues(&self) -> Vec<OpeningQueue> {
        self.open_and_opening().1
    }

    /// Every open queue and every queue still opening, taken together (a
    /// queue that opens meanwhile is in exactly one of the two).
    pub fn open_and_opening(&self) -> (Vec<Arc<Queue>>, Vec<OpeningQueue>) {
        let (mut open, mut opening) = (Vec::new(), Vec::new());
        for slot in self.queues.read().values() {
            match slot {
                Slot::Open(queue) => open.push(Arc::clone(queue)),
                Slot::Opening(pending) => opening.push(OpeningQueue {
                    name: pending.found.name.clone(),
                    settings: pending.found.settings.clone(),
                    created_at_ms: pending.found.created_at_ms,
                }),
            }
        }
        (open, opening)
    }

    /// Queues, open or opening (dead-letter queues included; damaged ones
    /// not).
    pub fn queue_count(&self) -> usize {
        self.queues.read().len()
    }

    /// The open queue named `name`, if it is open.
    pub(crate) fn open_queue(&self, name: &QueueName) -> Option<Arc<Queue>> {
        match self.queues.read().get(name) {
            Some(Slot::Open(queue)) => Some(Arc::clone(queue)),
            Some(Slot::Opening(_)) | None => None,
        }
    }

    /// Opens the queue named `name` now if it is still opening (a damaged
    /// outcome is left for the caller to find in `damaged`).
    async fn settle(self: &Arc<Self>, name: &QueueName) -> Result<()> {
        let slot = self.queues.read().get(name).cloned();
        if let Some(Slot::Opening(pending)) = slot {
            match self.open_pending(&pending).await {
                Err(error) if RetryReason::of(&error).is_some() => return Err(error),
                Ok(_) | Err(_) => {}
            }
        }
        Ok(())
    }

    /// Opens a pending queue, or joins the open already under way, and
    /// waits for its outcome. The open itself runs in a task of its own, so
    /// a caller that gives up (a deadline) neither stops it nor lets a
    /// second open of the same files begin.
    fn open_pending<'a>(
        self: &'a Arc<Self>,
        pending: &'a Arc<Pending>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Arc<Queue>>> + Send + 'a>> {
        Box::pin(async move {
            let mut outcome = {
                let mut begun = pending.outcome.lock();
                match &*begun {
                    Some(outcome) => outcome.clone(),
                    None => {
                        let (tx, rx) = tokio::sync::watch::channel(None);
                        *begun = Some(rx.clone());
                        let (broker, pending) = (Arc::clone(self), Arc::clone(pending));
                        tokio::spawn(async move {
                            let opened = broker.open_now(&pending).await;
                            tx.send_replace(Some(opened));
                        });
                        rx
                    }
                }
            };
            let opened = match outcome.wait_for(Option::is_some).await {
                Ok(opened) => opened.clone(),
                Err(_) => None,
            };
            match opened {
                Some(Opened::Queue(queue)) => Ok(queue),
                Some(Opened::SetAside) => Err(self
                    .damaged
                    .read()
                    .get(&pending.found.name)
                    .map_or_else(|| BrokerError::QueueNotFound(pending.found.name.to_string()), DamagedQueue::error)),
                Some(Opened::Retry(reason)) => Err(reason.error()),
                None => Err(BrokerError::ShuttingDown),
            }
        })
    }

    /// Opens a pending queue's logs (its dead-letter queue first) on a
    /// blocking thread and puts the outcome in the registry.
    async fn open_now(self: &Arc<Self>, pending: &Arc<Pending>) -> Opened {
        let name = pending.found.name.clone();
        let dead_letter = if pending.found.settings.dead_letter {
            let dead = match dead_letter_name(&name) {
                Ok(dead_name) => {
                    let slot = self.queues.read().get(&dead_name).cloned();
                    match slot {
                        Some(Slot::Open(dead)) => Some(dead),
                        Some(Slot::Opening(dead)) => match self.open_pending(&dead).await {
                            Ok(dead) => Some(dead),
                            Err(error) => match RetryReason::of(&error) {
                                Some(reason) => return self.open_failed(pending, reason, &error),
                                None => None,
                            },
                        },
                        None => None,
                    }
                }
                Err(_) => None,
            };
            if dead.is_none() {
                tracing::warn!(queue = %name, "its dead-letter queue is missing; dead letters will be dropped");
            }
            dead
        } else {
            None
        };
        let opened = {
            let (broker, pending) = (Arc::clone(self), Arc::clone(pending));
            tokio::task::spawn_blocking(move || open_one(&pending.found, &broker.config, &broker.node, dead_letter))
                .await
                .unwrap_or(Err(BrokerError::ShuttingDown))
        };
        match opened {
            Ok(queue) => {
                tracing::debug!(queue = %name, "queue opened");
                self.queues.write().insert(name.clone(), Slot::Open(Arc::clone(&queue)));
                self.health_changed.lock().push(name);
                Opened::Queue(queue)
            }
            Err(error) => match RetryReason::of(&error) {
                Some(reason) => self.open_failed(pending, reason, &error),
                None => {
                    // Set aside before it leaves the registry: a listing
                    // in between sees it twice (and shows it once), never
                    // not at all.
                    set_aside(&mut self.damaged.write(), name.clone(), pending.found.dir.clone(), &error);
                    self.queues.write().remove(&name);
                    self.health_changed.lock().push(name);
                    Opened::SetAside
                }
            },
        }
    }

    /// A pending queue that could not be opened through no fault of its
    /// files (out of descriptors, a full disk): it stays pending, and the
    /// next call (or the background opener's retry) tries again. Setting
    /// a healthy queue aside would invite its deletion.
    fn open_failed(&self, pending: &Pending, reason: RetryReason, error: &BrokerError) -> Opened {
        if !matches!(reason, RetryReason::ShuttingDown) {
            tracing::error!(queue = %pending.found.name, %error, "cannot open the queue now; will retry");
        }
        *pending.outcome.lock() = None;
        Opened::Retry(reason)
    }

    /// Every queue set aside at start because its files could not be
    /// opened, by name.
    pub fn damaged_queues(&self) -> Vec<DamagedQueue> {
        self.damaged.read().values().cloned().collect()
    }

    /// Creates a queue (and its dead-letter queue). Creating an existing
    /// queue with the same settings returns it; with other settings it is
    /// `QueueExists`.
    pub async fn create(self: &Arc<Self>, name: &str, request: &SettingsRequest) -> Result<Arc<Queue>> {
        self.check_running()?;
        let name = QueueName::parse(name)?;
        if name.as_str().ends_with(DEAD_LETTER_SUFFIX) {
            return Err(BrokerError::InvalidQueueName {
                name: name.to_string(),
                reason: "names ending in \".dead\" are reserved for dead-letter queues",
            });
        }
        let settings = QueueSettings::resolve(request, &self.config.queue_defaults)?;
        if settings.replicas > 1 {
            let Some(cluster) = self.node.cluster() else {
                return Err(BrokerError::FailedPrecondition(format!(
                    "replicas = {} needs a cluster; this node has no [cluster] section (docs/replication.md)",
                    settings.replicas
                )));
            };
            if settings.replicas != cluster.voters() {
                return Err(BrokerError::InvalidSetting {
                    key: "replicas",
                    message: format!(
                        "a replicated queue is kept by every voter: this cluster has {}; got {}",
                        cluster.voters(),
                        settings.replicas
                    ),
                });
            }
            cluster.leader_term(name.as_str()).await?;
            if let Some(existing) = self.open_queue(&name) {
                return match existing.settings().difference(&settings) {
                    None => Ok(existing),
                    Some(difference) => Err(BrokerError::QueueExists { name: name.to_string(), difference }),
                };
            }
            let settings_toml =
                toml::to_string(&settings).map_err(|e| BrokerError::Storage(format!("queue settings as TOML: {e}")))?;
            let command = crate::cluster::Command::CreateQueue { name: name.to_string(), settings_toml };
            cluster.propose(name.as_str(), command).await?;
            return self.open_queue(&name).ok_or_else(|| BrokerError::QueueNotFound(name.to_string()));
        }
        self.create_resolved(name, settings).await
    }

    /// Applies a cluster log `CreateQueue` on this node: the queue with the
    /// leader's resolved settings, or nothing if it exists with them.
    pub(crate) async fn apply_create(self: &Arc<Self>, name: &str, settings: QueueSettings) -> Result<()> {
        let name = QueueName::parse(name)?;
        self.create_resolved(name, settings).await.map(drop)
    }

    /// Applies a cluster log `UpdateQueue`: the queue's settings become
    /// `settings` (validated as any update).
    pub(crate) async fn apply_update(self: &Arc<Self>, name: &str, settings: QueueSettings) -> Result<()> {
        let queue = self.queue(name).await?;
        queue.update_settings(&SettingsRequest::from_settings(&settings)).map(drop)
    }

    /// Applies a cluster log `DeleteQueue`; a queue already gone is fine.
    pub(crate) async fn apply_delete(self: &Arc<Self>, name: &str) -> Result<()> {
        match self.delete_local(name).await {
            Err(BrokerError::QueueNotFound(_)) => Ok(()),
            other => other,
        }
    }

    /// Creates a queue with resolved settings (see [`Broker::create`]).
    async fn create_resolved(self: &Arc<Self>, name: QueueName, settings: QueueSettings) -> Result<Arc<Queue>> {
        let _admin = self.admin.lock().await;
        self.check_running()?;
        let dead_name = dead_letter_name(&name)?;
        for name in [&name, &dead_name] {
            self.settle(name).await?;
            if let Some(damaged) = self.damaged.read().get(name) {
                return Err(damaged.error());
            }
        }
        if let Some(existing) = self.open_queue(&name) {
            return match existing.settings().difference(&settings) {
                None => Ok(existing),
                Some(difference) => Err(BrokerError::QueueExists { name: name.to_string(), difference }),
            };
        }
        let needed = if settings.dead_letter { 2 } else { 1 };
        let held = self.queue_count() + self.damaged.read().len();
        if held + needed > self.config.queues_max {
            return Err(BrokerError::LimitReached {
                what: "queues",
                max: self.config.queues_max,
                hint: "delete unused queues (a dead-letter queue counts as one), or raise queues_max",
            });
        }
        // The dead-letter queue this call creates, if any.
        let mut created_dead = None;
        let dead_letter = if settings.dead_letter {
            match self.open_queue(&dead_name) {
                Some(dead) => Some(dead),
                None => {
                    // Dead letters are appended by the broker, outside any
                    // quota; the dead-letter queue gets none of its own.
                    let dead_settings = QueueSettings {
                        dead_letter: false,
                        max_publish_rate: 0,
                        max_publish_byte_rate: 0,
                        // Dead letters stay until handled.
                        message_ttl_ms: 0,
                        // Its consumers are the operator's, not the
                        // downstream the source queue paces.
                        max_delivery_rate: 0,
                        ..settings.clone()
                    };
                    let dead = self.create_dir_and_queue(dead_name.clone(), dead_settings, None).await?;
                    self.queues.write().insert(dead_name.clone(), Slot::Open(Arc::clone(&dead)));
                    self.health_changed.lock().push(dead_name.clone());
                    created_dead = Some(dead_name);
                    Some(dead)
                }
            }
        } else {
            None
        };
        let queue = match self.create_dir_and_queue(name.clone(), settings, dead_letter).await {
            Ok(queue) => queue,
            Err(e) => {
                // Leave nothing half-created: a dead-letter queue made for
                // this queue goes again.
                let dead = created_dead.as_ref().and_then(|dead_name| self.queues.write().remove(dead_name));
                if let Some(dead_name) = &created_dead {
                    self.health_changed.lock().push(dead_name.clone());
                }
                if let Some(Slot::Open(dead)) = dead {
                    let dead_name = dead.name.clone();
                    dead.close_consumers();
                    if let Err(removal) = mark_removed(dead).await {
                        tracing::warn!(queue = %dead_name, "removing the dead-letter queue of a failed creation: {removal}");
                    }
                }
                return Err(e);
            }
        };
        self.queues.write().insert(name.clone(), Slot::Open(Arc::clone(&queue)));
        self.health_changed.lock().push(name.clone());
        tracing::info!(queue = %name, "queue created");
        Ok(queue)
    }

    /// Creates a queue's directory and files on a blocking thread: creating
    /// and syncing files and directories must not hold up a runtime worker
    /// that other queues' calls need.
    async fn create_dir_and_queue(
        &self,
        name: QueueName,
        settings: QueueSettings,
        dead_letter: Option<Arc<Queue>>,
    ) -> Result<Arc<Queue>> {
        let dir = self.queues_dir.join(format!("{name}~{}", self.node.next_generation()));
        let queues_dir = self.queues_dir.clone();
        let config = self.config.clone();
        let node = Arc::clone(&self.node);
        blocking(move || {
            let created = Queue::create(&dir, name, settings, &config, node, dead_letter)
                .and_then(|queue| sync_dir(&queues_dir).map(|()| queue));
            if created.is_err() {
                // Nothing half-created stays behind: without `queue.toml` the
                // directory is a failed creation (a restart would remove it
                // too). Logs opened in it have closed (the queue dropped).
                if let Err(e) = std::fs::remove_dir_all(&dir)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(dir = %dir.display(), "removing a failed queue creation: {e}");
                }
            }
            created
        })
        .await
    }

    /// Deletes a queue and its dead-letter queue, with every message in
    /// them. Consumers' streams end; the files go once the last request
    /// using the queue is done. A dead-letter queue whose source queue
    /// exists cannot be deleted on its own.
    pub async fn delete(self: &Arc<Self>, name: &str) -> Result<()> {
        self.check_running()?;
        if let Some(queue) = self.open_queue(&QueueName::parse(name)?)
            && let Some(cluster) = queue.replicated().cloned()
        {
            cluster.leader_term(name).await?;
            let source = name.strip_suffix(DEAD_LETTER_SUFFIX).unwrap_or(name);
            if source != name && self.open_queue(&QueueName::parse(source)?).is_some() {
                return Err(BrokerError::FailedPrecondition(format!(
                    "{name} is the dead-letter queue of {source}; delete {source} (which deletes both) or purge {name}"
                )));
            }
            let command = crate::cluster::Command::DeleteQueue { name: name.to_owned() };
            return cluster.propose(name, command).await.map(drop);
        }
        self.delete_local(name).await
    }

    /// Deletes a queue on this node only (see [`Broker::delete`]).
    async fn delete_local(self: &Arc<Self>, name: &str) -> Result<()> {
        let name = QueueName::parse(name)?;
        let _admin = self.admin.lock().await;
        let dead_name = dead_letter_name(&name)?;
        // A queue still opening is opened first: deleting means closing
        // its logs, and its source or dead-letter queue may hold it.
        let source = name.as_str().strip_suffix(DEAD_LETTER_SUFFIX).and_then(|source| QueueName::parse(source).ok());
        for name in [Some(&name), Some(&dead_name), source.as_ref()].into_iter().flatten() {
            self.settle(name).await?;
        }
        if self.damaged.read().contains_key(&name) {
            return self.delete_damaged(&name, &dead_name).await;
        }
        let queue = self.open_queue(&name).ok_or_else(|| BrokerError::QueueNotFound(name.to_string()))?;
        if let Some(source) = source
            && self.open_queue(&source).is_some_and(|q| q.dead_letter.is_some())
        {
            return Err(BrokerError::FailedPrecondition(format!(
                "{name} is the dead-letter queue of {source}; delete {source} (which deletes both) or purge {name}"
            )));
        }
        let mut doomed = vec![queue];
        if let Some(dead) = doomed[0].dead_letter.clone() {
            doomed.push(dead);
        }
        for queue in doomed {
            queue.close_consumers();
            self.queues.write().remove(&queue.name);
            self.health_changed.lock().push(queue.name.clone());
            let name = queue.name.clone();
            mark_removed(queue).await?;
            tracing::info!(queue = %name, "queue deleted");
        }
        // A damaged dead-letter queue (its source opened without it) goes
        // with its source queue.
        if self.damaged.read().contains_key(&dead_name) {
            self.remove_damaged(&dead_name).await?;
        }
        Ok(())
    }

    /// Deletes a damaged queue's files, and its dead-letter queue whether
    /// that opened or not (a source queue's settings are unknown when its
    /// `queue.toml` is what is damaged, but only a source queue has a
    /// `<name>.dead`). Called under the admin lock.
    async fn delete_damaged(&self, name: &QueueName, dead_name: &QueueName) -> Result<()> {
        self.remove_damaged(name).await?;
        let dead = self.queues.write().remove(dead_name);
        if let Some(Slot::Open(dead)) = dead {
            self.health_changed.lock().push(dead_name.clone());
            dead.close_consumers();
            mark_removed(dead).await?;
            tracing::info!(queue = %dead_name, "queue deleted");
        } else if self.damaged.read().contains_key(dead_name) {
            self.remove_damaged(dead_name).await?;
        }
        Ok(())
    }

    /// Removes one damaged queue: its `queue.toml` first, durably (a crash
    /// from here on leaves a directory the next start removes), then the
    /// rest in the background.
    async fn remove_damaged(&self, name: &QueueName) -> Result<()> {
        let Some(damaged) = self.damaged.read().get(name).cloned() else { return Ok(()) };
        let dir = damaged.dir.clone();
        blocking(move || {
            let path = dir.join(crate::queue::QUEUE_FILE);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path, e)),
            }
            sync_dir(&dir)?;
            crate::queue::remove_in_background(&dir);
            Ok(())
        })
        .await?;
        self.damaged.write().remove(name);
        self.health_changed.lock().push(name.clone());
        tracing::info!(queue = %name, "damaged queue deleted");
        Ok(())
    }

    /// Stops accepting work: every call after this is `ShuttingDown`, and
    /// consumers' streams end (their leases stay until the process exits,
    /// and are redelivered after the restart).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        self.stopping.send_replace(true);
        for queue in self.queues() {
            queue.close_consumers();
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Resolves once the broker begins shutting down (at once if it has
    /// already begun, or if the broker is gone). Tasks that outlive a call,
    /// such as a Stats Watch stream, select on it and end.
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.subscribe();
        async move {
            // An error means the broker was dropped: stopping too.
            let _ = stopping.wait_for(|stopping| *stopping).await;
        }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// One stats tick: smoothed rates, the disk's free space, and the
    /// reopening of lanes a failed write or sync poisoned.
    pub fn tick(&self, seconds: f64) {
        self.node.refresh_disk(&self.queues_dir);
        for queue in self.queues() {
            queue.tick(seconds);
        }
        self.recover_lanes();
    }

    /// Reopens poisoned lanes, each on a backoff (from
    /// `LANE_REOPEN_BACKOFF_MS_MIN`, doubling to `..._MAX`) and on a blocking
    /// thread, since a reopen re-runs recovery: it keeps what the last
    /// successful sync covered and cuts the rest (`Log::reopen`), so
    /// nothing acknowledged is lost and a failed fsync is never trusted.
    /// Meanwhile publishes to the lane are refused with UNAVAILABLE and the
    /// queue's health is NOT_SERVING. Must run inside a tokio runtime.
    fn recover_lanes(&self) {
        use crate::limits::{LANE_REOPEN_BACKOFF_MS_MAX, LANE_REOPEN_BACKOFF_MS_MIN};
        let now = std::time::Instant::now();
        let queues = self.queues();
        let mut recovering = self.recovering.lock();
        {
            // Lanes of queues deleted meanwhile are forgotten.
            let registry = self.queues.read();
            recovering.retain(|(name, _), _| matches!(registry.get(name), Some(Slot::Open(_))));
        }
        for queue in &queues {
            for (lane, log) in queue.lanes.iter().enumerate() {
                let Some(error) = log.poisoned() else { continue };
                let entry = recovering.entry((queue.name.clone(), lane)).or_insert_with(|| {
                    tracing::error!(queue = %queue.name, lane, %error, "the lane cannot write; reopening its log");
                    self.health_changed.lock().push(queue.name.clone());
                    LaneRecovery { next_attempt: now, backoff_ms: LANE_REOPEN_BACKOFF_MS_MIN, running: false }
                });
                if entry.running || now < entry.next_attempt {
                    continue;
                }
                entry.running = true;
                let queue = Arc::clone(queue);
                let recovering = Arc::clone(&self.recovering);
                let health_changed = Arc::clone(&self.health_changed);
                tokio::task::spawn_blocking(move || {
                    let result = queue.lanes[lane].reopen();
                    let mut map = recovering.lock();
                    let key = (queue.name.clone(), lane);
                    match result {
                        Ok(_) => {
                            map.remove(&key);
                            drop(map);
                            health_changed.lock().push(queue.name.clone());
                            // The failed appends' bytes were counted.
                            queue.recount_bytes(lane);
                            tracing::info!(queue = %queue.name, lane, "the lane writes again");
                            // Acks not journaled before the failure are
                            // undone: deliver those messages again.
                            queue.rewind_lane(lane);
                        }
                        Err(error) => {
                            if let Some(entry) = map.get_mut(&key) {
                                tracing::error!(
                                    queue = %queue.name,
                                    lane,
                                    %error,
                                    retry_ms = entry.backoff_ms,
                                    "reopening the lane's log failed"
                                );
                                entry.running = false;
                                entry.next_attempt =
                                    std::time::Instant::now() + std::time::Duration::from_millis(entry.backoff_ms);
                                entry.backoff_ms = (entry.backoff_ms * 2).min(LANE_REOPEN_BACKOFF_MS_MAX);
                            }
                        }
                    }
                });
            }
        }
    }

    /// Sets the status in the gRPC health service ([`queue_health_service`])
    /// of each queue whose status may have changed since the last report:
    /// SERVING while open with every lane able to write, NOT_SERVING while
    /// opening, damaged, or with a lane being reopened; a deleted queue's
    /// entry is cleared. Proportional to what changed, not to the queues.
    pub async fn report_health(&self, health: &mut tonic_health::server::HealthReporter) {
        use tonic_health::ServingStatus;
        let mut changed = std::mem::take(&mut *self.health_changed.lock());
        changed.sort_unstable();
        changed.dedup();
        for name in changed {
            let serving = match self.queues.read().get(&name) {
                Some(Slot::Open(queue)) => Some(queue.is_writable()),
                Some(Slot::Opening(_)) => Some(false),
                None => self.damaged.read().contains_key(&name).then_some(false),
            };
            let service = queue_health_service(name.as_str());
            match serving {
                Some(true) => health.set_service_status(service, ServingStatus::Serving).await,
                Some(false) => health.set_service_status(service, ServingStatus::NotServing).await,
                None => health.clear_service_status(&service).await,
            }
        }
    }

    /// Syncs every log (the last step of a graceful shutdown).
    pub fn sync_all(&self) -> Result<()> {
        for queue in self.queues() {
            for log in &queue.lanes {
                log.sync()?;
            }
        }
        Ok(())
    }
}

/// An exclusive lock (`flock`) on `<data>/lock`, held while the broker
/// lives: a second broker on the same directory, in this process or
/// another, is refused before it touches anything. The file holds the
/// holder's pid, for the refusal's message; the lock, not the file, is
/// what counts (a lock dies with its process, so a stale file after a
/// kill -9 never blocks a restart).
#[derive(Debug)]
pub(crate) struct DataDirLock {
    _file: std::fs::File,
}

/// The lock file's name in the data directory.
pub const LOCK_FILE: &str = "lock";

impl DataDirLock {
    fn acquire(data_dir: &Path) -> Result<DataDirLock> {
        use std::io::{Read, Seek, Write};
        std::fs::create_dir_all(data_dir).map_err(|e| io_error(data_dir, e))?;
        let path = data_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_error(&path, e))?;
        match try_lock_exclusive(&file) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(BrokerError::DataDirInUse {
                    dir: data_dir.to_owned(),
                    holder: if holder.is_empty() { "another process".into() } else { format!("pid {holder}") },
                });
            }
            Err(e) => return Err(io_error(&path, e)),
        }
        // Best effort: the pid only makes the refusal's message better.
        let _ = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(DataDirLock { _file: file })
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: the lock belongs to the open file and goes
/// when it closes (or the process dies). `std`'s `File::try_lock` is newer
/// than the workspace's MSRV.
pub(crate) fn try_lock_exclusive(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock only reads its integer arguments; the fd is valid for
    // the lifetime of `file`.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Free bytes for unprivileged users on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid NUL-terminated string and `stat` points to
    // writable memory of the right type; statvfs fills it on success.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialized `stat`.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// A queue directory found at start, its `queue.toml` read.
#[derive(Debug)]
struct Found {
    dir: PathBuf,
    name: QueueName,
    settings: QueueSettings,
    created_at_ms: u64,
}

/// Opens every pending queue of `order` (dead-letter queues first), at most
/// `queue_open_threads` at once (none with 0), each through
/// [`Broker::open_pending`], so that a call that opened a queue first is
/// joined, not repeated. Queues that could not be opened for want of
/// descriptors or disk space are tried again, on a doubling backoff.
async fn open_in_background(broker: std::sync::Weak<Broker>, order: Vec<Arc<Pending>>) {
    use crate::limits::{LANE_REOPEN_BACKOFF_MS_MAX, LANE_REOPEN_BACKOFF_MS_MIN};
    let started = std::time::Instant::now();
    let threads = match broker.upgrade() {
        Some(broker) => broker.config.queue_open_threads,
        None => return,
    };
    if threads == 0 || order.is_empty() {
        return;
    }
    let parallel = Arc::new(tokio::sync::Semaphore::new(threads));
    let mut order = order;
    let mut backoff_ms = LANE_REOPEN_BACKOFF_MS_MIN;
    loop {
        let mut opens = tokio::task::JoinSet::new();
        // Queues to try again (their open failed for want of descriptors
        // or disk space).
        let mut again = Vec::new();
        let mut collect = |joined: std::result::Result<Option<Arc<Pending>>, tokio::task::JoinError>| {
            if let Ok(Some(pending)) = joined {
                again.push(pending);
            }
        };
        for pending in order {
            let Ok(permit) = Arc::clone(&parallel).acquire_owned().await else { return };
            let Some(broker) = broker.upgrade() else { return };
            if broker.is_shutting_down() {
                return;
            }
            opens.spawn(async move {
                let _permit = permit;
                match broker.open_pending(&pending).await {
                    Err(error) if RetryReason::of(&error).is_some() => Some(pending),
                    Ok(_) | Err(_) => None,
                }
            });
            while let Some(joined) = opens.try_join_next() {
                collect(joined);
            }
        }
        while let Some(joined) = opens.join_next().await {
            collect(joined);
        }
        let Some(broker) = broker.upgrade() else { return };
        if again.is_empty() || broker.is_shutting_down() {
            release_free_memory();
            tracing::info!(
                queues = broker.queue_count(),
                damaged = broker.damaged.read().len(),
                elapsed_ms = started.elapsed().as_millis(),
                "queues opened"
            );
            return;
        }
        drop(broker);
        tracing::warn!(queues = again.len(), retry_ms = backoff_ms, "some queues could not be opened; retrying");
        tokio::time::sleep(std::time::Duration::from_millis(backoff_ms)).await;
        backoff_ms = (backoff_ms * 2).min(LANE_REOPEN_BACKOFF_MS_MAX);
        order = again;
    }
}

/// Hands the allocator's free pages back to the system. Opening thousands
/// of queues on a dozen threads leaves each thread's malloc arena with
/// freed holes (queue.toml texts, recovery's scratch buffers) that glibc
/// keeps resident; `malloc_trim` releases them (about a fifth of the
/// broker's anonymous memory after a start with 2,000 queues).
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Opens one queue's logs, holding `dead_letter`. A panic while opening
/// sets the queue aside instead of taking the broker down.
fn open_one(found: &Found, config: &Config, node: &Arc<Node>, dead_letter: Option<Arc<Queue>>) -> Result<Arc<Queue>> {
    let open = || {
        let (name, settings) = (found.name.clone(), found.settings.clone());
        Queue::open_logs(&found.dir, name, settings, found.created_at_ms, config, Arc::clone(node), dead_letter)
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(open)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(BrokerError::Storage(format!("opening {} panicked: {what}", found.dir.display())))
    })
}

/// Records a queue that cannot be opened and logs why under an error id.
fn set_aside(damaged: &mut BTreeMap<QueueName, DamagedQueue>, name: QueueName, dir: PathBuf, error: &BrokerError) {
    let error_id = crate::grpc::status::error_id();
    tracing::error!(
        queue = %name,
        dir = %dir.display(),
        %error_id,
        %error,
        "the queue's files are damaged or unreadable: it is set aside (calls to it fail with FAILED_PRECONDITION) \
         and the broker serves the others; delete it with DeleteQueue, or repair its files and restart"
    );
    damaged.insert(name.clone(), DamagedQueue { name, dir, error_id });
}

/// The queue a directory `<name>~<generation>` holds, when its
/// `queue.toml` cannot say.
fn name_of_dir(dir: &Path) -> Option<QueueName> {
    let file_name = dir.file_name()?.to_str()?;
    let (name, generation) = file_name.rsplit_once('~')?;
    generation.parse::<u64>().ok()?;
    QueueName::parse(name).ok()
}

/// Deletes a queue's `queue.toml` durably, on a blocking thread.
async fn mark_removed(queue: Arc<Queue>) -> Result<()> {
    blocking(move || queue.mark_removed()).await
}

/// Runs file work on a blocking thread.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(BrokerError::ShuttingDown),
    }
}

/// `<name>.dead`.
fn dead_letter_name(name: &QueueName) -> Result<QueueName> {
    QueueName::parse(&format!("{name}{DEAD_LETTER_SUFFIX}"))
}

fn io_error(path: &Path, e: std::io::Error) -> BrokerError {
    BrokerError::io("writing the data directory", path, &e)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| io_error(dir, e))
}
