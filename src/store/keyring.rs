//! The keyring: a small file of fixed-size slots, rewritten in place, that holds every
//! wrapped key of a data directory. Keeping wrapped keys out of redb is what makes purges
//! final: redb is copy-on-write, so a deleted value can survive in a free page, but a keyring
//! slot is overwritten with zeros at the same offset and fsynced (see `docs/STORE.md`).
//!
//! Layout (little-endian):
//!
//! ```text
//! 0     512  fixed header: "CCKEYRG1", format u16, slot length u16, store id [16]
//! 512   512  master slot A ┐ "CCMK", generation u64, source kind u8, 3 zero,
//! 1024  512  master slot B ┘ Argon2id m/t/p u32×3, salt [16], sealed master key [72]
//! 4096  80×n data slots: state u8, 7 zero, sealed data key [72]
//! ```
//!
//! A data slot's state byte is 0 free, 1 live, 2 pending (written for a transaction not yet
//! known to have committed), 3 dying (its owner is being purged by a transaction not yet known
//! to have committed). Pending and dying marks are durable before the redb commit; at open,
//! pending and dying slots are settled against the rows that refer to them: referenced → live,
//! unreferenced → zeroed. Live slots are never destroyed at open, so a damaged database cannot
//! make the store destroy keys it still needs.
//!
//! Master slots alternate so that a torn write during `rekey` leaves the other slot whole.
//! A master slot is sealed under the root key with the fixed header and the slot's own
//! parameters as associated data; a data slot is sealed under the wrap key with the store
//! id, its index and its owner (patient row key or lease id), so a slot copied elsewhere
//! does not open.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::crypto::{self, CryptoError, MasterKey, RootKey, RowKey, SEAL_OVERHEAD, Secret32};
use crate::keysource::{KdfParams, SALT_LEN, SourceKind};

use super::StoreError;

/// File name of the keyring inside a data directory.
pub const KEYRING_FILE: &str = "keyring";

const MAGIC: &[u8; 8] = b"CCKEYRG1";
const FORMAT: u16 = 1;
const HEADER_LEN: usize = 28;
const MASTER_AT: [u64; 2] = [512, 1024];
const MASTER_MAGIC: &[u8; 4] = b"CCMK";
const MASTER_PARAMS_LEN: usize = 44;
const MASTER_LEN: usize = MASTER_PARAMS_LEN + 32 + SEAL_OVERHEAD;
const DATA_AT: u64 = 4096;
/// Bytes of one data-key slot.
pub const SLOT_LEN: usize = 8 + 32 + SEAL_OVERHEAD;
#[allow(clippy::cast_possible_truncation, reason = "SLOT_LEN is 80")]
const SLOT_LEN_U16: u16 = SLOT_LEN as u16;
const GROW_SLOTS: u32 = 1024;
const LIVE: u8 = 1;
const PENDING: u8 = 2;
const DYING: u8 = 3;
/// The most data slots a keyring may declare (16 M slots, 1.3 GB): a larger file is damage.
const MAX_SLOTS: u64 = 1 << 24;

/// Whose data a key opens. Purging the owner destroys the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Scope {
    /// One patient's record.
    Patient(RowKey),
    /// One lease's terms and patient list.
    Lease(u64),
}

impl Scope {
    fn ad(self, store_id: &[u8; 16], slot: u32) -> Vec<u8> {
        let mut ad = Vec::with_capacity(64);
        ad.extend_from_slice(b"carecache/keyslot/v1");
        ad.extend_from_slice(store_id);
        ad.extend_from_slice(&slot.to_le_bytes());
        match self {
            Scope::Patient(row) => {
                ad.push(1);
                ad.extend_from_slice(&row.0);
            }
            Scope::Lease(id) => {
                ad.push(2);
                ad.extend_from_slice(&id.to_le_bytes());
            }
        }
        ad
    }
}

/// What is known about a keyring without its key: enough to ask for the right key.
#[derive(Clone, Debug)]
pub struct LockInfo {
    /// The store this keyring belongs to.
    pub store_id: [u8; 16],
    /// Master slots present, highest generation first: source kind and Argon2id parameters.
    pub slots: Vec<(u64, SourceKind, Option<KdfParams>)>,
}

