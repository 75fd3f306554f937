//! The `ballast.v1` services: Admin, Publisher and Consumer.

use std::{sync::Arc, time::Duration};

use ballast_proto::v1::{self as pb, admin_server, consumer_server, publisher_server, stats_server};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::{auth::Caller, convert, peer::Peer, status::to_status, transport::inbound_error};
use crate::{
    Broker,
    auth::{AUDIT_TARGET, Action, Principal, Revocation},
    broker::{DamagedQueue, OpeningQueue},
    error::BrokerError,
    limits::{
        CREDIT_MAX, PEEK_MESSAGES_MAX, PUBLISH_STREAM_IN_FLIGHT_BYTES_MAX, PUBLISH_STREAM_IN_FLIGHT_MAX,
        PULL_ANSWER_MARGIN_MS, PULL_RESPONSE_SIZE_MAX, PULL_WAIT_MS_MAX, QUEUES_RESPONSE_SIZE_MAX,
        STREAM_NACKS_IN_FLIGHT_MAX, WATCH_INTERVAL_MS_DEFAULT, WATCH_INTERVAL_MS_MAX, WATCH_INTERVAL_MS_MIN,
    },
    now_ms,
    queue::{Holder, Queue, check_ids},
};

/// Implements every `ballast.v1` service on one [`Broker`].
#[derive(Debug, Clone)]
pub struct Service {
    pub(super) broker: Arc<Broker>,
    /// A permit per open Stats Watch stream (`grpc.watch_streams_max`).
    watches: Arc<tokio::sync::Semaphore>,
    /// Whether an auth file is set: then every call must carry the
    /// [`Caller`] that the auth layer found.
    auth_on: bool,
}

/// What one call may do: everything (no auth file) or what its principal
/// may; and where it came from, for the audit log.
#[derive(Debug, Clone)]
pub(super) struct Access {
    principal: Option<Arc<Principal>>,
    peer: Option<std::net::SocketAddr>,
}

impl Access {
    fn allows(&self, action: Action, queue: &str) -> bool {
        self.principal.as_ref().is_none_or(|p| p.allows(action, queue))
    }

    fn principal_name(&self) -> &str {
        self.principal.as_ref().map_or("-", |p| p.name.as_str())
    }

    /// PERMISSION_DENIED naming the action and the queue unless allowed.
    /// Called before the queue is looked up, so the answer is the same
    /// whether the queue exists or not.
    pub(super) fn check(&self, action: Action, queue: &str) -> Result<(), Status> {
        if self.allows(action, queue) {
            return Ok(());
        }
        self.audit(action.name(), queue, "denied");
        crate::metrics::count_error(Code::PermissionDenied);
        Err(Status::permission_denied(format!(
            "principal {:?} lacks the {:?} permission on queue {queue:?}",
            self.principal_name(),
            action.name()
        )))
    }

    /// One audit line: who did what to which queue, and how it ended.
    fn audit(&self, action: &str, queue: &str, outcome: &str) {
        let peer = self.peer.map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        tracing::info!(target: AUDIT_TARGET, principal = self.principal_name(), %peer, queue, action, outcome, "audit");
    }

    /// Resolves once a reload of the auth file revoked this call's
    /// principal, with the status that ends its stream: UNAUTHENTICATED when
    /// its credentials are gone, ABORTED (open the stream again, which is
    /// checked anew) when its rules changed. Never without an auth file.
    pub(super) async fn revoked(&self) -> Status {
        let Some(principal) = &self.principal else { return std::future::pending().await };
        let status = match principal.revoked().await {
            Revocation::Removed => Status::unauthenticated("the auth file no longer holds this stream's credentials"),
            Revocation::Changed => {
                Status::aborted("the auth file changed this stream's principal; open the stream again")
            }
        };
        self.audit("stream", "-", "revoked");
        crate::metrics::count_error(status.code());
        status
    }

    /// Audits an admin action's result and passes it on.
    fn audited<T>(&self, action: &str, queue: &str, result: Result<T, Status>) -> Result<T, Status> {
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(status) => format!("{:?}", status.code()),
        };
        self.audit(action, queue, &outcome);
        result
    }
}

impl Service {
    pub fn new(broker: Arc<Broker>) -> Service {
        let watches = Arc::new(tokio::sync::Semaphore::new(broker.config().grpc.watch_streams_max));
        let auth_on = broker.config().auth_configured();
        Service { broker, watches, auth_on }
    }

    /// What the call of `request` may do. With an auth file, a request
    /// without a [`Caller`] (never the case behind the auth layer) is
    /// UNAUTHENTICATED rather than open.
    pub(super) fn access<T>(&self, request: &Request<T>) -> Result<Access, Status> {
        let peer = request.extensions().get::<Peer>().and_then(|p| p.addr);
        let principal = request.extensions().get::<Caller>().map(|c| Arc::clone(&c.0));
        if self.auth_on && principal.is_none() {
            return Err(Status::unauthenticated("no credentials were checked for this call"));
        }
        Ok(Access { principal: principal.filter(|_| self.auth_on), peer })
    }

    /// The queue named `name`, opened first if the broker has not opened
    /// it yet.
    async fn queue(&self, name: &str) -> Result<Arc<Queue>, Status> {
        self.broker.queue(name).await.map_err(to_status)
    }

