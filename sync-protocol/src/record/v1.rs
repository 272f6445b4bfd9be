//! The record as protocol version 1 carried it, kept so that a device still reads a
//! version-1 hub, and a store still opens records sealed before version 2.
//!
//! Version 1 knew only SNOMED CT codes, always named an ODS organisation and a last
//! update time, had no partial objections and no count of unreadable items. Every v1
//! record converts to the current one without loss; a current record converts back with
//! every section v1 cannot carry whole marked "not available" (fail visible, never a
//! shorter list).

use serde::{Deserialize, Serialize};

use super::{
    AlertCategory, AlertSeverity, AllergyCategory, AllergyStatus, ContactRole, Course, Criticality,
    Demographics, MAX_ALERTS, MAX_ALLERGIES, MAX_CONTACTS, MAX_MEDICATIONS, MAX_REACTIONS,
    MedicationStatus, Period, ReactionSeverity, Unreadable,
};
use crate::error::FieldError;
use crate::nhs::NhsNumber;
use crate::types::{
    BoundedVec, Code, Date, OdsCode, RecordVersion, SctId, SourceId, Text, Timestamp,
};

/// Why an item cannot be written as version 1.
const NOT_REPRESENTABLE: FieldError =
    FieldError::Inconsistent("record uses what protocol version 1 cannot carry");

/// v1 coding: SNOMED CT only.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Coding {
    /// SNOMED CT (or dm+d) concept.
    pub code: SctId,
    /// Display text.
    pub display: Text<512>,
}

/// v1 provenance: organisation and time always present.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Provenance {
    /// Source organisation.
    pub organisation: OdsCode,
    /// Last update.
    pub last_updated: Timestamp,
}

/// v1 section: no partial objections.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub enum Section<T, const N: usize> {
    /// Not available.
    NotAvailable,
    /// None recorded.
    NoneRecorded,
    /// Entries (never zero).
    Entries(BoundedVec<T, N>),
}

#[derive(Deserialize)]
enum RawSection<T, const N: usize> {
    NotAvailable,
    NoneRecorded,
    Entries(BoundedVec<T, N>),
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Section<T, N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match RawSection::<T, N>::deserialize(d)? {
            RawSection::NotAvailable => Self::NotAvailable,
            RawSection::NoneRecorded => Self::NoneRecorded,
            RawSection::Entries(items) if items.is_empty() => {
                return Err(crate::error::field_error(FieldError::Inconsistent(
                    "empty Entries section (use NoneRecorded)",
                )));
            }
            RawSection::Entries(items) => Self::Entries(items),
        })
    }
}

/// v1 alert.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Alert {
    pub source_id: SourceId,
    pub category: AlertCategory,
    pub code: Coding,
    pub detail: Option<Text<2048>>,
    pub period: Period,
    pub severity: AlertSeverity,
    pub provenance: Provenance,
}

/// v1 reaction.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Reaction {
    pub manifestation: Option<Coding>,
    pub description: Option<Text<512>>,
    pub severity: Option<ReactionSeverity>,
}

/// v1 allergy.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Allergy {
    pub source_id: SourceId,
    pub substance: Coding,
    pub category: Option<AllergyCategory>,
    pub criticality: Option<Criticality>,
    pub status: AllergyStatus,
    pub reactions: BoundedVec<Reaction, MAX_REACTIONS>,
    pub onset: Option<Date>,
    pub note: Option<Text<2048>>,
    pub provenance: Provenance,
}

/// v1 medication.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Medication {
    pub source_id: SourceId,
    pub medicine: Coding,
    pub dose_text: Option<Text<1024>>,
    pub status: MedicationStatus,
    pub course: Option<Course>,
    pub started: Option<Date>,
    pub last_issued: Option<Date>,
    pub prescribed_elsewhere: bool,
    pub provenance: Provenance,
}

/// v1 key contact.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct KeyContact {
    pub role: ContactRole,
    pub name: Text<128>,
    pub relationship: Option<Text<64>>,
    pub phone: Option<Text<32>>,
    pub provenance: Provenance,
}

