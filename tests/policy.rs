//! Local policy against a real hub: trusted time, lease expiry and the offline limit
//! enforced with no network, objections and their withdrawal, emergency access, views,
//! remote wipe, and reconciliation against the allowed-set digest.

use std::time::Duration;

use carecache::clock::Clock;
use carecache::device::DeviceError;
use carecache::policy::{Denial, EndReason, Purpose, open};
use carecache_hub::server::Tamper;
use serde_json::json;
use sync_protocol::NhsNumber;
use sync_protocol::types::StaffId;

use crate::device_harness::{Dev, HOUR, T0, TestHub, first_n, grant, shareable};

fn staff(s: &str) -> StaffId {
    StaffId::new(s).unwrap()
}

fn decide(dev: &Dev, user: &str, purpose: &Purpose, nhs: &NhsNumber) -> Result<(), Denial> {
    let policy = dev.device.policy();
    policy
        .decide(
            dev.device.store(),
            dev.device.now(),
            &staff(user),
            purpose,
            nhs,
        )
        .unwrap()
        .map(|_| ())
}

#[test]
fn device_clock_set_back_a_day_does_not_extend_the_lease() {
    let hub = TestHub::start(30, 21);
    let dev = Dev::enrolled(&hub);
    let patients = shareable(&hub, 30);
    // Ends at 10:00, two hours after T0.
    grant(
        &hub,
        &dev.id(),
        &patients,
        json!({ "not_after": "2026-11-24T10:00:00Z" }),
    );
    dev.sync().unwrap();
    assert_eq!(
        decide(&dev, "nurse1", &Purpose::Treat, &patients[0]),
        Ok(())
    );
    // Someone sets the tablet's clock back 24 hours; an hour passes (the daemon ticks),
    // the tablet reboots with its clock still wrong, and another hour and a minute pass.
    dev.clock.set_wall(T0 - 24 * 3_600_000);
    dev.clock.advance(HOUR);
    assert!(dev.device.tick().unwrap().ended.is_empty());
    let dev = dev.restart();
    dev.clock.advance(HOUR + Duration::from_secs(60));
    assert!(
        dev.device.now().as_millis() >= T0 + 2 * 3_600_000,
        "trusted time ran on"
    );
    assert!(
        dev.clock.wall_ms() < T0,
        "while the wall clock says yesterday"
    );
    let report = dev.device.tick().unwrap();
    assert_eq!(report.ended.len(), 1);
    assert_eq!(report.ended[0].1, EndReason::Expired);
    assert_eq!(report.purged, patients.len());
    assert!(dev.held().is_empty(), "purged within the tick");
    assert_eq!(
        decide(&dev, "nurse1", &Purpose::Treat, &patients[0]),
        Err(Denial::AccessEnded(EndReason::Expired))
    );
}

#[test]
fn trusted_time_survives_a_restart_with_the_clock_set_back() {
    let hub = TestHub::start(5, 22);
    let dev = Dev::enrolled(&hub);
    dev.clock.advance(5 * HOUR);
    dev.device.tick().unwrap();
    let high = dev.device.now();
    dev.clock.set_wall(T0 - 86_400_000);
    let dev = dev.restart();
    assert!(dev.device.now() >= high);
}

