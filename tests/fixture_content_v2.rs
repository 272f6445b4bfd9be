//! What the schema-v2 store fixture (`tests/fixtures/store-v2/`) holds, rebuilt
//! deterministically so the test can compare: four patients with what protocol version 2
//! added (a local code, a dm+d code with an end date, a recorder without ODS, a section
//! withheld at the patient's request, a verified text-only allergy, unreadable counts).
//! Shared by `examples/make_store_fixture_v2.rs` (which wrote the fixture once, with the
//! schema-2 build) and the test. It builds records only by changing fields of generated
//! ones, so it compiles against every later record too.

use carecache_synth::Generator;
use sync_protocol::digest::allowed_set_digest;
use sync_protocol::message::{Audience, Batch, Lease, LeaseChange, View};
use sync_protocol::record::{AllergyVerification, PatientRecord, Section, Unreadable};
use sync_protocol::types::{
    BoundedVec, Code, Cursor, Date, LeaseId, Provenance, SctId, Text, Timestamp,
};

/// The fixture's root key (test data only).
pub(crate) const ROOT_KEY: [u8; 32] = [0x6d; 32];

fn ts(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms).unwrap()
}

fn t<const N: usize>(s: &str) -> Text<N> {
    Text::new(s).unwrap()
}

fn edit<T: Clone, const N: usize>(s: &mut Section<T, N>, f: impl FnOnce(&mut T)) {
    let mut items = s.entries().to_vec();
    if let Some(first) = items.first_mut() {
        f(first);
        *s = Section::from_items(items).unwrap();
    }
}

pub(crate) fn patients() -> Vec<PatientRecord> {
    let mut p = Generator::new(11).patients(4);
    edit(&mut p[0].alerts, |a| {
        a.code.code = Some(Code::Other {
            system: t("https://gp-system.invalid/CodeSystem/alert-codes"),
            code: t("DNR1"),
        });
    });
    p[0].unreadable = Unreadable {
        alerts: 1,
        ..Unreadable::default()
    };
    edit(&mut p[1].medications, |m| {
        m.medicine.code = Some(Code::Dmd(SctId::new(39_732_311_000_001_104).unwrap()));
        m.ended = Some(Date::ymd(2025, 2, 1).unwrap());
        m.provenance = Provenance {
            organisation: None,
            recorded_by: Some(t("Practitioner/pr-9")),
            last_updated: None,
        };
    });
    p[2].allergies = Section::WithheldByPatient;
    edit(&mut p[3].allergies, |a| {
        a.substance.code = None;
        a.verification = Some(AllergyVerification::Confirmed);
    });
    p
}

pub(crate) fn lease() -> Lease {
    let nhs = patients().iter().map(|r| r.nhs_number).collect::<Vec<_>>();
    Lease::new(
        LeaseId(43),
        t("community caseload"),
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

pub(crate) fn cursor() -> Cursor {
    Cursor::new(b"hub-seq-0000009".to_vec()).unwrap()
}

pub(crate) fn batches() -> Vec<Batch> {
    let p = patients();
    vec![
        Batch::new(
            BoundedVec::new(),
            BoundedVec::try_from(vec![LeaseChange::Granted(lease())]).unwrap(),
            BoundedVec::try_from(p.clone()).unwrap(),
            BoundedVec::new(),
            cursor(),
            false,
            ts(1_790_000_100_000),
            allowed_set_digest(p.iter().map(|r| (r.nhs_number, r.version))),
        )
        .unwrap(),
    ]
}
