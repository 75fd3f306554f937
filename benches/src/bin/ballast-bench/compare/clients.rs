//! The three systems behind one interface: a durable queue made fresh, a
//! publisher that hands back a future of each message's durable ack, and a
//! consumer that acks what it receives.
//!
//! | | queue | publish ack | consume |
//! | --- | --- | --- | --- |
//! | Ballast | a queue of the scenario's sync policy | `Producer` receipt | `Consumer`, prefetch as credit |
//! | Ballast raw | the same | a unary `Publish` call | a raw `Consume` stream, prefetch as credit |
//! | NATS | a file-storage JetStream stream | JetStream `PubAck` | pull consumer, `max_ack_pending` and pull batches of the prefetch, explicit acks |
//! | RabbitMQ | a durable quorum (or classic) queue | publisher confirm | `basic.qos` prefetch, acks with `multiple` |
//!
//! Every consumer acks as it goes, in chunks of a quarter of the prefetch
//! where the protocol allows it (Ballast's `Consumer` batches acks on its
//! own; RabbitMQ acks with `multiple`; JetStream acks each message, as its
//! explicit ack policy asks).

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use ballast_client::{Client, ConsumerConfig, Message, Producer, ProducerConfig};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::{
    Sync,
    broker::{Channel, Target},
    load,
};
use ballast_proto::v1::{self as pb, publisher_client::PublisherClient};

/// What a consumer calls with each payload it receives.
pub type OnPayload = Arc<dyn Fn(&[u8]) + Send + std::marker::Sync>;

/// A message sent and not yet acknowledged as stored: resolves once it is.
pub type Pending = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// Longest wait for a consumer to receive everything it expects after
/// the last delivery came (a stall this long is a failure, not a figure).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Ballast's queue, JetStream's stream and subject, RabbitMQ's queue.
pub const QUEUE: &str = "bench-compare";
const NATS_STREAM: &str = "BENCH_COMPARE";

/// How RabbitMQ stores the queue (`--rabbitmq-queue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RabbitQueue {
    /// Raft-replicated, fsynced before confirms (one node here).
    Quorum,
    /// A durable classic queue of persistent messages.
    Classic,
}

/// A connection-level handle on one of the three systems.
#[derive(Debug, Clone)]
pub enum System {
    /// Through the client library.
    Ballast {
        endpoint: String,
    },
    /// Through the generated stubs: what the broker does without the
    /// client library's costs (the diagnostic row beside Ballast's).
    BallastRaw {
        /// One connection per producer.
        publish: Vec<Channel>,
        /// The consumer's connection.
        consume: Channel,
    },
    Nats {
        addr: String,
    },
    Rabbitmq {
        uri: String,
        queue: RabbitQueue,
    },
}

impl System {
    /// The name in tables and JSON.
    pub fn name(&self) -> &'static str {
        match self {
            System::Ballast { .. } => "ballast",
            System::BallastRaw { .. } => "ballast_raw",
            System::Nats { .. } => "nats",
            System::Rabbitmq { .. } => "rabbitmq",
        }
    }

    /// Deletes the system's queue (with whatever it holds) and creates it
    /// again, empty.
    pub async fn fresh_queue(&self, target: &Target, sync: Sync) -> anyhow::Result<()> {
        match self {
            System::Ballast { .. } | System::BallastRaw { .. } => {
                // Limits out of the way: this measures speed, not admission.
                let settings = ballast_proto::v1::QueueSettings {
                    max_messages: Some(1_000_000_000_000),
                    max_bytes: Some(1 << 50),
                    ..sync.settings()
                };
                target.fresh_queue(QUEUE, settings).await
            }
            System::Nats { addr } => {
                let js = async_nats::jetstream::new(async_nats::connect(addr.as_str()).await?);
                let _ = js.delete_stream(NATS_STREAM).await;
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: NATS_STREAM.into(),
                    subjects: vec![QUEUE.into()],
                    storage: async_nats::jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .context("creating the JetStream stream")?;
                Ok(())
            }
            System::Rabbitmq { uri, queue } => {
                let connection = rabbitmq_connect(uri).await?;
                let channel = connection.create_channel().await?;
                let _ = channel.queue_delete(QUEUE, lapin::options::QueueDeleteOptions::default()).await;
                let mut arguments = lapin::types::FieldTable::default();
                let kind = match queue {
                    RabbitQueue::Quorum => "quorum",
                    RabbitQueue::Classic => "classic",
                };
                arguments.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString(kind.into()));
                let options = lapin::options::QueueDeclareOptions { durable: true, ..Default::default() };
                channel.queue_declare(QUEUE, options, arguments).await.context("declaring the RabbitMQ queue")?;
                let _ = connection.close(200, "done").await;
                Ok(())
            }
        }
    }

    /// The `index`th publisher, on a connection of its own, that may keep
    /// `window` messages unacknowledged (`linger` is the Ballast
    /// `Producer`'s).
    pub async fn publisher(
        &self,
        index: usize,
        window: usize,
        batch: usize,
        linger: Duration,
    ) -> anyhow::Result<Publisher> {
        Ok(match self {
            System::Ballast { endpoint } => {
                let client = Client::connect(endpoint).await?;
                let config = ProducerConfig {
                    linger,
                    batch_count_max: batch,
                    in_flight_batches_max: window.div_ceil(batch).max(1),
                    pending_count_max: window.max(1),
                    ..ProducerConfig::default()
                };
                Publisher::Ballast(Arc::new(client.producer(config)?))
            }
            System::BallastRaw { publish, .. } => {
                let channel = publish.get(index % publish.len().max(1)).context("no raw publish connection")?;
                Publisher::BallastRaw(PublisherClient::new(channel.clone()))
            }
            System::Nats { addr } => {
                let client = async_nats::connect(addr.as_str()).await?;
                let js = async_nats::jetstream::context::ContextBuilder::new().max_ack_inflight(window.max(1));
                Publisher::Nats(js.build(client))
            }
            System::Rabbitmq { uri, .. } => {
                let connection = rabbitmq_connect(uri).await?;
                let channel = connection.create_channel().await?;
                channel.confirm_select(lapin::options::ConfirmSelectOptions::default()).await?;
                Publisher::Rabbitmq { _connection: Arc::new(connection), channel }
            }
        })
    }

    /// Receives `count` messages with at most `prefetch` unacknowledged,
    /// acking them, calling `on_payload` with each. The queue must exist.
    pub async fn consume(&self, count: u64, prefetch: u32, on_payload: OnPayload) -> anyhow::Result<()> {
        match self {
            System::Ballast { endpoint } => consume_ballast(endpoint, count, prefetch, on_payload).await,
            System::BallastRaw { consume, .. } => {
                let on_delivery: load::OnDelivery = Arc::new(move |delivery| on_payload(&delivery.payload));
                load::consume(std::slice::from_ref(consume), QUEUE, 1, prefetch, count, on_delivery).await?;
                Ok(())
            }
            System::Nats { addr } => consume_nats(addr, count, prefetch, on_payload).await,
            System::Rabbitmq { uri, .. } => consume_rabbitmq(uri, count, prefetch, on_payload).await,
        }
    }
}

