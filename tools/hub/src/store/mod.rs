//! The hub's storage, behind one interface with two engines: redb (the embedded default:
//! `carecache demo`, tests, a small trust) and PostgreSQL (a region: several hub
//! instances on one database).
//!
//! The interface is row-level and transactional: an engine reads and writes the hub's
//! rows (patients, objections, the change log, leases, devices, tokens, audit, device
//! health) inside a transaction, and the hub's rules — what an ingest changes, how a
//! lease is granted, how an audit chain is checked — are written once, in `state`,
//! `audit`, `fleet` and `pull`, over these calls. Rows an engine does not query by
//! their content are stored as the same postcard bytes in both engines.
//!
//! Concurrency: a write transaction that reads the change log's head holds it until it
//! commits (redb has one writer; PostgreSQL locks the head row), so sequence numbers
//! commit in order and a device reading at head `h` has seen every change up to `h`. A
//! read transaction is a snapshot (redb's read transaction; PostgreSQL's repeatable
//! read). Single rows read in a write transaction are locked until it commits.

use std::collections::{BTreeMap, HashMap};

use crate::audit::ChainHead;
use crate::fleet::{AnchorRow, HealthRow};
use crate::state::{
    DeviceRow, LeaseRow, LogKey, LookupRow, ObjectionRow, PatientRow, RenewalRow, StateError,
    TokenRow,
};

pub(crate) mod postgres;
pub(crate) mod redb;

pub(crate) type R<T> = Result<T, StateError>;

/// A callback over stored audit entries: device, sequence, hash ‖ record bytes.
pub(crate) type AuditVisit<'a> = &'a mut dyn FnMut(&str, u64, &[u8]) -> R<()>;

/// Something held for as long as it lives (a lock).
pub(crate) trait Guard {}
impl<T> Guard for T {}

/// A new random hub id.
pub(crate) fn new_hub_id() -> R<[u8; 8]> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| StateError::Database(format!("random hub id: {e}")))?;
    Ok(id)
}

/// The month (YYYYMM, UTC) of now, by the wall clock: audit is partitioned by the month
/// the hub stored it.
pub(crate) fn month_now() -> i32 {
    let now = time::OffsetDateTime::now_utc();
    now.year() * 100 + i32::from(u8::from(now.month()))
}

/// The month after `m` (YYYYMM).
pub(crate) fn month_after(m: i32) -> i32 {
    if m % 100 == 12 { m + 89 } else { m + 1 }
}

/// The month `n` months before `m` (YYYYMM).
pub(crate) fn months_before(m: i32, n: u32) -> i32 {
    let total = (m / 100) * 12 + (m % 100 - 1) - i32::try_from(n).unwrap_or(i32::MAX / 2);
    (total / 12) * 100 + total % 12 + 1
}

/// What a retention run dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Retained {
    /// Months of audit dropped (YYYYMM), each a partition.
    pub audit_months: Vec<i32>,
    /// Audit entries in them.
    pub audit_entries: u64,
    /// Months old enough that were kept: entries in them are not yet forwarded upstream.
    pub kept_unforwarded: Vec<i32>,
    /// Change-log partitions dropped (emptied by compaction), by number.
    pub log_partitions: Vec<u64>,
}

/// One of the hub's storage engines.
pub(crate) trait Engine: Send + Sync + std::fmt::Debug {
    /// The hub's id (random, made when the database was created): cursors carry it.
    fn hub_id(&self) -> [u8; 8];
    /// A read transaction: a consistent snapshot.
    fn read(&self) -> R<Box<dyn Read + '_>>;
    /// A write transaction; dropped without [`Write::commit`], nothing is written.
    fn write(&self) -> R<Box<dyn Write + '_>>;
    /// Wait until no other ingest runs — in this process or, on a shared database, in
    /// any hub instance — and hold that until the guard drops.
    fn ingest_guard(&self) -> R<Box<dyn Guard + '_>>;
    /// The engine's name and where its data is, for logs (no credentials).
    fn describe(&self) -> String;
    /// Whether calls go across a network (to be made off async workers).
    fn remote(&self) -> bool;
    /// The right to forward audit upstream, if no other instance (or thread) holds it:
    /// held until the guard drops.
    fn try_forward_guard(&self) -> R<Option<Box<dyn Guard + '_>>>;
    /// The connection pool (connections open, idle), where there is one.
    fn pool(&self) -> Option<(u32, u32)> {
        None
    }
    /// Housekeeping the engine needs (PostgreSQL: partitions made ahead of the change
    /// log's head and of the month). Safe to run from every instance at once.
    fn maintain(&self) -> R<()> {
        Ok(())
    }
    /// Drops audit stored in months before `before` (YYYYMM) — only months whose every
    /// entry is forwarded upstream when `forwarding` — and change-log partitions
    /// compaction emptied.
    fn retain(&self, before: i32, forwarding: bool) -> R<Retained> {
        let _ = (before, forwarding);
        Err(StateError::Invalid(
            "retention drops PostgreSQL partitions: a redb hub keeps its audit".into(),
        ))
    }
}

