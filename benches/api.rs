//! Reads through the local API with their durable audit entries, at concurrency 1, 16
//! and 64, against baselines measured in the same run on the same disk:
//! - the fsync floor: a 4 KiB write + fdatasync loop;
//! - a redb single durable commit loop (one small row per commit);
//! - a minimal axum handler (no store, no audit) behind the same kind of listener.
//!
//! Goals (issue #23): p50 at concurrency 1 ≤ 1.3 × the redb commit p50; p99 ≤ 2 ms on
//! every route (the JSON read, `$summary` and the viewer's page); at concurrency 16
//! ≥ 12,000 reads/s and ≥ 0.2 × the minimal axum handler.
//!
//! `cargo bench --bench api` (`API_BENCH_SECS=3` seconds per run, `API_BENCH_PATIENTS`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::cast_possible_truncation,
    clippy::indexing_slicing,
    reason = "benchmark driver"
)]

mod common;
mod table;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use carecache::api::{Api, Listener};
use carecache::clock::{Clock, SystemClock};
use carecache::config::Config;
use carecache::device::Device;
use carecache_hub::testing::TestHub;

struct Lat {
    p50: f64,
    p99: f64,
    rate: f64,
}

fn summarise(mut ms: Vec<f64>, secs: f64) -> Lat {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
    Lat {
        p50: at(0.5),
        p99: at(0.99),
        rate: ms.len() as f64 / secs,
    }
}

fn fsync_floor(dir: &std::path::Path, n: usize) -> Lat {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(dir.join("floor")).unwrap();
    let block = [7u8; 4096];
    let mut ms = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        f.write_all_at(&block, (i % 16) as u64 * 4096).unwrap();
        f.sync_data().unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    summarise(ms, t0.elapsed().as_secs_f64())
}

fn redb_commits(dir: &std::path::Path, n: usize) -> Lat {
    const T: redb::TableDefinition<'_, u64, &[u8]> = redb::TableDefinition::new("t");
    let db = redb::Database::create(dir.join("baseline.redb")).unwrap();
    let row = [9u8; 300];
    let mut ms = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let tx = db.begin_write().unwrap();
        tx.open_table(T)
            .unwrap()
            .insert(i as u64, &row[..])
            .unwrap();
        tx.commit().unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    summarise(ms, t0.elapsed().as_secs_f64())
}

/// Signs in to the browser viewer with the client token as staff `n1`; returns the
/// session cookie's value.
fn sign_in(addr: SocketAddr, token: &str) -> String {
    let body = format!("token={token}&user=n1");
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST /sign-in HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://{addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
        .lines()
        .find_map(|l| {
            l.get(..30)
                .filter(|h| h.eq_ignore_ascii_case("set-cookie: carecache_session="))
                .and_then(|_| l.get(30..))
        })
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("no session cookie: {answer}"))
        .to_owned()
}