    /// The queue, for a call that changes it or delivers from it: a
    /// replicated queue is served by the cluster's leader only; anywhere
    /// else the call is UNAVAILABLE with `ballast-leader`.
    /// On a follower, a queue it does not know is asked of the leader too:
    /// it may be a replicated queue this node has not applied yet.
    async fn leader_queue(&self, name: &str) -> Result<Arc<Queue>, Status> {
        let queue = match (self.broker.queue(name).await, self.broker.node().cluster()) {
            (Ok(queue), _) => queue,
            (Err(BrokerError::QueueNotFound(_)), Some(cluster)) => {
                // A follower sends the caller to the leader; a new leader
                // first applies what it inherited (the queue's creation
                // may be among it), then looks again.
                cluster.leader_term(name).await.map_err(to_status)?;
                self.broker.queue(name).await.map_err(to_status)?
            }
            (Err(error), _) => return Err(to_status(error)),
        };
        if let Some(cluster) = queue.replicated() {
            cluster.leader_term(name).await.map_err(to_status)?;
        }
        Ok(queue)
    }
}

#[tonic::async_trait]
impl admin_server::Admin for Service {
    async fn create_queue(&self, request: Request<pb::CreateQueueRequest>) -> Result<Response<pb::QueueInfo>, Status> {
        let access = self.access(&request)?;
        let request = request.into_inner();
        access.check(Action::Admin, &request.name)?;
        let created = async {
            let settings = convert::settings_request(request.settings).map_err(to_status)?;
            self.broker.create(&request.name, &settings).await.map_err(to_status)
        };
        let queue = access.audited("create", &request.name, created.await)?;
        Ok(Response::new(convert::queue_info(&queue)))
    }

    async fn update_queue(&self, request: Request<pb::UpdateQueueRequest>) -> Result<Response<pb::QueueInfo>, Status> {
        let access = self.access(&request)?;
        let request = request.into_inner();
        access.check(Action::Admin, &request.name)?;
        let updated = async {
            let queue = self.leader_queue(&request.name).await?;
            let changes = convert::settings_request(request.settings).map_err(to_status)?;
            if let Some(cluster) = queue.replicated().cloned() {
                // Every replica takes the same settings from the cluster log.
                let current = queue.settings();
                let updated = current.updated(&changes).map_err(to_status)?;
                let changed = current.changed_keys(&updated);
                if !changed.is_empty() {
                    let settings_toml = toml::to_string(&updated)
                        .map_err(|e| Status::internal(format!("queue settings as TOML: {e}")))?;
                    let command = crate::cluster::Command::UpdateQueue { name: queue.name.to_string(), settings_toml };
                    cluster.propose(queue.name.as_str(), command).await.map_err(to_status)?;
                }
                return Ok((queue, changed));
            }
            // Off the runtime: the update syncs `queue.toml` and its directory.
            let updating = Arc::clone(&queue);
            let changed = tokio::task::spawn_blocking(move || updating.update_settings(&changes))
                .await
                .map_err(|e| Status::internal(format!("the settings update did not finish: {e}")))?
                .map_err(to_status)?;
            Ok((queue, changed))
        };
        let (queue, changed) = access.audited("update", &request.name, updated.await)?;
        if !changed.is_empty() {
            let changed = changed.join(",");
            tracing::info!(target: AUDIT_TARGET, principal = access.principal_name(), queue = %queue.name, %changed, "settings updated");
        }
        Ok(Response::new(convert::queue_info(&queue)))
    }

    async fn redrive(&self, request: Request<pb::RedriveRequest>) -> Result<Response<pb::RedriveResponse>, Status> {
        let access = self.access(&request)?;
        let request = request.into_inner();
        access.check(Action::Admin, &request.name)?;
        let redriven = async {
            let queue = self.leader_queue(&request.name).await?;
            let max_messages = Some(request.max_messages).filter(|&max| max > 0);
            let reason = Some(request.reason.as_str()).filter(|r| !r.is_empty());
            queue.redrive(max_messages, reason).await.map_err(to_status)
        };
        let done = access.audited("redrive", &request.name, redriven.await)?;
        tracing::info!(target: AUDIT_TARGET, principal = access.principal_name(), queue = %request.name,
            moved = done.moved, already_moved = done.already_moved, skipped_leased = done.skipped_leased, "redriven");
        Ok(Response::new(pb::RedriveResponse {
            moved: done.moved,
            already_moved: done.already_moved,
            skipped_leased: done.skipped_leased,
        }))
    }

    async fn get_queue(&self, request: Request<pb::GetQueueRequest>) -> Result<Response<pb::QueueInfo>, Status> {
        let access = self.access(&request)?;
        let name = request.into_inner().name;
        access.check(Action::Admin, &name)?;
        let queue = self.queue(&name).await?;
        Ok(Response::new(convert::queue_info(&queue)))
    }

    async fn list_queues(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let access = self.access(&request)?;
        if self.broker.is_shutting_down() {
            return Err(to_status(BrokerError::ShuttingDown));
        }
        let permitted = |name: &str| access.allows(Action::Admin, name);
        let queues = every_queue(
            &self.broker,
            permitted,
            convert::queue_info,
            convert::opening_info,
            convert::damaged_info,
            "ListQueues",
        );
        Ok(Response::new(pb::ListQueuesResponse { queues }))
    }

