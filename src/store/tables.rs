//! Table definitions and the sealed value layout.
//!
//! A sealed value is `version u8 ‖ nonce [24] ‖ ciphertext ‖ tag [16]`; rows that own a data
//! key prefix it with the key's keyring slot (`slot u32 LE`). The associated data is
//! `"carecache" ‖ version ‖ table tag ‖ row key`, so a value moved to another row or table,
//! or presented as another schema version, does not open.

use redb::{ReadOnlyTable, ReadTransaction, TableDefinition, TableHandle, WriteTransaction};
use zeroize::Zeroizing;

use super::StoreError;
use super::migrate::SCHEMA_VERSION;
use crate::crypto::{self, Secret32};
use sync_protocol::NhsNumber;
use sync_protocol::types::RecordVersion;

/// Store metadata: schema version and store id in clear; device state sealed.
pub(crate) const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
/// Patient records by row key (keyed hash of the NHS number).
pub(crate) const PATIENTS: TableDefinition<'_, [u8; 16], &[u8]> = TableDefinition::new("patients");
/// Leases by lease id.
pub(crate) const LEASES: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("leases");
/// Objections by row key, sealed under the state key (they outlive the patient's purge).
pub(crate) const OBJECTIONS: TableDefinition<'_, [u8; 16], &[u8]> =
    TableDefinition::new("objections");
/// Audit entries by sequence, sealed under the audit key.
pub(crate) const AUDIT: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("audit");

/// Meta keys.
pub(crate) const SCHEMA: &str = "schema_version";
pub(crate) const STORE_ID: &str = "store_id";
pub(crate) const CURSOR: &str = "sync_cursor";
pub(crate) const HUB_TIME: &str = "hub_time";
/// Meta key of the anti-rollback binding (sealed): which anchor, and its expected count.
pub(crate) const ANCHOR: &str = "anchor";
/// Meta key of the audit chain's head (sealed).
pub(crate) const AUDIT_HEAD: &str = "audit_head";
/// Meta key of the last audit entry the hub acknowledged (sealed): sequence and hash, the
/// link the next upload continues from.
pub(crate) const AUDIT_ACKED: &str = "audit_acked";

/// Which table a sealed value belongs to (bound into its associated data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Table {
    Meta,
    Patients,
    Leases,
    Objections,
    Audit,
}

impl Table {
    fn tag(self) -> u8 {
        match self {
            Table::Meta => 1,
            Table::Patients => 2,
            Table::Leases => 3,
            Table::Objections => 4,
            Table::Audit => 5,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Table::Meta => META.name(),
            Table::Patients => PATIENTS.name(),
            Table::Leases => LEASES.name(),
            Table::Objections => OBJECTIONS.name(),
            Table::Audit => AUDIT.name(),
        }
    }
}

/// The associated data for a value sealed under schema `version` in `table` at `row`.
pub(crate) fn sealed_ad(version: u8, table: Table, row: &[u8]) -> Vec<u8> {
    let mut ad = Vec::with_capacity(11 + row.len());
    ad.extend_from_slice(b"carecache");
    ad.push(version);
    ad.push(table.tag());
    ad.extend_from_slice(row);
    ad
}

fn current_version() -> u8 {
    // Schema versions are small; the store refuses to run past 255.
    u8::try_from(SCHEMA_VERSION).unwrap_or(u8::MAX)
}

pub(crate) fn seal(
    key: &Secret32,
    table: Table,
    row: &[u8],
    plain: &[u8],
) -> Result<Vec<u8>, StoreError> {
    seal_after(&[], key, table, row, plain)
}

/// Seals a value for a row that owns a data key: the key's slot, then the sealed value.
pub(crate) fn seal_with_slot(
    slot: u32,
    key: &Secret32,
    table: Table,
    row: &[u8],
    plain: &[u8],
) -> Result<Vec<u8>, StoreError> {
    seal_after(&slot.to_le_bytes(), key, table, row, plain)
}

fn seal_after(
    prefix: &[u8],
    key: &Secret32,
    table: Table,
    row: &[u8],
    plain: &[u8],
) -> Result<Vec<u8>, StoreError> {
    let version = current_version();
    let mut out = Vec::with_capacity(prefix.len() + 1 + plain.len() + crypto::SEAL_OVERHEAD);
    out.extend_from_slice(prefix);
    out.push(version);
    crypto::seal_into(key, &sealed_ad(version, table, row), plain, &mut out)?;
    Ok(out)
}

pub(crate) fn unseal(
    key: &Secret32,
    table: Table,
    row: &[u8],
    value: &[u8],
) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    unseal_versioned(key, table, row, value).map(|(_, plain)| plain)
}

/// [`unseal`], with the schema version the value was sealed under: a reader whose
/// encoding changed between versions decodes by it (a record sealed under schema 1 is a
/// protocol-version-1 record).
pub(crate) fn unseal_versioned(
    key: &Secret32,
    table: Table,
    row: &[u8],
    value: &[u8],
) -> Result<(u8, Zeroizing<Vec<u8>>), StoreError> {
    let (&version, sealed) = value
        .split_first()
        .ok_or(StoreError::Damaged(table.name()))?;
    if version == 0 || u32::from(version) > SCHEMA_VERSION {
        return Err(StoreError::Damaged(table.name()));
    }
    crypto::open(key, &sealed_ad(version, table, row), sealed)
        .map(|plain| (version, plain))
        .map_err(|_| StoreError::Damaged(table.name()))
}

/// The first schema whose patient records are compressed (zstd) before they are sealed.
pub(crate) const COMPRESSED_RECORDS_FROM: u8 = 5;

