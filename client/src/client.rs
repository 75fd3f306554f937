//! [`Client`]: one connection to a broker, from which producers, consumers
//! and admin handles are made.

use std::{path::Path, time::Duration};

use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Endpoint,
};

use ballast_proto::v1::{self as proto, consumer_client::ConsumerClient};

use crate::{
    Admin, AdminConfig, Consumer, ConsumerConfig, Error, LeaseExtension, MessageId, PeekPage, Producer, ProducerConfig,
    TlsConfig, contract,
};

/// Connection settings shared by everything made from a [`Client`].
///
/// ```
/// use std::time::Duration;
/// use ballast_client::ClientConfig;
///
/// let config = ClientConfig { connect_timeout: Duration::from_secs(1), ..ClientConfig::default() };
/// assert_eq!(config.keep_alive_interval, Duration::from_secs(10));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Longest wait for a TCP connection to the broker.
    pub connect_timeout: Duration,
    /// Interval of HTTP/2 keep-alive pings, so a broker that vanished without
    /// closing the connection (a partition, a power loss) is noticed.
    pub keep_alive_interval: Duration,
    /// How long a keep-alive ping may go unanswered before the connection is
    /// considered dead.
    pub keep_alive_timeout: Duration,
    /// The bearer token sent as `authorization: Bearer <token>` on every
    /// call, for a broker with an auth file (see [`ClientConfig::token_file`]).
    /// `None` sends no credentials.
    pub token: Option<String>,

    /// Speak TLS, trusting this CA (and showing a client certificate, if
    /// set); `None` for plaintext.
    pub tls: Option<TlsConfig>,
}

impl std::fmt::Debug for ClientConfig {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("connect_timeout", &self.connect_timeout)
            .field("keep_alive_interval", &self.keep_alive_interval)
            .field("keep_alive_timeout", &self.keep_alive_timeout)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl ClientConfig {
    /// These settings with the token read from `path` (its first line,
    /// trimmed), as `ballast token new` prints it.
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("token");
    /// std::fs::write(&path, "s3cret\n").unwrap();
    /// let config = ballast_client::ClientConfig::default().token_file(&path).unwrap();
    /// assert_eq!(config.token.as_deref(), Some("s3cret"));
    /// ```
    pub fn token_file(self, path: &Path) -> Result<ClientConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|error| Error::InvalidArgument {
            message: format!("cannot read the token file {}: {error}", path.display()),
        })?;
        let token = text.lines().next().unwrap_or_default().trim().to_owned();
        if token.is_empty() {
            return Err(Error::InvalidArgument { message: format!("the token file {} is empty", path.display()) });
        }
        Ok(ClientConfig { token: Some(token), ..self })
    }
}

/// The credentials a client sends on every call.
#[derive(Clone, Default)]
pub(crate) struct Credentials(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Credentials(<bearer token>)" } else { "Credentials(none)" })
    }
}

impl Credentials {
    fn new(token: Option<&str>) -> Result<Credentials, Error> {
        let Some(token) = token else { return Ok(Credentials(None)) };
        let valid = !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic());
        let mut value = MetadataValue::try_from(format!("Bearer {token}")).ok().filter(|_| valid).ok_or_else(|| {
            Error::InvalidArgument { message: "the token must be printable ASCII without spaces".to_owned() }
        })?;
        value.set_sensitive(true);
        Ok(Credentials(Some(value)))
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The channel every stub of a [`Client`] calls through: the connection,
/// with the credentials added to each call.
pub(crate) type Transport = InterceptedService<crate::leader::Follow, Credentials>;

impl Default for ClientConfig {
    /// Connect within 5 s; ping every 10 s, give up after 5 s without answer.
    fn default() -> ClientConfig {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            token: None,
            tls: None,
        }
    }
}

/// A handle on one broker. Cheap to clone; clones share the connection.
///
/// The connection is made on first use and remade after it breaks (a broker
/// restart), so a `Client` can be created before the broker is up.
///
/// ```no_run
/// # async fn example() -> Result<(), ballast_client::Error> {
/// use ballast_client::{Client, Message, ProducerConfig};
///
/// let client = Client::connect("http://127.0.0.1:7400").await?;
/// let producer = client.producer(ProducerConfig::default())?;
/// let receipt = producer.publish("emails", Message::new("hello")).await?;
/// println!("stored at {}", receipt.id);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    channel: Transport,
    addr: String,
}

impl Client {
    /// A client for the broker at `addr` (`http://host:port`; a bare
    /// `host:port` gets `http://`), with default settings. A cluster's
    /// nodes may be given together, separated by commas: calls go to the
    /// first, follow the leader a follower names (`ballast-leader`), and
    /// move to the next address when a node cannot be reached or stops
    /// answering (docs/replication.md). Connects lazily:
    /// no I/O happens until the first call. Must be called inside a Tokio
    /// runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let client = ballast_client::Client::new("127.0.0.1:7400").expect("a valid address");
    /// assert_eq!(client.addr(), "http://127.0.0.1:7400");
    /// assert!(ballast_client::Client::new("http://bad host").is_err());
    /// # }
    /// ```
    pub fn new(addr: &str) -> Result<Client, Error> {
        Client::with_config(addr, ClientConfig::default())
    }

    /// Like [`Client::new`], with explicit connection settings.
    pub fn with_config(addr: &str, config: ClientConfig) -> Result<Client, Error> {
        let credentials = Credentials::new(config.token.as_deref())?;
        let (seeds, first) = seeds(addr, &config)?;
        let (endpoint, addr) = first;
        let follow = crate::leader::Follow::new(addr.clone(), endpoint.connect_lazy(), seeds, config);
        Ok(Client { channel: Transport::new(follow, credentials), addr })
    }

