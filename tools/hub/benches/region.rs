//! A region's shift start: hundreds of tablets, each with its team's 2,000-patient
//! caseload, starting their first sync at the same moment against the hub — one instance
//! on redb, one on PostgreSQL, two on the same PostgreSQL database (a device's requests
//! alternate between them) — then all pushing audit at once.
//!
//! Figures: patients served per second (every device's whole caseload delivered), pull
//! latency (median and 99th percentile over every pull), audit entries stored per second
//! and push latency. Baseline from the same run: one instance (for two), redb (for
//! PostgreSQL). The hubs are the release binary as their own processes; the tablets are
//! threads of this process on the same 2 cores (they decode every batch), so the figures
//! are what one small machine does for hub, database and clients together.
//!
//! `cargo bench -p carecache-hub --bench region`; `REGION_BENCH_DEVICES` (default 500),
//! `REGION_BENCH_CASELOAD` (2000), `REGION_BENCH_AUDIT` (entries per device, 200),
//! `REGION_BENCH_SCENARIOS` (default `redb,postgres,postgres2`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::indexing_slicing,
    reason = "benchmark driver"
)]

#[path = "../../../benches/table/mod.rs"]
mod table;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use sync_protocol::audit::{
    Access, AuditAction, AuditEntry, AuditEvent, AuditOutcome, AuditRecord, Purpose,
};
use sync_protocol::message::{EnrolRequest, Message, MessageKind, Pull, PushAudit};
use sync_protocol::types::{BoundedVec, Bytes, EnrolmentToken, Hash32, StaffId, Text, Timestamp};
use sync_protocol::{Compression, decode_with_limit, encode};

const TOKEN: &str = "bench-admin-token-0123456789";
const CT: &str = "application/vnd.carecache.sync";
/// Tablets a team: they share a lease (and so the hub's shared batches).
const TEAM: usize = 10;
/// A pull's byte budget.
const BUDGET: u32 = 2 * 1024 * 1024;
/// Audit entries a push.
const PUSH: usize = 100;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

struct HubProcess(Child);
impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent(ca_pem: &str, identity: Option<(&[u8], &str)>) -> ureq::Agent {
    let ca = ureq::tls::Certificate::from_pem(ca_pem.as_bytes()).unwrap();
    let mut tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![ca])));
    if let Some((der, key)) = identity {
        let cert = ureq::tls::Certificate::from_der(der).to_owned();
        let key = ureq::tls::PrivateKey::from_pem(key.as_bytes()).unwrap();
        tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&[cert], key)));
    }
    ureq::Agent::config_builder()
        .tls_config(tls.build())
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(900)))
        .build()
        .into()
}

/// Requests the hub asked to be made again (busy, over a rate), as a device does after
/// the wait it names.
static RETRIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A protocol exchange: the answer, decoded.
fn post(agent: &ureq::Agent, url: &str, msg: &Message, answer: MessageKind) -> Message {
    let body = encode(msg, Compression::Zstd).unwrap();
    for _ in 0..100 {
        let mut resp = agent
            .post(url)
            .header("Content-Type", CT)
            .send(&body[..])
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(17 * 1024 * 1024)
            .read_to_vec()
            .unwrap();
        let kind = if status == 200 {
            answer
        } else {
            MessageKind::Error
        };
        let msg: Message = decode_with_limit(&bytes, kind.max_payload()).unwrap();
        if let Message::Error(e) = &msg
            && let Some(secs) = e.retry_after_secs
        {
            RETRIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::thread::sleep(Duration::from_secs(u64::from(secs)));
            continue;
        }
        return msg;
    }
    panic!("the hub stayed busy");
}

