//! What privacy officers do through the hub, and the hub's own log of it.
//!
//! Reading the audit trail is itself access to patients' data, and clearing a flag or a
//! restored copy changes what the fleet view says about a device: each is kept in the
//! officers' log with who, from where, when and (for a clearance) why, in the same
//! transaction as what it did. The log is append-only; nothing in the hub deletes from it.

use serde::{Deserialize, Serialize};
use sync_protocol::NhsNumber;
use sync_protocol::types::Timestamp;

use crate::audit::StoredEntry;
use crate::state::{HubState, StateError, dec, enc};
use crate::store::Write;

/// Who is acting: the name the privacy officer gave and where the request came from
/// (an address, or `cli` for a command run against a stopped hub).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Officer {
    /// The officer's name (1–128 printable characters).
    pub name: String,
    /// Where the request came from.
    pub from: String,
}

impl Officer {
    /// An officer, or why the name cannot be used.
    pub fn new(name: &str, from: &str) -> Result<Self, StateError> {
        let name = name.trim();
        if !printable(name, 1, 128) {
            return Err(StateError::Invalid(
                "officer: 1–128 printable characters naming who is acting".into(),
            ));
        }
        Ok(Self {
            name: name.to_owned(),
            from: from.to_owned(),
        })
    }
}

/// Whether `t`, trimmed, is `min..=max` characters with no control characters.
pub fn printable(t: &str, min: usize, max: usize) -> bool {
    let n = t.trim().chars().count();
    (min..=max).contains(&n) && !t.chars().any(char::is_control)
}

/// A reason for a clearance, or why it cannot be used.
pub fn reason(t: &str) -> Result<&str, StateError> {
    if printable(t, 10, 1000) {
        Ok(t.trim())
    } else {
        Err(StateError::Invalid(
            "reason: 10–1000 printable characters saying what was looked into".into(),
        ))
    }
}

/// One thing an officer did.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Read the review: flagged devices and emergency accesses (how many were shown).
    Review {
        /// Emergency accesses shown.
        emergency: u64,
    },
    /// Read one patient's access history.
    PatientHistory {
        /// The patient.
        nhs: u64,
        /// Accesses shown.
        accesses: u64,
    },
    /// Exported the audit trail (entries sent before the export ended).
    Export {
        /// Entries sent.
        entries: u64,
    },
    /// Cleared a device's audit flag: its chain may continue.
    ClearAuditFlag {
        /// The device.
        device: String,
        /// Where its chain had broken.
        broken_at: u64,
    },
    /// Cleared the restored copies a device reported.
    ClearRestored {
        /// The device.
        device: String,
        /// Restored copies cleared.
        cleared: u64,
    },
}

// Patient history names a patient: kept out of Debug output.
impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

impl Action {
    /// The action's name in the log.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Review { .. } => "review",
            Action::PatientHistory { .. } => "patient-history",
            Action::Export { .. } => "export",
            Action::ClearAuditFlag { .. } => "clear-audit-flag",
            Action::ClearRestored { .. } => "clear-restored",
        }
    }
}

/// One entry of the officers' log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logged {
    /// When (ms since the epoch, hub time).
    pub at: u64,
    /// The officer's name.
    pub officer: String,
    /// Where the request came from.
    pub from: String,
    /// What was done.
    pub action: Action,
    /// Why (clearances).
    pub reason: Option<String>,
}

impl std::fmt::Debug for Logged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logged")
            .field("at", &self.at)
            .field("action", &self.action)
            .finish_non_exhaustive()
    }
}

impl Logged {
    /// The entry as JSON for the admin API (NHS numbers as written, spaced).
    pub fn to_json(&self, seq: u64) -> serde_json::Value {
        let mut v = serde_json::json!({
            "seq": seq,
            "at": Timestamp::from_millis(self.at).map(Timestamp::rfc3339).ok(),
            "officer": self.officer,
            "from": self.from,
            "action": self.action.kind(),
        });
        let extra = match &self.action {
            Action::Review { emergency } => serde_json::json!({ "emergency": emergency }),
            Action::PatientHistory { nhs, accesses } => serde_json::json!({
                "nhs_number": NhsNumber::from_u64(*nhs).map(|n| n.to_string()).ok(),
                "accesses": accesses,
            }),
            Action::Export { entries } => serde_json::json!({ "entries": entries }),
            Action::ClearAuditFlag { device, broken_at } => {
                serde_json::json!({ "device": device, "broken_at": broken_at })
            }
            Action::ClearRestored { device, cleared } => {
                serde_json::json!({ "device": device, "cleared": cleared })
            }
        };
        if let (Some(o), serde_json::Value::Object(e)) = (v.as_object_mut(), extra) {
            o.extend(e);
            if let Some(r) = &self.reason {
                o.insert("reason".into(), r.clone().into());
            }
        }
        v
    }
}

