//! The FHIR R4 resources and data types carecache reads and writes, as typed serde
//! structs: only the elements the mapping uses (unknown elements are ignored on read,
//! absent ones are left out on write).
//!
//! Reading is strict per element — an element of the wrong JSON type makes the resource
//! unreadable, which the source read reports and counts — except where [`Lenient`] says
//! otherwise: the views the hub needs from a resource it may not be able to read whole
//! (which patient it belongs to, its security labels and codes) never fail.

use serde::{Deserialize, Serialize};

/// An element that is read if it can be, and otherwise kept as "present but unreadable"
/// instead of failing the resource around it.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Lenient<T> {
    /// Read.
    Read(T),
    /// Present, but not of the expected shape.
    Unreadable(serde::de::IgnoredAny),
}

impl<T> Lenient<T> {
    /// The element, if it could be read.
    pub fn get(&self) -> Option<&T> {
        match self {
            Self::Read(t) => Some(t),
            Self::Unreadable(_) => None,
        }
    }
}

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Self::Unreadable(serde::de::IgnoredAny)
    }
}

/// One element or a list of them (the hub's lenient views accept either: a
/// MedicationStatement's `category` is one concept, a Flag's a list).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// Many (tried first: a struct would also accept a JSON array, by position).
    Many(Vec<Lenient<T>>),
    /// One.
    One(T),
}

impl<T> OneOrMany<T> {
    /// Every readable element.
    pub fn iter(&self) -> Box<dyn Iterator<Item = &T> + '_> {
        match self {
            Self::One(t) => Box::new(std::iter::once(t)),
            Self::Many(v) => Box::new(v.iter().filter_map(Lenient::get)),
        }
    }
}

/// `Coding`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Coding {
    /// `system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// `display`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

impl Coding {
    /// A coding of `system`.
    pub fn new(system: &str, code: &str) -> Self {
        Self {
            system: Some(system.to_owned()),
            code: Some(code.to_owned()),
            display: None,
        }
    }

    /// With a display.
    pub fn display(mut self, display: &str) -> Self {
        self.display = Some(display.to_owned());
        self
    }

    /// True if this is `code` in `system`.
    pub fn is(&self, system: &str, code: &str) -> bool {
        self.system.as_deref() == Some(system) && self.code.as_deref() == Some(code)
    }
}

/// `CodeableConcept`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CodeableConcept {
    /// `coding`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub coding: Vec<Coding>,
    /// `text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl CodeableConcept {
    /// One coding.
    pub fn coded(coding: Coding) -> Self {
        Self {
            coding: vec![coding],
            text: None,
        }
    }

    /// Text alone.
    pub fn text(text: &str) -> Self {
        Self {
            coding: Vec::new(),
            text: Some(text.to_owned()),
        }
    }

    /// With a text.
    pub fn with_text(mut self, text: &str) -> Self {
        self.text = Some(text.to_owned());
        self
    }

    /// The code of the first coding in `system`.
    pub fn code_in(&self, system: &str) -> Option<&str> {
        self.coding
            .iter()
            .find(|c| c.system.as_deref() == Some(system))
            .and_then(|c| c.code.as_deref())
    }
}

/// `Identifier`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identifier {
    /// `system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

impl Identifier {
    /// `value` in `system`.
    pub fn new(system: &str, value: &str) -> Self {
        Self {
            system: Some(system.to_owned()),
            value: Some(value.to_owned()),
        }
    }
}

/// `Reference`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reference {
    /// `reference` (literal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// `type`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `identifier` (logical).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<Identifier>,
    /// `display`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

impl Reference {
    /// A literal reference.
    pub fn to(reference: impl Into<String>) -> Self {
        Self {
            reference: Some(reference.into()),
            ..Self::default()
        }
    }

    /// A display only.
    pub fn display(display: impl Into<String>) -> Self {
        Self {
            display: Some(display.into()),
            ..Self::default()
        }
    }

