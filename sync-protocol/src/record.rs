//! A patient's record as the device holds it: identification, alerts, allergies,
//! medications and key contacts, each item with its provenance.
//!
//! Every section says whether it is "none recorded" or "not available"; the two are
//! different types of answer and a reader must never confuse them. `Debug` of a record
//! shows counts and states, never names, dates or clinical text.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::nhs::NhsNumber;
use crate::types::{
    BoundedVec, Coding, Date, Decimal, OdsCode, PostcodeDistrict, Provenance, RecordVersion,
    SourceId, Text, deserialize_via,
};

pub mod v1;
pub mod v2;

/// Most alerts in one record.
pub const MAX_ALERTS: usize = 64;
/// Most allergies in one record.
pub const MAX_ALLERGIES: usize = 64;
/// Most medications in one record.
pub const MAX_MEDICATIONS: usize = 256;
/// Most key contacts in one record.
pub const MAX_CONTACTS: usize = 16;
/// Most reactions on one allergy.
pub const MAX_REACTIONS: usize = 8;

/// One patient's record. Records travel whole: a change to any item sends the record
/// again with a new version.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientRecord {
    /// The patient.
    pub nhs_number: NhsNumber,
    /// The hub's change-log sequence when this record last changed.
    pub version: RecordVersion,
    /// Who the patient is, enough to identify the right person.
    pub demographics: Demographics,
    /// Alerts (FHIR Flag).
    pub alerts: Section<Alert, MAX_ALERTS>,
    /// Allergies and intolerances (FHIR AllergyIntolerance).
    pub allergies: Section<Allergy, MAX_ALLERGIES>,
    /// Medications (FHIR MedicationStatement).
    pub medications: Section<Medication, MAX_MEDICATIONS>,
    /// Key contacts (next of kin, carers), the only section besides alerts that the
    /// social-care view shows.
    pub contacts: Section<KeyContact, MAX_CONTACTS>,
    /// How many items were withheld for confidentiality, across all sections. Never
    /// their category: a count per section would disclose it.
    pub withheld: u16,
    /// Items the source holds but the hub could not read, per section (since protocol
    /// version 2). Readers say how many could not be shown beside the items that could.
    pub unreadable: Unreadable,
}

/// How many items of each section the hub could not read. Not patient data: a count of
/// the hub's mapping failures.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct Unreadable {
    /// Alerts.
    pub alerts: u16,
    /// Allergies.
    pub allergies: u16,
    /// Medications.
    pub medications: u16,
    /// Key contacts.
    pub contacts: u16,
}

impl Unreadable {
    /// True if every count is zero.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl fmt::Debug for PatientRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PatientRecord")
            .field("nhs_number", &self.nhs_number)
            .field("version", &self.version)
            .field("alerts", &self.alerts)
            .field("allergies", &self.allergies)
            .field("medications", &self.medications)
            .field("contacts", &self.contacts)
            .field("withheld", &self.withheld)
            .field("unreadable", &self.unreadable)
            .finish_non_exhaustive()
    }
}

/// What one section of a record holds.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub enum Section<T, const N: usize> {
    /// The source could not provide this section (not shared, source down, not
    /// supported). Readers must say "information not available", never "none".
    NotAvailable,
    /// The source was consulted and holds no entries. This is not an assertion that
    /// the patient has none: an explicit "no known allergies" is an entry (SNOMED CT
    /// 716186003 or a descendant) with its own provenance.
    NoneRecorded,
    /// One or more entries (never zero: that is `NoneRecorded`).
    Entries(BoundedVec<T, N>),
    /// Withheld at the patient's request: a partial objection (a Consent whose deny
    /// provision names this section's data class). Readers must say so, never "none".
    /// Since protocol version 2.
    WithheldByPatient,
}

#[derive(Deserialize)]
enum RawSection<T, const N: usize> {
    NotAvailable,
    NoneRecorded,
    Entries(BoundedVec<T, N>),
    WithheldByPatient,
}

impl<T, const N: usize> Section<T, N> {
    /// The entries; empty unless the section is `Entries`.
    pub fn entries(&self) -> &[T] {
        match self {
            Self::Entries(items) => items,
            Self::NotAvailable | Self::NoneRecorded | Self::WithheldByPatient => &[],
        }
    }

