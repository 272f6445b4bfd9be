//! proptest strategies for every v1 message, built through the public constructors so
//! that each generated value is one a peer could legitimately send.
#![allow(dead_code, unreachable_pub)] // Each test binary uses part of this module.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use sync_protocol::audit::{
    Access, AuditAction, AuditEntry, AuditEvent, AuditOutcome, AuditRecord, AuthFailure,
    DenyReason, KeyEvent, LeaseEnd, LookupEvent, LookupOutcome, Purpose, SectionKind, SectionShown,
    Shown, SyncOutcome,
};
use sync_protocol::message::*;
use sync_protocol::record::*;
use sync_protocol::types::*;
use sync_protocol::{Message, NhsNumber};

pub fn nhs() -> impl Strategy<Value = NhsNumber> {
    (0u32..1_000_000_000).prop_filter_map("stem without a check digit", NhsNumber::from_stem)
}

pub fn text<const N: usize>() -> impl Strategy<Value = Text<N>> {
    // Printable text including non-ASCII, tab and newline, within the byte limit.
    "[ -~\t\né£ÿ€😀]{0,24}".prop_map(|mut s| {
        while s.len() > N {
            s.pop();
        }
        Text::new(s).expect("printable and within the limit")
    })
}

fn ascii(min: usize, max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9]{{{min},{max}}}")).expect("regex")
}

pub fn ods() -> impl Strategy<Value = OdsCode> {
    "[A-Z0-9]{3,10}".prop_map(|s| OdsCode::new(s).expect("matches the ODS rule"))
}

pub fn staff() -> impl Strategy<Value = StaffId> {
    ascii(1, 32).prop_map(|s| StaffId::new(s).expect("staff id"))
}

pub fn source_id() -> impl Strategy<Value = SourceId> {
    ascii(1, 64).prop_map(|s| SourceId::new(s).expect("source id"))
}

pub fn timestamp() -> impl Strategy<Value = Timestamp> {
    (0..Timestamp::END).prop_map(|ms| Timestamp::from_millis(ms).expect("in range"))
}

pub fn date() -> impl Strategy<Value = Date> {
    prop_oneof![
        (1800u16..=2200, 1u8..=12, 1u8..=28)
            .prop_map(|(y, m, d)| Date::ymd(y, m, d).expect("valid")),
        (1800u16..=2200, 1u8..=12).prop_map(|(y, m)| Date::ym(y, m).expect("valid")),
        (1800u16..=2200).prop_map(|y| Date::year_only(y).expect("valid")),
    ]
}

pub fn sctid() -> impl Strategy<Value = SctId> {
    // Exactly one final digit completes a stem (Verhoeff detects every single-digit change).
    (10_000u64..100_000_000_000_000_000).prop_map(|stem| {
        (0..10)
            .find_map(|d| SctId::new(stem * 10 + d).ok())
            .expect("one check digit fits")
    })
}

pub fn code() -> impl Strategy<Value = Code> {
    prop_oneof![
        sctid().prop_map(Code::Snomed),
        sctid().prop_map(Code::Dmd),
        text().prop_map(Code::ReadV2),
        text().prop_map(Code::Ctv3),
        (text(), text()).prop_map(|(system, code)| Code::Other { system, code }),
    ]
}

pub fn coding() -> impl Strategy<Value = Coding> {
    (option::of(code()), text()).prop_map(|(code, display)| Coding { code, display })
}

pub fn provenance() -> impl Strategy<Value = Provenance> {
    (
        option::of(ods()),
        option::of(text()),
        option::of(timestamp()),
    )
        .prop_map(|(organisation, recorded_by, last_updated)| Provenance {
            organisation,
            recorded_by,
            last_updated,
        })
}

fn period() -> impl Strategy<Value = Period> {
    (option::of(date()), option::of(date())).prop_map(|(a, b)| match (a, b) {
        (Some(a), Some(b)) if a > b => Period::new(Some(b), Some(a)).expect("ordered"),
        (a, b) => Period::new(a, b).expect("ordered or open"),
    })
}

