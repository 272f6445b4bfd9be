//! The local API end to end: a real hub, a synced device, the tokio server on a loopback
//! port, real HTTP. Every FHIR answer goes through the `fhir.resources` validator; every
//! access, served or denied, must have its audit entry on disk when the answer arrives.

use std::time::Duration;

use serde_json::{Value, json};
use sync_protocol::NhsNumber;
use sync_protocol::audit::{
    AuditAction, AuditEvent, AuditOutcome, AuthFailure, DenyReason, KeyEvent, Purpose, SectionKind,
    SectionShown,
};
use sync_protocol::record::Section;

use crate::api_harness::{Served, raw, served, validate_fhir};
use crate::device_harness::{Dev, TestHub, grant};

/// The access entry for `request_id`.
fn entry_for(s: &Served, request_id: u64) -> sync_protocol::audit::Access {
    s.audit()
        .into_iter()
        .find_map(|(_, r)| match r.event {
            AuditEvent::Access(a) if a.request_id == request_id => Some(a),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no audit entry for request {request_id}"))
}

#[test]
fn fhir_routes_answer_valid_r4_with_alerts_first_and_absences_explicit() {
    let (hub, s, patients) = served(60, 61, json!({}));
    let mut resources: Vec<Value> = Vec::new();
    let meta = s.get("/fhir/metadata");
    assert_eq!(meta.status, 200);
    assert!(
        meta.header("content-type")
            .unwrap()
            .starts_with("application/fhir+json")
    );
    resources.push(meta.json());
    let source = |n: &NhsNumber| {
        hub.patients
            .iter()
            .find(|p| p.nhs_number() == *n)
            .unwrap()
            .expected
            .clone()
    };
    let mut saw = (false, false, false, false); // not available, none recorded, withheld, entries
    for n in &patients {
        let r = source(n);
        let d = n.digits();
        let summary = s.get(&format!("/fhir/Patient/{d}/$summary"));
        assert_eq!(summary.status, 200, "{}", summary.text());
        assert_eq!(summary.header("cache-control"), Some("no-store"));
        let b = summary.json();
        assert_eq!(b["type"], "document");
        let comp = &b["entry"][0]["resource"];
        assert_eq!(comp["resourceType"], "Composition");
        let titles: Vec<&str> = comp["section"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["title"].as_str().unwrap())
            .collect();
        assert_eq!(
            &titles[..3],
            ["Alerts", "Allergies and adverse reactions", "Medications"],
            "alerts first, then allergies, then medications"
        );
        let allergies = &comp["section"][1];
        let text = allergies["text"]["div"].as_str().unwrap();
        match &r.allergies {
            Section::NotAvailable => {
                saw.0 = true;
                assert_eq!(allergies["emptyReason"]["coding"][0]["code"], "unavailable");
                assert!(text.contains("not available"), "{text}");
                assert!(!text.contains("none recorded"));
            }
            Section::NoneRecorded => {
                saw.1 = true;
                assert_eq!(allergies["emptyReason"]["coding"][0]["code"], "nilknown");
                assert!(text.contains("none recorded") && !text.contains("not available"));
            }
            Section::Entries(items) => {
                saw.3 = true;
                assert_eq!(allergies["entry"].as_array().unwrap().len(), items.len());
            }
            Section::WithheldByPatient => {
                assert_eq!(allergies["emptyReason"]["coding"][0]["code"], "withheld");
                assert!(text.contains("withheld at the patient's request"), "{text}");
            }
        }
        if r.withheld > 0 {
            saw.2 = true;
            assert!(
                summary
                    .text()
                    .contains("Items excluded due to confidentiality")
            );
        }
        // Every section reference resolves inside the document.
        let urls: Vec<&str> = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["fullUrl"].as_str().unwrap())
            .collect();
        for sec in comp["section"].as_array().unwrap() {
            for e in sec["entry"].as_array().into_iter().flatten() {
                assert!(urls.contains(&e["reference"].as_str().unwrap()));
            }
        }
        // Audit: the summary's entry records what was shown, no more.
        let a = entry_for(&s, summary.request_id());
        assert_eq!(a.action, AuditAction::ReadSummary);
        assert_eq!(a.patient, Some(*n));
        assert_eq!(a.outcome, AuditOutcome::Served);
        let alerts_shown = a
            .shown
            .iter()
            .find(|x| x.section == SectionKind::Alerts)
            .unwrap();
        assert_eq!(
            alerts_shown.shown,
            match r.alerts {
                Section::Entries(ref e) => SectionShown::Items(e.len() as u16),
                Section::NoneRecorded => SectionShown::NoneRecorded,
                Section::NotAvailable | Section::WithheldByPatient => SectionShown::NotAvailable,
            }
        );
        resources.push(b);
        for path in [
            format!("/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{d}"),
            format!("/fhir/Patient/{d}"),
            format!("/fhir/Flag?patient=Patient/{d}"),
            format!("/fhir/AllergyIntolerance?patient={d}"),
            format!("/fhir/MedicationStatement?patient=Patient/{d}"),
        ] {
            let res = s.get(&path);
            assert_eq!(res.status, 200, "{path}: {}", res.text());
            assert!(res.header("x-carecache-last-sync").is_some());
            assert_eq!(res.header("x-carecache-stale"), Some("false"));
            resources.push(res.json());
        }
    }
    assert!(
        saw.0 && saw.1 && saw.3,
        "the data set covers every section state: {saw:?}"
    );
    // Errors are OperationOutcomes and valid too.
    let denied = s.get("/fhir/Patient/999999999");
    assert_eq!(denied.status, 400);
    resources.push(denied.json());
    let stranger = (999_888_000..)
        .filter_map(NhsNumber::from_stem)
        .find(|n| hub.patients.iter().all(|p| p.nhs_number() != *n))
        .unwrap();
    let unknown = s.get(&format!("/fhir/Patient/{}", stranger.digits()));
    assert_eq!(unknown.status, 403);
    resources.push(unknown.json());
    let dir = tempfile::tempdir().unwrap();
    validate_fhir(dir.path(), &resources);
    // The freshness tag travels in the body too.
    assert!(resources[1]["meta"]["tag"][0]["code"] == "fresh");
}

#[test]
fn plain_json_summary_and_caseload_list() {
    let (_hub, s, patients) = served(40, 62, json!({ "users": ["n1"] }));
    let list = s.get("/v1/patients?_count=10");
    assert_eq!(list.status, 200, "{}", list.text());
    let v = list.json();
    assert_eq!(v["total"].as_u64().unwrap() as usize, patients.len());
    assert_eq!(v["patients"].as_array().unwrap().len(), 10);
    assert_eq!(v["next"], "/v1/patients?_count=10&_offset=10");
    let row = &v["patients"][0];
    for k in [
        "nhs_number",
        "name",
        "birth_date",
        "alert_count",
        "access_until",
    ] {
        assert!(!row[k].is_null(), "{k} in {row}");
    }
    let a = entry_for(&s, list.request_id());
    assert_eq!(a.action, AuditAction::ListCaseload);
    assert_eq!(
        a.listed.len(),
        10,
        "every listed patient is in the audit entry"
    );
    // Another user sees an empty caseload; the list is theirs only.
    let mut other = s.treat();
    other[1].1 = "n2".into();
    let empty = s.get_as("/v1/patients", &other);
    assert_eq!(empty.json()["total"], 0);
    let one = s.get(&format!("/v1/patients/{}", patients[0].digits()));
    assert_eq!(one.status, 200);
    let j = one.json();
    assert_eq!(j["nhs_number"], patients[0].to_string());
    for k in ["alerts", "allergies", "medications"] {
        let st = j[k]["state"].as_str().unwrap();
        assert!(["entries", "none_recorded", "not_available"].contains(&st));
    }
    assert_eq!(j["access"]["view"], "clinical");
    assert_eq!(j["freshness"]["stale"], false);
    assert!(j["freshness"]["last_sync"].is_string());
    // Data older than the threshold is flagged in header and body.
    s.clock.advance(Duration::from_secs(2 * 3600));
    let stale = s.get(&format!("/v1/patients/{}", patients[0].digits()));
    assert_eq!(stale.status, 200);
    assert_eq!(stale.header("x-carecache-stale"), Some("true"));
    assert_eq!(stale.json()["freshness"]["stale"], true);
    let fhir = s.get(&format!("/fhir/Flag?patient={}", patients[0].digits()));
    assert!(fhir.text().contains("may be out of date"));
}

#[test]
fn bad_requests_are_refused_clearly_and_every_one_is_audited() {
    let hub = TestHub::start(50, 63);
    let dev = Dev::enrolled(&hub);
    let p: Vec<NhsNumber> = hub
        .patients
        .iter()
        .filter(|p| p.shareable())
        .map(|p| p.nhs_number())
        .collect();
    grant(&hub, &dev.id(), &p[0..10], json!({ "users": ["n1"] }));
    grant(
        &hub,
        &dev.id(),
        &p[10..15],
        json!({ "users": ["other"], "emergency_access": true }),
    );
    grant(
        &hub,
        &dev.id(),
        &p[15..20],
        json!({ "users": ["n1"], "view": "social_care", "not_after": "2026-11-24T10:00:00Z" }),
    );
    dev.sync().unwrap();
    let objector = hub
        .patients
        .iter()
        .find(|x| x.shareable() && p[0..10].contains(&x.nhs_number()))
        .unwrap();
    hub.consent(&objector.fhir_id, "active", "2026-11-24T08:30:00Z");
    dev.sync().unwrap();
    let s = Served::start(dev);
    let d = |n: &NhsNumber| n.digits();
    let path = format!("/v1/patients/{}", d(&p[1]));
    let before = s.audit().len();

    // Tokens.
    let no_token = s.get_as(&path, &s.treat()[1..]);
    assert_eq!(no_token.status, 401);
    assert_eq!(no_token.header("www-authenticate"), Some("Bearer"));
    let mut wrong = s.treat();
    wrong[0].1 = "Bearer cct_0000".into();
    assert_eq!(s.get_as(&path, &wrong).status, 401);
    let second = s.device.add_client("nurse-app").unwrap();
    s.device.revoke_client("nurse-app").unwrap();
    let mut revoked = s.treat();
    revoked[0].1 = format!("Bearer {}", second.expose());
    let r = s.get_as(&path, &revoked);
    assert_eq!(
        (r.status, r.json()["error"]["message"].as_str().unwrap()),
        (401, "client token revoked")
    );
    let fails: Vec<AuthFailure> = s
        .audit()
        .into_iter()
        .filter_map(|(_, r)| match r.event {
            AuditEvent::AuthFailure { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        fails,
        [
            AuthFailure::NoToken,
            AuthFailure::UnknownToken,
            AuthFailure::RevokedToken
        ]
    );
    assert!(s.audit().iter().any(|(_, r)| matches!(&r.event, AuditEvent::Key(KeyEvent::ClientRevoked { name }) if name.as_str() == "nurse-app")));

    // Missing user or purpose: 400 naming which.
    let r = s.get_as(&path, &[s.treat()[0].clone(), s.treat()[2].clone()]);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("x-carecache-user"), "{}", r.text());
    let r = s.get_as(&path, &s.treat()[..2]);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("x-carecache-purpose"), "{}", r.text());
    assert_eq!(
        entry_for(&s, r.request_id()).outcome,
        AuditOutcome::Denied(DenyReason::BadRequest)
    );

    // Malformed NHS numbers: 400 with why.
    for (bad, why) in [
        ("12345", "10 digits"),
        ("9434765918", "check digit"),
        ("abcdefghij", "10 digits"),
    ] {
        let r = s.get(&format!("/v1/patients/{bad}"));
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.text().contains(why), "{bad}: {}", r.text());
    }

    // Policy denials, each audited with its reason.
    let cases: Vec<(String, u16, &str, DenyReason)> = vec![
        (
            d(&p[12]),
            403,
            "not on your caseload",
            DenyReason::NotOnCaseload,
        ),
        (
            d(&objector.nhs_number()),
            404,
            "record not available",
            DenyReason::Objected,
        ),
    ];
    for (nhs, status, words, reason) in cases {
        let r = s.get(&format!("/v1/patients/{nhs}"));
        assert_eq!(r.status, status, "{}", r.text());
        assert_eq!(r.json()["error"]["message"], words);
        let a = entry_for(&s, r.request_id());
        assert_eq!(a.outcome, AuditOutcome::Denied(reason));
        assert_eq!(a.patient.unwrap().digits(), nhs);
        assert!(a.shown.is_empty());
        let f = s.get(&format!("/fhir/Patient/{nhs}"));
        assert_eq!(f.status, status);
        assert_eq!(f.json()["resourceType"], "OperationOutcome");
    }
    // The social-care view: alerts yes, allergies not part of it.
    let r = s.get(&format!("/v1/patients/{}", d(&p[16])));
    assert_eq!(r.json()["allergies"]["state"], "not_in_view");
    let r = s.get(&format!("/fhir/AllergyIntolerance?patient={}", d(&p[16])));
    assert_eq!(r.status, 403);
    assert_eq!(
        entry_for(&s, r.request_id()).outcome,
        AuditOutcome::Denied(DenyReason::ViewNotPermitted)
    );
    // Emergency access: reason required; with one, served and flagged.
    let mut etreat = s.treat();
    etreat[2].1 = "ETREAT".into();
    let r = s.get_as(&format!("/v1/patients/{}", d(&p[11])), &etreat);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("reason"), "{}", r.text());
    etreat.push((
        "X-Carecache-Reason".into(),
        "Unconscious%2C%20no%20other%20history".into(),
    ));
    let r = s.get_as(&format!("/v1/patients/{}", d(&p[11])), &etreat);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["access"]["emergency"], true);
    let a = entry_for(&s, r.request_id());
    assert!(
        matches!(&a.purpose, Some(Purpose::EmergencyTreat { reason }) if reason.as_str() == "Unconscious, no other history")
    );
    // Expired lease: denied at once, before any tick.
    s.clock.advance(Duration::from_secs(3 * 3600));
    let r = s.get(&format!("/v1/patients/{}", d(&p[16])));
    assert_eq!(r.status, 403);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("access expired")
    );

    // Path and query tricks: refused, never a record.
    for trick in [
        "/v1/patients/..%2F..%2Fstatus",
        "/v1/patients/%2e%2e",
        "/v1/patients/943%00476%205919",
        "/fhir/Patient/../status",
        "/fhir/Patient/9434765919/%24summary%2F..",
        "/fhir/Flag?patient=1&patient=2",
        "/fhir/Flag?subject=9434765919",
        "/fhir/Patient?identifier=urn:other|9434765919",
        "//v1//patients",
        "/v1/patients/%F0%9F%98%80",
    ] {
        let r = s.get(trick);
        assert!(
            [400, 404].contains(&r.status),
            "{trick}: {} {}",
            r.status,
            r.text()
        );
    }
    let r = raw(s.addr, b"POST /v1/patients HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc");
    assert!([405, 413].contains(&r.status), "{}", r.status);
    let r = raw(
        s.addr,
        b"DELETE /fhir/Patient/9434765919 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 405);
    // Every answered patient request left an entry; no patient data in any of them.
    let after = s.audit();
    assert!(after.len() > before + 15);
    // The server is still up.
    assert_eq!(s.get("/status").status, 200);
}

