//! Real shared-care-record data, end to end: field-shaped synthetic records (every Consent
//! shape, partial objections, dm+d and local codes, text-only allergies, recorders without
//! ODS codes, unreadable items, deletions) through the hub — from NDJSON and from a real
//! FHIR R4 server (Medplum's engine and R4 validator, `tools/fhir-server`) loaded through
//! its REST API — to a device, compared with the source section by section, and no
//! objector served by any route of the local API or the viewer.

use std::collections::BTreeMap;

use carecache_hub::testing::{FhirServer, TestHub, normalised};
use carecache_synth::{Generator, Provision, SourcePatient, delete_at_source};
use serde_json::json;
use sync_protocol::record::{PatientRecord, Section};
use sync_protocol::types::Timestamp;

use crate::api_harness::Served;
use crate::device_harness::{Dev, grant};
use crate::viewer::{get as viewer_get, sign_in};

/// Items per section on the device against the source, for the closing figures.
#[derive(Default, Debug)]
struct Coverage {
    source: [usize; 3],
    device: [usize; 3],
}

/// Every patient of `patients` is on the device exactly as the source holds it after the
/// sharing rules (every section, every item, partial objections, unreadable counts), or,
/// for an objector, not at all.
fn assert_device_matches(dev: &Dev, patients: &[SourcePatient], server_times: bool) -> Coverage {
    let store = dev.device.store();
    let mut c = Coverage::default();
    for p in patients {
        let held = store.record(&p.nhs_number()).unwrap();
        if !p.shareable() {
            assert!(held.is_none(), "an objector ({:?}) is held", p.objection);
            continue;
        }
        let r = held.unwrap_or_else(|| panic!("shareable patient {} missing", p.fhir_id));
        let e = &p.expected;
        c.source[0] += e.alerts.entries().len();
        c.source[1] += e.allergies.entries().len();
        c.source[2] += e.medications.entries().len();
        c.device[0] += r.alerts.entries().len();
        c.device[1] += r.allergies.entries().len();
        c.device[2] += r.medications.entries().len();
        assert_eq!(
            r.unreadable, e.unreadable,
            "{}: unreadable counts",
            p.fhir_id
        );
        let (mut r, mut e) = (normalised(r), normalised(e.clone()));
        if server_times {
            // A REST server owns `meta.lastUpdated`: it is the time of the load, kept as
            // the server gave it.
            assert!(provenances(&r).iter().all(|t| t.is_some()), "{}", p.fhir_id);
            erase_times(&mut r);
            erase_times(&mut e);
        }
        // Section by section, so a failure names the section (never its content).
        assert!(
            r.demographics == e.demographics,
            "{}: demographics differ",
            p.fhir_id
        );
        assert!(r.alerts == e.alerts, "{}: alerts differ", p.fhir_id);
        assert!(
            r.allergies == e.allergies,
            "{}: allergies differ",
            p.fhir_id
        );
        assert!(
            r.medications == e.medications,
            "{}: medications differ",
            p.fhir_id
        );
        assert!(r.contacts == e.contacts, "{}: contacts differ", p.fhir_id);
        assert!(
            r == e,
            "{}: the record on the device differs from the source",
            p.fhir_id
        );
    }
    c
}

fn provenances(r: &PatientRecord) -> Vec<Option<Timestamp>> {
    r.alerts
        .entries()
        .iter()
        .map(|a| a.provenance.last_updated)
        .chain(
            r.allergies
                .entries()
                .iter()
                .map(|a| a.provenance.last_updated),
        )
        .chain(
            r.medications
                .entries()
                .iter()
                .map(|m| m.provenance.last_updated),
        )
        .chain(
            r.contacts
                .entries()
                .iter()
                .map(|c| c.provenance.last_updated),
        )
        .collect()
}

fn erase_times(r: &mut PatientRecord) {
    fn each<T: Clone, const N: usize>(s: &mut Section<T, N>, f: impl Fn(&mut T)) {
        if let Section::Entries(items) = s {
            let mut v = items.to_vec();
            v.iter_mut().for_each(f);
            *s = Section::from_items(v).unwrap();
        }
    }
    each(&mut r.alerts, |a| a.provenance.last_updated = None);
    each(&mut r.allergies, |a| a.provenance.last_updated = None);
    each(&mut r.medications, |m| m.provenance.last_updated = None);
    each(&mut r.contacts, |c| c.provenance.last_updated = None);
}