/// One producer connection of a system.
#[derive(Clone)]
pub enum Publisher {
    Ballast(Arc<Producer>),
    BallastRaw(PublisherClient<Channel>),
    Nats(async_nats::jetstream::Context),
    Rabbitmq {
        /// Kept open as long as the channel is used.
        _connection: Arc<lapin::Connection>,
        channel: lapin::Channel,
    },
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Publisher::Ballast(_) => "Publisher::Ballast",
            Publisher::BallastRaw(_) => "Publisher::BallastRaw",
            Publisher::Nats(_) => "Publisher::Nats",
            Publisher::Rabbitmq { .. } => "Publisher::Rabbitmq",
        })
    }
}

impl Publisher {
    /// Sends one durable message; the returned future resolves once the
    /// system acknowledged it (Ballast: receipt after the sync policy, the
    /// raw call's answer;
    /// NATS: `PubAck`; RabbitMQ: a positive confirm).
    pub async fn send(&self, payload: Bytes) -> anyhow::Result<Pending> {
        match self {
            Publisher::Ballast(producer) => {
                let receipt = producer.submit(QUEUE, Message::new(payload)).await?;
                Ok(Box::pin(async move {
                    receipt.wait().await?;
                    Ok(())
                }))
            }
            Publisher::BallastRaw(client) => {
                // The call is the ack: it runs as a task of its own so the
                // caller can keep several going.
                let mut client = client.clone();
                let message = pb::Message { payload, ..Default::default() };
                let call = tokio::spawn(async move {
                    client.publish(pb::PublishRequest { queue: QUEUE.into(), message: Some(message) }).await
                });
                Ok(Box::pin(async move {
                    call.await??;
                    Ok(())
                }))
            }
            Publisher::Nats(js) => {
                let ack = js.publish(QUEUE, payload).await?;
                Ok(Box::pin(async move {
                    ack.await?;
                    Ok(())
                }))
            }
            Publisher::Rabbitmq { channel, .. } => {
                let properties = lapin::BasicProperties::default().with_delivery_mode(2);
                let options = lapin::options::BasicPublishOptions::default();
                let confirm = channel.basic_publish("", QUEUE, options, &payload, properties).await?;
                Ok(Box::pin(async move {
                    let confirmation = confirm.await?;
                    anyhow::ensure!(confirmation.is_ack(), "RabbitMQ did not confirm a publish: {confirmation:?}");
                    Ok(())
                }))
            }
        }
    }

    /// Sends `count` copies of `payload`, keeping at most `window`
    /// unacknowledged, and waits for every ack.
    pub async fn send_all(&self, count: u64, payload: Bytes, window: usize) -> anyhow::Result<()> {
        let mut pending = VecDeque::with_capacity(window);
        for _ in 0..count {
            pending.push_back(self.send(payload.clone()).await?);
            if pending.len() >= window {
                pending.pop_front().expect("the window is not empty").await?;
            }
        }
        for ack in pending {
            ack.await?;
        }
        Ok(())
    }
}

