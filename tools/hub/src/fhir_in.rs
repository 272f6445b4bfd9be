//! FHIR R4 in: the upstream's resources mapped into the internal model, one patient at a
//! time, with the sharing rules applied on the way (`sharing`).
//!
//! Real records are messier than a tidy export, and the two kinds of failure are handled
//! in opposite directions (tools/hub/README.md, "FHIR in" and "Objections"):
//! - **privacy fails closed**: a Consent in the patient-privacy scope that denies counts
//!   as an objection whatever the precision of its dates, with no date, with a missing or
//!   unknown status, or with a provision that cannot be fully read; a Consent that cannot
//!   be read at all withholds the patient. Only a readable withdrawal dated after the
//!   objection lifts it. A deny provision limited to data classes withholds those sections
//!   only; one limited in a way that cannot be classified withholds the whole patient.
//! - **clinical content fails visible**: an item that cannot be read is reported and
//!   counted in its section's `unreadable`, never dropped silently and never hiding the
//!   items that could be read. A section is "not available" only when the source says so
//!   or nothing in it was readable. Codes of any system (SNOMED CT, dm+d, Read v2, CTV3, a
//!   local system) and text-only items are read as they are; provenance without an ODS
//!   code is kept as it is.
//!
//! Reports carry the resource type, its FHIR id and the rule it broke; never patient data.

use std::collections::BTreeMap;

use serde_json::Value;
use sync_protocol::NhsNumber;
use sync_protocol::message::ObjectionStatus;
use sync_protocol::record::{
    Alert, AlertCategory, AlertSeverity, Allergy, AllergyCategory, AllergyStatus,
    AllergyVerification, ContactRole, Course, Criticality, Demographics, HumanName, KeyContact,
    Medication, MedicationStatus, PatientRecord, Period, Reaction, ReactionSeverity, Section, Sex,
    Unreadable,
};
use sync_protocol::types::{
    BoundedVec, CTV3_SYSTEM, Code, Coding, DMD_SYSTEM, Date, OdsCode, PostcodeDistrict, Provenance,
    READ_V2_SYSTEM, RecordVersion, SNOMED_SYSTEM, SctId, SourceId, Text, Timestamp,
};

use crate::sharing::SharingRules;

const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
const ALLERGY_LIST_CODE: &str = "886921000000105";
const CONSENT_SCOPE: &str = "http://terminology.hl7.org/CodeSystem/consentscope";

/// Why a resource could not be mapped. Names a rule, never a value.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct MappingIssue {
    /// FHIR resource type.
    pub resource_type: String,
    /// FHIR id (not patient data: our ids are opaque).
    pub id: String,
    /// The rule it broke.
    pub reason: &'static str,
}

impl std::fmt::Display for MappingIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}: {}", self.resource_type, self.id, self.reason)
    }
}

/// A patient's whole-record objection as the source states it, after the fail-closed
/// rules (see [`resolve_consents`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SourceObjection {
    /// Objected or withdrawn.
    pub status: ObjectionStatus,
    /// When it was recorded: the latest instant its date allows, else the resource's
    /// `meta.lastUpdated`, else the epoch (unknown).
    pub recorded_at: Timestamp,
}

/// One patient mapped: the record a device may hold (version 0 until the hub stores it)
/// and the objection, if any.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Mapped {
    /// The record, after the sharing rules and any partial objection.
    pub record: PatientRecord,
    /// The whole-record objection state the source holds, if it holds any.
    pub objection: Option<SourceObjection>,
}

/// All resources of one patient, as collected from the source.
#[derive(Clone, Default, Debug)]
pub struct PatientResources {
    /// The Patient resource.
    pub patient: Option<Value>,
    /// Flag, AllergyIntolerance, MedicationStatement, RelatedPerson, List, Consent,
    /// already mapped.
    pub items: Vec<Item>,
}

/// Group resources by the patient they belong to: the Patient's own id, or the id in
/// `subject` / `patient` (`Patient/{id}`). Resources of other types, or that name no
/// patient, are reported.
#[derive(Debug)]
pub struct Collector<'a> {
    /// Resources per patient FHIR id.
    pub patients: BTreeMap<String, PatientResources>,
    /// What could not be placed.
    pub issues: Vec<MappingIssue>,
    /// Items that name their patient by NHS number (`identifier`) rather than by
    /// reference, placed by [`Collector::finish`] once every Patient has been read.
    by_nhs: BTreeMap<u64, Vec<(String, String, Item)>>,
    rules: &'a SharingRules,
}

/// The NHS number a resource names its patient by, when it uses a logical reference
/// (`subject.identifier` / `patient.identifier` with the NHS number system).
fn nhs_reference(resource: &Value) -> Option<u64> {
    let who = resource
        .get("subject")
        .or_else(|| resource.get("patient"))?;
    if str_at(who, &["identifier", "system"]) != Some(NHS_NUMBER_SYSTEM) {
        return None;
    }
    let value = str_at(who, &["identifier", "value"])?;
    NhsNumber::parse(value).ok().map(NhsNumber::as_u64)
}

/// The NHS number on a Patient resource, if readable.
fn patient_nhs(patient: &Value) -> Option<u64> {
    patient
        .get("identifier")?
        .as_array()?
        .iter()
        .find(|i| str_at(i, &["system"]) == Some(NHS_NUMBER_SYSTEM))
        .and_then(|i| str_at(i, &["value"]))
        .and_then(|v| NhsNumber::parse(v).ok())
        .map(NhsNumber::as_u64)
}

/// The patient a resource belongs to: its own id for a Patient, else the id in
/// `subject` or `patient` (`Patient/{id}`, or an absolute URL ending so).
pub fn patient_of(resource: &Value) -> Option<&str> {
    if str_at(resource, &["resourceType"]) == Some("Patient") {
        return str_at(resource, &["id"]).filter(|id| !id.is_empty());
    }
    let reference = str_at(resource, &["subject", "reference"])
        .or_else(|| str_at(resource, &["patient", "reference"]))?;
    let at = reference.rfind("Patient/")?;
    let id = reference.get(at + "Patient/".len()..)?;
    let id = id.split('/').next().unwrap_or(id);
    (!id.is_empty()).then_some(id)
}

impl<'a> Collector<'a> {
    /// An empty collector applying `rules`.
    pub fn new(rules: &'a SharingRules) -> Self {
        Self {
            patients: BTreeMap::new(),
            issues: Vec::new(),
            by_nhs: BTreeMap::new(),
            rules,
        }
    }

    /// Every patient's resources and what could not be placed: items that named their
    /// patient by NHS number join that patient; a Consent naming an NHS number no Patient
    /// of the source carries is reported (it cannot be honoured, nor leak anything).
    pub fn finish(mut self) -> (BTreeMap<String, PatientResources>, Vec<MappingIssue>) {
        if !self.by_nhs.is_empty() {
            for res in self.patients.values_mut() {
                if let Some(items) = res
                    .patient
                    .as_ref()
                    .and_then(patient_nhs)
                    .and_then(|nhs| self.by_nhs.remove(&nhs))
                {
                    res.items.extend(items.into_iter().map(|(_, _, item)| item));
                }
            }
        }
        for (kind, id, _) in self.by_nhs.into_values().flatten() {
            self.issues.push(MappingIssue {
                reason: if kind == "Consent" {
                    "Consent names a Patient the source did not send: objection cannot be placed"
                } else {
                    "names a Patient the source did not send"
                },
                resource_type: kind,
                id,
            });
        }
        (self.patients, self.issues)
    }

