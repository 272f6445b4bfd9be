//! The audit sink (SPEC §3.6, §6 invariants 5 and 6): verifies each device's hash chain
//! and sequence continuity, stores each (device, seq) once, durably, and acknowledges
//! the highest durable sequence. A broken chain flags the device and nothing after the
//! break is accepted.

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use sync_protocol::NhsNumber;
use sync_protocol::audit::{AuditRecord, chain_hash};
use sync_protocol::message::PushAudit;
use sync_protocol::types::Hash32;

use crate::state::{HubState, StateError, dec, enc};

/// (device, seq) → hash ‖ record bytes as received.
const AUDIT: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("audit");
/// device → chain head.
const HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("audit_heads");
/// Index for complaints: (NHS number, device, seq) of every access naming the patient
/// (read, or listed in a caseload).
const BY_PATIENT: TableDefinition<(u64, &str, u64), ()> = TableDefinition::new("audit_by_patient");
/// Index for review: (device, seq) of every emergency (ETREAT) access and lookup.
const EMERGENCY: TableDefinition<(&str, u64), ()> = TableDefinition::new("audit_emergency");

pub(crate) fn create_tables(tx: &WriteTransaction) -> Result<(), StateError> {
    tx.open_table(AUDIT)?;
    tx.open_table(HEADS)?;
    tx.open_table(BY_PATIENT)?;
    tx.open_table(EMERGENCY)?;
    Ok(())
}

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
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ChainHead {
    /// Highest durable sequence (0: none yet).
    pub seq: u64,
    /// Hash of that entry.
    pub hash: [u8; 32],
    /// Sequence at which the chain broke; the device is flagged for review.
    pub broken_at: Option<u64>,
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
    /// (with their index rows) and the head moved in one durable commit.
    pub fn push_audit(&self, device: &str, push: &PushAudit) -> Result<Pushed, AuditError> {
        let tx = self.db.begin_write().map_err(StateError::from)?;
        let result = {
            let mut tables = Tables {
                audit: tx.open_table(AUDIT).map_err(StateError::from)?,
                by_patient: tx.open_table(BY_PATIENT).map_err(StateError::from)?,
                emergency: tx.open_table(EMERGENCY).map_err(StateError::from)?,
            };
            let mut heads = tx.open_table(HEADS).map_err(StateError::from)?;
            let mut head: ChainHead = match heads.get(device).map_err(StateError::from)? {
                Some(v) => dec(v.value(), "audit_heads")?,
                None => ChainHead::default(),
            };
            let mut pushed = Pushed::default();
            let outcome = check_and_store(&mut tables, device, &mut head, push, &mut pushed);
            if let Err(AuditError::ChainBroken { at }) = &outcome
                && head.broken_at.is_none()
            {
                head.broken_at = Some(*at);
                tracing::warn!(device, seq = at, "audit chain broken; device flagged");
            }
            heads
                .insert(device, enc(&head).as_slice())
                .map_err(StateError::from)?;
            pushed.durable = head.seq;
            outcome.map(|()| pushed)
        };
        match &result {
            // Nothing new was stored: do not commit a half-checked push.
            Err(AuditError::Gap { .. } | AuditError::Malformed { .. } | AuditError::State(_)) => {
                tx.abort().map_err(StateError::from)?;
            }
            // Entries before the break stay stored; the flag is durable.
            Ok(_) | Err(AuditError::ChainBroken { .. }) => {
                tx.commit().map_err(StateError::from)?;
            }
        }
        result
    }

    /// A device's chain head.
    pub fn audit_head(&self, device: &str) -> Result<ChainHead, StateError> {
        let tx = self.db.begin_read()?;
        Ok(match tx.open_table(HEADS)?.get(device)? {
            Some(v) => dec(v.value(), "audit_heads")?,
            None => ChainHead::default(),
        })
    }

    /// Devices whose chain broke, with where.
    pub fn flagged_devices(&self) -> Result<Vec<(String, u64)>, StateError> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for item in tx.open_table(HEADS)?.iter()? {
            let (k, v) = item?;
            let head: ChainHead = dec(v.value(), "audit_heads")?;
            if let Some(at) = head.broken_at {
                out.push((k.value().to_owned(), at));
            }
        }
        Ok(out)
    }

    /// Recomputes `device`'s stored chain from entry 1: `Ok(entries)` when every hash
    /// follows from its content and the one before and the last is the stored head,
    /// else `Err(first bad sequence)`.
    pub fn verify_audit_chain(&self, device: &str) -> Result<Result<u64, u64>, StateError> {
        let tx = self.db.begin_read()?;
        let head: ChainHead = match tx.open_table(HEADS)?.get(device)? {
            Some(v) => dec(v.value(), "audit_heads")?,
            None => ChainHead::default(),
        };
        let mut prev = Hash32([0; 32]);
        let mut expect = 1u64;
        for item in tx
            .open_table(AUDIT)?
            .range((device, 0u64)..=(device, u64::MAX))?
        {
            let (k, v) = item?;
            let seq = k.value().1;
            let (hash, record) = v
                .value()
                .split_at_checked(32)
                .ok_or(StateError::Corrupt("audit"))?;
            let computed = chain_hash(&prev, seq, record);
            if seq != expect || computed.0 != hash {
                return Ok(Err(expect.min(seq)));
            }
            prev = computed;
            expect += 1;
        }
        if expect - 1 != head.seq || prev.0 != head.hash {
            return Ok(Err(expect));
        }
        Ok(Ok(head.seq))
    }

    /// One stored entry.
    pub fn audit_entry(&self, device: &str, seq: u64) -> Result<Option<StoredEntry>, StateError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(AUDIT)?;
        let Some(v) = table.get((device, seq))? else {
            return Ok(None);
        };
        stored_entry(device, seq, v.value()).map(Some)
    }

    /// Every emergency (ETREAT) access and lookup, by device then sequence, to `f`.
    pub fn for_each_emergency(
        &self,
        mut f: impl FnMut(StoredEntry) -> std::io::Result<()>,
    ) -> Result<u64, StateError> {
        let tx = self.db.begin_read()?;
        let audit = tx.open_table(AUDIT)?;
        let mut n = 0;
        for item in tx.open_table(EMERGENCY)?.iter()? {
            let (k, _) = item?;
            let (device, seq) = k.value();
            let v = audit
                .get((device, seq))?
                .ok_or(StateError::Corrupt("audit_emergency"))?;
            f(stored_entry(device, seq, v.value())?)
                .map_err(|e| StateError::Database(format!("writing audit review: {e}")))?;
            n += 1;
        }
        Ok(n)
    }

    /// Every access naming `nhs` (read, searched, or listed in a caseload), on every
    /// device, oldest first, to `f`.
    pub fn for_each_patient_access(
        &self,
        nhs: NhsNumber,
        mut f: impl FnMut(StoredEntry) -> std::io::Result<()>,
    ) -> Result<u64, StateError> {
        let tx = self.db.begin_read()?;
        let audit = tx.open_table(AUDIT)?;
        let mut found = Vec::new();
        let n = nhs.as_u64();
        for item in tx
            .open_table(BY_PATIENT)?
            .range((n, "", 0u64)..(n.saturating_add(1), "", 0u64))?
        {
            let (k, _) = item?;
            let (_, device, seq) = k.value();
            let v = audit
                .get((device, seq))?
                .ok_or(StateError::Corrupt("audit_by_patient"))?;
            found.push(stored_entry(device, seq, v.value())?);
        }
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
        let tx = self.db.begin_read()?;
        let mut n = 0;
        for item in tx.open_table(AUDIT)?.iter()? {
            let (k, v) = item?;
            let (device, seq) = k.value();
            f(stored_entry(device, seq, v.value())?)
                .map_err(|e| StateError::Database(format!("writing audit export: {e}")))?;
            n += 1;
        }
        Ok(n)
    }
}

