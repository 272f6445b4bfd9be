//! Old-format fixtures, kept forever: every later version must open them.

use carecache::crypto::RootKey;
use carecache::store::Store;
use std::path::Path;

use crate::fixture_content as content;
use crate::harness::copy_tree;

#[test]
fn v1_fixture_opens_with_current_code() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1");
    // Work on a copy: opening may migrate, and the fixture itself must never change.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    copy_tree(&fixture, &dir);
    let store = Store::open(&dir, &RootKey::from_bytes(content::ROOT_KEY)).unwrap();

    let patients = content::patients();
    for r in &patients[..4] {
        assert_eq!(store.record(&r.nhs_number).unwrap().as_ref(), Some(r));
    }
    assert!(store.record(&content::objected()).unwrap().is_none());
    assert!(store.objected(&content::objected()).unwrap());
    assert_eq!(store.leases().unwrap(), vec![content::lease()]);
    assert_eq!(store.cursor().unwrap(), Some(content::cursor()));
    assert_eq!(store.audit_entries(0, 10).unwrap(), content::audit());
    let stats = store.stats().unwrap();
    assert_eq!((stats.patients, stats.leases, stats.key_slots), (4, 1, 5));
    assert_eq!(
        store.hub_time().unwrap(),
        Some(content::batches()[0].hub_time)
    );
}
