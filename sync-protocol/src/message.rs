//! The v1 messages. Field order is the wire order; fields and variants are only ever
//! appended, and only in a new protocol version (SPEC.md, "Evolution").

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::audit::AuditEntry;
use crate::error::FieldError;
use crate::nhs::NhsNumber;
use crate::record::{PatientRecord, v1, v2};
use crate::types::{
    BoundedVec, Bytes, Capabilities, Cursor, DeviceId, EnrolmentToken, Hash32, LeaseId,
    RecordVersion, StaffId, Text, Timestamp, deserialize_via,
};

/// Most objection changes in one batch.
pub const MAX_BATCH_OBJECTIONS: usize = 200_000;
/// Most lease changes in one batch.
pub const MAX_BATCH_LEASES: usize = 1_024;
/// Most record upserts in one batch.
pub const MAX_BATCH_UPSERTS: usize = 100_000;
/// Most record removals in one batch.
pub const MAX_BATCH_REMOVALS: usize = 200_000;
/// Most patients one lease names.
pub const MAX_LEASE_PATIENTS: usize = 500_000;
/// Most named users on one lease.
pub const MAX_LEASE_USERS: usize = 1_024;
/// Most audit entries in one push.
pub const MAX_AUDIT_ENTRIES: usize = 4_096;
/// Most bytes of one DER certificate or CSR.
pub const MAX_DER: usize = 16_384;
/// Most patients one pull may ask for by name (version 5).
pub const MAX_PULL_WANT: usize = 8_192;
/// Most offers in one batch (version 5).
pub const MAX_BATCH_OFFERS: usize = 200_000;

/// The message kinds, as numbered in the frame header.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum MessageKind {
    /// Device → hub, first contact: one-time token and CSR.
    EnrolRequest = 1,
    /// Hub → device: the signed client certificate.
    EnrolResponse = 2,
    /// Device → hub: versions and capabilities.
    Hello = 3,
    /// Hub → device: chosen version, hub time.
    Welcome = 4,
    /// Device → hub: give me changes after this cursor.
    Pull = 5,
    /// Hub → device: one batch of changes.
    Batch = 6,
    /// Device → hub: a run of audit entries.
    PushAudit = 7,
    /// Hub → device: audit stored durably up to a sequence.
    AuditAck = 8,
    /// Either way: a request failed.
    Error = 9,
    /// Device → hub (version 5): one patient not on any caseload, for emergency access.
    Lookup = 10,
    /// Hub → device (version 5): a short lease granted for the looked-up patient.
    LookupGranted = 11,
    /// Device → hub (version 6): a fresh nonce and the device's health report.
    Checkin = 12,
    /// Hub → device (version 6): the nonce back, with hub time bound to it.
    CheckinAnswer = 13,
    /// Device → hub (version 6): a certificate request for a new key, over mutual TLS
    /// with the current certificate.
    Renew = 14,
    /// Hub → device (version 6): the renewed certificate.
    Renewed = 15,
}

impl MessageKind {
    /// Every kind, in numbering order.
    pub const ALL: [Self; 15] = [
        Self::EnrolRequest,
        Self::EnrolResponse,
        Self::Hello,
        Self::Welcome,
        Self::Pull,
        Self::Batch,
        Self::PushAudit,
        Self::AuditAck,
        Self::Error,
        Self::Lookup,
        Self::LookupGranted,
        Self::Checkin,
        Self::CheckinAnswer,
        Self::Renew,
        Self::Renewed,
    ];