#[test]
fn oversized_heads_and_a_thousand_connections_leave_the_server_up() {
    let (_hub, s, patients) = served(30, 64, json!({}));
    let big = format!(
        "GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let r = raw(s.addr, big.as_bytes());
    assert_eq!(r.status, 431, "request head too large");
    let many = format!(
        "GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n{}Connection: close\r\n\r\n",
        "X-A: 1\r\n".repeat(200)
    );
    let r = raw(s.addr, many.as_bytes());
    assert!(r.status == 431 || r.status == 400, "{}", r.status);
    assert!(r.text().contains("request head too large"), "{}", r.text());
    // On a FHIR route hyper's own refusal still comes as an OperationOutcome (too big,
    // and too many headers), and the connection is closed.
    for head in [
        format!("X-Big: {}\r\n", "a".repeat(64 * 1024)),
        "X-A: 1\r\n".repeat(200),
    ] {
        let req = format!(
            "GET /fhir/Flag?patient={} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}Connection: close\r\n\r\n",
            patients[0].digits()
        );
        let r = raw(s.addr, req.as_bytes());
        assert_eq!(r.status, 431);
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("application/fhir+json"))
        );
        let oo = r.json();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        assert_eq!(oo["issue"][0]["code"], "too-long");
        assert_eq!(r.header("connection"), Some("close"));
    }
    let rss_before = rss_kib();
    let path = format!("/v1/patients/{}", patients[0].digits());
    let req = {
        let mut q = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        for (k, v) in s.treat() {
            q.push_str(&format!("{k}: {v}\r\n"));
        }
        q.push_str("\r\n");
        q
    };
    // 1,000 connections opened at once, each sending one read.
    let addr = s.addr;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // 1,000 clients at once, each connecting and sending one read: the server holds at
    // most `max_connections` (256) and the rest wait in the accept queue.
    let statuses: Vec<u16> = rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..1000 {
            let req = req.clone();
            tasks.spawn(async move {
                let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
                c.write_all(req.as_bytes()).await.unwrap();
                let mut buf = Vec::new();
                c.read_to_end(&mut buf).await.unwrap();
                if buf.is_empty() {
                    return 0;
                }
                crate::api_harness::parse(&buf).status
            });
        }
        let mut out = Vec::new();
        while let Some(r) = tasks.join_next().await {
            out.push(r.unwrap());
        }
        out
    });
    assert_eq!(statuses.len(), 1000);
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{:?}",
        statuses
            .iter()
            .filter(|s| **s != 200)
            .take(5)
            .collect::<Vec<_>>()
    );
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 128 * 1024,
        "memory grew by {grown} KiB for 1,000 connections"
    );
    // All 1,000 reads are in the audit log, sharing commits.
    let reads = s
        .audit()
        .into_iter()
        .filter(
            |(_, r)| matches!(&r.event, AuditEvent::Access(a) if a.outcome == AuditOutcome::Served),
        )
        .count();
    assert_eq!(reads, 1000);
    let commits = s
        .device
        .audit()
        .health()
        .commits
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        commits < 1000,
        "group commit: {commits} commits for 1,000 reads"
    );
    assert_eq!(s.get("/status").status, 200);
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn an_unwritable_audit_log_refuses_reads_with_503_and_says_why() {
    let (_hub, s, patients) = served(20, 65, json!({}));
    let path = format!("/v1/patients/{}", patients[0].digits());
    assert_eq!(s.get(&path).status, 200);
    let held = s.audit().len();
    s.device.store().dangerous_fail_audit_commits(true);
    let r = s.get(&path);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("audit"));
    assert!(!r.text().contains(&patients[0].digits()));
    let f = s.get(&format!("/fhir/Patient/{}/$summary", patients[0].digits()));
    assert_eq!(f.status, 503);
    assert_eq!(f.json()["resourceType"], "OperationOutcome");
    // Denials and authentication failures cannot be answered unaudited either.
    assert_eq!(s.get_as(&path, &[]).status, 503);
    let status = s.get("/status").json();
    assert!(
        status["audit_error"].as_str().unwrap().contains("injected"),
        "{status}"
    );
    assert_eq!(status["ready"], false);
    let metrics = s.get("/metrics").text();
    assert!(metrics.contains("carecache_audit_failing 1"), "{metrics}");
    assert!(
        metrics.contains("carecache_audit_refusals_total 2"),
        "{metrics}"
    );
    // When the disk recovers, service resumes and the chain continues unbroken.
    s.device.store().dangerous_fail_audit_commits(false);
    let r = s.get(&path);
    assert_eq!(r.status, 200);
    let after = s.audit();
    assert_eq!(
        after.len(),
        held + 1,
        "refused reads left no entries; the chain has no gap"
    );
    assert!(s.get("/status").json()["audit_error"].is_null());
}

