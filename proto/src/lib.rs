//! `ballast-proto`: the `ballast.v1` gRPC protocol of Ballast, generated from
//! `proto/ballast/v1/ballast.proto` at build time (protox, no system
//! `protoc`). Nothing else lives here: no domain logic, no conversions.
//!
//! - [`v1`]: messages, `admin_client`/`admin_server`,
//!   `publisher_client`/`publisher_server`, `consumer_client`/`consumer_server`.
//! - [`externalscaler`]: KEDA's external scaler protocol (its own package,
//!   copied from KEDA under Apache-2.0), which `ballastd` serves for
//!   autoscaling consumers.
//! - [`cluster::v1`]: the internal node-to-node protocol (`ballast.cluster.v1`,
//!   the Raft service of replicated queues), `raft_client`/`raft_server`. Not
//!   a client API and not in [`FILE_DESCRIPTOR_SET`].
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for server reflection.

#[allow(clippy::all, missing_debug_implementations, reason = "generated code")]
pub mod v1 {
    tonic::include_proto!("ballast.v1");
}

/// KEDA's external scaler protocol (`externalscaler.ExternalScaler`).
#[allow(clippy::all, missing_debug_implementations, reason = "generated code")]
pub mod externalscaler {
    tonic::include_proto!("externalscaler");
}

/// The internal node-to-node protocol (`ballast.cluster.v1`).
pub mod cluster {
    #[allow(clippy::all, missing_debug_implementations, reason = "generated code")]
    pub mod v1 {
        tonic::include_proto!("ballast.cluster.v1");
    }
}

/// The encoded `FileDescriptorSet` of the protocol (for gRPC reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ballast_descriptor.bin"));
