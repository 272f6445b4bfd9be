//! Audit entries and their hash chain.
//!
//! An entry carries its record as the exact bytes the device encoded; the chain hash
//! covers those bytes, so the hub authenticates what it received, never a
//! re-serialisation. The record inside is decoded separately with
//! [`AuditRecord::decode`].

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::codec::decode_canonical;
use crate::error::{DecodeError, FieldError};
use crate::message::View;
use crate::nhs::NhsNumber;
use crate::types::{BoundedVec, Bytes, Hash32, LeaseId, StaffId, Text, Timestamp};

/// Most bytes of one encoded audit record.
pub const MAX_AUDIT_RECORD: usize = 4_096;

/// Domain separation for chain hashes.
const CHAIN_DOMAIN: &[u8] = b"carecache/audit-chain/v1\0";

/// One entry of the device's audit log as it travels.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Sequence number, from 1, without gaps, per device.
    pub seq: u64,
    /// The postcard encoding of an [`AuditRecord`], exactly as hashed.
    pub record: Bytes<MAX_AUDIT_RECORD>,
    /// `chain_hash(previous entry's hash, seq, record)`.
    pub hash: Hash32,
}

impl AuditEntry {
    /// Encode `record` as entry `seq` following `prev`.
    pub fn seal(prev: &Hash32, seq: u64, record: &AuditRecord) -> Result<Self, FieldError> {
        let bytes = postcard::to_allocvec(record)
            .map_err(|_| FieldError::Invalid("audit record not encodable"))?;
        let record = Bytes::try_from(bytes)?;
        let hash = chain_hash(prev, seq, record.as_slice());
        Ok(Self { seq, record, hash })
    }

    /// Whether this entry's hash follows from `prev`.
    pub fn links_from(&self, prev: &Hash32) -> bool {
        chain_hash(prev, self.seq, self.record.as_slice()) == self.hash
    }
}

/// The chain hash of an entry: SHA-256 over the domain string, the previous hash, the
/// sequence (u64 big-endian), the record length (u32 big-endian) and the record bytes.
pub fn chain_hash(prev: &Hash32, seq: u64, record: &[u8]) -> Hash32 {
    let mut h = Sha256::new();
    h.update(CHAIN_DOMAIN);
    h.update(prev.0);
    h.update(seq.to_be_bytes());
    // A record is at most MAX_AUDIT_RECORD bytes; saturate rather than wrap if a
    // caller hashes something larger, so distinct inputs still hash distinctly.
    h.update(
        u32::try_from(record.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    h.update(record);
    Hash32(h.finalize().into())
}

/// Checks that `entries` link one to the next from `prev`. Returns the sequence of the
/// first entry that does not, or the final hash if all do.
pub fn verify_chain<'a>(
    prev: &Hash32,
    entries: impl IntoIterator<Item = &'a AuditEntry>,
) -> Result<Hash32, u64> {
    let mut head = *prev;
    for e in entries {
        if !e.links_from(&head) {
            return Err(e.seq);
        }
        head = e.hash;
    }
    Ok(head)
}

/// Most patients one caseload-list entry names (the API's page size is at most this).
pub const MAX_LISTED: usize = 100;

/// Purpose of use (v3 ActReason).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Purpose {
    /// `TREAT`: direct care under a lease.
    Treat,
    /// `ETREAT`: emergency access outside the caller's lease, with the reason given.
    EmergencyTreat {
        /// Why, as entered by the clinician.
        reason: Text<1024>,
    },
}

/// What was asked for.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum AuditAction {
    /// Listed the caseload.
    ListCaseload,
    /// Searched for a patient by NHS number.
    SearchPatient,
    /// Read demographics.
    ReadPatient,
    /// Read alerts.
    ReadAlerts,
    /// Read allergies.
    ReadAllergies,
    /// Read medications.
    ReadMedications,
    /// Read key contacts.
    ReadContacts,
    /// Read the whole summary.
    ReadSummary,
}

