//! Building a device's batch from its cursor (SPEC §3.4–3.5, §6 invariants 1, 3, 4).
//!
//! A cursor names a *round*: every change to the device's view between log positions
//! `base` and `target`, sent in three phases — objections, then lease changes, then
//! records (upserts, removals and, to a device that holds patients, offers) — with the
//! last key sent in the current phase. Records go most important first: patients with
//! alerts, then by the start of the earliest lease naming them, then by NHS number
//! (SPEC §3.4, "Order"). The hub keeps no per-device state: any cursor it issued can be
//! pulled again and yields the same or a later state. Records are always sent as they
//! are now; anything that changes after `target` is in the log after `target` and so is
//! sent again in the next round. `more` is false only when a round ends with nothing
//! newer in the log, nothing offered and every wanted record answered, and only then
//! does the batch carry the allowed-set digest.
//!
//! A patient new to a lease of the device that the device may hold already — any, in a
//! round from nothing for a device that says it holds patients (a resync); else one
//! another lease of the device named when the round began (a lease moved, split or
//! merged) — is *offered* by version; the device names the ones it lacks in its next
//! pull's `want`, answered before anything else. A device that already holds a
//! patient's current version is sent nothing more for it; a patient it cannot hold is
//! sent whole at once.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sync_protocol::NhsNumber;
use sync_protocol::digest::allowed_set_digest;
use sync_protocol::message::{
    AllowedSetDigest, Batch, LeaseChange, ObjectionChange, ObjectionStatus, Offer, Removal,
    RemovalReason,
};
use sync_protocol::record::PatientRecord;
use sync_protocol::types::{BoundedVec, Cursor, Hash32, RecordVersion, Timestamp};

use crate::state::{HubState, LeaseRow, LogKey, ObjectionRow, PatientRow, StateError, Target, enc};

/// Bytes kept back from the budget for list lengths, cursor, flags, time and digest.
const OVERHEAD: usize = 512;

const PHASE_OBJECTIONS: u8 = 0;
const PHASE_LEASES: u8 = 1;
const PHASE_RECORDS: u8 = 2;
const PHASE_DONE: u8 = 3;

/// First byte of a cursor in the ordered format (a version-1 cursor starts with the
/// hub id itself).
const CURSOR_ORDERED: u8 = 0xC5;

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

/// A patient's place in a round's record order: alerts first (0), then the rest (1);
/// then the start of the earliest lease naming the patient; then the NHS number. The
/// objection and lease phases use `(0, 0, key)`.
type Place = (u8, u64, u64);

/// The cursor in its first format: records in NHS-number order.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
struct CursorV1 {
    hub: [u8; 8],
    base: u64,
    target: u64,
    phase: u8,
    after: u64,
}

/// The cursor: a round, a phase, the place last sent, and the patients the device will
/// hold at the round's end (counted once, at its start).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
struct CursorV2 {
    hub: [u8; 8],
    base: u64,
    target: u64,
    phase: u8,
    after: Place,
    expected: u32,
}

impl CursorV2 {
    fn encode(&self) -> Result<Cursor, PullError> {
        let mut bytes = vec![CURSOR_ORDERED];
        bytes.extend(enc(self));
        Cursor::new(bytes).map_err(|_| PullError::CursorInvalid("cursor too long"))
    }