#[test]
fn status_metrics_and_the_unix_socket() {
    let hub = TestHub::start(20, 66);
    let dev = Dev::enrolled(&hub);
    let p: Vec<NhsNumber> = hub
        .patients
        .iter()
        .filter(|x| x.shareable())
        .map(|x| x.nhs_number())
        .collect();
    grant(&hub, &dev.id(), &p, json!({}));
    dev.sync().unwrap();
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("api.sock");
    let s = Served::start_with(dev, vec![sock.clone()]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o660
    );
    let mut u = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    use std::io::{Read, Write};
    let mut req = format!(
        "GET /v1/patients/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n",
        p[0].digits()
    );
    for (k, v) in s.treat() {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    u.write_all(req.as_bytes()).unwrap();
    let mut buf = Vec::new();
    u.read_to_end(&mut buf).unwrap();
    assert_eq!(crate::api_harness::parse(&buf).status, 200);
    assert_eq!(s.get("/v1/patients/9434765919").status, 403);
    let st = s.get("/status");
    assert_eq!(st.status, 200);
    let v = st.json();
    assert_eq!(v["patients_held"].as_u64().unwrap() as usize, p.len());
    assert_eq!(v["freshness"]["stale"], false);
    assert_eq!(v["ready"], true);
    assert!(v["audit_head"].as_u64().unwrap() >= 3);
    for n in &p {
        assert!(!st.text().contains(&n.digits()));
    }
    let m = s.get("/metrics").text();
    for needle in [
        "carecache_syncs_total{outcome=\"ok\"} 1",
        "carecache_reads_total{outcome=\"served\",reason=\"none\"} 1",
        "carecache_reads_total{outcome=\"denied\",reason=\"not-on-caseload\"} 1",
        "carecache_audit_backlog_entries",
        "carecache_request_duration_seconds_bucket{",
        "route=\"v1_patient\"",
    ] {
        assert!(m.contains(needle), "{needle} not in {m}");
    }
    drop(s);
    assert!(!sock.exists(), "the socket is removed at shutdown");
}

/// What unmodified FHIR client libraries send and expect: `_count` and `_offset` on
/// every searchset, with `total`, `self` and `next` links that lead through every match
/// and stop at the last; the bearer scheme in any case; 406 for a format the API does not
/// speak and OperationOutcome for every error on a FHIR route; `emptyReason` on every
/// empty `$summary` section and a code of its own for each.
#[test]
fn fhir_searchsets_page_and_every_fhir_error_is_an_operation_outcome() {
    let (hub, s, _) = served(60, 64, json!({ "users": ["n1"] }));
    let p = shareable_where(&hub, |p| p.expected.medications.entries().len() >= 5);
    let d = p.nhs_number().digits();
    let n = p.expected.medications.entries().len();
    let mut url = format!("/fhir/MedicationStatement?patient=Patient/{d}&_count=2");
    let mut ids = Vec::new();
    let mut pages = 0;
    loop {
        let r = s.get(&url);
        assert_eq!(r.status, 200, "{url}: {}", r.text());
        let b = r.json();
        assert_eq!(b["total"].as_u64().unwrap() as usize, n);
        let matches: Vec<&Value> = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["search"]["mode"] == "match")
            .collect();
        assert!(matches.len() <= 2);
        ids.extend(
            matches
                .iter()
                .map(|e| e["resource"]["id"].as_str().unwrap().to_owned()),
        );
        let links = b["link"].as_array().unwrap();
        assert!(links.iter().any(|l| l["relation"] == "self"));
        pages += 1;
        match links.iter().find(|l| l["relation"] == "next") {
            Some(next) => {
                let next = next["url"].as_str().unwrap();
                assert!(next.starts_with("http://localhost/fhir/"), "{next}");
                url = next.trim_start_matches("http://localhost").to_owned();
            }
            None => break,
        }
        assert!(pages < 10);
    }
    assert_eq!(pages, n.div_ceil(2), "no page past the last");
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), n, "every medication once, across the pages");
    // _count=0: the total only; a bad _count is refused as an OperationOutcome.
    let zero = s.get(&format!("/fhir/Flag?patient={d}&_count=0")).json();
    assert_eq!(
        zero["total"].as_u64().unwrap() as usize,
        p.expected.alerts.entries().len()
    );
    // No matches: no entries but notes (FHIR JSON has no empty arrays).
    assert!(
        zero["entry"]
            .as_array()
            .is_none_or(|e| e.iter().all(|e| e["search"]["mode"] != "match"))
    );
    let bad = s.get(&format!("/fhir/Flag?patient={d}&_count=many"));
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["resourceType"], "OperationOutcome");
    let search = s.get(&format!(
        "/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{d}&_count=50&_format=json"
    ));
    assert_eq!(search.status, 200, "{}", search.text());
    assert_eq!(search.json()["total"], 1);

    // The bearer scheme is case-insensitive; another scheme is not a token.
    for scheme in ["BEARER", "bearer", "Bearer"] {
        let mut h = s.treat();
        h[0].1 = format!("{scheme} {}", s.token);
        assert_eq!(
            s.get_as(&format!("/fhir/Patient/{d}"), &h).status,
            200,
            "{scheme}"
        );
    }
    let mut basic = s.treat();
    basic[0].1 = format!("Basic {}", s.token);
    assert_eq!(s.get_as(&format!("/fhir/Patient/{d}"), &basic).status, 401);

    // A format the API does not speak: 406, as an OperationOutcome.
    for (accept, status) in [
        ("application/fhir+xml", 406),
        ("text/turtle, application/fhir+xml;q=0.9", 406),
        ("application/fhir+json;q=0", 406),
        ("application/fhir+json", 200),
        ("application/json, */*;q=0.1", 200),
        ("*/*", 200),
    ] {
        let mut h = s.treat();
        h.push(("Accept".into(), accept.into()));
        let r = s.get_as(&format!("/fhir/Patient/{d}"), &h);
        assert_eq!(r.status, status, "{accept}");
        if status == 406 {
            assert_eq!(r.json()["resourceType"], "OperationOutcome", "{accept}");
        }
    }
    // A body on a FHIR route: 413 as an OperationOutcome.
    let req = format!(
        "GET /fhir/Patient/{d} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        s.token
    );
    let r = raw(s.addr, req.as_bytes());
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["resourceType"], "OperationOutcome");

    // $summary: every empty section says why, and every section has its own code.
    for q in hub.patients.iter().filter(|q| q.shareable()).take(30) {
        let b = s
            .get(&format!(
                "/fhir/Patient/{}/$summary",
                q.nhs_number().digits()
            ))
            .json();
        let sections = b["entry"][0]["resource"]["section"].as_array().unwrap();
        let mut codes: Vec<String> = sections
            .iter()
            .map(|x| x["code"]["coding"][0]["code"].as_str().unwrap().to_owned())
            .collect();
        let all = codes.len();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), all, "a code per section");
        for x in sections {
            if x.get("entry").is_none() {
                assert!(x["emptyReason"]["coding"][0]["code"].is_string(), "{x}");
            }
        }
    }
}

