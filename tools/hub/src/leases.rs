//! Leases as administrators state them (`LeaseSpec`: JSON from the admin API, TOML from
//! the config file) turned into the wire `Lease`.

use std::collections::BTreeSet;

use sync_protocol::message::{Audience, Lease, View};
use sync_protocol::types::{BoundedVec, LeaseId, StaffId, Text};

use crate::state::{LeaseSpec, StateError, ViewSpec, parse_nhs};

/// Check a spec and build the wire lease with id `id`. Patients are de-duplicated and
/// sorted, so the same caseload always encodes the same.
pub(crate) fn to_wire(id: u64, spec: &LeaseSpec) -> Result<Lease, StateError> {
    let invalid = |m: &str| StateError::Invalid(m.to_owned());
    let label = Text::new(spec.label.as_str()).map_err(|_| invalid("lease label too long"))?;
    let audience = if spec.users.is_empty() {
        Audience::Team
    } else {
        let users = spec
            .users
            .iter()
            .map(|u| StaffId::new(u.as_str()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| invalid("a staff id is not 1-32 of A-Z a-z 0-9 - . _"))?;
        Audience::Users(BoundedVec::try_from(users).map_err(|_| invalid("too many users"))?)
    };
    let view = match spec.view {
        ViewSpec::Clinical => View::Clinical,
        ViewSpec::SocialCare => View::SocialCare,
    };
    let time = |s: &str| {
        sync_protocol::types::Timestamp::from_rfc3339(s).ok_or_else(|| {
            invalid("lease times must be RFC 3339 instants, e.g. 2026-11-24T08:00:00Z")
        })
    };
    let mut patients = BTreeSet::new();
    for p in &spec.patients {
        patients.insert(parse_nhs(p)?);
    }
    let patients = BoundedVec::try_from(patients.into_iter().collect::<Vec<_>>())
        .map_err(|_| invalid("more than 500,000 patients in one lease"))?;
    Lease::new(
        LeaseId(id),
        label,
        audience,
        view,
        time(&spec.not_before)?,
        time(&spec.not_after)?,
        spec.max_offline_secs,
        spec.emergency_access,
        patients,
    )
    .map_err(|e| invalid(&format!("lease: {e}")))
}
