//! Clock faults on the device (the injected clock; the daemon reads the same trait):
//! moved forward a year, and jittered both ways for a whole shift. No lease ever gives
//! access past the end the hub granted; a forward jump ends leases at once (fail-safe),
//! purges their patients and is audited; putting the clock right again brings nothing
//! back. The clock set back a day is `policy.rs`
//! (`device_clock_set_back_a_day_does_not_extend_the_lease`).

use std::time::Duration;

use carecache::policy::{Denial, EndReason, Purpose};
use rand::{Rng, SeedableRng};
use serde_json::json;
use sync_protocol::NhsNumber;
use sync_protocol::audit::{AuditEvent, LeaseEnd};
use sync_protocol::types::StaffId;

use crate::api_harness::audit_of;
use crate::device_harness::{Dev, T0, TestHub, audit_everywhere, grant, shareable};

fn decide(dev: &Dev, nhs: &NhsNumber) -> Result<(), Denial> {
    dev.device
        .policy()
        .decide(
            dev.device.store(),
            dev.device.now(),
            &StaffId::new("nurse1").unwrap(),
            &Purpose::Treat,
            nhs,
        )
        .unwrap()
        .map(|_| ())
}

const YEAR: u64 = 365 * 86_400_000;

#[test]
fn clock_forward_a_year_ends_leases_at_once_purges_and_is_audited() {
    let hub = TestHub::start(30, 51);
    let dev = Dev::enrolled(&hub);
    let patients = shareable(&hub, 30);
    grant(&hub, &dev.id(), &patients, json!({}));
    dev.sync().unwrap();
    assert_eq!(decide(&dev, &patients[0]), Ok(()));
    let before = audit_of(dev.device.store()).len();

    // The tablet's clock jumps a year ahead (a bad RTC battery, a wrong manual setting).
    dev.clock.set_wall(T0 + YEAR);
    assert_eq!(
        decide(&dev, &patients[0]),
        Err(Denial::AccessEnded(EndReason::Expired)),
        "denied at once, before any tick"
    );
    let report = dev.device.tick().unwrap();
    assert_eq!(report.ended.len(), 1);
    assert_eq!(report.ended[0].1, EndReason::Expired);
    assert_eq!(report.purged, patients.len());
    assert!(dev.held().is_empty(), "purged within the tick");
    let entries = audit_of(dev.device.store());
    let ended: Vec<_> = entries[before..]
        .iter()
        .filter_map(|(_, r)| match &r.event {
            AuditEvent::LeaseEnded { reason, purged, .. } => Some((*reason, *purged)),
            _ => None,
        })
        .collect();
    assert_eq!(
        ended,
        vec![(LeaseEnd::Expired, u32::try_from(patients.len()).unwrap())],
        "the lease end is in the audit chain"
    );
    // The clock is put right and the device restarts: trusted time does not go back,
    // nothing comes back, the lease stays ended.
    dev.clock.set_wall(T0 + 60_000);
    let dev = dev.restart();
    assert!(dev.device.now().as_millis() >= T0 + YEAR);
    assert!(dev.held().is_empty());
    assert_eq!(
        decide(&dev, &patients[0]),
        Err(Denial::AccessEnded(EndReason::Expired))
    );
}

#[test]
fn jittered_clock_never_gives_access_past_the_granted_end() {
    let hub = TestHub::start(20, 52);
    let dev = Dev::enrolled(&hub);
    let patients = shareable(&hub, 20);
    // Granted until 12:00, four hours after T0.
    let end = T0 + 4 * 3_600_000;
    grant(
        &hub,
        &dev.id(),
        &patients,
        json!({ "not_after": "2026-11-24T12:00:00Z" }),
    );
    dev.sync().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(52);
    let mut truth = T0;
    let mut last_trusted = dev.device.now().as_millis();
    let mut ended_at = None;
    let mut granted = 0;
    let mut dev = dev;
    // Six hours in 30-second steps; at each the wall clock reads the true time give or
    // take up to 15 minutes (NTP fights, a drifting RTC), and now and then the device
    // restarts with whatever its clock says.
    for step in 0..720 {
        truth += 30_000;
        dev.clock.advance(Duration::from_secs(30));
        let jitter: i64 = rng.random_range(-900_000..=900_000);
        dev.clock.set_wall(truth.saturating_add_signed(jitter));
        if step % 97 == 0 {
            dev = dev.restart();
        }
        dev.device.tick().unwrap();
        let trusted = dev.device.now().as_millis();
        assert!(
            trusted >= last_trusted,
            "step {step}: trusted time went back"
        );
        last_trusted = trusted;
        let d = decide(&dev, &patients[0]);
        if truth >= end {
            assert!(
                d.is_err(),
                "step {step}: access {} s past the end",
                (truth - end) / 1000
            );
        }
        match d {
            Ok(()) => {
                assert!(
                    ended_at.is_none(),
                    "step {step}: access came back after it ended"
                );
                granted += 1;
            }
            Err(Denial::AccessEnded(EndReason::Expired)) => {
                ended_at.get_or_insert(truth);
            }
            Err(other) => panic!("step {step}: {other:?}"),
        }
    }
    let ended_at = ended_at.expect("the lease never ended");
    // Fail-safe: it ends at most the largest forward jitter early, never late.
    assert!(
        ended_at <= end && ended_at + 900_000 >= end,
        "ended {} s early",
        (end - ended_at) / 1000
    );
    assert!(
        granted > 400,
        "access was refused while the lease ran ({granted} steps)"
    );
    assert!(dev.held().is_empty(), "purged once ended");
}

