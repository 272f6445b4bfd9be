//! The hub's integration tests: one binary, a module per area, a shared harness that
//! starts a real hub on loopback TLS.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::result_large_err,
    unreachable_pub,
    missing_debug_implementations,
    dead_code,
    reason = "test code: a panic is a test failure"
)]

mod audit;
mod forward;
mod harness;
mod hostile;
mod ingest;
mod postgres;
mod rest;
mod shift;
mod streaming;
mod sync;
