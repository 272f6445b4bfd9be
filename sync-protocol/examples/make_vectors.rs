//! Writes the test vectors in `vectors/` that do not exist yet. Existing files are never
//! rewritten: a vector, once committed, is kept as it is forever (a change to the
//! encoding must show up as a failing vector, not as a regenerated one).
//!
//! Run: `cargo run -p sync-protocol --example make_vectors`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::indexing_slicing
)]

use std::path::Path;

use sync_protocol::audit::{
    Access, AdminCommand, AuditAction, AuditEntry, AuditEvent, AuditOutcome, AuditRecord,
    DenyReason, KeyEvent, LeaseEnd, LookupEvent, LookupOutcome, ProvenStaff, Purpose, SectionKind,
    SectionShown, SessionEnd, SessionEvent, SessionRefusal, Shown, SignInRoute,
};
use sync_protocol::message::*;
use sync_protocol::record::*;
use sync_protocol::types::*;
use sync_protocol::{
    Compression, FrameHeader, Message, MessageKind, NhsNumber, decode, encode_version,
};

/// The vectors written before version 2 are version-1 frames, and are generated as such:
/// regenerating them gives the committed bytes.
const LEGACY: u16 = 1;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors");
    std::fs::create_dir_all(&dir).unwrap();
    let mut written = 0;
    for (name, comment, bytes) in vectors() {
        let path = dir.join(format!("{name}.hex"));
        if path.exists() {
            continue;
        }
        let expect = match decode(&bytes) {
            Ok(m) => format!("ok {}", m.kind()),
            Err(e) => format!("error {}", e.kind_name()),
        };
        let mut text = format!("expect: {expect}\n# {comment}\n");
        for chunk in bytes.chunks(32) {
            let line: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            text.push_str(&line.join(" "));
            text.push('\n');
        }
        std::fs::write(&path, text).unwrap();
        println!("wrote {} ({expect})", path.display());
        written += 1;
    }
    println!("{written} new vectors");
}

fn header(
    kind: MessageKind,
    compression: Compression,
    payload_len: usize,
    content_len: usize,
) -> Vec<u8> {
    FrameHeader {
        version: LEGACY,
        kind,
        compression,
        payload_len: u32::try_from(payload_len).unwrap(),
        content_len: u32::try_from(content_len).unwrap(),
    }
    .to_bytes()
    .to_vec()
}

fn frame(
    kind: MessageKind,
    compression: Compression,
    payload: &[u8],
    content_len: usize,
) -> Vec<u8> {
    let mut f = header(kind, compression, payload.len(), content_len);
    f.extend_from_slice(payload);
    f
}

fn raw(kind: MessageKind, payload: &[u8]) -> Vec<u8> {
    frame(kind, Compression::None, payload, payload.len())
}

fn enc(m: Message) -> Vec<u8> {
    encode_version(&m, Compression::None, LEGACY).unwrap()
}

fn enc2(m: Message) -> Vec<u8> {
    encode_version(&m, Compression::None, 2).unwrap()
}

fn enc3(m: Message) -> Vec<u8> {
    encode_version(&m, Compression::None, 3).unwrap()
}

fn enc4(m: Message) -> Vec<u8> {
    encode_version(&m, Compression::None, 4).unwrap()
}

fn enc5(m: Message) -> Vec<u8> {
    encode_version(&m, Compression::None, 5).unwrap()
}

fn enc6(m: Message) -> Vec<u8> {
    encode_version(&m, Compression::None, 6).unwrap()
}

/// Version 6: a checkin from a device with twelve entries waiting, the oldest from two
/// days before, its certificate ending in 40 days, and its last sync offline.
fn checkin() -> Checkin {
    Checkin {
        anchor: None,
        nonce: Hash32([0x5a; 32]),
        health: Health {
            store_bytes: 6_291_456,
            patients_held: 2_000,
            audit_backlog: 12,
            audit_oldest: Some(ts(1_735_516_800_000)),
            audit_last_seq: 4_812,
            certificate_not_after: Some(ts(1_739_145_600_000)),
            clock_offset_secs: -3,
            last_error: Some(HealthError::Offline),
            wiping: false,
        },
    }
}

/// Version 6: the hub's time for nonce 0x5a…, and two CAs to pin (a rollover's overlap).
fn checkin_answer() -> CheckinAnswer {
    CheckinAnswer {
        nonce: Hash32([0x5a; 32]),
        hub_time: ts(1_735_689_600_000),
        trust: BoundedVec::try_from(vec![
            Bytes::try_from(vec![0x30, 0x82, 0x01, 0x8f, 0x30, 0x82, 0x01, 0x35]).unwrap(),
            Bytes::try_from(vec![0x30, 0x82, 0x01, 0x90, 0x30, 0x82, 0x01, 0x36]).unwrap(),
        ])
        .unwrap(),
    }
}

/// Version 6: a clock correction, a key-source change and a wipe order in the audit.
fn push_audit_v6() -> PushAudit {
    let events = [
        AuditEvent::ClockCorrected {
            from: ts(2_051_222_400_000),
            to: ts(1_735_689_600_000),
            leases_reopened: 2,
        },
        AuditEvent::Key(KeyEvent::KeySourceChanged {
            from: Text::new("passphrase").unwrap(),
            to: Text::new("key-file").unwrap(),
        }),
        AuditEvent::Key(KeyEvent::WipeOrdered { backlog: 41 }),
        AuditEvent::Key(KeyEvent::CertificateRenewed {
            not_after: ts(1_767_225_600_000),
        }),
        AuditEvent::Key(KeyEvent::PinnedCasChanged { pinned: 2 }),
    ];
    chained(events, 1_735_689_600_000, 1000)
}

