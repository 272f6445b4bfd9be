//! Bad input at the hub's door: malformed frames, wrong content type, oversize bodies,
//! missing or foreign client certificates, rate limits, admin without a token.

use sync_protocol::message::{ErrorCode, Message, MessageKind};

use crate::harness::{TestHub, lease_json, post_raw};

fn code(a: &(u16, Message)) -> Option<ErrorCode> {
    match &a.1 {
        Message::Error(e) => Some(e.code),
        _ => None,
    }
}

#[test]
fn malformed_frames_are_refused_and_nothing_applied() {
    let hub = TestHub::start(10);
    let device = hub.enrol(None);
    let url = format!("{}/ccsp/v1/pull", device.base);
    let limit = MessageKind::Error.max_payload();
    for body in [
        &b""[..],
        b"CCSP",
        b"GET / HTTP/1.1",
        &[
            0x43, 0x43, 0x53, 0x50, 0, 1, 5, 0, 0, 0, 0, 3, 0, 0, 0, 3, 1, 2, 3,
        ],
    ] {
        let a = post_raw(
            &device.agent,
            &url,
            carecache_hub::server::FRAME_CONTENT_TYPE,
            body,
            limit,
        );
        assert_eq!(a.0, 400);
        assert_eq!(code(&a), Some(ErrorCode::Malformed));
    }
    let a = post_raw(&device.agent, &url, "application/json", b"{}", limit);
    assert_eq!(code(&a), Some(ErrorCode::Malformed));
    // A hello sent to the pull route.
    let hello = sync_protocol::encode(
        &Message::Hello(sync_protocol::message::Hello {
            min_version: 1,
            max_version: 1,
            capabilities: sync_protocol::types::Capabilities(0),
            device_time: sync_protocol::types::Timestamp::from_millis(0).unwrap(),
            software: sync_protocol::types::Text::new("x").unwrap(),
        }),
        sync_protocol::Compression::None,
    )
    .unwrap();
    assert_eq!(
        code(&post_raw(
            &device.agent,
            &url,
            carecache_hub::server::FRAME_CONTENT_TYPE,
            &hello,
            limit
        )),
        Some(ErrorCode::Malformed)
    );
    // A version this hub does not speak (the next two after the newest).
    let newest = *sync_protocol::codec::SUPPORTED_VERSIONS.end();
    let v2 = sync_protocol::encode(
        &Message::Hello(sync_protocol::message::Hello {
            min_version: newest + 1,
            max_version: newest + 2,
            capabilities: sync_protocol::types::Capabilities(0),
            device_time: sync_protocol::types::Timestamp::from_millis(0).unwrap(),
            software: sync_protocol::types::Text::new("x").unwrap(),
        }),
        sync_protocol::Compression::None,
    )
    .unwrap();
    let a = post_raw(
        &device.agent,
        &format!("{}/ccsp/v1/hello", device.base),
        carecache_hub::server::FRAME_CONTENT_TYPE,
        &v2,
        limit,
    );
    assert_eq!(code(&a), Some(ErrorCode::UnsupportedVersion));
    // Oversize: a pull body over its 64 KiB limit is refused before it is read: the
    // answer is 413, unless the hub's answer and close came while the body was still
    // being written (the client then sees the connection closed, never a success).
    let big = vec![0u8; 70 * 1024];
    match device
        .agent
        .post(&url)
        .header("Content-Type", carecache_hub::server::FRAME_CONTENT_TYPE)
        .send(&big[..])
    {
        Ok(mut resp) => {
            assert_eq!(resp.status().as_u16(), 413);
            let body = resp.body_mut().read_to_vec().unwrap();
            match sync_protocol::decode(&body).unwrap() {
                Message::Error(e) => assert_eq!(e.code, ErrorCode::TooLarge),
                other => panic!("{}", other.kind()),
            }
        }
        Err(ureq::Error::Io(e)) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        ),
        Err(e) => panic!("{e}"),
    }
    // The device still syncs normally afterwards.
    assert!(matches!(device.hello().1, Message::Welcome(_)));
}

#[test]
fn device_routes_need_an_enrolled_certificate() {
    let hub = TestHub::start(10);
    let anon = hub.agent(None);
    let pull = sync_protocol::encode(
        &Message::Pull(sync_protocol::message::Pull::new(None, 262_144)),
        sync_protocol::Compression::None,
    )
    .unwrap();
    let a = post_raw(
        &anon,
        &hub.url("/ccsp/v1/pull"),
        carecache_hub::server::FRAME_CONTENT_TYPE,
        &pull,
        4096,
    );
    assert_eq!(a.0, 401);
    assert_eq!(code(&a), Some(ErrorCode::Unauthorized));

    // A certificate from another CA fails the TLS handshake itself.
    let other = TestHub::start(5);
    let foreign = other.enrol(None);
    let agent = hub.agent(Some((&foreign.cert_der, &foreign.key_pem)));
    let err = agent
        .post(&hub.url("/ccsp/v1/pull"))
        .header("Content-Type", carecache_hub::server::FRAME_CONTENT_TYPE)
        .send(&pull[..]);
    assert!(
        err.is_err(),
        "a foreign client certificate must not connect"
    );

    // A client that trusts the system roots, not the dev CA, does not connect either.
    let plain: ureq::Agent = ureq::Agent::config_builder().build().into();
    assert!(plain.get(&hub.url("/admin/v1/status")).call().is_err());
}

