//! The store: the only door to the device's redb database and its keyring.
//!
//! Everything patient-related is sealed with XChaCha20-Poly1305 before it reaches redb; row
//! keys are keyed hashes, never NHS numbers. One logical change is one write transaction.
//! Purging a patient or a lease deletes its rows and destroys its data key in the keyring
//! (crypto-shredding), so copies of its ciphertext left in redb's free pages never open
//! again. The on-disk format, its invariants and its failure analysis are in `docs/STORE.md`.

mod error;
mod keyring;
mod migrate;
mod tables;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sync_protocol::NhsNumber;
use sync_protocol::audit::AuditEntry;
use sync_protocol::message::{
    AnchorKind, Batch, Lease, LeaseChange, ObjectionChange, ObjectionStatus, RestoreReason,
};
use sync_protocol::record::PatientRecord;
use sync_protocol::types::{Cursor, LeaseId, RecordVersion, Timestamp};
use zeroize::Zeroizing;

use crate::anchor::Counter;
use crate::crypto::{self, MasterKey, RootKey, RowKey, Secret32, Subkeys};
use crate::keysource::{KdfParams, KeySource, SourceKind, read_credential, read_key_file};

pub use error::StoreError;
pub use keyring::{KEYRING_FILE, LockInfo, SLOT_LEN, Scope};
pub use migrate::{SCHEMA_VERSION, force_schema_version};
use tables::Table;
#[cfg(feature = "testing")]
use tables::sealed_ad;

/// redb's page cache. redb's default (1 GiB) would let the cache grow with the data: a
/// device holding 100,000 patients would keep most of them in memory. Reads past the cache
/// come from the kernel's page cache; the device's RSS goal is 40 MiB serving and syncing.
pub const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// Unwrapped data keys kept in memory at most (36 bytes each, touched only when used: a
/// device holding 100,000 patients keeps every key it has read, about 4.7 MB at most).
const KEY_CACHE_ENTRIES: usize = 131_072;

/// Unwrapped data keys by keyring slot. Allocated once at its full capacity and never
/// grown, so no resize leaves copies of keys behind in freed memory; each key is zeroized
/// when it leaves (a purge, a failed commit, a wipe, the cache filling, shutdown).
struct KeyCache(HashMap<u32, Secret32>);

impl KeyCache {
    fn new() -> Self {
        Self(HashMap::with_capacity(KEY_CACHE_ENTRIES))
    }

    fn get(&self, slot: u32) -> Option<Secret32> {
        self.0.get(&slot).cloned()
    }

    fn insert(&mut self, slot: u32, key: &Secret32) {
        if self.0.len() >= KEY_CACHE_ENTRIES && !self.0.contains_key(&slot) {
            self.0.clear();
        }
        self.0.insert(slot, key.clone());
    }

    fn remove(&mut self, slot: u32) {
        self.0.remove(&slot);
    }

    fn clear(&mut self) {
        self.0.clear();
    }

    #[cfg(feature = "testing")]
    fn len(&self) -> usize {
        self.0.len()
    }
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyCache({} keys)", self.0.len())
    }
}

/// File name of the redb database inside a data directory.
pub const DATABASE_FILE: &str = "store.redb";

/// What a batch did to the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Records written.
    pub upserted: usize,
    /// Patients purged (objection, removal, lease end); their keys are destroyed.
    pub purged: usize,
    /// Leases granted or changed.
    pub leases_written: usize,
    /// Leases revoked and purged.
    pub leases_ended: usize,
}

/// A sealed value as stored (nonce ‖ ciphertext ‖ tag) and the associated data that opens it.
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct RawSealed {
    /// Nonce, ciphertext and tag.
    pub sealed: Vec<u8>,
    /// Associated data.
    pub ad: Vec<u8>,
}

/// Counts for status output; none of it identifies a patient.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Patients held.
    pub patients: u64,
    /// Leases held.
    pub leases: u64,
    /// Objections remembered.
    pub objections: u64,
    /// Audit entries not yet acknowledged by the hub.
    pub audit_entries: u64,
    /// Keyring slots in use.
    pub key_slots: usize,
}

/// A read transaction's view of the patients table, reused by reads until the next commit,
/// so that a point read is one B-tree search rather than a transaction, a table lookup and a
/// search.
/// How long a cached read snapshot is used before it is taken afresh (audit commits do not
/// invalidate it, and an old one would keep redb from reusing freed pages).
const SNAPSHOT_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// One audit entry as scanned: its sequence, and the entry or why it did not open.
pub type ScannedAudit = (u64, Result<AuditEntry, StoreError>);

/// Where the audit chain ends: the last sequence written and its hash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    /// Last sequence written (0 before the first).
    pub seq: u64,
    /// Its chain hash (zero before the first).
    pub hash: sync_protocol::types::Hash32,
}

#[derive(Debug)]
struct Snapshot {
    generation: u64,
    taken: std::time::Instant,
    patients: redb::ReadOnlyTable<[u8; 16], &'static [u8]>,
}

/// An open, unlocked data directory.
#[derive(Debug)]
pub struct Store {
    /// The patients table as of the latest commit, shared by readers (dropped before `db`).
    snapshot: RwLock<Option<Arc<Snapshot>>>,
    /// Bumped after every commit; a snapshot from an older generation is rebuilt.
    generation: AtomicU64,
    /// The database; `None` only while it is being reopened after an I/O error.
    db: RwLock<Option<Arc<Database>>>,
    /// The database file, when the store can reopen it (not for test backends).
    db_path: Option<PathBuf>,
    /// Set when a write failed in the database layer: redb refuses every later
    /// transaction after an I/O error, so the next write reopens it first.
    db_failed: std::sync::atomic::AtomicBool,
    keyring: Mutex<keyring::Keyring>,
    master: MasterKey,
    keys: Subkeys,
    /// Unwraps data keys for readers without the keyring's lock.
    slots: keyring::SlotReader,
    data_keys: RwLock<KeyCache>,
    /// The anti-rollback anchor, once bound: every commit that destroys a key counts.
    anchor: Mutex<Option<AnchorGuard>>,
    /// Test support: audit commits fail as a full disk would.
    #[cfg(feature = "testing")]
    fail_audit: std::sync::atomic::AtomicBool,
}

/// The bound anchor as the store keeps it in memory.
#[derive(Debug)]
struct AnchorGuard {
    counter: Arc<dyn Counter>,
    binding: AnchorBinding,
    /// The counter's value as last read or advanced.
    known: u64,
    /// Why the last advance failed (purges since are not yet counted by the anchor).
    unavailable: Option<String>,
}

/// The binding as sealed in the store's state: which anchor, and the count this store
/// expects it to show.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct AnchorBinding {
    kind: AnchorKind,
    what: String,
    count: u64,
}

/// What binding a store to its anchor at open found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnchorCheck {
    /// The store is the live one (its count is the anchor's).
    Verified,
    /// The store was bound to the anchor now (its first count).
    Bound,
    /// The store was a restored or foreign copy: its patients and leases were destroyed
    /// (the counts), the cursor dropped (the next sync starts from nothing), and it is
    /// bound to the anchor again.
    Restored {
        /// What gave it away.
        reason: RestoreReason,
        /// Patients destroyed.
        patients: u64,
        /// Leases destroyed.
        leases: u64,
    },
}

/// The anchor as `status` and the checkin report it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnchorInfo {
    /// The kind.
    pub kind: AnchorKind,
    /// Which counter.
    pub what: String,
    /// The count the store expects.
    pub count: u64,
    /// Why the last advance failed: purges since are not counted yet (retried at the
    /// next).
    pub unavailable: Option<String>,
}

impl Drop for Store {
    /// redb can panic closing a database corrupted outside it (its closing transaction
    /// reads the table of tables); a damaged file is reported when read, and must not
    /// take the process down when the store is dropped.
    fn drop(&mut self) {
        if let Ok(snapshot) = self.snapshot.get_mut() {
            snapshot.take();
        }
        if let Some(db) = self.db.get_mut().ok().and_then(Option::take) {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(db)));
        }
    }
}

/// Obtains the root key for `dir` from `source`. For a passphrase this runs Argon2id with
/// the parameters stored in the keyring: do it once per start and keep the [`RootKey`].
pub fn unlock(dir: &Path, source: &KeySource) -> Result<RootKey, StoreError> {
    match source {
        KeySource::KeyFile(path) => {
            refuse_inside(dir, path)?;
            let root = read_key_file(path)?;
            finish_key_file_rotation(dir, path, root)
        }
        KeySource::Credential(name) => Ok(read_credential(name)?),
        KeySource::Passphrase(pass) => {
            let info = Store::lock_info(dir)?;
            let params: Vec<KdfParams> = info.slots.iter().filter_map(|s| s.2).collect();
            // Normally one slot. After an interrupted passphrase change there are two, and the
            // passphrase given decides which one survives. A passphrase that opens neither
            // yields the newest slot's key, which `Store::open` refuses as the wrong key.
            let mut newest = None;
            for p in &params {
                let root = p.derive(pass)?;
                if keyring::Keyring::open_check(dir, &root)? {
                    return Ok(root);
                }
                newest.get_or_insert(root);
            }
            newest.ok_or_else(|| {
                StoreError::WrongKey(info.slots.first().map_or(SourceKind::KeyFile, |s| s.1))
            })
        }
    }
}

