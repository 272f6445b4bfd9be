//! The encrypted store on a real redb file: nothing readable at rest, purge by
//! crypto-shredding, batches whole or not at all, and every bad input refused cleanly.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;

use aho_corasick::AhoCorasick;
use carecache::crypto::RootKey;
use carecache::keysource::{KdfParams, KeySource, Passphrase, SourceKind};
use carecache::store::{self, DATABASE_FILE, KEYRING_FILE, SLOT_LEN, Store, StoreError};
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sync_protocol::NhsNumber;
use sync_protocol::message::{LeaseChange, LeaseEndReason, ObjectionStatus};
use sync_protocol::record::{PatientRecord, Section};
use sync_protocol::types::LeaseId;

use crate::harness::{
    BatchBuilder, Fixture, copy_tree, lease, objection, populate, read_tree, snapshot,
};

/// Everything about a patient that must never be found in clear on disk.
fn needles(r: &PatientRecord) -> Vec<Vec<u8>> {
    let nhs = r.nhs_number;
    let mut out = vec![
        nhs.digits().into_bytes(),
        nhs.to_string().into_bytes(),
        nhs.as_u64().to_be_bytes().to_vec(),
        nhs.as_u64().to_le_bytes().to_vec(),
        r.demographics.name.family.as_str().as_bytes().to_vec(),
    ];
    if let Section::Entries(meds) = &r.medications {
        for m in meds.iter() {
            out.push(m.medicine.display.as_str().as_bytes().to_vec());
        }
    }
    out
}

#[test]
fn thousand_patients_leave_no_plaintext_in_the_data_directory() {
    let (fx, store) = Fixture::new();
    let records = populate(&store, 11, 1000);
    // Objections for a few patients are kept (sealed) after their records are purged.
    let objected: Vec<_> = records.iter().take(5).map(|r| r.nhs_number).collect();
    let b = BatchBuilder {
        objections: objected
            .iter()
            .map(|n| objection(*n, ObjectionStatus::Objected))
            .collect(),
        cursor: 99,
        ..Default::default()
    };
    store.apply_batch(&b.build()).unwrap();
    // The records really are there: the scan below would be meaningless on an empty store.
    assert_eq!(store.stats().unwrap().patients, 995);
    let back = store.record(&records[500].nhs_number).unwrap().unwrap();
    assert_eq!(back, records[500]);
    assert!(store.objected(&objected[0]).unwrap());
    drop(store);

    let mut patterns = Vec::new();
    let mut owner = Vec::new();
    for (i, r) in records.iter().enumerate() {
        for mut n in needles(r) {
            // A text under 4 bytes would match random ciphertext by chance; search for it as
            // postcard would store it in clear, after its length byte.
            if n.len() < 4 {
                n.insert(0, u8::try_from(n.len()).unwrap());
            }
            patterns.push(n);
            owner.push(i);
        }
    }
    assert!(patterns.len() > 5000, "{} patterns", patterns.len());
    let ac = AhoCorasick::new(&patterns).unwrap();
    let files = read_tree(&fx.data);
    assert!(files.contains_key(&fx.data.join(DATABASE_FILE)));
    assert!(files.contains_key(&fx.data.join(KEYRING_FILE)));
    let scanned: usize = files.values().map(Vec::len).sum();
    let mut hits = Vec::new();
    for (path, bytes) in &files {
        for m in ac.find_overlapping_iter(bytes) {
            hits.push(format!(
                "{} at {}: pattern of patient {}",
                path.display(),
                m.start(),
                owner[m.pattern().as_usize()]
            ));
        }
    }
    assert!(hits.is_empty(), "plaintext found: {hits:#?}");
    assert!(scanned > 1000 * 1000, "scanned only {scanned} bytes");
}