/// The privacy officer's review: flagged devices and every emergency access.
#[derive(Debug, Default)]
pub struct Review {
    /// Devices whose audit chain broke, with where.
    pub flagged: Vec<(String, u64)>,
    /// Emergency (ETREAT) accesses and lookups, by device then sequence.
    pub emergency: Vec<StoredEntry>,
}

pub(crate) fn log(
    tx: &mut dyn Write,
    officer: &Officer,
    action: Action,
    reason: Option<&str>,
    now: Timestamp,
) -> Result<u64, StateError> {
    tracing::info!(
        officer = %officer.name,
        from = %officer.from,
        action = action.kind(),
        "privacy officer action"
    );
    let entry = Logged {
        at: now.as_millis(),
        officer: officer.name.clone(),
        from: officer.from.clone(),
        action,
        reason: reason.map(str::to_owned),
    };
    tx.log_officer(now.as_millis(), &enc(&entry))
}

impl HubState {
    /// Writes `action` to the officers' log on its own.
    pub fn log_officer(
        &self,
        officer: &Officer,
        action: Action,
        now: Timestamp,
    ) -> Result<u64, StateError> {
        let mut tx = self.engine.write()?;
        let seq = log(tx.as_mut(), officer, action, None, now)?;
        tx.commit()?;
        Ok(seq)
    }

    /// The officers' log, oldest first.
    pub fn officer_log(&self) -> Result<Vec<(u64, Logged)>, StateError> {
        let mut out = Vec::new();
        self.engine.read()?.officer_log(&mut |seq, bytes| {
            out.push((seq, dec(bytes, "officer_log")?));
            Ok(())
        })?;
        Ok(out)
    }

    /// The review, logged as read by `officer`.
    pub fn review(&self, officer: &Officer, now: Timestamp) -> Result<Review, StateError> {
        let mut review = Review {
            flagged: self.flagged_devices()?,
            ..Review::default()
        };
        self.for_each_emergency(|e| {
            review.emergency.push(e);
            Ok(())
        })?;
        let emergency = review.emergency.len() as u64;
        self.log_officer(officer, Action::Review { emergency }, now)?;
        Ok(review)
    }

    /// Every access to `nhs`'s record, oldest first, logged as read by `officer`.
    pub fn patient_history(
        &self,
        officer: &Officer,
        nhs: NhsNumber,
        now: Timestamp,
    ) -> Result<Vec<StoredEntry>, StateError> {
        let mut found = Vec::new();
        self.for_each_patient_access(nhs, |e| {
            found.push(e);
            Ok(())
        })?;
        let action = Action::PatientHistory {
            nhs: nhs.as_u64(),
            accesses: found.len() as u64,
        };
        self.log_officer(officer, action, now)?;
        Ok(found)
    }

    /// Every stored entry to `f`, by device then sequence; the export is logged with the
    /// entries sent, also when `f` fails part way (the reader went away).
    pub fn export_audit(
        &self,
        officer: &Officer,
        now: Timestamp,
        mut f: impl FnMut(StoredEntry) -> std::io::Result<()>,
    ) -> Result<u64, StateError> {
        let mut sent = 0u64;
        let outcome = self.for_each_audit(|e| {
            f(e)?;
            sent += 1;
            Ok(())
        });
        self.log_officer(officer, Action::Export { entries: sent }, now)?;
        outcome
    }

    /// Clears `device`'s audit flag after review: its chain continues from the next entry
    /// it sends (see [`crate::audit::ChainHead::rejoin`]). Logged with `reason` in the
    /// same transaction. Returns where the chain had broken; `NotFound` when the device
    /// is not flagged.
    pub fn clear_audit_flag(
        &self,
        device: &str,
        officer: &Officer,
        reason: &str,
        now: Timestamp,
    ) -> Result<u64, StateError> {
        let reason = self::reason(reason)?;
        let mut tx = self.engine.write()?;
        if tx.device(device)?.is_none() {
            return Err(StateError::NotFound("no such device".into()));
        }
        let mut head = tx.audit_head(device)?.unwrap_or_default();
        let Some(broken_at) = head.broken_at.take() else {
            return Err(StateError::NotFound(
                "a broken audit chain for this device (it is not flagged)".into(),
            ));
        };
        head.rejoin = true;
        tx.put_audit_head(device, &head)?;
        let action = Action::ClearAuditFlag {
            device: device.to_owned(),
            broken_at,
        };
        log(tx.as_mut(), officer, action, Some(reason), now)?;
        tx.commit()?;
        tracing::warn!(device, broken_at, "audit flag cleared by a privacy officer");
        Ok(broken_at)
    }
}
