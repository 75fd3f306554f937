//! `ballast-broker`: queues, priority lanes, delivery, admission, metrics and
//! the gRPC service, with the `ballastd` binary.
//!
//! Not built yet: it arrives with the broker-node issue, on top of
//! `ballast-storage`. This crate exports nothing until then.