/// v1 record.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct PatientRecord {
    pub nhs_number: NhsNumber,
    pub version: RecordVersion,
    pub demographics: Demographics,
    pub alerts: Section<Alert, MAX_ALERTS>,
    pub allergies: Section<Allergy, MAX_ALLERGIES>,
    pub medications: Section<Medication, MAX_MEDICATIONS>,
    pub contacts: Section<KeyContact, MAX_CONTACTS>,
    pub withheld: u16,
}

// ---- v1 → current: always ------------------------------------------------------------

impl From<Coding> for crate::types::Coding {
    fn from(c: Coding) -> Self {
        Self::snomed(c.code, c.display)
    }
}

impl From<Provenance> for crate::types::Provenance {
    fn from(p: Provenance) -> Self {
        Self {
            organisation: Some(p.organisation),
            recorded_by: None,
            last_updated: Some(p.last_updated),
        }
    }
}

fn section_up<A, B: From<A>, const N: usize>(s: Section<A, N>) -> super::Section<B, N> {
    match s {
        Section::NotAvailable => super::Section::NotAvailable,
        Section::NoneRecorded => super::Section::NoneRecorded,
        Section::Entries(items) => {
            let items: Vec<B> = items.into_inner().into_iter().map(B::from).collect();
            // Same count, same limit: cannot fail.
            super::Section::from_items(items).unwrap_or(super::Section::NotAvailable)
        }
    }
}

impl From<Alert> for super::Alert {
    fn from(a: Alert) -> Self {
        Self {
            source_id: a.source_id,
            category: a.category,
            code: a.code.into(),
            detail: a.detail,
            period: a.period,
            severity: a.severity,
            provenance: a.provenance.into(),
        }
    }
}

impl From<Reaction> for super::Reaction {
    fn from(r: Reaction) -> Self {
        Self {
            manifestation: r.manifestation.map(Into::into),
            description: r.description,
            severity: r.severity,
        }
    }
}

impl From<Allergy> for super::Allergy {
    fn from(a: Allergy) -> Self {
        let reactions: Vec<super::Reaction> = a
            .reactions
            .into_inner()
            .into_iter()
            .map(Into::into)
            .collect();
        Self {
            source_id: a.source_id,
            substance: a.substance.into(),
            category: a.category,
            criticality: a.criticality,
            status: a.status,
            reactions: BoundedVec::try_from(reactions).unwrap_or_default(),
            onset: a.onset,
            note: a.note,
            provenance: a.provenance.into(),
            verification: None,
        }
    }
}

impl From<Medication> for super::Medication {
    fn from(m: Medication) -> Self {
        Self {
            source_id: m.source_id,
            medicine: m.medicine.into(),
            dose_text: m.dose_text,
            status: m.status,
            course: m.course,
            started: m.started,
            last_issued: m.last_issued,
            prescribed_elsewhere: m.prescribed_elsewhere,
            provenance: m.provenance.into(),
            ended: None,
            dosage: None,
        }
    }
}

impl From<KeyContact> for super::KeyContact {
    fn from(c: KeyContact) -> Self {
        Self {
            role: c.role,
            name: c.name,
            relationship: c.relationship,
            phone: c.phone,
            provenance: c.provenance.into(),
        }
    }
}

impl From<PatientRecord> for super::PatientRecord {
    fn from(r: PatientRecord) -> Self {
        Self {
            nhs_number: r.nhs_number,
            version: r.version,
            demographics: r.demographics,
            alerts: section_up(r.alerts),
            allergies: section_up(r.allergies),
            medications: section_up(r.medications),
            contacts: section_up(r.contacts),
            withheld: r.withheld,
            unreadable: Unreadable::default(),
        }
    }
}

// ---- current → v1: what v1 can say, and "not available" for the rest -------------

