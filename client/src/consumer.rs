//! [`Consumer`]: a handler-driven loop over a consume stream, with a credit
//! window, a concurrency limit, batched acks, nacks with a delay policy,
//! reconnects and a graceful stop.
//!
//! One task owns the loop. A handler's future is polled once on that task
//! when it starts: if it is done then (it did not wait on anything), its
//! result is recorded at once, with no task of its own; otherwise it goes
//! on as a task of its own. [`INLINE_SLOW_POLLS`] first polls in a row
//! that take longer than [`INLINE_POLL_BUDGET`] (handlers doing CPU work
//! before they first wait) make the loop spawn the next
//! [`INLINE_PROBE_INTERVAL`] handlers without polling them first, so such
//! handlers run in parallel and do not hold up the stream. Rules:
//!
//! 1. Credit window: a session subscribes with credit `prefetch` (W). Every
//!    delivery uses one credit. A delivery is *held* from its arrival until
//!    its ack or nack is sent. After sending the acks and nacks of k
//!    deliveries the loop grants credit k (after them on the stream, so the
//!    broker's "credit held + unacked <= limit" rule holds). So at all times
//!    credit held + deliveries held <= W (asserted).
//! 2. Concurrency: at most `concurrency` handlers run at once, counted across
//!    sessions; deliveries beyond that wait in arrival order.
//! 3. Outcome: `Ok` acks the delivery; `Err` (or a panic) nacks it with the
//!    delay the [`NackPolicy`] gives for its attempt, and the error's text as
//!    the reason. Acks and nacks are sent in batches: when half the window is
//!    done, or `ack_flush_interval` after the first unsent one.
//! 4. Sessions: delivery ids belong to one stream. When a stream breaks
//!    (broker restart, network), the deliveries held but not started are
//!    dropped, and results of handlers still running for the old session are
//!    discarded rather than acked on the new one: the broker released those
//!    leases and redelivers the messages (at-least-once; a handler may see a
//!    message again). The loop reconnects with backoff and jitter (honouring
//!    a retry-after hint) and subscribes anew.
//! 5. Fatal errors end the loop after in-flight handlers finish: the queue
//!    does not exist or was deleted (`NOT_FOUND`), the request is invalid,
//!    permission is denied, or the broker breaks the protocol.
//! 6. Lease extension: while a handler runs, its delivery's lease is
//!    extended every third of the lease's length (by that length), so work
//!    longer than the lease is not redelivered meanwhile. Extension stops
//!    when the handler ends, when the broker answers that the lease is not
//!    held (expired, or the session is gone), and once the handler has run
//!    `extend_max` since the delivery arrived: then the lease runs out and
//!    the message is redelivered.
//! 7. Graceful stop: no new handler starts; running handlers finish; their
//!    acks and nacks are sent; the request stream is closed and the loop waits
//!    (up to `stop_timeout`) for the broker to end the response stream, which
//!    it does after applying those acks. Deliveries not started are released
//!    by the close and redelivered.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fmt,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ballast_proto::v1::{
    self as proto, consume_request::Kind as RequestKind, consume_response::Kind as ResponseKind,
    consumer_client::ConsumerClient,
};
use bytes::Bytes;
use tokio::{
    sync::{mpsc, watch},
    task::{JoinHandle, JoinSet},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::{client::Transport, leader::Route};

use crate::{Backoff, Error, MessageId, contract};

/// How a [`Consumer`] paces, runs handlers, acks and reconnects.
///
/// ```
/// use std::time::Duration;
/// use ballast_client::{ConsumerConfig, NackPolicy};
///
/// let config = ConsumerConfig {
///     prefetch: 32,
///     concurrency: 4,
///     nack_delay: NackPolicy::exponential(Duration::from_millis(500), Duration::from_secs(60)),
///     ..ConsumerConfig::default()
/// };
/// # let _ = config;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// Credit window: deliveries the broker may send ahead of the handlers,
    /// 1..=[`contract::CREDIT_MAX`].
    pub prefetch: u32,
    /// Handlers running at once, at least 1.
    pub concurrency: usize,
    /// Redelivery delay after a handler fails.
    pub nack_delay: NackPolicy,
    /// Longest time an ack or nack waits to be sent with others.
    pub ack_flush_interval: Duration,
    /// Delay between reconnect attempts (exponential with full jitter; the
    /// attempt count resets once a session is established).
    pub reconnect: Backoff,
    /// Longest wait for a stream to open and the broker to confirm the
    /// subscription. A node that lets it pass (paused or hung, its
    /// connection up) is treated as unreachable: a client given several
    /// addresses reconnects to the next, and a single address gets a new
    /// connection.
    pub subscribe_timeout: Duration,
    /// Longest wait, on stop, for the broker to end the stream after the last
    /// acks were sent.
    pub stop_timeout: Duration,
    /// Stop after this many handlers have been started (and have finished);
    /// `None` runs until stopped.
    pub max_messages: Option<u64>,
    /// Ceiling of lease extension (rule 6): a running handler's lease is
    /// extended every third of the lease until the handler has run this
    /// long since its delivery arrived; then the lease is left to expire
    /// and the message is redelivered. `None` never extends (a handler
    /// slower than the lease sees its message redelivered meanwhile).
    pub extend_max: Option<Duration>,
}

