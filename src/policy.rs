//! Local policy: who may see which cached patient, with which view, until when.
//!
//! Decisions are values. [`Policy::decide`] checks objection, lease time box, offline
//! limit, audience and purpose, and returns either a [`Denial`] saying why or a [`Grant`]
//! — a proof value whose fields only this module can set. [`open`] is the one way to
//! read a record for display and needs a `Grant`; it also applies the lease's view
//! (`social_care` sees alerts and key contacts only). DESIGN.md invariants 3 and 4.

use std::fmt;

use serde::{Deserialize, Serialize};
use sync_protocol::NhsNumber;
use sync_protocol::message::{Audience, Lease, LeaseEndReason, View};
use sync_protocol::record::{
    Alert, Allergy, Demographics, KeyContact, MAX_ALERTS, MAX_ALLERGIES, MAX_CONTACTS,
    MAX_MEDICATIONS, Medication, Section, Unreadable,
};
use sync_protocol::types::{LeaseId, StaffId, Timestamp};

use crate::store::{Store, StoreError};

/// Longest accepted emergency-access reason, in characters.
pub const MAX_REASON_CHARS: usize = 256;

/// Why the caller is looking (FHIR purpose of use).
#[derive(Clone, PartialEq, Eq)]
pub enum Purpose {
    /// Treatment (`TREAT`) of a patient on the caller's caseload.
    Treat,
    /// Emergency treatment (`ETREAT`, "break glass") with the caller's reason.
    Emergency(String),
}

impl fmt::Debug for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The reason is free text a clinician typed: it may name the patient.
        match self {
            Self::Treat => f.write_str("Treat"),
            Self::Emergency(r) => write!(f, "Emergency(<{} chars>)", r.chars().count()),
        }
    }
}

/// Why a lease stopped giving access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// Its `not_after` passed.
    Expired,
    /// The device was out of contact with the hub for longer than the lease allows.
    OfflineTooLong,
    /// The hub ended it.
    EndedByHub(LeaseEndReason),
}

impl EndReason {
    /// A stable code for metrics and the API.
    pub fn code(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::OfflineTooLong => "offline-too-long",
            Self::EndedByHub(LeaseEndReason::Revoked) => "revoked",
            Self::EndedByHub(LeaseEndReason::AssignmentEnded) => "assignment-ended",
            Self::EndedByHub(LeaseEndReason::Superseded) => "superseded",
        }
    }

    /// Words for status output.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::OfflineTooLong => "offline too long",
            Self::EndedByHub(LeaseEndReason::Revoked) => "revoked by the hub",
            Self::EndedByHub(LeaseEndReason::AssignmentEnded) => "assignment ended",
            Self::EndedByHub(LeaseEndReason::Superseded) => "superseded",
        }
    }
}

/// A lease that ended on this device: kept (without its patients) so a caller whose
/// access ended is told so rather than "not on your caseload".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedLease {
    /// The lease.
    pub id: LeaseId,
    /// Its audience (staff ids, no patient data).
    pub audience: Audience,
    /// When it ended, in trusted time.
    pub ended_at: Timestamp,
    /// Why.
    pub reason: EndReason,
}

/// How many ended leases are remembered.
pub const ENDED_KEPT: usize = 64;

/// Why a read is refused. Each says who must act.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// The patient objected to sharing: nothing is shown, even under a lease.
    #[error("record not available")]
    Objected,
    /// No lease on this device gives the caller this patient.
    #[error("not on your caseload")]
    NotOnCaseload,
    /// The caller's access to this patient ended.
    #[error("access expired ({})", .0.describe())]
    AccessEnded(EndReason),
    /// The lease naming this patient is not valid yet.
    #[error("access not yet valid (starts at {})", .0.utc_seconds())]
    NotYetValid(Timestamp),
    /// Emergency access asked for where no lease permits it.
    #[error("emergency access is not permitted for this patient on this device")]
    EmergencyNotPermitted,
    /// Emergency access needs a reason.
    #[error("emergency access needs a reason (1–{MAX_REASON_CHARS} characters)")]
    ReasonRequired,
    /// The patient is on the caseload but no record is held for them.
    #[error("no record held for this patient")]
    NotHeld,
}

