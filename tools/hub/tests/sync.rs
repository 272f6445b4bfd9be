//! The sync protocol over real HTTPS: enrolment, pulls within a budget, objection
//! ordering, lease changes, revocation, cursors.

use sync_protocol::message::{ErrorCode, LeaseChange, Message, ObjectionStatus, RemovalReason};
use sync_protocol::types::Cursor;

use crate::harness::{Model, TestDevice, TestHub, lease_json};

const MIN_BUDGET: u32 = 256 * 1024;

fn error_code(a: &(u16, Message)) -> Option<ErrorCode> {
    match &a.1 {
        Message::Error(e) => Some(e.code),
        _ => None,
    }
}

#[test]
fn enrolment_token_is_single_use_and_identifies_the_device() {
    let hub = TestHub::start(10);
    let token = hub.token(Some("north"));
    let device = TestDevice::enrol(&hub, &token).unwrap();
    let (status, msg) = device.hello();
    let Message::Welcome(w) = msg else {
        panic!("{status} {msg:?}")
    };
    assert_eq!(w.device_id.as_str(), device.id);
    assert_eq!(w.audit_durable_through, 0);
    // The same token again: refused, and no second device appears.
    let again = TestDevice::enrol(&hub, &token).err().unwrap();
    assert_eq!(again.0, 401);
    assert_eq!(error_code(&again), Some(ErrorCode::Unauthorized));
    let (_, devices) = hub.admin("GET", "/admin/v1/devices", None);
    assert_eq!(devices.as_array().unwrap().len(), 1);
    // An unknown token.
    let bogus = TestDevice::enrol(&hub, "0123456789abcdef0123456789abcdef")
        .err()
        .unwrap();
    assert_eq!(error_code(&bogus), Some(ErrorCode::Unauthorized));
    // An expired token.
    let (_, body) = hub.admin(
        "POST",
        "/admin/v1/enrolment-tokens",
        Some(serde_json::json!({ "ttl_secs": 60 })),
    );
    hub.set_time(crate::harness::T0 + 61_000);
    let expired = TestDevice::enrol(&hub, body["token"].as_str().unwrap())
        .err()
        .unwrap();
    assert_eq!(error_code(&expired), Some(ErrorCode::Unauthorized));
}

/// A small budget splits the caseload over many batches, each within the budget; the
/// device ends holding exactly the allowed set (digest matches), and a pull resumed
/// from any committed cursor converges to the same state.
#[test]
fn pull_until_done_within_budget_and_resumable() {
    let hub = TestHub::start(1200);
    let device = hub.enrol(None);
    let all = hub.all_nhs();
    hub.grant(lease_json(&device.id, &all));
    let batches = device.pull_all(None, MIN_BUDGET);
    assert!(batches.len() >= 3, "only {} batches", batches.len());
    let mut model = Model::default();
    for b in &batches {
        let size =
            sync_protocol::encode(&Message::Batch(b.clone()), sync_protocol::Compression::None)
                .unwrap()
                .len()
                - 16;
        assert!(
            size <= MIN_BUDGET as usize,
            "batch of {size} bytes over the budget"
        );
        model.apply(b);
    }
    let last = batches.last().unwrap();
    assert!(!last.more);
    assert_eq!(
        model.digest(),
        last.allowed,
        "device state matches the allowed-set digest"
    );
    assert!(
        batches[0].objections.len() + batches[0].leases.len() > 0,
        "objections and leases come first"
    );

    // Resume from the third batch's cursor, as after a crash before committing batch 4.
    let mut resumed = Model::default();
    for b in &batches[..3] {
        resumed.apply(b);
    }
    for b in device.pull_all(Some(&batches[2].next_cursor), MIN_BUDGET) {
        resumed.apply(&b);
    }
    assert_eq!(resumed.digest(), last.allowed);
    // A settled cursor with nothing new: an empty batch, same digest.
    let again = device.pull_all(Some(&last.next_cursor), MIN_BUDGET);
    assert_eq!(again.len(), 1);
    assert!(again[0].upserts.is_empty() && again[0].leases.is_empty());
    assert_eq!(again[0].allowed, last.allowed);
}

fn reingest(hub: &TestHub) {
    let rules = carecache_hub::testing::synthetic_rules();
    carecache_hub::source::ingest_ndjson(&hub.hub.state, &rules, &hub.ndjson_dir()).unwrap();
}

