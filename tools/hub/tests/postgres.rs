//! Several hub instances on one PostgreSQL database (a throwaway cluster of Debian's
//! `postgresql`, started by each test): a device moves between instances mid-sync and
//! ends with nothing lost or sent twice; an instance killed mid-ingest is taken over by
//! another, equal to a clean ingest; hubs ride out a database restart; audit resent to
//! both instances is stored once.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use carecache_hub::source::ingest_ndjson;
use carecache_hub::state::{HubState, INGEST_BATCH, PgOptions};
use carecache_hub::testing::{PgCluster, normalised, postgres_toml, synthetic_rules};
use carecache_synth::Generator;
use sync_protocol::message::{Batch, Message, ObjectionStatus};

use crate::audit::{chain, prev_of, push};
use crate::harness::{Model, TestDevice, TestHub, lease_json};

const MIN_BUDGET: u32 = 262_144;

fn on(cluster: &PgCluster, schema: &str) -> PgOptions {
    PgOptions {
        url: cluster.url(),
        schema: schema.to_owned(),
        pool_size: 4,
        ca_file: None,
    }
}

/// `device`, speaking to `hub` instead (the same certificate: the instances share a CA).
fn via(device: &TestDevice, hub: &TestHub) -> TestDevice {
    TestDevice {
        id: device.id.clone(),
        agent: device.agent.clone(),
        base: hub.url(""),
        cert_der: device.cert_der.clone(),
        key_pem: device.key_pem.clone(),
    }
}

fn batch(answer: (u16, Message)) -> Batch {
    match answer {
        (200, Message::Batch(b)) => b,
        other => panic!("pull answered {other:?}"),
    }
}

#[test]
fn a_device_moving_between_instances_mid_sync_ends_with_every_record_once() {
    let cluster = PgCluster::start();
    let a = TestHub::start_on(1200, &on(&cluster, "region"));
    let b = a.another_instance();
    let device = a.enrol(None);
    let all = a.all_nhs();
    a.grant(lease_json(&device.id, &all));

    // Two batches from instance a, then a stops (its process gone, a request in
    // flight or not); the device carries on from its cursor on instance b.
    let mut model = Model::default();
    let mut sent: BTreeMap<u64, u32> = BTreeMap::new();
    let mut cursor = None;
    for _ in 0..2 {
        let b = batch(device.pull(cursor.as_ref(), MIN_BUDGET));
        assert!(b.more, "the caseload takes more than two batches");
        for r in &b.upserts {
            *sent.entry(r.nhs_number.as_u64()).or_default() += 1;
        }
        model.apply(&b);
        cursor = Some(b.next_cursor.clone());
    }
    drop(a.close());
    let moved = via(&device, &b);
    let rest = moved.pull_all(cursor.as_ref(), MIN_BUDGET);
    for batch in &rest {
        for r in &batch.upserts {
            *sent.entry(r.nhs_number.as_u64()).or_default() += 1;
        }
        model.apply(batch);
    }
    let last = rest.last().unwrap();
    assert!(!last.more);
    assert_eq!(
        model.digest(),
        last.allowed,
        "the device holds the allowed set"
    );
    let shown: BTreeSet<u64> = b
        .patients
        .iter()
        .map(|p| p.nhs_number())
        .filter(|n| {
            b.hub.state.record(n).unwrap().is_some()
                && b.hub.state.objection(n).unwrap() != Some(ObjectionStatus::Objected)
        })
        .map(|n| n.as_u64())
        .collect();
    assert!(shown.len() > 1000, "most of the caseload is shown");
    assert_eq!(
        model.records.keys().copied().collect::<BTreeSet<u64>>(),
        shown,
        "nothing lost"
    );
    assert!(
        sent.values().all(|&n| n == 1),
        "no record sent twice: {:?}",
        sent.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    // Both instances issue and accept each other's cursors: b answers a's settled cursor
    // with nothing new.
    let again = moved.pull_all(Some(&last.next_cursor), MIN_BUDGET);
    assert!(
        again
            .iter()
            .all(|b| b.upserts.is_empty() && b.removals.is_empty())
    );
}

#[test]
fn audit_resent_to_both_instances_at_once_is_stored_once() {
    let cluster = PgCluster::start();
    let a = TestHub::start_on(20, &on(&cluster, "region"));
    let b = a.another_instance();
    let device = a.enrol(None);
    let on_b = via(&device, &b);
    let entries = chain(40, &a);

    // The same 25 entries to both instances at the same moment (a lost acknowledgement
    // and a device that moved): each answers 25 durable, and they are held once.
    let (first, second) = std::thread::scope(|s| {
        let one = s.spawn(|| push(&device, &entries[..25], prev_of(&entries, 0)));
        let two = s.spawn(|| push(&on_b, &entries[..25], prev_of(&entries, 0)));
        (one.join().unwrap(), two.join().unwrap())
    });
    for (status, msg) in [first, second] {
        assert_eq!(status, 200, "{msg:?}");
        assert!(
            matches!(&msg, Message::AuditAck(ack) if ack.durable_through == 25),
            "{msg:?}"
        );
    }
    // The rest to b, overlapping what a stored.
    let (status, msg) = push(&on_b, &entries[20..], prev_of(&entries, 20));
    assert_eq!(status, 200, "{msg:?}");
    assert!(matches!(&msg, Message::AuditAck(ack) if ack.durable_through == 40));
    let mut seqs = Vec::new();
    b.hub
        .state
        .for_each_audit(|e| {
            seqs.push(e.seq);
            Ok(())
        })
        .unwrap();
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>(), "every entry once");
    assert_eq!(a.hub.state.verify_audit_chain(&device.id).unwrap(), Ok(40));
}

