//! FHIR R4 (UK Core) rendering of a patient record: Patient, Flag, AllergyIntolerance
//! and MedicationStatement resources, as the local API will serve them.
//!
//! "None recorded" and "not available" are never rendered the same way: an empty
//! section produces no resources here, and the section state travels separately (the
//! `$summary` Composition's `emptyReason`).
#![allow(
    clippy::indexing_slicing,
    reason = "serde_json IndexMut with a str key inserts into objects built just above by json!; it cannot panic"
)]

use serde_json::{Value, json};
use sync_protocol::NhsNumber;
use sync_protocol::record::{
    Alert, AlertCategory, Allergy, AllergyCategory, AllergyStatus, Course, Criticality,
    Demographics, Medication, MedicationStatus, PatientRecord, ReactionSeverity, Sex,
};
use sync_protocol::types::{Coding, Provenance, Timestamp};

const NHS_NUMBER_SYSTEM: &str = "https://fhir.nhs.uk/Id/nhs-number";
const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";

/// Every resource for one record, Patient first.
pub fn resources(record: &PatientRecord) -> Vec<Value> {
    let patient_id = record.nhs_number.digits();
    let mut out = vec![patient(record)];
    out.extend(record.alerts.entries().iter().map(|a| flag(&patient_id, a)));
    out.extend(
        record
            .allergies
            .entries()
            .iter()
            .map(|a| allergy(&patient_id, a)),
    );
    out.extend(
        record
            .medications
            .entries()
            .iter()
            .map(|m| medication(&patient_id, m)),
    );
    out
}

/// The UK Core Patient.
pub fn patient(record: &PatientRecord) -> Value {
    patient_parts(&record.nhs_number, &record.demographics)
}

/// The UK Core Patient from its parts. A restricted ("S-flagged") patient's
/// location-revealing details (postcode, GP practice) are left out.
pub fn patient_parts(nhs: &NhsNumber, d: &Demographics) -> Value {
    let given: Vec<&str> = d.name.given.as_str().split_whitespace().collect();
    let mut name = json!({ "use": "official", "family": d.name.family.as_str(), "given": given });
    if let Some(prefix) = &d.name.prefix {
        name["prefix"] = json!([prefix.as_str()]);
    }
    let mut p = json!({
        "resourceType": "Patient",
        "id": nhs.digits(),
        "meta": {
            "profile": ["https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"],
            "security": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                "code": if d.restricted { "R" } else { "N" }
            }]
        },
        "identifier": [{ "system": NHS_NUMBER_SYSTEM, "value": nhs.digits() }],
        "name": [name],
        "gender": match d.sex { Sex::Male => "male", Sex::Female => "female", Sex::Other => "other", Sex::Unknown => "unknown" },
        "birthDate": d.birth_date.to_string(),
    });
    if d.restricted {
        return p;
    }
    if let Some(pc) = &d.postcode_district {
        p["address"] = json!([{ "use": "home", "postalCode": pc.as_str() }]);
    }
    if let Some(gp) = &d.gp_practice {
        p["generalPractitioner"] =
            json!([{ "identifier": { "system": ODS_SYSTEM, "value": gp.as_str() } }]);
    }
    p
}

/// A CodeableConcept as the source recorded it: its coding in its own system (SNOMED
/// CT, dm+d, Read, or a local system) with the display, or the text alone.
fn concept(c: &Coding) -> Value {
    match &c.code {
        Some(code) => json!({
            "coding": [{ "system": code.system(), "code": code.value(), "display": c.display.as_str() }],
            "text": c.display.as_str()
        }),
        None => json!({ "text": c.display.as_str() }),
    }
}

/// Who recorded an item, as the source named them: the organisation by ODS code, else the
/// recorder's name or reference as given. `None` if the source named nobody.
fn who(p: &Provenance) -> Option<Value> {
    if let Some(org) = &p.organisation {
        let mut r = json!({ "identifier": { "system": ODS_SYSTEM, "value": org.as_str() } });
        if let Some(by) = &p.recorded_by {
            r["display"] = json!(by.as_str());
        }
        return Some(r);
    }
    p.recorded_by.as_ref().map(|by| {
        if by.as_str().starts_with("Practitioner/") && !by.as_str().contains(char::is_whitespace) {
            json!({ "reference": by.as_str() })
        } else {
            json!({ "display": by.as_str() })
        }
    })
}

/// A FHIR `instant` to the second: the protocol's own formatter.
pub(crate) fn instant(t: Timestamp) -> String {
    t.utc_seconds()
}

fn meta(profile: &str, provenance: &Provenance) -> Value {
    let mut m = json!({
        "profile": [format!("https://fhir.hl7.org.uk/StructureDefinition/{profile}")],
    });
    if let Some(t) = provenance.last_updated {
        m["lastUpdated"] = json!(instant(t));
    }
    if let Some(org) = &provenance.organisation {
        m["source"] = json!(format!("{ODS_SYSTEM}|{}", org.as_str()));
    }
    m
}