    /// A logical reference by identifier.
    pub fn identified(identifier: Identifier) -> Self {
        Self {
            identifier: Some(identifier),
            ..Self::default()
        }
    }
}

/// `Period` (dates kept as written).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Period {
    /// `start`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// `end`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
}

impl Period {
    /// `None` when neither end is known.
    pub fn of(start: Option<String>, end: Option<String>) -> Option<Self> {
        (start.is_some() || end.is_some()).then_some(Self { start, end })
    }
}

/// `Meta`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    /// `versionId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// `lastUpdated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
    /// `source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `profile`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<String>,
    /// `security`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security: Vec<Coding>,
    /// `tag`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tag: Vec<Coding>,
}

/// `Extension`, with the value types carecache reads or writes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Extension {
    /// `url`.
    pub url: String,
    /// `valueCodeableConcept`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_codeable_concept: Option<CodeableConcept>,
    /// `valueCoding` (older exports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_coding: Option<Coding>,
    /// `valueDateTime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_date_time: Option<String>,
}

/// The extension with `url`.
pub fn extension<'a>(list: &'a [Extension], url: &str) -> Option<&'a Extension> {
    list.iter().find(|e| e.url == url)
}

/// `HumanName`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HumanName {
    /// `use`.
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub name_use: Option<String>,
    /// `text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `family`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// `given`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub given: Vec<String>,
    /// `prefix`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix: Vec<String>,
}

/// `Address` (the parts carecache keeps).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Address {
    /// `use`.
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub address_use: Option<String>,
    /// `postalCode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
}

/// `ContactPoint`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContactPoint {
    /// `system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// `Annotation`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Annotation {
    /// `text`.
    pub text: String,
}

/// `Narrative`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Narrative {
    /// `status`.
    pub status: String,
    /// `div` (XHTML).
    pub div: String,
}

/// `Quantity` (a simple quantity: value and UCUM or free-text unit).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Quantity {
    /// `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// `unit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// `system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// `Timing.repeat` (the parts a dose schedule uses).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TimingRepeat {
    /// `frequency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency: Option<u32>,
    /// `period`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<f64>,
    /// `periodUnit` (s, min, h, d, wk, mo, a).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_unit: Option<String>,
}

/// `Timing`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timing {
    /// `repeat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat: Option<TimingRepeat>,
}

/// `Dosage.doseAndRate`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DoseAndRate {
    /// `doseQuantity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dose_quantity: Option<Quantity>,
}

/// `Dosage`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dosage {
    /// `text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `timing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<Timing>,
    /// `asNeededBoolean`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_needed_boolean: Option<bool>,
    /// `route`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<CodeableConcept>,
    /// `doseAndRate`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dose_and_rate: Vec<DoseAndRate>,
}

// ---- resources -------------------------------------------------------------------------

/// `Patient`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Patient {
    /// `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `meta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    /// `identifier`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identifier: Vec<Identifier>,
    /// `name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub name: Vec<HumanName>,
    /// `gender`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gender: Option<String>,
    /// `birthDate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birth_date: Option<String>,
    /// `address`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub address: Vec<Address>,
    /// `generalPractitioner`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub general_practitioner: Vec<Reference>,
}

/// `Flag`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Flag {
    /// `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `meta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    /// `extension`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extension: Vec<Extension>,
    /// `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `category`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub category: Vec<CodeableConcept>,
    /// `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<CodeableConcept>,
    /// `subject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Reference>,
    /// `period`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<Period>,
    /// `author`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<Reference>,
}

/// `AllergyIntolerance.reaction`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllergyReaction {
    /// `manifestation`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifestation: Vec<CodeableConcept>,
    /// `description`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `severity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
}

