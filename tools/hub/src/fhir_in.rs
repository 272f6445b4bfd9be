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

use carecache_fhir::model::{self, Envelope, Labels};
use carecache_fhir::read;
pub use carecache_fhir::read::{Denial, DenialScope, Sections};
use serde::Deserialize;
use serde_json::Value;
use sync_protocol::message::ObjectionStatus;
use sync_protocol::record::{
    Alert, AlertSeverity, Allergy, KeyContact, Medication, PatientRecord, Section, Unreadable,
};
use sync_protocol::types::{RecordVersion, Timestamp};

use crate::sharing::SharingRules;

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
    /// The Patient resource (or why it could not be read).
    pub patient: Option<Result<model::Patient, &'static str>>,
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

/// The patient a resource belongs to: its own id for a Patient, else the id in
/// `subject` or `patient` (`Patient/{id}`, or an absolute URL ending so).
pub fn patient_of(resource: &Value) -> Option<String> {
    let env = Envelope::deserialize(resource).ok()?;
    patient_in(&env).map(str::to_owned)
}

fn patient_in(env: &Envelope) -> Option<&str> {
    if env.kind() == "Patient" {
        return Some(env.id()).filter(|id| !id.is_empty());
    }
    env.patient_ref().and_then(read::patient_id)
}

/// A resource of type `T`, or the rule it breaks.
fn typed<T: for<'de> Deserialize<'de>>(v: &Value) -> Result<T, &'static str> {
    T::deserialize(v).map_err(|_| "an element is not of its FHIR type")
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
                    .and_then(|p| p.as_ref().ok())
                    .and_then(read::patient_nhs)
                    .and_then(|nhs| self.by_nhs.remove(&nhs.as_u64()))
                {
                    res.items.extend(items.into_iter().map(|(_, _, item)| item));
                }
            }
        }
        for (kind, id, _) in self.by_nhs.into_values().flatten() {
            self.issues.push(unsent_patient(kind, id));
        }
        (self.patients, self.issues)
    }

    /// The NHS number of the Patient `pid`, once its Patient resource has been added.
    pub fn nhs_of(&self, pid: &str) -> Option<u64> {
        self.patients
            .get(pid)?
            .patient
            .as_ref()?
            .as_ref()
            .ok()
            .and_then(read::patient_nhs)
            .map(|n| n.as_u64())
    }

    /// Add one resource.
    pub fn add(&mut self, resource: Value) {
        let env = Envelope::deserialize(&resource).unwrap_or_default();
        let kind = env.kind().to_owned();
        let id = env.id().to_owned();
        match route(&env) {
            Route::Patient(pid) => {
                self.patients.entry(pid).or_default().patient = Some(typed(&resource));
            }
            Route::Item(pid) => {
                let item = classify(&resource, &id, self.rules);
                self.patients.entry(pid).or_default().items.push(item);
            }
            Route::ByNhs(nhs) => {
                let item = classify(&resource, &id, self.rules);
                self.by_nhs.entry(nhs).or_default().push((kind, id, item));
            }
            Route::Unplaced(reason) => self.issues.push(MappingIssue {
                resource_type: kind,
                id,
                reason,
            }),
        }
    }
}

/// The issue for a resource naming, by NHS number, a Patient the source did not send.
pub fn unsent_patient(resource_type: String, id: String) -> MappingIssue {
    MappingIssue {
        reason: if resource_type == "Consent" {
            "Consent names a Patient the source did not send: objection cannot be placed"
        } else {
            "names a Patient the source did not send"
        },
        resource_type,
        id,
    }
}

/// Where a resource belongs, read from its [`Envelope`] alone (so that a source can be
/// grouped by patient before any resource is read whole).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Route {
    /// A Patient, by its id.
    Patient(String),
    /// A resource of a used type naming its Patient by reference (FHIR id).
    Item(String),
    /// A resource of a used type naming its Patient by NHS number only: placed once
    /// every Patient has been read.
    ByNhs(u64),
    /// Cannot be placed: the rule it breaks (reported).
    Unplaced(&'static str),
}

