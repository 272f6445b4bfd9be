//! The embedded engine: one redb file (`hub.redb`) that one hub process owns. Its tables
//! and their encodings are the hub's database format since the first hub; a database
//! from an older hub is brought forward at open (record formats, the summary table,
//! content hashes).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::Deserialize;
use sync_protocol::record::PatientRecord;

use super::{AuditVisit, Engine, Guard, R, Read, Write};
use crate::audit::ChainHead;
use crate::fleet::{AnchorRow, HealthRow};
use crate::state::{
    DeviceRow, LeaseRow, LogKey, LookupRow, ObjectionRow, PatientRow, RenewalRow, StateError,
    TokenRow, dec, enc, summary_of,
};

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const PATIENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("patients");
const OBJECTIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("objections");
const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const CERTS: TableDefinition<&[u8], &str> = TableDefinition::new("certificates");
const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("enrolment_tokens");
/// One-time tokens that re-certify an enrolled device whose certificate ended (SHA-256
/// of the token → `RenewalRow`).
const RENEWALS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("renewal_tokens");
const SOURCE: TableDefinition<&str, &[u8]> = TableDefinition::new("source");
/// Lookups granted (SPEC §3.8), by number: JSON `LookupRow`s for review.
const LOOKUPS: TableDefinition<u64, &[u8]> = TableDefinition::new("lookups");
/// Leases granted by lookups: their device received the record with the grant, so a
/// pull offers it rather than sending it again.
const LOOKUP_LEASES: TableDefinition<u64, ()> = TableDefinition::new("lookup_leases");
/// Per patient, what a pull needs without reading the record: its version (0 once
/// deleted upstream) and whether it carries alerts (sent first). Kept with `patients`
/// in every transaction that writes it; built from `patients` at open when missing.
const SUMMARY: TableDefinition<u64, (u64, bool)> = TableDefinition::new("summary");
/// Per patient, the SHA-256 of the record as last mapped (version aside). Kept with
/// `patients`; a patient without a row (a database from before it) is compared whole
/// once and gets one.
const CONTENT: TableDefinition<u64, [u8; 32]> = TableDefinition::new("content");
/// Device id → its last checkin (`HealthRow`).
const HEALTH: TableDefinition<&str, &[u8]> = TableDefinition::new("device_health");
/// Device id → its anti-rollback anchor and the restored copies it found (`AnchorRow`).
const ANCHORS: TableDefinition<&str, &[u8]> = TableDefinition::new("device_anchor");
/// (device, seq) → hash ‖ record bytes as received.
const AUDIT: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("audit");
/// device → chain head.
const HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("audit_heads");
/// Index for complaints: (NHS number, device, seq) of every access naming the patient.
const BY_PATIENT: TableDefinition<(u64, &str, u64), ()> = TableDefinition::new("audit_by_patient");
/// Index for review: (device, seq) of every emergency (ETREAT) access and lookup.
const EMERGENCY: TableDefinition<(&str, u64), ()> = TableDefinition::new("audit_emergency");
/// What privacy officers did through the hub, by sequence: postcard `OfficerAction`.
const OFFICER_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("officer_log");
/// How far each device's audit is forwarded upstream: device → highest sequence sent.
const FORWARDED: TableDefinition<&str, u64> = TableDefinition::new("audit_forwarded");

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StateError {
            fn from(e: $t) -> Self {
                Self::Database(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// The record format the hub stores: the sync protocol version of its records — 2 (codes
/// of any system, provenance without ODS, partial objections, unreadable counts), 3 (a
/// medication's structured dosage). A database with no `records` key holds version-1
/// records.
pub(crate) const RECORDS_FORMAT: u32 = 3;

/// The hub's redb database.
#[derive(Debug)]
pub(crate) struct RedbEngine {
    db: Database,
    hub_id: [u8; 8],
    path: std::path::PathBuf,
    /// Held by the one ingest running.
    ingesting: std::sync::Mutex<()>,
    /// Held by the one audit forwarding pass running.
    forwarding: std::sync::Mutex<()>,
}

impl RedbEngine {
    /// Open (creating if needed) the database at `path` with a page cache of
    /// `cache_bytes`.
    pub(crate) fn open(path: &Path, cache_bytes: usize) -> R<Self> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)?;
        let tx = db.begin_write()?;
        let hub_id = {
            for t in [PATIENTS, OBJECTIONS, LEASES, LOG] {
                tx.open_table(t)?;
            }
            let mut content = tx.open_table(CONTENT)?;
            for t in [DEVICES, SOURCE, HEALTH, ANCHORS, HEADS] {
                tx.open_table(t)?;
            }
            tx.open_table(CERTS)?;
            tx.open_table(TOKENS)?;
            tx.open_table(RENEWALS)?;
            tx.open_table(LOOKUPS)?;
            tx.open_table(LOOKUP_LEASES)?;
            tx.open_table(AUDIT)?;
            tx.open_table(BY_PATIENT)?;
            tx.open_table(EMERGENCY)?;
            let mut meta = tx.open_table(META)?;
            migrate_records(&tx, &mut meta)?;
            build_summary(&tx, &mut meta)?;
            // Content hashes are of the record format they were made in: after a format
            // change they are dropped, and each patient is compared whole once.
            let format = RECORDS_FORMAT.to_le_bytes();
            if meta.get("content_format")?.map(|v| v.value().to_vec()) != Some(format.to_vec()) {
                content.retain(|_, _| false)?;
                meta.insert("content_format", format.as_slice())?;
            }
            let existing = meta
                .get("hub_id")?
                .and_then(|v| <[u8; 8]>::try_from(v.value()).ok());
            match existing {
                Some(id) => id,
                None => {
                    let id = super::new_hub_id()?;
                    meta.insert("hub_id", id.as_slice())?;
                    id
                }
            }
        };
        tx.commit()?;
        Ok(Self {
            db,
            hub_id,
            path: path.to_path_buf(),
            ingesting: std::sync::Mutex::new(()),
            forwarding: std::sync::Mutex::new(()),
        })
    }
}

impl Engine for RedbEngine {
    fn hub_id(&self) -> [u8; 8] {
        self.hub_id
    }

    fn read(&self) -> R<Box<dyn Read + '_>> {
        Ok(Box::new(RedbRead {
            tx: self.db.begin_read()?,
        }))
    }

    fn write(&self) -> R<Box<dyn Write + '_>> {
        Ok(Box::new(RedbWrite {
            tx: self.db.begin_write()?,
        }))
    }

    fn ingest_guard(&self) -> R<Box<dyn Guard + '_>> {
        // An ingest that panicked left nothing half-written (each batch is one
        // transaction): the lock is still good.
        Ok(Box::new(
            self.ingesting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ))
    }

    fn remote(&self) -> bool {
        false
    }

    fn try_forward_guard(&self) -> R<Option<Box<dyn Guard + '_>>> {
        Ok(match self.forwarding.try_lock() {
            Ok(g) => Some(Box::new(g)),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(Box::new(p.into_inner())),
            Err(std::sync::TryLockError::WouldBlock) => None,
        })
    }

    fn describe(&self) -> String {
        format!("redb at {}", self.path.display())
    }
}