#[test]
fn purged_records_do_not_open_with_any_key_still_reachable() {
    let (fx, store) = Fixture::new();
    let records = populate(&store, 12, 400);
    let (purged, kept) = records.split_at(100);

    // Before the purge: each purged record's sealed value, its AD, and its wrapped key slot.
    let mut sealed = Vec::new();
    let mut slots = Vec::new();
    for r in purged {
        sealed.push(store.raw_record(&r.nhs_number).unwrap().unwrap());
        slots.push(store.raw_key_slot(&r.nhs_number).unwrap().unwrap());
    }
    let control = store.raw_record(&kept[0].nhs_number).unwrap().unwrap();

    // Half purged directly, half through objections in a sync batch.
    let (direct, by_objection) = purged.split_at(50);
    let direct: Vec<_> = direct.iter().map(|r| r.nhs_number).collect();
    assert_eq!(store.purge_patients(&direct).unwrap(), 50);
    let b = BatchBuilder {
        objections: by_objection
            .iter()
            .map(|r| objection(r.nhs_number, ObjectionStatus::Objected))
            .collect(),
        cursor: 50,
        ..Default::default()
    };
    assert_eq!(store.apply_batch(&b.build()).unwrap().purged, 50);
    for r in purged {
        assert!(store.record(&r.nhs_number).unwrap().is_none());
    }
    drop(store);

    // An attacker's copy of the data directory, opened with the device's own root key.
    let copy = fx.tmp.path().join("copy");
    copy_tree(&fx.data, &copy);
    let stolen = Store::open(&copy, &fx.root).unwrap();
    assert_eq!(stolen.stats().unwrap().patients, 300);
    let keys = stolen.dangerous_reachable_keys().unwrap();
    assert_eq!(
        keys.len(),
        5 + 300 + 1,
        "master, 4 subkeys, 300 patients, 1 lease"
    );
    drop(stolen);
    let files = read_tree(&copy);

    // No copy of a destroyed wrapped key survives anywhere, free pages included.
    let wrapped: Vec<&[u8]> = slots.iter().map(|s| &s[8..]).collect();
    let ac = AhoCorasick::new(&wrapped).unwrap();
    for (path, bytes) in &files {
        assert!(
            ac.find_iter(bytes).next().is_none(),
            "a destroyed wrapped key survives in {}",
            path.display()
        );
    }

    // Every place a purged record's nonce occurs is a candidate; try every reachable key.
    let try_open = |key: &[u8; 32], candidate: &[u8], ad: &[u8]| {
        let (nonce, rest) = candidate.split_at(24);
        let (body, tag) = rest.split_at(rest.len() - 16);
        let mut body = body.to_vec();
        let nonce: [u8; 24] = nonce.try_into().unwrap();
        let tag: [u8; 16] = tag.try_into().unwrap();
        XChaCha20Poly1305::new(&(*key).into())
            .decrypt_inout_detached(
                &XNonce::from(nonce),
                ad,
                body.as_mut_slice().into(),
                &tag.into(),
            )
            .is_ok()
    };
    let nonces: Vec<&[u8]> = sealed.iter().map(|s| &s.sealed[..24]).collect();
    let ac = AhoCorasick::new(&nonces).unwrap();
    let mut candidates = 0;
    for bytes in files.values() {
        for m in ac.find_overlapping_iter(bytes) {
            let s = &sealed[m.pattern().as_usize()];
            let Some(candidate) = bytes.get(m.start()..m.start() + s.sealed.len()) else {
                continue;
            };
            candidates += 1;
            for key in &keys {
                assert!(
                    !try_open(key, candidate, &s.ad),
                    "a purged record opened with a reachable key"
                );
            }
        }
    }
    // redb is copy-on-write: purged ciphertext does linger in free pages. The test only
    // means something if it found some, and the control shows the search would open them.
    assert!(candidates > 0, "no purged ciphertext found to attack");
    let control_found = files.values().any(|bytes| {
        AhoCorasick::new([&control.sealed[..24]])
            .unwrap()
            .find_iter(bytes)
            .any(|m| {
                bytes
                    .get(m.start()..m.start() + control.sealed.len())
                    .is_some_and(|c| keys.iter().any(|k| try_open(k, c, &control.ad)))
            })
    });
    assert!(control_found, "the search cannot open even a live record");
    eprintln!(
        "purge attack: {candidates} candidates × {} keys, none opened",
        keys.len()
    );
}

#[test]
fn wrong_key_is_refused_and_nothing_is_written() {
    let (fx, store) = Fixture::new();
    populate(&store, 13, 20);
    drop(store);
    let before = snapshot(&fx.data);
    let err = Store::open(&fx.data, &RootKey::random().unwrap()).unwrap_err();
    assert!(
        matches!(err, StoreError::WrongKey(SourceKind::KeyFile)),
        "{err}"
    );
    assert!(err.to_string().contains("does not open"), "{err}");
    assert_eq!(before, snapshot(&fx.data), "files changed by a wrong key");
    fx.open();
}

#[test]
fn wrong_passphrase_is_refused_and_the_right_one_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let params = KdfParams::new(KdfParams::MIN_MEMORY_KIB, 1).unwrap();
    let pass = Passphrase::new("a long enough passphrase".into());
    let root = params.derive(&pass).unwrap();
    let store = Store::create(&data, &root, SourceKind::Passphrase, Some(params)).unwrap();
    populate(&store, 14, 3);
    drop(store);
    let info = Store::lock_info(&data).unwrap();
    assert_eq!(info.slots.len(), 1);
    assert_eq!(info.slots[0].1, SourceKind::Passphrase);
    assert_eq!(
        info.slots[0].2,
        Some(params),
        "Argon2id parameters are stored"
    );

    let before = snapshot(&data);
    let wrong = KeySource::Passphrase(Passphrase::new("another long passphrase".into()));
    let root_wrong = store::unlock(&data, &wrong).unwrap();
    let err = Store::open(&data, &root_wrong).unwrap_err();
    assert!(
        matches!(err, StoreError::WrongKey(SourceKind::Passphrase)),
        "{err}"
    );
    assert!(err.to_string().contains("a passphrase"), "{err}");
    assert_eq!(before, snapshot(&data));

    let root = store::unlock(&data, &KeySource::Passphrase(pass)).unwrap();
    // Derived once; the store can be reopened with the same root key without Argon2id.
    for _ in 0..3 {
        assert_eq!(
            Store::open(&data, &root).unwrap().stats().unwrap().patients,
            3
        );
    }
}

