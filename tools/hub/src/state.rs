//! The hub's durable state — patients and objections as mapped from the source, leases,
//! the change log, devices and enrolment tokens — and the rules that change it, over
//! either storage engine (`store`). Audit lives in `audit`, device health in `fleet`.
//!
//! The change log is compacted: every patient, objection and lease has one entry, at the
//! sequence number of its latest change, and its row records that number. A device's
//! cursor is a position in the log (`pull`), so "what changed since" is a range scan.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sync_protocol::NhsNumber;
use sync_protocol::message::{Audience, Lease, LeaseEndReason, ObjectionStatus, View};
use sync_protocol::record::PatientRecord;
use sync_protocol::types::{RecordVersion, Timestamp};

use crate::fhir_in::{Mapped, SourceObjection};
pub use crate::store::postgres::PgOptions;
use crate::store::{Engine, Write};

/// Default size of the hub database's page cache: the hub's memory stays flat whatever
/// the region's size (redb's own default is 1 GiB).
pub const DEFAULT_CACHE_BYTES: usize = 64 * 1024 * 1024;

/// Patients written by one ingest transaction: ingest memory is bounded by this, not by
/// the size of the source.
pub const INGEST_BATCH: usize = 1000;

/// The content hash of a mapped record (its version aside).
pub(crate) fn content_hash(record: &PatientRecord) -> [u8; 32] {
    let mut r = record.clone();
    r.version = RecordVersion(0);
    Sha256::digest(enc(&r)).into()
}

/// A patient's [`SUMMARY`] row: (version, has alerts).
pub(crate) fn summary_of(row: &PatientRow) -> (u64, bool) {
    row.record.as_ref().map_or((0, false), |r| {
        (
            r.version.0,
            matches!(r.alerts, sync_protocol::record::Section::Entries(_)),
        )
    })
}

/// Errors of the hub's state. Messages carry ids and counts, never patient data.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database failed (disk, corruption): the operator must look.
    #[error("hub database: {0}")]
    Database(String),
    /// A stored row does not decode: the database is damaged or from a newer hub.
    #[error("hub database row in {0} does not decode")]
    Corrupt(&'static str),
    /// The request names something that does not exist (admin's input).
    #[error("{0} not found")]
    NotFound(String),
    /// The request is not valid (admin's input).
    #[error("{0}")]
    Invalid(String),
    /// An enrolment token is unknown, used or expired (device's input).
    #[error("enrolment token unknown, already used or expired")]
    TokenRejected,
    /// No database connection came free in time (every one busy, or the database not
    /// answering): the request may be made again shortly.
    #[error("hub database busy: {0}")]
    Busy(String),
}

/// A log entry names what changed; the row holds how it is now.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub(crate) enum LogKey {
    Patient(u64),
    Objection(u64),
    Lease(u64),
}

/// A patient as the hub holds it. `record` is `None` once the source deleted it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PatientRow {
    pub seq: u64,
    pub fhir_id: String,
    pub record: Option<PatientRecord>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub(crate) struct ObjectionRow {
    pub seq: u64,
    pub status: ObjectionStatus,
    pub recorded_at: Timestamp,
}

