//! The device: its store, clocks, identity and policy, and the operations the CLI and
//! the daemon run — enrol, one sync round, the policy tick, status, remote wipe. The sync
//! engine decides; this module does the I/O it asks for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use sync_protocol::digest::allowed_set_digest;
use sync_protocol::message::{Audience, EnrolRequest, LeaseChange, MessageKind};
use sync_protocol::types::{
    BoundedVec, Bytes, DeviceId, EnrolmentToken, Hash32, LeaseId, StaffId, Text, Timestamp,
};
use sync_protocol::{Message, NhsNumber};
use zeroize::{Zeroize, Zeroizing};

use sync_protocol::audit::{
    AuditEvent, AuditRecord, KeyEvent, LeaseEnd, SessionEnd, SessionEvent, SyncOutcome,
};

use crate::audit::AuditLog;
use crate::clients::{Client, ClientError, Clients, IssuedToken};
use crate::clock::{Clock, TrustedTime, check_hub_time};
use crate::config::Config;
use crate::crypto::RootKey;
use crate::policy::{ENDED_KEPT, EndReason, EndedLease, Policy};
use crate::store::{self, Extras, Store, StoreError};
use crate::sync::{self, Plan, Round, Start, Step, Summary, SyncError};
use crate::transport::{Identity, Transport, TransportError};
mod status;
pub mod upload;
pub mod views;

use status::lease_status;
pub use status::{
    AnchorStatus, IdentityStatus, LeaseStatus, Status, certificate_words, render_status,
};

use upload::{UploadError, UploadReport};

mod key {
    pub(super) const IDENTITY: &str = "identity";
    pub(super) const TRUSTED: &str = "trusted_time";
    pub(super) const CONTACT: &str = "last_contact";
    pub(super) const LAST_SYNC: &str = "last_sync";
    pub(super) const LAST_OK: &str = "last_success";
    pub(super) const ENDED: &str = "ended_leases";
    pub(super) const RESYNC: &str = "resync";
    pub(super) const CLIENTS: &str = "clients";
    pub(super) const LAST_UPLOAD: &str = "last_audit_upload";
    /// Patients offered in the round under way that the device lacks (`Vec<NhsNumber>`).
    pub(super) const SYNC_WANT: &str = "sync_want";
    /// How much of the caseload has arrived ([`super::Arrival`]).
    pub(super) const ARRIVAL: &str = "caseload_arrival";
    /// Leases granted for one-off lookups (`Vec<LeaseId>`).
    pub(super) const LOOKUPS: &str = "lookup_leases";
    /// Patients held when the round under way began (`u32`): a first sync cut short
    /// resumes as one from nothing.
    pub(super) const ROUND_HOLDING: &str = "round_holding";
    /// Added to the wall clock by trusted time after a correction (`i64` ms, never
    /// positive; absent: 0).
    pub(super) const WALL_OFFSET: &str = "wall_offset";
    /// A restored copy found at open, until the hub has answered a checkin carrying it
    /// ([`sync_protocol::message::RestoreReport`]).
    pub(super) const RESTORED: &str = "restored";
}

/// A device renews its certificate once this share of its life has passed (two
/// thirds: a year's certificate at eight months, leaving four to succeed).
const RENEW_AT: (u64, u64) = (2, 3);

/// Status, metrics and every API answer warn this long before the certificate ends.
pub const CERTIFICATE_WARN: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// How long a device the hub revoked spends uploading its audit backlog before it
/// destroys its keys and data.
pub const WIPE_UPLOAD_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// How much of its caseload the device holds, kept with every batch: a first sync, a
/// new lease or a round cut short leaves it incomplete until a round completes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arrival {
    /// Patients the hub said the device will hold when the round completes (0: the hub
    /// did not say).
    pub expected: u32,
    /// Whether the last round completed.
    pub complete: bool,
}

/// The caseload's arrival as status, metrics, the viewer and every API answer show it.
#[derive(Clone, Debug, Serialize)]
pub struct CaseloadProgress {
    /// Patients held now.
    pub held: u64,
    /// Patients expected when the round completes (absent: the hub did not say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<u32>,
    /// Whether the caseload is complete (the last round completed).
    pub complete: bool,
    /// Whether a sync round is running now.
    pub syncing: bool,
    /// Bytes received in the round running now.
    pub round_bytes: u64,
    /// Seconds until the round is expected to finish, at its rate so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<u64>,
}

impl CaseloadProgress {
    /// "412 of 2,000 patients synced" (or "412 patients synced, more arriving").
    pub fn words(&self) -> String {
        match self.expected {
            Some(e) => format!(
                "{} of {} patients synced",
                thousands(self.held),
                thousands(u64::from(e))
            ),
            None => format!("{} patients synced, more arriving", thousands(self.held)),
        }
    }
}

/// `12345` as `12,345`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A round under way, for progress.
#[derive(Clone, Copy, Debug)]
struct LiveRound {
    started: std::time::Instant,
    held_at_start: u64,
    bytes: u64,
}

/// What came of a one-off lookup ([`Device::lookup`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupResult {
    /// Granted: the patient is held under this lease until it ends.
    Granted {
        /// The lease.
        lease: LeaseId,
        /// When it ends.
        not_after: Timestamp,
    },
    /// The hub could not be reached.
    Offline(String),
    /// The hub says no lease of this device allows the caller emergency access.
    NotPermitted,
    /// The hub cannot give the patient (unknown, objected or not shareable).
    NotAvailable,
    /// The hub does not speak protocol version 5.
    HubTooOld,
    /// Anything else (no sync yet, the hub's answer refused, the store).
    Failed(String),
}

impl LookupResult {
    /// As the audit records it.
    pub fn audit(&self) -> sync_protocol::audit::LookupOutcome {
        use sync_protocol::audit::LookupOutcome as O;
        match self {
            Self::Granted { lease, not_after } => O::Granted {
                lease: *lease,
                not_after: *not_after,
            },
            Self::Offline(_) => O::Offline,
            Self::NotPermitted => O::NotPermitted,
            Self::NotAvailable => O::NotAvailable,
            Self::HubTooOld => O::HubTooOld,
            Self::Failed(_) => O::Failed,
        }
    }
}

/// A device operation that failed. None of these carry patient data.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Operator: `carecache enrol` has not been run for this data directory.
    #[error(
        "this device is not enrolled: run `carecache enrol` with a token from the hub's administrator"
    )]
    NotEnrolled,
    /// Operator: enrolment was already done.
    #[error(
        "this device is already enrolled as {0} (if its certificate ended, ask the hub's administrator for a renewal token and run `carecache enrol --renew`)"
    )]
    AlreadyEnrolled(String),
    /// Operator: the device certificate ended before it could be renewed.
    #[error(
        "this device's certificate ended {0}: it can no longer reach the hub. Ask the hub's administrator for a renewal token (`POST /admin/v1/devices/<id>/renewal-token`) and run `carecache enrol --renew --token …`; nothing is lost meanwhile (audit waits on the device)"
    )]
    CertificateEnded(String),
    /// Network or hub TLS.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Hub answer refused by the device's checks, or a hub protocol error.
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// Local storage.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Hub: enrolment failed.
    #[error("enrolment failed: {0}")]
    Enrol(String),
    /// Operator: the hub CA file could not be read.
    #[error("reading the hub CA {path}: {source}")]
    CaFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The hub revoked this device; its keys and data were destroyed.
    #[error("the hub revoked this device; its keys and cached data have been destroyed")]
    Revoked,
    /// Operator: a client registration change was refused.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The audit log could not record the event (the change was not made).
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// Audit upload stopped although the hub was reached.
    #[error(transparent)]
    Upload(#[from] UploadError),
    /// Operator: the store is bound to an anti-rollback anchor the configuration no
    /// longer names.
    #[error(
        "this data directory is bound to an anti-rollback anchor ({0}) but the configuration names none: restore the [anchor] section (a store bound once is not served without its anchor)"
    )]
    AnchorRequired(String),
    /// The anti-rollback anchor could not be read: no patient data is served until it
    /// can be (retried at every tick).
    #[error(
        "no patient data is served: the anti-rollback check could not be made ({0}); it is retried every minute"
    )]
    AnchorHeld(String),
}

/// The device's enrolled identity, sealed in the store.
#[derive(Serialize, Deserialize)]
struct StoredIdentity {
    device_id: String,
    cert_der: Vec<u8>,
    key_pem: String,
    ca_pem: String,
}

impl Drop for StoredIdentity {
    fn drop(&mut self) {
        self.key_pem.zeroize();
    }
}

/// How the last sync round ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Finished: the device holds what the hub allows.
    Ok,
    /// The hub could not be reached or the link broke.
    Offline(String),
    /// An answer failed the device's checks; nothing of it was applied.
    Rejected(String),
    /// Anything else (hub refusal, local storage).
    Failed(String),
}

/// The record of one sync round, kept for status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRecord {
    /// When it ended (trusted time).
    pub at: Timestamp,
    /// How.
    pub outcome: Outcome,
    /// What it did.
    pub summary: Summary,
}

/// The record of the last audit upload, kept for status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRecord {
    /// When it ended (trusted time).
    pub at: Timestamp,
    /// How.
    pub outcome: Outcome,
    /// What it did.
    pub report: UploadReport,
}

