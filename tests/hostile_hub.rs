//! The hostile-hub catalogue: a device holding a committed caseload meets a hub that
//! answers every bad way in turn — malformed, the wrong kind, over the limit, cut short,
//! a patient outside the leases, a replayed old batch, a cursor from the future, an
//! objection after the data in the same batch, a sensitive-labelled record, a certificate
//! from another CA, and a slow-loris answer. Each is rejected, nothing of it is applied
//! (cursor, leases, records and trusted time exactly as before), and status says why.
//! Then the hub behaves and the device catches up.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use carecache::device::Outcome;
use carecache_hub::server::Tamper;
use serde_json::json;
use sync_protocol::message::{Batch, ObjectionChange, ObjectionStatus};
use sync_protocol::types::{BoundedVec, Timestamp};
use sync_protocol::{Compression, Message, NhsNumber, decode, encode};

use crate::device_harness::{
    Dev, T0, TestHub, first_n, grant, on_pull, shareable, tamper_batches, with_sensitive_alert,
};
use crate::fault_proxy::{FaultProxy, Mode};

/// Everything a hostile answer could change on the device.
#[derive(Debug, PartialEq)]
struct Snapshot {
    cursor: Option<Vec<u8>>,
    held: Vec<(NhsNumber, u64)>,
    leases: Vec<(u64, usize)>,
    hub_time: Option<Timestamp>,
}

fn snapshot(dev: &Dev) -> Snapshot {
    let store = dev.device.store();
    let mut held: Vec<(NhsNumber, u64)> = store
        .held_versions()
        .unwrap()
        .into_iter()
        .map(|(n, v)| (n, v.0))
        .collect();
    held.sort();
    Snapshot {
        cursor: store.cursor().unwrap().map(|c| c.as_bytes().to_vec()),
        held,
        leases: store
            .leases()
            .unwrap()
            .into_iter()
            .map(|l| (l.id.0, l.patients.len()))
            .collect(),
        hub_time: store.hub_time().unwrap(),
    }
}

/// Runs one case: the sync fails, nothing changes, status explains with `expect`.
fn case(dev: &Dev, name: &str, expect: &[&str]) -> String {
    let before = snapshot(dev);
    let trusted = dev.device.now();
    let err = dev
        .sync()
        .expect_err(&format!("{name}: the hostile answer was accepted"));
    assert_eq!(snapshot(dev), before, "{name}: something was applied");
    assert!(
        dev.device.now().as_millis() - trusted.as_millis() < 60_000,
        "{name}: trusted time moved"
    );
    let status = dev.device.status().unwrap();
    let last = status.last_sync.expect("a sync is recorded");
    let why = match &last.outcome {
        Outcome::Rejected(w) | Outcome::Failed(w) | Outcome::Offline(w) => w.clone(),
        Outcome::Ok => panic!("{name}: status says ok"),
    };
    let said = format!("{why} / {}", status.last_error.unwrap_or_default());
    assert!(
        expect.iter().any(|e| said.contains(e)),
        "{name}: status says {said:?} ({err}), expected one of {expect:?}"
    );
    said
}