/// The AMQP connection options: lapin on the bench's tokio runtime.
async fn rabbitmq_connect(uri: &str) -> anyhow::Result<lapin::Connection> {
    let properties = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    Ok(lapin::Connection::connect(uri, properties).await?)
}

/// Connects to a started RabbitMQ (used to know it is ready).
pub async fn rabbitmq_ready(uri: &str) -> anyhow::Result<()> {
    let connection = rabbitmq_connect(uri).await?;
    let _ = connection.close(200, "ready").await;
    Ok(())
}

/// Connects to a started NATS (used to know it is ready: with `-js` the
/// server enables JetStream before it accepts clients). Not JetStream's
/// account query: 2.9's answer does not parse with this client.
pub async fn nats_ready(addr: &str) -> anyhow::Result<()> {
    async_nats::connect(addr).await?;
    Ok(())
}

async fn consume_ballast(endpoint: &str, count: u64, prefetch: u32, on_payload: OnPayload) -> anyhow::Result<()> {
    let client = Client::connect(endpoint).await?;
    let config = ConsumerConfig {
        prefetch,
        // Handlers do nothing: never let them be what limits the pace.
        concurrency: prefetch as usize,
        max_messages: Some(count),
        ..ConsumerConfig::default()
    };
    let seen = Arc::new(AtomicU64::new(0));
    let consumer = client.consumer(QUEUE, config)?.spawn({
        let seen = Arc::clone(&seen);
        move |delivery| {
            on_payload(&delivery.payload);
            seen.fetch_add(1, Ordering::Relaxed);
            async { Ok::<(), Infallible>(()) }
        }
    });
    // A watchdog, as the other consumers have in their receive loops: a
    // consumer that stops receiving fails the run instead of hanging it.
    let stopper = consumer.stopper();
    let mut join = std::pin::pin!(consumer.join());
    let (mut count_then, mut since) = (0, std::time::Instant::now());
    loop {
        tokio::select! {
            result = &mut join => {
                result?;
                return Ok(());
            }
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                let received = seen.load(Ordering::Relaxed);
                if received != count_then {
                    (count_then, since) = (received, std::time::Instant::now());
                } else if since.elapsed() >= STALL_TIMEOUT {
                    stopper.stop();
                    anyhow::bail!("Ballast delivered {received} of {count} messages, then nothing");
                }
            }
        }
    }
}

async fn consume_nats(addr: &str, count: u64, prefetch: u32, on_payload: OnPayload) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    let js = async_nats::jetstream::new(async_nats::connect(addr).await?);
    let stream = js.get_stream(NATS_STREAM).await?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("bench".into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: i64::from(prefetch),
            ..Default::default()
        })
        .await
        .context("creating the pull consumer")?;
    let mut messages = consumer.stream().max_messages_per_batch(prefetch as usize).messages().await?;
    let mut received = 0;
    while received < count {
        let message = tokio::time::timeout(STALL_TIMEOUT, messages.next())
            .await
            .with_context(|| format!("NATS delivered {received} of {count} messages, then nothing"))?
            .context("the NATS message stream ended")?
            .map_err(|error| anyhow::anyhow!("NATS pull: {error}"))?;
        on_payload(&message.payload);
        message.ack().await.map_err(|error| anyhow::anyhow!("NATS ack: {error}"))?;
        received += 1;
    }
    Ok(())
}

async fn consume_rabbitmq(uri: &str, count: u64, prefetch: u32, on_payload: OnPayload) -> anyhow::Result<()> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let connection = rabbitmq_connect(uri).await?;
    let channel = connection.create_channel().await?;
    let prefetch = u16::try_from(prefetch).context("RabbitMQ's prefetch is at most 65,535")?;
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(QUEUE, "bench", BasicConsumeOptions::default(), lapin::types::FieldTable::default())
        .await?;
    let chunk = u64::from(prefetch / 4).max(1);
    let (mut received, mut unacked) = (0u64, 0u64);
    let mut last: Option<lapin::acker::Acker> = None;
    let ack = BasicAckOptions { multiple: true };
    while received < count {
        let next = match tokio::time::timeout(Duration::from_millis(5), consumer.next()).await {
            Ok(next) => next,
            Err(_idle) => {
                // Nothing came for a moment: ack what is held.
                if let Some(acker) = last.take() {
                    acker.ack(ack).await?;
                    unacked = 0;
                }
                tokio::time::timeout(STALL_TIMEOUT, consumer.next())
                    .await
                    .with_context(|| format!("RabbitMQ delivered {received} of {count} messages, then nothing"))?
            }
        };
        let delivery = next.context("the RabbitMQ consumer was cancelled")??;
        on_payload(&delivery.data);
        received += 1;
        unacked += 1;
        last = Some(delivery.acker);
        if unacked >= chunk {
            last.take().expect("a delivery was just held").ack(ack).await?;
            unacked = 0;
        }
    }
    if let Some(acker) = last {
        acker.ack(ack).await?;
    }
    let _ = connection.close(200, "done").await;
    Ok(())
}
