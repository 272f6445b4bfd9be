//! Audit upload, exactly once (DESIGN.md invariant 2; issue 7): reads while the hub is
//! down reach it once each when it returns, audit before data; cuts before the push,
//! in the middle of its body, and between the hub's commit and its acknowledgement, and a
//! hub restart, lose and duplicate nothing; an entry altered on the device's disk is
//! found by `audit verify` and refused by the hub, which flags the device; the backlog
//! survives restarts, rekey and lease purges and, past its age limit, every API answer
//! says so. Real hub on loopback TLS, real store, real HTTP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use carecache::audit_tools::{Verification, verify};
use carecache::device::{Device, DeviceError, Outcome};
use carecache::upload::UploadError;
use carecache_hub::server::Tamper;
use serde_json::json;
use sync_protocol::audit::{AuditEntry, AuditEvent, AuditRecord};

use crate::api_harness::{Served, audit_of};
use crate::device_harness::{Dev, HOUR, T0, TestHub, cli_client_token, grant, run_cli, shareable};
use crate::fault_proxy::{FaultProxy, Mode};

/// Everything the hub holds for `device`, by sequence: hash and request id (accesses).
fn at_hub(
    hub: &TestHub,
    device: &str,
) -> HashMap<u64, (sync_protocol::types::Hash32, Option<u64>)> {
    let mut out = HashMap::new();
    hub.hub
        .state
        .for_each_audit(|e| {
            if e.device == device {
                let rid = e.record.access().map(|a| a.request_id);
                assert!(out.insert(e.seq, (e.hash, rid)).is_none());
            }
            Ok(())
        })
        .unwrap();
    out
}

/// The hub holds the device's whole chain, verified from entry 1 to the device's head,
/// with `sent` among it hash for hash; no access appears twice; the device holds nothing
/// and knows it.
fn assert_all_at_hub(hub: &TestHub, device: &Device, id: &str, sent: &[AuditEntry]) {
    let head = device.store().audit_head().unwrap();
    assert_eq!(
        hub.hub.state.verify_audit_chain(id).unwrap(),
        Ok(head.seq),
        "the hub's chain verifies end to end"
    );
    let held = at_hub(hub, id);
    assert_eq!(held.len() as u64, head.seq);
    for e in sent {
        assert_eq!(held[&e.seq].0, e.hash, "entry {} as written", e.seq);
    }
    let mut rids: Vec<u64> = held.values().filter_map(|(_, r)| *r).collect();
    let n = rids.len();
    rids.sort_unstable();
    rids.dedup();
    assert_eq!(rids.len(), n, "no access stored twice");
    assert_eq!(device.store().stats().unwrap().audit_entries, 0);
    assert_eq!(device.store().audit_acked().unwrap(), head);
    assert_eq!(device.audit().health().backlog().entries, 0);
    assert_eq!(device.status().unwrap().audit_backlog, 0);
}

/// An access to `nhs` with request id `rid`.
fn access(nhs: sync_protocol::NhsNumber, rid: u64) -> AuditEvent {
    let mut event = crate::harness::audit_record(nhs).event;
    if let AuditEvent::Access(a) = &mut event {
        a.request_id = rid;
    }
    event
}

/// Records the route of every answer the hub sends.
fn route_log(hub: &TestHub) -> Arc<Mutex<Vec<String>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l2 = log.clone();
    hub.hub
        .dangerous_set_response_hook(Some(Arc::new(move |route: &str, _: &[u8]| {
            l2.lock().unwrap().push(route.to_owned());
            Tamper::Pass
        })));
    log
}

