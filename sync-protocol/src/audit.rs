//! Audit entries and their hash chain.
//!
//! An entry carries its record as the exact bytes the device encoded; the chain hash
//! covers those bytes, so the hub authenticates what it received, never a
//! re-serialisation. The record inside is decoded separately with
//! [`AuditRecord::decode`].

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::decode_canonical;
use crate::error::{DecodeError, FieldError};
use crate::message::View;
use crate::nhs::NhsNumber;
use crate::types::{Bytes, Hash32, LeaseId, StaffId, Text, Timestamp};

/// Most bytes of one encoded audit record.
pub const MAX_AUDIT_RECORD: usize = 4_096;

/// Domain separation for chain hashes.
const CHAIN_DOMAIN: &[u8] = b"carecache/audit-chain/v1\0";

/// One entry of the device's audit log as it travels.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Sequence number, from 1, without gaps, per device.
    pub seq: u64,
    /// The postcard encoding of an [`AuditRecord`], exactly as hashed.
    pub record: Bytes<MAX_AUDIT_RECORD>,
    /// `chain_hash(previous entry's hash, seq, record)`.
    pub hash: Hash32,
}

impl AuditEntry {
    /// Encode `record` as entry `seq` following `prev`.
    pub fn seal(prev: &Hash32, seq: u64, record: &AuditRecord) -> Result<Self, FieldError> {
        let bytes = postcard::to_allocvec(record)
            .map_err(|_| FieldError::Invalid("audit record not encodable"))?;
        let record = Bytes::try_from(bytes)?;
        let hash = chain_hash(prev, seq, record.as_slice());
        Ok(Self { seq, record, hash })
    }

    /// Whether this entry's hash follows from `prev`.
    pub fn links_from(&self, prev: &Hash32) -> bool {
        chain_hash(prev, self.seq, self.record.as_slice()) == self.hash
    }
}

/// The chain hash of an entry: SHA-256 over the domain string, the previous hash, the
/// sequence (u64 big-endian), the record length (u32 big-endian) and the record bytes.
pub fn chain_hash(prev: &Hash32, seq: u64, record: &[u8]) -> Hash32 {
    let mut h = Sha256::new();
    h.update(CHAIN_DOMAIN);
    h.update(prev.0);
    h.update(seq.to_be_bytes());
    // A record is at most MAX_AUDIT_RECORD bytes; saturate rather than wrap if a
    // caller hashes something larger, so distinct inputs still hash distinctly.
    h.update(
        u32::try_from(record.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    h.update(record);
    Hash32(h.finalize().into())
}

/// Checks that `entries` link one to the next from `prev`. Returns the sequence of the
/// first entry that does not, or the final hash if all do.
pub fn verify_chain<'a>(
    prev: &Hash32,
    entries: impl IntoIterator<Item = &'a AuditEntry>,
) -> Result<Hash32, u64> {
    let mut head = *prev;
    for e in entries {
        if !e.links_from(&head) {
            return Err(e.seq);
        }
        head = e.hash;
    }
    Ok(head)
}

/// Purpose of use (v3 ActReason).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Purpose {
    /// `TREAT`: direct care under a lease.
    Treat,
    /// `ETREAT`: emergency access outside the caller's lease, with the reason given.
    EmergencyTreat {
        /// Why, as entered by the clinician.
        reason: Text<1024>,
    },
}

/// What was asked for.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum AuditAction {
    /// Listed the caseload.
    ListCaseload,
    /// Searched for a patient by NHS number.
    SearchPatient,
    /// Read demographics.
    ReadPatient,
    /// Read alerts.
    ReadAlerts,
    /// Read allergies.
    ReadAllergies,
    /// Read medications.
    ReadMedications,
    /// Read key contacts.
    ReadContacts,
    /// Read the whole summary.
    ReadSummary,
}

/// Why access was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum DenyReason {
    /// The patient is on no lease the caller holds.
    NotOnCaseload,
    /// The lease has not started.
    LeaseNotYetValid,
    /// The lease has ended.
    LeaseExpired,
    /// The patient objected to sharing.
    Objected,
    /// The user is not in the lease's audience.
    UserNotPermitted,
    /// The lease's view does not include what was asked for.
    ViewNotPermitted,
    /// Too long since the last contact with the hub.
    OfflineTooLong,
    /// Emergency access asked for where no lease allows it, or without a reason.
    EmergencyNotPermitted,
    /// The client token is unknown or revoked.
    ClientNotAuthorised,
    /// No record is held for this patient.
    UnknownPatient,
}

/// The outcome of an access.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum AuditOutcome {
    /// Data was returned.
    Served,
    /// Refused.
    Denied(DenyReason),
}

/// One access, served or denied, as logged on the device before it is answered.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When (trusted time).
    pub at: Timestamp,
    /// Acting member of staff as the client software said.
    pub user: StaffId,
    /// Name of the client software's registration on this device.
    pub client: Text<64>,
    /// Purpose of use.
    pub purpose: Purpose,
    /// What was asked for.
    pub action: AuditAction,
    /// The patient, if the request named one.
    pub patient: Option<NhsNumber>,
    /// The lease that allowed it, if any.
    pub lease: Option<LeaseId>,
    /// The view applied, if any.
    pub view: Option<View>,
    /// Served or denied, and why.
    pub outcome: AuditOutcome,
    /// The local request id (also in the API response), to tie entries to requests.
    pub request_id: u64,
}

impl AuditRecord {
    /// Decode one record from an entry's bytes, refusing trailing or non-canonical
    /// bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_canonical(bytes)
    }
}

impl fmt::Debug for AuditRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditRecord")
            .field("at", &self.at)
            .field("user", &self.user)
            .field("action", &self.action)
            .field("patient", &self.patient)
            .field("lease", &self.lease)
            .field("outcome", &self.outcome)
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}