/// Objectors, every shape: refused on every route of the local API and the viewer, their
/// name nowhere in any answer; partial objectors served with their sections marked.
fn assert_objectors_refused_everywhere(s: &Served, patients: &[SourcePatient]) {
    let cookie = sign_in(s.addr, &s.token, "n1");
    let mut objectors = 0;
    for p in patients.iter().filter(|p| p.objection.is_some()) {
        let d = p.nhs_number().digits();
        let family = p.expected.demographics.name.family.as_str().to_owned();
        let routes = [
            format!("/v1/patients/{d}"),
            format!("/fhir/Patient/{d}"),
            format!("/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{d}"),
            format!("/fhir/Patient/{d}/$summary"),
            format!("/fhir/Flag?patient=Patient/{d}"),
            format!("/fhir/AllergyIntolerance?patient={d}"),
            format!("/fhir/MedicationStatement?patient=Patient/{d}"),
        ];
        if p.shareable() {
            let j = s.get(&format!("/v1/patients/{d}"));
            assert_eq!(j.status, 200, "{}", j.text());
            let j = j.json();
            let summary = s.get(&format!("/fhir/Patient/{d}/$summary")).json();
            let sections = summary["entry"][0]["resource"]["section"]
                .as_array()
                .unwrap();
            let page = viewer_get(s.addr, &format!("/patient/{d}"), Some(&cookie)).text();
            for class in p.objection.as_ref().unwrap().withheld_classes() {
                let (key, title) = match *class {
                    "Flag" => ("alerts", "Alerts"),
                    "AllergyIntolerance" => ("allergies", "Allergies and adverse reactions"),
                    "MedicationStatement" => ("medications", "Medications"),
                    _ => ("contacts", ""),
                };
                assert_eq!(j[key]["state"], "withheld_by_patient", "{key}: {j}");
                assert!(j[key]["items"].as_array().unwrap().is_empty());
                if !title.is_empty() {
                    let sec = sections.iter().find(|x| x["title"] == title).unwrap();
                    assert_eq!(sec["emptyReason"]["coding"][0]["code"], "withheld");
                    assert!(sec.get("entry").is_none());
                }
                assert!(
                    page.contains("withheld at the patient&#39;s request"),
                    "viewer"
                );
            }
            continue;
        }
        objectors += 1;
        for path in &routes {
            let r = s.get(path);
            assert!(
                r.status == 403 || r.status == 404,
                "{path} answered {} for an objector ({:?})",
                r.status,
                p.objection
            );
            assert!(!r.text().contains(&family), "{path} shows the name");
        }
        let page = viewer_get(s.addr, &format!("/patient/{d}"), Some(&cookie));
        assert!(page.status >= 400, "viewer served an objector");
        assert!(!page.text().contains(&family.to_uppercase()));
        let list = s.get("/v1/patients");
        assert!(!list.text().contains(&d));
        let home = viewer_get(s.addr, "/", Some(&cookie));
        assert!(!home.text().contains(&p.nhs_number().to_string()));
    }
    assert!(objectors >= 10, "{objectors} objectors checked");
}

fn lease_everyone(hub: &TestHub, dev: &Dev) {
    let all: Vec<_> = hub.patients.iter().map(SourcePatient::nhs_number).collect();
    grant(hub, &dev.id(), &all, json!({ "users": ["n1"] }));
}

/// HAZ-04, HAZ-13, HAZ-14, HAZ-16: from NDJSON (every objection shape, poor exports included).
#[test]
fn no_objector_of_any_shape_is_served_and_every_readable_item_arrives() {
    let hub = TestHub::start(400, 20);
    let shapes: BTreeMap<String, usize> = hub
        .patients
        .iter()
        .filter_map(|p| p.objection.as_ref())
        .fold(BTreeMap::new(), |mut m, o| {
            *m.entry(format!("{:?}/{:?}/{:?}", o.date, o.status, o.provision))
                .or_default() += 1;
            m
        });
    assert!(shapes.len() >= 12, "objection shapes: {shapes:?}");
    assert!(
        hub.patients
            .iter()
            .any(|p| p.objection.as_ref().is_some_and(|o| o.poor_export())),
        "poor-export Consents are in the source"
    );
    let dev = Dev::enrolled(&hub);
    lease_everyone(&hub, &dev);
    dev.sync().unwrap();
    let c = assert_device_matches(&dev, &hub.patients, false);
    assert_eq!(c.source, c.device);
    let s = Served::start(dev);
    assert_objectors_refused_everywhere(&s, &hub.patients);
    assert_unreadable_items_are_said(&s, &hub.patients);
    assert_a_second_validator_accepts_the_device_fhir(&s, &hub.patients);
}

