//! Prometheus metrics for the daemon (`GET /metrics`): syncs and their outcomes, reads
//! served and denied by reason, authentication failures, lease expiries, the audit log's
//! commits, failures, backlog and uploads, and request latency. Labels carry codes only, never
//! patient data.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

fn latency() -> Histogram {
    // 50 µs .. ~3.3 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

/// The daemon's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Sync rounds by outcome (`ok`, `offline`, `rejected`, `failed`).
    pub syncs: Family<Labels, Counter>,
    /// Reads by outcome (`served`, `denied`) and reason.
    pub reads: Family<Labels, Counter>,
    /// Requests refused for want of a valid client token, by reason.
    pub auth_failures: Family<Labels, Counter>,
    /// Leases ended on the device, by reason.
    pub lease_expiries: Family<Labels, Counter>,
    /// Requests refused because their audit entry could not be committed.
    pub audit_refusals: Counter,
    /// Audit entries waiting for upload (set at each scrape).
    pub audit_backlog: Gauge,
    /// Audit entries committed since start (set at each scrape).
    pub audit_committed: Gauge,
    /// Audit commits (fsyncs) since start (set at each scrape).
    pub audit_commits: Gauge,
    /// 1 while the audit log cannot be written.
    pub audit_failing: Gauge,
    /// Age in seconds of the oldest audit entry waiting for upload (0 when none wait).
    pub audit_backlog_age: Gauge,
    /// 1 while the backlog is older than `audit.warn_backlog_age_secs`.
    pub audit_backlog_overdue: Gauge,
    /// Audit uploads by outcome (`ok`, `offline`, `refused`, `failed`).
    pub audit_uploads: Family<Labels, Counter>,
    /// Live staff sessions (oidc identity mode; set at each scrape).
    pub staff_sessions: Gauge,
    /// 1 while the identity provider's keys are held (oidc mode: without them nobody can
    /// sign in offline; set at each scrape).
    pub identity_keys_held: Gauge,
    /// Audit entries acknowledged by the hub since start.
    pub audit_uploaded: Counter,
    /// Seconds since the last successful sync (-1 if never).
    pub data_age: Gauge,
    /// Request latency by route.
    pub latency: Family<Labels, Histogram, fn() -> Histogram>,
    /// One-off lookups by outcome.
    pub lookups: Family<Labels, Counter>,
    /// Patients held (set at each scrape).
    pub patients_held: Gauge,
    /// Patients the hub said the device will hold when the round completes (set at each
    /// scrape; 0 when the hub did not say).
    pub patients_expected: Gauge,
    /// 1 while the caseload is still arriving (set at each scrape).
    pub caseload_arriving: Gauge,
    /// Bytes received in the round under way (set at each scrape).
    pub sync_round_bytes: Gauge,
    /// Seconds until the round under way completes at its rate so far (-1 unknown).
    pub sync_eta: Gauge,
    /// Corrections of trusted time from the hub's nonce-bound time since start.
    pub clock_corrections: Counter,
    /// Seconds until the device certificate ends (negative: ended; set at each scrape).
    pub certificate_expiry: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("carecache");
        let m = Self {
            registry: Registry::default(),
            syncs: Family::default(),
            reads: Family::default(),
            auth_failures: Family::default(),
            lease_expiries: Family::default(),
            audit_refusals: Counter::default(),
            audit_backlog: Gauge::default(),
            audit_committed: Gauge::default(),
            audit_commits: Gauge::default(),
            audit_failing: Gauge::default(),
            audit_backlog_age: Gauge::default(),
            audit_backlog_overdue: Gauge::default(),
            audit_uploads: Family::default(),
            staff_sessions: Gauge::default(),
            identity_keys_held: Gauge::default(),
            audit_uploaded: Counter::default(),
            data_age: Gauge::default(),
            latency: Family::new_with_constructor(latency),
            lookups: Family::default(),
            patients_held: Gauge::default(),
            patients_expected: Gauge::default(),
            caseload_arriving: Gauge::default(),
            sync_round_bytes: Gauge::default(),
            sync_eta: Gauge::default(),
            clock_corrections: Counter::default(),
            certificate_expiry: Gauge::default(),
        };
        registry.register("syncs", "Sync rounds by outcome", m.syncs.clone());
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until the device certificate ends (negative: ended)",
            m.certificate_expiry.clone(),
        );
        registry.register(
            "clock_corrections",
            "Corrections of trusted time from the hub's nonce-bound time",
            m.clock_corrections.clone(),
        );
        registry.register(
            "reads",
            "Patient reads by outcome and reason",
            m.reads.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests without a valid client token",
            m.auth_failures.clone(),
        );
        registry.register(
            "lease_expiries",
            "Leases ended on the device, by reason",
            m.lease_expiries.clone(),
        );
        registry.register(
            "audit_refusals",
            "Requests refused because their audit entry could not be committed",
            m.audit_refusals.clone(),
        );
        registry.register(
            "audit_backlog_entries",
            "Audit entries on the device waiting for upload",
            m.audit_backlog.clone(),
        );
        registry.register(
            "audit_committed_entries",
            "Audit entries committed since start",
            m.audit_committed.clone(),
        );
        registry.register(
            "audit_commits",
            "Durable audit commits since start (each one fsync; concurrent reads share them)",
            m.audit_commits.clone(),
        );
        registry.register(
            "audit_failing",
            "1 while the audit log cannot be written (reads are refused)",
            m.audit_failing.clone(),
        );
        registry.register(
            "audit_backlog_age_seconds",
            "Age of the oldest audit entry waiting for upload (0 when none wait)",
            m.audit_backlog_age.clone(),
        );
        registry.register(
            "audit_backlog_overdue",
            "1 while the audit backlog is older than audit.warn_backlog_age_secs",
            m.audit_backlog_overdue.clone(),
        );
        registry.register(
            "audit_uploads",
            "Audit uploads by outcome",
            m.audit_uploads.clone(),
        );
        registry.register(
            "staff_sessions",
            "Live staff sessions (oidc identity mode)",
            m.staff_sessions.clone(),
        );
        registry.register(
            "identity_keys_held",
            "1 while the identity provider's signing keys are held (oidc identity mode)",
            m.identity_keys_held.clone(),
        );
        registry.register(
            "audit_uploaded_entries",
            "Audit entries acknowledged by the hub since start",
            m.audit_uploaded.clone(),
        );
        registry.register(
            "data_age_seconds",
            "Seconds since the last successful sync (-1 if never)",
            m.data_age.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Local API request latency by route",
            m.latency.clone(),
        );
        registry.register(
            "lookups",
            "One-off lookups (emergency access to a patient on no caseload) by outcome",
            m.lookups.clone(),
        );
        registry.register("patients_held", "Patients held", m.patients_held.clone());
        registry.register(
            "patients_expected",
            "Patients the hub said this device will hold when the round completes",
            m.patients_expected.clone(),
        );
        registry.register(
            "caseload_arriving",
            "1 while the caseload is still arriving",
            m.caseload_arriving.clone(),
        );
        registry.register(
            "sync_round_bytes",
            "Bytes received in the sync round under way",
            m.sync_round_bytes.clone(),
        );
        registry.register(
            "sync_eta_seconds",
            "Seconds until the round under way completes at its rate so far (-1 unknown)",
            m.sync_eta.clone(),
        );
        Self { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