    /// Add one resource.
    pub fn add(&mut self, resource: Value) {
        let kind = str_at(&resource, &["resourceType"])
            .unwrap_or("")
            .to_owned();
        let id = str_at(&resource, &["id"]).unwrap_or("").to_owned();
        let issue = |reason| MappingIssue {
            resource_type: kind.clone(),
            id: id.clone(),
            reason,
        };
        match kind.as_str() {
            "Patient" if !id.is_empty() => {
                self.patients.entry(id.clone()).or_default().patient = Some(resource);
            }
            "Patient" => self.issues.push(issue("Patient without an id")),
            "Flag"
            | "AllergyIntolerance"
            | "MedicationStatement"
            | "RelatedPerson"
            | "List"
            | "Consent" => match (patient_of(&resource), nhs_reference(&resource)) {
                (Some(pid), _) => {
                    let pid = pid.to_owned();
                    let item = classify(&resource, self.rules);
                    self.patients.entry(pid).or_default().items.push(item);
                }
                (None, Some(nhs)) => {
                    let item = classify(&resource, self.rules);
                    self.by_nhs.entry(nhs).or_default().push((kind, id, item));
                }
                (None, None) if kind == "Consent" => {
                    // A Consent that names no patient we can find cannot be honoured and
                    // cannot be placed: reported loudly, and the ingest summary counts it.
                    self.issues.push(issue(
                        "Consent names no Patient: objection cannot be placed",
                    ));
                }
                (None, None) => self.issues.push(issue("no Patient reference")),
            },
            _ => self.issues.push(issue("resource type not used")),
        }
    }
}

/// One non-Patient resource, mapped as soon as it is read so that the source's JSON is
/// not kept in memory while the rest of the export is read.
#[derive(Clone, Debug)]
pub enum Item {
    /// A Flag.
    Alert(Result<Option<Alert>, MappingIssue>),
    /// An AllergyIntolerance.
    Allergy(Result<Option<Allergy>, MappingIssue>),
    /// A MedicationStatement.
    Medication(Result<Option<Medication>, MappingIssue>),
    /// A RelatedPerson.
    Contact(Result<Option<KeyContact>, MappingIssue>),
    /// The source says it cannot provide allergies.
    AllergiesUnavailable,
    /// A Consent: `Ok(None)` if it does not restrict sharing; an `Err` withholds the
    /// patient (fail closed).
    Consent(Result<Option<Denial>, MappingIssue>),
    /// Withheld by the sharing rules: only counted.
    Withheld,
    /// Read but not used (e.g. another kind of List).
    Ignored,
}

/// Which sections a partial objection withholds.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Sections {
    /// Alerts (Flag).
    pub alerts: bool,
    /// Allergies (AllergyIntolerance).
    pub allergies: bool,
    /// Medications (MedicationStatement and the other medication resources).
    pub medications: bool,
    /// Key contacts (RelatedPerson).
    pub contacts: bool,
}

impl Sections {
    fn union(self, o: Self) -> Self {
        Self {
            alerts: self.alerts || o.alerts,
            allergies: self.allergies || o.allergies,
            medications: self.medications || o.medications,
            contacts: self.contacts || o.contacts,
        }
    }

    fn covers(self, o: Self) -> bool {
        (self.alerts || !o.alerts)
            && (self.allergies || !o.allergies)
            && (self.medications || !o.medications)
            && (self.contacts || !o.contacts)
    }
}

/// What a denial covers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DenialScope {
    /// The whole patient.
    Patient,
    /// These sections only.
    Sections(Sections),
}

impl DenialScope {
    fn covers(self, o: Self) -> bool {
        match (self, o) {
            (Self::Patient, _) => true,
            (Self::Sections(_), Self::Patient) => false,
            (Self::Sections(a), Self::Sections(b)) => a.covers(b),
        }
    }
}

/// A patient-privacy Consent that denies, as read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Denial {
    /// True for a readable withdrawal (status `inactive` or `rejected`).
    pub withdrawn: bool,
    /// The earliest and latest instants its `dateTime` allows; `None` if it has none or
    /// it cannot be read.
    pub when: Option<(Timestamp, Timestamp)>,
    /// What it denies.
    pub scope: DenialScope,
    /// `meta.lastUpdated`, if readable.
    pub last_updated: Option<Timestamp>,
}

impl Denial {
    /// How a Consent that cannot be read counts: an objection to the whole patient, in
    /// force, that no withdrawal can be ordered after.
    fn unreadable() -> Self {
        Self {
            withdrawn: false,
            when: None,
            scope: DenialScope::Patient,
            last_updated: None,
        }
    }

    fn recorded_at(&self) -> Timestamp {
        self.when
            .map(|(_, latest)| latest)
            .or(self.last_updated)
            .unwrap_or_else(|| Timestamp::from_millis(0).unwrap_or_else(|_| unreachable!()))
    }
}

/// Resolve a patient's denials, failing closed: an objection stands unless a readable
/// withdrawal covering at least its scope is dated, without doubt, after it (the
/// withdrawal's earliest possible instant after the objection's latest). Imprecise or
/// missing dates therefore resolve in favour of the objection. Returns the whole-record
/// objection state (if any denial was seen) and the sections partial objections withhold.
pub fn resolve_consents(denials: &[Denial]) -> (Option<SourceObjection>, Sections) {
    let lifted = |d: &Denial| {
        denials.iter().any(|w| {
            w.withdrawn
                && w.scope.covers(d.scope)
                && matches!((w.when, d.when), (Some((w_earliest, _)), Some((_, d_latest))) if w_earliest > d_latest)
        })
    };
    let in_force: Vec<&Denial> = denials
        .iter()
        .filter(|d| !d.withdrawn && !lifted(d))
        .collect();
    let whole: Vec<&&Denial> = in_force
        .iter()
        .filter(|d| d.scope == DenialScope::Patient)
        .collect();
    let sections = in_force
        .iter()
        .fold(Sections::default(), |acc, d| match d.scope {
            DenialScope::Sections(s) => acc.union(s),
            DenialScope::Patient => acc,
        });
    let objection = if let Some(at) = whole.iter().map(|d| d.recorded_at()).max() {
        Some(SourceObjection {
            status: ObjectionStatus::Objected,
            recorded_at: at,
        })
    } else {
        // Denials seen, none standing for the whole patient: withdrawn (lifts an
        // objection the hub held before).
        denials
            .iter()
            .filter(|d| d.scope == DenialScope::Patient || d.withdrawn)
            .map(Denial::recorded_at)
            .max()
            .map(|at| SourceObjection {
                status: ObjectionStatus::Withdrawn,
                recorded_at: at,
            })
    };
    (objection, sections)
}

/// Map one item resource, applying the sharing rules first.
pub fn classify(item: &Value, rules: &SharingRules) -> Item {
    let kind = str_at(item, &["resourceType"]).unwrap_or("");
    let id = str_at(item, &["id"]).unwrap_or("");
    let issue = |reason| MappingIssue {
        resource_type: kind.to_owned(),
        id: id.to_owned(),
        reason,
    };
    if matches!(
        kind,
        "Flag" | "AllergyIntolerance" | "MedicationStatement" | "RelatedPerson"
    ) && !entered_in_error(item)
        && rules.withholds(item)
    {
        return Item::Withheld;
    }
    match kind {
        "Flag" => Item::Alert(flag(item).map_err(issue)),
        "AllergyIntolerance" => Item::Allergy(allergy(item).map_err(issue)),
        "MedicationStatement" => Item::Medication(medication(item).map_err(issue)),
        "RelatedPerson" => Item::Contact(related_person(item).map_err(issue)),
        "List" => {
            if coding_code(item.get("code"), SNOMED_SYSTEM) == Some(ALLERGY_LIST_CODE)
                && item.get("emptyReason").is_some()
            {
                Item::AllergiesUnavailable
            } else {
                Item::Ignored
            }
        }
        "Consent" => Item::Consent(consent(item).map_err(issue)),
        _ => Item::Ignored,
    }
}