#[test]
fn hubs_ride_out_a_database_restart_without_an_operator() {
    let cluster = PgCluster::start();
    let hub = TestHub::start_on(200, &on(&cluster, "region"));
    let device = hub.enrol(None);
    let all = hub.all_nhs();
    hub.grant(lease_json(&device.id, &all));
    let before = device.pull_all(None, MIN_BUDGET);

    // The database stops as if it crashed, under a device pulling; it comes back.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (answers, after) = std::thread::scope(|s| {
        let puller = s.spawn(|| {
            let mut answers: BTreeMap<u16, u32> = BTreeMap::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (status, _) = device.pull(None, MIN_BUDGET);
                *answers.entry(status).or_default() += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            answers
        });
        std::thread::sleep(Duration::from_millis(300));
        cluster.stop();
        std::thread::sleep(Duration::from_secs(2));
        cluster.start_again();
        // Served again by the same hub process, within a bounded wait.
        let deadline = Instant::now() + Duration::from_secs(60);
        let after = loop {
            let (status, msg) = device.pull(None, MIN_BUDGET);
            if status == 200 {
                break msg;
            }
            assert!(
                Instant::now() < deadline,
                "the hub did not recover: {status} {msg:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        (puller.join().unwrap(), after)
    });
    assert!(matches!(after, Message::Batch(_)));
    assert!(
        answers.keys().all(|s| *s == 200 || *s >= 500),
        "an outage is a server error, never a client one: {answers:?}"
    );
    // And the whole sync again equals the one before the outage.
    let again = device.pull_all(None, MIN_BUDGET);
    let digest = |bs: &[Batch]| bs.last().unwrap().allowed;
    assert_eq!(digest(&again), digest(&before));
}