/// The caseload list pages through exactly the patients it may show: objectors on the
/// lease are left out, every page has someone on it, and `next` is never offered past
/// the last patient.
#[test]
fn the_caseload_list_never_offers_a_page_past_its_last_patient() {
    let hub = TestHub::start(90, 65);
    let dev = Dev::enrolled(&hub);
    let all: Vec<NhsNumber> = hub.patients.iter().map(|p| p.nhs_number()).collect();
    let objectors = hub.patients.iter().filter(|p| !p.shareable()).count();
    assert!(objectors >= 3, "{objectors}");
    grant(&hub, &dev.id(), &all, json!({ "users": ["n1"] }));
    dev.sync().unwrap();
    let s = Served::start(dev);
    for count in [1, 4, 7, 100] {
        let mut url = format!("/v1/patients?_count={count}");
        let mut seen = Vec::new();
        loop {
            let v = s.get(&url).json();
            let rows = v["patients"].as_array().unwrap();
            assert!(!rows.is_empty(), "an empty page at {url}");
            seen.extend(
                rows.iter()
                    .map(|r| r["nhs_number"].as_str().unwrap().to_owned()),
            );
            match v["next"].as_str() {
                Some(next) => url = next.to_owned(),
                None => break,
            }
        }
        let mut want: Vec<String> = hub
            .patients
            .iter()
            .filter(|p| p.shareable())
            .map(|p| p.nhs_number().to_string())
            .collect();
        want.sort();
        seen.sort();
        assert_eq!(seen, want, "_count={count}");
    }
}