/// Who a lease is for.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// One device, by id.
    Device(String),
    /// Every device enrolled into a team.
    Team(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct LeaseRow {
    pub lease: Lease,
    pub target: Target,
    /// Name given in the hub's config file, so a restart updates rather than duplicates.
    pub name: Option<String>,
    pub created_seq: u64,
    /// Last change to the lease's patient list (a time-box change does not resend records).
    pub patients_seq: u64,
    pub seq: u64,
    pub ended: Option<LeaseEndReason>,
}

/// An enrolled device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceRow {
    /// Label given at enrolment.
    pub label: String,
    /// Team the enrolment token was issued for.
    pub team: Option<String>,
    /// Milliseconds since the epoch.
    pub enrolled_at: u64,
    /// SHA-256 of the issued certificate (DER).
    pub certificate_sha256: [u8; 32],
    /// Revoked devices are refused and told to wipe.
    pub revoked: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RenewalRow {
    pub device: String,
    pub expires_at: u64,
    pub used: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct TokenRow {
    pub team: Option<String>,
    pub expires_at: u64,
    pub used_by: Option<String>,
}

/// What an ingest changed.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug, Serialize)]
pub struct IngestReport {
    /// Patients seen for the first time.
    pub added: u64,
    /// Patients whose record changed.
    pub changed: u64,
    /// Patients unchanged.
    pub unchanged: u64,
    /// Patients the source no longer holds (full snapshots only).
    pub deleted: u64,
    /// Objections recorded or withdrawn.
    pub objections: u64,
}

impl std::ops::AddAssign for IngestReport {
    fn add_assign(&mut self, o: Self) {
        self.added += o.added;
        self.changed += o.changed;
        self.unchanged += o.unchanged;
        self.deleted += o.deleted;
        self.objections += o.objections;
    }
}

/// A lease as the admin API and the config file state it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseSpec {
    /// Optional stable name (config leases use it).
    #[serde(default)]
    pub name: Option<String>,
    /// Shown to crews.
    pub label: String,
    /// Device or team.
    pub target: Target,
    /// Staff ids allowed to look; empty means the device's whole team.
    #[serde(default)]
    pub users: Vec<String>,
    /// `clinical` or `social_care`.
    pub view: ViewSpec,
    /// RFC 3339 instant.
    pub not_before: String,
    /// RFC 3339 instant (exclusive).
    pub not_after: String,
    /// Longest time the device may go without contacting the hub.
    pub max_offline_secs: u32,
    /// Whether break-glass access to other cached patients is allowed.
    #[serde(default)]
    pub emergency_access: bool,
    /// The caseload.
    pub patients: Vec<String>,
}

/// Why a lookup was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LookupRefusal {
    /// No active lease of the device allowing emergency access names the caller.
    NotPermitted,
    /// Unknown, deleted or objected (one answer).
    NotAvailable,
}

/// A lookup as the hub records it for review.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct LookupRow {
    /// Hub time (RFC 3339).
    pub at: String,
    /// The device.
    pub device: String,
    /// Who asked.
    pub staff: String,
    /// The lease asked under.
    pub under: u64,
    /// The lease granted.
    pub lease: u64,
    /// The patient.
    pub nhs_number: String,
    /// Why, as the member of staff gave it.
    pub reason: String,
    /// When the granted lease ends (RFC 3339).
    pub until: String,
}

/// A lease view, as JSON and TOML spell it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewSpec {
    /// Alerts, allergies, medications.
    Clinical,
    /// Alerts and key contacts only.
    SocialCare,
}

pub(crate) fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    // postcard serialisation of our own plain structs into a Vec cannot fail.
    postcard::to_allocvec(v).unwrap_or_default()
}

pub(crate) fn dec<'a, T: Deserialize<'a>>(
    b: &'a [u8],
    table: &'static str,
) -> Result<T, StateError> {
    postcard::from_bytes(b).map_err(|_| StateError::Corrupt(table))
}

/// The hub's state, on one of its storage engines (`store`).
#[derive(Debug)]
pub struct HubState {
    pub(crate) engine: Box<dyn Engine>,
    pub(crate) hub_id: [u8; 8],
    /// A directory of the hub's own: an ingest stages its source here (see `source`).
    pub(crate) dir: std::path::PathBuf,
}

impl HubState {
    /// Open (creating if needed) the embedded hub database at `path`.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Open the embedded database with a page cache of `cache_bytes` (`[store]
    /// cache_mib` in `hub.toml`).
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, StateError> {
        let engine = crate::store::redb::RedbEngine::open(path, cache_bytes)?;
        let dir = path
            .parent()
            .map_or_else(|| std::path::PathBuf::from("."), Path::to_path_buf);
        Ok(Self::on(Box::new(engine), dir))
    }

    /// Open the hub's state in PostgreSQL (running its schema migrations); an ingest
    /// stages its source in `dir`.
    pub fn open_postgres(opts: &PgOptions, dir: &Path) -> Result<Self, StateError> {
        let engine = crate::store::postgres::PgEngine::open(opts)?;
        engine.maintain()?;
        Ok(Self::on(Box::new(engine), dir.to_path_buf()))
    }

    /// The engine's housekeeping (PostgreSQL: partitions made ahead of need); the
    /// running hub calls it every minute.
    pub fn maintain(&self) -> Result<(), StateError> {
        self.engine.maintain()
    }

