//! The audit sink (SPEC §3.6, §6 invariants 5 and 6): verifies each device's hash chain
//! and sequence continuity, stores each (device, seq) once, durably, and acknowledges
//! the highest durable sequence. A broken chain flags the device and nothing after the
//! break is accepted.

use serde::{Deserialize, Serialize};
use sync_protocol::NhsNumber;
use sync_protocol::audit::{AuditRecord, chain_hash};
use sync_protocol::message::PushAudit;
use sync_protocol::types::Hash32;

use crate::state::{HubState, StateError};
use crate::store::Write;

/// What one accepted push did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pushed {
    /// Highest sequence now held durably for the device (the acknowledgement).
    pub durable: u64,
    /// Entries stored by this push.
    pub stored: u64,
    /// Entries already held with equal hashes (a resend after a lost acknowledgement).
    pub repeated: u64,
}

/// A device's chain as the hub holds it.
#[derive(Clone, Default, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ChainHead {
    /// Highest durable sequence (0: none yet).
    pub seq: u64,
    /// Hash of that entry.
    pub hash: [u8; 32],
    /// Sequence at which the chain broke; the device is flagged for review.
    pub broken_at: Option<u64>,
    /// A privacy officer cleared the flag: the next entry after `seq` is taken as
    /// continuing the chain from the predecessor hash the device sends with it (its own
    /// chain is still checked; only the link to what the hub holds is waived).
    pub rejoin: bool,
    /// Where the chain was rejoined after a clearance: (sequence, the predecessor hash
    /// the device sent), so the stored chain still verifies end to end.
    pub rejoined: Vec<(u64, [u8; 32])>,
}

/// A chain head as hubs before the flag could be cleared stored it.
#[derive(Deserialize)]
struct ChainHeadV1 {
    seq: u64,
    hash: [u8; 32],
    broken_at: Option<u64>,
}

impl ChainHead {
    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        crate::state::enc(self)
    }

    /// A stored head, in this form or the one before it (seq, hash, broken_at), which
    /// is a strict prefix of this one and so never mistaken for it.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        if let Ok(h) = postcard::from_bytes::<ChainHead>(bytes) {
            return Ok(h);
        }
        let v1: ChainHeadV1 =
            postcard::from_bytes(bytes).map_err(|_| StateError::Corrupt("audit_heads"))?;
        Ok(ChainHead {
            seq: v1.seq,
            hash: v1.hash,
            broken_at: v1.broken_at,
            ..ChainHead::default()
        })
    }
}

/// Why a push was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// Entries start past the next expected sequence (device must resend from it).
    #[error("audit gap: expected sequence {expected}")]
    Gap {
        /// The next sequence the hub expects.
        expected: u64,
    },
    /// A hash does not link or differs from the stored one: the device is flagged.
    #[error("audit chain broken at sequence {at}; device flagged for review")]
    ChainBroken {
        /// First bad sequence.
        at: u64,
    },
    /// An entry's record does not decode as an `AuditRecord`.
    #[error("audit record at sequence {at} is malformed")]
    Malformed {
        /// The entry.
        at: u64,
    },
    /// The hub's state failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// One stored entry.
#[derive(Clone, Debug)]
pub struct StoredEntry {
    /// Device id.
    pub device: String,
    /// Sequence.
    pub seq: u64,
    /// Chain hash.
    pub hash: Hash32,
    /// Decoded record.
    pub record: AuditRecord,
}

