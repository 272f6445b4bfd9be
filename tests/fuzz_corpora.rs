//! Replays the committed corpora of the fuzz targets in `tools/fuzz` (beside
//! `frame_decode`, replayed by the protocol crate) through the same properties, so every
//! input a fuzzer ever found interesting is checked on every run, fuzzer or not.

use std::path::Path;

use carecache::fuzzing::{HttpFixture, store_model};

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tools/fuzz/corpus")
        .join(target);
    let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    inputs.sort();
    inputs
}

#[test]
fn nhs_number_corpus_replays_against_the_reference() {
    let inputs = corpus("nhs_parse");
    let accepted = inputs
        .iter()
        .filter_map(|b| std::str::from_utf8(b).ok())
        .filter(|s| sync_protocol::nhs::check_parse(s))
        .count();
    assert!(
        inputs.len() >= 15,
        "corpus has only {} inputs",
        inputs.len()
    );
    assert!(
        accepted >= 4,
        "only {accepted} corpus inputs are valid numbers"
    );
}

#[test]
fn store_model_corpus_replays_with_crashes() {
    let inputs = corpus("store_model");
    let crashes: usize = inputs.iter().map(|b| store_model::check(b)).sum();
    assert!(
        inputs.len() >= 20,
        "corpus has only {} inputs",
        inputs.len()
    );
    assert!(
        crashes >= 5,
        "only {crashes} crashes taken: the corpus does not test them"
    );
}

#[test]
fn http_request_corpus_replays_against_the_real_api() {
    let fixture = HttpFixture::new();
    let inputs = corpus("http_request");
    let mut ok = 0;
    let mut refused = 0;
    for input in &inputs {
        let statuses = fixture.check(input);
        ok += statuses.iter().filter(|s| **s == 200).count();
        refused += statuses.iter().filter(|s| **s == 401).count();
    }
    assert!(
        inputs.len() >= 20,
        "corpus has only {} inputs",
        inputs.len()
    );
    // The corpus reaches both sides of the token check.
    assert!(ok >= 5, "only {ok} answers were 200");
    assert!(refused >= 2, "only {refused} answers were 401");
}