    /// A client connected to the broker at `addr` now, so an unreachable
    /// broker is reported here ([`Error::Transport`]) rather than on the first
    /// call. The connection is still remade if it breaks later.
    pub async fn connect(addr: &str) -> Result<Client, Error> {
        Client::connect_with_config(addr, ClientConfig::default()).await
    }

    /// Like [`Client::connect`], with explicit connection settings.
    pub async fn connect_with_config(addr: &str, config: ClientConfig) -> Result<Client, Error> {
        let credentials = Credentials::new(config.token.as_deref())?;
        let (seeds, (endpoint, addr)) = seeds(addr, &config)?;
        let channel = endpoint.connect().await.map_err(|error| {
            let chain = error_chain(&error);
            match crate::tls::advice(&chain) {
                Some(message) => Error::Tls { message },
                None => Error::Transport { message: format!("cannot connect to {addr}: {chain}") },
            }
        })?;
        let follow = crate::leader::Follow::new(addr.clone(), channel, seeds, config);
        Ok(Client { channel: Transport::new(follow, credentials), addr })
    }

    /// The broker's address, normalized (`http://host:port`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// An admin handle with default deadlines and retries.
    pub fn admin(&self) -> Admin {
        Admin::new(self.channel.clone(), AdminConfig::default())
    }

    /// An admin handle with explicit deadlines and retries.
    pub fn admin_with_config(&self, config: AdminConfig) -> Admin {
        Admin::new(self.channel.clone(), config)
    }

    /// A producer; starts its batching task on the current Tokio runtime.
    /// Fails if `config` is out of range.
    pub fn producer(&self, config: ProducerConfig) -> Result<Producer, Error> {
        Producer::new(self.channel.clone(), config)
    }

    /// A consumer of `queue`; nothing happens until
    /// [`Consumer::spawn`](crate::Consumer::spawn). Fails if the queue name or
    /// `config` is invalid.
    pub fn consumer(&self, queue: &str, config: ConsumerConfig) -> Result<Consumer, Error> {
        Consumer::new(self.channel.clone(), queue, config)
    }

    /// Reads up to `max_messages` (1..=1000) messages of `queue` not yet
    /// done, without leasing them, from `start` (`None`: the first lane's
    /// oldest; else the previous page's `next`), lanes in priority order.
    /// For looking at dead letters (`<queue>.dead`) or any backlog. One
    /// call, no retry.
    pub async fn peek(&self, queue: &str, start: Option<MessageId>, max_messages: u32) -> Result<PeekPage, Error> {
        contract::check_queue_name(queue)?;
        let request = proto::PeekRequest {
            queue: queue.to_owned(),
            start: start.map(|id| proto::MessageId { lane: id.lane, offset: id.offset }),
            max_messages,
        };
        let mut client =
            ConsumerClient::new(self.channel.clone()).max_decoding_message_size(contract::GRPC_DECODE_SIZE_MAX);
        let response = client.peek(request).await.map_err(Error::from_status)?;
        Ok(PeekPage::from_proto(response.into_inner()))
    }

    /// Extends leases of `queue` by delivery id (from any consumer or Pull:
    /// naming the id is the right to extend it) to `lease` from now, one
    /// call, no retry. Answered per id, in order; a lease not held is left
    /// alone and said so. A [`Consumer`] extends its own leases by itself.
    /// `lease` must be within the queue lease bounds (10 ms ..= 12 h), or
    /// zero for the queue's lease timeout.
    pub async fn extend_leases(
        &self,
        queue: &str,
        delivery_ids: &[u64],
        lease: Duration,
    ) -> Result<Vec<(u64, LeaseExtension)>, Error> {
        contract::check_queue_name(queue)?;
        let request = proto::ExtendRequest {
            queue: queue.to_owned(),
            delivery_ids: delivery_ids.to_vec(),
            lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
        };
        let response = ConsumerClient::new(self.channel.clone()).extend(request).await.map_err(Error::from_status)?;
        Ok(response.into_inner().results.iter().map(|r| (r.delivery_id, LeaseExtension::from_proto(r))).collect())
    }
}

/// Every address of `addrs` (one, or several separated by commas: the
/// nodes of a cluster), normalized, and the endpoint of the first.
fn seeds(addrs: &str, config: &ClientConfig) -> Result<(Vec<String>, (Endpoint, String)), Error> {
    let mut seeds = Vec::new();
    let mut first = None;
    for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let (endpoint, addr) = endpoint(addr, config)?;
        seeds.push(addr.clone());
        first.get_or_insert((endpoint, addr));
    }
    let first = match first {
        Some(first) => first,
        None => endpoint(addrs, config)?,
    };
    Ok((seeds, first))
}

pub(crate) fn endpoint(addr: &str, config: &ClientConfig) -> Result<(Endpoint, String), Error> {
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    let addr = if addr.contains("://") { addr.to_owned() } else { format!("{scheme}://{addr}") };
    let mut endpoint = Endpoint::from_shared(addr.clone())
        .map_err(|error| Error::InvalidAddress { addr: addr.clone(), message: error_chain(&error) })?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(config.keep_alive_interval)
        .keep_alive_timeout(config.keep_alive_timeout)
        .keep_alive_while_idle(true);
    if let Some(tls) = &config.tls {
        if addr.starts_with("http://") {
            return Err(Error::Tls {
                message: format!("{addr} is a plaintext address but TLS is configured: use https://"),
            });
        }
        endpoint = endpoint.tls_config(tls.tonic()?).map_err(|error| Error::Tls { message: error_chain(&error) })?;
    }
    Ok((endpoint, addr))
}

/// An error and its causes, joined: tonic's transport errors say only
/// "transport error" at the top.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