impl Denial {
    /// A stable code for audit and the API.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Objected => "objected",
            Self::NotOnCaseload => "not-on-caseload",
            Self::AccessEnded(_) => "access-expired",
            Self::NotYetValid(_) => "not-yet-valid",
            Self::EmergencyNotPermitted => "emergency-not-permitted",
            Self::ReasonRequired => "reason-required",
            Self::NotHeld => "not-held",
        }
    }
}

/// Proof that policy allowed one user to see one patient, now, with a view. Only this
/// module constructs it.
#[derive(Clone, PartialEq, Eq)]
pub struct Grant {
    nhs: NhsNumber,
    lease: LeaseId,
    view: View,
    emergency: bool,
    until: Timestamp,
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("lease", &self.lease)
            .field("view", &self.view)
            .field("emergency", &self.emergency)
            .field("until", &self.until)
            .finish_non_exhaustive()
    }
}

impl Grant {
    /// The patient.
    pub fn patient(&self) -> NhsNumber {
        self.nhs
    }
    /// The lease that allowed it.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }
    /// The view the caller gets.
    pub fn view(&self) -> View {
        self.view
    }
    /// True for emergency access outside the caller's own caseload (flagged in audit).
    pub fn emergency(&self) -> bool {
        self.emergency
    }
    /// When this access ends, in trusted time.
    pub fn until(&self) -> Timestamp {
        self.until
    }

    /// The grant with its view narrowed to `cap` (a role that may see no more than
    /// alerts and contacts never gets the clinical view); never widened.
    #[must_use]
    pub fn narrowed(mut self, cap: Option<View>) -> Self {
        if cap == Some(View::SocialCare) {
            self.view = View::SocialCare;
        }
        self
    }
}

/// A lease's standing at a moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Valid until the time given (the earlier of `not_after` and the offline limit).
    Active(Timestamp),
    /// Not valid before the time given.
    NotYet(Timestamp),
    /// Over.
    Ended(EndReason),
}

/// The device's leases at one moment, indexed by patient.
#[derive(Clone)]
pub struct Policy {
    leases: Vec<Lease>,
    /// (patient, index into `leases`), sorted: one flat allocation however large the
    /// caseload (a map of vectors would allocate per patient).
    by_patient: Vec<(NhsNumber, u32)>,
    ended: Vec<EndedLease>,
    last_contact: Option<Timestamp>,
    /// Leases the hub granted for a one-off lookup: every access under one is emergency
    /// access (flagged in audit).
    lookups: Vec<LeaseId>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("leases", &self.leases.len())
            .field("entries", &self.by_patient.len())
            .field("ended", &self.ended.len())
            .field("last_contact", &self.last_contact)
            .finish()
    }
}