fn stored_entry(device: &str, seq: u64, bytes: &[u8]) -> Result<StoredEntry, StateError> {
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

struct Tables<'tx> {
    audit: redb::Table<'tx, (&'static str, u64), &'static [u8]>,
    by_patient: redb::Table<'tx, (u64, &'static str, u64), ()>,
    emergency: redb::Table<'tx, (&'static str, u64), ()>,
}

fn check_and_store(
    tables: &mut Tables<'_>,
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
    // What the entry before `first` hashes to, as the hub holds it.
    let before = if first == 1 {
        [0u8; 32]
    } else if first - 1 == head.seq {
        head.hash
    } else {
        stored_hash(&tables.audit, device, first - 1)?.ok_or(AuditError::Gap {
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
            if stored_hash(&tables.audit, device, e.seq)? != Some(e.hash.0) {
                return Err(AuditError::ChainBroken { at: e.seq });
            }
            pushed.repeated += 1;
        } else {
            let record = AuditRecord::decode(e.record.as_slice())
                .map_err(|_| AuditError::Malformed { at: e.seq })?;
            // A lookup is emergency access to the patient looked up.
            if let sync_protocol::audit::AuditEvent::Lookup(l) = &record.event {
                tables
                    .by_patient
                    .insert((l.patient.as_u64(), device, e.seq), ())
                    .map_err(StateError::from)?;
                tables
                    .emergency
                    .insert((device, e.seq), ())
                    .map_err(StateError::from)?;
            }
            if let Some(a) = record.access() {
                for nhs in a.patient.iter().chain(a.listed.iter()) {
                    tables
                        .by_patient
                        .insert((nhs.as_u64(), device, e.seq), ())
                        .map_err(StateError::from)?;
                }
                if matches!(
                    a.purpose,
                    Some(sync_protocol::audit::Purpose::EmergencyTreat { .. })
                ) {
                    tables
                        .emergency
                        .insert((device, e.seq), ())
                        .map_err(StateError::from)?;
                }
            }
            let mut row = Vec::with_capacity(32 + e.record.as_slice().len());
            row.extend_from_slice(&e.hash.0);
            row.extend_from_slice(e.record.as_slice());
            tables
                .audit
                .insert((device, e.seq), row.as_slice())
                .map_err(StateError::from)?;
            pushed.stored += 1;
            head.seq = e.seq;
            head.hash = e.hash.0;
        }
        prev = e.hash;
    }
    Ok(())
}

fn stored_hash(
    audit: &redb::Table<(&str, u64), &[u8]>,
    device: &str,
    seq: u64,
) -> Result<Option<[u8; 32]>, StateError> {
    Ok(audit.get((device, seq))?.and_then(|v| {
        v.value()
            .get(..32)
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
    }))
}
