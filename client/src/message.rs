//! [`Message`] (what a producer publishes), [`Receipt`] and [`MessageId`]
//! (what the broker answers), and idempotency keys.

use std::{collections::BTreeMap, fmt, time::Duration};

use ballast_proto::v1 as proto;
use bytes::Bytes;

use crate::{Error, Saturation, contract};

/// A message to publish: payload, headers, lane, delay and idempotency key.
///
/// Without an explicit key the producer generates one when the message is
/// published ([`generate_idempotency_key`]) and reuses it on every retry of
/// that publish. Set a key yourself when your own code may publish the same
/// logical message twice (for example after a crash), so the broker stores it
/// once.
///
/// ```
/// use std::time::Duration;
/// use ballast_client::Message;
///
/// let message = Message::new("charge order 42")
///     .with_lane(0)
///     .with_header("content-type", "text/plain")
///     .with_delay(Duration::from_secs(30))
///     .with_idempotency_key("order-42-charge");
/// assert_eq!(message.lane(), Some(0));
/// assert_eq!(message.idempotency_key(), Some("order-42-charge"));
/// assert_eq!(&message.payload()[..], b"charge order 42");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    payload: Bytes,
    headers: BTreeMap<String, String>,
    idempotency_key: Option<String>,
    lane: Option<u32>,
    delay: Duration,
    ttl: Option<Duration>,
}

impl Message {
    /// A message with this payload, no headers, the queue's default lane, no
    /// delay and a key generated at publish time.
    pub fn new(payload: impl Into<Bytes>) -> Message {
        Message { payload: payload.into(), ..Message::default() }
    }

    /// Adds (or replaces) a header. Names starting with `ballast-` are
    /// reserved for the broker and refused at publish.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Message {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Publishes to lane `lane` (0 is the highest priority) instead of the
    /// queue's default lane.
    pub fn with_lane(mut self, lane: u32) -> Message {
        self.lane = Some(lane);
        self
    }

    /// Delivers no earlier than `delay` after the broker stores the message
    /// (millisecond precision, at most [`contract::DELAY_MAX`]).
    pub fn with_delay(mut self, delay: Duration) -> Message {
        self.delay = delay;
        self
    }

    /// Expires the message `ttl` after the broker stores it (millisecond
    /// precision, at most [`contract::MESSAGE_TTL_MAX`]): past it, it is
    /// never delivered but dead-lettered with reason `expired` or dropped,
    /// as the queue's `expired_action` says. The queue's own
    /// `message_ttl` applies too; the earlier deadline wins. Stored as the
    /// header `ballast-expires-at` (Unix ms), which takes one of the
    /// message's headers and is delivered with it.
    pub fn with_ttl(mut self, ttl: Duration) -> Message {
        self.ttl = Some(ttl);
        self
    }

    /// Uses this idempotency key (at most 256 bytes) instead of a generated
    /// one.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Message {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The headers.
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// The lane, if one was chosen.
    pub fn lane(&self) -> Option<u32> {
        self.lane
    }

    /// The delivery delay.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// The message's own time to live, if one was set.
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// The idempotency key, if one was set.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }

    /// Checks what the client can check without the broker: key size,
    /// reserved header names and the delay ceiling.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if let Some(key) = &self.idempotency_key {
            if key.is_empty() {
                return Err(Error::InvalidArgument { message: "idempotency key is empty".into() });
            }
            if key.len() > contract::IDEMPOTENCY_KEY_SIZE_MAX {
                return Err(Error::InvalidArgument {
                    message: format!(
                        "idempotency key is {} bytes; the limit is {}",
                        key.len(),
                        contract::IDEMPOTENCY_KEY_SIZE_MAX
                    ),
                });
            }
        }
        if let Some(name) = self.headers.keys().find(|name| name.starts_with(contract::RESERVED_HEADER_PREFIX)) {
            return Err(Error::InvalidArgument {
                message: format!("header {name:?} uses the reserved prefix {:?}", contract::RESERVED_HEADER_PREFIX),
            });
        }
        if self.delay > contract::DELAY_MAX {
            return Err(Error::InvalidArgument {
                message: format!(
                    "delay is {}ms; the limit is {}ms",
                    self.delay.as_millis(),
                    contract::DELAY_MAX.as_millis()
                ),
            });
        }
        if let Some(ttl) = self.ttl
            && (ttl > contract::MESSAGE_TTL_MAX || ttl.is_zero())
        {
            return Err(Error::InvalidArgument {
                message: format!(
                    "ttl is {}ms; it must be in 1..={}ms",
                    ttl.as_millis(),
                    contract::MESSAGE_TTL_MAX.as_millis()
                ),
            });
        }
        Ok(())
    }

    /// The wire form, with `key` as its idempotency key. Called once per
    /// logical message; every retry sends the same wire message.
    /// With the `otel` feature, the current span's context is added as
    /// `traceparent`/`tracestate` here, on the publishing task (see
    /// [`crate::otel`]).
    pub(crate) fn into_proto(self, key: String) -> proto::Message {
        #[allow(unused_mut, reason = "written only with the otel feature")]
        let mut headers = self.headers;
        #[cfg(feature = "otel")]
        crate::otel::inject_current(&mut headers);
        proto::Message {
            payload: self.payload,
            headers: headers.into_iter().collect(),
            idempotency_key: key,
            lane: self.lane,
            delay_ms: u64::try_from(self.delay.as_millis()).unwrap_or(u64::MAX),
            ttl_ms: self.ttl.map_or(0, |ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// Generates an idempotency key: 128 random bits from the operating system,
/// as 32 lower-case hex digits.
///
/// ```
/// let key = ballast_client::generate_idempotency_key();
/// assert_eq!(key.len(), 32);
/// assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
/// assert_ne!(key, ballast_client::generate_idempotency_key());
/// ```
pub fn generate_idempotency_key() -> String {
    const BYTES: usize = contract::IDEMPOTENCY_KEY_BITS as usize / 8;
    let mut bits = [0u8; BYTES];
    if getrandom::fill(&mut bits).is_err() {
        // The OS source failing is practically unheard of on supported
        // platforms; fastrand is seeded from OS randomness per thread, which
        // still makes collisions within a dedupe window vanishingly unlikely.
        bits = fastrand::u128(..).to_le_bytes();
    }
    let mut key = String::with_capacity(BYTES * 2);
    for byte in bits {
        key.push(char::from(HEX[usize::from(byte >> 4)]));
        key.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    key
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Where the broker stored a message: its lane and its offset in the lane's
/// log. Displayed as `lane:offset`.
///
/// ```
/// let id = ballast_client::MessageId { lane: 1, offset: 42 };
/// assert_eq!(id.to_string(), "1:42");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// Lane index, 0 = highest priority.
    pub lane: u32,
    /// Position in the lane's log.
    pub offset: u64,
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.lane, self.offset)
    }
}

/// A message read by [`Client::peek`](crate::Client::peek), not leased.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeekedMessage {
    pub id: MessageId,
    pub payload: Bytes,
    /// As a delivery would carry them (a dead letter's broker headers too).
    pub headers: std::collections::HashMap<String, String>,
    pub idempotency_key: Option<String>,
    /// Deliveries made so far (for a dead letter: in its source queue).
    pub attempts: u32,
    /// A dead letter's reason.
    pub reason: Option<String>,
    pub published_at: std::time::SystemTime,
    /// Its age when the broker read it.
    pub age: std::time::Duration,
}

/// One page of [`Client::peek`](crate::Client::peek).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeekPage {
    pub messages: Vec<PeekedMessage>,
    /// Where the next page starts; `None` when nothing follows.
    pub next: Option<MessageId>,
}

impl PeekPage {
    pub(crate) fn from_proto(page: proto::PeekResponse) -> PeekPage {
        let messages = page
            .messages
            .into_iter()
            .map(|m| PeekedMessage {
                id: m.id.unwrap_or_default().into(),
                payload: m.payload,
                headers: m.headers,
                idempotency_key: Some(m.idempotency_key).filter(|k| !k.is_empty()),
                attempts: m.attempts,
                reason: Some(m.reason).filter(|r| !r.is_empty()),
                published_at: std::time::UNIX_EPOCH + std::time::Duration::from_millis(m.published_at_ms),
                age: std::time::Duration::from_millis(m.age_ms),
            })
            .collect();
        PeekPage { messages, next: page.next.map(Into::into) }
    }
}

impl From<proto::MessageId> for MessageId {
    fn from(id: proto::MessageId) -> MessageId {
        MessageId { lane: id.lane, offset: id.offset }
    }
}

