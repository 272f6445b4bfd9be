//! Where the root key comes from: a key file, a systemd credential, or a passphrase
//! stretched with Argon2id. The root key is never written to the data directory.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{CryptoError, RootKey, fill_random};

/// Environment variable systemd sets to the directory holding a service's credentials.
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";
/// Bytes of salt stored with Argon2id parameters.
pub const SALT_LEN: usize = 16;

/// How a data directory's root key is supplied. Recorded (without the secret) in the keyring
/// so that a wrong source gets a helpful message.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum SourceKind {
    /// A key file (64 hex digits, or 32 raw bytes).
    KeyFile,
    /// A systemd credential (`LoadCredential=` / `LoadCredentialEncrypted=`).
    Credential,
    /// A passphrase stretched with Argon2id.
    Passphrase,
}

impl SourceKind {
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            Self::KeyFile => 1,
            Self::Credential => 2,
            Self::Passphrase => 3,
        }
    }

    pub(crate) fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::KeyFile),
            2 => Some(Self::Credential),
            3 => Some(Self::Passphrase),
            _ => None,
        }
    }

    /// How to name this source to an operator.
    /// A short stable name, as audit entries carry it.
    pub fn code(self) -> &'static str {
        match self {
            Self::KeyFile => "key-file",
            Self::Credential => "credential",
            Self::Passphrase => "passphrase",
        }
    }

    /// In words.
    pub fn describe(self) -> &'static str {
        match self {
            Self::KeyFile => "a key file",
            Self::Credential => "a systemd credential",
            Self::Passphrase => "a passphrase",
        }
    }
}

/// Argon2id cost parameters, stored beside the wrapped master key (they are not secret).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over memory.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
    /// Random salt chosen at `init`/`rekey`.
    pub salt: [u8; SALT_LEN],
}

impl KdfParams {
    /// Default cost: 64 MiB, 3 passes, 1 lane (RFC 9106's second recommended option,
    /// with one lane for a 2-core tablet).
    pub const DEFAULT_MEMORY_KIB: u32 = 64 * 1024;
    /// Default passes.
    pub const DEFAULT_ITERATIONS: u32 = 3;
    /// Below this a passphrase is too cheap to guess offline.
    pub const MIN_MEMORY_KIB: u32 = 8 * 1024;
    /// Above this, opening would exhaust a device's memory: a stored value past it is damage.
    pub const MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
    /// Above this, opening would take minutes: a stored value past it is damage.
    pub const MAX_ITERATIONS: u32 = 64;
    /// Lanes above this are refused.
    pub const MAX_PARALLELISM: u32 = 16;

    /// New parameters with a fresh salt; refuses costs outside the bounds above.
    pub fn new(memory_kib: u32, iterations: u32) -> Result<Self, KeySourceError> {
        let mut salt = [0u8; SALT_LEN];
        fill_random(&mut salt)?;
        let p = Self {
            memory_kib,
            iterations,
            parallelism: 1,
            salt,
        };
        p.check()?;
        Ok(p)
    }

    /// Checks costs are within bounds (also used on values read back from disk).
    pub fn check(&self) -> Result<(), KeySourceError> {
        let ok = (Self::MIN_MEMORY_KIB..=Self::MAX_MEMORY_KIB).contains(&self.memory_kib)
            && (1..=Self::MAX_ITERATIONS).contains(&self.iterations)
            && (1..=Self::MAX_PARALLELISM).contains(&self.parallelism);
        if ok {
            Ok(())
        } else {
            Err(KeySourceError::KdfParams {
                memory_kib: self.memory_kib,
                iterations: self.iterations,
                parallelism: self.parallelism,
            })
        }
    }

    /// Stretches a passphrase into a root key. Deliberately slow: call once per start.
    pub fn derive(&self, passphrase: &Passphrase) -> Result<RootKey, KeySourceError> {
        self.check()?;
        let params =
            argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32))
                .map_err(|e| KeySourceError::Argon2(e.to_string()))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase.0.as_bytes(), &self.salt, out.as_mut_slice())
            .map_err(|e| KeySourceError::Argon2(e.to_string()))?;
        Ok(RootKey::from_bytes(*out))
    }
}

/// A passphrase held in memory; zeroized on drop, never printed.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Minimum length accepted when setting a passphrase.
    pub const MIN_LEN: usize = 12;

    /// Wraps a passphrase (trailing newline removed).
    pub fn new(mut s: String) -> Self {
        while s.ends_with('\n') || s.ends_with('\r') {
            s.pop();
        }
        Self(Zeroizing::new(s))
    }

    /// Whether two passphrases are the same (for "repeat it" prompts).
    pub fn same_as(&self, other: &Passphrase) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }

    /// Refuses passphrases too short to resist guessing (when a new one is set).
    pub fn check_new(&self) -> Result<(), KeySourceError> {
        if self.0.chars().count() < Self::MIN_LEN {
            return Err(KeySourceError::WeakPassphrase(Self::MIN_LEN));
        }
        Ok(())
    }
}

