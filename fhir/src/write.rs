//! The protocol's record as FHIR R4 resources shaped after UK Core: written by the device
//! for crew software, and by the synthetic generator as the export of a source system
//! (which adds its own labels and versions to `meta`). [`crate::read`] reads back exactly
//! what is written here (the round-trip tests in this crate and `tests/real_fhir.rs`).

use sync_protocol::NhsNumber;
use sync_protocol::record::{
    Alert, Allergy, Demographics, KeyContact, Medication, PatientRecord, Period,
};
use sync_protocol::types::{Coding, Provenance};

use crate::codes::{self, FhirCode};
use crate::dates::date_text;
use crate::model::{
    self, Address, AllergyReaction, Annotation, CodeableConcept, ContactPoint, Extension,
    HumanName, Identifier, Meta, Reference, Resource,
};

/// Every resource of one record, Patient first (id: the NHS number).
pub fn resources(record: &PatientRecord) -> Vec<Resource> {
    let pid = record.nhs_number.digits();
    let mut out = vec![Resource::Patient(patient(
        &pid,
        &record.nhs_number,
        &record.demographics,
    ))];
    out.extend(
        record
            .alerts
            .entries()
            .iter()
            .map(|a| Resource::Flag(flag(&pid, a))),
    );
    out.extend(
        record
            .allergies
            .entries()
            .iter()
            .map(|a| Resource::AllergyIntolerance(allergy(&pid, a))),
    );
    out.extend(
        record
            .medications
            .entries()
            .iter()
            .map(|m| Resource::MedicationStatement(medication(&pid, m))),
    );
    out
}

/// `Patient/{id}`.
pub fn subject(patient_id: &str) -> Reference {
    Reference::to(format!("Patient/{patient_id}"))
}

/// A CodeableConcept as the source recorded it: its coding in its own system (SNOMED
/// CT, dm+d, Read, or a local system) with the display, or the text alone.
pub fn concept(c: &Coding) -> CodeableConcept {
    match &c.code {
        Some(code) => CodeableConcept::coded(
            model::Coding::new(code.system(), &code.value()).display(c.display.as_str()),
        )
        .with_text(c.display.as_str()),
        None => CodeableConcept::text(c.display.as_str()),
    }
}

/// Who recorded an item: the person as the source named them (a name, or a
/// `Practitioner/…` reference), else the organisation by ODS code. `None` if the source
/// named neither. (The organisation is also in `meta.source`.)
pub fn who(p: &Provenance) -> Option<Reference> {
    if let Some(by) = &p.recorded_by {
        let by = by.as_str();
        return Some(
            if by.starts_with("Practitioner/") && !by.contains(char::is_whitespace) {
                Reference::to(by)
            } else {
                Reference::display(by)
            },
        );
    }
    p.organisation.as_ref().map(|org| Reference {
        kind: Some("Organization".into()),
        identifier: Some(Identifier::new(codes::ODS_SYSTEM, org.as_str())),
        ..Reference::default()
    })
}

/// `meta`: the UK Core profile, when the item last changed at the source, and the source
/// organisation (`meta.source` = `ODS_SYSTEM|code`).
pub fn meta(profile: &str, provenance: &Provenance) -> Meta {
    Meta {
        profile: vec![codes::uk_core(profile)],
        // To the millisecond, as the source wrote it.
        last_updated: provenance
            .last_updated
            .map(sync_protocol::types::Timestamp::rfc3339),
        source: provenance
            .organisation
            .as_ref()
            .map(|org| format!("{}|{}", codes::ODS_SYSTEM, org.as_str())),
        ..Meta::default()
    }
}

fn period(p: Period) -> Option<model::Period> {
    model::Period::of(p.start.map(date_text), p.end.map(date_text))
}

/// The UK Core Patient. A restricted ("S-flagged") patient's location-revealing details
/// (postcode, GP practice) are left out, and the Patient is labelled `R`.
pub fn patient(id: &str, nhs: &NhsNumber, d: &Demographics) -> model::Patient {
    let restricted = d.restricted;
    model::Patient {
        id: Some(id.to_owned()),
        meta: Some(Meta {
            profile: vec![codes::uk_core("UKCore-Patient")],
            security: vec![model::Coding::new(
                codes::CONFIDENTIALITY,
                if restricted { "R" } else { "N" },
            )],
            ..Meta::default()
        }),
        identifier: vec![Identifier::new(codes::NHS_NUMBER_SYSTEM, &nhs.digits())],
        name: vec![HumanName {
            name_use: Some("official".into()),
            family: Some(d.name.family.as_str().to_owned()),
            given: d
                .name
                .given
                .as_str()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            prefix: d
                .name
                .prefix
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect(),
            text: None,
        }],
        gender: Some(d.sex.code().to_owned()),
        birth_date: Some(date_text(d.birth_date)),
        address: match (&d.postcode_district, restricted) {
            (Some(pc), false) => vec![Address {
                address_use: Some("home".into()),
                postal_code: Some(pc.as_str().to_owned()),
            }],
            _ => Vec::new(),
        },
        general_practitioner: match (&d.gp_practice, restricted) {
            (Some(gp), false) => vec![Reference {
                kind: Some("Organization".into()),
                identifier: Some(Identifier::new(codes::ODS_SYSTEM, gp.as_str())),
                ..Reference::default()
            }],
            _ => Vec::new(),
        },
    }
}

/// The words of an alert's code: its display, with the detail after a colon.
fn alert_text(a: &Alert) -> String {
    match &a.detail {
        Some(d) => format!("{}: {}", a.code.display.as_str(), d.as_str()),
        None => a.code.display.as_str().to_owned(),
    }
}