    async fn delete_queue(
        &self,
        request: Request<pb::DeleteQueueRequest>,
    ) -> Result<Response<pb::DeleteQueueResponse>, Status> {
        let access = self.access(&request)?;
        let name = request.into_inner().name;
        access.check(Action::Admin, &name)?;
        access.audited("delete", &name, self.broker.delete(&name).await.map_err(to_status))?;
        Ok(Response::new(pb::DeleteQueueResponse {}))
    }

    async fn purge_queue(
        &self,
        request: Request<pb::PurgeQueueRequest>,
    ) -> Result<Response<pb::PurgeQueueResponse>, Status> {
        let access = self.access(&request)?;
        let name = request.into_inner().name;
        access.check(Action::Admin, &name)?;
        let purged = access.audited(
            "purge",
            &name,
            self.leader_queue(&name).await.and_then(|q| q.purge().map_err(to_status)),
        )?;
        Ok(Response::new(pb::PurgeQueueResponse { purged }))
    }
}

#[tonic::async_trait]
impl publisher_server::Publisher for Service {
    type PublishStreamStream = ReceiverStream<Result<pb::PublishStreamResponse, Status>>;

    async fn publish(&self, request: Request<pb::PublishRequest>) -> Result<Response<pb::PublishResponse>, Status> {
        let access = self.access(&request)?;
        let request = request.into_inner();
        let Some(message) = request.message else {
            // Checked and looked up first, as any publish: the answer is the
            // same whether the queue exists or not only for those who may
            // not publish to it.
            access.check(Action::Publish, &request.queue)?;
            self.queue(&request.queue).await?;
            return Err(to_status(BrokerError::InvalidArgument("the request has no message".into())));
        };
        let messages = vec![message];
        let receipt = self.publish_messages(&access, &request.queue, messages).await?.into_iter().next();
        Ok(Response::new(pb::PublishResponse { receipt }))
    }

    async fn publish_batch(
        &self,
        request: Request<pb::PublishBatchRequest>,
    ) -> Result<Response<pb::PublishBatchResponse>, Status> {
        let access = self.access(&request)?;
        let request = request.into_inner();
        let receipts = self.publish_messages(&access, &request.queue, request.messages).await?;
        Ok(Response::new(pb::PublishBatchResponse { receipts }))
    }

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let access = self.access(&request)?;
        let inbound = request.into_inner();
        let (out, rx) = mpsc::channel(PUBLISH_STREAM_IN_FLIGHT_MAX);
        tokio::spawn(publish_session(self.clone(), access, inbound, out));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl Service {
    /// One publish call's messages to `queue`, checked, converted and
    /// published; the receipts in message order. Publish, PublishBatch and
    /// each PublishStream request come here.
    async fn publish_messages(
        &self,
        access: &Access,
        queue: &str,
        messages: Vec<pb::Message>,
    ) -> Result<Vec<pb::Receipt>, Status> {
        access.check(Action::Publish, queue)?;
        let queue = self.leader_queue(queue).await?;
        // No message at all is refused by Queue::publish.
        let messages = messages.into_iter().map(|m| convert::publish(Some(m))).collect::<Result<Vec<_>, _>>();
        let receipts = queue.publish(messages.map_err(to_status)?).await.map_err(to_status)?;
        Ok(convert::receipts(&queue, receipts))
    }
}

/// Serves one PublishStream: reads requests while fewer than
/// [`PUBLISH_STREAM_IN_FLIGHT_MAX`] requests (and
/// [`PUBLISH_STREAM_IN_FLIGHT_BYTES_MAX`] bytes of them) are unanswered,
/// publishes each as PublishBatch would, concurrently, and answers each as
/// it completes. A request's failure is its own response; the stream ends
/// when the client closes its side and every answer is sent, or with an
/// error status for an undecodable request, a revoked credential or a
/// shutdown.
async fn publish_session(
    service: Service,
    access: Access,
    mut inbound: Streaming<pb::PublishStreamRequest>,
    out: mpsc::Sender<Result<pb::PublishStreamResponse, Status>>,
) {
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    let mut in_flight_bytes = 0usize;
    let mut closed = false;
    let revoked = access.revoked();
    let stopping = service.broker.stopping();
    tokio::pin!(revoked, stopping);
    loop {
        if closed && in_flight.is_empty() {
            break;
        }
        let room =
            in_flight.len() < PUBLISH_STREAM_IN_FLIGHT_MAX && in_flight_bytes < PUBLISH_STREAM_IN_FLIGHT_BYTES_MAX;
        tokio::select! {
            status = &mut revoked => {
                let _ = out.send(Err(status)).await;
                break;
            }
            () = &mut stopping => {
                let _ = out.send(Err(to_status(BrokerError::ShuttingDown))).await;
                break;
            }
            Some((response, size, redirect)) = futures_util::StreamExt::next(&mut in_flight), if !in_flight.is_empty() => {
                in_flight_bytes -= size;
                if let Some(status) = redirect {
                    // This node does not lead the cluster: the stream ends
                    // with the status naming the leader (in its trailers),
                    // so the client reopens it there; the requests in
                    // flight end with it and are retried.
                    let _ = out.send(Err(status)).await;
                    break;
                }
                if out.send(Ok(response)).await.is_err() {
                    // The client is gone. Requests still in flight are
                    // dropped here; what reached storage completes in the
                    // queue's own task (see Queue::publish).
                    break;
                }
            }
            request = inbound.message(), if room && !closed => match request {
                Ok(Some(request)) => {
                    let size = request.messages.iter().map(|m| m.payload.len()).sum::<usize>();
                    in_flight_bytes += size;
                    let (service, access) = (service.clone(), access.clone());
                    in_flight.push(async move {
                        let pb::PublishStreamRequest { sequence, queue, messages } = request;
                        let mut redirect = None;
                        let response = match service.publish_messages(&access, &queue, messages).await {
                            Ok(receipts) => pb::PublishStreamResponse { sequence, receipts, error: None },
                            Err(status) => {
                                crate::metrics::count_error(status.code());
                                let error = convert::publish_error(&status);
                                if status.metadata().contains_key(super::status::LEADER) {
                                    redirect = Some(status);
                                }
                                pb::PublishStreamResponse { sequence, receipts: Vec::new(), error: Some(error) }
                            }
                        };
                        (response, size, redirect)
                    });
                }
                Ok(None) => closed = true,
                Err(status) => {
                    // A request the broker cannot decode gets its status;
                    // otherwise the client is gone and nobody reads it.
                    let _ = out.send(Err(inbound_error(status))).await;
                    break;
                }
            },
        }
    }
}

impl Service {
    /// One queue's figures, or every permitted queue's (`queue` empty).
    pub(super) async fn stats(&self, access: &Access, queue: &str) -> Result<pb::StatsResponse, Status> {
        let queues = if queue.is_empty() {
            if self.broker.is_shutting_down() {
                return Err(to_status(BrokerError::ShuttingDown));
            }
            let permitted = |name: &str| access.allows(Action::Stats, name);
            every_queue(
                &self.broker,
                permitted,
                convert::queue_stats,
                convert::opening_stats,
                convert::damaged_stats,
                "Stats",
            )
        } else {
            access.check(Action::Stats, queue)?;
            vec![convert::queue_stats(&*self.queue(queue).await?)]
        };
        Ok(pb::StatsResponse {
            at_ms: now_ms(),
            queues,
            disk_free_bytes: self.broker.node().disk_free(),
            disk_free_min_bytes: self.broker.node().disk_free_min(),
            cluster: self.broker.node().cluster().map(|c| convert::cluster_status(&c.status())),
        })
    }