impl Default for ConsumerConfig {
    /// Prefetch 64, 8 handlers, nack delay 1 s doubling to 60 s, acks sent
    /// within 5 ms, reconnects from 100 ms doubling to 10 s, 10 s to
    /// subscribe, 5 s to stop, no message limit, leases extended for up to
    /// 30 minutes of handler time.
    fn default() -> ConsumerConfig {
        ConsumerConfig {
            prefetch: 64,
            concurrency: 8,
            nack_delay: NackPolicy::default(),
            ack_flush_interval: Duration::from_millis(5),
            reconnect: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            subscribe_timeout: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(5),
            max_messages: None,
            extend_max: Some(Duration::from_secs(30 * 60)),
        }
    }
}

impl ConsumerConfig {
    /// Checks every setting against its range; the error names the setting.
    pub fn validate(&self) -> Result<(), Error> {
        if !(1..=contract::CREDIT_MAX).contains(&self.prefetch) {
            return Err(Error::InvalidArgument {
                message: format!("consumer.prefetch must be in 1..={}; got {}", contract::CREDIT_MAX, self.prefetch),
            });
        }
        if self.concurrency == 0 {
            return Err(Error::InvalidArgument { message: "consumer.concurrency must be at least 1; got 0".into() });
        }
        if self.max_messages == Some(0) {
            return Err(Error::InvalidArgument { message: "consumer.max_messages must be at least 1; got 0".into() });
        }
        if self.extend_max == Some(Duration::ZERO) {
            return Err(Error::InvalidArgument {
                message: "consumer.extend_max must be positive; use None to never extend leases".into(),
            });
        }
        if self.nack_delay.cap > contract::DELAY_MAX {
            return Err(Error::InvalidArgument {
                message: format!("consumer.nack_delay cap must be at most {}ms", contract::DELAY_MAX.as_millis()),
            });
        }
        Ok(())
    }
}

/// Redelivery delay after a failed handler, by attempt: `base * 2^(attempt-1)`
/// capped at `cap` (no jitter: the broker spreads redeliveries by lease).
///
/// ```
/// use std::time::Duration;
/// use ballast_client::NackPolicy;
///
/// let policy = NackPolicy::exponential(Duration::from_secs(1), Duration::from_secs(10));
/// assert_eq!(policy.delay(1), Duration::from_secs(1));
/// assert_eq!(policy.delay(3), Duration::from_secs(4));
/// assert_eq!(policy.delay(9), Duration::from_secs(10));
/// assert_eq!(NackPolicy::fixed(Duration::from_secs(2)).delay(5), Duration::from_secs(2));
/// assert_eq!(NackPolicy::immediate().delay(5), Duration::ZERO);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NackPolicy {
    /// Delay after the first attempt fails.
    pub base: Duration,
    /// Longest delay.
    pub cap: Duration,
}

impl NackPolicy {
    /// Redeliver at once.
    pub const fn immediate() -> NackPolicy {
        NackPolicy { base: Duration::ZERO, cap: Duration::ZERO }
    }

    /// Always the same delay.
    pub const fn fixed(delay: Duration) -> NackPolicy {
        NackPolicy { base: delay, cap: delay }
    }

    /// A delay doubling per attempt from `base` up to `cap`.
    pub const fn exponential(base: Duration, cap: Duration) -> NackPolicy {
        NackPolicy { base, cap }
    }

    /// The delay after attempt `attempt` (1-based) failed.
    pub fn delay(&self, attempt: u32) -> Duration {
        Backoff::new(self.base, self.cap).ceiling(attempt.saturating_sub(1))
    }
}

impl Default for NackPolicy {
    /// 1 s doubling to 60 s.
    fn default() -> NackPolicy {
        NackPolicy::exponential(Duration::from_secs(1), Duration::from_secs(60))
    }
}

/// One delivery of a message to this consumer, handed to the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivery {
    /// Where the message is stored.
    pub id: MessageId,
    /// The payload.
    pub payload: Bytes,
    /// Application headers.
    pub headers: HashMap<String, String>,
    /// The message's idempotency key, if it was published with one.
    pub idempotency_key: Option<String>,
    /// 1 for the first delivery, +1 for each redelivery.
    pub attempt: u32,
    /// When the message was first published.
    pub published_at: SystemTime,
    /// When the lease ends unless the delivery is acked or nacked; the
    /// broker then redelivers the message.
    pub lease_deadline: SystemTime,
    /// The lease's length (the queue's lease timeout): the consumer extends
    /// the lease every third of it while the handler runs. Zero when the
    /// broker does not say (then the lease is not extended).
    pub lease: Duration,
    /// The lease's id within its session (for logs; the loop acks by it).
    pub delivery_id: u64,
}

impl Delivery {
    fn from_proto(delivery: proto::Delivery) -> Result<Delivery, Error> {
        let id = delivery.id.ok_or_else(|| Error::Protocol { message: "delivery without a message id".into() })?;
        Ok(Delivery {
            id: id.into(),
            payload: delivery.payload,
            headers: delivery.headers,
            idempotency_key: Some(delivery.idempotency_key).filter(|key| !key.is_empty()),
            attempt: delivery.attempt,
            published_at: UNIX_EPOCH + Duration::from_millis(delivery.published_at_ms),
            lease_deadline: UNIX_EPOCH + Duration::from_millis(delivery.lease_deadline_ms),
            lease: Duration::from_millis(delivery.lease_ms),
            delivery_id: delivery.delivery_id,
        })
    }
}

