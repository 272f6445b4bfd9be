//! Batch apply against a model, with crash-and-reopen as an operation. See
//! `carecache::fuzzing::store_model::check`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = carecache::fuzzing::store_model::check(data);
});