impl HubState {
    /// Accept a push from `device`: entries checked against the chain, new ones stored
    /// (with their index rows) and the head moved in one durable commit. The device's
    /// head is held until then, so pushes of one device received by two hub instances
    /// at once are checked one after the other.
    pub fn push_audit(&self, device: &str, push: &PushAudit) -> Result<Pushed, AuditError> {
        let mut tx = self.engine.write()?;
        let mut head = tx.audit_head(device)?.unwrap_or_default();
        let mut pushed = Pushed::default();
        let outcome = check_and_store(tx.as_mut(), device, &mut head, push, &mut pushed);
        if let Err(AuditError::ChainBroken { at }) = &outcome
            && head.broken_at.is_none()
        {
            head.broken_at = Some(*at);
            tracing::warn!(device, seq = at, "audit chain broken; device flagged");
        }
        pushed.durable = head.seq;
        match &outcome {
            // Nothing new was stored: do not commit a half-checked push (dropping the
            // transaction writes nothing).
            Err(AuditError::Gap { .. } | AuditError::Malformed { .. } | AuditError::State(_)) => {}
            // Entries before the break stay stored; the flag is durable.
            Ok(()) | Err(AuditError::ChainBroken { .. }) => {
                tx.put_audit_head(device, &head)?;
                tx.commit()?;
            }
        }
        outcome.map(|()| pushed)
    }

    /// A device's chain head.
    pub fn audit_head(&self, device: &str) -> Result<ChainHead, StateError> {
        Ok(self.engine.read()?.audit_head(device)?.unwrap_or_default())
    }

    /// Devices whose chain broke, with where.
    pub fn flagged_devices(&self) -> Result<Vec<(String, u64)>, StateError> {
        Ok(self
            .engine
            .read()?
            .audit_heads()?
            .into_iter()
            .filter_map(|(d, h)| h.broken_at.map(|at| (d, at)))
            .collect())
    }

    /// Recomputes `device`'s stored chain from entry 1 (or the oldest entry retention
    /// kept): `Ok(head)` when every hash follows from its content and the one before and
    /// the last is the stored head, else `Err(first bad sequence)`.
    pub fn verify_audit_chain(&self, device: &str) -> Result<Result<u64, u64>, StateError> {
        let mut tx = self.engine.read()?;
        let head = tx.audit_head(device)?.unwrap_or_default();
        let mut prev = Hash32([0; 32]);
        let mut expect = 1u64;
        let mut bad = None;
        let mut first = true;
        tx.audit(Some(device), &mut |_, seq, bytes| {
            if bad.is_some() {
                return Ok(());
            }
            let (hash, record) = bytes
                .split_at_checked(32)
                .ok_or(StateError::Corrupt("audit"))?;
            // Months dropped by retention: the chain verifies from the oldest entry kept
            // (stored only in order from 1, so a missing start is a retention's).
            if std::mem::take(&mut first) && seq > 1 {
                prev = Hash32(hash.try_into().map_err(|_| StateError::Corrupt("audit"))?);
                expect = seq + 1;
                return Ok(());
            }
            // Where a clearance rejoined the chain, the link is to the hash the device sent.
            if let Some((_, sent)) = head.rejoined.iter().find(|(at, _)| *at == seq) {
                prev = Hash32(*sent);
            }
            let computed = chain_hash(&prev, seq, record);
            if seq != expect || computed.0 != hash {
                bad = Some(expect.min(seq));
                return Ok(());
            }
            prev = computed;
            expect += 1;
            Ok(())
        })?;
        if let Some(at) = bad {
            return Ok(Err(at));
        }
        if expect - 1 != head.seq || prev.0 != head.hash {
            return Ok(Err(expect));
        }
        Ok(Ok(head.seq))
    }