/// What an extend did to one lease ([`Client::extend_leases`](crate::Client::extend_leases)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseExtension {
    /// Held until `lease_deadline`.
    Extended { lease_deadline: SystemTime },
    /// Its deadline had passed: the broker is taking it back to redeliver
    /// the message; it was not extended.
    Expired,
    /// Not a lease held: acked, nacked, taken back after expiry (then
    /// redelivered under another id), released, never issued, or another
    /// stream's. Nothing changed.
    NotLeased,
}

impl LeaseExtension {
    pub(crate) fn from_proto(result: &proto::ExtendResult) -> LeaseExtension {
        match result.outcome() {
            proto::ExtendOutcome::Extended => LeaseExtension::Extended {
                lease_deadline: UNIX_EPOCH + Duration::from_millis(result.lease_deadline_ms),
            },
            proto::ExtendOutcome::Expired => LeaseExtension::Expired,
            proto::ExtendOutcome::NotLeased | proto::ExtendOutcome::Unspecified => LeaseExtension::NotLeased,
        }
    }
}

/// What a consumer did, returned when it ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Sessions established (1 + reconnects).
    pub sessions: u64,
    /// Deliveries received.
    pub delivered: u64,
    /// Handlers started.
    pub handled: u64,
    /// Of those, handlers done in their first poll on the consumer's task,
    /// which needed no task of their own (see [`Consumer::spawn`]).
    pub handled_inline: u64,
    /// Acks sent.
    pub acked: u64,
    /// Nacks sent.
    pub nacked: u64,
    /// Acks or nacks the broker rejected (the lease had expired).
    pub rejected: u64,
    /// Handler results dropped because their session had ended (those
    /// messages are redelivered).
    pub abandoned: u64,
    /// Lease extensions the broker applied (one per lease per extension).
    pub extended: u64,
    /// Lease extensions the broker refused: the lease had expired or was
    /// no longer held; that lease is not extended again.
    pub extend_refused: u64,
    /// Handlers that ran past `extend_max`, whose leases were then left to
    /// expire.
    pub extend_gave_up: u64,
}

/// A consumer of one queue. [`Consumer::spawn`] starts it with a handler.
///
/// ```no_run
/// # async fn example() -> Result<(), ballast_client::Error> {
/// use ballast_client::{Client, ConsumerConfig, Delivery};
///
/// let client = Client::connect("http://127.0.0.1:7400").await?;
/// let consumer = client.consumer("emails", ConsumerConfig::default())?;
/// let handle = consumer.spawn(|delivery: Delivery| async move {
///     let text = std::str::from_utf8(&delivery.payload).map_err(|e| e.to_string())?;
///     println!("attempt {}: {text}", delivery.attempt);
///     Ok::<(), String>(()) // Ok acks; Err nacks with a delay
/// });
/// tokio::signal::ctrl_c().await.ok();
/// let stats = handle.stop().await?; // finishes in-flight handlers first
/// println!("acked {}", stats.acked);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Consumer {
    client: ConsumerClient<Transport>,
    queue: String,
    config: ConsumerConfig,
}

/// A running consumer. [`ConsumerHandle::stop`] stops it gracefully;
/// dropping the handle (and every [`Stopper`]) does too, in the background.
#[derive(Debug)]
pub struct ConsumerHandle {
    stop: Arc<watch::Sender<bool>>,
    task: JoinHandle<Result<ConsumerStats, Error>>,
}

/// Asks a running consumer to stop gracefully, from anywhere (a signal
/// handler, another task) while someone else waits in
/// [`ConsumerHandle::join`].
///
/// ```no_run
/// # async fn example(consumer: ballast_client::Consumer) -> Result<(), ballast_client::Error> {
/// use ballast_client::Delivery;
///
/// let handle = consumer.spawn(|_delivery: Delivery| async { Ok::<(), String>(()) });
/// let stopper = handle.stopper();
/// tokio::spawn(async move {
///     tokio::signal::ctrl_c().await.ok();
///     stopper.stop();
/// });
/// let stats = handle.join().await?;
/// # let _ = stats;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Stopper {
    stop: Arc<watch::Sender<bool>>,
}

impl Stopper {
    /// Starts a graceful stop (see the module docs, rule 7); returns at once.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

impl Consumer {
    pub(crate) fn new(channel: Transport, queue: &str, config: ConsumerConfig) -> Result<Consumer, Error> {
        contract::check_queue_name(queue)?;
        config.validate()?;
        let client = ConsumerClient::new(channel).max_decoding_message_size(contract::GRPC_DECODE_SIZE_MAX);
        Ok(Consumer { client, queue: queue.to_owned(), config })
    }