/// An objection reaches the device before any data, with a removal; the record is
/// never upserted while it stands; a withdrawal restores it on the next sync.
#[test]
fn objection_comes_first_and_withdrawal_restores() {
    let hub = TestHub::start(50);
    let device = hub.enrol(None);
    let victim = hub.patients.iter().find(|p| p.shareable()).unwrap();
    let n = victim.nhs_number().as_u64();
    let all = hub.all_nhs();
    hub.grant(lease_json(&device.id, &all));
    let mut model = Model::default();
    let first = device.pull_all(None, MIN_BUDGET);
    for b in &first {
        model.apply(b);
    }
    assert!(model.records.contains_key(&n));
    let cursor: Cursor = first.last().unwrap().next_cursor.clone();

    hub.consent(&victim.fhir_id, "active", "2026-11-24T09:00:00.000Z");
    let next = device.pull_all(Some(&cursor), MIN_BUDGET);
    let b = &next[0];
    let o = b
        .objections
        .iter()
        .find(|o| o.nhs_number.as_u64() == n)
        .expect("objection sent");
    assert_eq!(o.status, ObjectionStatus::Objected);
    assert!(
        b.removals
            .iter()
            .any(|r| r.nhs_number.as_u64() == n && r.reason == RemovalReason::Objection)
    );
    for b in &next {
        assert!(b.upserts.iter().all(|u| u.nhs_number.as_u64() != n));
        model.apply(b);
    }
    assert!(!model.records.contains_key(&n));
    assert_eq!(model.digest(), next.last().unwrap().allowed);
    // A fresh device with the same lease never receives the record at all.
    let fresh = hub.enrol(None);
    hub.grant(lease_json(&fresh.id, &all));
    let fresh_batches = fresh.pull_all(None, MIN_BUDGET);
    assert!(
        fresh_batches
            .iter()
            .flat_map(|b| b.upserts.iter())
            .all(|u| u.nhs_number.as_u64() != n)
    );
    assert!(
        fresh_batches[0]
            .objections
            .iter()
            .any(|o| o.nhs_number.as_u64() == n)
    );

    // Withdrawn later: status inactive, recorded after.
    hub.consent(&victim.fhir_id, "inactive", "2026-11-24T10:00:00.000Z");
    let after = device.pull_all(Some(&next.last().unwrap().next_cursor), MIN_BUDGET);
    assert!(
        after[0]
            .objections
            .iter()
            .any(|o| o.nhs_number.as_u64() == n && o.status == ObjectionStatus::Withdrawn)
    );
    for b in &after {
        model.apply(b);
    }
    assert!(model.records.contains_key(&n), "withdrawal restores access");
    assert_eq!(model.digest(), after.last().unwrap().allowed);
}

/// Extension changes the lease without resending records; shrinking removes patients;
/// revocation reaches the device; a revoked device is told to wipe.
#[test]
fn lease_extension_shrink_revocation_and_device_revocation() {
    let hub = TestHub::start(60);
    let device = hub.enrol(None);
    let other = hub.enrol(None);
    let all = hub.all_nhs();
    let id = hub.grant(lease_json(&device.id, &all));
    let mut model = Model::default();
    let first = device.pull_all(None, MIN_BUDGET);
    for b in &first {
        model.apply(b);
    }
    let held = model.records.len();
    assert!(held > 40);
    // The other device has no lease: nothing at all.
    let nothing = other.pull_all(None, MIN_BUDGET);
    assert!(
        nothing
            .iter()
            .all(|b| b.upserts.is_empty() && b.leases.is_empty())
    );

    let mut extended = lease_json(&device.id, &all);
    extended["not_after"] = "2026-11-26T00:00:00Z".into();
    let (status, body) = hub.admin("PUT", &format!("/admin/v1/leases/{id}"), Some(extended));
    assert_eq!(status, 200, "{body}");
    let ext = device.pull_all(Some(&first.last().unwrap().next_cursor), MIN_BUDGET);
    let LeaseChange::Changed(l) = &ext[0].leases[0] else {
        panic!("{:?}", ext[0].leases)
    };
    assert_eq!(l.not_after.as_millis(), 1_795_651_200_000);
    assert!(
        ext.iter().all(|b| b.upserts.is_empty()),
        "an extension resends no records"
    );

    let mut shrunk = lease_json(&device.id, &all[..10]);
    shrunk["not_after"] = "2026-11-26T00:00:00Z".into();
    hub.admin("PUT", &format!("/admin/v1/leases/{id}"), Some(shrunk));
    let sh = device.pull_all(Some(&ext.last().unwrap().next_cursor), MIN_BUDGET);
    for b in &sh {
        model.apply(b);
    }
    assert!(model.records.len() <= 10);
    assert_eq!(model.digest(), sh.last().unwrap().allowed);

    let (status, _) = hub.admin("DELETE", &format!("/admin/v1/leases/{id}"), None);
    assert_eq!(status, 204);
    let rv = device.pull_all(Some(&sh.last().unwrap().next_cursor), MIN_BUDGET);
    assert!(matches!(rv[0].leases[0], LeaseChange::Revoked { .. }));
    for b in &rv {
        model.apply(b);
    }
    assert!(model.records.is_empty());
    assert_eq!(rv.last().unwrap().allowed.patients, 0);

    let (status, _) = hub.admin(
        "POST",
        &format!("/admin/v1/devices/{}/revoke", device.id),
        None,
    );
    assert_eq!(status, 204);
    let refused = device.pull(None, MIN_BUDGET);
    assert_eq!(refused.0, 403);
    assert_eq!(error_code(&refused), Some(ErrorCode::DeviceRevoked));
    assert_eq!(error_code(&device.hello()), Some(ErrorCode::DeviceRevoked));
}