#[test]
fn key_file_readable_by_others_is_refused_with_the_fix() {
    let (fx, store) = Fixture::new();
    drop(store);
    let key_path = fx.tmp.path().join("root.key");
    carecache::keysource::write_key_file(&key_path, &fx.root).unwrap();
    let source = KeySource::KeyFile(key_path.clone());
    assert!(store::unlock(&fx.data, &source).is_ok());
    fs::set_permissions(&key_path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = store::unlock(&fx.data, &source).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("readable by group or others"), "{msg}");
    assert!(
        msg.contains(&format!("chmod 600 {}", key_path.display())),
        "{msg}"
    );

    // A key file inside the data directory would travel with every copy of it.
    let inside = fx.data.join("root.key");
    carecache::keysource::write_key_file(&inside, &fx.root).unwrap();
    let err = store::unlock(&fx.data, &KeySource::KeyFile(inside)).unwrap_err();
    assert!(
        err.to_string().contains("inside the data directory"),
        "{err}"
    );
}

#[test]
fn ciphertext_moved_to_another_row_or_table_does_not_open() {
    let (fx, store) = Fixture::new();
    let records = populate(&store, 15, 3);
    let a = records[0].nhs_number;
    let sealed_a = store.raw_record(&a).unwrap().unwrap();
    drop(store);

    const PATIENTS: redb::TableDefinition<'_, [u8; 16], &[u8]> =
        redb::TableDefinition::new("patients");
    const OBJECTIONS: redb::TableDefinition<'_, [u8; 16], &[u8]> =
        redb::TableDefinition::new("objections");
    let db_path = fx.data.join(DATABASE_FILE);
    let rows: HashMap<Vec<u8>, ([u8; 16], Vec<u8>)> = {
        let db = redb::Database::open(&db_path).unwrap();
        let tx = redb::ReadableDatabase::begin_read(&db).unwrap();
        let t = tx.open_table(PATIENTS).unwrap();
        redb::ReadableTable::iter(&t)
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                let v = v.value().to_vec();
                (v[5 + 24..5 + 48].to_vec(), (k.value(), v))
            })
            .collect()
    };
    let (row_a, value_a) = rows
        .values()
        .find(|(_, v)| v[5..5 + 24] == sealed_a.sealed[..24])
        .cloned()
        .unwrap();
    let (row_b, value_b) = rows.values().find(|(k, _)| *k != row_a).cloned().unwrap();
    let with_slot = |v: &[u8], slot_from: &[u8]| [&slot_from[..4], &v[4..]].concat();
    {
        let db = redb::Database::open(&db_path).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut t = tx.open_table(PATIENTS).unwrap();
            // A's sealed record under B's row, keeping B's key slot: wrong AD and key.
            t.insert(row_b, with_slot(&value_a, &value_b).as_slice())
                .unwrap();
            // A's sealed record copied onto an objection row for A: another table.
            let mut o = tx.open_table(OBJECTIONS).unwrap();
            o.insert(row_a, &value_a[4..]).unwrap();
        }
        tx.commit().unwrap();
    }
    let store = fx.open();
    // Exactly one patient (B's row) now fails, and it fails as damage, not as A's data.
    let failures: Vec<(NhsNumber, StoreError)> = records
        .iter()
        .filter_map(|r| store.record(&r.nhs_number).err().map(|e| (r.nhs_number, e)))
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_ne!(failures[0].0, a);
    assert!(
        matches!(failures[0].1, StoreError::Damaged("patients")),
        "{:?}",
        failures[0].1
    );
    let err = store.objected(&a).unwrap_err();
    assert!(matches!(err, StoreError::Damaged("objections")), "{err}");
    // A's own row still opens: nothing else was disturbed.
    assert_eq!(store.record(&a).unwrap().unwrap(), records[0]);
}

