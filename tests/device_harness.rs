//! A device on disk (data directory, key file, config) bound to a real test hub over
//! loopback TLS, with a manual clock.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use carecache::clock::ManualClock;
use carecache::config::Config;
use carecache::crypto::RootKey;
use carecache::device::{Device, DeviceError};
use carecache::keysource::{SourceKind, create_key_file};
use carecache::store::Store;
use carecache::sync::Summary;
pub(crate) use carecache_hub::testing::{T0, TestHub};
use sync_protocol::NhsNumber;

pub(crate) const HOUR: Duration = Duration::from_secs(3600);

pub(crate) struct Dev {
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) config_path: PathBuf,
    pub(crate) clock: Arc<ManualClock>,
    pub(crate) device: Device,
    pub(crate) root: RootKey,
}

/// Config text for a device of `hub` in `dir`.
pub(crate) fn config_text(hub: &TestHub, dir: &std::path::Path) -> String {
    format!(
        r#"data_dir = "{data}"
[key]
source = "key_file"
path = "{key}"
[hub]
url = "{url}"
ca_file = "{ca}"
max_batch_bytes = 262144
connect_timeout_secs = 5
read_timeout_secs = 30
[sync]
max_clock_skew_secs = 900
[device]
label = "Ambulance 7"
[api]
listen = "127.0.0.1:0"
[identity]
mode = "asserted"
"#,
        data = dir.join("data").display(),
        key = dir.join("root.key").display(),
        url = hub.base_url(),
        ca = hub.ca_file.display(),
    )
}

impl Dev {
    /// A fresh, initialised, not yet enrolled device whose clock reads `T0`.
    pub(crate) fn new(hub: &TestHub) -> Self {
        Self::with_config(hub, |text| text)
    }

    /// [`Dev::new`] with its configuration text edited by `edit`.
    pub(crate) fn with_config(hub: &TestHub, edit: impl FnOnce(String) -> String) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = create_key_file(&tmp.path().join("root.key")).unwrap();
        Store::create(&tmp.path().join("data"), &root, SourceKind::KeyFile, None).unwrap();
        let config_path = tmp.path().join("carecache.toml");
        std::fs::write(&config_path, edit(config_text(hub, tmp.path()))).unwrap();
        let clock = Arc::new(ManualClock::new(T0));
        let config = Config::load(&config_path).unwrap();
        let device = Device::open(config, &root, clock.clone()).unwrap();
        Self {
            tmp,
            config_path,
            clock,
            device,
            root,
        }
    }

    /// A device enrolled with `hub`.
    pub(crate) fn enrolled(hub: &TestHub) -> Self {
        let d = Self::new(hub);
        d.device.enrol(&hub.token()).unwrap();
        d
    }

    pub(crate) fn id(&self) -> String {
        self.device.device_id().unwrap().unwrap()
    }

    pub(crate) fn sync(&self) -> Result<Summary, DeviceError> {
        self.device.sync_once(&mut |_, _| {})
    }

    /// Closes and reopens the device (a restart), keeping its clock.
    pub(crate) fn restart(self) -> Self {
        self.closed(|_| ()).0
    }

    /// Closes the device, runs `f` with its config path (CLI commands need the database
    /// to themselves), and opens it again.
    pub(crate) fn closed<T>(self, f: impl FnOnce(&str) -> T) -> (Self, T) {
        let Dev {
            tmp,
            config_path,
            clock,
            device,
            root,
        } = self;
        drop(device);
        let out = f(config_path.to_str().unwrap());
        let config = Config::load(&config_path).unwrap();
        let device = Device::open(config, &root, clock.clone()).unwrap();
        (
            Dev {
                tmp,
                config_path,
                clock,
                device,
                root,
            },
            out,
        )
    }

    /// Held patients.
    pub(crate) fn held(&self) -> Vec<NhsNumber> {
        let mut v: Vec<NhsNumber> = self
            .device
            .store()
            .held_versions()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        v.sort();
        v
    }
}

