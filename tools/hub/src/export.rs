//! The hub's stored audit entries rendered for people (FHIR AuditEvent NDJSON, IHE BALP;
//! text lines) through the renderings the device shares, [`carecache_fhir::audit`].

use carecache_fhir::audit::{self as audit_fhir, Entry};
use serde_json::Value;

use crate::audit::StoredEntry;

fn entry(e: &StoredEntry) -> Entry<'_> {
    Entry {
        device: &e.device,
        seq: e.seq,
        record: &e.record,
    }
}

/// One stored entry as a FHIR AuditEvent.
pub fn audit_event(e: &StoredEntry) -> Value {
    audit_fhir::audit_event(&entry(e)).to_json()
}

/// One stored entry as a line of text (patients by NHS number only).
pub fn describe(e: &StoredEntry) -> String {
    audit_fhir::describe(&entry(e))
}

/// True for an emergency (ETREAT) access.
pub fn is_emergency(e: &StoredEntry) -> bool {
    audit_fhir::is_emergency(&e.record)
}