    /// Starts consuming on the current Tokio runtime, calling `handler` for
    /// every delivery. `Ok` acks the delivery; `Err(e)` nacks it with the
    /// configured delay and `e.to_string()` as the reason. A panicking
    /// handler counts as an error.
    ///
    /// `handler` itself is called on the consumer's task and should only
    /// build its future; the work belongs in the future (up to
    /// `concurrency` at once). The future is polled once on the consumer's
    /// task: one done then costs no task; one that waits goes on as its own
    /// task. Blocking or CPU work before the first `.await` holds up the
    /// consumer meanwhile: two such first polls in a row over 100 µs make
    /// the consumer spawn the next 64 handlers without polling them first,
    /// but such work belongs in `spawn_blocking`.
    pub fn spawn<H, F, E>(self, handler: H) -> ConsumerHandle
    where
        H: Fn(Delivery) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        let (stop, stopped) = watch::channel(false);
        #[cfg(feature = "otel")]
        let queue = self.queue.clone();
        let handler: Arc<dyn Fn(Delivery) -> HandlerFuture + Send + Sync> = Arc::new(move |delivery| {
            // With `otel`, the handler (its future built too) runs in a
            // consumer span linked to the message's trace context.
            #[cfg(feature = "otel")]
            let span = crate::otel::consumer_context(&queue, &delivery);
            #[cfg(feature = "otel")]
            let _current = span.clone().attach();
            let future = handler(delivery);
            let outcome = async move { future.await.map_err(|error| error.to_string()) };
            #[cfg(feature = "otel")]
            let outcome = crate::otel::in_span(span, outcome);
            Box::pin(outcome)
        });
        let task = tokio::spawn(Loop::new(self, handler, stopped).run());
        ConsumerHandle { stop: Arc::new(stop), task }
    }
}

impl ConsumerHandle {
    /// Stops gracefully (see the module docs, rule 7) and returns what the
    /// consumer did, or the fatal error that had already ended it.
    pub async fn stop(self) -> Result<ConsumerStats, Error> {
        self.stop.send_replace(true);
        self.join().await
    }

    /// Waits until the consumer ends: `max_messages` reached, a fatal error
    /// (the queue was deleted, ...), or a stop through a [`Stopper`].
    pub async fn join(self) -> Result<ConsumerStats, Error> {
        // `self.stop` stays alive while waiting, so waiting is not stopping.
        match self.task.await {
            Ok(result) => result,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_cancelled) => Err(Error::Closed),
        }
    }

    /// A handle that can stop the consumer while another task joins it.
    pub fn stopper(&self) -> Stopper {
        Stopper { stop: self.stop.clone() }
    }

    /// Whether the consumer has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type Handler = Arc<dyn Fn(Delivery) -> HandlerFuture + Send + Sync>;

/// Longest nack reason sent, in bytes; longer handler errors are cut.
const NACK_REASON_SIZE_MAX: usize = 1024;

/// Longest first poll of a handler's future on the consumer's task before
/// the loop stops polling handlers there (see the module docs). A handler
/// that returns at once (or after a non-blocking step) takes a few
/// microseconds; one that is slower is doing work that belongs on a worker
/// of its own, and while it runs inline no delivery is read and no ack
/// sent. 100 microseconds is about 15 deliveries at the drain rate of this
/// loop.
const INLINE_POLL_BUDGET: Duration = Duration::from_micros(100);

/// First polls in a row over [`INLINE_POLL_BUDGET`] that turn inline
/// polls off. One alone may be the thread being preempted, not the
/// handler's work; a handler that is slow is slow every time.
const INLINE_SLOW_POLLS: u32 = 2;

/// Handlers spawned without a first poll once inline polls were turned
/// off; then the next ones are polled inline again, so a consumer whose
/// handlers got fast again goes back to the cheap path.
const INLINE_PROBE_INTERVAL: u32 = 64;

/// Requests queued on the outgoing stream before the loop stops moving more
/// into it; the loop keeps its own queue beyond that, so it never blocks on
/// sending while the broker waits for it to read.
const OUTGOING_CAPACITY: usize = 64;

/// A handler that is running: which session's delivery it handles.
#[derive(Debug, Clone, Copy)]
struct Running {
    epoch: u64,
    delivery_id: u64,
    attempt: u32,
    /// The lease's length, requested again at each extension.
    lease: Duration,
    /// When to extend the lease next; `None`: not any more (rule 7).
    extend_at: Option<Instant>,
    /// The extension ceiling: the delivery's arrival plus `extend_max`.
    extend_until: Instant,
}

/// The consumer's task state, across sessions.
struct Loop {
    consumer: Consumer,
    handler: Handler,
    stop: watch::Receiver<bool>,
    stopping: bool,
    /// Handler tasks of every session; results of old sessions are dropped.
    handlers: JoinSet<Result<(), String>>,
    running: HashMap<tokio::task::Id, Running>,
    /// Handlers still to be spawned without a first poll inline, after
    /// [`INLINE_SLOW_POLLS`] took longer than [`INLINE_POLL_BUDGET`].
    inline_skip: u32,
    /// First polls in a row that took longer than [`INLINE_POLL_BUDGET`].
    slow_polls: u32,
    /// No later than the next lease extension due among the current
    /// session's handlers (`None`: none due). Lowered as handlers start,
    /// recomputed only when extensions run, so the loop does not scan
    /// every running handler per event; a handler that ended early makes
    /// at most one wake-up that finds nothing due.
    extension_due: Option<Instant>,
    /// Session counter; a session's deliveries carry its epoch.
    epoch: u64,
    rng: fastrand::Rng,
    stats: ConsumerStats,
}

/// Why a session ended.
enum SessionEnd {
    /// Stopped on request (or `max_messages` reached) and flushed.
    Stopped,
    /// The stream broke; reconnect after `delay_hint` (at least).
    Broken(Error),
}

