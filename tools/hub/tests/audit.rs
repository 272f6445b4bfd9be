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

/// A `hub.toml` for the commands that read the database of a stopped test hub (its
/// listen address is one nothing answers on).
fn hub_toml(dir: &std::path::Path) -> std::path::PathBuf {
    hub_toml_listening(dir, "127.0.0.1:1")
}

/// A `hub.toml` of the test hub in `dir` listening on `listen`.
fn hub_toml_listening(dir: &std::path::Path, listen: &str) -> std::path::PathBuf {
    carecache_hub::testing::write_hub_toml(
        dir,
        dir,
        &dir.join("ndjson"),
        &format!("listen = \"{listen}\""),
    )
}

fn hub_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_carecache-hub"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env(
            "CARECACHE_HUB_PRIVACY_TOKEN",
            carecache_hub::testing::PRIVACY_TOKEN,
        )
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

    let (ok, _, err) = hub_cli(&["audit", "review", "--config", cfg]);
    assert!(!ok, "who is reading must be named");
    assert!(err.contains("--officer"), "{err}");
    let (ok, out, err) = hub_cli(&[
        "audit",
        "review",
        "--config",
        cfg,
        "--officer",
        "P. Officer",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("{}  broken at sequence 9", b.id)),
        "{out}"
    );
    // ETREAT: i multiple of 7 → a: 7, 14, 21; b: 7.
    assert!(out.contains("4 emergency accesses"), "{out}");
    assert_eq!(out.matches("unconscious, no lease").count(), 4, "{out}");
    assert!(out.contains(&format!("{}#14", a.id)), "{out}");

    let (ok, out, err) = hub_cli(&[
        "audit",
        "patient",
        &nhs.digits(),
        "--config",
        cfg,
        "--officer",
        "P. Officer",
    ]);
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
        "--officer",
        "P. Officer",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 4);
    let file = closed.dir.path().join("AuditEvent.ndjson");
    std::fs::write(&file, &out).unwrap();
    let (valid, report) = crate::harness::validate(&[file]);
    assert!(valid, "{report}");

    let (ok, _, err) = hub_cli(&[
        "audit",
        "patient",
        "9990000019",
        "--config",
        cfg,
        "--officer",
        "P. Officer",
    ]);
    assert!(!ok);
    assert!(err.contains("not a valid NHS number"), "{err}");

    // Each view is in the officers' log: who, from where, what (the patient's number).
    let (ok, out, err) = hub_cli(&["audit", "officer-log", "--config", cfg, "--officer", "Q"]);
    assert!(ok, "{err}");
    let log: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actions: Vec<&str> = log.iter().map(|l| l["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        ["review", "patient-history", "patient-history"],
        "{out}"
    );
    assert!(
        log.iter()
            .all(|l| l["officer"] == "P. Officer" && l["from"] == "cli"),
        "{out}"
    );
    assert_eq!(log[1]["nhs_number"], nhs.to_string());
    assert_eq!(log[1]["accesses"], 4);
    assert_eq!(log[0]["emergency"], 4);
}

/// Another self-consistent chain of `n` entries for the same sequence numbers (a device
/// restored from an old copy that wrote on from there, say): not the one the hub holds.
fn diverging(n: u64, hub: &TestHub) -> Vec<AuditEntry> {
    let mut prev = Hash32([0; 32]);
    (1..=n)
        .map(|i| {
            let mut r = record(i, hub);
            r.wall = Timestamp::from_millis(T0 + 500 + i).unwrap();
            let e = AuditEntry::seal(&prev, i, &r).unwrap();
            prev = e.hash;
            e
        })
        .collect()
}

