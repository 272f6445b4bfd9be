//! Old-format fixtures, kept forever: every later version must open them.

use carecache::crypto::RootKey;
use carecache::store::Store;
use std::path::Path;

use crate::fixture_content as content;
use crate::fixture_content_v2 as content_v2;
use crate::harness::copy_tree;

/// A copy of the fixture `name` to work on: opening may migrate, and the fixture itself
/// must never change.
fn fixture_copy(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    copy_tree(&fixture, &dir);
    (tmp, dir)
}

#[test]
fn v1_fixture_opens_with_current_code() {
    let (_tmp, dir) = fixture_copy("store-v1");
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

/// Schema 2: records sealed as protocol-version-2 records (local and dm+d codes, a
/// recorder without ODS, a section withheld at the patient's request, unreadable counts)
/// read back whole by the current build, and a sync's new records sealed beside them.
#[test]
fn v2_fixture_opens_with_current_code() {
    let (_tmp, dir) = fixture_copy("store-v2");
    let store = Store::open(&dir, &RootKey::from_bytes(content_v2::ROOT_KEY)).unwrap();
    for r in &content_v2::patients() {
        assert_eq!(store.record(&r.nhs_number).unwrap().as_ref(), Some(r));
    }
    assert_eq!(store.leases().unwrap(), vec![content_v2::lease()]);
    assert_eq!(store.cursor().unwrap(), Some(content_v2::cursor()));
    assert_eq!(
        store.hub_time().unwrap(),
        Some(content_v2::batches()[0].hub_time)
    );
    // A record of the current version replaces one sealed under schema 2.
    let mut newer = content_v2::patients()[1].clone();
    newer.version = sync_protocol::types::RecordVersion(newer.version.0 + 1);
    let batch = sync_protocol::message::Batch::new(
        sync_protocol::types::BoundedVec::new(),
        sync_protocol::types::BoundedVec::new(),
        sync_protocol::types::BoundedVec::try_from(vec![newer.clone()]).unwrap(),
        sync_protocol::types::BoundedVec::new(),
        sync_protocol::types::Cursor::new(b"hub-seq-0000010".to_vec()).unwrap(),
        false,
        sync_protocol::types::Timestamp::from_millis(1_790_000_200_000).unwrap(),
        sync_protocol::digest::allowed_set_digest(content_v2::patients().iter().map(|r| {
            if r.nhs_number == newer.nhs_number {
                (newer.nhs_number, newer.version)
            } else {
                (r.nhs_number, r.version)
            }
        })),
    )
    .unwrap();
    store.apply_batch(&batch).unwrap();
    assert_eq!(store.record(&newer.nhs_number).unwrap(), Some(newer));
    assert_eq!(
        store
            .record(&content_v2::patients()[0].nhs_number)
            .unwrap()
            .as_ref(),
        Some(&content_v2::patients()[0])
    );
}

/// Schema 3, the last without an anti-rollback binding: the same content as the v2
/// fixture opens whole under schema 4; its first open with an anchor binds it and keeps
/// its data (an upgrade); another copy of it opened later against the same anchor is a
/// copy from before the binding — its patients and lease are destroyed.
#[test]
fn v3_fixture_opens_and_is_bound_on_first_open() {
    use carecache::store::{AnchorCheck, Extras};
    use std::sync::Arc;
    use sync_protocol::message::{AnchorKind, RestoreReason};
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v3");
    let tmp = tempfile::tempdir().unwrap();
    let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
    copy_tree(&fixture, &first);
    copy_tree(&fixture, &second);
    let root = RootKey::from_bytes(content_v2::ROOT_KEY);
    let counter = Arc::new(carecache::anchor::FileCounter::new(
        &tmp.path().join("anchor/counter"),
    ));

    let store = Store::open(&first, &root).unwrap();
    for r in &content_v2::patients() {
        assert_eq!(store.record(&r.nhs_number).unwrap().as_ref(), Some(r));
    }
    assert_eq!(store.leases().unwrap(), vec![content_v2::lease()]);
    assert_eq!(store.anchor_binding().unwrap(), None);
    let check = store
        .bind_anchor(counter.clone(), |_| Ok(Extras::default()))
        .unwrap();
    assert_eq!(check, AnchorCheck::Bound);
    assert_eq!(store.anchor_binding().unwrap().unwrap().0, AnchorKind::File);
    for r in &content_v2::patients() {
        assert_eq!(store.record(&r.nhs_number).unwrap().as_ref(), Some(r));
    }
    drop(store);
    // Bound: reopened, it is the live store.
    let store = Store::open(&first, &root).unwrap();
    let check = store
        .bind_anchor(counter.clone(), |_| Ok(Extras::default()))
        .unwrap();
    assert_eq!(check, AnchorCheck::Verified);
    assert_eq!(store.leases().unwrap().len(), 1);
    drop(store);

    let copy = Store::open(&second, &root).unwrap();
    let check = copy
        .bind_anchor(counter, |_| Ok(Extras::default()))
        .unwrap();
    assert_eq!(
        check,
        AnchorCheck::Restored {
            reason: RestoreReason::Unbound,
            patients: content_v2::patients().len() as u64,
            leases: 1,
        }
    );
    assert!(copy.leases().unwrap().is_empty());
    assert_eq!(copy.stats().unwrap().patients, 0);
    assert_eq!(
        copy.cursor().unwrap(),
        None,
        "the next sync starts from nothing"
    );
}

/// Schema 4, the last whose records are sealed uncompressed: the v2 content opens whole,
/// and a record a sync replaces is sealed compressed beside the old ones.
#[test]
fn v4_fixture_opens_with_current_code() {
    let (_tmp, dir) = fixture_copy("store-v4");
    let store = Store::open(&dir, &RootKey::from_bytes(content_v2::ROOT_KEY)).unwrap();
    let patients = content_v2::patients();
    for r in &patients {
        assert_eq!(store.record(&r.nhs_number).unwrap().as_ref(), Some(r));
    }
    assert_eq!(store.leases().unwrap(), vec![content_v2::lease()]);
    assert_eq!(store.cursor().unwrap(), Some(content_v2::cursor()));
    let old = store.raw_record(&patients[1].nhs_number).unwrap().unwrap();
    assert_eq!(old.ad[9], 4, "sealed under schema 4");
    store
        .put_records(std::slice::from_ref(&patients[1]))
        .unwrap();
    let new = store.raw_record(&patients[1].nhs_number).unwrap().unwrap();
    assert_eq!(new.ad[9], 5, "sealed again under schema 5");
    assert!(new.sealed.len() < old.sealed.len(), "not compressed");
    for r in &patients {
        assert_eq!(store.record(&r.nhs_number).unwrap().as_ref(), Some(r));
    }
    // The versions held, read from a compressed record's head and from the older
    // records' encodings alike.
    let mut held = store.held_versions().unwrap();
    held.sort();
    let mut expected: Vec<_> = patients.iter().map(|r| (r.nhs_number, r.version)).collect();
    expected.sort();
    assert_eq!(held, expected);
    let nhs: Vec<_> = patients.iter().map(|r| r.nhs_number).collect();
    let of = store.held_versions_of(nhs).unwrap();
    assert!(
        of.iter()
            .zip(&patients)
            .all(|((n, v), r)| *n == r.nhs_number && *v == Some(r.version))
    );
}