/// One consume stream.
struct Session {
    epoch: u64,
    outgoing: mpsc::Sender<proto::ConsumeRequest>,
    incoming: Streaming<proto::ConsumeResponse>,
    /// Requests not yet moved into `outgoing`.
    outbox: VecDeque<proto::ConsumeRequest>,
    /// Deliveries received, not yet started, with their arrival time.
    waiting: VecDeque<(Instant, Delivery)>,
    /// Credit the broker holds for us.
    credit: u32,
    /// Deliveries received whose ack or nack is not yet sent.
    held: u32,
    /// Results not yet sent.
    acks: Vec<u64>,
    nacks: Vec<proto::Nack>,
    /// When the unsent results must go out.
    flush_at: Option<Instant>,
}

impl Loop {
    fn new(consumer: Consumer, handler: Handler, stop: watch::Receiver<bool>) -> Loop {
        Loop {
            consumer,
            handler,
            stop,
            stopping: false,
            handlers: JoinSet::new(),
            running: HashMap::new(),
            inline_skip: 0,
            slow_polls: 0,
            extension_due: None,
            epoch: 0,
            rng: fastrand::Rng::new(),
            stats: ConsumerStats::default(),
        }
    }

    async fn run(mut self) -> Result<ConsumerStats, Error> {
        let result = self.sessions().await;
        // Whatever ended the loop, let running handlers finish (rule 5 and 6);
        // their results can no longer be sent.
        while let Some(joined) = self.handlers.join_next_with_id().await {
            self.finished(joined, None);
        }
        result.map(|()| self.stats)
    }

    /// Opens sessions until stopped or a fatal error.
    async fn sessions(&mut self) -> Result<(), Error> {
        let mut failures: u32 = 0;
        loop {
            if self.stopping || self.limit_reached() {
                return Ok(());
            }
            self.epoch += 1;
            self.extension_due = None;
            let error = match self.open().await {
                Ok(session) => {
                    failures = 0;
                    self.stats.sessions += 1;
                    match self.serve(session).await? {
                        SessionEnd::Stopped => return Ok(()),
                        SessionEnd::Broken(error) => error,
                    }
                }
                Err(error) if is_fatal(&error) => return Err(error),
                Err(error) => error,
            };
            if self.stopping {
                return Ok(());
            }
            let delay = self.consumer.config.reconnect.delay_after(failures, error.retry_after(), &mut self.rng);
            failures = failures.saturating_add(1);
            tracing::warn!(queue = %self.consumer.queue, %error, delay_ms = delay.as_millis(), "consume stream lost; reconnecting");
            self.pause(delay).await;
        }
    }