/// The privacy officer's routes while the hub runs: the review, a patient's history and
/// the export need the privacy officer's token (not the admin token) and a name; each
/// is logged. Clearing a device's audit flag needs a reason; afterwards the device's
/// next entries are accepted, the chain rejoined where they start, and the stored chain
/// still verifies end to end.
#[test]
fn privacy_officer_routes_and_a_cleared_flag() {
    use carecache_hub::testing::{ADMIN_TOKEN, PRIVACY_TOKEN};
    let hub = TestHub::start(10);
    let a = hub.enrol(None);
    let b = hub.enrol(None);
    let entries = chain(21, &hub);
    assert_eq!(push(&a, &entries, prev_of(&entries, 0)).0, 200);
    assert_eq!(push(&b, &entries[..8], prev_of(&entries, 0)).0, 200);
    // b's copy went its own way: its 9 does not follow the 8 the hub holds. Flagged at 9.
    let own = diverging(21, &hub);
    let (status, _) = push(&b, &own[8..], prev_of(&own, 8));
    assert_eq!(status, 400);

    let review = "/admin/v1/audit/review";
    assert_eq!(
        hub.officer_get(review, ADMIN_TOKEN, Some("A. Admin")).0,
        401,
        "not the admin token"
    );
    assert_eq!(
        hub.officer_get(review, "guess-guess-guess", Some("X")).0,
        401
    );
    let (status, body) = hub.officer_get(review, PRIVACY_TOKEN, None);
    assert_eq!(status, 400, "a name is required: {body}");
    let (status, body) = hub.officer_get(review, PRIVACY_TOKEN, Some("P. Officer"));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["flagged"][0]["device"], b.id.as_str());
    assert_eq!(v["flagged"][0]["broken_at"], 9);
    // ETREAT: multiples of 7 → a: 7, 14, 21; b: 7.
    assert_eq!(v["emergency"].as_array().unwrap().len(), 4, "{body}");
    assert!(
        v["emergency"][0]["text"]
            .as_str()
            .unwrap()
            .contains("unconscious, no lease")
    );
    assert_eq!(v["emergency"][0]["event"]["resourceType"], "AuditEvent");

    let nhs = hub.patients[1].nhs_number();
    let path = format!("/admin/v1/audit/patients/{}", nhs.digits());
    let (status, body) = hub.officer_get(&path, PRIVACY_TOKEN, Some("P. Officer"));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["accesses"].as_array().unwrap().len(),
        4,
        "a: 1, 11, 21; b: 1"
    );
    assert_eq!(v["devices"], 2);
    let (status, _) = hub.officer_get(
        "/admin/v1/audit/patients/9990000019",
        PRIVACY_TOKEN,
        Some("P"),
    );
    assert_eq!(status, 422, "not a valid NHS number");

    let (status, body) =
        hub.officer_get("/admin/v1/audit/export", PRIVACY_TOKEN, Some("P. Officer"));
    assert_eq!(status, 200);
    let ids: Vec<String> = body
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 21 + 8);
    assert!(ids.contains(&format!("{}-21", a.id)) && ids.contains(&format!("{}-8", b.id)));

    // Clearing the flag.
    let clear = format!("/admin/v1/devices/{}/clear-audit-flag", b.id);
    let why = serde_json::json!({ "officer": "P. Officer", "reason": "Tablet restored from a week-old image after a fault; ticket 5120" });
    assert_eq!(
        hub.admin("POST", &clear, Some(why.clone())).0,
        401,
        "not the admin token"
    );
    let short = serde_json::json!({ "officer": "P. Officer", "reason": "ok" });
    assert_eq!(
        hub.admin_as("POST", &clear, Some(short), PRIVACY_TOKEN).0,
        422
    );
    let not_flagged = format!("/admin/v1/devices/{}/clear-audit-flag", a.id);
    assert_eq!(
        hub.admin_as("POST", &not_flagged, Some(why.clone()), PRIVACY_TOKEN)
            .0,
        404
    );
    let (status, body) = hub.admin_as("POST", &clear, Some(why.clone()), PRIVACY_TOKEN);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["broken_at"], 9);
    assert_eq!(
        hub.admin_as("POST", &clear, Some(why), PRIVACY_TOKEN).0,
        404,
        "cleared once"
    );

    // b sends all it holds (its own 1–21): 1–8 acknowledged as held (the hub keeps
    // what it stored), 9–21 stored, the chain rejoined at 9.
    let (status, msg) = push(&b, &own, prev_of(&own, 0));
    assert_eq!(status, 200, "{msg:?}");
    assert!(
        matches!(msg, Message::AuditAck(x) if x.durable_through == 21),
        "{msg:?}"
    );
    assert_eq!(hub.hub.state.verify_audit_chain(&b.id).unwrap(), Ok(21));
    assert!(hub.hub.state.flagged_devices().unwrap().is_empty());
    // A break after the rejoin flags it again.
    let more = chain(23, &hub);
    let (status, _) = push(&b, &more[21..], more[20].hash);
    assert_eq!(status, 400);
    assert_eq!(
        hub.hub.state.flagged_devices().unwrap(),
        [(b.id.clone(), 22)]
    );

    // The officers' log: the views and the clearance, with who, where from and why.
    assert_eq!(
        hub.officer_get("/admin/v1/audit/officer-log", "nope-nope-nope-nope", None)
            .0,
        401
    );
    let (status, body) = hub.admin("GET", "/admin/v1/audit/officer-log", None);
    assert_eq!(status, 200, "the admin token reads the officers' log");
    let log = body["entries"].as_array().unwrap();
    let actions: Vec<&str> = log.iter().map(|l| l["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        ["review", "patient-history", "export", "clear-audit-flag"],
        "{body}"
    );
    assert!(
        log.iter()
            .all(|l| l["officer"] == "P. Officer" && l["from"] == "127.0.0.1"),
        "{body}"
    );
    assert_eq!(log[2]["entries"], 29);
    assert_eq!(log[3]["device"], b.id.as_str());
    assert_eq!(log[3]["broken_at"], 9);
    assert!(log[3]["reason"].as_str().unwrap().contains("ticket 5120"));
}