fn subject(patient_id: &str) -> Value {
    json!({ "reference": format!("Patient/{patient_id}") })
}

pub fn flag(patient_id: &str, a: &Alert) -> Value {
    let category = match a.category {
        AlertCategory::CommunicationNeed | AlertCategory::ReasonableAdjustment => "contact",
        AlertCategory::ClinicalWarning => "clinical",
        AlertCategory::TreatmentRestriction | AlertCategory::EndOfLife => "advance-directive",
        AlertCategory::Safeguarding => "safety",
        AlertCategory::Other => "admin",
    };
    // The core flag-priority extension, so crew software reading FHIR can tell a
    // DNACPR from an interpreter note.
    let (priority, priority_display) = a.severity.priority();
    let mut f = json!({
        "resourceType": "Flag",
        "id": a.source_id.as_str(),
        "meta": meta("UKCore-Flag", &a.provenance),
        "extension": [{
            "url": "http://hl7.org/fhir/StructureDefinition/flag-priority",
            "valueCodeableConcept": { "coding": [{ "system": "http://hl7.org/fhir/flag-priority-code", "code": priority, "display": priority_display }] }
        }],
        "status": "active",
        "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/flag-category", "code": category }] }],
        "code": concept(&a.code),
        "subject": subject(patient_id),
    });
    if let Some(w) = who(&a.provenance) {
        f["author"] = w;
    }
    if let Some(detail) = &a.detail {
        f["code"]["text"] = json!(format!("{}: {}", a.code.display.as_str(), detail.as_str()));
    }
    let mut period = serde_json::Map::new();
    if let Some(s) = a.period.start {
        period.insert("start".into(), json!(s.to_string()));
    }
    if let Some(e) = a.period.end {
        period.insert("end".into(), json!(e.to_string()));
    }
    if !period.is_empty() {
        f["period"] = Value::Object(period);
    }
    f
}

pub fn allergy(patient_id: &str, a: &Allergy) -> Value {
    let status = match a.status {
        AllergyStatus::Active => "active",
        AllergyStatus::Inactive => "inactive",
        AllergyStatus::Resolved => "resolved",
    };
    let mut r = json!({
        "resourceType": "AllergyIntolerance",
        "id": a.source_id.as_str(),
        "meta": meta("UKCore-AllergyIntolerance", &a.provenance),
        "clinicalStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": status }] },
        "code": concept(&a.substance),
        "patient": subject(patient_id),
    });
    if let Some(w) = who(&a.provenance) {
        r["recorder"] = w;
    }
    // As the source stated it; absent when it did not (never "unconfirmed" by default,
    // never "confirmed" either).
    if let Some(v) = a.verification {
        let (code, display) = v.code();
        r["verificationStatus"] = json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": code, "display": display }] });
    }
    if let Some(c) = a.category {
        let c = match c {
            AllergyCategory::Food => "food",
            AllergyCategory::Medication => "medication",
            AllergyCategory::Environment => "environment",
            AllergyCategory::Biologic => "biologic",
        };
        r["category"] = json!([c]);
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

pub fn medication(patient_id: &str, m: &Medication) -> Value {
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
        "meta": meta("UKCore-MedicationStatement", &m.provenance),
        "status": status,
        "medicationCodeableConcept": concept(&m.medicine),
        "subject": subject(patient_id),
    });
    if let Some(w) = who(&m.provenance) {
        r["informationSource"] = w;
    }
    if let Some(dose) = &m.dose_text {
        r["dosage"] = json!([{ "text": dose.as_str() }]);
    }
    let mut period = serde_json::Map::new();
    if let Some(start) = m.started {
        period.insert("start".into(), json!(start.to_string()));
    }
    if let Some(end) = m.ended {
        period.insert("end".into(), json!(end.to_string()));
    }
    if !period.is_empty() {
        r["effectivePeriod"] = Value::Object(period);
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
        r["category"] = json!({
            "coding": [{ "system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-MedicationRequestCourseOfTherapy", "code": code }],
            "text": text
        });
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_are_utc_rfc3339() {
        assert_eq!(
            instant(Timestamp::from_millis(0).unwrap()),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(
            instant(Timestamp::from_millis(951_782_400_000).unwrap()),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            instant(Timestamp::from_millis(1_735_689_599_000).unwrap()),
            "2024-12-31T23:59:59Z"
        );
    }

    #[test]
    fn resources_name_the_patient_by_nhs_number() {
        let record = carecache_synth::Generator::new(3).patient();
        let res = resources(&record);
        assert_eq!(res[0]["resourceType"], "Patient");
        assert_eq!(res[0]["identifier"][0]["system"], NHS_NUMBER_SYSTEM);
        let n = record.alerts.entries().len()
            + record.allergies.entries().len()
            + record.medications.entries().len();
        assert_eq!(res.len(), 1 + n);
        for r in &res[1..] {
            let reference = r.get("subject").or_else(|| r.get("patient")).unwrap()["reference"]
                .as_str()
                .unwrap();
            assert_eq!(reference, format!("Patient/{}", record.nhs_number.digits()));
        }
    }
}