#[test]
fn reads_while_the_hub_is_down_reach_it_exactly_once_and_before_the_data() {
    let hub = TestHub::start(30, 81);
    let dev = Dev::enrolled(&hub);
    let id = dev.id();
    let patients = shareable(&hub, 12);
    let outsider = hub
        .patients
        .iter()
        .map(|p| p.nhs_number())
        .find(|n| !patients.contains(n))
        .unwrap();
    grant(&hub, &id, &patients, json!({}));
    dev.sync().unwrap();
    let head = dev.device.store().audit_head().unwrap().seq;
    assert!(head >= 2, "enrolment and the sync are audited");
    assert_eq!(
        hub.hub.state.audit_head(&id).unwrap().seq,
        head,
        "a sync uploads what it wrote"
    );

    // The hub goes down; the crew keeps reading.
    let closed = hub.close();
    let served = Served::start(dev);
    let mut answered = Vec::new();
    for (i, nhs) in patients.iter().cycle().take(40).enumerate() {
        let r = if i % 4 == 0 {
            served.get(&format!("/fhir/Patient/{}/$summary", nhs.digits()))
        } else {
            served.get(&format!("/v1/patients/{}", nhs.digits()))
        };
        assert_eq!(r.status, 200);
        answered.push(r.request_id());
    }
    let r = served.get(&format!("/v1/patients/{}", outsider.digits()));
    assert_eq!(r.status, 403);
    answered.push(r.request_id());
    let d = &served.device;
    let err = d.sync_once(&mut |_, _| {}).unwrap_err();
    assert!(
        matches!(&err, DeviceError::Transport(t) if t.is_offline()),
        "{err}"
    );
    let status = d.status().unwrap();
    assert_eq!(
        status.audit_backlog, 43,
        "41 reads, the client's registration and the failed sync"
    );
    assert!(matches!(
        status.audit_upload.as_ref().map(|u| &u.outcome),
        Some(Outcome::Offline(_))
    ));
    let sent: Vec<AuditEntry> = served.audit().into_iter().map(|(e, _)| e).collect();

    // The hub is back: the next round uploads the audit first, then pulls.
    let hub = closed.reopen();
    let log = route_log(&hub);
    d.sync_once(&mut |_, _| {}).unwrap();
    let log = log.lock().unwrap().clone();
    let first_audit = log.iter().position(|r| r == "audit").unwrap();
    let first_pull = log.iter().position(|r| r == "pull").unwrap();
    assert!(first_audit < first_pull, "audit before data: {log:?}");
    assert_all_at_hub(&hub, d, &id, &sent);
    let at_hub_ids: Vec<u64> = at_hub(&hub, &id).values().filter_map(|(_, r)| *r).collect();
    for rid in &answered {
        assert_eq!(
            at_hub_ids.iter().filter(|x| *x == rid).count(),
            1,
            "request {rid} at the hub once"
        );
    }
    let status = d.status().unwrap();
    assert!(matches!(
        status.audit_upload.as_ref().map(|u| &u.outcome),
        Some(Outcome::Ok)
    ));
    assert_eq!(status.audit_acked, status.audit_head);
}

