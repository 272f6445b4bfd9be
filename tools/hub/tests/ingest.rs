//! FHIR in: the synthetic record, written as NDJSON by the generator and read back by
//! the hub, reaches a device exactly as the sharing rules say.

use std::collections::BTreeMap;

use carecache_hub::source::ingest_ndjson;
use carecache_synth::{SENSITIVE_CODES, Withheld};
use sync_protocol::record::Section;

use crate::harness::{Model, TestHub, lease_json};

use carecache_hub::testing::normalised as sorted;

/// Every patient without a standing objection arrives exactly as generated: items,
/// sections ("none recorded" vs "not available"), withheld counts; objected patients
/// never arrive; entered-in-error items never travel.
#[test]
fn synthetic_record_round_trips_through_fhir_to_the_device() {
    let hub = TestHub::start(600);
    let device = hub.enrol(None);
    let all = hub.all_nhs();
    hub.grant(lease_json(&device.id, &all));
    let mut model = Model::default();
    for b in device.pull_all(None, 16 * 1024 * 1024) {
        model.apply(&b);
    }
    let mut expected = BTreeMap::new();
    let mut objected = 0;
    for p in &hub.patients {
        if p.shareable() {
            expected.insert(p.nhs_number().as_u64(), sorted(p.expected.clone()));
        } else {
            objected += 1;
            assert!(!model.records.contains_key(&p.nhs_number().as_u64()));
        }
    }
    assert!(objected > 0, "the dataset has objections");
    assert!(hub.patients.iter().any(|p| p.entered_in_error.is_some()));
    assert!(hub.patients.iter().any(|p| !p.withheld.is_empty()));
    assert!(
        hub.patients
            .iter()
            .any(|p| matches!(p.expected.allergies, Section::NotAvailable))
    );
    assert_eq!(model.records.len(), expected.len());
    for (n, want) in &expected {
        let got = sorted(model.records[n].clone());
        assert!(
            got == *want,
            "patient #{} differs after the FHIR round trip",
            n % 1000
        );
    }
}

/// Nothing withheld reaches the device: no sensitive code, no labelled item's id.
#[test]
fn sensitive_items_never_travel_only_their_count() {
    let hub = TestHub::start(500);
    let device = hub.enrol(None);
    let all = hub.all_nhs();
    hub.grant(lease_json(&device.id, &all));
    let mut model = Model::default();
    for b in device.pull_all(None, 16 * 1024 * 1024) {
        model.apply(&b);
    }
    let rules = carecache_hub::testing::synthetic_rules();
    for (code, _) in SENSITIVE_CODES {
        assert!(
            rules.lists(*code),
            "synth code {code} missing from the hub's list"
        );
    }
    let mut withheld_ids = Vec::new();
    let mut with_withheld = 0;
    for p in hub.patients.iter().filter(|p| p.shareable()) {
        let got = &model.records[&p.nhs_number().as_u64()];
        assert_eq!(usize::from(got.withheld), p.withheld.len());
        with_withheld += usize::from(!p.withheld.is_empty());
        for w in &p.withheld {
            withheld_ids.push(match w {
                Withheld::CodedAlert(a) | Withheld::LocalCodedAlert(a) => {
                    a.source_id.as_str().to_owned()
                }
                Withheld::LabelledMedication(m, _)
                | Withheld::RestrictedMedication(m)
                | Withheld::DmdMedication(m) => m.source_id.as_str().to_owned(),
            });
        }
        if let Some(e) = &p.entered_in_error {
            withheld_ids.push(e.source_id.as_str().to_owned());
        }
    }
    assert!(with_withheld > 5);
    // Every kind of sensitive item is in the source: SNOMED CT-coded, dm+d-coded (the
    // list covers both systems), locally coded (through the region's map), labelled,
    // restricted.
    let kinds: std::collections::BTreeSet<&str> = hub
        .patients
        .iter()
        .filter(|p| p.shareable())
        .flat_map(|p| p.withheld.iter())
        .map(|w| match w {
            Withheld::CodedAlert(_) => "snomed",
            Withheld::DmdMedication(_) => "dmd",
            Withheld::LocalCodedAlert(_) => "local",
            Withheld::LabelledMedication(..) => "label",
            Withheld::RestrictedMedication(_) => "restricted",
        })
        .collect();
    assert_eq!(kinds.len(), 5, "{kinds:?}");
    for r in model.records.values() {
        for a in r.alerts.entries() {
            assert!(a.code.sctid().is_none_or(|c| !rules.lists(c.as_u64())));
            assert!(!withheld_ids.contains(&a.source_id.as_str().to_owned()));
        }
        for m in r.medications.entries() {
            assert!(!withheld_ids.contains(&m.source_id.as_str().to_owned()));
        }
        for a in r.allergies.entries() {
            assert!(!withheld_ids.contains(&a.source_id.as_str().to_owned()));
        }
    }
}