/// The device's FHIR for field-shaped patients, every route (the demographic search
/// included), through a second R4
/// validator (Medplum's, in the test FHIR server; the first, `fhir.resources`, runs in
/// `api::fhir_routes_answer_valid_r4_with_alerts_first_and_absences_explicit`): every
/// resource is accepted.
fn assert_a_second_validator_accepts_the_device_fhir(s: &Served, patients: &[SourcePatient]) {
    let server = FhirServer::start();
    let mut checked = 0;
    for p in patients.iter().filter(|p| p.shareable()).take(60) {
        let d = p.nhs_number().digits();
        let mut resources = vec![s.get(&format!("/fhir/Patient/{d}")).json()];
        for route in [
            format!("/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{d}"),
            format!("/fhir/Flag?patient={d}"),
            format!("/fhir/AllergyIntolerance?patient={d}"),
            format!("/fhir/MedicationStatement?patient={d}"),
            format!("/fhir/Patient/{d}/$summary"),
            format!(
                "/fhir/Patient?family={}&birthdate={}",
                percent_encoding::utf8_percent_encode(
                    p.expected.demographics.name.family.as_str(),
                    percent_encoding::NON_ALPHANUMERIC
                ),
                p.expected.demographics.birth_date
            ),
        ] {
            let b = s.get(&route).json();
            for e in b["entry"].as_array().unwrap() {
                let mut r = e["resource"].clone();
                if r.get("id").is_none() {
                    r["id"] = json!(format!("oo-{checked}"));
                }
                resources.push(r);
            }
        }
        for r in resources {
            let status = server.put(&r);
            assert!(
                status == 200 || status == 201,
                "{} {} refused by the second validator ({status})",
                r["resourceType"],
                r["id"]
            );
            checked += 1;
        }
    }
    assert!(checked > 300, "{checked} resources validated");
}