pub fn alert() -> impl Strategy<Value = Alert> {
    (
        source_id(),
        prop_oneof![
            Just(AlertCategory::CommunicationNeed),
            Just(AlertCategory::ReasonableAdjustment),
            Just(AlertCategory::ClinicalWarning),
            Just(AlertCategory::TreatmentRestriction),
            Just(AlertCategory::Safeguarding),
            Just(AlertCategory::EndOfLife),
            Just(AlertCategory::Other),
        ],
        coding(),
        option::of(text()),
        period(),
        prop_oneof![
            Just(AlertSeverity::Information),
            Just(AlertSeverity::Warning),
            Just(AlertSeverity::HighRisk)
        ],
        provenance(),
    )
        .prop_map(
            |(source_id, category, code, detail, period, severity, provenance)| Alert {
                source_id,
                category,
                code,
                detail,
                period,
                severity,
                provenance,
            },
        )
}

fn reaction() -> impl Strategy<Value = Reaction> {
    (
        option::of(coding()),
        option::of(text()),
        option::of(prop_oneof![
            Just(ReactionSeverity::Mild),
            Just(ReactionSeverity::Moderate),
            Just(ReactionSeverity::Severe)
        ]),
    )
        .prop_map(|(manifestation, description, severity)| Reaction {
            manifestation,
            description,
            severity,
        })
}

pub fn allergy() -> impl Strategy<Value = Allergy> {
    (
        allergy_fields(),
        option::of(prop_oneof![
            Just(AllergyVerification::Unconfirmed),
            Just(AllergyVerification::Provisional),
            Just(AllergyVerification::Differential),
            Just(AllergyVerification::Confirmed),
        ]),
    )
        .prop_map(|(mut a, v)| {
            a.verification = v;
            a
        })
}

fn allergy_fields() -> impl Strategy<Value = Allergy> {
    (
        source_id(),
        coding(),
        option::of(prop_oneof![
            Just(AllergyCategory::Food),
            Just(AllergyCategory::Medication),
            Just(AllergyCategory::Environment),
            Just(AllergyCategory::Biologic)
        ]),
        option::of(prop_oneof![
            Just(Criticality::Low),
            Just(Criticality::High),
            Just(Criticality::UnableToAssess)
        ]),
        prop_oneof![
            Just(AllergyStatus::Active),
            Just(AllergyStatus::Inactive),
            Just(AllergyStatus::Resolved)
        ],
        vec(reaction(), 0..3),
        option::of(date()),
        option::of(text()),
        provenance(),
    )
        .prop_map(
            |(
                source_id,
                substance,
                category,
                criticality,
                status,
                reactions,
                onset,
                note,
                provenance,
            )| {
                Allergy {
                    source_id,
                    substance,
                    category,
                    criticality,
                    status,
                    reactions: BoundedVec::try_from(reactions).expect("under limit"),
                    onset,
                    note,
                    provenance,
                    verification: None,
                }
            },
        )
}

pub fn medication() -> impl Strategy<Value = Medication> {
    (
        medication_fields(),
        option::of(date()),
        option::of(dosage()),
    )
        .prop_map(|(mut m, ended, dosage)| {
            m.ended = ended;
            m.dosage = dosage;
            m
        })
}

fn dosage() -> impl Strategy<Value = Dosage> {
    (
        option::of((0u32..10_000, option::of(text()))),
        option::of(1u16..24),
        option::of(1u32..100),
        option::of(prop_oneof![
            Just(PeriodUnit::Hour),
            Just(PeriodUnit::Day),
            Just(PeriodUnit::Week)
        ]),
        option::of(coding()),
        any::<bool>(),
    )
        .prop_map(
            |(dose, frequency, period, period_unit, route, as_needed)| Dosage {
                dose: dose.map(|(v, unit)| DoseQuantity {
                    value: Decimal::from_f64(f64::from(v) / 4.0).unwrap(),
                    unit,
                }),
                frequency,
                period: period.map(|p| Decimal::from_f64(f64::from(p)).unwrap()),
                period_unit,
                route,
                as_needed,
            },
        )
}

fn medication_fields() -> impl Strategy<Value = Medication> {
    (
        source_id(),
        coding(),
        option::of(text()),
        prop_oneof![
            Just(MedicationStatus::Active),
            Just(MedicationStatus::Completed),
            Just(MedicationStatus::Stopped),
            Just(MedicationStatus::OnHold),
            Just(MedicationStatus::Intended),
            Just(MedicationStatus::Unknown)
        ],
        option::of(prop_oneof![
            Just(Course::Acute),
            Just(Course::Repeat),
            Just(Course::RepeatDispensing)
        ]),
        option::of(date()),
        option::of(date()),
        any::<bool>(),
        provenance(),
    )
        .prop_map(
            |(
                source_id,
                medicine,
                dose_text,
                status,
                course,
                started,
                last_issued,
                prescribed_elsewhere,
                provenance,
            )| {
                Medication {
                    source_id,
                    medicine,
                    dose_text,
                    status,
                    course,
                    started,
                    last_issued,
                    prescribed_elsewhere,
                    provenance,
                    ended: None,
                    dosage: None,
                }
            },
        )
}

