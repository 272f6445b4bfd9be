//! Sync protocol size and speed on a realistic batch: 500 patients with 3 allergies,
//! 8 medications and 2 alerts each. Prints wire bytes per patient against the same
//! records as FHIR R4 JSON (the baseline, measured in the same run), their ratio, and
//! decode throughput against parsing the FHIR JSON.
//!
//! Run: `cargo bench --bench protocol` (set `CARECACHE_BENCH_PATIENTS` to change 500).
#![allow(
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "benchmark binary: prints its figures"
)]

mod table;

use std::hint::black_box;
use std::time::{Duration, Instant};

use carecache_synth::{Generator, Shape};
use sync_protocol::message::{AllowedSetDigest, Batch};
use sync_protocol::types::{BoundedVec, Cursor, Timestamp};
use sync_protocol::{Compression, Message, decode, encode};

/// Best throughput of five runs of at least 0.5 s each, in MB/s of `bytes` per call.
fn throughput(bytes: usize, mut f: impl FnMut()) -> f64 {
    let mut best = 0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let mut calls = 0u32;
        while start.elapsed() < Duration::from_millis(500) {
            f();
            calls += 1;
        }
        let mbs = bytes as f64 * f64::from(calls) / start.elapsed().as_secs_f64() / 1e6;
        best = best.max(mbs);
    }
    best
}

fn main() {
    let n: usize = std::env::var("CARECACHE_BENCH_PATIENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let shape = Shape {
        alerts: 2,
        allergies: 3,
        medications: 8,
        fixed: true,
    };
    let records = Generator::with_shape(2026, shape).patients(n);

    // Baseline: the same records as FHIR R4 JSON resources, one per line (NDJSON).
    let mut fhir = Vec::new();
    for r in &records {
        for res in carecache_fhir::write::resources(r) {
            serde_json::to_writer(&mut fhir, &res).unwrap();
            fhir.push(b'\n');
        }
    }
    let fhir_zstd = zstd::bulk::compress(&fhir, 3).unwrap();

    let allowed: AllowedSetDigest = sync_protocol::digest::allowed_set_digest(
        records.iter().map(|r| (r.nhs_number, r.version)),
    );
    let batch = Batch::new(
        BoundedVec::new(),
        BoundedVec::new(),
        BoundedVec::try_from(records).unwrap(),
        BoundedVec::new(),
        Cursor::new(vec![1; 8]).unwrap(),
        false,
        Timestamp::from_millis(1_735_689_600_000).unwrap(),
        allowed,
    )
    .unwrap();
    let message = Message::Batch(batch);
    let plain = encode(&message, Compression::None).unwrap();
    let packed = encode(&message, Compression::Zstd).unwrap();
    let content = plain.len() - sync_protocol::codec::HEADER_LEN;

    let per = |b: usize| b as f64 / n as f64;
    println!(
        "sync-protocol batch benchmark: {n} patients, 2 alerts + 3 allergies + 8 medications each"
    );
    println!(
        "  FHIR R4 JSON (baseline)     {:>9.0} bytes/patient",
        per(fhir.len())
    );
    println!(
        "  FHIR R4 JSON + zstd         {:>9.0} bytes/patient",
        per(fhir_zstd.len())
    );
    println!(
        "  wire, uncompressed          {:>9.0} bytes/patient",
        per(plain.len())
    );
    println!(
        "  wire, zstd                  {:>9.0} bytes/patient",
        per(packed.len())
    );
    println!(
        "  ratio wire(zstd) / FHIR JSON        {:.3}  (goal <= 0.15)",
        packed.len() as f64 / fhir.len() as f64
    );
    let ratio = packed.len() as f64 / fhir.len() as f64;
    table::row(
        "wire bytes per patient (zstd frame)",
        &format!("{:.0} B", per(packed.len())),
        &format!("FHIR JSON {:.0} B", per(fhir.len())),
        &format!("{ratio:.3}×"),
        "≤ 0.15×",
        Some(ratio <= 0.15),
    );
    println!(
        "  ratio wire(plain) / FHIR JSON       {:.3}",
        plain.len() as f64 / fhir.len() as f64
    );
    println!(
        "  ratio wire(zstd) / FHIR JSON+zstd   {:.3}",
        packed.len() as f64 / fhir_zstd.len() as f64
    );

    let dec_plain = throughput(content, || {
        black_box(decode(black_box(&plain)).unwrap());
    });
    let dec_zstd = throughput(content, || {
        black_box(decode(black_box(&packed)).unwrap());
    });
    let enc_zstd = throughput(content, || {
        black_box(encode(black_box(&message), Compression::Zstd).unwrap());
    });
    let json_parse = throughput(fhir.len(), || {
        for line in fhir.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            black_box(serde_json::from_slice::<serde_json::Value>(line).unwrap());
        }
    });
    let json_records_per_s = json_parse * 1e6 / fhir.len() as f64 * n as f64;
    let wire_records_per_s = dec_zstd * 1e6 / content as f64 * n as f64;
    println!("  decode, uncompressed frame  {dec_plain:>9.0} MB/s of payload");
    println!(
        "  decode, zstd frame          {dec_zstd:>9.0} MB/s of decompressed payload  (goal >= 100)"
    );
    println!("  encode, zstd frame          {enc_zstd:>9.0} MB/s of payload");
    println!("  FHIR JSON parse (baseline)  {json_parse:>9.0} MB/s");
    println!(
        "  patients decoded per second: wire(zstd) {wire_records_per_s:.0}, FHIR JSON {json_records_per_s:.0}, ratio {:.1}x",
        wire_records_per_s / json_records_per_s
    );
}
