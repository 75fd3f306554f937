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

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use ballast_proto::v1::{self as proto, publisher_client::PublisherClient};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status,
    metadata::{MetadataKey, MetadataMap, MetadataValue},
};

use crate::{Error, client::Transport};

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
    session: tokio::sync::Mutex<Option<Session>>,
    /// The broker answered UNIMPLEMENTED: it predates the stream.
    unsupported: AtomicBool,
}

/// One open stream: where requests go and who waits for which answer.
#[derive(Debug)]
struct Session {
    requests: mpsc::Sender<proto::PublishStreamRequest>,
    replies: Arc<Mutex<Replies>>,
}

#[derive(Debug, Default)]
struct Replies {
    next_sequence: u64,
    waiting: HashMap<u64, Reply>,
    /// Set once the stream ended: why. No request is sent after it.
    ended: Option<Error>,
}

impl PublishStream {
    pub(crate) fn new(client: PublisherClient<Transport>, capacity: usize) -> PublishStream {
        let capacity = capacity.max(1);
        PublishStream { client, capacity, session: tokio::sync::Mutex::new(None), unsupported: AtomicBool::new(false) }
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
        let open = session.as_ref().is_some_and(|s| lock(&s.replies).ended.is_none());
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
        let (reply, answer) = oneshot::channel();
        replies.waiting.insert(sequence, reply);
        permit.send(proto::PublishStreamRequest { sequence, queue: queue.to_owned(), messages });
        Ok(answer)
    }

    /// Opens a stream and starts the task that reads its answers.
    async fn open(&self) -> Result<Session, Error> {
        let (requests, outbound) = mpsc::channel(self.capacity);
        let opened = self.client.clone().publish_stream(ReceiverStream::new(outbound)).await;
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
        let replies = Arc::new(Mutex::new(Replies::default()));
        tokio::spawn(read_answers(inbound, Arc::clone(&replies)));
        Ok(Session { requests, replies })
    }
}

/// Hands each answer to its request's waiter; when the stream ends, fails
/// every request still waiting with the reason.
async fn read_answers(mut inbound: tonic::Streaming<proto::PublishStreamResponse>, replies: Arc<Mutex<Replies>>) {
    let error = loop {
        match inbound.message().await {
            Ok(Some(response)) => {
                let waiter = lock(&replies).waiting.remove(&response.sequence);
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
    let waiting = {
        let mut replies = lock(&replies);
        replies.ended = Some(error.clone());
        std::mem::take(&mut replies.waiting)
    };
    for (_, waiter) in waiting {
        let _ = waiter.send(Err(error.clone()));
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