fn contact() -> impl Strategy<Value = KeyContact> {
    (
        prop_oneof![
            Just(ContactRole::NextOfKin),
            Just(ContactRole::Carer),
            Just(ContactRole::PowerOfAttorney),
            Just(ContactRole::KeyWorker),
            Just(ContactRole::Other)
        ],
        text(),
        option::of(text()),
        option::of(text()),
        provenance(),
    )
        .prop_map(|(role, name, relationship, phone, provenance)| KeyContact {
            role,
            name,
            relationship,
            phone,
            provenance,
        })
}

fn section<T: std::fmt::Debug + Clone, const N: usize>(
    item: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Section<T, N>> {
    prop_oneof![
        Just(Section::NotAvailable),
        Just(Section::NoneRecorded),
        Just(Section::WithheldByPatient),
        vec(item, 1..4).prop_map(|v| Section::from_items(v).expect("under limit")),
    ]
}

fn demographics() -> impl Strategy<Value = Demographics> {
    (
        text(),
        text(),
        option::of(text()),
        date(),
        prop_oneof![
            Just(Sex::Male),
            Just(Sex::Female),
            Just(Sex::Other),
            Just(Sex::Unknown)
        ],
        option::of("[A-Z0-9]{2,4}".prop_map(|s| PostcodeDistrict::new(s).expect("district"))),
        option::of(ods()),
        any::<bool>(),
    )
        .prop_map(
            |(family, given, prefix, birth_date, sex, pc, gp, restricted)| {
                let name = HumanName {
                    family,
                    given,
                    prefix,
                };
                let (pc, gp) = if restricted { (None, None) } else { (pc, gp) };
                Demographics::new(name, birth_date, sex, pc, gp, restricted).expect("consistent")
            },
        )
}

pub fn record() -> impl Strategy<Value = PatientRecord> {
    (
        nhs(),
        any::<u64>(),
        demographics(),
        section(alert()),
        section(allergy()),
        section(medication()),
        section(contact()),
        any::<u16>(),
        any::<[u16; 4]>(),
    )
        .prop_map(
            |(
                nhs_number,
                v,
                demographics,
                alerts,
                allergies,
                medications,
                contacts,
                withheld,
                u,
            )| {
                PatientRecord {
                    nhs_number,
                    version: RecordVersion(v),
                    demographics,
                    alerts,
                    allergies,
                    medications,
                    contacts,
                    withheld,
                    unreadable: Unreadable {
                        alerts: u[0],
                        allergies: u[1],
                        medications: u[2],
                        contacts: u[3],
                    },
                }
            },
        )
}

fn cursor() -> impl Strategy<Value = Cursor> {
    vec(any::<u8>(), 1..=64).prop_map(|b| Cursor::new(b).expect("1-64 bytes"))
}

fn der() -> impl Strategy<Value = Bytes<MAX_DER>> {
    vec(any::<u8>(), 0..200).prop_map(|b| Bytes::try_from(b).expect("small"))
}

fn lease() -> impl Strategy<Value = Lease> {
    (
        any::<u64>(),
        text(),
        prop_oneof![
            Just(Audience::Team),
            vec(staff(), 0..4).prop_map(|v| Audience::Users(BoundedVec::try_from(v).expect("few")))
        ],
        prop_oneof![Just(View::Clinical), Just(View::SocialCare)],
        0..Timestamp::END - 1,
        1u64..1_000_000_000,
        60u32..,
        any::<bool>(),
        vec(nhs(), 0..20),
    )
        .prop_map(
            |(id, label, audience, view, nb, len, max_offline, emergency, patients)| {
                let na = (nb + len).min(Timestamp::END - 1);
                Lease::new(
                    LeaseId(id),
                    label,
                    audience,
                    view,
                    Timestamp::from_millis(nb).expect("range"),
                    Timestamp::from_millis(na).expect("range"),
                    max_offline,
                    emergency,
                    BoundedVec::try_from(patients).expect("few"),
                )
                .expect("valid lease")
            },
        )
}

fn lease_change() -> impl Strategy<Value = LeaseChange> {
    prop_oneof![
        lease().prop_map(LeaseChange::Granted),
        lease().prop_map(LeaseChange::Changed),
        (
            any::<u64>(),
            prop_oneof![
                Just(LeaseEndReason::Revoked),
                Just(LeaseEndReason::AssignmentEnded),
                Just(LeaseEndReason::Superseded)
            ]
        )
            .prop_map(|(id, reason)| LeaseChange::Revoked {
                id: LeaseId(id),
                reason
            }),
    ]
}

fn removal_reason() -> impl Strategy<Value = RemovalReason> {
    prop_oneof![
        Just(RemovalReason::Objection),
        Just(RemovalReason::LeftCaseload),
        Just(RemovalReason::LeaseEnded),
        Just(RemovalReason::Sensitive),
        Just(RemovalReason::DeletedUpstream),
    ]
}

pub fn batch() -> impl Strategy<Value = Batch> {
    (
        vec((nhs(), any::<bool>(), timestamp()), 0..4),
        vec(lease_change(), 0..3),
        vec(record(), 0..3),
        vec((nhs(), removal_reason()), 0..4),
        cursor(),
        any::<bool>(),
        timestamp(),
        (
            any::<u32>(),
            any::<[u8; 32]>(),
            vec((nhs(), any::<u64>()), 0..4),
            any::<u32>(),
            any::<u32>(),
        ),
    )
        .prop_map(
            |(
                objections,
                leases,
                upserts,
                removals,
                next_cursor,
                more,
                hub_time,
                (n, h, offers, wants_done, expected),
            )| {
                // Make the parts consistent: no patient twice, no objected patient upserted,
                // no lease twice.
                let mut seen = std::collections::HashSet::new();
                let objections: Vec<_> = objections
                    .into_iter()
                    .filter(|(n, _, _)| seen.insert(*n))
                    .map(|(nhs_number, objected, recorded_at)| ObjectionChange {
                        nhs_number,
                        status: if objected {
                            ObjectionStatus::Objected
                        } else {
                            ObjectionStatus::Withdrawn
                        },
                        recorded_at,
                    })
                    .collect();
                let mut touched: std::collections::HashSet<_> =
                    objections.iter().map(|o| o.nhs_number).collect();
                let upserts: Vec<_> = upserts
                    .into_iter()
                    .filter(|r| touched.insert(r.nhs_number))
                    .collect();
                let removals: Vec<_> = removals
                    .into_iter()
                    .filter(|(n, _)| touched.insert(*n))
                    .map(|(nhs_number, reason)| Removal { nhs_number, reason })
                    .collect();
                let objected: std::collections::HashSet<_> = objections
                    .iter()
                    .filter(|o| o.status == ObjectionStatus::Objected)
                    .map(|o| o.nhs_number)
                    .collect();
                let offers: Vec<_> = offers
                    .into_iter()
                    .filter(|(n, _)| !objected.contains(n) && touched.insert(*n))
                    .map(|(nhs_number, v)| Offer {
                        nhs_number,
                        version: RecordVersion(v),
                    })
                    .collect();
                let mut ids = std::collections::HashSet::new();
                let leases: Vec<_> = leases
                    .into_iter()
                    .filter(|l| ids.insert(l.lease_id()))
                    .collect();
                Batch::new(
                    BoundedVec::try_from(objections).expect("few"),
                    BoundedVec::try_from(leases).expect("few"),
                    BoundedVec::try_from(upserts).expect("few"),
                    BoundedVec::try_from(removals).expect("few"),
                    next_cursor,
                    more,
                    hub_time,
                    AllowedSetDigest {
                        patients: n,
                        sha256: Hash32(h),
                    },
                )
                .and_then(|b| b.with_progress(BoundedVec::try_from(offers)?, wants_done, expected))
                .expect("consistent batch")
            },
        )
}

/// A batch an earlier version can carry: no offers, no answered wants.
pub fn legacy_batch() -> impl Strategy<Value = Batch> {
    batch().prop_map(|b| {
        let expected = b.expected;
        b.with_progress(BoundedVec::new(), 0, expected)
            .expect("still consistent")
    })
}

fn access() -> impl Strategy<Value = Access> {
    (
        any::<u64>(),
        text(),
        option::of(staff()),
        option::of(text()),
        option::of(prop_oneof![
            Just(Purpose::Treat),
            text().prop_map(|reason| Purpose::EmergencyTreat { reason })
        ]),
        prop_oneof![
            Just(AuditAction::ListCaseload),
            Just(AuditAction::SearchPatient),
            Just(AuditAction::ReadSummary),
            Just(AuditAction::ReadAllergies)
        ],
        option::of(nhs()),
        vec(nhs(), 0..4),
        option::of(any::<u64>().prop_map(LeaseId)),
        option::of(prop_oneof![Just(View::Clinical), Just(View::SocialCare)]),
        vec(
            prop_oneof![
                any::<u16>().prop_map(SectionShown::Items),
                Just(SectionShown::NoneRecorded),
                Just(SectionShown::NotAvailable)
            ]
            .prop_map(|shown| Shown {
                section: SectionKind::Allergies,
                shown,
            }),
            0..4,
        ),
        prop_oneof![
            Just(AuditOutcome::Served),
            Just(AuditOutcome::Denied(DenyReason::Objected)),
            Just(AuditOutcome::Denied(DenyReason::LeaseExpired)),
            Just(AuditOutcome::Denied(DenyReason::BadRequest)),
            Just(AuditOutcome::Denied(DenyReason::NotOnCaseload))
        ],
    )
        .prop_map(
            |(
                request_id,
                client,
                user,
                role,
                purpose,
                action,
                patient,
                listed,
                lease,
                view,
                shown,
                outcome,
            )| {
                Access {
                    request_id,
                    client,
                    user,
                    role,
                    purpose,
                    action,
                    patient,
                    listed: BoundedVec::try_from(listed).expect("within the bound"),
                    lease,
                    view,
                    shown: BoundedVec::try_from(shown).expect("within the bound"),
                    withheld: 0,
                    outcome,
                }
            },
        )
}

pub fn audit_record() -> impl Strategy<Value = AuditRecord> {
    let event = prop_oneof![
        4 => access().prop_map(AuditEvent::Access),
        1 => (any::<u64>(), option::of(text())).prop_map(|(request_id, client)| AuditEvent::AuthFailure {
            request_id,
            client,
            reason: AuthFailure::RevokedToken,
        }),
        1 => (any::<u64>(), any::<u32>()).prop_map(|(id, purged)| AuditEvent::LeaseEnded {
            lease: LeaseId(id),
            reason: LeaseEnd::Hub(LeaseEndReason::Revoked),
            purged,
        }),
        1 => any::<u32>().prop_map(|n| AuditEvent::Sync {
            outcome: SyncOutcome::Ok,
            batches: n,
            upserts: n,
            removals: 0,
            lease_changes: 1,
            resync: false,
        }),
        1 => text().prop_map(|name| AuditEvent::Key(KeyEvent::ClientAdded { name })),
        1 => (option::of(text()), timestamp(), any::<u32>()).prop_map(|(client, minute, count)| {
            AuditEvent::AuthFailures {
                client,
                reason: AuthFailure::UnknownToken,
                minute,
                count,
            }
        }),
        1 => (any::<u64>(), text(), staff(), nhs(), option::of(any::<u64>()), text(), timestamp())
            .prop_map(|(request_id, client, user, patient, under, reason, not_after)| {
                AuditEvent::Lookup(LookupEvent {
                    request_id,
                    client,
                    user,
                    proven: None,
                    patient,
                    under: under.map(LeaseId),
                    reason,
                    outcome: LookupOutcome::Granted {
                        lease: LeaseId(7),
                        not_after,
                    },
                })
            }),
    ];
    (timestamp(), timestamp(), event).prop_map(|(at, wall, event)| AuditRecord { at, wall, event })
}

pub fn push_audit() -> impl Strategy<Value = PushAudit> {
    (
        any::<[u8; 32]>(),
        1u64..u64::MAX / 2,
        vec(audit_record(), 1..5),
    )
        .prop_map(|(prev, first, records)| {
            let prev = Hash32(prev);
            let mut head = prev;
            let entries: Vec<_> = records
                .iter()
                .zip(first..)
                .map(|(r, seq)| {
                    let e = AuditEntry::seal(&head, seq, r).expect("small record");
                    head = e.hash;
                    e
                })
                .collect();
            PushAudit::new(prev, BoundedVec::try_from(entries).expect("few")).expect("consecutive")
        })
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::Malformed),
        Just(ErrorCode::UnsupportedVersion),
        Just(ErrorCode::Unauthorized),
        Just(ErrorCode::DeviceRevoked),
        Just(ErrorCode::CursorInvalid),
        Just(ErrorCode::TooLarge),
        Just(ErrorCode::RateLimited),
        Just(ErrorCode::Internal),
        Just(ErrorCode::AuditChainBroken),
        Just(ErrorCode::AuditGap),
        Just(ErrorCode::Unavailable),
        Just(ErrorCode::NotAvailable),
        Just(ErrorCode::NotPermitted),
    ]
}