    /// GetStats for the console's JSON API (`crate::console`): the same
    /// figures, the same `stats` permission check and filter, as JSON.
    /// `principal` is the caller the API authenticated (`None` without an
    /// auth file), `peer` its address for the audit log.
    pub async fn stats_json(
        &self,
        principal: Option<Arc<Principal>>,
        peer: Option<std::net::SocketAddr>,
        queue: &str,
    ) -> Result<serde_json::Value, Status> {
        if self.auth_on && principal.is_none() {
            return Err(Status::unauthenticated("no credentials were checked for this call"));
        }
        let access = Access { principal: principal.filter(|_| self.auth_on), peer };
        Ok(super::json::stats(&self.stats(&access, queue).await?))
    }
}

#[tonic::async_trait]
impl stats_server::Stats for Service {
    async fn get_stats(&self, request: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        let access = self.access(&request)?;
        Ok(Response::new(self.stats(&access, &request.into_inner().queue).await?))
    }

    type WatchStream = ReceiverStream<Result<pb::StatsResponse, Status>>;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let access = self.access(&request)?;
        let request = request.into_inner();
        let interval_ms = if request.interval_ms == 0 { WATCH_INTERVAL_MS_DEFAULT } else { request.interval_ms };
        if !(WATCH_INTERVAL_MS_MIN..=WATCH_INTERVAL_MS_MAX).contains(&interval_ms) {
            return Err(Status::invalid_argument(format!(
                "interval_ms must be in {WATCH_INTERVAL_MS_MIN}..={WATCH_INTERVAL_MS_MAX}; got {interval_ms}"
            )));
        }
        // Held by the stream's task: released when the stream ends.
        let permit = Arc::clone(&self.watches).try_acquire_owned().map_err(|_| {
            to_status(BrokerError::LimitReached {
                what: "Stats Watch streams",
                max: self.broker.config().grpc.watch_streams_max,
                hint: "close other Watch streams, poll GetStats, or raise grpc.watch_streams_max",
            })
        })?;
        let first = self.stats(&access, &request.queue).await?;
        let (tx, rx) = mpsc::channel(4);
        let service = self.clone();
        // The task must end when the broker shuts down: a graceful shutdown
        // waits for every open stream, and the next tick may be a minute
        // away (or the client may have stopped reading).
        let stopping = self.broker.stopping();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::pin!(stopping);
            let revoked = access.revoked();
            tokio::pin!(revoked);
            let mut next = Ok(first);
            let mut ticker = tokio::time::interval(Duration::from_millis(interval_ms));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                let failed = next.is_err();
                tokio::select! {
                    biased;
                    () = &mut stopping => break,
                    sent = tx.send(next) => if sent.is_err() || failed { return },
                }
                tokio::select! {
                    biased;
                    () = &mut stopping => break,
                    status = &mut revoked => {
                        let _ = tx.try_send(Err(status));
                        return;
                    }
                    () = tx.closed() => return,
                    _ = ticker.tick() => {}
                }
                next = service.stats(&access, &request.queue).await;
            }
            // Shutting down: say so if the client has room for it; either
            // way the stream ends when `tx` drops.
            let _ = tx.try_send(Err(to_status(BrokerError::ShuttingDown)));
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Every queue, served, opening and damaged, by name, as `open`, `opening`
/// and `damaged` describe them, up to [`QUEUES_RESPONSE_SIZE_MAX`] encoded bytes: the
/// queues past it (the last by name) are left out and logged, so the answer
/// always fits the encode limit; they can be asked for by name.
fn every_queue<T: prost::Message>(
    broker: &Broker,
    permitted: impl Fn(&str) -> bool,
    open: impl Fn(&Queue) -> T,
    opening: impl Fn(&OpeningQueue) -> T,
    damaged: impl Fn(&DamagedQueue) -> T,
    call: &'static str,
) -> Vec<T> {
    let (queues, not_open) = broker.open_and_opening();
    let set_aside = broker.damaged_queues();
    let mut named: Vec<(&str, T)> = queues
        .iter()
        .filter(|q| permitted(q.name.as_str()))
        .map(|q| (q.name.as_str(), open(q)))
        .chain(not_open.iter().filter(|o| permitted(o.name.as_str())).map(|o| (o.name.as_str(), opening(o))))
        .chain(set_aside.iter().filter(|d| permitted(d.name.as_str())).map(|d| (d.name.as_str(), damaged(d))))
        .collect();
    // Stable: a queue being set aside meanwhile (listed both ways) is
    // shown once, as it was before.
    named.sort_by(|a, b| a.0.cmp(b.0));
    named.dedup_by(|later, earlier| later.0 == earlier.0);
    let (described, left_out) = up_to_size(named.into_iter().map(|(_, item)| item), QUEUES_RESPONSE_SIZE_MAX);
    if left_out > 0 {
        tracing::warn!(
            call,
            left_out,
            limit = QUEUES_RESPONSE_SIZE_MAX,
            "an all-queue answer reached its size limit; the queues past it were left out"
        );
    }
    described
}

/// The first `items` whose encoding as a repeated field (each with its tag
/// byte and length) fits in `size_max` bytes, and how many were left out.
fn up_to_size<T: prost::Message>(items: impl ExactSizeIterator<Item = T>, size_max: usize) -> (Vec<T>, usize) {
    let count = items.len();
    let mut size = 0;
    let mut kept = Vec::with_capacity(count);
    for item in items {
        size += field_len(&item);
        if size > size_max {
            break;
        }
        kept.push(item);
    }
    let left_out = count - kept.len();
    (kept, left_out)
}

/// Bytes `item` takes as an element of a repeated message field: its
/// tag byte, length prefix and body.
fn field_len(item: &impl prost::Message) -> usize {
    let len = item.encoded_len();
    1 + prost::length_delimiter_len(len) + len
}

/// Responses a consume session may have queued towards the client beyond
/// its deliveries (which credit bounds): rejections and the final status.
const SESSION_CHANNEL_EXTRA: usize = 64;

/// Deliveries a consume session forwards in one turn of its loop when
/// they are ready together (a credit refill releases hundreds at once):
/// the client's requests and a revocation are looked at between turns,
/// not between every two deliveries.
const SESSION_DELIVERIES_PER_TURN: usize = 64;

#[tonic::async_trait]
impl consumer_server::Consumer for Service {
    type ConsumeStream = ReceiverStream<Result<pb::ConsumeResponse, Status>>;

