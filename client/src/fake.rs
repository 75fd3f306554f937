//! An in-process fake broker for unit tests: the generated tonic server
//! traits over a little in-memory state, served on 127.0.0.1:0.
//!
//! It follows the wire contract (`crate::contract`) closely enough to test
//! the client's side of it, records every request, and can be told to fail:
//! answer with a status before storing, store and then fail or hang, or break
//! every consume stream as a broker restart would.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use ballast_proto::v1::{
    self as proto, admin_server::AdminServer, consume_request::Kind as RequestKind,
    consume_response::Kind as ResponseKind, consumer_server::ConsumerServer, publisher_server::PublisherServer,
    stats_server::StatsServer,
};
use tokio::{
    sync::{Notify, mpsc, oneshot, watch},
    task::JoinHandle,
    time::Instant,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::{Client, contract};

/// A running fake broker.
pub(crate) struct FakeServer {
    pub(crate) addr: SocketAddr,
    pub(crate) state: Arc<Fake>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl FakeServer {
    pub(crate) async fn start() -> FakeServer {
        let state = Arc::new(Fake::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        let (shutdown, stopped) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .add_service(PublisherServer::new(PublisherService(state.clone())))
            .add_service(ConsumerServer::new(ConsumerService(state.clone())))
            .add_service(AdminServer::from_arc(state.clone()))
            .add_service(StatsServer::new(StatsService(state.clone())));
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .expect("fake server runs");
        });
        FakeServer { addr, state, shutdown: Some(shutdown), task: Some(task) }
    }

    pub(crate) fn client(&self) -> Client {
        Client::new(&format!("http://{}", self.addr)).expect("valid address")
    }

    /// A lazily connecting channel to the fake, for constructors that take
    /// one directly.
    pub(crate) fn client_channel(&self) -> crate::client::Transport {
        let addr = format!("http://{}", self.addr);
        let channel = tonic::transport::Endpoint::from_shared(addr.clone()).expect("valid address").connect_lazy();
        let follow = crate::leader::Follow::new(addr.clone(), channel, vec![addr], crate::ClientConfig::default());
        crate::client::Transport::new(follow, crate::client::Credentials::default())
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// What the fake does with the next publish calls.
#[derive(Debug, Clone)]
pub(crate) enum Fault {
    /// Answer with this status; store nothing.
    Refuse(Status),
    /// Store, then answer UNAVAILABLE (the answer is lost).
    StoreThenUnavailable,
    /// Store, then never answer.
    StoreThenHang,
}

/// What the fake does with the next PublishStream opened: a paused node
/// (its connection stays up, nothing answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamFault {
    /// Never answer the call: the stream's headers never come.
    NoReply,
    /// Take the stream and its requests, and answer none of them.
    Silent,
}

/// Which call carried a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PublishKind {
    Unary,
    Batch,
    /// A request on a PublishStream.
    Stream,
}

/// One publish RPC (or stream request) as the fake saw it.
#[derive(Debug, Clone)]
pub(crate) struct PublishCall {
    pub(crate) kind: PublishKind,
    /// More than one message.
    pub(crate) batch: bool,
    pub(crate) keys: Vec<String>,
    pub(crate) at: Instant,
}

/// A stored message.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) id: proto::MessageId,
    pub(crate) message: proto::Message,
}