    /// Retention: drops the audit stored more than `keep_months` whole months before
    /// this one (only months whose entries are all forwarded upstream, if `forwarding`)
    /// and the change-log partitions compaction emptied. PostgreSQL only: each is a
    /// partition drop.
    pub fn retain(
        &self,
        keep_months: u32,
        forwarding: bool,
    ) -> Result<crate::store::Retained, StateError> {
        let before = crate::store::months_before(crate::store::month_now(), keep_months);
        self.engine.retain(before, forwarding)
    }

    fn on(engine: Box<dyn Engine>, dir: std::path::PathBuf) -> Self {
        Self {
            hub_id: engine.hub_id(),
            engine,
            dir,
        }
    }

    /// Whether the state is across a network (calls block for round trips).
    pub fn is_remote(&self) -> bool {
        self.engine.remote()
    }

    /// The database connection pool (connections open, idle), where there is one.
    pub fn pool(&self) -> Option<(u32, u32)> {
        self.engine.pool()
    }

    /// The engine and where its data is, for logs (no credentials).
    pub fn describe(&self) -> String {
        self.engine.describe()
    }

    /// Wait for any other ingest to finish (on a shared database, in any hub instance);
    /// held until the guard drops.
    pub(crate) fn ingest_lock(&self) -> Result<Box<dyn crate::store::Guard + '_>, StateError> {
        self.engine.ingest_guard()
    }

    /// The head of the change log.
    pub fn head(&self) -> Result<u64, StateError> {
        self.engine.read()?.head()
    }

    /// Store one batch of mapped patients in one transaction (each patient's record and
    /// objection together). A patient whose mapped content is unchanged writes nothing
    /// (its content hash matches). An ingest of a whole source calls this once per
    /// [`INGEST_BATCH`] patients, so memory does not grow with the source; a device may
    /// pull between batches and sees whole patients only.
    pub fn ingest_batch(&self, mapped: Vec<(String, Mapped)>) -> Result<IngestReport, StateError> {
        let mut report = IngestReport::default();
        if mapped.is_empty() {
            return Ok(report);
        }
        let mut tx = self.engine.write()?;
        let mut seq = tx.head()?;
        let keys: Vec<u64> = mapped
            .iter()
            .map(|(_, m)| m.record.nhs_number.as_u64())
            .collect();
        // What the batch's patients are now, read at once (not a read per patient).
        let mut summaries = tx.summaries(&keys)?;
        let mut hashes = tx.content_hashes(&keys)?;
        let mut objections = tx.objections(&keys)?;
        for (fhir_id, m) in mapped {
            let nhs = m.record.nhs_number.as_u64();
            let hash = content_hash(&m.record);
            let version = summaries.get(&nhs).map(|s| s.0);
            let held = version.is_some_and(|v| v != 0);
            let same = held
                && match hashes.get(&nhs) {
                    Some(stored) => *stored == hash,
                    // No hash yet (an older database): compare whole, once.
                    None => {
                        let same = tx
                            .patient(nhs)?
                            .and_then(|o| o.record)
                            .is_some_and(|r| same_content(&r, &m.record));
                        if same {
                            tx.set_content_hash(nhs, hash)?;
                        }
                        same
                    }
                };
            if same {
                report.unchanged += 1;
            } else {
                // A held patient's row is at its record's version; a deleted one's
                // (or a new one's) is read.
                let old_seq = match version {
                    Some(v) if v != 0 => Some(v),
                    Some(_) => tx.patient(nhs)?.map(|r| r.seq),
                    None => None,
                };
                if held {
                    report.changed += 1;
                } else {
                    report.added += 1;
                }
                seq += 1;
                let mut record = m.record;
                record.version = RecordVersion(seq);
                let row = PatientRow {
                    seq,
                    fhir_id,
                    record: Some(record),
                };
                tx.relog(old_seq, seq, LogKey::Patient(nhs))?;
                tx.put_patient(nhs, &row, Some(hash))?;
                // A source that names a patient twice in one batch: the second sees
                // the first.
                summaries.insert(nhs, summary_of(&row));
                hashes.insert(nhs, hash);
            }
            if let Some(o) = m.objection
                && let Some(row) =
                    set_objection(tx.as_mut(), &mut seq, nhs, o, objections.get(&nhs).copied())?
            {
                objections.insert(nhs, row);
                report.objections += 1;
            }
        }
        tx.set_head(seq)?;
        tx.commit()?;
        Ok(report)
    }

    /// The end of a full snapshot: every held patient `present` says the source no longer
    /// has is deleted upstream (devices remove it at their next pull), in transactions of
    /// [`INGEST_BATCH`]. Returns how many.
    pub fn delete_absent(
        &self,
        mut present: impl FnMut(u64) -> Result<bool, StateError>,
    ) -> Result<u64, StateError> {
        let mut gone = Vec::new();
        self.engine.read()?.held(&mut |nhs| {
            if !present(nhs)? {
                gone.push(nhs);
            }
            Ok(())
        })?;
        self.delete_held(&gone)
    }

    /// Delete the records of the held patients `nhs` names, [`INGEST_BATCH`] a
    /// transaction. Returns how many.
    fn delete_held(&self, nhs: &[u64]) -> Result<u64, StateError> {
        let mut deleted = 0;
        for chunk in nhs.chunks(INGEST_BATCH) {
            deleted += self.delete_batch(chunk)?;
        }
        Ok(deleted)
    }

    /// Delete the records of the held patients `nhs` names, in one transaction: each
    /// moves to a new log position with no record, so devices remove it.
    fn delete_batch(&self, nhs: &[u64]) -> Result<u64, StateError> {
        let mut tx = self.engine.write()?;
        let mut seq = tx.head()?;
        let mut deleted = 0;
        for &n in nhs {
            let Some(mut row) = tx.patient(n)?.filter(|r| r.record.is_some()) else {
                continue;
            };
            seq += 1;
            tx.relog(Some(row.seq), seq, LogKey::Patient(n))?;
            row.seq = seq;
            row.record = None;
            tx.put_patient(n, &row, None)?;
            deleted += 1;
        }
        tx.set_head(seq)?;
        tx.commit()?;
        Ok(deleted)
    }

    /// Create or update a lease. A spec with a `name` that already exists updates that
    /// lease (Changed); otherwise a new lease is granted.
    pub fn put_lease(&self, spec: &LeaseSpec, id: Option<u64>) -> Result<u64, StateError> {
        let mut tx = self.engine.write()?;
        let id = put_lease_in(tx.as_mut(), spec, id)?;
        tx.commit()?;
        Ok(id)
    }

    /// A one-off lookup (SPEC §3.8): checks that `under` is an active lease of the
    /// device `device` (of `team`) allowing emergency access to `staff`, that the
    /// patient is known and not objected, then grants a lease of `hours` for the patient
    /// alone to that device and member of staff, and records the lookup for review —
    /// all in one transaction.
    #[allow(clippy::too_many_arguments)] // The lookup's parts, each checked here.
    pub fn lookup(
        &self,
        device: &str,
        team: Option<&str>,
        nhs: NhsNumber,
        under: u64,
        staff: &str,
        reason: &str,
        now: Timestamp,
        hours: u32,
    ) -> Result<Result<(Lease, PatientRecord), LookupRefusal>, StateError> {
        let mut tx = self.engine.write()?;
        // The head first: every write that moves the log takes it in the same order.
        tx.head()?;
        let asking = tx.lease(under)?;
        let holds = |t: &Target| match t {
            Target::Device(d) => d == device,
            Target::Team(t) => team == Some(t.as_str()),
        };
        let Some(asking) = asking.filter(|r| {
            holds(&r.target)
                && r.ended.is_none()
                && r.lease.emergency_access
                && r.lease.not_before <= now
                && now < r.lease.not_after
                && match &r.lease.audience {
                    Audience::Team => true,
                    Audience::Users(u) => u.iter().any(|s| s.as_str() == staff),
                }
        }) else {
            return Ok(Err(LookupRefusal::NotPermitted));
        };
        let objected = tx.objection(nhs.as_u64())?;
        if objected.is_some_and(|o| o.status == ObjectionStatus::Objected) {
            return Ok(Err(LookupRefusal::NotAvailable));
        }
        let Some(record) = tx.patient(nhs.as_u64())?.and_then(|r| r.record) else {
            return Ok(Err(LookupRefusal::NotAvailable));
        };
        let until = now
            .as_millis()
            .saturating_add(u64::from(hours.max(1)) * 3_600_000);
        let until = Timestamp::from_millis(until)
            .map_err(|_| StateError::Invalid("lookup lease end out of range".into()))?;
        let spec = LeaseSpec {
            name: None,
            label: "Emergency lookup".into(),
            target: Target::Device(device.to_owned()),
            users: vec![staff.to_owned()],
            view: match asking.lease.view {
                View::Clinical => ViewSpec::Clinical,
                View::SocialCare => ViewSpec::SocialCare,
            },
            not_before: now.rfc3339(),
            not_after: until.rfc3339(),
            max_offline_secs: asking.lease.max_offline_secs,
            emergency_access: false,
            patients: vec![nhs.digits()],
        };
        let id = put_lease_in(tx.as_mut(), &spec, None)?;
        let lease = crate::leases::to_wire(id, &spec)?;
        tx.add_lookup(&LookupRow {
            at: now.rfc3339(),
            device: device.to_owned(),
            staff: staff.to_owned(),
            under,
            lease: id,
            nhs_number: nhs.digits(),
            reason: reason.to_owned(),
            until: until.rfc3339(),
        })?;
        tx.commit()?;
        Ok(Ok((lease, record)))
    }

    /// Every lookup granted, oldest first, for the privacy officer's review.
    pub fn lookups(&self) -> Result<Vec<LookupRow>, StateError> {
        self.engine.read()?.lookups()
    }

    /// End a lease; devices holding it are told on their next pull.
    pub fn end_lease(&self, id: u64, reason: LeaseEndReason) -> Result<(), StateError> {
        let mut tx = self.engine.write()?;
        let seq = tx.head()? + 1;
        let mut row = tx
            .lease(id)?
            .ok_or_else(|| StateError::NotFound(format!("lease {id}")))?;
        if row.ended.is_some() {
            return Ok(());
        }
        tx.relog(Some(row.seq), seq, LogKey::Lease(id))?;
        row.seq = seq;
        row.ended = Some(reason);
        tx.put_lease(id, &row)?;
        tx.set_head(seq)?;
        tx.commit()
    }

    /// End every lease whose `not_after` has passed (reason `AssignmentEnded`). Returns
    /// how many ended.
    pub fn expire_leases(&self, now: Timestamp) -> Result<usize, StateError> {
        let due: Vec<u64> = self
            .leases()?
            .into_iter()
            .filter(|r| r.ended.is_none() && r.lease.not_after <= now)
            .map(|r| r.lease.id.0)
            .collect();
        for id in &due {
            self.end_lease(*id, LeaseEndReason::AssignmentEnded)?;
        }
        Ok(due.len())
    }

    pub(crate) fn leases(&self) -> Result<Vec<LeaseRow>, StateError> {
        self.engine.read()?.leases()
    }

    /// Leases as JSON for the admin API: id, name, label, target, window, patients
    /// count, whether ended. No NHS numbers.
    pub fn lease_summaries(&self) -> Result<Vec<serde_json::Value>, StateError> {
        Ok(self
            .leases()?
            .into_iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.lease.id.0,
                    "name": r.name,
                    "label": r.lease.label.as_str(),
                    "target": r.target,
                    "not_before": r.lease.not_before.as_millis(),
                    "not_after": r.lease.not_after.as_millis(),
                    "patients": r.lease.patients.len(),
                    "ended": r.ended.map(|e| format!("{e:?}")),
                })
            })
            .collect())
    }

    /// Issue a one-time enrolment token, valid for `ttl_secs`. Only its hash is stored.
    pub fn issue_token(
        &self,
        team: Option<String>,
        now: Timestamp,
        ttl_secs: u64,
    ) -> Result<String, StateError> {
        let token = new_token()?;
        let row = TokenRow {
            team,
            expires_at: now
                .as_millis()
                .saturating_add(ttl_secs.saturating_mul(1000)),
            used_by: None,
        };
        let mut tx = self.engine.write()?;
        tx.put_token(&token_hash(&token), &row)?;
        tx.commit()?;
        Ok(token)
    }

    /// A one-time token that re-certifies enrolled, unrevoked `device` through the
    /// enrolment exchange (a device whose certificate ended keeps its id, its data and
    /// its audit chain).
    pub fn issue_renewal_token(
        &self,
        device: &str,
        now: Timestamp,
        ttl_secs: u64,
    ) -> Result<String, StateError> {
        let mut tx = self.engine.write()?;
        let row = tx
            .device(device)?
            .ok_or_else(|| StateError::NotFound(format!("device {device}")))?;
        if row.revoked {
            return Err(StateError::Invalid(format!("device {device} is revoked")));
        }
        let token = new_token()?;
        let renewal = RenewalRow {
            device: device.to_owned(),
            expires_at: now
                .as_millis()
                .saturating_add(ttl_secs.saturating_mul(1000)),
            used: false,
        };
        tx.put_renewal(&token_hash(&token), &renewal)?;
        tx.commit()?;
        Ok(token)
    }

    /// Consume a token and record the device in one transaction (SPEC §3.2): a second
    /// use of the token is refused. `issue` builds the certificate once the token is
    /// known good, given the new device id; its DER is fingerprinted and stored.
    pub fn enrol<E>(
        &self,
        token: &str,
        label: &str,
        now: Timestamp,
        issue: impl FnOnce(&str) -> Result<Vec<u8>, E>,
    ) -> Result<Result<(String, Vec<u8>), E>, StateError> {
        let mut tx = self.engine.write()?;
        let key = token_hash(token);
        let Some(mut row) = tx.token(&key)? else {
            // A renewal token: a new certificate for the device it names.
            let mut renewal = tx.renewal(&key)?.ok_or(StateError::TokenRejected)?;
            if renewal.used || renewal.expires_at <= now.as_millis() {
                return Err(StateError::TokenRejected);
            }
            let mut device = tx
                .device(&renewal.device)?
                .ok_or(StateError::TokenRejected)?;
            if device.revoked {
                return Err(StateError::TokenRejected);
            }
            let der = match issue(&renewal.device) {
                Ok(der) => der,
                Err(e) => return Ok(Err(e)),
            };
            let fingerprint: [u8; 32] = Sha256::digest(&der).into();
            device.certificate_sha256 = fingerprint;
            renewal.used = true;
            tx.put_renewal(&key, &renewal)?;
            tx.put_device(&renewal.device, &device)?;
            tx.put_certificate(&fingerprint, &renewal.device)?;
            tx.commit()?;
            return Ok(Ok((renewal.device, der)));
        };
        if row.used_by.is_some() || row.expires_at <= now.as_millis() {
            return Err(StateError::TokenRejected);
        }
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).map_err(|e| StateError::Database(format!("random: {e}")))?;
        let device_id = format!("dev-{}", hex::encode(raw));
        let der = match issue(&device_id) {
            Ok(der) => der,
            Err(e) => return Ok(Err(e)),
        };
        let fingerprint: [u8; 32] = Sha256::digest(&der).into();
        let device = DeviceRow {
            label: label.to_owned(),
            team: row.team.clone(),
            enrolled_at: now.as_millis(),
            certificate_sha256: fingerprint,
            revoked: false,
        };
        row.used_by = Some(device_id.clone());
        tx.put_token(&key, &row)?;
        tx.put_device(&device_id, &device)?;
        tx.put_certificate(&fingerprint, &device_id)?;
        tx.commit()?;
        Ok(Ok((device_id, der)))
    }

    /// Records a renewed certificate for `device` (the old one keeps working until it
    /// expires: a device that never saw the answer goes on with it).
    pub fn renew_certificate(&self, device: &str, der: &[u8]) -> Result<(), StateError> {
        let mut tx = self.engine.write()?;
        let mut row = tx
            .device(device)?
            .ok_or_else(|| StateError::NotFound(format!("device {device}")))?;
        let fingerprint: [u8; 32] = Sha256::digest(der).into();
        row.certificate_sha256 = fingerprint;
        tx.put_device(device, &row)?;
        tx.put_certificate(&fingerprint, device)?;
        tx.commit()
    }

    /// The device a client certificate was issued to.
    pub fn device_by_certificate(
        &self,
        cert_der: &[u8],
    ) -> Result<Option<(String, DeviceRow)>, StateError> {
        let fingerprint: [u8; 32] = Sha256::digest(cert_der).into();
        let mut tx = self.engine.read()?;
        let Some(id) = tx.device_by_certificate(&fingerprint)? else {
            return Ok(None);
        };
        Ok(tx.device(&id)?.map(|r| (id, r)))
    }

    /// Every device, for the admin API.
    pub fn devices(&self) -> Result<BTreeMap<String, DeviceRow>, StateError> {
        self.engine.read()?.devices()
    }

    /// Revoke a device: its certificate stops working for sync and it is told to wipe.
    pub fn revoke_device(&self, id: &str) -> Result<(), StateError> {
        let mut tx = self.engine.write()?;
        let mut row = tx
            .device(id)?
            .ok_or_else(|| StateError::NotFound(format!("device {id}")))?;
        row.revoked = true;
        tx.put_device(id, &row)?;
        tx.commit()
    }

    /// A value kept for the source adapter (watermarks, seen versions).
    pub fn source_value(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.engine.read()?.source_value(key)
    }

    /// Set a source value.
    pub fn set_source_value(&self, key: &str, value: &[u8]) -> Result<(), StateError> {
        self.set_source_values(&[(key.to_owned(), value.to_vec())])
    }

    /// Set several source values in one transaction.
    pub fn set_source_values(&self, values: &[(String, Vec<u8>)]) -> Result<(), StateError> {
        let mut tx = self.engine.write()?;
        for (k, v) in values {
            tx.set_source_value(k, v)?;
        }
        tx.commit()
    }

    /// The record the hub holds for a patient (`None` if none, or deleted upstream).
    pub fn record(&self, nhs: &NhsNumber) -> Result<Option<PatientRecord>, StateError> {
        Ok(self
            .engine
            .read()?
            .patient(nhs.as_u64())?
            .and_then(|r| r.record))
    }

    /// The objection state the hub holds for a patient, if any.
    pub fn objection(&self, nhs: &NhsNumber) -> Result<Option<ObjectionStatus>, StateError> {
        Ok(self
            .engine
            .read()?
            .objection(nhs.as_u64())?
            .map(|r| r.status))
    }

    /// The FHIR ids of every patient the hub holds a record for (the REST source's
    /// reconciliation reads each again).
    pub fn patient_fhir_ids(&self) -> Result<Vec<String>, StateError> {
        let mut out = Vec::new();
        self.engine.read()?.held_fhir_ids(&mut |_, id| {
            out.push(id.to_owned());
            Ok(())
        })?;
        Ok(out)
    }

    /// Delete the records of patients the source no longer has (by FHIR id); devices
    /// remove them at their next pull. Returns how many were held.
    pub fn delete_patients(&self, fhir_ids: &[String]) -> Result<u64, StateError> {
        if fhir_ids.is_empty() {
            return Ok(0);
        }
        let wanted: std::collections::HashSet<&str> = fhir_ids.iter().map(String::as_str).collect();
        let mut gone = Vec::new();
        self.engine.read()?.held_fhir_ids(&mut |nhs, id| {
            if wanted.contains(id) {
                gone.push(nhs);
            }
            Ok(())
        })?;
        self.delete_held(&gone)
    }

    /// Patients and objections held, for status (counts only).
    pub fn counts(&self) -> Result<(u64, u64, u64), StateError> {
        self.engine.read()?.counts()
    }
}

