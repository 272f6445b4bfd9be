//! The viewer page in a real browser: headless Chromium (Debian package `chromium`,
//! installed by `.ci/run`) signs in, opens a synthetic patient with alerts from the
//! caseload, and checks the alerts are on screen above the allergies. The screenshot is
//! kept as a test artefact: `target/tmp/viewer-patient.png`.

use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions};
use serde_json::json;

use crate::api_harness::served;

fn chromium() -> std::path::PathBuf {
    let found = std::env::var_os("CHROME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            [
                "/usr/bin/chromium",
                "/usr/bin/chromium-browser",
                "/usr/bin/google-chrome",
            ]
            .into_iter()
            .map(std::path::PathBuf::from)
            .find(|p| p.exists())
        });
    found.unwrap_or_else(|| {
        panic!("no Chromium: install the Debian package `chromium` (.ci/run does) or set CHROME")
    })
}

/// A headless Chromium the size of a tablet.
fn headless() -> Browser {
    Browser::new(LaunchOptions {
        headless: true,
        sandbox: false,
        path: Some(chromium()),
        window_size: Some((800, 1280)),
        ..LaunchOptions::default()
    })
    .unwrap()
}

/// A headless Chromium signed in to the viewer at `base` (the browser must outlive the
/// tab).
fn signed_in(
    base: &str,
    token: &str,
    user: &str,
) -> (Browser, std::sync::Arc<headless_chrome::Tab>) {
    let browser = headless();
    let tab = browser.new_tab().unwrap();
    tab.navigate_to(&format!("{base}/")).unwrap();
    tab.wait_for_element("#token").unwrap().click().unwrap();
    tab.type_str(token).unwrap();
    tab.wait_for_element("#user").unwrap().click().unwrap();
    tab.type_str(user).unwrap();
    tab.wait_for_element("button[type=submit].go")
        .unwrap()
        .click()
        .unwrap();
    (browser, tab)
}

#[test]
fn headless_chromium_signs_in_and_sees_alerts_above_allergies() {
    let (hub, s, _) = served(40, 91, json!({ "users": ["crew.1"] }));
    let target = hub
        .patients
        .iter()
        .find(|p| p.worth_showing())
        .unwrap()
        .nhs_number();
    let base = format!("http://{}", s.addr);

    let (_browser, tab) = signed_in(&base, &s.token, "crew.1");
    // The caseload; open the patient from it.
    tab.wait_until_navigated().unwrap();
    tab.wait_for_element(&format!("a[href=\"/patient/{}\"]", target.digits()))
        .unwrap_or_else(|e| panic!("{e}: {}", tab.get_content().unwrap_or_default()))
        .click()
        .unwrap();
    let alerts = tab.wait_for_element("#alerts").unwrap();
    let allergies = tab.wait_for_element("#allergies").unwrap();
    let banner = tab.wait_for_element("#banner").unwrap();
    assert!(
        banner
            .get_inner_text()
            .unwrap()
            .contains(&target.to_string()),
        "banner shows the NHS number 3-3-4"
    );
    let alert_text = alerts.get_inner_text().unwrap();
    assert!(
        alert_text.to_uppercase().contains("HIGH RISK"),
        "{alert_text}"
    );
    let top = |e: &headless_chrome::Element| e.get_box_model().unwrap().margin.most_top();
    assert!(
        top(&banner) < top(&alerts) && top(&alerts) < top(&allergies),
        "banner {} < alerts {} < allergies {}",
        top(&banner),
        top(&alerts),
        top(&allergies)
    );
    // Alerts start on the first screen of a tablet.
    assert!(top(&alerts) < 1280.0, "alerts at {}", top(&alerts));
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .unwrap();
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("viewer-patient.png");
    std::fs::write(&out, &png).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    // And the read was audited under the staff id typed at sign-in.
    let last = s
        .audit()
        .into_iter()
        .rev()
        .find_map(|(_, r)| match r.event {
            sync_protocol::audit::AuditEvent::Access(a) => Some(a),
            _ => None,
        })
        .unwrap();
    assert_eq!(last.patient, Some(target));
    assert_eq!(last.user.unwrap().as_str(), "crew.1");
}