struct RedbRead {
    tx: redb::ReadTransaction,
}

struct RedbWrite {
    tx: redb::WriteTransaction,
}

/// The [`Read`] methods, for a read and a write transaction alike.
macro_rules! read_impl {
    ($ty:ty) => {
        impl Read for $ty {
            fn head(&mut self) -> R<u64> {
                read_seq(&self.tx.open_table(META)?)
            }

            fn patient(&mut self, nhs: u64) -> R<Option<PatientRow>> {
                let t = self.tx.open_table(PATIENTS)?;
                let row = t.get(nhs)?;
                row.map(|v| dec(v.value(), "patients")).transpose()
            }

            fn summaries(&mut self, nhs: &[u64]) -> R<HashMap<u64, (u64, bool)>> {
                let t = self.tx.open_table(SUMMARY)?;
                let mut out = HashMap::with_capacity(nhs.len());
                for &n in nhs {
                    if let Some(v) = t.get(n)? {
                        out.insert(n, v.value());
                    }
                }
                Ok(out)
            }

            fn content_hashes(&mut self, nhs: &[u64]) -> R<HashMap<u64, [u8; 32]>> {
                let t = self.tx.open_table(CONTENT)?;
                let mut out = HashMap::with_capacity(nhs.len());
                for &n in nhs {
                    if let Some(v) = t.get(n)? {
                        out.insert(n, v.value());
                    }
                }
                Ok(out)
            }

            fn held(&mut self, f: &mut dyn FnMut(u64) -> R<()>) -> R<()> {
                for item in self.tx.open_table(SUMMARY)?.iter()? {
                    let (k, v) = item?;
                    if v.value().0 != 0 {
                        f(k.value())?;
                    }
                }
                Ok(())
            }

            fn held_fhir_ids(&mut self, f: &mut dyn FnMut(u64, &str) -> R<()>) -> R<()> {
                for item in self.tx.open_table(PATIENTS)?.iter()? {
                    let (k, v) = item?;
                    let row: PatientRow = dec(v.value(), "patients")?;
                    if row.record.is_some() {
                        f(k.value(), &row.fhir_id)?;
                    }
                }
                Ok(())
            }

            fn objection(&mut self, nhs: u64) -> R<Option<ObjectionRow>> {
                let t = self.tx.open_table(OBJECTIONS)?;
                let row = t.get(nhs)?;
                row.map(|v| dec(v.value(), "objections")).transpose()
            }

            fn objections(&mut self, nhs: &[u64]) -> R<HashMap<u64, ObjectionRow>> {
                let t = self.tx.open_table(OBJECTIONS)?;
                let mut out = HashMap::new();
                for &n in nhs {
                    if let Some(v) = t.get(n)? {
                        out.insert(n, dec(v.value(), "objections")?);
                    }
                }
                Ok(out)
            }

            fn log_after(&mut self, seq: u64, f: &mut dyn FnMut(LogKey) -> R<()>) -> R<()> {
                for item in self.tx.open_table(LOG)?.range(seq.saturating_add(1)..)? {
                    let (_, v) = item?;
                    f(dec(v.value(), "log")?)?;
                }
                Ok(())
            }

            fn lease(&mut self, id: u64) -> R<Option<LeaseRow>> {
                let t = self.tx.open_table(LEASES)?;
                let row = t.get(id)?;
                row.map(|v| dec(v.value(), "leases")).transpose()
            }

            fn leases(&mut self) -> R<Vec<LeaseRow>> {
                let mut out = Vec::new();
                for item in self.tx.open_table(LEASES)?.iter()? {
                    let (_, v) = item?;
                    out.push(dec(v.value(), "leases")?);
                }
                Ok(out)
            }

            fn is_lookup_lease(&mut self, id: u64) -> R<bool> {
                Ok(self.tx.open_table(LOOKUP_LEASES)?.get(id)?.is_some())
            }

            fn lookups(&mut self) -> R<Vec<LookupRow>> {
                let mut out = Vec::new();
                for item in self.tx.open_table(LOOKUPS)?.iter()? {
                    let (_, v) = item?;
                    out.push(
                        serde_json::from_slice(v.value())
                            .map_err(|_| StateError::Corrupt("lookups"))?,
                    );
                }
                Ok(out)
            }

            fn device(&mut self, id: &str) -> R<Option<DeviceRow>> {
                let t = self.tx.open_table(DEVICES)?;
                let row = t.get(id)?;
                row.map(|v| dec(v.value(), "devices")).transpose()
            }

            fn devices(&mut self) -> R<BTreeMap<String, DeviceRow>> {
                let mut out = BTreeMap::new();
                for item in self.tx.open_table(DEVICES)?.iter()? {
                    let (k, v) = item?;
                    out.insert(k.value().to_owned(), dec(v.value(), "devices")?);
                }
                Ok(out)
            }

            fn device_by_certificate(&mut self, fingerprint: &[u8; 32]) -> R<Option<String>> {
                Ok(self
                    .tx
                    .open_table(CERTS)?
                    .get(fingerprint.as_slice())?
                    .map(|v| v.value().to_owned()))
            }

            fn token(&mut self, hash: &[u8; 32]) -> R<Option<TokenRow>> {
                let t = self.tx.open_table(TOKENS)?;
                let row = t.get(hash.as_slice())?;
                row.map(|v| dec(v.value(), "tokens")).transpose()
            }

            fn renewal(&mut self, hash: &[u8; 32]) -> R<Option<RenewalRow>> {
                let t = self.tx.open_table(RENEWALS)?;
                let row = t.get(hash.as_slice())?;
                row.map(|v| dec(v.value(), "renewal_tokens")).transpose()
            }

            fn source_value(&mut self, key: &str) -> R<Option<Vec<u8>>> {
                Ok(self
                    .tx
                    .open_table(SOURCE)?
                    .get(key)?
                    .map(|v| v.value().to_vec()))
            }

            fn counts(&mut self) -> R<(u64, u64, u64)> {
                Ok((
                    self.tx.open_table(PATIENTS)?.len()?,
                    self.tx.open_table(OBJECTIONS)?.len()?,
                    self.tx.open_table(LEASES)?.len()?,
                ))
            }

            fn health(&mut self, device: &str) -> R<Option<HealthRow>> {
                let t = self.tx.open_table(HEALTH)?;
                let row = t.get(device)?;
                row.map(|v| dec(v.value(), "device_health")).transpose()
            }

            fn health_rows(&mut self) -> R<Vec<(String, HealthRow)>> {
                let mut out = Vec::new();
                for item in self.tx.open_table(HEALTH)?.iter()? {
                    let (k, v) = item?;
                    out.push((k.value().to_owned(), dec(v.value(), "device_health")?));
                }
                Ok(out)
            }

            fn anchor(&mut self, device: &str) -> R<Option<AnchorRow>> {
                let t = self.tx.open_table(ANCHORS)?;
                let row = t.get(device)?;
                row.map(|v| dec(v.value(), "device_anchor")).transpose()
            }

            fn anchors(&mut self) -> R<Vec<(String, AnchorRow)>> {
                let mut out = Vec::new();
                for item in self.tx.open_table(ANCHORS)?.iter()? {
                    let (k, v) = item?;
                    out.push((k.value().to_owned(), dec(v.value(), "device_anchor")?));
                }
                Ok(out)
            }

            fn audit_head(&mut self, device: &str) -> R<Option<ChainHead>> {
                let t = self.tx.open_table(HEADS)?;
                let row = t.get(device)?;
                row.map(|v| ChainHead::decode(v.value())).transpose()
            }

            fn audit_heads(&mut self) -> R<Vec<(String, ChainHead)>> {
                let mut out = Vec::new();
                for item in self.tx.open_table(HEADS)?.iter()? {
                    let (k, v) = item?;
                    out.push((k.value().to_owned(), ChainHead::decode(v.value())?));
                }
                Ok(out)
            }

            fn officer_log(&mut self, f: &mut dyn FnMut(u64, &[u8]) -> R<()>) -> R<()> {
                // A database from before the table: nothing logged yet.
                let t = match self.tx.open_table(OFFICER_LOG) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
                    Err(e) => return Err(e.into()),
                };
                for item in t.iter()? {
                    let (k, v) = item?;
                    f(k.value(), v.value())?;
                }
                Ok(())
            }

            fn audit_entry(&mut self, device: &str, seq: u64) -> R<Option<Vec<u8>>> {
                Ok(self
                    .tx
                    .open_table(AUDIT)?
                    .get((device, seq))?
                    .map(|v| v.value().to_vec()))
            }

            fn audit(&mut self, device: Option<&str>, f: AuditVisit<'_>) -> R<()> {
                let t = self.tx.open_table(AUDIT)?;
                let range = match device {
                    Some(d) => t.range((d, 0u64)..=(d, u64::MAX))?,
                    None => t.iter()?,
                };
                for item in range {
                    let (k, v) = item?;
                    let (device, seq) = k.value();
                    f(device, seq, v.value())?;
                }
                Ok(())
            }

            fn audit_after(
                &mut self,
                device: &str,
                after: u64,
                limit: u64,
                f: AuditVisit<'_>,
            ) -> R<()> {
                let t = self.tx.open_table(AUDIT)?;
                let first = after.saturating_add(1);
                let range = t.range((device, first)..=(device, u64::MAX))?;
                for item in range.take(usize::try_from(limit).unwrap_or(usize::MAX)) {
                    let (k, v) = item?;
                    let (device, seq) = k.value();
                    f(device, seq, v.value())?;
                }
                Ok(())
            }

            fn forwarded(&mut self) -> R<HashMap<String, u64>> {
                let t = match self.tx.open_table(FORWARDED) {
                    Ok(t) => t,
                    Err(redb::TableError::TableDoesNotExist(_)) => return Ok(HashMap::new()),
                    Err(e) => return Err(e.into()),
                };
                let mut out = HashMap::new();
                for item in t.iter()? {
                    let (k, v) = item?;
                    out.insert(k.value().to_owned(), v.value());
                }
                Ok(out)
            }

            fn audit_emergency(&mut self, f: AuditVisit<'_>) -> R<()> {
                let audit = self.tx.open_table(AUDIT)?;
                for item in self.tx.open_table(EMERGENCY)?.iter()? {
                    let (k, _) = item?;
                    let (device, seq) = k.value();
                    let v = audit
                        .get((device, seq))?
                        .ok_or(StateError::Corrupt("audit_emergency"))?;
                    f(device, seq, v.value())?;
                }
                Ok(())
            }

            fn audit_of_patient(&mut self, nhs: u64, f: AuditVisit<'_>) -> R<()> {
                let audit = self.tx.open_table(AUDIT)?;
                for item in self
                    .tx
                    .open_table(BY_PATIENT)?
                    .range((nhs, "", 0u64)..(nhs.saturating_add(1), "", 0u64))?
                {
                    let (k, _) = item?;
                    let (_, device, seq) = k.value();
                    let v = audit
                        .get((device, seq))?
                        .ok_or(StateError::Corrupt("audit_by_patient"))?;
                    f(device, seq, v.value())?;
                }
                Ok(())
            }
        }
    };
}

