//! The audit sink: duplicates acknowledged without storing twice, gaps refused with the
//! expected sequence, a tampered entry refused and the device flagged; export as FHIR.

use sync_protocol::audit::{
    Access, AuditAction, AuditEntry, AuditEvent, AuditOutcome, AuditRecord, DenyReason, Purpose,
};
use sync_protocol::message::{ErrorCode, Message, PushAudit};
use sync_protocol::types::{BoundedVec, Bytes, Hash32, StaffId, Text, Timestamp};

use crate::harness::{T0, TestDevice, TestHub};

fn record(i: u64, hub: &TestHub) -> AuditRecord {
    AuditRecord {
        at: Timestamp::from_millis(T0 + i * 1000).unwrap(),
        wall: Timestamp::from_millis(T0 + i * 1000).unwrap(),
        event: AuditEvent::Access(Access {
            request_id: i,
            client: Text::new("epcr").unwrap(),
            user: Some(StaffId::new("P1234").unwrap()),
            role: Some(Text::new("paramedic").unwrap()),
            purpose: Some(if i.is_multiple_of(7) {
                Purpose::EmergencyTreat {
                    reason: Text::new("unconscious, no lease").unwrap(),
                }
            } else {
                Purpose::Treat
            }),
            action: AuditAction::ReadSummary,
            patient: Some(hub.patients[(i as usize) % hub.patients.len()].nhs_number()),
            listed: BoundedVec::default(),
            lease: None,
            view: None,
            shown: BoundedVec::default(),
            withheld: 0,
            outcome: if i.is_multiple_of(5) {
                AuditOutcome::Denied(DenyReason::NotOnCaseload)
            } else {
                AuditOutcome::Served
            },
        }),
    }
}

/// A device's chain of `n` entries.
fn chain(n: u64, hub: &TestHub) -> Vec<AuditEntry> {
    let mut prev = Hash32([0; 32]);
    (1..=n)
        .map(|i| {
            let e = AuditEntry::seal(&prev, i, &record(i, hub)).unwrap();
            prev = e.hash;
            e
        })
        .collect()
}

fn push(device: &TestDevice, entries: &[AuditEntry], prev: Hash32) -> (u16, Message) {
    let msg = Message::PushAudit(
        PushAudit::new(prev, BoundedVec::try_from(entries.to_vec()).unwrap()).unwrap(),
    );
    device.send("/ccsp/v1/audit", &msg)
}

fn prev_of(entries: &[AuditEntry], first: usize) -> Hash32 {
    if first == 0 {
        Hash32([0; 32])
    } else {
        entries[first - 1].hash
    }
}

#[test]
fn duplicates_gaps_and_tampering() {
    let hub = TestHub::start(20);
    let device = hub.enrol(None);
    let entries = chain(30, &hub);

    let (status, msg) = push(&device, &entries[..10], prev_of(&entries, 0));
    assert_eq!(status, 200);
    assert!(matches!(msg, Message::AuditAck(a) if a.durable_through == 10));
    // The ack was lost: the device resends 5..=12 (overlap): accepted, stored once.
    let (_, msg) = push(&device, &entries[4..12], prev_of(&entries, 4));
    assert!(
        matches!(msg, Message::AuditAck(a) if a.durable_through == 12),
        "{msg:?}"
    );
    // A gap: entries 15.. while the hub holds through 12.
    let (status, msg) = push(&device, &entries[14..20], prev_of(&entries, 14));
    assert_eq!(status, 400);
    let Message::Error(e) = msg else { panic!() };
    assert_eq!(e.code, ErrorCode::AuditGap);
    assert!(
        e.message.as_str().contains("expected sequence 13"),
        "{}",
        e.message.as_str()
    );
    // Hello reports where to resume.
    let Message::Welcome(w) = device.hello().1 else {
        panic!()
    };
    assert_eq!(w.audit_durable_through, 12);
    let stored = hub.hub.state.for_each_audit(|_| Ok(())).unwrap();
    assert_eq!(stored, 12, "each (device, seq) stored once");

    // Tampered: entry 13's record altered after sealing (hash no longer matches).
    let mut bad = entries[12..16].to_vec();
    let mut altered = bad[0].record.as_slice().to_vec();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    bad[0].record = Bytes::try_from(altered).unwrap();
    let (status, msg) = push(&device, &bad, prev_of(&entries, 12));
    assert_eq!(status, 400);
    assert!(
        matches!(&msg, Message::Error(e) if e.code == ErrorCode::AuditChainBroken),
        "{msg:?}"
    );
    // Flagged, and nothing after the break is accepted, even a correct push.
    let (_, status_json) = hub.admin("GET", "/admin/v1/status", None);
    assert_eq!(
        status_json["flagged_devices"][0]["device"],
        device.id.as_str()
    );
    assert_eq!(status_json["flagged_devices"][0]["broken_at"], 13);
    let (_, msg) = push(&device, &entries[12..16], prev_of(&entries, 12));
    assert!(matches!(&msg, Message::Error(e) if e.code == ErrorCode::AuditChainBroken));
    assert_eq!(hub.hub.state.for_each_audit(|_| Ok(())).unwrap(), 12);
}

/// A replayed entry whose hash differs from the one stored (rewritten history) breaks
/// the chain; another device's chain is unaffected.
#[test]
fn rewritten_history_is_refused_and_devices_are_independent() {
    let hub = TestHub::start(10);
    let a = hub.enrol(None);
    let b = hub.enrol(None);
    let entries = chain(8, &hub);
    assert_eq!(push(&a, &entries, prev_of(&entries, 0)).0, 200);
    assert_eq!(push(&b, &entries[..3], prev_of(&entries, 0)).0, 200);
    // A different but self-consistent chain for the same sequence numbers.
    let mut prev = Hash32([0; 32]);
    let forged: Vec<AuditEntry> = (1..=4)
        .map(|i| {
            let mut r = record(i, &hub);
            r.wall = Timestamp::from_millis(T0 + 1000 + i).unwrap();
            let e = AuditEntry::seal(&prev, i, &r).unwrap();
            prev = e.hash;
            e
        })
        .collect();
    let (_, msg) = push(&a, &forged, Hash32([0; 32]));
    assert!(matches!(&msg, Message::Error(e) if e.code == ErrorCode::AuditChainBroken));
    let (status, msg) = push(&b, &entries[3..], prev_of(&entries, 3));
    assert_eq!(status, 200);
    assert!(matches!(msg, Message::AuditAck(x) if x.durable_through == 8));
}

/// Export: one FHIR AuditEvent per entry, valid by the validator, ETREAT marked, denied
/// accesses with outcome 4.
#[test]
fn export_is_valid_fhir_audit_event_ndjson() {
    let hub = TestHub::start(10);
    let device = hub.enrol(None);
    let entries = chain(21, &hub);
    assert_eq!(push(&device, &entries, prev_of(&entries, 0)).0, 200);
    let out = hub.dir.path().join("AuditEvent.ndjson");
    let mut text = String::new();
    let n = hub
        .hub
        .state
        .for_each_audit(|e| {
            text.push_str(&carecache_hub::export::audit_event(&e).to_string());
            text.push('\n');
            Ok(())
        })
        .unwrap();
    assert_eq!(n, 21);
    std::fs::write(&out, &text).unwrap();
    let (ok, report) = crate::harness::validate(&[out]);
    assert!(ok, "{report}");
    assert_eq!(
        text.matches("\"ETREAT\"").count(),
        3 * 2,
        "3 emergency entries (purpose twice each)"
    );
    assert_eq!(text.matches("\"outcome\":\"4\"").count(), 4);
}