/// Where the resource `env` describes belongs.
pub fn route(env: &Envelope) -> Route {
    let kind = env.kind();
    match kind {
        "Patient" if !env.id().is_empty() => Route::Patient(env.id().to_owned()),
        "Patient" => Route::Unplaced("Patient without an id"),
        "Flag"
        | "AllergyIntolerance"
        | "MedicationStatement"
        | "RelatedPerson"
        | "List"
        | "Consent" => match (
            patient_in(env),
            env.patient_ref().and_then(read::nhs_reference),
        ) {
            (Some(pid), _) => Route::Item(pid.to_owned()),
            (None, Some(nhs)) => Route::ByNhs(nhs.as_u64()),
            // A Consent that names no patient we can find cannot be honoured and cannot
            // be placed: reported loudly, and the ingest summary counts it.
            (None, None) if kind == "Consent" => {
                Route::Unplaced("Consent names no Patient: objection cannot be placed")
            }
            (None, None) => Route::Unplaced("no Patient reference"),
        },
        _ => Route::Unplaced("resource type not used"),
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

/// When a denial was recorded: the latest instant its date allows, else its
/// `meta.lastUpdated`, else the epoch (unknown).
fn recorded_at(d: &Denial) -> Timestamp {
    d.when
        .map(|(_, latest)| latest)
        .or(d.last_updated)
        .unwrap_or_else(|| Timestamp::from_millis(0).unwrap_or_else(|_| unreachable!()))
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
    let objection = if let Some(at) = whole.iter().map(|d| recorded_at(d)).max() {
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
            .map(recorded_at)
            .max()
            .map(|at| SourceObjection {
                status: ObjectionStatus::Withdrawn,
                recorded_at: at,
            })
    };
    (objection, sections)
}

/// A Consent as the objection rules read it (see [`read::consent`]); one that is not
/// a readable Consent is an `Err`, which withholds the patient.
pub fn consent(v: &Value) -> Result<Option<Denial>, &'static str> {
    read::consent(&typed(v)?)
}

/// Map one item resource (`id` as its envelope gave it), applying the sharing rules
/// first. The rules see the item's labels and codes even when the rest of it cannot be
/// read.
pub fn classify(item: &Value, id: &str, rules: &SharingRules) -> Item {
    let labels = Labels::deserialize(item).unwrap_or_default();
    let kind = labels.kind();
    let issue = |reason| MappingIssue {
        resource_type: kind.to_owned(),
        id: id.to_owned(),
        reason,
    };
    if matches!(
        kind,
        "Flag" | "AllergyIntolerance" | "MedicationStatement" | "RelatedPerson"
    ) && !labels.entered_in_error()
        && rules.withholds(&labels)
    {
        return Item::Withheld;
    }
    match kind {
        "Flag" => Item::Alert(typed(item).and_then(|r| read::flag(&r)).map_err(issue)),
        "AllergyIntolerance" => {
            Item::Allergy(typed(item).and_then(|r| read::allergy(&r)).map_err(issue))
        }
        "MedicationStatement" => Item::Medication(
            typed(item)
                .and_then(|r| read::medication(&r))
                .map_err(issue),
        ),
        "RelatedPerson" => Item::Contact(
            typed(item)
                .and_then(|r| read::related_person(&r))
                .map_err(issue),
        ),
        "List" => match typed::<model::List>(item) {
            Ok(l) if read::allergies_unavailable(&l) => Item::AllergiesUnavailable,
            _ => Item::Ignored,
        },
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
        .ok_or_else(|| patient_issue("resources for a Patient the source did not send"))?
        .map_err(patient_issue)?;
    let (nhs_number, demographics) = read::demographics(&patient).map_err(patient_issue)?;

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

#[cfg(test)]
mod tests {
    use super::*;
    use carecache_fhir::codes::CONSENT_SCOPE;

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

    /// A resource with one element of the wrong JSON type is still placed on its
    /// patient: an item is counted as "could not be shown" (never dropped), one carrying
    /// a sensitive code is withheld all the same, and a Consent withholds the patient.
    #[test]
    fn a_resource_with_an_odd_element_is_placed_labelled_and_counted() {
        use serde_json::json;
        let rules = SharingRules::default_rules().unwrap();
        let mut c = Collector::new(&rules);
        c.add(json!({ "resourceType": "Patient", "id": "p1",
            "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018" }],
            "name": [{ "family": "Example", "given": ["Ann"] }], "birthDate": "1950-01-01" }));
        let flag = |code: &str| {
            json!({ "resourceType": "Flag", "id": format!("f-{code}"), "status": "active",
                "subject": { "reference": "Patient/p1" }, "period": "since last year",
                "code": { "coding": [{ "system": "http://snomed.info/sct", "code": code, "display": "x" }] } })
        };
        c.add(flag("450476008"));
        c.add(flag("86406008"));
        c.add(json!({ "resourceType": "Flag", "id": "ok", "status": "active",
            "subject": { "reference": "Patient/p1" },
            "code": { "coding": [{ "system": "http://snomed.info/sct", "code": "450476008", "display": "Not for attempted CPR" }] } }));
        let (patients, issues) = c.finish();
        assert!(issues.is_empty(), "{issues:?}");
        let mut problems = Vec::new();
        let mapped = map_patient("p1", patients["p1"].clone(), &mut problems).unwrap();
        assert_eq!(
            mapped.record.alerts.entries().len(),
            1,
            "the readable alert"
        );
        assert_eq!(mapped.record.unreadable.alerts, 1, "the odd one is counted");
        assert_eq!(
            mapped.record.withheld, 1,
            "the sensitive odd one is withheld"
        );
        assert_eq!(problems.len(), 1);
        assert!(mapped.objection.is_none());

        let mut c = Collector::new(&rules);
        c.add(json!({ "resourceType": "Patient", "id": "p1",
            "identifier": [{ "system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018" }],
            "name": [{ "family": "Example", "given": ["Ann"] }], "birthDate": "1950-01-01" }));
        c.add(privacy_consent(
            json!({ "provision": "deny", "dateTime": 2024 }),
        ));
        let (patients, _) = c.finish();
        let mapped = map_patient("p1", patients["p1"].clone(), &mut problems).unwrap();
        assert_eq!(
            mapped.objection.map(|o| o.status),
            Some(ObjectionStatus::Objected),
            "an unreadable Consent objects"
        );
    }
}
