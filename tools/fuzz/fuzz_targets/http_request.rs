//! Local HTTP request parsing: arbitrary bytes as one connection to the real local API.
//! See `carecache::fuzzing::HttpFixture::check`.
#![no_main]

use std::sync::OnceLock;

use carecache::fuzzing::HttpFixture;

static FIXTURE: OnceLock<HttpFixture> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = FIXTURE.get_or_init(HttpFixture::new).check(data);
});