pub fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        ("[A-Za-z0-9_-]{16,128}", der(), text()).prop_map(|(t, csr_der, device_label)| {
            Message::EnrolRequest(EnrolRequest {
                token: EnrolmentToken::new(t).expect("token"),
                csr_der,
                device_label,
            })
        }),
        (ascii(1, 64), der(), vec(der(), 0..3), timestamp()).prop_map(
            |(id, certificate_der, chain, hub_time)| {
                Message::EnrolResponse(EnrolResponse {
                    device_id: DeviceId::new(id).expect("id"),
                    certificate_der,
                    chain_der: BoundedVec::try_from(chain).expect("few"),
                    hub_time,
                })
            }
        ),
        (1u16..10, 0u16..10, any::<u64>(), timestamp(), text()).prop_map(
            |(min, extra, caps, t, software)| {
                Message::Hello(Hello {
                    min_version: min,
                    max_version: min + extra,
                    capabilities: Capabilities(caps),
                    device_time: t,
                    software,
                })
            }
        ),
        (
            any::<u16>(),
            any::<u64>(),
            timestamp(),
            ascii(1, 64),
            any::<u32>(),
            any::<u64>()
        )
            .prop_map(
                |(version, caps, hub_time, id, max_batch_bytes, audit_durable_through)| {
                    Message::Welcome(Welcome {
                        version,
                        capabilities: Capabilities(caps),
                        hub_time,
                        device_id: DeviceId::new(id).expect("id"),
                        max_batch_bytes,
                        audit_durable_through,
                    })
                }
            ),
        (
            option::of(cursor()),
            Pull::MIN_BUDGET..=MessageKind::Batch.max_payload(),
            any::<u32>(),
            vec(nhs(), 0..6),
        )
            .prop_map(|(cursor, max_bytes, holding, want)| {
                let mut seen = std::collections::HashSet::new();
                let want: Vec<_> = want.into_iter().filter(|n| seen.insert(*n)).collect();
                Message::Pull(Pull {
                    cursor,
                    max_bytes,
                    holding,
                    want: BoundedVec::try_from(want).expect("few"),
                })
            }),
        (nhs(), any::<u64>(), staff(), text()).prop_map(|(nhs_number, lease, staff, reason)| {
            Message::Lookup(Lookup {
                nhs_number,
                lease: LeaseId(lease),
                staff,
                reason,
            })
        }),
        (lease(), record()).prop_map(|(mut lease, record)| {
            lease.patients = BoundedVec::try_from(vec![record.nhs_number]).expect("one");
            Message::LookupGranted(Box::new(
                LookupGranted::try_from_parts(lease, record).expect("one patient"),
            ))
        }),
        batch().prop_map(Message::Batch),
        push_audit().prop_map(Message::PushAudit),
        any::<u64>().prop_map(|d| Message::AuditAck(AuditAck { durable_through: d })),
        (error_code(), text(), option::of(any::<u32>())).prop_map(
            |(code, message, retry_after_secs)| {
                Message::Error(ErrorMessage {
                    code,
                    message,
                    retry_after_secs,
                })
            }
        ),
    ]
}

/// A version-1 uncompressed frame of `kind` (1–9) around `payload`, whatever the payload is.
pub fn uncompressed_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("test payloads are small");
    let header = sync_protocol::FrameHeader {
        version: sync_protocol::codec::VERSION,
        kind: MessageKind::from_u8(kind).expect("a v1 kind"),
        compression: sync_protocol::Compression::None,
        payload_len: len,
        content_len: len,
    };
    let mut frame = header.to_bytes().to_vec();
    frame.extend_from_slice(payload);
    frame
}
