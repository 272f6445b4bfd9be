//! Integration tests of the `carecache` binary: one test binary, a module per area.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failed test"
)]

mod admin;
mod anchor;
mod api;
mod api_crash;
mod api_harness;
mod arrival;
mod browser;
mod certs;
mod cli;
mod clock;
mod crash;
mod demo;
mod deploy;
mod device_harness;
mod disk_full;
mod fault_proxy;
mod faults;
mod fixture_content;
mod fixture_content_v2;
mod fleet;
mod fuzz_corpora;
mod harness;
mod hostile_hub;
mod identity;
mod oidc_harness;
mod policy;
mod real_fhir;
mod search;
mod store;
mod store_fixture;
mod sync;
mod upload;
mod viewer;
