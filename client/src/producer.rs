//! [`Producer`]: publishes messages with batching, deadlines, retries and a
//! circuit breaker per queue.
//!
//! The path of one [`Producer::publish`]:
//!
//! 1. Validate locally (queue name, key, headers, delay) and fail fast if the
//!    queue's circuit breaker is open, so a dead broker collects no backlog.
//! 2. Fix the idempotency key: the caller's, or a generated one. From here on
//!    the message is a wire message that never changes, so every retry of it
//!    carries the same key.
//! 3. Hand it to the batching task over a bounded channel (a full channel
//!    makes the caller wait, within its deadline).
//! 4. The batching task groups messages per queue and lane and sends a batch
//!    when it holds `batch_count_max` messages or `batch_size_max` payload
//!    bytes, or `linger` after its first message arrived, whichever comes
//!    first; with a zero linger it sends whatever has queued up at once.
//!    One lane per batch: the broker admits, refuses and throttles a batch
//!    whole, as its most restricted lane, so a high-lane message sharing a
//!    batch with low-lane ones would be shed or held with them.
//! 5. A batch is sent by its own task (at most `in_flight_batches_max` at
//!    once) as one request on the producer's `PublishStream`
//!    (`publish_stream.rs`; or, with `publish_stream` off or against a
//!    broker without it, one `PublishBatch`, or `Publish` for one message),
//!    retried with backoff and jitter within the latest deadline of its
//!    messages; the queue's breaker sees every attempt.
//! 6. If the broker rejects a whole batch as invalid, its messages are sent
//!    one by one, so only the bad message fails.
//! 7. Each caller gets its own receipt, or the error, or a deadline error
//!    when its own deadline passes first.
//!
//! Invariants: a batch holds messages of one queue and one lane only (as
//! the caller named it: an unnamed lane is its own batch key), at most
//! `batch_count_max` of them; every message is answered exactly once (or its
//! caller has gone).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::client::Transport;
use ballast_proto::v1::{self as proto, publisher_client::PublisherClient};
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
    task::{JoinHandle, JoinSet},
    time::Instant,
};

use crate::{
    BreakerConfig, BreakerState, CircuitBreaker, Error, Message, Receipt, RetryPolicy,
    clock::{Clock, SystemClock},
    contract,
    message::generate_idempotency_key,
    publish_stream::{PublishStream, Sent},
    retry::Retrier,
};

/// How a [`Producer`] batches, waits and retries.
///
/// ```
/// use std::time::Duration;
/// use ballast_client::ProducerConfig;
///
/// let config = ProducerConfig {
///     linger: Duration::from_millis(20),
///     batch_count_max: 500,
///     deadline: Duration::from_secs(5),
///     ..ProducerConfig::default()
/// };
/// # let _ = config;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerConfig {
    /// How long a batch waits for more messages after its first one. Zero
    /// sends at once whatever has queued up.
    pub linger: Duration,
    /// Most messages in one batch, 1..=[`contract::BATCH_COUNT_MAX`].
    pub batch_count_max: usize,
    /// Most payload bytes in one batch, 1..=[`contract::BATCH_SIZE_MAX`]. A
    /// bigger single message is sent alone.
    pub batch_size_max: usize,
    /// Time allowed for one publish call, from the call to the receipt:
    /// linger, queueing and every retry included.
    pub deadline: Duration,
    /// Time allowed for one attempt (one RPC). Also how long the publish
    /// stream may go without any answer while requests wait on it (or a
    /// new stream without the broker's reply) before it is abandoned as
    /// stalled: a node paused or hung with its connection up. Then the
    /// requests waiting fail (retryably), the node is treated as
    /// unreachable (a client given several addresses moves to the next)
    /// and the next attempt opens a new stream.
    pub attempt_timeout: Duration,
    /// Retries of retryable failures.
    pub retry: RetryPolicy,
    /// Circuit breaker thresholds, applied per queue.
    pub breaker: BreakerConfig,
    /// Batches being sent at once (across queues), at least 1. When all are
    /// busy, new messages queue and then callers wait.
    pub in_flight_batches_max: usize,
    /// Messages waiting for the batching task, at least 1.
    pub pending_count_max: usize,
    /// Seed of the retry jitter; `None` seeds from the OS. Set it to make
    /// retry timing reproducible in tests.
    pub jitter_seed: Option<u64>,
    /// Send batches as requests on one `PublishStream` (the default), or
    /// each as its own unary call. Against a broker without the stream the
    /// producer uses the unary calls either way.
    pub publish_stream: bool,
}

