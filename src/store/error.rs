//! Store errors. None of them carries patient data: tables are named, rows are not.

use std::io;
use std::path::Path;

use crate::crypto::CryptoError;
use crate::keysource::{KeySourceError, SourceKind};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Operator: the key given does not open this data directory. Nothing was written.
    #[error(
        "the key does not open this data directory (it expects {}): wrong key, or a damaged keyring; nothing was changed",
        .0.describe()
    )]
    WrongKey(SourceKind),
    /// Operator: the key source could not be read.
    #[error(transparent)]
    KeySource(#[from] KeySourceError),
    /// Operator: `init` was not run for this directory.
    #[error("{0} is not an initialised carecache data directory; run `carecache init` first")]
    NotInitialised(String),
    /// Operator: `init` on a directory that already holds a store.
    #[error("{0} already holds a carecache store; use `carecache wipe` first to start again")]
    AlreadyInitialised(String),
    /// Operator: the data directory was written by a newer carecache.
    #[error(
        "the store has schema version {found}, newer than this carecache supports ({supported}); upgrade carecache — the store was not changed"
    )]
    NewerSchema {
        /// Version on disk.
        found: u32,
        /// Newest this build knows.
        supported: u32,
    },
    /// Disk damage: the schema version is one no migration starts from.
    #[error("the store has schema version {0}, which no migration path upgrades")]
    NoMigration(u32),
    /// Operator: keyring and database come from different data directories.
    #[error("the keyring and the database belong to different stores; restore them together")]
    StoreMismatch,
    /// Disk damage or tampering: the keyring is unreadable.
    #[error("keyring: {0}")]
    Keyring(String),
    /// Disk damage, tampering, or a purge interrupted mid-way: a row's data key is gone.
    #[error("the data key for a row is missing or damaged (purged, or the keyring is damaged)")]
    KeyMissing,
    /// Disk damage or tampering: a value did not open or decode.
    #[error(
        "a value in table `{0}` is damaged, was moved from another row, or was sealed under another key"
    )]
    Damaged(&'static str),
    /// The anti-rollback anchor could not be read or used.
    #[error(transparent)]
    Anchor(#[from] crate::anchor::AnchorError),
    /// Disk damage, a full disk, or another process: redb refused.
    #[error("database ({context}): {message}")]
    Database {
        /// What was being done.
        context: &'static str,
        /// redb's description (never contains values).
        message: String,
        /// Whether the failure was a full disk.
        disk_full: bool,
    },
    /// Machine: a file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// Hub or policy bug: the change would break a store invariant; nothing was applied.
    #[error("refused: {0}")]
    Refused(&'static str),
    /// Caller bug: an audit entry does not continue the chain (sequence reused or
    /// skipped, or its hash does not link).
    #[error("audit entry {0} does not continue the stored chain")]
    AuditSequence(u64),
    /// Bug: a value could not be serialised.
    #[error("could not encode a value for storage")]
    Encode,
    /// Test support: an injected write failure (as from a full disk).
    #[error("write failed: injected I/O failure (test)")]
    Injected,
    /// Machine: the database is being reopened after a failed write (a full disk, say),
    /// or could not be reopened yet.
    #[error("the local database is recovering from a failed write (is the disk full?); retrying")]
    Unavailable,
    /// Bug: a thread panicked while holding the store's lock.
    #[error("store lock poisoned by an earlier panic")]
    Poisoned,
    /// Machine: sealing failed (no randomness).
    #[error(transparent)]
    Crypto(CryptoError),
}

impl StoreError {
    pub(crate) fn io(what: &'static str, path: &Path, source: io::Error) -> Self {
        StoreError::Io {
            what,
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn db(context: &'static str, e: impl Into<redb::Error>) -> Self {
        let e: redb::Error = e.into();
        // redb's errors carry no `source()` chain; an I/O failure is `Error::Io` itself.
        let disk_full = matches!(&e, redb::Error::Io(io) if is_disk_full(io));
        let message = match &e {
            redb::Error::DatabaseAlreadyOpen => {
                "another carecache process has this data directory open".to_string()
            }
            _ if disk_full => "the disk is full; the last committed state is intact".to_string(),
            other => other.to_string(),
        };
        StoreError::Database {
            context,
            message,
            disk_full,
        }
    }

    /// Whether this failure was a full disk (the daemon then fails closed on reads).
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Database { disk_full, .. } => *disk_full,
            StoreError::Io { source, .. } => is_disk_full(source),
            _ => false,
        }
    }
}

fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
}
