//! What `carecache status`, `/status` and `leases` show of the device: counts, times and
//! outcomes, never patient data; and its rendering for a terminal.

use serde::Serialize;
use sync_protocol::message::{Audience, Lease, View};
use sync_protocol::types::Timestamp;

use super::{CaseloadProgress, EndedLease, Outcome, SyncRecord, UploadRecord};
use crate::clock::human;
use crate::policy::{Policy, Standing};

/// One lease as status shows it.
#[derive(Clone, Debug, Serialize)]
pub struct LeaseStatus {
    /// Lease id.
    pub id: u64,
    /// Label.
    pub label: String,
    /// `clinical` or `social_care`.
    pub view: &'static str,
    /// Who may look: `team` or the number of named users.
    pub audience: String,
    /// Patients named.
    pub patients: usize,
    /// Valid from.
    pub not_before: String,
    /// Valid until (exclusive).
    pub not_after: String,
    /// `active`, `not yet valid`, or why it ended.
    pub standing: String,
    /// Seconds of access left (offline limit included), when active.
    pub seconds_left: Option<u64>,
    /// Whether emergency access is allowed.
    pub emergency_access: bool,
}

/// Everything `carecache status` shows. No patient data.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The device id, once enrolled.
    pub device_id: Option<String>,
    /// The hub.
    pub hub: String,
    /// Trusted time now.
    pub trusted_time: String,
    /// The device's wall clock now.
    pub wall_clock: String,
    /// Seconds the wall clock is behind trusted time (set back, or drifting).
    pub wall_clock_behind_secs: u64,
    /// Last successful contact with the hub.
    pub last_contact: Option<String>,
    /// Last sync round that finished.
    pub last_success: Option<String>,
    /// The last round, however it ended.
    pub last_sync: Option<SyncRecord>,
    /// The last round's error, in words.
    pub last_error: Option<String>,
    /// Leases held.
    pub leases: Vec<LeaseStatus>,
    /// Leases that ended recently.
    pub ended_leases: Vec<EndedLease>,
    /// Patients held.
    pub patients_held: u64,
    /// Objections on record.
    pub objections: u64,
    /// Audit entries waiting for upload.
    pub audit_backlog: u64,
    /// Trusted time of the oldest entry waiting.
    pub audit_backlog_oldest: Option<String>,
    /// Its age in seconds.
    pub audit_backlog_age_secs: Option<u64>,
    /// Whether the backlog is older than `audit.warn_backlog_age_secs` (API answers carry
    /// a warning header meanwhile).
    pub audit_backlog_overdue: bool,
    /// The last sequence the hub acknowledged.
    pub audit_acked: u64,
    /// The last upload, however it ended.
    pub audit_upload: Option<UploadRecord>,
    /// The last audit sequence committed.
    pub audit_head: u64,
    /// Why the audit log cannot be written, while it cannot (reads are refused).
    pub audit_error: Option<String>,
    /// Who vouches for staff ids.
    pub identity: IdentityStatus,
    /// How much of the caseload has arrived.
    pub caseload: CaseloadProgress,
    /// When the device certificate ends (RFC 3339), once enrolled.
    pub certificate_not_after: Option<String>,
    /// Within 30 days of that end (or past it): what to do, in words.
    pub certificate_warning: Option<String>,
    /// The anti-rollback anchor.
    pub anchor: AnchorStatus,
}

/// The anti-rollback anchor in status.
#[derive(Clone, Debug, Serialize)]
pub struct AnchorStatus {
    /// `none`, `file` or `tpm`.
    pub kind: &'static str,
    /// Which counter (an NV index and TPM, or a file path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counter: Option<String>,
    /// The count the store expects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Why the anchor could not be read (nothing is served) or advanced (purges since
    /// are not counted yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// No patient data is served: the anti-rollback check could not be made.
    pub holding: bool,
    /// A restored copy found and reset, not yet reported to the hub.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored: Option<String>,
}

/// The certificate warning in words, from the seconds left (negative: ended).
pub fn certificate_words(left_secs: i64) -> String {
    if left_secs <= 0 {
        "the device certificate has ENDED: the device cannot reach the hub; ask the hub's administrator to re-enrol it (nothing is lost: audit waits on the device)".to_owned()
    } else {
        format!(
            "the device certificate ends in {}; it renews itself at the next sync with the hub — if this persists, check the device's contact with the hub",
            human(left_secs.unsigned_abs())
        )
    }
}

/// The identity mode in status.
#[derive(Clone, Debug, Serialize)]
pub struct IdentityStatus {
    /// `asserted` or `oidc`.
    pub mode: &'static str,
    /// The issuer (oidc).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Whether the issuer's keys are held (oidc: without them no one can sign in offline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer_keys_held: Option<bool>,
    /// Live staff sessions (oidc).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staff_sessions: Option<usize>,
}

pub(super) fn lease_status(policy: &Policy, l: &Lease, now: Timestamp) -> LeaseStatus {
    let (standing, seconds_left) = match policy.standing(l, now) {
        Standing::Active(until) => (
            String::from("active"),
            Some(until.as_millis().saturating_sub(now.as_millis()) / 1000),
        ),
        Standing::NotYet(t) => (format!("not yet valid (from {})", t.utc_seconds()), None),
        Standing::Ended(r) => (r.describe().to_owned(), None),
    };
    LeaseStatus {
        id: l.id.0,
        label: l.label.as_str().to_owned(),
        view: match l.view {
            View::Clinical => "clinical",
            View::SocialCare => "social_care",
        },
        audience: match &l.audience {
            Audience::Team => String::from("team"),
            Audience::Users(u) => format!("{} named user(s)", u.len()),
        },
        patients: l.patients.len(),
        not_before: l.not_before.utc_seconds(),
        not_after: l.not_after.utc_seconds(),
        standing,
        seconds_left,
        emergency_access: l.emergency_access,
    }
}

