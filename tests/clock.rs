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
use crate::device_harness::{Dev, T0, TestHub, grant, shareable};

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