#[test]
fn lease_ends_within_one_tick_with_no_network_and_offline_limit_applies() {
    let mut hub = TestHub::start(40, 23);
    let dev = Dev::enrolled(&hub);
    let all = shareable(&hub, 40);
    let (a, b) = all.split_at(20);
    // Lease A ends at 09:00; lease B allows only 2 h without contact.
    grant(
        &hub,
        &dev.id(),
        a,
        json!({ "not_after": "2026-11-24T09:00:00Z" }),
    );
    grant(&hub, &dev.id(), b, json!({ "max_offline_secs": 7200 }));
    dev.sync().unwrap();
    hub.stop();
    dev.clock.advance(HOUR - Duration::from_secs(1));
    assert!(dev.device.tick().unwrap().ended.is_empty());
    assert_eq!(decide(&dev, "n", &Purpose::Treat, &a[0]), Ok(()));
    dev.clock.advance(Duration::from_secs(1));
    // Denied at once, before any tick ...
    assert_eq!(
        decide(&dev, "n", &Purpose::Treat, &a[0]),
        Err(Denial::AccessEnded(EndReason::Expired))
    );
    // ... and purged by the tick, offline.
    let r = dev.device.tick().unwrap();
    assert_eq!(r.ended.len(), 1);
    assert_eq!(dev.held().len(), b.len());
    assert!(matches!(dev.sync(), Err(DeviceError::Transport(e)) if e.is_offline()));
    dev.clock.advance(HOUR);
    let r = dev.device.tick().unwrap();
    assert_eq!(r.ended, vec![(r.ended[0].0, EndReason::OfflineTooLong)]);
    assert!(dev.held().is_empty());
    assert_eq!(
        decide(&dev, "n", &Purpose::Treat, &b[0]),
        Err(Denial::AccessEnded(EndReason::OfflineTooLong))
    );
    let status = dev.device.status().unwrap();
    assert!(status.leases.is_empty() && status.ended_leases.len() == 2);
}

#[test]
fn objection_purges_and_refuses_on_next_sync_and_withdrawal_restores() {
    let hub = TestHub::start(40, 24);
    let dev = Dev::enrolled(&hub);
    let lease: Vec<_> = hub
        .patients
        .iter()
        .filter(|p| p.shareable())
        .take(20)
        .collect();
    let nhs: Vec<NhsNumber> = lease.iter().map(|p| p.nhs_number()).collect();
    grant(&hub, &dev.id(), &nhs, json!({}));
    dev.sync().unwrap();
    let target = lease[3];
    assert!(
        dev.device
            .store()
            .record(&target.nhs_number())
            .unwrap()
            .is_some()
    );
    hub.consent(&target.fhir_id, "active", "2026-11-24T08:30:00Z");
    dev.sync().unwrap();
    let store = dev.device.store();
    assert!(
        store.record(&target.nhs_number()).unwrap().is_none(),
        "purged"
    );
    assert!(store.objected(&target.nhs_number()).unwrap());
    // The lease still names the patient; the objection wins, for emergencies too.
    assert!(
        dev.device.policy().leases()[0]
            .patients
            .contains(&target.nhs_number())
    );
    assert_eq!(
        decide(&dev, "n", &Purpose::Treat, &target.nhs_number()),
        Err(Denial::Objected)
    );
    assert_eq!(
        decide(
            &dev,
            "n",
            &Purpose::Emergency("collapsed".into()),
            &target.nhs_number()
        ),
        Err(Denial::Objected)
    );
    assert_eq!(dev.held().len(), nhs.len() - 1);
    // A hub that sends the objected patient's record again is refused whole.
    let record = target.expected.clone();
    hub.hub
        .dangerous_set_response_hook(Some(std::sync::Arc::new(move |route, bytes| {
            use sync_protocol::{Compression, Message, decode, encode};
            let Ok(Message::Batch(mut b)) = decode(bytes) else {
                return Tamper::Pass;
            };
            if route == "pull" {
                let mut v = b.upserts.into_inner();
                v.push(record.clone());
                b.upserts = sync_protocol::types::BoundedVec::try_from(v).unwrap();
            }
            Tamper::Replace(encode(&Message::Batch(b), Compression::Zstd).unwrap())
        })));
    let cursor = dev.device.store().cursor().unwrap();
    let err = dev.sync().unwrap_err();
    assert!(err.to_string().contains("objected"), "{err}");
    assert!(
        dev.device
            .store()
            .record(&target.nhs_number())
            .unwrap()
            .is_none()
    );
    assert_eq!(
        dev.device.store().cursor().unwrap(),
        cursor,
        "nothing applied"
    );
    hub.hub.dangerous_set_response_hook(None);
    hub.consent(&target.fhir_id, "inactive", "2026-11-24T09:00:00Z");
    dev.sync().unwrap();
    assert!(
        dev.device
            .store()
            .record(&target.nhs_number())
            .unwrap()
            .is_some(),
        "restored"
    );
    assert_eq!(
        decide(&dev, "n", &Purpose::Treat, &target.nhs_number()),
        Ok(())
    );
}

