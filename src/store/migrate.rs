//! Schema versions and migrations.
//!
//! The schema version is stored in clear in the `meta` table and bound into every sealed
//! value's associated data (the version it was sealed under). Opening a store:
//! - newer than this build → refused, nothing written;
//! - older → each migration step runs in its own write transaction that also records the
//!   new version, so a crash leaves either the old or the new version, never a mix;
//! - a version no step starts from → refused.
//!
//! Version history:
//! - 1 — tables meta, patients, leases, objections, audit (carecache 0.1).
//! - 2 — patient records are sync-protocol version-2 records (codes of any system,
//!   provenance without ODS, sections withheld at the patient's request, unreadable
//!   counts). Nothing is rewritten: a record sealed under schema 1 says so in its sealed
//!   value's version byte and is read as a version-1 record until the next sync replaces
//!   it (`Store::record`); every other table's encoding is unchanged.
//! - 3 — patient records are sync-protocol version-3 records (a medication's structured
//!   dosage). As for 2: a record sealed under schema 2 is read as a version-2 record by
//!   its version byte, nothing is rewritten.
//!
//! - 4 — the anti-rollback binding (`meta.anchor`, sealed). Nothing is rewritten; the
//!   step exists so that a build that does not check the binding refuses a store that
//!   has one rather than serve a copy it cannot vouch for.
//!
//! - 5 — patient records are compressed (zstd, one frame naming its size) before they
//!   are sealed: about half the bytes on disk and in every read. Nothing is rewritten: a
//!   record sealed under 4 or before is read uncompressed by its version byte.
//!
//! Fixtures written by versions 1, 2, 3 and 4 live in `tests/fixtures/store-v1/`,
//! `store-v2/`, `store-v3/` and `store-v4/` and are opened by every test run, forever.

use redb::{Database, ReadableDatabase, WriteTransaction};

use super::StoreError;
use super::tables::{self, META, SCHEMA, STORE_ID};

/// The schema this build writes.
pub const SCHEMA_VERSION: u32 = 5;

/// One migration: from `from` to `from + 1`.
pub(crate) struct Step {
    pub(crate) from: u32,
    pub(crate) run: fn(&WriteTransaction) -> Result<(), StoreError>,
}

/// Steps from every older version.
const STEPS: &[Step] = &[
    Step {
        from: 1,
        // Records sealed under schema 1 are read by their version byte; nothing to rewrite.
        run: |_| Ok(()),
    },
    Step {
        from: 2,
        // Likewise for schema 2.
        run: |_| Ok(()),
    },
    Step {
        from: 3,
        // The binding is written at the first open with an anchor configured.
        run: |_| Ok(()),
    },
    Step {
        from: 4,
        // Records sealed under 4 and before are read uncompressed by their version byte;
        // each is compressed when a sync next replaces it.
        run: |_| Ok(()),
    },
];

/// Writes the metadata of a new store.
pub(crate) fn initialise(db: &Database, store_id: &[u8; 16]) -> Result<(), StoreError> {
    let tx = db
        .begin_write()
        .map_err(|e| StoreError::db("initialise", e))?;
    tables::create_all(&tx)?;
    {
        let mut meta = tables::open_write(&tx, META)?;
        meta.insert(SCHEMA, SCHEMA_VERSION.to_le_bytes().as_slice())
            .map_err(|e| StoreError::db("initialise", e))?;
        meta.insert(STORE_ID, store_id.as_slice())
            .map_err(|e| StoreError::db("initialise", e))?;
    }
    tx.commit().map_err(|e| StoreError::db("initialise", e))
}

/// Checks the store id and schema version; runs migrations for an older schema.
pub(crate) fn check_and_upgrade(db: &Database, store_id: &[u8; 16]) -> Result<(), StoreError> {
    let (found, id) = read_meta(db)?;
    if id != *store_id {
        return Err(StoreError::StoreMismatch);
    }
    run(db, found, SCHEMA_VERSION, STEPS)
}