#[test]
fn every_hostile_answer_is_rejected_with_nothing_applied_and_reported() {
    let hub = TestHub::start(64, 31);
    let impostor = TestHub::start(10, 32);
    let proxy = FaultProxy::start(hub.addr);
    // Short timeouts, so a slow-loris answer costs seconds; the hub is reached through
    // the proxy (pass-through except for the slow-loris case).
    let dev = Dev::with_config(&hub, |t| {
        t.replace("connect_timeout_secs = 5", "connect_timeout_secs = 1")
            .replace("read_timeout_secs = 30", "read_timeout_secs = 2")
            .replace(&hub.base_url(), &proxy.url())
    });
    dev.device.enrol(&hub.token()).unwrap();
    // A first caseload, synced; its pull answers kept for the replay.
    let kept: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let welcome: Arc<Mutex<Vec<u8>>> = Arc::default();
    {
        let (kept, welcome) = (kept.clone(), welcome.clone());
        hub.hub
            .dangerous_set_response_hook(Some(Arc::new(move |route, bytes| {
                match route {
                    "pull" => kept.lock().unwrap().push(bytes.to_vec()),
                    "hello" => *welcome.lock().unwrap() = bytes.to_vec(),
                    _ => {}
                }
                Tamper::Pass
            })));
    }
    grant(&hub, &dev.id(), &first_n(&hub, 30), json!({}));
    dev.sync().unwrap();
    hub.hub.dangerous_set_response_hook(None);
    // Ten minutes on, a sync with nothing new commits a later batch; then a second
    // caseload is granted, so every answer from here on carries data to apply.
    let later = T0 + 600_000;
    hub.set_time(later);
    dev.clock.set_wall(later);
    dev.sync().unwrap();
    grant(&hub, &dev.id(), &first_n(&hub, 60)[30..], json!({}));
    let committed = snapshot(&dev);
    assert_eq!(committed.held.len(), shareable(&hub, 30).len());

    // Malformed: bytes flipped inside a valid frame's payload.
    on_pull(&hub, |b| {
        let mut b = b.to_vec();
        for x in b.iter_mut().skip(19).step_by(5) {
            *x ^= 0xa5;
        }
        Tamper::Replace(b)
    });
    case(&dev, "malformed", &["not a valid frame"]);

    // The wrong kind: the welcome where a batch belongs.
    let w = welcome.lock().unwrap().clone();
    on_pull(&hub, move |_| Tamper::Replace(w.clone()));
    case(
        &dev,
        "wrong kind",
        &["where Batch was expected", "expected"],
    );

    // Over the limit: a body longer than any batch may be.
    on_pull(&hub, |b| {
        let mut b = b.to_vec();
        b.resize(
            sync_protocol::message::MessageKind::Batch.max_payload() as usize + 4096,
            0,
        );
        Tamper::Replace(b)
    });
    case(&dev, "over limit", &["over the size limit"]);

    // Cut short: the length promised, half the bytes sent.
    on_pull(&hub, |b| Tamper::CutAfter(b.len() / 2));
    case(&dev, "truncated", &["cut", "closed", "connection", "reset"]);

    // A patient outside the leases.
    let stranger = hub.patients[63].expected.clone();
    assert!(!first_n(&hub, 60).contains(&stranger.nhs_number));
    tamper_batches(&hub, move |mut b| {
        let mut v = b.upserts.into_inner();
        v.push(stranger.clone());
        b.upserts = BoundedVec::try_from(v).unwrap();
        b
    });
    case(
        &dev,
        "out-of-lease patient",
        &["outside this device's leases"],
    );

    // A replayed old batch: the first answer of the first sync, ten minutes old.
    let old = kept.lock().unwrap()[0].clone();
    assert!(matches!(decode(&old), Ok(Message::Batch(b)) if !b.upserts.is_empty()));
    on_pull(&hub, move |_| Tamper::Replace(old.clone()));
    case(&dev, "replayed batch", &["replayed"]);

    // A cursor from the future: a batch stamped a year ahead of trusted time.
    tamper_batches(&hub, |mut b| {
        b.hub_time = Timestamp::from_millis(b.hub_time.as_millis() + 365 * 86_400_000).unwrap();
        b
    });
    case(&dev, "cursor from the future", &["ahead of"]);

    // An objection after the data in the same batch: a patient both upserted and
    // objected to (the protocol forbids it; the bytes are patched to say it).
    on_pull(&hub, |bytes| {
        let Ok(Message::Batch(b)) = decode(bytes) else {
            return Tamper::Pass;
        };
        let Some(victim) = b.upserts.iter().next().map(|r| r.nhs_number) else {
            return Tamper::Pass;
        };
        // A valid batch objecting to a patient the batch does not carry...
        let other = NhsNumber::from_stem(999_000_001).unwrap();
        let mut objections = b.objections.clone().into_inner();
        objections.push(ObjectionChange {
            nhs_number: other,
            status: ObjectionStatus::Objected,
            recorded_at: b.hub_time,
        });
        let with = Batch::new(
            BoundedVec::try_from(objections).unwrap(),
            b.leases.clone(),
            b.upserts.clone(),
            b.removals.clone(),
            b.next_cursor.clone(),
            b.more,
            b.hub_time,
            b.allowed,
        )
        .unwrap();
        let mut frame = encode(&Message::Batch(with), Compression::None).unwrap();
        // ...then that patient's number changed, in place, to the upserted one's.
        let from = postcard::to_allocvec(&other.as_u64()).unwrap();
        let to = postcard::to_allocvec(&victim.as_u64()).unwrap();
        assert_eq!(from.len(), to.len());
        let at = frame
            .windows(from.len())
            .position(|w| w == from.as_slice())
            .unwrap();
        frame[at..at + to.len()].copy_from_slice(&to);
        Tamper::Replace(frame)
    });
    case(&dev, "objection after data", &["objected patient upserted"]);

    // A record carrying an item on the sensitive list.
    tamper_batches(&hub, with_sensitive_alert);
    case(&dev, "sensitive record", &["coded as sensitive"]);
    hub.hub.dangerous_set_response_hook(None);

    // Slow-loris: the hub's bytes one every 50 ms; the device gives up at its deadline
    // (connect + read timeout, 3 s) rather than waiting for the whole answer.
    proxy.set(Mode::Dribble(Duration::from_millis(50)));
    let started = Instant::now();
    case(&dev, "slow-loris", &["timed out", "timeout", "Timeout"]);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "the slow answer held the device for {took:?}"
    );
    proxy.set(Mode::Pass);

    // A certificate from another CA (an impostor at the hub's address).
    let text = std::fs::read_to_string(&dev.config_path)
        .unwrap()
        .replace(&proxy.url(), &impostor.base_url());
    std::fs::write(&dev.config_path, &text).unwrap();
    let dev = dev.restart();
    case(&dev, "wrong CA", &["TLS", "certificate"]);

    // The hub behaves again: the device catches up, the second caseload lands whole.
    let text = text.replace(&impostor.base_url(), &hub.base_url());
    std::fs::write(&dev.config_path, text).unwrap();
    let dev = dev.restart();
    dev.sync().unwrap();
    assert_eq!(dev.held(), {
        let mut v = shareable(&hub, 60);
        v.sort();
        v
    });
    assert!(matches!(
        dev.device.status().unwrap().last_sync.unwrap().outcome,
        Outcome::Ok
    ));
}