fn enc8(m: Message) -> Vec<u8> {
    encode_version(&m, Compression::None, 8).unwrap()
}

/// Version 8: the version-6 checkin with the device's anchor report: a TPM counter, and
/// a restored copy found (behind the counter) that the hub has not yet acknowledged.
fn checkin_v8(kind: AnchorKind) -> Checkin {
    Checkin {
        anchor: Some(AnchorReport {
            kind,
            unavailable: false,
            restored: Some(RestoreReport {
                detected_at: ts(1_735_603_200_000),
                reason: RestoreReason::Behind,
            }),
        }),
        ..checkin()
    }
}

/// Version 8: the anti-rollback key events: a store bound to its TPM counter, and a
/// restored copy destroyed at open (1,840 patients, 3 leases).
fn push_audit_v8() -> PushAudit {
    let events = [
        AuditEvent::Key(KeyEvent::AnchorBound {
            kind: AnchorKind::Tpm,
        }),
        AuditEvent::Key(KeyEvent::Restored {
            reason: RestoreReason::Behind,
            patients: 1_840,
            leases: 3,
        }),
    ];
    chained(events, 1_735_603_200_000, 2000)
}

fn enc7(m: Message) -> Vec<u8> {
    encode_version(&m, Compression::None, 7).unwrap()
}

/// Version 7: operators' commands in the audit: a status read over the admin channel by
/// user 1000, an audit export with the daemon stopped, and a failed sync started by hand.
fn push_audit_v7() -> PushAudit {
    let events = [
        AuditEvent::Admin {
            command: AdminCommand::Status,
            uid: Some(1000),
            ok: true,
        },
        AuditEvent::Admin {
            command: AdminCommand::AuditTail { lines: 20 },
            uid: Some(0),
            ok: true,
        },
        AuditEvent::Admin {
            command: AdminCommand::AuditExport,
            uid: None,
            ok: true,
        },
        AuditEvent::Admin {
            command: AdminCommand::SyncNow,
            uid: Some(1000),
            ok: false,
        },
    ];
    chained(events, 1_735_776_000_000, 1000)
}

/// Version 5: a pull from a device holding 2,000 patients that lacks two it was offered.
fn pull_v5() -> Pull {
    let mut p = Pull::new(Some(cursor()), 4 << 20);
    p.holding = 2_000;
    p.want = BoundedVec::try_from(vec![nhs("999 000 0018"), nhs("999 000 0026")]).unwrap();
    p
}

/// Version 5: the answer to [`pull_v5`] — the first wanted record (the second did not
/// fit), an objection, two patients offered by version, and the round's expected count.
fn batch_v5() -> Batch {
    Batch::new(
        BoundedVec::try_from(vec![ObjectionChange {
            nhs_number: nhs("999 000 0034"),
            status: ObjectionStatus::Objected,
            recorded_at: ts(1_735_689_000_000),
        }])
        .unwrap(),
        BoundedVec::new(),
        BoundedVec::try_from(vec![record()]).unwrap(),
        BoundedVec::new(),
        cursor(),
        true,
        ts(1_735_690_000_000),
        AllowedSetDigest {
            patients: 0,
            sha256: Hash32([0; 32]),
        },
    )
    .unwrap()
    .with_progress(
        BoundedVec::try_from(vec![
            Offer {
                nhs_number: nhs("999 000 0042"),
                version: RecordVersion(41),
            },
            Offer {
                nhs_number: nhs("999 000 0050"),
                version: RecordVersion(42),
            },
        ])
        .unwrap(),
        1,
        2_000,
    )
    .unwrap()
}

fn lookup() -> Lookup {
    Lookup {
        nhs_number: nhs("999 000 0026"),
        lease: LeaseId(7),
        staff: StaffId::new("N1234").unwrap(),
        reason: t("Found collapsed at a bus stop; not on today's caseload"),
    }
}

fn lookup_granted() -> LookupGranted {
    let lease = Lease::new(
        LeaseId(99),
        t("Emergency lookup"),
        Audience::Users(BoundedVec::try_from(vec![StaffId::new("N1234").unwrap()]).unwrap()),
        View::Clinical,
        ts(1_735_690_000_000),
        ts(1_735_733_200_000),
        86_400,
        false,
        BoundedVec::try_from(vec![nhs("999 000 0026")]).unwrap(),
    )
    .unwrap();
    LookupGranted::try_from_parts(lease, allergy_record()).unwrap()
}

/// Version 5: a flood of requests without a token, the first audited as it came and
/// the rest of its minute as one count.
fn push_audit_v5_auth() -> PushAudit {
    let events = [
        AuditEvent::AuthFailure {
            request_id: 31,
            client: None,
            reason: sync_protocol::audit::AuthFailure::NoToken,
        },
        AuditEvent::AuthFailures {
            client: None,
            reason: sync_protocol::audit::AuthFailure::NoToken,
            minute: ts(1_735_689_600_000),
            count: 3_999,
        },
    ];
    chained(events, 1_735_689_600_000, 30_000)
}

/// Version 5: a lookup granted and one refused offline, in the audit.
fn push_audit_v5() -> PushAudit {
    let event = |request_id, outcome| {
        AuditEvent::Lookup(LookupEvent {
            request_id,
            client: t("epcr"),
            user: StaffId::new("N1234").unwrap(),
            proven: None,
            patient: nhs("999 000 0026"),
            under: Some(LeaseId(7)),
            reason: t("Found collapsed at a bus stop; not on today's caseload"),
            outcome,
        })
    };
    let events = [
        event(21, LookupOutcome::Offline),
        event(
            22,
            LookupOutcome::Granted {
                lease: LeaseId(99),
                not_after: ts(1_735_733_200_000),
            },
        ),
    ];
    chained(events, 1_735_690_000_000, 1000)
}

