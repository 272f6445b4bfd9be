//! The fleet view: each device's last checkin (SPEC.md §3.9) — software, store size,
//! patients held, audit backlog and age, certificate expiry, clock offset, last error
//! class — kept per device, and read back with the reasons a device needs attention,
//! so an IT team sees the tablet that has not uploaded audit for two days before the
//! privacy officer does. A revoked device's last checkin confirms its wipe and counts
//! the audit entries it could not upload.

use serde::{Deserialize, Serialize};
use sync_protocol::message::{AnchorKind, AnchorReport, Health, RestoreReason};
use sync_protocol::types::Timestamp;

use crate::state::{HubState, StateError};

/// Restored copies kept per device (the oldest cleared ones give way first).
const RESTORES_KEPT: usize = 32;

/// A device's anti-rollback anchor as its last version-8 checkin reported it, and every
/// restored copy it has reported.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AnchorRow {
    /// Hub time of the report (ms).
    pub at: u64,
    /// The anchor's kind.
    pub kind: AnchorKind,
    /// The device could not read or advance its anchor.
    pub unavailable: bool,
    /// Restored copies found, oldest first.
    pub restores: Vec<RestoreRow>,
}

/// One restored copy a device found, destroyed and reported.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreRow {
    /// When the device found it (device trusted time).
    pub detected_at: Timestamp,
    /// What gave it away.
    pub reason: RestoreReason,
    /// Hub time of the report (ms).
    pub reported_at: u64,
    /// The privacy officer's clearance, once given.
    pub cleared: Option<Clearance>,
}

/// A privacy officer's clearance of a restored copy: a genuine restore from backup,
/// looked into.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Clearance {
    /// Hub time (ms).
    pub at: u64,
    /// Who cleared it (as they named themselves, with the privacy officer's token).
    pub officer: String,
    /// Why.
    pub reason: String,
}

/// When a device needs attention. `[fleet]` in `hub.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetLimits {
    /// No checkin for this long (hours).
    #[serde(default = "default_48")]
    pub silent_hours: u64,
    /// The oldest audit entry waiting on the device is this old (hours).
    #[serde(default = "default_48")]
    pub audit_stale_hours: u64,
    /// The device's certificate expires within this many days.
    #[serde(default = "default_cert_days")]
    pub certificate_warn_days: u64,
    /// The device's trusted time and wall clock differ by more than this (seconds).
    #[serde(default = "default_clock_secs")]
    pub clock_warn_secs: u64,
}

impl Default for FleetLimits {
    fn default() -> Self {
        Self {
            silent_hours: default_48(),
            audit_stale_hours: default_48(),
            certificate_warn_days: default_cert_days(),
            clock_warn_secs: default_clock_secs(),
        }
    }
}

fn default_48() -> u64 {
    48
}
fn default_cert_days() -> u64 {
    30
}
fn default_clock_secs() -> u64 {
    900
}

/// A device's last checkin as the hub keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HealthRow {
    /// Hub time of the checkin (ms).
    pub at: u64,
    /// What the device reported.
    pub health: Health,
    /// Set by the checkin of a revoked device that is destroying its data: hub time
    /// (ms) and the audit entries it could not upload.
    pub wipe: Option<(u64, u32)>,
}

