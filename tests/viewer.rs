//! The viewer page over real HTTP: sign-in, caseload, patient page order, every refusal
//! explained, emergency access, session end, hostile record text, and that each page
//! that shows a patient is audited under the signed-in staff id.

use std::net::SocketAddr;
use std::time::Duration;

use carecache_hub::source::ingest_ndjson;
use carecache_hub::testing::TestHub;
use serde_json::json;
use sync_protocol::NhsNumber;
use sync_protocol::audit::{AuditAction, AuditEvent, Purpose};

use crate::api_harness::{Resp, Served, raw};
use crate::device_harness::{Dev, grant};

const HOSTILE: &str = "<script>alert(1)</script>O'Hara";

pub(crate) fn get(addr: SocketAddr, path: &str, cookie: Option<&str>) -> Resp {
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{cookie}Connection: close\r\n\r\n")
            .as_bytes(),
    )
}

fn post(addr: SocketAddr, path: &str, body: &str, extra: &str) -> Resp {
    raw(
        addr,
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

/// Signs in; returns the `name=value` cookie.
pub(crate) fn sign_in(addr: SocketAddr, token: &str, user: &str) -> String {
    let r = post(
        addr,
        "/sign-in",
        &format!("token={token}&user={user}"),
        &format!("Origin: http://{addr}\r\n"),
    );
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.header("location"), Some("/"));
    let set = r.header("set-cookie").unwrap();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert!(
        !set.contains("Max-Age") && !set.contains("Expires"),
        "a browser-session cookie: {set}"
    );
    set.split(';').next().unwrap().to_owned()
}

fn pos(page: &str, needle: &str) -> usize {
    page.find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not on the page"))
}

/// Renames one source patient to `HOSTILE` and re-ingests.
fn make_hostile(hub: &TestHub, fhir_id: &str) {
    let path = hub.ndjson_dir().join("Patient.ndjson");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["id"] == fhir_id {
            v["name"][0]["family"] = json!(HOSTILE);
            v["meta"]["versionId"] = json!("99");
            v["meta"]["lastUpdated"] = json!("2026-11-24T07:00:00Z");
        }
        out.push_str(&v.to_string());
        out.push('\n');
    }
    std::fs::write(&path, out).unwrap();
    ingest_ndjson(
        &hub.hub.state,
        &carecache_hub::testing::synthetic_rules(),
        &hub.ndjson_dir(),
    )
    .unwrap();
}

fn last_access(s: &Served) -> sync_protocol::audit::Access {
    s.audit()
        .into_iter()
        .rev()
        .find_map(|(_, r)| match r.event {
            AuditEvent::Access(a) => Some(a),
            _ => None,
        })
        .unwrap()
}

