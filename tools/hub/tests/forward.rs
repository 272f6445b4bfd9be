//! Audit forwarded upstream as FHIR AuditEvent to a real FHIR R4 server (Medplum's engine
//! and validator, `tools/fhir-server`): at least once, never twice, resuming from the
//! saved position after an unreachable server, a lying one and a refusal.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

use carecache_hub::forward::{ForwardError, Forwarder};
use carecache_hub::testing::FhirServer;

use crate::audit::{chain, prev_of, push};
use crate::harness::TestHub;

/// The body of the HTTP request arriving on `conn` (its headers read past).
fn request_body(conn: &std::net::TcpStream) -> Vec<u8> {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    body
}

/// A server in front of `upstream` that passes one request on and answers it with
/// broken JSON, as a proxy that failed after the upstream had stored the Bundle (the
/// hub's crash between the send and the saved position looks the same to the server).
fn lying_proxy(upstream: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = upstream.to_owned();
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let body = request_body(&conn);
        let status = ureq::post(&upstream)
            .header("content-type", "application/fhir+json")
            .send(&body[..])
            .unwrap()
            .status();
        assert_eq!(status.as_u16(), 200);
        let mut conn = conn;
        conn.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 9\r\nconnection: close\r\n\r\n{\"broken\"",
        )
        .unwrap();
    });
    format!("http://{addr}/fhir")
}

fn ids(fhir: &FhirServer) -> Vec<String> {
    let (status, body) = fhir.get("AuditEvent?_count=1000&_elements=id");
    assert_eq!(status, 200);
    let mut ids: Vec<String> = body["entry"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

fn versions(fhir: &FhirServer, id: &str) -> u64 {
    let (status, body) = fhir.get(&format!("AuditEvent/{id}/_history"));
    assert_eq!(status, 200, "{body}");
    body["entry"].as_array().unwrap().len() as u64
}

#[test]
fn audit_reaches_a_fhir_server_at_least_once_and_never_twice() {
    let hub = TestHub::start(10);
    let a = hub.enrol(None);
    let b = hub.enrol(None);
    let entries = chain(25, &hub);
    assert_eq!(push(&a, &entries, prev_of(&entries, 0)).0, 200);
    assert_eq!(push(&b, &entries[..7], prev_of(&entries, 0)).0, 200);
    let state = &hub.hub.state;
    assert_eq!(state.forward_pending().unwrap(), 32);
    let fhir = FhirServer::start();

    // Nothing listening: an error, nothing moved.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/fhir", l.local_addr().unwrap())
    };
    let err = Forwarder::new(&dead, None, None, 10)
        .unwrap()
        .pass(state)
        .unwrap_err();
    assert!(matches!(err, ForwardError::Unreachable(_)), "{err}");
    assert_eq!(state.forward_pending().unwrap(), 32);

    // The first Bundle reaches the server but its answer is lost: stored upstream,
    // not counted as forwarded here.
    let err = Forwarder::new(&lying_proxy(&fhir.base), None, None, 10)
        .unwrap()
        .pass(state)
        .unwrap_err();
    assert!(matches!(err, ForwardError::BadAnswer(10)), "{err}");
    assert_eq!(fhir.count("AuditEvent"), 10);
    assert_eq!(state.forward_pending().unwrap(), 32);

    // A server that refuses the Bundle (a path that takes no batch): an error naming
    // the status and issue codes only.
    let refusing = format!("{}/Patient", fhir.base);
    let err = Forwarder::new(&refusing, None, None, 10)
        .unwrap()
        .pass(state)
        .unwrap_err();
    let ForwardError::Refused {
        status, refused, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert!((400..500).contains(status), "{err}");
    assert_eq!(*refused, 10);
    for p in &hub.patients {
        assert!(!err.to_string().contains(&p.nhs_number().digits()), "{err}");
    }
    assert_eq!(state.forward_pending().unwrap(), 32);

    // The real thing: everything, the first ten sent again and replaced, not doubled.
    let forwarder = Forwarder::new(&fhir.base, None, None, 10).unwrap();
    let done = forwarder.pass(state).unwrap();
    assert_eq!((done.accepted, done.bundles), (32, 4));
    assert_eq!(state.forward_pending().unwrap(), 0);
    let mut want: Vec<String> = (1..=25)
        .map(|s| format!("{}-{s}", a.id))
        .chain((1..=7).map(|s| format!("{}-{s}", b.id)))
        .collect();
    want.sort();
    assert_eq!(ids(&fhir), want, "every entry once, by its idempotent id");
    let (_, first) = fhir.get(&format!("AuditEvent/{}-1", a.id));
    assert_eq!(first["resourceType"], "AuditEvent");
    // Sent in device then sequence order: the first ten (the lying proxy's Bundle)
    // twice, as new versions of the same resources; the rest once.
    let mut order: Vec<(String, u64)> = (1..=25)
        .map(|s| (a.id.clone(), s))
        .chain((1..=7).map(|s| (b.id.clone(), s)))
        .collect();
    order.sort();
    for (i, (device, seq)) in order.iter().enumerate() {
        let expect = if i < 10 { 2 } else { 1 };
        assert_eq!(
            versions(&fhir, &format!("{device}-{seq}")),
            expect,
            "{device}-{seq}"
        );
    }

    // Resumes from the saved position: only what is new.
    assert_eq!(push(&b, &entries[7..12], prev_of(&entries, 7)).0, 200);
    let done = forwarder.pass(state).unwrap();
    assert_eq!((done.accepted, done.bundles), (5, 1));
    assert_eq!(fhir.count("AuditEvent"), 37);
    for seq in 8..=12 {
        assert_eq!(versions(&fhir, &format!("{}-{seq}", b.id)), 1);
    }
    assert_eq!(
        forwarder.pass(state).unwrap().bundles,
        0,
        "nothing left to send"
    );
    let positions = state.forwarded().unwrap();
    assert_eq!((positions[&a.id], positions[&b.id]), (25, 12));

    // What waits shows in /metrics once this instance forwards.
    assert_eq!(push(&a, &chain(27, &hub)[25..], entries[24].hash).0, 200);
    let (_, text) = hub.officer_get("/metrics", carecache_hub::testing::ADMIN_TOKEN, None);
    assert!(
        !text.contains("audit_forward_pending"),
        "not forwarding: {text}"
    );
    hub.hub
        .run_forward(&Forwarder::new(&dead, None, None, 10).unwrap());
    let (_, text) = hub.officer_get("/metrics", carecache_hub::testing::ADMIN_TOKEN, None);
    assert!(
        text.contains("carecache_hub_audit_forward_pending 2\n"),
        "{text}"
    );
    assert!(
        text.contains("carecache_hub_audit_forward_passes_total{outcome=\"failed\"} 1\n"),
        "{text}"
    );
    hub.hub.run_forward(&forwarder);
    let (_, text) = hub.officer_get("/metrics", carecache_hub::testing::ADMIN_TOKEN, None);
    assert!(
        text.contains("carecache_hub_audit_forward_pending 0\n"),
        "{text}"
    );
    assert!(
        text.contains("carecache_hub_audit_forwarded_total 2\n"),
        "{text}"
    );
}

/// `carecache-hub serve` with `[forward]` forwards on its own, every `interval_secs`.
#[test]
fn a_running_hub_forwards_on_its_own() {
    let hub = TestHub::start(10);
    let a = hub.enrol(None);
    let entries = chain(23, &hub);
    assert_eq!(push(&a, &entries, prev_of(&entries, 0)).0, 200);
    let closed = hub.close();
    let dir = closed.dir.path();
    let fhir = FhirServer::start();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = carecache_hub::testing::write_hub_toml(
        dir,
        dir,
        &dir.join("ndjson"),
        &format!(
            "listen = \"127.0.0.1:{port}\"\n[forward]\nurl = \"{}\"\nbatch = 5\ninterval_secs = 1\n",
            fhir.base
        ),
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_carecache-hub"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("CARECACHE_HUB_ADMIN_TOKEN", "serve-admin-token-0123456789")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while fhir.count("AuditEvent") < 23 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(fhir.count("AuditEvent"), 23);
    assert_eq!(ids(&fhir).len(), 23);
}

/// An audit store that refuses every AuditEvent whose id starts with `refuse` (400 in
/// the batch-response) and accepts the rest: it answers `bundles` requests, then stops.
fn refusing_one_device(refuse: String, bundles: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for _ in 0..bundles {
            let (conn, _) = listener.accept().unwrap();
            let body = request_body(&conn);
            let bundle: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let entries: Vec<serde_json::Value> = bundle["entry"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    let id = e["resource"]["id"].as_str().unwrap();
                    if id.starts_with(&refuse) {
                        serde_json::json!({ "response": { "status": "400 Bad Request",
                            "outcome": { "resourceType": "OperationOutcome",
                                "issue": [{ "severity": "error", "code": "invalid",
                                    "diagnostics": "not accepted" }] } } })
                    } else {
                        serde_json::json!({ "response": { "status": "201 Created" } })
                    }
                })
                .collect();
            let answer = serde_json::json!({
                "resourceType": "Bundle", "type": "batch-response", "entry": entries,
            })
            .to_string();
            let mut conn = conn;
            write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            )
            .unwrap();
        }
    });
    format!("http://{addr}/fhir")
}

