//! Crash test of the audit promise (DESIGN.md invariant 2): a client drives reads
//! against `carecache serve` (a real process) while the process is killed with SIGKILL
//! at random moments. The daemon uploads its audit to the hub as it runs (each start
//! syncs). After each kill the store opens, the chain the hub holds verifies from the
//! first entry, the device's continues it from the last acknowledged entry, and every
//! read the client saw answered 200 has its entry on one side or the other.
//! `CARECACHE_CRASH_KILLS` sets the number of kills (default 50).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;
use sync_protocol::audit::AuditEvent;

use crate::api_harness::{audit_of, try_raw};
use crate::device_harness::{
    Daemon, TestHub, at, cli_client_token, cli_device, grant, run_cli as run, shareable,
};

#[test]
fn every_read_answered_before_a_kill_9_is_in_the_audit_chain() {
    let kills: usize = std::env::var("CARECACHE_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let hub = TestHub::start(40, 71);
    let now = carecache::clock::SystemClock::new();
    let now = carecache::clock::Clock::wall_ms(&now);
    hub.set_time(now);
    let tmp = tempfile::tempdir().unwrap();
    let (config, id) = cli_device(&hub, tmp.path(), |t| t);
    let cfg = config.to_str().unwrap();
    let data = tmp.path().join("data");
    let key = tmp.path().join("root.key");
    let patients = shareable(&hub, 40);
    grant(
        &hub,
        &id,
        &patients,
        json!({ "not_before": at(now - 3_600_000), "not_after": at(now + 8 * 3_600_000) }),
    );
    let (ok, out, err) = run(&["sync", "--config", cfg]);
    assert!(ok, "{out}{err}");
    let token = cli_client_token(cfg);
    let root = carecache::store::unlock(
        &data,
        &carecache::keysource::KeySource::KeyFile(key.clone()),
    )
    .unwrap();
    let mut rng = rand::rng();
    let mut answered: Vec<u64> = Vec::new();
    let mut uploaded = 0;
    let started = Instant::now();
    for round in 0..kills {
        let daemon = Daemon::spawn(cfg);
        let addr = daemon.addr();
        // A client reads as fast as it can until the kill.
        let stop = Arc::new(AtomicBool::new(false));
        let client = {
            let stop = Arc::clone(&stop);
            let token = token.clone();
            let patients = patients.clone();
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                let mut i = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    let nhs = patients[i % patients.len()].digits();
                    i += 1;
                    let path = if i.is_multiple_of(2) {
                        format!("/v1/patients/{nhs}")
                    } else {
                        format!("/fhir/Patient/{nhs}/$summary")
                    };
                    let req = format!(
                        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nX-Carecache-User: n1\r\nX-Carecache-Purpose: TREAT\r\n\r\n"
                    );
                    let Some(r) = try_raw(addr, req.as_bytes()) else {
                        break; // the daemon died mid-answer
                    };
                    if r.status == 200 {
                        ids.push(r.request_id());
                    }
                }
                ids
            })
        };
        std::thread::sleep(Duration::from_millis(rng.random_range(5..150)));
        daemon.stop(rustix::process::Signal::KILL);
        stop.store(true, Ordering::SeqCst);
        let ids = client.join().unwrap();
        answered.extend(ids);
        // After each kill: the store opens, the chain verifies, nothing answered is missing.
        let store = carecache::store::Store::open(&data, &root).unwrap();
        let held = audit_of(&store);
        let acked = store.audit_acked().unwrap().seq;
        let head = store.audit_head().unwrap().seq;
        // The hub may hold more than the device saw acknowledged (killed before the
        // acknowledgement was committed), never less, never more than was written.
        let hub_head = hub
            .hub
            .state
            .verify_audit_chain(&id)
            .unwrap()
            .expect("the hub's chain verifies");
        assert!(
            (acked..=head).contains(&hub_head),
            "hub {hub_head}, acked {acked}, head {head}"
        );
        uploaded = hub_head;
        let mut logged = std::collections::HashSet::new();
        let mut hub_hashes = std::collections::HashMap::new();
        hub.hub
            .state
            .for_each_audit(|e| {
                if e.device == id {
                    hub_hashes.insert(e.seq, e.hash);
                    if let AuditEvent::Access(a) = e.record.event {
                        logged.insert(a.request_id);
                    }
                }
                Ok(())
            })
            .unwrap();
        for (e, r) in held {
            if let Some(h) = hub_hashes.get(&e.seq) {
                assert_eq!(*h, e.hash, "entry {} differs at the hub", e.seq);
            }
            if let AuditEvent::Access(a) = r.event {
                logged.insert(a.request_id);
            }
        }
        let missing: Vec<&u64> = answered.iter().filter(|i| !logged.contains(i)).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} answered reads have no audit entry",
            missing.len()
        );
    }
    eprintln!(
        "{kills} kills, {} reads answered and audited, {uploaded} entries uploaded, {:.1} s",
        answered.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        uploaded > 0,
        "the daemon never uploaded: the hub side went untested"
    );
    assert!(
        answered.len() >= kills,
        "the client saw too few answers to test anything"
    );
}
