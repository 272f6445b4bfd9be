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

    let browser = Browser::new(LaunchOptions {
        headless: true,
        sandbox: false,
        path: Some(chromium()),
        window_size: Some((800, 1280)),
        ..LaunchOptions::default()
    })
    .unwrap();
    let tab = browser.new_tab().unwrap();
    tab.navigate_to(&format!("{base}/")).unwrap();
    tab.wait_for_element("#token").unwrap().click().unwrap();
    tab.type_str(&s.token).unwrap();
    tab.wait_for_element("#user").unwrap().click().unwrap();
    tab.type_str("crew.1").unwrap();
    tab.wait_for_element("button[type=submit].go")
        .unwrap()
        .click()
        .unwrap();
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