impl HubState {
    /// Records a checkin. A revoked device's report marked `wiping` confirms its wipe.
    pub fn record_checkin(
        &self,
        device: &str,
        revoked: bool,
        health: &Health,
        anchor: Option<&AnchorReport>,
        now: Timestamp,
    ) -> Result<(), StateError> {
        let mut tx = self.engine.write()?;
        if let Some(report) = anchor {
            let mut row = tx.anchor(device)?.unwrap_or(AnchorRow {
                at: 0,
                kind: report.kind,
                unavailable: false,
                restores: Vec::new(),
            });
            row.at = now.as_millis();
            row.kind = report.kind;
            row.unavailable = report.unavailable;
            if let Some(r) = &report.restored {
                // Reported again until the device saw the answer: kept once.
                if !row.restores.iter().any(|k| k.detected_at == r.detected_at) {
                    row.restores.push(RestoreRow {
                        detected_at: r.detected_at,
                        reason: r.reason,
                        reported_at: now.as_millis(),
                        cleared: None,
                    });
                    tracing::warn!(
                        device,
                        reason = r.reason.name(),
                        "device reported a restored copy of its data directory"
                    );
                }
                while row.restores.len() > RESTORES_KEPT {
                    match row.restores.iter().position(|k| k.cleared.is_some()) {
                        Some(i) => drop(row.restores.remove(i)),
                        None => break,
                    }
                }
            }
            tx.put_anchor(device, &row)?;
        }
        let before = tx.health(device)?;
        let wipe = if revoked && health.wiping {
            Some((now.as_millis(), health.audit_backlog))
        } else {
            before.and_then(|b| b.wipe)
        };
        let row = HealthRow {
            at: now.as_millis(),
            health: health.clone(),
            wipe,
        };
        tx.put_health(device, &row)?;
        tx.commit()
    }

    /// Clears every restored copy a device reported and no one has cleared yet: the
    /// privacy officer looked into it (a genuine restore from backup, say) and says why.
    /// Returns how many were cleared; `NotFound` if none waited.
    pub fn clear_restored(
        &self,
        device: &str,
        officer: &crate::officer::Officer,
        reason: &str,
        now: Timestamp,
    ) -> Result<usize, StateError> {
        let reason = crate::officer::reason(reason)?;
        let mut tx = self.engine.write()?;
        if tx.device(device)?.is_none() {
            return Err(StateError::NotFound("no such device".into()));
        }
        let not_found =
            || StateError::NotFound("an uncleared restored copy of this device".to_owned());
        let mut row = tx.anchor(device)?.ok_or_else(not_found)?;
        let mut n = 0;
        for r in row.restores.iter_mut().filter(|r| r.cleared.is_none()) {
            r.cleared = Some(Clearance {
                at: now.as_millis(),
                officer: officer.name.clone(),
                reason: reason.to_owned(),
            });
            n += 1;
        }
        if n == 0 {
            return Err(not_found());
        }
        tx.put_anchor(device, &row)?;
        let action = crate::officer::Action::ClearRestored {
            device: device.to_owned(),
            cleared: n as u64,
        };
        crate::officer::log(tx.as_mut(), officer, action, Some(reason), now)?;
        tx.commit()?;
        Ok(n)
    }

    /// Every device's anchor report.
    pub fn anchor_rows(&self) -> Result<Vec<(String, AnchorRow)>, StateError> {
        self.engine.read()?.anchors()
    }

    /// Every device's last checkin.
    pub fn health_rows(&self) -> Result<Vec<(String, HealthRow)>, StateError> {
        self.engine.read()?.health_rows()
    }