/// `AllergyIntolerance`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllergyIntolerance {
    /// `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `meta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    /// `clinicalStatus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clinical_status: Option<CodeableConcept>,
    /// `verificationStatus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_status: Option<CodeableConcept>,
    /// `category`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub category: Vec<String>,
    /// `criticality`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criticality: Option<String>,
    /// `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<CodeableConcept>,
    /// `patient`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<Reference>,
    /// `onsetDateTime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onset_date_time: Option<String>,
    /// `recorder`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorder: Option<Reference>,
    /// `asserter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asserter: Option<Reference>,
    /// `note`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub note: Vec<Annotation>,
    /// `reaction`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reaction: Vec<AllergyReaction>,
}

/// `MedicationStatement`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MedicationStatement {
    /// `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `meta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    /// `extension`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extension: Vec<Extension>,
    /// `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `category`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<CodeableConcept>,
    /// `medicationCodeableConcept`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medication_codeable_concept: Option<CodeableConcept>,
    /// `medicationReference`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medication_reference: Option<Reference>,
    /// `subject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Reference>,
    /// `effectiveDateTime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_date_time: Option<String>,
    /// `effectivePeriod`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_period: Option<Period>,
    /// `informationSource`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub information_source: Option<Reference>,
    /// `dosage`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dosage: Vec<Dosage>,
}

/// `RelatedPerson`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RelatedPerson {
    /// `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `meta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    /// `active`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// `patient`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<Reference>,
    /// `relationship`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relationship: Vec<CodeableConcept>,
    /// `name`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub name: Vec<HumanName>,
    /// `telecom`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub telecom: Vec<ContactPoint>,
}

/// `List`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct List {
    /// `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `meta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    /// `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `mode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<CodeableConcept>,
    /// `subject`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Reference>,
    /// `emptyReason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_reason: Option<CodeableConcept>,
    /// `note`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub note: Vec<Annotation>,
}

/// `Consent.provision` (recursive).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Provision {
    /// `type` (deny | permit).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `purpose`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purpose: Vec<Coding>,
    /// `class`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class: Vec<Coding>,
    /// `code`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub code: Vec<CodeableConcept>,
    /// `provision` (nested).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provision: Vec<Provision>,
}

/// `Consent`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Consent {
    /// `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `meta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    /// `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `scope`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<CodeableConcept>,
    /// `category`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub category: Vec<CodeableConcept>,
    /// `patient`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<Reference>,
    /// `dateTime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_time: Option<String>,
    /// `policyRule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_rule: Option<CodeableConcept>,
    /// `provision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provision: Option<Provision>,
}

/// `OperationOutcome.issue`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Issue {
    /// `severity`.
    pub severity: String,
    /// `code`.
    pub code: String,
    /// `diagnostics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<String>,
    /// `details`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<CodeableConcept>,
}

/// `OperationOutcome`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationOutcome {
    /// `issue`.
    pub issue: Vec<Issue>,
}

/// `Bundle.link`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleLink {
    /// `relation`.
    pub relation: String,
    /// `url`.
    pub url: String,
}

/// `Bundle.entry.search`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntrySearch {
    /// `mode` (match | include | outcome).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `score` (0–1, how well a match fits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
}

/// `Bundle.entry.request`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryRequest {
    /// `method`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// `Bundle.entry.response`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryResponse {
    /// `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// `Bundle.entry`. The resource is generic: [`Resource`] when carecache writes a Bundle,
/// [`serde_json::Value`] when it reads one from a source (each resource is then read on
/// its own, so one it cannot read does not make the page unreadable).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleEntry<R> {
    /// `fullUrl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_url: Option<String>,
    /// `resource`.
    #[serde(default = "Option::default", skip_serializing_if = "Option::is_none")]
    pub resource: Option<R>,
    /// `search`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<EntrySearch>,
    /// `request`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<EntryRequest>,
    /// `response`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<EntryResponse>,
}

/// `Bundle`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle<R> {
    /// `meta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    /// `identifier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<Identifier>,
    /// `type`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `timestamp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    /// `total`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// `link`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link: Vec<BundleLink>,
    /// `entry`.
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub entry: Vec<BundleEntry<R>>,
}

