//! Staff identity proven by OpenID Connect (oidc mode), against a real provider
//! (tools/oidc-provider) on loopback: the daemon's API and its audit, online and offline.

use std::time::Duration;

use base64::Engine as _;
use hmac::{KeyInit as _, Mac as _};
use serde_json::{Value, json};
use sync_protocol::NhsNumber;
use sync_protocol::audit::{
    AuditEvent, AuditOutcome, DenyReason, SessionEnd, SessionEvent, SessionRefusal,
};

use crate::api_harness::{Resp, Served, raw};
use crate::device_harness::{Dev, TestHub, at, grant, shareable};
use crate::oidc_harness::{CREW_APP, Provider, VIEWER, oidc_section};

pub(crate) const PIN: &str = "482916";

pub(crate) struct World {
    pub(crate) provider: Provider,
    pub(crate) hub: TestHub,
    pub(crate) served: Served,
    pub(crate) patients: Vec<NhsNumber>,
}

fn wall_now() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A hub, a provider, and a device in oidc mode trusting it (its `[identity]` ends with
/// `extra`), enrolled, with a team lease on the hub's shareable patients from an hour ago
/// for a day, synced (which fetches the provider's keys), serving its API. Clocks read
/// the real time, as the provider's tokens do.
pub(crate) fn world(extra: &str) -> World {
    world_leased(extra, json!({}))
}

/// [`world`] with the lease's fields overridden by `lease` (times as offsets in ms from
/// now under `ends_in_ms`).
fn world_leased(extra: &str, lease: Value) -> World {
    let provider = Provider::start();
    let hub = TestHub::start(12, 71);
    let section = oidc_section(&provider, extra);
    let dev = Dev::with_config(&hub, |t| {
        t.replace("[identity]\nmode = \"asserted\"\n", &section)
    });
    dev.device.enrol(&hub.token()).unwrap();
    let now = wall_now();
    hub.set_time(now);
    dev.clock.set_wall(now);
    let patients = shareable(&hub, 12);
    let mut spec = json!({ "not_before": at(now - 3_600_000), "not_after": at(now + 86_400_000) });
    for (k, v) in lease.as_object().unwrap() {
        match k.as_str() {
            "ends_in_ms" => spec["not_after"] = json!(at(now + v.as_u64().unwrap())),
            _ => spec[k] = v.clone(),
        }
    }
    grant(&hub, &dev.id(), &patients, spec);
    dev.sync().unwrap();
    assert!(
        dev.device.identity().has_keys(),
        "a sync fetches the issuer's keys"
    );
    let served = Served::start(dev);
    // The device's clock is manual: bring it to the real time the provider's tokens are
    // stamped with, however long the setup took.
    served.clock.set_wall(wall_now());
    World {
        provider,
        hub,
        served,
        patients,
    }
}

fn request(s: &Served, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    raw(s.addr, req.as_bytes())
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `POST /v1/session` as client `token`.
fn open_as(s: &Served, token: &str, id_token: &str, pin: &str) -> Resp {
    let body = json!({ "id_token": id_token, "pin": pin }).to_string();
    request(
        s,
        "POST",
        "/v1/session",
        &[("Authorization", &bearer(token))],
        &body,
    )
}

fn open(s: &Served, id_token: &str) -> String {
    let r = open_as(s, &s.token, id_token, PIN);
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["session"].as_str().unwrap().to_owned()
}

/// A patient read naming `session` (and whatever else `extra` adds).
fn read(s: &Served, session: &str, nhs: &NhsNumber, extra: &[(&str, &str)]) -> Resp {
    let auth = bearer(&s.token);
    let mut h = vec![
        ("Authorization", auth.as_str()),
        ("X-Carecache-Session", session),
        ("X-Carecache-Purpose", "TREAT"),
    ];
    h.extend_from_slice(extra);
    request(s, "GET", &format!("/v1/patients/{}", nhs.digits()), &h, "")
}

fn confirm(s: &Served, session: &str, pin: &str) -> Resp {
    request(
        s,
        "POST",
        "/v1/session/confirm",
        &[
            ("Authorization", &bearer(&s.token)),
            ("X-Carecache-Session", session),
        ],
        &json!({ "pin": pin }).to_string(),
    )
}

fn error_code(r: &Resp) -> String {
    r.json()["error"]["code"].as_str().unwrap_or("").to_owned()
}

fn session_events(s: &Served) -> Vec<SessionEvent> {
    s.audit()
        .into_iter()
        .filter_map(|(_, r)| match r.event {
            AuditEvent::Session(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn refusals(s: &Served) -> Vec<SessionRefusal> {
    session_events(s)
        .into_iter()
        .filter_map(|e| match e {
            SessionEvent::Refused { reason, .. } => Some(reason),
            _ => None,
        })
        .collect()
}

fn last_event(s: &Served) -> AuditEvent {
    s.audit().pop().unwrap().1.event
}

#[test]
fn a_verified_id_token_opens_a_session_that_alone_names_the_member_of_staff() {
    let w = world("");
    let s = &w.served;
    let token = w.provider.id_token(CREW_APP, "paramedic.one");
    let r = open_as(s, &s.token, &token, PIN);
    assert_eq!(r.status, 201, "{}", r.text());
    let j = r.json();
    assert_eq!(j["staff"], "P1001");
    assert_eq!(j["role"], "R-PARAMEDIC");
    assert_eq!(j["issuer"], w.provider.issuer.as_str());
    let session = j["session"].as_str().unwrap().to_owned();
    assert!(session.starts_with("ccs_"));
    let Some(SessionEvent::Opened {
        user, role, staff, ..
    }) = session_events(s).pop()
    else {
        panic!("the opening is audited")
    };
    assert_eq!(user.as_str(), "P1001");
    assert_eq!(role.unwrap().as_str(), "R-PARAMEDIC");
    assert_eq!(staff.subject.as_str(), "paramedic.one");

    // A read under the session is audited as a proven access of P1001, whatever staff id
    // the client asserts beside it.
    let nhs = &w.patients[0];
    let r = read(s, &session, nhs, &[("X-Carecache-User", "N2002")]);
    assert_eq!(r.status, 200, "{}", r.text());
    match last_event(s) {
        AuditEvent::ProvenAccess { access, staff } => {
            assert_eq!(access.user.unwrap().as_str(), "P1001");
            assert_eq!(access.role.unwrap().as_str(), "R-PARAMEDIC");
            assert_eq!(access.patient, Some(*nhs));
            assert_eq!(staff.issuer.as_str(), w.provider.issuer);
            assert_eq!(staff.subject.as_str(), "paramedic.one");
            assert_eq!(
                format!("{:016x}", staff.session),
                j["session_id"].as_str().unwrap()
            );
        }
        other => panic!("expected a proven access, got {other:?}"),
    }

    // A staff id alone proves nothing: refused and audited, nothing shown.
    let auth = bearer(&s.token);
    let r = request(
        s,
        "GET",
        &format!("/v1/patients/{}", nhs.digits()),
        &[
            ("Authorization", &auth),
            ("X-Carecache-User", "P1001"),
            ("X-Carecache-Purpose", "TREAT"),
        ],
        "",
    );
    assert_eq!(r.status, 401);
    assert_eq!(error_code(&r), "session-required");
    assert!(!r.text().contains("alerts"));
    match last_event(s) {
        AuditEvent::Access(a) => {
            assert_eq!(a.outcome, AuditOutcome::Denied(DenyReason::StaffNotProven));
            assert_eq!(a.user, None, "no staff id is recorded as if proven");
        }
        other => panic!("expected a denied access, got {other:?}"),
    }
    // A made-up session is no better.
    let r = read(s, "ccs_00000000000000000000000000000000", nhs, &[]);
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "session-unknown")
    );

    // The same ID token does not open a second session (here for the viewer's client).
    let viewer_token = s
        .device
        .add_client("viewer-kiosk")
        .unwrap()
        .expose()
        .to_owned();
    let r = open_as(s, &viewer_token, &token, "1111");
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(refusals(s).last(), Some(&SessionRefusal::Replayed));

    // The session's secret replayed by another client registration is refused.
    let r = request(
        s,
        "GET",
        &format!("/v1/patients/{}", nhs.digits()),
        &[
            ("Authorization", &bearer(&viewer_token)),
            ("X-Carecache-Session", &session),
            ("X-Carecache-Purpose", "TREAT"),
        ],
        "",
    );
    assert_eq!(r.status, 401);
    assert_eq!(error_code(&r), "session-of-another-client");
    match last_event(s) {
        AuditEvent::Access(a) => assert_eq!(
            a.outcome,
            AuditOutcome::Denied(DenyReason::SessionOfAnotherClient)
        ),
        other => panic!("expected a denied access, got {other:?}"),
    }

    // The FHIR routes take the same session.
    let r = request(
        s,
        "GET",
        &format!("/fhir/Patient/{}", nhs.digits()),
        &[
            ("Authorization", &auth),
            ("X-Carecache-Session", &session),
            ("X-Carecache-Purpose", "TREAT"),
        ],
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());

    let st = request(s, "GET", "/status", &[("Authorization", &auth)], "").json();
    assert_eq!(st["identity"]["mode"], "oidc");
    assert_eq!(st["identity"]["staff_sessions"], 1);
    assert_eq!(st["identity"]["issuer_keys_held"], true);
    let metrics = request(s, "GET", "/metrics", &[("Authorization", &auth)], "").text();
    assert!(metrics.contains("carecache_staff_sessions 1"), "{metrics}");
    assert!(
        metrics.contains("carecache_identity_keys_held 1"),
        "{metrics}"
    );

    // Signing out ends the session (audited); its secret is then worthless.
    let r = request(
        s,
        "DELETE",
        "/v1/session",
        &[("Authorization", &auth), ("X-Carecache-Session", &session)],
        "",
    );
    assert_eq!(r.status, 204);
    assert!(matches!(
        session_events(s).last(),
        Some(SessionEvent::Ended {
            reason: SessionEnd::SignedOut,
            ..
        })
    ));
    assert_eq!(read(s, &session, nhs, &[]).status, 401);
}

#[test]
fn forged_foreign_and_expired_tokens_are_refused_and_audited() {
    let w = world("");
    let s = &w.served;
    let good = w.provider.id_token(CREW_APP, "nurse.two");
    let parts: Vec<&str> = good.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    let header: Value = serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();

    let refused = |token: &str, why: SessionRefusal| {
        let r = open_as(s, &s.token, token, PIN);
        assert_eq!(r.status, 401, "{why:?}: {}", r.text());
        assert_eq!(error_code(&r), "id-token-refused");
        assert_eq!(refusals(s).last(), Some(&why), "audited as {why:?}");
    };

    refused("not-a-jwt", SessionRefusal::Malformed);

    // The same claims for another member of staff, under the original signature.
    claims["uid"] = json!("P1001");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64.encode(claims.to_string()),
        parts[2]
    );
    refused(&forged, SessionRefusal::BadSignature);

    // Unsigned.
    let none = format!(
        "{}.{}.",
        b64.encode(json!({ "alg": "none", "typ": "JWT" }).to_string()),
        b64.encode(claims.to_string())
    );
    refused(&none, SessionRefusal::AlgorithmNotAllowed);

    // HMAC keyed with the issuer's public key (the algorithm-confusion attack).
    let jwks: Value = serde_json::from_str(
        &ureq::get(format!("{}/jwks", w.provider.issuer))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap(),
    )
    .unwrap();
    let public = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kty"] == "RSA")
        .unwrap()
        .to_string();
    let signing_input = format!(
        "{}.{}",
        b64.encode(json!({ "alg": "HS256", "kid": header["kid"] }).to_string()),
        b64.encode(claims.to_string())
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(public.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    let hs = format!(
        "{signing_input}.{}",
        b64.encode(mac.finalize().into_bytes())
    );
    refused(&hs, SessionRefusal::AlgorithmNotAllowed);

    // A real token from another issuer.
    let other = Provider::start();
    refused(
        &other.id_token(CREW_APP, "nurse.two"),
        SessionRefusal::WrongIssuer,
    );

    // The good token (valid 10 minutes), once the device's trusted time is well past
    // its expiry and the leeway.
    s.clock.advance(Duration::from_secs(15 * 60));
    refused(&good, SessionRefusal::Expired);

    assert_eq!(s.device.identity().session_count(), 0, "nothing opened");
    // Nothing of a token reaches the audit's words.
    for (_, r) in s.audit() {
        assert!(!format!("{r:?}").contains(parts[2]));
    }
}

#[test]
fn offline_the_session_lasts_its_shift_with_the_pin_and_survives_a_restart() {
    let mut w = world("max_session_secs = 3600\nidle_lock_secs = 600");
    let token = w.provider.id_token(CREW_APP, "nurse.two");
    let session = open(&w.served, &token);
    let nhs = w.patients[1];
    // The provider goes away: the device is offline from its point of view.
    w.provider.stop();
    assert_eq!(read(&w.served, &session, &nhs, &[]).status, 200);

    // A pause locks the session; the PIN unlocks it, without signal.
    w.served.clock.advance(Duration::from_secs(11 * 60));
    let r = read(&w.served, &session, &nhs, &[]);
    assert_eq!((r.status, error_code(&r).as_str()), (401, "session-locked"));
    let r = confirm(&w.served, &session, PIN);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(read(&w.served, &session, &nhs, &[]).status, 200);

    // A restart keeps the session (sealed in the store) but asks for the PIN again.
    let served = w.served.restart();
    let r = read(&served, &session, &nhs, &[]);
    assert_eq!((r.status, error_code(&r).as_str()), (401, "session-locked"));
    assert_eq!(confirm(&served, &session, PIN).status, 200);
    assert_eq!(read(&served, &session, &nhs, &[]).status, 200);

    // Crew software that lost the secret resumes with the staff id and the PIN: a new
    // secret replaces the old one.
    let r = request(
        &served,
        "POST",
        "/v1/session/resume",
        &[("Authorization", &bearer(&served.token))],
        &json!({ "staff": "N2002", "pin": PIN }).to_string(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let fresh = r.json()["session"].as_str().unwrap().to_owned();
    assert_eq!(read(&served, &fresh, &nhs, &[]).status, 200);
    assert_eq!(read(&served, &session, &nhs, &[]).status, 401);

    // The shift's end ends access, and the session is ended (audited) at the next tick.
    served.clock.advance(Duration::from_secs(50 * 60));
    let r = read(&served, &fresh, &nhs, &[]);
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "session-expired")
    );
    served.device.tick().unwrap();
    assert!(matches!(
        session_events(&served).last(),
        Some(SessionEvent::Ended {
            reason: SessionEnd::Expired,
            ..
        })
    ));
    assert_eq!(served.device.identity().session_count(), 0);
    drop(w.hub);
}

#[test]
fn five_wrong_pins_end_the_session() {
    let w = world("idle_lock_secs = 60");
    let s = &w.served;
    let session = open(s, &w.provider.id_token(CREW_APP, "paramedic.one"));
    let nhs = w.patients[0];
    s.clock.advance(Duration::from_secs(61));
    let mut waits = 0;
    for attempt in 1..=5u8 {
        let r = confirm(s, &session, "000000");
        if attempt < 5 {
            assert_eq!((r.status, error_code(&r).as_str()), (401, "wrong-pin"));
            // Straight away, the next try must wait.
            let r = confirm(s, &session, PIN);
            assert_eq!(r.status, 429, "{}", r.text());
            let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
            assert!(wait >= 1);
            waits += wait;
            s.clock.advance(Duration::from_secs(wait));
        } else {
            assert_eq!(
                (r.status, error_code(&r).as_str()),
                (401, "session-locked-out")
            );
        }
    }
    assert!(waits >= 1 + 2 + 4 + 8, "waits grow: {waits} s");
    // The right PIN is too late: the session is gone, and so is access.
    let r = confirm(s, &session, PIN);
    assert_eq!(r.status, 401);
    assert_eq!(read(s, &session, &nhs, &[]).status, 401);
    let events = session_events(s);
    let wrong = events
        .iter()
        .filter(|e| matches!(e, SessionEvent::WrongPin { .. }))
        .count();
    assert_eq!(wrong, 5, "every wrong PIN is audited");
    assert!(events.iter().any(|e| matches!(
        e,
        SessionEvent::Ended {
            reason: SessionEnd::LockedOut,
            ..
        }
    )));
}

#[test]
fn a_social_care_role_never_gets_the_clinical_view() {
    let w = world("");
    let s = &w.served;
    let carer = open(s, &w.provider.id_token(CREW_APP, "carer.three"));
    let paramedic = open(s, &w.provider.id_token(CREW_APP, "paramedic.one"));
    let nhs = w.patients[2];
    let r = read(s, &carer, &nhs, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.text();
    assert!(body.contains("not_in_view"), "{body}");
    match last_event(s) {
        AuditEvent::ProvenAccess { access, .. } => {
            assert_eq!(access.view, Some(sync_protocol::message::View::SocialCare));
            assert_eq!(access.role.unwrap().as_str(), "R-SOCIAL-CARE");
        }
        other => panic!("{other:?}"),
    }
    let r = read(s, &paramedic, &nhs, &[]);
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("not_in_view"));
    // Where roles narrow views, a token naming no role fails closed to the narrowest.
    let unknown = open(s, &w.provider.id_token(CREW_APP, "agency.four"));
    let r = read(s, &unknown, &nhs, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("not_in_view"), "{}", r.text());
    // The FHIR allergy search is refused outright under the social-care view.
    let r = request(
        s,
        "GET",
        &format!("/fhir/AllergyIntolerance?patient={}", nhs.digits()),
        &[
            ("Authorization", &bearer(&s.token)),
            ("X-Carecache-Session", &carer),
            ("X-Carecache-Purpose", "TREAT"),
        ],
        "",
    );
    assert_eq!(r.status, 403, "{}", r.text());
}

#[test]
fn a_rotated_signing_key_is_fetched_when_first_seen_and_the_old_one_retired() {
    let mut w = world("");
    let before = w.provider.id_token(VIEWER, "nurse.two");
    w.provider.rotate_keys();
    // A token signed with a key the device has never seen: fetched, then verified.
    let after = w.provider.id_token(CREW_APP, "paramedic.one");
    let r = open_as(&w.served, &w.served.token, &after, PIN);
    assert_eq!(r.status, 201, "{}", r.text());
    // The retired key is no longer published, so a token it signed opens nothing.
    let r = open_as(&w.served, &w.served.token, &before, PIN);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        refusals(&w.served).last(),
        Some(&SessionRefusal::UnknownKey)
    );
}

#[test]
fn proven_accesses_reach_the_hub_and_its_privacy_officer_views_name_the_identity() {
    let w = world("");
    let s = &w.served;
    let session = open(s, &w.provider.id_token(CREW_APP, "paramedic.one"));
    let nhs = w.patients[3];
    assert_eq!(read(s, &session, &nhs, &[]).status, 200);
    s.device.upload_audit().unwrap();
    let mut lines = Vec::new();
    w.hub
        .hub
        .state
        .for_each_patient_access(nhs, |e| {
            lines.push(carecache_hub::export::describe(&e));
            Ok(())
        })
        .unwrap();
    let line = lines.last().expect("the hub holds the access");
    assert!(line.contains("by P1001 (R-PARAMEDIC)"), "{line}");
    assert!(
        line.contains(&format!(
            "proven by OpenID Connect: issuer {}, subject paramedic.one",
            w.provider.issuer
        )),
        "{line}"
    );
}

#[test]
fn asserted_mode_opens_no_sessions_and_says_who_vouched() {
    let (_hub, s, patients) = crate::api_harness::served(4, 5, json!({}));
    let r = open_as(&s, &s.token, "x.y.z", PIN);
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (409, "identity-asserted")
    );
    assert_eq!(
        s.get(&format!("/v1/patients/{}", patients[0].digits()))
            .status,
        200
    );
    let AuditEvent::Access(a) = last_event(&s) else {
        panic!("an asserted access")
    };
    assert_eq!(a.user.unwrap().as_str(), "n1");
    let line = carecache_fhir::audit::describe(&carecache_fhir::audit::Entry {
        device: "d",
        seq: 1,
        record: &s.audit().pop().unwrap().1,
    });
    assert!(line.contains("[asserted by the client software]"), "{line}");
}

#[test]
fn a_hub_too_old_for_staff_identity_entries_gets_those_before_them_and_nothing_is_lost() {
    let (hub, s, patients) = crate::api_harness::served(4, 9, json!({}));
    assert_eq!(
        s.get(&format!("/v1/patients/{}", patients[0].digits()))
            .status,
        200
    );
    let identity_entry = s
        .device
        .audit_blocking(AuditEvent::Session(SessionEvent::Confirmed { session: 7 }))
        .unwrap();
    assert_eq!(
        s.get(&format!("/v1/patients/{}", patients[1].digits()))
            .status,
        200
    );
    let id = s.device.device_id().unwrap().unwrap();

    crate::sync::hub_speaking_at_most(&hub, 3);
    let e = s.device.upload_audit().unwrap_err().to_string();
    assert!(
        e.contains("needs protocol version 4") && e.contains("upgrade the hub"),
        "{e}"
    );
    assert_eq!(
        hub.hub.state.audit_head(&id).unwrap().seq,
        identity_entry - 1,
        "everything before the version-4 entry went up"
    );
    assert_eq!(
        s.audit().first().unwrap().0.seq,
        identity_entry,
        "the rest waits"
    );

    hub.hub.dangerous_set_response_hook(None);
    s.device.upload_audit().unwrap();
    assert!(hub.hub.state.audit_head(&id).unwrap().seq > identity_entry);
    assert!(s.audit().is_empty());
}

#[test]
fn a_session_never_outlives_the_lease_and_needs_one() {
    // A lease for the paramedic alone, ending in two hours: well inside a 12 h shift.
    let w = world_leased("", json!({ "users": ["P1001"], "ends_in_ms": 7_200_000 }));
    let s = &w.served;
    let now = wall_now();
    let r = open_as(
        s,
        &s.token,
        &w.provider.id_token(CREW_APP, "paramedic.one"),
        PIN,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let expires =
        sync_protocol::types::Timestamp::from_rfc3339(r.json()["expires"].as_str().unwrap())
            .unwrap()
            .as_millis();
    assert!(
        expires <= now + 7_200_000 + 1_000 && expires + 60_000 > now + 7_200_000,
        "the session ends with the lease: {} ms from now",
        expires.saturating_sub(now)
    );
    // A member of staff no lease names opens nothing.
    let r = open_as(
        s,
        &s.token,
        &w.provider.id_token(CREW_APP, "nurse.two"),
        PIN,
    );
    assert_eq!((r.status, error_code(&r).as_str()), (403, "no-lease"));
    assert_eq!(refusals(s).last(), Some(&SessionRefusal::NoLease));
    // A PIN that is not 4–12 digits opens nothing either.
    let r = open_as(
        s,
        &s.token,
        &w.provider.id_token(CREW_APP, "paramedic.one"),
        "12",
    );
    assert_eq!((r.status, error_code(&r).as_str()), (400, "bad-pin"));
}

/// The viewer's own sign-in over plain HTTP: the provider's answer is taken only from the
/// browser that started the sign-in (its sign-in cookie), so a victim cannot be signed in
/// as someone else by following their callback link (login CSRF).
#[test]
fn the_viewer_sign_in_is_bound_to_the_browser_that_started_it() {
    let w = world("");
    let s = &w.served;
    let start = |s: &Served| {
        let body = format!("token={}", s.token);
        let r = raw(
            s.addr,
            format!(
                "POST /sign-in HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
                s.addr,
                body.len()
            )
            .as_bytes(),
        );
        assert_eq!(r.status, 303, "{}", r.text());
        let url = r.header("location").unwrap().to_owned();
        assert!(url.starts_with(&w.provider.issuer), "{url}");
        assert!(
            url.contains("code_challenge_method=S256") && url.contains("nonce="),
            "{url}"
        );
        let cookie = r
            .header("set-cookie")
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        assert!(cookie.starts_with("carecache_signin="));
        (url, cookie)
    };
    let callback = |url: &str| {
        let back = w.provider.authorize(url, "nurse.two");
        let prefix = format!("http://{}", s.addr);
        back.strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{back}"))
            .to_owned()
    };
    let get = |path: &str, cookie: Option<&str>| {
        let cookie = cookie
            .map(|c| format!("Cookie: {c}\r\n"))
            .unwrap_or_default();
        raw(
            s.addr,
            format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{cookie}\r\n",
                s.addr
            )
            .as_bytes(),
        )
    };

    // Someone else's callback link, followed by a browser that did not start it.
    let (url, _their_cookie) = start(s);
    let r = get(&callback(&url), None);
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.text().contains("Sign-in refused"), "{}", r.text());
    assert_eq!(refusals(s).last(), Some(&SessionRefusal::NonceMismatch));

    // The browser that started it: the PIN form, then the session.
    let (url, cookie) = start(s);
    let r = get(&callback(&url), Some(&cookie));
    assert_eq!(r.status, 200, "{}", r.text());
    let page = r.text();
    assert!(
        page.contains("Choose a PIN") && page.contains("N2002"),
        "{page}"
    );
    let form = page
        .split("name=\"form\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    let body = format!("form={form}&pin={PIN}&pin2={PIN}");
    let r = raw(
        s.addr,
        format!(
            "POST /viewer/oidc/pin HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            s.addr,
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 303, "{}", r.text());
    let session = r
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let r = get("/", Some(&session));
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains(&w.patients[0].to_string()),
        "the caseload"
    );
    assert!(matches!(
        session_events(s)
            .into_iter()
            .rev()
            .find(|e| matches!(e, SessionEvent::Opened { .. })),
        Some(SessionEvent::Opened {
            route: sync_protocol::audit::SignInRoute::Viewer,
            ..
        })
    ));
}

#[test]
fn sessions_and_keys_of_an_issuer_no_longer_configured_are_void() {
    let w = world("");
    let session = open(&w.served, &w.provider.id_token(CREW_APP, "paramedic.one"));
    let nhs = w.patients[0];
    assert_eq!(read(&w.served, &session, &nhs, &[]).status, 200);
    // The trust moves the device to another identity provider.
    let other = Provider::start();
    let text = std::fs::read_to_string(&w.served.config_path).unwrap();
    std::fs::write(
        &w.served.config_path,
        text.replace(&w.provider.issuer, &other.issuer),
    )
    .unwrap();
    let served = w.served.restart();
    assert!(
        !served.device.identity().has_keys(),
        "the old issuer's keys are not used for the new one"
    );
    let r = read(&served, &session, &nhs, &[]);
    assert_eq!(
        (r.status, error_code(&r).as_str()),
        (401, "session-unknown")
    );
    let r = confirm(&served, &session, PIN);
    assert_eq!(r.status, 401, "{}", r.text());
    // The new issuer's tokens work (its keys fetched on first use).
    let fresh = open(&served, &other.id_token(CREW_APP, "paramedic.one"));
    assert_eq!(read(&served, &fresh, &nhs, &[]).status, 200);
    drop(w.hub);
}
