//! The synthetic record as the upstream shared care record would export it: FHIR R4
//! resources shaped after UK Core, written as Bulk Data NDJSON (one file per resource
//! type, one resource per line).
//!
//! Conventions the hub's mapping relies on (documented in `tools/hub/README.md`):
//! - item provenance: `meta.source` = `https://fhir.nhs.uk/Id/ods-organization-code|ODS`,
//!   `meta.lastUpdated` = when it last changed; every resource carries `meta.versionId`;
//! - Flag: `category[0]` has the flag-category coding and the alert category as text;
//!   severity in the core `flag-priority` extension (PL, PM, PH); detail in `code.text`;
//! - an allergy section the source cannot provide is a `List` (code 886921000000105) with
//!   `emptyReason` `unavailable`; no resources of a kind means "none recorded";
//! - an objection is a `Consent` (scope patient-privacy, provision deny, purpose TREAT),
//!   `active` while it stands and `inactive` once withdrawn;
//! - every resource is labelled `HTEST` (synthetic) in `meta.security`.
#![allow(
    clippy::indexing_slicing,
    reason = "serde_json IndexMut with a str key inserts into objects built just above by json!; it cannot panic"
)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::{Value, json};
use sync_protocol::record::{
    Alert, AlertCategory, Allergy, AllergyCategory, AllergyStatus, ContactRole, Course,
    Criticality, KeyContact, Medication, MedicationStatus, ReactionSeverity, Section, Sex,
};
use sync_protocol::types::{Coding, Date, Provenance, Timestamp};

use crate::dataset::{
    ConsentDate, ConsentStatus, LOCAL_ALERT_SYSTEM, LaterWithdrawal, Objection, Provision,
    SourcePatient, Unreadable as UnreadableItem, Withheld,
};

/// NHS number identifier system.
pub const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
/// ODS organisation code identifier system.
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const SNOMED: &str = "http://snomed.info/sct";
const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";

/// Every resource of one patient, grouped by resource type.
pub fn resources(p: &SourcePatient) -> Vec<Value> {
    let pid = p.fhir_id.as_str();
    let r = &p.expected;
    let mut out = vec![patient(p)];
    out.extend(r.alerts.entries().iter().map(|a| flag(pid, a, None)));
    out.extend(r.allergies.entries().iter().map(|a| allergy(pid, a, false)));
    if matches!(r.allergies, Section::NotAvailable) {
        out.push(unavailable_allergies(pid, p.last_updated));
    }
    out.extend(
        r.medications
            .entries()
            .iter()
            .map(|m| medication(pid, m, None)),
    );
    out.extend(
        r.contacts
            .entries()
            .iter()
            .enumerate()
            .map(|(i, c)| related_person(pid, i, c)),
    );
    for w in &p.withheld {
        out.push(match w {
            Withheld::CodedAlert(a) | Withheld::LocalCodedAlert(a) => flag(pid, a, None),
            Withheld::DmdMedication(m) => medication(pid, m, None),
            Withheld::LabelledMedication(m, label) => medication(pid, m, Some((ACT_CODE, label))),
            Withheld::RestrictedMedication(m) => medication(pid, m, Some((CONFIDENTIALITY, "R"))),
        });
    }
    if let Some(a) = &p.entered_in_error {
        out.push(allergy(pid, a, true));
    }
    for (i, u) in p.unreadable.iter().enumerate() {
        out.push(unreadable(pid, i, *u, p.last_updated));
    }
    if let Some(o) = &p.objection {
        out.extend(consents(pid, o));
    }
    out
}

/// Write `patients` as Bulk Data NDJSON into `dir`: `Patient.ndjson`, `Flag.ndjson`, …
/// Returns the number of resources written per type.
pub fn write_ndjson(
    patients: &[SourcePatient],
    dir: &Path,
) -> std::io::Result<BTreeMap<String, usize>> {
    std::fs::create_dir_all(dir)?;
    let mut files: BTreeMap<String, (BufWriter<File>, usize)> = BTreeMap::new();
    for p in patients {
        for r in resources(p) {
            let kind = r["resourceType"].as_str().unwrap_or("Unknown").to_owned();
            let entry = match files.entry(kind) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let f = File::create(dir.join(format!("{}.ndjson", e.key())))?;
                    e.insert((BufWriter::new(f), 0))
                }
            };
            serde_json::to_writer(&mut entry.0, &r)?;
            entry.0.write_all(b"\n")?;
            entry.1 += 1;
        }
    }
    let mut counts = BTreeMap::new();
    for (kind, (mut w, n)) in files {
        w.flush()?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        counts.insert(kind, n);
    }
    Ok(counts)
}