/// Map one patient. `Err` when the Patient itself cannot be read (the whole patient is
/// skipped); item problems are pushed to `issues` and counted, and the rest is mapped.
pub fn map_patient(
    fhir_id: &str,
    resources: PatientResources,
    issues: &mut Vec<MappingIssue>,
) -> Result<Mapped, MappingIssue> {
    let patient_issue = |reason| MappingIssue {
        resource_type: "Patient".into(),
        id: fhir_id.to_owned(),
        reason,
    };
    let patient = resources
        .patient
        .ok_or_else(|| patient_issue("resources for a Patient the source did not send"))?;
    let (nhs_number, demographics) = demographics(&patient).map_err(patient_issue)?;

    let mut alerts = SectionBuilder::default();
    let mut allergies = SectionBuilder::default();
    let mut medications = SectionBuilder::default();
    let mut contacts = SectionBuilder::default();
    let mut allergies_unavailable = false;
    let mut denials = Vec::new();
    let mut withheld: u16 = 0;

    for item in resources.items {
        match item {
            Item::Alert(r) => alerts.push(r, issues),
            Item::Allergy(r) => allergies.push(r, issues),
            Item::Medication(r) => medications.push(r, issues),
            Item::Contact(r) => contacts.push(r, issues),
            Item::AllergiesUnavailable => allergies_unavailable = true,
            Item::Consent(Ok(Some(d))) => denials.push(d),
            Item::Consent(Ok(None)) | Item::Ignored => {}
            Item::Consent(Err(issue)) => {
                issues.push(issue);
                denials.push(Denial::unreadable());
            }
            Item::Withheld => withheld = withheld.saturating_add(1),
        }
    }
    let (objection, by_patient) = resolve_consents(&denials);

    let (alerts, u_alerts) = alerts.finish(false);
    let (allergies, u_allergies) = allergies.finish(allergies_unavailable);
    let (medications, u_medications) = medications.finish(false);
    let (contacts, u_contacts) = contacts.finish(false);
    let mut record = PatientRecord {
        nhs_number,
        version: RecordVersion(0),
        demographics,
        alerts,
        allergies,
        medications,
        contacts,
        withheld,
        unreadable: Unreadable {
            alerts: u_alerts,
            allergies: u_allergies,
            medications: u_medications,
            contacts: u_contacts,
        },
    };
    // A partial objection replaces the section whole; nothing about what it held stays.
    fn withhold<T, const N: usize>(on: bool, section: &mut Section<T, N>, unreadable: &mut u16) {
        if on {
            *section = Section::WithheldByPatient;
            *unreadable = 0;
        }
    }
    let u = &mut record.unreadable;
    withhold(by_patient.alerts, &mut record.alerts, &mut u.alerts);
    withhold(
        by_patient.allergies,
        &mut record.allergies,
        &mut u.allergies,
    );
    withhold(
        by_patient.medications,
        &mut record.medications,
        &mut u.medications,
    );
    withhold(by_patient.contacts, &mut record.contacts, &mut u.contacts);
    Ok(Mapped { record, objection })
}

/// Items of one section; `Ok(None)` from a mapper means "not shared, not an error"
/// (entered in error, inactive).
struct SectionBuilder<T> {
    items: Vec<T>,
    broken: u16,
}

impl<T> Default for SectionBuilder<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            broken: 0,
        }
    }
}

impl<T: SectionItem> SectionBuilder<T> {
    fn push(&mut self, mapped: Result<Option<T>, MappingIssue>, issues: &mut Vec<MappingIssue>) {
        match mapped {
            Ok(Some(item)) => self.items.push(item),
            Ok(None) => {}
            Err(issue) => {
                issues.push(issue);
                self.broken = self.broken.saturating_add(1);
            }
        }
    }

    /// The section and how many of its items could not be shown. Every readable item is
    /// kept, sorted by source id (the source's order is not meaningful); past the
    /// section's limit the least urgent are counted as not shown (an alert list keeps its
    /// high-risk alerts first). "Not available" when the source said so, or when items
    /// exist but none was readable; "none recorded" only when the source holds none.
    fn finish<const N: usize>(mut self, unavailable: bool) -> (Section<T, N>, u16) {
        let mut unreadable = self.broken;
        if self.items.len() > N {
            self.items
                .sort_by(|a, b| b.rank().cmp(&a.rank()).then(a.key().cmp(b.key())));
            let over = self.items.len() - N;
            self.items.truncate(N);
            unreadable = unreadable.saturating_add(u16::try_from(over).unwrap_or(u16::MAX));
        }
        self.items.sort_by(|a, b| a.key().cmp(b.key()));
        if self.items.is_empty() {
            let section = if unavailable || unreadable > 0 {
                Section::NotAvailable
            } else {
                Section::NoneRecorded
            };
            return (section, unreadable);
        }
        let section = Section::from_items(self.items).unwrap_or(Section::NotAvailable);
        (section, unreadable)
    }
}

trait SectionItem {
    /// The order items are kept in.
    fn key(&self) -> &str;
    /// Kept first when a section is over its limit.
    fn rank(&self) -> u8 {
        0
    }
}
impl SectionItem for Alert {
    fn key(&self) -> &str {
        self.source_id.as_str()
    }
    fn rank(&self) -> u8 {
        match self.severity {
            AlertSeverity::HighRisk => 2,
            AlertSeverity::Warning => 1,
            AlertSeverity::Information => 0,
        }
    }
}
impl SectionItem for Allergy {
    fn key(&self) -> &str {
        self.source_id.as_str()
    }
}
impl SectionItem for Medication {
    fn key(&self) -> &str {
        self.source_id.as_str()
    }
}
impl SectionItem for KeyContact {
    fn key(&self) -> &str {
        // Contacts have no source id on the wire; order by name then.
        self.name.as_str()
    }
}

// ---- field helpers -------------------------------------------------------------------

/// The string at a path of object keys.
pub(crate) fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for key in path {
        cur = cur.get(key)?;
    }
    cur.as_str()
}

/// The code of the first coding with `system` in a CodeableConcept.
fn coding_code<'a>(concept: Option<&'a Value>, system: &str) -> Option<&'a str> {
    concept?
        .get("coding")?
        .as_array()?
        .iter()
        .find(|c| c.get("system").and_then(Value::as_str) == Some(system))?
        .get("code")?
        .as_str()
}