/// An objection is never held back by a neighbour: a batch refused for another item
/// (here a patient outside the leases) still records the objection it carried and purges
/// that patient, though nothing else of it is applied and the refusal is reported.
#[test]
fn a_refused_batch_still_applies_the_objections_it_carried() {
    let hub = TestHub::start(40, 34);
    let dev = Dev::enrolled(&hub);
    grant(&hub, &dev.id(), &first_n(&hub, 30), json!({}));
    dev.sync().unwrap();
    let objector = hub
        .patients
        .iter()
        .take(30)
        .find(|p| p.shareable())
        .unwrap();
    let nhs = objector.nhs_number();
    assert!(dev.device.store().record(&nhs).unwrap().is_some());
    let cursor = dev.device.store().cursor().unwrap();
    hub.consent(&objector.fhir_id, "active", "2026-11-24T08:30:00Z");
    // Every answer from now on also names a patient outside the leases.
    let stranger = hub.patients[35].expected.clone();
    tamper_batches(&hub, move |mut b| {
        let mut v = b.upserts.into_inner();
        v.push(stranger.clone());
        b.upserts = BoundedVec::try_from(v).unwrap();
        b
    });
    let err = dev.sync().unwrap_err();
    assert!(
        err.to_string().contains("outside this device's leases"),
        "{err}"
    );
    assert!(matches!(last_outcome_of(&dev), Outcome::Rejected(_)));
    // The objection applied on its own: the patient is gone and refused.
    assert!(dev.device.store().record(&nhs).unwrap().is_none());
    assert!(dev.device.store().objected(&nhs).unwrap());
    // Nothing else of the batch: the cursor is where it was.
    assert_eq!(dev.device.store().cursor().unwrap(), cursor);
    // The hub honest again: the round completes without the patient.
    hub.hub.dangerous_set_response_hook(None);
    dev.sync().unwrap();
    assert!(dev.device.store().record(&nhs).unwrap().is_none());
}

fn last_outcome_of(dev: &Dev) -> Outcome {
    dev.device.status().unwrap().last_sync.unwrap().outcome
}
