//! The [`Producer`](crate::Producer)'s PublishStream: one long-lived stream
//! per producer that carries every batch as a request and brings each
//! answer back by its sequence number.
//!
//! Why: a unary call per batch costs an HTTP/2 stream, request and
//! response headers and a server task each time; on the stream a batch
//! costs one message each way. Semantics are PublishBatch's (the broker
//! answers each request exactly as that call would), so retries, keys and
//! the breaker above are unchanged.
//!
//! The stream is opened on first use and again after it ended (broker
//! restart, connection loss): every request in flight on an ended stream
//! fails with the error that ended it, which the producer's retries treat
//! like a failed unary call. Against a broker that does not know the call
//! (UNIMPLEMENTED) the producer falls back to the unary calls for good.
//!
//! A stream also ends when it stalls: requests are outstanding and the
//! node has sent no answer of any kind for `stall_after` (the producer's
//! attempt timeout), or a new stream's headers do not come within it. That
//! is a node paused or hung with its connection up, which no transport
//! error would ever report. Every request still waiting fails with a
//! retryable UNAVAILABLE that says the stream stalled, the node is
//! reported to the client's leader following ([`Route::stalled`]: the next
//! seed gets the next stream), and the next attempt opens a new stream.
//! One slow request among answered ones is no stall: answers arriving mean
//! the node is alive.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use ballast_proto::v1::{self as proto, publisher_client::PublisherClient};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
};

use crate::{Error, client::Transport, leader::Route};

/// A reply to one request: its response or the error that ended the stream.
type Reply = oneshot::Sender<Result<proto::PublishStreamResponse, Error>>;

/// What a stream attempt came to.
#[derive(Debug)]
pub(crate) enum Sent {
    /// The broker's answer, or the attempt's error.
    Answered(Result<Vec<proto::Receipt>, Error>),
    /// The broker has no PublishStream: nothing was sent; the messages,
    /// for a unary call.
    Unsupported(Vec<proto::Message>),
}

/// The producer's stream, opened on demand.
#[derive(Debug)]
pub(crate) struct PublishStream {
    client: PublisherClient<Transport>,
    /// Requests queued for the stream at most (the producer's batches in
    /// flight: each has at most one attempt outstanding).
    capacity: usize,
    /// How long a stream may leave requests without any answer (or a new
    /// stream without its headers) before it is abandoned as stalled.
    stall_after: Duration,
    session: tokio::sync::Mutex<Option<Session>>,
    /// The broker answered UNIMPLEMENTED: it predates the stream.
    unsupported: AtomicBool,
}

/// One open stream: where requests go and who waits for which answer.
#[derive(Debug)]
struct Session {
    requests: mpsc::Sender<proto::PublishStreamRequest>,
    replies: Arc<Mutex<Replies>>,
    /// The node the stream went to, reported if it stalls.
    route: Route,
}

#[derive(Debug)]
struct Replies {
    next_sequence: u64,
    waiting: HashMap<u64, Reply>,
    /// The last sign of life while requests were outstanding: the last
    /// answer, or the request sent when none was waiting.
    heard: Instant,
    /// Set once the stream ended: why. No request is sent after it.
    ended: Option<Error>,
}

impl PublishStream {
    /// A stream of `capacity` requests at most, abandoned as stalled after
    /// `stall_after` without an answer.
    pub(crate) fn new(client: PublisherClient<Transport>, capacity: usize, stall_after: Duration) -> PublishStream {
        let capacity = capacity.max(1);
        PublishStream {
            client,
            capacity,
            stall_after,
            session: tokio::sync::Mutex::new(None),
            unsupported: AtomicBool::new(false),
        }
    }

    /// Whether the broker lacks the stream (then use the unary calls).
    pub(crate) fn unsupported(&self) -> bool {
        self.unsupported.load(Ordering::Relaxed)
    }

