//! The device certificate's life (issue 24 point 2): renewed over mutual TLS well
//! before it ends, warned of 30 days before, an ended one named with its fix and
//! recovered with a renewal token without losing audit; and a hub CA rollover — the
//! device pins old and new during the overlap, then the new alone. Certificates are
//! issued in real time (TLS checks them so), so these tests run the device and the hub
//! on the real date.

use std::time::Duration;

use serde_json::json;
use sync_protocol::audit::{AuditEvent, KeyEvent};

use crate::device_harness::{Dev, TestHub, at, audit_everywhere, grant, shareable};

const DAY: u64 = 86_400_000;

fn real_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A device enrolled with `hub` at the real date, holding a lease of 60 days on 10
/// patients.
fn enrolled_now(hub: &TestHub) -> Dev {
    let now = real_now();
    hub.set_time(now);
    let dev = Dev::new(hub);
    dev.clock.set_wall(now);
    dev.device.enrol(&hub.token()).unwrap();
    grant(
        hub,
        &dev.id(),
        &shareable(hub, 10),
        json!({ "not_before": at(now - DAY), "not_after": at(now + 60 * DAY), "max_offline_secs": 86_400 * 60 }),
    );
    dev.sync().unwrap();
    dev
}

/// Device and hub both `ms` on.
fn move_both(hub: &TestHub, dev: &Dev, to: u64) {
    hub.set_time(to);
    dev.clock.set_wall(to);
}

/// The device's key events: those uploaded to the hub, then those still waiting.
fn key_events(hub: &TestHub, dev: &Dev) -> Vec<KeyEvent> {
    audit_everywhere(hub, dev)
        .into_iter()
        .filter_map(|r| match r.event {
            AuditEvent::Key(k) => Some(k),
            _ => None,
        })
        .collect()
}

fn hub_fingerprint(hub: &TestHub, id: &str) -> [u8; 32] {
    hub.hub.state.devices().unwrap()[id].certificate_sha256
}

#[test]
fn the_certificate_renews_itself_at_two_thirds_of_its_life_after_warning() {
    let hub = TestHub::start(10, 71);
    let dev = enrolled_now(&hub);
    let id = dev.id();
    let (from, until) = dev.device.certificate_validity().unwrap().unwrap();
    let first = hub_fingerprint(&hub, &id);

    // Nineteen days on: not yet due (the test hub's certificates last 30 days, so the
    // 30-day warning is on already: eleven days left).
    let day19 = from.as_millis() + 19 * DAY;
    move_both(&hub, &dev, day19);
    dev.sync().unwrap();
    assert_eq!(
        hub_fingerprint(&hub, &id),
        first,
        "not renewed before two thirds"
    );
    let status = dev.device.status().unwrap();
    assert_eq!(
        status.certificate_not_after.as_deref(),
        Some(until.utc_seconds().as_str())
    );
    let warning = status.certificate_warning.clone().unwrap();
    assert!(warning.contains("ends in 11 d"), "{warning}");
    assert!(
        carecache::device::render_status(&status).contains("WARNING"),
        "carecache status says so"
    );

    // Past two thirds: the next sync renews (the hub now issues 60-day certificates).
    hub.hub.ca.set_validity(Duration::from_secs(60 * 86_400));
    move_both(&hub, &dev, from.as_millis() + 21 * DAY);
    dev.sync().unwrap();
    let renewed = hub_fingerprint(&hub, &id);
    assert_ne!(renewed, first, "the hub holds the new certificate");
    let (_, new_until) = dev.device.certificate_validity().unwrap().unwrap();
    assert!(new_until.as_millis() > until.as_millis() + 25 * DAY);
    assert!(dev.device.certificate_warning().is_none());
    assert!(
        key_events(&hub, &dev).contains(&KeyEvent::CertificateRenewed {
            not_after: new_until
        }),
        "audited"
    );
    // The new key and certificate work, from the store, after a restart.
    let dev = dev.restart();
    dev.sync().unwrap();
    assert_eq!(hub_fingerprint(&hub, &id), renewed, "not renewed again");
}