impl TryFrom<&crate::types::Coding> for Coding {
    type Error = FieldError;
    fn try_from(c: &crate::types::Coding) -> Result<Self, FieldError> {
        match &c.code {
            Some(Code::Snomed(id)) => Ok(Self {
                code: *id,
                display: c.display.clone(),
            }),
            _ => Err(NOT_REPRESENTABLE),
        }
    }
}

impl TryFrom<&crate::types::Provenance> for Provenance {
    type Error = FieldError;
    fn try_from(p: &crate::types::Provenance) -> Result<Self, FieldError> {
        match (&p.organisation, p.last_updated, &p.recorded_by) {
            (Some(o), Some(t), None) => Ok(Self {
                organisation: o.clone(),
                last_updated: t,
            }),
            _ => Err(NOT_REPRESENTABLE),
        }
    }
}

/// A section as v1 can carry it: every item converted, or — when any item cannot be, the
/// hub could not read some, or the patient withheld the section — "not available".
/// Never a shorter list that would look complete.
fn section_down<'a, A: 'a, B, const N: usize>(
    s: &'a super::Section<A, N>,
    unreadable: u16,
    f: impl Fn(&'a A) -> Result<B, FieldError>,
) -> Section<B, N> {
    let items = match s {
        super::Section::NotAvailable | super::Section::WithheldByPatient => {
            return Section::NotAvailable;
        }
        _ if unreadable > 0 => return Section::NotAvailable,
        super::Section::NoneRecorded => return Section::NoneRecorded,
        super::Section::Entries(items) => items,
    };
    items
        .iter()
        .map(f)
        .collect::<Result<Vec<B>, _>>()
        .and_then(BoundedVec::try_from)
        .map_or(Section::NotAvailable, Section::Entries)
}

impl From<&super::PatientRecord> for PatientRecord {
    /// The record for a version-1 peer (see [`section_down`]); a record that came from
    /// version 1 converts back to exactly what it was.
    fn from(r: &super::PatientRecord) -> Self {
        let u = r.unreadable;
        Self {
            nhs_number: r.nhs_number,
            version: r.version,
            demographics: r.demographics.clone(),
            alerts: section_down(&r.alerts, u.alerts, |a| {
                Ok(Alert {
                    source_id: a.source_id.clone(),
                    category: a.category,
                    code: (&a.code).try_into()?,
                    detail: a.detail.clone(),
                    period: a.period,
                    severity: a.severity,
                    provenance: (&a.provenance).try_into()?,
                })
            }),
            allergies: section_down(&r.allergies, u.allergies, |a| {
                let reactions = a
                    .reactions
                    .iter()
                    .map(|x| {
                        Ok(Reaction {
                            manifestation: x
                                .manifestation
                                .as_ref()
                                .map(TryInto::try_into)
                                .transpose()?,
                            description: x.description.clone(),
                            severity: x.severity,
                        })
                    })
                    .collect::<Result<Vec<_>, FieldError>>()?;
                Ok(Allergy {
                    source_id: a.source_id.clone(),
                    substance: (&a.substance).try_into()?,
                    category: a.category,
                    criticality: a.criticality,
                    status: a.status,
                    reactions: BoundedVec::try_from(reactions)?,
                    onset: a.onset,
                    note: a.note.clone(),
                    provenance: (&a.provenance).try_into()?,
                })
            }),
            medications: section_down(&r.medications, u.medications, |m| {
                Ok(Medication {
                    source_id: m.source_id.clone(),
                    medicine: (&m.medicine).try_into()?,
                    dose_text: m.dose_text.clone(),
                    status: m.status,
                    course: m.course,
                    started: m.started,
                    last_issued: m.last_issued,
                    prescribed_elsewhere: m.prescribed_elsewhere,
                    provenance: (&m.provenance).try_into()?,
                })
            }),
            contacts: section_down(&r.contacts, u.contacts, |c| {
                Ok(KeyContact {
                    role: c.role,
                    name: c.name.clone(),
                    relationship: c.relationship.clone(),
                    phone: c.phone.clone(),
                    provenance: (&c.provenance).try_into()?,
                })
            }),
            withheld: r.withheld,
        }
    }
}