    /// Publishes one batch as a stream request and waits for its answer:
    /// the receipts, or the error PublishBatch would have returned. An
    /// attempt given up (dropped) leaves its answer to be discarded.
    /// Against a broker without the stream nothing is sent and the
    /// messages come back, for a unary call.
    pub(crate) async fn publish(&self, queue: &str, messages: Vec<proto::Message>) -> Sent {
        let reply = match self.send(queue, messages).await {
            Ok(reply) => reply,
            Err((_, messages)) if self.unsupported() => return Sent::Unsupported(messages),
            Err((error, _)) => return Sent::Answered(Err(error)),
        };
        let answer = match reply.await {
            Ok(Ok(response)) => match response.error {
                Some(error) => Err(error_of(error)),
                None => Ok(response.receipts),
            },
            Ok(Err(error)) => Err(error),
            Err(_) => Err(Error::Unavailable { message: "the publish stream ended".into() }),
        };
        Sent::Answered(answer)
    }

    /// Queues the request on the open stream (opening one first if need
    /// be); on failure, the error and the messages, which were not sent.
    async fn send(
        &self,
        queue: &str,
        messages: Vec<proto::Message>,
    ) -> Result<oneshot::Receiver<Result<proto::PublishStreamResponse, Error>>, (Error, Vec<proto::Message>)> {
        let mut session = self.session.lock().await;
        // A stall the reading task has not acted on yet (its timer and an
        // attempt's timeout fall at the same moment) ends the stream here.
        let open = session.as_ref().is_some_and(|s| !s.stall(self.stall_after));
        if !open {
            match self.open().await {
                Ok(opened) => *session = Some(opened),
                Err(error) => return Err((error, messages)),
            }
        }
        let Some(session) = session.as_ref() else { return Err((Error::Closed, messages)) };
        // Room first (the HTTP/2 stream's flow control may hold the queue
        // full), then the sequence: answers match requests in the order sent.
        let Ok(permit) = session.requests.reserve().await else {
            return Err((Error::Unavailable { message: "the publish stream ended".into() }, messages));
        };
        let mut replies = lock(&session.replies);
        if let Some(error) = &replies.ended {
            return Err((error.clone(), messages));
        }
        let sequence = replies.next_sequence;
        replies.next_sequence += 1;
        if replies.waiting.is_empty() {
            // Silence counts from the first request outstanding.
            replies.heard = Instant::now();
        }
        let (reply, answer) = oneshot::channel();
        replies.waiting.insert(sequence, reply);
        permit.send(proto::PublishStreamRequest { sequence, queue: queue.to_owned(), messages });
        Ok(answer)
    }

    /// Opens a stream and starts the task that reads its answers. A node
    /// that does not answer within `stall_after` is reported stalled.
    async fn open(&self) -> Result<Session, Error> {
        let (requests, outbound) = mpsc::channel(self.capacity);
        let route = Route::default();
        let mut request = tonic::Request::new(ReceiverStream::new(outbound));
        request.extensions_mut().insert(route.clone());
        // The call runs in a task of its own, so a silent node is reported
        // even when the attempt that opened it gives up first (its timeout
        // started a little earlier).
        let (mut client, stall_after, called) = (self.client.clone(), self.stall_after, route.clone());
        let opening = tokio::spawn(async move {
            let opened = tokio::time::timeout(stall_after, client.publish_stream(request)).await;
            if opened.is_err() {
                called.stalled();
            }
            opened
        });
        let opened = match opening.await {
            Ok(Ok(opened)) => opened,
            Ok(Err(_elapsed)) => return Err(stalled(&route, self.stall_after, "opening the publish stream")),
            Err(error) => {
                return Err(Error::Protocol { message: format!("opening the publish stream failed: {error}") });
            }
        };
        let inbound = match opened {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let error = Error::from_status(status);
                if matches!(error, Error::Broker { code: Code::Unimplemented, .. }) {
                    self.unsupported.store(true, Ordering::Relaxed);
                }
                return Err(error);
            }
        };
        let replies = Arc::new(Mutex::new(Replies {
            next_sequence: 0,
            waiting: HashMap::new(),
            heard: Instant::now(),
            ended: None,
        }));
        let session = Session { requests, replies, route };
        tokio::spawn(read_answers(inbound, session.watch(), self.stall_after));
        Ok(session)
    }
}

