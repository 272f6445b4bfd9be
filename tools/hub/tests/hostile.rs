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
