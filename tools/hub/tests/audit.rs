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
pub(crate) fn chain(n: u64, hub: &TestHub) -> Vec<AuditEntry> {
    let mut prev = Hash32([0; 32]);
    (1..=n)
        .map(|i| {
            let e = AuditEntry::seal(&prev, i, &record(i, hub)).unwrap();
            prev = e.hash;
            e
        })
        .collect()
}

pub(crate) fn push(device: &TestDevice, entries: &[AuditEntry], prev: Hash32) -> (u16, Message) {
    let msg = Message::PushAudit(
        PushAudit::new(prev, BoundedVec::try_from(entries.to_vec()).unwrap()).unwrap(),
    );
    device.send("/ccsp/v1/audit", &msg)
}

pub(crate) fn prev_of(entries: &[AuditEntry], first: usize) -> Hash32 {
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

/// A `hub.toml` for the commands that read the database of a stopped test hub.
fn hub_toml(dir: &std::path::Path) -> std::path::PathBuf {
    carecache_hub::testing::write_hub_toml(dir, dir, &dir.join("ndjson"), "")
}

fn hub_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_carecache-hub"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The privacy officer's commands: `audit review` lists the flagged device and every
/// emergency access with its reason; `audit patient` lists every access to one record
/// across devices, oldest first, as text (NHS number only, no names) and as valid FHIR
/// AuditEvent NDJSON; a bad NHS number is refused.
#[test]
fn review_and_patient_commands_for_the_privacy_officer() {
    let hub = TestHub::start(10);
    let a = hub.enrol(None);
    let b = hub.enrol(None);
    let entries = chain(21, &hub);
    assert_eq!(push(&a, &entries, prev_of(&entries, 0)).0, 200);
    assert_eq!(push(&b, &entries[..8], prev_of(&entries, 0)).0, 200);
    // Device b's entry 9 arrives altered: b is flagged at 9.
    let mut bad = entries[8..10].to_vec();
    bad[0].record = entries[9].record.clone();
    assert_eq!(push(&b, &bad, prev_of(&entries, 8)).0, 400);
    assert_eq!(hub.hub.state.verify_audit_chain(&a.id).unwrap(), Ok(21));
    assert_eq!(hub.hub.state.verify_audit_chain(&b.id).unwrap(), Ok(8));
    // Patient of entries 1, 11 and 21 (10 patients, i % 10 == 1).
    let nhs = hub.patients[1].nhs_number();
    let family = hub.patients[1]
        .expected
        .demographics
        .name
        .family
        .as_str()
        .to_owned();
    let closed = hub.close();
    let config = hub_toml(closed.dir.path());
    let cfg = config.to_str().unwrap();

    let (ok, out, err) = hub_cli(&["audit", "review", "--config", cfg]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("{}  broken at sequence 9", b.id)),
        "{out}"
    );
    // ETREAT: i multiple of 7 → a: 7, 14, 21; b: 7.
    assert!(out.contains("4 emergency accesses"), "{out}");
    assert_eq!(out.matches("unconscious, no lease").count(), 4, "{out}");
    assert!(out.contains(&format!("{}#14", a.id)), "{out}");

    let (ok, out, err) = hub_cli(&["audit", "patient", &nhs.digits(), "--config", cfg]);
    assert!(ok, "{err}");
    // a: 1, 11, 21; b: 1 → four accesses from two devices, oldest first.
    assert!(out.contains("4 accesses from 2 devices"), "{out}");
    assert!(out.contains(&nhs.to_string()), "NHS number 3-3-4: {out}");
    assert!(!out.contains(&family), "no names: {out}");
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("  ")).collect();
    assert_eq!(lines.len(), 4, "{out}");
    let times: Vec<&str> = lines
        .iter()
        .map(|l| l.trim().split(' ').next().unwrap())
        .collect();
    let sorted = {
        let mut t = times.clone();
        t.sort_unstable();
        t
    };
    assert_eq!(times, sorted, "oldest first");
    assert!(
        lines[3].contains(&format!("{}#21", a.id)) && lines[3].contains("EMERGENCY (ETREAT)"),
        "{out}"
    );

    let (ok, out, err) = hub_cli(&[
        "audit",
        "patient",
        &nhs.to_string(),
        "--ndjson",
        "--config",
        cfg,
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 4);
    let file = closed.dir.path().join("AuditEvent.ndjson");
    std::fs::write(&file, &out).unwrap();
    let (valid, report) = crate::harness::validate(&[file]);
    assert!(valid, "{report}");

    let (ok, _, err) = hub_cli(&["audit", "patient", "9990000019", "--config", cfg]);
    assert!(!ok);
    assert!(err.contains("not a valid NHS number"), "{err}");
}
