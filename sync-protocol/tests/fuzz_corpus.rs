//! Replays the committed fuzz corpus (and any crash reproductions) through the fuzz
//! target's property, so every input the fuzzer ever found interesting is checked on
//! every test run without a fuzzer installed.
#![allow(clippy::unwrap_used, reason = "test code: a panic is a failed test")]

use std::path::Path;

use sync_protocol::codec::check_roundtrip;

#[test]
fn fuzz_corpus_replays_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/fuzz/corpus/frame_decode");
    let mut inputs = 0;
    let mut accepted = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        inputs += 1;
        accepted += usize::from(check_roundtrip(&bytes));
    }
    assert!(inputs >= 30, "corpus has only {inputs} inputs");
    assert!(accepted >= 10, "only {accepted} corpus inputs decode");
}