/// Grants a lease on `patients` to `device` (team audience, clinical view, 24 h from
/// 2026-11-24T00:00Z, 12 h offline), with overrides merged in.
pub(crate) fn grant(
    hub: &TestHub,
    device: &str,
    patients: &[NhsNumber],
    overrides: serde_json::Value,
) -> u64 {
    let mut spec = serde_json::json!({
        "label": "Test caseload",
        "target": { "device": device },
        "view": "clinical",
        "not_before": "2026-11-24T00:00:00Z",
        "not_after": "2026-11-25T00:00:00Z",
        "max_offline_secs": 43200,
        "emergency_access": false,
        "patients": patients.iter().map(|n| n.digits()).collect::<Vec<_>>(),
    });
    if let (Some(base), Some(extra)) = (spec.as_object_mut(), overrides.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    hub.grant(spec)
}

/// The shareable patients among the first `n` of the hub.
pub(crate) fn shareable(hub: &TestHub, n: usize) -> Vec<NhsNumber> {
    hub.patients
        .iter()
        .take(n)
        .filter(|p| p.shareable())
        .map(|p| p.nhs_number())
        .collect()
}

pub(crate) fn first_n(hub: &TestHub, n: usize) -> Vec<NhsNumber> {
    hub.patients
        .iter()
        .take(n)
        .map(|p| p.nhs_number())
        .collect()
}

/// Runs the `carecache` binary with `args`: success, stdout, stderr.
pub(crate) fn run_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_carecache"))
        .args(args)
        .env_remove("CARECACHE_CONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `carecache clients add epcr --config CFG` as the operator runs it: the token printed.
pub(crate) fn cli_client_token(cfg: &str) -> String {
    let (ok, out, err) = run_cli(&["clients", "add", "epcr", "--config", cfg]);
    assert!(ok, "{out}{err}");
    out.split_whitespace()
        .find(|w| w.starts_with("cct_"))
        .expect("a token is printed")
        .to_owned()
}

/// RFC 3339 for milliseconds since the epoch (lease windows for real processes).
pub(crate) fn at(ms: u64) -> String {
    carecache::clock::rfc3339(sync_protocol::types::Timestamp::from_millis(ms).unwrap())
}

/// `carecache serve --config CFG` as a process, its log read line by line as it comes.
pub(crate) struct Daemon {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    reader: Option<std::thread::JoinHandle<String>>,
}

impl Daemon {
    pub(crate) fn spawn(cfg: &str) -> Self {
        Self::run(&["serve", "--config", cfg], false)
    }

    /// `carecache ARGS` as a process, reading its standard output (`stdout`) or its log.
    pub(crate) fn run(args: &[&str], stdout: bool) -> Self {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_carecache"))
            .args(args)
            .env("CARECACHE_LOG", if stdout { "warn" } else { "info" })
            .stdout(if stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(if stdout {
                Stdio::inherit()
            } else {
                Stdio::piped()
            })
            .spawn()
            .unwrap();
        let stderr: Box<dyn std::io::Read + Send> = if stdout {
            Box::new(child.stdout.take().unwrap())
        } else {
            Box::new(child.stderr.take().unwrap())
        };
        let (tx, lines) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut log = String::new();
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line.clone());
                log.push_str(&line);
                log.push('\n');
            }
            log
        });
        Self {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// The first log line from now on containing `needle`, within 30 s.
    pub(crate) fn wait_for(&self, needle: &str) -> Option<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            if line.contains(needle) {
                return Some(line);
            }
        }
    }

    /// The local API's address, as the log announces it.
    pub(crate) fn addr(&self) -> std::net::SocketAddr {
        let line = self.wait_for("addr=").expect("serve did not start");
        line.split("addr=").nth(1).unwrap().trim().parse().unwrap()
    }

    /// Sends `signal` and waits for the exit: its status and the whole log.
    pub(crate) fn stop(
        mut self,
        signal: rustix::process::Signal,
    ) -> (std::process::ExitStatus, String) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
        let status = self.child.wait().unwrap();
        let log = self.reader.take().unwrap().join().unwrap();
        (status, log)
    }
}