/// A lease for a team reaches every device enrolled into that team, and no other.
#[test]
fn team_leases_reach_team_devices_only() {
    let hub = TestHub::start(20);
    let a = hub.enrol(Some("district-nurses-west"));
    let b = hub.enrol(Some("district-nurses-west"));
    let c = hub.enrol(Some("ambulance-east"));
    let all = hub.all_nhs();
    let mut spec = lease_json("unused", &all);
    spec["target"] = serde_json::json!({ "team": "district-nurses-west" });
    spec["users"] = serde_json::json!(["N1234", "N5678"]);
    hub.grant(spec);
    for d in [&a, &b] {
        let got = d.pull_all(None, MIN_BUDGET);
        assert!(matches!(
            got[0].leases.first(),
            Some(LeaseChange::Granted(_))
        ));
        assert!(got.iter().map(|x| x.upserts.len()).sum::<usize>() > 10);
    }
    let none = c.pull_all(None, MIN_BUDGET);
    assert!(
        none.iter()
            .all(|x| x.leases.is_empty() && x.upserts.is_empty())
    );
}

#[test]
fn cursors_from_elsewhere_or_the_future_are_refused() {
    let hub = TestHub::start(10);
    let device = hub.enrol(None);
    let garbage = Cursor::new(vec![1, 2, 3]).unwrap();
    assert_eq!(
        error_code(&device.pull(Some(&garbage), MIN_BUDGET)),
        Some(ErrorCode::CursorInvalid)
    );
    // A valid cursor with its target pushed past the head.
    let batches = device.pull_all(None, MIN_BUDGET);
    let bytes = batches[0].next_cursor.as_bytes().to_vec();
    let future = {
        // Layout: the ordered-cursor mark, hub id (8 bytes), then varints base (0 in a
        // first round: one byte), target, then phase, place and expected count.
        // Replace the target with 2^40.
        assert_eq!(bytes[0], 0xC5, "an ordered cursor");
        let end = 10 + bytes[10..].iter().position(|b| b & 0x80 == 0).unwrap() + 1;
        let mut v = bytes[..10].to_vec();
        let mut t: u64 = 1 << 40;
        while t >= 0x80 {
            v.push((t as u8) | 0x80);
            t >>= 7;
        }
        v.push(t as u8);
        v.extend_from_slice(&bytes[end..]);
        Cursor::new(v).unwrap()
    };
    assert_eq!(
        error_code(&device.pull(Some(&future), MIN_BUDGET)),
        Some(ErrorCode::CursorInvalid)
    );
    // Another hub's cursor.
    let other = TestHub::start(10);
    let od = other.enrol(None);
    let theirs = od.pull_all(None, MIN_BUDGET).pop().unwrap().next_cursor;
    assert_eq!(
        error_code(&device.pull(Some(&theirs), MIN_BUDGET)),
        Some(ErrorCode::CursorInvalid)
    );
}

/// A patient the source deletes is removed from every device that held it.
#[test]
fn deletion_upstream_removes_from_devices() {
    let hub = TestHub::start(30);
    let device = hub.enrol(None);
    let all = hub.all_nhs();
    hub.grant(lease_json(&device.id, &all));
    let first = device.pull_all(None, MIN_BUDGET);
    let gone = hub.patients.iter().find(|p| p.shareable()).unwrap();
    let dir = hub.ndjson_dir();
    for f in std::fs::read_dir(&dir).unwrap() {
        let path = f.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                !l.contains(&format!("\"id\":\"{}\"", gone.fhir_id))
                    && !l.contains(&format!("Patient/{}\"", gone.fhir_id))
            })
            .collect();
        std::fs::write(&path, kept.join("\n") + "\n").unwrap();
    }
    reingest(&hub);
    let next = device.pull_all(Some(&first.last().unwrap().next_cursor), MIN_BUDGET);
    assert!(
        next[0].removals.iter().any(
            |r| r.nhs_number == gone.nhs_number() && r.reason == RemovalReason::DeletedUpstream
        )
    );
}
