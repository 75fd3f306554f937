//! Following a cluster's leader (`docs/replication.md`, "Where clients
//! attach").
//!
//! A follower answers a call on a replicated queue with UNAVAILABLE and the
//! metadata `ballast-leader: <host:port>`. [`Follow`], the service every stub
//! of a [`Client`](crate::Client) calls through, sees that header on the
//! response and sends the calls after it to that address instead (one
//! lazily connected channel per address, kept). The failed call itself is
//! retryable (UNAVAILABLE with `retry-after-ms`), so the producer's retry,
//! with the same idempotency keys, and the consumer's reconnect go to the
//! leader. Queues with one replica never answer with the header, so a
//! single node behaves exactly as before.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::{body::Body, transport::Channel};

use crate::ClientConfig;

/// Metadata key of the leader's address on a follower's UNAVAILABLE.
pub const LEADER: &str = "ballast-leader";

/// The channel to whichever node leads, switched on `ballast-leader`.
#[derive(Clone)]
pub(crate) struct Follow {
    shared: Arc<Shared>,
}

struct Shared {
    config: ClientConfig,
    /// The address calls go to now, and its channel.
    current: parking_lot::RwLock<(String, Channel)>,
    /// Channels made for addresses followed before (a failover back).
    known: parking_lot::Mutex<HashMap<String, Channel>>,
}

impl std::fmt::Debug for Follow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follow").field("addr", &self.shared.current.read().0).finish_non_exhaustive()
    }
}

impl Follow {
    pub(crate) fn new(addr: String, channel: Channel, config: ClientConfig) -> Follow {
        let known = HashMap::from([(addr.clone(), channel.clone())]);
        Follow {
            shared: Arc::new(Shared {
                config,
                current: parking_lot::RwLock::new((addr, channel)),
                known: parking_lot::Mutex::new(known),
            }),
        }
    }

    /// Sends the next calls to `leader` (`host:port`, as the broker names
    /// it). An address that does not parse is ignored: calls stay where
    /// they are and retry there.
    fn follow(&self, leader: &str) {
        let (endpoint, addr) = match crate::client::endpoint(leader, &self.shared.config) {
            Ok(made) => made,
            Err(error) => {
                tracing::warn!(%leader, %error, "cannot follow the cluster leader's address");
                return;
            }
        };
        if self.shared.current.read().0 == addr {
            return;
        }
        let channel = self.shared.known.lock().entry(addr.clone()).or_insert_with(|| endpoint.connect_lazy()).clone();
        tracing::info!(%addr, "following the cluster leader");
        *self.shared.current.write() = (addr, channel);
    }
}

impl tower_service::Service<http::Request<Body>> for Follow {
    type Response = http::Response<Body>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is the channel's, awaited in `call` on the channel the
        // call goes to (it may change between the two).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let mut channel = self.shared.current.read().1.clone();
        let follow = self.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut channel, cx)).await?;
            let response = tower_service::Service::call(&mut channel, request).await?;
            // A follower's answer is trailers-only: its status and metadata
            // are in the response's headers.
            if let Some(leader) = response.headers().get(LEADER).and_then(|v| v.to_str().ok()) {
                follow.follow(leader);
            }
            Ok(response)
        })
    }
}