impl fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passphrase([redacted])")
    }
}

/// A root-key source named by the operator.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// A key file: must be owned by this user and readable by nobody else.
    KeyFile(PathBuf),
    /// A systemd credential name, looked up in `$CREDENTIALS_DIRECTORY`.
    Credential(String),
    /// A passphrase; the Argon2id parameters come from the keyring.
    Passphrase(Passphrase),
}

/// The root key could not be obtained from its source.
#[derive(Debug, thiserror::Error)]
pub enum KeySourceError {
    /// Operator: the key file is readable by others.
    #[error(
        "key file {path} is readable by group or others (mode {mode:04o}); fix with: chmod 600 {path}"
    )]
    TooOpen {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Operator: the key file belongs to someone else.
    #[error(
        "key file {path} is owned by uid {owner}, not by this user (uid {me}); fix with: chown {me} {path}"
    )]
    WrongOwner {
        /// The file.
        path: String,
        /// Its owner.
        owner: u32,
        /// The user running carecache.
        me: u32,
    },
    /// Operator: the file is not a key (wrong file, or damaged).
    #[error(
        "key file {path} does not hold a key: expected 64 hex digits or 32 raw bytes, found {len} bytes"
    )]
    NotAKey {
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
    /// Operator: the key file (or credential) is not where it was said to be.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// Operator: a key file already exists where a new one was to be written.
    #[error("refusing to overwrite existing key file {0}")]
    Exists(String),
    /// Operator: the key file is inside the data directory it unlocks.
    #[error(
        "key file {0} is inside the data directory; keep the root key elsewhere (a copy of the data directory must not include it)"
    )]
    InsideDataDir(String),
    /// Deployment: `$CREDENTIALS_DIRECTORY` is unset (not started by systemd with `LoadCredential=`).
    #[error(
        "systemd credential {0:?} requested but $CREDENTIALS_DIRECTORY is not set; add LoadCredential= (or LoadCredentialEncrypted=) to the unit"
    )]
    NoCredentialsDirectory(String),
    /// Operator: a credential name must be a plain file name.
    #[error("credential name {0:?} must be a plain file name")]
    BadCredentialName(String),
    /// Operator: a new passphrase is too short.
    #[error("passphrase too short: use at least {0} characters")]
    WeakPassphrase(usize),
    /// Disk damage or tampering: stored Argon2id costs are out of bounds.
    #[error(
        "stored Argon2id parameters are out of bounds (memory {memory_kib} KiB, {iterations} passes, {parallelism} lanes)"
    )]
    KdfParams {
        /// KiB.
        memory_kib: u32,
        /// Passes.
        iterations: u32,
        /// Lanes.
        parallelism: u32,
    },
    /// Machine: Argon2 refused (out of memory).
    #[error("Argon2id failed: {0}")]
    Argon2(String),
    /// Machine: no randomness.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// Longest key file read (hex plus whitespace); anything bigger is not a key.
const MAX_KEY_FILE: u64 = 256;

/// Reads a root key from a key file after checking its owner and mode.
pub fn read_key_file(path: &Path) -> Result<RootKey, KeySourceError> {
    let shown = path.display().to_string();
    let read_err = |source| KeySourceError::Read {
        path: shown.clone(),
        source,
    };
    let mut file = fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    check_private(path, &meta)?;
    let mut buf = Zeroizing::new(Vec::with_capacity(80));
    Read::by_ref(&mut file)
        .take(MAX_KEY_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    parse_key(&buf).ok_or(KeySourceError::NotAKey {
        path: shown,
        len: buf.len(),
    })
}

/// Reads a root key from `$CREDENTIALS_DIRECTORY/NAME`. systemd makes the file readable by
/// the service alone; the same owner and mode checks apply.
pub fn read_credential(name: &str) -> Result<RootKey, KeySourceError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(KeySourceError::BadCredentialName(name.to_string()));
    }
    let dir = std::env::var_os(CREDENTIALS_DIRECTORY)
        .ok_or_else(|| KeySourceError::NoCredentialsDirectory(name.to_string()))?;
    read_key_file(&Path::new(&dir).join(name))
}

/// Writes a new random root key to `path` as 64 hex digits, mode 0600, refusing to
/// overwrite. Returns the key.
pub fn create_key_file(path: &Path) -> Result<RootKey, KeySourceError> {
    let key = RootKey::random()?;
    write_key_file(path, &key)?;
    Ok(key)
}