#[test]
fn cuts_at_every_step_of_the_upload_lose_and_duplicate_nothing() {
    let hub = TestHub::start(30, 82);
    let proxy = FaultProxy::start(hub.addr);
    let url = proxy.url();
    let dev = Dev::with_config(&hub, |text| {
        format!(
            "{}[audit]\nupload_chunk = 400\n",
            text.replace(&hub.base_url(), &url)
        )
    });
    dev.device.enrol(&hub.token()).unwrap();
    let id = dev.id();
    let patients = shareable(&hub, 12);
    grant(&hub, &id, &patients, json!({}));
    dev.sync().unwrap();
    let uploaded = hub.hub.state.audit_head(&id).unwrap().seq;
    let served = Served::start(dev);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (served, patients) = (&served, &patients);
            s.spawn(move || {
                for i in 0..250 {
                    let nhs = patients[(t * 250 + i) % patients.len()];
                    let r = served.get(&format!("/v1/patients/{}", nhs.digits()));
                    assert_eq!(r.status, 200);
                }
            });
        }
    });
    let d = &served.device;
    let sent: Vec<AuditEntry> = served.audit().into_iter().map(|(e, _)| e).collect();
    assert_eq!(
        sent.len(),
        1001,
        "1,000 reads and the client's registration"
    );
    let backlog = || d.store().stats().unwrap().audit_entries;
    let hub_head = |hub: &TestHub| hub.hub.state.audit_head(&id).unwrap().seq;

    // 1. The link is down before anything is sent.
    proxy.set(Mode::Refuse);
    let err = d.upload_audit().unwrap_err();
    assert!(
        matches!(&err, DeviceError::Transport(t) if t.is_offline()),
        "{err}"
    );
    assert_eq!((backlog(), hub_head(&hub)), (1001, uploaded));

    // 2. Cut in the middle of the push's body: the hub answered the hello but never saw
    //    a whole push.
    let log = route_log(&hub);
    proxy.set(Mode::CutUpstreamAfter(6_000));
    let err = d.upload_audit().unwrap_err();
    assert!(
        matches!(&err, DeviceError::Transport(t) if t.is_offline()),
        "{err}"
    );
    assert!(proxy.cuts.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(*log.lock().unwrap(), ["hello"], "the push never completed");
    assert_eq!((backlog(), hub_head(&hub)), (1001, uploaded));

    // 3. The hub stores the second push but its acknowledgement is lost.
    proxy.set(Mode::Pass);
    let acks = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let a2 = acks.clone();
    hub.hub
        .dangerous_set_response_hook(Some(Arc::new(move |route: &str, _: &[u8]| {
            if route == "audit" && a2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                Tamper::CutAfter(0)
            } else {
                Tamper::Pass
            }
        })));
    let err = d.upload_audit().unwrap_err();
    assert!(
        matches!(&err, DeviceError::Transport(t) if t.is_offline()),
        "{err}"
    );
    assert_eq!(backlog(), 601, "only the acknowledged push left the device");
    assert_eq!(hub_head(&hub), uploaded + 800, "the hub stored two pushes");

    // 4. The hub restarts; the device resends the unacknowledged push and the rest.
    let hub = hub.restart();
    let report = d.upload_audit().unwrap();
    assert_eq!(report.entries, 601);
    assert_eq!(report.pushes, 2);
    assert!(
        report.bytes_sent / u64::from(report.pushes) > 8_000,
        "a push is larger than the cut in step 2 ({} bytes in {} pushes)",
        report.bytes_sent,
        report.pushes
    );
    let repeated = hub
        .hub
        .audit_repeated
        .load(std::sync::atomic::Ordering::SeqCst);
    let stored = hub
        .hub
        .audit_stored
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        (repeated, stored),
        (400, 201),
        "the resent push was recognised, not stored again"
    );
    assert_all_at_hub(&hub, d, &id, &sent);
}