read_impl!(RedbRead);
read_impl!(RedbWrite);

impl Write for RedbWrite {
    fn set_head(&mut self, seq: u64) -> R<()> {
        self.tx
            .open_table(META)?
            .insert("seq", seq.to_be_bytes().as_slice())?;
        Ok(())
    }

    fn put_patient(&mut self, nhs: u64, row: &PatientRow, hash: Option<[u8; 32]>) -> R<()> {
        self.tx
            .open_table(PATIENTS)?
            .insert(nhs, enc(row).as_slice())?;
        self.tx.open_table(SUMMARY)?.insert(nhs, summary_of(row))?;
        let mut content = self.tx.open_table(CONTENT)?;
        match hash {
            Some(h) => content.insert(nhs, h)?,
            None => content.remove(nhs)?,
        };
        Ok(())
    }

    fn set_content_hash(&mut self, nhs: u64, hash: [u8; 32]) -> R<()> {
        self.tx.open_table(CONTENT)?.insert(nhs, hash)?;
        Ok(())
    }

    fn put_objection(&mut self, nhs: u64, row: &ObjectionRow) -> R<()> {
        self.tx
            .open_table(OBJECTIONS)?
            .insert(nhs, enc(row).as_slice())?;
        Ok(())
    }

    fn relog(&mut self, old: Option<u64>, new: u64, key: LogKey) -> R<()> {
        let mut log = self.tx.open_table(LOG)?;
        if let Some(old) = old {
            log.remove(old)?;
        }
        log.insert(new, enc(&key).as_slice())?;
        Ok(())
    }