fn admin(
    agent: &ureq::Agent,
    base: &str,
    path: &str,
    body: &serde_json::Value,
) -> serde_json::Value {
    let mut r = agent
        .post(format!("{base}{path}"))
        .header("Authorization", format!("Bearer {TOKEN}"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .unwrap();
    assert_eq!(r.status(), 201, "{path}");
    serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap()
}

/// One hub instance (`carecache-hub serve`) on `config`, once it answers.
fn serve(config: &Path, base: &str, ca_pem: &str) -> HubProcess {
    let t = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_carecache-hub"))
        .args(["serve", "--config"])
        .arg(config)
        .env("CARECACHE_HUB_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let hub = HubProcess(child);
    let anon = agent(ca_pem, None);
    loop {
        if let Ok(r) = anon
            .get(format!("{base}/admin/v1/status"))
            .header("Authorization", format!("Bearer {TOKEN}"))
            .call()
            && r.status() == 200
        {
            return hub;
        }
        assert!(t.elapsed() < Duration::from_secs(1800), "hub did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An enrolled tablet: its agent and where its audit chain is.
struct Tablet {
    agent: ureq::Agent,
    chain: Mutex<(u64, Hash32)>,
}

fn enrol(anon: &ureq::Agent, base: &str, ca_pem: &str, token: &str) -> Tablet {
    let (key_pem, csr) = carecache_hub::pki::make_csr("bench").unwrap();
    let msg = post(
        anon,
        &format!("{base}/ccsp/v1/enrol"),
        &Message::EnrolRequest(EnrolRequest {
            token: EnrolmentToken::new(token).unwrap(),
            csr_der: Bytes::try_from(csr).unwrap(),
            device_label: Text::new("bench").unwrap(),
        }),
        MessageKind::EnrolResponse,
    );
    let Message::EnrolResponse(e) = msg else {
        panic!("{msg:?}")
    };
    Tablet {
        agent: agent(ca_pem, Some((e.certificate_der.as_slice(), &key_pem))),
        chain: Mutex::new((0, Hash32([0; 32]))),
    }
}

fn record(i: u64, patient: sync_protocol::NhsNumber) -> AuditRecord {
    let at = Timestamp::from_millis(now_ms()).unwrap();
    AuditRecord {
        at,
        wall: at,
        event: AuditEvent::Access(Access {
            request_id: i,
            client: Text::new("epcr").unwrap(),
            user: Some(StaffId::new("P1234").unwrap()),
            role: Some(Text::new("paramedic").unwrap()),
            purpose: Some(Purpose::Treat),
            action: AuditAction::ReadSummary,
            patient: Some(patient),
            listed: BoundedVec::default(),
            lease: None,
            view: None,
            shown: BoundedVec::default(),
            withheld: 0,
            outcome: AuditOutcome::Served,
        }),
    }
}

/// Milliseconds at the `q` quantile of `xs` (sorted here).
fn quantile(xs: &mut [f64], q: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() as f64 - 1.0) * q).round() as usize]
}

struct Outcome {
    retries: usize,
    patients_per_sec: f64,
    pull_p50: f64,
    pull_p99: f64,
    pulls: usize,
    wall: f64,
    audit_per_sec: f64,
    push_p99: f64,
}

/// Every tablet's first sync at once, then every tablet's audit at once; requests
/// alternate between `bases`.
fn shift_start(
    tablets: &[Tablet],
    bases: &[String],
    caseload: usize,
    audit: usize,
    patients: &[sync_protocol::NhsNumber],
) -> Outcome {
    RETRIES.store(0, std::sync::atomic::Ordering::Relaxed);
    let barrier = Arc::new(Barrier::new(tablets.len() + 1));
    let started = Instant::now();
    let results: Vec<(usize, Vec<f64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = tablets
            .iter()
            .enumerate()
            .map(|(k, t)| {
                let b = barrier.clone();
                s.spawn(move || {
                    b.wait();
                    let (mut cursor, mut records, mut lat, mut n) = (None, 0, Vec::new(), k);
                    loop {
                        let base = &bases[n % bases.len()];
                        n += 1;
                        let t0 = Instant::now();
                        let msg = post(
                            &t.agent,
                            &format!("{base}/ccsp/v1/pull"),
                            &Message::Pull(Pull::new(cursor.clone(), BUDGET)),
                            MessageKind::Batch,
                        );
                        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                        let Message::Batch(b) = msg else {
                            panic!("pull: {msg:?}")
                        };
                        records += b.upserts.len();
                        cursor = Some(b.next_cursor);
                        if !b.more {
                            return (records, lat);
                        }
                    }
                })
            })
            .collect();
        barrier.wait();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let records: usize = results.iter().map(|r| r.0).sum();
    // Every tablet its team's whole caseload: what sharing allows of it (objectors and
    // withheld patients are not sent), the same for every tablet of a team.
    for team in results.chunks(TEAM) {
        assert!(
            team.iter().all(|r| r.0 == team[0].0),
            "a team's tablets got different caseloads"
        );
        assert!(team[0].0 > caseload / 2, "a caseload mostly withheld");
    }
    let mut lat: Vec<f64> = results.into_iter().flat_map(|r| r.1).collect();
    let pulls = lat.len();
    let (pull_p50, pull_p99) = (quantile(&mut lat, 0.5), quantile(&mut lat, 0.99));

    // Audit: every tablet pushes `audit` entries in pushes of 100, at once.
    let barrier = Arc::new(Barrier::new(tablets.len() + 1));
    let started = Instant::now();
    let mut push_lat: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = tablets
            .iter()
            .enumerate()
            .map(|(k, t)| {
                let b = barrier.clone();
                s.spawn(move || {
                    b.wait();
                    let mut lat = Vec::new();
                    let mut chain = t.chain.lock().unwrap();
                    let mut sent = 0;
                    while sent < audit {
                        let (mut seq, start) = *chain;
                        let mut prev = start;
                        let entries: Vec<AuditEntry> = (0..PUSH.min(audit - sent))
                            .map(|_| {
                                seq += 1;
                                let patient = patients[(k + seq as usize) % patients.len()];
                                let e =
                                    AuditEntry::seal(&prev, seq, &record(seq, patient)).unwrap();
                                prev = e.hash;
                                e
                            })
                            .collect();
                        let n = entries.len();
                        let push =
                            PushAudit::new(start, BoundedVec::try_from(entries).unwrap()).unwrap();
                        let base = &bases[(k + sent / PUSH) % bases.len()];
                        let t0 = Instant::now();
                        let msg = post(
                            &t.agent,
                            &format!("{base}/ccsp/v1/audit"),
                            &Message::PushAudit(push),
                            MessageKind::AuditAck,
                        );
                        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                        let Message::AuditAck(a) = msg else {
                            panic!("audit: {msg:?}")
                        };
                        assert_eq!(a.durable_through, seq);
                        *chain = (seq, prev);
                        sent += n;
                    }
                    lat
                })
            })
            .collect();
        barrier.wait();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let audit_wall = started.elapsed().as_secs_f64();
    Outcome {
        retries: RETRIES.swap(0, std::sync::atomic::Ordering::Relaxed),
        patients_per_sec: records as f64 / wall,
        pull_p50,
        pull_p99,
        pulls,
        wall,
        audit_per_sec: (tablets.len() * audit) as f64 / audit_wall,
        push_p99: quantile(&mut push_lat, 0.99),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` runs benches with --test: nothing to check quickly
    }
    let devices = env("REGION_BENCH_DEVICES", 500);
    let caseload = env("REGION_BENCH_CASELOAD", 2000);
    let audit = env("REGION_BENCH_AUDIT", 200);
    let scenarios = std::env::var("REGION_BENCH_SCENARIOS")
        .unwrap_or_else(|_| "redb,postgres,postgres2".into());
    let teams = devices.div_ceil(TEAM);
    // Each patient in two teams' caseloads.
    let pool = (teams * caseload / 2).max(caseload);

    let dir = tempfile::tempdir().unwrap();
    let generated = carecache_synth::Generator::new(42).source_patients(pool);
    let nhs: Vec<_> = generated.iter().map(|p| p.nhs_number()).collect();
    let nd = dir.path().join("ndjson");
    carecache_synth::fhir::write_ndjson(&generated, &nd).unwrap();
    drop(generated);
    carecache_hub::pki::dev_ca(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let ca_pem = std::fs::read_to_string(dir.path().join("pki/ca.pem")).unwrap();
    let sharing = carecache_hub::testing::sharing_toml(dir.path());
    println!(
        "\n== region shift start: {devices} tablets in {teams} teams, {caseload}-patient caseloads from {pool} patients, {audit} audit entries each"
    );

    let mut results: Vec<(String, Outcome)> = Vec::new();
    let mut run_engine = |engine: &str, store: &str, instances: &[usize]| {
        let ports: Vec<u16> = (0..instances.iter().max().copied().unwrap_or(1))
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let configs: Vec<_> = ports
            .iter()
            .enumerate()
            .map(|(k, port)| {
                let d = dir.path().join(format!("{engine}-{k}"));
                std::fs::create_dir_all(&d).unwrap();
                carecache_hub::testing::copy_pki(dir.path(), &d);
                carecache_hub::testing::write_hub_toml_on(
                    &d,
                    &dir.path().join(format!("{engine}-data")),
                    &nd,
                    store,
                    &format!(
                        "listen = \"127.0.0.1:{port}\"\n{sharing}\n[limits]\nrequests_per_second = 100\nburst = 200\n"
                    ),
                )
            })
            .collect();
        let bases: Vec<String> = ports
            .iter()
            .map(|p| format!("https://localhost:{p}"))
            .collect();
        let t = Instant::now();
        let mut hubs = vec![serve(&configs[0], &bases[0], &ca_pem)];
        println!(
            "{engine}: first instance up (ingest of {pool} patients) in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        let anon = agent(&ca_pem, None);
        let t = Instant::now();
        let mut tablets = Vec::with_capacity(devices);
        for team in 0..teams {
            let start = team * caseload / 2;
            let patients: Vec<String> = (0..caseload)
                .map(|i| nhs[(start + i) % pool].digits())
                .collect();
            admin(
                &anon,
                &bases[0],
                "/admin/v1/leases",
                &serde_json::json!({
                    "label": format!("team {team}"), "target": { "team": format!("t{team}") },
                    "view": "clinical", "not_before": "2026-01-01T00:00:00Z",
                    "not_after": "2099-01-01T00:00:00Z", "max_offline_secs": 86400,
                    "patients": patients,
                }),
            );
            for _ in 0..TEAM.min(devices - team * TEAM) {
                let token = admin(
                    &anon,
                    &bases[0],
                    "/admin/v1/enrolment-tokens",
                    &serde_json::json!({ "team": format!("t{team}") }),
                );
                tablets.push(enrol(
                    &anon,
                    &bases[0],
                    &ca_pem,
                    token["token"].as_str().unwrap(),
                ));
            }
        }
        println!(
            "{engine}: {teams} leases granted, {devices} tablets enrolled in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        for &n in instances {
            while hubs.len() < n {
                let k = hubs.len();
                hubs.push(serve(&configs[k], &bases[k], &ca_pem));
            }
            let o = shift_start(&tablets, &bases[..n], caseload, audit, &nhs);
            println!(
                "{engine}, {n} instance(s): {:.1} s to serve every tablet ({} pulls): {:.0} patients/s, pull p50 {:.0} ms, p99 {:.0} ms; audit {:.0} entries/s, push p99 {:.0} ms; {} requests told to wait and retry",
                o.wall,
                o.pulls,
                o.patients_per_sec,
                o.pull_p50,
                o.pull_p99,
                o.audit_per_sec,
                o.push_p99,
                o.retries
            );
            results.push((
                format!("{engine}, {n} instance{}", if n == 1 { "" } else { "s" }),
                o,
            ));
        }
        drop(hubs);
    };

    let want = |s: &str| scenarios.split(',').any(|x| x.trim() == s);
    if want("redb") {
        run_engine("redb", "", &[1]);
    }
    let pg: Vec<usize> = [("postgres", 1), ("postgres2", 2)]
        .iter()
        .filter(|(s, _)| want(s))
        .map(|(_, n)| *n)
        .collect();
    let cluster;
    if !pg.is_empty() {
        assert!(
            carecache_hub::testing::PgCluster::installed(),
            "PostgreSQL is not installed here"
        );
        cluster = carecache_hub::testing::PgCluster::start_durable();
        let store = carecache_hub::testing::postgres_toml(&cluster.url(), "region");
        run_engine("postgres", &store, &pg);
        // What a stored audit entry costs the database: entries, the index by patient,
        // their indexes.
        let mut c = postgres::Client::connect(&cluster.url(), postgres::NoTls).unwrap();
        let row = c
            .query_one(
                "SELECT (SELECT count(*) FROM region.audit), \
                 (SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c \
                  JOIN pg_namespace n ON n.oid = c.relnamespace \
                  WHERE n.nspname = 'region' AND c.relkind = 'r' \
                  AND (c.relname LIKE 'audit\\_2%' OR c.relname LIKE 'audit\\_by\\_patient\\_2%'))",
                &[],
            )
            .unwrap();
        let (entries, bytes): (i64, i64) = (row.get(0), row.get(1));
        let per = bytes as f64 / entries as f64;
        println!(
            "postgres: {entries} audit entries stored in {:.1} MB: {per:.0} B an entry",
            bytes as f64 / 1e6
        );
        table::row(
            "audit stored in PostgreSQL, per entry (entry, index by patient, their indexes)",
            &format!("{per:.0} B"),
            &format!("{entries} entries"),
            "—",
            "—",
            None,
        );
    }

    let base = |name: &str| results.iter().find(|(n, _)| n == name).map(|(_, o)| o);
    for (name, o) in &results {
        let against = if name.starts_with("postgres, 2") {
            base("postgres, 1 instance").map(|b| ("PostgreSQL, 1 instance", b))
        } else if name.starts_with("postgres") {
            base("redb, 1 instance").map(|b| ("redb, 1 instance", b))
        } else {
            None
        };
        // This scenario's figure against its baseline's: (baseline, ratio).
        let versus = |of: fn(&Outcome) -> f64| match against {
            Some((what, b)) => (
                format!("{what}: {:.0}/s", of(b)),
                format!("{:.2}×", of(o) / of(b)),
            ),
            None => ("—".into(), "—".into()),
        };
        let (baseline, ratio) = versus(|o| o.patients_per_sec);
        table::row(
            &format!(
                "region shift start ({name}): {devices} tablets × {caseload} patients at once"
            ),
            &format!("{:.0} patients/s", o.patients_per_sec),
            &baseline,
            &ratio,
            "—",
            None,
        );
        table::row(
            &format!("region shift start ({name}): pull latency"),
            &format!("p99 {:.0} ms", o.pull_p99),
            &format!("p50 {:.0} ms", o.pull_p50),
            &format!("{:.1}×", o.pull_p99 / o.pull_p50),
            "—",
            None,
        );
        let (abase, aratio) = versus(|o| o.audit_per_sec);
        table::row(
            &format!("audit from {devices} tablets at once ({name})"),
            &format!(
                "{:.0} entries/s (push p99 {:.0} ms)",
                o.audit_per_sec, o.push_p99
            ),
            &abase,
            &aratio,
            "—",
            None,
        );
    }
}
