//! Decoding never allocates more than a fixed multiple of the content it was given:
//! a hostile length prefix cannot make the decoder reserve memory ahead of real input.
//! Its own test binary, and its tests take turns (`serial`), so no other test allocates
//! while one measures.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "test code: a panic is a failed test"
)]

mod common;

use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use std::alloc::System;
use std::sync::{Mutex, MutexGuard};
use sync_protocol::{Compression, decode, encode};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The bound stated in SPEC.md ("Limits"): peak heap while decoding is at most
/// 64 × the content length + 64 KiB.
fn bound(content_len: usize) -> usize {
    64 * content_len + 64 * 1024
}

/// Bytes allocated (not freed) at the worst point is not directly exposed; the total
/// allocated during the call is an upper bound on the peak, and that is what is checked.
fn allocated_by(f: impl FnOnce()) -> usize {
    let region = Region::new(GLOBAL);
    f();
    region.change().bytes_allocated
}

/// The allocator counts every thread: tests in this binary hold this for their whole run.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn content_len(frame: &[u8]) -> usize {
    frame
        .get(12..16)
        .map_or(0, |b| u32::from_be_bytes(b.try_into().unwrap()) as usize)
}

#[test]
fn arbitrary_input_allocates_within_bound() {
    let _turn = serial();
    let input = (1u8..=9, proptest::collection::vec(any::<u8>(), 0..2048));
    TestRunner::new(ProptestConfig::with_cases(512))
        .run(&input, |(kind, payload)| {
            let frame = common::uncompressed_frame(kind, &payload);
            let used = allocated_by(|| {
                let _ = decode(&frame);
            });
            prop_assert!(
                used <= bound(payload.len()),
                "{} bytes for {} bytes of content",
                used,
                payload.len()
            );
            Ok(())
        })
        .unwrap();
}

#[test]
fn valid_messages_allocate_within_bound() {
    let _turn = serial();
    TestRunner::new(ProptestConfig::with_cases(512))
        .run(&common::message(), |msg| {
            let frame = encode(&msg, Compression::Zstd).unwrap();
            let used = allocated_by(|| {
                let _ = decode(&frame);
            });
            prop_assert!(
                used <= bound(content_len(&frame)),
                "{} bytes for {} bytes",
                used,
                content_len(&frame)
            );
            Ok(())
        })
        .unwrap();
}

#[test]
fn declared_list_lengths_reserve_no_more_than_a_few_items_ahead_of_input() {
    let _turn = serial();
    // A batch with no objections and no leases, then 4 000 upserts declared and backed
    // by 4 000 junk bytes: each byte must not reserve a whole record in advance.
    let mut payload = vec![0x00, 0x00, 0xa0, 0x1f]; // 0, 0, varint 4000
    payload.extend_from_slice(&[0xff; 4000]);
    let mut frame = Vec::from(*b"CCSP\x00\x01\x06\x00");
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    frame.extend_from_slice(&len);
    frame.extend_from_slice(&len);
    frame.extend_from_slice(&payload);
    let used = allocated_by(|| assert!(decode(&frame).is_err()));
    let per_record = size_of::<sync_protocol::record::PatientRecord>();
    assert!(
        used < 32 * per_record,
        "{used} bytes reserved ({per_record} per record)"
    );
}

#[test]
fn a_decompression_bomb_costs_no_more_than_its_declared_size() {
    let _turn = serial();
    // 8 MiB of zeros compresses to a few hundred bytes; declare 64 KiB of content.
    let zeros = vec![0u8; 8 * 1024 * 1024];
    let bomb = zstd::bulk::compress(&zeros, 3).unwrap();
    let mut frame = Vec::from(*b"CCSP\x00\x01\x06\x01");
    frame.extend_from_slice(&u32::try_from(bomb.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&(64u32 * 1024).to_be_bytes());
    frame.extend_from_slice(&bomb);
    drop(zeros);
    let used = allocated_by(|| {
        assert_eq!(
            decode(&frame).map(|_| ()),
            Err(sync_protocol::DecodeError::DecompressionFailed)
        );
    });
    assert!(used < 1024 * 1024, "{used} bytes to refuse a bomb");
}
