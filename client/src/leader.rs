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
//!
//! A client given several addresses (`"host1:7400,host2:7400,host3:7400"`)
//! also moves to the next one when a call cannot reach the node it uses
//! (the leader was killed): that node, if it is not the new leader, sends
//! it on with `ballast-leader`.

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
    /// Every address the client was given, in order: where to turn when
    /// the current node cannot be reached.
    seeds: Vec<String>,
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
    /// Calls go to `addr` over `channel` first; `seeds` are every address
    /// the client was given (`addr` among them).
    pub(crate) fn new(addr: String, channel: Channel, seeds: Vec<String>, config: ClientConfig) -> Follow {
        let known = HashMap::from([(addr.clone(), channel.clone())]);
        Follow {
            shared: Arc::new(Shared {
                config,
                seeds,
                current: parking_lot::RwLock::new((addr, channel)),
                known: parking_lot::Mutex::new(known),
            }),
        }
    }

    /// The node in use cannot be reached: the next seed, if there are
    /// several, gets the next calls.
    fn next_seed(&self, failed: &str) {
        let seeds = &self.shared.seeds;
        if seeds.len() < 2 || self.shared.current.read().0 != failed {
            return;
        }
        let at = seeds.iter().position(|s| s == failed).map_or(0, |i| i + 1);
        self.follow(&seeds[at % seeds.len()]);
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
        let (addr, mut channel) = self.shared.current.read().clone();
        let follow = self.clone();
        Box::pin(async move {
            let sent = async {
                std::future::poll_fn(|cx| tower_service::Service::poll_ready(&mut channel, cx)).await?;
                tower_service::Service::call(&mut channel, request).await
            };
            let response = match sent.await {
                Ok(response) => response,
                Err(error) => {
                    follow.next_seed(&addr);
                    return Err(error.into());
                }
            };
            // A follower's answer is trailers-only: its status and metadata
            // are in the response's headers.
            if let Some(leader) = response.headers().get(LEADER).and_then(|v| v.to_str().ok()) {
                follow.follow(leader);
            }
            Ok(response)
        })
    }
}
