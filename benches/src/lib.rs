//! `ballast-benches`: benchmarks for Ballast.
//!
//! - `ballast-bench` (`src/bin/ballast-bench/`): the load tool. Scenarios
//!   against a real `ballastd` (throughput, latency, spike, isolation,
//!   priority, recovery, backlog, overhead), each printing a table and
//!   writing JSON (and an SVG chart where one helps) to
//!   `target/bench-results/`. See its `main.rs` for one command per
//!   scenario. `compare` (Ballast beside NATS JetStream and RabbitMQ, which
//!   it starts itself) is built only with the `compare` feature;
//!   `scripts/install-peers` installs the peers on Debian.
//! - `benches/storage.rs`: criterion micro-benchmarks of `ballast-storage`
//!   (append by record size, batch size and sync policy; sequential read;
//!   recovery). Run with `cargo bench -p ballast-benches --bench storage`.
//! - `benches/hot_paths.rs`: criterion micro-benchmarks of the per-message
//!   hot paths (record encode and decode, the broker's dispatch with the
//!   lane scheduler). Run with `cargo bench -p ballast-benches --bench hot_paths`.
//! - `tests/smoke.rs`: every scenario with tiny parameters, in seconds, as
//!   part of `cargo test --workspace` (CI's smoke set).
