//! Shared test harness: isolated data directories, synthetic batches, file scanning.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use carecache::crypto::RootKey;
use carecache::keysource::SourceKind;
use carecache::store::Store;
use carecache_synth::Generator;
use sync_protocol::NhsNumber;
use sync_protocol::audit::{
    Access, AuditAction, AuditEntry, AuditEvent, AuditOutcome, AuditRecord, Purpose,
};
use sync_protocol::digest::allowed_set_digest;
use sync_protocol::message::{
    Audience, Batch, Lease, LeaseChange, ObjectionChange, ObjectionStatus, Removal, RemovalReason,
    View,
};
use sync_protocol::record::PatientRecord;
use sync_protocol::types::{BoundedVec, Cursor, Hash32, LeaseId, StaffId, Text, Timestamp};

/// A data directory in its own temporary directory, with a random root key.
pub(crate) struct Fixture {
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) data: PathBuf,
    pub(crate) root: RootKey,
}

impl Fixture {
    pub(crate) fn new() -> (Fixture, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let root = RootKey::random().unwrap();
        let store = Store::create(&data, &root, SourceKind::KeyFile, None).unwrap();
        (Fixture { tmp, data, root }, store)
    }

    pub(crate) fn open(&self) -> Store {
        Store::open(&self.data, &self.root).unwrap()
    }
}

pub(crate) fn ts(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms).unwrap()
}

pub(crate) fn lease(id: u64, patients: &[NhsNumber]) -> Lease {
    Lease::new(
        LeaseId(id),
        Text::new(format!("caseload {id}")).unwrap(),
        Audience::Team,
        View::Clinical,
        ts(1_700_000_000_000),
        ts(1_900_000_000_000),
        86_400,
        true,
        BoundedVec::try_from(patients.to_vec()).unwrap(),
    )
    .unwrap()
}

/// Builds batches of at most `per` upserts, the first carrying `leases`.
#[derive(Default)]
pub(crate) struct BatchBuilder {
    pub(crate) objections: Vec<ObjectionChange>,
    pub(crate) leases: Vec<LeaseChange>,
    pub(crate) upserts: Vec<PatientRecord>,
    pub(crate) removals: Vec<NhsNumber>,
    pub(crate) cursor: u64,
}

impl BatchBuilder {
    pub(crate) fn build(self) -> Batch {
        let allowed = allowed_set_digest(self.upserts.iter().map(|r| (r.nhs_number, r.version)));
        Batch::new(
            BoundedVec::try_from(self.objections).unwrap(),
            BoundedVec::try_from(self.leases).unwrap(),
            BoundedVec::try_from(self.upserts).unwrap(),
            BoundedVec::try_from(
                self.removals
                    .into_iter()
                    .map(|nhs_number| Removal {
                        nhs_number,
                        reason: RemovalReason::LeftCaseload,
                    })
                    .collect::<Vec<_>>(),
            )
            .unwrap(),
            Cursor::new(self.cursor.to_be_bytes().to_vec()).unwrap(),
            false,
            ts(1_800_000_000_000 + self.cursor),
            allowed,
        )
        .unwrap()
    }
}

pub(crate) fn objection(nhs: NhsNumber, status: ObjectionStatus) -> ObjectionChange {
    ObjectionChange {
        nhs_number: nhs,
        status,
        recorded_at: ts(1_800_000_000_000),
    }
}

/// Stores `n` synthetic patients under one lease (id 1), in batches of 100, with one audit
/// entry per patient. Returns the records.
pub(crate) fn populate(store: &Store, seed: u64, n: usize) -> Vec<PatientRecord> {
    let records = Generator::new(seed).patients(n);
    let nhs: Vec<NhsNumber> = records.iter().map(|r| r.nhs_number).collect();
    for (i, chunk) in records.chunks(100).enumerate() {
        let leases = if i == 0 {
            vec![LeaseChange::Granted(lease(1, &nhs))]
        } else {
            vec![]
        };
        let b = BatchBuilder {
            leases,
            upserts: chunk.to_vec(),
            cursor: i as u64 + 1,
            ..Default::default()
        };
        store.apply_batch(&b.build()).unwrap();
    }
    let mut prev = Hash32::default();
    let entries: Vec<AuditEntry> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let e = AuditEntry::seal(&prev, i as u64 + 1, &audit_record(r.nhs_number)).unwrap();
            prev = e.hash;
            e
        })
        .collect();
    for chunk in entries.chunks(250) {
        store.append_audit_many(chunk).unwrap();
    }
    records
}

pub(crate) fn audit_record(nhs: NhsNumber) -> AuditRecord {
    AuditRecord {
        at: ts(1_800_000_000_000),
        wall: ts(1_800_000_000_000),
        event: AuditEvent::Access(Access {
            request_id: 7,
            client: Text::new("epcr-tablet").unwrap(),
            user: Some(StaffId::new("C1234567").unwrap()),
            role: None,
            purpose: Some(Purpose::Treat),
            action: AuditAction::ReadSummary,
            patient: Some(nhs),
            listed: BoundedVec::default(),
            lease: Some(LeaseId(1)),
            view: Some(View::Clinical),
            shown: BoundedVec::default(),
            withheld: 0,
            outcome: AuditOutcome::Served,
        }),
    }
}

/// Every regular file under `dir`, recursively, with its bytes.
pub(crate) fn read_tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let t = entry.file_type().unwrap();
            if t.is_dir() {
                stack.push(entry.path());
            } else if t.is_file() {
                out.insert(entry.path(), fs::read(entry.path()).unwrap());
            }
        }
    }
    out
}

/// SHA-256, length and modification time of every file: equal before and after means
/// untouched.
pub(crate) fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (String, usize, std::time::SystemTime)> {
    use sha2::Digest;
    read_tree(dir)
        .into_iter()
        .map(|(p, b)| {
            let m = fs::metadata(&p).unwrap().modified().unwrap();
            let hash: String = sha2::Sha256::digest(&b)
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect();
            (p, (hash, b.len(), m))
        })
        .collect()
}

/// Copies a directory tree (files only).
pub(crate) fn copy_tree(from: &Path, to: &Path) {
    for (path, bytes) in read_tree(from) {
        let rel = path.strip_prefix(from).unwrap();
        let dest = to.join(rel);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::write(&dest, bytes).unwrap();
    }
}
