//! The gRPC face of the broker: `ballast.v1` services on top of [`Broker`],
//! conversions between protocol messages and domain types, and the one
//! mapping from [`BrokerError`] to gRPC status.
//!
//! [`Broker`]: crate::Broker
//! [`BrokerError`]: crate::BrokerError

pub mod auth;
mod convert;
pub mod json;
pub mod peer;
pub mod scaler;
mod service;
pub(crate) mod status;
pub mod tls;
pub mod transport;

pub use service::Service;
pub use status::to_status;