    fn next_lease_id(&mut self) -> R<u64> {
        let mut meta = self.tx.open_table(META)?;
        let next = meta
            .get("next_lease")?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map_or(1, u64::from_be_bytes);
        meta.insert("next_lease", (next + 1).to_be_bytes().as_slice())?;
        Ok(next)
    }

    fn put_lease(&mut self, id: u64, row: &LeaseRow) -> R<()> {
        self.tx
            .open_table(LEASES)?
            .insert(id, enc(row).as_slice())?;
        Ok(())
    }

    fn add_lookup(&mut self, row: &LookupRow) -> R<()> {
        let mut lookups = self.tx.open_table(LOOKUPS)?;
        let next = lookups.last()?.map_or(1, |(k, _)| k.value() + 1);
        let json =
            serde_json::to_vec(row).map_err(|e| StateError::Invalid(format!("lookup row: {e}")))?;
        lookups.insert(next, json.as_slice())?;
        self.tx.open_table(LOOKUP_LEASES)?.insert(row.lease, ())?;
        Ok(())
    }

    fn put_device(&mut self, id: &str, row: &DeviceRow) -> R<()> {
        self.tx
            .open_table(DEVICES)?
            .insert(id, enc(row).as_slice())?;
        Ok(())
    }

    fn put_certificate(&mut self, fingerprint: &[u8; 32], device: &str) -> R<()> {
        self.tx
            .open_table(CERTS)?
            .insert(fingerprint.as_slice(), device)?;
        Ok(())
    }

