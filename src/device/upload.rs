//! Audit upload (DESIGN.md invariant 2; SPEC.md §3.6, §6 invariants 5 and 6, §7): the
//! entries the hub has not acknowledged are pushed in runs of consecutive sequences,
//! each run linked to the last acknowledged entry's hash. An entry leaves the device only
//! when an acknowledgement covers it, in the same transaction that records the new
//! acknowledged head. A run cut anywhere — before it is sent, half sent, stored by the
//! hub but unacknowledged — is simply sent again: the hub stores each (device, sequence)
//! once and acknowledges repeats whose hashes match, so the effect is exactly-once.

use serde::{Deserialize, Serialize};
use sync_protocol::message::{ErrorCode, PushAudit, Welcome};
use sync_protocol::types::{BoundedVec, Capabilities};
use sync_protocol::{Compression, Message, MessageKind};

use super::{Device, DeviceError, Outcome, UploadRecord, key, software};
use crate::audit::AuditHealth;
use crate::store::{Extras, Store, StoreError};
use crate::sync::{self, SyncError, path};
use crate::transport::Transport;

/// What one upload did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadReport {
    /// Pushes acknowledged.
    pub pushes: u32,
    /// Entries acknowledged and dropped from the device.
    pub entries: u64,
    /// Request bytes on the wire (hello and pushes, after compression).
    pub bytes_sent: u64,
    /// Answer bytes on the wire.
    pub bytes_received: u64,
    /// The last sequence the hub has acknowledged.
    pub acked_through: u64,
}

/// Why an upload stopped although the hub was reached. None carry patient data.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// The hub found the chain broken (an entry altered, or not linking) and flagged the
    /// device for review; it accepts nothing after the break.
    #[error("the hub refused this device's audit chain and flagged the device for review: {0}")]
    ChainRefused(String),
    /// The hub holds less than it once acknowledged (restored from an older backup?):
    /// the entries in between were dropped from the device and are only at the hub's
    /// earlier copy.
    #[error(
        "the hub holds this device's audit only through sequence {hub} but acknowledged through {acked} earlier; entries {} to {acked} are missing at the hub",
        hub + 1
    )]
    HubBehind {
        /// What the hub holds.
        hub: u64,
        /// What it acknowledged before.
        acked: u64,
    },
    /// An entry does not open (altered or damaged on disk), or is missing: the upload
    /// stops before it.
    #[error(
        "audit entry {0} is missing or cannot be opened (altered or damaged on disk); uploads stop before it — run `carecache audit verify`"
    )]
    Damaged(u64),
    /// The hub negotiated a protocol version that cannot carry this entry (staff-identity
    /// entries need version 4): uploads stop before it until the hub is upgraded.
    #[error(
        "audit entry {seq} needs protocol version {needs} but the hub speaks version {hub}: upgrade the hub; uploads stop before it and nothing is lost"
    )]
    HubTooOld {
        /// The entry.
        seq: u64,
        /// The version it needs.
        needs: u16,
        /// The version the hub chose.
        hub: u16,
    },
    /// The time allowed ran out (a revoked device's last upload) with entries unsent.
    #[error("the time allowed for the upload ran out with entries unsent")]
    OutOfTime,
    /// The hub answered a push without acknowledging anything new.
    #[error("the hub acknowledged nothing new (durable through {0})")]
    NoProgress(u64),
}

/// Where an upload resumes and how it is framed.
pub(crate) struct PushFrom {
    /// What the hub holds durably for this device.
    pub durable_through: u64,
    /// The protocol version the hub speaks.
    pub version: u16,
    /// Whether pushes may be compressed.
    pub compression: Compression,
}

impl From<&Welcome> for PushFrom {
    /// The hub's `welcome` says what it holds, the version it speaks and whether it takes
    /// compressed pushes.
    fn from(welcome: &Welcome) -> Self {
        Self {
            durable_through: welcome.audit_durable_through,
            version: welcome.version,
            compression: if welcome.capabilities.has(Capabilities::ZSTD) {
                Compression::Zstd
            } else {
                Compression::None
            },
        }
    }
}

