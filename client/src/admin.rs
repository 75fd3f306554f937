//! [`Admin`]: create, inspect and remove queues, and read their saturation
//! figures.
//!
//! Reads (`get_queue`, `list_queues`, `stats`, opening `watch_stats`) and
//! `create_queue` (which succeeds when the queue exists with the same
//! settings) are safe to repeat, so they are retried on retryable failures
//! within the deadline. `delete_queue` and `purge_queue` are sent once: after
//! a lost answer a repeat would report `NOT_FOUND` for a delete that worked,
//! or purge messages published since. An open watch has no deadline: it runs
//! until dropped or ended by the broker.

use std::{sync::Arc, time::Duration};

use crate::client::Transport;
use ballast_proto::v1::{self as proto, admin_client::AdminClient, stats_client::StatsClient};
use tokio::time::Instant;

use crate::{BrokerStats, Error, QueueInfo, QueueSettings, RetryPolicy, StatsWatch, contract, retry::Retrier};

/// Deadlines and retries of admin calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminConfig {
    /// Time allowed for one call, its retries included.
    pub deadline: Duration,
    /// Time allowed for one attempt.
    pub attempt_timeout: Duration,
    /// Retries of the calls that are safe to repeat.
    pub retry: RetryPolicy,
}

impl Default for AdminConfig {
    /// 10 s per call, 5 s per attempt, the default retry policy.
    fn default() -> AdminConfig {
        AdminConfig {
            deadline: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
        }
    }
}

/// What [`Admin::redrive`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Redriven {
    /// Dead letters stored again in the source queue.
    pub moved: u64,
    /// Dead letters an interrupted earlier redrive had already stored
    /// (acked now; nothing stored twice).
    pub already_moved: u64,
    /// Dead letters left because a consumer of the dead-letter queue holds
    /// them.
    pub skipped_leased: u64,
}

/// Creates, inspects and removes queues, and reads their saturation figures.
/// Cheap to clone.
///
/// ```no_run
/// # async fn example() -> Result<(), ballast_client::Error> {
/// use ballast_client::{Client, QueueSettings};
///
/// let admin = Client::connect("http://127.0.0.1:7400").await?.admin();
/// let mut settings = QueueSettings::default();
/// settings.max_attempts = Some(3);
/// let queue = admin.create_queue("payments", settings).await?;
/// println!("{} has lanes {:?}", queue.name, queue.settings.lanes);
/// for queue in admin.list_queues().await? {
///     println!("{}: {} messages, {} in flight", queue.name, queue.depth, queue.in_flight);
/// }
/// let purged = admin.purge_queue("payments").await?;
/// admin.delete_queue("payments").await?;
/// # let _ = purged;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Admin {
    client: AdminClient<Transport>,
    stats: StatsClient<Transport>,
    config: AdminConfig,
    /// Retries for repeatable calls.
    retrier: Arc<Retrier>,
    /// A single attempt for the others, with the same deadline handling.
    once: Arc<Retrier>,
}

impl Admin {
    pub(crate) fn new(channel: Transport, config: AdminConfig) -> Admin {
        Admin {
            // A snapshot of every queue (up to the broker's queue limit) can
            // outgrow tonic's 4 MiB default.
            stats: StatsClient::new(channel.clone()).max_decoding_message_size(contract::GRPC_DECODE_SIZE_MAX),
            client: AdminClient::new(channel),
            retrier: Arc::new(Retrier::new(config.retry, config.attempt_timeout, None)),
            once: Arc::new(Retrier::new(RetryPolicy::NONE, config.deadline, None)),
            config,
        }
    }

    /// Creates queue `name` (and its dead-letter queue) with `settings`,
    /// returning it with every default resolved. Creating a queue that exists
    /// with the same settings succeeds; with other settings it fails with
    /// [`Error::AlreadyExists`].
    pub async fn create_queue(&self, name: &str, settings: QueueSettings) -> Result<QueueInfo, Error> {
        contract::check_queue_name(name)?;
        let request = proto::CreateQueueRequest { name: name.to_owned(), settings: Some(settings.into_proto()) };
        let info = self
            .call(&self.retrier, |mut client| {
                let request = request.clone();
                async move { client.create_queue(request).await }
            })
            .await?;
        Ok(QueueInfo::from_proto(info))
    }

