//! Test support (feature `testing`): a real hub on loopback TLS over synthetic NDJSON,
//! with a development CA, a movable clock and admin helpers. Device tests start one per
//! test; nothing here is used by the hub itself.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test support: a failure here is a broken test environment and should panic"
)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use carecache_synth::{Generator, SourcePatient};
use sync_protocol::record::{PatientRecord, Section};
use sync_protocol::types::{RecordVersion, Timestamp};

use crate::config::Limits;
use crate::pki::{DeviceCa, agent_trusting, dev_ca};
use crate::server::{Background, Hub, tls_from_files};
use crate::sharing::SharingRules;
use crate::source::{FhirRest, IngestSummary, ingest_ndjson};
use crate::state::HubState;

/// The shipped rules with the synthetic record's local-code map: what a region running
/// on the synthetic data would configure (`[sharing] local_code_map`).
pub fn synthetic_rules() -> SharingRules {
    SharingRules::default_rules().unwrap().with_local_map(
        crate::sharing::LocalCodeMap::parse(&carecache_synth::local_code_map()).unwrap(),
    )
}

/// The admin token of test hubs.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// The privacy officer's token of every test hub.
pub const PRIVACY_TOKEN: &str = "test-privacy-officer-token-0123456789";
/// Hub time at start: 2026-11-24T08:00:00Z.
pub const T0: u64 = 1_795_507_200_000;

/// A hub serving on 127.0.0.1:0 until dropped.
pub struct TestHub {
    /// First, so that it stops before the rest (the database, the files) drops.
    server: Background,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The hub (state, hooks).
    pub hub: Arc<Hub>,
    /// Its files (NDJSON, PKI, state).
    pub dir: tempfile::TempDir,
    /// The CA certificate devices pin.
    pub ca_pem: String,
    /// The CA certificate's file.
    pub ca_file: PathBuf,
    /// The synthetic source patients.
    pub patients: Vec<SourcePatient>,
    limits: Limits,
    clock: Arc<AtomicU64>,
}