/// Pushes every waiting entry, `chunk` at a time, acknowledging each run in the store.
pub(crate) fn push_all(
    store: &Store,
    health: &AuditHealth,
    transport: &Transport,
    chunk: usize,
    welcome: &Welcome,
    report: &mut UploadReport,
) -> Result<(), DeviceError> {
    push_until(
        store,
        health,
        transport,
        chunk,
        &welcome.into(),
        report,
        None,
    )
}

/// [`push_all`] from `from`, stopping before a push that would start after `deadline`.
pub(crate) fn push_until(
    store: &Store,
    health: &AuditHealth,
    transport: &Transport,
    chunk: usize,
    from: &PushFrom,
    report: &mut UploadReport,
    deadline: Option<std::time::Instant>,
) -> Result<(), DeviceError> {
    let hub_durable = from.durable_through;
    let version = from.version;
    let compression = from.compression;
    let acked = store.audit_acked()?;
    report.acked_through = acked.seq;
    if hub_durable < acked.seq {
        return Err(UploadError::HubBehind {
            hub: hub_durable,
            acked: acked.seq,
        }
        .into());
    }
    // What waits now is this upload's; entries written meanwhile (a crew reading on) wait
    // for the next one, so an upload ends rather than chasing the head push by push.
    let target = store.audit_head()?.seq;
    let mut acked = acked;
    loop {
        if acked.seq >= target {
            return Ok(());
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            return Err(UploadError::OutOfTime.into());
        }
        let left = usize::try_from(target - acked.seq).unwrap_or(usize::MAX);
        let scanned = store.audit_scan(acked.seq.saturating_add(1), chunk.min(left))?;
        let mut entries = Vec::with_capacity(scanned.len());
        let mut damaged = None;
        let mut too_new = None;
        let mut expect = acked.seq.saturating_add(1);
        for (seq, e) in scanned {
            match e {
                // An entry this hub's version cannot read stops the run before it.
                Ok(e) if seq == expect && version < sync_protocol::codec::VERSION => {
                    let needs = sync_protocol::audit::AuditRecord::decode(e.record.as_slice())
                        .map_or(1, |r| r.min_version());
                    if needs > version {
                        too_new = Some(UploadError::HubTooOld {
                            seq,
                            needs,
                            hub: version,
                        });
                        break;
                    }
                    entries.push(e);
                }
                // A gap (an entry missing from the store) stops the run like damage.
                Ok(e) if seq == expect => entries.push(e),
                Ok(_) => {
                    damaged = Some(expect);
                    break;
                }
                Err(_) => {
                    damaged = Some(seq);
                    break;
                }
            }
            expect = expect.saturating_add(1);
        }
        let Some(last) = entries.last().map(|e| e.seq) else {
            return match (damaged, too_new) {
                (Some(seq), _) => Err(UploadError::Damaged(seq).into()),
                (None, Some(e)) => Err(e.into()),
                (None, None) => Ok(()),
            };
        };
        let push = Message::PushAudit(
            BoundedVec::try_from(entries)
                .ok()
                .and_then(|entries| PushAudit::new(acked.hash, entries).ok())
                .ok_or(DeviceError::Sync(SyncError::OutOfOrder))?,
        );
        let answer =
            transport.exchange_with(path::AUDIT, &push, MessageKind::AuditAck, compression)?;
        report.bytes_sent += answer.sent_bytes as u64;
        report.bytes_received += answer.wire_bytes as u64;
        let durable = match answer.message {
            Message::AuditAck(a) => a.durable_through,
            Message::Error(e) => {
                return Err(match e.code {
                    ErrorCode::AuditChainBroken => {
                        UploadError::ChainRefused(e.message.as_str().to_owned()).into()
                    }
                    ErrorCode::AuditGap => UploadError::HubBehind {
                        hub: hub_durable.min(acked.seq),
                        acked: acked.seq,
                    }
                    .into(),
                    _ => SyncError::refused(&e).into(),
                });
            }
            other => {
                return Err(SyncError::Unexpected {
                    expected: MessageKind::AuditAck,
                    got: other.kind(),
                }
                .into());
            }
        };
        if durable < acked.seq {
            return Err(UploadError::HubBehind {
                hub: durable,
                acked: acked.seq,
            }
            .into());
        }
        // The hub may hold more than this run (an earlier run stored, its ack lost);
        // only what was sent and is held here can be dropped.
        let through = durable.min(last);
        if through <= acked.seq {
            return Err(UploadError::NoProgress(durable).into());
        }
        let dropped = store.acknowledge_audit(through)?;
        health.acknowledged(through, store);
        report.pushes += 1;
        report.entries += dropped;
        report.acked_through = through;
        tracing::debug!(through, dropped, "audit acknowledged");
        acked = store.audit_acked()?;
        if through < last {
            // Acknowledged part of the run: send the rest again.
            continue;
        }
        if let Some(seq) = damaged {
            return Err(UploadError::Damaged(seq).into());
        }
        if let Some(e) = too_new {
            return Err(e.into());
        }
    }
}