impl Default for ProducerConfig {
    /// 5 ms linger, batches of up to 100 messages or 1 MiB, 30 s per publish,
    /// 10 s per attempt, the default retry policy and breaker, 8 batches in
    /// flight, 1024 messages queued, over the publish stream.
    fn default() -> ProducerConfig {
        ProducerConfig {
            linger: Duration::from_millis(5),
            batch_count_max: 100,
            batch_size_max: 1024 * 1024,
            deadline: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            breaker: BreakerConfig::default(),
            in_flight_batches_max: 8,
            pending_count_max: 1024,
            jitter_seed: None,
            publish_stream: true,
        }
    }
}

impl ProducerConfig {
    /// Checks every setting against its range; the error names the setting.
    pub fn validate(&self) -> Result<(), Error> {
        check_range("batch_count_max", self.batch_count_max, 1, contract::BATCH_COUNT_MAX)?;
        check_range("batch_size_max", self.batch_size_max, 1, contract::BATCH_SIZE_MAX)?;
        check_range("in_flight_batches_max", self.in_flight_batches_max, 1, Semaphore::MAX_PERMITS)?;
        check_range("pending_count_max", self.pending_count_max, 1, Semaphore::MAX_PERMITS)?;
        check_range("retry.attempts_max", self.retry.attempts_max as usize, 1, usize::MAX)?;
        check_range("breaker.failure_threshold", self.breaker.failure_threshold as usize, 1, usize::MAX)?;
        check_range("breaker.half_open_probes", self.breaker.half_open_probes as usize, 1, usize::MAX)?;
        if self.deadline.is_zero() || self.attempt_timeout.is_zero() {
            return Err(Error::InvalidArgument {
                message: "producer.deadline and producer.attempt_timeout must be greater than zero".into(),
            });
        }
        Ok(())
    }
}

fn check_range(name: &str, value: usize, min: usize, max: usize) -> Result<(), Error> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(Error::InvalidArgument { message: format!("producer.{name} must be in {min}..={max}; got {value}") })
    }
}

/// Publishes messages to queues. Share it (`Arc<Producer>`) rather than
/// making many: one producer batches across all its callers.
///
/// ```no_run
/// # async fn example() -> Result<(), ballast_client::Error> {
/// use std::time::Duration;
/// use ballast_client::{Client, Error, Message, ProducerConfig};
///
/// let client = Client::connect("http://127.0.0.1:7400").await?;
/// let producer = client.producer(ProducerConfig::default())?;
///
/// let message = Message::new(r#"{"order": 42}"#)
///     .with_lane(0)
///     .with_header("content-type", "application/json")
///     .with_delay(Duration::from_secs(10));
/// match producer.publish("payments", message).await {
///     Ok(receipt) => println!("stored at {} (duplicate: {})", receipt.id, receipt.duplicate),
///     Err(error) if error.is_retryable() => {
///         // Retries and the deadline ran out, or the breaker is open: back off.
///         eprintln!("broker busy or down: {error}; retry after {:?}", error.retry_after());
///     }
///     Err(error) => return Err(error),
/// }
/// producer.close().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Producer {
    /// Messages on their way to the batching task; closing it stops the task.
    requests: mpsc::Sender<Request>,
    shared: Arc<Shared>,
    batcher: JoinHandle<()>,
}

/// What the batching task and the batch senders share.
#[derive(Debug)]
struct Shared {
    client: PublisherClient<Transport>,
    stream: PublishStream,
    config: ProducerConfig,
    retrier: Retrier,
    clock: Arc<dyn Clock>,
    /// One breaker per queue published to; entries live as long as the
    /// producer (one per queue name the program uses).
    breakers: Mutex<HashMap<String, Arc<CircuitBreaker>>>,
}

/// One message on its way to a batch.
#[derive(Debug)]
struct Request {
    queue: String,
    item: Item,
}

#[derive(Debug)]
struct Item {
    /// The wire message, its idempotency key fixed.
    message: proto::Message,
    /// Payload bytes, for the batch size limit.
    size: usize,
    /// When the caller stops waiting.
    deadline: Instant,
    reply: oneshot::Sender<Result<Receipt, Error>>,
}

impl Producer {
    pub(crate) fn new(channel: Transport, config: ProducerConfig) -> Result<Producer, Error> {
        Producer::with_clock(channel, config, Arc::new(SystemClock))
    }