    /// Changes settings of the live queue `name` without a restart and
    /// returns it with the settings now in force. Only the fields set in
    /// `settings` change (limits, lane admission, quotas, lease timeout, max
    /// attempts, default lane, dedupe window); lanes, weights, strict
    /// priority, dead letter, message size and sync policy cannot change on
    /// a live queue: asked for with another value, the update is refused
    /// whole with [`Error::InvalidArgument`] naming the setting. Durable
    /// when it returns. Idempotent, so retried like a read.
    pub async fn update_queue(&self, name: &str, settings: QueueSettings) -> Result<QueueInfo, Error> {
        contract::check_queue_name(name)?;
        let request = proto::UpdateQueueRequest { name: name.to_owned(), settings: Some(settings.into_proto()) };
        let info = self
            .call(&self.retrier, |mut client| {
                let request = request.clone();
                async move { client.update_queue(request).await }
            })
            .await?;
        Ok(QueueInfo::from_proto(info))
    }

    /// Moves dead letters of `<name>.dead` back into `name`: at most
    /// `max_messages` (`None`: all), only those with exactly `reason` when
    /// given. Each moves exactly once even if a redrive is interrupted and
    /// repeated within the queue's dedupe window, so it is retried like a
    /// read. A refusal of the queue's admission ends the call with that
    /// error; what moved before it stays moved.
    pub async fn redrive(
        &self,
        name: &str,
        max_messages: Option<u64>,
        reason: Option<&str>,
    ) -> Result<Redriven, Error> {
        contract::check_queue_name(name)?;
        let request = proto::RedriveRequest {
            name: name.to_owned(),
            max_messages: max_messages.unwrap_or(0),
            reason: reason.unwrap_or_default().to_owned(),
        };
        let done = self
            .call(&self.retrier, |mut client| {
                let request = request.clone();
                async move { client.redrive(request).await }
            })
            .await?;
        Ok(Redriven { moved: done.moved, already_moved: done.already_moved, skipped_leased: done.skipped_leased })
    }

    /// Queue `name`'s settings and counts; [`Error::NotFound`] if unknown.
    pub async fn get_queue(&self, name: &str) -> Result<QueueInfo, Error> {
        contract::check_queue_name(name)?;
        let request = proto::GetQueueRequest { name: name.to_owned() };
        let info = self
            .call(&self.retrier, |mut client| {
                let request = request.clone();
                async move { client.get_queue(request).await }
            })
            .await?;
        Ok(QueueInfo::from_proto(info))
    }

    /// Every queue, dead-letter queues included, sorted by name.
    pub async fn list_queues(&self) -> Result<Vec<QueueInfo>, Error> {
        let response = self
            .call(&self.retrier, |mut client| async move { client.list_queues(proto::ListQueuesRequest {}).await })
            .await?;
        Ok(response.queues.into_iter().map(QueueInfo::from_proto).collect())
    }

    /// Deletes queue `name` and its files (not its dead-letter queue). Its
    /// consumers' streams end with `NOT_FOUND`. Sent once (see module docs).
    pub async fn delete_queue(&self, name: &str) -> Result<(), Error> {
        contract::check_queue_name(name)?;
        let request = proto::DeleteQueueRequest { name: name.to_owned() };
        self.call(&self.once, |mut client| {
            let request = request.clone();
            async move { client.delete_queue(request).await }
        })
        .await?;
        Ok(())
    }

    /// Marks every message of queue `name` done, returning how many. Leased
    /// deliveries can no longer be acked. Sent once (see module docs).
    pub async fn purge_queue(&self, name: &str) -> Result<u64, Error> {
        contract::check_queue_name(name)?;
        let request = proto::PurgeQueueRequest { name: name.to_owned() };
        let response = self
            .call(&self.once, |mut client| {
                let request = request.clone();
                async move { client.purge_queue(request).await }
            })
            .await?;
        Ok(response.purged)
    }