/// The device's audit upload: the one place entries leave the device (the daemon's
/// schedule, every sync round's start and end, and a revoked device's last push all come
/// here or to [`push_until`]).
impl Device {
    /// Uploads the audit entries the hub has not acknowledged: hello, then pushes of up
    /// to `audit.upload_chunk` entries until none wait (see [`crate::upload`]). Does
    /// nothing, without connecting, when none wait. The outcome is kept for status.
    pub fn upload_audit(&self) -> Result<UploadReport, DeviceError> {
        self.live()?;
        let _one = self.upload_lock.lock().map_err(|_| StoreError::Poisoned)?;
        if self.audit.health().backlog().entries == 0 {
            return Ok(UploadReport::default());
        }
        let mut report = UploadReport::default();
        let result = self.upload_inner(&mut report);
        let outcome = match &result {
            Ok(()) => Outcome::Ok,
            Err(DeviceError::Transport(e)) if e.is_offline() => Outcome::Offline(e.to_string()),
            Err(e @ DeviceError::Upload(_)) => Outcome::Rejected(e.to_string()),
            Err(DeviceError::Revoked) => return Err(DeviceError::Revoked),
            Err(e) => Outcome::Failed(e.to_string()),
        };
        let label = match &outcome {
            Outcome::Ok => "ok",
            Outcome::Offline(_) => "offline",
            Outcome::Rejected(_) => "refused",
            Outcome::Failed(_) => "failed",
        };
        self.metrics
            .audit_uploads
            .get_or_create(&vec![("outcome", label)])
            .inc();
        self.metrics.audit_uploaded.inc_by(report.entries);
        match &result {
            Ok(()) => tracing::info!(
                entries = report.entries,
                pushes = report.pushes,
                bytes = report.bytes_sent,
                through = report.acked_through,
                "audit uploaded"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                entries = report.entries,
                through = report.acked_through,
                "audit upload stopped"
            ),
        }
        let mut extras = Extras::default();
        extras.set(
            key::LAST_UPLOAD,
            &UploadRecord {
                at: self.now(),
                outcome,
                report: report.clone(),
            },
        )?;
        self.store.put_device_state(&extras)?;
        result.map(|()| report)
    }

    fn upload_inner(&self, report: &mut UploadReport) -> Result<(), DeviceError> {
        let (transport, device_id) = self.connect()?;
        let answer = transport.exchange(
            path::HELLO,
            &sync::hello(self.now(), &software()?),
            MessageKind::Welcome,
        )?;
        report.bytes_sent += answer.sent_bytes as u64;
        report.bytes_received += answer.wire_bytes as u64;
        let welcome = self.expect_answer(
            &transport,
            answer.message,
            MessageKind::Welcome,
            |m| match m {
                Message::Welcome(w) => Ok(w),
                m => Err(Box::new(m)),
            },
        )?;
        sync::check_welcome(
            &welcome,
            &device_id,
            self.now(),
            self.config.sync.max_clock_skew,
        )?;
        // Hub time moves trusted time; an upload is not a sync, so it does not count as
        // the contact the offline limit measures (no objections or lease changes came).
        self.observe_hub(welcome.hub_time);
        push_all(
            &self.store,
            self.audit.health(),
            &transport,
            self.config.audit.upload_chunk,
            &welcome,
            report,
        )
    }
}
