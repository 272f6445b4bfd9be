//! carecache sync protocol, version 2 (reads version 1): the messages between a device and its hub, and
//! the frame codec. No I/O; `SPEC.md` beside this crate is normative.
//!
//! - [`nhs`]: the NHS number, valid by construction.
//! - [`types`]: bounded texts, lists, dates, codes, ids.
//! - [`record`]: a patient's alerts, allergies, medications and contacts.
//! - [`message`]: enrol, hello/welcome, pull/batch, push-audit/ack, error.
//! - [`audit`]: audit records and their hash chain (as FHIR AuditEvent and as text:
//!   the `carecache-fhir` crate).
//! - [`sensitive`]: the sharing agreement's sensitive code list (hub and device).
//! - [`digest`]: the allowed-set digest a device reconciles against.
//! - [`codec`]: framing, limits, compression, canonical decoding.
//!
//! Every value that decodes is valid: decoding goes through the same checks as
//! construction, refuses trailing bytes and refuses any encoding but the canonical one.
//! Errors and `Debug` output never carry patient data.
#![forbid(unsafe_code)]

pub mod audit;
pub mod codec;
pub mod digest;
pub mod error;
pub mod message;
pub mod nhs;
pub mod record;
pub mod sensitive;
pub mod types;

pub use codec::{Compression, FrameHeader, decode, decode_with_limit, encode, encode_version};
pub use error::{DecodeError, EncodeError, FieldError};
pub use message::{Message, MessageKind};
pub use nhs::NhsNumber;