/// One device's entries refused by the audit store hold back only that device: the
/// others are forwarded in the same pass, the refused device's position stays before
/// the refused entry, and the pass reports the refusal.
#[test]
fn a_refused_device_does_not_hold_back_the_others() {
    let hub = TestHub::start(10);
    let a = hub.enrol(None);
    let b = hub.enrol(None);
    let entries = chain(25, &hub);
    assert_eq!(push(&a, &entries, prev_of(&entries, 0)).0, 200);
    assert_eq!(push(&b, &entries[..25], prev_of(&entries, 0)).0, 200);
    let state = &hub.hub.state;
    // The device that sorts first is the refused one: without care its 25 entries would
    // fill every Bundle of 10 and the other's never be sent.
    let (first, second) = if a.id < b.id { (&a, &b) } else { (&b, &a) };
    let url = refusing_one_device(format!("{}-", first.id), 10);
    let err = Forwarder::new(&url, None, None, 10)
        .unwrap()
        .pass(state)
        .unwrap_err();
    let ForwardError::Refused { status, issues, .. } = &err else {
        panic!("{err}")
    };
    assert_eq!(*status, 400);
    assert!(
        issues.contains("invalid") && !issues.contains("not accepted"),
        "{err}"
    );
    let positions = state.forwarded().unwrap();
    assert_eq!(
        positions.get(&second.id),
        Some(&25),
        "the other device went on"
    );
    assert_eq!(
        positions.get(&first.id),
        None,
        "the refused device stays before its entry 1"
    );
    assert_eq!(state.forward_pending().unwrap(), 25);
}