    fn decode(raw: &Cursor, hub: [u8; 8]) -> Result<(Self, bool), PullError> {
        let bytes = raw.as_bytes();
        let ordered = bytes
            .split_first()
            .filter(|(first, _)| **first == CURSOR_ORDERED)
            .and_then(|(_, rest)| postcard::from_bytes::<Self>(rest).ok())
            .filter(|c| c.hub == hub);
        if let Some(c) = ordered {
            return Ok((c, false));
        }
        // A cursor issued before records were ordered: the round goes on from its phase,
        // and a records phase starts its records again (sending some twice is harmless;
        // skipping some would not be).
        let v1: CursorV1 = postcard::from_bytes(bytes)
            .map_err(|_| PullError::CursorInvalid("not a cursor of this hub"))?;
        if v1.hub != hub {
            return Err(PullError::CursorInvalid("issued by another hub"));
        }
        let after = if v1.phase == PHASE_RECORDS {
            (0, 0, 0)
        } else {
            (0, 0, v1.after)
        };
        Ok((
            Self {
                hub: v1.hub,
                base: v1.base,
                target: v1.target,
                phase: v1.phase,
                after,
                expected: 0,
            },
            true,
        ))
    }
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

/// What the device asked for.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// Its last cursor.
    pub cursor: Option<&'a Cursor>,
    /// Its byte budget (already capped by the hub's).
    pub max_bytes: u32,
    /// Patients it holds (0: send records rather than offers).
    pub holding: u32,
    /// Offered patients it lacks.
    pub want: &'a [NhsNumber],
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

/// The key of a batch that any device with the same leases would be sent for the same
/// request at the same log head — the same bytes, so they may be built once (shared
/// snapshots, SPEC §3.4). `None` when the answer depends on what this device holds (it
/// names wanted patients).
///
/// The key names the window of `window_secs` of hub time `now` falls in, so that a shared
/// batch's hub time is never older than that window (a device refuses a batch whose time
/// falls far behind its trusted time).
pub fn shared_key(
    state: &HubState,
    who: &Puller<'_>,
    req: &Request<'_>,
    version: u16,
    now: Timestamp,
    window_secs: u64,
) -> Result<Option<Hash32>, PullError> {
    if !req.want.is_empty() {
        return Ok(None);
    }
    let mut tx = state.engine.read()?;
    let head = tx.head()?;
    let mut h = Sha256::new();
    h.update(b"carecache/shared-batch/v1\0");
    h.update(state.hub_id);
    h.update(head.to_be_bytes());
    h.update((now.as_millis() / window_secs.max(1).saturating_mul(1000)).to_be_bytes());
    h.update(version.to_be_bytes());
    h.update(req.max_bytes.to_be_bytes());
    h.update([u8::from(req.holding > 0)]);
    match req.cursor {
        Some(c) => {
            h.update([1]);
            h.update(c.as_bytes());
        }
        None => h.update([0]),
    }
    for row in tx.leases()? {
        if who.holds(&row.target) {
            h.update(row.lease.id.0.to_be_bytes());
            h.update(row.seq.to_be_bytes());
        }
    }
    Ok(Some(Hash32(h.finalize().into())))
}

/// Answer a pull.
#[allow(clippy::too_many_lines)] // One round's phases, in the order SPEC §3.4 gives them.
pub fn pull(
    state: &HubState,
    who: &Puller<'_>,
    req: &Request<'_>,
    now: Timestamp,
) -> Result<Batch, PullError> {
    let mut tx = state.engine.read()?;
    let head = tx.head()?;
    let mine: Vec<LeaseRow> = tx
        .leases()?
        .into_iter()
        .filter(|r| who.holds(&r.target))
        .collect();
    let active = || mine.iter().filter(|r| r.ended.is_none());
    // Each lease patient with the start of the earliest lease naming it.
    let mut lease_patients: BTreeMap<u64, u64> = BTreeMap::new();
    for r in active() {
        let start = r.lease.not_before.as_millis();
        for n in r.lease.patients.iter() {
            lease_patients
                .entry(n.as_u64())
                .and_modify(|s| *s = (*s).min(start))
                .or_insert(start);
        }
    }
    // What the round reads of each patient its leases name (or it wants), read at once.
    let mut keys: Vec<u64> = lease_patients.keys().copied().collect();
    keys.extend(req.want.iter().map(|n| n.as_u64()));
    keys.sort_unstable();
    keys.dedup();
    let objections_now = tx.objections(&keys)?;
    let summaries_now = tx.summaries(&keys)?;
    drop(keys);
    let tx = std::cell::RefCell::new(tx);
    let objection =
        |n: u64| -> Result<Option<ObjectionRow>, PullError> { Ok(objections_now.get(&n).copied()) };
    let summary =
        |n: u64| -> Result<Option<(u64, bool)>, PullError> { Ok(summaries_now.get(&n).copied()) };
    let record =
        |n: u64| -> Result<Option<PatientRow>, PullError> { Ok(tx.borrow_mut().patient(n)?) };
    // The patients the device may hold once a round is complete, by version.
    let allowed = || -> Result<Vec<(NhsNumber, RecordVersion)>, PullError> {
        let mut out = Vec::new();
        for &n in lease_patients.keys() {
            if objection(n)?.is_some_and(|o| o.status == ObjectionStatus::Objected) {
                continue;
            }
            if let Some((version, _)) = summary(n)?
                && version != 0
            {
                out.push((nhs(n)?, RecordVersion(version)));
            }
        }
        Ok(out)
    };
    let count = |v: Vec<(NhsNumber, RecordVersion)>| u32::try_from(v.len()).unwrap_or(u32::MAX);

    let mut c = match req.cursor {
        None => CursorV2 {
            hub: state.hub_id,
            base: 0,
            target: head,
            phase: PHASE_OBJECTIONS,
            after: (0, 0, 0),
            expected: count(allowed()?),
        },
        Some(raw) => {
            let (mut c, old) = CursorV2::decode(raw, state.hub_id)?;
            if c.target > head || c.base > c.target || c.phase > PHASE_DONE {
                return Err(PullError::CursorInvalid("ahead of the hub's change log"));
            }
            if old {
                c.expected = count(allowed()?);
            }
            c
        }
    };
    if c.phase == PHASE_DONE && c.target < head {
        c = CursorV2 {
            hub: state.hub_id,
            base: c.target,
            target: head,
            phase: PHASE_OBJECTIONS,
            after: (0, 0, 0),
            expected: count(allowed()?),
        };
    }

    let fresh_patients: BTreeSet<u64> = active()
        .filter(|r| r.patients_seq > c.base)
        .flat_map(|r| r.lease.patients.iter().map(|n| n.as_u64()))
        .collect();
    // Fresh patients the device may hold already, and so is offered rather than sent:
    // in a round from nothing, any (a device that holds patients is resynchronising);
    // otherwise those named by a lease the device held when the round began (a lease
    // moved from another tablet onto patients it covers, split, merged, or given more
    // patients).
    let offering = req.holding > 0;
    // A lease granted by a lookup came with its record.
    let mut held_before: HashSet<u64> = HashSet::new();
    if offering && c.base > 0 {
        for r in &mine {
            // A lease the device held when the round began (its patients may have changed
            // since: the ones it named then are held, the added ones are wanted).
            let held_then = r.created_seq <= c.base && r.ended.is_none_or(|_| r.seq > c.base);
            let looked_up = r.ended.is_none() && tx.borrow_mut().is_lookup_lease(r.lease.id.0)?;
            if held_then || looked_up {
                held_before.extend(r.lease.patients.iter().map(|n| n.as_u64()));
            }
        }
    }
    let may_hold = |n: u64| offering && (c.base == 0 || held_before.contains(&n));
    // Patients and objections changed since `base` that this device's leases name.
    let changed = |want_objections: bool| -> Result<BTreeSet<u64>, PullError> {
        let mut out = BTreeSet::new();
        if c.base == 0 {
            return Ok(out); // a first round sends every lease patient anyway
        }
        tx.borrow_mut().log_after(c.base, &mut |key| {
            match key {
                LogKey::Objection(n) if lease_patients.contains_key(&n) => {
                    out.insert(n);
                }
                LogKey::Patient(n) if !want_objections && lease_patients.contains_key(&n) => {
                    out.insert(n);
                }
                _ => {}
            }
            Ok(())
        })?;
        Ok(out)
    };

    let mut budget = Budget {
        left: usize::try_from(req.max_bytes)
            .unwrap_or(usize::MAX)
            .saturating_sub(OVERHEAD),
        items: 0,
    };
    let mut objections = Vec::new();
    let mut lease_changes = Vec::new();
    let mut upserts: Vec<PatientRecord> = Vec::new();
    let mut removals = Vec::new();
    let mut offers = Vec::new();
    let mut sent: HashSet<u64> = HashSet::new();
    let mut full = false;

    // The record (or removal) for patient `n` as it is now; `None` when there is
    // nothing to send.
    let item = |n: u64| -> Result<Option<Result<PatientRecord, Removal>>, PullError> {
        let nhs_number = nhs(n)?;
        if objection(n)?.is_some_and(|o| o.status == ObjectionStatus::Objected) {
            return Ok(Some(Err(Removal {
                nhs_number,
                reason: RemovalReason::Objection,
            })));
        }
        Ok(match record(n)? {
            Some(PatientRow {
                record: Some(r), ..
            }) => Some(Ok(r)),
            Some(_) => Some(Err(Removal {
                nhs_number,
                reason: RemovalReason::DeletedUpstream,
            })),
            None => None, // not (yet) known upstream
        })
    };
    let push = |it: Result<PatientRecord, Removal>,
                budget: &mut Budget,
                upserts: &mut Vec<PatientRecord>,
                removals: &mut Vec<Removal>|
     -> bool {
        let (size, room) = match &it {
            Ok(r) => (enc(r).len(), upserts.len() < 100_000),
            Err(r) => (enc(r).len(), removals.len() < 200_000),
        };
        if !room || !budget.take(size) {
            return false;
        }
        match it {
            Ok(r) => upserts.push(r),
            Err(r) => removals.push(r),
        }
        true
    };

    // Wanted records first: the device is waiting for them to finish its round.
    let mut wants_done: u32 = 0;
    for n in req.want.iter().map(|n| n.as_u64()) {
        let objection_now = objection(n)?;
        let skip = !lease_patients.contains_key(&n)
            // An objection newer than the round is sent first, in the next round.
            || objection_now.is_some_and(|o| o.seq > c.target || o.status == ObjectionStatus::Objected);
        if !skip && let Some(it) = item(n)? {
            if !push(it, &mut budget, &mut upserts, &mut removals) {
                full = true;
                break;
            }
            sent.insert(n);
        }
        wants_done += 1;
    }

    if !full && c.phase == PHASE_OBJECTIONS {
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
        for (n, o) in set.range(c.after.2.saturating_add(1)..) {
            let change = ObjectionChange {
                nhs_number: nhs(*n)?,
                status: o.status,
                recorded_at: o.recorded_at,
            };
            if objections.len() >= 200_000 || !budget.take(enc(&change).len()) {
                full = true;
                break;
            }
            c.after = (0, 0, *n);
            objections.push(change);
        }
        if !full {
            c.phase = PHASE_LEASES;
            c.after = (0, 0, 0);
        }
    }

    if !full && c.phase == PHASE_LEASES {
        let mut changed_leases: Vec<&LeaseRow> = mine
            .iter()
            .filter(|r| r.seq > c.base && r.lease.id.0 > c.after.2)
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
            c.after = (0, 0, row.lease.id.0);
            lease_changes.push(change);
        }
        if !full {
            c.phase = PHASE_RECORDS;
            c.after = (0, 0, 0);
        }
    }