/// What a transaction reads.
pub(crate) trait Read {
    /// The change log's head (0: empty). In a write transaction, held until commit.
    fn head(&mut self) -> R<u64>;
    /// A patient's row.
    fn patient(&mut self, nhs: u64) -> R<Option<PatientRow>>;
    /// (version, has alerts) of each of `nhs` the hub has a row for (version 0: deleted
    /// upstream).
    fn summaries(&mut self, nhs: &[u64]) -> R<HashMap<u64, (u64, bool)>>;
    /// The content hash of each of `nhs` whose record as last mapped has one.
    fn content_hashes(&mut self, nhs: &[u64]) -> R<HashMap<u64, [u8; 32]>>;
    /// Every patient the hub holds a record for (not deleted upstream), by NHS number.
    fn held(&mut self, f: &mut dyn FnMut(u64) -> R<()>) -> R<()>;
    /// Every patient the hub holds a record for, with its FHIR id.
    fn held_fhir_ids(&mut self, f: &mut dyn FnMut(u64, &str) -> R<()>) -> R<()>;
    /// A patient's objection row.
    fn objection(&mut self, nhs: u64) -> R<Option<ObjectionRow>>;
    /// The objection rows of each of `nhs` that has one.
    fn objections(&mut self, nhs: &[u64]) -> R<HashMap<u64, ObjectionRow>>;
    /// Every log entry after `seq`, in order.
    fn log_after(&mut self, seq: u64, f: &mut dyn FnMut(LogKey) -> R<()>) -> R<()>;
    /// A lease.
    fn lease(&mut self, id: u64) -> R<Option<LeaseRow>>;
    /// Every lease, by id.
    fn leases(&mut self) -> R<Vec<LeaseRow>>;
    /// Whether lease `id` was granted by a lookup.
    fn is_lookup_lease(&mut self, id: u64) -> R<bool>;
    /// Every lookup, oldest first.
    fn lookups(&mut self) -> R<Vec<LookupRow>>;
    /// A device.
    fn device(&mut self, id: &str) -> R<Option<DeviceRow>>;
    /// Every device, by id.
    fn devices(&mut self) -> R<BTreeMap<String, DeviceRow>>;
    /// The device a certificate (by SHA-256 of its DER) was issued to.
    fn device_by_certificate(&mut self, fingerprint: &[u8; 32]) -> R<Option<String>>;
    /// An enrolment token (by SHA-256).
    fn token(&mut self, hash: &[u8; 32]) -> R<Option<TokenRow>>;
    /// A renewal token (by SHA-256).
    fn renewal(&mut self, hash: &[u8; 32]) -> R<Option<RenewalRow>>;
    /// A value kept for the source adapter.
    fn source_value(&mut self, key: &str) -> R<Option<Vec<u8>>>;
    /// Patients, objections and leases held.
    fn counts(&mut self) -> R<(u64, u64, u64)>;
    /// A device's last checkin.
    fn health(&mut self, device: &str) -> R<Option<HealthRow>>;
    /// Every device's last checkin.
    fn health_rows(&mut self) -> R<Vec<(String, HealthRow)>>;
    /// A device's anchor report.
    fn anchor(&mut self, device: &str) -> R<Option<AnchorRow>>;
    /// Every device's anchor report.
    fn anchors(&mut self) -> R<Vec<(String, AnchorRow)>>;
    /// A device's audit chain head. In a write transaction, held until commit.
    fn audit_head(&mut self, device: &str) -> R<Option<ChainHead>>;
    /// Every device's audit chain head.
    fn audit_heads(&mut self) -> R<Vec<(String, ChainHead)>>;
    /// One stored audit entry (hash ‖ record).
    fn audit_entry(&mut self, device: &str, seq: u64) -> R<Option<Vec<u8>>>;
    /// Stored audit entries, by device then sequence: one device's, or all.
    fn audit(&mut self, device: Option<&str>, f: AuditVisit<'_>) -> R<()>;
    /// The emergency accesses and lookups, by device then sequence.
    fn audit_emergency(&mut self, f: AuditVisit<'_>) -> R<()>;
    /// The entries naming a patient, by device then sequence.
    fn audit_of_patient(&mut self, nhs: u64, f: AuditVisit<'_>) -> R<()>;
    /// Up to `limit` of a device's stored entries after sequence `after`, in order.
    fn audit_after(&mut self, device: &str, after: u64, limit: u64, f: AuditVisit<'_>) -> R<()>;
    /// How far each device's audit has been forwarded upstream (highest sequence).
    fn forwarded(&mut self) -> R<HashMap<String, u64>>;
    /// What privacy officers did, oldest first: sequence and postcard `OfficerAction`.
    fn officer_log(&mut self, f: &mut dyn FnMut(u64, &[u8]) -> R<()>) -> R<()>;
}

/// What a write transaction writes, besides what it reads.
pub(crate) trait Write: Read {
    /// Move the change log's head.
    fn set_head(&mut self, seq: u64) -> R<()>;
    /// Store a patient's row with the content hash of its record (`None`: no record,
    /// or not known).
    fn put_patient(&mut self, nhs: u64, row: &PatientRow, hash: Option<[u8; 32]>) -> R<()>;
    /// Record the content hash of the patient's stored record (a row from before
    /// content hashes, found unchanged).
    fn set_content_hash(&mut self, nhs: u64, hash: [u8; 32]) -> R<()>;
    /// Store a patient's objection row.
    fn put_objection(&mut self, nhs: u64, row: &ObjectionRow) -> R<()>;
    /// Move a key's log entry from `old` to `new`.
    fn relog(&mut self, old: Option<u64>, new: u64, key: LogKey) -> R<()>;
    /// Allocate a lease id.
    fn next_lease_id(&mut self) -> R<u64>;
    /// Store a lease.
    fn put_lease(&mut self, id: u64, row: &LeaseRow) -> R<()>;
    /// Record a lookup and the lease it granted.
    fn add_lookup(&mut self, row: &LookupRow) -> R<()>;
    /// Store a device.
    fn put_device(&mut self, id: &str, row: &DeviceRow) -> R<()>;
    /// Record that a certificate was issued to a device.
    fn put_certificate(&mut self, fingerprint: &[u8; 32], device: &str) -> R<()>;
    /// Store an enrolment token.
    fn put_token(&mut self, hash: &[u8; 32], row: &TokenRow) -> R<()>;
    /// Store a renewal token.
    fn put_renewal(&mut self, hash: &[u8; 32], row: &RenewalRow) -> R<()>;
    /// Set a source value.
    fn set_source_value(&mut self, key: &str, value: &[u8]) -> R<()>;
    /// Store a device's last checkin.
    fn put_health(&mut self, device: &str, row: &HealthRow) -> R<()>;
    /// Store a device's anchor report.
    fn put_anchor(&mut self, device: &str, row: &AnchorRow) -> R<()>;
    /// Store a device's audit chain head.
    fn put_audit_head(&mut self, device: &str, head: &ChainHead) -> R<()>;
    /// Store an audit entry (hash ‖ record) once, with the patients it names and
    /// whether it is emergency access, for review. `at` is the entry's time (ms).
    fn put_audit(
        &mut self,
        device: &str,
        seq: u64,
        bytes: &[u8],
        at: u64,
        patients: &[u64],
        emergency: bool,
    ) -> R<()>;
    /// Record that a device's audit is forwarded through `seq`.
    fn set_forwarded(&mut self, device: &str, seq: u64) -> R<()>;
    /// Append to the officers' log (`at` in ms); returns the entry's sequence.
    fn log_officer(&mut self, at: u64, entry: &[u8]) -> R<u64>;
    /// Make every write durable and visible.
    fn commit(self: Box<Self>) -> R<()>;
}