/// Why access was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum DenyReason {
    /// The patient is on no lease the caller holds.
    NotOnCaseload,
    /// The lease has not started.
    LeaseNotYetValid,
    /// The lease has ended.
    LeaseExpired,
    /// The patient objected to sharing.
    Objected,
    /// The user is not in the lease's audience.
    UserNotPermitted,
    /// The lease's view does not include what was asked for.
    ViewNotPermitted,
    /// Too long since the last contact with the hub.
    OfflineTooLong,
    /// Emergency access asked for where no lease allows it, or without a reason.
    EmergencyNotPermitted,
    /// The client token is unknown or revoked.
    ClientNotAuthorised,
    /// No record is held for this patient.
    UnknownPatient,
    /// The request was incomplete or malformed (missing user or purpose, bad NHS
    /// number, emergency access without a reason).
    BadRequest,
    /// Version 4: the device proves staff identity (OpenID Connect) and the request
    /// named no staff session, or one that is unknown, ended or locked.
    StaffNotProven,
    /// Version 4: the request named a staff session opened by another client.
    SessionOfAnotherClient,
}

/// The outcome of an access.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum AuditOutcome {
    /// Data was returned.
    Served,
    /// Refused.
    Denied(DenyReason),
}

/// A part of the record.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum SectionKind {
    /// Identity (name, date of birth, NHS number, ...).
    Demographics,
    /// Alerts (FHIR Flag).
    Alerts,
    /// Allergies.
    Allergies,
    /// Medications.
    Medications,
    /// Key contacts.
    Contacts,
}

/// How much of one section an answer showed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum SectionShown {
    /// This many items.
    Items(u16),
    /// Shown as "none recorded".
    NoneRecorded,
    /// Shown as "information not available".
    NotAvailable,
}

/// One section in an answer, and how much of it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Shown {
    /// Which section.
    pub section: SectionKind,
    /// How much of it.
    pub shown: SectionShown,
}

/// One access through the local API, served or denied. No clinical content.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// The local request id (also in the API response), to tie entries to requests.
    pub request_id: u64,
    /// Name of the client software's registration on this device.
    pub client: Text<64>,
    /// Acting member of staff as the client software said (absent if it did not).
    pub user: Option<StaffId>,
    /// The user's role as the client software said, if it did.
    pub role: Option<Text<64>>,
    /// Purpose of use (absent if the request gave none).
    pub purpose: Option<Purpose>,
    /// What was asked for.
    pub action: AuditAction,
    /// The patient, if the request named one.
    pub patient: Option<NhsNumber>,
    /// The patients a caseload list showed.
    pub listed: BoundedVec<NhsNumber, MAX_LISTED>,
    /// The lease that allowed it, if any.
    pub lease: Option<LeaseId>,
    /// The view applied, if any.
    pub view: Option<View>,
    /// Sections shown and how much of each.
    pub shown: BoundedVec<Shown, 8>,
    /// Items withheld for confidentiality (only their number is shown).
    pub withheld: u16,
    /// Served or denied, and why.
    pub outcome: AuditOutcome,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Access")
            .field("request_id", &self.request_id)
            .field("user", &self.user)
            .field("action", &self.action)
            .field("patient", &self.patient.map(|_| "[redacted]"))
            .field("listed", &self.listed.len())
            .field("lease", &self.lease)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

/// Why a request's client was not let in.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum AuthFailure {
    /// No token presented.
    NoToken,
    /// A token this device never issued.
    UnknownToken,
    /// A token that was revoked.
    RevokedToken,
}

/// Why a lease stopped giving access on the device.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum LeaseEnd {
    /// Its `not_after` passed (trusted time).
    Expired,
    /// Out of contact with the hub for longer than it allows.
    OfflineTooLong,
    /// The hub ended it.
    Hub(crate::message::LeaseEndReason),
}

/// How a sync round ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum SyncOutcome {
    /// Finished: the device holds what the hub allows.
    Ok,
    /// The hub could not be reached or the link broke.
    Offline,
    /// An answer failed the device's checks; nothing of it was applied.
    Rejected,
    /// Anything else.
    Failed,
}

