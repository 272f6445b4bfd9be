//! The hub ingesting a region's FHIR Bulk Data NDJSON export: patients/s, peak RSS, and
//! the cost of reading the same export again (every record unchanged). The hub runs as its
//! own process (`carecache-hub ingest`, the release binary), so its RSS is its own.
//!
//! Baseline from the same run: parsing the same NDJSON with serde_json, line by line
//! (what any reader of the export spends before doing anything with it).
//!
//! Each size runs on both engines: redb, then PostgreSQL (a throwaway durable cluster of
//! Debian's `postgresql` on this machine, when installed; its server's memory is not the
//! hub's and is not counted).
//!
//! `cargo bench -p carecache-hub --bench ingest`; sizes with `HUB_INGEST_SIZES`
//! (default 100000; `HUB_INGEST_SIZES=100000,1000000` for the region-scale run, about
//! 13 GB of NDJSON written to the temporary directory), engines with `HUB_INGEST_ENGINES`
//! (default `redb,postgres`).
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

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Peak RSS goal for an ingest of any size (issue: flat memory).
const RSS_GOAL_MIB: f64 = 256.0;

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Run `carecache-hub ingest` to the end: (seconds, peak RSS in KiB, summary).
fn ingest(config: &std::path::Path) -> (f64, u64, serde_json::Value) {
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_carecache-hub"))
        .args(["ingest", "--config"])
        .arg(config)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut out).unwrap();
        out
    });
    let mut peak = 0;
    loop {
        // VmHWM is the process's own high-water mark: sampling misses only a peak in
        // its last few milliseconds.
        if let Some(k) = vm_hwm_kib(pid) {
            peak = peak.max(k);
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = t.elapsed().as_secs_f64();
    assert!(child.wait().unwrap().success(), "ingest failed");
    let summary: serde_json::Value = serde_json::from_slice(&reader.join().unwrap()).unwrap();
    (secs, peak, summary)
}

fn run(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let nd = dir.path().join("ndjson");
    let t = Instant::now();
    let mut generator = carecache_synth::Generator::new(42);
    let mut writer = carecache_synth::fhir::NdjsonWriter::create(&nd).unwrap();
    // The test range (999 …) holds 909,091 valid NHS numbers: past that the generator
    // starts again, so a larger source holds a second Patient for some numbers — as a
    // real export with duplicates does; the hub keeps one record per number.
    let mut numbers = std::collections::HashSet::new();
    for i in 0..n {
        let p = generator.source_patient(i);
        numbers.insert(p.nhs_number().as_u64());
        writer.add(&p).unwrap();
    }
    let distinct = numbers.len();
    drop(numbers);
    let counts = writer.finish().unwrap();
    let resources: usize = counts.values().sum();
    let gen_secs = t.elapsed().as_secs_f64();
    let mut ndjson_bytes = 0u64;
    let mut files = Vec::new();
    for e in std::fs::read_dir(&nd).unwrap() {
        let p = e.unwrap().path();
        ndjson_bytes += std::fs::metadata(&p).unwrap().len();
        files.push(p);
    }

    // Baseline: read and parse every line with serde_json.
    let t = Instant::now();
    let mut parsed = 0usize;
    for p in &files {
        let reader = std::io::BufReader::new(std::fs::File::open(p).unwrap());
        for line in reader.split(b'\n') {
            let line = line.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            parsed += usize::from(v.is_object());
        }
    }
    let parse_secs = t.elapsed().as_secs_f64();
    assert_eq!(parsed, resources);

    carecache_hub::pki::dev_ca(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let sharing = carecache_hub::testing::sharing_toml(dir.path());
    println!(
        "\n== hub ingest, {n} patients ({resources} resources, {:.2} GB NDJSON, generated in {gen_secs:.0} s)",
        ndjson_bytes as f64 / 1e9
    );
    println!(
        "baseline serde_json parse of the NDJSON: {parse_secs:.1} s = {:.0} patients/s",
        n as f64 / parse_secs
    );
    let export = Export {
        n,
        distinct,
        ndjson_bytes,
        parse_secs,
    };

    let engines = std::env::var("HUB_INGEST_ENGINES").unwrap_or_else(|_| "redb,postgres".into());
    let on = |name: &str| engines.split(',').any(|e| e.trim() == name);

    // The embedded engine.
    let mut redb_secs = None;
    if on("redb") {
        let data = dir.path().join("redb");
        let config =
            carecache_hub::testing::write_hub_toml_on(dir.path(), &data, &nd, "", &sharing);
        redb_secs = Some(engine("redb", &export, &config, None, || {
            std::fs::metadata(data.join("hub.redb")).unwrap().len()
        }));
        // Its file goes before the next engine's run (disk, at a million patients).
        let _ = std::fs::remove_dir_all(&data);
    }

    // PostgreSQL: a throwaway cluster on this machine, durable (fsync on), as a region
    // would run it. Its server's memory is its own, not the hub's.
    if on("postgres") && carecache_hub::testing::PgCluster::installed() {
        let cluster = carecache_hub::testing::PgCluster::start_durable();
        let store = carecache_hub::testing::postgres_toml(&cluster.url(), "bench");
        let config = carecache_hub::testing::write_hub_toml_on(
            dir.path(),
            &dir.path().join("pg"),
            &nd,
            &store,
            &sharing,
        );
        let url = cluster.url();
        engine("postgres", &export, &config, redb_secs, || {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let row = c
                .query_one(
                    "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = 'bench' AND c.relkind = 'r'",
                    &[],
                )
                .unwrap();
            u64::try_from(row.get::<_, i64>(0)).unwrap()
        });
    } else if on("postgres") {
        println!("postgres: not installed here (apt-get install postgresql): no figures");
    }
}

struct Export {
    n: usize,
    distinct: usize,
    ndjson_bytes: u64,
    parse_secs: f64,
}

/// Ingest the export twice on one engine, print and tabulate; the first ingest's seconds.
fn engine(
    name: &str,
    export: &Export,
    config: &std::path::Path,
    redb_secs: Option<f64>,
    db_bytes: impl FnOnce() -> u64,
) -> f64 {
    let Export {
        n,
        distinct,
        ndjson_bytes,
        parse_secs,
    } = *export;
    let (secs, rss, summary) = ingest(config);
    assert_eq!(summary["patients"].as_u64(), Some(n as u64));
    assert_eq!(summary["stored"]["added"].as_u64(), Some(distinct as u64));
    let (again_secs, again_rss, again) = ingest(config);
    // Each duplicated number's two records replace each other once per read.
    let duplicated = (n - distinct) as u64;
    assert_eq!(again["stored"]["added"].as_u64(), Some(0));
    assert!(again["stored"]["changed"].as_u64().unwrap() <= 2 * duplicated);
    assert!(again["stored"]["unchanged"].as_u64().unwrap() >= n as u64 - 2 * duplicated);
    let db_bytes = db_bytes();

    let rate = n as f64 / secs;
    let parse_rate = n as f64 / parse_secs;
    let mib = rss as f64 / 1024.0;
    let again_mib = again_rss as f64 / 1024.0;
    println!(
        "{name}: first ingest {secs:.1} s = {rate:.0} patients/s, hub peak RSS {mib:.1} MiB ({:.0} B/patient of NDJSON {:.0} B/patient)",
        rss as f64 * 1024.0 / n as f64,
        ndjson_bytes as f64 / n as f64
    );
    println!(
        "{name}: same export again (all unchanged): {again_secs:.1} s = {:.0} patients/s, peak RSS {again_mib:.1} MiB",
        n as f64 / again_secs
    );
    println!(
        "{name}: ingest / serde_json parse {:.2}; database {:.1} MB ({:.0} B/patient)",
        rate / parse_rate,
        db_bytes as f64 / 1e6,
        db_bytes as f64 / n as f64
    );
    let (peer, ratio) = match redb_secs {
        Some(r) => (
            format!("redb {:.0} patients/s", n as f64 / r),
            format!("{:.2}×", r / secs),
        ),
        None => (
            format!("serde_json parse {parse_rate:.0} patients/s"),
            format!("{:.2}×", rate / parse_rate),
        ),
    };
    table::row(
        &format!("hub ingest ({name}), {n} patients"),
        &format!("{rate:.0} patients/s"),
        &peer,
        &ratio,
        "—",
        None,
    );
    table::row(
        &format!("hub peak RSS during ingest ({name}), {n} patients"),
        &format!("{mib:.1} MiB"),
        &format!("NDJSON {:.0} MiB", ndjson_bytes as f64 / 1_048_576.0),
        &format!("{:.3}×", rss as f64 * 1024.0 / ndjson_bytes as f64),
        &format!("≤ {RSS_GOAL_MIB:.0} MiB"),
        Some(mib.max(again_mib) <= RSS_GOAL_MIB),
    );
    table::row(
        &format!("hub re-ingest of an unchanged export ({name}), {n} patients"),
        &format!("{again_secs:.1} s"),
        &format!("first ingest {secs:.1} s"),
        &format!("{:.2}×", again_secs / secs),
        "< 1×",
        Some(again_secs < secs),
    );
    secs
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` runs benches with --test: nothing to check quickly
    }
    let sizes = std::env::var("HUB_INGEST_SIZES").unwrap_or_else(|_| "100000".into());
    for n in sizes.split(',').filter_map(|s| s.trim().parse().ok()) {
        run(n);
    }
}
