//! Shift start at the hub (SPEC §3.4, §3.8): a team's tablets starting the same caseload
//! share one built batch; offers and wants; cursors from before the record order; and
//! lookups refused for want of permission or of a shareable patient.

use std::sync::atomic::Ordering;

use carecache_hub::config::Limits;
use sync_protocol::NhsNumber;
use sync_protocol::message::{Batch, ErrorCode, Lookup, Message, Pull};
use sync_protocol::types::{BoundedVec, Cursor, LeaseId, StaffId, Text};
use sync_protocol::{Compression, encode_version};

use crate::harness::{TestDevice, TestHub, lease_json, post_raw};

const MIN_BUDGET: u32 = 262_144;

fn team_lease(team: &str, patients: &[String]) -> serde_json::Value {
    let mut l = lease_json("unused", patients);
    l["target"] = serde_json::json!({ "team": team });
    l
}

fn built(hub: &TestHub) -> u64 {
    hub.hub.batches_built.load(Ordering::Relaxed)
}

fn shared(hub: &TestHub) -> u64 {
    hub.hub.shared_hits.load(Ordering::Relaxed)
}

#[test]
fn a_team_starting_together_is_served_one_shared_batch_per_pull() {
    let hub = TestHub::start(600);
    hub.grant(team_lease("north", &hub.all_nhs()));
    let a = hub.enrol(Some("north"));
    let b = hub.enrol(Some("north"));
    let first = a.pull_all(None, MIN_BUDGET);
    assert!(first.len() >= 3);
    let after_a = built(&hub);
    let second = b.pull_all(None, MIN_BUDGET);
    assert_eq!(first, second, "the same batches");
    assert_eq!(
        built(&hub),
        after_a,
        "nothing built again for the second tablet"
    );
    assert_eq!(shared(&hub), first.len() as u64);
    // Another device with its own lease is never sent the team's batches.
    let c = hub.enrol(None);
    hub.grant(lease_json(&c.id, &hub.all_nhs()[..10]));
    let own = c.pull_all(None, MIN_BUDGET);
    assert!(own.iter().map(|x| x.upserts.len()).sum::<usize>() <= 10);
    // A change upstream (a new log head) is never answered from an older snapshot.
    let before = built(&hub);
    hub.grant(team_lease("north", &hub.all_nhs()[..5]));
    let d = hub.enrol(Some("north"));
    let fresh = d.pull_all(None, MIN_BUDGET);
    assert!(built(&hub) > before);
    assert_eq!(
        fresh[0].leases.len(),
        2,
        "the new lease is in the new snapshot"
    );
}

#[test]
fn with_shared_snapshots_off_every_pull_is_built() {
    let limits = Limits {
        shared_snapshot_mib: 0,
        ..Limits::default()
    };
    let hub = TestHub::start_with(200, limits);
    hub.grant(team_lease("north", &hub.all_nhs()));
    let a = hub.enrol(Some("north"));
    let b = hub.enrol(Some("north"));
    let n = a.pull_all(None, MIN_BUDGET).len() + b.pull_all(None, MIN_BUDGET).len();
    assert_eq!(built(&hub), n as u64);
    assert_eq!(shared(&hub), 0);
}