    if !full && c.phase == PHASE_RECORDS {
        let changed_now = changed(false)?;
        let mut candidates: Vec<Place> = Vec::new();
        for &n in changed_now
            .iter()
            .chain(fresh_patients.difference(&changed_now))
        {
            let alerts = summary(n)?.is_some_and(|(_, a)| a);
            let start = lease_patients.get(&n).copied().unwrap_or(u64::MAX);
            let place = (u8::from(!alerts), start, n);
            if place > c.after {
                candidates.push(place);
            }
        }
        candidates.sort_unstable();
        for place in candidates {
            let n = place.2;
            let obj = objection(n)?;
            // An objection that changed after this round began is sent first in the
            // next round; sending the record now could contradict what the device holds.
            if sent.contains(&n) || obj.is_some_and(|o| o.seq > c.target) {
                c.after = place;
                continue;
            }
            let objected = obj.is_some_and(|o| o.status == ObjectionStatus::Objected);
            // A patient new to this device's view, not changed since: offered by version
            // to a device that may hold it already.
            if may_hold(n) && !objected && !changed_now.contains(&n) {
                match summary(n)? {
                    Some((version, _)) if version != 0 => {
                        let offer = Offer {
                            nhs_number: nhs(n)?,
                            version: RecordVersion(version),
                        };
                        if offers.len() >= 200_000 || !budget.take(enc(&offer).len()) {
                            full = true;
                            break;
                        }
                        offers.push(offer);
                        c.after = place;
                        continue;
                    }
                    // Deleted upstream, or not known: as for a record.
                    _ => {}
                }
            }
            let Some(it) = item(n)? else {
                c.after = place;
                continue;
            };
            if !push(it, &mut budget, &mut upserts, &mut removals) {
                full = true;
                break;
            }
            c.after = place;
        }
        if !full {
            c.phase = PHASE_DONE;
            c.after = (0, 0, 0);
        }
    }

    let wants_left = usize::try_from(wants_done).unwrap_or(usize::MAX) < req.want.len();
    let more = full || c.target < head || !offers.is_empty() || wants_left;
    let allowed = if more {
        AllowedSetDigest {
            patients: 0,
            sha256: Hash32([0; 32]),
        }
    } else {
        allowed_set_digest(allowed()?)
    };
    let next_cursor = c.encode()?;
    let list = |what: &str| StateError::Invalid(format!("batch {what} over the protocol limit"));
    let expected = c.expected;
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
    .and_then(|b| b.with_progress(BoundedVec::try_from(offers)?, wants_done, expected))
    .map_err(|e| PullError::State(StateError::Invalid(format!("batch inconsistent: {e}"))))
}

fn nhs(n: u64) -> Result<NhsNumber, StateError> {
    NhsNumber::from_u64(n).map_err(|_| StateError::Corrupt("NHS number key"))
}