/// Create or update a lease in `tx` (see [`HubState::put_lease`]).
fn put_lease_in(tx: &mut dyn Write, spec: &LeaseSpec, id: Option<u64>) -> Result<u64, StateError> {
    let lease_target = spec.target.clone();
    let mut seq = tx.head()?;
    let existing = match (id, &spec.name) {
        (Some(id), _) => Some(
            tx.lease(id)?
                .ok_or_else(|| StateError::NotFound(format!("lease {id}")))?,
        ),
        (None, Some(name)) => tx
            .leases()?
            .into_iter()
            .find(|row| row.name.as_deref() == Some(name.as_str()) && row.ended.is_none()),
        (None, None) => None,
    };
    let id = match &existing {
        Some(row) => row.lease.id.0,
        None => tx.next_lease_id()?,
    };
    let lease = crate::leases::to_wire(id, spec)?;
    if let Some(row) = &existing {
        if row.ended.is_some() {
            return Err(StateError::Invalid(format!("lease {id} has ended")));
        }
        if row.target != lease_target {
            return Err(StateError::Invalid(
                "a lease's device or team cannot change: revoke it and grant a new one".into(),
            ));
        }
        if row.lease == lease && row.name == spec.name {
            return Ok(id);
        }
    }
    seq += 1;
    let patients_seq = match &existing {
        Some(row) if row.lease.patients == lease.patients => row.patients_seq,
        _ => seq,
    };
    let row = LeaseRow {
        lease,
        target: lease_target,
        name: spec.name.clone(),
        created_seq: existing.as_ref().map_or(seq, |r| r.created_seq),
        patients_seq,
        seq,
        ended: None,
    };
    tx.relog(existing.map(|r| r.seq), seq, LogKey::Lease(id))?;
    tx.put_lease(id, &row)?;
    tx.set_head(seq)?;
    Ok(id)
}

