//! A synthetic shared care record: patients as the upstream holds them, with the things
//! a hub must filter — objections, sensitive items, entered-in-error items — and what a
//! device should end up with after the sharing rules (`expected`).

use rand::Rng;
use sync_protocol::NhsNumber;
use sync_protocol::record::{
    Alert, AlertCategory, AlertSeverity, Allergy, AllergyStatus, Medication, MedicationStatus,
    PatientRecord, Period,
};
use sync_protocol::types::{SourceId, Timestamp};

use crate::{Generator, coding};

/// Codes on the sensitive list (GP summary exclusion areas: sexually transmitted
/// infection, HIV, gender identity, termination of pregnancy). Synthetic items carrying
/// them must never reach a device; the hub's code-list file holds them (a hub test checks).
pub const SENSITIVE_CODES: &[(u64, &str)] = &[
    (86406008, "Human immunodeficiency virus infection"),
    (105629000, "Chlamydial infection"),
    (15628003, "Gonorrhoea"),
    (93461009, "Gender dysphoria"),
    (714812005, "Induced termination of pregnancy"),
];

/// Sensitivity labels (v3 ActCode) a source may put on an item's `meta.security`.
pub const SENSITIVE_LABELS: &[&str] = &["SEX", "STD", "HIV", "SDV"];

/// An item the hub must withhold, and how it is recognisable.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Withheld {
    /// An alert coded from the sensitive code list.
    CodedAlert(Alert),
    /// A medication carrying a sensitivity label.
    LabelledMedication(Medication, &'static str),
    /// A medication whose confidentiality is `R` (restricted).
    RestrictedMedication(Medication),
}

/// A patient's objection as the source records it (a FHIR Consent, provision deny).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Objection {
    /// When the objection was recorded.
    pub recorded_at: Timestamp,
    /// True if the patient later withdrew it (the Consent is inactive).
    pub withdrawn: bool,
}

/// One patient of the synthetic record.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SourcePatient {
    /// The FHIR id of the Patient resource (not the NHS number).
    pub fhir_id: String,
    /// What a device may hold after the sharing rules (its `version` is not meaningful:
    /// the hub assigns versions).
    pub expected: PatientRecord,
    /// Items the hub must withhold; `expected.withheld` is their count.
    pub withheld: Vec<Withheld>,
    /// An allergy recorded in error: never shared, never counted.
    pub entered_in_error: Option<Allergy>,
    /// The patient's objection, if any.
    pub objection: Option<Objection>,
    /// When the source last changed the Patient resource.
    pub last_updated: Timestamp,
}

impl SourcePatient {
    /// The NHS number.
    pub fn nhs_number(&self) -> NhsNumber {
        self.expected.nhs_number
    }

    /// True if a device may hold this patient (no standing objection).
    pub fn shareable(&self) -> bool {
        self.objection.is_none_or(|o| o.withdrawn)
    }

    /// True if a device may hold this patient and they have a high-risk alert and a
    /// recorded allergy: the patient to show first in demos and viewer tests.
    pub fn worth_showing(&self) -> bool {
        self.shareable()
            && !self.expected.allergies.entries().is_empty()
            && self
                .expected
                .alerts
                .entries()
                .iter()
                .any(|a| a.severity == AlertSeverity::HighRisk)
    }
}

impl Generator {
    /// `n` patients of a synthetic shared care record: about 2 % with a standing
    /// objection (and 0.5 % with a withdrawn one), 4 % with sensitive items, 3 % with an
    /// item entered in error.
    pub fn source_patients(&mut self, n: usize) -> Vec<SourcePatient> {
        (0..n).map(|i| self.source_patient(i)).collect()
    }

