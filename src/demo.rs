//! `carecache demo`: the whole system on one machine in one command — a development CA,
//! synthetic patients (test-range NHS numbers, no real person), the reference hub and
//! this daemon on loopback TLS, a caseload lease for a demo user, a first sync, a client
//! token — then the viewer URL and three `curl` commands. Everything lives in a
//! temporary directory that is removed when the demo stops (Ctrl-C).
//!
//! Built only with the `demo` feature (on by default); a production build can leave the
//! hub and the synthetic data out with `--no-default-features`.

#![allow(
    clippy::print_stdout,
    reason = "the demo's output is its banner and instructions"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use carecache_hub::config::Limits;
use carecache_hub::pki::{DeviceCa, agent_trusting, dev_ca};
use carecache_hub::server::{Background, Hub, system_clock, tls_from_files};
use carecache_hub::sharing::SharingRules;
use carecache_hub::source::ingest_ndjson;
use carecache_hub::state::HubState;
use carecache_synth::{Generator, SourcePatient};
use sync_protocol::NhsNumber;

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::device::Device;
use crate::keysource::{SourceKind, create_key_file};
use crate::store::Store;

/// The staff id the demo's caseload is leased to.
pub const DEMO_USER: &str = "demo.crew";
/// A second crew member, holding a few patients the demo user may only see by
/// emergency access.
pub const OTHER_USER: &str = "other.crew";
/// Patients leased to [`OTHER_USER`] rather than the demo user.
const OTHER_PATIENTS: usize = 10;

/// What `carecache demo` is asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Synthetic patients to generate.
    pub patients: usize,
    /// Seed of the synthetic data (the same seed gives the same people).
    pub seed: u64,
    /// Local API port on 127.0.0.1 (0: any free port).
    pub port: u16,
    /// Stop as soon as everything is ready (for scripts and CI).
    pub exit_after_ready: bool,
}

/// Everything the demo sets up before it serves: the temporary directory, the hub
/// serving on loopback TLS, the enrolled and synced device, a client token.
pub struct Prepared {
    /// The demo's directory (removed on drop).
    pub tmp: tempfile::TempDir,
    /// The hub's server.
    pub server: Background,
    /// The hub.
    pub hub: Arc<Hub>,
    /// The device, enrolled, leased and synced.
    pub device: Arc<Device>,
    /// A registered client's token (name `demo-viewer`).
    pub token: String,
    /// The source patients on the demo user's caseload, then the other crew's.
    pub patients: Vec<SourcePatient>,
    pub(crate) admin: Admin,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("dir", &self.tmp.path())
            .finish_non_exhaustive()
    }
}

/// Runs the demo until Ctrl-C (or, with `exit_after_ready`, until it is ready).
pub fn run(opts: &Options) -> anyhow::Result<()> {
    let stop = crate::daemon::stop_on_signals()?;
    let Prepared {
        tmp,
        mut server,
        hub,
        device,
        token,
        patients,
        admin,
    } = prepare(opts, &mut |line| println!("{line}"))?;
    let (mine, theirs) = patients.split_at(patients.len() - OTHER_PATIENTS);
    let examples = Examples::pick(mine, theirs);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let stopping = Arc::clone(&stop);
    let exit_after_ready = opts.exit_after_ready;
    let result = crate::daemon::run(device, clock, &stop, move |addr| {
        match addr {
            Some(addr) => print_ready(addr, &token, &examples),
            None => println!("the local API has no TCP listener"),
        }
        if exit_after_ready {
            stopping.store(true, Ordering::SeqCst);
        }
    });
    server.stop();
    drop(hub);
    let path = tmp.path().display().to_string();
    drop(admin);
    tmp.close()
        .with_context(|| format!("removing the demo directory {path}"))?;
    println!("demo stopped; {path} removed");
    result
}