fn meta(
    profile: &str,
    version: u64,
    provenance: &Provenance,
    extra_label: Option<(&str, &str)>,
) -> Value {
    let mut security = vec![json!({ "system": ACT_REASON, "code": "HTEST" })];
    if let Some((system, code)) = extra_label {
        security.push(json!({ "system": system, "code": code }));
    }
    let mut m = json!({
        "versionId": version.to_string(),
        "profile": [format!("https://fhir.hl7.org.uk/StructureDefinition/{profile}")],
        "security": security,
    });
    if let Some(t) = provenance.last_updated {
        m["lastUpdated"] = json!(t.rfc3339());
    }
    if let Some(org) = &provenance.organisation {
        m["source"] = json!(format!("{ODS_SYSTEM}|{}", org.as_str()));
    }
    m
}

/// A CodeableConcept as the source records it: one coding in its own system, or the text
/// alone.
fn concept(c: &Coding) -> Value {
    match &c.code {
        Some(code) => {
            json!({ "coding": [{ "system": code.system(), "code": code.value(), "display": c.display.as_str() }] })
        }
        None => json!({ "text": c.display.as_str() }),
    }
}

/// Who recorded an item: the organisation by ODS code, else the recorder as the source
/// names them (a display name, or a Practitioner reference).
fn who(p: &Provenance) -> Option<Value> {
    if let Some(org) = &p.organisation {
        return Some(
            json!({ "type": "Organization", "identifier": { "system": ODS_SYSTEM, "value": org.as_str() } }),
        );
    }
    p.recorded_by.as_ref().map(|r| {
        if r.as_str().starts_with("Practitioner/") {
            json!({ "reference": r.as_str() })
        } else {
            json!({ "display": r.as_str() })
        }
    })
}

fn subject(pid: &str) -> Value {
    json!({ "reference": format!("Patient/{pid}") })
}

fn patient(p: &SourcePatient) -> Value {
    let r = &p.expected;
    let d = &r.demographics;
    let given: Vec<&str> = d.name.given.as_str().split_whitespace().collect();
    let mut name = json!({ "use": "official", "family": d.name.family.as_str(), "given": given });
    if let Some(prefix) = &d.name.prefix {
        name["prefix"] = json!([prefix.as_str()]);
    }
    let mut security = vec![json!({ "system": ACT_REASON, "code": "HTEST" })];
    if d.restricted {
        security.push(json!({ "system": CONFIDENTIALITY, "code": "R" }));
    }
    let mut v = json!({
        "resourceType": "Patient",
        "id": p.fhir_id,
        "meta": {
            "versionId": "1",
            "lastUpdated": p.last_updated.rfc3339(),
            "profile": ["https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"],
            "security": security,
        },
        "identifier": [{ "system": NHS_NUMBER_SYSTEM, "value": r.nhs_number.digits() }],
        "name": [name],
        "gender": match d.sex { Sex::Male => "male", Sex::Female => "female", Sex::Other => "other", Sex::Unknown => "unknown" },
        "birthDate": d.birth_date.to_string(),
    });
    if let Some(pc) = &d.postcode_district {
        v["address"] = json!([{ "use": "home", "postalCode": pc.as_str() }]);
    }
    if let Some(gp) = &d.gp_practice {
        v["generalPractitioner"] = json!([{ "type": "Organization", "identifier": { "system": ODS_SYSTEM, "value": gp.as_str() } }]);
    }
    v
}

/// The alert category as the text of `Flag.category`, and its flag-category code.
pub fn alert_category(c: AlertCategory) -> (&'static str, &'static str) {
    match c {
        AlertCategory::CommunicationNeed => ("communication need", "contact"),
        AlertCategory::ReasonableAdjustment => ("reasonable adjustment", "contact"),
        AlertCategory::ClinicalWarning => ("clinical warning", "clinical"),
        AlertCategory::TreatmentRestriction => ("treatment restriction", "advance-directive"),
        AlertCategory::Safeguarding => ("safeguarding", "safety"),
        AlertCategory::EndOfLife => ("end of life", "advance-directive"),
        AlertCategory::Other => ("other", "admin"),
    }
}

fn period(start: Option<Date>, end: Option<Date>) -> Option<Value> {
    let mut p = serde_json::Map::new();
    if let Some(s) = start {
        p.insert("start".into(), json!(s.to_string()));
    }
    if let Some(e) = end {
        p.insert("end".into(), json!(e.to_string()));
    }
    (!p.is_empty()).then_some(Value::Object(p))
}