#[test]
fn an_ended_certificate_names_its_fix_keeps_the_audit_and_a_renewal_token_recovers() {
    let hub = TestHub::start(10, 72);
    // Certificates of ten seconds (issued five minutes back-dated, as always).
    hub.hub.ca.set_validity(Duration::from_secs(10));
    let dev = enrolled_now(&hub);
    let id = dev.id();
    let (_, until) = dev.device.certificate_validity().unwrap().unwrap();
    // The certificate's end passes (in real time too, so the hub's TLS refuses it).
    while real_now() <= until.as_millis() + 1000 {
        std::thread::sleep(Duration::from_millis(250));
    }
    move_both(&hub, &dev, real_now());
    let err = dev.sync().unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, carecache::device::DeviceError::CertificateEnded(_)),
        "{text}"
    );
    assert!(
        text.contains("renewal token") && text.contains("carecache enrol --renew"),
        "{text}"
    );
    let status = dev.device.status().unwrap();
    assert!(status.certificate_warning.unwrap().contains("ENDED"));
    let waiting = dev.device.audit_backlog().0.entries;
    assert!(waiting >= 1, "the failed round is audited and waits");

    // An enrolment token is no renewal token: nothing changes.
    hub.hub.ca.set_validity(Duration::from_secs(30 * 86_400));
    assert!(dev.device.re_enrol(&hub.token()).is_err());
    let (status_code, body) = hub.admin(
        "POST",
        &format!("/admin/v1/devices/{id}/renewal-token"),
        None,
    );
    assert_eq!(status_code, 201, "{body}");
    let token = body["token"].as_str().unwrap();
    assert_eq!(dev.device.re_enrol(token).unwrap(), id, "same device");
    assert!(dev.device.re_enrol(token).is_err(), "one use only");
    dev.sync().unwrap();
    // Everything that waited reached the hub, in one chain.
    assert_eq!(dev.device.audit_backlog().0.entries, 0);
    let head = hub.hub.state.audit_head(&id).unwrap();
    assert_eq!(hub.hub.state.verify_audit_chain(&id).unwrap(), Ok(head.seq));
    let renewed = (1..=head.seq).any(|seq| {
        matches!(
            hub.hub
                .state
                .audit_entry(&id, seq)
                .unwrap()
                .unwrap()
                .record
                .event,
            AuditEvent::Key(KeyEvent::CertificateRenewed { .. })
        )
    });
    assert!(renewed, "the re-certification is in the audit");
    assert_eq!(dev.held().len(), shareable(&hub, 10).len());
}

#[test]
fn a_hub_ca_rollover_is_pinned_in_overlap_then_the_old_ca_dropped() {
    let hub = TestHub::start(10, 73);
    let dev = enrolled_now(&hub);
    let pki = hub.dir.path().join("pki");
    let old_ca = std::fs::read_to_string(pki.join("ca.pem")).unwrap();
    // The trust makes a new CA (and a hub certificate from it).
    let next = hub.dir.path().join("pki-next");
    carecache_hub::pki::dev_ca(&next, &["localhost".into(), "127.0.0.1".into()]).unwrap();
    let new_ca = std::fs::read_to_string(next.join("ca.pem")).unwrap();

    // 1. Overlap: the hub issues from the new CA and trusts both; it still presents
    //    its certificate from the old one.
    std::fs::write(pki.join("ca.pem"), format!("{new_ca}{old_ca}")).unwrap();
    std::fs::copy(next.join("ca.key"), pki.join("ca.key")).unwrap();
    let hub = hub.restart();
    dev.sync().unwrap();
    assert!(key_events(&hub, &dev).contains(&KeyEvent::PinnedCasChanged { pinned: 2 }));

    // 2. The hub presents a certificate from the new CA: the device, pinning both,
    //    goes on; its renewal (due, once the device and hub are past two thirds) is
    //    issued by the new CA.
    std::fs::copy(next.join("hub.pem"), pki.join("hub.pem")).unwrap();
    std::fs::copy(next.join("hub.key"), pki.join("hub.key")).unwrap();
    let hub = hub.restart();
    let (from, _) = dev.device.certificate_validity().unwrap().unwrap();
    hub.hub.ca.set_validity(Duration::from_secs(60 * 86_400));
    move_both(&hub, &dev, from.as_millis() + 21 * DAY);
    dev.sync().unwrap();
    assert!(
        key_events(&hub, &dev)
            .iter()
            .any(|k| matches!(k, KeyEvent::CertificateRenewed { .. }))
    );

    // 3. The old CA is dropped: the device drops its pin, and still syncs.
    std::fs::write(pki.join("ca.pem"), &new_ca).unwrap();
    let hub = hub.restart();
    dev.sync().unwrap();
    assert!(key_events(&hub, &dev).contains(&KeyEvent::PinnedCasChanged { pinned: 1 }));
    dev.sync().unwrap();
    let _ = hub;
}