    /// Build `Entries`, or `NoneRecorded` when `items` is empty.
    pub fn from_items(items: Vec<T>) -> Result<Self, FieldError> {
        if items.is_empty() {
            return Ok(Self::NoneRecorded);
        }
        Ok(Self::Entries(BoundedVec::try_from(items)?))
    }
}

impl<T, const N: usize> TryFrom<RawSection<T, N>> for Section<T, N> {
    type Error = FieldError;
    fn try_from(raw: RawSection<T, N>) -> Result<Self, FieldError> {
        Ok(match raw {
            RawSection::NotAvailable => Self::NotAvailable,
            RawSection::NoneRecorded => Self::NoneRecorded,
            RawSection::Entries(items) if items.is_empty() => {
                return Err(FieldError::Inconsistent(
                    "empty Entries section (use NoneRecorded)",
                ));
            }
            RawSection::Entries(items) => Self::Entries(items),
            RawSection::WithheldByPatient => Self::WithheldByPatient,
        })
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for Section<T, N> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawSection::<T, N>::deserialize(d)?;
        Self::try_from(raw).map_err(crate::error::field_error)
    }
}

impl<T, const N: usize> fmt::Debug for Section<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAvailable => f.write_str("NotAvailable"),
            Self::NoneRecorded => f.write_str("NoneRecorded"),
            Self::Entries(items) => write!(f, "Entries({})", items.len()),
            Self::WithheldByPatient => f.write_str("WithheldByPatient"),
        }
    }
}

/// Administrative sex, as FHIR `gender`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Sex {
    /// `male`
    Male,
    /// `female`
    Female,
    /// `other`
    Other,
    /// `unknown`
    Unknown,
}

/// A person's name.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct HumanName {
    /// Family name.
    pub family: Text<128>,
    /// Given names, space-separated, in order.
    pub given: Text<128>,
    /// Title, e.g. `Mrs`.
    pub prefix: Option<Text<32>>,
}

/// Who the patient is. For a restricted ("S-flagged") patient the location-revealing
/// fields are absent.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct Demographics {
    /// Name.
    pub name: HumanName,
    /// Date of birth.
    pub birth_date: Date,
    /// Administrative sex.
    pub sex: Sex,
    /// Postcode district; absent for restricted patients.
    pub postcode_district: Option<PostcodeDistrict>,
    /// Registered GP practice; absent for restricted patients.
    pub gp_practice: Option<OdsCode>,
    /// Restricted record (PDS confidentiality `R`): address and GP are never held.
    pub restricted: bool,
}

#[derive(Deserialize)]
struct RawDemographics {
    name: HumanName,
    birth_date: Date,
    sex: Sex,
    postcode_district: Option<PostcodeDistrict>,
    gp_practice: Option<OdsCode>,
    restricted: bool,
}

impl TryFrom<RawDemographics> for Demographics {
    type Error = FieldError;
    fn try_from(r: RawDemographics) -> Result<Self, FieldError> {
        if r.restricted && (r.postcode_district.is_some() || r.gp_practice.is_some()) {
            return Err(FieldError::Inconsistent(
                "restricted patient with location fields",
            ));
        }
        Ok(Self {
            name: r.name,
            birth_date: r.birth_date,
            sex: r.sex,
            postcode_district: r.postcode_district,
            gp_practice: r.gp_practice,
            restricted: r.restricted,
        })
    }
}
deserialize_via!(Demographics, RawDemographics);

impl Demographics {
    /// Build demographics, refusing location fields on a restricted patient.
    pub fn new(
        name: HumanName,
        birth_date: Date,
        sex: Sex,
        postcode_district: Option<PostcodeDistrict>,
        gp_practice: Option<OdsCode>,
        restricted: bool,
    ) -> Result<Self, FieldError> {
        Self::try_from(RawDemographics {
            name,
            birth_date,
            sex,
            postcode_district,
            gp_practice,
            restricted,
        })
    }
}

/// A period; either end may be open. `start` is never after `end`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Default)]
pub struct Period {
    /// Start, if known.
    pub start: Option<Date>,
    /// End, if any.
    pub end: Option<Date>,
}

#[derive(Deserialize)]
struct RawPeriod {
    start: Option<Date>,
    end: Option<Date>,
}