fn flag(pid: &str, a: &Alert, label: Option<(&str, &str)>) -> Value {
    let (text, code) = alert_category(a.category);
    let priority = a.severity.priority();
    let mut f = json!({
        "resourceType": "Flag",
        "id": a.source_id.as_str(),
        "meta": meta("UKCore-Flag", 1, &a.provenance, label),
        "extension": [{
            "url": "http://hl7.org/fhir/StructureDefinition/flag-priority",
            "valueCodeableConcept": { "coding": [{ "system": "http://hl7.org/fhir/flag-priority-code", "code": priority.0, "display": priority.1 }] }
        }],
        "status": "active",
        "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/flag-category", "code": code }], "text": text }],
        "code": concept(&a.code),
        "subject": subject(pid),
    });
    if let Some(w) = who(&a.provenance) {
        f["author"] = w;
    }
    if a.provenance.organisation.is_some()
        && let Some(r) = &a.provenance.recorded_by
    {
        f["author"] = json!({ "display": r.as_str() });
    }
    if let Some(detail) = &a.detail {
        f["code"]["text"] = json!(detail.as_str());
    }
    if let Some(p) = period(a.period.start, a.period.end) {
        f["period"] = p;
    }
    f
}

fn allergy(pid: &str, a: &Allergy, entered_in_error: bool) -> Value {
    let status = match a.status {
        AllergyStatus::Active => "active",
        AllergyStatus::Inactive => "inactive",
        AllergyStatus::Resolved => "resolved",
    };
    let mut r = json!({
        "resourceType": "AllergyIntolerance",
        "id": a.source_id.as_str(),
        "meta": meta("UKCore-AllergyIntolerance", 1, &a.provenance, None),
        "code": concept(&a.substance),
        "patient": subject(pid),
    });
    if let Some(w) = who(&a.provenance) {
        r["recorder"] = w;
    }
    let verification = if entered_in_error {
        Some("entered-in-error")
    } else {
        a.verification.map(|v| v.code().0)
    };
    if let Some(code) = verification {
        r["verificationStatus"] = json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": code }] });
    }
    // R4 (ait-1/ait-2): no clinicalStatus when entered in error.
    if !entered_in_error {
        r["clinicalStatus"] = json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": status }] });
    }
    if let Some(c) = a.category {
        r["category"] = json!([match c {
            AllergyCategory::Food => "food",
            AllergyCategory::Medication => "medication",
            AllergyCategory::Environment => "environment",
            AllergyCategory::Biologic => "biologic",
        }]);
    }
    if let Some(c) = a.criticality {
        r["criticality"] = json!(match c {
            Criticality::Low => "low",
            Criticality::High => "high",
            Criticality::UnableToAssess => "unable-to-assess",
        });
    }
    if let Some(onset) = a.onset {
        r["onsetDateTime"] = json!(onset.to_string());
    }
    if let Some(note) = &a.note {
        r["note"] = json!([{ "text": note.as_str() }]);
    }
    let reactions: Vec<Value> = a
        .reactions
        .iter()
        .map(|x| {
            let manifestation = x.manifestation.as_ref().map_or_else(
                || json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "code": "NI" }] }),
                concept,
            );
            let mut v = json!({ "manifestation": [manifestation] });
            if let Some(s) = x.severity {
                v["severity"] = json!(match s {
                    ReactionSeverity::Mild => "mild",
                    ReactionSeverity::Moderate => "moderate",
                    ReactionSeverity::Severe => "severe",
                });
            }
            if let Some(d) = &x.description {
                v["description"] = json!(d.as_str());
            }
            v
        })
        .collect();
    if !reactions.is_empty() {
        r["reaction"] = Value::Array(reactions);
    }
    r
}

fn unavailable_allergies(pid: &str, at: Timestamp) -> Value {
    json!({
        "resourceType": "List",
        "id": format!("{pid}-allergies"),
        "meta": { "versionId": "1", "lastUpdated": at.rfc3339(), "security": [{ "system": ACT_REASON, "code": "HTEST" }] },
        "status": "current",
        "mode": "snapshot",
        "code": { "coding": [{ "system": SNOMED, "code": "886921000000105", "display": "Allergies and adverse reactions" }] },
        "subject": subject(pid),
        "emptyReason": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "unavailable" }] },
        "note": [{ "text": "Information not available." }],
    })
}