/// The broker's answer to a publish: the message is durable under the
/// queue's sync policy, and how full the queue was right after.
///
/// The saturation figures are the signal to slow down on *before* the broker
/// starts refusing. Admission compares the queue as a whole
/// ([`Receipt::queue_saturation`]) with the publishing lane's threshold
/// (by default 1.0, 0.9 and 0.7 for high, normal and low; see
/// [`QueueSettings::lane_admission`](crate::QueueSettings::lane_admission)),
/// so a producer of low-priority work can ease off as the queue nears 70%:
///
/// ```no_run
/// # async fn example(producer: &ballast_client::Producer) -> Result<(), ballast_client::Error> {
/// use std::time::Duration;
/// use ballast_client::Message;
///
/// // The low lane's admission threshold (QueueInfo::settings.lane_admission).
/// let threshold = 0.7;
/// for n in 0..10_000 {
///     let receipt = producer.publish("reports", Message::new(format!("report {n}")).with_lane(2)).await?;
///     let Some(queue) = receipt.queue_saturation else { continue };
///     // Past half the threshold, pause in proportion to how close the queue
///     // is to refusing us: up to a tenth of the time consumers need to
///     // drain it (or a second when nothing is consuming).
///     let pressure = (queue.saturation / threshold - 0.5).clamp(0.0, 0.5) * 2.0;
///     if pressure > 0.0 {
///         let drain = queue.drain_estimate.unwrap_or(Duration::from_secs(10));
///         tokio::time::sleep(drain.min(Duration::from_secs(10)).mul_f64(pressure / 10.0)).await;
///     }
/// }
/// # Ok(())
/// # }
/// ```
///
/// Once the broker refuses, the producer retries no sooner than its
/// retry-after hint, and a publish whose retries run out fails with
/// [`Error::ResourceExhausted`] carrying the hint and the figures
/// ([`Error::refusal`]).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Receipt {
    /// Where the message is stored; for a duplicate, the original's id.
    pub id: MessageId,
    /// True when the idempotency key had been seen within the queue's dedupe
    /// window: nothing new was stored.
    pub duplicate: bool,
    /// The queue's figures (all lanes) right after the publish. A batch's
    /// receipts share the figures taken after the whole batch. `None` only
    /// from a broker that does not send figures.
    pub queue_saturation: Option<Saturation>,
    /// The same for the lane the message went to (`id.lane`), measured
    /// against the queue's limits.
    pub lane_saturation: Option<Saturation>,
}

impl TryFrom<proto::Receipt> for Receipt {
    type Error = Error;

    fn try_from(receipt: proto::Receipt) -> Result<Receipt, Error> {
        let id = receipt.id.ok_or_else(|| Error::Protocol { message: "receipt without a message id".into() })?;
        Ok(Receipt {
            id: id.into(),
            duplicate: receipt.duplicate,
            queue_saturation: receipt.queue.map(Saturation::from_proto),
            lane_saturation: receipt.lane.map(Saturation::from_proto),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys are 32 hex digits and do not repeat.
    #[test]
    fn generated_keys_are_unique_hex() {
        let keys: std::collections::HashSet<String> = (0..10_000).map(|_| generate_idempotency_key()).collect();
        assert_eq!(keys.len(), 10_000);
        assert!(keys.iter().all(|k| k.len() == 32 && k.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))));
    }

    /// Local validation: key at and past its limit, reserved headers, delay
    /// at and past its limit.
    #[test]
    fn validation_limits() {
        let at = "k".repeat(contract::IDEMPOTENCY_KEY_SIZE_MAX);
        assert!(Message::new("x").with_idempotency_key(at.clone()).validate().is_ok());
        let past = format!("{at}k");
        assert!(matches!(Message::new("x").with_idempotency_key(past).validate(), Err(Error::InvalidArgument { .. })));
        assert!(Message::new("x").with_idempotency_key("").validate().is_err());
        assert!(Message::new("x").with_header("ballast-attempt", "1").validate().is_err());
        assert!(Message::new("x").with_header("x-ballast", "1").validate().is_ok());
        assert!(Message::new("x").with_delay(contract::DELAY_MAX).validate().is_ok());
        assert!(Message::new("x").with_delay(contract::DELAY_MAX + Duration::from_millis(1)).validate().is_err());
        assert!(Message::new("x").with_ttl(contract::MESSAGE_TTL_MAX).validate().is_ok());
        let past = contract::MESSAGE_TTL_MAX + Duration::from_millis(1);
        assert!(Message::new("x").with_ttl(past).validate().is_err());
        assert!(Message::new("x").with_ttl(Duration::ZERO).validate().is_err());
    }

    /// The wire form carries every field and the key it was given.
    #[test]
    fn into_proto() {
        let wire = Message::new("p")
            .with_lane(2)
            .with_header("a", "b")
            .with_delay(Duration::from_millis(1500))
            .into_proto("key".into());
        assert_eq!(&wire.payload[..], b"p");
        assert_eq!(wire.lane, Some(2));
        assert_eq!(wire.delay_ms, 1500);
        assert_eq!(wire.idempotency_key, "key");
        assert_eq!(wire.headers.get("a").map(String::as_str), Some("b"));
    }
}
