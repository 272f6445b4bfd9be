//! The encrypted store against SQLCipher, the usual choice for an encrypted embedded
//! database, on the same machine in the same run: 100,000 patients with realistic records
//! (2 alerts, 3 allergies, 10 medications: about 1.7 KB each).
//!
//! Prints, for each side and as a ratio:
//! - point read + decrypt + decode of a random patient's record, per second (each read its
//!   own read transaction, as an API request would be);
//! - durable single commit, p50 and p99: one record updated, fsynced (SQLCipher in WAL mode
//!   with `synchronous=FULL`); and for carecache also one audit entry appended;
//! - bytes on disk per patient after loading.
//!
//! Run: `cargo bench --bench store` (`CARECACHE_BENCH_PATIENTS` changes 100,000;
//! `CARECACHE_BENCH_DIR` puts the files on another disk; default is the system temp dir;
//! `CARECACHE_BENCH_PROFILE_READS=1` only loads and then reads for ten seconds, for `perf`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    reason = "benchmark binary: prints its figures"
)]

mod common;
mod table;

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use carecache::crypto::RootKey;
use carecache::keysource::SourceKind;
use carecache::store::Store;
use carecache_synth::{Generator, Shape};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rusqlite::params;
use sync_protocol::audit::{
    Access, AuditAction, AuditEntry, AuditEvent, AuditOutcome, AuditRecord, Purpose,
};
use sync_protocol::message::View;
use sync_protocol::record::PatientRecord;
use sync_protocol::types::{BoundedVec, Hash32, LeaseId, RecordVersion, StaffId, Text, Timestamp};

const READ_SECONDS: f64 = 3.0;
const COMMITS: usize = 300;