/// Clinical detail reaches FHIR as the source gave it (hazard log HAZ-03, HAZ-08): an
/// allergy's verification status (a confirmed allergy never served as unconfirmed, one
/// the source did not verify never served as confirmed), every alert's priority in the
/// core `flag-priority` extension, a medication's end date.
#[test]
fn clinical_detail_reaches_fhir_as_the_source_gave_it() {
    use sync_protocol::record::{AlertSeverity, AllergyVerification};
    let (hub, s, _) = served(80, 66, json!({ "users": ["n1"] }));
    let (mut verified, mut unstated, mut flags, mut ended) = (0, 0, 0, 0);
    for p in hub.patients.iter().filter(|p| p.shareable()) {
        let d = p.nhs_number().digits();
        if let Section::Entries(allergies) = &p.expected.allergies {
            let b = s
                .get(&format!("/fhir/AllergyIntolerance?patient={d}"))
                .json();
            for a in allergies.iter() {
                let r = entry_resource(&b, a.source_id.as_str());
                let got = r["verificationStatus"]["coding"][0]["code"].as_str();
                let want = a.verification.map(|v| match v {
                    AllergyVerification::Confirmed => "confirmed",
                    AllergyVerification::Unconfirmed => "unconfirmed",
                    AllergyVerification::Provisional => "provisional",
                    AllergyVerification::Differential => "differential",
                });
                assert_eq!(got, want);
                if want.is_some() {
                    verified += 1;
                } else {
                    unstated += 1;
                }
            }
        }
        if let Section::Entries(alerts) = &p.expected.alerts {
            let b = s.get(&format!("/fhir/Flag?patient={d}")).json();
            for a in alerts.iter() {
                let r = entry_resource(&b, a.source_id.as_str());
                let ext = r["extension"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|e| e["url"] == "http://hl7.org/fhir/StructureDefinition/flag-priority")
                    .unwrap();
                let want = match a.severity {
                    AlertSeverity::HighRisk => "PH",
                    AlertSeverity::Warning => "PM",
                    AlertSeverity::Information => "PL",
                };
                assert_eq!(ext["valueCodeableConcept"]["coding"][0]["code"], want);
                flags += 1;
            }
        }
        for m in p.expected.medications.entries() {
            if let Some(end) = m.ended {
                let b = s
                    .get(&format!("/fhir/MedicationStatement?patient={d}"))
                    .json();
                let r = entry_resource(&b, m.source_id.as_str());
                assert_eq!(r["effectivePeriod"]["end"], end.to_string());
                let ext = r["extension"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|e| {
                        e["url"]
                            .as_str()
                            .unwrap()
                            .ends_with("MedicationPrescribingOrganizationType")
                    })
                    .unwrap();
                assert_eq!(
                    ext["valueCodeableConcept"]["coding"][0]["code"],
                    if m.prescribed_elsewhere {
                        "prescribed-by-another-organisation"
                    } else {
                        "prescribed-at-gp-practice"
                    },
                    "UK Core: value[x] only CodeableConcept"
                );
                ended += 1;
            }
        }
    }
    assert!(
        verified > 10 && unstated > 0 && flags > 20 && ended > 5,
        "{verified} verified, {unstated} unstated, {flags} flags, {ended} ended"
    );
}