/// A resource the mapping cannot read is reported and skipped whole; its section is
/// "not available" rather than silently shorter; a bad Patient skips that patient.
#[test]
fn unreadable_resources_are_reported_and_skipped_whole() {
    let hub = TestHub::start(40);
    let dir = hub.ndjson_dir();
    // A patient whose allergy has an invalid clinicalStatus and a Flag with a code
    // failing its check digit, plus garbage lines and a Patient with a bad NHS number.
    let victim = hub
        .patients
        .iter()
        .find(|p| p.shareable() && !p.expected.allergies.entries().is_empty())
        .unwrap();
    let mut allergies = std::fs::read_to_string(dir.join("AllergyIntolerance.ndjson")).unwrap();
    let line = allergies
        .lines()
        .find(|l| l.contains(&format!("\"Patient/{}\"", victim.fhir_id)))
        .unwrap()
        .to_owned();
    allergies = allergies.replace(
        &line,
        &line
            .replace("\"code\":\"active\"", "\"code\":\"sometimes\"")
            .replace("\"code\":\"resolved\"", "\"code\":\"sometimes\""),
    );
    allergies.push_str("{not json\n[1,2]\n");
    std::fs::write(dir.join("AllergyIntolerance.ndjson"), allergies).unwrap();
    let mut patients = std::fs::read_to_string(dir.join("Patient.ndjson")).unwrap();
    patients.push_str(
        &patients
            .lines()
            .next()
            .unwrap()
            .replace("\"value\":\"999", "\"value\":\"123")
            .replace("\"id\":\"pat-0-", "\"id\":\"pat-bad-"),
    );
    patients.push('\n');
    std::fs::write(dir.join("Patient.ndjson"), patients).unwrap();

    let state_dir = tempfile::tempdir().unwrap();
    let state = carecache_hub::testing::open_state(state_dir.path());
    let summary = ingest_ndjson(&state, &carecache_hub::testing::synthetic_rules(), &dir).unwrap();
    let issues = summary.issues.join("\n");
    assert!(issues.contains("clinicalStatus"), "{issues}");
    assert!(issues.contains("not a JSON object"), "{issues}");
    assert!(issues.contains("Modulus 11"), "{issues}");
    // Reports carry no patient data.
    for p in &hub.patients {
        assert!(!issues.contains(&p.nhs_number().digits()));
        assert!(!issues.contains(p.expected.demographics.name.family.as_str()));
    }
    assert_eq!(
        summary.patients, 40,
        "the bad Patient is skipped, the others mapped"
    );
    assert_eq!(summary.stored.added, 40);
}

/// The generator's NDJSON is valid FHIR R4, checked by `fhir.resources` (installed by
/// `.ci/run`); so is a broken file reported as invalid.
#[test]
fn generator_output_passes_a_real_fhir_validator() {
    let dir = tempfile::tempdir().unwrap();
    let patients = carecache_synth::Generator::new(5).source_patients(300);
    let counts = carecache_synth::fhir::write_ndjson(&patients, dir.path()).unwrap();
    for kind in [
        "Patient",
        "Flag",
        "AllergyIntolerance",
        "MedicationStatement",
        "RelatedPerson",
        "Consent",
        "List",
    ] {
        assert!(
            counts.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} written"
        );
    }
    let files: Vec<_> = counts
        .keys()
        .map(|k| dir.path().join(format!("{k}.ndjson")))
        .collect();
    let out = crate::harness::validate(&files);
    // Exactly the Consents written as poor exports write them (no status, a dateTime
    // without a zone) are invalid: the hub must read those too, and fail closed on them.
    let poor = patients
        .iter()
        .filter_map(|p| p.objection.as_ref())
        .filter(|o| o.poor_export())
        .count();
    assert!(poor > 0, "the dataset has poor-export Consents");
    assert!(out.1.contains(&format!(", {poor} invalid")), "{}", out.1);
    for line in out.1.lines().filter(|l| l.contains(".ndjson:")) {
        assert!(line.starts_with("Consent.ndjson:"), "{line}");
    }

    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    let first = std::fs::read_to_string(dir.path().join("Flag.ndjson")).unwrap();
    let line = first.lines().next().unwrap().replace(
        "\"status\":\"active\"",
        "\"status\":\"active\",\"colour\":\"red\"",
    );
    std::fs::write(bad.join("Flag.ndjson"), format!("{line}\n")).unwrap();
    let out = crate::harness::validate(&[bad.join("Flag.ndjson")]);
    assert!(
        !out.0,
        "a Flag with an unknown element must fail: {}",
        out.1
    );
}

