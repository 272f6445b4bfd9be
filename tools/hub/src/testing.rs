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
use std::path::{Path, PathBuf};
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

/// The environment variable that runs the hub's tests on PostgreSQL: a connection URL
/// of a throwaway cluster (`scripts/pg-cluster`). Unset, they run on redb.
pub const POSTGRES_ENV: &str = "CARECACHE_TEST_POSTGRES";

/// The PostgreSQL schema of the hub whose data directory is `dir` (one per directory:
/// reopening the directory reopens the same state).
pub fn schema_for(dir: &Path) -> String {
    use sha2::Digest;
    let path = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let h = sha2::Sha256::digest(path.to_string_lossy().as_bytes());
    format!("t_{}", hex::encode(&h[..10]))
}

/// The hub state of the data directory `dir`, on the engine the tests run on: redb
/// (`dir/hub.redb`), or PostgreSQL when [`POSTGRES_ENV`] names a cluster.
pub fn open_state(dir: &Path) -> HubState {
    match std::env::var(POSTGRES_ENV) {
        Ok(url) => HubState::open_postgres(
            &crate::state::PgOptions {
                url,
                schema: schema_for(dir),
                pool_size: 4,
                ca_file: None,
            },
            dir,
        )
        .unwrap(),
        Err(_) => HubState::open(&dir.join("hub.redb")).unwrap(),
    }
}

/// [`open_state`], or the PostgreSQL schema `store` names.
fn open_state_in(dir: &Path, store: Option<&crate::state::PgOptions>) -> HubState {
    match store {
        Some(opts) => HubState::open_postgres(opts, dir).unwrap(),
        None => open_state(dir),
    }
}

/// The `[store]` table of a `hub.toml` whose data directory is `data`, on the engine
/// the tests run on (empty for redb, the default).
pub fn store_toml(data: &Path) -> String {
    match std::env::var(POSTGRES_ENV) {
        Ok(url) => postgres_toml(&url, &schema_for(data)),
        Err(_) => String::new(),
    }
}

/// A `[store]` table for the PostgreSQL schema `schema` at `url`.
pub fn postgres_toml(url: &str, schema: &str) -> String {
    format!(
        "[store]\nkind = \"postgres\"\nurl = {}\nschema = \"{schema}\"\npool_size = 4\n",
        toml::Value::String(url.to_owned()),
    )
}

/// Writes `dir/hub.toml` for the `carecache-hub` command: its data in `data`, the
/// development PKI of `dir/pki`, the NDJSON export `source`, the store the tests run on,
/// then `extra` (more TOML tables). Returns its path.
pub fn write_hub_toml(dir: &Path, data: &Path, source: &Path, extra: &str) -> PathBuf {
    write_hub_toml_on(dir, data, source, &store_toml(data), extra)
}

