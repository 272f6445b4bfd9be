//! The audit sink (SPEC §3.6, §6 invariants 5 and 6): verifies each device's hash chain
//! and sequence continuity, stores each (device, seq) once, durably, and acknowledges
//! the highest durable sequence. A broken chain flags the device and nothing after the
//! break is accepted.

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use sync_protocol::audit::{AuditRecord, chain_hash};
use sync_protocol::message::PushAudit;
use sync_protocol::types::Hash32;

use crate::state::{HubState, StateError, dec, enc};

/// (device, seq) → hash ‖ record bytes as received.
const AUDIT: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("audit");
/// device → chain head.
const HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("audit_heads");

pub(crate) fn create_tables(tx: &WriteTransaction) -> Result<(), StateError> {
    tx.open_table(AUDIT)?;
    tx.open_table(HEADS)?;
    Ok(())
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
    /// Accept a push from `device`. Returns the highest durable sequence.
    pub fn push_audit(&self, device: &str, push: &PushAudit) -> Result<u64, AuditError> {
        let tx = self.db.begin_write().map_err(StateError::from)?;
        let result = {
            let mut audit = tx.open_table(AUDIT).map_err(StateError::from)?;
            let mut heads = tx.open_table(HEADS).map_err(StateError::from)?;
            let mut head: ChainHead = match heads.get(device).map_err(StateError::from)? {
                Some(v) => dec(v.value(), "audit_heads")?,
                None => ChainHead::default(),
            };
            let outcome = check_and_store(&mut audit, device, &mut head, push);
            if let Err(AuditError::ChainBroken { at }) = &outcome
                && head.broken_at.is_none()
            {
                head.broken_at = Some(*at);
                tracing::warn!(device, seq = at, "audit chain broken; device flagged");
            }
            heads
                .insert(device, enc(&head).as_slice())
                .map_err(StateError::from)?;
            outcome.map(|()| head.seq)
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
            let bytes = v.value();
            let (hash, record) = bytes
                .split_at_checked(32)
                .ok_or(StateError::Corrupt("audit"))?;
            let hash = Hash32(hash.try_into().map_err(|_| StateError::Corrupt("audit"))?);
            let record = AuditRecord::decode(record).map_err(|_| StateError::Corrupt("audit"))?;
            f(StoredEntry {
                device: device.to_owned(),
                seq,
                hash,
                record,
            })
            .map_err(|e| StateError::Database(format!("writing audit export: {e}")))?;
            n += 1;
        }
        Ok(n)
    }
}

fn check_and_store(
    audit: &mut redb::Table<(&str, u64), &[u8]>,
    device: &str,
    head: &mut ChainHead,
    push: &PushAudit,
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
        stored_hash(audit, device, first - 1)?.ok_or(AuditError::Gap {
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
            if stored_hash(audit, device, e.seq)? != Some(e.hash.0) {
                return Err(AuditError::ChainBroken { at: e.seq });
            }
        } else {
            AuditRecord::decode(e.record.as_slice())
                .map_err(|_| AuditError::Malformed { at: e.seq })?;
            let mut row = Vec::with_capacity(32 + e.record.as_slice().len());
            row.extend_from_slice(&e.hash.0);
            row.extend_from_slice(e.record.as_slice());
            audit
                .insert((device, e.seq), row.as_slice())
                .map_err(StateError::from)?;
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
