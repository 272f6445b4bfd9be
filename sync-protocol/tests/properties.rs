//! Property tests: every message round-trips; arbitrary and mutated bytes never panic
//! and never decode to something that re-encodes differently.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a panic is a failed test"
)]

mod common;

use proptest::prelude::*;
use sync_protocol::audit::{AuditRecord, verify_chain};
use sync_protocol::codec::{HEADER_LEN, check_roundtrip};
use sync_protocol::record::{PatientRecord, Section, v1};
use sync_protocol::{
    Compression, DecodeError, Message, decode, decode_with_limit, encode, encode_version,
};

fn strip<T: Clone, const N: usize>(s: &Section<T, N>, f: impl Fn(&mut T)) -> Section<T, N> {
    match s {
        Section::Entries(items) => {
            let mut v = items.to_vec();
            v.iter_mut().for_each(f);
            Section::from_items(v).unwrap()
        }
        other => other.clone(),
    }
}

/// A section after a trip through version 1 is the same, or "not available": never a
/// shorter list, never "none recorded" for something that had entries or was withheld.
fn same_or_not_available<T: PartialEq, const N: usize>(
    before: &Section<T, N>,
    after: &Section<T, N>,
) -> bool {
    after == before || *after == Section::NotAvailable
}

fn cases() -> u32 {
    std::env::var("CARECACHE_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn a_version_1_peer_gets_the_same_or_not_available(batch in common::legacy_batch()) {
        let frame = encode_version(&Message::Batch(batch.clone()), Compression::None, 1).unwrap();
        prop_assert_eq!(&frame[4..6], &[0, 1]);
        prop_assert!(check_roundtrip(&frame));
        let Ok(Message::Batch(back)) = decode(&frame) else {
            panic!("a version-1 batch decodes");
        };
        prop_assert_eq!(back.upserts.len(), batch.upserts.len());
        for (b, a) in batch.upserts.iter().zip(back.upserts.iter()) {
            // Version 1 has no allergy verification or medication end: items travel
            // without them.
            let mut b = b.clone();
            b.allergies = strip(&b.allergies, |x| x.verification = None);
            b.medications = strip(&b.medications, |x| {
                x.ended = None;
                x.dosage = None;
            });
            let b = &b;
            prop_assert_eq!(b.nhs_number, a.nhs_number);
            prop_assert_eq!(b.withheld, a.withheld);
            prop_assert!(same_or_not_available(&b.alerts, &a.alerts));
            prop_assert!(same_or_not_available(&b.allergies, &a.allergies));
            prop_assert!(same_or_not_available(&b.medications, &a.medications));
            prop_assert!(same_or_not_available(&b.contacts, &a.contacts));
            // Once through version 1, a record is exactly what version 1 can carry.
            let again = PatientRecord::from(v1::PatientRecord::from(a));
            prop_assert_eq!(&again, a);
        }
        prop_assert_eq!(back.objections, batch.objections);
        prop_assert_eq!(back.removals, batch.removals);
    }

    /// A version-2 peer gets every record whole but for the structured dosage (whose
    /// words are in the dose text).
    #[test]
    fn a_version_2_peer_gets_everything_but_the_structured_dosage(batch in common::legacy_batch()) {
        let frame = encode_version(&Message::Batch(batch.clone()), Compression::None, 2).unwrap();
        prop_assert_eq!(&frame[4..6], &[0, 2]);
        prop_assert!(check_roundtrip(&frame));
        let Ok(Message::Batch(back)) = decode(&frame) else {
            panic!("a version-2 batch decodes");
        };
        prop_assert_eq!(back.upserts.len(), batch.upserts.len());
        for (b, a) in batch.upserts.iter().zip(back.upserts.iter()) {
            let mut b = b.clone();
            b.medications = strip(&b.medications, |x| x.dosage = None);
            prop_assert_eq!(&b, a);
        }
        prop_assert_eq!(back.objections, batch.objections);
        prop_assert_eq!(back.removals, batch.removals);
    }

    /// Offers and answered wants exist from version 5 only: a batch carrying them cannot
    /// be framed for an earlier peer, and one without them reaches a version-4 peer
    /// whole but for the expected count (progress only).
    #[test]
    fn offers_are_version_5_only(batch in common::batch()) {
        let v4 = encode_version(&Message::Batch(batch.clone()), Compression::None, 4);
        if batch.offers.is_empty() && batch.wants_done == 0 {
            let Ok(Message::Batch(back)) = decode(&v4.unwrap()) else {
                panic!("a version-4 batch decodes");
            };
            prop_assert_eq!(back.expected, 0);
            prop_assert_eq!(&back.upserts, &batch.upserts);
            prop_assert_eq!(back.allowed, batch.allowed);
        } else {
            prop_assert!(v4.is_err());
        }
    }

    #[test]
    fn every_message_round_trips(msg in common::message(), zstd in any::<bool>()) {
        let compression = if zstd { Compression::Zstd } else { Compression::None };
        let frame = encode(&msg, compression).unwrap();
        prop_assert_eq!(decode(&frame), Ok(msg.clone()));
        prop_assert!(check_roundtrip(&frame));
        // The device's own budget applies too: a budget one byte short of the content
        // refuses the frame before decoding it.
        let content = u32::from_be_bytes(frame[12..16].try_into().unwrap());
        if content > 0 {
            let short = decode_with_limit(&frame, content - 1);
            prop_assert!(matches!(short, Err(DecodeError::Oversize { .. })), "{:?}", short);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = check_roundtrip(&bytes);
    }

    #[test]
    fn arbitrary_payload_behind_a_valid_header_never_panics(
        kind in 1u8..=9,
        payload in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let frame = common::uncompressed_frame(kind, &payload);
        let _ = check_roundtrip(&frame);
    }

    #[test]
    fn mutated_frames_are_rejected_or_canonical(
        msg in common::message(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut frame = encode(&msg, Compression::None).unwrap();
        for (at, byte) in flips {
            let i = at.index(frame.len());
            frame[i] = byte;
        }
        // Either rejected, or accepted only as a canonical encoding of what it decodes to.
        let _ = check_roundtrip(&frame);
    }

    #[test]
    fn every_truncation_is_rejected(msg in common::message()) {
        let frame = encode(&msg, Compression::Zstd).unwrap();
        for cut in [0, 3, HEADER_LEN - 1, HEADER_LEN, frame.len() / 2, frame.len() - 1] {
            if cut < frame.len() {
                prop_assert!(decode(&frame[..cut]).is_err());
            }
        }
        let mut longer = frame.clone();
        longer.push(0);
        prop_assert_eq!(decode(&longer), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn audit_chains_verify_and_any_altered_record_is_found(
        push in common::push_audit(),
        victim in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let entries = push.entries.clone().into_inner();
        let head = verify_chain(&push.prev_hash, &entries);
        prop_assert_eq!(head, Ok(entries.last().unwrap().hash));
        for e in &entries {
            prop_assert!(AuditRecord::decode(e.record.as_slice()).is_ok());
        }
        let i = victim.index(entries.len());
        let mut bytes = entries[i].record.as_slice().to_vec();
        let j = (byte as usize) % bytes.len();
        bytes[j] ^= 0x01;
        let mut tampered = entries.clone();
        tampered[i].record = bytes.try_into().unwrap();
        prop_assert_eq!(verify_chain(&push.prev_hash, &tampered), Err(entries[i].seq));
    }
}

#[test]
fn a_message_kind_is_read_from_the_header_not_guessed() {
    // An AuditAck payload under a Pull header must not decode as a Pull.
    let ack = encode(
        &Message::AuditAck(sync_protocol::message::AuditAck { durable_through: 5 }),
        Compression::None,
    )
    .unwrap();
    let mut frame = ack.clone();
    frame[6] = 5;
    assert!(decode(&frame).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// `Debug` of a whole batch or audit push (what a careless log line would print)
    /// shows no NHS number, name, date of birth or clinical text.
    #[test]
    fn debug_output_carries_no_patient_data(mut batch in common::batch(), record in common::record(), push in common::push_audit()) {
        use sync_protocol::types::{BoundedVec, Text};
        let mut record = record;
        record.demographics.name.family = Text::new("Zqxjvbnfam").unwrap();
        record.demographics.name.given = Text::new("Qwpzkgiven").unwrap();
        let nhs = record.nhs_number;
        let mut upserts: Vec<_> = batch.upserts.clone().into_inner();
        upserts.retain(|r| r.nhs_number != nhs);
        let mut removals = batch.removals.clone().into_inner();
        removals.retain(|r| r.nhs_number != nhs);
        let mut objections = batch.objections.clone().into_inner();
        objections.retain(|o| o.nhs_number != nhs);
        upserts.push(record.clone());
        batch = sync_protocol::message::Batch::new(
            BoundedVec::try_from(objections).unwrap(),
            batch.leases.clone(),
            BoundedVec::try_from(upserts).unwrap(),
            BoundedVec::try_from(removals).unwrap(),
            batch.next_cursor.clone(),
            batch.more,
            batch.hub_time,
            batch.allowed,
        ).unwrap();
        let dbg = format!("{:?} {:?}", Message::Batch(batch), Message::PushAudit(push.clone()));
        prop_assert!(!dbg.contains(&nhs.digits()));
        prop_assert!(!dbg.contains(&nhs.to_string()));
        prop_assert!(!dbg.contains("Zqxjvbnfam") && !dbg.contains("Qwpzkgiven"));
        // A year alone could appear inside a timestamp; a dashed date cannot.
        if record.demographics.birth_date.month().is_some() {
            prop_assert!(!dbg.contains(&record.demographics.birth_date.to_string()));
        }
        for a in record.alerts.entries() {
            if a.code.display.as_str().len() >= 8 {
                prop_assert!(!dbg.contains(a.code.display.as_str()));
            }
        }
        for e in push.entries.iter() {
            let r = AuditRecord::decode(e.record.as_slice()).unwrap();
            let shown = format!("{r:?}");
            if let Some(a) = r.access() {
                for p in a.patient.iter().chain(a.listed.iter()) {
                    prop_assert!(!shown.contains(&p.digits()));
                }
                if let Some(sync_protocol::audit::Purpose::EmergencyTreat { reason }) = &a.purpose
                    && reason.as_str().len() >= 8
                {
                    prop_assert!(!shown.contains(reason.as_str()));
                }
            }
        }
    }
}