/// The resource with `id` among a searchset's entries.
fn entry_resource<'a>(bundle: &'a Value, id: &str) -> &'a Value {
    &bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resource"]["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in the bundle"))["resource"]
}

/// The first shareable patient of the hub that `f` picks.
fn shareable_where(
    hub: &TestHub,
    f: impl Fn(&carecache_synth::SourcePatient) -> bool,
) -> &carecache_synth::SourcePatient {
    hub.patients
        .iter()
        .filter(|p| p.shareable())
        .find(|p| f(p))
        .unwrap()
}

/// Two unmodified FHIR client libraries (PyPI's `fhirclient` and `fhirpy`, installed by
/// `.ci/run`) search a patient by NHS number and by family name and date of birth, page
/// through their alerts and medications by the `next` links, and read the `$summary`
/// document.
#[test]
fn unmodified_fhir_client_libraries_read_paged_searchsets_and_the_summary() {
    let (hub, s, _) = served(60, 67, json!({ "users": ["n1"] }));
    let p = shareable_where(&hub, |p| {
        p.expected.alerts.entries().len() >= 2 && p.expected.medications.entries().len() >= 3
    });
    let d = p.nhs_number().digits();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/fhir_clients.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(format!("http://{}/fhir", s.addr))
        .arg(&s.token)
        .arg(&d)
        .arg(p.expected.demographics.name.family.as_str())
        .arg(p.expected.demographics.birth_date.to_string())
        .output()
        .expect("python3 runs the client libraries (.ci/run installs fhirclient and fhirpy)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "pip install fhirclient fhirpy (.ci/run does): {stderr}"
    );
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut alerts: Vec<String> = p
        .expected
        .alerts
        .entries()
        .iter()
        .map(|a| a.source_id.as_str().to_owned())
        .collect();
    alerts.sort();
    let mut meds: Vec<String> = p
        .expected
        .medications
        .entries()
        .iter()
        .map(|m| m.source_id.as_str().to_owned())
        .collect();
    meds.sort();
    for lib in ["fhirclient", "fhirpy"] {
        assert_eq!(v[format!("{lib}_patient")], json!([d]), "{lib}: {v}");
        assert!(
            v[format!("{lib}_search")]
                .as_array()
                .is_some_and(|ids| ids.contains(&json!(d))),
            "{lib} demographic search: {v}"
        );
        assert_eq!(
            v[format!("{lib}_flags")],
            json!(alerts),
            "{lib} paged alerts: {v}"
        );
        assert_eq!(
            v[format!("{lib}_medications")],
            json!(meds),
            "{lib} paged medications: {v}"
        );
    }
    assert_eq!(v["fhirclient_summary"]["type"], "document");
    assert_eq!(v["fhirclient_summary"]["sections"][0], "Alerts");
}