/// The fake's state. All of it sits behind one mutex: tests are small.
#[derive(Debug, Default)]
pub(crate) struct Fake {
    state: Mutex<State>,
    /// Wakes consume sessions when messages are added or released.
    wake: Notify,
    /// Bumped to break every consume stream (a broker restart).
    restarts: watch::Sender<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    // Publisher.
    pub(crate) faults: VecDeque<Fault>,
    pub(crate) calls: Vec<PublishCall>,
    /// Answer PublishStream with UNIMPLEMENTED, as a broker from before it.
    pub(crate) no_publish_stream: bool,
    /// Faults of the next PublishStreams, one each, in order.
    pub(crate) stream_faults: VecDeque<StreamFault>,
    /// PublishStreams opened (whatever their fault).
    pub(crate) streams_opened: u32,
    /// Requests taken by a silent stream and never answered.
    pub(crate) unanswered: u32,
    pub(crate) stored: Vec<Stored>,
    dedupe: HashMap<String, proto::MessageId>,
    // Consumer.
    /// Consume calls still to be taken and never answered (a paused node).
    pub(crate) silent_consumes: u32,
    /// Messages ready for delivery, with their attempt count so far.
    pub(crate) ready: VecDeque<(proto::MessageId, proto::Message, u32)>,
    pub(crate) sessions: Vec<SessionLog>,
    /// Message ids acked, in order.
    pub(crate) acked: Vec<proto::MessageId>,
    /// (message id, delay_ms, reason) of every nack.
    pub(crate) nacked: Vec<(proto::MessageId, u64, String)>,
    pub(crate) rejected: u64,
    /// Largest credit + leased seen on any session.
    pub(crate) window_max: u64,
    /// Queues that exist for Subscribe and Admin.
    pub(crate) queues: Vec<String>,
    // Stats.
    /// Interval of every Watch call, in ms.
    pub(crate) watches: Vec<u64>,
    /// Snapshots a Watch sends before it ends with UNAVAILABLE (as a broker
    /// shutting down does); `None` sends until the client leaves.
    pub(crate) watch_snapshots: Option<usize>,
}

/// One consume session as the fake saw it.
#[derive(Debug, Default, Clone)]
pub(crate) struct SessionLog {
    pub(crate) subscribe_credit: u32,
    pub(crate) requests: Vec<RequestKind>,
    /// Delivery id -> message id, for every delivery of this session.
    pub(crate) delivered: HashMap<u64, proto::MessageId>,
    /// Whether the client half-closed the stream (a graceful stop).
    pub(crate) closed_by_client: bool,
}

impl Fake {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("fake state lock is never poisoned")
    }

    pub(crate) fn fault(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// Adds queue `name` with `count` ready messages `name-0`, `name-1`, ...
    pub(crate) fn add_queue(&self, name: &str, count: u64) {
        let mut state = self.lock();
        state.queues.push(name.to_owned());
        for offset in 0..count {
            let message =
                proto::Message { payload: format!("{name}-{offset}").into_bytes().into(), ..proto::Message::default() };
            state.ready.push_back((proto::MessageId { lane: 0, offset }, message, 0));
        }
        drop(state);
        self.wake.notify_waiters();
    }

    /// Breaks every consume stream with UNAVAILABLE, releasing its leases.
    pub(crate) fn restart(&self) {
        self.restarts.send_modify(|count| *count += 1);
    }

    fn store(&self, message: proto::Message) -> proto::Receipt {
        let mut state = self.lock();
        if let Some(id) = state.dedupe.get(&message.idempotency_key) {
            return state.receipt(*id, true);
        }
        let id = proto::MessageId { lane: message.lane.unwrap_or(1), offset: state.stored.len() as u64 };
        if !message.idempotency_key.is_empty() {
            state.dedupe.insert(message.idempotency_key.clone(), id);
        }
        state.stored.push(Stored { id, message });
        state.receipt(id, false)
    }

    /// The fake's stats: every known queue (or `queue`), its depth the
    /// number of stored messages.
    fn stats(&self, queue: &str) -> Result<proto::StatsResponse, Status> {
        let state = self.lock();
        let mut names: Vec<&String> = state.queues.iter().filter(|name| queue.is_empty() || *name == queue).collect();
        if names.is_empty() && !queue.is_empty() {
            return Err(Status::not_found(format!("queue {queue} does not exist")));
        }
        names.sort();
        let depth = state.stored.len() as u64;
        let queues = names
            .into_iter()
            .map(|name| proto::QueueStats {
                name: name.clone(),
                saturation: Some(figures(depth)),
                lanes: ["high", "normal", "low"]
                    .iter()
                    .zip([1.0, 0.9, 0.7])
                    .enumerate()
                    .map(|(index, (lane, admission))| proto::LaneStats {
                        name: (*lane).to_owned(),
                        saturation: Some(figures(state.lane_depth(index as u32))),
                        admission,
                        in_flight: 0,
                        storage_failed: false,
                    })
                    .collect(),
                max_messages: FAKE_MAX_MESSAGES,
                max_bytes: 1 << 30,
                ..proto::QueueStats::default()
            })
            .collect();
        Ok(proto::StatsResponse {
            at_ms: now_ms(),
            queues,
            disk_free_bytes: 1 << 40,
            disk_free_min_bytes: 1 << 29,
            cluster: None,
        })
    }

    /// Records a publish call and takes the next fault, if any.
    fn begin_publish(&self, kind: PublishKind, messages: &[proto::Message]) -> Result<Option<Fault>, Status> {
        let mut state = self.lock();
        state.calls.push(PublishCall {
            kind,
            batch: messages.len() > 1,
            keys: messages.iter().map(|m| m.idempotency_key.clone()).collect(),
            at: Instant::now(),
        });
        if let Some(bad) = messages.iter().find(|m| &m.payload[..] == b"bad") {
            return Err(Status::invalid_argument(format!("payload {:?} is bad", bad.payload)));
        }
        match state.faults.pop_front() {
            Some(Fault::Refuse(status)) => Err(status),
            other => Ok(other),
        }
    }

    async fn finish_publish<T>(fault: Option<Fault>, answer: T) -> Result<Response<T>, Status> {
        match fault {
            None | Some(Fault::Refuse(_)) => Ok(Response::new(answer)),
            Some(Fault::StoreThenUnavailable) => Err(Status::unavailable("answer lost")),
            Some(Fault::StoreThenHang) => std::future::pending().await,
        }
    }
}