#[test]
fn admin_api_needs_its_token_and_checks_input() {
    let hub = TestHub::start(10);
    let (status, _) = hub.admin_as("GET", "/admin/v1/status", None, "wrong-token-wrong-token");
    assert_eq!(status, 401);
    let (status, _) = hub.admin_as("GET", "/admin/v1/leases", None, "");
    assert_eq!(status, 401);
    let device = hub.enrol(None);
    let mut bad = lease_json(&device.id, &["9990000000".into()]);
    bad["patients"] = serde_json::json!(["1234567890"]);
    let (status, body) = hub.admin("POST", "/admin/v1/leases", Some(bad));
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("invalid NHS number")
    );
    let mut backwards = lease_json(&device.id, &[]);
    backwards["not_after"] = "2026-11-23T00:00:00Z".into();
    let (status, _) = hub.admin("POST", "/admin/v1/leases", Some(backwards));
    assert_eq!(status, 422);
    let (status, _) = hub.admin(
        "POST",
        "/admin/v1/leases",
        Some(serde_json::json!({ "label": "x" })),
    );
    assert_eq!(status, 400);
    let (status, _) = hub.admin("DELETE", "/admin/v1/leases/999", None);
    assert_eq!(status, 404);
}

#[test]
fn requests_over_the_rate_limit_get_429() {
    let limits = carecache_hub::config::Limits {
        requests_per_second: 1,
        burst: 3,
        ..Default::default()
    };
    let hub = TestHub::start_with(5, limits);
    let device = hub.enrol(None);
    let answers: Vec<_> = (0..8).map(|_| device.hello()).collect();
    let limited = answers
        .iter()
        .filter(|a| code(a) == Some(ErrorCode::RateLimited))
        .count();
    assert!(limited >= 3, "{limited} of 8 limited");
    assert!(answers.iter().all(|a| a.0 == 200 || a.0 == 429));
}

/// The real `carecache-hub serve`: ten refused admin tokens from one address, then even
/// the right token from it is refused (429, Retry-After) for the lockout; each refusal is
/// logged with the address and never the token presented.
#[test]
fn failed_admin_logins_are_throttled_per_address_and_logged() {
    use std::io::{BufRead, Read};
    use std::process::{Command, Stdio};

    let admin_token = "serve-admin-token-0123456789";
    let guess = "guessed-token-guessed-token";
    let dir = tempfile::tempdir().unwrap();
    let nd = dir.path().join("ndjson");
    carecache_synth::fhir::write_ndjson(
        &carecache_synth::Generator::new(3).source_patients(5),
        &nd,
    )
    .unwrap();
    carecache_hub::pki::dev_ca(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = carecache_hub::testing::write_hub_toml(
        dir.path(),
        &dir.path().join("data"),
        &nd,
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_carecache-hub"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("CARECACHE_HUB_ADMIN_TOKEN", admin_token)
        .env("RUST_LOG", "carecache_hub=info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    while !log.contains("hub serving") {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "hub exited: {log}"
        );
        log.push_str(&line);
    }
    let ca =
        ureq::tls::Certificate::from_pem(&std::fs::read(dir.path().join("pki/ca.pem")).unwrap())
            .unwrap()
            .to_owned();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
                    ca,
                ])))
                .build(),
        )
        .http_status_as_error(false)
        .build()
        .into();
    let status = |token: &str| {
        let r = agent
            .get(format!("https://localhost:{port}/admin/v1/status"))
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .unwrap();
        (
            r.status().as_u16(),
            r.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        )
    };
    assert_eq!(status(admin_token).0, 200);
    for _ in 0..carecache_hub::server::ADMIN_FAILURES_ALLOWED {
        assert_eq!(status(guess).0, 401);
    }
    let (locked, retry) = status(admin_token);
    assert_eq!(locked, 429, "the right token too, from that address");
    assert_eq!(
        retry.as_deref(),
        Some(
            carecache_hub::server::ADMIN_LOCKOUT
                .as_secs()
                .to_string()
                .as_str()
        )
    );
    child.kill().unwrap();
    child.wait().unwrap();
    stderr.read_to_string(&mut log).unwrap();
    let failures = log
        .lines()
        .filter(|l| l.contains("admin login failed"))
        .collect::<Vec<_>>();
    assert_eq!(
        failures.len(),
        carecache_hub::server::ADMIN_FAILURES_ALLOWED as usize,
        "{log}"
    );
    assert!(failures.iter().all(|l| l.contains("127.0.0.1")), "{log}");
    assert!(log.contains("too many failed logins"), "{log}");
    assert!(
        !log.contains(guess) && !log.contains(admin_token),
        "no token logged"
    );
}