/// Field by field, source FHIR (what the synthetic source system wrote) against the
/// device's FHIR for the same items: no clinical element is dropped on the way — alert
/// code and system, display, priority, period, author; allergy code, clinical and
/// verification status, criticality, reactions (manifestation, severity), onset;
/// medication code, status, dosage text, effective period, course, last issue,
/// prescribing organisation.
#[test]
fn source_fhir_and_device_fhir_agree_on_every_clinical_element() {
    let (hub, s, _) = served(80, 68, json!({ "users": ["n1"] }));
    let pick = |v: &Value, paths: &[&str]| -> Vec<Value> {
        paths
            .iter()
            .map(|p| v.pointer(p).cloned().unwrap_or(Value::Null))
            .collect()
    };
    let coding = |c: &Value| -> Value {
        // The coding's system, code and display, or the text of a text-only concept.
        match c.get("coding") {
            Some(cs) => json!([cs[0]["system"], cs[0]["code"], cs[0]["display"]]),
            None => c["text"].clone(),
        }
    };
    let ext = |r: &Value, suffix: &str| -> Value {
        r["extension"]
            .as_array()
            .and_then(|e| {
                e.iter()
                    .find(|x| x["url"].as_str().is_some_and(|u| u.ends_with(suffix)))
            })
            .cloned()
            .unwrap_or(Value::Null)
    };
    let mut compared = [0usize; 3];
    for p in hub.patients.iter().filter(|p| p.shareable()) {
        let source = carecache_synth::fhir::resources(p);
        let d = p.nhs_number().digits();
        for (route, kind, i) in [
            ("Flag", "Flag", 0),
            ("AllergyIntolerance", "AllergyIntolerance", 1),
            ("MedicationStatement", "MedicationStatement", 2),
        ] {
            let b = s.get(&format!("/fhir/{route}?patient={d}")).json();
            for dev in b["entry"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["search"]["mode"] == "match")
                .map(|e| &e["resource"])
            {
                let mut src = source
                    .iter()
                    .find(|r| r["resourceType"] == kind && r["id"] == dev["id"])
                    .unwrap_or_else(|| panic!("{kind}/{} not in the source", dev["id"]))
                    .clone();
                // A dose the source structured without words: the device serves the
                // words the hub wrote beside the structure.
                if kind == "MedicationStatement"
                    && src["dosage"][0].is_object()
                    && src["dosage"][0]["text"].is_null()
                {
                    assert!(
                        dev["dosage"][0]["text"].is_string(),
                        "words for a structured dose"
                    );
                    assert!(dev["dosage"][0]["timing"].is_object(), "and its structure");
                    src["dosage"][0]["text"] = dev["dosage"][0]["text"].clone();
                }
                let src = &src;
                // The clinical elements of one resource, as comparable values.
                let fields = |r: &Value| -> Value {
                    let reactions = |r: &Value| -> Value {
                        r["reaction"]
                            .as_array()
                            .map(|rs| {
                                rs.iter()
                                    .map(|x| json!([coding(&x["manifestation"][0]), x["severity"]]))
                                    .collect::<Vec<_>>()
                            })
                            .map_or(Value::Null, Value::from)
                    };
                    match kind {
                        "Flag" => json!([
                            coding(&r["code"]),
                            ext(r, "flag-priority")["valueCodeableConcept"]["coding"][0]["code"],
                            pick(r, &["/period/start", "/period/end", "/status"]),
                        ]),
                        "AllergyIntolerance" => json!([
                            coding(&r["code"]),
                            reactions(r),
                            pick(
                                r,
                                &[
                                    "/clinicalStatus/coding/0/code",
                                    "/verificationStatus/coding/0/code",
                                    "/criticality",
                                    "/onsetDateTime",
                                ],
                            ),
                        ]),
                        _ => json!([
                            coding(&r["medicationCodeableConcept"]),
                            ext(r, "LastIssueDate")["valueDateTime"],
                            ext(r, "PrescribingOrganizationType")["valueCodeableConcept"]["coding"]
                                [0]["code"],
                            pick(
                                r,
                                &[
                                    "/status",
                                    "/dosage/0/text",
                                    "/effectivePeriod/start",
                                    "/effectivePeriod/end",
                                    "/category/coding/0/code",
                                ],
                            ),
                        ]),
                    }
                };
                assert_eq!(
                    fields(src),
                    fields(dev),
                    "{kind}/{}: source and device differ",
                    dev["id"]
                );
                // Who recorded it, as the source named them.
                let who_key = match kind {
                    "Flag" => "author",
                    "AllergyIntolerance" => "recorder",
                    _ => "informationSource",
                };
                let who = |r: &Value| {
                    pick(
                        &r[who_key],
                        &["/identifier/value", "/display", "/reference"],
                    )
                };
                assert_eq!(who(src), who(dev), "{kind}/{}: {who_key}", dev["id"]);
                // Beyond the listed elements: the whole resource is what the source
                // wrote, less what only a source export carries (its version, the
                // synthetic label) and the device's freshness tag.
                let strip = |r: &Value| {
                    let mut r = r.clone();
                    // The patient is named by the source's id there, by NHS number here.
                    if let Some(o) = r.as_object_mut() {
                        o.remove("subject");
                        o.remove("patient");
                    }
                    if let Some(m) = r.get_mut("meta").and_then(Value::as_object_mut) {
                        m.remove("versionId");
                        m.remove("tag");
                        if let Some(l) = m.get_mut("security").and_then(Value::as_array_mut) {
                            l.retain(|l| l["code"] != "HTEST");
                            if l.is_empty() {
                                m.remove("security");
                            }
                        }
                    }
                    r
                };
                assert_eq!(
                    strip(src),
                    strip(dev),
                    "{kind}/{}: the whole resource",
                    dev["id"]
                );
                compared[i] += 1;
            }
        }
    }
    assert!(
        compared.iter().all(|n| *n > 20),
        "compared {compared:?} alerts, allergies, medications"
    );
}