fn main() {
    let n: usize = std::env::var("CARECACHE_BENCH_PATIENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let base = std::env::var_os("CARECACHE_BENCH_DIR")
        .map_or_else(std::env::temp_dir, std::path::PathBuf::from);
    let tmp = tempfile::tempdir_in(base).unwrap();
    let shape = Shape {
        alerts: 2,
        allergies: 3,
        medications: 10,
        fixed: true,
    };
    let started = Instant::now();
    let records = Generator::with_shape(2026, shape).patients(n);
    let encoded: Vec<Vec<u8>> = records
        .iter()
        .map(|r| postcard::to_allocvec(r).unwrap())
        .collect();
    let mean = encoded.iter().map(Vec::len).sum::<usize>() / n;
    println!(
        "store benchmark: {n} patients, mean record {mean} B encoded (generated in {:.1} s), files in {}",
        started.elapsed().as_secs_f64(),
        tmp.path().display()
    );

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);

    // --- carecache ---
    let dir = tmp.path().join("carecache");
    let store =
        Store::create(&dir, &RootKey::random().unwrap(), SourceKind::KeyFile, None).unwrap();
    let t = Instant::now();
    for chunk in records.chunks(1000) {
        store.put_records(chunk).unwrap();
    }
    let cc_load = t.elapsed();
    if std::env::var_os("CARECACHE_BENCH_PROFILE_READS").is_some() {
        // For a profiler: nothing but carecache reads for ten seconds.
        let start = Instant::now();
        let mut i = 0;
        while start.elapsed() < Duration::from_secs(10) {
            black_box(
                store
                    .record_bytes(&records[order[i % n]].nhs_number)
                    .unwrap(),
            );
            i += 1;
        }
        println!("profiled {i} reads");
        return;
    }
    let cc_raw = reads_per_sec(|i| {
        let r = store
            .record_bytes(&records[order[i % n]].nhs_number)
            .unwrap()
            .unwrap();
        black_box(r);
    });
    let floor = read_floor(tmp.path(), &store, &records, &order);
    let cc_reads = reads_per_sec(|i| {
        let r = store
            .record(&records[order[i % n]].nhs_number)
            .unwrap()
            .unwrap();
        black_box(r);
    });
    let cc_commit = commit_latencies(|i| {
        let mut r = records[order[i % n]].clone();
        r.version = RecordVersion(1_000_000 + i as u64);
        store.put_records(std::slice::from_ref(&r)).unwrap();
    });
    let mut prev = Hash32::default();
    let cc_audit = commit_latencies(|i| {
        let e = AuditEntry::seal(&prev, i as u64 + 1, &audit(&records[order[i % n]])).unwrap();
        prev = e.hash;
        store.append_audit(&e).unwrap();
    });
    drop(store);
    let cc_bytes = dir_size(&dir);
    let file = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    println!(
        "carecache files: {} {} B, {} {} B",
        carecache::store::DATABASE_FILE,
        file(carecache::store::DATABASE_FILE),
        carecache::store::KEYRING_FILE,
        file(carecache::store::KEYRING_FILE)
    );

    // --- SQLCipher (WAL, synchronous=FULL, 4 KiB pages, HMAC on: its defaults) ---
    let path = tmp.path().join("sqlcipher.db");
    let t = Instant::now();
    let db = common::sqlcipher_load(
        &path,
        encoded
            .iter()
            .zip(&records)
            .map(|(bytes, r)| (r.nhs_number.as_u64() as i64, bytes.clone())),
    );
    let version: String = db
        .query_row("PRAGMA cipher_version", [], |r| r.get(0))
        .unwrap();
    let sq_load = t.elapsed();
    let sq_raw = reads_per_sec(|i| {
        let nhs = records[order[i % n]].nhs_number.as_u64() as i64;
        let mut st = db
            .prepare_cached("SELECT record FROM patients WHERE nhs = ?1")
            .unwrap();
        let bytes: Vec<u8> = st.query_row([nhs], |row| row.get(0)).unwrap();
        black_box(bytes);
    });
    let sq_reads = reads_per_sec(|i| {
        let nhs = records[order[i % n]].nhs_number.as_u64() as i64;
        let mut st = db
            .prepare_cached("SELECT record FROM patients WHERE nhs = ?1")
            .unwrap();
        let bytes: Vec<u8> = st.query_row([nhs], |row| row.get(0)).unwrap();
        let r: PatientRecord = postcard::from_bytes(&bytes).unwrap();
        black_box(r);
    });
    let sq_commit = commit_latencies(|i| {
        let mut r = records[order[i % n]].clone();
        r.version = RecordVersion(1_000_000 + i as u64);
        let bytes = postcard::to_allocvec(&r).unwrap();
        db.prepare_cached("UPDATE patients SET record = ?2 WHERE nhs = ?1")
            .unwrap()
            .execute(params![r.nhs_number.as_u64() as i64, bytes])
            .unwrap();
    });
    let sq_bytes = common::sqlcipher_bytes(db, &path);

    println!("SQLCipher {version}");
    println!(
        "load ({n} patients, 1,000 per transaction): carecache {:.2} s, SQLCipher {:.2} s",
        cc_load.as_secs_f64(),
        sq_load.as_secs_f64()
    );
    println!(
        "point read + decrypt/s: carecache {cc_raw:.0}, SQLCipher {sq_raw:.0}, ratio {:.1}×",
        cc_raw / sq_raw
    );
    println!(
        "point read + decrypt + decode to a checked record/s: carecache {cc_reads:.0}, SQLCipher {sq_reads:.0}, ratio {:.1}×",
        cc_reads / sq_reads
    );
    println!(
        "point read floor (redb get of the same sealed bytes + one XChaCha20-Poly1305 open)/s: {floor:.0}; carecache {:.2}× the floor (goal ≥ 0.6×)",
        cc_raw / floor
    );
    table::row(
        "store point read + decrypt",
        &format!(
            "{cc_raw:.0}/s (SQLCipher {sq_raw:.0}/s, {:.1}×)",
            cc_raw / sq_raw
        ),
        &format!("floor {floor:.0}/s"),
        &format!("{:.2}×", cc_raw / floor),
        "≥ 0.6× floor",
        Some(cc_raw / floor >= 0.6),
    );
    let (cp50, cp99) = cc_commit;
    let (ap50, ap99) = cc_audit;
    let (sp50, sp99) = sq_commit;
    println!(
        "durable single commit p50 / p99: carecache record {:.2} / {:.2} ms, audit entry {:.2} / {:.2} ms; SQLCipher record {:.2} / {:.2} ms; p50 ratio {:.2}× record, {:.2}× audit (goal ≤ 1.1×)",
        ms(cp50),
        ms(cp99),
        ms(ap50),
        ms(ap99),
        ms(sp50),
        ms(sp99),
        cp50.as_secs_f64() / sp50.as_secs_f64(),
        ap50.as_secs_f64() / sp50.as_secs_f64(),
    );
    let commit_ratio = cp50.as_secs_f64() / sp50.as_secs_f64();
    table::row(
        "store durable commit p50 (one record)",
        &format!("{:.2} ms", ms(cp50)),
        &format!("SQLCipher {:.2} ms", ms(sp50)),
        &format!("{commit_ratio:.2}×"),
        "≤ 1.1×",
        Some(commit_ratio <= 1.1),
    );
    let per_patient = cc_bytes as f64 / n as f64;
    table::row(
        "disk bytes per patient (store)",
        &format!("{per_patient:.0} B"),
        &format!("SQLCipher {:.0} B", sq_bytes as f64 / n as f64),
        &format!("{:.2}×", cc_bytes as f64 / sq_bytes as f64),
        "≤ 1× SQLCipher",
        Some(cc_bytes <= sq_bytes),
    );
    println!(
        "disk per patient: carecache {:.0} B, SQLCipher {:.0} B, ratio {:.2}× (goal ≤ 1×)",
        cc_bytes as f64 / n as f64,
        sq_bytes as f64 / n as f64,
        cc_bytes as f64 / sq_bytes as f64
    );
}

