//! The fleet view and remote wipe (issue 24 points 5 and 7): every sync's checkin
//! leaves the device's health at the hub, which lists the devices that need attention
//! — silent, audit not uploaded for two days, certificate near its end; a revoked device
//! uploads its audit backlog before it destroys its data and confirms the wipe, with
//! what it could not upload counted.

use serde_json::{Value, json};
use sync_protocol::audit::{AuditEvent, KeyEvent};

use crate::device_harness::{Dev, T0, TestHub, grant, shareable};

const DAY: u64 = 86_400_000;

fn fleet(hub: &TestHub) -> Vec<Value> {
    let (status, body) = hub.admin("GET", "/admin/v1/fleet", None);
    assert_eq!(status, 200, "{body}");
    body["devices"].as_array().unwrap().clone()
}

fn fleet_metrics(hub: &TestHub) -> String {
    let agent = carecache_hub::pki::agent_trusting(hub.ca_pem.as_bytes()).unwrap();
    let mut resp = agent
        .get(format!("{}/admin/v1/fleet/metrics", hub.base_url()))
        .header(
            "Authorization",
            format!("Bearer {}", carecache_hub::testing::ADMIN_TOKEN),
        )
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.body_mut().read_to_string().unwrap()
}

fn row<'a>(fleet: &'a [Value], id: &str) -> &'a Value {
    fleet.iter().find(|d| d["id"] == id).unwrap()
}

fn attention(d: &Value) -> Vec<String> {
    d["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().split(':').next().unwrap().to_owned())
        .collect()
}

#[test]
fn each_sync_reports_health_and_the_hub_lists_who_needs_attention() {
    let hub = TestHub::start(20, 61);
    let quiet = Dev::enrolled(&hub);
    let busy = Dev::enrolled(&hub);
    let patients = shareable(&hub, 20);
    grant(&hub, &quiet.id(), &patients[..10], json!({}));
    grant(&hub, &busy.id(), &patients[10..], json!({}));
    quiet.sync().unwrap();
    busy.sync().unwrap();
    // A checkin reports the device as the sync begins: the second shows the caseload.
    quiet.sync().unwrap();

    let f = fleet(&hub);
    let q = row(&f, &quiet.id());
    assert_eq!(q["health"]["patients_held"], 10);
    assert!(q["health"]["store_bytes"].as_u64().unwrap() > 0);
    assert!(q["last_checkin"].is_string());
    // The test hub's certificates last 30 days from when they were issued (real time,
    // as TLS checks them).
    let until = q["health"]["certificate_not_after"].as_u64().unwrap();
    let real_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        (real_now + 29 * DAY..=real_now + 30 * DAY).contains(&until),
        "{until}"
    );
    assert!(attention(q).is_empty(), "{q}");
    // No patient data in the report: counts and times only.
    let text = serde_json::to_string(&f).unwrap();
    for p in &patients {
        assert!(!text.contains(&p.to_string().replace(" ", "")));
    }

    // An entry waits on the quiet tablet, whose audit uploads the hub then refuses for
    // three days while its syncs go on.
    quiet.device.add_client("handover-app").unwrap();
    hub.hub
        .dangerous_set_response_hook(Some(std::sync::Arc::new(|route, _| {
            use sync_protocol::message::{ErrorCode, ErrorMessage};
            use sync_protocol::types::Text;
            use sync_protocol::{Compression, Message, encode};
            if route == "audit" {
                carecache_hub::server::Tamper::Replace(
                    encode(
                        &Message::Error(ErrorMessage {
                            code: ErrorCode::Internal,
                            message: Text::new("audit store down").unwrap(),
                            retry_after_secs: None,
                        }),
                        Compression::None,
                    )
                    .unwrap(),
                )
            } else {
                carecache_hub::server::Tamper::Pass
            }
        })));
    hub.set_time(T0 + 3 * DAY);
    quiet
        .clock
        .advance(std::time::Duration::from_millis(3 * DAY));
    quiet.sync().unwrap();
    hub.hub.dangerous_set_response_hook(None);
    busy.clock
        .advance(std::time::Duration::from_millis(3 * DAY));
    busy.sync().unwrap();
    let f = fleet(&hub);
    let q = row(&f, &quiet.id());
    assert_eq!(attention(q), vec!["audit-stale", "last-error"], "{q}");
    assert!(
        q["attention"][1].as_str().unwrap().ends_with("audit"),
        "{q}"
    );
    assert!(attention(row(&f, &busy.id())).is_empty());
    assert_eq!(f[0]["id"], quiet.id(), "those needing attention first");
    assert_eq!(hub.admin("GET", "/admin/v1/fleet", None).1["attention"], 1);

    // Three more days: the quiet one has not checked in since.
    hub.set_time(T0 + 6 * DAY);
    busy.clock
        .advance(std::time::Duration::from_millis(3 * DAY));
    busy.sync().unwrap();
    let f = fleet(&hub);
    let mut why = attention(row(&f, &quiet.id()));
    why.sort();
    assert_eq!(why, vec!["audit-stale", "last-error", "silent"]);
    // The same for Prometheus (device ids and counts only).
    let metrics = fleet_metrics(&hub);
    let q = quiet.id();
    for line in [
        "carecache_hub_devices{state=\"attention\"} 1".to_owned(),
        "carecache_hub_devices{state=\"ok\"} 1".to_owned(),
        format!("carecache_hub_device_attention{{device=\"{q}\",reason=\"silent\"}} 1"),
        format!("carecache_hub_device_audit_backlog{{device=\"{q}\"}} 1"),
        format!("carecache_hub_device_last_checkin_age_seconds{{device=\"{q}\"}} 259200"),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }

    // Ten days before the certificate's end (fleet `certificate_warn_days` = 30) the
    // device that still syncs is flagged too.
    let near = until - 10 * DAY;
    hub.set_time(near);
    busy.clock.set_wall(near);
    let _ = busy.sync();
    let b = row(&fleet(&hub), &busy.id()).clone();
    assert!(
        attention(&b).contains(&"certificate-expiring".to_owned()),
        "{b}"
    );
}