#[test]
fn wrapped_key_copied_to_another_slot_does_not_open() {
    let (fx, store) = Fixture::new();
    let records = populate(&store, 16, 3);
    let slot_a = store.raw_key_slot(&records[0].nhs_number).unwrap().unwrap();
    let slot_b = store.raw_key_slot(&records[1].nhs_number).unwrap().unwrap();
    drop(store);
    let path = fx.data.join(KEYRING_FILE);
    let mut ring = fs::read(&path).unwrap();
    let at = ring
        .windows(SLOT_LEN)
        .position(|w| w == slot_b)
        .expect("slot B on disk");
    ring[at..at + SLOT_LEN].copy_from_slice(&slot_a);
    fs::write(&path, &ring).unwrap();
    let store = fx.open();
    let err = store.record(&records[1].nhs_number).unwrap_err();
    assert!(matches!(err, StoreError::KeyMissing), "{err}");
    assert_eq!(
        store.record(&records[0].nhs_number).unwrap().unwrap(),
        records[0]
    );
}

#[test]
fn unknown_future_schema_version_is_refused_untouched() {
    let (fx, store) = Fixture::new();
    populate(&store, 17, 3);
    drop(store);
    store::force_schema_version(&fx.data.join(DATABASE_FILE), store::SCHEMA_VERSION + 1).unwrap();
    let before = snapshot(&fx.data);
    let err = Store::open(&fx.data, &fx.root).unwrap_err();
    assert!(
        matches!(err, StoreError::NewerSchema { found, supported } if found == supported + 1),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade carecache"), "{err}");
    assert_eq!(before, snapshot(&fx.data));
}

#[test]
fn truncated_or_corrupted_database_gives_an_error_never_a_panic_or_wrong_data() {
    let (fx, store) = Fixture::new();
    let records = populate(&store, 18, 60);
    drop(store);
    let db_path = fx.data.join(DATABASE_FILE);
    let pristine = fs::read(&db_path).unwrap();
    let by_nhs: HashMap<NhsNumber, &PatientRecord> =
        records.iter().map(|r| (r.nhs_number, r)).collect();
    let mut outcomes: HashMap<&'static str, usize> = HashMap::new();

    let mut check = |bytes: &[u8], what: &str| {
        fs::write(&db_path, bytes).unwrap();
        let result = Store::open(&fx.data, &fx.root).and_then(|s| {
            let all = s.records()?;
            s.audit_entries(0, usize::MAX)?;
            Ok(all)
        });
        match result {
            Ok(all) => {
                // Whatever is read must be exactly what was written.
                for r in &all {
                    assert_eq!(Some(&r), by_nhs.get(&r.nhs_number), "{what}");
                }
                *outcomes.entry("read back correctly").or_default() += 1;
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.is_empty());
                for r in &records {
                    assert!(!msg.contains(&r.nhs_number.digits()), "{msg}");
                }
                *outcomes.entry("clear error").or_default() += 1;
            }
        }
    };
    for len in [0, 1, 100, 511, 4096, pristine.len() / 2, pristine.len() - 1] {
        check(&pristine[..len], &format!("truncated to {len}"));
    }
    let step = (pristine.len() / 97).max(1);
    for at in (0..pristine.len()).step_by(step) {
        let mut bytes = pristine.clone();
        for b in bytes.iter_mut().skip(at).take(16) {
            *b ^= 0x5A;
        }
        check(&bytes, &format!("corrupted at {at}"));
    }
    eprintln!("corruption outcomes: {outcomes:?}");
    assert!(outcomes.get("clear error").copied().unwrap_or(0) >= 7);
    // Restore and reopen: a good file still works.
    fs::write(&db_path, &pristine).unwrap();
    assert_eq!(fx.open().records().unwrap().len(), 60);
}

#[test]
fn corrupted_or_truncated_keyring_gives_a_clear_error() {
    let (fx, store) = Fixture::new();
    populate(&store, 19, 5);
    drop(store);
    let path = fx.data.join(KEYRING_FILE);
    let pristine = fs::read(&path).unwrap();
    for (what, bytes) in [
        ("truncated", pristine[..600].to_vec()),
        ("empty", Vec::new()),
        (
            "bad magic",
            [b"XXXXXXXX".as_slice(), &pristine[8..]].concat(),
        ),
        ("zeroed master slots", {
            let mut b = pristine.clone();
            b[512..1536].fill(0);
            b
        }),
    ] {
        fs::write(&path, &bytes).unwrap();
        let err = Store::open(&fx.data, &fx.root).unwrap_err();
        assert!(matches!(err, StoreError::Keyring(_)), "{what}: {err}");
    }
    let mut flipped = pristine.clone();
    flipped[600] ^= 1;
    fs::write(&path, &flipped).unwrap();
    assert!(matches!(
        Store::open(&fx.data, &fx.root),
        Err(StoreError::WrongKey(_))
    ));
    fs::write(&path, &pristine).unwrap();
    fx.open();
}

