//! Crash harness: `carecache sync` and `carecache rekey` as real processes, killed with
//! SIGKILL at random moments while they apply batches, purge a caseload the hub took
//! away, and rotate the root key. (Reads under kill -9 are `api_crash.rs`.) After each
//! kill the store opens with the key file as it is, every held record opens and is
//! covered by a held lease, the audit chain verifies; and each sync that finally
//! completes does so without a resync — the committed cursor always agreed with the
//! records — and holds exactly the hub's allowed set.
//! `CARECACHE_CRASH_SYNC_KILLS` (default 100) and `CARECACHE_CRASH_REKEY_KILLS`
//! (default 50) set the number of kills.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use carecache::audit_tools::{Verification, verify};
use carecache::keysource::KeySource;
use carecache::store::{Store, unlock};
use rand::Rng;
use serde_json::json;
use sync_protocol::NhsNumber;

use crate::device_harness::{TestHub, at, cli_device, grant, run_cli, shareable};

fn kills(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `carecache ARGS` and kills it after `after` (or lets it finish): whether it
/// finished by itself, and its standard error.
fn run_until(args: &[&str], after: Option<Duration>) -> (bool, String) {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_carecache"))
        .args(args)
        .env("CARECACHE_LOG", "info")
        .env_remove("CARECACHE_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let finished = match after {
        Some(d) => {
            let deadline = Instant::now() + d;
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status.success();
                }
                if Instant::now() >= deadline {
                    let _ = child.kill(); // SIGKILL
                    let _ = child.wait();
                    break false;
                }
                std::thread::sleep(Duration::from_micros(300));
            }
        }
        None => child.wait().unwrap().success(),
    };
    (finished, reader.join().unwrap())
}

/// The state after a kill: opens, records open and are covered, the chain verifies.
/// Returns the patients held.
fn check_after_kill(data: &Path, key: &Path, what: &str) -> BTreeSet<NhsNumber> {
    let root = unlock(data, &KeySource::KeyFile(key.to_owned()))
        .unwrap_or_else(|e| panic!("{what}: the key no longer unlocks the store: {e}"));
    let store =
        Store::open(data, &root).unwrap_or_else(|e| panic!("{what}: the store does not open: {e}"));
    let records = store
        .records()
        .unwrap_or_else(|e| panic!("{what}: a held record does not open: {e}"));
    let covered: BTreeSet<NhsNumber> = store
        .leases()
        .unwrap()
        .iter()
        .flat_map(|l| l.patients.iter().copied())
        .collect();
    let held: BTreeSet<NhsNumber> = records.iter().map(|r| r.nhs_number).collect();
    assert!(
        held.is_subset(&covered),
        "{what}: records held for patients no held lease covers"
    );
    match verify(&store).unwrap() {
        Verification::Intact { .. } => {}
        Verification::Broken { seq, why } => panic!("{what}: audit chain broken at {seq}: {why}"),
    }
    held
}

/// A hub of `n` patients on real time, and a device set up with the CLI in `tmp`:
/// config path, device id, data directory, key file, and the lease window (now − 1 h to
/// now + 8 h) for grants.
fn cli_setup(
    n: usize,
    seed: u64,
    tmp: &Path,
) -> (
    TestHub,
    PathBuf,
    String,
    PathBuf,
    PathBuf,
    serde_json::Value,
) {
    let hub = TestHub::start(n, seed);
    let now = carecache::clock::Clock::wall_ms(&carecache::clock::SystemClock::new());
    hub.set_time(now);
    let (config, id) = cli_device(&hub, tmp, |t| t);
    let window = json!({ "not_before": at(now - 3_600_000), "not_after": at(now + 8 * 3_600_000) });
    (
        hub,
        config,
        id,
        tmp.join("data"),
        tmp.join("root.key"),
        window,
    )
}