/// An open keyring.
#[derive(Debug)]
pub(crate) struct Keyring {
    file: File,
    path: PathBuf,
    store_id: [u8; 16],
    capacity: u32,
    free: BTreeSet<u32>,
    /// Pending or dying slots found at open, to settle in [`Self::reconcile`].
    unsettled: Vec<u32>,
    generation: u64,
    active: usize,
}

impl Keyring {
    /// Creates a keyring with a fresh master key wrapped under `root`.
    pub(crate) fn create(
        dir: &Path,
        store_id: [u8; 16],
        root: &RootKey,
        kind: SourceKind,
        kdf: Option<KdfParams>,
    ) -> Result<(Self, MasterKey), StoreError> {
        let path = dir.join(KEYRING_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| StoreError::io("create keyring", &path, e))?;
        let master = MasterKey(Secret32::random()?);
        let mut ring = Self {
            file,
            path,
            store_id,
            capacity: 0,
            free: BTreeSet::new(),
            unsettled: Vec::new(),
            generation: 0,
            active: 1,
        };
        ring.write_at(0, &header_bytes(&store_id))?;
        ring.grow()?;
        ring.rewrap(&master, root, kind, kdf)?;
        Ok((ring, master))
    }

    /// Reads the public part of a keyring: which key source it expects.
    pub(crate) fn lock_info(dir: &Path) -> Result<LockInfo, StoreError> {
        let path = dir.join(KEYRING_FILE);
        let file = File::open(&path).map_err(|e| StoreError::io("open keyring", &path, e))?;
        let (store_id, slots) = read_master_slots(&file, &path)?;
        Ok(LockInfo {
            store_id,
            slots: slots
                .iter()
                .map(|m| (m.generation, m.kind, m.kdf))
                .collect(),
        })
    }

    /// Whether `root` opens this directory's keyring. Reads only.
    pub(crate) fn open_check(dir: &Path, root: &RootKey) -> Result<bool, StoreError> {
        let path = dir.join(KEYRING_FILE);
        let file = File::open(&path).map_err(|e| StoreError::io("open keyring", &path, e))?;
        Ok(find_master(&file, &path, root)?.0.is_some())
    }

    /// Opens a keyring with `root`. Nothing is written unless the key opens a master slot.
    pub(crate) fn open(dir: &Path, root: &RootKey) -> Result<(Self, MasterKey), StoreError> {
        let path = dir.join(KEYRING_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("open keyring", &path, e))?;
        let (found, store_id, newest_kind) = find_master(&file, &path, root)?;
        let Some(Unwrapped {
            generation,
            active,
            master,
        }) = found
        else {
            return Err(StoreError::WrongKey(newest_kind));
        };
        let both = other_slot_present(&file, &path, active)?;
        let len = file
            .metadata()
            .map_err(|e| StoreError::io("stat keyring", &path, e))?
            .len();
        let slots = len.saturating_sub(DATA_AT) / SLOT_LEN as u64;
        if len < DATA_AT || slots > MAX_SLOTS {
            return Err(StoreError::Keyring(format!(
                "keyring has an impossible length ({len} bytes)"
            )));
        }
        let mut ring = Self {
            file,
            path,
            store_id,
            capacity: u32::try_from(slots).unwrap_or(u32::MAX),
            free: BTreeSet::new(),
            unsettled: Vec::new(),
            generation,
            active,
        };
        // The key is right: finish or roll back an interrupted rekey by clearing the other slot.
        if both {
            ring.write_at(master_at(1 - active), &[0u8; MASTER_LEN])?;
            ring.sync()?;
        }
        ring.scan()?;
        Ok((ring, master))
    }

    /// The store this keyring belongs to.
    pub(crate) fn store_id(&self) -> &[u8; 16] {
        &self.store_id
    }