#[test]
fn batches_apply_whole_objections_win_and_lease_ends_purge_the_uncovered() {
    let (fx, store) = Fixture::new();
    let records = carecache_synth::Generator::new(20).patients(6);
    let n: Vec<NhsNumber> = records.iter().map(|r| r.nhs_number).collect();
    // Lease 1 holds patients 0-3, lease 2 holds 3-5: patient 3 is in both.
    let b = BatchBuilder {
        leases: vec![
            LeaseChange::Granted(lease(1, &n[0..4])),
            LeaseChange::Granted(lease(2, &n[3..6])),
        ],
        upserts: records.clone(),
        cursor: 1,
        ..Default::default()
    };
    let report = store.apply_batch(&b.build()).unwrap();
    assert_eq!((report.upserted, report.leases_written), (6, 2));
    assert_eq!(
        store.cursor().unwrap().unwrap().as_bytes(),
        1u64.to_be_bytes()
    );

    // An objection purges the patient and refuses their record in later batches.
    let b = BatchBuilder {
        objections: vec![objection(n[0], ObjectionStatus::Objected)],
        cursor: 2,
        ..Default::default()
    };
    assert_eq!(store.apply_batch(&b.build()).unwrap().purged, 1);
    assert!(store.record(&n[0]).unwrap().is_none());
    assert!(store.objected(&n[0]).unwrap());
    let slots_before = store.stats().unwrap().key_slots;
    let b = BatchBuilder {
        upserts: vec![records[0].clone(), records[1].clone()],
        cursor: 3,
        ..Default::default()
    };
    let err = store.apply_batch(&b.build()).unwrap_err();
    assert!(matches!(err, StoreError::Refused(_)), "{err}");
    // Nothing of the refused batch landed: no record, no cursor, no key slot.
    assert_eq!(
        store.cursor().unwrap().unwrap().as_bytes(),
        2u64.to_be_bytes()
    );
    assert!(store.record(&n[0]).unwrap().is_none());
    assert_eq!(store.stats().unwrap().key_slots, slots_before);

    // Withdrawn: the record may come back.
    let b = BatchBuilder {
        objections: vec![objection(n[0], ObjectionStatus::Withdrawn)],
        upserts: vec![records[0].clone()],
        cursor: 4,
        ..Default::default()
    };
    store.apply_batch(&b.build()).unwrap();
    assert_eq!(store.record(&n[0]).unwrap().unwrap(), records[0]);
    assert!(!store.objected(&n[0]).unwrap());

    // Revoking lease 1 purges 0-2 but keeps 3, which lease 2 still covers.
    let b = BatchBuilder {
        leases: vec![LeaseChange::Revoked {
            id: LeaseId(1),
            reason: LeaseEndReason::Revoked,
        }],
        cursor: 5,
        ..Default::default()
    };
    let report = store.apply_batch(&b.build()).unwrap();
    assert_eq!((report.leases_ended, report.purged), (1, 3));
    for (i, nhs) in n.iter().enumerate() {
        assert_eq!(store.record(nhs).unwrap().is_some(), i >= 3, "patient {i}");
    }
    // A changed lease that drops a patient purges them too.
    let b = BatchBuilder {
        leases: vec![LeaseChange::Changed(lease(2, &n[4..6]))],
        cursor: 6,
        ..Default::default()
    };
    assert_eq!(store.apply_batch(&b.build()).unwrap().purged, 1);
    assert!(store.record(&n[3]).unwrap().is_none());
    let leases = store.leases().unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].patients.len(), 2);
    assert_eq!(store.purge_lease(LeaseId(2)).unwrap(), 2);
    assert_eq!(store.stats().unwrap().patients, 0);
    assert_eq!(
        store.stats().unwrap().key_slots,
        0,
        "every data key destroyed"
    );
    drop(store);
    // State survives a reopen.
    let store = fx.open();
    assert!(store.leases().unwrap().is_empty());
    assert_eq!(
        store.cursor().unwrap().unwrap().as_bytes(),
        6u64.to_be_bytes()
    );
}