    /// The fleet: every enrolled device with its last checkin and what needs attention,
    /// those needing it first (most reasons first), then by id.
    pub fn fleet(
        &self,
        now: Timestamp,
        limits: &FleetLimits,
    ) -> Result<Vec<FleetDevice>, StateError> {
        let health: std::collections::HashMap<String, HealthRow> =
            self.health_rows()?.into_iter().collect();
        let anchors: std::collections::HashMap<String, AnchorRow> =
            self.anchor_rows()?.into_iter().collect();
        let mut out: Vec<FleetDevice> = self
            .devices()?
            .into_iter()
            .map(|(id, d)| {
                let h = health.get(&id);
                let a = anchors.get(&id);
                let mut attention = attention(now, limits, d.revoked, h);
                attention.extend(anchor_attention(a));
                FleetDevice {
                    label: d.label,
                    team: d.team,
                    revoked: d.revoked,
                    last_checkin: h.and_then(|h| ts(h.at)),
                    last_checkin_ms: h.map(|h| h.at),
                    health: h.map(|h| h.health.clone()),
                    wipe: h.and_then(|h| h.wipe).map(|(at, unsent)| WipeConfirmed {
                        at: ts(at).unwrap_or_default(),
                        audit_unsent: unsent,
                    }),
                    anchor: a.cloned(),
                    attention,
                    id,
                }
            })
            .collect();
        out.sort_by(|a, b| {
            b.attention
                .len()
                .cmp(&a.attention.len())
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(out)
    }
}

/// One device in the fleet view.
#[derive(Clone, Debug, Serialize)]
pub struct FleetDevice {
    /// Device id.
    pub id: String,
    /// Label given at enrolment.
    pub label: String,
    /// Team.
    pub team: Option<String>,
    /// Whether the hub revoked it.
    pub revoked: bool,
    /// Hub time of its last checkin (RFC 3339), if any.
    pub last_checkin: Option<String>,
    /// The same, in ms.
    #[serde(skip)]
    pub last_checkin_ms: Option<u64>,
    /// What it reported then.
    pub health: Option<Health>,
    /// The wipe its last checkin confirmed, if revoked.
    pub wipe: Option<WipeConfirmed>,
    /// Its anti-rollback anchor and the restored copies it found (version-8 devices).
    pub anchor: Option<AnchorRow>,
    /// Why it needs attention (empty: it does not).
    pub attention: Vec<String>,
}

/// A revoked device's confirmation that it destroyed its data.
#[derive(Clone, Debug, Serialize)]
pub struct WipeConfirmed {
    /// When (hub time, RFC 3339).
    pub at: String,
    /// Audit entries it could not upload first (lost with the wipe).
    pub audit_unsent: u32,
}

fn ts(ms: u64) -> Option<String> {
    Timestamp::from_millis(ms).ok().map(|t| t.utc_seconds())
}

/// What a device's anchor report asks of people: a restored copy until the privacy
/// officer clears it, an anchor the device cannot use. A device without an anchor is
/// shown as such in the fleet view, not flagged.
fn anchor_attention(row: Option<&AnchorRow>) -> Vec<String> {
    let Some(row) = row else {
        return Vec::new();
    };
    let mut why = Vec::new();
    for r in row.restores.iter().filter(|r| r.cleared.is_none()) {
        why.push(format!(
            "restored: a restored or foreign copy of the data directory was found {} ({}) and destroyed; the privacy officer clears this with a reason",
            r.detected_at.utc_seconds(),
            r.reason.name()
        ));
    }
    if row.unavailable {
        why.push(format!(
            "anchor-unavailable: the device's {} anchor cannot be read or advanced",
            row.kind.name()
        ));
    }
    why
}

/// Why a device needs attention, as short stable codes with the figure that tripped
/// them.
fn attention(
    now: Timestamp,
    limits: &FleetLimits,
    revoked: bool,
    row: Option<&HealthRow>,
) -> Vec<String> {
    let mut why = Vec::new();
    let now_ms = now.as_millis();
    let hours = |ms: u64| ms / 3_600_000;
    let Some(row) = row else {
        if !revoked {
            why.push(
                "no-checkin: the device has not reported (older software, or never synced)"
                    .to_owned(),
            );
        }
        return why;
    };
    if revoked {
        match row.wipe {
            None => why.push("revoked-not-wiped: no wipe confirmation yet".to_owned()),
            Some((_, unsent)) if unsent > 0 => {
                why.push(format!(
                    "wipe-lost-audit: {unsent} audit entries were not uploaded"
                ));
            }
            Some(_) => {}
        }
        return why;
    }
    let h = &row.health;
    let silent = now_ms.saturating_sub(row.at);
    if silent >= limits.silent_hours.saturating_mul(3_600_000) {
        why.push(format!("silent: no checkin for {} h", hours(silent)));
    }
    if let Some(oldest) = h.audit_oldest {
        // The device's trusted time, checked by the hub at every checkin.
        let age = now_ms.saturating_sub(oldest.as_millis());
        if age >= limits.audit_stale_hours.saturating_mul(3_600_000) {
            why.push(format!(
                "audit-stale: {} entries waiting, the oldest {} h old",
                h.audit_backlog,
                hours(age)
            ));
        }
    }
    if let Some(until) = h.certificate_not_after {
        let left = until.as_millis().saturating_sub(now_ms);
        if left == 0 {
            why.push("certificate-expired".to_owned());
        } else if left < limits.certificate_warn_days.saturating_mul(86_400_000) {
            why.push(format!(
                "certificate-expiring: {} days left",
                left / 86_400_000
            ));
        }
    }
    if h.clock_offset_secs.unsigned_abs() > limits.clock_warn_secs {
        why.push(format!(
            "clock: trusted time and the wall clock differ by {} s",
            h.clock_offset_secs
        ));
    }
    if let Some(e) = h.last_error {
        why.push(format!("last-error: {}", e.name()));
    }
    why
}

/// The fleet as Prometheus text: devices by state, and per device its attention
/// reasons, audit backlog, certificate end and time since its last checkin (device ids
/// and counts only).
pub fn metrics_text(fleet: &[FleetDevice], now: Timestamp) -> String {
    use prometheus_client::encoding::text::encode;
    let mut registry = prometheus_client::registry::Registry::with_prefix("carecache_hub");
    register_fleet(&mut registry, fleet, now);
    let mut out = String::new();
    if encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

/// The fleet's series (see [`metrics_text`]) added to `registry`.
pub fn register_fleet(
    registry: &mut prometheus_client::registry::Registry,
    fleet: &[FleetDevice],
    now: Timestamp,
) {
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    type Labels = Vec<(String, String)>;
    let devices = Family::<Labels, Gauge>::default();
    let attention = Family::<Labels, Gauge>::default();
    let backlog = Family::<Labels, Gauge>::default();
    let certificate = Family::<Labels, Gauge>::default();
    let silent = Family::<Labels, Gauge>::default();
    let anchors = Family::<Labels, Gauge>::default();
    for kind in ["none", "file", "tpm", "unknown"] {
        anchors
            .get_or_create(&vec![("anchor".into(), kind.into())])
            .set(0);
    }
    for state in ["ok", "attention", "revoked"] {
        // Every state present, at 0 when no device is in it.
        devices
            .get_or_create(&vec![("state".into(), state.into())])
            .set(0);
    }
    let now_ms = i128::from(now.as_millis());
    for d in fleet {
        let state = match (d.revoked, d.attention.is_empty()) {
            (true, _) => "revoked",
            (false, true) => "ok",
            (false, false) => "attention",
        };
        devices
            .get_or_create(&vec![("state".into(), state.into())])
            .inc();
        if !d.revoked {
            let kind = d.anchor.as_ref().map_or("unknown", |a| a.kind.name());
            anchors
                .get_or_create(&vec![("anchor".into(), kind.into())])
                .inc();
        }
        let id = || vec![("device".to_owned(), d.id.clone())];
        for why in &d.attention {
            let reason = why.split(':').next().unwrap_or(why).to_owned();
            attention
                .get_or_create(&vec![
                    ("device".into(), d.id.clone()),
                    ("reason".into(), reason),
                ])
                .set(1);
        }
        if let Some(h) = &d.health {
            backlog.get_or_create(&id()).set(i64::from(h.audit_backlog));
            if let Some(until) = h.certificate_not_after {
                let left = (i128::from(until.as_millis()) - now_ms) / 1000;
                certificate
                    .get_or_create(&id())
                    .set(i64::try_from(left).unwrap_or(i64::MAX));
            }
        }
        if let Some(at) = d.last_checkin_ms {
            let age = (now_ms - i128::from(at)) / 1000;
            silent
                .get_or_create(&id())
                .set(i64::try_from(age).unwrap_or(i64::MAX));
        }
    }
    registry.register("devices", "Enrolled devices by state", devices);
    registry.register(
        "devices_by_anchor",
        "Devices in service by anti-rollback anchor (unknown: no version-8 checkin yet)",
        anchors,
    );
    registry.register(
        "device_attention",
        "Why a device needs attention (1 per reason)",
        attention,
    );
    registry.register(
        "device_audit_backlog",
        "Audit entries waiting on the device at its last checkin",
        backlog,
    );
    registry.register(
        "device_certificate_expiry_seconds",
        "Seconds until the device's certificate ends",
        certificate,
    );
    registry.register(
        "device_last_checkin_age_seconds",
        "Seconds since the device's last checkin",
        silent,
    );
}
