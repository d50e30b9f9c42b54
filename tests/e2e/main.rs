//! End-to-end tests: services started in-process on port 0 with TLS, driven over real gRPC.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

mod browsers;
mod cluster;
mod contract;
mod dc5;
mod e2e;
mod erasure;
mod foundation;
mod keys;
mod metrics;
mod traces;
mod trust;