impl Policy {
    /// Policy over `leases`; `last_contact` is the trusted time of the last successful
    /// exchange with the hub (the offline limit counts from it).
    pub fn new(
        leases: Vec<Lease>,
        ended: Vec<EndedLease>,
        last_contact: Option<Timestamp>,
    ) -> Self {
        let mut by_patient: Vec<(NhsNumber, u32)> = leases
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                let i = u32::try_from(i).unwrap_or(u32::MAX);
                l.patients.iter().map(move |p| (*p, i))
            })
            .collect();
        by_patient.sort_unstable();
        by_patient.shrink_to_fit();
        Self {
            leases,
            by_patient,
            ended,
            last_contact,
            lookups: Vec::new(),
        }
    }

    /// This policy, with `lookups` the leases granted for one-off lookups.
    pub fn with_lookups(mut self, lookups: Vec<LeaseId>) -> Self {
        self.lookups = lookups;
        self
    }

    /// The caller's active lease allowing emergency access, under which a one-off
    /// lookup may be asked (SPEC.md §3.8), if any.
    pub fn lookup_lease(&self, user: &StaffId, now: Timestamp) -> Option<LeaseId> {
        self.leases
            .iter()
            .filter(|l| l.emergency_access && admits(&l.audience, user))
            .find(|l| matches!(self.standing(l, now), Standing::Active(_)))
            .map(|l| l.id)
    }

    /// Whether `id` was granted for a one-off lookup.
    pub fn is_lookup(&self, id: LeaseId) -> bool {
        self.lookups.contains(&id)
    }

    /// The leases.
    pub fn leases(&self) -> &[Lease] {
        &self.leases
    }

    /// A lease's standing at `now`.
    pub fn standing(&self, lease: &Lease, now: Timestamp) -> Standing {
        let offline_end = self.last_contact.map(|c| {
            c.as_millis()
                .saturating_add(u64::from(lease.max_offline_secs) * 1000)
        });
        if now >= lease.not_after {
            return Standing::Ended(EndReason::Expired);
        }
        // No contact yet means the lease never arrived from a hub; treat as out of contact.
        match offline_end {
            Some(end) if now.as_millis() < end => {}
            _ => return Standing::Ended(EndReason::OfflineTooLong),
        }
        if now < lease.not_before {
            return Standing::NotYet(lease.not_before);
        }
        let until = offline_end
            .and_then(|e| Timestamp::from_millis(e).ok())
            .map_or(lease.not_after, |e| e.min(lease.not_after));
        Standing::Active(until)
    }

    /// Leases that are over at `now` and must be purged, with why.
    pub fn due_for_purge(&self, now: Timestamp) -> Vec<(LeaseId, EndReason)> {
        self.leases
            .iter()
            .filter_map(|l| match self.standing(l, now) {
                Standing::Ended(r) => Some((l.id, r)),
                _ => None,
            })
            .collect()
    }

    /// The patients `user` may see now under their own leases (TREAT), sorted by NHS
    /// number, each once, with when that access ends (the latest of their leases).
    pub fn caseload(&self, now: Timestamp, user: &StaffId) -> Vec<(NhsNumber, Timestamp)> {
        let active: Vec<Option<Timestamp>> = self
            .leases
            .iter()
            .map(|l| match self.standing(l, now) {
                Standing::Active(until) if admits(&l.audience, user) => Some(until),
                _ => None,
            })
            .collect();
        let mut out: Vec<(NhsNumber, Timestamp)> = Vec::new();
        for (p, i) in &self.by_patient {
            let Some(Some(until)) = usize::try_from(*i).ok().and_then(|i| active.get(i)) else {
                continue;
            };
            match out.last_mut() {
                Some((last, u)) if last == p => *u = (*u).max(*until),
                _ => out.push((*p, *until)),
            }
        }
        out
    }

    /// The latest end (`not_after`) of the leases naming `user` that have not ended, or
    /// `None` when no such lease is held: a staff session never outlives them.
    pub fn access_ends(&self, now: Timestamp, user: &StaffId) -> Option<Timestamp> {
        self.leases
            .iter()
            .filter(|l| admits(&l.audience, user))
            .filter(|l| !matches!(self.standing(l, now), Standing::Ended(_)))
            .map(|l| l.not_after)
            .max()
    }

    /// Decides whether `user` may see `nhs` now for `purpose`.
    pub fn decide(
        &self,
        store: &Store,
        now: Timestamp,
        user: &StaffId,
        purpose: &Purpose,
        nhs: &NhsNumber,
    ) -> Result<Result<Grant, Denial>, StoreError> {
        if let Purpose::Emergency(reason) = purpose {
            let n = reason.trim().chars().count();
            if n == 0 || n > MAX_REASON_CHARS {
                return Ok(Err(Denial::ReasonRequired));
            }
        }
        // Objections win over every lease. Only a caller with a lease of theirs naming
        // the patient learns of it; to anyone else an objector is answered as any
        // patient not on their caseload, so that a refusal reveals nothing.
        if store.objected(nhs)? {
            let theirs = self.naming(nhs).any(|l| admits(&l.audience, user));
            return Ok(Err(if theirs {
                Denial::Objected
            } else {
                Denial::NotOnCaseload
            }));
        }
        Ok(self.decide_leases(now, user, purpose, nhs))
    }

    /// The leases naming `nhs`.
    fn naming<'a>(&'a self, nhs: &'a NhsNumber) -> impl Iterator<Item = &'a Lease> + 'a {
        let from = self.by_patient.partition_point(|(p, _)| p < nhs);
        self.by_patient
            .get(from..)
            .unwrap_or_default()
            .iter()
            .take_while(move |(p, _)| p == nhs)
            .filter_map(|(_, i)| self.leases.get(usize::try_from(*i).ok()?))
    }

    fn decide_leases(
        &self,
        now: Timestamp,
        user: &StaffId,
        purpose: &Purpose,
        nhs: &NhsNumber,
    ) -> Result<Grant, Denial> {
        let naming: Vec<&Lease> = self.naming(nhs).collect();
        let grant = |l: &Lease, until, emergency: bool| Grant {
            nhs: *nhs,
            lease: l.id,
            view: l.view,
            emergency: emergency || self.lookups.contains(&l.id),
            until,
        };
        // The caller's own leases naming the patient, best first.
        let mut first_denial = None;
        let mut own = naming
            .iter()
            .filter(|l| admits(&l.audience, user))
            .peekable();
        let had_own = own.peek().is_some();
        for l in own {
            match self.standing(l, now) {
                Standing::Active(until) => return Ok(grant(l, until, false)),
                Standing::NotYet(t) => {
                    first_denial.get_or_insert(Denial::NotYetValid(t));
                }
                Standing::Ended(r) => {
                    first_denial.get_or_insert(Denial::AccessEnded(r));
                }
            }
        }
        if let Purpose::Emergency(_) = purpose {
            // Break glass: a cached patient outside the caller's own caseload, where the
            // lease holding them allows it, for a user this device knows.
            let known = self.leases.iter().any(|l| {
                admits(&l.audience, user) && matches!(self.standing(l, now), Standing::Active(_))
            });
            if !known {
                return Err(first_denial.unwrap_or(Denial::NotOnCaseload));
            }
            let mut any = false;
            for l in &naming {
                any = true;
                if l.emergency_access
                    && let Standing::Active(until) = self.standing(l, now)
                {
                    return Ok(grant(l, until, true));
                }
            }
            if any {
                return Err(first_denial.unwrap_or(Denial::EmergencyNotPermitted));
            }
        }
        if let Some(d) = first_denial {
            return Err(d);
        }
        if !had_own
            && let Some(e) = self.ended.iter().rev().find(|e| admits(&e.audience, user))
            && !self.leases.iter().any(|l| admits(&l.audience, user))
        {
            return Err(Denial::AccessEnded(e.reason));
        }
        Err(Denial::NotOnCaseload)
    }
}