    /// Wraps the master key under a new root key in the other master slot, then clears the old
    /// slot. A crash between the two leaves both slots; the next open keeps whichever the
    /// presented key opens and clears the other.
    pub(crate) fn rewrap(
        &mut self,
        master: &MasterKey,
        root: &RootKey,
        kind: SourceKind,
        kdf: Option<KdfParams>,
    ) -> Result<(), StoreError> {
        let generation = self.generation + 1;
        let target = 1 - self.active;
        let mut params = [0u8; MASTER_PARAMS_LEN];
        params[..4].copy_from_slice(MASTER_MAGIC);
        params[4..12].copy_from_slice(&generation.to_le_bytes());
        params[12] = kind.to_u8();
        if let Some(k) = kdf {
            params[16..20].copy_from_slice(&k.memory_kib.to_le_bytes());
            params[20..24].copy_from_slice(&k.iterations.to_le_bytes());
            params[24..28].copy_from_slice(&k.parallelism.to_le_bytes());
            params[28..44].copy_from_slice(&k.salt);
        }
        let header = header_bytes(&self.store_id);
        let ad = [&header[..HEADER_LEN], &params[..]].concat();
        let mut slot = Vec::with_capacity(MASTER_LEN);
        slot.extend_from_slice(&params);
        crypto::seal_into(&root.0, &ad, master.0.expose(), &mut slot)?;
        self.write_at(master_at(target), &slot)?;
        self.sync()?;
        if self.generation > 0 {
            self.write_at(master_at(self.active), &[0u8; MASTER_LEN])?;
            self.sync()?;
        }
        self.generation = generation;
        self.active = target;
        Ok(())
    }

    /// Writes a fresh data key for `scope` into a free slot, marked pending. Not durable until
    /// [`Self::sync`]; becomes live with [`Self::confirm`] after the commit.
    pub(crate) fn allocate(
        &mut self,
        scope: Scope,
        wrap: &Secret32,
    ) -> Result<(u32, Secret32), StoreError> {
        if self.free.is_empty() {
            self.grow()?;
        }
        let slot = self
            .free
            .pop_first()
            .ok_or_else(|| StoreError::Keyring("no free key slot after growing".into()))?;
        let key = Secret32::random()?;
        let mut bytes = Zeroizing::new(Vec::with_capacity(SLOT_LEN));
        bytes.extend_from_slice(&[PENDING, 0, 0, 0, 0, 0, 0, 0]);
        crypto::seal_into(
            wrap,
            &scope.ad(&self.store_id, slot),
            key.expose(),
            &mut bytes,
        )?;
        if let Err(e) = self.write_at(slot_offset(slot), &bytes) {
            self.free.insert(slot);
            return Err(e);
        }
        Ok((slot, key))
    }

    /// A handle that unwraps keys without the keyring's lock, for readers.
    pub(crate) fn reader(&self) -> Result<SlotReader, StoreError> {
        Ok(SlotReader {
            file: self
                .file
                .try_clone()
                .map_err(|e| StoreError::io("open keyring", &self.path, e))?,
            path: self.path.clone(),
            store_id: self.store_id,
        })
    }

    /// Overwrites `slots` with zeros in place and makes that durable.
    pub(crate) fn destroy(&mut self, slots: &[u32]) -> Result<(), StoreError> {
        if slots.is_empty() {
            return Ok(());
        }
        for &slot in slots {
            self.write_at(slot_offset(slot), &[0u8; SLOT_LEN])?;
        }
        self.sync()?;
        self.free
            .extend(slots.iter().copied().filter(|&s| s < self.capacity));
        Ok(())
    }

    /// Marks the keys of rows a transaction is about to delete. Must be durable
    /// ([`Self::sync`]) before the commit, so a crash after the commit cannot leave a live key
    /// that nothing refers to.
    pub(crate) fn mark_dying(&mut self, slots: &[u32]) -> Result<(), StoreError> {
        slots.iter().try_for_each(|&s| self.set_state(s, DYING))
    }

    /// Makes pending (or dying, after a failed commit) slots live again. Needs no sync: an
    /// unsynced mark is settled the same way at the next open.
    pub(crate) fn confirm(&mut self, slots: &[u32]) -> Result<(), StoreError> {
        slots.iter().try_for_each(|&s| self.set_state(s, LIVE))
    }