    pub(crate) fn with_clock(
        channel: Transport,
        config: ProducerConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Producer, Error> {
        config.validate()?;
        let (requests, receiver) = mpsc::channel(config.pending_count_max);
        let client = PublisherClient::new(channel);
        let shared = Arc::new(Shared {
            stream: PublishStream::new(client.clone(), config.in_flight_batches_max, config.attempt_timeout),
            client,
            retrier: Retrier::new(config.retry, config.attempt_timeout, config.jitter_seed),
            config,
            clock,
            breakers: Mutex::new(HashMap::new()),
        });
        let batcher = tokio::spawn(run_batcher(shared.clone(), receiver));
        Ok(Producer { requests, shared, batcher })
    }

    /// Publishes `message` to `queue` and waits for its receipt: the message
    /// is durable under the queue's sync policy. Batched with other publishes
    /// to the same queue, retried within the configured deadline.
    ///
    /// The error says whether trying later can help
    /// ([`Error::is_retryable`]). After a retryable error the message may or
    /// may not be stored; publish it again with the same idempotency key
    /// ([`Message::with_idempotency_key`]) to be sure it is stored once.
    pub async fn publish(&self, queue: &str, message: Message) -> Result<Receipt, Error> {
        self.submit(queue, message).await?.wait().await
    }

    /// Hands `message` to the batching task and returns without waiting for
    /// the broker; [`PendingReceipt::wait`] gives the receipt. Waits only
    /// while the producer's queue is full (within the deadline).
    ///
    /// Messages submitted one after another join their queue's batches in
    /// that order, which lets one task publish a stream of messages in order
    /// without waiting for each receipt. The broker stores them in that order
    /// as long as batches do not overtake each other: with
    /// `in_flight_batches_max = 1` and no retries. With more batches in
    /// flight, or after a retry, a later batch may be stored first.
    ///
    /// ```no_run
    /// # async fn example(producer: &ballast_client::Producer) -> Result<(), ballast_client::Error> {
    /// use ballast_client::Message;
    ///
    /// let mut pending = Vec::new();
    /// for line in ["first", "second", "third"] {
    ///     pending.push(producer.submit("logs", Message::new(line)).await?);
    /// }
    /// for receipt in pending {
    ///     println!("{}", receipt.wait().await?.id);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn submit(&self, queue: &str, message: Message) -> Result<PendingReceipt, Error> {
        let deadline = Instant::now() + self.shared.config.deadline;
        let budget = self.shared.config.deadline;
        contract::check_queue_name(queue)?;
        message.validate()?;
        self.shared.breaker(queue).check().map_err(|rejected| Error::CircuitOpen { retry_in: rejected.retry_in })?;
        let key = message.idempotency_key().map_or_else(generate_idempotency_key, str::to_owned);
        let message = message.into_proto(key);
        let size = message.payload.len();
        let (reply, receiver) = oneshot::channel();
        let request = Request { queue: queue.to_owned(), item: Item { message, size, deadline, reply } };
        match tokio::time::timeout_at(deadline, self.requests.send(request)).await {
            Ok(Ok(())) => Ok(PendingReceipt { reply: receiver, deadline, budget }),
            Ok(Err(_closed)) => Err(Error::Closed),
            Err(_elapsed) => Err(Error::DeadlineExceeded { timeout: Some(budget), last_error: None }),
        }
    }

    /// Publishes several messages to `queue`, answering each in order. They
    /// are submitted in order at once, so they share batches; one failing
    /// does not stop the others.
    ///
    /// ```no_run
    /// # async fn example(producer: &ballast_client::Producer) {
    /// use ballast_client::Message;
    ///
    /// let lines = ["a", "b", "c"].map(Message::new);
    /// for result in producer.publish_all("logs", lines).await {
    ///     match result {
    ///         Ok(receipt) => println!("{}", receipt.id),
    ///         Err(error) => eprintln!("{error}"),
    ///     }
    /// }
    /// # }
    /// ```
    pub async fn publish_all(
        &self,
        queue: &str,
        messages: impl IntoIterator<Item = Message>,
    ) -> Vec<Result<Receipt, Error>> {
        let mut pending = Vec::new();
        for message in messages {
            pending.push(self.submit(queue, message).await);
        }
        let mut results = Vec::with_capacity(pending.len());
        for entry in pending {
            results.push(match entry {
                Ok(receipt) => receipt.wait().await,
                Err(error) => Err(error),
            });
        }
        results
    }

    /// The state of `queue`'s circuit breaker (closed if nothing was
    /// published there yet).
    pub fn breaker_state(&self, queue: &str) -> BreakerState {
        self.shared.breaker(queue).state()
    }

