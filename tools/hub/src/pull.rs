//! Building a device's batch from its cursor (SPEC §3.4–3.5, §6 invariants 1, 3, 4).
//!
//! A cursor names a *round*: every change to the device's view between log positions
//! `base` and `target`, sent in three phases — objections, then lease changes, then
//! records (upserts and removals, in NHS-number order) — with the last key sent in the
//! current phase. The hub keeps no per-device state: any cursor it issued can be pulled
//! again and yields the same or a later state. Records are always sent as they are now;
//! anything that changes after `target` is in the log after `target` and so is sent
//! again in the next round. `more` is false only when a round ends with nothing newer in
//! the log, and only then does the batch carry the allowed-set digest.

use std::collections::{BTreeMap, BTreeSet};

use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use sync_protocol::NhsNumber;
use sync_protocol::digest::allowed_set_digest;
use sync_protocol::message::{
    AllowedSetDigest, Batch, LeaseChange, ObjectionChange, ObjectionStatus, Removal, RemovalReason,
};
use sync_protocol::record::PatientRecord;
use sync_protocol::types::{BoundedVec, Cursor, Hash32, Timestamp};

use crate::state::{
    HubState, LEASES, LOG, LeaseRow, LogKey, META, OBJECTIONS, ObjectionRow, PATIENTS, PatientRow,
    StateError, Target, dec, enc, read_seq,
};

/// Bytes kept back from the budget for list lengths, cursor, flags, time and digest.
const OVERHEAD: usize = 512;

const PHASE_OBJECTIONS: u8 = 0;
const PHASE_LEASES: u8 = 1;
const PHASE_RECORDS: u8 = 2;
const PHASE_DONE: u8 = 3;