    fn source_patient(&mut self, index: usize) -> SourcePatient {
        let mut expected = self.patient();
        renumber(&mut expected, index);
        let mut withheld = Vec::new();
        if self.rng.random_ratio(1, 25) {
            for k in 0..self.rng.random_range(1..=2) {
                withheld.push(self.withheld_item(index, k));
            }
        }
        expected.withheld = u16::try_from(withheld.len()).unwrap_or(u16::MAX);
        let entered_in_error = self.rng.random_ratio(1, 33).then(|| {
            let mut a = self.allergy(0);
            a.source_id = id(&format!("alg-{index}-eie"));
            a
        });
        let objection = if self.rng.random_ratio(1, 50) {
            Some(Objection {
                recorded_at: self.provenance().last_updated,
                withdrawn: false,
            })
        } else if self.rng.random_ratio(1, 200) {
            Some(Objection {
                recorded_at: self.provenance().last_updated,
                withdrawn: true,
            })
        } else {
            None
        };
        SourcePatient {
            fhir_id: format!("pat-{index}-{:08x}", self.rng.random::<u32>()),
            expected,
            withheld,
            entered_in_error,
            objection,
            last_updated: self.provenance().last_updated,
        }
    }

    fn withheld_item(&mut self, index: usize, k: usize) -> Withheld {
        match self.rng.random_range(0..3) {
            0 => {
                let (code, display) = self.pick(SENSITIVE_CODES);
                Withheld::CodedAlert(Alert {
                    source_id: id(&format!("flag-{index}-s{k}")),
                    category: AlertCategory::ClinicalWarning,
                    code: coding(code, display),
                    detail: None,
                    period: Period::new(Some(self.date(2015, 2024)), None)
                        .unwrap_or_else(|_| unreachable!("open-ended")),
                    severity: AlertSeverity::Warning,
                    provenance: self.provenance(),
                })
            }
            1 => {
                let mut m = self.medication(0);
                m.source_id = id(&format!("med-{index}-s{k}"));
                m.status = MedicationStatus::Active;
                let label = self.pick(SENSITIVE_LABELS);
                Withheld::LabelledMedication(m, label)
            }
            _ => {
                let mut m = self.medication(0);
                m.source_id = id(&format!("med-{index}-r{k}"));
                Withheld::RestrictedMedication(m)
            }
        }
    }
}

/// Give every item a FHIR id unique in the dataset (`flag-7-0`, `alg-7-1`, …).
/// Empty alert, medication and contact sections become "none recorded" (the source
/// holds no entries); an empty allergy section stays "not available", which the source
/// states with an empty List (`emptyReason` unavailable).
fn renumber(record: &mut PatientRecord, index: usize) {
    use sync_protocol::record::Section;
    if matches!(record.alerts, Section::NotAvailable) {
        record.alerts = Section::NoneRecorded;
    }
    if matches!(record.medications, Section::NotAvailable) {
        record.medications = Section::NoneRecorded;
    }
    if matches!(record.contacts, Section::NotAvailable) {
        record.contacts = Section::NoneRecorded;
    }
    if let Section::Entries(items) = &mut record.alerts {
        let mut items = std::mem::take(items).into_inner();
        for (i, a) in items.iter_mut().enumerate() {
            a.source_id = id(&format!("flag-{index}-{i}"));
        }
        record.alerts = Section::from_items(items).unwrap_or(Section::NotAvailable);
    }
    if let Section::Entries(items) = &mut record.allergies {
        let mut items = std::mem::take(items).into_inner();
        for (i, a) in items.iter_mut().enumerate() {
            a.source_id = id(&format!("alg-{index}-{i}"));
            // A resolved allergy is still shared (shown as resolved), never dropped.
            if a.status == AllergyStatus::Inactive {
                a.status = AllergyStatus::Resolved;
            }
        }
        record.allergies = Section::from_items(items).unwrap_or(Section::NotAvailable);
    }
    if let Section::Entries(items) = &mut record.medications {
        let mut items = std::mem::take(items).into_inner();
        for (i, m) in items.iter_mut().enumerate() {
            m.source_id = id(&format!("med-{index}-{i}"));
        }
        record.medications = Section::from_items(items).unwrap_or(Section::NotAvailable);
    }
}

fn id(s: &str) -> SourceId {
    SourceId::new(s).unwrap_or_else(|_| unreachable!("short ASCII id"))
}