    /// Waits `delay` while still reaping handlers and watching for stop.
    async fn pause(&mut self, delay: Duration) {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => return,
                changed = self.stop.changed(), if !self.stopping => {
                    if changed.is_err() || *self.stop.borrow() {
                        self.stopping = true;
                        return;
                    }
                }
                Some(joined) = self.handlers.join_next_with_id(), if !self.handlers.is_empty() => {
                    self.finished(joined, None);
                }
            }
        }
    }

    /// Opens a stream, subscribes and waits for the broker's confirmation.
    async fn open(&mut self) -> Result<Session, Error> {
        let config = &self.consumer.config;
        let credit = self.credit_for_subscribe();
        let (outgoing, receiver) = mpsc::channel(OUTGOING_CAPACITY);
        let subscribe = proto::ConsumeRequest {
            kind: Some(RequestKind::Subscribe(proto::Subscribe { queue: self.consumer.queue.clone(), credit })),
        };
        outgoing.try_send(subscribe).expect("a new channel has room for the subscribe request");
        let mut client = self.consumer.client.clone();
        let route = Route::default();
        let mut request = tonic::Request::new(ReceiverStream::new(receiver));
        request.extensions_mut().insert(route.clone());
        let opened = tokio::time::timeout(config.subscribe_timeout, async move {
            let mut incoming = client.consume(request).await.map_err(Error::from_status)?.into_inner();
            match incoming.message().await.map_err(Error::from_status)? {
                Some(proto::ConsumeResponse { kind: Some(ResponseKind::Subscribed(subscribed)) }) => {
                    tracing::debug!(queue = %subscribed.queue, consumer_id = subscribed.consumer_id, "subscribed");
                    Ok(incoming)
                }
                Some(other) => Err(Error::Protocol { message: format!("expected subscribed, got {other:?}") }),
                None => Err(Error::Unavailable { message: "the broker closed the stream before subscribing".into() }),
            }
        })
        .await;
        let incoming = match opened {
            Ok(result) => result?,
            Err(_elapsed) => {
                // A node that took the call and answered nothing (paused,
                // its connection up): the next session goes elsewhere.
                route.stalled();
                return Err(Error::DeadlineExceeded { timeout: Some(config.subscribe_timeout), last_error: None });
            }
        };
        Ok(Session {
            epoch: self.epoch,
            outgoing,
            incoming,
            outbox: VecDeque::new(),
            waiting: VecDeque::new(),
            credit,
            held: 0,
            acks: Vec::new(),
            nacks: Vec::new(),
            flush_at: None,
        })
    }

    /// Runs one session until it breaks, or the consumer stops.
    async fn serve(&mut self, mut session: Session) -> Result<SessionEnd, Error> {
        let prefetch = self.consumer.config.prefetch;
        let (mut flush_timer, mut extension_timer) = (Deadline::new(), Deadline::new());
        loop {
            self.start_handlers(&mut session);
            let results = u32::try_from(session.acks.len() + session.nacks.len()).unwrap_or(u32::MAX);
            if results > 0 && (results >= (prefetch / 2).max(1) || self.stopping) {
                self.flush(&mut session);
            }
            if self.stopping && self.handlers.is_empty() && session.acks.is_empty() && session.nacks.is_empty() {
                return self.close(session).await;
            }
            if !self.stopping && self.limit_reached() {
                // Every allowed handler has started: finish like a stop.
                self.stopping = true;
                continue;
            }
            if !self.pump(&mut session) {
                return Ok(SessionEnd::Broken(Error::Transport { message: "the consume stream closed".into() }));
            }
            flush_timer.set(session.flush_at);
            extension_timer.set(self.extension_due);
            tokio::select! {
                message = session.incoming.message() => match message {
                    Ok(Some(response)) => self.received(&mut session, response)?,
                    Ok(None) => {
                        return Ok(SessionEnd::Broken(Error::Unavailable { message: "the broker ended the stream".into() }));
                    }
                    Err(status) => {
                        let error = Error::from_status(status);
                        if is_fatal(&error) {
                            return Err(error);
                        }
                        return Ok(SessionEnd::Broken(error));
                    }
                },
                Some(joined) = self.handlers.join_next_with_id(), if !self.handlers.is_empty() => {
                    self.finished(joined, Some(&mut session));
                }
                permit = session.outgoing.clone().reserve_owned(), if !session.outbox.is_empty() => match permit {
                    Ok(permit) => {
                        permit.send(session.outbox.pop_front().expect("outbox is not empty"));
                    }
                    Err(_closed) => {
                        return Ok(SessionEnd::Broken(Error::Transport { message: "the consume stream closed".into() }));
                    }
                },
                () = &mut flush_timer.sleep, if flush_timer.at.is_some() => self.flush(&mut session),
                () = &mut extension_timer.sleep, if extension_timer.at.is_some() => self.extend(&mut session),
                changed = self.stop.changed(), if !self.stopping => {
                    if changed.is_err() || *self.stop.borrow() {
                        self.stopping = true;
                    }
                }
            }
        }
    }

    /// Moves queued requests into the stream's channel while it has room,
    /// so they go out this turn; what does not fit waits for the
    /// `reserve` branch of the loop. False if the stream is closed.
    fn pump(&mut self, session: &mut Session) -> bool {
        while let Some(request) = session.outbox.pop_front() {
            match session.outgoing.try_send(request) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(request)) => {
                    session.outbox.push_front(request);
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    }

    /// Handles one message from the broker.
    fn received(&mut self, session: &mut Session, response: proto::ConsumeResponse) -> Result<(), Error> {
        match response.kind {
            Some(ResponseKind::Delivery(delivery)) => {
                if session.credit == 0 {
                    return Err(Error::Protocol { message: "the broker sent a delivery without credit".into() });
                }
                session.credit -= 1;
                session.held += 1;
                self.check_window(session);
                self.stats.delivered += 1;
                let delivery = Delivery::from_proto(delivery)?;
                session.waiting.push_back((Instant::now(), delivery));
                Ok(())
            }
            Some(ResponseKind::Extended(extended)) => {
                for result in extended.results {
                    if result.outcome() == proto::ExtendOutcome::Extended {
                        self.stats.extended += 1;
                        continue;
                    }
                    self.stats.extend_refused += 1;
                    let running = self
                        .running
                        .values_mut()
                        .find(|running| running.epoch == session.epoch && running.delivery_id == result.delivery_id);
                    if let Some(running) = running {
                        running.extend_at = None;
                    }
                    tracing::warn!(
                        queue = %self.consumer.queue,
                        delivery_id = result.delivery_id,
                        outcome = ?result.outcome(),
                        "lease extension refused; the message may be redelivered while its handler runs"
                    );
                }
                Ok(())
            }
            Some(ResponseKind::Rejected(rejected)) => {
                self.stats.rejected += 1;
                tracing::warn!(
                    queue = %self.consumer.queue,
                    delivery_id = rejected.delivery_id,
                    code = rejected.code,
                    message = %rejected.message,
                    "ack or nack rejected; the message will be redelivered"
                );
                Ok(())
            }
            Some(ResponseKind::Subscribed(_)) | None => {
                Err(Error::Protocol { message: format!("unexpected message on the consume stream: {response:?}") })
            }
        }
    }

    /// Starts handlers for waiting deliveries while the limits allow. Each
    /// handler's future is polled once here; one that is done is settled at
    /// once, the others go on as tasks (see the module docs).
    fn start_handlers(&mut self, session: &mut Session) {
        if self.stopping {
            // Not started: released when the stream closes.
            session.waiting.clear();
            return;
        }
        while self.handlers.len() < self.consumer.config.concurrency && !self.limit_reached() {
            let Some((arrived, delivery)) = session.waiting.pop_front() else { break };
            let (delivery_id, attempt, lease) = (delivery.delivery_id, delivery.attempt, delivery.lease);
            let mut future = (self.handler)(delivery);
            self.stats.handled += 1;
            if self.inline_skip > 0 {
                self.inline_skip -= 1;
            } else if let Some(outcome) = self.poll_inline(&mut future) {
                self.stats.handled_inline += 1;
                self.settle(session, delivery_id, attempt, outcome);
                continue;
            }
            let extend_max = self.consumer.config.extend_max.filter(|_| !lease.is_zero());
            let running = Running {
                epoch: session.epoch,
                delivery_id,
                attempt,
                lease,
                extend_at: extend_max.map(|_| arrived + lease / 3),
                extend_until: arrived + extend_max.unwrap_or_default(),
            };
            if let Some(at) = running.extend_at {
                self.extension_due = Some(self.extension_due.map_or(at, |due| due.min(at)));
            }
            let task = self.handlers.spawn(future);
            self.running.insert(task.id(), running);
        }
    }

    /// Polls a handler's future once on the loop's task: its outcome if it
    /// is done (a panic is an error, as in a task), `None` if it waits. A
    /// waiting future is then spawned, and its task's first poll registers
    /// the task's waker (the no-op one used here is never needed). Slow
    /// polls in a row turn inline polls off for a while.
    fn poll_inline(&mut self, future: &mut HandlerFuture) -> Option<Result<(), String>> {
        let started = std::time::Instant::now();
        let mut context = Context::from_waker(Waker::noop());
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut context)));
        if started.elapsed() <= INLINE_POLL_BUDGET {
            self.slow_polls = 0;
        } else {
            self.slow_polls += 1;
            if self.slow_polls >= INLINE_SLOW_POLLS {
                self.slow_polls = 0;
                self.inline_skip = INLINE_PROBE_INTERVAL;
            }
        }
        match polled {
            Ok(Poll::Ready(outcome)) => Some(outcome),
            Ok(Poll::Pending) => None,
            Err(payload) => Some(Err(panic_text(payload.as_ref()))),
        }
    }

    /// Records a finished handler: its result goes to the session it
    /// belongs to, or is dropped if that session is gone.
    fn finished(
        &mut self,
        joined: Result<(tokio::task::Id, Result<(), String>), tokio::task::JoinError>,
        session: Option<&mut Session>,
    ) {
        let (id, outcome) = match joined {
            Ok((id, outcome)) => (id, outcome),
            Err(error) => (error.id(), Err(panic_reason(error))),
        };
        let running = self.running.remove(&id).expect("every handler task is registered when spawned");
        let Some(session) = session.filter(|session| session.epoch == running.epoch) else {
            self.stats.abandoned += 1;
            return;
        };
        self.settle(session, running.delivery_id, running.attempt, outcome);
    }

    /// Queues a handler's result on its session: an ack, or a nack with the
    /// policy's delay for its attempt; the first result unsent arms the
    /// flush timer.
    fn settle(&mut self, session: &mut Session, delivery_id: u64, attempt: u32, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => session.acks.push(delivery_id),
            Err(reason) => session.nacks.push(proto::Nack {
                delivery_id,
                delay_ms: u64::try_from(self.consumer.config.nack_delay.delay(attempt).as_millis()).unwrap_or(u64::MAX),
                reason: truncate(reason, NACK_REASON_SIZE_MAX),
            }),
        }
        if session.flush_at.is_none() {
            session.flush_at = Some(Instant::now() + self.consumer.config.ack_flush_interval);
        }
    }

    /// When the next lease of this session's running handlers is due for
    /// extension.
    fn next_extension(&self, epoch: u64) -> Option<Instant> {
        self.running.values().filter(|running| running.epoch == epoch).filter_map(|running| running.extend_at).min()
    }

    /// Queues an extend of every lease due (rule 7): each by its own
    /// length, the next one a third of it later; a handler past
    /// `extend_max` is given up on.
    fn extend(&mut self, session: &mut Session) {
        let now = Instant::now();
        let mut due: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for running in self.running.values_mut().filter(|running| running.epoch == session.epoch) {
            if running.extend_at.is_none_or(|at| at > now) {
                continue;
            }
            if now >= running.extend_until {
                running.extend_at = None;
                self.stats.extend_gave_up += 1;
                tracing::warn!(
                    queue = %self.consumer.queue,
                    delivery_id = running.delivery_id,
                    "handler ran past extend_max; its lease is left to expire and the message will be redelivered"
                );
                continue;
            }
            running.extend_at = Some(now + running.lease / 3);
            let lease_ms = u64::try_from(running.lease.as_millis()).unwrap_or(u64::MAX);
            due.entry(lease_ms).or_default().push(running.delivery_id);
        }
        for (lease_ms, delivery_ids) in due {
            for chunk in delivery_ids.chunks(contract::CREDIT_MAX as usize) {
                let extend = proto::Extend { delivery_ids: chunk.to_vec(), lease_ms };
                session.outbox.push_back(proto::ConsumeRequest { kind: Some(RequestKind::Extend(extend)) });
            }
        }
        self.extension_due = self.next_extension(session.epoch);
    }

    /// Queues the unsent acks and nacks, then the credit they free (rule 1).
    fn flush(&mut self, session: &mut Session) {
        session.flush_at = None;
        let done = u32::try_from(session.acks.len() + session.nacks.len()).expect("results are bounded by the window");
        if done == 0 {
            return;
        }
        assert!(done <= session.held, "{done} results for {} held deliveries", session.held);
        if !session.acks.is_empty() {
            self.stats.acked += session.acks.len() as u64;
            let delivery_ids = std::mem::take(&mut session.acks);
            session
                .outbox
                .push_back(proto::ConsumeRequest { kind: Some(RequestKind::Ack(proto::Ack { delivery_ids })) });
        }
        for nack in session.nacks.drain(..) {
            self.stats.nacked += 1;
            session.outbox.push_back(proto::ConsumeRequest { kind: Some(RequestKind::Nack(nack)) });
        }
        session.held -= done;
        let grant = if self.stopping { 0 } else { self.credit_to_grant(session, done) };
        if grant > 0 {
            session.credit += grant;
            session
                .outbox
                .push_back(proto::ConsumeRequest { kind: Some(RequestKind::Credit(proto::Credit { credit: grant })) });
        }
        self.check_window(session);
    }

    /// Closes a session on stop: sends what is queued, half-closes the
    /// stream and waits for the broker to end it (rule 6).
    async fn close(&mut self, mut session: Session) -> Result<SessionEnd, Error> {
        let deadline = Instant::now() + self.consumer.config.stop_timeout;
        let drained = tokio::time::timeout_at(deadline, async {
            while let Some(request) = session.outbox.pop_front() {
                if session.outgoing.send(request).await.is_err() {
                    return false;
                }
            }
            true
        })
        .await;
        if drained != Ok(true) {
            tracing::warn!(queue = %self.consumer.queue, "could not send the last acks before stopping; those messages will be redelivered");
        }
        drop(session.outgoing);
        let ended = tokio::time::timeout_at(deadline, async {
            // Deliveries still arriving are released by the close.
            loop {
                match session.incoming.message().await {
                    Ok(Some(response)) => {
                        if let Some(ResponseKind::Rejected(_)) = response.kind {
                            self.stats.rejected += 1;
                        }
                    }
                    Ok(None) | Err(_) => return,
                }
            }
        })
        .await;
        if ended.is_err() {
            tracing::warn!(queue = %self.consumer.queue, "the broker did not end the stream within the stop timeout");
        }
        Ok(SessionEnd::Stopped)
    }

    /// Credit to subscribe with: the window, or less when `max_messages`
    /// needs fewer.
    fn credit_for_subscribe(&self) -> u32 {
        let prefetch = self.consumer.config.prefetch;
        match self.remaining() {
            Some(remaining) => u32::try_from(remaining).unwrap_or(u32::MAX).clamp(1, prefetch),
            None => prefetch,
        }
    }

    /// Credit to grant after `done` results were sent: `done`, but never more
    /// than the handlers still allowed by `max_messages` need.
    fn credit_to_grant(&self, session: &Session, done: u32) -> u32 {
        match self.remaining() {
            None => done,
            Some(remaining) => {
                let coming = u64::from(session.credit) + session.waiting.len() as u64;
                let needed = remaining.saturating_sub(coming);
                done.min(u32::try_from(needed).unwrap_or(u32::MAX))
            }
        }
    }

    /// Handlers still allowed by `max_messages`.
    fn remaining(&self) -> Option<u64> {
        self.consumer.config.max_messages.map(|max| max.saturating_sub(self.stats.handled))
    }

    fn limit_reached(&self) -> bool {
        self.remaining() == Some(0)
    }

    fn check_window(&self, session: &Session) {
        let prefetch = self.consumer.config.prefetch;
        assert!(
            session.credit + session.held <= prefetch,
            "credit {} + held {} exceeds the window {prefetch}",
            session.credit,
            session.held
        );
    }
}