/// `events` as a push of entries 1, 2, … chained from zero, the n-th at `start` +
/// n × `step` milliseconds.
fn chained<const N: usize>(events: [AuditEvent; N], start: u64, step: u64) -> PushAudit {
    let mut prev = Hash32::default();
    let entries: Vec<AuditEntry> = events
        .into_iter()
        .zip(1u64..)
        .map(|(event, seq)| {
            let record = AuditRecord {
                at: ts(start + seq * step),
                wall: ts(start + seq * step),
                event,
            };
            let e = AuditEntry::seal(&prev, seq, &record).unwrap();
            prev = e.hash;
            e
        })
        .collect();
    PushAudit::new(Hash32::default(), BoundedVec::try_from(entries).unwrap()).unwrap()
}

/// Version 4: a staff session opened from a verified ID token, a read under it, a refused
/// forged token, a wrong PIN, a read naming no session, and the session's end.
fn push_audit_v4() -> PushAudit {
    let staff = ProvenStaff {
        issuer: t("https://idp.example.invalid/realms/Healthcare"),
        subject: t("0f6a3c2e-5d1b-4c8e-9a7f-2b1d3e4f5a6b"),
        session: 0x1d2c_3b4a_5968_7a8b,
    };
    let read = |request_id, user: Option<&str>, outcome| Access {
        request_id,
        client: t("epcr"),
        user: user.map(|u| StaffId::new(u).unwrap()),
        role: user.map(|_| t("R8000")),
        purpose: Some(Purpose::Treat),
        action: AuditAction::ReadSummary,
        patient: Some(nhs("999 000 0018")),
        listed: BoundedVec::default(),
        lease: Some(LeaseId(7)),
        view: Some(View::Clinical),
        shown: BoundedVec::default(),
        withheld: 0,
        outcome,
    };
    let events = [
        AuditEvent::Session(SessionEvent::Opened {
            session: staff.session,
            client: t("epcr"),
            user: StaffId::new("555000123456").unwrap(),
            role: Some(t("R8000")),
            staff: staff.clone(),
            expires: ts(1_735_743_200_000),
            route: SignInRoute::Client,
        }),
        AuditEvent::ProvenAccess {
            access: read(11, Some("555000123456"), AuditOutcome::Served),
            staff: staff.clone(),
        },
        AuditEvent::Session(SessionEvent::Refused {
            client: t("epcr"),
            session: None,
            reason: SessionRefusal::BadSignature,
        }),
        AuditEvent::Session(SessionEvent::WrongPin {
            session: staff.session,
            attempts: 1,
        }),
        AuditEvent::Access(read(
            12,
            None,
            AuditOutcome::Denied(DenyReason::StaffNotProven),
        )),
        AuditEvent::Session(SessionEvent::Ended {
            session: staff.session,
            reason: SessionEnd::SignedOut,
        }),
    ];
    let mut prev = Hash32::default();
    let mut entries = Vec::new();
    for (seq, event) in (1..).zip(events) {
        let r = AuditRecord {
            at: ts(1_735_700_000_000 + seq * 1000),
            wall: ts(1_735_700_000_000 + seq * 1000),
            event,
        };
        let e = AuditEntry::seal(&prev, seq, &r).unwrap();
        prev = e.hash;
        entries.push(e);
    }
    PushAudit::new(Hash32::default(), BoundedVec::try_from(entries).unwrap()).unwrap()
}

fn nhs(n: &str) -> NhsNumber {
    NhsNumber::parse(n).unwrap()
}

fn ts(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms).unwrap()
}

fn t<const N: usize>(s: &str) -> Text<N> {
    Text::new(s).unwrap()
}

fn prov() -> Provenance {
    Provenance {
        organisation: Some(OdsCode::new("M85001").unwrap()),
        recorded_by: None,
        last_updated: Some(ts(1_735_689_600_000)),
    }
}

fn coding(code: u64, display: &str) -> Coding {
    Coding::snomed(SctId::new(code).unwrap(), t(display))
}

/// A full record: every section kind appears, and allergies are "not available" while
/// contacts are "none recorded", so the two states are both pinned by a vector.
fn record() -> PatientRecord {
    let demographics = Demographics::new(
        HumanName {
            family: t("Testpatient"),
            given: t("Edith Amelia"),
            prefix: Some(t("Mrs")),
        },
        Date::ymd(1941, 3, 9).unwrap(),
        Sex::Female,
        Some(PostcodeDistrict::new("WV10").unwrap()),
        Some(OdsCode::new("M85001").unwrap()),
        false,
    )
    .unwrap();
    PatientRecord {
        nhs_number: nhs("999 000 0018"),
        version: RecordVersion(42),
        demographics,
        alerts: Section::from_items(vec![Alert {
            source_id: SourceId::new("flag-1").unwrap(),
            category: AlertCategory::EndOfLife,
            code: coding(450476008, "Not for cardiopulmonary resuscitation"),
            detail: Some(t("DNACPR form in kitchen drawer")),
            period: Period::new(Some(Date::ymd(2024, 2, 28).unwrap()), None).unwrap(),
            severity: AlertSeverity::HighRisk,
            provenance: prov(),
        }])
        .unwrap(),
        allergies: Section::NotAvailable,
        medications: Section::from_items(vec![Medication {
            source_id: SourceId::new("med-1").unwrap(),
            medicine: coding(317972000, "Furosemide 40mg tablets"),
            dose_text: Some(t("One tablet each morning")),
            status: MedicationStatus::Active,
            course: Some(Course::Repeat),
            started: Some(Date::ym(2021, 6).unwrap()),
            last_issued: Some(Date::ymd(2025, 1, 2).unwrap()),
            prescribed_elsewhere: false,
            provenance: prov(),
            ended: None,
            dosage: None,
        }])
        .unwrap(),
        contacts: Section::NoneRecorded,
        withheld: 1,
        unreadable: Unreadable::default(),
    }
}

