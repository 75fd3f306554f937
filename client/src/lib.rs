//! `ballast-client`: the Rust client library and the `ballast` CLI.
//!
//! Not built yet: it arrives with the client issue. This crate exports
//! nothing until then.