#[test]
fn an_instance_killed_mid_ingest_is_taken_over_and_equals_a_clean_ingest() {
    let cluster = PgCluster::start();
    let n = 5 * INGEST_BATCH;
    let dir = tempfile::tempdir().unwrap();
    let nd = dir.path().join("ndjson");
    let patients = Generator::new(12).source_patients(n);
    carecache_synth::fhir::write_ndjson(&patients, &nd).unwrap();
    carecache_hub::pki::dev_ca(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let sharing = carecache_hub::testing::sharing_toml(dir.path());
    let store = postgres_toml(&cluster.url(), "region");
    // Two instances' configurations: their own data directories, one database.
    let config = |name: &str| {
        let inst = dir.path().join(name);
        carecache_hub::testing::copy_pki(dir.path(), &inst);
        carecache_hub::testing::write_hub_toml_on(&inst, &inst.join("data"), &nd, &store, &sharing)
    };
    let ingest = |config: &Path| {
        Command::new(env!("CARGO_BIN_EXE_carecache-hub"))
            .args(["ingest", "--config"])
            .arg(config)
            .env("RUST_LOG", "carecache_hub=debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (config_a, config_b) = (config("a"), config("b"));

    let mut a = ingest(&config_a);
    let a_log = std::io::BufReader::new(a.stderr.take().unwrap());
    let mut b: Option<std::process::Child> = None;
    let mut batches = 0;
    for line in a_log.lines() {
        if line.unwrap().contains("ingest batch stored") {
            batches += 1;
            if batches == 1 {
                // Instance b asks to ingest while a holds the lock: it waits.
                b = Some(ingest(&config_b));
            }
            if batches == 2 {
                break;
            }
        }
    }
    let mut b = b.unwrap();
    assert!(
        b.try_wait().unwrap().is_none(),
        "b waits while a ingests (one ingest at a time)"
    );
    a.kill().unwrap();
    assert!(!a.wait().unwrap().success());
    // The lock went with a's connection: b takes over and completes.
    let out = b.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stored = &summary["stored"];
    let partial = stored["unchanged"].as_u64().unwrap();
    assert!(
        partial >= 2 * INGEST_BATCH as u64 && partial < n as u64,
        "a was killed with {partial} of {n} patients stored: {summary}"
    );
    assert_eq!(stored["added"].as_u64().unwrap(), n as u64 - partial);

    let taken_over = HubState::open_postgres(&on(&cluster, "region"), dir.path()).unwrap();
    let clean = HubState::open_postgres(&on(&cluster, "clean"), dir.path()).unwrap();
    ingest_ndjson(&clean, &synthetic_rules(), &nd).unwrap();
    assert_eq!(clean.counts().unwrap(), taken_over.counts().unwrap());
    for p in &patients {
        let nhs = p.nhs_number();
        assert_eq!(
            taken_over.record(&nhs).unwrap().map(normalised),
            clean.record(&nhs).unwrap().map(normalised)
        );
        assert_eq!(
            taken_over.objection(&nhs).unwrap(),
            clean.objection(&nhs).unwrap()
        );
    }
}

#[test]
fn a_database_migrated_by_a_newer_hub_is_refused_with_a_message() {
    let cluster = PgCluster::start();
    let opts = on(&cluster, "region");
    drop(HubState::open_postgres(&opts, Path::new("/tmp")).unwrap());
    let mut client = postgres::Client::connect(&cluster.url(), postgres::NoTls).unwrap();
    client
        .batch_execute("UPDATE region.schema_version SET version = version + 1")
        .unwrap();
    let err = HubState::open_postgres(&opts, Path::new("/tmp")).unwrap_err();
    assert!(err.to_string().contains("newer than this hub"), "{err}");
    // A wrong address is an error naming the pool, not a hang or a panic.
    let wrong = PgOptions {
        url: "postgresql://postgres@127.0.0.1:1/postgres?connect_timeout=2".into(),
        ..opts
    };
    let err = HubState::open_postgres(&wrong, Path::new("/tmp")).unwrap_err();
    assert!(err.to_string().contains("postgres"), "{err}");
}

#[test]
fn tls_to_the_database_is_verified_against_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ours = carecache_hub::pki::dev_ca(&dir.path().join("db"), &["127.0.0.1".into()]).unwrap();
    let other =
        carecache_hub::pki::dev_ca(&dir.path().join("other"), &["127.0.0.1".into()]).unwrap();
    let cluster = PgCluster::start_tls(&ours.hub_cert, &ours.hub_key);
    let tls = |ca: Option<&Path>| PgOptions {
        url: format!("{}?sslmode=require", cluster.url()),
        schema: "region".into(),
        pool_size: 2,
        ca_file: ca.map(Path::to_path_buf),
    };
    let state = HubState::open_postgres(&tls(Some(&ours.ca_cert)), dir.path()).unwrap();
    assert_eq!(state.head().unwrap(), 0, "served over TLS");
    drop(state);
    for (ca, why) in [
        (None, "no CA configured"),
        (Some(other.ca_cert.as_path()), "another CA"),
    ] {
        let err = HubState::open_postgres(&tls(ca), dir.path()).unwrap_err();
        assert!(err.to_string().contains("postgres"), "{why}: {err}");
    }
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let err = HubState::open_postgres(&tls(Some(&garbage)), dir.path()).unwrap_err();
    assert!(err.to_string().contains("store.ca_file"), "{err}");
}