fn pull_holding(
    device: &TestDevice,
    cursor: Option<&Cursor>,
    holding: u32,
    want: &[NhsNumber],
) -> Batch {
    let mut p = Pull::new(cursor.cloned(), MIN_BUDGET);
    p.holding = holding;
    p.want = BoundedVec::try_from(want.to_vec()).unwrap();
    match device.send("/ccsp/v1/pull", &Message::Pull(p)) {
        (200, Message::Batch(b)) => b,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_resyncing_device_is_offered_versions_and_sent_only_what_it_wants() {
    let hub = TestHub::start(300);
    let device = hub.enrol(None);
    let all = hub.all_nhs();
    hub.grant(lease_json(&device.id, &all[..200]));
    // Holding nothing: records outright.
    let plain = device.pull_all(None, MIN_BUDGET);
    assert!(plain.iter().all(|b| b.offers.is_empty()));
    let records: usize = plain.iter().map(|b| b.upserts.len()).sum();
    let expected = plain[0].expected as usize;
    assert_eq!(records, expected, "the expected count is what arrives");
    // Holding patients, from no cursor (a resync): offers, no records.
    let first = pull_holding(&device, None, 150, &[]);
    assert!(first.upserts.is_empty(), "{} records", first.upserts.len());
    assert_eq!(first.offers.len(), expected);
    assert!(first.more, "offers always ask for another pull");
    // Three wanted, plus a patient on no lease of this device: the three come first,
    // the stranger is skipped, all four answered.
    let wanted: Vec<NhsNumber> = first.offers.iter().take(3).map(|o| o.nhs_number).collect();
    let stranger = NhsNumber::parse(&all[250]).unwrap();
    let mut want = wanted.clone();
    want.push(stranger);
    let second = pull_holding(&device, Some(&first.next_cursor), 150, &want);
    assert_eq!(second.wants_done, 4);
    let got: Vec<NhsNumber> = second.upserts.iter().map(|r| r.nhs_number).collect();
    assert_eq!(got, wanted);
    assert!(!second.more, "nothing left: the round completes");
    assert_eq!(second.allowed, plain.last().unwrap().allowed);
    // A version-4 pull cannot say what it holds: records, as before.
    let v4 = encode_version(
        &Message::Pull(Pull::new(None, MIN_BUDGET)),
        Compression::None,
        4,
    )
    .unwrap();
    let (status, msg) = post_raw(
        &device.agent,
        &hub.url("/ccsp/v1/pull"),
        carecache_hub::server::FRAME_CONTENT_TYPE,
        &v4,
        16 << 20,
    );
    let Message::Batch(b) = msg else {
        panic!("{status} {msg:?}")
    };
    assert!(b.offers.is_empty() && !b.upserts.is_empty());
}

#[test]
fn a_cursor_from_before_the_record_order_still_resumes() {
    let hub = TestHub::start(300);
    let device = hub.enrol(None);
    hub.grant(lease_json(&device.id, &hub.all_nhs()));
    let batches = device.pull_all(None, MIN_BUDGET);
    let now = batches[0].next_cursor.as_bytes().to_vec();
    assert_eq!(now[0], 0xC5);
    // The first format: hub id, base, target, phase, last NHS number sent.
    #[derive(serde::Serialize)]
    struct CursorV1 {
        hub: [u8; 8],
        base: u64,
        target: u64,
        phase: u8,
        after: u64,
    }
    let head = hub.hub.state.head().unwrap();
    let old = CursorV1 {
        hub: now[1..9].try_into().unwrap(),
        base: 0,
        target: head,
        phase: 2,
        after: 9_990_000_000,
    };
    let old = Cursor::new(postcard::to_allocvec(&old).unwrap()).unwrap();
    let resumed = device.pull_all(Some(&old), MIN_BUDGET);
    let records: usize = resumed.iter().map(|b| b.upserts.len()).sum();
    let all: usize = batches.iter().map(|b| b.upserts.len()).sum();
    assert_eq!(records, all, "its records phase starts again");
    assert_eq!(
        resumed.last().unwrap().allowed,
        batches.last().unwrap().allowed
    );
}

fn lookup(device: &TestDevice, nhs: &str, lease: u64, staff: &str) -> (u16, Message) {
    device.send(
        "/ccsp/v1/lookup",
        &Message::Lookup(Lookup {
            nhs_number: NhsNumber::parse(nhs).unwrap(),
            lease: LeaseId(lease),
            staff: StaffId::new(staff).unwrap(),
            reason: Text::new("Collapsed in the street").unwrap(),
        }),
    )
}

fn code(a: &(u16, Message)) -> Option<ErrorCode> {
    match &a.1 {
        Message::Error(e) => Some(e.code),
        _ => None,
    }
}

#[test]
fn lookups_need_an_emergency_lease_naming_the_caller_and_a_shareable_patient() {
    let hub = TestHub::start(100);
    let device = hub.enrol(None);
    let all = hub.all_nhs();
    let mut spec = lease_json(&device.id, &all[..20]);
    spec["users"] = serde_json::json!(["n1"]);
    let lease = hub.grant(spec.clone());
    spec["emergency_access"] = serde_json::json!(false);
    let closed = hub.grant(spec);
    let stranger = &all[60];
    // Not the lease's user, or a lease without emergency access, or a lease of another
    // device: not permitted.
    assert_eq!(
        code(&lookup(&device, stranger, lease, "x9")),
        Some(ErrorCode::NotPermitted)
    );
    assert_eq!(
        code(&lookup(&device, stranger, closed, "n1")),
        Some(ErrorCode::NotPermitted)
    );
    let other = hub.enrol(None);
    assert_eq!(
        code(&lookup(&other, stranger, lease, "n1")),
        Some(ErrorCode::NotPermitted)
    );
    // An objector, and a number the hub does not know: the same answer.
    let objector = hub
        .patients
        .iter()
        .find(|p| !p.shareable())
        .map(|p| p.nhs_number().digits())
        .unwrap();
    let a = lookup(&device, &objector, lease, "n1");
    let b = lookup(&device, "9990000018", lease, "n1");
    assert_eq!((a.0, code(&a)), (404, Some(ErrorCode::NotAvailable)));
    assert_eq!((b.0, code(&b)), (404, Some(ErrorCode::NotAvailable)));
    let (Message::Error(ea), Message::Error(eb)) = (&a.1, &b.1) else {
        unreachable!()
    };
    assert_eq!(
        ea.message, eb.message,
        "a refusal says nothing about the patient"
    );
    // Granted: a lease for the patient alone, for n1, with the record; reviewed.
    let (status, msg) = lookup(&device, stranger, lease, "n1");
    let Message::LookupGranted(g) = msg else {
        panic!("{status} {msg:?}")
    };
    assert_eq!(g.record.nhs_number.digits(), *stranger);
    assert_eq!(g.lease.patients.len(), 1);
    assert_eq!(
        g.lease.not_after.as_millis() - g.lease.not_before.as_millis(),
        12 * 3_600_000
    );
    let (_, body) = hub.admin("GET", "/admin/v1/lookups", None);
    assert_eq!(body["flagged"], 1);
    assert_eq!(body["lookups"][0]["device"], device.id.as_str());
    // The device's next round offers the record rather than sending it again.
    let round = device.pull_all(None, MIN_BUDGET);
    assert!(
        round
            .iter()
            .any(|b| b.leases.iter().any(|l| l.lease_id() == g.lease.id))
    );
    // A lookup framed as version 4 is not a message version 4 has.
    let mut v4 = encode_version(
        &Message::Lookup(Lookup {
            nhs_number: NhsNumber::parse(stranger).unwrap(),
            lease: LeaseId(lease),
            staff: StaffId::new("n1").unwrap(),
            reason: Text::new("x").unwrap(),
        }),
        Compression::None,
        5,
    )
    .unwrap();
    v4[5] = 4;
    let a = post_raw(
        &device.agent,
        &hub.url("/ccsp/v1/lookup"),
        carecache_hub::server::FRAME_CONTENT_TYPE,
        &v4,
        1 << 20,
    );
    assert_eq!(code(&a), Some(ErrorCode::Malformed));
}
