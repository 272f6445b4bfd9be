//! Network faults: the device reaches its hub through a proxy that gives 30 % of
//! connections one random fault — drop, delay, truncate, reset, stall, duplicate — while
//! the hub's data changes (objections made and withdrawn, a second caseload granted and
//! revoked) and the device writes audit entries. After the rounds, one clean sync: the
//! device holds exactly the hub's allowed set, and the hub holds every audit entry
//! exactly once, its chain verifying from the first.
//! `CARECACHE_FAULT_ROUNDS` sets the number of sync-and-upload rounds (default 100; the
//! long run in docs/RELIABILITY.md is 1,000).

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde_json::json;
use sync_protocol::NhsNumber;
use sync_protocol::audit::{AuditEvent, AuthFailure};

use crate::device_harness::{Dev, TestHub, grant};
use crate::fault_proxy::{FaultProxy, Mode};

#[test]
fn sync_and_upload_converge_through_a_faulty_network_with_nothing_lost_or_doubled() {
    let rounds: usize = std::env::var("CARECACHE_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let hub = TestHub::start(160, 41);
    let proxy = FaultProxy::start(hub.addr);
    let dev = Dev::with_config(&hub, |t| {
        t.replace("connect_timeout_secs = 5", "connect_timeout_secs = 1")
            .replace("read_timeout_secs = 30", "read_timeout_secs = 1")
            .replace(&hub.base_url(), &proxy.url())
    });
    dev.device.enrol(&hub.token()).unwrap();
    let id = dev.id();
    let shareable: Vec<usize> = (0..160).filter(|&i| hub.patients[i].shareable()).collect();
    let nhs = |i: usize| hub.patients[i].nhs_number();
    let first: Vec<NhsNumber> = (0..100).map(nhs).collect();
    grant(&hub, &id, &first, json!({}));
    proxy.set(Mode::Random(30));

    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    let mut objected: BTreeSet<usize> = BTreeSet::new();
    let mut second: Option<(u64, std::ops::Range<usize>)> = None;
    let mut minute = 0u64;
    let mut written = 0u64;
    let mut outcomes: HashMap<&'static str, usize> = HashMap::new();
    let started = Instant::now();
    for round in 0..rounds {
        // The hub's data moves on.
        match rng.random_range(0..10) {
            0..=2 => {
                let i = shareable[rng.random_range(0..shareable.len())];
                let at = format!("2026-11-24T08:{:02}:{:02}Z", minute / 60, minute % 60);
                minute += 1;
                if objected.remove(&i) {
                    hub.consent(&hub.patients[i].fhir_id, "inactive", &at);
                } else {
                    objected.insert(i);
                    hub.consent(&hub.patients[i].fhir_id, "active", &at);
                }
            }
            3 => match second.take() {
                Some((lease, _)) => {
                    let (status, _) =
                        hub.admin("DELETE", &format!("/admin/v1/leases/{lease}"), None);
                    assert!(
                        (200..300).contains(&status),
                        "round {round}: revoking the second lease: {status}"
                    );
                }
                None => {
                    let from = rng.random_range(80..120);
                    let more: Vec<NhsNumber> = (from..from + 40).map(nhs).collect();
                    second = Some((grant(&hub, &id, &more, json!({})), from..from + 40));
                }
            },
            _ => {}
        }
        // The device logs a few entries, then syncs (upload, data, upload).
        for _ in 0..rng.random_range(0..4) {
            written += 1;
            dev.device
                .audit_blocking(AuditEvent::AuthFailure {
                    request_id: written,
                    client: None,
                    reason: AuthFailure::NoToken,
                })
                .unwrap();
        }
        let label = match dev.sync() {
            Ok(_) => "ok",
            Err(_) => "failed",
        };
        *outcomes.entry(label).or_default() += 1;
    }
    let faults = proxy.faults.lock().unwrap().clone();
    let connections = proxy.connections.load(std::sync::atomic::Ordering::SeqCst);
    let faulty: u64 = faults.values().sum();

    // The network heals: one clean round (two if the first finds a resync due).
    proxy.set(Mode::Pass);
    if dev.sync().is_err() {
        dev.sync().unwrap();
    }
    // Converged: exactly the hub's allowed set (leases, less objectors), every record
    // the hub's current version.
    let mut leased: BTreeSet<usize> = (0..100).collect();
    if let Some((_, range)) = second {
        leased.extend(range);
    }
    let want: Vec<NhsNumber> = {
        let mut v: Vec<NhsNumber> = leased
            .iter()
            .filter(|i| hub.patients[**i].shareable() && !objected.contains(i))
            .map(|&i| nhs(i))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        dev.held(),
        want,
        "the device did not converge to the allowed set"
    );
    for n in &want {
        let objected_now = dev.device.store().objected(n).unwrap();
        assert!(!objected_now, "a held patient is marked objected");
    }
    for &i in objected.iter().filter(|i| leased.contains(i)) {
        assert!(
            dev.device.store().objected(&nhs(i)).unwrap(),
            "an objection did not arrive"
        );
    }
    // Audit: every entry at the hub exactly once, the chain whole, nothing left behind.
    let head = dev.device.store().audit_head().unwrap().seq;
    assert_eq!(dev.device.store().audit_acked().unwrap().seq, head);
    assert_eq!(
        hub.hub.state.verify_audit_chain(&id).unwrap(),
        Ok(head),
        "the hub's chain does not verify to the device's head"
    );
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let mut failures = BTreeSet::new();
    hub.hub
        .state
        .for_each_audit(|e| {
            if e.device == id {
                *seen.entry(e.seq).or_default() += 1;
                if let AuditEvent::AuthFailure { request_id, .. } = e.record.event {
                    failures.insert(request_id);
                }
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(seen.len() as u64, head, "the hub is missing entries");
    assert!(seen.values().all(|&n| n == 1), "an entry is held twice");
    assert_eq!(
        failures,
        (1..=written).collect::<BTreeSet<_>>(),
        "an entry the device wrote is not at the hub exactly once"
    );
    let (_, status) = hub.admin("GET", "/admin/v1/status", None);
    eprintln!(
        "{rounds} rounds in {:.1} s: {outcomes:?}; {connections} connections, {faulty} faulty {faults:?}; \
         {head} audit entries, all at the hub once ({} repeats deduplicated); {} patients held",
        started.elapsed().as_secs_f64(),
        status["audit_repeats_since_start"],
        want.len()
    );
    assert!(
        faulty * 100 >= connections * 15,
        "too few faults injected to test anything ({faulty} of {connections})"
    );
    assert!(
        faults.len() == 6,
        "not every kind of fault was injected: {faults:?}"
    );
    assert!(
        outcomes.get("failed").copied().unwrap_or(0) > 0
            && outcomes.get("ok").copied().unwrap_or(0) > 0,
        "{outcomes:?}"
    );
}