#[test]
fn audit_entries_survive_purges_and_rekey_and_leave_once_removed() {
    let (fx, store) = Fixture::new();
    let records = populate(&store, 21, 10);
    assert_eq!(store.purge_lease(LeaseId(1)).unwrap(), 10);
    let new_root = RootKey::random().unwrap();
    store.rekey(&new_root, SourceKind::KeyFile, None).unwrap();
    drop(store);
    let store = Store::open(&fx.data, &new_root).unwrap();
    let entries = store.audit_entries(0, 100).unwrap();
    assert_eq!(entries.len(), 10);
    sync_protocol::audit::verify_chain(&Default::default(), &entries).unwrap();
    let first = sync_protocol::audit::AuditRecord::decode(entries[0].record.as_slice()).unwrap();
    assert_eq!(first.access().unwrap().patient, Some(records[0].nhs_number));
    // A sequence number cannot be written twice.
    assert!(matches!(
        store.append_audit(&entries[3]),
        Err(StoreError::AuditSequence(4))
    ));
    assert_eq!(store.audit_backlog().unwrap().0, 10);
    assert_eq!(store.audit_acked().unwrap(), Default::default());
    // Acknowledging an entry the device does not hold is refused and changes nothing.
    assert!(matches!(
        store.acknowledge_audit(11),
        Err(StoreError::AuditSequence(11))
    ));
    assert_eq!(store.acknowledge_audit(4).unwrap(), 4);
    assert_eq!(
        store.acknowledge_audit(3).unwrap(),
        0,
        "an older ack changes nothing"
    );
    let acked = store.audit_acked().unwrap();
    assert_eq!((acked.seq, acked.hash), (4, entries[3].hash));
    let left = store.audit_entries(0, 100).unwrap();
    assert_eq!(left.first().map(|e| e.seq), Some(5));
    assert_eq!(store.stats().unwrap().audit_entries, 6);
    let (backlog, oldest) = store.audit_backlog().unwrap();
    let fifth = sync_protocol::audit::AuditRecord::decode(entries[4].record.as_slice()).unwrap();
    assert_eq!((backlog, oldest), (6, Some(fifth.at)));
    // What is left still links from the acknowledged head.
    sync_protocol::audit::verify_chain(&acked.hash, &left).unwrap();
    // The chain head outlives the entries: after all are removed the next one must still
    // link to the last written, and a gap or a fork is refused.
    assert_eq!(store.acknowledge_audit(10).unwrap(), 6);
    assert_eq!(store.audit_backlog().unwrap(), (0, None));
    assert_eq!(store.audit_head().unwrap().seq, 10);
    assert_eq!(store.audit_acked().unwrap().hash, entries[9].hash);
    let next = |prev, seq| {
        sync_protocol::audit::AuditEntry::seal(
            prev,
            seq,
            &crate::harness::audit_record(records[1].nhs_number),
        )
        .unwrap()
    };
    assert!(matches!(
        store.append_audit(&next(&entries[9].hash, 12)),
        Err(StoreError::AuditSequence(12))
    ));
    assert!(matches!(
        store.append_audit(&next(&entries[8].hash, 11)),
        Err(StoreError::AuditSequence(11))
    ));
    store.append_audit(&next(&entries[9].hash, 11)).unwrap();
    assert_eq!(store.audit_head().unwrap().seq, 11);
}

#[test]
fn rekey_old_key_stops_working_and_no_old_wrapping_survives() {
    let (fx, store) = Fixture::new();
    let records = populate(&store, 22, 5);
    drop(store);
    let ring_path = fx.data.join(KEYRING_FILE);
    let before = fs::read(&ring_path).unwrap();
    let store = fx.open();
    let new_root = RootKey::random().unwrap();
    store.rekey(&new_root, SourceKind::KeyFile, None).unwrap();
    drop(store);
    let after = fs::read(&ring_path).unwrap();
    // The old master slot (A) is now zero; the new one (B) holds the new wrapping.
    assert!(before[512..1024].iter().any(|&b| b != 0));
    assert!(after[512..1024].iter().all(|&b| b == 0));
    let old_wrapping = &before[512 + 44..512 + 116];
    for bytes in read_tree(&fx.data).values() {
        assert!(!bytes.windows(old_wrapping.len()).any(|w| w == old_wrapping));
    }
    assert!(matches!(
        Store::open(&fx.data, &fx.root),
        Err(StoreError::WrongKey(_))
    ));
    let store = Store::open(&fx.data, &new_root).unwrap();
    assert_eq!(
        store.record(&records[2].nhs_number).unwrap().unwrap(),
        records[2]
    );
    drop(store);

    // An interrupted rekey leaves both slots; the key presented decides, the other is cleared.
    let mut both = after.clone();
    both[512..1024].copy_from_slice(&before[512..1024]);
    for (key, cleared) in [(&fx.root, 1024..1536), (&new_root, 512..1024)] {
        fs::write(&ring_path, &both).unwrap();
        let store = Store::open(&fx.data, key).unwrap();
        assert_eq!(store.stats().unwrap().patients, 5);
        drop(store);
        let ring = fs::read(&ring_path).unwrap();
        assert!(ring[cleared].iter().all(|&b| b == 0));
    }
}

