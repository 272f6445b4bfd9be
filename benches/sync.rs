//! Initial sync of 10,000 and 100,000 patients, and a 1 % delta sync, from a hub on
//! loopback mutual TLS into a real device (the release `carecache sync --stats` as its
//! own process, so its peak RSS is its own).
//!
//! Baseline from the same run: the hub-only serve rate — a client on the same machine
//! that pulls the same caseload over the same TLS and decodes every batch but stores
//! nothing. The device-side rate is compared with it (goal ≥ 0.5×).
//!
//! `cargo bench --bench sync` (`DEVICE_BENCH_SIZES=10000` to pick sizes;
//! `SYNC_BENCH_KEEP=1` keeps each device's directory for a profiler).
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

use std::process::Command;
use std::time::{Duration, Instant};

use carecache_hub::testing::TestHub;
use sync_protocol::message::{Hello, Message, MessageKind, Pull};
use sync_protocol::types::{Capabilities, Text, Timestamp};

struct Figures {
    secs: f64,
    bytes: u64,
    upserts: u64,
    rss_kib: u64,
}

fn device_sync(config: &std::path::Path) -> Figures {
    let out = Command::new(env!("CARGO_BIN_EXE_carecache"))
        .args(["sync", "--stats", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().find(|l| l.starts_with("stats:")).unwrap();
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap()
            .parse()
            .unwrap()
    };
    Figures {
        secs: field("elapsed_ms") as f64 / 1000.0,
        bytes: field("bytes"),
        upserts: field("upserts"),
        rss_kib: field("peak_rss_kib"),
    }
}

/// Pulls everything the hub has for a device, decoding but storing nothing.
fn hub_only(hub: &TestHub, budget: u32) -> (f64, u64, u64) {
    let (t, device) = common::enrolled_client(hub, &hub.token());
    grant_all(hub, &device);
    let started = Instant::now();
    let hello = Message::Hello(Hello {
        min_version: 1,
        max_version: 1,
        capabilities: Capabilities(1),
        device_time: Timestamp::from_millis(carecache_hub::testing::T0).unwrap(),
        software: Text::new("bench").unwrap(),
    });
    let mut bytes = t
        .exchange("/ccsp/v1/hello", &hello, MessageKind::Welcome)
        .unwrap()
        .wire_bytes as u64;
    let mut cursor = None;
    let mut upserts = 0u64;
    loop {
        let a = t
            .exchange(
                "/ccsp/v1/pull",
                &Message::Pull(Pull::new(cursor.clone(), budget)),
                MessageKind::Batch,
            )
            .unwrap();
        bytes += a.wire_bytes as u64;
        let Message::Batch(b) = a.message else {
            panic!("pull")
        };
        upserts += b.upserts.len() as u64;
        cursor = Some(b.next_cursor);
        if !b.more {
            break;
        }
    }
    (started.elapsed().as_secs_f64(), bytes, upserts)
}

fn grant_all(hub: &TestHub, device: &str) {
    let patients: Vec<String> = hub
        .patients
        .iter()
        .map(|p| p.nhs_number().digits())
        .collect();
    hub.grant(serde_json::json!({
        "label": "Regional alert register",
        "target": { "device": device },
        "view": "clinical",
        "not_before": "2026-01-01T00:00:00Z",
        "not_after": "2099-01-01T00:00:00Z",
        "max_offline_secs": 86400,
        "patients": patients,
    }));
}

/// Starts `carecache serve` on the synced device and times it to its first answered read
/// (a `/v1/patients/{nhs}` with its durable audit entry); then reads `reads` more and
/// takes the process's resident memory. Returns (first-answer ms, RSS KiB, process
/// start floor ms: `carecache --version` spawned and reaped, median of 7).
fn serve_startup(config: &std::path::Path, nhs: &str, reads: usize) -> (f64, u64, f64) {
    use std::io::{Read, Write};
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_carecache"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let cfg = config.to_str().unwrap();
    let token = cli(&["clients", "add", "bench", "--config", cfg])
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cct_"))
        .unwrap()
        .to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut text = std::fs::read_to_string(config).unwrap();
    text.push_str(&format!("\n[api]\nlisten = \"127.0.0.1:{port}\"\n"));
    std::fs::write(config, text).unwrap();
    let request = format!(
        "GET /v1/patients/{nhs} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nX-Carecache-User: bench\r\nX-Carecache-Purpose: TREAT\r\nConnection: close\r\n\r\n"
    );
    let read = || -> Option<u16> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.write_all(request.as_bytes()).ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).ok()?;
        std::str::from_utf8(buf.get(9..12)?).ok()?.parse().ok()
    };
    let mut floor: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            cli(&["--version"]);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    floor.sort_by(f64::total_cmp);
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_carecache"))
        .args(["serve", "--config", cfg])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = loop {
        match read() {
            Some(200) => break t.elapsed().as_secs_f64() * 1e3,
            Some(other) => panic!("first read answered {other}"),
            None if t.elapsed() > Duration::from_secs(60) => panic!("serve did not answer"),
            None => std::thread::sleep(Duration::from_micros(500)),
        }
    };
    for _ in 0..reads {
        assert_eq!(read(), Some(200));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let rss = kib("VmRSS:");
    println!(
        "serving RSS {:.1} MiB: anonymous {:.1} MiB, file-backed (the binary, libraries) {:.1} MiB",
        rss as f64 / 1024.0,
        kib("RssAnon:") as f64 / 1024.0,
        kib("RssFile:") as f64 / 1024.0
    );
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert!(child.wait().unwrap().success());
    (first, rss, floor[3])
}

