//! What happens to a call before and around the services: accepted
//! connections are counted against `grpc.connections_max`, request
//! metadata is checked against [`METADATA_SIZE_MAX`], then the call is
//! authenticated (`grpc/auth.rs`), and the statuses
//! tonic itself answers for a request it cannot decode are made ones a
//! client can act on (and counted in `ballast_errors_total`):
//!
//! | tonic answers | the client gets |
//! | --- | --- |
//! | INTERNAL "failed to decode Protobuf message" (body not protobuf) | INVALID_ARGUMENT |
//! | INTERNAL "invalid compression flag" (body not gRPC framing) | INVALID_ARGUMENT |
//! | OUT_OF_RANGE "decoded message length too large" | RESOURCE_EXHAUSTED |
//!
//! Unary and server-streaming calls decode their request before the
//! service runs, so tonic's answer comes back as a trailers-only response
//! that [`StatusLayer`] rewrites; a consume stream's requests are decoded
//! in the session, which uses [`request_error`].

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::{
    Code, Status,
    body::Body,
    codegen::{Service, http},
    transport::server::Connected,
};

use super::peer::Peer;
use crate::auth::Auth;
use crate::limits::METADATA_SIZE_MAX;

/// The status for a request tonic could not decode, as the client should
/// see it; `None` if `status` is not about the request's bytes.
pub fn request_error(status: &Status) -> Option<Status> {
    let message = status.message();
    let code = match status.code() {
        Code::Internal
            if message.starts_with("failed to decode Protobuf message")
                || message.starts_with("protocol error: received message with invalid compression flag") =>
        {
            Code::InvalidArgument
        }
        Code::OutOfRange if message.starts_with("Error, decoded message length too large") => Code::ResourceExhausted,
        _ => return None,
    };
    let message = match code {
        Code::InvalidArgument => format!("the request is not a valid ballast.v1 message: {message}"),
        _ => format!("the request is larger than the broker accepts: {message}"),
    };
    Some(Status::new(code, message))
}

/// Maps a failure reading a consume stream's next request: a request the
/// broker could not decode gets its client-facing status (counted);
/// anything else (the client went away) is returned as it is.
pub fn inbound_error(status: Status) -> Status {
    match request_error(&status) {
        Some(mapped) => {
            crate::metrics::count_error(mapped.code());
            mapped
        }
        None => status,
    }
}

/// The size of request metadata as HTTP/2 counts it (RFC 7540 6.5.2).
fn metadata_size(headers: &http::HeaderMap) -> usize {
    headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 32).sum()
}

/// Adds [`StatusService`] around the services.
#[derive(Debug, Clone, Default)]
pub struct StatusLayer {
    auth: Option<Arc<Auth>>,
}

impl StatusLayer {
    /// Authenticates calls against `auth` (none: every call is let through).
    pub fn new(auth: Option<Arc<Auth>>) -> StatusLayer {
        StatusLayer { auth }
    }
}

impl<S> tower_layer::Layer<S> for StatusLayer {
    type Service = StatusService<S>;

    fn layer(&self, inner: S) -> StatusService<S> {
        StatusService { inner, auth: self.auth.clone() }
    }
}

/// Refuses oversized metadata before the call runs, then authenticates it
/// ([`super::auth::admit`]), and rewrites tonic's own statuses for
/// undecodable requests (see the module docs).
#[derive(Debug, Clone)]
pub struct StatusService<S> {
    inner: S,
    auth: Option<Arc<Auth>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for StatusService<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let size = metadata_size(request.headers());
        if size > METADATA_SIZE_MAX {
            let status = Status::resource_exhausted(format!(
                "the request's metadata is {size} bytes in {} entries (counted as HTTP/2 does: name + value + 32 \
                 each); the limit is {METADATA_SIZE_MAX}: send fewer or smaller metadata entries",
                request.headers().len()
            ));
            crate::metrics::count_error(status.code());
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        // Credentials are checked only once the metadata is known to be
        // within its limit, and before any body is decoded.
        if let Err(status) = super::auth::admit(self.auth.as_deref(), &mut request) {
            crate::metrics::count_error(status.code());
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            // A trailers-only response carries its status in the headers.
            if let Some(status) = Status::from_header_map(response.headers())
                && let Some(mapped) = request_error(&status)
            {
                crate::metrics::count_error(mapped.code());
                if mapped.add_header(response.headers_mut()).is_err() {
                    tracing::warn!(%status, "cannot rewrite a decode failure's status");
                }
            }
            Ok(response)
        })
    }
}