    async fn consume(
        &self,
        request: Request<Streaming<pb::ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let access = self.access(&request)?;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await
            .map_err(inbound_error)?
            .ok_or_else(|| Status::invalid_argument("the stream ended before subscribe"))?;
        let Some(pb::consume_request::Kind::Subscribe(subscribe)) = first.kind else {
            return Err(Status::invalid_argument("the first request of a consume stream must be subscribe"));
        };
        access.check(Action::Consume, &subscribe.queue)?;
        let queue = self.leader_queue(&subscribe.queue).await?;
        let subscription = queue.subscribe(subscribe.credit).map_err(to_status)?;
        let (out, rx) = mpsc::channel(CREDIT_MAX as usize + SESSION_CHANNEL_EXTRA);
        let subscribed = pb::Subscribed { queue: queue.name.to_string(), consumer_id: subscription.consumer_id };
        let _ = out.try_send(Ok(response(pb::consume_response::Kind::Subscribed(subscribed))));
        tokio::spawn(session(Arc::clone(&self.broker), access, queue, subscription, inbound, out));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn pull(&self, request: Request<pb::PullRequest>) -> Result<Response<pb::PullResponse>, Status> {
        let access = self.access(&request)?;
        let request = request.into_inner();
        access.check(Action::Consume, &request.queue)?;
        let queue = self.leader_queue(&request.queue).await?;
        if request.wait_ms > PULL_WAIT_MS_MAX {
            return Err(Status::invalid_argument(format!(
                "wait_ms is {}; the limit is {PULL_WAIT_MS_MAX}",
                request.wait_ms
            )));
        }
        // The call must answer before the server's request timeout cuts it
        // (which would lose what it leased until the leases expire).
        let request_timeout_ms = self.broker.config().grpc.request_timeout_ms;
        if request.wait_ms >= request_timeout_ms {
            return Err(Status::invalid_argument(format!(
                "wait_ms is {}; it must be below this broker's grpc.request_timeout_ms ({request_timeout_ms})",
                request.wait_ms
            )));
        }
        let mut subscription = queue.subscribe_pull(request.max_messages).map_err(to_status)?;
        // If the call is dropped while it waits (the client cancelled or
        // went away), what was leased to it goes back to its lanes.
        let mut pending = PendingPull { queue: &queue, consumer_id: Some(subscription.consumer_id) };
        let wait_ms = request.wait_ms.min(request_timeout_ms.saturating_sub(PULL_ANSWER_MARGIN_MS));
        let first =
            tokio::time::timeout(Duration::from_millis(wait_ms), subscription.deliveries.recv()).await.ok().flatten();
        // Without release: what is returned stays leased until Ack, Nack or
        // expiry. The channel still yields what was sent before.
        pending.finish();
        let mut deliveries: Vec<pb::Delivery> = Vec::new();
        let mut size = 0;
        let mut left_out = Vec::new();
        for delivery in first.into_iter().chain(std::iter::from_fn(|| subscription.deliveries.try_recv().ok())) {
            let delivery = convert::delivery(delivery);
            let len = field_len(&delivery);
            if deliveries.is_empty() || size + len <= PULL_RESPONSE_SIZE_MAX {
                size += len;
                deliveries.push(delivery);
            } else {
                left_out.push(delivery.delivery_id);
            }
        }
        // Past the size limit: not returned, so not leased either.
        queue.release(&left_out);
        Ok(Response::new(pb::PullResponse { deliveries }))
    }

    async fn ack(&self, request: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        let access = self.access(&request)?;
        let request = request.into_inner();
        access.check(Action::Consume, &request.queue)?;
        let queue = self.leader_queue(&request.queue).await?;
        check_ids("ack", &request.delivery_ids).map_err(to_status)?;
        queue.ack(&request.delivery_ids, true, Holder::AnyCaller).await.map_err(to_status)?;
        Ok(Response::new(pb::AckResponse {}))
    }

    async fn nack(&self, request: Request<pb::NackRequest>) -> Result<Response<pb::NackResponse>, Status> {
        let access = self.access(&request)?;
        let request = request.into_inner();
        access.check(Action::Consume, &request.queue)?;
        let queue = self.leader_queue(&request.queue).await?;
        queue
            .nack(request.delivery_id, request.delay_ms, &request.reason, Holder::AnyCaller)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::NackResponse {}))
    }

