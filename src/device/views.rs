//! The device as each of its callers sees it. [`Device`] holds everything; each caller
//! is handed the one view it needs, so that the compiler shows what it can reach:
//!
//! - [`ReadView`] — the local API and the viewer: the store to read, policy, trusted
//!   time, the audit log to write, staff sessions, status and metrics. It has no way to
//!   the network, to sync, to client registrations or to a wipe: serving a read never
//!   waits on the hub.
//! - [`LookupDoor`] — the one API route that asks the hub (a one-off emergency lookup,
//!   run off the async runtime, bounded by the hub connection's timeouts).
//! - [`AdminView`] — the admin channel ([`crate::admin`]): status, a sync by hand, client
//!   tokens, the audit trail.
//! - [`SyncDriver`] — the daemon's loops: the policy tick, sync rounds, probes and audit
//!   uploads.

use std::sync::Arc;

use sync_protocol::NhsNumber;
use sync_protocol::audit::{AuditEvent, AuditRecord};
use sync_protocol::types::{LeaseId, StaffId, Timestamp};

use super::{
    CaseloadProgress, Device, DeviceError, LookupResult, Status, TickReport, UploadReport,
};
use crate::audit::{AuditLog, Backlog};
use crate::clients::{Clients, IssuedToken};
use crate::config::Config;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::store::Store;
use crate::sync::Summary;

/// What the local API and the viewer may do with the device: read, decide, audit.
#[derive(Clone, Debug)]
pub struct ReadView(Arc<Device>);

impl ReadView {
    /// The read view of `device`.
    pub fn of(device: &Arc<Device>) -> Self {
        Self(Arc::clone(device))
    }

    /// The store (records are read and opened through it; the API writes only staff
    /// sessions, through [`Identity`]).
    pub fn store(&self) -> &Store {
        self.0.store()
    }

    /// Trusted time now.
    pub fn now(&self) -> Timestamp {
        self.0.now()
    }

    /// The policy as of the last sync or tick.
    pub fn policy(&self) -> Arc<Policy> {
        self.0.policy()
    }

    /// Staff identity and sessions.
    pub fn identity(&self) -> &Identity {
        self.0.identity()
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        self.0.audit()
    }

    /// An audit record of `event` stamped now.
    pub fn audit_record(&self, event: AuditEvent) -> AuditRecord {
        self.0.audit_record(event)
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        self.0.config()
    }

    /// Whether the device was wiped (nothing is served then).
    pub fn is_wiped(&self) -> bool {
        self.0.is_wiped()
    }

    /// Why no patient data is served (the anti-rollback check could not be made).
    pub fn anchor_held(&self) -> Option<String> {
        self.0.anchor_held()
    }

    /// Everything `status` shows.
    pub fn status(&self) -> Result<Status, DeviceError> {
        self.0.status()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        self.0.metrics()
    }

    /// Trusted time of the last successful sync round.
    pub fn last_success(&self) -> Option<Timestamp> {
        self.0.last_success()
    }

    /// The client registrations, as they are now (a token revoked over the admin channel
    /// is refused from the next request on).
    pub fn clients(&self) -> Arc<Clients> {
        self.0.clients()
    }

    /// The device certificate's validity (kept in memory; no store read).
    pub fn certificate_validity(&self) -> Result<Option<(Timestamp, Timestamp)>, DeviceError> {
        self.0.certificate_validity()
    }

    /// Seconds left on the device certificate when within the warning window.
    pub fn certificate_warning(&self) -> Option<i64> {
        self.0.certificate_warning()
    }

    /// How much of the caseload has arrived.
    pub fn caseload(&self) -> Result<CaseloadProgress, DeviceError> {
        self.0.caseload()
    }

    /// The audit backlog and whether it is overdue.
    pub fn audit_backlog(&self) -> (Backlog, Option<u64>, bool) {
        self.0.audit_backlog()
    }

    /// Whether the caseload is still arriving.
    pub fn arriving(&self) -> bool {
        self.0.arriving()
    }
}

/// The emergency lookup: the only way from the local API to the hub.
#[derive(Clone, Debug)]
pub struct LookupDoor(Arc<Device>);

impl LookupDoor {
    /// The lookup door of `device`.
    pub fn of(device: &Arc<Device>) -> Self {
        Self(Arc::clone(device))
    }

    /// Asks the hub for `nhs` under `lease` (see [`Device::lookup`]). Blocking: run it
    /// off the async runtime.
    pub fn lookup(
        &self,
        nhs: NhsNumber,
        lease: LeaseId,
        user: &StaffId,
        reason: &str,
    ) -> Result<LookupResult, DeviceError> {
        self.0.lookup(nhs, lease, user, reason)
    }
}

/// What the admin channel may do.
#[derive(Clone, Debug)]
pub struct AdminView(Arc<Device>);

impl AdminView {
    /// The admin view of `device`.
    pub fn of(device: &Arc<Device>) -> Self {
        Self(Arc::clone(device))
    }

    /// Everything `status` shows.
    pub fn status(&self) -> Result<Status, DeviceError> {
        self.0.status()
    }

    /// A sync round now.
    pub fn sync_once(
        &self,
        progress: &mut dyn FnMut(&Summary, &CaseloadProgress),
    ) -> Result<Summary, DeviceError> {
        self.0.sync_once(progress)
    }

    /// Registers a client (audited).
    pub fn add_client(&self, name: &str) -> Result<IssuedToken, DeviceError> {
        self.0.add_client(name)
    }

    /// Revokes a client at once (audited).
    pub fn revoke_client(&self, name: &str) -> Result<(), DeviceError> {
        self.0.revoke_client(name)
    }

    /// The client registrations.
    pub fn clients(&self) -> Arc<Clients> {
        self.0.clients()
    }

    /// The store, for the audit tools.
    pub fn store(&self) -> &Store {
        self.0.store()
    }

    /// The enrolled device id.
    pub fn device_id(&self) -> Result<Option<String>, DeviceError> {
        self.0.device_id()
    }

    /// Writes `event` to the audit log, durably.
    pub fn audit_blocking(&self, event: AuditEvent) -> Result<u64, DeviceError> {
        self.0.audit_blocking(event)
    }
}

/// What the daemon's loops drive.
#[derive(Clone, Debug)]
pub struct SyncDriver(Arc<Device>);

impl SyncDriver {
    /// The sync driver of `device`.
    pub fn of(device: &Arc<Device>) -> Self {
        Self(Arc::clone(device))
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        self.0.config()
    }

    /// The policy tick.
    pub fn tick(&self) -> Result<TickReport, DeviceError> {
        self.0.tick()
    }

    /// Whether the hub answers.
    pub fn probe(&self) -> bool {
        self.0.probe()
    }

    /// A sync round.
    pub fn sync_once(
        &self,
        progress: &mut dyn FnMut(&Summary, &CaseloadProgress),
    ) -> Result<Summary, DeviceError> {
        self.0.sync_once(progress)
    }

    /// Uploads waiting audit entries.
    pub fn upload_audit(&self) -> Result<UploadReport, DeviceError> {
        self.0.upload_audit()
    }
}