    /// Saturation figures of queue `queue`, or of every queue (dead-letter
    /// queues included) with `None`, and the broker's free disk space.
    /// [`Error::NotFound`] for an unknown queue.
    ///
    /// ```no_run
    /// # async fn example(admin: ballast_client::Admin) -> Result<(), ballast_client::Error> {
    /// let stats = admin.stats(Some("payments")).await?;
    /// let payments = &stats.queues[0];
    /// for lane in &payments.lanes {
    ///     println!(
    ///         "{}: {} messages, {:.0}% of the queue's limits (admitted up to {:.0}%), oldest {:?}",
    ///         lane.name,
    ///         lane.saturation.depth,
    ///         lane.saturation.saturation * 100.0,
    ///         lane.admission * 100.0,
    ///         lane.saturation.oldest_age,
    ///     );
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn stats(&self, queue: Option<&str>) -> Result<BrokerStats, Error> {
        let request = proto::StatsRequest { queue: queue_filter(queue)? };
        let response = self
            .call_stats(|mut client| {
                let request = request.clone();
                async move { client.get_stats(request).await }
            })
            .await?;
        BrokerStats::from_proto(response)
    }

    /// Streams the figures of `queue` (every queue with `None`): one
    /// snapshot at once, then one every `interval`, which must be within
    /// [`contract::WATCH_INTERVAL_MIN`]`..=`[`contract::WATCH_INTERVAL_MAX`]
    /// (millisecond precision). Opening the stream is retried within the
    /// deadline; see [`StatsWatch`] for how it ends.
    ///
    /// ```no_run
    /// # async fn example(admin: ballast_client::Admin) -> Result<(), ballast_client::Error> {
    /// use std::time::Duration;
    /// use tokio_stream::StreamExt;
    ///
    /// let watch = admin.watch_stats(None, Duration::from_millis(500)).await?;
    /// let mut first_three = watch.take(3);
    /// while let Some(stats) = first_three.next().await {
    ///     let stats = stats?;
    ///     println!("{} queues, {} bytes free on disk", stats.queues.len(), stats.disk_free_bytes);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn watch_stats(&self, queue: Option<&str>, interval: Duration) -> Result<StatsWatch, Error> {
        let queue = queue_filter(queue)?;
        if !(contract::WATCH_INTERVAL_MIN..=contract::WATCH_INTERVAL_MAX).contains(&interval) {
            return Err(Error::InvalidArgument {
                message: format!(
                    "stats watch interval must be in {}..={} ms; got {} ms",
                    contract::WATCH_INTERVAL_MIN.as_millis(),
                    contract::WATCH_INTERVAL_MAX.as_millis(),
                    interval.as_millis()
                ),
            });
        }
        let interval_ms = u64::try_from(interval.as_millis()).expect("checked against WATCH_INTERVAL_MAX");
        let request = proto::WatchRequest { queue, interval_ms };
        let stream = self
            .call_stats(|mut client| {
                let request = request.clone();
                async move { client.watch(request).await }
            })
            .await?;
        Ok(StatsWatch::new(stream))
    }

    async fn call<T, F, Fut>(&self, retrier: &Retrier, rpc: F) -> Result<T, Error>
    where
        F: FnMut(AdminClient<Transport>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_on(retrier, &self.client, rpc).await
    }

    /// Like `call`, on the Stats service; always retried (reads only).
    async fn call_stats<T, F, Fut>(&self, rpc: F) -> Result<T, Error>
    where
        F: FnMut(StatsClient<Transport>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_on(&self.retrier, &self.stats, rpc).await
    }

    /// Runs `rpc` on a clone of `client` under `retrier`, within the
    /// configured deadline.
    async fn call_on<C, T, F, Fut>(&self, retrier: &Retrier, client: &C, mut rpc: F) -> Result<T, Error>
    where
        C: Clone,
        F: FnMut(C) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.config.deadline;
        retrier
            .run(deadline, self.config.deadline, None, || {
                let response = rpc(client.clone());
                async move { response.await.map(tonic::Response::into_inner).map_err(Error::from_status) }
            })
            .await
    }
}