/// A record as version 2 carries it from field data: a locally coded DNACPR alert, a
/// text-only allergy, a dm+d medicine, provenance without an ODS code, medications withheld
/// at the patient's request, and one alert the hub could not read.
fn field_record() -> PatientRecord {
    let mut r = record();
    r.nhs_number = nhs("999 000 0050");
    r.alerts = Section::from_items(vec![Alert {
        source_id: SourceId::new("flag-local-1").unwrap(),
        category: AlertCategory::EndOfLife,
        code: Coding {
            code: Some(Code::Other {
                system: t("https://example.invalid/CodeSystem/alerts"),
                code: t("DNR"),
            }),
            display: t("Do not attempt CPR"),
        },
        detail: None,
        period: Period::default(),
        severity: AlertSeverity::HighRisk,
        provenance: Provenance {
            organisation: None,
            recorded_by: Some(t("Dr A Example")),
            last_updated: None,
        },
    }])
    .unwrap();
    r.allergies = Section::from_items(vec![Allergy {
        source_id: SourceId::new("alg-text-1").unwrap(),
        substance: Coding {
            code: None,
            display: t("penicillin - rash"),
        },
        category: None,
        criticality: None,
        status: AllergyStatus::Active,
        reactions: BoundedVec::new(),
        onset: None,
        note: None,
        provenance: Provenance {
            organisation: None,
            recorded_by: Some(t("Practitioner/pr-9")),
            last_updated: Some(ts(1_735_689_600_000)),
        },
        verification: Some(AllergyVerification::Confirmed),
    }])
    .unwrap();
    r.medications = Section::WithheldByPatient;
    r.contacts = Section::from_items(vec![KeyContact {
        role: ContactRole::Carer,
        name: t("Sam Testcarer"),
        relationship: None,
        phone: None,
        provenance: prov(),
    }])
    .unwrap();
    r.unreadable = Unreadable {
        alerts: 1,
        ..Unreadable::default()
    };
    r
}

fn dmd_record() -> PatientRecord {
    let mut r = record();
    r.nhs_number = nhs("999 000 0069");
    r.medications = Section::from_items(vec![Medication {
        source_id: SourceId::new("med-dmd-1").unwrap(),
        medicine: Coding {
            code: Some(Code::Dmd(SctId::new(39732311000001104).unwrap())),
            display: t("Amoxicillin 250mg capsules"),
        },
        dose_text: None,
        status: MedicationStatus::Active,
        course: Some(Course::Acute),
        started: None,
        last_issued: None,
        prescribed_elsewhere: false,
        provenance: prov(),
        ended: Some(Date::ymd(2025, 2, 1).unwrap()),
        dosage: None,
    }])
    .unwrap();
    r
}

/// Version 3: a medication whose dose the source structured (and whose words the hub
/// wrote for it).
fn dosage_record() -> PatientRecord {
    let mut r = record();
    r.nhs_number = nhs("999 000 0069");
    r.medications = Section::from_items(vec![Medication {
        source_id: SourceId::new("med-dose-1").unwrap(),
        medicine: Coding {
            code: None,
            display: t("Amoxicillin 250mg/5ml oral suspension"),
        },
        dose_text: Some(t("10 mL, 3 times a day, Oral")),
        status: MedicationStatus::Active,
        course: Some(Course::Acute),
        started: None,
        last_issued: None,
        prescribed_elsewhere: false,
        provenance: prov(),
        ended: None,
        dosage: Some(Dosage {
            dose: Some(DoseQuantity {
                value: Decimal::new("10").unwrap(),
                unit: Some(t("mL")),
            }),
            frequency: Some(3),
            period: Some(Decimal::new("1").unwrap()),
            period_unit: Some(PeriodUnit::Day),
            route: Some(Coding {
                code: Some(Code::Snomed(SctId::new(26643006).unwrap())),
                display: t("Oral"),
            }),
            as_needed: false,
        }),
    }])
    .unwrap();
    r
}

/// A batch of `records` alone (no objections, leases or removals).
fn upserts_only(records: Vec<PatientRecord>) -> Batch {
    let allowed = sync_protocol::digest::allowed_set_digest(
        records.iter().map(|r| (r.nhs_number, r.version)),
    );
    Batch::new(
        BoundedVec::new(),
        BoundedVec::new(),
        BoundedVec::try_from(records).unwrap(),
        BoundedVec::new(),
        cursor(),
        false,
        ts(1_735_690_000_000),
        allowed,
    )
    .unwrap()
}

fn batch_v3() -> Batch {
    upserts_only(vec![dosage_record()])
}

fn batch_v2() -> Batch {
    upserts_only(vec![field_record(), dmd_record()])
}