impl TryFrom<RawPeriod> for Period {
    type Error = FieldError;
    fn try_from(r: RawPeriod) -> Result<Self, FieldError> {
        if let (Some(s), Some(e)) = (r.start, r.end)
            && s > e
        {
            return Err(FieldError::Inconsistent("period ends before it starts"));
        }
        Ok(Self {
            start: r.start,
            end: r.end,
        })
    }
}
deserialize_via!(Period, RawPeriod);

impl Period {
    /// Build a period, refusing one that ends before it starts.
    pub fn new(start: Option<Date>, end: Option<Date>) -> Result<Self, FieldError> {
        Self::try_from(RawPeriod { start, end })
    }
}

/// What kind of alert this is.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum AlertCategory {
    /// Communication needs: interpreter, sign language, accessible information.
    CommunicationNeed,
    /// Reasonable adjustments (e.g. dementia or learning-disability support).
    ReasonableAdjustment,
    /// Severe allergy or chronic condition warning.
    ClinicalWarning,
    /// Treatment restriction, e.g. declines blood products for religious reasons.
    TreatmentRestriction,
    /// Safeguarding concern for the patient or their household.
    Safeguarding,
    /// End-of-life wishes: DNACPR, preferred place of death.
    EndOfLife,
    /// Anything else the source flags.
    Other,
}

/// How urgently a crew must see an alert.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub enum AlertSeverity {
    /// Background information.
    Information,
    /// Should be read before treatment.
    Warning,
    /// Must be read before treatment (e.g. DNACPR, safeguarding, severe allergy).
    HighRisk,
}

/// An alert (FHIR Flag).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Alert {
    /// Upstream resource id.
    pub source_id: SourceId,
    /// Category.
    pub category: AlertCategory,
    /// The concept (SNOMED CT, a local code, or text alone) and its display.
    pub code: Coding,
    /// Free-text detail.
    pub detail: Option<Text<2048>>,
    /// When it applies.
    pub period: Period,
    /// Severity.
    pub severity: AlertSeverity,
    /// Source and last update.
    pub provenance: Provenance,
}

/// FHIR AllergyIntolerance `category`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum AllergyCategory {
    /// `food`
    Food,
    /// `medication`
    Medication,
    /// `environment`
    Environment,
    /// `biologic`
    Biologic,
}

/// FHIR AllergyIntolerance `criticality`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Criticality {
    /// `low`
    Low,
    /// `high`
    High,
    /// `unable-to-assess`
    UnableToAssess,
}

/// FHIR AllergyIntolerance `clinicalStatus` (entered-in-error items never travel).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum AllergyStatus {
    /// `active`
    Active,
    /// `inactive`
    Inactive,
    /// `resolved`
    Resolved,
}

/// FHIR AllergyIntolerance `verificationStatus` (refuted and entered-in-error items never
/// travel). Since protocol version 2.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum AllergyVerification {
    /// `unconfirmed`
    Unconfirmed,
    /// `provisional`
    Provisional,
    /// `differential`
    Differential,
    /// `confirmed`
    Confirmed,
}

impl AllergyVerification {
    /// Every status, for readers that map codes.
    pub const ALL: [Self; 4] = [
        Self::Unconfirmed,
        Self::Provisional,
        Self::Differential,
        Self::Confirmed,
    ];
}

/// FHIR `reaction.severity`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ReactionSeverity {
    /// `mild`
    Mild,
    /// `moderate`
    Moderate,
    /// `severe`
    Severe,
}

/// One reaction to an allergen.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Reaction {
    /// Coded manifestation; absent when not coded (FHIR nullFlavor `NI`/`UNC`).
    pub manifestation: Option<Coding>,
    /// Free-text description.
    pub description: Option<Text<512>>,
    /// Severity, if recorded.
    pub severity: Option<ReactionSeverity>,
}

/// An allergy or intolerance (FHIR AllergyIntolerance).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Allergy {
    /// Upstream resource id.
    pub source_id: SourceId,
    /// Causative agent (substance, product, or a "no known allergy" concept).
    pub substance: Coding,
    /// Category, if recorded.
    pub category: Option<AllergyCategory>,
    /// Criticality, if recorded.
    pub criticality: Option<Criticality>,
    /// Clinical status.
    pub status: AllergyStatus,
    /// Reactions.
    pub reactions: BoundedVec<Reaction, MAX_REACTIONS>,
    /// Onset, possibly partial.
    pub onset: Option<Date>,
    /// Notes.
    pub note: Option<Text<2048>>,
    /// Source and last update.
    pub provenance: Provenance,
    /// Verification status, when the source states it (since protocol version 2). A
    /// reader never presents a confirmed allergy as unconfirmed, nor an absent status as
    /// either.
    pub verification: Option<AllergyVerification>,
}

