//! Streaming ingest: an export larger than one batch is stored whole and the same as the
//! source; reading it again writes nothing; an ingest killed between batches is
//! completed by the next, equal to a clean one.

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};

use carecache_hub::source::ingest_ndjson;
use carecache_hub::state::{HubState, INGEST_BATCH};
use carecache_hub::testing::{normalised, synthetic_rules};
use carecache_synth::{Generator, SourcePatient};
use sync_protocol::message::ObjectionStatus;

fn export(patients: &[SourcePatient], dir: &Path) {
    if dir.exists() {
        std::fs::remove_dir_all(dir).unwrap();
    }
    carecache_synth::fhir::write_ndjson(patients, dir).unwrap();
}

fn staging_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".ingest-"))
        .count()
}

/// Every patient's record (version aside) and objection, as the hub holds them.
fn held(
    state: &HubState,
    patients: &[SourcePatient],
) -> Vec<(
    Option<sync_protocol::record::PatientRecord>,
    Option<ObjectionStatus>,
)> {
    patients
        .iter()
        .map(|p| {
            let nhs = p.nhs_number();
            (
                state.record(&nhs).unwrap().map(normalised),
                state.objection(&nhs).unwrap(),
            )
        })
        .collect()
}

#[test]
fn an_export_of_several_batches_is_stored_whole_and_read_again_without_a_change() {
    let n = 2 * INGEST_BATCH + 600;
    let dir = tempfile::tempdir().unwrap();
    let nd = dir.path().join("ndjson");
    let patients = Generator::new(11).source_patients(n);
    export(&patients, &nd);
    let state = carecache_hub::testing::open_state(dir.path());
    let rules = synthetic_rules();

    let first = ingest_ndjson(&state, &rules, &nd).unwrap();
    assert_eq!(first.patients, n as u64);
    assert_eq!(first.stored.added, n as u64);
    assert_eq!(staging_files(dir.path()), 0, "the staging file is removed");
    let mut objected = 0;
    for (p, (record, objection)) in patients.iter().zip(held(&state, &patients)) {
        let record = record.expect("every patient is held");
        if p.shareable() {
            assert!(
                record == normalised(p.expected.clone()),
                "a patient differs from the source"
            );
        } else {
            objected += 1;
            assert_eq!(objection, Some(ObjectionStatus::Objected));
        }
    }
    assert!(objected > 0);

    // The same export again: nothing is written, the change log does not move.
    let head = state.head().unwrap();
    let again = ingest_ndjson(&state, &rules, &nd).unwrap();
    assert_eq!(again.stored.unchanged, n as u64);
    assert_eq!(
        (
            again.stored.added,
            again.stored.changed,
            again.stored.deleted
        ),
        (0, 0, 0)
    );
    assert_eq!(again.stored.objections, 0);
    assert_eq!(state.head().unwrap(), head);

    // Seven patients leave the source, one of them from each end of the id order: each
    // is deleted with one change-log entry, the others untouched.
    let mut fewer = patients.clone();
    let gone: Vec<SourcePatient> = [n - 1, n / 2, 5, 4, 3, 2, 0]
        .iter()
        .map(|&i| fewer.remove(i))
        .collect();
    export(&fewer, &nd);
    let third = ingest_ndjson(&state, &rules, &nd).unwrap();
    assert_eq!(third.stored.deleted, 7);
    assert_eq!(third.stored.unchanged, (n - 7) as u64);
    assert_eq!(state.head().unwrap(), head + 7);
    for p in &gone {
        assert!(state.record(&p.nhs_number()).unwrap().is_none());
    }
    assert!(state.record(&fewer[0].nhs_number()).unwrap().is_some());
}

#[test]
fn an_ingest_killed_between_batches_is_completed_by_the_next_and_equals_a_clean_one() {
    let n = 4 * INGEST_BATCH + 321;
    let dir = tempfile::tempdir().unwrap();
    let nd = dir.path().join("ndjson");
    let patients = Generator::new(12).source_patients(n);
    export(&patients, &nd);
    carecache_hub::pki::dev_ca(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let data = dir.path().join("killed");
    let config = carecache_hub::testing::write_hub_toml(
        dir.path(),
        &data,
        &nd,
        &carecache_hub::testing::sharing_toml(dir.path()),
    );

    // The real hub, killed (SIGKILL) once its second batch is committed.
    let mut child = Command::new(env!("CARGO_BIN_EXE_carecache-hub"))
        .args(["ingest", "--config"])
        .arg(&config)
        .env("RUST_LOG", "carecache_hub=debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut batches = 0;
    for line in stderr.lines() {
        if line.unwrap().contains("ingest batch stored") {
            batches += 1;
            if batches == 2 {
                child.kill().unwrap();
                break;
            }
        }
    }
    assert_eq!(batches, 2, "the ingest logged its batches");
    assert!(!child.wait().unwrap().success());
    assert_eq!(staging_files(&data), 1, "the kill left its staging file");

    let state = carecache_hub::testing::open_state(&data);
    let (partial, _, _) = state.counts().unwrap();
    assert!(
        partial >= 2 * INGEST_BATCH as u64 && partial < n as u64,
        "killed mid-ingest with {partial} of {n} patients stored"
    );
    let rules = synthetic_rules();
    let rest = ingest_ndjson(&state, &rules, &nd).unwrap();
    assert_eq!(
        rest.stored.unchanged, partial,
        "whole patients were kept: {:?}",
        rest.stored
    );
    assert_eq!(rest.stored.added, n as u64 - partial);
    assert_eq!(
        staging_files(&data),
        0,
        "the next ingest removed the stale file"
    );

    let clean_dir = dir.path().join("clean");
    std::fs::create_dir_all(&clean_dir).unwrap();
    let clean = carecache_hub::testing::open_state(&clean_dir);
    ingest_ndjson(&clean, &rules, &nd).unwrap();
    assert_eq!(clean.counts().unwrap(), state.counts().unwrap());
    assert!(
        held(&state, &patients) == held(&clean, &patients),
        "a completed ingest differs from a clean one"
    );
}