/// Sets the demo up (hub, synthetic patients, device, leases, first sync, client token),
/// telling `say` how it goes. Also the fixture of the local-API fuzz target.
pub fn prepare(opts: &Options, say: &mut dyn FnMut(String)) -> anyhow::Result<Prepared> {
    if !(OTHER_PATIENTS + 10..=200_000).contains(&opts.patients) {
        bail!(
            "--patients must be {}..=200000 (got {})",
            OTHER_PATIENTS + 10,
            opts.patients
        );
    }
    // Before any work: the one thing a user most often has to change.
    if opts.port != 0 {
        std::net::TcpListener::bind(("127.0.0.1", opts.port)).map_err(|e| {
            anyhow::anyhow!(
                "port {} on 127.0.0.1 is not free ({e}); choose another with --port, or --port 0 for any free port",
                opts.port
            )
        })?;
    }
    let tmp = tempfile::Builder::new()
        .prefix("carecache-demo-")
        .tempdir()
        .context("making the demo's temporary directory")?;
    let dir = tmp.path();
    say(
        "carecache demo — synthetic data only (test-range NHS numbers 999…, no real person)".into(),
    );
    say(format!("  working in {}", dir.display()));

    // The hub: development CA, synthetic source, ingest, serve on loopback TLS.
    let started = std::time::Instant::now();
    let patients = Generator::new(opts.seed).source_patients(opts.patients);
    let ndjson = dir.join("hub/ndjson");
    carecache_synth::fhir::write_ndjson(&patients, &ndjson)
        .context("writing the synthetic FHIR NDJSON")?;
    let pki = dev_ca(
        &dir.join("hub/pki"),
        &["localhost".into(), "127.0.0.1".into()],
    )
    .context("making the development CA")?;
    let state = HubState::open(&dir.join("hub/hub.redb")).context("opening the hub database")?;
    // The synthetic GP system codes some alerts locally: the demo region publishes the
    // map from those codes to SNOMED CT, as a real one would (`[sharing] local_code_map`).
    let rules = SharingRules::default_rules()
        .map_err(anyhow::Error::msg)?
        .with_local_map(
            carecache_hub::sharing::LocalCodeMap::parse(&carecache_synth::local_code_map())
                .map_err(anyhow::Error::msg)?,
        );
    let ingested = ingest_ndjson(&state, &rules, &ndjson).context("ingesting the source")?;
    let admin_token = random_token()?;
    let ca = DeviceCa::load(&pki.ca_cert, &pki.ca_key, 30).context("loading the CA")?;
    let hub = Arc::new(Hub::new(state, ca, &admin_token, &Limits::default()));
    let tls =
        tls_from_files(&pki.ca_cert, &pki.hub_cert, &pki.hub_key).map_err(anyhow::Error::msg)?;
    let server = Background::start(
        Arc::clone(&hub),
        SocketAddr::from(([127, 0, 0, 1], 0)),
        tls,
        Duration::from_secs(10),
    )
    .context("starting the hub")?;
    let hub_url = format!("https://localhost:{}", server.addr().port());
    say(format!(
        "  hub: {} synthetic patients ingested ({} resources), serving {hub_url} (mutual TLS) [{:.1} s]",
        patients.len(),
        ingested.resources,
        started.elapsed().as_secs_f64()
    ));
    let admin = Admin::new(&hub_url, &pki.ca_cert, &admin_token)?;

    // The device: key file, encrypted store, enrolment, leases, first sync.
    let device = Arc::new(open_device(dir, &hub_url, &pki.ca_cert, opts.port)?);
    let enrol_token = admin.post("/admin/v1/enrolment-tokens", &serde_json::json!({}))?;
    let id = device
        .enrol(
            enrol_token
                .get("token")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default(),
        )
        .context("enrolling the device")?;
    let now = system_clock().as_millis();
    let at = |offset_secs: i64| {
        let ms = now.saturating_add_signed(offset_secs * 1000);
        sync_protocol::types::Timestamp::from_millis(ms).map(|t| t.rfc3339())
    };
    let split = patients.len() - OTHER_PATIENTS;
    let (mine, theirs) = patients.split_at(split);
    for (user, list, label) in [
        (DEMO_USER, mine, "Demo caseload"),
        (OTHER_USER, theirs, "Another crew's caseload"),
    ] {
        admin.post(
            "/admin/v1/leases",
            &serde_json::json!({
                "label": label,
                "target": { "device": id },
                "users": [user],
                "view": "clinical",
                "not_before": at(-3600)?,
                "not_after": at(12 * 3600)?,
                "max_offline_secs": 12 * 3600,
                "emergency_access": true,
                "patients": list.iter().map(|p| p.nhs_number().digits()).collect::<Vec<_>>(),
            }),
        )?;
    }
    say(format!(
        "  device {id} enrolled; leases: {} patients to {DEMO_USER}, {OTHER_PATIENTS} to {OTHER_USER} (12 h)",
        mine.len()
    ));
    let synced = crate::daemon::sync_with_progress(&crate::device::views::AdminView::of(&device))
        .context("the first sync")?;
    say(format!(
        "  synced {} records in {} batches, {:.1} MB [{:.1} s]",
        synced.upserts,
        synced.batches,
        synced.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    ));
    let token = device.add_client("demo-viewer")?.expose().to_owned();
    Ok(Prepared {
        tmp,
        server,
        hub,
        device,
        token,
        patients,
        admin,
    })
}

