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
//!
//! A node that takes calls but stops answering them (paused, hung: its TCP
//! connection stays up, so no call fails) is noticed by the caller, which
//! waits: a call carrying a [`Route`] learns which node it went to, and
//! the caller reports that node stalled ([`Route::stalled`]) when it gives
//! up on it. The node is then treated as unreachable (the next seed gets
//! the next calls), and its connection is replaced, so a later call there
//! starts afresh.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
};

use tonic::{body::Body, transport::Channel};

use crate::ClientConfig;

use crate::contract::{LEADER_METADATA as LEADER, UNREACHABLE_FOR};

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
    /// Addresses that could not be reached, and when: a follower that
    /// still names a dead leader is not followed there again for
    /// `UNREACHABLE_FOR`.
    unreachable: parking_lot::Mutex<HashMap<String, std::time::Instant>>,
}

/// Where a call went, filled in by [`Follow`] when it sends the call (a
/// request extension: `request.extensions_mut().insert(route.clone())`),
/// so a caller that stops waiting for a node's answer can say which node
/// stalled. Cheap to clone; clones share the slot.
#[derive(Clone, Default)]
pub(crate) struct Route(Arc<OnceLock<(String, Follow)>>);

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Route").field(&self.addr()).finish()
    }
}

impl Route {
    /// The address the call was sent to, once it was sent.
    pub(crate) fn addr(&self) -> Option<&str> {
        self.0.get().map(|(addr, _)| addr.as_str())
    }

    /// The node the call went to took it and then answered nothing for as
    /// long as the caller would wait: see [`Follow::stalled`]. Nothing
    /// happens if the call was never sent.
    pub(crate) fn stalled(&self) {
        if let Some((addr, follow)) = self.0.get() {
            follow.stalled(addr);
        }
    }
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
                unreachable: parking_lot::Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The node in use cannot be reached: the next seed, if there are
    /// several, gets the next calls.
    fn next_seed(&self, failed: &str) {
        self.shared.unreachable.lock().insert(failed.to_owned(), std::time::Instant::now());
        let seeds = &self.shared.seeds;
        if seeds.len() < 2 || self.shared.current.read().0 != failed {
            return;
        }
        let at = seeds.iter().position(|s| s == failed).map_or(0, |i| i + 1);
        // The next seed not known unreachable, or simply the next.
        let next = (0..seeds.len())
            .map(|k| &seeds[(at + k) % seeds.len()])
            .find(|s| s.as_str() != failed && !self.recently_unreachable(s))
            .unwrap_or(&seeds[at % seeds.len()]);
        self.switch(next);
    }

    /// The node at `addr` took a call and then stopped answering (paused:
    /// its connection stays up, so nothing fails). Treated as unreachable:
    /// the next seed, if there are several, gets the next calls, and a
    /// follower naming it as leader is not followed there for
    /// `UNREACHABLE_FOR`. Its channel is replaced by a new one, connected
    /// on first use, so calls that come back to it (the only seed, or
    /// later) do not queue behind the stalled connection.
    pub(crate) fn stalled(&self, addr: &str) {
        tracing::warn!(%addr, "the node stopped answering; moving on");
        if let Ok((endpoint, _)) = crate::client::endpoint(addr, &self.shared.config) {
            let channel = endpoint.connect_lazy();
            self.shared.known.lock().insert(addr.to_owned(), channel.clone());
            let mut current = self.shared.current.write();
            if current.0 == addr {
                current.1 = channel;
            }
        }
        self.next_seed(addr);
    }

    fn recently_unreachable(&self, addr: &str) -> bool {
        self.shared.unreachable.lock().get(addr).is_some_and(|at| at.elapsed() < UNREACHABLE_FOR)
    }

    /// Sends the next calls to `leader` (`host:port`, as the broker names
    /// it). An address that does not parse is ignored: calls stay where
    /// they are and retry there.
    fn follow(&self, leader: &str) {
        let (_, addr) = match crate::client::endpoint(leader, &self.shared.config) {
            Ok(made) => made,
            Err(_) => return self.switch(leader),
        };
        if self.recently_unreachable(&addr) {
            // A follower's view lags the election: stay, and retry here.
            return;
        }
        self.switch(leader);
    }

    /// Sends the next calls to `addr`.
    fn switch(&self, leader: &str) {
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
        if let Some(route) = request.extensions().get::<Route>() {
            // A route is filled in once: its call goes to one node.
            let _ = route.0.set((addr.clone(), follow.clone()));
        }
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
            // A follower's refusal of a call is trailers-only: its status
            // and metadata are in the response's headers. A stream it ends
            // (the publish stream meeting a replicated queue) says it in
            // its trailers, which the body watches for.
            if let Some(leader) = response.headers().get(LEADER).and_then(|v| v.to_str().ok()) {
                follow.follow(leader);
                return Ok(response);
            }
            Ok(response.map(|body| Body::new(Trailers { inner: body, follow })))
        })
    }
}

/// A response body that follows the leader a stream's trailers name.
struct Trailers {
    inner: Body,
    follow: Follow,
}

impl http_body::Body for Trailers {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(leader) = frame.trailers_ref().and_then(|t| t.get(LEADER)).and_then(|v| v.to_str().ok())
        {
            self.follow.follow(leader);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
