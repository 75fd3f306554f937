//! End-to-end tests of `ballast-client` and the `ballast` CLI against a real
//! `ballastd` (built by `cargo build -p ballast-broker`; `cargo test
//! --workspace` builds it too).

mod auth;
mod cli;
mod lease;
mod library;
#[cfg(feature = "otel")]
mod otel;
mod saturation;
mod support;