impl<R> Bundle<R> {
    /// The URL of the `next` link, if any.
    pub fn next(&self) -> Option<&str> {
        self.link
            .iter()
            .find(|l| l.relation == "next")
            .map(|l| l.url.as_str())
    }
}

/// `Composition.section`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompositionSection {
    /// `title`.
    pub title: String,
    /// `code`.
    pub code: CodeableConcept,
    /// `text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<Narrative>,
    /// `entry`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entry: Vec<Reference>,
    /// `emptyReason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_reason: Option<CodeableConcept>,
}

/// `Composition`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Composition {
    /// `id`.
    pub id: String,
    /// `meta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    /// `status`.
    pub status: String,
    /// `type`.
    #[serde(rename = "type")]
    pub kind: CodeableConcept,
    /// `subject`.
    pub subject: Reference,
    /// `date`.
    pub date: String,
    /// `author`.
    pub author: Vec<Reference>,
    /// `title`.
    pub title: String,
    /// `confidentiality`.
    pub confidentiality: String,
    /// `section`.
    pub section: Vec<CompositionSection>,
}

/// `AuditEvent.agent`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditAgent {
    /// `type`.
    #[serde(rename = "type")]
    pub kind: CodeableConcept,
    /// `role`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub role: Vec<CodeableConcept>,
    /// `who`.
    pub who: Reference,
    /// `requestor`.
    pub requestor: bool,
    /// `purposeOfUse`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purpose_of_use: Vec<CodeableConcept>,
}

/// `AuditEvent.source`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditSource {
    /// `observer`.
    pub observer: Reference,
    /// `type`.
    #[serde(rename = "type")]
    pub kind: Vec<Coding>,
}

/// `AuditEvent.entity.detail`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditDetail {
    /// `type`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `valueString`.
    pub value_string: String,
}

/// `AuditEvent.entity`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntity {
    /// `what`.
    pub what: Reference,
    /// `type`.
    #[serde(rename = "type")]
    pub kind: Coding,
    /// `role`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Coding>,
    /// `description`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `detail`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detail: Vec<AuditDetail>,
}

/// `AuditEvent`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    /// `id`.
    pub id: String,
    /// `meta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    /// `type`.
    #[serde(rename = "type")]
    pub kind: Coding,
    /// `subtype`.
    pub subtype: Vec<Coding>,
    /// `action`.
    pub action: String,
    /// `recorded`.
    pub recorded: String,
    /// `outcome`.
    pub outcome: String,
    /// `outcomeDesc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome_desc: Option<String>,
    /// `purposeOfEvent`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub purpose_of_event: Vec<CodeableConcept>,
    /// `agent`.
    pub agent: Vec<AuditAgent>,
    /// `source`.
    pub source: AuditSource,
    /// `entity`.
    pub entity: Vec<AuditEntity>,
}

/// Any resource carecache reads or writes, tagged by `resourceType`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "resourceType")]
#[allow(
    clippy::large_enum_variant,
    reason = "resources are built and serialised one at a time"
)]
pub enum Resource {
    /// Patient.
    Patient(Patient),
    /// Flag.
    Flag(Flag),
    /// AllergyIntolerance.
    AllergyIntolerance(AllergyIntolerance),
    /// MedicationStatement.
    MedicationStatement(MedicationStatement),
    /// RelatedPerson.
    RelatedPerson(RelatedPerson),
    /// List.
    List(List),
    /// Consent.
    Consent(Consent),
    /// OperationOutcome.
    OperationOutcome(OperationOutcome),
    /// Composition.
    Composition(Composition),
    /// AuditEvent.
    AuditEvent(AuditEvent),
    /// Bundle (of resources carecache writes).
    Bundle(Box<Bundle<Resource>>),
}

