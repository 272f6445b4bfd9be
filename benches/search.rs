//! Offline demographic search (#27): latency of a search by misspelt family name and date
//! of birth, p50 and p99, over 2,000 and 100,000 held patients; the time to build the
//! index (after a sync changed the store); bytes of index per patient. The baseline,
//! measured in the same run over the same patients, is the floor any search must pay: one
//! exact comparison of the normalised family name per held patient.
//!
//! Run: `cargo bench --bench search` (`CARECACHE_SEARCH_BENCH_SIZES=2000,100000`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    reason = "benchmark binary: prints its figures"
)]

mod table;

use std::hint::black_box;
use std::time::Instant;

use carecache::crypto::RootKey;
use carecache::keysource::SourceKind;
use carecache::search::{Index, Query, normalise};
use carecache::store::Store;
use carecache_synth::Generator;
use rand::{Rng, SeedableRng};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let sizes: Vec<usize> = std::env::var("CARECACHE_SEARCH_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![2_000, 100_000]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(27);
    for n in sizes {
        let records = Generator::new(27).patients(n);
        let t = Instant::now();
        let index = Index::build(&records);
        let build_ms = t.elapsed().as_secs_f64() * 1e3;
        let families: Vec<String> = records
            .iter()
            .map(|r| normalise(r.demographics.name.family.as_str()))
            .collect();
        let queries = 400;
        let mut search_ms = Vec::new();
        let mut floor_ms = Vec::new();
        let mut found = 0;
        for _ in 0..queries {
            let r = &records[rng.random_range(0..n)];
            let family = r.demographics.name.family.as_str();
            // One letter changed in the middle, as a relative might spell it.
            let mut chars: Vec<char> = family.chars().collect();
            let i = chars.len() / 2;
            chars[i] = if chars[i] == 'e' { 'a' } else { 'e' };
            let typed: String = chars.into_iter().collect();
            let q = Query::new(
                Some(&typed),
                None,
                Some(&r.demographics.birth_date.to_string()),
                None,
                None,
            )
            .unwrap();
            let t = Instant::now();
            let hits = black_box(index.search(&q));
            search_ms.push(t.elapsed().as_secs_f64() * 1e3);
            found += usize::from(hits.iter().any(|m| m.nhs == r.nhs_number));
            let needle = normalise(&typed);
            let t = Instant::now();
            black_box(families.iter().filter(|f| **f == needle).count());
            floor_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        search_ms.sort_by(f64::total_cmp);
        floor_ms.sort_by(f64::total_cmp);
        let (p50, p99) = (percentile(&search_ms, 0.5), percentile(&search_ms, 0.99));
        let floor50 = percentile(&floor_ms, 0.5);
        let per_patient = index.bytes_per_patient();
        // The rebuild a search pays after a sync changed the store: every record opened
        // (decrypted, decoded) one at a time.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let store =
            Store::create(&dir, &RootKey::random().unwrap(), SourceKind::KeyFile, None).unwrap();
        for chunk in records.chunks(1_000) {
            store.put_records(chunk).unwrap();
        }
        let t = Instant::now();
        let from_store = Index::from_store(&store).unwrap();
        let store_build_ms = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(from_store.len(), n);
        drop(store);
        println!(
            "search over {n} patients: p50 {p50:.2} ms, p99 {p99:.2} ms (floor: exact scan p50 {floor50:.3} ms, {:.0}×); \
             index built in {build_ms:.0} ms from records in memory, {store_build_ms:.0} ms from the store, {per_patient} B per patient; the patient was found in {found} of {queries} misspelt searches",
            p50 / floor50.max(1e-6)
        );
        let goal_ms = if n <= 2_000 { 10.0 } else { 100.0 };
        table::row(
            &format!("search p99, misspelt name + date of birth, {n} patients"),
            &format!("{p99:.2} ms (p50 {p50:.2} ms)"),
            &format!("exact scan p50 {floor50:.3} ms"),
            &format!("{:.0}×", p50 / floor50.max(1e-6)),
            &format!("p99 ≤ {goal_ms} ms"),
            Some(p99 <= goal_ms),
        );
        table::row(
            &format!("search index, {n} patients"),
            &format!("{per_patient} B/patient, rebuilt from the store in {store_build_ms:.0} ms"),
            "—",
            "—",
            "—",
            None,
        );
        table::row(
            &format!("search recall, misspelt name + date of birth, {n} patients"),
            &format!("{found} of {queries}"),
            "—",
            "—",
            "all",
            Some(found == queries),
        );
    }
}