fn allergy_record() -> PatientRecord {
    let mut r = record();
    r.nhs_number = nhs("999 000 0026");
    r.allergies = Section::from_items(vec![Allergy {
        source_id: SourceId::new("alg-1").unwrap(),
        substance: coding(764146007, "Penicillin"),
        category: Some(AllergyCategory::Medication),
        criticality: Some(Criticality::High),
        status: AllergyStatus::Active,
        reactions: BoundedVec::try_from(vec![Reaction {
            manifestation: Some(coding(39579001, "Anaphylaxis")),
            description: None,
            severity: Some(ReactionSeverity::Severe),
        }])
        .unwrap(),
        onset: Some(Date::year_only(1987).unwrap()),
        note: None,
        provenance: prov(),
        verification: None,
    }])
    .unwrap();
    r.contacts = Section::from_items(vec![KeyContact {
        role: ContactRole::NextOfKin,
        name: t("Grace Testpatient"),
        relationship: Some(t("daughter")),
        phone: Some(t("07700 900123")),
        provenance: prov(),
    }])
    .unwrap();
    r
}

fn lease() -> Lease {
    Lease::new(
        LeaseId(7),
        t("District nursing caseload"),
        Audience::Users(BoundedVec::try_from(vec![StaffId::new("N1234").unwrap()]).unwrap()),
        View::Clinical,
        ts(1_735_689_600_000),
        ts(1_735_776_000_000),
        86_400,
        true,
        BoundedVec::try_from(vec![nhs("999 000 0018"), nhs("999 000 0026")]).unwrap(),
    )
    .unwrap()
}

fn cursor() -> Cursor {
    Cursor::new(vec![0, 0, 0, 0, 0, 0, 1, 0x2c]).unwrap()
}

fn batch(objection: ObjectionStatus) -> Batch {
    let records = vec![record(), allergy_record()];
    let allowed = sync_protocol::digest::allowed_set_digest(
        records.iter().map(|r| (r.nhs_number, r.version)),
    );
    Batch::new(
        BoundedVec::try_from(vec![ObjectionChange {
            nhs_number: nhs("999 000 0034"),
            status: objection,
            recorded_at: ts(1_735_689_000_000),
        }])
        .unwrap(),
        BoundedVec::try_from(vec![
            LeaseChange::Granted(lease()),
            LeaseChange::Revoked {
                id: LeaseId(3),
                reason: LeaseEndReason::AssignmentEnded,
            },
        ])
        .unwrap(),
        BoundedVec::try_from(records).unwrap(),
        BoundedVec::try_from(vec![Removal {
            nhs_number: nhs("999 000 0042"),
            reason: RemovalReason::LeftCaseload,
        }])
        .unwrap(),
        cursor(),
        false,
        ts(1_735_690_000_000),
        allowed,
    )
    .unwrap()
}

fn empty_batch() -> Batch {
    Batch::new(
        BoundedVec::new(),
        BoundedVec::new(),
        BoundedVec::new(),
        BoundedVec::new(),
        cursor(),
        false,
        ts(1_735_690_000_000),
        sync_protocol::digest::allowed_set_digest([]),
    )
    .unwrap()
}

fn push_audit() -> PushAudit {
    let mut prev = Hash32::default();
    let mut entries = Vec::new();
    let access =
        |request_id, user: &str, purpose, patient, lease, view, shown: Vec<Shown>, outcome| {
            AuditEvent::Access(Access {
                request_id,
                client: t("epcr"),
                user: Some(StaffId::new(user).unwrap()),
                role: Some(t("paramedic")),
                purpose: Some(purpose),
                action: AuditAction::ReadSummary,
                patient: Some(nhs(patient)),
                listed: BoundedVec::default(),
                lease,
                view,
                shown: BoundedVec::try_from(shown).unwrap(),
                withheld: 0,
                outcome,
            })
        };
    let records = [
        AuditRecord {
            at: ts(1_735_700_000_000),
            wall: ts(1_735_700_000_000),
            event: access(
                1,
                "N1234",
                Purpose::Treat,
                "999 000 0018",
                Some(LeaseId(7)),
                Some(View::Clinical),
                vec![
                    Shown {
                        section: SectionKind::Alerts,
                        shown: SectionShown::Items(2),
                    },
                    Shown {
                        section: SectionKind::Allergies,
                        shown: SectionShown::NotAvailable,
                    },
                    Shown {
                        section: SectionKind::Medications,
                        shown: SectionShown::NoneRecorded,
                    },
                ],
                AuditOutcome::Served,
            ),
        },
        AuditRecord {
            at: ts(1_735_700_060_000),
            wall: ts(1_735_700_059_000),
            event: access(
                2,
                "P5678",
                Purpose::EmergencyTreat {
                    reason: t("Unconscious, no other history available"),
                },
                "999 000 0034",
                None,
                None,
                Vec::new(),
                AuditOutcome::Denied(DenyReason::Objected),
            ),
        },
        AuditRecord {
            at: ts(1_735_700_120_000),
            wall: ts(1_735_700_119_000),
            event: AuditEvent::LeaseEnded {
                lease: LeaseId(7),
                reason: LeaseEnd::Expired,
                purged: 12,
            },
        },
    ];
    for (seq, r) in (1..).zip(&records) {
        let e = AuditEntry::seal(&prev, seq, r).unwrap();
        prev = e.hash;
        entries.push(e);
    }
    PushAudit::new(Hash32::default(), BoundedVec::try_from(entries).unwrap()).unwrap()
}

fn hello() -> Message {
    Message::Hello(Hello {
        min_version: 1,
        max_version: 1,
        capabilities: Capabilities(Capabilities::ZSTD),
        device_time: ts(1_735_689_600_000),
        software: t("carecache 0.1.0"),
    })
}