    async fn peek(&self, request: Request<pb::PeekRequest>) -> Result<Response<pb::PeekResponse>, Status> {
        let access = self.access(&request)?;
        let request = request.into_inner();
        access.check(Action::Consume, &request.queue)?;
        let queue = self.queue(&request.queue).await?;
        if !(1..=PEEK_MESSAGES_MAX).contains(&request.max_messages) {
            return Err(Status::invalid_argument(format!(
                "max_messages is {}; it must be in 1..={PEEK_MESSAGES_MAX}",
                request.max_messages
            )));
        }
        let start = request.start.map(|id| (id.lane, id.offset));
        if let Some((lane, _)) = start.filter(|&(lane, _)| lane >= queue.lane_count()) {
            return Err(Status::invalid_argument(format!(
                "start lane {lane} does not exist; queue {} has lanes 0..{}",
                queue.name,
                queue.lane_count()
            )));
        }
        // Reads segments: off the runtime's workers.
        let reading = Arc::clone(&queue);
        let (page, mut next) = tokio::task::spawn_blocking(move || reading.peek(start, request.max_messages as usize))
            .await
            .map_err(|e| Status::internal(format!("the peek did not finish: {e}")))?;
        let now = now_ms();
        let mut messages = Vec::with_capacity(page.len());
        let mut size = 0;
        for peeked in page {
            let id = (peeked.lane, peeked.offset);
            let message = convert::peeked(peeked, now);
            size += field_len(&message);
            if !messages.is_empty() && size > PULL_RESPONSE_SIZE_MAX {
                // Past the size limit: the next page starts here.
                next = Some(id);
                break;
            }
            messages.push(message);
        }
        let next = next.map(|(lane, offset)| pb::MessageId { lane, offset });
        Ok(Response::new(pb::PeekResponse { messages, next }))
    }

    async fn extend(&self, request: Request<pb::ExtendRequest>) -> Result<Response<pb::ExtendResponse>, Status> {
        let access = self.access(&request)?;
        let request = request.into_inner();
        access.check(Action::Consume, &request.queue)?;
        let queue = self.leader_queue(&request.queue).await?;
        let extensions = queue.extend(&request.delivery_ids, request.lease_ms, Holder::AnyCaller).map_err(to_status)?;
        Ok(Response::new(pb::ExtendResponse { results: convert::extensions(&request.delivery_ids, extensions) }))
    }
}

/// A Pull between subscribing and returning: dropped before `finish`, it
/// ends the Pull's consumer and releases what was leased to it.
struct PendingPull<'a> {
    queue: &'a Queue,
    consumer_id: Option<u64>,
}

impl PendingPull<'_> {
    /// Ends the Pull's consumer; its leases stay.
    fn finish(&mut self) {
        if let Some(consumer_id) = self.consumer_id.take() {
            self.queue.unsubscribe(consumer_id, false);
        }
    }
}