/// The UK Core Flag, with the core `flag-priority` extension so crew software reading
/// FHIR can tell a DNACPR from an interpreter note.
pub fn flag(patient_id: &str, a: &Alert) -> model::Flag {
    let (category_text, category) = codes::alert_category(a.category);
    let mut code = concept(&a.code);
    code.text = Some(alert_text(a));
    model::Flag {
        id: Some(a.source_id.as_str().to_owned()),
        meta: Some(meta("UKCore-Flag", &a.provenance)),
        extension: vec![Extension {
            url: codes::FLAG_PRIORITY_EXTENSION.into(),
            value_codeable_concept: Some(CodeableConcept::coded(
                model::Coding::new(codes::FLAG_PRIORITY_SYSTEM, a.severity.code())
                    .display(a.severity.display()),
            )),
            ..Extension::default()
        }],
        status: Some("active".into()),
        category: vec![
            CodeableConcept::coded(model::Coding::new(codes::FLAG_CATEGORY, category))
                .with_text(category_text),
        ],
        code: Some(code),
        subject: Some(subject(patient_id)),
        period: period(a.period),
        author: who(&a.provenance),
    }
}

/// The UK Core AllergyIntolerance. Verification as the source stated it; absent when it
/// did not (never "unconfirmed" by default, never "confirmed" either).
pub fn allergy(patient_id: &str, a: &Allergy) -> model::AllergyIntolerance {
    model::AllergyIntolerance {
        id: Some(a.source_id.as_str().to_owned()),
        meta: Some(meta("UKCore-AllergyIntolerance", &a.provenance)),
        clinical_status: Some(CodeableConcept::coded(
            model::Coding::new(codes::ALLERGY_CLINICAL_SYSTEM, a.status.code())
                .display(a.status.display()),
        )),
        verification_status: a.verification.map(|v| {
            CodeableConcept::coded(
                model::Coding::new(codes::ALLERGY_VERIFICATION_SYSTEM, v.code())
                    .display(v.display()),
            )
        }),
        category: a
            .category
            .map(|c| c.code().to_owned())
            .into_iter()
            .collect(),
        criticality: a.criticality.map(|c| c.code().to_owned()),
        code: Some(concept(&a.substance)),
        patient: Some(subject(patient_id)),
        onset_date_time: a.onset.map(date_text),
        recorder: who(&a.provenance),
        asserter: None,
        note: a
            .note
            .iter()
            .map(|n| Annotation {
                text: n.as_str().to_owned(),
            })
            .collect(),
        reaction: a
            .reactions
            .iter()
            .map(|r| AllergyReaction {
                // R4 requires a manifestation: "no information" when the source gave
                // none.
                manifestation: vec![r.manifestation.as_ref().map_or_else(
                    || CodeableConcept::coded(model::Coding::new(codes::NULL_FLAVOR, "NI")),
                    concept,
                )],
                description: r.description.as_ref().map(|d| d.as_str().to_owned()),
                severity: r.severity.map(|s| s.code().to_owned()),
            })
            .collect(),
    }
}

/// The UK Core MedicationStatement: dose as text, effective period, course of therapy,
/// last issue date and prescribing organisation type (UK Core extensions).
pub fn medication(patient_id: &str, m: &Medication) -> model::MedicationStatement {
    let mut extension = Vec::new();
    if let Some(last) = m.last_issued {
        extension.push(Extension {
            url: codes::LAST_ISSUE_EXTENSION.into(),
            value_date_time: Some(date_text(last)),
            ..Extension::default()
        });
    }
    let (org_code, org_display) = codes::prescribing_org(m.prescribed_elsewhere);
    extension.push(Extension {
        url: codes::PRESCRIBING_ORG_EXTENSION.into(),
        // UK Core: value[x] only CodeableConcept.
        value_codeable_concept: Some(CodeableConcept::coded(
            model::Coding::new(codes::PRESCRIBING_ORG_SYSTEM, org_code).display(org_display),
        )),
        ..Extension::default()
    });
    model::MedicationStatement {
        id: Some(m.source_id.as_str().to_owned()),
        meta: Some(meta("UKCore-MedicationStatement", &m.provenance)),
        extension,
        status: Some(m.status.code().to_owned()),
        category: m.course.map(|c| {
            CodeableConcept::coded(model::Coding::new(
                codes::COURSE_OF_THERAPY_SYSTEM,
                c.code(),
            ))
            .with_text(codes::course_text(c))
        }),
        medication_codeable_concept: Some(concept(&m.medicine)),
        medication_reference: None,
        subject: Some(subject(patient_id)),
        effective_date_time: None,
        effective_period: model::Period::of(m.started.map(date_text), m.ended.map(date_text)),
        information_source: who(&m.provenance),
        dosage: crate::dosage::write(m.dose_text.as_ref().map(|t| t.as_str()), m.dosage.as_ref())
            .into_iter()
            .collect(),
    }
}

/// The UK Core RelatedPerson of a key contact.
pub fn related_person(patient_id: &str, id: &str, c: &KeyContact) -> model::RelatedPerson {
    let (system, code) = codes::contact_role(c.role);
    let mut relationship = CodeableConcept::coded(model::Coding::new(system, code));
    relationship.text = c.relationship.as_ref().map(|r| r.as_str().to_owned());
    model::RelatedPerson {
        id: Some(id.to_owned()),
        meta: Some(meta("UKCore-RelatedPerson", &c.provenance)),
        active: Some(true),
        patient: Some(subject(patient_id)),
        relationship: vec![relationship],
        name: vec![HumanName {
            text: Some(c.name.as_str().to_owned()),
            ..HumanName::default()
        }],
        telecom: c
            .phone
            .iter()
            .map(|p| ContactPoint {
                system: Some("phone".into()),
                value: Some(p.as_str().to_owned()),
            })
            .collect(),
    }
}