/// [`write_hub_toml`] with the `[store]` table `store` (empty: redb).
pub fn write_hub_toml_on(
    dir: &Path,
    data: &Path,
    source: &Path,
    store: &str,
    extra: &str,
) -> PathBuf {
    let pki = dir.join("pki");
    let s = |p: PathBuf| toml::Value::String(p.display().to_string()).to_string();
    let text = format!(
        "data_dir = {}\n{extra}\n[tls]\nca_cert = {}\nca_key = {}\ncert = {}\nkey = {}\n[source]\nkind = \"ndjson\"\npath = {}\n{}",
        s(data.to_path_buf()),
        s(pki.join("ca.pem")),
        s(pki.join("ca.key")),
        s(pki.join("hub.pem")),
        s(pki.join("hub.key")),
        s(source.to_path_buf()),
        store,
    );
    let path = dir.join("hub.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes the synthetic record's local-code map to `dir/local-codes.csv` (what a region
/// running on the synthetic data configures) and returns the `[sharing]` table naming it.
pub fn sharing_toml(dir: &Path) -> String {
    let path = dir.join("local-codes.csv");
    std::fs::write(&path, carecache_synth::local_code_map()).unwrap();
    format!(
        "[sharing]\nlocal_code_map = {}",
        toml::Value::String(path.display().to_string())
    )
}

/// Copies the development PKI of `from/pki` to `to/pki` (another hub instance's files).
pub fn copy_pki(from: &Path, to: &Path) {
    let pki = to.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    for f in ["ca.pem", "ca.key", "hub.pem", "hub.key"] {
        std::fs::copy(from.join("pki").join(f), pki.join(f)).unwrap();
    }
}

/// An answer's status and its whole body as text (up to 1 GiB; empty if it is not text).
fn status_and_text(mut resp: ureq::http::Response<ureq::Body>) -> (u16, String) {
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_string()
        .unwrap_or_default();
    (status, text)
}

/// A throwaway PostgreSQL cluster (Debian's `postgresql` package: `initdb` and `pg_ctl`)
/// on 127.0.0.1, stopped and removed when dropped. As root, the server runs as the
/// `postgres` user (it refuses root).
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The port it listens on.
    pub port: u16,
    run_as: Option<String>,
    fsync: bool,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl PgCluster {
    /// Whether Debian's PostgreSQL server is installed here.
    pub fn installed() -> bool {
        Self::bin().is_some()
    }

    fn bin() -> Option<PathBuf> {
        std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
    }

    /// `initdb` a cluster in a temporary directory and start it on a free port, without
    /// fsync (tests: a crash of the machine is not what they test).
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// [`Self::start`] with fsync on, as a region runs it (benchmarks).
    pub fn start_durable() -> Self {
        Self::start_with(true)
    }

    /// [`Self::start`], then TLS on with the server certificate and key (PEM) given:
    /// clients may then ask for `sslmode=require`.
    pub fn start_tls(cert_pem: &Path, key_pem: &Path) -> Self {
        let cluster = Self::start();
        cluster.stop();
        let cert = cluster.dir.path().join("server.crt");
        let key = cluster.dir.path().join("server.key");
        std::fs::copy(cert_pem, &cert).unwrap();
        std::fs::copy(key_pem, &key).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        if cluster.run_as.is_some() {
            let ok = std::process::Command::new("chown")
                .arg("postgres:postgres")
                .arg(&cert)
                .arg(&key)
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let conf = cluster.dir.path().join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!(
            "\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            cert.display(),
            key.display()
        ));
        std::fs::write(&conf, text).unwrap();
        cluster.start_again();
        cluster
    }

    fn start_with(fsync: bool) -> Self {
        let bin = Self::bin().expect(
            "PostgreSQL server not installed (no /usr/lib/postgresql/*/bin/initdb): \
             apt-get install postgresql",
        );
        let dir = tempfile::Builder::new()
            .prefix("carecache-pg-")
            .tempdir()
            .unwrap();
        let root = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/proc/self")
                .map(|m| m.uid())
                .unwrap_or(1)
                == 0
        };
        let run_as = root.then(|| "postgres".to_owned());
        if root {
            let out = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(out.success(), "chown of the cluster directory");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = Self {
            dir,
            bin,
            port,
            run_as,
            fsync,
        };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        cluster.start_again();
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn command(&self, tool: &str) -> std::process::Command {
        let exe = self.bin.join(tool);
        match &self.run_as {
            Some(user) => {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => std::process::Command::new(&exe),
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Start the server (again, after [`Self::stop`]); returns once it accepts
    /// connections.
    pub fn start_again(&self) {
        let data = self.data();
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync={} -c max_connections=200",
            self.port,
            self.dir.path().display(),
            if self.fsync { "on" } else { "off" },
        );
        let log = self.dir.path().join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-o", &opts, "-l", &log, "-w", "-t", "60", "start",
            ],
        );
    }

    /// Stop the server at once (`immediate`: as if it crashed).
    pub fn stop(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    /// A connection URL to its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Already stopped by the test, or stopped now: either way nothing is left.
        let _ = self
            .command("pg_ctl")
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// The admin token of test hubs.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// The privacy officer's token of every test hub.
pub const PRIVACY_TOKEN: &str = "test-privacy-officer-token-0123456789";
/// A schema `schema` as the first PostgreSQL hub (schema version 1) made it, empty, on
/// the cluster at `url`: what a database of an earlier release looks like to a newer hub.
pub fn postgres_schema_v1(url: &str, schema: &str) {
    let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let v1 = crate::store::postgres::MIGRATIONS[0];
    client
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; SET search_path TO {schema}; {v1}
             CREATE TABLE schema_version (version int NOT NULL);
             INSERT INTO schema_version VALUES (1);"
        ))
        .unwrap();
}

/// The test hub's metrics (scraper's) token.
pub const METRICS_TOKEN: &str = "test-metrics-scraper-token-0123456789";
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
    /// The PostgreSQL schema it was started on by [`TestHub::start_on`], if any.
    store: Option<crate::state::PgOptions>,
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
        Self::start_in(n, seed, limits, None)
    }

    /// A hub over `n` synthetic patients (`seed`) whose state is in the PostgreSQL
    /// schema `store` names, whatever the tests otherwise run on.
    pub fn start_on(n: usize, seed: u64, store: &crate::state::PgOptions) -> Self {
        Self::start_in(n, seed, &Limits::default(), Some(store.clone()))
    }

    /// Another instance of this hub: its own process state and port, the same database
    /// (the PostgreSQL schema of [`Self::start_on`]) and development CA, the same clock.
    /// A device may use either.
    pub fn another_instance(&self) -> Self {
        let store = self
            .store
            .clone()
            .expect("another instance needs a hub started on PostgreSQL");
        let dir = tempfile::tempdir().unwrap();
        copy_pki(self.dir.path(), dir.path());
        Self::open(
            dir,
            self.patients.clone(),
            &self.limits,
            self.clock.clone(),
            0,
            Some(store),
        )
    }

    fn start_in(
        n: usize,
        seed: u64,
        limits: &Limits,
        store: Option<crate::state::PgOptions>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let patients = Generator::new(seed).source_patients(n);
        let ndjson = dir.path().join("ndjson");
        carecache_synth::fhir::write_ndjson(&patients, &ndjson).unwrap();
        dev_ca(
            &dir.path().join("pki"),
            &["localhost".into(), "127.0.0.1".into()],
        )
        .unwrap();
        let state = open_state_in(dir.path(), store.as_ref());
        ingest_ndjson(&state, &synthetic_rules(), &ndjson).unwrap();
        drop(state);
        Self::open(
            dir,
            patients,
            limits,
            Arc::new(AtomicU64::new(T0)),
            0,
            store,
        )
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
        let state = open_state(dir.path());
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
            None,
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
        store: Option<crate::state::PgOptions>,
    ) -> Self {
        let pki = dir.path().join("pki");
        let (ca_file, ca_key) = (pki.join("ca.pem"), pki.join("ca.key"));
        let state = open_state_in(dir.path(), store.as_ref());
        let ca = DeviceCa::load(&ca_file, &ca_key, 30).unwrap();
        let ca_pem = std::fs::read_to_string(&ca_file).unwrap();
        let c2 = clock.clone();
        let hub = Arc::new(
            Hub::new(state, ca, ADMIN_TOKEN, limits)
                .with_privacy_officer_token(PRIVACY_TOKEN)
                .with_metrics_token(METRICS_TOKEN)
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
            store,
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
            store,
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
            store,
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

    /// A privacy officer's audit view: GET `path` with `token` and, if given, the
    /// officer's name header. Status and body text.
    pub fn officer_get(&self, path: &str, token: &str, officer: Option<&str>) -> (u16, String) {
        let agent = agent_trusting(self.ca_pem.as_bytes()).unwrap();
        let mut req = agent
            .get(format!("{}{path}", self.base_url()))
            .header("Authorization", format!("Bearer {token}"));
        if let Some(name) = officer {
            req = req.header(crate::server::OFFICER_HEADER, name);
        }
        status_and_text(req.call().unwrap())
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
    store: Option<crate::state::PgOptions>,
}

impl Closed {
    /// Serves it again on its old port.
    pub fn reopen(self) -> TestHub {
        TestHub::open(
            self.dir,
            self.patients,
            &self.limits,
            self.clock,
            self.port,
            self.store,
        )
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

    /// GETs `path` (after the base): status and JSON body.
    pub fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let resp = self.agent.get(&format!("{}/{path}", self.base)).call();
        let (status, text) = status_and_text(resp.unwrap());
        (status, serde_json::from_str(&text).unwrap_or_default())
    }

    /// How many resources of `kind` the server holds.
    pub fn count(&self, kind: &str) -> u64 {
        let (status, body) = self.get(&format!("{kind}?_summary=count"));
        assert_eq!(status, 200, "{body}");
        body["total"].as_u64().unwrap()
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
