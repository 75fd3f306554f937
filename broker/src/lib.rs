//! `ballast-broker`: the Ballast node. Queues with priority lanes on
//! `ballast-storage` logs, consumer-paced delivery with credits and leases,
//! idempotent publish, and the gRPC service (`ballast.v1`), served by the
//! `ballastd` binary.
//!
//! Map, in reading order:
//! - [`limits`]: every ceiling, named, with its value.
//! - [`config`]: the node's settings and their defaults.
//! - [`auth`]: principals, credentials, permissions (`--auth-file`).
//! - [`broker`]: the registry of queues and their lifecycle.
//! - [`queue`]: one queue: settings, publish, dedupe, delivery.
//! - [`grpc`]: the tonic services and the error-to-status mapping.
//! - [`metrics`]: Prometheus metrics and the `/metrics` endpoint.
//! - [`console`]: the web console and its JSON API, beside `/metrics`.
//! - [`server`]: wiring it all to a listener, with graceful shutdown.

pub mod auth;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod console;
mod dedupe;
pub mod error;
pub mod fair;
pub mod grpc;
pub mod limits;
pub mod metrics;
pub mod queue;
pub mod server;

pub use broker::Broker;
pub use config::Config;
pub use error::{BrokerError, Result};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