impl std::fmt::Debug for TestHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestHub")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TestHub {
    /// A hub over `n` synthetic patients generated from `seed`.
    pub fn start(n: usize, seed: u64) -> Self {
        Self::start_with(n, seed, &Limits::default())
    }

    /// [`Self::start`] with protocol limits of the test's choosing.
    pub fn start_with(n: usize, seed: u64, limits: &Limits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let patients = Generator::new(seed).source_patients(n);
        let ndjson = dir.path().join("ndjson");
        carecache_synth::fhir::write_ndjson(&patients, &ndjson).unwrap();
        dev_ca(
            &dir.path().join("pki"),
            &["localhost".into(), "127.0.0.1".into()],
        )
        .unwrap();
        let state = HubState::open(&dir.path().join("hub.redb")).unwrap();
        ingest_ndjson(&state, &synthetic_rules(), &ndjson).unwrap();
        drop(state);
        Self::open(dir, patients, limits, Arc::new(AtomicU64::new(T0)), 0)
    }

    /// A hub whose source is the FHIR R4 server at `base_url`, holding `patients` (what
    /// the server was loaded with): the first ingest is one REST poll, reconciling every
    /// poll (`reconcile_secs` 0), with pages of 100.
    pub fn start_from_fhir(base_url: &str, patients: Vec<SourcePatient>) -> (Self, IngestSummary) {
        let dir = tempfile::tempdir().unwrap();
        dev_ca(
            &dir.path().join("pki"),
            &["localhost".into(), "127.0.0.1".into()],
        )
        .unwrap();
        let state = HubState::open(&dir.path().join("hub.redb")).unwrap();
        let summary = FhirRest::new(base_url, 300, 100)
            .with_reconcile(0)
            .poll(&state, &synthetic_rules())
            .unwrap();
        drop(state);
        let hub = Self::open(
            dir,
            patients,
            &Limits::default(),
            Arc::new(AtomicU64::new(T0)),
            0,
        );
        (hub, summary)
    }

    /// Polls the FHIR R4 server at `base_url` again (see [`Self::start_from_fhir`]);
    /// `patients` is what the source holds now.
    pub fn poll_fhir(&mut self, base_url: &str, patients: Vec<SourcePatient>) -> IngestSummary {
        self.patients = patients;
        FhirRest::new(base_url, 300, 100)
            .with_reconcile(0)
            .poll(&self.hub.state, &synthetic_rules())
            .unwrap()
    }

    /// Serves the hub whose files are in `dir` on 127.0.0.1:`port` (0: any).
    fn open(
        dir: tempfile::TempDir,
        patients: Vec<SourcePatient>,
        limits: &Limits,
        clock: Arc<AtomicU64>,
        port: u16,
    ) -> Self {
        let pki = dir.path().join("pki");
        let (ca_file, ca_key) = (pki.join("ca.pem"), pki.join("ca.key"));
        let state = HubState::open(&dir.path().join("hub.redb")).unwrap();
        let ca = DeviceCa::load(&ca_file, &ca_key, 30).unwrap();
        let ca_pem = std::fs::read_to_string(&ca_file).unwrap();
        let c2 = clock.clone();
        let hub = Arc::new(
            Hub::new(state, ca, ADMIN_TOKEN, limits)
                .with_privacy_officer_token(PRIVACY_TOKEN)
                .with_clock(Arc::new(move || {
                    Timestamp::from_millis(c2.load(Ordering::SeqCst)).unwrap()
                })),
        );
        let tls = tls_from_files(&ca_file, &pki.join("hub.pem"), &pki.join("hub.key")).unwrap();
        let server = Background::start(
            hub.clone(),
            SocketAddr::from(([127, 0, 0, 1], port)),
            tls,
            Duration::from_secs(5),
        )
        .unwrap();
        let addr = server.addr();
        Self {
            addr,
            hub,
            ca_file,
            dir,
            ca_pem,
            patients,
            limits: limits.clone(),
            clock,
            server,
        }
    }

    /// Stops the hub and releases its database (the files stay): for running the
    /// `carecache-hub` command over them, or for [`Self::restart`].
    pub fn close(self) -> Closed {
        let TestHub {
            server,
            addr,
            hub,
            dir,
            patients,
            limits,
            clock,
            ..
        } = self;
        drop(server);
        // The server's tasks are gone with its runtime: this is the last handle, and
        // dropping it closes the database.
        assert_eq!(Arc::strong_count(&hub), 1, "hub still in use");
        drop(hub);
        Closed {
            dir,
            patients,
            limits,
            clock,
            port: addr.port(),
        }
    }

    /// Stops the hub and starts it again over the same database, on the same port (a
    /// hub restart: what it committed is kept, anything in flight is lost).
    pub fn restart(self) -> Self {
        self.close().reopen()
    }

    /// `https://localhost:PORT` (the hub certificate names localhost).
    pub fn base_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// The NDJSON source directory.
    pub fn ndjson_dir(&self) -> PathBuf {
        self.dir.path().join("ndjson")
    }

    /// Sets hub time.
    pub fn set_time(&self, ms: u64) {
        self.clock.store(ms, Ordering::SeqCst);
    }

    /// Admin API call: status and JSON body.
    pub fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        self.admin_as(method, path, body, ADMIN_TOKEN)
    }

    /// Admin API call with `token` as the bearer token.
    pub fn admin_as(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
        token: &str,
    ) -> (u16, serde_json::Value) {
        let agent = agent_trusting(self.ca_pem.as_bytes()).unwrap();
        let url = format!("{}{path}", self.base_url());
        let auth = format!("Bearer {token}");
        let mut resp = match method {
            "GET" => agent.get(&url).header("Authorization", &auth).call(),
            "DELETE" => agent.delete(&url).header("Authorization", &auth).call(),
            "PUT" => agent
                .put(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or_default().to_string()),
            _ => agent
                .post(&url)
                .header("Authorization", &auth)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or(serde_json::json!({})).to_string()),
        }
        .unwrap();
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    }

    /// A one-time enrolment token.
    pub fn token(&self) -> String {
        let (status, body) = self.admin(
            "POST",
            "/admin/v1/enrolment-tokens",
            Some(serde_json::json!({})),
        );
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    /// Grants a lease (admin API JSON); returns its id.
    pub fn grant(&self, spec: serde_json::Value) -> u64 {
        let (status, body) = self.admin("POST", "/admin/v1/leases", Some(spec));
        assert_eq!(status, 201, "{body}");
        body["id"].as_u64().unwrap()
    }

    /// Revokes a device.
    pub fn revoke_device(&self, device: &str) {
        let (status, body) =
            self.admin("POST", &format!("/admin/v1/devices/{device}/revoke"), None);
        assert!(status == 200 || status == 204, "{status} {body}");
    }

    /// Records an objection (`status` "active") or its withdrawal ("inactive") for a
    /// source patient, as a FHIR Consent in the NDJSON source, and re-ingests.
    pub fn consent(&self, fhir_id: &str, status: &str, at: &str) {
        let consent = serde_json::json!({
            "resourceType": "Consent", "id": format!("{fhir_id}-objection-test"),
            "meta": { "versionId": if status == "active" { "1" } else { "2" }, "lastUpdated": at },
            "status": status,
            "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
            "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "INFA" }] }],
            "patient": { "reference": format!("Patient/{fhir_id}") },
            "dateTime": at,
            "provision": { "type": "deny" },
        });
        let path = self.ndjson_dir().join("Consent.ndjson");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .unwrap();
        writeln!(f, "{consent}").unwrap();
        drop(f);
        ingest_ndjson(&self.hub.state, &synthetic_rules(), &self.ndjson_dir()).unwrap();
    }

    /// Stops serving (also on drop).
    pub fn stop(&mut self) {
        self.server.stop();
    }
}

