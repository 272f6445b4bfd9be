//! NHS number parsing: accepts exactly what a separately written reference accepts, and
//! an accepted number round-trips. See `sync_protocol::nhs::check_parse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sync_protocol::nhs::check_parse(text);
    }
});