#[test]
fn users_views_and_emergency_access() {
    let hub = TestHub::start(60, 25);
    let dev = Dev::enrolled(&hub);
    let p = shareable(&hub, 60);
    // Alice's caseload; Bob's caseload (break glass allowed); a social care caseload
    // (no break glass); all on one device.
    grant(&hub, &dev.id(), &p[0..10], json!({ "users": ["alice"] }));
    grant(
        &hub,
        &dev.id(),
        &p[10..20],
        json!({ "users": ["bob"], "emergency_access": true }),
    );
    grant(
        &hub,
        &dev.id(),
        &p[20..30],
        json!({ "users": ["carol"], "view": "social_care" }),
    );
    dev.sync().unwrap();
    let etreat = Purpose::Emergency("unconscious, no ID but address matches".into());
    assert_eq!(decide(&dev, "alice", &Purpose::Treat, &p[0]), Ok(()));
    assert_eq!(
        decide(&dev, "alice", &Purpose::Treat, &p[10]),
        Err(Denial::NotOnCaseload)
    );
    assert_eq!(
        decide(&dev, "alice", &Purpose::Emergency(" ".into()), &p[10]),
        Err(Denial::ReasonRequired)
    );
    let grant_ = dev
        .device
        .policy()
        .decide(
            dev.device.store(),
            dev.device.now(),
            &staff("alice"),
            &etreat,
            &p[10],
        )
        .unwrap()
        .unwrap();
    assert!(grant_.emergency(), "flagged for review");
    assert_eq!(
        decide(&dev, "alice", &etreat, &p[20]),
        Err(Denial::EmergencyNotPermitted)
    );
    // Someone no lease names gets nothing, even with a reason.
    assert_eq!(
        decide(&dev, "mallory", &etreat, &p[10]),
        Err(Denial::NotOnCaseload)
    );
    // Views: social care sees alerts and contacts, never allergies or medications.
    let policy = dev.device.policy();
    let store = dev.device.store();
    let now = dev.device.now();
    let social = policy
        .decide(store, now, &staff("carol"), &Purpose::Treat, &p[20])
        .unwrap()
        .unwrap();
    let shown = open(store, social).unwrap().unwrap();
    assert!(shown.clinical.is_none());
    let clinical = policy
        .decide(store, now, &staff("alice"), &Purpose::Treat, &p[0])
        .unwrap()
        .unwrap();
    assert!(open(store, clinical).unwrap().unwrap().clinical.is_some());
}

#[test]
fn revocation_on_the_hub_wipes_the_device_on_next_sync() {
    let hub = TestHub::start(30, 26);
    let dev = Dev::enrolled(&hub);
    grant(&hub, &dev.id(), &first_n(&hub, 30), json!({}));
    dev.sync().unwrap();
    assert!(!dev.held().is_empty());
    hub.revoke_device(&dev.id());
    let err = dev.sync().unwrap_err();
    assert!(matches!(err, DeviceError::Revoked), "{err}");
    assert!(dev.device.is_wiped());
    let data = dev.tmp.path().join("data");
    assert!(
        !data.join(carecache::store::KEYRING_FILE).exists(),
        "keys destroyed"
    );
    assert!(!data.exists(), "data removed");
    assert!(matches!(dev.device.status(), Err(DeviceError::Revoked)));
}

#[test]
fn holding_that_differs_from_the_allowed_set_is_reconciled() {
    let hub = TestHub::start(40, 27);
    let dev = Dev::enrolled(&hub);
    let lease = shareable(&hub, 30);
    // A caseload may name someone the shared record does not (yet) hold.
    let ghost = (999_888_000u32..)
        .filter_map(NhsNumber::from_stem)
        .find(|n| hub.patients.iter().all(|p| p.nhs_number() != *n))
        .unwrap();
    let mut named = lease.clone();
    named.push(ghost);
    grant(&hub, &dev.id(), &named, json!({}));
    dev.sync().unwrap();
    assert_eq!(dev.held().len(), lease.len());
    // Damage the holding behind the engine's back: one record at a version the hub never
    // sent, one with another patient's content, and one the hub does not allow at all.
    let store = dev.device.store();
    let mut forged = store.record(&lease[0]).unwrap().unwrap();
    forged.version.0 += 1000;
    let orphan_src = hub
        .patients
        .iter()
        .skip(30)
        .find(|p| p.shareable())
        .unwrap();
    let mut orphan = orphan_src.expected.clone();
    orphan.nhs_number = lease[1];
    let mut unknown = orphan.clone();
    unknown.nhs_number = ghost;
    store
        .put_records(&[forged.clone(), orphan, unknown])
        .unwrap();
    let s = dev.sync().unwrap();
    assert!(s.resynced, "digest mismatch forces a full resync");
    let held = store.record(&lease[0]).unwrap().unwrap();
    assert_ne!(held.version, forged.version, "hub's version restored");
    assert!(
        store.record(&ghost).unwrap().is_none(),
        "not allowed → purged"
    );
    assert_eq!(dev.held().len(), lease.len());
    // The next round is ordinary again.
    assert!(!dev.sync().unwrap().resynced);
}