impl Session {
    /// What the task reading the answers needs of the session: not the
    /// request sender, whose drop closes the stream.
    fn watch(&self) -> Watch {
        Watch { replies: Arc::clone(&self.replies), route: self.route.clone() }
    }

    /// Whether the stream ended, ending it first if it stalled.
    fn stall(&self, stall_after: Duration) -> bool {
        stall(&self.replies, &self.route, stall_after)
    }
}

/// The reading task's view of a session.
struct Watch {
    replies: Arc<Mutex<Replies>>,
    route: Route,
}

/// Hands each answer to its request's waiter; when the stream ends, fails
/// every request still waiting with the reason. Ends the stream when it
/// stalls (no answer for `stall_after` while requests wait).
async fn read_answers(
    mut inbound: tonic::Streaming<proto::PublishStreamResponse>,
    watch: Watch,
    stall_after: Duration,
) {
    let Watch { replies, route } = watch;
    let error = loop {
        let silent_until = {
            let replies = lock(&replies);
            // Nothing waiting: look again later (a request sent meanwhile
            // moves `heard`, so this wakes early at most once per period).
            if replies.waiting.is_empty() { Instant::now() + stall_after } else { replies.heard + stall_after }
        };
        // `message` is cancel safe: an answer half read stays in `inbound`.
        let message = tokio::select! {
            message = inbound.message() => message,
            () = tokio::time::sleep_until(silent_until) => {
                if stall(&replies, &route, stall_after) {
                    return;
                }
                continue;
            }
        };
        match message {
            Ok(Some(response)) => {
                let waiter = {
                    let mut replies = lock(&replies);
                    replies.heard = Instant::now();
                    replies.waiting.remove(&response.sequence)
                };
                match waiter {
                    // A waiter that gave up has dropped its receiver.
                    Some(waiter) => drop(waiter.send(Ok(response))),
                    None => {
                        break Error::Protocol {
                            message: format!("the broker answered publish stream request {} twice", response.sequence),
                        };
                    }
                }
            }
            Ok(None) => break Error::Unavailable { message: "the broker ended the publish stream".into() },
            Err(status) => break Error::from_status(status),
        }
    };
    end(&mut lock(&replies), error);
}

/// Whether the stream ended; if it has just stalled (requests waiting, no
/// answer for `stall_after`), ends it, failing them, and reports the node.
fn stall(replies: &Mutex<Replies>, route: &Route, stall_after: Duration) -> bool {
    let mut replies = lock(replies);
    if replies.ended.is_some() {
        return true;
    }
    if replies.waiting.is_empty() || replies.heard.elapsed() < stall_after {
        return false;
    }
    let waiting = replies.waiting.len();
    end(&mut replies, stalled(route, stall_after, &format!("{waiting} requests unanswered")));
    drop(replies);
    route.stalled();
    true
}

/// Ends the stream (if it has not ended yet) with `error`, which every
/// request still waiting gets.
fn end(replies: &mut Replies, error: Error) {
    if replies.ended.is_some() {
        return;
    }
    for (_, waiter) in replies.waiting.drain() {
        let _ = waiter.send(Err(error.clone()));
    }
    replies.ended = Some(error);
}

/// The retryable error of a stream that stalled while `doing`.
fn stalled(route: &Route, stall_after: Duration, doing: &str) -> Error {
    let node = route.addr().unwrap_or("the broker");
    Error::Unavailable {
        message: format!(
            "the publish stream to {node} stalled: {doing}, no answer for {stall_after:?}; \
             the next attempt opens a new stream (to the next address, if the client has several)"
        ),
    }
}

/// The error a failed request carries, read as the unary call's status.
fn error_of(error: proto::PublishError) -> Error {
    let mut metadata = MetadataMap::new();
    for (key, value) in error.metadata {
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_str()))
        {
            metadata.insert(key, value);
        }
    }
    Error::from_status(Status::with_metadata(Code::from_i32(error.code), error.message, metadata))
}

fn lock(replies: &Mutex<Replies>) -> std::sync::MutexGuard<'_, Replies> {
    replies.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
