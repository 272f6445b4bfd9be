//! Writes the schema-v4 store fixture in `tests/fixtures/store-v4/` (kept forever: the test
//! `store_fixture::v4_fixture_opens_with_current_code` opens it with every later version).
//! It was run once with the schema-4 build (the last whose patient records are not compressed); it refuses to overwrite an existing fixture,
//! and refuses to run with a build of another schema.
//!
//! It holds the v2 fixture's content (`tests/fixture_content_v2.rs`), sealed under schema 4 (the last whose records are not compressed).
//!
//! `cargo run --example make_store_fixture_v4`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::indexing_slicing,
    reason = "a tool run by hand: a panic is a failed run"
)]

use std::path::Path;

use carecache::crypto::RootKey;
use carecache::keysource::SourceKind;
use carecache::store::{SCHEMA_VERSION, Store};

#[path = "../tests/fixture_content_v2.rs"]
mod fixture_content_v2;

fn main() {
    assert_eq!(
        SCHEMA_VERSION, 4,
        "the v4 fixture is written by the schema-4 build"
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v4");
    assert!(
        !dir.exists(),
        "{} exists: fixtures are kept forever",
        dir.display()
    );
    let root = RootKey::from_bytes(fixture_content_v2::ROOT_KEY);
    let store = Store::create(&dir, &root, SourceKind::KeyFile, None).unwrap();
    for batch in fixture_content_v2::batches() {
        store.apply_batch(&batch).unwrap();
    }
    drop(store);
    println!("wrote {}", dir.display());
}