impl Drop for PendingPull<'_> {
    fn drop(&mut self) {
        if let Some(consumer_id) = self.consumer_id.take() {
            self.queue.unsubscribe(consumer_id, true);
        }
    }
}

fn response(kind: pb::consume_response::Kind) -> pb::ConsumeResponse {
    pb::ConsumeResponse { kind: Some(kind) }
}

fn rejected(delivery_id: u64, error: BrokerError) -> pb::ConsumeResponse {
    let status = to_status(error);
    response(pb::consume_response::Kind::Rejected(pb::Rejected {
        delivery_id,
        code: status.code() as i32,
        message: status.message().to_owned(),
    }))
}

type Out = mpsc::Sender<Result<pb::ConsumeResponse, Status>>;

/// One consume stream: forwards deliveries and applies credit, acks and
/// nacks until either side ends; then releases the consumer's leases.
async fn session(
    broker: Arc<Broker>,
    access: Access,
    queue: Arc<Queue>,
    mut subscription: crate::queue::Subscription,
    mut inbound: Streaming<pb::ConsumeRequest>,
    out: Out,
) {
    let consumer_id = subscription.consumer_id;
    let nacks = Arc::new(tokio::sync::Semaphore::new(STREAM_NACKS_IN_FLIGHT_MAX));
    let revoked = access.revoked();
    tokio::pin!(revoked);
    'session: loop {
        tokio::select! {
            status = &mut revoked => {
                let _ = out.send(Err(status)).await;
                break;
            }
            delivery = subscription.deliveries.recv() => match delivery {
                Some(delivery) => {
                    let mut next = Some(delivery);
                    let mut forwarded = 0;
                    while let Some(delivery) = next.take() {
                        let message = response(pb::consume_response::Kind::Delivery(convert::delivery(delivery)));
                        if out.send(Ok(message)).await.is_err() {
                            break 'session;
                        }
                        forwarded += 1;
                        if forwarded < SESSION_DELIVERIES_PER_TURN {
                            next = subscription.deliveries.try_recv().ok();
                        }
                    }
                }
                None => {
                    // The queue ended the consumer: shutting down (come back
                    // after the restart) or deleted (it will not come back).
                    let status = if broker.is_shutting_down() {
                        to_status(BrokerError::ShuttingDown)
                    } else if queue.is_closed() {
                        crate::metrics::count_error(Code::NotFound);
                        Status::not_found(format!("queue {} was deleted", queue.name))
                    } else {
                        Status::aborted("the broker ended this consumer; subscribe again")
                    };
                    let _ = out.send(Err(status)).await;
                    break;
                }
            },
            request = inbound.message() => match request {
                Ok(Some(request)) => {
                    if let Err(status) = handle(&queue, consumer_id, request, &out, &nacks).await {
                        let _ = out.send(Err(status)).await;
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    // A request the broker cannot decode gets its status;
                    // otherwise the client is gone and nobody reads it.
                    let _ = out.send(Err(inbound_error(status))).await;
                    break;
                }
            },
        }
    }
    // Nacks the client sent before the stream ended run in tasks of their
    // own; they settle before the consumer's leases are released, or a nack
    // sent just before closing would find its lease released ("not
    // leased") and the message would come back without its attempt counted.
    let _ = nacks.acquire_many(STREAM_NACKS_IN_FLIGHT_MAX as u32).await;
    queue.unsubscribe(consumer_id, true);
}