    fn put_token(&mut self, hash: &[u8; 32], row: &TokenRow) -> R<()> {
        self.tx
            .open_table(TOKENS)?
            .insert(hash.as_slice(), enc(row).as_slice())?;
        Ok(())
    }

    fn put_renewal(&mut self, hash: &[u8; 32], row: &RenewalRow) -> R<()> {
        self.tx
            .open_table(RENEWALS)?
            .insert(hash.as_slice(), enc(row).as_slice())?;
        Ok(())
    }

    fn set_source_value(&mut self, key: &str, value: &[u8]) -> R<()> {
        self.tx.open_table(SOURCE)?.insert(key, value)?;
        Ok(())
    }

    fn put_health(&mut self, device: &str, row: &HealthRow) -> R<()> {
        self.tx
            .open_table(HEALTH)?
            .insert(device, enc(row).as_slice())?;
        Ok(())
    }

    fn put_anchor(&mut self, device: &str, row: &AnchorRow) -> R<()> {
        self.tx
            .open_table(ANCHORS)?
            .insert(device, enc(row).as_slice())?;
        Ok(())
    }

    fn put_audit_head(&mut self, device: &str, head: &ChainHead) -> R<()> {
        self.tx
            .open_table(HEADS)?
            .insert(device, head.encode().as_slice())?;
        Ok(())
    }