#[test]
fn a_revoked_device_uploads_its_audit_then_wipes_and_the_hub_records_the_wipe() {
    let hub = TestHub::start(10, 62);
    let dev = Dev::enrolled(&hub);
    let id = dev.id();
    let patients = shareable(&hub, 10);
    grant(&hub, &id, &patients, json!({}));
    dev.sync().unwrap();
    // Entries written since the last upload wait on the device.
    dev.device.add_client("handover-app").unwrap();
    dev.device.revoke_client("handover-app").unwrap();
    let waiting = dev.device.audit_backlog().0;
    assert!(waiting.entries >= 1, "{waiting:?}");
    let last_seq = waiting.acked + waiting.entries;

    hub.revoke_device(&id);
    let err = dev.sync().unwrap_err();
    assert!(
        matches!(err, carecache::device::DeviceError::Revoked),
        "{err}"
    );
    assert!(dev.device.is_wiped());
    assert!(!dev.tmp.path().join("data").exists(), "data destroyed");

    // Every waiting entry reached the hub, the wipe order last.
    let head = hub.hub.state.audit_head(&id).unwrap();
    assert_eq!(head.seq, last_seq + 1, "the backlog and the wipe order");
    let last = hub.hub.state.audit_entry(&id, head.seq).unwrap().unwrap();
    assert_eq!(
        last.record.event,
        AuditEvent::Key(KeyEvent::WipeOrdered {
            backlog: u32::try_from(waiting.entries).unwrap()
        })
    );
    assert_eq!(hub.hub.state.verify_audit_chain(&id).unwrap(), Ok(head.seq));
    let f = fleet(&hub);
    let d = row(&f, &id);
    assert_eq!(d["revoked"], true);
    assert_eq!(d["wipe"]["audit_unsent"], 0, "{d}");
    assert!(attention(d).is_empty(), "{d}");
}

#[test]
fn a_revoked_device_that_cannot_upload_still_wipes_and_the_hub_counts_what_was_lost() {
    use carecache_hub::server::Tamper;
    let hub = TestHub::start(10, 63);
    let dev = Dev::enrolled(&hub);
    let id = dev.id();
    grant(&hub, &id, &shareable(&hub, 10), json!({}));
    dev.sync().unwrap();
    dev.device.add_client("handover-app").unwrap();
    let waiting = dev.device.audit_backlog().0.entries;
    hub.revoke_device(&id);
    // The hub's audit route fails (its answers are cut): nothing can be uploaded.
    hub.hub
        .dangerous_set_response_hook(Some(std::sync::Arc::new(|route, _| {
            if route == "audit" {
                Tamper::CutAfter(3)
            } else {
                Tamper::Pass
            }
        })));
    assert!(matches!(
        dev.sync().unwrap_err(),
        carecache::device::DeviceError::Revoked
    ));
    assert!(!dev.tmp.path().join("data").exists());
    let f = fleet(&hub);
    let d = row(&f, &id);
    // The backlog and the wipe order itself were lost; the hub says so.
    assert_eq!(
        d["wipe"]["audit_unsent"].as_u64().unwrap(),
        waiting + 1,
        "{d}"
    );
    assert_eq!(attention(d), vec!["wipe-lost-audit"]);
}