/// FHIR MedicationStatement `status` (entered-in-error items never travel).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum MedicationStatus {
    /// `active`
    Active,
    /// `completed`
    Completed,
    /// `stopped`
    Stopped,
    /// `on-hold`
    OnHold,
    /// `intended`
    Intended,
    /// `unknown`
    Unknown,
}

/// Course of therapy (UK Core MedicationRequest course of therapy).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Course {
    /// `acute`
    Acute,
    /// `continuous` (repeat)
    Repeat,
    /// `continuous-repeating-dispensing`
    RepeatDispensing,
}

/// A medication (FHIR MedicationStatement).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Medication {
    /// Upstream resource id.
    pub source_id: SourceId,
    /// dm+d (or SNOMED CT, Read, local, or text alone) product and display.
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
    /// Prescribed by another organisation than the GP practice (e.g. hospital).
    pub prescribed_elsewhere: bool,
    /// Source and last update.
    pub provenance: Provenance,
    /// When it ended (`effectivePeriod.end`), if it has (since protocol version 2).
    pub ended: Option<Date>,
    /// The dose as the source structured it, when it did (since protocol version 3).
    /// `dose_text` is then its words when the source wrote none.
    pub dosage: Option<Dosage>,
}

/// A time unit of a dose schedule (FHIR `Timing.repeat.periodUnit`, UCUM).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum PeriodUnit {
    /// `s`
    Second,
    /// `min`
    Minute,
    /// `h`
    Hour,
    /// `d`
    Day,
    /// `wk`
    Week,
    /// `mo`
    Month,
    /// `a`
    Year,
}

/// An amount with its unit as written (`2 tablet`, `5 mL`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct DoseQuantity {
    /// The amount.
    pub value: Decimal,
    /// Its unit, as the source wrote it (UCUM code or words).
    pub unit: Option<Text<64>>,
}

/// A structured dose (FHIR `Dosage`): how much, how often, by which route, and whether
/// only when required. Since protocol version 3.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Dosage {
    /// How much each time.
    pub dose: Option<DoseQuantity>,
    /// How many times per period.
    pub frequency: Option<u16>,
    /// The period's length, in `period_unit`s.
    pub period: Option<Decimal>,
    /// The period's unit.
    pub period_unit: Option<PeriodUnit>,
    /// The route (oral, inhaled, …).
    pub route: Option<Coding>,
    /// Only when required (PRN).
    pub as_needed: bool,
}

/// A key contact's role.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ContactRole {
    /// Next of kin.
    NextOfKin,
    /// Carer.
    Carer,
    /// Lasting power of attorney (health and welfare) or court deputy.
    PowerOfAttorney,
    /// Key worker or care coordinator.
    KeyWorker,
    /// Other contact.
    Other,
}

/// A key contact.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct KeyContact {
    /// Role.
    pub role: ContactRole,
    /// Name.
    pub name: Text<128>,
    /// Relationship as recorded, e.g. "daughter".
    pub relationship: Option<Text<64>>,
    /// Telephone number.
    pub phone: Option<Text<32>>,
    /// Source and last update.
    pub provenance: Provenance,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restricted_patients_carry_no_location() {
        let name = HumanName {
            family: Text::new("Test").unwrap(),
            given: Text::new("Pat").unwrap(),
            prefix: None,
        };
        let dob = Date::ymd(1950, 1, 1).unwrap();
        let pc = Some(PostcodeDistrict::new("WV10").unwrap());
        assert!(Demographics::new(name.clone(), dob, Sex::Female, pc.clone(), None, false).is_ok());
        assert_eq!(
            Demographics::new(name, dob, Sex::Female, pc, None, true),
            Err(FieldError::Inconsistent(
                "restricted patient with location fields"
            ))
        );
    }

    #[test]
    fn empty_entries_are_none_recorded() {
        let s: Section<Alert, 4> = Section::from_items(vec![]).unwrap();
        assert_eq!(s, Section::NoneRecorded);
        assert!(Section::<Alert, 4>::try_from(RawSection::Entries(BoundedVec::new())).is_err());
    }
}