impl Resource {
    /// `resourceType`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Patient(_) => "Patient",
            Self::Flag(_) => "Flag",
            Self::AllergyIntolerance(_) => "AllergyIntolerance",
            Self::MedicationStatement(_) => "MedicationStatement",
            Self::RelatedPerson(_) => "RelatedPerson",
            Self::List(_) => "List",
            Self::Consent(_) => "Consent",
            Self::OperationOutcome(_) => "OperationOutcome",
            Self::Composition(_) => "Composition",
            Self::AuditEvent(_) => "AuditEvent",
            Self::Bundle(_) => "Bundle",
        }
    }

    /// `id`, if it has one.
    pub fn id(&self) -> Option<&str> {
        match self {
            Self::Patient(r) => r.id.as_deref(),
            Self::Flag(r) => r.id.as_deref(),
            Self::AllergyIntolerance(r) => r.id.as_deref(),
            Self::MedicationStatement(r) => r.id.as_deref(),
            Self::RelatedPerson(r) => r.id.as_deref(),
            Self::List(r) => r.id.as_deref(),
            Self::Consent(r) => r.id.as_deref(),
            Self::Composition(r) => Some(&r.id),
            Self::AuditEvent(r) => Some(&r.id),
            Self::OperationOutcome(_) | Self::Bundle(_) => None,
        }
    }

    /// `meta`, created if absent (OperationOutcome has none here).
    pub fn meta_mut(&mut self) -> Option<&mut Meta> {
        let meta = match self {
            Self::Patient(r) => &mut r.meta,
            Self::Flag(r) => &mut r.meta,
            Self::AllergyIntolerance(r) => &mut r.meta,
            Self::MedicationStatement(r) => &mut r.meta,
            Self::RelatedPerson(r) => &mut r.meta,
            Self::List(r) => &mut r.meta,
            Self::Consent(r) => &mut r.meta,
            Self::Composition(r) => &mut r.meta,
            Self::AuditEvent(r) => &mut r.meta,
            Self::Bundle(b) => &mut b.meta,
            Self::OperationOutcome(_) => return None,
        };
        Some(meta.get_or_insert_with(Meta::default))
    }

    /// As JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// What the hub reads of any resource before it knows whether it can read it whole: its
/// type and id, and the patient it names (`subject` or `patient`, literal or by
/// identifier). Never fails on a JSON object.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// `resourceType`.
    #[serde(default)]
    pub resource_type: Lenient<String>,
    /// `id`.
    #[serde(default)]
    pub id: Lenient<String>,
    /// `subject`.
    #[serde(default)]
    pub subject: Option<Lenient<Reference>>,
    /// `patient`.
    #[serde(default)]
    pub patient: Option<Lenient<Reference>>,
    /// `meta`.
    #[serde(default)]
    pub meta: Option<Lenient<Meta>>,
}

impl Envelope {
    /// `meta`, if readable.
    pub fn meta(&self) -> Option<&Meta> {
        self.meta.as_ref().and_then(Lenient::get)
    }

    /// `resourceType`, or `""`.
    pub fn kind(&self) -> &str {
        self.resource_type.get().map_or("", String::as_str)
    }

    /// `id`, or `""`.
    pub fn id(&self) -> &str {
        self.id.get().map_or("", String::as_str)
    }

    /// The reference to the patient (`subject`, else `patient`), if readable.
    pub fn patient_ref(&self) -> Option<&Reference> {
        self.subject
            .as_ref()
            .and_then(Lenient::get)
            .or_else(|| self.patient.as_ref().and_then(Lenient::get))
    }
}

/// The parts of any item the sharing rules look at, read leniently so that a resource
/// that cannot be read whole is still checked: security labels, status and verification
/// (for "entered in error") and every code-bearing element.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Labels {
    /// `resourceType`.
    #[serde(default)]
    pub resource_type: Lenient<String>,
    /// `meta`.
    #[serde(default)]
    pub meta: Option<Lenient<LabelMeta>>,
    /// `status`.
    #[serde(default)]
    pub status: Option<Lenient<String>>,
    /// `verificationStatus`.
    #[serde(default)]
    pub verification_status: Option<Lenient<LenientConcept>>,
    /// `code`.
    #[serde(default)]
    pub code: Option<Lenient<LenientConcept>>,
    /// `medicationCodeableConcept`.
    #[serde(default)]
    pub medication_codeable_concept: Option<Lenient<LenientConcept>>,
    /// `reasonCode`.
    #[serde(default)]
    pub reason_code: Option<Lenient<OneOrMany<LenientConcept>>>,
    /// `category`.
    #[serde(default)]
    pub category: Option<Lenient<OneOrMany<LenientConcept>>>,
    /// `reaction`.
    #[serde(default)]
    pub reaction: Option<Lenient<Vec<Lenient<LenientReaction>>>>,
}

