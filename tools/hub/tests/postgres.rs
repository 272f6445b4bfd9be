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

/// A database made by the first PostgreSQL hub (schema version 1) with a change log and
/// audit in it: the newer hub migrates it at start — the log partitioned by sequence
/// range, audit by month — and reads everything as before. Retention then drops whole
/// months: never one holding audit not yet forwarded upstream, and the chain still
/// verifies from the oldest entry kept; change-log partitions emptied by compaction go
/// too, the head's and any holding entries stay.
#[test]
fn a_schema_1_database_is_partitioned_and_retention_drops_whole_months() {
    use carecache_hub::testing::postgres_schema_v1;
    use sync_protocol::message::PushAudit;
    use sync_protocol::types::BoundedVec;

    let cluster = PgCluster::start();
    postgres_schema_v1(&cluster.url(), "old");
    let hub = TestHub::start(10);
    let entries = chain(15, &hub);
    let patient = hub.patients[1].nhs_number().as_u64();
    let mut sql = postgres::Client::connect(&cluster.url(), postgres::NoTls).unwrap();
    // January 2025, by the entries' own time.
    let january = 1_736_899_200_000_i64;
    for e in &entries[..12] {
        let mut row = e.hash.0.to_vec();
        row.extend_from_slice(e.record.as_slice());
        let seq = e.seq as i64;
        sql.execute(
            "INSERT INTO old.audit (device, seq, at, emergency, entry) VALUES ('dev-old', $1, $2, false, $3)",
            &[&seq, &(january + seq), &row],
        )
        .unwrap();
        if e.seq % 10 == 1 {
            sql.execute(
                "INSERT INTO old.audit_by_patient VALUES ($1, 'dev-old', $2)",
                &[&(patient as i64), &seq],
            )
            .unwrap();
        }
    }
    let head = carecache_hub::audit::ChainHead {
        seq: 12,
        hash: entries[11].hash.0,
        ..Default::default()
    };
    sql.execute(
        "INSERT INTO old.audit_heads VALUES ('dev-old', $1)",
        &[&head.encode()],
    )
    .unwrap();
    for seq in 1..=5_i64 {
        sql.execute("INSERT INTO old.log VALUES ($1, '\\x00')", &[&seq])
            .unwrap();
    }
    sql.execute("UPDATE old.head SET seq = 5", &[]).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let state = HubState::open_postgres(&on(&cluster, "old"), dir.path()).unwrap();
    let version: i32 = sql
        .query_one("SELECT version FROM old.schema_version", &[])
        .unwrap()
        .get(0);
    assert_eq!(version, 2);
    let partitions = |sql: &mut postgres::Client, parent: &str| -> Vec<String> {
        sql.query(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace \
             WHERE n.nspname = 'old' AND p.relname = $1 ORDER BY 1",
            &[&parent],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let audit_parts = partitions(&mut sql, "audit");
    assert!(
        audit_parts.contains(&"audit_202501".to_owned()),
        "{audit_parts:?}"
    );
    assert!(partitions(&mut sql, "log").contains(&"log_0".to_owned()));
    let log_rows: i64 = sql
        .query_one("SELECT count(*) FROM old.log", &[])
        .unwrap()
        .get(0);
    assert_eq!(log_rows, 5, "the change log moved whole");
    assert_eq!(state.for_each_audit(|_| Ok(())).unwrap(), 12);
    assert_eq!(state.verify_audit_chain("dev-old").unwrap(), Ok(12));
    let nhs = sync_protocol::NhsNumber::from_u64(patient).unwrap();
    assert_eq!(state.for_each_patient_access(nhs, |_| Ok(())).unwrap(), 2);

    // New entries go to this month's partition.
    let push = PushAudit::new(
        entries[11].hash,
        BoundedVec::try_from(entries[12..].to_vec()).unwrap(),
    )
    .unwrap();
    assert_eq!(state.push_audit("dev-old", &push).unwrap().durable, 15);

    // January is old enough, but not forwarded yet: kept.
    let done = state.retain(1, true).unwrap();
    assert_eq!(done.kept_unforwarded, [202501]);
    assert!(done.audit_months.is_empty());
    assert_eq!(state.for_each_audit(|_| Ok(())).unwrap(), 15);
    // Forwarded through 12: January goes, this month stays.
    state
        .set_forwarded(&[("dev-old", 12)].into_iter().collect())
        .unwrap();
    let done = state.retain(1, true).unwrap();
    assert_eq!(
        (done.audit_months.as_slice(), done.audit_entries),
        ([202501].as_slice(), 12)
    );
    assert!(!partitions(&mut sql, "audit").contains(&"audit_202501".to_owned()));
    assert!(
        !partitions(&mut sql, "audit_by_patient").contains(&"audit_by_patient_202501".to_owned())
    );
    assert_eq!(state.for_each_audit(|_| Ok(())).unwrap(), 3);
    assert_eq!(
        state.verify_audit_chain("dev-old").unwrap(),
        Ok(15),
        "from the oldest kept"
    );
    assert_eq!(state.for_each_patient_access(nhs, |_| Ok(())).unwrap(), 0);

    // The change log three partitions on: the empty ones below the head's go, the one
    // still holding entries stays, the head's and those ahead are made and kept.
    sql.execute("UPDATE old.head SET seq = 3 * 1048576 + 7", &[])
        .unwrap();
    state.maintain().unwrap();
    let done = state.retain(1, true).unwrap();
    assert_eq!(done.log_partitions, [1, 2]);
    let logs = partitions(&mut sql, "log");
    for kept in ["log_0", "log_3", "log_4", "log_5", "log_default"] {
        assert!(logs.contains(&kept.to_owned()), "{kept}: {logs:?}");
    }

    // redb keeps its audit: retention is refused with a message.
    let redb = HubState::open(&dir.path().join("hub.redb")).unwrap();
    let err = redb.retain(1, false).unwrap_err().to_string();
    assert!(err.contains("redb"), "{err}");
}