/// A CodeableConcept as it was recorded: the best coding it carries — SNOMED CT, then
/// dm+d, Read v2, CTV3, then any other system — with its display (or the concept's text),
/// or the concept's text alone. A coding that breaks its system's rule (a SNOMED CT or
/// dm+d code failing its check digit, an over-long code) is passed over for the next; the
/// concept is unreadable only when no coding and no text can be used.
fn concept(concept: Option<&Value>) -> Result<Coding, &'static str> {
    let concept = concept.ok_or("no code")?;
    let concept_text = concept
        .get("text")
        .and_then(Value::as_str)
        .filter(|t| !t.trim().is_empty());
    let codings = concept
        .get("coding")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let rank = |system: &str| match system {
        SNOMED_SYSTEM => 0,
        DMD_SYSTEM => 1,
        READ_V2_SYSTEM => 2,
        CTV3_SYSTEM => 3,
        _ => 4,
    };
    let mut candidates: Vec<(u8, Code, Option<&str>)> = codings
        .iter()
        .filter_map(|c| {
            let system = c.get("system").and_then(Value::as_str)?;
            let value = c.get("code").and_then(Value::as_str)?.trim();
            let display = c
                .get("display")
                .and_then(Value::as_str)
                .filter(|d| !d.trim().is_empty());
            let sct = || value.parse::<u64>().ok().and_then(|n| SctId::new(n).ok());
            let code = match system {
                SNOMED_SYSTEM => Code::Snomed(sct()?),
                DMD_SYSTEM => Code::Dmd(sct()?),
                READ_V2_SYSTEM => Code::ReadV2(Text::new(value).ok()?),
                CTV3_SYSTEM => Code::Ctv3(Text::new(value).ok()?),
                _ if value.is_empty() => return None,
                _ => Code::Other {
                    system: Text::new(system).ok()?,
                    code: Text::new(value).ok()?,
                },
            };
            Some((rank(system), code, display))
        })
        .collect();
    candidates.sort_by_key(|(r, _, _)| *r);
    // The best coding that has words to show; a coding without a display borrows the
    // concept's text.
    for (_, code, display) in candidates {
        if let Some(display) = display.or(concept_text) {
            return Ok(Coding {
                code: Some(code),
                display: text(display, "display text too long or not printable")?,
            });
        }
    }
    match concept_text {
        Some(t) => Ok(Coding {
            code: None,
            display: text(t, "text too long or not printable")?,
        }),
        None => Err("neither a usable coding with display text nor text"),
    }
}

/// Every (system, code) a resource carries in the places the sharing rules look: the
/// item's code, medicine, reason, category and reaction manifestations. A coding with no
/// system is given as system `""`.
pub(crate) fn codings(v: &Value) -> Vec<(&str, &str)> {
    let list = |key: &str| v.get(key).and_then(Value::as_array).into_iter().flatten();
    let manifestations = list("reaction").flat_map(|r| {
        r.get("manifestation")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    });
    ["code", "medicationCodeableConcept"]
        .iter()
        .filter_map(|k| v.get(*k))
        .chain(list("reasonCode"))
        .chain(list("category"))
        .chain(manifestations)
        .flat_map(|c| {
            c.get("coding")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .filter_map(|coding| {
            let code = coding.get("code").and_then(Value::as_str)?.trim();
            let system = coding.get("system").and_then(Value::as_str).unwrap_or("");
            Some((system, code))
        })
        .collect()
}

fn text<const N: usize>(s: &str, what: &'static str) -> Result<Text<N>, &'static str> {
    Text::new(s).map_err(|_| what)
}

/// A FHIR date or dateTime to a (possibly partial) date: `1990`, `1990-05`,
/// `1990-05-12`, `1990-05-12T…`.
pub(crate) fn date(s: &str) -> Result<Date, &'static str> {
    let day_part = s.split('T').next().unwrap_or(s);
    let mut parts = day_part.split('-');
    let num = |p: Option<&str>, len: usize| -> Result<Option<u16>, &'static str> {
        match p {
            None => Ok(None),
            Some(p) if p.len() == len && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().map(Some).map_err(|_| "bad date")
            }
            Some(_) => Err("bad date"),
        }
    };
    let y = num(parts.next(), 4)?.ok_or("bad date")?;
    let m = num(parts.next(), 2)?;
    let d = num(parts.next(), 2)?;
    if parts.next().is_some() {
        return Err("bad date");
    }
    let narrow = |v: u16| u8::try_from(v).map_err(|_| "bad date");
    match (m, d) {
        (None, _) => Date::year_only(y),
        (Some(m), None) => Date::ym(y, narrow(m)?),
        (Some(m), Some(d)) => Date::ymd(y, narrow(m)?, narrow(d)?),
    }
    .map_err(|_| "date out of range")
}

/// An RFC 3339 instant to a timestamp.
pub(crate) fn instant(s: &str) -> Result<Timestamp, &'static str> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| "bad instant")?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    u64::try_from(ms)
        .ok()
        .and_then(|ms| Timestamp::from_millis(ms).ok())
        .ok_or("instant out of range")
}

/// Item provenance, each part as the source gives it and none of them required:
/// - organisation: `meta.source` (`ODS_SYSTEM|code`), else the first of recorder,
///   asserter, author and informationSource identified by an ODS code;
/// - recorded by: the first of those that names a person or a reference without an ODS
///   code — its display, else its reference (`Practitioner/…`), kept as given;
/// - last updated: `meta.lastUpdated` when it is a readable instant.
fn provenance(v: &Value) -> Result<Provenance, &'static str> {
    const WHO: [&str; 4] = ["recorder", "asserter", "author", "informationSource"];
    let ods_of = |r: &Value| -> Option<OdsCode> {
        let system = str_at(r, &["identifier", "system"]);
        let value = str_at(r, &["identifier", "value"])?;
        let is_org = system == Some(ODS_SYSTEM)
            || (system.is_none() && str_at(r, &["type"]) == Some("Organization"));
        if is_org {
            OdsCode::new(value.trim()).ok()
        } else {
            None
        }
    };
    let organisation = str_at(v, &["meta", "source"])
        .and_then(|s| s.strip_prefix(ODS_SYSTEM))
        .and_then(|s| s.strip_prefix('|'))
        .and_then(|code| OdsCode::new(code.trim()).ok())
        .or_else(|| WHO.iter().filter_map(|k| v.get(*k)).find_map(ods_of));
    let recorded_by = WHO
        .iter()
        .filter_map(|k| v.get(*k))
        .filter(|r| ods_of(r).is_none())
        .find_map(|r| {
            str_at(r, &["display"])
                .or_else(|| str_at(r, &["reference"]))
                .map(str::trim)
                .filter(|s| !s.is_empty())
        })
        .map(|who| Text::new(truncate(who, 256)))
        .transpose()
        .map_err(|_| "recorder name not printable")?;
    let last_updated = str_at(v, &["meta", "lastUpdated"]).and_then(|t| instant(t).ok());
    Ok(Provenance {
        organisation,
        recorded_by,
        last_updated,
    })
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

fn source_id(v: &Value) -> Result<SourceId, &'static str> {
    SourceId::new(str_at(v, &["id"]).ok_or("no id")?).map_err(|_| "id is not a FHIR id")
}

pub(crate) fn entered_in_error(v: &Value) -> bool {
    str_at(v, &["status"]) == Some("entered-in-error")
        || coding_code(
            v.get("verificationStatus"),
            "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
        ) == Some("entered-in-error")
}

// ---- resources -----------------------------------------------------------------------

