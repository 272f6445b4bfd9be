//! Finding the patient in front of a crew without an NHS number (#27), on the real hub
//! and daemon over HTTP: misspelt names, swapped day and month, partial postcodes,
//! accents and apostrophes; a patient on another crew's caseload only with emergency
//! access; an objector gone from the next search; every search in the audit chain; the
//! FHIR search valid and scored.

use serde_json::{Value, json};
use sync_protocol::NhsNumber;
use sync_protocol::audit::{AuditAction, AuditEvent};
use sync_protocol::record::PatientRecord;

use crate::api_harness::{Served, validate_fhir};
use crate::device_harness::{Dev, TestHub, grant};

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A family name as a relative might spell it: one letter in the middle changed.
fn misspelt(name: &str) -> String {
    let mut chars: Vec<char> = name.chars().collect();
    let i = chars.len() / 2;
    chars[i] = if chars[i] == 'e' { 'a' } else { 'e' };
    chars.into_iter().collect()
}

fn found(r: &Value) -> Vec<String> {
    r["patients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["nhs_number"].as_str().unwrap().replace(' ', ""))
        .collect()
}

#[test]
fn a_crew_finds_the_patient_in_front_of_them_and_no_one_they_may_not_see() {
    let hub = TestHub::start(80, 71);
    let dev = Dev::enrolled(&hub);
    let shareable: Vec<&carecache_synth::SourcePatient> = hub
        .patients
        .iter()
        .filter(|p| p.shareable() && p.expected.demographics.birth_date.is_full())
        .collect();
    let nhs: Vec<NhsNumber> = shareable.iter().map(|p| p.nhs_number()).collect();
    grant(&hub, &dev.id(), &nhs[0..30], json!({ "users": ["n1"] }));
    grant(
        &hub,
        &dev.id(),
        &nhs[30..40],
        json!({ "users": ["other"], "emergency_access": true }),
    );
    dev.sync().unwrap();
    let s = Served::start(dev);
    let record = |i: usize| -> &PatientRecord { &shareable[i].expected };

    // A target whose day and month can be swapped (day ≤ 12, day ≠ month).
    let target = (0..30)
        .find(|i| {
            let b = record(*i).demographics.birth_date;
            b.day().is_some_and(|d| d <= 12 && Some(d) != b.month())
                && record(*i).demographics.name.family.as_str().chars().count() >= 4
        })
        .expect("a patient with a swappable date of birth");
    let t = &record(target).demographics;
    let digits = record(target).nhs_number.digits();
    let b = t.birth_date;
    let swapped = format!(
        "{:04}-{:02}-{:02}",
        b.year(),
        b.day().unwrap(),
        b.month().unwrap()
    );

    // 1. Misspelt family name and the date the other way round: found first, and why.
    let r = s.get(&format!(
        "/v1/patients?family={}&birthdate={swapped}",
        enc(&misspelt(t.name.family.as_str()))
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(found(&body).first(), Some(&digits), "{body}");
    let why = body["patients"][0]["match"].to_string();
    assert!(why.contains("similar spelling"), "{why}");
    assert!(why.contains("swapped"), "{why}");
    assert!(
        body["notice"]
            .as_str()
            .unwrap()
            .contains("check the NHS number")
    );
    let search_rid = r.request_id();

    // 2. Given name with accents and an apostrophe typed in, and a full postcode.
    if let Some(district) = &t.postcode_district {
        let given = t.name.given.as_str().split(' ').next().unwrap();
        let decorated: String = given
            .chars()
            .enumerate()
            .map(|(i, c)| match (i, c) {
                (1, 'a') => 'á',
                (1, 'e') => 'é',
                (1, 'o') => 'ö',
                _ => c,
            })
            .collect();
        let r = s.get(&format!(
            "/v1/patients?given={}&postcode={}",
            enc(&format!("{decorated}'")),
            enc(&format!("{} 9QR", district.as_str().to_lowercase()))
        ));
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(found(&r.json()).contains(&digits), "{}", r.text());
    }

    // 3. One criterion cannot list the region.
    let r = s.get(&format!(
        "/v1/patients?family={}",
        enc(t.name.family.as_str())
    ));
    assert_eq!(r.status, 400);
    assert!(r.text().contains("at least two"), "{}", r.text());

    // 4. Another crew's patient: never found for treatment; with emergency access and a
    // reason, found and marked.
    let other = &record(30).demographics;
    let other_digits = record(30).nhs_number.digits();
    let q = format!(
        "/v1/patients?family={}&birthdate={}",
        enc(other.name.family.as_str()),
        other.birth_date
    );
    let r = s.get(&q);
    assert_eq!(r.status, 200);
    assert!(!found(&r.json()).contains(&other_digits));
    let mut etreat = s.treat();
    etreat[2].1 = "ETREAT".into();
    etreat.push((
        "X-Carecache-Reason".into(),
        "Unconscious%20at%20scene".into(),
    ));
    let r = s.get_as(&q, &etreat);
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let hit = body["patients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["nhs_number"].as_str().unwrap().replace(' ', "") == other_digits)
        .expect("found with emergency access");
    assert_eq!(hit["emergency_access"], true);

    // 5. FHIR: the standard parameters, a scored searchset both validators accept.
    let r = s.get(&format!(
        "/fhir/Patient?family={}&birthdate={}&gender={}",
        enc(t.name.family.as_str()),
        b,
        match t.sex {
            sync_protocol::record::Sex::Male => "male",
            sync_protocol::record::Sex::Female => "female",
            sync_protocol::record::Sex::Other => "other",
            sync_protocol::record::Sex::Unknown => "unknown",
        }
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    let bundle = r.json();
    assert_eq!(bundle["type"], "searchset");
    let first = &bundle["entry"][0];
    assert_eq!(first["search"]["mode"], "match");
    assert_eq!(first["resource"]["id"], digits.as_str());
    assert!(first["search"]["score"].as_f64().unwrap() > 0.9);
    let tmp = tempfile::tempdir().unwrap();
    validate_fhir(tmp.path(), std::slice::from_ref(&bundle));
    let r = s.get("/fhir/Patient?family=Smith");
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["resourceType"], "OperationOutcome");

    // 6. Every search is in the audit chain: a search, the patients shown, never the
    // terms.
    let audit = s.audit();
    let entry = audit
        .iter()
        .find_map(|(_, rec)| match &rec.event {
            AuditEvent::Access(a) if a.request_id == search_rid => Some(a.clone()),
            _ => None,
        })
        .expect("the search is audited");
    assert_eq!(entry.action, AuditAction::SearchPatient);
    assert!(entry.listed.iter().any(|n| n.digits() == digits));
    let raw: Vec<u8> = audit
        .iter()
        .flat_map(|(e, _)| e.record.as_slice().to_vec())
        .collect();
    let family = t.name.family.as_str().as_bytes();
    assert!(
        !raw.windows(family.len()).any(|w| w == family),
        "no search term in the audit log"
    );

    // 7. The patient objects: gone from the very next search.
    hub.consent(&shareable[target].fhir_id, "active", "2026-11-24T08:30:00Z");
    s.device.sync_once(&mut |_, _| {}).unwrap();
    let r = s.get(&format!(
        "/v1/patients?family={}&birthdate={b}",
        enc(t.name.family.as_str())
    ));
    assert_eq!(r.status, 200);
    assert!(
        !found(&r.json()).contains(&digits),
        "an objector is never found"
    );
}
