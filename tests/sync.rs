//! Device sync against a real hub over loopback TLS: the caseload lands whole and exact,
//! and every bad answer — wrong CA, patient outside the leases, garbled or oversize
//! frames, a cut connection, a hub clock ten years out, sensitive items — is rejected
//! whole with nothing applied and the reason in status.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use carecache::device::{DeviceError, Outcome};
use carecache::sync::SyncError;
use carecache::transport::TransportError;
use carecache_hub::server::Tamper;
use carecache_hub::testing::normalised;
use serde_json::json;
use sync_protocol::codec::HEADER_LEN;
use sync_protocol::message::{Batch, MessageKind};
use sync_protocol::types::BoundedVec;
use sync_protocol::{Message, decode};

use crate::device_harness::{
    Dev, TestHub, first_n, grant, shareable, tamper_batches, with_sensitive_alert,
};

fn sorted(mut v: Vec<sync_protocol::NhsNumber>) -> Vec<sync_protocol::NhsNumber> {
    v.sort();
    v
}

fn assert_nothing_applied(dev: &Dev) {
    let store = dev.device.store();
    assert!(store.cursor().unwrap().is_none(), "no cursor committed");
    assert!(store.leases().unwrap().is_empty(), "no lease applied");
    assert!(dev.held().is_empty(), "no record applied");
}

fn last_outcome(dev: &Dev) -> Outcome {
    dev.device.status().unwrap().last_sync.unwrap().outcome
}