/// `c` keep-alive clients sending `paths` round-robin for `secs`.
fn load(addr: SocketAddr, headers: &str, paths: &[String], c: usize, secs: f64) -> Lat {
    let stop = Arc::new(AtomicBool::new(false));
    let paths = Arc::new(paths.to_vec());
    let threads: Vec<_> = (0..c)
        .map(|t| {
            let stop = Arc::clone(&stop);
            let paths = Arc::clone(&paths);
            let headers = headers.to_owned();
            std::thread::spawn(move || {
                let s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let mut ms = Vec::new();
                let mut i = t * 7919;
                let mut line = String::new();
                let mut body = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let p = &paths[i % paths.len()];
                    i += 1;
                    let t0 = Instant::now();
                    // One write per request, as any buffered HTTP client does.
                    let req = format!("GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n");
                    w.write_all(req.as_bytes()).unwrap();
                    let mut len = 0usize;
                    let mut status = 0u16;
                    loop {
                        line.clear();
                        r.read_line(&mut line).unwrap();
                        if status == 0 {
                            status = line.split(' ').nth(1).unwrap().parse().unwrap();
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    body.resize(len, 0);
                    r.read_exact(&mut body).unwrap();
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
                    ms.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                ms
            })
        })
        .collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in threads {
        all.extend(t.join().unwrap());
    }
    summarise(all, t0.elapsed().as_secs_f64())
}

fn main() {
    let secs: f64 = std::env::var("API_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let n: usize = std::env::var("API_BENCH_PATIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let tmp =
        tempfile::tempdir_in(std::env::var("CARGO_TARGET_TMPDIR").unwrap_or_else(|_| ".".into()))
            .unwrap_or_else(|_| tempfile::tempdir().unwrap());
    eprintln!("baselines …");
    let floor = fsync_floor(tmp.path(), 2_000);
    let commit = redb_commits(tmp.path(), 2_000);

    eprintln!("preparing a hub with {n} patients and a synced device …");
    let hub = TestHub::start(n, 42);
    let clock = Arc::new(SystemClock::new());
    let now = clock.wall_ms();
    hub.set_time(now);
    let (root, config_path) = common::device_dir(
        tmp.path(),
        &hub,
        "[api]\nlisten = \"127.0.0.1:0\"\nmax_connections = 256\n",
    );
    let device = Device::open(Config::load(&config_path).unwrap(), &root, clock.clone()).unwrap();
    let id = device.enrol(&hub.token()).unwrap();
    let at = |ms: u64| {
        carecache::clock::rfc3339(sync_protocol::types::Timestamp::from_millis(ms).unwrap())
    };
    let patients: Vec<_> = hub
        .patients
        .iter()
        .filter(|p| p.shareable())
        .map(|p| p.nhs_number())
        .collect();
    hub.grant(serde_json::json!({
        "label": "bench", "target": { "device": id }, "view": "clinical",
        "not_before": at(now - 3_600_000), "not_after": at(now + 24 * 3_600_000),
        "max_offline_secs": 86_400,
        "patients": patients.iter().map(|p| p.digits()).collect::<Vec<_>>(),
    }));
    device.sync_once(&mut |_, _| {}).unwrap();
    let token = device.add_client("bench").unwrap().expose().to_owned();
    // Where a read's time goes: the audit commit alone, and the policy + read alone.
    let audit_only = {
        let mut ms = Vec::new();
        let t0 = Instant::now();
        for _ in 0..2_000 {
            let t = Instant::now();
            device
                .audit_blocking(sync_protocol::audit::AuditEvent::Key(
                    sync_protocol::audit::KeyEvent::Unlocked,
                ))
                .unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        summarise(ms, t0.elapsed().as_secs_f64())
    };
    let read_only = {
        let user = sync_protocol::types::StaffId::new("n1").unwrap();
        let mut ms = Vec::new();
        let t0 = Instant::now();
        for i in 0..20_000 {
            let t = Instant::now();
            let g = device
                .policy()
                .decide(
                    device.store(),
                    device.now(),
                    &user,
                    &carecache::policy::Purpose::Treat,
                    &patients[i % patients.len()],
                )
                .unwrap()
                .unwrap();
            std::hint::black_box(carecache::policy::open(device.store(), g).unwrap());
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        summarise(ms, t0.elapsed().as_secs_f64())
    };
    let device = Arc::new(device);
    let api = Api::new(&device);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (addr, minimal) = rt.block_on(async {
        let l = carecache::api::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(carecache::api::serve(
            api,
            vec![Listener::Tcp(l)],
            std::future::pending(),
        ));
        let m = carecache::api::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let maddr = m.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(async move { axum::serve(m, app).await.unwrap() });
        (addr, maddr)
    });
    let headers = format!(
        "Authorization: Bearer {token}\r\nX-Carecache-User: n1\r\nX-Carecache-Purpose: TREAT\r\n"
    );
    let json_paths: Vec<String> = patients
        .iter()
        .map(|p| format!("/v1/patients/{}", p.digits()))
        .collect();
    let summary_paths: Vec<String> = patients
        .iter()
        .map(|p| format!("/fhir/Patient/{}/$summary", p.digits()))
        .collect();
    let viewer_paths: Vec<String> = patients
        .iter()
        .map(|p| format!("/patient/{}", p.digits()))
        .collect();
    let viewer_headers = format!("Cookie: carecache_session={}\r\n", sign_in(addr, &token));
    let minimal_paths = vec!["/".to_owned()];

    let mut rows = Vec::new();
    let mut reads16 = 0.0;
    let mut p50_1 = 0.0;
    let mut worst_p99_1 = 0.0f64;
    let (mut minimal_p50_1, mut minimal_p99_1, mut minimal16) = (0.0, 0.0, 0.0);
    for (name, addr, paths, headers) in [
        ("minimal axum handler", minimal, &minimal_paths, &headers),
        ("GET /v1/patients/{nhs}", addr, &json_paths, &headers),
        (
            "GET /fhir/Patient/{id}/$summary",
            addr,
            &summary_paths,
            &headers,
        ),
        (
            "GET /patient/{nhs} (viewer page)",
            addr,
            &viewer_paths,
            &viewer_headers,
        ),
    ] {
        for c in [1, 16, 64] {
            eprintln!("{name} at concurrency {c} …");
            let l = load(addr, headers, paths, c, secs);
            if name.starts_with("GET /v1") && c == 1 {
                p50_1 = l.p50;
            }
            if name.starts_with("GET") && c == 1 {
                worst_p99_1 = worst_p99_1.max(l.p99);
            }
            if name.starts_with("GET /v1") && c == 16 {
                reads16 = l.rate;
            }
            if name.starts_with("minimal") {
                match c {
                    1 => (minimal_p50_1, minimal_p99_1) = (l.p50, l.p99),
                    16 => minimal16 = l.rate,
                    _ => {}
                }
            }
            rows.push(format!(
                "| {name} | {c} | {:.3} ms | {:.3} ms | {:.0}/s |",
                l.p50, l.p99, l.rate
            ));
        }
    }
    // Server-side time per request (from the API's own latency histogram).
    let metrics = {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let server_mean = |route: &str| {
        let get = |suffix: &str| -> f64 {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with(&format!("carecache_request_duration_seconds_{suffix}"))
                        && l.contains(&format!("route=\"{route}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        get("sum") / get("count").max(1.0) * 1e3
    };
    let health = device.audit().health();
    let commits = health.commits.load(Ordering::Relaxed);
    let committed = health.committed.load(Ordering::Relaxed);
    println!();
    println!("Local API reads with durable audit ({n} patients, {secs} s per run, 2-core machine)");
    println!();
    println!("| baseline | p50 | p99 | rate |");
    println!("|---|---|---|---|");
    println!(
        "| fsync floor (4 KiB write + fdatasync) | {:.3} ms | {:.3} ms | {:.0}/s |",
        floor.p50, floor.p99, floor.rate
    );
    println!(
        "| redb single durable commit | {:.3} ms | {:.3} ms | {:.0}/s |",
        commit.p50, commit.p99, commit.rate
    );
    println!(
        "| audit entry alone (seal + durable commit, via the writer thread) | {:.3} ms | {:.3} ms | {:.0}/s |",
        audit_only.p50, audit_only.p99, audit_only.rate
    );
    println!(
        "| policy decision + record read alone (no audit, no HTTP) | {:.3} ms | {:.3} ms | {:.0}/s |",
        read_only.p50, read_only.p99, read_only.rate
    );
    println!();
    println!("| route | concurrency | p50 | p99 | reads/s |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!("{r}");
    }
    println!();
    println!(
        "server-side mean per request (all concurrencies): /v1/patients/{{nhs}} {:.3} ms, $summary {:.3} ms",
        server_mean("v1_patient"),
        server_mean("fhir_patient_summary")
    );
    println!(
        "audit: {committed} entries in {commits} commits ({:.1} entries per fsync)",
        committed as f64 / commits.max(1) as f64
    );
    let ratio = p50_1 / commit.p50;
    table::row(
        "read with durable audit, concurrency 1, p50",
        &format!("{p50_1:.3} ms"),
        &format!(
            "redb commit {:.3} ms (fsync floor {:.3} ms, minimal axum {minimal_p50_1:.3} ms)",
            commit.p50, floor.p50
        ),
        &format!("{ratio:.2}×"),
        "≤ 1.3× commit",
        Some(ratio <= 1.3),
    );
    table::row(
        "read with durable audit, concurrency 1, p99 (worst route)",
        &format!("{worst_p99_1:.3} ms"),
        &format!("minimal axum {minimal_p99_1:.3} ms"),
        &format!("{:.1}×", worst_p99_1 / minimal_p99_1),
        "≤ 2 ms",
        Some(worst_p99_1 <= 2.0),
    );
    table::row(
        "reads with durable audit, concurrency 16",
        &format!("{reads16:.0}/s"),
        &format!("minimal axum {minimal16:.0}/s"),
        &format!("{:.2}×", reads16 / minimal16),
        "≥ 12,000/s and ≥ 0.2× axum",
        Some(reads16 >= 12_000.0 && reads16 / minimal16 >= 0.2),
    );
    println!(
        "p50 at concurrency 1: {p50_1:.3} ms = {ratio:.2} × redb commit p50 (goal ≤ 1.3×): {}",
        if ratio <= 1.3 { "pass" } else { "short" }
    );
    println!(
        "p99 at concurrency 1 (worst route): {worst_p99_1:.3} ms (goal ≤ 2 ms): {}",
        if worst_p99_1 <= 2.0 { "pass" } else { "short" }
    );
    println!(
        "reads/s at concurrency 16: {reads16:.0}, {:.2}× minimal axum (goal ≥ 12,000 and ≥ 0.2×): {}",
        reads16 / minimal16,
        if reads16 >= 12_000.0 && reads16 / minimal16 >= 0.2 {
            "pass"
        } else {
            "short"
        }
    );
}
