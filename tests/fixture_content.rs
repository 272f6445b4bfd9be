//! What the schema-v1 fixture holds, rebuilt deterministically so the test can compare.
//! Shared by `examples/make_store_fixture.rs` (which wrote the fixture once) and the test.

use carecache_synth::Generator;
use sync_protocol::NhsNumber;
use sync_protocol::audit::{AuditAction, AuditEntry, AuditOutcome, Purpose};
use sync_protocol::digest::allowed_set_digest;
use sync_protocol::message::{
    Audience, Batch, Lease, LeaseChange, ObjectionChange, ObjectionStatus, View,
};
use sync_protocol::record::PatientRecord;
use sync_protocol::types::{BoundedVec, Bytes, Cursor, Hash32, LeaseId, StaffId, Text, Timestamp};

/// The fixture's root key (test data only).
pub(crate) const ROOT_KEY: [u8; 32] = [0x5c; 32];

fn ts(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms).unwrap()
}

/// Five patients; the fifth objects and is never stored.
pub(crate) fn patients() -> Vec<PatientRecord> {
    Generator::new(3).patients(5)
}

pub(crate) fn lease() -> Lease {
    let nhs: Vec<NhsNumber> = patients().iter().map(|r| r.nhs_number).collect();
    Lease::new(
        LeaseId(42),
        Text::new("district nursing caseload").unwrap(),
        Audience::Team,
        View::Clinical,
        ts(1_790_000_000_000),
        ts(1_800_000_000_000),
        72 * 3600,
        true,
        BoundedVec::try_from(nhs).unwrap(),
    )
    .unwrap()
}

pub(crate) fn objected() -> NhsNumber {
    patients()[4].nhs_number
}

pub(crate) fn cursor() -> Cursor {
    Cursor::new(b"hub-seq-0000002".to_vec()).unwrap()
}

pub(crate) fn batches() -> Vec<Batch> {
    let p = patients();
    let first = Batch::new(
        BoundedVec::try_from(vec![ObjectionChange {
            nhs_number: objected(),
            status: ObjectionStatus::Objected,
            recorded_at: ts(1_790_000_000_000),
        }])
        .unwrap(),
        BoundedVec::try_from(vec![LeaseChange::Granted(lease())]).unwrap(),
        BoundedVec::try_from(p[..4].to_vec()).unwrap(),
        BoundedVec::new(),
        cursor(),
        false,
        ts(1_790_000_100_000),
        allowed_set_digest(p[..4].iter().map(|r| (r.nhs_number, r.version))),
    )
    .unwrap();
    vec![first]
}

/// The layout audit records had when the fixture was written (before the first
/// release revised it): the store keeps entries as opaque sealed bytes, so the fixture's
/// entries are rebuilt from this to compare byte for byte.
#[derive(serde::Serialize)]
struct LegacyAuditRecord {
    at: Timestamp,
    user: StaffId,
    client: Text<64>,
    purpose: Purpose,
    action: AuditAction,
    patient: Option<NhsNumber>,
    lease: Option<LeaseId>,
    view: Option<View>,
    outcome: AuditOutcome,
    request_id: u64,
}

pub(crate) fn audit() -> Vec<AuditEntry> {
    let mut prev = Hash32::default();
    patients()[..3]
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let record = LegacyAuditRecord {
                at: ts(1_790_000_200_000 + i as u64),
                user: StaffId::new("C7654321").unwrap(),
                client: Text::new("nurse-visit-app").unwrap(),
                purpose: Purpose::Treat,
                action: AuditAction::ReadSummary,
                patient: Some(r.nhs_number),
                lease: Some(LeaseId(42)),
                view: Some(View::Clinical),
                outcome: AuditOutcome::Served,
                request_id: i as u64,
            };
            let bytes = postcard::to_allocvec(&record).unwrap();
            let seq = i as u64 + 1;
            let hash = sync_protocol::audit::chain_hash(&prev, seq, &bytes);
            prev = hash;
            AuditEntry {
                seq,
                record: Bytes::try_from(bytes).unwrap(),
                hash,
            }
        })
        .collect()
}