/// What a policy tick did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Leases ended and purged, with why.
    pub ended: Vec<(u64, EndReason)>,
    /// Patients purged with them.
    pub purged: usize,
}

/// An open, unlocked device.
pub struct Device {
    config: Config,
    store: Arc<Store>,
    audit: AuditLog,
    clients: RwLock<Arc<Clients>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Trusted time of the last successful sync round (ms; 0 = never), for freshness.
    last_ok: std::sync::atomic::AtomicU64,
    clock: Arc<dyn Clock>,
    trusted: Mutex<TrustedTime>,
    policy: RwLock<Arc<Policy>>,
    wiped: AtomicBool,
    /// Staff identity: the mode, the issuer's keys, staff sessions.
    identity: crate::identity::Identity,
    /// One audit upload at a time (the daemon's schedule and sync rounds both upload).
    upload_lock: Mutex<()>,
    /// One sync round or lookup at a time: both commit the cursor's neighbourhood.
    sync_lock: Mutex<()>,
    /// The caseload's arrival, as last committed.
    arrival: Mutex<Arrival>,
    /// The round under way, if any.
    live: Mutex<Option<LiveRound>>,
    /// The device certificate's validity, read at open and kept with every change of
    /// certificate: every API answer checks it, so it is never read from the store there.
    certificate: Mutex<Option<(Timestamp, Timestamp)>>,
    /// Why the anti-rollback check could not be made: nothing is served meanwhile.
    anchor_hold: Mutex<Option<String>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("data_dir", &self.config.data_dir)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Opens the data directory in `config` (made by `carecache init`) with `root`.
    pub fn open(
        config: Config,
        root: &RootKey,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, DeviceError> {
        let store = Arc::new(Store::open(&config.data_dir, root)?);
        let high: Option<Timestamp> = store.device_state(key::TRUSTED)?;
        let offset: i64 = store.device_state(key::WALL_OFFSET)?.unwrap_or(0);
        let trusted = TrustedTime::resume_with(high, offset, clock.as_ref());
        let clients: Vec<Client> = store.device_state(key::CLIENTS)?.unwrap_or_default();
        let audit = AuditLog::start(Arc::clone(&store))?;
        let last_ok: Option<Timestamp> = store.device_state(key::LAST_OK)?;
        let identity = crate::identity::Identity::open(config.identity.clone(), &store)?;
        let arrival: Arrival = store.device_state(key::ARRIVAL)?.unwrap_or(Arrival {
            expected: 0,
            // A store from before arrival was kept: complete if it ever synced.
            complete: last_ok.is_some(),
        });
        let certificate = store
            .device_state::<StoredIdentity>(key::IDENTITY)?
            .and_then(|i| certificate_validity(&i.cert_der));
        let device = Self {
            config,
            store,
            audit,
            metrics: Arc::new(crate::metrics::Metrics::new()),
            last_ok: std::sync::atomic::AtomicU64::new(last_ok.map_or(0, Timestamp::as_millis)),
            clients: RwLock::new(Arc::new(Clients::new(clients))),
            clock,
            trusted: Mutex::new(trusted),
            policy: RwLock::new(Arc::new(Policy::new(Vec::new(), Vec::new(), None))),
            wiped: AtomicBool::new(false),
            identity,
            upload_lock: Mutex::new(()),
            sync_lock: Mutex::new(()),
            arrival: Mutex::new(arrival),
            live: Mutex::new(None),
            certificate: Mutex::new(certificate),
            anchor_hold: Mutex::new(None),
        };
        device.refresh_policy()?;
        device.check_anchor()?;
        Ok(device)
    }

    /// Binds the store to the configured anti-rollback anchor and checks it is the live
    /// copy. A restored or foreign copy loses its patient data and leases here, before
    /// anything is served, and is reported to the hub; an anchor that cannot be read
    /// holds every patient route until it can (retried by [`Self::tick`]).
    fn check_anchor(&self) -> Result<(), DeviceError> {
        use crate::store::AnchorCheck;
        use sync_protocol::message::RestoreReport;
        let Some(counter) = self.config.anchor.counter() else {
            if let Some((_, what)) = self.store.anchor_binding()? {
                return Err(DeviceError::AnchorRequired(what));
            }
            return Ok(());
        };
        let kind = counter.kind();
        let now = self.now();
        let result = self.store.bind_anchor(counter, |reason| {
            let mut extras = Extras::default();
            extras.set(
                key::RESTORED,
                &Some(RestoreReport {
                    detected_at: now,
                    reason,
                }),
            )?;
            extras.set(
                key::ARRIVAL,
                &Arrival {
                    expected: 0,
                    complete: false,
                },
            )?;
            extras.set(key::RESYNC, &false)?;
            extras.set(key::SYNC_WANT, &Vec::<NhsNumber>::new())?;
            extras.set(key::LOOKUPS, &Vec::<LeaseId>::new())?;
            Ok(extras)
        });
        let check = match result {
            Ok(check) => check,
            Err(StoreError::Anchor(e)) => {
                tracing::error!(error = %e, "the anti-rollback check could not be made: no patient data is served until it can");
                *self.anchor_hold.lock().map_err(|_| StoreError::Poisoned)? = Some(e.to_string());
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        match check {
            AnchorCheck::Verified => {}
            AnchorCheck::Bound => {
                tracing::info!(
                    anchor = kind.name(),
                    "store bound to its anti-rollback anchor"
                );
                self.audit_or_log(AuditEvent::Key(KeyEvent::AnchorBound { kind }));
            }
            AnchorCheck::Restored {
                reason,
                patients,
                leases,
            } => {
                tracing::error!(
                    reason = reason.name(),
                    patients,
                    leases,
                    "this data directory is a restored or foreign copy: its patient data and leases were destroyed before anything was served; the device syncs from nothing"
                );
                self.audit_or_log(AuditEvent::Key(KeyEvent::Restored {
                    reason,
                    patients: u32::try_from(patients).unwrap_or(u32::MAX),
                    leases: u32::try_from(leases).unwrap_or(u32::MAX),
                }));
                *self.arrival.lock().map_err(|_| StoreError::Poisoned)? = Arrival {
                    expected: 0,
                    complete: false,
                };
                self.refresh_policy()?;
            }
        }
        *self.anchor_hold.lock().map_err(|_| StoreError::Poisoned)? = None;
        Ok(())
    }

    fn anchor_status(&self) -> Result<AnchorStatus, DeviceError> {
        let info = self.store.anchor_info()?;
        let held = self.anchor_held();
        let report = self.anchor_report()?;
        Ok(AnchorStatus {
            kind: report.kind.name(),
            counter: info
                .as_ref()
                .map(|i| i.what.clone())
                .or_else(|| self.config.anchor.counter().map(|c| c.describe())),
            count: info.as_ref().map(|i| i.count),
            holding: held.is_some(),
            problem: held.or_else(|| info.and_then(|i| i.unavailable)),
            restored: report
                .restored
                .map(|r| format!("{} ({})", r.detected_at.utc_seconds(), r.reason.name())),
        })
    }

    /// Why no patient data is served (the anti-rollback check could not be made), if so.
    pub fn anchor_held(&self) -> Option<String> {
        self.anchor_hold.lock().map_or_else(
            |_| Some("the anti-rollback state is unknown".to_owned()),
            |h| h.clone(),
        )
    }

    /// The anti-rollback report a checkin carries: the anchor's kind, whether it could
    /// not be read or advanced, and a restored copy not yet reported.
    pub fn anchor_report(&self) -> Result<sync_protocol::message::AnchorReport, DeviceError> {
        use sync_protocol::message::{AnchorKind, AnchorReport};
        let info = self.store.anchor_info()?;
        let kind = info
            .as_ref()
            .map(|i| i.kind)
            .or_else(|| self.config.anchor.counter().map(|c| c.kind()))
            .unwrap_or(AnchorKind::None);
        Ok(AnchorReport {
            kind,
            unavailable: self.anchor_held().is_some()
                || info.is_some_and(|i| i.unavailable.is_some()),
            restored: self
                .store
                .device_state::<Option<sync_protocol::message::RestoreReport>>(key::RESTORED)?
                .flatten(),
        })
    }

    /// The store (for the API layer and tests).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// Trusted time of the last successful sync round.
    pub fn last_success(&self) -> Option<Timestamp> {
        match self.last_ok.load(Ordering::Relaxed) {
            0 => None,
            ms => Timestamp::from_millis(ms).ok(),
        }
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// An audit record of `event`, stamped with trusted and wall time now.
    pub fn audit_record(&self, event: AuditEvent) -> AuditRecord {
        let at = self.now();
        let wall = Timestamp::from_millis(self.clock.wall_ms()).unwrap_or(at);
        AuditRecord { at, wall, event }
    }

    /// Writes `event` to the audit log and waits for it to be durable (outside the
    /// async runtime).
    pub fn audit_blocking(&self, event: AuditEvent) -> Result<u64, DeviceError> {
        Ok(self.audit.write_blocking(self.audit_record(event))?)
    }

    fn audit_or_log(&self, event: AuditEvent) {
        if let Err(e) = self.audit_blocking(event) {
            tracing::error!(error = %e, "an audit entry could not be written");
        }
    }

    /// The client registrations.
    pub fn clients(&self) -> Arc<Clients> {
        match self.clients.read() {
            Ok(c) => Arc::clone(&c),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    fn set_clients(&self, list: Vec<Client>) -> Result<(), DeviceError> {
        let mut extras = Extras::default();
        extras.set(key::CLIENTS, &list)?;
        self.store.put_device_state(&extras)?;
        let c = Arc::new(Clients::new(list));
        match self.clients.write() {
            Ok(mut slot) => *slot = c,
            Err(p) => *p.into_inner() = c,
        }
        Ok(())
    }

    /// Registers a client of the local API; the token is returned once and only its
    /// hash is kept. Audited.
    pub fn add_client(&self, name: &str) -> Result<IssuedToken, DeviceError> {
        self.live()?;
        let (list, token) = self.clients().add(name, self.now())?;
        let name = crate::clients::check_name(name)?;
        self.audit_blocking(AuditEvent::Key(KeyEvent::ClientAdded { name }))?;
        self.set_clients(list)?;
        Ok(token)
    }

    /// Revokes a client registration at once. Audited.
    pub fn revoke_client(&self, name: &str) -> Result<(), DeviceError> {
        self.live()?;
        let list = self.clients().revoke(name, self.now())?;
        let name = crate::clients::check_name(name)?;
        self.audit_blocking(AuditEvent::Key(KeyEvent::ClientRevoked { name }))?;
        self.set_clients(list)
    }

    /// Staff identity (mode, issuer keys, staff sessions).
    pub fn identity(&self) -> &crate::identity::Identity {
        &self.identity
    }

    /// Ends the staff sessions whose time is over, each audited once.
    fn end_expired_sessions(&self, now: Timestamp) -> Result<(), DeviceError> {
        for session in self.identity.end_expired(&self.store, now)? {
            self.audit_or_log(AuditEvent::Session(SessionEvent::Ended {
                session,
                reason: SessionEnd::Expired,
            }));
        }
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Trusted time now.
    pub fn now(&self) -> Timestamp {
        match self.trusted.lock() {
            Ok(mut t) => t.now(self.clock.as_ref()),
            Err(p) => p.into_inner().now(self.clock.as_ref()),
        }
    }

    /// The policy as of the last sync or tick.
    pub fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(p) => Arc::clone(&p),
            Err(p) => Arc::clone(&p.into_inner()),
        }
    }

    /// The enrolled device id.
    pub fn device_id(&self) -> Result<Option<String>, DeviceError> {
        self.live()?;
        let id: Option<StoredIdentity> = self.store.device_state(key::IDENTITY)?;
        Ok(id.map(|i| i.device_id.clone()))
    }

    fn live(&self) -> Result<(), DeviceError> {
        if self.wiped.load(Ordering::SeqCst) {
            return Err(DeviceError::Revoked);
        }
        Ok(())
    }

    fn refresh_policy(&self) -> Result<Arc<Policy>, DeviceError> {
        let leases = self.store.leases()?;
        let ended: Vec<EndedLease> = self.store.device_state(key::ENDED)?.unwrap_or_default();
        let contact: Option<Timestamp> = self.store.device_state(key::CONTACT)?;
        let lookups: Vec<LeaseId> = self.store.device_state(key::LOOKUPS)?.unwrap_or_default();
        let p = Arc::new(Policy::new(leases, ended, contact).with_lookups(lookups));
        match self.policy.write() {
            Ok(mut slot) => *slot = Arc::clone(&p),
            Err(poisoned) => *poisoned.into_inner() = Arc::clone(&p),
        }
        Ok(p)
    }

    fn observe_hub(&self, hub: Timestamp) -> Timestamp {
        match self.trusted.lock() {
            Ok(mut t) => t.observe(hub, self.clock.as_ref()),
            Err(p) => p.into_inner().observe(hub, self.clock.as_ref()),
        }
    }

    fn trusted_state(&self) -> TrustedTime {
        match self.trusted.lock() {
            Ok(t) => *t,
            Err(p) => *p.into_inner(),
        }
    }

    /// Adds trusted time's high-water mark and wall-clock offset to `extras`, so the
    /// commit that carries them keeps the clock across a restart.
    fn keep_clock(&self, extras: &mut Extras) -> Result<(), DeviceError> {
        let t = self.trusted_state();
        extras.set(key::TRUSTED, &t.high_water())?;
        extras.set(key::WALL_OFFSET, &t.wall_offset_ms())?;
        Ok(())
    }

    /// Sets trusted time to `hub` — hub time bound to this round's nonce, far from
    /// trusted time (SPEC.md §3.9) — and makes good what the wrong time did: leases that
    /// ended on the device in time that never passed are asked of the hub again (a
    /// resync that keeps what the device holds), the last contact and staff sessions
    /// are moved back with the clock. Audited.
    fn correct_clock(&self, hub: Timestamp) -> Result<(), DeviceError> {
        let from = match self.trusted.lock() {
            Ok(mut t) => t.correct_to(hub, self.clock.as_ref()),
            Err(p) => p.into_inner().correct_to(hub, self.clock.as_ref()),
        };
        let back_ms = from.as_millis().saturating_sub(hub.as_millis());
        let ended: Vec<EndedLease> = self.store.device_state(key::ENDED)?.unwrap_or_default();
        let reopened = ended
            .iter()
            .filter(|e| {
                e.ended_at > hub
                    && matches!(e.reason, EndReason::Expired | EndReason::OfflineTooLong)
            })
            .count();
        let mut extras = Extras::default();
        self.keep_clock(&mut extras)?;
        let contact: Option<Timestamp> = self.store.device_state(key::CONTACT)?;
        if let Some(c) = contact
            && c > hub
        {
            extras.set(key::CONTACT, &hub)?;
        }
        if reopened > 0 {
            // Ask for everything again; what the device still holds is offered, not sent.
            extras.set(key::RESYNC, &true)?;
        }
        self.store.put_device_state(&extras)?;
        if back_ms > 0 {
            self.identity.move_back(&self.store, back_ms)?;
        }
        self.refresh_policy()?;
        tracing::warn!(
            from = %from.utc_seconds(),
            to = %hub.utc_seconds(),
            reopened,
            "trusted time corrected from the hub's nonce-bound time"
        );
        self.metrics.clock_corrections.inc();
        self.audit_or_log(AuditEvent::ClockCorrected {
            from,
            to: hub,
            leases_reopened: u32::try_from(reopened).unwrap_or(u32::MAX),
        });
        Ok(())
    }

    /// A link failure while the certificate has ended (by trusted time) is the ended
    /// certificate, named with its fix. Only a failure: the hub's TLS, not the device's
    /// clock, decides (a clock run ahead must not lock the device out of the correction).
    fn explain_certificate(&self, e: DeviceError) -> DeviceError {
        match (&e, self.certificate_validity()) {
            (DeviceError::Transport(_), Ok(Some((_, until)))) if self.now() >= until => {
                DeviceError::CertificateEnded(until.utc_seconds())
            }
            _ => e,
        }
    }

    /// The device certificate's validity (not before, not after), once enrolled.
    pub fn certificate_validity(&self) -> Result<Option<(Timestamp, Timestamp)>, DeviceError> {
        Ok(*self.certificate.lock().map_err(|_| StoreError::Poisoned)?)
    }

    /// Stores `identity` and keeps its certificate's validity for the API's checks.
    fn keep_identity(
        &self,
        identity: &StoredIdentity,
        extras: &mut Extras,
    ) -> Result<(), DeviceError> {
        extras.set(key::IDENTITY, identity)?;
        self.store.put_device_state(extras)?;
        *self.certificate.lock().map_err(|_| StoreError::Poisoned)? =
            certificate_validity(&identity.cert_der);
        Ok(())
    }

    /// The hub's answer as the kind expected (`pick` takes it, handing back anything
    /// else): a revocation wipes, a protocol error is a refusal, another kind unexpected.
    fn expect_answer<T>(
        &self,
        transport: &Transport,
        answer: Message,
        expected: MessageKind,
        pick: impl FnOnce(Message) -> Result<T, Box<Message>>,
    ) -> Result<T, DeviceError> {
        let other = match pick(answer) {
            Ok(t) => return Ok(t),
            Err(other) => *other,
        };
        Err(match other {
            Message::Error(e) if e.code == sync_protocol::message::ErrorCode::DeviceRevoked => {
                self.revoked(transport)
            }
            Message::Error(e) => SyncError::refused(&e).into(),
            other => SyncError::Unexpected {
                expected,
                got: other.kind(),
            }
            .into(),
        })
    }

    /// Seconds until the certificate ends (negative: ended), when it ends within
    /// [`CERTIFICATE_WARN`].
    pub fn certificate_warning(&self) -> Option<i64> {
        let (_, until) = self.certificate_validity().ok().flatten()?;
        let left = (i128::from(until.as_millis()) - i128::from(self.now().as_millis())) / 1000;
        (left < i128::from(CERTIFICATE_WARN.as_secs())).then(|| i64::try_from(left).unwrap_or(0))
    }

    /// Renews the device certificate when [`RENEW_AT`] of its life has passed: a new key
    /// pair, certified by the hub over mutual TLS with the current certificate; the new
    /// one replaces the old only once a hello with it succeeds (until then, and if
    /// anything fails, the old one stays). Audited. Returns the new end, if renewed.
    pub fn renew_certificate_if_due(&self) -> Result<Option<Timestamp>, DeviceError> {
        self.live()?;
        let Some(id): Option<StoredIdentity> = self.store.device_state(key::IDENTITY)? else {
            return Err(DeviceError::NotEnrolled);
        };
        let Some((from, until)) = certificate_validity(&id.cert_der) else {
            return Err(DeviceError::Enrol(
                "the stored certificate does not parse".into(),
            ));
        };
        let life = until.as_millis().saturating_sub(from.as_millis());
        let due = from.as_millis() + life / RENEW_AT.1 * RENEW_AT.0;
        if self.now().as_millis() < due {
            return Ok(None);
        }
        let (transport, device_id) = self.connect()?;
        let key = rcgen::KeyPair::generate()
            .map_err(|e| DeviceError::Enrol(format!("making a key pair: {e}")))?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .map_err(|e| DeviceError::Enrol(format!("making the certificate request: {e}")))?;
        let ask = Message::Renew(sync_protocol::message::Renew {
            csr_der: Bytes::try_from(csr.der().to_vec())
                .map_err(|_| DeviceError::Enrol("certificate request too large".into()))?,
        });
        let answer = transport.exchange(sync::path::RENEW, &ask, MessageKind::Renewed)?;
        let renewed = self.expect_answer(
            &transport,
            answer.message,
            MessageKind::Renewed,
            |m| match m {
                Message::Renewed(r) => Ok(r),
                m => Err(Box::new(m)),
            },
        )?;
        if renewed.device_id != device_id {
            return Err(SyncError::WrongDevice.into());
        }
        let cert_der = renewed.certificate_der.as_slice().to_vec();
        let public = key.public_key_raw();
        if !cert_der.windows(public.len()).any(|w| w == public) {
            return Err(DeviceError::Enrol(
                "the renewed certificate is not for this device's new key".into(),
            ));
        }
        let Some((_, new_until)) = certificate_validity(&cert_der) else {
            return Err(DeviceError::Enrol(
                "the renewed certificate does not parse".into(),
            ));
        };
        let next = StoredIdentity {
            device_id: id.device_id.clone(),
            cert_der,
            key_pem: key.serialize_pem(),
            ca_pem: id.ca_pem.clone(),
        };
        // Confirmed by a hello with the new certificate before the old is let go.
        let probe = self.transport(
            &next.ca_pem,
            Some(&Identity {
                cert_der: next.cert_der.clone(),
                key_pem: Zeroizing::new(next.key_pem.clone()),
            }),
        )?;
        let hello = probe.exchange(
            sync::path::HELLO,
            &sync::hello(self.now(), &software()?),
            MessageKind::Welcome,
        )?;
        let welcome =
            self.expect_answer(&probe, hello.message, MessageKind::Welcome, |m| match m {
                Message::Welcome(w) => Ok(w),
                m => Err(Box::new(m)),
            })?;
        if welcome.device_id != device_id {
            return Err(SyncError::WrongDevice.into());
        }
        self.keep_identity(&next, &mut Extras::default())?;
        tracing::info!(until = %new_until.utc_seconds(), "device certificate renewed");
        self.audit_or_log(AuditEvent::Key(KeyEvent::CertificateRenewed {
            not_after: new_until,
        }));
        Ok(Some(new_until))
    }

    /// Pins the CA certificates the hub's checkin named, if they differ from the pins —
    /// during a CA rollover, old and new, then the new alone. Each must be a CA
    /// certificate, and the new set must keep one of the CAs pinned now (an overlap):
    /// a hub cannot swap every pin at once. Audited.
    fn update_pins(&self, trust: &[Vec<u8>]) -> Result<(), DeviceError> {
        let Some(mut id): Option<StoredIdentity> = self.store.device_state(key::IDENTITY)? else {
            return Ok(());
        };
        let pinned: Vec<Vec<u8>> = pem::parse_many(id.ca_pem.as_bytes())
            .map(|v| v.into_iter().map(|p| p.contents().to_vec()).collect())
            .unwrap_or_default();
        let same = trust.len() == pinned.len() && trust.iter().all(|t| pinned.contains(t));
        if same || trust.is_empty() {
            return Ok(());
        }
        if !trust.iter().any(|t| pinned.contains(t)) {
            tracing::warn!(
                "the hub named CAs to pin that share none with the pinned ones; kept the pins"
            );
            return Ok(());
        }
        let all_ca = trust
            .iter()
            .all(|der| x509_parser::parse_x509_certificate(der).is_ok_and(|(_, c)| c.is_ca()));
        if !all_ca {
            tracing::warn!("the hub named a CA to pin that is not a CA certificate; kept the pins");
            return Ok(());
        }
        let pems: Vec<pem::Pem> = trust
            .iter()
            .map(|der| pem::Pem::new("CERTIFICATE", der.clone()))
            .collect();
        id.ca_pem = pem::encode_many(&pems);
        self.keep_identity(&id, &mut Extras::default())?;
        tracing::warn!(pinned = trust.len(), "hub CA pins changed");
        self.audit_or_log(AuditEvent::Key(KeyEvent::PinnedCasChanged {
            pinned: u8::try_from(trust.len()).unwrap_or(u8::MAX),
        }));
        Ok(())
    }

    /// The health report a checkin carries (counts and times; never patient data).
    pub fn health(&self, wiping: bool) -> Result<sync_protocol::message::Health, DeviceError> {
        use sync_protocol::message::HealthError;
        let now = self.now();
        let backlog = self.audit.health().backlog();
        let last_sync: Option<SyncRecord> = self.store.device_state(key::LAST_SYNC)?;
        let last_upload: Option<UploadRecord> = self.store.device_state(key::LAST_UPLOAD)?;
        let last_error = match last_sync.map(|r| r.outcome) {
            Some(Outcome::Ok) | None => match last_upload.map(|u| u.outcome) {
                Some(Outcome::Rejected(_) | Outcome::Failed(_)) => Some(HealthError::Audit),
                _ => None,
            },
            Some(Outcome::Offline(_)) => Some(HealthError::Offline),
            Some(Outcome::Rejected(why)) if why.contains("hub time") => Some(HealthError::Clock),
            Some(Outcome::Rejected(_)) => Some(HealthError::Rejected),
            Some(Outcome::Failed(why)) if why.contains("certificate") => {
                Some(HealthError::Certificate)
            }
            Some(Outcome::Failed(why)) if why.contains("store") || why.contains("disk") => {
                Some(HealthError::Storage)
            }
            Some(Outcome::Failed(_)) => Some(HealthError::Other),
        };
        let id: Option<StoredIdentity> = self.store.device_state(key::IDENTITY)?;
        let wall = i128::from(self.clock.wall_ms());
        Ok(sync_protocol::message::Health {
            store_bytes: store::disk_bytes(&self.config.data_dir),
            patients_held: u32::try_from(self.store.stats()?.patients).unwrap_or(u32::MAX),
            audit_backlog: u32::try_from(backlog.entries).unwrap_or(u32::MAX),
            audit_oldest: backlog.oldest,
            audit_last_seq: backlog.acked.saturating_add(backlog.entries),
            certificate_not_after: id.and_then(|i| certificate_not_after(&i.cert_der)),
            clock_offset_secs: i64::try_from((i128::from(now.as_millis()) - wall) / 1000)
                .unwrap_or(0),
            last_error,
            wiping,
        })
    }

    /// The hub revoked this device: its audit backlog is uploaded first (within
    /// [`WIPE_UPLOAD_LIMIT`]; the order itself is audited and uploaded last), a last
    /// checkin tells the hub how many entries could not be, then keys and data are
    /// destroyed.
    fn revoked(&self, transport: &Transport) -> DeviceError {
        let backlog = self.audit.health().backlog().entries;
        self.audit_or_log(AuditEvent::Key(KeyEvent::WipeOrdered {
            backlog: u32::try_from(backlog).unwrap_or(u32::MAX),
        }));
        // No welcome comes to a revoked device: resume after what it last had
        // acknowledged, uncompressed, in this version (the hub acknowledges repeats).
        let from = upload::PushFrom {
            durable_through: self.store.audit_acked().map(|a| a.seq).unwrap_or(0),
            version: sync_protocol::codec::VERSION,
            compression: sync_protocol::Compression::None,
        };
        let mut report = UploadReport::default();
        let deadline = std::time::Instant::now() + WIPE_UPLOAD_LIMIT;
        let upload = upload::push_until(
            &self.store,
            self.audit.health(),
            transport,
            self.config.audit.upload_chunk,
            &from,
            &mut report,
            Some(deadline),
        );
        if let Err(e) = &upload {
            tracing::warn!(error = %e, "revoked: the audit backlog could not all be uploaded");
        }
        match nonce().and_then(|nonce| Ok((nonce, self.health(true)?))) {
            Ok((nonce, health)) => {
                let unsent = health.audit_backlog;
                let checkin = Message::Checkin(sync_protocol::message::Checkin {
                    nonce,
                    health,
                    anchor: self.anchor_report().ok(),
                });
                match transport.exchange(sync::path::CHECKIN, &checkin, MessageKind::CheckinAnswer)
                {
                    Ok(_) => tracing::warn!(unsent, "revoked: the hub was told of the wipe"),
                    Err(e) => {
                        tracing::warn!(error = %e, unsent, "revoked: the last checkin failed")
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "revoked: no health report"),
        }
        self.wipe_now();
        DeviceError::Revoked
    }

    fn ca_pem(&self) -> Result<String, DeviceError> {
        std::fs::read_to_string(&self.config.hub.ca_file).map_err(|source| DeviceError::CaFile {
            path: self.config.hub.ca_file.display().to_string(),
            source,
        })
    }

    /// Enrols with a one-time token: makes a key pair, sends a certificate request to the
    /// hub (whose certificate must chain to the CA in the configuration, which is pinned
    /// from now on), and keeps the issued certificate and key sealed in the store.
    pub fn enrol(&self, token: &str) -> Result<String, DeviceError> {
        self.live()?;
        if let Some(id) = self.device_id()? {
            return Err(DeviceError::AlreadyEnrolled(id));
        }
        self.certify(token, None)
    }

    /// Re-certifies this enrolled device with a one-time renewal token from the hub's
    /// administrator (`POST /admin/v1/devices/{id}/renewal-token`): for a device whose
    /// certificate ended before it could renew. The device keeps its id, data, pins
    /// and audit chain (what waits is uploaded at the next sync). Audited.
    pub fn re_enrol(&self, token: &str) -> Result<String, DeviceError> {
        self.live()?;
        let Some(id): Option<StoredIdentity> = self.store.device_state(key::IDENTITY)? else {
            return Err(DeviceError::NotEnrolled);
        };
        self.certify(token, Some(&id))
    }

    /// The enrolment exchange: a new key pair certified with `token`; for `renewing`,
    /// the hub must name the same device.
    fn certify(
        &self,
        token: &str,
        renewing: Option<&StoredIdentity>,
    ) -> Result<String, DeviceError> {
        let ca_pem = match renewing {
            Some(id) => id.ca_pem.clone(),
            None => self.ca_pem()?,
        };
        let token = EnrolmentToken::new(token)
            .map_err(|_| DeviceError::Enrol("the token is malformed".into()))?;
        let key = rcgen::KeyPair::generate()
            .map_err(|e| DeviceError::Enrol(format!("making a key pair: {e}")))?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .map_err(|e| DeviceError::Enrol(format!("making the certificate request: {e}")))?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        let label = Text::new(self.config.device_label.clone())
            .map_err(|_| DeviceError::Enrol("device label".into()))?;
        let request = Message::EnrolRequest(EnrolRequest {
            token,
            csr_der: Bytes::try_from(csr.der().to_vec())
                .map_err(|_| DeviceError::Enrol("certificate request too large".into()))?,
            device_label: label,
        });
        let t = self.transport(&ca_pem, None)?;
        let answer = t.exchange(sync::path::ENROL, &request, MessageKind::EnrolResponse)?;
        let response = match answer.message {
            Message::EnrolResponse(r) => r,
            Message::Error(e) => {
                return Err(DeviceError::Enrol(format!(
                    "hub refused: {:?}: {}",
                    e.code,
                    e.message.as_str()
                )));
            }
            other => {
                return Err(DeviceError::Enrol(format!("hub answered {}", other.kind())));
            }
        };
        let now = self.now();
        check_hub_time(response.hub_time, now, self.config.sync.max_clock_skew)
            .map_err(SyncError::from)?;
        let cert_der = response.certificate_der.as_slice().to_vec();
        let public = key.public_key_raw();
        if !cert_der.windows(public.len()).any(|w| w == public) {
            return Err(DeviceError::Enrol(
                "the issued certificate is not for this device's key".into(),
            ));
        }
        let device_id = response.device_id.as_str().to_owned();
        if let Some(old) = renewing
            && old.device_id != device_id
        {
            return Err(DeviceError::Enrol(format!(
                "the hub certified another device ({device_id}): the token was an enrolment token, not a renewal token for {}",
                old.device_id
            )));
        }
        let not_after = certificate_not_after(&cert_der);
        let identity = StoredIdentity {
            device_id: device_id.clone(),
            cert_der,
            key_pem: key_pem.to_string(),
            ca_pem,
        };
        self.observe_hub(response.hub_time);
        let mut extras = Extras::default();
        self.keep_clock(&mut extras)?;
        self.keep_identity(&identity, &mut extras)?;
        if renewing.is_some() {
            tracing::info!(device = %device_id, "re-certified with a renewal token");
            self.audit_or_log(AuditEvent::Key(KeyEvent::CertificateRenewed {
                not_after: not_after.unwrap_or_else(|| self.now()),
            }));
        } else {
            tracing::info!(device = %device_id, "enrolled");
            self.audit_or_log(AuditEvent::Key(KeyEvent::Enrolled));
        }
        Ok(device_id)
    }

    fn transport(&self, ca_pem: &str, id: Option<&Identity>) -> Result<Transport, DeviceError> {
        Ok(Transport::new(
            &self.config.hub.url,
            ca_pem,
            id,
            self.config.hub.connect_timeout,
            self.config.hub.read_timeout,
        )?)
    }

    /// A transport with the enrolled identity, and the device id it proves.
    fn connect(&self) -> Result<(Transport, DeviceId), DeviceError> {
        let Some(id): Option<StoredIdentity> = self.store.device_state(key::IDENTITY)? else {
            return Err(DeviceError::NotEnrolled);
        };
        let device_id = DeviceId::new(id.device_id.clone())
            .map_err(|_| DeviceError::Enrol("stored device id".into()))?;
        let identity = Identity {
            cert_der: id.cert_der.clone(),
            key_pem: Zeroizing::new(id.key_pem.clone()),
        };
        Ok((self.transport(&id.ca_pem, Some(&identity))?, device_id))
    }

    /// Whether the hub answers a TCP connection now (no TLS, no key material touched).
    pub fn probe(&self) -> bool {
        crate::transport::probe(&self.config.hub.url, self.config.hub.connect_timeout)
    }

    /// One sync round: hello, then pull until the hub has nothing more. Each batch is
    /// checked whole and committed with its cursor; `progress` sees the counts after each.
    /// The outcome is recorded for status whatever happens.
    pub fn sync_once(
        &self,
        progress: &mut dyn FnMut(&Summary, &CaseloadProgress),
    ) -> Result<Summary, DeviceError> {
        self.live()?;
        let _one = self.sync_lock.lock().map_err(|_| StoreError::Poisoned)?;
        let mut summary = Summary::default();
        // Audit first: a device back from being offline uploads what it wrote before it
        // starts what may be a long data download. Only a network failure or revocation
        // stops the round; other upload failures are in status and retried.
        let result = match self.upload_audit() {
            Err(DeviceError::Transport(e)) if e.is_offline() => Err(DeviceError::Transport(e)),
            Err(DeviceError::Revoked) => return Err(DeviceError::Revoked),
            _ => self.round(&mut summary, progress),
        }
        .map_err(|e| self.explain_certificate(e));
        let outcome = match &result {
            Ok(_) => Outcome::Ok,
            Err(DeviceError::Transport(e)) if e.is_offline() => Outcome::Offline(e.to_string()),
            Err(DeviceError::Transport(
                e @ (TransportError::Decode(_)
                | TransportError::TooLarge { .. }
                | TransportError::NotAFrame { .. }),
            )) => Outcome::Rejected(e.to_string()),
            Err(DeviceError::Sync(e)) if e.is_rejection() => Outcome::Rejected(e.to_string()),
            Err(DeviceError::Store(StoreError::Refused(why))) => {
                Outcome::Rejected(format!("batch rejected by the store: {why}"))
            }
            Err(DeviceError::Revoked) => return result,
            Err(e) => Outcome::Failed(e.to_string()),
        };
        if let Err(e) = &result {
            tracing::warn!(error = %e, "sync round failed");
        }
        let (sync_outcome, label) = match outcome {
            Outcome::Ok => (SyncOutcome::Ok, "ok"),
            Outcome::Offline(_) => (SyncOutcome::Offline, "offline"),
            Outcome::Rejected(_) => (SyncOutcome::Rejected, "rejected"),
            Outcome::Failed(_) => (SyncOutcome::Failed, "failed"),
        };
        self.metrics
            .syncs
            .get_or_create(&vec![("outcome", label)])
            .inc();
        self.audit_or_log(AuditEvent::Sync {
            outcome: sync_outcome,
            batches: summary.batches,
            upserts: u32::try_from(summary.upserts).unwrap_or(u32::MAX),
            removals: u32::try_from(summary.removals).unwrap_or(u32::MAX),
            lease_changes: u32::try_from(summary.lease_changes).unwrap_or(u32::MAX),
            resync: summary.resynced,
        });
        let now = self.now();
        let mut extras = Extras::default();
        let record = SyncRecord {
            at: now,
            outcome,
            summary: summary.clone(),
        };
        extras.set(key::LAST_SYNC, &record)?;
        if result.is_ok() {
            extras.set(key::LAST_OK, &now)?;
        }
        let ok = result.is_ok();
        self.keep_clock(&mut extras)?;
        // Recording the outcome and ticking must not hide why the round failed.
        let after = self
            .store
            .put_device_state(&extras)
            .map_err(DeviceError::from)
            .and_then(|()| self.tick().map(drop));
        if ok && after.is_ok() {
            self.last_ok.store(now.as_millis(), Ordering::Relaxed);
            // The identity provider's keys are refreshed while there is signal, so that
            // tokens signed with a new key verify later offline.
            if let Err(e) = self.identity.refresh_keys(&self.store) {
                tracing::warn!(error = %e, "identity provider keys not refreshed");
            }
            // The round's own entries (and any accesses meanwhile) go up at once.
            if let Err(DeviceError::Revoked) = self.upload_audit() {
                return Err(DeviceError::Revoked);
            }
            // Well before the certificate ends, a new one over the old (retried at every
            // sync until it succeeds).
            match self.renew_certificate_if_due() {
                Ok(_) => {}
                Err(DeviceError::Revoked) => return Err(DeviceError::Revoked),
                Err(e) => {
                    tracing::warn!(error = %e, "certificate renewal failed; retried at the next sync")
                }
            }
        }
        match (result, after) {
            (Ok(s), Ok(())) => Ok(s),
            (Ok(_), Err(e)) => Err(e),
            (Err(e), Ok(())) => Err(e),
            (Err(e), Err(later)) => {
                tracing::error!(error = %later, "recording the failed round also failed");
                Err(e)
            }
        }
    }

    /// The audit backlog, and whether it is past `audit.warn_backlog_age_secs`.
    pub fn audit_backlog(&self) -> (crate::audit::Backlog, Option<u64>, bool) {
        let b = self.audit.health().backlog();
        let age = b
            .oldest
            .map(|t| self.now().as_millis().saturating_sub(t.as_millis()) / 1000);
        let overdue = age.is_some_and(|a| a >= self.config.audit.warn_backlog_age.as_secs());
        (b, age, overdue)
    }

    fn round(
        &self,
        summary: &mut Summary,
        progress: &mut dyn FnMut(&Summary, &CaseloadProgress),
    ) -> Result<Summary, DeviceError> {
        let (transport, device_id) = self.connect()?;
        let held = self.store.stats()?.patients;
        let live = LiveRound {
            started: std::time::Instant::now(),
            held_at_start: held,
            bytes: 0,
        };
        *self.live.lock().map_err(|_| StoreError::Poisoned)? = Some(live);
        let result = self.round_inner(transport, device_id, held, true, summary, progress);
        *self.live.lock().map_err(|_| StoreError::Poisoned)? = None;
        result
    }

    fn round_inner(
        &self,
        transport: Transport,
        device_id: DeviceId,
        held: u64,
        may_correct_clock: bool,
        summary: &mut Summary,
        progress: &mut dyn FnMut(&Summary, &CaseloadProgress),
    ) -> Result<Summary, DeviceError> {
        let resync: bool = self.store.device_state(key::RESYNC)?.unwrap_or(false);
        let want: Vec<NhsNumber> = if resync {
            Vec::new()
        } else {
            self.store.device_state(key::SYNC_WANT)?.unwrap_or_default()
        };
        let cursor = if resync { None } else { self.store.cursor()? };
        // What the device held when this round began: now, for a new round; as recorded,
        // for a round cut short.
        let fresh_round = cursor.is_none() || !self.arriving();
        let holding: u32 = match self.store.device_state::<u32>(key::ROUND_HOLDING)? {
            Some(h) if !fresh_round => h,
            _ => u32::try_from(held).unwrap_or(u32::MAX),
        };
        let round_device = device_id.clone();
        let start = Start {
            device_id,
            cursor,
            last_batch_time: self.store.hub_time()?,
            resync,
            // The cached policy is refreshed whenever the leases change.
            leases: self.policy().leases().to_vec(),
            max_bytes: self.config.hub.max_batch_bytes,
            max_skew: self.config.sync.max_clock_skew,
            sensitive: self.config.sensitive.clone(),
            software: software()?,
            holding,
            want,
            nonce: nonce()?,
            health: self.health(false)?,
            anchor: Some(self.anchor_report()?),
            may_correct_clock,
            discounted_wall: (self.trusted_state().wall_offset_ms() < 0)
                .then(|| Timestamp::from_millis(self.clock.wall_ms()).ok())
                .flatten(),
        };
        let mut reported_restore = start.anchor.as_ref().and_then(|a| a.restored.clone());
        let (mut round, mut step) = Round::begin(start, self.now());
        let mut contact_saved = false;
        // A pull sent while the previous batch was applied, and what came of it.
        let mut fetched: Option<(Message, Result<crate::transport::Fetched, TransportError>)> =
            None;
        loop {
            step = match step {
                Step::Send(path, msg) => {
                    let expect = match &msg {
                        Message::Hello(_) => MessageKind::Welcome,
                        Message::Checkin(_) => MessageKind::CheckinAnswer,
                        _ => MessageKind::Batch,
                    };
                    // The pull sent ahead is this one: its answer (or its failure, as
                    // if it had been sent now) is the answer.
                    let answer = match fetched.take() {
                        Some((sent, frame)) if sent == msg => transport.decode(frame?)?,
                        _ => transport.exchange(path, &msg, expect)?,
                    };
                    let next = round.on_answer(answer.message, answer.wire_bytes, self.now());
                    *summary = round.summary().clone();
                    if next.is_err() {
                        // A batch refused for its contents: its objections apply anyway.
                        let objections = round.take_objections();
                        if objections
                            .iter()
                            .any(|o| o.status == sync_protocol::message::ObjectionStatus::Objected)
                        {
                            let purged = self.store.apply_objections(&objections)?;
                            tracing::warn!(
                                purged,
                                "batch refused; the objections it carried were applied"
                            );
                        }
                    }
                    if let Ok(mut live) = self.live.lock()
                        && let Some(l) = live.as_mut()
                    {
                        l.bytes = summary.bytes;
                    }
                    let next = next?;
                    if let Some(trust) = round.take_trust() {
                        self.update_pins(&trust)?;
                    }
                    if let Some(h) = round.hub_time() {
                        let now = self.observe_hub(h);
                        if !contact_saved {
                            // An authenticated answer with a sane time: the hub was reached.
                            let mut extras = Extras::default();
                            extras.set(key::CONTACT, &now)?;
                            self.keep_clock(&mut extras)?;
                            self.store.put_device_state(&extras)?;
                            // The offline limit now counts from this contact.
                            self.refresh_policy()?;
                            contact_saved = true;
                        }
                    }
                    if round.anchor_reported() && reported_restore.is_some() {
                        // The hub has the report of the restored copy: it is the hub's now.
                        let mut extras = Extras::default();
                        extras.set(
                            key::RESTORED,
                            &None::<sync_protocol::message::RestoreReport>,
                        )?;
                        self.store.put_device_state(&extras)?;
                        reported_restore = None;
                    }
                    next
                }
                Step::Apply(plan) => {
                    // The next pull, when applying cannot change it, travels (and the hub
                    // builds its batch) while this batch is sealed and committed; a pull
                    // changes nothing at the hub, so an answer not used is simply dropped.
                    let ahead = round.pull_ahead(&plan);
                    let (applied, early) = std::thread::scope(|scope| {
                        let early = ahead.clone().map(|pull| {
                            let transport = &transport;
                            scope.spawn(move || {
                                let frame = transport.fetch(
                                    sync::path::PULL,
                                    &pull,
                                    MessageKind::Batch,
                                    sync_protocol::codec::Compression::None,
                                );
                                (pull, frame)
                            })
                        });
                        let applied =
                            self.apply(&plan, round.resyncing(), round.expected(), holding);
                        (applied, early.map(std::thread::ScopedJoinHandle::join))
                    });
                    if let Some(Ok(sent)) = early {
                        fetched = Some(sent);
                    }
                    let (held, want) = applied?;
                    let next = round.applied(&plan, held, want)?;
                    *summary = round.summary().clone();
                    progress(summary, &self.caseload()?);
                    next
                }
                Step::Finished(s) => return Ok(s),
                Step::Wipe => return Err(self.revoked(&transport)),
                Step::CorrectClock(hub) => {
                    self.correct_clock(hub)?;
                    // Begin again with the corrected clock (and a resync, if leases
                    // ended in the skipped time).
                    return self.round_inner(
                        transport,
                        round_device,
                        held,
                        false,
                        summary,
                        progress,
                    );
                }
            }
        }
    }

    /// Applies a checked batch with its cursor, ended-lease records and clock state in one
    /// transaction; returns the held digest if the plan asks for it.
    /// Also returns the patients still wanted: the plan's, and those offered in the
    /// batch whose record the store lacks or holds in another version — stored with the
    /// cursor so that a round cut short resumes asking for them.
    fn apply(
        &self,
        plan: &Plan,
        resyncing: bool,
        expected: u32,
        holding: u32,
    ) -> Result<
        (
            Option<sync_protocol::message::AllowedSetDigest>,
            Vec<NhsNumber>,
        ),
        DeviceError,
    > {
        let mut extras = Extras::default();
        // Kept with the cursor: a round cut short resumes as the round it was.
        extras.set(key::ROUND_HOLDING, &holding)?;
        let mut want = plan.want.clone();
        if !plan.batch.offers.is_empty() {
            let held = self
                .store
                .held_versions_of(plan.batch.offers.iter().map(|o| o.nhs_number))?;
            want.extend(
                plan.batch
                    .offers
                    .iter()
                    .zip(held)
                    .filter(|(o, (_, v))| *v != Some(o.version))
                    .map(|(o, _)| o.nhs_number),
            );
        }
        extras.set(key::SYNC_WANT, &want)?;
        let arrival = Arrival {
            expected,
            complete: plan.digest,
        };
        extras.set(key::ARRIVAL, &arrival)?;
        extras.keep_only.clone_from(&plan.keep_only);
        let finishing_resync = plan.keep_only.is_some();
        if resyncing {
            extras.set(key::RESYNC, &!finishing_resync)?;
        }
        let now = self.now();
        let held_leases = self.policy();
        let revoked: Vec<EndedLease> = plan
            .batch
            .leases
            .iter()
            .filter_map(|c| match c {
                LeaseChange::Revoked { id, reason } => held_leases
                    .leases()
                    .iter()
                    .find(|l| l.id == *id)
                    .map(|l| EndedLease {
                        id: *id,
                        audience: l.audience.clone(),
                        ended_at: now,
                        reason: EndReason::EndedByHub(*reason),
                    }),
                _ => None,
            })
            .collect();
        if !revoked.is_empty() {
            extras.set(key::ENDED, &self.ended_with(revoked)?)?;
        }
        self.keep_clock(&mut extras)?;
        let report = self.store.apply_batch_with(&plan.batch, &extras)?;
        tracing::info!(
            upserted = report.upserted,
            purged = report.purged,
            leases_written = report.leases_written,
            leases_ended = report.leases_ended,
            bytes = plan.wire_bytes,
            "batch applied"
        );
        // Objections are looked up in the store at each decision; only leases are cached.
        if !plan.batch.leases.is_empty() {
            self.refresh_policy()?;
        }
        if let Ok(mut a) = self.arrival.lock() {
            *a = arrival;
        }
        if !plan.digest {
            return Ok((None, want));
        }
        Ok((Some(allowed_set_digest(self.store.held_versions()?)), want))
    }

    /// How much of the caseload has arrived (cheap: one count when incomplete).
    pub fn caseload(&self) -> Result<CaseloadProgress, DeviceError> {
        self.caseload_holding(self.store.stats()?.patients)
    }

    /// [`Self::caseload`] with the patients held already counted.
    fn caseload_holding(&self, held: u64) -> Result<CaseloadProgress, DeviceError> {
        let arrival = *self.arrival.lock().map_err(|_| StoreError::Poisoned)?;
        let live = *self.live.lock().map_err(|_| StoreError::Poisoned)?;
        let expected = (arrival.expected > 0).then_some(arrival.expected);
        let eta_secs = match (live, expected) {
            (Some(l), Some(e)) if held > l.held_at_start && u64::from(e) > held => {
                // The time so far, scaled by what is left over what has come.
                let elapsed_ms = l.started.elapsed().as_millis();
                let left = u128::from(u64::from(e) - held);
                let done = u128::from(held - l.held_at_start);
                u64::try_from((elapsed_ms * left).div_ceil(done * 1000)).ok()
            }
            _ => None,
        };
        Ok(CaseloadProgress {
            held,
            expected,
            complete: arrival.complete,
            syncing: live.is_some(),
            round_bytes: live.map_or(0, |l| l.bytes),
            eta_secs,
        })
    }

    /// A one-off lookup (SPEC.md §3.8): asks the hub, online, for one patient on no
    /// caseload of this device, under `under` (a lease of the caller allowing emergency
    /// access). The hub checks objections and sharing and grants a short lease for the
    /// patient alone to this device and `staff`; the grant and the record are checked as
    /// a batch would be and applied in one transaction. Offline it fails at once. The
    /// caller audits the outcome.
    pub fn lookup(
        &self,
        nhs: NhsNumber,
        under: LeaseId,
        staff: &StaffId,
        reason: &str,
    ) -> Result<LookupResult, DeviceError> {
        use sync_protocol::message::{Lookup, LookupGranted};
        self.live()?;
        let _one = self.sync_lock.lock().map_err(|_| StoreError::Poisoned)?;
        if self.store.objected(&nhs)? {
            return Ok(LookupResult::NotAvailable);
        }
        let Some(cursor) = self.store.cursor()? else {
            return Ok(LookupResult::Failed(
                "this device has not synced yet".into(),
            ));
        };
        let reason = Text::<1024>::new(reason.chars().take(1024).collect::<String>())
            .map_err(|_| DeviceError::Enrol("lookup reason".into()))?;
        let offline = |e: &TransportError| LookupResult::Offline(e.to_string());
        let (transport, device_id) = self.connect()?;
        let welcome = match transport.exchange(
            sync::path::HELLO,
            &sync::hello(self.now(), &software()?),
            MessageKind::Welcome,
        ) {
            Ok(a) => a.message,
            Err(e) if e.is_offline() => return Ok(offline(&e)),
            Err(e) => return Ok(LookupResult::Failed(e.to_string())),
        };
        let welcome = match welcome {
            Message::Welcome(w) => w,
            other => {
                return Ok(LookupResult::Failed(format!(
                    "hub answered {} to hello",
                    other.kind()
                )));
            }
        };
        if let Err(e) = sync::check_welcome(
            &welcome,
            &device_id,
            self.now(),
            self.config.sync.max_clock_skew,
        ) {
            return Ok(LookupResult::Failed(e.to_string()));
        }
        if welcome.version < 5 {
            return Ok(LookupResult::HubTooOld);
        }
        self.observe_hub(welcome.hub_time);
        let ask = Message::Lookup(Lookup {
            nhs_number: nhs,
            lease: under,
            staff: staff.clone(),
            reason,
        });
        let granted: LookupGranted =
            match transport.exchange("/ccsp/v1/lookup", &ask, MessageKind::LookupGranted) {
                Ok(a) => match a.message {
                    Message::LookupGranted(g) => *g,
                    Message::Error(e) => {
                        return Ok(match e.code {
                            sync_protocol::message::ErrorCode::NotAvailable => {
                                LookupResult::NotAvailable
                            }
                            sync_protocol::message::ErrorCode::NotPermitted => {
                                LookupResult::NotPermitted
                            }
                            sync_protocol::message::ErrorCode::DeviceRevoked => {
                                drop(_one);
                                return Err(self.revoked(&transport));
                            }
                            _ => LookupResult::Failed(SyncError::refused(&e).to_string()),
                        });
                    }
                    other => {
                        return Ok(LookupResult::Failed(format!(
                            "hub answered {} to a lookup",
                            other.kind()
                        )));
                    }
                },
                Err(e) if e.is_offline() => return Ok(offline(&e)),
                Err(e) => return Ok(LookupResult::Failed(e.to_string())),
            };
        // Checked as a batch would be: the patient asked for, for this member of staff,
        // nothing on the sensitive list, nothing already held under that lease id.
        let lease = granted.lease;
        let for_staff = match &lease.audience {
            Audience::Users(u) => u.iter().any(|s| s == staff),
            Audience::Team => false,
        };
        if granted.record.nhs_number != nhs
            || !for_staff
            || self.policy().leases().iter().any(|l| l.id == lease.id)
        {
            return Ok(LookupResult::Failed(
                "the hub's grant does not match the lookup; refused".into(),
            ));
        }
        if self.config.sensitive.listed_items(&granted.record) > 0 {
            return Ok(LookupResult::Failed(SyncError::Sensitive(1).to_string()));
        }
        let not_after = lease.not_after;
        let id = lease.id;
        let batch = sync_protocol::message::Batch::new(
            BoundedVec::new(),
            BoundedVec::try_from(vec![LeaseChange::Granted(lease)])
                .map_err(|_| DeviceError::Enrol("lookup lease".into()))?,
            BoundedVec::try_from(vec![granted.record])
                .map_err(|_| DeviceError::Enrol("lookup record".into()))?,
            BoundedVec::new(),
            cursor,
            true,
            welcome.hub_time,
            sync_protocol::message::AllowedSetDigest {
                patients: 0,
                sha256: Hash32([0; 32]),
            },
        )
        .map_err(|_| DeviceError::Enrol("lookup batch".into()))?;
        let held = self.policy();
        let mut lookups: Vec<LeaseId> = self.store.device_state(key::LOOKUPS)?.unwrap_or_default();
        lookups.retain(|l| held.leases().iter().any(|h| h.id == *l));
        lookups.push(id);
        let mut extras = Extras::default();
        extras.set(key::LOOKUPS, &lookups)?;
        self.keep_clock(&mut extras)?;
        self.store.apply_batch_with(&batch, &extras)?;
        self.refresh_policy()?;
        tracing::warn!(
            lease = id.0,
            "one-off lookup granted by the hub (emergency access)"
        );
        Ok(LookupResult::Granted {
            lease: id,
            not_after,
        })
    }

    /// Whether the caseload is incomplete (a first sync or a new lease still arriving,
    /// or a round cut short): every API answer says so.
    pub fn arriving(&self) -> bool {
        self.arrival.lock().map(|a| !a.complete).unwrap_or(true)
    }

    /// The policy tick: ends leases that are over in trusted time (expired, or out of
    /// contact for longer than they allow), purging their patients, and persists the
    /// trusted-time high-water mark. Needs no network.
    pub fn tick(&self) -> Result<TickReport, DeviceError> {
        self.live()?;
        // An anchor that could not be read is tried again, between rounds (a restored
        // copy found now is reset under the round lock).
        if self.anchor_held().is_some()
            && let Ok(_round) = self.sync_lock.try_lock()
        {
            self.check_anchor()?;
        }
        let now = self.now();
        let policy = self.policy();
        let mut report = TickReport::default();
        self.end_expired_sessions(now)?;
        let due = policy.due_for_purge(now);
        if due.is_empty() {
            let mut extras = Extras::default();
            self.keep_clock(&mut extras)?;
            self.store.put_device_state(&extras)?;
            return Ok(report);
        }
        for (id, reason) in due {
            let Some(lease) = policy.leases().iter().find(|l| l.id == id) else {
                continue;
            };
            let ended = self.ended_with([EndedLease {
                id,
                audience: lease.audience.clone(),
                ended_at: now,
                reason,
            }])?;
            let mut extras = Extras::default();
            extras.set(key::ENDED, &ended)?;
            self.keep_clock(&mut extras)?;
            let purged = self.store.purge_lease_with(id, &extras)?;
            tracing::info!(
                lease = id.0,
                reason = reason.describe(),
                purged,
                "lease ended on the device"
            );
            self.audit_or_log(AuditEvent::LeaseEnded {
                lease: id,
                reason: match reason {
                    EndReason::Expired => LeaseEnd::Expired,
                    EndReason::OfflineTooLong => LeaseEnd::OfflineTooLong,
                    EndReason::EndedByHub(r) => LeaseEnd::Hub(r),
                },
                purged: u32::try_from(purged).unwrap_or(u32::MAX),
            });
            self.metrics
                .lease_expiries
                .get_or_create(&vec![("reason", reason.code())])
                .inc();
            report.ended.push((id.0, reason));
            report.purged += purged;
        }
        self.refresh_policy()?;
        Ok(report)
    }

    /// The ended-lease records with `new` added, the oldest dropped past [`ENDED_KEPT`].
    fn ended_with(
        &self,
        new: impl IntoIterator<Item = EndedLease>,
    ) -> Result<Vec<EndedLease>, DeviceError> {
        let mut ended: Vec<EndedLease> = self.store.device_state(key::ENDED)?.unwrap_or_default();
        ended.extend(new);
        let excess = ended.len().saturating_sub(ENDED_KEPT);
        ended.drain(..excess);
        Ok(ended)
    }

    /// Remote wipe: the keyring is shredded first (after which nothing in the directory
    /// opens), then the files; this process forgets its keys and refuses all further work.
    fn wipe_now(&self) {
        self.wiped.store(true, Ordering::SeqCst);
        // One count on first: a copy taken before the wipe no longer matches the anchor.
        if let Err(e) = self.store.count_anchor() {
            tracing::warn!(error = %e, "the anti-rollback anchor was not advanced before the wipe");
        }
        self.store.forget_keys_all();
        match store::wipe(&self.config.data_dir) {
            Ok(()) => tracing::warn!("device revoked by the hub: keys and data destroyed"),
            Err(e) => {
                tracing::error!(error = %e, "device revoked but the wipe failed; run `carecache wipe`")
            }
        }
    }

    /// Whether the hub revoked this device and it wiped itself.
    pub fn is_wiped(&self) -> bool {
        self.wiped.load(Ordering::SeqCst)
    }

    /// Status for `carecache status` and the local API.
    pub fn status(&self) -> Result<Status, DeviceError> {
        self.live()?;
        let now = self.now();
        let wall = self.clock.wall_ms();
        let policy = self.policy();
        let stats = self.store.stats()?;
        let last_sync: Option<SyncRecord> = self.store.device_state(key::LAST_SYNC)?;
        let contact: Option<Timestamp> = self.store.device_state(key::CONTACT)?;
        let last_ok: Option<Timestamp> = self.store.device_state(key::LAST_OK)?;
        let ended: Vec<EndedLease> = self.store.device_state(key::ENDED)?.unwrap_or_default();
        let (backlog, backlog_age, overdue) = self.audit_backlog();
        let last_error = last_sync.as_ref().and_then(|r| match &r.outcome {
            Outcome::Ok => None,
            Outcome::Offline(e) | Outcome::Rejected(e) | Outcome::Failed(e) => Some(e.clone()),
        });
        let leases = policy
            .leases()
            .iter()
            .map(|l| lease_status(&policy, l, now))
            .collect();
        Ok(Status {
            device_id: self.device_id()?,
            hub: self.config.hub.url.clone(),
            trusted_time: now.utc_seconds(),
            wall_clock: Timestamp::from_millis(wall)
                .map_or_else(|_| String::from("invalid"), Timestamp::utc_seconds),
            wall_clock_behind_secs: now.as_millis().saturating_sub(wall) / 1000,
            last_contact: contact.map(Timestamp::utc_seconds),
            last_success: last_ok.map(Timestamp::utc_seconds),
            last_sync,
            last_error,
            leases,
            ended_leases: ended,
            patients_held: stats.patients,
            objections: stats.objections,
            audit_backlog: stats.audit_entries,
            audit_backlog_oldest: backlog.oldest.map(Timestamp::utc_seconds),
            audit_backlog_age_secs: backlog_age,
            audit_backlog_overdue: overdue,
            audit_acked: backlog.acked,
            audit_upload: self.store.device_state(key::LAST_UPLOAD)?,
            audit_head: self.audit.health().head_seq.load(Ordering::Relaxed),
            audit_error: self.audit.health().failing(),
            caseload: self.caseload_holding(stats.patients)?,
            certificate_not_after: self
                .certificate_validity()?
                .map(|(_, until)| until.utc_seconds()),
            certificate_warning: self.certificate_warning().map(certificate_words),
            anchor: self.anchor_status()?,
            identity: match self.identity.oidc() {
                None => IdentityStatus {
                    mode: "asserted",
                    issuer: None,
                    issuer_keys_held: None,
                    staff_sessions: None,
                },
                Some(c) => IdentityStatus {
                    mode: "oidc",
                    issuer: Some(c.issuer.clone()),
                    issuer_keys_held: Some(self.identity.has_keys()),
                    staff_sessions: Some(self.identity.session_count()),
                },
            },
        })
    }
}

/// Writes `event` durably to the audit log of a store a command opened itself (the
/// daemon stopped), stamped with trusted time resumed from the store, and keeps the
/// trusted-time high-water mark: key rotation and the like are audited as reads are.
pub fn audit_offline(store: &Arc<Store>, event: AuditEvent) -> Result<u64, DeviceError> {
    let clock = crate::clock::SystemClock::new();
    let high: Option<Timestamp> = store.device_state(key::TRUSTED)?;
    let offset: i64 = store.device_state(key::WALL_OFFSET)?.unwrap_or(0);
    let mut trusted = TrustedTime::resume_with(high, offset, &clock);
    let at = trusted.now(&clock);
    let wall = Timestamp::from_millis(clock.wall_ms()).unwrap_or(at);
    let log = AuditLog::start(Arc::clone(store))?;
    let seq = log.write_blocking(AuditRecord { at, wall, event });
    log.close();
    let mut extras = Extras::default();
    extras.set(key::TRUSTED, &trusted.high_water())?;
    extras.set(key::WALL_OFFSET, &trusted.wall_offset_ms())?;
    store.put_device_state(&extras)?;
    Ok(seq?)
}

/// 32 fresh random bytes for a checkin, from the operating system's generator.
fn nonce() -> Result<Hash32, DeviceError> {
    let mut b = [0u8; 32];
    crate::crypto::fill_random(&mut b).map_err(|e| DeviceError::Store(StoreError::Crypto(e)))?;
    Ok(Hash32(b))
}

/// When a DER certificate expires.
fn certificate_not_after(der: &[u8]) -> Option<Timestamp> {
    certificate_validity(der).map(|(_, until)| until)
}

/// A DER certificate's validity: not before, not after.
fn certificate_validity(der: &[u8]) -> Option<(Timestamp, Timestamp)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let ts = |t: x509_parser::time::ASN1Time| {
        Timestamp::from_millis(u64::try_from(t.timestamp()).ok()?.checked_mul(1000)?).ok()
    };
    Some((
        ts(cert.validity().not_before)?,
        ts(cert.validity().not_after)?,
    ))
}

/// This software's name and version, as hellos carry it.
fn software() -> Result<Text<64>, DeviceError> {
    Text::new(concat!("carecache/", env!("CARGO_PKG_VERSION")))
        .map_err(|_| DeviceError::Enrol("software name".into()))
}