/// A change to the device's keys or to who may use it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum KeyEvent {
    /// The store was unlocked by the daemon.
    Unlocked,
    /// The root key was rotated.
    Rekeyed,
    /// The device enrolled with the hub.
    Enrolled,
    /// A client registration (token) was issued.
    ClientAdded {
        /// Its name.
        name: Text<64>,
    },
    /// A client registration was revoked.
    ClientRevoked {
        /// Its name.
        name: Text<64>,
    },
    /// Version 6: the root key now comes from another kind of source (written with
    /// [`KeyEvent::Rekeyed`] when a rotation changed the kind).
    KeySourceChanged {
        /// The kind before: `passphrase`, `key-file` or `credential`.
        from: Text<32>,
        /// The kind now.
        to: Text<32>,
    },
    /// Version 6: the hub revoked this device; its audit backlog is uploaded (this entry
    /// last), then its keys and data are destroyed.
    WipeOrdered {
        /// Entries waiting for upload when the order came (this one not counted).
        backlog: u32,
    },
    /// Version 6: the device's certificate was renewed (a new key, certified by the
    /// hub over mutual TLS with the old one, confirmed by a hello with the new one).
    CertificateRenewed {
        /// When the new certificate ends.
        not_after: Timestamp,
    },
    /// Version 6: the hub CAs the device pins changed (a CA rollover, at a checkin).
    PinnedCasChanged {
        /// How many CAs are pinned now.
        pinned: u8,
    },
    /// Version 8: the store was bound to an anti-rollback anchor (its first count).
    AnchorBound {
        /// The anchor.
        kind: crate::message::AnchorKind,
    },
    /// Version 8: the store opened was a restored or foreign copy of the data directory;
    /// its patient data and leases were destroyed before anything was served, and the
    /// device syncs from nothing.
    Restored {
        /// What gave it away.
        reason: crate::message::RestoreReason,
        /// Patients destroyed.
        patients: u32,
        /// Leases destroyed.
        leases: u32,
    },
}

impl KeyEvent {
    /// The lowest protocol version that can carry this event.
    pub fn min_version(&self) -> u16 {
        match self {
            Self::KeySourceChanged { .. }
            | Self::WipeOrdered { .. }
            | Self::CertificateRenewed { .. }
            | Self::PinnedCasChanged { .. } => 6,
            Self::AnchorBound { .. } | Self::Restored { .. } => 8,
            _ => 1,
        }
    }
}

/// What an audit entry records.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum AuditEvent {
    /// An access through the local API, served or denied.
    Access(Access),
    /// A request whose client could not be authenticated.
    AuthFailure {
        /// The local request id.
        request_id: u64,
        /// The registration's name, when a revoked token named one.
        client: Option<Text<64>>,
        /// Why.
        reason: AuthFailure,
    },
    /// A lease ended on the device and its patients were purged.
    LeaseEnded {
        /// The lease.
        lease: LeaseId,
        /// Why.
        reason: LeaseEnd,
        /// Patients purged (held by no other lease).
        purged: u32,
    },
    /// A sync round.
    Sync {
        /// How it ended.
        outcome: SyncOutcome,
        /// Batches applied.
        batches: u32,
        /// Records written.
        upserts: u32,
        /// Removals and objections received.
        removals: u32,
        /// Lease changes received.
        lease_changes: u32,
        /// Whether it was a full resync.
        resync: bool,
    },
    /// A key or registration event.
    Key(KeyEvent),
    /// Version 4: an access by a member of staff whose identity the device verified (an
    /// OpenID Connect ID token opened the staff session named). An [`AuditEvent::Access`]
    /// entry's staff id is the one the client software asserted.
    ProvenAccess {
        /// The access, with the staff id and role the verified token gave.
        access: Access,
        /// Who vouched for the staff id, and through which session.
        staff: ProvenStaff,
    },
    /// Version 4: a staff session opened, refused, confirmed or ended.
    Session(SessionEvent),
    /// Version 5: a one-off lookup of a patient on no caseload of this device, asked of
    /// the hub for emergency access.
    Lookup(LookupEvent),
    /// Version 5: requests that failed authentication after the first of their minute,
    /// for one client (as a revoked token named it, or none) and reason, counted rather
    /// than written one by one (the first of the minute is an `AuthFailure` entry of its
    /// own), so that nobody can flood the audit log.
    AuthFailures {
        /// The registration a revoked token named, if any.
        client: Option<Text<64>>,
        /// Why.
        reason: AuthFailure,
        /// The start of the minute (trusted time).
        minute: Timestamp,
        /// How many more failed in that minute (refused with 429 past the limit
        /// included).
        count: u32,
    },
    /// Version 6: trusted time was set from the hub's time bound to a fresh nonce
    /// (SPEC.md §3.9), after the device's clock had run ahead of it.
    ClockCorrected {
        /// Trusted time before.
        from: Timestamp,
        /// Trusted time after (the hub's).
        to: Timestamp,
        /// Leases that had ended on the device in the time skipped, now asked of the
        /// hub again.
        leases_reopened: u32,
    },
    /// Version 7: an operator's command on the device, over the admin channel to the
    /// running daemon or on the data directory with the daemon stopped. Client token
    /// changes are [`KeyEvent`]s of their own.
    Admin {
        /// What was asked.
        command: AdminCommand,
        /// The operator's user id, as the admin channel's peer credentials gave it;
        /// `None` when the command opened the data directory itself.
        uid: Option<u32>,
        /// Whether it was carried out.
        ok: bool,
    },
}