/// The commands as an operator runs them: `init`, `enrol`, `sync`, `status --json`, and
/// `serve` syncing on its own until SIGTERM.
#[test]
fn enrol_sync_status_and_serve_from_the_command_line() {
    let hub = TestHub::start(80, 28);
    // Real processes use the system clock: the hub follows it, and leases are relative.
    let clock = carecache::clock::SystemClock::new();
    let now = clock.wall_ms();
    hub.set_time(now);
    let at = crate::device_harness::at;
    let window = json!({ "not_before": at(now - 3_600_000), "not_after": at(now + 8 * 3_600_000) });
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("carecache.toml");
    std::fs::write(
        &config,
        crate::device_harness::config_text(&hub, tmp.path()),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let data = tmp.path().join("data");
    let key = tmp.path().join("root.key");
    let run = crate::device_harness::run_cli;
    let (ok, _, err) = run(&[
        "init",
        "--data-dir",
        data.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["sync", "--config", cfg]);
    assert!(!ok && err.contains("not enrolled"), "{err}");
    let (ok, out, err) = run(&["enrol", "--config", cfg, "--token", &hub.token()]);
    assert!(ok && out.contains("enrolled as"), "{out}{err}");
    let (_, json_status, _) = run(&["status", "--config", cfg, "--json"]);
    let s: serde_json::Value = serde_json::from_str(&json_status).unwrap();
    let id = s["device_id"].as_str().unwrap().to_owned();
    let patients = shareable(&hub, 80);
    grant(&hub, &id, &patients, window.clone());
    let (ok, out, err) = run(&["sync", "--config", cfg]);
    assert!(ok && out.contains("synced"), "{out}{err}");
    let (ok, json_status, err) = run(&["status", "--config", cfg, "--json"]);
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&json_status).unwrap();
    assert_eq!(
        s["patients_held"].as_u64().unwrap() as usize,
        patients.len()
    );
    assert_eq!(s["leases"][0]["standing"], "active");
    assert!(s["leases"][0]["seconds_left"].as_u64().unwrap() > 0);
    assert!(s["last_error"].is_null());
    let (ok, human, _) = run(&["status", "--config", cfg]);
    assert!(
        ok && human.contains("Test caseload") && human.contains("left"),
        "{human}"
    );
    for n in &patients {
        assert!(!json_status.contains(&n.digits()) && !human.contains(&n.digits()));
    }
    // `serve` syncs on its own: a new lease arrives without `sync` being run.
    let extra = shareable(&hub, 80);
    let mut second = window.clone();
    second["label"] = json!("Second caseload");
    grant(&hub, &id, &extra[..5], second);
    // The log says when a round has finished (and never names a patient).
    let daemon = crate::device_harness::Daemon::spawn(cfg);
    let synced = daemon.wait_for("sync finished").is_some();
    let (status, log) = daemon.stop(rustix::process::Signal::TERM);
    assert!(synced, "serve did not sync: {log}");
    assert!(
        status.success(),
        "serve stops cleanly on SIGTERM: {status:?} {log}"
    );
    for n in &patients {
        assert!(!log.contains(&n.digits()), "NHS number in the log");
    }
    let (ok, out, err) = run(&["status", "--config", cfg, "--json"]);
    assert!(ok && out.contains("Second caseload"), "{out}{err}");
}
