//! carecache: the daemon on an ambulance tablet or a district nurse's laptop that keeps
//! an encrypted, view-only cache of an assigned caseload's alerts, allergies and
//! medications, enforces leases and objections on the device, serves crew software on
//! a local HTTP endpoint, and uploads an audit trail of every look.
//!
//! Architecture (DESIGN.md; parts land issue by issue):
//! - `sync-protocol` (crate): the wire format between device and hub.
//! - [`admin`]: the operator's commands against the running daemon (owner-only socket).
//! - [`cli`]: data-directory commands (`init`, `rekey`, `wipe`).
//! - [`crypto`]: the key hierarchy and sealing (XChaCha20-Poly1305, HMAC-SHA256 row keys).
//! - [`keysource`]: where the root key comes from (key file, systemd credential, passphrase).
//! - [`store`]: the only door to redb and the keyring; sealed rows, purge by crypto-shredding.
//! - [`policy`]: who may see which cached patient, with which view, until when.
//! - [`sync`] and [`transport`]: the sync engine (sans-IO) and its one network door.
//! - [`device`]: the device's operations (enrol, sync, tick, status, clients).
//! - [`audit`]: the durable, hash-chained audit log with group commit.
//! - [`api`]: the local HTTP endpoint (FHIR R4, plain JSON, viewer page, status, metrics).
//! - `demo` (feature `demo`, default): hub, synthetic data and daemon in one command.
#![forbid(unsafe_code)]

pub mod admin;
pub mod anchor;
pub mod api;
pub mod audit;
pub mod audit_tools;
pub mod cli;
pub mod clients;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod daemon;
#[cfg(feature = "demo")]
pub mod demo;
pub mod device;
/// Test support (feature `testing`): the fuzz targets' harnesses.
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod keysource;
pub mod metrics;
pub mod policy;
pub mod search;
pub mod store;
pub mod sync;
pub mod transport;
/// Audit upload lives with the device ([`device::upload`]); this is its old path.
pub use device::upload;