/// Applies one request of a consume stream. An error ends the stream.
async fn handle(
    queue: &Arc<Queue>,
    consumer_id: u64,
    request: pb::ConsumeRequest,
    out: &Out,
    nacks: &Arc<tokio::sync::Semaphore>,
) -> Result<(), Status> {
    match request.kind {
        None => Err(Status::invalid_argument("empty consume request: set credit, ack, nack or extend")),
        Some(pb::consume_request::Kind::Subscribe(_)) => {
            Err(Status::invalid_argument("already subscribed: open another stream for another queue"))
        }
        Some(pb::consume_request::Kind::Credit(credit)) => {
            queue.add_credit(consumer_id, credit.credit).map_err(to_status)
        }
        Some(pb::consume_request::Kind::Ack(ack)) => {
            if ack.delivery_ids.len() > CREDIT_MAX as usize {
                return Err(Status::invalid_argument(format!(
                    "at most {CREDIT_MAX} delivery ids per ack (the credit limit); got {}",
                    ack.delivery_ids.len()
                )));
            }
            // Each id on its own: a stale one is rejected, the others apply.
            // Not awaited: stream acks become durable with the next sync.
            for (delivery_id, error) in queue.ack_each(&ack.delivery_ids, Holder::Consumer(consumer_id)) {
                let _ = out.send(Ok(rejected(delivery_id, error))).await;
            }
            Ok(())
        }
        Some(pb::consume_request::Kind::Extend(extend)) => {
            // A bad request (no ids, too many, lease out of bounds) ends the
            // stream like a bad ack; a lease not held is answered per id.
            let extensions = queue
                .extend(&extend.delivery_ids, extend.lease_ms, Holder::Consumer(consumer_id))
                .map_err(to_status)?;
            let results = convert::extensions(&extend.delivery_ids, extensions);
            let _ = out.send(Ok(response(pb::consume_response::Kind::Extended(pb::Extended { results })))).await;
            Ok(())
        }
        Some(pb::consume_request::Kind::Nack(nack)) => {
            let queue = Arc::clone(queue);
            let out = out.clone();
            // At most STREAM_NACKS_IN_FLIGHT_MAX at once: past it the
            // stream's loop waits here (the semaphore is never closed).
            let permit = Arc::clone(nacks)
                .acquire_owned()
                .await
                .map_err(|_| Status::internal("the stream's nack limiter closed"))?;
            // Off the session loop: a nack stores a copy (durable) first.
            tokio::spawn(async move {
                if let Err(error) =
                    queue.nack(nack.delivery_id, nack.delay_ms, &nack.reason, Holder::Consumer(consumer_id)).await
                {
                    let _ = out.send(Ok(rejected(nack.delivery_id, error))).await;
                }
                drop(permit);
            });
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An all-queue answer keeps the queues that fit its size limit: at
    /// the limit all of them, one byte under it the last is left out.
    #[test]
    fn all_queue_answers_stop_at_their_size_limit() {
        let item = |i: usize| pb::QueueInfo { name: format!("q{i:04}"), ..pb::QueueInfo::default() };
        let each = {
            let len = prost::Message::encoded_len(&item(0));
            1 + prost::length_delimiter_len(len) + len
        };
        let (kept, left_out) = up_to_size((0..10).map(item), 10 * each);
        assert_eq!((kept.len(), left_out), (10, 0));
        let (kept, left_out) = up_to_size((0..10).map(item), 10 * each - 1);
        assert_eq!((kept.len(), left_out), (9, 1));
        assert_eq!(kept.last().map(|q| q.name.as_str()), Some("q0008"), "the last by name go");
        // The answer built from kept items is within the limit.
        let response = pb::ListQueuesResponse { queues: kept };
        assert!(prost::Message::encoded_len(&response) < 10 * each);
    }

    /// With the default `queues_max`, every queue of the default settings
    /// (three lanes, a name of 20 bytes, busy figures) fits one Stats and
    /// one ListQueues answer: the size limit only cuts answers about
    /// queues far larger than the default (eight long-named lanes).
    #[test]
    fn the_default_queues_max_fits_an_all_queue_answer() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let config = crate::Config { data_dir: dir.path().to_owned(), ..crate::Config::default() };
            let broker = Broker::open(config).unwrap();
            let queue = broker.create("a-queue-name-20-byte", &Default::default()).await.unwrap();
            let mut stats = convert::queue_stats(&queue);
            // Figures at their widest varints.
            stats.in_flight = u64::MAX;
            stats.credit = u64::MAX;
            stats.refused_queue_full = u64::MAX;
            stats.throttled_ms = u64::MAX;
            for lane in &mut stats.lanes {
                lane.in_flight = u64::MAX;
                if let Some(s) = lane.saturation.as_mut() {
                    s.depth = u64::MAX;
                    s.bytes = u64::MAX;
                    s.oldest_age_ms = u64::MAX;
                    s.drain_estimate_ms = Some(u64::MAX);
                }
            }
            let info = convert::queue_info(&queue);
            let queues_max = crate::config::QUEUES_MAX_DEFAULT;
            for (what, len) in
                [("Stats", prost::Message::encoded_len(&stats)), ("ListQueues", prost::Message::encoded_len(&info))]
            {
                let each = 1 + prost::length_delimiter_len(len) + len;
                assert!(
                    each * queues_max <= QUEUES_RESPONSE_SIZE_MAX,
                    "{what}: {queues_max} queues of {each} bytes exceed {QUEUES_RESPONSE_SIZE_MAX}"
                );
            }
        });
    }

    /// A stream applies at most STREAM_NACKS_IN_FLIGHT_MAX nacks at once:
    /// with one permit left a nack is taken at once; with none left the
    /// stream's next nack waits until an earlier one finishes.
    #[tokio::test]
    async fn nacks_in_flight_at_the_limit_and_past() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::Config { data_dir: dir.path().to_owned(), ..crate::Config::default() };
        let broker = Broker::open(config).unwrap();
        let queue = broker.create("n", &Default::default()).await.unwrap();
        let (out, mut responses) = mpsc::channel(16);
        let nacks = Arc::new(tokio::sync::Semaphore::new(STREAM_NACKS_IN_FLIGHT_MAX));
        let nack = || pb::ConsumeRequest {
            kind: Some(pb::consume_request::Kind::Nack(pb::Nack {
                delivery_id: 7,
                delay_ms: 0,
                reason: String::new(),
            })),
        };
        // Up to the limit: all but one permit held by earlier nacks.
        let held = Arc::clone(&nacks).acquire_many_owned(STREAM_NACKS_IN_FLIGHT_MAX as u32 - 1).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), handle(&queue, 1, nack(), &out, &nacks))
            .await
            .expect("the last permit is taken at once")
            .unwrap();
        // The unknown delivery is rejected, and its permit comes back.
        assert!(matches!(responses.recv().await, Some(Ok(_))));
        // Past it: every permit held, so the next nack waits.
        let last = Arc::clone(&nacks).acquire_owned().await.unwrap();
        let waiting = handle(&queue, 1, nack(), &out, &nacks);
        tokio::pin!(waiting);
        assert!(tokio::time::timeout(Duration::from_millis(300), &mut waiting).await.is_err(), "past the limit");
        drop(last);
        tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("runs once one finishes").unwrap();
        drop(held);
    }
}