/// A stopped test hub's files, ready to serve again.
#[derive(Debug)]
pub struct Closed {
    /// Its files (`hub.redb`, `pki/`, `ndjson/`).
    pub dir: tempfile::TempDir,
    patients: Vec<SourcePatient>,
    limits: Limits,
    clock: Arc<AtomicU64>,
    port: u16,
}

impl Closed {
    /// Serves it again on its old port.
    pub fn reopen(self) -> TestHub {
        TestHub::open(self.dir, self.patients, &self.limits, self.clock, self.port)
    }
}

/// A record with its items in a fixed order and version 0: the hub assigns versions and
/// need not keep the source's item order, so tests compare records through this.
pub fn normalised(mut r: PatientRecord) -> PatientRecord {
    fn sort_by<T: Clone, const N: usize>(s: &mut Section<T, N>, key: impl Fn(&T) -> String) {
        if let Section::Entries(items) = s {
            let mut v = items.to_vec();
            v.sort_by_key(|i| key(i));
            *s = Section::from_items(v).unwrap();
        }
    }
    sort_by(&mut r.alerts, |a| a.source_id.as_str().to_owned());
    sort_by(&mut r.allergies, |a| a.source_id.as_str().to_owned());
    sort_by(&mut r.medications, |m| m.source_id.as_str().to_owned());
    sort_by(&mut r.contacts, |c| c.name.as_str().to_owned());
    r.version = RecordVersion(0);
    r
}

/// A real FHIR R4 server on loopback for tests: Medplum's FHIR engine and R4 validator
/// (`tools/fhir-server`, installed by `.ci/run` with `npm ci`), run by Node.js. Stops when
/// dropped.
#[derive(Debug)]
pub struct FhirServer {
    child: std::process::Child,
    /// `http://127.0.0.1:PORT/fhir`.
    pub base: String,
    agent: ureq::Agent,
}

impl FhirServer {
    /// Starts the server. Panics with the fix if Node.js or the packages are missing.
    pub fn start() -> Self {
        use std::io::BufRead;
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fhir-server");
        assert!(
            dir.join("node_modules/@medplum/fhir-router").exists(),
            "the test FHIR server is not installed: run `npm ci --prefix tools/fhir-server` (.ci/run does)"
        );
        let mut child = std::process::Command::new("node")
            .arg(dir.join("server.mjs"))
            .current_dir(&dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("Node.js is needed for the test FHIR server");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the FHIR server did not start: {line:?}"));
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Self {
            child,
            base: format!("http://127.0.0.1:{port}/fhir"),
            agent,
        }
    }

    /// PUTs a resource (create or update by id); returns the HTTP status.
    pub fn put(&self, resource: &serde_json::Value) -> u16 {
        let kind = resource["resourceType"].as_str().unwrap();
        let id = resource["id"].as_str().unwrap();
        self.agent
            .put(&format!("{}/{kind}/{id}", self.base))
            .header("Content-Type", "application/fhir+json")
            .send(resource.to_string())
            .unwrap()
            .status()
            .as_u16()
    }

    /// DELETEs a resource; returns the HTTP status.
    pub fn delete(&self, kind: &str, id: &str) -> u16 {
        self.agent
            .delete(&format!("{}/{kind}/{id}", self.base))
            .call()
            .unwrap()
            .status()
            .as_u16()
    }

    /// Loads every resource of `patients` through the REST API. Returns how many the
    /// server's validator refused (with their patients' FHIR ids).
    pub fn load(&self, patients: &[SourcePatient]) -> Vec<String> {
        let mut refused = Vec::new();
        for p in patients {
            for r in carecache_synth::fhir::resources(p) {
                match self.put(&r) {
                    200 | 201 => {}
                    400 => refused.push(p.fhir_id.clone()),
                    other => panic!("PUT {}: HTTP {other}", r["resourceType"]),
                }
            }
        }
        refused
    }
}

impl Drop for FhirServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