/// Bytes SQLCipher takes for the records the device at `data` holds (each its
/// sync-protocol encoding, keyed by NHS number), loaded as the store benchmark loads it.
fn sqlcipher_bytes_of(
    data: &std::path::Path,
    root: &carecache::crypto::RootKey,
    path: &std::path::Path,
) -> u64 {
    let store = carecache::store::Store::open(data, root).unwrap();
    let mut rows: Vec<(i64, Vec<u8>)> = Vec::new();
    store
        .for_each_record_decoded(|r| {
            rows.push((
                r.nhs_number.as_u64() as i64,
                postcard::to_allocvec(r).unwrap(),
            ));
        })
        .unwrap();
    drop(store);
    let db = common::sqlcipher_load(path, rows);
    common::sqlcipher_bytes(db, path)
}

/// Changes the family name of every hundredth patient in the source and re-ingests.
fn touch_one_percent(hub: &TestHub) -> usize {
    let path = hub.dir.path().join("ndjson").join("Patient.ndjson");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::with_capacity(text.len() + 1024);
    let mut touched = 0;
    for (i, line) in text.lines().enumerate() {
        if i % 100 == 0 {
            let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
            let fam = v["name"][0]["family"].as_str().unwrap_or("X").to_owned();
            v["name"][0]["family"] = serde_json::Value::String(format!("{fam}-Moved"));
            v["meta"]["versionId"] = serde_json::Value::String("2".into());
            out.push_str(&v.to_string());
            touched += 1;
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    std::fs::write(&path, out).unwrap();
    let rules = carecache_hub::testing::synthetic_rules();
    carecache_hub::source::ingest_ndjson(&hub.hub.state, &rules, &hub.dir.path().join("ndjson"))
        .unwrap();
    touched
}

fn main() {
    let sizes: Vec<usize> = std::env::var("DEVICE_BENCH_SIZES")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let budget = 4 * 1024 * 1024;
    let mut rows = Vec::new();
    for n in sizes {
        eprintln!("preparing a hub with {n} patients …");
        let hub = TestHub::start(n, 42);
        // The system clock drives the device process; the hub follows it.
        hub.set_time(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64,
        );
        let (hub_secs, hub_bytes, hub_upserts) = hub_only(&hub, budget);
        let tmp = tempfile::tempdir().unwrap();
        if std::env::var_os("SYNC_BENCH_KEEP").is_some() {
            // For a profiler: the device's directory (config, key, data) stays behind.
            println!("device directory kept: {}", tmp.path().display());
        }
        let (root, config) = common::device_dir(
            tmp.path(),
            &hub,
            &format!("max_batch_bytes = {budget}\nread_timeout_secs = 600\n"),
        );
        let enrol = Command::new(env!("CARGO_BIN_EXE_carecache"))
            .args([
                "enrol",
                "--config",
                config.to_str().unwrap(),
                "--token",
                &hub.token(),
            ])
            .output()
            .unwrap();
        assert!(
            enrol.status.success(),
            "{}",
            String::from_utf8_lossy(&enrol.stderr)
        );
        let status = Command::new(env!("CARGO_BIN_EXE_carecache"))
            .args(["status", "--json", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        grant_all(&hub, s["device_id"].as_str().unwrap());
        let initial = device_sync(&config);
        assert_eq!(
            initial.upserts, hub_upserts,
            "device and baseline hold the same"
        );
        let data = tmp.path().join("data");
        let disk = carecache::store::disk_bytes(&data);
        let sqlcipher = sqlcipher_bytes_of(&data, &root, &tmp.path().join("sqlcipher.db"));
        let touched = touch_one_percent(&hub);
        let delta = device_sync(&config);
        let disk_after_delta = carecache::store::disk_bytes(&data);
        let hub_rate = hub_upserts as f64 / hub_secs;
        let dev_rate = initial.upserts as f64 / initial.secs;
        table::row(
            &format!("initial sync, {n} patients"),
            &format!("{:.2} s, {dev_rate:.0}/s", initial.secs),
            &format!("hub serve rate {hub_rate:.0}/s"),
            &format!("{:.2}×", dev_rate / hub_rate),
            "≥ 0.8×",
            Some(dev_rate / hub_rate >= 0.8),
        );
        table::row(
            &format!("1 % delta sync, {n} patients"),
            &format!(
                "{} records, {:.2} s, {:.1} KB",
                delta.upserts,
                delta.secs,
                delta.bytes as f64 / 1e3
            ),
            &format!("initial {:.1} MB", initial.bytes as f64 / 1e6),
            &format!("{:.3}× bytes", delta.bytes as f64 / initial.bytes as f64),
            "—",
            None,
        );
        table::row(
            &format!("device peak RSS during sync, {n} patients"),
            &format!("{:.1} MiB", initial.rss_kib as f64 / 1024.0),
            "—",
            "—",
            "≤ 40 MiB",
            Some(initial.rss_kib <= 40 * 1024),
        );
        let per = |bytes: u64| bytes as f64 / initial.upserts as f64;
        table::row(
            &format!("disk bytes per patient after sync, {n} patients"),
            &format!(
                "{:.0} B (after the 1 % delta {:.0} B)",
                per(disk),
                per(disk_after_delta)
            ),
            &format!("SQLCipher {:.0} B", per(sqlcipher)),
            &format!("{:.2}×", disk as f64 / sqlcipher as f64),
            "≤ 1× SQLCipher",
            Some(disk <= sqlcipher),
        );
        {
            let nhs = hub
                .patients
                .iter()
                .find(|p| p.shareable())
                .unwrap()
                .nhs_number()
                .digits();
            let (first_ms, rss_kib, floor_ms) = serve_startup(&config, &nhs, 1_000);
            println!(
                "serve with {n} patients: first answered read {first_ms:.1} ms after spawn (process start floor {floor_ms:.1} ms); RSS after 1,000 reads {:.1} MiB",
                rss_kib as f64 / 1024.0
            );
            table::row(
                &format!("startup to first answered read, {n} patients"),
                &format!("{first_ms:.1} ms"),
                &format!("process start floor {floor_ms:.1} ms"),
                &format!("{:.1}×", first_ms / floor_ms),
                "≤ 50 ms",
                Some(first_ms <= 50.0),
            );
            table::row(
                &format!("daemon RSS serving, {n} patients (after 1,000 reads)"),
                &format!("{:.1} MiB", rss_kib as f64 / 1024.0),
                "—",
                "—",
                "≤ 40 MiB",
                Some(rss_kib <= 40 * 1024),
            );
            rows.push(format!(
                "| {n} | {:.2} s | {:.0}/s | {:.2}× | {:.1} MiB | {} rec, {:.2} s | {:.0} B ({:.2}× SQLCipher) | {first_ms:.1} ms | {:.1} MiB |",
                initial.secs,
                dev_rate,
                dev_rate / hub_rate,
                initial.rss_kib as f64 / 1024.0,
                delta.upserts,
                delta.secs,
                per(disk),
                disk as f64 / sqlcipher as f64,
                rss_kib as f64 / 1024.0,
            ));
        }
        eprintln!(
            "{n}: hub-only {hub_secs:.2} s for {hub_bytes} B; touched {touched}; device {:.2} s",
            initial.secs
        );
        if std::env::var_os("SYNC_BENCH_KEEP").is_some() {
            let _ = tmp.keep();
        }
    }
    println!(
        "\nDevice sync from a loopback hub (mutual TLS; hub in process, device as its own process)\n"
    );
    println!(
        "| patients | initial sync | device rate | × hub serve rate (goal ≥ 0.8) | peak RSS syncing (≤ 40 MiB) | 1 % delta | disk/patient (≤ SQLCipher) | startup to first read (≤ 50 ms) | RSS serving (≤ 40 MiB) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}