fn demographics(p: &Value) -> Result<(NhsNumber, Demographics), &'static str> {
    let nhs = p
        .get("identifier")
        .and_then(Value::as_array)
        .and_then(|ids| {
            ids.iter()
                .find(|i| i.get("system").and_then(Value::as_str) == Some(NHS_NUMBER_SYSTEM))
        })
        .and_then(|i| i.get("value"))
        .and_then(Value::as_str)
        .ok_or("no NHS number identifier")?;
    let nhs = NhsNumber::parse(nhs).map_err(|_| "NHS number fails Modulus 11")?;
    let labels = security_codes(p, CONFIDENTIALITY);
    if labels.contains(&"REDACTED") {
        return Err("record redacted upstream");
    }
    let restricted = labels.iter().any(|c| matches!(*c, "R" | "V"));
    let names = p.get("name").and_then(Value::as_array).ok_or("no name")?;
    let name = names
        .iter()
        .find(|n| n.get("use").and_then(Value::as_str) == Some("official"))
        .or_else(|| names.first())
        .ok_or("no name")?;
    let joined = |key: &str| -> String {
        name.get(key)
            .and_then(Value::as_array)
            .map(|parts| {
                parts
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    let family = name.get("family").and_then(Value::as_str).unwrap_or("");
    let given = joined("given");
    if family.is_empty() && given.is_empty() {
        return Err("name without family or given parts");
    }
    let prefix = joined("prefix");
    let name = HumanName {
        family: text(family, "family name too long")?,
        given: text(&given, "given names too long")?,
        prefix: if prefix.is_empty() {
            None
        } else {
            Some(text(&prefix, "name prefix too long")?)
        },
    };
    let birth_date = date(str_at(p, &["birthDate"]).ok_or("no birthDate")?)?;
    let sex = match str_at(p, &["gender"]) {
        Some("male") => Sex::Male,
        Some("female") => Sex::Female,
        Some("other") => Sex::Other,
        Some("unknown") | None => Sex::Unknown,
        Some(_) => return Err("gender not in the R4 value set"),
    };
    let (postcode, gp) = if restricted {
        (None, None)
    } else {
        let postcode = p
            .get("address")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(|a| a.get("postalCode"))
            .and_then(Value::as_str)
            .and_then(|pc| pc.split_whitespace().next())
            .map(|district| PostcodeDistrict::new(district.to_ascii_uppercase()))
            .transpose()
            .map_err(|_| "postcode district malformed")?;
        let gp = p
            .get("generalPractitioner")
            .and_then(Value::as_array)
            .and_then(|g| {
                g.iter()
                    .find(|r| str_at(r, &["identifier", "system"]) == Some(ODS_SYSTEM))
            })
            .and_then(|r| str_at(r, &["identifier", "value"]))
            .map(OdsCode::new)
            .transpose()
            .map_err(|_| "GP practice is not an ODS code")?;
        (postcode, gp)
    };
    let d = Demographics::new(name, birth_date, sex, postcode, gp, restricted)
        .map_err(|_| "demographics inconsistent")?;
    Ok((nhs, d))
}

/// The codes of `meta.security` entries with `system`.
pub(crate) fn security_codes<'a>(v: &'a Value, system: &str) -> Vec<&'a str> {
    v.get("meta")
        .and_then(|m| m.get("security"))
        .and_then(Value::as_array)
        .map(|labels| {
            labels
                .iter()
                .filter(|l| l.get("system").and_then(Value::as_str) == Some(system))
                .filter_map(|l| l.get("code").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

fn flag(v: &Value) -> Result<Option<Alert>, &'static str> {
    match str_at(v, &["status"]) {
        Some("active") => {}
        Some("inactive" | "entered-in-error") => return Ok(None),
        _ => return Err("Flag status missing or not in the R4 value set"),
    }
    let code = concept(v.get("code"))?;
    let category_text = v
        .get("category")
        .and_then(Value::as_array)
        .and_then(|c| c.first());
    let category = match category_text
        .and_then(|c| c.get("text"))
        .and_then(Value::as_str)
    {
        Some("communication need") => AlertCategory::CommunicationNeed,
        Some("reasonable adjustment") => AlertCategory::ReasonableAdjustment,
        Some("clinical warning") => AlertCategory::ClinicalWarning,
        Some("treatment restriction") => AlertCategory::TreatmentRestriction,
        Some("safeguarding") => AlertCategory::Safeguarding,
        Some("end of life") => AlertCategory::EndOfLife,
        _ => match coding_code(
            category_text,
            "http://terminology.hl7.org/CodeSystem/flag-category",
        ) {
            Some("contact") => AlertCategory::CommunicationNeed,
            Some("clinical" | "drug" | "diet" | "lab") => AlertCategory::ClinicalWarning,
            Some("advance-directive") => AlertCategory::EndOfLife,
            Some("safety" | "behavioral") => AlertCategory::Safeguarding,
            _ => AlertCategory::Other,
        },
    };
    let priority = v
        .get("extension")
        .and_then(Value::as_array)
        .and_then(|exts| {
            exts.iter().find(|e| {
                e.get("url").and_then(Value::as_str)
                    == Some("http://hl7.org/fhir/StructureDefinition/flag-priority")
            })
        })
        .and_then(|e| {
            coding_code(
                e.get("valueCodeableConcept"),
                "http://hl7.org/fhir/flag-priority-code",
            )
        });
    // An alert with no stated priority is shown as a warning, never as mere information.
    let severity = match priority {
        Some("PH") => AlertSeverity::HighRisk,
        Some("PN" | "PL") => AlertSeverity::Information,
        _ => AlertSeverity::Warning,
    };
    let detail = str_at(v, &["code", "text"])
        .filter(|t| *t != code.display.as_str())
        .map(|t| text(t, "alert detail too long"))
        .transpose()?;
    let period = Period::new(
        str_at(v, &["period", "start"]).map(date).transpose()?,
        str_at(v, &["period", "end"]).map(date).transpose()?,
    )
    .map_err(|_| "period ends before it starts")?;
    Ok(Some(Alert {
        source_id: source_id(v)?,
        category,
        code,
        detail,
        period,
        severity,
        provenance: provenance(v)?,
    }))
}

fn allergy(v: &Value) -> Result<Option<Allergy>, &'static str> {
    const VERIFICATION: &str =
        "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification";
    const CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";
    let verification = match coding_code(v.get("verificationStatus"), VERIFICATION) {
        Some("entered-in-error" | "refuted") => return Ok(None),
        // Not stated, or a code outside the value set: shown as not stated, never as
        // confirmed.
        code => code.and_then(AllergyVerification::from_code),
    };
    let status = match coding_code(v.get("clinicalStatus"), CLINICAL) {
        Some("active") => AllergyStatus::Active,
        Some("inactive") => AllergyStatus::Inactive,
        Some("resolved") => AllergyStatus::Resolved,
        _ => return Err("clinicalStatus missing or not in the R4 value set"),
    };
    let category = match v
        .get("category")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .and_then(Value::as_str)
    {
        None => None,
        Some("food") => Some(AllergyCategory::Food),
        Some("medication") => Some(AllergyCategory::Medication),
        Some("environment") => Some(AllergyCategory::Environment),
        Some("biologic") => Some(AllergyCategory::Biologic),
        Some(_) => return Err("category not in the R4 value set"),
    };
    let criticality = match str_at(v, &["criticality"]) {
        None => None,
        Some("low") => Some(Criticality::Low),
        Some("high") => Some(Criticality::High),
        Some("unable-to-assess") => Some(Criticality::UnableToAssess),
        Some(_) => return Err("criticality not in the R4 value set"),
    };
    let mut reactions = Vec::new();
    for r in v
        .get("reaction")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let first = r
            .get("manifestation")
            .and_then(Value::as_array)
            .and_then(|m| m.first());
        let null_flavour =
            coding_code(first, "http://terminology.hl7.org/CodeSystem/v3-NullFlavor").is_some();
        let manifestation = match first {
            Some(m) if !null_flavour => Some(concept(Some(m))?),
            _ => None,
        };
        let severity = match str_at(r, &["severity"]) {
            None => None,
            Some("mild") => Some(ReactionSeverity::Mild),
            Some("moderate") => Some(ReactionSeverity::Moderate),
            Some("severe") => Some(ReactionSeverity::Severe),
            Some(_) => return Err("reaction severity not in the R4 value set"),
        };
        reactions.push(Reaction {
            manifestation,
            description: str_at(r, &["description"])
                .map(|d| text(d, "reaction description too long"))
                .transpose()?,
            severity,
        });
    }
    let note = v
        .get("note")
        .and_then(Value::as_array)
        .map(|notes| {
            notes
                .iter()
                .filter_map(|n| n.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|n| !n.is_empty());
    Ok(Some(Allergy {
        source_id: source_id(v)?,
        substance: concept(v.get("code"))?,
        category,
        criticality,
        status,
        reactions: BoundedVec::try_from(reactions).map_err(|_| "more than 8 reactions")?,
        onset: str_at(v, &["onsetDateTime"]).map(date).transpose()?,
        note: note.map(|n| text(&n, "note too long")).transpose()?,
        provenance: provenance(v)?,
        verification,
    }))
}

fn extension<'a>(v: &'a Value, url: &str) -> Option<&'a Value> {
    v.get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(url))
}

