//! The hub serving a full pull of 10,000 and 100,000 patients to one client over
//! loopback mutual TLS: patients/s, MB/s on the wire, hub peak RSS. The hub runs as its
//! own process (the release binary), so its RSS is its own.
//!
//! Baselines from the same run: the same records as FHIR NDJSON (bytes, and the time to
//! parse them with serde_json — what a device would spend without the sync protocol).
//!
//! `cargo bench -p carecache-hub --bench pull` (`HUB_BENCH_SIZES=10000` to pick sizes).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::indexing_slicing,
    reason = "benchmark driver"
)]

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sync_protocol::message::{EnrolRequest, Message, MessageKind, Pull};
use sync_protocol::types::{Bytes, EnrolmentToken, Text};
use sync_protocol::{Compression, decode_with_limit, encode};

const TOKEN: &str = "bench-admin-token-0123456789";
const CT: &str = "application/vnd.carecache.sync";

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
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

fn post(agent: &ureq::Agent, url: &str, msg: &Message) -> (Message, usize) {
    let body = encode(msg, Compression::Zstd).unwrap();
    let mut resp = agent
        .post(url)
        .header("Content-Type", CT)
        .send(&body[..])
        .unwrap();
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(17 * 1024 * 1024)
        .read_to_vec()
        .unwrap();
    (
        decode_with_limit(&bytes, MessageKind::Batch.max_payload()).unwrap(),
        bytes.len(),
    )
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn run(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let patients = carecache_synth::Generator::new(42).source_patients(n);
    let nd = dir.path().join("ndjson");
    carecache_synth::fhir::write_ndjson(&patients, &nd).unwrap();
    let mut ndjson_bytes = 0u64;
    let mut texts = Vec::new();
    for e in std::fs::read_dir(&nd).unwrap() {
        let p = e.unwrap().path();
        ndjson_bytes += std::fs::metadata(&p).unwrap().len();
        texts.push(std::fs::read_to_string(&p).unwrap());
    }
    // Baseline: parse the FHIR NDJSON with serde_json.
    let t = Instant::now();
    let mut parsed = 0usize;
    for text in &texts {
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            parsed += usize::from(v.is_object());
        }
    }
    let parse_secs = t.elapsed().as_secs_f64();
    drop(texts);

    let files = carecache_hub::pki::dev_ca(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n[tls]\nca_cert = \"{}\"\nca_key = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[source]\nkind = \"ndjson\"\npath = \"{}\"\n[limits]\nrequests_per_second = 1000\nburst = 1000\n",
        dir.path().join("data").display(),
        files.ca_cert.display(),
        files.ca_key.display(),
        files.hub_cert.display(),
        files.hub_key.display(),
        nd.display()
    );
    let config_path = dir.path().join("hub.toml");
    std::fs::File::create(&config_path)
        .unwrap()
        .write_all(config.as_bytes())
        .unwrap();
    let t = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_carecache-hub"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .env("CARECACHE_HUB_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let hub = HubProcess(child);
    let ca_pem = std::fs::read_to_string(&files.ca_cert).unwrap();
    let anon = agent(&ca_pem, None);
    let base = format!("https://localhost:{port}");
    let auth = format!("Bearer {TOKEN}");
    loop {
        if let Ok(r) = anon
            .get(format!("{base}/admin/v1/status"))
            .header("Authorization", &auth)
            .call()
            && r.status() == 200
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(900), "hub did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let startup = t.elapsed().as_secs_f64();
    let mut r = anon
        .post(format!("{base}/admin/v1/enrolment-tokens"))
        .header("Authorization", &auth)
        .header("Content-Type", "application/json")
        .send("{}")
        .unwrap();
    let token: serde_json::Value =
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    let (key_pem, csr) = carecache_hub::pki::make_csr("bench").unwrap();
    let (msg, _) = post(
        &anon,
        &format!("{base}/ccsp/v1/enrol"),
        &Message::EnrolRequest(EnrolRequest {
            token: EnrolmentToken::new(token["token"].as_str().unwrap()).unwrap(),
            csr_der: Bytes::try_from(csr).unwrap(),
            device_label: Text::new("bench").unwrap(),
        }),
    );
    let Message::EnrolResponse(e) = msg else {
        panic!("{msg:?}")
    };
    let all: Vec<String> = patients.iter().map(|p| p.nhs_number().digits()).collect();
    let lease = serde_json::json!({
        "label": "bench", "target": { "device": e.device_id.as_str() }, "view": "clinical",
        "not_before": "2026-01-01T00:00:00Z", "not_after": "2027-01-01T00:00:00Z",
        "max_offline_secs": 86400, "patients": all,
    });
    let r = anon
        .post(format!("{base}/admin/v1/leases"))
        .header("Authorization", &auth)
        .header("Content-Type", "application/json")
        .send(lease.to_string())
        .unwrap();
    assert_eq!(r.status(), 201);
    let device = agent(&ca_pem, Some((e.certificate_der.as_slice(), &key_pem)));

    let t = Instant::now();
    let (mut cursor, mut wire, mut upserts, mut batches) = (None, 0usize, 0usize, 0usize);
    loop {
        let (msg, len) = post(
            &device,
            &format!("{base}/ccsp/v1/pull"),
            &Message::Pull(Pull::new(cursor.clone(), 16 * 1024 * 1024)),
        );
        let Message::Batch(b) = msg else {
            panic!("{msg:?}")
        };
        wire += len;
        upserts += b.upserts.len();
        batches += 1;
        cursor = Some(b.next_cursor.clone());
        if !b.more {
            break;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let rss = vm_hwm_kib(hub.0.id());
    let mb = wire as f64 / 1e6;
    println!("\n== full pull, {n} patients ({upserts} shareable records, {batches} batches)");
    println!("hub start incl. NDJSON ingest: {startup:.1} s");
    println!(
        "pull: {secs:.2} s = {:.0} patients/s, {:.1} MB/s on the wire ({mb:.1} MB, {:.0} B/patient)",
        upserts as f64 / secs,
        mb / secs,
        wire as f64 / upserts as f64
    );
    println!(
        "baseline FHIR NDJSON: {:.1} MB ({:.0} B/patient); serde_json parse {:.2} s = {:.0} patients/s ({parsed} resources)",
        ndjson_bytes as f64 / 1e6,
        ndjson_bytes as f64 / n as f64,
        parse_secs,
        n as f64 / parse_secs
    );
    println!(
        "ratios: wire/NDJSON bytes {:.3}; pull rate / JSON parse rate {:.2}",
        wire as f64 / ndjson_bytes as f64,
        (upserts as f64 / secs) / (n as f64 / parse_secs)
    );
    println!(
        "hub peak RSS: {:.1} MiB ({:.2} x the NDJSON size)",
        rss as f64 / 1024.0,
        rss as f64 * 1024.0 / ndjson_bytes as f64
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` runs benches with --test: nothing to check quickly
    }
    let sizes = std::env::var("HUB_BENCH_SIZES").unwrap_or_else(|_| "10000,100000".into());
    for n in sizes.split(',').filter_map(|s| s.trim().parse().ok()) {
        run(n);
    }
}