/// The wire form of an optional queue name: empty means every queue.
fn queue_filter(queue: Option<&str>) -> Result<String, Error> {
    match queue {
        Some(name) => {
            contract::check_queue_name(name)?;
            Ok(name.to_owned())
        }
        None => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeServer;

    /// Queue calls convert to and from the wire, and broker codes surface as
    /// typed errors.
    #[tokio::test]
    async fn queue_lifecycle() {
        let server = FakeServer::start().await;
        let admin = server.client().admin();
        let info = admin.create_queue("payments", QueueSettings::default()).await.expect("created");
        assert_eq!(info.name, "payments");
        assert_eq!(info.dead_letter_queue.as_deref(), Some("payments.dead"));
        assert_eq!(info.settings.lanes, ["high", "normal", "low"]);
        assert_eq!(info.settings.lease_timeout, Some(Duration::from_secs(30)));
        assert_eq!(info.settings.sync_policy, Some(crate::SyncPolicy::Fsync));
        assert_eq!(info.depth, 2);

        let error = admin.create_queue("payments", QueueSettings::default()).await.expect_err("exists");
        assert!(matches!(error, Error::AlreadyExists { .. }), "{error:?}");
        assert_eq!(admin.get_queue("payments").await.expect("exists").name, "payments");
        admin.create_queue("emails", QueueSettings::default()).await.expect("created");
        let names: Vec<String> = admin.list_queues().await.expect("listed").into_iter().map(|q| q.name).collect();
        assert_eq!(names, ["emails", "payments"]);
        assert_eq!(admin.purge_queue("payments").await.expect("purged"), 0);
        admin.delete_queue("payments").await.expect("deleted");
        let error = admin.get_queue("payments").await.expect_err("gone");
        assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
        let error = admin.delete_queue("Payments").await.expect_err("bad name");
        assert!(matches!(error, Error::InvalidArgument { .. }), "{error:?}");
    }

    /// Stats convert from the wire, for one queue or all; a bad name or
    /// interval is refused before any call, an unknown queue by the broker.
    #[tokio::test]
    async fn stats_snapshot() {
        let server = FakeServer::start().await;
        server.state.add_queue("emails", 0);
        server.state.add_queue("payments", 0);
        let admin = server.client().admin();
        let all = admin.stats(None).await.expect("stats");
        let names: Vec<&str> = all.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["emails", "payments"]);
        assert_eq!(all.disk_free_bytes, 1 << 40);
        let one = admin.stats(Some("emails")).await.expect("stats");
        let emails = one.queue("emails").expect("asked for");
        assert_eq!(emails.lanes.iter().map(|l| l.admission).collect::<Vec<_>>(), [1.0, 0.9, 0.7]);
        assert_eq!(emails.max_messages, crate::fake::FAKE_MAX_MESSAGES);

        let error = admin.stats(Some("nope")).await.expect_err("unknown");
        assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
        let error = admin.stats(Some("Bad Name")).await.expect_err("bad name");
        assert!(matches!(error, Error::InvalidArgument { .. }), "{error:?}");
        for interval in [Duration::from_millis(99), Duration::from_millis(60_001)] {
            let error = admin.watch_stats(None, interval).await.expect_err("out of range");
            assert!(matches!(&error, Error::InvalidArgument { message } if message.contains("100..=60000")), "{error}");
        }
        assert!(server.state.lock().watches.is_empty(), "refused locally");
    }

    /// A watch yields a snapshot at once and then one per interval; when the
    /// broker ends it with an error, the error is yielded once and then the
    /// stream is over.
    #[tokio::test]
    async fn watch_yields_snapshots_then_ends_after_an_error() {
        let server = FakeServer::start().await;
        server.state.add_queue("emails", 0);
        server.state.lock().watch_snapshots = Some(3);
        let admin = server.client().admin();
        let interval = Duration::from_millis(100);
        let mut watch = admin.watch_stats(Some("emails"), interval).await.expect("opened");
        let start = Instant::now();
        let mut at = Vec::new();
        for _ in 0..3 {
            let stats = watch.next().await.expect("a snapshot").expect("no error");
            assert_eq!(stats.queues.len(), 1);
            at.push(Instant::now() - start);
        }
        assert!(at[0] < interval, "the first snapshot comes with the stream: {at:?}");
        assert!(at[2] >= interval * 2, "then one per interval: {at:?}");
        let error = watch.next().await.expect("the error").expect_err("ended by the broker");
        assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
        assert!(watch.next().await.is_none(), "over after the error");
        assert!(watch.next().await.is_none(), "and stays over");
        assert_eq!(server.state.lock().watches, [100]);
    }

    /// Watching a queue that does not exist fails when opening.
    #[tokio::test]
    async fn watch_of_unknown_queue_fails() {
        let server = FakeServer::start().await;
        let error =
            server.client().admin().watch_stats(Some("nope"), Duration::from_secs(1)).await.expect_err("unknown");
        assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
    }
}
