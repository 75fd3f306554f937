//! `ballast-proto`: the `ballast.v1` gRPC protocol.
//!
//! Not built yet: the `.proto` files and the generated tonic/prost code arrive
//! with the broker-node issue. This crate exports nothing until then, so no
//! caller can mistake it for a working protocol.