fn admits(audience: &Audience, user: &StaffId) -> bool {
    match audience {
        Audience::Team => true,
        Audience::Users(list) => list.iter().any(|u| u == user),
    }
}

/// What a caller is shown of a record under a grant: `clinical` is `None` for the
/// `social_care` view (allergies and medications are not part of it, which is different
/// from "not available").
pub struct Shown {
    /// The patient.
    pub nhs_number: NhsNumber,
    /// Identity.
    pub demographics: Demographics,
    /// Alerts (every view).
    pub alerts: Section<Alert, MAX_ALERTS>,
    /// Key contacts (every view).
    pub contacts: Section<KeyContact, MAX_CONTACTS>,
    /// Allergies and medications, for the clinical view only.
    pub clinical: Option<Clinical>,
    /// Items withheld for confidentiality (show the standard warning when non-zero).
    pub withheld: u16,
    /// Items the hub could not read, per section shown (the social-care view's counts
    /// for allergies and medications are zero: those sections are not part of it).
    pub unreadable: Unreadable,
    /// The grant this was read under.
    pub grant: Grant,
}

/// The clinical part of a record.
pub struct Clinical {
    /// Allergies.
    pub allergies: Section<Allergy, MAX_ALLERGIES>,
    /// Medications.
    pub medications: Section<Medication, MAX_MEDICATIONS>,
}

impl fmt::Debug for Clinical {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Clinical").finish_non_exhaustive()
    }
}

impl fmt::Debug for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shown")
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