#[test]
fn orphan_key_slots_are_destroyed_at_open() {
    let (fx, store) = Fixture::new();
    let records = populate(&store, 23, 3);
    let slot = store.raw_key_slot(&records[0].nhs_number).unwrap().unwrap();
    let used = store.stats().unwrap().key_slots;
    drop(store);
    let path = fx.data.join(KEYRING_FILE);
    let live_at = fs::read(&path)
        .unwrap()
        .windows(SLOT_LEN)
        .position(|w| w == slot)
        .unwrap();
    let mut ring = fs::read(&path).unwrap();
    // A key written just before a crash that lost its commit: pending, no row refers to it.
    let orphan_at = 4096 + 500 * SLOT_LEN;
    ring[orphan_at..orphan_at + SLOT_LEN].copy_from_slice(&slot);
    ring[orphan_at] = 2;
    // A key whose purge committed just before a crash: dying, no row refers to it.
    let dying_at = 4096 + 501 * SLOT_LEN;
    ring[dying_at..dying_at + SLOT_LEN].copy_from_slice(&slot);
    ring[dying_at] = 3;
    // A live patient's key marked dying by a purge whose commit was lost: kept, live again.
    ring[live_at] = 3;
    fs::write(&path, &ring).unwrap();
    let store = fx.open();
    assert_eq!(store.stats().unwrap().key_slots, used);
    assert_eq!(
        store.record(&records[0].nhs_number).unwrap().unwrap(),
        records[0]
    );
    drop(store);
    let ring = fs::read(&path).unwrap();
    assert!(
        ring[orphan_at..orphan_at + SLOT_LEN]
            .iter()
            .all(|&b| b == 0)
    );
    assert!(ring[dying_at..dying_at + SLOT_LEN].iter().all(|&b| b == 0));
    assert_eq!(ring[live_at], 1);
}