/// True if two records hold the same content (versions aside).
fn same_content(a: &PatientRecord, b: &PatientRecord) -> bool {
    let mut b = b.clone();
    b.version = a.version;
    *a == b
}

/// Records `o` for `nhs` unless it is what the hub holds (`old`): the new row, or `None`
/// when nothing changed.
fn set_objection(
    tx: &mut dyn Write,
    seq: &mut u64,
    nhs: u64,
    o: SourceObjection,
    old: Option<ObjectionRow>,
) -> Result<Option<ObjectionRow>, StateError> {
    let unchanged = match &old {
        Some(row) => row.status == o.status && row.recorded_at == o.recorded_at,
        // A withdrawal of an objection the hub never held changes nothing.
        None => o.status == ObjectionStatus::Withdrawn,
    };
    if unchanged {
        return Ok(None);
    }
    *seq += 1;
    tx.relog(old.map(|r| r.seq), *seq, LogKey::Objection(nhs))?;
    let row = ObjectionRow {
        seq: *seq,
        status: o.status,
        recorded_at: o.recorded_at,
    };
    tx.put_objection(nhs, &row)?;
    Ok(Some(row))
}

fn new_token() -> Result<String, StateError> {
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).map_err(|e| StateError::Database(format!("random: {e}")))?;
    Ok(hex::encode(raw))
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Parse an NHS number given by an administrator.
pub(crate) fn parse_nhs(s: &str) -> Result<NhsNumber, StateError> {
    NhsNumber::parse(s)
        .map_err(|_| StateError::Invalid("a lease names an invalid NHS number".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redb::{META, PATIENTS};
    use redb::Database;

    /// A database holding version-1 or version-2 records opens with each row read as
    /// the current record (nothing lost) and the format stepped.
    #[test]
    fn older_record_formats_are_migrated_at_open() {
        use sync_protocol::record::{v1, v2};
        #[derive(Serialize)]
        struct Row<R> {
            seq: u64,
            fhir_id: String,
            record: Option<R>,
        }
        fn old_db<R: Serialize>(path: &Path, format: u32, nhs: u64, record: R) {
            drop(HubState::open(path).unwrap());
            let db = Database::open(path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let row = Row {
                    seq: 7,
                    fhir_id: "p-1".into(),
                    record: Some(record),
                };
                let mut patients = tx.open_table(PATIENTS).unwrap();
                patients
                    .insert(nhs, postcard::to_allocvec(&row).unwrap().as_slice())
                    .unwrap();
                let mut meta = tx.open_table(META).unwrap();
                meta.insert("records", format.to_le_bytes().as_slice())
                    .unwrap();
            }
            tx.commit().unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let record = carecache_synth::Generator::new(5).patient();
        let nhs = record.nhs_number;

        let v2_path = dir.path().join("v2.redb");
        old_db(&v2_path, 2, nhs.as_u64(), v2::PatientRecord::from(&record));
        let state = HubState::open(&v2_path).unwrap();
        assert_eq!(state.record(&nhs).unwrap().as_ref(), Some(&record));

        let v1_path = dir.path().join("v1.redb");
        let as_v1 = v1::PatientRecord::from(&record);
        old_db(&v1_path, 1, nhs.as_u64(), as_v1.clone());
        let state = HubState::open(&v1_path).unwrap();
        assert_eq!(
            state.record(&nhs).unwrap(),
            Some(PatientRecord::from(as_v1))
        );
    }
}