fn medication(v: &Value) -> Result<Option<Medication>, &'static str> {
    let status = match str_at(v, &["status"]) {
        Some("active") => MedicationStatus::Active,
        Some("completed") => MedicationStatus::Completed,
        Some("stopped") => MedicationStatus::Stopped,
        Some("on-hold") => MedicationStatus::OnHold,
        Some("intended") => MedicationStatus::Intended,
        Some("unknown") => MedicationStatus::Unknown,
        Some("entered-in-error" | "not-taken") => return Ok(None),
        _ => return Err("status missing or not in the R4 value set"),
    };
    let course_text = str_at(v, &["category", "text"]);
    let course = match (
        coding_code(
            v.get("category"),
            "https://fhir.hl7.org.uk/CodeSystem/UKCore-MedicationRequestCourseOfTherapy",
        ),
        course_text,
    ) {
        (Some("acute"), _) | (None, Some("acute")) => Some(Course::Acute),
        (Some("continuous"), _) | (None, Some("repeat")) => Some(Course::Repeat),
        (Some("continuous-repeating-dispensing"), _) | (None, Some("repeat dispensing")) => {
            Some(Course::RepeatDispensing)
        }
        _ => None,
    };
    let started = str_at(v, &["effectivePeriod", "start"])
        .or_else(|| str_at(v, &["effectiveDateTime"]))
        .map(date)
        .transpose()?;
    let last_issued = extension(
        v,
        "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-MedicationStatementLastIssueDate",
    )
    .and_then(|e| e.get("valueDateTime"))
    .and_then(Value::as_str)
    .map(date)
    .transpose()?;
    let prescribed_elsewhere = extension(
        v,
        "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-MedicationPrescribingOrganizationType",
    )
    .and_then(|e| {
        // UK Core's valueCodeableConcept; valueCoding as older exports wrote it.
        coding_code(
            e.get("valueCodeableConcept"),
            "https://fhir.hl7.org.uk/CodeSystem/UKCore-MedicationPrescribingOrganizationType",
        )
        .or_else(|| str_at(e, &["valueCoding", "code"]))
    })
        == Some("prescribed-by-another-organisation");
    let dose_text = v
        .get("dosage")
        .and_then(Value::as_array)
        .and_then(|d| d.first())
        .and_then(|d| d.get("text"))
        .and_then(Value::as_str)
        .map(|t| text(t, "dose text too long"))
        .transpose()?;
    Ok(Some(Medication {
        source_id: source_id(v)?,
        medicine: concept(v.get("medicationCodeableConcept"))?,
        dose_text,
        status,
        course,
        started,
        last_issued,
        prescribed_elsewhere,
        provenance: provenance(v)?,
        ended: str_at(v, &["effectivePeriod", "end"])
            .map(date)
            .transpose()?,
    }))
}

fn related_person(v: &Value) -> Result<Option<KeyContact>, &'static str> {
    if v.get("active").and_then(Value::as_bool) == Some(false) {
        return Ok(None);
    }
    let relationship = v
        .get("relationship")
        .and_then(Value::as_array)
        .and_then(|r| r.first());
    let role = match (
        coding_code(
            relationship,
            "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
        ),
        coding_code(
            relationship,
            "http://terminology.hl7.org/CodeSystem/v2-0131",
        ),
    ) {
        (Some("NOK"), _) | (_, Some("N")) => ContactRole::NextOfKin,
        (Some("POWATT"), _) => ContactRole::PowerOfAttorney,
        (_, Some("C")) => ContactRole::Carer,
        (_, Some("CP")) => ContactRole::KeyWorker,
        _ => ContactRole::Other,
    };
    let name = v
        .get("name")
        .and_then(Value::as_array)
        .and_then(|n| n.first())
        .ok_or("RelatedPerson without a name")?;
    let name = match name.get("text").and_then(Value::as_str) {
        Some(t) => t.to_owned(),
        None => {
            let given: Vec<&str> = name
                .get("given")
                .and_then(Value::as_array)
                .map(|g| g.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let family = name.get("family").and_then(Value::as_str).unwrap_or("");
            format!("{} {family}", given.join(" ")).trim().to_owned()
        }
    };
    if name.is_empty() {
        return Err("RelatedPerson without a name");
    }
    let phone = v
        .get("telecom")
        .and_then(Value::as_array)
        .and_then(|t| {
            t.iter()
                .find(|c| c.get("system").and_then(Value::as_str) == Some("phone"))
        })
        .and_then(|c| c.get("value"))
        .and_then(Value::as_str)
        .map(|p| text(p, "phone number too long"))
        .transpose()?;
    Ok(Some(KeyContact {
        role,
        name: text(&name, "contact name too long")?,
        relationship: relationship
            .and_then(|r| r.get("text"))
            .and_then(Value::as_str)
            .map(|t| text(t, "relationship too long"))
            .transpose()?,
        phone,
        provenance: provenance(v)?,
    }))
}

/// A Consent as the sharing rules read it. `Ok(None)`: it does not restrict sharing (a
/// consent of another scope, a permit with nothing denied, entered in error). `Ok(Some)`:
/// a denial (an objection, partial or whole, or its withdrawal). `Err`: it cannot be read
/// — the caller counts it as a standing objection to the whole patient.
///
/// Fail-closed rules (tools/hub/README.md, "Objections"):
/// - scope `patient-privacy`, or no readable scope at all, is a privacy consent; another
///   scope (treatment, research, advance directive) does not restrict sharing;
/// - status `inactive` / `rejected` is a withdrawal, `entered-in-error` is ignored, and
///   every other status — `active`, `proposed`, `draft`, missing or unknown — objects;
/// - the date may be a year, year-month, date or dateTime, with or without a zone, or
///   absent: it is kept as the range of instants it allows;
/// - a top-level `deny` limited by `class` to data classes the mapper knows withholds
///   those sections; any other limit (codes, nested exceptions, unknown classes) withholds
///   the whole patient; a `permit` with nested `deny` provisions denies what they name; a
///   provision of no readable type denies the whole patient.
fn consent(v: &Value) -> Result<Option<Denial>, &'static str> {
    let scopes: Vec<&str> = v
        .get("scope")
        .and_then(|s| s.get("coding"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("code").and_then(Value::as_str))
        .collect();
    let privacy = scopes.is_empty()
        || coding_code(v.get("scope"), CONSENT_SCOPE) == Some("patient-privacy")
        || scopes.contains(&"patient-privacy");
    if !privacy {
        return Ok(None);
    }
    let withdrawn = match str_at(v, &["status"]) {
        Some("entered-in-error") => return Ok(None),
        Some("inactive" | "rejected") => true,
        _ => false,
    };
    let scope = match v.get("provision") {
        None => DenialScope::Patient,
        Some(p) => match provision_denies(p, 0) {
            Some(scope) => scope,
            None => return Ok(None),
        },
    };
    Ok(Some(Denial {
        withdrawn,
        when: str_at(v, &["dateTime"]).and_then(instant_range),
        scope,
        last_updated: str_at(v, &["meta", "lastUpdated"]).and_then(|t| instant(t).ok()),
    }))
}