fn audit(r: &PatientRecord) -> AuditRecord {
    AuditRecord {
        at: Timestamp::from_millis(1_800_000_000_000).unwrap(),
        wall: Timestamp::from_millis(1_800_000_000_000).unwrap(),
        event: AuditEvent::Access(Access {
            request_id: 1,
            client: Text::new("epcr").unwrap(),
            user: Some(StaffId::new("C1234567").unwrap()),
            role: None,
            purpose: Some(Purpose::Treat),
            action: AuditAction::ReadSummary,
            patient: Some(r.nhs_number),
            listed: BoundedVec::default(),
            lease: Some(LeaseId(1)),
            view: Some(View::Clinical),
            shown: BoundedVec::default(),
            withheld: 0,
            outcome: AuditOutcome::Served,
        }),
    }
}

/// The floor of a point read: a bare redb database (same cache size, same page size)
/// holding the same sealed bytes (the record's encoding compressed as the store
/// compresses it, sealed) under the same row keys, each read a `get` from a table
/// opened once (as the store's snapshot is) and one XChaCha20-Poly1305 open with a key
/// already in hand. Nothing a store could skip: no key lookup, no row-key hash.
fn read_floor(dir: &Path, store: &Store, records: &[PatientRecord], order: &[usize]) -> f64 {
    use chacha20poly1305::aead::{AeadInOut, KeyInit};
    use chacha20poly1305::{XChaCha20Poly1305, XNonce};
    use redb::ReadableDatabase;
    const TABLE: redb::TableDefinition<u32, &[u8]> = redb::TableDefinition::new("floor");
    let db = redb::Database::builder()
        .set_cache_size(carecache::store::CACHE_BYTES)
        .create(dir.join("floor.redb"))
        .unwrap();
    let cipher = XChaCha20Poly1305::new(&[7u8; 32].into());
    // Keys: the same values, in the same (random) order as the store's keyed row keys.
    let mut keys: Vec<u32> = (0..records.len() as u32).collect();
    keys.shuffle(&mut rand::rngs::StdRng::seed_from_u64(11));
    for (chunk, ks) in records.chunks(1000).zip(keys.chunks(1000)) {
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(TABLE).unwrap();
            for (r, k) in chunk.iter().zip(ks) {
                let raw = store.raw_record(&r.nhs_number).unwrap().unwrap();
                // What the store seals: the record's head (NHS number, version), then its
                // encoding compressed (schema 5).
                let plain = store.record_bytes(&r.nhs_number).unwrap().unwrap();
                let mut body = r.nhs_number.as_u64().to_be_bytes().to_vec();
                body.extend_from_slice(&r.version.0.to_be_bytes());
                body.extend_from_slice(&zstd::bulk::compress(&plain, 1).unwrap());
                let nonce = XNonce::from([1u8; 24]);
                let tag = cipher
                    .encrypt_inout_detached(&nonce, &raw.ad, body.as_mut_slice().into())
                    .unwrap();
                let mut v = vec![0u8; 5];
                v.extend_from_slice(&nonce);
                v.extend_from_slice(&body);
                v.extend_from_slice(&tag);
                assert_eq!(v.len(), raw.sealed.len() + 5, "the same sealed length");
                t.insert(k, v.as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let ads: Vec<Vec<u8>> = records
        .iter()
        .map(|r| store.raw_record(&r.nhs_number).unwrap().unwrap().ad)
        .collect();
    let tx = db.begin_read().unwrap();
    let table = tx.open_table(TABLE).unwrap();
    reads_per_sec(|i| {
        let at = order[i % records.len()];
        let v = table.get(keys[at]).unwrap().unwrap();
        let sealed = &v.value()[5..];
        let (nonce, rest) = sealed.split_at(24);
        let (body, tag) = rest.split_at(rest.len() - 16);
        let mut plain = zeroize::Zeroizing::new(body.to_vec());
        cipher
            .decrypt_inout_detached(
                &XNonce::from(<[u8; 24]>::try_from(nonce).unwrap()),
                &ads[at],
                plain.as_mut_slice().into(),
                &<[u8; 16]>::try_from(tag).unwrap().into(),
            )
            .unwrap();
        black_box(plain);
    })
}

/// Reads per second over the best of three runs of `READ_SECONDS / 3`.
fn reads_per_sec(mut read: impl FnMut(usize)) -> f64 {
    let mut best = 0f64;
    let mut i = 0;
    for _ in 0..3 {
        let start = Instant::now();
        let mut count = 0u32;
        while start.elapsed() < Duration::from_secs_f64(READ_SECONDS / 3.0) {
            for _ in 0..64 {
                read(i);
                i += 1;
            }
            count += 64;
        }
        best = best.max(f64::from(count) / start.elapsed().as_secs_f64());
    }
    best
}

/// p50 and p99 of `COMMITS` durable commits.
fn commit_latencies(mut commit: impl FnMut(usize)) -> (Duration, Duration) {
    let mut times: Vec<Duration> = (0..COMMITS)
        .map(|i| {
            let t = Instant::now();
            commit(i);
            t.elapsed()
        })
        .collect();
    times.sort();
    (times[COMMITS / 2], times[COMMITS * 99 / 100])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            dir_size(&e.path())
        } else {
            m.len()
        };
    }
    total
}