/// `carecache rekey --new-key-file` in place writes `KEY.new`, rekeys the store, then
/// renames `KEY.new` over `KEY`. Killed between the last two, the store opens only with
/// the key in `KEY.new`: finish the rename then. Otherwise `root` is returned as it is
/// (and a wrong key is refused by `Store::open` as ever).
fn finish_key_file_rotation(dir: &Path, path: &Path, root: RootKey) -> Result<RootKey, StoreError> {
    let pending = path.with_extension("new");
    if !pending.exists() || !dir.join(KEYRING_FILE).exists() {
        return Ok(root);
    }
    if keyring::Keyring::open_check(dir, &root)? {
        // The rotation never reached the store: the old key still opens it.
        return Ok(root);
    }
    // A half-written `KEY.new` (killed while writing it) never reached the store.
    let Ok(new_root) = read_key_file(&pending) else {
        return Ok(root);
    };
    if !keyring::Keyring::open_check(dir, &new_root)? {
        return Ok(root);
    }
    fs::rename(&pending, path).map_err(|e| StoreError::io("finishing a key rotation", path, e))?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::io("finishing a key rotation", path, e))?;
    }
    tracing::warn!(
        "finished a root-key rotation that was interrupted before the new key file was moved into place"
    );
    Ok(new_root)
}

/// Refuses a key file inside the data directory: a copy of the directory must not unlock.
pub fn refuse_inside(dir: &Path, key: &Path) -> Result<(), StoreError> {
    let abs = |p: &Path| {
        fs::canonicalize(p).unwrap_or_else(|_| {
            p.parent()
                .and_then(|d| fs::canonicalize(d).ok())
                .map_or_else(
                    || p.to_path_buf(),
                    |d| d.join(p.file_name().unwrap_or_default()),
                )
        })
    };
    if abs(key).starts_with(abs(dir)) {
        return Err(
            crate::keysource::KeySourceError::InsideDataDir(key.display().to_string()).into(),
        );
    }
    Ok(())
}

impl Store {
    /// Makes a new data directory (mode 0700) holding an empty store under `root`.
    pub fn create(
        dir: &Path,
        root: &RootKey,
        kind: SourceKind,
        kdf: Option<KdfParams>,
    ) -> Result<Store, StoreError> {
        if dir.join(KEYRING_FILE).exists() || dir.join(DATABASE_FILE).exists() {
            return Err(StoreError::AlreadyInitialised(dir.display().to_string()));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StoreError::io("create data directory", dir, e))?;
        let mut store_id = [0u8; 16];
        crypto::fill_random(&mut store_id)?;
        let (ring, master) = keyring::Keyring::create(dir, store_id, root, kind, kdf)?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(dir.join(DATABASE_FILE))
            .map_err(|e| StoreError::db("create database", e))?;
        migrate::initialise(&db, &store_id)?;
        sync_dir(dir)?;
        Self::assemble(db, Some(dir.join(DATABASE_FILE)), ring, master)
    }

    /// The key source a data directory expects, read without any key.
    pub fn lock_info(dir: &Path) -> Result<LockInfo, StoreError> {
        if !dir.join(KEYRING_FILE).exists() {
            return Err(StoreError::NotInitialised(dir.display().to_string()));
        }
        keyring::Keyring::lock_info(dir)
    }

