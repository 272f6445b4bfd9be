//! Frame decode: never panics; any accepted frame re-encodes to the same bytes
//! (uncompressed) or the same content (compressed). See `check_roundtrip`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = sync_protocol::codec::check_roundtrip(data);
});