    /// The kind for a header byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| *k as u8 == b)
    }

    /// Largest payload (after decompression) this kind may have, in bytes.
    pub fn max_payload(self) -> u32 {
        match self {
            Self::EnrolRequest => 32 * 1024,
            Self::EnrolResponse => 96 * 1024,
            Self::Hello | Self::Welcome | Self::AuditAck => 1024,
            Self::Lookup => 2048,
            // Version 6: the CAs to pin, up to four DER certificates.
            Self::CheckinAnswer => 4 * 16_384 + 1024,
            Self::Checkin => 2048,
            Self::Renew => 32 * 1024,
            Self::Renewed => 96 * 1024,
            Self::LookupGranted => 1024 * 1024,
            // Version 5: a pull may name up to `MAX_PULL_WANT` patients.
            Self::Pull => 64 * 1024,
            Self::Batch => 16 * 1024 * 1024,
            Self::PushAudit => 20 * 1024 * 1024,
            Self::Error => 4 * 1024,
        }
    }

    /// Whether this kind may be sent compressed. Only the bulky ones may.
    pub fn compressible(self) -> bool {
        matches!(self, Self::Batch | Self::PushAudit | Self::LookupGranted)
    }

    /// The lower-case name used in SPEC.md and vector files.
    pub fn name(self) -> &'static str {
        match self {
            Self::EnrolRequest => "enrol-request",
            Self::EnrolResponse => "enrol-response",
            Self::Hello => "hello",
            Self::Welcome => "welcome",
            Self::Pull => "pull",
            Self::Batch => "batch",
            Self::PushAudit => "push-audit",
            Self::AuditAck => "audit-ack",
            Self::Error => "error",
            Self::Lookup => "lookup",
            Self::LookupGranted => "lookup-granted",
            Self::Checkin => "checkin",
            Self::CheckinAnswer => "checkin-answer",
            Self::Renew => "renew",
            Self::Renewed => "renewed",
        }
    }

    /// The first protocol version that has this kind.
    pub fn since_version(self) -> u16 {
        match self {
            Self::Lookup | Self::LookupGranted => 5,
            Self::Checkin | Self::CheckinAnswer | Self::Renew | Self::Renewed => 6,
            _ => 1,
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Any v1 message.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Message {
    /// See [`EnrolRequest`].
    EnrolRequest(EnrolRequest),
    /// See [`EnrolResponse`].
    EnrolResponse(EnrolResponse),
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Pull`].
    Pull(Pull),
    /// See [`Batch`].
    Batch(Batch),
    /// See [`PushAudit`].
    PushAudit(PushAudit),
    /// See [`AuditAck`].
    AuditAck(AuditAck),
    /// See [`ErrorMessage`].
    Error(ErrorMessage),
    /// See [`Lookup`].
    Lookup(Lookup),
    /// See [`LookupGranted`] (boxed: it carries a whole record).
    LookupGranted(Box<LookupGranted>),
    /// See [`Checkin`].
    Checkin(Checkin),
    /// See [`CheckinAnswer`].
    CheckinAnswer(CheckinAnswer),
    /// See [`Renew`].
    Renew(Renew),
    /// See [`Renewed`].
    Renewed(Renewed),
}

impl Message {
    /// This message's kind.
    pub fn kind(&self) -> MessageKind {
        match self {
            Self::EnrolRequest(_) => MessageKind::EnrolRequest,
            Self::EnrolResponse(_) => MessageKind::EnrolResponse,
            Self::Hello(_) => MessageKind::Hello,
            Self::Welcome(_) => MessageKind::Welcome,
            Self::Pull(_) => MessageKind::Pull,
            Self::Batch(_) => MessageKind::Batch,
            Self::PushAudit(_) => MessageKind::PushAudit,
            Self::AuditAck(_) => MessageKind::AuditAck,
            Self::Error(_) => MessageKind::Error,
            Self::Lookup(_) => MessageKind::Lookup,
            Self::LookupGranted(_) => MessageKind::LookupGranted,
            Self::Checkin(_) => MessageKind::Checkin,
            Self::CheckinAnswer(_) => MessageKind::CheckinAnswer,
            Self::Renew(_) => MessageKind::Renew,
            Self::Renewed(_) => MessageKind::Renewed,
        }
    }
}

/// Device → hub over server-authenticated TLS (no client certificate yet): a one-time
/// token from the administrator and a PKCS#10 certificate signing request.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct EnrolRequest {
    /// One-time enrolment token.
    pub token: EnrolmentToken,
    /// DER-encoded PKCS#10 CSR for the device's own key.
    pub csr_der: Bytes<MAX_DER>,
    /// A label for the administrator, e.g. the vehicle call sign.
    pub device_label: Text<64>,
}

/// Hub → device: the device's identity and its certificate.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct EnrolResponse {
    /// The device id the hub assigned (also in the certificate).
    pub device_id: DeviceId,
    /// DER-encoded client certificate.
    pub certificate_der: Bytes<MAX_DER>,
    /// DER-encoded issuing chain, leaf's issuer first, up to the pinned CA.
    pub chain_der: BoundedVec<Bytes<MAX_DER>, 4>,
    /// Hub time at issue.
    pub hub_time: Timestamp,
}

/// Device → hub: the versions and features the device speaks. Always sent in a
/// version-1 frame, so any hub can read it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct Hello {
    /// Lowest protocol version the device speaks (≥ 1).
    pub min_version: u16,
    /// Highest protocol version the device speaks (≥ `min_version`).
    pub max_version: u16,
    /// Features the device supports.
    pub capabilities: Capabilities,
    /// The device's trusted time.
    pub device_time: Timestamp,
    /// Software name and version, for the hub's fleet view.
    pub software: Text<64>,
}

#[derive(Deserialize)]
struct RawHello {
    min_version: u16,
    max_version: u16,
    capabilities: Capabilities,
    device_time: Timestamp,
    software: Text<64>,
}

impl TryFrom<RawHello> for Hello {
    type Error = FieldError;
    fn try_from(r: RawHello) -> Result<Self, FieldError> {
        if r.min_version == 0 || r.min_version > r.max_version {
            return Err(FieldError::Inconsistent("version range"));
        }
        Ok(Self {
            min_version: r.min_version,
            max_version: r.max_version,
            capabilities: r.capabilities,
            device_time: r.device_time,
            software: r.software,
        })
    }
}
deserialize_via!(Hello, RawHello);

/// Hub → device: the chosen version and the hub's view of the device.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Welcome {
    /// The version both sides now use: the highest both speak.
    pub version: u16,
    /// Features the hub supports (the intersection applies).
    pub capabilities: Capabilities,
    /// Hub time, for the device's trusted clock.
    pub hub_time: Timestamp,
    /// The device as the hub knows it (from its certificate).
    pub device_id: DeviceId,
    /// The largest batch payload the hub will send, whatever the device asks.
    pub max_batch_bytes: u32,
    /// Highest audit sequence the hub holds durably for this device (0: none), so an
    /// upload resumes after it.
    pub audit_durable_through: u64,
}

/// Device → hub: send the changes after `cursor`, within `max_bytes`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct Pull {
    /// Last committed cursor; `None` on first sync or after a reset.
    pub cursor: Option<Cursor>,
    /// Most payload bytes (uncompressed) the device accepts in the batch; at least
    /// [`Pull::MIN_BUDGET`], at most the batch limit.
    pub max_bytes: u32,
    /// Version 5: how many patients the device holds now. With none, the hub sends
    /// records outright; otherwise it offers the patients new to the device's view by
    /// version, so that a device keeps what it already holds (SPEC.md §3.4).
    pub holding: u32,
    /// Version 5: patients offered earlier in this round whose record the device lacks
    /// or holds in another version, oldest offer first.
    pub want: BoundedVec<NhsNumber, MAX_PULL_WANT>,
}

impl Pull {
    /// Smallest byte budget: one maximal record must always fit.
    pub const MIN_BUDGET: u32 = 256 * 1024;

    /// A pull that holds nothing and wants nothing (what every version before 5 sends).
    pub fn new(cursor: Option<Cursor>, max_bytes: u32) -> Self {
        Self {
            cursor,
            max_bytes,
            holding: 0,
            want: BoundedVec::new(),
        }
    }
}

#[derive(Deserialize)]
struct RawPull {
    cursor: Option<Cursor>,
    max_bytes: u32,
    holding: u32,
    want: BoundedVec<NhsNumber, MAX_PULL_WANT>,
}

/// A pull as versions 1 to 4 carry it.
#[derive(Serialize, Deserialize)]
pub(crate) struct PullV1 {
    cursor: Option<Cursor>,
    max_bytes: u32,
}

impl PullV1 {
    pub(crate) fn upgrade(self) -> Result<Pull, FieldError> {
        Pull::try_from(RawPull {
            cursor: self.cursor,
            max_bytes: self.max_bytes,
            holding: 0,
            want: BoundedVec::new(),
        })
    }

    /// The pull as an earlier version carries it: `holding` is a hint and is dropped;
    /// a pull naming wanted patients cannot be said.
    pub(crate) fn downgrade(p: &Pull) -> Result<Self, FieldError> {
        if !p.want.is_empty() {
            return Err(FieldError::Invalid("wanted patients need version 5"));
        }
        Ok(Self {
            cursor: p.cursor.clone(),
            max_bytes: p.max_bytes,
        })
    }
}

impl TryFrom<RawPull> for Pull {
    type Error = FieldError;
    fn try_from(r: RawPull) -> Result<Self, FieldError> {
        if r.max_bytes < Self::MIN_BUDGET || r.max_bytes > MessageKind::Batch.max_payload() {
            return Err(FieldError::Invalid("pull byte budget out of range"));
        }
        let mut seen = HashSet::new();
        if !r.want.iter().all(|n| seen.insert(*n)) {
            return Err(FieldError::Inconsistent("patient wanted twice"));
        }
        Ok(Self {
            cursor: r.cursor,
            max_bytes: r.max_bytes,
            holding: r.holding,
            want: r.want,
        })
    }
}
deserialize_via!(Pull, RawPull);

/// Version 5: a patient new to the device's view, by record version. The device keeps
/// the record it holds if it has this version, and names the patient in its next pull's
/// `want` otherwise.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Offer {
    /// The patient.
    pub nhs_number: NhsNumber,
    /// The version the hub holds now.
    pub version: RecordVersion,
}

/// Device → hub (version 5): emergency access to one patient on no caseload of this
/// device. The hub checks that `lease` is one of this device's, allows emergency access
/// and names `staff` (or the whole team), checks the patient's objections and sharing,
/// and grants a short lease for the patient alone to this device and that member of
/// staff, flagged for review.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lookup {
    /// The patient.
    pub nhs_number: NhsNumber,
    /// The device's lease under which the caller asks.
    pub lease: LeaseId,
    /// Who asks.
    pub staff: StaffId,
    /// Why, as the member of staff gave it.
    pub reason: Text<1024>,
}

impl fmt::Debug for Lookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The patient and the reason stay out of logs.
        f.debug_struct("Lookup")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// Hub → device (version 5): the lease granted for a lookup — for the one patient, to
/// this device and the member of staff who asked — with the patient's record as it is
/// now. The device checks and applies both as it would a batch; its next pull names
/// the lease again (granted) and offers the record, which it already holds.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct LookupGranted {
    /// The new lease.
    pub lease: Lease,
    /// The patient's record.
    pub record: PatientRecord,
}

impl fmt::Debug for LookupGranted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LookupGranted")
            .field("lease", &self.lease.id)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct RawLookupGranted {
    lease: Lease,
    record: PatientRecord,
}

impl TryFrom<RawLookupGranted> for LookupGranted {
    type Error = FieldError;
    fn try_from(r: RawLookupGranted) -> Result<Self, FieldError> {
        if r.lease.patients.len() != 1 || r.lease.patients.first() != Some(&r.record.nhs_number) {
            return Err(FieldError::Inconsistent(
                "a lookup lease names exactly the patient looked up",
            ));
        }
        Ok(Self {
            lease: r.lease,
            record: r.record,
        })
    }
}
deserialize_via!(LookupGranted, RawLookupGranted);

impl LookupGranted {
    /// A grant, checked as on receipt: the lease names exactly the record's patient.
    pub fn try_from_parts(lease: Lease, record: PatientRecord) -> Result<Self, FieldError> {
        Self::try_from(RawLookupGranted { lease, record })
    }
}

/// Device → hub (version 6), after `welcome` in every sync, and alone from a device
/// being wiped: 32 fresh random bytes, and how the device is (never patient data). The
/// hub records the report for its fleet view and answers with its time bound to the
/// nonce, which is what lets a device whose clock ran ahead correct it (SPEC.md §3.9).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Checkin {
    /// Fresh random bytes, never sent twice.
    pub nonce: Hash32,
    /// The device's health.
    pub health: Health,
    /// Version 8: the device's anti-rollback anchor and any restored copy it found
    /// (`None` in a version-6 or 7 checkin).
    pub anchor: Option<AnchorReport>,
}

/// The checkin of versions 6 and 7 (no anchor report).
#[derive(Serialize, Deserialize)]
pub(crate) struct CheckinV6 {
    pub(crate) nonce: Hash32,
    pub(crate) health: Health,
}

impl CheckinV6 {
    pub(crate) fn upgrade(self) -> Checkin {
        Checkin {
            nonce: self.nonce,
            health: self.health,
            anchor: None,
        }
    }

    pub(crate) fn downgrade(c: &Checkin) -> Self {
        Self {
            nonce: c.nonce,
            health: c.health.clone(),
        }
    }
}

/// What binds a device's store to time outside the copy (version 8, SPEC.md §3.9): a
/// monotonic counter that a copy of the data directory cannot take back with it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct AnchorReport {
    /// The kind of anchor.
    pub kind: AnchorKind,
    /// The anchor could not be read or advanced at the device's last try: the device
    /// serves no patient data while it cannot check (a read), or purges go unprotected
    /// until it can advance (an advance).
    pub unavailable: bool,
    /// A restored or foreign copy of the data directory the device found and destroyed,
    /// reported until the hub has answered a checkin that carried it.
    pub restored: Option<RestoreReport>,
}

/// The kind of anti-rollback anchor a device has.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum AnchorKind {
    /// None: a restored copy of the data directory is not detected.
    None,
    /// A counter file outside the data directory: detects a restored copy of the data
    /// directory alone, not of the whole disk.
    File,
    /// A TPM 2.0 NV counter: detects a restored copy of the data directory or the disk.
    Tpm,
}

impl AnchorKind {
    /// A short stable name, for JSON and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::File => "file",
            Self::Tpm => "tpm",
        }
    }
}

/// A restored copy the device found at open: its patient data and leases destroyed
/// before anything was served, then a sync from nothing.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RestoreReport {
    /// When (device trusted time).
    pub detected_at: Timestamp,
    /// What gave it away.
    pub reason: RestoreReason,
}

/// Why a device judged its store to be a restored or foreign copy.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum RestoreReason {
    /// The store's count is behind the anchor's: purges happened after this copy was
    /// taken.
    Behind,
    /// The anchor is behind the store or gone (a TPM cleared, a counter file replaced,
    /// the directory moved to another machine).
    AnchorLost,
    /// The store was never bound, but this machine's anchor already counts for a store
    /// (a copy from before the binding).
    Unbound,
}

impl RestoreReason {
    /// A short stable name, for JSON and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Behind => "behind",
            Self::AnchorLost => "anchor-lost",
            Self::Unbound => "unbound",
        }
    }
}

/// Hub → device (version 6): the checkin's nonce and the hub's time when it answered,
/// and the CA certificates the device is to pin from now on (a CA rollover: old and new
/// during the overlap, then the new alone).
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct CheckinAnswer {
    /// The nonce the checkin carried.
    pub nonce: Hash32,
    /// Hub time.
    pub hub_time: Timestamp,
    /// DER CA certificates to pin (at least one).
    pub trust: BoundedVec<Bytes<MAX_DER>, 4>,
}

#[derive(Deserialize)]
struct RawCheckinAnswer {
    nonce: Hash32,
    hub_time: Timestamp,
    trust: BoundedVec<Bytes<MAX_DER>, 4>,
}

impl TryFrom<RawCheckinAnswer> for CheckinAnswer {
    type Error = FieldError;
    fn try_from(r: RawCheckinAnswer) -> Result<Self, FieldError> {
        if r.trust.is_empty() {
            return Err(FieldError::Inconsistent(
                "a checkin answer names a CA to pin",
            ));
        }
        Ok(Self {
            nonce: r.nonce,
            hub_time: r.hub_time,
            trust: r.trust,
        })
    }
}
deserialize_via!(CheckinAnswer, RawCheckinAnswer);

/// Device → hub (version 6): a PKCS#10 request for a new key pair, sent over mutual TLS
/// with the device's current certificate, well before that one ends. The hub certifies
/// the new key for the same device; the old certificate keeps working until it expires.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Renew {
    /// DER-encoded PKCS#10 CSR for the new key.
    pub csr_der: Bytes<MAX_DER>,
}

/// Hub → device (version 6): the renewed certificate.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Renewed {
    /// The device (as before).
    pub device_id: DeviceId,
    /// DER-encoded client certificate for the new key.
    pub certificate_der: Bytes<MAX_DER>,
}

/// A device's health, as its checkin reports it (version 6). Counts and times only.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Health {
    /// Bytes the device's store takes on disk.
    pub store_bytes: u64,
    /// Patients whose records the device holds.
    pub patients_held: u32,
    /// Audit entries written but not yet acknowledged by the hub.
    pub audit_backlog: u32,
    /// When the oldest of those was written (device trusted time).
    pub audit_oldest: Option<Timestamp>,
    /// The last audit sequence the device has written (0: none).
    pub audit_last_seq: u64,
    /// When the device's certificate expires.
    pub certificate_not_after: Option<Timestamp>,
    /// Trusted time minus the device's wall clock, in seconds (positive: the wall clock
    /// is behind).
    pub clock_offset_secs: i64,
    /// What went wrong in the device's last sync, if it failed.
    pub last_error: Option<HealthError>,
    /// The device was revoked and is destroying its data: this is its last report, sent
    /// after its audit upload (`audit_backlog` is what it could not upload).
    pub wiping: bool,
}

/// The class of a device's last sync failure, for the fleet view.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum HealthError {
    /// The hub could not be reached.
    Offline,
    /// An answer failed the device's checks.
    Rejected,
    /// The hub's time was too far from the device's.
    Clock,
    /// The device's store failed (disk full, damaged).
    Storage,
    /// The audit upload failed.
    Audit,
    /// The device's certificate is expired or refused.
    Certificate,
    /// Anything else.
    Other,
}

impl HealthError {
    /// A short stable name, for the hub's JSON and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Offline => "offline",
            Self::Rejected => "rejected",
            Self::Clock => "clock",
            Self::Storage => "storage",
            Self::Audit => "audit",
            Self::Certificate => "certificate",
            Self::Other => "other",
        }
    }
}

/// A change to a patient's objection to sharing.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ObjectionChange {
    /// The patient.
    pub nhs_number: NhsNumber,
    /// New state.
    pub status: ObjectionStatus,
    /// When the source recorded the change.
    pub recorded_at: Timestamp,
}

/// Objection state.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ObjectionStatus {
    /// The patient objects: purge and refuse, whatever any lease says.
    Objected,
    /// The objection was withdrawn: access follows the leases again.
    Withdrawn,
}

/// Which parts of a record a lease's users see.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum View {
    /// Alerts, allergies, medications, contacts.
    Clinical,
    /// Alerts and key contacts only.
    SocialCare,
}

/// Who may look under a lease.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Audience {
    /// Any member of the device's team.
    Team,
    /// Only these staff.
    Users(BoundedVec<StaffId, MAX_LEASE_USERS>),
}

/// What the hub grants a device: patients, a time box, an audience, a view.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    /// Lease id.
    pub id: LeaseId,
    /// Human label, e.g. "District nursing caseload — Tettenhall".
    pub label: Text<128>,
    /// Who may look.
    pub audience: Audience,
    /// What they see.
    pub view: View,
    /// Not valid before.
    pub not_before: Timestamp,
    /// Not valid from this instant on (exclusive).
    pub not_after: Timestamp,
    /// Longest time without contact with the hub before access stops, in seconds.
    pub max_offline_secs: u32,
    /// Whether emergency access (ETREAT) to other cached patients is allowed.
    pub emergency_access: bool,
    /// The patients.
    pub patients: BoundedVec<NhsNumber, MAX_LEASE_PATIENTS>,
}

#[derive(Deserialize)]
struct RawLease {
    id: LeaseId,
    label: Text<128>,
    audience: Audience,
    view: View,
    not_before: Timestamp,
    not_after: Timestamp,
    max_offline_secs: u32,
    emergency_access: bool,
    patients: BoundedVec<NhsNumber, MAX_LEASE_PATIENTS>,
}

impl TryFrom<RawLease> for Lease {
    type Error = FieldError;
    fn try_from(r: RawLease) -> Result<Self, FieldError> {
        if r.not_before >= r.not_after {
            return Err(FieldError::Inconsistent("lease ends before it starts"));
        }
        if r.max_offline_secs < 60 {
            return Err(FieldError::Invalid("lease max offline under 60 s"));
        }
        Ok(Self {
            id: r.id,
            label: r.label,
            audience: r.audience,
            view: r.view,
            not_before: r.not_before,
            not_after: r.not_after,
            max_offline_secs: r.max_offline_secs,
            emergency_access: r.emergency_access,
            patients: r.patients,
        })
    }
}
deserialize_via!(Lease, RawLease);

impl Lease {
    /// Build a lease, checking its time box and offline limit.
    #[allow(clippy::too_many_arguments)] // Mirrors the wire struct one field per argument.
    pub fn new(
        id: LeaseId,
        label: Text<128>,
        audience: Audience,
        view: View,
        not_before: Timestamp,
        not_after: Timestamp,
        max_offline_secs: u32,
        emergency_access: bool,
        patients: BoundedVec<NhsNumber, MAX_LEASE_PATIENTS>,
    ) -> Result<Self, FieldError> {
        Self::try_from(RawLease {
            id,
            label,
            audience,
            view,
            not_before,
            not_after,
            max_offline_secs,
            emergency_access,
            patients,
        })
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.id)
            .field("audience", &self.audience)
            .field("view", &self.view)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("max_offline_secs", &self.max_offline_secs)
            .field("emergency_access", &self.emergency_access)
            .field("patients", &self.patients.len())
            .finish_non_exhaustive()
    }
}

/// Why a lease ended early.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum LeaseEndReason {
    /// Revoked by an administrator.
    Revoked,
    /// The assignment (shift, caseload) ended.
    AssignmentEnded,
    /// Replaced by another lease.
    Superseded,
}

/// A change to the device's leases.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum LeaseChange {
    /// A new lease.
    Granted(Lease),
    /// New terms for an existing lease (extension, patients added or removed).
    Changed(Lease),
    /// The lease ends now: deny at once, purge its data.
    Revoked {
        /// The lease.
        id: LeaseId,
        /// Why.
        reason: LeaseEndReason,
    },
}

impl LeaseChange {
    /// The lease this change is about.
    pub fn lease_id(&self) -> LeaseId {
        match self {
            Self::Granted(l) | Self::Changed(l) => l.id,
            Self::Revoked { id, .. } => *id,
        }
    }
}

/// Why a record leaves the device.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum RemovalReason {
    /// The patient objected.
    Objection,
    /// The patient left the caseload.
    LeftCaseload,
    /// The lease that held the patient ended.
    LeaseEnded,
    /// The record is now sensitive (e.g. became restricted).
    Sensitive,
    /// The upstream record was deleted or invalidated.
    DeletedUpstream,
}

/// A record that must leave the device.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Removal {
    /// The patient.
    pub nhs_number: NhsNumber,
    /// Why.
    pub reason: RemovalReason,
}

/// A digest of everything the device may hold once it has applied the batch: for each
/// allowed patient its NHS number and record version. See [`crate::digest`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct AllowedSetDigest {
    /// Number of patients in the set.
    pub patients: u32,
    /// SHA-256 over the sorted set.
    pub sha256: Hash32,
}

/// Hub → device: one batch of changes. Sections apply in field order: objections,
/// then leases, then upserts and removals. Applied whole or not at all.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct Batch {
    /// Objection changes: applied first.
    pub objections: BoundedVec<ObjectionChange, MAX_BATCH_OBJECTIONS>,
    /// Lease grants, changes and revocations.
    pub leases: BoundedVec<LeaseChange, MAX_BATCH_LEASES>,
    /// Whole records to store (replacing any older version).
    pub upserts: BoundedVec<PatientRecord, MAX_BATCH_UPSERTS>,
    /// Records to purge.
    pub removals: BoundedVec<Removal, MAX_BATCH_REMOVALS>,
    /// The cursor to send next; commit it with this batch.
    pub next_cursor: Cursor,
    /// More changes are waiting: pull again at once.
    pub more: bool,
    /// Hub time.
    pub hub_time: Timestamp,
    /// What the device should hold after applying this batch.
    pub allowed: AllowedSetDigest,
    /// Version 5: patients new to the device's view, by version (sent only to a device
    /// that said it holds patients).
    pub offers: BoundedVec<Offer, MAX_BATCH_OFFERS>,
    /// Version 5: how many of the pull's `want`, from the first, this batch answers
    /// (each with its record, a removal, or nothing when the patient is no longer the
    /// device's to hold).
    pub wants_done: u32,
    /// Version 5: how many patients the device will hold when this round is complete,
    /// as the hub counted at the round's start (for progress; the digest decides).
    pub expected: u32,
}

/// A batch as versions 1 to 4 carry it, with records of one protocol version: `R` is
/// [`PatientRecord`] for versions 3 and 4, [`v2::PatientRecord`] for version 2 and
/// [`v1::PatientRecord`] for version 1.
#[derive(Serialize, Deserialize)]
pub(crate) struct WireBatch<R> {
    objections: BoundedVec<ObjectionChange, MAX_BATCH_OBJECTIONS>,
    leases: BoundedVec<LeaseChange, MAX_BATCH_LEASES>,
    upserts: BoundedVec<R, MAX_BATCH_UPSERTS>,
    removals: BoundedVec<Removal, MAX_BATCH_REMOVALS>,
    next_cursor: Cursor,
    more: bool,
    hub_time: Timestamp,
    allowed: AllowedSetDigest,
}

#[derive(Deserialize)]
struct RawBatch {
    objections: BoundedVec<ObjectionChange, MAX_BATCH_OBJECTIONS>,
    leases: BoundedVec<LeaseChange, MAX_BATCH_LEASES>,
    upserts: BoundedVec<PatientRecord, MAX_BATCH_UPSERTS>,
    removals: BoundedVec<Removal, MAX_BATCH_REMOVALS>,
    next_cursor: Cursor,
    more: bool,
    hub_time: Timestamp,
    allowed: AllowedSetDigest,
    offers: BoundedVec<Offer, MAX_BATCH_OFFERS>,
    wants_done: u32,
    expected: u32,
}

/// A record as one protocol version carries it.
pub(crate) trait WireRecord: Sized {
    /// Read as the current record (always without loss).
    fn up(self) -> PatientRecord;
    /// The current record as this version can carry it (SPEC.md §5).
    fn down(r: &PatientRecord) -> Self;
}

impl WireRecord for PatientRecord {
    fn up(self) -> PatientRecord {
        self
    }
    fn down(r: &PatientRecord) -> Self {
        r.clone()
    }
}

impl WireRecord for v1::PatientRecord {
    fn up(self) -> PatientRecord {
        PatientRecord::from(self)
    }
    fn down(r: &PatientRecord) -> Self {
        Self::from(r)
    }
}

impl WireRecord for v2::PatientRecord {
    fn up(self) -> PatientRecord {
        PatientRecord::from(self)
    }
    fn down(r: &PatientRecord) -> Self {
        Self::from(r)
    }
}

impl<R: WireRecord> WireBatch<R> {
    /// A batch of an earlier version read as the current one: every record converts
    /// without loss, and the batch is then checked as any other. It offers nothing, and
    /// its `expected` is unknown (0).
    pub(crate) fn upgrade(self) -> Result<Batch, FieldError> {
        let upserts: Vec<PatientRecord> = self
            .upserts
            .into_inner()
            .into_iter()
            .map(WireRecord::up)
            .collect();
        Batch::try_from(RawBatch {
            objections: self.objections,
            leases: self.leases,
            upserts: BoundedVec::try_from(upserts)?,
            removals: self.removals,
            next_cursor: self.next_cursor,
            more: self.more,
            hub_time: self.hub_time,
            allowed: self.allowed,
            offers: BoundedVec::new(),
            wants_done: 0,
            expected: 0,
        })
    }

    /// The batch as this version writes it: each record as the version can carry it.
    /// Offers and answered wants cannot be said before version 5 (a hub makes neither
    /// for such a device); `expected` is dropped.
    pub(crate) fn downgrade(b: &Batch) -> Result<Self, FieldError> {
        if !b.offers.is_empty() || b.wants_done != 0 {
            return Err(FieldError::Invalid("offers need version 5"));
        }
        let upserts: Vec<R> = b.upserts.iter().map(R::down).collect();
        Ok(Self {
            objections: b.objections.clone(),
            leases: b.leases.clone(),
            upserts: BoundedVec::try_from(upserts)?,
            removals: b.removals.clone(),
            next_cursor: b.next_cursor.clone(),
            more: b.more,
            hub_time: b.hub_time,
            allowed: b.allowed,
        })
    }
}

impl TryFrom<RawBatch> for Batch {
    type Error = FieldError;
    fn try_from(r: RawBatch) -> Result<Self, FieldError> {
        let mut objected = HashSet::new();
        let mut seen = HashSet::new();
        for o in &r.objections {
            if !seen.insert(o.nhs_number) {
                return Err(FieldError::Inconsistent("patient twice in objections"));
            }
            if o.status == ObjectionStatus::Objected {
                objected.insert(o.nhs_number);
            }
        }
        let mut leases = HashSet::new();
        for l in &r.leases {
            if !leases.insert(l.lease_id()) {
                return Err(FieldError::Inconsistent("lease changed twice in one batch"));
            }
        }
        let mut touched = HashSet::new();
        for nhs in r.upserts.iter().map(|u| u.nhs_number) {
            if objected.contains(&nhs) {
                return Err(FieldError::Inconsistent("objected patient upserted"));
            }
            if !touched.insert(nhs) {
                return Err(FieldError::Inconsistent(
                    "patient twice in upserts/removals",
                ));
            }
        }
        for nhs in r.removals.iter().map(|u| u.nhs_number) {
            if !touched.insert(nhs) {
                return Err(FieldError::Inconsistent(
                    "patient twice in upserts/removals",
                ));
            }
        }
        for nhs in r.offers.iter().map(|o| o.nhs_number) {
            if objected.contains(&nhs) {
                return Err(FieldError::Inconsistent("objected patient offered"));
            }
            if !touched.insert(nhs) {
                return Err(FieldError::Inconsistent(
                    "patient twice in upserts/removals/offers",
                ));
            }
        }
        Ok(Self {
            objections: r.objections,
            leases: r.leases,
            upserts: r.upserts,
            removals: r.removals,
            next_cursor: r.next_cursor,
            more: r.more,
            hub_time: r.hub_time,
            allowed: r.allowed,
            offers: r.offers,
            wants_done: r.wants_done,
            expected: r.expected,
        })
    }
}
deserialize_via!(Batch, RawBatch);

impl Batch {
    /// Build a batch that offers nothing, checking that no patient appears twice and
    /// that no objected patient is upserted.
    #[allow(clippy::too_many_arguments)] // Mirrors the wire struct one field per argument.
    pub fn new(
        objections: BoundedVec<ObjectionChange, MAX_BATCH_OBJECTIONS>,
        leases: BoundedVec<LeaseChange, MAX_BATCH_LEASES>,
        upserts: BoundedVec<PatientRecord, MAX_BATCH_UPSERTS>,
        removals: BoundedVec<Removal, MAX_BATCH_REMOVALS>,
        next_cursor: Cursor,
        more: bool,
        hub_time: Timestamp,
        allowed: AllowedSetDigest,
    ) -> Result<Self, FieldError> {
        Self::try_from(RawBatch {
            objections,
            leases,
            upserts,
            removals,
            next_cursor,
            more,
            hub_time,
            allowed,
            offers: BoundedVec::new(),
            wants_done: 0,
            expected: 0,
        })
    }

    /// This batch with version 5's offers, answered wants and expected count, checked
    /// again as a whole.
    pub fn with_progress(
        self,
        offers: BoundedVec<Offer, MAX_BATCH_OFFERS>,
        wants_done: u32,
        expected: u32,
    ) -> Result<Self, FieldError> {
        Self::try_from(RawBatch {
            objections: self.objections,
            leases: self.leases,
            upserts: self.upserts,
            removals: self.removals,
            next_cursor: self.next_cursor,
            more: self.more,
            hub_time: self.hub_time,
            allowed: self.allowed,
            offers,
            wants_done,
            expected,
        })
    }
}

/// Device → hub: a run of consecutive audit entries, oldest first.
#[derive(Clone, PartialEq, Eq, Debug, Serialize)]
pub struct PushAudit {
    /// Chain hash of the entry before the first one here (all zero before entry 1).
    pub prev_hash: Hash32,
    /// Entries with consecutive sequence numbers.
    pub entries: BoundedVec<AuditEntry, MAX_AUDIT_ENTRIES>,
}

#[derive(Deserialize)]
struct RawPushAudit {
    prev_hash: Hash32,
    entries: BoundedVec<AuditEntry, MAX_AUDIT_ENTRIES>,
}

impl TryFrom<RawPushAudit> for PushAudit {
    type Error = FieldError;
    fn try_from(r: RawPushAudit) -> Result<Self, FieldError> {
        let consecutive = r
            .entries
            .windows(2)
            .all(|w| matches!(w, [a, b] if a.seq.checked_add(1) == Some(b.seq)));
        if r.entries.is_empty() || !consecutive {
            return Err(FieldError::Inconsistent(
                "audit entries empty or not consecutive",
            ));
        }
        Ok(Self {
            prev_hash: r.prev_hash,
            entries: r.entries,
        })
    }
}
deserialize_via!(PushAudit, RawPushAudit);

impl PushAudit {
    /// Build a push, checking the entries are non-empty and consecutive.
    pub fn new(
        prev_hash: Hash32,
        entries: BoundedVec<AuditEntry, MAX_AUDIT_ENTRIES>,
    ) -> Result<Self, FieldError> {
        Self::try_from(RawPushAudit { prev_hash, entries })
    }
}

/// Hub → device: every entry up to and including `durable_through` is stored durably
/// at the hub; the device may delete them.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct AuditAck {
    /// Highest sequence held durably, with all before it.
    pub durable_through: u64,
}

/// Error codes. The numbering is the wire tag; codes are only appended.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request frame was rejected by the decoder. Fix the sender; do not retry.
    Malformed,
    /// No common protocol version.
    UnsupportedVersion,
    /// Enrolment token unknown, used or expired; or client certificate not accepted.
    Unauthorized,
    /// The device is revoked: it must wipe its data now.
    DeviceRevoked,
    /// The cursor is not one this hub issued, or it is ahead of the log: pull again
    /// with no cursor and reconcile.
    CursorInvalid,
    /// Over a size limit.
    TooLarge,
    /// Too many requests: retry after the given delay.
    RateLimited,
    /// The hub failed; retry with backoff.
    Internal,
    /// The audit chain does not link or a hash does not match: the hub keeps what it
    /// has, flags the device, and accepts nothing after the break.
    AuditChainBroken,
    /// The audit push does not start right after what the hub holds: resend from
    /// `audit_durable_through + 1`.
    AuditGap,
    /// The hub is in maintenance; retry later.
    Unavailable,
    /// Version 5, in answer to a `lookup` only: the patient cannot be looked up — one
    /// answer whether unknown, objected or not shareable, so that a refusal reveals
    /// nothing about the patient.
    NotAvailable,
    /// Version 5, in answer to a `lookup` only: no lease of this device allows the
    /// caller emergency access.
    NotPermitted,
}

/// A failed request: a code the program acts on and a message for people. The message
/// never carries patient data.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// What went wrong.
    pub code: ErrorCode,
    /// For people: what happened and what to do.
    pub message: Text<1024>,
    /// Retry no sooner than this many seconds from now.
    pub retry_after_secs: Option<u32>,
}