impl State {
    fn lane_depth(&self, lane: u32) -> u64 {
        self.stored.iter().filter(|stored| stored.id.lane == lane).count() as u64
    }

    fn receipt(&self, id: proto::MessageId, duplicate: bool) -> proto::Receipt {
        proto::Receipt {
            id: Some(id),
            duplicate,
            queue: Some(figures(self.stored.len() as u64)),
            lane: Some(figures(self.lane_depth(id.lane))),
        }
    }
}

/// The fake's `max_messages` for every queue.
pub(crate) const FAKE_MAX_MESSAGES: u64 = 100;

/// Figures at a depth against [`FAKE_MAX_MESSAGES`]: 100 bytes a message, no
/// consumer (so the drain estimate is unknown unless the queue is empty).
fn figures(depth: u64) -> proto::Saturation {
    proto::Saturation {
        depth,
        bytes: depth * 100,
        saturation: depth as f64 / FAKE_MAX_MESSAGES as f64,
        oldest_age_ms: if depth == 0 { 0 } else { 250 },
        drain_estimate_ms: (depth == 0).then_some(0),
        ack_rate: 0.0,
        publish_rate: 0.0,
    }
}

fn now_ms() -> u64 {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    u64::try_from(since_epoch.as_millis()).expect("fits until year 584556019")
}

/// A RESOURCE_EXHAUSTED status with the contract's retry-after metadata.
pub(crate) fn refused(retry_after: Duration) -> Status {
    let mut status = Status::resource_exhausted("queue is full");
    let value = retry_after.as_millis().to_string().parse().expect("digits are valid metadata");
    status.metadata_mut().insert(contract::RETRY_AFTER_METADATA, value);
    status
}

/// The publish side of the fake (a newtype: stream tasks need the `Arc`).
struct PublisherService(Arc<Fake>);

#[tonic::async_trait]
impl proto::publisher_server::Publisher for PublisherService {
    type PublishStreamStream = ReceiverStream<Result<proto::PublishStreamResponse, Status>>;

    async fn publish(
        &self,
        request: Request<proto::PublishRequest>,
    ) -> Result<Response<proto::PublishResponse>, Status> {
        let message = request.into_inner().message.ok_or_else(|| Status::invalid_argument("no message"))?;
        let fault = self.0.begin_publish(PublishKind::Unary, std::slice::from_ref(&message))?;
        let receipt = self.0.store(message);
        Fake::finish_publish(fault, proto::PublishResponse { receipt: Some(receipt) }).await
    }

    async fn publish_batch(
        &self,
        request: Request<proto::PublishBatchRequest>,
    ) -> Result<Response<proto::PublishBatchResponse>, Status> {
        let messages = request.into_inner().messages;
        let receipts = self.0.store_batch(PublishKind::Batch, messages)?;
        Fake::finish_publish(receipts.0, proto::PublishBatchResponse { receipts: receipts.1 }).await
    }