/// The device half: key file, empty encrypted store, config, opened with the real clock.
fn open_device(dir: &Path, hub_url: &str, ca: &Path, port: u16) -> anyhow::Result<Device> {
    let ddir = dir.join("device");
    std::fs::create_dir_all(&ddir)?;
    let key_path = ddir.join("root.key");
    let root = create_key_file(&key_path)?;
    let data = ddir.join("data");
    Store::create(&data, &root, SourceKind::KeyFile, None).context("creating the store")?;
    let config_path = ddir.join("carecache.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"# Written by `carecache demo`.
data_dir = "{data}"

[key]
source = "key_file"
path = "{key}"

[hub]
url = "{hub_url}"
ca_file = "{ca}"

[device]
label = "Demo ambulance"

[api]
listen = "127.0.0.1:{port}"

# The demo trusts the client software to name the member of staff; production
# configurations prove it with the region's OpenID Connect provider (mode = "oidc").
[identity]
mode = "asserted"
"#,
            data = data.display(),
            key = key_path.display(),
            ca = ca.display(),
        ),
    )?;
    let config = Config::load(&config_path)?;
    Device::open(config, &root, Arc::new(SystemClock::new())).context("opening the demo device")
}

/// Three patients worth looking at.
#[derive(Debug)]
struct Examples {
    /// On the demo caseload, with a high-risk alert and an allergy (any shareable
    /// patient in a dataset too small to have one).
    alerts: Option<NhsNumber>,
    /// Objected to sharing: the device holds only the objection.
    objected: Option<NhsNumber>,
    /// On the other crew's caseload: emergency access only.
    other: Option<NhsNumber>,
}

impl Examples {
    fn pick(mine: &[SourcePatient], theirs: &[SourcePatient]) -> Self {
        let alerts = mine
            .iter()
            .find(|p| p.worth_showing())
            .or_else(|| mine.iter().find(|p| p.shareable()))
            .map(SourcePatient::nhs_number);
        Self {
            alerts,
            objected: mine
                .iter()
                .find(|p| !p.shareable())
                .map(SourcePatient::nhs_number),
            other: theirs
                .iter()
                .find(|p| p.shareable())
                .map(SourcePatient::nhs_number),
        }
    }
}

fn print_ready(addr: SocketAddr, token: &str, ex: &Examples) {
    let base = format!("http://{addr}");
    let nhs = ex
        .alerts
        .map_or_else(|| "9990000018".to_owned(), |n| n.digits());
    let auth = format!(
        "-H 'Authorization: Bearer {token}' -H 'X-Carecache-User: {DEMO_USER}' -H 'X-Carecache-Purpose: TREAT'"
    );
    println!();
    println!("carecache demo is ready.");
    println!();
    println!("  Viewer:        {base}/");
    println!("  Client token:  {token}");
    println!("  Staff id:      {DEMO_USER}");
    println!();
    println!("  Try: {nhs} (alerts)");
    if let Some(n) = ex.objected {
        println!("       {} (objected to sharing: not shown)", n.digits());
    }
    if let Some(n) = ex.other {
        println!(
            "       {} (another crew's patient: emergency access only)",
            n.digits()
        );
    }
    println!();
    println!("  FHIR document (International Patient Summary shape):");
    println!("    curl -s {auth} '{base}/fhir/Patient/{nhs}/$summary'");
    println!("  JSON summary:");
    println!("    curl -s {auth} '{base}/v1/patients/{nhs}'");
    println!("  Device status:");
    println!("    curl -s {auth} '{base}/status'     # without the token: readiness only");
    println!();
    println!("Press Ctrl-C to stop; the hub, the daemon and all demo data go with it.");
}

/// 32 random bytes as hex.
fn random_token() -> anyhow::Result<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(hex::encode(b))
}

/// The hub's admin API, as its administrator would call it.
pub(crate) struct Admin {
    agent: ureq::Agent,
    base: String,
    auth: String,
}

impl Admin {
    fn new(base: &str, ca: &Path, token: &str) -> anyhow::Result<Self> {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        let agent = agent_trusting(&pem)?;
        Ok(Self {
            agent,
            base: base.to_owned(),
            auth: format!("Bearer {token}"),
        })
    }

    fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let mut resp = self
            .agent
            .post(&format!("{}{path}", self.base))
            .header("Authorization", &self.auth)
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .with_context(|| format!("calling the hub's {path}"))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        if !(200..300).contains(&status) {
            bail!("the hub's {path} answered {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}