    /// Settles the pending and dying slots found at open: those a row refers to become live,
    /// the rest are destroyed (left by a crash between a key write and its commit, or between
    /// a purge's commit and its key destruction). Returns how many were destroyed.
    pub(crate) fn reconcile(&mut self, referenced: &HashSet<u32>) -> Result<usize, StoreError> {
        let unsettled = std::mem::take(&mut self.unsettled);
        let (keep, orphans): (Vec<u32>, Vec<u32>) =
            unsettled.into_iter().partition(|s| referenced.contains(s));
        self.confirm(&keep)?;
        self.destroy(&orphans)?;
        Ok(orphans.len())
    }

    /// Whether pending or dying slots wait to be settled ([`Self::reconcile`]).
    pub(crate) fn has_unsettled(&self) -> bool {
        !self.unsettled.is_empty()
    }

    /// Keeps slots a failed commit left pending or dying, to be settled when the database
    /// is reopened ([`Self::reconcile`]).
    pub(crate) fn leave_unsettled(&mut self, slots: &[u32]) {
        self.unsettled.extend_from_slice(slots);
    }

    fn set_state(&self, slot: u32, state: u8) -> Result<(), StoreError> {
        if slot >= self.capacity {
            return Err(StoreError::KeyMissing);
        }
        self.write_at(slot_offset(slot), &[state])
    }

    /// fdatasync the keyring.
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        self.file
            .sync_data()
            .map_err(|e| StoreError::io("sync keyring", &self.path, e))
    }

    /// The raw bytes of a data slot (for tests that look for key material on disk).
    pub(crate) fn raw_slot(&self, slot: u32) -> Result<[u8; SLOT_LEN], StoreError> {
        if slot >= self.capacity {
            return Err(StoreError::KeyMissing);
        }
        let mut bytes = [0u8; SLOT_LEN];
        read_exact_at(&self.file, &self.path, &mut bytes, slot_offset(slot))?;
        Ok(bytes)
    }

    /// Slots in use.
    pub(crate) fn used(&self) -> usize {
        (self.capacity as usize).saturating_sub(self.free.len())
    }

    fn scan(&mut self) -> Result<(), StoreError> {
        let mut buf = vec![0u8; SLOT_LEN * 4096];
        let mut slot = 0u32;
        while slot < self.capacity {
            let n = (self.capacity - slot).min(4096);
            let chunk = buf
                .get_mut(..n as usize * SLOT_LEN)
                .ok_or_else(|| StoreError::Keyring("scan buffer".into()))?;
            read_exact_at(&self.file, &self.path, chunk, slot_offset(slot))?;
            for (s, bytes) in (slot..).zip(chunk.chunks_exact(SLOT_LEN)) {
                match bytes.first() {
                    Some(&LIVE) => {}
                    Some(&PENDING | &DYING) => self.unsettled.push(s),
                    _ => {
                        self.free.insert(s);
                    }
                }
            }
            slot += n;
        }
        Ok(())
    }

    fn grow(&mut self) -> Result<(), StoreError> {
        let capacity = self
            .capacity
            .saturating_add(GROW_SLOTS.max(self.capacity / 4));
        let len = slot_offset(capacity);
        self.file
            .set_len(len)
            .map_err(|e| StoreError::io("grow keyring", &self.path, e))?;
        // Reserve the blocks now, so a full disk fails here and not in a later overwrite.
        rustix::fs::fallocate(
            &self.file,
            rustix::fs::FallocateFlags::empty(),
            slot_offset(self.capacity),
            len - slot_offset(self.capacity),
        )
        .or_else(|e| {
            if e == rustix::io::Errno::OPNOTSUPP {
                Ok(())
            } else {
                Err(io::Error::from(e))
            }
        })
        .map_err(|e| StoreError::io("grow keyring", &self.path, e))?;
        self.free.extend(self.capacity..capacity);
        self.capacity = capacity;
        self.file
            .sync_all()
            .map_err(|e| StoreError::io("sync keyring", &self.path, e))
    }

    fn write_at(&self, at: u64, bytes: &[u8]) -> Result<(), StoreError> {
        self.file
            .write_all_at(bytes, at)
            .map_err(|e| StoreError::io("write keyring", &self.path, e))
    }
}