/// The audit commands against a running hub: found at the config's listen address (or
/// named with `--hub`), reached with the privacy officer's token; the redb file stays
/// the running hub's.
#[test]
fn audit_commands_reach_a_running_hub() {
    let hub = TestHub::start(10);
    let a = hub.enrol(None);
    let entries = chain(14, &hub);
    assert_eq!(push(&a, &entries, prev_of(&entries, 0)).0, 200);
    let own = diverging(16, &hub);
    let (status, _) = push(&a, &own[14..], prev_of(&own, 14));
    assert_eq!(status, 400);
    let dir = tempfile::tempdir().unwrap();
    carecache_hub::testing::copy_pki(hub.dir.path(), dir.path());
    let config = hub_toml_listening(dir.path(), &hub.addr.to_string());
    let cfg = config.to_str().unwrap();
    let officer = ["--officer", "R. Officer"];

    let (ok, out, err) = hub_cli(&[&["audit", "review", "--config", cfg], &officer[..]].concat());
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("{}  broken at sequence 15", a.id)),
        "{out}"
    );
    assert!(out.contains("2 emergency accesses"), "{out}");

    let nhs = hub.patients[3].nhs_number().to_string();
    let (ok, out, err) = hub_cli(
        &[
            &["audit", "patient", &nhs, "--ndjson", "--config", cfg],
            &officer[..],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "3 and 13: {out}");

    let file = dir.path().join("export.ndjson");
    let hub_url = hub.base_url();
    let (ok, _, err) = hub_cli(
        &[
            &[
                "audit",
                "export",
                "--out",
                file.to_str().unwrap(),
                "--hub",
                &hub_url,
                "--config",
                cfg,
            ],
            &officer[..],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert!(err.contains("exported 14 audit events"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 14);

    let (ok, _, err) = hub_cli(
        &[
            &[
                "audit",
                "clear-flag",
                &a.id,
                "--reason",
                "short",
                "--config",
                cfg,
            ],
            &officer[..],
        ]
        .concat(),
    );
    assert!(!ok);
    assert!(err.contains("reason"), "{err}");
    let (ok, _, err) = hub_cli(
        &[
            &[
                "audit",
                "clear-flag",
                &a.id,
                "--reason",
                "Looked into with the crew: storage card replaced",
                "--config",
                cfg,
            ],
            &officer[..],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert!(err.contains("broken at sequence 15"), "{err}");
    assert!(hub.hub.state.flagged_devices().unwrap().is_empty());

    // Without the privacy officer's token the running hub refuses, and says why.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_carecache-hub"))
        .args([
            "audit",
            "review",
            "--config",
            cfg,
            "--officer",
            "R. Officer",
        ])
        .env(
            "CARECACHE_HUB_PRIVACY_TOKEN",
            "not-the-privacy-token-at-all",
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{out:?}"
    );

    let (ok, out, err) = hub_cli(&[
        "audit",
        "officer-log",
        "--config",
        cfg,
        "--officer",
        "R. Officer",
    ]);
    assert!(ok, "{err}");
    let actions: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["action"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        actions,
        ["review", "patient-history", "export", "clear-audit-flag"],
        "{out}"
    );
}

/// `/metrics` for the trust's monitoring: the admin token or the metrics token, not the
/// privacy officer's or none; the change-log head, patients, requests by route and
/// status, audit stored, flagged devices, devices by last contact and the last ingest's
/// age, as OpenMetrics text; no patient data.
#[test]
fn metrics_for_the_trusts_monitoring() {
    use carecache_hub::testing::{ADMIN_TOKEN, METRICS_TOKEN, PRIVACY_TOKEN};
    let hub = TestHub::start(10);
    let a = hub.enrol(None);
    let b = hub.enrol(None);
    let entries = chain(6, &hub);
    assert_eq!(push(&a, &entries, prev_of(&entries, 0)).0, 200);
    let own = diverging(6, &hub);
    assert_eq!(push(&b, &entries[..2], prev_of(&entries, 0)).0, 200);
    assert_eq!(push(&b, &own[2..], prev_of(&own, 2)).0, 400);
    assert_eq!(a.hello().0, 200);
    let (status, _) = crate::harness::post_raw(
        &a.agent,
        &hub.url("/ccsp/v1/pull"),
        carecache_hub::server::FRAME_CONTENT_TYPE,
        b"not a frame",
        1 << 20,
    );
    assert_eq!(status, 400);
    // The source read through the admin API, once from the export and once from a
    // directory that is not there.
    let source = |dir: std::path::PathBuf| {
        let weak = std::sync::Arc::downgrade(&hub.hub);
        hub.hub.set_ingest_hook(std::sync::Arc::new(move || {
            let hub = weak.upgrade().ok_or("stopped")?;
            carecache_hub::source::ingest_ndjson(
                &hub.state,
                &carecache_hub::testing::synthetic_rules(),
                &dir,
            )
            .map(|s| serde_json::to_value(s).unwrap())
            .map_err(|e| e.to_string())
        }));
    };
    source(hub.dir.path().join("not-there"));
    assert_eq!(hub.admin("POST", "/admin/v1/ingest", None).0, 502);
    source(hub.ndjson_dir());
    assert_eq!(hub.admin("POST", "/admin/v1/ingest", None).0, 200);

    let scrape = |token: &str| hub.officer_get("/metrics", token, None);
    assert_eq!(scrape("no-such-token-at-all").0, 401);
    assert_eq!(
        scrape(PRIVACY_TOKEN).0,
        401,
        "the privacy officer's token is not a scraper's"
    );
    let (status, text) = scrape(ADMIN_TOKEN);
    assert_eq!(status, 200, "{text}");
    assert!(
        text.ends_with("# EOF\n"),
        "one OpenMetrics exposition: {text}"
    );
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    let head = hub.hub.state.head().unwrap();
    assert!(head > 0);
    assert_eq!(value("carecache_hub_change_log_head"), head as f64);
    assert_eq!(value("carecache_hub_patients"), 10.0);
    assert_eq!(value("carecache_hub_flagged_devices"), 1.0);
    assert_eq!(value("carecache_hub_audit_entries_stored_total"), 8.0);
    assert_eq!(
        value(r#"carecache_hub_requests_total{route="audit",status="200"}"#),
        2.0
    );
    assert_eq!(
        value(r#"carecache_hub_requests_total{route="audit",status="400"}"#),
        1.0
    );
    assert_eq!(
        value(r#"carecache_hub_requests_total{route="hello",status="200"}"#),
        1.0
    );
    assert_eq!(
        value(r#"carecache_hub_requests_total{route="pull",status="400"}"#),
        1.0
    );
    assert_eq!(
        value(r#"carecache_hub_ingest_runs_total{outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        value(r#"carecache_hub_ingest_last_patients{kind="unchanged"}"#),
        10.0
    );
    assert!(value("carecache_hub_ingest_age_seconds") < 600.0);
    // Neither device has checked in yet.
    assert_eq!(
        value(r#"carecache_hub_devices_by_last_contact{within="never"}"#),
        2.0
    );
    for p in &hub.patients {
        assert!(
            !text.contains(&p.nhs_number().digits()),
            "no NHS numbers in metrics"
        );
    }

    // The scraper's own token reads the metrics and nothing else.
    let (status, again) = scrape(METRICS_TOKEN);
    assert_eq!(status, 200);
    assert!(again.contains("carecache_hub_change_log_head"));
    assert_eq!(
        hub.admin_as("GET", "/admin/v1/status", None, METRICS_TOKEN)
            .0,
        401
    );
    assert_eq!(
        hub.officer_get("/admin/v1/audit/review", METRICS_TOKEN, Some("M"))
            .0,
        401
    );
}