/// Writes `key` to a new file at `path` (mode 0600, fsynced).
pub fn write_key_file(path: &Path, key: &RootKey) -> Result<(), KeySourceError> {
    let shown = path.display().to_string();
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                KeySourceError::Exists(shown.clone())
            } else {
                KeySourceError::Read {
                    path: shown.clone(),
                    source: e,
                }
            }
        })?;
    let mut text = Zeroizing::new(String::with_capacity(65));
    for b in key.0.expose() {
        text.push(hex_digit(b >> 4));
        text.push(hex_digit(b & 0x0f));
    }
    text.push('\n');
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| KeySourceError::Read {
            path: shown,
            source,
        })
}

fn check_private(path: &Path, meta: &fs::Metadata) -> Result<(), KeySourceError> {
    let shown = path.display().to_string();
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(KeySourceError::WrongOwner {
            path: shown,
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeySourceError::TooOpen { path: shown, mode });
    }
    Ok(())
}

/// 32 raw bytes, or 64 hex digits with optional surrounding whitespace.
fn parse_key(buf: &[u8]) -> Option<RootKey> {
    if let Ok(raw) = <[u8; 32]>::try_from(buf) {
        // A 32-byte file of hex digits is ambiguous only in theory: it would be a 16-byte
        // hex key, which we never write. Raw keys are accepted as they are.
        return Some(RootKey::from_bytes(raw));
    }
    let text = std::str::from_utf8(buf).ok()?.trim();
    if text.len() != 64 {
        return None;
    }
    let mut key = Zeroizing::new([0u8; 32]);
    for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
        let hi = (pair.first()?.to_owned() as char).to_digit(16)?;
        let lo = (pair.get(1)?.to_owned() as char).to_digit(16)?;
        *key.get_mut(i)? = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(RootKey::from_bytes(*key))
}

fn hex_digit(n: u8) -> char {
    char::from_digit(u32::from(n), 16).unwrap_or('0')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn key_file_roundtrip_and_mode_checks() {
        let dir = tmp();
        let path = dir.path().join("root.key");
        let key = create_key_file(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_key_file(&path).unwrap().0.expose(), key.0.expose());
        assert!(matches!(
            create_key_file(&path),
            Err(KeySourceError::Exists(_))
        ));

        for bad in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
            let err = read_key_file(&path).unwrap_err();
            assert!(matches!(err, KeySourceError::TooOpen { .. }), "{bad:o}");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        read_key_file(&path).unwrap();
    }

    #[test]
    fn key_file_contents_are_checked() {
        let dir = tmp();
        let path = dir.path().join("k");
        for (content, ok) in [
            (vec![b'a'; 64], true),
            (
                b"  "
                    .iter()
                    .chain([b'0'; 64].iter())
                    .chain(b"\n")
                    .copied()
                    .collect(),
                true,
            ),
            (vec![7u8; 32], true),
            (vec![b'g'; 64], false),
            (vec![b'a'; 63], false),
            (vec![0u8; 33], false),
            (vec![b'a'; 500], false),
            (Vec::new(), false),
        ] {
            let _ = fs::remove_file(&path);
            fs::write(&path, &content).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let r = read_key_file(&path);
            assert_eq!(r.is_ok(), ok, "{} bytes", content.len());
            if let Err(e) = r {
                assert!(matches!(e, KeySourceError::NotAKey { .. }), "{e}");
            }
        }
    }

    #[test]
    fn credential_names_are_plain_file_names() {
        for bad in ["", "..", "a/b", "/etc/shadow"] {
            assert!(matches!(
                read_credential(bad),
                Err(KeySourceError::BadCredentialName(_))
            ));
        }
    }

    #[test]
    fn argon2_params_bounds_and_determinism() {
        let p = KdfParams::new(KdfParams::MIN_MEMORY_KIB, 1).unwrap();
        let pass = Passphrase::new("correct horse battery staple\n".into());
        let a = p.derive(&pass).unwrap();
        let b = p.derive(&pass).unwrap();
        assert_eq!(a.0.expose(), b.0.expose());
        let other = p
            .derive(&Passphrase::new("correct horse battery stapler".into()))
            .unwrap();
        assert_ne!(a.0.expose(), other.0.expose());
        assert!(KdfParams::new(1024, 1).is_err());
        assert!(KdfParams::new(KdfParams::MIN_MEMORY_KIB, 0).is_err());
        let mut huge = p;
        huge.memory_kib = u32::MAX;
        assert!(matches!(
            huge.derive(&pass),
            Err(KeySourceError::KdfParams { .. })
        ));
        assert!(Passphrase::new("short".into()).check_new().is_err());
        assert!(!format!("{pass:?}").contains("horse"));
    }
}