    /// Sends every queued message now, waits for all answers, and stops the
    /// batching task. Dropping a producer without closing it also sends what
    /// is queued, in the background.
    pub async fn close(self) {
        drop(self.requests);
        if let Err(error) = self.batcher.await {
            if error.is_panic() {
                std::panic::resume_unwind(error.into_panic());
            }
        }
    }
}

/// A submitted message's receipt, still to come
/// ([`Producer::submit`]).
#[derive(Debug)]
#[must_use = "a pending receipt does nothing unless waited for; dropping it does not cancel the publish"]
pub struct PendingReceipt {
    reply: oneshot::Receiver<Result<Receipt, Error>>,
    /// When the publish call's deadline passes.
    deadline: Instant,
    budget: Duration,
}

impl PendingReceipt {
    /// Waits for the receipt, at most until the publish's deadline.
    pub async fn wait(self) -> Result<Receipt, Error> {
        match tokio::time::timeout_at(self.deadline, self.reply).await {
            Ok(Ok(result)) => result,
            Ok(Err(_dropped)) => Err(Error::Closed),
            Err(_elapsed) => Err(Error::DeadlineExceeded { timeout: Some(self.budget), last_error: None }),
        }
    }
}

impl Shared {
    fn breaker(&self, queue: &str) -> Arc<CircuitBreaker> {
        let mut breakers = self.breakers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(breaker) = breakers.get(queue) {
            return breaker.clone();
        }
        let breaker = Arc::new(CircuitBreaker::with_clock(self.config.breaker, self.clock.clone()));
        breakers.insert(queue.to_owned(), breaker.clone());
        breaker
    }

    /// Publishes one message with retries, within `deadline`.
    async fn publish_one(
        &self,
        queue: &str,
        breaker: &CircuitBreaker,
        message: proto::Message,
        deadline: Instant,
    ) -> Result<Receipt, Error> {
        let mut receipts = self.publish_batch(queue, breaker, vec![message], deadline).await?;
        receipts.pop().ok_or_else(|| Error::Protocol { message: "publish answered without a receipt".into() })
    }

    /// Publishes a batch with retries, within `deadline`.
    async fn publish_batch(
        &self,
        queue: &str,
        breaker: &CircuitBreaker,
        messages: Vec<proto::Message>,
        deadline: Instant,
    ) -> Result<Vec<Receipt>, Error> {
        let count = messages.len();
        let receipts = self
            .retrier
            .run(deadline, self.config.deadline, Some(breaker), || self.attempt(queue, messages.clone()))
            .await?;
        if receipts.len() != count {
            return Err(Error::Protocol {
                message: format!("a batch of {count} messages was answered with {} receipts", receipts.len()),
            });
        }
        receipts.into_iter().map(Receipt::try_from).collect()
    }

    /// One attempt: a request on the publish stream, or a unary call (when
    /// configured, or when the broker lacks the stream).
    async fn attempt(&self, queue: &str, messages: Vec<proto::Message>) -> Result<Vec<proto::Receipt>, Error> {
        let messages = if self.config.publish_stream && !self.stream.unsupported() {
            match self.stream.publish(queue, messages).await {
                Sent::Answered(answer) => return answer,
                Sent::Unsupported(messages) => {
                    tracing::debug!("the broker has no PublishStream; publishing with unary calls");
                    messages
                }
            }
        } else {
            messages
        };
        let mut client = self.client.clone();
        if messages.len() == 1 {
            let message = messages.into_iter().next();
            let request = proto::PublishRequest { queue: queue.to_owned(), message };
            let response = client.publish(request).await.map_err(Error::from_status)?.into_inner();
            return Ok(response.receipt.into_iter().collect());
        }
        let request = proto::PublishBatchRequest { queue: queue.to_owned(), messages };
        Ok(client.publish_batch(request).await.map_err(Error::from_status)?.into_inner().receipts)
    }
}

/// Messages of one queue and lane waiting to be sent together.
#[derive(Debug)]
struct Pending {
    items: Vec<Item>,
    size: usize,
    /// When the batch goes out even if it is not full.
    due: Instant,
}