    /// Opens a data directory. A wrong key is refused before any file is written.
    ///
    /// redb can panic (rather than fail) on some corrupted pages; opening walks the
    /// tables, so such a file is reported here as damaged instead of taking the process
    /// down.
    pub fn open(dir: &Path, root: &RootKey) -> Result<Store, StoreError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::open_inner(dir, root, true, |path| {
                migrate::peek_version(path)?;
                Database::builder()
                    .set_cache_size(CACHE_BYTES)
                    .open(path)
                    .map_err(|e| StoreError::db("open database", e))
            })
        }))
        .unwrap_or(Err(StoreError::Damaged("database")))
    }

    /// Opens a data directory whose database lives in `backend` (tests break storage with it).
    pub fn open_with_backend(
        dir: &Path,
        root: &RootKey,
        backend: impl redb::StorageBackend,
    ) -> Result<Store, StoreError> {
        Self::open_inner(dir, root, false, |_| {
            Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create_with_backend(backend)
                .map_err(|e| StoreError::db("open database", e))
        })
    }

    fn open_inner(
        dir: &Path,
        root: &RootKey,
        reopen: bool,
        open_db: impl FnOnce(&Path) -> Result<Database, StoreError>,
    ) -> Result<Store, StoreError> {
        if !dir.join(KEYRING_FILE).exists() {
            return Err(StoreError::NotInitialised(dir.display().to_string()));
        }
        let (mut ring, master) = keyring::Keyring::open(dir, root)?;
        let db_path = dir.join(DATABASE_FILE);
        let db = open_db(&db_path)?;
        migrate::check_and_upgrade(&db, ring.store_id())?;
        // Only an interrupted change leaves pending or dying slots; the rows that own keys
        // are read (every patient) only then, so a clean open costs nothing per patient.
        if ring.has_unsettled() {
            let referenced: HashSet<u32> = slot_owners(&db)?.into_iter().map(|o| o.0).collect();
            let orphans = ring.reconcile(&referenced)?;
            if orphans > 0 {
                tracing::info!(orphans, "destroyed key slots left by an interrupted change");
            }
        }
        let owners = key_owner_count(&db)?;
        if owners != ring.used() as u64 {
            tracing::warn!(
                live = ring.used(),
                owners,
                "key slots and rows disagree; the database may be damaged"
            );
        }
        Self::assemble(db, reopen.then_some(db_path), ring, master)
    }

    fn assemble(
        db: Database,
        db_path: Option<PathBuf>,
        ring: keyring::Keyring,
        master: MasterKey,
    ) -> Result<Store, StoreError> {
        let keys = master.subkeys();
        let slots = ring.reader()?;
        Ok(Store {
            snapshot: RwLock::new(None),
            generation: AtomicU64::new(0),
            db: RwLock::new(Some(Arc::new(db))),
            db_path,
            db_failed: std::sync::atomic::AtomicBool::new(false),
            keyring: Mutex::new(ring),
            master,
            keys,
            slots,
            data_keys: RwLock::new(KeyCache::new()),
            anchor: Mutex::new(None),
            #[cfg(feature = "testing")]
            fail_audit: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Rotates the root key: the master key is wrapped under `new_root` in place of the old
    /// wrapping. No record is re-encrypted; the old root key no longer opens the directory.
    pub fn rekey(
        &self,
        new_root: &RootKey,
        kind: SourceKind,
        kdf: Option<KdfParams>,
    ) -> Result<(), StoreError> {
        self.ring()?.rewrap(&self.master, new_root, kind, kdf)
    }

    /// Applies a sync batch in one transaction, cursor included: objections first (purging
    /// the patients), then lease changes (purging patients no lease covers any more), then
    /// upserts, then removals. On any error nothing is applied.
    pub fn apply_batch(&self, batch: &Batch) -> Result<ApplyReport, StoreError> {
        self.apply_batch_with(batch, &Extras::default())
    }

    /// [`Self::apply_batch`], plus in the same transaction: after the batch, purge every
    /// held patient not in `extras.keep_only` (reconciliation after a full resync), and
    /// write the device-state values in `extras`.
    pub fn apply_batch_with(
        &self,
        batch: &Batch,
        extras: &Extras,
    ) -> Result<ApplyReport, StoreError> {
        self.write(|w| {
            let mut report = ApplyReport::default();
            for o in batch.objections.iter() {
                w.objection(o)?;
                if o.status == ObjectionStatus::Objected {
                    report.purged += usize::from(w.purge_patient(&o.nhs_number)?);
                }
            }
            let mut uncovered = BTreeSet::new();
            for change in batch.leases.iter() {
                match change {
                    LeaseChange::Granted(lease) | LeaseChange::Changed(lease) => {
                        uncovered.extend(w.put_lease(lease)?);
                        report.leases_written += 1;
                    }
                    LeaseChange::Revoked { id, .. } => {
                        uncovered.extend(w.remove_lease(*id)?);
                        report.leases_ended += 1;
                    }
                }
            }
            if !uncovered.is_empty() {
                let covered = w.covered()?;
                for nhs in uncovered.difference(&covered) {
                    report.purged += usize::from(w.purge_patient(nhs)?);
                }
            }
            for record in batch.upserts.iter() {
                w.put_record(record)?;
                report.upserted += 1;
            }
            for removal in batch.removals.iter() {
                report.purged += usize::from(w.purge_patient(&removal.nhs_number)?);
            }
            if let Some(keep) = &extras.keep_only {
                report.purged += w.purge_all_but(keep)?;
            }
            w.put_state(tables::CURSOR, &batch.next_cursor)?;
            w.put_state(tables::HUB_TIME, &batch.hub_time)?;
            w.put_extras(extras)?;
            Ok(report)
        })
    }

    /// Records the objections among `changes` (status `Objected`) and purges those
    /// patients, in one transaction, without touching the cursor: what a batch refused
    /// for its other contents still carries (an objection is never held back by a
    /// neighbour). Withdrawals are left for a batch the device accepts. Returns how many
    /// patients were purged.
    pub fn apply_objections(&self, changes: &[ObjectionChange]) -> Result<usize, StoreError> {
        self.write(|w| {
            let mut purged = 0;
            for o in changes
                .iter()
                .filter(|o| o.status == ObjectionStatus::Objected)
            {
                w.objection(o)?;
                purged += usize::from(w.purge_patient(&o.nhs_number)?);
            }
            Ok(purged)
        })
    }

    /// Writes or replaces records (a test and benchmark convenience; sync uses batches).
    pub fn put_records(&self, records: &[PatientRecord]) -> Result<(), StoreError> {
        self.write(|w| records.iter().try_for_each(|r| w.put_record(r)))
    }

    /// Purges patients: rows deleted, data keys destroyed. Returns how many were held.
    pub fn purge_patients(&self, patients: &[NhsNumber]) -> Result<usize, StoreError> {
        self.write(|w| {
            let mut n = 0;
            for p in patients {
                n += usize::from(w.purge_patient(p)?);
            }
            Ok(n)
        })
    }

    /// Ends a lease: its row and key are destroyed, and so is every patient no other lease
    /// covers. Returns how many patients were purged.
    pub fn purge_lease(&self, id: LeaseId) -> Result<usize, StoreError> {
        self.purge_lease_with(id, &Extras::default())
    }

    /// [`Self::purge_lease`], writing the device-state values in `extras` in the same
    /// transaction (`keep_only` is ignored).
    pub fn purge_lease_with(&self, id: LeaseId, extras: &Extras) -> Result<usize, StoreError> {
        self.write(|w| {
            w.put_extras(extras)?;
            let patients = w.remove_lease(id)?;
            let covered = w.covered()?;
            let mut n = 0;
            for nhs in patients.difference(&covered) {
                n += usize::from(w.purge_patient(nhs)?);
            }
            Ok(n)
        })
    }

    /// Writes device-state values (sealed under the state key) in one durable commit.
    pub fn put_device_state(&self, extras: &Extras) -> Result<(), StoreError> {
        self.write(|w| w.put_extras(extras))
    }

    /// A device-state value written with [`Extras::set`], if any.
    pub fn device_state<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.get_state(&device_key(key))
    }

    /// Every held patient and the version of its record: what the allowed-set digest is
    /// computed over. Opens each record but neither decompresses nor decodes it (a
    /// compressed record's head carries both).
    pub fn held_versions(&self) -> Result<Vec<(NhsNumber, RecordVersion)>, StoreError> {
        let mut out = Vec::new();
        self.for_each_patient_row(|key, row, sealed| {
            out.push(tables::unseal_record_head(key, &row.0, sealed)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// The version of the record held for each of `patients` (`None` where none is
    /// held): what a sync round compares offers with. Opens each record's head only.
    pub fn held_versions_of(
        &self,
        patients: impl IntoIterator<Item = NhsNumber>,
    ) -> Result<Vec<(NhsNumber, Option<RecordVersion>)>, StoreError> {
        let mut out = Vec::new();
        for nhs in patients {
            let head = self.with_patient_row(&nhs, |row, slot, sealed| {
                let key = self.data_key(slot, Scope::Patient(row))?;
                tables::unseal_record_head(&key, &row.0, sealed)
            })?;
            let version = match head {
                None => None,
                Some((n, _)) if n != nhs => {
                    return Err(StoreError::Damaged(Table::Patients.name()));
                }
                Some((_, v)) => Some(v),
            };
            out.push((nhs, version));
        }
        Ok(out)
    }

    /// One patient's record, if held.
    pub fn record(&self, nhs: &NhsNumber) -> Result<Option<PatientRecord>, StoreError> {
        let Some((version, plain)) = self.record_unsealed(nhs)? else {
            return Ok(None);
        };
        let record = decode_record(version, &plain)?;
        if record.nhs_number != *nhs {
            return Err(StoreError::Damaged(Table::Patients.name()));
        }
        Ok(Some(record))
    }

    /// One patient's record as its decrypted encoding (zeroized on drop), if held. The
    /// benchmark measures reads with it; [`Self::record`] decodes it.
    #[doc(hidden)]
    pub fn record_bytes(&self, nhs: &NhsNumber) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        Ok(self.record_unsealed(nhs)?.map(|(_, plain)| plain))
    }

    /// One patient's record as its decrypted encoding, with the schema version it was
    /// sealed under (which says how to decode it), if held.
    fn record_unsealed(&self, nhs: &NhsNumber) -> Result<Option<Unsealed>, StoreError> {
        self.with_patient_row(nhs, |row, slot, sealed| {
            let key = self.data_key(slot, Scope::Patient(row))?;
            tables::unseal_record(&key, &row.0, sealed)
        })
    }

    /// Looks up a patient's row in the current snapshot and hands `f` its row key, key slot
    /// and sealed value.
    fn with_patient_row<T>(
        &self,
        nhs: &NhsNumber,
        f: impl FnOnce(RowKey, u32, &[u8]) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let row = RowKey::of(&self.keys.index, nhs);
        let snapshot = self.snapshot()?;
        let Some(value) = snapshot
            .patients
            .get(row.0)
            .map_err(|e| StoreError::db("read", e))?
        else {
            return Ok(None);
        };
        let (slot, sealed) = tables::split_slot(value.value())?;
        f(row, slot, sealed).map(Some)
    }

    /// Every record held, in row-key order (which reveals nothing about the patients).
    pub fn records(&self) -> Result<Vec<PatientRecord>, StoreError> {
        let mut out = Vec::new();
        self.for_each_record(|version, plain| {
            out.push(decode_record(version, plain)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Hands `f` every held record, one at a time (each decoded, used and dropped before
    /// the next is opened): for indexes built over all patients without holding them all.
    pub fn for_each_record_decoded(
        &self,
        mut f: impl FnMut(&PatientRecord),
    ) -> Result<(), StoreError> {
        self.for_each_record(|version, plain| {
            f(&decode_record(version, plain)?);
            Ok(())
        })
    }

    /// Hands `f` every held record's decrypted encoding (zeroized after each), in row-key
    /// order, from one read transaction.
    fn for_each_record(
        &self,
        mut f: impl FnMut(u8, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.for_each_patient_row(|key, row, sealed| {
            let (version, plain) = tables::unseal_record(key, &row.0, sealed)?;
            f(version, &plain)
        })
    }

    /// Hands `f` every patient row — its data key (not cached: a scan opens each once),
    /// row key and sealed value — in row-key order, from one read transaction.
    fn for_each_patient_row(
        &self,
        mut f: impl FnMut(&Secret32, RowKey, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let tx = self.read_tx()?;
        let table = tables::open_read(&tx, tables::PATIENTS)?;
        for item in table.iter().map_err(|e| StoreError::db("read", e))? {
            let (k, v) = item.map_err(|e| StoreError::db("read", e))?;
            let row = RowKey(k.value());
            let (slot, sealed) = tables::split_slot(v.value())?;
            let key = self.data_key_uncached(slot, Scope::Patient(row))?;
            f(&key, row, sealed)?;
        }
        Ok(())
    }

    /// The leases held.
    pub fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        let tx = self.read_tx()?;
        let table = tables::open_read(&tx, tables::LEASES)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(|e| StoreError::db("read", e))? {
            let (k, v) = item.map_err(|e| StoreError::db("read", e))?;
            out.push(self.open_lease(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Whether the patient has an objection on record.
    pub fn objected(&self, nhs: &NhsNumber) -> Result<bool, StoreError> {
        let row = RowKey::of(&self.keys.index, nhs);
        let tx = self.read_tx()?;
        let table = tables::open_read(&tx, tables::OBJECTIONS)?;
        let Some(v) = table.get(row.0).map_err(|e| StoreError::db("read", e))? else {
            return Ok(false);
        };
        let plain = tables::unseal(&self.keys.state, Table::Objections, &row.0, v.value())?;
        let o: ObjectionChange = decode(&plain, Table::Objections)?;
        Ok(o.nhs_number == *nhs && o.status == ObjectionStatus::Objected)
    }

    /// The committed sync cursor, if any batch was applied.
    pub fn cursor(&self) -> Result<Option<Cursor>, StoreError> {
        self.get_state(tables::CURSOR)
    }

    /// The hub time of the last applied batch.
    pub fn hub_time(&self) -> Result<Option<Timestamp>, StoreError> {
        self.get_state(tables::HUB_TIME)
    }

    /// Appends an audit entry, sealed under the audit key, durably.
    pub fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.append_audit_many(std::slice::from_ref(entry))
    }

    /// Appends audit entries in one durable commit (group commit of concurrent reads).
    /// The entries must continue the chain from [`Store::audit_head`] (next sequence,
    /// linking hash); the new head is stored in the same transaction, so it survives the
    /// entries' removal after upload.
    pub fn append_audit_many(&self, entries: &[AuditEntry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        #[cfg(feature = "testing")]
        if self.fail_audit.load(Ordering::Relaxed) {
            return Err(StoreError::Injected);
        }
        self.recover()?;
        let tx = self.begin_write()?;
        {
            let mut meta = tables::open_write(&tx, tables::META)?;
            let mut audit = tables::open_write(&tx, tables::AUDIT)?;
            let mut head = self.head_from(&meta, &audit)?;
            for e in entries {
                if e.seq != head.seq.saturating_add(1) || !e.links_from(&head.hash) {
                    return Err(StoreError::AuditSequence(e.seq));
                }
                head = AuditHead {
                    seq: e.seq,
                    hash: e.hash,
                };
            }
            for e in entries {
                let sealed = tables::seal(
                    &self.keys.audit,
                    Table::Audit,
                    &e.seq.to_be_bytes(),
                    &encode(e)?,
                )?;
                audit
                    .insert(e.seq, sealed.as_slice())
                    .map_err(|x| StoreError::db("audit", x))?;
            }
            meta.insert(
                tables::AUDIT_HEAD,
                self.seal_state(tables::AUDIT_HEAD, &head)?.as_slice(),
            )
            .map_err(|x| StoreError::db("audit", x))?;
        }
        // Audit commits do not change what readers see: the read snapshot is kept (it is
        // refreshed by age, so it does not pin freed pages for long).
        tx.commit().map_err(|e| self.write_failed("commit", e))?;
        Ok(())
    }

    /// The last audit entry written (sequence and hash), or sequence 0 and the zero hash.
    pub fn audit_head(&self) -> Result<AuditHead, StoreError> {
        let tx = self.read_tx()?;
        let meta = tables::open_read(&tx, tables::META)?;
        let audit = tables::open_read(&tx, tables::AUDIT)?;
        self.head_from(&meta, &audit)
    }

    /// The chain head: stored with each commit; for a store written before the head was
    /// kept, the last entry in the table.
    fn head_from(
        &self,
        meta: &impl ReadableTable<&'static str, &'static [u8]>,
        audit: &impl ReadableTable<u64, &'static [u8]>,
    ) -> Result<AuditHead, StoreError> {
        if let Some(v) = meta
            .get(tables::AUDIT_HEAD)
            .map_err(|x| StoreError::db("audit", x))?
        {
            return self.open_state(tables::AUDIT_HEAD, v.value());
        }
        let Some((k, v)) = audit.last().map_err(|x| StoreError::db("audit", x))? else {
            return Ok(AuditHead::default());
        };
        let e = self.open_audit(k.value(), v.value())?;
        Ok(AuditHead {
            seq: e.seq,
            hash: e.hash,
        })
    }

    /// Opens the sealed audit entry stored under `seq`.
    fn open_audit(&self, seq: u64, sealed: &[u8]) -> Result<AuditEntry, StoreError> {
        let plain = tables::unseal(&self.keys.audit, Table::Audit, &seq.to_be_bytes(), sealed)?;
        let entry: AuditEntry = decode(&plain, Table::Audit)?;
        if entry.seq != seq {
            return Err(StoreError::Damaged(Table::Audit.name()));
        }
        Ok(entry)
    }

    /// Seals a `meta` state value under the state key.
    fn seal_state<T: Serialize>(&self, name: &str, value: &T) -> Result<Vec<u8>, StoreError> {
        tables::seal(
            &self.keys.state,
            Table::Meta,
            name.as_bytes(),
            &encode(value)?,
        )
    }

    /// Opens a sealed `meta` state value.
    fn open_state<T: DeserializeOwned>(&self, name: &str, sealed: &[u8]) -> Result<T, StoreError> {
        let plain = tables::unseal(&self.keys.state, Table::Meta, name.as_bytes(), sealed)?;
        decode(&plain, Table::Meta)
    }

    /// Audit entries from `from` (inclusive), at most `limit`; fails at the first that
    /// does not open.
    pub fn audit_entries(&self, from: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.audit_scan(from, limit)?
            .into_iter()
            .map(|(_, entry)| entry)
            .collect()
    }

    /// Audit entries from `from` (inclusive), at most `limit`, each opened on its own: an
    /// entry that does not open (altered or damaged on disk) is reported under its
    /// sequence rather than ending the scan. For `audit verify`.
    pub fn audit_scan(&self, from: u64, limit: usize) -> Result<Vec<ScannedAudit>, StoreError> {
        let tx = self.read_tx()?;
        let table = tables::open_read(&tx, tables::AUDIT)?;
        let mut out = Vec::new();
        for item in table
            .range(from..)
            .map_err(|e| StoreError::db("read", e))?
            .take(limit)
        {
            let (k, v) = item.map_err(|e| StoreError::db("read", e))?;
            out.push((k.value(), self.open_audit(k.value(), v.value())));
        }
        Ok(out)
    }

    /// The last entry the hub acknowledged (sequence 0 and the zero hash before the first
    /// acknowledgement): the next upload links from its hash.
    pub fn audit_acked(&self) -> Result<AuditHead, StoreError> {
        self.get_state(tables::AUDIT_ACKED)
            .map(Option::unwrap_or_default)
    }

    /// The hub acknowledged entries through `through`: they are dropped, and the
    /// acknowledged head (sequence and hash) is kept in the same transaction so the next
    /// upload links. Returns how many entries were dropped; an acknowledgement at or
    /// below the one held changes nothing. `through` must be an entry the device holds.
    pub fn acknowledge_audit(&self, through: u64) -> Result<u64, StoreError> {
        self.recover()?;
        let tx = self.begin_write()?;
        let removed = {
            let mut meta = tables::open_write(&tx, tables::META)?;
            let mut audit = tables::open_write(&tx, tables::AUDIT)?;
            let acked: AuditHead = match meta
                .get(tables::AUDIT_ACKED)
                .map_err(|x| StoreError::db("audit", x))?
            {
                Some(v) => self.open_state(tables::AUDIT_ACKED, v.value())?,
                None => AuditHead::default(),
            };
            if through <= acked.seq {
                return Ok(0);
            }
            let last = match audit.get(through).map_err(|x| StoreError::db("audit", x))? {
                Some(v) => self.open_audit(through, v.value())?,
                None => return Err(StoreError::AuditSequence(through)),
            };
            let before = audit.len().map_err(|e| StoreError::db("audit", e))?;
            audit
                .retain_in(..=through, |_, _| false)
                .map_err(|e| StoreError::db("audit", e))?;
            let removed = before - audit.len().map_err(|e| StoreError::db("audit", e))?;
            let head = AuditHead {
                seq: through,
                hash: last.hash,
            };
            meta.insert(
                tables::AUDIT_ACKED,
                self.seal_state(tables::AUDIT_ACKED, &head)?.as_slice(),
            )
            .map_err(|x| StoreError::db("audit", x))?;
            removed
        };
        // Patients are untouched: the read snapshot stays valid.
        tx.commit().map_err(|e| self.write_failed("commit", e))?;
        Ok(removed)
    }

    /// How many audit entries wait for upload, and the trusted time of the oldest.
    pub fn audit_backlog(&self) -> Result<(u64, Option<Timestamp>), StoreError> {
        let tx = self.read_tx()?;
        let table = tables::open_read(&tx, tables::AUDIT)?;
        let count = table.len().map_err(|e| StoreError::db("audit", e))?;
        let Some((k, v)) = table.first().map_err(|e| StoreError::db("audit", e))? else {
            return Ok((0, None));
        };
        let entry = self.open_audit(k.value(), v.value())?;
        let record = sync_protocol::audit::AuditRecord::decode(entry.record.as_slice())
            .map_err(|_| StoreError::Damaged(Table::Audit.name()))?;
        Ok((count, Some(record.at)))
    }

    #[cfg(feature = "testing")]
    /// Test support: replace the record of stored entry `seq` with `record`, sealed as the
    /// device would seal it but keeping the old hash — an entry altered by someone holding
    /// the device's keys.
    #[doc(hidden)]
    pub fn dangerous_rewrite_audit(&self, seq: u64, record: Vec<u8>) -> Result<(), StoreError> {
        self.dangerous_edit_audit(seq, |sealed| {
            let mut entry = self.open_audit(seq, &sealed)?;
            entry.record = record
                .try_into()
                .map_err(|_| StoreError::Refused("audit record too long"))?;
            tables::seal(
                &self.keys.audit,
                Table::Audit,
                &seq.to_be_bytes(),
                &encode(&entry)?,
            )
        })
    }

    #[cfg(feature = "testing")]
    /// Test support: flip one byte of stored entry `seq` as sealed on disk.
    #[doc(hidden)]
    pub fn dangerous_damage_audit(&self, seq: u64) -> Result<(), StoreError> {
        self.dangerous_edit_audit(seq, |mut sealed| {
            let mid = sealed.len() / 2;
            if let Some(b) = sealed.get_mut(mid) {
                *b ^= 0x40;
            }
            Ok(sealed)
        })
    }

    #[cfg(feature = "testing")]
    /// Replaces the sealed bytes of stored audit entry `seq` with `edit` of them.
    fn dangerous_edit_audit(
        &self,
        seq: u64,
        edit: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, StoreError>,
    ) -> Result<(), StoreError> {
        self.recover()?;
        let tx = self.begin_write()?;
        {
            let mut audit = tables::open_write(&tx, tables::AUDIT)?;
            let sealed = match audit.get(seq).map_err(|x| StoreError::db("audit", x))? {
                Some(v) => v.value().to_vec(),
                None => return Err(StoreError::AuditSequence(seq)),
            };
            audit
                .insert(seq, edit(sealed)?.as_slice())
                .map_err(|x| StoreError::db("audit", x))?;
        }
        tx.commit().map_err(|e| self.write_failed("commit", e))?;
        Ok(())
    }

    /// Counts of what the store holds.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let tx = self.read_tx()?;
        let len = |r: Result<u64, redb::StorageError>| r.map_err(|e| StoreError::db("read", e));
        Ok(StoreStats {
            patients: len(tables::open_read(&tx, tables::PATIENTS)?.len())?,
            leases: len(tables::open_read(&tx, tables::LEASES)?.len())?,
            objections: len(tables::open_read(&tx, tables::OBJECTIONS)?.len())?,
            audit_entries: len(tables::open_read(&tx, tables::AUDIT)?.len())?,
            key_slots: self.ring()?.used(),
        })
    }

    #[cfg(feature = "testing")]
    /// Test support: make audit commits fail (as on a full disk) until called with `false`.
    #[doc(hidden)]
    pub fn dangerous_fail_audit_commits(&self, fail: bool) {
        self.fail_audit.store(fail, Ordering::Relaxed);
    }

    #[cfg(feature = "testing")]
    /// Test support: the raw keyring slot holding a patient's data key, if held.
    #[doc(hidden)]
    pub fn raw_key_slot(&self, nhs: &NhsNumber) -> Result<Option<[u8; SLOT_LEN]>, StoreError> {
        self.with_patient_row(nhs, |_, slot, _| self.ring()?.raw_slot(slot))
    }

    #[cfg(feature = "testing")]
    /// Test support: the sealed record value as stored, and the associated data that opens it.
    #[doc(hidden)]
    pub fn raw_record(&self, nhs: &NhsNumber) -> Result<Option<RawSealed>, StoreError> {
        self.with_patient_row(nhs, |row, _, sealed| {
            let (version, body) = sealed
                .split_first()
                .ok_or(StoreError::Damaged("patients"))?;
            Ok(RawSealed {
                sealed: body.to_vec(),
                ad: sealed_ad(*version, Table::Patients, &row.0),
            })
        })
    }

    #[cfg(feature = "testing")]
    /// Test support: every key reachable from the root key right now — the master key's
    /// derived keys and every data key in a used slot. Tests try them on purged data.
    #[doc(hidden)]
    pub fn dangerous_reachable_keys(&self) -> Result<Vec<[u8; 32]>, StoreError> {
        let mut out = vec![
            *self.master.0.expose(),
            *self.keys.index.expose(),
            *self.keys.state.expose(),
            *self.keys.audit.expose(),
            *self.keys.wrap.expose(),
        ];
        for (slot, scope) in slot_owners(&*self.db()?)? {
            out.push(*self.data_key(slot, scope)?.expose());
        }
        Ok(out)
    }

    fn open_lease(&self, id: u64, value: &[u8]) -> Result<Lease, StoreError> {
        let (slot, _) = tables::split_slot(value)?;
        let key = self.data_key(slot, Scope::Lease(id))?;
        self.open_lease_with(&key, id, value)
    }

    fn open_lease_with(&self, key: &Secret32, id: u64, value: &[u8]) -> Result<Lease, StoreError> {
        let (_, sealed) = tables::split_slot(value)?;
        let plain = tables::unseal(key, Table::Leases, &id.to_be_bytes(), sealed)?;
        let lease: Lease = decode(&plain, Table::Leases)?;
        if lease.id.0 != id {
            return Err(StoreError::Damaged(Table::Leases.name()));
        }
        Ok(lease)
    }

    /// The data key in `slot` (which must belong to `scope`): from the cache, else
    /// unwrapped from the keyring without its lock (so a reader never waits on a writer's
    /// fsync) and cached.
    fn data_key(&self, slot: u32, scope: Scope) -> Result<Secret32, StoreError> {
        if let Some(k) = self.cached_key(slot)? {
            return Ok(k);
        }
        let key = self.slots.unwrap(slot, scope, &self.keys.wrap)?;
        self.cache_key(slot, &key)?;
        Ok(key)
    }

    /// The data key in `slot`, cached or unwrapped, without caching it: for scans that
    /// open every patient once (the cache keeps the keys reads use).
    fn data_key_uncached(&self, slot: u32, scope: Scope) -> Result<Secret32, StoreError> {
        match self.cached_key(slot)? {
            Some(k) => Ok(k),
            None => self.slots.unwrap(slot, scope, &self.keys.wrap),
        }
    }

    fn cached_key(&self, slot: u32) -> Result<Option<Secret32>, StoreError> {
        Ok(self
            .data_keys
            .read()
            .map_err(|_| StoreError::Poisoned)?
            .get(slot))
    }

    /// Test support: how many unwrapped data keys are held in memory.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn cached_keys(&self) -> usize {
        self.data_keys.read().map_or(0, |c| c.len())
    }

    /// Test support: the keyring slot of a held patient's data key.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn key_slot(&self, nhs: &NhsNumber) -> Result<Option<u32>, StoreError> {
        self.with_patient_row(nhs, |_, slot, _| Ok(slot))
    }

    /// Test support: whether the data key of `slot` is held unwrapped in memory.
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn key_cached(&self, slot: u32) -> bool {
        self.cached_key(slot).ok().flatten().is_some()
    }

    fn get_state<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let tx = self.read_tx()?;
        let table = tables::open_read(&tx, tables::META)?;
        let Some(v) = table.get(name).map_err(|e| StoreError::db("read", e))? else {
            return Ok(None);
        };
        self.open_state(name, v.value()).map(Some)
    }

    /// Bumped after every commit: a reader's cache built at an older generation is stale.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current snapshot, rebuilt if a commit happened since it was taken. The generation
    /// is read before the transaction begins, so a snapshot is never newer than its tag says
    /// and never kept after a later commit.
    fn snapshot(&self) -> Result<Arc<Snapshot>, StoreError> {
        self.recover_for_read();
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(s) = self
            .snapshot
            .read()
            .map_err(|_| StoreError::Poisoned)?
            .as_ref()
            && s.generation == generation
            && s.taken.elapsed() < SNAPSHOT_MAX_AGE
        {
            return Ok(Arc::clone(s));
        }
        let tx = self.read_tx()?;
        let fresh = Arc::new(Snapshot {
            generation,
            taken: std::time::Instant::now(),
            patients: tables::open_read(&tx, tables::PATIENTS)?,
        });
        let mut slot = self.snapshot.write().map_err(|_| StoreError::Poisoned)?;
        if slot
            .as_ref()
            .is_none_or(|s| s.generation < generation || s.taken < fresh.taken)
        {
            *slot = Some(Arc::clone(&fresh));
        }
        Ok(fresh)
    }

    /// Marks every snapshot stale; call after each commit. The cached one is dropped at once:
    /// a read transaction kept alive would stop redb reusing the pages later commits free.
    fn committed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Ok(mut slot) = self.snapshot.write() {
            *slot = None;
        }
    }

    /// The database, reopened first if a write failed in it since.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        let current = self.db.read().map_err(|_| StoreError::Poisoned)?.clone();
        current.ok_or(StoreError::Unavailable)
    }

    /// After a failed write, redb answers every later transaction with "previous I/O
    /// error" until the database is reopened: the disk filled, say, and space has come
    /// back since. Reopens it (when this store opened it from its file) and settles the
    /// key slots the failed commit left, as an open does. While the disk is still full
    /// this fails and is tried again at the next write.
    fn recover(&self) -> Result<(), StoreError> {
        if !self.db_failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let Some(path) = &self.db_path else {
            return Ok(());
        };
        let mut ring = self.ring()?;
        let mut slot = self.db.write().map_err(|_| StoreError::Poisoned)?;
        if let Ok(mut snap) = self.snapshot.write() {
            *snap = None;
        }
        if let Some(old) = slot.take() {
            // Transactions in flight hold the database briefly; wait for them.
            let mut old = old;
            for _ in 0..200 {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still) => {
                        old = still;
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .open(path)
            .map_err(|e| StoreError::db("reopen database", e))?;
        let orphans = if ring.has_unsettled() {
            let referenced: HashSet<u32> = slot_owners(&db)?.into_iter().map(|o| o.0).collect();
            ring.reconcile(&referenced)?
        } else {
            0
        };
        *slot = Some(Arc::new(db));
        drop(slot);
        self.db_failed.store(false, Ordering::Release);
        self.committed();
        tracing::warn!(orphans, "database reopened after a failed write");
        Ok(())
    }

    /// A failed write leaves redb refusing reads too ("previous I/O error") until the
    /// database is reopened: a reader reopens it rather than wait for the next write (a
    /// full disk refuses audit entries, and the device's status must still be read).
    /// Never called with the keyring lock held (recovery takes it).
    fn recover_for_read(&self) {
        if self.db_failed.load(Ordering::Acquire)
            && let Err(e) = self.recover()
        {
            tracing::warn!(error = %e, "the database could not be reopened after a failed write");
        }
    }

    fn ring(&self) -> Result<MutexGuard<'_, keyring::Keyring>, StoreError> {
        self.keyring.lock().map_err(|_| StoreError::Poisoned)
    }

    /// A read transaction on the database as of the latest commit.
    fn read_tx(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.recover_for_read();
        self.db()?
            .begin_read()
            .map_err(|e| StoreError::db("read", e))
    }

    /// A write transaction. Callers run [`Self::recover`] first, before taking the
    /// keyring lock (recovery takes it too).
    fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
        self.db()?
            .begin_write()
            .map_err(|e| self.write_failed("begin write", e))
    }

    /// A write failed in the database: the next one reopens it first ([`Self::recover`]).
    fn write_failed(&self, what: &'static str, e: impl Into<redb::Error>) -> StoreError {
        self.db_failed.store(true, Ordering::Release);
        StoreError::db(what, e)
    }

    /// Runs `f` in one write transaction. New data keys are made durable in the keyring before
    /// the commit; keys of purged rows are destroyed after it. On error nothing is applied and
    /// the keys written for it are destroyed again.
    /// One durable write transaction. A commit that destroys a key (or asks to count)
    /// writes the anchor's next count in the same transaction and advances the anchor
    /// after it: a copy taken before it then shows a count behind the anchor's.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut anchor = self.anchor.lock().map_err(|_| StoreError::Poisoned)?;
        let next = anchor.as_ref().map(|a| AnchorBinding {
            count: a.known.saturating_add(1),
            ..a.binding.clone()
        });
        let mut counted = false;
        let out = self.write_inner(|w| {
            let v = f(w)?;
            if let Some(next) = &next
                && (w.count_anchor || !w.destroyed.is_empty())
            {
                w.put_state(tables::ANCHOR, next)?;
                counted = true;
            }
            Ok(v)
        })?;
        if counted && let (Some(guard), Some(next)) = (anchor.as_mut(), next) {
            self.advance_anchor(guard, next.count);
        }
        Ok(out)
    }

    /// Advances the anchor to the count a commit just wrote. A failure leaves the store
    /// one ahead (completed at the next purge or open) and is reported, never fatal: a
    /// purge is never held back by its anchor.
    fn advance_anchor(&self, guard: &mut AnchorGuard, expected: u64) {
        match guard.counter.advance() {
            Ok(v) => {
                guard.unavailable = None;
                if v < expected {
                    // The counter went back: the anchor was reset under the live store.
                    // The count stays ahead, and the next open finds the anchor lost.
                    guard.unavailable = Some("the counter went backwards".to_owned());
                    tracing::error!(
                        anchor = %guard.binding.what,
                        "the anti-rollback counter went backwards; the store is reset at its next open"
                    );
                    return;
                }
                guard.known = v;
                if v > expected {
                    // Something else advanced it too: this live store follows.
                    let binding = AnchorBinding {
                        count: v,
                        ..guard.binding.clone()
                    };
                    if let Err(e) = self.write_inner(|w| w.put_state(tables::ANCHOR, &binding)) {
                        tracing::warn!(error = %e, "the anti-rollback count could not be written");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the anti-rollback anchor was not advanced; retried at the next purge");
                guard.unavailable = Some(e.to_string());
            }
        }
    }

    /// Binds the store to `counter` and checks it is the live copy (see
    /// [`crate::anchor`]). A restored or foreign copy has its patients and leases
    /// destroyed and its cursor dropped here, before anything can be served, with
    /// `on_reset` (the device's state for it) written in the same commit. Fails only when
    /// the counter cannot be read or made (the store is then not to be served) or the
    /// store cannot be written; an advance that fails after a commit is reported by
    /// [`Self::anchor_info`] and retried at the next purge.
    pub fn bind_anchor(
        &self,
        counter: Arc<dyn Counter>,
        on_reset: impl FnOnce(RestoreReason) -> Result<Extras, StoreError>,
    ) -> Result<AnchorCheck, StoreError> {
        enum Plan {
            Verified(u64),
            Complete(u64),
            Fresh,
            Next(u64),
            Reset(RestoreReason),
        }
        let stored: Option<AnchorBinding> = self.get_state(tables::ANCHOR)?;
        let kind = counter.kind();
        let what = counter.describe();
        let same = stored
            .as_ref()
            .is_none_or(|b| b.kind == kind && b.what == what);
        let current = counter.read()?;
        let plan = match (&stored, current) {
            (Some(_), _) if !same => Plan::Reset(RestoreReason::AnchorLost),
            (Some(_), None) => Plan::Reset(RestoreReason::AnchorLost),
            (Some(b), Some(n)) if b.count == n => Plan::Verified(n),
            // A commit counted, then the process stopped before its advance.
            (Some(b), Some(n)) if Some(b.count) == n.checked_add(1) => Plan::Complete(n),
            (Some(b), Some(n)) if b.count < n => Plan::Reset(RestoreReason::Behind),
            (Some(_), Some(_)) => Plan::Reset(RestoreReason::AnchorLost),
            (None, None) => Plan::Fresh,
            (None, Some(n)) => {
                let stats = self.stats()?;
                if stats.patients == 0 && stats.leases == 0 {
                    // A new store on a machine whose anchor served an earlier one.
                    Plan::Next(n)
                } else {
                    Plan::Reset(RestoreReason::Unbound)
                }
            }
        };
        let binding = |count| AnchorBinding {
            kind,
            what: what.clone(),
            count,
        };
        let set = |known: u64| -> Result<(), StoreError> {
            *self.anchor.lock().map_err(|_| StoreError::Poisoned)? = Some(AnchorGuard {
                counter: Arc::clone(&counter),
                binding: binding(known),
                known,
                unavailable: None,
            });
            Ok(())
        };
        // One count on, in its own commit (and the advance after it).
        let count_once = || {
            self.write(|w| {
                w.count_anchor = true;
                Ok(())
            })
        };
        match plan {
            Plan::Verified(n) => {
                set(n)?;
                Ok(AnchorCheck::Verified)
            }
            Plan::Complete(n) => {
                set(n)?;
                count_once()?;
                Ok(AnchorCheck::Verified)
            }
            Plan::Fresh => {
                let n = counter.create()?;
                self.write_inner(|w| w.put_state(tables::ANCHOR, &binding(n)))?;
                set(n)?;
                Ok(AnchorCheck::Bound)
            }
            Plan::Next(n) => {
                // One count on, so that no copy of the earlier store matches this one.
                set(n)?;
                count_once()?;
                Ok(AnchorCheck::Bound)
            }
            Plan::Reset(reason) => {
                let n = match current {
                    Some(n) if same => n,
                    _ => counter.create()?,
                };
                let extras = on_reset(reason)?;
                set(n)?;
                let (patients, leases) = self.write(|w| {
                    w.count_anchor = true;
                    let patients = w.purge_all_but(&HashSet::new())?;
                    let leases = w.remove_all_leases()?;
                    w.delete_state(tables::CURSOR)?;
                    w.put_extras(&extras)?;
                    Ok((patients, leases))
                })?;
                Ok(AnchorCheck::Restored {
                    reason,
                    patients: u64::try_from(patients).unwrap_or(u64::MAX),
                    leases,
                })
            }
        }
    }

    /// One count on the anti-rollback anchor in a commit of its own (before a wipe), if
    /// the store is bound to one.
    pub fn count_anchor(&self) -> Result<(), StoreError> {
        self.write(|w| {
            w.count_anchor = true;
            Ok(())
        })
    }

    /// The anchor this store is bound to, as last seen: `None` if it is not bound in
    /// this process; `Some` with `unavailable` if its last advance failed.
    pub fn anchor_info(&self) -> Result<Option<AnchorInfo>, StoreError> {
        let anchor = self.anchor.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(anchor.as_ref().map(|g| AnchorInfo {
            kind: g.binding.kind,
            what: g.binding.what.clone(),
            count: g.known,
            unavailable: g.unavailable.clone(),
        }))
    }

    /// The anchor a store was bound to, read from its sealed state (kind and which
    /// counter): a store bound once is never opened for service without it.
    pub fn anchor_binding(&self) -> Result<Option<(AnchorKind, String)>, StoreError> {
        let stored: Option<AnchorBinding> = self.get_state(tables::ANCHOR)?;
        Ok(stored.map(|b| (b.kind, b.what)))
    }

    fn write_inner<T>(
        &self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.recover()?;
        let mut ring = self.ring()?;
        let tx = self.begin_write()?;
        let (result, allocated, destroyed) = match Writer::new(&tx, &mut ring, self) {
            Ok(mut w) => {
                let result = f(&mut w);
                (result, w.allocated, w.destroyed)
            }
            Err(e) => (Err(e), Vec::new(), Vec::new()),
        };
        // New keys (pending) and the keys of deleted rows (dying) are durable before the
        // commit; see keyring.rs for how a crash on either side of it is settled.
        let prepared = result.and_then(|v| {
            if !allocated.is_empty() || !destroyed.is_empty() {
                ring.mark_dying(&destroyed)?;
                ring.sync()?;
            }
            Ok(v)
        });
        let outcome = match prepared {
            Ok(v) => match tx.commit() {
                Ok(()) => {
                    self.committed();
                    Ok(v)
                }
                Err(e) => {
                    self.db_failed.store(true, Ordering::Release);
                    // A commit that failed at its last write or sync may still be on the
                    // disk, so whether its rows exist is unknown until the next open: its
                    // new keys stay pending and the keys of its deleted rows stay dying
                    // (both still open their rows), and the next open settles each by
                    // whether a row refers to it. Destroying them now could leave
                    // committed rows without keys.
                    self.forget_keys(&allocated)?;
                    ring.leave_unsettled(&allocated);
                    ring.leave_unsettled(&destroyed);
                    tracing::warn!(
                        "a commit failed; its key slots are settled when the database is reopened"
                    );
                    return Err(StoreError::db("commit", e));
                }
            },
            Err(e) => Err(e),
        };
        let outcome = match outcome {
            Ok(v) => v,
            Err(e) => {
                self.forget_keys(&allocated)?;
                let cleanup = ring
                    .destroy(&allocated)
                    .and_then(|()| ring.confirm(&destroyed));
                if let Err(cleanup) = cleanup {
                    tracing::warn!(error = %cleanup, "key slots left unsettled; they are settled at next open");
                }
                return Err(e);
            }
        };
        self.forget_keys(&destroyed)?;
        ring.destroy(&destroyed)?;
        ring.confirm(&allocated)?;
        Ok(outcome)
    }

    /// Keeps an unwrapped data key for later reads. The cache is bounded so that memory
    /// stays flat however many patients the device holds: when full it starts again.
    fn cache_key(&self, slot: u32, key: &Secret32) -> Result<(), StoreError> {
        self.data_keys
            .write()
            .map_err(|_| StoreError::Poisoned)?
            .insert(slot, key);
        Ok(())
    }

    /// Drops every cached data key (after a remote wipe, nothing may be read again).
    pub fn forget_keys_all(&self) {
        if let Ok(mut cache) = self.data_keys.write() {
            cache.clear();
        }
        self.committed();
    }

    fn forget_keys(&self, slots: &[u32]) -> Result<(), StoreError> {
        let mut cache = self.data_keys.write().map_err(|_| StoreError::Poisoned)?;
        for &s in slots {
            cache.remove(s);
        }
        Ok(())
    }
}

/// The state of one write transaction: its open tables, the keyring (locked for the whole
/// transaction), and the key slots it wrote and freed.
struct Writer<'a> {
    patients: redb::Table<'a, [u8; 16], &'static [u8]>,
    leases: redb::Table<'a, u64, &'static [u8]>,
    objections: redb::Table<'a, [u8; 16], &'static [u8]>,
    meta: redb::Table<'a, &'static str, &'static [u8]>,
    ring: &'a mut keyring::Keyring,
    store: &'a Store,
    allocated: Vec<u32>,
    destroyed: Vec<u32>,
    /// Count this commit on the anti-rollback anchor even if it destroys no key.
    count_anchor: bool,
}

impl<'a> Writer<'a> {
    fn new(
        tx: &'a WriteTransaction,
        ring: &'a mut keyring::Keyring,
        store: &'a Store,
    ) -> Result<Self, StoreError> {
        Ok(Writer {
            patients: tables::open_write(tx, tables::PATIENTS)?,
            leases: tables::open_write(tx, tables::LEASES)?,
            objections: tables::open_write(tx, tables::OBJECTIONS)?,
            meta: tables::open_write(tx, tables::META)?,
            ring,
            store,
            allocated: Vec::new(),
            destroyed: Vec::new(),
            count_anchor: false,
        })
    }

    fn put_record(&mut self, record: &PatientRecord) -> Result<(), StoreError> {
        let row = RowKey::of(&self.store.keys.index, &record.nhs_number);
        if self.objection_status(row)? == Some(ObjectionStatus::Objected) {
            return Err(StoreError::Refused("record for a patient who has objected"));
        }
        let existing = match self
            .patients
            .get(row.0)
            .map_err(|e| StoreError::db("write", e))?
        {
            Some(v) => Some(tables::split_slot(v.value())?.0),
            None => None,
        };
        let (slot, key) = match existing {
            Some(slot) => (slot, self.data_key(slot, Scope::Patient(row))?),
            None => self.allocate(Scope::Patient(row))?,
        };
        let plain = tables::pack_record(
            record.nhs_number.as_u64(),
            record.version.0,
            &encode(record)?,
        )?;
        let value = tables::seal_with_slot(slot, &key, Table::Patients, &row.0, &plain)?;
        self.patients
            .insert(row.0, value.as_slice())
            .map_err(|e| StoreError::db("write", e))?;
        Ok(())
    }

    fn purge_patient(&mut self, nhs: &NhsNumber) -> Result<bool, StoreError> {
        let row = RowKey::of(&self.store.keys.index, nhs);
        let slot = match self
            .patients
            .remove(row.0)
            .map_err(|e| StoreError::db("purge", e))?
        {
            Some(v) => tables::split_slot(v.value())?.0,
            None => return Ok(false),
        };
        self.destroyed.push(slot);
        Ok(true)
    }

    /// Purges every held patient not in `keep`; returns how many.
    fn purge_all_but(&mut self, keep: &HashSet<NhsNumber>) -> Result<usize, StoreError> {
        let index = &self.store.keys.index;
        let keep: HashSet<[u8; 16]> = keep.iter().map(|n| RowKey::of(index, n).0).collect();
        let mut doomed = Vec::new();
        for item in self
            .patients
            .iter()
            .map_err(|e| StoreError::db("read", e))?
        {
            let (k, v) = item.map_err(|e| StoreError::db("read", e))?;
            if !keep.contains(&k.value()) {
                doomed.push((k.value(), tables::split_slot(v.value())?.0));
            }
        }
        for (row, slot) in &doomed {
            self.patients
                .remove(*row)
                .map_err(|e| StoreError::db("purge", e))?;
            self.destroyed.push(*slot);
        }
        Ok(doomed.len())
    }

    fn put_extras(&mut self, extras: &Extras) -> Result<(), StoreError> {
        for (key, value) in &extras.state {
            let name = device_key(key);
            let sealed = tables::seal(&self.store.keys.state, Table::Meta, name.as_bytes(), value)?;
            self.meta
                .insert(name.as_str(), sealed.as_slice())
                .map_err(|e| StoreError::db("write", e))?;
        }
        Ok(())
    }

    fn objection(&mut self, o: &ObjectionChange) -> Result<(), StoreError> {
        let row = RowKey::of(&self.store.keys.index, &o.nhs_number);
        match o.status {
            ObjectionStatus::Objected => {
                let plain = encode(o)?;
                let sealed =
                    tables::seal(&self.store.keys.state, Table::Objections, &row.0, &plain)?;
                self.objections
                    .insert(row.0, sealed.as_slice())
                    .map_err(|e| StoreError::db("write", e))?;
            }
            ObjectionStatus::Withdrawn => {
                self.objections
                    .remove(row.0)
                    .map_err(|e| StoreError::db("write", e))?;
            }
        }
        Ok(())
    }

    fn objection_status(&self, row: RowKey) -> Result<Option<ObjectionStatus>, StoreError> {
        let Some(v) = self
            .objections
            .get(row.0)
            .map_err(|e| StoreError::db("read", e))?
        else {
            return Ok(None);
        };
        let plain = tables::unseal(&self.store.keys.state, Table::Objections, &row.0, v.value())?;
        let o: ObjectionChange = decode(&plain, Table::Objections)?;
        Ok(Some(o.status))
    }

    /// Writes a lease; returns the patients it no longer names (candidates for purge).
    fn put_lease(&mut self, lease: &Lease) -> Result<BTreeSet<NhsNumber>, StoreError> {
        let id = lease.id.0;
        let existing = match self
            .leases
            .get(id)
            .map_err(|e| StoreError::db("write", e))?
        {
            Some(v) => Some((
                tables::split_slot(v.value())?.0,
                self.open_lease(id, v.value())?,
            )),
            None => None,
        };
        let (slot, key, dropped) = match existing {
            Some((slot, old)) => {
                let now: BTreeSet<_> = lease.patients.iter().copied().collect();
                let dropped = old
                    .patients
                    .iter()
                    .copied()
                    .filter(|p| !now.contains(p))
                    .collect();
                (slot, self.data_key(slot, Scope::Lease(id))?, dropped)
            }
            None => {
                let (slot, key) = self.allocate(Scope::Lease(id))?;
                (slot, key, BTreeSet::new())
            }
        };
        let plain = encode(lease)?;
        let value = tables::seal_with_slot(slot, &key, Table::Leases, &id.to_be_bytes(), &plain)?;
        self.leases
            .insert(id, value.as_slice())
            .map_err(|e| StoreError::db("write", e))?;
        Ok(dropped)
    }

    /// Removes a lease and destroys its key; returns the patients it named.
    fn remove_lease(&mut self, id: LeaseId) -> Result<BTreeSet<NhsNumber>, StoreError> {
        let Some(value) = self
            .leases
            .remove(id.0)
            .map_err(|e| StoreError::db("write", e))?
            .map(|v| v.value().to_vec())
        else {
            return Ok(BTreeSet::new());
        };
        let lease = self.open_lease(id.0, &value)?;
        let slot = tables::split_slot(&value)?.0;
        self.destroyed.push(slot);
        Ok(lease.patients.iter().copied().collect())
    }

    /// Ends every lease (rows deleted, keys destroyed); returns how many.
    fn remove_all_leases(&mut self) -> Result<u64, StoreError> {
        let mut ids = Vec::new();
        for item in self.leases.iter().map_err(|e| StoreError::db("read", e))? {
            let (k, _) = item.map_err(|e| StoreError::db("read", e))?;
            ids.push(k.value());
        }
        for id in &ids {
            self.remove_lease(LeaseId(*id))?;
        }
        Ok(u64::try_from(ids.len()).unwrap_or(u64::MAX))
    }

    fn delete_state(&mut self, name: &str) -> Result<(), StoreError> {
        self.meta
            .remove(name)
            .map_err(|e| StoreError::db("write", e))?;
        Ok(())
    }

    /// Every patient some remaining lease names.
    fn covered(&self) -> Result<BTreeSet<NhsNumber>, StoreError> {
        let mut out = BTreeSet::new();
        for item in self.leases.iter().map_err(|e| StoreError::db("read", e))? {
            let (k, v) = item.map_err(|e| StoreError::db("read", e))?;
            out.extend(
                self.open_lease(k.value(), v.value())?
                    .patients
                    .iter()
                    .copied(),
            );
        }
        Ok(out)
    }

    fn put_state<T: Serialize>(&mut self, name: &str, value: &T) -> Result<(), StoreError> {
        let sealed = self.store.seal_state(name, value)?;
        self.meta
            .insert(name, sealed.as_slice())
            .map_err(|e| StoreError::db("write", e))?;
        Ok(())
    }

    /// A data key, through the keyring this transaction holds (never the store's lock).
    fn data_key(&self, slot: u32, scope: Scope) -> Result<Secret32, StoreError> {
        self.store.data_key(slot, scope)
    }

    fn open_lease(&self, id: u64, value: &[u8]) -> Result<Lease, StoreError> {
        let (slot, _) = tables::split_slot(value)?;
        let key = self.data_key(slot, Scope::Lease(id))?;
        self.store.open_lease_with(&key, id, value)
    }

    fn allocate(&mut self, scope: Scope) -> Result<(u32, Secret32), StoreError> {
        let (slot, key) = self.ring.allocate(scope, &self.store.keys.wrap)?;
        self.allocated.push(slot);
        // Not cached: a sync writes every patient once, and a read unwraps the key when
        // it is wanted (keeping memory flat while a caseload arrives).
        Ok((slot, key))
    }
}

/// How many rows own a data key (patients and leases), from the tables' stored lengths.
fn key_owner_count(db: &Database) -> Result<u64, StoreError> {
    use redb::ReadableTableMetadata;
    let tx = db.begin_read().map_err(|e| StoreError::db("read", e))?;
    let patients = tables::open_read(&tx, tables::PATIENTS)?;
    let leases = tables::open_read(&tx, tables::LEASES)?;
    let patients = patients.len().map_err(|e| StoreError::db("read", e))?;
    let leases = leases.len().map_err(|e| StoreError::db("read", e))?;
    Ok(patients.saturating_add(leases))
}

/// Every row that owns a data key, with its keyring slot.
fn slot_owners(db: &Database) -> Result<Vec<(u32, Scope)>, StoreError> {
    let tx = db.begin_read().map_err(|e| StoreError::db("read", e))?;
    let mut out = Vec::new();
    let patients = tables::open_read(&tx, tables::PATIENTS)?;
    for item in patients.iter().map_err(|e| StoreError::db("read", e))? {
        let (k, v) = item.map_err(|e| StoreError::db("read", e))?;
        let slot = tables::split_slot(v.value())?.0;
        out.push((slot, Scope::Patient(RowKey(k.value()))));
    }
    let leases = tables::open_read(&tx, tables::LEASES)?;
    for item in leases.iter().map_err(|e| StoreError::db("read", e))? {
        let (k, v) = item.map_err(|e| StoreError::db("read", e))?;
        out.push((tables::split_slot(v.value())?.0, Scope::Lease(k.value())));
    }
    Ok(out)
}

/// Work done in the same transaction as a batch or a purge: device-state values to write
/// and, after a full resync, the set of patients to keep.
#[derive(Default)]
pub struct Extras {
    /// Purge every held patient not in this set.
    pub keep_only: Option<HashSet<NhsNumber>>,
    state: Vec<(&'static str, Zeroizing<Vec<u8>>)>,
}

impl std::fmt::Debug for Extras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Extras")
            .field("keep_only", &self.keep_only.as_ref().map(HashSet::len))
            .field(
                "state",
                &self.state.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Extras {
    /// Writes device-state `key` = `value` (postcard, sealed under the state key).
    pub fn set<T: Serialize>(&mut self, key: &'static str, value: &T) -> Result<(), StoreError> {
        let bytes = encode(value)?;
        self.state.retain(|(k, _)| *k != key);
        self.state.push((key, bytes));
        Ok(())
    }
}

/// Device-state keys live in their own namespace of the meta table.
fn device_key(key: &str) -> String {
    format!("device.{key}")
}

fn encode<T: Serialize>(value: &T) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    // Sized up front so the buffer is not reallocated (leaving unzeroized copies) for
    // records of ordinary size.
    postcard::to_extend(value, Vec::with_capacity(4096))
        .map(Zeroizing::new)
        .map_err(|_| StoreError::Encode)
}

/// A decrypted value and the schema version it was sealed under.
type Unsealed = (u8, Zeroizing<Vec<u8>>);

/// A record by the schema it was sealed under: schemas 1 and 2 held protocol-version-1
/// and -2 records, read as the current record (nothing is lost: each is a subset).
fn decode_record(version: u8, plain: &[u8]) -> Result<PatientRecord, StoreError> {
    use sync_protocol::record::{v1, v2};
    match version {
        1 => decode::<v1::PatientRecord>(plain, Table::Patients).map(PatientRecord::from),
        2 => decode::<v2::PatientRecord>(plain, Table::Patients).map(PatientRecord::from),
        _ => decode(plain, Table::Patients),
    }
}

fn decode<T: DeserializeOwned>(plain: &[u8], table: Table) -> Result<T, StoreError> {
    match postcard::take_from_bytes::<T>(plain) {
        Ok((v, [])) => Ok(v),
        _ => Err(StoreError::Damaged(table.name())),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("sync data directory", dir, e))
}

/// Bytes the files of a data directory take (its top level: the database, the keyring
/// and their companions); 0 where it cannot be read.
pub fn disk_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .filter(fs::Metadata::is_file)
            .map(|m| m.len())
            .sum()
    })
}

/// Destroys a data directory: the keyring is overwritten and removed first (after which
/// nothing in the directory opens), then the database and the directory itself.
pub fn wipe(dir: &Path) -> Result<(), StoreError> {
    let had_keys = keyring::shred(dir)?;
    sync_dir(dir)?;
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && had_keys => {}
        Err(e) => return Err(StoreError::io("remove data directory", dir, e)),
    }
    tracing::info!(keys_destroyed = had_keys, "data directory wiped");
    Ok(())
}