/// Status in words, for `carecache status`.
pub fn render_status(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "device      {}",
        s.device_id.as_deref().unwrap_or("not enrolled")
    );
    let _ = writeln!(out, "hub         {}", s.hub);
    if let Some(until) = &s.certificate_not_after {
        let _ = writeln!(
            out,
            "certificate ends {until}{}",
            s.certificate_warning
                .as_ref()
                .map(|w| format!(" — WARNING: {w}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        out,
        "identity    {}",
        match (&s.identity.issuer, s.identity.issuer_keys_held) {
            (Some(issuer), Some(keys)) => format!(
                "oidc — staff proven by {issuer}; {} staff sessions; issuer keys {}",
                s.identity.staff_sessions.unwrap_or(0),
                if keys {
                    "held"
                } else {
                    "NOT HELD (sign-in needs signal)"
                }
            ),
            _ => "asserted — the client software names the member of staff".to_owned(),
        }
    );
    let a = &s.anchor;
    let _ = writeln!(
        out,
        "rollback    {}{}{}",
        match (&a.counter, a.count) {
            (Some(c), Some(n)) => format!("{c}, count {n}"),
            (Some(c), None) => c.clone(),
            _ => "no anchor: a restored copy of the data directory would not be detected ([anchor] in the configuration)".to_owned(),
        },
        match (&a.problem, a.holding) {
            (Some(p), true) => format!(" — NOTHING IS SERVED: the check could not be made ({p})"),
            (Some(p), false) => format!(" — WARNING: not advanced ({p}); retried at the next purge"),
            _ => String::new(),
        },
        a.restored
            .as_ref()
            .map(|r| format!(" — a restored copy was found {r}, its data destroyed (not yet reported to the hub)"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "trusted     {}", s.trusted_time);
    if s.wall_clock_behind_secs > 60 {
        let _ = writeln!(
            out,
            "wall clock  {} (behind trusted time by {}; leases follow trusted time)",
            s.wall_clock,
            human(s.wall_clock_behind_secs)
        );
    }
    let _ = writeln!(
        out,
        "last sync   {}",
        match &s.last_sync {
            None => String::from("never"),
            Some(r) => format!(
                "{} — {}",
                r.at.utc_seconds(),
                match &r.outcome {
                    Outcome::Ok => format!(
                        "ok ({} batches, {} records, {} bytes)",
                        r.summary.batches, r.summary.upserts, r.summary.bytes
                    ),
                    Outcome::Offline(e) => format!("offline: {e}"),
                    Outcome::Rejected(e) => format!("REJECTED: {e}"),
                    Outcome::Failed(e) => format!("failed: {e}"),
                }
            ),
        }
    );
    let _ = writeln!(
        out,
        "last ok     {}",
        s.last_success.as_deref().unwrap_or("never")
    );
    let _ = writeln!(
        out,
        "holding     {} patients, {} objections",
        s.patients_held, s.objections
    );
    if !s.caseload.complete {
        let _ = writeln!(
            out,
            "caseload    STILL ARRIVING: {}{}",
            s.caseload.words(),
            match (s.caseload.syncing, s.caseload.eta_secs) {
                (true, Some(t)) => format!(" (syncing, about {} left)", human(t)),
                (true, None) => " (syncing)".to_owned(),
                (false, _) => " (resumes at the next sync)".to_owned(),
            }
        );
    }
    let _ = writeln!(
        out,
        "audit       {} entries written, {} acknowledged by the hub, {} waiting{}{}",
        s.audit_head,
        s.audit_acked,
        s.audit_backlog,
        match (&s.audit_backlog_oldest, s.audit_backlog_age_secs) {
            (Some(t), Some(age)) => format!(" (oldest {t}, {} ago)", human(age)),
            _ => String::new(),
        },
        if s.audit_backlog_overdue {
            " — OVERDUE: connect to the hub"
        } else {
            ""
        }
    );
    if let Some(u) = &s.audit_upload {
        let _ = writeln!(
            out,
            "upload      {} — {}",
            u.at.utc_seconds(),
            match &u.outcome {
                Outcome::Ok => format!(
                    "ok ({} entries, {} bytes)",
                    u.report.entries, u.report.bytes_sent
                ),
                Outcome::Offline(e) => format!("offline: {e}"),
                Outcome::Rejected(e) => format!("REFUSED: {e}"),
                Outcome::Failed(e) => format!("failed: {e}"),
            }
        );
    }
    if s.leases.is_empty() {
        let _ = writeln!(out, "leases      none");
    }
    for l in &s.leases {
        let left = l
            .seconds_left
            .map_or_else(String::new, |secs| format!(", {} left", human(secs)));
        let _ = writeln!(
            out,
            "lease {:>5} {} — {} patients, {} view, {}; {}{left}",
            l.id, l.label, l.patients, l.view, l.audience, l.standing
        );
    }
    for e in s.ended_leases.iter().rev().take(5) {
        let _ = writeln!(
            out,
            "ended {:>5} at {}: {}",
            e.id.0,
            e.ended_at.utc_seconds(),
            e.reason.describe()
        );
    }
    out
}