/// The batching task: groups requests per queue and hands full or due
/// batches to sender tasks. Ends when every `Producer` handle is gone, after
/// sending what is left and waiting for the senders.
async fn run_batcher(shared: Arc<Shared>, mut requests: mpsc::Receiver<Request>) {
    let config = shared.config.clone();
    let in_flight_permits = Arc::new(Semaphore::new(config.in_flight_batches_max));
    let mut senders = JoinSet::new();
    let mut pending: HashMap<BatchKey, Pending> = HashMap::new();
    loop {
        let next_due = pending.values().map(|batch| batch.due).min();
        tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else { break };
                let mut ready = Vec::new();
                add(&config, &mut pending, request, &mut ready);
                // Take what is already queued too, so a burst is batched even
                // with a zero linger; bounded so due batches are not starved.
                for _ in 1..config.batch_count_max {
                    let Ok(request) = requests.try_recv() else { break };
                    add(&config, &mut pending, request, &mut ready);
                }
                if config.linger.is_zero() {
                    ready.extend(pending.drain());
                }
                for ((queue, _lane), batch) in ready {
                    dispatch(&shared, &in_flight_permits, &mut senders, queue, batch).await;
                }
            }
            () = sleep_until(next_due), if next_due.is_some() => {
                let now = Instant::now();
                let due: Vec<BatchKey> =
                    pending.iter().filter(|(_, batch)| batch.due <= now).map(|(key, _)| key.clone()).collect();
                for key in due {
                    let batch = pending.remove(&key).expect("a due key has a pending batch");
                    dispatch(&shared, &in_flight_permits, &mut senders, key.0, batch).await;
                }
            }
            Some(joined) = senders.join_next(), if !senders.is_empty() => reap(joined),
        }
    }
    for ((queue, _lane), batch) in pending.drain().collect::<Vec<_>>() {
        dispatch(&shared, &in_flight_permits, &mut senders, queue, batch).await;
    }
    while let Some(joined) = senders.join_next().await {
        reap(joined);
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// A batch's queue and lane (`None`: the queue's default lane).
type BatchKey = (String, Option<u32>);

/// Adds a request to its queue and lane's batch; batches that are full move
/// to `ready`.
fn add(
    config: &ProducerConfig,
    pending: &mut HashMap<BatchKey, Pending>,
    request: Request,
    ready: &mut Vec<(BatchKey, Pending)>,
) {
    let Request { queue, item } = request;
    let key = (queue, item.message.lane);
    if let Some(batch) = pending.get(&key) {
        if batch.items.len() + 1 > config.batch_count_max || batch.size + item.size > config.batch_size_max {
            let full = pending.remove(&key).expect("checked above");
            ready.push((key.clone(), full));
        }
    }
    let batch = pending.entry(key.clone()).or_insert_with(|| Pending {
        items: Vec::new(),
        size: 0,
        due: Instant::now() + config.linger,
    });
    batch.size += item.size;
    batch.items.push(item);
    assert!(batch.items.len() <= config.batch_count_max, "batch of {} > {}", batch.items.len(), config.batch_count_max);
    if batch.items.len() == config.batch_count_max || batch.size >= config.batch_size_max {
        let full = pending.remove(&key).expect("just inserted");
        ready.push((key, full));
    }
}

async fn dispatch(
    shared: &Arc<Shared>,
    permits: &Arc<Semaphore>,
    senders: &mut JoinSet<()>,
    queue: String,
    batch: Pending,
) {
    let permit = permits.clone().acquire_owned().await.expect("the in-flight semaphore is never closed");
    senders.spawn(send_batch(shared.clone(), queue, batch.items, permit));
}

fn reap(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined {
        // The batch's callers see their reply channel closed (Error::Closed).
        tracing::error!(%error, "a publish batch task failed");
    }
}

/// Sends one batch and answers each of its callers.
async fn send_batch(shared: Arc<Shared>, queue: String, mut items: Vec<Item>, _permit: OwnedSemaphorePermit) {
    let breaker = shared.breaker(&queue);
    let deadline = items.iter().map(|item| item.deadline).max().expect("a dispatched batch is never empty");
    if items.len() == 1 {
        let item = items.pop().expect("one item");
        let result = shared.publish_one(&queue, &breaker, item.message, deadline).await;
        // A caller that stopped waiting has dropped its receiver.
        let _ = item.reply.send(result);
        return;
    }
    let messages = items.iter().map(|item| item.message.clone()).collect();
    match shared.publish_batch(&queue, &breaker, messages, deadline).await {
        Ok(receipts) => {
            for (item, receipt) in items.into_iter().zip(receipts) {
                let _ = item.reply.send(Ok(receipt));
            }
        }
        Err(Error::InvalidArgument { message }) => {
            // One bad message rejects the whole batch; send each alone so
            // only the bad ones fail.
            tracing::debug!(%message, count = items.len(), "batch rejected; publishing its messages one by one");
            for item in items {
                let result = shared.publish_one(&queue, &breaker, item.message, item.deadline).await;
                let _ = item.reply.send(result);
            }
        }
        Err(error) => {
            for item in items {
                let _ = item.reply.send(Err(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests;