#[test]
fn a_crew_member_signs_in_sees_alerts_first_and_every_refusal_is_explained() {
    let hub = TestHub::start(60, 71);
    let dev = Dev::enrolled(&hub);
    let shareable: Vec<&carecache_synth::SourcePatient> =
        hub.patients.iter().filter(|p| p.shareable()).collect();
    let objected = hub.patients.iter().find(|p| !p.shareable()).unwrap();
    let with_alerts = shareable
        .iter()
        .take(40)
        .find(|p| p.worth_showing())
        .unwrap();
    let hostile = shareable
        .iter()
        .take(40)
        .find(|p| p.fhir_id != with_alerts.fhir_id)
        .unwrap();
    make_hostile(&hub, &hostile.fhir_id);
    let mine: Vec<NhsNumber> = shareable
        .iter()
        .take(40)
        .map(|p| p.nhs_number())
        .chain([objected.nhs_number()])
        .collect();
    let theirs = shareable[45].nhs_number();
    grant(&hub, &dev.id(), &mine, json!({ "users": ["n1"] }));
    grant(
        &hub,
        &dev.id(),
        &[theirs],
        json!({ "users": ["other"], "emergency_access": true }),
    );
    dev.sync().unwrap();
    let s = Served::start(dev);
    let a = s.addr;

    // Not signed in: the sign-in form, and no patient page.
    let home = get(a, "/", None);
    assert_eq!(home.status, 200);
    assert!(home.text().contains("action=\"/sign-in\""));
    assert!(!home.text().contains(&with_alerts.nhs_number().to_string()));
    let entries = s.audit().len();
    let nope = get(
        a,
        &format!("/patient/{}", with_alerts.nhs_number().digits()),
        None,
    );
    assert_eq!(nope.status, 401);
    assert!(nope.text().contains("Please sign in"));
    assert_eq!(s.audit().len(), entries, "nothing was read");

    // Bad sign-ins.
    let wrong = post(a, "/sign-in", "token=cct_nonsense&user=n1", "");
    assert_eq!(wrong.status, 401);
    assert!(wrong.text().contains("not recognised"), "{}", wrong.text());
    assert!(matches!(
        s.audit().last().unwrap().1.event,
        AuditEvent::AuthFailure { .. }
    ));
    let cross = post(
        a,
        "/sign-in",
        &format!("token={}&user=n1", s.token),
        "Origin: http://evil.example\r\n",
    );
    assert_eq!(cross.status, 403);
    let cross_site = post(
        a,
        "/sign-in",
        &format!("token={}&user=n1", s.token),
        "Sec-Fetch-Site: cross-site\r\nOrigin: null\r\n",
    );
    assert_eq!(cross_site.status, 403);
    // Another web application on this machine (another loopback port) is another origin.
    let other_local = post(
        a,
        "/sign-in",
        &format!("token={}&user=n1", s.token),
        "Origin: http://127.0.0.1:1\r\n",
    );
    assert_eq!(other_local.status, 403);
    let bad_user = post(a, "/sign-in", &format!("token={}&user=a+b", s.token), "");
    assert_eq!(bad_user.status, 400);
    assert!(bad_user.text().contains("staff id"));
    let huge = post(a, "/sign-in", &"x".repeat(10_000), "");
    assert_eq!(huge.status, 413);

    // The caseload.
    let cookie = sign_in(a, &s.token, "n1");
    let list = get(a, "/", Some(&cookie));
    assert_eq!(list.status, 200);
    let page = list.text();
    assert!(page.contains(&with_alerts.nhs_number().to_string()));
    assert!(
        !page.contains(&theirs.to_string()),
        "another crew's patient"
    );
    assert!(
        !page.contains(&objected.nhs_number().to_string()),
        "objected"
    );
    assert!(page.contains("high risk"));
    assert_eq!(list.header("cache-control"), Some("no-store"));
    assert!(
        list.header("content-security-policy")
            .unwrap()
            .starts_with("default-src 'none'")
    );
    assert!(!page.contains("<script"), "no script on the page");
    let e = last_access(&s);
    assert_eq!(
        (e.action, e.user.unwrap().as_str(), e.client.as_str()),
        (AuditAction::ListCaseload, "n1", "epcr")
    );
    assert_eq!(e.listed.len(), 40);

    // A patient: banner, then alerts, then allergies, then medications.
    let p = get(
        a,
        &format!("/patient/{}", with_alerts.nhs_number().digits()),
        Some(&cookie),
    );
    assert_eq!(p.status, 200);
    let page = p.text();
    let order = [
        pos(&page, "id=\"freshness\""),
        pos(&page, "id=\"banner\""),
        pos(&page, "id=\"alerts\""),
        pos(&page, "id=\"allergies\""),
        pos(&page, "id=\"medications\""),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    assert!(
        page.contains(&with_alerts.nhs_number().to_string()),
        "3-3-4"
    );
    assert!(page.contains("Data last updated"));
    assert!(page.contains("Your access to this record ends "));
    let family = with_alerts
        .expected
        .demographics
        .name
        .family
        .as_str()
        .to_uppercase();
    assert!(pos(&page, &family) < order[2], "name in the banner");
    let e = last_access(&s);
    assert_eq!(e.action, AuditAction::ReadSummary);
    assert_eq!(e.patient, Some(with_alerts.nhs_number()));
    assert_eq!(e.user.unwrap().as_str(), "n1");
    assert_eq!(p.request_id(), e.request_id);

    // Hostile text from the source is shown as text.
    let h = get(
        a,
        &format!("/patient/{}", hostile.nhs_number().digits()),
        Some(&cookie),
    );
    assert_eq!(h.status, 200);
    assert!(
        h.text()
            .contains("&lt;SCRIPT&gt;ALERT(1)&lt;/SCRIPT&gt;O&#39;HARA"),
        "{}",
        h.text()
    );
    assert!(!h.text().to_lowercase().contains("<script"));

    // Refusals, each explained.
    let o = get(
        a,
        &format!("/patient/{}", objected.nhs_number().digits()),
        Some(&cookie),
    );
    assert_eq!(o.status, 404);
    assert!(o.text().contains("data-code=\"objected\""));
    let objected_family = objected.expected.demographics.name.family.as_str();
    assert!(
        !o.text()
            .to_uppercase()
            .contains(&objected_family.to_uppercase())
    );
    let t = get(a, &format!("/patient/{}", theirs.digits()), Some(&cookie));
    assert_eq!(t.status, 403);
    assert!(t.text().contains("data-code=\"not-on-caseload\""));
    assert!(t.text().contains("name=\"reason\""), "the emergency form");
    let bad = get(a, "/patient/12345", Some(&cookie));
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("10 digits"));
    let found = get(a, "/find?nhs=999+000+0000", Some(&cookie));
    assert_eq!(found.status, 303);
    assert_eq!(found.header("location"), Some("/patient/9990000000"));

    // Emergency access with a reason: a form post from this page (never a link: the
    // reason stays out of URLs and history), shown, flagged on the page and in the audit.
    assert!(
        t.text()
            .contains("<form method=\"post\" action=\"/patient/")
    );
    let before = s.audit().len();
    let link = get(
        a,
        &format!("/patient/{}?reason=Collapsed+in+street", theirs.digits()),
        Some(&cookie),
    );
    assert_eq!(link.status, 400, "{}", link.text());
    assert!(link.text().contains("emergency-access form"));
    assert_eq!(
        s.audit().len(),
        before,
        "a link with a reason reads nothing"
    );
    let emergency = |body: &str, origin: &str| {
        post(
            a,
            &format!("/patient/{}", theirs.digits()),
            body,
            &format!("Cookie: {cookie}\r\nOrigin: {origin}\r\n"),
        )
    };
    let forged = emergency("reason=Collapsed+in+street", "http://evil.example");
    assert_eq!(forged.status, 403, "a cross-site form is refused");
    assert_eq!(s.audit().len(), before);
    let em = emergency("reason=Collapsed+in+street", &format!("http://{a}"));
    assert_eq!(em.status, 200, "{}", em.text());
    assert!(em.text().contains("class=\"emergency\""));
    let e = last_access(&s);
    assert!(
        matches!(&e.purpose, Some(Purpose::EmergencyTreat { reason }) if reason.as_str() == "Collapsed in street")
    );
    let empty = emergency("reason=", &format!("http://{a}"));
    assert_eq!(empty.status, 400);
    assert!(empty.text().contains("data-code=\"reason-required\""));

    // The lease ends: the page says access has ended.
    s.clock.advance(Duration::from_secs(17 * 3600));
    let x = get(
        a,
        &format!("/patient/{}", with_alerts.nhs_number().digits()),
        Some(&cookie),
    );
    assert_eq!(x.status, 403);
    assert!(x.text().contains("Your access has ended"), "{}", x.text());

    // Sign out ends the session.
    let out = post(a, "/sign-out", "", &format!("Cookie: {cookie}\r\n"));
    assert_eq!(out.status, 303);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    assert!(
        get(a, "/", Some(&cookie))
            .text()
            .contains("action=\"/sign-in\"")
    );

    // A revoked client token ends its sessions at the next page.
    let second = s.device.add_client("tablet").unwrap();
    let c2 = sign_in(a, second.expose(), "n1");
    s.device.revoke_client("tablet").unwrap();
    let r = get(a, "/", Some(&c2));
    assert_eq!(r.status, 401);
    assert!(r.text().contains("revoked"), "{}", r.text());
    drop(hub);
}