fn medication(pid: &str, m: &Medication, label: Option<(&str, &str)>) -> Value {
    let status = match m.status {
        MedicationStatus::Active => "active",
        MedicationStatus::Completed => "completed",
        MedicationStatus::Stopped => "stopped",
        MedicationStatus::OnHold => "on-hold",
        MedicationStatus::Intended => "intended",
        MedicationStatus::Unknown => "unknown",
    };
    let mut r = json!({
        "resourceType": "MedicationStatement",
        "id": m.source_id.as_str(),
        "meta": meta("UKCore-MedicationStatement", 1, &m.provenance, label),
        "status": status,
        "medicationCodeableConcept": concept(&m.medicine),
        "subject": subject(pid),
    });
    if let Some(w) = who(&m.provenance) {
        r["informationSource"] = w;
    }
    if let Some(dose) = &m.dose_text {
        r["dosage"] = json!([{ "text": dose.as_str() }]);
    }
    if m.started.is_some() || m.ended.is_some() {
        r["effectivePeriod"] = period(m.started, m.ended).unwrap_or_else(|| json!({}));
    }
    let mut extension = Vec::new();
    if let Some(last) = m.last_issued {
        extension.push(json!({
            "url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-MedicationStatementLastIssueDate",
            "valueDateTime": last.to_string()
        }));
    }
    extension.push(json!({
        "url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-MedicationPrescribingOrganizationType",
        // UK Core: value[x] only CodeableConcept.
        "valueCodeableConcept": { "coding": [{
            "system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-MedicationPrescribingOrganizationType",
            "code": if m.prescribed_elsewhere { "prescribed-by-another-organisation" } else { "prescribed-at-gp-practice" },
            "display": if m.prescribed_elsewhere { "Prescribed by another organisation" } else { "Prescribed at GP practice" }
        }] }
    }));
    r["extension"] = Value::Array(extension);
    if let Some(course) = m.course {
        let (code, text) = match course {
            Course::Acute => ("acute", "acute"),
            Course::Repeat => ("continuous", "repeat"),
            Course::RepeatDispensing => ("continuous-repeating-dispensing", "repeat dispensing"),
        };
        r["category"] = json!({ "coding": [{ "system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-MedicationRequestCourseOfTherapy", "code": code }], "text": text });
    }
    r
}

/// The relationship coding of a key contact's role.
pub fn contact_role(role: ContactRole) -> (&'static str, &'static str) {
    match role {
        ContactRole::NextOfKin => ("http://terminology.hl7.org/CodeSystem/v3-RoleCode", "NOK"),
        ContactRole::PowerOfAttorney => (
            "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
            "POWATT",
        ),
        ContactRole::Carer => ("http://terminology.hl7.org/CodeSystem/v2-0131", "C"),
        ContactRole::KeyWorker => ("http://terminology.hl7.org/CodeSystem/v2-0131", "CP"),
        ContactRole::Other => ("http://terminology.hl7.org/CodeSystem/v2-0131", "O"),
    }
}

fn related_person(pid: &str, i: usize, c: &KeyContact) -> Value {
    let (system, code) = contact_role(c.role);
    let mut relationship = json!({ "coding": [{ "system": system, "code": code }] });
    if let Some(rel) = &c.relationship {
        relationship["text"] = json!(rel.as_str());
    }
    let mut r = json!({
        "resourceType": "RelatedPerson",
        "id": format!("{pid}-rp{i}"),
        "meta": meta("UKCore-RelatedPerson", 1, &c.provenance, None),
        "active": true,
        "patient": subject(pid),
        "relationship": [relationship],
        "name": [{ "text": c.name.as_str() }],
    });
    if let Some(phone) = &c.phone {
        r["telecom"] = json!([{ "system": "phone", "value": phone.as_str() }]);
    }
    r
}

/// An item written so that no mapper can show it (valid FHIR, nothing to read).
fn unreadable(pid: &str, i: usize, u: UnreadableItem, at: Timestamp) -> Value {
    let meta = json!({ "versionId": "1", "lastUpdated": at.rfc3339(), "security": [{ "system": ACT_REASON, "code": "HTEST" }] });
    match u {
        UnreadableItem::Alert => json!({
            "resourceType": "Flag",
            "id": format!("{pid}-odd{i}"),
            "meta": meta,
            "status": "active",
            "code": { "coding": [{ "system": LOCAL_ALERT_SYSTEM, "code": "ZZ999" }] },
            "subject": subject(pid),
        }),
        UnreadableItem::Medication => json!({
            "resourceType": "MedicationStatement",
            "id": format!("{pid}-odd{i}"),
            "meta": meta,
            "status": "active",
            "medicationReference": { "reference": format!("Medication/{pid}-m{i}") },
            "subject": subject(pid),
        }),
    }
}