#[test]
fn full_disk_fails_the_write_and_keeps_the_last_commit() {
    let (fx, store) = Fixture::new();
    let first = populate(&store, 24, 50);
    drop(store);
    let more = carecache_synth::Generator::new(25).patients(400);
    let nhs: Vec<NhsNumber> = first.iter().chain(&more).map(|r| r.nhs_number).collect();

    let backend = full_disk::Backend::open(&fx.data.join(DATABASE_FILE), 640 * 1024);
    let store = Store::open_with_backend(&fx.data, &fx.root, backend).unwrap();
    let mut committed = 0;
    let mut last_cursor = store.cursor().unwrap().unwrap();
    let mut failure = None;
    for (i, chunk) in more.chunks(50).enumerate() {
        let leases = vec![LeaseChange::Changed(lease(1, &nhs))];
        let b = BatchBuilder {
            leases: if i == 0 { leases } else { vec![] },
            upserts: chunk.to_vec(),
            cursor: 100 + i as u64,
            ..Default::default()
        };
        match store.apply_batch(&b.build()) {
            Ok(_) => {
                committed += chunk.len();
                last_cursor = store.cursor().unwrap().unwrap();
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let err = failure.expect("the disk never filled");
    assert!(committed > 0, "no batch fitted before the disk filled");
    assert!(err.is_disk_full(), "{err}");
    assert!(err.to_string().contains("disk is full"), "{err}");
    drop(store);

    let store = fx.open();
    let held = usize::try_from(store.stats().unwrap().patients).unwrap();
    assert_eq!(held, 50 + committed, "only whole batches are held");
    assert_eq!(
        store.cursor().unwrap().unwrap(),
        last_cursor,
        "the cursor is the last committed batch's"
    );
    for r in first.iter().chain(&more[..committed]) {
        assert_eq!(store.record(&r.nhs_number).unwrap().as_ref(), Some(r));
    }
    // The keys written for the failed batch were released; every used slot has an owner.
    assert_eq!(store.stats().unwrap().key_slots, held + 1);
}

/// A redb storage backend over a real file that reports ENOSPC once the file would grow
/// past a byte limit: a full disk without needing to mount one.
mod full_disk {
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    #[derive(Debug)]
    pub(super) struct Backend {
        file: File,
        limit: u64,
    }

    impl Backend {
        pub(super) fn open(path: &Path, headroom: u64) -> Backend {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap();
            let limit = file.metadata().unwrap().len() + headroom;
            Backend { file, limit }
        }
    }

    fn full() -> io::Error {
        io::Error::from_raw_os_error(28)
    }

    impl redb::StorageBackend for Backend {
        fn len(&self) -> Result<u64, io::Error> {
            Ok(self.file.metadata()?.len())
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
            self.file.read_exact_at(out, offset)
        }
        fn set_len(&self, len: u64) -> Result<(), io::Error> {
            if len > self.limit {
                return Err(full());
            }
            self.file.set_len(len)
        }
        fn sync_data(&self) -> Result<(), io::Error> {
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
            if offset + data.len() as u64 > self.limit {
                return Err(full());
            }
            self.file.write_all_at(data, offset)
        }
    }
}

#[test]
fn not_initialised_and_already_initialised_are_clear() {
    let (fx, store) = Fixture::new();
    drop(store);
    let err = Store::create(&fx.data, &fx.root, SourceKind::KeyFile, None).unwrap_err();
    assert!(
        err.to_string().contains("already holds a carecache store"),
        "{err}"
    );
    let empty = fx.tmp.path().join("empty");
    let err = Store::open(&empty, &fx.root).unwrap_err();
    assert!(err.to_string().contains("carecache init"), "{err}");
    // The database of one store with the keyring of another is refused.
    let (other, s2) = Fixture::new();
    drop(s2);
    fs::copy(other.data.join(KEYRING_FILE), fx.data.join(KEYRING_FILE)).unwrap();
    assert!(matches!(
        Store::open(&fx.data, &other.root),
        Err(StoreError::StoreMismatch)
    ));
}

#[test]
fn concurrent_reads_never_go_back_in_time_across_commits() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use sync_protocol::types::RecordVersion;
    let (_fx, store) = Fixture::new();
    let records = populate(&store, 26, 20);
    let store = Arc::new(store);
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|t| {
            let (store, done, records) = (Arc::clone(&store), Arc::clone(&done), records.clone());
            std::thread::spawn(move || {
                let mut seen = vec![0u64; records.len()];
                let mut reads = 0;
                while !done.load(Ordering::Acquire) || reads < 100 {
                    let i = (reads * 7 + t) % records.len();
                    let r = store.record(&records[i].nhs_number).unwrap().unwrap();
                    assert!(r.version.0 >= seen[i], "a read went back in time");
                    seen[i] = r.version.0;
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for round in 1..=30u64 {
        let mut batch: Vec<PatientRecord> = records.clone();
        for r in &mut batch {
            r.version = RecordVersion(1000 + round);
        }
        store.put_records(&batch).unwrap();
        // Once a commit returns, every read sees it.
        let r = store
            .record(&records[(round % 20) as usize].nhs_number)
            .unwrap()
            .unwrap();
        assert_eq!(r.version.0, 1000 + round);
    }
    done.store(true, Ordering::Release);
    for r in readers {
        assert!(r.join().unwrap() >= 100);
    }
}

/// Regression: lease coverage was computed through the store's own keyring lock while the
/// write transaction held it; after a reopen (no cached lease keys) revoking a lease hung.
#[test]
fn revoking_a_lease_after_reopen_purges_without_deadlock() {
    let (fx, store) = Fixture::new();
    let records = carecache_synth::Generator::new(27).patients(4);
    let n: Vec<NhsNumber> = records.iter().map(|r| r.nhs_number).collect();
    let b = BatchBuilder {
        leases: vec![
            LeaseChange::Granted(lease(1, &n[0..2])),
            LeaseChange::Granted(lease(2, &n[1..4])),
        ],
        upserts: records.clone(),
        cursor: 1,
        ..Default::default()
    };
    store.apply_batch(&b.build()).unwrap();
    drop(store);
    let store = fx.open();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(store.purge_lease(LeaseId(1)).map(|p| (p, store)));
    });
    let (purged, store) = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("purge_lease hung")
        .unwrap();
    assert_eq!(purged, 1, "patient 1 is still covered by lease 2");
    assert!(store.record(&n[0]).unwrap().is_none());
    assert!(store.record(&n[1]).unwrap().is_some());
}

/// Schema 5 compresses a record before sealing it: what is stored is well under the
/// record's own encoding, and reads back whole.
#[test]
fn records_are_stored_compressed_and_read_back_whole() {
    let (_fx, store) = Fixture::new();
    let records = populate(&store, 23, 200);
    let mut plain = 0usize;
    let mut stored = 0usize;
    for r in &records {
        plain += postcard::to_allocvec(r).unwrap().len();
        stored += store
            .raw_record(&r.nhs_number)
            .unwrap()
            .unwrap()
            .sealed
            .len();
        assert_eq!(store.record(&r.nhs_number).unwrap().as_ref(), Some(r));
    }
    assert!(
        stored * 10 < plain * 8,
        "sealed {stored} B for {plain} B of records: not compressed"
    );
}

/// The unwrapped keys a reader keeps in memory are bounded and leave with their patient:
/// a purged patient's key is gone from the cache (and its slot destroyed), a lease end
/// takes its patients' keys, and a reopened store starts with none.
#[test]
fn cached_keys_leave_with_a_purged_patient() {
    let (fx, store) = Fixture::new();
    let records = populate(&store, 29, 300);
    assert_eq!(store.cached_keys(), 0, "a sync does not fill the cache");
    let slots: Vec<u32> = records
        .iter()
        .map(|r| {
            store.record(&r.nhs_number).unwrap().unwrap();
            store.key_slot(&r.nhs_number).unwrap().unwrap()
        })
        .collect();
    assert!(slots.iter().all(|&s| store.key_cached(s)));
    let held = store.cached_keys();
    assert!(held >= 300, "{held}");

    let gone = records[7].nhs_number;
    assert_eq!(store.purge_patients(&[gone]).unwrap(), 1);
    assert!(
        !store.key_cached(slots[7]),
        "the purged patient's key is still held"
    );
    assert!(store.key_cached(slots[8]));
    assert_eq!(store.cached_keys(), held - 1);

    assert!(store.purge_lease(LeaseId(1)).unwrap() > 0);
    assert_eq!(store.cached_keys(), 0, "keys outlived the lease's end");
    drop(store);
    assert_eq!(fx.open().cached_keys(), 0);
}