/// Version 7: an operator's command (see [`AuditEvent::Admin`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum AdminCommand {
    /// The device's status was read.
    Status,
    /// A sync round was started by hand.
    SyncNow,
    /// The client registrations were listed.
    ClientsList,
    /// The leases were listed.
    Leases,
    /// The last entries of the audit trail were shown.
    AuditTail {
        /// How many were asked for.
        lines: u32,
    },
    /// The audit chain was checked.
    AuditVerify,
    /// The audit entries held were exported.
    AuditExport,
}

impl AdminCommand {
    /// The command as the CLI spells it.
    pub fn words(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::SyncNow => "sync",
            Self::ClientsList => "clients list",
            Self::Leases => "leases",
            Self::AuditTail { .. } => "audit tail",
            Self::AuditVerify => "audit verify",
            Self::AuditExport => "audit export",
        }
    }
}

/// Version 5: a lookup asked of the hub.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupEvent {
    /// The local request id.
    pub request_id: u64,
    /// The client registration that asked.
    pub client: Text<64>,
    /// The member of staff, as the request named them.
    pub user: StaffId,
    /// How the staff id was proven, when a staff session carried it.
    pub proven: Option<ProvenStaff>,
    /// The patient.
    pub patient: NhsNumber,
    /// The caller's lease the lookup was asked under (the one allowing emergency
    /// access), if any.
    pub under: Option<LeaseId>,
    /// Why, as the member of staff gave it.
    pub reason: Text<1024>,
    /// What came of it.
    pub outcome: LookupOutcome,
}

impl fmt::Debug for LookupEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LookupEvent")
            .field("request_id", &self.request_id)
            .field("under", &self.under)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

/// What came of a lookup.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum LookupOutcome {
    /// The hub granted a lease for the patient alone, held on the device until it ends.
    Granted {
        /// The new lease.
        lease: LeaseId,
        /// When it ends.
        not_after: Timestamp,
    },
    /// The device could not reach the hub.
    Offline,
    /// No lease of the caller on this device allows emergency access.
    NotPermitted,
    /// The hub cannot give the patient (unknown, objected or not shareable: one answer).
    NotAvailable,
    /// The hub does not speak version 5.
    HubTooOld,
    /// Anything else (the hub's answer was refused, or it failed).
    Failed,
}

/// How a staff id was proven: the identity provider's word, carried by a session.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ProvenStaff {
    /// The ID token's issuer (`iss`).
    pub issuer: Text<256>,
    /// The ID token's subject (`sub`).
    pub subject: Text<256>,
    /// The staff session the request named (its public id, not its secret).
    pub session: u64,
}

/// Where a staff session's ID token came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum SignInRoute {
    /// The client software signed its user in and handed over the ID token.
    Client,
    /// The device's own viewer ran the sign-in (authorization code with PKCE).
    Viewer,
}