    /// One stored entry.
    pub fn audit_entry(&self, device: &str, seq: u64) -> Result<Option<StoredEntry>, StateError> {
        match self.engine.read()?.audit_entry(device, seq)? {
            Some(bytes) => stored_entry(device, seq, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Every emergency (ETREAT) access and lookup, by device then sequence, to `f`.
    pub fn for_each_emergency(
        &self,
        mut f: impl FnMut(StoredEntry) -> std::io::Result<()>,
    ) -> Result<u64, StateError> {
        let mut n = 0;
        self.engine
            .read()?
            .audit_emergency(&mut |device, seq, bytes| {
                f(stored_entry(device, seq, bytes)?)
                    .map_err(|e| StateError::Database(format!("writing audit review: {e}")))?;
                n += 1;
                Ok(())
            })?;
        Ok(n)
    }

    /// Every access naming `nhs` (read, searched, or listed in a caseload), on every
    /// device, oldest first, to `f`.
    pub fn for_each_patient_access(
        &self,
        nhs: NhsNumber,
        mut f: impl FnMut(StoredEntry) -> std::io::Result<()>,
    ) -> Result<u64, StateError> {
        let mut found = Vec::new();
        self.engine
            .read()?
            .audit_of_patient(nhs.as_u64(), &mut |device, seq, bytes| {
                found.push(stored_entry(device, seq, bytes)?);
                Ok(())
            })?;
        // Across devices, in the order the accesses happened.
        found.sort_by_key(|e| (e.record.at, e.device.clone(), e.seq));
        let count = found.len() as u64;
        for e in found {
            f(e).map_err(|e| StateError::Database(format!("writing patient audit: {e}")))?;
        }
        Ok(count)
    }

    /// Every stored entry, by device then sequence, to `f`.
    pub fn for_each_audit(
        &self,
        mut f: impl FnMut(StoredEntry) -> std::io::Result<()>,
    ) -> Result<u64, StateError> {
        let mut n = 0;
        self.engine.read()?.audit(None, &mut |device, seq, bytes| {
            f(stored_entry(device, seq, bytes)?)
                .map_err(|e| StateError::Database(format!("writing audit export: {e}")))?;
            n += 1;
            Ok(())
        })?;
        Ok(n)
    }
}

pub(crate) fn stored_entry(
    device: &str,
    seq: u64,
    bytes: &[u8],
) -> Result<StoredEntry, StateError> {
    let (hash, record) = bytes
        .split_at_checked(32)
        .ok_or(StateError::Corrupt("audit"))?;
    let hash = Hash32(hash.try_into().map_err(|_| StateError::Corrupt("audit"))?);
    let record = AuditRecord::decode(record).map_err(|_| StateError::Corrupt("audit"))?;
    Ok(StoredEntry {
        device: device.to_owned(),
        seq,
        hash,
        record,
    })
}

fn check_and_store(
    tx: &mut dyn Write,
    device: &str,
    head: &mut ChainHead,
    push: &PushAudit,
    pushed: &mut Pushed,
) -> Result<(), AuditError> {
    if let Some(at) = head.broken_at {
        return Err(AuditError::ChainBroken { at });
    }
    let first = push.entries.first().map_or(0, |e| e.seq);
    if first == 0 {
        return Err(AuditError::Malformed { at: 0 });
    }
    if first > head.seq + 1 {
        return Err(AuditError::Gap {
            expected: head.seq + 1,
        });
    }
    if head.rejoin {
        return rejoin(tx, device, head, push, pushed);
    }
    // What the entry before `first` hashes to, as the hub holds it.
    let before = if first == 1 {
        [0u8; 32]
    } else if first - 1 == head.seq {
        head.hash
    } else {
        stored_hash(tx, device, first - 1)?.ok_or(AuditError::Gap {
            expected: head.seq + 1,
        })?
    };
    if push.prev_hash.0 != before {
        return Err(AuditError::ChainBroken { at: first });
    }
    let mut prev = push.prev_hash;
    for e in push.entries.iter() {
        let computed = chain_hash(&prev, e.seq, e.record.as_slice());
        if computed != e.hash {
            return Err(AuditError::ChainBroken { at: e.seq });
        }
        if e.seq <= head.seq {
            if stored_hash(tx, device, e.seq)? != Some(e.hash.0) {
                return Err(AuditError::ChainBroken { at: e.seq });
            }
            pushed.repeated += 1;
        } else {
            store(tx, device, head, e)?;
            pushed.stored += 1;
        }
        prev = e.hash;
    }
    Ok(())
}

/// The first push after a clearance: entries the hub already holds are acknowledged as
/// held (what was stored stays as it was), and the first new one is stored as continuing
/// the chain from the predecessor hash the device sent — each entry's hash is still
/// checked against its content and the entry before it in the push.
fn rejoin(
    tx: &mut dyn Write,
    device: &str,
    head: &mut ChainHead,
    push: &PushAudit,
    pushed: &mut Pushed,
) -> Result<(), AuditError> {
    let mut prev = push.prev_hash;
    for e in push.entries.iter() {
        if chain_hash(&prev, e.seq, e.record.as_slice()) != e.hash {
            return Err(AuditError::ChainBroken { at: e.seq });
        }
        if e.seq <= head.seq {
            pushed.repeated += 1;
        } else {
            if head.rejoin {
                head.rejoin = false;
                head.rejoined.push((e.seq, prev.0));
                tracing::warn!(
                    device,
                    seq = e.seq,
                    "audit chain rejoined after a clearance"
                );
            }
            store(tx, device, head, e)?;
            pushed.stored += 1;
        }
        prev = e.hash;
    }
    Ok(())
}

/// Stores one new entry with its index rows and moves the head to it.
fn store(
    tx: &mut dyn Write,
    device: &str,
    head: &mut ChainHead,
    e: &sync_protocol::audit::AuditEntry,
) -> Result<(), AuditError> {
    let record = AuditRecord::decode(e.record.as_slice())
        .map_err(|_| AuditError::Malformed { at: e.seq })?;
    let mut patients = Vec::new();
    let mut emergency = false;
    // A lookup is emergency access to the patient looked up.
    if let sync_protocol::audit::AuditEvent::Lookup(l) = &record.event {
        patients.push(l.patient.as_u64());
        emergency = true;
    }
    if let Some(a) = record.access() {
        patients.extend(a.patient.iter().chain(a.listed.iter()).map(|n| n.as_u64()));
        emergency |= matches!(
            a.purpose,
            Some(sync_protocol::audit::Purpose::EmergencyTreat { .. })
        );
    }
    let mut row = Vec::with_capacity(32 + e.record.as_slice().len());
    row.extend_from_slice(&e.hash.0);
    row.extend_from_slice(e.record.as_slice());
    tx.put_audit(
        device,
        e.seq,
        &row,
        record.at.as_millis(),
        &patients,
        emergency,
    )?;
    head.seq = e.seq;
    head.hash = e.hash.0;
    Ok(())
}

fn stored_hash(tx: &mut dyn Write, device: &str, seq: u64) -> Result<Option<[u8; 32]>, StateError> {
    Ok(tx
        .audit_entry(device, seq)?
        .and_then(|v| v.get(..32).and_then(|h| <[u8; 32]>::try_from(h).ok())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head stored before a flag could be cleared (seq, hash, broken_at) still reads,
    /// and a head of today is not mistaken for one.
    #[test]
    fn heads_of_the_previous_form_still_read() {
        #[derive(Serialize)]
        struct V1 {
            seq: u64,
            hash: [u8; 32],
            broken_at: Option<u64>,
        }
        let old = postcard::to_allocvec(&V1 {
            seq: 12,
            hash: [3; 32],
            broken_at: Some(9),
        })
        .unwrap();
        let head = ChainHead::decode(&old).unwrap();
        assert_eq!(
            (head.seq, head.hash, head.broken_at),
            (12, [3; 32], Some(9))
        );
        assert!(!head.rejoin && head.rejoined.is_empty());
        let now = ChainHead {
            rejoin: true,
            rejoined: vec![(9, [1; 32])],
            ..head
        };
        assert_eq!(ChainHead::decode(&now.encode()).unwrap(), now);
        assert!(ChainHead::decode(&[0xff; 3]).is_err());
    }
}