/// An access entry altered by someone with the device's keys (sealed properly, hash
/// left as it was) is found by `audit verify` and refused by the hub, which flags the
/// device; nothing from the altered entry on leaves the device. A byte flipped in the
/// sealed entry (no keys) is found too, and the upload stops before it.
#[test]
fn an_entry_altered_on_disk_is_reported_and_refused_by_the_hub() {
    let hub = TestHub::start(20, 83);
    let dev = Dev::enrolled(&hub);
    let id = dev.id();
    let patients = shareable(&hub, 3);
    dev.sync().unwrap();
    let write = |dev: &Dev, n: usize| {
        for i in 0..n {
            dev.device
                .audit_blocking(access(patients[i % patients.len()], i as u64))
                .unwrap();
        }
    };
    write(&dev, 10);
    let store = dev.device.store();
    let head = store.audit_head().unwrap().seq;
    let k = head - 4;
    let entry = store.audit_entries(k, 1).unwrap().remove(0);
    let mut record = AuditRecord::decode(entry.record.as_slice()).unwrap();
    let AuditEvent::Access(a) = &mut record.event else {
        panic!("an access entry")
    };
    a.patient = patients.iter().copied().find(|p| Some(*p) != a.patient);
    store
        .dangerous_rewrite_audit(k, postcard::to_allocvec(&record).unwrap())
        .unwrap();
    assert!(matches!(verify(store).unwrap(), Verification::Broken { seq, .. } if seq == k));

    // The command, as the privacy officer runs it (daemon stopped).
    let (dev, (ok, out, err)) = dev.closed(|cfg| run_cli(&["audit", "verify", "--config", cfg]));
    assert!(!ok, "exit non-zero: {out}");
    assert!(
        err.contains(&format!("broken at sequence {k}")) && err.contains("altered"),
        "{err}"
    );

    let err = dev.device.upload_audit().unwrap_err();
    assert!(
        matches!(&err, DeviceError::Upload(UploadError::ChainRefused(m)) if m.contains(&format!("sequence {k}"))),
        "{err}"
    );
    assert_eq!(
        hub.hub.state.flagged_devices().unwrap(),
        vec![(id.clone(), k)]
    );
    assert_eq!(hub.hub.state.audit_head(&id).unwrap().seq, k - 1);
    let status = dev.device.status().unwrap();
    assert!(
        status.audit_acked < k,
        "nothing from the altered entry on left the device"
    );
    // The failed `audit verify` is itself in the audit, after the altered entry.
    assert_eq!(status.audit_backlog, head + 1 - status.audit_acked);
    let last = dev
        .device
        .store()
        .audit_entries(head + 1, 1)
        .unwrap()
        .remove(0);
    assert!(matches!(
        AuditRecord::decode(last.record.as_slice()).unwrap().event,
        AuditEvent::Admin {
            command: sync_protocol::audit::AdminCommand::AuditVerify,
            uid: None,
            ok: false
        }
    ));
    assert!(matches!(
        status.audit_upload.as_ref().map(|u| &u.outcome),
        Some(Outcome::Rejected(m)) if m.contains("flagged")
    ));

    // Without the keys: a byte flipped in the sealed entry.
    let dev2 = Dev::enrolled(&hub);
    dev2.sync().unwrap();
    write(&dev2, 6);
    let store = dev2.device.store();
    let head = store.audit_head().unwrap().seq;
    let m = head - 2;
    store.dangerous_damage_audit(m).unwrap();
    assert!(matches!(
        verify(store).unwrap(),
        Verification::Broken { seq, why } if seq == m && why.contains("cannot be opened")
    ));
    let err = dev2.device.upload_audit().unwrap_err();
    assert!(
        matches!(&err, DeviceError::Upload(UploadError::Damaged(s)) if *s == m),
        "{err}"
    );
    assert_eq!(hub.hub.state.audit_head(&dev2.id()).unwrap().seq, m - 1);
    assert_eq!(store.stats().unwrap().audit_entries, head - (m - 1));
}