/// Overwrites the whole keyring with zeros, syncs, and removes it. Without the keyring no
/// record in the directory can be opened by anyone, whatever key they hold.
pub(crate) fn shred(dir: &Path) -> Result<bool, StoreError> {
    let path = dir.join(KEYRING_FILE);
    let file = match OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(StoreError::io("open keyring", &path, e)),
    };
    let len = file
        .metadata()
        .map_err(|e| StoreError::io("stat keyring", &path, e))?
        .len();
    let zeros = vec![0u8; 64 * 1024];
    let mut at = 0;
    while at < len {
        let n = usize::try_from(len - at)
            .unwrap_or(usize::MAX)
            .min(zeros.len());
        file.write_all_at(zeros.get(..n).unwrap_or(&zeros), at)
            .map_err(|e| StoreError::io("overwrite keyring", &path, e))?;
        at += n as u64;
    }
    file.sync_all()
        .map_err(|e| StoreError::io("sync keyring", &path, e))?;
    drop(file);
    fs::remove_file(&path).map_err(|e| StoreError::io("remove keyring", &path, e))?;
    Ok(true)
}

struct Unwrapped {
    generation: u64,
    active: usize,
    master: MasterKey,
}

/// One intact master slot as read from disk (not yet opened).
struct MasterSlot {
    generation: u64,
    index: usize,
    kind: SourceKind,
    kdf: Option<KdfParams>,
    bytes: [u8; MASTER_LEN],
}

/// Reads the header and the intact master slots, newest first.
fn read_master_slots(file: &File, path: &Path) -> Result<([u8; 16], Vec<MasterSlot>), StoreError> {
    let store_id = read_header(file, path)?;
    let mut slots = Vec::new();
    for (index, at) in MASTER_AT.into_iter().enumerate() {
        let mut bytes = [0u8; MASTER_LEN];
        read_exact_at(file, path, &mut bytes, at)?;
        if let Some((generation, kind, kdf)) = parse_master_params(&bytes) {
            slots.push(MasterSlot {
                generation,
                index,
                kind,
                kdf,
                bytes,
            });
        }
    }
    slots.sort_by_key(|m| std::cmp::Reverse(m.generation));
    Ok((store_id, slots))
}

/// Tries `root` on each intact master slot, newest first. Returns the unwrapped master (if
/// the key is right), the store id, and the source kind of the newest slot.
fn find_master(
    file: &File,
    path: &Path,
    root: &RootKey,
) -> Result<(Option<Unwrapped>, [u8; 16], SourceKind), StoreError> {
    let (store_id, slots) = read_master_slots(file, path)?;
    let Some(newest) = slots.first().map(|m| m.kind) else {
        return Err(StoreError::Keyring(
            "no master key slot is intact: the keyring is damaged or was wiped".into(),
        ));
    };
    let header = header_bytes(&store_id);
    for slot in &slots {
        let (params, sealed) = slot.bytes.split_at(MASTER_PARAMS_LEN);
        let ad = [&header[..HEADER_LEN], params].concat();
        if let Ok(plain) = crypto::open(&root.0, &ad, sealed) {
            let bytes: [u8; 32] = plain
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Keyring("master key has the wrong length".into()))?;
            let unwrapped = Unwrapped {
                generation: slot.generation,
                active: slot.index,
                master: MasterKey(Secret32::from_bytes(bytes)),
            };
            return Ok((Some(unwrapped), store_id, newest));
        }
    }
    Ok((None, store_id, newest))
}

fn other_slot_present(file: &File, path: &Path, active: usize) -> Result<bool, StoreError> {
    let mut buf = [0u8; MASTER_LEN];
    read_exact_at(file, path, &mut buf, master_at(1 - active))?;
    Ok(buf.iter().any(|&b| b != 0))
}

/// Offset of master slot `i` (0 = A, anything else = B).
fn master_at(i: usize) -> u64 {
    if i == 0 { MASTER_AT[0] } else { MASTER_AT[1] }
}

fn slot_offset(slot: u32) -> u64 {
    DATA_AT + u64::from(slot) * SLOT_LEN as u64
}