/// Errors that end the consumer instead of a reconnect.
fn is_fatal(error: &Error) -> bool {
    match error {
        Error::NotFound { .. }
        | Error::InvalidArgument { .. }
        | Error::PermissionDenied { .. }
        | Error::Unauthenticated { .. }
        | Error::FailedPrecondition { .. }
        | Error::AlreadyExists { .. }
        | Error::Protocol { .. }
        | Error::InvalidAddress { .. }
        | Error::Tls { .. } => true,
        Error::Broker { code, .. } => *code == tonic::Code::Unimplemented,
        Error::ResourceExhausted { .. }
        | Error::Unavailable { .. }
        | Error::NotLeader { .. }
        | Error::Transport { .. }
        | Error::DeadlineExceeded { .. }
        | Error::Aborted { .. }
        | Error::CircuitOpen { .. }
        | Error::Closed => false,
    }
}

fn panic_reason(error: tokio::task::JoinError) -> String {
    if !error.is_panic() {
        return "handler was cancelled".into();
    }
    panic_text(error.into_panic().as_ref())
}

/// A nack reason for a handler that panicked with `payload`.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".into());
    format!("handler panicked: {text}")
}

fn truncate(mut text: String, size_max: usize) -> String {
    if text.len() > size_max {
        let mut end = size_max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A timer kept across turns of the loop and re-armed only when its
/// deadline changes, so a turn registers no timer of its own.
struct Deadline {
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// When it fires; `None`: disarmed (the loop does not wait on it).
    at: Option<Instant>,
}

impl Deadline {
    fn new() -> Deadline {
        Deadline { sleep: Box::pin(tokio::time::sleep_until(Instant::now())), at: None }
    }

    fn set(&mut self, at: Option<Instant>) {
        if at == self.at {
            return;
        }
        if let Some(at) = at {
            self.sleep.as_mut().reset(at);
        }
        self.at = at;
    }
}

impl fmt::Debug for Loop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loop").field("queue", &self.consumer.queue).field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