/// The backlog outlives restarts, a root-key rotation and a lease purge; past
/// `audit.warn_backlog_age_secs` status, metrics and every API answer say so, and the
/// warning goes once the hub has it all.
#[test]
fn the_backlog_survives_restart_rekey_and_purge_and_warns_when_old() {
    let hub = TestHub::start(20, 84);
    let dev = Dev::with_config(&hub, |t| {
        format!("{t}[audit]\nwarn_backlog_age_secs = 600\n")
    });
    dev.device.enrol(&hub.token()).unwrap();
    let id = dev.id();
    let patients = shareable(&hub, 4);
    grant(&hub, &id, &patients, json!({}));
    dev.sync().unwrap();
    let closed = hub.close();
    for (i, nhs) in patients.iter().enumerate() {
        dev.device.audit_blocking(access(*nhs, i as u64)).unwrap();
    }
    let before = dev.device.audit().health().backlog();
    assert_eq!(before.entries, 4);
    let sent: Vec<AuditEntry> = audit_of(dev.device.store())
        .into_iter()
        .map(|(e, _)| e)
        .collect();

    let mut dev = dev.restart();
    assert_eq!(dev.device.audit().health().backlog(), before, "restart");
    let new_root = carecache::crypto::RootKey::random().unwrap();
    dev.device
        .store()
        .rekey(&new_root, carecache::keysource::SourceKind::KeyFile, None)
        .unwrap();
    dev.root = new_root;
    let dev = dev.restart();
    assert_eq!(dev.device.audit().health().backlog(), before, "rekey");
    // The lease ends (17 h later) and its patients are purged; the audit stays.
    dev.clock.advance(17 * HOUR);
    let tick = dev.device.tick().unwrap();
    assert_eq!(tick.purged, patients.len());
    let after = dev.device.audit().health().backlog();
    assert_eq!((after.entries, after.oldest), (5, before.oldest), "purge");

    let served = Served::start(dev);
    let r = served.get(&format!("/v1/patients/{}", patients[0].digits()));
    assert_eq!(r.status, 403, "access expired");
    let warning = r
        .header("x-carecache-audit-backlog")
        .expect("warning header");
    assert!(
        warning.contains(" entries not uploaded, oldest 2026-11-24T"),
        "{warning}"
    );
    let status = served.get("/status");
    assert!(status.header("x-carecache-audit-backlog").is_some());
    let s = status.json();
    // The four reads, the purge, the client registration and the refused read.
    assert_eq!(s["audit_backlog"], 7);
    assert_eq!(s["audit_backlog_overdue"], true);
    assert!(s["audit_backlog_age_secs"].as_u64().unwrap() >= 17 * 3600);
    let metrics = String::from_utf8(served.get("/metrics").body).unwrap();
    assert!(
        metrics.contains("carecache_audit_backlog_overdue 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("carecache_audit_backlog_entries 7"),
        "{metrics}"
    );

    let hub = closed.reopen();
    hub.set_time(T0 + 17 * 3_600_000);
    served.device.upload_audit().unwrap();
    assert_all_at_hub(&hub, &served.device, &id, &sent);
    let r = served.get("/status");
    assert!(r.header("x-carecache-audit-backlog").is_none());
    assert_eq!(r.json()["audit_backlog_overdue"], false);
    let metrics = String::from_utf8(served.get("/metrics").body).unwrap();
    assert!(
        metrics.contains("carecache_audit_backlog_overdue 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("carecache_audit_uploads_total{outcome=\"ok\"} 1"),
        "{metrics}"
    );
}

/// `carecache serve` as a process, syncing only hourly: reads are uploaded by the audit
/// schedule (every second here), not by a sync. Then, with the hub down and the daemon
/// stopped, the privacy officer's commands read what is left on the device: `audit
/// verify` passes, `audit tail` shows NHS numbers in 3-3-4 form and no names, `audit
/// export` writes valid FHIR AuditEvent NDJSON.
#[test]
fn the_daemon_uploads_on_its_own_schedule_and_the_audit_commands_read_the_rest() {
    use crate::api_harness::try_raw;
    use crate::device_harness::{Daemon, at, cli_device};

    let hub = TestHub::start(20, 85);
    let now = carecache::clock::Clock::wall_ms(&carecache::clock::SystemClock::new());
    hub.set_time(now);
    let tmp = tempfile::tempdir().unwrap();
    let (config, id) = cli_device(&hub, tmp.path(), |text| {
        format!(
            "{}[audit]\nupload_interval_secs = 1\n",
            text.replace("[sync]\n", "[sync]\ninterval_secs = 3600\n")
        )
    });
    let cfg = config.to_str().unwrap();
    let patients = shareable(&hub, 6);
    grant(
        &hub,
        &id,
        &patients,
        json!({ "not_before": at(now - 3_600_000), "not_after": at(now + 8 * 3_600_000) }),
    );
    let family = hub
        .patients
        .iter()
        .find(|p| p.nhs_number() == patients[0])
        .unwrap()
        .expected
        .demographics
        .name
        .family
        .as_str()
        .to_owned();
    let token = cli_client_token(cfg);

    let daemon = Daemon::spawn(cfg);
    let addr = daemon.addr();
    let get = |path: &str| {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nX-Carecache-User: n1\r\nX-Carecache-Purpose: TREAT\r\n\r\n"
        );
        try_raw(addr, req.as_bytes()).unwrap()
    };
    // Wait for the first sync (the lease arrives with it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while get("/status").json()["last_success"].is_null() {
        assert!(std::time::Instant::now() < deadline, "no sync");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut rids = Vec::new();
    for nhs in &patients {
        let r = get(&format!("/v1/patients/{}", nhs.digits()));
        assert_eq!(r.status, 200);
        rids.push(r.request_id());
    }
    // Uploaded within a few seconds, with no sync due for an hour.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = get("/status").json();
        if s["audit_backlog"] == 0 {
            let head = s["audit_head"].as_u64().unwrap();
            assert_eq!(hub.hub.state.audit_head(&id).unwrap().seq, head);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not uploaded: {s}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let held: Vec<u64> = at_hub(&hub, &id).values().filter_map(|(_, r)| *r).collect();
    assert!(rids.iter().all(|r| held.contains(r)));

    // The hub goes away; three more reads stay on the device.
    let closed = hub.close();
    for nhs in &patients[..3] {
        assert_eq!(get(&format!("/v1/patients/{}", nhs.digits())).status, 200);
    }
    let (status, log) = daemon.stop(rustix::process::Signal::TERM);
    assert!(status.success());
    assert!(log.contains("audit uploaded"), "{log}");
    for n in &patients {
        assert!(!log.contains(&n.digits()), "NHS number in the log");
    }

    let (ok, out, err) = run_cli(&["audit", "verify", "--config", cfg]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("audit chain intact: 3 entries held"), "{out}");
    let (ok, out, err) = run_cli(&["audit", "tail", "-n", "2", "--config", cfg]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().filter(|l| l.contains(&id)).collect();
    assert_eq!(lines.len(), 2, "{out}");
    // The last read, then the operator's `audit verify` (every command is audited).
    assert!(lines[0].contains(&patients[2].to_string()), "3-3-4: {out}");
    assert!(
        lines[0].contains("read summary") && lines[0].contains("by n1 via epcr"),
        "{out}"
    );
    assert!(
        lines[1].contains("operator command `audit verify` carried out, on the data directory"),
        "{out}"
    );
    assert!(!out.contains(&family), "no names: {out}");
    let file = tmp.path().join("AuditEvent.ndjson");
    let (ok, _, err) = run_cli(&[
        "audit",
        "export",
        "--out",
        file.to_str().unwrap(),
        "--config",
        cfg,
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("exported 5 audit events"), "{err}");
    let events: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 5, "three reads, `audit verify`, `audit tail`");
    crate::api_harness::validate_fhir(tmp.path(), &events);
    drop(closed);
}

/// A hostile or broken hub's answers to an upload: each is refused with its reason and
/// nothing leaves the device that the hub did not acknowledge for what was sent.
#[test]
fn hostile_hub_answers_to_an_upload_drop_nothing_unacknowledged() {
    use sync_protocol::message::{AuditAck, MessageKind};
    use sync_protocol::{Compression, Message, decode_with_limit, encode};

    let hub = TestHub::start(20, 86);
    let dev = Dev::with_config(&hub, |t| format!("{t}[audit]\nupload_chunk = 5\n"));
    dev.device.enrol(&hub.token()).unwrap();
    dev.sync().unwrap();
    let patients = shareable(&hub, 3);
    let write = |n: u64| {
        for i in 0..n {
            dev.device
                .audit_blocking(access(patients[i as usize % patients.len()], i))
                .unwrap();
        }
    };
    let held = || dev.device.store().stats().unwrap().audit_entries;
    let acked = || dev.device.store().audit_acked().unwrap().seq;
    let answer = |route: &'static str, make: Arc<dyn Fn(Message) -> Vec<u8> + Send + Sync>| {
        hub.hub
            .dangerous_set_response_hook(Some(Arc::new(move |r: &str, bytes: &[u8]| {
                if r != route {
                    return Tamper::Pass;
                }
                let msg = decode_with_limit(bytes, MessageKind::Batch.max_payload()).unwrap();
                Tamper::Replace(make(msg))
            })));
    };
    let frame = |m: &Message| encode(m, Compression::None).unwrap();
    write(12);
    let before = (held(), acked());
    assert_eq!(before.0, 12);

    // Not a frame at all.
    answer("audit", Arc::new(|_| b"garbage, not a frame".to_vec()));
    let err = dev.device.upload_audit().unwrap_err();
    assert!(matches!(err, DeviceError::Transport(_)), "{err}");
    assert_eq!((held(), acked()), before);

    // Another kind of message.
    answer(
        "audit",
        Arc::new(move |_| {
            frame(&Message::Pull(sync_protocol::message::Pull::new(
                None,
                1 << 20,
            )))
        }),
    );
    let err = dev.device.upload_audit().unwrap_err();
    assert!(
        matches!(
            &err,
            DeviceError::Sync(carecache::sync::SyncError::Unexpected { .. })
        ),
        "{err}"
    );
    assert_eq!((held(), acked()), before);

    // An acknowledgement of nothing new.
    let same = before.1;
    answer(
        "audit",
        Arc::new(move |_| {
            frame(&Message::AuditAck(AuditAck {
                durable_through: same,
            }))
        }),
    );
    let err = dev.device.upload_audit().unwrap_err();
    assert!(
        matches!(&err, DeviceError::Upload(UploadError::NoProgress(s)) if *s == same),
        "{err}"
    );
    assert_eq!((held(), acked()), before);

    // Honest again: everything goes.
    hub.hub.dangerous_set_response_hook(None);
    dev.device.upload_audit().unwrap();
    let up = acked();
    assert_eq!((held(), up), (0, before.1 + 12));

    // A hub restored from an older copy: its welcome holds less than it acknowledged.
    write(3);
    answer(
        "hello",
        Arc::new(move |m| {
            let Message::Welcome(mut w) = m else {
                panic!("{m:?}")
            };
            w.audit_durable_through = up - 2;
            frame(&Message::Welcome(w))
        }),
    );
    let err = dev.device.upload_audit().unwrap_err();
    assert!(
        matches!(&err, DeviceError::Upload(UploadError::HubBehind { hub, acked }) if *hub == up - 2 && *acked == up),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains(&format!("entries {} to {up} are missing", up - 1)),
        "{err}"
    );
    assert_eq!((held(), acked()), (3, up));
    // … or its acknowledgement does.
    answer(
        "audit",
        Arc::new(move |_| {
            frame(&Message::AuditAck(AuditAck {
                durable_through: up - 1,
            }))
        }),
    );
    let err = dev.device.upload_audit().unwrap_err();
    assert!(
        matches!(&err, DeviceError::Upload(UploadError::HubBehind { .. })),
        "{err}"
    );
    assert_eq!((held(), acked()), (3, up));

    // An acknowledgement beyond what was sent drops only what was sent.
    answer(
        "audit",
        Arc::new(move |_| {
            frame(&Message::AuditAck(AuditAck {
                durable_through: up + 1_000,
            }))
        }),
    );
    dev.device.upload_audit().unwrap();
    let head = dev.device.store().audit_head().unwrap().seq;
    assert_eq!((held(), acked()), (0, head));
    assert_eq!(head, up + 3, "uploads write no entries of their own");
    let status = dev.device.status().unwrap();
    assert!(matches!(
        status.audit_upload.map(|u| u.outcome),
        Some(Outcome::Ok)
    ));
}
