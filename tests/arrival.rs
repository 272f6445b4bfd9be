//! The first minutes of a shift (SPEC.md §3.4, §3.8): most important patients first,
//! reads answered while the caseload arrives (every answer says how much of it is
//! here), leases moved, split or merged and sharing-rule changes without resending what
//! a device holds, and one-off lookups online — granted, audited on device and hub,
//! flagged, purged at expiry — refused offline.

use std::collections::{BTreeSet, HashSet};

use serde_json::json;
use sync_protocol::NhsNumber;
use sync_protocol::audit::{AuditEvent, LookupOutcome};
use sync_protocol::record::Section;

use crate::api_harness::{Resp, Served, raw};
use crate::device_harness::{Dev, HOUR, TestHub, grant, shareable};

fn has_alerts(hub: &TestHub, n: NhsNumber) -> bool {
    hub.patients
        .iter()
        .find(|p| p.nhs_number() == n)
        .is_some_and(|p| matches!(p.expected.alerts, Section::Entries(_)))
}

/// A hub with a second team's worth of devices: an enrolment token for `team`.
fn team_token(hub: &TestHub, team: &str) -> String {
    let (status, body) = hub.admin(
        "POST",
        "/admin/v1/enrolment-tokens",
        Some(json!({ "team": team })),
    );
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

fn team_device(hub: &TestHub, team: &str) -> Dev {
    let d = Dev::new(hub);
    d.device.enrol(&team_token(hub, team)).unwrap();
    d
}

/// Patients held and expected after a batch.
type Progress = (u64, Option<u32>);

/// Patients as they arrive, batch by batch, with the caseload progress seen after each.
fn sync_recording(dev: &Dev) -> (Vec<Vec<NhsNumber>>, Vec<Progress>) {
    let mut held: BTreeSet<NhsNumber> = dev.held().into_iter().collect();
    let mut arrivals = Vec::new();
    let mut progress = Vec::new();
    dev.device
        .sync_once(&mut |_, c| {
            let now: BTreeSet<NhsNumber> = dev.held().into_iter().collect();
            arrivals.push(now.difference(&held).copied().collect());
            progress.push((c.held, c.expected));
            held = now;
        })
        .unwrap();
    (arrivals, progress)
}

#[test]
fn patients_with_alerts_arrive_first_then_by_lease_start_and_progress_counts_up() {
    let hub = TestHub::start(700, 26);
    let dev = Dev::enrolled(&hub);
    let shareable: Vec<NhsNumber> = shareable(&hub, hub.patients.len());
    let (early, late) = shareable.split_at(shareable.len() / 2);
    // The later half starts tomorrow; the earlier half today.
    grant(
        &hub,
        &dev.id(),
        late,
        json!({ "not_before": "2026-11-25T00:00:00Z", "not_after": "2026-11-26T00:00:00Z" }),
    );
    grant(&hub, &dev.id(), early, json!({}));
    let (arrivals, progress) = sync_recording(&dev);
    assert!(arrivals.len() >= 3, "a small budget gives several batches");
    let order: Vec<NhsNumber> = arrivals.iter().flatten().copied().collect();
    assert_eq!(order.len(), shareable.len(), "every patient arrived once");
    // Alerts first: once a patient without alerts arrived, no patient with alerts follows
    // in a later batch.
    let flags: Vec<bool> = arrivals
        .iter()
        .map(|b| b.iter().any(|n| !has_alerts(&hub, *n)))
        .collect();
    let first_plain = flags.iter().position(|f| *f).unwrap();
    for batch in arrivals.iter().skip(first_plain + 1) {
        assert!(
            batch.iter().all(|n| !has_alerts(&hub, *n)),
            "a patient with alerts arrived after patients without"
        );
    }
    // A DNACPR decision in particular: every patient with one arrives before the first
    // batch with a patient without alerts.
    let dnacpr: Vec<NhsNumber> = hub
        .patients
        .iter()
        .filter(|p| p.shareable())
        .filter(|p| {
            p.expected.alerts.entries().iter().any(|a| {
                matches!(&a.code.code, Some(sync_protocol::types::Code::Snomed(c)) if c.as_u64() == 450_476_008)
            })
        })
        .map(|p| p.nhs_number())
        .collect();
    assert!(!dnacpr.is_empty(), "the caseload has DNACPR decisions");
    for n in &dnacpr {
        let at = arrivals.iter().position(|b| b.contains(n)).unwrap();
        assert!(
            at <= first_plain,
            "a DNACPR patient arrived after patients without alerts"
        );
    }
    // Among patients without alerts, today's lease comes before tomorrow's.
    let early: HashSet<NhsNumber> = early.iter().copied().collect();
    let plain: Vec<bool> = order
        .iter()
        .filter(|n| !has_alerts(&hub, **n))
        .map(|n| early.contains(n))
        .collect();
    let first_late = plain.iter().position(|e| !*e).unwrap();
    assert!(
        plain[first_late..].iter().all(|e| !*e),
        "a patient of the later lease arrived before one of the earlier"
    );
    // Progress counts up to the expected total, which the hub gave from the first batch.
    let total = u32::try_from(shareable.len()).unwrap();
    assert!(
        progress.iter().all(|(_, e)| *e == Some(total)),
        "{progress:?}"
    );
    assert!(progress.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(progress.last().unwrap().0, u64::from(total));
    let status = dev.device.status().unwrap();
    assert!(status.caseload.complete, "{:?}", status.caseload);
}

#[test]
fn a_read_mid_sync_is_answered_and_says_the_caseload_is_still_arriving() {
    let hub = TestHub::start(400, 27);
    let dev = Dev::enrolled(&hub);
    let patients: Vec<NhsNumber> = shareable(&hub, hub.patients.len());
    grant(&hub, &dev.id(), &patients, json!({}));
    let served = Served::start(dev);
    let mut mid: Vec<(u16, Option<String>, Option<String>)> = Vec::new();
    let mut status_mid = None;
    let mut page_mid = None;
    served
        .device
        .sync_once(&mut |_, c| {
            if c.complete || mid.len() >= 2 {
                return;
            }
            // A patient that has arrived, and one that has not.
            let held = served.device.store().held_versions().unwrap();
            let here = held[0].0;
            let missing = patients
                .iter()
                .find(|n| !held.iter().any(|(h, _)| h == *n))
                .copied()
                .unwrap();
            for n in [here, missing] {
                let r = served.get(&format!("/v1/patients/{}", n.digits()));
                mid.push((
                    r.status,
                    r.header("x-carecache-caseload").map(str::to_owned),
                    r.json()["nhs_number"].as_str().map(str::to_owned),
                ));
            }
            status_mid.get_or_insert_with(|| served.get("/status").json());
            page_mid.get_or_insert_with(|| caseload_page(&served));
        })
        .unwrap();
    let total = patients.len();
    assert_eq!(mid.len(), 2, "reads were made mid-sync");
    let (status, marker, name) = &mid[0];
    assert_eq!(*status, 200, "a patient already here is served mid-sync");
    assert!(name.is_some());
    let marker = marker
        .as_deref()
        .expect("the answer says the caseload is arriving");
    assert!(
        marker.starts_with("arriving; held=") && marker.ends_with(&format!("expected={total}")),
        "{marker}"
    );
    let (status, marker, _) = &mid[1];
    assert_eq!(
        *status, 503,
        "a patient not yet here is not served, for now"
    );
    assert!(marker.is_some(), "the refusal says so too");
    let st = status_mid.unwrap();
    assert_eq!(st["caseload"]["complete"], false, "{st}");
    assert_eq!(st["caseload"]["syncing"], true);
    assert_eq!(st["caseload"]["expected"], json!(total));
    let page = page_mid.unwrap();
    assert!(
        page.contains("Still arriving:") && page.contains(&format!("of {total} patients synced")),
        "{page}"
    );
    // Complete: the marker is gone, status and metrics agree.
    let after = served.get(&format!("/v1/patients/{}", patients[0].digits()));
    assert_eq!(after.status, 200);
    assert_eq!(after.header("x-carecache-caseload"), None);
    let st = served.get("/status").json();
    assert_eq!(st["caseload"]["complete"], true);
    let metrics = served.get("/metrics").text();
    assert!(
        metrics.contains(&format!("carecache_patients_expected {total}")),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("carecache_patients_held {total}")));
    assert!(metrics.contains("carecache_caseload_arriving 0"));
}

/// Signs user n1 in to the viewer: the cookie.
fn viewer_cookie(served: &Served) -> String {
    let addr = served.addr;
    let body = format!("token={}&user=n1", served.token);
    let r = raw(
        addr,
        format!(
            "POST /sign-in HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://{addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 303, "{}", r.text());
    r.header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

/// The viewer's caseload page for user n1.
fn caseload_page(served: &Served) -> String {
    let addr = served.addr;
    let cookie = viewer_cookie(served);
    raw(
        addr,
        format!("GET / HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .text()
}

#[test]
fn a_lease_moved_split_or_merged_within_the_team_resends_no_record_a_device_holds() {
    let hub = TestHub::start(500, 28);
    let a = team_device(&hub, "north");
    let b = team_device(&hub, "north");
    let patients: Vec<NhsNumber> = shareable(&hub, hub.patients.len());
    let (mine, shared) = patients.split_at(patients.len() / 2);
    // B covers the second half under its own lease; A holds the same patients.
    grant(&hub, &b.id(), shared, json!({ "label": "B's round" }));
    let moving = grant(&hub, &a.id(), shared, json!({ "label": "Moving round" }));
    let first_b = b.sync().unwrap();
    let first_a = a.sync().unwrap();
    assert_eq!(first_a.upserts as usize, shared.len());
    // The round moves from A to B: revoked for A, granted to B.
    let (status, body) = hub.admin("DELETE", &format!("/admin/v1/leases/{moving}"), None);
    assert!(status == 200 || status == 204, "{status} {body}");
    grant(&hub, &b.id(), shared, json!({ "label": "Moved round" }));
    let moved = b.sync().unwrap();
    assert_eq!(moved.upserts, 0, "B already holds every record: {moved:?}");
    assert!(
        moved.bytes * 10 < first_b.bytes,
        "the move cost {} bytes; the first sync {}",
        moved.bytes,
        first_b.bytes
    );
    assert_eq!(a.sync().unwrap().removals, 0);
    assert!(a.held().is_empty(), "A purged the round it lost");
    // B's own lease splits in two and is merged with new patients: only those travel.
    let leases: Vec<u64> = b
        .device
        .status()
        .unwrap()
        .leases
        .iter()
        .map(|l| l.id)
        .collect();
    for id in leases {
        hub.admin("DELETE", &format!("/admin/v1/leases/{id}"), None);
    }
    let (first, second) = shared.split_at(shared.len() / 2);
    grant(&hub, &b.id(), first, json!({ "label": "Split 1" }));
    let extra = &mine[..10];
    let merged: Vec<NhsNumber> = second.iter().chain(extra).copied().collect();
    grant(
        &hub,
        &b.id(),
        &merged,
        json!({ "label": "Split 2 with new patients" }),
    );
    let split = b.sync().unwrap();
    assert_eq!(
        split.upserts, 10,
        "only the ten new patients' records: {split:?}"
    );
    let mut expected: Vec<NhsNumber> = shared.iter().chain(extra).copied().collect();
    expected.sort();
    assert_eq!(b.held(), expected);
    // Five patients added to a lease B holds: their five records, and no other.
    let split1 = b
        .device
        .status()
        .unwrap()
        .leases
        .iter()
        .find(|l| l.label == "Split 1")
        .unwrap()
        .id;
    let more: Vec<NhsNumber> = first.iter().chain(&mine[10..15]).copied().collect();
    let (status, body) = hub.admin(
        "PUT",
        &format!("/admin/v1/leases/{split1}"),
        Some(json!({
            "label": "Split 1",
            "target": { "device": b.id() },
            "view": "clinical",
            "not_before": "2026-11-24T00:00:00Z",
            "not_after": "2026-11-25T00:00:00Z",
            "max_offline_secs": 43200,
            "patients": more.iter().map(|n| n.digits()).collect::<Vec<_>>(),
        })),
    );
    assert!(status == 200 || status == 204, "{status} {body}");
    let grown = b.sync().unwrap();
    assert_eq!(
        grown.upserts, 5,
        "only the added patients' records: {grown:?}"
    );
    assert!(grown.bytes * 10 < first_b.bytes, "{grown:?}");
    // A device that holds nothing of a round gets the records themselves.
    let c = team_device(&hub, "north");
    grant(&hub, &c.id(), first, json!({ "label": "C's round" }));
    assert_eq!(c.sync().unwrap().upserts as usize, first.len());
}

#[test]
fn a_sensitive_code_list_change_resends_only_the_patients_it_affects() {
    use carecache_hub::sharing::{DEFAULT_CODE_LIST, DEFAULT_DENY_LABELS, SharingRules};
    let hub = TestHub::start(400, 29);
    let dev = Dev::enrolled(&hub);
    let patients: Vec<NhsNumber> = shareable(&hub, hub.patients.len());
    grant(&hub, &dev.id(), &patients, json!({}));
    dev.sync().unwrap();
    // A SNOMED CT code a few patients' records carry joins the list.
    let codes_of = |r: &sync_protocol::record::PatientRecord| -> BTreeSet<u64> {
        let snomed = |c: &sync_protocol::types::Coding| match &c.code {
            Some(sync_protocol::types::Code::Snomed(s)) => Some(s.as_u64()),
            _ => None,
        };
        r.alerts
            .entries()
            .iter()
            .filter_map(|a| snomed(&a.code))
            .chain(
                r.allergies
                    .entries()
                    .iter()
                    .filter_map(|a| snomed(&a.substance)),
            )
            .chain(
                r.medications
                    .entries()
                    .iter()
                    .filter_map(|m| snomed(&m.medicine)),
            )
            .collect()
    };
    let mut counts = std::collections::BTreeMap::<u64, usize>::new();
    for n in &patients {
        for c in codes_of(&dev.device.store().record(n).unwrap().unwrap()) {
            *counts.entry(c).or_default() += 1;
        }
    }
    let (&code, _) = counts
        .iter()
        .filter(|(_, n)| (2..=patients.len() / 5).contains(*n))
        .max_by_key(|(_, n)| **n)
        .expect("a code some patients share");
    let versions = |hub: &TestHub| -> Vec<u64> {
        patients
            .iter()
            .map(|n| hub.hub.state.record(n).unwrap().unwrap().version.0)
            .collect()
    };
    let before = versions(&hub);
    let list = format!("{DEFAULT_CODE_LIST}{code},test,Added for the test,unverified\n");
    let labels: Vec<String> = DEFAULT_DENY_LABELS
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let rules = SharingRules::new(&list, &labels).unwrap().with_local_map(
        carecache_hub::sharing::LocalCodeMap::parse(&carecache_synth::local_code_map()).unwrap(),
    );
    let report =
        carecache_hub::source::ingest_ndjson(&hub.hub.state, &rules, &hub.ndjson_dir()).unwrap();
    // The patients on the lease whose shared content changed: those carrying the code.
    let affected = versions(&hub)
        .iter()
        .zip(&before)
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        affected >= 2 && affected * 2 < patients.len(),
        "{affected} of {} patients changed ({report:?})",
        patients.len()
    );
    let s = dev.sync().unwrap();
    assert_eq!(
        s.upserts as usize, affected,
        "only the affected patients: {s:?}"
    );
    // And what they hold now lacks the item.
    for n in dev.held() {
        let r = dev.device.store().record(&n).unwrap().unwrap();
        assert!(!codes_of(&r).contains(&code));
    }
}

fn lookup(served: &Served, nhs: NhsNumber, user: &str, reason: Option<&str>) -> Resp {
    let body = json!({ "nhs_number": nhs.digits() }).to_string();
    let mut head = format!(
        "POST /v1/lookup HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nX-Carecache-User: {user}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        served.token,
        body.len()
    );
    match reason {
        Some(r) => head.push_str(&format!(
            "X-Carecache-Purpose: ETREAT\r\nX-Carecache-Reason: {r}\r\n"
        )),
        None => head.push_str("X-Carecache-Purpose: TREAT\r\n"),
    }
    head.push_str("\r\n");
    head.push_str(&body);
    raw(served.addr, head.as_bytes())
}

fn etreat(served: &Served, user: &str) -> Vec<(String, String)> {
    vec![
        ("Authorization".into(), format!("Bearer {}", served.token)),
        ("X-Carecache-User".into(), user.into()),
        ("X-Carecache-Purpose".into(), "ETREAT".into()),
        (
            "X-Carecache-Reason".into(),
            "Collapsed in the street".into(),
        ),
    ]
}

fn lookups_audited(served: &Served) -> Vec<LookupOutcome> {
    served
        .audit()
        .into_iter()
        .filter_map(|(_, r)| match r.event {
            AuditEvent::Lookup(l) => Some(l.outcome),
            _ => None,
        })
        .collect()
}

#[test]
fn a_lookup_online_is_granted_audited_flagged_and_purged_at_expiry_and_refused_offline() {
    let mut hub = TestHub::start(300, 30);
    let dev = Dev::enrolled(&hub);
    let shareable: Vec<NhsNumber> = shareable(&hub, hub.patients.len());
    let (caseload, others) = shareable.split_at(100);
    grant(
        &hub,
        &dev.id(),
        caseload,
        json!({ "emergency_access": true, "users": ["n1", "n2"] }),
    );
    dev.sync().unwrap();
    let served = Served::start(dev);
    let stranger = others[0];
    // Not on the caseload: refused, as before.
    let path = format!("/v1/patients/{}", stranger.digits());
    assert_eq!(served.get_as(&path, &etreat(&served, "n1")).status, 403);
    // A lookup needs a reason.
    let r = lookup(&served, stranger, "n1", None);
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (400, json!("reason-required"))
    );
    // Someone no lease names may not look up.
    let r = lookup(
        &served,
        stranger,
        "x9",
        Some("Collapsed%20in%20the%20street"),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    // Online: granted, a lease for this patient and this member of staff alone.
    let r = lookup(
        &served,
        stranger,
        "n1",
        Some("Collapsed%20in%20the%20street"),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let lease = r.json()["lease"].as_u64().unwrap();
    let read = served.get_as(&path, &etreat(&served, "n1"));
    assert_eq!(read.status, 200, "{}", read.text());
    assert_eq!(
        read.json()["access"]["emergency"],
        true,
        "flagged as emergency access"
    );
    assert_eq!(read.json()["access"]["lease"], lease);
    assert_eq!(
        served.get_as(&path, &etreat(&served, "n2")).status,
        403,
        "the lookup was for n1 alone"
    );
    // Audited on the device (and uploaded), and recorded at the hub for review.
    assert!(matches!(
        lookups_audited(&served).as_slice(),
        [LookupOutcome::NotPermitted, LookupOutcome::Granted { .. }]
    ));
    let (status, body) = hub.admin("GET", "/admin/v1/lookups", None);
    assert_eq!(status, 200);
    assert_eq!(body["flagged"], 1, "{body}");
    assert_eq!(body["lookups"][0]["nhs_number"], stranger.digits());
    assert_eq!(body["lookups"][0]["staff"], "n1");
    assert_eq!(body["lookups"][0]["reason"], "Collapsed in the street");
    // The next sync keeps it and sends no record again; the device's lookup entry goes
    // up with it and is among the hub's emergency accesses for review.
    let again = served.device.sync_once(&mut |_, _| {}).unwrap();
    assert_eq!(again.upserts, 0, "{again:?}");
    let mut reviewed = Vec::new();
    hub.hub
        .state
        .for_each_emergency(|e| {
            if let AuditEvent::Lookup(l) = e.record.event {
                reviewed.push((l.patient, l.outcome));
            }
            Ok(())
        })
        .unwrap();
    assert!(
        matches!(
            reviewed.as_slice(),
            [(a, LookupOutcome::NotPermitted), (b, LookupOutcome::Granted { .. })]
                if *a == stranger && *b == stranger
        ),
        "the refused attempt and the grant, both for review: {reviewed:?}"
    );
    assert!(served.device.store().record(&stranger).unwrap().is_some());
    // An objector cannot be looked up; the answer does not say why.
    let objector = hub
        .patients
        .iter()
        .find(|p| !p.shareable())
        .map(|p| p.nhs_number())
        .unwrap();
    let r = lookup(&served, objector, "n1", Some("Collapsed"));
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "not-available");
    assert!(served.device.store().record(&objector).unwrap().is_none());
    // Offline: refused at once, with words, and audited; the looked-up patient is
    // still there, offline too.
    hub.stop();
    let r = lookup(&served, others[1], "n1", Some("Collapsed"));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "offline");
    assert!(matches!(
        lookups_audited(&served).last(),
        Some(LookupOutcome::Offline)
    ));
    assert_eq!(served.get_as(&path, &etreat(&served, "n1")).status, 200);
    // Twelve hours on, the lookup lease has expired and the patient is purged.
    served
        .clock
        .advance(12 * HOUR + std::time::Duration::from_secs(1));
    served.device.tick().unwrap();
    assert!(served.device.store().record(&stranger).unwrap().is_none());
    assert_ne!(served.get_as(&path, &etreat(&served, "n1")).status, 200);
}

/// A hub that lies about offers and wants is refused whole, and a round cut short by a
/// refusal resumes asking for what it still wants.
#[test]
fn hostile_offers_and_wants_are_refused_and_wants_survive_a_refused_round() {
    use carecache::device::Outcome;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use sync_protocol::message::Offer;
    use sync_protocol::types::{BoundedVec, RecordVersion};

    use crate::device_harness::tamper_batches;

    let hub = TestHub::start(300, 31);
    let patients: Vec<NhsNumber> = shareable(&hub, hub.patients.len());
    let (first, rest) = patients.split_at(100);
    let stranger = rest[150];
    let rejected = |dev: &Dev, expect: &str| {
        let err = dev.sync().expect_err("the hostile answer was accepted");
        let last = dev.device.status().unwrap().last_sync.unwrap();
        match last.outcome {
            Outcome::Rejected(w) => assert!(w.contains(expect), "{w} / {err}"),
            other => panic!("{other:?} ({err})"),
        }
    };
    let add_offer = |b: sync_protocol::message::Batch, n: NhsNumber| {
        let mut offers = b.offers.clone().into_inner();
        offers.push(Offer {
            nhs_number: n,
            version: RecordVersion(1),
        });
        let (done, expected) = (b.wants_done, b.expected);
        b.with_progress(BoundedVec::try_from(offers).unwrap(), done, expected)
            .unwrap()
    };

    // A device holding nothing is offered a record.
    let fresh = Dev::enrolled(&hub);
    grant(&hub, &fresh.id(), first, json!({}));
    let target = first[99];
    tamper_batches(&hub, move |mut b| {
        let kept: Vec<_> = b
            .upserts
            .iter()
            .filter(|r| r.nhs_number != target)
            .cloned()
            .collect();
        b.upserts = BoundedVec::try_from(kept).unwrap();
        add_offer(b, target)
    });
    rejected(&fresh, "holds none");
    assert!(fresh.held().is_empty(), "nothing applied");

    // A patient outside the leases offered; more wants answered than asked.
    hub.hub.dangerous_set_response_hook(None);
    fresh.sync().unwrap();
    grant(&hub, &fresh.id(), &rest[..10], json!({ "label": "More" }));
    tamper_batches(&hub, move |b| add_offer(b, stranger));
    rejected(&fresh, "outside this device's leases");
    tamper_batches(&hub, |b| {
        let (offers, expected) = (b.offers.clone(), b.expected);
        b.with_progress(offers, 5, expected).unwrap()
    });
    rejected(&fresh, "more wanted patients than were asked");
    hub.hub.dangerous_set_response_hook(None);
    fresh.sync().unwrap();

    // A round ended with a wanted record unsent: B holds a round that moves to it, the
    // hub offers it one record in a version B lacks, then ends the round without it.
    let b_dev = team_device(&hub, "east");
    let a_dev = team_device(&hub, "east");
    grant(&hub, &b_dev.id(), first, json!({ "label": "B" }));
    let moving = grant(&hub, &a_dev.id(), first, json!({ "label": "A" }));
    b_dev.sync().unwrap();
    hub.admin("DELETE", &format!("/admin/v1/leases/{moving}"), None);
    grant(&hub, &b_dev.id(), first, json!({ "label": "Moved to B" }));
    let pulls = Arc::new(AtomicUsize::new(0));
    let p2 = pulls.clone();
    tamper_batches(&hub, move |b| match p2.fetch_add(1, Ordering::SeqCst) {
        0 => {
            let mut offers = b.offers.clone().into_inner();
            offers[0].version = RecordVersion(offers[0].version.0 + 1);
            let (done, expected) = (b.wants_done, b.expected);
            b.with_progress(BoundedVec::try_from(offers).unwrap(), done, expected)
                .unwrap()
        }
        _ => {
            let mut lie = sync_protocol::message::Batch::new(
                BoundedVec::new(),
                BoundedVec::new(),
                BoundedVec::new(),
                BoundedVec::new(),
                b.next_cursor.clone(),
                false,
                b.hub_time,
                b.allowed,
            )
            .unwrap();
            lie = lie.with_progress(BoundedVec::new(), 0, b.expected).unwrap();
            lie
        }
    });
    rejected(&b_dev, "wanted records unsent");
    // Honest again: the next round asks for the wanted record first and completes.
    hub.hub.dangerous_set_response_hook(None);
    let s = b_dev.sync().unwrap();
    assert_eq!(s.upserts, 1, "only the wanted record: {s:?}");
    assert!(b_dev.device.status().unwrap().caseload.complete);
}

/// The viewer's emergency-access form for a patient on no caseload of the tablet asks the
/// hub, online, and shows the record; offline it says why not.
#[test]
fn the_viewer_emergency_form_looks_up_a_patient_on_no_caseload() {
    let mut hub = TestHub::start(200, 33);
    let dev = Dev::enrolled(&hub);
    let shareable: Vec<NhsNumber> = shareable(&hub, hub.patients.len());
    grant(
        &hub,
        &dev.id(),
        &shareable[..50],
        json!({ "emergency_access": true }),
    );
    dev.sync().unwrap();
    let served = Served::start(dev);
    let cookie = viewer_cookie(&served);
    let addr = served.addr;
    let emergency = |nhs: NhsNumber| {
        let body = "reason=Collapsed+in+the+street";
        raw(
            addr,
            format!(
                "POST /patient/{} HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://{addr}\r\nCookie: {cookie}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                nhs.digits(),
                body.len()
            )
            .as_bytes(),
        )
    };
    let stranger = shareable[100];
    let page = emergency(stranger);
    assert_eq!(page.status, 200, "{}", page.text());
    let d = stranger.digits();
    let spaced = format!("{} {} {}", &d[..3], &d[3..6], &d[6..]);
    assert!(
        page.text().contains(&spaced) && page.text().contains("Alerts"),
        "the record is shown: {}",
        page.text()
    );
    assert!(matches!(
        lookups_audited(&served).as_slice(),
        [LookupOutcome::Granted { .. }]
    ));
    hub.stop();
    let page = emergency(shareable[101]);
    assert_eq!(page.status, 503, "{}", page.text());
    assert!(page.text().contains("a one-off lookup was not possible"));
}