/// `meta` as [`Labels`] reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LabelMeta {
    /// `security`.
    #[serde(default)]
    pub security: Option<Lenient<Vec<Lenient<Coding>>>>,
}

/// A CodeableConcept read coding by coding.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LenientConcept {
    /// `coding`.
    #[serde(default)]
    pub coding: Option<Lenient<Vec<Lenient<Coding>>>>,
}

/// A reaction as [`Labels`] reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LenientReaction {
    /// `manifestation`.
    #[serde(default)]
    pub manifestation: Option<Lenient<Vec<Lenient<LenientConcept>>>>,
}

fn readable<T>(v: &Option<Lenient<Vec<Lenient<T>>>>) -> impl Iterator<Item = &T> {
    v.iter()
        .filter_map(Lenient::get)
        .flatten()
        .filter_map(Lenient::get)
}

impl LenientConcept {
    /// Its readable codings.
    pub fn codings(&self) -> impl Iterator<Item = &Coding> {
        readable(&self.coding)
    }
}

impl Labels {
    /// `resourceType`, or `""`.
    pub fn kind(&self) -> &str {
        self.resource_type.get().map_or("", String::as_str)
    }

    /// The codes of the readable `meta.security` labels in `system`.
    pub fn security(&self, system: &str) -> Vec<&str> {
        self.meta
            .as_ref()
            .and_then(Lenient::get)
            .map(|m| readable(&m.security))
            .into_iter()
            .flatten()
            .filter(|c| c.system.as_deref() == Some(system))
            .filter_map(|c| c.code.as_deref())
            .collect()
    }

    /// True if the item says it was entered in error (`status`, or an allergy's
    /// verification status).
    pub fn entered_in_error(&self) -> bool {
        self.status
            .as_ref()
            .and_then(Lenient::get)
            .is_some_and(|s| s == "entered-in-error")
            || self
                .verification_status
                .as_ref()
                .and_then(Lenient::get)
                .is_some_and(|v| {
                    v.codings().any(|c| {
                        c.is(
                            crate::codes::ALLERGY_VERIFICATION_SYSTEM,
                            "entered-in-error",
                        )
                    })
                })
    }

    /// Every readable (system, code) of the item's code, medicine, reasons, categories
    /// and reaction manifestations, trimmed; a coding with no system is given as `""`.
    pub fn codings(&self) -> Vec<(&str, &str)> {
        fn one(c: &Option<Lenient<LenientConcept>>) -> Vec<&LenientConcept> {
            c.as_ref().and_then(Lenient::get).into_iter().collect()
        }
        fn many(c: &Option<Lenient<OneOrMany<LenientConcept>>>) -> Vec<&LenientConcept> {
            c.as_ref()
                .and_then(Lenient::get)
                .map(|m| m.iter().collect())
                .unwrap_or_default()
        }
        let manifestations: Vec<&LenientConcept> = readable(&self.reaction)
            .flat_map(|r| readable(&r.manifestation))
            .collect();
        one(&self.code)
            .into_iter()
            .chain(one(&self.medication_codeable_concept))
            .chain(many(&self.reason_code))
            .chain(many(&self.category))
            .chain(manifestations)
            .flat_map(LenientConcept::codings)
            .filter_map(|c| Some((c.system.as_deref().unwrap_or(""), c.code.as_deref()?.trim())))
            .collect()
    }
}