/// What a provision denies; `None` if it denies nothing.
fn provision_denies(p: &Value, depth: u8) -> Option<DenialScope> {
    let nested: Vec<&Value> = p
        .get("provision")
        .and_then(Value::as_array)
        .map(|n| n.iter().collect())
        .unwrap_or_default();
    match str_at(p, &["type"]) {
        Some("deny") => {
            if !nested.is_empty() || p.get("code").is_some() || depth > 2 {
                // Exceptions inside a denial, or a denial limited by codes, cannot be
                // classified into sections: the whole patient.
                return Some(DenialScope::Patient);
            }
            let classes: Vec<&Value> = p
                .get("class")
                .and_then(Value::as_array)
                .map(|c| c.iter().collect())
                .unwrap_or_default();
            if classes.is_empty() {
                return Some(DenialScope::Patient);
            }
            let mut sections = Sections::default();
            for class in classes {
                let system = str_at(class, &["system"]);
                let known_system =
                    matches!(system, None | Some("http://hl7.org/fhir/resource-types"));
                match (known_system, str_at(class, &["code"])) {
                    (true, Some("Flag")) => sections.alerts = true,
                    (true, Some("AllergyIntolerance")) => sections.allergies = true,
                    (
                        true,
                        Some(
                            "MedicationStatement"
                            | "MedicationRequest"
                            | "Medication"
                            | "MedicationAdministration"
                            | "MedicationDispense",
                        ),
                    ) => sections.medications = true,
                    (true, Some("RelatedPerson")) => sections.contacts = true,
                    _ => return Some(DenialScope::Patient),
                }
            }
            Some(DenialScope::Sections(sections))
        }
        Some("permit") => {
            let mut out: Option<DenialScope> = None;
            for n in nested {
                match (out, provision_denies(n, depth.saturating_add(1))) {
                    (_, None) => {}
                    (_, Some(DenialScope::Patient)) => return Some(DenialScope::Patient),
                    (None, Some(s)) => out = Some(s),
                    (Some(DenialScope::Sections(a)), Some(DenialScope::Sections(b))) => {
                        out = Some(DenialScope::Sections(a.union(b)));
                    }
                    (Some(DenialScope::Patient), Some(_)) => {
                        return Some(DenialScope::Patient);
                    }
                }
            }
            out
        }
        // A provision whose type cannot be read, in a privacy consent: the whole patient.
        _ => Some(DenialScope::Patient),
    }
}

