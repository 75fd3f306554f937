//! Who is on the other end of a connection, as every request sees it: the
//! server puts a [`Peer`] into each request's extensions (tonic does so for
//! a connection's [`Connected::ConnectInfo`]), and authentication reads it
//! from there.
//!
//! [`Connected::ConnectInfo`]: tonic::transport::server::Connected::ConnectInfo

use std::{net::SocketAddr, sync::Arc};

/// The connection a request came in on.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The client's address, when the transport knows it.
    pub addr: Option<SocketAddr>,
    /// The identities of the client's verified certificate (its subject's
    /// common name and its DNS and URI subject alternative names); empty
    /// without mutual TLS.
    pub cert_identities: Arc<[String]>,
}

impl Peer {
    /// The peer of a request, if the server recorded one.
    pub fn of<B>(request: &tonic::codegen::http::Request<B>) -> Option<&Peer> {
        request.extensions().get::<Peer>()
    }

    /// The address as the logs print it.
    pub fn addr_display(&self) -> String {
        self.addr.map_or_else(|| "unknown".to_owned(), |addr| addr.to_string())
    }
}
