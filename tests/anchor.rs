//! Anti-rollback (issue 24, point 10): a restored old copy of the data directory does
//! not serve what was purged after it was taken. The store is bound to a monotonic
//! counter outside the copy — a counter file, or a TPM 2.0 NV counter (tested on swtpm)
//! — advanced at every purge and checked at open; a copy behind it loses its patient
//! data and leases before anything is served, syncs from nothing, and is reported to the
//! hub until the privacy officer clears it with a reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use carecache::anchor::Counter;
use serde_json::{Value, json};
use sync_protocol::NhsNumber;
use sync_protocol::audit::{AuditEvent, AuditRecord, KeyEvent};
use sync_protocol::message::{AnchorKind, RestoreReason};

use crate::device_harness::audit_everywhere as audit;
use crate::device_harness::{
    Daemon, Dev, TestHub, at, cli_client_token, cli_device, grant, shareable,
};

const FILE_ANCHOR: &str = "[anchor]\nkind = \"file\"\npath = \"anchor/counter\"\n";

fn key_events(records: &[AuditRecord]) -> Vec<KeyEvent> {
    records
        .iter()
        .filter_map(|r| match &r.event {
            AuditEvent::Key(k) => Some(k.clone()),
            _ => None,
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "copying {}", from.display());
}

fn restore(backup: &Path, data: &Path) {
    std::fs::remove_dir_all(data).unwrap();
    copy_dir(backup, data);
}

fn fleet_row(hub: &TestHub, id: &str) -> Value {
    let (status, body) = hub.admin("GET", "/admin/v1/fleet", None);
    assert_eq!(status, 200, "{body}");
    body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .unwrap()
        .clone()
}

fn attention(row: &Value) -> Vec<String> {
    row["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().split(':').next().unwrap().to_owned())
        .collect()
}

fn sorted(mut v: Vec<NhsNumber>) -> Vec<NhsNumber> {
    v.sort();
    v
}

/// The IT team restores last week's backup of a tablet's data directory — taken before a
/// caseload was withdrawn. With a file anchor, the device finds the copy behind its
/// counter at open and destroys it before serving anything, syncs back only what it may
/// hold, tells the hub, and the hub flags it until the privacy officer clears it. The
/// same restore on a device with no anchor serves the withdrawn caseload again: what the
/// anchor is for.
#[test]
fn a_restored_copy_is_destroyed_before_anything_is_served_and_reported_until_cleared() {
    let hub = TestHub::start(40, 301);
    let patients = shareable(&hub, 40);
    let (keep, withdraw) = patients.split_at(patients.len() / 2);
    let run = |anchored: bool| {
        let dev = Dev::with_config(&hub, |t| {
            if anchored {
                format!("{t}{FILE_ANCHOR}")
            } else {
                t
            }
        });
        dev.device.enrol(&hub.token()).unwrap();
        let id = dev.id();
        grant(&hub, &id, keep, json!({ "label": "kept" }));
        let withdrawn = grant(&hub, &id, withdraw, json!({ "label": "withdrawn" }));
        dev.sync().unwrap();
        assert_eq!(dev.held(), sorted(patients.clone()));
        // The backup: the data directory copied with the device stopped.
        let data = dev.tmp.path().join("data");
        let backup = dev.tmp.path().join("backup");
        let (dev, ()) = dev.closed(|_| copy_dir(&data, &backup));
        // A caseload withdrawn at the hub: purged at the next sync.
        let (status, body) = hub.admin("DELETE", &format!("/admin/v1/leases/{withdrawn}"), None);
        assert!(status < 300, "{body}");
        dev.sync().unwrap();
        assert_eq!(dev.held(), sorted(keep.to_vec()));
        // The old copy restored with the device stopped, then the device started.
        let (dev, ()) = dev.closed(|_| restore(&backup, &data));
        dev
    };

    // No anchor: the copy serves the withdrawn caseload again.
    let bare = run(false);
    assert_eq!(
        bare.held(),
        sorted(patients.clone()),
        "without an anchor the restored copy is served whole (the hazard the anchor removes)"
    );
    assert_eq!(bare.device.status().unwrap().anchor.kind, "none");

    // A file anchor: the copy is found and destroyed at open.
    let dev = run(true);
    assert!(
        dev.held().is_empty(),
        "nothing of the restored copy is held"
    );
    assert!(
        dev.device.policy().leases().is_empty(),
        "its leases are gone too"
    );
    let status = dev.device.status().unwrap();
    assert_eq!(status.anchor.kind, "file");
    assert!(
        status
            .anchor
            .restored
            .as_deref()
            .unwrap()
            .contains("behind"),
        "{status:?}"
    );
    let words = carecache::device::render_status(&status);
    assert!(words.contains("a restored copy was found"), "{words}");
    let events = key_events(&audit(&hub, &dev));
    assert!(
        events.contains(&KeyEvent::AnchorBound {
            kind: AnchorKind::File
        }),
        "{events:?}"
    );
    assert!(
        events.contains(&KeyEvent::Restored {
            reason: RestoreReason::Behind,
            patients: patients.len() as u32,
            leases: 2,
        }),
        "{events:?}"
    );

    // Syncing from nothing brings back only what the device may hold now; the hub has
    // the report, so the device stops carrying it.
    dev.sync().unwrap();
    assert_eq!(dev.held(), sorted(keep.to_vec()));
    assert!(dev.device.status().unwrap().anchor.restored.is_none());
    let id = dev.id();
    let row = fleet_row(&hub, &id);
    assert!(attention(&row).contains(&"restored".to_owned()), "{row}");
    assert_eq!(row["anchor"]["kind"], "File");
    assert_eq!(row["anchor"]["restores"][0]["reason"], "Behind");
    // A second sync does not report it twice.
    dev.sync().unwrap();
    let row = fleet_row(&hub, &id);
    assert_eq!(row["anchor"]["restores"].as_array().unwrap().len(), 1);

    // Only the privacy officer clears it, with a reason.
    let path = format!("/admin/v1/devices/{id}/clear-restored");
    let body = json!({ "officer": "P. Officer", "reason": "Restored from backup after a disk fault, ticket 4411" });
    let (status, _) = hub.admin("POST", &path, Some(body.clone()));
    assert_eq!(
        status, 401,
        "the admin token does not clear a restored copy"
    );
    let officer = carecache_hub::testing::PRIVACY_TOKEN;
    let (status, _) = hub.admin_as(
        "POST",
        &path,
        Some(json!({ "officer": "P. Officer", "reason": "ok" })),
        officer,
    );
    assert_eq!(status, 422, "a reason is required");
    let (status, _) = hub.admin_as(
        "POST",
        &path,
        Some(json!({ "reason": "no officer named here" })),
        officer,
    );
    assert_eq!(status, 400);
    let (status, _) = hub.admin_as(
        "POST",
        "/admin/v1/devices/no-such-device/clear-restored",
        Some(body.clone()),
        officer,
    );
    assert_eq!(status, 404);
    let (status, answer) = hub.admin_as("POST", &path, Some(body.clone()), officer);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["cleared"], 1);
    let row = fleet_row(&hub, &id);
    assert!(!attention(&row).contains(&"restored".to_owned()), "{row}");
    let cleared = &row["anchor"]["restores"][0]["cleared"];
    assert_eq!(cleared["officer"], "P. Officer");
    assert!(cleared["reason"].as_str().unwrap().contains("ticket 4411"));
    let (status, _) = hub.admin_as("POST", &path, Some(body), officer);
    assert_eq!(status, 404, "nothing left to clear");

    // The live store opens as itself: nothing destroyed at a plain restart.
    let dev = dev.restart();
    assert_eq!(dev.held(), sorted(keep.to_vec()));
    assert!(dev.device.status().unwrap().anchor.restored.is_none());
}

/// The anchor's own failures, each with the answer a privacy officer expects: an anchor
/// that cannot be read holds every patient route (and is retried); one that cannot be
/// advanced never holds back a purge, and the count is completed later; a commit whose
/// advance never came (a crash between them) is completed at open without loss; a
/// counter file removed or moved to another store is a foreign copy; a store bound once
/// does not open without its anchor; a copy from before the store was ever bound is not
/// trusted on first use where the machine's anchor already counts.
#[test]
fn anchor_failures_hold_or_reset_and_never_serve_an_unchecked_copy() {
    let hub = TestHub::start(30, 302);
    let patients = shareable(&hub, 30);
    let dev = Dev::with_config(&hub, |t| format!("{t}{FILE_ANCHOR}"));
    dev.device.enrol(&hub.token()).unwrap();
    let id = dev.id();
    let (a, rest) = patients.split_at(10);
    let (b, c) = rest.split_at(10);
    grant(&hub, &id, a, json!({}));
    let lease_b = grant(&hub, &id, b, json!({}));
    grant(&hub, &id, c, json!({}));
    dev.sync().unwrap();
    let counter_path = dev.tmp.path().join("anchor/counter");
    let counter = carecache::anchor::FileCounter::new(&counter_path);
    let before = counter.read().unwrap().unwrap();

    // An advance that fails (the counter's directory refuses the new file): the purge
    // happens all the same, and status and the hub say the anchor is behind.
    let next = counter_path.with_extension("next");
    std::fs::create_dir(&next).unwrap();
    hub.admin("DELETE", &format!("/admin/v1/leases/{lease_b}"), None);
    dev.sync().unwrap();
    assert_eq!(
        dev.held(),
        sorted([a, c].concat()),
        "the purge was not held back"
    );
    assert_eq!(counter.read().unwrap(), Some(before), "not advanced");
    let status = dev.device.status().unwrap();
    assert!(
        status.anchor.problem.is_some() && !status.anchor.holding,
        "{status:?}"
    );
    dev.sync().unwrap();
    assert_eq!(attention(&fleet_row(&hub, &id)), ["anchor-unavailable"]);
    // Restarted in that state (the store one count ahead): completed at open, no loss.
    std::fs::remove_dir(&next).unwrap();
    let dev = dev.restart();
    assert_eq!(dev.held(), sorted([a, c].concat()));
    assert_eq!(counter.read().unwrap(), Some(before + 1));
    assert!(dev.device.status().unwrap().anchor.problem.is_none());
    dev.sync().unwrap();
    assert!(attention(&fleet_row(&hub, &id)).is_empty());

    // A counter that cannot be read: the device opens but serves no patient data, and
    // takes it up again once it can check.
    let aside = counter_path.with_extension("aside");
    let (dev, ()) = dev.closed(|_| {
        std::fs::rename(&counter_path, &aside).unwrap();
        std::fs::create_dir(&counter_path).unwrap();
    });
    let status = dev.device.status().unwrap();
    assert!(status.anchor.holding, "{status:?}");
    assert!(dev.device.anchor_held().is_some());
    std::fs::remove_dir(&counter_path).unwrap();
    std::fs::rename(&aside, &counter_path).unwrap();
    dev.device.tick().unwrap();
    assert!(
        dev.device.anchor_held().is_none(),
        "checked again at the tick"
    );
    assert_eq!(
        dev.held(),
        sorted([a, c].concat()),
        "the live store is kept"
    );

    // The counter file removed: the store cannot show it is current — reset.
    let (dev, ()) = dev.closed(|_| std::fs::remove_file(&counter_path).unwrap());
    assert!(dev.held().is_empty());
    let events = key_events(&audit(&hub, &dev));
    assert!(
        events.contains(&KeyEvent::Restored {
            reason: RestoreReason::AnchorLost,
            patients: (a.len() + c.len()) as u32,
            leases: 2,
        }),
        "{events:?}"
    );
    dev.sync().unwrap();
    assert_eq!(dev.held(), sorted([a, c].concat()));

    // The configuration loses its [anchor]: the bound store refuses to open for service.
    let config = std::fs::read_to_string(&dev.config_path).unwrap();
    std::fs::write(&dev.config_path, config.replace(FILE_ANCHOR, "")).unwrap();
    let root = dev.root.clone();
    let clock = dev.clock.clone();
    let config_path = dev.config_path.clone();
    let tmp_path = dev.tmp.path().to_path_buf();
    let Dev { tmp, device, .. } = dev;
    drop(device);
    let err = carecache::device::Device::open(
        carecache::config::Config::load(&config_path).unwrap(),
        &root,
        clock.clone(),
    )
    .unwrap_err();
    assert!(
        matches!(err, carecache::device::DeviceError::AnchorRequired(_)),
        "{err}"
    );
    assert!(err.to_string().contains("[anchor]"), "{err}");
    std::fs::write(&config_path, config).unwrap();

    // A copy from before the store was ever bound (its backup predates the anchor): the
    // machine's counter already counts for a store, so it is not trusted on first use.
    let unbound = tmp_path.join("unbound");
    let other = Dev::new(&hub);
    other.device.enrol(&hub.token()).unwrap();
    grant(&hub, &other.id(), c, json!({}));
    other.sync().unwrap();
    let other_data = other.tmp.path().join("data");
    let other_root = other.root.clone();
    let (_other, ()) = other.closed(|_| copy_dir(&other_data, &unbound));
    let store = carecache::store::Store::open(&unbound, &other_root).unwrap();
    let check = store
        .bind_anchor(
            Arc::new(carecache::anchor::FileCounter::new(&counter_path)),
            |_| Ok(carecache::store::Extras::default()),
        )
        .unwrap();
    assert!(
        matches!(
            check,
            carecache::store::AnchorCheck::Restored {
                reason: RestoreReason::Unbound,
                leases: 1,
                ..
            }
        ),
        "{check:?}"
    );
    assert_eq!(store.stats().unwrap().patients, 0);
    drop(tmp);
}

/// Starts swtpm on loopback with its state in `dir`: the TCTI that reaches it, and the
/// process (killed when dropped).
struct Swtpm {
    child: std::process::Child,
    tcti: String,
}

impl Swtpm {
    fn start(dir: &Path, port: u16) -> Self {
        let child = std::process::Command::new("swtpm")
            .args([
                "socket",
                "--tpm2",
                "--tpmstate",
                &format!("dir={}", dir.display()),
                "--server",
                &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                "--ctrl",
                &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                "--flags",
                "not-need-init,startup-clear",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("swtpm (Debian package swtpm) runs the TPM tests; .ci/run installs it");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "swtpm did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            tcti: format!("swtpm:host=127.0.0.1,port={port}"),
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two free loopback ports in a row (swtpm's server and control).
fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < 65535 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two free ports in a row");
}

fn get(addr: std::net::SocketAddr, token: &str, path: &str) -> Option<crate::api_harness::Resp> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nX-Carecache-User: n1\r\nX-Carecache-Purpose: TREAT\r\n\r\n"
    );
    crate::api_harness::try_raw(addr, req.as_bytes())
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The real daemon with a TPM 2.0 NV counter (swtpm on loopback): bound at enrolment,
/// advanced by the purge of a withdrawn caseload; a restored copy of the data directory
/// is destroyed at start before the API answers anything, and synced back to what the
/// device may hold. With the TPM gone the daemon serves no patient data (503, not ready)
/// until it comes back.
#[test]
fn the_daemon_on_a_tpm_counter_destroys_a_restored_copy_and_holds_without_its_tpm() {
    let hub = TestHub::start(30, 303);
    let now = carecache::clock::Clock::wall_ms(&carecache::clock::SystemClock::new());
    hub.set_time(now);
    let tmp = tempfile::tempdir().unwrap();
    let tpm_state = tmp.path().join("tpm");
    std::fs::create_dir(&tpm_state).unwrap();
    let port = free_port_pair();
    let tpm = Swtpm::start(&tpm_state, port);
    let index = 0x0100_1234_u32;
    let section = format!(
        "[anchor]\nkind = \"tpm\"\ntcti = \"{}\"\nnv_index = \"{index:#010x}\"\n",
        tpm.tcti
    );
    let (config, id) = cli_device(&hub, tmp.path(), |t| {
        format!(
            "{}{section}",
            t.replace("[sync]\n", "[sync]\ninterval_secs = 3600\ntick_secs = 1\n")
        )
    });
    let cfg = config.to_str().unwrap();
    let counter = carecache::anchor::TpmCounter::new(&tpm.tcti, index);
    let bound = counter
        .read()
        .unwrap()
        .expect("enrolment bound the store to the TPM");
    let patients = shareable(&hub, 30);
    let (keep, withdraw) = patients.split_at(patients.len() / 2);
    let window = json!({ "not_before": at(now - 3_600_000), "not_after": at(now + 8 * 3_600_000) });
    grant(&hub, &id, keep, window.clone());
    let withdrawn = grant(&hub, &id, withdraw, window);
    let token = cli_client_token(cfg);
    let read = |addr, nhs: &NhsNumber| {
        get(addr, &token, &format!("/v1/patients/{}", nhs.digits())).map(|r| r.status)
    };

    let daemon = Daemon::spawn(cfg);
    let addr = daemon.addr();
    wait_for("the daemon synced", || {
        read(addr, &withdraw[0]) == Some(200)
    });
    drop(daemon);
    let data: PathBuf = tmp.path().join("data");
    let backup = tmp.path().join("backup");
    copy_dir(&data, &backup);

    hub.admin("DELETE", &format!("/admin/v1/leases/{withdrawn}"), None);
    let daemon = Daemon::spawn(cfg);
    let addr = daemon.addr();
    wait_for("the withdrawn caseload was purged", || {
        read(addr, &withdraw[0]) == Some(403) || read(addr, &withdraw[0]) == Some(404)
    });
    drop(daemon);
    let advanced = counter.read().unwrap().unwrap();
    assert!(
        advanced > bound,
        "the purge advanced the TPM counter ({bound} → {advanced})"
    );

    // The old copy restored: destroyed before the API answers, then synced back.
    restore(&backup, &data);
    let daemon = Daemon::spawn(cfg);
    let addr = daemon.addr();
    assert_ne!(
        read(addr, &withdraw[0]),
        Some(200),
        "the restored copy is never served"
    );
    wait_for("synced from nothing", || read(addr, &keep[0]) == Some(200));
    assert_ne!(read(addr, &withdraw[0]), Some(200));
    wait_for("the restore reported to the hub", || {
        attention(&fleet_row(&hub, &id)).contains(&"restored".to_owned())
    });
    let status = get(addr, &token, "/status").unwrap().json();
    assert_eq!(status["anchor"]["kind"], "tpm", "{status}");
    assert_eq!(status["ready"], true);
    drop(daemon);

    // The TPM gone: the daemon starts, serves no patient data and says why; back, it
    // serves again within a tick.
    drop(tpm);
    let daemon = Daemon::spawn(cfg);
    let addr = daemon.addr();
    let r = get(addr, &token, &format!("/v1/patients/{}", keep[0].digits())).unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        r.json()["error"]["code"],
        "rollback-check-failed",
        "{}",
        r.text()
    );
    let status = get(addr, &token, "/status").unwrap().json();
    assert_eq!(status["ready"], false, "{status}");
    let _tpm = Swtpm::start(&tpm_state, port);
    wait_for("serving again once the TPM is back", || {
        read(addr, &keep[0]) == Some(200)
    });
    drop(daemon);
}
