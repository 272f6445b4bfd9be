//! A really full disk under the audit log: the data directory on a small tmpfs that the
//! test fills to the last byte. Reads are refused (503, fail closed) once an audit
//! entry cannot be committed, never answered unaudited; when space returns, service
//! resumes on the same running daemon and nothing is lost — every answered read has
//! its entry, the chain verifies, every record still opens. (Needs root for the mount,
//! as CI has; `api.rs` covers the same refusal with an injected failure.)

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use carecache::config::Config;
use carecache::device::Device;
use carecache::keysource::{SourceKind, create_key_file};
use carecache::store::Store;
use serde_json::json;
use sync_protocol::audit::AuditEvent;

use crate::api_harness::{Served, audit_of};
use crate::device_harness::{Dev, T0, TestHub, config_text, grant, shareable};

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Volume {
    dir: tempfile::TempDir,
}

impl Volume {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes zeros to `path` until the volume is full; returns the file.
fn fill(path: &Path) -> PathBuf {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 4096];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling the volume: {e}"),
        }
    }
    // The last partial block too.
    while f.write_all(&[0u8]).is_ok() {}
    let _ = f.sync_all();
    path.to_owned()
}

#[test]
fn a_full_audit_volume_refuses_reads_and_service_resumes_with_nothing_lost() {
    let hub = TestHub::start(30, 61);
    let vol = Volume::mount("6m");
    // The device: config and key outside, data directory on the small volume.
    let tmp = tempfile::tempdir().unwrap();
    let root = create_key_file(&tmp.path().join("root.key")).unwrap();
    let data = vol.path().join("data");
    Store::create(&data, &root, SourceKind::KeyFile, None).unwrap();
    let config_path = tmp.path().join("carecache.toml");
    let text = config_text(&hub, tmp.path()).replace(
        &format!("data_dir = \"{}\"", tmp.path().join("data").display()),
        &format!("data_dir = \"{}\"", data.display()),
    );
    std::fs::write(&config_path, text).unwrap();
    let clock = Arc::new(carecache::clock::ManualClock::new(T0));
    let device = Device::open(Config::load(&config_path).unwrap(), &root, clock.clone()).unwrap();
    device.enrol(&hub.token()).unwrap();
    let dev = Dev {
        tmp,
        config_path,
        clock,
        device,
        root,
    };
    let patients = shareable(&hub, 30);
    grant(&hub, &dev.id(), &patients, json!({}));
    dev.sync().unwrap();
    let s = Served::start(dev);
    let path = |i: usize| format!("/v1/patients/{}", patients[i % patients.len()].digits());
    assert_eq!(s.get(&path(0)).status, 200);

    // The disk fills.
    let filler = fill(&vol.path().join("filler"));
    let mut answered = Vec::new();
    let mut refused = 0;
    for i in 0..20_000 {
        let r = s.get(&path(i));
        match r.status {
            200 => answered.push(r.request_id()),
            503 => {
                assert!(r.text().contains("audit"), "{}", r.text());
                assert!(!r.text().contains(&patients[i % patients.len()].digits()));
                refused += 1;
                if refused >= 20 {
                    break;
                }
            }
            other => panic!("read {i} answered {other}: {}", r.text()),
        }
    }
    assert!(
        refused >= 20,
        "the full disk never refused a read ({} answered)",
        answered.len()
    );
    let status = s.get("/status").json();
    assert_eq!(status["ready"], false, "{status}");
    assert!(
        status["audit_error"]
            .as_str()
            .unwrap_or_default()
            .contains("full"),
        "{status}"
    );

    // Space returns: the same daemon serves again, and nothing was lost.
    std::fs::remove_file(filler).unwrap();
    let mut back = None;
    for i in 0..50 {
        let r = s.get(&path(i));
        if r.status == 200 {
            back = Some(r.request_id());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let back = back.expect("service did not resume when space returned");
    answered.push(back);
    let entries = audit_of(s.device.store());
    let logged: std::collections::HashSet<u64> = entries
        .iter()
        .filter_map(|(_, r)| match &r.event {
            AuditEvent::Access(a) => Some(a.request_id),
            _ => None,
        })
        .collect();
    let missing = answered.iter().filter(|id| !logged.contains(id)).count();
    assert_eq!(missing, 0, "answered reads without an audit entry");
    let records = s.device.store().records().unwrap();
    assert_eq!(records.len(), patients.len(), "records lost");
    assert_eq!(
        s.get("/status").json()["ready"],
        true,
        "status still says not ready"
    );
    eprintln!(
        "{} reads answered before the disk was full, {refused} refused while full, served again once space returned",
        answered.len() - 1
    );
}