#[test]
fn kill_9_during_sync_apply_and_purge_leaves_a_committed_state() {
    let kills = kills("CARECACHE_CRASH_SYNC_KILLS", 100);
    let tmp = tempfile::tempdir().unwrap();
    // The default (smallest allowed) 256 KiB batches: several commits per sync, so kills
    // land between and inside them.
    let (hub, config, id, data, key, window) = cli_setup(1200, 81, tmp.path());
    let cfg = config.to_str().unwrap();
    let all: Vec<NhsNumber> = hub.patients.iter().map(|p| p.nhs_number()).collect();
    let halves = [all[..600].to_vec(), all[600..].to_vec()];
    let allowed = |half: usize| -> BTreeSet<NhsNumber> {
        let s: BTreeSet<NhsNumber> = shareable(&hub, 1200).into_iter().collect();
        halves[half]
            .iter()
            .filter(|n| s.contains(n))
            .copied()
            .collect()
    };
    let mut lease = grant(&hub, &id, &halves[0], window.clone());
    let mut half = 0;
    // How long an uninterrupted sync of a half takes (apply + purge), to aim the kills.
    let started = Instant::now();
    let (ok, log) = run_until(&["sync", "--config", cfg], None);
    assert!(ok, "{log}");
    let span = started.elapsed();
    assert_eq!(check_after_kill(&data, &key, "first sync"), allowed(0));

    let mut rng = rand::rng();
    let mut done = 0;
    let mut completed = 0;
    let mut phase_kills = 0;
    let mut killed_with = [0usize; 2]; // kills that left nothing / something of the new half
    // Each phase swaps the caseload: the hub revokes one half and grants the other, so a
    // sync purges 600 patients and applies 600.
    let swap = |lease: &mut u64, half: &mut usize| {
        let (status, _) = hub.admin("DELETE", &format!("/admin/v1/leases/{lease}"), None);
        assert!((200..300).contains(&status));
        *half = 1 - *half;
        *lease = grant(&hub, &id, &halves[*half], window.clone());
    };
    swap(&mut lease, &mut half);
    while done < kills {
        let after = Duration::from_micros(rng.random_range(0..=span.as_micros() as u64));
        let (finished, log) = run_until(&["sync", "--config", cfg], Some(after));
        let held = check_after_kill(&data, &key, &format!("kill {done}"));
        if finished {
            // Completed: by its digest check, the cursor agreed with the records
            // throughout (no full resync was needed) and the allowed set is held.
            assert!(
                !log.contains("resynchronising"),
                "a completed sync needed a resync after {phase_kills} kills: {log}"
            );
            assert_eq!(held, allowed(half), "completed sync holds the wrong set");
            completed += 1;
            phase_kills = 0;
            swap(&mut lease, &mut half);
            continue;
        }
        done += 1;
        phase_kills += 1;
        killed_with[usize::from(!held.is_disjoint(&allowed(half)))] += 1;
        // A phase that keeps being killed early is finished cleanly to move on.
        if phase_kills >= 6 {
            let (ok, log) = run_until(&["sync", "--config", cfg], None);
            assert!(ok, "{log}");
            assert!(!log.contains("resynchronising"), "{log}");
            assert_eq!(check_after_kill(&data, &key, "clean finish"), allowed(half));
            completed += 1;
            phase_kills = 0;
            swap(&mut lease, &mut half);
        }
    }
    eprintln!(
        "{kills} kills during sync (a full sync takes {:.0} ms): {} before any of the new caseload landed, \
         {} part way; {completed} syncs completed without a resync",
        span.as_secs_f64() * 1000.0,
        killed_with[0],
        killed_with[1]
    );
    assert!(completed >= 3, "too few phases completed: {completed}");
    assert!(
        killed_with[1] > 0,
        "no kill landed part way through applying a caseload"
    );
}

#[test]
fn kill_9_during_key_rotation_leaves_a_store_the_key_file_opens() {
    let kills = kills("CARECACHE_CRASH_REKEY_KILLS", 50);
    let tmp = tempfile::tempdir().unwrap();
    let (hub, config, id, data, key, window) = cli_setup(200, 82, tmp.path());
    let cfg = config.to_str().unwrap();
    let patients: Vec<NhsNumber> = hub.patients.iter().map(|p| p.nhs_number()).collect();
    grant(&hub, &id, &patients, window);
    let (ok, out, err) = run_cli(&["sync", "--config", cfg]);
    assert!(ok, "{out}{err}");
    let before = check_after_kill(&data, &key, "before");
    let args = [
        "rekey",
        "--data-dir",
        data.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--new-key-file",
        key.to_str().unwrap(),
    ];
    let started = Instant::now();
    let (ok, log) = run_until(&args, None);
    assert!(ok, "{log}");
    let span = started.elapsed();
    let mut rng = rand::rng();
    let mut rotated = 0;
    let mut old = std::fs::read(&key).unwrap();
    for k in 0..kills {
        let after = Duration::from_micros(rng.random_range(0..=span.as_micros() as u64));
        let (finished, log) = run_until(&args, Some(after));
        let held = check_after_kill(&data, &key, &format!("rekey kill {k}"));
        assert_eq!(held, before, "rekey kill {k}: the records changed");
        let now_key = std::fs::read(&key).unwrap();
        if now_key != old {
            rotated += 1;
            old = now_key;
        }
        assert!(finished || !log.contains("the old key no longer opens"));
    }
    eprintln!(
        "{kills} kills during rekey (one takes {:.0} ms): the key changed {rotated} times; the store always opened",
        span.as_secs_f64() * 1000.0
    );
}

#[test]
fn a_key_rotation_killed_between_the_store_and_the_rename_is_finished_at_unlock() {
    use carecache::crypto::RootKey;
    use carecache::keysource::{SourceKind, create_key_file, write_key_file};
    let tmp = tempfile::tempdir().unwrap();
    let (data, key) = (tmp.path().join("data"), tmp.path().join("root.key"));
    let old = create_key_file(&key).unwrap();
    let store = Store::create(&data, &old, SourceKind::KeyFile, None).unwrap();
    let records = carecache_synth::Generator::new(83).patients(5);
    store.put_records(&records).unwrap();
    // The crash point: `KEY.new` written, the store rekeyed to it, the rename not done.
    let new = RootKey::random().unwrap();
    write_key_file(&key.with_extension("new"), &new).unwrap();
    store.rekey(&new, SourceKind::KeyFile, None).unwrap();
    drop(store);
    let before = std::fs::read(&key).unwrap();
    let root = unlock(&data, &KeySource::KeyFile(key.clone())).unwrap();
    let store = Store::open(&data, &root).expect("the key file opens the store");
    assert_eq!(store.records().unwrap().len(), 5);
    assert_ne!(
        std::fs::read(&key).unwrap(),
        before,
        "the new key moved into place"
    );
    assert!(!key.with_extension("new").exists());
    drop(store);
    // A `KEY.new` half-written before the store used it is ignored, and the next
    // rotation replaces it.
    std::fs::write(key.with_extension("new"), "not a key").unwrap();
    let root = unlock(&data, &KeySource::KeyFile(key.clone())).unwrap();
    Store::open(&data, &root).expect("the key file still opens the store");
    let (ok, out, err) = run_cli(&[
        "rekey",
        "--data-dir",
        data.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--new-key-file",
        key.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    let root = unlock(&data, &KeySource::KeyFile(key.clone())).unwrap();
    Store::open(&data, &root).expect("the rotated key opens the store");
}