/// The clock corrections in the device's audit, as the hub holds it (uploaded at the end
/// of each sync) and as still waits on the device.
fn corrections(hub: &TestHub, dev: &Dev) -> Vec<(u64, u64, u32)> {
    audit_everywhere(hub, dev)
        .into_iter()
        .filter_map(|r| match r.event {
            AuditEvent::ClockCorrected {
                from,
                to,
                leases_reopened,
            } => Some((from.as_millis(), to.as_millis(), leases_reopened)),
            _ => None,
        })
        .collect()
}

/// HAZ-10: a forward jump ends every lease (fail-safe), and the next contact with the
/// hub puts trusted time right from the hub's nonce-bound time — though the tablet's
/// clock is still a year ahead — asks for the ended leases again and gets the caseload
/// back, without re-enrolment; the correction is audited and survives a restart.
#[test]
fn a_forward_jump_is_corrected_at_the_next_sync_without_re_enrolment() {
    let hub = TestHub::start(30, 53);
    let dev = Dev::enrolled(&hub);
    let patients = shareable(&hub, 30);
    grant(&hub, &dev.id(), &patients, json!({}));
    dev.sync().unwrap();
    dev.clock.set_wall(T0 + YEAR);
    dev.device.tick().unwrap();
    assert!(dev.held().is_empty(), "the jump ended the lease");

    // The clock stays wrong (a bad RTC); the hub is reached.
    dev.sync().unwrap();
    let now = dev.device.now().as_millis();
    assert!(
        (T0..T0 + 120_000).contains(&now),
        "trusted time is the hub's again: {} s after T0",
        (now - T0) / 1000
    );
    let c = corrections(&hub, &dev);
    assert_eq!(c.len(), 1, "{c:?}");
    assert!(
        c[0].0 >= T0 + YEAR && c[0].1 < T0 + 120_000 && c[0].2 == 1,
        "{c:?}"
    );
    assert_eq!(dev.held().len(), patients.len(), "the caseload is back");
    assert_eq!(decide(&dev, &patients[0]), Ok(()));

    // A restart with the wall clock still a year ahead keeps the correction.
    let dev = dev.restart();
    assert!(dev.device.now().as_millis() < T0 + 180_000);
    dev.device.tick().unwrap();
    assert_eq!(decide(&dev, &patients[0]), Ok(()), "no lease ended again");
    // And a later sync with the hub at the same time changes nothing more.
    dev.sync().unwrap();
    assert_eq!(corrections(&hub, &dev).len(), 1);
    assert_eq!(dev.held().len(), patients.len());

    // Someone repairs the clock while the tablet is off for a day: trusted time, still
    // discounting the old error, lags the hub by a day — a hub that far ahead agrees
    // with the repaired clock, so it corrects trusted time forward rather than leave the
    // device refusing it for ever.
    const DAY_MS: u64 = 86_400_000;
    dev.clock.set_wall(T0 + DAY_MS);
    hub.set_time(T0 + DAY_MS);
    let dev = dev.restart();
    assert!(dev.device.now().as_millis() < T0 + 180_000, "lagging");
    dev.sync().unwrap();
    assert!(dev.device.now().as_millis() >= T0 + DAY_MS);
    assert_eq!(corrections(&hub, &dev).len(), 2);
    dev.clock.advance(Duration::from_secs(3600));
    assert!(
        dev.device.now().as_millis() >= T0 + DAY_MS + 3_600_000,
        "the repaired wall clock counts again"
    );
}

/// The correction takes only the hub's time bound to this round's nonce: a checkin
/// answer recorded earlier and replayed (or any other nonce) is refused, trusted time
/// stays ahead and access stays ended; offline, nothing changes either.
#[test]
fn a_replayed_checkin_answer_does_not_move_the_clock() {
    use carecache_hub::server::Tamper;
    use std::sync::{Arc, Mutex};
    let hub = TestHub::start(10, 54);
    let dev = Dev::enrolled(&hub);
    let patients = shareable(&hub, 10);
    grant(&hub, &dev.id(), &patients, json!({}));
    let recorded: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
    let keep = Arc::clone(&recorded);
    hub.hub
        .dangerous_set_response_hook(Some(Arc::new(move |route, bytes| {
            if route == "checkin" {
                let mut slot = keep.lock().unwrap();
                match slot.as_ref() {
                    None => *slot = Some(bytes.to_vec()),
                    Some(old) => return Tamper::Replace(old.clone()),
                }
            }
            Tamper::Pass
        })));
    dev.sync().unwrap();
    assert!(recorded.lock().unwrap().is_some(), "a checkin was answered");
    dev.clock.set_wall(T0 + YEAR);
    dev.device.tick().unwrap();
    let err = dev.sync().unwrap_err();
    assert!(err.to_string().contains("nonce"), "{err}");
    assert!(dev.device.now().as_millis() >= T0 + YEAR, "not moved back");
    assert!(corrections(&hub, &dev).is_empty());
    assert!(dev.held().is_empty());

    // The hub answers for itself again: corrected.
    hub.hub.dangerous_set_response_hook(None);
    dev.sync().unwrap();
    assert_eq!(corrections(&hub, &dev).len(), 1);
    assert_eq!(dev.held().len(), patients.len());
}