impl Drop for Daemon {
    /// A failed test does not leave the process behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A device as an operator sets one up with the CLI: `config_text` (edited by `edit`)
/// written in `dir`, `init` with a key file, `enrol` with `hub`. Returns the config path
/// and the device id.
pub(crate) fn cli_device(
    hub: &TestHub,
    dir: &std::path::Path,
    edit: impl FnOnce(String) -> String,
) -> (PathBuf, String) {
    let config = dir.join("carecache.toml");
    std::fs::write(&config, edit(config_text(hub, dir))).unwrap();
    let cfg = config.to_str().unwrap();
    let (ok, _, err) = run_cli(&[
        "init",
        "--data-dir",
        dir.join("data").to_str().unwrap(),
        "--key-file",
        dir.join("root.key").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = run_cli(&["enrol", "--config", cfg, "--token", &hub.token()]);
    assert!(ok && out.contains("enrolled as"), "{out}{err}");
    let id = out
        .split_whitespace()
        .nth(2)
        .unwrap()
        .trim_end_matches(';')
        .to_owned();
    (config, id)
}

/// Answers each pull with what `f` makes of the hub's encoded batch.
pub(crate) fn on_pull(
    hub: &TestHub,
    f: impl Fn(&[u8]) -> carecache_hub::server::Tamper + Send + Sync + 'static,
) {
    use carecache_hub::server::Tamper;
    hub.hub
        .dangerous_set_response_hook(Some(Arc::new(move |route, bytes| {
            if route == "pull" {
                f(bytes)
            } else {
                Tamper::Pass
            }
        })));
}

/// Rewrites each pull answer with `f` (decoded batch in, batch out).
pub(crate) fn tamper_batches(
    hub: &TestHub,
    f: impl Fn(sync_protocol::message::Batch) -> sync_protocol::message::Batch + Send + Sync + 'static,
) {
    use carecache_hub::server::Tamper;
    use sync_protocol::{Compression, Message, decode, encode};
    on_pull(hub, move |bytes| match decode(bytes) {
        Ok(Message::Batch(b)) => {
            Tamper::Replace(encode(&Message::Batch(f(b)), Compression::None).unwrap())
        }
        _ => Tamper::Pass,
    });
}

/// `b` with the first alert of its first record that has alerts recoded as HIV
/// infection (SNOMED CT 86406008), which is on the shipped sensitive list.
pub(crate) fn with_sensitive_alert(
    mut b: sync_protocol::message::Batch,
) -> sync_protocol::message::Batch {
    use sync_protocol::record::Section;
    use sync_protocol::types::{BoundedVec, SctId};
    let mut v = b.upserts.into_inner();
    if let Some(r) = v.iter_mut().find(|r| !r.alerts.entries().is_empty()) {
        let mut alerts = r.alerts.entries().to_vec();
        alerts[0].code.code = Some(sync_protocol::types::Code::Snomed(
            SctId::new(86_406_008).unwrap(),
        ));
        r.alerts = Section::Entries(BoundedVec::try_from(alerts).unwrap());
    }
    b.upserts = BoundedVec::try_from(v).unwrap();
    b
}

/// Every audit record `dev` wrote that the hub holds, then those still waiting on the
/// device (the uploaded ones are gone from it).
pub(crate) fn audit_everywhere(hub: &TestHub, dev: &Dev) -> Vec<sync_protocol::audit::AuditRecord> {
    let id = dev.id();
    let head = hub.hub.state.audit_head(&id).unwrap().seq;
    (1..=head)
        .map(|seq| hub.hub.state.audit_entry(&id, seq).unwrap().unwrap().record)
        .chain(
            crate::api_harness::audit_of(dev.device.store())
                .into_iter()
                .map(|(_, r)| r),
        )
        .collect()
}
