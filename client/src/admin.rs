//! [`Admin`]: create, inspect and remove queues.
//!
//! Reads (`get_queue`, `list_queues`) and `create_queue` (which succeeds when
//! the queue exists with the same settings) are safe to repeat, so they are
//! retried on retryable failures within the deadline. `delete_queue` and
//! `purge_queue` are sent once: after a lost answer a repeat would report
//! `NOT_FOUND` for a delete that worked, or purge messages published since.
//!
//! Queue statistics (a unary and a streaming Stats RPC) are not in the
//! protocol yet (issue 4); `Admin` gains `stats` and `watch_stats` when they
//! are.

use std::{sync::Arc, time::Duration};

use ballast_proto::v1::{self as proto, admin_client::AdminClient};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::{Error, QueueInfo, QueueSettings, RetryPolicy, contract, retry::Retrier};

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

/// Creates, inspects and removes queues. Cheap to clone.
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
    client: AdminClient<Channel>,
    config: AdminConfig,
    /// Retries for repeatable calls.
    retrier: Arc<Retrier>,
    /// A single attempt for the others, with the same deadline handling.
    once: Arc<Retrier>,
}

impl Admin {
    pub(crate) fn new(channel: Channel, config: AdminConfig) -> Admin {
        Admin {
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

    async fn call<T, F, Fut>(&self, retrier: &Retrier, mut rpc: F) -> Result<T, Error>
    where
        F: FnMut(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.config.deadline;
        retrier
            .run(deadline, self.config.deadline, None, || {
                let response = rpc(self.client.clone());
                async move { response.await.map(tonic::Response::into_inner).map_err(Error::from_status) }
            })
            .await
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
}