/// The earliest and latest instants a FHIR `date` or `dateTime` allows. A year,
/// year-month or date spans its whole period; one without a zone (a date, or a dateTime
/// written without one) is widened by 14 hours each way, since the source's offset could
/// be any. `None` if it cannot be read.
pub(crate) fn instant_range(s: &str) -> Option<(Timestamp, Timestamp)> {
    const ZONE_SLACK_MS: u64 = 14 * 3_600_000;
    if let Ok(t) = instant(s) {
        return Some((t, t));
    }
    let (day_part, time_part) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    date(day_part).ok()?;
    let mut parts = day_part.split('-');
    let y: i32 = parts.next()?.parse().ok()?;
    let m: Option<u8> = parts.next().map(str::parse).transpose().ok()?;
    let d: Option<u8> = parts.next().map(str::parse).transpose().ok()?;
    let day = |y: i32, m: u8, d: u8| -> Option<i64> {
        let month = time::Month::try_from(m).ok()?;
        let date = time::Date::from_calendar_date(y, month, d).ok()?;
        Some(date.midnight().assume_utc().unix_timestamp() * 1000)
    };
    let (start, end) = match (m, d, time_part) {
        (None, _, _) => (day(y, 1, 1)?, day(y.checked_add(1)?, 1, 1)?),
        (Some(m), None, _) => {
            let (ny, nm) = if m == 12 {
                (y.checked_add(1)?, 1)
            } else {
                (y, m + 1)
            };
            (day(y, m, 1)?, day(ny, nm, 1)?)
        }
        (Some(m), Some(d), None) => {
            let start = day(y, m, d)?;
            (start, start.checked_add(86_400_000)?)
        }
        (Some(m), Some(d), Some(t)) => {
            // A local time with no zone: that instant at any offset.
            let mut hms = t.split(['.', '+', '-', 'Z']).next()?.split(':');
            let h: i64 = hms.next()?.parse().ok()?;
            let mi: i64 = hms.next()?.parse().ok()?;
            let sec: i64 = hms.next().map(str::parse).transpose().ok()?.unwrap_or(0);
            if !(0..24).contains(&h) || !(0..60).contains(&mi) || !(0..61).contains(&sec) {
                return None;
            }
            let at = day(y, m, d)? + ((h * 60 + mi) * 60 + sec) * 1000;
            (at, at + 1)
        }
    };
    let start = u64::try_from(start).ok()?.saturating_sub(ZONE_SLACK_MS);
    let end = u64::try_from(end)
        .ok()?
        .saturating_sub(1)
        .saturating_add(ZONE_SLACK_MS);
    Some((
        Timestamp::from_millis(start).ok()?,
        Timestamp::from_millis(end.min(Timestamp::END - 1)).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_dates() {
        assert_eq!(date("1990").map(|d| d.to_string()), Ok("1990".into()));
        assert_eq!(date("1990-05").map(|d| d.to_string()), Ok("1990-05".into()));
        assert_eq!(
            date("1990-05-12T10:00:00Z").map(|d| d.to_string()),
            Ok("1990-05-12".into())
        );
        for bad in ["", "90", "1990-5", "1990-02-30", "1990-01-01-01", "abcd"] {
            assert!(date(bad).is_err(), "{bad}");
        }
    }

    fn privacy_consent(extra: Value) -> Value {
        let mut c = serde_json::json!({
            "resourceType": "Consent",
            "id": "c1",
            "status": "active",
            "scope": { "coding": [{ "system": CONSENT_SCOPE, "code": "patient-privacy" }] },
            "patient": { "reference": "Patient/p1" },
            "dateTime": "2024-03-01T10:00:00Z",
            "provision": { "type": "deny" },
        });
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                if v.is_null() {
                    c.remove(k);
                } else {
                    c.insert(k.clone(), v.clone());
                }
            }
        }
        c
    }

    fn objects_whole(consents: &[Value]) -> bool {
        let denials: Vec<Denial> = consents
            .iter()
            .filter_map(|c| consent(c).unwrap_or(Some(Denial::unreadable())))
            .collect();
        resolve_consents(&denials).0.map(|o| o.status) == Some(ObjectionStatus::Objected)
    }

    /// HAZ-04: every date precision, no date, and a missing, proposed, draft or unknown
    /// status object; only entered-in-error is ignored and only a withdrawal lifts.
    #[test]
    fn every_consent_shape_that_denies_objects() {
        use serde_json::json;
        for date in [
            json!("2024"),
            json!("2024-03"),
            json!("2024-03-01"),
            json!("2024-03-01T10:00:00Z"),
            json!("2024-03-01T10:00:00+01:00"),
            json!("2024-03-01T10:00:00"),
            json!("not a date"),
            Value::Null,
        ] {
            let c = privacy_consent(json!({ "dateTime": date }));
            assert!(objects_whole(&[c]), "date {date}");
        }
        for status in [
            Value::Null,
            json!("proposed"),
            json!("draft"),
            json!("sometimes"),
            json!(7),
        ] {
            let c = privacy_consent(json!({ "status": status }));
            assert!(objects_whole(&[c]), "status {status}");
        }
        // No scope at all: read as a privacy consent.
        assert!(objects_whole(&[privacy_consent(json!({ "scope": null }))]));
        // A provision of no readable type, a code-limited or nested denial, an unknown
        // class: the whole patient.
        for provision in [
            json!({}),
            json!({ "type": "perhaps" }),
            json!({ "type": "deny", "code": [{ "text": "immunisations" }] }),
            json!({ "type": "deny", "provision": [{ "type": "permit" }] }),
            json!({ "type": "deny", "class": [{ "system": "http://hl7.org/fhir/resource-types", "code": "Observation" }] }),
            json!({ "type": "deny", "class": [{ "system": "https://local.invalid", "code": "Flag" }] }),
            json!({ "type": "permit", "provision": [{ "type": "deny" }] }),
        ] {
            let c = privacy_consent(json!({ "provision": provision }));
            assert!(objects_whole(&[c]), "provision {provision}");
        }
        // Not objections: entered in error, another scope, a plain permit, a withdrawal.
        for extra in [
            json!({ "status": "entered-in-error" }),
            json!({ "scope": { "coding": [{ "system": CONSENT_SCOPE, "code": "treatment" }] } }),
            json!({ "provision": { "type": "permit" } }),
            json!({ "status": "inactive" }),
            json!({ "status": "rejected" }),
        ] {
            let c = privacy_consent(extra.clone());
            assert!(!objects_whole(&[c]), "{extra}");
        }
    }

    /// HAZ-04: a separate withdrawal lifts an objection only when it is, without doubt,
    /// later; imprecise dates resolve in favour of the objection.
    #[test]
    fn imprecise_dates_resolve_in_favour_of_the_objection() {
        use serde_json::json;
        let objection = |d: &str| privacy_consent(json!({ "id": "o", "dateTime": d }));
        let withdrawal =
            |d: Value| privacy_consent(json!({ "id": "w", "status": "inactive", "dateTime": d }));
        let cases = [
            ("2023-01-10", json!("2024-06-01T09:00:00Z"), false),
            ("2023-01-10T08:00:00Z", json!("2023-01-10T09:00:00Z"), false),
            ("2024", json!("2024-06-01"), true),
            ("2024-06", json!("2024-06-20"), true),
            ("2024-06-20", json!("2024-06-20T23:00:00Z"), true),
            ("2024-06-20", json!("2024-06-21"), true),
            ("2024-06-20", json!("2024-06-23"), false),
            ("2024-06-20", Value::Null, true),
            ("2024-06-20T10:00:00Z", json!("2024-06-20T09:00:00Z"), true),
        ];
        for (o, w, stands) in cases {
            assert_eq!(
                objects_whole(&[objection(o), withdrawal(w.clone())]),
                stands,
                "objection {o}, withdrawal {w}"
            );
        }
        // An unreadable Consent beside a clear withdrawal still objects.
        assert!(objects_whole(&[
            withdrawal(json!("2030-01-01")),
            json!({ "resourceType": "Consent" })
        ]));
        // A partial withdrawal does not lift a whole objection.
        let partial_w = privacy_consent(json!({
            "id": "w", "status": "inactive", "dateTime": "2030-01-01",
            "provision": { "type": "deny", "class": [{ "code": "Flag" }] }
        }));
        assert!(objects_whole(&[objection("2020-01-01"), partial_w]));
    }

    /// A deny limited to known classes withholds those sections only.
    #[test]
    fn partial_objections_name_their_sections() {
        use serde_json::json;
        let c = privacy_consent(json!({ "provision": { "type": "deny", "class": [
            { "system": "http://hl7.org/fhir/resource-types", "code": "MedicationStatement" },
            { "code": "RelatedPerson" },
        ] } }));
        let d = consent(&c).unwrap().unwrap();
        let (whole, sections) = resolve_consents(&[d]);
        assert_eq!(whole, None);
        assert_eq!(
            sections,
            Sections {
                medications: true,
                contacts: true,
                ..Sections::default()
            }
        );
    }

    /// Codings as they are in the wild: SNOMED CT first, then dm+d, Read, CTV3, local;
    /// a broken coding is passed over; text alone is an item; nothing to show is an error.
    #[test]
    fn concepts_read_every_coding_system_and_text() {
        use serde_json::json;
        let c = |v: Value| concept(Some(&v));
        let local = c(json!({ "coding": [{ "system": "https://gp.invalid/cs", "code": "DNR", "display": "DNACPR" }] })).unwrap();
        assert_eq!(
            local.code.as_ref().map(Code::system),
            Some("https://gp.invalid/cs")
        );
        assert_eq!(local.display.as_str(), "DNACPR");
        let dmd = c(json!({ "coding": [{ "system": DMD_SYSTEM, "code": "39732311000001104", "display": "Amoxicillin 250mg capsules" }] })).unwrap();
        assert!(matches!(dmd.code, Some(Code::Dmd(_))));
        let both = c(json!({ "coding": [
            { "system": "https://gp.invalid/cs", "code": "X", "display": "local words" },
            { "system": SNOMED_SYSTEM, "code": "450476008", "display": "Not for CPR" },
        ] }))
        .unwrap();
        assert!(matches!(both.code, Some(Code::Snomed(_))));
        let broken_snomed = c(json!({ "coding": [
            { "system": SNOMED_SYSTEM, "code": "450476009", "display": "typo" },
            { "system": READ_V2_SYSTEM, "code": "1JC..", "display": "read words" },
        ] }))
        .unwrap();
        assert!(matches!(broken_snomed.code, Some(Code::ReadV2(_))));
        let text_only = c(json!({ "text": "penicillin - rash" })).unwrap();
        assert_eq!(text_only.code, None);
        assert_eq!(text_only.display.as_str(), "penicillin - rash");
        let borrowed = c(json!({ "coding": [{ "system": "https://gp.invalid/cs", "code": "X" }], "text": "words" })).unwrap();
        assert_eq!(borrowed.display.as_str(), "words");
        assert!(
            c(json!({ "coding": [{ "system": "https://gp.invalid/cs", "code": "X" }] })).is_err()
        );
        assert!(c(json!({})).is_err());
    }

    /// Provenance without an ODS code is kept as it is, never an error.
    #[test]
    fn provenance_keeps_what_the_source_gives() {
        use serde_json::json;
        let p = provenance(&json!({ "recorder": { "display": "Dr A Example" } })).unwrap();
        assert_eq!(p.organisation, None);
        assert_eq!(
            p.recorded_by.as_ref().map(Text::as_str),
            Some("Dr A Example")
        );
        assert_eq!(p.last_updated, None);
        let p = provenance(&json!({ "author": { "reference": "Practitioner/pr-1" }, "meta": { "lastUpdated": "2024-01-01T00:00:00Z" } })).unwrap();
        assert_eq!(
            p.recorded_by.as_ref().map(Text::as_str),
            Some("Practitioner/pr-1")
        );
        assert!(p.last_updated.is_some());
        let p = provenance(&json!({ "informationSource": { "type": "Organization", "identifier": { "system": ODS_SYSTEM, "value": "M85001" } } })).unwrap();
        assert_eq!(p.organisation.as_ref().map(OdsCode::as_str), Some("M85001"));
        assert_eq!(p.recorded_by, None);
        let p = provenance(&json!({})).unwrap();
        assert_eq!(
            p,
            Provenance {
                organisation: None,
                recorded_by: None,
                last_updated: None
            }
        );
    }

    #[test]
    fn instants_keep_milliseconds() {
        assert_eq!(
            instant("2024-01-02T03:04:05.678Z").map(Timestamp::as_millis),
            Ok(1_704_164_645_678)
        );
        assert!(instant("2024-01-02").is_err());
    }
}
