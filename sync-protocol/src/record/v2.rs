//! The record as protocol version 2 carried it, kept so that a device still reads a
//! version-2 hub (and a version-3 hub still answers a version-2 device), and a store
//! still opens records sealed under schema 2.
//!
//! Version 2 differs from version 3 only in the medication: it has no structured
//! dosage. The other types are the current ones, unchanged since version 2; a change to
//! any of them must first freeze its version-2 form here (the version-2 vectors, which
//! must decode and re-encode byte for byte, fail otherwise). A v2 record converts to the
//! current one without loss; a current record converts back with its structured dosage
//! left out — its words stay in `dose_text`, so a crew on a version-2 device still reads
//! the dose.

use serde::{Deserialize, Serialize};

use super::{
    Alert, Allergy, Course, Demographics, KeyContact, MAX_ALERTS, MAX_ALLERGIES, MAX_CONTACTS,
    MAX_MEDICATIONS, MedicationStatus, Section, Unreadable,
};
use crate::nhs::NhsNumber;
use crate::types::{Coding, Date, Provenance, RecordVersion, SourceId, Text};

/// A v2 medication: no structured dosage.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Medication {
    /// Upstream resource id.
    pub source_id: SourceId,
    /// Product and display.
    pub medicine: Coding,
    /// Dose instructions as written.
    pub dose_text: Option<Text<1024>>,
    /// Status.
    pub status: MedicationStatus,
    /// Acute or repeat, if known.
    pub course: Option<Course>,
    /// Start date.
    pub started: Option<Date>,
    /// Last issue date.
    pub last_issued: Option<Date>,
    /// Prescribed by another organisation than the GP practice.
    pub prescribed_elsewhere: bool,
    /// Source and last update.
    pub provenance: Provenance,
    /// When it ended.
    pub ended: Option<Date>,
}

/// A v2 record.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[allow(missing_docs, reason = "the fields are the current record's")]
pub struct PatientRecord {
    pub nhs_number: NhsNumber,
    pub version: RecordVersion,
    pub demographics: Demographics,
    pub alerts: Section<Alert, MAX_ALERTS>,
    pub allergies: Section<Allergy, MAX_ALLERGIES>,
    pub medications: Section<Medication, MAX_MEDICATIONS>,
    pub contacts: Section<KeyContact, MAX_CONTACTS>,
    pub withheld: u16,
    pub unreadable: Unreadable,
}

impl From<Medication> for super::Medication {
    fn from(m: Medication) -> Self {
        Self {
            source_id: m.source_id,
            medicine: m.medicine,
            dose_text: m.dose_text,
            status: m.status,
            course: m.course,
            started: m.started,
            last_issued: m.last_issued,
            prescribed_elsewhere: m.prescribed_elsewhere,
            provenance: m.provenance,
            ended: m.ended,
            dosage: None,
        }
    }
}

impl From<&super::Medication> for Medication {
    fn from(m: &super::Medication) -> Self {
        Self {
            source_id: m.source_id.clone(),
            medicine: m.medicine.clone(),
            dose_text: m.dose_text.clone(),
            status: m.status,
            course: m.course,
            started: m.started,
            last_issued: m.last_issued,
            prescribed_elsewhere: m.prescribed_elsewhere,
            provenance: m.provenance.clone(),
            ended: m.ended,
        }
    }
}

fn map_section<A, B, const N: usize>(s: &Section<A, N>, f: impl Fn(&A) -> B) -> Section<B, N> {
    match s {
        Section::NotAvailable => Section::NotAvailable,
        Section::NoneRecorded => Section::NoneRecorded,
        Section::WithheldByPatient => Section::WithheldByPatient,
        // Same count, same limit: cannot fail.
        Section::Entries(items) => Section::from_items(items.iter().map(f).collect::<Vec<B>>())
            .unwrap_or(Section::NotAvailable),
    }
}

impl From<PatientRecord> for super::PatientRecord {
    fn from(r: PatientRecord) -> Self {
        Self {
            nhs_number: r.nhs_number,
            version: r.version,
            demographics: r.demographics,
            alerts: r.alerts,
            allergies: r.allergies,
            medications: map_section(&r.medications, |m| super::Medication::from(m.clone())),
            contacts: r.contacts,
            withheld: r.withheld,
            unreadable: r.unreadable,
        }
    }
}

impl From<&super::PatientRecord> for PatientRecord {
    /// The record for a version-2 peer: everything but the structured dosage.
    fn from(r: &super::PatientRecord) -> Self {
        Self {
            nhs_number: r.nhs_number,
            version: r.version,
            demographics: r.demographics.clone(),
            alerts: r.alerts.clone(),
            allergies: r.allergies.clone(),
            medications: map_section(&r.medications, |m| Medication::from(m)),
            contacts: r.contacts.clone(),
            withheld: r.withheld,
            unreadable: r.unreadable,
        }
    }
}