    fn set_forwarded(&mut self, device: &str, seq: u64) -> R<()> {
        let mut t = self.tx.open_table(FORWARDED)?;
        let held = t.get(device)?.map_or(0, |v| v.value());
        t.insert(device, seq.max(held))?;
        Ok(())
    }

    fn log_officer(&mut self, _at: u64, entry: &[u8]) -> R<u64> {
        let mut t = self.tx.open_table(OFFICER_LOG)?;
        let seq = t.last()?.map_or(0, |(k, _)| k.value()) + 1;
        t.insert(seq, entry)?;
        Ok(seq)
    }

    fn put_audit(
        &mut self,
        device: &str,
        seq: u64,
        bytes: &[u8],
        _at: u64,
        patients: &[u64],
        emergency: bool,
    ) -> R<()> {
        let mut by_patient = self.tx.open_table(BY_PATIENT)?;
        for &n in patients {
            by_patient.insert((n, device, seq), ())?;
        }
        if emergency {
            self.tx.open_table(EMERGENCY)?.insert((device, seq), ())?;
        }
        self.tx.open_table(AUDIT)?.insert((device, seq), bytes)?;
        Ok(())
    }

    fn commit(self: Box<Self>) -> R<()> {
        self.tx.commit()?;
        Ok(())
    }
}

fn read_seq(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> R<u64> {
    Ok(meta
        .get("seq")?
        .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// Build [`SUMMARY`] from `patients` once (a database from before it existed).
fn build_summary(tx: &redb::WriteTransaction, meta: &mut redb::Table<&str, &[u8]>) -> R<()> {
    if meta.get("summary")?.is_some() {
        return Ok(());
    }
    let patients = tx.open_table(PATIENTS)?;
    let mut summary = tx.open_table(SUMMARY)?;
    for item in patients.iter()? {
        let (k, v) = item?;
        let row: PatientRow = dec(v.value(), "patients")?;
        summary.insert(k.value(), summary_of(&row))?;
    }
    meta.insert("summary", [1u8].as_slice())?;
    Ok(())
}

/// Bring stored patient rows to [`RECORDS_FORMAT`] in the opening transaction (a crash
/// leaves the old format, to be migrated again); refuse a database from a newer hub.
fn migrate_records(tx: &redb::WriteTransaction, meta: &mut redb::Table<&str, &[u8]>) -> R<()> {
    #[derive(Deserialize)]
    struct Row<R> {
        seq: u64,
        fhir_id: String,
        record: Option<R>,
    }
    fn up<Rec: Into<PatientRecord> + serde::de::DeserializeOwned>(bytes: &[u8]) -> R<PatientRow> {
        let old: Row<Rec> = dec(bytes, "patients")?;
        Ok(PatientRow {
            seq: old.seq,
            fhir_id: old.fhir_id,
            record: old.record.map(Into::into),
        })
    }
    let found = meta
        .get("records")?
        .and_then(|v| <[u8; 4]>::try_from(v.value()).ok())
        .map_or(1, u32::from_le_bytes);
    if found > RECORDS_FORMAT {
        return Err(StateError::Database(format!(
            "records format {found} is newer than this hub ({RECORDS_FORMAT}): upgrade the hub"
        )));
    }
    if found < RECORDS_FORMAT {
        let mut patients = tx.open_table(PATIENTS)?;
        let old: Vec<(u64, Vec<u8>)> = patients
            .iter()?
            .map(|r| r.map(|(k, v)| (k.value(), v.value().to_vec())))
            .collect::<Result<_, _>>()?;
        for (nhs, bytes) in old {
            let row = match found {
                1 => up::<sync_protocol::record::v1::PatientRecord>(&bytes)?,
                _ => up::<sync_protocol::record::v2::PatientRecord>(&bytes)?,
            };
            patients.insert(nhs, enc(&row).as_slice())?;
        }
        meta.insert("records", RECORDS_FORMAT.to_le_bytes().as_slice())?;
    }
    Ok(())
}