/// An item the hub could not read is said beside the items that could be read, in
/// JSON, FHIR and the viewer; it never hides them.
fn assert_unreadable_items_are_said(s: &Served, patients: &[SourcePatient]) {
    let cookie = sign_in(s.addr, &s.token, "n1");
    let mut checked = 0;
    for p in patients.iter().filter(|p| p.shareable()) {
        let u = p.expected.unreadable;
        if u.alerts == 0 && u.medications == 0 {
            continue;
        }
        let d = p.nhs_number().digits();
        let j = s.get(&format!("/v1/patients/{d}")).json();
        let page = viewer_get(s.addr, &format!("/patient/{d}"), Some(&cookie)).text();
        for (key, n, route, items) in [
            (
                "alerts",
                u.alerts,
                "Flag",
                p.expected.alerts.entries().len(),
            ),
            (
                "medications",
                u.medications,
                "MedicationStatement",
                p.expected.medications.entries().len(),
            ),
        ] {
            if n == 0 {
                continue;
            }
            let noun = if key == "alerts" {
                "alert"
            } else {
                "medication"
            };
            let words = format!("{n} {noun} could not be displayed — check the source record");
            assert_eq!(j[key]["could_not_show"]["message"], words.as_str(), "{j}");
            assert_eq!(j[key]["items"].as_array().unwrap().len(), items);
            assert!(page.contains(&words), "the viewer says it");
            let bundle = s.get(&format!("/fhir/{route}?patient={d}")).json();
            let entries = bundle["entry"].as_array().unwrap();
            let matches = entries
                .iter()
                .filter(|e| e["search"]["mode"] == "match")
                .count();
            assert_eq!(matches, items, "the readable items are all there");
            assert!(
                entries
                    .iter()
                    .any(|e| e["resource"]["issue"][0]["diagnostics"] == words.as_str()),
                "the searchset says it"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 5,
        "{checked} sections with unreadable items checked"
    );
    // Items coded outside SNOMED CT say where their code came from.
    let words = [
        ("local", "local code of the source system"),
        ("dm+d", "coded with dm+d"),
        ("text only", "recorded as text only"),
    ];
    for (name, said) in words {
        let p = patients
            .iter()
            .filter(|p| p.shareable())
            .find(|p| {
                let j = s
                    .get(&format!("/v1/patients/{}", p.nhs_number().digits()))
                    .json();
                ["alerts", "allergies", "medications"].iter().any(|k| {
                    j[*k]["items"]
                        .as_array()
                        .is_some_and(|i| i.iter().any(|x| x["coding"]["system_name"] == name))
                })
            })
            .unwrap_or_else(|| panic!("no {name} item"));
        let page = viewer_get(
            s.addr,
            &format!("/patient/{}", p.nhs_number().digits()),
            Some(&cookie),
        );
        assert!(page.text().contains(said), "the viewer says {said}");
    }
}

/// HAZ-04, HAZ-13, HAZ-15: a real FHIR R4 server, loaded through its REST API; the device
/// holds every readable item of every shareable patient (100 %), no objector, and
/// resources deleted at the source leave it at the next poll and sync.
#[test]
fn a_real_fhir_server_feeds_the_device_whole_and_deletions_reach_it() {
    let server = FhirServer::start();
    // The server's in-memory repository evaluates every search over every resource of a
    // type: 120 patients by default (every partial-objection shape among them),
    // CARECACHE_REAL_FHIR_PATIENTS for more.
    let n = std::env::var("CARECACHE_REAL_FHIR_PATIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let generated = Generator::new(23).source_patients(n);
    // The server validates what it is given: a Consent written as poor exports write it
    // is refused (those shapes reach the hub by NDJSON, tested above), so those patients
    // are not loaded.
    let (mut patients, poor): (Vec<_>, Vec<_>) = generated
        .into_iter()
        .partition(|p| !p.objection.as_ref().is_some_and(|o| o.poor_export()));
    assert!(!poor.is_empty());
    for p in &poor {
        for r in carecache_synth::fhir::resources(p) {
            if r["resourceType"] == "Consent" && r.get("status").is_none() {
                assert_eq!(server.put(&r), 400, "the server's validator refuses it");
            }
        }
    }
    let refused = server.load(&patients);
    assert!(refused.is_empty(), "refused: {refused:?}");
    assert!(
        patients.iter().any(|p| p
            .objection
            .as_ref()
            .is_some_and(|o| matches!(o.provision, Provision::DenyClasses(_)))),
        "partial objections are in the source"
    );

    let (mut hub, first) = TestHub::start_from_fhir(&server.base, patients.clone());
    let unreadable: usize = patients.iter().map(|p| p.unreadable.len()).sum();
    assert!(unreadable > 0);
    assert_eq!(first.issues.len(), unreadable, "{:?}", first.issues);
    assert_eq!(first.patients as usize, patients.len());
    let dev = Dev::enrolled(&hub);
    lease_everyone(&hub, &dev);
    dev.sync().unwrap();
    let c = assert_device_matches(&dev, &patients, true);
    assert_eq!(c.source, c.device, "every readable item arrives");
    println!(
        "real FHIR server: {} patients; alerts {}/{}, allergies {}/{}, medications {}/{} on the device; {} unreadable items counted",
        patients.len(),
        c.device[0],
        c.source[0],
        c.device[1],
        c.source[1],
        c.device[2],
        c.source[2],
        unreadable
    );

    // Deletions at the source: items of shareable patients, and whole patients.
    let deleted = delete_at_source(&mut patients, 8, 2);
    assert!(deleted.len() > 8);
    for d in &deleted {
        assert_eq!(server.delete(d.resource_type, &d.id), 200, "{d:?}");
    }
    let second = hub.poll_fhir(&server.base, patients.clone());
    assert!(second.stored.deleted >= 2, "{second:?}");
    assert!(second.stored.changed >= 8, "{second:?}");
    dev.sync().unwrap();
    let at_source: Vec<_> = hub.patients.iter().map(SourcePatient::nhs_number).collect();
    let store = dev.device.store();
    let held = store.records().unwrap();
    assert_eq!(
        held.len(),
        patients.iter().filter(|p| p.shareable()).count()
    );
    assert!(held.iter().all(|r| at_source.contains(&r.nhs_number)));
    let c = assert_device_matches(&dev, &patients, true);
    assert_eq!(c.source, c.device);
    for d in deleted.iter().filter(|d| d.resource_type != "Patient") {
        for r in &held {
            for id in r
                .alerts
                .entries()
                .iter()
                .map(|a| a.source_id.as_str())
                .chain(r.medications.entries().iter().map(|m| m.source_id.as_str()))
            {
                assert_ne!(id, d.id, "a deleted item is still on the device");
            }
        }
    }
}