/// Reads the schema version without opening the database for writing, so that a store from
/// a newer carecache is refused before this build writes a byte to it. `None` if the file
/// cannot be opened read-only (for example it needs repair); the normal open then decides.
pub(crate) fn peek_version(path: &std::path::Path) -> Result<Option<u32>, StoreError> {
    let Ok(db) = Database::builder().open_read_only(path) else {
        return Ok(None);
    };
    let Ok(tx) = db.begin_read() else {
        return Ok(None);
    };
    let Ok(meta) = tx.open_table(META) else {
        return Ok(None);
    };
    let version = meta
        .get(SCHEMA)
        .ok()
        .flatten()
        .and_then(|v| <[u8; 4]>::try_from(v.value()).ok())
        .map(u32::from_le_bytes);
    if let Some(found) = version.filter(|v| *v > SCHEMA_VERSION) {
        return Err(StoreError::NewerSchema {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(version)
}

fn read_meta(db: &Database) -> Result<(u32, [u8; 16]), StoreError> {
    let tx = db.begin_read().map_err(|e| StoreError::db("open", e))?;
    let meta = match tx.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return Err(StoreError::Damaged("meta"));
        }
        Err(e) => return Err(StoreError::db("open", e)),
    };
    let version = meta
        .get(SCHEMA)
        .map_err(|e| StoreError::db("open", e))?
        .and_then(|v| <[u8; 4]>::try_from(v.value()).ok())
        .map(u32::from_le_bytes)
        .ok_or(StoreError::Damaged("meta"))?;
    let id = meta
        .get(STORE_ID)
        .map_err(|e| StoreError::db("open", e))?
        .and_then(|v| <[u8; 16]>::try_from(v.value()).ok())
        .ok_or(StoreError::Damaged("meta"))?;
    Ok((version, id))
}

/// Brings a store from `found` to `target` with `steps`.
pub(crate) fn run(
    db: &Database,
    found: u32,
    target: u32,
    steps: &[Step],
) -> Result<(), StoreError> {
    if found > target {
        return Err(StoreError::NewerSchema {
            found,
            supported: target,
        });
    }
    let mut version = found;
    while version < target {
        let step = steps
            .iter()
            .find(|s| s.from == version)
            .ok_or(StoreError::NoMigration(version))?;
        let tx = db.begin_write().map_err(|e| StoreError::db("migrate", e))?;
        (step.run)(&tx)?;
        {
            let mut meta = tables::open_write(&tx, META)?;
            meta.insert(SCHEMA, (version + 1).to_le_bytes().as_slice())
                .map_err(|e| StoreError::db("migrate", e))?;
        }
        tx.commit().map_err(|e| StoreError::db("migrate", e))?;
        tracing::info!(from = version, to = version + 1, "store schema migrated");
        version += 1;
    }
    Ok(())
}

/// Sets the stored schema version (tests make "future" and "past" stores with it).
#[doc(hidden)]
pub fn force_schema_version(db_path: &std::path::Path, version: u32) -> Result<(), StoreError> {
    let db = Database::open(db_path).map_err(|e| StoreError::db("open", e))?;
    let tx = db.begin_write().map_err(|e| StoreError::db("write", e))?;
    {
        let mut meta = tables::open_write(&tx, META)?;
        meta.insert(SCHEMA, version.to_le_bytes().as_slice())
            .map_err(|e| StoreError::db("write", e))?;
    }
    tx.commit().map_err(|e| StoreError::db("write", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXTRA: redb::TableDefinition<'_, u64, u64> = redb::TableDefinition::new("extra");

    fn add_extra(tx: &WriteTransaction) -> Result<(), StoreError> {
        let mut t = tx.open_table(EXTRA).map_err(|e| StoreError::db("t", e))?;
        t.insert(1, 42).map_err(|e| StoreError::db("t", e))?;
        Ok(())
    }

    fn fail(_: &WriteTransaction) -> Result<(), StoreError> {
        Err(StoreError::Refused("step failed"))
    }

    fn version(db: &Database) -> u32 {
        read_meta(db).unwrap().0
    }

    fn fresh() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::create(dir.path().join("s.redb")).unwrap();
        initialise(&db, &[7; 16]).unwrap();
        (dir, db)
    }

    #[test]
    fn steps_run_in_order_and_record_the_version() {
        let (_d, db) = fresh();
        let steps = [
            Step {
                from: 1,
                run: add_extra,
            },
            Step {
                from: 2,
                run: |_| Ok(()),
            },
        ];
        run(&db, 1, 3, &steps).unwrap();
        assert_eq!(version(&db), 3);
        let tx = db.begin_read().unwrap();
        assert_eq!(
            tx.open_table(EXTRA)
                .unwrap()
                .get(1)
                .unwrap()
                .unwrap()
                .value(),
            42
        );
    }

    #[test]
    fn a_failing_step_leaves_the_previous_version_whole() {
        let (_d, db) = fresh();
        let steps = [
            Step {
                from: 1,
                run: add_extra,
            },
            Step { from: 2, run: fail },
        ];
        assert!(matches!(
            run(&db, 1, 3, &steps),
            Err(StoreError::Refused(_))
        ));
        assert_eq!(version(&db), 2, "first step committed, second rolled back");
    }

    #[test]
    fn newer_and_unknown_versions_are_refused() {
        let (_d, db) = fresh();
        let newer = SCHEMA_VERSION + 1;
        assert!(matches!(
            run(&db, newer, SCHEMA_VERSION, STEPS),
            Err(StoreError::NewerSchema {
                found,
                supported: SCHEMA_VERSION
            }) if found == newer
        ));
        assert!(matches!(
            run(&db, 0, SCHEMA_VERSION, STEPS),
            Err(StoreError::NoMigration(0))
        ));
        assert_eq!(version(&db), SCHEMA_VERSION);
    }
}
