//! carecache-hub: the reference regional hub. It reads the shared care record as FHIR R4
//! (Bulk Data NDJSON or a FHIR server's REST API), decides what each device may hold,
//! serves the sync protocol over mutual TLS, and receives devices' audit.
//!
//! - [`fhir_in`]: FHIR resources → the internal model, per patient; unreadable resources
//!   reported and skipped whole.
//! - [`sharing`]: sensitive exclusions by label and by a versioned code-list data file.
//! - [`source`]: the NDJSON directory and FHIR REST sources.
//! - [`state`]: patients, objections, leases, the compacted change log, devices,
//!   enrolment tokens — on redb or PostgreSQL (`store`).
//! - [`pull`]: a device's batch from its cursor: objections, then leases, then records.
//! - [`audit`]: the audit sink: chain and sequence checks, exactly-once storage.
//! - [`export`]: audit as FHIR AuditEvent (IHE BALP).
//! - [`forward`]: stored audit forwarded upstream as FHIR AuditEvent, at least once.
//! - [`officer`]: the privacy officer's views and clearances, and the log of them.
//! - [`pki`]: the device CA (enrolment) and `dev-ca`.
//! - [`server`]: HTTPS, mutual TLS, protocol routes and the admin API.
//! - [`config`] reads `hub.toml`.
#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
pub mod export;
pub mod fhir_in;
pub mod fleet;
pub mod forward;
mod leases;
pub mod officer;
pub mod pki;
pub mod pull;
pub mod server;
pub mod sharing;
pub mod source;
pub mod state;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use server::Hub;
pub use state::{HubState, LeaseSpec, Target, ViewSpec};
pub use store::Retained;