#[test]
fn initial_sync_holds_exactly_the_caseload_and_a_second_sync_is_empty() {
    let hub = TestHub::start(1200, 5);
    let dev = Dev::enrolled(&hub);
    let lease = first_n(&hub, 1000);
    grant(&hub, &dev.id(), &lease, json!({}));
    let mut seen = Vec::new();
    let s = dev
        .device
        .sync_once(&mut |s, _| seen.push(s.upserts))
        .unwrap();
    assert!(s.batches >= 3, "small budget → several batches: {s:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]) && seen.len() == s.batches as usize);
    assert_eq!(dev.held(), sorted(shareable(&hub, 1000)));
    let store = dev.device.store();
    for p in hub.patients.iter().take(1000) {
        let held = store.record(&p.nhs_number()).unwrap();
        match held {
            None => assert!(!p.shareable(), "shareable patient missing"),
            Some(r) => {
                assert!(
                    normalised(r) == normalised(p.expected.clone()),
                    "record differs from the source"
                );
            }
        }
    }
    let status = dev.device.status().unwrap();
    assert_eq!(status.last_sync.as_ref().unwrap().outcome, Outcome::Ok);
    assert_eq!(status.leases.len(), 1);
    // T0 is 08:00 on the 24th; the lease ends at midnight (16 h) but allows 12 h
    // offline from this contact, which comes first.
    assert_eq!(status.leases[0].seconds_left, Some(12 * 3600));
    assert_eq!(status.patients_held as usize, shareable(&hub, 1000).len());
    let again = dev.sync().unwrap();
    assert_eq!(
        (again.upserts, again.batches),
        (0, 1),
        "nothing downloaded twice"
    );
}

#[test]
fn connection_cut_mid_batch_applies_nothing_of_it_and_resumes_without_refetching() {
    let hub = TestHub::start(1500, 6);
    let dev = Dev::enrolled(&hub);
    grant(&hub, &dev.id(), &first_n(&hub, 1500), json!({}));
    let served: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let cut_at = 2;
    let s2 = served.clone();
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let c2 = cut.clone();
    hub.hub
        .dangerous_set_response_hook(Some(Arc::new(move |route, bytes| {
            if route != "pull" {
                return Tamper::Pass;
            }
            let mut v = s2.lock().unwrap();
            v.push(bytes.to_vec());
            if c2.load(Ordering::SeqCst) && v.len() == cut_at + 1 {
                return Tamper::CutAfter(bytes.len() / 2);
            }
            Tamper::Pass
        })));
    let err = dev.sync().unwrap_err();
    assert!(
        matches!(&err, DeviceError::Transport(e) if e.is_offline()),
        "{err}"
    );
    assert!(matches!(last_outcome(&dev), Outcome::Offline(_)));
    // The cut pull was sent ahead, while the second batch was being applied: the second
    // batch still commits, and the cut ends the round as if the pull had been sent after
    // it (it is not tried again). Exactly the first two batches are committed.
    let first_round = served.lock().unwrap().clone();
    assert_eq!(first_round.len(), cut_at + 1);
    let committed: Vec<Batch> = first_round[..cut_at]
        .iter()
        .map(|b| match decode(b).unwrap() {
            Message::Batch(b) => b,
            _ => unreachable!(),
        })
        .collect();
    let upserted: usize = committed.iter().map(|b| b.upserts.len()).sum();
    assert_eq!(
        dev.held().len(),
        upserted,
        "nothing of the cut batch applied"
    );
    assert_eq!(
        dev.device.store().cursor().unwrap().as_ref(),
        Some(&committed[cut_at - 1].next_cursor)
    );
    // The next round starts from the committed cursor: the cut batch again, never the
    // committed ones; the bytes received are the welcome and the checkin answer (with
    // the CA certificate to pin) plus the remaining batches.
    cut.store(false, Ordering::SeqCst);
    served.lock().unwrap().clear();
    let s = dev.sync().unwrap();
    let second_round = served.lock().unwrap().clone();
    assert_eq!(
        second_round[0], first_round[cut_at],
        "resumes at the cut batch"
    );
    for b in &first_round[..cut_at] {
        assert!(
            !second_round.contains(b),
            "a committed batch was downloaded again"
        );
    }
    let batch_bytes: usize = second_round.iter().map(Vec::len).sum();
    assert!(
        s.bytes as usize >= batch_bytes && (s.bytes as usize) < batch_bytes + 256 + 2048,
        "{} received vs {batch_bytes} in batches",
        s.bytes
    );
    assert_eq!(dev.held(), sorted(shareable(&hub, 1500)));
}

#[test]
fn hub_certificate_from_another_ca_is_refused_and_nothing_is_stored() {
    let hub = TestHub::start(40, 1);
    let impostor = TestHub::start(40, 2);
    // Enrolment against a hub whose certificate is not from the pinned CA.
    let dev = Dev::new(&hub);
    let text = std::fs::read_to_string(&dev.config_path)
        .unwrap()
        .replace(&hub.base_url(), &impostor.base_url());
    std::fs::write(&dev.config_path, text).unwrap();
    let dev = dev.restart();
    let err = dev.device.enrol(&impostor.token()).unwrap_err();
    assert!(
        matches!(err, DeviceError::Transport(TransportError::Tls(_))),
        "{err}"
    );
    assert!(
        dev.device.device_id().unwrap().is_none(),
        "no identity stored"
    );
    // An enrolled device pointed at the impostor refuses it too.
    let dev = Dev::enrolled(&hub);
    grant(&hub, &dev.id(), &first_n(&hub, 40), json!({}));
    let text = std::fs::read_to_string(&dev.config_path)
        .unwrap()
        .replace(&hub.base_url(), &impostor.base_url());
    std::fs::write(&dev.config_path, text).unwrap();
    let dev = dev.restart();
    let err = dev.sync().unwrap_err();
    assert!(
        matches!(err, DeviceError::Transport(TransportError::Tls(_))),
        "{err}"
    );
    assert_nothing_applied(&dev);
    let status = dev.device.status().unwrap();
    assert!(status.last_error.unwrap().contains("TLS"));
}

#[test]
fn batch_naming_a_patient_outside_the_leases_is_rejected_whole() {
    let hub = TestHub::start(60, 3);
    let dev = Dev::enrolled(&hub);
    grant(&hub, &dev.id(), &first_n(&hub, 30), json!({}));
    let stranger = hub.patients[45].expected.clone();
    tamper_batches(&hub, move |mut b| {
        let mut v = b.upserts.into_inner();
        v.push(stranger.clone());
        b.upserts = BoundedVec::try_from(v).unwrap();
        b
    });
    let err = dev.sync().unwrap_err();
    assert!(
        matches!(err, DeviceError::Sync(SyncError::OutsideLeases(1))),
        "{err}"
    );
    assert_nothing_applied(&dev);
    let Outcome::Rejected(why) = last_outcome(&dev) else {
        panic!("not reported as rejected");
    };
    assert!(why.contains("outside this device's leases"), "{why}");
    // The hub behaves again: the sync completes.
    hub.hub.dangerous_set_response_hook(None);
    dev.sync().unwrap();
    assert_eq!(dev.held(), sorted(shareable(&hub, 30)));
}

#[test]
fn sensitive_items_from_the_hub_are_refused_by_the_device() {
    let hub = TestHub::start(60, 4);
    let dev = Dev::enrolled(&hub);
    grant(&hub, &dev.id(), &first_n(&hub, 60), json!({}));
    tamper_batches(&hub, with_sensitive_alert);
    let err = dev.sync().unwrap_err();
    assert!(
        matches!(err, DeviceError::Sync(SyncError::Sensitive(1))),
        "{err}"
    );
    assert_nothing_applied(&dev);
}

#[test]
fn garbled_and_oversize_answers_are_rejected_with_nothing_applied() {
    let hub = TestHub::start(30, 7);
    let dev = Dev::enrolled(&hub);
    grant(&hub, &dev.id(), &first_n(&hub, 30), json!({}));
    // Garbled: a valid frame with bytes flipped in its payload.
    hub.hub
        .dangerous_set_response_hook(Some(Arc::new(|route, bytes| {
            if route != "pull" {
                return Tamper::Pass;
            }
            let mut b = bytes.to_vec();
            for x in b.iter_mut().skip(HEADER_LEN + 3).step_by(7) {
                *x ^= 0x5a;
            }
            Tamper::Replace(b)
        })));
    let err = dev.sync().unwrap_err();
    assert!(
        matches!(err, DeviceError::Transport(TransportError::Decode(_))),
        "{err}"
    );
    assert_nothing_applied(&dev);
    assert!(matches!(
        last_outcome(&dev),
        Outcome::Failed(_) | Outcome::Rejected(_)
    ));
    // Oversize: a body longer than any batch may be; the device stops reading at the cap.
    hub.hub
        .dangerous_set_response_hook(Some(Arc::new(|route, bytes| {
            if route != "pull" {
                return Tamper::Pass;
            }
            let mut b = bytes.to_vec();
            b.resize(MessageKind::Batch.max_payload() as usize + 4096, 0);
            Tamper::Replace(b)
        })));
    let err = dev.sync().unwrap_err();
    assert!(
        matches!(err, DeviceError::Transport(TransportError::TooLarge { .. })),
        "{err}"
    );
    assert_nothing_applied(&dev);
    // Trailing garbage after a valid frame.
    hub.hub
        .dangerous_set_response_hook(Some(Arc::new(|route, bytes| {
            if route != "pull" {
                return Tamper::Pass;
            }
            let mut b = bytes.to_vec();
            b.extend_from_slice(b"extra");
            Tamper::Replace(b)
        })));
    assert!(dev.sync().is_err());
    assert_nothing_applied(&dev);
    hub.hub.dangerous_set_response_hook(None);
    dev.sync().unwrap();
    assert_eq!(dev.held(), sorted(shareable(&hub, 30)));
}

#[test]
fn hub_time_ten_years_ahead_is_rejected_and_does_not_move_trusted_time() {
    let hub = TestHub::start(20, 8);
    let dev = Dev::enrolled(&hub);
    grant(&hub, &dev.id(), &first_n(&hub, 20), json!({}));
    let before = dev.device.now();
    hub.set_time(crate::device_harness::T0 + 3652 * 86_400_000);
    let err = dev.sync().unwrap_err();
    assert!(
        matches!(err, DeviceError::Sync(SyncError::HubTime(e)) if e.ahead),
        "{err}"
    );
    assert_nothing_applied(&dev);
    let after = dev.device.now();
    assert!(
        after.as_millis() - before.as_millis() < 60_000,
        "trusted time kept"
    );
    let status = dev.device.status().unwrap();
    assert!(status.last_error.unwrap().contains("ahead"));
}

/// A device still talks to a hub that speaks only protocol version 1: told so in the
/// welcome, it frames its pulls in version 1 and the hub answers in version 1. Every
/// record arrives as version 1 can carry it: each section whole, or "not available"
/// where version 1 cannot say what it holds (a local or dm+d code, no ODS code, a
/// section withheld at the patient's request) — never a shorter list.
#[test]
fn a_version_1_hub_is_still_read_and_never_shortens_a_section() {
    use sync_protocol::record::Section;
    let hub = TestHub::start(200, 9);
    let dev = Dev::enrolled(&hub);
    grant(&hub, &dev.id(), &first_n(&hub, 200), json!({}));
    hub_speaking_at_most(&hub, 1);
    dev.sync().unwrap();
    assert_eq!(dev.held(), sorted(shareable(&hub, 200)));
    fn same_or_not_available<T: PartialEq, const N: usize>(
        got: &Section<T, N>,
        want: &Section<T, N>,
    ) -> bool {
        got == want || *got == Section::NotAvailable
    }
    let store = dev.device.store();
    let (mut whole, mut not_available) = (0, 0);
    for p in hub.patients.iter().filter(|p| p.shareable()) {
        let got = normalised(store.record(&p.nhs_number()).unwrap().unwrap());
        // Version 1 has no allergy verification, medication end date or structured dose.
        let mut want = normalised(p.expected.clone());
        if let Section::Entries(items) = &want.allergies {
            let mut v = items.to_vec();
            v.iter_mut().for_each(|a| a.verification = None);
            want.allergies = Section::from_items(v).unwrap();
        }
        if let Section::Entries(items) = &want.medications {
            let mut v = items.to_vec();
            v.iter_mut().for_each(|m| {
                m.ended = None;
                m.dosage = None;
            });
            want.medications = Section::from_items(v).unwrap();
        }
        assert!(same_or_not_available(&got.alerts, &want.alerts));
        assert!(same_or_not_available(&got.allergies, &want.allergies));
        assert!(same_or_not_available(&got.medications, &want.medications));
        assert!(same_or_not_available(&got.contacts, &want.contacts));
        assert!(got.unreadable.is_empty());
        for (g, w) in [
            (
                got.alerts == want.alerts,
                want.alerts == Section::NotAvailable,
            ),
            (got.medications == want.medications, false),
        ] {
            if g {
                whole += 1;
            } else if !w {
                not_available += 1;
            }
        }
    }
    assert!(
        whole > 50 && not_available > 20,
        "{whole} whole, {not_available} not available"
    );
}

/// A hub that speaks version 2 at most: every record arrives whole but for structured
/// doses, whose words arrive in the dose text.
#[test]
fn a_version_2_hub_is_read_whole_but_for_structured_doses() {
    use sync_protocol::record::Section;
    let hub = TestHub::start(200, 9);
    let dev = Dev::enrolled(&hub);
    grant(&hub, &dev.id(), &first_n(&hub, 200), json!({}));
    hub_speaking_at_most(&hub, 2);
    dev.sync().unwrap();
    assert_eq!(dev.held(), sorted(shareable(&hub, 200)));
    let store = dev.device.store();
    let mut structured = 0;
    for p in hub.patients.iter().filter(|p| p.shareable()) {
        let got = normalised(store.record(&p.nhs_number()).unwrap().unwrap());
        let mut want = normalised(p.expected.clone());
        if let Section::Entries(items) = &want.medications {
            let mut v = items.to_vec();
            for m in &mut v {
                if m.dosage.take().is_some() {
                    structured += 1;
                    assert!(m.dose_text.is_some(), "the words of a structured dose");
                }
            }
            want.medications = Section::from_items(v).unwrap();
        }
        assert!(got == want, "a version-2 record differs");
    }
    assert!(structured > 5, "{structured} structured doses");
}

/// Makes `hub` answer every hello as a hub of protocol `version` at most would.
pub(crate) fn hub_speaking_at_most(hub: &TestHub, version: u16) {
    use sync_protocol::{Compression, Message, decode, encode};
    hub.hub
        .dangerous_set_response_hook(Some(Arc::new(move |route, bytes| {
            if route != "hello" {
                return Tamper::Pass;
            }
            match decode(bytes) {
                Ok(Message::Welcome(mut w)) => {
                    w.version = version;
                    Tamper::Replace(encode(&Message::Welcome(w), Compression::None).unwrap())
                }
                _ => Tamper::Pass,
            }
        })));
}