/// Reads the record a grant allows, with the grant's view applied. `Ok(None)` when the
/// patient is on the caseload but not held (see [`Denial::NotHeld`]).
pub fn open(store: &Store, grant: Grant) -> Result<Option<Shown>, StoreError> {
    let Some(r) = store.record(&grant.nhs)? else {
        return Ok(None);
    };
    let mut unreadable = r.unreadable;
    let clinical = match grant.view {
        View::Clinical => Some(Clinical {
            allergies: r.allergies,
            medications: r.medications,
        }),
        View::SocialCare => {
            unreadable.allergies = 0;
            unreadable.medications = 0;
            None
        }
    };
    Ok(Some(Shown {
        nhs_number: r.nhs_number,
        demographics: r.demographics,
        alerts: r.alerts,
        contacts: r.contacts,
        clinical,
        withheld: r.withheld,
        unreadable,
        grant,
    }))
}

#[cfg(test)]
mod tests {
    use sync_protocol::types::{BoundedVec, Text};

    use super::*;

    const T0: u64 = 1_795_507_200_000;

    fn ts(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms).unwrap()
    }

    fn nhs() -> NhsNumber {
        NhsNumber::parse("9434765919").unwrap()
    }

    fn lease(audience: Audience, emergency: bool) -> Lease {
        Lease::new(
            LeaseId(1),
            Text::new("caseload").unwrap(),
            audience,
            View::Clinical,
            ts(T0),
            ts(T0 + 3_600_000),
            600,
            emergency,
            BoundedVec::try_from(vec![nhs()]).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn the_time_box_is_half_open_and_the_offline_limit_counts_from_contact() {
        let p = Policy::new(vec![lease(Audience::Team, false)], Vec::new(), Some(ts(T0)));
        let l = &p.leases()[0];
        assert_eq!(p.standing(l, ts(T0 - 1)), Standing::NotYet(ts(T0)));
        assert_eq!(p.standing(l, ts(T0)), Standing::Active(ts(T0 + 600_000)));
        assert_eq!(
            p.standing(l, ts(T0 + 600_000)),
            Standing::Ended(EndReason::OfflineTooLong)
        );
        let fresh = Policy::new(p.leases().to_vec(), Vec::new(), Some(ts(T0 + 3_500_000)));
        assert_eq!(
            fresh.standing(l, ts(T0 + 3_599_999)),
            Standing::Active(ts(T0 + 3_600_000))
        );
        assert_eq!(
            fresh.standing(l, ts(T0 + 3_600_000)),
            Standing::Ended(EndReason::Expired)
        );
        let never = Policy::new(p.leases().to_vec(), Vec::new(), None);
        assert_eq!(
            never.standing(l, ts(T0)),
            Standing::Ended(EndReason::OfflineTooLong)
        );
    }

    #[test]
    fn ended_access_is_named_as_such_for_its_users_only() {
        let alice = StaffId::new("alice").unwrap();
        let bob = StaffId::new("bob").unwrap();
        let ended = EndedLease {
            id: LeaseId(1),
            audience: Audience::Users(BoundedVec::try_from(vec![alice.clone()]).unwrap()),
            ended_at: ts(T0),
            reason: EndReason::Expired,
        };
        let p = Policy::new(Vec::new(), vec![ended], Some(ts(T0)));
        assert_eq!(
            p.decide_leases(ts(T0), &alice, &Purpose::Treat, &nhs()),
            Err(Denial::AccessEnded(EndReason::Expired))
        );
        assert_eq!(
            p.decide_leases(ts(T0), &bob, &Purpose::Treat, &nhs()),
            Err(Denial::NotOnCaseload)
        );
    }

    #[test]
    fn debug_output_carries_no_patient_or_reason() {
        let p = Policy::new(vec![lease(Audience::Team, true)], Vec::new(), Some(ts(T0)));
        let g = p
            .decide_leases(ts(T0), &StaffId::new("a").unwrap(), &Purpose::Treat, &nhs())
            .unwrap();
        let text = format!(
            "{g:?} {p:?} {:?}",
            Purpose::Emergency("Mrs Smith fell".into())
        );
        assert!(
            !text.contains("9434765919") && !text.contains("Smith"),
            "{text}"
        );
    }
}