/// HAZ-15: between two bulk exports, items and whole patients deleted at the source: the
/// second ingest drops the items from their records and deletes the patients.
#[test]
fn deletions_between_two_exports_leave_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut patients = carecache_synth::Generator::new(24).source_patients(80);
    let first = dir.path().join("first");
    carecache_synth::fhir::write_ndjson(&patients, &first).unwrap();
    let state = carecache_hub::testing::open_state(dir.path());
    let rules = carecache_hub::testing::synthetic_rules();
    let one = ingest_ndjson(&state, &rules, &first).unwrap();
    assert_eq!(one.stored.added, 80);

    let deleted = carecache_synth::delete_at_source(&mut patients, 6, 2);
    let second = dir.path().join("second");
    carecache_synth::fhir::write_ndjson(&patients, &second).unwrap();
    let two = ingest_ndjson(&state, &rules, &second).unwrap();
    assert_eq!(two.stored.deleted, 2, "{two:?}");
    assert_eq!(two.stored.changed, 6, "{two:?}");
    for p in patients.iter().filter(|p| p.shareable()) {
        let held = state.record(&p.nhs_number()).unwrap().unwrap();
        assert_eq!(
            held.alerts.entries().len(),
            p.expected.alerts.entries().len()
        );
        assert_eq!(
            held.medications.entries().len(),
            p.expected.medications.entries().len()
        );
    }
    let gone: Vec<&str> = deleted
        .iter()
        .filter(|d| d.resource_type == "Patient")
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(gone.len(), 2);
    assert!(
        state
            .patient_fhir_ids()
            .unwrap()
            .iter()
            .all(|id| !gone.contains(&id.as_str()))
    );
}

/// HAZ-04: resources that name their patient by NHS number (`patient.identifier`) rather
/// than by reference still reach that patient — an objection so written withholds the
/// patient, and items so written are on the record; one naming a patient the export
/// does not carry is reported.
#[test]
fn resources_naming_their_patient_by_nhs_number_are_placed_and_objections_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let patients = carecache_synth::Generator::new(25).source_patients(40);
    let target = patients
        .iter()
        .find(|p| p.objection.is_none() && !p.expected.alerts.entries().is_empty())
        .unwrap();
    let by_identifier = |r: &mut serde_json::Value, nhs: &str| {
        let key = if r.get("subject").is_some() {
            "subject"
        } else {
            "patient"
        };
        r[key] = serde_json::json!({ "identifier": {
            "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs } });
    };
    let mut resources: Vec<serde_json::Value> = patients
        .iter()
        .flat_map(carecache_synth::fhir::resources)
        .collect();
    // The target's Flags by identifier, and an objection by identifier.
    for r in resources.iter_mut().filter(|r| {
        r["resourceType"] == "Flag"
            && r["subject"]["reference"] == format!("Patient/{}", target.fhir_id).as_str()
    }) {
        by_identifier(r, &target.nhs_number().digits());
    }
    let mut consent = serde_json::json!({
        "resourceType": "Consent", "id": "by-identifier", "status": "active",
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "text": "objection" }],
        "policyRule": { "text": "opt-out" },
        "provision": { "type": "deny" },
    });
    by_identifier(&mut consent, &target.nhs_number().digits());
    let mut stranger = consent.clone();
    stranger["id"] = serde_json::json!("unknown-patient");
    by_identifier(&mut stranger, "9434765919");
    resources.push(consent);
    resources.push(stranger);
    let ndjson = dir.path().join("ndjson");
    std::fs::create_dir_all(&ndjson).unwrap();
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    for r in &resources {
        let f = files
            .entry(r["resourceType"].as_str().unwrap().to_owned())
            .or_default();
        f.push_str(&r.to_string());
        f.push('\n');
    }
    for (kind, text) in &files {
        std::fs::write(ndjson.join(format!("{kind}.ndjson")), text).unwrap();
    }
    let state = carecache_hub::testing::open_state(dir.path());
    let summary =
        ingest_ndjson(&state, &carecache_hub::testing::synthetic_rules(), &ndjson).unwrap();
    assert!(
        summary
            .issues
            .iter()
            .any(|i| i.starts_with("Consent/unknown-patient")),
        "{:?}",
        summary.issues
    );
    assert!(summary.stored.objections >= 1);
    assert_eq!(
        state.objection(&target.nhs_number()).unwrap(),
        Some(sync_protocol::message::ObjectionStatus::Objected),
        "the objection by NHS number is honoured"
    );
    let held = state.record(&target.nhs_number()).unwrap().unwrap();
    assert_eq!(
        held.alerts.entries().len(),
        target.expected.alerts.entries().len(),
        "items naming the patient by NHS number are on the record"
    );
}