/// The viewer's search form, as a crew at a door would use it: a misspelt family name and
/// a date of birth typed the UK way; the patient is the first match, the page says why
/// and to check, and the record opens from it.
#[test]
fn headless_chromium_finds_a_patient_by_misspelt_name_and_date_of_birth() {
    let (hub, s, _) = served(40, 93, json!({ "users": ["crew.1"] }));
    let target = hub
        .patients
        .iter()
        .find(|p| {
            p.shareable()
                && p.expected.demographics.birth_date.is_full()
                && p.expected.demographics.name.family.as_str().chars().count() >= 4
        })
        .unwrap();
    let d = &target.expected.demographics;
    let mut family: Vec<char> = d.name.family.as_str().chars().collect();
    let i = family.len() / 2;
    family[i] = if family[i] == 'e' { 'a' } else { 'e' };
    let family: String = family.into_iter().collect();
    let b = d.birth_date;
    let typed_date = format!(
        "{:02}/{:02}/{:04}",
        b.day().unwrap(),
        b.month().unwrap(),
        b.year()
    );
    let base = format!("http://{}", s.addr);
    let (_browser, tab) = signed_in(&base, &s.token, "crew.1");
    tab.wait_until_navigated().unwrap();
    tab.wait_for_element("#family").unwrap().click().unwrap();
    tab.type_str(&family).unwrap();
    tab.wait_for_element("#birthdate").unwrap().click().unwrap();
    tab.type_str(&typed_date).unwrap();
    tab.wait_for_element("form[action=\"/search\"] button")
        .unwrap()
        .click()
        .unwrap();
    tab.wait_until_navigated().unwrap();
    let first = tab
        .wait_for_element("table tbody tr:first-child a")
        .unwrap_or_else(|e| panic!("{e}: {}", tab.get_content().unwrap_or_default()));
    assert_eq!(
        first.get_attribute_value("href").unwrap().as_deref(),
        Some(format!("/patient/{}", target.nhs_number().digits()).as_str())
    );
    let notice = tab
        .wait_for_element("p.banner")
        .unwrap()
        .get_inner_text()
        .unwrap();
    assert!(notice.contains("check the NHS number"), "{notice}");
    let why = tab
        .wait_for_element("table tbody tr:first-child td:last-child")
        .unwrap()
        .get_inner_text()
        .unwrap();
    assert!(why.contains("similar spelling"), "{why}");
    first.click().unwrap();
    let banner = tab.wait_for_element("#banner").unwrap();
    assert!(
        banner
            .get_inner_text()
            .unwrap()
            .contains(&target.nhs_number().to_string())
    );
}

#[test]
fn the_viewer_signs_in_at_the_identity_provider_and_asks_for_the_pin_after_a_pause() {
    use crate::identity::{PIN, world};
    let w = world("idle_lock_secs = 60");
    let s = &w.served;
    let base = format!("http://{}", s.addr);
    let browser = headless();
    let tab = browser.new_tab().unwrap();
    let page = |tab: &headless_chrome::Tab| tab.get_content().unwrap_or_default();
    tab.navigate_to(&format!("{base}/")).unwrap();
    // oidc mode: the client token, then the identity provider.
    tab.wait_for_element("#token").unwrap().click().unwrap();
    tab.type_str(&s.token).unwrap();
    tab.wait_for_element("button[type=submit].go")
        .unwrap()
        .click()
        .unwrap();
    // The provider's own sign-in page.
    tab.wait_for_element("input[name=login]")
        .unwrap_or_else(|e| panic!("{e}: {}", page(&tab)))
        .click()
        .unwrap();
    tab.type_str("nurse.two").unwrap();
    tab.wait_for_element("input[name=password]")
        .unwrap()
        .click()
        .unwrap();
    tab.type_str(crate::oidc_harness::PASSWORD).unwrap();
    tab.wait_for_element("button[type=submit]")
        .unwrap()
        .click()
        .unwrap();
    // Back at the device: choose the PIN.
    tab.wait_for_element("#pin2")
        .unwrap_or_else(|e| panic!("{e}: {}", page(&tab)))
        .click()
        .unwrap();
    tab.type_str(PIN).unwrap();
    tab.wait_for_element("#pin").unwrap().click().unwrap();
    tab.type_str(PIN).unwrap();
    tab.wait_for_element("button[type=submit].go")
        .unwrap()
        .click()
        .unwrap();
    let target = w.patients[0];
    let link = format!("a[href=\"/patient/{}\"]", target.digits());
    tab.wait_for_element(&link)
        .unwrap_or_else(|e| panic!("{e}: {}", page(&tab)))
        .click()
        .unwrap();
    tab.wait_for_element("#alerts").unwrap();
    // The read is audited as the member of staff the provider proved.
    let proven = s
        .audit()
        .into_iter()
        .rev()
        .find_map(|(_, r)| match r.event {
            sync_protocol::audit::AuditEvent::ProvenAccess { access, staff } => {
                Some((access, staff))
            }
            _ => None,
        })
        .expect("a proven access");
    assert_eq!(proven.0.patient, Some(target));
    assert_eq!(proven.0.user.unwrap().as_str(), "N2002");
    assert_eq!(proven.1.subject.as_str(), "nurse.two");
    assert!(matches!(
        s.audit().into_iter().find_map(|(_, r)| match r.event {
            sync_protocol::audit::AuditEvent::Session(
                sync_protocol::audit::SessionEvent::Opened { route, .. },
            ) => Some(route),
            _ => None,
        }),
        Some(sync_protocol::audit::SignInRoute::Viewer)
    ));

    // After a pause the viewer asks for the PIN; with it, the caseload again.
    s.clock.advance(std::time::Duration::from_secs(61));
    tab.navigate_to(&format!("{base}/")).unwrap();
    tab.wait_for_element("form[action=\"/viewer/confirm\"] #pin")
        .unwrap_or_else(|e| panic!("{e}: {}", page(&tab)))
        .click()
        .unwrap();
    tab.type_str(PIN).unwrap();
    tab.wait_for_element("button[type=submit].go")
        .unwrap()
        .click()
        .unwrap();
    tab.wait_for_element(&link)
        .unwrap_or_else(|e| panic!("{e}: {}", page(&tab)));
    assert!(matches!(
        s.audit()
            .into_iter()
            .rev()
            .find_map(|(_, r)| match r.event {
                sync_protocol::audit::AuditEvent::Session(e) => Some(e),
                _ => None,
            }),
        Some(sync_protocol::audit::SessionEvent::Confirmed { .. })
    ));
}
