//! `ballast-benches`: benchmarks for Ballast.
//!
//! - `benches/storage.rs`: criterion micro-benchmarks of `ballast-storage`
//!   (append by record size, batch size and sync policy; sequential read;
//!   recovery). Run with `cargo bench -p ballast-benches --bench storage`.
//!
//! The `ballast-bench` load tool against a running broker arrives with the
//! bench issue.