    /// Each request is answered by a task of its own (so a hung one holds
    /// up no other); a fault ends the stream as a lost connection would.
    async fn publish_stream(
        &self,
        request: Request<Streaming<proto::PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let fault = {
            let mut state = self.0.lock();
            if state.no_publish_stream {
                return Err(Status::unimplemented("this broker has no PublishStream"));
            }
            state.streams_opened += 1;
            state.stream_faults.pop_front()
        };
        let mut inbound = request.into_inner();
        let (out, rx) = mpsc::channel(64);
        let fake = self.0.clone();
        match fault {
            None => {}
            Some(StreamFault::NoReply) => std::future::pending().await,
            Some(StreamFault::Silent) => {
                // Holds `out`, so the stream stays open, until the client leaves.
                tokio::spawn(async move {
                    while let Ok(Some(_)) = inbound.message().await {
                        fake.lock().unanswered += 1;
                    }
                    drop(out);
                });
                return Ok(Response::new(ReceiverStream::new(rx)));
            }
        }
        tokio::spawn(async move {
            while let Ok(Some(request)) = inbound.message().await {
                let (fake, out) = (fake.clone(), out.clone());
                tokio::spawn(async move {
                    let sequence = request.sequence;
                    let answer = match fake.store_batch(PublishKind::Stream, request.messages) {
                        Ok((None, receipts)) => Ok(proto::PublishStreamResponse { sequence, receipts, error: None }),
                        Ok((Some(Fault::StoreThenUnavailable), _)) => Err(Status::unavailable("answer lost")),
                        Ok((Some(Fault::StoreThenHang), _)) => std::future::pending().await,
                        Ok((Some(Fault::Refuse(status)), _)) | Err(status) => Ok(proto::PublishStreamResponse {
                            sequence,
                            receipts: Vec::new(),
                            error: Some(proto::PublishError {
                                code: status.code() as i32,
                                message: status.message().to_owned(),
                                metadata: status
                                    .metadata()
                                    .iter()
                                    .filter_map(|entry| match entry {
                                        tonic::metadata::KeyAndValueRef::Ascii(key, value) => {
                                            Some((key.to_string(), value.to_str().ok()?.to_owned()))
                                        }
                                        tonic::metadata::KeyAndValueRef::Binary(..) => None,
                                    })
                                    .collect(),
                            }),
                        }),
                    };
                    let _ = out.send(answer).await;
                });
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

impl Fake {
    /// A batch's call recorded and its fault taken, then stored (checked
    /// against the batch limit first).
    fn store_batch(
        &self,
        kind: PublishKind,
        messages: Vec<proto::Message>,
    ) -> Result<(Option<Fault>, Vec<proto::Receipt>), Status> {
        if messages.len() > contract::BATCH_COUNT_MAX {
            return Err(Status::invalid_argument("batch too big"));
        }
        let fault = self.begin_publish(kind, &messages)?;
        Ok((fault, messages.into_iter().map(|m| self.store(m)).collect()))
    }
}

/// The consume side of the fake (a newtype: session tasks need the `Arc`).
struct ConsumerService(Arc<Fake>);

#[tonic::async_trait]
impl proto::consumer_server::Consumer for ConsumerService {
    type ConsumeStream = ReceiverStream<Result<proto::ConsumeResponse, Status>>;

    async fn consume(
        &self,
        request: Request<Streaming<proto::ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let silent = {
            let mut state = self.0.lock();
            let silent = state.silent_consumes > 0;
            state.silent_consumes = state.silent_consumes.saturating_sub(1);
            silent
        };
        if silent {
            return std::future::pending().await;
        }
        let mut incoming = request.into_inner();
        let first = incoming.message().await?.and_then(|r| r.kind);
        let Some(RequestKind::Subscribe(subscribe)) = first else {
            return Err(Status::invalid_argument("the first request must be subscribe"));
        };
        if !self.0.lock().queues.contains(&subscribe.queue) {
            return Err(Status::not_found(format!("queue {} does not exist", subscribe.queue)));
        }
        if !(1..=contract::CREDIT_MAX).contains(&subscribe.credit) {
            return Err(Status::invalid_argument("credit out of range"));
        }
        let index = {
            let mut state = self.0.lock();
            state.sessions.push(SessionLog { subscribe_credit: subscribe.credit, ..SessionLog::default() });
            state.sessions.len() - 1
        };
        let (outgoing, receiver) = mpsc::channel(1024);
        outgoing
            .send(Ok(proto::ConsumeResponse {
                kind: Some(ResponseKind::Subscribed(proto::Subscribed {
                    queue: subscribe.queue,
                    consumer_id: index as u64,
                })),
            }))
            .await
            .expect("a new channel has room");
        tokio::spawn(FakeSession::new(self.0.clone(), index, subscribe.credit).run(incoming, outgoing));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn pull(&self, _request: Request<proto::PullRequest>) -> Result<Response<proto::PullResponse>, Status> {
        Err(Status::unimplemented("the fake has no pull"))
    }

    async fn ack(&self, _request: Request<proto::AckRequest>) -> Result<Response<proto::AckResponse>, Status> {
        Err(Status::unimplemented("the fake has no unary ack"))
    }

    async fn nack(&self, _request: Request<proto::NackRequest>) -> Result<Response<proto::NackResponse>, Status> {
        Err(Status::unimplemented("the fake has no unary nack"))
    }

    async fn peek(&self, _request: Request<proto::PeekRequest>) -> Result<Response<proto::PeekResponse>, Status> {
        Err(Status::unimplemented("the fake has no peek"))
    }

    async fn extend(&self, _request: Request<proto::ExtendRequest>) -> Result<Response<proto::ExtendResponse>, Status> {
        Err(Status::unimplemented("the fake has no unary extend"))
    }
}

/// One consume session of the fake broker.
struct FakeSession {
    fake: Arc<Fake>,
    index: usize,
    credit: u32,
    next_delivery_id: u64,
    /// Delivery id -> (message id, message, attempt).
    leased: HashMap<u64, (proto::MessageId, proto::Message, u32)>,
}

impl FakeSession {
    fn new(fake: Arc<Fake>, index: usize, credit: u32) -> FakeSession {
        // Delivery ids restart at 1 in every session, as ids of different
        // sessions may collide on a real broker too.
        FakeSession { fake, index, credit, next_delivery_id: 1, leased: HashMap::new() }
    }

    async fn run(
        mut self,
        mut incoming: Streaming<proto::ConsumeRequest>,
        outgoing: mpsc::Sender<Result<proto::ConsumeResponse, Status>>,
    ) {
        let mut restarts = self.fake.restarts.subscribe();
        restarts.borrow_and_update();
        let fake = self.fake.clone();
        loop {
            // Registered before delivering, so a message added meanwhile
            // still wakes the session.
            let wake = fake.wake.notified();
            self.deliver(&outgoing).await;
            tokio::select! {
                request = incoming.message() => match request {
                    Ok(Some(proto::ConsumeRequest { kind: Some(kind) })) => {
                        self.fake.lock().sessions[self.index].requests.push(kind.clone());
                        self.apply(kind, &outgoing).await;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        // Half-closed by the client: acks read so far are
                        // applied; release the rest and end the stream.
                        self.fake.lock().sessions[self.index].closed_by_client = true;
                        break;
                    }
                    Err(_) => break,
                },
                _ = restarts.changed() => {
                    let _ = outgoing.send(Err(Status::unavailable("broker restarting"))).await;
                    break;
                }
                () = wake => {}
            }
        }
        self.release();
    }

    async fn deliver(&mut self, outgoing: &mpsc::Sender<Result<proto::ConsumeResponse, Status>>) {
        while self.credit > 0 {
            let Some((id, message, attempt)) = self.fake.lock().ready.pop_front() else { return };
            let delivery_id = self.next_delivery_id;
            self.next_delivery_id += 1;
            self.credit -= 1;
            let attempt = attempt + 1;
            let delivery = proto::Delivery {
                delivery_id,
                id: Some(id),
                payload: message.payload.clone(),
                headers: message.headers.clone(),
                idempotency_key: message.idempotency_key.clone(),
                attempt,
                published_at_ms: 1,
                lease_deadline_ms: 2,
                // No lease length: the consumer does not extend.
                lease_ms: 0,
            };
            self.leased.insert(delivery_id, (id, message, attempt));
            self.fake.lock().sessions[self.index].delivered.insert(delivery_id, id);
            self.note_window();
            let response = proto::ConsumeResponse { kind: Some(ResponseKind::Delivery(delivery)) };
            if outgoing.send(Ok(response)).await.is_err() {
                return;
            }
        }
    }

    async fn apply(&mut self, kind: RequestKind, outgoing: &mpsc::Sender<Result<proto::ConsumeResponse, Status>>) {
        match kind {
            RequestKind::Subscribe(_) => {
                let _ = outgoing.send(Err(Status::invalid_argument("subscribed twice"))).await;
            }
            RequestKind::Credit(credit) => {
                self.credit += credit.credit;
                self.note_window();
                assert!(
                    u64::from(self.credit) + self.leased.len() as u64 <= u64::from(contract::CREDIT_MAX),
                    "the broker's credit rule was broken"
                );
            }
            RequestKind::Ack(ack) => {
                for delivery_id in ack.delivery_ids {
                    match self.leased.remove(&delivery_id) {
                        Some((id, _, _)) => self.fake.lock().acked.push(id),
                        None => self.reject(delivery_id, outgoing).await,
                    }
                }
            }
            RequestKind::Nack(nack) => match self.leased.remove(&nack.delivery_id) {
                Some((id, message, attempt)) => {
                    let mut state = self.fake.lock();
                    state.nacked.push((id, nack.delay_ms, nack.reason));
                    // The fake ignores the delay: redelivered at once.
                    state.ready.push_back((id, message, attempt));
                }
                None => self.reject(nack.delivery_id, outgoing).await,
            },
            RequestKind::Extend(extend) => {
                let results = extend
                    .delivery_ids
                    .into_iter()
                    .map(|delivery_id| {
                        let outcome = if self.leased.contains_key(&delivery_id) {
                            proto::ExtendOutcome::Extended
                        } else {
                            proto::ExtendOutcome::NotLeased
                        };
                        proto::ExtendResult { delivery_id, outcome: outcome.into(), lease_deadline_ms: 3 }
                    })
                    .collect();
                let extended = proto::Extended { results };
                let _ =
                    outgoing.send(Ok(proto::ConsumeResponse { kind: Some(ResponseKind::Extended(extended)) })).await;
            }
        }
    }

    async fn reject(&self, delivery_id: u64, outgoing: &mpsc::Sender<Result<proto::ConsumeResponse, Status>>) {
        self.fake.lock().rejected += 1;
        let rejected = proto::Rejected {
            delivery_id,
            code: tonic::Code::FailedPrecondition as i32,
            message: "unknown delivery".into(),
        };
        let _ = outgoing.send(Ok(proto::ConsumeResponse { kind: Some(ResponseKind::Rejected(rejected)) })).await;
    }

    fn note_window(&self) {
        let window = u64::from(self.credit) + self.leased.len() as u64;
        let mut state = self.fake.lock();
        state.window_max = state.window_max.max(window);
    }

    /// Puts leased messages back at the front, in offset order.
    fn release(&mut self) {
        let mut leased: Vec<_> = self.leased.drain().map(|(_, entry)| entry).collect();
        leased.sort_by_key(|(id, _, _)| id.offset);
        let mut state = self.fake.lock();
        for entry in leased.into_iter().rev() {
            state.ready.push_front(entry);
        }
        drop(state);
        self.fake.wake.notify_waiters();
    }
}

#[tonic::async_trait]
impl proto::admin_server::Admin for Fake {
    async fn create_queue(
        &self,
        request: Request<proto::CreateQueueRequest>,
    ) -> Result<Response<proto::QueueInfo>, Status> {
        let request = request.into_inner();
        let mut state = self.lock();
        if state.queues.contains(&request.name) {
            return Err(Status::already_exists(format!("queue {} exists with other settings", request.name)));
        }
        state.queues.push(request.name.clone());
        Ok(Response::new(info(&request.name)))
    }

    async fn update_queue(
        &self,
        _request: Request<proto::UpdateQueueRequest>,
    ) -> Result<Response<proto::QueueInfo>, Status> {
        Err(Status::unimplemented("the fake has no update"))
    }

    async fn redrive(
        &self,
        _request: Request<proto::RedriveRequest>,
    ) -> Result<Response<proto::RedriveResponse>, Status> {
        Err(Status::unimplemented("the fake has no redrive"))
    }

    async fn get_queue(&self, request: Request<proto::GetQueueRequest>) -> Result<Response<proto::QueueInfo>, Status> {
        let name = request.into_inner().name;
        if self.lock().queues.contains(&name) {
            Ok(Response::new(info(&name)))
        } else {
            Err(Status::not_found(format!("queue {name} does not exist")))
        }
    }

    async fn list_queues(
        &self,
        _request: Request<proto::ListQueuesRequest>,
    ) -> Result<Response<proto::ListQueuesResponse>, Status> {
        let mut names = self.lock().queues.clone();
        names.sort();
        Ok(Response::new(proto::ListQueuesResponse { queues: names.iter().map(|name| info(name)).collect() }))
    }

    async fn delete_queue(
        &self,
        request: Request<proto::DeleteQueueRequest>,
    ) -> Result<Response<proto::DeleteQueueResponse>, Status> {
        let name = request.into_inner().name;
        let mut state = self.lock();
        let before = state.queues.len();
        state.queues.retain(|queue| *queue != name);
        if state.queues.len() == before {
            return Err(Status::not_found(format!("queue {name} does not exist")));
        }
        Ok(Response::new(proto::DeleteQueueResponse {}))
    }

    async fn purge_queue(
        &self,
        request: Request<proto::PurgeQueueRequest>,
    ) -> Result<Response<proto::PurgeQueueResponse>, Status> {
        let _ = request;
        let mut state = self.lock();
        let purged = state.ready.len() as u64;
        state.ready.clear();
        Ok(Response::new(proto::PurgeQueueResponse { purged }))
    }
}

/// The stats side of the fake (a newtype: watch tasks need the `Arc`).
struct StatsService(Arc<Fake>);

#[tonic::async_trait]
impl proto::stats_server::Stats for StatsService {
    async fn get_stats(&self, request: Request<proto::StatsRequest>) -> Result<Response<proto::StatsResponse>, Status> {
        self.0.stats(&request.into_inner().queue).map(Response::new)
    }

    type WatchStream = ReceiverStream<Result<proto::StatsResponse, Status>>;

    /// The broker's shape: the first snapshot at once, then one per
    /// interval; ends with UNAVAILABLE after `watch_snapshots` if set.
    async fn watch(&self, request: Request<proto::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let limit = {
            let mut state = self.0.lock();
            state.watches.push(request.interval_ms);
            state.watch_snapshots
        };
        let first = self.0.stats(&request.queue)?;
        let (outgoing, receiver) = mpsc::channel(1);
        let fake = self.0.clone();
        tokio::spawn(async move {
            let mut next = Ok(first);
            let mut sent = 0;
            loop {
                if limit == Some(sent) {
                    let _ = outgoing.send(Err(Status::unavailable("broker shutting down"))).await;
                    return;
                }
                if outgoing.send(next).await.is_err() {
                    return;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_millis(request.interval_ms)).await;
                next = fake.stats(&request.queue);
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// The fake's resolved view of a queue: the broker's documented defaults.
fn info(name: &str) -> proto::QueueInfo {
    proto::QueueInfo {
        name: name.to_owned(),
        settings: Some(proto::QueueSettings {
            lanes: vec!["high".into(), "normal".into(), "low".into()],
            lane_weights: vec![4, 2, 1],
            strict_priority: Some(false),
            default_lane: Some(1),
            lease_timeout_ms: Some(30_000),
            max_attempts: Some(5),
            dead_letter: Some(true),
            dedupe_window_ms: Some(300_000),
            message_size_max: Some(1 << 20),
            sync_policy: proto::SyncPolicy::Fsync.into(),
            sync_interval_ms: Some(100),
            ..proto::QueueSettings::default()
        }),
        dead_letter_queue: format!("{name}.dead"),
        lane_depths: vec![0, 2, 0],
        depth: 2,
        in_flight: 0,
        consumers: 0,
        created_at_ms: 1_700_000_000_000,
        ..proto::QueueInfo::default()
    }
}
