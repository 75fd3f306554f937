//! `ballast-client`: the Rust client of the Ballast broker, and the `ballast`
//! command-line tool.
//!
//! A [`Client`] is a connection to one `ballastd`. From it:
//!
//! - [`Producer`] publishes messages: batched with a linger, every call
//!   bounded by a deadline, retried with exponential backoff and full jitter
//!   (never sooner than the broker's retry-after hint), each logical message
//!   carrying one idempotency key across all its retries so a retry is never
//!   stored twice, and a circuit breaker per queue so a dead or failing
//!   broker fails calls fast (a refusing broker is alive: its retry-after
//!   hint paces the retries instead). A node that stops answering with
//!   its connection up (paused, hung) is given up after the attempt
//!   timeout: a new stream, to the next address if the client has several.
//! - [`Consumer`] runs a handler for every delivery with a credit window and a
//!   concurrency limit, acks on success, nacks with a delay on failure,
//!   reconnects after a broker restart, and stops gracefully.
//! - [`Admin`] creates, inspects, lists, purges and deletes queues, and reads
//!   their saturation figures once ([`Admin::stats`]) or as a stream
//!   ([`Admin::watch_stats`]).
//!
//! Every failure is an [`Error`], which says whether a retry can help.
//!
//! A broker with an auth file wants a token on every call:
//! [`ClientConfig::token`] (or [`ClientConfig::token_file`]) sends it as
//! `authorization: Bearer <token>`; a refused token is
//! [`Error::Unauthenticated`], a refused action [`Error::PermissionDenied`].
//!
//! Saturation is a first-class signal: every [`Receipt`] carries how full
//! the queue and the message's lane were right after the publish
//! ([`Saturation`]: depth, bytes, fraction of the limits, oldest age, drain
//! estimate, rates), so a producer can slow down before the broker refuses;
//! and a refusal ([`Error::ResourceExhausted`]) carries the retry-after hint
//! and the figures behind it ([`Refusal`]).
//!
//! ```no_run
//! use ballast_client::{Client, ConsumerConfig, Delivery, Message, ProducerConfig, QueueSettings};
//!
//! # async fn example() -> Result<(), ballast_client::Error> {
//! let client = Client::connect("http://127.0.0.1:7400").await?;
//! client.admin().create_queue("emails", QueueSettings::default()).await?;
//!
//! let producer = client.producer(ProducerConfig::default())?;
//! let receipt = producer.publish("emails", Message::new("welcome, ada")).await?;
//! println!("stored at {}", receipt.id);
//!
//! let consumer = client.consumer("emails", ConsumerConfig::default())?;
//! let handle = consumer.spawn(|delivery: Delivery| async move {
//!     println!("sending {:?}", delivery.payload);
//!     Ok::<(), std::io::Error>(())
//! });
//! # tokio::time::sleep(std::time::Duration::from_secs(1)).await;
//! let stats = handle.stop().await?;
//! println!("acked {}", stats.acked);
//! # Ok(())
//! # }
//! ```
//!
//! Layout, in reading order:
//!
//! - [`contract`]: what the client assumes of the broker beyond the proto
//!   (default address, retry-after, retryable codes, credit rules), in one
//!   place.
//! - `error`: [`Error`], [`Refusal`].
//! - `client`: [`Client`], [`ClientConfig`].
//! - `tls`: [`TlsConfig`], [`Pem`]: the CA and client certificate of a TLS
//!   connection, and TLS failures told apart from others ([`Error::Tls`]).
//! - `message`: [`Message`], [`Receipt`], [`MessageId`], idempotency keys.
//! - `stats`: [`Saturation`], [`BrokerStats`], [`QueueStats`], [`LaneStats`],
//!   [`StatsWatch`].
//! - `producer`: [`Producer`], [`ProducerConfig`], [`PendingReceipt`].
//! - `consumer`: [`Consumer`], [`ConsumerConfig`], [`Delivery`],
//!   [`NackPolicy`], [`ConsumerHandle`], [`Stopper`].
//! - `admin` and `queue`: [`Admin`], [`QueueSettings`], [`QueueInfo`].
//! - `otel` (feature `otel`, off by default): W3C trace context injected on
//!   publish, a consumer span linked to it around each handler.
//! - `backoff`, `breaker`, `retry`, `clock`: the retry machinery, reusable
//!   on its own ([`Backoff`], [`RetryPolicy`], [`CircuitBreaker`]).
//!
//! Invariants:
//!
//! - No prost type appears in the public API; conversions happen at the edge
//!   of each module.
//! - A message's idempotency key is fixed before its first attempt and never
//!   changes across retries.
//! - A consumer never acks a delivery id on a session other than the one that
//!   delivered it, and never holds more than `prefetch` credit plus unacked
//!   deliveries.
//! - Everything that queues is bounded (the producer's pending channel, its
//!   in-flight batches, the consumer's window).

mod admin;
mod backoff;
mod breaker;
mod client;
mod clock;
mod consumer;
pub mod contract;
mod error;
mod leader;
mod message;
#[cfg(feature = "otel")]
pub mod otel;
mod producer;
mod publish_stream;
mod queue;
mod retry;
mod stats;
mod tls;

#[cfg(test)]
mod fake;

/// The README's Rust examples, compiled as doc tests so the tour cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

pub use admin::{Admin, AdminConfig, Redriven};
pub use backoff::{Backoff, RetryPolicy};
pub use breaker::{BreakerConfig, BreakerRefusal, BreakerState, CircuitBreaker, Permit};
pub use client::{Client, ClientConfig};
pub use clock::{Clock, SystemClock};
pub use consumer::{
    Consumer, ConsumerConfig, ConsumerHandle, ConsumerStats, Delivery, LeaseExtension, NackPolicy, Stopper,
};
pub use error::{Error, Refusal};
pub use message::{Message, MessageId, PeekPage, PeekedMessage, Receipt, generate_idempotency_key};
pub use producer::{PendingReceipt, Producer, ProducerConfig};
pub use queue::{ExpiredAction, QueueInfo, QueueSettings, SyncPolicy};
pub use stats::{BrokerStats, ClusterStatus, LaneStats, QueueStats, Saturation, StatsWatch};
pub use tls::{Pem, TlsConfig};