/// Why an ID token or a staff-session step was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum SessionRefusal {
    /// Not a JWT, or its parts are not what the standard says.
    Malformed,
    /// Its algorithm is not one allowed (`none`, HMAC, or not configured).
    AlgorithmNotAllowed,
    /// Signed with a key the issuer does not publish (after a refresh, if online).
    UnknownKey,
    /// The signature does not verify.
    BadSignature,
    /// Issued by another issuer.
    WrongIssuer,
    /// Issued for another audience.
    WrongAudience,
    /// Expired (in trusted time).
    Expired,
    /// Issued in the future, or not valid yet (in trusted time).
    NotYetValid,
    /// Issued too long ago to open a session.
    TooOld,
    /// Already used to open a session.
    Replayed,
    /// The configured staff claim is missing or not a staff id.
    NoStaffClaim,
    /// No lease on the device names this member of staff.
    NoLease,
    /// The PIN set at sign-in is too short or too long.
    BadPin,
    /// The issuer's keys are not held and could not be fetched.
    KeysUnavailable,
    /// The sign-in's state or nonce did not match (the viewer's own sign-in).
    NonceMismatch,
}

/// Why a staff session ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum SessionEnd {
    /// Its time (the shift, or the lease) ran out.
    Expired,
    /// The member of staff signed out.
    SignedOut,
    /// Too many wrong PINs.
    LockedOut,
}

/// A staff-session event (version 4).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum SessionEvent {
    /// A verified ID token opened a session.
    Opened {
        /// The session's public id.
        session: u64,
        /// The client registration it is bound to.
        client: Text<64>,
        /// The staff id the token proved.
        user: StaffId,
        /// The role the token carried, if any.
        role: Option<Text<64>>,
        /// Issuer and subject.
        staff: ProvenStaff,
        /// When it ends (trusted time).
        expires: Timestamp,
        /// Who ran the sign-in.
        route: SignInRoute,
    },
    /// An ID token or a session step was refused.
    Refused {
        /// The client registration that asked.
        client: Text<64>,
        /// The session concerned, if one was named.
        session: Option<u64>,
        /// Why.
        reason: SessionRefusal,
    },
    /// A wrong PIN was given to confirm a locked session.
    WrongPin {
        /// The session.
        session: u64,
        /// Wrong attempts so far.
        attempts: u8,
    },
    /// The right PIN confirmed a session locked after idle time or a restart.
    Confirmed {
        /// The session.
        session: u64,
    },
    /// A session ended.
    Ended {
        /// The session.
        session: u64,
        /// Why.
        reason: SessionEnd,
    },
}

/// One entry's content, as logged on the device before the access is answered.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When, in trusted time (never runs backwards).
    pub at: Timestamp,
    /// The device's wall clock at the same moment.
    pub wall: Timestamp,
    /// What happened.
    pub event: AuditEvent,
}

impl AuditRecord {
    /// Decode one record from an entry's bytes, refusing trailing or non-canonical
    /// bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_canonical(bytes)
    }

    /// The access, if this entry records one (asserted or proven staff).
    pub fn access(&self) -> Option<&Access> {
        match &self.event {
            AuditEvent::Access(a) | AuditEvent::ProvenAccess { access: a, .. } => Some(a),
            _ => None,
        }
    }

    /// The lowest protocol version whose peers can read this record: 4 for the staff
    /// identity events and reasons, 1 otherwise. A device does not push a record to a
    /// hub that negotiated a lower version.
    pub fn min_version(&self) -> u16 {
        match &self.event {
            AuditEvent::Admin { .. } => 7,
            AuditEvent::ClockCorrected { .. } => 6,
            AuditEvent::Key(k) => k.min_version(),
            AuditEvent::Lookup(_) | AuditEvent::AuthFailures { .. } => 5,
            AuditEvent::ProvenAccess { .. } | AuditEvent::Session(_) => 4,
            AuditEvent::Access(a) => match a.outcome {
                AuditOutcome::Denied(
                    DenyReason::StaffNotProven | DenyReason::SessionOfAnotherClient,
                ) => 4,
                _ => 1,
            },
            _ => 1,
        }
    }

    /// Whether this entry concerns `nhs` (a read, search or caseload list naming them).
    pub fn concerns(&self, nhs: &NhsNumber) -> bool {
        if let AuditEvent::Lookup(l) = &self.event {
            return l.patient == *nhs;
        }
        self.access()
            .is_some_and(|a| a.patient.as_ref() == Some(nhs) || a.listed.contains(nhs))
    }
}