/// zstd level for records: the fastest, which already halves a record.
const RECORD_LEVEL: i32 = 1;

/// Largest decompressed record accepted (a record's encoding is far smaller; a damaged or
/// hostile frame cannot make a read allocate more).
const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

thread_local! {
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Bytes in front of a compressed record: its NHS number and version (u64 BE each),
/// so the versions held are read without decompressing anything.
pub(crate) const RECORD_HEAD_LEN: usize = 16;

/// A patient record's encoding as this build seals it: the head (NHS number, version)
/// then the encoding compressed (one zstd frame that names its content size). Zeroized
/// when dropped.
pub(crate) fn pack_record(
    nhs: u64,
    version: u64,
    plain: &[u8],
) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    COMPRESSOR.with(|c| {
        let mut slot = c.borrow_mut();
        let compressor = match &mut *slot {
            Some(c) => c,
            None => slot.insert(
                zstd::bulk::Compressor::new(RECORD_LEVEL)
                    .map_err(|_| StoreError::Damaged("record compression"))?,
            ),
        };
        let mut out = Zeroizing::new(Vec::with_capacity(
            RECORD_HEAD_LEN + zstd::zstd_safe::compress_bound(plain.len()),
        ));
        out.extend_from_slice(&nhs.to_be_bytes());
        out.extend_from_slice(&version.to_be_bytes());
        let mut frame = Zeroizing::new(Vec::with_capacity(zstd::zstd_safe::compress_bound(
            plain.len(),
        )));
        compressor
            .compress_to_buffer(plain, &mut *frame)
            .map_err(|_| StoreError::Damaged("record compression"))?;
        out.extend_from_slice(&frame);
        Ok(out)
    })
}

/// Opens a patient record sealed under schema `version`: the encoding itself, or, from
/// [`COMPRESSED_RECORDS_FROM`], the decompression of what follows its head (into a
/// zeroized buffer of the frame's stated size, at most [`MAX_RECORD_BYTES`]).
pub(crate) fn unseal_record(
    key: &Secret32,
    row: &[u8],
    value: &[u8],
) -> Result<(u8, Zeroizing<Vec<u8>>), StoreError> {
    let (version, plain) = unseal_versioned(key, Table::Patients, row, value)?;
    if version < COMPRESSED_RECORDS_FROM {
        return Ok((version, plain));
    }
    let damaged = || StoreError::Damaged(Table::Patients.name());
    let frame = plain.get(RECORD_HEAD_LEN..).ok_or_else(damaged)?;
    let size = zstd::zstd_safe::get_frame_content_size(frame)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n <= MAX_RECORD_BYTES)
        .ok_or_else(damaged)?;
    DECOMPRESSOR.with(|d| {
        let mut slot = d.borrow_mut();
        let decompressor = match &mut *slot {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new().map_err(|_| damaged())?),
        };
        let mut out = Zeroizing::new(Vec::with_capacity(size));
        let n = decompressor
            .decompress_to_buffer(frame, &mut *out)
            .map_err(|_| damaged())?;
        if n != size {
            return Err(damaged());
        }
        Ok((version, out))
    })
}

/// A patient record's NHS number and version, opened (authenticated) but not decoded: from
/// the head of a compressed record, or the first two fields of an older record's encoding
/// (the same in every record version).
pub(crate) fn unseal_record_head(
    key: &Secret32,
    row: &[u8],
    value: &[u8],
) -> Result<(NhsNumber, RecordVersion), StoreError> {
    #[derive(serde::Deserialize)]
    struct Head {
        nhs_number: NhsNumber,
        version: RecordVersion,
    }
    let damaged = || StoreError::Damaged(Table::Patients.name());
    let (version, plain) = unseal_versioned(key, Table::Patients, row, value)?;
    if version < COMPRESSED_RECORDS_FROM {
        let (head, _) = postcard::take_from_bytes::<Head>(&plain).map_err(|_| damaged())?;
        return Ok((head.nhs_number, head.version));
    }
    let word = |at: usize| -> Option<u64> {
        plain
            .get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
    };
    let nhs = word(0)
        .and_then(|n| NhsNumber::from_u64(n).ok())
        .ok_or_else(damaged)?;
    let version = word(8).map(RecordVersion).ok_or_else(damaged)?;
    Ok((nhs, version))
}

pub(crate) fn split_slot(value: &[u8]) -> Result<(u32, &[u8]), StoreError> {
    match value.split_first_chunk::<4>() {
        Some((slot, rest)) => Ok((u32::from_le_bytes(*slot), rest)),
        None => Err(StoreError::Damaged("slot prefix")),
    }
}

pub(crate) fn open_read<K: redb::Key + 'static>(
    tx: &ReadTransaction,
    def: TableDefinition<'_, K, &'static [u8]>,
) -> Result<ReadOnlyTable<K, &'static [u8]>, StoreError> {
    tx.open_table(def)
        .map_err(|e| StoreError::db("open table", e))
}

pub(crate) fn open_write<'t, K: redb::Key + 'static>(
    tx: &'t WriteTransaction,
    def: TableDefinition<'_, K, &'static [u8]>,
) -> Result<redb::Table<'t, K, &'static [u8]>, StoreError> {
    tx.open_table(def)
        .map_err(|e| StoreError::db("open table", e))
}

/// Creates every table so that readers never meet a missing one.
pub(crate) fn create_all(tx: &WriteTransaction) -> Result<(), StoreError> {
    open_write(tx, META)?;
    open_write(tx, PATIENTS)?;
    open_write(tx, LEASES)?;
    open_write(tx, OBJECTIONS)?;
    open_write(tx, AUDIT)?;
    Ok(())
}