fn header_bytes(store_id: &[u8; 16]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&FORMAT.to_le_bytes());
    h[10..12].copy_from_slice(&SLOT_LEN_U16.to_le_bytes());
    h[12..28].copy_from_slice(store_id);
    h
}

fn read_header(file: &File, path: &Path) -> Result<[u8; 16], StoreError> {
    let mut h = [0u8; HEADER_LEN];
    read_exact_at(file, path, &mut h, 0)?;
    if &h[..8] != MAGIC {
        return Err(StoreError::Keyring(
            "not a carecache keyring (bad magic): damaged, or the wrong file".into(),
        ));
    }
    let format = u16::from_le_bytes([h[8], h[9]]);
    if format != FORMAT {
        return Err(StoreError::Keyring(format!(
            "keyring format {format} is not supported by this version (expects {FORMAT})"
        )));
    }
    if u16::from_le_bytes([h[10], h[11]]) != SLOT_LEN_U16 {
        return Err(StoreError::Keyring("keyring slot length is wrong".into()));
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&h[12..28]);
    Ok(id)
}

fn parse_master_params(buf: &[u8; MASTER_LEN]) -> Option<(u64, SourceKind, Option<KdfParams>)> {
    if &buf[..4] != MASTER_MAGIC {
        return None;
    }
    let u32_at = |i: usize| {
        buf.get(i..i + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_le_bytes)
    };
    let mut generation = [0u8; 8];
    generation.copy_from_slice(&buf[4..12]);
    let kind = SourceKind::from_u8(buf[12])?;
    let kdf = (kind == SourceKind::Passphrase).then(|| {
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&buf[28..44]);
        KdfParams {
            memory_kib: u32_at(16),
            iterations: u32_at(20),
            parallelism: u32_at(24),
            salt,
        }
    });
    Some((u64::from_le_bytes(generation), kind, kdf))
}

/// Unwraps the key in `slot` of `file`. A slot past the end (a reader's snapshot older
/// than a shrink that never happens, or damage) reads short and is a missing key.
fn unwrap_slot(
    file: &File,
    path: &Path,
    store_id: &[u8; 16],
    slot: u32,
    scope: Scope,
    wrap: &Secret32,
) -> Result<Secret32, StoreError> {
    let mut bytes = Zeroizing::new([0u8; SLOT_LEN]);
    read_exact_at(file, path, bytes.as_mut_slice(), slot_offset(slot))
        .map_err(|_| StoreError::KeyMissing)?;
    if !matches!(bytes.first(), Some(&(LIVE | PENDING | DYING))) {
        return Err(StoreError::KeyMissing);
    }
    let wrapped = bytes.get(8..).ok_or(StoreError::KeyMissing)?;
    let plain = crypto::open(wrap, &scope.ad(store_id, slot), wrapped)
        .map_err(|_| StoreError::KeyMissing)?;
    let key: [u8; 32] = plain
        .as_slice()
        .try_into()
        .map_err(|_| StoreError::KeyMissing)?;
    Ok(Secret32::from_bytes(key))
}

/// Unwraps data keys from the keyring file without its lock: readers run beside a
/// writer, which only writes free slots and the state byte of slots it is deleting (a
/// reader of an older snapshot then gets a missing key, never another row's key: the
/// slot's associated data names its owner).
#[derive(Debug)]
pub(crate) struct SlotReader {
    file: File,
    path: PathBuf,
    store_id: [u8; 16],
}

impl SlotReader {
    /// Unwraps the data key in `slot`, which must belong to `scope`.
    pub(crate) fn unwrap(
        &self,
        slot: u32,
        scope: Scope,
        wrap: &Secret32,
    ) -> Result<Secret32, StoreError> {
        unwrap_slot(&self.file, &self.path, &self.store_id, slot, scope, wrap)
    }
}

fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], at: u64) -> Result<(), StoreError> {
    file.read_exact_at(buf, at).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            StoreError::Keyring("keyring is truncated".into())
        } else {
            StoreError::io("read keyring", path, e)
        }
    })
}

impl From<CryptoError> for StoreError {
    fn from(e: CryptoError) -> Self {
        StoreError::Crypto(e)
    }
}