/// The server's connection count: a permit per connection held.
#[derive(Debug, Clone)]
pub struct Connections {
    permits: Arc<Semaphore>,
    max: usize,
}

impl Connections {
    pub fn new(max: usize) -> Connections {
        Connections { permits: Arc::new(Semaphore::new(max)), max }
    }

    /// Counts an accepted connection, or closes it (and says so in the log
    /// and `ballast_connections_refused_total`) when `max` are held.
    pub fn admit(&self, stream: TcpStream) -> Option<Counted> {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                metrics::gauge!("ballast_connections").increment(1.0);
                let peer = Peer { addr: stream.peer_addr().ok(), cert_identities: Arc::from([]) };
                Some(Counted { stream: Stream::Plain(stream), peer, _permit: Permit { _permit: permit } })
            }
            Err(_) => {
                let peer = stream.peer_addr().map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
                tracing::warn!(%peer, connections_max = self.max,
                    "connection refused: the broker holds grpc.connections_max connections; raise it or close idle clients");
                metrics::counter!("ballast_connections_refused_total").increment(1);
                None
            }
        }
    }
}

/// An accepted connection that holds one of the server's connection
/// permits until it is dropped (closed).
#[derive(Debug)]
pub struct Counted {
    stream: Stream,
    /// Fixed when the connection is admitted (and its TLS handshake done):
    /// every request on it gets a clone.
    peer: Peer,
    _permit: Permit,
}

/// A connection permit, counted in `ballast_connections` while held.
#[derive(Debug)]
struct Permit {
    _permit: OwnedSemaphorePermit,
}

impl Drop for Permit {
    fn drop(&mut self) {
        metrics::gauge!("ballast_connections").decrement(1.0);
    }
}

/// The bytes of a connection: as they come, or through TLS.
#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Counted {
    /// The client's address as the logs print it.
    pub fn addr_display(&self) -> String {
        self.peer.addr_display()
    }

    /// Runs the server side of a TLS handshake with `config` (bounded by
    /// `TLS_HANDSHAKE_TIMEOUT_MS`) and records the client certificate's
    /// identities; the connection keeps its permit throughout.
    pub async fn secure(self, config: Arc<rustls::ServerConfig>) -> Result<Counted, super::tls::HandshakeError> {
        let Counted { stream, peer, _permit } = self;
        let Stream::Plain(tcp) = stream else {
            return Ok(Counted { stream, peer, _permit });
        };
        let (tls, cert_identities) = super::tls::handshake(config, tcp).await?;
        Ok(Counted { stream: Stream::Tls(Box::new(tls)), peer: Peer { cert_identities, ..peer }, _permit })
    }
}

impl Connected for Counted {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

/// Forwards a call to whichever stream the connection has.
macro_rules! forward {
    ($self:ident, $stream:ident => $call:expr) => {
        match &mut $self.get_mut().stream {
            Stream::Plain($stream) => {
                let $stream = Pin::new($stream);
                $call
            }
            Stream::Tls($stream) => {
                let $stream = Pin::new($stream.as_mut());
                $call
            }
        }
    };
}

impl AsyncRead for Counted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        forward!(self, stream => stream.poll_read(cx, buf))
    }
}

impl AsyncWrite for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        forward!(self, stream => stream.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        forward!(self, stream => stream.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        forward!(self, stream => stream.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        forward!(self, stream => stream.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(stream) => stream.is_write_vectored(),
            Stream::Tls(stream) => stream.is_write_vectored(),
        }
    }
}