/// DNS rebinding: a web page whose name was rebound to 127.0.0.1 sends its own name as
/// `Host`; the API answers only requests addressed to this device.
#[test]
fn requests_addressed_to_another_host_are_refused() {
    let (_hub, s, patients) = served(4, 12, serde_json::json!({}));
    let ask = |host: &str, path: &str| {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
        for (k, v) in s.treat() {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        raw(s.addr, req.as_bytes())
    };
    let read = format!("/v1/patients/{}", patients[0].digits());
    for host in [
        "attacker.example",
        "attacker.example:7380",
        "127.0.0.1.nip.io",
        "localhost.attacker.example",
        "[::2]",
    ] {
        for path in ["/status", "/metrics", "/fhir/metadata", read.as_str(), "/"] {
            let r = ask(host, path);
            assert_eq!(r.status, 421, "{host} {path}: {}", r.text());
            assert!(!r.text().contains(&patients[0].digits()));
        }
        let r = ask(host, "/fhir/metadata");
        assert_eq!(r.json()["resourceType"], "OperationOutcome", "{host}");
    }
    for host in [
        "127.0.0.1",
        "localhost:7380",
        "127.0.0.2",
        "[::1]:7380",
        "LOCALHOST",
    ] {
        assert_eq!(ask(host, &read).status, 200, "{host}");
    }
}

/// Without a client token `/status` says only whether the device is ready, and `/metrics`
/// is refused; with one, both answer whole.
#[test]
fn status_and_metrics_reveal_nothing_but_readiness_without_a_token() {
    let (_hub, s, _) = served(4, 13, json!({}));
    let anon = |path: &str| {
        raw(
            s.addr,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
    };
    let r = anon("/status");
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({ "ready": true }), "readiness alone");
    let r = anon("/metrics");
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(!r.text().contains("carecache_"));
    let full = s.get("/status").json();
    assert!(full["device_id"].is_string() && full["leases"].is_array());
    assert!(s.get("/metrics").text().contains("carecache_patients_held"));
    // A wrong token is not a monitor: refused and audited.
    let wrong = raw(
        s.addr,
        b"GET /status HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer cct_nonsense\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(wrong.status, 401);
}

/// A caller with a token but no lease naming a patient gets the same answer whether the
/// patient objected, is unknown, or is on a caseload that is not theirs; a member of
/// staff the lease names is told of the objection.
#[test]
fn a_caller_without_a_lease_cannot_tell_an_objector_from_any_other_patient() {
    let hub = TestHub::start(120, 14);
    let dev = Dev::enrolled(&hub);
    let all: Vec<NhsNumber> = hub.patients.iter().map(|p| p.nhs_number()).collect();
    let objector = hub
        .patients
        .iter()
        .find(|p| !p.shareable())
        .map(|p| p.nhs_number())
        .expect("the synthetic caseload has an objector");
    grant(&hub, &dev.id(), &all, json!({ "users": ["n1"] }));
    dev.sync().unwrap();
    let s = Served::start(dev);
    let on_caseload = *all.iter().find(|n| **n != objector).unwrap();
    let unknown = (0..1000)
        .filter_map(|k| NhsNumber::from_stem(999_999_000 + k))
        .find(|n| !all.contains(n))
        .unwrap();
    let as_user = |user: &str, nhs: NhsNumber| {
        let mut h = s.treat();
        h[1].1 = user.to_owned();
        let r = s.get_as(&format!("/v1/patients/{}", nhs.digits()), &h);
        let e = r.json()["error"].clone();
        (r.status, e["code"].clone(), e["message"].clone())
    };
    let answers: Vec<_> = [objector, on_caseload, unknown]
        .into_iter()
        .map(|n| as_user("n9", n))
        .collect();
    assert_eq!(answers[0].0, 403, "{answers:?}");
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "one answer for all three: {answers:?}"
    );
    // The FHIR read too.
    let fhir: Vec<u16> = [objector, on_caseload, unknown]
        .into_iter()
        .map(|n| {
            let mut h = s.treat();
            h[1].1 = "n9".to_owned();
            s.get_as(&format!("/fhir/Patient/{}", n.digits()), &h)
                .status
        })
        .collect();
    assert!(fhir.iter().all(|c| *c == fhir[0]), "{fhir:?}");
    // The member of staff whose caseload it is learns why the record is not there.
    let (status, code, _) = as_user("n1", objector);
    assert_eq!((status, code), (404, json!("objected")));
}

/// Failed authentication is counted per client and minute: the first of a minute is
/// audited as it comes, the rest of the minute as one count when it is over, and past
/// the limit the answer is 429 before anything else — a flood writes two entries a
/// minute, not thousands. Callers with a valid token are not slowed.
#[test]
fn failed_authentication_is_rate_limited_and_its_audit_coalesced() {
    let (_hub, s, patients) = served(4, 15, json!({}));
    let path = format!("/v1/patients/{}", patients[0].digits());
    let no_token = || {
        raw(
            s.addr,
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
    };
    let before = s.audit().len();
    let mut statuses = Vec::new();
    for _ in 0..150 {
        statuses.push(no_token().status);
    }
    assert!(statuses[..60].iter().all(|c| *c == 401), "{statuses:?}");
    assert!(statuses[60..].iter().all(|c| *c == 429), "{statuses:?}");
    let limited = no_token();
    assert!(limited.header("retry-after").is_some());
    assert_eq!(
        limited.json()["error"]["code"],
        "too-many-failed-authentications"
    );
    assert_eq!(s.get(&path).status, 200, "a valid client is not slowed");
    let failures = |s: &Served| -> Vec<AuditEvent> {
        s.audit()
            .into_iter()
            .skip(before)
            .filter_map(|(_, r)| match r.event {
                e @ (AuditEvent::AuthFailure { .. } | AuditEvent::AuthFailures { .. }) => Some(e),
                _ => None,
            })
            .collect()
    };
    assert_eq!(failures(&s).len(), 1, "the first of the minute, at once");
    // The next minute: the count of the last one is audited, once.
    s.clock.advance(Duration::from_secs(61));
    assert_eq!(no_token().status, 401);
    let f = failures(&s);
    assert_eq!(f.len(), 3, "{f:?}");
    assert!(matches!(
        &f[1],
        AuditEvent::AuthFailures {
            reason: AuthFailure::NoToken,
            count: 150,
            client: None,
            ..
        }
    ));
    assert!(matches!(&f[2], AuditEvent::AuthFailure { .. }));
}
