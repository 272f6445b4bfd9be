//! carecache's FHIR R4 / UK Core mapping, in one place (docs/FHIR-MAPPING.md):
//!
//! - [`model`]: the resources and data types used, as typed serde structs;
//! - [`codes`]: code systems, URLs and the tables between the protocol's enums and FHIR
//!   codes, used both ways;
//! - [`dates`]: FHIR dates and instants to and from the protocol's types;
//! - [`read`]: a source's resources to record items (the hub's ingest);
//! - [`write`]: record items to resources (the device's local API, and the synthetic
//!   generator's source export);
//! - [`dosage`]: structured dosage in words;
//! - [`document`]: Bundle shells, OperationOutcomes, narratives, section states;
//! - [`audit`]: audit records as AuditEvent and as text (device and hub exports).
//!
//! No FHIR model crate is used: the generated R4 models available cover far more than
//! the eleven resources carecache touches, at a compile-time cost out of proportion, and
//! the hub needs lenient views ([`model::Lenient`]) that a strict model cannot give.

pub mod audit;
pub mod codes;
pub mod dates;
pub mod document;
pub mod dosage;
pub mod model;
pub mod read;
pub mod write;