/// Why a pull cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The cursor was not issued by this hub, or is from the future (device must pull
    /// with no cursor).
    #[error("cursor invalid: {0}")]
    CursorInvalid(&'static str),
    /// One lease does not fit the device's byte budget (device should raise it).
    #[error("a lease of {patients} patients needs a pull budget of at least {needed} bytes")]
    LeaseTooLarge {
        /// Patients in the lease.
        patients: usize,
        /// Budget that would fit it.
        needed: usize,
    },
    /// The hub's state failed.
    #[error(transparent)]
    State(#[from] StateError),
}

impl From<redb::TransactionError> for PullError {
    fn from(e: redb::TransactionError) -> Self {
        Self::State(e.into())
    }
}
impl From<redb::TableError> for PullError {
    fn from(e: redb::TableError) -> Self {
        Self::State(e.into())
    }
}
impl From<redb::StorageError> for PullError {
    fn from(e: redb::StorageError) -> Self {
        Self::State(e.into())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
struct CursorV1 {
    hub: [u8; 8],
    base: u64,
    target: u64,
    phase: u8,
    after: u64,
}

/// Who is pulling: the device id and its team (from its certificate, never a message).
#[derive(Clone, Debug)]
pub struct Puller<'a> {
    /// Device id.
    pub id: &'a str,
    /// Team the device was enrolled into.
    pub team: Option<&'a str>,
}

impl Puller<'_> {
    fn holds(&self, target: &Target) -> bool {
        match target {
            Target::Device(d) => d == self.id,
            Target::Team(t) => self.team == Some(t.as_str()),
        }
    }
}

/// Accumulates items while they fit.
struct Budget {
    left: usize,
    items: usize,
}

impl Budget {
    /// Take `size` bytes if they fit; the first item of a batch always fits (a record
    /// is under the minimum budget by SPEC §4).
    fn take(&mut self, size: usize) -> bool {
        if size > self.left && self.items > 0 {
            return false;
        }
        self.left = self.left.saturating_sub(size);
        self.items += 1;
        true
    }
}

/// Answer a pull.
pub fn pull(
    state: &HubState,
    who: &Puller<'_>,
    cursor: Option<&Cursor>,
    max_bytes: u32,
    now: Timestamp,
) -> Result<Batch, PullError> {
    let tx = state.db.begin_read()?;
    let head = read_seq(&tx.open_table(META)?)?;
    let mut c = match cursor {
        None => CursorV1 {
            hub: state.hub_id,
            base: 0,
            target: head,
            phase: PHASE_OBJECTIONS,
            after: 0,
        },
        Some(raw) => {
            let c: CursorV1 = postcard::from_bytes(raw.as_bytes())
                .map_err(|_| PullError::CursorInvalid("not a cursor of this hub"))?;
            if c.hub != state.hub_id {
                return Err(PullError::CursorInvalid("issued by another hub"));
            }
            if c.target > head || c.base > c.target || c.phase > PHASE_DONE {
                return Err(PullError::CursorInvalid("ahead of the hub's change log"));
            }
            c
        }
    };
    if c.phase == PHASE_DONE && c.target < head {
        c = CursorV1 {
            hub: state.hub_id,
            base: c.target,
            target: head,
            phase: PHASE_OBJECTIONS,
            after: 0,
        };
    }

    let leases_t = tx.open_table(LEASES)?;
    let patients_t = tx.open_table(PATIENTS)?;
    let objections_t = tx.open_table(OBJECTIONS)?;
    let log_t = tx.open_table(LOG)?;

    let mut mine: Vec<LeaseRow> = Vec::new();
    for item in leases_t.iter()? {
        let (_, v) = item?;
        let row: LeaseRow = dec(v.value(), "leases")?;
        if who.holds(&row.target) {
            mine.push(row);
        }
    }
    let active = || mine.iter().filter(|r| r.ended.is_none());
    let lease_patients: BTreeSet<u64> = active()
        .flat_map(|r| r.lease.patients.iter().map(|n| n.as_u64()))
        .collect();
    let fresh_patients: BTreeSet<u64> = active()
        .filter(|r| r.patients_seq > c.base)
        .flat_map(|r| r.lease.patients.iter().map(|n| n.as_u64()))
        .collect();
    // Patients and objections changed since `base` that this device's leases name.
    let changed = |want_objections: bool| -> Result<BTreeSet<u64>, PullError> {
        let mut out = BTreeSet::new();
        if c.base == 0 {
            return Ok(out); // a first round sends every lease patient anyway
        }
        for item in log_t.range(c.base + 1..)? {
            let (_, v) = item?;
            match dec::<LogKey>(v.value(), "log")? {
                LogKey::Objection(n) if lease_patients.contains(&n) => {
                    out.insert(n);
                }
                LogKey::Patient(n) if !want_objections && lease_patients.contains(&n) => {
                    out.insert(n);
                }
                _ => {}
            }
        }
        Ok(out)
    };
    let objection = |n: u64| -> Result<Option<ObjectionRow>, PullError> {
        Ok(objections_t
            .get(n)?
            .map(|v| dec(v.value(), "objections"))
            .transpose()?)
    };

    let mut budget = Budget {
        left: usize::try_from(max_bytes)
            .unwrap_or(usize::MAX)
            .saturating_sub(OVERHEAD),
        items: 0,
    };
    let mut objections = Vec::new();
    let mut lease_changes = Vec::new();
    let mut upserts: Vec<PatientRecord> = Vec::new();
    let mut removals = Vec::new();
    let mut full = false;

    if c.phase == PHASE_OBJECTIONS {
        let mut set: BTreeMap<u64, ObjectionRow> = BTreeMap::new();
        for n in changed(true)? {
            if let Some(o) = objection(n)? {
                set.insert(n, o);
            }
        }
        // A patient newly on a lease gets its objection state whole, a withdrawal
        // included: the device may remember an objection from an earlier lease that
        // was withdrawn while no lease of its named the patient, and would otherwise
        // refuse the record for good.
        for &n in &fresh_patients {
            if let Some(o) = objection(n)? {
                set.insert(n, o);
            }
        }
        for (n, o) in set.range(c.after.saturating_add(1)..) {
            let change = ObjectionChange {
                nhs_number: nhs(*n)?,
                status: o.status,
                recorded_at: o.recorded_at,
            };
            if objections.len() >= 200_000 || !budget.take(enc(&change).len()) {
                full = true;
                break;
            }
            c.after = *n;
            objections.push(change);
        }
        if !full {
            c.phase = PHASE_LEASES;
            c.after = 0;
        }
    }

    if !full && c.phase == PHASE_LEASES {
        let mut changed_leases: Vec<&LeaseRow> = mine
            .iter()
            .filter(|r| r.seq > c.base && r.lease.id.0 > c.after)
            .collect();
        changed_leases.sort_by_key(|r| r.lease.id.0);
        for row in changed_leases {
            let change = match row.ended {
                // Never seen by this device: nothing to revoke.
                Some(_) if row.created_seq > c.base => continue,
                Some(reason) => LeaseChange::Revoked {
                    id: row.lease.id,
                    reason,
                },
                None if row.created_seq > c.base => LeaseChange::Granted(row.lease.clone()),
                None => LeaseChange::Changed(row.lease.clone()),
            };
            let size = enc(&change).len();
            if size > budget.left && budget.items == 0 {
                return Err(PullError::LeaseTooLarge {
                    patients: row.lease.patients.len(),
                    needed: size + OVERHEAD,
                });
            }
            if lease_changes.len() >= 1024 || !budget.take(size) {
                full = true;
                break;
            }
            c.after = row.lease.id.0;
            lease_changes.push(change);
        }
        if !full {
            c.phase = PHASE_RECORDS;
            c.after = 0;
        }
    }

    if !full && c.phase == PHASE_RECORDS {
        let mut candidates = changed(false)?;
        candidates.extend(fresh_patients.iter().copied());
        for &n in candidates.range(c.after.saturating_add(1)..) {
            let obj = objection(n)?;
            // An objection that changed after this round began is sent first in the
            // next round; sending the record now could contradict what the device holds.
            if obj.is_some_and(|o| o.seq > c.target) {
                c.after = n;
                continue;
            }
            let row: Option<PatientRow> = patients_t
                .get(n)?
                .map(|v| dec(v.value(), "patients"))
                .transpose()?;
            let nhs_number = nhs(n)?;
            let (size, item) = if obj.is_some_and(|o| o.status == ObjectionStatus::Objected) {
                let r = Removal {
                    nhs_number,
                    reason: RemovalReason::Objection,
                };
                (enc(&r).len(), Err(r))
            } else {
                match row.and_then(|r| r.record.map(Ok).or(Some(Err(())))) {
                    Some(Ok(record)) => (enc(&record).len(), Ok(record)),
                    Some(Err(())) => {
                        let r = Removal {
                            nhs_number,
                            reason: RemovalReason::DeletedUpstream,
                        };
                        (enc(&r).len(), Err(r))
                    }
                    None => {
                        c.after = n;
                        continue; // not (yet) known upstream: nothing to send
                    }
                }
            };
            let room = match &item {
                Ok(_) => upserts.len() < 100_000,
                Err(_) => removals.len() < 200_000,
            };
            if !room || !budget.take(size) {
                full = true;
                break;
            }
            c.after = n;
            match item {
                Ok(record) => upserts.push(record),
                Err(r) => removals.push(r),
            }
        }
        if !full {
            c.phase = PHASE_DONE;
            c.after = 0;
        }
    }

    let more = full || c.target < head;
    let allowed = if more {
        AllowedSetDigest {
            patients: 0,
            sha256: Hash32([0; 32]),
        }
    } else {
        let mut entries = Vec::new();
        for &n in &lease_patients {
            if objection(n)?.is_some_and(|o| o.status == ObjectionStatus::Objected) {
                continue;
            }
            if let Some(v) = patients_t.get(n)? {
                let row: PatientRow = dec(v.value(), "patients")?;
                if let Some(r) = row.record {
                    entries.push((r.nhs_number, r.version));
                }
            }
        }
        allowed_set_digest(entries)
    };
    let next_cursor =
        Cursor::new(enc(&c)).map_err(|_| PullError::CursorInvalid("cursor too long"))?;
    let list = |what: &str| StateError::Invalid(format!("batch {what} over the protocol limit"));
    Batch::new(
        BoundedVec::try_from(objections).map_err(|_| list("objections"))?,
        BoundedVec::try_from(lease_changes).map_err(|_| list("leases"))?,
        BoundedVec::try_from(upserts).map_err(|_| list("upserts"))?,
        BoundedVec::try_from(removals).map_err(|_| list("removals"))?,
        next_cursor,
        more,
        now,
        allowed,
    )
    .map_err(|e| PullError::State(StateError::Invalid(format!("batch inconsistent: {e}"))))
}

fn nhs(n: u64) -> Result<NhsNumber, StateError> {
    NhsNumber::from_u64(n).map_err(|_| StateError::Corrupt("NHS number key"))
}
