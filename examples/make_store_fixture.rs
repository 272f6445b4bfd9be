//! Writes the schema-v1 store fixture in `tests/fixtures/store-v1/` (kept forever: the test
//! `store_fixture::v1_fixture_opens_with_current_code` opens it with every later version).
//! Refuses to overwrite an existing fixture.
//!
//! `cargo run --example make_store_fixture`
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
use carecache::store::Store;

#[path = "../tests/fixture_content.rs"]
mod fixture_content;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1");
    assert!(
        !dir.exists(),
        "{} exists: fixtures are kept forever",
        dir.display()
    );
    let root = RootKey::from_bytes(fixture_content::ROOT_KEY);
    let store = Store::create(&dir, &root, SourceKind::KeyFile, None).unwrap();
    for batch in fixture_content::batches() {
        store.apply_batch(&batch).unwrap();
    }
    store.append_audit_many(&fixture_content::audit()).unwrap();
    drop(store);
    println!("wrote {}", dir.display());
}