/// Replace the first occurrence of `from` in `bytes` with `to` (same length).
fn patch(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("pattern present");
    bytes[at..at + from.len()].copy_from_slice(to);
    bytes
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

fn vectors() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let batch_frame = enc(Message::Batch(batch(ObjectionStatus::Withdrawn)));
    let batch_payload = batch_frame[16..].to_vec();
    let compressed = zstd::bulk::compress(&batch_payload, 3).unwrap();
    let bomb = zstd::bulk::compress(&vec![0u8; 8 * 1024 * 1024], 19).unwrap();
    let mut withdrawn_then_objected = batch(ObjectionStatus::Withdrawn);
    // The objection is for a patient not upserted; make it the upserted one, then flip
    // the status byte in the encoding to Objected.
    withdrawn_then_objected.objections = BoundedVec::try_from(vec![ObjectionChange {
        nhs_number: nhs("999 000 0018"),
        status: ObjectionStatus::Withdrawn,
        recorded_at: ts(1_735_689_000_000),
    }])
    .unwrap();
    let wto = enc(Message::Batch(withdrawn_then_objected));
    let mut objected_upsert = wto.clone();
    // payload: objections len (1 byte), NHS number varint (5 bytes), status tag.
    assert_eq!(objected_upsert[16 + 6], 1);
    objected_upsert[16 + 6] = 0;

    let empty = enc(Message::Batch(empty_batch()));
    let mut bad_bool = empty.clone();
    // payload: four empty lists, cursor (len + 8 bytes), then `more`.
    assert_eq!(bad_bool[16 + 4 + 9], 0);
    bad_bool[16 + 4 + 9] = 2;

    let invalid_nhs = patch(
        batch_frame.clone(),
        &varint(9_990_000_042),
        &varint(4_123_456_879),
    );
    let bad_date = patch(
        batch_frame.clone(),
        &[0xe8, 0x0f, 2, 28],
        &[0xe8, 0x0f, 2, 30],
    );
    let bad_sctid = patch(
        batch_frame.clone(),
        &varint(450_476_008),
        &varint(450_476_009),
    );

    let mut five_certs = Vec::new();
    five_certs.extend(varint(5));
    five_certs.extend_from_slice(b"hub-1");
    five_certs.extend([1, 0x30]); // certificate: 1 byte
    five_certs.push(5); // chain: 5 items (limit 4)
    for _ in 0..5 {
        five_certs.extend([1, 0x30]);
    }
    five_certs.extend(varint(1_735_689_600_000));

    let mut error_with_escape = vec![3]; // DeviceRevoked
    let msg = b"revoked \x1b[2J";
    error_with_escape.push(u8::try_from(msg.len()).unwrap());
    error_with_escape.extend_from_slice(msg);
    error_with_escape.push(0);

    let mut budget_too_small = vec![0]; // no cursor
    budget_too_small.extend(varint(1024));

    let mut trailing_in_payload =
        enc(Message::AuditAck(AuditAck { durable_through: 5 }))[16..].to_vec();
    trailing_in_payload.push(0);

    let hello_frame = enc(hello());
    let mut hello_zstd = hello_frame.clone();
    hello_zstd[7] = 1;
    // A version no peer will ever speak.
    let mut v3 = hello_frame.clone();
    v3[4] = 0xff;
    v3[5] = 0xff;
    let mut bad_magic = hello_frame.clone();
    bad_magic[0] = b'X';
    let mut unknown_kind = hello_frame.clone();
    unknown_kind[6] = 10;
    let mut unknown_comp = batch_frame.clone();
    unknown_comp[7] = 2;
    let mut mismatch = hello_frame.clone();
    mismatch[15] ^= 1;
    let mut long_frame = hello_frame.clone();
    long_frame.push(0);

    let v2_batch = enc2(Message::Batch(batch_v2()));
    let v2_bad_dmd = patch(
        v2_batch.clone(),
        &varint(39_732_311_000_001_104),
        &varint(39_732_311_000_001_105),
    );
    let v3_batch = enc3(Message::Batch(batch_v3()));
    let v3_bad_decimal = patch(v3_batch.clone(), &[2, b'1', b'0', 1], &[2, b'1', b'.', 1]);
    let v5_batch = enc5(Message::Batch(batch_v5()));
    // The second offer names the patient the batch objects to.
    let v5_offer_objected = patch(
        v5_batch.clone(),
        &[varint(9_990_000_050), varint(42)].concat(),
        &[varint(9_990_000_034), varint(42)].concat(),
    );
    let mut v4_lookup = enc5(Message::Lookup(lookup()));
    v4_lookup[5] = 4;
    let mut answer_no_ca = checkin_answer();
    answer_no_ca.trust = BoundedVec::new();
    let v6_no_ca = {
        // Encoded by hand: the encoder's type allows the empty list the decoder refuses.
        let mut payload = postcard::to_allocvec(&answer_no_ca).unwrap();
        let mut frame = enc6(Message::CheckinAnswer(checkin_answer()));
        frame.truncate(16);
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        frame[8..12].copy_from_slice(&len);
        frame[12..16].copy_from_slice(&len);
        frame.append(&mut payload);
        frame
    };
    let mut v5_checkin = enc6(Message::Checkin(checkin()));
    v5_checkin[5] = 5;
    // The anchor kind's byte: where the TPM and file encodings differ; 3 names no kind.
    let v8_tpm = enc8(Message::Checkin(checkin_v8(AnchorKind::Tpm)));
    let v8_file = enc8(Message::Checkin(checkin_v8(AnchorKind::File)));
    let at = (16..v8_tpm.len())
        .find(|&i| v8_tpm[i] != v8_file[i])
        .unwrap();
    let mut v8_bad_kind = v8_tpm.clone();
    v8_bad_kind[at] = 3;
    vec![
        (
            "ok-checkin-v8-restored",
            "version 8: a checkin with the anchor report: a TPM counter, and a restored copy found behind it, destroyed and not yet acknowledged",
            v8_tpm,
        ),
        (
            "err-v8-checkin-unknown-anchor-kind",
            "version 8: a checkin whose anchor kind is 3 (none, file and TPM are 0 to 2)",
            v8_bad_kind,
        ),
        (
            "ok-push-audit-v8-anchor",
            "version 8: a store bound to its TPM counter, then a restored copy destroyed at open",
            enc8(Message::PushAudit(push_audit_v8())),
        ),
        (
            "ok-push-audit-v7-admin",
            "version 7: operators' commands in the audit (status and audit tail over the admin channel, an export with the daemon stopped, a failed sync by hand)",
            enc7(Message::PushAudit(push_audit_v7())),
        ),
        (
            "ok-checkin",
            "version 6: a checkin with its nonce and the device's health (12 audit entries waiting, last sync offline)",
            enc6(Message::Checkin(checkin())),
        ),
        (
            "ok-checkin-answer",
            "version 6: the hub's time, bound to the checkin's nonce",
            enc6(Message::CheckinAnswer(checkin_answer())),
        ),
        (
            "err-v6-checkin-answer-no-ca",
            "version 6: a checkin answer naming no CA to pin",
            v6_no_ca,
        ),
        (
            "ok-renew",
            "version 6: a certificate request for a new key, over mutual TLS with the current certificate",
            enc6(Message::Renew(Renew {
                csr_der: Bytes::try_from(vec![0x30, 0x82, 0x01, 0x0a, 0x02, 0x01, 0x00]).unwrap(),
            })),
        ),
        (
            "ok-renewed",
            "version 6: the renewed certificate for the same device",
            enc6(Message::Renewed(Renewed {
                device_id: DeviceId::new("dev-0123456789abcdef").unwrap(),
                certificate_der: Bytes::try_from(vec![
                    0x30, 0x82, 0x02, 0x10, 0x30, 0x82, 0x01, 0xb6,
                ])
                .unwrap(),
            })),
        ),
        (
            "err-v5-checkin-kind",
            "a checkin in a version-5 frame (checkins exist from version 6)",
            v5_checkin,
        ),
        (
            "ok-push-audit-v6-clock-key-wipe",
            "version 6: trusted time corrected back from 2035 to the hub's, a key-source change, a wipe order, a certificate renewal and a CA rollover's pins in the audit",
            enc6(Message::PushAudit(push_audit_v6())),
        ),
        (
            "ok-pull-v5-holding-want",
            "version 5: a pull from a device holding 2,000 patients that lacks two it was offered",
            enc5(Message::Pull(pull_v5())),
        ),
        (
            "ok-batch-v5-offers",
            "version 5: a wanted record, an objection, two patients offered by version, one want answered, 2,000 expected",
            v5_batch,
        ),
        (
            "err-v5-offer-objected",
            "version 5: a patient offered in the batch that objects to them",
            v5_offer_objected,
        ),
        (
            "ok-lookup",
            "version 5: a one-off lookup under lease 7 with the member of staff's reason",
            enc5(Message::Lookup(lookup())),
        ),
        (
            "ok-lookup-granted",
            "version 5: a 12-hour lease for the looked-up patient alone, with the record",
            enc5(Message::LookupGranted(Box::new(lookup_granted()))),
        ),
        (
            "err-v4-lookup-kind",
            "a lookup in a version-4 frame (lookups exist from version 5)",
            v4_lookup,
        ),
        (
            "ok-push-audit-v5-auth-failures",
            "version 5: the first request of a minute without a token, then the other 3,999 of that minute counted",
            enc5(Message::PushAudit(push_audit_v5_auth())),
        ),
        (
            "ok-push-audit-v5-lookup",
            "version 5: lookups in the audit, one refused offline and one granted",
            enc5(Message::PushAudit(push_audit_v5())),
        ),
        (
            "ok-batch-v3-structured-dosage",
            "version 3: a medication with a structured dose (10 mL, 3 times a day, oral) beside its words",
            v3_batch,
        ),
        (
            "err-v3-non-canonical-decimal",
            "version 3: a dose written 1. (decimals have one canonical form)",
            v3_bad_decimal,
        ),
        (
            "ok-batch-v2-field-shaped",
            "version 2: a locally coded alert, a text-only allergy, a dm+d medicine, provenance without ODS, a section withheld at the patient's request, one unreadable alert",
            v2_batch,
        ),
        (
            "err-v2-invalid-dmd",
            "version 2: a dm+d code with a wrong Verhoeff check digit",
            v2_bad_dmd,
        ),
        (
            "ok-enrol-request",
            "enrol: one-time token, CSR bytes, device label",
            enc(Message::EnrolRequest(EnrolRequest {
                token: EnrolmentToken::new("Zx4-9QpLr7TmVb2Ke8Wn").unwrap(),
                csr_der: Bytes::try_from(vec![0x30, 0x82, 0x01, 0x0a]).unwrap(),
                device_label: t("Ambulance WM-417"),
            })),
        ),
        (
            "ok-enrol-response",
            "enrol response: device id, certificate, one-certificate chain",
            enc(Message::EnrolResponse(EnrolResponse {
                device_id: DeviceId::new("dev-0001").unwrap(),
                certificate_der: Bytes::try_from(vec![0x30, 0x82, 0x02, 0x01]).unwrap(),
                chain_der: BoundedVec::try_from(vec![
                    Bytes::try_from(vec![0x30, 0x82, 0x03]).unwrap(),
                ])
                .unwrap(),
                hub_time: ts(1_735_689_600_000),
            })),
        ),
        (
            "ok-hello",
            "hello: versions 1..=1, zstd capability",
            hello_frame.clone(),
        ),
        (
            "ok-welcome",
            "welcome: version 1, audit held through 12",
            enc(Message::Welcome(Welcome {
                version: 1,
                capabilities: Capabilities(Capabilities::ZSTD),
                hub_time: ts(1_735_689_601_000),
                device_id: DeviceId::new("dev-0001").unwrap(),
                max_batch_bytes: 4 * 1024 * 1024,
                audit_durable_through: 12,
            })),
        ),
        (
            "ok-pull-initial",
            "pull with no cursor, 1 MiB budget",
            enc(Message::Pull(Pull::new(None, 1 << 20))),
        ),
        (
            "ok-pull-cursor",
            "pull after a cursor",
            enc(Message::Pull(Pull::new(Some(cursor()), 4 << 20))),
        ),
        (
            "ok-batch-empty",
            "batch with no changes: the device is up to date, empty allowed set",
            empty.clone(),
        ),
        (
            "ok-batch-full",
            "objection withdrawn, lease granted and revoked, two records (allergies not available vs recorded; contacts none recorded vs recorded), one removal",
            batch_frame.clone(),
        ),
        (
            "ok-batch-zstd",
            "the full batch, zstd-compressed",
            frame(
                MessageKind::Batch,
                Compression::Zstd,
                &compressed,
                batch_payload.len(),
            ),
        ),
        (
            "ok-push-audit",
            "two chained audit entries: a served read and a denied emergency read",
            enc(Message::PushAudit(push_audit())),
        ),
        (
            "ok-push-audit-zstd",
            "the audit push, zstd-compressed",
            encode_version(&Message::PushAudit(push_audit()), Compression::Zstd, LEGACY).unwrap(),
        ),
        (
            "ok-push-audit-v4-staff-identity",
            "version 4: staff-session events and a read by a proven member of staff",
            enc4(Message::PushAudit(push_audit_v4())),
        ),
        (
            "ok-audit-ack",
            "audit stored through 2",
            enc(Message::AuditAck(AuditAck { durable_through: 2 })),
        ),
        (
            "ok-error",
            "error: device revoked",
            enc(Message::Error(ErrorMessage {
                code: ErrorCode::DeviceRevoked,
                message: t("This device has been revoked; its data must be wiped."),
                retry_after_secs: None,
            })),
        ),
        ("err-bad-magic", "first byte altered", bad_magic),
        ("err-empty", "no bytes at all", Vec::new()),
        (
            "err-truncated-header",
            "ten bytes of a header",
            hello_frame[..10].to_vec(),
        ),
        (
            "err-truncated-payload",
            "full batch cut one byte short",
            batch_frame[..batch_frame.len() - 1].to_vec(),
        ),
        (
            "err-trailing-frame",
            "hello followed by one extra byte",
            long_frame,
        ),
        (
            "err-trailing-payload",
            "audit ack whose declared payload has a byte after the message",
            raw(MessageKind::AuditAck, &trailing_in_payload),
        ),
        (
            "err-unsupported-version",
            "hello in a version-65535 frame",
            v3,
        ),
        ("err-unknown-kind", "kind 10", unknown_kind),
        ("err-unknown-compression", "compression 2", unknown_comp),
        (
            "err-compression-not-allowed",
            "hello marked as zstd",
            hello_zstd,
        ),
        (
            "err-oversize-batch",
            "batch header declaring 16 MiB + 1 of content",
            header(
                MessageKind::Batch,
                Compression::None,
                0,
                16 * 1024 * 1024 + 1,
            ),
        ),
        (
            "err-oversize-hello",
            "hello header declaring 2 KiB",
            header(MessageKind::Hello, Compression::None, 2048, 2048),
        ),
        (
            "err-length-mismatch",
            "uncompressed hello whose content length differs from its payload length",
            mismatch,
        ),
        (
            "err-decompression-bomb",
            "8 MiB of zeros compressed, declared as 64 KiB",
            frame(MessageKind::Batch, Compression::Zstd, &bomb, 64 * 1024),
        ),
        (
            "err-decompressed-length-mismatch",
            "compressed batch declaring 10 bytes more than it inflates to",
            frame(
                MessageKind::Batch,
                Compression::Zstd,
                &compressed,
                batch_payload.len() + 10,
            ),
        ),
        (
            "err-non-canonical-varint",
            "audit ack with 5 encoded as the overlong varint 85 00",
            raw(MessageKind::AuditAck, &[0x85, 0x00]),
        ),
        (
            "err-unknown-enum-tag",
            "error message with error code 200",
            raw(MessageKind::Error, &[0xc8, 0x01, 0, 0]),
        ),
        (
            "err-invalid-nhs-number",
            "batch removal naming 4123456879, which fails Modulus 11",
            invalid_nhs,
        ),
        (
            "err-invalid-date",
            "alert period starting on 30 February",
            bad_date,
        ),
        (
            "err-invalid-sctid",
            "alert code with a wrong Verhoeff check digit",
            bad_sctid,
        ),
        (
            "err-invalid-text",
            "error message containing a terminal escape",
            raw(MessageKind::Error, &error_with_escape),
        ),
        (
            "err-invalid-budget",
            "pull with a 1 KiB budget, under the minimum",
            raw(MessageKind::Pull, &budget_too_small),
        ),
        (
            "err-too-many-items",
            "enrol response with a chain of five certificates (limit four)",
            raw(MessageKind::EnrolResponse, &five_certs),
        ),
        (
            "err-objected-and-upserted",
            "batch that objects a patient and upserts the same patient",
            objected_upsert,
        ),
        (
            "err-bad-bool",
            "empty batch whose `more` flag is 2",
            bad_bool,
        ),
    ]
}
