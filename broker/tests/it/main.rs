//! End-to-end tests of `ballastd`: a real broker process on a loopback
//! port, spoken to through the generated gRPC stubs.

mod admin;
mod auth;
mod cluster;
mod console;
mod delivery;
mod disk;
mod durability;
mod expiry;
mod lease;
mod operating;
mod pacing;
mod peek;
mod publish;
mod publish_stream;
mod pull;
mod queues;
mod quota;
mod redrive;
mod saturation;
mod scaler;
mod support;
mod tls;
mod trace;
mod update;
mod wire;
