//! The mapping's round trip on field-shaped synthetic records (every coding system,
//! text-only items, recorders by name or reference without ODS, partial dates): each item
//! written as FHIR, serialised, parsed and read back is the item itself, and writing what
//! was read gives the same resource. The whole chain (synth → hub → device over real HTTP)
//! is `tests/api.rs::source_fhir_and_device_fhir_agree_on_every_clinical_element`.
#![allow(clippy::expect_used, reason = "test helpers outside #[test] functions")]

use carecache_fhir::model::Resource;
use carecache_fhir::{read, write};
use carecache_synth::Generator;

/// Through JSON text and back, as a reader on the other side of a wire would get it.
fn through_json(r: &Resource) -> Resource {
    let text = serde_json::to_string(r).expect("serialises");
    serde_json::from_str(&text).expect("parses")
}

#[test]
fn every_item_reads_back_as_written_and_writes_again_the_same() {
    let patients = Generator::new(2126).source_patients(400);
    let mut counts = [0usize; 5];
    let mut text_only = 0;
    let mut no_ods = 0;
    let mut structured = 0;
    for p in &patients {
        let r = &p.expected;
        let pid = p.fhir_id.as_str();

        let written = Resource::Patient(write::patient(pid, &r.nhs_number, &r.demographics));
        let Resource::Patient(back) = through_json(&written) else {
            panic!("a Patient reads back as a Patient")
        };
        assert_eq!(Resource::Patient(back.clone()), written);
        let (nhs, demographics) = read::demographics(&back).expect("demographics read back");
        assert_eq!(nhs, r.nhs_number);
        assert_eq!(demographics, r.demographics);
        counts[0] += 1;

        for a in r.alerts.entries() {
            let w = Resource::Flag(write::flag(pid, a));
            let Resource::Flag(back) = through_json(&w) else {
                panic!("Flag")
            };
            let read = read::flag(&back).expect("reads").expect("shared");
            assert_eq!(&read, a, "alert {}", a.source_id.as_str());
            assert_eq!(Resource::Flag(write::flag(pid, &read)), w);
            text_only += usize::from(a.code.code.is_none());
            no_ods += usize::from(a.provenance.organisation.is_none());
            counts[1] += 1;
        }
        for a in r.allergies.entries() {
            let w = Resource::AllergyIntolerance(write::allergy(pid, a));
            let Resource::AllergyIntolerance(back) = through_json(&w) else {
                panic!("AllergyIntolerance")
            };
            let read = read::allergy(&back).expect("reads").expect("shared");
            assert_eq!(&read, a, "allergy {}", a.source_id.as_str());
            assert_eq!(Resource::AllergyIntolerance(write::allergy(pid, &read)), w);
            text_only += usize::from(a.substance.code.is_none());
            counts[2] += 1;
        }
        for m in r.medications.entries() {
            let w = Resource::MedicationStatement(write::medication(pid, m));
            let Resource::MedicationStatement(back) = through_json(&w) else {
                panic!("MedicationStatement")
            };
            let read = read::medication(&back).expect("reads").expect("shared");
            assert_eq!(&read, m, "medication {}", m.source_id.as_str());
            assert_eq!(
                Resource::MedicationStatement(write::medication(pid, &read)),
                w
            );
            structured += usize::from(m.dosage.is_some());
            counts[3] += 1;
        }
        for (i, c) in r.contacts.entries().iter().enumerate() {
            let w = Resource::RelatedPerson(write::related_person(pid, &format!("rp{i}"), c));
            let Resource::RelatedPerson(back) = through_json(&w) else {
                panic!("RelatedPerson")
            };
            let read = read::related_person(&back).expect("reads").expect("shared");
            assert_eq!(read.role, c.role);
            assert_eq!(read.name, c.name);
            assert_eq!(read.relationship, c.relationship);
            assert_eq!(read.phone, c.phone);
            counts[4] += 1;
        }
    }
    assert!(
        counts.iter().all(|n| *n > 20),
        "patients, alerts, allergies, medications, contacts: {counts:?}"
    );
    assert!(text_only > 0, "text-only items are in the data");
    assert!(no_ods > 0, "items without an ODS code are in the data");
    assert!(structured > 0, "structured doses are in the data");
}

/// A dosage given only as structure reaches the crew in words.
#[test]
fn a_structured_dosage_without_text_is_read_as_words() {
    let statement: carecache_fhir::model::MedicationStatement = serde_json::from_value(
        serde_json::json!({
            "resourceType": "MedicationStatement",
            "id": "m1",
            "status": "active",
            "medicationCodeableConcept": { "text": "Paracetamol 500mg tablets" },
            "subject": { "reference": "Patient/p1" },
            "dosage": [{
                "timing": { "repeat": { "frequency": 4, "period": 1, "periodUnit": "d" } },
                "asNeededBoolean": true,
                "route": { "coding": [{ "system": "http://snomed.info/sct", "code": "26643006", "display": "Oral" }] },
                "doseAndRate": [{ "doseQuantity": { "value": 2, "unit": "tablet" } }]
            }]
        }),
    )
    .expect("a MedicationStatement");
    let m = read::medication(&statement)
        .expect("reads")
        .expect("shared");
    assert_eq!(
        m.dose_text.as_ref().map(|t| t.as_str()),
        Some("2 tablet, 4 times a day, Oral, when required")
    );
}