/// A date as a Consent shape writes it.
fn consent_date(at: Timestamp, shape: ConsentDate) -> Option<String> {
    let full = at.rfc3339();
    let day = full.get(..10).unwrap_or("2024-01-01").to_owned();
    Some(match shape {
        ConsentDate::Instant => full,
        ConsentDate::NoZone => full.get(..19).unwrap_or(&full).to_owned(),
        ConsentDate::Date => day,
        ConsentDate::YearMonth => day.get(..7).unwrap_or(&day).to_owned(),
        ConsentDate::Year => day.get(..4).unwrap_or(&day).to_owned(),
        ConsentDate::Absent => return None,
    })
}

/// The Consent resources of an objection, in its shape.
fn consents(pid: &str, o: &Objection) -> Vec<Value> {
    let mut provision =
        json!({ "type": "deny", "purpose": [{ "system": ACT_REASON, "code": "TREAT" }] });
    match &o.provision {
        Provision::Deny => {}
        Provision::DenyClasses(classes) => {
            provision["class"] = classes
                .iter()
                .map(|c| json!({ "system": "http://hl7.org/fhir/resource-types", "code": c }))
                .collect();
        }
        Provision::DenyCode => {
            provision["code"] = json!([{ "coding": [{ "system": SNOMED, "code": "61460002", "display": "Immunization record" }] }]);
        }
        Provision::Untyped => {
            provision = json!({ "purpose": [{ "system": ACT_REASON, "code": "TREAT" }] });
        }
    }
    let mut c = json!({
        "resourceType": "Consent",
        "id": format!("{pid}-objection"),
        "meta": { "versionId": if o.withdrawn { "2" } else { "1" }, "security": [{ "system": ACT_REASON, "code": "HTEST" }] },
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": ACT_CODE, "code": "INFA" }] }],
        "patient": subject(pid),
        "policyRule": { "coding": [{ "system": ACT_CODE, "code": "OPTOUT" }] },
        "provision": provision,
    });
    match o.status {
        ConsentStatus::Given => {
            c["status"] = json!(if o.withdrawn { "inactive" } else { "active" });
        }
        ConsentStatus::Proposed => c["status"] = json!("proposed"),
        ConsentStatus::Missing => {}
    }
    if let Some(d) = consent_date(o.recorded_at, o.date) {
        c["dateTime"] = json!(d);
        c["meta"]["lastUpdated"] = json!(o.recorded_at.rfc3339());
    }
    let mut out = vec![c];
    if let Some(w) = o.later_withdrawal {
        // A second Consent withdrawing the first: a day and a year later with a full
        // date (clearly after), or dated only to the objection's own year (ambiguous).
        let later = Timestamp::from_millis(o.recorded_at.as_millis() + 400 * 86_400_000)
            .unwrap_or(o.recorded_at);
        let date = match w {
            LaterWithdrawal::ClearlyLater => later.rfc3339(),
            LaterWithdrawal::Ambiguous => o
                .recorded_at
                .rfc3339()
                .get(..4)
                .unwrap_or("2024")
                .to_owned(),
        };
        out.push(json!({
            "resourceType": "Consent",
            "id": format!("{pid}-withdrawal"),
            "meta": { "versionId": "1", "lastUpdated": later.rfc3339(), "security": [{ "system": ACT_REASON, "code": "HTEST" }] },
            "status": "inactive",
            "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
            "category": [{ "coding": [{ "system": ACT_CODE, "code": "INFA" }] }],
            "patient": subject(pid),
            "dateTime": date,
            "policyRule": { "coding": [{ "system": ACT_CODE, "code": "OPTOUT" }] },
            "provision": { "type": "deny" },
        }));
    }
    out
}

/// Test support: validates NDJSON `files` (each named after its resource type, e.g.
/// `AuditEvent.ndjson`) with `fhir.resources` through `scripts/validate_fhir.py`. Returns
/// whether all are valid and the validator's report (never the resources). Panics if
/// python3 or `fhir.resources` is missing: the test environment is broken.
#[allow(
    clippy::expect_used,
    reason = "test support: no validator is a broken environment"
)]
pub fn validate(files: &[std::path::PathBuf]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/validate_fhir.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(files)
        .output()
        .expect("python3 is needed for the FHIR validator (.ci/run installs fhir.resources)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("ModuleNotFoundError"),
        "fhir.resources is not installed: pip install 'fhir.resources>=8' ({text})"
    );
    (out.status.success(), text)
}
